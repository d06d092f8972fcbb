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
    /// Go architecture, e.g. `arm64`.
    pub fn arch(&self) -> &str {
        &self.arch
    }
    /// Variant, e.g. `v7` for `linux/arm/v7`.
    pub fn variant(&self) -> Option<&str> {
        self.variant.as_deref()
    }
    /// GOARM value for 32-bit arm (`7` for `v7`).
    pub fn goarm(&self) -> Option<&str> {
        self.variant.as_deref().and_then(|v| v.strip_prefix('v'))
    }

    /// The platform of a Linux machine whose `uname -m` is `machine`.
    pub fn from_uname_machine(machine: &str) -> Option<Self> {
        let s = match machine {
            "x86_64" | "amd64" => "linux/amd64",
            "aarch64" | "arm64" => "linux/arm64",
            "armv7l" | "armv8l" => "linux/arm/v7",
            "armv6l" => "linux/arm/v6",
            "ppc64le" => "linux/ppc64le",
            "s390x" => "linux/s390x",
            "riscv64" => "linux/riscv64",
            // Not a uname answer (mips64 says `mips64` whatever its byte order): the agent's
            // fallback names its own little-endian build this way.
            "mips64le" => "linux/mips64le",
            "i686" | "i386" => "linux/386",
            _ => return None,
        };
        s.parse().ok()
    }

    /// The qemu-user program name that emulates this platform (`qemu-aarch64-static`).
    pub fn qemu_user_program(&self) -> Option<&'static str> {
        Some(match self.arch.as_str() {
            "arm64" => "qemu-aarch64-static",
            "arm" => "qemu-arm-static",
            "ppc64le" => "qemu-ppc64le-static",
            "s390x" => "qemu-s390x-static",
            "riscv64" => "qemu-riscv64-static",
            "mips64le" => "qemu-mips64el-static",
            "386" => "qemu-i386-static",
            "amd64" => "qemu-x86_64-static",
            _ => return None,
        })
    }

    /// The ELF e_machine value of binaries for this platform.
    pub fn elf_machine(&self) -> u16 {
        match self.arch.as_str() {
            "amd64" => 62,
            "arm64" => 183,
            "arm" => 40,
            "ppc64le" => 21,
            "s390x" => 22,
            "riscv64" => 243,
            "mips64le" => 8,
            "386" => 3,
            _ => 0,
        }
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
        assert_eq!(
            Platform::from_uname_machine("aarch64").unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::from_uname_machine("s390x").unwrap().to_string(),
            "linux/s390x"
        );
        assert!(Platform::from_uname_machine("vax").is_none());
    }
}
