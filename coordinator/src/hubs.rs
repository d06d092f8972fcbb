//! Per-job event hubs: a bounded history plus a broadcast, so a watcher that attaches at any
//! time while the job is active sees every state change and the live output, in order.
//!
//! Memory stays bounded for a coordinator that runs for months: a hub's broadcast buffer
//! (its slots are allocated up front) exists only while someone watches, and finished jobs'
//! hubs are kept for late watchers only for [`KEEP_FINISHED_MS`] and only up to
//! [`MAX_FINISHED_EVENTS`] events in all, oldest dropped first; a watcher of a job whose hub
//! is gone gets its stored state.
use crate::model::{ActionId, ActionRecord, JobId};
use archfarm_proto::Platform;
use std::collections::{HashMap, VecDeque};
use tokio::sync::broadcast;

/// Something that happened to a job.
#[derive(Clone, Debug)]
pub enum JobUpdate {
    /// An action changed state.
    Action(std::sync::Arc<ActionRecord>),
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
pub const KEEP_FINISHED_MS: u64 = 5 * 60 * 1000;
/// Events kept in all in finished jobs' hubs; beyond, the oldest finished hubs are dropped.
pub const MAX_FINISHED_EVENTS: usize = 20_000;
/// Updates a watcher may fall behind by before it must resume.
const BROADCAST_CAPACITY: usize = 4096;

/// One job's hub.
struct Hub {
    /// Sequence number of the last update.
    seq: u64,
    history: VecDeque<(u64, JobUpdate)>,
    log_bytes: usize,
    /// The live feed, while anyone watches (its buffer is allocated whole when made).
    tx: Option<broadcast::Sender<(u64, JobUpdate)>>,
    finished_at: Option<std::time::Instant>,
}

/// A pruned hub, to be dropped where dropping its history holds up nobody.
pub struct Pruned(#[allow(dead_code)] Hub);

/// All hubs of active and recently finished jobs.
#[derive(Default)]
pub struct Hubs {
    hubs: HashMap<JobId, Hub>,
    /// Finished hubs in the order they finished, with the events each held then.
    finished: VecDeque<(std::time::Instant, JobId, usize)>,
    /// Hubs pruned and not yet taken ([`Hubs::take_pruned`]).
    pruned: Vec<Pruned>,
    /// Events held by the hubs in `finished`.
    finished_events: usize,
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
            tx: None,
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
        let finished = matches!(update, JobUpdate::Finished(_));
        hub.seq += 1;
        hub.history.push_back((hub.seq, update.clone()));
        if let Some(tx) = &hub.tx {
            if tx.receiver_count() == 0 {
                hub.tx = None;
            } else {
                let _ = tx.send((hub.seq, update));
            }
        }
        if finished && hub.finished_at.is_none() {
            let at = std::time::Instant::now();
            hub.finished_at = Some(at);
            let events = hub.history.len();
            self.finished.push_back((at, job.clone(), events));
            self.finished_events += events;
        }
    }

    /// Subscribes to a job's hub, opening it if needed (e.g. after a restart).
    pub fn subscribe(&mut self, job: &JobId) -> Subscription {
        self.open(job);
        let Some(hub) = self.hubs.get_mut(job) else {
            unreachable!("the hub was opened above");
        };
        let tx = hub
            .tx
            .get_or_insert_with(|| broadcast::channel(BROADCAST_CAPACITY).0);
        Subscription {
            history: hub.history.iter().cloned().collect(),
            live: tx.subscribe(),
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

    /// Takes out the hubs of jobs finished longer ago than watchers are served from memory
    /// (the farm's tick calls it; publishing, which runs per log chunk, does not). They wait
    /// in [`Hubs::take_pruned`] so that the caller frees their history (thousands of records
    /// for a big job) after it has let go of the farm's lock.
    pub fn prune(&mut self) {
        while let Some((at, _, _)) = self.finished.front() {
            let expired = at.elapsed().as_millis() >= u128::from(KEEP_FINISHED_MS);
            if !expired && self.finished_events <= MAX_FINISHED_EVENTS {
                break;
            }
            let Some((at, job, events)) = self.finished.pop_front() else {
                break;
            };
            self.finished_events -= events;
            // Only the hub that finished then (not one opened again since).
            if self
                .hubs
                .get(&job)
                .is_some_and(|h| h.finished_at == Some(at))
            {
                if let Some(hub) = self.hubs.remove(&job) {
                    self.pruned.push(Pruned(hub));
                }
            }
        }
    }

    /// The hubs [`Hubs::prune`] took out, for the caller to drop outside the farm's lock.
    pub fn take_pruned(&mut self) -> Vec<Pruned> {
        std::mem::take(&mut self.pruned)
    }

    /// Hubs held (active and finished jobs').
    pub fn len(&self) -> usize {
        self.hubs.len()
    }

    /// Whether no hub is held.
    pub fn is_empty(&self) -> bool {
        self.hubs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_hubs_are_bounded_by_their_events_and_only_watched_hubs_broadcast() {
        let mut hubs = Hubs::default();
        let jobs = MAX_FINISHED_EVENTS + 10;
        for n in 0..jobs {
            let job = JobId(format!("j-{n}"));
            hubs.open(&job);
            hubs.publish(&job, JobUpdate::Finished(job.clone()));
            assert!(hubs.hubs[&job].tx.is_none(), "nobody watches: no buffer");
        }
        // Each finished hub holds one event, so all are kept until the tick prunes.
        assert_eq!(hubs.len(), jobs);
        hubs.prune();
        assert_eq!(hubs.len(), MAX_FINISHED_EVENTS);
        assert!(!hubs.is_open(&JobId("j-0".into())), "the oldest went first");
        assert!(hubs.is_open(&JobId(format!("j-{}", jobs - 1))));

        let active = JobId("active".into());
        hubs.open(&active);
        let mut watch = hubs.subscribe(&active);
        hubs.publish(&active, JobUpdate::Finished(active.clone()));
        assert!(matches!(
            watch.live.try_recv(),
            Ok((1, JobUpdate::Finished(_)))
        ));
        drop(watch);
        let again = JobId("again".into());
        hubs.open(&again);
        drop(hubs.subscribe(&again));
        hubs.publish(&again, JobUpdate::Finished(again.clone()));
        assert!(
            hubs.hubs[&again].tx.is_none(),
            "the last watcher left: buffer freed"
        );
    }
}
