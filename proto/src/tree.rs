//! Merkle input trees: canonical Directory messages, their validation, and building one from disk.
use crate::digest::{Digest, DigestError};
use crate::v1;
use prost::Message;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Why a Directory (or a tree of them) is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("{path}: bad name {name:?}: {why}")]
    BadName {
        path: String,
        name: String,
        why: &'static str,
    },
    #[error("{path}: entries not sorted by name: {first:?} before {second:?}")]
    Unsorted {
        path: String,
        first: String,
        second: String,
    },
    #[error("{path}: duplicate name {name:?}")]
    Duplicate { path: String, name: String },
    #[error("{path}: symlink {name:?} -> {target:?} leaves the input root")]
    SymlinkEscapes {
        path: String,
        name: String,
        target: String,
    },
    #[error("{path}: {name:?}: {source}")]
    BadDigest {
        path: String,
        name: String,
        source: DigestError,
    },
    #[error("{path}: directory {digest} is not in the store")]
    MissingDirectory { path: String, digest: Digest },
    #[error("{path}: blob {digest} does not decode as a Directory")]
    NotADirectory { path: String, digest: Digest },
    #[error("input tree is deeper than {0} levels")]
    TooDeep(usize),
}

/// Deepest input tree accepted.
pub const MAX_DEPTH: usize = 128;

/// The canonical bytes of a Directory (its protobuf encoding; prost writes fields in order).
pub fn encode_directory(dir: &v1::Directory) -> Vec<u8> {
    dir.encode_to_vec()
}

/// The digest naming a Directory.
pub fn directory_digest(dir: &v1::Directory) -> Digest {
    Digest::of(&encode_directory(dir))
}

fn check_name(path: &str, name: &str) -> Result<(), TreeError> {
    let why = if name.is_empty() {
        "empty"
    } else if name == "." || name == ".." {
        "is . or .."
    } else if name.contains('/') {
        "contains /"
    } else if name.contains('\0') {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(TreeError::BadName {
        path: path.to_string(),
        name: name.chars().take(200).collect(),
        why,
    })
}

/// Checks one Directory found at `path` (`depth` levels below the root): names, order,
/// duplicates, digests, and that no symlink leaves the root.
pub fn validate_directory(path: &str, depth: usize, dir: &v1::Directory) -> Result<(), TreeError> {
    let mut seen = HashSet::new();
    fn sorted<'a>(path: &str, names: impl Iterator<Item = &'a str>) -> Result<(), TreeError> {
        let mut prev: Option<&str> = None;
        for n in names {
            if let Some(p) = prev {
                if p >= n {
                    return Err(TreeError::Unsorted {
                        path: path.into(),
                        first: p.into(),
                        second: n.into(),
                    });
                }
            }
            prev = Some(n);
        }
        Ok(())
    }
    for (name, digest) in dir
        .files
        .iter()
        .map(|f| (&f.name, f.digest.as_ref()))
        .chain(dir.directories.iter().map(|d| (&d.name, d.digest.as_ref())))
    {
        check_name(path, name)?;
        Digest::from_proto_required(digest).map_err(|source| TreeError::BadDigest {
            path: path.into(),
            name: name.clone(),
            source,
        })?;
    }
    for s in &dir.symlinks {
        check_name(path, &s.name)?;
        if symlink_escapes(depth, &s.target) {
            return Err(TreeError::SymlinkEscapes {
                path: path.into(),
                name: s.name.clone(),
                target: s.target.chars().take(200).collect(),
            });
        }
    }
    sorted(path, dir.files.iter().map(|f| f.name.as_str()))?;
    sorted(path, dir.directories.iter().map(|f| f.name.as_str()))?;
    sorted(path, dir.symlinks.iter().map(|f| f.name.as_str()))?;
    let all = dir
        .files
        .iter()
        .map(|f| &f.name)
        .chain(dir.directories.iter().map(|d| &d.name))
        .chain(dir.symlinks.iter().map(|s| &s.name));
    for n in all {
        if !seen.insert(n) {
            return Err(TreeError::Duplicate {
                path: path.into(),
                name: n.clone(),
            });
        }
    }
    Ok(())
}

/// Whether a symlink target, in a directory `depth` levels below the root, points outside it.
pub fn symlink_escapes(depth: usize, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return true;
    }
    let mut level = depth as i64;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                level -= 1;
                if level < 0 {
                    return true;
                }
            }
            _ => level += 1,
        }
    }
    false
}

/// Walks a whole tree from `root`, fetching Directory bytes with `get`, validating each.
/// Returns every directory (by digest) and every file digest it names.
pub fn walk_tree(
    root: Digest,
    mut get: impl FnMut(&Digest) -> Option<Vec<u8>>,
) -> Result<(HashMap<Digest, v1::Directory>, HashSet<Digest>), TreeError> {
    let mut dirs = HashMap::new();
    let mut files = HashSet::new();
    let mut stack = vec![(root, String::from("."), 0usize)];
    while let Some((digest, path, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            return Err(TreeError::TooDeep(MAX_DEPTH));
        }
        if dirs.contains_key(&digest) {
            continue;
        }
        let bytes = get(&digest).ok_or(TreeError::MissingDirectory {
            path: path.clone(),
            digest,
        })?;
        let dir =
            v1::Directory::decode(bytes.as_slice()).map_err(|_| TreeError::NotADirectory {
                path: path.clone(),
                digest,
            })?;
        if encode_directory(&dir) != bytes {
            return Err(TreeError::NotADirectory { path, digest });
        }
        validate_directory(&path, depth, &dir)?;
        for f in &dir.files {
            files.insert(
                Digest::from_proto_required(f.digest.as_ref()).map_err(|source| {
                    TreeError::BadDigest {
                        path: path.clone(),
                        name: f.name.clone(),
                        source,
                    }
                })?,
            );
        }
        for d in &dir.directories {
            let child = Digest::from_proto_required(d.digest.as_ref()).map_err(|source| {
                TreeError::BadDigest {
                    path: path.clone(),
                    name: d.name.clone(),
                    source,
                }
            })?;
            stack.push((child, format!("{path}/{}", d.name), depth + 1));
        }
        dirs.insert(digest, dir);
    }
    Ok((dirs, files))
}

/// An input tree built from a local directory, ready to upload.
#[derive(Debug, Default)]
pub struct LocalTree {
    /// Digest of the root Directory.
    pub root: Digest,
    /// Encoded Directory messages by digest.
    pub directories: HashMap<Digest, Vec<u8>>,
    /// One local path for each file blob.
    pub files: HashMap<Digest, PathBuf>,
    /// What the walk found, counting files with equal contents once each.
    pub stats: TreeStats,
}

/// Counts of what a tree was built from.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeStats {
    /// Regular files, each path counted.
    pub files: u64,
    /// Their bytes, each path counted.
    pub file_bytes: u64,
    /// Directories, the root included.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest::empty()
    }
}

impl LocalTree {
    /// Several trees as one, for a single FindMissing and upload; the root is the last tree's.
    pub fn merge<'a>(trees: impl IntoIterator<Item = &'a LocalTree>) -> LocalTree {
        let mut all = LocalTree::default();
        for t in trees {
            all.directories
                .extend(t.directories.iter().map(|(d, b)| (*d, b.clone())));
            all.files
                .extend(t.files.iter().map(|(d, p)| (*d, p.clone())));
            all.stats.files += t.stats.files;
            all.stats.file_bytes += t.stats.file_bytes;
            all.stats.directories += t.stats.directories;
            all.stats.symlinks += t.stats.symlinks;
            all.root = t.root;
        }
        all
    }

    /// Every digest the tree names, directories and files.
    pub fn all_digests(&self) -> Vec<Digest> {
        self.directories
            .keys()
            .chain(self.files.keys())
            .copied()
            .collect()
    }
    /// Bytes of one blob of the tree.
    pub fn read_blob(&self, d: &Digest) -> std::io::Result<Vec<u8>> {
        if let Some(b) = self.directories.get(d) {
            return Ok(b.clone());
        }
        match self.files.get(d) {
            Some(p) => std::fs::read(p),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{d} is not in the tree"),
            )),
        }
    }
}

/// Files up to this size are read into memory and hashed on the calling thread; bigger ones
/// are memory-mapped and hashed by blake3's own rayon tasks as well.
pub const SMALL_FILE_BYTES: u64 = 1 << 20;

/// Hashes a file with blake3; returns its digest and whether it has an executable bit. The
/// size is the count of bytes hashed, so a file that grows meanwhile still gets a true digest.
pub fn hash_file_with_mode(path: &Path) -> std::io::Result<(Digest, bool)> {
    hash_file_with_metadata(path).map(|(d, meta)| (d, is_executable(&meta)))
}

/// Whether any executable bit is set.
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

/// Hashes a file with blake3; returns its digest and the metadata of the opened file as it was
/// before its bytes were read.
fn hash_file_with_metadata(path: &Path) -> std::io::Result<(Digest, std::fs::Metadata)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let digest = if meta.len() <= SMALL_FILE_BYTES {
        let mut buf = Vec::with_capacity(meta.len() as usize + 1);
        file.read_to_end(&mut buf)?;
        Digest::of(&buf)
    } else {
        drop(file);
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap_rayon(path)?;
        Digest::from_hasher(&hasher, hasher.count())
    };
    Ok((digest, meta))
}

/// File digests remembered between runs and keyed by file metadata — a client's digest cache,
/// as Bazel and ccache keep one — so that building the tree of an unchanged directory again
/// reads metadata instead of bytes. [`build_tree_remembering`] asks it before hashing a file
/// and tells it every digest the tree uses. Paths are relative to the tree's root.
pub trait DigestMemo: Sync {
    /// The digest of the regular file at `rel`, if one was remembered for exactly the
    /// metadata `meta` (from `lstat`).
    fn recall(&self, rel: &Path, meta: &std::fs::Metadata) -> Option<Digest>;
    /// The file at `rel` had `digest` while its metadata was `meta`: from `lstat` for a
    /// recalled digest, from the open file before its bytes were read for a fresh one.
    fn remember(&self, rel: &Path, meta: &std::fs::Metadata, digest: Digest);
}

/// The digest and executable bit of the file at `path`, `rel` below the root: recalled from
/// `memo` when it knows the file's metadata, else hashed (and remembered).
fn hash_remembering(
    path: &Path,
    rel: &Path,
    memo: &dyn DigestMemo,
) -> std::io::Result<(Digest, bool)> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_file() {
        if let Some(d) = memo.recall(rel, &meta) {
            memo.remember(rel, &meta, d);
            return Ok((d, is_executable(&meta)));
        }
    }
    let (d, meta) = hash_file_with_metadata(path)?;
    // A file that changed size while it was read is not remembered.
    if d.size_bytes() == meta.len() {
        memo.remember(rel, &meta, d);
    }
    Ok((d, is_executable(&meta)))
}

/// Hashes a file with blake3.
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    hash_file_with_mode(path).map(|(d, _)| d)
}

/// How a directory is turned into a tree.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    /// Leave out what `.farmignore` files (gitignore syntax; one in any directory applies to
    /// that directory and below) name. Clients want this for input trees; the agent does not
    /// for the outputs it uploads.
    pub honour_farmignore: bool,
}

/// The ignore-file name clients honour in their input trees.
pub const FARMIGNORE: &str = ".farmignore";

/// One entry the walk found below the root.
enum Found {
    Dir,
    File,
    Symlink(String),
}

/// Walks `root` (a symlink as the root itself is followed): `.git` is always skipped, and with
/// `honour_farmignore` what `.farmignore` names; nothing else (hidden files, .gitignore) is.
/// Returns each entry's path with what it is, parents before children. Special files (fifos,
/// sockets, devices) are left out.
fn walk_local(root: &Path, options: &BuildOptions) -> anyhow::Result<Vec<(PathBuf, Found)>> {
    use anyhow::Context;
    let mut builder = ignore::WalkBuilder::new(root);
    builder
        .standard_filters(false)
        .follow_links(false)
        .filter_entry(|e| e.file_name() != ".git");
    if options.honour_farmignore {
        builder.add_custom_ignore_filename(FARMIGNORE);
    }
    let mut found = Vec::new();
    for entry in builder.build() {
        let entry = entry.with_context(|| format!("failed to walk {}", root.display()))?;
        if let Some(e) = entry.error() {
            anyhow::bail!(
                "failed to read an ignore file under {}: {e}",
                root.display()
            );
        }
        if entry.depth() == 0 {
            continue;
        }
        let path = entry.path();
        let Some(ft) = entry.file_type() else {
            continue;
        };
        let what = if ft.is_dir() {
            Found::Dir
        } else if ft.is_symlink() {
            let target = std::fs::read_link(path)
                .with_context(|| format!("failed to read link {}", path.display()))?;
            let target = target
                .to_str()
                .with_context(|| format!("link target of {} is not UTF-8", path.display()))?;
            Found::Symlink(target.to_string())
        } else if ft.is_file() {
            Found::File
        } else {
            continue;
        };
        found.push((entry.into_path(), what));
    }
    Ok(found)
}

/// The root to walk: `root` itself, or what it points to when it is a symlink.
fn resolve_root(root: &Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let meta = std::fs::symlink_metadata(root)
        .with_context(|| format!("failed to read {}", root.display()))?;
    let resolved = if meta.file_type().is_symlink() {
        std::fs::canonicalize(root)
            .with_context(|| format!("failed to resolve the symlink {}", root.display()))?
    } else {
        root.to_path_buf()
    };
    anyhow::ensure!(
        resolved.is_dir(),
        "{} is not a directory",
        resolved.display()
    );
    Ok(resolved)
}

/// The regular files a tree of `root` would hold, each path once, in walk order.
pub fn list_files(root: &Path, options: &BuildOptions) -> anyhow::Result<Vec<PathBuf>> {
    let root = resolve_root(root)?;
    Ok(walk_local(&root, options)?
        .into_iter()
        .filter(|(_, f)| matches!(f, Found::File))
        .map(|(p, _)| p)
        .collect())
}

/// Builds the Merkle tree of `root` without ignore files: skips `.git`, follows no symlink
/// (they are recorded as symlinks), hashes files in parallel. The agent uses it for outputs.
pub fn build_local_tree(root: &Path) -> anyhow::Result<LocalTree> {
    build_tree(root, &BuildOptions::default())
}

/// Builds a client's input tree: like [`build_local_tree`], but honouring `.farmignore`.
pub fn build_input_tree(root: &Path) -> anyhow::Result<LocalTree> {
    build_tree(
        root,
        &BuildOptions {
            honour_farmignore: true,
        },
    )
}

/// Builds the Merkle tree of `root` (a symlink as the root is followed; below it no symlink
/// is): lists the entries, hashes the files in parallel on the current rayon pool, then encodes
/// the Directory messages bottom-up.
pub fn build_tree(root: &Path, options: &BuildOptions) -> anyhow::Result<LocalTree> {
    build_tree_reporting(root, options, &|_| {})
}

/// [`build_tree`], calling `on_file` with each file's digest as soon as it is hashed (from the
/// hashing threads, in no particular order, once per path): a client can ask the CAS about
/// those while the rest is still being hashed.
pub fn build_tree_reporting(
    root: &Path,
    options: &BuildOptions,
    on_file: &(dyn Fn(Digest) + Sync),
) -> anyhow::Result<LocalTree> {
    build_tree_remembering(root, options, None, on_file)
}

/// [`build_tree_reporting`] with a digest memo: a file whose metadata `memo` recognises is not
/// read at all.
pub fn build_tree_remembering(
    root: &Path,
    options: &BuildOptions,
    memo: Option<&dyn DigestMemo>,
    on_file: &(dyn Fn(Digest) + Sync),
) -> anyhow::Result<LocalTree> {
    use anyhow::Context;
    #[derive(Default)]
    struct Node {
        files: BTreeMap<String, usize>,
        dirs: BTreeMap<String, PathBuf>,
        links: BTreeMap<String, String>,
    }
    let root = resolve_root(root)?;
    // First pass: list everything.
    let mut nodes: HashMap<PathBuf, Node> = HashMap::new();
    nodes.insert(root.clone(), Node::default());
    let mut file_paths: Vec<PathBuf> = Vec::new();
    let mut stats = TreeStats {
        directories: 1,
        ..TreeStats::default()
    };
    for (path, what) in walk_local(&root, options)? {
        let parent = path.parent().unwrap_or(&root).to_path_buf();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{} is not valid UTF-8", path.display()))?
            .to_string();
        let node = nodes.entry(parent).or_default();
        match what {
            Found::Dir => {
                node.dirs.insert(name, path.clone());
                nodes.entry(path).or_default();
                stats.directories += 1;
            }
            Found::Symlink(target) => {
                node.links.insert(name, target);
                stats.symlinks += 1;
            }
            Found::File => {
                node.files.insert(name, file_paths.len());
                file_paths.push(path);
            }
        }
    }
    // Second pass: hash every file in parallel.
    let hashed: Vec<(Digest, bool)> = file_paths
        .par_iter()
        .map(|p| {
            let hashed = match memo {
                Some(memo) => hash_remembering(p, p.strip_prefix(&root).unwrap_or(p), memo),
                None => hash_file_with_mode(p),
            }
            .with_context(|| format!("failed to hash {}", p.display()))?;
            on_file(hashed.0);
            Ok(hashed)
        })
        .collect::<anyhow::Result<_>>()?;
    stats.files = hashed.len() as u64;
    stats.file_bytes = hashed.iter().map(|(d, _)| d.size_bytes()).sum();
    // Third pass: build directories bottom-up (deepest paths first).
    let mut tree = LocalTree {
        stats,
        ..LocalTree::default()
    };
    let mut dir_digests: HashMap<PathBuf, Digest> = HashMap::new();
    let mut paths: Vec<&PathBuf> = nodes.keys().collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in paths {
        let node = &nodes[path];
        let mut dir = v1::Directory::default();
        for (name, &i) in &node.files {
            let (d, exec) = hashed[i];
            tree.files.entry(d).or_insert_with(|| file_paths[i].clone());
            dir.files.push(v1::FileNode {
                name: name.clone(),
                digest: Some(d.to_proto()),
                executable: exec,
            });
        }
        for (name, p) in &node.dirs {
            dir.directories.push(v1::DirectoryNode {
                name: name.clone(),
                digest: Some(dir_digests[p].to_proto()),
            });
        }
        for (name, target) in &node.links {
            dir.symlinks.push(v1::SymlinkNode {
                name: name.clone(),
                target: target.clone(),
            });
        }
        let bytes = encode_directory(&dir);
        let d = Digest::of(&bytes);
        tree.directories.insert(d, bytes);
        dir_digests.insert(path.clone(), d);
    }
    tree.root = dir_digests[&root];
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> v1::FileNode {
        v1::FileNode {
            name: name.into(),
            digest: Some(Digest::of(name.as_bytes()).to_proto()),
            executable: false,
        }
    }

    #[test]
    fn validation_rejects_each_kind_of_bad_directory() {
        let cases: Vec<(&str, v1::Directory, &str)> = vec![
            (
                "empty name",
                v1::Directory {
                    files: vec![file("")],
                    ..Default::default()
                },
                "empty",
            ),
            (
                "dotdot",
                v1::Directory {
                    files: vec![file("..")],
                    ..Default::default()
                },
                "is . or ..",
            ),
            (
                "slash",
                v1::Directory {
                    files: vec![file("a/b")],
                    ..Default::default()
                },
                "contains /",
            ),
            (
                "unsorted",
                v1::Directory {
                    files: vec![file("b"), file("a")],
                    ..Default::default()
                },
                "not sorted",
            ),
            (
                "duplicate across lists",
                v1::Directory {
                    files: vec![file("a")],
                    symlinks: vec![v1::SymlinkNode {
                        name: "a".into(),
                        target: "b".into(),
                    }],
                    ..Default::default()
                },
                "duplicate",
            ),
            (
                "escaping symlink",
                v1::Directory {
                    symlinks: vec![v1::SymlinkNode {
                        name: "l".into(),
                        target: "../x".into(),
                    }],
                    ..Default::default()
                },
                "leaves the input root",
            ),
            (
                "absolute symlink",
                v1::Directory {
                    symlinks: vec![v1::SymlinkNode {
                        name: "l".into(),
                        target: "/etc/passwd".into(),
                    }],
                    ..Default::default()
                },
                "leaves the input root",
            ),
        ];
        for (what, dir, expect) in cases {
            let e = validate_directory(".", 0, &dir)
                .expect_err(what)
                .to_string();
            assert!(e.contains(expect), "{what}: {e}");
        }
    }

    #[test]
    fn symlinks_may_climb_only_as_deep_as_they_are() {
        assert!(!symlink_escapes(1, "../sibling"));
        assert!(symlink_escapes(1, "../../out"));
        assert!(!symlink_escapes(0, "a/../b"));
        assert!(symlink_escapes(0, "a/../../b"));
    }

    #[test]
    fn builds_the_same_root_for_the_same_content() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for root in [a.path(), b.path()] {
            std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
            std::fs::write(root.join("x"), "1").unwrap();
            std::fs::write(root.join("sub/deeper/y"), "2").unwrap();
            std::fs::create_dir_all(root.join(".git")).unwrap();
            std::fs::write(root.join(".git/HEAD"), format!("{}", root.display())).unwrap();
        }
        let ta = build_local_tree(a.path()).unwrap();
        let tb = build_local_tree(b.path()).unwrap();
        assert_eq!(ta.root, tb.root);
        assert_eq!(ta.directories.len(), 3);
        let (dirs, files) = walk_tree(ta.root, |d| ta.directories.get(d).cloned()).unwrap();
        assert_eq!((dirs.len(), files.len()), (3, 2));
        std::fs::write(b.path().join("sub/deeper/y"), "3").unwrap();
        assert_ne!(build_local_tree(b.path()).unwrap().root, ta.root);
    }
}

#[cfg(test)]
mod build_tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    /// Paths of the files a tree names, with their digests, by walking its Directory messages.
    fn tree_files(tree: &LocalTree) -> BTreeMap<String, Digest> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(tree.root, String::new())];
        while let Some((d, prefix)) = stack.pop() {
            let dir = v1::Directory::decode(tree.directories[&d].as_slice()).unwrap();
            for f in &dir.files {
                let digest = Digest::from_proto_required(f.digest.as_ref()).unwrap();
                out.insert(format!("{prefix}{}", f.name), digest);
            }
            for s in &dir.directories {
                let digest = Digest::from_proto_required(s.digest.as_ref()).unwrap();
                stack.push((digest, format!("{prefix}{}/", s.name)));
            }
        }
        out
    }

    #[test]
    fn farmignore_leaves_out_what_it_names_and_only_for_input_trees() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, ".farmignore", "*.o\n/build/\n!keep.o\n");
        write(root, "main.go", "package main");
        write(root, "x.o", "object");
        write(root, "keep.o", "kept");
        write(root, "build/out", "artifact");
        write(root, "sub/build/out", "not anchored: kept");
        write(root, "sub/y.o", "object");
        write(root, ".hidden", "hidden files are inputs");
        write(root, ".gitignore", "main.go\n");
        write(root, ".git/config", "never an input");
        let input = build_input_tree(root).unwrap();
        let names: Vec<String> = tree_files(&input).into_keys().collect();
        assert_eq!(
            names,
            [
                ".farmignore",
                ".gitignore",
                ".hidden",
                "keep.o",
                "main.go",
                "sub/build/out"
            ]
        );
        assert_eq!(input.stats.files, 6);
        let everything = build_local_tree(root).unwrap();
        assert_eq!(tree_files(&everything).len(), 10 - 1, "all but .git");
        let listed = list_files(
            root,
            &BuildOptions {
                honour_farmignore: true,
            },
        )
        .unwrap();
        assert_eq!(listed.len(), 6);
    }

    #[test]
    fn a_bad_farmignore_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), ".farmignore", "[z-a]\n");
        write(dir.path(), "a", "x");
        let e = build_input_tree(dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("ignore file"), "{e:#}");
    }

    #[test]
    fn symlinks_stay_symlinks_and_a_symlinked_root_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        write(&real, "bin/tool", "#!/bin/sh\n");
        std::fs::set_permissions(
            real.join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("bin/tool", real.join("tool")).unwrap();
        std::os::unix::fs::symlink("bin", real.join("bindir")).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let via_link = build_input_tree(&link).unwrap();
        let direct = build_input_tree(&real).unwrap();
        assert_eq!(via_link.root, direct.root);
        let root = v1::Directory::decode(direct.directories[&direct.root].as_slice()).unwrap();
        let links: Vec<(&str, &str)> = root
            .symlinks
            .iter()
            .map(|s| (s.name.as_str(), s.target.as_str()))
            .collect();
        assert_eq!(links, [("bindir", "bin"), ("tool", "bin/tool")]);
        assert_eq!(direct.stats.symlinks, 2);
        let bin_digest = Digest::from_proto_required(root.directories[0].digest.as_ref()).unwrap();
        let bin = v1::Directory::decode(direct.directories[&bin_digest].as_slice()).unwrap();
        assert!(bin.files[0].executable);
    }

    #[test]
    fn big_files_hash_like_small_ones() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3 * SMALL_FILE_BYTES + 17)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let p = dir.path().join("big");
        std::fs::write(&p, &data).unwrap();
        assert_eq!(hash_file(&p).unwrap(), Digest::of(&data));
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_.-]{1,8}".prop_filter("not . or ..", |n| n != "." && n != "..")
    }

    fn digest() -> impl Strategy<Value = v1::Digest> {
        (any::<[u8; 32]>(), any::<u64>()).prop_map(|(h, s)| Digest::from_parts(h, s).to_proto())
    }

    /// A valid Directory: unique sorted names spread over the three lists.
    fn directory() -> impl Strategy<Value = v1::Directory> {
        proptest::collection::btree_set(name(), 0..24).prop_flat_map(|names| {
            let names: Vec<String> = names.into_iter().collect();
            let n = names.len();
            (
                Just(names),
                proptest::collection::vec(0u8..3, n),
                proptest::collection::vec(digest(), n),
                proptest::collection::vec(any::<bool>(), n),
                proptest::collection::vec("[a-z]{1,4}(/[a-z]{1,4}){0,2}", n),
            )
                .prop_map(|(names, kinds, digests, execs, targets)| {
                    let mut dir = v1::Directory::default();
                    for (i, name) in names.into_iter().enumerate() {
                        match kinds[i] {
                            0 => dir.files.push(v1::FileNode {
                                name,
                                digest: Some(digests[i].clone()),
                                executable: execs[i],
                            }),
                            1 => dir.directories.push(v1::DirectoryNode {
                                name,
                                digest: Some(digests[i].clone()),
                            }),
                            _ => dir.symlinks.push(v1::SymlinkNode {
                                name,
                                target: targets[i].clone(),
                            }),
                        }
                    }
                    dir
                })
        })
    }

    /// Files of a small tree: relative path -> (contents, executable). Paths never make a file
    /// and a directory of the same name.
    fn file_set() -> impl Strategy<Value = BTreeMap<String, (Vec<u8>, bool)>> {
        let path = proptest::collection::vec("[a-c]{1,2}", 1..4).prop_map(|parts| {
            // Directories get a "d" prefix, files an "f" prefix: no clashes between the two.
            let (file, dirs) = parts.split_last().expect("at least one part");
            let mut p: Vec<String> = dirs.iter().map(|d| format!("d{d}")).collect();
            p.push(format!("f{file}"));
            p.join("/")
        });
        proptest::collection::btree_map(
            path,
            (proptest::collection::vec(any::<u8>(), 0..64), any::<bool>()),
            1..16,
        )
    }

    fn create(root: &Path, files: &[(String, (Vec<u8>, bool))]) {
        for (rel, (data, exec)) in files {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
            let mode = if *exec { 0o755 } else { 0o644 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    fn build_with_threads(root: &Path, threads: usize) -> LocalTree {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| build_input_tree(root))
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_canonical_encoding_round_trips(dir in directory()) {
            validate_directory(".", 0, &dir).unwrap();
            let bytes = encode_directory(&dir);
            let decoded = v1::Directory::decode(bytes.as_slice()).unwrap();
            prop_assert_eq!(&decoded, &dir);
            prop_assert_eq!(encode_directory(&decoded), bytes);
            prop_assert_eq!(directory_digest(&decoded), directory_digest(&dir));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn the_same_files_give_the_same_root_whatever_the_order_and_threads(
            (files, shuffled) in file_set().prop_flat_map(|f| {
                let v: Vec<(String, (Vec<u8>, bool))> = f.clone().into_iter().collect();
                (Just(f), Just(v).prop_shuffle())
            })
        ) {
            let a = tempfile::tempdir().unwrap();
            let b = tempfile::tempdir().unwrap();
            let in_order: Vec<(String, (Vec<u8>, bool))> = files.clone().into_iter().collect();
            create(a.path(), &in_order);
            create(b.path(), &shuffled);
            let ta = build_with_threads(a.path(), 1);
            let tb = build_with_threads(b.path(), 3);
            prop_assert_eq!(ta.root, tb.root);
            // The tree names exactly the files written, with their contents' digests.
            let want: BTreeMap<String, Digest> = files
                .iter()
                .map(|(p, (data, _))| (p.clone(), Digest::of(data)))
                .collect();
            prop_assert_eq!(tree_files(&ta), want.clone());
            let (dirs, found) = walk_tree(ta.root, |d| ta.directories.get(d).cloned()).unwrap();
            let want_digests: HashSet<Digest> = want.values().copied().collect();
            prop_assert_eq!(&found, &want_digests);
            let file_keys: HashSet<Digest> = ta.files.keys().copied().collect();
            prop_assert_eq!(&file_keys, &want_digests);
            prop_assert_eq!(dirs.len(), ta.directories.len());
            prop_assert_eq!(ta.stats.files, files.len() as u64);
        }
    }
}
