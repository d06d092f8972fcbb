//! Cache keys of Go test steps, computed from what the Go toolchain would read, without
//! compiling or linking: a blake3 over the Go version, the platform and build settings, the
//! test arguments, and the source and embedded files of the package's test main and of every
//! package it depends on (standard packages are covered by the Go version), plus the files the
//! test run sees (the package directory's regular files and its testdata tree). In module mode
//! also the go.mod of every module involved, and the main module's go.sum and
//! vendor/modules.txt (they choose the dependencies' versions and language versions; the
//! vendored or cached files themselves are hashed as any package's). A changed file changes
//! exactly the keys of the packages whose tests depend on it.
use super::golist::{source_file_lists, GoModule, PackageIndex};
use anyhow::Context;
use archfarm_proto::tree::{build_local_tree, hash_file};
use archfarm_proto::{Digest, Platform};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Version tag hashed first: bump it when what a key covers changes.
pub const KEY_VERSION: &str = "archfarm-go-test-v2";

/// Everything a key covers besides the packages' files.
#[derive(Debug, Clone)]
pub struct KeyContext<'a> {
    /// `go version`'s line.
    pub go_version: &'a str,
    /// The target platform (GOOS, GOARCH, GOARM).
    pub platform: &'a Platform,
    /// CGO_ENABLED.
    pub cgo: bool,
    /// `-tags`.
    pub tags: &'a str,
    /// `-race`.
    pub race: bool,
    /// The arguments the test binary runs with.
    pub test_args: &'a [String],
    /// The job's environment and the build-relevant variables of ours, as given.
    pub env: &'a [(String, String)],
}

/// A step cache key: 64 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lower-case hex, as the wire wants it.
    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

/// File digests memoised by path for one run: each file is read once however many packages
/// and platforms name it.
#[derive(Debug, Default)]
pub struct FileHashes {
    files: HashMap<PathBuf, Digest>,
    dirs: HashMap<PathBuf, Vec<String>>,
    testdata: HashMap<PathBuf, Option<Digest>>,
    optional: HashMap<PathBuf, Option<Digest>>,
}

impl FileHashes {
    /// The digest of the file at `path`.
    pub fn file(&mut self, path: &Path) -> anyhow::Result<Digest> {
        if let Some(d) = self.files.get(path) {
            return Ok(*d);
        }
        let d = hash_file(path).with_context(|| format!("failed to hash {}", path.display()))?;
        self.files.insert(path.to_path_buf(), d);
        Ok(d)
    }

    /// The digest of the file at `path`, None when there is no regular file there.
    pub fn file_if_present(&mut self, path: &Path) -> anyhow::Result<Option<Digest>> {
        if let Some(d) = self.optional.get(path) {
            return Ok(*d);
        }
        let d = if path.is_file() {
            Some(self.file(path)?)
        } else {
            None
        };
        self.optional.insert(path.to_path_buf(), d);
        Ok(d)
    }

    /// Names of the regular files directly in `dir`, sorted (what a test sees in its working
    /// directory besides testdata/).
    pub fn regular_files(&mut self, dir: &Path) -> anyhow::Result<Vec<String>> {
        if let Some(names) = self.dirs.get(dir) {
            return Ok(names.clone());
        }
        let names = regular_files(dir)?;
        self.dirs.insert(dir.to_path_buf(), names.clone());
        Ok(names)
    }

    /// The tree digest of `dir/testdata`, None when there is none.
    pub fn testdata(&mut self, dir: &Path) -> anyhow::Result<Option<Digest>> {
        if let Some(d) = self.testdata.get(dir) {
            return Ok(*d);
        }
        let td = dir.join("testdata");
        let d = if td.is_dir() {
            Some(
                build_local_tree(&td)
                    .with_context(|| format!("failed to hash {}", td.display()))?
                    .root,
            )
        } else {
            None
        };
        self.testdata.insert(dir.to_path_buf(), d);
        Ok(d)
    }
}

/// Names of the regular files directly in `dir` (no directories, no symlinks), sorted.
pub fn regular_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("failed to list {}", dir.display()))?;
        let ft = entry
            .file_type()
            .with_context(|| format!("failed to stat {}", entry.path().display()))?;
        if !ft.is_file() {
            continue;
        }
        match entry.file_name().into_string() {
            Ok(n) => names.push(n),
            Err(n) => anyhow::bail!("{} has a file name that is not UTF-8: {n:?}", dir.display()),
        }
    }
    names.sort();
    Ok(names)
}

/// Feeds length-prefixed fields, so that no two different field sequences hash alike.
struct KeyHasher(blake3::Hasher);

impl KeyHasher {
    fn field(&mut self, tag: &str, value: &[u8]) {
        self.0.update(&(tag.len() as u64).to_le_bytes());
        self.0.update(tag.as_bytes());
        self.0.update(&(value.len() as u64).to_le_bytes());
        self.0.update(value);
    }
}

/// The cache key of the tests of `target` (an import path with a `target.test` record in
/// `index`) on `ctx.platform`.
pub fn package_key(
    index: &PackageIndex,
    target: &str,
    ctx: &KeyContext<'_>,
    hashes: &mut FileHashes,
) -> anyhow::Result<CacheKey> {
    let main = index
        .test_main(target)
        .with_context(|| format!("go list has no test main for {target}"))?;
    let pkg = index
        .get(target)
        .with_context(|| format!("go list has no record of {target}"))?;
    let mut h = KeyHasher(blake3::Hasher::new());
    h.field("version", KEY_VERSION.as_bytes());
    h.field("go", ctx.go_version.as_bytes());
    h.field("GOOS", ctx.platform.os().as_bytes());
    h.field("GOARCH", ctx.platform.arch().as_bytes());
    h.field("GOARM", ctx.platform.goarm().unwrap_or("").as_bytes());
    h.field("CGO_ENABLED", if ctx.cgo { b"1" } else { b"0" });
    h.field("tags", ctx.tags.as_bytes());
    h.field("race", if ctx.race { b"1" } else { b"0" });
    for a in ctx.test_args {
        h.field("arg", a.as_bytes());
    }
    for (k, v) in ctx.env {
        h.field("env", format!("{k}={v}").as_bytes());
    }
    h.field("target", target.as_bytes());
    // The test main first (its generated sources derive from the test files hashed below),
    // then every dependency in go list's (sorted) order, test variants included.
    let mut paths: Vec<&str> = vec![main.import_path.as_str()];
    paths.extend(main.deps.iter().map(String::as_str));
    let mut modules_hashed: HashSet<&str> = HashSet::new();
    for path in paths {
        let Some(p) = index.get(path) else {
            h.field("unlisted", path.as_bytes());
            continue;
        };
        if p.goroot {
            continue; // the Go version covers the standard library
        }
        h.field("package", p.import_path.as_bytes());
        if let Some(m) = &p.module {
            h.field(
                "module",
                format!("{}@{} go{}", m.path, m.version, m.go_version).as_bytes(),
            );
            if modules_hashed.insert(m.path.as_str()) {
                module_files(&mut h, m, hashes)?;
            }
        }
        let dir = Path::new(&p.dir);
        for (list, files) in source_file_lists(p) {
            for f in files {
                if Path::new(f).is_absolute() {
                    continue; // generated (the test main, cgo): derived from the files hashed
                }
                let d = hashes.file(&dir.join(f))?;
                h.field(list, f.as_bytes());
                h.field("blake3", d.hash_bytes());
            }
        }
    }
    // What the test run sees in its working directory.
    let dir = Path::new(&pkg.dir);
    for name in hashes.regular_files(dir)? {
        let d = hashes.file(&dir.join(&name))?;
        h.field("workdir file", name.as_bytes());
        h.field("blake3", d.hash_bytes());
    }
    if let Some(td) = hashes.testdata(dir)? {
        h.field("testdata", td.hash_bytes());
    }
    Ok(CacheKey(*h.0.finalize().as_bytes()))
}

/// The files of module `m` that steer the build besides its packages' sources: the go.mod `go`
/// read for it, and for the main module its go.sum and vendor/modules.txt when present.
fn module_files(h: &mut KeyHasher, m: &GoModule, hashes: &mut FileHashes) -> anyhow::Result<()> {
    let mut files: Vec<(&str, PathBuf)> = Vec::new();
    if !m.go_mod.is_empty() {
        files.push(("go.mod", PathBuf::from(&m.go_mod)));
    }
    if m.main && !m.dir.is_empty() {
        let root = Path::new(&m.dir);
        files.push(("go.sum", root.join("go.sum")));
        files.push(("vendor/modules.txt", root.join("vendor/modules.txt")));
    }
    for (name, path) in files {
        if let Some(d) = hashes.file_if_present(&path)? {
            h.field("module file", format!("{} {name}", m.path).as_bytes());
            h.field("blake3", d.hash_bytes());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::golist::parse_go_list;
    use super::*;
    use serde_json::json;

    /// A GOPATH-like tree: a imports b; c stands alone; fmt is standard.
    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for (p, body) in [
                ("a/a.go", "package a"),
                ("a/a_test.go", "package a // test"),
                ("a/testdata/in.txt", "input"),
                ("b/b.go", "package b"),
                ("b/b_test.go", "package b // test"),
                ("c/c.go", "package c"),
                ("c/c_test.go", "package c // test"),
                ("goroot/fmt/print.go", "package fmt"),
            ] {
                let path = dir.path().join(p);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, body).unwrap();
            }
            Self { dir }
        }

        fn path(&self, rel: &str) -> String {
            self.dir.path().join(rel).display().to_string()
        }

        /// What `go list -e -json -deps -test a b c` would print, roughly.
        fn index(&self) -> PackageIndex {
            let pkg = |path: &str, dir: &str, files: &[&str], tests: &[&str], deps: &[&str]| {
                json!({"ImportPath": path, "Dir": self.path(dir), "GoFiles": files,
                       "TestGoFiles": tests, "Deps": deps})
            };
            let records = [
                json!({"ImportPath": "fmt", "Dir": self.path("goroot/fmt"), "Goroot": true,
                       "GoFiles": ["print.go"]}),
                pkg("x/b", "b", &["b.go"], &["b_test.go"], &["fmt"]),
                pkg("x/a", "a", &["a.go"], &["a_test.go"], &["fmt", "x/b"]),
                pkg(
                    "x/a [x/a.test]",
                    "a",
                    &["a.go", "a_test.go"],
                    &["a_test.go"],
                    &["fmt", "x/b"],
                ),
                pkg(
                    "x/a.test",
                    "a",
                    &["/cache/_testmain.go"],
                    &[],
                    &["fmt", "x/a [x/a.test]", "x/b"],
                ),
                pkg(
                    "x/b [x/b.test]",
                    "b",
                    &["b.go", "b_test.go"],
                    &["b_test.go"],
                    &["fmt"],
                ),
                pkg(
                    "x/b.test",
                    "b",
                    &["/cache/_testmain.go"],
                    &[],
                    &["fmt", "x/b [x/b.test]"],
                ),
                pkg("x/c", "c", &["c.go"], &["c_test.go"], &[]),
                pkg(
                    "x/c [x/c.test]",
                    "c",
                    &["c.go", "c_test.go"],
                    &["c_test.go"],
                    &[],
                ),
                pkg(
                    "x/c.test",
                    "c",
                    &["/cache/_testmain.go"],
                    &[],
                    &["x/c [x/c.test]"],
                ),
            ];
            let text: String = records.iter().map(|r| format!("{r}\n")).collect();
            PackageIndex::new(parse_go_list(text.as_bytes()).unwrap())
        }

        fn keys(&self, ctx: &KeyContext<'_>) -> Vec<CacheKey> {
            let index = self.index();
            let mut hashes = FileHashes::default();
            ["x/a", "x/b", "x/c"]
                .iter()
                .map(|t| package_key(&index, t, ctx, &mut hashes).unwrap())
                .collect()
        }
    }

    fn ctx<'a>(platform: &'a Platform, args: &'a [String]) -> KeyContext<'a> {
        KeyContext {
            go_version: "go version go1.19.8 linux/amd64",
            platform,
            cgo: false,
            tags: "",
            race: false,
            test_args: args,
            env: &[],
        }
    }

    #[test]
    fn a_changed_file_changes_exactly_the_keys_that_depend_on_it() {
        let f = Fixture::new();
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let args = vec!["-test.v".to_string()];
        let before = f.keys(&ctx(&amd64, &args));
        assert_eq!(before, f.keys(&ctx(&amd64, &args)), "deterministic");
        assert_eq!(before.len(), 3);
        assert!(before[0] != before[1] && before[1] != before[2]);

        // b is a dependency of a: both change, c does not.
        std::fs::write(f.dir.path().join("b/b.go"), "package b // changed").unwrap();
        let after = f.keys(&ctx(&amd64, &args));
        assert_ne!(after[0], before[0]);
        assert_ne!(after[1], before[1]);
        assert_eq!(after[2], before[2]);

        // a test file of a changes only a.
        std::fs::write(f.dir.path().join("a/a_test.go"), "package a // more").unwrap();
        let again = f.keys(&ctx(&amd64, &args));
        assert_ne!(again[0], after[0]);
        assert_eq!(again[1..], after[1..]);

        // testdata of a changes only a.
        std::fs::write(f.dir.path().join("a/testdata/in.txt"), "other").unwrap();
        let td = f.keys(&ctx(&amd64, &args));
        assert_ne!(td[0], again[0]);
        assert_eq!(td[1..], again[1..]);

        // A standard package's files are covered by the Go version, not hashed.
        std::fs::write(
            f.dir.path().join("goroot/fmt/print.go"),
            "package fmt // new",
        )
        .unwrap();
        assert_eq!(f.keys(&ctx(&amd64, &args)), td);
    }

    #[test]
    fn settings_change_every_key() {
        let f = Fixture::new();
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let arm64: Platform = "linux/arm64".parse().unwrap();
        let args = vec!["-test.v".to_string()];
        let base = f.keys(&ctx(&amd64, &args));
        let differs = |other: Vec<CacheKey>| {
            assert!(other.iter().zip(&base).all(|(a, b)| a != b));
        };
        differs(f.keys(&ctx(&arm64, &args)));
        differs(f.keys(&KeyContext {
            race: true,
            ..ctx(&amd64, &args)
        }));
        differs(f.keys(&KeyContext {
            tags: "integration",
            ..ctx(&amd64, &args)
        }));
        differs(f.keys(&KeyContext {
            go_version: "go version go1.23.1 linux/amd64",
            ..ctx(&amd64, &args)
        }));
        let env = [("FLAKY_MARKER".to_string(), "x".to_string())];
        differs(f.keys(&KeyContext {
            env: &env,
            ..ctx(&amd64, &args)
        }));
        let more = vec!["-test.v".to_string(), "-test.short".to_string()];
        differs(f.keys(&ctx(&amd64, &more)));
        assert_eq!(base[0].hex().len(), 64);
    }

    /// A module with a vendored dependency: what `go list -deps -test example.com/m/a`
    /// prints in module mode, roughly.
    fn module_index(root: &Path) -> PackageIndex {
        let main = json!({"Path": "example.com/m", "Main": true, "GoVersion": "1.19",
                          "Dir": root.display().to_string(),
                          "GoMod": root.join("go.mod").display().to_string()});
        let dep = json!({"Path": "example.com/dep", "Version": "v0.1.0", "GoVersion": "1.19"});
        let dir = |rel: &str| root.join(rel).display().to_string();
        let records = [
            json!({"ImportPath": "example.com/dep", "Dir": dir("vendor/example.com/dep"),
                   "GoFiles": ["dep.go"], "Module": dep}),
            json!({"ImportPath": "example.com/m/a", "Dir": dir("a"), "GoFiles": ["a.go"],
                   "TestGoFiles": ["a_test.go"], "Deps": ["example.com/dep"],
                   "Module": main}),
            json!({"ImportPath": "example.com/m/a [example.com/m/a.test]", "Dir": dir("a"),
                   "GoFiles": ["a.go", "a_test.go"], "Deps": ["example.com/dep"],
                   "Module": main}),
            json!({"ImportPath": "example.com/m/a.test", "Dir": dir("a"),
                   "GoFiles": ["/cache/_testmain.go"],
                   "Deps": ["example.com/dep", "example.com/m/a [example.com/m/a.test]"],
                   "Module": main}),
        ];
        let text: String = records.iter().map(|r| format!("{r}\n")).collect();
        PackageIndex::new(parse_go_list(text.as_bytes()).unwrap())
    }

    #[test]
    fn module_mode_keys_cover_go_mod_go_sum_and_vendor_modules_txt() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (p, body) in [
            ("go.mod", "module example.com/m\n\ngo 1.19\n"),
            (
                "vendor/modules.txt",
                "# example.com/dep v0.1.0\n## explicit; go 1.19\n",
            ),
            ("vendor/example.com/dep/dep.go", "package dep"),
            ("a/a.go", "package a"),
            ("a/a_test.go", "package a // test"),
        ] {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, body).unwrap();
        }
        let amd64: Platform = "linux/amd64".parse().unwrap();
        let key = || {
            let index = module_index(root);
            let mut hashes = FileHashes::default();
            package_key(&index, "example.com/m/a", &ctx(&amd64, &[]), &mut hashes).unwrap()
        };
        let mut seen = vec![key()];
        assert_eq!(key(), seen[0], "deterministic");
        let mut changed = |rel: &str, body: &str| {
            std::fs::write(root.join(rel), body).unwrap();
            let k = key();
            assert!(!seen.contains(&k), "changing {rel} changes the key");
            seen.push(k);
        };
        changed("go.mod", "module example.com/m\n\ngo 1.19\n// edited\n");
        changed("go.sum", "example.com/dep v0.1.0 h1:x\n"); // a go.sum appears
        changed("go.sum", "example.com/dep v0.1.0 h1:y\n");
        changed(
            "vendor/modules.txt",
            "# example.com/dep v0.1.0\n## explicit; go 1.21\n",
        );
        changed("vendor/example.com/dep/dep.go", "package dep // new");
    }

    #[test]
    fn a_file_is_read_once() {
        let f = Fixture::new();
        let mut hashes = FileHashes::default();
        let p = f.dir.path().join("a/a.go");
        let first = hashes.file(&p).unwrap();
        std::fs::write(&p, "changed behind our back").unwrap();
        assert_eq!(hashes.file(&p).unwrap(), first, "memoised for the run");
        assert_eq!(
            hashes.regular_files(&f.dir.path().join("a")).unwrap(),
            ["a.go", "a_test.go"]
        );
        assert!(hashes.testdata(&f.dir.path().join("b")).unwrap().is_none());
    }
}
