//! The farm's state machine: agents and their sessions, the active actions and their leases,
//! and what happens on submit, hello, heartbeat, result, cancel, drain, revoke and each tick.
//!
//! Every method takes `now_unix_ms`, so leases, requeues and unschedulable grace are tested
//! with injected time. Every change is written through to the store before it is announced,
//! and announced only once durable: agent commands and job events wait in an outbox until a
//! flush covers them ([`Farm::take_outbox`], flush, [`Farm::release`]), so one flush serves
//! every change made meanwhile (group commit) instead of one fsync per result and placement.
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
        action: Box<ActionRecord>,
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
    /// False when the result names a malformed digest: recorded, never cached.
    pub cacheable: bool,
    /// Per step, for actions made of steps.
    pub steps: Vec<StepCompletion>,
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

/// Something the farm announced, held until a flush makes the change behind it durable.
#[derive(Debug)]
enum Announcement {
    /// A command for the agent's session numbered `conn` (dropped if that session is gone).
    Agent(AgentId, u64, AgentCommand),
    /// An event for the watchers of a job whose hub was open when it was made (a hub opened
    /// later starts from the stored state, which already holds the change).
    Job(JobId, JobUpdate),
}

/// Announcements taken out of the farm for release, in order.
#[derive(Debug)]
pub struct Outbox {
    announcements: Vec<Announcement>,
    /// The store was written since the last take: flush it before releasing.
    pub needs_flush: bool,
}

impl Outbox {
    /// Nothing to flush and nothing to release.
    pub fn is_empty(&self) -> bool {
        self.announcements.is_empty() && !self.needs_flush
    }
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
    /// Job id -> its actions still active.
    active_by_job: HashMap<JobId, BTreeSet<ActionId>>,
    hubs: Hubs,
    /// Announcements waiting for the flush that makes their changes durable.
    outbox: Vec<Announcement>,
    /// The store was written since the outbox was last taken.
    unflushed: bool,
    next_conn: u64,
    stale_results_refused: u64,
    started_unix_ms: u64,
    /// Results are recorded here as they come in (lookups happen outside the farm's lock).
    cache: Arc<ResultCache>,
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
            active_by_job: HashMap::new(),
            hubs: Hubs::default(),
            outbox: Vec::new(),
            unflushed: false,
            next_conn: 0,
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
            self.leased
                .entry(l.agent.clone())
                .or_default()
                .insert(a.id.clone());
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
            if let Some(held) = self.leased.get_mut(&l.agent) {
                held.remove(id);
                if held.is_empty() {
                    self.leased.remove(&l.agent);
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
        if held
            .iter()
            .any(|id| self.active.get(id).is_some_and(|a| a.spec.exclusive))
        {
            let slots = self
                .agents
                .get(agent)
                .map_or(1, |a| a.record.facts.slots.max(1));
            used.max(slots)
        } else {
            used
        }
    }

    /// Registers a freshly joined agent.
    pub fn add_agent(&mut self, record: AgentRecord) -> anyhow::Result<()> {
        self.store.put_agent(&record)?;
        self.store.flush()?;
        self.agents.insert(
            record.id.clone(),
            AgentLive {
                record,
                session: None,
            },
        );
        Ok(())
    }

    fn save(&mut self, action: &ActionRecord) -> anyhow::Result<()> {
        self.store.put_action(action)?;
        self.unflushed = true;
        self.announce(&action.job, JobUpdate::Action(Box::new(action.clone())));
        Ok(())
    }

    /// Holds an event for a job's watchers until the next release.
    fn announce(&mut self, job: &JobId, update: JobUpdate) {
        if self.hubs.is_open(job) {
            self.outbox.push(Announcement::Job(job.clone(), update));
        }
    }

    /// Takes what was announced so far, to release after a flush when `needs_flush` (which
    /// makes every change behind it durable: each was written to the store before it was
    /// announced).
    pub fn take_outbox(&mut self) -> Outbox {
        Outbox {
            announcements: std::mem::take(&mut self.outbox),
            needs_flush: std::mem::take(&mut self.unflushed),
        }
    }

    /// Delivers taken announcements, in order: commands to the sessions they were meant for,
    /// events to the jobs' watchers.
    pub fn release(&mut self, outbox: Outbox) {
        for a in outbox.announcements {
            match a {
                Announcement::Agent(agent, conn, cmd) => {
                    let session = self.agents.get(&agent).and_then(|a| a.session.as_ref());
                    if let Some(s) = session.filter(|s| s.conn == conn) {
                        // A closed session is noticed by its own task; the lease covers the gap.
                        let _ = s.tx.send(cmd);
                    }
                }
                Announcement::Job(job, update) => self.hubs.publish(&job, update),
            }
        }
    }

    /// Flushes and releases at once, under the caller's lock (tests; the coordinator's
    /// committer flushes outside the lock).
    pub fn commit(&mut self) -> anyhow::Result<()> {
        let outbox = self.take_outbox();
        if outbox.needs_flush {
            self.store.flush()?;
        }
        self.release(outbox);
        Ok(())
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
        self.store.put_job(&job)?;
        for a in done.iter().chain(queued.iter()) {
            self.store.put_action(a)?;
        }
        self.unflushed = true;
        self.hubs.open(&job.id);
        for a in &done {
            self.announce(&job.id, JobUpdate::Action(Box::new(a.clone())));
        }
        for a in queued {
            self.cas.pin(
                a.id.as_str(),
                pins.get(&a.id).into_iter().flatten().copied(),
            );
            self.announce(&job.id, JobUpdate::Action(Box::new(a.clone())));
            self.active_by_job
                .entry(job.id.clone())
                .or_default()
                .insert(a.id.clone());
            self.put_active(a);
        }
        if job.finished {
            self.announce(&job.id, JobUpdate::Finished(job.id.clone()));
        }
        self.dispatch(now)
    }

    /// A session opened and said Hello. Returns the session's connection number.
    pub fn hello(
        &mut self,
        agent: &AgentId,
        facts: AgentFacts,
        running: &[(ActionId, u64)],
        tx: mpsc::UnboundedSender<AgentCommand>,
        now: u64,
    ) -> Result<u64, FarmError> {
        self.next_conn += 1;
        let conn = self.next_conn;
        let live = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| FarmError::NotFound(format!("agent {agent} is not registered")))?;
        live.record.facts = facts;
        live.record.last_seen_unix_ms = now;
        live.session = Some(SessionHandle { conn, tx });
        let record = live.record.clone();
        self.store.put_agent(&record)?;
        if record.draining {
            self.send(agent, AgentCommand::Drain);
        }
        self.renew(agent, running, now)?;
        self.dispatch(now)?;
        Ok(conn)
    }

    /// Renews the leases the agent still holds and cancels what it runs without one.
    fn renew(
        &mut self,
        agent: &AgentId,
        running: &[(ActionId, u64)],
        now: u64,
    ) -> anyhow::Result<()> {
        for (id, fence) in running {
            let holds = self
                .active
                .get(id)
                .and_then(|a| a.lease.as_ref())
                .is_some_and(|l| &l.agent == agent && l.fence == *fence);
            if holds {
                if let Some(lease) = self.active.get_mut(id).and_then(|a| a.lease.as_mut()) {
                    lease.expiry_unix_ms = now + self.cfg.lease_ms;
                }
            } else {
                self.send(
                    agent,
                    AgentCommand::Cancel {
                        action: id.clone(),
                        fence: *fence,
                        reason: format!("lease {fence} on {id} is no longer held by {agent}"),
                    },
                );
            }
        }
        Ok(())
    }

    /// A heartbeat from the session `conn`.
    pub fn heartbeat(
        &mut self,
        agent: &AgentId,
        conn: u64,
        report: &HeartbeatReport,
        running: &[(ActionId, u64)],
        now: u64,
    ) -> anyhow::Result<()> {
        let HeartbeatReport {
            load_1m,
            free_disk_bytes,
            paused_reason,
        } = report;
        let (load_1m, free_disk_bytes) = (*load_1m, *free_disk_bytes);
        let Some(live) = self.agents.get_mut(agent) else {
            return Ok(());
        };
        if live.session.as_ref().map(|s| s.conn) != Some(conn) {
            return Ok(());
        }
        live.record.last_seen_unix_ms = now;
        live.record.facts.load_1m = load_1m;
        live.record.facts.free_disk_bytes = free_disk_bytes;
        if &live.record.facts.paused_reason != paused_reason {
            tracing::info!(
                agent = %agent,
                "agent {}",
                if paused_reason.is_empty() {
                    "takes work again".to_string()
                } else {
                    format!("takes no new work: {paused_reason}")
                }
            );
            live.record.facts.paused_reason.clone_from(paused_reason);
        }
        self.renew(agent, running, now)?;
        self.dispatch(now)
    }

    /// The session `conn` ended. Its leases stay until they lapse: the agent may come back.
    pub fn session_closed(&mut self, agent: &AgentId, conn: u64) -> anyhow::Result<()> {
        if let Some(live) = self.agents.get_mut(agent) {
            if live.session.as_ref().map(|s| s.conn) == Some(conn) {
                live.session = None;
                let record = live.record.clone();
                self.store.put_agent(&record)?;
            }
        }
        Ok(())
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

    /// A result from an agent: recorded once under the current lease, refused otherwise. A
    /// stale fence is refused in the acknowledgement (an agent resends results after a
    /// reconnect, and its lease may have lapsed meanwhile); a result no lease could ever have
    /// produced is [`FarmError::Refused`].
    pub fn completed(
        &mut self,
        agent: &AgentId,
        action_id: &ActionId,
        fence: u64,
        c: Completion,
        now: u64,
    ) -> Result<(), FarmError> {
        if let Some(why) = self.never_leased(action_id, fence)? {
            tracing::warn!(%agent, action = %action_id, fence, "refused a result: {why}");
            return Err(FarmError::Refused(format!("result refused: {why}")));
        }
        let (accepted, reason) = self.record_completion(agent, action_id, fence, c, now)?;
        self.send(
            agent,
            AgentCommand::Ack {
                action: action_id.clone(),
                fence,
                accepted,
                reason,
            },
        );
        Ok(self.dispatch(now)?)
    }

    /// Why no lease could have produced a result for `action_id` under `fence`, if so: the
    /// action does not exist, it was never leased to anyone, or the fence was never issued.
    fn never_leased(&self, action_id: &ActionId, fence: u64) -> anyhow::Result<Option<String>> {
        let attempts = match self.active.get(action_id) {
            Some(a) => a.attempts,
            None => match self.store.action(action_id)? {
                Some(a) => a.attempts,
                None => return Ok(Some(format!("{action_id} does not exist"))),
            },
        };
        if attempts == 0 {
            return Ok(Some(format!("{action_id} was never leased")));
        }
        if fence == 0 || fence > self.store.counter("fence")? {
            return Ok(Some(format!("fence {fence} was never issued")));
        }
        Ok(None)
    }

    fn record_completion(
        &mut self,
        agent: &AgentId,
        action_id: &ActionId,
        fence: u64,
        c: Completion,
        now: u64,
    ) -> anyhow::Result<(bool, String)> {
        let Some(action) = self.active.get(action_id).cloned() else {
            // Final already: a re-sent result of the lease that finished it is fine.
            return Ok(match self.store.action(action_id)? {
                Some(done) if done.result.as_ref().is_some_and(|r| r.fence == fence) => {
                    (true, String::new())
                }
                Some(done) => {
                    if done.state != ActionState::Cancelled {
                        self.stale_results_refused += 1;
                    }
                    (
                        false,
                        format!(
                            "{action_id} is already {} (fence {fence} is stale)",
                            done.state.name()
                        ),
                    )
                }
                None => (false, format!("{action_id} does not exist")),
            });
        };
        let current = action.lease.clone();
        match current {
            Some(l) if &l.agent == agent && l.fence == fence => {}
            Some(l) => {
                self.stale_results_refused += 1;
                return Ok((
                    false,
                    format!(
                        "stale fence {fence} for {action_id}: the current lease is {} on {}",
                        l.fence, l.agent
                    ),
                ));
            }
            None => {
                self.stale_results_refused += 1;
                return Ok((
                    false,
                    format!(
                        "stale fence {fence} for {action_id}: it is {} and not leased",
                        action.state.name()
                    ),
                ));
            }
        }
        let mut a = action;
        a.lease = None;
        if !a.spec.steps.is_empty() && c.outcome != Outcome::InfraError {
            let trusted = self.is_trusted(agent);
            let cacheable = c.outcome != Outcome::LimitExceeded;
            self.record_steps(&a, trusted, &c, cacheable, now)?;
        }
        if c.outcome == Outcome::InfraError {
            a.infra_failed_on.push(agent.clone());
            self.agent_infra_failure(agent, &c.message, now)?;
        } else {
            self.agent_success(agent, now)?;
        }
        let result = ResultRecord {
            encoded: c.encoded.clone(),
            fence,
        };
        match c.outcome {
            Outcome::InfraError if a.attempts < self.cfg.max_attempts => {
                a.state = ActionState::Queued;
                a.queued_unix_ms = now;
                a.reason = format!(
                    "attempt {} on {agent} failed for infra reasons: {}; queued again for \
                     another agent",
                    a.attempts, c.message
                );
                a.result = None;
                self.save(&a)?;
                self.put_active(a);
                return Ok((true, String::new()));
            }
            Outcome::InfraError => {
                a.state = ActionState::InfraFailed;
                a.reason = format!(
                    "infra failure on attempt {} of {}: {}",
                    a.attempts, self.cfg.max_attempts, c.message
                );
            }
            Outcome::Exited if c.exit_code == 0 => {
                a.state = ActionState::Succeeded;
                if !a.action_digest.is_empty() && c.cacheable {
                    let key = CacheKey::Action(&a.action_digest);
                    let reported = Reported {
                        encoded: &c.encoded,
                        blobs: c.named_blobs.clone(),
                        output_trees: &c.output_trees,
                    };
                    let trusted = self.is_trusted(agent);
                    self.cache.record(key, &a, trusted, reported, now)?;
                }
            }
            Outcome::Exited => {
                a.state = ActionState::Failed;
                a.reason = format!("exit code {}", c.exit_code);
            }
            Outcome::TimedOut => {
                a.state = ActionState::Failed;
                a.reason = c.message.clone();
            }
            Outcome::LimitExceeded => {
                a.state = ActionState::Failed;
                a.reason = if c.message.is_empty() {
                    "exceeded an agent limit".into()
                } else {
                    c.message.clone()
                };
            }
            Outcome::Cancelled => {
                a.state = ActionState::Cancelled;
                a.reason = c.message.clone();
            }
        }
        a.result = Some(result);
        self.finish(a)?;
        Ok((true, String::new()))
    }

    /// Records the steps' durations, and (if `cacheable`) passing results under their step
    /// cache keys.
    fn record_steps(
        &mut self,
        a: &ActionRecord,
        trusted: bool,
        c: &Completion,
        cacheable: bool,
        now: u64,
    ) -> anyhow::Result<()> {
        let platform = a.spec.platform.to_string();
        for s in &c.steps {
            let Some(spec) = a.spec.steps.iter().find(|x| x.name == s.name) else {
                continue;
            };
            if s.exit_code >= 0 || s.timed_out {
                self.store
                    .record_duration(&platform, spec.history_item(), s.duration_ms)?;
            }
            let passing = s.exit_code == 0 && !s.timed_out;
            if passing && cacheable && !spec.cache_key.is_empty() && c.cacheable {
                if let Some(out) = s.output {
                    let key = CacheKey::Step(&spec.cache_key);
                    let reported = Reported {
                        encoded: &s.encoded,
                        blobs: vec![out],
                        output_trees: &[],
                    };
                    self.cache.record(key, a, trusted, reported, now)?;
                }
            }
        }
        Ok(())
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
            if let Some(mut job) = self.store.job(&job_id)? {
                job.finished = true;
                self.store.put_job(&job)?;
            }
            self.announce(&job_id, JobUpdate::Finished(job_id.clone()));
        }
        Ok(())
    }

    /// Cancels a job's unfinished actions; returns how many.
    pub fn cancel_job(&mut self, job: &JobId, reason: &str, now: u64) -> Result<u32, FarmError> {
        if self.store.job(job)?.is_none() {
            return Err(FarmError::NotFound(format!("job {job} does not exist")));
        }
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

    /// Stops giving an agent new work.
    pub fn drain(&mut self, agent: &AgentId) -> Result<(), FarmError> {
        let live = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| FarmError::NotFound(format!("agent {agent} does not exist")))?;
        live.record.draining = true;
        let record = live.record.clone();
        self.store.put_agent(&record)?;
        self.store.flush()?;
        self.send(agent, AgentCommand::Drain);
        Ok(())
    }

    /// Revokes an agent: its session ends at once and its actions are queued again.
    pub fn revoke(&mut self, agent: &AgentId, now: u64) -> Result<(), FarmError> {
        let live = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| FarmError::NotFound(format!("agent {agent} does not exist")))?;
        live.record.revoked = true;
        live.session = None;
        let record = live.record.clone();
        self.store.put_agent(&record)?;
        let held: Vec<ActionId> = self
            .leased
            .get(agent)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        for id in held {
            self.lease_lost(&id, &format!("agent {agent} was revoked"), now)?;
        }
        self.store.flush()?;
        self.dispatch(now)?;
        Ok(())
    }

    /// Whether an agent was joined with a token labelled `trusted=true` (its results are
    /// cached by default).
    pub fn is_trusted(&self, agent: &AgentId) -> bool {
        self.agents
            .get(agent)
            .is_some_and(|a| crate::model::is_trusted(&a.record.labels))
    }

    /// Whether an agent's certificate has been revoked (checked on every stream message).
    pub fn is_revoked(&self, agent: &AgentId) -> bool {
        self.agents.get(agent).is_none_or(|a| a.record.revoked)
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
        let mut servable: HashMap<(&Platform, &Labels, bool, bool, bool), bool> = HashMap::new();
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
            );
            let can = *servable.entry(key).or_insert_with(|| {
                let req = Requirement {
                    platform: key.0,
                    labels: key.1,
                    allow_emulation: key.2,
                    exclusive: key.3,
                    network: key.4,
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

    fn agent_views(&self, now: u64) -> Vec<AgentView> {
        let usage: HashMap<&AgentId, u32> = self
            .leased
            .iter()
            .map(|(agent, held)| (agent, self.slots_used(agent, held)))
            .collect();
        self.agents
            .values()
            .filter(|a| !a.record.revoked)
            .map(|a| AgentView {
                id: a.record.id.clone(),
                offers: a
                    .record
                    .facts
                    .offers
                    .iter()
                    .map(|o| (o.platform.clone(), o.emulated))
                    .collect(),
                labels: match &a.record.facts.accept_labels {
                    None => a.record.labels.clone(),
                    Some(keys) => a
                        .record
                        .labels
                        .iter()
                        .filter(|(k, _)| keys.contains(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                },
                slots: a.record.facts.slots,
                used: usage.get(&a.record.id).copied().unwrap_or(0),
                connected: a.alive(now, self.cfg.lease_ms),
                draining: a.record.draining,
                paused: !a.record.facts.paused_reason.is_empty(),
                network: a.record.facts.allow_network,
                quarantined: a.record.quarantine.active(now),
            })
            .collect()
    }

    /// Places queued actions, oldest job first, on the best free agents. Runs on every
    /// heartbeat and result, so it walks the queue index only while some agent has a free
    /// slot, and asks about a requirement no free agent met only once.
    pub fn dispatch(&mut self, now: u64) -> anyhow::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let mut views = self.agent_views(now);
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
            let Some((agent, emulated)) = scheduler::choose_agent(&views, &req) else {
                unplaceable.insert(fit);
                continue;
            };
            let fence = self.store.next_counter("fence")?;
            let mut a = a.clone();
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
            self.save(&a)?;
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
                    action: Box::new(a.clone()),
                    fence,
                    emulated,
                },
            );
            self.put_active(a);
        }
        Ok(())
    }

    /// An action failed on `agent` for infra reasons: count it, and quarantine the agent after
    /// `quarantine_after` in a row, or at once while on probation. Each quarantine in a row
    /// lasts twice as long as the one before, up to `quarantine_max_ms`.
    fn agent_infra_failure(&mut self, agent: &AgentId, why: &str, now: u64) -> anyhow::Result<()> {
        let cfg = &self.cfg;
        let Some(live) = self.agents.get_mut(agent) else {
            return Ok(());
        };
        let q = &mut live.record.quarantine;
        q.consecutive_infra_failures = q.consecutive_infra_failures.saturating_add(1);
        let probation = q.on_probation(now);
        if !q.active(now) && (probation || q.consecutive_infra_failures >= cfg.quarantine_after) {
            q.quarantines = q.quarantines.saturating_add(1);
            let backoff_ms = quarantine_backoff_ms(cfg, q.quarantines);
            q.until_unix_ms = now + backoff_ms;
            q.reason = if probation {
                format!(
                    "infra failure on probation ({why}); quarantine {} in a row, {} s",
                    q.quarantines,
                    backoff_ms / 1000
                )
            } else {
                format!(
                    "{} infra failures in a row (last: {why}); quarantined for {} s",
                    q.consecutive_infra_failures,
                    backoff_ms / 1000
                )
            };
            tracing::warn!(agent = %agent, until_unix_ms = q.until_unix_ms, "agent quarantined: {}", q.reason);
        }
        let record = live.record.clone();
        self.store.put_agent(&record)?;
        self.unflushed = true;
        Ok(())
    }

    /// `agent` ran an action to its end (whatever the command did): its infra-failure count
    /// and any probation are cleared. An action it started before a quarantine that is still
    /// on does not end the quarantine: only work taken on probation proves it healthy.
    fn agent_success(&mut self, agent: &AgentId, now: u64) -> anyhow::Result<()> {
        let Some(live) = self.agents.get_mut(agent) else {
            return Ok(());
        };
        let q = &live.record.quarantine;
        if *q == Quarantine::default() || q.active(now) {
            return Ok(());
        }
        if live.record.quarantine.quarantines > 0 {
            tracing::info!(agent = %agent, "agent passed its probation");
        }
        live.record.quarantine = Quarantine::default();
        let record = live.record.clone();
        self.store.put_agent(&record)?;
        self.unflushed = true;
        Ok(())
    }

    /// Holds a command for the agent's current session until the next release.
    fn send(&mut self, agent: &AgentId, cmd: AgentCommand) {
        if let Some(s) = self.agents.get(agent).and_then(|a| a.session.as_ref()) {
            self.outbox
                .push(Announcement::Agent(agent.clone(), s.conn, cmd));
        }
    }
}

#[cfg(test)]
mod lease_props;

/// Length of the `n`th quarantine in a row (from 1): the base, doubled per quarantine, capped.
pub fn quarantine_backoff_ms(cfg: &FarmConfig, n: u32) -> u64 {
    let doublings = n.saturating_sub(1).min(32);
    cfg.quarantine_base_ms
        .saturating_mul(1u64 << doublings)
        .min(cfg.quarantine_max_ms)
}

#[cfg(test)]
mod tests;
