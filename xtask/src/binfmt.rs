//! qemu-user and binfmt_misc for the commands that run foreign binaries on this amd64 host
//! (`bench k8s`, `dist --verify`): the architectures with the magic Debian registers, and
//! [`BinfmtGuard`], which registers them as root and always removes them again.
use crate::demo::{find_program, run_checked};
use anyhow::bail;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where binfmt_misc lives.
pub const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// A foreign architecture qemu-user emulates here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignArch {
    /// The farm platform, e.g. `linux/arm/v7`.
    pub platform: &'static str,
    /// GOARCH.
    pub goarch: &'static str,
    /// qemu's name for it (`qemu-<name>-static`).
    pub qemu: &'static str,
    /// binfmt_misc magic: the ELF header up to e_machine, as the kernel reads `\x..` escapes.
    pub magic: &'static str,
    /// binfmt_misc mask for the magic.
    pub mask: &'static str,
}

/// The foreign platforms of the farm, with the magic and mask Debian's qemu-user-static
/// registers (/usr/lib/binfmt.d/qemu-*.conf).
pub const FOREIGN_ARCHES: [ForeignArch; 6] = [
    ForeignArch {
        platform: "linux/arm64",
        goarch: "arm64",
        qemu: "aarch64",
        magic: r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
        mask: r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    },
    ForeignArch {
        platform: "linux/ppc64le",
        goarch: "ppc64le",
        qemu: "ppc64le",
        magic: r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x15\x00",
        mask: r"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\x00",
    },
    ForeignArch {
        platform: "linux/s390x",
        goarch: "s390x",
        qemu: "s390x",
        magic: r"\x7f\x45\x4c\x46\x02\x02\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x16",
        mask: r"\xff\xff\xff\xff\xff\xff\xff\xfc\xff\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff",
    },
    ForeignArch {
        platform: "linux/riscv64",
        goarch: "riscv64",
        qemu: "riscv64",
        magic: r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xf3\x00",
        mask: r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    },
    ForeignArch {
        platform: "linux/arm/v7",
        goarch: "arm",
        qemu: "arm",
        magic: r"\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00",
        mask: r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    },
    ForeignArch {
        platform: "linux/mips64le",
        goarch: "mips64le",
        qemu: "mips64el",
        magic: r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x08\x00",
        mask: r"\xff\xff\xff\xff\xff\xff\xff\x00\xfe\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff",
    },
];

impl ForeignArch {
    /// The architecture of a farm platform, if it is a foreign one.
    pub fn for_platform(platform: &str) -> Option<Self> {
        FOREIGN_ARCHES
            .iter()
            .find(|a| a.platform == platform)
            .copied()
    }

    /// `linux/<goarch>[/<variant>]`.
    pub fn platform(&self) -> String {
        self.platform.to_string()
    }

    /// The qemu-user program: found on PATH, else where Debian puts it.
    pub fn qemu_program(&self) -> PathBuf {
        let name = format!("qemu-{}-static", self.qemu);
        find_program(&name).unwrap_or_else(|| Path::new("/usr/bin").join(name))
    }

    /// The binfmt_misc entry name archfarm registers.
    pub fn binfmt_name(&self) -> String {
        format!("archfarm-qemu-{}", self.qemu)
    }

    /// The line written to binfmt_misc's `register`: match by magic, run `interpreter`, and
    /// open it now (`F`), so it works whatever the mount namespace of the process it runs.
    pub fn binfmt_rule(&self, interpreter: &Path) -> String {
        format!(
            ":{}:M::{}:{}:{}:F",
            self.binfmt_name(),
            self.magic,
            self.mask,
            interpreter.display()
        )
    }
}

/// qemu-user registered with binfmt_misc for some architectures; the entries are
/// removed again, and binfmt_misc unmounted if this mounted it, when the guard drops (also
/// on error and panic; callers turn Ctrl-C and SIGTERM into an early return so it drops).
pub struct BinfmtGuard {
    mounted: bool,
    entries: Vec<PathBuf>,
}

impl BinfmtGuard {
    /// Registers `arches` (root only), replacing entries a killed run left behind.
    pub fn register(arches: &[ForeignArch]) -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "not root (euid {}): mounting binfmt_misc and registering qemu-user need root",
                nix::unistd::geteuid()
            );
        }
        let dir = Path::new(BINFMT_DIR);
        let register = dir.join("register");
        let mut guard = Self {
            mounted: false,
            entries: Vec::new(),
        };
        if !register.exists() {
            run_checked(
                Command::new("mount")
                    .args(["-t", "binfmt_misc", "binfmt_misc"])
                    .arg(dir),
                &format!("mount binfmt_misc on {BINFMT_DIR}"),
            )?;
            guard.mounted = true;
            if !register.exists() {
                bail!(
                    "{} is missing after mounting binfmt_misc",
                    register.display()
                );
            }
        }
        for arch in arches {
            let entry = dir.join(arch.binfmt_name());
            if entry.exists() {
                // Left by a run that was killed: replace it.
                std::fs::write(&entry, "-1")
                    .with_context(|| format!("failed to remove the stale {}", entry.display()))?;
            }
            let rule = arch.binfmt_rule(&arch.qemu_program());
            std::fs::write(&register, &rule)
                .with_context(|| format!("failed to register {rule:?} with binfmt_misc"))?;
            guard.entries.push(entry);
        }
        eprintln!(
            "registered {} with binfmt_misc{}",
            arches
                .iter()
                .map(ForeignArch::binfmt_name)
                .collect::<Vec<_>>()
                .join(", "),
            if guard.mounted { " (mounted it)" } else { "" }
        );
        Ok(guard)
    }
}

impl Drop for BinfmtGuard {
    fn drop(&mut self) {
        for entry in self.entries.drain(..).rev() {
            if let Err(e) = std::fs::write(&entry, "-1") {
                eprintln!("failed to unregister {}: {e}", entry.display());
            }
        }
        if self.mounted {
            // Someone else's entries keep it mounted.
            let others = std::fs::read_dir(BINFMT_DIR)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| !matches!(e.file_name().to_str(), Some("register" | "status")))
                })
                .unwrap_or(false);
            if others {
                eprintln!("left binfmt_misc mounted: other entries appeared in {BINFMT_DIR}");
            } else if let Err(e) = run_checked(
                Command::new("umount").arg(BINFMT_DIR),
                "unmount binfmt_misc",
            ) {
                eprintln!("{e:#}");
            }
        }
        eprintln!("binfmt_misc restored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binfmt_rules_match_debians_magic() {
        let rule = FOREIGN_ARCHES[0].binfmt_rule(Path::new("/usr/bin/qemu-aarch64-static"));
        assert_eq!(
            rule,
            r":archfarm-qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F"
        );
        for a in FOREIGN_ARCHES {
            // 20 bytes of magic and mask each: the ELF header up to e_machine.
            assert_eq!(a.magic.len(), 80, "{}", a.goarch);
            assert_eq!(a.mask.len(), 80, "{}", a.goarch);
        }
        // The ELF machine numbers: aarch64 183, ppc64 21, s390 22, riscv 243 (s390x is
        // big-endian, so its bytes come the other way round).
        assert!(FOREIGN_ARCHES[1].magic.ends_with(r"\x15\x00"));
        assert!(FOREIGN_ARCHES[2].magic.ends_with(r"\x00\x16"));
        assert!(FOREIGN_ARCHES[3].magic.ends_with(r"\xf3\x00"));
        // arm 40 in a 32-bit header (class 1), mips 8.
        assert!(FOREIGN_ARCHES[4].magic.ends_with(r"\x28\x00"));
        assert!(FOREIGN_ARCHES[4].magic.starts_with(r"\x7f\x45\x4c\x46\x01"));
        assert!(FOREIGN_ARCHES[5].magic.ends_with(r"\x08\x00"));
        for a in FOREIGN_ARCHES {
            let p: archfarm_proto::Platform = a.platform.parse().unwrap();
            assert_eq!(p.arch(), a.goarch);
            assert_eq!(ForeignArch::for_platform(a.platform), Some(a));
        }
    }
}
