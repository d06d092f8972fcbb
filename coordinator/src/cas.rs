//! Blobs on disk under their blake3 digest: sharded by prefix, written durably (temp file,
//! fsync, rename), verified on write and again on read; a corrupt file counts as missing.
use anyhow::Context;
use archfarm_proto::Digest;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a blob was refused.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The bytes do not hash to the digest they came with.
    #[error("blob does not match its digest: declared {declared}, actual {actual}")]
    Mismatch {
        /// What the caller said.
        declared: Digest,
        /// What the bytes are.
        actual: Digest,
    },
    /// Disk trouble.
    #[error(transparent)]
    Io(#[from] anyhow::Error),
}

/// The content-addressed store.
pub struct Cas {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl Cas {
    /// Opens the store under `root`, creating it if needed.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root.join("tmp"))
            .with_context(|| format!("failed to create {}", root.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    fn path(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .join(&hex[..2])
            .join(format!("{hex}-{}", d.size_bytes()))
    }

    /// Whether the blob is present (by name and size, without reading it).
    pub fn contains(&self, d: &Digest) -> bool {
        std::fs::metadata(self.path(d)).is_ok_and(|m| m.len() == d.size_bytes())
    }

    /// Stores `data` under `declared` after checking it; returns whether it was new.
    pub fn put(&self, declared: &Digest, data: &[u8]) -> Result<bool, CasError> {
        let actual = Digest::of(data);
        if &actual != declared {
            return Err(CasError::Mismatch {
                declared: *declared,
                actual,
            });
        }
        if self.contains(declared) {
            return Ok(false);
        }
        let path = self.path(declared);
        let dir = path.parent().context("blob path has no parent")?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let tmp = self.root.join("tmp").join(format!(
            "{}-{}-{}",
            declared.hex(),
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("failed to sync {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("failed to rename into {}", path.display()))?;
        std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
        Ok(true)
    }

    /// Reads and verifies a blob. A corrupt file is removed, logged and reported missing.
    pub fn get(&self, d: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.path(d);
        let data = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
        };
        let actual = Digest::of(&data);
        if &actual != d {
            tracing::warn!(blob = %d, actual = %actual, "removing corrupt blob from the CAS");
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Ok(Some(data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_on_write_and_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let cas = Cas::open(dir.path()).unwrap();
        let d = Digest::of(b"hello");
        assert!(cas.put(&d, b"hello").unwrap());
        assert!(!cas.put(&d, b"hello").unwrap());
        assert!(matches!(
            cas.put(&d, b"jello"),
            Err(CasError::Mismatch { .. })
        ));
        assert_eq!(cas.get(&d).unwrap().unwrap(), b"hello");
        std::fs::write(cas.path(&d), b"hellp").unwrap();
        assert_eq!(cas.get(&d).unwrap(), None, "corrupt blob is never served");
        assert!(!cas.contains(&d));
    }
}
