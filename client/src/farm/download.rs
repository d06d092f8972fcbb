//! `farm run --download DIR`: brings the declared outputs of succeeded actions home, into
//! `DIR/<os>/<arch>[/<variant>]/<path>`. Files come back with their executable bit; output
//! directories are rebuilt from their Directory trees (files, subdirectories, symlinks), each
//! Directory checked like the coordinator checks input trees. Every blob is verified against
//! its digest before it is written under its final name.
use super::blobs::{
    batch_read, plan_batches, read_blob, read_to_file, write_new_file, MAX_BATCH_BLOB_BYTES,
};
use super::FarmClient;
use anyhow::{bail, Context};
use archfarm_proto::tree::{encode_directory, validate_directory, MAX_DEPTH};
use archfarm_proto::v1::{self, ActionState, ActionStatus};
use archfarm_proto::{Digest, Platform};
use indicatif::ProgressBar;
use prost::Message;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Checks a declared output path (`--output`, or one an action reported) and returns it in
/// its one spelling: relative, `/`-separated, no empty, `.` or `..` component (a trailing `/`
/// is dropped).
pub fn normalize_output_path(path: &str) -> anyhow::Result<String> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    if trimmed.is_empty() {
        bail!("output path {path:?} is empty");
    }
    if trimmed.starts_with('/') {
        bail!("output path {path:?} must be relative to the working directory");
    }
    for part in trimmed.split('/') {
        match part {
            "" => bail!("output path {path:?} has an empty component"),
            "." | ".." => bail!("output path {path:?} must not contain {part:?}"),
            p if p.contains('\0') => bail!("output path {path:?} contains NUL"),
            _ => {}
        }
    }
    Ok(trimmed.to_string())
}

/// The output paths of a job: each checked, sorted and without duplicates.
pub fn output_paths(paths: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = paths
        .iter()
        .map(|p| normalize_output_path(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// The directory of a platform's downloads: `DIR/<os>/<arch>[/<variant>]`.
pub fn platform_dir(dir: &Path, platform: &str) -> anyhow::Result<PathBuf> {
    let p: Platform = platform
        .parse()
        .with_context(|| format!("failed to place the outputs of platform {platform:?}"))?;
    let mut out = dir.join(p.os()).join(p.arch());
    if let Some(variant) = p.variant() {
        out.push(variant);
    }
    Ok(out)
}

/// Where an output lands: `DIR/<os>/<arch>[/<variant>]/<path>`.
pub fn download_destination(dir: &Path, platform: &str, path: &str) -> anyhow::Result<PathBuf> {
    let rel = normalize_output_path(path)?;
    let mut out = platform_dir(dir, platform)?;
    out.extend(rel.split('/'));
    Ok(out)
}

/// What one output download did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownloadedOutput {
    /// The action's platform.
    pub platform: String,
    /// The output path as declared.
    pub path: String,
    /// `file` or `directory`.
    pub kind: &'static str,
    /// Where it was written.
    pub destination: PathBuf,
    /// Files written (1 for a file output).
    pub files: u64,
    /// Bytes of those files.
    pub bytes: u64,
}

impl DownloadedOutput {
    /// `{"platform", "path", "kind", "destination", "files", "bytes"}`.
    pub fn to_json(&self) -> Value {
        json!({
            "platform": self.platform,
            "path": self.path,
            "kind": self.kind,
            "destination": self.destination.display().to_string(),
            "files": self.files,
            "bytes": self.bytes,
        })
    }
}

/// Downloads the outputs of every succeeded action into `dir`.
pub async fn download_outputs(
    client: &mut FarmClient,
    actions: &[&ActionStatus],
    dir: &Path,
) -> anyhow::Result<Vec<DownloadedOutput>> {
    let mut done = Vec::new();
    for a in actions {
        if a.state() != ActionState::Succeeded {
            continue;
        }
        let Some(result) = &a.result else { continue };
        for f in &result.output_files {
            let dest = download_destination(dir, &a.platform, &f.path)?;
            let digest = Digest::from_proto_required(f.digest.as_ref())
                .with_context(|| format!("[{}] output {}: bad digest", a.platform, f.path))?;
            prepare_destination(&dest)?;
            fetch_files(client, &[(dest.clone(), digest, f.executable)])
                .await
                .with_context(|| format!("failed to download [{}] {}", a.platform, f.path))?;
            done.push(DownloadedOutput {
                platform: a.platform.clone(),
                path: f.path.clone(),
                kind: "file",
                destination: dest,
                files: 1,
                bytes: digest.size_bytes(),
            });
        }
        for d in &result.output_directories {
            let dest = download_destination(dir, &a.platform, &d.path)?;
            let root = Digest::from_proto_required(d.root.as_ref())
                .with_context(|| format!("[{}] output {}: bad digest", a.platform, d.path))?;
            let (files, bytes) = download_directory(client, root, &dest)
                .await
                .with_context(|| format!("failed to download [{}] {}/", a.platform, d.path))?;
            done.push(DownloadedOutput {
                platform: a.platform.clone(),
                path: d.path.clone(),
                kind: "directory",
                destination: dest,
                files,
                bytes,
            });
        }
    }
    Ok(done)
}

/// Makes room for a fresh output at `dest`: its parent exists, and whatever was there before
/// (an older download) is gone. A symlink is removed, never followed.
fn prepare_destination(dest: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create {}", parent.display()))?;
    }
    match std::fs::symlink_metadata(dest) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(dest)
            .with_context(|| format!("failed to remove the old {}", dest.display())),
        Ok(_) => std::fs::remove_file(dest)
            .with_context(|| format!("failed to remove the old {}", dest.display())),
        Err(_) => Ok(()),
    }
}

/// The entries of a downloaded directory tree, relative to its root.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TreeListing {
    /// Directories below the root, parents first.
    pub directories: Vec<String>,
    /// Files: path, digest, executable.
    pub files: Vec<(String, Digest, bool)>,
    /// Symlinks: path, target.
    pub symlinks: Vec<(String, String)>,
}

/// Lists a tree from its Directory messages, checking each (canonical encoding, names, order,
/// no symlink leaving the tree's root).
pub fn list_tree(
    root: Digest,
    directories: &BTreeMap<Digest, v1::Directory>,
) -> anyhow::Result<TreeListing> {
    let mut listing = TreeListing::default();
    let mut stack = vec![(root, String::new(), 0usize)];
    while let Some((digest, prefix, depth)) = stack.pop() {
        if depth > MAX_DEPTH {
            bail!("the tree is deeper than {MAX_DEPTH} levels");
        }
        let dir = directories
            .get(&digest)
            .with_context(|| format!("directory {digest} was not fetched"))?;
        let shown = if prefix.is_empty() { "." } else { &prefix };
        validate_directory(shown.trim_end_matches('/'), depth, dir)?;
        for f in &dir.files {
            let d = Digest::from_proto_required(f.digest.as_ref())?;
            listing
                .files
                .push((format!("{prefix}{}", f.name), d, f.executable));
        }
        for s in &dir.symlinks {
            listing
                .symlinks
                .push((format!("{prefix}{}", s.name), s.target.clone()));
        }
        // Reversed so that the stack yields subdirectories in name order.
        for d in dir.directories.iter().rev() {
            let child = Digest::from_proto_required(d.digest.as_ref())?;
            let path = format!("{prefix}{}", d.name);
            listing.directories.push(path.clone());
            stack.push((child, format!("{path}/"), depth + 1));
        }
    }
    Ok(listing)
}

/// Fetches every Directory of the tree under `root`, level by level, checking each blob's
/// digest and that it is in canonical form.
async fn fetch_directories(
    client: &mut FarmClient,
    root: Digest,
) -> anyhow::Result<BTreeMap<Digest, v1::Directory>> {
    let mut dirs: BTreeMap<Digest, v1::Directory> = BTreeMap::new();
    let mut level = vec![root];
    let mut depth = 0;
    while !level.is_empty() {
        if depth > MAX_DEPTH {
            bail!("the tree is deeper than {MAX_DEPTH} levels");
        }
        level.sort();
        level.dedup();
        level.retain(|d| !dirs.contains_key(d));
        let mut fetched: Vec<(Digest, Vec<u8>)> = Vec::new();
        let (small, big): (Vec<Digest>, Vec<Digest>) = level
            .iter()
            .partition(|d| d.size_bytes() <= MAX_BATCH_BLOB_BYTES);
        for batch in plan_batches(&small) {
            let blobs = batch_read(client, &batch).await?;
            fetched.extend(batch.into_iter().zip(blobs));
        }
        for d in big {
            fetched.push((d, read_blob(client, d).await?));
        }
        let mut next = Vec::new();
        for (digest, bytes) in fetched {
            let dir = v1::Directory::decode(bytes.as_slice())
                .with_context(|| format!("blob {digest} is not a Directory"))?;
            if encode_directory(&dir) != bytes {
                bail!("Directory {digest} is not in canonical form");
            }
            for sub in &dir.directories {
                next.push(Digest::from_proto_required(sub.digest.as_ref())?);
            }
            dirs.insert(digest, dir);
        }
        level = next;
        depth += 1;
    }
    Ok(dirs)
}

/// Rebuilds the tree `root` at `dest` (replacing what was there); returns files and bytes
/// written.
async fn download_directory(
    client: &mut FarmClient,
    root: Digest,
    dest: &Path,
) -> anyhow::Result<(u64, u64)> {
    let dirs = fetch_directories(client, root).await?;
    let listing = list_tree(root, &dirs)?;
    prepare_destination(dest)?;
    std::fs::create_dir(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    for d in &listing.directories {
        let p = join_rel(dest, d);
        std::fs::create_dir(&p).with_context(|| format!("failed to create {}", p.display()))?;
    }
    let files: Vec<(PathBuf, Digest, bool)> = listing
        .files
        .iter()
        .map(|(rel, d, exec)| (join_rel(dest, rel), *d, *exec))
        .collect();
    fetch_files(client, &files).await?;
    // Symlinks last: no file is ever written through one.
    for (rel, target) in &listing.symlinks {
        let p = join_rel(dest, rel);
        std::os::unix::fs::symlink(target, &p)
            .with_context(|| format!("failed to create the symlink {}", p.display()))?;
    }
    let bytes = listing.files.iter().map(|(_, d, _)| d.size_bytes()).sum();
    Ok((listing.files.len() as u64, bytes))
}

fn join_rel(base: &Path, rel: &str) -> PathBuf {
    let mut p = base.to_path_buf();
    p.extend(rel.split('/'));
    p
}

/// Writes files from the CAS: each distinct blob is fetched once (BatchRead in batches when
/// small, Cas.Read into the file when big) and written to every path that holds it.
async fn fetch_files(
    client: &mut FarmClient,
    files: &[(PathBuf, Digest, bool)],
) -> anyhow::Result<()> {
    let mut by_digest: BTreeMap<Digest, Vec<(&Path, bool)>> = BTreeMap::new();
    for (path, d, exec) in files {
        by_digest.entry(*d).or_default().push((path, *exec));
    }
    let (small, big): (Vec<Digest>, Vec<Digest>) = by_digest
        .keys()
        .partition(|d| d.size_bytes() <= MAX_BATCH_BLOB_BYTES);
    for batch in plan_batches(&small) {
        let blobs = batch_read(client, &batch).await?;
        for (d, data) in batch.iter().zip(blobs) {
            for (path, exec) in &by_digest[d] {
                write_new_file(path, &data, *exec)?;
            }
        }
    }
    for d in big {
        let targets = &by_digest[&d];
        let (first, exec) = targets[0];
        read_to_file(client, d, first, exec, &ProgressBar::hidden()).await?;
        for (path, exec) in &targets[1..] {
            std::fs::copy(first, path).with_context(|| {
                format!("failed to copy {} to {}", first.display(), path.display())
            })?;
            super::blobs::set_mode(path, *exec)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_land_under_os_arch_and_variant() {
        let dir = Path::new("/dl");
        assert_eq!(
            download_destination(dir, "linux/arm64", "bin/kubectl").unwrap(),
            Path::new("/dl/linux/arm64/bin/kubectl")
        );
        assert_eq!(
            download_destination(dir, "linux/arm/v7", "out/").unwrap(),
            Path::new("/dl/linux/arm/v7/out")
        );
        assert!(download_destination(dir, "linux/mips", "x").is_err());
        for bad in [
            "../x",
            "/etc/passwd",
            "a/../../b",
            "a//b",
            "",
            "./a",
            "a/./b",
        ] {
            assert!(
                download_destination(dir, "linux/amd64", bad).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn output_paths_are_sorted_and_unique() {
        let paths =
            output_paths(&["out/".to_string(), "bin/x".to_string(), "out".to_string()]).unwrap();
        assert_eq!(paths, ["bin/x", "out"]);
        let e = output_paths(&["../up".to_string()]).unwrap_err();
        assert!(e.to_string().contains("must not contain \"..\""), "{e}");
    }

    fn file(name: &str, data: &[u8], exec: bool) -> v1::FileNode {
        v1::FileNode {
            name: name.into(),
            digest: Some(Digest::of(data).to_proto()),
            executable: exec,
        }
    }

    #[test]
    fn trees_list_their_entries_and_refuse_escapes() {
        let sub = v1::Directory {
            files: vec![file("b", b"2", true)],
            symlinks: vec![v1::SymlinkNode {
                name: "up".into(),
                target: "../a".into(),
            }],
            ..Default::default()
        };
        let sub_digest = archfarm_proto::tree::directory_digest(&sub);
        let root = v1::Directory {
            files: vec![file("a", b"1", false)],
            directories: vec![v1::DirectoryNode {
                name: "sub".into(),
                digest: Some(sub_digest.to_proto()),
            }],
            ..Default::default()
        };
        let root_digest = archfarm_proto::tree::directory_digest(&root);
        let mut dirs = BTreeMap::new();
        dirs.insert(root_digest, root.clone());
        dirs.insert(sub_digest, sub);
        let listing = list_tree(root_digest, &dirs).unwrap();
        assert_eq!(listing.directories, ["sub"]);
        assert_eq!(
            listing.files,
            [
                ("a".to_string(), Digest::of(b"1"), false),
                ("sub/b".to_string(), Digest::of(b"2"), true)
            ]
        );
        assert_eq!(
            listing.symlinks,
            [("sub/up".to_string(), "../a".to_string())]
        );
        let escaping = v1::Directory {
            symlinks: vec![v1::SymlinkNode {
                name: "l".into(),
                target: "../outside".into(),
            }],
            ..Default::default()
        };
        let d = archfarm_proto::tree::directory_digest(&escaping);
        let e = list_tree(d, &BTreeMap::from([(d, escaping)])).unwrap_err();
        assert!(e.to_string().contains("leaves the input root"), "{e}");
        assert!(list_tree(Digest::of(b"nothing"), &dirs).is_err());
    }

    #[test]
    fn downloads_json_names_every_field() {
        let d = DownloadedOutput {
            platform: "linux/arm64".into(),
            path: "out".into(),
            kind: "directory",
            destination: PathBuf::from("/dl/linux/arm64/out"),
            files: 3,
            bytes: 12,
        };
        let v = d.to_json();
        assert_eq!(v["kind"], "directory");
        assert_eq!(v["destination"], "/dl/linux/arm64/out");
        assert_eq!(v["files"], 3);
    }
}
