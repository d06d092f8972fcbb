//! Cache scopes: who submitted an action decides which part of the result cache its results
//! are written to and which parts its lookups read. A trusted submitter's results go to the
//! shared scope every job reads; an untrusted submitter's (a pull request's job) only to its
//! own scope, which nobody else reads, so a job cannot plant a result for anyone else.
use serde::{Deserialize, Serialize};
use std::fmt;

/// Who submitted an action, as recorded with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitter {
    /// The principal's name (empty for actions recorded before submitters were).
    pub name: String,
    /// Whether its credentials were issued as trusted (admins always are).
    pub trusted: bool,
}

/// A part of the result cache.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// Written only by trusted submitters' jobs; read by every job.
    Shared,
    /// Written and read only by the named (untrusted) principal's jobs.
    Principal(String),
}

impl CacheScope {
    /// The prefix of this scope's keys in the store: principal names are
    /// `[a-z0-9][a-z0-9._-]*`, so no name can contain the `/` that ends the prefix.
    pub fn key_prefix(&self) -> String {
        match self {
            CacheScope::Shared => "shared/".to_owned(),
            CacheScope::Principal(n) => format!("principal:{n}/"),
        }
    }
}

impl fmt::Display for CacheScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheScope::Shared => f.write_str("shared"),
            CacheScope::Principal(n) => write!(f, "principal {n}"),
        }
    }
}

impl Submitter {
    /// A submitter.
    pub fn new(name: impl Into<String>, trusted: bool) -> Self {
        Self {
            name: name.into(),
            trusted,
        }
    }

    /// Where its results are written: the shared scope when trusted, else its own; nowhere
    /// for an action recorded before submitters were (nobody can say whom it belongs to).
    pub fn write_scope(&self) -> Option<CacheScope> {
        if self.name.is_empty() {
            None
        } else if self.trusted {
            Some(CacheScope::Shared)
        } else {
            Some(CacheScope::Principal(self.name.clone()))
        }
    }

    /// What its lookups read, in order: its own scope (when untrusted), then the shared one.
    pub fn read_scopes(&self) -> Vec<CacheScope> {
        match self.write_scope() {
            Some(own @ CacheScope::Principal(_)) => vec![own, CacheScope::Shared],
            _ => vec![CacheScope::Shared],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_submitters_write_their_own_scope_and_read_it_before_the_shared_one() {
        let pr = Submitter::new("pr-bot", false);
        let own = CacheScope::Principal("pr-bot".into());
        assert_eq!(pr.write_scope(), Some(own.clone()));
        assert_eq!(pr.read_scopes(), vec![own, CacheScope::Shared]);
    }

    #[test]
    fn trusted_submitters_write_and_read_the_shared_scope_only() {
        let ci = Submitter::new("ci", true);
        assert_eq!(ci.write_scope(), Some(CacheScope::Shared));
        assert_eq!(ci.read_scopes(), vec![CacheScope::Shared]);
    }

    #[test]
    fn an_action_without_a_recorded_submitter_writes_nowhere() {
        let old = Submitter::default();
        assert_eq!(old.write_scope(), None);
        assert_eq!(old.read_scopes(), vec![CacheScope::Shared]);
    }

    #[test]
    fn scopes_never_share_a_key_prefix() {
        let a = CacheScope::Principal("shared".into()).key_prefix();
        let b = CacheScope::Shared.key_prefix();
        let c = CacheScope::Principal("a".into()).key_prefix();
        let d = CacheScope::Principal("a.b".into()).key_prefix();
        for (x, y) in [(&a, &b), (&c, &d), (&b, &c)] {
            assert!(
                !x.starts_with(y.as_str()) && !y.starts_with(x.as_str()),
                "{x} {y}"
            );
        }
    }
}
