//! Wire messages to farm records and back; the only place both kinds meet.
use crate::farm::{AgentCommand, Completion, Outcome, StepCompletion};
use crate::hubs::JobUpdate;
use crate::model::*;
use archfarm_proto::{v1, Digest};
use prost::Message;

/// Labels to the wire form.
pub fn labels_to_proto(l: &Labels) -> Vec<v1::Label> {
    l.iter()
        .map(|(k, v)| v1::Label {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// An action's spec to the wire Action.
pub fn action_to_proto(spec: &ActionSpec) -> v1::Action {
    v1::Action {
        argv: spec.argv.clone(),
        env: crate::planning::spec::env_to_proto(&spec.env),
        working_directory: spec.working_directory.clone(),
        input_root: spec.input_root.map(|d| d.to_proto()),
        platform: spec.platform.to_string(),
        required_labels: labels_to_proto(&spec.required_labels),
        timeout_ms: spec.timeout_ms,
        allow_emulation: spec.allow_emulation,
        output_paths: spec.output_paths.clone(),
        exclusive: spec.exclusive,
        network: spec.network,
        steps: spec
            .steps
            .iter()
            .map(|st| v1::Step {
                name: st.name.clone(),
                argv: st.argv.clone(),
                working_directory: st.working_directory.clone(),
                input_root: st.input_root.map(|d| d.to_proto()),
                timeout_ms: st.timeout_ms,
                history_key: st.history_key.clone(),
                cache_key: st.cache_key.clone(),
            })
            .collect(),
    }
}

fn state_to_proto(s: ActionState) -> v1::ActionState {
    match s {
        ActionState::Queued => v1::ActionState::Queued,
        ActionState::Running => v1::ActionState::Running,
        ActionState::Succeeded => v1::ActionState::Succeeded,
        ActionState::Failed => v1::ActionState::Failed,
        ActionState::InfraFailed => v1::ActionState::InfraFailed,
        ActionState::Unschedulable => v1::ActionState::Unschedulable,
        ActionState::Cancelled => v1::ActionState::Cancelled,
    }
}

/// An action record to its wire status.
pub fn action_status(a: &ActionRecord) -> v1::ActionStatus {
    let (agent, emulated) = match (&a.lease, &a.last_agent) {
        (Some(l), _) => (l.agent.to_string(), l.emulated),
        (None, Some((agent, e))) => (agent.to_string(), *e),
        (None, None) => (String::new(), false),
    };
    v1::ActionStatus {
        action_id: a.id.to_string(),
        platform: a.spec.platform.to_string(),
        state: state_to_proto(a.state) as i32,
        attempts: a.attempts,
        agent_id: agent,
        emulated,
        reason: a.reason.clone(),
        result: a
            .result
            .as_ref()
            .and_then(|r| v1::ExecutionResult::decode(r.encoded.as_slice()).ok()),
        queued_unix_ms: a.queued_unix_ms,
        cached: a.cached,
        action_digest: a.action_digest.clone(),
        started_unix_ms: a.started_unix_ms,
        predicted_ms: a.predicted_ms,
        step_names: a.spec.steps.iter().map(|s| s.name.clone()).collect(),
        infra_failures: a.infra_failed_on.len() as u32,
        cache_origin: a
            .cache_origin
            .as_ref()
            .map(crate::result_cache::origin_to_proto),
        cache_write: a.cache_write.clone(),
    }
}

/// A job with its actions to the wire status.
pub fn job_status(job: &JobRecord, actions: &[ActionRecord]) -> v1::JobStatus {
    v1::JobStatus {
        job_id: job.id.to_string(),
        spec: v1::JobSpec::decode(job.spec.as_slice()).ok(),
        submitter: job.submitter.clone(),
        submitted_unix_ms: job.submitted_unix_ms,
        actions: actions.iter().map(action_status).collect(),
        finished: job.finished,
    }
}

/// A farm command to the wire message for the agent.
pub fn command_to_proto(cmd: AgentCommand) -> v1::CoordinatorMessage {
    use v1::coordinator_message::Kind;
    let kind = match cmd {
        AgentCommand::Assign {
            action,
            fence,
            emulated,
        } => Kind::Assign(v1::Assign {
            action_id: action.id.to_string(),
            fence,
            action: Some(action_to_proto(&action.spec)),
            emulated,
            attempt: action.attempts,
        }),
        AgentCommand::Cancel {
            action,
            fence,
            reason,
        } => Kind::Cancel(v1::Cancel {
            action_id: action.to_string(),
            fence,
            reason,
        }),
        AgentCommand::Drain => Kind::Drain(v1::Drain {
            reason: "drained by an admin".into(),
        }),
        AgentCommand::Ack {
            action,
            fence,
            accepted,
            reason,
        } => Kind::Ack(v1::CompletionAck {
            action_id: action.to_string(),
            fence,
            accepted,
            reason,
        }),
    };
    v1::CoordinatorMessage { kind: Some(kind) }
}

/// An agent's result to what the farm records.
pub fn completion_from_proto(r: &v1::ExecutionResult) -> Completion {
    let outcome = match v1::ExecutionOutcome::try_from(r.outcome) {
        Ok(v1::ExecutionOutcome::Exited) => Outcome::Exited,
        Ok(v1::ExecutionOutcome::TimedOut) => Outcome::TimedOut,
        Ok(v1::ExecutionOutcome::Cancelled) => Outcome::Cancelled,
        Ok(v1::ExecutionOutcome::LimitExceeded) => Outcome::LimitExceeded,
        _ => Outcome::InfraError,
    };
    let message = if outcome == Outcome::InfraError && r.message.is_empty() {
        format!("agent reported outcome {}", r.outcome)
    } else {
        r.message.clone()
    };
    let mut cacheable = true;
    let mut parse = |d: Option<&v1::Digest>| match d.map(Digest::from_proto) {
        Some(Ok(d)) => Some(d),
        Some(Err(_)) => {
            cacheable = false;
            None
        }
        None => None,
    };
    let mut named_blobs = Vec::new();
    let mut output_trees = Vec::new();
    named_blobs.extend(parse(r.stdout_digest.as_ref()));
    named_blobs.extend(parse(r.stderr_digest.as_ref()));
    for f in &r.output_files {
        named_blobs.extend(parse(f.digest.as_ref()));
    }
    for d in &r.output_directories {
        if let Some(root) = parse(d.root.as_ref()) {
            named_blobs.push(root);
            output_trees.push(root);
        }
    }
    // Only the coordinator says a result came from the cache: whatever an agent claims of its
    // steps' provenance is dropped before the result is recorded.
    let mut r = r.clone();
    for st in &mut r.step_results {
        st.cached = false;
        st.cache_origin = None;
    }
    let steps = r
        .step_results
        .iter()
        .map(|st| StepCompletion {
            name: st.name.clone(),
            exit_code: st.exit_code,
            duration_ms: st.duration_ms,
            timed_out: st.timed_out,
            output: st.output.as_ref().and_then(|d| Digest::from_proto(d).ok()),
            encoded: st.encode_to_vec(),
        })
        .collect();
    Completion {
        outcome,
        exit_code: r.exit_code,
        message,
        encoded: r.encode_to_vec(),
        output_tree_blobs: if output_trees.is_empty() {
            Ok(vec![])
        } else {
            Err("its output trees were not walked".into())
        },
        named_blobs,
        output_trees,
        cacheable,
        stored: Default::default(),
        steps,
    }
}

/// A hub update to the wire event (Finished needs the job's final status from the store).
pub fn update_to_event(
    u: &JobUpdate,
    finished: impl FnOnce(&JobId) -> Option<v1::JobStatus>,
) -> Option<v1::JobEvent> {
    use v1::job_event::Kind;
    let kind = match u {
        JobUpdate::Action(a) => Kind::Action(action_status(a)),
        JobUpdate::Log {
            action,
            platform,
            stderr,
            data,
            attempt,
        } => Kind::Log(v1::ActionLog {
            action_id: action.to_string(),
            platform: platform.to_string(),
            stream: if *stderr {
                v1::LogStream::Stderr
            } else {
                v1::LogStream::Stdout
            } as i32,
            data: data.clone(),
            attempt: *attempt,
        }),
        JobUpdate::Finished(job) => Kind::Finished(finished(job)?),
    };
    Some(v1::JobEvent {
        kind: Some(kind),
        ..Default::default()
    })
}

/// The wire form of an agent's state at `now`.
pub fn agent_state(record: &AgentRecord, alive: bool, used: u32, now: u64) -> v1::AgentState {
    if record.revoked {
        v1::AgentState::Revoked
    } else if !alive {
        v1::AgentState::Lost
    } else if record.quarantine.active(now) {
        v1::AgentState::Quarantined
    } else if record.draining {
        v1::AgentState::Draining
    } else if used >= record.facts.slots {
        v1::AgentState::Busy
    } else {
        v1::AgentState::Ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_what_the_farm_records() {
        let of = |outcome: i32| {
            completion_from_proto(&v1::ExecutionResult {
                outcome,
                ..Default::default()
            })
            .outcome
        };
        assert_eq!(
            of(v1::ExecutionOutcome::LimitExceeded as i32),
            Outcome::LimitExceeded
        );
        assert_eq!(of(v1::ExecutionOutcome::Exited as i32), Outcome::Exited);
        assert_eq!(
            of(v1::ExecutionOutcome::InfraError as i32),
            Outcome::InfraError
        );
        assert_eq!(
            of(99),
            Outcome::InfraError,
            "unknown outcomes are the farm's"
        );
    }

    #[test]
    fn a_quarantined_agent_says_so_unless_lost_or_revoked() {
        let mut record = AgentRecord {
            id: AgentId("a".into()),
            hostname: "a".into(),
            labels: Labels::new(),
            facts: AgentFacts {
                slots: 1,
                ..Default::default()
            },
            joined_unix_ms: 0,
            last_seen_unix_ms: 0,
            draining: false,
            revoked: false,
            quarantine: Quarantine {
                quarantines: 1,
                until_unix_ms: 100,
                ..Default::default()
            },
        };
        assert_eq!(
            agent_state(&record, true, 0, 99),
            v1::AgentState::Quarantined
        );
        assert_eq!(agent_state(&record, true, 0, 100), v1::AgentState::Ready);
        assert_eq!(agent_state(&record, false, 0, 99), v1::AgentState::Lost);
        record.revoked = true;
        assert_eq!(agent_state(&record, true, 0, 99), v1::AgentState::Revoked);
    }
}
