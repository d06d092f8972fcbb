//! Cross builds with what Debian packages: its Rust (`/usr/bin/cargo`, `/usr/bin/rustc` with
//! the std sources of rust-web-src) builds std for each foreign target (`-Zbuild-std`, allowed
//! by `RUSTC_BOOTSTRAP=1`; rustup cannot fetch targets here), Debian's cross gcc links, and
//! glibc is linked statically (`+crt-static`). One cargo run per platform, logged to a file, so
//! one platform's failure says why and the others still build.
use super::targets::{DistBinary, DistTarget, Profile};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's cargo (cargo-web), which drives the cross builds.
pub const SYSTEM_CARGO: &str = "/usr/bin/cargo";
/// Debian's rustc (rustc-web).
pub const SYSTEM_RUSTC: &str = "/usr/bin/rustc";
/// Debian's rustdoc, named so that nothing reaches for rustup's.
pub const SYSTEM_RUSTDOC: &str = "/usr/bin/rustdoc";
/// The std sources `-Zbuild-std` compiles (rust-web-src).
pub const RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";
/// Environment a caller's cargo or rustup may have set that would steer the cross build
/// elsewhere (another toolchain, another target dir, flags for every target) or make its
/// fingerprints differ between `cargo xtask dist` and a direct run, so that one rebuilds
/// what the other built (`cargo run` sets `CARGO_*` and `LD_LIBRARY_PATH`).
fn scrubbed(name: &str) -> bool {
    const KEPT_CARGO: &[&str] = &["CARGO_HOME", "CARGO_NET_", "CARGO_HTTP_", "CARGO_REGISTR"];
    if name.starts_with("CARGO") {
        return !KEPT_CARGO.iter().any(|k| name.starts_with(k));
    }
    name.starts_with("RUSTUP_")
        || name.starts_with("RUSTC")
        || name.starts_with("RUSTDOC")
        || matches!(
            name,
            "RUSTFLAGS" | "RUST_RECURSION_COUNT" | "LD_LIBRARY_PATH" | "MAKEFLAGS" | "MFLAGS"
        )
}

/// Fails, saying what to install, unless Debian's Rust with the std sources is there.
pub fn check_rust() -> anyhow::Result<()> {
    for (path, package) in [
        (SYSTEM_CARGO, "cargo-web"),
        (SYSTEM_RUSTC, "rustc-web"),
        (RUST_SRC, "rust-web-src"),
    ] {
        if !Path::new(path).exists() {
            bail!(
                "{path} is missing: cross builds use Debian's Rust with its std sources \
                 (apt install rustc-web cargo-web rust-web-src; package {package})"
            );
        }
    }
    Ok(())
}

/// Why `target` cannot be built on this machine, when its toolchain is missing.
pub fn missing_toolchain(target: &DistTarget) -> Option<String> {
    let gcc = Path::new("/usr/bin").join(target.gcc());
    let libc = if target.is_host() {
        PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.a")
    } else {
        target.sysroot().join("lib/libc.a")
    };
    let missing: Vec<String> = [gcc, libc]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} missing (apt install {})",
            missing.join(" and "),
            target.debian_packages()
        )
    })
}

/// The `cargo build` of `binaries` for `target`, not started: Debian's cargo and rustc,
/// `-Zbuild-std` for foreign targets, the cross gcc as linker and C compiler (ring's and
/// blake3's C), glibc static, into `target_dir`. `nice -n 10` keeps it from starving the
/// machine's other work.
pub fn cargo_command(
    target: &DistTarget,
    profile: Profile,
    binaries: &[DistBinary],
    target_dir: &Path,
    workspace: &Path,
) -> Command {
    let env_triple = target.triple.replace('-', "_");
    let upper = env_triple.to_uppercase();
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "10", SYSTEM_CARGO, "build", "--locked"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    if !target.is_host() {
        cmd.arg("-Zbuild-std=std,panic_abort");
    }
    cmd.args(["--target", target.triple])
        .arg("--target-dir")
        .arg(target_dir);
    for b in binaries {
        cmd.args(["-p", b.package, "--bin", b.name]);
    }
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(scrubbed) {
            cmd.env_remove(name);
        }
    }
    if !target.is_host() {
        // The host's own build (amd64) keeps cargo's default linker and C compiler: naming
        // them would change the fingerprints of the build scripts and proc macros, which every
        // target shares, and each platform would rebuild them after amd64.
        cmd.env(format!("CARGO_TARGET_{upper}_LINKER"), target.gcc())
            .env(format!("CC_{env_triple}"), target.gcc())
            .env(format!("AR_{env_triple}"), format!("{}-ar", target.gnu));
    }
    cmd.current_dir(workspace)
        .env("RUSTC", SYSTEM_RUSTC)
        .env("RUSTDOC", SYSTEM_RUSTDOC)
        .env("RUSTC_BOOTSTRAP", "1")
        // Target flags only: with --target, build scripts and proc macros do not get them.
        // The remaps keep this machine's paths (the checkout, cargo's registry) out of the
        // panic locations compiled into the binaries.
        .env(
            format!("CARGO_TARGET_{upper}_RUSTFLAGS"),
            target_rustflags(workspace),
        )
        // The same for C compiled into the binaries (ring's `__FILE__`s in its asserts).
        .env(format!("CFLAGS_{env_triple}"), target_cflags(workspace))
        // Shipped binaries keep their symbols (named backtraces) but not the line tables.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    cmd
}

/// Directories of the build machine whose names must not end up in a shipped binary: the
/// checkout and cargo's home (registry sources).
pub fn build_machine_paths(workspace: &Path) -> Vec<(PathBuf, &'static str)> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let mut paths = vec![(workspace.to_path_buf(), "/archfarm")];
    if let Some(home) = cargo_home {
        paths.push((home, "/cargo"));
    }
    paths
}

/// The target's RUSTFLAGS: static glibc, and each build-machine path remapped (a path with
/// whitespace cannot be passed this way; the shipped-binary check then refuses it).
fn target_rustflags(workspace: &Path) -> String {
    let mut flags = String::from("-C target-feature=+crt-static");
    for (path, to) in build_machine_paths(workspace) {
        let path = path.to_string_lossy();
        if !path.contains(char::is_whitespace) {
            flags.push_str(&format!(" --remap-path-prefix={path}={to}"));
        }
    }
    flags
}

/// The target's CFLAGS: each build-machine path mapped as in [`target_rustflags`].
fn target_cflags(workspace: &Path) -> String {
    build_machine_paths(workspace)
        .into_iter()
        .map(|(path, to)| (path.to_string_lossy().into_owned(), to))
        .filter(|(path, _)| !path.contains(char::is_whitespace))
        .map(|(path, to)| format!("-ffile-prefix-map={path}={to}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks that the binary at `path` names none of `paths` (see [`build_machine_paths`]).
pub fn check_no_build_paths(path: &Path, paths: &[(PathBuf, &str)]) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("failed to read {}", path.display()))?;
    for (dir, _) in paths {
        let needle = dir.to_string_lossy();
        let needle = needle.as_bytes();
        if needle.len() > 1 && bytes.windows(needle.len()).any(|w| w == needle) {
            bail!(
                "{} names a path of the build machine ({})",
                path.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// How one platform's build went.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// Wall time of the cargo run.
    pub took: Duration,
    /// Why it failed (cargo's last error lines), if it did.
    pub error: Option<String>,
    /// cargo's whole output.
    pub log: PathBuf,
}

/// Builds `binaries` for `target` with its output in `log`; a failed build is an outcome,
/// not an error (only failing to start cargo is).
pub fn build(
    target: &DistTarget,
    profile: Profile,
    binaries: &[DistBinary],
    target_dir: &Path,
    workspace: &Path,
    log: &Path,
) -> anyhow::Result<BuildOutcome> {
    let file = std::fs::File::create(log)
        .with_context(|| format!("failed to create {}", log.display()))?;
    let file_err = file
        .try_clone()
        .with_context(|| format!("failed to open {}", log.display()))?;
    let mut cmd = cargo_command(target, profile, binaries, target_dir, workspace);
    let started = Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(file_err)
        .status()
        .with_context(|| format!("failed to start {SYSTEM_CARGO} for {}", target.platform))?;
    let took = started.elapsed();
    let error = (!status.success()).then(|| {
        format!(
            "cargo build --target {} ended with {status}:\n{}",
            target.triple,
            error_lines(log)
        )
    });
    Ok(BuildOutcome {
        took,
        error,
        log: log.to_path_buf(),
    })
}

/// The `error...` lines of a cargo log with the line after each (the first 12), else its
/// last lines.
fn error_lines(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let mut picked: Vec<&str> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("error") {
            picked.push(l);
            if let Some(next) = lines.get(i + 1) {
                picked.push(next);
            }
        }
    }
    if picked.is_empty() {
        picked = lines[lines.len().saturating_sub(12)..].to_vec();
    }
    picked.truncate(24);
    picked
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::targets::DIST_BINARIES;

    fn envs(cmd: &Command) -> Vec<(String, Option<String>)> {
        cmd.get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn foreign_targets_build_std_with_the_cross_gcc_and_static_glibc() {
        let s390x = DistTarget::for_platform("linux/s390x").unwrap();
        let cmd = cargo_command(
            s390x,
            Profile::Release,
            DIST_BINARIES,
            Path::new("/t"),
            Path::new("/w"),
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(cmd.get_program(), "nice");
        assert_eq!(&args[..5], ["-n", "10", SYSTEM_CARGO, "build", "--locked"]);
        assert!(args.contains(&"--release".to_string()));
        assert!(args.contains(&"-Zbuild-std=std,panic_abort".to_string()));
        assert!(args
            .windows(2)
            .any(|w| w == ["--target", "s390x-unknown-linux-gnu"]));
        assert!(args.windows(2).any(|w| w == ["-p", "archfarm-agent"]));
        let env = envs(&cmd);
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .and_then(|(_, v)| v.clone())
        };
        assert_eq!(
            get("CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_LINKER").as_deref(),
            Some("s390x-linux-gnu-gcc")
        );
        let flags = get("CARGO_TARGET_S390X_UNKNOWN_LINUX_GNU_RUSTFLAGS").unwrap_or_default();
        assert!(
            flags.starts_with("-C target-feature=+crt-static"),
            "{flags}"
        );
        assert!(
            flags.contains("=/archfarm"),
            "the checkout is remapped: {flags}"
        );
        assert_eq!(
            get("CC_s390x_unknown_linux_gnu").as_deref(),
            Some("s390x-linux-gnu-gcc")
        );
        let cflags = get("CFLAGS_s390x_unknown_linux_gnu").unwrap_or_default();
        assert!(
            cflags.contains("-ffile-prefix-map=/w=/archfarm"),
            "C sources of the checkout are mapped too: {cflags}"
        );
        assert_eq!(get("RUSTC").as_deref(), Some(SYSTEM_RUSTC));
    }

    #[test]
    fn a_binary_naming_a_build_machine_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let checkout = dir.path().join("checkout");
        let bin = dir.path().join("bin");
        std::fs::write(&bin, b"\x7fELF... /cargo/registry/src/x.rs ...").unwrap();
        let paths = build_machine_paths(&checkout);
        check_no_build_paths(&bin, &paths).unwrap();
        let mut leaky = b"\x7fELF panicked at ".to_vec();
        leaky.extend_from_slice(
            checkout
                .join("client/src/x.rs")
                .to_string_lossy()
                .as_bytes(),
        );
        std::fs::write(&bin, leaky).unwrap();
        let err = check_no_build_paths(&bin, &paths).unwrap_err();
        assert!(
            format!("{err:#}").contains("names a path of the build machine"),
            "{err:#}"
        );
    }

    #[test]
    fn the_caller_s_cargo_and_rustup_settings_do_not_leak_in() {
        for name in [
            "RUSTUP_TOOLCHAIN",
            "CARGO",
            "CARGO_MANIFEST_DIR",
            "CARGO_TARGET_DIR",
            "CARGO_ENCODED_RUSTFLAGS",
            "RUSTC_WRAPPER",
            "RUSTFLAGS",
            "LD_LIBRARY_PATH",
        ] {
            assert!(scrubbed(name), "{name}");
        }
        for name in ["CARGO_HOME", "CARGO_NET_OFFLINE", "PATH", "HOME", "TMPDIR"] {
            assert!(!scrubbed(name), "{name}");
        }
    }

    #[test]
    fn the_host_uses_the_shipped_std_and_debug_builds_are_not_release() {
        let amd64 = DistTarget::for_platform("linux/amd64").unwrap();
        let cmd = cargo_command(
            amd64,
            Profile::Debug,
            &DIST_BINARIES[..1],
            Path::new("/t"),
            Path::new("/w"),
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.iter().any(|a| a.starts_with("-Zbuild-std")));
        assert!(!args.contains(&"--release".to_string()));
        let env = envs(&cmd);
        assert!(env
            .iter()
            .any(|(k, v)| k == "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS" && v.is_some()));
        assert!(!env
            .iter()
            .any(|(k, v)| k == "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER" && v.is_some()));
    }
}
