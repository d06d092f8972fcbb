//! What the farm announces (commands to agents' sessions, events to jobs' watchers) and the
//! records it changed (actions, jobs, agents, step durations, the fence ceiling), held in an
//! outbox until the group commit makes the changes behind them durable: the committer takes
//! the outbox under the farm's lock, writes and flushes without it ([`Outbox::write`]), then
//! releases it under the lock again. So no store write happens under the farm's lock. One
//! kind of command goes out at once: an assignment whose fence the store's durable ceiling
//! already covers (see [`Farm::send`]).
use super::*;

/// Records the farm changed since the outbox was last taken, each as it is now (a record
/// changed twice is written once), for the committer to write before its flush.
#[derive(Debug, Default)]
pub struct Records {
    /// Actions, final or not (shared with the announcements that carry them).
    pub actions: HashMap<ActionId, Arc<ActionRecord>>,
    /// Jobs.
    pub jobs: HashMap<JobId, JobRecord>,
    /// Step run times to fold into the duration history: (platform, work item, ms).
    pub durations: Vec<(String, String, u64)>,
    /// A new ceiling for the fence counter (every fence handed out is at most this).
    pub fence_ceiling: Option<u64>,
}

impl Records {
    fn is_empty(&self) -> bool {
        self.actions.is_empty()
            && self.jobs.is_empty()
            && self.durations.is_empty()
            && self.fence_ceiling.is_none()
    }

    /// Writes them (the order does not matter: one flush covers them all).
    fn write(&self, store: &Store) -> anyhow::Result<()> {
        if let Some(ceiling) = self.fence_ceiling {
            store.raise_counter("fence", ceiling)?;
        }
        for job in self.jobs.values() {
            store.put_job(job)?;
        }
        for action in self.actions.values() {
            store.put_action(action)?;
        }
        for (platform, item, ms) in &self.durations {
            store.record_duration(platform, item, *ms)?;
        }
        Ok(())
    }
}

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
    /// Actions, jobs, durations and the fence ceiling to write before the flush (the farm
    /// keeps a handle on them until they are released, so it can still answer for an action
    /// that finished and left its memory while the committer writes it).
    pub records: Arc<Records>,
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
            && self.records.is_empty()
            && self.agents.is_empty()
            && self.cache_writes.is_empty()
            && self.blobs.is_empty()
            && !self.needs_flush
    }

    /// Writes the records and result-cache entries it carries, then flushes when it
    /// needs to: the IO of a commit, done by the caller without the farm's lock (commits are
    /// taken and written one at a time, so records reach the store in the order they changed).
    pub fn write(&self, store: &Store, cas: &Cas) -> anyhow::Result<()> {
        if !self.blobs.is_empty() {
            let stored = cas.put_batch(&self.blobs);
            // Readers waiting for them go on, to find them or not.
            cas.pending()
                .settle(self.blobs.iter().map(crate::cas::VerifiedBlob::digest));
            stored.map_err(|e| anyhow::anyhow!("store composed input roots: {e}"))?;
        }
        self.records.write(store)?;
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
    /// [`Outbox::write`] (which makes every change behind it durable: it writes the changed
    /// records, then flushes). Until that outbox is released the farm still reads the records
    /// it carries ([`Farm::unwritten_action`]).
    pub fn take_outbox(&mut self) -> Outbox {
        self.outboxes_taken += 1;
        self.writing = Arc::new(std::mem::take(&mut self.unwritten));
        let agents = std::mem::take(&mut self.dirty_agents)
            .iter()
            .filter_map(|id| self.agents.get(id).map(|a| a.record.clone()))
            .collect();
        Outbox {
            announcements: std::mem::take(&mut self.outbox),
            records: self.writing.clone(),
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
        if Arc::ptr_eq(&self.writing, &outbox.records) {
            self.writing = Arc::default();
        }
        if let Some(ceiling) = outbox.records.fence_ceiling {
            self.fences.made_durable(ceiling);
        }
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

    /// An action's record changed but not yet written to the store (a final one no longer
    /// in the active set lives only here until the committer has written it).
    pub fn unwritten_action(&self, id: &ActionId) -> Option<&ActionRecord> {
        self.unwritten
            .actions
            .get(id)
            .or_else(|| self.writing.actions.get(id))
            .map(|a| &**a)
    }

    /// Holds an action's changed record for the next commit.
    pub(super) fn write_action(&mut self, action: Arc<ActionRecord>) {
        self.unwritten.actions.insert(action.id.clone(), action);
        self.unflushed = true;
    }

    /// Holds a job's changed record for the next commit.
    pub(super) fn write_job(&mut self, job: &JobRecord) {
        self.unwritten.jobs.insert(job.id.clone(), job.clone());
        self.unflushed = true;
    }

    /// Holds a step's run time for the duration history, written by the next commit.
    pub(super) fn write_duration(&mut self, platform: String, item: String, ms: u64) {
        self.unwritten.durations.push((platform, item, ms));
        self.unflushed = true;
    }

    /// The next fence: from memory, reserving a new block ahead of need (its ceiling written
    /// by the next commit).
    pub(super) fn next_fence(&mut self) -> u64 {
        let (fence, raised) = self.fences.next();
        if let Some(ceiling) = raised {
            self.unwritten.fence_ceiling = Some(ceiling);
            self.unflushed = true;
        }
        fence
    }

    /// Holds blobs a plan composed (checked, not yet stored) for the next commit, which
    /// stores them before it flushes. Their actions may be assigned before that: a CAS read
    /// of a staged blob waits for the commit ([`crate::pending_blobs`]).
    pub fn stage_blobs(&mut self, blobs: Vec<crate::cas::VerifiedBlob>) {
        self.cas
            .pending()
            .add(blobs.iter().map(crate::cas::VerifiedBlob::digest));
        self.staged_blobs.extend(blobs);
    }

    /// Holds a command for the agent's current session until the next release, but for an
    /// assignment whose fence the store's durable ceiling covers (no restart hands it out
    /// again): that goes at once. Its lease is not durable yet; a crash before the commit
    /// loses it, the agent's result is then refused in the acknowledgement like a stale one
    /// ([`Farm::completed`]), and the action, if its job was durable, runs again under a new
    /// fence. A composed input root it needs that waits for the commit is waited for by the
    /// CAS read ([`crate::pending_blobs`]). Results, submits and events still wait for the
    /// flush, so nothing acknowledged is ever lost.
    pub(super) fn send(&mut self, agent: &AgentId, cmd: AgentCommand) {
        let Some(s) = self.agents.get(agent).and_then(|a| a.session.as_ref()) else {
            return;
        };
        let now = match &cmd {
            AgentCommand::Assign { fence, .. } => self.fences.durable_covers(*fence),
            _ => false,
        };
        if now {
            // A closed session is noticed by its own task; the lease covers the gap.
            let _ = s.tx.send(cmd);
        } else {
            self.outbox
                .push(Announcement::Agent(agent.clone(), s.conn, cmd));
        }
    }
}
