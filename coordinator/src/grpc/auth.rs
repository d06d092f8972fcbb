//! Who is calling: the client certificate's SHA-256 names a principal in the store, whose
//! role each RPC checks. Revoked certificates are refused on connect, and every long-lived
//! stream is guarded: it watches the farm's revocations ([`crate::revocations`]), so a
//! revoked certificate's open streams end at once, without a store read or the farm's lock
//! per message.
use super::{Shared, SharedRef};
use crate::model::{Principal, Role};
use crate::revocations::RevocationWatch;
use archfarm_proto::tls::cert_fingerprint;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio_stream::Stream;
use tonic::{Request, Status};

/// The SHA-256 fingerprint of the caller's client certificate.
fn fingerprint<T>(req: &Request<T>) -> Result<String, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "this call needs a client certificate of the farm (use --credentials)",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate presented"))?;
    Ok(cert_fingerprint(leaf))
}

/// The principal of a certificate fingerprint, if it is known, not revoked and may act in
/// one of `roles`. Reads the store once (a point read) and never locks the farm.
fn check(shared: &Shared, fp: &str, roles: &[Role]) -> Result<Principal, Status> {
    let principal = shared
        .store
        .principal(fp)
        .map_err(super::internal)?
        .ok_or_else(|| Status::unauthenticated("client certificate is not known to this farm"))?;
    if principal.revoked || shared.revocations.covers(fp, agent_of(&principal)) {
        return Err(revoked(&principal));
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

/// The agent id an agent's certificate names.
fn agent_of(p: &Principal) -> Option<&str> {
    (p.role == Role::Agent).then_some(p.name.as_str())
}

/// The refusal for a revoked caller.
fn revoked(p: &Principal) -> Status {
    match p.role {
        Role::Agent => Status::unauthenticated(format!("agent {} has been revoked", p.name)),
        _ => Status::unauthenticated(format!("certificate of {} has been revoked", p.name)),
    }
}

/// The caller of `req`, if it may act in one of `roles`.
pub fn authorize<T>(
    shared: &Shared,
    req: &Request<T>,
    roles: &[Role],
) -> Result<Principal, Status> {
    check(shared, &fingerprint(req)?, roles)
}

/// The caller of a streaming `req` and the guard for its streams.
pub fn authorize_stream<T>(
    shared: &SharedRef,
    req: &Request<T>,
    roles: &[Role],
) -> Result<(Principal, StreamGuard), Status> {
    let fp = fingerprint(req)?;
    let principal = check(shared, &fp, roles)?;
    // Subscribed after the check: a revocation in between is seen when the guard first polls.
    let guard = StreamGuard {
        refusal: revoked(&principal),
        watch: shared.revocations.watch(&fp, agent_of(&principal)),
    };
    Ok((principal, guard))
}

/// What a long-lived stream watches: the revocations that could cover its caller.
pub struct StreamGuard {
    refusal: Status,
    watch: RevocationWatch,
}

impl StreamGuard {
    /// `items`, ended with the refusal as soon as the caller is revoked: the revocation is
    /// looked for before each item is passed on, and an idle stream is woken by it.
    pub fn guard<S>(self, items: S) -> Guarded<S> {
        Guarded {
            refusal: Some(self.refusal),
            revoked: Box::pin(self.watch.revoked()),
            items,
        }
    }
}

/// A stream that ends with UNAUTHENTICATED once its caller is revoked (see
/// [`StreamGuard::guard`]).
pub struct Guarded<S> {
    /// Taken when the stream ends with it.
    refusal: Option<Status>,
    revoked: Pin<Box<dyn Future<Output = ()> + Send>>,
    items: S,
}

impl<S, T> Stream for Guarded<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.refusal.is_none() {
            return Poll::Ready(None);
        }
        // Polled before every item: a revocation announced since the last poll is seen here
        // (one version compare while nothing changed).
        if self.revoked.as_mut().poll(cx).is_ready() {
            return Poll::Ready(self.refusal.take().map(Err));
        }
        Pin::new(&mut self.items).poll_next(cx)
    }
}
