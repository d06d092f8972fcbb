//! Which certificates and agents are revoked, held in memory and announced to open streams
//! through a watch channel: a long-lived stream (Session, Watch, Cas.Read, Cas.Write) waits on
//! its [`RevocationWatch`] and ends when a revocation covers its caller, without reading the
//! store or locking the farm for each message it passes on.
//!
//! The set only grows while the coordinator runs; at start it is rebuilt from the stored
//! principals and agents marked revoked ([`Revoked::from_records`]).
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::watch;

/// The revoked certificate fingerprints and agent ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    fingerprints: HashSet<String>,
    agents: HashSet<String>,
}

impl Revoked {
    /// The set from stored records: fingerprints whose principal is marked revoked, and
    /// agents whose record is.
    pub fn from_records(
        fingerprints: impl IntoIterator<Item = String>,
        agents: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            fingerprints: fingerprints.into_iter().collect(),
            agents: agents.into_iter().collect(),
        }
    }

    /// Whether the certificate `fingerprint`, or the agent `agent` it names (for agent
    /// certificates), is revoked.
    pub fn covers(&self, fingerprint: &str, agent: Option<&str>) -> bool {
        self.fingerprints.contains(fingerprint) || agent.is_some_and(|a| self.agents.contains(a))
    }
}

/// The revoked set and its announcements.
pub struct Revocations {
    tx: watch::Sender<Arc<Revoked>>,
}

impl Revocations {
    /// Starts from `initial` (what the store says is revoked).
    pub fn new(initial: Revoked) -> Self {
        Self {
            tx: watch::channel(Arc::new(initial)).0,
        }
    }

    /// Adds certificates and agents to the set and wakes every open stream's watch. Memory
    /// only: persisting the revocation is the caller's.
    pub fn revoke(
        &self,
        fingerprints: impl IntoIterator<Item = String>,
        agents: impl IntoIterator<Item = String>,
    ) {
        self.tx.send_modify(|set| {
            let set = Arc::make_mut(set);
            set.fingerprints.extend(fingerprints);
            set.agents.extend(agents);
        });
    }

    /// Whether the caller is revoked now.
    pub fn covers(&self, fingerprint: &str, agent: Option<&str>) -> bool {
        self.tx.borrow().covers(fingerprint, agent)
    }

    /// Whether the agent `agent` is revoked now.
    pub fn agent_revoked(&self, agent: &str) -> bool {
        self.tx.borrow().agents.contains(agent)
    }

    /// A watch for one caller: `fingerprint` and, for an agent certificate, the agent's id.
    pub fn watch(&self, fingerprint: &str, agent: Option<&str>) -> RevocationWatch {
        RevocationWatch {
            rx: self.tx.subscribe(),
            fingerprint: fingerprint.to_string(),
            agent: agent.map(str::to_string),
        }
    }
}

/// One caller's view of the revocations.
pub struct RevocationWatch {
    rx: watch::Receiver<Arc<Revoked>>,
    fingerprint: String,
    agent: Option<String>,
}

impl RevocationWatch {
    /// Whether the caller is revoked now.
    pub fn is_revoked(&self) -> bool {
        self.rx
            .borrow()
            .covers(&self.fingerprint, self.agent.as_deref())
    }

    /// Resolves once the caller is revoked: at once when it already is, else at the first
    /// revocation that covers it. Never resolves when the farm goes away first (the server
    /// ends its streams then).
    pub async fn revoked(mut self) {
        loop {
            if self
                .rx
                .borrow_and_update()
                .covers(&self.fingerprint, self.agent.as_deref())
            {
                return;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_watch_resolves_only_for_a_revocation_that_covers_its_caller() {
        let r = Revocations::new(Revoked::default());
        let mut client = Box::pin(r.watch("fp-client", None).revoked());
        let mut agent = Box::pin(r.watch("fp-agent", Some("box-1")).revoked());
        assert!(
            (&mut client).now_or_never().is_none(),
            "nothing revoked yet"
        );
        assert!((&mut agent).now_or_never().is_none());

        // Someone else's revocation wakes both but ends neither.
        r.revoke(["fp-other".to_string()], ["box-2".to_string()]);
        assert!((&mut client).now_or_never().is_none());
        assert!((&mut agent).now_or_never().is_none());

        // An agent is revoked by id (its certificate's fingerprint may not be known yet).
        r.revoke([], ["box-1".to_string()]);
        assert!(
            (&mut agent).now_or_never().is_some(),
            "the agent's watch ends"
        );
        assert!((&mut client).now_or_never().is_none());

        r.revoke(["fp-client".to_string()], []);
        assert!(
            (&mut client).now_or_never().is_some(),
            "the client's watch ends"
        );
        assert!(r.covers("fp-client", None));
        assert!(r.covers("fp-anything", Some("box-1")));
        assert!(!r.covers("fp-anything", Some("box-3")));
    }

    #[test]
    fn a_watch_opened_after_the_revocation_resolves_at_once() {
        let r = Revocations::new(Revoked::from_records(
            ["fp-old".to_string()],
            ["box-old".to_string()],
        ));
        assert!(r.watch("fp-old", None).is_revoked());
        assert!(r.watch("fp-new", Some("box-old")).is_revoked());
        assert!(!r.watch("fp-new", Some("box-new")).is_revoked());
        assert!(r.watch("fp-old", None).revoked().now_or_never().is_some());
        r.revoke(["fp-new".to_string()], []);
        assert!(r
            .watch("fp-new", Some("box-new"))
            .revoked()
            .now_or_never()
            .is_some());
    }
}
