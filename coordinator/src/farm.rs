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
use crate::scheduler::{self, AgentView, Requirement};
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
        let mut unplaceable: HashSet<(Platform, Labels, bool, bool)> = HashSet::new();
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
            let wanted = (
                a.spec.platform.clone(),
                a.spec.required_labels.clone(),
                a.spec.allow_emulation,
                a.spec.exclusive,
            );
            if unplaceable.contains(&wanted) {
                continue;
            }
            let req = Requirement {
                platform: &a.spec.platform,
                labels: &a.spec.required_labels,
                allow_emulation: a.spec.allow_emulation,
                exclusive: a.spec.exclusive,
                network: a.spec.network,
                infra_failed_on: &a.infra_failed_on,
            };
            // Placing only ever fills agents, so what found no agent now finds none later.
            let Some((agent, emulated)) = scheduler::choose_agent(&views, &req) else {
                unplaceable.insert(wanted);
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
mod tests {
    use super::*;

    const LEASE: u64 = 15_000;

    struct Harness {
        farm: Farm,
        _dir: tempfile::TempDir,
        rx: HashMap<String, mpsc::UnboundedReceiver<AgentCommand>>,
        conns: HashMap<String, u64>,
        seq: u64,
        exclusive: bool,
        /// Labels of the agents joined next (trusted by default).
        labels: Labels,
        /// cache_untrusted and cache_emulated of the next submits.
        cache_untrusted: bool,
        cache_emulated: bool,
        /// network of the next submits.
        network: bool,
        /// Blobs every action of the next submits needs (its input tree).
        inputs: Vec<Digest>,
    }

    /// A process exit that names `blobs` (encoded as three marker bytes).
    fn exited(exit_code: i32, blobs: &[Digest]) -> Completion {
        Completion {
            outcome: Outcome::Exited,
            exit_code,
            message: String::new(),
            encoded: vec![1, 2, 3],
            named_blobs: blobs.to_vec(),
            output_trees: vec![],
            cacheable: true,
            steps: vec![],
        }
    }

    fn offers(list: &[(&str, bool)]) -> AgentFacts {
        AgentFacts {
            offers: list
                .iter()
                .map(|(p, e)| Offer {
                    platform: p.parse().unwrap(),
                    emulated: *e,
                })
                .collect(),
            slots: 1,
            ..Default::default()
        }
    }

    impl Harness {
        fn new() -> Self {
            Self::with_cas_budget(1 << 30)
        }

        fn with_cas_budget(budget_bytes: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("state")).unwrap();
            let cas =
                Arc::new(Cas::open_with_budget(&dir.path().join("cas"), budget_bytes).unwrap());
            Self {
                farm: Farm::load(store, cas, FarmConfig::default(), 0).unwrap(),
                _dir: dir,
                rx: HashMap::new(),
                conns: HashMap::new(),
                seq: 0,
                exclusive: false,
                labels: [("trusted".to_string(), "true".to_string())].into(),
                cache_untrusted: false,
                cache_emulated: false,
                network: false,
                inputs: vec![],
            }
        }

        fn join(&mut self, id: &str, list: &[(&str, bool)], now: u64) {
            let record = AgentRecord {
                id: AgentId(id.into()),
                hostname: id.into(),
                labels: self.labels.clone(),
                facts: AgentFacts::default(),
                joined_unix_ms: now,
                last_seen_unix_ms: now,
                draining: false,
                revoked: false,
                quarantine: Default::default(),
            };
            if !self.farm.agents.contains_key(&record.id) {
                self.farm.add_agent(record).unwrap();
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let conn = self
                .farm
                .hello(&AgentId(id.into()), offers(list), &[], tx, now)
                .unwrap();
            self.rx.insert(id.into(), rx);
            self.conns.insert(id.into(), conn);
        }

        fn submit(&mut self, platforms: &[&str], allow_emulation: bool, now: u64) -> JobId {
            self.submit_keyed(platforms, allow_emulation, "", now)
        }

        fn submit_keyed(
            &mut self,
            platforms: &[&str],
            allow_emulation: bool,
            key: &str,
            now: u64,
        ) -> JobId {
            self.seq += 1;
            let job = JobId(format!("j-{:06}", self.seq));
            let actions: Vec<ActionRecord> = platforms
                .iter()
                .map(|p| {
                    let platform: Platform = p.parse().unwrap();
                    let spec = ActionSpec {
                        allow_emulation,
                        exclusive: self.exclusive,
                        network: self.network,
                        cache_untrusted: self.cache_untrusted,
                        cache_emulated: self.cache_emulated,
                        ..ActionSpec::trivial(platform.clone())
                    };
                    let mut a = ActionRecord::queued(
                        ActionId::new(&job, &platform),
                        &job,
                        self.seq,
                        spec,
                        now,
                    );
                    a.action_digest = key.to_string();
                    // As the Jobs service does before it locks the farm.
                    self.farm.cache().answer(&mut a, now).unwrap();
                    a
                })
                .collect();
            let record = JobRecord {
                id: job.clone(),
                seq: self.seq,
                spec: vec![],
                submitter: "test".into(),
                submitted_unix_ms: now,
                actions: actions.iter().map(|a| a.id.clone()).collect(),
                description: String::new(),
                finished: false,
            };
            let pins = actions
                .iter()
                .map(|a| (a.id.clone(), self.inputs.clone()))
                .collect();
            self.farm.submit(record, actions, &pins, now).unwrap();
            job
        }

        /// Drains the agent's commands; returns the assigns as (action, fence, emulated).
        fn assigns(&mut self, agent: &str) -> Vec<(String, u64, bool)> {
            // What the farm announced goes out at a commit.
            self.farm.commit().unwrap();
            let rx = self.rx.get_mut(agent).unwrap();
            let mut out = vec![];
            while let Ok(cmd) = rx.try_recv() {
                if let AgentCommand::Assign {
                    action,
                    fence,
                    emulated,
                } = cmd
                {
                    out.push((action.id.0.clone(), fence, emulated));
                }
            }
            out
        }

        fn acks(&mut self, agent: &str) -> Vec<(bool, String)> {
            // What the farm announced goes out at a commit.
            self.farm.commit().unwrap();
            let rx = self.rx.get_mut(agent).unwrap();
            let mut out = vec![];
            while let Ok(cmd) = rx.try_recv() {
                if let AgentCommand::Ack {
                    accepted, reason, ..
                } = cmd
                {
                    out.push((accepted, reason));
                }
            }
            out
        }

        fn state(&self, id: &str) -> ActionRecord {
            self.farm
                .store
                .action(&ActionId(id.into()))
                .unwrap()
                .unwrap()
        }

        fn heartbeat(&mut self, agent: &str, running: &[(&str, u64)], now: u64) {
            let running: Vec<(ActionId, u64)> = running
                .iter()
                .map(|(a, f)| (ActionId((*a).into()), *f))
                .collect();
            let conn = self.conns[agent];
            self.farm
                .heartbeat(
                    &AgentId(agent.into()),
                    conn,
                    &HeartbeatReport::default(),
                    &running,
                    now,
                )
                .unwrap();
        }

        /// Reports a result for `action` under `fence`, as `agent`'s session would.
        fn report(&mut self, agent: &str, action: &str, fence: u64, c: Completion, now: u64) {
            let (agent, action) = (AgentId(agent.into()), ActionId(action.into()));
            self.farm.completed(&agent, &action, fence, c, now).unwrap();
        }

        fn complete_with(
            &mut self,
            agent: &str,
            action: &str,
            fence: u64,
            blobs: &[Digest],
            now: u64,
        ) {
            self.report(agent, action, fence, exited(0, blobs), now);
        }

        fn complete(&mut self, agent: &str, action: &str, fence: u64, exit_code: i32, now: u64) {
            self.report(agent, action, fence, exited(exit_code, &[]), now);
        }

        /// Reports that the agent could not run the action (an INFRA_ERROR).
        fn infra(&mut self, agent: &str, action: &str, fence: u64, now: u64) {
            let c = Completion {
                outcome: Outcome::InfraError,
                exit_code: -1,
                message: "sandbox setup failed".into(),
                ..exited(0, &[])
            };
            self.report(agent, action, fence, c, now);
        }

        fn quarantine(&self, agent: &str) -> Quarantine {
            self.farm.agents[&AgentId(agent.into())]
                .record
                .quarantine
                .clone()
        }
    }

    #[test]
    fn an_infra_error_is_retried_on_another_agent_and_counted_apart_from_failures() {
        let mut h = Harness::new();
        h.join("a", &[("linux/s390x", false)], 0);
        h.join("b", &[("linux/s390x", false)], 0);
        let job = h.submit(&["linux/s390x"], false, 0);
        let id = format!("{job}/linux/s390x");
        assert_eq!(h.assigns("a"), vec![(id.clone(), 1, false)]);
        h.infra("a", &id, 1, 1);
        assert!(
            h.assigns("a").is_empty(),
            "not back to the agent that failed"
        );
        assert_eq!(h.assigns("b"), vec![(id.clone(), 2, false)]);
        h.complete("b", &id, 2, 1, 2);
        let done = h.state(&id);
        assert_eq!(
            (done.state, done.attempts, done.infra_failed_on.clone()),
            (ActionState::Failed, 2, vec![AgentId("a".into())])
        );
        assert_eq!(done.reason, "exit code 1");
        assert_eq!(h.quarantine("a").consecutive_infra_failures, 1);
        assert_eq!(
            h.quarantine("b"),
            Quarantine::default(),
            "a command failure is no infra failure"
        );
    }

    #[test]
    fn a_lapsed_lease_is_retried_elsewhere_and_counts_against_the_silent_agent() {
        let mut h = Harness::new();
        h.join("a", &[("linux/arm64", false)], 0);
        h.join("b", &[("linux/arm64", false)], 0);
        h.farm
            .agents
            .get_mut(&AgentId("b".into()))
            .unwrap()
            .record
            .facts
            .slots = 2;
        let first = h.submit(&["linux/arm64"], false, 0);
        let second = h.submit(&["linux/arm64"], false, 0);
        let (one, two) = (
            format!("{first}/linux/arm64"),
            format!("{second}/linux/arm64"),
        );
        // The idle one of equal load wins by id: a gets the first, b the second.
        assert_eq!(h.assigns("a"), vec![(one.clone(), 1, false)]);
        assert_eq!(h.assigns("b"), vec![(two.clone(), 2, false)]);
        // a goes silent; its lease lapses; b (one slot still free) takes the retry.
        h.heartbeat("a", &[(&one, 1)], 1);
        h.heartbeat("b", &[(&two, 2)], LEASE + 2);
        h.farm.tick(LEASE + 2).unwrap();
        assert_eq!(h.assigns("b"), vec![(one.clone(), 3, false)]);
        let again = h.state(&one);
        assert_eq!(again.infra_failed_on, vec![AgentId("a".into())]);
        assert!(again.reason.contains("queued again for another agent"));
        assert_eq!(h.quarantine("a").consecutive_infra_failures, 1);
    }

    #[test]
    fn a_run_that_broke_an_agent_limit_fails_once_uncached_and_the_agent_is_fine() {
        let mut h = Harness::new();
        h.join("a", &[("linux/amd64", false)], 0);
        h.farm
            .agents
            .get_mut(&AgentId("a".into()))
            .unwrap()
            .record
            .quarantine
            .consecutive_infra_failures = 2;
        let job = h.submit_keyed(&["linux/amd64"], false, "key-1", 1);
        let id = format!("{job}/linux/amd64");
        let (agent, fence) = ("a", h.assigns("a")[0].1);
        let c = Completion {
            outcome: Outcome::LimitExceeded,
            exit_code: -1,
            message: "memory limit of 2 GiB exceeded".into(),
            ..exited(0, &[])
        };
        h.report(agent, &id, fence, c, 2);
        let done = h.state(&id);
        assert_eq!(
            (done.state, done.attempts, done.infra_failed_on.len()),
            (ActionState::Failed, 1, 0),
            "failed, not retried, not an infra failure"
        );
        assert_eq!(done.reason, "memory limit of 2 GiB exceeded");
        assert_eq!(
            h.quarantine(agent),
            Quarantine::default(),
            "the agent ran it to its end: its infra count starts over"
        );
        assert!(h.assigns("a").is_empty(), "not retried");
        let again = h.submit_keyed(&["linux/amd64"], false, "key-1", 3);
        assert_eq!(
            h.state(&format!("{again}/linux/amd64")).state,
            ActionState::Running,
            "never cached"
        );
    }

    #[test]
    fn n_infra_failures_in_a_row_quarantine_with_doubling_backoff_and_probation() {
        let mut h = Harness::new();
        h.farm.cfg.max_attempts = 20;
        h.join("a", &[("linux/riscv64", false)], 0);
        let job = h.submit(&["linux/riscv64"], false, 0);
        let id = format!("{job}/linux/riscv64");
        // The only agent: each retry comes back to it (nobody else could take it).
        for (n, fence) in [(1, 1), (2, 2)] {
            assert_eq!(h.assigns("a"), vec![(id.clone(), fence, false)]);
            h.infra("a", &id, fence, n);
            assert_eq!(h.quarantine("a").consecutive_infra_failures, n as u32);
        }
        assert_eq!(h.assigns("a"), vec![(id.clone(), 3, false)]);
        h.infra("a", &id, 3, 10);
        let q = h.quarantine("a");
        assert_eq!((q.quarantines, q.until_unix_ms), (1, 10 + 60_000));
        assert!(
            q.reason.contains("3 infra failures in a row"),
            "{}",
            q.reason
        );
        // No new work during the backoff, even with a heartbeat just before its end.
        assert!(h.assigns("a").is_empty());
        h.heartbeat("a", &[], 60_009);
        assert!(h.assigns("a").is_empty(), "still quarantined");
        assert_eq!(h.state(&id).state, ActionState::Queued);
        h.farm.tick(60_009).unwrap();
        assert_eq!(
            h.state(&id).state,
            ActionState::Queued,
            "waits, not unschedulable"
        );
        // Backoff over: work again, on probation.
        h.heartbeat("a", &[], 60_010);
        assert_eq!(h.assigns("a"), vec![(id.clone(), 4, false)]);
        assert!(h.quarantine("a").on_probation(60_010));
        // One infra failure on probation: quarantined again, twice as long.
        h.infra("a", &id, 4, 60_020);
        let q = h.quarantine("a");
        assert_eq!((q.quarantines, q.until_unix_ms), (2, 60_020 + 120_000));
        h.heartbeat("a", &[], 180_019);
        assert!(h.assigns("a").is_empty());
        h.heartbeat("a", &[], 180_020);
        assert_eq!(h.assigns("a"), vec![(id.clone(), 5, false)]);
        // A success clears everything; the next failure is the first of a new count.
        h.complete("a", &id, 5, 0, 180_030);
        assert_eq!(h.quarantine("a"), Quarantine::default());
        assert_eq!(h.state(&id).infra_failed_on.len(), 4);
        let job2 = h.submit(&["linux/riscv64"], false, 180_040);
        let id2 = format!("{job2}/linux/riscv64");
        assert_eq!(h.assigns("a"), vec![(id2.clone(), 6, false)]);
        h.infra("a", &id2, 6, 180_050);
        let q = h.quarantine("a");
        assert_eq!((q.consecutive_infra_failures, q.until_unix_ms), (1, 0));
        assert_eq!(
            h.assigns("a"),
            vec![(id2.clone(), 7, false)],
            "not quarantined"
        );
    }

    #[test]
    fn a_success_of_work_started_before_the_quarantine_does_not_end_it() {
        let mut h = Harness::new();
        h.join("a", &[("linux/amd64", false)], 0);
        h.farm
            .agents
            .get_mut(&AgentId("a".into()))
            .unwrap()
            .record
            .facts
            .slots = 4;
        let jobs: Vec<String> = (0..4)
            .map(|_| format!("{}/linux/amd64", h.submit(&["linux/amd64"], false, 0)))
            .collect();
        let fences: Vec<u64> = h.assigns("a").iter().map(|(_, f, _)| *f).collect();
        assert_eq!(fences, vec![1, 2, 3, 4]);
        for i in 0..3 {
            h.infra("a", &jobs[i], fences[i], 1);
        }
        // The only agent: the first two retries came back to it before the quarantine.
        let retried: Vec<String> = h.assigns("a").into_iter().map(|(id, _, _)| id).collect();
        assert_eq!(retried, vec![jobs[0].clone(), jobs[1].clone()]);
        let q = h.quarantine("a");
        assert_eq!(q.until_unix_ms, 1 + 60_000);
        assert_eq!(h.state(&jobs[2]).state, ActionState::Queued, "waits");
        // The long run it took before the quarantine succeeds: still quarantined.
        h.complete("a", &jobs[3], fences[3], 0, 2);
        assert_eq!(h.quarantine("a"), q);
        assert!(h.assigns("a").is_empty());
    }

    #[test]
    fn the_backoff_doubles_per_quarantine_up_to_the_cap() {
        let cfg = FarmConfig::default();
        let b: Vec<u64> = (1..=8).map(|n| quarantine_backoff_ms(&cfg, n)).collect();
        assert_eq!(
            b,
            vec![60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000]
        );
        assert_eq!(quarantine_backoff_ms(&cfg, u32::MAX), 3_600_000);
    }

    #[test]
    fn a_quarantine_survives_a_coordinator_restart() {
        let mut h = Harness::new();
        h.join("a", &[("linux/ppc64le", false)], 0);
        let job = h.submit(&["linux/ppc64le"], false, 0);
        let id = format!("{job}/linux/ppc64le");
        for fence in 1..=3 {
            assert_eq!(h.assigns("a"), vec![(id.clone(), fence, false)]);
            h.infra("a", &id, fence, fence);
        }
        assert_eq!(h.state(&id).state, ActionState::InfraFailed);
        let before = h.quarantine("a");
        assert_eq!(before.until_unix_ms, 3 + 60_000);
        let store = h.farm.store.clone();
        let cas = h.farm.cas.clone();
        h.farm = Farm::load(store, cas, FarmConfig::default(), 1_000).unwrap();
        assert_eq!(h.quarantine("a"), before);
        h.join("a", &[("linux/ppc64le", false)], 1_000);
        h.submit(&["linux/ppc64le"], false, 1_000);
        assert!(
            h.assigns("a").is_empty(),
            "still quarantined after the restart"
        );
        h.heartbeat("a", &[], 60_003);
        assert_eq!(h.assigns("a").len(), 1);
    }

    #[test]
    fn a_cached_result_completes_the_same_action_without_any_agent() {
        let mut h = Harness::new();
        h.join("a", &[("linux/amd64", false)], 0);
        let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
        let id = format!("{first}/linux/amd64");
        let fence = h.assigns("a")[0].1;
        let out = Digest::of(b"stdout bytes");
        h.farm.cas.put(&out, b"stdout bytes").unwrap();
        h.complete_with("a", &id, fence, &[out], 1);
        let second = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
        assert!(h.assigns("a").is_empty(), "a hit runs nowhere");
        let hit = h.state(&format!("{second}/linux/amd64"));
        assert_eq!((hit.state, hit.cached), (ActionState::Succeeded, true));
        assert_eq!(hit.result.unwrap().encoded, vec![1, 2, 3]);
        assert!(
            hit.reason.contains("cached result of a (native)"),
            "{}",
            hit.reason
        );
        assert!(h.farm.store.job(&second).unwrap().unwrap().finished);
        // Another key misses; no_cache skips the lookup.
        h.submit_keyed(&["linux/amd64"], false, "key-2", 3);
        assert_eq!(h.assigns("a").len(), 1);
        let f = h.farm.cache().figures(4).unwrap();
        assert_eq!((f.lookups_total, f.hits_total, f.entries), (3, 1, 1));
        assert_eq!((f.lookups_last_hour, f.hits_last_hour), (3, 1));
    }

    #[test]
    fn a_cache_entry_naming_an_evicted_blob_is_a_miss() {
        let mut h = Harness::with_cas_budget(64);
        h.join("a", &[("linux/amd64", false)], 0);
        let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
        let fence = h.assigns("a")[0].1;
        let out = Digest::of(&[7u8; 40]);
        h.farm.cas.put(&out, &[7u8; 40]).unwrap();
        h.complete_with("a", &format!("{first}/linux/amd64"), fence, &[out], 1);
        // Another 40-byte blob pushes the store over its 64-byte budget: `out` goes.
        h.farm.cas.put(&Digest::of(&[8u8; 40]), &[8u8; 40]).unwrap();
        assert!(!h.farm.cas.contains(&out));
        let again = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
        let a = h.state(&format!("{again}/linux/amd64"));
        assert_eq!(
            (a.state, a.cached),
            (ActionState::Running, false),
            "a miss, run again"
        );
    }

    #[test]
    fn passing_steps_are_cached_and_every_step_duration_is_recorded() {
        let mut h = Harness::new();
        h.join("a", &[("linux/s390x", false)], 0);
        let job = h.submit(&["linux/s390x"], false, 0);
        let id = format!("{job}/linux/s390x");
        let step = |name: &str, key: &str| StepSpec {
            name: name.into(),
            argv: vec!["./pkg.test".into()],
            working_directory: String::new(),
            input_root: None,
            timeout_ms: 0,
            history_key: format!("example.com/{name}"),
            cache_key: key.into(),
        };
        let mut a = h.farm.active[&ActionId(id.clone())].clone();
        a.spec.steps = vec![step("ok", &"a".repeat(64)), step("bad", &"b".repeat(64))];
        h.farm.put_active(a);
        let fence = h.assigns("a")[0].1;
        let out = Digest::of(b"PASS\n");
        h.farm.cas.put(&out, b"PASS\n").unwrap();
        let done = |name: &str, exit_code: i32, ms: u64| StepCompletion {
            name: name.into(),
            exit_code,
            duration_ms: ms,
            timed_out: false,
            output: Some(out),
            encoded: vec![9],
        };
        let c = Completion {
            steps: vec![done("ok", 0, 1_500), done("bad", 1, 700)],
            ..exited(1, &[])
        };
        h.report("a", &id, fence, c, 5);
        let hit = h
            .farm
            .cache()
            .lookup(CacheKey::Step(&"a".repeat(64)), false, 6)
            .unwrap()
            .unwrap();
        assert_eq!(
            (hit.encoded, hit.platform.to_string()),
            (vec![9], "linux/s390x".to_string())
        );
        assert!(
            h.farm
                .cache()
                .lookup(CacheKey::Step(&"b".repeat(64)), false, 6)
                .unwrap()
                .is_none(),
            "failures are not cached"
        );
        let d = |item: &str| h.farm.store.duration("linux/s390x", item).unwrap();
        assert_eq!(
            (d("example.com/ok"), d("example.com/bad")),
            (Some(1_500), Some(700))
        );
    }

    #[test]
    fn an_exclusive_action_has_the_agent_to_itself() {
        let mut h = Harness::new();
        h.join("a", &[("linux/amd64", false)], 0);
        h.farm
            .agents
            .get_mut(&AgentId("a".into()))
            .unwrap()
            .record
            .facts
            .slots = 2;
        let plain = h.submit(&["linux/amd64"], false, 0);
        assert_eq!(h.assigns("a").len(), 1);
        h.exclusive = true;
        h.submit(&["linux/amd64"], false, 1);
        h.exclusive = false;
        assert!(h.assigns("a").is_empty(), "waits for the agent to be idle");
        let fence = 1;
        h.complete("a", &format!("{plain}/linux/amd64"), fence, 0, 3);
        assert_eq!(h.assigns("a").len(), 1, "now it starts");
        assert_eq!(
            h.farm.slot_usage()[&AgentId("a".into())].0,
            2,
            "and takes every slot"
        );
        h.submit(&["linux/amd64"], false, 4);
        assert!(h.assigns("a").is_empty(), "nothing runs beside it");
    }

    #[test]
    fn eviction_spares_the_inputs_of_queued_and_running_actions_until_they_finish() {
        let mut h = Harness::with_cas_budget(100);
        let input = Digest::of(&[1u8; 60]);
        h.farm.cas.put(&input, &[1u8; 60]).unwrap();
        h.inputs = vec![input];
        let job = h.submit(&["linux/s390x"], false, 0);
        // Queued (no agent yet): a second 60-byte blob overflows the budget; the input stays.
        h.farm.cas.put(&Digest::of(&[2u8; 60]), &[2u8; 60]).unwrap();
        assert!(
            h.farm.cas.contains(&input),
            "a queued action's input is never evicted"
        );
        h.join("a", &[("linux/s390x", false)], 1);
        let fence = h.assigns("a")[0].1;
        h.farm.cas.put(&Digest::of(&[3u8; 60]), &[3u8; 60]).unwrap();
        assert!(h.farm.cas.contains(&input), "nor a running one's");
        h.complete("a", &format!("{job}/linux/s390x"), fence, 0, 2);
        h.farm.cas.put(&Digest::of(&[4u8; 60]), &[4u8; 60]).unwrap();
        assert!(
            !h.farm.cas.contains(&input),
            "once finished it is an ordinary blob"
        );
    }

    #[test]
    fn a_result_naming_a_missing_blob_is_not_cached() {
        let mut h = Harness::new();
        h.join("a", &[("linux/amd64", false)], 0);
        let first = h.submit_keyed(&["linux/amd64"], false, "key-1", 0);
        let fence = h.assigns("a")[0].1;
        h.complete_with(
            "a",
            &format!("{first}/linux/amd64"),
            fence,
            &[Digest::of(b"never uploaded")],
            1,
        );
        let again = h.submit_keyed(&["linux/amd64"], false, "key-1", 2);
        assert_eq!(
            h.state(&format!("{again}/linux/amd64")).state,
            ActionState::Running
        );
    }

    #[test]
    fn only_trusted_native_results_are_cached_unless_the_job_asks() {
        let out = Digest::of(b"stdout bytes");
        // (agent trusted, runs emulated, cache_untrusted, cache_emulated) -> stored?
        let cases = [
            (true, false, false, false, true),
            (false, false, false, false, false),
            (false, false, true, false, true),
            (true, true, false, false, false),
            (true, true, false, true, true),
            (false, true, false, true, false),
            (false, true, true, true, true),
        ];
        for (trusted, emulated, cache_untrusted, cache_emulated, stored) in cases {
            let what = format!(
                "trusted={trusted} emulated={emulated} cache_untrusted={cache_untrusted} \
                 cache_emulated={cache_emulated}"
            );
            let mut h = Harness::new();
            h.farm.cas.put(&out, b"stdout bytes").unwrap();
            if !trusted {
                h.labels = Labels::new();
            }
            h.join("a", &[("linux/arm64", emulated)], 0);
            (h.cache_untrusted, h.cache_emulated) = (cache_untrusted, cache_emulated);
            let first = h.submit_keyed(&["linux/arm64"], true, "key-1", 0);
            let (_, fence, ran_emulated) = h.assigns("a")[0].clone();
            assert_eq!(ran_emulated, emulated, "{what}");
            h.complete_with("a", &format!("{first}/linux/arm64"), fence, &[out], 1);
            let entry = h
                .farm
                .cache()
                .lookup(CacheKey::Action("key-1"), true, 2)
                .unwrap();
            assert_eq!(entry.is_some(), stored, "{what}");
            if let Some(e) = entry {
                assert_eq!((e.trusted, e.emulated), (trusted, emulated), "{what}");
            }
            // The job itself succeeded either way.
            let done = h.state(&format!("{first}/linux/arm64"));
            assert_eq!(done.state, ActionState::Succeeded, "{what}");
        }
    }

    #[test]
    fn a_result_with_the_network_is_neither_stored_nor_served() {
        let out = Digest::of(b"stdout bytes");
        let mut h = Harness::new();
        h.farm.cas.put(&out, b"stdout bytes").unwrap();
        h.join("a", &[("linux/arm64", false)], 0);
        let agent = h.farm.agents.get_mut(&AgentId("a".into())).unwrap();
        agent.record.facts.allow_network = true;
        (h.cache_untrusted, h.cache_emulated, h.network) = (true, true, true);
        let first = h.submit_keyed(&["linux/arm64"], false, "key-1", 0);
        let (_, fence, _) = h.assigns("a")[0].clone();
        h.complete_with("a", &format!("{first}/linux/arm64"), fence, &[out], 1);
        let lookup = |h: &Harness| {
            h.farm
                .cache()
                .lookup(CacheKey::Action("key-1"), false, 2)
                .unwrap()
        };
        assert!(lookup(&h).is_none(), "a network result was stored");
        // A stored result of the same key does not answer an action with the network.
        h.network = false;
        let second = h.submit_keyed(&["linux/arm64"], false, "key-1", 2);
        let (_, fence, _) = h.assigns("a")[0].clone();
        h.complete_with("a", &format!("{second}/linux/arm64"), fence, &[out], 3);
        assert!(lookup(&h).is_some());
        h.network = true;
        let third = h.submit_keyed(&["linux/arm64"], false, "key-1", 4);
        let third = h.state(&format!("{third}/linux/arm64"));
        assert!(!third.cached, "{third:?}");
        assert_eq!(third.state, ActionState::Running);
    }

    #[test]
    fn places_by_platform_and_prefers_native_agents() {
        let mut h = Harness::new();
        h.join("emu", &[("linux/amd64", false), ("linux/arm64", true)], 0);
        h.join("arm", &[("linux/arm64", false)], 0);
        let job = h.submit(&["linux/arm64", "linux/amd64"], true, 1);
        // Placed in action-id order: amd64 first (fence 1), then arm64 (fence 2).
        assert_eq!(
            h.assigns("emu"),
            vec![(format!("{job}/linux/amd64"), 1, false)]
        );
        assert_eq!(
            h.assigns("arm"),
            vec![(format!("{job}/linux/arm64"), 2, false)]
        );
        // Both busy (one slot each): the next arm64 action waits rather than emulate.
        let job2 = h.submit(&["linux/arm64"], true, 2);
        assert!(h.assigns("emu").is_empty() && h.assigns("arm").is_empty());
        h.complete("emu", &format!("{job}/linux/amd64"), 1, 0, 3);
        // Now the emulated agent is free and emulation is allowed.
        assert_eq!(
            h.assigns("emu"),
            vec![(format!("{job2}/linux/arm64"), 3, true)]
        );
        assert_eq!(
            h.state(&format!("{job}/linux/amd64")).state,
            ActionState::Succeeded
        );
    }

    #[test]
    fn lapsed_lease_requeues_and_refuses_the_late_result() {
        let mut h = Harness::new();
        h.join("a", &[("linux/s390x", false)], 0);
        h.join("b", &[("linux/s390x", false)], 0);
        let job = h.submit(&["linux/s390x"], false, 0);
        let id = format!("{job}/linux/s390x");
        assert_eq!(h.assigns("a"), vec![(id.clone(), 1, false)]);
        // b keeps heartbeating; a goes silent. Heartbeats renew a's lease until 10 s.
        h.heartbeat("a", &[(&id, 1)], 10_000);
        h.heartbeat("b", &[], 20_000);
        h.farm.tick(24_000).unwrap();
        assert_eq!(
            h.state(&id).state,
            ActionState::Running,
            "lease still valid at 24 s"
        );
        h.heartbeat("b", &[], 25_001);
        h.farm.tick(25_001).unwrap();
        let again = h.assigns("b");
        assert_eq!(again, vec![(id.clone(), 2, false)]);
        assert_eq!(h.state(&id).attempts, 2);
        // a comes back and reports with fence 1: refused, counted, nothing recorded.
        h.complete("a", &id, 1, 0, 26_000);
        let acks = h.acks("a");
        assert_eq!(acks.len(), 1);
        assert!(
            !acks[0].0 && acks[0].1.contains("stale fence 1"),
            "{acks:?}"
        );
        assert_eq!(h.farm.stale_results_refused(), 1);
        assert_eq!(h.state(&id).state, ActionState::Running);
        h.complete("b", &id, 2, 0, 27_000);
        assert_eq!(h.acks("b"), vec![(true, String::new())]);
        let done = h.state(&id);
        assert_eq!(
            (done.state, done.result.unwrap().fence),
            (ActionState::Succeeded, 2)
        );
        // The same result sent again (lost ack) is accepted without change.
        h.complete("b", &id, 2, 0, 28_000);
        assert_eq!(h.acks("b"), vec![(true, String::new())]);
    }

    #[test]
    fn a_result_no_lease_could_have_produced_is_refused_and_changes_nothing() {
        let mut h = Harness::new();
        h.join("a", &[("linux/amd64", false)], 0);
        let running = h.submit(&["linux/amd64"], false, 0);
        let running = format!("{running}/linux/amd64");
        let fence = h.assigns("a")[0].1;
        let queued = h.submit(&["linux/s390x"], false, 1);
        let queued = format!("{queued}/linux/s390x");
        let cases = [
            (queued.as_str(), fence, "was never leased"),
            ("j-999999/linux/amd64", fence, "does not exist"),
            (running.as_str(), fence + 1000, "was never issued"),
            (running.as_str(), 0, "was never issued"),
        ];
        for (action, f, why) in cases {
            let e = h
                .farm
                .completed(
                    &AgentId("a".into()),
                    &ActionId(action.into()),
                    f,
                    exited(0, &[]),
                    2,
                )
                .unwrap_err();
            assert!(
                matches!(&e, FarmError::Refused(m) if m.contains(why)),
                "{action} {f}: {e:?}"
            );
        }
        assert!(h.acks("a").is_empty(), "nothing acknowledged");
        assert_eq!(h.state(&running).state, ActionState::Running);
        assert_eq!(h.state(&queued).state, ActionState::Queued);
        assert_eq!(h.farm.stale_results_refused(), 0);
    }

    #[test]
    fn announcements_wait_for_the_flush_and_a_later_hub_gets_none_of_the_old_ones() {
        let mut h = Harness::new();
        h.join("a", &[("linux/arm64", false)], 0);
        let job = h.submit(&["linux/arm64"], false, 0);
        let id = format!("{job}/linux/arm64");
        let fence = h.assigns("a")[0].1;
        let watch = h.farm.hubs().subscribe(&job);
        let mut live = watch.live;
        h.farm
            .completed(
                &AgentId("a".into()),
                &ActionId(id.clone()),
                fence,
                exited(0, &[]),
                1,
            )
            .unwrap();
        // Recorded (the store holds it) but not yet announced to the agent or the watchers.
        assert_eq!(h.state(&id).state, ActionState::Succeeded);
        assert!(
            h.rx.get_mut("a").unwrap().try_recv().is_err(),
            "no ack before the flush"
        );
        assert!(live.try_recv().is_err(), "no event before the flush");
        let outbox = h.farm.take_outbox();
        assert!(outbox.needs_flush);
        h.farm.store.flush().unwrap();
        h.farm.release(outbox);
        assert_eq!(h.acks("a"), vec![(true, String::new())]);
        let mut events = Vec::new();
        while let Ok((_, u)) = live.try_recv() {
            events.push(match u {
                JobUpdate::Action(a) => a.state.name().to_string(),
                JobUpdate::Finished(_) => "finished".into(),
                JobUpdate::Log { .. } => "log".into(),
            });
        }
        assert_eq!(events, ["succeeded", "finished"]);
        assert!(h.farm.take_outbox().is_empty());

        // A job whose hub is not open (a restarted coordinator): its events are not held
        // for a hub opened later, which starts from the stored state instead.
        let other = h.submit(&["linux/arm64"], false, 2);
        let other_id = format!("{other}/linux/arm64");
        let fence = h.assigns("a")[0].1;
        h.farm.commit().unwrap();
        h.farm.hubs.forget(&other);
        h.farm
            .completed(
                &AgentId("a".into()),
                &ActionId(other_id),
                fence,
                exited(0, &[]),
                3,
            )
            .unwrap();
        h.farm.hubs().open(&other);
        let later = h.farm.hubs().subscribe(&other);
        h.farm.commit().unwrap();
        assert!(
            later.history.is_empty(),
            "nothing from before the hub opened"
        );
    }

    #[test]
    fn placement_follows_the_queue_index_in_job_order() {
        let mut h = Harness::new();
        let first = h.submit(&["linux/arm64"], false, 0);
        let second = h.submit(&["linux/arm64"], false, 0);
        assert_eq!(h.farm.queued.len(), 2);
        h.join("a", &[("linux/arm64", false)], 1);
        // One slot: the older job's action goes first; the other stays queued.
        let placed = h.assigns("a");
        assert_eq!(placed.len(), 1);
        assert_eq!(placed[0].0, format!("{first}/linux/arm64"));
        assert_eq!(h.farm.queued.len(), 1);
        assert_eq!(h.farm.leased[&AgentId("a".into())].len(), 1);
        h.complete("a", &placed[0].0, placed[0].1, 0, 2);
        let next = h.assigns("a");
        assert_eq!(next[0].0, format!("{second}/linux/arm64"));
        assert!(h.farm.queued.is_empty());
        h.complete("a", &next[0].0, next[0].1, 0, 3);
        h.farm.commit().unwrap();
        assert!(h.farm.leased.is_empty() && h.farm.active.is_empty());
    }

    #[test]
    fn gives_up_after_the_attempt_limit() {
        let mut h = Harness::new();
        h.join("a", &[("linux/ppc64le", false)], 0);
        let job = h.submit(&["linux/ppc64le"], false, 0);
        let id = format!("{job}/linux/ppc64le");
        let mut now = 0;
        for attempt in 1..=3 {
            assert_eq!(h.assigns("a").len(), 1, "attempt {attempt}");
            now += LEASE + 1;
            // The agent is alive (heartbeats) but never reports the action as running.
            h.heartbeat("a", &[], now - 1);
            h.farm.tick(now).unwrap();
        }
        let done = h.state(&id);
        assert_eq!((done.state, done.attempts), (ActionState::InfraFailed, 3));
        assert!(
            done.reason.contains("gave up after 3 attempts"),
            "{}",
            done.reason
        );
        assert!(h.farm.store.job(&job).unwrap().unwrap().finished);
    }

    #[test]
    fn unschedulable_after_grace_with_a_reason() {
        let mut h = Harness::new();
        h.join("emu", &[("linux/amd64", false), ("linux/riscv64", true)], 0);
        let job = h.submit(&["linux/riscv64"], false, 0);
        let id = format!("{job}/linux/riscv64");
        h.farm.tick(1).unwrap();
        h.heartbeat("emu", &[], 30_000);
        h.farm.tick(30_000).unwrap();
        assert_eq!(
            h.state(&id).state,
            ActionState::Queued,
            "still within the grace"
        );
        h.heartbeat("emu", &[], 30_001);
        h.farm.tick(30_001).unwrap();
        let done = h.state(&id);
        assert_eq!(done.state, ActionState::Unschedulable);
        assert!(
            done.reason.contains("does not allow emulation"),
            "{}",
            done.reason
        );
    }

    #[test]
    fn restart_keeps_queued_and_running_and_honours_leases() {
        let dir = tempfile::tempdir().unwrap();
        let (job, id);
        {
            let mut h = Harness::new();
            h._dir = dir;
            h.farm = Farm::load(
                Store::open(&h._dir.path().join("state")).unwrap(),
                Arc::new(Cas::open(&h._dir.path().join("cas")).unwrap()),
                FarmConfig::default(),
                0,
            )
            .unwrap();
            h.join("a", &[("linux/arm64", false)], 0);
            job = h.submit(&["linux/arm64", "linux/s390x"], false, 0);
            id = format!("{job}/linux/arm64");
            assert_eq!(h.assigns("a").len(), 1);
            let store_dir = h._dir;
            drop(h.farm);
            // Reload at 100 s: the lease is honoured for a full period from now.
            let mut farm = Farm::load(
                Store::open(&store_dir.path().join("state")).unwrap(),
                Arc::new(Cas::open(&store_dir.path().join("cas")).unwrap()),
                FarmConfig::default(),
                100_000,
            )
            .unwrap();
            assert_eq!(farm.active.len(), 2);
            farm.tick(100_000 + LEASE).unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            farm.hello(
                &AgentId("a".into()),
                offers(&[("linux/arm64", false)]),
                &[(ActionId(id.clone()), 1)],
                tx,
                100_000 + LEASE,
            )
            .unwrap();
            farm.commit().unwrap();
            assert!(
                rx.try_recv().is_err(),
                "re-claimed lease: no cancel, no new assign"
            );
            let running = farm.store.action(&ActionId(id.clone())).unwrap().unwrap();
            assert_eq!((running.state, running.attempts), (ActionState::Running, 1));
            drop(store_dir);
        }
    }
}
