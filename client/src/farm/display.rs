//! How farm values read for people and in JSON: durations, ages ("3s ago"), sizes, state names
//! and verdicts. Pure functions, shared by `status`, `job` and `run`.
use archfarm_proto::v1::{ActionState, AgentState, ExecutionOutcome};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A duration for people: `340ms`, `2.3s`, `42s`, `3m 5s`, `2h 4m`, `3d 1h`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let s = d.as_secs();
    if ms < 1000 {
        format!("{ms}ms")
    } else if s < 10 {
        format!("{:.1}s", d.as_secs_f64())
    } else if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        match s % 60 {
            0 => format!("{}m", s / 60),
            rest => format!("{}m {rest}s", s / 60),
        }
    } else if s < 86400 {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    } else {
        format!("{}d {}h", s / 86400, s % 86400 / 3600)
    }
}

/// [`format_duration`] of a count of milliseconds.
pub fn format_ms(ms: u64) -> String {
    format_duration(Duration::from_millis(ms))
}

/// How long ago `then_unix_ms` was, coarsely: `3s ago`, `4m ago`, `2h ago`, `5d ago`;
/// `never` for 0 and `0s ago` for a time slightly in the future (clock skew).
pub fn format_ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    if then_unix_ms == 0 {
        return "never".to_string();
    }
    let s = now_unix_ms.saturating_sub(then_unix_ms) / 1000;
    if s < 60 {
        format!("{s}s ago")
    } else if s < 3600 {
        format!("{}m ago", s / 60)
    } else if s < 86400 {
        format!("{}h ago", s / 3600)
    } else {
        format!("{}d ago", s / 86400)
    }
}

/// Bytes as GiB with one decimal: `15.6 GiB`.
pub fn format_gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes for people, binary units with one decimal: `512 B`, `1.5 KiB`, `3.2 MiB`, `1.0 GiB`,
/// `2.0 TiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Bytes as MiB with one decimal, without the unit.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// `native` or `emulated`: status always says which.
pub fn mode(emulated: bool) -> &'static str {
    if emulated {
        "emulated"
    } else {
        "native"
    }
}

/// An action state's name in JSON and in `JobSummary.states`: `infra_failed`.
pub fn action_state_name(state: ActionState) -> &'static str {
    match state {
        ActionState::Unspecified => "unspecified",
        ActionState::Queued => "queued",
        ActionState::Running => "running",
        ActionState::Succeeded => "succeeded",
        ActionState::Failed => "failed",
        ActionState::InfraFailed => "infra_failed",
        ActionState::Unschedulable => "unschedulable",
        ActionState::Cancelled => "cancelled",
    }
}

/// Whether an action in this state is done.
pub fn is_final(state: ActionState) -> bool {
    matches!(
        state,
        ActionState::Succeeded
            | ActionState::Failed
            | ActionState::InfraFailed
            | ActionState::Unschedulable
            | ActionState::Cancelled
    )
}

/// An agent state's name: `ready`, `busy`, `draining`, `lost`, `revoked`, `quarantined`.
pub fn agent_state_name(state: AgentState) -> &'static str {
    match state {
        AgentState::Unspecified => "unspecified",
        AgentState::Ready => "ready",
        AgentState::Busy => "busy",
        AgentState::Draining => "draining",
        AgentState::Lost => "lost",
        AgentState::Revoked => "revoked",
        AgentState::Quarantined => "quarantined",
    }
}

/// An execution outcome's name: `exited`, `timed_out`, `cancelled`, `infra_error`,
/// `limit_exceeded`.
pub fn outcome_name(outcome: ExecutionOutcome) -> &'static str {
    match outcome {
        ExecutionOutcome::Unspecified => "unspecified",
        ExecutionOutcome::Exited => "exited",
        ExecutionOutcome::TimedOut => "timed_out",
        ExecutionOutcome::Cancelled => "cancelled",
        ExecutionOutcome::InfraError => "infra_error",
        ExecutionOutcome::LimitExceeded => "limit_exceeded",
    }
}

/// A snake_case name as words: `infra_failed` -> `infra failed`.
pub fn words(name: &str) -> String {
    name.replace('_', " ")
}

/// Actions per state as a verdict: `4 succeeded, 1 failed`; good news first, then bad, then
/// what is still going, then any state this client does not know, by name.
pub fn format_verdict(states: &HashMap<String, u32>) -> String {
    const ORDER: [&str; 7] = [
        "succeeded",
        "failed",
        "infra_failed",
        "unschedulable",
        "cancelled",
        "running",
        "queued",
    ];
    let rank = |s: &str| ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len());
    let mut counts: Vec<(&String, &u32)> = states.iter().filter(|(_, n)| **n > 0).collect();
    counts.sort_by(|a, b| (rank(a.0), a.0).cmp(&(rank(b.0), b.0)));
    if counts.is_empty() {
        return "no actions".to_string();
    }
    counts
        .iter()
        .map(|(s, n)| format!("{n} {}", words(s)))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_ago() {
        let now = 1_000_000_000;
        assert_eq!(format_ago(now, 0), "never");
        assert_eq!(format_ago(now, now), "0s ago");
        assert_eq!(format_ago(now, now - 3_400), "3s ago");
        assert_eq!(format_ago(now, now - 59_999), "59s ago");
        assert_eq!(format_ago(now, now - 60_000), "1m ago");
        assert_eq!(format_ago(now, now - 2 * 3_600_000 - 5), "2h ago");
        assert_eq!(format_ago(now, now - 3 * 86_400_000), "3d ago");
        assert_eq!(format_ago(now, now + 1_500), "0s ago");
    }

    #[test]
    fn durations_read_at_a_useful_precision() {
        let f = |ms| format_ms(ms);
        assert_eq!(f(0), "0ms");
        assert_eq!(f(340), "340ms");
        assert_eq!(f(2_340), "2.3s");
        assert_eq!(f(42_900), "42s");
        assert_eq!(f(180_000), "3m");
        assert_eq!(f(185_000), "3m 5s");
        assert_eq!(f(2 * 3_600_000 + 4 * 60_000 + 7_000), "2h 4m");
        assert_eq!(f(3 * 86_400_000 + 3_600_000), "3d 1h");
    }

    #[test]
    fn verdicts_list_known_states_first() {
        let states: HashMap<String, u32> = [
            ("failed", 1),
            ("succeeded", 4),
            ("queued", 0),
            ("infra_failed", 2),
            ("zombie", 1),
        ]
        .into_iter()
        .map(|(s, n)| (s.to_string(), n))
        .collect();
        assert_eq!(
            format_verdict(&states),
            "4 succeeded, 1 failed, 2 infra failed, 1 zombie"
        );
        assert_eq!(format_verdict(&HashMap::new()), "no actions");
    }

    #[test]
    fn sizes() {
        assert_eq!(format_gib(16 << 30), "16.0 GiB");
        assert_eq!(mib(3 << 19), "1.5");
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(2 << 40), "2.0 TiB");
    }
}
