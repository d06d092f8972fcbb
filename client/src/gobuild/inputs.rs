//! The input tree of one go-build action: exactly the source files `go build` reads for the
//! targets on one platform, laid out as the toolchain expects them, and nothing else. In
//! GOPATH mode that is `src/<path below a GOPATH entry>/...` of every non-standard package the
//! targets depend on (`go list -deps`), so vendored packages keep their `vendor/` place; in
//! module mode it is the main module's `go.mod`, `go.sum`, `vendor/modules.txt` and the
//! directories of its packages and vendored ones. Packages from the module cache would need
//! downloads on the agent, which go-build does not do: they are refused with a hint.
//!
//! The tree holds only names and contents, never a local path, so every client with the same
//! sources gets the same digest, and with it the same action-cache key.
use crate::gotest::golist::{source_file_lists, GoPackage};
use anyhow::{bail, Context};
use archfarm_proto::tree::{encode_directory, hash_file_with_mode, LocalTree};
use archfarm_proto::{v1, Digest};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Where the user's Go sources come from, and so how the input tree is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// GO111MODULE=off: packages live in `<entry>/src/<import path>` of a GOPATH entry; the
    /// input tree is one GOPATH (`src/...`) and the action sets GOPATH to its work dir.
    Gopath {
        /// The GOPATH entries, in order.
        entries: Vec<PathBuf>,
    },
    /// Module mode: the input tree is the main module's root.
    Module {
        /// The directory holding go.mod.
        root: PathBuf,
    },
}

impl Layout {
    /// `gopath` or `module`, for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Layout::Gopath { .. } => "gopath",
            Layout::Module { .. } => "module",
        }
    }

    /// Where a package's directory goes in the input tree ("/"-separated, relative), or why
    /// it cannot go there.
    pub fn package_dir(&self, p: &GoPackage) -> Result<String, String> {
        let dir = Path::new(&p.dir);
        match self {
            Layout::Gopath { entries } => {
                for entry in entries {
                    for entry in [entry.clone(), canonical(entry)] {
                        let src = entry.join("src");
                        for d in [dir.to_path_buf(), canonical(dir)] {
                            if let Ok(rel) = d.strip_prefix(&src) {
                                return relative(rel).map(|r| join_rel("src", &r));
                            }
                        }
                    }
                }
                Err(format!(
                    "{} is in {}, which is not below the src directory of any GOPATH entry ({})",
                    p.import_path,
                    p.dir,
                    entries
                        .iter()
                        .map(|e| e.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ))
            }
            Layout::Module { root } => {
                for root in [root.clone(), canonical(root)] {
                    for d in [dir.to_path_buf(), canonical(dir)] {
                        if let Ok(rel) = d.strip_prefix(&root) {
                            return relative(rel);
                        }
                    }
                }
                let module = p
                    .module
                    .as_ref()
                    .map(|m| {
                        if m.version.is_empty() {
                            format!(" of module {}", m.path)
                        } else {
                            format!(" of module {}@{}", m.path, m.version)
                        }
                    })
                    .unwrap_or_default();
                Err(format!(
                    "{}{module} is in {}, outside the main module {}: go-build uploads only the \
                     main module and its vendor/ directory, and does not download modules on \
                     the agents (run `go mod vendor` to bring dependencies into the module)",
                    p.import_path,
                    p.dir,
                    root.display()
                ))
            }
        }
    }
}

/// `path` resolved through symlinks, or as given when that fails.
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A relative path as "/"-separated UTF-8 without `.` or `..`.
fn relative(rel: &Path) -> Result<String, String> {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| format!("{} is not valid UTF-8", rel.display()))?
                    .to_string(),
            ),
            std::path::Component::CurDir => {}
            _ => return Err(format!("{} is not a plain relative path", rel.display())),
        }
    }
    Ok(parts.join("/"))
}

fn join_rel(dir: &str, name: &str) -> String {
    match (dir.is_empty(), name.is_empty()) {
        (true, _) => name.to_string(),
        (_, true) => dir.to_string(),
        _ => format!("{dir}/{name}"),
    }
}

/// The files one platform's build reads: input-tree path -> local path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InputSelection {
    /// Every file, by its path in the input tree.
    pub files: BTreeMap<String, PathBuf>,
    /// How many non-standard packages they come from.
    pub packages: usize,
}

/// The lists of a package's files that `go build` reads (compiler, assembler, cgo, linker,
/// `//go:embed`); the test files stay out.
fn build_files(p: &GoPackage) -> impl Iterator<Item = &String> {
    source_file_lists(p)
        .into_iter()
        .filter(|(kind, _)| !kind.contains("Test"))
        .flat_map(|(_, files)| files.iter())
}

/// Added to `go list` errors that mean a module would have to be downloaded.
pub const DOWNLOAD_HINT: &str =
    " (go-build does not download modules; vendor them with `go mod vendor`)";

/// Whether a `go list` error means a module would have to be downloaded.
pub fn needs_download(text: &str) -> bool {
    [
        "no required module provides",
        "missing go.sum entry",
        "cannot find module providing",
        "module lookup disabled",
        "updates to go.mod needed",
        "go: downloading",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// Picks the files of the non-standard packages in `packages` (one platform's
/// `go list -deps -json` of the targets). Every problem is collected — broken packages,
/// packages outside the layout — and they fail the selection together.
pub fn select_inputs(layout: &Layout, packages: &[GoPackage]) -> anyhow::Result<InputSelection> {
    let mut selection = InputSelection::default();
    let mut problems: Vec<String> = Vec::new();
    for p in packages {
        if let Some(e) = &p.error {
            let text = e.to_string();
            let hint = if needs_download(&text) {
                DOWNLOAD_HINT
            } else {
                ""
            };
            problems.push(format!("{}: {text}{hint}", p.import_path));
            continue;
        }
        if p.goroot {
            continue; // the agent's Go installation holds it; the Go version is checked there
        }
        let dir = match layout.package_dir(p) {
            Ok(d) => d,
            Err(why) => {
                problems.push(why);
                continue;
            }
        };
        selection.packages += 1;
        for name in build_files(p) {
            if name
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            {
                problems.push(format!("{}: odd file name {name:?}", p.import_path));
                continue;
            }
            selection
                .files
                .insert(join_rel(&dir, name), Path::new(&p.dir).join(name));
        }
    }
    if !problems.is_empty() {
        problems.sort();
        problems.dedup();
        bail!("{}", problems.join("\n"));
    }
    Ok(selection)
}

/// The module files besides packages that a module-mode build reads: go.mod, and go.sum and
/// vendor/modules.txt when they exist.
pub fn module_files(root: &Path) -> Vec<(String, PathBuf)> {
    ["go.mod", "go.sum", "vendor/modules.txt"]
        .into_iter()
        .map(|rel| (rel.to_string(), root.join(rel)))
        .filter(|(rel, path)| rel == "go.mod" || path.is_file())
        .collect()
}

/// A file of an input tree: its digest and mode, and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Digest of the contents.
    pub digest: Digest,
    /// Whether it has an executable bit.
    pub executable: bool,
    /// The local file.
    pub local: PathBuf,
}

/// Hashes files, each local path once across calls (the platforms share most of them).
#[derive(Debug, Default)]
pub struct FileHasher {
    known: HashMap<PathBuf, (Digest, bool)>,
}

impl FileHasher {
    /// The digest and mode of `path` (following a symlink, as the compiler would).
    pub fn hash(&mut self, path: &Path) -> anyhow::Result<(Digest, bool)> {
        if let Some(known) = self.known.get(path) {
            return Ok(*known);
        }
        let hashed = hash_file_with_mode(path)
            .with_context(|| format!("failed to hash {}", path.display()))?;
        self.known.insert(path.to_path_buf(), hashed);
        Ok(hashed)
    }

    /// Every file of a selection, hashed.
    pub fn hash_all(
        &mut self,
        files: &BTreeMap<String, PathBuf>,
    ) -> anyhow::Result<BTreeMap<String, InputFile>> {
        files
            .iter()
            .map(|(rel, local)| {
                let (digest, executable) = self.hash(local)?;
                Ok((
                    rel.clone(),
                    InputFile {
                        digest,
                        executable,
                        local: local.clone(),
                    },
                ))
            })
            .collect()
    }
}

/// One directory while a tree is composed.
#[derive(Default)]
struct Node {
    files: BTreeMap<String, (Digest, bool)>,
    dirs: BTreeMap<String, Node>,
}

/// Builds the Merkle tree of `files` (input-tree path -> file) in canonical form: entries
/// sorted by name, every directory encoded once. Fails when a name is both a file and a
/// directory.
pub fn compose_tree(files: &BTreeMap<String, InputFile>) -> anyhow::Result<LocalTree> {
    let mut root = Node::default();
    let mut tree = LocalTree::default();
    for (rel, f) in files {
        let mut parts: Vec<&str> = rel.split('/').collect();
        let name = parts.pop().unwrap_or_default();
        let mut node = &mut root;
        for (i, part) in parts.iter().enumerate() {
            let so_far = parts[..=i].join("/");
            if node.files.contains_key(*part) {
                bail!("{so_far} is both a file and a directory of the input tree");
            }
            node = node.dirs.entry(part.to_string()).or_default();
        }
        if node.dirs.contains_key(name) {
            bail!("{rel} is both a file and a directory of the input tree");
        }
        node.files
            .insert(name.to_string(), (f.digest, f.executable));
        tree.files.insert(f.digest, f.local.clone());
        tree.stats.files += 1;
        tree.stats.file_bytes += f.digest.size_bytes();
    }
    tree.root = encode_node(&root, &mut tree);
    Ok(tree)
}

fn encode_node(node: &Node, tree: &mut LocalTree) -> Digest {
    let directories = node
        .dirs
        .iter()
        .map(|(name, child)| v1::DirectoryNode {
            name: name.clone(),
            digest: Some(encode_node(child, tree).to_proto()),
        })
        .collect();
    let dir = v1::Directory {
        files: node
            .files
            .iter()
            .map(|(name, (digest, executable))| v1::FileNode {
                name: name.clone(),
                digest: Some(digest.to_proto()),
                executable: *executable,
            })
            .collect(),
        directories,
        symlinks: Vec::new(),
    };
    let bytes = encode_directory(&dir);
    let digest = Digest::of(&bytes);
    tree.directories.insert(digest, bytes);
    tree.stats.directories += 1;
    digest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gotest::golist::parse_go_list;
    use archfarm_proto::tree::{build_local_tree, validate_directory};
    use prost::Message;

    /// `go list -deps -json` of a command in GOPATH mode: standard packages, a package of the
    /// same GOPATH with an embedded file and a cgo file, and a vendored one.
    const GOPATH_LIST: &str = r#"
{"Dir": "/usr/lib/go/src/fmt", "ImportPath": "fmt", "Goroot": true, "Standard": true,
 "GoFiles": ["print.go"]}
{"Dir": "/gp/src/example.com/app/vendor/example.org/lib", "ImportPath": "example.com/app/vendor/example.org/lib",
 "GoFiles": ["lib.go", "lib_linux.go"], "SFiles": ["asm_arm64.s"], "HFiles": ["lib.h"],
 "TestGoFiles": ["lib_test.go"]}
{"Dir": "/gp/src/example.com/app/internal/web", "ImportPath": "example.com/app/internal/web",
 "GoFiles": ["web.go"], "CgoFiles": ["c.go"], "EmbedFiles": ["static/index.html"],
 "XTestGoFiles": ["web_x_test.go"]}
{"Dir": "/gp/src/example.com/app/cmd/app", "ImportPath": "example.com/app/cmd/app", "Name": "main",
 "GoFiles": ["main.go"],
 "Deps": ["example.com/app/internal/web", "example.com/app/vendor/example.org/lib", "fmt"]}
"#;

    fn gopath() -> Layout {
        Layout::Gopath {
            entries: vec![PathBuf::from("/elsewhere"), PathBuf::from("/gp")],
        }
    }

    #[test]
    fn gopath_mode_selects_the_build_files_of_non_standard_packages_in_gopath_layout() {
        let packages = parse_go_list(GOPATH_LIST.as_bytes()).unwrap();
        let s = select_inputs(&gopath(), &packages).unwrap();
        assert_eq!(s.packages, 3);
        let names: Vec<&str> = s.files.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "src/example.com/app/cmd/app/main.go",
                "src/example.com/app/internal/web/c.go",
                "src/example.com/app/internal/web/static/index.html",
                "src/example.com/app/internal/web/web.go",
                "src/example.com/app/vendor/example.org/lib/asm_arm64.s",
                "src/example.com/app/vendor/example.org/lib/lib.go",
                "src/example.com/app/vendor/example.org/lib/lib.h",
                "src/example.com/app/vendor/example.org/lib/lib_linux.go",
            ]
        );
        assert_eq!(
            s.files["src/example.com/app/internal/web/static/index.html"],
            PathBuf::from("/gp/src/example.com/app/internal/web/static/index.html")
        );
    }

    #[test]
    fn broken_and_stray_packages_are_all_reported() {
        let text = r#"
{"Dir": "/gp/src/example.com/app", "ImportPath": "example.com/app", "GoFiles": ["main.go"]}
{"ImportPath": "example.com/gone", "Error": {"Err": "cannot find package \"example.com/gone\""}}
{"Dir": "/tmp/loose", "ImportPath": "_/tmp/loose", "GoFiles": ["x.go"]}
"#;
        let packages = parse_go_list(text.as_bytes()).unwrap();
        let e = select_inputs(&gopath(), &packages).unwrap_err().to_string();
        assert!(e.contains("example.com/gone: cannot find package"), "{e}");
        assert!(
            e.contains("_/tmp/loose is in /tmp/loose, which is not below"),
            "{e}"
        );
        assert!(e.contains("/elsewhere:/gp"), "{e}");
    }

    #[test]
    fn module_mode_takes_the_main_module_and_vendor_and_refuses_the_module_cache() {
        let layout = Layout::Module {
            root: PathBuf::from("/src/app"),
        };
        let text = r#"
{"Dir": "/src/app/cmd/app", "ImportPath": "example.com/app/cmd/app", "Name": "main",
 "GoFiles": ["main.go"], "Module": {"Path": "example.com/app", "Main": true}}
{"Dir": "/src/app/vendor/example.org/lib", "ImportPath": "example.org/lib",
 "GoFiles": ["lib.go"], "Module": {"Path": "example.org/lib", "Version": "v1.2.0"}}
"#;
        let s = select_inputs(&layout, &parse_go_list(text.as_bytes()).unwrap()).unwrap();
        let names: Vec<&str> = s.files.keys().map(String::as_str).collect();
        assert_eq!(names, ["cmd/app/main.go", "vendor/example.org/lib/lib.go"]);

        let cached = r#"
{"Dir": "/root/go/pkg/mod/example.org/lib@v1.2.0", "ImportPath": "example.org/lib",
 "GoFiles": ["lib.go"], "Module": {"Path": "example.org/lib", "Version": "v1.2.0"}}
{"ImportPath": "example.org/missing",
 "Error": {"Err": "no required module provides package example.org/missing; to add it:\n\tgo get example.org/missing"}}
"#;
        let e = select_inputs(&layout, &parse_go_list(cached.as_bytes()).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("module example.org/lib@v1.2.0"), "{e}");
        assert!(e.contains("does not download modules"), "{e}");
        assert!(e.contains("go mod vendor"), "{e}");
        assert!(
            e.contains("example.org/missing: no required module provides"),
            "{e}"
        );
    }

    #[test]
    fn composed_trees_equal_trees_built_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/a/b")).unwrap();
        std::fs::write(root.join("src/a/x.go"), "package a\n").unwrap();
        std::fs::write(root.join("src/a/b/y.go"), "package b\n").unwrap();
        std::fs::write(root.join("src/a/b/z.s"), "TEXT\n").unwrap();
        std::fs::write(root.join("go.mod"), "module a\n").unwrap();
        let files: BTreeMap<String, PathBuf> =
            ["go.mod", "src/a/b/y.go", "src/a/b/z.s", "src/a/x.go"]
                .into_iter()
                .map(|r| (r.to_string(), root.join(r)))
                .collect();
        let hashed = FileHasher::default().hash_all(&files).unwrap();
        let composed = compose_tree(&hashed).unwrap();
        let built = build_local_tree(root).unwrap();
        assert_eq!(composed.root, built.root);
        assert_eq!(composed.stats.files, 4);
        for (digest, bytes) in &composed.directories {
            let d = v1::Directory::decode(bytes.as_slice()).unwrap();
            assert_eq!(Digest::of(bytes), *digest);
            validate_directory(".", 0, &d).unwrap();
        }
    }

    #[test]
    fn a_name_cannot_be_a_file_and_a_directory() {
        let f = |rel: &str| {
            (
                rel.to_string(),
                InputFile {
                    digest: Digest::of(rel.as_bytes()),
                    executable: false,
                    local: PathBuf::from(rel),
                },
            )
        };
        let files: BTreeMap<String, InputFile> = [f("a"), f("a/b")].into_iter().collect();
        assert!(compose_tree(&files).is_err());
    }

    #[test]
    fn module_files_are_go_mod_and_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("go.sum"), "").unwrap();
        let names: Vec<String> = module_files(dir.path())
            .into_iter()
            .map(|(r, _)| r)
            .collect();
        assert_eq!(names, ["go.mod", "go.sum"]);
    }
}
