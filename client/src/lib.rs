//! archfarm's client library: the connection to a farm (credentials, uploads and downloads,
//! submitting and watching jobs), the Go recipes built on it (go-test, go-build, ginkgo) and
//! the `archfarm` command line. Product code: it runs on CI machines with no checkout.

pub mod cli;
pub mod config;
pub mod farm;
pub mod ginkgo;
pub mod go_vars;
pub mod gobuild;
pub mod gotest;
