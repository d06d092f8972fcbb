//! Materialises an action's input root as a work directory: fetches only the blobs missing from
//! the local blob cache (small ones in batches, large ones streamed to disk), verifies them, and
//! hard-links cached files into place while they are pinned against eviction.
use crate::blob_cache::BlobCache;
use crate::cas::{self, BlobStore, STREAM_ABOVE_BYTES};
use anyhow::{bail, Context};
use archfarm_proto::tree::{self, MAX_DEPTH};
use archfarm_proto::{v1, Digest, MAX_MESSAGE_BYTES};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Bytes of blobs asked for in one BatchRead call (the response must stay under the message limit).
const BATCH_BYTES: u64 = 32 * 1024 * 1024;
/// Digests asked for in one BatchRead call.
const BATCH_COUNT: usize = 4096;
/// Most directory entries (counted per path) an input tree may have.
const MAX_TREE_NODES: usize = 1_000_000;

/// Splits small blobs into BatchRead calls of at most `BATCH_BYTES` and `BATCH_COUNT`.
/// Blobs over `STREAM_ABOVE_BYTES` do not belong here: they are streamed.
fn batches(digests: &[Digest]) -> anyhow::Result<Vec<Vec<Digest>>> {
    let mut out = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0u64;
    for d in digests {
        if d.size_bytes() > STREAM_ABOVE_BYTES {
            bail!("blob {d} is too large for BatchRead: it must be streamed");
        }
        if !current.is_empty()
            && (bytes + d.size_bytes() > BATCH_BYTES || current.len() >= BATCH_COUNT)
        {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += d.size_bytes();
        current.push(*d);
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

/// Splits digests into those read in batches and those streamed one by one.
fn by_transfer(digests: Vec<Digest>) -> (Vec<Digest>, Vec<Digest>) {
    digests
        .into_iter()
        .partition(|d| d.size_bytes() <= STREAM_ABOVE_BYTES)
}

/// Reads one batch and checks every blob against its digest.
async fn read_verified<S: BlobStore>(
    store: &S,
    batch: Vec<Digest>,
) -> anyhow::Result<Vec<(Digest, Vec<u8>)>> {
    let blobs = store.read_blobs(batch.clone()).await?;
    if blobs.len() != batch.len() {
        bail!("asked for {} blobs, got {}", batch.len(), blobs.len());
    }
    batch
        .into_iter()
        .zip(blobs)
        .map(|(d, bytes)| {
            if Digest::of(&bytes) != d {
                bail!("blob {d} from the CAS does not match its digest");
            }
            Ok((d, bytes))
        })
        .collect()
}

/// Fetches and validates every Directory of the tree under `root`, level by level.
async fn fetch_directories<S: BlobStore>(
    store: &S,
    root: Digest,
) -> anyhow::Result<HashMap<Digest, v1::Directory>> {
    let mut dirs: HashMap<Digest, v1::Directory> = HashMap::new();
    let mut level: Vec<(String, Digest)> = vec![(".".to_string(), root)];
    let mut nodes = 0usize;
    for depth in 0.. {
        if level.is_empty() {
            break;
        }
        if depth > MAX_DEPTH {
            bail!("input tree is deeper than {MAX_DEPTH} levels");
        }
        let mut wanted: Vec<Digest> = level
            .iter()
            .map(|(_, d)| *d)
            .filter(|d| !dirs.contains_key(d))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        wanted.sort();
        let (small, large) = by_transfer(wanted);
        let mut fetched = Vec::new();
        for batch in batches(&small)? {
            fetched.extend(
                read_verified(store, batch)
                    .await
                    .context("failed to fetch input directories")?,
            );
        }
        for digest in large {
            let bytes = cas::read_to_memory(store, digest, MAX_MESSAGE_BYTES as u64)
                .await
                .context("failed to fetch an input directory")?;
            fetched.push((digest, bytes));
        }
        for (digest, bytes) in fetched {
            let dir = v1::Directory::decode(bytes.as_slice())
                .ok()
                .filter(|dir| tree::encode_directory(dir) == bytes)
                .with_context(|| {
                    format!("input directory {digest} is not a canonical Directory")
                })?;
            dirs.insert(digest, dir);
        }
        let mut next = Vec::new();
        for (path, digest) in &level {
            let dir = dirs
                .get(digest)
                .with_context(|| format!("{path}: directory {digest} was not fetched"))?;
            tree::validate_directory(path, depth, dir)?;
            nodes += dir.files.len() + dir.directories.len() + dir.symlinks.len();
            if nodes > MAX_TREE_NODES {
                bail!("input tree has more than {MAX_TREE_NODES} entries");
            }
            for sub in &dir.directories {
                let d = Digest::from_proto_required(sub.digest.as_ref())
                    .with_context(|| format!("{path}/{}: bad digest", sub.name))?;
                next.push((format!("{path}/{}", sub.name), d));
            }
        }
        level = next;
    }
    Ok(dirs)
}

/// Makes `dest` (created if needed) hold the input tree named by `root`; `None` leaves it empty.
/// The tree's blobs are pinned in the cache until the work directory links to them; after
/// fetching, the cache evicts other blobs down to its budget.
pub async fn materialise<S: BlobStore>(
    store: &S,
    cache: &BlobCache,
    root: Option<Digest>,
    dest: &Path,
) -> anyhow::Result<()> {
    fs::create_dir_all(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    let Some(root) = root else {
        return Ok(());
    };
    let dirs = fetch_directories(store, root).await?;

    // Which file blobs, in which variant, the tree needs.
    let mut needed: HashSet<(Digest, bool)> = HashSet::new();
    for dir in dirs.values() {
        for f in &dir.files {
            let d = Digest::from_proto_required(f.digest.as_ref())
                .with_context(|| format!("file {:?}: bad digest", f.name))?;
            needed.insert((d, f.executable));
        }
    }
    // Both variants: a missing one may be derived from the other.
    let _pins = cache.pin(needed.iter().flat_map(|(d, _)| [(*d, false), (*d, true)]));
    let cache2 = cache.clone();
    let missing: Vec<(Digest, bool)> = tokio::task::spawn_blocking(move || {
        let mut missing = Vec::new();
        for (d, exec) in needed {
            if cache2.has(&d, exec) {
                continue;
            }
            match cache2.derive(&d, exec) {
                Ok(true) => {}
                Ok(false) => missing.push((d, exec)),
                Err(e) => return Err(e),
            }
        }
        Ok(missing)
    })
    .await
    .context("failed to check the blob cache")??;

    let mut variants: HashMap<Digest, Vec<bool>> = HashMap::new();
    for (d, exec) in missing {
        variants.entry(d).or_default().push(exec);
    }
    let mut to_fetch: Vec<Digest> = variants.keys().copied().collect();
    to_fetch.sort();
    if !to_fetch.is_empty() {
        tracing::debug!(
            "fetching {} input blobs ({} bytes)",
            to_fetch.len(),
            to_fetch.iter().map(Digest::size_bytes).sum::<u64>()
        );
    }
    let (small, large) = by_transfer(to_fetch);
    for batch in batches(&small)? {
        let blobs = read_verified(store, batch)
            .await
            .context("failed to fetch input files")?;
        let cache2 = cache.clone();
        let wanted: Vec<Vec<bool>> = blobs
            .iter()
            .map(|(d, _)| variants.get(d).cloned().unwrap_or_default())
            .collect();
        tokio::task::spawn_blocking(move || {
            for ((d, bytes), execs) in blobs.iter().zip(wanted) {
                for exec in execs {
                    cache2.insert(d, bytes, exec)?;
                }
            }
            cache2.evict_to_budget();
            anyhow::Ok(())
        })
        .await
        .context("failed to fill the blob cache")??;
    }
    for d in large {
        let execs = variants.get(&d).cloned().unwrap_or_default();
        fetch_streamed(store, cache, d, execs)
            .await
            .with_context(|| format!("failed to fetch input file {d}"))?;
    }

    let cache2 = cache.clone();
    let dest2 = dest.to_path_buf();
    tokio::task::spawn_blocking(move || build_tree(&cache2, &dirs, root, &dest2))
        .await
        .context("failed to build the work directory")?
}

/// Streams one large blob into the cache (as its first needed variant, then copies it to the
/// others) without holding it in memory.
async fn fetch_streamed<S: BlobStore>(
    store: &S,
    cache: &BlobCache,
    digest: Digest,
    execs: Vec<bool>,
) -> anyhow::Result<()> {
    let Some((&first, rest)) = execs.split_first() else {
        return Ok(());
    };
    let tmp = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || cache.temp_path(&digest))
            .await
            .context("failed to prepare the blob cache")??
    };
    let file = cas::read_to_file(store, digest, &tmp).await?;
    let cache = cache.clone();
    let rest = rest.to_vec();
    tokio::task::spawn_blocking(move || {
        cache.adopt(&tmp, file, &digest, first)?;
        for exec in rest {
            if !cache.derive(&digest, exec)? {
                bail!("failed to copy cached blob {digest}");
            }
        }
        cache.evict_to_budget();
        Ok(())
    })
    .await
    .context("failed to fill the blob cache")?
}

/// Creates directories, links files from the cache and creates symlinks under `dest`.
fn build_tree(
    cache: &BlobCache,
    dirs: &HashMap<Digest, v1::Directory>,
    root: Digest,
    dest: &Path,
) -> anyhow::Result<()> {
    let mut stack = vec![(root, dest.to_path_buf())];
    while let Some((digest, path)) = stack.pop() {
        let dir = dirs
            .get(&digest)
            .with_context(|| format!("directory {digest} was not fetched"))?;
        for f in &dir.files {
            let d = Digest::from_proto_required(f.digest.as_ref())
                .with_context(|| format!("file {:?}: bad digest", f.name))?;
            let (from, to) = (cache.path(&d, f.executable), path.join(&f.name));
            if cache.copies_inputs() {
                fs::copy(&from, &to).with_context(|| {
                    format!("failed to copy {} to {}", from.display(), to.display())
                })?;
            } else {
                link_or_copy(&from, &to)?;
            }
        }
        for s in &dir.symlinks {
            let link = path.join(&s.name);
            std::os::unix::fs::symlink(&s.target, &link)
                .with_context(|| format!("failed to create symlink {}", link.display()))?;
        }
        for sub in &dir.directories {
            let d = Digest::from_proto_required(sub.digest.as_ref())
                .with_context(|| format!("directory {:?}: bad digest", sub.name))?;
            let sub_path = path.join(&sub.name);
            fs::create_dir(&sub_path)
                .with_context(|| format!("failed to create {}", sub_path.display()))?;
            stack.push((d, sub_path));
        }
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    // Another file system, too many links, or a file system without hard links: copy.
    fs::copy(from, to)
        .with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Removes a work directory, even one whose directories an action made read-only.
pub fn remove_dir_forcibly(path: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) => {}
    }
    make_dirs_writable(path);
    fs::remove_dir_all(path).with_context(|| format!("failed to remove {}", path.display()))
}

/// Gives the owner rwx on every directory under `path` (files are left alone: they may be
/// hard links into the blob cache).
fn make_dirs_writable(path: &Path) {
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if !meta.is_dir() {
            continue;
        }
        let mode = meta.permissions().mode() | 0o700;
        let _ = fs::set_permissions(&p, fs::Permissions::from_mode(mode));
        if let Ok(entries) = fs::read_dir(&p) {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cas::memory::MemoryStore;

    fn store_of(src: &Path) -> (MemoryStore, Digest) {
        let t = tree::build_local_tree(src).expect("tree");
        let store = MemoryStore::default();
        for d in t.all_digests() {
            let bytes = t.read_blob(&d).expect("blob");
            store.blobs.lock().expect("lock").insert(d, bytes);
        }
        (store, t.root)
    }

    fn sample_source() -> tempfile::TempDir {
        let src = tempfile::tempdir().expect("tempdir");
        let p = src.path();
        fs::create_dir_all(p.join("bin")).expect("mkdir");
        fs::create_dir_all(p.join("data/empty")).expect("mkdir");
        fs::write(p.join("a.txt"), "hello\n").expect("write");
        fs::write(p.join("data/same.txt"), "#!/bin/sh\necho hi\n").expect("write");
        fs::write(p.join("bin/run.sh"), "#!/bin/sh\necho hi\n").expect("write");
        fs::set_permissions(p.join("bin/run.sh"), fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::os::unix::fs::symlink("../a.txt", p.join("data/link")).expect("symlink");
        src
    }

    #[tokio::test]
    async fn a_copying_cache_gives_work_dirs_their_own_files() {
        use std::os::unix::fs::MetadataExt;
        let src = sample_source();
        let (store, root) = store_of(src.path());
        let data = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(&data.path().join("cache"), 1 << 30).expect("cache");
        let linked = data.path().join("linked");
        materialise(&store, &cache, Some(root), &linked)
            .await
            .expect("materialise");
        assert_eq!(fs::metadata(linked.join("a.txt")).expect("a").nlink(), 2);
        let copying = cache.copying_inputs();
        let copied = data.path().join("copied");
        materialise(&store, &copying, Some(root), &copied)
            .await
            .expect("materialise");
        let meta = fs::metadata(copied.join("bin/run.sh")).expect("run.sh");
        assert_eq!(meta.nlink(), 1, "a copy, not a link into the cache");
        assert_eq!(meta.permissions().mode() & 0o777, 0o555);
        assert_eq!(
            fs::read_to_string(copied.join("a.txt")).expect("a"),
            "hello\n"
        );
    }

    #[tokio::test]
    async fn materialises_a_tree_and_reuses_the_cache() {
        let src = sample_source();
        let (store, root) = store_of(src.path());
        let data = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(&data.path().join("cache"), 1 << 30).expect("cache");

        let w1 = data.path().join("w1");
        materialise(&store, &cache, Some(root), &w1)
            .await
            .expect("materialise");
        assert_eq!(fs::read_to_string(w1.join("a.txt")).expect("a"), "hello\n");
        let run = fs::metadata(w1.join("bin/run.sh")).expect("run.sh");
        assert_eq!(run.permissions().mode() & 0o777, 0o555);
        let same = fs::metadata(w1.join("data/same.txt")).expect("same.txt");
        assert_eq!(same.permissions().mode() & 0o777, 0o444);
        assert_eq!(
            fs::read_link(w1.join("data/link")).expect("link"),
            Path::new("../a.txt")
        );
        assert_eq!(
            fs::read_to_string(w1.join("data/link")).expect("through link"),
            "hello\n"
        );
        assert!(w1.join("data/empty").is_dir());
        let first_reads = store.reads.lock().expect("lock").len();
        assert!(first_reads > 0);

        // A second work dir needs only the directories again: files come from the cache.
        let w2 = data.path().join("w2");
        materialise(&store, &cache, Some(root), &w2)
            .await
            .expect("materialise again");
        let reads = store.reads.lock().expect("lock").clone();
        let file_digests: HashSet<Digest> = ["hello\n", "#!/bin/sh\necho hi\n"]
            .iter()
            .map(|s| Digest::of(s.as_bytes()))
            .collect();
        assert!(
            reads[first_reads..]
                .iter()
                .all(|d| !file_digests.contains(d)),
            "file blobs were fetched twice"
        );
        assert_eq!(
            fs::read_to_string(w2.join("bin/run.sh")).expect("run"),
            "#!/bin/sh\necho hi\n"
        );

        // A cached file damaged through a hard link is noticed and fetched again.
        let cached = cache.path(&Digest::of(b"hello\n"), false);
        fs::set_permissions(&cached, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::write(&cached, "HELLO\n").expect("overwrite");
        let w3 = data.path().join("w3");
        materialise(&store, &cache, Some(root), &w3)
            .await
            .expect("materialise after damage");
        assert_eq!(fs::read_to_string(w3.join("a.txt")).expect("a"), "hello\n");

        remove_dir_forcibly(&w1).expect("remove");
        assert!(!w1.exists());
    }

    #[tokio::test]
    async fn no_root_means_an_empty_dir() {
        let data = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(&data.path().join("cache"), 1 << 30).expect("cache");
        let w = data.path().join("w");
        materialise(&MemoryStore::default(), &cache, None, &w)
            .await
            .expect("materialise");
        assert_eq!(fs::read_dir(&w).expect("read_dir").count(), 0);
    }

    #[tokio::test]
    async fn refuses_corrupt_blobs_and_escaping_symlinks() {
        let src = sample_source();
        let (store, root) = store_of(src.path());
        let hello = Digest::of(b"hello\n");
        store
            .blobs
            .lock()
            .expect("lock")
            .insert(hello, b"HELLO\n".to_vec());
        let data = tempfile::tempdir().expect("tempdir");
        let cache = BlobCache::open(&data.path().join("cache"), 1 << 30).expect("cache");
        let e = materialise(&store, &cache, Some(root), &data.path().join("w"))
            .await
            .expect_err("corrupt blob accepted");
        assert!(format!("{e:#}").contains("does not match"), "{e:#}");
        assert!(!cache.path(&hello, false).exists());

        let bad = v1::Directory {
            symlinks: vec![v1::SymlinkNode {
                name: "l".into(),
                target: "../../etc".into(),
            }],
            ..Default::default()
        };
        let bytes = tree::encode_directory(&bad);
        let bad_root = Digest::of(&bytes);
        store.blobs.lock().expect("lock").insert(bad_root, bytes);
        let e = materialise(&store, &cache, Some(bad_root), &data.path().join("w2"))
            .await
            .expect_err("escaping symlink accepted");
        assert!(format!("{e:#}").contains("leaves the input root"), "{e:#}");
    }

    #[test]
    fn batches_respect_the_byte_budget() {
        let d = |n: u8, size: u64| Digest::from_parts([n; 32], size);
        let mb = 1024 * 1024;
        let mut digests: Vec<Digest> = (0..9).map(|n| d(n, 4 * mb)).collect();
        digests.insert(2, d(100, 1));
        let b = batches(&digests).expect("ok");
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![8, 2]);
        let many: Vec<Digest> = (0..BATCH_COUNT + 1).map(|n| d(n as u8, 1)).collect();
        assert_eq!(batches(&many).expect("ok").len(), 2);
        assert!(batches(&[d(5, 4 * mb + 1)]).is_err());
    }

    #[tokio::test]
    async fn large_inputs_are_streamed_and_a_small_cache_keeps_what_is_in_use() {
        let src = tempfile::tempdir().expect("tempdir");
        let big: Vec<u8> = (0..9 * 1024 * 1024 + 5).map(|i| (i % 251) as u8).collect();
        fs::create_dir_all(src.path().join("bin")).expect("mkdir");
        fs::write(src.path().join("big.bin"), &big).expect("write");
        fs::write(src.path().join("bin/big"), &big).expect("write");
        fs::set_permissions(
            src.path().join("bin/big"),
            fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        fs::write(src.path().join("small"), "s").expect("write");
        let (store, root) = store_of(src.path());
        let big_digest = Digest::of(&big);

        let data = tempfile::tempdir().expect("tempdir");
        // A budget far below the tree: everything it needs is pinned while it is linked.
        let cache = BlobCache::open(&data.path().join("cache"), 1024).expect("cache");
        let stale = Digest::of(b"stale");
        cache.insert(&stale, b"stale", false).expect("insert");
        let w = data.path().join("w");
        materialise(&store, &cache, Some(root), &w)
            .await
            .expect("materialise");
        assert_eq!(fs::read(w.join("big.bin")).expect("big"), big);
        assert_eq!(fs::read(w.join("bin/big")).expect("bin/big"), big);
        let mode = fs::metadata(w.join("bin/big"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555);
        assert_eq!(fs::read_to_string(w.join("small")).expect("small"), "s");
        assert_eq!(
            store.streamed_reads.lock().expect("lock").clone(),
            vec![big_digest],
            "the large blob is streamed once"
        );
        assert!(!store
            .reads
            .lock()
            .expect("lock")
            .iter()
            .filter(|d| **d != big_digest)
            .any(|d| d.size_bytes() > STREAM_ABOVE_BYTES));
        // The stale blob made room; the tree's own blobs stayed until it was linked.
        assert!(!cache.path(&stale, false).exists());
        // Next materialisation evicts the big ones (now unpinned) once it fetched: the work
        // directory's links still hold the bytes.
        cache.evict_to_budget();
        assert!(cache.bytes() <= 1024, "{}", cache.bytes());
        assert!(!cache.path(&big_digest, false).exists());
        assert_eq!(
            fs::read(w.join("big.bin")).expect("big after eviction"),
            big
        );
    }
}
