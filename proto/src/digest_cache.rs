//! A client's digest cache: what each file of an input tree hashed to, keyed by its path
//! below the root and by what `lstat` says about it — size, modification and change times in
//! nanoseconds, inode and device — so that uploading an unchanged tree again reads metadata
//! instead of bytes, as Bazel and ccache do. One small text file per input root (named by a
//! hash of its canonical path) in a directory the client chooses; loaded once, written whole
//! (temp file, rename) after the tree is built and only when something changed, and ending in
//! a blake3 of its contents, so that a torn or edited file is ignored rather than believed.
//! It lives here rather than in the client because it runs per file, like the hashing it
//! saves (this crate is optimised even in debug builds).
//!
//! Correctness first: any change of size, mtime, ctime, inode or device re-hashes the file,
//! and ctime, which nobody can set, catches a rewrite whose mtime was put back (`touch -d`,
//! `tar`, `rsync -t`). A rewrite within one tick of the filesystem's clock could keep every
//! stamp equal, so, like git with its "racily clean" index entries, a digest is only kept
//! when the file's mtime and ctime are at least [`RACY_WINDOW`] older than the moment this run
//! began hashing: any later write then lands on a later stamp. Files changed just before a run
//! are hashed again by the next one.
use crate::tree::DigestMemo;
use crate::Digest;
use anyhow::Context;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A file changed less than this long before a run began hashing is not remembered by it.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);
/// Input roots remembered; the least recently written cache files beyond this are removed.
pub const MAX_ROOTS: usize = 64;
/// First line of a cache file.
const HEADER: &str = "archfarm digest cache v1";
/// Start of the last line, followed by the blake3 of everything before it.
const TRAILER: &str = "blake3 ";
/// Leftover temp files of crashed writers older than this are removed.
const STALE_TEMP: Duration = Duration::from_secs(24 * 3600);

/// What `lstat` says about a file, as far as the cache relies on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(meta: &Metadata) -> Self {
        let ns = |secs: i64, nsec: i64| i128::from(secs) * 1_000_000_000 + i128::from(nsec);
        Self {
            size: meta.size(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// Relative path -> the stamp a digest was taken under.
type Entries = HashMap<String, (Stamp, Digest)>;

/// The digest cache of one input root: what the last run knew, and what this run used.
#[derive(Debug)]
pub struct DigestCache {
    file: PathBuf,
    known: Entries,
    used: Mutex<Entries>,
    /// Entries whose mtime or ctime is not before this (ns since the epoch) are not kept.
    keep_before_ns: i128,
    recalled: AtomicU64,
    hashed: AtomicU64,
    /// Something was remembered that the file did not hold.
    changed: AtomicBool,
}

impl DigestCache {
    /// Loads the cache of input root `root` from `dir`, for a run that began hashing at
    /// `started`. A missing, torn or unreadable file gives an empty cache (and a note on
    /// stderr unless it was simply missing): the cache can only save work, never fail it.
    pub fn load(dir: &Path, root: &Path, started: SystemTime) -> Self {
        let canonical = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        let name = blake3::hash(canonical.as_os_str().as_encoded_bytes()).to_hex();
        let file = dir.join(&name[..32]);
        let known = match std::fs::read_to_string(&file) {
            Ok(text) => parse(&text).unwrap_or_else(|why| {
                eprintln!("ignoring the digest cache {}: {why}", file.display());
                Entries::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Entries::new(),
            Err(e) => {
                eprintln!("ignoring the digest cache {}: {e}", file.display());
                Entries::new()
            }
        };
        let started_ns = started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        Self {
            file,
            known,
            used: Mutex::new(Entries::new()),
            keep_before_ns: started_ns - RACY_WINDOW.as_nanos() as i128,
            recalled: AtomicU64::new(0),
            hashed: AtomicU64::new(0),
            changed: AtomicBool::new(false),
        }
    }

    /// Where the cache lives.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Files whose digest came from the cache in this run.
    pub fn recalled(&self) -> u64 {
        self.recalled.load(Ordering::Relaxed)
    }

    /// Files the cache did not know (or no longer trusted) in this run.
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Writes what this run used, leaving out racy entries, in place of the file (temp file
    /// and rename, so readers see the old or the new file whole), then trims the directory
    /// to [`MAX_ROOTS`] input roots. When this run used exactly what the file held, only the
    /// file's modification time is renewed (it orders the roots for trimming).
    pub fn save(&self) -> anyhow::Result<()> {
        let text = {
            let used = self.used.lock().unwrap_or_else(|e| e.into_inner());
            if !self.changed.load(Ordering::Relaxed) && used.len() == self.known.len() {
                // Every entry used is one the file holds, and as many: the same set.
                return std::fs::File::options()
                    .write(true)
                    .open(&self.file)
                    .and_then(|f| f.set_modified(SystemTime::now()))
                    .with_context(|| format!("failed to touch {}", self.file.display()));
            }
            let mut kept: Vec<(&String, &(Stamp, Digest))> = used
                .iter()
                .filter(|(path, (stamp, _))| {
                    stamp.mtime_ns.max(stamp.ctime_ns) < self.keep_before_ns && !path.contains('\n')
                })
                .collect();
            kept.sort_unstable_by(|a, b| a.0.cmp(b.0));
            render(&kept)
        };
        let dir = self
            .file
            .parent()
            .context("the digest cache file has no directory")?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let name = self
            .file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let written = std::fs::write(&tmp, text)
            .with_context(|| format!("failed to write {}", tmp.display()))
            .and_then(|()| {
                std::fs::rename(&tmp, &self.file)
                    .with_context(|| format!("failed to rename into {}", self.file.display()))
            });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        prune(dir, MAX_ROOTS)
    }
}

impl DigestMemo for DigestCache {
    fn recall(&self, rel: &Path, meta: &Metadata) -> Option<Digest> {
        let found = rel
            .to_str()
            .and_then(|key| self.known.get(key))
            .filter(|(stamp, _)| *stamp == Stamp::of(meta))
            .map(|(_, d)| *d);
        let counter = if found.is_some() {
            &self.recalled
        } else {
            &self.hashed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn remember(&self, rel: &Path, meta: &Metadata, digest: Digest) {
        let Some(key) = rel.to_str() else {
            return;
        };
        let entry = (Stamp::of(meta), digest);
        if self.known.get(key) != Some(&entry) {
            self.changed.store(true, Ordering::Relaxed);
        }
        self.used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_string(), entry);
    }
}

/// The file's text: header, one line per entry
/// (`<hash> <size> <mtime ns> <ctime ns> <inode> <device> <path>`), then the blake3 of all that.
fn render(entries: &[(&String, &(Stamp, Digest))]) -> String {
    let mut text = String::with_capacity(64 + entries.len() * 160);
    text.push_str(HEADER);
    text.push('\n');
    for (path, (s, d)) in entries {
        let _ = writeln!(
            text,
            "{} {} {} {} {} {} {path}",
            d.hex(),
            d.size_bytes(),
            s.mtime_ns,
            s.ctime_ns,
            s.ino,
            s.dev
        );
    }
    let sum = blake3::hash(text.as_bytes()).to_hex();
    let _ = writeln!(text, "{TRAILER}{sum}");
    text
}

/// Reads a cache file's text; any flaw rejects the whole file.
fn parse(text: &str) -> Result<Entries, String> {
    let body_end = text
        .strip_suffix('\n')
        .and_then(|t| t.rfind('\n'))
        .map(|i| i + 1)
        .ok_or("no checksum line")?;
    let (body, trailer) = text.split_at(body_end);
    let sum = trailer
        .strip_prefix(TRAILER)
        .and_then(|t| t.strip_suffix('\n'))
        .ok_or("no checksum line")?;
    if blake3::hash(body.as_bytes()).to_hex().as_str() != sum {
        return Err("its checksum does not match (torn or edited)".into());
    }
    let mut lines = body.split_terminator('\n');
    if lines.next() != Some(HEADER) {
        return Err(format!("the first line is not {HEADER:?}"));
    }
    let mut entries = Entries::new();
    for (n, line) in lines.enumerate() {
        let entry = parse_line(line).ok_or_else(|| format!("line {} is malformed", n + 2))?;
        entries.insert(entry.0, entry.1);
    }
    Ok(entries)
}

fn parse_line(line: &str) -> Option<(String, (Stamp, Digest))> {
    let mut parts = line.splitn(7, ' ');
    let hash = parts.next()?;
    let size: u64 = parts.next()?.parse().ok()?;
    let mtime_ns = parts.next()?.parse().ok()?;
    let ctime_ns = parts.next()?.parse().ok()?;
    let ino = parts.next()?.parse().ok()?;
    let dev = parts.next()?.parse().ok()?;
    let path = parts.next().filter(|p| !p.is_empty())?;
    let digest = Digest::from_hex(hash, size).ok()?;
    let stamp = Stamp {
        size,
        mtime_ns,
        ctime_ns,
        ino,
        dev,
    };
    Some((path.to_string(), (stamp, digest)))
}

/// Keeps the `keep` most recently written cache files of `dir` and removes the rest, and
/// removes temp files of writers that died long ago.
fn prune(dir: &Path, keep: usize) -> anyhow::Result<()> {
    let mut caches = Vec::new();
    let now = SystemTime::now();
    for e in std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let e = e.with_context(|| format!("failed to list {}", dir.display()))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Ok(modified) = e.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            caches.push((modified, e.path()));
        } else if name.starts_with('.')
            && name.contains(".tmp-")
            && now.duration_since(modified).unwrap_or_default() > STALE_TEMP
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if caches.len() <= keep {
        return Ok(());
    }
    caches.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
    for (_, path) in &caches[keep..] {
        std::fs::remove_file(path)
            .with_context(|| format!("failed to remove {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{build_input_tree, build_tree_remembering, BuildOptions};

    /// A moment after every file of the test was written, so none of them is racy.
    fn later() -> SystemTime {
        SystemTime::now() + Duration::from_secs(60)
    }

    struct Run {
        root: Digest,
        recalled: u64,
        hashed: u64,
    }

    /// Builds the input tree of `root` with the cache in `cache`, as a run that began hashing
    /// at `started`, and saves the cache.
    fn build(root: &Path, cache: &Path, started: SystemTime) -> Run {
        let memo = DigestCache::load(cache, root, started);
        let options = BuildOptions {
            honour_farmignore: true,
        };
        let tree = build_tree_remembering(root, &options, Some(&memo), &|_| {}).unwrap();
        memo.save().unwrap();
        assert_eq!(
            tree.root,
            build_input_tree(root).unwrap().root,
            "the cache changed the tree"
        );
        Run {
            root: tree.root,
            recalled: memo.recalled(),
            hashed: memo.hashed(),
        }
    }

    fn tree() -> (tempfile::TempDir, tempfile::TempDir) {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::fs::write(root.path().join("a.txt"), "alpha").unwrap();
        std::fs::write(root.path().join("sub/b txt"), "bravo").unwrap();
        (root, tempfile::tempdir().unwrap())
    }

    #[test]
    fn an_unchanged_tree_is_recalled_not_hashed() {
        let (root, cache) = tree();
        let first = build(root.path(), cache.path(), later());
        assert_eq!((first.recalled, first.hashed), (0, 2));
        let second = build(root.path(), cache.path(), later());
        assert_eq!((second.recalled, second.hashed), (2, 0));
        assert_eq!(second.root, first.root);
        // Recalled entries are written again: the third run still knows them.
        let third = build(root.path(), cache.path(), later());
        assert_eq!((third.recalled, third.hashed), (2, 0));
    }

    #[test]
    fn a_deleted_file_is_forgotten() {
        let (root, cache) = tree();
        build(root.path(), cache.path(), later());
        std::fs::remove_file(root.path().join("sub/b txt")).unwrap();
        let run = build(root.path(), cache.path(), later());
        assert_eq!((run.recalled, run.hashed), (1, 0));
        let memo = DigestCache::load(cache.path(), root.path(), later());
        assert_eq!(memo.known.keys().collect::<Vec<_>>(), ["a.txt"]);
    }

    #[test]
    fn a_changed_size_is_hashed_again() {
        let (root, cache) = tree();
        let first = build(root.path(), cache.path(), later());
        std::fs::write(root.path().join("a.txt"), "alpha, longer").unwrap();
        let second = build(root.path(), cache.path(), later());
        assert_eq!((second.recalled, second.hashed), (1, 1));
        assert_ne!(second.root, first.root);
    }

    #[test]
    fn a_same_size_rewrite_is_hashed_again_even_with_its_old_mtime() {
        let (root, cache) = tree();
        let a = root.path().join("a.txt");
        let first = build(root.path(), cache.path(), later());
        // Same size, new contents, new mtime.
        std::fs::write(&a, "ALPHA").unwrap();
        let second = build(root.path(), cache.path(), later());
        assert_eq!((second.recalled, second.hashed), (1, 1));
        assert_ne!(second.root, first.root);
        // Same size again, and the mtime put back to what the cache saw: ctime tells.
        let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
        std::fs::write(&a, "alpha").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(std::fs::metadata(&a).unwrap().modified().unwrap(), mtime);
        let third = build(root.path(), cache.path(), later());
        assert_eq!((third.recalled, third.hashed), (1, 1));
        assert_eq!(third.root, first.root);
    }

    #[test]
    fn racy_entries_are_hashed_again_next_time() {
        let (root, cache) = tree();
        // The files were written just now: too close to this run's start to be trusted.
        let first = build(root.path(), cache.path(), SystemTime::now());
        assert_eq!(first.hashed, 2);
        let second = build(root.path(), cache.path(), later());
        assert_eq!(
            (second.recalled, second.hashed),
            (0, 2),
            "nothing racy was kept"
        );
        let third = build(root.path(), cache.path(), later());
        assert_eq!((third.recalled, third.hashed), (2, 0));
        assert_eq!(third.root, first.root);
    }

    #[test]
    fn a_torn_or_edited_cache_file_is_ignored() {
        let (root, cache) = tree();
        build(root.path(), cache.path(), later());
        let file = DigestCache::load(cache.path(), root.path(), later())
            .file()
            .to_path_buf();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(parse(&text).is_ok());
        // Torn: the end is missing.
        std::fs::write(&file, &text[..text.len() - 10]).unwrap();
        assert!(DigestCache::load(cache.path(), root.path(), later())
            .known
            .is_empty());
        // Edited: one digest changed, the checksum line kept.
        let mut edited = text.clone().into_bytes();
        let at = HEADER.len() + 1;
        edited[at] = if edited[at] == b'0' { b'1' } else { b'0' };
        std::fs::write(&file, &edited).unwrap();
        let run = build(root.path(), cache.path(), later());
        assert_eq!((run.recalled, run.hashed), (0, 2));
    }

    #[test]
    fn the_directory_keeps_the_most_recently_written_roots() {
        let dir = tempfile::tempdir().unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        for (i, age) in [3u64, 1, 2].into_iter().enumerate() {
            let p = dir.path().join(format!("{i:032x}"));
            std::fs::write(&p, "x").unwrap();
            let f = std::fs::File::options().write(true).open(&p).unwrap();
            f.set_modified(t - Duration::from_secs(age)).unwrap();
        }
        std::fs::write(dir.path().join("unrelated"), "kept").unwrap();
        prune(dir.path(), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!("{:032x}", 1),
                format!("{:032x}", 2),
                "unrelated".into()
            ]
        );
    }
}
