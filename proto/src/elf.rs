//! The three facts of an ELF header that say which CPU a binary is for: its class (32- or
//! 64-bit, e_ident[EI_CLASS]), byte order (e_ident[EI_DATA]) and machine (e_machine, bytes
//! 18..20 in that byte order). go-build checks every binary it brings home against its
//! platform, and release archives check every binary they ship, so that a binary built for the
//! wrong architecture never lands under another's name.
use crate::Platform;
use std::fmt;
use std::io::Read;
use std::path::Path;

/// Bytes of the ELF header read: through e_machine.
pub const HEADER_BYTES: usize = 20;

/// What an ELF header says about the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfTarget {
    /// 1: 32-bit, 2: 64-bit.
    pub class: u8,
    /// e_ident[EI_DATA] is 2 (ELFDATA2MSB).
    pub big_endian: bool,
    /// e_machine.
    pub machine: u16,
}

impl ElfTarget {
    /// What binaries for `platform` must say (None for a platform with no known ELF machine).
    pub fn of_platform(platform: &Platform) -> Option<Self> {
        let machine = platform.elf_machine();
        (machine != 0).then(|| Self {
            class: platform.elf_class(),
            big_endian: platform.big_endian(),
            machine,
        })
    }

    /// Reads the header; None when `header` is not one of a known class and byte order.
    pub fn parse(header: &[u8]) -> Option<Self> {
        if header.len() < HEADER_BYTES || &header[..4] != b"\x7fELF" {
            return None;
        }
        let class = match header[4] {
            c @ (1 | 2) => c,
            _ => return None,
        };
        let field = [header[18], header[19]];
        let (big_endian, machine) = match header[5] {
            1 => (false, u16::from_le_bytes(field)),
            2 => (true, u16::from_be_bytes(field)),
            _ => return None,
        };
        Some(Self {
            class,
            big_endian,
            machine,
        })
    }

    /// The header of the file at `path`; None when it is not ELF.
    pub fn of_file(path: &Path) -> std::io::Result<Option<Self>> {
        let mut header = Vec::with_capacity(HEADER_BYTES);
        std::fs::File::open(path)?
            .take(HEADER_BYTES as u64)
            .read_to_end(&mut header)?;
        Ok(Self::parse(&header))
    }
}

impl fmt::Display for ElfTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ELF{} {}-endian, machine {}",
            if self.class == 1 { 32 } else { 64 },
            if self.big_endian { "big" } else { "little" },
            self.machine
        )
    }
}

/// Checks that the file at `path` is an ELF binary for `platform`; the error says what it is
/// instead.
pub fn check_file(path: &Path, platform: &Platform) -> Result<ElfTarget, String> {
    let want = ElfTarget::of_platform(platform)
        .ok_or_else(|| format!("{platform} has no known ELF machine"))?;
    match ElfTarget::of_file(path) {
        Err(e) => Err(format!("failed to read {}: {e}", path.display())),
        Ok(None) => Err(format!(
            "{} is not an ELF binary (expected {want} for {platform})",
            path.display()
        )),
        Ok(Some(got)) if got == want => Ok(got),
        Ok(Some(got)) => Err(format!(
            "{} is not for {platform}: {got}, expected {want}",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, data: u8, machine: [u8; 2]) -> Vec<u8> {
        let mut h = b"\x7fELF".to_vec();
        h.push(class);
        h.push(data);
        h.resize(18, 0);
        h.extend_from_slice(&machine);
        h
    }

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn the_machine_is_read_in_the_header_s_byte_order() {
        let arm64 = ElfTarget::parse(&header(2, 1, [183, 0])).unwrap();
        assert_eq!(arm64, ElfTarget::of_platform(&p("linux/arm64")).unwrap());
        let s390x = ElfTarget::parse(&header(2, 2, [0, 22])).unwrap();
        assert_eq!(s390x, ElfTarget::of_platform(&p("linux/s390x")).unwrap());
        assert!(s390x.big_endian);
        assert_eq!(ElfTarget::parse(&header(2, 3, [0, 22])), None);
        assert_eq!(ElfTarget::parse(&header(3, 1, [0, 22])), None);
        assert_eq!(ElfTarget::parse(&header(2, 1, [183, 0])[..19]), None);
        assert_eq!(ElfTarget::parse(b"#!/bin/sh\necho not elf\n"), None);
    }

    #[test]
    fn class_and_byte_order_tell_apart_what_the_machine_alone_does_not() {
        // EM_MIPS (8) is the machine of 32-bit mips, mips64 and mips64le alike.
        let mips64le = ElfTarget::of_platform(&p("linux/mips64le")).unwrap();
        assert_eq!(mips64le, ElfTarget::parse(&header(2, 1, [8, 0])).unwrap());
        assert_ne!(mips64le, ElfTarget::parse(&header(2, 2, [0, 8])).unwrap());
        assert_ne!(mips64le, ElfTarget::parse(&header(1, 1, [8, 0])).unwrap());
        let armv7 = ElfTarget::of_platform(&p("linux/arm/v7")).unwrap();
        assert_eq!(armv7, ElfTarget::parse(&header(1, 1, [40, 0])).unwrap());
    }

    #[test]
    fn files_are_checked_against_their_platform() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        let mut bytes = header(2, 1, [62, 0]);
        bytes.extend(std::iter::repeat_n(0xAA, 1000));
        std::fs::write(&path, bytes).unwrap();
        assert!(check_file(&path, &p("linux/amd64")).is_ok());
        let err = check_file(&path, &p("linux/s390x")).unwrap_err();
        assert!(
            err.contains("ELF64 little-endian, machine 62, expected ELF64 big-endian, machine 22"),
            "{err}"
        );
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        assert!(check_file(&path, &p("linux/amd64"))
            .unwrap_err()
            .contains("not an ELF binary"));
    }
}
