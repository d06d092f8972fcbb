//! `farm ginkgo` on the fixture ginkgo v1 suite (tests/fixtures/go/.../fixtures/e2e, built
//! against Debian's golang-github-onsi-ginkgo-dev and golang-gomega-dev in /usr/share/gocode):
//! the specs run in shards only on the agent labelled node-e2e, every spec the dry run lists
//! runs exactly once across the shards, a failing spec fails the run and shows in the JUnit
//! file, a farm without a node-e2e agent leaves the suite unschedulable, saying why, and a
//! label filter (ginkgo v2 only) is refused for this v1 suite.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1;
use archfarm_tests::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SUITE: &str = "example.com/fixtures/e2e";
/// Where Debian installs Go sources; ginkgo v1 and gomega live there.
const SYSTEM_GOPATH: &str = "/usr/share/gocode";

/// The fixtures as a GOPATH entry of their own, followed by the system's.
fn fixtures_gopath(farm: &Farm) -> (PathBuf, String) {
    assert!(
        Path::new(SYSTEM_GOPATH)
            .join("src/github.com/onsi/ginkgo")
            .is_dir(),
        "ginkgo v1 is missing: apt-get install golang-github-onsi-ginkgo-dev golang-gomega-dev \
         (.ci/run does)"
    );
    let dst = farm.copy_go_fixtures();
    let gopath = format!("{}:{SYSTEM_GOPATH}", dst.display());
    (dst, gopath)
}

fn ginkgo(farm: &Farm, fixtures: &Path, gopath: &str, args: &[&str]) -> (Output, String) {
    let mut all = vec!["ginkgo"];
    all.extend_from_slice(args);
    farm.go_cli(
        &fixtures.join("src/example.com/fixtures"),
        gopath,
        &all,
        &[],
    )
}

/// The job id from `job <id>: ...`.
fn job_id(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("job ")?.split_once(':').map(|(id, _)| id))
        .unwrap_or_else(|| panic!("no job id in:\n{text}"))
        .to_string()
}

/// `file.go:line` of every spec a verbose ginkgo v1 run announced: the indented location line
/// right after a spec's text (failure blocks list locations too, so only headers count).
fn announced_locations(output: &str) -> Vec<String> {
    let lines: Vec<&str> = output.lines().collect();
    let mut found = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim();
        let is_location = t.ends_with(|c: char| c.is_ascii_digit()) && t.contains("_test.go:");
        // A header's location follows the It's text, which follows the containers' line.
        let header = i >= 2 && lines[i - 2].ends_with(' ') && !lines[i - 2].starts_with(' ');
        if is_location && header && l.starts_with("  /") {
            found.push(t.rsplit('/').next().unwrap().to_string());
        }
    }
    found.sort();
    found
}

/// The specs the suite lists, from a dry run of a binary built here.
fn dry_run_locations(farm: &Farm, fixtures: &Path, gopath: &str) -> Vec<String> {
    let bin = farm.dir.path().join("e2e.test");
    let mut build = Command::new("go");
    build
        .args(["test", "-c", "-o"])
        .arg(&bin)
        .arg(SUITE)
        .current_dir(fixtures);
    farm.go_env(&mut build, gopath);
    let st = build.status().unwrap();
    assert!(st.success(), "go test -c {SUITE} failed");
    let out = Command::new(&bin)
        .args(["-ginkgo.dryRun", "-ginkgo.v", "-ginkgo.noColor"])
        .output()
        .unwrap();
    assert!(out.status.success());
    announced_locations(&String::from_utf8_lossy(&out.stdout))
}

/// A farm with one agent labelled node-e2e and one plain agent; returns the labelled one's id.
fn start() -> (Farm, String) {
    let mut farm = Farm::start(&[]);
    let (token, hash) = farm.token(&["--labels", "node-e2e"]);
    farm.spawn_agent("node-e2e", &token, &hash, &[]);
    farm.add_agent("plain", &[]);
    farm.wait_ready_agents(2);
    let status = farm.status().unwrap();
    let labelled: Vec<&v1::AgentStatus> = status
        .agents
        .iter()
        .filter(|a| a.labels.iter().any(|l| l.key == "node-e2e"))
        .collect();
    assert_eq!(labelled.len(), 1, "{:?}", status.agents);
    let id = labelled[0].agent_id.clone();
    (farm, id)
}

/// (testcase name, failure element) of every testcase in a JUnit file, in order: a small
/// reader of the elements TestGrid reads (this crate has no XML parser).
fn junit_cases(xml: &str) -> Vec<(String, Option<String>)> {
    let mut cases = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("<testcase ") {
        rest = &rest[at..];
        let tag_end = rest.find('>').unwrap();
        let end = if rest[..tag_end].ends_with('/') {
            tag_end
        } else {
            rest.find("</testcase>").unwrap()
        };
        let case = &rest[..end];
        let name = case
            .split(" name=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap()
            .to_string();
        let failure = case.find("<failure").map(|f| case[f..].to_string());
        cases.push((name, failure));
        rest = &rest[end..];
    }
    cases
}

#[test]
fn shards_run_only_on_the_node_e2e_agent_and_every_spec_runs_once() {
    let (farm, labelled) = start();
    let (fixtures, gopath) = fixtures_gopath(&farm);
    let junit = farm.dir.path().join("junit");
    let (out, text) = ginkgo(
        &farm,
        &fixtures,
        &gopath,
        &[
            "--platform",
            "linux/amd64",
            "--shards",
            "2",
            "--junit",
            junit.to_str().unwrap(),
            SUITE,
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("6 specs in 2 shards: 6 passed, 0 failed, 0 skipped, 0 not run"),
        "{text}"
    );

    // Two shards, each an action on the labelled agent, never on the plain one.
    let job = farm.job(&job_id(&text)).unwrap();
    assert_eq!(job.actions.len(), 2, "{job:?}");
    let mut outputs = Vec::new();
    for a in &job.actions {
        let r = a.result.as_ref().unwrap();
        assert_eq!(r.agent_id, labelled, "shard {} ran elsewhere", a.action_id);
        assert_eq!(r.step_results.len(), 1);
        let step = &r.step_results[0];
        assert_eq!(step.agent_id, labelled);
        assert_eq!(step.exit_code, 0);
        outputs.push(farm.read_blob(step.output.as_ref().unwrap()));
    }
    let plain = farm
        .agents
        .iter()
        .find(|p| p.name == "agent-plain")
        .unwrap()
        .log_text();
    assert!(
        !plain.contains("action finished"),
        "the plain agent ran something:\n{plain}"
    );

    // Every listed spec ran exactly once across the shards, each shard a share of them.
    let listed = dry_run_locations(&farm, &fixtures, &gopath);
    assert_eq!(listed.len(), 6, "{listed:?}");
    let mut ran: Vec<String> = outputs
        .iter()
        .flat_map(|o| announced_locations(o))
        .collect();
    ran.sort();
    assert_eq!(ran, listed, "shard outputs:\n{}", outputs.join("\n=====\n"));
    let mut per_shard: Vec<usize> = outputs
        .iter()
        .map(|o| {
            assert!(o.contains("SUCCESS!"), "{o}");
            announced_locations(o).len()
        })
        .collect();
    per_shard.sort();
    assert_eq!(per_shard, [3, 3]);

    // JUnit: a testcase per spec, none failed.
    let xml = std::fs::read_to_string(junit.join("junit_linux_amd64.xml")).unwrap();
    let cases = junit_cases(&xml);
    assert_eq!(cases.len(), 6, "{xml}");
    let mut names: Vec<&str> = cases.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(cases.iter().all(|(_, f)| f.is_none()), "{xml}");
    farm.assert_no_unexpected_errors(&[]);
}

#[test]
fn a_failing_spec_fails_the_run_and_shows_in_junit() {
    let (farm, _) = start();
    let (fixtures, gopath) = fixtures_gopath(&farm);
    let junit = farm.dir.path().join("junit");
    let (out, text) = ginkgo(
        &farm,
        &fixtures,
        &gopath,
        &[
            "--platform",
            "linux/amd64",
            "--shards",
            "2",
            "--env",
            "E2E_FAIL=1",
            "--junit",
            junit.to_str().unwrap(),
            SUITE,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("--- FAIL: [sig-node] Pods when a pod is deleted should be gone"),
        "{text}"
    );
    assert!(text.contains("5 passed, 1 failed"), "{text}");
    let xml = std::fs::read_to_string(junit.join("junit_linux_amd64.xml")).unwrap();
    let failed: BTreeMap<String, String> = junit_cases(&xml)
        .into_iter()
        .filter_map(|(n, f)| Some((n, f?)))
        .collect();
    assert_eq!(failed.len(), 1, "{xml}");
    let (name, failure) = failed.iter().next().unwrap();
    assert!(name.contains("should be gone"), "{name}");
    assert!(
        failure.contains("E2E_FAIL=1 asks this spec to fail"),
        "{failure}"
    );
    farm.assert_no_unexpected_errors(&[]);
}

#[test]
fn without_a_node_e2e_agent_the_suite_is_unschedulable() {
    let mut farm = Farm::start(&["--unschedulable-grace-s", "2"]);
    farm.add_agent("plain", &[]);
    farm.wait_ready_agents(1);
    let (fixtures, gopath) = fixtures_gopath(&farm);
    let (out, text) = ginkgo(
        &farm,
        &fixtures,
        &gopath,
        &["--platform", "linux/amd64", SUITE],
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("unschedulable"), "{text}");
    assert!(
        text.contains("node-e2e"),
        "the reason names the label:\n{text}"
    );
    assert!(
        text.contains("0 passed, 0 failed, 0 skipped, 6 not run"),
        "{text}"
    );
    let plain = farm.agents[0].log_text();
    assert!(!plain.contains("action finished"), "{plain}");

    // Labels are a ginkgo v2 feature: refused for this v1 suite before anything is built.
    let (out, text) = ginkgo(
        &farm,
        &fixtures,
        &gopath,
        &[
            "--platform",
            "linux/amd64",
            "--label-filter",
            "NodeConformance",
            SUITE,
        ],
    );
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("ginkgo v2 feature") && text.contains("--focus"),
        "{text}"
    );
}
