//! Moving blobs to and from the farm's CAS: FindMissing in batches, BatchUpload and BatchRead
//! for small blobs, and Cas.Write / Cas.Read streams in 1 MiB chunks for big ones, straight
//! from and to files so that no big blob is ever held in memory. Everything read is checked
//! against its digest before anyone sees it.
use super::{rpc, FarmClient};
use anyhow::{bail, Context};
use archfarm_proto::{v1, Digest};
use futures::StreamExt;
use indicatif::ProgressBar;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Blobs up to this size travel in BatchUpload / BatchRead; bigger ones are streamed.
pub const MAX_BATCH_BLOB_BYTES: u64 = 4 << 20;
/// A batch is closed once adding the next blob would take it past this many bytes.
pub const BATCH_TARGET_BYTES: u64 = 16 << 20;
/// ... or once it holds this many blobs (smaller batches of small files spread over more
/// upload calls in flight).
pub const BATCH_MAX_BLOBS: usize = 256;
/// Digests per FindMissing call (about 80 bytes each on the wire: 8 MB a call).
pub const FIND_MISSING_BATCH: usize = 100_000;
/// Bytes per Cas.Write message and per read from the file behind it.
pub const STREAM_CHUNK_BYTES: usize = 1 << 20;
/// Chunks read ahead of the network in a streamed upload or download.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Groups blobs into batches in the given order: a batch holds blobs while their total stays
/// within [`BATCH_TARGET_BYTES`] and their count within [`BATCH_MAX_BLOBS`]; a bigger blob
/// goes alone.
pub fn plan_batches(blobs: &[Digest]) -> Vec<Vec<Digest>> {
    let mut batches: Vec<Vec<Digest>> = Vec::new();
    let mut current: Vec<Digest> = Vec::new();
    let mut current_bytes = 0u64;
    for d in blobs {
        let full =
            current_bytes + d.size_bytes() > BATCH_TARGET_BYTES || current.len() >= BATCH_MAX_BLOBS;
        if !current.is_empty() && full {
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

/// Cas.FindMissing over any number of digests, [`FIND_MISSING_BATCH`] per call; returns the
/// missing ones in the given order.
pub async fn find_missing(
    client: &mut FarmClient,
    digests: &[Digest],
) -> anyhow::Result<Vec<Digest>> {
    let mut missing = Vec::new();
    for chunk in digests.chunks(FIND_MISSING_BATCH) {
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
    Ok(missing)
}

/// Cas.BatchUpload of blobs already in memory.
pub async fn batch_upload(client: &mut FarmClient, blobs: Vec<v1::Blob>) -> anyhow::Result<()> {
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
    Ok(())
}

/// Reads into `buf` until it is full or the file ends; returns the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Streams the file at `path`, whose bytes must be `digest`, into the CAS with Cas.Write:
/// the first message names the digest, then 1 MiB chunks as they are read. Advances
/// `progress` by the bytes sent. Returns whether the store did not hold it before.
pub async fn write_file(
    client: &mut FarmClient,
    digest: Digest,
    path: &Path,
    progress: &ProgressBar,
) -> anyhow::Result<bool> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let owned = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut file = std::fs::File::open(&owned)
            .with_context(|| format!("failed to open {}", owned.display()))?;
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; STREAM_CHUNK_BYTES];
            let n = read_full(&mut file, &mut buf)
                .with_context(|| format!("failed to read {}", owned.display()))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            sent += n as u64;
            if sent > digest.size_bytes() {
                break;
            }
            if tx.blocking_send(buf).is_err() {
                return Ok(()); // the call ended early; its status says why
            }
        }
        if sent != digest.size_bytes() {
            bail!(
                "{} changed since it was hashed ({} bytes then, {}{} now); run again",
                owned.display(),
                digest.size_bytes(),
                if sent > digest.size_bytes() {
                    "more than "
                } else {
                    ""
                },
                sent
            );
        }
        Ok(())
    });
    let header = v1::WriteRequest {
        digest: Some(digest.to_proto()),
        data: Vec::new(),
    };
    let bar = progress.clone();
    let chunks = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |data| {
        bar.inc(data.len() as u64);
        v1::WriteRequest { digest: None, data }
    });
    let requests = futures::stream::iter([header]).chain(chunks);
    let response = rpc(client.cas.write(requests).await);
    let read = reader
        .await
        .context("failed to join the file reading task")?;
    read?;
    let response = response.with_context(|| {
        format!(
            "failed to stream {} ({} MiB) into the CAS",
            path.display(),
            super::display::mib(digest.size_bytes())
        )
    })?;
    Ok(response.stored)
}

/// Cas.BatchRead of small blobs; each blob is checked against its digest. Returns the bytes
/// in the order asked.
pub async fn batch_read(
    client: &mut FarmClient,
    digests: &[Digest],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let response = rpc(client
        .cas
        .batch_read(v1::BatchReadRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
        })
        .await)
    .with_context(|| format!("failed to read {} blobs from the CAS", digests.len()))?;
    if response.blobs.len() != digests.len() {
        bail!(
            "the CAS answered {} blobs for {} asked",
            response.blobs.len(),
            digests.len()
        );
    }
    let mut out = Vec::with_capacity(digests.len());
    for (want, blob) in digests.iter().zip(response.blobs) {
        let got = Digest::of(&blob.data);
        if got != *want {
            bail!("the CAS sent blob {got} for {want}: corrupt in transit or in the store");
        }
        out.push(blob.data);
    }
    Ok(out)
}

/// A Cas.Read stream of one blob that checks the total size as chunks arrive (the caller
/// checks the hash).
struct BlobReader {
    digest: Digest,
    stream: tonic::Streaming<v1::ReadResponse>,
    received: u64,
}

impl BlobReader {
    async fn open(client: &mut FarmClient, digest: Digest) -> anyhow::Result<Self> {
        let stream = rpc(client
            .cas
            .read(v1::ReadRequest {
                digest: Some(digest.to_proto()),
            })
            .await)
        .with_context(|| format!("failed to read blob {digest} from the CAS"))?;
        Ok(Self {
            digest,
            stream,
            received: 0,
        })
    }

    /// The next chunk; None at the end, which must come at exactly the blob's size.
    async fn next(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let digest = self.digest;
        let message = self
            .stream
            .message()
            .await
            .map_err(super::RpcError)
            .with_context(|| format!("failed to read blob {digest} from the CAS"))?;
        match message {
            Some(chunk) => {
                self.received += chunk.data.len() as u64;
                if self.received > digest.size_bytes() {
                    bail!("the CAS sent more than the {digest} it was asked for");
                }
                Ok(Some(chunk.data))
            }
            None if self.received != digest.size_bytes() => {
                bail!("the CAS sent {} bytes of blob {digest}", self.received)
            }
            None => Ok(None),
        }
    }
}

/// A whole blob in memory: BatchRead when small, Cas.Read otherwise; checked.
pub async fn read_blob(client: &mut FarmClient, digest: Digest) -> anyhow::Result<Vec<u8>> {
    if digest.size_bytes() <= MAX_BATCH_BLOB_BYTES {
        let mut blobs = batch_read(client, &[digest]).await?;
        return blobs.pop().context("the CAS answered no blob");
    }
    let mut data = Vec::with_capacity(usize::try_from(digest.size_bytes()).unwrap_or(0));
    let mut reader = BlobReader::open(client, digest).await?;
    while let Some(chunk) = reader.next().await? {
        data.extend_from_slice(&chunk);
    }
    let got = Digest::of(&data);
    if got != digest {
        bail!("the CAS sent blob {got} for {digest}: corrupt in transit or in the store");
    }
    Ok(data)
}

/// Where a file is written before it is renamed into place.
fn partial_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Streams blob `digest` with Cas.Read into a new file at `dest` (mode 0755 when
/// `executable`, else 0644), hashing as it arrives; the file appears only once its bytes are
/// checked. Advances `progress` by the bytes received.
pub async fn read_to_file(
    client: &mut FarmClient,
    digest: Digest,
    dest: &Path,
    executable: bool,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let partial = partial_path(dest);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    let target = partial.clone();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<Digest> {
        let mut file = std::fs::File::create(&target)
            .with_context(|| format!("failed to create {}", target.display()))?;
        let mut hasher = blake3::Hasher::new();
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            file.write_all(&chunk)
                .with_context(|| format!("failed to write {}", target.display()))?;
        }
        set_mode(&target, executable)?;
        Ok(Digest::from_hasher(&hasher, hasher.count()))
    });
    let received = async {
        let mut reader = BlobReader::open(client, digest).await?;
        while let Some(chunk) = reader.next().await? {
            progress.inc(chunk.len() as u64);
            if tx.send(chunk).await.is_err() {
                break; // the writer stopped; its error is reported below
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(tx);
    let written = writer.await.context("failed to join the file writing task");
    let checked = (|| {
        received?;
        let got = written??;
        if got != digest {
            bail!("the CAS sent blob {got} for {digest}: corrupt in transit or in the store");
        }
        std::fs::rename(&partial, dest)
            .with_context(|| format!("failed to rename into {}", dest.display()))
    })();
    if checked.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    checked
}

/// Writes `data` to a new file at `dest` with the executable bit or not (through a partial
/// file and a rename, so that a file under its final name is always whole).
pub fn write_new_file(dest: &Path, data: &[u8], executable: bool) -> anyhow::Result<()> {
    let partial = partial_path(dest);
    let written = (|| {
        std::fs::write(&partial, data)
            .with_context(|| format!("failed to write {}", partial.display()))?;
        set_mode(&partial, executable)?;
        std::fs::rename(&partial, dest)
            .with_context(|| format!("failed to rename into {}", dest.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    written
}

/// 0755 or 0644.
pub fn set_mode(path: &Path, executable: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to set the mode of {}", path.display()))
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
        let many = vec![blob(1); BATCH_MAX_BLOBS + 1];
        let counts: Vec<usize> = plan_batches(&many).iter().map(Vec::len).collect();
        assert_eq!(counts, [BATCH_MAX_BLOBS, 1]);
    }

    #[test]
    fn new_files_appear_whole_with_their_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("tool");
        write_new_file(&dest, b"#!/bin/sh\n", true).unwrap();
        let meta = std::fs::metadata(&dest).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
