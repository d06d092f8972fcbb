//! `cargo xtask dist`: release builds of archfarm's binaries for every farm platform, made on
//! this amd64 machine with what Debian packages ([`build`]); each binary's ELF identity is
//! checked against its platform and it must run under qemu-user without a libc prefix
//! ([`elf`]); one archive per platform and SHA256SUMS land in target/dist ([`archive`]).
//! `--verify` then runs every platform's agent as an agent of that platform against a real
//! coordinator ([`verify`]). `--test-agents` builds only what CI's end-to-end test runs.
pub mod archive;
pub mod build;
pub mod elf;
pub mod targets;
pub mod verify;

use crate::binfmt::ForeignArch;
use crate::paths;
use anyhow::{bail, Context};
use comfy_table::{presets, ContentArrangement, Table};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use targets::{DistBinary, DistTarget, Profile, AGENT, DIST_BINARIES, DIST_TARGETS};

/// The platforms whose agents CI's end-to-end test (tests/tests/foreign_agent.rs) runs under
/// qemu-user, built by `--test-agents`.
pub const TEST_AGENT_PLATFORMS: [&str; 2] = ["linux/s390x", "linux/arm64"];
/// The profile of those agents: a debug build takes about half as long as a release one.
pub const TEST_AGENT_PROFILE: Profile = Profile::Debug;

/// `cargo xtask dist [options]`.
#[derive(clap::Args, Debug)]
pub struct DistArgs {
    /// Platforms to build, comma-separated (default: all seven).
    #[arg(long, value_delimiter = ',', value_name = "PLATFORMS")]
    pub platforms: Vec<String>,
    /// Then run each platform's agent (under qemu-user, amd64's natively) against a real
    /// coordinator: join, a job, outputs, the cache (root: registers binfmt_misc).
    #[arg(long)]
    pub verify: bool,
    /// Check, pack and verify what target/dist-build already holds instead of building.
    #[arg(long)]
    pub no_build: bool,
    /// How long the agents sit idle before `--verify` reads their memory.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle: Duration,
    /// Build only the debug agents CI's end-to-end test runs (linux/s390x, linux/arm64); no
    /// archives.
    #[arg(long, conflicts_with_all = ["verify", "platforms"])]
    pub test_agents: bool,
}

/// What became of one binary of one platform.
#[derive(Debug, Clone)]
pub struct BinaryReport {
    /// Its name.
    pub name: &'static str,
    /// The built file.
    pub path: PathBuf,
    /// Bytes.
    pub size: u64,
    /// "static", "static-pie" or "dynamic".
    pub linkage: &'static str,
    /// `--version` under qemu-user (natively for amd64) without QEMU_LD_PREFIX: Ok(first
    /// line) or why not.
    pub runs: Result<String, String>,
}

/// What became of one platform.
#[derive(Debug, Clone)]
pub struct PlatformReport {
    /// The target.
    pub target: &'static DistTarget,
    /// Why nothing was built or shipped for it, if so.
    pub error: Option<String>,
    /// The cargo run's wall time (none with `--no-build`).
    pub build_time: Option<Duration>,
    /// Each binary that was built and passed its ELF check.
    pub binaries: Vec<BinaryReport>,
    /// The archive, when every binary passed.
    pub archive: Option<PathBuf>,
}

impl PlatformReport {
    /// The agent's report, when it was built.
    pub fn agent(&self) -> Option<&BinaryReport> {
        self.binaries.iter().find(|b| b.name == AGENT.name)
    }

    /// Whether every binary is static ("static" or "static-pie").
    pub fn all_static(&self) -> bool {
        !self.binaries.is_empty() && self.binaries.iter().all(|b| b.linkage != "dynamic")
    }
}

/// Runs `cargo xtask dist`; exit code 0 when every platform was built (and verified).
pub async fn run(args: DistArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    if args.test_agents {
        return build_test_agents();
    }
    let targets = selected_targets(&args.platforms)?;
    let reports = build_and_pack(&targets, Profile::Release, !args.no_build)?;
    println!("{}", render_builds(&reports));
    for r in &reports {
        if let Some(e) = &r.error {
            println!("{}: {e}", r.target.platform);
        }
    }
    let out = targets::out_dir();
    println!(
        "archives and SHA256SUMS in {} ({} of {} platforms)",
        out.display(),
        reports.iter().filter(|r| r.archive.is_some()).count(),
        reports.len()
    );
    let mut ok = reports.iter().all(|r| r.archive.is_some());
    if args.verify {
        let rows = verify::run(&reports, args.idle).await?;
        println!("{}", verify::render(&reports, &rows));
        for row in &rows {
            for note in &row.notes {
                println!("{}: {note}", row.platform);
            }
        }
        ok &= rows.iter().all(verify::VerifyRow::passed)
            && rows.len() == reports.iter().filter(|r| r.archive.is_some()).count();
    }
    println!(
        "cargo xtask dist{} took {}",
        if args.verify { " --verify" } else { "" },
        minutes(started.elapsed())
    );
    Ok(if ok { 0 } else { 1 })
}

/// The targets named by `--platforms` in release order (all when none are named).
pub fn selected_targets(given: &[String]) -> anyhow::Result<Vec<&'static DistTarget>> {
    if given.is_empty() {
        return Ok(DIST_TARGETS.iter().collect());
    }
    let mut out: Vec<&'static DistTarget> = Vec::new();
    for g in given {
        let g = g.trim();
        let t = DistTarget::for_platform(g).with_context(|| {
            format!(
                "--platforms: {g:?} is not a release platform ({})",
                DIST_TARGETS
                    .iter()
                    .map(|t| t.platform)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if out.contains(&t) {
            bail!("--platforms names {g} twice");
        }
        out.push(t);
    }
    out.sort_by_key(|t| DIST_TARGETS.iter().position(|d| d == *t));
    Ok(out)
}

/// Builds (unless `build` is false), checks and packs every target; SHA256SUMS at the end.
/// A platform that fails is reported, not an error.
pub fn build_and_pack(
    targets: &[&'static DistTarget],
    profile: Profile,
    build: bool,
) -> anyhow::Result<Vec<PlatformReport>> {
    build::check_rust()?;
    let workspace = paths::workspace_root();
    let build_dir = targets::build_dir();
    let out = targets::out_dir();
    let logs = build_dir.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    if targets.len() == DIST_TARGETS.len() {
        clear_old_archives(&out)?;
    }
    let mtime = archive::source_date_epoch(&workspace)?;
    let stage = build_dir.join("stage");
    let mut reports = Vec::new();
    for target in targets {
        let mut report = PlatformReport {
            target,
            error: None,
            build_time: None,
            binaries: Vec::new(),
            archive: None,
        };
        if let Err(e) = build_one(
            &mut report,
            profile,
            DIST_BINARIES,
            build,
            (&build_dir, &workspace, &logs),
        ) {
            report.error = Some(format!("{e:#}"));
        } else {
            let files: Vec<(&str, PathBuf)> = report
                .binaries
                .iter()
                .map(|b| (b.name, b.path.clone()))
                .collect();
            match archive::pack(target, &files, &stage, &out, mtime) {
                Ok(a) => report.archive = Some(a),
                Err(e) => report.error = Some(format!("{e:#}")),
            }
        }
        reports.push(report);
    }
    archive::write_sha256sums(&out, &archive::archives_in(&out)?)?;
    Ok(reports)
}

/// Builds `binaries` for the report's target, then checks each: it exists, its ELF identity
/// is the platform's, and it runs. Fills `report`; the error says why the platform is out.
fn build_one(
    report: &mut PlatformReport,
    profile: Profile,
    binaries: &[DistBinary],
    build: bool,
    (build_dir, workspace, logs): (&Path, &Path, &Path),
) -> anyhow::Result<()> {
    let target = report.target;
    if let Some(why) = build::missing_toolchain(target) {
        bail!("cannot build here: {why}");
    }
    if build {
        let log = logs.join(format!("build-{}.log", target.file_part()));
        eprintln!(
            "==> building {} for {} ({})",
            binaries
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", "),
            target.platform,
            target.triple
        );
        let outcome = build::build(target, profile, binaries, build_dir, workspace, &log)?;
        report.build_time = Some(outcome.took);
        eprintln!(
            "--> {} {} in {} (log {})",
            target.platform,
            if outcome.error.is_none() {
                "built"
            } else {
                "FAILED"
            },
            minutes(outcome.took),
            outcome.log.display()
        );
        if let Some(e) = outcome.error {
            bail!("{e}");
        }
    }
    for b in binaries {
        let path = target.binary_path(profile, b.name);
        if !path.is_file() {
            bail!(
                "{} is missing{}",
                path.display(),
                if build {
                    ""
                } else {
                    " (run without --no-build)"
                }
            );
        }
        archfarm_proto::elf::check_file(&path, &target.farm_platform())
            .map_err(|e| anyhow::anyhow!("refusing to ship it: {e}"))?;
        if profile == Profile::Release {
            build::check_no_build_paths(&path, &build::build_machine_paths(workspace))
                .context("refusing to ship it")?;
        }
        let facts = elf::read(&path)?;
        let size = std::fs::metadata(&path)
            .with_context(|| format!("failed to stat {}", path.display()))?
            .len();
        let runs = run_version(target, &path);
        report.binaries.push(BinaryReport {
            name: b.name,
            path,
            size,
            linkage: facts.linkage(),
            runs,
        });
    }
    if let Some(b) = report.binaries.iter().find(|b| b.runs.is_err()) {
        bail!(
            "{} does not run: {}",
            b.name,
            b.runs.as_ref().err().map_or("", String::as_str)
        );
    }
    Ok(())
}

/// `binary --version` under the platform's qemu-user (natively for amd64), with
/// QEMU_LD_PREFIX removed so that only a static binary can start.
pub fn run_version(target: &DistTarget, binary: &Path) -> Result<String, String> {
    let mut cmd = match ForeignArch::for_platform(target.platform) {
        None => Command::new(binary),
        Some(arch) => {
            let qemu = arch.qemu_program();
            if !qemu.exists() {
                return Err(format!(
                    "{} is missing (apt install qemu-user-static)",
                    qemu.display()
                ));
            }
            let mut c = Command::new(qemu);
            c.arg(binary);
            c
        }
    };
    let out = cmd
        .arg("--version")
        .env_remove("QEMU_LD_PREFIX")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("failed to start {}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "`{} --version` ended with {}: {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes the archives and SHA256SUMS of an earlier run, so none outlives its platform (a
/// run for some `--platforms` replaces only theirs).
fn clear_old_archives(out: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tar.gz") || name == "SHA256SUMS" {
            std::fs::remove_file(e.path())
                .with_context(|| format!("failed to remove {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// `--test-agents`: the debug agents for linux/s390x and linux/arm64 that
/// tests/tests/foreign_agent.rs runs, checked like release binaries; no archives.
fn build_test_agents() -> anyhow::Result<u8> {
    build::check_rust()?;
    let workspace = paths::workspace_root();
    let build_dir = targets::build_dir();
    let logs = build_dir.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let mut failed = false;
    for platform in TEST_AGENT_PLATFORMS {
        let target = DistTarget::for_platform(platform).context("a release platform")?;
        let mut report = PlatformReport {
            target,
            error: None,
            build_time: None,
            binaries: Vec::new(),
            archive: None,
        };
        let result = build_one(
            &mut report,
            TEST_AGENT_PROFILE,
            &[AGENT],
            true,
            (&build_dir, &workspace, &logs),
        );
        match (&result, report.agent()) {
            (Ok(()), Some(a)) => println!(
                "{platform}: {} ({}, {}, built in {})",
                a.path.display(),
                a.linkage,
                mib(a.size),
                report.build_time.map(minutes).unwrap_or_default()
            ),
            _ => {
                failed = true;
                let why = match result {
                    Err(e) => format!("{e:#}"),
                    Ok(()) => "no agent binary".to_string(),
                };
                println!("{platform}: FAILED: {why}");
            }
        }
    }
    Ok(u8::from(failed))
}

/// The build table: platform, built, static, each binary's size, `--version` under qemu,
/// build time, archive.
pub fn render_builds(reports: &[PlatformReport]) -> Table {
    let mut t = Table::new();
    let mut header = vec!["platform".to_string(), "built".into(), "static".into()];
    header.extend(DIST_BINARIES.iter().map(|b| b.name.to_string()));
    header.extend([
        "runs (no QEMU_LD_PREFIX)".into(),
        "build time".into(),
        "archive".into(),
    ]);
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    for r in reports {
        let mut row = vec![
            r.target.platform.to_string(),
            yes_no(r.error.is_none()).to_string(),
            static_cell(r),
        ];
        for b in DIST_BINARIES {
            row.push(
                r.binaries
                    .iter()
                    .find(|x| x.name == b.name)
                    .map_or("-".to_string(), |x| mib(x.size)),
            );
        }
        row.push(if r.binaries.is_empty() {
            "-".to_string()
        } else {
            yes_no(r.binaries.iter().all(|b| b.runs.is_ok())).to_string()
        });
        row.push(r.build_time.map_or("-".to_string(), minutes));
        row.push(r.archive.as_ref().map_or("-".to_string(), |a| {
            a.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        }));
        t.add_row(row);
    }
    t
}

/// "yes (static-pie)", "no (dynamic)" or "-".
pub fn static_cell(r: &PlatformReport) -> String {
    match r.binaries.first() {
        None => "-".to_string(),
        Some(b) => format!("{} ({})", yes_no(r.all_static()), b.linkage),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Bytes as MiB with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A duration as `12m05s` (or `42.0s` under a minute).
pub fn minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_checked_and_kept_in_release_order() {
        let t = selected_targets(&["linux/s390x".into(), " linux/amd64".into()]).unwrap();
        assert_eq!(
            t.iter().map(|t| t.platform).collect::<Vec<_>>(),
            ["linux/amd64", "linux/s390x"]
        );
        assert_eq!(selected_targets(&[]).unwrap().len(), DIST_TARGETS.len());
        assert!(selected_targets(&["linux/386".into()]).is_err());
        assert!(selected_targets(&["linux/s390x".into(), "linux/s390x".into()]).is_err());
        for p in TEST_AGENT_PLATFORMS {
            assert!(DistTarget::for_platform(p).is_some());
        }
    }

    #[test]
    fn figures_read_well() {
        assert_eq!(minutes(Duration::from_secs(725)), "12m05s");
        assert_eq!(minutes(Duration::from_millis(4200)), "4.2s");
        assert_eq!(mib(15 * 1024 * 1024 + 512 * 1024), "15.5 MiB");
    }
}
