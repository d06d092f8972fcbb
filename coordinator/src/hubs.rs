//! Per-job event hubs: a bounded history plus a broadcast, so a watcher that attaches at any
//! time while the job is active sees every state change and the live output, in order.
use crate::model::{ActionId, ActionRecord, JobId};
use archfarm_proto::Platform;
use std::collections::{HashMap, VecDeque};
use tokio::sync::broadcast;

/// Something that happened to a job.
#[derive(Clone, Debug)]
pub enum JobUpdate {
    /// An action changed state.
    Action(Box<ActionRecord>),
    /// Live output.
    Log {
        /// The action.
        action: ActionId,
        /// Its platform.
        platform: Platform,
        /// Standard error rather than standard output.
        stderr: bool,
        /// Bytes.
        data: Vec<u8>,
        /// Attempt that produced it.
        attempt: u32,
    },
    /// Every action is final.
    Finished(JobId),
}

/// Log bytes kept per job for late watchers; older output is dropped first.
const HISTORY_LOG_BYTES: usize = 8 * 1024 * 1024;
/// Finished jobs' hubs are kept this long for late watchers.
const KEEP_FINISHED_MS: u64 = 5 * 60 * 1000;

/// One job's hub.
struct Hub {
    /// Sequence number of the last update.
    seq: u64,
    history: VecDeque<(u64, JobUpdate)>,
    log_bytes: usize,
    tx: broadcast::Sender<(u64, JobUpdate)>,
    finished_at: Option<std::time::Instant>,
}

/// All hubs of active and recently finished jobs.
#[derive(Default)]
pub struct Hubs {
    hubs: HashMap<JobId, Hub>,
}

/// What a new watcher gets: the history so far and the live feed after it.
pub struct Subscription {
    /// Events so far, in order, with their sequence numbers (from 1; old log chunks may
    /// have been dropped, so numbers can skip).
    pub history: Vec<(u64, JobUpdate)>,
    /// Later events: taken under the same lock as the history, so none is missed or doubled.
    pub live: broadcast::Receiver<(u64, JobUpdate)>,
}

impl Hubs {
    /// Opens the hub of a job (idempotent).
    pub fn open(&mut self, job: &JobId) {
        self.hubs.entry(job.clone()).or_insert_with(|| Hub {
            seq: 0,
            history: VecDeque::new(),
            log_bytes: 0,
            tx: broadcast::channel(4096).0,
            finished_at: None,
        });
    }

    /// Whether the job's hub is open (updates for it are recorded).
    pub fn is_open(&self, job: &JobId) -> bool {
        self.hubs.contains_key(job)
    }

    /// Records and broadcasts an update for a job whose hub is open.
    pub fn publish(&mut self, job: &JobId, update: JobUpdate) {
        let Some(hub) = self.hubs.get_mut(job) else {
            return;
        };
        if let JobUpdate::Log { data, .. } = &update {
            hub.log_bytes += data.len();
            while hub.log_bytes > HISTORY_LOG_BYTES {
                let Some(pos) = hub
                    .history
                    .iter()
                    .position(|(_, u)| matches!(u, JobUpdate::Log { .. }))
                else {
                    break;
                };
                if let Some((_, JobUpdate::Log { data, .. })) = hub.history.remove(pos) {
                    hub.log_bytes -= data.len();
                }
            }
        }
        if matches!(update, JobUpdate::Finished(_)) {
            hub.finished_at = Some(std::time::Instant::now());
        }
        hub.seq += 1;
        hub.history.push_back((hub.seq, update.clone()));
        let _ = hub.tx.send((hub.seq, update));
    }

    /// Subscribes to a job's hub, opening it if needed (e.g. after a restart).
    pub fn subscribe(&mut self, job: &JobId) -> Subscription {
        self.open(job);
        let hub = &self.hubs[job];
        Subscription {
            history: hub.history.iter().cloned().collect(),
            live: hub.tx.subscribe(),
        }
    }

    /// Subscribes to a job's hub only if it is open (the job is active or recently finished).
    pub fn subscribe_existing(&mut self, job: &JobId) -> Option<Subscription> {
        self.prune();
        self.hubs.contains_key(job).then(|| self.subscribe(job))
    }

    /// Forgets a job's hub, as a restart does.
    #[cfg(test)]
    pub fn forget(&mut self, job: &JobId) {
        self.hubs.remove(job);
    }

    /// Drops the hubs of jobs finished longer ago than watchers are served from memory
    /// (the farm's tick calls it; publishing, which runs per log chunk, does not).
    pub fn prune(&mut self) {
        self.hubs.retain(|_, h| {
            h.finished_at
                .is_none_or(|t| t.elapsed().as_millis() < u128::from(KEEP_FINISHED_MS))
        });
    }
}
