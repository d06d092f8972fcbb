//! Coordinator configuration: flags (clap), validated before anything starts.
use crate::farm::FarmConfig;
use std::path::PathBuf;

/// Everything `run` needs.
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "archfarm-coordinator",
    version,
    about = "archfarm coordinator: agents join it, CI submits jobs to it"
)]
pub struct Config {
    /// Address to listen on, e.g. 0.0.0.0:7443.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    /// Directory for the CA, admin credentials, state and blobs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Extra names or IPs for the server certificate (repeatable); loopback is always there.
    #[arg(long)]
    pub advertise: Vec<String>,
    /// Seconds without a heartbeat after which an agent's leases lapse.
    #[arg(long, default_value_t = 15)]
    pub lease_s: u64,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 3)]
    pub heartbeat_s: u64,
    /// Seconds an action may wait with no agent able to run it before it is unschedulable.
    #[arg(long, default_value_t = 30)]
    pub unschedulable_grace_s: u64,
    /// Attempts per action before it fails as an infra failure.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: u32,
}

impl Config {
    /// Checks the values and derives the farm's timing.
    pub fn farm_config(&self) -> anyhow::Result<FarmConfig> {
        anyhow::ensure!(self.heartbeat_s >= 1, "--heartbeat-s must be at least 1");
        anyhow::ensure!(
            self.lease_s >= 2 * self.heartbeat_s,
            "--lease-s ({}) must be at least twice --heartbeat-s ({})",
            self.lease_s,
            self.heartbeat_s
        );
        anyhow::ensure!(
            (1..=20).contains(&self.max_attempts),
            "--max-attempts must be 1..=20"
        );
        anyhow::ensure!(
            self.unschedulable_grace_s >= 1,
            "--unschedulable-grace-s must be at least 1"
        );
        Ok(FarmConfig {
            lease_ms: self.lease_s * 1000,
            heartbeat_ms: self.heartbeat_s * 1000,
            unschedulable_grace_ms: self.unschedulable_grace_s * 1000,
            max_attempts: self.max_attempts,
        })
    }
}
