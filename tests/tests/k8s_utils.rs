//! Real Kubernetes code through the farm: k8s.io/utils' unit tests (Debian's
//! golang-k8s-utils-dev) cross-compiled once and run on linux/amd64 natively and on arm64,
//! ppc64le, s390x and riscv64 emulated agents. Each package's verdict must equal running the
//! same test binary directly, and a second run must be entirely cached.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const FOREIGN: [&str; 4] = ["arm64", "ppc64le", "s390x", "riscv64"];

/// Copies the GOPATH tree that holds k8s.io/utils (read-only under /usr/share).
fn gopath(dir: &Path) -> PathBuf {
    let dst = dir.join("gopath");
    let st = Command::new("cp")
        .args(["-r", "/usr/share/gocode"])
        .arg(&dst)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "copy /usr/share/gocode (install golang-k8s-utils-dev)"
    );
    dst
}

/// Runs the package's test binary for `arch` directly (natively or under qemu-user) in the
/// package directory, as `go test` would; returns "pass" or "fail".
fn direct_verdict(farm: &Farm, gopath: &Path, bins: &Path, pkg: &str, arch: &str) -> String {
    let bin = bins
        .join(arch)
        .join(format!("{}.test", pkg.replace('/', "_")));
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    let mut build = Command::new("go");
    build
        .args(["test", "-c", "-o"])
        .arg(&bin)
        .arg(pkg)
        .env("GOOS", "linux")
        .env("GOARCH", arch);
    farm.go_env(&mut build, gopath);
    let out = build.output().unwrap();
    assert!(
        out.status.success(),
        "go test -c {pkg} for {arch}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !bin.exists() {
        return "skip".into(); // no test files
    }
    let mut run = if arch == "amd64" {
        Command::new(&bin)
    } else {
        let mut c = Command::new(qemu_for(arch));
        c.arg(&bin);
        c
    };
    run.args(["-test.timeout=150s", "-test.count=1"])
        .current_dir(gopath.join("src").join(pkg));
    let st = run
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    if st.success() { "pass" } else { "fail" }.into()
}

#[test]
fn k8s_utils_unit_tests_on_five_platforms_match_direct_runs_and_cache() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("amd64", &["--slots", "2"]);
    for arch in FOREIGN {
        let emulate = format!("linux/{arch}={}", qemu_for(arch));
        farm.add_agent(
            arch,
            &["--no-native", "--emulate", &emulate, "--slots", "2"],
        );
    }
    farm.wait_ready_agents(5);
    let gp = gopath(farm.dir.path());
    let src = gp.join("src/k8s.io/utils");
    let (json, junit) = (farm.dir.path().join("json"), farm.dir.path().join("junit"));
    let go_test = |extra: &[&str]| {
        let mut args = vec![
            "go-test",
            "--allow-emulation",
            // The warm run must answer the emulated cells from the cache too.
            "--cache-emulated",
            "--platform",
            "linux/amd64",
        ];
        for arch in FOREIGN {
            args.push("--platform");
            args.push(Box::leak(format!("linux/{arch}").into_boxed_str()));
        }
        args.extend_from_slice(extra);
        args.push("./...");
        farm.go_cli(&src, &gp, &args, &[]).0
    };
    let j = json.to_str().unwrap().to_string();
    let u = junit.to_str().unwrap().to_string();
    // A short test timeout bounds a qemu deadlock (Go's own timeout fails the test; the
    // watchdog follows 30 s later); one rerun absorbs it, as CI would.
    let first = go_test(&[
        "--json",
        &j,
        "--junit",
        &u,
        "--shards",
        "2",
        "--timeout",
        "60s",
        "--rerun-fails",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
    let bins = farm.dir.path().join("direct");
    let mut mismatches = Vec::new();
    let mut any_fail = false;
    for arch in std::iter::once("amd64").chain(FOREIGN) {
        let stream = std::fs::read_to_string(json.join(format!("linux_{arch}.json"))).unwrap();
        let farm_verdicts = go_test_verdicts(&stream);
        assert!(
            farm_verdicts.len() >= 20,
            "{arch}: only {} packages in the stream",
            farm_verdicts.len()
        );
        assert!(junit.join(format!("junit_linux_{arch}.xml")).exists());
        for (pkg, got) in &farm_verdicts {
            any_fail |= got == "fail";
            // qemu-user sometimes deadlocks a forked child (DESIGN.md: up to a fifth of the
            // runs of k8s.io/utils/exec on s390x), so a direct run under emulation can fail
            // where the farm's passed, or the other way round: a verdict counts as different
            // only if three direct runs all disagree with the farm.
            let tries = if arch == "amd64" { 1 } else { 3 };
            let direct: Vec<String> = (0..tries)
                .map(|_| direct_verdict(&farm, &gp, &bins, pkg, arch))
                .take_while(|want| want != got)
                .collect();
            if direct.len() == tries {
                mismatches.push(format!(
                    "{pkg} on {arch}: farm {got}, direct {}",
                    direct.join("/")
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "verdicts differ:\n{}\n{stdout}",
        mismatches.join("\n")
    );
    assert_eq!(
        first.status.success(),
        !any_fail,
        "exit code follows the verdicts:\n{stdout}"
    );
    let rows = package_rows(&stdout);
    assert!(rows.len() >= 20, "one matrix row per package:\n{stdout}");
    for row in &rows {
        assert_eq!(
            row.matches('*').count(),
            FOREIGN.len(),
            "each emulated cell is marked: {row}"
        );
    }

    // Nothing changed: every package on every platform comes from the cache, except a package
    // whose first run needed a rerun (reruns are never cached).
    let rerun: Vec<String> = std::iter::once("amd64")
        .chain(FOREIGN)
        .flat_map(|arch| {
            reruns(&std::fs::read_to_string(json.join(format!("linux_{arch}.json"))).unwrap())
        })
        .collect();
    let executed = || -> u64 {
        farm.agents
            .iter()
            .map(|a| a.log_text().matches("action finished").count() as u64)
            .sum()
    };
    let before_second = executed();
    let second = go_test(&["--timeout", "60s"]);
    let text = String::from_utf8_lossy(&second.stdout).into_owned();
    for row in package_rows(&text) {
        if !rerun.iter().any(|p| row.contains(&format!(" {p} "))) {
            assert_eq!(
                row.matches("cached").count(),
                1 + FOREIGN.len(),
                "all cached: {row}\n{text}"
            );
        }
    }
    if rerun.is_empty() {
        assert_eq!(
            executed(),
            before_second,
            "a warm run executes nothing on any agent"
        );
    }
    let before_third = executed();
    let third = go_test(&["--timeout", "60s"]);
    assert_eq!(
        executed(),
        before_third,
        "a warm run executes nothing on any agent"
    );
    assert_eq!(second.status.code(), third.status.code());
}

/// The package rows of go-test's matrix.
fn package_rows(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.contains("k8s.io/utils/") && l.contains('│'))
        .collect()
}

/// Packages of a `go test -json` stream that ended more than once (a rerun round appended).
fn reruns(stream: &str) -> Vec<String> {
    let mut ends: BTreeMap<String, u32> = BTreeMap::new();
    for line in stream.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v.get("Test").is_some_and(|t| !t.is_null()) {
            continue;
        }
        if let (Some(pkg), Some("pass" | "fail" | "skip")) =
            (v["Package"].as_str(), v["Action"].as_str())
        {
            *ends.entry(pkg.to_string()).or_default() += 1;
        }
    }
    ends.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(p, _)| p)
        .collect()
}
