//! What go-build returns when its jobs are done ([`GoBuildReport`]): one result per target
//! and platform (built, cached or failed; where it was built; the binary's digest and where
//! it landed), the failed builds' output; and the ways it is shown: the line for a finished
//! job, the table people read, the counts line, the `--json-report` document, the exit code.
use super::plan::{Target, OUT_DIR};
use crate::farm::display::{action_state_name, format_bytes, format_ms, mode, words};
use crate::farm::upload::UploadReport;
use archfarm_proto::v1::{ActionState, ExecutionOutcome, JobStatus};
use archfarm_proto::{Digest, Platform};
use comfy_table::{presets, ContentArrangement, Table};
use serde_json::{json, Value};
use std::path::PathBuf;

/// What a go-build run did.
#[derive(Debug, Clone)]
pub struct GoBuildReport {
    /// `module` or `GOPATH`.
    pub mode: String,
    /// `go version` here.
    pub go_version: String,
    /// Built with cgo on agents of each platform.
    pub cgo: bool,
    /// What the input upload did.
    pub upload: UploadReport,
    /// One job per target platform, in `--platform` order.
    pub jobs: Vec<PlatformJob>,
    /// One result per target and platform.
    pub results: Vec<TargetResult>,
    /// The recorded output of the jobs in which a target failed.
    pub failed_outputs: Vec<FailedOutput>,
    /// From the start to the binaries in place.
    pub took: std::time::Duration,
}

impl GoBuildReport {
    /// 0 when every target was built (or cached) for every platform, else 1.
    pub fn exit_code(&self) -> u8 {
        exit_code(&self.results)
    }

    /// The `--json-report` document: `{"exit_code", "mode", "go_version", "cgo", "upload",
    /// "jobs": [{"platform", "job_id", "input_root", "state", "cached", "action_digest"}],
    /// "results": [see result_json], "built", "cached", "failed"}`.
    pub fn to_json(&self) -> Value {
        let jobs: Vec<Value> = self
            .jobs
            .iter()
            .map(|pj| {
                let a = pj.job.actions.first();
                json!({
                    "platform": pj.platform.to_string(),
                    "job_id": pj.job_id,
                    "input_root": pj.input_root.hex(),
                    "state": a.map(|a| action_state_name(a.state())),
                    "cached": a.is_some_and(|a| a.cached),
                    "action_digest": a.map(|a| a.action_digest.clone()),
                })
            })
            .collect();
        let n = |s: BuildState| self.results.iter().filter(|r| r.state == s).count();
        json!({
            "exit_code": self.exit_code(),
            "mode": self.mode,
            "go_version": self.go_version,
            "cgo": self.cgo,
            "upload": self.upload.to_json(),
            "jobs": jobs,
            "results": self.results.iter().map(result_json).collect::<Vec<_>>(),
            "built": n(BuildState::Built),
            "cached": n(BuildState::Cached),
            "failed": n(BuildState::Failed),
        })
    }
}

/// One target platform's job, finished.
#[derive(Debug, Clone)]
pub struct PlatformJob {
    /// The target platform.
    pub platform: Platform,
    /// The job's id.
    pub job_id: String,
    /// Its input tree.
    pub input_root: Digest,
    /// Its final status.
    pub job: JobStatus,
}

/// A recorded output stream (stdout or stderr) of a job in which a target failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedOutput {
    /// The target platform.
    pub platform: String,
    /// The output, or why it could not be read.
    pub text: Result<String, String>,
}

/// A failed build's output as lines behind its platform: `[linux/arm64] ...`.
pub fn failed_output_lines(output: &FailedOutput) -> Vec<String> {
    let p = &output.platform;
    match &output.text {
        Ok(text) => text.lines().map(|l| format!("[{p}] {l}")).collect(),
        Err(e) => vec![format!("[{p}] failed to read the build output: {e}")],
    }
}

/// The line for a platform's finished job; it names the target platform, not the build
/// platform its action ran on.
pub fn finished_line(platform: &Platform, job: &JobStatus) -> String {
    let Some(a) = job.actions.first() else {
        return format!("[{platform}] job {} has no action", job.job_id);
    };
    let r = a.result.as_ref();
    let agent = r
        .map(|r| r.agent_id.as_str())
        .filter(|id| !id.is_empty())
        .unwrap_or(&a.agent_id);
    let emulated = r.map_or(a.emulated, |r| r.emulated);
    let took = r.map_or(String::new(), |r| {
        format!(" in {}", format_ms(r.duration_ms))
    });
    match (a.state(), a.cached) {
        (ActionState::Succeeded, true) => format!(
            "[{platform}] cached (built earlier on agent {agent}, {} {})",
            mode(emulated),
            a.platform
        ),
        (ActionState::Succeeded, false) => format!(
            "[{platform}] built{took} on agent {agent} ({} {})",
            mode(emulated),
            a.platform
        ),
        _ => crate::farm::job_watch::progress_line(a).replacen(
            &format!("[{}]", a.platform),
            &format!("[{platform}]"),
            1,
        ),
    }
}

/// How a target fared on a platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BuildState {
    /// An agent built it now.
    Built,
    /// The action cache held the build: no agent ran anything.
    Cached,
    /// No usable binary.
    Failed,
}

impl BuildState {
    /// `built`, `cached` or `failed`.
    pub fn word(self) -> &'static str {
        match self {
            BuildState::Built => "built",
            BuildState::Cached => "cached",
            BuildState::Failed => "failed",
        }
    }
}

/// One target on one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetResult {
    /// The target.
    pub target: Target,
    /// The platform it was built for.
    pub platform: String,
    /// The verdict.
    pub state: BuildState,
    /// The job that built it.
    pub job_id: String,
    /// The agent that built it (for a cached result: the one that built it first).
    pub agent_id: String,
    /// The platform of the action that built it (linux/amd64 for cross-compiles).
    pub built_on: String,
    /// Whether that agent emulated its platform.
    pub emulated: bool,
    /// How long the action ran, in milliseconds.
    pub duration_ms: u64,
    /// The binary in the farm's CAS, and whether it is executable.
    pub output: Option<(Digest, bool)>,
    /// Where it was written.
    pub path: Option<PathBuf>,
    /// Why it failed.
    pub detail: String,
}

/// The results of `targets` on `platform` from the finished job (one action) that built them.
pub fn target_results(targets: &[Target], platform: &str, job: &JobStatus) -> Vec<TargetResult> {
    let action = job.actions.first();
    targets
        .iter()
        .map(|t| {
            let mut r = TargetResult {
                target: t.clone(),
                platform: platform.to_string(),
                state: BuildState::Failed,
                job_id: job.job_id.clone(),
                agent_id: String::new(),
                built_on: String::new(),
                emulated: false,
                duration_ms: 0,
                output: None,
                path: None,
                detail: String::new(),
            };
            let Some(a) = action else {
                r.detail = "the job has no action".to_string();
                return r;
            };
            r.built_on = a.platform.clone();
            r.agent_id = a.agent_id.clone();
            r.emulated = a.emulated;
            let result = a.result.as_ref();
            if let Some(res) = result {
                if !res.agent_id.is_empty() {
                    r.agent_id = res.agent_id.clone();
                }
                r.emulated = res.emulated;
                r.duration_ms = res.duration_ms;
            }
            let wanted = format!("{OUT_DIR}/{}", t.name);
            let produced = result.and_then(|res| {
                res.output_files
                    .iter()
                    .find(|f| f.path == wanted)
                    .and_then(|f| {
                        Some((Digest::from_proto(f.digest.as_ref()?).ok()?, f.executable))
                    })
            });
            let ran = matches!(a.state(), ActionState::Succeeded | ActionState::Failed);
            match produced {
                Some(output) if ran => {
                    r.output = Some(output);
                    r.state = if a.cached {
                        BuildState::Cached
                    } else {
                        BuildState::Built
                    };
                }
                _ => {
                    r.detail = failure_detail(a.state(), &a.reason, result);
                }
            }
            r
        })
        .collect()
}

fn failure_detail(
    state: ActionState,
    reason: &str,
    result: Option<&archfarm_proto::v1::ExecutionResult>,
) -> String {
    let state_words = words(action_state_name(state));
    match result {
        Some(res)
            if res.outcome() == ExecutionOutcome::Exited
                && res.exit_code == super::plan::WRONG_GO_EXIT =>
        {
            "the agent's Go differs from this client's (see its output)".to_string()
        }
        Some(res) if res.outcome() == ExecutionOutcome::Exited && res.exit_code != 0 => {
            "go build failed (see its output)".to_string()
        }
        Some(res) if res.outcome() == ExecutionOutcome::Exited => {
            "go build wrote no binary".to_string()
        }
        Some(res) => {
            let outcome = words(crate::farm::display::outcome_name(res.outcome()));
            if res.message.is_empty() {
                format!("{state_words}: {outcome}")
            } else {
                format!("{state_words}: {outcome}: {}", res.message)
            }
        }
        None if reason.is_empty() => state_words,
        None => format!("{state_words}: {reason}"),
    }
}

/// Where a result was built, for people: `agent a1 (native linux/amd64)`.
pub fn where_built(r: &TargetResult) -> String {
    if r.agent_id.is_empty() {
        return "-".to_string();
    }
    format!("agent {} ({} {})", r.agent_id, mode(r.emulated), r.built_on)
}

/// Target, platform, state, where built, size, path (or why it failed): one row per result.
pub fn results_table(results: &[TargetResult]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec![
            "target", "platform", "state", "built on", "size", "path",
        ]);
    for r in results {
        table.add_row(vec![
            r.target.import_path.clone(),
            r.platform.clone(),
            r.state.word().to_string(),
            where_built(r),
            r.output
                .map_or("-".to_string(), |(d, _)| format_bytes(d.size_bytes())),
            match (&r.path, r.state) {
                (Some(p), BuildState::Built | BuildState::Cached) => p.display().to_string(),
                _ if !r.detail.is_empty() => r.detail.clone(),
                _ => "-".to_string(),
            },
        ]);
    }
    table
}

/// `4 built, 1 cached, 0 failed`.
pub fn counts_line(results: &[TargetResult]) -> String {
    let n = |s: BuildState| results.iter().filter(|r| r.state == s).count();
    format!(
        "{} built, {} cached, {} failed",
        n(BuildState::Built),
        n(BuildState::Cached),
        n(BuildState::Failed)
    )
}

/// 0 when every target was built or cached on every platform, else 1.
pub fn exit_code(results: &[TargetResult]) -> u8 {
    u8::from(results.is_empty() || results.iter().any(|r| r.state == BuildState::Failed))
}

/// One result as JSON: `{"target", "name", "platform", "state", "cached", "job_id",
/// "agent_id", "built_on", "emulated", "duration_ms", "digest", "size_bytes", "path",
/// "detail"}`.
pub fn result_json(r: &TargetResult) -> Value {
    json!({
        "target": r.target.import_path,
        "name": r.target.name,
        "platform": r.platform,
        "state": r.state.word(),
        "cached": r.state == BuildState::Cached,
        "job_id": r.job_id,
        "agent_id": r.agent_id,
        "built_on": r.built_on,
        "emulated": r.emulated,
        "duration_ms": r.duration_ms,
        "digest": r.output.map(|(d, _)| d.hex()),
        "size_bytes": r.output.map(|(d, _)| d.size_bytes()),
        "path": r.path.as_ref().map(|p| p.display().to_string()),
        "detail": r.detail,
    })
}

/// A human duration of an action, or `-`.
pub fn duration_text(r: &TargetResult) -> String {
    if r.duration_ms == 0 {
        "-".to_string()
    } else {
        format_ms(r.duration_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use archfarm_proto::v1::{self, ActionStatus};

    fn targets() -> Vec<Target> {
        ["hello", "tool"]
            .into_iter()
            .map(|n| Target {
                import_path: format!("example.com/cmd/{n}"),
                name: n.to_string(),
            })
            .collect()
    }

    fn job(state: ActionState, cached: bool, exit_code: i32, outputs: &[&str]) -> JobStatus {
        JobStatus {
            job_id: "j7".into(),
            actions: vec![ActionStatus {
                action_id: "j7/linux/amd64".into(),
                platform: "linux/amd64".into(),
                state: state as i32,
                agent_id: "a1".into(),
                cached,
                result: Some(v1::ExecutionResult {
                    outcome: ExecutionOutcome::Exited as i32,
                    exit_code,
                    agent_id: "a0".into(),
                    duration_ms: 5200,
                    output_files: outputs
                        .iter()
                        .map(|p| v1::OutputFile {
                            path: p.to_string(),
                            digest: Some(Digest::of(p.as_bytes()).to_proto()),
                            executable: true,
                        })
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            finished: true,
            ..Default::default()
        }
    }

    #[test]
    fn each_target_is_judged_by_its_own_binary() {
        let j = job(ActionState::Failed, false, 1, &["out/hello"]);
        let r = target_results(&targets(), "linux/arm64", &j);
        assert_eq!(r[0].state, BuildState::Built);
        assert_eq!(r[0].agent_id, "a0", "the result's agent wins");
        assert_eq!(r[0].built_on, "linux/amd64");
        assert_eq!(r[0].output.unwrap().0, Digest::of(b"out/hello"));
        assert_eq!(r[1].state, BuildState::Failed);
        assert_eq!(r[1].detail, "go build failed (see its output)");
        assert_eq!(exit_code(&r), 1);
        assert_eq!(counts_line(&r), "1 built, 0 cached, 1 failed");
    }

    #[test]
    fn cache_hits_are_cached_and_everything_else_failed() {
        let j = job(ActionState::Succeeded, true, 0, &["out/hello", "out/tool"]);
        let r = target_results(&targets(), "linux/s390x", &j);
        assert!(r.iter().all(|r| r.state == BuildState::Cached));
        assert_eq!(exit_code(&r), 0);
        let v = result_json(&r[1]);
        assert_eq!(v["state"], "cached");
        assert_eq!(v["cached"], true);
        assert_eq!(v["name"], "tool");
        assert_eq!(v["size_bytes"], 8);

        let wrong_go = job(ActionState::Failed, false, 125, &[]);
        let r = target_results(&targets(), "linux/s390x", &wrong_go);
        assert!(r[0].detail.contains("Go differs"), "{}", r[0].detail);

        let mut lost = job(ActionState::Unschedulable, false, 0, &[]);
        lost.actions[0].result = None;
        lost.actions[0].reason = "no agent serves linux/amd64".into();
        let r = target_results(&targets(), "linux/s390x", &lost);
        assert_eq!(r[0].detail, "unschedulable: no agent serves linux/amd64");
        assert_eq!(exit_code(&[]), 1, "nothing built is no success");
    }

    #[test]
    fn the_table_has_a_row_per_target_and_platform() {
        let j = job(ActionState::Succeeded, false, 0, &["out/hello", "out/tool"]);
        let mut r = target_results(&targets(), "linux/riscv64", &j);
        r[0].path = Some(PathBuf::from("_output/linux/riscv64/hello"));
        let text = results_table(&r).to_string();
        assert!(text.contains("example.com/cmd/hello"), "{text}");
        assert!(text.contains("agent a0 (native linux/amd64)"), "{text}");
        assert!(text.contains("_output/linux/riscv64/hello"), "{text}");
        assert!(text.contains("built"), "{text}");
        assert_eq!(duration_text(&r[0]), "5.2s");
    }

    #[test]
    fn finished_lines_name_the_target_platform_not_the_build_platform() {
        let p: Platform = "linux/riscv64".parse().unwrap();
        let job = JobStatus {
            job_id: "j1".into(),
            actions: vec![v1::ActionStatus {
                action_id: "j1/linux/amd64".into(),
                platform: "linux/amd64".into(),
                state: ActionState::Succeeded as i32,
                agent_id: "a1".into(),
                result: Some(v1::ExecutionResult {
                    agent_id: "a1".into(),
                    duration_ms: 4200,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            finished_line(&p, &job),
            "[linux/riscv64] built in 4.2s on agent a1 (native linux/amd64)"
        );
        let mut failed = job.clone();
        failed.actions[0].state = ActionState::Failed as i32;
        failed.actions[0].result.as_mut().unwrap().exit_code = 1;
        let line = finished_line(&p, &failed);
        assert!(line.starts_with("[linux/riscv64] failed"), "{line}");
    }
}
