//! The gRPC shells: one file per service. They authenticate, turn wire messages into the
//! farm's records and back (convert.rs), and map errors to `tonic::Status` once.
pub mod admin;
pub mod auth;
pub mod cas;
pub mod convert;
pub mod jobs;
pub mod join;
pub mod session;

use crate::cas::Cas;
use crate::farm::{Farm, FarmError};
use crate::pki::Pki;
use crate::revocations::Revocations;
use crate::store::Store;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Revoked certificates and agents; open streams watch it (see [`auth::StreamGuard`]).
    pub revocations: Revocations,
    /// One group commit at a time (see [`Shared::commit`]).
    pub committing: tokio::sync::Mutex<()>,
    /// The last of the farm's outboxes made durable and released (they are numbered from 1
    /// as they are taken, [`Farm::pending_outbox`]).
    pub committed: AtomicU64,
    /// The store was written outside the farm (tokens, principals) since the last flush.
    pub store_written: AtomicBool,
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
    /// What job planning reads.
    pub fn plan_context(&self) -> crate::planning::PlanContext<'_> {
        crate::planning::PlanContext {
            store: &self.store,
            cas: &self.cas,
            cache: &self.cache,
        }
    }
    /// Now, in Unix ms.
    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    /// Makes every change the farm made so far durable, then releases what it announced
    /// (commands to agents, events to watchers) in order. Every caller that changed the farm
    /// awaits this before answering. Group commit: a caller's changes are in the outbox
    /// pending when it calls; if, while it waited for its turn, another commit took that
    /// outbox (or a later one), its changes are durable and released already and it returns
    /// without a flush of its own. So one fsync serves every caller that arrived while the
    /// previous one ran, however many they are. The agent records' writes and the flush run
    /// outside the farm's lock, on a blocking thread.
    pub async fn commit(&self) -> Result<(), Status> {
        let mine = self.farm()?.pending_outbox();
        let _turn = self.committing.lock().await;
        if self.committed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        let (taken, outbox) = {
            let mut farm = self.farm()?;
            (farm.pending_outbox(), farm.take_outbox())
        };
        // Taken after the outbox: a write made before the flag was set is covered by this
        // flush.
        let written_outside = self.store_written.swap(false, Ordering::SeqCst);
        if outbox.is_empty() && !written_outside {
            self.committed.store(taken, Ordering::SeqCst);
            return Ok(());
        }
        let (store, cas) = (self.store.clone(), self.cas.clone());
        let outbox = tokio::task::spawn_blocking(move || {
            outbox.write(&store, &cas)?;
            if written_outside && !outbox.needs_flush {
                store.flush()?;
            }
            anyhow::Ok(outbox)
        })
        .await
        .map_err(|e| internal(anyhow::anyhow!("commit the farm's changes: {e}")))?
        .map_err(internal)?;
        self.farm()?.release(outbox);
        self.committed.store(taken, Ordering::SeqCst);
        Ok(())
    }

    /// Makes writes the caller made to the store outside the farm (tokens, principals)
    /// durable, in the same group commit as the farm's changes; never blocks the caller's
    /// thread on the flush.
    pub async fn commit_store_writes(&self) -> Result<(), Status> {
        self.store_written.store(true, Ordering::SeqCst);
        self.commit().await
    }

    /// Runs store work (writes, walks) on a blocking thread, off the async workers.
    pub async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        work: impl FnOnce(&Store) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .map_err(|e| internal(anyhow::anyhow!("{what}: {e}")))?
            .map_err(|e| internal(e.context(what)))
    }
}

/// Maps an internal error to a Status, logging it where it is handled.
pub fn internal(e: anyhow::Error) -> Status {
    tracing::error!("failed to {e:#}");
    Status::internal(format!("internal error: {e:#}"))
}

impl From<crate::planning::PlanError> for Status {
    fn from(e: crate::planning::PlanError) -> Self {
        use crate::planning::PlanError;
        match e {
            PlanError::Invalid(m) => Status::invalid_argument(m),
            PlanError::Precondition(m) => Status::failed_precondition(m),
            PlanError::Internal(e) => internal(e),
        }
    }
}

impl From<FarmError> for Status {
    fn from(e: FarmError) -> Self {
        match e {
            FarmError::NotFound(m) => Status::not_found(m),
            FarmError::Refused(m) => Status::permission_denied(m),
            FarmError::Store(e) => internal(e),
            FarmError::NeedsStored(_) => Status::internal(
                "internal error: a result needed its action's stored record and was not retried",
            ),
        }
    }
}
