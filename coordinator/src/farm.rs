//! The farm's state machine: agents and their sessions, the active actions and their leases,
//! and what happens on submit, hello, heartbeat, result, cancel, drain, revoke and each tick.
//!
//! Every method takes `now_unix_ms`, so leases, requeues and unschedulable grace are tested
//! with injected time. Every change is announced only once durable: the changed records
//! (actions, jobs, agents, durations, the fence ceiling) and the agent commands and job
//! events wait in an outbox until the committer writes the records and a flush covers them
//! ([`Farm::take_outbox`], [`Outbox::write`], [`Farm::release`]), so one flush serves every
//! change made meanwhile (group commit) instead of one fsync per result and placement. The
//! farm never writes the store: the committer does, outside the farm's lock. It reads the
//! store only when it is loaded, and for a result resent for an action it no longer holds it
//! asks the caller to read that record first ([`FarmError::NeedsStored`]).
use crate::cas::Cas;
use crate::hubs::{Hubs, JobUpdate};
use crate::model::*;
use crate::result_cache::{Reported, ResultCache};
use crate::scheduler::{self, AgentView, FitKey, Requirement};
use crate::store::Store;
use archfarm_proto::{tree, Digest, Platform};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Timing and limits of the farm.
#[derive(Clone, Debug)]
pub struct FarmConfig {
    /// A lease lapses this long after the last heartbeat that renewed it.
    pub lease_ms: u64,
    /// How often agents send heartbeats.
    pub heartbeat_ms: u64,
    /// How long an action may wait with no agent able to serve it before it is unschedulable.
    pub unschedulable_grace_ms: u64,
    /// Attempts (leases) per action before it fails as an infra failure.
    pub max_attempts: u32,
    /// Infra failures in a row after which an agent is quarantined.
    pub quarantine_after: u32,
    /// First quarantine's length; each further one in a row doubles it.
    pub quarantine_base_ms: u64,
    /// Longest quarantine.
    pub quarantine_max_ms: u64,
}

impl Default for FarmConfig {
    fn default() -> Self {
        Self {
            lease_ms: 15_000,
            heartbeat_ms: 3_000,
            unschedulable_grace_ms: 30_000,
            max_attempts: 3,
            quarantine_after: 3,
            quarantine_base_ms: 60_000,
            quarantine_max_ms: 3_600_000,
        }
    }
}

/// A message for one agent's session.
#[derive(Clone, Debug)]
pub enum AgentCommand {
    /// Run this action under this lease.
    Assign {
        /// The action (id, spec, attempt count).
        action: Arc<ActionRecord>,
        /// Fence of the lease.
        fence: u64,
        /// Run it through the emulator.
        emulated: bool,
    },
    /// Stop an action.
    Cancel {
        /// The action.
        action: ActionId,
        /// The lease's fence.
        fence: u64,
        /// Why.
        reason: String,
    },
    /// Take no new work.
    Drain,
    /// Answer to a result.
    Ack {
        /// The action.
        action: ActionId,
        /// The fence the agent sent.
        fence: u64,
        /// Recorded or not.
        accepted: bool,
        /// Why not.
        reason: String,
    },
}

/// What a heartbeat says about the agent's machine.
#[derive(Clone, Debug, Default)]
pub struct HeartbeatReport {
    /// One-minute load.
    pub load_1m: f64,
    /// Free bytes on its data disk.
    pub free_disk_bytes: u64,
    /// Why it takes no new work; empty when it does.
    pub paused_reason: String,
}

/// How an execution ended, as the agent reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exited by itself.
    Exited,
    /// Killed at the timeout.
    TimedOut,
    /// Killed on cancel.
    Cancelled,
    /// The agent could not run it.
    InfraError,
    /// Stopped for breaking one of the agent's limits: the command's fault.
    LimitExceeded,
}

/// A result as reported by an agent.
#[derive(Clone, Debug)]
pub struct Completion {
    /// How it ended.
    pub outcome: Outcome,
    /// Exit code.
    pub exit_code: i32,
    /// Detail for non-exits.
    pub message: String,
    /// The whole ExecutionResult, encoded, as recorded.
    pub encoded: Vec<u8>,
    /// Blobs the result names directly (stdout, stderr, output files, output tree roots).
    pub named_blobs: Vec<Digest>,
    /// Roots of output directory trees (their whole trees must stay for a cache hit).
    pub output_trees: Vec<Digest>,
    /// Every blob of those trees, walked before the farm is locked
    /// (`ResultCache::output_tree_blobs`), or why they were not: then it is never cached.
    pub output_tree_blobs: Result<Vec<Digest>, String>,
    /// False when the result names a malformed digest: recorded, never cached.
    pub cacheable: bool,
    /// Per step, for actions made of steps.
    pub steps: Vec<StepCompletion>,
    /// The action's stored record, when the farm asked for it ([`FarmError::NeedsStored`]).
    pub stored: StoredRecord,
}

/// What one step of an action did, as the farm needs it.
#[derive(Clone, Debug)]
pub struct StepCompletion {
    /// The step's name.
    pub name: String,
    /// Exit code.
    pub exit_code: i32,
    /// Run time.
    pub duration_ms: u64,
    /// Killed by its watchdog.
    pub timed_out: bool,
    /// Its output blob.
    pub output: Option<Digest>,
    /// The wire StepResult, encoded, as reported.
    pub encoded: Vec<u8>,
}

/// A session's sending half, told apart from earlier sessions of the same agent.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    /// Unique per session.
    pub conn: u64,
    /// Commands to the agent.
    pub tx: mpsc::UnboundedSender<AgentCommand>,
}

/// An agent as the farm tracks it.
#[derive(Debug)]
pub struct AgentLive {
    /// The durable record.
    pub record: AgentRecord,
    /// Its open session.
    pub session: Option<SessionHandle>,
}

impl AgentLive {
    fn alive(&self, now: u64, lease_ms: u64) -> bool {
        self.session.is_some() && now <= self.record.last_seen_unix_ms + lease_ms
    }
}

/// Why a call on the farm was refused.
#[derive(Debug, thiserror::Error)]
pub enum FarmError {
    /// Unknown job, agent or action.
    #[error("{0}")]
    NotFound(String),
    /// The caller asked for something its role or lease does not allow.
    #[error("{0}")]
    Refused(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] anyhow::Error),
    /// A result for an action the farm no longer holds in memory (final and written): the
    /// caller reads its stored record without the farm's lock, puts it in
    /// [`Completion::stored`] and reports the result again.
    #[error("the stored record of the action must be read first")]
    NeedsStored(Box<Completion>),
}

/// The stored record of an action the farm no longer holds, as the caller read it (outside
/// the farm's lock) for a result resent after the action finished.
#[derive(Clone, Debug, Default)]
pub enum StoredRecord {
    /// Not read: if the farm needs it, it answers [`FarmError::NeedsStored`].
    #[default]
    NotRead,
    /// What the store held (`None`: no such action).
    Read(Option<Box<ActionRecord>>),
}

/// The whole mutable state; callers hold it behind one mutex.
pub struct Farm {
    cfg: FarmConfig,
    store: Store,
    cas: Arc<Cas>,
    agents: BTreeMap<AgentId, AgentLive>,
    /// Every action not final. Changed only through `put_active` and `remove_active`, which
    /// keep the two indexes below in step with it.
    active: BTreeMap<ActionId, ActionRecord>,
    /// The queued actions in dispatch order (job sequence, then id): placement and the
    /// unschedulable check walk this, not every active action.
    queued: BTreeSet<(u64, ActionId)>,
    /// The actions under a lease, per agent: slot usage and lease expiry walk this.
    leased: HashMap<AgentId, BTreeSet<ActionId>>,
    /// How many of those are exclusive, per agent (absent: none).
    leased_exclusive: HashMap<AgentId, u32>,
    /// The agents as placement saw them last, refreshed in place by each dispatch
    /// ([`Farm::refresh_views`]) so placement allocates nothing per agent.
    views: Views,
    /// Job id -> its actions still active.
    active_by_job: HashMap<JobId, BTreeSet<ActionId>>,
    hubs: Hubs,
    /// Announcements waiting for the flush that makes their changes durable.
    outbox: Vec<Announcement>,
    /// Outboxes taken so far (the group commit numbers them).
    outboxes_taken: u64,
    /// The store was written since the outbox was last taken, or an agent's change must be
    /// durable before it is answered.
    unflushed: bool,
    /// Results decided for the result cache, written at the next group commit.
    cache_writes: Vec<CacheWrite>,
    /// Composed input roots of submitted jobs, stored by the next group commit.
    staged_blobs: Vec<crate::cas::VerifiedBlob>,
    /// Agents whose record changed since the outbox was last taken: the commit writes them.
    dirty_agents: BTreeSet<AgentId>,
    /// Actions, jobs, durations changed since the outbox was last taken.
    unwritten: outbox::Records,
    /// Those of the outbox taken and not yet released (being written by the committer).
    writing: Arc<outbox::Records>,
    /// The unfinished jobs' records (a finished job's is in the store).
    active_jobs: HashMap<JobId, JobRecord>,
    next_conn: u64,
    /// The fence counter (kept here so that placing and checking a result's fence touch no
    /// store under the lock).
    fences: fences::Fences,
    stale_results_refused: u64,
    started_unix_ms: u64,
    /// Results are recorded here as they come in (lookups happen outside the farm's lock).
    cache: Arc<ResultCache>,
}

/// Placement's views of the agents and what keeps them current without a walk over every
/// agent per placement.
#[derive(Default)]
struct Views {
    /// One per agent that is not revoked, in agent order.
    list: Vec<AgentView>,
    /// Agent id -> its place in `list`.
    index: HashMap<AgentId, usize>,
    /// Agents whose view must be refreshed.
    dirty: HashSet<AgentId>,
    /// The set of agents changed: refresh every view.
    rebuild: bool,
    /// The first moment a view's answer flips with time alone (then every view is refreshed).
    valid_until: u64,
    /// The `now` of the last refresh (a clock that went back refreshes every view).
    refreshed_at: u64,
}

impl Farm {
    /// Reads the farm back from the store. Leases of running actions are honoured for a
    /// full lease period from now, so their agents can reconnect and re-claim them.
    pub fn load(store: Store, cas: Arc<Cas>, cfg: FarmConfig, now: u64) -> anyhow::Result<Self> {
        let mut farm = Self {
            cfg,
            cache: Arc::new(ResultCache::new(store.clone(), cas.clone())),
            cas,
            agents: BTreeMap::new(),
            active: BTreeMap::new(),
            queued: BTreeSet::new(),
            leased: HashMap::new(),
            leased_exclusive: HashMap::new(),
            views: Views::default(),
            active_by_job: HashMap::new(),
            hubs: Hubs::default(),
            outbox: Vec::new(),
            outboxes_taken: 0,
            unflushed: false,
            cache_writes: Vec::new(),
            staged_blobs: Vec::new(),
            dirty_agents: BTreeSet::new(),
            unwritten: outbox::Records::default(),
            writing: Arc::default(),
            active_jobs: HashMap::new(),
            next_conn: 0,
            // Fences reserved before a restart but not handed out are skipped, never reused.
            fences: fences::Fences::load(store.counter("fence")?),
            stale_results_refused: 0,
            started_unix_ms: now,
            store,
        };
        for record in farm.store.agents()? {
            farm.agents.insert(
                record.id.clone(),
                AgentLive {
                    record,
                    session: None,
                },
            );
        }
        for mut a in farm.store.unfinished_actions()? {
            if let Some(lease) = &mut a.lease {
                lease.expiry_unix_ms = lease.expiry_unix_ms.max(now + farm.cfg.lease_ms);
            }
            farm.active_by_job
                .entry(a.job.clone())
                .or_default()
                .insert(a.id.clone());
            farm.put_active(a);
        }
        let jobs: Vec<JobId> = farm.active_by_job.keys().cloned().collect();
        for id in jobs {
            if let Some(job) = farm.store.job(&id)? {
                farm.active_jobs.insert(id, job);
            }
        }
        // Pin the input trees of the queued and running actions again.
        let mut trees: HashMap<Digest, Vec<Digest>> = HashMap::new();
        let roots: Vec<(ActionId, Digest)> = farm
            .active
            .values()
            .filter_map(|a| a.spec.input_root.map(|r| (a.id.clone(), r)))
            .collect();
        for (id, root) in roots {
            let digests = trees
                .entry(root)
                .or_insert_with(|| farm.tree_digests(root))
                .clone();
            farm.cas.pin(id.as_str(), digests);
        }
        Ok(farm)
    }

    /// Puts an action into the active set (replacing its earlier record) and indexes it as
    /// queued or leased by its state and lease.
    fn put_active(&mut self, a: ActionRecord) {
        self.remove_active(&a.id);
        if a.state == ActionState::Queued {
            self.queued.insert((a.job_seq, a.id.clone()));
        }
        if let Some(l) = &a.lease {
            let agent = l.agent.clone();
            self.view_changed(&agent);
            self.leased
                .entry(l.agent.clone())
                .or_default()
                .insert(a.id.clone());
            if a.spec.exclusive {
                *self.leased_exclusive.entry(l.agent.clone()).or_default() += 1;
            }
        }
        self.active.insert(a.id.clone(), a);
    }

    /// Takes an action out of the active set and its indexes.
    fn remove_active(&mut self, id: &ActionId) -> Option<ActionRecord> {
        let old = self.active.remove(id)?;
        if old.state == ActionState::Queued {
            self.queued.remove(&(old.job_seq, old.id.clone()));
        }
        if let Some(l) = &old.lease {
            self.view_changed(&l.agent);
            if let Some(held) = self.leased.get_mut(&l.agent) {
                held.remove(id);
                if held.is_empty() {
                    self.leased.remove(&l.agent);
                }
            }
            if old.spec.exclusive {
                if let Some(n) = self.leased_exclusive.get_mut(&l.agent) {
                    *n -= 1;
                    if *n == 0 {
                        self.leased_exclusive.remove(&l.agent);
                    }
                }
            }
        }
        Some(old)
    }

    /// Every digest of the stored tree under a root (what is there of it).
    fn tree_digests(&self, root: Digest) -> Vec<Digest> {
        match tree::walk_tree(root, |d| self.cas.get(d).ok().flatten()) {
            Ok((dirs, files)) => dirs.into_keys().chain(files).collect(),
            Err(e) => {
                tracing::warn!("input tree {root} of an unfinished action is incomplete: {e}");
                vec![root]
            }
        }
    }

    /// The result cache.
    pub fn cache(&self) -> &Arc<ResultCache> {
        &self.cache
    }

    /// The store underneath.
    pub fn store(&self) -> &Store {
        &self.store
    }
    /// The configuration.
    pub fn config(&self) -> &FarmConfig {
        &self.cfg
    }
    /// The event hubs of active jobs.
    pub fn hubs(&mut self) -> &mut Hubs {
        &mut self.hubs
    }
    /// Results refused for a stale fence since start.
    pub fn stale_results_refused(&self) -> u64 {
        self.stale_results_refused
    }
    /// Unix ms the farm was loaded.
    pub fn started_unix_ms(&self) -> u64 {
        self.started_unix_ms
    }
    /// Agents as tracked.
    pub fn agents(&self) -> impl Iterator<Item = &AgentLive> {
        self.agents.values()
    }
    /// Active (not final) actions.
    pub fn active_actions(&self) -> impl Iterator<Item = &ActionRecord> {
        self.active.values()
    }
    /// An active (not final) action.
    pub fn active_action(&self, id: &ActionId) -> Option<&ActionRecord> {
        self.active.get(id)
    }
    /// An action's record as it stands: the farm's memory, else the store (tests: this
    /// reads the store, which the coordinator never does under the farm's lock).
    #[cfg(test)]
    pub fn action_now(&self, id: &ActionId) -> anyhow::Result<Option<ActionRecord>> {
        match self.active.get(id).or_else(|| self.unwritten_action(id)) {
            Some(a) => Ok(Some(a.clone())),
            None => self.store.action(id),
        }
    }
    /// A job's record as it stands (tests, like [`Farm::action_now`]).
    #[cfg(test)]
    pub fn job_now(&self, id: &JobId) -> anyhow::Result<Option<JobRecord>> {
        let unwritten = self.unwritten.jobs.get(id);
        match unwritten.or_else(|| self.writing.jobs.get(id)) {
            Some(j) => Ok(Some(j.clone())),
            None => match self.active_jobs.get(id) {
                Some(j) => Ok(Some(j.clone())),
                None => self.store.job(id),
            },
        }
    }
    /// Reports a result as an agent's session does: when the farm asks for the action's
    /// stored record, reads it and reports again (tests; the session reads it off the lock).
    #[cfg(test)]
    pub fn completed_reading_store(
        &mut self,
        agent: &AgentId,
        id: &ActionId,
        fence: u64,
        c: Completion,
        now: u64,
    ) -> Result<(), FarmError> {
        match self.completed(agent, id, fence, c, now) {
            Err(FarmError::NeedsStored(mut c)) => {
                c.stored = StoredRecord::Read(self.store.action(id)?.map(Box::new));
                self.completed(agent, id, fence, *c, now)
            }
            other => other,
        }
    }
    /// Whether the agent is lost (no session or no recent heartbeat).
    pub fn agent_alive(&self, a: &AgentLive, now: u64) -> bool {
        a.alive(now, self.cfg.lease_ms)
    }
    /// Slots each agent uses now and the actions it holds, from one pass over the active
    /// actions (placement runs on every heartbeat). An exclusive action has the whole agent.
    pub fn slot_usage(&self) -> HashMap<AgentId, (u32, Vec<ActionId>)> {
        self.leased
            .iter()
            .map(|(agent, held)| {
                (
                    agent.clone(),
                    (self.slots_used(agent, held), held.iter().cloned().collect()),
                )
            })
            .collect()
    }

    /// Slots an agent's leased actions take: one each, or all of them for an exclusive one.
    fn slots_used(&self, agent: &AgentId, held: &BTreeSet<ActionId>) -> u32 {
        let used = held.len() as u32;
        if self.leased_exclusive.contains_key(agent) {
            let slots = self
                .agents
                .get(agent)
                .map_or(1, |a| a.record.facts.slots.max(1));
            used.max(slots)
        } else {
            used
        }
    }

    /// Holds an action's changed record for the next commit and announces it to the job's
    /// watchers: one copy of the record, shared by both (and by an Assign).
    fn save(&mut self, action: &ActionRecord) -> anyhow::Result<Arc<ActionRecord>> {
        let shared = Arc::new(action.clone());
        self.write_action(shared.clone());
        self.announce(&action.job, JobUpdate::Action(shared.clone()));
        Ok(shared)
    }

    /// Accepts a validated job and its actions, then places what it can.
    /// `pins` names every blob of an action's input tree; they stay pinned in the CAS
    /// while an action needs them. Actions already final (answered from the result cache)
    /// are recorded and announced as they are.
    pub fn submit(
        &mut self,
        mut job: JobRecord,
        actions: Vec<ActionRecord>,
        pins: &BTreeMap<ActionId, Vec<Digest>>,
        now: u64,
    ) -> anyhow::Result<()> {
        // Final already: answered from the result cache before the farm was locked.
        let (done, queued): (Vec<ActionRecord>, Vec<ActionRecord>) =
            actions.into_iter().partition(|a| a.state.is_final());
        job.finished = queued.is_empty();
        self.write_job(&job);
        self.hubs.open(&job.id);
        for a in &done {
            self.save(a)?;
        }
        for a in queued {
            self.cas.pin(
                a.id.as_str(),
                pins.get(&a.id).into_iter().flatten().copied(),
            );
            self.save(&a)?;
            self.active_by_job
                .entry(job.id.clone())
                .or_default()
                .insert(a.id.clone());
            self.put_active(a);
        }
        if job.finished {
            self.announce(&job.id, JobUpdate::Finished(job.id.clone()));
        } else {
            self.active_jobs.insert(job.id.clone(), job);
        }
        self.dispatch(now)
    }

    /// Live output from an agent; relayed only under the current lease.
    pub fn log(
        &mut self,
        agent: &AgentId,
        action: &ActionId,
        fence: u64,
        stderr: bool,
        data: Vec<u8>,
    ) {
        let Some(a) = self.active.get(action) else {
            return;
        };
        if !a
            .lease
            .as_ref()
            .is_some_and(|l| &l.agent == agent && l.fence == fence)
        {
            return;
        }
        let update = JobUpdate::Log {
            action: action.clone(),
            platform: a.spec.platform.clone(),
            stderr,
            data,
            attempt: a.attempts,
        };
        let job = a.job.clone();
        self.announce(&job, update);
    }

    /// Records a final action and closes its job when it was the last one.
    fn finish(&mut self, a: ActionRecord) -> anyhow::Result<()> {
        debug_assert!(a.state.is_final());
        self.save(&a)?;
        self.cas.unpin(a.id.as_str());
        let job_id = a.job.clone();
        self.remove_active(&a.id);
        let job_done = match self.active_by_job.get_mut(&job_id) {
            Some(set) => {
                set.remove(&a.id);
                set.is_empty()
            }
            None => true,
        };
        if job_done {
            self.active_by_job.remove(&job_id);
            let job = match self.active_jobs.remove(&job_id) {
                Some(job) => Some(job),
                // Loaded without its job record (a store from before jobs were kept here).
                None => self.store.job(&job_id)?,
            };
            if let Some(mut job) = job {
                job.finished = true;
                self.write_job(&job);
            }
            self.announce(&job_id, JobUpdate::Finished(job_id.clone()));
        }
        Ok(())
    }

    /// Cancels a job's unfinished actions; returns how many (none for a job that finished;
    /// the caller checks that the job exists, in the store, without the farm's lock).
    pub fn cancel_job(&mut self, job: &JobId, reason: &str, now: u64) -> Result<u32, FarmError> {
        let ids: Vec<ActionId> = self
            .active_by_job
            .get(job)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        for id in &ids {
            let Some(mut a) = self.active.get(id).cloned() else {
                continue;
            };
            if let Some(l) = a.lease.take() {
                self.send(
                    &l.agent,
                    AgentCommand::Cancel {
                        action: id.clone(),
                        fence: l.fence,
                        reason: reason.to_string(),
                    },
                );
            }
            a.state = ActionState::Cancelled;
            a.reason = format!("cancelled: {reason}");
            self.finish(a)?;
        }
        self.dispatch(now)?;
        Ok(ids.len() as u32)
    }

    /// A lease ended without a result (an infra failure of the attempt): queue again,
    /// preferably for another agent, or fail after the last attempt.
    fn lease_lost(&mut self, id: &ActionId, why: &str, now: u64) -> anyhow::Result<()> {
        let Some(mut a) = self.active.get(id).cloned() else {
            return Ok(());
        };
        if let Some(l) = a.lease.take() {
            a.infra_failed_on.push(l.agent);
        }
        if a.attempts < self.cfg.max_attempts {
            a.state = ActionState::Queued;
            a.queued_unix_ms = now;
            a.reason = format!(
                "{why}; queued again for another agent after attempt {}",
                a.attempts
            );
            self.save(&a)?;
            self.put_active(a);
        } else {
            a.state = ActionState::InfraFailed;
            a.reason = format!("{why}; gave up after {} attempts", a.attempts);
            self.finish(a)?;
        }
        Ok(())
    }

    /// Expires lapsed leases, notices lost agents, declares unschedulable actions, places work.
    pub fn tick(&mut self, now: u64) -> anyhow::Result<()> {
        self.hubs.prune();
        let mut lapsed: Vec<(ActionId, AgentId)> = self
            .leased
            .values()
            .flatten()
            .filter_map(|id| {
                let a = self.active.get(id)?;
                a.lease
                    .as_ref()
                    .filter(|l| l.expiry_unix_ms < now)
                    .map(|l| (a.id.clone(), l.agent.clone()))
            })
            .collect();
        lapsed.sort();
        for (id, agent) in lapsed {
            let why = format!(
                "agent {agent} lost (no heartbeat within {} s)",
                self.cfg.lease_ms / 1000
            );
            self.lease_lost(&id, &why, now)?;
            self.agent_infra_failure(&agent, &format!("lease on {id} lapsed"), now)?;
        }
        // Unschedulable: queued actions no connected agent could ever take. Whether anyone
        // can serve a requirement is asked once per distinct requirement, not per action.
        let views = self.agent_views(now);
        let mut servable: HashMap<(&Platform, &Labels, bool, bool, bool, bool), bool> =
            HashMap::new();
        let mut unservable: Vec<ActionId> = Vec::new();
        let mut served_again: Vec<ActionId> = Vec::new();
        for (_, id) in &self.queued {
            let Some(a) = self.active.get(id) else {
                continue;
            };
            let key = (
                &a.spec.platform,
                &a.spec.required_labels,
                a.spec.allow_emulation,
                a.spec.exclusive,
                a.spec.network,
                !a.spec.submitter.trusted,
            );
            let can = *servable.entry(key).or_insert_with(|| {
                let req = Requirement {
                    platform: key.0,
                    labels: key.1,
                    allow_emulation: key.2,
                    exclusive: key.3,
                    network: key.4,
                    sandbox: key.5,
                    // Whether anyone could ever serve it; where it failed before only ranks.
                    infra_failed_on: &[],
                };
                views
                    .iter()
                    .any(|v| scheduler::can_serve(v, &req).is_some())
            });
            if !can {
                unservable.push(id.clone());
            } else if a.unservable_since_unix_ms.is_some() {
                served_again.push(id.clone());
            }
        }
        for id in served_again {
            if let Some(a) = self.active.get_mut(&id) {
                a.unservable_since_unix_ms = None;
            }
        }
        for id in unservable {
            let Some(a) = self.active.get_mut(&id) else {
                continue;
            };
            let req = Requirement {
                platform: &a.spec.platform,
                labels: &a.spec.required_labels,
                allow_emulation: a.spec.allow_emulation,
                exclusive: a.spec.exclusive,
                network: a.spec.network,
                sandbox: !a.spec.submitter.trusted,
                infra_failed_on: &a.infra_failed_on,
            };
            let since = *a.unservable_since_unix_ms.get_or_insert(now);
            if now.saturating_sub(since) >= self.cfg.unschedulable_grace_ms {
                let mut a = a.clone();
                a.state = ActionState::Unschedulable;
                a.reason = scheduler::unservable_reason(&views, &req);
                self.finish(a)?;
            }
        }
        self.dispatch(now)
    }

    /// A copy of placement's views, brought up to date.
    fn agent_views(&mut self, now: u64) -> Vec<AgentView> {
        let mut views = std::mem::take(&mut self.views.list);
        self.refresh_views(&mut views, now);
        let copy = views.clone();
        self.views.list = views;
        copy
    }

    /// Slots an agent's leases take now.
    fn used_by(&self, agent: &AgentId) -> u32 {
        self.leased
            .get(agent)
            .map_or(0, |held| self.slots_used(agent, held))
    }

    /// The labels placement matches against: those bound at join, or only the keys the
    /// agent's policy accepts.
    fn placement_labels(a: &AgentLive) -> Labels {
        match &a.record.facts.accept_labels {
            None => a.record.labels.clone(),
            Some(keys) => a
                .record
                .labels
                .iter()
                .filter(|(k, _)| keys.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Whether a view still shows the agent's offers and labels (what costs allocations).
    fn same_agent(v: &AgentView, a: &AgentLive) -> bool {
        let r = &a.record;
        v.id == r.id
            && v.offers.len() == r.facts.offers.len()
            && v.offers
                .iter()
                .zip(&r.facts.offers)
                .all(|((p, e), o)| *p == o.platform && *e == o.emulated)
            && match &r.facts.accept_labels {
                None => v.labels == r.labels,
                Some(keys) => {
                    v.labels.len() == r.labels.keys().filter(|k| keys.contains(*k)).count()
                        && v.labels
                            .iter()
                            .all(|(k, val)| keys.contains(k) && r.labels.get(k) == Some(val))
                }
            }
    }

    /// Brings `views` up to date with the agents (revoked ones left out). Only the views of
    /// agents that changed since the last refresh ([`Farm::view_changed`]) are updated, unless
    /// the set of agents changed, or time passed a moment when a view's answer flips by itself
    /// (a heartbeat's lease running out, a quarantine ending): then every view is. Memory only.
    fn refresh_views(&mut self, views: &mut Vec<AgentView>, now: u64) {
        let dirty = std::mem::take(&mut self.views.dirty);
        let mut full =
            self.views.rebuild || now >= self.views.valid_until || now < self.views.refreshed_at;
        if !full {
            for id in &dirty {
                let (Some(&n), Some(a)) = (self.views.index.get(id), self.agents.get(id)) else {
                    full = true;
                    break;
                };
                if a.record.revoked || views.get(n).is_none_or(|v| &v.id != id) {
                    full = true;
                    break;
                }
                if !Self::same_agent(&views[n], a) {
                    views[n] = Self::new_view(a);
                }
                let flips = self.fill_view(&mut views[n], a, now);
                self.views.valid_until = self.views.valid_until.min(flips);
            }
        }
        if full {
            self.rebuild_views(views, now);
        }
        self.views.refreshed_at = now;
    }

    /// Refreshes every view, in agent order: a view whose agent's offers and labels are
    /// unchanged is updated in place; only a new or changed agent's view is built afresh.
    fn rebuild_views(&mut self, views: &mut Vec<AgentView>, now: u64) {
        let mut n = 0;
        let mut valid_until = u64::MAX;
        let mut index = HashMap::with_capacity(self.agents.len());
        for a in self.agents.values().filter(|a| !a.record.revoked) {
            match views.get(n) {
                Some(v) if Self::same_agent(v, a) => {}
                Some(_) => views[n] = Self::new_view(a),
                None => views.push(Self::new_view(a)),
            }
            valid_until = valid_until.min(self.fill_view(&mut views[n], a, now));
            index.insert(a.record.id.clone(), n);
            n += 1;
        }
        views.truncate(n);
        self.views.index = index;
        self.views.valid_until = valid_until;
        self.views.rebuild = false;
    }

    /// A view of an agent with what does not change between its hellos.
    fn new_view(a: &AgentLive) -> AgentView {
        let r = &a.record;
        AgentView {
            id: r.id.clone(),
            offers: r
                .facts
                .offers
                .iter()
                .map(|o| (o.platform.clone(), o.emulated))
                .collect(),
            labels: Self::placement_labels(a),
            slots: 0,
            used: 0,
            connected: false,
            draining: false,
            paused: false,
            network: false,
            quarantined: false,
            sandboxed: false,
        }
    }

    /// Fills in what changes; returns the first moment the view's answer changes by itself,
    /// with time alone.
    fn fill_view(&self, v: &mut AgentView, a: &AgentLive, now: u64) -> u64 {
        let r = &a.record;
        v.slots = r.facts.slots;
        v.used = self.used_by(&r.id);
        v.connected = a.alive(now, self.cfg.lease_ms);
        v.draining = r.draining;
        v.paused = !r.facts.paused_reason.is_empty();
        v.network = r.facts.allow_network;
        v.quarantined = r.quarantine.active(now);
        v.sandboxed = archfarm_proto::is_sandboxed(&r.facts.sandbox);
        let lapses = if v.connected {
            r.last_seen_unix_ms + self.cfg.lease_ms + 1
        } else {
            u64::MAX
        };
        let released = if v.quarantined {
            r.quarantine.until_unix_ms
        } else {
            u64::MAX
        };
        lapses.min(released)
    }

    /// Notes that what placement sees of `agent` changed (its record, session, heartbeat or
    /// leases): its view is refreshed before the next placement.
    pub(super) fn view_changed(&mut self, agent: &AgentId) {
        if !self.views.dirty.contains(agent) {
            self.views.dirty.insert(agent.clone());
        }
    }

    /// Places queued actions, oldest job first, on the best free agents. Runs on every
    /// heartbeat and result, so it walks the queue index only while some agent has a free
    /// slot, and asks about a requirement no free agent met only once.
    pub fn dispatch(&mut self, now: u64) -> anyhow::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let mut views = std::mem::take(&mut self.views.list);
        self.refresh_views(&mut views, now);
        let placed = self.place(&mut views, now);
        self.views.list = views;
        placed
    }

    /// The placement loop of [`Farm::dispatch`] over up-to-date `views`.
    fn place(&mut self, views: &mut [AgentView], now: u64) -> anyhow::Result<()> {
        let free = |v: &AgentView| {
            if v.connected && !v.draining {
                v.slots.saturating_sub(v.used)
            } else {
                0
            }
        };
        let mut free_slots: u32 = views.iter().map(free).sum();
        // Requirements no free agent met in this pass, by everything that decides the fit.
        let mut unplaceable: HashSet<FitKey> = HashSet::new();
        let mut after: Option<(u64, ActionId)> = None;
        while free_slots > 0 {
            let next = match &after {
                None => self.queued.iter().next(),
                Some(k) => self
                    .queued
                    .range((Bound::Excluded(k.clone()), Bound::Unbounded))
                    .next(),
            };
            let Some(key) = next.cloned() else {
                break;
            };
            after = Some(key.clone());
            let id = key.1;
            let Some(a) = self.active.get(&id) else {
                continue;
            };
            let req = Requirement {
                platform: &a.spec.platform,
                labels: &a.spec.required_labels,
                allow_emulation: a.spec.allow_emulation,
                exclusive: a.spec.exclusive,
                network: a.spec.network,
                sandbox: !a.spec.submitter.trusted,
                infra_failed_on: &a.infra_failed_on,
            };
            // Placing only ever fills agents, so a requirement that found no agent finds none
            // later in this pass, nor does one that only narrows it (the network, an idle
            // agent, agents to avoid). Only equal keys are lumped together: an action no agent
            // can take never holds up other actions of its platform that one can.
            let fit = req.fit_key();
            if unplaceable.contains(&fit) || fit.relaxed().is_some_and(|r| unplaceable.contains(&r))
            {
                continue;
            }
            let Some((agent, emulated)) = scheduler::choose_agent(views.iter(), &req) else {
                unplaceable.insert(fit);
                continue;
            };
            let mut a = a.clone();
            let agent = agent.clone();
            let fence = self.next_fence();
            a.state = ActionState::Running;
            a.attempts += 1;
            a.unservable_since_unix_ms = None;
            a.lease = Some(Lease {
                agent: agent.clone(),
                fence,
                expiry_unix_ms: now + self.cfg.lease_ms,
                emulated,
            });
            a.last_agent = Some((agent.clone(), emulated));
            a.started_unix_ms = now;
            let shared = self.save(&a)?;
            if let Some(v) = views.iter_mut().find(|v| v.id == agent) {
                let before = free(v);
                v.used = if a.spec.exclusive {
                    v.slots
                } else {
                    v.used + 1
                };
                free_slots -= before - free(v);
            }
            self.send(
                &agent,
                AgentCommand::Assign {
                    action: shared,
                    fence,
                    emulated,
                },
            );
            self.put_active(a);
        }
        Ok(())
    }
}

mod agents;
mod fences;
mod outbox;
mod results;
pub use agents::quarantine_backoff_ms;
use outbox::Announcement;
pub use outbox::{Outbox, Records};

#[cfg(test)]
mod lease_props;

#[cfg(test)]
mod tests;
