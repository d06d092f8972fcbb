//! What `dist` checks in every binary before it ships: the ELF header's class, byte order and
//! machine against the platform's (so an amd64 binary never ships under another name), and
//! whether it is static (no PT_INTERP: no dynamic loader, runs without a libc on the box).
use super::targets::ElfIdentity;
use anyhow::{bail, Context};
use std::io::Read;
use std::path::Path;

/// The facts read from one ELF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElfFacts {
    /// Class, byte order and machine.
    pub identity: ElfIdentity,
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
    let class64 = match bytes[4] {
        1 => false,
        2 => true,
        c => bail!("unknown ELF class {c}"),
    };
    let big_endian = match bytes[5] {
        1 => false,
        2 => true,
        d => bail!("unknown ELF byte order {d}"),
    };
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
    let machine = field(18, 2)? as u16;
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
        identity: ElfIdentity {
            class64,
            big_endian,
            machine,
        },
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

/// Fails unless `facts` carry `expected`'s class, byte order and machine.
pub fn check_identity(facts: &ElfFacts, expected: &ElfIdentity) -> anyhow::Result<()> {
    let name = |i: &ElfIdentity| {
        format!(
            "{}-bit {}-endian machine {}",
            if i.class64 { 64 } else { 32 },
            if i.big_endian { "big" } else { "little" },
            i.machine
        )
    };
    if facts.identity != *expected {
        bail!(
            "it is {}, not {} as the platform needs",
            name(&facts.identity),
            name(expected)
        );
    }
    Ok(())
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
    fn reads_class_byte_order_machine_and_interpreter() {
        let s390x = parse(&elf(true, true, 22, 2, &[6, 1, 1])).unwrap();
        assert_eq!(
            s390x.identity,
            ElfIdentity {
                class64: true,
                big_endian: true,
                machine: 22
            }
        );
        assert_eq!(s390x.linkage(), "static");
        let arm = parse(&elf(false, false, 40, 3, &[6, 3, 1])).unwrap();
        assert_eq!(arm.identity.machine, 40);
        assert!(!arm.identity.class64);
        assert_eq!(arm.linkage(), "dynamic");
        let pie = parse(&elf(true, false, 183, 3, &[6, 1, 2])).unwrap();
        assert_eq!(pie.linkage(), "static-pie");
        assert!(parse(b"#!/bin/sh\n").is_err());
        assert!(parse(&elf(true, false, 62, 2, &[1])[..60]).is_err());
    }

    #[test]
    fn an_amd64_binary_never_passes_for_another_platform() {
        let amd64 = parse(&elf(true, false, 62, 3, &[6, 1])).unwrap();
        let arm64 = ElfIdentity {
            class64: true,
            big_endian: false,
            machine: 183,
        };
        let e = check_identity(&amd64, &arm64).unwrap_err().to_string();
        assert!(e.contains("machine 62") && e.contains("machine 183"), "{e}");
        assert!(check_identity(&amd64, &amd64.identity).is_ok());
    }

    #[test]
    fn this_test_binary_is_read() {
        let me = std::env::current_exe().unwrap();
        let facts = read(&me).unwrap();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(facts.identity.machine, 62);
            assert!(facts.identity.class64 && !facts.identity.big_endian);
        }
    }
}
