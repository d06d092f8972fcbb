//! The installed `archfarm` alone: the binary copied to an empty directory outside the
//! repository, run from elsewhere with a clean environment (no cargo, no checkout), finds its
//! farm through ARCHFARM_* variables or the user's config directory and runs status, run and
//! go-test of a small Go module that lives outside the repository (`-C` like git).
#![allow(clippy::unwrap_used)] // test code: a panic is the failure report
use archfarm_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A Go module with one passing and one failing package, outside any GOPATH.
fn write_module(dir: &Path) {
    let files = [
        ("go.mod", "module example.com/outside\n\ngo 1.19\n"),
        (
            "calc/calc.go",
            "package calc\n\nfunc Add(a, b int) int { return a + b }\n",
        ),
        (
            "calc/calc_test.go",
            "package calc\n\nimport \"testing\"\n\nfunc TestAdd(t *testing.T) {\n\tif Add(2, 3) != 5 {\n\t\tt.Fatal(\"2+3\")\n\t}\n}\n",
        ),
        (
            "broken/broken_test.go",
            "package broken\n\nimport \"testing\"\n\nfunc TestBroken(t *testing.T) { t.Fatal(\"broken on purpose\") }\n",
        ),
    ];
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
}

/// The directory holding `go` (the test's own PATH may hold more than the installed world).
fn go_dir() -> PathBuf {
    let out = Command::new("sh")
        .args(["-c", "command -v go"])
        .output()
        .unwrap();
    let go = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(go.is_absolute(), "no go on PATH");
    std::fs::canonicalize(go)
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

struct Installed {
    bin: PathBuf,
    home: PathBuf,
    cwd: PathBuf,
    go_dir: PathBuf,
}

impl Installed {
    /// `archfarm ARGS` with nothing from this process's environment but `extra`.
    fn run(&self, farm: &Farm, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .current_dir(&self.cwd)
            .env_clear()
            .env("PATH", format!("{}:/usr/bin:/bin", self.go_dir.display()))
            .env("HOME", &self.home)
            .env("GOCACHE", self.home.join("gocache"))
            .env("GOFLAGS", "-mod=mod")
            .env("GOPROXY", "off")
            .env("CGO_ENABLED", "0")
            .envs(extra.iter().copied());
        farm.run_logged(cmd, args)
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_binary_alone_runs_status_run_and_go_test_from_anywhere() {
    let mut farm = Farm::start(&[]);
    farm.add_agent("amd64", &[]);
    farm.wait_ready_agents(1);

    let outside = tempfile::tempdir().unwrap();
    let install = outside.path().join("bin");
    std::fs::create_dir_all(&install).unwrap();
    let bin = install.join("archfarm");
    std::fs::copy(bin_dir().join("archfarm"), &bin).unwrap();
    let module = outside.path().join("src/outside");
    write_module(&module);
    let empty = outside.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let installed = Installed {
        bin,
        home: outside.path().join("home"),
        cwd: empty,
        go_dir: go_dir(),
    };
    let admin = farm.admin_dir();
    let url = farm.url();
    let env = [
        ("ARCHFARM_COORDINATOR", url.as_str()),
        ("ARCHFARM_CREDENTIALS", admin.to_str().unwrap()),
    ];

    // Without any configuration it says where it looked.
    let out = installed.run(&farm, &["status"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(".config/archfarm/credentials"),
        "{}",
        text(&out)
    );

    let out = installed.run(&farm, &["status"], &env);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("linux/amd64"), "{}", text(&out));

    let out = installed.run(
        &farm,
        &[
            "run",
            "--platform",
            "linux/amd64",
            "--",
            "echo",
            "hello-installed",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("hello-installed"), "{}", text(&out));

    // go-test of a module elsewhere, through -C; the failing package fails the run.
    let module_s = module.to_str().unwrap();
    let out = installed.run(
        &farm,
        &[
            "-C",
            module_s,
            "go-test",
            "--platform",
            "linux/amd64",
            "./...",
        ],
        &env,
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    let row = |pkg: &str| {
        t.lines()
            .find(|l| l.contains(pkg) && l.contains('│'))
            .unwrap_or_else(|| panic!("no row for {pkg}:\n{t}"))
            .to_string()
    };
    assert!(row("example.com/outside/calc").contains("pass"), "{t}");
    assert!(row("example.com/outside/broken").contains("fail"), "{t}");
    let out = installed.run(
        &farm,
        &[
            "-C",
            module_s,
            "go-test",
            "--platform",
            "linux/amd64",
            "./calc",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));

    // The config directory: credentials there and a coordinator file beside them.
    let config = installed.home.join(".config/archfarm");
    std::fs::create_dir_all(&config).unwrap();
    std::os::unix::fs::symlink(&admin, config.join("credentials")).unwrap();
    std::fs::write(config.join("coordinator"), format!("{url}\n")).unwrap();
    let out = installed.run(&farm, &["status"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("linux/amd64"), "{}", text(&out));

    // Client credentials carry their coordinator: ARCHFARM_CREDENTIALS alone is enough.
    let ci = farm.client_credentials("ci");
    let out = installed.run(
        &farm,
        &["run", "--platform", "linux/amd64", "--", "echo", "from-ci"],
        &[("ARCHFARM_CREDENTIALS", ci.to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("from-ci"), "{}", text(&out));
    farm.assert_no_unexpected_errors(&[]);
}
