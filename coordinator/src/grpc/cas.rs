//! The Cas service: FindMissing, BatchUpload and BatchRead for small blobs, streaming Write and
//! Read for blobs of any size. The chunk loops are plain functions over streams (`write_blob`,
//! `read_blob`) so tests drive exactly what the RPCs run; file IO stays on blocking threads.
use super::auth::{authorize, authorize_stream};
use super::{internal, SharedRef};
use crate::cas::{Cas, CasError, VerifiedBlob};
use crate::model::Role;
use crate::pending_blobs::PENDING_WAIT;
use archfarm_proto::v1::{self, cas_server::Cas as CasRpc};
use archfarm_proto::Digest;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// The Cas service.
pub struct CasService(pub SharedRef);

const ROLES: &[Role] = &[Role::Client, Role::Agent];
/// Most digests in one FindMissing or BatchRead call.
pub const MAX_DIGESTS: usize = 200_000;
/// Largest blob Read verifies in full before it sends the first byte. Larger blobs are
/// verified while they stream, and a mismatch ends the stream with DATA_LOSS.
pub const VERIFY_BEFORE_STREAM_BYTES: u64 = 64 << 20;
/// Chunks in flight between the network and the blocking thread that writes or reads the file.
const CHUNKS_IN_FLIGHT: usize = 4;

fn parse(i: usize, d: &v1::Digest) -> Result<Digest, Status> {
    Digest::from_proto(d).map_err(|e| Status::invalid_argument(format!("digest #{i}: {e}")))
}

/// Maps a store error to what the caller sees; `what` names the call.
fn cas_status(what: &str, e: CasError) -> Status {
    match e {
        CasError::Mismatch { .. } | CasError::TooLong { .. } => {
            Status::invalid_argument(format!("{what}: {e}"))
        }
        CasError::Corrupt(_) => Status::data_loss(e.to_string()),
        CasError::Abandoned(_) => Status::aborted(format!("{what}: {e}")),
        CasError::Io(e) => internal(e.context(format!("{what} a blob"))),
    }
}

fn task_failed(what: &str, e: tokio::task::JoinError) -> Status {
    Status::internal(format!("{what} task failed: {e}"))
}

/// The digest a Write declares: the first message must carry a valid one.
pub fn write_digest(first: Option<&v1::WriteRequest>) -> Result<Digest, Status> {
    const NO_DIGEST: &str = "write: the first message must carry the digest";
    let d = first
        .and_then(|m| m.digest.as_ref())
        .ok_or_else(|| Status::invalid_argument(NO_DIGEST))?;
    Digest::from_proto(d).map_err(|e| Status::invalid_argument(format!("{NO_DIGEST}: {e}")))
}

/// Checks a BatchUpload: every blob carries a valid digest its bytes hash to. (Hashing, so it
/// runs on a blocking thread.)
pub fn check_upload(blobs: Vec<v1::Blob>) -> Result<Vec<VerifiedBlob>, Status> {
    let mut parsed = Vec::with_capacity(blobs.len());
    for (i, b) in blobs.into_iter().enumerate() {
        let d = parse(
            i,
            b.digest
                .as_ref()
                .ok_or_else(|| Status::invalid_argument(format!("blob #{i} has no digest")))?,
        )?;
        let blob = VerifiedBlob::check(d, b.data).map_err(|e| match e {
            CasError::Mismatch { declared, actual } => Status::invalid_argument(format!(
                "blob #{i} does not match its digest: declared {declared}, actual {actual}; nothing was stored"
            )),
            e => cas_status("upload", e),
        })?;
        parsed.push(blob);
    }
    Ok(parsed)
}

/// What the network side hands the blocking writer.
enum Piece {
    Data(Vec<u8>),
    End,
}

/// Runs one Write: the declared digest from the first message, then every chunk in order into
/// a temp file (hashed as it is written, on a blocking thread), verified and stored at the end
/// of the stream. Returns whether the blob was new. Nothing is stored unless it all checks out.
pub async fn write_blob<S>(cas: Arc<Cas>, mut messages: S) -> Result<bool, Status>
where
    S: Stream<Item = Result<v1::WriteRequest, Status>> + Unpin,
{
    let first = messages.next().await.transpose()?;
    let declared = write_digest(first.as_ref())?;
    let mut data = first.map(|m| m.data).unwrap_or_default();
    let (tx, mut rx) = mpsc::channel::<Piece>(CHUNKS_IN_FLIGHT);
    let writer = tokio::task::spawn_blocking(move || -> Result<bool, CasError> {
        let mut w = cas.begin_write(declared)?;
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Data(chunk) => w.write(&chunk)?,
                Piece::End => return w.finish(),
            }
        }
        Err(CasError::Abandoned(declared))
    });
    let mut received = 0u64;
    let fed = async {
        loop {
            if !data.is_empty() {
                received += data.len() as u64;
                if received > declared.size_bytes() {
                    return Err(cas_status(
                        "write",
                        CasError::TooLong { declared, received },
                    ));
                }
                if tx
                    .send(Piece::Data(std::mem::take(&mut data)))
                    .await
                    .is_err()
                {
                    return Ok(()); // the writer stopped; its error is the answer
                }
            }
            match messages.next().await {
                Some(Ok(m)) => data = m.data,
                Some(Err(e)) => return Err(e),
                None => {
                    let _ = tx.send(Piece::End).await;
                    return Ok(());
                }
            }
        }
    }
    .await;
    // Without `End` the writer drops its temp file; wait for that, so a failed Write has
    // left nothing behind when it answers.
    drop(tx);
    let written = writer.await.map_err(|e| task_failed("write", e))?;
    fed?;
    written.map_err(|e| cas_status("write", e))
}

/// Yields a verified blob held in memory in chunks of at most 1 MiB.
struct MemoryChunks {
    data: Vec<u8>,
    at: usize,
}

impl Iterator for MemoryChunks {
    type Item = Result<v1::ReadResponse, Status>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.data.len() {
            return None;
        }
        let end = self.data.len().min(self.at + crate::cas::READ_CHUNK_BYTES);
        let data = self.data[self.at..end].to_vec();
        self.at = end;
        Some(Ok(v1::ReadResponse { data }))
    }
}

/// Runs one Read. A blob of at most `verify_first_up_to` bytes is read and verified before
/// anything is sent (a corrupt copy is removed and the answer is NOT_FOUND); a larger one is
/// verified as it streams, and a mismatch found at the end removes it and ends the stream with
/// DATA_LOSS, since the client already holds bytes. A missing blob is NOT_FOUND.
pub async fn read_blob(
    cas: Arc<Cas>,
    d: Digest,
    verify_first_up_to: u64,
) -> Result<ReadStream, Status> {
    let not_found = || Status::not_found(format!("blob {d} is not in the store"));
    cas.pending().wait_written(&[d], PENDING_WAIT).await;
    if d.size_bytes() <= verify_first_up_to {
        let data = tokio::task::spawn_blocking(move || cas.get(&d))
            .await
            .map_err(|e| task_failed("read", e))?
            .map_err(|e| internal(e.context("read a blob")))?
            .ok_or_else(not_found)?;
        return Ok(Box::pin(tokio_stream::iter(MemoryChunks { data, at: 0 })));
    }
    let reader = tokio::task::spawn_blocking(move || cas.open_blob(&d))
        .await
        .map_err(|e| task_failed("read", e))?
        .map_err(|e| internal(e.context("open a blob")))?
        .ok_or_else(not_found)?;
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        for chunk in reader {
            let msg = chunk
                .map(|data| v1::ReadResponse { data })
                .map_err(|e| cas_status("read", e));
            if tx.blocking_send(msg).is_err() {
                break; // the client went away
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

type ReadStream = std::pin::Pin<Box<dyn Stream<Item = Result<v1::ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CasRpc for CasService {
    type ReadStream = ReadStream;

    async fn write(
        &self,
        req: Request<tonic::Streaming<v1::WriteRequest>>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        let (_, guard) = authorize_stream(&self.0, &req, ROLES)?;
        let stored = write_blob(self.0.cas.clone(), guard.guard(req.into_inner())).await?;
        Ok(Response::new(v1::WriteResponse { stored }))
    }

    async fn read(&self, req: Request<v1::ReadRequest>) -> Result<Response<ReadStream>, Status> {
        let (_, guard) = authorize_stream(&self.0, &req, ROLES)?;
        let d = Digest::from_proto_required(req.get_ref().digest.as_ref())
            .map_err(|e| Status::invalid_argument(format!("read: {e}")))?;
        let stream = read_blob(self.0.cas.clone(), d, VERIFY_BEFORE_STREAM_BYTES).await?;
        Ok(Response::new(Box::pin(guard.guard(stream))))
    }

    async fn find_missing(
        &self,
        req: Request<v1::FindMissingRequest>,
    ) -> Result<Response<v1::FindMissingResponse>, Status> {
        authorize(&self.0, &req, ROLES)?;
        let r = req.into_inner();
        if r.digests.len() > MAX_DIGESTS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DIGESTS} digests per call"
            )));
        }
        let digests = r
            .digests
            .iter()
            .enumerate()
            .map(|(i, d)| parse(i, d))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = self.0.clone();
        let missing = tokio::task::spawn_blocking(move || {
            shared
                .cas
                .find_missing(digests)
                .iter()
                .map(Digest::to_proto)
                .collect()
        })
        .await
        .map_err(|e| Status::internal(format!("FindMissing task failed: {e}")))?;
        Ok(Response::new(v1::FindMissingResponse { missing }))
    }

    async fn batch_upload(
        &self,
        req: Request<v1::BatchUploadRequest>,
    ) -> Result<Response<v1::BatchUploadResponse>, Status> {
        authorize(&self.0, &req, ROLES)?;
        let blobs = req.into_inner().blobs;
        let shared = self.0.clone();
        // One group commit per call (see `Cas::put_batch`): the answer comes once every blob
        // of the batch is durable.
        let stored = tokio::task::spawn_blocking(move || -> Result<u32, Status> {
            let verified = check_upload(blobs)?;
            shared
                .cas
                .put_batch(&verified)
                .map_err(|e| cas_status("upload", e))
        })
        .await
        .map_err(|e| Status::internal(format!("upload task failed: {e}")))??;
        Ok(Response::new(v1::BatchUploadResponse { stored }))
    }

    async fn batch_read(
        &self,
        req: Request<v1::BatchReadRequest>,
    ) -> Result<Response<v1::BatchReadResponse>, Status> {
        authorize(&self.0, &req, ROLES)?;
        let r = req.into_inner();
        let digests = r
            .digests
            .iter()
            .enumerate()
            .map(|(i, d)| parse(i, d))
            .collect::<Result<Vec<_>, _>>()?;
        // Saturating: sizes are the caller's claims, and two of u64::MAX must not wrap.
        let total = digests
            .iter()
            .fold(0u64, |sum, d| sum.saturating_add(d.size_bytes()));
        if total > (archfarm_proto::MAX_MESSAGE_BYTES as u64) - 1024 * 1024 {
            return Err(Status::invalid_argument(format!(
                "BatchRead of {total} bytes exceeds the message limit; read fewer blobs per call"
            )));
        }
        let shared = self.0.clone();
        shared
            .cas
            .pending()
            .wait_written(&digests, PENDING_WAIT)
            .await;
        let blobs = tokio::task::spawn_blocking(move || -> Result<Vec<v1::Blob>, Status> {
            digests
                .into_iter()
                .map(|d| match shared.cas.get(&d) {
                    Ok(Some(data)) => Ok(v1::Blob {
                        digest: Some(d.to_proto()),
                        data,
                    }),
                    Ok(None) => Err(Status::not_found(format!("blob {d} is not in the store"))),
                    Err(e) => Err(internal(e)),
                })
                .collect()
        })
        .await
        .map_err(|e| Status::internal(format!("read task failed: {e}")))??;
        Ok(Response::new(v1::BatchReadResponse { blobs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn blob(seed: u8, len: usize) -> (Digest, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect();
        (Digest::of(&data), data)
    }

    fn open() -> (tempfile::TempDir, Arc<Cas>) {
        let dir = tempfile::tempdir().unwrap();
        let cas = Arc::new(Cas::open(dir.path()).unwrap());
        (dir, cas)
    }

    type Messages = Vec<Result<v1::WriteRequest, Status>>;

    fn msg(digest: Option<v1::Digest>, data: &[u8]) -> Result<v1::WriteRequest, Status> {
        Ok(v1::WriteRequest {
            digest,
            data: data.to_vec(),
        })
    }

    /// Splits `data` into chunks of uneven sizes; the first message carries the digest and
    /// no data, as a client that sends the digest alone would.
    fn uneven(d: &v1::Digest, data: &[u8]) -> Messages {
        let mut out = vec![msg(Some(d.clone()), &[])];
        let sizes = [1, 300_001, 1 << 20, 7, 2_000_003, 65_536];
        let mut at = 0;
        for n in sizes.iter().cycle() {
            if at >= data.len() {
                break;
            }
            let end = data.len().min(at + n);
            out.push(msg(None, &data[at..end]));
            at = end;
        }
        out
    }

    fn leftovers(cas: &Cas) -> usize {
        cas.temp_files()
    }

    async fn read_all(
        cas: &Arc<Cas>,
        d: Digest,
        verify_first_up_to: u64,
    ) -> (Vec<u8>, Option<Status>) {
        let mut stream = match read_blob(cas.clone(), d, verify_first_up_to).await {
            Ok(s) => s,
            Err(e) => return (vec![], Some(e)),
        };
        let mut got = Vec::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(m) => {
                    assert!(m.data.len() <= crate::cas::READ_CHUNK_BYTES);
                    got.extend_from_slice(&m.data);
                }
                Err(e) => return (got, Some(e)),
            }
        }
        (got, None)
    }

    #[tokio::test]
    async fn rejected_writes_store_nothing() {
        let (d, data) = blob(1, 1000);
        let (other, _) = blob(2, 1000);
        let short = Digest::from_parts(*d.hash_bytes(), 999);
        let long = Digest::from_parts(*d.hash_bytes(), 1001);
        let bad_hex = v1::Digest {
            hash: "Z".repeat(64),
            size_bytes: 1000,
        };
        let cases: Vec<(&str, Messages, Vec<String>)> = vec![
            (
                "empty stream",
                vec![],
                vec!["the first message must carry the digest".into()],
            ),
            (
                "digest only in the second message",
                vec![msg(None, &data), msg(Some(d.to_proto()), &[])],
                vec!["the first message must carry the digest".into()],
            ),
            (
                "bad hex",
                vec![msg(Some(bad_hex), &data)],
                vec![
                    "the first message must carry the digest".into(),
                    "not 64 lower-case hex".into(),
                ],
            ),
            (
                "digest mismatch",
                vec![msg(Some(other.to_proto()), &data)],
                vec![format!("declared {other}, actual {d}; nothing was stored")],
            ),
            (
                "declared size too large",
                vec![
                    msg(Some(long.to_proto()), &data[..500]),
                    msg(None, &data[500..]),
                ],
                vec![format!("declared {long}, actual {d}; nothing was stored")],
            ),
            (
                "declared size too small",
                vec![
                    msg(Some(short.to_proto()), &data[..600]),
                    msg(None, &data[600..]),
                ],
                vec![format!("declares 999 bytes but at least 1000 arrived")],
            ),
        ];
        for (name, messages, wanted) in cases {
            let (_dir, cas) = open();
            let err = write_blob(cas.clone(), tokio_stream::iter(messages))
                .await
                .expect_err(name);
            assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
            for w in wanted {
                assert!(
                    err.message().contains(&w),
                    "{name}: {:?} lacks {w:?}",
                    err.message()
                );
            }
            assert_eq!(cas.stats().blobs, 0, "{name}: something was stored");
            assert_eq!(leftovers(&cas), 0, "{name}: a temp file was left behind");
        }
    }

    #[test]
    fn rejected_batch_uploads() {
        let (d, data) = blob(1, 100);
        let (other, _) = blob(2, 100);
        let lie = Digest::from_parts(*d.hash_bytes(), 99);
        let upload = |digest: Option<v1::Digest>, data: &[u8]| v1::Blob {
            digest,
            data: data.to_vec(),
        };
        let cases = [
            ("no digest", upload(None, &data), "blob #1 has no digest".to_string()),
            (
                "bad hex",
                upload(
                    Some(v1::Digest {
                        hash: "abc".into(),
                        size_bytes: 100,
                    }),
                    &data,
                ),
                "digest #1: digest hash \"abc\" is not 64 lower-case hex".into(),
            ),
            (
                "digest mismatch",
                upload(Some(other.to_proto()), &data),
                format!("blob #1 does not match its digest: declared {other}, actual {d}; nothing was stored"),
            ),
            (
                "size that lies",
                upload(Some(lie.to_proto()), &data),
                format!("declared {lie}, actual {d}; nothing was stored"),
            ),
        ];
        for (name, bad, wanted) in cases {
            let good = upload(Some(d.to_proto()), &data);
            let err = check_upload(vec![good, bad]).expect_err(name);
            assert_eq!(err.code(), Code::InvalidArgument, "{name}");
            assert!(
                err.message().contains(&wanted),
                "{name}: {:?}",
                err.message()
            );
        }
        assert_eq!(
            check_upload(vec![upload(Some(d.to_proto()), &data)])
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn streaming_write_of_a_multi_mib_blob_in_uneven_chunks() {
        let (_dir, cas) = open();
        let (d, data) = blob(3, 6 * crate::cas::READ_CHUNK_BYTES + 4321);
        let stored = write_blob(
            cas.clone(),
            tokio_stream::iter(uneven(&d.to_proto(), &data)),
        )
        .await
        .unwrap();
        assert!(stored);
        assert_eq!(cas.get(&d).unwrap().unwrap(), data);
        let again = write_blob(
            cas.clone(),
            tokio_stream::iter(uneven(&d.to_proto(), &data)),
        )
        .await
        .unwrap();
        assert!(!again, "a blob already present is not stored twice");
        let f = cas.stats();
        assert_eq!(f.uploaded_bytes, d.size_bytes());
        assert_eq!(f.deduplicated_bytes, d.size_bytes());
        assert_eq!(leftovers(&cas), 0);

        // One flipped byte in the middle: refused, naming both digests, nothing left behind.
        let (e, mut evil) = blob(4, 5 * crate::cas::READ_CHUNK_BYTES + 1);
        evil[3 * crate::cas::READ_CHUNK_BYTES] ^= 0x40;
        let err = write_blob(
            cas.clone(),
            tokio_stream::iter(uneven(&e.to_proto(), &evil)),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message()
                .contains(&format!("declared {e}, actual {}", Digest::of(&evil))),
            "{}",
            err.message()
        );
        assert!(!cas.contains(&e));
        assert_eq!(leftovers(&cas), 0);
        assert_eq!(cas.stats().blobs, 1);
    }

    #[tokio::test]
    async fn a_client_that_breaks_off_leaves_nothing() {
        let (_dir, cas) = open();
        let (d, data) = blob(5, 3000);
        let messages = vec![
            msg(Some(d.to_proto()), &data[..1000]),
            Err(Status::cancelled("client went away")),
        ];
        let err = write_blob(cas.clone(), tokio_stream::iter(messages))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Cancelled);
        assert_eq!(leftovers(&cas), 0);
        assert!(!cas.contains(&d));
    }

    #[tokio::test]
    async fn a_read_of_a_blob_staged_for_a_commit_waits_for_the_commit_to_write_it() {
        let (_dir, cas) = open();
        let (d, data) = blob(9, 100);
        let staged = VerifiedBlob::check(d, data.clone()).unwrap();
        cas.pending().add([d]);
        let reader = {
            let cas = cas.clone();
            tokio::spawn(async move { read_all(&cas, d, VERIFY_BEFORE_STREAM_BYTES).await })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            !reader.is_finished(),
            "answered before the commit wrote the blob"
        );
        // What the group commit does with a staged blob.
        cas.put_batch(std::slice::from_ref(&staged)).unwrap();
        cas.pending().settle([d]);
        let (got, err) = reader.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn reads_stream_verified_chunks_and_refuse_corrupt_blobs() {
        let (_dir, cas) = open();
        let (d, data) = blob(6, 3 * crate::cas::READ_CHUNK_BYTES + 17);
        cas.put(&d, &data).unwrap();
        // Verified before streaming, and verified while streaming.
        for verify_first_up_to in [VERIFY_BEFORE_STREAM_BYTES, 1024] {
            let (got, err) = read_all(&cas, d, verify_first_up_to).await;
            assert!(err.is_none(), "{err:?}");
            assert_eq!(got, data);
        }
        let (empty, _) = blob(0, 0);
        cas.put(&empty, &[]).unwrap();
        let (got, err) = read_all(&cas, empty, 0).await;
        assert!(got.is_empty() && err.is_none(), "{err:?}");

        let (missing, _) = blob(7, 10);
        let (_, err) = read_all(&cas, missing, VERIFY_BEFORE_STREAM_BYTES).await;
        assert_eq!(err.map(|e| e.code()), Some(Code::NotFound));

        // A flipped byte in a blob verified before streaming: nothing sent, NOT_FOUND, removed.
        let path = || {
            let hex = d.hex();
            _dir.path()
                .join(&hex[..2])
                .join(format!("{hex}-{}", d.size_bytes()))
        };
        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(path(), &bad).unwrap();
        let (got, err) = read_all(&cas, d, VERIFY_BEFORE_STREAM_BYTES).await;
        assert!(got.is_empty());
        assert_eq!(err.map(|e| e.code()), Some(Code::NotFound));
        assert!(!path().exists() && !cas.contains(&d));

        // The same in a blob verified while streaming: the stream ends with DATA_LOSS.
        cas.put(&d, &data).unwrap();
        std::fs::write(path(), &bad).unwrap();
        let (got, err) = read_all(&cas, d, 1024).await;
        assert_eq!(
            got.len(),
            data.len(),
            "every byte was sent before the check"
        );
        let err = err.expect("the stream must end with an error");
        assert_eq!(err.code(), Code::DataLoss);
        assert_eq!(
            err.message(),
            format!("blob {d} is corrupt on the coordinator's disk and was removed")
        );
        assert!(!path().exists() && !cas.contains(&d));
    }
}
