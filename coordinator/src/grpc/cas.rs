//! The Cas service: FindMissing, BatchUpload, BatchRead over the blob store.
use super::auth::authorize;
use super::{internal, SharedRef};
use crate::cas::CasError;
use crate::model::Role;
use archfarm_proto::v1::{self, cas_server::Cas};
use archfarm_proto::Digest;
use tonic::{Request, Response, Status};

/// The Cas service.
pub struct CasService(pub SharedRef);

const ROLES: &[Role] = &[Role::Client, Role::Agent];
/// Most digests in one FindMissing or BatchRead call.
pub const MAX_DIGESTS: usize = 200_000;

fn parse(i: usize, d: &v1::Digest) -> Result<Digest, Status> {
    Digest::from_proto(d).map_err(|e| Status::invalid_argument(format!("digest #{i}: {e}")))
}

type ReadStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<v1::ReadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Cas for CasService {
    type ReadStream = ReadStream;

    async fn write(
        &self,
        _req: Request<tonic::Streaming<v1::WriteRequest>>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        Err(Status::unimplemented("streaming write is being built"))
    }

    async fn read(&self, _req: Request<v1::ReadRequest>) -> Result<Response<ReadStream>, Status> {
        Err(Status::unimplemented("streaming read is being built"))
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
            digests
                .into_iter()
                .filter(|d| !shared.cas.contains(d))
                .map(|d| d.to_proto())
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
        let mut parsed = Vec::with_capacity(blobs.len());
        for (i, b) in blobs.into_iter().enumerate() {
            let d = parse(
                i,
                b.digest
                    .as_ref()
                    .ok_or_else(|| Status::invalid_argument(format!("blob #{i} has no digest")))?,
            )?;
            let actual = Digest::of(&b.data);
            if actual != d {
                return Err(Status::invalid_argument(format!(
                    "blob #{i} does not match its digest: declared {d}, actual {actual}; nothing was stored"
                )));
            }
            parsed.push((d, b.data));
        }
        let shared = self.0.clone();
        let stored = tokio::task::spawn_blocking(move || -> Result<u32, CasError> {
            let mut n = 0;
            for (d, data) in parsed {
                n += u32::from(shared.cas.put(&d, &data)?);
            }
            Ok(n)
        })
        .await
        .map_err(|e| Status::internal(format!("upload task failed: {e}")))?
        .map_err(|e| match e {
            CasError::Mismatch { .. } => Status::invalid_argument(e.to_string()),
            CasError::Io(e) => internal(e),
        })?;
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
        let total: u64 = digests.iter().map(|d| d.size_bytes()).sum();
        if total > (archfarm_proto::MAX_MESSAGE_BYTES as u64) - 1024 * 1024 {
            return Err(Status::invalid_argument(format!(
                "BatchRead of {total} bytes exceeds the message limit; read fewer blobs per call"
            )));
        }
        let shared = self.0.clone();
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
