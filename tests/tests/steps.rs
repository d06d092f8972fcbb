//! Jobs made of step sets end to end: sharding into actions, every step run in its own
//! directory with its own watchdog, passing steps cached and skipped on the next run.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::{tree, v1, Digest};
use archfarm_tests::*;
use prost::Message;
use std::path::Path;
use std::time::Duration;

fn upload_tree(farm: &Farm, dir: &Path) -> Digest {
    let t = tree::build_local_tree(dir).unwrap();
    let mut blobs = Vec::new();
    for d in t.all_digests() {
        blobs.push(v1::Blob {
            digest: Some(d.to_proto()),
            data: t.read_blob(&d).unwrap(),
        });
    }
    let ch = farm.channel(Some(&farm.admin_dir())).unwrap();
    farm.block_on(async move {
        v1::cas_client::CasClient::new(ch)
            .batch_upload(v1::BatchUploadRequest { blobs })
            .await
            .unwrap();
    });
    t.root
}

fn script(dir: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(dir.join("data/input.txt"), "input data\n").unwrap();
    let p = dir.join("run.sh");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn step(name: &str, root: Digest, key: &str, timeout_ms: u64) -> v1::Step {
    v1::Step {
        name: name.into(),
        argv: vec!["./run.sh".into()],
        working_directory: String::new(),
        input_root: Some(root.to_proto()),
        timeout_ms,
        history_key: format!("example.com/{name}"),
        cache_key: key.into(),
    }
}

fn submit_and_wait(farm: &Farm, spec: v1::JobSpec) -> v1::JobStatus {
    let id = farm.submit_as(Some(&farm.admin_dir()), spec).unwrap();
    let mut last = None;
    farm.wait_for("the job to finish", Duration::from_secs(60), |f| {
        last = f.job(&id).ok();
        last.as_ref().is_some_and(|j| j.finished)
    });
    last.unwrap()
}

#[test]
fn step_sets_are_sharded_run_with_watchdogs_and_cached() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &["--slots", "2"]);
    farm.wait_ready_agents(1);
    let base = farm.dir.path().join("steps");
    script(
        &base.join("pass"),
        "cat data/input.txt; echo to-stderr >&2; pwd",
    );
    script(&base.join("fail"), "echo failing; exit 3");
    script(&base.join("hang"), "trap '' TERM; sleep 300");
    let roots: Vec<Digest> = ["pass", "fail", "hang"]
        .iter()
        .map(|n| upload_tree(&farm, &base.join(n)))
        .collect();
    let keys = ["a".repeat(64), "b".repeat(64), "c".repeat(64)];
    let spec = v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: "linux/amd64".into(),
            steps: vec![
                step("pass", roots[0], &keys[0], 30_000),
                step("fail", roots[1], &keys[1], 30_000),
                step("hang", roots[2], &keys[2], 1_000),
            ],
        }],
        shards: 2,
        timeout_ms: 60_000,
        ..Default::default()
    };
    let job = submit_and_wait(&farm, spec.clone());
    assert_eq!(job.actions.len(), 2, "two shards: {:?}", job.actions);
    let results: Vec<v1::StepResult> = job
        .actions
        .iter()
        .flat_map(|a| {
            a.result
                .as_ref()
                .map(|r| r.step_results.clone())
                .unwrap_or_default()
        })
        .collect();
    let by = |n: &str| {
        results
            .iter()
            .find(|r| r.name == n)
            .unwrap_or_else(|| panic!("{n} in {results:?}"))
            .clone()
    };
    let (pass, fail, hang) = (by("pass"), by("fail"), by("hang"));
    assert_eq!((pass.exit_code, pass.timed_out), (0, false));
    let out = farm.read_blob(pass.output.as_ref().unwrap());
    assert!(
        out.contains("input data")
            && out.contains("to-stderr")
            && out.trim_end().ends_with("/pass"),
        "{out}"
    );
    assert_eq!(fail.exit_code, 3);
    assert!(hang.timed_out, "{hang:?}");
    assert!(
        hang.duration_ms < 10_000,
        "the watchdog ended the hang: {hang:?}"
    );
    for a in &job.actions {
        assert!(a.predicted_ms > 0 && !a.step_names.is_empty(), "{a:?}");
    }

    // The passing step comes from the step cache now; the others run again.
    let ch = farm.channel(Some(&farm.admin_dir())).unwrap();
    let k = keys.to_vec();
    let hits = farm.block_on(async move {
        v1::jobs_client::JobsClient::new(ch)
            .lookup_steps(v1::LookupStepsRequest {
                cache_keys: k,
                allow_emulation: false,
            })
            .await
            .unwrap()
            .into_inner()
            .hits
    });
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].cache_key, keys[0]);
    let again = submit_and_wait(&farm, spec);
    let cached = again
        .actions
        .iter()
        .find(|a| a.action_id.ends_with("/cached"))
        .expect("a cached action");
    assert!(cached.cached);
    let r = v1::ExecutionResult::decode(cached.result.as_ref().unwrap().encode_to_vec().as_slice())
        .unwrap();
    assert_eq!(r.step_results.len(), 1);
    assert!(r.step_results[0].cached && r.step_results[0].name == "pass");
    let ran: Vec<String> = again
        .actions
        .iter()
        .flat_map(|a| a.step_names.clone())
        .collect();
    assert!(!ran.contains(&"pass".to_string()), "{ran:?}");
}
