//! The core loop end to end: join, roles, run, emulation, lost agents, restarts, cancel and
//! resumed watches, with real processes and real TLS on loopback (malformed requests are
//! malformed.rs's table).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1;
use archfarm_tests::*;
use nix::sys::signal::Signal;
use std::time::Duration;
use tonic::Code;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn job_id_from(stderr: &str) -> String {
    stderr
        .split_whitespace()
        .find(|w| w.starts_with("j-"))
        .map(|w| {
            w.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                .to_string()
        })
        .unwrap_or_else(|| panic!("no job id in {stderr}"))
}

#[test]
fn tokens_join_agents_and_bad_tokens_register_nothing() {
    let mut farm = Farm::start(&[]);
    let (token, hash) = farm.token(&["--labels", "lab=e2e", "--single-use"]);
    assert!(token.len() == 23 && token.as_bytes()[6] == b'.', "{token}");
    farm.spawn_agent("good", &token, &hash, &[]);
    farm.wait_ready_agents(1);
    let s = farm.status().unwrap();
    assert_eq!(s.agents.len(), 1);
    let a = &s.agents[0];
    assert_eq!(a.platforms[0].platform, "linux/amd64");
    assert!(!a.platforms[0].emulated);
    assert!(
        a.labels.iter().any(|l| l.key == "lab" && l.value == "e2e"),
        "{:?}",
        a.labels
    );

    // The same single-use token again, a made-up token, an expired one: refused, nothing joins.
    let (short, _) = farm.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    for (name, bad, expect) in [
        ("reused", token.as_str(), "already used"),
        ("madeup", "abcdef.0123456789abcdef", "not known"),
        ("expired", short.as_str(), "expired"),
        ("garbled", "nonsense", "malformed join token"),
    ] {
        let i = farm.spawn_agent(name, bad, &hash, &[]);
        let code = farm.agents[i].wait_exit(Duration::from_secs(20));
        assert!(
            matches!(code, Some(c) if c != 0),
            "{name}: agent exit {code:?}"
        );
        let log = farm.agents[i].log_text();
        assert!(
            log.contains(expect),
            "{name}: agent log lacks {expect:?}:\n{log}"
        );
    }
    // A wrong CA pin is refused before any token is sent.
    let (t2, _) = farm.token(&[]);
    let wrong = format!("sha256:{}", "0".repeat(64));
    let i = farm.spawn_agent("wrongpin", &t2, &wrong, &[]);
    let code = farm.agents[i].wait_exit(Duration::from_secs(30));
    assert!(
        matches!(code, Some(c) if c != 0),
        "a wrong pin is fatal: exit {code:?}"
    );
    assert!(
        farm.agents[i].log_text().contains("does not match the pin"),
        "{}",
        farm.agents[i].log_text()
    );
    assert_eq!(
        farm.status().unwrap().agents.len(),
        1,
        "refused agents must not be registered"
    );
    farm.assert_no_unexpected_errors(&["agent-"]);
}

#[test]
fn roles_are_checked_on_every_call() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let agent_creds = farm.dir.path().join("agent-a/credentials");
    let spec = v1::JobSpec {
        platforms: vec!["linux/amd64".into()],
        argv: vec!["true".into()],
        timeout_ms: 60_000,
        ..Default::default()
    };
    // No client certificate.
    let e = farm.submit_as(None, spec.clone()).unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // An agent certificate can neither submit nor administer.
    let ch = farm.channel(Some(&agent_creds)).unwrap();
    let e = farm
        .submit_as(Some(&agent_creds), spec.clone())
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = farm
        .block_on(async move {
            v1::admin_client::AdminClient::new(ch)
                .create_token(v1::CreateTokenRequest::default())
                .await
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The CLI says so readably.
    let out = farm.cli_with(&["status"], &agent_creds);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn run_streams_both_streams_and_returns_the_exit_code() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let out = farm.cli(&[
        "run",
        "--platform",
        "linux/amd64",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("[linux/amd64] out"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("[linux/amd64] err"),
        "{}",
        stderr(&out)
    );
    let ok = farm.cli(&["run", "--platform", "linux/amd64", "--", "true"]);
    assert_eq!(ok.status.code(), Some(0), "{}", stderr(&ok));
    farm.assert_no_unexpected_errors(&[]);
}

#[test]
fn foreign_binaries_run_on_emulated_agents_only_when_allowed() {
    let arches = ["arm64", "ppc64le", "s390x", "riscv64"];
    let mut farm = Farm::start(&["--unschedulable-grace-s", "2"]);
    build_hello(&farm.dir.path().join("hello"), &arches).expect("go cross-compile");
    for arch in arches {
        let emulate = format!("linux/{arch}={}", qemu_for(arch));
        farm.add_agent(arch, &["--no-native", "--emulate", &emulate]);
    }
    farm.wait_ready_agents(4);
    let input = farm.dir.path().join("hello/input");
    let input = input.to_str().unwrap();
    let mut args = vec!["run", "--allow-emulation", "--input", input];
    for arch in &arches {
        args.push("--platform");
        args.push(Box::leak(format!("linux/{arch}").into_boxed_str()));
    }
    args.extend(["--", "./{os}/{arch}/hello"]);
    let out = farm.cli(&args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&out),
        stderr(&out)
    );
    for arch in arches {
        assert!(
            stdout(&out).contains(&format!("[linux/{arch}] hello from linux/{arch}")),
            "{arch}: {}",
            stdout(&out)
        );
    }
    assert!(
        stdout(&out).to_lowercase().contains("emulated")
            || stderr(&out).to_lowercase().contains("emulated")
    );
    let job = farm.job(&job_id_from(&stderr(&out))).unwrap();
    for a in &job.actions {
        let r = a.result.as_ref().unwrap();
        assert!(
            r.emulated && a.emulated,
            "{} must be marked emulated",
            a.platform
        );
    }
    // Without --allow-emulation: unschedulable, with a reason, exit 1.
    let no: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--allow-emulation")
        .collect();
    let out = farm.cli(&no);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("unschedulable"), "{text}");
    assert!(text.contains("does not allow emulation"), "{text}");
    farm.assert_no_unexpected_errors(&[]);
}

/// Waits for an action to run; returns the agent id running it and that agent's process
/// (found by the id each agent stores in its data dir's agent.json).
fn running_agent(farm: &Farm) -> (String, usize) {
    let mut holder = String::new();
    farm.wait_for("the action to start", Duration::from_secs(20), |f| {
        f.status().is_ok_and(|s| {
            s.running
                .first()
                .map(|r| holder = r.agent_id.clone())
                .is_some()
        })
    });
    let process = (0..farm.agents.len())
        .find(|i| {
            let json = farm
                .dir
                .path()
                .join(&farm.agents[*i].name)
                .join("agent.json");
            std::fs::read_to_string(json).is_ok_and(|s| s.contains(&holder))
        })
        .expect("the holder's agent process");
    (holder, process)
}

#[test]
fn a_killed_agents_work_moves_and_late_results_are_refused() {
    let mut farm = Farm::start(&["--lease-s", "4", "--heartbeat-s", "1"]);
    farm.add_agent("a", &["--slots", "1"]);
    farm.wait_ready_agents(1);
    farm.add_agent("b", &["--slots", "1"]);
    farm.wait_ready_agents(2);
    // SIGKILL whichever agent runs the action.
    let run = |farm: &Farm, marker: &str| {
        farm.cli_spawn(&[
            "run",
            "--platform",
            "linux/amd64",
            "--",
            "sh",
            "-c",
            &format!("sleep 3; echo {marker}"),
        ])
    };
    let client = run(&farm, "first");
    let (holder, victim) = running_agent(&farm);
    farm.agents[victim].kill();
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("first"));
    let job = farm.job(&job_id_from(&stderr(&out))).unwrap();
    let act = &job.actions[0];
    assert_eq!(act.state, v1::ActionState::Succeeded as i32);
    assert_eq!(act.attempts, 2, "one lost attempt, one good one");
    assert_eq!(
        act.infra_failures, 1,
        "the lost attempt is an infra failure"
    );
    assert_ne!(
        act.result.as_ref().unwrap().agent_id,
        holder,
        "recorded from the surviving agent"
    );
    let status = farm.status().unwrap();
    let killed = status.agents.iter().find(|a| a.agent_id == holder).unwrap();
    assert_eq!(
        (killed.state(), killed.consecutive_infra_failures),
        (v1::AgentState::Lost, 1),
        "the lost lease counts against the killed agent"
    );
    let summary = status.recent_jobs.iter().find(|j| j.job_id == job.job_id);
    assert_eq!(summary.map(|j| j.infra_failures), Some(1));

    // Late result: freeze the agent running an action until its lease lapses, then thaw it.
    farm.restart_agent(victim, &["--slots", "1"]);
    farm.wait_ready_agents(2);
    let client = run(&farm, "second");
    let (holder, frozen) = running_agent(&farm);
    farm.agents[frozen].signal(Signal::SIGSTOP);
    let out = client.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    farm.agents[frozen].signal(Signal::SIGCONT);
    farm.wait_for(
        "the stale result to be refused",
        Duration::from_secs(30),
        |f| f.status().is_ok_and(|s| s.stale_results_refused >= 1),
    );
    let job = farm.job(&job_id_from(&stderr(&out))).unwrap();
    assert_eq!(job.actions[0].attempts, 2);
    assert_ne!(job.actions[0].result.as_ref().unwrap().agent_id, holder);
}

#[test]
fn a_coordinator_killed_mid_flight_loses_nothing() {
    let mut farm = Farm::start(&["--lease-s", "6", "--heartbeat-s", "1"]);
    farm.add_agent("a", &["--slots", "1"]);
    farm.wait_ready_agents(1);
    let done = farm.cli(&[
        "run",
        "--platform",
        "linux/amd64",
        "--",
        "echo",
        "finished-before",
    ]);
    assert!(done.status.success(), "{}", stderr(&done));
    let done_id = job_id_from(&stderr(&done));
    let spawn = |farm: &Farm, cmd: &str| {
        farm.cli_spawn(&["run", "--platform", "linux/amd64", "--", "sh", "-c", cmd])
    };
    let running = spawn(&farm, "sleep 4; echo ran-through");
    farm.wait_for("one running", Duration::from_secs(20), |f| {
        f.status().is_ok_and(|s| s.running.len() == 1)
    });
    let queued = spawn(&farm, "echo was-queued");
    farm.wait_for("one queued", Duration::from_secs(20), |f| {
        f.status()
            .is_ok_and(|s| s.queues.iter().map(|q| q.queued).sum::<u32>() == 1)
    });
    let before = farm.status().unwrap();
    let ids: Vec<String> = before
        .recent_jobs
        .iter()
        .map(|j| j.job_id.clone())
        .collect();
    farm.coordinator.signal(Signal::SIGKILL);
    farm.coordinator.wait_exit(Duration::from_secs(5));
    farm.start_coordinator();
    // The clients reconnect by themselves; both jobs finish.
    let r = running.wait_with_output().unwrap();
    let q = queued.wait_with_output().unwrap();
    assert!(r.status.success(), "running job: {}", stderr(&r));
    assert!(q.status.success(), "queued job: {}", stderr(&q));
    let after = farm.status().unwrap();
    for id in &ids {
        let j = farm.job(id).unwrap();
        assert!(j.finished, "{id} finished");
        assert_eq!(
            j.actions[0].state,
            v1::ActionState::Succeeded as i32,
            "{id}"
        );
    }
    assert!(ids.contains(&done_id));
    assert!(
        after
            .agents
            .iter()
            .all(|a| a.state == v1::AgentState::Ready as i32),
        "agents reconnected: {:?}",
        after.agents
    );
    let running_job = farm.job(&ids[1]).unwrap();
    assert_eq!(
        running_job.actions[0].attempts, 1,
        "the running action was re-claimed, not re-run"
    );
}

#[test]
fn cancel_kills_the_whole_process_tree() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let marker = "987654.321";
    let client = farm.cli_spawn(&[
        "run",
        "--platform",
        "linux/amd64",
        "--",
        "sh",
        "-c",
        &format!("sleep {marker} & sleep {marker}; wait"),
    ]);
    farm.wait_for("the sleeps to start", Duration::from_secs(20), |_| {
        process_running(marker)
    });
    let s = farm.status().unwrap();
    let job = s.running[0]
        .action_id
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let out = farm.cli(&["cancel", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let c = client.wait_with_output().unwrap();
    assert_eq!(
        c.status.code(),
        Some(1),
        "cancelled job exits 1: {}",
        stderr(&c)
    );
    farm.wait_for("the process tree to die", Duration::from_secs(15), |_| {
        !process_running(marker)
    });
    assert_eq!(
        farm.job(&job).unwrap().actions[0].state,
        v1::ActionState::Cancelled as i32
    );
}

#[test]
fn a_resumed_watch_continues_after_the_last_event_received() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("a", &[]);
    farm.wait_ready_agents(1);
    let spec = v1::JobSpec {
        platforms: vec!["linux/amd64".into()],
        argv: vec![
            "sh".into(),
            "-c".into(),
            "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.2; done".into(),
        ],
        timeout_ms: 60_000,
        ..Default::default()
    };
    let job = farm.submit_as(Some(&farm.admin_dir()), spec).unwrap();
    let ch = farm.channel(Some(&farm.admin_dir())).unwrap();
    let watch = |after_seq: u64, epoch: u64, take: usize| {
        let (ch, job_id) = (ch.clone(), job.clone());
        farm.block_on(async move {
            let req = v1::WatchRequest {
                job_id,
                after_seq,
                epoch,
            };
            let mut s = v1::jobs_client::JobsClient::new(ch)
                .watch(req)
                .await
                .unwrap()
                .into_inner();
            let mut events = Vec::new();
            while events.len() < take {
                match s.message().await.unwrap() {
                    Some(e) => events.push(e),
                    None => break,
                }
            }
            events
        })
    };
    let first = watch(0, 0, 4);
    assert_eq!(first.len(), 4);
    assert!(
        first
            .iter()
            .zip(1..)
            .all(|(e, n)| e.seq == n && e.epoch > 0),
        "{first:?}"
    );
    let (epoch, last) = (first[3].epoch, first[3].seq);
    let rest = watch(last, epoch, usize::MAX);
    assert_eq!(
        rest.first().map(|e| e.seq),
        Some(last + 1),
        "nothing received is sent again"
    );
    assert!(matches!(
        rest.last().and_then(|e| e.kind.as_ref()),
        Some(v1::job_event::Kind::Finished(_))
    ));
    let text: String = first
        .iter()
        .chain(&rest)
        .filter_map(|e| match &e.kind {
            Some(v1::job_event::Kind::Log(l)) => {
                Some(String::from_utf8_lossy(&l.data).into_owned())
            }
            _ => None,
        })
        .collect();
    let want: String = (1..=6).map(|i| format!("line{i}\n")).collect();
    assert_eq!(text, want, "every line exactly once across the two watches");
    // Another epoch (as after a restart) gets everything again.
    let all = watch(last, epoch + 1, usize::MAX);
    assert_eq!(all.first().map(|e| e.seq), Some(1));
}

#[test]
fn every_watcher_after_a_restart_hears_of_every_action() {
    let mut farm = Farm::start(&["--lease-s", "6", "--heartbeat-s", "1"]);
    farm.add_agent("a", &["--slots", "2"]);
    farm.wait_ready_agents(1);
    let step = |name: &str, cmd: &str| v1::Step {
        name: name.into(),
        argv: vec!["sh".into(), "-c".into(), cmd.into()],
        ..Default::default()
    };
    // Two actions: one ends a little after the restart, the other runs on.
    let spec = v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: "linux/amd64".into(),
            steps: vec![step("quick", "sleep 6"), step("slow", "sleep 60")],
        }],
        shards: 2,
        timeout_ms: 120_000,
        no_cache: true,
        ..Default::default()
    };
    let admin = farm.admin_dir();
    let job = farm.submit_as(Some(&admin), spec).unwrap();
    farm.wait_for("both running", Duration::from_secs(20), |f| {
        f.status().is_ok_and(|s| s.running.len() == 2)
    });
    farm.coordinator.signal(Signal::SIGKILL);
    farm.coordinator.wait_exit(Duration::from_secs(5));
    farm.start_coordinator();
    let ids: Vec<String> = farm
        .job(&job)
        .unwrap()
        .actions
        .iter()
        .map(|a| a.action_id.clone())
        .collect();
    assert_eq!(ids.len(), 2);
    let ch = farm.channel(Some(&admin)).unwrap();
    // Events of one watch until `until` says stop or nothing comes for a while.
    let watch = |until: &dyn Fn(&[v1::JobEvent]) -> bool| {
        let (ch, job_id) = (ch.clone(), job.clone());
        farm.block_on(async move {
            let mut s = v1::jobs_client::JobsClient::new(ch)
                .watch(v1::WatchRequest {
                    job_id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut events = Vec::new();
            while !until(&events) {
                match tokio::time::timeout(Duration::from_secs(20), s.message()).await {
                    Ok(Ok(Some(e))) => events.push(e),
                    _ => break,
                }
            }
            events
        })
    };
    let statuses = |events: &[v1::JobEvent]| -> Vec<v1::ActionStatus> {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(v1::job_event::Kind::Action(a)) => Some(a.clone()),
                _ => None,
            })
            .collect()
    };
    // The first watch after the restart opens the job's hub; it follows until quick ends.
    let quick_ended = |events: &[v1::JobEvent]| {
        statuses(events)
            .iter()
            .any(|a| a.step_names == ["quick"] && a.state == v1::ActionState::Succeeded as i32)
    };
    let first = watch(&quick_ended);
    assert!(quick_ended(&first), "the quick action ended: {first:?}");
    // A later watch of the same coordinator still hears of the action that did not change.
    let second = watch(&|events: &[v1::JobEvent]| {
        let seen = statuses(events);
        ids.iter().all(|id| seen.iter().any(|a| &a.action_id == id))
    });
    let seen = statuses(&second);
    for id in &ids {
        assert!(
            seen.iter().any(|a| &a.action_id == id),
            "the second watch never heard of {id}: {second:?}"
        );
    }
    let out = farm.cli(&["cancel", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
}
