//! archfarm's automation and command line (`cargo xtask ...`): the farm client commands, the CI
//! steps, the local demo farm, the chaos run and benchmarks. main.rs only parses; the work lives here so that
//! end-to-end tests can call the same functions.

pub mod bench;
pub mod binfmt;
pub mod chaos;
pub mod ci;
pub mod demo;
pub mod dist;
pub mod farm;
pub mod ginkgo;
pub mod go_vars;
pub mod gobuild;
pub mod gotest;
pub mod paths;

use std::future::Future;

/// Runs an async command to completion on a fresh multi-threaded runtime.
pub fn block_on<F: Future<Output = anyhow::Result<u8>>>(command: F) -> anyhow::Result<u8> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")?
        .block_on(command)
}
