//! Declared outputs: after a run, finds each of the action's `output_paths` (relative to its
//! working directory) without following any symlink out of the work directory, and describes
//! it as an OutputFile or an OutputDirectory (a Merkle tree) plus the blobs the CAS must hold.
use crate::cas::BlobSource;
use anyhow::Context;
use archfarm_proto::{tree, v1, Digest};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What the declared outputs of one run are, and what must be uploaded for them.
#[derive(Debug, Default)]
pub struct CollectedOutputs {
    /// Declared paths that were regular files.
    pub files: Vec<v1::OutputFile>,
    /// Declared paths that were directories.
    pub directories: Vec<v1::OutputDirectory>,
    /// Every blob they name: file contents (read from the work directory when uploaded) and
    /// encoded Directory messages.
    pub blobs: Vec<(Digest, BlobSource)>,
    /// One line per declared path that was skipped, saying why (for the action's stderr).
    pub notes: Vec<String>,
}

/// Why a declared output path is not acceptable: it must be relative and "/"-separated with
/// no empty, "." or ".." component (the coordinator checks the same).
pub fn check_output_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("the path is empty");
    }
    if path.starts_with('/') {
        return Err("the path is absolute");
    }
    if path.contains('\0') {
        return Err("the path contains NUL");
    }
    for part in path.split('/') {
        match part {
            "" => return Err("the path has an empty component"),
            "." => return Err("the path has a \".\" component"),
            ".." => return Err("the path has a \"..\" component"),
            _ => {}
        }
    }
    Ok(())
}

/// Looks up every declared output under `cwd` (inside `work_dir`), hashing files and building
/// trees. Blocking. A path that does not exist is left out silently; one that cannot be an
/// output (bad spelling, outside the work directory, a device, unreadable) is left out with a
/// note. Fails only when the work directory itself is gone.
pub fn collect(
    work_dir: &Path,
    cwd: &Path,
    output_paths: &[String],
) -> anyhow::Result<CollectedOutputs> {
    let root = work_dir
        .canonicalize()
        .with_context(|| format!("failed to find the work directory {}", work_dir.display()))?;
    let mut out = CollectedOutputs::default();
    let mut seen = HashSet::new();
    for rel in output_paths {
        if !seen.insert(rel.as_str()) {
            continue;
        }
        let skip = |why: String| format!("archfarm: declared output {rel:?} skipped: {why}");
        if let Err(why) = check_output_path(rel) {
            out.notes.push(skip(why.to_string()));
            continue;
        }
        let (path, meta) = match locate(&root, &cwd.join(rel)) {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(why) => {
                out.notes.push(skip(why));
                continue;
            }
        };
        if meta.is_file() {
            match tree::hash_file(&path) {
                Ok(digest) => {
                    out.files.push(v1::OutputFile {
                        path: rel.clone(),
                        digest: Some(digest.to_proto()),
                        executable: meta.permissions().mode() & 0o111 != 0,
                    });
                    out.blobs.push((digest, BlobSource::File(path)));
                }
                Err(e) => out.notes.push(skip(format!("failed to read it: {e}"))),
            }
        } else if meta.is_dir() {
            match tree::build_local_tree(&path) {
                Ok(t) => {
                    out.directories.push(v1::OutputDirectory {
                        path: rel.clone(),
                        root: Some(t.root.to_proto()),
                    });
                    out.blobs.extend(
                        t.directories
                            .into_iter()
                            .map(|(d, bytes)| (d, BlobSource::Memory(bytes.into()))),
                    );
                    out.blobs
                        .extend(t.files.into_iter().map(|(d, p)| (d, BlobSource::File(p))));
                }
                Err(e) => out.notes.push(skip(format!("{e:#}"))),
            }
        } else {
            out.notes
                .push(skip("it is neither a regular file nor a directory".into()));
        }
    }
    Ok(out)
}

/// Finds `path`, which must lie inside `root` (canonical) even after resolving symlinks on
/// the way. A final symlink is followed only to a place inside `root`. `None`: nothing there.
fn locate(root: &Path, path: &Path) -> Result<Option<(PathBuf, fs::Metadata)>, String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(nix::libc::ENOTDIR) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(format!("failed to look at it: {e}")),
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err("it has no parent directory".into());
    };
    let real_parent = parent
        .canonicalize()
        .map_err(|e| format!("failed to resolve its directory: {e}"))?;
    if !real_parent.starts_with(root) {
        return Err(
            "it lies outside the work directory (a directory on the way is a symlink)".into(),
        );
    }
    if !meta.file_type().is_symlink() {
        return Ok(Some((real_parent.join(name), meta)));
    }
    let target = fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let real = match path.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "it is a symlink to {target:?}, which does not exist"
            ))
        }
        Err(e) => return Err(format!("failed to resolve symlink to {target:?}: {e}")),
    };
    if !real.starts_with(root) {
        return Err(format!(
            "it is a symlink to {target:?}, outside the work directory"
        ));
    }
    let meta = fs::metadata(&real).map_err(|e| format!("failed to look at it: {e}"))?;
    Ok(Some((real, meta)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn output_paths_must_be_plain_relative_paths() {
        for ok in ["a", "a/b", "bin/x.tar.gz", "..a/b.."] {
            assert_eq!(check_output_path(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("a/../b", "\"..\""),
            ("..", "\"..\""),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("./a", "\".\""),
            ("a\0b", "NUL"),
        ] {
            let e = check_output_path(bad).expect_err(bad);
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn collects_files_and_trees_and_skips_what_is_not_an_output() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tmp.path().join("outside");
        fs::create_dir_all(outside.join("d")).expect("mkdir");
        fs::write(outside.join("secret"), "secret").expect("write");
        let work = tmp.path().join("work");
        let cwd = work.join("sub");
        fs::create_dir_all(cwd.join("out/nested")).expect("mkdir");
        fs::write(cwd.join("out/nested/a.txt"), "a").expect("write");
        fs::write(cwd.join("out/b.txt"), "b").expect("write");
        symlink("b.txt", cwd.join("out/link")).expect("symlink");
        symlink("../../../outside/secret", cwd.join("out/escaping")).expect("symlink");
        fs::write(cwd.join("tool"), "#!/bin/sh\n").expect("write");
        fs::set_permissions(cwd.join("tool"), fs::Permissions::from_mode(0o755)).expect("chmod");
        symlink("tool", cwd.join("tool-link")).expect("symlink");
        symlink(outside.join("secret"), cwd.join("leak")).expect("symlink");
        symlink(&outside, cwd.join("via")).expect("symlink");
        symlink("nowhere", cwd.join("dangling")).expect("symlink");
        fs::write(work.join("above"), "above").expect("write");

        let declared: Vec<String> = [
            "above",      // not under the working directory: missing
            "dangling",   // symlink to nothing
            "leak",       // symlink out of the work dir
            "missing",    // not there: not listed, no note
            "out",        // a tree (its inner escaping symlink is recorded as a symlink)
            "tool",       // executable file
            "tool-link",  // symlink inside: followed
            "tool/x",     // under a file: missing
            "via/secret", // through a directory symlink out of the work dir
            "../above",   // refused spelling
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = collect(&work, &cwd, &declared).expect("collect");

        let files: Vec<(&str, bool)> = c
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.executable))
            .collect();
        assert_eq!(files, vec![("tool", true), ("tool-link", true)]);
        let tool = Digest::of(b"#!/bin/sh\n");
        assert_eq!(c.files[0].digest, Some(tool.to_proto()));

        assert_eq!(c.directories.len(), 1);
        assert_eq!(c.directories[0].path, "out");
        let expected_root = tree::build_local_tree(&cwd.join("out")).expect("tree").root;
        assert_eq!(c.directories[0].root, Some(expected_root.to_proto()));
        let named: HashSet<Digest> = c.blobs.iter().map(|(d, _)| *d).collect();
        for bytes in [&b"a"[..], b"b", b"#!/bin/sh\n"] {
            assert!(named.contains(&Digest::of(bytes)));
        }
        assert!(named.contains(&expected_root));
        assert!(!named.contains(&Digest::of(b"secret")));

        let notes = c.notes.join("\n");
        for (path, why) in [
            ("dangling", "does not exist"),
            ("leak", "outside the work directory"),
            ("via/secret", "outside the work directory"),
            ("../above", "\"..\""),
        ] {
            assert!(
                c.notes
                    .iter()
                    .any(|n| n.contains(&format!("{path:?}")) && n.contains(why)),
                "{path}: {notes}"
            );
        }
        assert_eq!(c.notes.len(), 4, "{notes}");
    }
}
