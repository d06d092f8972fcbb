//! `farm go-test` on small fixture packages: a failing test fails on every platform with its
//! output and a non-zero exit, a test that fails only once is flaky with `--rerun-fails 1`, and
//! a test binary that hangs under emulation is ended by the watchdog as a hang, never a pass.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_tests::*;
use std::path::{Path, PathBuf};
use std::process::Output;

fn go_test(farm: &Farm, gopath: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let mut all = vec!["go-test"];
    all.extend_from_slice(args);
    farm.go_cli(&gopath.join("src/example.com/fixtures"), gopath, &all, env)
}

fn row<'a>(text: &'a str, pkg: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(pkg) && l.contains('│'))
        .unwrap_or_else(|| panic!("no row for {pkg}:\n{text}"))
}

fn start() -> (Farm, PathBuf) {
    let farm = Farm::start_amd64_and_emulated_arm64();
    let gp = farm.copy_go_fixtures();
    (farm, gp)
}

#[test]
fn a_failing_test_fails_everywhere_and_a_flake_is_marked_flaky() {
    let (farm, gp) = start();
    let junit = farm.dir.path().join("junit");
    let marker = format!("e2e-{}", std::process::id());
    let (out, text) = go_test(
        &farm,
        &gp,
        &[
            "--allow-emulation",
            "--platform",
            "linux/amd64",
            "--platform",
            "linux/arm64",
            "--rerun-fails",
            "1",
            "--env",
            &format!("FLAKY_MARKER={marker}"),
            "--junit",
            junit.to_str().unwrap(),
            "./fail",
            "./flaky",
            "./pass",
        ],
        &[],
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "a failing test makes the run fail:\n{text}"
    );
    let fail = row(&text, "fixtures/fail");
    assert_eq!(
        fail.matches("fail").count() - 1,
        2,
        "failed on both platforms: {fail}"
    );
    let flaky = row(&text, "fixtures/flaky");
    assert_eq!(
        flaky.matches("flaky").count() - 1,
        2,
        "flaky on both platforms: {flaky}"
    );
    assert!(row(&text, "fixtures/pass").matches("pass").count() >= 3);
    let xml = std::fs::read_to_string(junit.join("junit_linux_arm64.xml")).unwrap();
    assert!(
        xml.contains("<failure") && xml.contains("example.com/fixtures/fail"),
        "{xml}"
    );
    for p in ["/tmp"] {
        for e in std::fs::read_dir(p).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("archfarm-flaky-") {
                let body = std::fs::read_to_string(e.path()).unwrap_or_default();
                if body == marker {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

#[test]
fn a_hang_under_emulation_is_a_hang_on_an_emulated_agent() {
    let (farm, gp) = start();
    let (out, text) = go_test(
        &farm,
        &gp,
        &[
            "--allow-emulation",
            "--platform",
            "linux/arm64",
            "--timeout",
            "2s",
            "--env",
            "ARCHFARM_FIXTURE_HANG=1",
            "./hang",
        ],
        &[],
    );
    assert_ne!(out.status.code(), Some(0), "{text}");
    let hang = row(&text, "fixtures/hang");
    assert!(
        hang.contains("hang*"),
        "a hang on an emulated agent, marked emulated: {hang}\n{text}"
    );
    assert!(!hang.contains("pass"), "never a pass: {hang}");
}
