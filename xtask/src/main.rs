//! `cargo xtask`: parses the command line and hands each command to the library; an error
//! becomes one `error: ...` line and exit code 2. `cargo xtask farm ARGS` is `archfarm ARGS`.
use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "archfarm's automation: CI, a demo farm, benchmarks, chaos, release archives; \
             `farm ARGS` runs `archfarm ARGS`"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The `archfarm` command line (status, run, go-test, ...): `cargo xtask farm --help`.
    #[command(disable_help_flag = true)]
    Farm {
        /// Everything after `farm`, handed to `archfarm` as it is.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
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
        Command::Farm { args } => {
            let argv = std::iter::once(std::ffi::OsString::from("cargo xtask farm")).chain(args);
            return archfarm_client::cli::main_with_args(argv);
        }
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
    fn farm_passes_everything_through() {
        let cli = Cli::try_parse_from([
            "cargo xtask",
            "farm",
            "--coordinator",
            "https://farm:7443",
            "run",
            "--help",
            "--",
            "go",
        ])
        .unwrap();
        let Command::Farm { args } = cli.command else {
            panic!("not farm");
        };
        assert_eq!(
            args,
            [
                "--coordinator",
                "https://farm:7443",
                "run",
                "--help",
                "--",
                "go"
            ]
        );
    }
}
