//! One job as people and tests see it: the per-platform action table (also `farm run`'s
//! summary), the job's JSON form, and `archfarm job JOB`.
use super::display::{
    action_state_name, format_ago, format_ms, mode, now_unix_ms, outcome_name, words,
};
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1::{self, ActionStatus, JobStatus};
use comfy_table::{presets, ContentArrangement, Table};
use serde_json::{json, Value};

/// `archfarm job JOB [--json]`.
#[derive(clap::Args, Debug)]
pub struct JobArgs {
    /// The job's id.
    pub job_id: String,
    /// Print the job as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Prints one job.
pub async fn command(client: &mut FarmClient, args: &JobArgs) -> anyhow::Result<u8> {
    let job = get_job(client, &args.job_id).await?;
    if args.json {
        println!("{:#}", job_json(&job));
    } else {
        print!("{}", render_job(&job, now_unix_ms()));
    }
    Ok(0)
}

/// Jobs.GetJob.
pub async fn get_job(client: &mut FarmClient, job_id: &str) -> anyhow::Result<JobStatus> {
    rpc(client
        .jobs
        .get_job(v1::GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await)
    .with_context(|| format!("failed to get job {job_id}"))
}

/// The job's header lines and action table.
pub fn render_job(job: &JobStatus, now_unix_ms: u64) -> String {
    let spec = job.spec.clone().unwrap_or_default();
    let mut out = format!(
        "job {} by {}, submitted {}, {}\n",
        job.job_id,
        if job.submitter.is_empty() {
            "?"
        } else {
            &job.submitter
        },
        format_ago(now_unix_ms, job.submitted_unix_ms),
        if job.finished { "finished" } else { "running" }
    );
    if !spec.description.is_empty() {
        out.push_str(&format!("description: {}\n", spec.description));
    }
    out.push_str(&format!("command: {}\n", spec.argv.join(" ")));
    out.push_str(&format!(
        "{}\n",
        actions_table(&spec.platforms, &job.actions)
    ));
    for line in cache_lines(&spec.platforms, &job.actions) {
        out.push_str(&format!("{line}\n"));
    }
    out
}

/// `producer (mode)` of a cache origin: `j-000012/linux/s390x of ci on lab-s390x-1 (native,
/// trusted agent)`.
fn origin_words(o: &v1::CacheOrigin) -> String {
    format!(
        "{} of {} on {} ({}{})",
        o.action_id,
        o.submitter,
        o.agent_id,
        mode(o.emulated),
        if o.trusted_agent {
            ", trusted agent"
        } else {
            ""
        }
    )
}

/// What the result cache did for each action: where a cached result came from (the scope
/// and what produced it; for steps, how many came from each scope), or where a result that
/// ran was written, or why it was not.
pub fn cache_lines(platforms: &[String], actions: &[ActionStatus]) -> Vec<String> {
    let mut lines = Vec::new();
    for a in ordered_actions(platforms, actions) {
        let steps: Vec<&v1::StepResult> = a
            .result
            .iter()
            .flat_map(|r| &r.step_results)
            .filter(|s| s.cached)
            .collect();
        if let Some(o) = &a.cache_origin {
            lines.push(format!(
                "{}: cached from the {} scope: {}",
                a.platform,
                o.scope,
                origin_words(o)
            ));
        } else if !steps.is_empty() {
            let mut by_scope: std::collections::BTreeMap<&str, usize> = Default::default();
            for s in &steps {
                let scope = s
                    .cache_origin
                    .as_ref()
                    .map_or("unknown", |o| o.scope.as_str());
                *by_scope.entry(scope).or_default() += 1;
            }
            let scopes: Vec<String> = by_scope
                .iter()
                .map(|(scope, n)| format!("{n} from the {scope} scope"))
                .collect();
            lines.push(format!(
                "{}: {} step{} cached: {}",
                a.platform,
                steps.len(),
                if steps.len() == 1 { "" } else { "s" },
                scopes.join(", ")
            ));
        } else if !a.cache_write.is_empty() {
            let written = if a.cache_write.starts_with("not cached") {
                a.cache_write.clone()
            } else {
                format!("result written to the {} cache scope", a.cache_write)
            };
            lines.push(format!("{}: {written}", a.platform));
        }
    }
    if !lines.is_empty() {
        lines.insert(0, "result cache:".to_string());
    }
    lines
}

/// The actions in the order of `platforms` (the order they were asked for), then any others.
pub fn ordered_actions<'a>(
    platforms: &[String],
    actions: &'a [ActionStatus],
) -> Vec<&'a ActionStatus> {
    let rank = |a: &ActionStatus| {
        platforms
            .iter()
            .position(|p| *p == a.platform)
            .unwrap_or(platforms.len())
    };
    let mut ordered: Vec<&ActionStatus> = actions.iter().collect();
    ordered.sort_by(|a, b| (rank(a), &a.platform).cmp(&(rank(b), &b.platform)));
    ordered
}

/// Platform, state, exit code, agent, native/emulated, duration, attempts (with those lost
/// for infra reasons apart), reason: one row per action.
pub fn actions_table(platforms: &[String], actions: &[ActionStatus]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec![
            "platform", "state", "exit", "agent", "mode", "duration", "attempts", "reason",
        ]);
    for a in ordered_actions(platforms, actions) {
        let result = a.result.as_ref();
        let agent = result
            .filter(|r| !r.agent_id.is_empty())
            .map(|r| r.agent_id.clone())
            .unwrap_or_else(|| a.agent_id.clone());
        let ran = result.is_some() || !a.agent_id.is_empty();
        let reason = if !a.reason.is_empty() {
            a.reason.clone()
        } else {
            result.map(|r| r.message.clone()).unwrap_or_default()
        };
        table.add_row(vec![
            a.platform.clone(),
            state_words(a),
            result.map_or("-".to_string(), |r| match r.outcome() {
                v1::ExecutionOutcome::Exited => r.exit_code.to_string(),
                other => words(outcome_name(other)),
            }),
            if agent.is_empty() {
                "-".to_string()
            } else {
                agent
            },
            if ran {
                mode(result.map_or(a.emulated, |r| r.emulated)).to_string()
            } else {
                "-".to_string()
            },
            result.map_or("-".to_string(), |r| format_ms(r.duration_ms)),
            format_attempts(a),
            reason,
        ]);
    }
    table
}

/// Attempts started, and how many of them were lost for infra reasons: `3 (2 infra)`.
pub fn format_attempts(a: &ActionStatus) -> String {
    match a.infra_failures {
        0 => a.attempts.to_string(),
        n => format!("{} ({n} infra)", a.attempts),
    }
}

/// An action's state in words, with `(cached)` when the result came from the action cache:
/// `succeeded (cached)`.
pub fn state_words(a: &ActionStatus) -> String {
    let state = words(action_state_name(a.state()));
    if a.cached {
        format!("{state} (cached)")
    } else {
        state
    }
}

/// How many actions an agent ran for this job and how many results came from the action
/// cache.
pub fn ran_and_cached(actions: &[ActionStatus]) -> (usize, usize) {
    let cached = actions.iter().filter(|a| a.cached).count();
    let ran = actions
        .iter()
        .filter(|a| !a.cached && a.result.is_some())
        .count();
    (ran, cached)
}

/// The JSON form of a digest: `{"hash", "size_bytes"}` or null.
pub fn digest_json(d: Option<&v1::Digest>) -> Value {
    match d {
        Some(d) => json!({ "hash": d.hash, "size_bytes": d.size_bytes }),
        None => Value::Null,
    }
}

/// Labels as a JSON object `{key: value}`.
pub fn labels_json(labels: &[v1::Label]) -> Value {
    Value::Object(
        labels
            .iter()
            .map(|l| (l.key.clone(), Value::String(l.value.clone())))
            .collect(),
    )
}

/// The JSON form of an execution result.
pub fn result_json(r: &v1::ExecutionResult) -> Value {
    json!({
        "outcome": outcome_name(r.outcome()),
        "exit_code": r.exit_code,
        "message": r.message,
        "stdout_digest": digest_json(r.stdout_digest.as_ref()),
        "stderr_digest": digest_json(r.stderr_digest.as_ref()),
        "agent_id": r.agent_id,
        "agent_hostname": r.agent_hostname,
        "platform": r.platform,
        "emulated": r.emulated,
        "started_unix_ms": r.started_unix_ms,
        "duration_ms": r.duration_ms,
        "peak_memory_bytes": r.peak_memory_bytes,
        "output_files": r.output_files.iter().map(|f| json!({
            "path": f.path,
            "digest": digest_json(f.digest.as_ref()),
            "executable": f.executable,
        })).collect::<Vec<_>>(),
        "output_directories": r.output_directories.iter().map(|d| json!({
            "path": d.path,
            "root": digest_json(d.root.as_ref()),
        })).collect::<Vec<_>>(),
    })
}

/// The JSON form of a cache origin.
pub fn origin_json(o: &v1::CacheOrigin) -> Value {
    json!({
        "scope": o.scope,
        "submitter": o.submitter,
        "action_id": o.action_id,
        "agent_id": o.agent_id,
        "emulated": o.emulated,
        "trusted_agent": o.trusted_agent,
        "recorded_unix_ms": o.recorded_unix_ms,
    })
}

/// The JSON form of an action status.
pub fn action_json(a: &ActionStatus) -> Value {
    json!({
        "action_id": a.action_id,
        "platform": a.platform,
        "state": action_state_name(a.state()),
        "attempts": a.attempts,
        "infra_failures": a.infra_failures,
        "agent_id": a.agent_id,
        "emulated": a.emulated,
        "reason": a.reason,
        "queued_unix_ms": a.queued_unix_ms,
        "started_unix_ms": a.started_unix_ms,
        "cached": a.cached,
        "cache_origin": a.cache_origin.as_ref().map_or(Value::Null, origin_json),
        "cache_write": a.cache_write,
        "action_digest": a.action_digest,
        "result": a.result.as_ref().map_or(Value::Null, result_json),
    })
}

/// The JSON form of a job: `{"job_id", "submitter", "submitted_unix_ms", "finished", "spec",
/// "actions": [...]}`, actions in the order of the spec's platforms.
pub fn job_json(job: &JobStatus) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    json!({
        "job_id": job.job_id,
        "submitter": job.submitter,
        "submitted_unix_ms": job.submitted_unix_ms,
        "finished": job.finished,
        "spec": {
            "platforms": spec.platforms,
            "argv": spec.argv,
            "env": Value::Object(spec.env.iter().map(|e| (e.name.clone(), Value::String(e.value.clone()))).collect()),
            "timeout_ms": spec.timeout_ms,
            "input_root": digest_json(spec.input_root.as_ref()),
            "allow_emulation": spec.allow_emulation,
            "required_labels": labels_json(&spec.required_labels),
            "working_directory": spec.working_directory,
            "description": spec.description,
            "output_paths": spec.output_paths,
            "no_cache": spec.no_cache,
        },
        "actions": ordered_actions(&spec.platforms, &job.actions).into_iter().map(action_json).collect::<Vec<_>>(),
    })
}

/// Labels as `k=v, flag` for tables.
pub fn format_labels(labels: &[v1::Label]) -> String {
    labels
        .iter()
        .map(|l| {
            if l.value.is_empty() {
                l.key.clone()
            } else {
                format!("{}={}", l.key, l.value)
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use v1::ActionState;

    fn action(platform: &str, state: ActionState) -> ActionStatus {
        ActionStatus {
            action_id: format!("j1/{platform}"),
            platform: platform.to_string(),
            state: state as i32,
            attempts: 1,
            ..Default::default()
        }
    }

    #[test]
    fn actions_follow_the_requested_platform_order() {
        let actions = vec![
            action("linux/s390x", ActionState::Succeeded),
            action("linux/amd64", ActionState::Failed),
            action("linux/arm64", ActionState::Queued),
        ];
        let order = vec!["linux/arm64".to_string(), "linux/s390x".to_string()];
        let got: Vec<&str> = ordered_actions(&order, &actions)
            .iter()
            .map(|a| a.platform.as_str())
            .collect();
        assert_eq!(got, ["linux/arm64", "linux/s390x", "linux/amd64"]);
    }

    #[test]
    fn job_json_uses_snake_case_names() {
        let mut failed = action("linux/arm64", ActionState::InfraFailed);
        failed.result = Some(v1::ExecutionResult {
            outcome: v1::ExecutionOutcome::TimedOut as i32,
            exit_code: 137,
            emulated: true,
            ..Default::default()
        });
        let job = JobStatus {
            job_id: "j1".into(),
            spec: Some(v1::JobSpec {
                platforms: vec!["linux/arm64".into()],
                ..Default::default()
            }),
            actions: vec![failed],
            ..Default::default()
        };
        let v = job_json(&job);
        assert_eq!(v["actions"][0]["state"], "infra_failed");
        assert_eq!(v["actions"][0]["result"]["outcome"], "timed_out");
        assert_eq!(v["actions"][0]["result"]["emulated"], true);
        assert_eq!(v["spec"]["input_root"], Value::Null);
        let table = actions_table(&["linux/arm64".into()], &job.actions).to_string();
        assert!(
            table.contains("infra failed") && table.contains("emulated"),
            "{table}"
        );
    }

    #[test]
    fn the_cache_lines_name_each_results_scope_and_producer() {
        let origin = |scope: &str| v1::CacheOrigin {
            scope: scope.into(),
            submitter: "ci".into(),
            action_id: "j-000007/linux/arm64".into(),
            agent_id: "lab-arm-1".into(),
            trusted_agent: true,
            ..Default::default()
        };
        let mut hit = action("linux/arm64", ActionState::Succeeded);
        hit.cached = true;
        hit.cache_origin = Some(origin("shared"));
        let mut steps = action("linux/s390x", ActionState::Succeeded);
        steps.cached = true;
        let step = |scope: &str| v1::StepResult {
            cached: true,
            cache_origin: Some(origin(scope)),
            ..Default::default()
        };
        steps.result = Some(v1::ExecutionResult {
            step_results: vec![step("shared"), step("principal pr-1"), step("shared")],
            ..Default::default()
        });
        let mut ran = action("linux/amd64", ActionState::Succeeded);
        ran.cache_write = "principal pr-1".into();
        let mut refused = action("linux/ppc64le", ActionState::Succeeded);
        refused.cache_write = "not cached: it ran under emulation".into();
        let running = action("linux/riscv64", ActionState::Running);
        let lines = cache_lines(&[], &[hit, steps, ran, refused, running]);
        assert_eq!(
            lines,
            [
                "result cache:",
                "linux/amd64: result written to the principal pr-1 cache scope",
                "linux/arm64: cached from the shared scope: j-000007/linux/arm64 of ci on \
                 lab-arm-1 (native, trusted agent)",
                "linux/ppc64le: not cached: it ran under emulation",
                "linux/s390x: 3 steps cached: 1 from the principal pr-1 scope, 2 from the \
                 shared scope",
            ]
        );
        assert!(cache_lines(&[], &[action("linux/amd64", ActionState::Queued)]).is_empty());
    }

    #[test]
    fn cached_results_are_marked_and_counted() {
        let mut hit = action("linux/arm64", ActionState::Succeeded);
        hit.cached = true;
        hit.action_digest = "ab".repeat(32);
        hit.result = Some(v1::ExecutionResult {
            outcome: v1::ExecutionOutcome::Exited as i32,
            output_files: vec![v1::OutputFile {
                path: "bin/x".into(),
                digest: Some(archfarm_proto::Digest::of(b"x").to_proto()),
                executable: true,
            }],
            ..Default::default()
        });
        let mut ran = action("linux/s390x", ActionState::Succeeded);
        ran.result = Some(v1::ExecutionResult::default());
        let queued = action("linux/amd64", ActionState::Unschedulable);
        let actions = vec![hit.clone(), ran, queued];
        assert_eq!(ran_and_cached(&actions), (1, 1));
        assert_eq!(state_words(&hit), "succeeded (cached)");
        let table = actions_table(&[], &actions).to_string();
        assert!(table.contains("succeeded (cached)"), "{table}");
        let v = action_json(&hit);
        assert_eq!(v["cached"], true);
        assert_eq!(v["action_digest"], "ab".repeat(32));
        assert_eq!(v["result"]["output_files"][0]["path"], "bin/x");
        assert_eq!(v["result"]["output_files"][0]["executable"], true);
    }
}
