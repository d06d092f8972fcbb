//! Join: a join token and a CSR in, an agent certificate out (kubeadm-style bootstrap).
use super::{internal, SharedRef};
use crate::model::{AgentFacts, AgentId, AgentRecord, Principal, Role, TokenRecord};
use archfarm_proto::v1::{self, join_server::Join};
use tonic::{Request, Response, Status};

/// The Join service.
pub struct JoinService(pub SharedRef);

/// Splits `<id>.<secret>` and checks the spelling.
pub fn parse_token(token: &str) -> Result<(&str, &str), Status> {
    let bad = || Status::unauthenticated("malformed join token: expected [a-z0-9]{6}.[a-z0-9]{16}");
    let (id, secret) = token.trim().split_once('.').ok_or_else(bad)?;
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    if !ok(id, 6) || !ok(secret, 16) {
        return Err(bad());
    }
    Ok((id, secret))
}

/// A fresh agent id from a host name: its letters, digits and dashes (at most 40, lower
/// case, others become dashes), a dash and 6 random hex digits; `agent-...` if nothing is left.
pub fn agent_id_for(hostname: &str) -> String {
    let mut base: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if base.trim_matches('-').is_empty() {
        base = "agent".into();
    }
    format!(
        "{}-{:06x}",
        base.trim_matches('-'),
        rand::random::<u32>() & 0xff_ffff
    )
}

/// Whether `token` (the record of token `id`, if any) lets a caller with `secret` join now.
fn check_token(
    token: Option<&TokenRecord>,
    id: &str,
    secret: &str,
    now: u64,
) -> Result<(), Status> {
    let token = token.ok_or_else(|| {
        Status::unauthenticated(format!("join token {id} is not known to this farm"))
    })?;
    if !token.secret_matches(secret) {
        return Err(Status::unauthenticated(format!(
            "join token {id}: wrong secret"
        )));
    }
    if now > token.expires_unix_ms {
        return Err(Status::unauthenticated(format!(
            "join token {id} expired {} s ago",
            (now - token.expires_unix_ms) / 1000
        )));
    }
    if token.single_use && token.uses > 0 {
        return Err(Status::unauthenticated(format!(
            "join token {id} is single-use and was already used"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Join for JoinService {
    async fn join(
        &self,
        req: Request<v1::JoinRequest>,
    ) -> Result<Response<v1::JoinResponse>, Status> {
        let shared = &self.0;
        let r = req.into_inner();
        let (id, secret) = parse_token(&r.token)?;
        if r.hostname.len() > 253 {
            return Err(Status::invalid_argument(
                "hostname is longer than 253 bytes",
            ));
        }
        if r.csr_pem.len() > 64 * 1024 {
            return Err(Status::invalid_argument("CSR is larger than 64 KiB"));
        }
        let now = shared.now();
        // Checked before signing, so a caller without a valid token has nothing signed; checked
        // again as the use is recorded (atomically in the store, not under the farm's lock).
        let token = shared.store.token(id).map_err(internal)?;
        check_token(token.as_ref(), id, secret, now)?;
        let agent_id = agent_id_for(&r.hostname);
        let (cert_pem, fingerprint) = {
            let (shared, csr, agent_id) = (shared.clone(), r.csr_pem, agent_id.clone());
            tokio::task::spawn_blocking(move || shared.pki.sign_csr(&csr, &agent_id))
                .await
                .map_err(|e| internal(anyhow::anyhow!("sign a CSR: {e}")))?
                .map_err(|e| {
                    Status::invalid_argument(format!("bad certificate signing request: {e:#}"))
                })?
        };
        let token = {
            let (id, secret, agent_id, fingerprint) = (
                id.to_string(),
                secret.to_string(),
                agent_id.clone(),
                fingerprint.clone(),
            );
            shared
                .blocking("record a join", move |store| {
                    let used = store.update_token(&id, |t| {
                        check_token(Some(t), &id, &secret, now)?;
                        t.uses += 1;
                        Ok::<(), Status>(())
                    })?;
                    let token = match used {
                        // Deleted since the first check.
                        None => {
                            return Ok(Err(Status::unauthenticated(format!(
                                "join token {id} is not known to this farm"
                            ))))
                        }
                        Some(Err(refusal)) => return Ok(Err(refusal)),
                        Some(Ok(token)) => token,
                    };
                    store.put_principal(
                        &fingerprint,
                        &Principal {
                            role: Role::Agent,
                            name: agent_id,
                            revoked: false,
                            trusted: false,
                        },
                    )?;
                    Ok(Ok(token))
                })
                .await??
        };
        shared.farm()?.add_agent(AgentRecord {
            id: AgentId(agent_id.clone()),
            hostname: r.hostname.clone(),
            labels: token.labels.clone(),
            facts: AgentFacts::default(),
            joined_unix_ms: now,
            last_seen_unix_ms: 0,
            draining: false,
            revoked: false,
            quarantine: Default::default(),
        });
        // The token's use, the principal and the agent, made durable by one group commit.
        shared.commit_store_writes().await?;
        tracing::info!(agent = %agent_id, hostname = %r.hostname, token = %id, "agent joined");
        Ok(Response::new(v1::JoinResponse {
            agent_id,
            certificate_pem: cert_pem,
            ca_certificate_pem: shared.pki.ca_pem().to_string(),
            labels: super::convert::labels_to_proto(&token.labels),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_spelling_is_checked() {
        assert!(parse_token("abcdef.0123456789abcdef").is_ok());
        for bad in [
            "",
            "abcdef",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde!",
        ] {
            assert_eq!(
                parse_token(bad).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad}"
            );
        }
    }

    #[test]
    fn agent_ids_come_from_hostnames() {
        let id = agent_id_for("Build-Box.lab");
        assert!(id.starts_with("build-box-lab-"), "{id}");
        assert!(agent_id_for("///").starts_with("agent-"));
    }
}
