//! The lab operator's policy file (TOML, unknown keys rejected): what the agent serves, how
//! much of the machine it lends, and what actions may do. Flags given on the command line win
//! over the file.
use anyhow::{bail, Context};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file as written; every key is optional.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Offer the host's own platform (default true).
    pub native: Option<bool>,
    /// Platforms served through an emulator: `"linux/arm64" = "/usr/bin/qemu-aarch64-static"`.
    #[serde(default)]
    pub emulate: BTreeMap<String, PathBuf>,
    /// Actions run at once (default: one per core).
    pub slots: Option<u32>,
    /// Size budget of the local blob cache in bytes.
    pub cache_budget_bytes: Option<u64>,
    /// Below this many free bytes on the data disk the agent takes no new work.
    pub min_free_disk_bytes: Option<u64>,
    /// Let actions whose job asks for the network have it (default false: no network).
    pub allow_network: Option<bool>,
    /// Label keys (bound at join) the agent accepts work for; absent means all of them.
    pub accept_labels: Option<Vec<String>>,
    /// `auto` (bubblewrap when it works, else none), `bwrap` (refuse to start without it)
    /// or `none`.
    pub sandbox: Option<String>,
    /// The user id actions run as when the agent runs as root (default 65534, nobody).
    pub sandbox_uid: Option<u32>,
    /// An action with no output and no CPU progress for this long is stopped as stuck (an
    /// infrastructure failure); 0 turns the watchdog off.
    pub watchdog_s: Option<u64>,
    /// Per-action limits.
    #[serde(default)]
    pub limits: LimitsFile,
}

/// `[limits]`: each limit is per action; 0 means no limit.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Memory of the whole process tree.
    pub memory_bytes: Option<u64>,
    /// Processes (and threads) at once.
    pub processes: Option<u32>,
    /// CPU seconds per process.
    pub cpu_time_s: Option<u64>,
    /// stdout plus stderr.
    pub output_bytes: Option<u64>,
    /// Bytes the action may add to its work directory (and its private /tmp).
    pub disk_bytes: Option<u64>,
}

impl PolicyFile {
    /// Reads and parses `path`; the error names the file and the bad key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the policy file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("bad policy file {}", path.display()))
    }

    /// Parses policy text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let policy: PolicyFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(s) = &policy.sandbox {
            SandboxChoice::parse(s)?;
        }
        if policy.sandbox_uid == Some(0) {
            bail!("sandbox_uid must not be 0: actions would run as root");
        }
        Ok(policy)
    }
}

/// How actions are to be isolated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SandboxChoice {
    /// bubblewrap when it is present and works, else no sandbox (with a warning).
    #[default]
    Auto,
    /// bubblewrap or refuse to start.
    Bwrap,
    /// No sandbox: actions run as the agent's user with its view of the system.
    None,
}

impl SandboxChoice {
    /// `auto`, `bwrap` or `none`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "bwrap" => Ok(Self::Bwrap),
            "none" => Ok(Self::None),
            other => bail!("sandbox must be auto, bwrap or none, not {other:?}"),
        }
    }
}

/// The per-action limits in force; 0 means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Memory of the whole process tree.
    pub memory_bytes: u64,
    /// Processes and threads at once.
    pub processes: u32,
    /// CPU seconds per process.
    pub cpu_time_s: u64,
    /// stdout plus stderr.
    pub output_bytes: u64,
    /// Bytes added to the work dir.
    pub disk_bytes: u64,
}

impl Limits {
    /// Defaults for a host with `memory_bytes` of memory and `slots` slots: an even share of
    /// memory (at least 1 GiB), 4096 processes, no CPU-time limit, 1 GiB of output, 10 GiB of
    /// disk.
    pub fn defaults(memory_bytes: u64, slots: u32) -> Self {
        Self {
            memory_bytes: (memory_bytes / u64::from(slots.max(1))).max(1 << 30),
            processes: 4096,
            cpu_time_s: 0,
            output_bytes: 1 << 30,
            disk_bytes: 10 << 30,
        }
    }

    /// The defaults with what the file sets.
    pub fn with_file(mut self, file: &LimitsFile) -> Self {
        if let Some(v) = file.memory_bytes {
            self.memory_bytes = v;
        }
        if let Some(v) = file.processes {
            self.processes = v;
        }
        if let Some(v) = file.cpu_time_s {
            self.cpu_time_s = v;
        }
        if let Some(v) = file.output_bytes {
            self.output_bytes = v;
        }
        if let Some(v) = file.disk_bytes {
            self.disk_bytes = v;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_policy() {
        let p = PolicyFile::parse(
            r#"
native = false
slots = 2
cache_budget_bytes = 1000
min_free_disk_bytes = 5000
allow_network = true
accept_labels = ["node-e2e"]
sandbox = "bwrap"
sandbox_uid = 1234
watchdog_s = 60

[emulate]
"linux/arm64" = "/usr/bin/qemu-aarch64-static"

[limits]
memory_bytes = 1073741824
processes = 100
cpu_time_s = 10
output_bytes = 2048
disk_bytes = 4096
"#,
        )
        .expect("valid policy");
        assert_eq!(p.native, Some(false));
        assert_eq!(p.slots, Some(2));
        assert_eq!(p.accept_labels, Some(vec!["node-e2e".to_string()]));
        assert_eq!(
            p.emulate.get("linux/arm64").map(PathBuf::as_path),
            Some(Path::new("/usr/bin/qemu-aarch64-static"))
        );
        let l = Limits::defaults(8 << 30, 4).with_file(&p.limits);
        assert_eq!(
            l,
            Limits {
                memory_bytes: 1 << 30,
                processes: 100,
                cpu_time_s: 10,
                output_bytes: 2048,
                disk_bytes: 4096
            }
        );
    }

    #[test]
    fn an_empty_policy_keeps_the_defaults() {
        let p = PolicyFile::parse("").expect("empty is valid");
        assert_eq!(p, PolicyFile::default());
        let l = Limits::defaults(8 << 30, 4).with_file(&p.limits);
        assert_eq!(l.memory_bytes, 2 << 30);
        assert_eq!(Limits::defaults(1 << 30, 4).memory_bytes, 1 << 30);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        for (text, expect) in [
            ("slotz = 2", "unknown field `slotz`"),
            ("[limits]\nmemory = 1", "unknown field `memory`"),
            ("sandbox = \"docker\"", "auto, bwrap or none"),
            ("sandbox_uid = 0", "must not be 0"),
            ("slots = \"two\"", "invalid type"),
            ("allow_network = 1", "invalid type"),
        ] {
            let e = PolicyFile::parse(text).expect_err(text);
            assert!(format!("{e:#}").contains(expect), "{text}: {e:#}");
        }
    }
}
