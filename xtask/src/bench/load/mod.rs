//! `cargo xtask bench load`: a real coordinator process against hundreds of simulated agents
//! in this process (fleet.rs). Each coordinator session runs the capacity run (capacity.rs, a
//! closed loop, `--rounds` times back to back, memory after each) and then the latency run
//! (open.rs, an open loop at a fixed offered rate); with `--baseline-bin` a second coordinator
//! gets the same sessions, alternating new, baseline, new, baseline, never at once, and the
//! report (report.rs) sets them side by side. `--release` builds this harness and the
//! coordinator with `--release` and runs that harness, so 500 simulated agents in a debug
//! build are not what is measured.
mod capacity;
mod fleet;
mod open;
mod report;

use super::private::PrivateCoordinator;
use crate::demo::{build_binaries, run_checked};
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::farm::{token, FarmClient};
use report::{Session, Summary};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `cargo xtask bench load [--quick] [--release] [--baseline-bin PATH] [--rounds N] ...`.
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Simulated agents (default 500; 50 with --quick).
    #[arg(long)]
    pub agents: Option<u32>,
    /// Actions per capacity round (default 50000; 2000 with --quick).
    #[arg(long)]
    pub actions: Option<u64>,
    /// Slots each simulated agent offers.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Actions per job of the capacity run (one step and one shard each), at most 10000.
    #[arg(long, default_value_t = 1_000)]
    pub job_size: u64,
    /// Jobs of the capacity run submitted and not yet done at any time.
    #[arg(long, default_value_t = 4)]
    pub jobs_in_flight: u64,
    /// Capacity rounds back to back against the same coordinator and agents.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Offered rate of the open-loop latency run, actions/s (default: half the capacity the
    /// first session measured, or half of what it completed of one-action jobs in a closed
    /// loop if that is less; at least 1000).
    #[arg(long)]
    pub rate: Option<u32>,
    /// One-action jobs in the open-loop run (default 20000; 2000 with --quick; 0 skips it).
    #[arg(long)]
    pub latency_actions: Option<u64>,
    /// Seconds the open loop waits for results after the last send.
    #[arg(long, default_value_t = 30)]
    pub drain_s: u64,
    /// The open loop stops when the coordinator's RSS passes this many MiB.
    #[arg(long, default_value_t = 4096)]
    pub max_rss_mib: u64,
    /// A quick check: 50 agents, 2000 actions.
    #[arg(long)]
    pub quick: bool,
    /// Build this harness and the coordinator with `--release` and run that harness.
    #[arg(long)]
    pub release: bool,
    /// Run this coordinator binary instead of building one.
    #[arg(long, value_name = "PATH", conflicts_with = "release")]
    pub coordinator_bin: Option<PathBuf>,
    /// Run the same sessions against this coordinator too (e.g. an older build), alternating
    /// with the new one, and print both with their ratio.
    #[arg(long, value_name = "PATH")]
    pub baseline_bin: Option<PathBuf>,
    /// Sessions per coordinator (default 2 with a baseline, else 1).
    #[arg(long)]
    pub pairs: Option<u32>,
}

/// The floor of the default offered rate.
const MIN_DEFAULT_RATE: u32 = 1_000;
/// One-action jobs in the closed loop that sets the default offered rate.
const ONE_ACTION_JOBS: u64 = 10_000;

/// The open loop's default offered rate: half the capacity measured (and half of what the
/// farm completes of one-action jobs, what the open loop sends, when that was measured), at
/// least [`MIN_DEFAULT_RATE`].
fn default_rate(capacity: f64, one_action: Option<f64>) -> u32 {
    let limit = one_action.map_or(capacity, |o| o.min(capacity));
    ((limit / 2.0) as u32).max(MIN_DEFAULT_RATE)
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

/// VmRSS of a process, in bytes.
fn rss_of(pid: u32) -> anyhow::Result<u64> {
    Ok(memory_of(pid)?.0)
}

/// The coordinator to run: the given binary, or a fresh debug build.
fn coordinator_program(args: &LoadArgs) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.coordinator_bin {
        return Ok(p.clone());
    }
    build_binaries(&["archfarm-coordinator"])?;
    Ok(paths::debug_binary("archfarm-coordinator"))
}

/// `--release`: builds this harness and the coordinator with `--release`, then runs the same
/// command line (without `--release`, with the release coordinator) in the release harness.
fn rerun_in_release() -> anyhow::Result<u8> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building xtask and archfarm-coordinator with --release");
    run_checked(
        Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--release",
                "--bins",
                "-p",
                "xtask",
                "-p",
                "archfarm-coordinator",
            ])
            .current_dir(paths::workspace_root()),
        "build xtask and archfarm-coordinator with --release",
    )?;
    let release = paths::target_dir().join("release");
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--release")
        .collect();
    argv.push("--coordinator-bin".into());
    argv.push(release.join("archfarm-coordinator").into());
    let status = Command::new(release.join("xtask"))
        .args(&argv)
        .status()
        .context("failed to run the release build of xtask")?;
    Ok(status.code().map_or(2, |c| c.clamp(0, 255) as u8))
}

/// What every session runs.
struct Plan {
    agents: u32,
    slots: u32,
    rounds: u32,
    capacity: capacity::Shape,
    latency_actions: u64,
    drain: Duration,
    max_rss: u64,
}

/// Runs the load benchmark; exit code 1 when an action was lost, doubled or refused.
pub async fn run(args: &LoadArgs) -> anyhow::Result<u8> {
    let plan = Plan {
        agents: args.agents.unwrap_or(if args.quick { 50 } else { 500 }),
        slots: args.slots,
        rounds: args.rounds,
        capacity: capacity::Shape {
            actions: args
                .actions
                .unwrap_or(if args.quick { 2_000 } else { 50_000 }),
            job_size: args.job_size,
            jobs_in_flight: args.jobs_in_flight,
        },
        latency_actions: args
            .latency_actions
            .unwrap_or(if args.quick { 2_000 } else { 20_000 }),
        drain: Duration::from_secs(args.drain_s),
        max_rss: args.max_rss_mib << 20,
    };
    if plan.agents == 0
        || plan.capacity.actions == 0
        || plan.slots == 0
        || plan.capacity.jobs_in_flight == 0
        || plan.rounds == 0
        || args.rate == Some(0)
        || args.pairs == Some(0)
    {
        bail!(
            "--agents, --actions, --slots, --jobs-in-flight, --rounds, --rate and --pairs must \
             be at least 1"
        );
    }
    if !(1..=10_000).contains(&plan.capacity.job_size) {
        bail!("--job-size must be 1..=10000 (the steps one job may have per platform)");
    }
    if args.release {
        return rerun_in_release();
    }
    let harness = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let mut programs = vec![("new", coordinator_program(args)?)];
    if let Some(b) = &args.baseline_bin {
        programs.push(("baseline", b.clone()));
    }
    let pairs = args
        .pairs
        .unwrap_or(if args.baseline_bin.is_some() { 2 } else { 1 });
    eprintln!(
        "bench load ({harness} harness): {} agents × {} slots; per session {} capacity \
         round(s) of {} actions, then {} one-action jobs open loop; {pairs} session(s) per \
         coordinator",
        plan.agents, plan.slots, plan.rounds, plan.capacity.actions, plan.latency_actions
    );
    let mut rate = args.rate;
    let mut sessions: Vec<Session> = Vec::new();
    for _ in 0..pairs {
        for (label, program) in &programs {
            let s = session(label, program, &plan, &mut rate).await?;
            sessions.push(s);
        }
    }
    let new = Summary::of(&sessions, "new").context("no session of the new coordinator")?;
    let baseline = Summary::of(&sessions, "baseline");
    println!(
        "{} agents × {} slots, {harness} harness; capacity rounds of {} actions in jobs of {} \
         ({} in flight); open loop: {} one-action jobs at {} actions/s",
        plan.agents,
        plan.slots,
        plan.capacity.actions,
        plan.capacity.job_size,
        plan.capacity.jobs_in_flight,
        plan.latency_actions,
        new.rate
    );
    println!("{}", report::summary_table(&new, baseline.as_ref()));
    println!("{}", report::rounds_table(&sessions));
    let problems: Vec<String> = sessions
        .iter()
        .enumerate()
        .flat_map(|(n, s)| {
            s.problems
                .iter()
                .map(move |p| format!("session {} ({}): {p}", n + 1, s.label))
        })
        .collect();
    let code = if problems.is_empty() {
        println!("nothing lost: every action was assigned once and recorded once");
        0
    } else {
        println!("{} problems:", problems.len());
        for p in problems.iter().take(50) {
            println!("  {p}");
        }
        1
    };
    println!(
        "{}",
        report::last_line(new.capacity, &new.latencies, new.lost)
    );
    Ok(code)
}

/// One coordinator process from an empty store: agents join, the capacity rounds, the open
/// loop. Sets `rate` from the first capacity measured when it is not given.
async fn session(
    label: &'static str,
    program: &Path,
    plan: &Plan,
    rate: &mut Option<u32>,
) -> anyhow::Result<Session> {
    let (coordinator, mut client) = PrivateCoordinator::start_program(program, &[]).await?;
    let outcome = session_on(&coordinator, &mut client, label, program, plan, rate).await;
    if outcome.is_err() {
        eprintln!("{}", crate::demo::log_tail(&coordinator.log_path(), 60));
    }
    coordinator.stop();
    outcome
}

async fn session_on(
    coordinator: &PrivateCoordinator,
    client: &mut FarmClient,
    label: &'static str,
    program: &Path,
    plan: &Plan,
    rate: &mut Option<u32>,
) -> anyhow::Result<Session> {
    let pid = coordinator.pid();
    let join_token = token::create_token(
        client,
        Duration::from_secs(3600),
        &[],
        false,
        "cargo xtask bench load",
    )
    .await?;
    eprintln!(
        "{label} coordinator {} (pid {pid}) up; {} agents joining",
        program.display(),
        plan.agents
    );
    let mut fleet = fleet::Fleet::start(
        &coordinator.options.coordinator,
        &join_token.token,
        &join_token.ca_hash,
        plan.agents,
        plan.slots,
    )
    .await?;
    let rss_idle = rss_of(pid)?;
    let mut s = Session {
        label,
        program: program.to_path_buf(),
        join_took: fleet.join_took,
        rss_idle,
        rounds: Vec::new(),
        one_action: None,
        open: None,
        hwm: 0,
        problems: Vec::new(),
    };
    for n in 1..=plan.rounds {
        let (round, problems) = capacity::round(&mut fleet, client, pid, plan.capacity).await?;
        eprintln!(
            "{label}: capacity round {n}: {:.0} actions/s, RSS {:.0} MiB",
            round.rate(),
            round.rss_end as f64 / f64::from(1 << 20)
        );
        s.rounds.push(round);
        s.problems.extend(problems);
    }
    if rate.is_none() && plan.latency_actions > 0 {
        // The open loop sends one-action jobs: one Submit per action, which costs the farm
        // more than an action of a big job. Its default rate is half of what the farm takes
        // of both kinds, so that it measures dispatch, not a queue.
        let shape = capacity::Shape {
            actions: ONE_ACTION_JOBS.min(plan.capacity.actions.max(1)),
            job_size: 1,
            jobs_in_flight: 256,
        };
        let (round, problems) = capacity::round(&mut fleet, client, pid, shape).await?;
        eprintln!(
            "{label}: one-action jobs, closed loop: {:.0} actions/s",
            round.rate()
        );
        s.one_action = Some(round);
        s.problems.extend(problems);
    }
    let offered = *rate.get_or_insert_with(|| {
        let measured = s.rounds.first().map_or(0.0, report::Round::rate);
        default_rate(measured, s.one_action.as_ref().map(report::Round::rate))
    });
    if plan.latency_actions > 0 {
        let shape = open::Shape {
            actions: plan.latency_actions,
            rate: offered,
            drain: plan.drain,
            max_rss: plan.max_rss,
        };
        let (open, problems) = open::run(&mut fleet, &coordinator.options, pid, shape).await?;
        let l = report::Latencies::of(&open.latencies);
        eprintln!(
            "{label}: open loop at {offered}/s: p50 {} ms, p99 {} ms, max {} ms",
            report::ms(l.p50),
            report::ms(l.p99),
            report::ms(l.max)
        );
        s.open = Some(open);
        s.problems.extend(problems);
    }
    s.hwm = memory_of(pid)?.1;
    fleet.stop();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rate_is_half_the_lesser_capacity_and_at_least_the_floor() {
        assert_eq!(default_rate(7_000.0, None), 3_500);
        assert_eq!(default_rate(7_000.0, Some(2_600.0)), 1_300);
        assert_eq!(default_rate(7_000.0, Some(9_000.0)), 3_500);
        assert_eq!(default_rate(1_500.0, Some(900.0)), MIN_DEFAULT_RATE);
    }
}
