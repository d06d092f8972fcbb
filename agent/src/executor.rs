//! Runs one assigned action: a fresh work dir with its inputs, a clean environment, its own
//! process group (so timeout and cancel kill the whole tree), live output, and a result whose
//! stdout, stderr and declared outputs are stored in the CAS. `run_process` (spawn, watch,
//! kill the group, capture) is shared with the actions made of steps in steps.rs.
use crate::blob_cache::BlobCache;
use crate::cas::{self, BlobSource, BlobStore};
use crate::isolation::{Breach, BreachKind, Isolation, OutputMeter};
use crate::limits::{self, bytes, ActionCgroup, ProcessLimits};
use crate::sandbox::{Sandbox, SandboxRequest};
use crate::{outputs, steps, workspace};
use anyhow::{bail, Context};
use archfarm_proto::{v1, Digest, Platform};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// PATH every action starts with.
pub const BASE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Bytes read from a pipe at once (and so the largest log chunk).
const CHUNK_BYTES: usize = 64 * 1024;
/// Output kept per stream for the result blobs.
const CAPTURE_BYTES: usize = 16 * 1024 * 1024;
/// How often the process tree's memory and CPU time are sampled.
const MEMORY_SAMPLE_EVERY: Duration = Duration::from_millis(200);
/// How often the work dir's size is measured against the disk limit.
const DISK_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long output pipes may stay open after the process group is gone (a process that left
/// the group may hold them).
const PIPE_DRAIN: Duration = Duration::from_secs(1);
/// Limit used when an action carries none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// What every execution on this agent shares.
#[derive(Clone, Debug)]
pub struct ExecutorSettings {
    /// Parent of the work directories (`data_dir/work`).
    pub work_root: PathBuf,
    /// The local blob cache inputs are linked from.
    pub cache: BlobCache,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// The host's own platform, when it is offered.
    pub native: Option<Platform>,
    /// Emulator program per emulated platform.
    pub emulators: HashMap<Platform, PathBuf>,
    /// Host name, for results.
    pub hostname: String,
    /// Actions that spawned a process since the agent started: the actions it actually
    /// executed (an action-cache hit never gets here; an action made of steps counts once).
    pub executed: Arc<AtomicU64>,
    /// Sandbox, limits and watchdog.
    pub isolation: Arc<Isolation>,
}

/// How the session stops a running action.
#[derive(Debug, Default)]
pub struct ActionControl {
    token: CancellationToken,
    reason: Mutex<Option<String>>,
    abandoned: std::sync::atomic::AtomicBool,
}

impl ActionControl {
    /// Asks the action to stop because the coordinator cancelled it (outcome CANCELLED; the
    /// first reason given is kept).
    pub fn cancel(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.token.cancel();
    }

    /// Whether the action was asked to stop.
    pub(crate) fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Stops the action because the agent goes away: not the command's fault, so the outcome
    /// is INFRA_ERROR and the coordinator runs it again elsewhere.
    pub fn abandon(&self, reason: &str) {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.cancel(reason);
    }

    /// The message a stopped action reports; `when` is e.g. " before it started".
    pub(crate) fn stopped_message(&self, when: &str) -> String {
        if self.abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            format!("stopped{when}: {}", self.reason())
        } else {
            format!("cancelled{when}: {}", self.reason())
        }
    }

    /// The outcome a stopped action reports.
    pub(crate) fn stopped_outcome(&self) -> v1::ExecutionOutcome {
        if self.abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            v1::ExecutionOutcome::InfraError
        } else {
            v1::ExecutionOutcome::Cancelled
        }
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "no reason given".into())
    }
}

/// Where live output goes.
pub trait LogSink: Send + Sync {
    /// Delivers one chunk of `stream`; may drop it (the result blobs keep everything).
    fn send(&self, stream: v1::LogStream, data: Vec<u8>) -> impl Future<Output = ()> + Send;
}

/// The result fields that say who ran the action where, with the given outcome.
pub fn bare_result(
    settings: &ExecutorSettings,
    assign: &v1::Assign,
    agent_id: &str,
    outcome: v1::ExecutionOutcome,
    message: String,
) -> v1::ExecutionResult {
    v1::ExecutionResult {
        outcome: outcome as i32,
        exit_code: -1,
        message,
        stdout_digest: None,
        stderr_digest: None,
        agent_id: agent_id.to_string(),
        agent_hostname: settings.hostname.clone(),
        platform: assign
            .action
            .as_ref()
            .map(|a| a.platform.clone())
            .unwrap_or_default(),
        emulated: assign.emulated,
        started_unix_ms: unix_ms(SystemTime::now()),
        duration_ms: 0,
        peak_memory_bytes: 0,
        output_files: vec![],
        output_directories: vec![],
        step_results: vec![],
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `<sanitised action id>-<fence>`: a work directory name that is one safe path component.
pub fn work_dir_name(action_id: &str, fence: u64) -> String {
    let clean: String = action_id
        .chars()
        .take(120)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.');
    format!("{clean}-{fence}")
}

/// What a finished run left.
pub(crate) struct Finished {
    pub outcome: v1::ExecutionOutcome,
    pub exit_code: i32,
    pub message: String,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub started: SystemTime,
    pub duration: Duration,
    pub peak_memory_bytes: u64,
    /// Whether the declared outputs are looked for: the command ran (or its program could not
    /// be started) and the agent is not abandoning it.
    pub collect_outputs: bool,
    /// One per step, in order, for an action made of steps; each names its output blob.
    pub step_results: Vec<v1::StepResult>,
    /// The steps' output blobs, uploaded with the result.
    pub step_blobs: Vec<(Digest, BlobSource)>,
}

impl Finished {
    /// A run that never started a process: no output, exit code -1.
    pub fn not_started(outcome: v1::ExecutionOutcome) -> Self {
        Finished {
            outcome,
            exit_code: -1,
            message: String::new(),
            stdout: Vec::new(),
            stderr: Vec::new(),
            started: SystemTime::now(),
            duration: Duration::ZERO,
            peak_memory_bytes: 0,
            collect_outputs: false,
            step_results: Vec::new(),
            step_blobs: Vec::new(),
        }
    }
}

/// Runs `assign` to the end and reports what happened. Never fails: problems that are not
/// the command's fault become an INFRA_ERROR result.
pub async fn execute<S: BlobStore, L: LogSink>(
    settings: &ExecutorSettings,
    store: &S,
    logs: &L,
    assign: &v1::Assign,
    agent_id: &str,
    control: &ActionControl,
) -> v1::ExecutionResult {
    let work_dir = settings
        .work_root
        .join(work_dir_name(&assign.action_id, assign.fence));
    let result = match run_in(settings, store, logs, assign, control, &work_dir).await {
        Ok(finished) => report(settings, store, logs, assign, agent_id, &work_dir, finished).await,
        Err(e) => bare_result(
            settings,
            assign,
            agent_id,
            v1::ExecutionOutcome::InfraError,
            format!("{e:#}"),
        ),
    };
    let cleanup = {
        let dir = work_dir.clone();
        tokio::task::spawn_blocking(move || workspace::remove_dir_forcibly(&dir)).await
    };
    match cleanup {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("failed to {e:#}"),
        Err(e) => tracing::warn!("failed to remove {}: {e}", work_dir.display()),
    }
    result
}

/// Builds the result of a finished run: collects the declared outputs from the work dir and
/// uploads them with stdout and stderr. A failure to upload is an INFRA_ERROR (the action is
/// run again elsewhere).
async fn report<S: BlobStore, L: LogSink>(
    settings: &ExecutorSettings,
    store: &S,
    logs: &L,
    assign: &v1::Assign,
    agent_id: &str,
    work_dir: &Path,
    mut finished: Finished,
) -> v1::ExecutionResult {
    let infra = v1::ExecutionOutcome::InfraError;
    let mut result = bare_result(
        settings,
        assign,
        agent_id,
        finished.outcome,
        std::mem::take(&mut finished.message),
    );
    result.exit_code = finished.exit_code;
    result.started_unix_ms = unix_ms(finished.started);
    result.duration_ms = finished.duration.as_millis() as u64;
    result.peak_memory_bytes = finished.peak_memory_bytes;
    result.step_results = std::mem::take(&mut finished.step_results);
    for step in &mut result.step_results {
        step.agent_id = agent_id.to_string();
    }

    let mut blobs = std::mem::take(&mut finished.step_blobs);
    let declared = assign
        .action
        .as_ref()
        .filter(|a| finished.collect_outputs && !a.output_paths.is_empty());
    if let Some(action) = declared {
        let root = work_dir.to_path_buf();
        let cwd = work_dir.join(&action.working_directory);
        let paths = action.output_paths.clone();
        let collected = match tokio::task::spawn_blocking(move || {
            outputs::collect(&root, &cwd, &paths)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the output collector failed: {e}")),
        };
        let collected = match collected {
            Ok(c) => c,
            Err(e) => {
                result.outcome = infra as i32;
                result.message = format!("failed to collect the declared outputs: {e:#}");
                return result;
            }
        };
        if !collected.notes.is_empty() {
            let mut text = String::new();
            if !finished.stderr.is_empty() && !finished.stderr.ends_with(b"\n") {
                text.push('\n');
            }
            for note in &collected.notes {
                text.push_str(note);
                text.push('\n');
            }
            logs.send(v1::LogStream::Stderr, text.clone().into_bytes())
                .await;
            finished.stderr.extend_from_slice(text.as_bytes());
        }
        result.output_files = collected.files;
        result.output_directories = collected.directories;
        blobs.extend(collected.blobs);
    }

    let stdout_digest = Digest::of(&finished.stdout);
    let stderr_digest = Digest::of(&finished.stderr);
    blobs.push((stdout_digest, BlobSource::Memory(finished.stdout.into())));
    blobs.push((stderr_digest, BlobSource::Memory(finished.stderr.into())));
    match cas::upload_missing(store, blobs).await {
        Ok(sent) => {
            tracing::debug!(
                "{}: {} of {} result blobs uploaded ({} bytes)",
                assign.action_id,
                sent.sent,
                sent.named,
                sent.sent_bytes
            );
            result.stdout_digest = Some(stdout_digest.to_proto());
            result.stderr_digest = Some(stderr_digest.to_proto());
        }
        Err(e) => {
            result.outcome = infra as i32;
            result.message = format!("failed to upload the output: {e:#}");
            result.output_files.clear();
            result.output_directories.clear();
            result.step_results.clear();
        }
    }
    result
}

/// Prepares the work dir and runs the action in it: its one command, or its steps one after
/// the other. `Err` means INFRA_ERROR.
async fn run_in<S: BlobStore, L: LogSink>(
    settings: &ExecutorSettings,
    store: &S,
    logs: &L,
    assign: &v1::Assign,
    control: &ActionControl,
    work_dir: &Path,
) -> anyhow::Result<Finished> {
    let action = assign
        .action
        .as_ref()
        .context("the assignment carries no action")?;
    let platform: Platform = action
        .platform
        .parse()
        .with_context(|| format!("failed to run action {}", assign.action_id))?;
    let wrapper = if assign.emulated {
        Some(
            settings
                .emulators
                .get(&platform)
                .with_context(|| format!("this agent has no emulator for {platform}"))?
                .clone(),
        )
    } else {
        if settings.native.as_ref() != Some(&platform) {
            bail!("this agent does not run {platform} natively");
        }
        None
    };
    if action.steps.is_empty() && action.argv.is_empty() {
        bail!("the action has an empty argv");
    }
    if action.network && !settings.isolation.allow_network {
        bail!("the action asks for the network, which this agent's policy does not allow");
    }
    if !action.steps.is_empty() && !action.argv.is_empty() {
        bail!("the action has both an argv and steps");
    }
    let rel_cwd = Path::new(&action.working_directory);
    if !is_relative_inside(rel_cwd) {
        bail!(
            "working directory {:?} must be relative and free of ..",
            action.working_directory
        );
    }
    let input_root = action
        .input_root
        .as_ref()
        .map(Digest::from_proto)
        .transpose()
        .context("failed to parse the input root digest")?;

    let prepared_at = Instant::now();
    let prepare = async {
        let dir = work_dir.to_path_buf();
        tokio::task::spawn_blocking(move || workspace::remove_dir_forcibly(&dir))
            .await
            .context("failed to clear the work directory")??;
        workspace::materialise(store, &settings.cache, input_root, work_dir)
            .await
            .context("failed to materialise the input root")?;
        let tmp = work_dir.join(".tmp");
        let cwd = work_dir.join(rel_cwd);
        for d in [&tmp, &cwd] {
            std::fs::create_dir_all(d)
                .with_context(|| format!("failed to create {}", d.display()))?;
        }
        if let Sandbox::Bwrap(b) = &settings.isolation.sandbox {
            let dir = work_dir.to_path_buf();
            let b = b.clone();
            tokio::task::spawn_blocking(move || b.own_tree(&dir))
                .await
                .context("failed to prepare the sandbox")?
                .context("failed to prepare the sandbox")?;
        }
        anyhow::Ok((tmp, cwd))
    };
    let (tmp, cwd) = tokio::select! {
        r = prepare => r?,
        () = control.token.cancelled() => {
            return Ok(Finished {
                message: control.stopped_message(" before it started"),
                ..Finished::not_started(control.stopped_outcome())
            });
        }
    };
    tracing::debug!(
        "prepared {} for {} in {:?}",
        work_dir.display(),
        assign.action_id,
        prepared_at.elapsed()
    );

    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), BASE_PATH.into()),
        ("HOME".into(), work_dir.to_string_lossy().into_owned()),
        ("TMPDIR".into(), tmp.to_string_lossy().into_owned()),
    ];
    for v in &action.env {
        env.retain(|(k, _)| *k != v.name);
        env.push((v.name.clone(), v.value.clone()));
    }
    let search_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let prepared = Prepared {
        work_dir: work_dir.to_path_buf(),
        env,
        search_path,
        wrapper,
        network: action.network,
    };
    let action_timeout = match action.timeout_ms {
        0 => DEFAULT_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    if !action.steps.is_empty() {
        return steps::run_steps(settings, logs, assign, &prepared, action_timeout, control).await;
    }

    let program = prepared.program(&action.argv, &cwd);
    let run = run_process(
        settings,
        &program,
        Capture::Live(logs),
        action_timeout,
        control,
    )
    .await?;
    let ran = match run {
        ProcessRun::NotStarted { exit_code, line } => {
            logs.send(v1::LogStream::Stderr, line.clone()).await;
            return Ok(Finished {
                outcome: v1::ExecutionOutcome::Exited,
                exit_code,
                stderr: line,
                collect_outputs: true,
                ..Finished::not_started(v1::ExecutionOutcome::Exited)
            });
        }
        ProcessRun::Ran(ran) => ran,
    };
    settings.executed.fetch_add(1, Ordering::Relaxed);
    let (stdout, stderr) = match ran.captured {
        Captured::Streams { stdout, stderr } => (stdout, stderr),
        Captured::Merged(_) => bail!("the output was captured in the wrong mode"),
    };
    let (outcome, exit_code, message) = match ran.ending {
        Ending::Exited(status) => (
            v1::ExecutionOutcome::Exited,
            exit_code(status),
            String::new(),
        ),
        Ending::TimedOut(status) => (
            v1::ExecutionOutcome::TimedOut,
            status.code().unwrap_or(-1),
            format!(
                "timed out after {} ms; the process group was sent SIGTERM, then SIGKILL",
                action_timeout.as_millis()
            ),
        ),
        Ending::Cancelled(status) => (
            control.stopped_outcome(),
            status.code().unwrap_or(-1),
            control.stopped_message(""),
        ),
        Ending::Breached(status) => (
            v1::ExecutionOutcome::Exited,
            exit_code(status),
            String::new(),
        ),
    };
    let (outcome, message) = match &ran.breach {
        Some((BreachKind::Limit, why)) => (
            v1::ExecutionOutcome::LimitExceeded,
            format!("stopped: {why}"),
        ),
        Some((BreachKind::Stuck, why)) => (
            v1::ExecutionOutcome::InfraError,
            format!("stopped as stuck: {why}"),
        ),
        None => (outcome, message),
    };
    Ok(Finished {
        outcome,
        exit_code,
        message,
        stdout,
        stderr,
        started: ran.started,
        duration: ran.duration,
        peak_memory_bytes: ran.peak_memory_bytes,
        // An abandoned action runs again elsewhere: its outputs are not worth the wait.
        collect_outputs: outcome != v1::ExecutionOutcome::InfraError,
        step_results: Vec::new(),
        step_blobs: Vec::new(),
    })
}

/// Whether `path` is relative and stays inside the directory it is joined to (no `..`, no
/// root).
pub(crate) fn is_relative_inside(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// What every process of one action shares: its materialised work dir and its environment.
pub(crate) struct Prepared {
    /// The action's work dir (its input root).
    pub work_dir: PathBuf,
    /// The whole environment: PATH, HOME, TMPDIR, then the action's variables.
    pub env: Vec<(String, String)>,
    /// The PATH programs without a '/' are looked up on.
    pub search_path: String,
    /// The emulator every program runs under, when the action is emulated.
    pub wrapper: Option<PathBuf>,
    /// The action may use the network.
    pub network: bool,
}

impl Prepared {
    /// `argv` run in `cwd` with this action's environment and emulator.
    pub fn program<'a>(&'a self, argv: &'a [String], cwd: &'a Path) -> Program<'a> {
        Program {
            argv,
            cwd,
            env: &self.env,
            search_path: &self.search_path,
            wrapper: self.wrapper.as_deref(),
            work_dir: &self.work_dir,
            network: self.network,
        }
    }
}

/// One process to start.
pub(crate) struct Program<'a> {
    /// Program and arguments; not empty.
    pub argv: &'a [String],
    /// Where it runs; argv[0] containing '/' is resolved against it.
    pub cwd: &'a Path,
    /// Its whole environment.
    pub env: &'a [(String, String)],
    /// PATH for argv[0] without a '/'.
    pub search_path: &'a str,
    /// Emulator that runs the resolved program, if any.
    pub wrapper: Option<&'a Path>,
    /// The action's work dir: the only place it may write (besides its private /tmp).
    pub work_dir: &'a Path,
    /// It may use the network.
    pub network: bool,
}

/// Where a process's output goes.
pub(crate) enum Capture<'a, L> {
    /// stdout and stderr on their own pipes, each streamed live to the sink and kept (the
    /// first `CAPTURE_BYTES`) for the result.
    Live(&'a L),
    /// stdout and stderr on one pipe, in the order written, copied whole into this new file
    /// and hashed; nothing is streamed.
    Merged(&'a Path),
}

/// The output a process left, by capture mode.
pub(crate) enum Captured {
    /// What `Capture::Live` kept of each stream.
    Streams { stdout: Vec<u8>, stderr: Vec<u8> },
    /// The digest of the file `Capture::Merged` wrote.
    Merged(Digest),
}

/// How an attempt to run one process went.
pub(crate) enum ProcessRun {
    /// The program could not be started: exit code 127 (not found) or 126 (not executable),
    /// and the line a shell would print.
    NotStarted { exit_code: i32, line: Vec<u8> },
    /// It ran.
    Ran(Ran),
}

/// A process that ran, and its whole process group that is gone.
pub(crate) struct Ran {
    /// How it ended.
    pub ending: Ending,
    /// When it was spawned.
    pub started: SystemTime,
    /// From spawn until the group leader was reaped.
    pub duration: Duration,
    /// Highest sampled resident memory of its process group.
    pub peak_memory_bytes: u64,
    /// Its output.
    pub captured: Captured,
    /// The limit it broke, or why it was found stuck.
    pub breach: Option<(BreachKind, String)>,
}

/// Runs one process in its own process group with stdin from /dev/null, inside the sandbox
/// and the limits of `settings.isolation`, until it exits, the `timeout` passes, `control`
/// stops it, or it breaks a limit or gets stuck; either way the whole tree is killed at the
/// end, and output pipes held by processes that escaped it are given up after `PIPE_DRAIN`.
/// `Err` is the agent's problem (the sandbox or cgroup could not be set up, spawn failed for
/// another reason than a missing or non-executable program, the capture file could not be
/// written).
pub(crate) async fn run_process<L: LogSink>(
    settings: &ExecutorSettings,
    program: &Program<'_>,
    capture: Capture<'_, L>,
    timeout: Duration,
    control: &ActionControl,
) -> anyhow::Result<ProcessRun> {
    let argv0 = &program.argv[0];
    let isolation = &settings.isolation;
    let limits = isolation.limits;
    let mut merged = None;
    let started = SystemTime::now();
    let started_at = Instant::now();
    let resolved = match resolve_program(argv0, program.cwd, program.search_path) {
        Ok(p) => p,
        Err(e) => return Ok(not_started(argv0, e)),
    };
    if program.wrapper.is_none() {
        // Inside the sandbox bwrap's own exec would fail with its own exit code; check here.
        if let Err(e) = check_runnable(&resolved) {
            return Ok(not_started(argv0, e));
        }
    }
    let cgroup = {
        let name = isolation.next_name();
        let enforcer = isolation.enforcer.clone();
        tokio::task::spawn_blocking(move || enforcer.begin(&name, &limits))
            .await
            .context("failed to set up the action's cgroup")?
            .context("failed to set up the action's limits")?
    };
    // A root agent's sandboxed process becomes the sandbox user in the child (after its
    // cgroup and limits), reaching its work dir through a mount namespace of its own.
    let mut switch = None;
    let mut cmd = match &isolation.sandbox {
        Sandbox::Bwrap(b) => {
            let mut c = std::process::Command::new(&b.program);
            c.args(b.args(&SandboxRequest {
                work_dir: program.work_dir,
                cwd: program.cwd,
                network: program.network,
                tmp_bytes: limits.disk_bytes,
                processes: if cgroup.is_some() {
                    0
                } else {
                    limits.processes
                },
            }));
            if let Some(w) = program.wrapper {
                c.arg(w);
            }
            c.arg(&resolved);
            // bwrap's own --chdir puts the program in `cwd`; the host path may be closed to
            // the sandbox user.
            c.current_dir("/");
            switch = b
                .user_switch(program.work_dir)
                .context("failed to prepare the sandbox user")?;
            c
        }
        Sandbox::Unsandboxed { .. } => {
            let mut c = match program.wrapper {
                Some(w) => {
                    let mut c = std::process::Command::new(w);
                    c.arg(&resolved);
                    c
                }
                None => {
                    let mut c = std::process::Command::new(&resolved);
                    c.arg0(argv0);
                    c
                }
            };
            c.current_dir(program.cwd);
            c
        }
    };
    cmd.args(&program.argv[1..])
        .env_clear()
        .envs(program.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    let process_limits = ProcessLimits {
        // Without a cgroup, memory is held per process (with slack: the sampler below names
        // the breach first when the tree grows slowly).
        data_bytes: if cgroup.is_none() {
            limits.memory_bytes.saturating_mul(2)
        } else {
            0
        },
        file_bytes: limits.disk_bytes,
        cpu_s: limits.cpu_time_s,
    };
    limits::install_pre_exec(&mut cmd, cgroup.as_ref(), process_limits, switch)?;
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    match capture {
        Capture::Live(_) => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        Capture::Merged(path) => {
            let file = tokio::fs::File::create(path)
                .await
                .with_context(|| format!("failed to create {}", path.display()))?;
            let (writer, reader) =
                tokio::net::unix::pipe::pipe().context("failed to create an output pipe")?;
            let writer = writer
                .into_blocking_fd()
                .context("failed to create an output pipe")?;
            let writer2 = writer
                .try_clone()
                .context("failed to duplicate an output pipe")?;
            cmd.stdout(writer).stderr(writer2);
            merged = Some((reader, file));
        }
    }
    // `cmd` (holding the parent's copies of the pipes' write ends) is dropped here, so the
    // pipes end when the last process holding them does.
    let mut child = match (cmd.spawn(), &isolation.sandbox) {
        (Ok(c), _) => c,
        // What failed to start is bwrap itself or the switch to its user: the agent's problem.
        (Err(e), Sandbox::Bwrap(b)) => return Err(b.start_error(e)),
        (Err(e), Sandbox::Unsandboxed { .. }) => match spawn_exit_code(&e) {
            Some(_) => return Ok(not_started(argv0, e)),
            None => return Err(e).with_context(|| format!("failed to start {argv0}")),
        },
    };
    drop(cmd);
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .context("the spawned process has no pid")?;
    let pipes = match (capture, merged) {
        (Capture::Live(logs), _) => Pipes::Live {
            logs,
            stdout: child.stdout.take().context("stdout was not piped")?,
            stderr: child.stderr.take().context("stderr was not piped")?,
        },
        (Capture::Merged(path), Some((reader, file))) => Pipes::Merged { path, reader, file },
        (Capture::Merged(_), None) => bail!("the output pipe was not created"),
    };

    let breach = Breach::default();
    let meter = OutputMeter::new(limits.output_bytes, &breach);
    let leader_done = CancellationToken::new();
    let stop_reading = CancellationToken::new();
    let readers = async {
        let all = pipes.read(&stop_reading, &meter);
        tokio::pin!(all);
        tokio::select! {
            r = &mut all => r,
            () = async { leader_done.cancelled().await; tokio::time::sleep(PIPE_DRAIN).await } => {
                stop_reading.cancel();
                all.await
            }
        }
    };
    let supervised = async {
        let r = supervise(
            &mut child,
            pgid,
            timeout,
            control,
            &breach,
            settings.kill_grace,
        )
        .await;
        if let Some(cg) = &cgroup {
            cg.kill_all();
        }
        leader_done.cancel();
        r
    };
    let watch = Watch {
        pgid,
        cgroup: cgroup.as_ref(),
        isolation,
        work_dir: program.work_dir,
        meter: &meter,
        breach: &breach,
    };
    let monitor = watch.run(&leader_done);
    let (captured, supervised, peak) = tokio::join!(readers, supervised, monitor);
    let (ending, ended_at) = supervised?;
    let peak = cgroup
        .as_ref()
        .and_then(ActionCgroup::peak_memory)
        .map_or(peak, |p| p.max(peak));
    let breach = breach
        .get()
        .or_else(|| {
            cgroup
                .as_ref()
                .and_then(|cg| cg.breach(&limits))
                .map(|why| (BreachKind::Limit, why))
        })
        .or_else(|| signal_breach(&ending, &limits));
    Ok(ProcessRun::Ran(Ran {
        ending,
        started,
        duration: ended_at.saturating_duration_since(started_at),
        peak_memory_bytes: peak,
        captured: captured?,
        breach,
    }))
}

/// The line a shell prints when `argv0` cannot be run, with its exit code.
fn not_started(argv0: &str, e: std::io::Error) -> ProcessRun {
    ProcessRun::NotStarted {
        exit_code: spawn_exit_code(&e).unwrap_or(126),
        line: format!("failed to start {argv0}: {e}\n").into_bytes(),
    }
}

/// 127 (not found) or 126 (not executable) like a shell; `None` for other spawn errors.
fn spawn_exit_code(e: &std::io::Error) -> Option<i32> {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput => Some(127),
        std::io::ErrorKind::PermissionDenied => Some(126),
        _ if e.raw_os_error() == Some(nix::libc::ENOEXEC) => Some(126),
        _ => None,
    }
}

/// Whether `path` is a file with an execute bit, and not an ELF or script the kernel would
/// refuse (a text file without `#!`).
fn check_runnable(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() || meta.permissions().mode() & 0o111 == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
    }
    let mut head = [0u8; 4];
    let n = {
        use std::io::Read;
        std::fs::File::open(path)?.read(&mut head)?
    };
    let known = head[..n].starts_with(b"\x7fELF") || head[..n].starts_with(b"#!");
    if !known {
        return Err(std::io::Error::from_raw_os_error(nix::libc::ENOEXEC));
    }
    Ok(())
}

/// A run that a signal from the kernel ended at a per-process limit: SIGXCPU (CPU time) or
/// SIGXFSZ (file size, i.e. the disk limit).
fn signal_breach(ending: &Ending, limits: &crate::policy::Limits) -> Option<(BreachKind, String)> {
    let Ending::Exited(status) = ending else {
        return None;
    };
    let code = exit_code(*status);
    if limits.cpu_time_s > 0
        && (code == 128 + Signal::SIGXCPU as i32 || status.signal() == Some(Signal::SIGXCPU as i32))
    {
        return Some((
            BreachKind::Limit,
            format!("CPU time limit of {} s exceeded", limits.cpu_time_s),
        ));
    }
    if limits.disk_bytes > 0
        && (code == 128 + Signal::SIGXFSZ as i32 || status.signal() == Some(Signal::SIGXFSZ as i32))
    {
        return Some((
            BreachKind::Limit,
            format!(
                "disk limit of {} exceeded: a file grew past it",
                bytes(limits.disk_bytes)
            ),
        ));
    }
    None
}

/// Watches a running tree: peak memory, memory and disk limits the kernel cannot hold for
/// us, and the watchdog (no output and no CPU progress).
struct Watch<'a> {
    pgid: i32,
    cgroup: Option<&'a ActionCgroup>,
    isolation: &'a Isolation,
    work_dir: &'a Path,
    meter: &'a OutputMeter<'a>,
    breach: &'a Breach,
}

impl Watch<'_> {
    /// Samples until `done`; returns the peak resident memory of the tree.
    async fn run(&self, done: &CancellationToken) -> u64 {
        let limits = self.isolation.limits;
        let mut peak = 0;
        // The work dir is walked only when its file system lost more than the limit since
        // the start (one statvfs a second otherwise); then what counts is what was written
        // since the start, so the inputs need no walk up front.
        let started = SystemTime::now();
        let free_at_start = crate::host::free_disk_bytes(self.work_dir);
        let mut last_disk_check = Instant::now();
        let mut last_progress = Instant::now();
        let mut last_cpu = 0u64;
        let mut last_output = 0u64;
        loop {
            let pgid = self.pgid;
            let members = self.cgroup.map(ActionCgroup::members);
            let (rss, cpu, count) = tokio::task::spawn_blocking(move || {
                let pids: Vec<i32> = match members {
                    Some(m) => m,
                    None => group_members(pgid),
                };
                let (rss, cpu) = pids.iter().fold((0u64, 0u64), |(rss, cpu), pid| {
                    let (r, c) = process_usage(*pid);
                    (rss + r, cpu + c)
                });
                (rss, cpu, pids.len())
            })
            .await
            .unwrap_or((0, 0, 0));
            if self.cgroup.is_none()
                && limits.processes > 0
                && count >= limits.processes as usize
                && matches!(self.isolation.sandbox, Sandbox::Bwrap(_))
            {
                self.breach.trip(
                    BreachKind::Limit,
                    format!(
                        "process limit of {} reached: the action tried to start more processes",
                        limits.processes
                    ),
                );
            }
            peak = peak.max(rss);
            if let Some(why) = self.cgroup.and_then(|cg| cg.breach(&limits)) {
                // The kernel refused a fork or killed a process: stop now, not at the end.
                self.breach.trip(BreachKind::Limit, why);
            }
            if self.cgroup.is_none() && limits.memory_bytes > 0 && rss > limits.memory_bytes {
                self.breach.trip(
                    BreachKind::Limit,
                    format!(
                        "memory limit of {} exceeded ({} resident)",
                        bytes(limits.memory_bytes),
                        bytes(rss)
                    ),
                );
            }
            if limits.disk_bytes > 0 && last_disk_check.elapsed() >= DISK_CHECK_EVERY {
                last_disk_check = Instant::now();
                let dir = self.work_dir.to_path_buf();
                let lost = free_at_start.saturating_sub(crate::host::free_disk_bytes(&dir));
                let grown = if lost > limits.disk_bytes {
                    tokio::task::spawn_blocking(move || written_since(&dir, started))
                        .await
                        .unwrap_or(0)
                } else {
                    0
                };
                if grown > limits.disk_bytes {
                    self.breach.trip(
                        BreachKind::Limit,
                        format!(
                            "disk limit of {} exceeded: {} written to the work dir",
                            bytes(limits.disk_bytes),
                            bytes(grown)
                        ),
                    );
                }
            }
            let output = self.meter.seen();
            if cpu != last_cpu || output != last_output {
                last_progress = Instant::now();
                last_cpu = cpu;
                last_output = output;
            } else if let Some(w) = self.isolation.watchdog {
                if last_progress.elapsed() >= w {
                    self.breach.trip(
                        BreachKind::Stuck,
                        format!(
                            "watchdog: no output and no CPU progress for {} s",
                            w.as_secs()
                        ),
                    );
                }
            }
            tokio::select! {
                () = done.cancelled() => return peak,
                () = tokio::time::sleep(MEMORY_SAMPLE_EVERY) => {}
            }
        }
    }
}

/// Resident bytes and CPU ticks (user + system) of one process; zeros when it is gone.
fn process_usage(pid: i32) -> (u64, u64) {
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let mut f = after_comm.split_whitespace().skip(11);
            let utime: u64 = f.next()?.parse().ok()?;
            let stime: u64 = f.next()?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    (resident_bytes(pid), cpu)
}

/// Resident memory of one process (0 when it is gone).
fn resident_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Bytes of disk taken by the files under `dir` written at or after `since` (hard links
/// counted once; inputs, linked or copied before the run, are older).
fn written_since(dir: &Path, since: SystemTime) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(e.path());
            } else if meta.modified().is_ok_and(|m| m >= since)
                && (meta.nlink() < 2 || seen.insert((meta.dev(), meta.ino())))
            {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// The read ends of a running process's output.
enum Pipes<'a, L> {
    Live {
        logs: &'a L,
        stdout: tokio::process::ChildStdout,
        stderr: tokio::process::ChildStderr,
    },
    Merged {
        path: &'a Path,
        reader: tokio::net::unix::pipe::Receiver,
        file: tokio::fs::File,
    },
}

impl<L: LogSink> Pipes<'_, L> {
    /// Reads every pipe to its end (or until `stop`).
    async fn read(
        self,
        stop: &CancellationToken,
        meter: &OutputMeter<'_>,
    ) -> anyhow::Result<Captured> {
        match self {
            Pipes::Live {
                logs,
                stdout,
                stderr,
            } => {
                let (stdout, stderr) = tokio::join!(
                    read_stream(stdout, v1::LogStream::Stdout, logs, stop, meter),
                    read_stream(stderr, v1::LogStream::Stderr, logs, stop, meter),
                );
                Ok(Captured::Streams { stdout, stderr })
            }
            Pipes::Merged { path, reader, file } => copy_to_file(reader, file, path, stop, meter)
                .await
                .map(Captured::Merged),
        }
    }
}

/// Copies a pipe to its end (or until `stop`) into `file`, hashing as it goes. A failed write
/// is reported after the pipe has been drained, so the writer never blocks on a full pipe.
async fn copy_to_file<R: AsyncRead + Unpin>(
    mut pipe: R,
    mut file: tokio::fs::File,
    path: &Path,
    stop: &CancellationToken,
    meter: &OutputMeter<'_>,
) -> anyhow::Result<Digest> {
    let mut hasher = blake3::Hasher::new();
    let mut written = 0u64;
    let mut failed: Option<std::io::Error> = None;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = pipe.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("failed to read the output pipe: {e}");
                    break;
                }
            },
        };
        meter.add(n);
        if failed.is_some() {
            continue;
        }
        match file.write_all(&buf[..n]).await {
            Ok(()) => {
                hasher.update(&buf[..n]);
                written += n as u64;
            }
            Err(e) => failed = Some(e),
        }
    }
    if failed.is_none() {
        failed = file.flush().await.err();
    }
    match failed {
        None => Ok(Digest::from_hasher(&hasher, written)),
        Some(e) => Err(e).with_context(|| format!("failed to write {}", path.display())),
    }
}

/// The exit code a shell would report: the code, or 128 + the signal that ended it.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Finds the program to run: relative to `cwd` when `argv0` contains a '/', else on `path`.
fn resolve_program(argv0: &str, cwd: &Path, path: &str) -> std::io::Result<PathBuf> {
    let not_found =
        || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory");
    if argv0.contains('/') {
        let p = cwd.join(argv0);
        return if std::fs::symlink_metadata(&p).is_ok() {
            Ok(p)
        } else {
            Err(not_found())
        };
    }
    if argv0.is_empty() {
        return Err(not_found());
    }
    let mut found_not_executable = None;
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = Path::new(dir).join(argv0);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() {
                if meta.permissions().mode() & 0o111 != 0 {
                    return Ok(candidate);
                }
                found_not_executable.get_or_insert(candidate);
            }
        }
    }
    match found_not_executable {
        Some(_) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "permission denied",
        )),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "not found in PATH",
        )),
    }
}

/// Reads a pipe to its end (or until `stop`), forwarding chunks and keeping the first 16 MiB.
async fn read_stream<R: AsyncRead + Unpin, L: LogSink>(
    mut pipe: R,
    stream: v1::LogStream,
    logs: &L,
    stop: &CancellationToken,
    meter: &OutputMeter<'_>,
) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut dropped = 0u64;
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = pipe.read(&mut buf) => match r {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!("failed to read {stream:?}: {e}");
                    break;
                }
            },
        };
        meter.add(n);
        let chunk = &buf[..n];
        let room = CAPTURE_BYTES.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..room.min(n)]);
        dropped += n.saturating_sub(room) as u64;
        logs.send(stream, chunk.to_vec()).await;
    }
    if dropped > 0 {
        let name = match stream {
            v1::LogStream::Stderr => "stderr",
            _ => "stdout",
        };
        kept.extend_from_slice(
            format!(
                "\n[archfarm: {dropped} more bytes of {name} were dropped; only the first {} MiB are kept]\n",
                CAPTURE_BYTES / (1024 * 1024)
            )
            .as_bytes(),
        );
    }
    kept
}

/// How a supervised process ended.
pub(crate) enum Ending {
    Exited(ExitStatus),
    TimedOut(ExitStatus),
    Cancelled(ExitStatus),
    /// Stopped by the agent for a broken limit or as stuck; see `Ran::breach`.
    Breached(ExitStatus),
}

/// Waits for the group leader, enforcing the timeout and cancel; when it is gone, kills
/// whatever is left of its process group. Returns how it ended and when.
async fn supervise(
    child: &mut tokio::process::Child,
    pgid: i32,
    timeout: Duration,
    control: &ActionControl,
    breach: &Breach,
    grace: Duration,
) -> anyhow::Result<(Ending, Instant)> {
    let ending = tokio::select! {
        s = child.wait() => Ending::Exited(s.context("failed to wait for the process")?),
        () = tokio::time::sleep(timeout) => Ending::TimedOut(terminate(child, pgid, grace).await?),
        () = control.token.cancelled() => Ending::Cancelled(terminate(child, pgid, grace).await?),
        // A broken limit gets no grace: the tree is killed at once.
        () = breach.tripped() => Ending::Breached(terminate(child, pgid, Duration::ZERO).await?),
    };
    let ended_at = Instant::now();
    // The leader is reaped; leftovers (`sleep 1000 &`) must not outlive the action.
    signal_group(pgid, Signal::SIGKILL);
    Ok((ending, ended_at))
}

/// SIGTERM to the group; SIGKILL once `grace` passed with any member still alive.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: i32,
    grace: Duration,
) -> anyhow::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut status = None;
    while Instant::now() < deadline {
        if status.is_none() {
            status = child.try_wait().context("failed to wait for the process")?;
        }
        if status.is_some() && group_members(pgid).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(pgid, Signal::SIGKILL);
    match status {
        Some(s) => Ok(s),
        None => child.wait().await.context("failed to wait for the process"),
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!("failed to send {signal} to process group {pgid}: {e}"),
    }
}

/// Live (not zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after_comm.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        if pgrp != Some(pgid) || matches!(state, Some("Z") | Some("X")) {
            continue;
        }
        out.push(pid);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cas::memory::MemoryStore;
    use archfarm_proto::tree;

    #[derive(Default)]
    pub(crate) struct Collect(Mutex<Vec<(v1::LogStream, Vec<u8>)>>);

    impl LogSink for Collect {
        async fn send(&self, stream: v1::LogStream, data: Vec<u8>) {
            self.0.lock().expect("lock").push((stream, data));
        }
    }

    impl Collect {
        pub(crate) fn text(&self, stream: v1::LogStream) -> String {
            let chunks = self.0.lock().expect("lock");
            let bytes: Vec<u8> = chunks
                .iter()
                .filter(|(s, _)| *s == stream)
                .flat_map(|(_, d)| d.iter().copied())
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
    }

    pub(crate) struct Fixture {
        _dir: tempfile::TempDir,
        pub settings: ExecutorSettings,
        pub store: MemoryStore,
    }

    impl Fixture {
        /// Executes `a` as agent `agent-1`, streaming into `logs`, controlled by `control`.
        pub(crate) async fn run(
            &self,
            a: &v1::Assign,
            logs: &Collect,
            control: &ActionControl,
        ) -> v1::ExecutionResult {
            execute(&self.settings, &self.store, logs, a, "agent-1", control).await
        }
    }

    pub(crate) fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = ExecutorSettings {
            work_root: dir.path().join("work"),
            cache: BlobCache::open(&dir.path().join("cache"), 1 << 30).expect("cache"),
            kill_grace: Duration::from_secs(1),
            native: crate::host::native_platform(),
            emulators: HashMap::new(),
            hostname: "testhost".into(),
            executed: Arc::default(),
            isolation: Arc::new(Isolation::unconfined()),
        };
        Fixture {
            _dir: dir,
            settings,
            store: MemoryStore::default(),
        }
    }

    pub(crate) fn assign(argv: &[&str], timeout_ms: u64) -> v1::Assign {
        v1::Assign {
            action_id: "job-1/linux/amd64".into(),
            fence: 7,
            action: Some(v1::Action {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                platform: crate::host::native_platform()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                timeout_ms,
                ..Default::default()
            }),
            emulated: false,
            attempt: 1,
        }
    }

    pub(crate) fn blob(store: &MemoryStore, d: Option<&v1::Digest>) -> String {
        let d = Digest::from_proto_required(d).expect("digest");
        let blobs = store.blobs.lock().expect("lock");
        String::from_utf8_lossy(blobs.get(&d).expect("blob uploaded")).into_owned()
    }

    pub(crate) fn outcome(r: &v1::ExecutionResult) -> v1::ExecutionOutcome {
        v1::ExecutionOutcome::try_from(r.outcome).expect("outcome")
    }

    #[tokio::test]
    async fn captures_exit_code_and_both_streams() {
        let f = fixture();
        let logs = Collect::default();
        let a = assign(
            &["sh", "-c", "echo out; echo err >&2; sleep 0.3; exit 3"],
            10_000,
        );
        let r = f.run(&a, &logs, &ActionControl::default()).await;
        assert_eq!(outcome(&r), v1::ExecutionOutcome::Exited, "{r:?}");
        assert_eq!(r.exit_code, 3);
        assert_eq!(blob(&f.store, r.stdout_digest.as_ref()), "out\n");
        assert_eq!(blob(&f.store, r.stderr_digest.as_ref()), "err\n");
        assert_eq!(logs.text(v1::LogStream::Stdout), "out\n");
        assert_eq!(logs.text(v1::LogStream::Stderr), "err\n");
        assert_eq!(
            (r.agent_id.as_str(), r.agent_hostname.as_str()),
            ("agent-1", "testhost")
        );
        assert!(r.peak_memory_bytes > 0, "{r:?}");
        assert!(r.duration_ms >= 300, "{r:?}");
        assert!(!f
            .settings
            .work_root
            .join(work_dir_name(&a.action_id, 7))
            .exists());
    }

    #[tokio::test]
    async fn a_signal_is_128_plus_its_number() {
        let f = fixture();
        let a = assign(&["sh", "-c", "kill -9 $$"], 10_000);
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 137)
        );
    }

    #[tokio::test]
    async fn timeout_kills_a_child_that_ignores_sigterm() {
        let f = fixture();
        let a = assign(&["sh", "-c", "trap '' TERM; echo $$; sleep 100"], 300);
        let t = Instant::now();
        let logs = Collect::default();
        let r = f.run(&a, &logs, &ActionControl::default()).await;
        assert_eq!(outcome(&r), v1::ExecutionOutcome::TimedOut, "{r:?}");
        assert_eq!(r.exit_code, -1);
        // 300 ms timeout + 1 s grace, plus slack for a busy machine.
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let pgid: i32 = logs
            .text(v1::LogStream::Stdout)
            .trim()
            .parse()
            .expect("pid");
        assert!(group_members(pgid).is_empty());
    }

    #[tokio::test]
    async fn cancel_kills_the_whole_tree() {
        let f = fixture();
        let a = assign(&["sh", "-c", "echo $$; sleep 100 & sleep 100"], 60_000);
        let logs = Collect::default();
        let control = ActionControl::default();
        let watcher = async {
            let pgid = loop {
                if let Ok(p) = logs.text(v1::LogStream::Stdout).trim().parse::<i32>() {
                    break p;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            // Both sleeps are running in the group.
            while group_members(pgid).len() < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            control.cancel("test");
            pgid
        };
        let t = Instant::now();
        let (r, pgid) = tokio::join!(f.run(&a, &logs, &control), watcher);
        assert_eq!(outcome(&r), v1::ExecutionOutcome::Cancelled, "{r:?}");
        assert!(r.message.contains("test"), "{}", r.message);
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(group_members(pgid).is_empty(), "{:?}", group_members(pgid));
    }

    #[tokio::test]
    async fn an_abandoned_action_is_an_infra_error() {
        let f = fixture();
        let a = assign(&["sh", "-c", "sleep 100"], 60_000);
        let control = ActionControl::default();
        let stopper = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            control.abandon("agent stopping");
        };
        let logs = Collect::default();
        let (r, ()) = tokio::join!(f.run(&a, &logs, &control), stopper);
        assert_eq!(outcome(&r), v1::ExecutionOutcome::InfraError, "{r:?}");
        assert!(r.message.contains("agent stopping"), "{}", r.message);
    }

    #[tokio::test]
    async fn leftover_background_children_are_killed_after_a_normal_exit() {
        let f = fixture();
        let a = assign(&["sh", "-c", "echo $$; sleep 1000 & echo hi"], 60_000);
        let logs = Collect::default();
        let t = Instant::now();
        let r = f.run(&a, &logs, &ActionControl::default()).await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 0)
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let out = blob(&f.store, r.stdout_digest.as_ref());
        let pgid: i32 = out.lines().next().expect("pid").parse().expect("pid");
        assert!(out.ends_with("hi\n"), "{out}");
        assert!(group_members(pgid).is_empty());
    }

    #[tokio::test]
    async fn a_missing_program_exits_127() {
        let f = fixture();
        let a = assign(&["archfarm-no-such-program"], 10_000);
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 127)
        );
        let err = blob(&f.store, r.stderr_digest.as_ref());
        assert!(
            err.starts_with("failed to start archfarm-no-such-program:"),
            "{err}"
        );
        let a = assign(&["./missing.sh"], 10_000);
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(r.exit_code, 127);
    }

    #[tokio::test]
    async fn runs_inputs_in_a_clean_environment() {
        let mut f = fixture();
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("sub")).expect("mkdir");
        std::fs::write(
            src.path().join("sub/run.sh"),
            "#!/bin/sh\necho \"$0|$1|$(pwd)|$HOME|$TMPDIR|$FOO|${SECRET_OF_AGENT:-unset}\"\n",
        )
        .expect("write");
        std::fs::set_permissions(
            src.path().join("sub/run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        let t = tree::build_local_tree(src.path()).expect("tree");
        for d in t.all_digests() {
            f.store
                .blobs
                .lock()
                .expect("lock")
                .insert(d, t.read_blob(&d).expect("blob"));
        }
        let mut a = assign(&["./run.sh", "arg"], 10_000);
        if let Some(action) = a.action.as_mut() {
            action.input_root = Some(t.root.to_proto());
            action.working_directory = "sub".into();
            action.env = vec![v1::EnvVar {
                name: "FOO".into(),
                value: "bar".into(),
            }];
        }
        let work = f
            .settings
            .work_root
            .join(work_dir_name(&a.action_id, a.fence));
        let w = work.display();
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 0),
            "{r:?}"
        );
        assert_eq!(
            blob(&f.store, r.stdout_digest.as_ref()),
            // A script's $0 is the path the kernel was given, i.e. the resolved one.
            format!("{w}/sub/./run.sh|arg|{w}/sub|{w}|{w}/.tmp|bar|unset\n")
        );

        // Emulated: the wrapper gets the resolved program path.
        let foreign: Platform =
            if f.settings.native.as_ref().map(Platform::arch) == Some("arm64") {
                "linux/s390x"
            } else {
                "linux/arm64"
            }
            .parse()
            .expect("platform");
        f.settings
            .emulators
            .insert(foreign.clone(), PathBuf::from("/usr/bin/env"));
        if let Some(action) = a.action.as_mut() {
            action.platform = foreign.to_string();
        }
        a.emulated = true;
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 0),
            "{r:?}"
        );
        assert!(r.emulated);
        assert_eq!(r.platform, foreign.to_string());
        assert!(
            blob(&f.store, r.stdout_digest.as_ref()).starts_with(&format!("{w}/sub/./run.sh|arg|"))
        );

        // A platform the agent does not serve is the farm's problem, not the command's.
        a.emulated = false;
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(outcome(&r), v1::ExecutionOutcome::InfraError, "{r:?}");
    }

    #[tokio::test]
    async fn declared_outputs_and_large_logs_are_uploaded() {
        let f = fixture();
        let script = concat!(
            "mkdir -p out/sub && echo one > out/sub/a && ln -s sub/a out/link && ",
            "head -c 6000000 /dev/zero > big.bin && printf '#!/bin/sh\\n' > tool && ",
            "chmod +x tool && ln -s /etc/passwd leak && ",
            "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo warn >&2; exit 2"
        );
        let mut a = assign(&["sh", "-c", script], 30_000);
        if let Some(action) = a.action.as_mut() {
            action.output_paths = ["big.bin", "leak", "missing", "out", "tool", "x/../y"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        }
        let before = f.settings.executed.load(Ordering::Relaxed);
        let logs = Collect::default();
        let r = f.run(&a, &logs, &ActionControl::default()).await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 2),
            "{r:?}"
        );
        assert_eq!(f.settings.executed.load(Ordering::Relaxed), before + 1);

        let files: Vec<(&str, bool)> = r
            .output_files
            .iter()
            .map(|o| (o.path.as_str(), o.executable))
            .collect();
        assert_eq!(files, vec![("big.bin", false), ("tool", true)]);
        let big = Digest::from_proto_required(r.output_files[0].digest.as_ref()).expect("digest");
        assert_eq!(big, Digest::of(&vec![0u8; 6_000_000]));
        assert_eq!(r.output_directories.len(), 1);
        assert_eq!(r.output_directories[0].path, "out");

        // The tree is complete in the store: its root, the nested directory, the file.
        let root = Digest::from_proto_required(r.output_directories[0].root.as_ref())
            .expect("root digest");
        let blobs = f.store.blobs.lock().expect("lock").clone();
        let (dirs, file_digests) =
            tree::walk_tree(root, |d| blobs.get(d).cloned()).expect("output tree in the store");
        assert_eq!(dirs.len(), 2);
        assert!(file_digests.iter().all(|d| blobs.contains_key(d)));
        assert!(file_digests.contains(&Digest::of(b"one\n")));

        // Large blobs were streamed: the output file and stdout.
        let streamed: Vec<Digest> = f
            .store
            .writes
            .lock()
            .expect("lock")
            .iter()
            .map(|(d, _)| *d)
            .collect();
        let stdout = Digest::from_proto_required(r.stdout_digest.as_ref()).expect("stdout");
        assert_eq!(stdout.size_bytes(), 5_000_001);
        assert!(
            streamed.contains(&big) && streamed.contains(&stdout),
            "{streamed:?}"
        );

        // Skipped declarations are explained on stderr, live and in the blob.
        let err = blob(&f.store, r.stderr_digest.as_ref());
        assert!(err.starts_with("warn\n"), "{err}");
        assert!(err.contains("\"leak\" skipped") && err.contains("outside the work directory"));
        assert!(err.contains("\"x/../y\" skipped"), "{err}");
        assert!(!err.contains("missing"), "{err}");
        assert!(logs
            .text(v1::LogStream::Stderr)
            .contains("\"leak\" skipped"));
    }

    #[tokio::test]
    async fn a_failed_upload_is_an_infra_error() {
        let mut f = fixture();
        f.store.refuse_uploads = true;
        let mut a = assign(&["sh", "-c", "echo data > out"], 10_000);
        if let Some(action) = a.action.as_mut() {
            action.output_paths = vec!["out".into()];
        }
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(outcome(&r), v1::ExecutionOutcome::InfraError, "{r:?}");
        assert!(r.message.contains("failed to upload"), "{}", r.message);
        assert!(r.output_files.is_empty() && r.stdout_digest.is_none());
        assert_eq!(f.settings.executed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn only_spawned_processes_count_as_executed() {
        let f = fixture();
        let mut a = assign(&["true"], 10_000);
        if let Some(action) = a.action.as_mut() {
            // A platform the farm has no name for: refused before anything is spawned.
            action.platform = "linux/mips".into();
        }
        let r = f
            .run(&a, &Collect::default(), &ActionControl::default())
            .await;
        assert_eq!(outcome(&r), v1::ExecutionOutcome::InfraError, "{r:?}");
        let r = execute(
            &f.settings,
            &f.store,
            &Collect::default(),
            &assign(&["archfarm-no-such-program"], 10_000),
            "a",
            &ActionControl::default(),
        )
        .await;
        assert_eq!(r.exit_code, 127);
        assert_eq!(f.settings.executed.load(Ordering::Relaxed), 0);
        execute(
            &f.settings,
            &f.store,
            &Collect::default(),
            &assign(&["true"], 10_000),
            "a",
            &ActionControl::default(),
        )
        .await;
        assert_eq!(f.settings.executed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn work_dir_names_are_one_safe_component() {
        assert_eq!(
            work_dir_name("job-1/linux/arm/v7", 3),
            "job-1_linux_arm_v7-3"
        );
        assert_eq!(work_dir_name("../..", 1), "_..-1");
        assert!(!work_dir_name("..", 1).contains('/'));
    }
}
