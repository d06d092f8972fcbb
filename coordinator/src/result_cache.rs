//! The result cache: results of actions (keyed by their ActionKey digest) and of steps (keyed
//! by the client's step cache key), recorded only from what an agent reported under a valid
//! lease — by default only from trusted agents running natively — and handed out only while
//! every blob they name is stored intact. Lookups read and hash those blobs, so they run
//! outside the farm's lock.
use crate::cas::Cas;
use crate::model::{ActionRecord, ActionSpec, ActionState, CacheEntry, CacheKey, ResultRecord};
use crate::store::Store;
use archfarm_proto::{tree, Digest};
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
    /// Roots of output directories: their whole trees are among the blobs a hit needs.
    pub output_trees: &'a [Digest],
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

    /// The stored result for a key, if every blob it names is still stored intact (each is
    /// read and hashed: a hit must never hand out a corrupt output) and its provenance suits
    /// the job: a result produced under emulation never answers a job that forbids emulation.
    pub fn lookup(
        &self,
        key: CacheKey<'_>,
        allow_emulation: bool,
        now: u64,
    ) -> anyhow::Result<Option<CacheEntry>> {
        let usable = self.store.cache_entry(key)?.filter(|e| {
            (!e.emulated || allow_emulation) && e.blobs.iter().all(|d| self.cas.verify(d))
        });
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

    /// Completes a queued action from the cache when its result is there (and the job did not
    /// ask for `no_cache` or the network); returns whether it did.
    pub fn answer(&self, a: &mut ActionRecord, now: u64) -> anyhow::Result<bool> {
        if a.spec.no_cache || a.spec.network || a.action_digest.is_empty() {
            return Ok(false);
        }
        let key = CacheKey::Action(&a.action_digest);
        let Some(e) = self.lookup(key, a.spec.allow_emulation, now)? else {
            return Ok(false);
        };
        a.state = ActionState::Succeeded;
        a.cached = true;
        a.reason = format!(
            "cached result of {} ({}) from {}",
            e.agent,
            if e.emulated { "emulated" } else { "native" },
            e.recorded_unix_ms
        );
        a.last_agent = Some((e.agent, e.emulated));
        a.result = Some(ResultRecord {
            encoded: e.encoded,
            fence: 0,
        });
        Ok(true)
    }

    /// Stores a result reported under `a`'s lease by an agent (`trusted`: joined with
    /// `trusted=true`), if the cache policy allows it and every blob it names is stored.
    /// Returns whether it was stored.
    pub fn record(
        &self,
        key: CacheKey<'_>,
        a: &ActionRecord,
        trusted: bool,
        result: Reported<'_>,
        now: u64,
    ) -> anyhow::Result<bool> {
        let Reported {
            encoded,
            mut blobs,
            output_trees,
        } = result;
        let Some((agent, emulated)) = a.last_agent.clone() else {
            return Ok(false);
        };
        if let Some(why) = policy_refusal(&a.spec, trusted, emulated) {
            tracing::info!(action = %a.id, %agent, "not caching: {why}");
            return Ok(false);
        }
        for root in output_trees {
            match tree::walk_tree(*root, |d| self.cas.get(d).ok().flatten()) {
                Ok((dirs, files)) => blobs.extend(dirs.into_keys().chain(files)),
                Err(e) => {
                    tracing::warn!(action = %a.id, "not caching: output tree {root} is incomplete: {e}");
                    return Ok(false);
                }
            }
        }
        if let Some(missing) = blobs.iter().find(|d| !self.cas.contains(d)) {
            tracing::warn!(action = %a.id, "not caching: blob {missing} named by the result is not stored");
            return Ok(false);
        }
        blobs.sort();
        blobs.dedup();
        let entry = CacheEntry {
            encoded: encoded.to_vec(),
            agent,
            platform: a.spec.platform.clone(),
            emulated,
            trusted,
            recorded_unix_ms: now,
            blobs,
        };
        self.store.put_cache_entry(key, &entry)?;
        Ok(true)
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
