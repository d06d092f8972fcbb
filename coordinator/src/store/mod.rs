//! The only code that touches sled: typed trees for agents, tokens, principals, jobs and
//! actions, counters, and a schema version. Writes become durable at the commit points'
//! [`Store::flush`] (the farm's group commit flushes before anything is announced), so a
//! `kill -9` after a reply loses nothing the reply promised.
use crate::model::{
    ActionId, ActionRecord, AgentId, AgentRecord, CacheEntry, CacheKey, CacheScope, JobId,
    JobRecord, Principal, TokenRecord,
};
use anyhow::{bail, Context};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

#[cfg(test)]
pub mod disk_image;

/// sled's page cache (its default is 1 GiB, which a coordinator running for months fills
/// with the history of finished actions it never reads again). sled counts on-disk bytes,
/// so the memory it takes is a multiple of this.
const CACHE_CAPACITY_BYTES: u64 = 64 << 20;

/// Schema of the records below; bumped on incompatible change.
pub const SCHEMA_VERSION: &str = "2";

/// The coordinator's durable state.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    agents: sled::Tree,
    tokens: sled::Tree,
    principals: sled::Tree,
    jobs: sled::Tree,
    actions: sled::Tree,
    /// Ids of the actions not yet final, so a restart reads only those (not the history).
    unfinished: sled::Tree,
    result_cache: sled::Tree,
    durations: sled::Tree,
}

/// Action and step keys of every scope live in one tree, apart by prefix: the scope first
/// (a principal's entries can never be read as the shared scope's), then the kind (a
/// client-chosen step key can never name an action's entry).
fn cache_key(scope: &CacheScope, key: CacheKey<'_>) -> String {
    let prefix = scope.key_prefix();
    match key {
        CacheKey::Action(k) => format!("{prefix}action/{k}"),
        CacheKey::Step(k) => format!("{prefix}step/{k}"),
    }
}

/// The tree of result-cache entries before scopes existed: any client could write the entry
/// everyone read, so what it holds cannot be trusted; it is dropped on open.
const UNSCOPED_RESULT_CACHE: &str = "result_cache";

fn encode<T: Serialize>(v: &T) -> anyhow::Result<Vec<u8>> {
    serde_json::to_vec(v).context("failed to encode record")
}

fn decode<T: DeserializeOwned>(what: &str, key: &[u8], b: &[u8]) -> anyhow::Result<T> {
    serde_json::from_slice(b).with_context(|| {
        format!(
            "failed to decode {what} record {:?}",
            String::from_utf8_lossy(key)
        )
    })
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        // A store just closed (here, or by a process still exiting) may hold its file lock
        // for a moment while sled's flusher thread ends: wait up to 5 s for it.
        let mut waited = 0;
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .cache_capacity(CACHE_CAPACITY_BYTES)
                .open()
            {
                Ok(db) => break db,
                // sled reports it as ErrorKind::Other with this text.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && waited < 250 =>
                {
                    waited += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("failed to open the state store in {}", dir.display())
                    })
                }
            }
        };
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION.as_bytes() => {}
            Some(v) => bail!(
                "state store {} has schema version {}, this coordinator reads {SCHEMA_VERSION}; \
                 start it on an empty --data-dir (the demo farm: cargo xtask demo --fresh)",
                dir.display(),
                String::from_utf8_lossy(&v)
            ),
        }
        if db.drop_tree(UNSCOPED_RESULT_CACHE)? {
            tracing::warn!(
                "dropped the result cache kept before cache scopes: its entries could have \
                 been written by any client"
            );
        }
        let store = Self {
            agents: db.open_tree("agents")?,
            tokens: db.open_tree("tokens")?,
            principals: db.open_tree("principals")?,
            jobs: db.open_tree("jobs")?,
            actions: db.open_tree("actions")?,
            unfinished: db.open_tree("unfinished_actions")?,
            result_cache: db.open_tree("scoped_results")?,
            durations: db.open_tree("durations")?,
            meta,
            db,
        };
        store.flush()?;
        Ok(store)
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.db.flush().context("failed to flush the state store")?;
        Ok(())
    }

    /// Adds `n` to a persistent counter and returns the new value.
    pub fn add_counter(&self, name: &str, n: u64) -> anyhow::Result<u64> {
        self.update_counter(name, |cur| cur + n)
    }

    /// Raises a persistent counter to at least `to`; returns its value.
    pub fn raise_counter(&self, name: &str, to: u64) -> anyhow::Result<u64> {
        self.update_counter(name, |cur| cur.max(to))
    }

    fn update_counter(&self, name: &str, f: impl Fn(u64) -> u64) -> anyhow::Result<u64> {
        let v = self
            .meta
            .update_and_fetch(format!("counter/{name}"), |old| {
                let cur = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Some(f(cur).to_be_bytes().to_vec())
            })?
            .context("counter vanished")?;
        let arr = <[u8; 8]>::try_from(v.as_ref()).context("bad counter bytes")?;
        Ok(u64::from_be_bytes(arr))
    }

    /// The current value of a persistent counter.
    pub fn counter(&self, name: &str) -> anyhow::Result<u64> {
        self.add_counter(name, 0)
    }

    /// Stores a result cache entry in `scope`.
    pub fn put_cache_entry(
        &self,
        scope: &CacheScope,
        key: CacheKey<'_>,
        e: &CacheEntry,
    ) -> anyhow::Result<()> {
        self.put(&self.result_cache, &cache_key(scope, key), e)
    }
    /// The result cache entry for a key in `scope`. An entry that does not decode is a miss
    /// with one WARN naming it, never an error that fails the job, never a result.
    pub fn cache_entry(
        &self,
        scope: &CacheScope,
        key: CacheKey<'_>,
    ) -> anyhow::Result<Option<CacheEntry>> {
        let k = cache_key(scope, key);
        let Some(bytes) = self.result_cache.get(&k)? else {
            return Ok(None);
        };
        // Only a record that does not decode is a miss; a store that cannot be read is an error.
        match decode::<CacheEntry>("result cache", k.as_bytes(), &bytes) {
            Ok(e) => Ok(Some(e)),
            Err(e) => {
                tracing::warn!(key = %k, "result cache entry ignored (a miss): {e:#}");
                Ok(None)
            }
        }
    }
    /// Writes raw bytes as a cache entry: how the tests damage one.
    #[cfg(test)]
    pub fn put_raw_cache_entry(&self, scope: &CacheScope, key: CacheKey<'_>, raw: &[u8]) {
        self.result_cache
            .insert(cache_key(scope, key), raw)
            .expect("write a raw cache entry");
    }

    /// Records a run of a work item on a platform: the history is a moving average
    /// (new = (old + run) / 2) in milliseconds.
    pub fn record_duration(&self, platform: &str, item: &str, ms: u64) -> anyhow::Result<()> {
        let key = format!("{platform}|{item}");
        let old = self.duration(platform, item)?;
        let new = old.map_or(ms, |o| (o + ms) / 2);
        self.durations.insert(key, &new.to_be_bytes())?;
        Ok(())
    }
    /// The recorded duration of a work item on a platform.
    pub fn duration(&self, platform: &str, item: &str) -> anyhow::Result<Option<u64>> {
        Ok(self
            .durations
            .get(format!("{platform}|{item}"))?
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// Entries in the result cache (actions and steps).
    pub fn cache_entries(&self) -> usize {
        self.result_cache.len()
    }

    /// Returns the next value of a persistent counter (starting at 1).
    pub fn next_counter(&self, name: &str) -> anyhow::Result<u64> {
        self.add_counter(name, 1)
    }

    fn put<T: Serialize>(&self, tree: &sled::Tree, key: &str, v: &T) -> anyhow::Result<()> {
        tree.insert(key, encode(v)?)?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(
        &self,
        what: &str,
        tree: &sled::Tree,
        key: &str,
    ) -> anyhow::Result<Option<T>> {
        tree.get(key)?
            .map(|b| decode(what, key.as_bytes(), &b))
            .transpose()
    }

    fn all<T: DeserializeOwned>(&self, what: &str, tree: &sled::Tree) -> anyhow::Result<Vec<T>> {
        tree.iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(what, &k, &v)
            })
            .collect()
    }

    /// Saves an agent.
    pub fn put_agent(&self, a: &AgentRecord) -> anyhow::Result<()> {
        self.put(&self.agents, a.id.as_str(), a)
    }
    /// Every agent.
    pub fn agents(&self) -> anyhow::Result<Vec<AgentRecord>> {
        self.all("agent", &self.agents)
    }
    /// One agent.
    pub fn agent(&self, id: &AgentId) -> anyhow::Result<Option<AgentRecord>> {
        self.get("agent", &self.agents, id.as_str())
    }

    /// Saves a token.
    pub fn put_token(&self, t: &TokenRecord) -> anyhow::Result<()> {
        self.put(&self.tokens, &t.id, t)
    }
    /// One token.
    pub fn token(&self, id: &str) -> anyhow::Result<Option<TokenRecord>> {
        self.get("token", &self.tokens, id)
    }
    /// Every token, by id.
    pub fn tokens(&self) -> anyhow::Result<Vec<TokenRecord>> {
        self.all("token", &self.tokens)
    }
    /// Changes a token atomically (compare and swap, so two joins cannot both use a
    /// single-use token and a join cannot use a token deleted meanwhile). `change` may run more
    /// than once, on the newest record each time; when it refuses, nothing is written.
    /// Returns None when the token does not exist, else what `change` returned and the record
    /// as written.
    pub fn update_token<E>(
        &self,
        id: &str,
        mut change: impl FnMut(&mut TokenRecord) -> Result<(), E>,
    ) -> anyhow::Result<Option<Result<TokenRecord, E>>> {
        loop {
            let Some(old) = self.tokens.get(id)? else {
                return Ok(None);
            };
            let mut token: TokenRecord = decode("token", id.as_bytes(), &old)?;
            if let Err(refusal) = change(&mut token) {
                return Ok(Some(Err(refusal)));
            }
            let swapped = self
                .tokens
                .compare_and_swap(id, Some(old), Some(encode(&token)?))?;
            if swapped.is_ok() {
                return Ok(Some(Ok(token)));
            }
        }
    }
    /// Removes a token; returns whether it existed.
    pub fn delete_token(&self, id: &str) -> anyhow::Result<bool> {
        Ok(self.tokens.remove(id)?.is_some())
    }

    /// Binds a certificate fingerprint to a principal.
    pub fn put_principal(&self, fingerprint: &str, p: &Principal) -> anyhow::Result<()> {
        self.put(&self.principals, fingerprint, p)
    }
    /// The principal of a certificate fingerprint.
    pub fn principal(&self, fingerprint: &str) -> anyhow::Result<Option<Principal>> {
        self.get("principal", &self.principals, fingerprint)
    }
    /// Every (fingerprint, principal).
    pub fn principals(&self) -> anyhow::Result<Vec<(String, Principal)>> {
        self.principals
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    decode("principal", &k, &v)?,
                ))
            })
            .collect()
    }

    /// Saves a job.
    pub fn put_job(&self, j: &JobRecord) -> anyhow::Result<()> {
        self.put(&self.jobs, j.id.as_str(), j)
    }
    /// One job.
    pub fn job(&self, id: &JobId) -> anyhow::Result<Option<JobRecord>> {
        self.get("job", &self.jobs, id.as_str())
    }
    /// The newest `n` jobs, newest first.
    pub fn recent_jobs(&self, n: usize) -> anyhow::Result<Vec<JobRecord>> {
        self.jobs
            .iter()
            .rev()
            .take(n)
            .map(|kv| {
                let (k, v) = kv?;
                decode("job", &k, &v)
            })
            .collect()
    }

    /// Saves an action.
    pub fn put_action(&self, a: &ActionRecord) -> anyhow::Result<()> {
        self.put(&self.actions, a.id.as_str(), a)?;
        if a.state.is_final() {
            self.unfinished.remove(a.id.as_str())?;
        } else {
            self.unfinished.insert(a.id.as_str(), &[])?;
        }
        Ok(())
    }
    /// One action.
    pub fn action(&self, id: &ActionId) -> anyhow::Result<Option<ActionRecord>> {
        self.get("action", &self.actions, id.as_str())
    }
    /// Every action not yet final.
    pub fn unfinished_actions(&self) -> anyhow::Result<Vec<ActionRecord>> {
        let mut out = Vec::new();
        for key in self.unfinished.iter().keys() {
            let key = key?;
            let id = ActionId(String::from_utf8_lossy(&key).into_owned());
            let a = self
                .action(&id)?
                .with_context(|| format!("unfinished action {id} has no record"))?;
            out.push(a);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn job(seq: u64) -> JobRecord {
        JobRecord {
            id: JobId(format!("j-{seq:06}")),
            seq,
            spec: vec![1, 2, 3],
            submitter: "t".into(),
            submitted_unix_ms: seq,
            actions: vec![],
            description: String::new(),
            finished: false,
        }
    }

    #[test]
    fn only_unfinished_actions_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ActionSpec {
            timeout_ms: 1_000,
            ..ActionSpec::trivial("linux/amd64".parse().unwrap())
        };
        let job = JobId("j-000001".into());
        {
            let s = Store::open(dir.path()).unwrap();
            for (n, state) in [
                ("a", ActionState::Queued),
                ("b", ActionState::Running),
                ("c", ActionState::Queued),
            ] {
                let mut a = ActionRecord::queued(ActionId(n.into()), &job, 1, spec.clone(), 0);
                a.state = state;
                s.put_action(&a).unwrap();
            }
            let mut done = s.action(&ActionId("c".into())).unwrap().unwrap();
            done.state = ActionState::Succeeded;
            s.put_action(&done).unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let ids: Vec<String> = s
            .unfinished_actions()
            .unwrap()
            .into_iter()
            .map(|a| a.id.0)
            .collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert_eq!(
            s.action(&ActionId("c".into())).unwrap().unwrap().state,
            ActionState::Succeeded
        );
    }

    #[test]
    fn a_store_still_closing_elsewhere_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let closer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        // Opened while the first still holds the lock: it waits instead of failing.
        let second = Store::open(dir.path());
        closer.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    #[test]
    fn a_token_update_sees_the_newest_record_and_refusals_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let token = TokenRecord {
            id: "abcdef".into(),
            secret_hash: String::new(),
            labels: Labels::new(),
            expires_unix_ms: 10,
            single_use: true,
            uses: 0,
            description: String::new(),
            created_unix_ms: 0,
        };
        s.put_token(&token).unwrap();
        let use_once = |t: &mut TokenRecord| {
            if t.single_use && t.uses > 0 {
                return Err("used");
            }
            t.uses += 1;
            Ok(())
        };
        let first = s.update_token("abcdef", use_once).unwrap().unwrap();
        assert_eq!(first.unwrap().uses, 1);
        assert!(matches!(
            s.update_token("abcdef", use_once).unwrap(),
            Some(Err("used"))
        ));
        assert_eq!(s.token("abcdef").unwrap().unwrap().uses, 1);
        assert!(s.delete_token("abcdef").unwrap());
        assert!(s.update_token("abcdef", use_once).unwrap().is_none());
    }

    #[test]
    fn survives_reopen_and_keeps_counters_and_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.next_counter("job").unwrap(), 1);
            assert_eq!(s.next_counter("job").unwrap(), 2);
            for i in 1..=12 {
                s.put_job(&job(i)).unwrap();
            }
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.next_counter("job").unwrap(), 3);
        let recent: Vec<u64> = s.recent_jobs(3).unwrap().iter().map(|j| j.seq).collect();
        assert_eq!(recent, vec![12, 11, 10]);
        assert_eq!(
            s.job(&JobId("j-000004".into())).unwrap().unwrap().spec,
            vec![1, 2, 3]
        );
    }
}
