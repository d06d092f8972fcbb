//! Jobs made of step sets: validation, the step cache (read in the submitter's scopes),
//! sharding by recorded durations, and composing each shard's input root from its steps'
//! trees.
use super::spec::{check_input_tree, MAX_ARGV_BYTES, MAX_PLATFORMS, MAX_TIMEOUT_MS};
use super::{PlanContext, PlanError};
use crate::cas::VerifiedBlob;
use crate::model::*;
use crate::sharding::{self, Item, ShardCount};
use archfarm_proto::{tree, v1, Digest, Platform};
use prost::Message;
use std::collections::{BTreeMap, HashSet};

/// Most steps per platform.
pub const MAX_STEPS: usize = 10_000;
/// Estimate for a work item never seen on any platform.
pub const DEFAULT_ESTIMATE_MS: u64 = 10_000;
/// Default shard target.
pub const DEFAULT_SHARD_TARGET_MS: u64 = 120_000;

fn invalid(m: impl Into<String>) -> PlanError {
    PlanError::Invalid(m.into())
}

/// A validated step set.
pub struct ValidStepSet {
    /// Platform.
    pub platform: Platform,
    /// Steps in submission order.
    pub steps: Vec<StepSpec>,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 200
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks the step sets of a spec (wire form) and converts them.
pub fn validate(spec: &v1::JobSpec) -> Result<Vec<ValidStepSet>, PlanError> {
    if !spec.platforms.is_empty() || !spec.argv.is_empty() {
        return Err(invalid(
            "step_sets: platforms and argv must be empty when step sets are given",
        ));
    }
    if spec.step_sets.len() > MAX_PLATFORMS {
        return Err(invalid(format!(
            "step_sets: at most {} platforms",
            MAX_PLATFORMS
        )));
    }
    let mut out: Vec<ValidStepSet> = Vec::new();
    for set in &spec.step_sets {
        let platform: Platform = set
            .platform
            .parse()
            .map_err(|e| invalid(format!("step_sets: {e}")))?;
        if out.iter().any(|s| s.platform == platform) {
            return Err(invalid(format!("step_sets: {platform} given twice")));
        }
        if set.steps.is_empty() || set.steps.len() > MAX_STEPS {
            return Err(invalid(format!(
                "step_sets: {platform} needs 1 to {MAX_STEPS} steps"
            )));
        }
        let mut names = HashSet::new();
        let mut steps = Vec::new();
        for st in &set.steps {
            let at = format!("step_sets: {platform}: step {:?}", st.name);
            if !valid_name(&st.name) {
                return Err(invalid(format!(
                    "{at}: a name must be 1..200 bytes of [A-Za-z0-9._-], not starting with a dot"
                )));
            }
            if !names.insert(st.name.clone()) {
                return Err(invalid(format!("{at}: given twice")));
            }
            if st.argv.is_empty()
                || st.argv[0].is_empty()
                || st.argv.iter().any(|a| a.contains('\0'))
            {
                return Err(invalid(format!("{at}: argv is empty or contains NUL")));
            }
            let argv_bytes: usize = st.argv.iter().map(|a| a.len() + 1).sum();
            if argv_bytes > MAX_ARGV_BYTES {
                return Err(invalid(format!("{at}: argv is {argv_bytes} bytes")));
            }
            let wd = &st.working_directory;
            if wd.starts_with('/') || wd.split('/').any(|c| c == "..") || wd.contains('\0') {
                return Err(invalid(format!(
                    "{at}: working_directory {wd:?} must stay inside the step"
                )));
            }
            if !st.cache_key.is_empty()
                && (st.cache_key.len() != 64
                    || !st.cache_key.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                return Err(invalid(format!("{at}: cache_key must be 64 hex digits")));
            }
            if st.timeout_ms > MAX_TIMEOUT_MS {
                return Err(invalid(format!(
                    "{at}: timeout_ms {} is more than 24 h",
                    st.timeout_ms
                )));
            }
            if st.history_key.len() > 1024 {
                return Err(invalid(format!(
                    "{at}: history_key is longer than 1024 bytes"
                )));
            }
            let input_root = st
                .input_root
                .as_ref()
                .map(|d| {
                    Digest::from_proto(d).map_err(|e| invalid(format!("{at}: input_root: {e}")))
                })
                .transpose()?;
            steps.push(StepSpec {
                name: st.name.clone(),
                argv: st.argv.clone(),
                working_directory: wd.clone(),
                input_root,
                timeout_ms: st.timeout_ms,
                history_key: st.history_key.clone(),
                cache_key: st.cache_key.to_ascii_lowercase(),
            });
        }
        out.push(ValidStepSet { platform, steps });
    }
    Ok(out)
}

/// Everything a job of step sets becomes: actions to queue (or already final) and the
/// blobs each queued action needs pinned.
pub struct Expansion {
    /// Actions, final ones (cached steps) included.
    pub actions: Vec<ActionRecord>,
    /// Digests to pin per action id.
    pub pins: BTreeMap<ActionId, Vec<Digest>>,
    /// The shards' composed input roots, checked but not stored: the Submit stores them (a
    /// few in the group commit that makes the job durable, [`crate::farm::Farm::stage_blobs`],
    /// so a small job costs no sync of its own; many as a batch of their own).
    pub roots: Vec<VerifiedBlob>,
}

/// Expands validated step sets into actions (blocking: reads trees; the composed roots are
/// returned for the caller to store).
pub fn expand(
    ctx: &PlanContext<'_>,
    job: &super::JobPlan<'_>,
    sets: Vec<ValidStepSet>,
    env: &[(String, String)],
    labels: &Labels,
) -> Result<Expansion, PlanError> {
    let super::JobPlan {
        id: job_id,
        seq,
        spec,
        submitter,
        now,
    } = *job;
    let mut exp = Expansion {
        actions: vec![],
        pins: BTreeMap::new(),
        roots: Vec::new(),
    };
    let count = if spec.shards > 0 {
        ShardCount::Fixed(spec.shards)
    } else {
        ShardCount::Target {
            target_ms: if spec.shard_target_ms == 0 {
                DEFAULT_SHARD_TARGET_MS
            } else {
                spec.shard_target_ms
            },
        }
    };
    // Every shard's composed root, stored by the caller in one batch (a job of 10,000
    // one-step shards would otherwise pay 10,000 fsyncs before its first action is queued),
    // or in the group commit when they are few (1,000 one-action jobs a second would
    // otherwise pay 2,000 syncs of the filesystem, and pile up on blocking threads).
    let mut roots: Vec<VerifiedBlob> = Vec::new();
    let empty_dir = tree::encode_directory(&v1::Directory::default());
    let empty_digest = Digest::of(&empty_dir);
    ctx.cas
        .put(&empty_digest, &empty_dir)
        .map_err(|e| PlanError::Internal(anyhow::anyhow!("store the empty directory: {e}")))?;
    for set in sets {
        let platform = set.platform;
        // The step cache: hits need no agent.
        let mut hits = Vec::new();
        let mut misses = Vec::new();
        for st in set.steps {
            // A job with the network is never answered from the cache (see policy_refusal).
            let hit = if spec.no_cache || spec.network || st.cache_key.is_empty() {
                None
            } else {
                ctx.cache
                    .lookup_step(submitter, &st.cache_key, spec.allow_emulation, now)
                    .map_err(PlanError::Internal)?
            };
            match hit {
                Some((mut r, _)) => {
                    r.name = st.name.clone();
                    hits.push(r);
                }
                None => misses.push(st),
            }
        }
        // The trees of the steps that will run must be stored and well formed.
        let mut step_digests: BTreeMap<String, Vec<Digest>> = BTreeMap::new();
        for st in &misses {
            let digests = match st.input_root {
                Some(r) => check_input_tree(ctx.cas, r)
                    .map_err(|e| e.map_message(|m| format!("step {}: {m}", st.name)))?,
                None => vec![empty_digest],
            };
            step_digests.insert(st.name.clone(), digests);
        }
        let base_spec = |steps: Vec<StepSpec>, input_root: Option<Digest>| ActionSpec {
            argv: vec![],
            env: env.to_vec(),
            working_directory: String::new(),
            input_root,
            platform: platform.clone(),
            required_labels: labels.clone(),
            timeout_ms: spec.timeout_ms,
            allow_emulation: spec.allow_emulation,
            output_paths: vec![],
            no_cache: spec.no_cache,
            steps,
            exclusive: spec.exclusive,
            network: spec.network,
            cache_untrusted: spec.cache_untrusted,
            cache_emulated: spec.cache_emulated,
            submitter: submitter.clone(),
        };
        let record =
            |id: ActionId, spec: ActionSpec| ActionRecord::queued(id, job_id, seq, spec, now);
        if !hits.is_empty() {
            let n = hits.len();
            let result = v1::ExecutionResult {
                outcome: v1::ExecutionOutcome::Exited as i32,
                exit_code: 0,
                message: format!("{n} steps from the step cache"),
                platform: platform.to_string(),
                step_results: hits,
                ..Default::default()
            };
            let mut a = record(
                ActionId(format!("{job_id}/{platform}/cached")),
                base_spec(vec![], None),
            );
            a.state = ActionState::Succeeded;
            a.cached = true;
            a.reason = format!("{n} steps from the step cache");
            a.result = Some(ResultRecord {
                encoded: result.encode_to_vec(),
                fence: 0,
            });
            exp.actions.push(a);
        }
        if misses.is_empty() {
            continue;
        }
        // Shard the misses by recorded durations (median of the known ones for the rest).
        let known: Vec<Option<u64>> = misses
            .iter()
            .map(|st| {
                ctx.store
                    .duration(&platform.to_string(), st.history_item())
                    .map_err(PlanError::Internal)
            })
            .collect::<Result<_, _>>()?;
        let seen: Vec<u64> = known.iter().flatten().copied().collect();
        let estimate = sharding::estimate_ms(&seen, DEFAULT_ESTIMATE_MS);
        let items: Vec<Item> = misses
            .iter()
            .zip(&known)
            .map(|(st, k)| Item {
                name: st.name.clone(),
                expected_ms: k.unwrap_or(estimate),
            })
            .collect();
        for (k, shard) in sharding::shard(&items, count).into_iter().enumerate() {
            let mut steps: Vec<StepSpec> = shard.items.iter().map(|i| misses[*i].clone()).collect();
            // Compose the shard's root: one directory per step, named after it.
            let mut root = v1::Directory::default();
            let mut pins = Vec::new();
            steps.sort_by(|a, b| a.name.cmp(&b.name));
            for st in &steps {
                let d = match st.input_root {
                    Some(r) => r,
                    None => empty_digest,
                };
                root.directories.push(v1::DirectoryNode {
                    name: st.name.clone(),
                    digest: Some(d.to_proto()),
                });
                pins.extend(step_digests.get(&st.name).cloned().unwrap_or_default());
            }
            // Run in the sharder's order (longest first), present the tree sorted.
            let order: Vec<String> = shard
                .items
                .iter()
                .map(|i| misses[*i].name.clone())
                .collect();
            steps.sort_by_key(|s| order.iter().position(|n| n == &s.name));
            let bytes = tree::encode_directory(&root);
            let root_digest = Digest::of(&bytes);
            roots
                .push(VerifiedBlob::check(root_digest, bytes).map_err(|e| {
                    PlanError::Internal(anyhow::anyhow!("check a shard root: {e}"))
                })?);
            pins.push(root_digest);
            let id = ActionId(format!("{job_id}/{platform}/shard-{}", k + 1));
            let mut a = record(id.clone(), base_spec(steps, Some(root_digest)));
            a.predicted_ms = shard.expected_ms;
            // Room for every step's watchdog (or the job's timeout per step) and a minute.
            let budget: u64 = a
                .spec
                .steps
                .iter()
                .map(|s| {
                    if s.timeout_ms > 0 {
                        s.timeout_ms
                    } else {
                        spec.timeout_ms
                    }
                })
                .fold(0, u64::saturating_add);
            a.spec.timeout_ms = budget.saturating_add(60_000).min(MAX_TIMEOUT_MS);
            exp.pins.insert(id, pins);
            exp.actions.push(a);
        }
    }
    exp.roots = roots;
    Ok(exp)
}

/// Answers Jobs.LookupSteps for a job of `submitter`: its own scope, then the shared one.
pub fn lookup(
    ctx: &PlanContext<'_>,
    submitter: &Submitter,
    keys: &[String],
    allow_emulation: bool,
    now: u64,
) -> Result<Vec<v1::StepCacheHit>, PlanError> {
    if keys.len() > 100_000 {
        return Err(invalid("cache_keys: at most 100000 per call"));
    }
    let mut hits = Vec::new();
    for k in keys {
        if k.len() != 64 || !k.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("cache_keys: {k:?} is not 64 hex digits")));
        }
        let key = k.to_ascii_lowercase();
        if let Some((r, e)) = ctx
            .cache
            .lookup_step(submitter, &key, allow_emulation, now)
            .map_err(PlanError::Internal)?
        {
            hits.push(v1::StepCacheHit {
                cache_key: k.clone(),
                result: Some(r),
                platform: e.platform.to_string(),
            });
        }
    }
    Ok(hits)
}
