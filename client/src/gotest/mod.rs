//! `archfarm go-test`: Go tests cross-compiled here, run natively on the farm's agents
//! of each platform, never rebuilt or rerun when nothing they depend on changed.
//!
//! The flow: `go list` the packages per platform; derive each (package, platform)'s cache key
//! from the files the toolchain would read ([`key`]); ask the farm's step cache
//! (Jobs.LookupSteps) which keys it holds a passing result for; cross-compile the misses with
//! `go test -c`, stage each as a step tree (`pkg.test` + `src/`), upload what the CAS lacks;
//! submit one job of step sets (the coordinator shards each platform's steps by their recorded
//! durations), follow it, convert every step's output with `go tool test2json`, and report:
//! a package x platform matrix, JUnit XML and the `go test -json` stream per platform.
//! `--rerun-fails N` reruns failed tests and marks those that pass as flaky.

pub mod build;
pub mod events;
pub mod golist;
pub mod junit;
pub mod key;
pub mod report;
pub mod rerun;
pub mod steps;
pub mod verdict;
pub mod watch;

use crate::farm::args::{ensure_unique, parse_env_var, CachePolicyArgs, EnvVarArg};
use crate::farm::blobs::{batch_read, plan_batches, read_blob, MAX_BATCH_BLOB_BYTES};
use crate::farm::upload::{upload_tree, Progress};
use crate::farm::{rpc, FarmClient};
use crate::go_vars::{CGO_VARS, PURE_BUILD_VARS};
use anyhow::{bail, Context};
use archfarm_proto::tree::{build_local_tree, LocalTree};
use archfarm_proto::v1::{self, JobStatus, StepResult};
use archfarm_proto::{Digest, Platform};
use events::{test2json, TestEvent};
use futures::StreamExt;
use golist::{go_list, go_minor_version, go_version, platform_env, GoPackage, PackageIndex};
use key::{package_key, CacheKey, FileHashes, KeyContext};
use report::Results;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;
use verdict::{PackageResult, Verdict};
use watch::{follow_job, Verbosity};

/// The platform tested unless `--platform` says otherwise.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";
/// Shard size aimed at unless `--shards` or `--shard-target` says otherwise.
pub const DEFAULT_SHARD_TARGET: Duration = Duration::from_secs(120);
/// Platforms where Go's race detector exists.
pub const RACE_ARCHES: &[&str] = &["amd64", "arm64", "ppc64le"];
/// Step outputs converted by `go tool test2json` at once.
const PARALLEL_CONVERSIONS: usize = 8;

/// `archfarm go-test [options] PACKAGES...`.
#[derive(clap::Args, Debug, Clone)]
pub struct GoTestArgs {
    /// Platform to test on, e.g. linux/arm64; repeat for more (default linux/amd64).
    #[arg(long = "platform", value_name = "PLATFORM")]
    pub platforms: Vec<String>,
    /// Split each platform's packages into this many shards.
    #[arg(long, value_name = "N", conflicts_with = "shard_target")]
    pub shards: Option<u32>,
    /// Aim for shards of about this long, by the durations the farm recorded (default 2m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub shard_target: Option<Duration>,
    /// Build with Go's race detector (linux/amd64, linux/arm64, linux/ppc64le; needs cgo).
    #[arg(long)]
    pub race: bool,
    /// `-test.timeout` of each test binary; the farm's watchdog kills it 30s later (a hang).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write junit_<os>_<arch>.xml per platform into DIR.
    #[arg(long, value_name = "DIR")]
    pub junit: Option<PathBuf>,
    /// Write the `go test -json` stream per platform into DIR/<os>_<arch>.json.
    #[arg(long, value_name = "DIR")]
    pub json: Option<PathBuf>,
    /// Rerun failed tests up to N times; those that pass are flaky, not failed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub rerun_fails: u32,
    /// Let agents that emulate a platform (qemu-user) run it; native agents are preferred.
    /// Cached emulated results then count; new ones are stored only with --cache-emulated.
    #[arg(long)]
    pub allow_emulation: bool,
    /// Build and run every package even when the farm holds a passing result for it.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub cache: CachePolicyArgs,
    /// Build tags, as for `go test -tags`.
    #[arg(long, value_name = "TAGS")]
    pub tags: Option<String>,
    /// Environment variable for the test binaries; repeatable; part of the cache key.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var)]
    pub env: Vec<EnvVarArg>,
    /// Print every state change and the shards' raw output.
    #[arg(short, long)]
    pub verbose: bool,
    /// Packages, as for `go test` (default: the one in the current directory).
    #[arg(value_name = "PACKAGES")]
    pub packages: Vec<String>,
}

impl GoTestArgs {
    /// `go-test PACKAGES...` with every option at its default.
    pub fn new<S: Into<String>>(packages: impl IntoIterator<Item = S>) -> Self {
        Self {
            platforms: Vec::new(),
            shards: None,
            shard_target: None,
            race: false,
            timeout: Duration::from_secs(600),
            junit: None,
            json: None,
            rerun_fails: 0,
            allow_emulation: false,
            no_cache: false,
            cache: CachePolicyArgs::default(),
            tags: None,
            env: Vec::new(),
            verbose: false,
            packages: packages.into_iter().map(Into::into).collect(),
        }
    }

    /// The platforms, parsed, in order, without duplicates; refused with `--race` where Go
    /// has no race detector.
    pub fn platforms(&self) -> anyhow::Result<Vec<Platform>> {
        let given: Vec<&str> = if self.platforms.is_empty() {
            vec![DEFAULT_PLATFORM]
        } else {
            self.platforms.iter().map(String::as_str).collect()
        };
        ensure_unique("--platform", given.iter().copied())?;
        let platforms = given
            .iter()
            .map(|p| p.parse::<Platform>())
            .collect::<Result<Vec<_>, _>>()?;
        if self.race {
            if let Some(p) = platforms.iter().find(|p| !RACE_ARCHES.contains(&p.arch())) {
                bail!(
                    "--race: Go's race detector does not exist for {p}; it does for linux/amd64, \
                     linux/arm64 and linux/ppc64le"
                );
            }
        }
        Ok(platforms)
    }

    /// Shards and shard target for the job spec.
    pub fn sharding(&self) -> (u32, u64) {
        match (self.shards, self.shard_target) {
            (Some(n), _) => (n, 0),
            (None, t) => (0, millis(t.unwrap_or(DEFAULT_SHARD_TARGET))),
        }
    }

    /// The job's environment, sorted by name.
    pub fn job_env(&self) -> anyhow::Result<Vec<(String, String)>> {
        ensure_unique("--env", self.env.iter().map(|e| e.name.as_str()))?;
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect();
        env.sort();
        Ok(env)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One package on one platform that the farm has to run (or holds a result for).
#[derive(Debug, Clone)]
struct Unit {
    platform: String,
    import_path: String,
    step_name: String,
    key: CacheKey,
}

/// A unit's step, built and staged.
#[derive(Debug, Clone)]
struct Staged {
    unit: Unit,
    input_root: Digest,
}

/// Everything the keys cover besides files, owned (for the hashing thread).
#[derive(Debug, Clone)]
struct KeySettings {
    go_version: String,
    cgo: bool,
    tags: String,
    race: bool,
    test_args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Cache keys for every target on every platform; packages that cannot be keyed (no test main
/// on a platform, broken) come back as results instead.
fn plan_units(
    targets: &[String],
    names: &HashMap<String, String>,
    platforms: &[Platform],
    indexes: &[PackageIndex],
    settings: &KeySettings,
) -> anyhow::Result<(Vec<Unit>, Vec<PackageResult>)> {
    let mut hashes = FileHashes::default();
    let mut units = Vec::new();
    let mut results = Vec::new();
    for (platform, index) in platforms.iter().zip(indexes) {
        let pname = platform.to_string();
        let ctx = KeyContext {
            go_version: &settings.go_version,
            platform,
            cgo: settings.cgo,
            tags: &settings.tags,
            race: settings.race,
            test_args: &settings.test_args,
            env: &settings.env,
        };
        for target in targets {
            let variant = index.get(&format!("{target} [{target}.test]"));
            let main = index.test_main(target);
            let broken = [index.get(target), variant, main]
                .into_iter()
                .flatten()
                .find_map(GoPackage::errors);
            if main.is_none() || broken.is_some() {
                let why = broken.unwrap_or_else(|| "go list shows no test main".to_string());
                let no_files = why.contains("build constraints exclude all Go files");
                let (verdict, detail) = if no_files {
                    (Verdict::Skip, format!("no Go files for {pname}"))
                } else {
                    (Verdict::BuildFailed, format!("go list: {why}"))
                };
                results.push(PackageResult::without_run(target, &pname, verdict, detail));
                continue;
            }
            let key = package_key(index, target, &ctx, &mut hashes).with_context(|| {
                format!("failed to derive the cache key of {target} on {pname}")
            })?;
            units.push(Unit {
                platform: pname.clone(),
                import_path: target.clone(),
                step_name: names.get(target).cloned().unwrap_or_default(),
                key,
            });
        }
    }
    Ok((units, results))
}

/// Jobs.LookupSteps for every unit; hits by key.
/// Results produced under emulation count only with `allow_emulation`.
async fn lookup(
    client: &mut FarmClient,
    units: &[Unit],
    allow_emulation: bool,
) -> anyhow::Result<HashMap<String, StepResult>> {
    let mut hits = HashMap::new();
    for chunk in units.chunks(100_000) {
        let response = rpc(client
            .jobs
            .lookup_steps(v1::LookupStepsRequest {
                cache_keys: chunk.iter().map(|u| u.key.hex()).collect(),
                allow_emulation,
            })
            .await)
        .context("failed to look up the step cache")?;
        for hit in response.hits {
            if let Some(mut r) = hit.result {
                r.cached = true;
                hits.insert(hit.cache_key, r);
            }
        }
    }
    Ok(hits)
}

/// Builds the misses' test binaries, stages their trees; returns the staged steps and the
/// build failures as results.
async fn build_and_stage(
    cwd: &Path,
    stage: &Path,
    units: Vec<Unit>,
    platforms: &[Platform],
    dirs: &HashMap<(String, String), PathBuf>,
    args: &GoTestArgs,
    cgo: bool,
) -> anyhow::Result<(Vec<(Staged, LocalTree)>, Vec<PackageResult>)> {
    let by_name: HashMap<String, &Platform> =
        platforms.iter().map(|p| (p.to_string(), p)).collect();
    let requests: Vec<build::BuildRequest> = units
        .iter()
        .map(|u| {
            let p = by_name[&u.platform];
            build::BuildRequest {
                import_path: u.import_path.clone(),
                output: step_dir(stage, p, &u.step_name).join(steps::TEST_BINARY),
                env: platform_env(p, cgo),
            }
        })
        .collect();
    let built = build::build_all(cwd, &requests, args.race, args.tags.as_deref()).await;
    let mut staged = Vec::new();
    let mut failed = Vec::new();
    for ((unit, request), outcome) in units.into_iter().zip(&requests).zip(built) {
        if let Err(output) = outcome {
            eprintln!(
                "FAIL\t{} [build failed on {}]",
                unit.import_path, unit.platform
            );
            failed.push(PackageResult::without_run(
                &unit.import_path,
                &unit.platform,
                Verdict::BuildFailed,
                output,
            ));
            continue;
        }
        let dir = request
            .output
            .parent()
            .map(Path::to_path_buf)
            .context("a test binary has no directory")?;
        let pkg_dir = dirs
            .get(&(unit.platform.clone(), unit.import_path.clone()))
            .cloned()
            .context("a package without a directory")?;
        let tree = tokio::task::spawn_blocking(move || {
            steps::stage_sources(&dir, &pkg_dir)?;
            build_local_tree(&dir)
        })
        .await
        .context("failed to join the staging task")?
        .with_context(|| {
            format!(
                "failed to stage the step of {} on {}",
                unit.import_path, unit.platform
            )
        })?;
        staged.push((
            Staged {
                unit,
                input_root: tree.root,
            },
            tree,
        ));
    }
    Ok((staged, failed))
}

fn step_dir(stage: &Path, platform: &Platform, name: &str) -> PathBuf {
    stage.join(steps::platform_slug(platform)).join(name)
}

/// A job of step sets for `steps` (platform, step) with each step's `-test.run` pattern.
struct StepJob<'a> {
    steps: Vec<(&'a Staged, Option<String>)>,
    platforms: &'a [String],
    rerun: bool,
}

impl StepJob<'_> {
    fn spec(&self, args: &GoTestArgs, minor: Option<u32>, env: &[(String, String)]) -> v1::JobSpec {
        let watchdog = args.timeout + steps::WATCHDOG_GRACE;
        let mut step_sets = Vec::new();
        let mut longest_platform = 0u64;
        for platform in self.platforms {
            let steps: Vec<v1::Step> = self
                .steps
                .iter()
                .filter(|(s, _)| s.unit.platform == *platform)
                .map(|(s, pattern)| v1::Step {
                    name: s.unit.step_name.clone(),
                    argv: steps::step_argv(&steps::test_args(
                        minor,
                        args.timeout,
                        pattern.as_deref(),
                    )),
                    working_directory: steps::SRC_DIR.to_string(),
                    input_root: Some(s.input_root.to_proto()),
                    timeout_ms: millis(watchdog),
                    history_key: if self.rerun {
                        format!("{} (rerun)", s.unit.import_path)
                    } else {
                        s.unit.import_path.clone()
                    },
                    cache_key: if self.rerun {
                        String::new()
                    } else {
                        s.unit.key.hex()
                    },
                })
                .collect();
            if steps.is_empty() {
                continue;
            }
            longest_platform = longest_platform.max(millis(watchdog) * steps.len() as u64);
            step_sets.push(v1::PlatformSteps {
                platform: platform.clone(),
                steps,
            });
        }
        let (shards, shard_target_ms) = if self.rerun { (0, 0) } else { args.sharding() };
        let packages = self.steps.len();
        v1::JobSpec {
            platforms: Vec::new(),
            argv: Vec::new(),
            env: env
                .iter()
                .map(|(name, value)| v1::EnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            timeout_ms: (longest_platform + 60_000).min(24 * 3_600_000),
            input_root: None,
            allow_emulation: args.allow_emulation,
            required_labels: Vec::new(),
            working_directory: String::new(),
            description: format!(
                "go-test{}: {packages} package run{} on {} platform{}",
                if self.rerun { " rerun" } else { "" },
                if packages == 1 { "" } else { "s" },
                step_sets.len(),
                if step_sets.len() == 1 { "" } else { "s" }
            ),
            output_paths: Vec::new(),
            no_cache: args.no_cache || self.rerun,
            step_sets,
            shards,
            shard_target_ms,
            exclusive: false,
            network: false,
            cache_untrusted: args.cache.cache_untrusted,
            cache_emulated: args.cache.cache_emulated,
        }
    }
}

/// Submits a job and follows it; returns its final status.
async fn run_steps(
    client: &mut FarmClient,
    spec: v1::JobSpec,
    verbosity: Verbosity,
    packages: usize,
) -> anyhow::Result<JobStatus> {
    let platforms = spec.step_sets.len();
    let job_id = rpc(client
        .jobs
        .submit(v1::SubmitRequest { spec: Some(spec) })
        .await)
    .context("failed to submit the go-test job")?
    .job_id;
    let shards = crate::farm::job::get_job(client, &job_id)
        .await
        .map(|j| j.actions.len())
        .unwrap_or(0);
    eprintln!(
        "job {job_id}: running {packages} package{} on {platforms} platform{} in {shards} shard{}",
        if packages == 1 { "" } else { "s" },
        if platforms == 1 { "" } else { "s" },
        if shards == 1 { "" } else { "s" },
    );
    follow_job(client, &job_id, verbosity).await
}

/// By (platform, step name).
pub(crate) type ByStep<T> = HashMap<(String, String), T>;

/// Step results of a finished job by (platform, step name), and for steps without one, why.
pub(crate) fn step_results(job: &JobStatus) -> (ByStep<StepResult>, ByStep<String>) {
    let mut results = HashMap::new();
    let mut missing = HashMap::new();
    for a in &job.actions {
        if let Some(r) = &a.result {
            for s in &r.step_results {
                results.insert((a.platform.clone(), s.name.clone()), s.clone());
            }
        }
        for name in &a.step_names {
            let k = (a.platform.clone(), name.clone());
            if results.contains_key(&k) {
                continue;
            }
            let state = crate::farm::display::action_state_name(a.state());
            let why = [
                a.reason.as_str(),
                a.result.as_ref().map_or("", |r| r.message.as_str()),
            ]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or("no step result");
            missing.insert(
                k,
                format!(
                    "the farm did not run it: shard {} {}: {why}",
                    a.action_id,
                    crate::farm::display::words(state)
                ),
            );
        }
    }
    (results, missing)
}

/// The output blob a step result names; None for no output.
pub(crate) fn output_digest(step: &StepResult) -> anyhow::Result<Option<Digest>> {
    match step.output.as_ref() {
        Some(d) => {
            let d = Digest::from_proto(d).context("the step result names a bad output digest")?;
            Ok((d.size_bytes() > 0).then_some(d))
        }
        None => Ok(None),
    }
}

/// Reads the small outputs of `steps` in BatchRead batches (one call for many packages
/// rather than one each). A batch that fails is left out: its blobs are read one by one later,
/// so that one missing blob spoils only its own package.
pub(crate) async fn prefetch_outputs<'a>(
    client: &mut FarmClient,
    steps: impl IntoIterator<Item = &'a StepResult>,
) -> HashMap<Digest, Vec<u8>> {
    let mut small: Vec<Digest> = steps
        .into_iter()
        .filter_map(|s| output_digest(s).ok().flatten())
        .filter(|d| d.size_bytes() <= MAX_BATCH_BLOB_BYTES)
        .collect();
    small.sort();
    small.dedup();
    let mut fetched = HashMap::new();
    for batch in plan_batches(&small) {
        if let Ok(blobs) = batch_read(client, &batch).await {
            fetched.extend(batch.into_iter().zip(blobs));
        }
    }
    fetched
}

/// A step's output converted into events.
async fn step_events(
    client: &mut FarmClient,
    cwd: &Path,
    import_path: &str,
    step: &StepResult,
    prefetched: &HashMap<Digest, Vec<u8>>,
) -> anyhow::Result<Vec<TestEvent>> {
    let raw = match output_digest(step)? {
        Some(d) => match prefetched.get(&d) {
            Some(bytes) => bytes.clone(),
            None => read_blob(client, d)
                .await
                .with_context(|| format!("failed to read the output of {import_path}"))?,
        },
        None => Vec::new(),
    };
    test2json(cwd, import_path, &raw).await
}

/// Converts step results into package results: outputs read in batches, then converted a few
/// at a time.
async fn convert(
    client: &mut FarmClient,
    cwd: &Path,
    items: Vec<(String, String, StepResult)>,
) -> Vec<PackageResult> {
    let prefetched = prefetch_outputs(client, items.iter().map(|(_, _, s)| s)).await;
    let prefetched = &prefetched;
    let shared = client.clone();
    futures::stream::iter(items)
        .map(|(import_path, platform, step)| {
            let mut client = shared.clone();
            async move {
                match step_events(&mut client, cwd, &import_path, &step, prefetched).await {
                    Ok(events) => PackageResult::from_step(&import_path, &platform, &step, events),
                    Err(e) => PackageResult::without_run(
                        &import_path,
                        &platform,
                        Verdict::Infra,
                        format!("{e:#}"),
                    ),
                }
            }
        })
        .buffered(PARALLEL_CONVERSIONS)
        .collect()
        .await
}

/// Prints what failed, flaked or could not run, with its output, on stdout like `go test`.
fn print_problems(results: &Results) {
    for r in results.values() {
        let emulated = if r.emulated { " (emulated)" } else { "" };
        match r.verdict {
            Verdict::Fail | Verdict::BuildFailed | Verdict::Hang | Verdict::Infra => {
                println!(
                    "--- {} {} on {}{emulated}",
                    r.verdict.word().to_uppercase(),
                    r.import_path,
                    r.platform
                );
                for t in r.tests.iter().filter(|t| {
                    matches!(
                        t.outcome,
                        events::TestOutcome::Fail | events::TestOutcome::Unfinished
                    )
                }) {
                    print!("{}", t.output);
                }
                if !r.output.trim().is_empty()
                    && r.tests
                        .iter()
                        .all(|t| t.outcome != events::TestOutcome::Fail)
                {
                    print!("{}", r.output);
                }
                if !r.detail.is_empty() {
                    println!("{}", r.detail.trim_end());
                }
            }
            Verdict::Flaky => {
                let names: Vec<&str> = r
                    .tests
                    .iter()
                    .filter(|t| t.flaky)
                    .map(|t| t.name.as_str())
                    .collect();
                println!(
                    "--- FLAKY {} on {}{emulated}: {} failed at first and passed on a rerun",
                    r.import_path,
                    r.platform,
                    names.join(", ")
                );
            }
            _ => {}
        }
    }
}

/// `archfarm go-test`: returns the exit code (1 when anything failed, hung or could
/// not run).
pub async fn command(client: &mut FarmClient, args: &GoTestArgs) -> anyhow::Result<u8> {
    let platforms = args.platforms()?;
    let platform_names: Vec<String> = platforms.iter().map(ToString::to_string).collect();
    let job_env = args.job_env()?;
    let cgo = args.race;
    let cwd = std::env::current_dir().context("failed to read the current directory")?;
    let version = go_version(&cwd).await?;
    let minor = go_minor_version(&version);
    let patterns = if args.packages.is_empty() {
        vec![".".to_string()]
    } else {
        args.packages.clone()
    };
    let tags = args.tags.as_deref();
    let verbosity = if args.verbose {
        Verbosity::Verbose
    } else {
        Verbosity::Quiet
    };

    // The named packages, and which of them have tests.
    let named = go_list(
        &cwd,
        &platform_env(&platforms[0], cgo),
        &[],
        tags,
        &patterns,
    )
    .await?;
    let mut results: Results = BTreeMap::new();
    let mut targets: Vec<String> = Vec::new();
    for p in &named {
        if let Some(err) = &p.error {
            let text = err.to_string();
            if text.contains("no Go files")
                || text.contains("build constraints exclude all Go files")
            {
                println!("?   \t{}\t[no Go files]", p.import_path);
                continue;
            }
            eprintln!("FAIL\t{} [setup failed]: {text}", p.import_path);
            for pn in &platform_names {
                let r = PackageResult::without_run(
                    &p.import_path,
                    pn,
                    Verdict::BuildFailed,
                    format!("go list: {text}"),
                );
                results.insert((p.import_path.clone(), pn.clone()), r);
            }
        } else if !p.has_tests() {
            println!("?   \t{}\t[no test files]", p.import_path);
        } else if !targets.contains(&p.import_path) {
            targets.push(p.import_path.clone());
        }
    }
    targets.sort();
    let names: HashMap<String, String> = targets
        .iter()
        .cloned()
        .zip(steps::unique_step_names(&targets))
        .collect();

    // Every platform's own view (file sets differ), keys from what the toolchain would read.
    let indexes: Vec<PackageIndex> = futures::stream::iter(&platforms)
        .map(|p| {
            let env = platform_env(p, cgo);
            let cwd = cwd.clone();
            let targets = targets.clone();
            async move {
                if targets.is_empty() {
                    return Ok(PackageIndex::default());
                }
                go_list(&cwd, &env, &["-deps", "-test"], tags, &targets)
                    .await
                    .map(PackageIndex::new)
                    .with_context(|| format!("failed to list the packages for {p}"))
            }
        })
        .buffered(2)
        .collect::<Vec<anyhow::Result<PackageIndex>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let mut dirs: HashMap<(String, String), PathBuf> = HashMap::new();
    for (p, index) in platform_names.iter().zip(&indexes) {
        for t in &targets {
            if let Some(pkg) = index.get(t) {
                dirs.insert((p.clone(), t.clone()), golist::package_dir(pkg));
            }
        }
    }
    let mut key_env: Vec<(String, String)> = job_env.clone();
    // Everything that changes what `go test -c` builds goes into every key, as set here.
    for var in std::iter::once(&"GOFLAGS")
        .chain(PURE_BUILD_VARS)
        .chain(CGO_VARS)
    {
        if let Ok(v) = std::env::var(var) {
            key_env.push((format!("build:{var}"), v));
        }
    }
    let settings = KeySettings {
        go_version: version.clone(),
        cgo,
        tags: args.tags.clone().unwrap_or_default(),
        race: args.race,
        test_args: steps::test_args(minor, args.timeout, None),
        env: key_env,
    };
    let (units, unkeyed) = {
        let (t, n, p) = (targets.clone(), names.clone(), platforms.clone());
        tokio::task::spawn_blocking(move || plan_units(&t, &n, &p, &indexes, &settings))
            .await
            .context("failed to join the hashing task")??
    };
    for r in unkeyed {
        results.insert((r.import_path.clone(), r.platform.clone()), r);
    }

    // The step cache: hits need no build and no run.
    let hits = if args.no_cache || units.is_empty() {
        HashMap::new()
    } else {
        lookup(client, &units, args.allow_emulation).await?
    };
    let (hit_units, misses): (Vec<Unit>, Vec<Unit>) = units
        .into_iter()
        .partition(|u| hits.contains_key(&u.key.hex()));
    let cached: Vec<(String, String, StepResult)> = hit_units
        .iter()
        .map(|u| {
            (
                u.import_path.clone(),
                u.platform.clone(),
                hits[&u.key.hex()].clone(),
            )
        })
        .collect();
    eprintln!(
        "{} package{} with tests on {} platform{}: {} cached, {} to build and run",
        targets.len(),
        if targets.len() == 1 { "" } else { "s" },
        platforms.len(),
        if platforms.len() == 1 { "" } else { "s" },
        cached.len(),
        misses.len()
    );

    // Build, stage, upload, run.
    let stage = tempfile::Builder::new()
        .prefix("archfarm-go-test-")
        .tempdir()
        .context("failed to create a staging directory")?;
    let mut job: Option<JobStatus> = None;
    let mut staged: Vec<Staged> = Vec::new();
    if !misses.is_empty() {
        let started = std::time::Instant::now();
        let count = misses.len();
        let (built, failed) =
            build_and_stage(&cwd, stage.path(), misses, &platforms, &dirs, args, cgo).await?;
        eprintln!(
            "built {} of {count} test binar{} in {}",
            built.len(),
            if count == 1 { "y" } else { "ies" },
            crate::farm::display::format_duration(started.elapsed())
        );
        for r in failed {
            results.insert((r.import_path.clone(), r.platform.clone()), r);
        }
        if !built.is_empty() {
            let all = LocalTree::merge(built.iter().map(|(_, t)| t));
            let uploaded = upload_tree(client, &all, Progress::Auto).await?;
            eprintln!("{}", uploaded.summary());
            staged = built.into_iter().map(|(s, _)| s).collect();
            let step_job = StepJob {
                steps: staged.iter().map(|s| (s, None)).collect(),
                platforms: &platform_names,
                rerun: false,
            };
            let spec = step_job.spec(args, minor, &job_env);
            job = Some(run_steps(client, spec, verbosity, staged.len()).await?);
        }
    }

    // Verdicts from every step result, cached or run.
    let mut to_convert = cached;
    if let Some(job) = &job {
        let (ran, missing) = step_results(job);
        for s in &staged {
            let k = (s.unit.platform.clone(), s.unit.step_name.clone());
            match ran.get(&k) {
                Some(r) => to_convert.push((
                    s.unit.import_path.clone(),
                    s.unit.platform.clone(),
                    r.clone(),
                )),
                None => {
                    let why = missing
                        .get(&k)
                        .cloned()
                        .unwrap_or_else(|| "the farm returned no result for it".to_string());
                    let r = PackageResult::without_run(
                        &s.unit.import_path,
                        &s.unit.platform,
                        Verdict::Infra,
                        why,
                    );
                    results.insert((r.import_path.clone(), r.platform.clone()), r);
                }
            }
        }
    }
    for r in convert(client, &cwd, to_convert).await {
        results.insert((r.import_path.clone(), r.platform.clone()), r);
    }

    // Reruns of failed tests.
    for round in 1..=args.rerun_fails {
        let wanted: Vec<(&Staged, Option<String>)> = staged
            .iter()
            .filter_map(|s| {
                let r = results.get(&(s.unit.import_path.clone(), s.unit.platform.clone()))?;
                let selection = r.rerun_selection()?;
                Some((s, rerun::run_pattern(&selection)))
            })
            .collect();
        if wanted.is_empty() {
            break;
        }
        eprintln!(
            "rerun {round} of {}: {} failed package run{}",
            args.rerun_fails,
            wanted.len(),
            if wanted.len() == 1 { "" } else { "s" }
        );
        let count = wanted.len();
        let rerun_job = StepJob {
            steps: wanted,
            platforms: &platform_names,
            rerun: true,
        };
        let spec = rerun_job.spec(args, minor, &job_env);
        let finished = run_steps(client, spec, verbosity, count).await?;
        let (ran, missing) = step_results(&finished);
        let prefetched = prefetch_outputs(client, ran.values()).await;
        for (s, _) in &rerun_job.steps {
            let k = (s.unit.platform.clone(), s.unit.step_name.clone());
            let Some(step) = ran.get(&k) else {
                eprintln!(
                    "rerun of {} on {} did not run: {}",
                    s.unit.import_path,
                    s.unit.platform,
                    missing.get(&k).map_or("no result", String::as_str)
                );
                continue;
            };
            let events =
                match step_events(client, &cwd, &s.unit.import_path, step, &prefetched).await {
                    Ok(e) => e,
                    Err(e) => {
                        eprintln!(
                            "rerun of {} on {}: {e:#}",
                            s.unit.import_path, s.unit.platform
                        );
                        continue;
                    }
                };
            if let Some(r) = results.get_mut(&(s.unit.import_path.clone(), s.unit.platform.clone()))
            {
                r.apply_rerun(step, events);
            }
        }
    }

    // Reports.
    print_problems(&results);
    if let Some(dir) = &args.json {
        for path in report::write_json_streams(dir, &platform_names, &results)? {
            eprintln!("wrote {}", path.display());
        }
    }
    if let Some(dir) = &args.junit {
        for p in &platform_names {
            let report =
                junit::platform_report(results.values().filter(|r| r.platform == *p), &version);
            let path = junit::write_report(dir, p, &report)?;
            eprintln!("wrote {}", path.display());
        }
    }
    if !results.is_empty() {
        println!("{}", report::matrix(&platform_names, &results));
    }
    if let Some(job) = &job {
        for m in report::makespans(&platform_names, &job.actions) {
            println!("{}", report::makespan_line(&m));
        }
    }
    println!("{}", report::verdict_counts(&results));
    Ok(report::exit_code(&results))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: GoTestArgs,
    }

    #[test]
    fn the_command_line_reads_like_go_test() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "go-test",
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/s390x",
            "--shard-target",
            "90s",
            "--rerun-fails",
            "2",
            "--env",
            "FLAKY_MARKER=x",
            "--tags",
            "integration",
            "-v",
            "./...",
            "k8s.io/utils/lru",
        ])
        .unwrap();
        let a = cli.args;
        assert_eq!(a.platforms, ["linux/arm64", "linux/s390x"]);
        assert_eq!(a.sharding(), (0, 90_000));
        assert_eq!(a.rerun_fails, 2);
        assert_eq!(a.timeout, Duration::from_secs(600));
        assert_eq!(
            a.job_env().unwrap(),
            [("FLAKY_MARKER".to_string(), "x".to_string())]
        );
        assert!(a.verbose && !a.race && !a.no_cache);
        assert_eq!(a.packages, ["./...", "k8s.io/utils/lru"]);
        let both = Cli::try_parse_from(["go-test", "--shards", "3", "--shard-target", "1m", "."]);
        assert!(
            both.is_err(),
            "--shards and --shard-target exclude each other"
        );
    }

    #[test]
    fn platforms_default_and_race_is_checked() {
        let args = GoTestArgs::new(["./..."]);
        assert_eq!(args.platforms().unwrap()[0].to_string(), "linux/amd64");
        let mut args = GoTestArgs::new(["./..."]);
        args.platforms = vec!["linux/arm64".into(), "linux/s390x".into()];
        args.race = true;
        let e = args.platforms().unwrap_err().to_string();
        assert!(e.contains("linux/s390x"), "{e}");
        args.platforms = vec!["linux/arm64".into(), "linux/arm64".into()];
        args.race = false;
        assert!(args.platforms().is_err());
        args.platforms = vec!["linux/mips".into()];
        assert!(args.platforms().is_err());
    }

    #[test]
    fn sharding_defaults_to_a_two_minute_target() {
        let mut args = GoTestArgs::new(["."]);
        assert_eq!(args.sharding(), (0, 120_000));
        args.shards = Some(3);
        assert_eq!(args.sharding(), (3, 0));
        args.shards = None;
        args.shard_target = Some(Duration::from_secs(30));
        assert_eq!(args.sharding(), (0, 30_000));
    }

    #[test]
    fn step_jobs_carry_keys_only_on_first_runs() {
        let unit = Unit {
            platform: "linux/arm64".into(),
            import_path: "example.com/fixtures/fail".into(),
            step_name: "example.com_fixtures_fail".into(),
            key: CacheKey([7; 32]),
        };
        let staged = Staged {
            unit,
            input_root: Digest::of(b"root"),
        };
        let mut args = GoTestArgs::new(["."]);
        args.timeout = Duration::from_secs(180);
        args.allow_emulation = true;
        let platforms = vec!["linux/amd64".to_string(), "linux/arm64".to_string()];
        let env = vec![("FLAKY_MARKER".to_string(), "x".to_string())];
        let first = StepJob {
            steps: vec![(&staged, None)],
            platforms: &platforms,
            rerun: false,
        }
        .spec(&args, Some(19), &env);
        assert_eq!(
            first.step_sets.len(),
            1,
            "platforms without steps are left out"
        );
        assert!(first.platforms.is_empty() && first.argv.is_empty());
        let step = &first.step_sets[0].steps[0];
        assert_eq!(
            step.argv,
            [
                "../pkg.test",
                "-test.v",
                "-test.paniconexit0",
                "-test.timeout=180s",
                "-test.count=1"
            ]
        );
        assert_eq!(step.working_directory, "src");
        assert_eq!(step.timeout_ms, 210_000);
        assert_eq!(step.history_key, "example.com/fixtures/fail");
        assert_eq!(step.cache_key, CacheKey([7; 32]).hex());
        assert_eq!((first.shards, first.shard_target_ms), (0, 120_000));
        assert!(first.allow_emulation && !first.no_cache);
        assert_eq!(first.env[0].name, "FLAKY_MARKER");

        let rerun = StepJob {
            steps: vec![(&staged, Some("^(TestAlwaysFails)$".to_string()))],
            platforms: &platforms,
            rerun: true,
        }
        .spec(&args, Some(19), &env);
        let step = &rerun.step_sets[0].steps[0];
        assert_eq!(step.argv.last().unwrap(), "-test.run=^(TestAlwaysFails)$");
        assert!(step.cache_key.is_empty());
        assert!(rerun.no_cache);
    }
}
