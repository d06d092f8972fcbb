//! `archfarm run`: uploads the input tree, submits a job and follows it to the end:
//! each action's output line by line behind its platform, state changes on stderr, a summary
//! table and an exit code. It survives a coordinator restart (re-watching) and turns Ctrl-C
//! into a cancel. With `--output`/`--download` it brings the declared outputs home, and with
//! `--json-report` it writes what happened for scripts and tests. `demo` and `bench` call the
//! same [`run_job`]; it prints nothing: what happens comes out as [`RunProgress`] values.
use super::args::{
    ensure_unique, parse_env_var, parse_label, CachePolicyArgs, EnvVarArg, LabelArg,
};
use super::cancel::{cancel_after_interrupt, InterruptCancel};
use super::display::{action_state_name, outcome_name};
use super::download::{download_outputs, output_paths, DownloadedOutput};
use super::job::{ordered_actions, ran_and_cached};
use super::job_watch::{Emit, JobWatch};
use super::upload::{upload_dir, Progress, UploadReport};
use super::watch::{CtrlC, JobEvents, Watched};
use super::{rpc, FarmClient};
use anyhow::{bail, Context};
use archfarm_proto::v1::{self, ActionState, ActionStatus, JobStatus};
use archfarm_proto::Digest;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Per-action time limit unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// `archfarm run --platform P... [options] -- CMD ARGS...`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Platform to run on, e.g. linux/arm64; repeat for more (one action each).
    #[arg(long = "platform", value_name = "PLATFORM", required = true)]
    pub platforms: Vec<String>,
    /// Let agents that emulate a platform (qemu-user) run it; native agents are preferred.
    #[arg(long)]
    pub allow_emulation: bool,
    /// Directory uploaded as the input root, the command's working tree. `.git` and whatever
    /// `.farmignore` files (gitignore syntax) name are left out; only blobs the farm lacks are
    /// sent.
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    /// Environment variable for the command; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env_var)]
    pub env: Vec<EnvVarArg>,
    /// Wall-clock limit per action, e.g. 90s, 10m, 1h.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Label every agent must carry (key=value, or a bare key); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<LabelArg>,
    /// Working directory relative to the input root.
    #[arg(long, value_name = "REL")]
    pub workdir: Option<String>,
    /// Free text for status, e.g. the CI job's name.
    #[arg(long)]
    pub description: Option<String>,
    /// A file or directory the command leaves, relative to the working directory, to store
    /// in the farm's CAS; repeatable.
    #[arg(long = "output", value_name = "PATH")]
    pub outputs: Vec<String>,
    /// After the job, write each succeeded action's outputs to DIR/<os>/<arch>[/<variant>]/PATH.
    #[arg(long, value_name = "DIR")]
    pub download: Option<PathBuf>,
    /// Run every action even when the action cache holds a result for it.
    #[arg(long)]
    pub no_cache: bool,
    /// The command needs the network: only agents whose policy allows it run it (every
    /// other action runs without any network).
    #[arg(long)]
    pub network: bool,
    #[command(flatten)]
    pub cache: CachePolicyArgs,
    /// Write a JSON report (upload figures, job id, each action's state, cached flag and exit
    /// code, downloads) to FILE when the job ends.
    #[arg(long, value_name = "FILE")]
    pub json_report: Option<PathBuf>,
    /// The command and its arguments; {os}, {arch} and {variant} become the platform's parts.
    #[arg(
        value_name = "CMD",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

impl RunArgs {
    /// `farm run --platform P... -- CMD...` with every other option at its default.
    pub fn new<P: Into<String>, C: Into<String>>(
        platforms: impl IntoIterator<Item = P>,
        command: impl IntoIterator<Item = C>,
    ) -> Self {
        Self {
            platforms: platforms.into_iter().map(Into::into).collect(),
            allow_emulation: false,
            input: None,
            env: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            labels: Vec::new(),
            workdir: None,
            description: None,
            outputs: Vec::new(),
            download: None,
            no_cache: false,
            network: false,
            cache: CachePolicyArgs::default(),
            json_report: None,
            command: command.into_iter().map(Into::into).collect(),
        }
    }

    /// The job to submit, once the input tree (if any) is uploaded as `input_root`.
    pub fn job_spec(&self, input_root: Option<Digest>) -> anyhow::Result<v1::JobSpec> {
        if self.command.is_empty() {
            bail!("no command given; put it after `--`");
        }
        ensure_unique("--env", self.env.iter().map(|e| e.name.as_str()))?;
        ensure_unique("--label", self.labels.iter().map(|l| l.key.as_str()))?;
        let workdir = self.workdir.clone().unwrap_or_default();
        if workdir.starts_with('/') {
            bail!("--workdir {workdir:?} must be relative to the input root");
        }
        Ok(v1::JobSpec {
            platforms: self.platforms.clone(),
            argv: self.command.clone(),
            env: self.env.iter().map(EnvVarArg::to_proto).collect(),
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
            input_root: input_root.map(|d| d.to_proto()),
            allow_emulation: self.allow_emulation,
            required_labels: self.labels.iter().map(LabelArg::to_proto).collect(),
            working_directory: workdir,
            description: self.description.clone().unwrap_or_default(),
            output_paths: output_paths(&self.outputs)?,
            no_cache: self.no_cache,
            step_sets: vec![],
            shards: 0,
            shard_target_ms: 0,
            exclusive: false,
            network: self.network,
            cache_untrusted: self.cache.cache_untrusted,
            cache_emulated: self.cache.cache_emulated,
        })
    }
}

/// What a run does on its way to its outcome, in order, for the caller to show (the command
/// line prints it; benchmarks ignore it).
#[derive(Debug, Clone, PartialEq)]
pub enum RunProgress {
    /// The input tree is in the farm's CAS.
    Uploaded(UploadReport),
    /// The job was submitted.
    Submitted {
        /// Its id.
        job_id: String,
    },
    /// A state change or lines of an action's output (live, or recorded and read back).
    Event(Emit),
    /// The watch broke; it is being resumed for up to
    /// [`REWATCH_FOR`](super::watch::REWATCH_FOR).
    Lost {
        /// The job.
        job_id: String,
        /// Why it broke.
        why: String,
        /// Whether it broke before.
        again: bool,
    },
    /// Watching again after a break.
    Resumed {
        /// The job.
        job_id: String,
    },
    /// Ctrl-C: the job is being cancelled.
    Cancelling {
        /// The job.
        job_id: String,
    },
    /// How that cancel went.
    Cancelled(InterruptCancel),
    /// A second Ctrl-C: the watch is abandoned (the outcome has no job).
    InterruptedAgain {
        /// The job.
        job_id: String,
    },
    /// A recorded output too large to read back is not shown.
    OutputNotShown {
        /// The action's platform.
        platform: String,
        /// The blob holding it.
        digest: Digest,
    },
    /// A recorded output could not be read: the error's words.
    OutputUnreadable(String),
    /// The job finished: its final status, actions in `platforms` order.
    Finished {
        /// The platforms asked for.
        platforms: Vec<String>,
        /// The final status.
        job: Box<JobStatus>,
    },
}

/// How long a run took, measured from just before Submit.
#[derive(Debug, Clone, Copy)]
pub struct RunTimings {
    /// Until the first complete output line of any action arrived.
    pub first_line: Option<Duration>,
    /// Until the job finished (or the watch was given up).
    pub total: Duration,
}

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The job's id.
    pub job_id: String,
    /// The process exit code `farm run` uses (see [`job_exit_code`]); 130 when interrupted
    /// twice.
    pub exit_code: u8,
    /// The job's final status; None when the watch was abandoned by a second Ctrl-C.
    pub job: Option<JobStatus>,
    /// What the input upload did, when there was an input.
    pub upload: Option<UploadReport>,
    /// Outputs written by `--download`.
    pub downloads: Vec<DownloadedOutput>,
    /// Latencies.
    pub timings: RunTimings,
}

impl RunOutcome {
    /// The `--json-report` document:
    /// `{"job_id", "exit_code", "upload": UploadReport|null, "actions": [{"action_id",
    /// "platform", "state", "cached", "outcome", "exit_code", "message", "reason", "agent_id",
    /// "emulated",
    /// "duration_ms", "action_digest", "output_files", "output_directories"}], "ran",
    /// "cached", "downloads": [DownloadedOutput]}`. `outcome` and `exit_code` are null for an
    /// action without a result; `actions` is empty when the watch was abandoned.
    pub fn report_json(&self) -> serde_json::Value {
        use serde_json::json;
        let (platforms, actions) = match &self.job {
            Some(job) => (
                job.spec
                    .as_ref()
                    .map(|s| s.platforms.clone())
                    .unwrap_or_default(),
                job.actions.as_slice(),
            ),
            None => (Vec::new(), &[][..]),
        };
        let (ran, cached) = ran_and_cached(actions);
        let actions: Vec<serde_json::Value> = ordered_actions(&platforms, actions)
            .into_iter()
            .map(|a| {
                let r = a.result.as_ref();
                let full = r.map(super::job::result_json);
                json!({
                    "action_id": a.action_id,
                    "platform": a.platform,
                    "state": action_state_name(a.state()),
                    "cached": a.cached,
                    "outcome": r.map(|r| outcome_name(r.outcome())),
                    "exit_code": r.map(|r| r.exit_code),
                    "message": r.map(|r| r.message.as_str()),
                    "reason": a.reason,
                    "agent_id": r.map_or(a.agent_id.as_str(), |r| r.agent_id.as_str()),
                    "emulated": r.map_or(a.emulated, |r| r.emulated),
                    "duration_ms": r.map(|r| r.duration_ms),
                    "action_digest": a.action_digest,
                    "output_files": full.as_ref().map_or(json!([]), |f| f["output_files"].clone()),
                    "output_directories": full.as_ref().map_or(json!([]), |f| f["output_directories"].clone()),
                })
            })
            .collect();
        json!({
            "job_id": self.job_id,
            "exit_code": self.exit_code,
            "upload": self.upload.map(|u| u.to_json()),
            "actions": actions,
            "ran": ran,
            "cached": cached,
            "downloads": self.downloads.iter().map(DownloadedOutput::to_json).collect::<Vec<_>>(),
        })
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json_report(path: &std::path::Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("failed to encode the JSON report")?;
    std::fs::write(path, text + "\n")
        .with_context(|| format!("failed to write the JSON report {}", path.display()))
}

/// The final line of `farm run`: `3 ran, 2 cached`.
pub fn ran_cached_line(actions: &[ActionStatus]) -> String {
    let (ran, cached) = ran_and_cached(actions);
    format!("{ran} ran, {cached} cached")
}

/// Uploads the input (`bar`: whether a big upload may draw a progress bar), submits the job,
/// follows it to the end, downloads its outputs (`--download`), writes the `--json-report`
/// and chooses the exit code. What happens meanwhile goes to `progress`; nothing is printed.
pub async fn run_job(
    client: &mut FarmClient,
    args: &RunArgs,
    bar: Progress,
    progress: &mut (dyn FnMut(RunProgress) + Send),
) -> anyhow::Result<RunOutcome> {
    args.job_spec(None)?; // refuse bad arguments before hashing anything
    let upload = match &args.input {
        Some(dir) => {
            let report = upload_dir(client, dir, bar).await?;
            progress(RunProgress::Uploaded(report));
            Some(report)
        }
        None => None,
    };
    let spec = args.job_spec(upload.map(|u| u.root))?;
    let started = Instant::now();
    let job_id = rpc(client
        .jobs
        .submit(v1::SubmitRequest { spec: Some(spec) })
        .await)
    .context("failed to submit the job")?
    .job_id;
    progress(RunProgress::Submitted {
        job_id: job_id.clone(),
    });
    let mut events = JobEvents::open(client, &job_id).await?;
    let mut watch = JobWatch::default();
    let mut first_line = None;
    let mut ctrl_c = CtrlC::default();
    let mut warned_gap = false;

    let finished: JobStatus = loop {
        let watched = tokio::select! {
            w = events.next() => w?,
            n = ctrl_c.pressed() => {
                if n >= 2 {
                    emit(watch.flush(), progress);
                    progress(RunProgress::InterruptedAgain { job_id: job_id.clone() });
                    let outcome = RunOutcome {
                        job_id,
                        exit_code: 130,
                        job: None,
                        upload,
                        downloads: Vec::new(),
                        timings: RunTimings {
                            first_line,
                            total: started.elapsed(),
                        },
                    };
                    if let Some(path) = &args.json_report {
                        write_json_report(path, &outcome.report_json())?;
                    }
                    return Ok(outcome);
                }
                progress(RunProgress::Cancelling { job_id: job_id.clone() });
                let cancelled =
                    cancel_after_interrupt(client, &job_id, "cancelled by Ctrl-C in `archfarm run`").await;
                progress(RunProgress::Cancelled(cancelled));
                continue;
            }
        };
        match watched {
            Watched::Event(event) => {
                let (emits, finished) = watch.on_event(*event);
                if first_line.is_none() && emits.iter().any(Emit::is_output) {
                    first_line = Some(started.elapsed());
                }
                emit(emits, progress);
                if let Some(job) = finished {
                    break job;
                }
            }
            Watched::Lost(why) => {
                progress(RunProgress::Lost {
                    job_id: job_id.clone(),
                    why,
                    again: warned_gap,
                });
                warned_gap = true;
            }
            Watched::Resumed => progress(RunProgress::Resumed {
                job_id: job_id.clone(),
            }),
            Watched::FinishedMeanwhile(job) => {
                emit(watch.on_finished(&job), progress);
                break *job;
            }
        }
    };
    if recorded_outputs(client, &mut watch, &finished, progress).await && first_line.is_none() {
        first_line = Some(started.elapsed());
    }
    let total = started.elapsed();
    let platforms = finished
        .spec
        .as_ref()
        .map(|s| s.platforms.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| args.platforms.clone());
    progress(RunProgress::Finished {
        platforms: platforms.clone(),
        job: Box::new(finished.clone()),
    });
    let mut downloads = Vec::new();
    let mut download_error = None;
    if let Some(dir) = &args.download {
        let actions = ordered_actions(&platforms, &finished.actions);
        match download_outputs(client, &actions, dir).await {
            Ok(done) => {
                downloads = done;
            }
            Err(e) => download_error = Some(e),
        }
    }
    let outcome = RunOutcome {
        exit_code: job_exit_code(&args.platforms, &finished.actions),
        job_id,
        job: Some(finished),
        upload,
        downloads,
        timings: RunTimings { first_line, total },
    };
    if let Some(path) = &args.json_report {
        let mut report = outcome.report_json();
        if let Some(e) = &download_error {
            report["download_error"] = serde_json::Value::String(format!("{e:#}"));
        }
        write_json_report(path, &report)?;
    }
    if let Some(e) = download_error {
        return Err(e.context(format!("job {} finished", outcome.job_id)));
    }
    Ok(outcome)
}

fn emit(emits: Vec<Emit>, progress: &mut (dyn FnMut(RunProgress) + Send)) {
    for e in emits {
        progress(RunProgress::Event(e));
    }
}

/// Largest recorded output read back from the CAS in one BatchRead.
const MAX_RECORDED_OUTPUT_BYTES: u64 = 32 << 20;

/// Reads the recorded outputs the watch did not stream and passes them on as lines; says
/// whether any line came. Failures are reported and otherwise ignored: the job's verdict does
/// not depend on them.
async fn recorded_outputs(
    client: &mut FarmClient,
    watch: &mut JobWatch,
    job: &JobStatus,
    progress: &mut (dyn FnMut(RunProgress) + Send),
) -> bool {
    let mut printed = false;
    for unseen in watch.unseen_outputs(job) {
        if unseen.digest.size_bytes() > MAX_RECORDED_OUTPUT_BYTES {
            progress(RunProgress::OutputNotShown {
                platform: unseen.platform.clone(),
                digest: unseen.digest,
            });
            continue;
        }
        let read = rpc(client
            .cas
            .batch_read(v1::BatchReadRequest {
                digests: vec![unseen.digest.to_proto()],
            })
            .await)
        .with_context(|| format!("failed to read the recorded output of {}", unseen.action_id));
        match read {
            Ok(response) => {
                for blob in response.blobs {
                    if Digest::of(&blob.data) != unseen.digest {
                        continue;
                    }
                    let emits = watch.recorded_output(&unseen, &blob.data);
                    printed |= emits.iter().any(Emit::is_output);
                    emit(emits, progress);
                }
            }
            Err(e) => progress(RunProgress::OutputUnreadable(format!("{e:#}"))),
        }
    }
    printed
}

/// The exit code of `farm run`: 0 when every requested platform succeeded; else the first
/// non-zero exit code of a FAILED action, in the order of `--platform`; else 1 (infra failure,
/// unschedulable, cancelled, or a code that does not fit a process exit status).
pub fn job_exit_code(platforms: &[String], actions: &[ActionStatus]) -> u8 {
    let succeeded = |a: &ActionStatus| a.state() == ActionState::Succeeded;
    let all_asked_ran = platforms
        .iter()
        .all(|p| actions.iter().any(|a| a.platform == *p));
    if !actions.is_empty() && all_asked_ran && actions.iter().all(succeeded) {
        return 0;
    }
    ordered_actions(platforms, actions)
        .into_iter()
        .filter(|a| a.state() == ActionState::Failed)
        .filter_map(|a| a.result.as_ref().map(|r| r.exit_code))
        .find(|code| *code != 0)
        .map(|code| u8::try_from(code).unwrap_or(1))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::farm::job_watch::tests::status;

    fn platforms(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exit_code_is_zero_only_when_every_platform_succeeded() {
        let order = platforms(&["linux/arm64", "linux/s390x"]);
        let ok = vec![
            status("linux/arm64", ActionState::Succeeded, Some(0)),
            status("linux/s390x", ActionState::Succeeded, Some(0)),
        ];
        assert_eq!(job_exit_code(&order, &ok), 0);
        assert_eq!(job_exit_code(&order, &ok[..1]), 1, "a platform is missing");
        assert_eq!(job_exit_code(&order, &[]), 1);
    }

    #[test]
    fn exit_code_is_the_first_failure_in_platform_order() {
        let order = platforms(&["linux/arm64", "linux/s390x", "linux/amd64"]);
        let actions = vec![
            status("linux/amd64", ActionState::Failed, Some(7)),
            status("linux/s390x", ActionState::Failed, Some(3)),
            status("linux/arm64", ActionState::InfraFailed, None),
        ];
        assert_eq!(job_exit_code(&order, &actions), 3);
    }

    #[test]
    fn exit_code_is_one_for_infra_trouble_and_odd_codes() {
        let order = platforms(&["linux/arm64", "linux/s390x"]);
        let infra = vec![
            status("linux/arm64", ActionState::Succeeded, Some(0)),
            status("linux/s390x", ActionState::Unschedulable, None),
        ];
        assert_eq!(job_exit_code(&order, &infra), 1);
        let cancelled = vec![
            status("linux/arm64", ActionState::Cancelled, Some(143)),
            status("linux/s390x", ActionState::Succeeded, Some(0)),
        ];
        assert_eq!(
            job_exit_code(&order, &cancelled),
            1,
            "cancelled is not failed"
        );
        let odd = vec![
            status("linux/arm64", ActionState::Failed, Some(300)),
            status("linux/s390x", ActionState::Failed, Some(-1)),
        ];
        assert_eq!(job_exit_code(&order, &odd), 1);
        let timed_out = vec![status("linux/arm64", ActionState::Failed, Some(0))];
        assert_eq!(job_exit_code(&order[..1], &timed_out), 1);
    }

    #[test]
    fn the_json_report_has_each_action_with_cached_and_exit_code() {
        let mut hit = status("linux/arm64", ActionState::Succeeded, Some(0));
        hit.cached = true;
        let ran = status("linux/s390x", ActionState::Failed, Some(3));
        let lost = status("linux/amd64", ActionState::Unschedulable, None);
        let outcome = RunOutcome {
            job_id: "j1".into(),
            exit_code: 3,
            job: Some(JobStatus {
                spec: Some(v1::JobSpec {
                    platforms: platforms(&["linux/s390x", "linux/arm64", "linux/amd64"]),
                    ..Default::default()
                }),
                actions: vec![hit, ran, lost],
                ..Default::default()
            }),
            upload: None,
            downloads: Vec::new(),
            timings: RunTimings {
                first_line: None,
                total: Duration::ZERO,
            },
        };
        let v = outcome.report_json();
        assert_eq!(v["job_id"], "j1");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(
            (v["ran"].as_u64(), v["cached"].as_u64()),
            (Some(1), Some(1))
        );
        let a = &v["actions"];
        assert_eq!(a[0]["platform"], "linux/s390x");
        assert_eq!(
            (a[0]["state"].as_str(), a[0]["exit_code"].as_i64()),
            (Some("failed"), Some(3))
        );
        assert_eq!(
            (a[1]["cached"].as_bool(), a[1]["outcome"].as_str()),
            (Some(true), Some("exited"))
        );
        assert_eq!(a[2]["exit_code"], serde_json::Value::Null);
        assert_eq!(a[2]["output_files"], serde_json::json!([]));
        assert_eq!(v["upload"], serde_json::Value::Null);
        assert_eq!(
            ran_cached_line(&outcome.job.unwrap().actions),
            "1 ran, 1 cached"
        );
    }

    #[test]
    fn bad_arguments_fail_before_anything_is_sent() {
        let mut args = RunArgs::new(["linux/arm64"], ["true"]);
        args.env = vec![parse_env_var("A=1").unwrap(), parse_env_var("A=2").unwrap()];
        let e = args.job_spec(None).unwrap_err().to_string();
        assert!(e.contains("\"A\" is given more than once"), "{e}");
        let mut args = RunArgs::new(["linux/arm64"], ["true"]);
        args.workdir = Some("/abs".into());
        assert!(args.job_spec(None).is_err());
        let spec = RunArgs::new(["linux/arm64"], ["go", "test"])
            .job_spec(None)
            .unwrap();
        assert_eq!(spec.timeout_ms, 600_000);
        assert_eq!(spec.argv, ["go", "test"]);
    }
}
