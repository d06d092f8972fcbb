//! A private coordinator for benchmarks: built from this checkout, started from target/debug
//! on a free loopback port with its data in a temporary directory under target/, and stopped
//! (SIGTERM, then SIGKILL) when the benchmark ends, so that a benchmark needs no farm running
//! and always starts from an empty store.
use crate::demo::{build_binaries, spawn_logged, wait_for_coordinator};
use crate::farm::{FarmClient, FarmOptions};
use crate::paths;
use anyhow::Context;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long it gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A coordinator process this run started; stopped on [`PrivateCoordinator::stop`] or drop.
pub struct PrivateCoordinator {
    child: Child,
    dir: tempfile::TempDir,
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
        Self::start_program(&program).await
    }

    async fn start_program(program: &Path) -> anyhow::Result<(Self, FarmClient)> {
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
        let log_path = dir.path().join("coordinator.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("failed to create {}", log_path.display()))?;
        let data = dir.path().join("data");
        let child = spawn_logged(
            Command::new(program)
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&data),
            log,
            &log_path,
        )?;
        let mut me = Self {
            child,
            options: FarmOptions {
                coordinator: format!("https://127.0.0.1:{port}"),
                credentials: data.join("admin"),
            },
            dir,
        };
        let client = me.wait_until_up().await?;
        Ok((me, client))
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
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let Ok(raw) = i32::try_from(self.child.id()) else {
            return;
        };
        let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateCoordinator {
    fn drop(&mut self) {
        self.terminate();
    }
}
