//! Cache scopes end to end, as CI uses them: a pull-request job (untrusted credentials) and
//! a postsubmit job (trusted credentials) run `archfarm go-test` on the same package. What the
//! untrusted job produced answers only its own reruns; what the trusted job produced answers
//! everyone. Each run's planning line says how many results came from which scope.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1;
use archfarm_tests::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn go_test_pkg(farm: &Farm, creds: &Path, gopath: &Path, pkg: &str) -> (Output, String) {
    farm.go_cli_as(
        creds,
        &gopath.join("src/example.com/fixtures"),
        gopath,
        &["go-test", "--platform", "linux/amd64", pkg],
        &[],
    )
}

fn go_test(farm: &Farm, creds: &Path, gopath: &Path) -> String {
    let (out, text) = go_test_pkg(farm, creds, gopath, "./pass");
    assert!(out.status.success(), "go-test failed:\n{text}");
    text
}

/// The planning line: `1 package with tests on 1 platform: ...`.
fn planned(text: &str) -> &str {
    text.lines()
        .find(|l| l.contains("package with tests on"))
        .unwrap_or_else(|| panic!("no planning line:\n{text}"))
}

fn start() -> (Farm, PathBuf) {
    let mut farm = Farm::start(&[]);
    farm.add_agent("amd64", &[]);
    farm.wait_ready_agents(1);
    let gp = farm.copy_go_fixtures();
    (farm, gp)
}

#[test]
fn an_untrusted_clients_results_answer_only_itself_and_the_shared_scope_answers_everyone() {
    let (farm, gp) = start();
    let pr = farm.client_credentials("pr-1234");
    let ci = farm.trusted_client_credentials("ci-postsubmit");
    let other_pr = farm.client_credentials("pr-5678");
    let ran = "0 cached, 1 to build and run";

    // The pull request runs the package: nothing is cached yet.
    let text = go_test(&farm, &pr, &gp);
    assert!(planned(&text).ends_with(ran), "{text}");
    // The trusted postsubmit runs it again: the pull request's result does not answer it.
    let text = go_test(&farm, &ci, &gp);
    assert!(
        planned(&text).ends_with(ran),
        "an untrusted result answered a trusted job:\n{text}"
    );
    // The pull request's rerun is answered from its own scope.
    let text = go_test(&farm, &pr, &gp);
    assert!(
        planned(&text)
            .ends_with("1 cached (1 from the principal pr-1234 scope), 0 to build and run"),
        "{text}"
    );
    // The postsubmit's rerun is answered from the shared scope.
    let text = go_test(&farm, &ci, &gp);
    assert!(
        planned(&text).ends_with("1 cached (1 from the shared scope), 0 to build and run"),
        "{text}"
    );
    // Another pull request never ran it: it reads the shared result.
    let text = go_test(&farm, &other_pr, &gp);
    assert!(
        planned(&text).ends_with("1 cached (1 from the shared scope), 0 to build and run"),
        "{text}"
    );
}

#[test]
fn a_pull_request_cannot_plant_a_pass_for_a_failing_package() {
    let (farm, gp) = start();
    let pr = farm.client_credentials("pr-evil");
    let ci = farm.trusted_client_credentials("ci-postsubmit");
    // The attacker learns the key an honest client computes for the failing package: it runs
    // the honest client itself and reads the key from its own job.
    let (out, text) = go_test_pkg(&farm, &pr, &gp, "./fail");
    assert_ne!(out.status.code(), Some(0), "the package fails:\n{text}");
    let job = text
        .lines()
        .find_map(|l| l.strip_prefix("job ")?.split(':').next())
        .unwrap_or_else(|| panic!("no job line:\n{text}"))
        .to_string();
    let key = farm.job(&job).unwrap().spec.unwrap().step_sets[0].steps[0]
        .cache_key
        .clone();
    assert_eq!(key.len(), 64, "{key:?}");
    // It submits a step under that key that always passes.
    let spec = v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: "linux/amd64".into(),
            steps: vec![v1::Step {
                name: "pkg".into(),
                argv: vec!["true".into()],
                cache_key: key,
                ..Default::default()
            }],
        }],
        timeout_ms: 60_000,
        ..Default::default()
    };
    let planted = farm.submit_as(Some(&pr), spec).unwrap();
    farm.wait_for("the planted step to pass", Duration::from_secs(60), |f| {
        f.job(&planted).is_ok_and(|j| j.finished)
    });
    let done = farm.job(&planted).unwrap();
    assert!(
        done.actions
            .iter()
            .all(|a| a.state == v1::ActionState::Succeeded as i32),
        "{done:?}"
    );
    // Its own scope now holds the pass, so only its own rerun is fooled.
    let (_, text) = go_test_pkg(&farm, &pr, &gp, "./fail");
    assert!(
        planned(&text).contains("1 cached (1 from the principal pr-evil scope)"),
        "{text}"
    );
    // The honest trusted run afterwards runs the package and fails, as it should.
    let (out, text) = go_test_pkg(&farm, &ci, &gp, "./fail");
    assert!(
        planned(&text).ends_with("0 cached, 1 to build and run"),
        "the planted pass answered the trusted run:\n{text}"
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "the trusted run passed a failing package:\n{text}"
    );
}
