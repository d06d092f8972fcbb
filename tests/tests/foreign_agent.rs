//! The cross-built agent as an agent of a foreign platform: the linux/s390x and linux/arm64
//! agents `cargo xtask dist --test-agents` builds (CI builds them before the tests) run under
//! qemu-user, without `--emulate` and without QEMU_LD_PREFIX, against a real coordinator; the
//! same checks as `cargo xtask dist --verify`: they join over mutual TLS with a token the
//! harness labelled `harness=qemu-user`, report their own platform, materialise the input from
//! the CAS, run a Go binary cross-built for their architecture (binfmt_misc, registered as
//! root for the test and removed after), the outputs come back byte-identical, and the same
//! job again is a cache hit.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::v1;
use archfarm_tests::*;
use std::path::Path;
use xtask::binfmt::{BinfmtGuard, ForeignArch};
use xtask::dist::targets::{cross_built_agent, DistTarget};
use xtask::dist::verify::{
    job_options, outputs_match, test_data, write_input, HARNESS_LABEL, JOB_COMMAND,
};
use xtask::dist::{TEST_AGENT_PLATFORMS, TEST_AGENT_PROFILE};

#[test]
fn cross_built_agents_serve_their_own_platform_under_qemu_user() {
    let agents: Vec<(&str, std::path::PathBuf)> = TEST_AGENT_PLATFORMS
        .iter()
        .map(|p| (*p, cross_built_agent(p, TEST_AGENT_PROFILE).unwrap()))
        .collect();
    for (platform, agent) in &agents {
        assert!(
            agent.is_file(),
            "the {platform} agent {} is missing: run `cargo xtask dist --test-agents` first \
             (`cargo xtask ci` does)",
            agent.display()
        );
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test registers qemu-user with binfmt_misc (for the Go binaries the agents exec) \
         and needs root"
    );
    let mut farm = Farm::start(&[]);
    let work = farm.dir.path().join("verify");
    let input = work.join("input");
    let data = test_data();
    let targets = TEST_AGENT_PLATFORMS
        .iter()
        .map(|p| DistTarget::for_platform(p).unwrap());
    write_input(&input, &data, targets, &work).expect("cross-compile the Go program");
    let arches: Vec<ForeignArch> = TEST_AGENT_PLATFORMS
        .iter()
        .map(|p| ForeignArch::for_platform(p).unwrap())
        .collect();
    let binfmt = BinfmtGuard::register(&arches).expect("register binfmt_misc");

    let label = format!("{HARNESS_LABEL}=qemu-user");
    for ((platform, agent), arch) in agents.iter().zip(&arches) {
        let (token, hash) = farm.token(&["--labels", &label]);
        let qemu = arch.qemu_program();
        let name = platform.replace('/', "-");
        farm.spawn_agent_program(&name, &[qemu.as_path(), agent.as_path()], &token, &hash);
    }
    farm.wait_ready_agents(agents.len());

    // Status tells the truth: each agent names the platform qemu-user shows it (its own), and
    // the harness's label says it runs under an emulator.
    let status = farm.status().unwrap();
    for (platform, _) in &agents {
        let a = status
            .agents
            .iter()
            .find(|a| a.platforms.iter().any(|p| p.platform == *platform))
            .unwrap_or_else(|| panic!("no agent offers {platform}: {:?}", status.agents));
        let offered: Vec<(&str, bool)> = a
            .platforms
            .iter()
            .map(|p| (p.platform.as_str(), p.emulated))
            .collect();
        assert_eq!(offered, [(*platform, false)], "{platform}");
        assert!(
            a.labels
                .iter()
                .any(|l| l.key == HARNESS_LABEL && l.value == "qemu-user"),
            "{platform}: {:?}",
            a.labels
        );
        assert_eq!(a.state, v1::AgentState::Ready as i32);
    }
    let cli_status = farm.cli(&["status"]);
    let text = String::from_utf8_lossy(&cli_status.stdout);
    assert!(text.contains("harness=qemu-user"), "{text}");

    let run = |round: u32| {
        let download = work.join(format!("download-{round}"));
        let platforms: Vec<&str> = agents.iter().map(|(p, _)| *p).collect();
        let options = job_options(&platforms, &input, &download);
        let mut args: Vec<&str> = options.iter().map(String::as_str).collect();
        args.extend(["--", JOB_COMMAND]);
        let (code, report, stderr) = farm.run_with_report(&args);
        assert_eq!(code, Some(0), "round {round}: {stderr}\n{report:#}");
        for (platform, _) in &agents {
            assert!(
                outputs_match(&download, platform, &data).unwrap(),
                "round {round}: {platform}'s outputs under {} are not the expected bytes",
                download.display()
            );
        }
        report
    };
    let first = run(1);
    assert_eq!(
        (first["ran"].as_u64(), first["cached"].as_u64()),
        (Some(2), Some(0)),
        "{first:#}"
    );
    let second = run(2);
    assert_eq!(
        (second["ran"].as_u64(), second["cached"].as_u64()),
        (Some(0), Some(2)),
        "the second run is a cache hit: {second:#}"
    );
    farm.assert_no_unexpected_errors(&[]);
    assert_binfmt_entries_gone_after(binfmt, &arches);
}

/// Drops the guard and checks that binfmt_misc holds none of its entries any more.
fn assert_binfmt_entries_gone_after(guard: BinfmtGuard, arches: &[ForeignArch]) {
    drop(guard);
    for a in arches {
        let entry = Path::new(xtask::binfmt::BINFMT_DIR).join(a.binfmt_name());
        assert!(!entry.exists(), "{} is still registered", entry.display());
    }
}
