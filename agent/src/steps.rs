//! Runs an action made of steps (e.g. one Go test binary per package): each step in its own
//! directory of the work dir, one after the other and every one even after failures, each
//! under its own watchdog, while the action's timeout and cancel still stop the sequence. A
//! step's stdout and stderr go to one file that becomes its output blob; only one progress
//! line per finished step is streamed, since test output can run to megabytes.
use crate::cas::BlobSource;
use crate::executor::{
    exit_code, is_relative_inside, run_process, ActionControl, Capture, Captured, Ending,
    ExecutorSettings, Finished, LogSink, Prepared, ProcessRun,
};
use crate::isolation::BreachKind;
use anyhow::Context;
use archfarm_proto::{v1, Digest};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

/// Directory of the work dir that holds the steps' captured output. '+' is not allowed in a
/// step name, so it never meets a step's directory.
const OUTPUT_DIR: &str = ".archfarm+step-output";

/// Why the sequence stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The action's own timeout passed.
    TimedOut,
    /// The action was cancelled or abandoned (see `ActionControl`).
    Stopped,
}

/// What running (or refusing) one step left.
struct StepRun {
    exit_code: i32,
    duration: Duration,
    timed_out: bool,
    output: Option<(Digest, BlobSource)>,
    message: String,
    /// What the progress line says after `step <name>: `.
    progress: String,
    /// Set when the action stopped while this step ran.
    stop: Option<Stop>,
    /// Whether a process was spawned.
    spawned: bool,
    peak_memory_bytes: u64,
}

impl StepRun {
    /// A step that was not started, with the reason.
    fn not_run(message: String) -> Self {
        StepRun {
            exit_code: -1,
            duration: Duration::ZERO,
            timed_out: false,
            output: None,
            progress: message.clone(),
            message,
            stop: None,
            spawned: false,
            peak_memory_bytes: 0,
        }
    }
}

/// Runs every step of `assign`'s action in order in the prepared work dir. The action's
/// `timeout` counts from the first step's start. `Err` means INFRA_ERROR (a step's output
/// could not be kept, a process could not be spawned for a reason that is not the step's).
pub(crate) async fn run_steps<L: LogSink>(
    settings: &ExecutorSettings,
    logs: &L,
    assign: &v1::Assign,
    prepared: &Prepared,
    timeout: Duration,
    control: &ActionControl,
) -> anyhow::Result<Finished> {
    let steps = assign
        .action
        .as_ref()
        .map(|a| a.steps.as_slice())
        .unwrap_or_default();
    let output_dir = prepared.work_dir.join(OUTPUT_DIR);
    tokio::fs::create_dir_all(&output_dir)
        .await
        .with_context(|| format!("failed to create {}", output_dir.display()))?;

    let started = SystemTime::now();
    let started_at = Instant::now();
    let deadline = started_at + timeout;
    let mut progress = Vec::new();
    let mut results = Vec::with_capacity(steps.len());
    let mut blobs = Vec::new();
    let mut peak_memory_bytes = 0;
    let mut spawned = false;
    let mut stopped: Option<Stop> = None;
    let mut finished_steps = 0;
    for (index, step) in steps.iter().enumerate() {
        if stopped.is_none() {
            if control.is_stopped() {
                stopped = Some(Stop::Stopped);
            } else if Instant::now() >= deadline {
                stopped = Some(Stop::TimedOut);
            }
        }
        let run = match stopped {
            Some(stop) => StepRun::not_run(format!(
                "not run: {}",
                describe_stop(stop, control, timeout)
            )),
            None => {
                let output_file = output_dir.join(format!("{index}.out"));
                let run = run_step(
                    settings,
                    prepared,
                    step,
                    &output_file,
                    deadline,
                    timeout,
                    control,
                )
                .await?;
                stopped = run.stop;
                if run.stop.is_none() {
                    finished_steps += 1;
                }
                run
            }
        };
        spawned |= run.spawned;
        peak_memory_bytes = peak_memory_bytes.max(run.peak_memory_bytes);
        let line = format!("step {}: {}\n", step.name, run.progress);
        logs.send(v1::LogStream::Stdout, line.clone().into_bytes())
            .await;
        progress.extend_from_slice(line.as_bytes());
        let output = run.output.map(|(digest, source)| {
            blobs.push((digest, source));
            digest.to_proto()
        });
        results.push(v1::StepResult {
            name: step.name.clone(),
            exit_code: run.exit_code,
            duration_ms: run.duration.as_millis() as u64,
            timed_out: run.timed_out,
            output,
            // Filled in with the result's.
            agent_id: String::new(),
            emulated: assign.emulated,
            cached: false,
            cache_origin: None,
            message: run.message,
        });
    }
    if spawned {
        // The action counts once, however many steps it spawned.
        settings.executed.fetch_add(1, Ordering::Relaxed);
    }

    let (outcome, exit_code, message) = match stopped {
        Some(Stop::TimedOut) => (
            v1::ExecutionOutcome::TimedOut,
            -1,
            format!(
                "timed out after {} ms with {finished_steps} of {} steps finished",
                timeout.as_millis(),
                steps.len()
            ),
        ),
        Some(Stop::Stopped) => (control.stopped_outcome(), -1, control.stopped_message("")),
        None => {
            let passed = results.iter().all(|r| r.exit_code == 0 && !r.timed_out);
            (
                v1::ExecutionOutcome::Exited,
                i32::from(!passed),
                String::new(),
            )
        }
    };
    Ok(Finished {
        outcome,
        exit_code,
        message,
        stdout: progress,
        stderr: Vec::new(),
        started,
        duration: started_at.elapsed(),
        peak_memory_bytes,
        collect_outputs: outcome != v1::ExecutionOutcome::InfraError,
        step_results: results,
        step_blobs: blobs,
    })
}

/// Runs one step in `work_dir/<name>/<working_directory>` with its output in `output_file`,
/// until it exits, its watchdog fires, the action's `deadline` passes or the action is
/// stopped. A step that cannot be started is a result (exit code 127, 126 or -1), not an
/// error.
async fn run_step(
    settings: &ExecutorSettings,
    prepared: &Prepared,
    step: &v1::Step,
    output_file: &Path,
    deadline: Instant,
    action_timeout: Duration,
    control: &ActionControl,
) -> anyhow::Result<StepRun> {
    if !is_step_name(&step.name) {
        return Ok(StepRun::not_run(format!(
            "not run: step name {:?} is not one path component",
            step.name
        )));
    }
    if !is_relative_inside(Path::new(&step.working_directory)) {
        return Ok(StepRun::not_run(format!(
            "not run: working directory {:?} must be relative and free of ..",
            step.working_directory
        )));
    }
    if step.argv.is_empty() {
        return Ok(StepRun::not_run(
            "not run: the step has an empty argv".into(),
        ));
    }
    let cwd = prepared
        .work_dir
        .join(&step.name)
        .join(&step.working_directory);
    if let Err(e) = tokio::fs::create_dir_all(&cwd).await {
        return Ok(StepRun::not_run(format!(
            "not run: failed to create {}: {e}",
            cwd.display()
        )));
    }
    settings
        .isolation
        .sandbox
        .own_path(&prepared.work_dir, &cwd)
        .context("failed to prepare the sandbox")?;

    let remaining = deadline.saturating_duration_since(Instant::now());
    let watchdog =
        Some(Duration::from_millis(step.timeout_ms)).filter(|w| !w.is_zero() && *w < remaining);
    let program = prepared.program(&step.argv, &cwd);
    // No live output: `Capture::Merged` never touches the sink.
    let capture = Capture::<NoLogs>::Merged(output_file);
    let limit = watchdog.unwrap_or(remaining);
    let ran = match run_process(settings, &program, capture, limit, control).await? {
        ProcessRun::NotStarted { exit_code, line } => {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            return Ok(StepRun {
                exit_code,
                output: Some((Digest::of(&line), BlobSource::Memory(line.into()))),
                progress: format!("exit {exit_code} ({text})"),
                message: text,
                ..StepRun::not_run(String::new())
            });
        }
        ProcessRun::Ran(ran) => ran,
    };
    let output = match ran.captured {
        Captured::Merged(digest) => (digest, BlobSource::File(output_file.to_path_buf())),
        Captured::Streams { .. } => {
            anyhow::bail!("the step's output was captured in the wrong mode")
        }
    };
    let took = seconds(ran.duration);
    let mut run = StepRun {
        exit_code: -1,
        duration: ran.duration,
        timed_out: false,
        output: Some(output),
        message: String::new(),
        progress: String::new(),
        stop: None,
        spawned: true,
        peak_memory_bytes: ran.peak_memory_bytes,
    };
    if let Some((kind, why)) = ran.breach {
        match kind {
            BreachKind::Limit => {
                let code = match ran.ending {
                    Ending::Exited(status) | Ending::Breached(status) => exit_code(status),
                    Ending::TimedOut(status) | Ending::Cancelled(status) => exit_code(status),
                };
                run.exit_code = if code == 0 { -1 } else { code };
                run.message = format!("stopped: {why}");
                run.progress = format!("stopped after {took} s: {why}");
            }
            BreachKind::Stuck => {
                run.timed_out = true;
                run.message = format!("{why} (hang)");
                run.progress = format!("killed after {took} s: {why} (hang)");
            }
        }
        return Ok(run);
    }
    match (ran.ending, watchdog) {
        (Ending::Exited(status), _) => {
            run.exit_code = exit_code(status);
            run.progress = format!(
                "exit {} in {:.2} s",
                run.exit_code,
                ran.duration.as_secs_f64()
            );
        }
        (Ending::TimedOut(_), Some(watchdog)) => {
            let after = seconds(watchdog);
            run.timed_out = true;
            run.message = format!("watchdog: no exit after {after} s (hang)");
            run.progress = format!("watchdog killed it after {after} s (hang)");
        }
        (Ending::TimedOut(_), None) => {
            let why = describe_stop(Stop::TimedOut, control, action_timeout);
            run.stop = Some(Stop::TimedOut);
            run.message = format!("killed: {why}");
            run.progress = format!("killed after {took} s: {why}");
        }
        (Ending::Cancelled(_), _) | (Ending::Breached(_), _) => {
            let why = describe_stop(Stop::Stopped, control, action_timeout);
            run.stop = Some(Stop::Stopped);
            run.message = format!("killed: {why}");
            run.progress = format!("killed after {took} s: {why}");
        }
    }
    Ok(run)
}

/// "action timed out after 500 ms", "action cancelled: <reason>", "action stopped: <reason>".
fn describe_stop(stop: Stop, control: &ActionControl, timeout: Duration) -> String {
    match stop {
        Stop::TimedOut => format!("action timed out after {} ms", timeout.as_millis()),
        Stop::Stopped => format!("action {}", control.stopped_message("")),
    }
}

/// Whether `name` is one path component that is a directory of its own.
fn is_step_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Seconds for humans: "60", "0.5", "1.25".
fn seconds(d: Duration) -> String {
    let s = format!("{:.2}", d.as_secs_f64());
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The sink type of a capture that streams nothing.
struct NoLogs;

impl LogSink for NoLogs {
    async fn send(&self, _stream: v1::LogStream, _data: Vec<u8>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::group_members;
    use crate::executor::tests::{blob, fixture, outcome, Collect, Fixture};
    use archfarm_proto::tree;
    use std::os::unix::fs::PermissionsExt;

    fn step(name: &str, argv: &[&str], timeout_ms: u64) -> v1::Step {
        v1::Step {
            name: name.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms,
            ..Default::default()
        }
    }

    fn assign_steps(steps: Vec<v1::Step>, timeout_ms: u64) -> v1::Assign {
        let mut a = crate::executor::tests::assign(&[], timeout_ms);
        if let Some(action) = a.action.as_mut() {
            action.steps = steps;
        }
        a
    }

    async fn run(f: &Fixture, a: &v1::Assign, logs: &Collect) -> v1::ExecutionResult {
        f.run(a, logs, &ActionControl::default()).await
    }

    fn step_output(f: &Fixture, r: &v1::StepResult) -> String {
        blob(&f.store, r.output.as_ref())
    }

    #[tokio::test]
    async fn every_step_runs_even_after_a_failure() {
        let f = fixture();
        let a = assign_steps(
            vec![
                step("one", &["sh", "-c", "echo first"], 10_000),
                step("two", &["sh", "-c", "echo second; exit 3"], 10_000),
                step("three", &["sh", "-c", "echo third"], 0),
            ],
            60_000,
        );
        let logs = Collect::default();
        let r = run(&f, &a, &logs).await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 1),
            "{r:?}"
        );
        let got: Vec<(&str, i32, bool)> = r
            .step_results
            .iter()
            .map(|s| (s.name.as_str(), s.exit_code, s.timed_out))
            .collect();
        assert_eq!(
            got,
            vec![("one", 0, false), ("two", 3, false), ("three", 0, false)]
        );
        let outputs: Vec<String> = r.step_results.iter().map(|s| step_output(&f, s)).collect();
        assert_eq!(outputs, vec!["first\n", "second\n", "third\n"]);
        assert!(r
            .step_results
            .iter()
            .all(|s| !s.emulated && s.message.is_empty() && s.agent_id == "agent-1"));
        assert_eq!(f.settings.executed.load(Ordering::Relaxed), 1);

        // Only progress lines are streamed, and they are the action's stdout.
        let live = logs.text(v1::LogStream::Stdout);
        let lines: Vec<&str> = live.lines().collect();
        assert_eq!(lines.len(), 3, "{live}");
        assert!(lines[0].starts_with("step one: exit 0 in "), "{live}");
        assert!(lines[1].starts_with("step two: exit 3 in "), "{live}");
        assert!(lines[2].ends_with(" s"), "{live}");
        assert!(!live.contains("second"), "{live}");
        assert_eq!(blob(&f.store, r.stdout_digest.as_ref()), live);
        assert_eq!(blob(&f.store, r.stderr_digest.as_ref()), "");

        let a = assign_steps(
            vec![step("ok", &["true"], 0), step("ok2", &["true"], 0)],
            60_000,
        );
        let r = run(&f, &a, &Collect::default()).await;
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 0),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_hanging_step_is_killed_by_its_watchdog_and_the_next_still_runs() {
        let f = fixture();
        let a = assign_steps(
            vec![
                step(
                    "hang",
                    &["sh", "-c", "trap '' TERM; echo $$; sleep 100"],
                    500,
                ),
                step("after", &["sh", "-c", "echo after"], 10_000),
            ],
            60_000,
        );
        let logs = Collect::default();
        let t = Instant::now();
        let r = run(&f, &a, &logs).await;
        // 500 ms watchdog + 1 s grace, plus slack for a busy machine.
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 1),
            "{r:?}"
        );
        let hang = &r.step_results[0];
        assert!(hang.timed_out, "{hang:?}");
        assert_eq!(hang.exit_code, -1);
        assert_eq!(hang.message, "watchdog: no exit after 0.5 s (hang)");
        assert!(hang.duration_ms >= 500, "{hang:?}");
        let pgid: i32 = step_output(&f, hang).trim().parse().expect("pid");
        assert!(group_members(pgid).is_empty(), "{:?}", group_members(pgid));
        let after = &r.step_results[1];
        assert_eq!((after.exit_code, after.timed_out), (0, false));
        assert_eq!(step_output(&f, after), "after\n");
        assert!(logs.text(v1::LogStream::Stdout).starts_with(
            "step hang: watchdog killed it after 0.5 s (hang)\nstep after: exit 0 in "
        ));
    }

    #[tokio::test]
    async fn a_pipe_held_by_an_escaped_process_does_not_hold_up_the_step() {
        let f = fixture();
        let a = assign_steps(
            vec![step(
                "escape",
                &["sh", "-c", "setsid sleep 30 & echo $!"],
                10_000,
            )],
            60_000,
        );
        let t = Instant::now();
        let r = run(&f, &a, &Collect::default()).await;
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        let s = &r.step_results[0];
        assert_eq!((s.exit_code, s.timed_out), (0, false), "{r:?}");
        let pid: i32 = step_output(&f, s).trim().parse().expect("pid");
        // It left the group, so only the test can end it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    #[tokio::test]
    async fn a_step_output_holds_stdout_and_stderr_in_order() {
        let f = fixture();
        let a = assign_steps(
            vec![step(
                "both",
                &[
                    "sh",
                    "-c",
                    "echo out; echo err >&2; echo out2; echo err2 >&2",
                ],
                0,
            )],
            60_000,
        );
        let r = run(&f, &a, &Collect::default()).await;
        let s = &r.step_results[0];
        assert_eq!(s.exit_code, 0, "{r:?}");
        assert_eq!(step_output(&f, s), "out\nerr\nout2\nerr2\n");
    }

    #[tokio::test]
    async fn steps_run_in_their_own_directories() {
        let f = fixture();
        let src = tempfile::tempdir().expect("tempdir");
        for d in ["pkg", "other/sub"] {
            std::fs::create_dir_all(src.path().join(d)).expect("mkdir");
        }
        let script = src.path().join("pkg/run.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$(pwd)|$1|$FOO\"\ncat data.txt\n",
        )
        .expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(src.path().join("pkg/data.txt"), "testdata\n").expect("write");
        let t = tree::build_local_tree(src.path()).expect("tree");
        for d in t.all_digests() {
            f.store
                .blobs
                .lock()
                .expect("lock")
                .insert(d, t.read_blob(&d).expect("blob"));
        }
        let mut inner = step("other", &["pwd"], 0);
        inner.working_directory = "sub".into();
        let mut escape = step("bad-dir", &["pwd"], 0);
        escape.working_directory = "../pkg".into();
        let mut a = assign_steps(
            vec![
                step("pkg", &["./run.sh", "arg"], 10_000),
                inner,
                escape,
                step("..", &["pwd"], 0),
                step("missing", &["./no-such-binary"], 0),
                step("fresh", &["pwd"], 0),
            ],
            60_000,
        );
        if let Some(action) = a.action.as_mut() {
            action.input_root = Some(t.root.to_proto());
            action.env = vec![v1::EnvVar {
                name: "FOO".into(),
                value: "bar".into(),
            }];
        }
        let r = run(&f, &a, &Collect::default()).await;
        let w = f
            .settings
            .work_root
            .join(crate::executor::work_dir_name(&a.action_id, a.fence));
        let w = w.display();
        let s = &r.step_results;
        assert_eq!(s.len(), 6, "{r:?}");
        assert_eq!(s[0].exit_code, 0, "{:?}", s[0]);
        assert_eq!(
            step_output(&f, &s[0]),
            format!("{w}/pkg|arg|bar\ntestdata\n")
        );
        assert_eq!(step_output(&f, &s[1]), format!("{w}/other/sub\n"));
        assert_eq!(s[2].exit_code, -1);
        assert!(s[2].message.contains("free of .."), "{:?}", s[2]);
        assert!(s[2].output.is_none());
        assert_eq!(s[3].exit_code, -1);
        assert!(s[3].message.contains("one path component"), "{:?}", s[3]);
        assert_eq!(s[4].exit_code, 127);
        assert!(
            step_output(&f, &s[4]).starts_with("failed to start ./no-such-binary:"),
            "{:?}",
            s[4]
        );
        // A step without an input tree runs in an empty directory of its own.
        assert_eq!(step_output(&f, &s[5]), format!("{w}/fresh\n"));
        assert_eq!(
            (outcome(&r), r.exit_code),
            (v1::ExecutionOutcome::Exited, 1)
        );
    }

    #[tokio::test]
    async fn emulated_steps_run_under_the_wrapper() {
        let mut f = fixture();
        let foreign: archfarm_proto::Platform = if f
            .settings
            .native
            .as_ref()
            .map(archfarm_proto::Platform::arch)
            == Some("arm64")
        {
            "linux/s390x"
        } else {
            "linux/arm64"
        }
        .parse()
        .expect("platform");
        // A wrapper that says it ran, then runs the program.
        let wrapper = f.settings.work_root.with_file_name("wrapper.sh");
        std::fs::write(&wrapper, "#!/bin/sh\necho wrapped\nexec \"$@\"\n").expect("write");
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        f.settings.emulators.insert(foreign.clone(), wrapper);
        let mut a = assign_steps(vec![step("pkg", &["sh", "-c", "echo hi"], 0)], 60_000);
        if let Some(action) = a.action.as_mut() {
            action.platform = foreign.to_string();
        }
        a.emulated = true;
        let r = run(&f, &a, &Collect::default()).await;
        assert!(r.emulated, "{r:?}");
        let s = &r.step_results[0];
        assert!(s.emulated && s.exit_code == 0, "{s:?}");
        assert_eq!(step_output(&f, s), "wrapped\nhi\n");
    }

    #[tokio::test]
    async fn cancel_kills_the_running_step_and_skips_the_rest() {
        let f = fixture();
        let a = assign_steps(
            vec![
                step("first", &["true"], 0),
                step(
                    "long",
                    &["sh", "-c", "echo $$; sleep 100 & sleep 100"],
                    60_000,
                ),
                step("never", &["sh", "-c", "echo never"], 0),
                step("nor", &["true"], 0),
            ],
            60_000,
        );
        let control = ActionControl::default();
        let logs = Collect::default();
        let canceller = async {
            // Cancel once the second step started.
            while !logs.text(v1::LogStream::Stdout).contains("step first:") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            control.cancel("test");
        };
        let t = Instant::now();
        let (r, ()) = tokio::join!(f.run(&a, &logs, &control), canceller);
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(outcome(&r), v1::ExecutionOutcome::Cancelled, "{r:?}");
        assert_eq!(r.exit_code, -1);
        assert!(r.message.contains("test"), "{}", r.message);
        let s = &r.step_results;
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].exit_code, 0);
        assert_eq!(s[1].exit_code, -1);
        assert_eq!(s[1].message, "killed: action cancelled: test");
        let pgid: i32 = step_output(&f, &s[1]).trim().parse().expect("pid");
        assert!(group_members(pgid).is_empty(), "{:?}", group_members(pgid));
        for later in &s[2..] {
            assert_eq!(
                (
                    later.exit_code,
                    later.message.as_str(),
                    later.output.is_none()
                ),
                (-1, "not run: action cancelled: test", true)
            );
        }
        assert!(logs
            .text(v1::LogStream::Stdout)
            .contains("step never: not run: action cancelled: test\n"));
    }

    #[tokio::test]
    async fn the_action_timeout_stops_the_sequence() {
        let f = fixture();
        let a = assign_steps(
            vec![
                step("slow", &["sleep", "100"], 0),
                step("next", &["true"], 0),
            ],
            500,
        );
        let t = Instant::now();
        let r = run(&f, &a, &Collect::default()).await;
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
        assert_eq!(outcome(&r), v1::ExecutionOutcome::TimedOut, "{r:?}");
        assert_eq!(
            r.message,
            "timed out after 500 ms with 0 of 2 steps finished"
        );
        let s = &r.step_results;
        assert_eq!(
            (s[0].exit_code, s[0].timed_out, s[0].message.as_str()),
            (-1, false, "killed: action timed out after 500 ms")
        );
        assert_eq!(s[1].message, "not run: action timed out after 500 ms");
    }

    #[test]
    fn seconds_read_naturally() {
        assert_eq!(seconds(Duration::from_secs(60)), "60");
        assert_eq!(seconds(Duration::from_millis(500)), "0.5");
        assert_eq!(seconds(Duration::from_millis(1234)), "1.23");
        assert_eq!(seconds(Duration::ZERO), "0");
    }
}
