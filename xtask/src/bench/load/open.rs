//! The latency run of `bench load`: an open loop. One-action jobs are submitted on a fixed
//! schedule (action i at start + i/rate) over several connections, whatever the coordinator
//! does meanwhile, and each action's Submit-to-Assign time is taken from its scheduled send
//! time, not from when the send happened: a coordinator that stalls delays the sends behind
//! the stall too, and that delay counts (no coordinated omission). At a rate below capacity
//! it measures the cost of one dispatch, not queueing.
use super::capacity::job_spec;
use super::fleet::{Fleet, Seen};
use super::report::{OpenLoop, Tally};
use super::rss_of;
use anyhow::bail;
use archfarm_client::farm::{FarmClient, FarmOptions};
use archfarm_proto::v1;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};

/// Client connections the submissions are spread over.
const CONNECTIONS: usize = 8;
/// Submissions outstanding at once; a send beyond waits (and its wait counts).
const MAX_OUTSTANDING: usize = 1_024;

/// When action `i` of a run at `rate` actions/s is due, from the run's start (exact in
/// nanoseconds, so the schedule never drifts).
pub fn scheduled_offset(i: u64, rate: u32) -> Duration {
    let nanos = u128::from(i) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(nanos as u64)
}

/// The open-loop run's shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub actions: u64,
    /// Offered actions per second.
    pub rate: u32,
    /// How long to wait for the last results after the last send.
    pub drain: Duration,
    /// The run stops when the coordinator's RSS passes this (bytes): an overloaded
    /// coordinator must not take the machine down with it.
    pub max_rss: u64,
}

/// Submits `shape.actions` one-action jobs on schedule (their steps named `a<index>`) and
/// measures each one's Submit-to-Assign time from its scheduled send.
pub async fn run(
    fleet: &mut Fleet,
    farm: &FarmOptions,
    pid: u32,
    shape: Shape,
) -> anyhow::Result<(OpenLoop, Vec<String>)> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(FarmClient::connect(farm).await?.jobs);
    }
    let (failed_tx, mut failed) = mpsc::unbounded_channel::<String>();
    let start = Instant::now() + Duration::from_millis(100);
    let n = shape.actions;
    let sender = tokio::spawn(async move {
        let outstanding = Arc::new(Semaphore::new(MAX_OUTSTANDING));
        for i in 0..n {
            tokio::time::sleep_until((start + scheduled_offset(i, shape.rate)).into()).await;
            let Ok(permit) = outstanding.clone().acquire_owned().await else {
                return;
            };
            let mut jobs = clients[i as usize % clients.len()].clone();
            let failed = failed_tx.clone();
            tokio::spawn(async move {
                let spec = job_spec(i, 1);
                let submitted = jobs.submit(v1::SubmitRequest { spec: Some(spec) }).await;
                if let Err(status) = submitted {
                    let _ = failed.send(format!("submit of action {i}: {status}"));
                }
                drop(permit);
            });
        }
    });
    let mut tally = Tally::new(0, n);
    let mut latencies = Vec::with_capacity(n as usize);
    let mut problems = Vec::new();
    let deadline = start + scheduled_offset(n, shape.rate) + shape.drain;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut submit_failures = 0u64;
    while tally.accepted() + submit_failures < n {
        tokio::select! {
            e = fleet.seen.recv() => match e {
                None => bail!("every simulated agent stopped"),
                Some(Seen::Welcomed) => {}
                Some(Seen::Assigned { index, at }) => {
                    if let Some(o) = tally.assigned(index) {
                        let due = start + scheduled_offset(o, shape.rate);
                        latencies.push(at.saturating_duration_since(due));
                    }
                }
                Some(Seen::Acked { index, action, accepted, reason }) => {
                    tally.acked(index, &action, accepted, &reason);
                }
                Some(Seen::Ended { agent, why }) => bail!("simulated agent {agent} ended: {why}"),
            },
            f = failed.recv() => if let Some(f) = f {
                submit_failures += 1;
                problems.push(f);
            },
            _ = tick.tick() => {
                let rss = rss_of(pid)?;
                if rss > shape.max_rss {
                    problems.push(format!(
                        "the coordinator's RSS reached {} MiB; the run stopped",
                        rss >> 20
                    ));
                    break;
                }
                if Instant::now() > deadline {
                    problems.push(format!(
                        "{} actions not recorded {} s after the last was due",
                        n - tally.accepted(),
                        shape.drain.as_secs()
                    ));
                    break;
                }
            }
        }
    }
    sender.abort();
    problems.append(&mut tally.problems);
    let rss_end = rss_of(pid)?;
    Ok((
        OpenLoop {
            rate: shape.rate,
            actions: n,
            latencies,
            lost: tally.lost(),
            rss_end,
        },
        problems,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_exact_and_does_not_drift() {
        assert_eq!(scheduled_offset(0, 1_000), Duration::ZERO);
        assert_eq!(scheduled_offset(1, 1_000), Duration::from_millis(1));
        assert_eq!(scheduled_offset(3_000, 3_000), Duration::from_secs(1));
        assert_eq!(scheduled_offset(1, 3), Duration::from_nanos(333_333_333));
        // A million sends at 3/s end exactly where 1e6/3 seconds say, not a rounding later.
        assert_eq!(
            scheduled_offset(1_000_000, 3),
            Duration::from_nanos(333_333_333_333_333)
        );
        assert_eq!(
            scheduled_offset(5, 0),
            Duration::from_secs(5),
            "rate 0 is 1/s"
        );
    }
}
