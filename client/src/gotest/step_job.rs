//! go-test's jobs of step sets: the spec of a first run or a rerun ([`StepJob`]), submitting
//! and following it, and turning the finished job's step results into package results
//! (outputs read in batches, converted with `go tool test2json`). ginkgo reads its shards'
//! results with the same [`step_results`] and [`prefetch_outputs`].
use super::events::{test2json, TestEvent};
use super::units::Staged;
use super::verdict::{PackageResult, Verdict};
use super::watch::follow_job;
use super::{millis, steps, GoTestArgs, GoTestProgress};
use crate::farm::blobs::{batch_read, plan_batches, read_blob, MAX_BATCH_BLOB_BYTES};
use crate::farm::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1::{self, JobStatus, StepResult};
use archfarm_proto::Digest;
use futures::StreamExt;
use std::collections::HashMap;
use std::path::Path;

/// Step outputs converted by `go tool test2json` at once.
const PARALLEL_CONVERSIONS: usize = 8;

/// A job of step sets for `steps` (platform, step) with each step's `-test.run` pattern.
pub(super) struct StepJob<'a> {
    pub(super) steps: Vec<(&'a Staged, Option<String>)>,
    pub(super) platforms: &'a [String],
    pub(super) rerun: bool,
}

impl StepJob<'_> {
    pub(super) fn spec(
        &self,
        args: &GoTestArgs,
        minor: Option<u32>,
        env: &[(String, String)],
    ) -> v1::JobSpec {
        let watchdog = args.timeout + steps::WATCHDOG_GRACE;
        let mut step_sets = Vec::new();
        let mut longest_platform = 0u64;
        for platform in self.platforms {
            let steps: Vec<v1::Step> = self
                .steps
                .iter()
                .filter(|(s, _)| s.unit.platform == *platform)
                .map(|(s, pattern)| v1::Step {
                    name: s.unit.step_name.clone(),
                    argv: steps::step_argv(&steps::test_args(
                        minor,
                        args.timeout,
                        pattern.as_deref(),
                    )),
                    working_directory: steps::SRC_DIR.to_string(),
                    input_root: Some(s.input_root.to_proto()),
                    timeout_ms: millis(watchdog),
                    history_key: if self.rerun {
                        format!("{} (rerun)", s.unit.import_path)
                    } else {
                        s.unit.import_path.clone()
                    },
                    cache_key: if self.rerun {
                        String::new()
                    } else {
                        s.unit.key.hex()
                    },
                })
                .collect();
            if steps.is_empty() {
                continue;
            }
            longest_platform = longest_platform.max(millis(watchdog) * steps.len() as u64);
            step_sets.push(v1::PlatformSteps {
                platform: platform.clone(),
                steps,
            });
        }
        let (shards, shard_target_ms) = if self.rerun { (0, 0) } else { args.sharding() };
        let packages = self.steps.len();
        v1::JobSpec {
            platforms: Vec::new(),
            argv: Vec::new(),
            env: env
                .iter()
                .map(|(name, value)| v1::EnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            timeout_ms: (longest_platform + 60_000).min(24 * 3_600_000),
            input_root: None,
            allow_emulation: args.allow_emulation,
            required_labels: Vec::new(),
            working_directory: String::new(),
            description: format!(
                "go-test{}: {packages} package run{} on {} platform{}",
                if self.rerun { " rerun" } else { "" },
                if packages == 1 { "" } else { "s" },
                step_sets.len(),
                if step_sets.len() == 1 { "" } else { "s" }
            ),
            output_paths: Vec::new(),
            no_cache: args.no_cache || self.rerun,
            step_sets,
            shards,
            shard_target_ms,
            exclusive: false,
            network: false,
            cache_untrusted: args.cache.cache_untrusted,
            cache_emulated: args.cache.cache_emulated,
        }
    }
}

/// Submits a job and follows it; returns its final status.
pub(super) async fn run_steps(
    client: &mut FarmClient,
    spec: v1::JobSpec,
    packages: usize,
    progress: &mut (dyn FnMut(GoTestProgress) + Send),
) -> anyhow::Result<JobStatus> {
    let platforms = spec.step_sets.len();
    let job_id = rpc(client
        .jobs
        .submit(v1::SubmitRequest { spec: Some(spec) })
        .await)
    .context("failed to submit the go-test job")?
    .job_id;
    let shards = crate::farm::job::get_job(client, &job_id)
        .await
        .map(|j| j.actions.len())
        .unwrap_or(0);
    progress(GoTestProgress::Submitted {
        job_id: job_id.clone(),
        packages,
        platforms,
        shards,
    });
    follow_job(client, &job_id, GO_TEST_CANCEL_REASON, &mut |w| {
        progress(GoTestProgress::Watch(w))
    })
    .await
}

/// Recorded on the actions cancelled by a Ctrl-C.
const GO_TEST_CANCEL_REASON: &str = "cancelled by Ctrl-C in `archfarm go-test`";

/// By (platform, step name).
pub(crate) type ByStep<T> = HashMap<(String, String), T>;

/// Step results of a finished job by (platform, step name), and for steps without one, why.
pub(crate) fn step_results(job: &JobStatus) -> (ByStep<StepResult>, ByStep<String>) {
    let mut results = HashMap::new();
    let mut missing = HashMap::new();
    for a in &job.actions {
        if let Some(r) = &a.result {
            for s in &r.step_results {
                results.insert((a.platform.clone(), s.name.clone()), s.clone());
            }
        }
        for name in &a.step_names {
            let k = (a.platform.clone(), name.clone());
            if results.contains_key(&k) {
                continue;
            }
            let state = crate::farm::display::action_state_name(a.state());
            let why = [
                a.reason.as_str(),
                a.result.as_ref().map_or("", |r| r.message.as_str()),
            ]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or("no step result");
            missing.insert(
                k,
                format!(
                    "the farm did not run it: shard {} {}: {why}",
                    a.action_id,
                    crate::farm::display::words(state)
                ),
            );
        }
    }
    (results, missing)
}

/// The output blob a step result names; None for no output.
pub(crate) fn output_digest(step: &StepResult) -> anyhow::Result<Option<Digest>> {
    match step.output.as_ref() {
        Some(d) => {
            let d = Digest::from_proto(d).context("the step result names a bad output digest")?;
            Ok((d.size_bytes() > 0).then_some(d))
        }
        None => Ok(None),
    }
}

/// Reads the small outputs of `steps` in BatchRead batches (one call for many packages
/// rather than one each). A batch that fails is left out: its blobs are read one by one later,
/// so that one missing blob spoils only its own package.
pub(crate) async fn prefetch_outputs<'a>(
    client: &mut FarmClient,
    steps: impl IntoIterator<Item = &'a StepResult>,
) -> HashMap<Digest, Vec<u8>> {
    let mut small: Vec<Digest> = steps
        .into_iter()
        .filter_map(|s| output_digest(s).ok().flatten())
        .filter(|d| d.size_bytes() <= MAX_BATCH_BLOB_BYTES)
        .collect();
    small.sort();
    small.dedup();
    let mut fetched = HashMap::new();
    for batch in plan_batches(&small) {
        if let Ok(blobs) = batch_read(client, &batch).await {
            fetched.extend(batch.into_iter().zip(blobs));
        }
    }
    fetched
}

/// A step's output converted into events.
pub(super) async fn step_events(
    client: &mut FarmClient,
    cwd: &Path,
    import_path: &str,
    step: &StepResult,
    prefetched: &HashMap<Digest, Vec<u8>>,
) -> anyhow::Result<Vec<TestEvent>> {
    let raw = match output_digest(step)? {
        Some(d) => match prefetched.get(&d) {
            Some(bytes) => bytes.clone(),
            None => read_blob(client, d)
                .await
                .with_context(|| format!("failed to read the output of {import_path}"))?,
        },
        None => Vec::new(),
    };
    test2json(cwd, import_path, &raw).await
}

/// Converts step results into package results: outputs read in batches, then converted a few
/// at a time.
pub(super) async fn convert(
    client: &mut FarmClient,
    cwd: &Path,
    items: Vec<(String, String, StepResult)>,
) -> Vec<PackageResult> {
    let prefetched = prefetch_outputs(client, items.iter().map(|(_, _, s)| s)).await;
    let prefetched = &prefetched;
    let shared = client.clone();
    futures::stream::iter(items)
        .map(|(import_path, platform, step)| {
            let mut client = shared.clone();
            async move {
                match step_events(&mut client, cwd, &import_path, &step, prefetched).await {
                    Ok(events) => PackageResult::from_step(&import_path, &platform, &step, events),
                    Err(e) => PackageResult::without_run(
                        &import_path,
                        &platform,
                        Verdict::Infra,
                        format!("{e:#}"),
                    ),
                }
            }
        })
        .buffered(PARALLEL_CONVERSIONS)
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use super::super::key::CacheKey;
    use super::super::units::Unit;
    use super::*;
    use std::time::Duration;

    #[test]
    fn step_jobs_carry_keys_only_on_first_runs() {
        let unit = Unit {
            platform: "linux/arm64".into(),
            import_path: "example.com/fixtures/fail".into(),
            step_name: "example.com_fixtures_fail".into(),
            key: CacheKey([7; 32]),
        };
        let staged = Staged {
            unit,
            input_root: Digest::of(b"root"),
        };
        let mut args = GoTestArgs::new(["."]);
        args.timeout = Duration::from_secs(180);
        args.allow_emulation = true;
        let platforms = vec!["linux/amd64".to_string(), "linux/arm64".to_string()];
        let env = vec![("FLAKY_MARKER".to_string(), "x".to_string())];
        let first = StepJob {
            steps: vec![(&staged, None)],
            platforms: &platforms,
            rerun: false,
        }
        .spec(&args, Some(19), &env);
        assert_eq!(
            first.step_sets.len(),
            1,
            "platforms without steps are left out"
        );
        assert!(first.platforms.is_empty() && first.argv.is_empty());
        let step = &first.step_sets[0].steps[0];
        assert_eq!(
            step.argv,
            [
                "../pkg.test",
                "-test.v",
                "-test.paniconexit0",
                "-test.timeout=180s",
                "-test.count=1"
            ]
        );
        assert_eq!(step.working_directory, "src");
        assert_eq!(step.timeout_ms, 210_000);
        assert_eq!(step.history_key, "example.com/fixtures/fail");
        assert_eq!(step.cache_key, CacheKey([7; 32]).hex());
        assert_eq!((first.shards, first.shard_target_ms), (0, 120_000));
        assert!(first.allow_emulation && !first.no_cache);
        assert_eq!(first.env[0].name, "FLAKY_MARKER");

        let rerun = StepJob {
            steps: vec![(&staged, Some("^(TestAlwaysFails)$".to_string()))],
            platforms: &platforms,
            rerun: true,
        }
        .spec(&args, Some(19), &env);
        let step = &rerun.step_sets[0].steps[0];
        assert_eq!(step.argv.last().unwrap(), "-test.run=^(TestAlwaysFails)$");
        assert!(step.cache_key.is_empty());
        assert!(rerun.no_cache);
    }
}
