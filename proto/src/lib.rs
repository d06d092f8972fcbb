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

/// Largest gRPC message either side accepts (batch CAS calls carry blobs).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
