//! The AgentSession service: one bidirectional stream per agent, relayed to and from the farm.
use super::auth::authorize_stream;
use super::convert::{command_to_proto, completion_from_proto};
use super::{internal, SharedRef};
use crate::farm::{Completion, FarmError, HeartbeatReport, Outcome, StoredRecord};
use crate::model::{ActionId, AgentFacts, AgentId, Offer, Role};
use archfarm_proto::v1::{
    self, agent_message::Kind, agent_session_server::AgentSession, coordinator_message,
};
use archfarm_proto::Platform;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

/// The AgentSession service.
pub struct SessionService(pub SharedRef);

fn running(list: &[v1::RunningAction]) -> Vec<(ActionId, u64)> {
    list.iter()
        .map(|r| (ActionId(r.action_id.clone()), r.fence))
        .collect()
}

/// Checks a Hello and turns it into facts.
pub fn facts_from_hello(h: &v1::Hello) -> Result<AgentFacts, Status> {
    if h.platforms.is_empty() {
        return Err(Status::invalid_argument("hello offers no platform"));
    }
    let mut offers = Vec::new();
    for p in &h.platforms {
        let platform: Platform = p
            .platform
            .parse()
            .map_err(|e| Status::invalid_argument(format!("hello: {e}")))?;
        if offers.iter().any(|o: &Offer| o.platform == platform) {
            return Err(Status::invalid_argument(format!(
                "hello offers {platform} twice"
            )));
        }
        offers.push(Offer {
            platform,
            emulated: p.emulated,
        });
    }
    if h.slots == 0 || h.slots > 1024 {
        return Err(Status::invalid_argument(format!(
            "hello: slots must be 1..=1024, not {}",
            h.slots
        )));
    }
    Ok(AgentFacts {
        offers,
        cores: h.cores,
        memory_bytes: h.memory_bytes,
        kernel: h.kernel.chars().take(200).collect(),
        free_disk_bytes: h.free_disk_bytes,
        slots: h.slots,
        version: h.version.chars().take(64).collect(),
        load_1m: 0.0,
        sandbox: h.sandbox.chars().take(200).collect(),
        limits: h.limits.chars().take(400).collect(),
        paused_reason: h.paused_reason.chars().take(200).collect(),
        allow_network: h.allow_network,
        accept_labels: h.restrict_labels.then(|| {
            h.accept_labels
                .iter()
                .take(64)
                .map(|k| k.chars().take(63).collect())
                .collect()
        }),
    })
}

type OutStream = Pin<Box<dyn Stream<Item = Result<v1::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentSession for SessionService {
    type SessionStream = OutStream;

    async fn session(
        &self,
        req: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<OutStream>, Status> {
        let shared = self.0.clone();
        let (principal, guard) = authorize_stream(&shared, &req, &[Role::Agent])?;
        let agent = AgentId(principal.name);
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(Kind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first session message must be a hello",
                ))
            }
        };
        let facts = facts_from_hello(&hello)?;
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel();
        let (out_tx, out_rx) = mpsc::channel::<Result<v1::CoordinatorMessage, Status>>(1024);
        let (conn, labels, heartbeat_ms) = {
            let mut farm = shared.farm()?;
            let conn = farm.hello(
                &agent,
                facts,
                &running(&hello.running),
                cmd_tx,
                shared.now(),
            )?;
            let labels = farm
                .agents()
                .find(|a| a.record.id == agent)
                .map(|a| a.record.labels.clone())
                .unwrap_or_default();
            (conn, labels, farm.config().heartbeat_ms)
        };
        shared.commit().await?;
        tracing::info!(%agent, conn, hostname = %hello.hostname, platforms = ?hello.platforms.iter().map(|p| (&p.platform, p.emulated)).collect::<Vec<_>>(), "agent connected");
        let welcome = v1::CoordinatorMessage {
            kind: Some(coordinator_message::Kind::Welcome(v1::Welcome {
                agent_id: agent.to_string(),
                heartbeat_interval_ms: heartbeat_ms,
                labels: super::convert::labels_to_proto(&labels),
            })),
        };
        out_tx
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::unavailable("session closed during hello"))?;
        tokio::spawn(async move {
            let why = loop {
                tokio::select! {
                    cmd = cmd_rx.recv() => match cmd {
                        Some(cmd) => {
                            if out_tx.send(Ok(command_to_proto(cmd))).await.is_err() {
                                break "agent stopped reading".to_string();
                            }
                        }
                        None => {
                            // Revoke adds the agent to the set before it drops the session.
                            let msg = if shared.revocations.agent_revoked(&agent.0) {
                                Status::unauthenticated(format!("agent {agent} has been revoked"))
                            } else {
                                Status::aborted("a newer session of this agent replaced this one")
                            };
                            let _ = out_tx.send(Err(msg)).await;
                            break "session replaced or revoked".to_string();
                        }
                    },
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => {
                            let handled = match prepare_completion(&shared, &m).await {
                                Ok(completion) => match handle(&shared, &agent, conn, m, completion) {
                                    Ok(Some(resent)) => resent.report(&shared, &agent).await,
                                    Ok(None) => Ok(()),
                                    Err(e) => Err(e),
                                },
                                Err(e) => Err(e),
                            };
                            if let Err(e) = handled {
                                let _ = out_tx.send(Err(e.clone())).await;
                                break format!("refused a message: {}", e.message());
                            }
                            // The answer (an ack, new work) goes out once the change is durable.
                            if let Err(e) = shared.commit().await {
                                let _ = out_tx.send(Err(e.clone())).await;
                                break format!("failed to commit: {}", e.message());
                            }
                        }
                        Ok(None) => break "agent closed the stream".to_string(),
                        Err(e) => break format!("stream error: {}", e.message()),
                    },
                }
            };
            tracing::info!(%agent, conn, "agent session ended: {why}");
            // Memory only: the record is written by the next commit (the ticker's at the latest).
            if let Ok(mut farm) = shared.farm() {
                farm.session_closed(&agent, conn);
            }
        });
        Ok(Response::new(Box::pin(
            guard.guard(ReceiverStream::new(out_rx)),
        )))
    }
}

/// A reported result as the farm records it, its output trees walked (blocking reads of every
/// directory) before the farm is locked; `None` for other messages.
async fn prepare_completion(
    shared: &SharedRef,
    m: &v1::AgentMessage,
) -> Result<Option<Completion>, Status> {
    let Some(Kind::Completed(c)) = &m.kind else {
        return Ok(None);
    };
    let result = c.result.as_ref().ok_or_else(|| {
        Status::invalid_argument(format!("completion of {} has no result", c.action_id))
    })?;
    let mut completion = completion_from_proto(result);
    let passed = completion.outcome == Outcome::Exited && completion.exit_code == 0;
    if passed && !completion.output_trees.is_empty() {
        let (cache, roots) = (shared.cache.clone(), completion.output_trees.clone());
        completion.output_tree_blobs =
            tokio::task::spawn_blocking(move || cache.output_tree_blobs(&roots))
                .await
                .map_err(|e| Status::internal(format!("walking output trees failed: {e}")))?;
    }
    Ok(Some(completion))
}

/// A result for an action the farm no longer holds in memory (resent after the action
/// finished and was written): reported again with the action's stored record, read on a
/// blocking thread without the farm's lock.
struct NeedsStored {
    action: ActionId,
    fence: u64,
    completion: Completion,
}

impl NeedsStored {
    async fn report(mut self, shared: &SharedRef, agent: &AgentId) -> Result<(), Status> {
        let id = self.action.clone();
        let stored = shared
            .blocking("read a finished action", move |store| store.action(&id))
            .await?;
        self.completion.stored = StoredRecord::Read(stored.map(Box::new));
        let now = shared.now();
        let mut farm = shared.farm()?;
        if farm.is_revoked(agent) {
            return Err(Status::unauthenticated(format!(
                "agent {agent} has been revoked"
            )));
        }
        farm.completed(agent, &self.action, self.fence, self.completion, now)
            .map_err(Status::from)
    }
}

/// Applies one message of the agent to the farm. `Some` for a result the farm needs the
/// action's stored record for ([`NeedsStored::report`]).
fn handle(
    shared: &SharedRef,
    agent: &AgentId,
    conn: u64,
    m: v1::AgentMessage,
    completion: Option<Completion>,
) -> Result<Option<NeedsStored>, Status> {
    let now = shared.now();
    let mut farm = shared.farm()?;
    if farm.is_revoked(agent) {
        return Err(Status::unauthenticated(format!(
            "agent {agent} has been revoked"
        )));
    }
    match m.kind {
        Some(Kind::Heartbeat(h)) => farm
            .heartbeat(
                agent,
                conn,
                &HeartbeatReport {
                    load_1m: h.load_1m,
                    free_disk_bytes: h.free_disk_bytes,
                    paused_reason: h.paused_reason.chars().take(200).collect(),
                },
                &running(&h.running),
                now,
            )
            .map(|()| None)
            .map_err(internal),
        Some(Kind::Log(l)) => {
            let stderr = l.stream == v1::LogStream::Stderr as i32;
            farm.log(agent, &ActionId(l.action_id), l.fence, stderr, l.data);
            Ok(None)
        }
        Some(Kind::Completed(c)) => {
            let completion = completion.ok_or_else(|| {
                Status::internal(format!("completion of {} was not prepared", c.action_id))
            })?;
            let action = ActionId(c.action_id.clone());
            match farm.completed(agent, &action, c.fence, completion, now) {
                Ok(()) => Ok(None),
                Err(FarmError::NeedsStored(completion)) => Ok(Some(NeedsStored {
                    action,
                    fence: c.fence,
                    completion: *completion,
                })),
                Err(e) => Err(e.into()),
            }
        }
        Some(Kind::Hello(_)) => Err(Status::invalid_argument("hello sent twice in one session")),
        None => Err(Status::invalid_argument("empty agent message")),
    }
}
