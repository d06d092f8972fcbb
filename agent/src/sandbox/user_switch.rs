//! What a root agent's child does between fork and exec to become the sandbox user: give
//! itself a mount namespace in which the action's work dir is reachable by that user whatever
//! the data dir's parents are (a tmpfs over the first directory the user cannot search, the
//! work dir bound back at its own path), then drop to the user's uid and gid. Everything is
//! prepared before the fork; the child only makes system calls.
use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::MsFlags;
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The sandbox user and, when it cannot reach the work dir on the host, the view that lets it.
#[derive(Debug)]
pub struct UserSwitch {
    uid: Uid,
    gid: Gid,
    view: Option<WorkDirView>,
}

/// A tmpfs over `mask` holding `dirs` down to the work dir, and the work dir bound there.
#[derive(Debug)]
struct WorkDirView {
    mask: CString,
    /// Each directory from below `mask` down to the work dir itself, outermost first.
    dirs: Vec<CString>,
    work_dir: CString,
}

impl UserSwitch {
    /// The switch to `uid`/`gid` for a process whose work dir is `work_dir`; `mask` is the
    /// first directory on the way to it that the user cannot search (see `first_unsearchable`).
    pub fn new(uid: u32, gid: u32, mask: Option<&Path>, work_dir: &Path) -> anyhow::Result<Self> {
        let view = match mask {
            None => None,
            Some(mask) => {
                let Ok(rel) = work_dir.strip_prefix(mask) else {
                    bail!("{} is not inside {}", work_dir.display(), mask.display());
                };
                let mut dir = mask.to_path_buf();
                let mut dirs = Vec::new();
                for c in rel.components() {
                    dir.push(c);
                    dirs.push(c_path(&dir)?);
                }
                Some(WorkDirView {
                    mask: c_path(mask)?,
                    dirs,
                    work_dir: c_path(work_dir)?,
                })
            }
        };
        Ok(Self {
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            view,
        })
    }

    /// Runs in the forked child, as root, just before exec: sets up the view, then becomes the
    /// sandbox user. Async-signal-safe: no allocation, no locks, only system calls on memory
    /// prepared before the fork.
    pub fn enter(&self) -> std::io::Result<()> {
        if let Some(view) = &self.view {
            view.mount()?;
        }
        nix::unistd::setgroups(&[])?;
        nix::unistd::setgid(self.gid)?;
        nix::unistd::setuid(self.uid)?;
        Ok(())
    }
}

impl WorkDirView {
    fn mount(&self) -> std::io::Result<()> {
        use nix::mount::mount;
        const NONE: Option<&CStr> = None;
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
        // Nothing done here may reach the host's mount table.
        mount(
            NONE,
            c"/",
            NONE,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            NONE,
        )?;
        // Opened in the new namespace (a bind mount's source must be in the caller's) and
        // before the tmpfs hides it.
        let fd = nix::fcntl::open(
            self.work_dir.as_c_str(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        mount(
            Some(c"tmpfs"),
            self.mask.as_c_str(),
            Some(c"tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(c"mode=0755,size=1m"),
        )?;
        for dir in &self.dirs {
            match nix::unistd::mkdir(dir.as_c_str(), Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut buf = [0u8; 32];
        let source = proc_fd_path(fd, &mut buf);
        mount(
            Some(source),
            self.work_dir.as_c_str(),
            NONE,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            NONE,
        )?;
        nix::unistd::close(fd)?;
        Ok(())
    }
}

/// `/proc/self/fd/<fd>` written into `buf` without allocating.
fn proc_fd_path(fd: i32, buf: &mut [u8; 32]) -> &CStr {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[PREFIX.len() + i] = digits[len - 1 - i];
    }
    buf[PREFIX.len() + len] = 0;
    CStr::from_bytes_until_nul(&buf[..]).unwrap_or(c"/proc/self/fd/")
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", path.display()))
}

/// The outermost directory on the way from `/` to `path` (itself included) that `uid`/`gid`
/// (without supplementary groups) may not search, judged by its mode bits; `None` when the
/// user can walk all the way.
pub fn first_unsearchable(path: &Path, uid: u32, gid: u32) -> anyhow::Result<Option<PathBuf>> {
    let mut chain: Vec<&Path> = path.ancestors().collect();
    chain.reverse();
    for dir in chain {
        let meta =
            std::fs::metadata(dir).with_context(|| format!("failed to read {}", dir.display()))?;
        let bit = if meta.uid() == uid {
            0o100
        } else if meta.gid() == gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & bit == 0 {
            if dir.parent().is_none() {
                bail!("uid {uid} may not search {}", dir.display());
            }
            return Ok(Some(dir.to_path_buf()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn proc_fd_paths_are_written_in_place() {
        let mut buf = [0u8; 32];
        assert_eq!(proc_fd_path(3, &mut buf), c"/proc/self/fd/3");
        assert_eq!(proc_fd_path(0, &mut buf), c"/proc/self/fd/0");
        assert_eq!(
            proc_fd_path(i32::MAX, &mut buf),
            c"/proc/self/fd/2147483647"
        );
    }

    #[test]
    fn the_view_covers_the_first_closed_directory_and_recreates_the_way_down() {
        let s = UserSwitch::new(
            65534,
            65534,
            Some(Path::new("/root/x")),
            Path::new("/root/x/data/work/a-1"),
        )
        .expect("switch");
        let v = s.view.expect("a view");
        assert_eq!(v.mask.as_c_str(), c"/root/x");
        let dirs: Vec<&CStr> = v.dirs.iter().map(CString::as_c_str).collect();
        assert_eq!(
            dirs,
            [
                c"/root/x/data",
                c"/root/x/data/work",
                c"/root/x/data/work/a-1"
            ]
        );
        assert_eq!(v.work_dir.as_c_str(), c"/root/x/data/work/a-1");
        let e = UserSwitch::new(1, 1, Some(Path::new("/srv")), Path::new("/root/w"))
            .expect_err("outside the mask");
        assert!(format!("{e:#}").contains("not inside /srv"), "{e:#}");
        assert!(UserSwitch::new(1, 1, None, Path::new("/w"))
            .expect("switch")
            .view
            .is_none());
    }

    #[test]
    fn finds_the_first_directory_a_user_cannot_search() {
        let top = tempfile::tempdir().expect("tempdir");
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
        };
        let (a, b, c) = (
            top.path().join("a"),
            top.path().join("a/b"),
            top.path().join("a/b/c"),
        );
        std::fs::create_dir_all(&c).expect("mkdir");
        // A uid and gid that own nothing here (not the test's, not nobody's).
        let (uid, gid) = (54321, 54321);
        mode(top.path(), 0o700);
        assert_eq!(
            first_unsearchable(&c, uid, gid).expect("stat"),
            Some(top.path().to_path_buf())
        );
        mode(top.path(), 0o711);
        mode(&b, 0o750);
        assert_eq!(
            first_unsearchable(&c, uid, gid).expect("stat"),
            Some(b.clone())
        );
        mode(&b, 0o755);
        mode(&a, 0o755);
        assert_eq!(first_unsearchable(&c, uid, gid).expect("stat"), None);
        // For the owner its own bits count, then the group's, then everyone else's.
        let meta = std::fs::metadata(&b).expect("stat");
        mode(&b, 0o611);
        assert_eq!(
            first_unsearchable(&c, meta.uid(), 54321).expect("stat"),
            Some(b.clone())
        );
        mode(&b, 0o701);
        assert_eq!(
            first_unsearchable(&c, 54321, meta.gid()).expect("stat"),
            Some(b.clone())
        );
        mode(&b, 0o710);
        assert_eq!(
            first_unsearchable(&c, 54321, meta.gid()).expect("stat"),
            None
        );
    }
}
