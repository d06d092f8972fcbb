//! The farm's agents: joining, sessions (hello, heartbeat, end), drain, revoke, and the
//! infra-failure record that quarantines an agent. Agent records live in memory; a change marks
//! the agent dirty, and its record is written to the store by the group commit (outside the
//! farm's lock, see [`Farm::take_outbox`]).
use super::*;

impl Farm {
    /// Registers a freshly joined agent (durable with the next flush).
    pub fn add_agent(&mut self, record: AgentRecord) {
        let id = record.id.clone();
        self.agents.insert(
            id.clone(),
            AgentLive {
                record,
                session: None,
            },
        );
        self.views.rebuild = true;
        self.agent_changed(&id, true);
    }

    /// Marks an agent's record for the next commit to write (and flush, when `flush`: the
    /// change must be durable before the caller answers).
    fn agent_changed(&mut self, agent: &AgentId, flush: bool) {
        self.dirty_agents.insert(agent.clone());
        self.view_changed(agent);
        self.unflushed |= flush;
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
        let draining = live.record.draining;
        self.agent_changed(agent, false);
        if draining {
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
        self.view_changed(agent);
        self.renew(agent, running, now)?;
        self.dispatch(now)
    }

    /// The session `conn` ended. Its leases stay until they lapse: the agent may come back.
    pub fn session_closed(&mut self, agent: &AgentId, conn: u64) {
        if let Some(live) = self.agents.get_mut(agent) {
            if live.session.as_ref().map(|s| s.conn) == Some(conn) {
                live.session = None;
                self.agent_changed(agent, false);
            }
        }
    }

    /// Stops giving an agent new work.
    pub fn drain(&mut self, agent: &AgentId) -> Result<(), FarmError> {
        let live = self
            .agents
            .get_mut(agent)
            .ok_or_else(|| FarmError::NotFound(format!("agent {agent} does not exist")))?;
        live.record.draining = true;
        self.agent_changed(agent, true);
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
        self.views.rebuild = true;
        self.agent_changed(agent, true);
        let held: Vec<ActionId> = self
            .leased
            .get(agent)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default();
        for id in held {
            self.lease_lost(&id, &format!("agent {agent} was revoked"), now)?;
        }
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

    /// Whether an agent has been revoked (checked on every session message, under the lock
    /// the message takes anyway; streams learn of revocations from `crate::revocations`).
    pub fn is_revoked(&self, agent: &AgentId) -> bool {
        self.agents.get(agent).is_none_or(|a| a.record.revoked)
    }

    /// An action failed on `agent` for infra reasons: count it, and quarantine the agent after
    /// `quarantine_after` in a row, or at once while on probation. Each quarantine in a row
    /// lasts twice as long as the one before, up to `quarantine_max_ms`.
    pub(super) fn agent_infra_failure(
        &mut self,
        agent: &AgentId,
        why: &str,
        now: u64,
    ) -> anyhow::Result<()> {
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
        self.agent_changed(agent, true);
        Ok(())
    }

    /// `agent` ran an action to its end (whatever the command did): its infra-failure count
    /// and any probation are cleared. An action it started before a quarantine that is still
    /// on does not end the quarantine: only work taken on probation proves it healthy.
    pub(super) fn agent_success(&mut self, agent: &AgentId, now: u64) -> anyhow::Result<()> {
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
        self.agent_changed(agent, true);
        Ok(())
    }
}

/// Length of the `n`th quarantine in a row (from 1): the base, doubled per quarantine, capped.
pub fn quarantine_backoff_ms(cfg: &FarmConfig, n: u32) -> u64 {
    let doublings = n.saturating_sub(1).min(32);
    cfg.quarantine_base_ms
        .saturating_mul(1u64 << doublings)
        .min(cfg.quarantine_max_ms)
}
