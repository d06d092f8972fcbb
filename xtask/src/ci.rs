//! `cargo xtask ci`: the one definition of what CI checks (fmt, clippy, build, test, a short
//! chaos run), run in order with inherited output, stopping at the first failure, timing every
//! step.
use crate::paths;
use anyhow::Context;
use std::process::Command;
use std::time::{Duration, Instant};

/// `cargo xtask ci [-- ARGS...]`.
#[derive(clap::Args, Debug)]
pub struct CiArgs {
    /// Extra arguments appended to `cargo test --workspace`, e.g. `-- --nocapture`.
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// One CI step: a cargo command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Arguments to cargo.
    pub cargo_args: Vec<String>,
}

impl Step {
    fn new(args: &[&str]) -> Self {
        Self {
            cargo_args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// `cargo fmt --all -- --check` and the like.
    pub fn display(&self) -> String {
        format!("cargo {}", self.cargo_args.join(" "))
    }
}

/// The steps in order. The binaries are built before the tests because the end-to-end tests
/// spawn them from target/debug, and so are the cross-built linux/s390x and linux/arm64 agents
/// (debug, in target/dist-build) that tests/tests/foreign_agent.rs runs under qemu-user; the
/// short chaos run (agents and the coordinator SIGKILLed under a job of 200 actions) comes
/// last.
pub fn steps(test_args: &[String]) -> Vec<Step> {
    let mut test = Step::new(&["test", "--workspace"]);
    test.cargo_args.extend(test_args.iter().cloned());
    vec![
        Step::new(&["fmt", "--all", "--", "--check"]),
        Step::new(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        Step::new(&["build", "--workspace", "--bins"]),
        Step::new(&["xtask", "dist", "--test-agents"]),
        test,
        Step::new(&["xtask", "chaos", "--short"]),
    ]
}

/// Runs the steps from the workspace root; exit code 0 when all passed, 1 otherwise.
pub fn run(args: &CiArgs) -> anyhow::Result<u8> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = paths::workspace_root();
    let steps = steps(&args.test_args);
    let started = Instant::now();
    let mut times: Vec<(String, Duration)> = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        eprintln!("==> [{}/{}] {}", i + 1, steps.len(), step.display());
        let step_started = Instant::now();
        let status = Command::new(&cargo)
            .args(&step.cargo_args)
            .current_dir(&root)
            .status()
            .with_context(|| format!("failed to start `{}`", step.display()))?;
        let took = step_started.elapsed();
        times.push((step.display(), took));
        if !status.success() {
            print_times(&times, started.elapsed());
            eprintln!(
                "ci failed: `{}` ended with {status} after {}",
                step.display(),
                seconds(took)
            );
            return Ok(1);
        }
        eprintln!("--> ok in {}", seconds(took));
    }
    print_times(&times, started.elapsed());
    eprintln!("ci passed");
    Ok(0)
}

fn seconds(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn print_times(times: &[(String, Duration)], total: Duration) {
    eprintln!("step times:");
    for (step, took) in times {
        eprintln!("  {:>8}  {step}", seconds(*took));
    }
    eprintln!("  {:>8}  total", seconds(total));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_before_testing_passes_extra_args_to_test_and_ends_with_chaos() {
        let steps = steps(&["--".to_string(), "--nocapture".to_string()]);
        let lines: Vec<String> = steps.iter().map(Step::display).collect();
        assert_eq!(
            lines,
            [
                "cargo fmt --all -- --check",
                "cargo clippy --workspace --all-targets -- -D warnings",
                "cargo build --workspace --bins",
                "cargo xtask dist --test-agents",
                "cargo test --workspace -- --nocapture",
                "cargo xtask chaos --short",
            ]
        );
    }
}
