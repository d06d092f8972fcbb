//! Crash images of the store for tests: the bytes of every file of a sled directory, taken
//! right after a flush, and written out again as a fresh directory to open as if the
//! coordinator had died then.
//!
//! Dropping a store is no crash (sled flushes on drop) and neither is closing it; a `kill -9`
//! keeps what sled wrote to its files and loses what sat in its buffers, and a power loss
//! keeps only what the last fsync covered. Right after `Store::flush` returns, the files hold
//! everything written so far, so an image taken then is the least a crash at any later moment
//! is guaranteed to leave behind: everything written after it may be lost. Opening a copy of
//! it runs sled's own recovery on real files, which is what a restart after a crash does.
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The files of a store directory: relative path and contents, in path order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskImage {
    files: Vec<(PathBuf, Vec<u8>)>,
}

fn read_tree(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            read_tree(root, &path, out)?;
        } else {
            let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
            let rel = path.strip_prefix(root).context("a path inside the store")?;
            out.push((rel.to_path_buf(), bytes));
        }
    }
    Ok(())
}

impl DiskImage {
    /// Reads every file under `dir`; call it right after a flush. sled's flusher thread may
    /// still touch the files (an empty flush, a segment rewrite), so the directory is read
    /// until two reads in a row agree, and never a mix of two moments is kept.
    pub fn capture(dir: &Path) -> anyhow::Result<Self> {
        let read = || -> anyhow::Result<Self> {
            let mut files = Vec::new();
            read_tree(dir, dir, &mut files)?;
            files.sort();
            Ok(Self { files })
        };
        let mut last = read()?;
        for _ in 0..100 {
            let again = read()?;
            if again == last {
                return Ok(last);
            }
            last = again;
        }
        anyhow::bail!("the store in {} kept changing while read", dir.display())
    }

    /// Writes the image as a new directory `dir` (which must not exist yet).
    pub fn restore(&self, dir: &Path) -> anyhow::Result<()> {
        anyhow::ensure!(!dir.exists(), "{} exists already", dir.display());
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        for (rel, bytes) in &self.files {
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
        }
        Ok(())
    }

    /// Bytes in the image.
    pub fn len_bytes(&self) -> usize {
        self.files.iter().map(|(_, b)| b.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn an_image_keeps_what_was_flushed_before_it_and_nothing_after() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = Store::open(&live).unwrap();
        assert_eq!(store.next_counter("fence").unwrap(), 1);
        store.flush().unwrap();
        let image = DiskImage::capture(&live).unwrap();
        assert!(image.len_bytes() > 0);
        // Written after the image: flushed here too, and still absent from the copy.
        assert_eq!(store.next_counter("fence").unwrap(), 2);
        store.flush().unwrap();
        let crashed = dir.path().join("crashed");
        image.restore(&crashed).unwrap();
        let reopened = Store::open(&crashed).unwrap();
        assert_eq!(reopened.counter("fence").unwrap(), 1);
        // The live store goes on from where it was.
        drop(store);
        assert_eq!(Store::open(&live).unwrap().counter("fence").unwrap(), 2);
        assert!(image.restore(&crashed).is_err(), "never over a directory");
    }
}
