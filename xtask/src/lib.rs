//! archfarm's automation for developers of this repository (`cargo xtask ...`): the CI steps,
//! the local demo farm, the chaos run, benchmarks and release archives; `farm` passes through
//! to the `archfarm` command line of the client crate. main.rs only parses; the work lives
//! here so that end-to-end tests can call the same functions.

pub mod bench;
pub mod binfmt;
pub mod chaos;
pub mod ci;
pub mod demo;
pub mod demo_login;
pub mod dist;
pub mod paths;

pub use archfarm_client::cli::block_on;
