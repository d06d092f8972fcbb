//! Following a job's events the way `archfarm run` shows them: each state change once (even
//! when a restarted coordinator sends every action's status again), log chunks as lines
//! prefixed by their platform, and the recorded outputs no live byte arrived of. It computes
//! [`Emit`] values; printing them is the caller's business. go-test and ginkgo use it for
//! their verbose mode.
use super::display::{action_state_name, format_ms, is_final, mode, outcome_name, words};
use super::job::ordered_actions;
use super::line_prefixer::LinePrefixer;
use archfarm_proto::v1::{
    self, job_event, ActionLog, ActionState, ActionStatus, ExecutionOutcome, JobStatus, LogStream,
};
use archfarm_proto::Digest;
use std::collections::HashMap;

/// Something a watched job prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    /// Prefixed lines of an action's standard output, for our stdout.
    Stdout(Vec<u8>),
    /// Prefixed lines of an action's standard error, for our stderr.
    Stderr(Vec<u8>),
    /// A progress line (state change), for our stderr.
    Progress(String),
}

impl Emit {
    /// Whether this is the command's output rather than ours.
    pub fn is_output(&self) -> bool {
        matches!(self, Emit::Stdout(_) | Emit::Stderr(_))
    }
}

/// Follows a job's events: prints each state change once, even when a restarted coordinator
/// sends every action's status again, and turns log chunks into prefixed lines.
#[derive(Default)]
pub struct JobWatch {
    known: HashMap<String, ActionStatus>,
    lines: LinePrefixer,
    /// Log bytes received per action and stream.
    received: HashMap<(String, LogStream), u64>,
}

impl JobWatch {
    /// An event arrived; returns what to print and, for `finished`, the job's final status.
    pub fn on_event(&mut self, event: v1::JobEvent) -> (Vec<Emit>, Option<JobStatus>) {
        match event.kind {
            Some(job_event::Kind::Action(status)) => (self.on_status(status), None),
            Some(job_event::Kind::Log(log)) => (self.on_log(&log), None),
            Some(job_event::Kind::Finished(job)) => (self.on_finished(&job), Some(job)),
            None => (Vec::new(), None),
        }
    }

    /// An action's status arrived.
    pub fn on_status(&mut self, status: ActionStatus) -> Vec<Emit> {
        if let Some(prev) = self.known.get(&status.action_id) {
            let same = prev.state == status.state
                && (is_final(prev.state())
                    || (prev.attempts == status.attempts && prev.agent_id == status.agent_id));
            if same {
                if !is_final(prev.state()) {
                    self.known.insert(status.action_id.clone(), status);
                }
                return Vec::new();
            }
        }
        let mut out = Vec::new();
        if is_final(status.state()) {
            out.extend(as_emits(self.lines.flush_action(&status.action_id)));
        }
        out.push(Emit::Progress(progress_line(&status)));
        self.known.insert(status.action_id.clone(), status);
        out
    }

    /// A log chunk arrived.
    pub fn on_log(&mut self, log: &ActionLog) -> Vec<Emit> {
        let stream = stream_of(log);
        *self
            .received
            .entry((log.action_id.clone(), stream))
            .or_default() += log.data.len() as u64;
        let lines = self.lines.push(
            &log.action_id,
            log.attempt,
            stream,
            &log.platform,
            &log.data,
        );
        as_emits(vec![(stream, lines)])
    }

    /// The job finished: reports any final state not yet seen, then what is left of the logs.
    pub fn on_finished(&mut self, job: &JobStatus) -> Vec<Emit> {
        let platforms = job
            .spec
            .as_ref()
            .map(|s| s.platforms.clone())
            .unwrap_or_default();
        let mut out = Vec::new();
        for a in ordered_actions(&platforms, &job.actions) {
            out.extend(self.on_status(a.clone()));
        }
        out.extend(self.flush());
        out
    }

    /// Every partial line, completed.
    pub fn flush(&mut self) -> Vec<Emit> {
        as_emits(self.lines.flush_all())
    }

    /// The recorded outputs of finished actions of which no live byte arrived (the job ended
    /// before the watch began, the output fell into a coordinator restart, or the result came
    /// from the action cache): they are read from the CAS instead.
    pub fn unseen_outputs(&self, job: &JobStatus) -> Vec<UnseenOutput> {
        let platforms = job
            .spec
            .as_ref()
            .map(|s| s.platforms.clone())
            .unwrap_or_default();
        let mut unseen = Vec::new();
        for a in ordered_actions(&platforms, &job.actions) {
            let Some(result) = &a.result else { continue };
            for (stream, digest) in [
                (LogStream::Stdout, &result.stdout_digest),
                (LogStream::Stderr, &result.stderr_digest),
            ] {
                let Some(digest) = digest.as_ref().and_then(|d| Digest::from_proto(d).ok()) else {
                    continue;
                };
                let received = self
                    .received
                    .get(&(a.action_id.clone(), stream))
                    .copied()
                    .unwrap_or(0);
                if digest.size_bytes() > 0 && received == 0 {
                    unseen.push(UnseenOutput {
                        action_id: a.action_id.clone(),
                        platform: a.platform.clone(),
                        stream,
                        digest,
                    });
                }
            }
        }
        unseen
    }

    /// Prints a whole recorded output as prefixed lines.
    pub fn recorded_output(&mut self, output: &UnseenOutput, data: &[u8]) -> Vec<Emit> {
        let key = format!("{} (recorded)", output.action_id);
        let mut chunks = vec![(
            output.stream,
            self.lines
                .push(&key, 0, output.stream, &output.platform, data),
        )];
        chunks.extend(self.lines.flush_action(&key));
        as_emits(chunks)
    }
}

/// An action's output stream that was recorded but not seen live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnseenOutput {
    /// The action.
    pub action_id: String,
    /// Its platform, for the line prefix.
    pub platform: String,
    /// Which stream.
    pub stream: LogStream,
    /// The blob holding it.
    pub digest: Digest,
}

fn stream_of(log: &ActionLog) -> LogStream {
    match log.stream() {
        LogStream::Stderr => LogStream::Stderr,
        _ => LogStream::Stdout,
    }
}

fn as_emits(chunks: Vec<(LogStream, Vec<u8>)>) -> Vec<Emit> {
    chunks
        .into_iter()
        .filter(|(_, b)| !b.is_empty())
        .map(|(s, b)| match s {
            LogStream::Stderr => Emit::Stderr(b),
            _ => Emit::Stdout(b),
        })
        .collect()
}

/// The stderr line for an action's new state, e.g.
/// `[linux/arm64] running on agent a1 (emulated), attempt 1`.
pub fn progress_line(a: &ActionStatus) -> String {
    let p = &a.platform;
    let reason = if a.reason.is_empty() {
        a.result
            .as_ref()
            .map(|r| r.message.clone())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| "no reason given".to_string())
    } else {
        a.reason.clone()
    };
    let agent = if a.agent_id.is_empty() {
        "?"
    } else {
        &a.agent_id
    };
    // "[p] cancelled: cancelled: ..." says it twice when the reason names the state itself.
    let state_word = words(action_state_name(a.state()));
    let reason = reason
        .strip_prefix(&format!("{state_word}: "))
        .map(str::to_string)
        .unwrap_or(reason);
    let cached = if a.cached { " (cached)" } else { "" };
    match a.state() {
        ActionState::Queued if a.attempts == 0 => format!("[{p}] queued"),
        ActionState::Queued => {
            let why = if a.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", a.reason)
            };
            format!("[{p}] queued again after attempt {}{why}", a.attempts)
        }
        ActionState::Running => format!(
            "[{p}] running on agent {agent} ({}), attempt {}",
            mode(a.emulated),
            a.attempts
        ),
        ActionState::Succeeded => match &a.result {
            Some(r) => format!(
                "[{p}] succeeded{cached} in {} on agent {} ({})",
                format_ms(r.duration_ms),
                if r.agent_id.is_empty() {
                    agent
                } else {
                    &r.agent_id
                },
                mode(r.emulated)
            ),
            None => format!("[{p}] succeeded{cached}"),
        },
        ActionState::Failed => match &a.result {
            Some(r) if r.outcome() == ExecutionOutcome::Exited => format!(
                "[{p}] failed{cached}: exit code {} after {}",
                r.exit_code,
                format_ms(r.duration_ms)
            ),
            Some(r) => format!(
                "[{p}] failed: {} after {}{}",
                words(outcome_name(r.outcome())),
                format_ms(r.duration_ms),
                if r.message.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.message)
                }
            ),
            None => format!("[{p}] failed: {reason}"),
        },
        ActionState::InfraFailed => {
            format!(
                "[{p}] infra failure after {} attempts: {reason}",
                a.attempts
            )
        }
        ActionState::Unschedulable => format!("[{p}] unschedulable: {reason}"),
        ActionState::Cancelled => format!("[{p}] cancelled: {reason}"),
        ActionState::Unspecified => format!("[{p}] {}", action_state_name(a.state())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::farm::WatchPoint;

    /// An action of job j1 on `platform` (also used by run.rs's tests).
    pub(crate) fn status(
        platform: &str,
        state: ActionState,
        exit_code: Option<i32>,
    ) -> ActionStatus {
        ActionStatus {
            action_id: format!("j1/{platform}"),
            platform: platform.to_string(),
            state: state as i32,
            attempts: 1,
            agent_id: "a1".into(),
            result: exit_code.map(|c| v1::ExecutionResult {
                outcome: ExecutionOutcome::Exited as i32,
                exit_code: c,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_resent_final_status_prints_once() {
        let mut w = JobWatch::default();
        let mut running = status("linux/arm64", ActionState::Running, None);
        running.emulated = true;
        assert_eq!(
            w.on_status(running.clone()),
            vec![Emit::Progress(
                "[linux/arm64] running on agent a1 (emulated), attempt 1".into()
            )]
        );
        assert!(w.on_status(running).is_empty(), "same state again");
        w.on_log(&ActionLog {
            action_id: "j1/linux/arm64".into(),
            platform: "linux/arm64".into(),
            stream: LogStream::Stdout as i32,
            data: b"no newline".to_vec(),
            attempt: 1,
        });
        let done = status("linux/arm64", ActionState::Failed, Some(2));
        assert_eq!(
            w.on_status(done.clone()),
            vec![
                Emit::Stdout(b"[linux/arm64] no newline\n".to_vec()),
                Emit::Progress("[linux/arm64] failed: exit code 2 after 0ms".into()),
            ]
        );
        let mut resent = done;
        resent.reason = "worded differently after a restart".into();
        assert!(w.on_status(resent.clone()).is_empty());
        let job = JobStatus {
            actions: vec![resent],
            finished: true,
            ..Default::default()
        };
        assert!(w.on_finished(&job).is_empty());
    }

    fn status_event(state: ActionState) -> v1::JobEvent {
        v1::JobEvent {
            kind: Some(job_event::Kind::Action(status("linux/arm64", state, None))),
            ..Default::default()
        }
    }

    fn log_event(data: &str) -> v1::JobEvent {
        v1::JobEvent {
            kind: Some(job_event::Kind::Log(ActionLog {
                action_id: "j1/linux/arm64".into(),
                platform: "linux/arm64".into(),
                stream: LogStream::Stdout as i32,
                data: data.as_bytes().to_vec(),
                attempt: 1,
            })),
            ..Default::default()
        }
    }

    /// Feeds events; returns what was printed, one string per emit.
    fn feed(w: &mut JobWatch, events: Vec<v1::JobEvent>) -> Vec<String> {
        events
            .into_iter()
            .flat_map(|e| w.on_event(e).0)
            .map(|e| match e {
                Emit::Stdout(b) | Emit::Stderr(b) => String::from_utf8_lossy(&b).into_owned(),
                Emit::Progress(p) => p,
            })
            .collect()
    }

    /// `e` as event `seq` of the coordinator process started at `epoch`.
    fn numbered(mut e: v1::JobEvent, epoch: u64, seq: u64) -> v1::JobEvent {
        (e.epoch, e.seq) = (epoch, seq);
        e
    }

    /// The point a resumed watch (JobEvents) continues from after `events`.
    fn follow(mut point: WatchPoint, events: &[v1::JobEvent]) -> WatchPoint {
        for e in events {
            point.follow(e);
        }
        point
    }

    #[test]
    fn the_watch_point_is_the_last_numbered_event() {
        let start = WatchPoint::default();
        let first = [
            numbered(status_event(ActionState::Queued), 7, 1),
            numbered(log_event("tick\n"), 7, 2),
        ];
        let p = follow(start, &first);
        assert_eq!(p, WatchPoint { epoch: 7, seq: 2 });
        // Events made up from stored state (after a restart) are unnumbered: the point stays.
        assert_eq!(
            follow(p, &[status_event(ActionState::Running)]),
            WatchPoint { epoch: 7, seq: 2 }
        );
    }

    #[test]
    fn a_restarted_coordinator_sends_statuses_and_new_output_only() {
        let mut w = JobWatch::default();
        feed(
            &mut w,
            vec![
                numbered(status_event(ActionState::Running), 7, 1),
                numbered(log_event("tick\n"), 7, 2),
            ],
        );
        let after_restart = vec![
            status_event(ActionState::Running), // the stored status: nothing new
            numbered(log_event("tick\n"), 9, 1), // new output that looks like old output
        ];
        let p = follow(WatchPoint { epoch: 7, seq: 2 }, &after_restart);
        assert_eq!(feed(&mut w, after_restart), ["[linux/arm64] tick\n"]);
        assert_eq!(p, WatchPoint { epoch: 9, seq: 1 });
    }

    #[test]
    fn outputs_not_streamed_are_read_back() {
        let mut w = JobWatch::default();
        feed(&mut w, vec![log_event("live\n")]);
        let mut done = status("linux/arm64", ActionState::Succeeded, Some(0));
        if let Some(r) = done.result.as_mut() {
            r.stdout_digest = Some(Digest::of(b"live\n").to_proto());
            r.stderr_digest = Some(Digest::of(b"warning\n").to_proto());
        }
        let mut empty = status("linux/s390x", ActionState::Succeeded, Some(0));
        if let Some(r) = empty.result.as_mut() {
            r.stdout_digest = Some(Digest::empty().to_proto());
        }
        let job = JobStatus {
            actions: vec![done, empty],
            ..Default::default()
        };
        let unseen = w.unseen_outputs(&job);
        assert_eq!(unseen.len(), 1, "{unseen:?}");
        assert_eq!(unseen[0].stream, LogStream::Stderr);
        let printed: Vec<u8> = w
            .recorded_output(&unseen[0], b"warning\nno newline")
            .into_iter()
            .flat_map(|e| match e {
                Emit::Stderr(b) => b,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            String::from_utf8_lossy(&printed),
            "[linux/arm64] warning\n[linux/arm64] no newline\n"
        );
    }

    #[test]
    fn unschedulable_says_why() {
        let mut s = status("linux/s390x", ActionState::Unschedulable, None);
        s.reason = "no agent serves linux/s390x".into();
        assert_eq!(
            progress_line(&s),
            "[linux/s390x] unschedulable: no agent serves linux/s390x"
        );
        let mut c = status("linux/s390x", ActionState::Cancelled, None);
        c.reason = "cancelled: by Ctrl-C".into();
        assert_eq!(progress_line(&c), "[linux/s390x] cancelled: by Ctrl-C");
    }
}
