//! `cargo xtask chaos`: a real farm (a coordinator and several agents on loopback, real TLS,
//! in a temporary directory) runs one job of many tiny actions while a random agent is
//! SIGKILLed and restarted every few seconds (seeded) and the coordinator once, mid-run; then
//! every action must have ended exactly once, succeeded, and printed what it should have.
use crate::bench::private::PrivateCoordinator;
use crate::demo::{build_binaries, spawn_logged, stop_child};
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::farm::blobs::{batch_read, BATCH_MAX_BLOBS};
use archfarm_client::farm::display::{format_duration, is_final};
use archfarm_client::farm::job::get_job;
use archfarm_client::farm::status::farm_status;
use archfarm_client::farm::watch::{JobEvents, Watched};
use archfarm_client::farm::{rpc, token, FarmClient};
use archfarm_proto::v1::{self, job_event, ActionState, ActionStatus, JobStatus};
use archfarm_proto::{Digest, Platform};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Actions of a full run and of `--short`.
const FULL_ACTIONS: u32 = 1_000;
const SHORT_ACTIONS: u32 = 200;
/// Coordinator timing for the run: short leases so killed agents' work comes back quickly.
const HEARTBEAT_S: u64 = 1;
const LEASE_S: u64 = 6;
/// Attempts per action: every kill may cost an attempt, and an infra failure after the last
/// would be the farm doing as told, not a lost action; 20 is the coordinator's maximum.
const MAX_ATTEMPTS: u32 = 20;
/// Slots per agent.
const SLOTS: u32 = 2;
/// An agent is killed every 2 to 5 s.
const KILL_EVERY_MS: std::ops::RangeInclusive<u64> = 2_000..=5_000;
/// How long the agents get to come up, and a rewatch to succeed.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The run fails when no action ends for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(180);
/// Lines of each log printed when the run fails (the whole logs stay on disk).
const LOG_LINES_ON_FAILURE: usize = 2_000;

/// `cargo xtask chaos [--short] [--actions N] [--agents N] [--seed S]`.
#[derive(clap::Args, Debug)]
pub struct ChaosArgs {
    /// Actions in the job, one tiny step each (default 1000, or 200 with --short).
    #[arg(long)]
    pub actions: Option<u32>,
    /// Agent processes.
    #[arg(long, default_value_t = 4)]
    pub agents: u32,
    /// Seed of the kill schedule (default: from the clock; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The smaller run CI does: 200 actions (about a minute).
    #[arg(long)]
    pub short: bool,
}

/// The name of step `i` (one step per action).
fn step_name(i: u32) -> String {
    format!("n{i:05}")
}

/// Step `i`: waits a little (so kills catch actions running) and prints i².
fn step(i: u32) -> v1::Step {
    v1::Step {
        name: step_name(i),
        argv: vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 0.3; echo $(({i}*{i}))"),
        ],
        timeout_ms: 60_000,
        ..Default::default()
    }
}

/// What step `i` must print.
fn expected_output(i: u32) -> String {
    format!("{}\n", u64::from(i) * u64::from(i))
}

/// The job: one platform, `n` steps, one shard (action) per step, no cache.
fn job_spec(platform: &Platform, n: u32) -> v1::JobSpec {
    v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: platform.to_string(),
            steps: (0..n).map(step).collect(),
        }],
        shards: n,
        timeout_ms: 60_000,
        no_cache: true,
        description: format!("cargo xtask chaos: {n} actions"),
        ..Default::default()
    }
}

/// What distinguishes one ending of an action from another: its state and who produced the
/// result when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ending {
    state: i32,
    agent_id: String,
    started_unix_ms: u64,
    outputs: Vec<Option<v1::Digest>>,
}

impl Ending {
    fn of(a: &ActionStatus) -> Self {
        let r = a.result.clone().unwrap_or_default();
        Self {
            state: a.state,
            agent_id: r.agent_id,
            started_unix_ms: r.started_unix_ms,
            outputs: r.step_results.into_iter().map(|s| s.output).collect(),
        }
    }
}

/// One ActionStatus event as the watch received it.
#[derive(Debug, Clone)]
struct Seen {
    epoch: u64,
    seq: u64,
    status: ActionStatus,
}

/// Every action event the client received, across reconnects, in order.
#[derive(Debug, Default)]
struct EventLog {
    by_action: BTreeMap<String, Vec<Seen>>,
    numbered: HashSet<(u64, u64)>,
    repeated_seq: Vec<(u64, u64)>,
    ended: HashSet<String>,
}

impl EventLog {
    fn push(&mut self, epoch: u64, seq: u64, status: ActionStatus) {
        if seq != 0 && !self.numbered.insert((epoch, seq)) {
            self.repeated_seq.push((epoch, seq));
        }
        if is_final(status.state()) && !self.ended.contains(&status.action_id) {
            self.ended.insert(status.action_id.clone());
        }
        self.by_action
            .entry(status.action_id.clone())
            .or_default()
            .push(Seen { epoch, seq, status });
    }

    /// Actions with a final state seen.
    fn ended(&self) -> usize {
        self.ended.len()
    }

    /// What the events say went wrong: an action that ended twice differently, ended twice
    /// within one coordinator's numbering, or was seen queued or running after it ended; an
    /// event number received twice.
    fn discrepancies(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (epoch, seq) in &self.repeated_seq {
            out.push(format!("event {seq} of epoch {epoch} was received twice"));
        }
        for (id, seen) in &self.by_action {
            let mut ended: Option<Ending> = None;
            let mut numbered_endings: HashMap<u64, u32> = HashMap::new();
            for s in seen {
                let state = s.status.state();
                if is_final(state) {
                    let ending = Ending::of(&s.status);
                    match &ended {
                        Some(first) if *first != ending => {
                            out.push(format!("{id} ended twice: {first:?}, then {ending:?}"))
                        }
                        Some(_) => {}
                        None => ended = Some(ending),
                    }
                    if s.seq != 0 {
                        let n = numbered_endings.entry(s.epoch).or_default();
                        *n += 1;
                        if *n == 2 {
                            out.push(format!(
                                "{id} was announced final twice by the coordinator of epoch {}",
                                s.epoch
                            ));
                        }
                    }
                } else if let Some(first) = &ended {
                    out.push(format!(
                        "{id} was {} (attempt {}) after it had ended as {}",
                        state.as_str_name(),
                        s.status.attempts,
                        ActionState::try_from(first.state)
                            .map(|s| s.as_str_name())
                            .unwrap_or("?")
                    ));
                }
            }
        }
        out
    }
}

/// The figures of a run.
#[derive(Debug, Default)]
struct Figures {
    actions: usize,
    succeeded: usize,
    failed: usize,
    retried: usize,
    attempts: u64,
    agent_kills: u32,
    coordinator_kills: u32,
    stale_refused_since_restart: u64,
    duration: Duration,
}

/// Checks the final job against the plan and the outputs read back: one action per step,
/// every step in exactly one action, every action succeeded once with the right output.
fn final_discrepancies(
    job: &JobStatus,
    n: u32,
    outputs: &HashMap<Digest, Vec<u8>>,
    events: &EventLog,
) -> Vec<String> {
    let mut out = Vec::new();
    if !job.finished {
        out.push(format!("job {} is not finished", job.job_id));
    }
    if job.actions.len() != n as usize {
        out.push(format!(
            "job {} has {} actions, {n} expected",
            job.job_id,
            job.actions.len()
        ));
    }
    let mut owner: HashMap<&str, &str> = HashMap::new();
    for a in &job.actions {
        if a.state() != ActionState::Succeeded {
            out.push(format!(
                "{} ended {} after {} attempts: {}",
                a.action_id,
                a.state().as_str_name(),
                a.attempts,
                a.reason
            ));
        }
        if a.cached {
            out.push(format!("{} was answered from a cache", a.action_id));
        }
        for name in &a.step_names {
            if let Some(other) = owner.insert(name, &a.action_id) {
                out.push(format!("step {name} is in {other} and {}", a.action_id));
            }
        }
        let results = a
            .result
            .as_ref()
            .map(|r| r.step_results.as_slice())
            .unwrap_or_default();
        if a.state() == ActionState::Succeeded && results.len() != a.step_names.len() {
            out.push(format!(
                "{} has {} step results for {} steps",
                a.action_id,
                results.len(),
                a.step_names.len()
            ));
        }
        for r in results {
            let Some(i) = r.name.strip_prefix('n').and_then(|s| s.parse::<u32>().ok()) else {
                out.push(format!("{}: unknown step {:?}", a.action_id, r.name));
                continue;
            };
            let output = r
                .output
                .as_ref()
                .and_then(|d| Digest::from_proto(d).ok())
                .and_then(|d| outputs.get(&d));
            let want = expected_output(i);
            match output {
                None => out.push(format!("{}: step {} has no output", a.action_id, r.name)),
                Some(got) if got.as_slice() != want.as_bytes() => out.push(format!(
                    "{}: step {} printed {:?}, expected {want:?}",
                    a.action_id,
                    r.name,
                    String::from_utf8_lossy(got)
                )),
                Some(_) => {}
            }
            if r.exit_code != 0 {
                out.push(format!(
                    "{}: step {} exited {}",
                    a.action_id, r.name, r.exit_code
                ));
            }
        }
        match events.by_action.get(&a.action_id) {
            Some(seen) if seen.iter().any(|s| is_final(s.status.state())) => {
                let last = seen
                    .iter()
                    .rev()
                    .find(|s| is_final(s.status.state()))
                    .map(|s| Ending::of(&s.status));
                if last.as_ref() != Some(&Ending::of(a)) {
                    out.push(format!(
                        "{}: the watch saw it end as {last:?}, the job says {:?}",
                        a.action_id,
                        Ending::of(a)
                    ));
                }
            }
            _ => out.push(format!("the watch never saw {} end", a.action_id)),
        }
    }
    for i in 0..n {
        let name = step_name(i);
        if !owner.contains_key(name.as_str()) {
            out.push(format!("step {name} is in no action: lost"));
        }
    }
    let known: HashSet<&str> = job.actions.iter().map(|a| a.action_id.as_str()).collect();
    for id in events.by_action.keys() {
        if !known.contains(id.as_str()) {
            out.push(format!("the watch saw {id}, which the job does not have"));
        }
    }
    out.extend(events.discrepancies());
    out
}

/// One agent process of the run.
struct AgentProcess {
    name: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<OsString>,
    child: Child,
}

impl AgentProcess {
    fn spawn(program: &Path, name: &str, dir: &Path, args: Vec<OsString>) -> anyhow::Result<Self> {
        let data_dir = dir.join(name);
        let log_path = dir.join(format!("{name}.log"));
        let mut all = args;
        all.extend(["--data-dir".into(), data_dir.clone().into()]);
        let child = spawn_agent(program, &all, &log_path, "starts")?;
        Ok(Self {
            name: name.to_string(),
            data_dir,
            log_path,
            args: all,
            child,
        })
    }

    /// SIGKILL, reap, start again with the same data directory (its stored credentials).
    fn kill_and_restart(&mut self, program: &Path) -> anyhow::Result<()> {
        self.child
            .kill()
            .with_context(|| format!("failed to SIGKILL {}", self.name))?;
        self.child
            .wait()
            .with_context(|| format!("failed to reap {}", self.name))?;
        self.child = spawn_agent(
            program,
            &self.args,
            &self.log_path,
            "SIGKILLed; starts again",
        )?;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s.
    fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

fn spawn_agent(
    program: &Path,
    args: &[OsString],
    log_path: &Path,
    what: &str,
) -> anyhow::Result<Child> {
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    writeln!(log, "===== {what} =====")
        .with_context(|| format!("failed to write {}", log_path.display()))?;
    spawn_logged(Command::new(program).args(args), log, log_path)
}

/// The processes of the run.
struct ChaosFarm {
    coordinator: PrivateCoordinator,
    agents: Vec<AgentProcess>,
    agent_program: PathBuf,
}

impl ChaosFarm {
    /// Prints the end of every process's log and keeps the directory.
    fn print_logs(&mut self) {
        let dir = self.coordinator.keep_dir();
        let mut logs = vec![self.coordinator.log_path()];
        logs.extend(self.agents.iter().map(|a| a.log_path.clone()));
        for log in logs {
            eprintln!(
                "{}",
                crate::demo::log_tail(&log, LOG_LINES_ON_FAILURE)
                    .replace("--- end of", "--- the log (last lines) of")
            );
        }
        eprintln!(
            "the run's data and whole logs are kept in {}",
            dir.display()
        );
    }

    fn stop(mut self) {
        for a in &mut self.agents {
            a.stop();
        }
        self.coordinator.stop();
    }
}

/// Runs the chaos test; exit code 0 when nothing was lost, duplicated or wrong.
pub async fn run(args: ChaosArgs) -> anyhow::Result<u8> {
    let n = args.actions.unwrap_or(if args.short {
        SHORT_ACTIONS
    } else {
        FULL_ACTIONS
    });
    if !(1..=10_000).contains(&n) {
        bail!("--actions must be 1..=10000 (the steps one job may have per platform)");
    }
    if args.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let platform = Platform::from_uname_machine(std::env::consts::ARCH).with_context(|| {
        format!(
            "failed to name this machine's platform ({})",
            std::env::consts::ARCH
        )
    })?;
    eprintln!(
        "chaos: {n} actions on {} agents ({platform}), seed {seed} (repeat with --seed {seed})",
        args.agents
    );
    build_binaries(&["archfarm-coordinator", "archfarm-agent"])?;
    let extra: Vec<OsString> = [
        "--heartbeat-s".to_string(),
        HEARTBEAT_S.to_string(),
        "--lease-s".to_string(),
        LEASE_S.to_string(),
        "--max-attempts".to_string(),
        MAX_ATTEMPTS.to_string(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let (coordinator, mut client) =
        PrivateCoordinator::start_program(&paths::debug_binary("archfarm-coordinator"), &extra)
            .await?;
    let mut farm = ChaosFarm {
        coordinator,
        agents: Vec::new(),
        agent_program: paths::debug_binary("archfarm-agent"),
    };
    let outcome = chaos(&mut farm, &mut client, &platform, n, args.agents, seed).await;
    match outcome {
        Ok((figures, problems)) => {
            print_figures(&figures, seed);
            if problems.is_empty() {
                println!("chaos passed: every action ended exactly once, succeeded, with the right output");
                farm.stop();
                Ok(0)
            } else {
                farm.print_logs();
                eprintln!("chaos FAILED: {} discrepancies:", problems.len());
                for p in &problems {
                    eprintln!("  {p}");
                }
                farm.stop();
                Ok(1)
            }
        }
        Err(e) => {
            farm.print_logs();
            farm.stop();
            Err(e.context(format!("chaos run failed (seed {seed})")))
        }
    }
}

fn print_figures(f: &Figures, seed: u64) {
    println!(
        "chaos figures (seed {seed}):\n\
         \x20 actions              {}\n\
         \x20 succeeded            {}\n\
         \x20 failed               {}\n\
         \x20 run more than once   {} (attempts in all: {})\n\
         \x20 agent kills          {}\n\
         \x20 coordinator kills    {}\n\
         \x20 stale results refused (since the restart) {}\n\
         \x20 duration             {}",
        f.actions,
        f.succeeded,
        f.failed,
        f.retried,
        f.attempts,
        f.agent_kills,
        f.coordinator_kills,
        f.stale_refused_since_restart,
        format_duration(f.duration)
    );
}

async fn chaos(
    farm: &mut ChaosFarm,
    client: &mut FarmClient,
    platform: &Platform,
    n: u32,
    agents: u32,
    seed: u64,
) -> anyhow::Result<(Figures, Vec<String>)> {
    let join = token::create_token(
        client,
        Duration::from_secs(3600),
        &[],
        false,
        "cargo xtask chaos agents",
    )
    .await?;
    let common: Vec<OsString> = vec![
        "--coordinator".into(),
        farm.coordinator.options.coordinator.clone().into(),
        "--token".into(),
        join.token.clone().into(),
        "--ca-hash".into(),
        join.ca_hash.clone().into(),
        "--slots".into(),
        SLOTS.to_string().into(),
    ];
    let dir = farm.coordinator.dir().to_path_buf();
    for i in 1..=agents {
        farm.agents.push(AgentProcess::spawn(
            &farm.agent_program,
            &format!("agent-{i}"),
            &dir,
            common.clone(),
        )?);
    }
    wait_for_agents(client, farm, agents as usize).await?;
    eprintln!("{agents} agents ready; submitting one job of {n} actions");

    let started = Instant::now();
    let job_id = rpc(client
        .jobs
        .submit(v1::SubmitRequest {
            spec: Some(job_spec(platform, n)),
        })
        .await)
    .context("failed to submit the chaos job")?
    .job_id;
    eprintln!("job {job_id} submitted");

    let mut rng = SmallRng::seed_from_u64(seed);
    let mut figures = Figures::default();
    let mut events = EventLog::default();
    let mut watch = JobEvents::open(client, &job_id)
        .await?
        .resume_for(START_TIMEOUT);
    let mut next_kill = Instant::now() + Duration::from_millis(rng.gen_range(KILL_EVERY_MS));
    let mut last_ended = (0usize, Instant::now());
    loop {
        let ended = events.ended();
        if ended != last_ended.0 {
            last_ended = (ended, Instant::now());
        } else if last_ended.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "no action ended for {}s ({ended} of {n} ended)",
                STALL_TIMEOUT.as_secs()
            );
        }
        if figures.coordinator_kills == 0 && ended * 2 >= n as usize {
            eprintln!(
                "{ended} of {n} actions ended: SIGKILL the coordinator (pid {}) and start it again",
                farm.coordinator.pid()
            );
            *client = farm.coordinator.kill_and_restart().await?;
            figures.coordinator_kills += 1;
            eprintln!("the coordinator is back (pid {})", farm.coordinator.pid());
            watch.replace_client(client.clone());
        }
        if Instant::now() >= next_kill {
            let k = rng.gen_range(0..farm.agents.len());
            let agent = &mut farm.agents[k];
            eprintln!(
                "SIGKILL {} (pid {}) and start it again ({ended} of {n} ended)",
                agent.name,
                agent.child.id()
            );
            agent.kill_and_restart(&farm.agent_program)?;
            figures.agent_kills += 1;
            next_kill = Instant::now() + Duration::from_millis(rng.gen_range(KILL_EVERY_MS));
        }
        let wake = tokio::time::Instant::from_std(next_kill);
        tokio::select! {
            watched = watch.next() => match watched? {
                Watched::Event(event) => match event.kind {
                    Some(job_event::Kind::Action(a)) => events.push(event.epoch, event.seq, a),
                    Some(job_event::Kind::Finished(_)) => break,
                    Some(job_event::Kind::Log(_)) | None => {}
                },
                Watched::FinishedMeanwhile(_) => break,
                Watched::Lost(why) => eprintln!("lost the watch of job {job_id} ({why}); watching again"),
                Watched::Resumed => eprintln!("watching job {job_id} again"),
            },
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    figures.duration = started.elapsed();
    eprintln!(
        "job {job_id} finished after {}; checking every action",
        format_duration(figures.duration)
    );

    let job = get_job(client, &job_id).await?;
    let digests: Vec<Digest> = job
        .actions
        .iter()
        .filter_map(|a| a.result.as_ref())
        .flat_map(|r| r.step_results.iter())
        .filter_map(|s| s.output.as_ref().and_then(|d| Digest::from_proto(d).ok()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut outputs = HashMap::new();
    for chunk in digests.chunks(BATCH_MAX_BLOBS) {
        let blobs = batch_read(client, chunk).await?;
        outputs.extend(chunk.iter().copied().zip(blobs));
    }
    let problems = final_discrepancies(&job, n, &outputs, &events);
    figures.actions = job.actions.len();
    figures.succeeded = job
        .actions
        .iter()
        .filter(|a| a.state() == ActionState::Succeeded)
        .count();
    figures.failed = figures.actions - figures.succeeded;
    figures.retried = job.actions.iter().filter(|a| a.attempts > 1).count();
    figures.attempts = job.actions.iter().map(|a| u64::from(a.attempts)).sum();
    figures.stale_refused_since_restart = farm_status(client, 1).await?.stale_results_refused;
    Ok((figures, problems))
}

/// Waits until `n` agents are connected (ready or busy).
async fn wait_for_agents(
    client: &mut FarmClient,
    farm: &mut ChaosFarm,
    n: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for a in &mut farm.agents {
            if let Ok(Some(status)) = a.child.try_wait() {
                bail!(
                    "failed to start {}: it exited with {status} (data in {})",
                    a.name,
                    a.data_dir.display()
                );
            }
        }
        let up = match farm_status(client, 1).await {
            Ok(s) => s
                .agents
                .iter()
                .filter(|a| matches!(a.state(), v1::AgentState::Ready | v1::AgentState::Busy))
                .count(),
            Err(_) => 0,
        };
        if up >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "failed to start the agents: {up} of {n} connected within {}s",
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: &str, state: ActionState, agent: &str, started: u64) -> ActionStatus {
        ActionStatus {
            action_id: id.into(),
            state: state as i32,
            attempts: 1,
            result: is_final(state).then(|| v1::ExecutionResult {
                agent_id: agent.into(),
                started_unix_ms: started,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_step_prints_its_square_and_gets_its_own_action() {
        let s = step(12);
        assert_eq!(s.name, "n00012");
        assert_eq!(s.argv[2], "sleep 0.3; echo $((12*12))");
        assert_eq!(expected_output(12), "144\n");
        let platform: Platform = "linux/amd64".parse().expect("platform");
        let spec = job_spec(&platform, 1_000);
        assert_eq!(spec.shards, 1_000);
        assert!(spec.no_cache);
        assert_eq!(spec.step_sets[0].steps.len(), 1_000);
    }

    #[test]
    fn a_replayed_ending_is_fine_a_second_or_reversed_one_is_not() {
        let mut log = EventLog::default();
        log.push(1, 1, status("a", ActionState::Queued, "", 0));
        log.push(1, 2, status("a", ActionState::Running, "", 0));
        log.push(1, 3, status("a", ActionState::Succeeded, "x", 5));
        // A restarted coordinator replays its stored state without numbers.
        log.push(2, 0, status("a", ActionState::Succeeded, "x", 5));
        assert!(log.discrepancies().is_empty(), "{:?}", log.discrepancies());
        assert_eq!(log.ended(), 1);

        log.push(2, 7, status("a", ActionState::Running, "", 0));
        log.push(2, 8, status("a", ActionState::Succeeded, "y", 9));
        let found = log.discrepancies();
        assert!(
            found.iter().any(|p| p.contains("after it had ended")),
            "{found:?}"
        );
        assert!(found.iter().any(|p| p.contains("ended twice")), "{found:?}");

        let mut twice = EventLog::default();
        twice.push(1, 4, status("b", ActionState::Succeeded, "x", 5));
        twice.push(1, 4, status("b", ActionState::Succeeded, "x", 5));
        let found = twice.discrepancies();
        assert!(
            found.iter().any(|p| p.contains("received twice")),
            "{found:?}"
        );
        assert!(found.iter().any(|p| p.contains("final twice")), "{found:?}");
    }

    #[test]
    fn the_final_check_finds_lost_wrong_and_failed_actions() {
        let out = |s: &str| (Digest::of(s.as_bytes()), s.as_bytes().to_vec());
        let outputs: HashMap<Digest, Vec<u8>> = [out("0\n"), out("1\n"), out("5\n")].into();
        let action = |id: &str, step: u32, printed: &str, state: ActionState| {
            let mut a = status(id, state, "x", 5);
            a.step_names = vec![step_name(step)];
            if let Some(r) = a.result.as_mut() {
                r.step_results = vec![v1::StepResult {
                    name: step_name(step),
                    output: Some(Digest::of(printed.as_bytes()).to_proto()),
                    ..Default::default()
                }];
            }
            a
        };
        let mut job = JobStatus {
            job_id: "j".into(),
            finished: true,
            actions: vec![
                action("j/s1", 0, "0\n", ActionState::Succeeded),
                action("j/s2", 1, "1\n", ActionState::Succeeded),
            ],
            ..Default::default()
        };
        let mut events = EventLog::default();
        for a in &job.actions {
            events.push(1, 0, a.clone());
        }
        assert!(final_discrepancies(&job, 2, &outputs, &events).is_empty());

        job.actions[1] = action("j/s2", 1, "5\n", ActionState::Succeeded);
        let found = final_discrepancies(&job, 3, &outputs, &events);
        assert!(
            found.iter().any(|p| p.contains("printed \"5\\n\"")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.contains("n00002 is in no action")),
            "{found:?}"
        );
        assert!(found.iter().any(|p| p.contains("3 expected")), "{found:?}");

        job.actions[1] = action("j/s2", 1, "1\n", ActionState::InfraFailed);
        let found = final_discrepancies(&job, 2, &outputs, &events);
        assert!(
            found.iter().any(|p| p.contains("INFRA_FAILED")),
            "{found:?}"
        );
    }
}
