//! Joining the farm: trades a join token and a fresh key's CSR for a client certificate, once,
//! and keeps the result in the data directory so later starts skip it.
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use anyhow::{bail, Context};
use archfarm_proto::tls::{self, ClientIdentity, Credentials, ServerTrust};
use archfarm_proto::v1;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// The agent's identity towards the coordinator.
#[derive(Clone)]
pub struct Joined {
    /// Client certificate, key and farm CA.
    pub credentials: Credentials,
    /// The id the farm gave this agent, when known (the session's Welcome repeats it).
    pub agent_id: Option<String>,
}

/// Contents of `data_dir/agent.json`.
#[derive(serde::Serialize, serde::Deserialize)]
struct AgentFile {
    agent_id: String,
}

/// `data_dir/credentials`.
pub fn credentials_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("credentials")
}

fn agent_file(data_dir: &Path) -> PathBuf {
    data_dir.join("agent.json")
}

/// Loads stored credentials, or joins with the configured token and stores them.
/// Returns `None` when `shutdown` fires first.
pub async fn ensure_joined(
    config: &AgentConfig,
    hostname: &str,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Joined>> {
    let dir = credentials_dir(&config.data_dir);
    if ["cert.pem", "key.pem", "ca.pem"]
        .iter()
        .all(|n| dir.join(n).is_file())
    {
        let credentials = Credentials::load(&dir)?;
        let agent_id = read_agent_id(&config.data_dir);
        tracing::info!(
            "using the stored credentials in {} (agent {})",
            dir.display(),
            agent_id.as_deref().unwrap_or("with unknown id")
        );
        return Ok(Some(Joined {
            credentials,
            agent_id,
        }));
    }
    let (Some(token), Some(ca_hash)) = (&config.join_token, &config.ca_hash) else {
        bail!(
            "this agent has not joined the farm yet ({} holds no credentials): \
             --token and --ca-hash are required",
            dir.display()
        );
    };
    let ca_hash = ca_hash.trim().to_ascii_lowercase();
    let key = rcgen::KeyPair::generate().context("failed to generate a key pair")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("failed to build the certificate request")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let csr_pem = params
        .serialize_request(&key)
        .context("failed to sign the certificate request")?
        .pem()
        .context("failed to encode the certificate request")?;
    let request = v1::JoinRequest {
        token: token.clone(),
        csr_pem,
        hostname: hostname.to_string(),
    };

    let mut backoff = Backoff::default();
    let mut last_error = String::new();
    let response = loop {
        match try_join(&config.coordinator_url, &ca_hash, request.clone()).await {
            Ok(r) => break r,
            Err(JoinFailure::Fatal(e)) => return Err(e),
            Err(JoinFailure::Retry(e)) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    tracing::warn!("failed to {msg}; retrying");
                    last_error = msg;
                } else {
                    tracing::debug!("failed to {msg}; retrying");
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    };

    let ca_pem = response.ca_certificate_pem;
    let ca_matches = tls::parse_certs(&ca_pem)
        .context("failed to read the CA certificate the coordinator sent")?
        .iter()
        .any(|c| tls::ca_pin(c) == ca_hash);
    if !ca_matches {
        bail!("the CA certificate the coordinator sent does not match --ca-hash {ca_hash}");
    }
    tls::parse_certs(&response.certificate_pem)
        .context("failed to read the certificate the coordinator sent")?;
    let joined = Joined {
        credentials: Credentials {
            identity: ClientIdentity {
                cert_pem: response.certificate_pem,
                key_pem: key.serialize_pem(),
            },
            ca_pem,
        },
        agent_id: Some(response.agent_id.clone()),
    };
    // agent.json first: the credentials directory being complete is what marks "joined".
    write_agent_id(&config.data_dir, &response.agent_id)?;
    joined.credentials.store(&dir)?;
    tracing::info!(
        "joined the farm as agent {} (labels: {})",
        response.agent_id,
        response
            .labels
            .iter()
            .map(|l| format!("{}={}", l.key, l.value))
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(Some(joined))
}

enum JoinFailure {
    /// Retrying cannot help (bad token, wrong CA pin): the agent should stop.
    Fatal(anyhow::Error),
    /// The coordinator could not be reached or answered with a passing error.
    Retry(anyhow::Error),
}

async fn try_join(
    url: &str,
    ca_hash: &str,
    request: v1::JoinRequest,
) -> Result<v1::JoinResponse, JoinFailure> {
    let connected = match tls::connect(url, &ServerTrust::Pin(ca_hash.to_string()), None).await {
        Ok(c) => c,
        Err(e) => {
            let chain = format!("{e:#}");
            let e = e.context("join the farm");
            return Err(if chain.contains("does not match the pin") {
                JoinFailure::Fatal(e)
            } else {
                JoinFailure::Retry(e)
            });
        }
    };
    let mut client = v1::join_client::JoinClient::new(connected.channel);
    match client.join(request).await {
        Ok(r) => Ok(r.into_inner()),
        Err(status) => {
            use tonic::Code;
            let e = anyhow::anyhow!(
                "join the farm: the coordinator answered {:?}: {}",
                status.code(),
                status.message()
            );
            match status.code() {
                Code::Unauthenticated | Code::PermissionDenied | Code::InvalidArgument => {
                    Err(JoinFailure::Fatal(e))
                }
                _ => Err(JoinFailure::Retry(e)),
            }
        }
    }
}

fn read_agent_id(data_dir: &Path) -> Option<String> {
    let path = agent_file(data_dir);
    let text = std::fs::read_to_string(&path).ok()?;
    match serde_json::from_str::<AgentFile>(&text) {
        Ok(f) => Some(f.agent_id),
        Err(e) => {
            tracing::warn!("failed to parse {}: {e}", path.display());
            None
        }
    }
}

fn write_agent_id(data_dir: &Path, agent_id: &str) -> anyhow::Result<()> {
    let path = agent_file(data_dir);
    let tmp = data_dir.join(".agent.json.tmp");
    let body = serde_json::to_string_pretty(&AgentFile {
        agent_id: agent_id.to_string(),
    })?;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("failed to create {}", data_dir.display()))?;
    std::fs::write(&tmp, body + "\n")
        .with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("failed to sync {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_id_round_trips() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(read_agent_id(d.path()), None);
        write_agent_id(d.path(), "agent-7").expect("write");
        assert_eq!(read_agent_id(d.path()).as_deref(), Some("agent-7"));
    }

    #[tokio::test]
    async fn refuses_to_join_without_token() {
        let d = tempfile::tempdir().expect("tempdir");
        let config = AgentConfig::new("https://127.0.0.1:1", d.path());
        let e = ensure_joined(&config, "h", &CancellationToken::new())
            .await
            .err()
            .expect("must fail");
        assert!(format!("{e:#}").contains("--token"), "{e:#}");
    }
}
