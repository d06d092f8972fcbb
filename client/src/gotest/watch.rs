//! Following a job of step sets (go-test, ginkgo) to its end through the one watch loop
//! ([`JobEvents`], [`CtrlC`]): what happens comes out as [`WatchProgress`] values, both the
//! finished shards (what the quiet mode shows) and, through `farm run`'s [`JobWatch`], every
//! state change and the shards' raw output (what `-v` shows); the caller picks. Ctrl-C
//! cancels the job, twice gives up.
use crate::farm::cancel::{cancel_after_interrupt, InterruptCancel};
use crate::farm::display::is_final;
use crate::farm::job_watch::{Emit, JobWatch};
use crate::farm::watch::{CtrlC, JobEvents, Watched};
use crate::farm::FarmClient;
use anyhow::bail;
use archfarm_proto::v1::{job_event, ActionStatus, JobStatus};
use std::collections::HashSet;

/// What following a step job yields besides its final status.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchProgress {
    /// A shard (action) reached its final state; once per shard.
    ShardFinished(Box<ActionStatus>),
    /// A state change or a chunk of a shard's output, as `farm run` shows it.
    Event(Emit),
    /// Ctrl-C: the job is being cancelled.
    Cancelling {
        /// The job.
        job_id: String,
    },
    /// How that cancel went.
    Cancelled(InterruptCancel),
    /// The watch broke; it is being resumed.
    Lost {
        /// The job.
        job_id: String,
        /// Why it broke.
        why: String,
    },
    /// Watching again after a break.
    Resumed {
        /// The job.
        job_id: String,
    },
}

/// Finished shards, each once.
#[derive(Default)]
struct FinishedShards {
    done: HashSet<String>,
}

impl FinishedShards {
    fn on_status(&mut self, a: &ActionStatus, progress: &mut (dyn FnMut(WatchProgress) + Send)) {
        if is_final(a.state()) && self.done.insert(a.action_id.clone()) {
            progress(WatchProgress::ShardFinished(Box::new(a.clone())));
        }
    }
}

fn emit(emits: Vec<Emit>, progress: &mut (dyn FnMut(WatchProgress) + Send)) {
    for e in emits {
        progress(WatchProgress::Event(e));
    }
}

/// Follows job `job_id` until every action is final; returns its final status. Ctrl-C
/// cancels the job with `cancel_reason`; a second one gives up (an error).
pub async fn follow_job(
    client: &mut FarmClient,
    job_id: &str,
    cancel_reason: &str,
    progress: &mut (dyn FnMut(WatchProgress) + Send),
) -> anyhow::Result<JobStatus> {
    let mut watch = JobWatch::default();
    let mut shards = FinishedShards::default();
    let mut events = JobEvents::open(client, job_id).await?;
    let mut ctrl_c = CtrlC::default();
    loop {
        let watched = tokio::select! {
            w = events.next() => w?,
            n = ctrl_c.pressed() => {
                if n >= 2 {
                    bail!("interrupted again; stopped watching job {job_id}");
                }
                progress(WatchProgress::Cancelling { job_id: job_id.to_string() });
                let cancelled = cancel_after_interrupt(client, job_id, cancel_reason).await;
                progress(WatchProgress::Cancelled(cancelled));
                continue;
            }
        };
        let finished = match watched {
            Watched::Event(event) => {
                if let Some(job_event::Kind::Action(a)) = &event.kind {
                    shards.on_status(a, progress);
                }
                let (emits, finished) = watch.on_event(*event);
                emit(emits, progress);
                finished
            }
            Watched::FinishedMeanwhile(job) => {
                emit(watch.on_finished(&job), progress);
                Some(*job)
            }
            Watched::Lost(why) => {
                progress(WatchProgress::Lost {
                    job_id: job_id.to_string(),
                    why,
                });
                None
            }
            Watched::Resumed => {
                progress(WatchProgress::Resumed {
                    job_id: job_id.to_string(),
                });
                None
            }
        };
        if let Some(job) = finished {
            for a in &job.actions {
                shards.on_status(a, progress);
            }
            return Ok(job);
        }
    }
}
