//! The Admin service: join tokens (create, list, delete), client credentials, drain and
//! revoke.
use super::auth::authorize;
use super::{internal, SharedRef};
use crate::model::{AgentId, Labels, Principal, Role, TokenRecord};
use crate::store::Store;
use archfarm_proto::v1::{self, admin_server::Admin};
use rand::Rng;
use tonic::{Request, Response, Status};

/// The Admin service.
pub struct AdminService(pub SharedRef);

/// Longest token lifetime accepted.
const MAX_TTL_S: u64 = 366 * 24 * 3600;

fn random_chars(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Checks wire labels (see [`crate::planning::spec::parse_labels`]).
pub fn parse_labels(labels: &[v1::Label]) -> Result<Labels, Status> {
    crate::planning::spec::parse_labels(labels).map_err(Status::invalid_argument)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_token(
        &self,
        req: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let who = authorize(&self.0, &req, &[Role::Admin])?;
        let r = req.into_inner();
        let ttl_s = if r.ttl_s == 0 { 86_400 } else { r.ttl_s };
        if ttl_s > MAX_TTL_S {
            return Err(Status::invalid_argument(format!(
                "ttl_s {ttl_s} is longer than a year ({MAX_TTL_S} s)"
            )));
        }
        let labels = parse_labels(&r.labels)?;
        let (id, secret) = (random_chars(6), random_chars(16));
        let expires = self.0.now() + ttl_s * 1000;
        let token = TokenRecord {
            id: id.clone(),
            secret_hash: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            labels,
            expires_unix_ms: expires,
            single_use: r.single_use,
            uses: 0,
            description: r.description,
            created_unix_ms: self.0.now(),
        };
        self.0
            .blocking("store a join token", move |store| store.put_token(&token))
            .await?;
        self.0.commit_store_writes().await?;
        tracing::info!(token = %id, by = %who.name, ttl_s, single_use = r.single_use, "join token created");
        Ok(Response::new(v1::CreateTokenResponse {
            token: format!("{id}.{secret}"),
            ca_hash: self.0.pki.ca_hash().map_err(internal)?,
            expires_unix_ms: expires,
        }))
    }

    async fn drain_agent(
        &self,
        req: Request<v1::AgentRequest>,
    ) -> Result<Response<v1::AdminResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin])?;
        let id = AgentId(req.into_inner().agent_id);
        self.0.farm()?.drain(&id)?;
        self.0.commit().await?;
        tracing::info!(agent = %id, "agent draining");
        Ok(Response::new(v1::AdminResponse {
            message: format!("agent {id} is draining: it finishes what runs and takes no new work"),
        }))
    }

    async fn revoke_agent(
        &self,
        req: Request<v1::AgentRequest>,
    ) -> Result<Response<v1::AdminResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin])?;
        let id = AgentId(req.into_inner().agent_id);
        let now = self.0.now();
        // Its certificates, found by a walk of the principals off the async workers.
        let certificates = {
            let name = id.0.clone();
            self.0
                .blocking("find an agent's certificates", move |store| {
                    Ok(store
                        .principals()?
                        .into_iter()
                        .filter(|(_, p)| p.role == Role::Agent && p.name == name && !p.revoked)
                        .collect::<Vec<_>>())
                })
                .await?
        };
        {
            let mut farm = self.0.farm()?;
            if !farm.agents().any(|a| a.record.id == id) {
                return Err(Status::not_found(format!("agent {id} does not exist")));
            }
            // Announced before the farm drops the agent's session, so the session's end
            // already reads as a revocation; its other streams end on the announcement.
            self.0.revocations.revoke(
                certificates.iter().map(|(fp, _)| fp.clone()),
                [id.0.clone()],
            );
            farm.revoke(&id, now)?;
        }
        self.0
            .blocking("mark an agent's certificates revoked", move |store| {
                for (fp, mut p) in certificates {
                    p.revoked = true;
                    store.put_principal(&fp, &p)?;
                }
                Ok(())
            })
            .await?;
        // The farm's changes and the principals, durable in one group commit.
        self.0.commit_store_writes().await?;
        tracing::info!(agent = %id, "agent revoked");
        Ok(Response::new(v1::AdminResponse {
            message: format!("agent {id} is revoked: its certificate is refused and its actions were queued again"),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<v1::ListTokensRequest>,
    ) -> Result<Response<v1::ListTokensResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin])?;
        let tokens = self
            .0
            .blocking("list the join tokens", |store| store.tokens())
            .await?
            .into_iter()
            .map(|t| v1::TokenInfo {
                labels: super::convert::labels_to_proto(&t.labels),
                id: t.id,
                created_unix_ms: t.created_unix_ms,
                expires_unix_ms: t.expires_unix_ms,
                single_use: t.single_use,
                uses: t.uses,
                description: t.description,
            })
            .collect();
        Ok(Response::new(v1::ListTokensResponse { tokens }))
    }

    async fn delete_token(
        &self,
        req: Request<v1::DeleteTokenRequest>,
    ) -> Result<Response<v1::AdminResponse>, Status> {
        let who = authorize(&self.0, &req, &[Role::Admin])?;
        let id = req.into_inner().token_id;
        // A join racing with this either used the token before it went or finds it gone
        // (Join changes tokens by compare and swap).
        let deleted = {
            let id = id.clone();
            self.0
                .blocking("delete a join token", move |store| store.delete_token(&id))
                .await?
        };
        self.0.commit_store_writes().await?;
        if !deleted {
            return Err(Status::not_found(format!(
                "join token {id:?} is not known to this farm"
            )));
        }
        tracing::info!(token = %id, by = %who.name, "join token deleted");
        Ok(Response::new(v1::AdminResponse {
            message: format!(
                "join token {id} is deleted: it can no longer join (agents that joined with it stay)"
            ),
        }))
    }

    async fn issue_credentials(
        &self,
        req: Request<v1::IssueCredentialsRequest>,
    ) -> Result<Response<v1::IssueCredentialsResponse>, Status> {
        let who = authorize(&self.0, &req, &[Role::Admin])?;
        let r = req.into_inner();
        if r.role != Role::Client.name() {
            return Err(Status::invalid_argument(format!(
                "role {:?}: only client credentials are issued this way",
                r.role
            )));
        }
        check_principal_name(&r.name)?;
        // One name, one trust level: the name is the submitter jobs are recorded under and
        // the cache scope of untrusted credentials.
        let (name, trusted) = (r.name.clone(), r.trusted);
        let clash = self
            .0
            .blocking("read the principals", move |store| {
                Ok(store.principals()?.into_iter().find(|(_, p)| {
                    p.role == Role::Client && p.name == name && !p.revoked && p.trusted != trusted
                }))
            })
            .await?;
        if let Some((_, p)) = clash {
            let (was, asked) = if p.trusted {
                ("trusted", "untrusted")
            } else {
                ("untrusted", "trusted")
            };
            return Err(Status::failed_precondition(format!(
                "credentials for {} were issued {was}; {asked} ones need another name (or \
                 revoke the {was} ones first)",
                r.name
            )));
        }
        let days = match r.days {
            0 => 365,
            d if d <= 3650 => d,
            d => {
                return Err(Status::invalid_argument(format!(
                    "days {d} is more than ten years (3650)"
                )))
            }
        };
        if r.csr_pem.len() > 64 * 1024 {
            return Err(Status::invalid_argument("CSR is larger than 64 KiB"));
        }
        let (certificate_pem, fingerprint) = {
            let (shared, csr, name) = (self.0.clone(), r.csr_pem, r.name.clone());
            tokio::task::spawn_blocking(move || {
                shared.pki.sign_client_csr(&csr, &name, i64::from(days))
            })
            .await
            .map_err(|e| internal(anyhow::anyhow!("sign a CSR: {e}")))?
            .map_err(|e| {
                Status::invalid_argument(format!("bad certificate signing request: {e:#}"))
            })?
        };
        let principal = Principal {
            role: Role::Client,
            name: r.name.clone(),
            revoked: false,
            trusted: r.trusted,
        };
        self.0
            .blocking("store a client principal", move |store| {
                store.put_principal(&fingerprint, &principal)
            })
            .await?;
        self.0.commit_store_writes().await?;
        tracing::info!(name = %r.name, by = %who.name, days, trusted = r.trusted, "client credentials issued");
        Ok(Response::new(v1::IssueCredentialsResponse {
            certificate_pem,
            ca_certificate_pem: self.0.pki.ca_pem().to_string(),
        }))
    }

    async fn revoke_credentials(
        &self,
        req: Request<v1::RevokeCredentialsRequest>,
    ) -> Result<Response<v1::AdminResponse>, Status> {
        let who = authorize(&self.0, &req, &[Role::Admin])?;
        let name = req.into_inner().name;
        let revoked = {
            let name = name.clone();
            self.0
                .blocking("revoke client credentials", move |store| {
                    revoke_clients(store, &name)
                })
                .await?
        };
        let n = revoked.len();
        if n == 0 {
            return Err(Status::not_found(format!(
                "no valid client credentials are issued for {name:?}"
            )));
        }
        // Open streams end now; the answer waits for the flush.
        self.0.revocations.revoke(revoked, []);
        self.0.commit_store_writes().await?;
        tracing::info!(%name, by = %who.name, certificates = n, "client credentials revoked");
        Ok(Response::new(v1::AdminResponse {
            message: format!("client credentials of {name} are revoked ({n} certificate(s)): refused at once, open streams end"),
        }))
    }
}

/// Marks the client principals named `name` revoked (not yet flushed); returns their
/// certificates' fingerprints.
fn revoke_clients(store: &Store, name: &str) -> anyhow::Result<Vec<String>> {
    let mut revoked = Vec::new();
    for (fp, mut p) in store.principals()? {
        if p.role == Role::Client && p.name == name && !p.revoked {
            p.revoked = true;
            store.put_principal(&fp, &p)?;
            revoked.push(fp);
        }
    }
    Ok(revoked)
}

/// Checks a principal name for issued credentials: `[a-z0-9][a-z0-9._-]*`, at most 63 bytes.
fn check_principal_name(name: &str) -> Result<(), Status> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "name {name:?} must match [a-z0-9][a-z0-9._-]* (at most 63 bytes)"
        )))
    }
}
