//! archfarm's wire contract and the helpers every side needs to speak it: typed digests and
//! platforms, Merkle input trees, and the TLS channel.

pub mod digest;
pub mod digest_cache;
pub mod elf;
pub mod platform;
pub mod tls;
pub mod tree;

pub use digest::Digest;
pub use platform::Platform;

pub mod v1 {
    //! Generated from farm/v1/farm.proto.
    #![allow(clippy::all, clippy::pedantic, missing_docs, clippy::unwrap_used)]
    tonic::include_proto!("archfarm.v1");
}

/// Whether an agent's `Hello.sandbox` (shown as `AgentStatus.sandbox`) says it runs every
/// action inside bubblewrap: it starts with `bwrap (`. Anything else — `none: <why>`, or empty
/// from an agent that did not say — means its actions run unsandboxed.
pub fn is_sandboxed(sandbox: &str) -> bool {
    sandbox.starts_with("bwrap (")
}

/// Largest gRPC message either side accepts (batch CAS calls carry blobs).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bubblewrap_sandbox_counts_as_sandboxed() {
        assert!(is_sandboxed("bwrap (uid 65534, no network)"));
        assert!(is_sandboxed("bwrap (uid 1000, network when the job asks)"));
        for unsandboxed in [
            "",
            "none: turned off by policy",
            "none: bubblewrap (bwrap) is not installed",
            "none: turned off by policy (sandbox = \"none\"); actions run as root",
            "bwrapped",
            " bwrap (uid 65534, no network)",
        ] {
            assert!(!is_sandboxed(unsandboxed), "{unsandboxed:?}");
        }
    }
}
