//! What `cargo xtask dist` builds: the binaries (one list, so adding one is one line), the
//! platforms with their Rust target, Debian cross toolchain and ELF identity, and where the
//! cross-built binaries land, so the end-to-end tests find the same files.
use crate::paths;
use std::path::{Path, PathBuf};

/// A binary shipped in every archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistBinary {
    /// The cargo package that builds it.
    pub package: &'static str,
    /// The binary's name.
    pub name: &'static str,
}

/// Every binary of a release, in archive order.
pub const DIST_BINARIES: &[DistBinary] = &[
    DistBinary {
        package: "archfarm-agent",
        name: "archfarm-agent",
    },
    DistBinary {
        package: "archfarm-coordinator",
        name: "archfarm-coordinator",
    },
    DistBinary {
        package: "archfarm-client",
        name: "archfarm",
    },
];

/// The agent: what `dist --verify` and the end-to-end tests run on every platform.
pub const AGENT: DistBinary = DIST_BINARIES[0];
/// The client: `dist --verify` drives the farm with the amd64 one.
pub const CLIENT: DistBinary = DIST_BINARIES[2];

/// A platform `dist` builds for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DistTarget {
    /// The farm platform, e.g. `linux/arm/v7`.
    pub platform: &'static str,
    /// The Rust target triple.
    pub triple: &'static str,
    /// Debian's cross toolchain prefix (`<prefix>-gcc`, `/usr/<prefix>` holds its libc).
    pub gnu: &'static str,
    /// Debian's architecture name (`libc6-dev-<arch>-cross`).
    pub debian_arch: &'static str,
    /// Whether Rust ships a std for it (tier 1 or 2); tier 3 targets exist only through
    /// `-Zbuild-std` (which every foreign target uses here anyway: rustup cannot add targets).
    pub tier3: bool,
}

/// The platforms of a release, in build order: amd64 first (its coordinator and client drive
/// `--verify`), then the platforms CI's end-to-end test runs, the tier 3 one last.
pub const DIST_TARGETS: &[DistTarget] = &[
    DistTarget {
        platform: "linux/amd64",
        triple: "x86_64-unknown-linux-gnu",
        gnu: "x86_64-linux-gnu",
        debian_arch: "amd64",
        tier3: false,
    },
    DistTarget {
        platform: "linux/arm64",
        triple: "aarch64-unknown-linux-gnu",
        gnu: "aarch64-linux-gnu",
        debian_arch: "arm64",
        tier3: false,
    },
    DistTarget {
        platform: "linux/s390x",
        triple: "s390x-unknown-linux-gnu",
        gnu: "s390x-linux-gnu",
        debian_arch: "s390x",
        tier3: false,
    },
    DistTarget {
        platform: "linux/ppc64le",
        triple: "powerpc64le-unknown-linux-gnu",
        gnu: "powerpc64le-linux-gnu",
        debian_arch: "ppc64el",
        tier3: false,
    },
    DistTarget {
        platform: "linux/riscv64",
        triple: "riscv64gc-unknown-linux-gnu",
        gnu: "riscv64-linux-gnu",
        debian_arch: "riscv64",
        tier3: false,
    },
    DistTarget {
        platform: "linux/arm/v7",
        triple: "armv7-unknown-linux-gnueabihf",
        gnu: "arm-linux-gnueabihf",
        debian_arch: "armhf",
        tier3: false,
    },
    DistTarget {
        platform: "linux/mips64le",
        triple: "mips64el-unknown-linux-gnuabi64",
        gnu: "mips64el-linux-gnuabi64",
        debian_arch: "mips64el",
        tier3: true,
    },
];

/// The cargo profile of a cross build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// `--release`: what archives ship.
    Release,
    /// The dev profile: quicker to build, what CI's end-to-end tests run.
    Debug,
}

impl Profile {
    /// The directory under `<target-dir>/<triple>/`.
    pub fn dir_name(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }
}

impl DistTarget {
    /// The target of a farm platform.
    pub fn for_platform(platform: &str) -> Option<&'static DistTarget> {
        DIST_TARGETS.iter().find(|t| t.platform == platform)
    }

    /// Whether this is the build machine's own platform (built without `-Zbuild-std`, run
    /// without qemu).
    pub fn is_host(&self) -> bool {
        self.platform == "linux/amd64"
    }

    /// The platform as a file name part: `linux-arm-v7`.
    pub fn file_part(&self) -> String {
        self.platform.replace('/', "-")
    }

    /// `archfarm-VERSION-linux-ARCH[-VARIANT]`: the archive's name and its top directory.
    pub fn archive_stem(&self) -> String {
        format!("archfarm-{}-{}", version(), self.file_part())
    }

    /// The Debian packages that provide its C toolchain and libc.
    pub fn debian_packages(&self) -> String {
        if self.is_host() {
            "gcc libc6-dev".to_string()
        } else {
            format!("gcc-{} libc6-dev-{}-cross", self.gnu, self.debian_arch)
        }
    }

    /// The farm platform.
    pub fn farm_platform(&self) -> archfarm_proto::Platform {
        // DIST_TARGETS names known platforms only (a unit test parses each).
        self.platform
            .parse()
            .unwrap_or_else(|e| panic!("DIST_TARGETS: {e}"))
    }

    /// The cross toolchain's C compiler, also the linker.
    pub fn gcc(&self) -> String {
        format!("{}-gcc", self.gnu)
    }

    /// Debian's sysroot of the cross libc (what `QEMU_LD_PREFIX` would name for a dynamic
    /// binary).
    pub fn sysroot(&self) -> PathBuf {
        Path::new("/usr").join(self.gnu)
    }

    /// Where `binary` lands when built for this target with `profile`.
    pub fn binary_path(&self, profile: Profile, binary: &str) -> PathBuf {
        build_dir()
            .join(self.triple)
            .join(profile.dir_name())
            .join(binary)
    }
}

/// The release version: the workspace's.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `target/dist-build`: cross builds, apart from the host build's `target/debug` so that
/// neither invalidates the other.
pub fn build_dir() -> PathBuf {
    paths::target_dir().join("dist-build")
}

/// `target/dist`: the archives and SHA256SUMS.
pub fn out_dir() -> PathBuf {
    paths::target_dir().join("dist")
}

/// The cross-built agent for `platform` (e.g. `linux/s390x`) as `cargo xtask dist` leaves it
/// (`--test-agents` builds the debug ones CI's end-to-end tests run); it may not exist yet.
pub fn cross_built_agent(platform: &str, profile: Profile) -> anyhow::Result<PathBuf> {
    let target = DistTarget::for_platform(platform).ok_or_else(|| {
        anyhow::anyhow!(
            "{platform} is not a platform of `cargo xtask dist` (it builds {})",
            DIST_TARGETS
                .iter()
                .map(|t| t.platform)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    Ok(target.binary_path(profile, AGENT.name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use archfarm_proto::Platform;

    #[test]
    fn every_target_agrees_with_the_farm_s_platform_names() {
        for t in DIST_TARGETS {
            let p: Platform = t.platform.parse().unwrap();
            assert_eq!(t.farm_platform(), p);
            assert!(archfarm_proto::elf::ElfTarget::of_platform(&p).is_some());
            if !t.is_host() {
                assert!(
                    crate::binfmt::ForeignArch::for_platform(t.platform).is_some(),
                    "{} has no qemu-user entry",
                    t.platform
                );
            }
        }
        assert_eq!(DIST_TARGETS.len(), 7);
        assert_eq!(AGENT.name, "archfarm-agent");
        assert_eq!(CLIENT.name, "archfarm");
    }

    #[test]
    fn names_follow_the_platform() {
        let arm = DistTarget::for_platform("linux/arm/v7").unwrap();
        assert_eq!(
            arm.archive_stem(),
            format!("archfarm-{}-linux-arm-v7", version())
        );
        assert_eq!(arm.gcc(), "arm-linux-gnueabihf-gcc");
        assert_eq!(arm.sysroot(), Path::new("/usr/arm-linux-gnueabihf"));
        let agent = cross_built_agent("linux/s390x", Profile::Debug).unwrap();
        assert!(agent.ends_with("dist-build/s390x-unknown-linux-gnu/debug/archfarm-agent"));
        assert!(cross_built_agent("linux/386", Profile::Debug).is_err());
    }
}
