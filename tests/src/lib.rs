//! End-to-end harness: starts a real coordinator and real agents as processes on loopback with
//! real TLS, drives them through the `archfarm` command line and gRPC, and prints every
//! process's log when a test fails.
use anyhow::{bail, Context};
use archfarm_proto::tls::{connect, Credentials, ServerTrust};
use archfarm_proto::v1;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub mod go;
pub use go::*;

/// The directory holding the workspace's built binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    // tests run from target/debug/deps/<test>-<hash>
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for b in ["archfarm-coordinator", "archfarm-agent", "archfarm"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: run `cargo build --workspace --bins` first (cargo xtask ci does)",
            dir.join(b).display()
        );
    }
    dir
}

/// A process the harness started, with its log file.
pub struct Proc {
    /// Name for logs.
    pub name: String,
    /// The child.
    pub child: Option<Child>,
    /// Where stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for exit up to `timeout`; returns the exit status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st.code().unwrap_or(-1));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// An agent session the test speaks itself (AgentSession.Session): what it sends, and what
/// the coordinator answers.
#[derive(Debug)]
pub struct RawSession {
    /// Messages to the coordinator.
    pub tx: tokio::sync::mpsc::Sender<v1::AgentMessage>,
    /// The coordinator's messages.
    pub rx: tonic::Streaming<v1::CoordinatorMessage>,
}

/// Package verdicts from a `go test -json` stream: import path -> "pass" | "fail" | "skip".
pub fn go_test_verdicts(stream: &str) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for line in stream.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v.get("Test").is_some_and(|t| !t.is_null()) {
            continue;
        }
        if let (Some(pkg), Some(action)) = (v["Package"].as_str(), v["Action"].as_str()) {
            if matches!(action, "pass" | "fail" | "skip") {
                out.insert(pkg.to_string(), action.to_string());
            }
        }
    }
    out
}

/// A Hello offering one native platform with one slot.
pub fn hello(platform: &str) -> v1::AgentMessage {
    hello_message(v1::Hello {
        platforms: vec![v1::PlatformOffer {
            platform: platform.into(),
            emulated: false,
        }],
        slots: 1,
        hostname: "raw-session".into(),
        // Says it sandboxes, so untrusted clients' jobs may be assigned to it.
        sandbox: "bwrap (raw session)".into(),
        ..Default::default()
    })
}

/// An AgentMessage carrying `h`.
pub fn hello_message(h: v1::Hello) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(h)),
    }
}

/// An AgentMessage reporting a successful run of `action_id` under `fence`.
pub fn completed(action_id: &str, fence: u64) -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Completed(v1::ActionCompleted {
            action_id: action_id.into(),
            fence,
            result: Some(v1::ExecutionResult {
                outcome: v1::ExecutionOutcome::Exited as i32,
                exit_code: 0,
                ..Default::default()
            }),
        })),
    }
}

/// A whole farm on loopback.
pub struct Farm {
    /// Root of everything this farm writes.
    pub dir: tempfile::TempDir,
    /// The coordinator's port.
    pub port: u16,
    /// The coordinator.
    pub coordinator: Proc,
    /// Extra coordinator flags (kept for restarts).
    pub coordinator_args: Vec<String>,
    /// Agents by name.
    pub agents: Vec<Proc>,
    /// CLI invocations, for failure output.
    pub cli_log: std::cell::RefCell<Vec<String>>,
    bins: PathBuf,
    runtime: tokio::runtime::Runtime,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Farm {
    /// Starts a coordinator with extra flags, e.g. `--lease-s 4`.
    pub fn start(extra: &[&str]) -> Self {
        let bins = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("archfarm-e2e-")
            .tempdir()
            .expect("tempdir");
        // Left 0700 (tempfile's mode): a root agent's sandbox user must not need to reach the
        // data dirs below (tests/tests/sandbox.rs checks it).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut farm = Self {
            port: free_port(),
            coordinator: Proc {
                name: "coordinator".into(),
                child: None,
                log: dir.path().join("coordinator.log"),
            },
            coordinator_args: extra.iter().map(|s| s.to_string()).collect(),
            agents: Vec::new(),
            cli_log: Default::default(),
            dir,
            bins,
            runtime,
        };
        farm.start_coordinator();
        farm
    }

    /// The coordinator URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The admin credentials directory.
    pub fn admin_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator/admin")
    }

    fn open_log(path: &Path) -> (Stdio, Stdio) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("log file");
        (Stdio::from(f.try_clone().expect("clone")), Stdio::from(f))
    }

    /// (Re)starts the coordinator on the same port and data dir; waits until it answers.
    pub fn start_coordinator(&mut self) {
        let (out, err) = Self::open_log(&self.coordinator.log);
        let child = Command::new(self.bins.join("archfarm-coordinator"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(self.dir.path().join("coordinator"))
            .args(&self.coordinator_args)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn coordinator");
        self.coordinator.child = Some(child);
        self.wait_for("the coordinator to answer", Duration::from_secs(30), |f| {
            f.admin_dir().join("ca.pem").exists() && f.status().is_ok()
        });
    }

    /// Runs a future on the harness's runtime.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Starts a future on the harness's runtime without waiting for it.
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.spawn(f)
    }

    /// A channel with the given credentials directory (None: no client certificate).
    pub fn channel(&self, creds: Option<&Path>) -> anyhow::Result<Channel> {
        let ca = std::fs::read_to_string(self.admin_dir().join("ca.pem"))?;
        let url = self.url();
        self.block_on(async move {
            match creds {
                Some(dir) => {
                    let c = Credentials::load(dir)?;
                    Ok(
                        connect(&url, &ServerTrust::Ca(c.ca_pem.clone()), Some(&c.identity))
                            .await?
                            .channel,
                    )
                }
                None => Ok(connect(&url, &ServerTrust::Ca(ca), None).await?.channel),
            }
        })
    }

    /// Opens AgentSession.Session with the credentials in `creds`, sending `first` (the
    /// coordinator answers only after the first message); returns the session or the refusal.
    pub fn open_session(
        &self,
        creds: &Path,
        first: v1::AgentMessage,
    ) -> Result<RawSession, tonic::Status> {
        let ch = self.channel(Some(creds)).expect("channel");
        self.block_on(async move {
            let (tx, rx) = tokio::sync::mpsc::channel(16);
            tx.send(first).await.expect("queue the first message");
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            let resp = v1::agent_session_client::AgentSessionClient::new(ch)
                .session(stream)
                .await?;
            Ok(RawSession {
                tx,
                rx: resp.into_inner(),
            })
        })
    }

    /// Sends a message on a raw session.
    pub fn send(&self, s: &RawSession, m: v1::AgentMessage) {
        self.block_on(s.tx.send(m))
            .expect("session open for sending");
    }

    /// The next message of a raw session within `timeout`: Ok(None) when the stream ended,
    /// Err with the status it ended with (DEADLINE_EXCEEDED when nothing came in time).
    pub fn next_message(
        &self,
        s: &mut RawSession,
        timeout: Duration,
    ) -> Result<Option<v1::CoordinatorMessage>, tonic::Status> {
        self.block_on(async {
            match tokio::time::timeout(timeout, s.rx.message()).await {
                Ok(r) => r,
                Err(_) => Err(tonic::Status::deadline_exceeded(
                    "test: no message from the coordinator in time",
                )),
            }
        })
    }

    /// Reads a raw session until a message `pick` accepts, for at most `timeout`.
    pub fn expect_message<T>(
        &self,
        s: &mut RawSession,
        timeout: Duration,
        mut pick: impl FnMut(&v1::coordinator_message::Kind) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_message(s, left) {
                Ok(Some(m)) => {
                    if let Some(t) = m.kind.as_ref().and_then(&mut pick) {
                        return t;
                    }
                }
                other => panic!("the session ended or stalled: {other:?}"),
            }
        }
    }

    /// Farm status as the admin sees it.
    pub fn status(&self) -> anyhow::Result<v1::FarmStatusResponse> {
        let ch = self.channel(Some(&self.admin_dir()))?;
        self.block_on(async move {
            let mut c = v1::jobs_client::JobsClient::new(ch);
            Ok(c.farm_status(v1::FarmStatusRequest { recent_jobs: 50 })
                .await?
                .into_inner())
        })
    }

    /// Submits a job over gRPC with the credentials in `creds` (None: no client certificate);
    /// returns the job id or the refusal.
    pub fn submit_as(
        &self,
        creds: Option<&Path>,
        spec: v1::JobSpec,
    ) -> Result<String, tonic::Status> {
        let ch = self.channel(creds).expect("channel");
        self.block_on(async move {
            let r = v1::jobs_client::JobsClient::new(ch)
                .submit(v1::SubmitRequest { spec: Some(spec) })
                .await?;
            Ok(r.into_inner().job_id)
        })
    }

    /// A blob from the coordinator's store, as text.
    pub fn read_blob(&self, d: &v1::Digest) -> String {
        let ch = self.channel(Some(&self.admin_dir())).expect("channel");
        let d = d.clone();
        let r = self.block_on(async move {
            v1::cas_client::CasClient::new(ch)
                .batch_read(v1::BatchReadRequest { digests: vec![d] })
                .await
                .expect("batch read")
                .into_inner()
        });
        String::from_utf8_lossy(&r.blobs[0].data).into_owned()
    }

    /// A job's status.
    pub fn job(&self, id: &str) -> anyhow::Result<v1::JobStatus> {
        let ch = self.channel(Some(&self.admin_dir()))?;
        let id = id.to_string();
        self.block_on(async move {
            let mut c = v1::jobs_client::JobsClient::new(ch);
            Ok(c.get_job(v1::GetJobRequest { job_id: id })
                .await?
                .into_inner())
        })
    }

    /// Creates a join token through the command line; returns (token, ca hash).
    pub fn token(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create", "--json"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("token json");
        (
            v["token"].as_str().expect("token").to_string(),
            v["ca_hash"].as_str().expect("ca_hash").to_string(),
        )
    }

    /// Starts a trusted agent (its token carries `trusted=true`, so its native results are
    /// cached) named `name` with a fresh token; `extra` are more agent flags.
    pub fn add_agent(&mut self, name: &str, extra: &[&str]) -> usize {
        let (token, hash) = self.token(&["--labels", "trusted=true"]);
        self.spawn_agent(name, &token, &hash, extra)
    }

    /// Starts an agent whose token carries no labels: untrusted, its results are not cached
    /// unless a job asks for `cache_untrusted`.
    pub fn add_untrusted_agent(&mut self, name: &str, extra: &[&str]) -> usize {
        let (token, hash) = self.token(&[]);
        self.spawn_agent(name, &token, &hash, extra)
    }

    /// The credentials directory of agent process `i` (written at join).
    pub fn agent_credentials(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(&self.agents[i].name)
            .join("credentials")
    }

    /// The agent id agent process `i` was given at join (from its data dir's agent.json).
    pub fn agent_id(&self, i: usize) -> String {
        let path = self
            .dir
            .path()
            .join(&self.agents[i].name)
            .join("agent.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
        let v: serde_json::Value = serde_json::from_str(&text).expect("agent.json");
        v["agent_id"].as_str().expect("agent_id").to_string()
    }

    /// Issues untrusted client credentials named `name` (as for pull-request jobs) through
    /// `archfarm credentials create`; returns their directory.
    pub fn client_credentials(&self, name: &str) -> PathBuf {
        self.issue_client_credentials(name, false)
    }

    /// Issues trusted client credentials named `name` (`--trusted`: its results go to the
    /// shared cache scope); returns their directory.
    pub fn trusted_client_credentials(&self, name: &str) -> PathBuf {
        self.issue_client_credentials(name, true)
    }

    fn issue_client_credentials(&self, name: &str, trusted: bool) -> PathBuf {
        let out = self.dir.path().join(format!("client-{name}"));
        let mut args = vec![
            "credentials",
            "create",
            "--role",
            "client",
            "--name",
            name,
            "--out",
            out.to_str().expect("utf-8 path"),
        ];
        if trusted {
            args.push("--trusted");
        }
        let o = self.cli(&args);
        assert!(
            o.status.success(),
            "credentials create failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    }

    /// Starts an agent process with the given token and CA hash.
    pub fn spawn_agent(&mut self, name: &str, token: &str, ca_hash: &str, extra: &[&str]) -> usize {
        let name = format!("agent-{name}");
        let log = self.dir.path().join(format!("{name}.log"));
        let mut args = vec!["--token", token, "--ca-hash", ca_hash];
        args.extend_from_slice(extra);
        let child = self.start_agent_process(&name, &log, &args);
        self.agents.push(Proc {
            name,
            child: Some(child),
            log,
        });
        self.agents.len() - 1
    }

    /// Starts `program` (e.g. `[qemu-s390x-static, <cross-built agent>]`) as an agent with
    /// the given token and CA hash, data dir `<farm>/agent-<name>`; `RUST_LOG=info`, no
    /// `QEMU_LD_PREFIX`.
    pub fn spawn_agent_program(
        &mut self,
        name: &str,
        program: &[&Path],
        token: &str,
        ca_hash: &str,
    ) -> usize {
        let name = format!("agent-{name}");
        let log = self.dir.path().join(format!("{name}.log"));
        let (first, rest) = program.split_first().expect("a program");
        let (out, err) = Self::open_log(&log);
        let child = Command::new(first)
            .args(rest)
            .arg("--coordinator")
            .arg(self.url())
            .arg("--data-dir")
            .arg(self.dir.path().join(&name))
            .args(["--token", token, "--ca-hash", ca_hash])
            .env("RUST_LOG", "info")
            .env_remove("QEMU_LD_PREFIX")
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e}", first.display()));
        self.agents.push(Proc {
            name,
            child: Some(child),
            log,
        });
        self.agents.len() - 1
    }

    /// Starts `archfarm-agent` with data dir `<farm>/<name>`, logging to `log`.
    fn start_agent_process(&self, name: &str, log: &Path, extra: &[&str]) -> Child {
        let (out, err) = Self::open_log(log);
        Command::new(self.bins.join("archfarm-agent"))
            .arg("--coordinator")
            .arg(self.url())
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn agent")
    }

    /// Restarts agent `i` with its stored credentials (no token).
    pub fn restart_agent(&mut self, i: usize, extra: &[&str]) {
        let child = self.start_agent_process(&self.agents[i].name, &self.agents[i].log, extra);
        self.agents[i].child = Some(child);
    }

    /// Waits until `n` agents are ready.
    pub fn wait_ready_agents(&self, n: usize) {
        self.wait_for(&format!("{n} ready agents"), Duration::from_secs(60), |f| {
            f.status().is_ok_and(|s| {
                s.agents
                    .iter()
                    .filter(|a| a.state == v1::AgentState::Ready as i32)
                    .count()
                    >= n
            })
        });
    }

    /// Polls `cond` every 100 ms until it holds or `timeout` passes (then panics, with logs).
    pub fn wait_for(&self, what: &str, timeout: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out after {timeout:?} waiting for {what}");
    }

    /// Runs `archfarm` with the farm's coordinator and admin credentials.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with(args, &self.admin_dir())
    }

    /// Runs `farm run ARGS` with a JSON report; returns (exit code, report, stderr).
    pub fn run_with_report(&self, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let report = self.dir.path().join(format!(
            "report-{}-{}.json",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let report_s = report.to_string_lossy().into_owned();
        let mut all = vec!["run", "--json-report", report_s.as_str()];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let text = std::fs::read_to_string(&report)
            .unwrap_or_else(|e| panic!("no report ({e}): {stderr}"));
        let value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad report ({e}): {text}"));
        (out.status.code(), value, stderr)
    }

    /// Runs `archfarm` with the given credentials.
    pub fn cli_with(&self, args: &[&str], creds: &Path) -> Output {
        self.run_logged(self.cli_command(args, creds), args)
    }

    /// [`Farm::run_logged`], with stdout and stderr as one text.
    pub fn run_with_text(&self, cmd: Command, args: &[&str]) -> (Output, String) {
        let out = self.run_logged(cmd, args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out, text)
    }

    /// Runs a prepared `archfarm` command and keeps its output for the failure report.
    pub fn run_logged(&self, mut cmd: Command, args: &[&str]) -> Output {
        let out = cmd.output().expect("run archfarm");
        self.cli_log.borrow_mut().push(format!(
            "$ archfarm {}\n[exit {:?}]\n--- stdout\n{}--- stderr\n{}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
        out
    }

    /// A copy of the repository's GOPATH tree of Go fixtures (tests/fixtures/go) in the farm's
    /// directory, so tests may change it.
    pub fn copy_go_fixtures(&self) -> PathBuf {
        self.copy_fixture("go", "gopath")
    }

    /// A copy of tests/fixtures/`fixture` as `name` in the farm's directory.
    pub fn copy_fixture(&self, fixture: &str, name: &str) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(fixture);
        let dst = self.dir.path().join(name);
        let st = Command::new("cp")
            .arg("-r")
            .arg(&src)
            .arg(&dst)
            .status()
            .expect("run cp");
        assert!(st.success(), "copy {}", src.display());
        dst
    }

    /// A farm with a native linux/amd64 agent and an agent that serves linux/arm64 only under
    /// qemu-user, both ready.
    pub fn start_amd64_and_emulated_arm64() -> Farm {
        let mut farm = Farm::start(&[]);
        farm.add_agent("amd64", &[]);
        farm.add_agent(
            "arm64",
            &[
                "--no-native",
                "--emulate",
                &format!("linux/arm64={}", qemu_for("arm64")),
            ],
        );
        farm.wait_ready_agents(2);
        farm
    }

    /// Go's GOPATH mode on `gopath` (a list of paths is fine), cgo off, with this farm's own
    /// build cache: for `go` itself and for the Go recipes of `archfarm`.
    pub fn go_env<'c>(
        &self,
        cmd: &'c mut Command,
        gopath: impl AsRef<std::ffi::OsStr>,
    ) -> &'c mut Command {
        cmd.env("GO111MODULE", "off")
            .env("GOPATH", gopath)
            .env("GOCACHE", self.dir.path().join("gocache"))
            .env("CGO_ENABLED", "0")
    }

    /// Runs `archfarm ARGS` as the admin in `cwd` with [`Farm::go_env`] and `env`; returns the
    /// output and its stdout followed by its stderr.
    pub fn go_cli(
        &self,
        cwd: &Path,
        gopath: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Output, String) {
        self.go_cli_as(&self.admin_dir(), cwd, gopath, args, env)
    }

    /// Like [`Farm::go_cli`], with the client credentials in `creds`.
    pub fn go_cli_as(
        &self,
        creds: &Path,
        cwd: &Path,
        gopath: impl AsRef<std::ffi::OsStr>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Output, String) {
        let mut cmd = self.cli_command(args, creds);
        cmd.current_dir(cwd).envs(env.iter().copied());
        self.go_env(&mut cmd, gopath);
        self.run_with_text(cmd, args)
    }

    /// Starts `archfarm ARGS` as the admin in the background, its output piped (read it with
    /// `wait_with_output`).
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.cli_command(args, &self.admin_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start archfarm")
    }

    /// The `archfarm` command, not started.
    pub fn cli_command(&self, args: &[&str], creds: &Path) -> Command {
        let mut c = Command::new(self.bins.join("archfarm"));
        c.args(args)
            .env("ARCHFARM_COORDINATOR", self.url())
            .env("ARCHFARM_CREDENTIALS", creds);
        c
    }

    /// Lines of the coordinator and agent logs at ERROR level.
    pub fn error_lines(&self) -> Vec<String> {
        std::iter::once(&self.coordinator)
            .chain(self.agents.iter())
            .flat_map(|p| {
                p.log_text()
                    .lines()
                    .filter(|l| l.contains(" ERROR "))
                    .map(|l| format!("{}: {l}", p.name))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Fails if any process logged an ERROR not matching one of `expected`.
    pub fn assert_no_unexpected_errors(&self, expected: &[&str]) {
        let bad: Vec<String> = self
            .error_lines()
            .into_iter()
            .filter(|l| !expected.iter().any(|e| l.contains(e)))
            .collect();
        assert!(
            bad.is_empty(),
            "unexpected ERROR lines:\n{}",
            bad.join("\n")
        );
    }
}

impl Drop for Farm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== farm logs ({}) =====", self.dir.path().display());
            for p in std::iter::once(&self.coordinator).chain(self.agents.iter()) {
                eprintln!("----- {} -----\n{}", p.name, p.log_text());
            }
            for c in self.cli_log.borrow().iter() {
                eprintln!("----- cli -----\n{c}");
            }
        }
        for a in &mut self.agents {
            a.kill();
        }
        self.coordinator.kill();
    }
}

/// Cross-compiles a tiny Go program that prints its GOARCH for each arch into
/// `out/linux/<arch>/hello`. Needs `go` (Debian's golang-go).
pub fn build_hello(out: &Path, arches: &[&str]) -> anyhow::Result<()> {
    let src = out.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(
        src.join("main.go"),
        "package main\n\nimport (\n\t\"fmt\"\n\t\"runtime\"\n)\n\nfunc main() {\n\tfmt.Printf(\"hello from %s/%s\\n\", runtime.GOOS, runtime.GOARCH)\n}\n",
    )?;
    let input = out.join("input");
    for arch in arches {
        let dest = input.join("linux").join(arch);
        std::fs::create_dir_all(&dest)?;
        let st = Command::new("go")
            .args(["build", "-o"])
            .arg(dest.join("hello"))
            .arg("main.go")
            .current_dir(&src)
            .env("CGO_ENABLED", "0")
            .env("GOOS", "linux")
            .env("GOARCH", arch)
            .env("GOARM", if *arch == "arm" { "7" } else { "" })
            .env("GO111MODULE", "off")
            .env("GOCACHE", out.join("gocache"))
            .env("GOPATH", out.join("gopath"))
            .status()
            .context("failed to run go (install golang-go)")?;
        if !st.success() {
            bail!("go build for {arch} failed");
        }
    }
    Ok(())
}

/// The qemu-user program (Debian's path) for a Go arch of linux (`arm` is linux/arm/v7).
pub fn qemu_for(arch: &str) -> String {
    let name = match arch {
        "arm" => "linux/arm/v7".to_string(),
        other => format!("linux/{other}"),
    };
    let platform: archfarm_proto::Platform = name.parse().expect("a known platform");
    let program = platform.qemu_user_program().expect("a qemu-user program");
    format!("/usr/bin/{program}")
}

/// Whether any process's command line contains `needle`.
pub fn process_running(needle: &str) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return false;
    };
    rd.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|b| {
                // The CLI that submitted the command carries it in its own argv.
                let cli = b
                    .split(|c| *c == 0)
                    .next()
                    .is_some_and(|argv0| argv0.ends_with(b"/archfarm"));
                let s = String::from_utf8_lossy(&b).replace('\0', " ");
                s.contains(needle) && !cli
            })
            .unwrap_or(false)
    })
}
