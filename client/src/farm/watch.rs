//! The one way to follow a job, used by run, go-test, go-build and the chaos check: its event
//! stream, resumed after a break (a restarted coordinator, a lost connection) from the last
//! numbered event, with backoff for a while; and Ctrl-C counted so that callers cancel on the
//! first and give up on the second. Nothing here prints: breaks and resumptions are items the
//! caller shows as it likes.
use super::display::format_ms;
use super::{job, FarmClient, RpcError, WatchPoint};
use anyhow::{bail, Context};
use archfarm_proto::v1::{self, JobStatus};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tonic::Streaming;

/// How long a broken watch is retried before the command gives up (a coordinator restart
/// takes seconds; this covers a slow one without hanging CI forever).
pub const REWATCH_FOR: Duration = Duration::from_secs(120);

/// How long one reconnect-and-watch attempt may take before it counts as failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// What following a job yields.
#[derive(Debug)]
pub enum Watched {
    /// An event of the job, in order.
    Event(Box<v1::JobEvent>),
    /// The stream broke (the words say why); the next call reconnects.
    Lost(String),
    /// Watching again after a break, from the last numbered event.
    Resumed,
    /// The job finished while the watch was broken: its final status, read with GetJob.
    FinishedMeanwhile(Box<JobStatus>),
}

/// A job's event stream that survives breaks. Call [`JobEvents::next`] until it yields the
/// job's `finished` event or [`Watched::FinishedMeanwhile`].
pub struct JobEvents {
    client: FarmClient,
    job_id: String,
    point: WatchPoint,
    stream: Option<Streaming<v1::JobEvent>>,
    broken_since: Option<Instant>,
    resume_for: Duration,
    last_error: String,
}

impl JobEvents {
    /// Opens the watch of `job_id` from its first event.
    pub async fn open(client: &FarmClient, job_id: &str) -> anyhow::Result<Self> {
        let mut client = client.clone();
        let stream = client
            .watch_job(job_id, WatchPoint::default())
            .await
            .with_context(|| format!("failed to watch job {job_id}"))?;
        Ok(Self {
            client,
            job_id: job_id.to_string(),
            point: WatchPoint::default(),
            stream: Some(stream),
            broken_since: None,
            resume_for: REWATCH_FOR,
            last_error: String::new(),
        })
    }

    /// Gives up on a broken watch after `d` instead of [`REWATCH_FOR`].
    pub fn resume_for(mut self, d: Duration) -> Self {
        self.resume_for = d;
        self
    }

    /// The job watched.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    /// Where a resumed watch continues.
    pub fn point(&self) -> WatchPoint {
        self.point
    }

    /// Uses `client` from now on (e.g. one connected to a coordinator started again) and
    /// watches again through it at the next call.
    pub fn replace_client(&mut self, client: FarmClient) {
        self.client = client;
        self.stream = None;
        self.broken_since.get_or_insert_with(Instant::now);
    }

    /// The next thing that happened. Errors only when the watch cannot be resumed: a
    /// permanent refusal (the job is unknown, the caller may not see it) or no coordinator
    /// for the whole resume period. Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> anyhow::Result<Watched> {
        if let Some(stream) = self.stream.as_mut() {
            return Ok(match stream.message().await {
                Ok(Some(event)) => {
                    self.point.follow(&event);
                    Watched::Event(Box::new(event))
                }
                broken => {
                    self.stream = None;
                    self.broken_since = Some(Instant::now());
                    Watched::Lost(match broken {
                        Err(status) => RpcError(status).to_string(),
                        _ => "the coordinator ended the stream".to_string(),
                    })
                }
            });
        }
        let since = *self.broken_since.get_or_insert_with(Instant::now);
        let mut delay = Duration::from_millis(250);
        loop {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.resume()).await {
                Ok(Ok(Some(done))) => return Ok(done),
                Ok(Ok(None)) => {}
                Ok(Err(permanent)) => return Err(permanent),
                Err(_) => self.last_error = "no answer within 5 s".to_string(),
            }
            if since.elapsed() + delay >= self.resume_for {
                bail!(
                    "failed to watch job {} again within {}: {}",
                    self.job_id,
                    format_ms(self.resume_for.as_millis() as u64),
                    self.last_error
                );
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// One attempt to watch again: Some when done, None to retry (the reason kept), an error
    /// when retrying cannot help.
    async fn resume(&mut self) -> anyhow::Result<Option<Watched>> {
        if let Err(e) = self.client.reconnect().await {
            self.last_error = format!("{e:#}");
            return Ok(None);
        }
        match job::get_job(&mut self.client, &self.job_id).await {
            Ok(job) if job.finished => {
                self.broken_since = None;
                return Ok(Some(Watched::FinishedMeanwhile(Box::new(job))));
            }
            Ok(_) => {}
            Err(e) => {
                if e.downcast_ref::<RpcError>()
                    .is_some_and(|rpc| is_permanent(rpc.code()))
                {
                    return Err(e);
                }
                self.last_error = format!("{e:#}");
                return Ok(None);
            }
        }
        match self.client.watch_job(&self.job_id, self.point).await {
            Ok(stream) => {
                self.stream = Some(stream);
                self.broken_since = None;
                Ok(Some(Watched::Resumed))
            }
            Err(e) if is_permanent(e.code()) => {
                Err(anyhow::Error::new(e)
                    .context(format!("failed to watch job {} again", self.job_id)))
            }
            Err(e) => {
                self.last_error = e.to_string();
                Ok(None)
            }
        }
    }
}

/// Whether retrying cannot help.
pub fn is_permanent(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::NotFound
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
    )
}

/// Counts Ctrl-C presses. [`CtrlC::pressed`] resolves at the next one with how many there
/// have been; it is cancel-safe, so it can sit in a `select!` beside a watch.
pub struct CtrlC {
    count: u32,
    next: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Default for CtrlC {
    fn default() -> Self {
        Self {
            count: 0,
            next: next_interrupt(),
        }
    }
}

impl CtrlC {
    /// Waits for the next Ctrl-C; returns 1 for the first, 2 for the second, ...
    pub async fn pressed(&mut self) -> u32 {
        (&mut self.next).await;
        self.next = next_interrupt();
        self.count += 1;
        self.count
    }
}

/// Resolves on the next Ctrl-C (never, if the signal cannot be watched).
fn next_interrupt() -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}
