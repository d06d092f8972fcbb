//! The agent's view of the coordinator's CAS: a trait, so workspace and executor tests need no
//! server, its gRPC implementation, which follows the session's reconnects, and the two paths
//! built on it: `upload_missing` (FindMissing, then small blobs in batches and large ones
//! streamed in 1 MiB chunks) and `read_to_file` (a large blob streamed to disk while hashed).
use anyhow::{bail, Context};
use archfarm_proto::{v1, Digest, MAX_MESSAGE_BYTES};
use futures::stream::{self, BoxStream, StreamExt};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Bytes per message of a streamed blob.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Blobs larger than this go through `Cas.Write` / `Cas.Read`; smaller ones are batched.
pub const STREAM_ABOVE_BYTES: u64 = 4 * 1024 * 1024;
/// Bytes of blobs sent in one BatchUpload call.
pub const UPLOAD_BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// Chunks read ahead of a streamed upload.
const WRITE_AHEAD_CHUNKS: usize = 4;
/// Digests asked about in one FindMissing call.
const FIND_MISSING_BATCH: usize = 10_000;

/// A blob's bytes in the order they arrive or are sent; an `Err` ends the stream.
pub type ChunkStream = BoxStream<'static, anyhow::Result<Vec<u8>>>;

/// Where the bytes of a blob to upload come from. Files are read as they are sent, so a
/// multi-GiB output never sits in memory.
#[derive(Clone, Debug)]
pub enum BlobSource {
    /// Bytes already in memory (stdout, stderr, Directory messages).
    Memory(Arc<[u8]>),
    /// A file in the work directory.
    File(PathBuf),
}

impl BlobSource {
    /// The bytes in chunks of `CHUNK_BYTES` (the last one shorter; none for an empty blob).
    pub fn chunks(&self) -> ChunkStream {
        match self {
            BlobSource::Memory(bytes) => {
                let bytes = bytes.clone();
                let starts = (0..bytes.len()).step_by(CHUNK_BYTES);
                stream::iter(starts.map(move |i| {
                    let end = (i + CHUNK_BYTES).min(bytes.len());
                    Ok(bytes[i..end].to_vec())
                }))
                .boxed()
            }
            BlobSource::File(path) => {
                let path = path.clone();
                stream::try_unfold(None::<tokio::fs::File>, move |file| {
                    let path = path.clone();
                    async move {
                        let mut file = match file {
                            Some(f) => f,
                            None => tokio::fs::File::open(&path)
                                .await
                                .with_context(|| format!("failed to open {}", path.display()))?,
                        };
                        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
                        (&mut file)
                            .take(CHUNK_BYTES as u64)
                            .read_to_end(&mut chunk)
                            .await
                            .with_context(|| format!("failed to read {}", path.display()))?;
                        anyhow::Ok((!chunk.is_empty()).then_some((chunk, Some(file))))
                    }
                })
                .boxed()
            }
        }
    }

    /// All the bytes, checked against `digest` (a file may have changed since it was hashed).
    async fn read_verified(&self, digest: &Digest) -> anyhow::Result<Vec<u8>> {
        let bytes = match self {
            BlobSource::Memory(bytes) => bytes.to_vec(),
            BlobSource::File(path) => tokio::fs::read(path)
                .await
                .with_context(|| format!("failed to read {}", path.display()))?,
        };
        if Digest::of(&bytes) != *digest {
            bail!("{} no longer matches its digest {digest}", self.describe());
        }
        Ok(bytes)
    }

    fn describe(&self) -> String {
        match self {
            BlobSource::Memory(_) => "a blob in memory".into(),
            BlobSource::File(p) => p.display().to_string(),
        }
    }
}

/// Reads and stores blobs by digest.
pub trait BlobStore: Send + Sync + 'static {
    /// The subset of `digests` the store does not hold.
    fn find_missing(
        &self,
        digests: Vec<Digest>,
    ) -> impl Future<Output = anyhow::Result<Vec<Digest>>> + Send;

    /// Reads `digests`, returning their bytes in request order. The bytes are not verified:
    /// the caller checks them against the digests.
    fn read_blobs(
        &self,
        digests: Vec<Digest>,
    ) -> impl Future<Output = anyhow::Result<Vec<Vec<u8>>>> + Send;

    /// Stores `blobs` (digest and bytes) in one call.
    fn upload_blobs(
        &self,
        blobs: Vec<(Digest, Vec<u8>)>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Streams one blob of any size in from `source`, chunk by chunk (`BlobSource::chunks`).
    /// The store verifies the bytes against `digest`.
    fn write_blob(
        &self,
        digest: Digest,
        source: BlobSource,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Streams one blob of any size out, in whatever chunks the store sends. The bytes are
    /// not verified: `read_to_file` and `read_to_memory` check them.
    fn read_blob(&self, digest: Digest)
        -> impl Future<Output = anyhow::Result<ChunkStream>> + Send;
}

/// What `upload_missing` sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadSummary {
    /// Distinct blobs named.
    pub named: usize,
    /// Blobs the store lacked and that were sent.
    pub sent: usize,
    /// Bytes of those blobs.
    pub sent_bytes: u64,
}

/// Makes sure the store holds every blob in `blobs`: asks FindMissing, then sends the missing
/// blobs of up to `STREAM_ABOVE_BYTES` in BatchUpload calls of at most `UPLOAD_BATCH_BYTES`
/// and larger ones one by one through `write_blob`.
pub async fn upload_missing<S: BlobStore>(
    store: &S,
    blobs: Vec<(Digest, BlobSource)>,
) -> anyhow::Result<UploadSummary> {
    let mut sources: std::collections::HashMap<Digest, BlobSource> =
        std::collections::HashMap::with_capacity(blobs.len());
    for (d, source) in blobs {
        sources.entry(d).or_insert(source);
    }
    let mut digests: Vec<Digest> = sources.keys().copied().collect();
    digests.sort();
    let mut missing = Vec::new();
    for chunk in digests.chunks(FIND_MISSING_BATCH) {
        missing.extend(
            store
                .find_missing(chunk.to_vec())
                .await
                .context("failed to ask the CAS which blobs it lacks")?,
        );
    }
    let mut summary = UploadSummary {
        named: digests.len(),
        ..Default::default()
    };
    let (large, small): (Vec<Digest>, Vec<Digest>) = missing
        .into_iter()
        .filter(|d| sources.contains_key(d))
        .partition(|d| d.size_bytes() > STREAM_ABOVE_BYTES);

    let mut batch: Vec<(Digest, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0u64;
    for d in small {
        if !batch.is_empty() && batch_bytes + d.size_bytes() > UPLOAD_BATCH_BYTES {
            store
                .upload_blobs(std::mem::take(&mut batch))
                .await
                .context("failed to upload a batch of blobs")?;
            batch_bytes = 0;
        }
        let bytes = sources[&d].read_verified(&d).await?;
        batch_bytes += d.size_bytes();
        summary.sent += 1;
        summary.sent_bytes += d.size_bytes();
        batch.push((d, bytes));
    }
    if !batch.is_empty() {
        store
            .upload_blobs(batch)
            .await
            .context("failed to upload a batch of blobs")?;
    }
    for d in large {
        store
            .write_blob(d, sources[&d].clone())
            .await
            .with_context(|| format!("failed to stream blob {d} to the CAS"))?;
        summary.sent += 1;
        summary.sent_bytes += d.size_bytes();
    }
    Ok(summary)
}

/// Streams blob `digest` into a new file at `path`, hashing as it goes. Fails (and removes
/// the file) when the bytes do not match the digest; otherwise returns the file, written and
/// flushed but not synced.
pub async fn read_to_file<S: BlobStore>(
    store: &S,
    digest: Digest,
    path: &Path,
) -> anyhow::Result<std::fs::File> {
    let result = async {
        let mut chunks = store.read_blob(digest).await?;
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .with_context(|| format!("failed to create {}", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        let mut received = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            received += chunk.len() as u64;
            if received > digest.size_bytes() {
                bail!(
                    "the CAS sent more than the {} bytes of {digest}",
                    digest.size_bytes()
                );
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
        let got = Digest::from_hasher(&hasher, received);
        if got != digest {
            bail!("blob {digest} from the CAS does not match its digest (got {got})");
        }
        file.flush()
            .await
            .with_context(|| format!("failed to write {}", path.display()))?;
        Ok(file.into_std().await)
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(path).await;
    }
    result
}

/// Streams blob `digest` into memory (at most `limit` bytes) and checks it.
pub async fn read_to_memory<S: BlobStore>(
    store: &S,
    digest: Digest,
    limit: u64,
) -> anyhow::Result<Vec<u8>> {
    if digest.size_bytes() > limit {
        bail!("blob {digest} is larger than the {limit} bytes allowed here");
    }
    let mut chunks = store.read_blob(digest).await?;
    let mut bytes = Vec::with_capacity(digest.size_bytes() as usize);
    while let Some(chunk) = chunks.next().await {
        bytes.extend_from_slice(&chunk?);
        if bytes.len() as u64 > digest.size_bytes() {
            bail!(
                "the CAS sent more than the {} bytes of {digest}",
                digest.size_bytes()
            );
        }
    }
    if Digest::of(&bytes) != digest {
        bail!("blob {digest} from the CAS does not match its digest");
    }
    Ok(bytes)
}

/// How long a CAS call waits for the session to (re)connect before giving up.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
/// How long a call keeps retrying across reconnects.
const RETRY_PATIENCE: Duration = Duration::from_secs(600);

type CasClient = v1::cas_client::CasClient<Channel>;

/// The coordinator's CAS over the channel of the current session.
#[derive(Clone)]
pub struct RemoteCas {
    channel: watch::Receiver<Option<Channel>>,
    shutdown: CancellationToken,
}

impl RemoteCas {
    /// A CAS that uses whichever channel `channel` holds, and stops waiting on `shutdown`.
    pub fn new(channel: watch::Receiver<Option<Channel>>, shutdown: CancellationToken) -> Self {
        Self { channel, shutdown }
    }

    async fn client(&self) -> anyhow::Result<CasClient> {
        let mut rx = self.channel.clone();
        // `biased`: a connected channel is used even while stopping (final uploads).
        let channel = tokio::select! {
            biased;
            r = tokio::time::timeout(CONNECT_WAIT, rx.wait_for(Option::is_some)) => match r {
                Ok(Ok(c)) => c.clone(),
                Ok(Err(_)) => bail!("the agent is stopping"),
                Err(_) => bail!("not connected to the coordinator for {} s", CONNECT_WAIT.as_secs()),
            },
            () = self.shutdown.cancelled() => bail!("the agent is stopping"),
        };
        let Some(channel) = channel else {
            bail!("not connected to the coordinator");
        };
        Ok(v1::cas_client::CasClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Runs `call` on a fresh client, again after transient failures (the session may be
    /// reconnecting) for up to `RETRY_PATIENCE`. `call`'s outer error is final; its inner
    /// `Status` is retried when transient.
    async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> anyhow::Result<T>
    where
        F: FnMut(CasClient) -> Fut,
        Fut: Future<Output = anyhow::Result<Result<T, tonic::Status>>>,
    {
        let started = Instant::now();
        let mut backoff = crate::backoff::Backoff::default();
        loop {
            let client = self.client().await?;
            match call(client).await? {
                Ok(v) => return Ok(v),
                Err(s) if retryable(s.code()) && started.elapsed() < RETRY_PATIENCE => {
                    tracing::debug!(
                        "failed to {what} ({:?}: {}); retrying",
                        s.code(),
                        s.message()
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = self.shutdown.cancelled() => bail!("the agent is stopping"),
                    }
                }
                Err(s) => bail!("failed to {what}: {:?}: {}", s.code(), s.message()),
            }
        }
    }
}

/// The messages of one `Cas.Write`: the digest alone, then the chunks of `source`, read by a
/// task a few chunks ahead of the sender. A read error ends the stream and is left in `failure`.
fn write_requests(
    digest: Digest,
    source: &BlobSource,
    failure: Arc<Mutex<Option<anyhow::Error>>>,
) -> ReceiverStream<v1::WriteRequest> {
    let (tx, rx) = mpsc::channel(WRITE_AHEAD_CHUNKS);
    let mut chunks = source.chunks();
    tokio::spawn(async move {
        let first = v1::WriteRequest {
            digest: Some(digest.to_proto()),
            data: Vec::new(),
        };
        if tx.send(first).await.is_err() {
            return;
        }
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(data) => {
                    if tx
                        .send(v1::WriteRequest { digest: None, data })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) => {
                    if let Ok(mut f) = failure.lock() {
                        *f = Some(e);
                    }
                    return;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

fn retryable(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
    )
}

impl BlobStore for RemoteCas {
    async fn find_missing(&self, digests: Vec<Digest>) -> anyhow::Result<Vec<Digest>> {
        let request = v1::FindMissingRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
        };
        let response = self
            .retrying("ask the CAS which blobs it lacks", |mut client| {
                let request = request.clone();
                async move { Ok(client.find_missing(request).await) }
            })
            .await?;
        response
            .into_inner()
            .missing
            .iter()
            .map(|d| Digest::from_proto(d).context("failed to parse a digest the CAS sent"))
            .collect()
    }

    async fn read_blobs(&self, digests: Vec<Digest>) -> anyhow::Result<Vec<Vec<u8>>> {
        let mut client = self.client().await?;
        let request = v1::BatchReadRequest {
            digests: digests.iter().map(Digest::to_proto).collect(),
        };
        let response = client.batch_read(request).await.map_err(|s| {
            anyhow::anyhow!(
                "failed to read {} blobs from the CAS: {:?}: {}",
                digests.len(),
                s.code(),
                s.message()
            )
        })?;
        let blobs = response.into_inner().blobs;
        if blobs.len() != digests.len() {
            bail!(
                "the CAS answered {} blobs for {} digests",
                blobs.len(),
                digests.len()
            );
        }
        digests
            .iter()
            .zip(blobs)
            .map(|(want, blob)| {
                let got = Digest::from_proto_required(blob.digest.as_ref())
                    .context("failed to parse a digest the CAS sent")?;
                if got != *want {
                    bail!("the CAS answered {got} where {want} was asked for");
                }
                Ok(blob.data)
            })
            .collect()
    }

    async fn upload_blobs(&self, blobs: Vec<(Digest, Vec<u8>)>) -> anyhow::Result<()> {
        let request = v1::BatchUploadRequest {
            blobs: blobs
                .into_iter()
                .map(|(d, data)| v1::Blob {
                    digest: Some(d.to_proto()),
                    data,
                })
                .collect(),
        };
        self.retrying("upload blobs to the CAS", |mut client| {
            let request = request.clone();
            async move { Ok(client.batch_upload(request).await) }
        })
        .await?;
        Ok(())
    }

    async fn write_blob(&self, digest: Digest, source: BlobSource) -> anyhow::Result<()> {
        let what = format!("stream blob {digest} to the CAS");
        self.retrying(&what, |mut client| {
            // A failure to read the source ends the request stream early (the coordinator then
            // refuses the short blob); it is reported from here, and not retried.
            let source_failure: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
            let requests = write_requests(digest, &source, source_failure.clone());
            async move {
                let response = client.write(requests).await;
                let failed = source_failure.lock().ok().and_then(|mut f| f.take());
                match failed {
                    Some(e) => Err(e),
                    None => Ok(response),
                }
            }
        })
        .await?;
        Ok(())
    }

    async fn read_blob(&self, digest: Digest) -> anyhow::Result<ChunkStream> {
        let request = v1::ReadRequest {
            digest: Some(digest.to_proto()),
        };
        let what = format!("stream blob {digest} from the CAS");
        let response = self
            .retrying(&what, |mut client| {
                let request = request.clone();
                async move { Ok(client.read(request).await) }
            })
            .await?;
        Ok(response
            .into_inner()
            .map(move |m| {
                m.map(|r| r.data).map_err(|s| {
                    anyhow::anyhow!(
                        "failed to stream blob {digest} from the CAS: {:?}: {}",
                        s.code(),
                        s.message()
                    )
                })
            })
            .boxed())
    }
}

#[cfg(test)]
pub(crate) mod memory {
    //! A BlobStore in memory, for tests. It checks what it is given as the coordinator does
    //! and records every call, so tests can see batching and chunking.
    use super::{BlobSource, BlobStore, ChunkStream, CHUNK_BYTES};
    use anyhow::{bail, Context};
    use archfarm_proto::Digest;
    use futures::{stream, StreamExt};
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Blobs in memory, counting what was read and written.
    #[derive(Default)]
    pub(crate) struct MemoryStore {
        pub blobs: Mutex<HashMap<Digest, Vec<u8>>>,
        /// Every digest read, by BatchRead or streaming.
        pub reads: Mutex<Vec<Digest>>,
        /// Digests read by streaming.
        pub streamed_reads: Mutex<Vec<Digest>>,
        /// Bytes of each BatchUpload call.
        pub batch_uploads: Mutex<Vec<u64>>,
        /// Each streamed write: the digest and the sizes of the chunks that carried it.
        pub writes: Mutex<Vec<(Digest, Vec<usize>)>>,
        /// Digests asked about in FindMissing calls.
        pub asked: Mutex<Vec<Digest>>,
        /// Chunk size of streamed reads (0: `CHUNK_BYTES`).
        pub read_chunk_bytes: usize,
        /// Refuse every upload, as a coordinator that went away would.
        pub refuse_uploads: bool,
    }

    impl MemoryStore {
        pub(crate) fn insert(&self, bytes: &[u8]) -> Digest {
            let d = Digest::of(bytes);
            self.blobs.lock().expect("lock").insert(d, bytes.to_vec());
            d
        }

        pub(crate) fn get(&self, d: &Digest) -> Option<Vec<u8>> {
            self.blobs.lock().expect("lock").get(d).cloned()
        }
    }

    impl BlobStore for MemoryStore {
        async fn find_missing(&self, digests: Vec<Digest>) -> anyhow::Result<Vec<Digest>> {
            self.asked.lock().expect("lock").extend(&digests);
            let blobs = self.blobs.lock().expect("lock");
            Ok(digests
                .into_iter()
                .filter(|d| !blobs.contains_key(d))
                .collect())
        }

        async fn read_blobs(&self, digests: Vec<Digest>) -> anyhow::Result<Vec<Vec<u8>>> {
            let blobs = self.blobs.lock().expect("lock");
            self.reads
                .lock()
                .expect("lock")
                .extend(digests.iter().copied());
            digests
                .iter()
                .map(|d| {
                    blobs
                        .get(d)
                        .cloned()
                        .with_context(|| format!("{d} not found"))
                })
                .collect()
        }

        async fn upload_blobs(&self, blobs: Vec<(Digest, Vec<u8>)>) -> anyhow::Result<()> {
            if self.refuse_uploads {
                bail!("Unavailable: the store refuses uploads");
            }
            for (d, bytes) in &blobs {
                if Digest::of(bytes) != *d {
                    bail!("blob does not match {d}");
                }
            }
            let bytes = blobs.iter().map(|(_, b)| b.len() as u64).sum();
            self.batch_uploads.lock().expect("lock").push(bytes);
            self.blobs.lock().expect("lock").extend(blobs);
            Ok(())
        }

        async fn write_blob(&self, digest: Digest, source: BlobSource) -> anyhow::Result<()> {
            if self.refuse_uploads {
                bail!("Unavailable: the store refuses uploads");
            }
            let mut chunks = source.chunks();
            let mut bytes = Vec::new();
            let mut sizes = Vec::new();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk?;
                sizes.push(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            let got = Digest::of(&bytes);
            if got != digest {
                bail!("InvalidArgument: got {got}, expected {digest}");
            }
            self.writes.lock().expect("lock").push((digest, sizes));
            self.blobs.lock().expect("lock").insert(digest, bytes);
            Ok(())
        }

        async fn read_blob(&self, digest: Digest) -> anyhow::Result<ChunkStream> {
            self.reads.lock().expect("lock").push(digest);
            self.streamed_reads.lock().expect("lock").push(digest);
            let bytes = self
                .get(&digest)
                .with_context(|| format!("NotFound: {digest}"))?;
            let size = match self.read_chunk_bytes {
                0 => CHUNK_BYTES,
                n => n,
            };
            let chunks: Vec<anyhow::Result<Vec<u8>>> =
                bytes.chunks(size).map(|c| Ok(c.to_vec())).collect();
            Ok(stream::iter(chunks).boxed())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryStore;
    use super::*;

    const MIB: usize = 1024 * 1024;

    /// Bytes that differ from chunk to chunk, so a reordered or dropped chunk changes the hash.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 20) as u8))
            .collect()
    }

    #[tokio::test]
    async fn large_blobs_stream_in_one_mib_chunks_from_files_and_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file_bytes = pattern(5 * MIB + MIB / 2 + 3, 1);
        let path = dir.path().join("big");
        std::fs::write(&path, &file_bytes).expect("write");
        let mem_bytes = pattern(4 * MIB + 1, 2);
        let (fd, md) = (Digest::of(&file_bytes), Digest::of(&mem_bytes));
        let store = MemoryStore::default();
        let summary = upload_missing(
            &store,
            vec![
                (fd, BlobSource::File(path.clone())),
                (md, BlobSource::Memory(mem_bytes.clone().into())),
            ],
        )
        .await
        .expect("upload");
        assert_eq!(summary.sent, 2);
        assert_eq!(store.get(&fd).as_deref(), Some(file_bytes.as_slice()));
        assert_eq!(store.get(&md).as_deref(), Some(mem_bytes.as_slice()));
        let mut writes = store.writes.lock().expect("lock").clone();
        writes.sort();
        let mut expected = vec![
            (fd, vec![MIB, MIB, MIB, MIB, MIB, MIB / 2 + 3]),
            (md, vec![MIB, MIB, MIB, MIB, 1]),
        ];
        expected.sort();
        assert_eq!(writes, expected);
        assert!(store.batch_uploads.lock().expect("lock").is_empty());

        // A second upload finds everything present and sends nothing.
        let again = upload_missing(&store, vec![(fd, BlobSource::File(path))])
            .await
            .expect("upload again");
        assert_eq!((again.named, again.sent), (1, 0));
        assert_eq!(store.writes.lock().expect("lock").len(), 2);
    }

    #[tokio::test]
    async fn a_file_that_changed_since_hashing_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, pattern(5 * MIB, 3)).expect("write");
        let d = Digest::of(&pattern(5 * MIB, 4));
        let store = MemoryStore::default();
        let e = upload_missing(&store, vec![(d, BlobSource::File(path.clone()))])
            .await
            .expect_err("changed file uploaded");
        assert!(format!("{e:#}").contains("expected"), "{e:#}");
        std::fs::write(&path, b"small").expect("write");
        let e = upload_missing(&store, vec![(Digest::of(b"other"), BlobSource::File(path))])
            .await
            .expect_err("changed small file uploaded");
        assert!(format!("{e:#}").contains("no longer matches"), "{e:#}");
        assert!(store.blobs.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn small_blobs_go_in_batches_of_at_most_16_mib_and_only_missing_ones() {
        let store = MemoryStore::default();
        let blobs: Vec<Vec<u8>> = (0..7).map(|i| pattern(3 * MIB, 10 + i)).collect();
        let present = store.insert(&blobs[0]);
        let tiny = b"tiny".to_vec();
        let mut list: Vec<(Digest, BlobSource)> = blobs
            .iter()
            .chain([&tiny])
            .map(|b| (Digest::of(b), BlobSource::Memory(b.clone().into())))
            .collect();
        list.push(list[1].clone()); // named twice, sent once
        let summary = upload_missing(&store, list).await.expect("upload");
        assert_eq!((summary.named, summary.sent), (8, 7));
        assert_eq!(summary.sent_bytes, 6 * 3 * MIB as u64 + 4);
        let batches = store.batch_uploads.lock().expect("lock").clone();
        assert!(
            batches.iter().all(|b| *b <= UPLOAD_BATCH_BYTES),
            "{batches:?}"
        );
        assert_eq!(batches.iter().sum::<u64>(), summary.sent_bytes);
        assert_eq!(batches.len(), 2, "{batches:?}");
        assert!(store.writes.lock().expect("lock").is_empty());
        assert!(store.asked.lock().expect("lock").contains(&present));
        for b in &blobs {
            assert!(store.get(&Digest::of(b)).is_some());
        }
    }

    #[tokio::test]
    async fn streamed_reads_reassemble_odd_chunks_and_are_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = MemoryStore {
            read_chunk_bytes: 1000,
            ..Default::default()
        };
        let bytes = pattern(5 * MIB + 17, 5);
        let d = store.insert(&bytes);
        let path = dir.path().join("got");
        read_to_file(&store, d, &path).await.expect("read");
        assert_eq!(std::fs::read(&path).expect("read back"), bytes);
        assert_eq!(
            read_to_memory(&store, d, u64::MAX).await.expect("memory"),
            bytes
        );
        assert!(read_to_memory(&store, d, 1000).await.is_err());

        // A store that serves other bytes: refused, and nothing is left behind.
        store.read_chunk_bytes = MIB;
        let liar = Digest::of(&pattern(5 * MIB + 17, 6));
        store
            .blobs
            .lock()
            .expect("lock")
            .insert(liar, bytes.clone());
        let bad = dir.path().join("bad");
        let e = read_to_file(&store, liar, &bad)
            .await
            .expect_err("corrupt blob accepted");
        assert!(format!("{e:#}").contains("does not match"), "{e:#}");
        assert!(!bad.exists());

        // A store that sends more than the digest's size is cut off.
        let short = Digest::from_parts(*d.hash_bytes(), 10);
        store
            .blobs
            .lock()
            .expect("lock")
            .insert(short, bytes.clone());
        let e = read_to_file(&store, short, &bad)
            .await
            .expect_err("long blob accepted");
        assert!(format!("{e:#}").contains("more than"), "{e:#}");
        assert!(!bad.exists());
    }

    #[tokio::test]
    async fn the_empty_blob_streams_as_no_chunks() {
        let store = MemoryStore::default();
        let d = Digest::empty();
        store
            .write_blob(d, BlobSource::Memory(Vec::new().into()))
            .await
            .expect("write");
        assert_eq!(store.writes.lock().expect("lock")[0].1, Vec::<usize>::new());
        let dir = tempfile::tempdir().expect("tempdir");
        read_to_file(&store, d, &dir.path().join("e"))
            .await
            .expect("read");
    }
}
