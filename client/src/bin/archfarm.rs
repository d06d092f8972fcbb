//! `archfarm`: the farm's command line for people and CI; everything is in the library's
//! `cli` module so that `archfarm` runs the very same code.
fn main() -> std::process::ExitCode {
    archfarm_client::cli::main_with_args(std::env::args_os())
}
