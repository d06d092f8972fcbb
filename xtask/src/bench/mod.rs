//! `cargo xtask bench ...`: measurements of a farm. `latency` times a trivial job end to end
//! through the same code as `farm run`, so it measures what CI would feel; `cas` measures the
//! content-addressed store (ingest against b3sum, warm re-upload, FindMissing, big blobs); `k8s`
//! sets the farm against the QEMU path CI uses today on k8s.io/utils; `load` puts hundreds of
//! simulated agents and tens of thousands of actions on a real coordinator.

pub mod cas;
pub mod k8s;
pub mod load;
pub mod private;

use anyhow::{bail, Context};
use archfarm_client::config::{ConnectArgs, ProcessEnv};
use archfarm_client::farm::display::format_duration;
use archfarm_client::farm::run::{run_job, RunArgs};
use archfarm_client::farm::upload::Progress;
use archfarm_client::farm::FarmClient;
use comfy_table::{presets, Table};
use std::time::Duration;

/// `cargo xtask bench <what>`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Run `echo hi` N times; time to the first output line and to the end, from submit.
    Latency(LatencyArgs),
    /// Ingest a source tree (cold and warm) next to b3sum, FindMissing of 100k digests, and a
    /// 1 GiB blob up and down. Uses the farm given (default: the demo farm that `cargo xtask
    /// demo` starts) or, when none answers, a private coordinator it starts and stops itself.
    Cas(cas::CasArgs),
    /// k8s.io/utils' unit tests: (a) the Go toolchain under qemu-user per foreign platform,
    /// (b) the farm cold and (c) warm on all platforms at once, (d) Go's cached `go test`;
    /// prints the ratios (a)/(b) and (c)/(d). Starts and stops its own farm.
    K8s(k8s::K8sArgs),
    /// A real coordinator against 500 simulated agents (real joins, real TLS, the real session
    /// protocol, answering at once) and 50,000 one-step actions: actions per second, dispatch
    /// latency, the coordinator's memory, nothing lost. `--quick` for 50 agents, 2,000 actions.
    Load(load::LoadArgs),
}

/// `cargo xtask bench latency [--runs N]`.
#[derive(clap::Args, Debug)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub farm: ConnectArgs,
    /// How many jobs to run, one after another.
    #[arg(long, default_value_t = 20)]
    pub runs: u32,
    /// The platform to run on.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Let an emulated agent run it.
    #[arg(long)]
    pub allow_emulation: bool,
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> anyhow::Result<u8> {
    match args.command {
        BenchCommand::Latency(args) => latency(&args).await,
        BenchCommand::Cas(args) => cas::run(&args).await,
        BenchCommand::K8s(args) => k8s::run(&args).await,
        BenchCommand::Load(args) => load::run(&args).await,
    }
}

/// Minimum, median, 90th percentile and maximum of some durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub min: Duration,
    pub median: Duration,
    pub p90: Duration,
    pub max: Duration,
}

/// The spread of `samples` (nearest-rank percentiles); None when there are none.
pub fn spread(samples: &[Duration]) -> Option<Spread> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = |p: f64| {
        let i = (p * sorted.len() as f64).ceil() as usize;
        sorted[i.clamp(1, sorted.len()) - 1]
    };
    Some(Spread {
        min: *sorted.first()?,
        median: rank(0.5),
        p90: rank(0.9),
        max: *sorted.last()?,
    })
}

/// `bench latency`.
pub async fn latency(args: &LatencyArgs) -> anyhow::Result<u8> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut client = FarmClient::connect(&args.farm.resolve(&ProcessEnv)?).await?;
    let mut job = RunArgs::new([args.platform.clone()], ["echo", "hi"]);
    job.allow_emulation = args.allow_emulation;
    job.description = Some("cargo xtask bench latency".to_string());
    // Every run must reach an agent: the action cache would answer repeats at once.
    job.no_cache = true;
    let mut first_lines = Vec::new();
    let mut totals = Vec::new();
    for i in 1..=args.runs {
        let outcome = run_job(&mut client, &job, Progress::Hidden, &mut |_| {}).await?;
        if outcome.exit_code == 130 {
            return Ok(130);
        }
        if outcome.exit_code != 0 {
            bail!(
                "run {i}: job {} ended with exit code {}; see `cargo xtask farm job {}`",
                outcome.job_id,
                outcome.exit_code,
                outcome.job_id
            );
        }
        let first = outcome
            .timings
            .first_line
            .with_context(|| format!("run {i}: job {} printed no line", outcome.job_id))?;
        eprintln!(
            "run {i}/{}: first line {}, exit {}",
            args.runs,
            format_duration(first),
            format_duration(outcome.timings.total)
        );
        first_lines.push(first);
        totals.push(outcome.timings.total);
    }
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_header(vec!["from submit to", "min", "median", "p90", "max"]);
    for (what, samples) in [("first line", &first_lines), ("exit", &totals)] {
        if let Some(s) = spread(samples) {
            table.add_row(vec![
                what.to_string(),
                format_duration(s.min),
                format_duration(s.median),
                format_duration(s.p90),
                format_duration(s.max),
            ]);
        }
    }
    println!(
        "{} runs of `echo hi` on {}:\n{table}",
        args.runs, args.platform
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_uses_nearest_rank() {
        let ms =
            |v: &[u64]| -> Vec<Duration> { v.iter().map(|m| Duration::from_millis(*m)).collect() };
        let s = spread(&ms(&[50, 10, 40, 20, 30, 60, 70, 80, 90, 100])).unwrap();
        assert_eq!(s.min, Duration::from_millis(10));
        assert_eq!(s.median, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.max, Duration::from_millis(100));
        let one = spread(&ms(&[7])).unwrap();
        assert_eq!(
            (one.min, one.median, one.p90, one.max),
            (one.min, one.min, one.min, one.min)
        );
        assert!(spread(&[]).is_none());
    }
}
