//! Who is calling: the client certificate's SHA-256 names a principal in the store, whose
//! role each RPC checks. Revoked certificates are refused on connect, and every long-lived
//! stream is guarded: re-checked before each message and woken by every revocation, so a
//! revoked certificate's open streams end at once.
use super::{Shared, SharedRef};
use crate::model::{AgentId, Principal, Role};
use archfarm_proto::tls::cert_fingerprint;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::watch;
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
/// one of `roles`.
fn check(shared: &Shared, fp: &str, roles: &[Role]) -> Result<Principal, Status> {
    let principal = shared
        .store
        .principal(fp)
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
    roles: &'static [Role],
) -> Result<(Principal, StreamGuard), Status> {
    let fp = fingerprint(req)?;
    let principal = check(shared, &fp, roles)?;
    let guard = StreamGuard {
        shared: shared.clone(),
        fingerprint: fp,
        roles,
    };
    Ok((principal, guard))
}

/// What a long-lived stream re-checks: the certificate it was opened with, still valid.
#[derive(Clone)]
pub struct StreamGuard {
    shared: SharedRef,
    fingerprint: String,
    roles: &'static [Role],
}

impl StreamGuard {
    /// Whether the caller may still use the stream.
    pub fn check(&self) -> Result<(), Status> {
        check(&self.shared, &self.fingerprint, self.roles).map(|_| ())
    }

    /// Resolves with the refusal once the caller is revoked (checked at once and after every
    /// revocation anywhere in the farm).
    async fn revoked(self) -> Status {
        let mut revocations: watch::Receiver<u64> = self.shared.revocations.subscribe();
        loop {
            if let Err(refusal) = self.check() {
                return refusal;
            }
            if revocations.changed().await.is_err() {
                // The farm is going away; the server ends the stream.
                std::future::pending::<()>().await;
            }
        }
    }

    /// `items`, ended with the refusal as soon as the caller is revoked: each item is
    /// checked before it is passed on, and an idle stream is woken by the revocation.
    pub fn guard<S>(self, items: S) -> Guarded<S> {
        Guarded {
            check: self.clone(),
            revoked: Box::pin(self.revoked()),
            items,
            done: false,
        }
    }
}

/// A stream that ends with PERMISSION_DENIED or UNAUTHENTICATED once its caller is revoked
/// (see [`StreamGuard::guard`]).
pub struct Guarded<S> {
    check: StreamGuard,
    revoked: Pin<Box<dyn Future<Output = Status> + Send>>,
    items: S,
    done: bool,
}

impl<S, T> Stream for Guarded<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(refusal) = self.revoked.as_mut().poll(cx) {
            self.done = true;
            return Poll::Ready(Some(Err(refusal)));
        }
        match Pin::new(&mut self.items).poll_next(cx) {
            Poll::Ready(Some(item)) => match self.check.check() {
                Ok(()) => Poll::Ready(Some(item)),
                Err(refusal) => {
                    self.done = true;
                    Poll::Ready(Some(Err(refusal)))
                }
            },
            other => other,
        }
    }
}
