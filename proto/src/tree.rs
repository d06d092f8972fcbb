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
}

impl Default for Digest {
    fn default() -> Self {
        Digest::empty()
    }
}

impl LocalTree {
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

/// Hashes a file with blake3 (memory-mapped reads for large files are blake3's job).
pub fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(path)?;
    let size = std::fs::metadata(path)?.len();
    Ok(Digest::from_hasher(&hasher, size))
}

/// Builds the Merkle tree of `root`: skips `.git`, follows no symlink (they are recorded as
/// symlinks), hashes files in parallel.
pub fn build_local_tree(root: &Path) -> anyhow::Result<LocalTree> {
    use anyhow::Context;
    #[derive(Default)]
    struct Node {
        files: BTreeMap<String, (PathBuf, bool)>,
        dirs: BTreeMap<String, PathBuf>,
        links: BTreeMap<String, String>,
    }
    // First pass: list everything.
    let mut nodes: BTreeMap<PathBuf, Node> = BTreeMap::new();
    nodes.insert(root.to_path_buf(), Node::default());
    let walker = walkdir::WalkDir::new(root)
        .follow_links(false)
        .min_depth(1)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git");
    for entry in walker {
        let entry = entry.with_context(|| format!("failed to walk {}", root.display()))?;
        let path = entry.path().to_path_buf();
        let parent = path.parent().unwrap_or(root).to_path_buf();
        let name = entry
            .file_name()
            .to_str()
            .with_context(|| format!("{} is not valid UTF-8", path.display()))?
            .to_string();
        let ft = entry.file_type();
        let node = nodes.entry(parent).or_default();
        if ft.is_dir() {
            node.dirs.insert(name, path.clone());
            nodes.entry(path).or_default();
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("failed to read link {}", path.display()))?;
            let target = target
                .to_str()
                .with_context(|| format!("link target of {} is not UTF-8", path.display()))?;
            node.links.insert(name, target.to_string());
        } else if ft.is_file() {
            use std::os::unix::fs::PermissionsExt;
            let exec = entry.metadata()?.permissions().mode() & 0o111 != 0;
            node.files.insert(name, (path, exec));
        }
    }
    // Second pass: hash every file in parallel.
    let all_files: Vec<PathBuf> = nodes
        .values()
        .flat_map(|n| n.files.values().map(|(p, _)| p.clone()))
        .collect();
    let hashed: HashMap<PathBuf, Digest> = all_files
        .par_iter()
        .map(|p| {
            hash_file(p)
                .with_context(|| format!("failed to hash {}", p.display()))
                .map(|d| (p.clone(), d))
        })
        .collect::<anyhow::Result<_>>()?;
    // Third pass: build directories bottom-up (deepest paths first).
    let mut tree = LocalTree::default();
    let mut dir_digests: HashMap<PathBuf, Digest> = HashMap::new();
    let mut paths: Vec<&PathBuf> = nodes.keys().collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in paths {
        let node = &nodes[path];
        let mut dir = v1::Directory::default();
        for (name, (p, exec)) in &node.files {
            let d = hashed[p];
            tree.files.entry(d).or_insert_with(|| p.clone());
            dir.files.push(v1::FileNode {
                name: name.clone(),
                digest: Some(d.to_proto()),
                executable: *exec,
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
    tree.root = dir_digests[&root.to_path_buf()];
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
