//! Facts about this machine (platform, cores, memory, kernel, disk, load): the only sysinfo user.
use archfarm_proto::Platform;
use std::path::Path;
use sysinfo::{MemoryRefreshKind, RefreshKind, System};

/// What the agent tells the coordinator about its host.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// The host's own platform; `None` when its architecture has no farm name.
    pub platform: Option<Platform>,
    /// Logical CPUs.
    pub cores: u32,
    /// Total memory in bytes.
    pub memory_bytes: u64,
    /// Kernel name and release, e.g. "Linux 6.1.0".
    pub kernel: String,
    /// Host name.
    pub hostname: String,
}

impl HostFacts {
    /// Reads the facts from the running system.
    pub fn detect() -> Self {
        let sys = System::new_with_specifics(
            RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            platform: native_platform(),
            cores: logical_cores(),
            memory_bytes: sys.total_memory(),
            kernel: format!(
                "Linux {}",
                System::kernel_version().unwrap_or_else(|| "unknown".into())
            ),
            hostname: hostname(),
        }
    }
}

/// Total memory in bytes.
pub fn total_memory_bytes() -> u64 {
    System::new_with_specifics(
        RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()),
    )
    .total_memory()
}

/// `uname -m` of this host.
pub fn machine() -> String {
    System::cpu_arch()
}

/// The host's platform in farm spelling, when it has one.
pub fn native_platform() -> Option<Platform> {
    Platform::from_uname_machine(&machine()).or_else(|| {
        // uname failed or said something odd: fall back to what this binary was built for.
        let arch = match std::env::consts::ARCH {
            "x86_64" => "x86_64",
            "aarch64" => "aarch64",
            "powerpc64" => "ppc64le",
            "s390x" => "s390x",
            "riscv64" => "riscv64",
            // uname says `mips64` for both byte orders; this build knows its own.
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            "arm" => "armv7l",
            "x86" => "i686",
            other => other,
        };
        Platform::from_uname_machine(arch)
    })
}

/// Logical CPUs usable by this process (at least 1).
pub fn logical_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// The host name, or "unknown".
pub fn hostname() -> String {
    System::host_name()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Free bytes available to unprivileged users on the file system holding `path` (0 if unknown).
pub fn free_disk_bytes(path: &Path) -> u64 {
    // The field types differ between 64- and 32-bit platforms (arm/v7), hence the casts.
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => (s.blocks_available() as u64).saturating_mul(s.fragment_size() as u64),
        Err(e) => {
            tracing::debug!("failed to statvfs {}: {e}", path.display());
            0
        }
    }
}

/// One-minute load average.
pub fn load_1m() -> f64 {
    System::load_average().one
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_something_sensible() {
        let h = HostFacts::detect();
        assert!(h.cores >= 1);
        assert!(h.memory_bytes > 0);
        assert!(h.kernel.starts_with("Linux "), "{}", h.kernel);
        assert!(!h.hostname.is_empty());
        assert!(free_disk_bytes(Path::new("/")) > 0);
        assert!(load_1m() >= 0.0);
    }
}
