//! `archfarm status`: what the farm has and does — agents per platform (always saying
//! native or emulated), queues, running actions, recent jobs' verdicts and the content-addressed
//! store with its action cache — as tables for people or as a stable JSON document for scripts.
use super::display::{
    agent_state_name, format_ago, format_bytes, format_duration, format_gib, format_ms,
    format_verdict, mode, now_unix_ms,
};
use super::job::{action_json, format_labels, labels_json};
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1::{self, FarmStatusResponse};
use comfy_table::{presets, ContentArrangement, Table};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// `archfarm status [--json]`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print a JSON document instead of tables.
    #[arg(long)]
    pub json: bool,
    /// How many recent jobs to show.
    #[arg(long, default_value_t = 10)]
    pub recent_jobs: u32,
}

/// Prints the farm's status.
pub async fn command(client: &mut FarmClient, args: &StatusArgs) -> anyhow::Result<u8> {
    let status = farm_status(client, args.recent_jobs).await?;
    if args.json {
        println!("{:#}", status_json(&status));
    } else {
        print!("{}", render_status(&status, now_unix_ms()));
    }
    Ok(0)
}

/// Jobs.FarmStatus.
pub async fn farm_status(
    client: &mut FarmClient,
    recent_jobs: u32,
) -> anyhow::Result<FarmStatusResponse> {
    rpc(client
        .jobs
        .farm_status(v1::FarmStatusRequest { recent_jobs })
        .await)
    .context("failed to get the farm status")
}

/// Whether an agent carries the label `trusted=true` from its join token: only trusted
/// agents' native results are stored in the farm's cache by default.
pub fn is_trusted(a: &v1::AgentStatus) -> bool {
    a.labels
        .iter()
        .any(|l| l.key == "trusted" && l.value == "true")
}

fn trust(a: &v1::AgentStatus) -> &'static str {
    if is_trusted(a) {
        "trusted"
    } else {
        "untrusted"
    }
}

/// A table in the farm commands' style.
pub fn table(header: Vec<&str>) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// The status as text: a header line, then per platform a table of the agents that offer it,
/// then queues, running actions and recent jobs.
pub fn render_status(s: &FarmStatusResponse, now_unix_ms: u64) -> String {
    let mut out = String::new();
    let count = |state: v1::AgentState| s.agents.iter().filter(|a| a.state() == state).count();
    let _ = writeln!(
        out,
        "coordinator up {}; {} agents: {} ready, {} busy, {} draining, {} quarantined, {} lost, {} revoked; {} stale results refused",
        format_duration(Duration::from_millis(
            now_unix_ms.saturating_sub(s.coordinator_started_unix_ms)
        )),
        s.agents.len(),
        count(v1::AgentState::Ready),
        count(v1::AgentState::Busy),
        count(v1::AgentState::Draining),
        count(v1::AgentState::Quarantined),
        count(v1::AgentState::Lost),
        count(v1::AgentState::Revoked),
        s.stale_results_refused,
    );

    // Agents grouped by the platforms they offer; natives first within a platform.
    let mut by_platform: BTreeMap<&str, Vec<(&v1::AgentStatus, bool)>> = BTreeMap::new();
    for a in &s.agents {
        for offer in &a.platforms {
            by_platform
                .entry(offer.platform.as_str())
                .or_default()
                .push((a, offer.emulated));
        }
    }
    if by_platform.is_empty() {
        let _ = writeln!(
            out,
            "\nno agents; make a join token with `archfarm token create`"
        );
    }
    for (platform, mut agents) in by_platform {
        agents.sort_by(|a, b| (a.1, &a.0.agent_id).cmp(&(b.1, &b.0.agent_id)));
        let natives = agents.iter().filter(|(_, e)| !e).count();
        let _ = writeln!(
            out,
            "\n{platform}: {natives} native, {} emulated",
            agents.len() - natives
        );
        let mut t = table(vec![
            "agent",
            "hostname",
            "mode",
            "trust",
            "state",
            "slots",
            "heartbeat",
            "cores",
            "memory",
            "load",
            "infra fails",
            "labels",
        ]);
        for (a, emulated) in agents {
            t.add_row(vec![
                a.agent_id.clone(),
                a.hostname.clone(),
                mode(emulated).to_uppercase(),
                trust(a).to_string(),
                if a.paused_reason.is_empty() {
                    agent_state_words(a, now_unix_ms)
                } else {
                    format!("{} (paused)", agent_state_words(a, now_unix_ms))
                },
                format!("{}/{}", a.slots_used, a.slots),
                format_ago(now_unix_ms, a.last_seen_unix_ms),
                a.cores.to_string(),
                format_gib(a.memory_bytes),
                format!("{:.2}", a.load_1m),
                a.consecutive_infra_failures.to_string(),
                format_labels(&a.labels),
            ]);
        }
        let _ = writeln!(out, "{t}");
    }
    for a in s.agents.iter().filter(|a| a.quarantined_until_unix_ms > 0) {
        let _ = writeln!(
            out,
            "{} {}: {}",
            a.agent_id,
            agent_state_words(a, now_unix_ms),
            a.quarantine_reason
        );
    }

    if !s.agents.is_empty() {
        let _ = writeln!(out, "\nagent isolation");
        let mut t = table(vec!["agent", "sandbox", "limits", "takes work"]);
        let mut agents: Vec<&v1::AgentStatus> = s.agents.iter().collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        for a in agents {
            t.add_row(vec![
                a.agent_id.clone(),
                sandbox_words(&a.sandbox),
                or_unknown(&a.limits),
                if a.paused_reason.is_empty() {
                    "yes".to_string()
                } else {
                    format!("no: {}", a.paused_reason)
                },
            ]);
        }
        let _ = writeln!(out, "{t}");
        let mut unsandboxed: Vec<&str> = s
            .agents
            .iter()
            .filter(|a| !archfarm_proto::is_sandboxed(&a.sandbox))
            .map(|a| a.agent_id.as_str())
            .collect();
        unsandboxed.sort_unstable();
        if !unsandboxed.is_empty() {
            let _ = writeln!(
                out,
                "WARNING: {} {} actions UNSANDBOXED, with the access of the agent's user: {}",
                unsandboxed.len(),
                if unsandboxed.len() == 1 {
                    "agent runs"
                } else {
                    "agents run"
                },
                unsandboxed.join(", ")
            );
        }
    }

    let _ = writeln!(out, "\nqueues");
    if s.queues.is_empty() {
        let _ = writeln!(out, "nothing queued or running");
    } else {
        let mut t = table(vec!["platform", "queued", "running", "oldest wait"]);
        let mut queues: Vec<&v1::PlatformQueue> = s.queues.iter().collect();
        queues.sort_by(|a, b| a.platform.cmp(&b.platform));
        for q in queues {
            t.add_row(vec![
                q.platform.clone(),
                q.queued.to_string(),
                q.running.to_string(),
                if q.queued == 0 {
                    "-".to_string()
                } else {
                    format_ms(q.oldest_wait_ms)
                },
            ]);
        }
        let _ = writeln!(out, "{t}");
    }

    let _ = writeln!(out, "\nrunning actions");
    if s.running.is_empty() {
        let _ = writeln!(out, "none");
    } else {
        let mut t = table(vec![
            "action",
            "platform",
            "agent",
            "mode",
            "attempt",
            "running for",
        ]);
        for a in &s.running {
            t.add_row(vec![
                a.action_id.clone(),
                a.platform.clone(),
                a.agent_id.clone(),
                mode(a.emulated).to_string(),
                a.attempts.to_string(),
                running_for(a, now_unix_ms),
            ]);
        }
        let _ = writeln!(out, "{t}");
    }

    if let Some(cas) = &s.cas {
        let _ = writeln!(out, "\ncontent-addressed store");
        out.push_str(&render_cas(cas));
    }

    let _ = writeln!(out, "\nrecent jobs");
    if s.recent_jobs.is_empty() {
        let _ = writeln!(out, "none");
    } else {
        let mut t = table(vec![
            "job",
            "submitter",
            "description",
            "submitted",
            "state",
            "verdict",
            "infra retries",
        ]);
        for j in &s.recent_jobs {
            t.add_row(vec![
                j.job_id.clone(),
                j.submitter.clone(),
                j.description.clone(),
                format_ago(now_unix_ms, j.submitted_unix_ms),
                if j.finished { "finished" } else { "running" }.to_string(),
                format_verdict(&j.states),
                j.infra_failures.to_string(),
            ]);
        }
        let _ = writeln!(out, "{t}");
    }
    out
}

/// An agent's sandbox as reported, marked `UNSANDBOXED` unless it is bubblewrap.
fn sandbox_words(sandbox: &str) -> String {
    if archfarm_proto::is_sandboxed(sandbox) {
        sandbox.to_string()
    } else {
        format!("UNSANDBOXED ({})", or_unknown(sandbox))
    }
}

/// The text, or "unknown (older agent)" when an agent did not say.
fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        "unknown (older agent)".to_string()
    } else {
        s.to_string()
    }
}

/// An agent's state, with its quarantine: `quarantined (45s left)`, or `ready (probation)`
/// once a quarantine has passed and no success has cleared it yet.
pub fn agent_state_words(a: &v1::AgentStatus, now_unix_ms: u64) -> String {
    let state = agent_state_name(a.state());
    if a.quarantined_until_unix_ms == 0 {
        state.to_string()
    } else if a.state() == v1::AgentState::Quarantined {
        let left = a.quarantined_until_unix_ms.saturating_sub(now_unix_ms);
        format!("{state} ({} left)", format_ms(left))
    } else {
        format!("{state} (probation)")
    }
}

/// `hits/lookups (P%)`, or `no lookups`.
pub fn format_hit_ratio(hits: u64, lookups: u64) -> String {
    if lookups == 0 {
        return "no lookups".to_string();
    }
    format!(
        "{hits}/{lookups} ({:.0}%)",
        hits as f64 * 100.0 / lookups as f64
    )
}

/// The CAS and action-cache figures, one line each:
/// ```text
///   stored        1.2 GiB of 10.0 GiB budget (12%) in 10234 blobs; 3 evicted since start
///   transfers     800.0 MiB uploaded, 2.1 GiB saved by dedup since start
///   action cache  1234 entries; hits last hour 7/10 (70%), total 50/100 (50%)
/// ```
pub fn render_cas(c: &v1::CasStats) -> String {
    let budget = if c.budget_bytes == 0 {
        "no budget".to_string()
    } else {
        format!(
            "{} budget ({:.0}%)",
            format_bytes(c.budget_bytes),
            c.bytes as f64 * 100.0 / c.budget_bytes as f64
        )
    };
    format!(
        "  stored        {} of {budget} in {} blobs; {} evicted since start\n\
         \x20 transfers     {} uploaded, {} saved by dedup since start\n\
         \x20 action cache  {} entries; hits last hour {}, total {}\n",
        format_bytes(c.bytes),
        c.blobs,
        c.evicted_blobs,
        format_bytes(c.uploaded_bytes),
        format_bytes(c.deduplicated_bytes),
        c.cache_entries,
        format_hit_ratio(c.cache_hits_last_hour, c.cache_lookups_last_hour),
        format_hit_ratio(c.cache_hits_total, c.cache_lookups_total),
    )
}

/// The CAS figures as JSON, with the proto's field names.
pub fn cas_json(c: &v1::CasStats) -> Value {
    json!({
        "bytes": c.bytes,
        "budget_bytes": c.budget_bytes,
        "blobs": c.blobs,
        "uploaded_bytes": c.uploaded_bytes,
        "deduplicated_bytes": c.deduplicated_bytes,
        "evicted_blobs": c.evicted_blobs,
        "cache_lookups_last_hour": c.cache_lookups_last_hour,
        "cache_hits_last_hour": c.cache_hits_last_hour,
        "cache_lookups_total": c.cache_lookups_total,
        "cache_hits_total": c.cache_hits_total,
        "cache_entries": c.cache_entries,
    })
}

/// How long a running action has run: since its lease started when the coordinator says,
/// else since the result's start, else since it was queued.
fn running_for(a: &v1::ActionStatus, now_unix_ms: u64) -> String {
    let started = Some(a.started_unix_ms)
        .filter(|t| *t > 0)
        .or_else(|| a.result.as_ref().map(|r| r.started_unix_ms))
        .filter(|t| *t > 0);
    match started {
        Some(t) => format_ms(now_unix_ms.saturating_sub(t)),
        None if a.queued_unix_ms > 0 => format!(
            "{} (since queued)",
            format_ms(now_unix_ms.saturating_sub(a.queued_unix_ms))
        ),
        None => "?".to_string(),
    }
}

/// The status as a JSON document with snake_case fields mirroring the proto:
/// `coordinator_started_unix_ms`, `stale_results_refused`, `agents`, `queues`, `running`,
/// `recent_jobs`, `cas` (the proto's CasStats fields, or null when the coordinator sends none).
/// States are lower-case names (`ready`, `infra_failed`); labels are objects.
pub fn status_json(s: &FarmStatusResponse) -> Value {
    let agents: Vec<Value> = s
        .agents
        .iter()
        .map(|a| {
            json!({
                "agent_id": a.agent_id,
                "hostname": a.hostname,
                "platforms": a.platforms.iter().map(|p| json!({
                    "platform": p.platform,
                    "emulated": p.emulated,
                })).collect::<Vec<_>>(),
                "labels": labels_json(&a.labels),
                "trusted": is_trusted(a),
                "state": agent_state_name(a.state()),
                "slots_used": a.slots_used,
                "slots": a.slots,
                "last_seen_unix_ms": a.last_seen_unix_ms,
                "cores": a.cores,
                "memory_bytes": a.memory_bytes,
                "kernel": a.kernel,
                "free_disk_bytes": a.free_disk_bytes,
                "load_1m": a.load_1m,
                "running_actions": a.running_actions,
                "sandbox": a.sandbox,
                "sandboxed": archfarm_proto::is_sandboxed(&a.sandbox),
                "limits": a.limits,
                "paused_reason": a.paused_reason,
                "quarantined_until_unix_ms": a.quarantined_until_unix_ms,
                "quarantine_reason": a.quarantine_reason,
                "consecutive_infra_failures": a.consecutive_infra_failures,
            })
        })
        .collect();
    let queues: Vec<Value> = s
        .queues
        .iter()
        .map(|q| {
            json!({
                "platform": q.platform,
                "queued": q.queued,
                "running": q.running,
                "oldest_wait_ms": q.oldest_wait_ms,
            })
        })
        .collect();
    let recent_jobs: Vec<Value> = s
        .recent_jobs
        .iter()
        .map(|j| {
            json!({
                "job_id": j.job_id,
                "submitter": j.submitter,
                "description": j.description,
                "submitted_unix_ms": j.submitted_unix_ms,
                "finished": j.finished,
                "states": Value::Object(j.states.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
                "infra_failures": j.infra_failures,
            })
        })
        .collect();
    json!({
        "coordinator_started_unix_ms": s.coordinator_started_unix_ms,
        "stale_results_refused": s.stale_results_refused,
        "agents": agents,
        "queues": queues,
        "running": s.running.iter().map(action_json).collect::<Vec<_>>(),
        "recent_jobs": recent_jobs,
        "cas": s.cas.as_ref().map_or(Value::Null, cas_json),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> FarmStatusResponse {
        let now = 1_000_000_000;
        FarmStatusResponse {
            agents: vec![
                v1::AgentStatus {
                    agent_id: "a-arm".into(),
                    hostname: "box1".into(),
                    platforms: vec![
                        v1::PlatformOffer {
                            platform: "linux/arm64".into(),
                            emulated: false,
                        },
                        v1::PlatformOffer {
                            platform: "linux/arm/v7".into(),
                            emulated: true,
                        },
                    ],
                    labels: vec![
                        v1::Label {
                            key: "lab".into(),
                            value: "osu".into(),
                        },
                        v1::Label {
                            key: "trusted".into(),
                            value: "true".into(),
                        },
                    ],
                    state: v1::AgentState::Busy as i32,
                    slots_used: 2,
                    slots: 2,
                    last_seen_unix_ms: now - 3_000,
                    cores: 8,
                    memory_bytes: 16 << 30,
                    load_1m: 1.5,
                    sandbox: "bwrap (uid 65534, no network)".into(),
                    ..Default::default()
                },
                v1::AgentStatus {
                    agent_id: "a-emu".into(),
                    hostname: "x86".into(),
                    platforms: vec![v1::PlatformOffer {
                        platform: "linux/arm64".into(),
                        emulated: true,
                    }],
                    state: v1::AgentState::Ready as i32,
                    slots: 2,
                    last_seen_unix_ms: now - 1_000,
                    sandbox: "none: turned off by policy (sandbox = \"none\"); actions run as root"
                        .into(),
                    ..Default::default()
                },
                v1::AgentStatus {
                    agent_id: "a-flaky".into(),
                    hostname: "box2".into(),
                    platforms: vec![v1::PlatformOffer {
                        platform: "linux/s390x".into(),
                        emulated: false,
                    }],
                    state: v1::AgentState::Quarantined as i32,
                    slots: 1,
                    last_seen_unix_ms: now - 1_000,
                    quarantined_until_unix_ms: now + 45_000,
                    quarantine_reason: "3 infra failures in a row (last: disk full)".into(),
                    consecutive_infra_failures: 3,
                    ..Default::default()
                },
            ],
            queues: vec![v1::PlatformQueue {
                platform: "linux/arm64".into(),
                queued: 3,
                running: 2,
                oldest_wait_ms: 12_000,
            }],
            running: vec![v1::ActionStatus {
                action_id: "j1/linux/arm64".into(),
                platform: "linux/arm64".into(),
                state: v1::ActionState::Running as i32,
                attempts: 1,
                agent_id: "a-arm".into(),
                queued_unix_ms: now - 65_000,
                ..Default::default()
            }],
            recent_jobs: vec![v1::JobSummary {
                job_id: "j1".into(),
                states: [("succeeded".to_string(), 4), ("failed".to_string(), 1)]
                    .into_iter()
                    .collect(),
                infra_failures: 2,
                ..Default::default()
            }],
            coordinator_started_unix_ms: now - 180_000,
            stale_results_refused: 0,
            cas: None,
        }
    }

    #[test]
    fn human_form_groups_agents_by_platform_and_says_native_or_emulated() {
        let text = render_status(&sample(), 1_000_000_000);
        assert!(
            text.contains(
                "coordinator up 3m; 3 agents: 1 ready, 1 busy, 0 draining, 1 quarantined"
            ),
            "{text}"
        );
        assert!(text.contains("linux/arm64: 1 native, 1 emulated"), "{text}");
        assert!(
            text.contains("linux/arm/v7: 0 native, 1 emulated"),
            "{text}"
        );
        assert!(
            text.contains("NATIVE") && text.contains("EMULATED"),
            "{text}"
        );
        assert!(
            text.contains("3s ago") && text.contains("16.0 GiB"),
            "{text}"
        );
        assert!(text.contains("4 succeeded, 1 failed"), "{text}");
        assert!(text.contains("1m 5s (since queued)"), "{text}");
        assert!(
            text.contains("trusted") && text.contains("untrusted"),
            "{text}"
        );
        assert!(
            text.contains(
                "a-flaky quarantined (45s left): 3 infra failures in a row (last: disk full)"
            ),
            "{text}"
        );
        let native = text.find("a-arm").unwrap();
        let emulated = text.find("a-emu").unwrap();
        assert!(native < emulated, "natives come first:\n{text}");
    }

    #[test]
    fn json_form_is_snake_case_with_state_names() {
        let v = status_json(&sample());
        assert_eq!(v["agents"][0]["state"], "busy");
        assert_eq!(v["agents"][0]["labels"]["lab"], "osu");
        assert_eq!(v["agents"][0]["trusted"], true);
        assert_eq!(v["agents"][1]["trusted"], false);
        assert_eq!(v["agents"][1]["platforms"][0]["emulated"], true);
        assert_eq!(v["queues"][0]["oldest_wait_ms"], 12_000);
        assert_eq!(v["running"][0]["state"], "running");
        assert_eq!(v["recent_jobs"][0]["states"]["succeeded"], 4);
        assert_eq!(v["recent_jobs"][0]["infra_failures"], 2);
        assert_eq!(v["agents"][2]["state"], "quarantined");
        assert_eq!(v["agents"][2]["consecutive_infra_failures"], 3);
        assert_eq!(
            v["agents"][2]["quarantined_until_unix_ms"],
            1_000_045_000u64
        );
        assert_eq!(v["cas"], Value::Null);
    }

    fn cas() -> v1::CasStats {
        v1::CasStats {
            bytes: 3 << 29,
            budget_bytes: 10 << 30,
            blobs: 10_234,
            uploaded_bytes: 800 << 20,
            deduplicated_bytes: 2200 << 20,
            evicted_blobs: 3,
            cache_lookups_last_hour: 10,
            cache_hits_last_hour: 7,
            cache_lookups_total: 300,
            cache_hits_total: 100,
            cache_entries: 1234,
        }
    }

    #[test]
    fn the_cas_section_shows_sizes_ratios_and_dedup() {
        let mut s = sample();
        let text = render_status(&s, 1_000_000_000);
        assert!(!text.contains("content-addressed store"), "{text}");
        s.cas = Some(cas());
        let text = render_status(&s, 1_000_000_000);
        assert!(text.contains("content-addressed store"), "{text}");
        assert!(
            text.contains("1.5 GiB of 10.0 GiB budget (15%) in 10234 blobs; 3 evicted"),
            "{text}"
        );
        assert!(
            text.contains("800.0 MiB uploaded, 2.1 GiB saved by dedup"),
            "{text}"
        );
        assert!(
            text.contains("1234 entries; hits last hour 7/10 (70%), total 100/300 (33%)"),
            "{text}"
        );
        let empty = render_cas(&v1::CasStats::default());
        assert!(empty.contains("0 B of no budget in 0 blobs"), "{empty}");
        assert!(
            empty.contains("hits last hour no lookups, total no lookups"),
            "{empty}"
        );
        let v = status_json(&s);
        assert_eq!(v["cas"]["budget_bytes"], 10u64 << 30);
        assert_eq!(v["cas"]["cache_hits_last_hour"], 7);
        assert_eq!(v["cas"]["deduplicated_bytes"], 2200u64 << 20);
        assert_eq!(v["cas"].as_object().unwrap().len(), 11);
    }

    #[test]
    fn unsandboxed_agents_are_marked_plainly() {
        let text = render_status(&sample(), 1_000_000_000);
        assert!(text.contains("bwrap (uid 65534, no network)"), "{text}");
        assert!(
            text.contains("UNSANDBOXED (none: turned off by policy"),
            "{text}"
        );
        assert!(
            text.contains("UNSANDBOXED (unknown (older agent))"),
            "{text}"
        );
        assert!(
            text.contains(
                "WARNING: 2 agents run actions UNSANDBOXED, with the access of the agent's \
                 user: a-emu, a-flaky"
            ),
            "{text}"
        );
        let v = status_json(&sample());
        assert_eq!(v["agents"][0]["sandboxed"], true);
        assert_eq!(v["agents"][1]["sandboxed"], false);
        assert_eq!(v["agents"][2]["sandboxed"], false);
        let mut all = sample();
        for a in &mut all.agents {
            a.sandbox = "bwrap (uid 65534, no network)".into();
        }
        let text = render_status(&all, 1_000_000_000);
        assert!(!text.contains("UNSANDBOXED"), "{text}");
    }

    #[test]
    fn running_for_counts_from_the_lease_start() {
        let now = 1_000_000_000;
        let mut a = sample().running[0].clone();
        assert_eq!(running_for(&a, now), "1m 5s (since queued)");
        a.started_unix_ms = now - 42_000;
        assert_eq!(running_for(&a, now), "42s");
    }
}
