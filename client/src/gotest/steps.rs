//! One farm step per Go test package and platform: its name, the test binary's arguments, and
//! its input tree staged on disk as `pkg.test` beside `src/` (the package directory's regular
//! files and its testdata tree, which is where `go test` runs a test binary).
use anyhow::{bail, Context};
use archfarm_proto::tree::symlink_escapes;
use archfarm_proto::Platform;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

/// The test binary's file name in a step's tree.
pub const TEST_BINARY: &str = "pkg.test";
/// The package directory's copy in a step's tree; the step runs there.
pub const SRC_DIR: &str = "src";
/// Longest step name the wire accepts.
pub const MAX_STEP_NAME_BYTES: usize = 200;
/// How much longer than `-test.timeout` a step may run before the farm's watchdog kills it:
/// Go's own timeout panics with every goroutine's stack first, which is the better report.
pub const WATCHDOG_GRACE: Duration = Duration::from_secs(30);

/// A step name from an import path: `/` and every character outside `[A-Za-z0-9._-]` become
/// `_`, a leading dot gets a `_` before it; a name too long for the wire keeps its start and ends with a hash of the whole path.
pub fn step_name(import_path: &str) -> String {
    let mut name: String = import_path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() || name.starts_with('.') {
        name = format!("_{name}");
    }
    if name.len() > MAX_STEP_NAME_BYTES {
        let hash = blake3::hash(import_path.as_bytes()).to_hex();
        name.truncate(MAX_STEP_NAME_BYTES - 17);
        name = format!("{name}-{}", &hash[..16]);
    }
    name
}

/// Step names for import paths, in the given order, unique: a name already taken (`a/b` and
/// `a_b` both read `a_b`) gets `-2`, `-3`, ... appended.
pub fn unique_step_names<S: AsRef<str>>(import_paths: &[S]) -> Vec<String> {
    let mut taken: HashSet<String> = HashSet::new();
    import_paths
        .iter()
        .map(|p| {
            let base = step_name(p.as_ref());
            let mut name = base.clone();
            let mut n = 2;
            while !taken.insert(name.clone()) {
                let suffix = format!("-{n}");
                let mut stem = base.clone();
                stem.truncate(MAX_STEP_NAME_BYTES - suffix.len());
                name = format!("{stem}{suffix}");
                n += 1;
            }
            name
        })
        .collect()
}

/// A platform as one path component: `linux_arm_v7`.
pub fn platform_slug(platform: &Platform) -> String {
    platform.to_string().replace('/', "_")
}

/// Go's spelling of a duration for `-test.timeout`: `180s`, or `1500ms`.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The test binary's arguments after argv[0], as `go test` would pass them in `-json` mode:
/// `-test.v=test2json` from Go 1.20 on (plain `-test.v` before, which 1.19's binaries need),
/// `-test.paniconexit0`, `-test.timeout`, `-test.count=1`, and `-test.run` when given.
pub fn test_args(go_minor: Option<u32>, timeout: Duration, run: Option<&str>) -> Vec<String> {
    let verbose = match go_minor {
        Some(m) if m >= 20 => "-test.v=test2json",
        _ => "-test.v",
    };
    let mut args = vec![
        verbose.to_string(),
        "-test.paniconexit0".to_string(),
        format!("-test.timeout={}", go_duration(timeout)),
        "-test.count=1".to_string(),
    ];
    if let Some(r) = run {
        args.push(format!("-test.run={r}"));
    }
    args
}

/// The step's argv: the binary one level above the working directory `src`, then `args`.
pub fn step_argv(args: &[String]) -> Vec<String> {
    std::iter::once(format!("../{TEST_BINARY}"))
        .chain(args.iter().cloned())
        .collect()
}

/// Puts `pkg_dir`'s regular files and its `testdata/` tree into `step_dir/src`, by hard links
/// where the file system allows and copies otherwise. Subpackage directories stay out.
pub fn stage_sources(step_dir: &Path, pkg_dir: &Path) -> anyhow::Result<()> {
    let src = step_dir.join(SRC_DIR);
    std::fs::create_dir_all(&src).with_context(|| format!("failed to create {}", src.display()))?;
    for name in super::key::regular_files(pkg_dir)? {
        link_or_copy(&pkg_dir.join(&name), &src.join(&name))?;
    }
    let testdata = pkg_dir.join("testdata");
    if testdata.is_dir() {
        stage_tree(&testdata, &src.join("testdata"), 0)?;
    }
    Ok(())
}

/// Copies the tree at `from` (a directory `depth` levels below the testdata root) to `to`:
/// files linked or copied, symlinks that stay inside testdata recreated, symlinks that leave it
/// replaced by what they point to.
fn stage_tree(from: &Path, to: &Path, depth: usize) -> anyhow::Result<()> {
    if depth > 64 {
        bail!("{} is nested too deeply (a symlink loop?)", from.display());
    }
    std::fs::create_dir_all(to).with_context(|| format!("failed to create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("failed to list {}", from.display()))?
    {
        let entry = entry.with_context(|| format!("failed to list {}", from.display()))?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        let ft = entry
            .file_type()
            .with_context(|| format!("failed to stat {}", path.display()))?;
        if ft.is_dir() {
            stage_tree(&path, &dest, depth + 1)?;
        } else if ft.is_file() {
            link_or_copy(&path, &dest)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path)
                .with_context(|| format!("failed to read link {}", path.display()))?;
            let inside = target.to_str().is_some_and(|t| !symlink_escapes(depth, t));
            if inside {
                std::os::unix::fs::symlink(&target, &dest)
                    .with_context(|| format!("failed to create link {}", dest.display()))?;
            } else if path.is_dir() {
                stage_tree(&path, &dest, depth + 1)?;
            } else if path.is_file() {
                std::fs::copy(&path, &dest)
                    .with_context(|| format!("failed to copy {}", path.display()))?;
            }
            // A dangling link that leaves the tree could not be read by the test either.
        }
    }
    Ok(())
}

fn link_or_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("failed to copy {} to {}", from.display(), to.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_keep_only_what_the_wire_allows() {
        assert_eq!(
            step_name("k8s.io/utils/clock/testing"),
            "k8s.io_utils_clock_testing"
        );
        assert_eq!(step_name("example.com/a b+c~d"), "example.com_a_b_c_d");
        assert_eq!(step_name("ünïcode/x"), "_n_code_x");
        assert_eq!(step_name(".."), "_..");
        assert_eq!(step_name(".hidden/x"), "_.hidden_x");
        let long = format!("example.com/{}", "x".repeat(300));
        let name = step_name(&long);
        assert_eq!(name.len(), MAX_STEP_NAME_BYTES);
        assert_ne!(name, step_name(&format!("{long}y")));
        for n in [step_name(&long), step_name("a/b-c.d_e")] {
            assert!(n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        }
    }

    #[test]
    fn colliding_names_are_made_unique() {
        assert_eq!(
            unique_step_names(&["a/b", "a_b", "a/b_", "a.b", "a+b"]),
            ["a_b", "a_b-2", "a_b_", "a.b", "a_b-3"]
        );
    }

    #[test]
    fn arguments_follow_the_go_version() {
        let t = Duration::from_secs(180);
        assert_eq!(
            test_args(Some(19), t, None),
            [
                "-test.v",
                "-test.paniconexit0",
                "-test.timeout=180s",
                "-test.count=1"
            ]
        );
        let args = test_args(Some(23), Duration::from_millis(1500), Some("^(TestA)$"));
        assert_eq!(args[0], "-test.v=test2json");
        assert_eq!(args[2], "-test.timeout=1500ms");
        assert_eq!(args[4], "-test.run=^(TestA)$");
        assert_eq!(step_argv(&args[..1])[0], "../pkg.test");
    }

    #[test]
    fn staging_takes_regular_files_and_testdata_only() {
        let pkg = tempfile::tempdir().unwrap();
        let p = pkg.path();
        std::fs::write(p.join("a.go"), "package a").unwrap();
        std::fs::write(p.join("golden.json"), "{}").unwrap();
        std::fs::create_dir_all(p.join("sub")).unwrap();
        std::fs::write(p.join("sub/sub.go"), "package sub").unwrap();
        std::fs::create_dir_all(p.join("testdata/deep")).unwrap();
        std::fs::write(p.join("testdata/deep/x.txt"), "x").unwrap();
        std::os::unix::fs::symlink("deep/x.txt", p.join("testdata/inside")).unwrap();
        std::os::unix::fs::symlink("../a.go", p.join("testdata/outside")).unwrap();
        let stage = tempfile::tempdir().unwrap();
        stage_sources(stage.path(), p).unwrap();
        let src = stage.path().join("src");
        assert!(src.join("a.go").is_file());
        assert!(src.join("golden.json").is_file());
        assert!(!src.join("sub").exists());
        assert_eq!(
            std::fs::read_to_string(src.join("testdata/deep/x.txt")).unwrap(),
            "x"
        );
        assert!(std::fs::symlink_metadata(src.join("testdata/inside"))
            .unwrap()
            .file_type()
            .is_symlink());
        let outside = std::fs::symlink_metadata(src.join("testdata/outside")).unwrap();
        assert!(
            outside.file_type().is_file(),
            "an escaping link becomes a copy"
        );
        let tree = archfarm_proto::tree::build_local_tree(stage.path()).unwrap();
        assert_eq!(tree.stats.files, 4);
    }
}
