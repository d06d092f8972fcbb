//! `archfarm ginkgo`: a ginkgo suite (Kubernetes' node-e2e shape) cross-compiled here,
//! its specs listed by a local dry run, sharded by location, and run only on agents labelled
//! `node-e2e`, each shard with the agent to itself.
//!
//! The flow: `go list -test` the package and check it uses ginkgo v1 (Debian bookworm packages
//! only v1; v2 suites are refused with a message saying so); `go test -c` the suite for the
//! target platform and for this machine (CGO_ENABLED=0); run this machine's binary with
//! `-ginkgo.dryRun -ginkgo.v -ginkgo.noColor` (plus `--focus`/`--skip`) and parse the specs
//! ([`output`]); group them by location into `--shards` shards, each a step that runs the
//! target binary in a copy of the package directory with a focus matching exactly its specs
//! ([`shards`]); submit one job of step sets with `required_labels: [node-e2e]` and
//! `exclusive: true`, uncached; follow it; read every step's output and report per shard and
//! spec ([`report`]): a table, JUnit XML, a non-zero exit on any failure.

pub mod output;
pub mod report;
pub mod shards;

use crate::farm::args::{ensure_unique, parse_env_var, EnvVarArg};
use crate::farm::blobs::read_blob;
use crate::farm::upload::{upload_tree, Progress, UploadReport};
use crate::farm::{rpc, FarmClient};
use crate::gotest::build::{build_all, BuildRequest};
use crate::gotest::golist::{go_list, package_dir, platform_env, GoPackage, PackageIndex};
use crate::gotest::step_job::{output_digest, prefetch_outputs, step_results};
use crate::gotest::steps::{go_duration, stage_sources, SRC_DIR, TEST_BINARY, WATCHDOG_GRACE};
use crate::gotest::watch::{follow_job, WatchProgress};
use anyhow::{bail, Context};
use archfarm_proto::tree::build_local_tree;
use archfarm_proto::v1::{self, JobStatus};
use archfarm_proto::Platform;
use output::Spec;
pub use report::GinkgoReport;
use report::ShardResult;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The label an agent must carry to receive node-e2e work.
pub const NODE_E2E_LABEL: &str = "node-e2e";
/// ginkgo v1's import path.
pub const GINKGO_V1: &str = "github.com/onsi/ginkgo";
/// ginkgo v2's import path.
pub const GINKGO_V2: &str = "github.com/onsi/ginkgo/v2";
/// How long the local dry run may take.
const DRY_RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit code of a ginkgo v1 suite that passed with programmatically focused specs (FIt).
const GINKGO_FOCUS_EXIT_CODE: i32 = 197;

/// `archfarm ginkgo --platform P [options] [PKG]`.
#[derive(clap::Args, Debug, Clone)]
pub struct GinkgoArgs {
    /// Platform to run the suite on, e.g. linux/arm64.
    #[arg(long, value_name = "PLATFORM")]
    pub platform: String,
    /// Run only specs whose text matches (ginkgo's -focus); repeatable, ORed.
    #[arg(long = "focus", value_name = "REGEX")]
    pub focus: Vec<String>,
    /// Leave out specs whose text matches (ginkgo's -skip); repeatable, ORed.
    #[arg(long = "skip", value_name = "REGEX")]
    pub skip: Vec<String>,
    /// Ginkgo v2 label filter; refused for ginkgo v1 suites, which have no labels.
    #[arg(long, value_name = "FILTER")]
    pub label_filter: Option<String>,
    /// Split the specs into this many shards by location (one agent each, at a time).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub shards: u32,
    /// `-test.timeout` of each shard's suite binary; the farm's watchdog kills it 30s later.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write junit_<os>_<arch>.xml into DIR.
    #[arg(long, value_name = "DIR")]
    pub junit: Option<PathBuf>,
    /// Let an agent that emulates the platform (qemu-user) run it.
    #[arg(long)]
    pub allow_emulation: bool,
    /// Environment variable for the suite binary; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var)]
    pub env: Vec<EnvVarArg>,
    /// Build tags, as for `go test -tags`.
    #[arg(long, value_name = "TAGS")]
    pub tags: Option<String>,
    /// Print every state change and the shards' raw output.
    #[arg(short, long)]
    pub verbose: bool,
    /// The suite's package, as for `go test` (default: the current directory's).
    #[arg(value_name = "PKG")]
    pub package: Option<String>,
}

/// Which ginkgo a suite is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GinkgoMajor {
    /// github.com/onsi/ginkgo.
    V1,
    /// github.com/onsi/ginkgo/v2.
    V2,
}

/// The ginkgo a test main depends on (vendored copies included); None for none.
pub fn ginkgo_major(test_main: &GoPackage) -> Option<GinkgoMajor> {
    let is = |dep: &str, path: &str| dep == path || dep.ends_with(&format!("/vendor/{path}"));
    if test_main.deps.iter().any(|d| is(d, GINKGO_V2)) {
        Some(GinkgoMajor::V2)
    } else if test_main.deps.iter().any(|d| is(d, GINKGO_V1)) {
        Some(GinkgoMajor::V1)
    } else {
        None
    }
}

/// The platform of this machine, whose binaries the dry run executes.
fn host_platform() -> anyhow::Result<Platform> {
    if std::env::consts::OS != "linux" {
        bail!(
            "the dry run needs a Linux machine (this is {})",
            std::env::consts::OS
        );
    }
    let machine = match std::env::consts::ARCH {
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64 (big-endian)",
        other => other,
    };
    Platform::from_uname_machine(machine)
        .with_context(|| format!("this machine's architecture {machine} has no Go platform"))
}

/// The dry run's arguments: list, verbose, plain, with the user's focus and skip.
pub fn dry_run_args(focus: &[String], skip: &[String]) -> Vec<String> {
    let mut args: Vec<String> = ["-ginkgo.dryRun", "-ginkgo.v", "-ginkgo.noColor"]
        .map(String::from)
        .to_vec();
    args.extend(focus.iter().map(|f| format!("-ginkgo.focus={f}")));
    args.extend(skip.iter().map(|s| format!("-ginkgo.skip={s}")));
    args
}

/// A shard step's argv: the suite binary one level above `src`, verbose and plain, the
/// shard's focus matched against spec texts and files, Go's own timeout.
pub fn shard_argv(focus: &str, timeout: Duration) -> Vec<String> {
    vec![
        format!("../{TEST_BINARY}"),
        "-ginkgo.noColor".to_string(),
        "-ginkgo.v".to_string(),
        "-ginkgo.regexScansFilePath".to_string(),
        format!("-ginkgo.focus={focus}"),
        format!("-test.timeout={}", go_duration(timeout)),
    ]
}

/// A shard's step name.
pub fn shard_step_name(number: usize, of: usize) -> String {
    format!("ginkgo-shard-{number}-of-{of}")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The job: one step per shard on one platform, only for agents labelled node-e2e, each
/// action with the agent to itself, never cached.
pub fn job_spec(
    args: &GinkgoArgs,
    platform: &str,
    import_path: &str,
    input_root: &archfarm_proto::Digest,
    focuses: &[String],
    spec_count: usize,
) -> anyhow::Result<v1::JobSpec> {
    ensure_unique("--env", args.env.iter().map(|e| e.name.as_str()))?;
    let mut env: Vec<v1::EnvVar> = args.env.iter().map(EnvVarArg::to_proto).collect();
    env.sort_by(|a, b| a.name.cmp(&b.name));
    let watchdog = args.timeout + WATCHDOG_GRACE;
    let n = focuses.len();
    let steps: Vec<v1::Step> = focuses
        .iter()
        .enumerate()
        .map(|(i, focus)| v1::Step {
            name: shard_step_name(i + 1, n),
            argv: shard_argv(focus, args.timeout),
            working_directory: SRC_DIR.to_string(),
            input_root: Some(input_root.to_proto()),
            timeout_ms: millis(watchdog),
            history_key: format!("{import_path} [ginkgo shard {}/{n}]", i + 1),
            cache_key: String::new(),
        })
        .collect();
    Ok(v1::JobSpec {
        platforms: Vec::new(),
        argv: Vec::new(),
        env,
        // Per action; an action normally holds one shard, but the limit covers all of them.
        timeout_ms: (millis(watchdog) * n as u64 + 60_000).min(24 * 3_600_000),
        input_root: None,
        allow_emulation: args.allow_emulation,
        required_labels: vec![v1::Label {
            key: NODE_E2E_LABEL.to_string(),
            value: String::new(),
        }],
        working_directory: String::new(),
        description: format!(
            "ginkgo: {import_path}, {spec_count} spec{} in {n} shard{} (node-e2e)",
            if spec_count == 1 { "" } else { "s" },
            if n == 1 { "" } else { "s" }
        ),
        output_paths: Vec::new(),
        no_cache: true,
        step_sets: vec![v1::PlatformSteps {
            platform: platform.to_string(),
            steps,
        }],
        shards: u32::try_from(n).unwrap_or(u32::MAX),
        shard_target_ms: 0,
        exclusive: true,
        network: false,
        // Nothing of a node-e2e run is cached (no_cache, no step cache keys).
        cache_untrusted: false,
        cache_emulated: false,
    })
}

/// The one package `pattern` names, its test main, and its ginkgo.
async fn resolve_package(
    cwd: &Path,
    env: &[(String, String)],
    tags: Option<&str>,
    pattern: &str,
) -> anyhow::Result<(GoPackage, GinkgoMajor)> {
    let listed = go_list(cwd, env, &["-test"], tags, &[pattern.to_string()]).await?;
    let index = PackageIndex::new(listed.clone());
    let named: Vec<&GoPackage> = listed
        .iter()
        .filter(|p| p.for_test.is_empty() && !p.import_path.ends_with(".test"))
        .collect();
    let pkg = match named.as_slice() {
        [one] => (*one).clone(),
        [] => bail!("{pattern} names no package"),
        many => bail!(
            "farm ginkgo runs one suite; {pattern} names {} packages ({})",
            many.len(),
            many.iter()
                .map(|p| p.import_path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if let Some(e) = pkg.errors() {
        bail!("{}: {e}", pkg.import_path);
    }
    if !pkg.has_tests() {
        bail!("{} has no test files, so no ginkgo suite", pkg.import_path);
    }
    let main = index
        .test_main(&pkg.import_path)
        .with_context(|| format!("go list shows no test main for {}", pkg.import_path))?;
    if let Some(e) = main.errors() {
        bail!("{}: {e}", pkg.import_path);
    }
    let major = ginkgo_major(main).with_context(|| {
        format!(
            "{}'s tests do not import ginkgo ({GINKGO_V1} or {GINKGO_V2})",
            pkg.import_path
        )
    })?;
    Ok((pkg, major))
}

/// Runs the dry run; returns what it printed.
async fn dry_run(binary: &Path, pkg_dir: &Path, args: &[String]) -> anyhow::Result<String> {
    let run = tokio::process::Command::new(binary)
        .args(args)
        .current_dir(pkg_dir)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DRY_RUN_TIMEOUT, run)
        .await
        .with_context(|| {
            format!(
                "the dry run of {} did not end within {}",
                binary.display(),
                go_duration(DRY_RUN_TIMEOUT)
            )
        })?
        .with_context(|| format!("failed to run {}", binary.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let code = out.status.code().unwrap_or(-1);
    if code != 0 && code != GINKGO_FOCUS_EXIT_CODE {
        bail!("the dry run failed ({}):\n{}", out.status, text.trim_end());
    }
    Ok(text)
}

/// The listed specs and the suite description, checked against the dry run's own count.
pub fn listed_specs(dry: &output::SuiteOutput, text: &str) -> anyhow::Result<(String, Vec<Spec>)> {
    let description = dry.description.clone().with_context(|| {
        format!(
            "the dry run printed no `Running Suite:` line; does the suite use ginkgo's default \
             reporter?\n{}",
            text.trim_end()
        )
    })?;
    let specs: Vec<Spec> = dry.specs.iter().map(|r| r.spec.clone()).collect();
    if let Some((will_run, _)) = dry.will_run {
        if will_run as usize != specs.len() {
            bail!(
                "the dry run says it will run {will_run} specs but announced {} that could be \
                 read (a spec text that spans lines in an unusual way?)",
                specs.len()
            );
        }
    }
    Ok((description, specs))
}

/// What a ginkgo run does on its way to the report, in order, for the caller to show.
#[derive(Debug, Clone, PartialEq)]
pub enum GinkgoProgress {
    /// The suite was built for the target platform and, for the dry run, this machine.
    Built {
        /// The suite's package.
        import_path: String,
        /// The target platform.
        platform: String,
        /// This machine's platform when it differs from the target.
        host: Option<String>,
        /// How long building took.
        took: Duration,
    },
    /// The dry run listed the specs and they were grouped into shards.
    Sharded {
        /// Specs selected.
        specs: usize,
        /// The suite's description.
        description: String,
        /// Shards made.
        shards: usize,
        /// `--shards` (more than `shards` when there were fewer location groups).
        asked: u32,
    },
    /// The step tree is in the farm's CAS.
    Uploaded(UploadReport),
    /// The job was submitted.
    Submitted {
        /// Its id.
        job_id: String,
        /// Shards in it.
        shards: usize,
        /// The platform.
        platform: String,
    },
    /// Following the job.
    Watch(WatchProgress),
}

/// Recorded on the actions cancelled by a Ctrl-C.
const GINKGO_CANCEL_REASON: &str = "cancelled by Ctrl-C in `archfarm ginkgo`";

/// ginkgo: builds the suite, lists and shards its specs, runs the shards on node-e2e agents
/// and returns every shard's verdict. Progress goes to `progress`; nothing is printed.
pub async fn ginkgo(
    client: &mut FarmClient,
    args: &GinkgoArgs,
    progress: &mut (dyn FnMut(GinkgoProgress) + Send),
) -> anyhow::Result<GinkgoReport> {
    let platform: Platform = args.platform.parse()?;
    let platform_name = platform.to_string();
    ensure_unique("--env", args.env.iter().map(|e| e.name.as_str()))?;
    let cwd = std::env::current_dir().context("failed to read the current directory")?;
    let pattern = args.package.clone().unwrap_or_else(|| ".".to_string());
    let tags = args.tags.as_deref();
    let target_env = platform_env(&platform, false);

    let (pkg, major) = resolve_package(&cwd, &target_env, tags, &pattern).await?;
    let import_path = pkg.import_path.clone();
    match (major, &args.label_filter) {
        (GinkgoMajor::V2, _) => bail!(
            "{import_path} uses ginkgo v2 ({GINKGO_V2}); farm ginkgo runs ginkgo v1 suites \
             ({GINKGO_V1}) only, since Debian bookworm packages v1 alone and v2 could not be \
             tested here"
        ),
        (GinkgoMajor::V1, Some(filter)) => bail!(
            "--label-filter {filter:?}: spec labels are a ginkgo v2 feature and {import_path} \
             uses ginkgo v1; select specs by their text with --focus and --skip instead, e.g. \
             --focus '\\[NodeConformance\\]'"
        ),
        (GinkgoMajor::V1, None) => {}
    }

    // Build the suite for the target and, for the dry run, for this machine.
    let stage = tempfile::Builder::new()
        .prefix("archfarm-ginkgo-")
        .tempdir()
        .context("failed to create a staging directory")?;
    let step_dir = stage.path().join("step");
    let host = host_platform()?;
    let mut requests = vec![BuildRequest {
        import_path: import_path.clone(),
        output: step_dir.join(TEST_BINARY),
        env: target_env.clone(),
    }];
    if host != platform {
        requests.push(BuildRequest {
            import_path: import_path.clone(),
            output: stage.path().join("host").join(TEST_BINARY),
            env: platform_env(&host, false),
        });
    }
    let started = std::time::Instant::now();
    for (r, built) in requests
        .iter()
        .zip(build_all(&cwd, &requests, false, tags).await)
    {
        if let Err(output) = built {
            bail!(
                "failed to build the suite {import_path} ({}):\n{}",
                r.env
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                output.trim_end()
            );
        }
    }
    progress(GinkgoProgress::Built {
        import_path: import_path.clone(),
        platform: platform_name.clone(),
        host: (host != platform).then(|| host.to_string()),
        took: started.elapsed(),
    });

    // List the specs.
    let pkg_dir = package_dir(&pkg);
    let host_binary = &requests[requests.len() - 1].output;
    let text = dry_run(
        host_binary,
        &pkg_dir,
        &dry_run_args(&args.focus, &args.skip),
    )
    .await?;
    let dry = output::parse(&text);
    let (description, specs) = listed_specs(&dry, &text)?;
    if specs.is_empty() {
        return Ok(GinkgoReport {
            import_path,
            description: String::new(),
            platform: platform_name,
            shards: Vec::new(),
        });
    }
    let shard_specs = shards::shard_specs(&specs, args.shards as usize);
    let focuses = shards::shard_focuses(&description, &shard_specs)?;
    let n = shard_specs.len();
    progress(GinkgoProgress::Sharded {
        specs: specs.len(),
        description: description.clone(),
        shards: n,
        asked: args.shards,
    });

    // Stage and upload the step tree: the suite binary beside a copy of the package dir.
    let tree = {
        let (dir, pkg_dir) = (step_dir.clone(), pkg_dir.clone());
        tokio::task::spawn_blocking(move || {
            stage_sources(&dir, &pkg_dir)?;
            build_local_tree(&dir)
        })
        .await
        .context("failed to join the staging task")?
        .with_context(|| format!("failed to stage the suite {import_path}"))?
    };
    let uploaded = upload_tree(client, &tree, Progress::Auto).await?;
    progress(GinkgoProgress::Uploaded(uploaded));

    // Run.
    let spec = job_spec(
        args,
        &platform_name,
        &import_path,
        &tree.root,
        &focuses,
        specs.len(),
    )?;
    let job_id = rpc(client
        .jobs
        .submit(v1::SubmitRequest { spec: Some(spec) })
        .await)
    .context("failed to submit the ginkgo job")?
    .job_id;
    progress(GinkgoProgress::Submitted {
        job_id: job_id.clone(),
        shards: n,
        platform: platform_name.clone(),
    });
    let job = follow_job(client, &job_id, GINKGO_CANCEL_REASON, &mut |w| {
        progress(GinkgoProgress::Watch(w))
    })
    .await?;

    // Verdicts.
    let shards = collect(client, &job, &platform_name, &shard_specs).await;
    Ok(GinkgoReport {
        import_path,
        description,
        platform: platform_name,
        shards,
    })
}

/// Every shard's verdict from the finished job.
async fn collect(
    client: &mut FarmClient,
    job: &JobStatus,
    platform: &str,
    shard_specs: &[Vec<Spec>],
) -> Vec<ShardResult> {
    let (ran, missing) = step_results(job);
    let prefetched = prefetch_outputs(client, ran.values()).await;
    let n = shard_specs.len();
    let mut results = Vec::with_capacity(n);
    for (i, specs) in shard_specs.iter().enumerate() {
        let key = (platform.to_string(), shard_step_name(i + 1, n));
        let Some(step) = ran.get(&key) else {
            let why = missing
                .get(&key)
                .cloned()
                .unwrap_or_else(|| "the farm returned no result for it".to_string());
            results.push(report::not_run_shard(i + 1, n, specs, &why));
            continue;
        };
        let bytes = match output_digest(step) {
            Ok(Some(d)) => match prefetched.get(&d) {
                Some(b) => Ok(b.clone()),
                None => read_blob(client, d).await,
            },
            Ok(None) => Ok(Vec::new()),
            Err(e) => Err(e),
        };
        match bytes {
            Ok(b) => {
                let parsed = output::parse(&String::from_utf8_lossy(&b));
                results.push(report::shard_result(i + 1, n, specs, step, parsed));
            }
            Err(e) => {
                let why = format!("failed to read the shard's output: {e:#}");
                let mut r = report::not_run_shard(i + 1, n, specs, &why);
                r.agent_id = step.agent_id.clone();
                r.emulated = step.emulated;
                r.duration_ms = step.duration_ms;
                results.push(r);
            }
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: GinkgoArgs,
    }

    #[test]
    fn the_command_line() {
        use clap::Parser;
        let a = Cli::try_parse_from([
            "ginkgo",
            "--platform",
            "linux/arm64",
            "--focus",
            r"\[NodeConformance\]",
            "--skip",
            r"\[Slow\]",
            "--shards",
            "3",
            "--env",
            "E2E_FAIL=1",
            "--allow-emulation",
            "example.com/fixtures/e2e",
        ])
        .unwrap()
        .args;
        assert_eq!(a.platform, "linux/arm64");
        assert_eq!(a.shards, 3);
        assert_eq!(a.timeout, Duration::from_secs(1800));
        assert!(a.allow_emulation && a.label_filter.is_none());
        assert_eq!(a.package.as_deref(), Some("example.com/fixtures/e2e"));
        assert_eq!(
            dry_run_args(&a.focus, &a.skip),
            [
                "-ginkgo.dryRun",
                "-ginkgo.v",
                "-ginkgo.noColor",
                r"-ginkgo.focus=\[NodeConformance\]",
                r"-ginkgo.skip=\[Slow\]"
            ]
        );
        assert!(
            Cli::try_parse_from(["ginkgo", "."]).is_err(),
            "--platform is required"
        );
        assert!(
            Cli::try_parse_from(["ginkgo", "--platform", "linux/amd64", "--shards", "0"]).is_err()
        );
    }

    #[test]
    fn the_job_wants_node_e2e_agents_to_themselves_and_no_cache() {
        let mut args = GinkgoArgs {
            platform: "linux/arm64".into(),
            focus: vec![],
            skip: vec![],
            label_filter: None,
            shards: 2,
            timeout: Duration::from_secs(600),
            junit: None,
            allow_emulation: true,
            env: vec![parse_env_var("E2E_FAIL=1").unwrap()],
            tags: None,
            verbose: false,
            package: None,
        };
        let root = archfarm_proto::Digest::of(b"tree");
        let spec = job_spec(
            &args,
            "linux/arm64",
            "example.com/fixtures/e2e",
            &root,
            &["^a$".to_string(), "^b$".to_string()],
            6,
        )
        .unwrap();
        assert!(spec.exclusive);
        assert_eq!(spec.required_labels.len(), 1);
        assert_eq!(spec.required_labels[0].key, "node-e2e");
        assert!(spec.no_cache && spec.allow_emulation);
        assert_eq!(spec.shards, 2);
        assert!(spec.platforms.is_empty() && spec.argv.is_empty());
        assert_eq!(spec.env[0].name, "E2E_FAIL");
        let steps = &spec.step_sets[0].steps;
        assert_eq!(spec.step_sets[0].platform, "linux/arm64");
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].name, "ginkgo-shard-2-of-2");
        assert_eq!(
            steps[0].argv,
            [
                "../pkg.test",
                "-ginkgo.noColor",
                "-ginkgo.v",
                "-ginkgo.regexScansFilePath",
                "-ginkgo.focus=^a$",
                "-test.timeout=600s"
            ]
        );
        assert_eq!(steps[0].working_directory, "src");
        assert_eq!(steps[0].timeout_ms, 630_000);
        assert!(steps.iter().all(|s| s.cache_key.is_empty()));
        assert_eq!(spec.timeout_ms, 2 * 630_000 + 60_000);
        args.env.push(parse_env_var("E2E_FAIL=2").unwrap());
        assert!(job_spec(&args, "linux/arm64", "p", &root, &["x".into()], 1).is_err());
    }

    #[test]
    fn the_ginkgo_major_comes_from_the_test_mains_deps() {
        let mut main = GoPackage::default();
        assert_eq!(ginkgo_major(&main), None);
        main.deps = vec!["github.com/onsi/ginkgo".into(), "testing".into()];
        assert_eq!(ginkgo_major(&main), Some(GinkgoMajor::V1));
        main.deps = vec!["k8s.io/kubernetes/vendor/github.com/onsi/ginkgo/v2".into()];
        assert_eq!(ginkgo_major(&main), Some(GinkgoMajor::V2));
        main.deps = vec!["github.com/onsi/ginkgomon".into()];
        assert_eq!(ginkgo_major(&main), None);
    }

    #[test]
    fn a_dry_run_whose_count_disagrees_is_refused() {
        let text = output::tests::E2E_DRY_RUN.replace("Will run 6 of 6", "Will run 7 of 7");
        let dry = output::parse(&text);
        assert!(listed_specs(&dry, &text).is_err());
        let dry = output::parse(output::tests::E2E_DRY_RUN);
        let (d, specs) = listed_specs(&dry, output::tests::E2E_DRY_RUN).unwrap();
        assert_eq!((d.as_str(), specs.len()), ("E2E Fixture Suite", 6));
    }
}
