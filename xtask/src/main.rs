//! `cargo xtask`: parses the command line and hands each command to the library; an error
//! becomes one `error: ...` line and exit code 2.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "archfarm's command line: use a farm, run CI, start a demo farm, benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Use a farm: status, run, token, agents, cancel, job.
    Farm(Box<xtask::farm::FarmCli>),
    /// What CI runs: fmt --check, clippy, build, test.
    Ci(xtask::ci::CiArgs),
    /// Start a local farm (coordinator and five agents, four of them emulated) and run a job.
    Demo(xtask::demo::DemoArgs),
    /// Measure the farm.
    Bench(xtask::bench::BenchArgs),
    /// Kill agents and the coordinator under a job of many actions; check nothing was lost.
    Chaos(xtask::chaos::ChaosArgs),
    /// Release archives for every platform (cross-built here); `--verify` runs each agent.
    Dist(xtask::dist::DistArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Farm(farm) => xtask::block_on(xtask::farm::run_command(*farm)),
        Command::Ci(args) => xtask::ci::run(&args),
        Command::Demo(args) => xtask::block_on(xtask::demo::run(args)),
        Command::Bench(args) => xtask::block_on(xtask::bench::run(args)),
        Command::Chaos(args) => xtask::block_on(xtask::chaos::run(args)),
        Command::Dist(args) => xtask::block_on(xtask::dist::run(args)),
    };
    match result {
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
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn farm_run_takes_the_command_after_its_options() {
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "farm",
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
        let Command::Farm(farm) = cli.command else {
            panic!("not farm");
        };
        assert_eq!(farm.options.coordinator, "https://farm:7443");
        let xtask::farm::FarmCommand::Run(run) = farm.command else {
            panic!("not run");
        };
        assert_eq!(run.platforms, ["linux/arm64", "linux/s390x"]);
        assert_eq!(run.command, ["go", "test", "-v"]);
        assert_eq!(run.timeout, std::time::Duration::from_secs(90));
        assert_eq!(run.env[0].value, "-count=1");
    }

    #[test]
    fn token_labels_split_at_commas() {
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "farm",
            "token",
            "create",
            "--labels",
            "lab=osu,node-e2e",
            "--single-use",
        ])
        .unwrap();
        let Command::Farm(farm) = cli.command else {
            panic!("not farm");
        };
        let xtask::farm::FarmCommand::Token {
            command: xtask::farm::token::TokenCommand::Create(create),
        } = farm.command
        else {
            panic!("not token create");
        };
        let keys: Vec<&str> = create.labels.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["lab", "node-e2e"]);
        assert!(create.single_use);
        assert!(
            Cli::try_parse_from(["cargo xtask", "farm", "token", "create", "--labels", "Bad"])
                .is_err()
        );
    }
}
