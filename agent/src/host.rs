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
    // uname failed or said something odd: fall back to what this binary was built for.
    Platform::from_uname_machine(&machine())
        .or_else(|| build_platform(std::env::consts::ARCH, cfg!(target_endian = "big")))
}

/// The platform of a binary built for Rust's `target_arch` `arch` with this byte order.
fn build_platform(arch: &str, big_endian: bool) -> Option<Platform> {
    let machine = match arch {
        "x86_64" => "x86_64",
        "aarch64" => "aarch64",
        // powerpc64 is both ppc64le and big-endian ppc64 (no farm platform).
        "powerpc64" if !big_endian => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        // mips64 is both mips64el and big-endian mips64: the byte order decides, as it does
        // for uname's `mips64`.
        "mips64" => "mips64",
        // Rust's `arm` is every 32-bit arm build (v6 and v7); stable Rust cannot tell them
        // apart, and v7 is what the farm's 32-bit arm machines run.
        "arm" => "armv7l",
        "x86" => "i686",
        _ => return None,
    };
    Platform::from_uname_machine_with_byte_order(machine, big_endian)
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

    #[test]
    fn falls_back_to_the_platform_the_binary_was_built_for() {
        let built =
            |arch: &str, big_endian: bool| build_platform(arch, big_endian).map(|p| p.to_string());
        for (arch, platform) in [
            ("x86_64", "linux/amd64"),
            ("aarch64", "linux/arm64"),
            ("powerpc64", "linux/ppc64le"),
            ("riscv64", "linux/riscv64"),
            ("mips64", "linux/mips64le"),
            ("arm", "linux/arm/v7"),
            ("x86", "linux/386"),
        ] {
            assert_eq!(built(arch, false).as_deref(), Some(platform), "{arch}");
        }
        assert_eq!(built("s390x", true).as_deref(), Some("linux/s390x"));
        assert_eq!(built("mips64", true), None, "big-endian mips64");
        assert_eq!(built("powerpc64", true), None, "big-endian ppc64");
        assert_eq!(built("loongarch64", false), None);
    }
}
