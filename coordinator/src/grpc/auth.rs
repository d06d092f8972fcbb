//! Who is calling: the client certificate's SHA-256 names a principal in the store, whose
//! role each RPC checks. Revoked certificates are refused.
use super::Shared;
use crate::model::{AgentId, Principal, Role};
use archfarm_proto::tls::cert_fingerprint;
use tonic::{Request, Status};

/// The caller of `req`, if it may act in one of `roles`.
pub fn authorize<T>(
    shared: &Shared,
    req: &Request<T>,
    roles: &[Role],
) -> Result<Principal, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "this call needs a client certificate of the farm (use --credentials)",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    let fp = cert_fingerprint(leaf);
    let principal = shared
        .store
        .principal(&fp)
        .map_err(super::internal)?
        .ok_or_else(|| Status::unauthenticated("client certificate is not known to this farm"))?;
    if principal.revoked {
        return Err(Status::unauthenticated(format!(
            "certificate of {} has been revoked",
            principal.name
        )));
    }
    if principal.role == Role::Agent && shared.farm()?.is_revoked(&AgentId(principal.name.clone()))
    {
        return Err(Status::unauthenticated(format!(
            "agent {} has been revoked",
            principal.name
        )));
    }
    let allowed = roles.contains(&principal.role)
        || (principal.role == Role::Admin && roles.contains(&Role::Client));
    if !allowed {
        let want: Vec<&str> = roles.iter().map(|r| r.name()).collect();
        return Err(Status::permission_denied(format!(
            "{} has role {}; this call needs role {}",
            principal.name,
            principal.role.name(),
            want.join(" or ")
        )));
    }
    Ok(principal)
}
