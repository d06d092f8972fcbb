//! Isolation of actions with bubblewrap: a read-only system, the work dir as the only
//! writable place, a private /tmp, its own pid namespace, no network unless allowed, the
//! agent's data dir hidden; as root, actions run as an unprivileged uid that reaches its work
//! dir through a mount namespace of its own (`user_switch.rs`), so the data dir and its parents
//! stay closed. Checked once at start: `auto` goes without a sandbox only when bubblewrap is
//! not installed or user namespaces are disabled, and never when the agent is root (that takes
//! `sandbox = "none"`); any other failure stops the agent with what to fix. The mode is
//! reported to the coordinator and shown in status.
mod user_switch;

use crate::policy::SandboxChoice;
use anyhow::{bail, Context};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
pub use user_switch::{first_unsearchable, UserSwitch};

/// How this agent isolates actions.
#[derive(Clone, Debug)]
pub enum Sandbox {
    /// Every process runs inside bubblewrap.
    Bwrap(Bwrap),
    /// Processes run as the agent's user with its view of the system; why.
    Unsandboxed { reason: String },
}

/// A working bubblewrap setup.
#[derive(Clone, Debug)]
pub struct Bwrap {
    /// The bwrap program.
    pub program: PathBuf,
    /// Directory hidden under an empty tmpfs (the agent's data dir, with its credentials).
    pub hide: PathBuf,
    /// The user and group actions run as, when the agent runs as root.
    pub user: Option<(u32, u32)>,
    /// When the agent runs as root: the first directory on the way to the work root that the
    /// sandbox user may not search. Each action's mount namespace covers it with a tmpfs and
    /// binds the work dir back at its own path.
    pub mask: Option<PathBuf>,
    /// prlimit, used inside the sandbox to cap the processes of that sandbox alone.
    pub prlimit: Option<PathBuf>,
}

/// What one sandboxed process gets.
pub struct SandboxRequest<'a> {
    /// The action's work dir: bound read-write at its own path.
    pub work_dir: &'a Path,
    /// Where the process starts.
    pub cwd: &'a Path,
    /// Give it the host's network.
    pub network: bool,
    /// Size of its private /tmp (0: the tmpfs default).
    pub tmp_bytes: u64,
    /// Processes and threads the sandbox may hold (0: no cap).
    pub processes: u32,
}

/// Why bubblewrap cannot be used on this host.
#[derive(Debug)]
pub enum ProbeFailure {
    /// bwrap is not installed.
    NotInstalled,
    /// The kernel gives no user namespaces to unprivileged users; which setting says so.
    NoUserNamespaces(String),
    /// Anything else: a fixable problem, with what to fix.
    Broken(anyhow::Error),
}

impl ProbeFailure {
    /// What is wrong, and how to fix it.
    fn explain(&self) -> (String, &'static str) {
        match self {
            ProbeFailure::NotInstalled => (
                "bubblewrap (bwrap) is not installed".into(),
                "install bubblewrap (Debian: apt install bubblewrap)",
            ),
            ProbeFailure::NoUserNamespaces(why) => (
                why.clone(),
                "allow unprivileged user namespaces (user.max_user_namespaces > 0, \
                 kernel.unprivileged_userns_clone = 1 where it exists, and no AppArmor \
                 restriction of them)",
            ),
            ProbeFailure::Broken(e) => (format!("{e:#}"), "fix what bubblewrap reports"),
        }
    }
}

/// How to opt out, said in every refusal.
const OPT_OUT: &str = "or set sandbox = \"none\" in the policy file (or pass --sandbox none) to \
                       run actions without a sandbox";

impl Sandbox {
    /// Finds out what works here and applies the policy (see `decide`).
    pub fn detect(
        choice: SandboxChoice,
        data_dir: &Path,
        work_root: &Path,
        sandbox_uid: u32,
    ) -> anyhow::Result<Self> {
        let root = nix::unistd::geteuid().is_root();
        let sandbox = decide(choice, root, || {
            Self::probe(data_dir, work_root, sandbox_uid)
        })?;
        if let Sandbox::Unsandboxed { reason } = &sandbox {
            tracing::warn!("running actions without a sandbox: {reason}");
        }
        Ok(sandbox)
    }

    fn probe(data_dir: &Path, work_root: &Path, sandbox_uid: u32) -> Result<Bwrap, ProbeFailure> {
        let program = find_program("bwrap").ok_or(ProbeFailure::NotInstalled)?;
        let broken = ProbeFailure::Broken;
        let user = nix::unistd::geteuid().is_root().then(|| {
            let gid = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(sandbox_uid))
                .ok()
                .flatten()
                .map_or(sandbox_uid, |g| g.gid.as_raw());
            (sandbox_uid, gid)
        });
        let mask = match user {
            Some((uid, gid)) => first_unsearchable(work_root, uid, gid).map_err(broken)?,
            None => None,
        };
        let bwrap = Bwrap {
            program,
            hide: data_dir.to_path_buf(),
            user,
            mask,
            prlimit: find_program("prlimit"),
        };
        let probe_dir = work_root.join(".sandbox-probe");
        let _ = std::fs::remove_dir_all(&probe_dir);
        std::fs::create_dir_all(&probe_dir)
            .with_context(|| format!("failed to create {}", probe_dir.display()))
            .map_err(broken)?;
        let ran = bwrap.run_probe(&probe_dir);
        let _ = std::fs::remove_dir_all(&probe_dir);
        ran.map(|()| bwrap)
    }

    /// "bwrap (uid 65534, no network unless allowed)" or "none: <reason>".
    pub fn describe(&self, allow_network: bool) -> String {
        match self {
            Sandbox::Bwrap(b) => {
                let user = match b.user {
                    Some((uid, _)) => format!("uid {uid}"),
                    None => format!("uid {}", nix::unistd::geteuid()),
                };
                let net = if allow_network {
                    "network when the job asks"
                } else {
                    "no network"
                };
                format!("bwrap ({user}, {net})")
            }
            Sandbox::Unsandboxed { reason } => format!("none: {reason}"),
        }
    }

    /// Gives `path` and every directory between `root` and it to the user actions run as.
    pub fn own_path(&self, root: &Path, path: &Path) -> anyhow::Result<()> {
        let Sandbox::Bwrap(b) = self else {
            return Ok(());
        };
        let Ok(rel) = path.strip_prefix(root) else {
            bail!("{} is not inside {}", path.display(), root.display());
        };
        let mut dir = root.to_path_buf();
        for c in rel.components() {
            dir.push(c);
            b.own_dir(&dir)?;
        }
        Ok(())
    }

    /// Makes `dir` (created by the agent) writable by the user actions run as.
    pub fn own_dir(&self, dir: &Path) -> anyhow::Result<()> {
        match self {
            Sandbox::Bwrap(b) => b.own_dir(dir),
            Sandbox::Unsandboxed { .. } => Ok(()),
        }
    }
}

/// The policy applied to what the probe finds (`probe` runs unless the choice is `none`):
/// `none` is no sandbox; a working bubblewrap is used; `auto` goes without one only when
/// bubblewrap is not installed or user namespaces are disabled, and then never for a root
/// agent (its actions would run as root: that takes `none`); every other failure is an error
/// saying what to fix.
pub fn decide(
    choice: SandboxChoice,
    root: bool,
    probe: impl FnOnce() -> Result<Bwrap, ProbeFailure>,
) -> anyhow::Result<Sandbox> {
    if choice == SandboxChoice::None {
        let reason = if root {
            "turned off by policy (sandbox = \"none\"); actions run as root"
        } else {
            "turned off by policy"
        };
        return Ok(Sandbox::Unsandboxed {
            reason: reason.into(),
        });
    }
    let failure = match probe() {
        Ok(b) => return Ok(Sandbox::Bwrap(b)),
        Err(f) => f,
    };
    let (what, fix) = failure.explain();
    let fallback = matches!(
        failure,
        ProbeFailure::NotInstalled | ProbeFailure::NoUserNamespaces(_)
    );
    match choice {
        SandboxChoice::Auto if fallback && !root => Ok(Sandbox::Unsandboxed { reason: what }),
        SandboxChoice::Auto if fallback => bail!(
            "refusing to start: {what}, and this agent runs as root, so every action would run \
             as root on this machine. To fix it, {fix}; {OPT_OUT}, as root"
        ),
        SandboxChoice::Auto => bail!(
            "refusing to start without a sandbox: bubblewrap is installed but does not work \
             here: {what}. To fix it, {fix}; {OPT_OUT}"
        ),
        _ => bail!(
            "sandbox = bwrap, but bubblewrap does not work here: {what}. To fix it, {fix}; \
             {OPT_OUT}"
        ),
    }
}

/// Why the probe failed, given bwrap's exit `status` and `stderr` and the host's sysctls
/// (`sysctl("user.max_user_namespaces")`, ...).
fn classify_failure(
    status: &str,
    stderr: &str,
    sysctl: &dyn Fn(&str) -> Option<String>,
) -> ProbeFailure {
    if let Some(why) = user_namespaces_disabled(sysctl) {
        return ProbeFailure::NoUserNamespaces(why);
    }
    // bubblewrap's own words when the kernel refuses it a user namespace.
    if stderr.contains("No permissions to creat")
        || stderr.contains("Creating new namespace failed")
    {
        return ProbeFailure::NoUserNamespaces(format!(
            "the kernel gives bubblewrap no user namespace: {stderr}"
        ));
    }
    let stderr = if stderr.is_empty() {
        "(nothing on stderr)"
    } else {
        stderr
    };
    ProbeFailure::Broken(anyhow::anyhow!(
        "bwrap failed its probe (a shell writing a file in a work dir; {status}): {stderr}"
    ))
}

/// The sysctl that disables user namespaces for unprivileged users, if one does.
fn user_namespaces_disabled(sysctl: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    [
        ("user.max_user_namespaces", "0"),
        ("kernel.unprivileged_userns_clone", "0"),
        ("kernel.apparmor_restrict_unprivileged_userns", "1"),
    ]
    .into_iter()
    .find(|(name, off)| sysctl(name).is_some_and(|v| v.trim() == *off))
    .map(|(name, off)| {
        format!("user namespaces are disabled for unprivileged users ({name} = {off})")
    })
}

impl Bwrap {
    /// Runs `sh -c "echo ok > probe"` in `dir` the way actions run; the file must appear.
    fn run_probe(&self, dir: &Path) -> Result<(), ProbeFailure> {
        let broken = ProbeFailure::Broken;
        self.own_dir(dir).map_err(broken)?;
        let req = SandboxRequest {
            work_dir: dir,
            cwd: dir,
            network: false,
            tmp_bytes: 1 << 20,
            processes: 64,
        };
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(self.args(&req))
            .args(["/bin/sh", "-c", "echo ok > probe"])
            .env_clear()
            .env("PATH", crate::executor::BASE_PATH)
            .current_dir("/")
            .stdin(Stdio::null());
        let switch = self.user_switch(dir).map_err(broken)?;
        let no_limits = crate::limits::ProcessLimits {
            data_bytes: 0,
            file_bytes: 0,
            cpu_s: 0,
        };
        crate::limits::install_pre_exec(&mut cmd, None, no_limits, switch).map_err(broken)?;
        let out = cmd
            .output()
            .map_err(|e| ProbeFailure::Broken(self.start_error(e)))?;
        let wrote = std::fs::read_to_string(dir.join("probe")).unwrap_or_default();
        if out.status.success() && wrote.trim() == "ok" {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(classify_failure(
            &out.status.to_string(),
            stderr.trim(),
            &|name| {
                std::fs::read_to_string(Path::new("/proc/sys").join(name.replace('.', "/"))).ok()
            },
        ))
    }

    /// What a child must do before exec to run as the sandbox user with `work_dir` in reach;
    /// `None` when the agent is not root (bwrap runs as the agent's user).
    pub fn user_switch(&self, work_dir: &Path) -> anyhow::Result<Option<UserSwitch>> {
        self.user
            .map(|(uid, gid)| UserSwitch::new(uid, gid, self.mask.as_deref(), work_dir))
            .transpose()
    }

    /// The error for bwrap failing to start: as root, the child's mount namespace may be
    /// what failed.
    pub fn start_error(&self, e: std::io::Error) -> anyhow::Error {
        match (self.user, &self.mask) {
            (Some((uid, _)), Some(mask)) => anyhow::anyhow!(
                "failed to start {} as uid {uid} in a mount namespace of its own (with a tmpfs \
                 over {}, which uid {uid} may not search): {e}; the agent needs CAP_SYS_ADMIN \
                 for that, which a container may withhold",
                self.program.display(),
                mask.display()
            ),
            (Some((uid, _)), None) => {
                anyhow::anyhow!(
                    "failed to start {} as uid {uid}: {e}",
                    self.program.display()
                )
            }
            (None, _) => anyhow::anyhow!("failed to start {}: {e}", self.program.display()),
        }
    }

    /// bwrap's arguments up to and including `--`; the program and its arguments follow.
    pub fn args(&self, req: &SandboxRequest<'_>) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |items: &[&std::ffi::OsStr]| a.extend(items.iter().map(|s| s.into()));
        push(&["--ro-bind".as_ref(), "/".as_ref(), "/".as_ref()]);
        push(&["--dev".as_ref(), "/dev".as_ref()]);
        push(&["--proc".as_ref(), "/proc".as_ref()]);
        push(&["--tmpfs".as_ref(), self.hide.as_os_str()]);
        let size = req.tmp_bytes.to_string();
        if req.tmp_bytes > 0 {
            push(&["--size".as_ref(), size.as_ref()]);
        }
        push(&["--tmpfs".as_ref(), "/tmp".as_ref()]);
        push(&[
            "--bind".as_ref(),
            req.work_dir.as_os_str(),
            req.work_dir.as_os_str(),
        ]);
        push(&["--unshare-all".as_ref()]);
        if req.network {
            push(&["--share-net".as_ref()]);
        }
        push(&["--die-with-parent".as_ref()]);
        // Rebuilt from its components: no trailing "/" for the program's `pwd` to show.
        let cwd: PathBuf = req.cwd.components().collect();
        push(&["--chdir".as_ref(), cwd.as_os_str()]);
        push(&["--".as_ref()]);
        if let (Some(prlimit), true) = (&self.prlimit, req.processes > 0) {
            // Inside the sandbox's user namespace the count is of this sandbox's processes
            // alone; set outside, it would count every process of the user.
            let nproc = format!("--nproc={}", req.processes);
            push(&[prlimit.as_os_str(), nproc.as_ref(), "--".as_ref()]);
        }
        a
    }

    fn own_dir(&self, dir: &Path) -> anyhow::Result<()> {
        if let Some((uid, gid)) = self.user {
            nix::unistd::chown(
                dir,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .with_context(|| format!("failed to give {} to uid {uid}", dir.display()))?;
        }
        Ok(())
    }

    /// Gives every directory under `root` to the sandbox user (files stay the agent's: inputs
    /// are hard links into its blob cache, readable but not writable by the action).
    pub fn own_tree(&self, root: &Path) -> anyhow::Result<()> {
        if self.user.is_none() {
            return Ok(());
        }
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            self.own_dir(&dir)?;
            for entry in std::fs::read_dir(&dir)
                .with_context(|| format!("failed to read {}", dir.display()))?
            {
                let entry = entry.with_context(|| format!("failed to read {}", dir.display()))?;
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// `name` on the agent's PATH (or the usual system directories).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(crate::executor::BASE_PATH.split(':'))
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bwrap(user: Option<(u32, u32)>, prlimit: bool) -> Bwrap {
        Bwrap {
            program: "/usr/bin/bwrap".into(),
            hide: "/srv/agent".into(),
            user,
            mask: None,
            prlimit: prlimit.then(|| PathBuf::from("/usr/bin/prlimit")),
        }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn arguments_hide_the_data_dir_and_bind_only_the_work_dir() {
        let req = SandboxRequest {
            work_dir: Path::new("/srv/agent/work/a"),
            cwd: Path::new("/srv/agent/work/a/src/"),
            network: false,
            tmp_bytes: 4096,
            processes: 10,
        };
        let a = joined(&bwrap(None, true).args(&req));
        assert_eq!(
            a,
            "--ro-bind / / --dev /dev --proc /proc --tmpfs /srv/agent --size 4096 --tmpfs /tmp \
             --bind /srv/agent/work/a /srv/agent/work/a --unshare-all --die-with-parent \
             --chdir /srv/agent/work/a/src -- /usr/bin/prlimit --nproc=10 --"
        );
        let net = SandboxRequest {
            network: true,
            processes: 0,
            tmp_bytes: 0,
            ..req
        };
        let a = joined(&bwrap(None, false).args(&net));
        assert!(a.contains("--unshare-all --share-net"), "{a}");
        assert!(!a.contains("--size"), "{a}");
        assert!(a.ends_with("--chdir /srv/agent/work/a/src --"), "{a}");
    }

    #[test]
    fn describes_the_mode() {
        let s = Sandbox::Bwrap(bwrap(Some((65534, 65534)), true));
        assert_eq!(s.describe(false), "bwrap (uid 65534, no network)");
        assert_eq!(
            s.describe(true),
            "bwrap (uid 65534, network when the job asks)"
        );
        let n = Sandbox::Unsandboxed {
            reason: "bwrap (bubblewrap) is not installed".into(),
        };
        assert_eq!(
            n.describe(false),
            "none: bwrap (bubblewrap) is not installed"
        );
    }

    fn no_probe() -> Result<Bwrap, ProbeFailure> {
        panic!("sandbox = none must not probe")
    }

    fn refusal(choice: SandboxChoice, root: bool, failure: ProbeFailure) -> String {
        match decide(choice, root, || Err(failure)) {
            Ok(s) => panic!("{choice:?} (root: {root}) started with {s:?}"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn none_is_only_what_the_policy_says() {
        for (root, reason) in [
            (false, "turned off by policy"),
            (
                true,
                "turned off by policy (sandbox = \"none\"); actions run as root",
            ),
        ] {
            let s = decide(SandboxChoice::None, root, no_probe).expect("none starts");
            assert!(
                matches!(&s, Sandbox::Unsandboxed { reason: r } if r == reason),
                "{s:?}"
            );
        }
        let s = decide(SandboxChoice::Auto, true, || Ok(bwrap(Some((1, 1)), true)));
        assert!(matches!(s, Ok(Sandbox::Bwrap(_))), "{s:?}");
    }

    #[test]
    fn auto_falls_back_only_for_a_missing_bwrap_or_disabled_user_namespaces_and_never_as_root() {
        let userns = || {
            ProbeFailure::NoUserNamespaces(
                "user namespaces are disabled for unprivileged users \
                 (user.max_user_namespaces = 0)"
                    .into(),
            )
        };
        // Not root: no sandbox, with the reason named.
        for (failure, reason) in [
            (
                ProbeFailure::NotInstalled,
                "bubblewrap (bwrap) is not installed",
            ),
            (userns(), "(user.max_user_namespaces = 0)"),
        ] {
            let s = decide(SandboxChoice::Auto, false, || Err(failure)).expect("falls back");
            let Sandbox::Unsandboxed { reason: r } = &s else {
                panic!("{s:?}");
            };
            assert!(r.contains(reason), "{r}");
        }
        // Root: refused, saying why, what to fix and how to opt in.
        for (failure, why, fix) in [
            (
                ProbeFailure::NotInstalled,
                "bubblewrap (bwrap) is not installed",
                "apt install bubblewrap",
            ),
            (
                userns(),
                "user.max_user_namespaces = 0",
                "allow unprivileged user namespaces (user.max_user_namespaces > 0",
            ),
        ] {
            let e = refusal(SandboxChoice::Auto, true, failure);
            for part in [
                why,
                fix,
                "runs as root",
                "every action would run as root",
                "set sandbox = \"none\" in the policy file (or pass --sandbox none)",
            ] {
                assert!(e.contains(part), "{part:?} missing from: {e}");
            }
        }
        // Anything else stops the agent, root or not.
        for root in [false, true] {
            let e = refusal(
                SandboxChoice::Auto,
                root,
                ProbeFailure::Broken(anyhow::anyhow!("bwrap: Can't mount proc")),
            );
            assert!(e.contains("bwrap: Can't mount proc"), "{e}");
            assert!(e.contains("sandbox = \"none\""), "{e}");
        }
        // `bwrap` takes nothing less.
        let e = refusal(SandboxChoice::Bwrap, false, ProbeFailure::NotInstalled);
        assert!(
            e.contains("sandbox = bwrap, but bubblewrap does not work here: bubblewrap (bwrap) is not installed"),
            "{e}"
        );
    }

    #[test]
    fn probe_failures_name_disabled_user_namespaces() {
        let sysctls = |set: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                set.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| format!("{v}\n"))
            }
        };
        let open = sysctls(&[
            ("user.max_user_namespaces", "63000"),
            ("kernel.unprivileged_userns_clone", "1"),
        ]);
        let f = classify_failure(
            "exit status: 1",
            "bwrap: Can't mount proc on /newroot/proc",
            &open,
        );
        assert!(
            matches!(&f, ProbeFailure::Broken(e) if format!("{e:#}").contains("Can't mount proc")),
            "{f:?}"
        );
        let f = classify_failure(
            "exit status: 1",
            "bwrap: No permissions to creating new namespace, likely because the kernel does not \
             allow non-privileged user namespaces.",
            &open,
        );
        assert!(matches!(f, ProbeFailure::NoUserNamespaces(_)), "{f:?}");
        for (set, name) in [
            (
                &[("user.max_user_namespaces", "0")][..],
                "user.max_user_namespaces = 0",
            ),
            (
                &[("kernel.unprivileged_userns_clone", "0")][..],
                "kernel.unprivileged_userns_clone = 0",
            ),
            (
                &[("kernel.apparmor_restrict_unprivileged_userns", "1")][..],
                "kernel.apparmor_restrict_unprivileged_userns = 1",
            ),
        ] {
            let f = classify_failure(
                "exit status: 1",
                "bwrap: setting up uid map: Permission denied",
                &sysctls(set),
            );
            assert!(
                matches!(&f, ProbeFailure::NoUserNamespaces(why) if why.contains(name)),
                "{name}: {f:?}"
            );
        }
    }

    /// The lab operator's case: a root agent whose data dir lies under a directory only root
    /// may enter (`mktemp -d`, /root). The probe passes, actions run as the sandbox user in
    /// their work dir, and what they write to /tmp stays in the sandbox.
    #[test]
    fn a_root_agent_sandboxes_actions_under_a_closed_directory() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "SKIPPED a_root_agent_sandboxes_actions_under_a_closed_directory: it needs root \
                 (CI runs as root)"
            );
            return;
        }
        let closed = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(closed.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let data_dir = closed.path().join("agent");
        let work_root = data_dir.join("work");
        std::fs::create_dir_all(&work_root).expect("mkdir");
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        std::fs::create_dir(data_dir.join("credentials")).expect("mkdir");
        std::fs::write(data_dir.join("credentials/key.pem"), "secret").expect("write");

        let s = Sandbox::detect(SandboxChoice::Auto, &data_dir, &work_root, 65534)
            .expect("the sandbox works under a closed directory");
        let Sandbox::Bwrap(b) = &s else {
            panic!("not sandboxed: {s:?}");
        };
        assert_eq!(b.mask.as_deref(), Some(closed.path()));
        assert!(
            s.describe(false).starts_with("bwrap (uid 65534"),
            "{}",
            s.describe(false)
        );

        let work_dir = work_root.join("action-1");
        std::fs::create_dir(&work_dir).expect("mkdir");
        s.own_dir(&work_dir).expect("chown");
        let escape = format!("/tmp/archfarm-unit-escape-{}", std::process::id());
        let script = format!(
            "id -u > uid; pwd > pwd; echo x > {escape}; cat {} > leaked 2>&1; \
             ls {} > listed 2>&1; exit 0",
            data_dir.join("credentials/key.pem").display(),
            data_dir.display(),
        );
        let mut cmd = std::process::Command::new(&b.program);
        cmd.args(b.args(&SandboxRequest {
            work_dir: &work_dir,
            cwd: &work_dir,
            network: false,
            tmp_bytes: 0,
            processes: 0,
        }))
        .args(["/bin/sh", "-c", &script])
        .current_dir("/");
        let none = crate::limits::ProcessLimits {
            data_bytes: 0,
            file_bytes: 0,
            cpu_s: 0,
        };
        let switch = b.user_switch(&work_dir).expect("switch");
        assert!(switch.is_some(), "root runs actions as another user");
        crate::limits::install_pre_exec(&mut cmd, None, none, switch).expect("hook");
        let out = cmd.output().expect("run bwrap");
        assert!(out.status.success(), "{out:?}");
        let read = |name: &str| std::fs::read_to_string(work_dir.join(name)).unwrap_or_default();
        assert_eq!(read("uid").trim(), "65534");
        assert_eq!(read("pwd").trim(), work_dir.to_string_lossy());
        assert!(!read("leaked").contains("secret"), "{}", read("leaked"));
        assert_eq!(
            read("listed").trim(),
            "work",
            "only the work root's way down is there"
        );
        assert!(
            !Path::new(&escape).exists(),
            "the action wrote {escape} on the host"
        );
        // Nothing of the action's mount namespace is left on the host.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        assert!(
            !mounts.contains(&*closed.path().to_string_lossy()),
            "{mounts}"
        );
        // Nor was anything opened up: the data dir and its parent stay closed.
        for dir in [closed.path(), data_dir.as_path()] {
            let mode = std::fs::metadata(dir).expect("stat").permissions().mode();
            assert_eq!(mode & 0o077, 0, "{} is {mode:o}", dir.display());
        }
    }
}
