//! Puts a local input tree into the farm's CAS: hashes the directory into a Merkle tree, asks
//! the CAS which blobs it lacks, and uploads only those, in batches that fit one gRPC message.
use super::{rpc, FarmClient};
use anyhow::{bail, Context};
use archfarm_proto::tree::{build_local_tree, LocalTree};
use archfarm_proto::{v1, Digest};
use std::path::{Path, PathBuf};

/// A batch is closed once adding the next blob would take it past this many bytes.
pub const BATCH_TARGET_BYTES: u64 = 16 << 20;
/// Largest blob BatchUpload takes here; bigger ones need a streaming upload (not there yet).
pub const MAX_BATCH_BLOB_BYTES: u64 = 48 << 20;
/// Digests per FindMissing call (about 80 bytes each on the wire).
const FIND_MISSING_CHUNK: usize = 20_000;

/// What an upload did.
#[derive(Debug, Clone, Copy)]
pub struct UploadReport {
    /// Root digest of the tree.
    pub root: Digest,
    /// Distinct blobs in the tree (directories and files).
    pub total_blobs: usize,
    /// Blobs the CAS lacked and that were sent.
    pub uploaded_blobs: usize,
    /// Bytes of those blobs.
    pub uploaded_bytes: u64,
}

impl UploadReport {
    /// `uploaded N blobs (X MiB) of M`.
    pub fn summary(&self) -> String {
        format!(
            "uploaded {} blobs ({} MiB) of {}",
            self.uploaded_blobs,
            super::display::mib(self.uploaded_bytes),
            self.total_blobs
        )
    }
}

/// Groups blobs into upload batches in the given order: a batch holds blobs while their total
/// stays within [`BATCH_TARGET_BYTES`]; a bigger blob goes alone. Callers must have refused
/// blobs over [`MAX_BATCH_BLOB_BYTES`].
pub fn plan_batches(blobs: &[Digest]) -> Vec<Vec<Digest>> {
    let mut batches: Vec<Vec<Digest>> = Vec::new();
    let mut current: Vec<Digest> = Vec::new();
    let mut current_bytes = 0u64;
    for d in blobs {
        if !current.is_empty() && current_bytes + d.size_bytes() > BATCH_TARGET_BYTES {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes += d.size_bytes();
        current.push(*d);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Hashes `dir` and uploads what the CAS lacks.
pub async fn upload_dir(client: &mut FarmClient, dir: &Path) -> anyhow::Result<UploadReport> {
    let owned = dir.to_path_buf();
    let tree = tokio::task::spawn_blocking(move || build_local_tree(&owned))
        .await
        .context("failed to join the hashing task")?
        .with_context(|| format!("failed to hash the input tree {}", dir.display()))?;
    upload_tree(client, &tree).await
}

/// Uploads the blobs of `tree` that the CAS lacks.
pub async fn upload_tree(
    client: &mut FarmClient,
    tree: &LocalTree,
) -> anyhow::Result<UploadReport> {
    let mut all = tree.all_digests();
    all.sort();
    all.dedup();
    let mut missing = Vec::new();
    for chunk in all.chunks(FIND_MISSING_CHUNK) {
        let response = rpc(client
            .cas
            .find_missing(v1::FindMissingRequest {
                digests: chunk.iter().map(Digest::to_proto).collect(),
            })
            .await)
        .context("failed to ask the CAS which blobs it lacks")?;
        for d in &response.missing {
            missing.push(Digest::from_proto(d).context("failed to read FindMissing's answer")?);
        }
    }
    for d in &missing {
        if d.size_bytes() > MAX_BATCH_BLOB_BYTES {
            let name = tree
                .files
                .get(d)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| format!("blob {d}"));
            bail!(
                "{name} is {} MiB; blobs over {} MiB need a streaming upload, which the farm \
                 client does not have yet",
                super::display::mib(d.size_bytes()),
                MAX_BATCH_BLOB_BYTES >> 20
            );
        }
    }
    let mut uploaded_bytes = 0;
    for batch in plan_batches(&missing) {
        let blobs = read_batch(tree, batch).await?;
        let bytes: u64 = blobs.iter().map(|b| b.data.len() as u64).sum();
        let count = blobs.len();
        rpc(client
            .cas
            .batch_upload(v1::BatchUploadRequest { blobs })
            .await)
        .with_context(|| {
            format!(
                "failed to upload {count} blobs ({} MiB)",
                super::display::mib(bytes)
            )
        })?;
        uploaded_bytes += bytes;
    }
    Ok(UploadReport {
        root: tree.root,
        total_blobs: all.len(),
        uploaded_blobs: missing.len(),
        uploaded_bytes,
    })
}

/// Where a blob's bytes come from.
enum BlobSource {
    /// An encoded Directory, already in memory.
    Directory(Vec<u8>),
    /// A file on disk.
    File(PathBuf),
}

/// Reads a batch's blobs (off the async threads) and checks each file still has its digest.
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
                        if Digest::of(&data) != d {
                            bail!(
                                "{} changed while it was being uploaded; run again",
                                path.display()
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

    fn blob(size: u64) -> Digest {
        Digest::from_parts([size as u8; 32], size)
    }

    #[test]
    fn batches_stay_within_the_target_and_big_blobs_go_alone() {
        let mib = 1u64 << 20;
        let blobs = [
            blob(6 * mib),
            blob(6 * mib),
            blob(4 * mib),
            blob(mib),
            blob(30 * mib),
            blob(10),
        ];
        let sizes: Vec<Vec<u64>> = plan_batches(&blobs)
            .iter()
            .map(|b| b.iter().map(Digest::size_bytes).collect())
            .collect();
        assert_eq!(
            sizes,
            vec![
                vec![6 * mib, 6 * mib, 4 * mib],
                vec![mib],
                vec![30 * mib],
                vec![10]
            ]
        );
        assert!(plan_batches(&[]).is_empty());
    }
}
