//! Job planning, the domain behind Jobs.Submit and Jobs.LookupSteps: a submitted spec is
//! checked ([`spec`]), its input trees are checked against the CAS, and it becomes actions,
//! each carrying its submitter, whose cache scopes decide what answers it from the result
//! cache (one action per platform, or the shards of its step sets: [`step_sets`]). Blocking
//! (reads trees and cache entries, hashes blobs): the gRPC shell runs it on a blocking thread,
//! before the farm is locked; the farm then only queues what was planned.
pub mod spec;
pub mod step_sets;

use crate::cas::Cas;
use crate::model::{ActionId, ActionRecord, JobId, Submitter};
use crate::result_cache::ResultCache;
use crate::store::Store;
use archfarm_proto::{v1, Digest};
use std::collections::BTreeMap;
use std::fmt;

/// Why a job cannot be planned.
#[derive(Debug)]
pub enum PlanError {
    /// The spec is wrong; the message names the field.
    Invalid(String),
    /// The spec is fine but something it needs is not there yet (e.g. blobs to upload).
    Precondition(String),
    /// The coordinator failed.
    Internal(anyhow::Error),
}

impl PlanError {
    /// The same error with its message rewritten (e.g. to name the step).
    pub fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            PlanError::Invalid(m) => PlanError::Invalid(f(m)),
            PlanError::Precondition(m) => PlanError::Precondition(f(m)),
            PlanError::Internal(e) => PlanError::Internal(e),
        }
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::Invalid(m) | PlanError::Precondition(m) => f.write_str(m),
            PlanError::Internal(e) => write!(f, "{e:#}"),
        }
    }
}

/// What planning reads.
pub struct PlanContext<'a> {
    /// Recorded durations.
    pub store: &'a Store,
    /// Input trees; composed shard roots are written here.
    pub cas: &'a Cas,
    /// The result cache.
    pub cache: &'a ResultCache,
}

/// The job being planned.
#[derive(Clone, Copy)]
pub struct JobPlan<'a> {
    /// Its id.
    pub id: &'a JobId,
    /// Its sequence number.
    pub seq: u64,
    /// Its spec.
    pub spec: &'a v1::JobSpec,
    /// Who submitted it.
    pub submitter: &'a Submitter,
    /// Now, in Unix ms.
    pub now: u64,
}

/// A planned job: its actions (those answered from the result cache already final) and the
/// blobs each queued action needs pinned.
pub struct Plan {
    /// Actions in spec order.
    pub actions: Vec<ActionRecord>,
    /// Digests to pin per action id.
    pub pins: BTreeMap<ActionId, Vec<Digest>>,
    /// A description for listings when the spec gives none.
    pub description: String,
    /// Blobs the plan composed (shard roots), checked and not yet stored: the caller stores
    /// them before the job is announced (a few through the farm's group commit,
    /// [`crate::farm::Farm::stage_blobs`]; many as a CAS batch of their own).
    pub blobs: Vec<crate::cas::VerifiedBlob>,
}

/// Plans the actions of a spec checked by [`spec::validate_spec`] (`valid`), answering what
/// it can from the result cache in the submitter's scopes.
pub fn plan_job(
    ctx: &PlanContext<'_>,
    job: &JobPlan<'_>,
    valid: spec::ValidSpec,
) -> Result<Plan, PlanError> {
    let spec = job.spec;
    if !spec.step_sets.is_empty() {
        let sets = step_sets::validate(spec)?;
        let exp = step_sets::expand(ctx, job, sets, &valid.env, &valid.labels)?;
        let steps: usize = spec.step_sets.iter().map(|s| s.steps.len()).sum();
        return Ok(Plan {
            actions: exp.actions,
            pins: exp.pins,
            blobs: exp.roots,
            description: format!("{steps} steps on {} platforms", spec.step_sets.len()),
        });
    }
    let input_digests = match valid.input_root {
        Some(root) => spec::check_input_tree(ctx.cas, root)?,
        None => vec![],
    };
    let mut actions = spec::plan_actions(spec, &valid, job.submitter, job.id, job.seq, job.now);
    for a in &mut actions {
        ctx.cache.answer(a, job.now).map_err(PlanError::Internal)?;
    }
    let pins = actions
        .iter()
        .map(|a| (a.id.clone(), input_digests.clone()))
        .collect();
    Ok(Plan {
        actions,
        pins,
        description: spec.argv.join(" ").chars().take(200).collect(),
        blobs: Vec::new(),
    })
}
