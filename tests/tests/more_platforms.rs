//! linux/mips64le and linux/arm/v7 as first-class platforms: agents that serve them through
//! qemu-user (qemu-mips64el-static, qemu-arm-static), `archfarm go-test` whose verdict per
//! package equals a direct run of the same cross-compiled test binary under qemu-user, and
//! `archfarm run` of a program built for each.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_tests::*;
use std::path::Path;
use std::process::Command;

/// (platform, GOARCH, GOARM, arch as `qemu_for` takes it)
const PLATFORMS: [(&str, &str, &str, &str); 2] = [
    ("linux/mips64le", "mips64le", "", "mips64le"),
    ("linux/arm/v7", "arm", "7", "arm"),
];
const PACKAGES: [&str; 2] = ["pass", "fail"];

/// The verdict of `go test -c` for GOARCH run directly under qemu-user: "pass" or "fail".
/// `gocache` is the one the farm's client used, so the compile is cached.
fn direct_verdict(
    gopath: &Path,
    gocache: &Path,
    pkg: &str,
    (goarch, goarm, arch): (&str, &str, &str),
) -> String {
    let out = gopath.join(format!("{pkg}-{goarch}.test"));
    let st = Command::new("go")
        .args(["test", "-c", "-o"])
        .arg(&out)
        .arg(format!("example.com/fixtures/{pkg}"))
        .env("GO111MODULE", "off")
        .env("GOPATH", gopath)
        .env("GOCACHE", gocache)
        .env("CGO_ENABLED", "0")
        .env("GOOS", "linux")
        .env("GOARCH", goarch)
        .env("GOARM", goarm)
        .status()
        .unwrap();
    assert!(st.success(), "go test -c {pkg} for {goarch}");
    let run = Command::new(qemu_for(arch))
        .arg(&out)
        .current_dir(gopath.join("src/example.com/fixtures").join(pkg))
        .output()
        .unwrap();
    if run.status.success() { "pass" } else { "fail" }.to_string()
}

/// The cells of a package's row of the go-test matrix, `*` (emulated) stripped.
fn farm_verdicts(text: &str, pkg: &str) -> Vec<String> {
    let row = text
        .lines()
        .find(|l| l.contains(&format!("fixtures/{pkg}")) && l.contains('│'))
        .unwrap_or_else(|| panic!("no row for {pkg}:\n{text}"));
    row.split(['│', '┆'])
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .skip(1)
        .map(|c| c.trim_end_matches('*').to_string())
        .collect()
}

#[test]
fn mips64le_and_arm_v7_verdicts_equal_direct_runs_and_programs_run() {
    let mut farm = Farm::start(&[]);
    for (platform, _, _, arch) in PLATFORMS {
        farm.add_agent(
            arch,
            &[
                "--no-native",
                "--emulate",
                &format!("{platform}={}", qemu_for(arch)),
            ],
        );
    }
    farm.wait_ready_agents(2);
    let status = String::from_utf8_lossy(&farm.cli(&["status"]).stdout).into_owned();
    for (platform, ..) in PLATFORMS {
        assert!(status.contains(platform), "{status}");
    }
    assert!(status.contains("emulated"), "{status}");

    let gp = farm.copy_go_fixtures();
    let mut args = vec!["go-test", "--allow-emulation"];
    for (platform, ..) in PLATFORMS {
        args.extend(["--platform", platform]);
    }
    args.extend(PACKAGES.map(|p| match p {
        "pass" => "./pass",
        _ => "./fail",
    }));
    let (out, text) = farm.go_cli(&gp.join("src/example.com/fixtures"), &gp, &args, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the failing package fails:\n{text}"
    );
    let gocache = farm.dir.path().join("gocache");
    for pkg in PACKAGES {
        let farm_says = farm_verdicts(&text, pkg);
        let direct: Vec<String> = PLATFORMS
            .iter()
            .map(|&(_, goarch, goarm, arch)| {
                direct_verdict(&gp, &gocache, pkg, (goarch, goarm, arch))
            })
            .collect();
        assert_eq!(farm_says, direct, "{pkg}: farm vs direct qemu-user\n{text}");
        let expected = if pkg == "pass" { "pass" } else { "fail" };
        assert!(direct.iter().all(|v| v == expected), "{pkg}: {direct:?}");
    }

    // A program built for each runs there and says what it is.
    let input = farm.dir.path().join("hello");
    build_hello(&input, &["mips64le", "arm"]).unwrap();
    let input_s = input.join("input");
    let mut args = vec![
        "run",
        "--allow-emulation",
        "--input",
        input_s.to_str().unwrap(),
    ];
    for (platform, ..) in PLATFORMS {
        args.extend(["--platform", platform]);
    }
    args.extend(["--", "./{os}/{arch}/hello"]);
    let out = farm.cli(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("[linux/mips64le] hello from linux/mips64le"),
        "{stdout}"
    );
    assert!(
        stdout.contains("[linux/arm/v7] hello from linux/arm"),
        "{stdout}"
    );
    farm.assert_no_unexpected_errors(&[]);
}
