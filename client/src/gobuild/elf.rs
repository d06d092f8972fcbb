//! The one fact go-build checks in every binary it brings home: the ELF header's machine field
//! (`e_machine`, bytes 18..20, in the byte order EI_DATA at byte 5 names) must be the target
//! platform's, so a binary built for the wrong architecture never lands in `<os>/<arch>/`.
use std::io::Read;
use std::path::Path;

/// Bytes of the ELF header read: through e_machine.
pub const HEADER_BYTES: usize = 20;

/// The e_machine field of an ELF header, or None when `header` is not one.
pub fn elf_machine(header: &[u8]) -> Option<u16> {
    if header.len() < HEADER_BYTES || &header[..4] != b"\x7fELF" {
        return None;
    }
    let field = [header[18], header[19]];
    match header[5] {
        1 => Some(u16::from_le_bytes(field)),
        2 => Some(u16::from_be_bytes(field)),
        _ => None,
    }
}

/// The e_machine field of the file at `path`; None when it is not ELF.
pub fn file_machine(path: &Path) -> std::io::Result<Option<u16>> {
    let mut header = Vec::with_capacity(HEADER_BYTES);
    std::fs::File::open(path)?
        .take(HEADER_BYTES as u64)
        .read_to_end(&mut header)?;
    Ok(elf_machine(&header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(data: u8, machine: [u8; 2]) -> Vec<u8> {
        let mut h = b"\x7fELF\x02".to_vec();
        h.push(data);
        h.resize(18, 0);
        h.extend_from_slice(&machine);
        h
    }

    #[test]
    fn the_machine_is_read_in_the_header_s_byte_order() {
        assert_eq!(elf_machine(&header(1, [183, 0])), Some(183)); // arm64, little-endian
        assert_eq!(elf_machine(&header(2, [0, 22])), Some(22)); // s390x, big-endian
        assert_eq!(elf_machine(&header(3, [0, 22])), None);
        assert_eq!(elf_machine(&header(1, [183, 0])[..19]), None);
        assert_eq!(elf_machine(b"#!/bin/sh\necho not elf\n"), None);
    }

    #[test]
    fn files_are_read_only_as_far_as_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bin");
        let mut bytes = header(1, [62, 0]);
        bytes.extend(std::iter::repeat_n(0xAA, 1000));
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(file_machine(&p).unwrap(), Some(62));
        std::fs::write(&p, b"short").unwrap();
        assert_eq!(file_machine(&p).unwrap(), None);
        let me = std::env::current_exe().unwrap();
        let host: archfarm_proto::Platform = "linux/amd64".parse().unwrap();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(file_machine(&me).unwrap(), Some(host.elf_machine()));
        }
    }
}
