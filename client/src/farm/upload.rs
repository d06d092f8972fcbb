//! Puts a local input tree into the farm's CAS: hashes the directory into a Merkle tree
//! (honouring `.farmignore`; files whose metadata the digest cache recognises are not read at
//! all), asks the CAS which blobs it lacks — file digests while the rest is still being
//! hashed, and always, since the farm may have evicted what it once held — and uploads only
//! those: small ones in BatchUpload batches, big ones streamed from their files with
//! Cas.Write.
use super::blobs::{batch_upload, find_missing, plan_batches, write_file, MAX_BATCH_BLOB_BYTES};
use super::display::mib;
use super::FarmClient;
use anyhow::{bail, Context};
use archfarm_proto::digest_cache::DigestCache;
use archfarm_proto::tree::{
    build_input_tree, build_tree_remembering, BuildOptions, DigestMemo, LocalTree,
};
use archfarm_proto::{v1, Digest};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// Uploads bigger than this get a progress bar (when stderr is a terminal).
pub const PROGRESS_BAR_BYTES: u64 = 16 << 20;
/// Upload calls in flight at once: the coordinator stores each batch on a thread of its own
/// and waits for the disk (fsync) per blob, so several small batches at once keep it busier
/// than a few big ones (at most 8 x 16 MiB in memory).
const UPLOADS_IN_FLIGHT: usize = 8;

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReport {
    /// Root digest of the tree.
    pub root: Digest,
    /// Distinct blobs in the tree (directories and files).
    pub blobs_total: u64,
    /// Blobs the CAS lacked and that were sent.
    pub blobs_sent: u64,
    /// Bytes of the distinct blobs.
    pub bytes_total: u64,
    /// Bytes of the blobs sent.
    pub bytes_sent: u64,
    /// Bytes of the blobs the CAS already held, which were not sent.
    pub bytes_deduplicated: u64,
}

impl UploadReport {
    /// `uploaded N of M blobs (X MiB sent, Y MiB already in the farm)`.
    pub fn summary(&self) -> String {
        format!(
            "uploaded {} of {} blobs ({} MiB sent, {} MiB already in the farm)",
            self.blobs_sent,
            self.blobs_total,
            mib(self.bytes_sent),
            mib(self.bytes_deduplicated)
        )
    }

    /// `{"root": {"hash", "size_bytes"}, "blobs_total", "blobs_sent", "bytes_total",
    /// "bytes_sent", "bytes_deduplicated"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "root": { "hash": self.root.hex(), "size_bytes": self.root.size_bytes() },
            "blobs_total": self.blobs_total,
            "blobs_sent": self.blobs_sent,
            "bytes_total": self.bytes_total,
            "bytes_sent": self.bytes_sent,
            "bytes_deduplicated": self.bytes_deduplicated,
        })
    }
}

/// Whether an upload may draw a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A bar on stderr when the upload is over [`PROGRESS_BAR_BYTES`] and stderr is a
    /// terminal.
    Auto,
    /// Never.
    Hidden,
}

/// Hashes `dir` into a tree (on the blocking threads, files in parallel).
pub async fn hash_dir(dir: &Path) -> anyhow::Result<LocalTree> {
    let owned = dir.to_path_buf();
    tokio::task::spawn_blocking(move || build_input_tree(&owned))
        .await
        .context("failed to join the hashing task")?
        .with_context(|| format!("failed to hash the input tree {}", dir.display()))
}

/// While hashing goes on, FindMissing asks about the file digests that arrived during the
/// calls before, once there are at least this many (the calls batch themselves to the pace of
/// hashing, and little is left to ask once the tree is built) ...
const FIND_MISSING_AT_LEAST: usize = 256;
/// ... at most this many a call ...
const FIND_MISSING_WHILE_HASHING: usize = 1024;
/// ... one call at a time while hashing goes on (more would take cores from hashing), and this
/// many at once for what is left when it ends (the coordinator answers each on a thread of
/// its own, so they use every core).
const LOOKUPS_IN_FLIGHT: usize = 2;

/// Environment variable naming the digest cache's directory (tests and benchmarks point it
/// elsewhere).
pub const DIGEST_CACHE_ENV: &str = "ARCHFARM_DIGEST_CACHE";

/// The digest cache's directory: `$ARCHFARM_DIGEST_CACHE`, else
/// `$XDG_CACHE_HOME/archfarm/digests` (when absolute), else `$HOME/.cache/archfarm/digests`;
/// `None` (no cache) without any of them.
pub fn digest_cache_dir() -> Option<PathBuf> {
    digest_cache_dir_from(|name| std::env::var_os(name))
}

/// [`digest_cache_dir`] with the environment given.
fn digest_cache_dir_from(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let var = |name| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var(DIGEST_CACHE_ENV) {
        return Some(dir);
    }
    if let Some(xdg) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("archfarm").join("digests"));
    }
    var("HOME").map(|home| home.join(".cache").join("archfarm").join("digests"))
}

/// Hashes `dir` and uploads what the CAS lacks, with the digest cache in its default place
/// ([`digest_cache_dir`]).
pub async fn upload_dir(
    client: &mut FarmClient,
    dir: &Path,
    progress: Progress,
) -> anyhow::Result<UploadReport> {
    upload_dir_with(client, dir, progress, digest_cache_dir().as_deref()).await
}

/// Hashes `dir` (recalling what the digest cache in `cache_dir` knows, when there is one) and
/// uploads what the CAS lacks. File digests are looked up while hashing goes on; the
/// Directory messages once the tree is built.
pub async fn upload_dir_with(
    client: &mut FarmClient,
    dir: &Path,
    progress: Progress,
    cache_dir: Option<&Path>,
) -> anyhow::Result<UploadReport> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Digest>();
    let owned = dir.to_path_buf();
    let cache_dir = cache_dir.map(Path::to_path_buf);
    let started = SystemTime::now();
    let hashing = tokio::task::spawn_blocking(move || {
        let options = BuildOptions {
            honour_farmignore: true,
        };
        let on_file = |d| {
            let _ = tx.send(d);
        };
        let Some(cache_dir) = cache_dir else {
            return (
                build_tree_remembering(&owned, &options, None, &on_file),
                None,
            );
        };
        // The cache file is read on a thread of its own while the tree is walked.
        std::thread::scope(|scope| {
            let memo = LoadingCache {
                loading: Mutex::new(Some(
                    scope.spawn(|| DigestCache::load(&cache_dir, &owned, started)),
                )),
                cache: OnceLock::new(),
            };
            let tree = build_tree_remembering(&owned, &options, Some(&memo), &on_file);
            (tree, Some(memo.into_cache()))
        })
    });
    let mut lookups = Lookups::new(client.clone());
    let mut received = Vec::new();
    let mut receiving = true;
    let mut failed = None;
    while receiving || lookups.in_flight() {
        tokio::select! {
            n = rx.recv_many(&mut received, FIND_MISSING_AT_LEAST.max(4096)), if receiving => {
                if n == 0 {
                    receiving = false;
                } else {
                    lookups.add(received.drain(..));
                }
            }
            Some(answer) = lookups.calls.next(), if lookups.in_flight() => {
                if let Err(e) = lookups.take(answer) {
                    failed.get_or_insert(e);
                }
            }
        }
        if failed.is_none() {
            lookups.launch(false);
        }
    }
    let (tree, cache) = hashing.await.context("failed to join the hashing task")?;
    let tree = tree.with_context(|| format!("failed to hash the input tree {}", dir.display()))?;
    // The digests are facts about the files whatever becomes of the upload: saved meanwhile.
    let saving = cache.map(|cache| tokio::task::spawn_blocking(move || cache.save()));
    if let Some(e) = failed {
        return Err(e);
    }
    lookups.add(tree.directories.keys().copied());
    let missing = lookups.finish().await?;
    if let Some(saving) = saving {
        match saving.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("failed to save the digest cache: {e:#}"),
            Err(e) => eprintln!("failed to save the digest cache: {e}"),
        }
    }
    send_missing(client, &tree, missing, progress).await
}

/// FindMissing calls about an input tree's digests, made while it is being hashed: each digest
/// asked once, in calls of [`FIND_MISSING_AT_LEAST`] to [`FIND_MISSING_WHILE_HASHING`]
/// digests, one at a time while hashing goes on, [`LOOKUPS_IN_FLIGHT`] at a time after.
struct Lookups {
    client: FarmClient,
    asked: HashSet<Digest>,
    pending: Vec<Digest>,
    calls: futures::stream::FuturesUnordered<BoxFuture<'static, anyhow::Result<Vec<Digest>>>>,
    missing: Vec<Digest>,
}

impl Lookups {
    fn new(client: FarmClient) -> Self {
        Self {
            client,
            asked: HashSet::new(),
            pending: Vec::new(),
            calls: futures::stream::FuturesUnordered::new(),
            missing: Vec::new(),
        }
    }

    /// Queues digests not asked about yet.
    fn add(&mut self, digests: impl IntoIterator<Item = Digest>) {
        let asked = &mut self.asked;
        self.pending
            .extend(digests.into_iter().filter(|d| asked.insert(*d)));
    }

    fn in_flight(&self) -> bool {
        !self.calls.is_empty()
    }

    /// Starts calls while there is room: for full batches while hashing goes on, or, when
    /// `flush`ing after it, for whatever is queued.
    fn launch(&mut self, flush: bool) {
        let room = if flush { LOOKUPS_IN_FLIGHT } else { 1 };
        while self.calls.len() < room
            && (self.pending.len() >= FIND_MISSING_AT_LEAST || flush && !self.pending.is_empty())
        {
            let n = self.pending.len().min(FIND_MISSING_WHILE_HASHING);
            let batch: Vec<Digest> = self.pending.drain(..n).collect();
            let mut client = self.client.clone();
            self.calls.push(Box::pin(
                async move { find_missing(&mut client, &batch).await },
            ));
        }
    }

    /// Records a call's answer.
    fn take(&mut self, answer: anyhow::Result<Vec<Digest>>) -> anyhow::Result<()> {
        self.missing.extend(answer?);
        Ok(())
    }

    /// Asks about everything still queued; returns every digest the CAS lacks.
    async fn finish(mut self) -> anyhow::Result<Vec<Digest>> {
        self.launch(true);
        while let Some(answer) = self.calls.next().await {
            self.take(answer)?;
            self.launch(true);
        }
        Ok(self.missing)
    }
}

/// A digest cache being loaded on another thread; the first question waits for it.
struct LoadingCache<'scope> {
    loading: Mutex<Option<std::thread::ScopedJoinHandle<'scope, DigestCache>>>,
    cache: OnceLock<DigestCache>,
}

impl LoadingCache<'_> {
    fn get(&self) -> &DigestCache {
        self.cache.get_or_init(|| {
            let handle = self
                .loading
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            join_load(handle)
        })
    }

    fn into_cache(self) -> DigestCache {
        let Self { loading, cache } = self;
        cache.into_inner().unwrap_or_else(|| {
            join_load(
                loading
                    .into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            )
        })
    }
}

/// The loaded cache; a load that panicked passes its panic on.
fn join_load(handle: Option<std::thread::ScopedJoinHandle<'_, DigestCache>>) -> DigestCache {
    match handle.map(std::thread::ScopedJoinHandle::join) {
        Some(Ok(cache)) => cache,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => unreachable!("the digest cache is loaded once, under the lock"),
    }
}

impl DigestMemo for LoadingCache<'_> {
    fn recall(&self, rel: &Path, meta: &std::fs::Metadata) -> Option<Digest> {
        self.get().recall(rel, meta)
    }

    fn remember(&self, rel: &Path, meta: &std::fs::Metadata, digest: Digest) {
        self.get().remember(rel, meta, digest);
    }
}

/// One upload call.
enum Upload {
    /// Small blobs in one BatchUpload.
    Batch(Vec<Digest>),
    /// One big file streamed with Cas.Write.
    Stream(Digest, PathBuf),
}

/// Uploads the blobs of an already built `tree` that the CAS lacks.
pub async fn upload_tree(
    client: &mut FarmClient,
    tree: &LocalTree,
    progress: Progress,
) -> anyhow::Result<UploadReport> {
    let mut all = tree.all_digests();
    all.sort();
    all.dedup();
    let missing = find_missing(client, &all).await?;
    send_missing(client, tree, missing, progress).await
}

/// Uploads `missing`, blobs of `tree`, and reports against all of the tree's blobs.
async fn send_missing(
    client: &mut FarmClient,
    tree: &LocalTree,
    mut missing: Vec<Digest>,
    progress: Progress,
) -> anyhow::Result<UploadReport> {
    // Distinct blobs: a file whose bytes are those of a Directory message counts once.
    let both: Vec<&Digest> = (tree.directories.keys())
        .filter(|d| tree.files.contains_key(*d))
        .collect();
    let blobs_total = tree.directories.len() + tree.files.len() - both.len();
    let bytes_total: u64 = (tree.directories.keys().chain(tree.files.keys()))
        .map(Digest::size_bytes)
        .sum::<u64>()
        - both.iter().map(|d| d.size_bytes()).sum::<u64>();
    missing.sort();
    missing.dedup();
    let bytes_sent: u64 = missing.iter().map(Digest::size_bytes).sum();
    let (small, big): (Vec<Digest>, Vec<Digest>) = missing
        .iter()
        .partition(|d| d.size_bytes() <= MAX_BATCH_BLOB_BYTES);
    let mut uploads: Vec<Upload> = Vec::new();
    for d in big {
        let Some(path) = tree.files.get(&d) else {
            bail!("the CAS asked for blob {d}, which is not a file of the input tree");
        };
        uploads.push(Upload::Stream(d, path.clone()));
    }
    uploads.extend(plan_batches(&small).into_iter().map(Upload::Batch));

    let bar = if progress == Progress::Auto
        && bytes_sent > PROGRESS_BAR_BYTES
        && std::io::stderr().is_terminal()
    {
        let bar = ProgressBar::new(bytes_sent);
        if let Ok(style) = ProgressStyle::with_template(
            "uploading {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        ProgressBar::hidden()
    };
    futures::stream::iter(uploads)
        .map(|upload| {
            let mut client = client.clone();
            let bar = bar.clone();
            async move {
                match upload {
                    Upload::Batch(batch) => {
                        let blobs = read_batch(tree, batch).await?;
                        let bytes: u64 = blobs.iter().map(|b| b.data.len() as u64).sum();
                        batch_upload(&mut client, blobs).await?;
                        bar.inc(bytes);
                    }
                    Upload::Stream(d, path) => {
                        write_file(&mut client, d, &path, &bar).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(UPLOADS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    bar.finish_and_clear();
    Ok(UploadReport {
        root: tree.root,
        blobs_total: blobs_total as u64,
        blobs_sent: missing.len() as u64,
        bytes_total,
        bytes_sent,
        bytes_deduplicated: bytes_total - bytes_sent,
    })
}

/// Where a blob's bytes come from.
enum BlobSource {
    /// An encoded Directory, already in memory.
    Directory(Vec<u8>),
    /// A file on disk.
    File(PathBuf),
}

/// Reads a batch's blobs (off the async threads). A file whose size changed since it was
/// hashed is an error here; one whose bytes changed at the same size is refused by the CAS,
/// which checks every blob against its digest.
async fn read_batch(tree: &LocalTree, batch: Vec<Digest>) -> anyhow::Result<Vec<v1::Blob>> {
    let mut sources = Vec::with_capacity(batch.len());
    for d in batch {
        let source = if let Some(bytes) = tree.directories.get(&d) {
            BlobSource::Directory(bytes.clone())
        } else if let Some(path) = tree.files.get(&d) {
            BlobSource::File(path.clone())
        } else {
            bail!("the CAS asked for blob {d}, which is not in the input tree");
        };
        sources.push((d, source));
    }
    tokio::task::spawn_blocking(move || {
        sources
            .into_iter()
            .map(|(d, source)| {
                let data = match source {
                    BlobSource::Directory(bytes) => bytes,
                    BlobSource::File(path) => {
                        let data = std::fs::read(&path)
                            .with_context(|| format!("failed to read {}", path.display()))?;
                        if data.len() as u64 != d.size_bytes() {
                            bail!(
                                "{} changed since it was hashed ({} bytes then, {} now); run \
                                 again",
                                path.display(),
                                d.size_bytes(),
                                data.len()
                            );
                        }
                        data
                    }
                };
                Ok(v1::Blob {
                    digest: Some(d.to_proto()),
                    data,
                })
            })
            .collect()
    })
    .await
    .context("failed to join the reading task")?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_cache_directory_comes_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        const ALL: &[(&str, &str)] = &[
            (DIGEST_CACHE_ENV, "/x/digests"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        let dir = |vars| digest_cache_dir_from(env(vars));
        assert_eq!(dir(ALL), Some(PathBuf::from("/x/digests")));
        assert_eq!(dir(&ALL[1..]), Some(PathBuf::from("/xdg/archfarm/digests")));
        let home = Some(PathBuf::from("/home/u/.cache/archfarm/digests"));
        assert_eq!(
            dir(&[("XDG_CACHE_HOME", "relative"), ("HOME", "/home/u")]),
            home
        );
        assert_eq!(dir(&[(DIGEST_CACHE_ENV, ""), ("HOME", "/home/u")]), home);
        assert_eq!(dir(&[]), None);
    }

    #[test]
    fn the_report_says_what_was_sent_and_what_was_there() {
        let r = UploadReport {
            root: Digest::of(b"root"),
            blobs_total: 10,
            blobs_sent: 3,
            bytes_total: 5 << 20,
            bytes_sent: 3 << 19,
            bytes_deduplicated: (5 << 20) - (3 << 19),
        };
        assert_eq!(
            r.summary(),
            "uploaded 3 of 10 blobs (1.5 MiB sent, 3.5 MiB already in the farm)"
        );
        let v = r.to_json();
        assert_eq!(v["blobs_sent"], 3);
        assert_eq!(v["bytes_deduplicated"], (5 << 20) - (3 << 19));
        assert_eq!(v["root"]["hash"], Digest::of(b"root").hex());
        assert_eq!(v["root"]["size_bytes"], 4);
    }
}
