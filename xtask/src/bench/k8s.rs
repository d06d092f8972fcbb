//! `cargo xtask bench k8s`: the farm against the QEMU path CI uses today, on real Kubernetes
//! code (k8s.io/utils from Debian's golang-k8s-utils-dev, in a GOPATH copy), in one run:
//!
//! - (a) per foreign platform, the Go toolchain itself runs under qemu-user: an emulated `go
//!   test ./...` compiles, vets, links and runs every package's tests with a cold GOCACHE.
//!   The toolchain is the host's GOROOT with `go`, the tools `go` execs and the standard
//!   library cross-compiled for the platform ([`foreign_toolchain`]); binfmt_misc (registered
//!   and removed again by [`BinfmtGuard`]) lets the emulated `go` exec its emulated compiler,
//!   linker and test binaries. Without root it falls back to `-toolexec`/`-exec` with qemu.
//! - (b) the farm cold: a private coordinator, one native linux/amd64 agent and one emulated
//!   agent per foreign platform, `farm go-test --allow-emulation` on all of them, with a cold
//!   GOCACHE and an empty farm;
//! - (c) the same command again: everything comes from the farm's cache;
//! - (d) Go's own cached `go test ./...` on amd64 (one run to warm, the second timed).
//!
//! It prints a table and the ratios (a)/(b) (aim: at least 4) and (c)/(d) (aim: at most 1).
//! Missing an aim is a finding, not an error: the exit code is non-zero only when a
//! measurement could not be made. Every process it starts is stopped on the way out, on
//! error and on Ctrl-C too.
use super::private::PrivateCoordinator;
use crate::binfmt::{BinfmtGuard, ForeignArch, FOREIGN_ARCHES};
use crate::demo::{build_binaries, log_tail, run_checked, spawn_logged};
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::farm::display::{format_duration, now_unix_ms};
use archfarm_client::farm::job::get_job;
use archfarm_client::farm::status::farm_status;
use archfarm_client::farm::{token, FarmClient};
use archfarm_proto::v1;
use archfarm_proto::Platform;
use comfy_table::{presets, ContentArrangement, Table};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The foreign platforms measured unless `--platforms` says otherwise.
pub const DEFAULT_PLATFORMS: &str = "linux/arm64,linux/ppc64le,linux/s390x,linux/riscv64";
/// The Kubernetes library measured, inside the GOPATH copy.
pub const K8S_UTILS: &str = "k8s.io/utils";
/// Debian's GOPATH tree that holds it (golang-k8s-utils-dev).
pub const DEBIAN_GOCODE: &str = "/usr/share/gocode";
/// The aims of issue 4.
pub const AIM_COLD_RATIO: f64 = 4.0;
pub const AIM_WARM_RATIO: f64 = 1.0;
/// How long the agents get to come up.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped agent gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The tools `go build` and `go test` exec from `$GOROOT/pkg/tool/<os>_<arch>/`.
const GO_TOOLS: [&str; 9] = [
    "compile",
    "link",
    "asm",
    "cgo",
    "buildid",
    "vet",
    "test2json",
    "pack",
    "cover",
];

/// `cargo xtask bench k8s [options]`.
#[derive(clap::Args, Debug)]
pub struct K8sArgs {
    /// Foreign platforms, comma-separated: each gets a QEMU baseline (a) and an emulated agent;
    /// a native linux/amd64 agent is always there.
    #[arg(long, value_delimiter = ',', value_name = "PLATFORMS", default_value = DEFAULT_PLATFORMS)]
    pub platforms: Vec<String>,
    /// Keep the work directory (GOPATH copy, Go caches, every log, the farm's data).
    #[arg(long)]
    pub keep: bool,
    /// Measure (a) with `go test -toolexec=qemu -exec=qemu` instead of registering qemu-user
    /// with binfmt_misc (what happens without root; tests that re-exec themselves then fail).
    #[arg(long)]
    pub no_binfmt: bool,
    /// Slots per agent.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub slots: u32,
    /// Stop one platform's QEMU `go test` after this long; its time is then a lower bound.
    #[arg(long, value_name = "DURATION", default_value = "60m", value_parser = humantime::parse_duration)]
    pub qemu_timeout: Duration,
}

/// The foreign architectures named by `--platforms`, in order, without duplicates.
pub fn parse_platforms(given: &[String]) -> anyhow::Result<Vec<ForeignArch>> {
    let mut out: Vec<ForeignArch> = Vec::new();
    for g in given {
        let p: Platform = g.trim().parse()?;
        let arch = FOREIGN_ARCHES
            .iter()
            .filter(|a| DEFAULT_PLATFORMS.split(',').any(|d| d == a.platform))
            .find(|a| a.platform == p.to_string())
            .with_context(|| {
                format!(
                    "--platforms: {p} is not a foreign platform this benchmark emulates; it takes \
                     {DEFAULT_PLATFORMS} (linux/amd64 is always measured, natively)"
                )
            })?;
        if out.contains(arch) {
            bail!("--platforms names {p} twice");
        }
        out.push(*arch);
    }
    if out.is_empty() {
        bail!("--platforms names no platform");
    }
    Ok(out)
}

/// Package lines of `go test`'s text output.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GoTestSummary {
    /// Packages that passed (`ok`), cached or not.
    pub ok: usize,
    /// Of those, the ones Go answered from its test cache (`(cached)`).
    pub cached: usize,
    /// Packages that failed, did not build or timed out.
    pub failed: Vec<String>,
    /// Packages without test files.
    pub no_tests: usize,
}

impl GoTestSummary {
    /// Reads the `ok`, `FAIL` and `?` package lines of `go test` output.
    pub fn parse(output: &str) -> Self {
        let mut s = Self::default();
        for line in output.lines() {
            let mut fields = line.split('\t');
            let (Some(head), Some(pkg)) = (fields.next(), fields.next()) else {
                continue;
            };
            let pkg = pkg.split(' ').next().unwrap_or(pkg);
            match head.trim_end() {
                "ok" => {
                    s.ok += 1;
                    if line.ends_with("(cached)") {
                        s.cached += 1;
                    }
                }
                "FAIL" => s.failed.push(pkg.to_string()),
                "?" => s.no_tests += 1,
                _ => {}
            }
        }
        s
    }

    /// `26 ok, 1 FAIL (k8s.io/utils/exec), 2 without tests`.
    pub fn words(&self) -> String {
        let mut w = format!("{} ok", self.ok);
        if self.cached > 0 {
            w.push_str(&format!(" ({} cached)", self.cached));
        }
        if !self.failed.is_empty() {
            w.push_str(&format!(
                ", {} FAIL ({})",
                self.failed.len(),
                self.failed.join(", ")
            ));
        }
        w.push_str(&format!(", {} without tests", self.no_tests));
        w
    }
}

/// A measured wall time; `complete` is false when the run was stopped at a timeout, so the
/// time is a lower bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub elapsed: Duration,
    pub complete: bool,
}

/// One row of the result table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured.
    pub what: String,
    /// Its wall time, when it was measured.
    pub time: Option<Timing>,
    /// Everything else worth knowing.
    pub detail: String,
}

impl Row {
    fn new(what: impl Into<String>, time: Option<Timing>, detail: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            time,
            detail: detail.into(),
        }
    }
}

/// `a / b`, when both are there and b is not zero.
pub fn ratio(a: Option<Duration>, b: Option<Duration>) -> Option<f64> {
    let (a, b) = (a?.as_secs_f64(), b?.as_secs_f64());
    (b > 0.0).then(|| a / b)
}

/// `(a)/(b) = 9m 12s / 1m 30s = 6.1 (aim >= 4: met)`.
pub fn ratio_line(name: &str, a: Option<Timing>, b: Option<Timing>, aim: Aim) -> String {
    let shown = |t: Option<Timing>| match t {
        Some(t) if t.complete => format_duration(t.elapsed),
        Some(t) => format!(">= {}", format_duration(t.elapsed)),
        None => "not measured".to_string(),
    };
    let value = ratio(a.map(|t| t.elapsed), b.map(|t| t.elapsed));
    let lower_bound = a.is_some_and(|t| !t.complete);
    let verdict = match value {
        None => "unknown".to_string(),
        Some(v) => {
            let met = aim.met(v);
            // A numerator stopped early only ever grows: an unmet at-least aim stays open.
            if !met && lower_bound && matches!(aim, Aim::AtLeast(_)) {
                "not met so far (lower bound)".to_string()
            } else if met {
                "met".to_string()
            } else {
                "NOT met".to_string()
            }
        }
    };
    format!(
        "{name} = {} / {} = {} (aim {aim}: {verdict})",
        shown(a),
        shown(b),
        value.map_or("n/a".to_string(), |v| format!(
            "{}{v:.2}",
            if lower_bound { ">= " } else { "" }
        )),
    )
}

/// What a ratio should be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aim {
    AtLeast(f64),
    AtMost(f64),
}

impl Aim {
    /// Whether `v` meets it.
    pub fn met(self, v: f64) -> bool {
        match self {
            Aim::AtLeast(x) => v >= x,
            Aim::AtMost(x) => v <= x,
        }
    }
}

impl std::fmt::Display for Aim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Aim::AtLeast(x) => write!(f, ">= {x}"),
            Aim::AtMost(x) => write!(f, "<= {x}"),
        }
    }
}

/// The table printed at the end.
pub fn render_rows(rows: &[Row]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec!["measurement", "wall time", "detail"]);
    for r in rows {
        let time = match r.time {
            None => "-".to_string(),
            Some(t) if t.complete => format_duration_precise(t.elapsed),
            Some(t) => format!(">= {}", format_duration_precise(t.elapsed)),
        };
        t.add_row(vec![r.what.clone(), time, r.detail.clone()]);
    }
    t
}

/// Milliseconds below 10 s (`842ms`, `1234ms`), else [`format_duration`].
fn format_duration_precise(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{}ms", d.as_millis())
    } else {
        format_duration(d)
    }
}

/// Runs the benchmark; Ctrl-C or SIGTERM stops it, and every process and binfmt_misc entry
/// it made goes with it (the guards of [`measure`] drop).
pub async fn run(args: &K8sArgs) -> anyhow::Result<u8> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    tokio::select! {
        result = measure(args) => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping everything this benchmark started");
            Ok(130)
        }
        _ = term.recv() => {
            eprintln!("terminated: stopping everything this benchmark started");
            Ok(143)
        }
    }
}

/// The host's Go: its GOROOT and version.
#[derive(Debug, Clone)]
struct HostGo {
    goroot: PathBuf,
    version: String,
}

async fn host_go() -> anyhow::Result<HostGo> {
    let out = tokio::process::Command::new("go")
        .args(["env", "GOROOT", "GOVERSION"])
        .env_remove("GOFLAGS")
        .output()
        .await
        .context("failed to run `go env` (install golang-go)")?;
    if !out.status.success() {
        bail!(
            "failed to run `go env`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(root), Some(version)) if !root.is_empty() && !version.is_empty() => Ok(HostGo {
            goroot: PathBuf::from(root),
            version: version.to_string(),
        }),
        _ => bail!("failed to read GOROOT and GOVERSION from `go env`: {text:?}"),
    }
}

/// Checks what the benchmark needs before starting anything.
fn check_prerequisites(arches: &[ForeignArch]) -> anyhow::Result<()> {
    let utils = Path::new(DEBIAN_GOCODE).join("src").join(K8S_UTILS);
    if !utils.is_dir() {
        bail!(
            "{} is missing: install golang-k8s-utils-dev (apt-get install golang-k8s-utils-dev)",
            utils.display()
        );
    }
    for a in arches {
        let q = a.qemu_program();
        if !q.is_file() {
            bail!("{} is missing: install qemu-user-static", q.display());
        }
    }
    Ok(())
}

/// Everything `measure` needs to know about the machine and the work directory.
struct Setup {
    work: PathBuf,
    logs: PathBuf,
    gopath: PathBuf,
    utils: PathBuf,
    xtask: PathBuf,
}

impl Setup {
    /// The environment every Go command here shares: GOPATH mode on the copy, no cgo, the
    /// given GOCACHE, and nothing inherited that would change what is built.
    fn go_env(&self, cmd: &mut tokio::process::Command, gocache: &Path) {
        cmd.current_dir(&self.utils)
            .env("GOPATH", &self.gopath)
            .env("GO111MODULE", "off")
            .env("GOCACHE", gocache)
            .env("CGO_ENABLED", "0")
            .env("NO_COLOR", "1");
        for var in ["GOFLAGS", "GOOS", "GOARCH", "GOARM", "GOENV"] {
            cmd.env_remove(var);
        }
    }

    /// A fresh, empty directory for a Go build cache.
    fn fresh_cache(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.work.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("failed to remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        Ok(dir)
    }
}

/// The benchmark proper; see the module documentation.
async fn measure(args: &K8sArgs) -> anyhow::Result<u8> {
    let arches = parse_platforms(&args.platforms)?;
    if args.slots == 0 {
        bail!("--slots must be at least 1");
    }
    check_prerequisites(&arches)?;
    let host = host_go().await?;
    let target = paths::target_dir();
    std::fs::create_dir_all(&target)
        .with_context(|| format!("failed to create {}", target.display()))?;
    let work_dir = tempfile::Builder::new()
        .prefix("bench-k8s-")
        .tempdir_in(&target)
        .context("failed to create the work directory")?;
    let work = work_dir.path().to_path_buf();
    // Kept from the start with --keep, so that an interrupted run keeps it too.
    let mut work_dir = if args.keep {
        let _ = work_dir.keep();
        None
    } else {
        Some(work_dir)
    };
    let logs = work.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    eprintln!("work directory {} (logs in logs/)", work.display());
    let result = measure_in(args, &arches, &host, &work, &logs).await;
    match work_dir.take() {
        None => eprintln!("kept the work directory {}", work.display()),
        Some(dir) if result.is_err() => {
            // What failed is only in the logs: keep them.
            let kept = dir.keep();
            eprintln!("kept the work directory {} for its logs", kept.display());
        }
        Some(_) => {}
    }
    result
}

async fn measure_in(
    args: &K8sArgs,
    arches: &[ForeignArch],
    host: &HostGo,
    work: &Path,
    logs: &Path,
) -> anyhow::Result<u8> {
    // Untimed preparation: the GOPATH copy, the foreign toolchains, the binaries.
    let gopath = work.join("gopath");
    run_checked(
        Command::new("cp").arg("-r").arg(DEBIAN_GOCODE).arg(&gopath),
        &format!("copy {DEBIAN_GOCODE}"),
    )?;
    let setup = Setup {
        work: work.to_path_buf(),
        logs: logs.to_path_buf(),
        utils: gopath.join("src").join(K8S_UTILS),
        gopath,
        xtask: std::env::current_exe().context("failed to find the xtask binary")?,
    };
    let mut rows = Vec::new();
    let mut failed = false;
    let mut toolchains = BTreeMap::new();
    for arch in arches {
        let started = Instant::now();
        match foreign_toolchain(host, arch, logs).await {
            Ok((root, built)) => {
                let how = if built {
                    format!("built in {}", format_duration(started.elapsed()))
                } else {
                    "reused".to_string()
                };
                eprintln!(
                    "Go toolchain for {}: {} ({how})",
                    arch.platform(),
                    root.display()
                );
                toolchains.insert(arch.goarch, root);
            }
            Err(e) => {
                failed = true;
                eprintln!(
                    "failed to build the Go toolchain for {}: {e:#}",
                    arch.platform()
                );
                rows.push(Row::new(
                    format!("(a) QEMU go test, {}", arch.platform()),
                    None,
                    format!("error: no toolchain: {e:#}"),
                ));
            }
        }
    }
    build_binaries(&["archfarm-agent"])?;

    // (b), (c): the farm, cold then warm.
    let mut farm_platforms = vec!["linux/amd64".to_string()];
    farm_platforms.extend(arches.iter().map(ForeignArch::platform));
    let (b, b_per_platform, c) = {
        let farm = BenchFarm::start(&setup, arches, args.slots).await?;
        let gocache = setup.fresh_cache("gocache-farm")?;
        eprintln!(
            "(b) farm cold: `{}` in {}",
            farm_command_words(&farm_platforms),
            setup.utils.display()
        );
        let start_ms = now_unix_ms();
        let cold = farm
            .go_test(&setup, &gocache, &farm_platforms, "farm-cold")
            .await;
        let per_platform = match &cold {
            Ok(_) => farm
                .platform_finish_times(start_ms)
                .await
                .unwrap_or_else(|e| {
                    eprintln!("failed to read the per-platform times: {e:#}");
                    BTreeMap::new()
                }),
            Err(_) => BTreeMap::new(),
        };
        eprintln!("(c) farm warm: the same command again");
        let warm = farm
            .go_test(&setup, &gocache, &farm_platforms, "farm-warm")
            .await;
        farm.stop(logs);
        (cold, per_platform, warm)
    };
    let n = farm_platforms.len();
    let b_makespans = b.as_ref().map(|r| r.makespans.clone()).unwrap_or_default();
    let b_time = record(
        &mut rows,
        &mut failed,
        format!("(b) farm cold, {n} platforms"),
        b,
    );
    for (platform, t) in &b_per_platform {
        rows.push(Row::new(
            format!("(b) farm cold: {platform} done after"),
            Some(Timing {
                elapsed: *t,
                complete: true,
            }),
            format!(
                "from the start of (b) to the end of its last shard; run on agents: {}",
                b_makespans.get(platform).map_or("?", String::as_str)
            ),
        ));
    }
    let c_time = record(
        &mut rows,
        &mut failed,
        format!("(c) farm warm, {n} platforms"),
        c,
    );

    // (d): Go's own test cache on amd64.
    eprintln!("(d) go test ./... on linux/amd64, twice (the second from Go's cache)");
    let d = go_cached(&setup).await;
    let d_time = match d {
        Ok((first, second)) => {
            rows.push(first);
            let t = second.time;
            rows.push(second);
            t
        }
        Err(e) => {
            failed = true;
            rows.push(Row::new(
                "(d) go test ./... linux/amd64, cached",
                None,
                format!("error: {e:#}"),
            ));
            None
        }
    };

    // (a): the QEMU path, last, so that binfmt_misc is registered only while it runs (the
    // farm's emulated agents must not profit from it).
    let mode = if args.no_binfmt {
        QemuMode::Toolexec("--no-binfmt".to_string())
    } else {
        QemuMode::Binfmt
    };
    let a_arches: Vec<ForeignArch> = arches
        .iter()
        .filter(|a| toolchains.contains_key(a.goarch))
        .copied()
        .collect();
    let (mode, binfmt) = match mode {
        QemuMode::Binfmt if !a_arches.is_empty() => match BinfmtGuard::register(&a_arches) {
            Ok(g) => (QemuMode::Binfmt, Some(g)),
            Err(e) => {
                let why = format!("{e:#}");
                eprintln!(
                    "cannot register qemu-user with binfmt_misc ({why}); measuring (a) with \
                     -toolexec and -exec instead"
                );
                (QemuMode::Toolexec(why), None)
            }
        },
        other => (other, None),
    };
    let mut a_per_platform = BTreeMap::new();
    for arch in &a_arches {
        let root = &toolchains[arch.goarch];
        eprintln!(
            "(a) QEMU: emulated `go test ./...` for {} ({})",
            arch.platform(),
            mode.words()
        );
        let what = format!("(a) QEMU go test, {}", arch.platform());
        match qemu_go_test(&setup, arch, root, &mode, args.qemu_timeout).await {
            Ok(row) => {
                if let Some(t) = row.time {
                    a_per_platform.insert(arch.platform(), t);
                }
                rows.push(row);
            }
            Err(e) => {
                failed = true;
                rows.push(Row::new(what, None, format!("error: {e:#}")));
            }
        }
    }
    drop(binfmt);

    let a_sum = (a_per_platform.len() == arches.len()).then(|| Timing {
        elapsed: a_per_platform.values().map(|t| t.elapsed).sum(),
        complete: a_per_platform.values().all(|t| t.complete),
    });
    if let Some(sum) = a_sum {
        rows.push(Row::new(
            format!("(a) QEMU, sum of {} platforms", a_per_platform.len()),
            Some(sum),
            "one after another, as CI jobs share these cores",
        ));
    }

    println!(
        "k8s.io/utils ({}), {} cores, Go {}",
        setup.utils.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        host.version
    );
    println!("{}", render_rows(&rows));
    println!("(a) is: {}", mode.baseline_words());
    println!(
        "(b), (c) are: `cargo xtask {}` against a private coordinator with a native \
         linux/amd64 agent and an emulated agent (qemu-user) per foreign platform, {} slots \
         each; (b) with an empty farm and a cold GOCACHE, (c) right after it",
        farm_command_words(&farm_platforms),
        args.slots
    );
    println!(
        "(d) is: `go test ./...` natively on linux/amd64, run once to fill Go's caches, then timed"
    );
    println!(
        "{}",
        ratio_line("(a)/(b)", a_sum, b_time, Aim::AtLeast(AIM_COLD_RATIO))
    );
    for (platform, a) in &a_per_platform {
        let b = b_per_platform.get(platform).map(|t| Timing {
            elapsed: *t,
            complete: true,
        });
        println!(
            "  {}",
            ratio_line(
                &format!("{platform}: (a)/(b)"),
                Some(*a),
                b,
                Aim::AtLeast(AIM_COLD_RATIO)
            )
        );
    }
    println!(
        "{}",
        ratio_line("(c)/(d)", c_time, d_time, Aim::AtMost(AIM_WARM_RATIO))
    );
    Ok(u8::from(failed))
}

/// Adds the row of a farm run; returns its time.
fn record(
    rows: &mut Vec<Row>,
    failed: &mut bool,
    what: String,
    result: anyhow::Result<FarmRun>,
) -> Option<Timing> {
    match result {
        Ok(run) => {
            let t = Timing {
                elapsed: run.elapsed,
                complete: true,
            };
            rows.push(Row::new(what, Some(t), run.detail));
            Some(t)
        }
        Err(e) => {
            *failed = true;
            rows.push(Row::new(what, None, format!("error: {e:#}")));
            None
        }
    }
}

/// `farm go-test --allow-emulation --platform linux/amd64 ... ./...`.
fn farm_command_words(platforms: &[String]) -> String {
    let mut w = "farm go-test --allow-emulation".to_string();
    for p in platforms {
        w.push_str(&format!(" --platform {p}"));
    }
    w.push_str(" ./...");
    w
}

/// A child process in its own process group; the whole group is killed when it ends or is
/// dropped, so nothing it started outlives the benchmark.
struct GroupChild {
    child: tokio::process::Child,
    pgid: Option<Pid>,
}

impl GroupChild {
    /// Starts `cmd` in a new process group with stdout and stderr appended to `log`.
    fn spawn(mut cmd: tokio::process::Command, log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("failed to open {}", log.display()))?;
        let file_err = file
            .try_clone()
            .with_context(|| format!("failed to open {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file)
            .stderr(file_err)
            .process_group(0)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .with_context(|| format!("failed to start {:?}", cmd.as_std()))?;
        let pgid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        Ok(Self { child, pgid })
    }

    /// Waits for it, at most `timeout`: None when the timeout ended it (group killed).
    async fn wait(&mut self, timeout: Option<Duration>) -> anyhow::Result<Option<ExitStatus>> {
        let waited = match timeout {
            Some(t) => tokio::time::timeout(t, self.child.wait()).await.ok(),
            None => Some(self.child.wait().await),
        };
        // Leftovers (a test's children, a deadlocked emulated fork) go with it either way.
        self.kill_group();
        match waited {
            Some(status) => Ok(Some(status.context("failed to wait for a child")?)),
            None => {
                let _ = self.child.wait().await;
                Ok(None)
            }
        }
    }

    fn kill_group(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Runs `cmd` with its output in `logs/<name>.log`; returns its wall time, its exit status
/// (None: stopped at `timeout`) and its output.
async fn run_logged(
    cmd: tokio::process::Command,
    logs: &Path,
    name: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<(Duration, Option<ExitStatus>, String)> {
    let log = logs.join(format!("{name}.log"));
    let started = Instant::now();
    let mut child = GroupChild::spawn(cmd, &log)?;
    let status = child.wait(timeout).await?;
    let elapsed = started.elapsed();
    let output = std::fs::read_to_string(&log)
        .with_context(|| format!("failed to read {}", log.display()))?;
    Ok((elapsed, status, output))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A foreign Go toolchain for `arch`, cross-compiled from the host's GOROOT and kept under
/// target/bench-k8s/ (rebuilt when the host's Go changes); returns its GOROOT and whether it
/// was built now. The recipe, all with the host's `go` and `CGO_ENABLED=0`:
/// 1. `cp -rL $GOROOT` (Debian's GOROOT is made of symlinks into /usr/share, which `go`
///    does not follow when it walks `std`);
/// 2. `GOOS=linux GOARCH=<arch> go build -o <root>/bin/go cmd/go`, and the tools `go` execs
///    (compile, link, asm, cgo, buildid, vet, test2json, pack, cover) into
///    `<root>/pkg/tool/linux_<arch>/`;
/// 3. `GOROOT=<root> GOOS=linux GOARCH=<arch> go install std`: the standard library
///    precompiled into `<root>/pkg/linux_<arch>/`, as Go 1.19's release archives ship it (so
///    the emulated `go` does not rebuild it: CI's Go images have it too);
/// 4. the host's binaries are removed, and `go version` under qemu must say linux/<arch>.
///
/// That is what `GOOS=linux GOARCH=<arch> src/bootstrap.bash` yields, minus the tools `go
/// test` never runs and make.bash's repeated compiler builds.
async fn foreign_toolchain(
    host: &HostGo,
    arch: &ForeignArch,
    logs: &Path,
) -> anyhow::Result<(PathBuf, bool)> {
    let base = paths::target_dir().join("bench-k8s");
    let root = base.join(format!("{}-linux-{}", host.version, arch.goarch));
    let marker = root.join(".archfarm-bench-k8s");
    let stamp = format!("{}\n{}\n", host.goroot.display(), host.version);
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == stamp) {
        return Ok((root, false));
    }
    let building = base.join(format!(".building-{}", arch.goarch));
    for dir in [&root, &building] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("failed to remove {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(&base)
        .with_context(|| format!("failed to create {}", base.display()))?;
    eprintln!(
        "building a Go toolchain for {} from {} (once; kept in {})",
        arch.platform(),
        host.goroot.display(),
        root.display()
    );
    let result = build_toolchain(host, arch, &building, &base, logs).await;
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&building);
        return Err(e);
    }
    std::fs::write(building.join(".archfarm-bench-k8s"), &stamp)
        .context("failed to mark the toolchain complete")?;
    std::fs::rename(&building, &root).with_context(|| {
        format!(
            "failed to rename {} to {}",
            building.display(),
            root.display()
        )
    })?;
    Ok((root, true))
}

async fn build_toolchain(
    host: &HostGo,
    arch: &ForeignArch,
    root: &Path,
    base: &Path,
    logs: &Path,
) -> anyhow::Result<()> {
    let log_name = format!("toolchain-{}", arch.goarch);
    let step = |what: &str, mut cmd: tokio::process::Command| {
        cmd.env("CGO_ENABLED", "0")
            .env("GOCACHE", base.join("gocache-toolchains"))
            .env_remove("GOFLAGS")
            .env_remove("GOARM");
        let what = what.to_string();
        let log_name = log_name.clone();
        async move {
            let (_, status, output) = run_logged(cmd, logs, &log_name, None).await?;
            if !status.is_some_and(|s| s.success()) {
                bail!("failed to {what}:\n{}", tail(&output, 20));
            }
            anyhow::Ok(())
        }
    };
    let mut cp = tokio::process::Command::new("cp");
    cp.arg("-rL").arg(&host.goroot).arg(root);
    step(&format!("copy {}", host.goroot.display()), cp).await?;
    // The host's own archives and binaries do not belong in a foreign GOROOT.
    for dir in [root.join("pkg").join("linux_amd64"), root.join("bin")] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("failed to remove {}", dir.display()))?;
        }
    }
    let tool_dir = root
        .join("pkg")
        .join("tool")
        .join(format!("linux_{}", arch.goarch));
    std::fs::create_dir_all(&tool_dir)
        .with_context(|| format!("failed to create {}", tool_dir.display()))?;
    let cross = |args: Vec<OsString>| {
        let mut c = tokio::process::Command::new("go");
        c.args(args)
            .env("GOOS", "linux")
            .env("GOARCH", arch.goarch)
            .env_remove("GOROOT");
        c
    };
    step(
        "cross-compile cmd/go",
        cross(vec![
            "build".into(),
            "-o".into(),
            root.join("bin").join("go").into(),
            "cmd/go".into(),
        ]),
    )
    .await?;
    let mut args: Vec<OsString> = vec!["build".into(), "-o".into()];
    // A trailing slash: `go build -o DIR/` writes every command into DIR.
    let mut dir_arg = tool_dir.clone().into_os_string();
    dir_arg.push("/");
    args.push(dir_arg);
    args.extend(GO_TOOLS.iter().map(|t| OsString::from(format!("cmd/{t}"))));
    step("cross-compile the Go tools", cross(args)).await?;
    let mut std = cross(vec!["install".into(), "std".into()]);
    std.env("GOROOT", root);
    step("precompile the standard library", std).await?;
    let host_tools = root.join("pkg").join("tool").join("linux_amd64");
    if host_tools.exists() {
        std::fs::remove_dir_all(&host_tools)
            .with_context(|| format!("failed to remove {}", host_tools.display()))?;
    }
    for tool in GO_TOOLS {
        let p = tool_dir.join(tool);
        if !p.is_file() {
            bail!("{} was not built", p.display());
        }
    }
    let out = tokio::process::Command::new(arch.qemu_program())
        .arg(root.join("bin").join("go"))
        .arg("version")
        .env("GOROOT", root)
        .output()
        .await
        .context("failed to run the foreign go under qemu")?;
    let said = String::from_utf8_lossy(&out.stdout);
    if !said.contains(&format!("linux/{}", arch.goarch)) {
        bail!(
            "the foreign go says {said:?} under qemu, not linux/{}: {}",
            arch.goarch,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// How the emulated `go` runs the foreign programs it execs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum QemuMode {
    /// binfmt_misc runs them through qemu-user, as on a CI runner with qemu registered.
    Binfmt,
    /// `-toolexec` and `-exec` put qemu-user in front of them (the reason binfmt is not used).
    Toolexec(String),
}

impl QemuMode {
    fn words(&self) -> &'static str {
        match self {
            QemuMode::Binfmt => "binfmt_misc",
            QemuMode::Toolexec(_) => "-toolexec/-exec",
        }
    }

    fn baseline_words(&self) -> String {
        let common = "`qemu-<arch>-static <root>/bin/go test ./...` in k8s.io/utils with \
                      GOROOT=<root> (a Go toolchain whose go, compile, link, asm, vet, ... and \
                      standard library were cross-compiled for <arch> from the host's Go), a \
                      cold GOCACHE, CGO_ENABLED=0, GO111MODULE=off: the Go toolchain itself \
                      compiles, vets, links and runs the tests under qemu-user, one platform \
                      after another";
        match self {
            QemuMode::Binfmt => format!(
                "{common}; qemu-user is registered with binfmt_misc (flags F) for the \
                 programs go execs, as CI runners register it"
            ),
            QemuMode::Toolexec(why) => format!(
                "{common}, plus -toolexec=qemu -exec=qemu because binfmt_misc was not used \
                 ({why}); tests that re-exec their own binary fail this way"
            ),
        }
    }
}

/// (a) for one platform: the emulated `go test ./...` with a cold GOCACHE.
async fn qemu_go_test(
    setup: &Setup,
    arch: &ForeignArch,
    root: &Path,
    mode: &QemuMode,
    timeout: Duration,
) -> anyhow::Result<Row> {
    let gocache = setup.fresh_cache(&format!("gocache-qemu-{}", arch.goarch))?;
    let qemu = arch.qemu_program();
    let mut cmd = tokio::process::Command::new(&qemu);
    setup.go_env(&mut cmd, &gocache);
    cmd.arg(root.join("bin").join("go")).arg("test");
    if matches!(mode, QemuMode::Toolexec(_)) {
        let mut toolexec = OsString::from("-toolexec=");
        toolexec.push(&qemu);
        let mut exec = OsString::from("-exec=");
        exec.push(&qemu);
        cmd.arg(toolexec).arg(exec);
    }
    cmd.arg("./...").env("GOROOT", root);
    let (elapsed, status, output) = run_logged(
        cmd,
        &setup.logs,
        &format!("qemu-{}", arch.goarch),
        Some(timeout),
    )
    .await?;
    let summary = GoTestSummary::parse(&output);
    let what = format!("(a) QEMU go test, {}", arch.platform());
    match status {
        None => Ok(Row::new(
            what,
            Some(Timing {
                elapsed,
                complete: false,
            }),
            format!(
                "stopped at --qemu-timeout {}; so far {}",
                format_duration(timeout),
                summary.words()
            ),
        )),
        Some(_) if summary.ok == 0 => bail!(
            "no package passed; the end of logs/qemu-{}.log:\n{}",
            arch.goarch,
            tail(&output, 15)
        ),
        Some(st) => Ok(Row::new(
            what,
            Some(Timing {
                elapsed,
                complete: true,
            }),
            format!(
                "{}; go exited {}; {}",
                summary.words(),
                st.code()
                    .map_or("by a signal".to_string(), |c| c.to_string()),
                mode.words()
            ),
        )),
    }
}

/// (d): `go test ./...` on amd64 twice with one fresh GOCACHE; rows for both runs.
async fn go_cached(setup: &Setup) -> anyhow::Result<(Row, Row)> {
    let gocache = setup.fresh_cache("gocache-native")?;
    let mut rows = Vec::new();
    for (name, what) in [
        (
            "native-cold",
            "(d0) go test ./... linux/amd64, cold (warms the cache)",
        ),
        ("native-cached", "(d) go test ./... linux/amd64, cached"),
    ] {
        let mut cmd = tokio::process::Command::new("go");
        setup.go_env(&mut cmd, &gocache);
        cmd.args(["test", "./..."]);
        let (elapsed, _, output) = run_logged(cmd, &setup.logs, name, None).await?;
        let summary = GoTestSummary::parse(&output);
        if summary.ok == 0 {
            bail!(
                "no package passed; the end of logs/{name}.log:\n{}",
                tail(&output, 15)
            );
        }
        rows.push(Row::new(
            what,
            Some(Timing {
                elapsed,
                complete: true,
            }),
            summary.words(),
        ));
    }
    let second = rows.pop().context("no second run")?;
    let first = rows.pop().context("no first run")?;
    Ok((first, second))
}

/// One `farm go-test` run: its wall time and what it said.
struct FarmRun {
    elapsed: Duration,
    detail: String,
    /// Per platform, its makespan line (shards and their longest run).
    makespans: BTreeMap<String, String>,
}

/// What `farm go-test` says about a run, for the table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FarmNotes {
    /// The verdict counts (its last line), e.g. `130 pass`.
    pub counts: String,
    /// `26 packages with tests on 5 platforms: 0 cached, 130 to build and run`.
    pub plan: Option<String>,
    /// `built 130 of 130 test binaries in 1m 2s` (cross-compiled on this machine).
    pub built: Option<String>,
    /// `uploaded 227 of 227 blobs (...)`.
    pub uploaded: Option<String>,
    /// Per platform: `3 shards, predicted makespan 1m 30s, actual 6.2s`.
    pub makespans: BTreeMap<String, String>,
}

impl FarmNotes {
    /// Picks the lines out of `farm go-test`'s output.
    pub fn parse(output: &str) -> Self {
        let mut notes = Self {
            counts: output
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .trim()
                .to_string(),
            ..Self::default()
        };
        for line in output.lines().map(str::trim) {
            if line.contains(" packages with tests on ") || line.contains(" package with tests on ")
            {
                notes.plan = Some(line.to_string());
            } else if line.starts_with("built ") && line.contains(" test binar") {
                notes.built = Some(line.to_string());
            } else if line.starts_with("uploaded ") {
                notes.uploaded = Some(line.to_string());
            } else if let Some((platform, rest)) = line.split_once(": ") {
                if rest.contains("predicted makespan") && !platform.contains(' ') {
                    notes
                        .makespans
                        .insert(platform.to_string(), rest.to_string());
                }
            }
        }
        notes
    }
}

/// An agent process this benchmark started.
struct AgentProcess {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

/// The benchmark's farm: a private coordinator and its agents, stopped on drop.
struct BenchFarm {
    agents: Vec<AgentProcess>,
    coordinator: Option<PrivateCoordinator>,
    client: FarmClient,
}

impl BenchFarm {
    /// A private coordinator, a native linux/amd64 agent and an emulated agent per foreign
    /// platform, all ready.
    async fn start(setup: &Setup, arches: &[ForeignArch], slots: u32) -> anyhow::Result<Self> {
        let (coordinator, mut client) = PrivateCoordinator::start(None).await?;
        eprintln!(
            "started a private coordinator at {}",
            coordinator.options.coordinator
        );
        // The bench's own agents: trusted, so (c) can come from the farm's cache.
        let join = token::create_token(
            &mut client,
            Duration::from_secs(3600),
            &[token::trusted_label()],
            false,
            "cargo xtask bench k8s agents",
        )
        .await?;
        let mut farm = Self {
            agents: Vec::new(),
            coordinator: Some(coordinator),
            client,
        };
        let program = paths::debug_binary("archfarm-agent");
        let mut wanted: Vec<(String, bool)> = vec![("linux/amd64".to_string(), false)];
        let mut specs: Vec<(String, Vec<OsString>)> = vec![("amd64".to_string(), Vec::new())];
        for a in arches {
            let mut emulate = OsString::from(format!("{}=", a.platform()));
            emulate.push(a.qemu_program());
            specs.push((
                a.goarch.to_string(),
                vec!["--no-native".into(), "--emulate".into(), emulate],
            ));
            wanted.push((a.platform(), true));
        }
        let url = farm.options_url();
        for (name, extra) in specs {
            let log = setup.logs.join(format!("agent-{name}.log"));
            let out = std::fs::File::create(&log)
                .with_context(|| format!("failed to create {}", log.display()))?;
            let child = spawn_logged(
                Command::new(&program)
                    .arg("--coordinator")
                    .arg(&url)
                    .arg("--data-dir")
                    .arg(setup.work.join(format!("agent-{name}")))
                    .args(["--token", &join.token, "--ca-hash", &join.ca_hash])
                    .args(["--slots", &slots.to_string()])
                    .args(extra),
                out,
                &log,
            )?;
            farm.agents.push(AgentProcess {
                name: format!("agent-{name}"),
                child,
                log,
            });
        }
        farm.wait_for_agents(&wanted).await?;
        eprintln!("{} agents ready", farm.agents.len());
        Ok(farm)
    }

    fn options_url(&self) -> String {
        self.coordinator
            .as_ref()
            .map(|c| c.options.coordinator.clone())
            .unwrap_or_default()
    }

    /// Waits until, for each (platform, emulated), a ready agent offers it that way.
    async fn wait_for_agents(&mut self, wanted: &[(String, bool)]) -> anyhow::Result<()> {
        let deadline = Instant::now() + AGENT_START_TIMEOUT;
        loop {
            for a in &mut self.agents {
                if let Ok(Some(status)) = a.child.try_wait() {
                    bail!(
                        "failed to start {}: it exited with {status}\n{}",
                        a.name,
                        log_tail(&a.log, 30)
                    );
                }
            }
            let missing: Vec<String> = match farm_status(&mut self.client, 1).await {
                Ok(status) => wanted
                    .iter()
                    .filter(|(platform, emulated)| {
                        !status.agents.iter().any(|a| {
                            a.state() == v1::AgentState::Ready
                                && a.platforms
                                    .iter()
                                    .any(|p| p.platform == *platform && p.emulated == *emulated)
                        })
                    })
                    .map(|(p, e)| format!("{p}{}", if *e { " (emulated)" } else { "" }))
                    .collect(),
                Err(e) => vec![format!("{e:#}")],
            };
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "failed to start the agents: no ready agent for {} within {}s",
                    missing.join(", "),
                    AGENT_START_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `xtask farm go-test ... ./...` in k8s.io/utils with `gocache`, timed; its output goes
    /// to `logs/<name>.log`. Exit 1 (some test failed) is a result; anything else an error.
    async fn go_test(
        &self,
        setup: &Setup,
        gocache: &Path,
        platforms: &[String],
        name: &str,
    ) -> anyhow::Result<FarmRun> {
        let coordinator = self
            .coordinator
            .as_ref()
            .context("the coordinator is stopped")?;
        let mut cmd = tokio::process::Command::new(&setup.xtask);
        setup.go_env(&mut cmd, gocache);
        // (c) is answered from the cache, emulated cells included.
        cmd.args(["farm", "go-test", "--allow-emulation", "--cache-emulated"]);
        for p in platforms {
            cmd.args(["--platform", p]);
        }
        cmd.arg("./...")
            .env("ARCHFARM_COORDINATOR", &coordinator.options.coordinator)
            .env("ARCHFARM_CREDENTIALS", &coordinator.options.credentials);
        let (elapsed, status, output) = run_logged(cmd, &setup.logs, name, None).await?;
        let code = status.and_then(|s| s.code());
        if !matches!(code, Some(0 | 1)) {
            bail!(
                "farm go-test ended with {}; the end of logs/{name}.log:\n{}",
                status.map_or("a timeout".to_string(), |s| s.to_string()),
                tail(&output, 20)
            );
        }
        let notes = FarmNotes::parse(&output);
        let mut detail = format!("exit {}; {}", code.unwrap_or(-1), notes.counts);
        for line in [&notes.plan, &notes.built, &notes.uploaded]
            .into_iter()
            .flatten()
        {
            detail.push_str("; ");
            detail.push_str(line);
        }
        Ok(FarmRun {
            elapsed,
            detail,
            makespans: notes.makespans,
        })
    }

    /// Per platform, how long after `start_ms` its last action of the jobs submitted since
    /// then ended.
    async fn platform_finish_times(
        &self,
        start_ms: u64,
    ) -> anyhow::Result<BTreeMap<String, Duration>> {
        let mut client = self.client.clone();
        let status = farm_status(&mut client, 50).await?;
        let mut ends: BTreeMap<String, u64> = BTreeMap::new();
        for summary in status
            .recent_jobs
            .iter()
            .filter(|j| j.submitted_unix_ms >= start_ms)
        {
            let job = get_job(&mut client, &summary.job_id).await?;
            for action in &job.actions {
                if let Some(r) = &action.result {
                    let end = r.started_unix_ms + r.duration_ms;
                    let e = ends.entry(action.platform.clone()).or_default();
                    *e = (*e).max(end);
                }
            }
        }
        Ok(ends
            .into_iter()
            .map(|(p, end)| (p, Duration::from_millis(end.saturating_sub(start_ms))))
            .collect())
    }

    /// Stops the agents, then the coordinator, keeping the coordinator's log in `logs`.
    fn stop(mut self, logs: &Path) {
        self.stop_agents();
        if let Some(c) = self.coordinator.take() {
            let _ = std::fs::copy(c.log_path(), logs.join("coordinator.log"));
            c.stop();
        }
    }

    /// SIGTERM to every agent, then SIGKILL to their groups after the grace period.
    fn stop_agents(&mut self) {
        let running = |a: &mut AgentProcess| matches!(a.child.try_wait(), Ok(None));
        for a in &mut self.agents {
            if running(a) {
                if let Ok(raw) = i32::try_from(a.child.id()) {
                    let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
                }
            }
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline && self.agents.iter_mut().any(running) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for a in &mut self.agents {
            if let Ok(raw) = i32::try_from(a.child.id()) {
                // The agent's group: whatever it still runs goes with it.
                let _ = killpg(Pid::from_raw(raw), Signal::SIGKILL);
            }
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        self.agents.clear();
    }
}

impl Drop for BenchFarm {
    fn drop(&mut self) {
        self.stop_agents();
        // The coordinator stops when its handle drops.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_are_the_foreign_ones() {
        let arches = parse_platforms(&["linux/arm64".into(), " linux/s390x".into()]).unwrap();
        assert_eq!(
            arches.iter().map(|a| a.goarch).collect::<Vec<_>>(),
            ["arm64", "s390x"]
        );
        let all: Vec<String> = DEFAULT_PLATFORMS.split(',').map(String::from).collect();
        assert_eq!(parse_platforms(&all).unwrap().len(), 4);
        assert!(parse_platforms(&["linux/amd64".into()]).is_err());
        assert!(parse_platforms(&["linux/arm/v7".into()]).is_err());
        assert!(parse_platforms(&["linux/arm64".into(), "linux/arm64".into()]).is_err());
        assert!(parse_platforms(&[]).is_err());
    }

    #[test]
    fn go_test_output_is_summarised() {
        let out = "ok  \tk8s.io/utils/buffer\t0.002s\n\
                   ?   \tk8s.io/utils/clock\t[no test files]\n\
                   ok  \tk8s.io/utils/lru\t(cached)\n\
                   --- FAIL: TestX (0.00s)\n\
                   FAIL\n\
                   FAIL\tk8s.io/utils/exec\t0.018s\n\
                   FAIL\tk8s.io/utils/mount [build failed]\n";
        let s = GoTestSummary::parse(out);
        assert_eq!(s.ok, 2);
        assert_eq!(s.cached, 1);
        assert_eq!(s.no_tests, 1);
        assert_eq!(s.failed, ["k8s.io/utils/exec", "k8s.io/utils/mount"]);
        assert_eq!(
            s.words(),
            "2 ok (1 cached), 2 FAIL (k8s.io/utils/exec, k8s.io/utils/mount), 1 without tests"
        );
    }

    #[test]
    fn farm_output_is_summarised() {
        let out = "?   \tk8s.io/utils/clock\t[no test files]\n\
                   26 packages with tests on 2 platforms: 0 cached, 52 to build and run\n\
                   built 52 of 52 test binaries in 35s\n\
                   uploaded 227 of 227 blobs (161.0 MiB sent, 0.0 MiB already in the farm)\n\
                   job j-000001: running 52 packages on 2 platforms in 6 shards\n\
                   [linux/amd64] succeeded in 1.4s on agent vm-c3ae19 (native) (9 packages)\n\
                   linux/amd64: 3 shards, predicted makespan 1m 30s, actual 5.1s\n\
                   linux/arm64: 3 shards, predicted makespan 1m 30s, actual 6.2s\n\
                   52 pass\n";
        let n = FarmNotes::parse(out);
        assert_eq!(n.counts, "52 pass");
        assert_eq!(
            n.plan.as_deref(),
            Some("26 packages with tests on 2 platforms: 0 cached, 52 to build and run")
        );
        assert_eq!(
            n.built.as_deref(),
            Some("built 52 of 52 test binaries in 35s")
        );
        assert!(n.uploaded.unwrap().starts_with("uploaded 227 of 227 blobs"));
        assert_eq!(
            n.makespans["linux/arm64"],
            "3 shards, predicted makespan 1m 30s, actual 6.2s"
        );
        assert_eq!(n.makespans.len(), 2);
    }

    #[test]
    fn ratios_say_whether_the_aim_is_met() {
        let t = |s: u64, complete| {
            Some(Timing {
                elapsed: Duration::from_secs(s),
                complete,
            })
        };
        assert_eq!(
            ratio_line("(a)/(b)", t(600, true), t(100, true), Aim::AtLeast(4.0)),
            "(a)/(b) = 10m / 1m 40s = 6.00 (aim >= 4: met)"
        );
        assert!(
            ratio_line("(c)/(d)", t(3, true), t(1, true), Aim::AtMost(1.0)).ends_with("NOT met)")
        );
        assert!(
            ratio_line("x", t(300, false), t(100, true), Aim::AtLeast(4.0))
                .contains(">= 3.00 (aim >= 4: not met so far (lower bound))")
        );
        assert!(ratio_line("x", None, t(1, true), Aim::AtLeast(4.0)).contains("n/a"));
        assert_eq!(
            ratio(Some(Duration::from_secs(1)), Some(Duration::ZERO)),
            None
        );
    }
}
