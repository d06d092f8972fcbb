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

    /// Lower-case hex of the hash. (By hand rather than with the `hex` crate: it runs for
    /// every digest on the wire, and this crate is optimised even in debug builds.)
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.hash {
            out.push(char::from(DIGITS[usize::from(b >> 4)]));
            out.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        out
    }

    /// The raw hash.
    pub fn hash_bytes(&self) -> &[u8; 32] {
        &self.hash
    }

    /// Length in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Parses a wire digest, checking the hash spelling (64 lower-case hex digits).
    pub fn from_proto(d: &v1::Digest) -> Result<Self, DigestError> {
        Self::from_hex(&d.hash, d.size_bytes)
    }

    /// A digest from the hex of its hash (64 lower-case hex digits) and its size.
    pub fn from_hex(hex: &str, size_bytes: u64) -> Result<Self, DigestError> {
        fn nibble(c: u8) -> Option<u8> {
            match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            }
        }
        let bad = || DigestError::BadHash(hex.chars().take(80).collect());
        let h = hex.as_bytes();
        if h.len() != 64 {
            return Err(bad());
        }
        let mut hash = [0u8; 32];
        for (byte, pair) in hash.iter_mut().zip(h.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
                return Err(bad());
            };
            *byte = hi << 4 | lo;
        }
        Ok(Self { hash, size_bytes })
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

impl std::str::FromStr for Digest {
    type Err = DigestError;
    /// Parses the Display form, `<64 hex digits>/<size>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || DigestError::BadHash(s.chars().take(80).collect());
        let (hex, size) = s.split_once('/').ok_or_else(bad)?;
        Self::from_hex(hex, size.parse().map_err(|_| bad())?)
    }
}

/// Records (the coordinator's store) keep a digest as its Display form.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
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
    fn hex_is_lower_case_and_round_trips() {
        for i in 0..=255u8 {
            let d = Digest::from_parts([i; 32], u64::from(i));
            assert_eq!(d.hex(), hex::encode([i; 32]));
            assert_eq!(Digest::from_hex(&d.hex(), d.size_bytes()), Ok(d));
        }
        let d = Digest::of(b"mixed");
        assert_eq!(d.hex(), hex::encode(d.hash_bytes()));
    }

    #[test]
    fn round_trips_through_text() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_string().parse::<Digest>(), Ok(d));
        assert!("abc/5".parse::<Digest>().is_err());
        assert!(format!("{}/x", d.hex()).parse::<Digest>().is_err());
    }

    #[test]
    fn rejects_bad_hex() {
        let mut one_off = "0".repeat(63);
        one_off.push('g');
        for bad in [
            "",
            "abc",
            &"G".repeat(64),
            &"A".repeat(64),
            &"0".repeat(65),
            &one_off,
            &"é".repeat(32),
        ] {
            let p = v1::Digest {
                hash: bad.to_string(),
                size_bytes: 1,
            };
            assert!(Digest::from_proto(&p).is_err(), "{bad:?} accepted");
        }
    }
}
