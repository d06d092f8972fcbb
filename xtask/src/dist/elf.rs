//! Whether a binary `dist` ships is static: no PT_INTERP program header, so no dynamic loader
//! and no libc needed on the box. (Its class, byte order and machine are checked against the
//! platform by `archfarm_proto::elf`, the check go-build uses too.)
use anyhow::{bail, Context};
use archfarm_proto::elf::ElfTarget;
use std::io::Read;
use std::path::Path;

/// The facts read from one ELF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfFacts {
    /// Class, byte order and machine.
    pub identity: ElfTarget,
    /// Whether a program header asks for an interpreter (the dynamic loader).
    pub has_interpreter: bool,
    /// e_type is ET_DYN (a PIE; static-pie when it has no interpreter).
    pub position_independent: bool,
}

impl ElfFacts {
    /// "static", "static-pie" or "dynamic".
    pub fn linkage(&self) -> &'static str {
        match (self.has_interpreter, self.position_independent) {
            (true, _) => "dynamic",
            (false, true) => "static-pie",
            (false, false) => "static",
        }
    }
}

/// Program header type of the interpreter request.
const PT_INTERP: u32 = 3;
/// e_type of position-independent executables and shared objects.
const ET_DYN: u16 = 3;
/// Program headers read at most (a linked Rust binary has about a dozen).
const MAX_PROGRAM_HEADERS: usize = 256;

/// Reads the facts from the bytes of an ELF file (the header and program headers suffice).
pub fn parse(bytes: &[u8]) -> anyhow::Result<ElfFacts> {
    if bytes.len() < 52 || &bytes[..4] != b"\x7fELF" {
        bail!("not an ELF file");
    }
    let identity = ElfTarget::parse(bytes).context("not an ELF file of a known class")?;
    let (class64, big_endian) = (identity.class == 2, identity.big_endian);
    let field = |at: usize, len: usize| -> anyhow::Result<u64> {
        let b = bytes
            .get(at..at + len)
            .with_context(|| format!("the ELF file ends before byte {}", at + len))?;
        let mut v: u64 = 0;
        for i in 0..len {
            let byte = if big_endian { b[i] } else { b[len - 1 - i] };
            v = (v << 8) | u64::from(byte);
        }
        Ok(v)
    };
    let e_type = field(16, 2)? as u16;
    let (phoff, phentsize, phnum) = if class64 {
        (field(32, 8)?, field(54, 2)?, field(56, 2)?)
    } else {
        (field(28, 4)?, field(42, 2)?, field(44, 2)?)
    };
    if phnum as usize > MAX_PROGRAM_HEADERS {
        bail!("{phnum} program headers: not a binary dist built");
    }
    let mut has_interpreter = false;
    for i in 0..phnum {
        let at = usize::try_from(phoff + i * phentsize).context("program header offset")?;
        if field(at, 4)? as u32 == PT_INTERP {
            has_interpreter = true;
        }
    }
    Ok(ElfFacts {
        identity,
        has_interpreter,
        position_independent: e_type == ET_DYN,
    })
}

/// Reads the facts of the file at `path` (its first 64 KiB: headers come first).
pub fn read(path: &Path) -> anyhow::Result<ElfFacts> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut bytes))
        .with_context(|| format!("failed to read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("failed to read the ELF headers of {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF file: header plus `headers` program headers of the given types.
    fn elf(class64: bool, big_endian: bool, machine: u16, e_type: u16, headers: &[u32]) -> Vec<u8> {
        let put = |v: &mut Vec<u8>, x: u64, len: usize| {
            let b = x.to_be_bytes();
            let b = &b[8 - len..];
            if big_endian {
                v.extend_from_slice(b);
            } else {
                v.extend(b.iter().rev());
            }
        };
        let mut v = b"\x7fELF".to_vec();
        v.push(if class64 { 2 } else { 1 });
        v.push(if big_endian { 2 } else { 1 });
        v.resize(16, 0);
        put(&mut v, u64::from(e_type), 2);
        put(&mut v, u64::from(machine), 2);
        let (ehsize, phentsize) = if class64 { (64, 56) } else { (52, 32) };
        if class64 {
            v.resize(32, 0);
            put(&mut v, ehsize, 8);
            v.resize(54, 0);
        } else {
            v.resize(28, 0);
            put(&mut v, ehsize, 4);
            v.resize(42, 0);
        }
        put(&mut v, phentsize, 2);
        put(&mut v, headers.len() as u64, 2);
        v.resize(ehsize as usize, 0);
        for h in headers {
            let start = v.len();
            put(&mut v, u64::from(*h), 4);
            v.resize(start + phentsize as usize, 0);
        }
        v
    }

    #[test]
    fn reads_the_interpreter_in_either_class_and_byte_order() {
        let s390x = parse(&elf(true, true, 22, 2, &[6, 1, 1])).unwrap();
        assert_eq!(
            s390x.identity,
            ElfTarget {
                class: 2,
                big_endian: true,
                machine: 22
            }
        );
        assert_eq!(s390x.linkage(), "static");
        let arm = parse(&elf(false, false, 40, 3, &[6, 3, 1])).unwrap();
        assert_eq!((arm.identity.machine, arm.identity.class), (40, 1));
        assert_eq!(arm.linkage(), "dynamic");
        let pie = parse(&elf(true, false, 183, 3, &[6, 1, 2])).unwrap();
        assert_eq!(pie.linkage(), "static-pie");
        assert!(parse(b"#!/bin/sh\n").is_err());
        assert!(parse(&elf(true, false, 62, 2, &[1])[..60]).is_err());
    }

    #[test]
    fn this_test_binary_is_read() {
        let me = std::env::current_exe().unwrap();
        let facts = read(&me).unwrap();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(facts.identity.machine, 62);
            assert!(facts.identity.class == 2 && !facts.identity.big_endian);
        }
    }
}
