//! The session with the coordinator: hello, heartbeats, assignments, cancels and result
//! delivery, reconnecting forever. Executions outlive sessions; their results wait in a
//! pending map until the coordinator acknowledges them.
use crate::backoff::{Backoff, MAX_DELAY};
use crate::cas::RemoteCas;
use crate::executor::{self, ActionControl, ExecutorSettings, LogSink};
use crate::host::{self, HostFacts};
use anyhow::{bail, Context};
use archfarm_proto::tls::{self, Credentials, ServerTrust};
use archfarm_proto::{v1, Platform, MAX_MESSAGE_BYTES};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use v1::agent_message::Kind as Out;
use v1::coordinator_message::Kind as In;

/// Messages buffered towards the coordinator (log chunks beyond this are dropped).
const OUTBOX_CAPACITY: usize = 256;
/// How long the coordinator has to answer Hello with Welcome.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat interval used when Welcome names none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// An action by id and lease fence.
type ActionKey = (String, u64);

/// What the agent is, and what it is doing, across sessions.
pub struct AgentState {
    coordinator_url: String,
    data_dir: PathBuf,
    host: HostFacts,
    platforms: Vec<(Platform, bool)>,
    slots: u32,
    settings: ExecutorSettings,
    policy: PolicyFacts,
    cas: RemoteCas,
    channel: watch::Sender<Option<Channel>>,
    agent_id: Mutex<String>,
    inner: Mutex<Inner>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Default)]
struct Inner {
    /// Actions being prepared or run.
    running: HashMap<ActionKey, Arc<ActionControl>>,
    /// Finished actions whose result the coordinator has not acknowledged yet.
    pending: BTreeMap<ActionKey, v1::ActionCompleted>,
    /// Outbox of the current session, if one is open.
    session: Option<mpsc::Sender<v1::AgentMessage>>,
}

/// What the agent's policy tells the coordinator about itself.
#[derive(Clone, Debug, Default)]
pub struct PolicyFacts {
    /// Sandbox mode, e.g. "bwrap (uid 65534, no network)".
    pub sandbox: String,
    /// How limits are enforced, and their values.
    pub limits: String,
    /// Label keys it accepts work for; `None`: every bound label.
    pub accept_labels: Option<Vec<String>>,
    /// Actions that ask for the network may have it.
    pub allow_network: bool,
    /// Below this many free bytes on the data disk it takes no new work.
    pub min_free_disk_bytes: u64,
}

impl PolicyFacts {
    /// Why the agent should take no new work with `free` bytes free; empty when it should.
    pub fn paused_reason(&self, free: u64) -> String {
        if free < self.min_free_disk_bytes {
            format!(
                "free disk {} is below the policy's minimum of {}",
                crate::limits::bytes(free),
                crate::limits::bytes(self.min_free_disk_bytes)
            )
        } else {
            String::new()
        }
    }
}

/// Everything `AgentState::new` needs.
pub struct StateParts {
    /// Coordinator URL.
    pub coordinator_url: String,
    /// Data directory (for free-disk reports).
    pub data_dir: PathBuf,
    /// Host facts.
    pub host: HostFacts,
    /// Offered platforms, native first, with their emulated flag.
    pub platforms: Vec<(Platform, bool)>,
    /// Concurrent actions.
    pub slots: u32,
    /// What executions share.
    pub settings: ExecutorSettings,
    /// What the operator's policy tells the coordinator.
    pub policy: PolicyFacts,
    /// Agent id known from joining, if any.
    pub agent_id: Option<String>,
    /// Fires when the agent must stop.
    pub shutdown: CancellationToken,
}

impl AgentState {
    /// New state with nothing running.
    pub fn new(parts: StateParts) -> Arc<Self> {
        let (channel, channel_rx) = watch::channel(None);
        Arc::new(Self {
            coordinator_url: parts.coordinator_url,
            data_dir: parts.data_dir,
            host: parts.host,
            platforms: parts.platforms,
            slots: parts.slots,
            settings: parts.settings,
            policy: parts.policy,
            cas: RemoteCas::new(channel_rx, parts.shutdown.clone()),
            channel,
            agent_id: Mutex::new(parts.agent_id.unwrap_or_default()),
            inner: Mutex::new(Inner::default()),
            tracker: TaskTracker::new(),
            shutdown: parts.shutdown,
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent maps behind: keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn agent_id(&self) -> String {
        self.agent_id.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// How many actions are being prepared or run.
    pub fn running_count(&self) -> usize {
        self.inner().running.len()
    }

    /// How many results wait for an acknowledgement.
    pub fn pending_count(&self) -> usize {
        self.inner().pending.len()
    }

    /// Stops every running action as an infrastructure failure (the agent is going away).
    pub fn abandon_all(&self, reason: &str) {
        for control in self.inner().running.values() {
            control.abandon(reason);
        }
    }

    /// Tracks every execution task.
    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    fn running_list(inner: &Inner) -> Vec<v1::RunningAction> {
        let mut list: Vec<_> = inner
            .running
            .keys()
            .map(|(action_id, fence)| v1::RunningAction {
                action_id: action_id.clone(),
                fence: *fence,
            })
            .collect();
        list.sort_by(|a, b| (&a.action_id, a.fence).cmp(&(&b.action_id, b.fence)));
        list
    }
}

/// Sends a control message without blocking the session loop on a full outbox.
fn send_soon(tx: &mpsc::Sender<v1::AgentMessage>, kind: Out) {
    let msg = v1::AgentMessage { kind: Some(kind) };
    match tx.try_send(msg) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(msg)) => {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }
}

/// Live output of one action, to whichever session is open.
struct SessionLogs {
    state: Arc<AgentState>,
    action_id: String,
    fence: u64,
}

impl LogSink for SessionLogs {
    async fn send(&self, stream: v1::LogStream, data: Vec<u8>) {
        let Some(tx) = self.state.inner().session.clone() else {
            return;
        };
        let msg = v1::AgentMessage {
            kind: Some(Out::Log(v1::LogChunk {
                action_id: self.action_id.clone(),
                fence: self.fence,
                stream: stream as i32,
                data,
            })),
        };
        if tx.try_send(msg).is_err() {
            tracing::trace!(
                "dropped a log chunk of {}: outbox full or closed",
                self.action_id
            );
        }
    }
}

/// Runs one execution and queues its result for delivery.
async fn run_execution(state: Arc<AgentState>, assign: v1::Assign, control: Arc<ActionControl>) {
    let logs = SessionLogs {
        state: state.clone(),
        action_id: assign.action_id.clone(),
        fence: assign.fence,
    };
    let agent_id = state.agent_id();
    let result = executor::execute(
        &state.settings,
        &state.cas,
        &logs,
        &assign,
        &agent_id,
        &control,
    )
    .await;
    log_finished(
        &assign.action_id,
        assign.fence,
        &result,
        state
            .settings
            .executed
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    let key = (assign.action_id.clone(), assign.fence);
    let completed = v1::ActionCompleted {
        action_id: assign.action_id,
        fence: assign.fence,
        result: Some(result),
    };
    let tx = {
        let mut inner = state.inner();
        inner.running.remove(&key);
        inner.pending.insert(key, completed.clone());
        inner.session.clone()
    };
    // If this session dies before the ack, the next one resends it from `pending`.
    if let Some(tx) = tx {
        let _ = tx
            .send(v1::AgentMessage {
                kind: Some(Out::Completed(completed)),
            })
            .await;
    }
}

/// Logs the end of an execution: a WARN with the reason when it could not run, and always the
/// INFO line `action finished action=<id> fence=<n> outcome=<OUTCOME> exit_code=<n>
/// executed=<N>`, where `executed` counts the processes this agent has spawned since it
/// started. End-to-end tests match that line: keep its message and fields.
fn log_finished(action_id: &str, fence: u64, result: &v1::ExecutionResult, executed: u64) {
    let outcome = v1::ExecutionOutcome::try_from(result.outcome)
        .map(|o| o.as_str_name().trim_start_matches("EXECUTION_OUTCOME_"))
        .unwrap_or("?");
    if result.outcome == v1::ExecutionOutcome::InfraError as i32 {
        tracing::warn!(
            "action {action_id} (fence {fence}) could not run: {}",
            result.message
        );
    }
    tracing::info!(
        action = %action_id,
        fence,
        outcome = %outcome,
        exit_code = result.exit_code,
        executed,
        "action finished"
    );
}

/// Answers an assignment the agent will not run with an INFRA_ERROR result.
fn refuse(state: &AgentState, inner: &mut Inner, assign: &v1::Assign, why: &str) {
    tracing::warn!(
        "refusing action {} (fence {}): {why}",
        assign.action_id,
        assign.fence
    );
    let result = executor::bare_result(
        &state.settings,
        assign,
        &state.agent_id(),
        v1::ExecutionOutcome::InfraError,
        why.to_string(),
    );
    let completed = v1::ActionCompleted {
        action_id: assign.action_id.clone(),
        fence: assign.fence,
        result: Some(result),
    };
    inner
        .pending
        .insert((assign.action_id.clone(), assign.fence), completed.clone());
    if let Some(tx) = &inner.session {
        send_soon(tx, Out::Completed(completed));
    }
}

fn handle_assign(state: &Arc<AgentState>, assign: v1::Assign) {
    let key = (assign.action_id.clone(), assign.fence);
    let mut inner = state.inner();
    if inner.running.contains_key(&key) {
        tracing::warn!(
            "ignoring a second assignment of action {} (fence {}): it is running",
            assign.action_id,
            assign.fence
        );
        return;
    }
    if let Some(done) = inner.pending.get(&key).cloned() {
        tracing::warn!(
            "action {} (fence {}) was assigned again after it finished; resending its result",
            assign.action_id,
            assign.fence
        );
        if let Some(tx) = &inner.session {
            send_soon(tx, Out::Completed(done));
        }
        return;
    }
    if state.shutdown.is_cancelled() {
        // Refusing would requeue it at once, often back to this agent, burning an attempt
        // each round; unanswered, its lease lapses once this agent is gone.
        tracing::info!(
            "ignoring action {} (fence {}): the agent is shutting down",
            assign.action_id,
            assign.fence
        );
        return;
    }
    if inner.running.len() >= state.slots as usize {
        refuse(state, &mut inner, &assign, "agent has no free slot");
        return;
    }
    let control = Arc::new(ActionControl::default());
    inner.running.insert(key, control.clone());
    drop(inner);
    let action = assign.action.as_ref();
    tracing::info!(
        "running action {} (fence {}, attempt {}) on {}{}: {:?}",
        assign.action_id,
        assign.fence,
        assign.attempt,
        action.map(|a| a.platform.as_str()).unwrap_or("?"),
        if assign.emulated { " (emulated)" } else { "" },
        action.map(|a| a.argv.as_slice()).unwrap_or_default(),
    );
    state
        .tracker
        .spawn(run_execution(state.clone(), assign, control));
}

fn handle_message(state: &Arc<AgentState>, msg: v1::CoordinatorMessage) {
    match msg.kind {
        Some(In::Assign(a)) => handle_assign(state, a),
        Some(In::Cancel(c)) => {
            let inner = state.inner();
            match inner.running.get(&(c.action_id.clone(), c.fence)) {
                Some(control) => {
                    tracing::info!(
                        "cancelling action {} (fence {}): {}",
                        c.action_id,
                        c.fence,
                        c.reason
                    );
                    control.cancel(&c.reason);
                }
                None => tracing::debug!(
                    "cancel of action {} (fence {}) that is not running here",
                    c.action_id,
                    c.fence
                ),
            }
        }
        Some(In::Drain(d)) => {
            tracing::info!("the coordinator drains this agent: {}", d.reason);
        }
        Some(In::Ack(ack)) => {
            let removed = state
                .inner()
                .pending
                .remove(&(ack.action_id.clone(), ack.fence));
            if removed.is_none() {
                tracing::debug!(
                    "acknowledgement for unknown result of {} (fence {})",
                    ack.action_id,
                    ack.fence
                );
            } else if ack.accepted {
                tracing::debug!("result of {} (fence {}) recorded", ack.action_id, ack.fence);
            } else if removed
                .and_then(|c| c.result)
                .is_some_and(|r| r.outcome == v1::ExecutionOutcome::Cancelled as i32)
            {
                tracing::info!(
                    "the coordinator did not record the result of cancelled {} (fence {}): {}",
                    ack.action_id,
                    ack.fence,
                    ack.reason
                );
            } else {
                tracing::warn!(
                    "the coordinator refused the result of {} (fence {}): {}",
                    ack.action_id,
                    ack.fence,
                    ack.reason
                );
            }
        }
        Some(In::Welcome(_)) => tracing::debug!("ignoring a repeated Welcome"),
        None => tracing::debug!("ignoring an empty coordinator message"),
    }
}

/// A gRPC status from the coordinator, printed briefly ("Unavailable: ...").
#[derive(Debug)]
struct RpcError(tonic::Status);

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for RpcError {}

/// How a session ended without an error.
enum SessionEnd {
    /// The agent is stopping.
    Stopped,
    /// The coordinator closed the stream.
    Closed,
}

/// Opens one session and serves it until it ends. `on_welcome` runs once it is established.
async fn serve_session(
    state: &Arc<AgentState>,
    credentials: &Credentials,
    stop: &CancellationToken,
    on_welcome: &mut dyn FnMut(),
) -> anyhow::Result<SessionEnd> {
    let connected = tls::connect(
        &state.coordinator_url,
        &ServerTrust::Ca(credentials.ca_pem.clone()),
        Some(&credentials.identity),
    )
    .await?;
    let channel = connected.channel;
    let mut client = v1::agent_session_client::AgentSessionClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let free_disk_bytes = host::free_disk_bytes(&state.data_dir);
    let (tx, rx) = {
        let mut inner = state.inner();
        let hello = v1::Hello {
            platforms: state
                .platforms
                .iter()
                .map(|(p, emulated)| v1::PlatformOffer {
                    platform: p.to_string(),
                    emulated: *emulated,
                })
                .collect(),
            cores: state.host.cores,
            memory_bytes: state.host.memory_bytes,
            kernel: state.host.kernel.clone(),
            free_disk_bytes,
            slots: state.slots,
            hostname: state.host.hostname.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            running: AgentState::running_list(&inner),
            sandbox: state.policy.sandbox.clone(),
            limits: state.policy.limits.clone(),
            restrict_labels: state.policy.accept_labels.is_some(),
            accept_labels: state.policy.accept_labels.clone().unwrap_or_default(),
            paused_reason: state.policy.paused_reason(free_disk_bytes),
            allow_network: state.policy.allow_network,
        };
        // Hello and the unacknowledged results go first; the outbox is published in the same
        // critical section so no result can slip between the snapshot and the new session.
        let (tx, rx) = mpsc::channel(OUTBOX_CAPACITY + inner.pending.len() + 1);
        let mut queued = vec![Out::Hello(hello)];
        queued.extend(inner.pending.values().cloned().map(Out::Completed));
        for kind in queued {
            if tx.try_send(v1::AgentMessage { kind: Some(kind) }).is_err() {
                bail!("failed to queue the session's first messages");
            }
        }
        inner.session = Some(tx.clone());
        (tx, rx)
    };
    let resent = state.pending_count();

    let response = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(RpcError)
        .context("failed to open the session")?;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
        .await
        .context("the coordinator sent no Welcome")?
        .map_err(RpcError)
        .context("failed to read the Welcome")?;
    let welcome = match first.and_then(|m| m.kind) {
        Some(In::Welcome(w)) => w,
        Some(_) => bail!("the coordinator's first message was not a Welcome"),
        None => return Ok(SessionEnd::Closed),
    };
    if !welcome.agent_id.is_empty() {
        if let Ok(mut id) = state.agent_id.lock() {
            id.clone_from(&welcome.agent_id);
        }
    }
    let interval = match welcome.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(ms).clamp(Duration::from_millis(100), Duration::from_secs(60)),
    };
    state.channel.send_replace(Some(channel));
    on_welcome();
    tracing::info!(
        "connected to {} as agent {} (heartbeat every {} ms, {} running, {} results resent)",
        state.coordinator_url,
        welcome.agent_id,
        interval.as_millis(),
        state.running_count(),
        resent
    );

    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(SessionEnd::Stopped),
            _ = ticker.tick() => {
                let running = AgentState::running_list(&state.inner());
                let free_disk_bytes = host::free_disk_bytes(&state.data_dir);
                let heartbeat = v1::Heartbeat {
                    load_1m: host::load_1m(),
                    running,
                    free_disk_bytes,
                    paused_reason: state.policy.paused_reason(free_disk_bytes),
                };
                send_soon(&tx, Out::Heartbeat(heartbeat));
            }
            msg = inbound.message() => match msg {
                Ok(Some(m)) => handle_message(state, m),
                Ok(None) => return Ok(SessionEnd::Closed),
                Err(status) => return Err(RpcError(status).into()),
            },
        }
    }
}

/// Keeps a session with the coordinator until `stop` fires, reconnecting with backoff.
pub async fn run_sessions(
    state: Arc<AgentState>,
    credentials: Credentials,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::default();
    let mut last_failure = String::new();
    loop {
        let mut established = false;
        let mut on_welcome = || established = true;
        let end = tokio::select! {
            r = serve_session(&state, &credentials, &stop, &mut on_welcome) => r,
            () = stop.cancelled() => Ok(SessionEnd::Stopped),
        };
        state.inner().session = None;
        state.channel.send_replace(None);
        if established {
            backoff.reset();
            last_failure.clear();
        }
        let failure = match end {
            Ok(SessionEnd::Stopped) => return,
            Ok(SessionEnd::Closed) => "the coordinator closed the session".to_string(),
            Err(e) => {
                let revoked = e.downcast_ref::<RpcError>().is_some_and(|s| {
                    matches!(
                        s.0.code(),
                        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
                    )
                });
                let msg = format!("{e:#}");
                if revoked {
                    backoff.to_max();
                    if msg != last_failure {
                        tracing::error!(
                            "the coordinator refuses this agent (revoked?): {msg}; retrying every {} s",
                            MAX_DELAY.as_secs()
                        );
                        last_failure = msg;
                    }
                    String::new()
                } else {
                    format!("failed to keep a session with the coordinator: {msg}")
                }
            }
        };
        if !failure.is_empty() {
            if failure != last_failure {
                tracing::warn!("{failure}; reconnecting");
                last_failure = failure;
            } else {
                tracing::debug!("{failure}; reconnecting");
            }
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_completion_line_keeps_its_format() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let mut result = v1::ExecutionResult {
                outcome: v1::ExecutionOutcome::Exited as i32,
                exit_code: 3,
                ..Default::default()
            };
            log_finished("job-1/linux/arm/v7", 12, &result, 5);
            result.outcome = v1::ExecutionOutcome::InfraError as i32;
            result.exit_code = -1;
            result.message = "disk full".into();
            log_finished("job-2/linux/s390x", 1, &result, 5);
        });
        let text = String::from_utf8(capture.0.lock().expect("lock").clone()).expect("utf-8");
        assert!(
            text.contains(
                "action finished action=job-1/linux/arm/v7 fence=12 outcome=EXITED exit_code=3 executed=5\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "action finished action=job-2/linux/s390x fence=1 outcome=INFRA_ERROR exit_code=-1 executed=5\n"
            ),
            "{text}"
        );
        assert!(text.contains("could not run: disk full"), "{text}");
    }
}
