//! A private coordinator for benchmarks and the chaos run: built from this checkout, started
//! from target/debug on a free loopback port with its data in a temporary directory under
//! target/, and stopped (SIGTERM, then SIGKILL) when the run ends, so that it needs no farm
//! running and always starts from an empty store. The chaos run also SIGKILLs it and starts it
//! again on the same port and data directory.
use crate::demo::{build_binaries, spawn_logged, stop_child, wait_for_coordinator};
use crate::paths;
use anyhow::Context;
use archfarm_client::farm::{FarmClient, FarmOptions};
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// How long it gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A coordinator process this run started; stopped on [`PrivateCoordinator::stop`] or drop.
pub struct PrivateCoordinator {
    child: Child,
    dir: tempfile::TempDir,
    program: PathBuf,
    /// The whole command line after the program, the same on every (re)start.
    args: Vec<OsString>,
    /// How to reach it as its admin.
    pub options: FarmOptions,
}

impl PrivateCoordinator {
    /// Starts `program`, or target/debug/archfarm-coordinator after building it (a no-op when
    /// it is fresh), and waits until it answers FarmStatus.
    pub async fn start(program: Option<&Path>) -> anyhow::Result<(Self, FarmClient)> {
        let program = match program {
            Some(p) => p.to_path_buf(),
            None => {
                build_binaries(&["archfarm-coordinator"])?;
                paths::debug_binary("archfarm-coordinator")
            }
        };
        Self::start_program(&program, &[]).await
    }

    /// Starts `program` with `extra_args` (e.g. `--lease-s 6`) after its listen address and
    /// data directory, and waits until it answers FarmStatus.
    pub async fn start_program(
        program: &Path,
        extra_args: &[OsString],
    ) -> anyhow::Result<(Self, FarmClient)> {
        let target = paths::target_dir();
        std::fs::create_dir_all(&target)
            .with_context(|| format!("failed to create {}", target.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("bench-coordinator-")
            .tempdir_in(&target)
            .context("failed to create a directory for the private coordinator")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("failed to find a free port")?
            .port();
        let data = dir.path().join("data");
        let mut args: Vec<OsString> = vec![
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--data-dir".into(),
            data.clone().into(),
        ];
        args.extend(extra_args.iter().cloned());
        let log_path = dir.path().join("coordinator.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        let child = spawn_logged(Command::new(program).args(&args), log, &log_path)?;
        let mut me = Self {
            child,
            options: FarmOptions {
                coordinator: format!("https://127.0.0.1:{port}"),
                credentials: data.join("admin"),
            },
            dir,
            program: program.to_path_buf(),
            args,
        };
        let client = me.wait_until_up().await?;
        Ok((me, client))
    }

    /// The process id of the running coordinator.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temporary directory holding its data and log; other processes of the same run
    /// may keep their files there too.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the directory (data and logs) after the handle goes, for a post-mortem.
    pub fn keep_dir(&mut self) -> PathBuf {
        self.dir.disable_cleanup(true);
        self.dir.path().to_path_buf()
    }

    /// SIGKILLs the coordinator (no chance to flush or say goodbye), starts it again on the
    /// same port and data directory, and waits until it answers; returns a fresh client.
    pub async fn kill_and_restart(&mut self) -> anyhow::Result<FarmClient> {
        self.child
            .kill()
            .context("failed to SIGKILL the coordinator")?;
        self.child
            .wait()
            .context("failed to reap the killed coordinator")?;
        let log_path = self.log_path();
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .with_context(|| format!("failed to open {}", log_path.display()))?;
        writeln!(log, "===== SIGKILLed; starting again =====")
            .with_context(|| format!("failed to write {}", log_path.display()))?;
        self.child = spawn_logged(Command::new(&self.program).args(&self.args), log, &log_path)?;
        self.wait_until_up().await
    }

    async fn wait_until_up(&mut self) -> anyhow::Result<FarmClient> {
        let log = self.log_path();
        wait_for_coordinator(&log, &mut self.child, &self.options)
            .await
            .context("failed to start a private coordinator")
    }

    /// The coordinator's log so far.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("coordinator.log")
    }

    /// SIGTERM, then SIGKILL after a grace period; the data directory goes with the handle.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        stop_child(&mut self.child, STOP_GRACE);
    }
}

impl Drop for PrivateCoordinator {
    fn drop(&mut self) {
        self.terminate();
    }
}
