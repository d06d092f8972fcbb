//! A donated machine is safe to lend: actions that write outside their work dir, open a TCP
//! connection, fork thousands of processes, allocate past their memory limit, fill their disk
//! budget, flood their output or hang fail with a clear limit or infra reason, and the agent
//! stays healthy and takes the next action; a stuck run quarantines its agent. A root agent
//! whose data dir lies under a directory only root may enter still sandboxes its actions, and
//! one without a sandbox is marked UNSANDBOXED. Needs bubblewrap (CI installs it).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1;
use archfarm_tests::*;
use serde_json::Value;
use std::time::Duration;

const POLICY: &str = r#"
slots = 1
watchdog_s = 4
min_free_disk_bytes = 0

[limits]
memory_bytes = 268435456
processes = 200
output_bytes = 1048576
disk_bytes = 67108864
"#;

/// One action's line of the report, with the run's exit code.
fn run_one(farm: &Farm, script: &str) -> (Option<i32>, Value) {
    let (code, report, stderr) = farm.run_with_report(&[
        "--platform",
        &native(),
        "--no-cache",
        "--timeout",
        "120s",
        "--",
        "bash",
        "-c",
        script,
    ]);
    let action = report["actions"][0].clone();
    assert!(!action.is_null(), "no action in the report: {stderr}");
    (code, action)
}

fn native() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    format!("linux/{arch}")
}

fn text(v: &Value) -> String {
    format!("{} {}", v["message"], v["reason"])
}

/// The agent is still there and runs the next action.
fn still_healthy(farm: &Farm) {
    let (code, action) = run_one(farm, "echo fine");
    assert_eq!(code, Some(0), "the next action failed: {action}");
    assert_eq!(action["state"], "succeeded", "{action}");
    let status = farm.status().unwrap();
    assert_eq!(status.agents.len(), 1);
    assert_eq!(
        status.agents[0].state,
        v1::AgentState::Ready as i32,
        "{:?}",
        status.agents[0]
    );
}

#[test]
fn actions_that_break_out_or_break_limits_fail_clearly_and_the_agent_goes_on() {
    let mut farm = Farm::start(&["--max-attempts", "1", "--unschedulable-grace-s", "2"]);
    let policy = farm.dir.path().join("policy.toml");
    std::fs::write(&policy, POLICY).unwrap();
    farm.add_agent("sandboxed", &["--policy", policy.to_str().unwrap()]);
    farm.wait_ready_agents(1);

    let status = farm.status().unwrap();
    let agent = &status.agents[0];
    assert!(
        agent.sandbox.starts_with("bwrap ("),
        "the agent is not sandboxed: {:?} (is bubblewrap installed?)",
        agent.sandbox
    );
    assert!(agent.sandbox.contains("no network"), "{}", agent.sandbox);
    assert!(
        agent.limits.contains("memory 256 MiB") && agent.limits.contains("watchdog 4 s"),
        "{}",
        agent.limits
    );
    let status_text = String::from_utf8_lossy(&farm.cli(&["status"]).stdout).into_owned();
    assert!(status_text.contains("bwrap ("), "{status_text}");

    // Writing outside the work dir: the system is read-only, the agent's files are hidden.
    let escape = farm.dir.path().join("escaped");
    let (code, action) = run_one(
        &farm,
        &format!(
            "echo x > /etc/archfarm-escape; echo y > {}; ls {}/agent-sandboxed/credentials",
            escape.display(),
            farm.dir.path().display()
        ),
    );
    assert_ne!(code, Some(0), "{action}");
    assert_eq!(action["state"], "failed", "{action}");
    assert!(!std::path::Path::new("/etc/archfarm-escape").exists());
    assert!(!escape.exists(), "the action wrote outside its work dir");
    still_healthy(&farm);

    // A TCP connection to the coordinator, which listens on this host's loopback.
    let (code, action) = run_one(
        &farm,
        &format!("echo hi > /dev/tcp/127.0.0.1/{}", farm.port),
    );
    assert_ne!(
        code,
        Some(0),
        "the sandbox let a TCP connection through: {action}"
    );
    assert_eq!(action["state"], "failed", "{action}");

    // 10,000 processes.
    let (code, action) = run_one(&farm, "for i in $(seq 10000); do sleep 60 & done; wait");
    assert_ne!(code, Some(0), "{action}");
    assert_eq!(action["outcome"], "limit_exceeded", "{action}");
    assert!(text(&action).contains("process limit of 200"), "{action}");
    still_healthy(&farm);

    // Memory past the limit.
    let (code, action) = run_one(
        &farm,
        "perl -e '$x = \"a\" x (600 * 1024 * 1024); print length $x'",
    );
    assert_ne!(code, Some(0), "{action}");
    assert_eq!(action["outcome"], "limit_exceeded", "{action}");
    assert!(
        text(&action).contains("memory limit of 256 MiB"),
        "{action}"
    );
    still_healthy(&farm);

    // One file past the disk budget, then many small ones.
    for script in [
        "dd if=/dev/zero of=big bs=1M count=200",
        "for i in $(seq 200); do head -c 1048576 /dev/zero > f$i; done; sleep 5",
    ] {
        let (code, action) = run_one(&farm, script);
        assert_ne!(code, Some(0), "{script}: {action}");
        assert_eq!(action["outcome"], "limit_exceeded", "{script}: {action}");
        assert!(text(&action).contains("disk limit of 64 MiB"), "{action}");
    }
    still_healthy(&farm);

    // Output past the limit.
    let (code, action) = run_one(&farm, "yes | head -c 5000000");
    assert_ne!(code, Some(0), "{action}");
    assert_eq!(action["outcome"], "limit_exceeded", "{action}");
    assert!(text(&action).contains("output limit of 1 MiB"), "{action}");

    // No output and no CPU: stopped by the watchdog as an infra failure, not a test failure.
    let (code, action) = run_one(&farm, "sleep 100");
    assert_ne!(code, Some(0), "{action}");
    assert_eq!(action["state"], "infra_failed", "{action}");
    assert!(text(&action).contains("watchdog"), "{action}");
    still_healthy(&farm);

    // A CPU-bound action does not make the agent look dead: its heartbeat goes on.
    let busy = farm.cli_spawn(&[
        "run",
        "--platform",
        &native(),
        "--no-cache",
        "--",
        "bash",
        "-c",
        "timeout 8 sh -c 'while :; do :; done'; true",
    ]);
    std::thread::sleep(Duration::from_secs(6));
    let status = farm.status().unwrap();
    assert_eq!(status.agents[0].state, v1::AgentState::Busy as i32);
    let out = busy.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A job that asks for the network waits for an agent whose policy allows it, and has it.
    let connect = format!("echo hi > /dev/tcp/127.0.0.1/{}", farm.port);
    let network_run = |farm: &Farm| {
        farm.run_with_report(&[
            "--platform",
            &native(),
            "--network",
            "--timeout",
            "60s",
            "--",
            "bash",
            "-c",
            &connect,
        ])
    };
    let (code, report, _) = network_run(&farm);
    assert_ne!(code, Some(0));
    let action = &report["actions"][0];
    assert_eq!(action["state"], "unschedulable", "{action}");
    assert!(
        text(action).contains("does not allow the network"),
        "{action}"
    );
    let open = farm.dir.path().join("open.toml");
    std::fs::write(&open, "allow_network = true\nmin_free_disk_bytes = 0\n").unwrap();
    farm.add_agent("open", &["--policy", open.to_str().unwrap()]);
    farm.wait_ready_agents(2);
    let (code, report, stderr) = network_run(&farm);
    assert_eq!(code, Some(0), "{report} {stderr}");
}

/// A run the watchdog stops is the farm's problem, not the test's: with `--quarantine-after 1`
/// the agent that reported it is quarantined (status says why) and gets no new work.
#[test]
fn a_stuck_run_quarantines_its_agent() {
    let mut farm = Farm::start(&[
        "--max-attempts",
        "1",
        "--quarantine-after",
        "1",
        "--quarantine-base-s",
        "600",
    ]);
    let policy = farm.dir.path().join("policy.toml");
    std::fs::write(&policy, "watchdog_s = 2\nmin_free_disk_bytes = 0\n").unwrap();
    farm.add_agent("stuck", &["--policy", policy.to_str().unwrap()]);
    farm.wait_ready_agents(1);

    let (_, action) = run_one(&farm, "sleep 100");
    assert_eq!(action["state"], "infra_failed", "{action}");
    assert!(text(&action).contains("watchdog"), "{action}");
    let status = farm.status().unwrap();
    let agent = &status.agents[0];
    assert_eq!(agent.state, v1::AgentState::Quarantined as i32, "{agent:?}");
    assert!(agent.quarantine_reason.contains("watchdog"), "{agent:?}");
    let text = String::from_utf8_lossy(&farm.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("quarantined"), "{text}");

    // New work waits instead of going to the quarantined agent.
    let mut waiting = farm.cli_spawn(&["run", "--platform", &native(), "--no-cache", "--", "true"]);
    farm.wait_for("a queued action", Duration::from_secs(30), |f| {
        f.status()
            .is_ok_and(|s| s.queues.iter().any(|q| q.queued == 1 && q.running == 0))
    });
    std::thread::sleep(Duration::from_secs(3));
    let status = farm.status().unwrap();
    assert!(
        status
            .queues
            .iter()
            .any(|q| q.queued == 1 && q.running == 0),
        "{:?}",
        status.queues
    );
    waiting.kill().unwrap();
    waiting.wait().unwrap();
}

/// The lab operator's case: an agent run as root with its data dir under a 0700 directory
/// (`mktemp -d`, /root/x) and `sandbox = "auto"`. It must still sandbox: the probe passes,
/// actions run as the sandbox user, and a file an action writes to /tmp never reaches the
/// host's /tmp.
#[test]
fn a_root_agent_under_a_closed_directory_still_sandboxes() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED a_root_agent_under_a_closed_directory_still_sandboxes: the agent must run \
             as root for this test (CI runs as root)"
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut farm = Farm::start(&["--max-attempts", "1"]);
    std::fs::set_permissions(farm.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let policy = farm.dir.path().join("policy.toml");
    std::fs::write(&policy, "sandbox = \"auto\"\nmin_free_disk_bytes = 0\n").unwrap();
    farm.add_agent("closed", &["--policy", policy.to_str().unwrap()]);
    farm.wait_ready_agents(1);

    let status = farm.status().unwrap();
    let agent = &status.agents[0];
    assert!(
        archfarm_proto::is_sandboxed(&agent.sandbox) && agent.sandbox.contains("uid 65534"),
        "the root agent is not sandboxed: {:?}",
        agent.sandbox
    );
    let text = String::from_utf8_lossy(&farm.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("bwrap (uid 65534"), "{text}");
    assert!(!text.contains("UNSANDBOXED"), "{text}");

    let name = format!(
        "archfarm-e2e-escape-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let host_file = std::path::Path::new("/tmp").join(&name);
    let script =
        format!("echo escaped > /tmp/{name} && cat /tmp/{name} && echo \"uid=$(id -u)\" && pwd");
    let out = farm.cli(&[
        "run",
        "--platform",
        &native(),
        "--no-cache",
        "--timeout",
        "60s",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // The write itself succeeded (in the sandbox's private /tmp), as the sandbox user, in the
    // work dir under the closed directory.
    assert!(stdout.contains("escaped"), "{stdout}\n{stderr}");
    assert!(stdout.contains("uid=65534"), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&*farm.dir.path().join("agent-closed/work").to_string_lossy()),
        "{stdout}\n{stderr}"
    );
    assert!(
        !host_file.exists(),
        "the action wrote {} on the host",
        host_file.display()
    );
    // Nothing was opened up for it.
    for dir in [
        farm.dir.path().to_path_buf(),
        farm.dir.path().join("agent-closed"),
    ] {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
    }
    farm.assert_no_unexpected_errors(&[]);
}

/// A root agent runs actions without a sandbox only when its policy says `sandbox = "none"`;
/// then status marks it UNSANDBOXED. (That `auto` never falls back to none for a root agent is
/// `sandbox::tests::auto_falls_back_only_for_...` in the agent: this host has bubblewrap.)
#[test]
fn a_root_agent_without_a_sandbox_is_marked_unsandboxed() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED a_root_agent_without_a_sandbox_is_marked_unsandboxed: the agent must run \
             as root for this test (CI runs as root)"
        );
        return;
    }
    let mut farm = Farm::start(&[]);
    let policy = farm.dir.path().join("policy.toml");
    std::fs::write(&policy, "sandbox = \"none\"\nmin_free_disk_bytes = 0\n").unwrap();
    farm.add_agent("open", &["--policy", policy.to_str().unwrap()]);
    farm.wait_ready_agents(1);
    let status = farm.status().unwrap();
    let agent = &status.agents[0];
    assert!(!archfarm_proto::is_sandboxed(&agent.sandbox), "{agent:?}");
    assert!(agent.sandbox.contains("actions run as root"), "{agent:?}");
    let text = String::from_utf8_lossy(&farm.cli(&["status"]).stdout).into_owned();
    assert!(
        text.contains("UNSANDBOXED (none: turned off by policy"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "WARNING: 1 agent runs actions UNSANDBOXED, with the access of the agent's user: {}",
            agent.agent_id
        )),
        "{text}"
    );
    let log = farm.agents[0].log_text();
    assert!(
        log.contains("running actions without a sandbox"),
        "the agent must warn in its log:\n{log}"
    );
}
