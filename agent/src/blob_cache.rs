//! The agent's local blob cache: verified blobs on disk that work directories hard-link to,
//! with an in-memory index (size and last use) that keeps the cache under its byte budget by
//! evicting the least recently used blobs, never one pinned by a materialisation in progress.
use anyhow::{bail, Context};
use archfarm_proto::Digest;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Modification time of every cached file; a cached file with another one was written to.
const CACHE_MTIME_UNIX_S: u64 = 946_684_800; // 2000-01-01
/// Prefix of files being written; leftovers are removed at start.
const TMP_PREFIX: &str = ".tmp-";

fn cache_mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(CACHE_MTIME_UNIX_S)
}

/// One cached file: a blob in one of its two variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct CacheKey {
    hash: [u8; 32],
    executable: bool,
}

impl CacheKey {
    fn of(digest: &Digest, executable: bool) -> Self {
        Self {
            hash: *digest.hash_bytes(),
            executable,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct CacheEntry {
    size: u64,
    last_use: u64,
}

/// What is cached, by key and by last use (a logical clock: larger is more recent).
#[derive(Debug, Default)]
struct CacheIndex {
    entries: HashMap<CacheKey, CacheEntry>,
    by_use: BTreeMap<u64, CacheKey>,
    pins: HashMap<CacheKey, usize>,
    bytes: u64,
    clock: u64,
}

impl CacheIndex {
    /// Records that `key` (of `size` bytes) is cached and was used just now.
    fn touch(&mut self, key: CacheKey, size: u64) {
        self.forget(key);
        self.clock += 1;
        self.entries.insert(
            key,
            CacheEntry {
                size,
                last_use: self.clock,
            },
        );
        self.by_use.insert(self.clock, key);
        self.bytes += size;
    }

    fn forget(&mut self, key: CacheKey) {
        if let Some(e) = self.entries.remove(&key) {
            self.by_use.remove(&e.last_use);
            self.bytes -= e.size;
        }
    }

    /// Least recently used unpinned entries to drop to get to `budget` bytes.
    fn victims(&self, budget: u64) -> Vec<CacheKey> {
        let mut excess = self.bytes.saturating_sub(budget);
        let mut out = Vec::new();
        for key in self.by_use.values() {
            if excess == 0 {
                break;
            }
            if self.pins.contains_key(key) {
                continue;
            }
            let size = self.entries.get(key).map_or(0, |e| e.size);
            excess = excess.saturating_sub(size);
            out.push(*key);
        }
        out
    }
}

/// Verified blobs on local disk: `<root>/<first 2 hex>/<hex>` (mode 0444) and, for files that
/// must be executable, `<hex>.x` (mode 0555). Work directories hard-link to them, so evicting a
/// cached file leaves the work directories' links intact.
#[derive(Clone, Debug)]
pub struct BlobCache {
    root: PathBuf,
    budget_bytes: u64,
    index: Arc<Mutex<CacheIndex>>,
    /// Work dirs get copies, not hard links: actions run as the cache's owner, who could
    /// chmod a linked file and write through it into the cache.
    copy_inputs: bool,
}

/// Blobs a materialisation uses; they are not evicted until this is dropped.
#[derive(Debug)]
pub struct CachePins {
    index: Arc<Mutex<CacheIndex>>,
    keys: Vec<CacheKey>,
}

impl Drop for CachePins {
    fn drop(&mut self) {
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            if let Some(n) = index.pins.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    index.pins.remove(key);
                }
            }
        }
    }
}

impl BlobCache {
    /// Opens (creating) the cache at `root`: indexes the cached files (least recently accessed
    /// first), removes leftovers of interrupted writes, and evicts down to `budget_bytes`.
    pub fn open(root: &Path, budget_bytes: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(root)
            .with_context(|| format!("failed to create the blob cache {}", root.display()))?;
        let mut found: Vec<(SystemTime, CacheKey, u64)> = Vec::new();
        let shards =
            fs::read_dir(root).with_context(|| format!("failed to list {}", root.display()))?;
        for shard in shards.flatten() {
            let shard_name = shard.file_name();
            let Some(prefix) = shard_name.to_str().filter(|s| s.len() == 2) else {
                continue;
            };
            let Ok(files) = fs::read_dir(shard.path()) else {
                continue;
            };
            for file in files.flatten() {
                let name = file.file_name();
                let Some(name) = name.to_str() else {
                    continue;
                };
                if name.starts_with(TMP_PREFIX) {
                    if let Err(e) = fs::remove_file(file.path()) {
                        tracing::warn!("failed to remove {}: {e}", file.path().display());
                    }
                    continue;
                }
                let (hex, executable) = match name.strip_suffix(".x") {
                    Some(hex) => (hex, true),
                    None => (name, false),
                };
                let mut hash = [0u8; 32];
                if !hex.starts_with(prefix) || hex::decode_to_slice(hex, &mut hash).is_err() {
                    continue;
                }
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let accessed = meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((accessed, CacheKey { hash, executable }, meta.len()));
            }
        }
        found.sort_by_key(|(accessed, key, _)| (*accessed, key.hash, key.executable));
        let mut index = CacheIndex::default();
        for (_, key, size) in found {
            index.touch(key, size);
        }
        let cache = Self {
            root: root.to_path_buf(),
            budget_bytes,
            index: Arc::new(Mutex::new(index)),
            copy_inputs: false,
        };
        cache.evict_to_budget();
        Ok(cache)
    }

    fn index(&self) -> MutexGuard<'_, CacheIndex> {
        // The index is consistent between statements: keep going after a panic elsewhere.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The same cache, handing out copies instead of hard links to work dirs.
    pub fn copying_inputs(mut self) -> Self {
        self.copy_inputs = true;
        self
    }

    /// Whether work dirs get copies instead of hard links.
    pub fn copies_inputs(&self) -> bool {
        self.copy_inputs
    }

    /// Bytes of cached files.
    pub fn bytes(&self) -> u64 {
        self.index().bytes
    }

    /// Cached files (a blob cached in both variants counts twice).
    pub fn file_count(&self) -> usize {
        self.index().entries.len()
    }

    /// The byte budget.
    pub fn budget_bytes(&self) -> u64 {
        self.budget_bytes
    }

    /// Where a blob is (or would be) cached.
    pub fn path(&self, digest: &Digest, executable: bool) -> PathBuf {
        let hex = digest.hex();
        let name = if executable {
            format!("{hex}.x")
        } else {
            hex.clone()
        };
        self.root.join(&hex[..2]).join(name)
    }

    fn mode(executable: bool) -> u32 {
        if executable {
            0o555
        } else {
            0o444
        }
    }

    /// Keeps the given blob variants from being evicted until the result is dropped.
    pub fn pin(&self, blobs: impl IntoIterator<Item = (Digest, bool)>) -> CachePins {
        let keys: Vec<CacheKey> = blobs
            .into_iter()
            .map(|(d, x)| CacheKey::of(&d, x))
            .collect();
        let mut index = self.index();
        for key in &keys {
            *index.pins.entry(*key).or_default() += 1;
        }
        CachePins {
            index: self.index.clone(),
            keys,
        }
    }

    /// Whether an intact copy is cached (and marks it used). A copy whose size, mode or
    /// modification time changed (an action wrote through a hard link) is removed so that it
    /// gets fetched again.
    pub fn has(&self, digest: &Digest, executable: bool) -> bool {
        let path = self.path(digest, executable);
        let key = CacheKey::of(digest, executable);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            self.index().forget(key);
            return false;
        };
        let intact = meta.is_file()
            && meta.len() == digest.size_bytes()
            && meta.permissions().mode() & 0o7777 == Self::mode(executable)
            && meta.modified().ok() == Some(cache_mtime());
        if intact {
            self.index().touch(key, meta.len());
        } else {
            tracing::warn!(
                "cached blob {} was modified; removing it to fetch it again",
                path.display()
            );
            let mut index = self.index();
            index.forget(key);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!("failed to remove {}: {e}", path.display());
            }
        }
        intact
    }

    /// A fresh path in the blob's shard directory (created) for writing it before the rename.
    pub fn temp_path(&self, digest: &Digest) -> anyhow::Result<PathBuf> {
        let path = self.path(digest, false);
        let dir = path.parent().context("cache path has no parent")?;
        fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        Ok(dir.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            digest.hex()
        )))
    }

    /// Stores `bytes` as `digest` after checking they hash to it.
    pub fn insert(&self, digest: &Digest, bytes: &[u8], executable: bool) -> anyhow::Result<()> {
        if Digest::of(bytes) != *digest {
            bail!("blob {digest} does not match its digest");
        }
        let tmp = self.temp_path(digest)?;
        let result = (|| -> anyhow::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            self.adopt(&tmp, f, digest, executable)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.with_context(|| format!("failed to cache blob {digest}"))
    }

    /// Moves the verified blob written to `tmp` (open as `file`) into place as `digest`.
    pub fn adopt(
        &self,
        tmp: &Path,
        file: fs::File,
        digest: &Digest,
        executable: bool,
    ) -> anyhow::Result<()> {
        let path = self.path(digest, executable);
        let result = (|| -> std::io::Result<()> {
            file.set_modified(cache_mtime())?;
            file.set_permissions(fs::Permissions::from_mode(Self::mode(executable)))?;
            file.sync_all()?;
            fs::rename(tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(tmp);
        }
        result.with_context(|| format!("failed to write {}", path.display()))?;
        self.index()
            .touch(CacheKey::of(digest, executable), digest.size_bytes());
        Ok(())
    }

    /// Makes the `executable` variant of a blob from its other cached variant, if there is
    /// one, by copying the file (hashed again on the way, so damage is not propagated).
    pub fn derive(&self, digest: &Digest, executable: bool) -> anyhow::Result<bool> {
        if !self.has(digest, !executable) {
            return Ok(false);
        }
        let other = self.path(digest, !executable);
        let tmp = self.temp_path(digest)?;
        let copied = fs::copy(&other, &tmp).and_then(|_| {
            let file = fs::File::open(&tmp)?;
            let got = archfarm_proto::tree::hash_file(&tmp)?;
            Ok((file, got))
        });
        let (file, got) = match copied {
            Ok(v) => v,
            Err(e) => {
                // Evicted or removed meanwhile: fetch it instead.
                let _ = fs::remove_file(&tmp);
                tracing::debug!("failed to copy {}: {e}", other.display());
                return Ok(false);
            }
        };
        if got != *digest {
            tracing::warn!("cached blob {} is corrupt; removing it", other.display());
            let _ = fs::remove_file(&tmp);
            let _ = fs::remove_file(&other);
            self.index().forget(CacheKey::of(digest, !executable));
            return Ok(false);
        }
        self.adopt(&tmp, file, digest, executable)?;
        Ok(true)
    }

    /// Removes least recently used unpinned files until the cache is within its budget (or
    /// only pinned files are left). Returns how many files and bytes went.
    pub fn evict_to_budget(&self) -> (usize, u64) {
        // Files are removed under the lock: a blob pinned and found present stays present.
        let mut index = self.index();
        let victims = index.victims(self.budget_bytes);
        let mut freed = 0u64;
        for key in &victims {
            let digest = Digest::from_parts(key.hash, 0);
            let path = self.path(&digest, key.executable);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("failed to evict {}: {e}", path.display()),
            }
            freed += index.entries.get(key).map_or(0, |e| e.size);
            index.forget(*key);
        }
        if !victims.is_empty() {
            tracing::debug!(
                "evicted {} cached blobs ({freed} bytes); {} bytes cached, budget {}",
                victims.len(),
                index.bytes,
                self.budget_bytes
            );
        }
        if index.bytes > self.budget_bytes {
            tracing::debug!(
                "blob cache holds {} bytes, over its budget of {}: the rest is in use",
                index.bytes,
                self.budget_bytes
            );
        }
        (victims.len(), freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, len: usize) -> (Digest, Vec<u8>) {
        let bytes = vec![n; len];
        (Digest::of(&bytes), bytes)
    }

    #[test]
    fn evicts_least_recently_used_first_and_spares_pinned_blobs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(dir.path(), 300).expect("open");
        let blobs: Vec<(Digest, Vec<u8>)> = (1..=4).map(|n| blob(n, 100)).collect();
        for (d, bytes) in &blobs[..3] {
            cache.insert(d, bytes, false).expect("insert");
        }
        assert_eq!((cache.bytes(), cache.file_count()), (300, 3));
        // Use blob 1 again: blob 2 is now the least recently used.
        assert!(cache.has(&blobs[0].0, false));
        cache
            .insert(&blobs[3].0, &blobs[3].1, false)
            .expect("insert");
        assert_eq!(cache.evict_to_budget(), (1, 100));
        assert!(!cache.path(&blobs[1].0, false).exists());
        for i in [0, 2, 3] {
            assert!(cache.has(&blobs[i].0, false), "blob {i} evicted");
        }
        assert_eq!(cache.bytes(), 300);

        // Pinned blobs survive even when the cache cannot get under its budget without them.
        let pins = cache.pin(blobs.iter().map(|(d, _)| (*d, false)));
        let (d5, b5) = blob(5, 250);
        cache.insert(&d5, &b5, true).expect("insert");
        assert_eq!(cache.evict_to_budget(), (1, 250));
        assert!(!cache.path(&d5, true).exists());
        cache.insert(&d5, &b5, true).expect("insert");
        let pins5 = cache.pin([(d5, true)]);
        assert_eq!(cache.evict_to_budget(), (0, 0));
        assert_eq!(cache.bytes(), 550);
        // Unpinned, the oldest go first: blobs 1, 3, 4 were used before blob 5.
        drop(pins);
        assert_eq!(cache.evict_to_budget(), (3, 300));
        assert!(cache.path(&d5, true).exists());
        drop(pins5);
        assert_eq!(cache.evict_to_budget(), (0, 0));
    }

    #[test]
    fn a_hard_link_outlives_the_eviction_of_its_cache_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(&dir.path().join("c"), 10).expect("open");
        let (d, bytes) = blob(7, 64);
        cache.insert(&d, &bytes, false).expect("insert");
        let linked = dir.path().join("work-file");
        fs::hard_link(cache.path(&d, false), &linked).expect("link");
        assert_eq!(cache.evict_to_budget(), (1, 64));
        assert!(!cache.path(&d, false).exists());
        assert_eq!(fs::read(&linked).expect("read"), bytes);
    }

    #[test]
    fn reopening_indexes_what_is_there_and_enforces_a_smaller_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(dir.path(), 1000).expect("open");
        for n in 1..=5 {
            let (d, bytes) = blob(n, 100);
            cache.insert(&d, &bytes, n % 2 == 0).expect("insert");
        }
        let leftover = cache.temp_path(&blob(9, 1).0).expect("tmp");
        fs::write(&leftover, "half").expect("write");
        drop(cache);

        let cache = BlobCache::open(dir.path(), 1000).expect("reopen");
        assert_eq!((cache.bytes(), cache.file_count()), (500, 5));
        assert!(!leftover.exists());
        let cache = BlobCache::open(dir.path(), 250).expect("reopen smaller");
        assert_eq!((cache.bytes(), cache.file_count()), (200, 2));
    }

    #[test]
    fn derives_the_other_variant_by_copying() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(dir.path(), 1 << 20).expect("open");
        let (d, bytes) = blob(3, 1000);
        assert!(!cache.derive(&d, true).expect("derive"));
        cache.insert(&d, &bytes, false).expect("insert");
        assert!(cache.derive(&d, true).expect("derive"));
        assert!(cache.has(&d, true));
        let meta = fs::metadata(cache.path(&d, true)).expect("meta");
        assert_eq!(meta.permissions().mode() & 0o777, 0o555);
        assert_eq!(cache.bytes(), 2000);
    }
}
