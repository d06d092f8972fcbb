//! Isolation of actions with bubblewrap: a read-only system, the work dir as the only
//! writable place, a private /tmp, its own pid namespace, no network unless allowed, the
//! agent's data dir hidden. Checked once at start (bubblewrap present and working, e.g. user
//! namespaces allowed); the mode is reported to the coordinator and shown in status.
use crate::policy::SandboxChoice;
use anyhow::{bail, Context};
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

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

impl Sandbox {
    /// Finds out what works here: `choice` none gives no sandbox; auto falls back to none
    /// (with the reason) when bubblewrap is missing or fails its probe; bwrap makes that an
    /// error.
    pub fn detect(
        choice: SandboxChoice,
        data_dir: &Path,
        work_root: &Path,
        sandbox_uid: u32,
    ) -> anyhow::Result<Self> {
        if choice == SandboxChoice::None {
            return Ok(Self::Unsandboxed {
                reason: "turned off by policy".into(),
            });
        }
        match Self::probe(data_dir, work_root, sandbox_uid) {
            Ok(b) => Ok(Self::Bwrap(b)),
            Err(e) if choice == SandboxChoice::Auto => {
                let reason = format!("{e:#}");
                tracing::warn!("running actions without a sandbox: {reason}");
                Ok(Self::Unsandboxed { reason })
            }
            Err(e) => Err(e.context("sandbox = bwrap, but bubblewrap does not work here")),
        }
    }

    fn probe(data_dir: &Path, work_root: &Path, sandbox_uid: u32) -> anyhow::Result<Bwrap> {
        let program = find_program("bwrap").context("bwrap (bubblewrap) is not installed")?;
        let user = nix::unistd::geteuid().is_root().then(|| {
            let gid = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(sandbox_uid))
                .ok()
                .flatten()
                .map_or(sandbox_uid, |g| g.gid.as_raw());
            (sandbox_uid, gid)
        });
        if user.is_some() {
            // The sandbox user must reach its work dir; credentials/ stays 0700.
            for dir in [data_dir, work_root] {
                let mode = std::fs::metadata(dir)
                    .with_context(|| format!("failed to read {}", dir.display()))?
                    .permissions()
                    .mode();
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o711))
                    .with_context(|| format!("failed to make {} traversable", dir.display()))?;
            }
        }
        let bwrap = Bwrap {
            program,
            hide: data_dir.to_path_buf(),
            user,
            prlimit: find_program("prlimit"),
        };
        let probe_dir = work_root.join(".sandbox-probe");
        let _ = std::fs::remove_dir_all(&probe_dir);
        std::fs::create_dir_all(&probe_dir)
            .with_context(|| format!("failed to create {}", probe_dir.display()))?;
        bwrap.own_dir(&probe_dir)?;
        let req = SandboxRequest {
            work_dir: &probe_dir,
            cwd: &probe_dir,
            network: false,
            tmp_bytes: 1 << 20,
            processes: 64,
        };
        let mut cmd = std::process::Command::new(&bwrap.program);
        cmd.args(bwrap.args(&req))
            .args(["/bin/sh", "-c", "echo ok > probe"])
            .env_clear()
            .env("PATH", crate::executor::BASE_PATH)
            .stdin(Stdio::null());
        if let Some((uid, gid)) = bwrap.user {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().context("failed to run bwrap")?;
        let wrote = std::fs::read_to_string(probe_dir.join("probe")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&probe_dir);
        if !out.status.success() || wrote.trim() != "ok" {
            bail!(
                "bwrap failed its probe ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(bwrap)
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

impl Bwrap {
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
}
