//! Trust end to end: which results are cached (trusted native agents only, unless the job
//! asks), who may call what (client acting as agent, agent acting as admin), results that no
//! lease produced, revocation ending open streams at once, and join tokens listed and deleted.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1::{self, coordinator_message::Kind};
use archfarm_proto::Digest;
use archfarm_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `farm run --json-report` with `args`; returns how many actions came from the cache.
fn cached_actions(farm: &Farm, name: &str, args: &[&str]) -> u64 {
    let report = farm.dir.path().join(format!("{name}.json"));
    let mut all = vec![
        "run",
        "--platform",
        "linux/amd64",
        "--json-report",
        report.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let out = farm.cli(&all);
    assert!(out.status.success(), "{name}: {}", stderr(&out));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    v["cached"].as_u64().unwrap()
}

#[test]
fn only_trusted_agents_results_are_cached_unless_the_job_asks() {
    let mut farm = Farm::start(&[]);
    let (t, hash) = farm.token(&["--labels", "trusted=true,pool=trusted"]);
    farm.spawn_agent("trusted", &t, &hash, &[]);
    let (u, hash) = farm.token(&["--labels", "pool=untrusted"]);
    farm.spawn_agent("untrusted", &u, &hash, &[]);
    farm.wait_ready_agents(2);

    // Each case twice with the same command; the second run is cached only where allowed.
    let cases: [(&str, &[&str], u64); 3] = [
        ("untrusted", &["--label", "pool=untrusted"], 0),
        (
            "untrusted-asked",
            &["--label", "pool=untrusted", "--cache-untrusted"],
            1,
        ),
        ("trusted", &["--label", "pool=trusted"], 1),
    ];
    for (name, flags, cached_second) in cases {
        let mut args = flags.to_vec();
        args.extend(["--", "echo", name]);
        assert_eq!(
            cached_actions(&farm, &format!("{name}-1"), &args),
            0,
            "{name}: first run"
        );
        assert_eq!(
            cached_actions(&farm, &format!("{name}-2"), &args),
            cached_second,
            "{name}: second run"
        );
    }
    // The untrusted agent's result was returned as usual: its output reached the client.
    let out = farm.cli(&[
        "run",
        "--platform",
        "linux/amd64",
        "--label",
        "pool=untrusted",
        "--",
        "echo",
        "from-untrusted",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from-untrusted"),
        "{}",
        stderr(&out)
    );

    // Status says which agents are trusted.
    let out = farm.cli(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut trust: Vec<(bool, String)> = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["trusted"].as_bool().unwrap(),
                a["labels"]["pool"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    trust.sort();
    assert_eq!(
        trust,
        [(false, "untrusted".into()), (true, "trusted".into())]
    );
    let text = String::from_utf8_lossy(&farm.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("untrusted") && text.contains(" trusted "),
        "{text}"
    );
    farm.assert_no_unexpected_errors(&[]);
}

fn spec(platform: &str, argv: &[&str]) -> v1::JobSpec {
    v1::JobSpec {
        platforms: vec![platform.into()],
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: 600_000,
        ..Default::default()
    }
}

fn action_of(farm: &Farm, job: &str) -> v1::ActionStatus {
    farm.job(job).unwrap().actions.remove(0)
}

fn state(farm: &Farm, job: &str) -> (v1::ActionState, u32) {
    let a = action_of(farm, job);
    (a.state(), a.attempts)
}

/// Waits for the refusal a call or stream ends with, for at most 10 s.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> tonic::Status {
    r.err()
        .unwrap_or_else(|| panic!("{what}: accepted, expected a refusal"))
}

fn assert_refused(what: &str, s: &tonic::Status, codes: &[Code], text: &str) {
    assert!(codes.contains(&s.code()), "{what}: {s:?}");
    assert!(s.message().contains(text), "{what}: {:?}", s.message());
}

const DENIED: &[Code] = &[Code::PermissionDenied];
const REVOKED: &[Code] = &[Code::Unauthenticated, Code::PermissionDenied];

#[test]
fn roles_results_no_lease_produced_and_revocation_are_refused_with_state_unchanged() {
    let mut farm = Farm::start(&["--unschedulable-grace-s", "3600", "--lease-s", "60"]);
    let i = farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let agent_id = farm.agent_id(i);
    let agent = farm.agent_credentials(i);
    // From here the test speaks for the agent itself, with its certificate.
    farm.agents[i].kill();
    farm.wait_for("the agent's session to end", Duration::from_secs(30), |f| {
        f.status()
            .is_ok_and(|s| s.agents[0].state == v1::AgentState::Lost as i32)
    });
    let client = farm.client_credentials("ci");

    // A client acting as an agent, an agent and a client acting as admins.
    let e = refused(
        "client session",
        farm.open_session(&client, hello("linux/amd64")),
    );
    assert_refused("client session", &e, DENIED, "this call needs role agent");
    for (who, creds) in [("agent", &agent), ("client", &client)] {
        let ch = farm.channel(Some(creds)).unwrap();
        let mut admin = v1::admin_client::AdminClient::new(ch);
        let calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
            (
                "list tokens",
                farm.block_on(admin.list_tokens(v1::ListTokensRequest {}))
                    .map(drop),
            ),
            (
                "delete token",
                farm.block_on(admin.delete_token(v1::DeleteTokenRequest {
                    token_id: "abcdef".into(),
                }))
                .map(drop),
            ),
            (
                "issue credentials",
                farm.block_on(admin.issue_credentials(v1::IssueCredentialsRequest {
                    role: "client".into(),
                    name: "sneaky".into(),
                    ..Default::default()
                }))
                .map(drop),
            ),
            (
                "revoke agent",
                farm.block_on(admin.revoke_agent(v1::AgentRequest {
                    agent_id: agent_id.clone(),
                }))
                .map(drop),
            ),
        ];
        for (call, r) in calls {
            let what = format!("{who} {call}");
            assert_refused(
                &what,
                &refused(&what, r),
                DENIED,
                "this call needs role admin",
            );
        }
    }
    // The client may do what clients do.
    let done = farm
        .submit_as(Some(&client), spec("linux/amd64", &["true"]))
        .unwrap();

    // The agent's own session: the job above is assigned to it; its result is accepted.
    let mut s = farm.open_session(&agent, hello("linux/amd64")).unwrap();
    farm.expect_message(&mut s, Duration::from_secs(10), |k| {
        matches!(k, Kind::Welcome(_)).then_some(())
    });
    let assigned = |farm: &Farm, s: &mut RawSession| {
        farm.expect_message(s, Duration::from_secs(10), |k| match k {
            Kind::Assign(a) => Some((a.action_id.clone(), a.fence)),
            _ => None,
        })
    };
    let acked = |farm: &Farm, s: &mut RawSession| {
        farm.expect_message(s, Duration::from_secs(10), |k| match k {
            Kind::Ack(a) => Some((a.accepted, a.reason.clone())),
            _ => None,
        })
    };
    let (done_action, old_fence) = assigned(&farm, &mut s);
    farm.send(&s, completed(&done_action, old_fence));
    assert_eq!(acked(&farm, &mut s), (true, String::new()));
    assert_eq!(state(&farm, &done), (v1::ActionState::Succeeded, 1));

    // A running action and one that no agent can take.
    let running = farm
        .submit_as(Some(&client), spec("linux/amd64", &["sleep", "600"]))
        .unwrap();
    let (running_action, fence) = assigned(&farm, &mut s);
    let queued = farm
        .submit_as(Some(&client), spec("linux/s390x", &["true"]))
        .unwrap();
    let queued_action = action_of(&farm, &queued).action_id;
    let before = (
        state(&farm, &done),
        state(&farm, &running),
        state(&farm, &queued),
    );
    assert_eq!(
        before,
        (
            (v1::ActionState::Succeeded, 1),
            (v1::ActionState::Running, 1),
            (v1::ActionState::Queued, 0)
        )
    );

    // A stale fence (issued, but not the current lease's): refused in the ack, counted, and
    // the session stays (an agent resends results after a reconnect; its lease may be gone).
    farm.send(&s, completed(&running_action, old_fence));
    let (accepted, reason) = acked(&farm, &mut s);
    assert!(!accepted && reason.contains("stale fence"), "{reason}");
    assert_eq!(farm.status().unwrap().stale_results_refused, 1);

    // A result for an action never leased: PERMISSION_DENIED, the session ends.
    farm.send(&s, completed(&queued_action, fence));
    let e = refused(
        "never leased",
        farm.next_message(&mut s, Duration::from_secs(10)),
    );
    assert_refused("never leased", &e, DENIED, "was never leased");
    // Nothing moved.
    let after = (
        state(&farm, &done),
        state(&farm, &running),
        state(&farm, &queued),
    );
    assert_eq!(after, before, "refused results change nothing");
    assert_eq!(farm.status().unwrap().stale_results_refused, 1);

    // Revocation ends open streams at once: the agent's session (re-claiming its action)
    // and a half-written blob; the client's watch of a job.
    let mut s = farm
        .open_session(
            &agent,
            hello_message(v1::Hello {
                platforms: vec![v1::PlatformOffer {
                    platform: "linux/amd64".into(),
                    emulated: false,
                }],
                slots: 1,
                running: vec![v1::RunningAction {
                    action_id: running_action.clone(),
                    fence,
                }],
                ..Default::default()
            }),
        )
        .unwrap();
    farm.expect_message(&mut s, Duration::from_secs(10), |k| {
        matches!(k, Kind::Welcome(_)).then_some(())
    });
    let blob = b"0123456789".to_vec();
    let (write_tx, write) = {
        let ch = farm.channel(Some(&agent)).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let d = Digest::of(&blob).to_proto();
        farm.block_on(tx.send(v1::WriteRequest {
            digest: Some(d),
            data: blob[..5].to_vec(),
        }))
        .unwrap();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let call =
            farm.spawn(async move { v1::cas_client::CasClient::new(ch).write(stream).await });
        (tx, call)
    };
    let mut watch = {
        let ch = farm.channel(Some(&client)).unwrap();
        farm.block_on(
            v1::jobs_client::JobsClient::new(ch).watch(v1::WatchRequest {
                job_id: queued.clone(),
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner()
    };
    let first_event = farm.block_on(watch.message()).unwrap();
    assert!(first_event.is_some(), "the watch is open");

    let started = Instant::now();
    let out = farm.cli(&["agents", "revoke", &agent_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = loop {
        match farm.next_message(&mut s, Duration::from_secs(5)) {
            Ok(Some(_)) => continue,
            other => break refused("revoked session", other),
        }
    };
    assert_refused("revoked session", &e, REVOKED, "revoked");
    let e = farm.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("the write ends without waiting for more data")
            .unwrap()
    });
    assert_refused(
        "revoked write",
        &refused("revoked write", e),
        REVOKED,
        "revoked",
    );
    drop(write_tx);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "refused at once, not after {:?}",
        started.elapsed()
    );
    // Any new call with the revoked certificate.
    let e = refused(
        "new session",
        farm.open_session(&agent, hello("linux/amd64")),
    );
    assert_refused("new session", &e, REVOKED, "revoked");
    let ch = farm.channel(Some(&agent)).unwrap();
    let e = farm.block_on(
        v1::cas_client::CasClient::new(ch).find_missing(v1::FindMissingRequest::default()),
    );
    assert_refused(
        "find missing",
        &refused("find missing", e),
        REVOKED,
        "revoked",
    );
    // Its action went back to the queue; nothing was stored from the half-written blob.
    assert_eq!(state(&farm, &running), (v1::ActionState::Queued, 1));
    let ch = farm.channel(Some(&farm.admin_dir())).unwrap();
    let missing = farm
        .block_on(
            v1::cas_client::CasClient::new(ch).find_missing(v1::FindMissingRequest {
                digests: vec![Digest::of(&blob).to_proto()],
            }),
        )
        .unwrap()
        .into_inner()
        .missing;
    assert_eq!(missing.len(), 1, "the revoked write stored nothing");

    // Revoking the client's credentials ends its watch and refuses its next call.
    let out = farm.cli(&["credentials", "revoke", "ci"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let e = farm.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), watch.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(other) => break other,
                Err(_) => panic!("the watch of a revoked client stayed open"),
            }
        }
    });
    assert_refused(
        "revoked watch",
        &refused("revoked watch", e),
        REVOKED,
        "revoked",
    );
    let e = farm
        .submit_as(Some(&client), spec("linux/amd64", &["true"]))
        .unwrap_err();
    assert_refused("revoked client", &e, REVOKED, "revoked");
    assert_eq!(state(&farm, &queued), (v1::ActionState::Queued, 0));
    farm.assert_no_unexpected_errors(&["agent-a"]);
}

fn token_ids(farm: &Farm) -> Vec<Value> {
    let out = farm.cli(&["tokens", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn tokens_are_listed_without_secrets_and_a_deleted_token_cannot_join() {
    let mut farm = Farm::start(&[]);
    let (token, hash) = farm.token(&["--labels", "trusted=true", "--description", "lab box"]);
    let (id, secret) = token.split_once('.').unwrap();
    let listed = token_ids(&farm);
    let t = listed
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed: {listed:?}"));
    assert_eq!(t["labels"]["trusted"], "true");
    assert_eq!(t["description"], "lab box");
    assert_eq!(
        (t["uses"].as_u64(), t["single_use"].as_bool()),
        (Some(0), Some(false))
    );
    assert!(t["created_unix_ms"].as_u64().unwrap() > 0);
    assert!(t["expires_unix_ms"].as_u64() > t["created_unix_ms"].as_u64());
    let text = farm.cli(&["token", "list"]);
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains(id) && text.contains("trusted=true"), "{text}");
    for out in [text, serde_json::to_string(&listed).unwrap()] {
        assert!(!out.contains(secret), "the secret is never listed: {out}");
    }

    let out = farm.cli(&["tokens", "delete", id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(token_ids(&farm).iter().all(|t| t["id"] != id));
    let i = farm.spawn_agent("deleted", &token, &hash, &[]);
    let code = farm.agents[i].wait_exit(Duration::from_secs(20));
    assert!(matches!(code, Some(c) if c != 0), "agent exit {code:?}");
    assert!(
        farm.agents[i].log_text().contains("not known"),
        "{}",
        farm.agents[i].log_text()
    );
    assert!(farm.status().unwrap().agents.is_empty(), "nothing joined");
    let again = farm.cli(&["tokens", "delete", id]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("not found"), "{}", stderr(&again));
    farm.assert_no_unexpected_errors(&["agent-deleted"]);
}

/// The credentials directory written by `credentials create` works as `--credentials`.
#[test]
fn issued_client_credentials_submit_but_do_not_administer() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let client = farm.client_credentials("ci-runner");
    assert!(Path::new(&client).join("key.pem").exists());
    let out = farm.cli_with(
        &["run", "--platform", "linux/amd64", "--", "echo", "hi"],
        &client,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = farm.status().unwrap();
    assert_eq!(s.recent_jobs[0].submitter, "ci-runner");
    let out = farm.cli_with(&["token", "create"], &client);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
    let out = farm.cli_with(
        &[
            "credentials",
            "create",
            "--name",
            "x",
            "--out",
            "/nonexistent/x",
        ],
        &client,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
}
