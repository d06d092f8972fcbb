//! The result cache: results of actions (keyed by their ActionKey digest) and of steps (keyed
//! by the client's step cache key), each in a scope (see `cache_scope`): recorded only from
//! what an agent reported under a valid lease — by default only from trusted agents running
//! natively — into the submitter's write scope, and handed out only while the entry decodes
//! and every blob it names is stored intact. Lookups read and hash those blobs, and writes go
//! through the group commit, so neither happens under the farm's lock.
use crate::cas::Cas;
use crate::model::{
    ActionRecord, ActionSpec, ActionState, CacheEntry, CacheKey, CacheOrigin, CacheScope,
    CacheWrite, ResultRecord, Submitter,
};
use crate::store::Store;
use archfarm_proto::{tree, v1, Digest};
use prost::Message;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

const HOUR_MS: u64 = 3600 * 1000;
/// Most lookups remembered for the last-hour ratio.
const WINDOW_MAX: usize = 1_000_000;

/// Result-cache figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheFigures {
    /// Lookups in the last hour.
    pub lookups_last_hour: u64,
    /// Hits in the last hour.
    pub hits_last_hour: u64,
    /// Lookups ever.
    pub lookups_total: u64,
    /// Hits ever.
    pub hits_total: u64,
    /// Entries stored.
    pub entries: u64,
}

/// Why the cache policy keeps a result out of the cache, if it does: only results of trusted
/// agents running natively are stored, unless the job asked for more (`cache_untrusted`,
/// `cache_emulated`). A result from an agent nobody vouched for would otherwise answer every
/// later client, and one produced under emulation may differ from a native run. A result of
/// an action that had the network is never stored: what it fetched may differ next time.
pub fn policy_refusal(spec: &ActionSpec, trusted: bool, emulated: bool) -> Option<&'static str> {
    if spec.network {
        return Some("the action had the network, so its result may not repeat");
    }
    if !trusted && !spec.cache_untrusted {
        return Some("the agent is not trusted (its token lacked trusted=true) and the job did not ask for cache_untrusted");
    }
    if emulated && !spec.cache_emulated {
        return Some("it ran under emulation and the job did not ask for cache_emulated");
    }
    None
}

/// A result as an agent reported it, to be recorded.
pub struct Reported<'a> {
    /// The encoded ExecutionResult (action keys) or StepResult (step keys).
    pub encoded: &'a [u8],
    /// Blobs it names directly.
    pub blobs: Vec<Digest>,
    /// Every blob of its output directory trees, walked before the farm was locked (see
    /// [`ResultCache::output_tree_blobs`]), or why they could not be.
    pub tree_blobs: &'a Result<Vec<Digest>, String>,
}

/// Whether `encoded` decodes as what an entry under `key` holds.
fn decodes(key: CacheKey<'_>, encoded: &[u8]) -> Result<(), prost::DecodeError> {
    match key {
        CacheKey::Action(_) => v1::ExecutionResult::decode(encoded).map(drop),
        CacheKey::Step(_) => v1::StepResult::decode(encoded).map(drop),
    }
}

/// The wire form of a cache origin.
pub fn origin_to_proto(o: &CacheOrigin) -> v1::CacheOrigin {
    v1::CacheOrigin {
        scope: o.scope.to_string(),
        submitter: o.submitter.clone(),
        action_id: o.action.to_string(),
        agent_id: o.agent.to_string(),
        emulated: o.emulated,
        trusted_agent: o.trusted_agent,
        recorded_unix_ms: o.recorded_unix_ms,
    }
}

/// The result cache over the store and the CAS.
pub struct ResultCache {
    store: Store,
    cas: Arc<Cas>,
    /// (unix ms, hit) of recent lookups, for the last-hour ratio.
    window: Mutex<VecDeque<(u64, bool)>>,
}

impl ResultCache {
    /// The cache kept in `store`, naming blobs of `cas`.
    pub fn new(store: Store, cas: Arc<Cas>) -> Self {
        Self {
            store,
            cas,
            window: Mutex::default(),
        }
    }

    /// The stored result for a key in the first of `scopes` that holds a usable one: its
    /// provenance suits the job (a result produced under emulation never answers a job that
    /// forbids emulation), it decodes, and every blob it names is still stored intact (each
    /// is read and hashed: a hit must never hand out a corrupt output). An entry that fails
    /// to decode or verify is a miss with one WARN naming the key. Blocking: run it outside
    /// the farm's lock.
    pub fn lookup(
        &self,
        scopes: &[CacheScope],
        key: CacheKey<'_>,
        allow_emulation: bool,
        now: u64,
    ) -> anyhow::Result<Option<(CacheScope, CacheEntry)>> {
        let mut usable = None;
        for scope in scopes {
            let Some(e) = self.store.cache_entry(scope, key)? else {
                continue;
            };
            if e.emulated && !allow_emulation {
                continue;
            }
            if let Err(err) = decodes(key, &e.encoded) {
                tracing::warn!(?key, %scope, "result cache entry ignored (a miss): its result does not decode: {err}");
                continue;
            }
            if let Some(bad) = e.blobs.iter().find(|d| !self.cas.verify(d)) {
                tracing::warn!(?key, %scope, "result cache entry ignored (a miss): blob {bad} it names is missing or corrupt");
                continue;
            }
            usable = Some((scope.clone(), e));
            break;
        }
        self.store.add_counter("cache_lookups", 1)?;
        if usable.is_some() {
            self.store.add_counter("cache_hits", 1)?;
        }
        if let Ok(mut w) = self.window.lock() {
            w.push_back((now, usable.is_some()));
            if w.len() > WINDOW_MAX {
                w.pop_front();
            }
        }
        Ok(usable)
    }

    /// The cached result of a step for a job of `submitter`, decoded, marked cached and
    /// carrying its origin.
    pub fn lookup_step(
        &self,
        submitter: &Submitter,
        key: &str,
        allow_emulation: bool,
        now: u64,
    ) -> anyhow::Result<Option<(v1::StepResult, CacheEntry)>> {
        let scopes = submitter.read_scopes();
        let Some((scope, e)) = self.lookup(&scopes, CacheKey::Step(key), allow_emulation, now)?
        else {
            return Ok(None);
        };
        // `lookup` checked that it decodes.
        let mut r = v1::StepResult::decode(e.encoded.as_slice())?;
        r.cached = true;
        r.cache_origin = Some(origin_to_proto(&e.origin(&scope)));
        Ok(Some((r, e)))
    }

    /// Completes a queued action from the cache when its result is there (and the job did not
    /// ask for `no_cache` or the network); returns whether it did. Reads the submitter's own
    /// scope, then the shared one.
    pub fn answer(&self, a: &mut ActionRecord, now: u64) -> anyhow::Result<bool> {
        if a.spec.no_cache || a.spec.network || a.action_digest.is_empty() {
            return Ok(false);
        }
        let key = CacheKey::Action(&a.action_digest);
        let scopes = a.spec.submitter.read_scopes();
        let Some((scope, e)) = self.lookup(&scopes, key, a.spec.allow_emulation, now)? else {
            return Ok(false);
        };
        let origin = e.origin(&scope);
        a.state = ActionState::Succeeded;
        a.cached = true;
        a.reason = format!("cached result: {origin}");
        a.last_agent = Some((e.agent, e.emulated));
        a.cache_origin = Some(origin);
        a.result = Some(ResultRecord {
            encoded: e.encoded,
            fence: 0,
        });
        Ok(true)
    }

    /// Every blob of the output directory trees rooted at `roots` (directories and files),
    /// or why they cannot all be read. Blocking (reads every directory of the trees): the
    /// session runs it before it locks the farm.
    pub fn output_tree_blobs(&self, roots: &[Digest]) -> Result<Vec<Digest>, String> {
        let mut blobs = Vec::new();
        for root in roots {
            match tree::walk_tree(*root, |d| self.cas.get(d).ok().flatten()) {
                Ok((dirs, files)) => blobs.extend(dirs.into_keys().chain(files)),
                Err(e) => return Err(format!("output tree {root} is incomplete: {e}")),
            }
        }
        Ok(blobs)
    }

    /// What to write for a result reported under `a`'s lease by an agent (`trusted`: joined
    /// with `trusted=true`): the scope of the action's submitter, if the cache policy allows
    /// it and every blob it names is stored; else why not. Decides only (the in-memory blob
    /// index, no disk): the farm queues the write for its next group commit.
    pub fn decide(
        &self,
        key: CacheKey<'_>,
        a: &ActionRecord,
        trusted: bool,
        result: Reported<'_>,
        now: u64,
    ) -> Result<CacheWrite, String> {
        let Reported {
            encoded,
            mut blobs,
            tree_blobs,
        } = result;
        let Some((agent, emulated)) = a.last_agent.clone() else {
            return Err("no agent ran it".into());
        };
        let Some(scope) = a.spec.submitter.write_scope() else {
            return Err("the action was submitted before cache scopes existed".into());
        };
        if let Some(why) = policy_refusal(&a.spec, trusted, emulated) {
            return Err(why.into());
        }
        match tree_blobs {
            Ok(t) => blobs.extend(t.iter().copied()),
            Err(why) => return Err(why.clone()),
        }
        if let Some(missing) = blobs.iter().find(|d| !self.cas.contains(d)) {
            return Err(format!("blob {missing} named by the result is not stored"));
        }
        blobs.sort();
        blobs.dedup();
        let (step, key) = match key {
            CacheKey::Action(k) => (false, k.to_owned()),
            CacheKey::Step(k) => (true, k.to_owned()),
        };
        Ok(CacheWrite {
            step,
            key,
            entry: CacheEntry {
                encoded: encoded.to_vec(),
                agent,
                platform: a.spec.platform.clone(),
                emulated,
                trusted,
                scope,
                submitter: a.spec.submitter.name.clone(),
                action: a.id.clone(),
                recorded_unix_ms: now,
                blobs,
            },
        })
    }

    /// Lookups and hits, last hour and ever, and the number of entries.
    pub fn figures(&self, now: u64) -> anyhow::Result<CacheFigures> {
        let (lookups_last_hour, hits_last_hour) = match self.window.lock() {
            Ok(mut w) => {
                while w.front().is_some_and(|(t, _)| *t + HOUR_MS < now) {
                    w.pop_front();
                }
                (w.len() as u64, w.iter().filter(|(_, h)| *h).count() as u64)
            }
            Err(_) => (0, 0),
        };
        Ok(CacheFigures {
            lookups_last_hour,
            hits_last_hour,
            lookups_total: self.store.counter("cache_lookups")?,
            hits_total: self.store.counter("cache_hits")?,
            entries: self.store.cache_entries() as u64,
        })
    }
}
