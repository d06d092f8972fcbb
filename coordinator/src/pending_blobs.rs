//! Blobs a submitted job composed (its shards' input roots) that the group commit has not
//! written yet. Their actions may already be assigned (an assignment does not wait for the
//! commit), so a CAS read of one waits for the commit to write it instead of answering
//! NOT_FOUND; the set lives in memory only and is empty when nothing is being submitted.
use archfarm_proto::Digest;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;

/// How long a read waits for a pending blob before it is answered as the store stands.
pub const PENDING_WAIT: Duration = Duration::from_secs(30);

/// Digests staged for a commit, counted (two jobs may stage the same root).
#[derive(Debug, Default)]
pub struct PendingBlobs {
    staged: Mutex<HashMap<Digest, u32>>,
    written: Notify,
}

impl PendingBlobs {
    fn staged(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, u32>> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blobs staged for the next commit.
    pub fn add(&self, digests: impl IntoIterator<Item = Digest>) {
        let mut staged = self.staged();
        for d in digests {
            *staged.entry(d).or_default() += 1;
        }
    }

    /// The commit that carried them has written them (or failed to): readers go on.
    pub fn settle(&self, digests: impl IntoIterator<Item = Digest>) {
        {
            let mut staged = self.staged();
            for d in digests {
                if let Some(n) = staged.get_mut(&d) {
                    *n -= 1;
                    if *n == 0 {
                        staged.remove(&d);
                    }
                }
            }
        }
        self.written.notify_waiters();
    }

    /// Whether any of `digests` waits for a commit.
    pub fn any_pending(&self, digests: &[Digest]) -> bool {
        let staged = self.staged();
        !staged.is_empty() && digests.iter().any(|d| staged.contains_key(d))
    }

    /// Waits until none of `digests` is pending, at most `within`; false if some still is.
    pub async fn wait_written(&self, digests: &[Digest], within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.written.notified();
            tokio::pin!(notified);
            // Registered before the check, so a settle in between is not missed.
            notified.as_mut().enable();
            if !self.any_pending(digests) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return !self.any_pending(digests);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[tokio::test]
    async fn a_read_of_a_staged_blob_waits_for_its_commit_and_others_do_not() {
        let p = std::sync::Arc::new(PendingBlobs::default());
        assert!(p.wait_written(&[digest(1)], Duration::ZERO).await);
        p.add([digest(1), digest(1), digest(2)]);
        assert!(
            p.wait_written(&[digest(3)], Duration::ZERO).await,
            "not staged"
        );
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait_written(&[digest(1)], Duration::from_secs(60)).await })
        };
        tokio::task::yield_now().await;
        // Staged twice: one commit's write is not enough.
        p.settle([digest(1), digest(2)]);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "returned while still staged once");
        p.settle([digest(1)]);
        assert!(waiter.await.unwrap());
        assert!(!p.any_pending(&[digest(1), digest(2)]));
    }

    #[tokio::test]
    async fn a_blob_never_written_is_waited_for_no_longer_than_the_limit() {
        let p = PendingBlobs::default();
        p.add([digest(7)]);
        assert!(
            !p.wait_written(&[digest(7)], Duration::from_millis(20))
                .await
        );
    }
}
