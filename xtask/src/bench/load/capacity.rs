//! The capacity run of `bench load`: a closed loop that submits jobs of one-step actions as
//! earlier ones finish, keeping more actions outstanding than the agents have slots so the
//! queue never runs dry; completed actions per second from the first submit to the last
//! acknowledgement. Every round names its actions' steps `a<index in the round>`, so later
//! rounds run the same steps again, as a CI's packages are: the step history the coordinator
//! keeps grows with the distinct steps, not with the runs.
use super::fleet::{step_name, Fleet, Seen, PLATFORM};
use super::report::{Round, Tally};
use super::rss_of;
use anyhow::bail;
use archfarm_client::farm::{rpc, FarmClient};
use archfarm_proto::v1;
use std::time::{Duration, Instant};

/// The round fails when no action completes for this long.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The shape of a capacity round.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub actions: u64,
    /// Actions per job.
    pub job_size: u64,
    /// Jobs submitted and not yet done at any time.
    pub jobs_in_flight: u64,
}

/// The job of the actions `first..first+n`: one step (`true`) and one shard each, no cache;
/// each step is named by its action's index.
pub fn job_spec(first: u64, n: u64) -> v1::JobSpec {
    v1::JobSpec {
        step_sets: vec![v1::PlatformSteps {
            platform: PLATFORM.to_string(),
            steps: (first..first + n)
                .map(|i| v1::Step {
                    name: step_name(i),
                    argv: vec!["true".to_string()],
                    ..Default::default()
                })
                .collect(),
        }],
        shards: n as u32,
        timeout_ms: 60_000,
        no_cache: true,
        description: format!("cargo xtask bench load: actions {first}..{}", first + n),
        ..Default::default()
    }
}

/// Runs one round of `shape.actions` actions against the coordinator `pid`.
pub async fn round(
    fleet: &mut Fleet,
    client: &mut FarmClient,
    pid: u32,
    shape: Shape,
) -> anyhow::Result<(Round, Vec<String>)> {
    let jobs = shape.actions.div_ceil(shape.job_size);
    let mut remaining: Vec<u64> = (0..jobs)
        .map(|j| shape.job_size.min(shape.actions - j * shape.job_size))
        .collect();
    let mut tally = Tally::new(0, shape.actions);
    let (mut next_job, mut in_flight) = (0u64, 0u64);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut rss_peak = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (failed_tx, mut failed) = tokio::sync::mpsc::unbounded_channel::<String>();
    while tally.accepted() < shape.actions {
        // Submitted concurrently: a round of many small jobs measures the farm, not one
        // Submit's round trip after another.
        while in_flight < shape.jobs_in_flight && next_job < jobs {
            let first = next_job * shape.job_size;
            let spec = job_spec(first, remaining[next_job as usize]);
            let (mut jobs, failed) = (client.jobs.clone(), failed_tx.clone());
            tokio::spawn(async move {
                let submitted = rpc(jobs.submit(v1::SubmitRequest { spec: Some(spec) }).await);
                if let Err(e) = submitted {
                    let _ = failed.send(format!("failed to submit a job: {e:#}"));
                }
            });
            next_job += 1;
            in_flight += 1;
        }
        let event = tokio::select! {
            e = fleet.seen.recv() => e,
            f = failed.recv() => match f {
                Some(f) => bail!(f),
                None => continue,
            },
            _ = tick.tick() => {
                rss_peak = rss_peak.max(rss_of(pid)?);
                if last_progress.elapsed() > STALL_TIMEOUT {
                    tally.problems.push(format!(
                        "no action completed for {} s; the round stopped",
                        STALL_TIMEOUT.as_secs()
                    ));
                    break;
                }
                continue;
            }
        };
        match event {
            None => bail!("every simulated agent stopped"),
            Some(Seen::Welcomed) => {}
            Some(Seen::Assigned { index, .. }) => {
                tally.assigned(index);
            }
            Some(Seen::Acked {
                index,
                action,
                accepted,
                reason,
            }) => {
                if let Some(o) = tally.acked(index, &action, accepted, &reason) {
                    last_progress = Instant::now();
                    let job = (o / shape.job_size) as usize;
                    remaining[job] -= 1;
                    if remaining[job] == 0 {
                        in_flight -= 1;
                    }
                }
            }
            Some(Seen::Ended { agent, why }) => bail!("simulated agent {agent} ended: {why}"),
        }
    }
    let took = last_progress.duration_since(started);
    let rss_end = rss_of(pid)?;
    Ok((
        Round {
            actions: shape.actions,
            took,
            lost: tally.lost(),
            rss_end,
            rss_peak: rss_peak.max(rss_end),
        },
        tally.problems,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_cover_their_actions_once_with_one_shard_per_step() {
        let spec = job_spec(1_000, 500);
        assert_eq!(spec.shards, 500);
        let steps = &spec.step_sets[0].steps;
        assert_eq!(steps.len(), 500);
        assert_eq!(steps[0].name, "a00001000");
        assert_eq!(steps[499].name, "a00001499");
        assert!(spec.no_cache);
    }
}
