//! Typed blake3 digests: the one name for a blob, on the wire and in Rust.
use crate::v1;
use std::fmt;

/// A blob's blake3 hash and length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hash: [u8; 32],
    size_bytes: u64,
}

/// Why a wire digest is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest hash {0:?} is not 64 lower-case hex characters")]
    BadHash(String),
    #[error("digest is missing")]
    Missing,
}

impl Digest {
    /// Digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            hash: *blake3::hash(bytes).as_bytes(),
            size_bytes: bytes.len() as u64,
        }
    }

    /// From a finished hasher and the byte count fed to it.
    pub fn from_hasher(hasher: &blake3::Hasher, size_bytes: u64) -> Self {
        Self {
            hash: *hasher.finalize().as_bytes(),
            size_bytes,
        }
    }

    /// From raw parts.
    pub fn from_parts(hash: [u8; 32], size_bytes: u64) -> Self {
        Self { hash, size_bytes }
    }

    /// The digest of zero bytes.
    pub fn empty() -> Self {
        Self::of(&[])
    }

    /// Lower-case hex of the hash.
    pub fn hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// The raw hash.
    pub fn hash_bytes(&self) -> &[u8; 32] {
        &self.hash
    }

    /// Length in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Parses a wire digest, checking the hash spelling.
    pub fn from_proto(d: &v1::Digest) -> Result<Self, DigestError> {
        let h = &d.hash;
        if h.len() != 64
            || !h
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::BadHash(h.chars().take(80).collect()));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(h, &mut hash).map_err(|_| DigestError::BadHash(h.clone()))?;
        Ok(Self {
            hash,
            size_bytes: d.size_bytes,
        })
    }

    /// Parses an optional wire digest that must be present.
    pub fn from_proto_required(d: Option<&v1::Digest>) -> Result<Self, DigestError> {
        Self::from_proto(d.ok_or(DigestError::Missing)?)
    }

    /// The wire form.
    pub fn to_proto(&self) -> v1::Digest {
        v1::Digest {
            hash: self.hex(),
            size_bytes: self.size_bytes,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.hex(), self.size_bytes)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_wire_form() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_proto(&d.to_proto()), Ok(d));
        assert_eq!(d.size_bytes(), 5);
    }

    #[test]
    fn rejects_bad_hex() {
        for bad in ["", "abc", &"G".repeat(64), &"A".repeat(64)] {
            let p = v1::Digest {
                hash: bad.to_string(),
                size_bytes: 1,
            };
            assert!(Digest::from_proto(&p).is_err(), "{bad:?} accepted");
        }
    }
}
