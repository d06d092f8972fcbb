//! The Jobs service: submit (validated field by field), watch, get, cancel, farm status.
use super::auth::{authorize, authorize_stream};
use super::convert::{action_status, agent_state, job_status, labels_to_proto, update_to_event};
use super::{internal, SharedRef};
use crate::hubs::JobUpdate;
use crate::model::*;
use archfarm_proto::v1::{self, jobs_server::Jobs};
use archfarm_proto::{tree, Digest, Platform};
use prost::Message;
use std::collections::BTreeMap;
use std::pin::Pin;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status};

/// The Jobs service.
pub struct JobsService(pub SharedRef);

/// Limits on a submitted job.
pub const MAX_PLATFORMS: usize = 16;
/// Total bytes of argv.
pub const MAX_ARGV_BYTES: usize = 128 * 1024;
/// Total bytes of env names and values.
pub const MAX_ENV_BYTES: usize = 64 * 1024;
/// Shortest timeout.
pub const MIN_TIMEOUT_MS: u64 = 1_000;
/// Longest timeout.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

fn invalid(m: impl Into<String>) -> Status {
    Status::invalid_argument(m.into())
}

/// A checked job spec.
pub struct ValidSpec {
    /// Platforms in submission order.
    pub platforms: Vec<Platform>,
    /// Sorted env.
    pub env: Vec<(String, String)>,
    /// Labels.
    pub labels: Labels,
    /// Input root.
    pub input_root: Option<Digest>,
    /// Declared outputs, sorted and unique.
    pub output_paths: Vec<String>,
}

/// Most declared outputs per job.
pub const MAX_OUTPUTS: usize = 256;

/// Checks a declared output path: relative, "/"-separated, no empty, "." or ".." parts.
pub fn check_output_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 1024 {
        return Err(format!("{p:?} must be 1 to 1024 bytes"));
    }
    if p.starts_with('/') || p.contains('\0') {
        return Err(format!("{p:?} must be relative"));
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("{p:?} may not have empty, \".\" or \"..\" parts"));
    }
    Ok(())
}

/// Checks every field of a job spec that needs no store; the message names the field.
pub fn validate_spec(spec: &v1::JobSpec) -> Result<ValidSpec, Status> {
    let steps = !spec.step_sets.is_empty();
    if spec.platforms.is_empty() && !steps {
        return Err(invalid("platforms: at least one platform is required"));
    }
    if spec.platforms.len() > MAX_PLATFORMS {
        return Err(invalid(format!("platforms: at most {MAX_PLATFORMS}")));
    }
    let mut platforms = Vec::new();
    for p in &spec.platforms {
        let platform: Platform = p.parse().map_err(|e| invalid(format!("platforms: {e}")))?;
        if platforms.contains(&platform) {
            return Err(invalid(format!("platforms: {platform} given twice")));
        }
        platforms.push(platform);
    }
    if !steps && (spec.argv.is_empty() || spec.argv[0].is_empty()) {
        return Err(invalid("argv: a command is required (argv is empty)"));
    }
    let argv_bytes: usize = spec.argv.iter().map(|a| a.len() + 1).sum();
    if argv_bytes > MAX_ARGV_BYTES {
        return Err(invalid(format!(
            "argv: {argv_bytes} bytes, more than the limit of {MAX_ARGV_BYTES}"
        )));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("argv: arguments may not contain NUL"));
    }
    let mut env = BTreeMap::new();
    let mut env_bytes = 0;
    for e in &spec.env {
        let name_ok = !e.name.is_empty()
            && e.name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
            && e.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(invalid(format!(
                "env: {:?} is not a variable name ([A-Za-z_][A-Za-z0-9_]*)",
                e.name
            )));
        }
        if e.value.contains('\0') {
            return Err(invalid(format!("env: value of {} contains NUL", e.name)));
        }
        env_bytes += e.name.len() + e.value.len() + 2;
        if env.insert(e.name.clone(), e.value.clone()).is_some() {
            return Err(invalid(format!("env: {} given twice", e.name)));
        }
    }
    if env_bytes > MAX_ENV_BYTES {
        return Err(invalid(format!(
            "env: {env_bytes} bytes, more than the limit of {MAX_ENV_BYTES}"
        )));
    }
    if !(MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS).contains(&spec.timeout_ms) {
        return Err(invalid(format!(
            "timeout_ms: {} is outside {MIN_TIMEOUT_MS}..={MAX_TIMEOUT_MS} (1 s to 24 h)",
            spec.timeout_ms
        )));
    }
    let wd = &spec.working_directory;
    if wd.starts_with('/') || wd.split('/').any(|c| c == "..") || wd.contains('\0') {
        return Err(invalid(format!(
            "working_directory: {wd:?} must be relative and stay inside the input root"
        )));
    }
    if spec.description.len() > 1024 {
        return Err(invalid("description: longer than 1024 bytes"));
    }
    let labels = super::admin::parse_labels(&spec.required_labels)
        .map_err(|s| invalid(format!("required_labels: {}", s.message())))?;
    let input_root = spec
        .input_root
        .as_ref()
        .map(|d| Digest::from_proto(d).map_err(|e| invalid(format!("input_root: {e}"))))
        .transpose()?;
    if spec.output_paths.len() > MAX_OUTPUTS {
        return Err(invalid(format!("output_paths: at most {MAX_OUTPUTS}")));
    }
    let mut output_paths = Vec::new();
    for p in &spec.output_paths {
        check_output_path(p).map_err(|e| invalid(format!("output_paths: {e}")))?;
        output_paths.push(p.clone());
    }
    output_paths.sort();
    output_paths.dedup();
    Ok(ValidSpec {
        platforms,
        env: env.into_iter().collect(),
        labels,
        input_root,
        output_paths,
    })
}

/// The actions of a validated job spec without steps, one per platform, queued at `now`, each
/// with its action cache key. Pure: the fuzz target for job specs runs it.
pub fn plan_actions(
    spec: &v1::JobSpec,
    valid: &ValidSpec,
    job_id: &JobId,
    seq: u64,
    now: u64,
) -> Vec<ActionRecord> {
    valid
        .platforms
        .iter()
        .map(|p| {
            let action = ActionSpec {
                argv: spec.argv.iter().map(|a| expand_arg(a, p)).collect(),
                env: valid.env.clone(),
                working_directory: spec.working_directory.clone(),
                input_root: valid.input_root,
                platform: p.clone(),
                required_labels: valid.labels.clone(),
                timeout_ms: spec.timeout_ms,
                allow_emulation: spec.allow_emulation,
                output_paths: valid.output_paths.clone(),
                no_cache: spec.no_cache,
                steps: vec![],
                exclusive: spec.exclusive,
                network: spec.network,
                cache_untrusted: spec.cache_untrusted,
                cache_emulated: spec.cache_emulated,
            };
            let mut a = ActionRecord::queued(ActionId::new(job_id, p), job_id, seq, action, now);
            a.action_digest = super::convert::action_digest(&a.spec).hex();
            a
        })
        .collect()
}

/// Replaces `{os}`, `{arch}` and `{variant}` with the platform's parts.
pub fn expand_arg(arg: &str, p: &Platform) -> String {
    arg.replace("{os}", p.os())
        .replace("{arch}", p.arch())
        .replace("{variant}", p.variant().unwrap_or(""))
}

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
        authorize(&self.0, &req, &[Role::Client])?;
        let r = req.into_inner();
        let (keys, allow) = (r.cache_keys, r.allow_emulation);
        let (shared, now) = (self.0.clone(), self.0.now());
        let hits = tokio::task::spawn_blocking(move || {
            super::step_sets::lookup(&shared, &keys, allow, now)
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
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| invalid("spec: missing"))?;
        let valid = validate_spec(&spec)?;
        let sets = if spec.step_sets.is_empty() {
            None
        } else {
            Some(super::step_sets::validate(&spec)?)
        };
        let now = shared.now();
        let seq = shared.store.next_counter("job").map_err(internal)?;
        let job_id = JobId(format!("j-{seq:06}"));
        let (actions, pins, description) = match sets {
            Some(sets) => {
                let (s, j, sp) = (shared.clone(), job_id.clone(), spec.clone());
                let exp = tokio::task::spawn_blocking(move || {
                    super::step_sets::expand(&s, &j, seq, &sp, sets, &valid.env, &valid.labels, now)
                })
                .await
                .map_err(|e| Status::internal(format!("step expansion failed: {e}")))??;
                let steps: usize = spec.step_sets.iter().map(|s| s.steps.len()).sum();
                let description = format!("{steps} steps on {} platforms", spec.step_sets.len());
                (exp.actions, exp.pins, description)
            }
            None => {
                let input_digests = match valid.input_root {
                    Some(root) => {
                        let s = shared.clone();
                        tokio::task::spawn_blocking(move || check_input_tree(&s, root))
                            .await
                            .map_err(|e| Status::internal(format!("input check failed: {e}")))??
                    }
                    None => vec![],
                };
                let actions = plan_actions(&spec, &valid, &job_id, seq, now);
                // The result cache answers what it can before the farm is locked (a lookup
                // reads and hashes every blob the stored result names).
                let cache = shared.cache.clone();
                let actions = tokio::task::spawn_blocking(move || {
                    let mut actions = actions;
                    for a in &mut actions {
                        cache.answer(a, now)?;
                    }
                    anyhow::Ok(actions)
                })
                .await
                .map_err(|e| Status::internal(format!("cache lookup failed: {e}")))?
                .map_err(internal)?;
                let pins = actions
                    .iter()
                    .map(|a| (a.id.clone(), input_digests.clone()))
                    .collect();
                (
                    actions,
                    pins,
                    spec.argv.join(" ").chars().take(200).collect(),
                )
            }
        };
        let job = JobRecord {
            id: job_id.clone(),
            seq,
            spec: spec.encode_to_vec(),
            submitter: who.name.clone(),
            submitted_unix_ms: now,
            actions: actions.iter().map(|a| a.id.clone()).collect(),
            description: if spec.description.is_empty() {
                description
            } else {
                spec.description.clone()
            },
            finished: false,
        };
        shared
            .farm()?
            .submit(job, actions, &pins, now)
            .map_err(internal)?;
        shared.commit().await?;
        tracing::info!(job = %job_id, by = %who.name, "job submitted");
        Ok(Response::new(v1::SubmitResponse { job_id: job_id.0 }))
    }

    type WatchStream = EventStream;

    async fn watch(&self, req: Request<v1::WatchRequest>) -> Result<Response<EventStream>, Status> {
        let shared = self.0.clone();
        let (_, guard) = authorize_stream(&shared, &req, &[Role::Client])?;
        let r = req.into_inner();
        let id = JobId(r.job_id);
        let (job, actions) = load_job(&shared, &id)?;
        let (sub, epoch) = {
            let mut farm = shared.farm()?;
            let epoch = farm.started_unix_ms();
            let sub = match farm.hubs().subscribe_existing(&id) {
                Some(sub) => Some(sub),
                // Long finished: the stored states and results (output is in the CAS).
                None if job.finished => None,
                // Active, but this coordinator process has no hub for it (it restarted since
                // the submit): open one that starts with the stored state of every action,
                // read under the farm's lock so that no change falls between that state and
                // the live feed, and every later watcher of this process gets it numbered.
                None => {
                    // Only durable state is shown: flush what the committer has not yet.
                    shared.store.flush().map_err(internal)?;
                    let (now, stored) = load_job(&shared, &id)?;
                    let hubs = farm.hubs();
                    hubs.open(&id);
                    for a in stored {
                        hubs.publish(&id, JobUpdate::Action(Box::new(a)));
                    }
                    if now.finished {
                        hubs.publish(&id, JobUpdate::Finished(id.clone()));
                    }
                    Some(hubs.subscribe(&id))
                }
            };
            (sub, epoch)
        };
        let (mut first, live) = match sub {
            Some(crate::hubs::Subscription { history, live }) => (history, Some(live)),
            None => (Vec::new(), None),
        };
        // No hub (finished long ago): the stored state, unnumbered.
        if first.is_empty() {
            first = actions
                .into_iter()
                .map(|a| (0, JobUpdate::Action(Box::new(a))))
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
        let now = self.0.now();
        let cancelled = self
            .0
            .farm()?
            .cancel_job(&JobId(r.job_id.clone()), &reason, now)?;
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

/// Checks that the input tree is well formed and every blob it names is stored; returns
/// every digest of the tree (directories and files).
pub fn check_input_tree(shared: &SharedRef, root: Digest) -> Result<Vec<Digest>, Status> {
    let (dirs, files) =
        tree::walk_tree(root, |d| shared.cas.get(d).ok().flatten()).map_err(|e| match e {
            tree::TreeError::MissingDirectory { .. } => {
                Status::failed_precondition(format!("input_root: {e}; upload the tree first"))
            }
            e => invalid(format!("input_root: {e}")),
        })?;
    let missing: Vec<&Digest> = files.iter().filter(|d| !shared.cas.contains(d)).collect();
    if let Some(first) = missing.first() {
        return Err(Status::failed_precondition(format!(
            "input_root: {} file blobs are not in the store (e.g. {first}); upload them first",
            missing.len()
        )));
    }
    Ok(dirs.into_keys().chain(files).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> v1::JobSpec {
        v1::JobSpec {
            platforms: vec!["linux/amd64".into()],
            argv: vec!["true".into()],
            timeout_ms: 60_000,
            ..Default::default()
        }
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        type Mutate = Box<dyn Fn(&mut v1::JobSpec)>;
        let cases: Vec<(&str, Mutate, &str)> = vec![
            (
                "empty argv",
                Box::new(|s| s.argv.clear()),
                "argv: a command is required",
            ),
            (
                "empty program",
                Box::new(|s| s.argv = vec![String::new()]),
                "argv: a command is required",
            ),
            (
                "unknown platform",
                Box::new(|s| s.platforms = vec!["linux/mips".into()]),
                "unknown platform \"linux/mips\"",
            ),
            (
                "no platform",
                Box::new(|s| s.platforms.clear()),
                "platforms: at least one",
            ),
            (
                "duplicate platform",
                Box::new(|s| s.platforms.push("linux/amd64".into())),
                "linux/amd64 given twice",
            ),
            (
                "zero timeout",
                Box::new(|s| s.timeout_ms = 0),
                "timeout_ms: 0 is outside",
            ),
            (
                "absurd timeout",
                Box::new(|s| s.timeout_ms = 90 * 24 * 3600 * 1000),
                "timeout_ms",
            ),
            (
                "oversized env",
                Box::new(|s| {
                    s.env = vec![v1::EnvVar {
                        name: "BIG".into(),
                        value: "x".repeat(100_000),
                    }]
                }),
                "env: 100005 bytes",
            ),
            (
                "bad env name",
                Box::new(|s| {
                    s.env = vec![v1::EnvVar {
                        name: "A=B".into(),
                        value: String::new(),
                    }]
                }),
                "not a variable name",
            ),
            (
                "escaping workdir",
                Box::new(|s| s.working_directory = "../x".into()),
                "working_directory",
            ),
            (
                "bad digest",
                Box::new(|s| {
                    s.input_root = Some(v1::Digest {
                        hash: "zz".into(),
                        size_bytes: 1,
                    })
                }),
                "input_root",
            ),
        ];
        for (what, mutate, expect) in cases {
            let mut s = spec();
            mutate(&mut s);
            let e = validate_spec(&s)
                .err()
                .unwrap_or_else(|| panic!("{what} accepted"));
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}");
            assert!(e.message().contains(expect), "{what}: {}", e.message());
        }
        assert!(validate_spec(&spec()).is_ok());
    }

    #[test]
    fn expands_platform_placeholders() {
        let p: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!(
            expand_arg("./{os}/{arch}{variant}/hello", &p),
            "./linux/armv7/hello"
        );
        let p: Platform = "linux/mips64le".parse().unwrap();
        assert_eq!(
            expand_arg("GOARCH={arch} ./{os}/{arch}{variant}/hello", &p),
            "GOARCH=mips64le ./linux/mips64le/hello"
        );
    }
}
