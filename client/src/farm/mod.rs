//! Talking to a farm: what every command shares: the connected client, and the one place
//! where a gRPC status becomes words; one module per command below it.

pub mod agents;
pub mod args;
pub mod blobs;
pub mod cancel;
pub mod credentials;
pub mod display;
pub mod download;
pub mod job;
pub mod job_watch;
pub mod line_prefixer;
pub mod run;
pub mod status;
pub mod token;
pub mod upload;
pub mod watch;

use anyhow::Context;
use archfarm_proto::tls::{self, Credentials, ServerTrust};
use archfarm_proto::v1::admin_client::AdminClient;
use archfarm_proto::v1::cas_client::CasClient;
use archfarm_proto::v1::jobs_client::JobsClient;
use archfarm_proto::MAX_MESSAGE_BYTES;
use std::fmt;
use tonic::transport::Channel;

pub use crate::config::FarmOptions;

/// A TLS connection to a coordinator with a client for each service a client may call.
#[derive(Clone)]
pub struct FarmClient {
    /// How to connect again; None for a client made from a ready channel.
    options: Option<FarmOptions>,
    url: String,
    /// Jobs service.
    pub jobs: JobsClient<Channel>,
    /// Content-addressed store.
    pub cas: CasClient<Channel>,
    /// Admin service (needs the admin role).
    pub admin: AdminClient<Channel>,
}

/// Where a watch of a job stands: the epoch and sequence number of the last event received
/// (the default: nothing received yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchPoint {
    /// JobEvent.epoch of the last numbered event.
    pub epoch: u64,
    /// JobEvent.seq of the last numbered event.
    pub seq: u64,
}

impl WatchPoint {
    /// Moves past `event` when it is numbered (events made up from stored state after a
    /// coordinator restart are not, and leave the point where it was).
    pub fn follow(&mut self, event: &archfarm_proto::v1::JobEvent) {
        if event.seq != 0 {
            *self = Self {
                epoch: event.epoch,
                seq: event.seq,
            };
        }
    }
}

impl FarmClient {
    /// Opens the event stream of a job (Jobs.Watch), from its start or, to resume a broken
    /// watch, after the last event received.
    pub async fn watch_job(
        &mut self,
        job_id: &str,
        from: WatchPoint,
    ) -> Result<tonic::Streaming<archfarm_proto::v1::JobEvent>, RpcError> {
        let req = archfarm_proto::v1::WatchRequest {
            job_id: job_id.to_string(),
            after_seq: from.seq,
            epoch: from.epoch,
        };
        rpc(self.jobs.watch(req).await)
    }

    /// Loads the credentials and connects (mutual TLS, trusting only the farm CA).
    pub async fn connect(options: &FarmOptions) -> anyhow::Result<Self> {
        let dir = &options.credentials;
        let creds = Credentials::load(dir).with_context(|| {
            format!(
                "failed to load the farm credentials in {} (pass --credentials DIR or set \
                 ARCHFARM_CREDENTIALS; `archfarm credentials create` makes a client's)",
                dir.display()
            )
        })?;
        let connected = tls::connect(
            &options.coordinator,
            &ServerTrust::Ca(creds.ca_pem.clone()),
            Some(&creds.identity),
        )
        .await?;
        let mut client = Self::from_channel(&options.coordinator, connected.channel);
        client.options = Some(options.clone());
        Ok(client)
    }

    /// A client over an already connected channel (tests use plain HTTP/2 on loopback).
    /// [`FarmClient::reconnect`] then leaves reconnecting to the channel itself.
    pub fn from_channel(url: &str, channel: Channel) -> Self {
        Self {
            options: None,
            url: url.to_string(),
            jobs: JobsClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            cas: CasClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            admin: AdminClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Opens a fresh connection with the same options (after the coordinator went away).
    pub async fn reconnect(&mut self) -> anyhow::Result<()> {
        if let Some(options) = self.options.clone() {
            *self = Self::connect(&options).await?;
        }
        Ok(())
    }

    /// The coordinator URL this client talks to.
    pub fn coordinator_url(&self) -> &str {
        &self.url
    }
}

/// A failed RPC, displayed as `<code in words>: <message>`.
#[derive(Debug)]
pub struct RpcError(pub tonic::Status);

impl RpcError {
    /// The gRPC status code.
    pub fn code(&self) -> tonic::Code {
        self.0.code()
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words = code_words(self.0.code());
        let message: Vec<&str> = self
            .0
            .message()
            .lines()
            .map(|l| l.trim().trim_end_matches(';'))
            .filter(|l| !l.is_empty())
            .collect();
        if message.is_empty() {
            write!(f, "{words}")
        } else {
            write!(f, "{words}: {}", message.join("; "))
        }
    }
}

impl std::error::Error for RpcError {}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        Self(status)
    }
}

/// Unwraps an RPC response, turning a status into a readable [`RpcError`]; add context with
/// `anyhow::Context`: `rpc(client.jobs.submit(req).await).context("failed to submit the job")`.
pub fn rpc<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T, RpcError> {
    result.map(tonic::Response::into_inner).map_err(RpcError)
}

/// A gRPC status code as words for people.
pub fn code_words(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "not implemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_one_line_of_words() {
        let e = RpcError(tonic::Status::invalid_argument(
            "platform \"linux/mips\" is unknown;\nknown: linux/amd64",
        ));
        assert_eq!(
            e.to_string(),
            "invalid argument: platform \"linux/mips\" is unknown; known: linux/amd64"
        );
        let e = anyhow::Error::new(RpcError(tonic::Status::not_found("")))
            .context("failed to get job j1");
        assert_eq!(format!("{e:#}"), "failed to get job j1: not found");
    }
}
