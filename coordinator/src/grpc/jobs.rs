//! The Jobs service: submit (planned by `planning`), step lookups, watch, get, cancel, farm
//! status.
use super::auth::{authorize, authorize_stream};
use super::convert::{action_status, agent_state, job_status, labels_to_proto, update_to_event};
use super::{internal, SharedRef};
use crate::hubs::JobUpdate;
use crate::model::*;
use crate::planning;
use archfarm_proto::v1::{self, jobs_server::Jobs};
use prost::Message;
use std::collections::BTreeMap;
use std::pin::Pin;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

/// Composed blobs of one Submit that the group commit stores; a plan with more stores its
/// own.
const MAX_BLOBS_IN_COMMIT: usize = 64;

/// The Jobs service.
pub struct JobsService(pub SharedRef);

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::JobEvent, Status>> + Send>>;

fn load_job(shared: &SharedRef, id: &JobId) -> Result<(JobRecord, Vec<ActionRecord>), Status> {
    let job = shared
        .store
        .job(id)
        .map_err(internal)?
        .ok_or_else(|| Status::not_found(format!("job {id} does not exist")))?;
    let actions = job
        .actions
        .iter()
        .map(|a| {
            shared
                .store
                .action(a)
                .map_err(internal)?
                .ok_or_else(|| Status::internal(format!("action {a} of {id} is missing")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((job, actions))
}

fn job_status_of(shared: &SharedRef, id: &JobId) -> Option<v1::JobStatus> {
    load_job(shared, id).ok().map(|(j, a)| job_status(&j, &a))
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn lookup_steps(
        &self,
        req: Request<v1::LookupStepsRequest>,
    ) -> Result<Response<v1::LookupStepsResponse>, Status> {
        let who = authorize(&self.0, &req, &[Role::Client])?;
        let submitter = who.submitter();
        let r = req.into_inner();
        let (keys, allow) = (r.cache_keys, r.allow_emulation);
        let (shared, now) = (self.0.clone(), self.0.now());
        let hits = tokio::task::spawn_blocking(move || {
            planning::step_sets::lookup(&shared.plan_context(), &submitter, &keys, allow, now)
        })
        .await
        .map_err(|e| Status::internal(format!("lookup failed: {e}")))??;
        Ok(Response::new(v1::LookupStepsResponse { hits }))
    }

    async fn submit(
        &self,
        req: Request<v1::SubmitRequest>,
    ) -> Result<Response<v1::SubmitResponse>, Status> {
        let shared = self.0.clone();
        let who = authorize(&shared, &req, &[Role::Client])?;
        let submitter = who.submitter();
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: missing"))?;
        // Refuse a bad spec before it costs a job number.
        let valid = planning::spec::validate_spec(&spec)?;
        let now = shared.now();
        let seq = shared.store.next_counter("job").map_err(internal)?;
        let job_id = JobId(format!("j-{seq:06}"));
        // Planning reads trees and the result cache: on a blocking thread, before the farm is
        // locked.
        let (s, j, sp) = (shared.clone(), job_id.clone(), spec.clone());
        let plan = tokio::task::spawn_blocking(move || {
            let job = planning::JobPlan {
                id: &j,
                seq,
                spec: &sp,
                submitter: &submitter,
                now,
            };
            let mut plan = planning::plan_job(&s.plan_context(), &job, valid)?;
            // Many composed roots are stored here, with the batch's own two syncs, so that
            // the group commit every session waits on never writes thousands of files; a
            // few ride in the group commit, so a one-action job costs no sync of its own.
            if plan.blobs.len() > MAX_BLOBS_IN_COMMIT {
                s.cas.put_batch(&plan.blobs).map_err(|e| {
                    planning::PlanError::Internal(anyhow::anyhow!("store the shard roots: {e}"))
                })?;
                plan.blobs.clear();
            }
            Ok::<_, planning::PlanError>(plan)
        })
        .await
        .map_err(|e| Status::internal(format!("planning the job failed: {e}")))??;
        let job = JobRecord {
            id: job_id.clone(),
            seq,
            spec: spec.encode_to_vec(),
            submitter: who.name.clone(),
            submitted_unix_ms: now,
            actions: plan.actions.iter().map(|a| a.id.clone()).collect(),
            description: if spec.description.is_empty() {
                plan.description
            } else {
                spec.description.clone()
            },
            finished: false,
        };
        {
            let mut farm = shared.farm()?;
            farm.stage_blobs(plan.blobs);
            farm.submit(job, plan.actions, &plan.pins, now)
                .map_err(internal)?;
        }
        shared.commit().await?;
        tracing::info!(job = %job_id, by = %who.name, trusted = who.is_trusted(), "job submitted");
        Ok(Response::new(v1::SubmitResponse { job_id: job_id.0 }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<v1::WatchRequest>) -> Result<Response<EventStream>, Status> {
        let shared = self.0.clone();
        let (_, guard) = authorize_stream(&shared, &req, &[Role::Client])?;
        let r = req.into_inner();
        let id = JobId(r.job_id);
        // The stored job and actions, read (and decoded) before the farm is locked.
        let (job, actions) = {
            let (shared, id) = (shared.clone(), id.clone());
            tokio::task::spawn_blocking(move || load_job(&shared, &id))
                .await
                .map_err(|e| Status::internal(format!("reading the job failed: {e}")))??
        };
        let (sub, epoch, opened) = {
            let mut farm = shared.farm()?;
            let epoch = farm.started_unix_ms();
            let (sub, opened) = match farm.hubs().subscribe_existing(&id) {
                Some(sub) => (Some(sub), false),
                // Long finished: the stored states and results (output is in the CAS).
                None if job.finished => (None, false),
                // Active, but this coordinator process has no hub for it (it restarted since
                // the submit): open one that starts with the current state of every action,
                // taken under the farm's lock so that no change falls between that state and
                // the live feed, and every later watcher of this process gets it numbered.
                // Active actions come from the farm's memory; the rest were final when read
                // above, or finished since (then read again: their final record is stored).
                None => {
                    let mut current = Vec::with_capacity(actions.len());
                    for a in &actions {
                        let live = farm.active_action(&a.id);
                        let now = match live.or_else(|| farm.unwritten_action(&a.id)) {
                            Some(live) => Some(live.clone()),
                            None if a.state.is_final() => Some(a.clone()),
                            // Finished and written between the read above and the lock (a
                            // narrow race of a watch opened after a restart): read again.
                            None => shared.store.action(&a.id).map_err(internal)?,
                        };
                        let missing = || Status::internal(format!("action {} is missing", a.id));
                        current.push(now.ok_or_else(missing)?);
                    }
                    let finished = current.iter().all(|a| a.state.is_final());
                    let hubs = farm.hubs();
                    hubs.open(&id);
                    for a in current {
                        hubs.publish(&id, JobUpdate::Action(std::sync::Arc::new(a)));
                    }
                    if finished {
                        hubs.publish(&id, JobUpdate::Finished(id.clone()));
                    }
                    (Some(hubs.subscribe(&id)), true)
                }
            };
            (sub, epoch, opened)
        };
        if opened {
            // Only durable state is shown: the group commit flushes what the state just
            // published rests on (outside the farm's lock).
            shared.commit_store_writes().await?;
        }
        let (mut first, live) = match sub {
            Some(crate::hubs::Subscription { history, live }) => (history, Some(live)),
            None => (Vec::new(), None),
        };
        // No hub (finished long ago): the stored state, unnumbered.
        if first.is_empty() {
            first = actions
                .into_iter()
                .map(|a| (0, JobUpdate::Action(std::sync::Arc::new(a))))
                .collect();
            if job.finished {
                first.push((0, JobUpdate::Finished(id.clone())));
            }
        }
        // A resumed watch of this same coordinator process skips what it already has.
        let after = if r.epoch == epoch { r.after_seq } else { 0 };
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            // Sends one update; false once the watch is over (finished, or the client left).
            let send = |seq: u64, u: JobUpdate| {
                let (tx, shared) = (tx.clone(), shared.clone());
                async move {
                    if seq != 0 && seq <= after {
                        return true;
                    }
                    let done = matches!(u, JobUpdate::Finished(_));
                    if let Some(mut e) = update_to_event(&u, |j| job_status_of(&shared, j)) {
                        (e.seq, e.epoch) = (seq, epoch);
                        if tx.send(Ok(e)).await.is_err() {
                            return false;
                        }
                    }
                    !done
                }
            };
            for (seq, u) in first {
                if !send(seq, u).await {
                    return;
                }
            }
            let Some(mut live) = live else { return };
            loop {
                match live.recv().await {
                    Ok((seq, u)) => {
                        if !send(seq, u).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(job = %id, "a watcher fell {n} events behind; they are skipped");
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx.send(Err(Status::unavailable("job events ended"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            guard.guard(ReceiverStream::new(rx)),
        )))
    }

    async fn get_job(
        &self,
        req: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobStatus>, Status> {
        authorize(&self.0, &req, &[Role::Client])?;
        let (job, actions) = load_job(&self.0, &JobId(req.into_inner().job_id))?;
        Ok(Response::new(job_status(&job, &actions)))
    }

    async fn cancel_job(
        &self,
        req: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::CancelJobResponse>, Status> {
        let who = authorize(&self.0, &req, &[Role::Client])?;
        let r = req.into_inner();
        let reason = if r.reason.is_empty() {
            format!("cancelled by {}", who.name)
        } else {
            r.reason
        };
        let job = JobId(r.job_id.clone());
        let known = {
            let job = job.clone();
            self.0
                .blocking("read the job", move |store| store.job(&job))
                .await?
        };
        if known.is_none() {
            return Err(Status::not_found(format!("job {job} does not exist")));
        }
        let now = self.0.now();
        let cancelled = self.0.farm()?.cancel_job(&job, &reason, now)?;
        self.0.commit().await?;
        tracing::info!(job = %r.job_id, by = %who.name, cancelled, "job cancelled");
        Ok(Response::new(v1::CancelJobResponse { cancelled }))
    }

    async fn farm_status(
        &self,
        req: Request<v1::FarmStatusRequest>,
    ) -> Result<Response<v1::FarmStatusResponse>, Status> {
        authorize(&self.0, &req, &[Role::Client])?;
        let n = match req.into_inner().recent_jobs {
            0 => 10,
            n => n.min(200) as usize,
        };
        let now = self.0.now();
        let mut resp = {
            let farm = self.0.farm()?;
            let mut agents = Vec::new();
            let usage = farm.slot_usage();
            for a in farm.agents() {
                let (used, held) = usage.get(&a.record.id).cloned().unwrap_or_default();
                let alive = farm.agent_alive(a, now);
                let f = &a.record.facts;
                let q = &a.record.quarantine;
                agents.push(v1::AgentStatus {
                    agent_id: a.record.id.to_string(),
                    hostname: a.record.hostname.clone(),
                    platforms: f
                        .offers
                        .iter()
                        .map(|o| v1::PlatformOffer {
                            platform: o.platform.to_string(),
                            emulated: o.emulated,
                        })
                        .collect(),
                    labels: labels_to_proto(&a.record.labels),
                    state: agent_state(&a.record, alive, used, now) as i32,
                    slots_used: used,
                    slots: f.slots,
                    last_seen_unix_ms: a.record.last_seen_unix_ms,
                    cores: f.cores,
                    memory_bytes: f.memory_bytes,
                    kernel: f.kernel.clone(),
                    free_disk_bytes: f.free_disk_bytes,
                    load_1m: f.load_1m,
                    running_actions: held.iter().map(|x| x.to_string()).collect(),
                    sandbox: f.sandbox.clone(),
                    limits: f.limits.clone(),
                    paused_reason: f.paused_reason.clone(),
                    quarantined_until_unix_ms: if q.quarantines > 0 {
                        q.until_unix_ms
                    } else {
                        0
                    },
                    quarantine_reason: if q.quarantines > 0 {
                        q.reason.clone()
                    } else {
                        String::new()
                    },
                    consecutive_infra_failures: q.consecutive_infra_failures,
                });
            }
            let mut queues: BTreeMap<String, v1::PlatformQueue> = BTreeMap::new();
            let mut running = Vec::new();
            for x in farm.active_actions() {
                let q = queues
                    .entry(x.spec.platform.to_string())
                    .or_insert_with(|| v1::PlatformQueue {
                        platform: x.spec.platform.to_string(),
                        ..Default::default()
                    });
                match x.state {
                    ActionState::Queued => {
                        q.queued += 1;
                        q.oldest_wait_ms =
                            q.oldest_wait_ms.max(now.saturating_sub(x.queued_unix_ms));
                    }
                    ActionState::Running => {
                        q.running += 1;
                        running.push(action_status(x));
                    }
                    _ => {}
                }
            }
            v1::FarmStatusResponse {
                agents,
                queues: queues.into_values().collect(),
                running,
                recent_jobs: vec![],
                coordinator_started_unix_ms: farm.started_unix_ms(),
                stale_results_refused: farm.stale_results_refused(),
                cas: None,
            }
        };
        let cache = self.0.cache.figures(now).map_err(internal)?;
        let cas = self.0.cas.stats();
        resp.cas = Some(v1::CasStats {
            bytes: cas.bytes,
            budget_bytes: cas.budget_bytes,
            blobs: cas.blobs,
            uploaded_bytes: cas.uploaded_bytes,
            deduplicated_bytes: cas.deduplicated_bytes,
            evicted_blobs: cas.evicted_blobs,
            cache_lookups_last_hour: cache.lookups_last_hour,
            cache_hits_last_hour: cache.hits_last_hour,
            cache_lookups_total: cache.lookups_total,
            cache_hits_total: cache.hits_total,
            cache_entries: cache.entries,
        });
        for job in self.0.store.recent_jobs(n).map_err(internal)? {
            let mut states = std::collections::HashMap::new();
            let mut infra_failures = 0;
            for a in &job.actions {
                if let Some(a) = self.0.store.action(a).map_err(internal)? {
                    *states.entry(a.state.name().to_string()).or_insert(0) += 1;
                    infra_failures += a.infra_failed_on.len() as u32;
                }
            }
            resp.recent_jobs.push(v1::JobSummary {
                job_id: job.id.to_string(),
                submitter: job.submitter,
                description: job.description,
                submitted_unix_ms: job.submitted_unix_ms,
                finished: job.finished,
                states,
                infra_failures,
            });
        }
        Ok(Response::new(resp))
    }
}
