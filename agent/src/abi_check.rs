//! Refuses to build an agent for MIPS against a `libc` crate whose MIPS definitions are the
//! generic ones: libc 0.2.190 and 0.2.191 give mips64 glibc the generic socket types, signal
//! numbers and `sigaction` layout (their `src/new/glibc` paths name `mips` where `mips64`
//! was meant), so every TCP socket tokio opens is a UDP one ("Protocol not available" at
//! TCP_NODELAY) and SIGCHLD is never seen. Checked at compile time, on MIPS only.

#[cfg(all(target_os = "linux", any(target_arch = "mips", target_arch = "mips64")))]
const _: () = {
    assert!(
        libc::SOCK_STREAM == 2 && libc::SOCK_DGRAM == 1,
        "this libc crate has the generic SOCK_STREAM on MIPS: pin libc to 0.2.183 \
         (cargo update -p mio --precise 1.2.0 && cargo update -p libc --precise 0.2.183)"
    );
    assert!(
        libc::SIGCHLD == 18 && libc::SIGUSR1 == 16,
        "this libc crate has the generic signal numbers on MIPS: pin libc to 0.2.183"
    );
    assert!(
        core::mem::offset_of!(libc::sigaction, sa_flags) == 0,
        "this libc crate has the generic sigaction layout on MIPS: pin libc to 0.2.183"
    );
};
