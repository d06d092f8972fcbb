//! `cargo xtask bench load`: a real coordinator process against hundreds of simulated agents in
//! this process. Each simulated agent is a light client speaking the real protocol over real
//! TLS: it joins with a token (key pair, CSR, certificate), opens its session stream with mutual
//! TLS, says Hello, sends heartbeats and answers every Assign at once with a successful
//! ActionCompleted. Jobs of one-step actions are submitted a few at a time; the bench reports
//! completed actions per second, dispatch latency (Submit sent → Assign received), the
//! coordinator's memory, and checks that every action was assigned once and succeeded once.
use super::private::PrivateCoordinator;
use crate::demo::{build_binaries, run_checked};
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::farm::display::format_duration;
use archfarm_client::farm::job::get_job;
use archfarm_client::farm::status::farm_status;
use archfarm_client::farm::{rpc, token, FarmClient, RpcError};
use archfarm_proto::tls::{self, ClientIdentity, ServerTrust};
use archfarm_proto::v1::{self, agent_message, coordinator_message, ActionState};
use archfarm_proto::MAX_MESSAGE_BYTES;
use comfy_table::{presets, Table};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// The platform every simulated agent serves natively.
const PLATFORM: &str = "linux/amd64";
/// Joins at once (each is a TLS handshake, a key pair and a certificate signature).
const JOIN_CONCURRENCY: usize = 16;
/// How long the agents get to join and connect.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// The run fails when no action completes for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// `cargo xtask bench load [--agents N] [--actions N] [--quick] [--release]`.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Simulated agents (default 500; 50 with --quick).
    #[arg(long)]
    pub agents: Option<u32>,
    /// Actions in all (default 50000; 2000 with --quick).
    #[arg(long)]
    pub actions: Option<u32>,
    /// Slots each simulated agent offers.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Actions per job (one step and one shard each), at most 10000.
    #[arg(long, default_value_t = 1_000)]
    pub job_size: u32,
    /// Jobs submitted and not yet done at any time.
    #[arg(long, default_value_t = 2)]
    pub jobs_in_flight: u32,
    /// A quick check: 50 agents, 2000 actions.
    #[arg(long)]
    pub quick: bool,
    /// Build and run the coordinator with `--release` (the default is the debug build).
    #[arg(long)]
    pub release: bool,
    /// Run this coordinator binary instead of building one.
    #[arg(long, value_name = "PATH", conflicts_with = "release")]
    pub coordinator_bin: Option<PathBuf>,
}

/// What a simulated agent saw, sent to the driver.
enum Seen {
    /// The agent's session got its Welcome.
    Welcomed,
    /// An Assign arrived.
    Assigned { action: String, at: Instant },
    /// A CompletionAck arrived.
    Acked {
        action: String,
        accepted: bool,
        reason: String,
    },
    /// The session ended or failed.
    Ended { agent: u32, why: String },
}

/// A simulated agent's credentials, from a real join.
struct Joined {
    identity: ClientIdentity,
    ca_pem: String,
}

/// Joins like `archfarm-agent` does: a fresh key pair, a CSR, Join with the token, the CA
/// checked against the pin.
async fn join(url: &str, token: &str, ca_hash: &str, name: &str) -> anyhow::Result<Joined> {
    let key = rcgen::KeyPair::generate().context("failed to generate a key pair")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("failed to build a certificate request")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr_pem = params
        .serialize_request(&key)
        .context("failed to sign a certificate request")?
        .pem()
        .context("failed to encode a certificate request")?;
    let connected = tls::connect(url, &ServerTrust::Pin(ca_hash.to_string()), None)
        .await
        .with_context(|| format!("failed to connect {name} for joining"))?;
    let response = rpc(v1::join_client::JoinClient::new(connected.channel)
        .join(v1::JoinRequest {
            token: token.to_string(),
            csr_pem,
            hostname: name.to_string(),
        })
        .await)
    .with_context(|| format!("failed to join {name}"))?;
    Ok(Joined {
        identity: ClientIdentity {
            cert_pem: response.certificate_pem,
            key_pem: key.serialize_pem(),
        },
        ca_pem: response.ca_certificate_pem,
    })
}

/// The success an agent reports for an action: exit 0, one passing result per step.
fn success(agent_id: &str, assign: &v1::Assign) -> v1::AgentMessage {
    let now = archfarm_client::farm::display::now_unix_ms();
    let steps = assign
        .action
        .as_ref()
        .map(|a| a.steps.as_slice())
        .unwrap_or_default();
    let result = v1::ExecutionResult {
        outcome: v1::ExecutionOutcome::Exited as i32,
        exit_code: 0,
        agent_id: agent_id.to_string(),
        agent_hostname: agent_id.to_string(),
        platform: PLATFORM.to_string(),
        started_unix_ms: now,
        step_results: steps
            .iter()
            .map(|s| v1::StepResult {
                name: s.name.clone(),
                exit_code: 0,
                duration_ms: 1,
                agent_id: agent_id.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    v1::AgentMessage {
        kind: Some(agent_message::Kind::Completed(v1::ActionCompleted {
            action_id: assign.action_id.clone(),
            fence: assign.fence,
            result: Some(result),
        })),
    }
}

/// One simulated agent's session: Hello, then heartbeats and an immediate success for every
/// Assign, until the stream ends.
async fn simulated_agent(
    i: u32,
    url: String,
    joined: Joined,
    slots: u32,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let why = match session(i, &url, &joined, slots, &seen).await {
        Ok(()) => "the coordinator ended the session".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let _ = seen.send(Seen::Ended { agent: i, why });
}

async fn session(
    i: u32,
    url: &str,
    joined: &Joined,
    slots: u32,
    seen: &mpsc::UnboundedSender<Seen>,
) -> anyhow::Result<()> {
    let connected = tls::connect(
        url,
        &ServerTrust::Ca(joined.ca_pem.clone()),
        Some(&joined.identity),
    )
    .await
    .context("failed to connect with the agent's certificate")?;
    let mut client = v1::agent_session_client::AgentSessionClient::new(connected.channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(1024);
    let hello = v1::Hello {
        platforms: vec![v1::PlatformOffer {
            platform: PLATFORM.to_string(),
            emulated: false,
        }],
        cores: slots,
        memory_bytes: 8 << 30,
        kernel: "simulated".to_string(),
        free_disk_bytes: 100 << 30,
        slots,
        hostname: format!("sim-{i}"),
        version: "bench-load".to_string(),
        running: vec![],
        sandbox: "none: simulated agent".to_string(),
        limits: "simulated".to_string(),
        ..Default::default()
    };
    tx.send(v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .context("failed to queue the hello")?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(RpcError)
        .context("failed to open the session")?
        .into_inner();
    let mut agent_id = String::new();
    let mut heartbeat: Option<tokio::task::JoinHandle<()>> = None;
    let result = loop {
        let message = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(status) => break Err(anyhow::Error::new(RpcError(status))),
        };
        match message.kind {
            Some(coordinator_message::Kind::Welcome(w)) => {
                agent_id = w.agent_id;
                let every = Duration::from_millis(w.heartbeat_interval_ms.max(100));
                let tx = tx.clone();
                heartbeat = Some(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        let beat = v1::AgentMessage {
                            kind: Some(agent_message::Kind::Heartbeat(v1::Heartbeat {
                                load_1m: 0.0,
                                running: vec![],
                                free_disk_bytes: 100 << 30,
                                paused_reason: String::new(),
                            })),
                        };
                        if tx.send(beat).await.is_err() {
                            return;
                        }
                    }
                }));
                let _ = seen.send(Seen::Welcomed);
            }
            Some(coordinator_message::Kind::Assign(a)) => {
                let _ = seen.send(Seen::Assigned {
                    action: a.action_id.clone(),
                    at: Instant::now(),
                });
                if tx.send(success(&agent_id, &a)).await.is_err() {
                    break Err(anyhow::anyhow!(
                        "failed to send a result: the session closed"
                    ));
                }
            }
            Some(coordinator_message::Kind::Ack(ack)) => {
                let _ = seen.send(Seen::Acked {
                    action: ack.action_id,
                    accepted: ack.accepted,
                    reason: ack.reason,
                });
            }
            Some(coordinator_message::Kind::Cancel(_) | coordinator_message::Kind::Drain(_))
            | None => {}
        }
    };
    if let Some(h) = heartbeat {
        h.abort();
    }
    result
}

/// The job of actions `first..first+n`: one step (`true`) and one shard each, no cache.
fn job_spec(first: u32, n: u32) -> v1::JobSpec {
    v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: PLATFORM.to_string(),
            steps: (first..first + n)
                .map(|i| v1::Step {
                    name: format!("a{i:06}"),
                    argv: vec!["true".to_string()],
                    ..Default::default()
                })
                .collect(),
        }],
        shards: n,
        timeout_ms: 60_000,
        no_cache: true,
        description: format!("cargo xtask bench load: actions {first}..{}", first + n),
        ..Default::default()
    }
}

/// The job id of an action id (`<job>/<platform>/shard-<k>`).
fn job_of(action_id: &str) -> &str {
    action_id.split('/').next().unwrap_or_default()
}

/// VmRSS and VmHWM of a process, in bytes, from /proc/<pid>/status.
fn memory_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("failed to find {name} in {path}"))?;
        let kb: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("failed to parse {line:?} in {path}"))?;
        Ok(kb * 1024)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = (p * sorted.len() as f64).ceil() as usize;
    sorted[i.clamp(1, sorted.len()) - 1]
}

/// The coordinator to run: the given binary, or a fresh debug or release build.
fn coordinator_program(args: &LoadArgs) -> anyhow::Result<(PathBuf, &'static str)> {
    if let Some(p) = &args.coordinator_bin {
        return Ok((p.clone(), "given"));
    }
    if args.release {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("building archfarm-coordinator with --release");
        run_checked(
            Command::new(cargo)
                .args([
                    "build",
                    "--quiet",
                    "--release",
                    "--bins",
                    "-p",
                    "archfarm-coordinator",
                ])
                .current_dir(paths::workspace_root()),
            "build archfarm-coordinator with --release",
        )?;
        return Ok((
            paths::target_dir()
                .join("release")
                .join("archfarm-coordinator"),
            "release",
        ));
    }
    build_binaries(&["archfarm-coordinator"])?;
    Ok((paths::debug_binary("archfarm-coordinator"), "debug"))
}

/// Runs the load benchmark; exit code 1 when an action was lost, doubled or failed.
pub async fn run(args: &LoadArgs) -> anyhow::Result<u8> {
    let agents = args.agents.unwrap_or(if args.quick { 50 } else { 500 });
    let actions = args
        .actions
        .unwrap_or(if args.quick { 2_000 } else { 50_000 });
    if agents == 0 || actions == 0 || args.slots == 0 || args.jobs_in_flight == 0 {
        bail!("--agents, --actions, --slots and --jobs-in-flight must be at least 1");
    }
    if !(1..=10_000).contains(&args.job_size) {
        bail!("--job-size must be 1..=10000 (the steps one job may have per platform)");
    }
    let (program, build) = coordinator_program(args)?;
    let (coordinator, mut client) = PrivateCoordinator::start_program(&program, &[]).await?;
    let outcome = drive(&coordinator, &mut client, args, agents, actions, build).await;
    if outcome.is_err() {
        eprintln!("{}", crate::demo::log_tail(&coordinator.log_path(), 60));
    }
    coordinator.stop();
    outcome
}

async fn drive(
    coordinator: &PrivateCoordinator,
    client: &mut FarmClient,
    args: &LoadArgs,
    agents: u32,
    actions: u32,
    build: &str,
) -> anyhow::Result<u8> {
    let url = coordinator.options.coordinator.clone();
    let join_token = token::create_token(
        client,
        Duration::from_secs(3600),
        &[],
        false,
        "cargo xtask bench load",
    )
    .await?;
    eprintln!(
        "coordinator ({build} build, pid {}) up; {agents} simulated agents joining",
        coordinator.pid()
    );
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let joins = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    let join_started = Instant::now();
    let mut joined = tokio::task::JoinSet::new();
    for i in 0..agents {
        let (url, token, ca_hash, joins) = (
            url.clone(),
            join_token.token.clone(),
            join_token.ca_hash.clone(),
            joins.clone(),
        );
        joined.spawn(async move {
            let _permit = joins.acquire_owned().await;
            (i, join(&url, &token, &ca_hash, &format!("sim-{i}")).await)
        });
    }
    let mut sessions = tokio::task::JoinSet::new();
    while let Some(done) = joined.join_next().await {
        let (i, result) = done.context("failed to run a join task")?;
        let credentials = result?;
        sessions.spawn(simulated_agent(
            i,
            url.clone(),
            credentials,
            args.slots,
            seen_tx.clone(),
        ));
    }
    let join_took = join_started.elapsed();
    let mut welcomed = 0;
    let deadline = Instant::now() + START_TIMEOUT;
    while welcomed < agents {
        let event = tokio::time::timeout_at(deadline.into(), seen.recv())
            .await
            .with_context(|| {
                format!("failed to connect the agents: {welcomed} of {agents} welcomed")
            })?;
        match event {
            Some(Seen::Welcomed) => welcomed += 1,
            Some(Seen::Ended { agent, why }) => bail!("simulated agent {agent} failed: {why}"),
            Some(_) => {}
            None => bail!("every simulated agent stopped"),
        }
    }
    let connected = farm_status(client, 1)
        .await?
        .agents
        .iter()
        .filter(|a| matches!(a.state(), v1::AgentState::Ready | v1::AgentState::Busy))
        .count();
    eprintln!(
        "{agents} agents joined and connected in {} (the coordinator counts {connected} ready); \
         submitting {actions} actions in jobs of {}, {} at a time",
        format_duration(join_started.elapsed()),
        args.job_size,
        args.jobs_in_flight
    );
    let (rss_idle, _) = memory_of(coordinator.pid())?;

    // Submit jobs as earlier ones finish; count what the agents see.
    let mut plan: VecDeque<(u32, u32)> = VecDeque::new();
    let mut first = 0;
    while first < actions {
        let n = args.job_size.min(actions - first);
        plan.push_back((first, n));
        first += n;
    }
    let jobs_total = plan.len();
    struct JobRun {
        size: u32,
        submitted: Instant,
        accepted: u32,
    }
    let mut jobs: BTreeMap<String, JobRun> = BTreeMap::new();
    let mut in_flight = 0u32;
    let mut assigned: HashMap<String, Instant> = HashMap::new();
    let mut doubled_assigns = Vec::new();
    let mut latencies: Vec<Duration> = Vec::with_capacity(actions as usize);
    let mut refused: Vec<String> = Vec::new();
    let mut accepted_total = 0u32;
    let mut pending: Vec<(String, Instant)> = Vec::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut peak_rss = 0u64;
    let mut next_sample = Instant::now();
    let mut next_report = Instant::now() + Duration::from_secs(10);
    while accepted_total < actions {
        while in_flight < args.jobs_in_flight {
            let Some((first, n)) = plan.pop_front() else {
                break;
            };
            let submitted = Instant::now();
            let job_id = rpc(client
                .jobs
                .submit(v1::SubmitRequest {
                    spec: Some(job_spec(first, n)),
                })
                .await)
            .context("failed to submit a job")?
            .job_id;
            jobs.insert(
                job_id,
                JobRun {
                    size: n,
                    submitted,
                    accepted: 0,
                },
            );
            in_flight += 1;
        }
        // Assigns seen before their job's Submit returned wait here for its id.
        pending.retain(|(action, at)| match jobs.get(job_of(action)) {
            Some(j) => {
                latencies.push(at.saturating_duration_since(j.submitted));
                false
            }
            None => true,
        });
        if Instant::now() >= next_sample {
            peak_rss = peak_rss.max(memory_of(coordinator.pid())?.0);
            next_sample = Instant::now() + Duration::from_secs(1);
            if next_report <= Instant::now() {
                eprintln!(
                    "{accepted_total} of {actions} actions done after {}",
                    format_duration(started.elapsed())
                );
                next_report = Instant::now() + Duration::from_secs(10);
            }
        }
        let event = match tokio::time::timeout(Duration::from_secs(1), seen.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => bail!("every simulated agent stopped"),
            Err(_) => {
                if last_progress.elapsed() > STALL_TIMEOUT {
                    bail!(
                        "no action completed for {}s ({accepted_total} of {actions} done)",
                        STALL_TIMEOUT.as_secs()
                    );
                }
                continue;
            }
        };
        match event {
            Seen::Welcomed => {}
            Seen::Assigned { action, at } => {
                if assigned.insert(action.clone(), at).is_some() {
                    doubled_assigns.push(action.clone());
                }
                match jobs.get(job_of(&action)) {
                    Some(j) => latencies.push(at.saturating_duration_since(j.submitted)),
                    None => pending.push((action, at)),
                }
            }
            Seen::Acked {
                action,
                accepted,
                reason,
            } => {
                if !accepted {
                    refused.push(format!("{action}: {reason}"));
                    continue;
                }
                last_progress = Instant::now();
                accepted_total += 1;
                if let Some(j) = jobs.get_mut(job_of(&action)) {
                    j.accepted += 1;
                    if j.accepted == j.size {
                        in_flight -= 1;
                    }
                }
            }
            Seen::Ended { agent, why } => bail!("simulated agent {agent} ended: {why}"),
        }
    }
    let took = started.elapsed();
    let (rss_end, hwm) = memory_of(coordinator.pid())?;
    peak_rss = peak_rss.max(rss_end);

    // Every action of every job: succeeded, once.
    let mut problems = Vec::new();
    let mut succeeded = 0usize;
    let mut retried = 0usize;
    for (job_id, run) in &jobs {
        let job = get_job(client, job_id).await?;
        if !job.finished {
            problems.push(format!("job {job_id} is not finished"));
        }
        if job.actions.len() != run.size as usize {
            problems.push(format!(
                "job {job_id} has {} actions, {} submitted",
                job.actions.len(),
                run.size
            ));
        }
        for a in &job.actions {
            if a.state() == ActionState::Succeeded {
                succeeded += 1;
            } else {
                problems.push(format!(
                    "{} ended {}: {}",
                    a.action_id,
                    a.state().as_str_name(),
                    a.reason
                ));
            }
            if a.attempts > 1 {
                retried += 1;
            }
            if !assigned.contains_key(&a.action_id) {
                problems.push(format!("{} was never assigned", a.action_id));
            }
        }
    }
    for a in &doubled_assigns {
        problems.push(format!("{a} was assigned twice"));
    }
    problems.extend(refused.iter().map(|r| format!("result refused: {r}")));
    let lost = (actions as usize).saturating_sub(succeeded);

    latencies.sort_unstable();
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["bench load", "value"]);
    let rows: Vec<(&str, String)> = vec![
        ("coordinator build", build.to_string()),
        (
            "simulated agents × slots",
            format!("{agents} × {}", args.slots),
        ),
        ("joins (key, CSR, Join, TLS)", format_duration(join_took)),
        (
            "actions (jobs × size)",
            format!("{actions} ({jobs_total} × ≤{})", args.job_size),
        ),
        ("duration (first submit → last ack)", format_duration(took)),
        (
            "completed actions per second",
            format!("{:.0}", f64::from(actions) / took.as_secs_f64()),
        ),
        (
            "dispatch latency p50 (Submit → Assign)",
            format!("{} ms", percentile(&latencies, 0.5).as_millis()),
        ),
        (
            "dispatch latency p99",
            format!("{} ms", percentile(&latencies, 0.99).as_millis()),
        ),
        (
            "dispatch latency max",
            format!("{} ms", percentile(&latencies, 1.0).as_millis()),
        ),
        ("coordinator RSS idle, agents connected", mib(rss_idle)),
        (
            "coordinator RSS peak sampled / at end",
            format!("{} / {}", mib(peak_rss), mib(rss_end)),
        ),
        ("coordinator VmHWM", mib(hwm)),
        ("succeeded", succeeded.to_string()),
        ("run more than once", retried.to_string()),
        ("lost", lost.to_string()),
    ];
    for (k, v) in rows {
        table.add_row(vec![k.to_string(), v]);
    }
    println!("{table}");
    sessions.abort_all();
    if problems.is_empty() {
        println!("nothing lost: every action was assigned once and succeeded once");
        Ok(0)
    } else {
        eprintln!("bench load FAILED: {} problems:", problems.len());
        for p in problems.iter().take(50) {
            eprintln!("  {p}");
        }
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_cover_the_actions_once_with_one_shard_per_step() {
        let spec = job_spec(1_000, 500);
        assert_eq!(spec.shards, 500);
        let steps = &spec.step_sets[0].steps;
        assert_eq!(steps.len(), 500);
        assert_eq!(steps[0].name, "a001000");
        assert_eq!(steps[499].name, "a001499");
        assert!(spec.no_cache);
        assert_eq!(job_of("j-000007/linux/amd64/shard-3"), "j-000007");
    }

    #[test]
    fn a_result_names_each_step_and_echoes_the_fence() {
        let assign = v1::Assign {
            action_id: "j/linux/amd64/shard-1".into(),
            fence: 42,
            action: Some(v1::Action {
                steps: vec![v1::Step {
                    name: "a000001".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let Some(agent_message::Kind::Completed(c)) = success("agent-1", &assign).kind else {
            panic!("not a completion");
        };
        assert_eq!(
            (c.action_id.as_str(), c.fence),
            ("j/linux/amd64/shard-1", 42)
        );
        let r = c.result.expect("result");
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.step_results[0].name, "a000001");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&ms, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }
}
