//! `archfarm go-build` end to end: the hello fixture cross-compiled for seven platforms
//! (arm/v7 and mips64le among them) on one native amd64 agent, each binary's ELF class, byte
//! order and machine matching its platform; an unchanged rebuild is
//! entirely cached and byte-identical; a target that does not compile fails alone with the
//! compiler's words and a non-zero exit.
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_proto::Platform;
use archfarm_tests::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const PLATFORMS: [&str; 7] = [
    "linux/amd64",
    "linux/arm64",
    "linux/ppc64le",
    "linux/s390x",
    "linux/riscv64",
    "linux/arm/v7",
    "linux/mips64le",
];
const HELLO: &str = "example.com/fixtures/hello";

/// Runs `archfarm go-build ARGS` in `cwd` in GOPATH mode.
fn go_build(farm: &Farm, gp: &Path, cwd: &Path, args: &[&str]) -> Output {
    let mut all = vec!["go-build"];
    all.extend_from_slice(args);
    farm.go_cli(cwd, gp, &all, &[]).0
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn states(report: &Value) -> Vec<String> {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["platform"].as_str().unwrap(),
                r["state"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn hello_for_seven_platforms_matches_each_elf_header_and_rebuilds_from_the_cache() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("amd64", &[]);
    farm.wait_ready_agents(1);
    let gp = farm.copy_go_fixtures();
    let cwd = gp.join("src").join(HELLO);
    let mut args: Vec<&str> = Vec::new();
    for p in PLATFORMS {
        args.extend(["--platform", p]);
    }
    let first_json = farm.dir.path().join("first.json");
    let mut first_args = args.clone();
    first_args.extend(["--json-report", first_json.to_str().unwrap(), HELLO]);

    let first = go_build(&farm, &gp, &cwd, &first_args);
    let stdout = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(first.status.success(), "first build failed:\n{stdout}");
    let r1 = report(&first_json);
    assert_eq!(r1["mode"], "gopath");
    assert_eq!(r1["built"], 7, "{r1:#}");
    assert!(stdout.contains("native linux/amd64"), "{stdout}");
    let mut binaries = Vec::new();
    for p in PLATFORMS {
        let platform: Platform = p.parse().unwrap();
        let bin = cwd.join("_output").join(p).join("hello");
        // Class, byte order and machine: EM_MIPS alone would also pass a big-endian binary.
        if let Err(wrong) = archfarm_proto::elf::check_file(&bin, &platform) {
            panic!("{p}: {wrong}");
        }
        binaries.push((bin.clone(), std::fs::read(&bin).unwrap()));
    }
    // Every result ran on the amd64 agent, natively, as a cross-compile.
    for r in r1["results"].as_array().unwrap() {
        assert_eq!(r["built_on"], "linux/amd64", "{r:#}");
        assert_eq!(r["emulated"], false, "{r:#}");
    }
    // They run (under qemu-user) and say what they were built for.
    for (arch, dir) in [
        ("s390x", "s390x"),
        ("arm", "arm/v7"),
        ("mips64le", "mips64le"),
    ] {
        let run = Command::new(qemu_for(arch))
            .arg(cwd.join(format!("_output/linux/{dir}/hello")))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&run.stdout),
            format!("hello from linux/{arch}\n")
        );
    }

    // Unchanged: everything comes from the action cache, byte for byte the same.
    let second_json = farm.dir.path().join("second.json");
    let mut second_args = args.clone();
    second_args.extend(["--json-report", second_json.to_str().unwrap(), HELLO]);
    let finished_before: usize = farm.agents[0].log_text().matches("action finished").count();
    let second = go_build(&farm, &gp, &cwd, &second_args);
    let stdout = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(second.status.success(), "second build failed:\n{stdout}");
    let r2 = report(&second_json);
    assert_eq!(
        (r2["cached"].as_u64(), r2["built"].as_u64()),
        (Some(7), Some(0)),
        "{r2:#}"
    );
    assert!(states(&r2).iter().all(|s| s.ends_with(" cached")));
    assert!(stdout.contains("cached"), "{stdout}");
    assert_eq!(
        farm.agents[0].log_text().matches("action finished").count(),
        finished_before,
        "a cached rebuild runs nothing"
    );
    for (bin, bytes) in &binaries {
        assert_eq!(&std::fs::read(bin).unwrap(), bytes, "{}", bin.display());
    }
    for (a, b) in r1["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(r2["jobs"].as_array().unwrap())
    {
        assert_eq!(a["action_digest"], b["action_digest"], "same action key");
    }

    // A target that does not compile fails on its own, with the compiler's message.
    let broken = gp.join("src/example.com/fixtures/broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("main.go"),
        "package main\n\nfunc main() {\n\tvar n int = \"not a number\"\n\t_ = n\n}\n",
    )
    .unwrap();
    let third_json = farm.dir.path().join("third.json");
    let third = go_build(
        &farm,
        &gp,
        &cwd,
        &[
            "--platform",
            "linux/arm64",
            "--json-report",
            third_json.to_str().unwrap(),
            HELLO,
            "example.com/fixtures/broken",
        ],
    );
    let text = String::from_utf8_lossy(&third.stdout).into_owned()
        + &String::from_utf8_lossy(&third.stderr);
    assert_eq!(third.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot use \"not a number\""), "{text}");
    let r3 = report(&third_json);
    let by_target: Vec<(String, String)> = r3["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        by_target,
        [
            ("hello".to_string(), "built".to_string()),
            ("broken".to_string(), "failed".to_string())
        ]
    );
    assert!(!cwd.join("_output/linux/arm64/broken").exists());
    farm.assert_no_unexpected_errors(&[]);
}
