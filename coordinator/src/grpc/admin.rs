//! The Admin service: join tokens, drain and revoke.
use super::auth::authorize;
use super::{internal, SharedRef};
use crate::model::{AgentId, Labels, Role, TokenRecord};
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
        tracing::info!(agent = %id, "agent revoked");
        Ok(Response::new(v1::AdminResponse {
            message: format!("agent {id} is revoked: its certificate is refused and its actions were queued again"),
        }))
    }
}
