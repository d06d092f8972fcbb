//! What an agent's result does: the lease it must come under (a result no lease could have
//! produced is refused; a stale fence is refused in the acknowledgement; one already recorded
//! is acknowledged again without change), the action's next state, the step durations, and
//! what goes to the result cache (decided here, written by the group commit).
use super::*;

impl Farm {
    /// A result from an agent: recorded once under the current lease, refused otherwise. A
    /// stale fence is refused in the acknowledgement (an agent resends results after a
    /// reconnect, and its lease may have lapsed meanwhile), but a result already recorded
    /// (its acknowledgement lost, or never sent before a restart) is acknowledged again
    /// without change; a result no lease could ever have produced is [`FarmError::Refused`].
    pub fn completed(
        &mut self,
        agent: &AgentId,
        action_id: &ActionId,
        fence: u64,
        c: Completion,
        now: u64,
    ) -> Result<(), FarmError> {
        if matches!(c.stored, StoredRecord::NotRead)
            && self.known_action(action_id, &c.stored).is_none()
        {
            return Err(FarmError::NeedsStored(Box::new(c)));
        }
        if let Some(why) = self.never_leased(action_id, fence, &c.stored) {
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
    fn never_leased(
        &self,
        action_id: &ActionId,
        fence: u64,
        stored: &StoredRecord,
    ) -> Option<String> {
        if self.fences.issued_before_start(fence) {
            // An earlier run issued it, and may have sent its lease before the commit that
            // recorded it and crashed: the agent ran it in good faith, so its result is
            // answered like a stale one (not recorded) and it stops resending it.
            return None;
        }
        let Some(a) = self.known_action(action_id, stored) else {
            return Some(format!("{action_id} does not exist"));
        };
        if a.attempts == 0 {
            return Some(format!("{action_id} was never leased"));
        }
        if fence == 0 || fence > self.fences.issued() {
            return Some(format!("fence {fence} was never issued"));
        }
        None
    }

    /// An action as the farm knows it: active, changed and not yet written, or as the caller
    /// read it from the store.
    fn known_action<'a>(
        &'a self,
        id: &ActionId,
        stored: &'a StoredRecord,
    ) -> Option<&'a ActionRecord> {
        self.active
            .get(id)
            .or_else(|| self.unwritten_action(id))
            .or(match stored {
                StoredRecord::Read(a) => a.as_deref(),
                StoredRecord::NotRead => None,
            })
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
            // Final already: a re-sent result of the lease that finished it, or of one that
            // failed for infra reasons before, is fine.
            let done = self.known_action(action_id, &c.stored).cloned();
            return Ok(match done {
                Some(done)
                    if done.result.as_ref().is_some_and(|r| r.fence == fence)
                        || done.infra_result_fences.contains(&fence) =>
                {
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
                None => {
                    self.stale_results_refused += 1;
                    (
                        false,
                        format!(
                            "{action_id} does not exist (lease {fence} was handed out before \
                             the coordinator restarted and was lost with it)"
                        ),
                    )
                }
            });
        };
        if action.infra_result_fences.contains(&fence) {
            // Its infra error was recorded and the action queued again: sent again.
            return Ok((true, String::new()));
        }
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
            a.infra_result_fences.push(fence);
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
                if a.action_digest.is_empty() {
                    a.cache_write = "not cached: it is made of steps (cached per step)".into();
                } else if !c.cacheable {
                    a.cache_write = "not cached: the result names a malformed digest".into();
                } else {
                    let key = CacheKey::Action(&a.action_digest);
                    let reported = Reported {
                        encoded: &c.encoded,
                        blobs: c.named_blobs.clone(),
                        tree_blobs: &c.output_tree_blobs,
                    };
                    let trusted = self.is_trusted(agent);
                    let decision = self.cache.decide(key, &a, trusted, reported, now);
                    a.cache_write = self.queue_cache_write(&a.id, decision);
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
                let item = spec.history_item().to_string();
                self.write_duration(platform.clone(), item, s.duration_ms);
            }
            let passing = s.exit_code == 0 && !s.timed_out;
            if passing && cacheable && !spec.cache_key.is_empty() && c.cacheable {
                if let Some(out) = s.output {
                    let key = CacheKey::Step(&spec.cache_key);
                    let reported = Reported {
                        encoded: &s.encoded,
                        blobs: vec![out],
                        tree_blobs: &Ok(vec![]),
                    };
                    let decision = self.cache.decide(key, a, trusted, reported, now);
                    self.queue_cache_write(&a.id, decision);
                }
            }
        }
        Ok(())
    }

    /// Queues a result for the result cache (written at the next group commit, before the
    /// flush) or logs why it is not cached; returns what the action's record says of it.
    fn queue_cache_write(
        &mut self,
        action: &ActionId,
        decision: Result<CacheWrite, String>,
    ) -> String {
        match decision {
            Ok(w) => {
                let note = w.entry.scope.to_string();
                self.cache_writes.push(w);
                self.unflushed = true;
                note
            }
            Err(why) => {
                tracing::info!(%action, "not caching: {why}");
                format!("not cached: {why}")
            }
        }
    }
}
