//! go-test's units of work: one package on one platform, keyed by what the toolchain would
//! read ([`super::key`]), looked up in the farm's step cache, and for the misses built with
//! `go test -c` and staged as a step tree (`pkg.test` + `src/`).
use super::build;
use super::golist::{platform_env, GoPackage, PackageIndex};
use super::key::{package_key, CacheKey, FileHashes, KeyContext};
use super::verdict::{PackageResult, Verdict};
use super::{steps, GoTestArgs, GoTestProgress};
use crate::farm::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::tree::{build_local_tree, LocalTree};
use archfarm_proto::v1::{self, StepResult};
use archfarm_proto::{Digest, Platform};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One package on one platform that the farm has to run (or holds a result for).
#[derive(Debug, Clone)]
pub(super) struct Unit {
    pub(super) platform: String,
    pub(super) import_path: String,
    pub(super) step_name: String,
    pub(super) key: CacheKey,
}

/// A unit's step, built and staged.
#[derive(Debug, Clone)]
pub(super) struct Staged {
    pub(super) unit: Unit,
    pub(super) input_root: Digest,
}

/// Everything the keys cover besides files, owned (for the hashing thread).
#[derive(Debug, Clone)]
pub(super) struct KeySettings {
    pub(super) go_version: String,
    pub(super) cgo: bool,
    pub(super) tags: String,
    pub(super) race: bool,
    pub(super) test_args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
}

/// Cache keys for every target on every platform; packages that cannot be keyed (no test main
/// on a platform, broken) come back as results instead.
pub(super) fn plan_units(
    targets: &[String],
    names: &HashMap<String, String>,
    platforms: &[Platform],
    indexes: &[PackageIndex],
    settings: &KeySettings,
) -> anyhow::Result<(Vec<Unit>, Vec<PackageResult>)> {
    let mut hashes = FileHashes::default();
    let mut units = Vec::new();
    let mut results = Vec::new();
    for (platform, index) in platforms.iter().zip(indexes) {
        let pname = platform.to_string();
        let ctx = KeyContext {
            go_version: &settings.go_version,
            platform,
            cgo: settings.cgo,
            tags: &settings.tags,
            race: settings.race,
            test_args: &settings.test_args,
            env: &settings.env,
        };
        for target in targets {
            let variant = index.get(&format!("{target} [{target}.test]"));
            let main = index.test_main(target);
            let broken = [index.get(target), variant, main]
                .into_iter()
                .flatten()
                .find_map(GoPackage::errors);
            if main.is_none() || broken.is_some() {
                let why = broken.unwrap_or_else(|| "go list shows no test main".to_string());
                let no_files = why.contains("build constraints exclude all Go files");
                let (verdict, detail) = if no_files {
                    (Verdict::Skip, format!("no Go files for {pname}"))
                } else {
                    (Verdict::BuildFailed, format!("go list: {why}"))
                };
                results.push(PackageResult::without_run(target, &pname, verdict, detail));
                continue;
            }
            let key = package_key(index, target, &ctx, &mut hashes).with_context(|| {
                format!("failed to derive the cache key of {target} on {pname}")
            })?;
            units.push(Unit {
                platform: pname.clone(),
                import_path: target.clone(),
                step_name: names.get(target).cloned().unwrap_or_default(),
                key,
            });
        }
    }
    Ok((units, results))
}

/// Jobs.LookupSteps for every unit; hits by key.
/// Results produced under emulation count only with `allow_emulation`.
pub(super) async fn lookup(
    client: &mut FarmClient,
    units: &[Unit],
    allow_emulation: bool,
) -> anyhow::Result<HashMap<String, StepResult>> {
    let mut hits = HashMap::new();
    for chunk in units.chunks(100_000) {
        let response = rpc(client
            .jobs
            .lookup_steps(v1::LookupStepsRequest {
                cache_keys: chunk.iter().map(|u| u.key.hex()).collect(),
                allow_emulation,
            })
            .await)
        .context("failed to look up the step cache")?;
        for hit in response.hits {
            if let Some(mut r) = hit.result {
                r.cached = true;
                hits.insert(hit.cache_key, r);
            }
        }
    }
    Ok(hits)
}

/// Builds the misses' test binaries, stages their trees; returns the staged steps and the
/// build failures as results.
#[allow(clippy::too_many_arguments)] // one call site; a struct of them would only rename them
pub(super) async fn build_and_stage(
    cwd: &Path,
    stage: &Path,
    units: Vec<Unit>,
    platforms: &[Platform],
    dirs: &HashMap<(String, String), PathBuf>,
    args: &GoTestArgs,
    cgo: bool,
    progress: &mut (dyn FnMut(GoTestProgress) + Send),
) -> anyhow::Result<(Vec<(Staged, LocalTree)>, Vec<PackageResult>)> {
    let by_name: HashMap<String, &Platform> =
        platforms.iter().map(|p| (p.to_string(), p)).collect();
    let requests: Vec<build::BuildRequest> = units
        .iter()
        .map(|u| {
            let p = by_name[&u.platform];
            build::BuildRequest {
                import_path: u.import_path.clone(),
                output: step_dir(stage, p, &u.step_name).join(steps::TEST_BINARY),
                env: platform_env(p, cgo),
            }
        })
        .collect();
    let built = build::build_all(cwd, &requests, args.race, args.tags.as_deref()).await;
    let mut staged = Vec::new();
    let mut failed = Vec::new();
    for ((unit, request), outcome) in units.into_iter().zip(&requests).zip(built) {
        if let Err(output) = outcome {
            progress(GoTestProgress::BuildFailed {
                package: unit.import_path.clone(),
                platform: unit.platform.clone(),
            });
            failed.push(PackageResult::without_run(
                &unit.import_path,
                &unit.platform,
                Verdict::BuildFailed,
                output,
            ));
            continue;
        }
        let dir = request
            .output
            .parent()
            .map(Path::to_path_buf)
            .context("a test binary has no directory")?;
        let pkg_dir = dirs
            .get(&(unit.platform.clone(), unit.import_path.clone()))
            .cloned()
            .context("a package without a directory")?;
        let tree = tokio::task::spawn_blocking(move || {
            steps::stage_sources(&dir, &pkg_dir)?;
            build_local_tree(&dir)
        })
        .await
        .context("failed to join the staging task")?
        .with_context(|| {
            format!(
                "failed to stage the step of {} on {}",
                unit.import_path, unit.platform
            )
        })?;
        staged.push((
            Staged {
                unit,
                input_root: tree.root,
            },
            tree,
        ));
    }
    Ok((staged, failed))
}

fn step_dir(stage: &Path, platform: &Platform, name: &str) -> PathBuf {
    stage.join(steps::platform_slug(platform)).join(name)
}
