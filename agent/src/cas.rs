//! The agent's view of the coordinator's CAS: a trait, so workspace and executor tests need no
//! server, and its gRPC implementation, which follows the session's reconnects.
use anyhow::{bail, Context};
use archfarm_proto::{v1, Digest, MAX_MESSAGE_BYTES};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// Reads and stores blobs by digest.
pub trait BlobStore: Send + Sync + 'static {
    /// Reads `digests`, returning their bytes in request order. The bytes are not verified:
    /// the caller checks them against the digests.
    fn read_blobs(
        &self,
        digests: Vec<Digest>,
    ) -> impl Future<Output = anyhow::Result<Vec<Vec<u8>>>> + Send;

    /// Stores `blobs` (digest and bytes).
    fn upload_blobs(
        &self,
        blobs: Vec<(Digest, Vec<u8>)>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// How long a CAS call waits for the session to (re)connect before giving up.
const CONNECT_WAIT: Duration = Duration::from_secs(60);
/// How long an upload keeps retrying across reconnects.
const UPLOAD_PATIENCE: Duration = Duration::from_secs(600);

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

    async fn client(&self) -> anyhow::Result<v1::cas_client::CasClient<Channel>> {
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
        let started = Instant::now();
        let mut backoff = crate::backoff::Backoff::default();
        loop {
            let mut client = self.client().await?;
            match client.batch_upload(request.clone()).await {
                Ok(_) => return Ok(()),
                Err(s) if retryable(s.code()) && started.elapsed() < UPLOAD_PATIENCE => {
                    tracing::debug!(
                        "failed to upload blobs ({:?}: {}); retrying",
                        s.code(),
                        s.message()
                    );
                    tokio::select! {
                        () = tokio::time::sleep(backoff.next_delay()) => {}
                        () = self.shutdown.cancelled() => bail!("the agent is stopping"),
                    }
                }
                Err(s) => bail!(
                    "failed to upload blobs to the CAS: {:?}: {}",
                    s.code(),
                    s.message()
                ),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod memory {
    //! A BlobStore in memory, for tests.
    use super::BlobStore;
    use anyhow::Context;
    use archfarm_proto::Digest;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Blobs in memory, counting what was read.
    #[derive(Default)]
    pub(crate) struct MemoryStore {
        pub blobs: Mutex<HashMap<Digest, Vec<u8>>>,
        pub reads: Mutex<Vec<Digest>>,
    }

    impl BlobStore for MemoryStore {
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
            self.blobs.lock().expect("lock").extend(blobs);
            Ok(())
        }
    }
}
