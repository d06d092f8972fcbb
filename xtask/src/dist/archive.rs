//! The release archives: per platform a directory `archfarm-VERSION-linux-ARCH[-VARIANT]/`
//! with the binaries, an example agent policy, the agent's systemd unit and a short INSTALL,
//! packed with GNU tar and gzip (names sorted, owner root, mtime of the last commit, no gzip
//! timestamp: the same inputs give the same bytes), and SHA256SUMS over the archives.
use super::targets::{version, DistTarget};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The example policy shipped as `agent.toml`.
pub const EXAMPLE_POLICY: &str = include_str!("files/agent.toml");
/// The agent's systemd unit, shipped as `archfarm-agent.service`.
pub const AGENT_UNIT: &str = include_str!("files/archfarm-agent.service");
/// INSTALL, with `@VERSION@`, `@PLATFORM@` and `@BINARIES@` filled in.
const INSTALL_TEMPLATE: &str = include_str!("files/INSTALL");

/// INSTALL for one platform's archive.
pub fn install_text(target: &DistTarget, binaries: &[&str]) -> String {
    INSTALL_TEMPLATE
        .replace("@VERSION@", version())
        .replace("@PLATFORM@", target.platform)
        .replace("@BINARIES@", &binaries.join(", "))
}

/// Seconds since the epoch of the last commit (`SOURCE_DATE_EPOCH` when set): the mtime of
/// every archived file.
pub fn source_date_epoch(workspace: &Path) -> anyhow::Result<u64> {
    if let Some(v) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let s = v.to_string_lossy();
        return s
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds"));
    }
    let out = Command::new("git")
        .args(["log", "-1", "--format=%ct"])
        .current_dir(workspace)
        .output()
        .context("failed to run git log for the archives' timestamp")?;
    if !out.status.success() {
        bail!(
            "failed to read the last commit's time: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("git log printed {text:?}, not a time"))
}

/// Lays out `stage/<stem>/` for `target` from `binaries` (name, built file) and packs it as
/// `out/<stem>.tar.gz`; returns the archive's path.
pub fn pack(
    target: &DistTarget,
    binaries: &[(&str, PathBuf)],
    stage: &Path,
    out: &Path,
    mtime: u64,
) -> anyhow::Result<PathBuf> {
    let stem = target.archive_stem();
    let dir = stage.join(&stem);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("failed to clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    for (name, built) in binaries {
        let dest = dir.join(name);
        std::fs::copy(built, &dest)
            .with_context(|| format!("failed to copy {} to {}", built.display(), dest.display()))?;
        set_mode(&dest, 0o755)?;
    }
    let names: Vec<&str> = binaries.iter().map(|(n, _)| *n).collect();
    for (name, text) in [
        ("agent.toml", EXAMPLE_POLICY.to_string()),
        ("archfarm-agent.service", AGENT_UNIT.to_string()),
        ("INSTALL", install_text(target, &names)),
    ] {
        let dest = dir.join(name);
        std::fs::write(&dest, text)
            .with_context(|| format!("failed to write {}", dest.display()))?;
        set_mode(&dest, 0o644)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("failed to create {}", out.display()))?;
    let archive = out.join(format!("{stem}.tar.gz"));
    tar_gz(stage, &stem, &archive, mtime)?;
    Ok(archive)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("failed to chmod {}", path.display()))
}

/// `tar -C stage -c stem | gzip -n -9 > archive`, reproducibly.
fn tar_gz(stage: &Path, stem: &str, archive: &Path, mtime: u64) -> anyhow::Result<()> {
    let file = std::fs::File::create(archive)
        .with_context(|| format!("failed to create {}", archive.display()))?;
    let mut tar = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--format=gnu",
        ])
        .arg(format!("--mtime=@{mtime}"))
        .arg("-C")
        .arg(stage)
        .args(["-cf", "-", stem])
        .stdout(Stdio::piped())
        .spawn()
        .context("failed to start tar")?;
    let tar_out = tar.stdout.take().context("tar's stdout")?;
    let gzip = Command::new("gzip")
        .args(["-n", "-9"])
        .stdin(tar_out)
        .stdout(file)
        .status()
        .context("failed to run gzip")?;
    let tar_status = tar.wait().context("failed to wait for tar")?;
    if !tar_status.success() || !gzip.success() {
        bail!(
            "failed to pack {}: tar ended with {tar_status}, gzip with {gzip}",
            archive.display()
        );
    }
    Ok(())
}

/// The archives in `out`, sorted by name: what SHA256SUMS covers.
pub fn archives_in(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .with_context(|| format!("failed to list {}", out.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .collect();
    v.sort();
    Ok(v)
}

/// Writes `out/SHA256SUMS` (sha256sum's format) over `archives`, which must lie in `out`.
pub fn write_sha256sums(out: &Path, archives: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let names: Vec<String> = archives
        .iter()
        .map(|a| {
            a.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .with_context(|| format!("{} has no file name", a.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let sums = out.join("SHA256SUMS");
    if names.is_empty() {
        std::fs::write(&sums, "").with_context(|| format!("failed to write {}", sums.display()))?;
        return Ok(sums);
    }
    let output = Command::new("sha256sum")
        .args(&names)
        .current_dir(out)
        .output()
        .context("failed to run sha256sum")?;
    if !output.status.success() {
        bail!(
            "sha256sum failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    std::fs::write(&sums, &output.stdout)
        .with_context(|| format!("failed to write {}", sums.display()))?;
    Ok(sums)
}

/// Unpacks `archive` into `into` (for `--verify`, which runs what ships); returns the
/// archive's top directory.
pub fn unpack(archive: &Path, into: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(into)
        .with_context(|| format!("failed to create {}", into.display()))?;
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .context("failed to run tar")?;
    if !status.success() {
        bail!(
            "failed to unpack {}: tar ended with {status}",
            archive.display()
        );
    }
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.gz"))
        .with_context(|| format!("{} is not a .tar.gz", archive.display()))?;
    Ok(into.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_are_reproducible_and_hold_the_promised_files() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("built-agent");
        std::fs::write(&bin, b"\x7fELF pretend").unwrap();
        let target = DistTarget::for_platform("linux/arm/v7").unwrap();
        let (stage, out) = (tmp.path().join("stage"), tmp.path().join("out"));
        let a = pack(
            target,
            &[("archfarm-agent", bin.clone())],
            &stage,
            &out,
            1_700_000_000,
        )
        .unwrap();
        let first = std::fs::read(&a).unwrap();
        let again = pack(
            target,
            &[("archfarm-agent", bin)],
            &stage,
            &out,
            1_700_000_000,
        )
        .unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), first, "same bytes twice");
        assert!(a.ends_with(format!("archfarm-{}-linux-arm-v7.tar.gz", version())));
        let top = unpack(&a, &tmp.path().join("x")).unwrap();
        for f in [
            "archfarm-agent",
            "agent.toml",
            "archfarm-agent.service",
            "INSTALL",
        ] {
            assert!(top.join(f).is_file(), "{f}");
        }
        let install = std::fs::read_to_string(top.join("INSTALL")).unwrap();
        assert!(install.contains("for linux/arm/v7") && !install.contains('@'));
        let sums = write_sha256sums(&out, &[a]).unwrap();
        let text = std::fs::read_to_string(sums).unwrap();
        assert!(text.ends_with("-linux-arm-v7.tar.gz\n"), "{text}");
        assert_eq!(text.split_whitespace().next().unwrap().len(), 64);
    }

    #[test]
    fn the_example_policy_is_one_the_agent_accepts() {
        let p = archfarm_agent::policy::PolicyFile::parse(EXAMPLE_POLICY).unwrap();
        assert_eq!(p.sandbox.as_deref(), Some("bwrap"));
        assert_eq!(p.native, Some(true));
    }

    #[test]
    fn the_unit_restarts_the_agent_as_an_unprivileged_user() {
        assert!(AGENT_UNIT.contains("Restart=always"));
        assert!(AGENT_UNIT.contains("DynamicUser=yes"));
        assert!(AGENT_UNIT.contains("NoNewPrivileges=yes"));
        assert!(AGENT_UNIT.contains("CapabilityBoundingSet=\n"));
        assert!(AGENT_UNIT.contains("--policy /etc/archfarm/agent.toml"));
    }
}
