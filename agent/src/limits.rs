//! How per-action limits are enforced: a cgroup per action (v2, or v1's memory and pids
//! controllers) where the agent may create them, rlimits otherwise; plus the rlimits every
//! process gets (file size, CPU time, no core dumps) and a lower CPU priority, so a busy
//! action never starves the agent's own heartbeat.
use crate::policy::Limits;
use crate::sandbox::UserSwitch;
use anyhow::{bail, Context};
use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Niceness of every action process: the agent (nice 0) always gets the CPU first.
pub const ACTION_NICENESS: i32 = 10;

/// The mechanism that holds an action's processes to its memory and process limits.
#[derive(Clone, Debug)]
pub enum Enforcer {
    /// A cgroup v2 per action under `actions`.
    CgroupV2 { actions: PathBuf },
    /// A cgroup per action in v1's memory and pids hierarchies.
    CgroupV1 { memory: PathBuf, pids: PathBuf },
    /// rlimits per process (memory as RLIMIT_DATA, processes by prlimit inside the sandbox);
    /// why no cgroup could be used.
    Rlimits { why: String },
}

/// One action's cgroup(s); removed (after killing what is left) when dropped.
pub struct ActionCgroup {
    v2: bool,
    memory_dir: PathBuf,
    pids_dir: PathBuf,
    /// Open `cgroup.procs` files: the child writes "0" to each before it execs.
    procs: Vec<File>,
}

impl Enforcer {
    /// Picks cgroup v2, then v1, then rlimits; `tag` names this agent's parent cgroup
    /// (unique per agent process).
    pub fn detect(tag: &str) -> Self {
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v2_error = match setup_v2(&cgroups, tag) {
            Ok(e) => return e,
            Err(e) => format!("{e:#}"),
        };
        let v1_error = match setup_v1(&cgroups, tag) {
            Ok(e) => return e,
            Err(e) => format!("{e:#}"),
        };
        tracing::info!("limits by rlimits: cgroup v2: {v2_error}; cgroup v1: {v1_error}");
        Enforcer::Rlimits {
            why: format!("cgroup v2: {v2_error}; cgroup v1: {v1_error}"),
        }
    }

    /// Short name for status: "cgroup v2", "cgroup v1" or "rlimits".
    pub fn name(&self) -> &'static str {
        match self {
            Enforcer::CgroupV2 { .. } => "cgroup v2",
            Enforcer::CgroupV1 { .. } => "cgroup v1",
            Enforcer::Rlimits { .. } => "rlimits",
        }
    }

    /// Creates the cgroup(s) of one process tree, with its limits set; `None` under rlimits.
    pub fn begin(&self, name: &str, limits: &Limits) -> anyhow::Result<Option<ActionCgroup>> {
        let memory = match limits.memory_bytes {
            0 => None,
            m => Some(m),
        };
        let pids = match limits.processes {
            0 => None,
            p => Some(p),
        };
        let cg = match self {
            Enforcer::Rlimits { .. } => return Ok(None),
            Enforcer::CgroupV2 { actions } => {
                let dir = actions.join(name);
                make_cgroup(&dir)?;
                let cg = ActionCgroup {
                    v2: true,
                    memory_dir: dir.clone(),
                    pids_dir: dir.clone(),
                    procs: Vec::new(),
                };
                write_value(
                    &dir.join("memory.max"),
                    &memory.map_or("max".into(), |m| m.to_string()),
                )?;
                // Swap would let the tree go past the limit at the disk's pace.
                let _ = write_value(&dir.join("memory.swap.max"), "0");
                write_value(
                    &dir.join("pids.max"),
                    &pids.map_or("max".into(), |p| p.to_string()),
                )?;
                cg
            }
            Enforcer::CgroupV1 {
                memory: mem_root,
                pids: pids_root,
            } => {
                let memory_dir = mem_root.join(name);
                let pids_dir = pids_root.join(name);
                make_cgroup(&memory_dir)?;
                let cg = ActionCgroup {
                    v2: false,
                    memory_dir: memory_dir.clone(),
                    pids_dir: pids_dir.clone(),
                    procs: Vec::new(),
                };
                make_cgroup(&pids_dir)?;
                let m = memory.map_or("-1".into(), |m| m.to_string());
                write_value(&memory_dir.join("memory.limit_in_bytes"), &m)?;
                let _ = write_value(&memory_dir.join("memory.memsw.limit_in_bytes"), &m);
                write_value(
                    &pids_dir.join("pids.max"),
                    &pids.map_or("max".into(), |p| p.to_string()),
                )?;
                cg
            }
        };
        let mut cg = cg;
        let mut dirs = vec![cg.memory_dir.clone()];
        if cg.pids_dir != cg.memory_dir {
            dirs.push(cg.pids_dir.clone());
        }
        for d in dirs {
            let procs = d.join("cgroup.procs");
            cg.procs.push(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .with_context(|| format!("failed to open {}", procs.display()))?,
            );
        }
        Ok(Some(cg))
    }
}

impl ActionCgroup {
    /// Every process in the cgroup, wherever its process group or session went.
    pub fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.memory_dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process in the cgroup.
    pub fn kill_all(&self) {
        if self.v2 && write_value(&self.memory_dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for _ in 0..3 {
            let members = self.members();
            if members.is_empty() {
                return;
            }
            for pid in members {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// The limit the tree ran into, if the kernel says it did: the OOM killer ended a process,
    /// or a fork was refused at the process limit.
    pub fn breach(&self, limits: &Limits) -> Option<String> {
        let oom_file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        if event_count(&self.memory_dir.join(oom_file), "oom_kill") > 0 {
            return Some(format!(
                "memory limit of {} exceeded: the kernel killed a process of the action",
                bytes(limits.memory_bytes)
            ));
        }
        if event_count(&self.pids_dir.join("pids.events"), "max") > 0 {
            return Some(format!(
                "process limit of {} reached: the action tried to start more processes",
                limits.processes
            ));
        }
        None
    }

    /// The tree's peak memory as the kernel counted it.
    pub fn peak_memory(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.memory_dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for ActionCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        let mut dirs = vec![self.memory_dir.clone()];
        if self.pids_dir != self.memory_dir {
            dirs.push(self.pids_dir.clone());
        }
        for attempt in 0..50 {
            self.kill_all();
            dirs.retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
            if dirs.is_empty() {
                return;
            }
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for d in dirs {
            tracing::warn!("failed to remove cgroup {}", d.display());
        }
    }
}

/// The rlimits and niceness every action process gets, set in the child before exec.
#[derive(Clone, Copy, Debug)]
pub struct ProcessLimits {
    /// RLIMIT_DATA (0: unchanged); used when no cgroup holds memory.
    pub data_bytes: u64,
    /// RLIMIT_FSIZE (0: unchanged).
    pub file_bytes: u64,
    /// RLIMIT_CPU (0: unchanged).
    pub cpu_s: u64,
}

impl ProcessLimits {
    /// Applies them to the calling process (called between fork and exec: only setrlimit).
    fn apply(&self) -> std::io::Result<()> {
        use nix::sys::resource::{setrlimit, Resource};
        let set =
            |r: Resource, v: u64| setrlimit(r, rlim(v), rlim(v)).map_err(std::io::Error::from);
        set(Resource::RLIMIT_CORE, 0)?;
        if self.data_bytes > 0 {
            set(Resource::RLIMIT_DATA, self.data_bytes)?;
        }
        if self.file_bytes > 0 {
            set(Resource::RLIMIT_FSIZE, self.file_bytes)?;
        }
        if self.cpu_s > 0 {
            // The soft limit sends SIGXCPU; the hard one, a second later, SIGKILL.
            setrlimit(
                Resource::RLIMIT_CPU,
                rlim(self.cpu_s),
                rlim(self.cpu_s.saturating_add(1)),
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(())
    }
}

/// A limit as this platform's `rlim_t`, which is 32 bits on 32-bit glibc (linux/arm/v7): a
/// limit past its range is no limit there, which a 32-bit process cannot reach anyway.
#[allow(clippy::unnecessary_fallible_conversions, clippy::useless_conversion)]
fn rlim(v: u64) -> libc::rlim_t {
    libc::rlim_t::try_from(v).unwrap_or(libc::RLIM_INFINITY)
}

/// Makes the child, between fork and exec, join the cgroups of `cgroup` (by writing "0" to
/// each `cgroup.procs`), take `limits`, lower its CPU priority to `ACTION_NICENESS`, and last
/// (a root agent's sandboxed process) become the sandbox user through `switch`.
pub fn install_pre_exec(
    cmd: &mut std::process::Command,
    cgroup: Option<&ActionCgroup>,
    limits: ProcessLimits,
    switch: Option<UserSwitch>,
) -> anyhow::Result<()> {
    let procs = match cgroup {
        Some(cg) => cg
            .procs
            .iter()
            .map(File::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .context("failed to duplicate a cgroup.procs handle")?,
        None => Vec::new(),
    };
    let hook = move || -> std::io::Result<()> {
        for mut f in &procs {
            f.write_all(b"0")?;
        }
        limits.apply()?;
        lower_priority(ACTION_NICENESS);
        if let Some(s) = &switch {
            s.enter()?;
        }
        Ok(())
    };
    #[allow(unsafe_code)]
    // SAFETY: the hook runs in the forked child before exec. It allocates nothing and calls
    // only write(2) on files opened before the fork, setrlimit(2), setpriority(2), and
    // (`UserSwitch::enter`) unshare(2), mount(2), open(2), mkdir(2), close(2), setgroups(2),
    // setgid(2) and setuid(2) on paths built before the fork, all async-signal-safe; it
    // touches no lock the parent might hold.
    unsafe {
        cmd.pre_exec(hook);
    }
    Ok(())
}

/// setpriority(2) for the calling process; a failure leaves the priority as it was.
fn lower_priority(niceness: i32) {
    #[allow(unsafe_code)]
    // SAFETY: setpriority takes plain integers and only changes this process's priority.
    unsafe {
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, 0, niceness);
    }
}

/// "12 GiB", "300 MiB", "512 KiB" or "100 bytes".
pub fn bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{v:.1} {unit}")
            };
        }
    }
    format!("{n} bytes")
}

fn setup_v2(cgroups: &str, tag: &str) -> anyhow::Result<Enforcer> {
    let rel = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("this process is in no cgroup v2")?;
    let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .iter()
        .map(PathBuf::from)
        .find(|r| r.join("cgroup.controllers").exists())
        .context("no cgroup2 file system is mounted")?;
    let own = root.join(rel.trim_start_matches('/'));
    let controllers = std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
    for c in ["memory", "pids"] {
        if !controllers.split_whitespace().any(|x| x == c) {
            bail!("the {c} controller is not available in {}", own.display());
        }
    }
    // A cgroup with processes cannot hand controllers to children: the agent moves itself
    // into a leaf first, then its actions get their own subtree.
    let leaf = own.join(format!("{tag}-agent"));
    make_cgroup(&leaf)?;
    write_value(&leaf.join("cgroup.procs"), "0")?;
    write_value(&own.join("cgroup.subtree_control"), "+memory +pids")?;
    let actions = own.join(format!("{tag}-actions"));
    make_cgroup(&actions)?;
    write_value(&actions.join("cgroup.subtree_control"), "+memory +pids")?;
    probe(&Enforcer::CgroupV2 { actions })
}

fn setup_v1(cgroups: &str, tag: &str) -> anyhow::Result<Enforcer> {
    let path_of = |controller: &str| -> anyhow::Result<PathBuf> {
        let rel = cgroups
            .lines()
            .find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let _id = parts.next()?;
                let names = parts.next()?;
                let path = parts.next()?;
                names.split(',').any(|n| n == controller).then_some(path)
            })
            .with_context(|| format!("no v1 {controller} controller"))?;
        let mount = Path::new("/sys/fs/cgroup").join(controller);
        if !mount.join("cgroup.procs").exists() {
            bail!("v1 {controller} is not mounted at {}", mount.display());
        }
        Ok(mount.join(rel.trim_start_matches('/')))
    };
    let memory = path_of("memory")?;
    let pids = path_of("pids")?;
    let mut dirs = Vec::new();
    for parent in [&memory, &pids] {
        remove_stale(parent);
        let dir = parent.join(tag);
        make_cgroup(&dir)?;
        dirs.push(dir);
    }
    probe(&Enforcer::CgroupV1 {
        memory: dirs[0].clone(),
        pids: dirs[1].clone(),
    })
}

/// Creates and removes one action cgroup, proving the files can be written.
fn probe(enforcer: &Enforcer) -> anyhow::Result<Enforcer> {
    let limits = Limits {
        memory_bytes: 1 << 30,
        processes: 100,
        cpu_time_s: 0,
        output_bytes: 0,
        disk_bytes: 0,
    };
    drop(enforcer.begin("probe", &limits)?);
    Ok(enforcer.clone())
}

/// Removes the cgroups of agents that are gone (`archfarm-<pid>` whose pid is not running).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("archfarm-")
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(children) = std::fs::read_dir(e.path()) {
            for c in children.flatten().filter(|c| c.path().is_dir()) {
                let _ = std::fs::remove_dir(c.path());
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

fn make_cgroup(dir: &Path) -> anyhow::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("failed to create cgroup {}", dir.display())),
    }
}

fn write_value(file: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .with_context(|| format!("failed to write {value:?} to {}", file.display()))
}

/// The number after `key` in a "key value" lines file (0 if absent).
fn event_count(file: &Path, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(key))
                .then(|| parts.next()?.parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_past_rlim_t_is_no_limit_and_others_pass_unchanged() {
        assert_eq!(rlim(0), 0);
        assert_eq!(rlim(1 << 20), 1 << 20);
        assert_eq!(rlim(u64::MAX), libc::RLIM_INFINITY);
    }

    #[test]
    fn bytes_read_naturally() {
        assert_eq!(bytes(12 << 30), "12 GiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
        assert_eq!(bytes(1536 << 10), "1.5 MiB");
        assert_eq!(bytes(100), "100 bytes");
    }

    #[test]
    fn event_counts_are_read_by_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("memory.oom_control");
        std::fs::write(&f, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").expect("write");
        assert_eq!(event_count(&f, "oom_kill"), 2);
        assert_eq!(event_count(&f, "under_oom"), 0);
        assert_eq!(event_count(&dir.path().join("missing"), "max"), 0);
    }

    /// On a host where the agent may create cgroups (root here), a tree that forks past its
    /// process limit is refused by the kernel and the breach is named.
    #[test]
    fn a_cgroup_names_a_process_limit_breach() {
        let tag = format!("archfarm-{}", std::process::id());
        let enforcer = Enforcer::detect(&tag);
        let (Enforcer::CgroupV1 { .. } | Enforcer::CgroupV2 { .. }) = enforcer else {
            eprintln!("no writable cgroup here ({enforcer:?}); rlimits are tested elsewhere");
            return;
        };
        let limits = Limits {
            memory_bytes: 256 << 20,
            processes: 5,
            cpu_time_s: 0,
            output_bytes: 0,
            disk_bytes: 0,
        };
        let cg = enforcer
            .begin("fork-test", &limits)
            .expect("begin")
            .expect("a cgroup");
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args([
            "-c",
            "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done; wait",
        ]);
        let none = ProcessLimits {
            data_bytes: 0,
            file_bytes: 0,
            cpu_s: 0,
        };
        install_pre_exec(&mut cmd, Some(&cg), none, None).expect("hook");
        let mut cmd = tokio::process::Command::from(cmd);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut child = cmd.spawn().expect("spawn");
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(!cg.members().is_empty(), "the shell is in the cgroup");
            cg.kill_all();
            let _ = child.wait().await;
        });
        let breach = cg.breach(&limits).expect("a breach");
        assert!(breach.contains("process limit of 5"), "{breach}");
        drop(cg);
    }
}
