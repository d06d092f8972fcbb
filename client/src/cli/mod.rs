//! The `archfarm` command line: clap definitions of every command, the dispatch to the
//! library (shared by the `archfarm` binary and `cargo xtask farm`), and one module per Go
//! recipe that shows its progress and report: the recipes compute, these print.
pub mod ginkgo;
pub mod go_build;
pub mod go_test;
pub mod run;
pub mod shell;
pub mod watch;

use crate::config::{ConnectArgs, ProcessEnv};
use crate::farm::{agents, cancel, credentials, job, status, token, FarmClient};
use anyhow::Context;
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

/// `archfarm [-C DIR] [--coordinator URL] [--credentials DIR] <command>`.
#[derive(clap::Parser, Debug)]
#[command(
    name = "archfarm",
    version,
    about = "Use an archfarm build and test farm: run commands and Go tests on real machines of \
             other architectures, see the farm's status, administer it"
)]
pub struct Cli {
    /// Run as if started in DIR (like `git -C`); relative paths in other options are then
    /// relative to DIR.
    #[arg(short = 'C', value_name = "DIR", global = true)]
    pub directory: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Agents per platform, queues, running actions and recent jobs.
    Status(status::StatusArgs),
    /// Run a command on one or more platforms and stream its output.
    Run(crate::farm::run::RunArgs),
    /// Go tests: cross-compiled here, run natively per platform, cached, sharded.
    GoTest(crate::gotest::GoTestArgs),
    /// Go commands for many platforms: pure Go cross-compiled, cgo built natively, cached.
    GoBuild(crate::gobuild::GoBuildArgs),
    /// A ginkgo suite (node-e2e): specs listed by a dry run, sharded by location, run only on
    /// agents labelled node-e2e, each shard with the agent to itself.
    Ginkgo(crate::ginkgo::GinkgoArgs),
    /// Show one job's actions.
    Job(job::JobArgs),
    /// Cancel a job's unfinished actions.
    Cancel(cancel::CancelArgs),
    /// Join tokens for agents: create, list, delete.
    #[command(alias = "tokens")]
    Token {
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Drain or revoke agents.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Client credentials (a certificate with the client role) for CI systems and people.
    Credentials {
        #[command(subcommand)]
        command: credentials::CredentialsCommand,
    },
}

/// Runs one command; returns the process exit code.
pub async fn run_command(cli: Cli) -> anyhow::Result<u8> {
    if let Some(dir) = &cli.directory {
        std::env::set_current_dir(dir)
            .with_context(|| format!("failed to change to the directory {} (-C)", dir.display()))?;
    }
    let options = cli.connect.resolve(&ProcessEnv)?;
    let mut client = FarmClient::connect(&options).await?;
    match cli.command {
        Command::Status(args) => status::command(&mut client, &args).await,
        Command::Run(args) => run::command(&mut client, &args).await,
        Command::GoTest(args) => go_test::command(&mut client, &args).await,
        Command::GoBuild(args) => go_build::command(&mut client, &args).await,
        Command::Ginkgo(args) => ginkgo::command(&mut client, &args).await,
        Command::Job(args) => job::command(&mut client, &args).await,
        Command::Cancel(args) => cancel::command(&mut client, &args).await,
        Command::Token { command } => token::command(&mut client, &command).await,
        Command::Agents { command } => agents::command(&mut client, &command).await,
        Command::Credentials { command } => credentials::command(&mut client, &command).await,
    }
}

/// Runs an async command to completion on a fresh multi-threaded runtime.
pub fn block_on<F: Future<Output = anyhow::Result<u8>>>(command: F) -> anyhow::Result<u8> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?
        .block_on(command)
}

/// Parses `args` (the program name first) and runs the command: the whole of `archfarm`'s
/// main. Usage errors exit 2 with clap's message; a failed command prints one `error: ...`
/// line and exits 2; otherwise the command's own exit code.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::Parser;
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match block_on(run_command(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_the_command_after_its_options() {
        let cli = Cli::try_parse_from([
            "archfarm",
            "-C",
            "/src/kubernetes",
            "run",
            "--platform",
            "linux/arm64",
            "--platform",
            "linux/s390x",
            "--env",
            "GOFLAGS=-count=1",
            "--timeout",
            "90s",
            "--coordinator",
            "https://farm:7443",
            "--",
            "go",
            "test",
            "-v",
        ])
        .unwrap();
        assert_eq!(
            cli.connect.coordinator.as_deref(),
            Some("https://farm:7443")
        );
        assert_eq!(cli.directory, Some(PathBuf::from("/src/kubernetes")));
        let Command::Run(run_args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(run_args.platforms, ["linux/arm64", "linux/s390x"]);
        assert_eq!(run_args.command, ["go", "test", "-v"]);
        assert_eq!(run_args.timeout, std::time::Duration::from_secs(90));
        assert_eq!(run_args.env[0].value, "-count=1");
    }

    #[test]
    fn token_labels_split_at_commas_and_tokens_is_token() {
        for word in ["token", "tokens"] {
            let cli = Cli::try_parse_from([
                "archfarm",
                word,
                "create",
                "--labels",
                "lab=osu,node-e2e",
                "--single-use",
            ])
            .unwrap();
            let Command::Token {
                command: token::TokenCommand::Create(create),
            } = cli.command
            else {
                panic!("not token create");
            };
            let keys: Vec<&str> = create.labels.iter().map(|l| l.key.as_str()).collect();
            assert_eq!(keys, ["lab", "node-e2e"]);
            assert!(create.single_use);
        }
        assert!(Cli::try_parse_from(["archfarm", "token", "create", "--labels", "Bad"]).is_err());
    }

    #[test]
    fn every_command_of_the_issue_parses() {
        for args in [
            &["status"][..],
            &["run", "--platform", "linux/s390x", "--", "true"],
            &["go-test", "--platform", "linux/s390x", "./..."],
            &["go-build", "--platform", "linux/arm64", "./cmd/x"],
            &["job", "j1"],
            &["cancel", "j1"],
            &["tokens", "list"],
            &["agents", "drain", "a1"],
            &["credentials", "revoke", "ci"],
        ] {
            let mut argv = vec!["archfarm"];
            argv.extend_from_slice(args);
            if let Err(e) = Cli::try_parse_from(&argv) {
                panic!("{argv:?}: {e}");
            }
        }
    }
}
