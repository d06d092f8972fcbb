//! Coordinator configuration: flags (clap), validated before anything starts.
use crate::farm::FarmConfig;
use std::path::PathBuf;

/// Longest quarantine of an agent, in seconds.
pub const QUARANTINE_MAX_S: u64 = 3600;

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
    /// Actions an agent may fail in a row for infra reasons (lost, lease lapsed, INFRA_ERROR)
    /// before it is quarantined: no new work for a while.
    #[arg(long, default_value_t = 3)]
    pub quarantine_after: u32,
    /// Seconds of an agent's first quarantine; each further one in a row doubles it, up to
    /// an hour.
    #[arg(long, default_value_t = 60)]
    pub quarantine_base_s: u64,
    /// Size budget of the blob store in bytes; least recently used blobs that no queued or
    /// running action needs are evicted above it.
    #[arg(long, default_value_t = crate::cas::DEFAULT_BUDGET_BYTES)]
    pub cas_budget_bytes: u64,
}

impl Config {
    /// Checks and returns the blob store's size budget.
    pub fn cas_budget_bytes(&self) -> anyhow::Result<u64> {
        anyhow::ensure!(
            self.cas_budget_bytes > 0,
            "--cas-budget-bytes must be above 0"
        );
        Ok(self.cas_budget_bytes)
    }

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
        anyhow::ensure!(
            (1..=100).contains(&self.quarantine_after),
            "--quarantine-after must be 1..=100"
        );
        anyhow::ensure!(
            (1..=QUARANTINE_MAX_S).contains(&self.quarantine_base_s),
            "--quarantine-base-s must be 1..={QUARANTINE_MAX_S}"
        );
        Ok(FarmConfig {
            lease_ms: self.lease_s * 1000,
            heartbeat_ms: self.heartbeat_s * 1000,
            unschedulable_grace_ms: self.unschedulable_grace_s * 1000,
            max_attempts: self.max_attempts,
            quarantine_after: self.quarantine_after,
            quarantine_base_ms: self.quarantine_base_s * 1000,
            quarantine_max_ms: QUARANTINE_MAX_S * 1000,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn cas_budget_defaults_to_20_gib_and_must_be_above_zero() {
        let parse = |extra: &[&str]| {
            Config::try_parse_from(
                ["archfarm-coordinator", "--data-dir", "/tmp/x"]
                    .iter()
                    .chain(extra),
            )
        };
        assert_eq!(parse(&[]).unwrap().cas_budget_bytes().unwrap(), 20 << 30);
        let c = parse(&["--cas-budget-bytes", "1000"]).unwrap();
        assert_eq!(c.cas_budget_bytes().unwrap(), 1000);
        assert!(parse(&["--cas-budget-bytes", "0"])
            .unwrap()
            .cas_budget_bytes()
            .is_err());
        assert!(parse(&["--cas-budget-bytes", "20GiB"]).is_err());
    }

    #[test]
    fn quarantine_defaults_to_three_failures_and_a_minute_doubling_to_an_hour() {
        let parse = |extra: &[&str]| {
            Config::try_parse_from(
                ["archfarm-coordinator", "--data-dir", "/tmp/x"]
                    .iter()
                    .chain(extra),
            )
            .unwrap()
            .farm_config()
        };
        let f = parse(&[]).unwrap();
        assert_eq!(
            (
                f.quarantine_after,
                f.quarantine_base_ms,
                f.quarantine_max_ms
            ),
            (3, 60_000, 3_600_000)
        );
        let f = parse(&["--quarantine-after", "5", "--quarantine-base-s", "10"]).unwrap();
        assert_eq!((f.quarantine_after, f.quarantine_base_ms), (5, 10_000));
        assert!(parse(&["--quarantine-after", "0"]).is_err());
        assert!(parse(&["--quarantine-base-s", "3601"]).is_err());
    }
}
