//! `cargo xtask dist --verify`: every platform's shipped agent, unpacked from its archive, runs
//! as an agent of that platform against a real coordinator on loopback — under qemu-user
//! (natively for amd64), without `--emulate`, so it names its platform from the (emulated)
//! host. It joins with a token over mutual TLS; the token carries `harness=qemu-user` (or
//! `harness=native`) so status says how the harness ran it. After an idle period its memory is
//! read; then one job runs a Go binary cross-built for each platform on an input from the
//! CAS, the amd64 client downloads the outputs and compares them byte for byte, and the same
//! job again must be a cache hit everywhere. binfmt_misc runs the foreign Go binaries the
//! agents exec; it is registered as root and always removed again.
use super::targets::{DistTarget, AGENT, CLIENT};
use super::{mib, yes_no, PlatformReport};
use crate::bench::private::PrivateCoordinator;
use crate::binfmt::{BinfmtGuard, ForeignArch};
use crate::demo::{build_binaries, log_tail, spawn_logged, stop_child};
use crate::paths;
use anyhow::{bail, Context};
use archfarm_client::farm::FarmOptions;
use comfy_table::{presets, ContentArrangement, Table};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long the agents get to join (qemu-user starts slowly).
const JOIN_TIMEOUT: Duration = Duration::from_secs(180);
/// Wall-clock limit of each action.
const ACTION_TIMEOUT: &str = "10m";
/// Between SIGTERM and SIGKILL of an agent.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The label the harness puts on every agent's token: how it runs the agent.
pub const HARNESS_LABEL: &str = "harness";
/// The command of the verification job: each platform's Go binary.
pub const JOB_COMMAND: &str = "./{os}-{arch}{variant}/hello";
/// Bytes of the input file the job copies to its output.
const DATA_BYTES: usize = 3 * 1024 * 1024 + 17;

/// The Go program each platform runs: copies the input from the CAS to an output and names
/// the platform it was built for.
const HELLO_GO: &str = r#"package main

import (
	"fmt"
	"os"
	"runtime"
)

func main() {
	data, err := os.ReadFile("data.bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := os.MkdirAll("out", 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if err := os.WriteFile("out/copy.bin", data, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	me := runtime.GOOS + "/" + runtime.GOARCH
	if err := os.WriteFile("out/platform.txt", []byte(me+"\n"), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	fmt.Printf("hello from %s: %d bytes copied\n", me, len(data))
}
"#;

/// Memory of a process from /proc/PID/status, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss_kib: u64,
    /// VmHWM: the peak resident size.
    pub hwm_kib: u64,
}

/// Reads VmRSS and VmHWM of `pid`.
pub fn read_memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    parse_memory(&text).with_context(|| format!("no VmRSS and VmHWM in {path}"))
}

fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// One platform's verification.
#[derive(Debug, Clone, Default)]
pub struct VerifyRow {
    /// The platform.
    pub platform: String,
    /// The harness label its token carried (`qemu-user`, `native`).
    pub harness: String,
    /// It joined and status lists it as ready with the harness label.
    pub joined: bool,
    /// What status says it offers, e.g. `linux/s390x` (`... emulated` if it said so).
    pub reported: String,
    /// Its memory after the idle period.
    pub idle: Option<Memory>,
    /// The first job's action succeeded on it (ran, exit 0).
    pub job_ok: bool,
    /// The downloaded outputs are the expected bytes (both runs).
    pub identical: bool,
    /// The second job's action was a cache hit.
    pub cache_hit: bool,
    /// What went wrong, for the lines under the table.
    pub notes: Vec<String>,
}

impl VerifyRow {
    /// Every check passed.
    pub fn passed(&self) -> bool {
        self.joined
            && self.reported == self.platform
            && self.job_ok
            && self.identical
            && self.cache_hit
            && self.notes.is_empty()
    }
}

/// The client command line (`archfarm`).
#[derive(Debug, Clone)]
pub struct ClientCli {
    /// The program.
    pub program: PathBuf,
}

impl ClientCli {
    /// The client as `opts`' admin with `args`, not started.
    pub fn command(&self, opts: &FarmOptions, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.program);
        c.args(args)
            .env("ARCHFARM_COORDINATOR", &opts.coordinator)
            .env("ARCHFARM_CREDENTIALS", &opts.credentials)
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        c
    }

    /// Runs `args`; its stdout, or an error with its stderr.
    pub async fn output(&self, opts: &FarmOptions, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .command(opts, args)
            .output()
            .await
            .with_context(|| format!("failed to run {}", self.program.display()))?;
        if !out.status.success() {
            bail!(
                "`{} {}` ended with {}: {}",
                self.program.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// A shipped agent to verify: its platform and the unpacked binary.
#[derive(Debug, Clone)]
pub struct AgentUnderTest {
    /// The platform's target.
    pub target: &'static DistTarget,
    /// The agent binary.
    pub program: PathBuf,
}

/// The agent processes of a run; SIGTERMed (then SIGKILLed) when dropped.
struct Agents {
    running: Vec<RunningAgent>,
}

struct RunningAgent {
    platform: &'static str,
    harness: &'static str,
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for a in &mut self.running {
            stop_child(&mut a.child, STOP_GRACE);
        }
    }
}

/// Unpacks every built archive and verifies its agent; Ctrl-C and SIGTERM stop everything it
/// started (agents, the coordinator) and unregister binfmt_misc.
pub async fn run(reports: &[PlatformReport], idle: Duration) -> anyhow::Result<Vec<VerifyRow>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    let work = tempfile::Builder::new()
        .prefix("dist-verify-")
        .tempdir_in(paths::target_dir())
        .context("failed to create the verification directory")?;
    let mut agents = Vec::new();
    let mut host = None;
    for r in reports {
        let Some(archive) = &r.archive else { continue };
        let top = super::archive::unpack(archive, &work.path().join("unpacked"))?;
        if r.target.is_host() {
            host = Some(top.clone());
        }
        agents.push(AgentUnderTest {
            target: r.target,
            program: top.join(AGENT.name),
        });
    }
    if agents.is_empty() {
        bail!("--verify: no platform was built");
    }
    // The shipped amd64 coordinator and client; the workspace's when amd64 was not built.
    let (coordinator, client) = match host {
        Some(top) => (top.join("archfarm-coordinator"), top.join(CLIENT.name)),
        None => {
            build_binaries(&["archfarm-coordinator", CLIENT.package])?;
            (
                paths::debug_binary("archfarm-coordinator"),
                paths::debug_binary(CLIENT.name),
            )
        }
    };
    let client = ClientCli { program: client };
    tokio::select! {
        rows = verify_agents(&agents, &coordinator, &client, idle, work.path()) => rows,
        _ = tokio::signal::ctrl_c() => bail!("interrupted: stopped every process the check started"),
        _ = term.recv() => bail!("terminated: stopped every process the check started"),
    }
}

/// Runs each agent in `agents` against a private coordinator started from `coordinator`,
/// drives them with `client` and checks everything `--verify` promises; `work` holds the
/// Go program, the input, the agents' data and logs.
pub async fn verify_agents(
    agents: &[AgentUnderTest],
    coordinator: &Path,
    client: &ClientCli,
    idle: Duration,
    work: &Path,
) -> anyhow::Result<Vec<VerifyRow>> {
    let input = work.join("input");
    let data = test_data();
    write_input(&input, &data, agents.iter().map(|a| a.target), work)?;
    let foreign: Vec<ForeignArch> = agents
        .iter()
        .filter_map(|a| ForeignArch::for_platform(a.target.platform))
        .collect();
    let _binfmt = if foreign.is_empty() {
        None
    } else {
        Some(BinfmtGuard::register(&foreign).context(
            "--verify registers qemu-user with binfmt_misc for the Go binaries the agents exec",
        )?)
    };
    let (coord, _admin) = PrivateCoordinator::start_program(coordinator, &[]).await?;
    let opts = coord.options.clone();
    let mut rows: Vec<VerifyRow> = Vec::new();
    let mut running = Agents {
        running: Vec::new(),
    };
    for a in agents {
        let mut row = VerifyRow {
            platform: a.target.platform.to_string(),
            ..Default::default()
        };
        match start_agent(a, client, &opts, work).await {
            Ok(agent) => {
                row.harness = agent.harness.to_string();
                running.running.push(agent);
            }
            Err(e) => row.notes.push(format!("{e:#}")),
        }
        rows.push(row);
    }
    wait_joined(&running, &mut rows, client, &opts).await?;
    if !idle.is_zero() {
        eprintln!(
            "agents idle for {}s before their memory is read",
            idle.as_secs()
        );
        tokio::time::sleep(idle).await;
    }
    for a in &running.running {
        let row = row_mut(&mut rows, a.platform)?;
        match read_memory(a.child.id()) {
            Ok(m) => row.idle = Some(m),
            Err(e) => row.notes.push(format!("{e:#}")),
        }
    }
    let platforms: Vec<String> = rows
        .iter()
        .filter(|r| r.joined)
        .map(|r| r.platform.clone())
        .collect();
    if !platforms.is_empty() {
        for round in [1, 2] {
            run_job(
                round, &platforms, &input, &data, client, &opts, work, &mut rows,
            )
            .await?;
        }
    }
    for a in &running.running {
        let row = row_mut(&mut rows, a.platform)?;
        if !row.passed() {
            row.notes.push(log_tail(&a.log, 15));
        }
    }
    drop(running);
    coord.stop();
    Ok(rows)
}

fn row_mut<'r>(rows: &'r mut [VerifyRow], platform: &str) -> anyhow::Result<&'r mut VerifyRow> {
    rows.iter_mut()
        .find(|r| r.platform == platform)
        .with_context(|| format!("no row for {platform}"))
}

/// Deterministic, incompressible-looking bytes (xorshift), the job's input.
pub fn test_data() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..DATA_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The job's input root: `data.bin` and `linux-<arch><variant>/hello` for every target,
/// cross-built with `CGO_ENABLED=0 GOARCH=.. [GOARM=..] go build`.
pub fn write_input<'t>(
    input: &Path,
    data: &[u8],
    targets: impl Iterator<Item = &'t DistTarget>,
    work: &Path,
) -> anyhow::Result<()> {
    let src = work.join("hello-src");
    std::fs::create_dir_all(&src).with_context(|| format!("failed to create {}", src.display()))?;
    std::fs::write(src.join("main.go"), HELLO_GO).context("failed to write main.go")?;
    std::fs::create_dir_all(input)
        .with_context(|| format!("failed to create {}", input.display()))?;
    std::fs::write(input.join("data.bin"), data).context("failed to write data.bin")?;
    for t in targets {
        let p: archfarm_proto::Platform = t.platform.parse()?;
        let dir = input.join(format!(
            "{}-{}{}",
            p.os(),
            p.arch(),
            p.variant().unwrap_or("")
        ));
        let mut go = Command::new("go");
        go.args(["build", "-trimpath", "-o"])
            .arg(dir.join("hello"))
            .arg("main.go")
            .current_dir(&src)
            .env("CGO_ENABLED", "0")
            .env("GOOS", p.os())
            .env("GOARCH", p.arch())
            .env("GO111MODULE", "off")
            .env("GOCACHE", work.join("gocache"))
            .env("GOPATH", work.join("gopath"))
            .env_remove("GOFLAGS");
        if let Some(arm) = p.goarm() {
            go.env("GOARM", arm);
        }
        let out = go
            .output()
            .context("failed to run go (apt install golang-go)")?;
        if !out.status.success() {
            bail!(
                "go build for {} failed: {}",
                t.platform,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// Creates a token labelled with how the harness runs the agent and starts it: under its
/// qemu-user, without QEMU_LD_PREFIX (the binaries are static), or natively for amd64.
async fn start_agent(
    a: &AgentUnderTest,
    client: &ClientCli,
    opts: &FarmOptions,
    work: &Path,
) -> anyhow::Result<RunningAgent> {
    let arch = ForeignArch::for_platform(a.target.platform);
    let harness = if arch.is_some() {
        "qemu-user"
    } else {
        "native"
    };
    let label = format!("{HARNESS_LABEL}={harness}");
    let token_json = client
        .output(
            opts,
            &[
                "token",
                "create",
                "--json",
                "--single-use",
                "--labels",
                &label,
                "--description",
                &format!("dist --verify {}", a.target.platform),
            ],
        )
        .await?;
    let v: Value = serde_json::from_str(&token_json)
        .with_context(|| format!("token create printed {token_json:?}"))?;
    let (token, ca_hash) = match (v["token"].as_str(), v["ca_hash"].as_str()) {
        (Some(t), Some(h)) => (t.to_string(), h.to_string()),
        _ => bail!("token create printed no token and CA hash: {token_json}"),
    };
    let name = format!("agent-{}", a.target.file_part());
    let data_dir = work.join(&name);
    let log = work.join(format!("{name}.log"));
    let mut cmd = match arch {
        Some(arch) => {
            let mut c = Command::new(arch.qemu_program());
            c.arg(&a.program);
            c
        }
        None => Command::new(&a.program),
    };
    cmd.arg("--coordinator")
        .arg(&opts.coordinator)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("--ca-hash")
        .arg(&ca_hash)
        .env("ARCHFARM_JOIN_TOKEN", &token)
        .env("RUST_LOG", "info")
        .env_remove("QEMU_LD_PREFIX");
    let file = std::fs::File::create(&log)
        .with_context(|| format!("failed to create {}", log.display()))?;
    let child = spawn_logged(&mut cmd, file, &log)?;
    Ok(RunningAgent {
        platform: a.target.platform,
        harness,
        child,
        data_dir,
        log,
    })
}

/// The agent id an agent wrote to its data dir at join.
fn agent_id(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("agent.json")).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["agent_id"].as_str().map(str::to_string)
}

/// Waits until every running agent is ready in status (or exited, or the time is up) and
/// fills `joined` and `reported`.
async fn wait_joined(
    agents: &Agents,
    rows: &mut [VerifyRow],
    client: &ClientCli,
    opts: &FarmOptions,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        let status: Value =
            serde_json::from_str(&client.output(opts, &["status", "--json"]).await?)
                .context("status --json printed no JSON")?;
        let listed = status["agents"].as_array().cloned().unwrap_or_default();
        let mut waiting = 0;
        for a in &agents.running {
            let row = row_mut(rows, a.platform)?;
            if row.joined {
                continue;
            }
            let entry = agent_id(&a.data_dir)
                .and_then(|id| listed.iter().find(|e| e["agent_id"] == id.as_str()));
            match entry {
                Some(e) if e["state"] == "ready" => {
                    row.reported = e["platforms"]
                        .as_array()
                        .map(|ps| {
                            ps.iter()
                                .map(|p| {
                                    let name = p["platform"].as_str().unwrap_or("?").to_string();
                                    if p["emulated"] == true {
                                        format!("{name} emulated")
                                    } else {
                                        name
                                    }
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        })
                        .unwrap_or_default();
                    let label = e["labels"][HARNESS_LABEL].as_str().unwrap_or("");
                    row.joined = true;
                    if label != a.harness {
                        row.notes.push(format!(
                            "status shows {HARNESS_LABEL}={label:?}, not {:?}",
                            a.harness
                        ));
                    }
                    if row.reported != a.platform {
                        row.notes.push(format!(
                            "it reports {:?} under {}, not {}",
                            row.reported, a.harness, a.platform
                        ));
                    }
                }
                _ => waiting += 1,
            }
        }
        if waiting == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            for a in &agents.running {
                let row = row_mut(rows, a.platform)?;
                if !row.joined {
                    row.notes.push(format!(
                        "not ready in status after {}s",
                        JOIN_TIMEOUT.as_secs()
                    ));
                }
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Runs the verification job on `platforms` (round 1 must run, round 2 must be a cache hit),
/// downloads the outputs and compares them with what the Go program must have written.
/// The `archfarm run` options of the verification job (shared with CI's foreign-agent test):
/// every platform, the input tree, the declared output downloaded under `download`, and
/// results of the harness's untrusted agents cached so that the second round is a hit.
pub fn job_options(platforms: &[&str], input: &Path, download: &Path) -> Vec<String> {
    let mut args = Vec::new();
    for p in platforms {
        args.extend(["--platform".to_string(), p.to_string()]);
    }
    args.extend([
        "--input".to_string(),
        input.to_string_lossy().into_owned(),
        "--output".to_string(),
        "out".to_string(),
        "--download".to_string(),
        download.to_string_lossy().into_owned(),
        "--cache-untrusted".to_string(),
    ]);
    args
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    round: u32,
    platforms: &[String],
    input: &Path,
    data: &[u8],
    client: &ClientCli,
    opts: &FarmOptions,
    work: &Path,
    rows: &mut [VerifyRow],
) -> anyhow::Result<()> {
    let download = work.join(format!("download-{round}"));
    let report = work.join(format!("report-{round}.json"));
    let report_s = report.to_string_lossy().into_owned();
    let names: Vec<&str> = platforms.iter().map(String::as_str).collect();
    let options = job_options(&names, input, &download);
    let mut args: Vec<&str> = vec!["run"];
    args.extend(options.iter().map(String::as_str));
    args.extend([
        "--timeout",
        ACTION_TIMEOUT,
        "--description",
        "dist --verify",
        "--json-report",
        &report_s,
        "--",
        JOB_COMMAND,
    ]);
    eprintln!(
        "==> verification job, round {round}: {}",
        platforms.join(" ")
    );
    let out = client
        .command(opts, &args)
        .output()
        .await
        .context("failed to run the client")?;
    let text = std::fs::read_to_string(&report).with_context(|| {
        format!(
            "the client wrote no report (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let v: Value = serde_json::from_str(&text).context("the client's report is not JSON")?;
    for action in v["actions"].as_array().cloned().unwrap_or_default() {
        let Some(platform) = action["platform"].as_str() else {
            continue;
        };
        let row = row_mut(rows, platform)?;
        let succeeded = action["state"] == "succeeded" && action["exit_code"] == 0;
        let cached = action["cached"] == true;
        if round == 1 {
            row.job_ok = succeeded && !cached;
            if !row.job_ok {
                row.notes.push(format!("round 1: {action}"));
            }
        } else {
            row.cache_hit = succeeded && cached;
            if !row.cache_hit {
                row.notes
                    .push(format!("round 2 was no cache hit: {action}"));
            }
        }
        let same = outputs_match(&download, platform, data)?;
        if round == 1 {
            row.identical = same;
        } else {
            row.identical &= same;
        }
        if !same {
            row.notes.push(format!(
                "round {round}: the outputs in {} are not the expected bytes",
                download.display()
            ));
        }
    }
    Ok(())
}

/// Whether the outputs `farm run --download DIR` brought back for `platform` are what the Go
/// program writes: `data` byte for byte and the platform's `os/arch`.
pub fn outputs_match(download: &Path, platform: &str, data: &[u8]) -> anyhow::Result<bool> {
    let p: archfarm_proto::Platform = platform.parse()?;
    let dir = download.join(p.to_string()).join("out");
    let expect_platform = format!("{}/{}\n", p.os(), p.arch());
    Ok(
        std::fs::read(dir.join("copy.bin")).ok().as_deref() == Some(data)
            && std::fs::read_to_string(dir.join("platform.txt")).ok() == Some(expect_platform),
    )
}

/// The verification table: platform, built, static, agent size, joined, platform reported,
/// job ok, output identical, cache hit, idle RSS (and peak).
pub fn render(reports: &[PlatformReport], rows: &[VerifyRow]) -> Table {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec![
            "platform",
            "built",
            "static",
            "agent size",
            "joined (harness)",
            "platform reported",
            "job ok",
            "output identical",
            "cache hit",
            "idle RSS (peak)",
        ]);
    for r in reports {
        let row = rows.iter().find(|v| v.platform == r.target.platform);
        let check = |f: fn(&VerifyRow) -> bool| row.map_or("-", |v| yes_no(f(v))).to_string();
        t.add_row(vec![
            r.target.platform.to_string(),
            yes_no(r.error.is_none()).to_string(),
            super::static_cell(r),
            r.agent().map_or("-".to_string(), |a| mib(a.size)),
            row.map_or("-".to_string(), |v| {
                format!("{} ({HARNESS_LABEL}={})", yes_no(v.joined), v.harness)
            }),
            row.map_or("-".to_string(), |v| v.reported.clone()),
            check(|v| v.job_ok),
            check(|v| v.identical),
            check(|v| v.cache_hit),
            row.and_then(|v| v.idle).map_or("-".to_string(), |m| {
                format!("{} ({})", mib(m.rss_kib * 1024), mib(m.hwm_kib * 1024))
            }),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_comes_from_proc_status() {
        let status = "Name:\tqemu-s390x-stat\nVmPeak:\t  300000 kB\nVmHWM:\t   24576 kB\nVmRSS:\t   20480 kB\n";
        assert_eq!(
            parse_memory(status),
            Some(Memory {
                rss_kib: 20480,
                hwm_kib: 24576
            })
        );
        assert_eq!(parse_memory("Name:\tx\n"), None);
        let me = read_memory(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib);
    }

    #[test]
    fn the_input_data_is_fixed_and_varied() {
        let d = test_data();
        assert_eq!(d.len(), DATA_BYTES);
        assert_eq!(d, test_data());
        let zeros = d.iter().filter(|b| **b == 0).count();
        assert!(zeros < d.len() / 100, "{zeros} zero bytes");
    }

    #[test]
    fn a_row_passes_only_when_every_check_did() {
        let mut row = VerifyRow {
            platform: "linux/s390x".into(),
            harness: "qemu-user".into(),
            joined: true,
            reported: "linux/s390x".into(),
            idle: None,
            job_ok: true,
            identical: true,
            cache_hit: true,
            notes: Vec::new(),
        };
        assert!(row.passed());
        row.reported = "linux/amd64".into();
        assert!(!row.passed());
    }
}
