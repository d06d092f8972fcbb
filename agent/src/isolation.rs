//! What holds one action's processes in: the sandbox, the limit enforcer, the limits, the
//! watchdog; and `Breach`, how a process run learns that it broke a limit or got stuck.
use crate::limits::{bytes, Enforcer};
use crate::policy::Limits;
use crate::sandbox::Sandbox;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Everything the executor needs to isolate and limit actions; fixed at agent start.
#[derive(Debug)]
pub struct Isolation {
    /// bubblewrap or nothing.
    pub sandbox: Sandbox,
    /// cgroups or rlimits.
    pub enforcer: Enforcer,
    /// Per-action limits (0: none).
    pub limits: Limits,
    /// Stop a run with no output and no CPU progress for this long.
    pub watchdog: Option<Duration>,
    /// Actions whose job asks for the network may have it.
    pub allow_network: bool,
    next: AtomicU64,
}

impl Isolation {
    /// Puts the parts together.
    pub fn new(
        sandbox: Sandbox,
        enforcer: Enforcer,
        limits: Limits,
        watchdog: Option<Duration>,
        allow_network: bool,
    ) -> Self {
        Self {
            sandbox,
            enforcer,
            limits,
            watchdog,
            allow_network,
            next: AtomicU64::new(0),
        }
    }

    /// No sandbox, no cgroup, no limits, no watchdog: for tests of everything else.
    pub fn unconfined() -> Self {
        Self::new(
            Sandbox::Unsandboxed {
                reason: "turned off by policy".into(),
            },
            Enforcer::Rlimits {
                why: "not asked for".into(),
            },
            Limits {
                memory_bytes: 0,
                processes: 0,
                cpu_time_s: 0,
                output_bytes: 0,
                disk_bytes: 0,
            },
            None,
            false,
        )
    }

    /// A fresh cgroup name for one process tree.
    pub fn next_name(&self) -> String {
        format!("run-{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// "cgroup v1: memory 12 GiB, processes 4096; rlimits: file size 10 GiB, no core dumps;
    /// agent: output 1 GiB, work-dir disk 10 GiB, watchdog 600 s".
    pub fn describe_limits(&self) -> String {
        let l = &self.limits;
        let or_none = |v: u64, f: &dyn Fn(u64) -> String| {
            if v == 0 {
                "none".to_string()
            } else {
                f(v)
            }
        };
        let memory = or_none(l.memory_bytes, &bytes);
        let processes = or_none(u64::from(l.processes), &|p| p.to_string());
        let held = match (&self.enforcer, &self.sandbox) {
            (Enforcer::Rlimits { .. }, Sandbox::Bwrap(b)) if b.prlimit.is_some() => {
                format!("rlimits: memory {memory} per process (and sampled), processes {processes}")
            }
            (Enforcer::Rlimits { .. }, _) => format!(
                "rlimits: memory {memory} per process (and sampled), processes not enforced"
            ),
            (e, _) => format!("{}: memory {memory}, processes {processes}", e.name()),
        };
        format!(
            "{held}; cpu time {} per process; output {}; work-dir disk {}; watchdog {}",
            or_none(l.cpu_time_s, &|s| format!("{s} s")),
            or_none(l.output_bytes, &bytes),
            or_none(l.disk_bytes, &bytes),
            self.watchdog
                .map_or("off".into(), |w| format!("{} s", w.as_secs())),
        )
    }
}

/// Why a run was stopped early by the agent itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreachKind {
    /// It broke a limit: the command's fault.
    Limit,
    /// No output and no CPU progress: stuck, an infrastructure failure.
    Stuck,
}

/// Set once by whoever notices first (output reader, monitor); the supervisor kills the tree.
#[derive(Debug, Default)]
pub struct Breach {
    token: CancellationToken,
    what: Mutex<Option<(BreachKind, String)>>,
}

impl Breach {
    /// Records the breach (the first one counts) and asks the supervisor to stop the run.
    pub fn trip(&self, kind: BreachKind, message: String) {
        if let Ok(mut w) = self.what.lock() {
            w.get_or_insert((kind, message));
        }
        self.token.cancel();
    }

    /// Resolves when tripped.
    pub async fn tripped(&self) {
        self.token.cancelled().await
    }

    /// What was recorded.
    pub fn get(&self) -> Option<(BreachKind, String)> {
        self.what.lock().ok().and_then(|w| w.clone())
    }
}

/// Counts stdout and stderr bytes against the output limit.
#[derive(Debug)]
pub struct OutputMeter<'a> {
    limit: u64,
    seen: AtomicU64,
    breach: &'a Breach,
}

impl<'a> OutputMeter<'a> {
    /// A meter tripping `breach` past `limit` bytes (0: never).
    pub fn new(limit: u64, breach: &'a Breach) -> Self {
        Self {
            limit,
            seen: AtomicU64::new(0),
            breach,
        }
    }

    /// Adds `n` bytes.
    pub fn add(&self, n: usize) {
        let total = self.seen.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if self.limit > 0 && total > self.limit {
            self.breach.trip(
                BreachKind::Limit,
                format!("output limit of {} exceeded", bytes(self.limit)),
            );
        }
    }

    /// Bytes seen so far.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_breach_counts() {
        let b = Breach::default();
        assert_eq!(b.get(), None);
        let meter = OutputMeter::new(10, &b);
        meter.add(10);
        assert_eq!(b.get(), None);
        meter.add(1);
        b.trip(BreachKind::Stuck, "later".into());
        assert_eq!(
            b.get(),
            Some((
                BreachKind::Limit,
                "output limit of 10 bytes exceeded".into()
            ))
        );
        assert_eq!(meter.seen(), 11);
    }

    #[test]
    fn limits_are_described_for_status() {
        let i = Isolation::new(
            Sandbox::Unsandboxed { reason: "x".into() },
            Enforcer::Rlimits { why: "y".into() },
            Limits {
                memory_bytes: 1 << 30,
                processes: 100,
                cpu_time_s: 0,
                output_bytes: 1 << 20,
                disk_bytes: 0,
            },
            Some(Duration::from_secs(60)),
            false,
        );
        assert_eq!(
            i.describe_limits(),
            "rlimits: memory 1 GiB per process (and sampled), processes not enforced; \
             cpu time none per process; output 1 MiB; work-dir disk none; watchdog 60 s"
        );
    }
}
