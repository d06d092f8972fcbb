//! Puts a local input tree into the farm's CAS: hashes the directory into a Merkle tree
//! (honouring `.farmignore`), asks the CAS which blobs it lacks — file digests while the rest
//! is still being hashed, so that a warm re-upload costs little more than hashing — and
//! uploads only those: small ones in BatchUpload batches, big ones streamed from their files
//! with Cas.Write.
use super::blobs::{batch_upload, find_missing, plan_batches, write_file, MAX_BATCH_BLOB_BYTES};
use super::display::mib;
use super::FarmClient;
use anyhow::{bail, Context};
use archfarm_proto::tree::{build_input_tree, build_tree_reporting, BuildOptions, LocalTree};
use archfarm_proto::{v1, Digest};
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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

/// File digests gathered before one FindMissing call while hashing goes on.
const FIND_MISSING_WHILE_HASHING: usize = 2048;

/// Hashes `dir` and uploads what the CAS lacks. File digests are looked up while hashing goes
/// on; the Directory messages once the tree is built.
pub async fn upload_dir(
    client: &mut FarmClient,
    dir: &Path,
    progress: Progress,
) -> anyhow::Result<UploadReport> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Digest>();
    let owned = dir.to_path_buf();
    let hashing = tokio::task::spawn_blocking(move || {
        let options = BuildOptions {
            honour_farmignore: true,
        };
        build_tree_reporting(&owned, &options, &|d| {
            let _ = tx.send(d);
        })
    });
    let mut asked: HashSet<Digest> = HashSet::new();
    let mut missing = Vec::new();
    let mut pending = Vec::new();
    let mut received = Vec::new();
    let mut lookups = Ok(());
    while rx
        .recv_many(&mut received, FIND_MISSING_WHILE_HASHING)
        .await
        > 0
    {
        pending.extend(received.drain(..).filter(|d| asked.insert(*d)));
        if pending.len() >= FIND_MISSING_WHILE_HASHING && lookups.is_ok() {
            match find_missing(client, &pending).await {
                Ok(m) => missing.extend(m),
                Err(e) => lookups = Err(e),
            }
            pending.clear();
        }
    }
    let tree = hashing
        .await
        .context("failed to join the hashing task")?
        .with_context(|| format!("failed to hash the input tree {}", dir.display()))?;
    lookups?;
    pending.extend(tree.directories.keys().filter(|d| asked.insert(**d)));
    missing.extend(find_missing(client, &pending).await?);
    send_missing(client, &tree, missing, progress).await
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
    let mut all = tree.all_digests();
    all.sort();
    all.dedup();
    missing.sort();
    missing.dedup();
    let bytes_total: u64 = all.iter().map(Digest::size_bytes).sum();
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
        blobs_total: all.len() as u64,
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
