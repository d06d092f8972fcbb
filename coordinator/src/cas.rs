//! Blobs on disk under their blake3 digest: sharded by prefix, written durably, verified on
//! write and again on read; a corrupt file is removed and counts as missing. A size budget is
//! kept by evicting the least recently used blobs that no queued or running action has pinned.
//!
//! Durable writes come in two shapes. A single blob or a stream ([`Cas::put`],
//! [`BlobWriter`]): temp file, fsync, rename, fsync the shard directory. A batch
//! ([`Cas::put_batch`]) is one group commit: every temp file is written without a sync of its
//! own, one `syncfs` of the store's filesystem makes them all durable, they are renamed into
//! place, and one more `syncfs` makes the renames durable before the batch is acknowledged —
//! two syncs for a few hundred blobs instead of two each. Where `syncfs` is unavailable the
//! batch's files are fdatasync'ed on parallel threads and each touched shard directory is
//! fsync'ed instead. Nothing is renamed into place before its bytes are on disk, so a crash
//! leaves at worst temp files (removed at open), never a partial blob under its name.
//!
//! The in-memory index (blob -> length on disk, last use) is the truth about what is stored;
//! it is rebuilt at open by scanning the shard directories, and every change to the disk
//! (rename into place, eviction, removal of a corrupt file) happens under the index lock
//! together with the index change, so the two never disagree for a concurrent caller.
use anyhow::Context;
use archfarm_proto::Digest;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// Default size budget: 20 GiB.
pub const DEFAULT_BUDGET_BYTES: u64 = 20 << 30;
/// Largest chunk a streaming read hands out.
pub const READ_CHUNK_BYTES: usize = 1 << 20;
/// How temp files of unfinished writes are named, in the shard directory of their blob; no
/// blob's name starts like this.
pub const TEMP_PREFIX: &str = ".partial-";
/// Threads that write and fdatasync a batch's files under [`BatchSync::PerFile`]; they mostly
/// wait for the disk, so there are more of them than cores.
const SYNC_THREADS: usize = 8;

/// How [`Cas::put_batch`] makes a batch durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchSync {
    /// `syncfs(2)` of the store's filesystem, once for the batch's files and once for their
    /// renames. The default where the system has it.
    Filesystem,
    /// `fdatasync(2)` of each file on parallel threads, then `fsync(2)` of each shard directory
    /// the renames touched. Used where `syncfs` is unavailable, and for batches of at most
    /// [`PER_FILE_SYNC_AT_MOST`] new blobs.
    PerFile,
}

/// Bytes that hash to the digest they came with. [`Cas::put_batch`] takes only these, so a
/// batch is hashed once, where it is checked, and nothing unverified reaches the disk.
#[derive(Debug)]
pub struct VerifiedBlob {
    digest: Digest,
    data: Vec<u8>,
}

impl VerifiedBlob {
    /// Hashes `data` and keeps it if it is `declared`.
    pub fn check(declared: Digest, data: Vec<u8>) -> Result<Self, CasError> {
        let actual = Digest::of(&data);
        if actual != declared {
            return Err(CasError::Mismatch { declared, actual });
        }
        Ok(Self {
            digest: declared,
            data,
        })
    }

    /// Its digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }
}

/// Why a blob was refused or could not be served.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The bytes do not hash to the digest they came with.
    #[error(
        "blob does not match its digest: declared {declared}, actual {actual}; nothing was stored"
    )]
    Mismatch {
        /// What the caller said.
        declared: Digest,
        /// What the bytes are.
        actual: Digest,
    },
    /// More bytes arrived than the digest declares.
    #[error("blob {declared} declares {} bytes but at least {received} arrived; nothing was stored", declared.size_bytes())]
    TooLong {
        /// What the caller said.
        declared: Digest,
        /// Bytes received so far.
        received: u64,
    },
    /// The file on disk no longer hashes to its name; it has been removed.
    #[error("blob {0} is corrupt on the coordinator's disk and was removed")]
    Corrupt(Digest),
    /// The writer went away before the end of the blob; nothing was stored.
    #[error("the write of blob {0} was abandoned before its end; nothing was stored")]
    Abandoned(Digest),
    /// Disk trouble.
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// The store's figures, for status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CasFigures {
    /// Bytes of blobs on disk (file lengths).
    pub bytes: u64,
    /// The size budget.
    pub budget_bytes: u64,
    /// Blobs on disk.
    pub blobs: u64,
    /// Bytes newly stored by uploads and writes since start.
    pub uploaded_bytes: u64,
    /// Bytes clients did not send because the store held them: FindMissing hits plus uploads
    /// and writes of blobs already present, since start.
    pub deduplicated_bytes: u64,
    /// Blobs evicted to keep the budget since start.
    pub evicted_blobs: u64,
}

/// One stored blob.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Length of the file on disk.
    len: u64,
    /// Last use; the key of this blob in `Index::by_use`.
    last_use: u64,
    /// Which instance of the file this is (a blob evicted and stored again gets a new one),
    /// so a reader that found corruption removes only the file it read.
    generation: u64,
}

/// Pins by owner. Owners that pin the same set of digests (the shards of one job share an input
/// tree) share one copy of it, so thousands of queued actions do not hold thousands of copies.
#[derive(Default)]
struct Pins {
    /// Owner -> the keys of the sets it pinned.
    by_owner: HashMap<String, Vec<[u8; 32]>>,
    /// Set key -> the set and how many pins hold it.
    sets: HashMap<[u8; 32], PinSet>,
    /// Blob -> how many live sets contain it.
    counts: HashMap<Digest, u32>,
}

struct PinSet {
    digests: Vec<Digest>,
    holders: u32,
}

impl Pins {
    fn is_pinned(&self, d: &Digest) -> bool {
        self.counts.contains_key(d)
    }

    fn pin(&mut self, owner: &str, key: [u8; 32], digests: Vec<Digest>) {
        match self.sets.get_mut(&key) {
            Some(set) => set.holders += 1,
            None => {
                for d in &digests {
                    *self.counts.entry(*d).or_default() += 1;
                }
                self.sets.insert(
                    key,
                    PinSet {
                        digests,
                        holders: 1,
                    },
                );
            }
        }
        self.by_owner
            .entry(owner.to_string())
            .or_default()
            .push(key);
    }

    fn unpin(&mut self, owner: &str) {
        for key in self.by_owner.remove(owner).unwrap_or_default() {
            let Some(set) = self.sets.get_mut(&key) else {
                continue;
            };
            set.holders -= 1;
            if set.holders > 0 {
                continue;
            }
            let Some(set) = self.sets.remove(&key) else {
                continue;
            };
            for d in set.digests {
                if let Some(n) = self.counts.get_mut(&d) {
                    *n -= 1;
                    if *n == 0 {
                        self.counts.remove(&d);
                    }
                }
            }
        }
    }
}

/// What is on disk, in use order, with the pins and the figures.
#[derive(Default)]
struct Index {
    blobs: HashMap<Digest, Entry>,
    /// Last use -> blob; the first is the least recently used.
    by_use: BTreeMap<u64, Digest>,
    next_use: u64,
    next_generation: u64,
    bytes: u64,
    pins: Pins,
    uploaded_bytes: u64,
    deduplicated_bytes: u64,
    evicted_blobs: u64,
    /// Over budget with nothing evictable left; warned once until it clears.
    stuck_over_budget: bool,
}

impl Index {
    /// Marks a blob as just used; returns its entry if it is stored.
    fn touch(&mut self, d: &Digest) -> Option<Entry> {
        let e = self.blobs.get_mut(d)?;
        self.by_use.remove(&e.last_use);
        e.last_use = self.next_use;
        self.next_use += 1;
        self.by_use.insert(e.last_use, *d);
        Some(*e)
    }

    fn insert(&mut self, d: Digest, len: u64) {
        let e = Entry {
            len,
            last_use: self.next_use,
            generation: self.next_generation,
        };
        self.next_use += 1;
        self.next_generation += 1;
        self.by_use.insert(e.last_use, d);
        self.bytes += len;
        if let Some(old) = self.blobs.insert(d, e) {
            self.by_use.remove(&old.last_use);
            self.bytes -= old.len;
        }
    }

    fn remove(&mut self, d: &Digest) {
        if let Some(e) = self.blobs.remove(d) {
            self.by_use.remove(&e.last_use);
            self.bytes -= e.len;
        }
    }
}

/// A temp file that is removed unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("failed to remove temp file {}: {e}", self.path.display());
                }
            }
        }
    }
}

/// The content-addressed store.
pub struct Cas {
    root: PathBuf,
    budget_bytes: u64,
    tmp_seq: AtomicU64,
    index: Mutex<Index>,
    /// Batches are synced file by file ([`BatchSync::PerFile`]) rather than by `syncfs`.
    per_file_sync: AtomicBool,
    /// Blobs staged for a group commit that readers wait for.
    pending: crate::pending_blobs::PendingBlobs,
}

impl Cas {
    /// Opens the store under `root` with the default budget, creating it if needed.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        Self::open_with_budget(root, DEFAULT_BUDGET_BYTES)
    }

    /// Opens the store under `root`, creating it if needed: creates the 256 shard directories
    /// (durably, so that a blob renamed into one never depends on a directory entry not yet
    /// on disk), removes stray temp files and rebuilds the index from the shard directories
    /// (file modification time gives the initial use order). Nothing is evicted here even when
    /// over budget: the farm pins what its queued actions need first, and the next insert
    /// evicts.
    ///
    /// Temp files live in the shard directory of their blob (named [`TEMP_PREFIX`]...), not in
    /// one directory for all: concurrent writers then rarely wait for the same directory's
    /// lock, and the rename into place stays within one directory.
    pub fn open_with_budget(root: &Path, budget_bytes: u64) -> anyhow::Result<Self> {
        anyhow::ensure!(budget_bytes > 0, "the CAS budget must be above 0 bytes");
        std::fs::create_dir_all(root)
            .with_context(|| format!("failed to create {}", root.display()))?;
        let mut created = false;
        for shard in 0..=255u8 {
            let dir = root.join(format!("{shard:02x}"));
            match std::fs::create_dir(&dir) {
                Ok(()) => created = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("failed to create {}", dir.display()))
                }
            }
        }
        if created {
            sync_dir(root)?;
        }
        // Earlier versions kept every temp file in tmp/.
        let mut stray = remove_legacy_temp_dir(&root.join("tmp"))?;
        let mut found = Vec::new();
        for e in
            std::fs::read_dir(root).with_context(|| format!("failed to list {}", root.display()))?
        {
            let e = e.with_context(|| format!("failed to list {}", root.display()))?;
            let name = e.file_name();
            let Some(shard) = name.to_str().filter(|n| is_shard_name(n)) else {
                continue;
            };
            stray += scan_shard(&e.path(), shard, &mut found)?;
        }
        if stray > 0 {
            tracing::info!(files = stray, "removed temp files of unfinished CAS writes");
        }
        found.sort_by_key(|&(mtime, d, _)| (mtime, d));
        let mut index = Index::default();
        for (_, d, len) in found {
            index.insert(d, len);
        }
        if index.bytes > budget_bytes {
            tracing::warn!(
                bytes = index.bytes,
                budget_bytes,
                "the CAS is over its budget; the next stored blob evicts the least recently used"
            );
        }
        tracing::info!(
            blobs = index.blobs.len(),
            bytes = index.bytes,
            budget_bytes,
            "opened the CAS"
        );
        Ok(Self {
            root: root.to_path_buf(),
            budget_bytes,
            tmp_seq: AtomicU64::new(0),
            index: Mutex::new(index),
            per_file_sync: AtomicBool::new(!SYNCFS_AVAILABLE),
            pending: Default::default(),
        })
    }

    /// How batches are made durable from now on; the default is [`BatchSync::Filesystem`]
    /// where the system has `syncfs`. (Tests and measurements choose.)
    pub fn set_batch_sync(&self, how: BatchSync) {
        let per_file = how == BatchSync::PerFile || !SYNCFS_AVAILABLE;
        self.per_file_sync.store(per_file, Ordering::Relaxed);
    }

    /// How batches are made durable.
    pub fn batch_sync(&self) -> BatchSync {
        if self.per_file_sync.load(Ordering::Relaxed) {
            BatchSync::PerFile
        } else {
            BatchSync::Filesystem
        }
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join(&hex[..2])
            .join(format!("{hex}-{}", d.size_bytes()))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // The index is updated in small steps that leave it consistent; a panic elsewhere
        // while it was held does not make it wrong.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Temp files in the shard directories (for tests: none may be left behind).
    #[cfg(test)]
    pub(crate) fn temp_files(&self) -> usize {
        let mut n = 0;
        for shard in 0..=255u8 {
            let dir = self.root.join(format!("{shard:02x}"));
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                n += usize::from(
                    e.file_name()
                        .as_encoded_bytes()
                        .starts_with(TEMP_PREFIX.as_bytes()),
                );
            }
        }
        n
    }

    /// Blobs staged for a group commit (see [`crate::pending_blobs`]).
    pub fn pending(&self) -> &crate::pending_blobs::PendingBlobs {
        &self.pending
    }

    /// Whether the blob is stored (marks it as used).
    pub fn contains(&self, d: &Digest) -> bool {
        self.index().touch(d).is_some()
    }

    /// The digests that are not stored, in the given order. The present ones are marked as used
    /// and count as deduplicated bytes: the client will not send them.
    pub fn find_missing(&self, digests: impl IntoIterator<Item = Digest>) -> Vec<Digest> {
        let mut index = self.index();
        let mut missing = Vec::new();
        for d in digests {
            if index.touch(&d).is_some() {
                index.deduplicated_bytes += d.size_bytes();
            } else {
                missing.push(d);
            }
        }
        missing
    }

    /// Pins blobs for `owner` (an action id): they are never evicted until `unpin(owner)`.
    /// Pinning again adds to what the owner holds. Blobs not stored yet may be pinned too.
    pub fn pin(&self, owner: &str, digests: impl IntoIterator<Item = Digest>) {
        let mut digests: Vec<Digest> = digests.into_iter().collect();
        digests.sort_unstable();
        digests.dedup();
        let mut key = blake3::Hasher::new();
        for d in &digests {
            key.update(d.hash_bytes());
            key.update(&d.size_bytes().to_le_bytes());
        }
        let key = *key.finalize().as_bytes();
        self.index().pins.pin(owner, key, digests);
    }

    /// Releases everything `owner` pinned.
    pub fn unpin(&self, owner: &str) {
        self.index().pins.unpin(owner);
    }

    /// The store's figures.
    pub fn stats(&self) -> CasFigures {
        let index = self.index();
        CasFigures {
            bytes: index.bytes,
            budget_bytes: self.budget_bytes,
            blobs: index.blobs.len() as u64,
            uploaded_bytes: index.uploaded_bytes,
            deduplicated_bytes: index.deduplicated_bytes,
            evicted_blobs: index.evicted_blobs,
        }
    }

    /// Stores `data` under `declared` after checking it; returns whether it was new.
    pub fn put(&self, declared: &Digest, data: &[u8]) -> Result<bool, CasError> {
        let actual = Digest::of(data);
        if &actual != declared {
            return Err(CasError::Mismatch {
                declared: *declared,
                actual,
            });
        }
        {
            let mut index = self.index();
            if index.touch(declared).is_some() {
                index.deduplicated_bytes += declared.size_bytes();
                return Ok(false);
            }
        }
        let (tmp, mut f) = self.create_temp(declared)?;
        f.write_all(data)
            .with_context(|| format!("failed to write {}", tmp.path.display()))?;
        f.sync_all()
            .with_context(|| format!("failed to sync {}", tmp.path.display()))?;
        drop(f);
        Ok(self.commit(declared, tmp)?)
    }

    /// Starts a streaming write of the blob `declared`: feed it with [`BlobWriter::write`],
    /// then [`BlobWriter::finish`]. Dropping the writer earlier stores nothing.
    pub fn begin_write(self: &Arc<Self>, declared: Digest) -> Result<BlobWriter, CasError> {
        let (tmp, file) = self.create_temp(&declared)?;
        Ok(BlobWriter {
            cas: self.clone(),
            declared,
            file: BufWriter::with_capacity(READ_CHUNK_BYTES, file),
            tmp,
            hasher: blake3::Hasher::new(),
            received: 0,
        })
    }

    fn create_temp(&self, d: &Digest) -> anyhow::Result<(TempFile, std::fs::File)> {
        let hex = d.hex();
        let path = self.root.join(&hex[..2]).join(format!(
            "{TEMP_PREFIX}{hex}-{}-{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok((
            TempFile {
                path,
                renamed: false,
            },
            f,
        ))
    }

    /// Moves a verified, synced temp file into place (unless the blob is already there), then
    /// evicts down to the budget. Returns whether the blob was new.
    fn commit(&self, d: &Digest, mut tmp: TempFile) -> anyhow::Result<bool> {
        let path = self.path(d);
        let dir = path.parent().context("blob path has no parent")?;
        {
            let mut index = self.index();
            if index.touch(d).is_some() {
                index.deduplicated_bytes += d.size_bytes();
                return Ok(false);
            }
            std::fs::rename(&tmp.path, &path)
                .with_context(|| format!("failed to rename into {}", path.display()))?;
            tmp.renamed = true;
            index.insert(*d, d.size_bytes());
            index.uploaded_bytes += d.size_bytes();
            self.evict(&mut index, &|spare| spare == d);
        }
        sync_dir(dir)?;
        Ok(true)
    }

    /// Stores a batch of verified blobs with one group commit (see the module documentation)
    /// and returns how many were new. Blobs already stored, or twice in the batch, count as
    /// deduplicated. When it returns `Ok`, every blob of the batch is stored and survives a
    /// crash. On an error, none that this call renamed into place is left stored (their
    /// durability is unknown), and no temp file is left behind.
    ///
    /// A blob enters the index when it is renamed into place, before the second sync: a
    /// concurrent FindMissing may count it as present a moment before its rename is durable
    /// (single writes have the same window before their directory fsync). A crash in that
    /// moment loses the blob, and a job that relied on it fails on a missing blob; it never
    /// runs on wrong bytes.
    pub fn put_batch(&self, blobs: &[VerifiedBlob]) -> Result<u32, CasError> {
        let mut fresh = Vec::with_capacity(blobs.len());
        {
            let mut index = self.index();
            let mut seen = HashSet::with_capacity(blobs.len());
            for b in blobs {
                if index.touch(&b.digest).is_some() || !seen.insert(b.digest) {
                    index.deduplicated_bytes += b.digest.size_bytes();
                } else {
                    fresh.push(b);
                }
            }
        }
        if fresh.is_empty() {
            return Ok(0);
        }
        // Opened before the first write, so that syncfs reports every writeback error on the
        // filesystem from here on (errors are sampled per open file).
        let fs = std::fs::File::open(&self.root)
            .with_context(|| format!("failed to open {}", self.root.display()))?;
        // A few blobs (a Submit's composed roots, typically one) sync their own files and
        // directories: `syncfs` would also wait for every other writer's dirty pages on the
        // filesystem (a build beside the coordinator), twice.
        let how = if fresh.len() <= PER_FILE_SYNC_AT_MOST {
            BatchSync::PerFile
        } else {
            self.batch_sync()
        };
        let written = match how {
            BatchSync::Filesystem => self.write_then_syncfs(&fs, &fresh)?,
            BatchSync::PerFile => self.write_synced(&fresh)?,
        };
        let batch: HashSet<Digest> = fresh.iter().map(|b| b.digest).collect();
        let mut renamed = Vec::with_capacity(written.len());
        let mut dirs = BTreeSet::new();
        let moved = {
            let mut index = self.index();
            let mut moved = Ok(());
            for (d, mut tmp) in written {
                if index.touch(&d).is_some() {
                    // Stored meanwhile by a concurrent upload; the temp file goes.
                    index.deduplicated_bytes += d.size_bytes();
                    continue;
                }
                let path = self.path(&d);
                if let Err(e) = std::fs::rename(&tmp.path, &path) {
                    moved =
                        Err(e).with_context(|| format!("failed to rename into {}", path.display()));
                    break;
                }
                tmp.renamed = true;
                index.insert(d, d.size_bytes());
                index.uploaded_bytes += d.size_bytes();
                if let Some(e) = index.blobs.get(&d) {
                    renamed.push((d, e.generation));
                }
                if let Some(dir) = path.parent() {
                    dirs.insert(dir.to_path_buf());
                }
            }
            self.evict(&mut index, &|d| batch.contains(d));
            moved
        };
        let durable = moved.and_then(|()| match how {
            BatchSync::Filesystem => syncfs(&fs).with_context(|| {
                format!("failed to sync the filesystem of {}", self.root.display())
            }),
            BatchSync::PerFile => {
                let dirs: Vec<PathBuf> = dirs.into_iter().collect();
                in_parallel(&dirs, |dir| sync_dir(dir))
            }
        });
        if let Err(e) = durable {
            self.withdraw(&renamed);
            return Err(e.into());
        }
        Ok(u32::try_from(renamed.len()).unwrap_or(u32::MAX))
    }

    /// Writes the batch's temp files without syncing each, then syncs the filesystem once.
    fn write_then_syncfs(
        &self,
        fs: &std::fs::File,
        blobs: &[&VerifiedBlob],
    ) -> anyhow::Result<Vec<(Digest, TempFile)>> {
        let mut written = Vec::with_capacity(blobs.len());
        for b in blobs {
            let (tmp, mut f) = self.create_temp(&b.digest)?;
            f.write_all(&b.data)
                .with_context(|| format!("failed to write {}", tmp.path.display()))?;
            written.push((b.digest, tmp));
        }
        match syncfs(fs) {
            Ok(()) => Ok(written),
            Err(e) if syncfs_unsupported(&e) => {
                tracing::info!(
                    "syncfs is unavailable here ({e}); CAS batches are synced file by file"
                );
                self.per_file_sync.store(true, Ordering::Relaxed);
                let paths: Vec<&Path> = written.iter().map(|(_, t)| t.path.as_path()).collect();
                in_parallel(&paths, |p| {
                    std::fs::File::open(p)
                        .and_then(|f| f.sync_data())
                        .with_context(|| format!("failed to sync {}", p.display()))
                })?;
                Ok(written)
            }
            Err(e) => Err(e).with_context(|| {
                format!("failed to sync the filesystem of {}", self.root.display())
            }),
        }
    }

    /// Writes and fdatasyncs the batch's temp files on parallel threads.
    fn write_synced(&self, blobs: &[&VerifiedBlob]) -> anyhow::Result<Vec<(Digest, TempFile)>> {
        let written = Mutex::new(Vec::with_capacity(blobs.len()));
        let outcome = in_parallel(blobs, |b| {
            let (tmp, mut f) = self.create_temp(&b.digest)?;
            f.write_all(&b.data)
                .and_then(|()| f.sync_data())
                .with_context(|| format!("failed to write {}", tmp.path.display()))?;
            written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((b.digest, tmp));
            Ok(())
        });
        // On an error, the temp files written so far are dropped (removed) here.
        let written = written
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        outcome.map(|()| written)
    }

    /// Takes back blobs a failed batch renamed into place: their durability is unknown and
    /// the caller was not told they are stored. Blobs replaced meanwhile are left alone.
    fn withdraw(&self, renamed: &[(Digest, u64)]) {
        let mut index = self.index();
        let mut withdrawn = 0;
        for (d, generation) in renamed {
            if index.blobs.get(d).map(|e| e.generation) != Some(*generation) {
                continue;
            }
            let path = self.path(d);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("failed to remove {}: {e}", path.display());
                    continue;
                }
            }
            index.remove(d);
            index.uploaded_bytes -= d.size_bytes();
            withdrawn += 1;
        }
        if withdrawn > 0 {
            tracing::warn!(
                blobs = withdrawn,
                "removed the blobs of a batch that could not be made durable"
            );
        }
    }

    /// Evicts least recently used blobs that are not pinned until the store fits its budget.
    /// `spared` blobs (the ones just stored) stay. Pinned blobs met on the way count as used.
    fn evict(&self, index: &mut Index, spared: &dyn Fn(&Digest) -> bool) {
        let mut victims = Vec::new();
        let mut pinned = Vec::new();
        let mut freeing = 0;
        for (_, d) in index.by_use.iter() {
            if index.bytes - freeing <= self.budget_bytes {
                break;
            }
            if spared(d) {
                continue;
            }
            if index.pins.is_pinned(d) {
                pinned.push(*d);
                continue;
            }
            if let Some(e) = index.blobs.get(d) {
                freeing += e.len;
                victims.push(*d);
            }
        }
        for d in &pinned {
            index.touch(d);
        }
        for d in victims {
            let path = self.path(&d);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("failed to evict {}: {e}", path.display());
                    continue;
                }
            }
            index.remove(&d);
            index.evicted_blobs += 1;
            tracing::debug!(blob = %d, "evicted");
        }
        if index.bytes <= self.budget_bytes {
            index.stuck_over_budget = false;
        } else if !index.stuck_over_budget {
            index.stuck_over_budget = true;
            tracing::warn!(
                bytes = index.bytes,
                budget_bytes = self.budget_bytes,
                pinned_blobs = pinned.len(),
                "the CAS is over its budget and nothing more can be evicted: the rest is pinned by queued or running actions"
            );
        }
    }

    /// Removes the file `generation` of blob `d` (corrupt or vanished) and its index entry.
    fn discard(&self, d: &Digest, generation: u64, why: &str) {
        let mut index = self.index();
        if index.blobs.get(d).map(|e| e.generation) != Some(generation) {
            return;
        }
        let path = self.path(d);
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("failed to remove {}: {e}", path.display());
                return;
            }
        }
        index.remove(d);
        tracing::warn!(blob = %d, "removed a {why} blob from the CAS");
    }

    /// Opens a stored blob for reading (marks it as used, and its file's mtime, so the use
    /// order survives a restart). `None` if it is not stored or its file has the wrong length
    /// (then it is removed).
    fn open_file(&self, d: &Digest) -> anyhow::Result<Option<(std::fs::File, u64)>> {
        let Some(entry) = self.index().touch(d) else {
            return Ok(None);
        };
        let path = self.path(d);
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.discard(d, entry.generation, "vanished");
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("failed to open {}", path.display())),
        };
        let len = f
            .metadata()
            .with_context(|| format!("failed to stat {}", path.display()))?
            .len();
        if len != d.size_bytes() {
            self.discard(d, entry.generation, "corrupt (wrong length)");
            return Ok(None);
        }
        let _ = f.set_modified(SystemTime::now());
        Ok(Some((f, entry.generation)))
    }

    /// Reads and verifies a blob. A corrupt file is removed, logged and reported missing.
    pub fn get(&self, d: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        let Some((mut f, generation)) = self.open_file(d)? else {
            return Ok(None);
        };
        let mut data = Vec::with_capacity(usize::try_from(d.size_bytes()).unwrap_or(0));
        f.read_to_end(&mut data)
            .with_context(|| format!("failed to read {}", self.path(d).display()))?;
        let actual = Digest::of(&data);
        if &actual != d {
            tracing::warn!(actual = %actual, "blob {d} hashes differently on disk");
            self.discard(d, generation, "corrupt");
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Whether the blob is stored and its bytes still hash to its digest (read in full, in
    /// chunks; a corrupt copy is removed, as on any read).
    pub fn verify(self: &Arc<Self>, d: &Digest) -> bool {
        match self.open_blob(d) {
            Ok(Some(reader)) => reader.into_iter().all(|chunk| chunk.is_ok()),
            _ => false,
        }
    }

    /// Opens a blob for a streaming read that verifies as it goes: the reader yields chunks
    /// of at most [`READ_CHUNK_BYTES`] and ends with [`CasError::Corrupt`] (after removing the
    /// file) if the bytes did not hash to the digest. `None` if the blob is not stored.
    pub fn open_blob(self: &Arc<Self>, d: &Digest) -> anyhow::Result<Option<BlobReader>> {
        Ok(self.open_file(d)?.map(|(file, generation)| BlobReader {
            cas: self.clone(),
            digest: *d,
            generation,
            file,
            hasher: blake3::Hasher::new(),
            remaining: d.size_bytes(),
            done: false,
        }))
    }
}

/// Whether this system has `syncfs(2)` (Linux); elsewhere batches are synced file by file.
/// Batches of at most this many new blobs are made durable file by file ([`BatchSync::PerFile`]).
pub const PER_FILE_SYNC_AT_MOST: usize = 8;

const SYNCFS_AVAILABLE: bool = cfg!(any(target_os = "linux", target_os = "android"));

/// Flushes every dirty page and inode of the filesystem holding `fs` and waits for it.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn syncfs(fs: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    nix::unistd::syncfs(fs.as_raw_fd()).map_err(std::io::Error::from)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn syncfs(_: &std::fs::File) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Whether a syncfs error means the call is missing (an old kernel, a sandbox that filters
/// it) rather than that the disk failed.
fn syncfs_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || e.raw_os_error() == Some(nix::errno::Errno::ENOSYS as i32)
}

/// fsyncs a directory, making the entries renamed or created in it durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .with_context(|| format!("failed to sync {}", dir.display()))
}

/// Runs `f` over `items` on up to [`SYNC_THREADS`] threads; the first error wins.
fn in_parallel<T: Sync>(
    items: &[T],
    f: impl Fn(&T) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    let per = items.len().div_ceil(SYNC_THREADS);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| scope.spawn(move || chunk.iter().try_for_each(f)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| anyhow::anyhow!("a thread syncing CAS files panicked"))?
        })
    })
}

fn is_shard_name(n: &str) -> bool {
    n.len() == 2
        && n.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a blob file name, `<hex>-<size>`.
fn parse_blob_name(name: &str) -> Option<Digest> {
    let (hex, size) = name.split_once('-')?;
    let size_bytes = size.parse().ok()?;
    Digest::from_proto(&archfarm_proto::v1::Digest {
        hash: hex.to_string(),
        size_bytes,
    })
    .ok()
}

/// Removes the temp directory of earlier versions with the temp files in it; returns how many
/// there were.
fn remove_legacy_temp_dir(tmp: &Path) -> anyhow::Result<usize> {
    let entries = match std::fs::read_dir(tmp) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("failed to list {}", tmp.display())),
    };
    let mut stray = 0;
    for e in entries {
        let path = e
            .with_context(|| format!("failed to list {}", tmp.display()))?
            .path();
        std::fs::remove_file(&path)
            .with_context(|| format!("failed to remove stray temp file {}", path.display()))?;
        stray += 1;
    }
    std::fs::remove_dir(tmp).with_context(|| format!("failed to remove {}", tmp.display()))?;
    Ok(stray)
}

/// Collects the blobs of one shard directory as (mtime, digest, length) and removes the temp
/// files of writes that never finished; returns how many of those there were. A file whose
/// length is not its declared size is removed; unknown files are left alone with a WARN.
fn scan_shard(
    dir: &Path,
    shard: &str,
    found: &mut Vec<(SystemTime, Digest, u64)>,
) -> anyhow::Result<usize> {
    let mut stray = 0;
    for e in std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let e = e.with_context(|| format!("failed to list {}", dir.display()))?;
        let path = e.path();
        if e.file_name()
            .as_encoded_bytes()
            .starts_with(TEMP_PREFIX.as_bytes())
        {
            std::fs::remove_file(&path)
                .with_context(|| format!("failed to remove stray temp file {}", path.display()))?;
            stray += 1;
            continue;
        }
        let meta = e
            .metadata()
            .with_context(|| format!("failed to stat {}", path.display()))?;
        let digest = e
            .file_name()
            .to_str()
            .and_then(parse_blob_name)
            .filter(|d| meta.is_file() && d.hex().starts_with(shard));
        let Some(d) = digest else {
            tracing::warn!("ignoring {}: not a blob of this CAS", path.display());
            continue;
        };
        if meta.len() != d.size_bytes() {
            tracing::warn!(
                blob = %d,
                len = meta.len(),
                "removing a blob whose file has the wrong length"
            );
            std::fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
            continue;
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        found.push((mtime, d, meta.len()));
    }
    Ok(stray)
}

/// A streaming write in progress: bytes go to a temp file and into the hash; [`finish`]
/// verifies and moves the file into place. Dropped before that, it leaves nothing behind.
///
/// [`finish`]: BlobWriter::finish
pub struct BlobWriter {
    cas: Arc<Cas>,
    declared: Digest,
    tmp: TempFile,
    file: BufWriter<std::fs::File>,
    hasher: blake3::Hasher,
    received: u64,
}

impl BlobWriter {
    /// The digest the bytes must hash to.
    pub fn declared(&self) -> Digest {
        self.declared
    }

    /// Appends a chunk. Fails as soon as more bytes arrive than the digest declares.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), CasError> {
        self.received += chunk.len() as u64;
        if self.received > self.declared.size_bytes() {
            return Err(CasError::TooLong {
                declared: self.declared,
                received: self.received,
            });
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .with_context(|| format!("failed to write {}", self.tmp.path.display()))?;
        Ok(())
    }

    /// Verifies the bytes against the digest and stores them durably; returns whether the blob
    /// was new. On a mismatch nothing is stored.
    pub fn finish(self) -> Result<bool, CasError> {
        let actual = Digest::from_hasher(&self.hasher, self.received);
        if actual != self.declared {
            return Err(CasError::Mismatch {
                declared: self.declared,
                actual,
            });
        }
        let Self {
            cas,
            declared,
            tmp,
            file,
            ..
        } = self;
        let file = file
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("failed to write {}", tmp.path.display()))?;
        file.sync_all()
            .with_context(|| format!("failed to sync {}", tmp.path.display()))?;
        drop(file);
        Ok(cas.commit(&declared, tmp)?)
    }
}

/// A streaming read that verifies as it goes (see [`Cas::open_blob`]).
pub struct BlobReader {
    cas: Arc<Cas>,
    digest: Digest,
    generation: u64,
    file: std::fs::File,
    hasher: blake3::Hasher,
    remaining: u64,
    done: bool,
}

impl BlobReader {
    fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, CasError> {
        if self.remaining == 0 {
            let actual = Digest::from_hasher(&self.hasher, self.digest.size_bytes());
            if actual != self.digest {
                tracing::warn!(actual = %actual, "blob {} hashes differently on disk", self.digest);
                self.cas.discard(&self.digest, self.generation, "corrupt");
                return Err(CasError::Corrupt(self.digest));
            }
            return Ok(None);
        }
        let n = usize::try_from(self.remaining.min(READ_CHUNK_BYTES as u64))
            .unwrap_or(READ_CHUNK_BYTES);
        let mut buf = vec![0; n];
        self.file
            .read_exact(&mut buf)
            .with_context(|| format!("failed to read {}", self.cas.path(&self.digest).display()))?;
        self.hasher.update(&buf);
        self.remaining -= n as u64;
        Ok(Some(buf))
    }
}

impl Iterator for BlobReader {
    type Item = Result<Vec<u8>, CasError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let item = self.next_chunk().transpose();
        if !matches!(item, Some(Ok(_))) {
            self.done = true;
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(seed: u8, len: usize) -> (Digest, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect();
        (Digest::of(&data), data)
    }

    fn tmp_files(cas: &Cas) -> usize {
        cas.temp_files()
    }

    /// Bytes and blob count of the files in the shard directories.
    fn on_disk(root: &Path) -> (u64, u64) {
        let (mut bytes, mut blobs) = (0, 0);
        for shard in std::fs::read_dir(root).unwrap() {
            let shard = shard.unwrap();

            for f in std::fs::read_dir(shard.path()).unwrap() {
                bytes += f.unwrap().metadata().unwrap().len();
                blobs += 1;
            }
        }
        (bytes, blobs)
    }

    #[test]
    fn verifies_on_write_and_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(cas.put(&d, b"hello").unwrap());
        assert!(!cas.put(&d, b"hello").unwrap());
        assert!(matches!(
            cas.put(&d, b"jello"),
            Err(CasError::Mismatch { .. })
        ));
        assert_eq!(cas.get(&d).unwrap().unwrap(), b"hello");
        std::fs::write(cas.path(&d), b"hellp").unwrap();
        assert_eq!(cas.get(&d).unwrap(), None, "corrupt blob is never served");
        assert!(!cas.contains(&d));
        assert!(!cas.path(&d).exists(), "corrupt blob is removed");
        assert_eq!(cas.stats().bytes, 0);
        assert_eq!(tmp_files(&cas), 0);
    }

    #[test]
    fn a_batch_commit_leaves_no_temp_files_and_every_blob_readable() {
        for how in [BatchSync::Filesystem, BatchSync::PerFile] {
            let dir = tempfile::tempdir().unwrap();
            let cas = Cas::open(dir.path()).unwrap();
            cas.set_batch_sync(how);
            let blobs: Vec<_> = (0..300usize).map(|i| blob(i as u8, 1 + i * 37)).collect();
            let verified = |i: usize| VerifiedBlob::check(blobs[i].0, blobs[i].1.clone()).unwrap();
            // One blob is stored already, one comes twice.
            cas.put(&blobs[0].0, &blobs[0].1).unwrap();
            let mut batch: Vec<VerifiedBlob> = (0..blobs.len()).map(verified).collect();
            batch.push(verified(5));
            assert_eq!(cas.put_batch(&batch).unwrap(), 299, "{how:?}");
            assert_eq!(tmp_files(&cas), 0, "{how:?}");
            for (d, data) in &blobs {
                assert_eq!(cas.get(d).unwrap().as_ref(), Some(data), "{how:?}: {d}");
            }
            let f = cas.stats();
            assert_eq!(f.blobs, 300);
            assert_eq!(
                f.deduplicated_bytes,
                blobs[0].0.size_bytes() + blobs[5].0.size_bytes()
            );
            assert_eq!(
                f.uploaded_bytes, f.bytes,
                "the first put counts as uploaded too"
            );
            assert_eq!((f.bytes, f.blobs), on_disk(dir.path()));
            assert_eq!(cas.put_batch(&batch).unwrap(), 0, "all stored already");
            assert_eq!(cas.put_batch(&[]).unwrap(), 0);
            drop(cas);
            let cas = Cas::open(dir.path()).unwrap();
            assert_eq!((cas.stats().bytes, cas.stats().blobs), (f.bytes, f.blobs));
        }
        assert!(matches!(
            VerifiedBlob::check(Digest::of(b"a"), b"b".to_vec()),
            Err(CasError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_small_batch_is_stored_file_by_file_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        assert_eq!(cas.batch_sync(), BatchSync::Filesystem);
        let blobs: Vec<_> = (0..PER_FILE_SYNC_AT_MOST)
            .map(|i| blob(i as u8, 10 + i))
            .collect();
        let batch: Vec<VerifiedBlob> = blobs
            .iter()
            .map(|(d, data)| VerifiedBlob::check(*d, data.clone()).unwrap())
            .collect();
        assert_eq!(cas.put_batch(&batch).unwrap() as usize, blobs.len());
        assert_eq!(tmp_files(&cas), 0);
        drop(cas);
        let cas = Cas::open(dir.path()).unwrap();
        for (d, data) in &blobs {
            assert_eq!(cas.get(d).unwrap().as_ref(), Some(data), "{d}");
        }
    }

    #[test]
    fn a_batch_is_spared_by_the_eviction_it_causes() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open_with_budget(dir.path(), 2500).unwrap();
        let blobs: Vec<_> = (0..4).map(|i| blob(i, 1000)).collect();
        cas.put(&blobs[0].0, &blobs[0].1).unwrap();
        cas.put(&blobs[1].0, &blobs[1].1).unwrap();
        let batch: Vec<VerifiedBlob> = blobs[2..]
            .iter()
            .map(|(d, data)| VerifiedBlob::check(*d, data.clone()).unwrap())
            .collect();
        assert_eq!(cas.put_batch(&batch).unwrap(), 2);
        assert!(!cas.contains(&blobs[0].0) && !cas.contains(&blobs[1].0));
        assert!(cas.contains(&blobs[2].0) && cas.contains(&blobs[3].0));
        assert_eq!(cas.stats().evicted_blobs, 2);
        assert_eq!((cas.stats().bytes, 2), on_disk(dir.path()));
    }

    #[test]
    fn streaming_read_detects_a_flipped_byte_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Arc::new(Cas::open(dir.path()).unwrap());
        let (d, mut data) = blob(7, 3 * READ_CHUNK_BYTES + 5);
        cas.put(&d, &data).unwrap();
        let read: Vec<u8> = cas
            .open_blob(&d)
            .unwrap()
            .unwrap()
            .map(|c| c.unwrap())
            .inspect(|c| assert!(c.len() <= READ_CHUNK_BYTES))
            .flatten()
            .collect();
        assert_eq!(read, data);

        data[2 * READ_CHUNK_BYTES] ^= 1;
        std::fs::write(cas.path(&d), &data).unwrap();
        let items: Vec<_> = cas.open_blob(&d).unwrap().unwrap().collect();
        assert_eq!(items.len(), 5, "four chunks, then the error");
        assert!(matches!(items.last(), Some(Err(CasError::Corrupt(x))) if *x == d));
        assert!(!cas.contains(&d));
        assert!(!cas.path(&d).exists());
        assert!(cas.open_blob(&d).unwrap().is_none());
    }

    #[test]
    fn a_file_of_the_wrong_length_is_missing_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Arc::new(Cas::open(dir.path()).unwrap());
        let (d, data) = blob(1, 1000);
        cas.put(&d, &data).unwrap();
        std::fs::write(cas.path(&d), &data[..999]).unwrap();
        assert!(cas.open_blob(&d).unwrap().is_none());
        assert!(!cas.path(&d).exists());
        assert_eq!(cas.stats().blobs, 0);
    }

    #[test]
    fn streaming_write_in_uneven_chunks_stores_only_verified_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Arc::new(Cas::open(dir.path()).unwrap());
        let (d, data) = blob(3, 5 * READ_CHUNK_BYTES + 123);
        let mut w = cas.begin_write(d).unwrap();
        for chunk in data.chunks(777_777) {
            w.write(chunk).unwrap();
        }
        assert!(w.finish().unwrap());
        assert_eq!(cas.get(&d).unwrap().unwrap(), data);

        // Too long: fails on the chunk that crosses the declared size.
        let (small, _) = blob(4, 10);
        let mut w = cas.begin_write(small).unwrap();
        assert!(matches!(
            w.write(&[0; 11]),
            Err(CasError::TooLong { received: 11, .. })
        ));
        drop(w);
        // Abandoned half way: nothing left behind.
        let mut w = cas.begin_write(small).unwrap();
        w.write(&[0; 5]).unwrap();
        drop(w);
        assert_eq!(tmp_files(&cas), 0);
        assert!(!cas.contains(&small));
    }

    #[test]
    fn eviction_keeps_the_budget_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open_with_budget(dir.path(), 3000).unwrap();
        let blobs: Vec<_> = (0..5).map(|i| blob(i, 1000)).collect();
        for (d, data) in &blobs[..3] {
            cas.put(d, data).unwrap();
        }
        // Use order now: 1, 2, 0 (get, contains and FindMissing all count as use).
        assert!(cas.get(&blobs[1].0).unwrap().is_some());
        assert!(cas.contains(&blobs[2].0));
        assert!(cas.find_missing([blobs[0].0]).is_empty());
        cas.put(&blobs[3].0, &blobs[3].1).unwrap();
        assert!(!cas.contains(&blobs[1].0), "least recently used goes first");
        assert!(!cas.path(&blobs[1].0).exists());
        for (d, _) in [&blobs[0], &blobs[2], &blobs[3]] {
            assert!(cas.contains(d));
        }
        // Use order: 0, 2, 3; a re-upload of 0 counts as use.
        assert!(!cas.put(&blobs[0].0, &blobs[0].1).unwrap());
        cas.put(&blobs[4].0, &blobs[4].1).unwrap();
        assert!(!cas.contains(&blobs[2].0));
        let f = cas.stats();
        assert!(f.bytes <= f.budget_bytes);
        assert_eq!(f.evicted_blobs, 2);
        assert_eq!(f.blobs, 3);
        assert_eq!(f.uploaded_bytes, 5000);
        assert_eq!(
            f.deduplicated_bytes, 2000,
            "one FindMissing hit, one re-upload"
        );
        assert_eq!((f.bytes, f.blobs), on_disk(dir.path()));
    }

    /// Collects what `f` logs at WARN and above.
    fn warnings_of(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let out = sink.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn eviction_never_removes_pinned_blobs() {
        let warnings = warnings_of(eviction_never_removes_pinned_blobs_inner);
        assert_eq!(
            warnings.matches("over its budget").count(),
            1,
            "one WARN for one stretch over budget:\n{warnings}"
        );
    }

    fn eviction_never_removes_pinned_blobs_inner() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open_with_budget(dir.path(), 2500).unwrap();
        let blobs: Vec<_> = (0..6).map(|i| blob(i, 1000)).collect();
        cas.put(&blobs[0].0, &blobs[0].1).unwrap();
        cas.put(&blobs[1].0, &blobs[1].1).unwrap();
        // Two actions share one input set; a third pins a blob not stored yet.
        cas.pin("a1", [blobs[0].0, blobs[1].0]);
        cas.pin("a2", [blobs[1].0, blobs[0].0, blobs[0].0]);
        cas.pin("a3", [blobs[2].0]);
        cas.put(&blobs[2].0, &blobs[2].1).unwrap();
        cas.put(&blobs[3].0, &blobs[3].1).unwrap();
        // Only 3 was evictable but it is the newest: over budget, nothing pinned removed.
        let f = cas.stats();
        assert_eq!((f.blobs, f.bytes, f.evicted_blobs), (4, 4000, 0));
        cas.put(&blobs[4].0, &blobs[4].1).unwrap();
        // 3 goes; the pinned ones stay although the store is over budget.
        assert!(!cas.contains(&blobs[3].0));
        for (d, _) in &blobs[..3] {
            assert!(cas.contains(d), "pinned blob {d} evicted");
        }
        assert_eq!(cas.stats().bytes, 4000);

        cas.unpin("a1");
        cas.put(&blobs[5].0, &blobs[5].1).unwrap();
        for (d, _) in &blobs[..3] {
            assert!(cas.contains(d), "blob {d} is still pinned by a2 or a3");
        }
        assert!(!cas.contains(&blobs[4].0));
        cas.unpin("a2");
        cas.unpin("a3");
        cas.unpin("never-pinned");
        // Use order: 5, 0, 1, 2 (the contains calls above); the next insert evicts 5, 0, 1.
        cas.put(&blobs[4].0, &blobs[4].1).unwrap();
        let f = cas.stats();
        assert!(f.bytes <= f.budget_bytes, "{f:?}");
        assert!(cas.contains(&blobs[2].0) && cas.contains(&blobs[4].0));
        assert!(!cas.contains(&blobs[0].0) && !cas.contains(&blobs[1].0));
        assert_eq!((f.bytes, f.blobs), on_disk(dir.path()));
    }

    #[test]
    fn reopen_rebuilds_the_index_and_drops_stray_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let cas = Arc::new(Cas::open_with_budget(dir.path(), 1 << 20).unwrap());
            for i in 0..20 {
                let (d, data) = blob(i, 100 * usize::from(i));
                cas.put(&d, &data).unwrap();
            }
            let (d, _) = blob(99, 10);
            let mut w = cas.begin_write(d).unwrap();
            w.write(&[1; 3]).unwrap();
            std::mem::forget(w); // a crash mid-write
            assert_eq!(tmp_files(&cas), 1);
            cas.stats()
        };
        // A temp file where earlier versions kept them.
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/abc-1-0"), b"half").unwrap();
        let cas = Cas::open_with_budget(dir.path(), 1 << 20).unwrap();
        let after = cas.stats();
        assert_eq!((after.bytes, after.blobs), (before.bytes, before.blobs));
        assert_eq!((after.bytes, after.blobs), on_disk(dir.path()));
        assert_eq!(tmp_files(&cas), 0);
        assert!(!dir.path().join("tmp").exists());
        let (d, data) = blob(5, 500);
        assert_eq!(cas.get(&d).unwrap().unwrap(), data);
    }

    #[test]
    fn reopen_orders_by_modification_time() {
        let dir = tempfile::tempdir().unwrap();
        let blobs: Vec<_> = (0..3).map(|i| blob(i, 1000)).collect();
        {
            let cas = Cas::open(dir.path()).unwrap();
            for (d, data) in &blobs {
                cas.put(d, data).unwrap();
            }
            let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
            for (i, n) in [(2, 0), (0, 1), (1, 2)] {
                let f = std::fs::File::options()
                    .write(true)
                    .open(cas.path(&blobs[i].0))
                    .unwrap();
                f.set_modified(t + std::time::Duration::from_secs(n))
                    .unwrap();
            }
        }
        let cas = Cas::open_with_budget(dir.path(), 3000).unwrap();
        let (d, data) = blob(9, 1000);
        cas.put(&d, &data).unwrap();
        assert!(!cas.contains(&blobs[2].0), "the oldest file goes first");
        assert!(cas.contains(&blobs[0].0) && cas.contains(&blobs[1].0));
    }

    #[test]
    fn a_zero_budget_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Cas::open_with_budget(dir.path(), 0).is_err());
    }
}
