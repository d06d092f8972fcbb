//! The Admin service: join tokens (create, list, delete), client credentials, drain and
//! revoke.
use super::auth::authorize;
use super::{internal, SharedRef};
use crate::model::{AgentId, Labels, Principal, Role, TokenRecord};
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

/// Checks wire labels: keys `[a-z0-9][a-z0-9._/-]*` up to 63 bytes, printable values.
pub fn parse_labels(labels: &[v1::Label]) -> Result<Labels, Status> {
    let mut out = Labels::new();
    for l in labels {
        let key_ok = !l.key.is_empty()
            && l.key.len() <= 63
            && l.key
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && l.key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
        if !key_ok {
            return Err(Status::invalid_argument(format!(
                "label key {:?} must match [a-z0-9][a-z0-9._/-]* (at most 63 bytes)",
                l.key
            )));
        }
        if l.value.len() > 255 || !l.value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(Status::invalid_argument(format!(
                "label {} has a value that is not printable ASCII of at most 255 bytes",
                l.key
            )));
        }
        if out.insert(l.key.clone(), l.value.clone()).is_some() {
            return Err(Status::invalid_argument(format!(
                "label {} given twice",
                l.key
            )));
        }
    }
    Ok(out)
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
        self.0
            .store
            .put_token(&TokenRecord {
                id: id.clone(),
                secret_hash: blake3::hash(secret.as_bytes()).to_hex().to_string(),
                labels,
                expires_unix_ms: expires,
                single_use: r.single_use,
                uses: 0,
                description: r.description,
                created_unix_ms: self.0.now(),
            })
            .map_err(internal)?;
        self.0.store.flush().map_err(internal)?;
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
        {
            let mut farm = self.0.farm()?;
            farm.revoke(&id, now)?;
        }
        self.0.commit().await?;
        for (fp, mut p) in self.0.store.principals().map_err(internal)? {
            if p.role == Role::Agent && p.name == id.0 && !p.revoked {
                p.revoked = true;
                self.0.store.put_principal(&fp, &p).map_err(internal)?;
            }
        }
        self.0.store.flush().map_err(internal)?;
        self.0.announce_revocation();
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
            .store
            .tokens()
            .map_err(internal)?
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
        // Under the farm lock, as Join checks and uses tokens under it.
        let deleted = {
            let _farm = self.0.farm()?;
            let deleted = self.0.store.delete_token(&id).map_err(internal)?;
            self.0.store.flush().map_err(internal)?;
            deleted
        };
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
        let (certificate_pem, fingerprint) = self
            .0
            .pki
            .sign_client_csr(&r.csr_pem, &r.name, i64::from(days))
            .map_err(|e| {
                Status::invalid_argument(format!("bad certificate signing request: {e:#}"))
            })?;
        let principal = Principal {
            role: Role::Client,
            name: r.name.clone(),
            revoked: false,
        };
        self.0
            .store
            .put_principal(&fingerprint, &principal)
            .map_err(internal)?;
        self.0.store.flush().map_err(internal)?;
        tracing::info!(name = %r.name, by = %who.name, days, "client credentials issued");
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
        let n = self.revoke_clients(&name)?;
        if n == 0 {
            return Err(Status::not_found(format!(
                "no valid client credentials are issued for {name:?}"
            )));
        }
        self.0.announce_revocation();
        tracing::info!(%name, by = %who.name, certificates = n, "client credentials revoked");
        Ok(Response::new(v1::AdminResponse {
            message: format!("client credentials of {name} are revoked ({n} certificate(s)): refused at once, open streams end"),
        }))
    }
}

impl AdminService {
    /// Marks the client principals named `name` revoked; returns how many.
    fn revoke_clients(&self, name: &str) -> Result<usize, Status> {
        let mut n = 0;
        for (fp, mut p) in self.0.store.principals().map_err(internal)? {
            if p.role == Role::Client && p.name == name && !p.revoked {
                p.revoked = true;
                self.0.store.put_principal(&fp, &p).map_err(internal)?;
                n += 1;
            }
        }
        self.0.store.flush().map_err(internal)?;
        Ok(n)
    }
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
