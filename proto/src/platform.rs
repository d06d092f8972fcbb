//! Platforms in Go/OCI spelling (`linux/arm64`, `linux/arm/v7`) and the host's own.
use std::fmt;
use std::str::FromStr;

/// A target platform: operating system, architecture, optional variant.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Platform {
    os: String,
    arch: String,
    variant: Option<String>,
}

/// The platforms the farm knows how to name, with their Go architecture.
pub const KNOWN_PLATFORMS: &[&str] = &[
    "linux/amd64",
    "linux/arm64",
    "linux/arm/v7",
    "linux/arm/v6",
    "linux/ppc64le",
    "linux/s390x",
    "linux/riscv64",
    "linux/mips64le",
    "linux/386",
];

/// What the farm knows about one Go architecture of [`KNOWN_PLATFORMS`].
struct Arch {
    /// GOARCH.
    goarch: &'static str,
    /// The qemu-user program that emulates it.
    qemu_user_program: &'static str,
    /// ELF e_machine of its binaries.
    elf_machine: u16,
    /// ELF class of its binaries: 1 (ELFCLASS32) or 2 (ELFCLASS64).
    elf_class: u8,
    /// Big-endian (ELF data ELFDATA2MSB) rather than little-endian.
    big_endian: bool,
}

/// Every architecture of [`KNOWN_PLATFORMS`], once.
const ARCHES: &[Arch] = &[
    Arch {
        goarch: "amd64",
        qemu_user_program: "qemu-x86_64-static",
        elf_machine: 62, // EM_X86_64
        elf_class: 2,
        big_endian: false,
    },
    Arch {
        goarch: "arm64",
        qemu_user_program: "qemu-aarch64-static",
        elf_machine: 183, // EM_AARCH64
        elf_class: 2,
        big_endian: false,
    },
    Arch {
        goarch: "arm",
        qemu_user_program: "qemu-arm-static",
        elf_machine: 40, // EM_ARM
        elf_class: 1,
        big_endian: false,
    },
    Arch {
        goarch: "ppc64le",
        qemu_user_program: "qemu-ppc64le-static",
        elf_machine: 21, // EM_PPC64
        elf_class: 2,
        big_endian: false,
    },
    Arch {
        goarch: "s390x",
        qemu_user_program: "qemu-s390x-static",
        elf_machine: 22, // EM_S390
        elf_class: 2,
        big_endian: true,
    },
    Arch {
        goarch: "riscv64",
        qemu_user_program: "qemu-riscv64-static",
        elf_machine: 243, // EM_RISCV
        elf_class: 2,
        big_endian: false,
    },
    Arch {
        goarch: "mips64le",
        qemu_user_program: "qemu-mips64el-static",
        elf_machine: 8, // EM_MIPS
        elf_class: 2,
        big_endian: false,
    },
    Arch {
        goarch: "386",
        qemu_user_program: "qemu-i386-static",
        elf_machine: 3, // EM_386
        elf_class: 1,
        big_endian: false,
    },
];

/// Why a platform string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown platform {given:?}; known platforms: {}", KNOWN_PLATFORMS.join(", "))]
pub struct UnknownPlatform {
    given: String,
}

impl Platform {
    /// Operating system, e.g. `linux`.
    pub fn os(&self) -> &str {
        &self.os
    }
    /// Go architecture (GOARCH), e.g. `arm64`; `arm` for `linux/arm/v7`.
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// Variant, e.g. `v7` for `linux/arm/v7`.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }
    /// GOARM value for 32-bit arm (`7` for `v7`); `None` for every other architecture.
    pub fn goarm(&self) -> Option<&str> {
        if self.arch != "arm" {
            return None;
        }
        self.variant.as_deref().and_then(|v| v.strip_prefix('v'))
    }

    /// The platform of a Linux machine whose `uname -m` is `machine`, read on this machine:
    /// where uname does not tell the byte order (`mips64`), it is this program's.
    pub fn from_uname_machine(machine: &str) -> Option<Self> {
        Self::from_uname_machine_with_byte_order(machine, cfg!(target_endian = "big"))
    }

    /// The platform of a Linux machine whose `uname -m` is `machine` and whose programs are
    /// big-endian or not. uname says `mips64` on both mips64el and big-endian mips64 machines;
    /// only the little-endian one is a farm platform.
    pub fn from_uname_machine_with_byte_order(machine: &str, big_endian: bool) -> Option<Self> {
        let s = match machine {
            "x86_64" | "amd64" => "linux/amd64",
            "aarch64" | "arm64" => "linux/arm64",
            "armv7l" | "armv8l" => "linux/arm/v7",
            "armv6l" => "linux/arm/v6",
            "ppc64le" => "linux/ppc64le",
            "s390x" => "linux/s390x",
            "riscv64" => "linux/riscv64",
            "mips64" if !big_endian => "linux/mips64le",
            "i686" | "i386" => "linux/386",
            _ => return None,
        };
        s.parse().ok()
    }

    /// What the farm knows about this platform's architecture (every known platform has it).
    fn known_arch(&self) -> Option<&'static Arch> {
        ARCHES.iter().find(|a| a.goarch == self.arch)
    }

    /// The qemu-user program name that emulates this platform (`qemu-aarch64-static`).
    pub fn qemu_user_program(&self) -> Option<&'static str> {
        self.known_arch().map(|a| a.qemu_user_program)
    }

    /// The ELF e_machine value of binaries for this platform (0, EM_NONE, if unknown).
    pub fn elf_machine(&self) -> u16 {
        self.known_arch().map_or(0, |a| a.elf_machine)
    }

    /// The ELF class (e_ident[EI_CLASS]) of binaries for this platform: 1 for 32-bit
    /// (`linux/arm/v7`, `linux/386`), 2 for 64-bit (0, ELFCLASSNONE, if unknown).
    pub fn elf_class(&self) -> u8 {
        self.known_arch().map_or(0, |a| a.elf_class)
    }

    /// Whether binaries for this platform are big-endian (e_ident[EI_DATA] 2, ELFDATA2MSB):
    /// only `linux/s390x`; every other known platform is little-endian (ELFDATA2LSB).
    pub fn big_endian(&self) -> bool {
        self.known_arch().is_some_and(|a| a.big_endian)
    }
}

impl FromStr for Platform {
    type Err = UnknownPlatform;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !KNOWN_PLATFORMS.contains(&s) {
            return Err(UnknownPlatform {
                given: s.chars().take(64).collect(),
            });
        }
        let mut parts = s.split('/');
        let os = parts.next().unwrap_or_default().to_string();
        let arch = parts.next().unwrap_or_default().to_string();
        let variant = parts.next().map(str::to_string);
        Ok(Self { os, arch, variant })
    }
}

impl TryFrom<String> for Platform {
    type Error = UnknownPlatform;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Platform> for String {
    fn from(p: Platform) -> String {
        p.to_string()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_known_platform() {
        for s in KNOWN_PLATFORMS {
            let p: Platform = s.parse().unwrap();
            assert_eq!(p.to_string(), *s);
        }
        let arm: Platform = "linux/arm/v7".parse().unwrap();
        assert_eq!((arm.arch(), arm.goarm()), ("arm", Some("7")));
    }

    #[test]
    fn refuses_unknown_platforms_with_the_list() {
        let e = "linux/mips".parse::<Platform>().unwrap_err().to_string();
        assert!(e.contains("linux/mips") && e.contains("linux/s390x"), "{e}");
        assert!("".parse::<Platform>().is_err());
        assert!("linux/arm64/".parse::<Platform>().is_err());
    }

    #[test]
    fn maps_uname_machines() {
        let from = |m: &str, big_endian: bool| {
            Platform::from_uname_machine_with_byte_order(m, big_endian).map(|p| p.to_string())
        };
        for (machine, platform) in [
            ("x86_64", "linux/amd64"),
            ("aarch64", "linux/arm64"),
            ("armv7l", "linux/arm/v7"),
            ("armv8l", "linux/arm/v7"),
            ("armv6l", "linux/arm/v6"),
            ("ppc64le", "linux/ppc64le"),
            ("riscv64", "linux/riscv64"),
            ("mips64", "linux/mips64le"),
            ("i686", "linux/386"),
        ] {
            assert_eq!(from(machine, false).as_deref(), Some(platform), "{machine}");
        }
        assert_eq!(from("s390x", true).as_deref(), Some("linux/s390x"));
        assert_eq!(
            from("mips64", true),
            None,
            "big-endian mips64 is no farm platform"
        );
        assert_eq!(from("ppc64", true), None, "nor big-endian ppc64");
        assert_eq!(from("vax", false), None);
        assert_eq!(
            Platform::from_uname_machine("aarch64").unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::from_uname_machine("mips64").is_some(),
            cfg!(target_endian = "little"),
            "read on this machine, mips64 has this program's byte order"
        );
    }

    #[test]
    fn every_known_platform_has_its_go_qemu_and_elf_names() {
        for s in KNOWN_PLATFORMS {
            let p: Platform = s.parse().unwrap();
            assert!(p.known_arch().is_some(), "{s}");
            assert!(
                p.elf_machine() != 0 && p.qemu_user_program().is_some(),
                "{s}"
            );
            assert!(matches!(p.elf_class(), 1 | 2), "{s}");
        }
        assert_eq!(
            ARCHES.len(),
            KNOWN_PLATFORMS
                .iter()
                .map(|s| s.parse::<Platform>().unwrap().arch().to_string())
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            "one entry per architecture, none for an unknown one"
        );
        let facts = |s: &str| {
            let p: Platform = s.parse().unwrap();
            (
                p.arch().to_string(),
                p.goarm().map(str::to_string),
                p.qemu_user_program(),
                p.elf_machine(),
                p.elf_class(),
                p.big_endian(),
            )
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            facts("linux/mips64le"),
            (
                "mips64le".into(),
                None,
                Some("qemu-mips64el-static"),
                8,
                2,
                false
            )
        );
        assert_eq!(
            facts("linux/arm/v7"),
            (
                "arm".into(),
                some("7"),
                Some("qemu-arm-static"),
                40,
                1,
                false
            )
        );
        assert_eq!(
            facts("linux/arm/v6"),
            (
                "arm".into(),
                some("6"),
                Some("qemu-arm-static"),
                40,
                1,
                false
            )
        );
        assert_eq!(
            facts("linux/386"),
            ("386".into(), None, Some("qemu-i386-static"), 3, 1, false)
        );
        assert_eq!(
            facts("linux/s390x"),
            ("s390x".into(), None, Some("qemu-s390x-static"), 22, 2, true)
        );
        assert_eq!(
            facts("linux/riscv64"),
            (
                "riscv64".into(),
                None,
                Some("qemu-riscv64-static"),
                243,
                2,
                false
            )
        );
        assert_eq!(
            facts("linux/amd64"),
            (
                "amd64".into(),
                None,
                Some("qemu-x86_64-static"),
                62,
                2,
                false
            )
        );
    }

    #[test]
    fn this_program_matches_its_own_platform() {
        let Some(host) = Platform::from_uname_machine(std::env::consts::ARCH) else {
            return; // An architecture the farm has no name for: nothing to compare.
        };
        assert_eq!(host.big_endian(), cfg!(target_endian = "big"), "{host}");
        assert_eq!(
            host.elf_class(),
            if cfg!(target_pointer_width = "64") {
                2
            } else {
                1
            },
            "{host}"
        );
    }
}
