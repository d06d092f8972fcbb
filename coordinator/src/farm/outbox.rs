//! What the farm announces (commands to agents' sessions, events to jobs' watchers) and the
//! agent records it changed, held in an outbox until the group commit makes the changes
//! behind them durable: the committer takes the outbox under the farm's lock, writes and
//! flushes without it ([`Outbox::write`]), then releases it under the lock again.
use super::*;

/// Something the farm announced, held until a flush makes the change behind it durable.
#[derive(Debug)]
pub(super) enum Announcement {
    /// A command for the agent's session numbered `conn` (dropped if that session is gone).
    Agent(AgentId, u64, AgentCommand),
    /// An event for the watchers of a job whose hub was open when it was made (a hub opened
    /// later starts from the stored state, which already holds the change).
    Job(JobId, JobUpdate),
}

/// Announcements taken out of the farm for release, in order, and the agent records to
/// write before them.
#[derive(Debug)]
pub struct Outbox {
    announcements: Vec<Announcement>,
    /// Agent records changed since the last take, as they are now: written by the committer
    /// (outside the farm's lock), in take order, before the flush.
    pub agents: Vec<AgentRecord>,
    /// Results to write to the result cache before the flush.
    pub cache_writes: Vec<CacheWrite>,
    /// Blobs to store in the CAS (one batch, its own syncs) before anything else.
    pub blobs: Vec<crate::cas::VerifiedBlob>,
    /// The store was written since the last take: flush it before releasing.
    pub needs_flush: bool,
}

impl Outbox {
    /// Nothing to write, flush or release.
    pub fn is_empty(&self) -> bool {
        self.announcements.is_empty()
            && self.agents.is_empty()
            && self.cache_writes.is_empty()
            && self.blobs.is_empty()
            && !self.needs_flush
    }

    /// Writes the agent records and result-cache entries it carries, then flushes when it
    /// needs to: the IO of a commit, done by the caller without the farm's lock (commits are
    /// taken and written one at a time, so records reach the store in the order they changed).
    pub fn write(&self, store: &Store, cas: &Cas) -> anyhow::Result<()> {
        if !self.blobs.is_empty() {
            cas.put_batch(&self.blobs)
                .map_err(|e| anyhow::anyhow!("store composed input roots: {e}"))?;
        }
        for record in &self.agents {
            store.put_agent(record)?;
        }
        for w in &self.cache_writes {
            store.put_cache_entry(&w.entry.scope, w.key(), &w.entry)?;
        }
        if self.needs_flush {
            store.flush()?;
        }
        Ok(())
    }
}

impl Farm {
    /// Holds an event for a job's watchers until the next release.
    pub(super) fn announce(&mut self, job: &JobId, update: JobUpdate) {
        if self.hubs.is_open(job) {
            self.outbox.push(Announcement::Job(job.clone(), update));
        }
    }

    /// Takes what was announced so far, with the changed agent records, to release after
    /// [`Outbox::write`] (which makes every change behind it durable: actions and jobs were
    /// written to the store before they were announced, agent records are written by it).
    pub fn take_outbox(&mut self) -> Outbox {
        self.outboxes_taken += 1;
        let agents = std::mem::take(&mut self.dirty_agents)
            .iter()
            .filter_map(|id| self.agents.get(id).map(|a| a.record.clone()))
            .collect();
        Outbox {
            announcements: std::mem::take(&mut self.outbox),
            agents,
            cache_writes: std::mem::take(&mut self.cache_writes),
            blobs: std::mem::take(&mut self.staged_blobs),
            needs_flush: std::mem::take(&mut self.unflushed),
        }
    }

    /// The number the outbox now filling will have when taken (from 1): every change made
    /// so far is in it or in an earlier one.
    pub fn pending_outbox(&self) -> u64 {
        self.outboxes_taken + 1
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
        outbox.write(&self.store, &self.cas)?;
        self.release(outbox);
        Ok(())
    }

    /// Holds blobs a plan composed (checked, not yet stored) for the next commit, which
    /// stores them before it flushes and announces anything: a job's actions are never
    /// assigned before their composed roots are durable.
    pub fn stage_blobs(&mut self, blobs: Vec<crate::cas::VerifiedBlob>) {
        self.staged_blobs.extend(blobs);
    }

    /// Holds a command for the agent's current session until the next release.
    pub(super) fn send(&mut self, agent: &AgentId, cmd: AgentCommand) {
        if let Some(s) = self.agents.get(agent).and_then(|a| a.session.as_ref()) {
            self.outbox
                .push(Announcement::Agent(agent.clone(), s.conn, cmd));
        }
    }
}
