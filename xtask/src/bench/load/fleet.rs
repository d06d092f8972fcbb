//! The simulated agents of `bench load`: each is a light client speaking the real protocol over
//! real TLS. It joins with a token (key pair, CSR, certificate), opens its session stream with
//! mutual TLS, says Hello, sends heartbeats and answers every Assign at once with a successful
//! ActionCompleted. What the agents see (assigns and acks, named by the action's index, which
//! is its one step's name) reaches the driver on one channel.
use anyhow::{bail, Context};
use archfarm_client::farm::{rpc, RpcError};
use archfarm_proto::tls::{self, ClientIdentity, ServerTrust};
use archfarm_proto::v1::{self, agent_message, coordinator_message};
use archfarm_proto::MAX_MESSAGE_BYTES;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

/// The platform every simulated agent serves natively.
pub const PLATFORM: &str = "linux/amd64";
/// Joins at once (each is a TLS handshake, a key pair and a certificate signature).
const JOIN_CONCURRENCY: usize = 16;
/// How long the agents get to join and connect.
const START_TIMEOUT: Duration = Duration::from_secs(300);

/// What a simulated agent saw, sent to the driver.
pub enum Seen {
    /// The agent's session got its Welcome.
    Welcomed,
    /// An Assign arrived for the action of this index (None: its step is not named `a<N>`).
    Assigned { index: Option<u64>, at: Instant },
    /// A CompletionAck arrived.
    Acked {
        index: Option<u64>,
        action: String,
        accepted: bool,
        reason: String,
    },
    /// The session ended or failed.
    Ended { agent: u32, why: String },
}

/// The name of the one step of the action of `index`.
pub fn step_name(index: u64) -> String {
    format!("a{index:08}")
}

/// The index an action's step name carries.
pub fn index_of_step(name: &str) -> Option<u64> {
    name.strip_prefix('a')?.parse().ok()
}

/// The joined and connected agents, and what they see.
pub struct Fleet {
    /// Everything the agents see, in arrival order.
    pub seen: mpsc::UnboundedReceiver<Seen>,
    /// How long joining and connecting every agent took.
    pub join_took: Duration,
    sessions: tokio::task::JoinSet<()>,
}

impl Fleet {
    /// Joins `agents` simulated agents with `token` (the farm's CA checked against `ca_hash`),
    /// opens their sessions and waits until every one is welcomed.
    pub async fn start(
        url: &str,
        token: &str,
        ca_hash: &str,
        agents: u32,
        slots: u32,
    ) -> anyhow::Result<Self> {
        let (seen_tx, mut seen) = mpsc::unbounded_channel::<Seen>();
        let joins = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
        let started = Instant::now();
        let mut joined = tokio::task::JoinSet::new();
        for i in 0..agents {
            let (url, token, ca_hash, joins) = (
                url.to_string(),
                token.to_string(),
                ca_hash.to_string(),
                joins.clone(),
            );
            joined.spawn(async move {
                let _permit = joins.acquire_owned().await;
                (i, join(&url, &token, &ca_hash, &format!("sim-{i}")).await)
            });
        }
        let mut sessions = tokio::task::JoinSet::new();
        while let Some(done) = joined.join_next().await {
            let (i, result) = done.context("failed to run a join task")?;
            sessions.spawn(simulated_agent(
                i,
                url.to_string(),
                result?,
                slots,
                seen_tx.clone(),
            ));
        }
        let mut welcomed = 0;
        let deadline = Instant::now() + START_TIMEOUT;
        while welcomed < agents {
            let event = tokio::time::timeout_at(deadline.into(), seen.recv())
                .await
                .with_context(|| {
                    format!("failed to connect the agents: {welcomed} of {agents} welcomed")
                })?;
            match event {
                Some(Seen::Welcomed) => welcomed += 1,
                Some(Seen::Ended { agent, why }) => bail!("simulated agent {agent} failed: {why}"),
                Some(_) => {}
                None => bail!("every simulated agent stopped"),
            }
        }
        Ok(Self {
            seen,
            join_took: started.elapsed(),
            sessions,
        })
    }

    /// Ends every session.
    pub fn stop(mut self) {
        self.sessions.abort_all();
    }
}

/// A simulated agent's credentials, from a real join.
struct Joined {
    identity: ClientIdentity,
    ca_pem: String,
}

/// Joins like `archfarm-agent` does: a fresh key pair, a CSR, Join with the token, the CA
/// checked against the pin.
async fn join(url: &str, token: &str, ca_hash: &str, name: &str) -> anyhow::Result<Joined> {
    let key = rcgen::KeyPair::generate().context("failed to generate a key pair")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("failed to build a certificate request")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr_pem = params
        .serialize_request(&key)
        .context("failed to sign a certificate request")?
        .pem()
        .context("failed to encode a certificate request")?;
    let connected = tls::connect(url, &ServerTrust::Pin(ca_hash.to_string()), None)
        .await
        .with_context(|| format!("failed to connect {name} for joining"))?;
    let response = rpc(v1::join_client::JoinClient::new(connected.channel)
        .join(v1::JoinRequest {
            token: token.to_string(),
            csr_pem,
            hostname: name.to_string(),
        })
        .await)
    .with_context(|| format!("failed to join {name}"))?;
    Ok(Joined {
        identity: ClientIdentity {
            cert_pem: response.certificate_pem,
            key_pem: key.serialize_pem(),
        },
        ca_pem: response.ca_certificate_pem,
    })
}

/// The success an agent reports for an action: exit 0, one passing result per step.
pub fn success(agent_id: &str, assign: &v1::Assign) -> v1::AgentMessage {
    let now = archfarm_client::farm::display::now_unix_ms();
    let steps = assign
        .action
        .as_ref()
        .map(|a| a.steps.as_slice())
        .unwrap_or_default();
    let result = v1::ExecutionResult {
        outcome: v1::ExecutionOutcome::Exited as i32,
        exit_code: 0,
        agent_id: agent_id.to_string(),
        agent_hostname: agent_id.to_string(),
        platform: PLATFORM.to_string(),
        started_unix_ms: now,
        step_results: steps
            .iter()
            .map(|s| v1::StepResult {
                name: s.name.clone(),
                exit_code: 0,
                duration_ms: 1,
                agent_id: agent_id.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    v1::AgentMessage {
        kind: Some(agent_message::Kind::Completed(v1::ActionCompleted {
            action_id: assign.action_id.clone(),
            fence: assign.fence,
            result: Some(result),
        })),
    }
}

/// One simulated agent's session: Hello, then heartbeats and an immediate success for every
/// Assign, until the stream ends.
async fn simulated_agent(
    i: u32,
    url: String,
    joined: Joined,
    slots: u32,
    seen: mpsc::UnboundedSender<Seen>,
) {
    let why = match session(i, &url, &joined, slots, &seen).await {
        Ok(()) => "the coordinator ended the session".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let _ = seen.send(Seen::Ended { agent: i, why });
}

fn heartbeat() -> v1::AgentMessage {
    v1::AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(v1::Heartbeat {
            load_1m: 0.0,
            running: vec![],
            free_disk_bytes: 100 << 30,
            paused_reason: String::new(),
        })),
    }
}

async fn session(
    i: u32,
    url: &str,
    joined: &Joined,
    slots: u32,
    seen: &mpsc::UnboundedSender<Seen>,
) -> anyhow::Result<()> {
    let connected = tls::connect(
        url,
        &ServerTrust::Ca(joined.ca_pem.clone()),
        Some(&joined.identity),
    )
    .await
    .context("failed to connect with the agent's certificate")?;
    let mut client = v1::agent_session_client::AgentSessionClient::new(connected.channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(1024);
    let hello = v1::Hello {
        platforms: vec![v1::PlatformOffer {
            platform: PLATFORM.to_string(),
            emulated: false,
        }],
        cores: slots,
        memory_bytes: 8 << 30,
        kernel: "simulated".to_string(),
        free_disk_bytes: 100 << 30,
        slots,
        hostname: format!("sim-{i}"),
        version: "bench-load".to_string(),
        running: vec![],
        sandbox: "none: simulated agent".to_string(),
        limits: "simulated".to_string(),
        ..Default::default()
    };
    tx.send(v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .context("failed to queue the hello")?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .map_err(RpcError)
        .context("failed to open the session")?
        .into_inner();
    let mut agent_id = String::new();
    let mut heartbeats: Option<tokio::task::JoinHandle<()>> = None;
    // Action id -> index, from its Assign until its Ack.
    let mut running: HashMap<String, Option<u64>> = HashMap::new();
    let result = loop {
        let message = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(status) => break Err(anyhow::Error::new(RpcError(status))),
        };
        match message.kind {
            Some(coordinator_message::Kind::Welcome(w)) => {
                agent_id = w.agent_id;
                let every = Duration::from_millis(w.heartbeat_interval_ms.max(100));
                let tx = tx.clone();
                heartbeats = Some(tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        if tx.send(heartbeat()).await.is_err() {
                            return;
                        }
                    }
                }));
                let _ = seen.send(Seen::Welcomed);
            }
            Some(coordinator_message::Kind::Assign(a)) => {
                let at = Instant::now();
                let index = a
                    .action
                    .as_ref()
                    .and_then(|s| s.steps.first())
                    .and_then(|s| index_of_step(&s.name));
                let _ = seen.send(Seen::Assigned { index, at });
                running.insert(a.action_id.clone(), index);
                if tx.send(success(&agent_id, &a)).await.is_err() {
                    break Err(anyhow::anyhow!(
                        "failed to send a result: the session closed"
                    ));
                }
            }
            Some(coordinator_message::Kind::Ack(ack)) => {
                let index = running.remove(&ack.action_id).flatten();
                let _ = seen.send(Seen::Acked {
                    index,
                    action: ack.action_id,
                    accepted: ack.accepted,
                    reason: ack.reason,
                });
            }
            Some(coordinator_message::Kind::Cancel(_) | coordinator_message::Kind::Drain(_))
            | None => {}
        }
    };
    if let Some(h) = heartbeats {
        h.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_names_each_step_and_echoes_the_fence() {
        let assign = v1::Assign {
            action_id: "j/linux/amd64/shard-1".into(),
            fence: 42,
            action: Some(v1::Action {
                steps: vec![v1::Step {
                    name: "a000001".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let Some(agent_message::Kind::Completed(c)) = success("agent-1", &assign).kind else {
            panic!("not a completion");
        };
        assert_eq!(
            (c.action_id.as_str(), c.fence),
            ("j/linux/amd64/shard-1", 42)
        );
        let r = c.result.expect("result");
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.step_results[0].name, "a000001");
    }

    #[test]
    fn step_names_carry_the_index() {
        assert_eq!(step_name(1_234), "a00001234");
        assert_eq!(index_of_step(&step_name(250_001)), Some(250_001));
        assert_eq!(index_of_step("build"), None);
    }
}
