//! `archfarm go-build`: Go commands built by the farm for many platforms, like
//! Kubernetes' `make WHAT=cmd/x KUBE_BUILD_PLATFORMS=...`, with binaries arriving in
//! `<output-dir>/<os>/<arch>/<name>`.
//!
//! Pure-Go targets (the default) are cross-compiled where compiling is fast: one action per
//! target platform on a native agent of the build platform (linux/amd64), with GOOS/GOARCH set
//! and CGO_ENABLED=0. `--cgo` builds on an agent of each target platform instead. Each
//! action's input is exactly the source files the build reads ([`inputs`]), its argv and
//! environment hold no local path ([`plan`]) and `go build -trimpath` is reproducible, so the
//! farm's action cache makes an unchanged rebuild a hit on any client. Every binary's ELF
//! class, byte order and machine are checked against its platform (`archfarm_proto::elf`)
//! before it is reported ([`report`]).

pub mod inputs;
pub mod plan;
pub mod report;

use crate::farm::args::{ensure_unique, CachePolicyArgs};
use crate::farm::blobs::{read_blob, read_to_file};
use crate::farm::cancel::{cancel_after_interrupt, InterruptCancel};
use crate::farm::download::platform_dir;
use crate::farm::upload::{upload_tree, Progress, UploadReport};
use crate::farm::watch::{CtrlC, JobEvents, Watched};
use crate::farm::{rpc, FarmClient};
use crate::go_vars::{CGO_VARS, PURE_BUILD_VARS};
use crate::gotest::golist::{go_command, go_list, platform_env, GoPackage};
use anyhow::{bail, Context};
use archfarm_proto::tree::hash_file;
use archfarm_proto::v1::{self, job_event, JobStatus};
use archfarm_proto::{Digest, Platform};
use futures::stream::{FuturesUnordered, StreamExt};
use inputs::{compose_tree, module_files, select_inputs, FileHasher, Layout};
use plan::{name_targets, BuildSettings, Target};
pub use report::GoBuildReport;
use report::{BuildState, FailedOutput, PlatformJob, TargetResult};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where pure-Go targets are cross-compiled unless `--build-platform` says otherwise.
pub const DEFAULT_BUILD_PLATFORM: &str = "linux/amd64";
/// Binaries downloaded at once.
const PARALLEL_DOWNLOADS: usize = 4;

/// `archfarm go-build --platform P... [options] TARGETS...`.
#[derive(clap::Args, Debug, Clone)]
pub struct GoBuildArgs {
    /// Platform to build for, e.g. linux/arm64; repeat for more (one job each).
    #[arg(long = "platform", value_name = "PLATFORM", required = true)]
    pub platforms: Vec<String>,
    /// Build with cgo (CGO_ENABLED=1) on an agent of each target platform instead of
    /// cross-compiling; that agent needs sh, the same Go and a C compiler.
    #[arg(long)]
    pub cgo: bool,
    /// Where binaries go: DIR/<os>/<arch>[/<variant>]/<name>.
    #[arg(long, value_name = "DIR", default_value = "_output")]
    pub output_dir: PathBuf,
    /// Let emulated agents build (with --cgo: the whole Go and C toolchain then runs under
    /// qemu-user, which is slow).
    #[arg(long)]
    pub allow_emulation: bool,
    /// Build even when the farm's action cache holds the result.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub cache: CachePolicyArgs,
    /// Platform of the agents that cross-compile pure-Go targets.
    #[arg(long, value_name = "PLATFORM", default_value = DEFAULT_BUILD_PLATFORM, conflicts_with = "cgo")]
    pub build_platform: String,
    /// Build tags, as for `go build -tags`.
    #[arg(long, value_name = "TAGS")]
    pub tags: Option<String>,
    /// Linker flags, as for `go build -ldflags`.
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true)]
    pub ldflags: Option<String>,
    /// Wall-clock limit of each platform's build, e.g. 90s, 30m.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Write a JSON report (mode, upload, jobs, one entry per target and platform with its
    /// state, cached flag, agent, digest and path) to FILE.
    #[arg(long, value_name = "FILE")]
    pub json_report: Option<PathBuf>,
    /// Main packages to build: import paths or patterns, as for `go build`.
    #[arg(value_name = "TARGETS", required = true)]
    pub targets: Vec<String>,
}

impl GoBuildArgs {
    /// The target platforms, parsed, in order, without duplicates, and the build platform.
    pub fn platforms(&self) -> anyhow::Result<(Vec<Platform>, Platform)> {
        ensure_unique("--platform", self.platforms.iter().map(String::as_str))?;
        let targets = self
            .platforms
            .iter()
            .map(|p| p.parse::<Platform>())
            .collect::<Result<Vec<_>, _>>()?;
        let build = self
            .build_platform
            .parse::<Platform>()
            .context("--build-platform")?;
        Ok((targets, build))
    }
}

/// What `go env` says about where the sources are.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE", default)]
struct GoEnv {
    gomod: String,
    gopath: String,
    goversion: String,
    goflags: String,
}

async fn go_env(cwd: &Path) -> anyhow::Result<GoEnv> {
    let out = go_command(cwd, &[])
        .args(["env", "-json", "GOMOD", "GOPATH", "GOVERSION", "GOFLAGS"])
        .output()
        .await
        .context("failed to run `go env` (is Go installed?)")?;
    if !out.status.success() {
        bail!(
            "`go env` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    serde_json::from_slice(&out.stdout).context("failed to read what `go env -json` printed")
}

/// The layout `go env` describes: GOPATH mode when there is no go.mod in use.
fn layout_of(env: &GoEnv) -> anyhow::Result<Layout> {
    match env.gomod.as_str() {
        "" => {
            let entries: Vec<PathBuf> = std::env::split_paths(&env.gopath)
                .filter(|p| !p.as_os_str().is_empty())
                .collect();
            if entries.is_empty() {
                bail!("GOPATH mode, but GOPATH is empty");
            }
            Ok(Layout::Gopath { entries })
        }
        "/dev/null" | "NUL" => bail!(
            "module mode without a go.mod here: run go-build inside a module, or in a GOPATH \
             tree with GO111MODULE=off"
        ),
        gomod => Ok(Layout::Module {
            root: Path::new(gomod)
                .parent()
                .context("go.mod has no directory")?
                .to_path_buf(),
        }),
    }
}

/// The main packages the patterns name; non-main packages are left out with a note.
async fn list_targets(
    cwd: &Path,
    first: &Platform,
    args: &GoBuildArgs,
    progress: &mut (dyn FnMut(GoBuildProgress) + Send),
) -> anyhow::Result<Vec<String>> {
    let named = go_list(
        cwd,
        &platform_env(first, args.cgo),
        &[],
        args.tags.as_deref(),
        &args.targets,
    )
    .await?;
    let mut problems = Vec::new();
    let mut mains = Vec::new();
    for p in &named {
        if let Some(e) = p.errors() {
            let hint = if inputs::needs_download(&e) {
                inputs::DOWNLOAD_HINT
            } else {
                ""
            };
            problems.push(format!("{}: {e}{hint}", p.import_path));
        } else if p.name != "main" {
            progress(GoBuildProgress::NotACommand {
                import_path: p.import_path.clone(),
                name: p.name.clone(),
            });
        } else if !mains.contains(&p.import_path) {
            mains.push(p.import_path.clone());
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    if mains.is_empty() {
        bail!("{} names no main package", args.targets.join(" "));
    }
    Ok(mains)
}

/// One target platform's job, submitted.
struct SubmittedJob {
    platform: Platform,
    input_root: Digest,
    job_id: String,
}

/// Lists every platform's dependencies and picks their files; fails with every problem.
async fn platform_inputs(
    cwd: &Path,
    layout: &Layout,
    platforms: &[Platform],
    import_paths: &[String],
    args: &GoBuildArgs,
) -> anyhow::Result<Vec<BTreeMap<String, PathBuf>>> {
    let listed: Vec<anyhow::Result<Vec<GoPackage>>> = futures::stream::iter(platforms)
        .map(|p| async move {
            go_list(
                cwd,
                &platform_env(p, args.cgo),
                &["-deps"],
                args.tags.as_deref(),
                import_paths,
            )
            .await
            .with_context(|| format!("failed to list the dependencies for {p}"))
        })
        .buffered(2)
        .collect()
        .await;
    let mut problems = Vec::new();
    let mut selections = Vec::new();
    for (p, packages) in platforms.iter().zip(listed) {
        match packages.and_then(|packages| select_inputs(layout, &packages)) {
            Ok(mut s) => {
                if let Layout::Module { root } = layout {
                    s.files.extend(module_files(root));
                }
                selections.push(s.files);
            }
            Err(e) => problems.push(format!("for {p}: {e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!("cannot build:\n{}", problems.join("\n"));
    }
    Ok(selections)
}

/// Submits one job per target platform; on a failure cancels those already submitted.
async fn submit_jobs(
    client: &mut FarmClient,
    settings: &BuildSettings,
    targets: &[Target],
    roots: Vec<(Platform, Digest)>,
) -> anyhow::Result<Vec<SubmittedJob>> {
    let mut jobs: Vec<SubmittedJob> = Vec::new();
    for (platform, root) in roots {
        let submitted = async {
            let spec = settings.job_spec(&platform, targets, root)?;
            let id = rpc(client
                .jobs
                .submit(v1::SubmitRequest { spec: Some(spec) })
                .await)
            .with_context(|| format!("failed to submit the go-build job for {platform}"))?
            .job_id;
            anyhow::Ok(id)
        }
        .await;
        match submitted {
            Ok(job_id) => jobs.push(SubmittedJob {
                platform,
                input_root: root,
                job_id,
            }),
            Err(e) => {
                for j in &jobs {
                    let _ = crate::farm::cancel::cancel_job(
                        client,
                        &j.job_id,
                        "go-build failed to submit its other jobs",
                    )
                    .await;
                }
                return Err(e);
            }
        }
    }
    Ok(jobs)
}

/// Follows one job until it is finished (resuming a broken watch like every command).
async fn wait_job(client: FarmClient, job_id: String) -> anyhow::Result<JobStatus> {
    let mut events = JobEvents::open(&client, &job_id).await?;
    loop {
        match events.next().await? {
            Watched::Event(event) => {
                if let Some(job_event::Kind::Finished(job)) = event.kind {
                    return Ok(job);
                }
            }
            Watched::FinishedMeanwhile(job) => return Ok(*job),
            Watched::Lost(_) | Watched::Resumed => {}
        }
    }
}

/// Waits for every job, saying when each finishes; Ctrl-C cancels them all, twice gives up.
async fn wait_all(
    client: &FarmClient,
    jobs: &[SubmittedJob],
    progress: &mut (dyn FnMut(GoBuildProgress) + Send),
) -> anyhow::Result<Vec<JobStatus>> {
    let mut pending: FuturesUnordered<_> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let wait = wait_job(client.clone(), j.job_id.clone());
            async move { (i, wait.await) }
        })
        .collect();
    let mut done: Vec<Option<JobStatus>> = vec![None; jobs.len()];
    let mut ctrl_c = CtrlC::default();
    while !pending.is_empty() {
        tokio::select! {
            next = pending.next() => {
                let Some((i, job)) = next else { break };
                let job = job?;
                progress(GoBuildProgress::Finished {
                    platform: jobs[i].platform.clone(),
                    job: Box::new(job.clone()),
                });
                done[i] = Some(job);
            }
            n = ctrl_c.pressed() => {
                if n >= 2 {
                    bail!("interrupted again; stopped waiting for the go-build jobs");
                }
                progress(GoBuildProgress::Cancelling);
                let mut c = client.clone();
                for j in jobs {
                    let cancelled = cancel_after_interrupt(
                        &mut c,
                        &j.job_id,
                        "cancelled by Ctrl-C in `archfarm go-build`",
                    )
                    .await;
                    progress(GoBuildProgress::Cancelled(cancelled));
                }
            }
        }
    }
    done.into_iter()
        .zip(jobs)
        .map(|(j, pj)| j.with_context(|| format!("job {} did not finish", pj.job_id)))
        .collect()
}

/// Brings a result's binary to `dest` (unless an identical file is there already) and checks
/// its ELF class, byte order and machine against the platform.
async fn fetch_binary(
    mut client: FarmClient,
    digest: Digest,
    executable: bool,
    platform: Platform,
    dest: PathBuf,
) -> anyhow::Result<()> {
    let present = {
        let d = dest.clone();
        tokio::task::spawn_blocking(move || hash_file(&d).ok())
            .await
            .ok()
            .flatten()
    };
    if present != Some(digest) {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("failed to create {}", parent.display()))?;
        }
        read_to_file(
            &mut client,
            digest,
            &dest,
            executable,
            &indicatif::ProgressBar::hidden(),
        )
        .await
        .with_context(|| format!("failed to download {}", dest.display()))?;
    } else {
        crate::farm::blobs::set_mode(&dest, executable)?;
    }
    if platform.os() == "linux" {
        if let Err(wrong) = archfarm_proto::elf::check_file(&dest, &platform) {
            let _ = std::fs::remove_file(&dest);
            bail!("the binary is not for {platform}: {wrong}");
        }
    }
    Ok(())
}

/// Downloads every binary into `<output-dir>/<os>/<arch>/<name>`; a failed download or a
/// wrong ELF header turns the result into a failure.
async fn download_all(
    client: &FarmClient,
    output_dir: &Path,
    results: &mut [TargetResult],
) -> anyhow::Result<()> {
    let mut work = Vec::new();
    for (i, r) in results.iter().enumerate() {
        if let Some((digest, executable)) = r.output {
            let platform: Platform = r.platform.parse()?;
            let dest = platform_dir(output_dir, &r.platform)?.join(&r.target.name);
            work.push((i, digest, executable, platform, dest));
        }
    }
    let fetched: Vec<(usize, PathBuf, anyhow::Result<()>)> = futures::stream::iter(work)
        .map(|(i, digest, executable, platform, dest)| {
            let client = client.clone();
            async move {
                let r = fetch_binary(client, digest, executable, platform, dest.clone()).await;
                (i, dest, r)
            }
        })
        .buffer_unordered(PARALLEL_DOWNLOADS)
        .collect()
        .await;
    for (i, dest, outcome) in fetched {
        let r = &mut results[i];
        match outcome {
            Ok(()) => r.path = Some(dest),
            Err(e) => {
                r.state = BuildState::Failed;
                r.detail = format!("{e:#}");
            }
        }
    }
    Ok(())
}

/// Reads the recorded output of each job in which a target failed.
async fn failed_outputs(
    client: &mut FarmClient,
    jobs: &[PlatformJob],
    results: &[TargetResult],
) -> Vec<FailedOutput> {
    let mut outputs = Vec::new();
    for pj in jobs {
        let failed = results
            .iter()
            .any(|r| r.job_id == pj.job_id && r.state == BuildState::Failed);
        let Some(result) = pj.job.actions.first().and_then(|a| a.result.as_ref()) else {
            continue;
        };
        if !failed {
            continue;
        }
        for d in [&result.stdout_digest, &result.stderr_digest]
            .into_iter()
            .flatten()
        {
            let Ok(d) = Digest::from_proto(d) else {
                continue;
            };
            if d.size_bytes() == 0 {
                continue;
            }
            outputs.push(FailedOutput {
                platform: pj.platform.to_string(),
                text: read_blob(client, d)
                    .await
                    .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                    .map_err(|e| format!("{e:#}")),
            });
        }
    }
    outputs
}

/// The variables of the user's environment that the build needs, as set.
fn user_env(cgo: bool) -> Vec<(String, String)> {
    let cgo_vars: &[&str] = if cgo { CGO_VARS } else { &[] };
    PURE_BUILD_VARS
        .iter()
        .chain(cgo_vars)
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (k.to_string(), v))
        })
        .collect()
}

/// What go-build does on its way to the report, in order, for the caller to show.
#[derive(Debug, Clone, PartialEq)]
pub enum GoBuildProgress {
    /// `--cgo` with `--allow-emulation`: a note that it will be slow.
    SlowEmulatedCgo,
    /// A named package is not a command; it is left out.
    NotACommand {
        /// Its import path.
        import_path: String,
        /// Its package name.
        name: String,
    },
    /// The targets are known.
    Planned {
        /// Targets.
        targets: usize,
        /// Target platforms.
        platforms: usize,
        /// `module` or `GOPATH` ([`Layout::name`]).
        mode: String,
        /// `go version` here.
        go_version: String,
        /// Built with cgo on agents of each platform.
        cgo: bool,
        /// Where pure-Go targets are cross-compiled.
        build_platform: String,
    },
    /// The inputs are in the farm's CAS.
    Uploaded {
        /// What the upload did.
        upload: UploadReport,
        /// Source files of the largest platform's input.
        files: u64,
    },
    /// A platform's job was submitted.
    Submitted {
        /// The target platform.
        platform: String,
        /// The job's id.
        job_id: String,
    },
    /// A platform's job finished.
    Finished {
        /// The target platform.
        platform: Platform,
        /// The job's final status.
        job: Box<JobStatus>,
    },
    /// Ctrl-C: every job is being cancelled.
    Cancelling,
    /// How one job's cancel went.
    Cancelled(InterruptCancel),
}

/// go-build: builds every target for every platform on the farm, downloads and checks the
/// binaries into `--output-dir`, and returns what became of each. Progress goes to
/// `progress`; nothing is printed and the `--json-report` is left to the caller.
pub async fn go_build(
    client: &mut FarmClient,
    args: &GoBuildArgs,
    progress: &mut (dyn FnMut(GoBuildProgress) + Send),
) -> anyhow::Result<GoBuildReport> {
    let started = Instant::now();
    let (platforms, build_platform) = args.platforms()?;
    let cwd = std::env::current_dir().context("failed to read the current directory")?;
    let env = go_env(&cwd).await?;
    let layout = layout_of(&env)?;
    if args.cgo && args.allow_emulation {
        progress(GoBuildProgress::SlowEmulatedCgo);
    }
    let import_paths = list_targets(&cwd, &platforms[0], args, progress).await?;
    let targets = name_targets(&import_paths, matches!(layout, Layout::Module { .. }))?;
    let settings = BuildSettings {
        gopath_mode: matches!(layout, Layout::Gopath { .. }),
        cgo: args.cgo,
        build_platform: build_platform.clone(),
        go_version: env.goversion.clone(),
        goflags: env.goflags.clone(),
        tags: args.tags.clone(),
        ldflags: args.ldflags.clone(),
        user_env: user_env(args.cgo),
        allow_emulation: args.allow_emulation,
        no_cache: args.no_cache,
        cache: args.cache,
        timeout: args.timeout,
    };
    progress(GoBuildProgress::Planned {
        targets: targets.len(),
        platforms: platforms.len(),
        mode: layout.name().to_string(),
        go_version: env.goversion.clone(),
        cgo: args.cgo,
        build_platform: build_platform.to_string(),
    });

    // Inputs: per platform exactly what its build reads; hashed once, uploaded once.
    let selections = platform_inputs(&cwd, &layout, &platforms, &import_paths, args).await?;
    let trees = tokio::task::spawn_blocking(move || {
        let mut hasher = FileHasher::default();
        selections
            .iter()
            .map(|files| compose_tree(&hasher.hash_all(files)?))
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await
    .context("failed to join the hashing task")??;
    let upload: UploadReport = upload_tree(
        client,
        &archfarm_proto::tree::LocalTree::merge(&trees),
        Progress::Auto,
    )
    .await?;
    let files: u64 = trees.iter().map(|t| t.stats.files).max().unwrap_or(0);
    progress(GoBuildProgress::Uploaded { upload, files });

    // One job per platform, all at once.
    let roots: Vec<(Platform, Digest)> = platforms
        .iter()
        .cloned()
        .zip(trees.iter().map(|t| t.root))
        .collect();
    let submitted = submit_jobs(client, &settings, &targets, roots).await?;
    for j in &submitted {
        progress(GoBuildProgress::Submitted {
            platform: j.platform.to_string(),
            job_id: j.job_id.clone(),
        });
    }
    let finished = wait_all(client, &submitted, progress).await?;
    let jobs: Vec<PlatformJob> = submitted
        .into_iter()
        .zip(finished)
        .map(|(s, job)| PlatformJob {
            platform: s.platform,
            job_id: s.job_id,
            input_root: s.input_root,
            job,
        })
        .collect();

    // Results, binaries.
    let mut results: Vec<TargetResult> = jobs
        .iter()
        .flat_map(|pj| report::target_results(&targets, &pj.platform.to_string(), &pj.job))
        .collect();
    download_all(client, &args.output_dir, &mut results).await?;
    let failed_outputs = failed_outputs(client, &jobs, &results).await;
    Ok(GoBuildReport {
        mode: layout.name().to_string(),
        go_version: env.goversion,
        cgo: args.cgo,
        upload,
        jobs,
        results,
        failed_outputs,
        took: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: GoBuildArgs,
    }

    #[test]
    fn the_command_line_reads_like_make_what() {
        use clap::Parser;
        let cli = Cli::try_parse_from([
            "go-build",
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/s390x",
            "--ldflags",
            "-s -w",
            "--json-report",
            "r.json",
            "./cmd/kubelet",
            "k8s.io/kubernetes/cmd/kubectl",
        ])
        .unwrap();
        let a = cli.args;
        let (platforms, build) = a.platforms().unwrap();
        assert_eq!(platforms.len(), 2);
        assert_eq!(build.to_string(), "linux/amd64");
        assert_eq!(a.output_dir, PathBuf::from("_output"));
        assert_eq!(a.timeout, Duration::from_secs(1800));
        assert_eq!(a.ldflags.as_deref(), Some("-s -w"));
        assert!(!a.cgo && !a.allow_emulation && !a.no_cache);
        assert_eq!(a.targets.len(), 2);

        assert!(Cli::try_parse_from(["go-build", "--platform", "linux/arm64"]).is_err());
        assert!(Cli::try_parse_from(["go-build", "hello"]).is_err());
        let both = Cli::try_parse_from([
            "go-build",
            "--cgo",
            "--build-platform",
            "linux/arm64",
            "--platform",
            "linux/arm64",
            "x",
        ]);
        assert!(both.is_err(), "--cgo builds on the target platform itself");
        let twice = Cli::try_parse_from([
            "go-build",
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/arm64",
            "x",
        ])
        .unwrap();
        assert!(twice.args.platforms().is_err());
    }

    #[test]
    fn go_env_decides_the_layout() {
        let gopath = GoEnv {
            gopath: "/a:/b".into(),
            ..GoEnv::default()
        };
        assert_eq!(
            layout_of(&gopath).unwrap(),
            Layout::Gopath {
                entries: vec![PathBuf::from("/a"), PathBuf::from("/b")]
            }
        );
        let module = GoEnv {
            gomod: "/src/app/go.mod".into(),
            ..GoEnv::default()
        };
        assert_eq!(
            layout_of(&module).unwrap(),
            Layout::Module {
                root: PathBuf::from("/src/app")
            }
        );
        let none = GoEnv {
            gomod: "/dev/null".into(),
            ..GoEnv::default()
        };
        assert!(layout_of(&none)
            .unwrap_err()
            .to_string()
            .contains("GO111MODULE=off"));
        let parsed: GoEnv = serde_json::from_str(
            r#"{"GOFLAGS": "-mod=vendor", "GOMOD": "", "GOPATH": "/gp", "GOVERSION": "go1.19.8"}"#,
        )
        .unwrap();
        assert_eq!(
            (parsed.goversion.as_str(), parsed.goflags.as_str()),
            ("go1.19.8", "-mod=vendor")
        );
    }
}
