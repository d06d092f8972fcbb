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
pub mod step_job;
pub mod steps;
pub mod units;
pub mod verdict;
pub mod watch;

use crate::farm::args::{ensure_unique, parse_env_var, CachePolicyArgs, EnvVarArg};
use crate::farm::upload::{upload_tree, Progress, UploadReport};
use crate::farm::FarmClient;
use crate::go_vars::{CGO_VARS, PURE_BUILD_VARS};
use anyhow::{bail, Context};
use archfarm_proto::tree::LocalTree;
use archfarm_proto::v1::{JobStatus, StepResult};
use archfarm_proto::Platform;
use futures::StreamExt;
use golist::{go_list, go_minor_version, go_version, platform_env, PackageIndex};
pub use report::GoTestReport;
use report::Results;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;
use step_job::{convert, prefetch_outputs, run_steps, step_events, step_results, StepJob};
use units::{build_and_stage, lookup, plan_units, KeySettings, Staged, Unit};
use verdict::{PackageResult, Verdict};
pub use watch::WatchProgress;

/// The platform tested unless `--platform` says otherwise.
pub const DEFAULT_PLATFORM: &str = "linux/amd64";
/// Shard size aimed at unless `--shards` or `--shard-target` says otherwise.
pub const DEFAULT_SHARD_TARGET: Duration = Duration::from_secs(120);
/// Platforms where Go's race detector exists.
pub const RACE_ARCHES: &[&str] = &["amd64", "arm64", "ppc64le"];

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

/// `d` in whole milliseconds, for the job spec.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What go-test does on its way to the report, in order: the caller shows it (the command
/// line prints go test's `?` and `FAIL` lines and the progress lines), a test collects it.
#[derive(Debug, Clone, PartialEq)]
pub enum GoTestProgress {
    /// A named package has no Go files (for the first platform): `go test` says `?`.
    NoGoFiles {
        /// Import path.
        package: String,
    },
    /// A named package has no test files.
    NoTestFiles {
        /// Import path.
        package: String,
    },
    /// `go list` reported an error for a named package; it fails on every platform.
    SetupFailed {
        /// Import path.
        package: String,
        /// What `go list` said.
        error: String,
    },
    /// Packages keyed and looked up in the step cache.
    Planned {
        /// Packages with tests.
        packages: usize,
        /// Platforms.
        platforms: usize,
        /// (package, platform) runs the farm holds a passing result for.
        cached: usize,
        /// How many of those came from each cache scope (`shared`, `principal NAME`).
        cached_by_scope: std::collections::BTreeMap<String, usize>,
        /// Runs to build and run.
        to_run: usize,
    },
    /// A test binary failed to build.
    BuildFailed {
        /// Import path.
        package: String,
        /// Platform.
        platform: String,
    },
    /// Test binaries built.
    Built {
        /// Built.
        built: usize,
        /// Tried.
        of: usize,
        /// How long building took.
        took: Duration,
    },
    /// The staged steps are in the farm's CAS.
    Uploaded(UploadReport),
    /// A job was submitted.
    Submitted {
        /// Its id.
        job_id: String,
        /// Package runs in it.
        packages: usize,
        /// Platforms in it.
        platforms: usize,
        /// Shards (actions) the coordinator made of it.
        shards: usize,
    },
    /// Following a job.
    Watch(WatchProgress),
    /// A round of reruns of failed tests begins.
    RerunStarted {
        /// 1, 2, ...
        round: u32,
        /// `--rerun-fails`.
        of: u32,
        /// Failed package runs rerun.
        runs: usize,
    },
    /// A rerun did not run; the first verdict stands.
    RerunNotRun {
        /// Import path.
        package: String,
        /// Platform.
        platform: String,
        /// Why.
        why: String,
    },
    /// A rerun's output could not be read; the first verdict stands.
    RerunUnreadable {
        /// Import path.
        package: String,
        /// Platform.
        platform: String,
        /// The error's words.
        error: String,
    },
}

/// go-test: lists the packages, keys them, runs the misses on the farm (with reruns of failed
/// tests), and returns every (package, platform) verdict. Progress goes to `progress` as it
/// happens; nothing is printed and no report file written (the caller renders the report).
pub async fn go_test(
    client: &mut FarmClient,
    args: &GoTestArgs,
    progress: &mut (dyn FnMut(GoTestProgress) + Send),
) -> anyhow::Result<GoTestReport> {
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
                progress(GoTestProgress::NoGoFiles {
                    package: p.import_path.clone(),
                });
                continue;
            }
            progress(GoTestProgress::SetupFailed {
                package: p.import_path.clone(),
                error: text.clone(),
            });
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
            progress(GoTestProgress::NoTestFiles {
                package: p.import_path.clone(),
            });
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
    let mut cached_by_scope = std::collections::BTreeMap::new();
    for (_, _, r) in &cached {
        let scope = r
            .cache_origin
            .as_ref()
            .map_or("unknown", |o| o.scope.as_str());
        *cached_by_scope.entry(scope.to_string()).or_insert(0) += 1;
    }
    progress(GoTestProgress::Planned {
        packages: targets.len(),
        platforms: platforms.len(),
        cached: cached.len(),
        cached_by_scope,
        to_run: misses.len(),
    });

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
        let (built, failed) = build_and_stage(
            &cwd,
            stage.path(),
            misses,
            &platforms,
            &dirs,
            args,
            cgo,
            progress,
        )
        .await?;
        progress(GoTestProgress::Built {
            built: built.len(),
            of: count,
            took: started.elapsed(),
        });
        for r in failed {
            results.insert((r.import_path.clone(), r.platform.clone()), r);
        }
        if !built.is_empty() {
            let all = LocalTree::merge(built.iter().map(|(_, t)| t));
            let uploaded = upload_tree(client, &all, Progress::Auto).await?;
            progress(GoTestProgress::Uploaded(uploaded));
            staged = built.into_iter().map(|(s, _)| s).collect();
            let step_job = StepJob {
                steps: staged.iter().map(|s| (s, None)).collect(),
                platforms: &platform_names,
                rerun: false,
            };
            let spec = step_job.spec(args, minor, &job_env);
            job = Some(run_steps(client, spec, staged.len(), progress).await?);
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
        progress(GoTestProgress::RerunStarted {
            round,
            of: args.rerun_fails,
            runs: wanted.len(),
        });
        let count = wanted.len();
        let rerun_job = StepJob {
            steps: wanted,
            platforms: &platform_names,
            rerun: true,
        };
        let spec = rerun_job.spec(args, minor, &job_env);
        let finished = run_steps(client, spec, count, progress).await?;
        let (ran, missing) = step_results(&finished);
        let prefetched = prefetch_outputs(client, ran.values()).await;
        for (s, _) in &rerun_job.steps {
            let k = (s.unit.platform.clone(), s.unit.step_name.clone());
            let Some(step) = ran.get(&k) else {
                progress(GoTestProgress::RerunNotRun {
                    package: s.unit.import_path.clone(),
                    platform: s.unit.platform.clone(),
                    why: missing
                        .get(&k)
                        .map_or("no result", String::as_str)
                        .to_string(),
                });
                continue;
            };
            let events =
                match step_events(client, &cwd, &s.unit.import_path, step, &prefetched).await {
                    Ok(e) => e,
                    Err(e) => {
                        progress(GoTestProgress::RerunUnreadable {
                            package: s.unit.import_path.clone(),
                            platform: s.unit.platform.clone(),
                            error: format!("{e:#}"),
                        });
                        continue;
                    }
                };
            if let Some(r) = results.get_mut(&(s.unit.import_path.clone(), s.unit.platform.clone()))
            {
                r.apply_rerun(step, events);
            }
        }
    }

    let makespans = job
        .as_ref()
        .map(|job| report::makespans(&platform_names, &job.actions))
        .unwrap_or_default();
    Ok(GoTestReport {
        platforms: platform_names,
        go_version: version,
        results,
        makespans,
    })
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
}
