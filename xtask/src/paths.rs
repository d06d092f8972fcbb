//! Where things live: the workspace root, cargo's target directory and the demo farm under it,
//! found the same way by every command so that `demo`, `farm` and `bench` agree.
use std::path::{Path, PathBuf};

/// Whether `dir/Cargo.toml` declares a workspace.
fn is_workspace_root(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .map(|s| s.lines().any(|l| l.trim() == "[workspace]"))
        .unwrap_or(false)
}

/// The nearest directory at or above `start` whose Cargo.toml has a `[workspace]` table.
pub fn find_workspace_root(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| is_workspace_root(d))
        .map(Path::to_path_buf)
}

/// The archfarm workspace root: the parent of this crate's manifest directory as compiled, or,
/// when the binary was moved away from its checkout, the nearest workspace above the
/// executable or the current directory (the current directory as a last resort).
pub fn workspace_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR")).parent();
    if let Some(root) = compiled.filter(|r| is_workspace_root(r)) {
        return root.to_path_buf();
    }
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    starts
        .into_iter()
        .flatten()
        .find_map(|s| find_workspace_root(&s))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// cargo's target directory: `$CARGO_TARGET_DIR` when set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir().unwrap_or_default().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// A binary of this workspace as `cargo build` (debug profile) leaves it.
pub fn debug_binary(name: &str) -> PathBuf {
    target_dir().join("debug").join(name)
}

/// `<root>/target/demo-farm`: the demo coordinator's and agents' data, logs and pid files.
pub fn demo_farm_dir() -> PathBuf {
    workspace_root().join("target").join("demo-farm")
}

/// The demo coordinator's admin credentials.
pub fn demo_credentials_dir() -> PathBuf {
    demo_farm_dir().join("coordinator").join("admin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_workspace_above_a_member() {
        let root = std::env::temp_dir().join(format!("xtask-paths-{}", std::process::id()));
        let member = root.join("member/src");
        std::fs::create_dir_all(&member).unwrap();
        std::fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = [\"member\"]\n",
        )
        .unwrap();
        std::fs::write(root.join("member/Cargo.toml"), "[package]\nname = \"m\"\n").unwrap();
        assert_eq!(find_workspace_root(&member), Some(root.clone()));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_compiled_in_root_is_this_workspace() {
        let root = workspace_root();
        assert!(
            root.join("xtask/Cargo.toml").is_file(),
            "{}",
            root.display()
        );
        assert!(demo_credentials_dir().ends_with("target/demo-farm/coordinator/admin"));
    }
}
