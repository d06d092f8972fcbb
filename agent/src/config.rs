//! The agent's flags and the validated `AgentConfig` built from them, checked before anything starts.
use crate::policy::{Limits, PolicyFile, SandboxChoice};
use anyhow::{bail, Context};
use archfarm_proto::Platform;
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Default size budget of the local blob cache: 10 GiB.
pub const DEFAULT_CACHE_BUDGET_BYTES: u64 = 10 * 1024 * 1024 * 1024;
/// Default minimum free disk: below 1 GiB free the agent takes no new work.
pub const DEFAULT_MIN_FREE_DISK_BYTES: u64 = 1 << 30;
/// Default watchdog: 10 minutes without output and without CPU progress.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(600);
/// Default user actions run as when the agent runs as root: nobody.
pub const DEFAULT_SANDBOX_UID: u32 = 65534;

/// Command-line flags of `archfarm-agent`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "archfarm-agent",
    version,
    about = "Runs archfarm actions on this machine for a coordinator"
)]
pub struct AgentArgs {
    /// Coordinator URL, `https://host:port`.
    #[arg(long, value_name = "URL")]
    pub coordinator: String,
    /// Directory for credentials, the blob cache and work directories.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Join token `<id>.<secret>` (needed only until the agent has joined).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "ARCHFARM_JOIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// `sha256:<hex>` of the farm CA certificate (needed only until the agent has joined).
    #[arg(long, value_name = "sha256:HEX")]
    pub ca_hash: Option<String>,
    /// How many actions to run at once (default: number of cores).
    #[arg(long, value_name = "N")]
    pub slots: Option<u32>,
    /// Also serve PLATFORM by running programs under WRAPPER (qemu-user), e.g.
    /// `linux/arm64=/usr/bin/qemu-aarch64-static`. Repeatable.
    #[arg(long = "emulate", value_name = "PLATFORM=WRAPPER", value_parser = parse_emulator)]
    pub emulate: Vec<Emulator>,
    /// Offer only the emulated platforms, not the host's own.
    #[arg(long)]
    pub no_native: bool,
    /// Seconds between SIGTERM and SIGKILL when an action is timed out or cancelled.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub kill_grace_s: u64,
    /// Size budget of the local blob cache (`DATA_DIR/cache/blobs`); least recently used blobs
    /// are evicted above it. Default 10 GiB.
    #[arg(long, value_name = "BYTES")]
    pub cache_budget_bytes: Option<u64>,
    /// Policy file (TOML): platforms, slots, budgets, network, labels, sandbox and limits.
    /// Flags given here win over it.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// How to isolate actions: `auto` (bubblewrap when it works), `bwrap` or `none`.
    #[arg(long, value_name = "MODE")]
    pub sandbox: Option<String>,
    /// Log level (`error`, `warn`, `info`, `debug`, `trace` or a filter); RUST_LOG wins when set.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,
}

/// A platform served through an emulator: each program runs as `[wrapper, program, args...]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emulator {
    /// The platform it makes this host serve.
    pub platform: Platform,
    /// The emulator program, e.g. `/usr/bin/qemu-aarch64-static`.
    pub wrapper: PathBuf,
}

fn parse_emulator(s: &str) -> Result<Emulator, String> {
    let (platform, wrapper) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not PLATFORM=WRAPPER"))?;
    let platform: Platform = platform.parse().map_err(|e| format!("{e}"))?;
    if wrapper.is_empty() {
        return Err(format!("{s:?} names no wrapper program"));
    }
    Ok(Emulator {
        platform,
        wrapper: PathBuf::from(wrapper),
    })
}

/// Everything `run` needs, validated.
#[derive(Clone)]
pub struct AgentConfig {
    /// Coordinator URL, `https://host:port`.
    pub coordinator_url: String,
    /// Data directory: `credentials/`, `agent.json`, `cache/blobs/`, `work/`.
    pub data_dir: PathBuf,
    /// Join token, used only when `data_dir/credentials` is absent.
    pub join_token: Option<String>,
    /// `sha256:<hex>` pin of the farm CA, used only when joining.
    pub ca_hash: Option<String>,
    /// How many actions run at once.
    pub slots: u32,
    /// Platforms served through an emulator.
    pub emulators: Vec<Emulator>,
    /// Whether the host's own platform is offered.
    pub native: bool,
    /// Time between SIGTERM and SIGKILL of a timed-out or cancelled action.
    pub kill_grace: Duration,
    /// Size budget of the local blob cache.
    pub cache_budget_bytes: u64,
    /// Below this many free bytes on the data disk the agent takes no new work.
    pub min_free_disk_bytes: u64,
    /// Actions whose job asks for the network may have it.
    pub allow_network: bool,
    /// Label keys the agent accepts work for; `None` means every bound label.
    pub accept_labels: Option<Vec<String>>,
    /// How actions are isolated.
    pub sandbox: SandboxChoice,
    /// The user actions run as when the agent runs as root.
    pub sandbox_uid: u32,
    /// Stop actions without output and CPU progress for this long (`None`: never).
    pub watchdog: Option<Duration>,
    /// Per-action limits.
    pub limits: Limits,
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("coordinator_url", &self.coordinator_url)
            .field("data_dir", &self.data_dir)
            .field(
                "join_token",
                &self.join_token.as_ref().map(|_| "<redacted>"),
            )
            .field("ca_hash", &self.ca_hash)
            .field("slots", &self.slots)
            .field("emulators", &self.emulators)
            .field("native", &self.native)
            .field("kill_grace", &self.kill_grace)
            .field("cache_budget_bytes", &self.cache_budget_bytes)
            .field("min_free_disk_bytes", &self.min_free_disk_bytes)
            .field("allow_network", &self.allow_network)
            .field("accept_labels", &self.accept_labels)
            .field("sandbox", &self.sandbox)
            .field("sandbox_uid", &self.sandbox_uid)
            .field("watchdog", &self.watchdog)
            .field("limits", &self.limits)
            .finish()
    }
}

impl AgentConfig {
    /// A config with defaults: native platform only, one slot per core, 5 s kill grace, a
    /// 10 GiB blob cache, sandboxed when bubblewrap works, no network, default limits.
    pub fn new(coordinator_url: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        let slots = crate::host::logical_cores();
        Self {
            coordinator_url: coordinator_url.into(),
            data_dir: data_dir.into(),
            join_token: None,
            ca_hash: None,
            slots,
            emulators: Vec::new(),
            native: true,
            kill_grace: Duration::from_secs(5),
            cache_budget_bytes: DEFAULT_CACHE_BUDGET_BYTES,
            min_free_disk_bytes: DEFAULT_MIN_FREE_DISK_BYTES,
            allow_network: false,
            accept_labels: None,
            sandbox: SandboxChoice::Auto,
            sandbox_uid: DEFAULT_SANDBOX_UID,
            watchdog: Some(DEFAULT_WATCHDOG),
            limits: Limits::defaults(crate::host::total_memory_bytes(), slots),
        }
    }

    /// Builds and validates the config from flags and the policy file they name (flags win).
    pub fn from_args(args: AgentArgs) -> anyhow::Result<Self> {
        let policy = match &args.policy {
            Some(path) => PolicyFile::load(path)?,
            None => PolicyFile::default(),
        };
        let emulators = if args.emulate.is_empty() {
            policy
                .emulate
                .iter()
                .map(|(platform, wrapper)| {
                    parse_emulator(&format!("{platform}={}", wrapper.display()))
                        .map_err(|e| anyhow::anyhow!("policy [emulate]: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?
        } else {
            args.emulate
        };
        let sandbox = match args.sandbox.as_deref().or(policy.sandbox.as_deref()) {
            Some(s) => SandboxChoice::parse(s)?,
            None => SandboxChoice::Auto,
        };
        let slots = args
            .slots
            .or(policy.slots)
            .unwrap_or_else(crate::host::logical_cores);
        let config = Self {
            coordinator_url: args.coordinator,
            data_dir: args.data_dir,
            join_token: args.token.filter(|t| !t.is_empty()),
            ca_hash: args.ca_hash.filter(|h| !h.is_empty()),
            slots,
            emulators,
            native: !args.no_native && policy.native.unwrap_or(true),
            kill_grace: Duration::from_secs(args.kill_grace_s),
            cache_budget_bytes: args
                .cache_budget_bytes
                .or(policy.cache_budget_bytes)
                .unwrap_or(DEFAULT_CACHE_BUDGET_BYTES),
            min_free_disk_bytes: policy
                .min_free_disk_bytes
                .unwrap_or(DEFAULT_MIN_FREE_DISK_BYTES),
            allow_network: policy.allow_network.unwrap_or(false),
            accept_labels: policy.accept_labels.clone(),
            sandbox,
            sandbox_uid: policy.sandbox_uid.unwrap_or(DEFAULT_SANDBOX_UID),
            watchdog: match policy.watchdog_s {
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
                None => Some(DEFAULT_WATCHDOG),
            },
            limits: Limits::defaults(crate::host::total_memory_bytes(), slots)
                .with_file(&policy.limits),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the config against itself and this host.
    pub fn validate(&self) -> anyhow::Result<()> {
        archfarm_proto::tls::parse_coordinator_url(&self.coordinator_url)?;
        if self.data_dir.as_os_str().is_empty() {
            bail!("--data-dir must not be empty");
        }
        if self.slots == 0 {
            bail!("--slots must be at least 1");
        }
        if self.cache_budget_bytes == 0 {
            bail!("--cache-budget-bytes must be at least 1");
        }
        if self.kill_grace > Duration::from_secs(3600) {
            bail!("--kill-grace-s must be at most 3600");
        }
        if let Some(h) = &self.ca_hash {
            let h = h.trim().to_ascii_lowercase();
            let hex_ok = h
                .strip_prefix("sha256:")
                .is_some_and(|x| x.len() == 64 && x.bytes().all(|b| b.is_ascii_hexdigit()));
            if !hex_ok {
                bail!("--ca-hash {h:?} must look like sha256:<64 hex digits>");
            }
        }
        let native = crate::host::native_platform();
        if self.native && native.is_none() {
            bail!(
                "this host's architecture {:?} is not a known platform; use --no-native with --emulate",
                crate::host::machine()
            );
        }
        if !self.native && self.emulators.is_empty() {
            bail!("--no-native needs at least one --emulate PLATFORM=WRAPPER");
        }
        let mut seen = HashSet::new();
        for e in &self.emulators {
            if !seen.insert(&e.platform) {
                bail!("--emulate names {} twice", e.platform);
            }
            if native.as_ref() == Some(&e.platform) {
                bail!("--emulate {}: that is this host's own platform", e.platform);
            }
            check_executable(&e.wrapper)
                .with_context(|| format!("--emulate {}: bad wrapper", e.platform))?;
        }
        Ok(())
    }

    /// The platforms offered, native first, each with whether it is emulated.
    pub fn offered_platforms(&self) -> Vec<(Platform, bool)> {
        let mut out = Vec::new();
        if self.native {
            if let Some(p) = crate::host::native_platform() {
                out.push((p, false));
            }
        }
        out.extend(self.emulators.iter().map(|e| (e.platform.clone(), true)));
        out
    }
}

fn check_executable(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("failed to find {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{} is not executable", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> Result<AgentConfig, String> {
        let mut argv = vec![
            "archfarm-agent",
            "--coordinator",
            "https://127.0.0.1:7000",
            "--data-dir",
            "/tmp/x",
        ];
        argv.extend_from_slice(extra);
        let parsed = AgentArgs::try_parse_from(argv).map_err(|e| e.to_string())?;
        AgentConfig::from_args(parsed).map_err(|e| format!("{e:#}"))
    }

    fn foreign() -> &'static str {
        if crate::host::native_platform()
            .map(|p| p.to_string())
            .as_deref()
            == Some("linux/arm64")
        {
            "linux/s390x"
        } else {
            "linux/arm64"
        }
    }

    #[test]
    fn accepts_a_plain_native_agent() {
        let c = args(&["--slots", "3"]).expect("valid flags");
        assert_eq!(c.slots, 3);
        assert!(c.native);
        assert_eq!(c.kill_grace, Duration::from_secs(5));
        assert_eq!(c.cache_budget_bytes, 10 << 30);
        assert_eq!(c.sandbox, SandboxChoice::Auto);
        assert!(!c.allow_network);
        let c = args(&["--cache-budget-bytes", "1048576"]).expect("valid flags");
        assert_eq!(c.cache_budget_bytes, 1 << 20);
    }

    #[test]
    fn accepts_an_emulated_only_agent() {
        let spec = format!("{}=/bin/sh", foreign());
        let c = args(&["--emulate", &spec, "--no-native"]).expect("valid flags");
        let offered = c.offered_platforms();
        assert_eq!(offered.len(), 1);
        assert_eq!(offered[0].0.to_string(), foreign());
        assert!(offered[0].1);
    }

    #[test]
    fn refuses_bad_emulators() {
        let f = foreign();
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").expect("write");
        let plain = plain.display();
        let cases = [
            (
                vec!["--emulate".to_string(), "linux/mips=/bin/sh".into()],
                "unknown platform",
            ),
            (vec!["--emulate".into(), format!("{f}")], "PLATFORM=WRAPPER"),
            (
                vec!["--emulate".into(), format!("{f}=/nonexistent/q")],
                "failed to find",
            ),
            (
                vec!["--emulate".into(), format!("{f}={plain}")],
                "not executable",
            ),
            (
                vec![
                    "--emulate".into(),
                    format!("{f}=/bin/sh"),
                    "--emulate".into(),
                    format!("{f}=/bin/sh"),
                ],
                "twice",
            ),
            (vec!["--no-native".into()], "at least one --emulate"),
            (vec!["--slots".into(), "0".into()], "at least 1"),
            (
                vec!["--cache-budget-bytes".into(), "0".into()],
                "--cache-budget-bytes must be at least 1",
            ),
            (vec!["--ca-hash".into(), "md5:00".into()], "sha256:"),
        ];
        for (extra, expect) in cases {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let e = args(&extra).expect_err(&format!("{extra:?} accepted"));
            assert!(e.contains(expect), "{extra:?}: {e}");
        }
        if let Some(native) = crate::host::native_platform() {
            let spec = format!("{native}=/bin/sh");
            let e = args(&["--emulate", &spec]).expect_err("native emulated");
            assert!(e.contains("own platform"), "{e}");
        }
    }

    #[test]
    fn the_policy_file_sets_defaults_and_flags_win() {
        let dir = tempfile::tempdir().expect("tempdir");
        let policy = dir.path().join("agent.toml");
        std::fs::write(
            &policy,
            format!(
                "slots = 3\nallow_network = true\nwatchdog_s = 0\nsandbox = \"none\"\n\
                 [emulate]\n\"{}\" = \"/bin/sh\"\n[limits]\nprocesses = 7\n",
                foreign()
            ),
        )
        .expect("write");
        let p = policy.to_str().expect("utf-8");
        let c = args(&["--policy", p]).expect("valid policy");
        assert_eq!(c.slots, 3);
        assert!(c.allow_network);
        assert_eq!(c.watchdog, None);
        assert_eq!(c.sandbox, SandboxChoice::None);
        assert_eq!(c.limits.processes, 7);
        assert_eq!(c.offered_platforms().len(), 2);
        let c = args(&["--policy", p, "--slots", "5", "--sandbox", "auto"]).expect("valid");
        assert_eq!(c.slots, 5);
        assert_eq!(c.sandbox, SandboxChoice::Auto);
        std::fs::write(&policy, "slots = 2\nnetwork = true\n").expect("write");
        let e = args(&["--policy", p]).expect_err("unknown key");
        assert!(e.contains("unknown field `network`"), "{e}");
        assert!(e.contains("agent.toml"), "{e}");
    }

    #[test]
    fn refuses_a_non_https_coordinator() {
        let parsed = AgentArgs::try_parse_from([
            "archfarm-agent",
            "--coordinator",
            "http://h:1",
            "--data-dir",
            "/tmp/x",
        ])
        .expect("parses");
        assert!(AgentConfig::from_args(parsed).is_err());
    }
}
