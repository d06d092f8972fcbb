//! The gRPC shells: one file per service. They authenticate, turn wire messages into the
//! farm's records and back (convert.rs), and map errors to `tonic::Status` once.
pub mod admin;
pub mod auth;
pub mod cas;
pub mod convert;
pub mod jobs;
pub mod join;
pub mod session;
pub mod step_sets;

use crate::cas::Cas;
use crate::farm::{Farm, FarmError};
use crate::pki::Pki;
use crate::store::Store;
use std::sync::{Arc, Mutex, MutexGuard};
use tonic::Status;

/// What every service shares.
pub struct Shared {
    /// The state machine, behind the one lock.
    pub farm: Mutex<Farm>,
    /// The durable store (also inside the farm; reads go here directly).
    pub store: Store,
    /// Blobs.
    pub cas: Arc<Cas>,
    /// Results of actions and steps (the farm records into the same one).
    pub cache: Arc<crate::result_cache::ResultCache>,
    /// The CA.
    pub pki: Pki,
    /// Wall clock in Unix ms (injected in tests).
    pub clock: fn() -> u64,
    /// Bumped on every revocation: open streams re-check their caller when it changes.
    pub revocations: tokio::sync::watch::Sender<u64>,
    /// One group commit at a time (see [`Shared::commit`]).
    pub committing: tokio::sync::Mutex<()>,
}

/// Shared state handle.
pub type SharedRef = Arc<Shared>;

impl Shared {
    /// Locks the farm; a poisoned lock is an internal error, not a crash.
    pub fn farm(&self) -> Result<MutexGuard<'_, Farm>, Status> {
        self.farm
            .lock()
            .map_err(|_| Status::internal("farm state lock poisoned by an earlier panic"))
    }
    /// Wakes every open stream to re-check its caller (after a revocation).
    pub fn announce_revocation(&self) {
        self.revocations.send_modify(|n| *n += 1);
    }
    /// Now, in Unix ms.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Makes every change the farm made so far durable, then releases what it announced
    /// (commands to agents, events to watchers) in order. Every caller that changed the farm
    /// awaits this before answering; callers that arrive while a flush runs are covered by
    /// the next one, so one fsync serves them all. The flush runs outside the farm's lock.
    pub async fn commit(&self) -> Result<(), Status> {
        let _turn = self.committing.lock().await;
        let outbox = self.farm()?.take_outbox();
        if outbox.is_empty() {
            return Ok(());
        }
        if outbox.needs_flush {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.flush())
                .await
                .map_err(|e| internal(anyhow::anyhow!("flush the state store: {e}")))?
                .map_err(internal)?;
        }
        self.farm()?.release(outbox);
        Ok(())
    }
}

/// Maps an internal error to a Status, logging it where it is handled.
pub fn internal(e: anyhow::Error) -> Status {
    tracing::error!("failed to {e:#}");
    Status::internal(format!("internal error: {e:#}"))
}

impl From<FarmError> for Status {
    fn from(e: FarmError) -> Self {
        match e {
            FarmError::NotFound(m) => Status::not_found(m),
            FarmError::Refused(m) => Status::permission_denied(m),
            FarmError::Store(e) => internal(e),
        }
    }
}
