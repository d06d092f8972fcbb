//! `cargo xtask demo`: a whole farm on one amd64 machine — a coordinator and five agents (one
//! native, four emulating arm64, ppc64le, s390x and riscv64 through qemu-user) running in the
//! background under target/demo-farm — and a Go hello-world run on all five platforms.
use crate::demo_login::{point_archfarm_at, Login};
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::cli::run::run_printed;
use archfarm_client::config::ProcessEnv;
use archfarm_client::farm::display::now_unix_ms;
use archfarm_client::farm::run::RunArgs;
use archfarm_client::farm::status::{farm_status, render_status};
use archfarm_client::farm::{token, FarmClient, FarmOptions};
use archfarm_proto::v1::{self, FarmStatusResponse};
use archfarm_proto::Platform;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the demo coordinator listens.
pub const DEMO_LISTEN: &str = "127.0.0.1:7443";
/// The demo coordinator's URL.
pub const DEMO_COORDINATOR: &str = "https://127.0.0.1:7443";
/// How long the coordinator and then the agents get to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `cargo xtask demo [--stop | --fresh]`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Stop the demo farm's processes and exit.
    #[arg(long)]
    pub stop: bool,
    /// Delete the demo farm's state (CA, agent identities, jobs, caches) before starting.
    #[arg(long, conflicts_with = "stop")]
    pub fresh: bool,
    /// The platforms to serve, one agent each (this machine's own natively, the others
    /// through qemu-user), e.g. `linux/amd64,linux/mips64le,linux/arm/v7`.
    #[arg(long, value_name = "PLATFORM,...", value_delimiter = ',', default_values_t = DEFAULT_PLATFORMS.map(String::from))]
    pub platforms: Vec<String>,
}

/// The platforms the demo serves unless `--platforms` says otherwise.
pub const DEFAULT_PLATFORMS: [&str; 5] = [
    "linux/amd64",
    "linux/arm64",
    "linux/ppc64le",
    "linux/s390x",
    "linux/riscv64",
];

/// One agent of the demo farm.
#[derive(Debug, Clone)]
pub struct DemoAgent {
    /// Short name: its files are `agent-<name>.{log,pid}` and `agent-<name>/`.
    pub name: String,
    /// The platform it serves.
    pub platform: Platform,
    /// Served through qemu-user rather than natively.
    pub emulated: bool,
}

impl DemoAgent {
    /// The qemu-user program an emulated agent runs its platform's programs with.
    pub fn qemu(&self) -> Option<&'static str> {
        self.emulated
            .then(|| self.platform.qemu_user_program())
            .flatten()
    }
}

/// One agent per platform: native for this machine's own platform, emulated through qemu-user
/// for the others. Errors for a platform that qemu-user cannot emulate here.
pub fn demo_agents(platforms: &[Platform]) -> anyhow::Result<Vec<DemoAgent>> {
    let host = Platform::from_uname_machine(std::env::consts::ARCH);
    let mut agents: Vec<DemoAgent> = Vec::new();
    for platform in platforms {
        if agents.iter().any(|a| &a.platform == platform) {
            continue;
        }
        let emulated = host.as_ref() != Some(platform);
        if emulated && platform.qemu_user_program().is_none() {
            bail!("{platform} cannot be emulated here: no qemu-user program serves it");
        }
        let name = match platform.variant() {
            Some(v) => format!("{}-{v}", platform.arch()),
            None => platform.arch().to_string(),
        };
        agents.push(DemoAgent {
            name,
            platform: platform.clone(),
            emulated,
        });
    }
    Ok(agents)
}

const HELLO_GO: &str = r#"// Written by `cargo xtask demo`: says where it runs.
package main

import (
	"fmt"
	"runtime"
)

func main() {
	fmt.Printf("hello from %s/%s (%d CPUs, %s)\n", runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), runtime.Version())
}
"#;

/// Starts the demo farm and runs the hello job on it (or stops it with `--stop`).
pub async fn run(args: DemoArgs) -> anyhow::Result<u8> {
    let dir = paths::demo_farm_dir();
    if args.stop {
        if stop_farm(&dir)? == 0 {
            eprintln!("no demo farm is running");
        }
        return Ok(0);
    }
    let platforms = args
        .platforms
        .iter()
        .map(|p| p.parse::<Platform>())
        .collect::<Result<Vec<_>, _>>()?;
    let demo = demo_agents(&platforms)?;
    if !ensure_tools(&demo)? {
        return Ok(1);
    }
    stop_farm(&dir)?;
    if args.fresh {
        remove_state(&dir)?;
    }
    eprintln!("building archfarm-coordinator, archfarm-agent and archfarm");
    build_binaries(&["archfarm-coordinator", "archfarm-agent", "archfarm-client"])?;
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;

    let mut coordinator = spawn_detached(
        &dir,
        "coordinator",
        &paths::debug_binary("archfarm-coordinator"),
        &[
            "--listen".into(),
            DEMO_LISTEN.into(),
            "--data-dir".into(),
            dir.join("coordinator").into(),
        ],
    )?;
    eprintln!(
        "started the coordinator (pid {}) on {DEMO_COORDINATOR}",
        coordinator.id()
    );
    let options = FarmOptions {
        coordinator: DEMO_COORDINATOR.to_string(),
        credentials: paths::demo_credentials_dir(),
    };
    let mut client =
        wait_for_coordinator(&dir.join("coordinator.log"), &mut coordinator, &options).await?;

    // The demo's agents are this machine's own: trusted, so their results are cached.
    let join = token::create_token(
        &mut client,
        Duration::from_secs(3600),
        &[token::trusted_label()],
        false,
        "demo farm agents",
    )
    .await?;
    let mut agents = Vec::new();
    for agent in &demo {
        let child = spawn_detached(
            &dir,
            &format!("agent-{}", agent.name),
            &paths::debug_binary("archfarm-agent"),
            &agent_args(&dir, agent, &join),
        )?;
        agents.push((agent.clone(), child));
    }
    wait_for_agents(&dir, &mut client, &mut agents).await?;

    let input = build_hello(&dir, &demo)?;
    let mut job = RunArgs::new(
        demo.iter().map(|a| a.platform.to_string()),
        ["./{os}/{arch}/hello"],
    );
    job.allow_emulation = true;
    // Four of the five platforms are emulated here; cache them too, so a second run is instant.
    job.cache.cache_emulated = true;
    job.input = Some(input);
    job.description = Some("cargo xtask demo".to_string());
    eprintln!(
        "running `archfarm run {} --allow-emulation --cache-emulated --input target/demo-farm/input -- ./{{os}}/{{arch}}/hello`",
        demo.iter()
            .map(|a| format!("--platform {}", a.platform))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let outcome = run_printed(&mut client, &job).await?;

    let status = farm_status(&mut client, 10).await?;
    println!("\n{}", render_status(&status, now_unix_ms()));
    let login = point_archfarm_at(&ProcessEnv, &options.credentials, DEMO_COORDINATOR)?;
    let archfarm = paths::debug_binary("archfarm");
    println!(
        "the demo farm keeps running; its state and logs are in {}",
        dir.display()
    );
    match login {
        Login::Written {
            credentials,
            coordinator,
        } => println!(
            "archfarm now uses it by default: {} links to its admin credentials and {} holds \
             its URL",
            credentials.display(),
            coordinator.display()
        ),
        Login::Exports(exports) => println!(
            "your archfarm config already holds other credentials (kept); to use the demo \
             farm:\n{exports}"
        ),
    }
    let example = demo
        .iter()
        .find(|a| a.emulated)
        .or(demo.first())
        .map_or_else(|| "linux/amd64".to_string(), |a| a.platform.to_string());
    println!(
        "the command line is {} (`cargo install --path client` puts `archfarm` on your PATH):\n\
         \x20 archfarm status                 # agents, queues, recent jobs\n\
         \x20 archfarm run --platform {example} --allow-emulation \\\n\
         \x20     --input target/demo-farm/input -- ./{{os}}/{{arch}}/hello\n\
         \x20 cargo xtask demo --stop         # stop it",
        archfarm.display()
    );
    if outcome.exit_code != 0 {
        eprintln!(
            "the demo job {} did not succeed (exit code {})",
            outcome.job_id, outcome.exit_code
        );
    }
    Ok(outcome.exit_code)
}

/// The command line of one demo agent.
fn agent_args(dir: &Path, agent: &DemoAgent, join: &v1::CreateTokenResponse) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--coordinator".into(),
        DEMO_COORDINATOR.into(),
        "--data-dir".into(),
        dir.join(format!("agent-{}", agent.name)).into(),
        "--token".into(),
        join.token.clone().into(),
        "--ca-hash".into(),
        join.ca_hash.clone().into(),
        "--slots".into(),
        "2".into(),
    ];
    if let Some(qemu) = agent.qemu() {
        let qemu_path = find_program(qemu).unwrap_or_else(|| Path::new("/usr/bin").join(qemu));
        let mut emulate = OsString::from(format!("{}=", agent.platform));
        emulate.push(qemu_path);
        args.extend(["--no-native".into(), "--emulate".into(), emulate]);
    }
    args
}

/// The programs the demo needs.
fn required_programs(demo: &[DemoAgent]) -> Vec<&'static str> {
    // bwrap: the agents sandbox every action with it (without it they run unsandboxed).
    let mut programs = vec!["go", "bwrap"];
    programs.extend(demo.iter().filter_map(DemoAgent::qemu));
    programs
}

/// Finds an executable on PATH.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Makes sure go, bubblewrap and the qemu-user programs are there: installs them as root,
/// else says how.
fn ensure_tools(demo: &[DemoAgent]) -> anyhow::Result<bool> {
    let missing = || -> Vec<&'static str> {
        required_programs(demo)
            .into_iter()
            .filter(|p| find_program(p).is_none())
            .collect()
    };
    let absent = missing();
    if absent.is_empty() {
        return Ok(true);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the demo needs {} (missing on PATH); install them with:\n  \
             sudo apt-get update && sudo apt-get install -y golang-go qemu-user-static bubblewrap",
            absent.join(", ")
        );
        return Ok(false);
    }
    eprintln!(
        "installing golang-go, qemu-user-static and bubblewrap for {}",
        absent.join(", ")
    );
    run_checked(
        Command::new("apt-get").arg("update"),
        "update the package lists",
    )?;
    run_checked(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "golang-go",
                "qemu-user-static",
                "bubblewrap",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "install golang-go, qemu-user-static and bubblewrap",
    )?;
    let still = missing();
    if !still.is_empty() {
        bail!("{} still missing after apt-get install", still.join(", "));
    }
    Ok(true)
}

pub(crate) fn run_checked(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to {what}: cannot start {command:?}"))?;
    if !status.success() {
        bail!("failed to {what}: {command:?} ended with {status}");
    }
    Ok(())
}

/// `cargo build` of the named workspace packages' binaries (a no-op when they are fresh).
pub(crate) fn build_binaries(packages: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(["build", "--quiet", "--bins"]);
    for p in packages {
        command.args(["-p", p]);
    }
    run_checked(
        command.current_dir(paths::workspace_root()),
        &format!("build {}", packages.join(" and ")),
    )
}

/// Deletes what a previous demo farm left, but keeps the Go build cache.
fn remove_state(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_name() == "gocache" {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.with_context(|| format!("failed to remove {}", path.display()))?;
    }
    eprintln!("removed the old demo farm state in {}", dir.display());
    Ok(())
}

/// SIGTERM to `child`, then SIGKILL once `grace` passed with it still running; reaps it.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if let Ok(raw) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(raw), Signal::SIGTERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Starts `command` in its own process group (so a terminal's Ctrl-C does not reach it), stdin
/// empty, stdout and stderr into `log` (the file at `log_path`), logs plain (no colour).
pub(crate) fn spawn_logged(
    command: &mut Command,
    log: std::fs::File,
    log_path: &Path,
) -> anyhow::Result<Child> {
    let log_err = log
        .try_clone()
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    command
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("failed to start {:?}", command.get_program()))
}

/// Starts `program` in its own process group with output to `<dir>/<name>.log` and its pid in
/// `<dir>/<name>.pid`, so it outlives this process and `--stop` can find it. Dropping the
/// returned handle leaves the process running.
fn spawn_detached(
    dir: &Path,
    name: &str,
    program: &Path,
    args: &[OsString],
) -> anyhow::Result<Child> {
    let log_path = dir.join(format!("{name}.log"));
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("failed to open {}", log_path.display()))?;
    writeln!(
        log,
        "===== {} {name} starts =====",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    )
    .with_context(|| format!("failed to write {}", log_path.display()))?;
    let child = spawn_logged(Command::new(program).args(args), log, &log_path)?;
    let pid = child.id();
    let pid_path = dir.join(format!("{name}.pid"));
    std::fs::write(&pid_path, format!("{pid}\n"))
        .with_context(|| format!("failed to write {}", pid_path.display()))?;
    Ok(child)
}

/// How a process this run started ended, if it did.
fn exited(child: &mut Child) -> Option<String> {
    match child.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => None,
        Err(e) => Some(format!("unknown ({e})")),
    }
}

/// Whether `pid` is a live (not zombie) archfarm process, so that a recycled pid is never
/// signalled. (Right after a spawn the command line may still be empty: use it only for
/// processes found through pid files.)
fn is_farm_process(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z' | 'X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let program = String::from_utf8_lossy(argv0);
    Path::new(program.as_ref())
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("archfarm-"))
}

/// Stops the processes named by `<dir>/*.pid`: SIGTERM, then SIGKILL after 5 s. Returns how
/// many were running.
pub fn stop_farm(dir: &Path) -> anyhow::Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut stopping = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pid") {
            continue;
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        match pid {
            Some(pid) if is_farm_process(pid) => {
                let raw = i32::try_from(pid).context("failed to read a pid file: pid too big")?;
                if let Err(e) = kill(Pid::from_raw(raw), Signal::SIGTERM) {
                    eprintln!("failed to send SIGTERM to {name} (pid {pid}): {e}");
                }
                stopping.push((name, pid, raw, path));
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline && stopping.iter().any(|(_, pid, ..)| is_farm_process(*pid)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for (name, pid, raw, path) in &stopping {
        if is_farm_process(*pid) {
            let _ = kill(Pid::from_raw(*raw), Signal::SIGKILL);
            eprintln!(
                "killed {name} (pid {pid}) with SIGKILL: still running {}s after SIGTERM",
                STOP_GRACE.as_secs()
            );
        } else {
            eprintln!("stopped {name} (pid {pid})");
        }
        let _ = std::fs::remove_file(path);
    }
    Ok(stopping.len())
}

/// The last `n` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(n)..].join("\n");
            format!("--- end of {} ---\n{tail}", path.display())
        }
        Err(e) => format!("({} unreadable: {e})", path.display()),
    }
}

/// Waits until the coordinator has written its admin credentials and answers FarmStatus; if
/// it exits or stays silent, the error carries the end of its log.
pub(crate) async fn wait_for_coordinator(
    log: &Path,
    coordinator: &mut Child,
    options: &FarmOptions,
) -> anyhow::Result<FarmClient> {
    let ca = options.credentials.join("ca.pem");
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last_error = format!("{} does not exist yet", ca.display());
    loop {
        if let Some(status) = exited(coordinator) {
            bail!(
                "failed to start the coordinator: it exited with {status}\n{}",
                log_tail(log, 30)
            );
        }
        if ca.exists() {
            let attempt = async {
                let mut client = FarmClient::connect(options).await?;
                farm_status(&mut client, 1).await?;
                anyhow::Ok(client)
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(e)) => last_error = format!("{e:#}"),
                Err(_) => last_error = "no answer within 5 s".to_string(),
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "failed to start the coordinator: no answer within {}s ({last_error})\n{}",
                START_TIMEOUT.as_secs(),
                log_tail(log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The demo agents that FarmStatus does not show up: for each, an agent that is ready (or
/// busy) and offers its platform the right way (native or emulated) must be there, and there
/// must be as many such agents in all.
pub fn missing_agents(status: &FarmStatusResponse, demo: &[DemoAgent]) -> Vec<String> {
    let up: Vec<&v1::AgentStatus> = status
        .agents
        .iter()
        .filter(|a| matches!(a.state(), v1::AgentState::Ready | v1::AgentState::Busy))
        .collect();
    let mut missing: Vec<String> = demo
        .iter()
        .filter(|d| {
            !up.iter().any(|a| {
                a.platforms
                    .iter()
                    .any(|p| p.platform == d.platform.to_string() && p.emulated == d.emulated)
            })
        })
        .map(|d| d.name.clone())
        .collect();
    if missing.is_empty() && up.len() < demo.len() {
        missing.push(format!("(fewer than {} agents are ready)", demo.len()));
    }
    missing
}

/// Waits until the five agents are ready.
async fn wait_for_agents(
    dir: &Path,
    client: &mut FarmClient,
    agents: &mut [(DemoAgent, Child)],
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for (agent, child) in agents.iter_mut() {
            if let Some(status) = exited(child) {
                bail!(
                    "failed to start agent-{}: it exited with {status}\n{}",
                    agent.name,
                    log_tail(&dir.join(format!("agent-{}.log", agent.name)), 30)
                );
            }
        }
        let missing = match farm_status(client, 1).await {
            Ok(status) => {
                let demo: Vec<DemoAgent> = agents.iter().map(|(a, _)| a.clone()).collect();
                missing_agents(&status, &demo)
            }
            Err(e) => vec![format!("{e:#}")],
        };
        if missing.is_empty() {
            eprintln!("{} agents ready", agents.len());
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "failed to start the agents: not ready within {}s: {}; see {}/agent-*.log",
                START_TIMEOUT.as_secs(),
                missing.join(", "),
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Writes hello/main.go and cross-compiles it to `input/linux/<arch>/hello` for each demo
/// platform; returns the input directory.
fn build_hello(dir: &Path, demo: &[DemoAgent]) -> anyhow::Result<PathBuf> {
    let src = dir.join("hello");
    std::fs::create_dir_all(&src).with_context(|| format!("failed to create {}", src.display()))?;
    std::fs::write(src.join("main.go"), HELLO_GO)
        .with_context(|| format!("failed to write {}", src.join("main.go").display()))?;
    let input = dir.join("input");
    for agent in demo {
        let platform = &agent.platform;
        let out = input
            .join(platform.os())
            .join(platform.arch())
            .join("hello");
        eprintln!("building hello for {platform}");
        run_checked(
            Command::new("go")
                .arg("build")
                .arg("-o")
                .arg(&out)
                .arg(".")
                .current_dir(&src)
                .env("CGO_ENABLED", "0")
                .env("GOOS", platform.os())
                .env("GOARCH", platform.arch())
                .env("GOARM", platform.goarm().unwrap_or_default())
                .env("GO111MODULE", "off")
                .env("GOCACHE", dir.join("gocache"))
                .env("GOPATH", dir.join("gopath"))
                .env_remove("GOFLAGS"),
            &format!("build hello for {platform}"),
        )?;
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, platform: &str, emulated: bool, state: v1::AgentState) -> v1::AgentStatus {
        v1::AgentStatus {
            agent_id: id.into(),
            platforms: vec![v1::PlatformOffer {
                platform: platform.into(),
                emulated,
            }],
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn the_farm_is_up_when_each_demo_agent_is_ready_the_right_way() {
        let demo = five();
        let mut status = FarmStatusResponse {
            agents: demo
                .iter()
                .map(|d| {
                    agent(
                        &d.name,
                        &d.platform.to_string(),
                        d.emulated,
                        v1::AgentState::Ready,
                    )
                })
                .collect(),
            ..Default::default()
        };
        assert!(missing_agents(&status, &demo).is_empty());
        status.agents[3].state = v1::AgentState::Lost as i32;
        assert_eq!(missing_agents(&status, &demo), ["s390x"]);
        status.agents[3] = agent("x", "linux/s390x", false, v1::AgentState::Ready);
        assert_eq!(
            missing_agents(&status, &demo),
            ["s390x"],
            "native is not emulated"
        );
    }

    fn five() -> Vec<DemoAgent> {
        let platforms: Vec<Platform> = DEFAULT_PLATFORMS
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        demo_agents(&platforms).unwrap()
    }

    #[test]
    fn platforms_pick_the_agents_mips64le_and_arm_v7_included() {
        let demo = five();
        assert_eq!(demo.len(), 5);
        assert!(!demo[0].emulated, "this machine's own platform is native");
        assert!(demo[1..].iter().all(|a| a.emulated));
        let more: Vec<Platform> = [
            "linux/amd64",
            "linux/mips64le",
            "linux/arm/v7",
            "linux/mips64le",
        ]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
        let demo = demo_agents(&more).unwrap();
        let names: Vec<&str> = demo.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["amd64", "mips64le", "arm-v7"]);
        assert_eq!(demo[1].qemu(), Some("qemu-mips64el-static"));
        assert_eq!(demo[2].qemu(), Some("qemu-arm-static"));
    }

    #[test]
    fn emulated_agents_get_their_qemu() {
        let join = v1::CreateTokenResponse {
            token: "t".into(),
            ca_hash: "sha256:h".into(),
            expires_unix_ms: 0,
        };
        let demo = five();
        let args = agent_args(Path::new("/farm"), &demo[1], &join);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--no-native".to_string()));
        assert!(args
            .iter()
            .any(|a| a.starts_with("linux/arm64=") && a.ends_with("/qemu-aarch64-static")));
        assert!(args.contains(&"/farm/agent-arm64".to_string()));
        let native = agent_args(Path::new("/farm"), &demo[0], &join);
        assert!(!native.iter().any(|a| a == "--no-native"));
    }
}
