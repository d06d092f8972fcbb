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
