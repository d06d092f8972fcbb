//! What go-test returns once the verdicts are in ([`GoTestReport`]) and the ways it is shown:
//! what failed with its output (as `go test` prints it), the package x platform matrix, the
//! predicted and actual makespan per platform, the raw `go test -json` stream per platform,
//! JUnit XML, and the exit code.
use super::events::TestOutcome;
use super::junit;
use super::verdict::{PackageResult, Verdict};
use crate::farm::display::format_ms;
use anyhow::Context;
use archfarm_proto::v1::ActionStatus;
use comfy_table::{presets, Cell, ContentArrangement, Table};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Results by (import path, platform).
pub type Results = BTreeMap<(String, String), PackageResult>;

/// What a go-test run found: every (package, platform) verdict and how the first run's shards
/// went. The command line shows it as text, JUnit XML and `go test -json` streams.
#[derive(Debug, Clone)]
pub struct GoTestReport {
    /// The platforms, in `--platform` order.
    pub platforms: Vec<String>,
    /// `go version` of the toolchain that built the tests.
    pub go_version: String,
    /// Verdicts by (import path, platform).
    pub results: Results,
    /// Per platform, the first run's shards; empty when nothing ran on the farm.
    pub makespans: Vec<Makespan>,
}

impl GoTestReport {
    /// 1 when any package failed, failed to build, hung or could not run; else 0.
    pub fn exit_code(&self) -> u8 {
        exit_code(&self.results)
    }

    /// Writes each platform's `go test -json` stream to `dir/<os>_<arch>.json`; returns the
    /// paths.
    pub fn write_json_streams(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        write_json_streams(dir, &self.platforms, &self.results)
    }

    /// Writes `dir/junit_<os>_<arch>.xml` per platform; returns the paths.
    pub fn write_junit(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        self.platforms
            .iter()
            .map(|p| {
                let report = junit::platform_report(
                    self.results.values().filter(|r| r.platform == *p),
                    &self.go_version,
                );
                junit::write_report(dir, p, &report)
            })
            .collect()
    }
}

/// What failed, flaked or could not run, with its output, as `go test` shows it: for each
/// bad cell a `--- FAIL pkg on platform` line, its failed tests' output (or the package's
/// own when no test failed) and the detail; for each flaky cell one line naming the tests.
pub fn problems_text(results: &Results) -> String {
    let mut out = String::new();
    for r in results.values() {
        let emulated = if r.emulated { " (emulated)" } else { "" };
        match r.verdict {
            Verdict::Fail | Verdict::BuildFailed | Verdict::Hang | Verdict::Infra => {
                out.push_str(&format!(
                    "--- {} {} on {}{emulated}\n",
                    r.verdict.word().to_uppercase(),
                    r.import_path,
                    r.platform
                ));
                for t in r
                    .tests
                    .iter()
                    .filter(|t| matches!(t.outcome, TestOutcome::Fail | TestOutcome::Unfinished))
                {
                    out.push_str(&t.output);
                }
                if !r.output.trim().is_empty()
                    && r.tests.iter().all(|t| t.outcome != TestOutcome::Fail)
                {
                    out.push_str(&r.output);
                }
                if !r.detail.is_empty() {
                    out.push_str(r.detail.trim_end());
                    out.push('\n');
                }
            }
            Verdict::Flaky => {
                let names: Vec<&str> = r
                    .tests
                    .iter()
                    .filter(|t| t.flaky)
                    .map(|t| t.name.as_str())
                    .collect();
                out.push_str(&format!(
                    "--- FLAKY {} on {}{emulated}: {} failed at first and passed on a rerun\n",
                    r.import_path,
                    r.platform,
                    names.join(", ")
                ));
            }
            _ => {}
        }
    }
    out
}

/// A matrix cell: the verdict, with `*` when it ran emulated.
pub fn cell_text(r: &PackageResult) -> String {
    format!("{}{}", r.verdict.word(), if r.emulated { "*" } else { "" })
}

/// The matrix: one row per package, one column per platform (in `platforms` order), and a
/// footnote when a cell ran emulated.
pub fn matrix(platforms: &[String], results: &Results) -> String {
    let packages: BTreeSet<&str> = results.keys().map(|(p, _)| p.as_str()).collect();
    let mut table = Table::new();
    table
        .load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic);
    let mut header = vec![Cell::new("package")];
    header.extend(platforms.iter().map(Cell::new));
    table.set_header(header);
    let mut emulated = false;
    for pkg in &packages {
        let mut row = vec![Cell::new(pkg)];
        for platform in platforms {
            let text = match results.get(&(pkg.to_string(), platform.clone())) {
                Some(r) => {
                    emulated |= r.emulated;
                    cell_text(r)
                }
                None => "-".to_string(),
            };
            row.push(Cell::new(text));
        }
        table.add_row(row);
    }
    let mut out = table.to_string();
    if emulated {
        out.push_str("\n* emulated: ran under qemu-user on an emulated agent");
    }
    out
}

/// `12 pass, 1 fail, 3 cached`: how many cells have each verdict, in verdict order.
pub fn verdict_counts(results: &Results) -> String {
    let mut counts: BTreeMap<Verdict, usize> = BTreeMap::new();
    for r in results.values() {
        *counts.entry(r.verdict).or_default() += 1;
    }
    if counts.is_empty() {
        return "no packages with tests".to_string();
    }
    counts
        .iter()
        .map(|(v, n)| format!("{n} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One platform's shards: how many, the predicted makespan (the largest predicted shard) and
/// the actual one (the longest shard's run).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Makespan {
    /// Platform.
    pub platform: String,
    /// Actions (shards) of the job on it.
    pub shards: usize,
    /// Largest `predicted_ms`.
    pub predicted_ms: u64,
    /// Longest action run, in milliseconds.
    pub actual_ms: u64,
}

/// Makespans per platform of a job's actions, in `platforms` order (platforms without actions
/// left out).
pub fn makespans(platforms: &[String], actions: &[ActionStatus]) -> Vec<Makespan> {
    platforms
        .iter()
        .filter_map(|p| {
            let mine: Vec<&ActionStatus> = actions.iter().filter(|a| a.platform == *p).collect();
            (!mine.is_empty()).then(|| Makespan {
                platform: p.clone(),
                shards: mine.len(),
                predicted_ms: mine.iter().map(|a| a.predicted_ms).max().unwrap_or(0),
                actual_ms: mine
                    .iter()
                    .filter_map(|a| a.result.as_ref().map(|r| r.duration_ms))
                    .max()
                    .unwrap_or(0),
            })
        })
        .collect()
}

/// `linux/arm64: 3 shards, predicted 1m 2s, actual 58s`.
pub fn makespan_line(m: &Makespan) -> String {
    format!(
        "{}: {} shard{}, predicted makespan {}, actual {}",
        m.platform,
        m.shards,
        if m.shards == 1 { "" } else { "s" },
        format_ms(m.predicted_ms),
        format_ms(m.actual_ms)
    )
}

/// The file name of a platform's `go test -json` stream: `linux_arm64.json`.
pub fn json_file_name(platform: &str) -> String {
    format!("{}.json", platform.replace('/', "_"))
}

/// The `go test -json` stream of one platform: every package's events, packages in order.
pub fn json_stream<'a>(results: impl IntoIterator<Item = &'a PackageResult>) -> String {
    results
        .into_iter()
        .flat_map(|r| r.events.iter().map(|e| e.to_line()))
        .collect()
}

/// Writes each platform's stream to `dir/<os>_<arch>.json`; returns the paths.
pub fn write_json_streams(
    dir: &Path,
    platforms: &[String],
    results: &Results,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut written = Vec::new();
    for p in platforms {
        let path = dir.join(json_file_name(p));
        let text = json_stream(results.values().filter(|r| r.platform == *p));
        std::fs::write(&path, text)
            .with_context(|| format!("failed to write {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// 1 when any package failed, failed to build, hung or could not run; else 0.
pub fn exit_code(results: &Results) -> u8 {
    u8::from(results.values().any(|r| r.verdict.is_bad()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use archfarm_proto::v1::ExecutionResult;

    fn result(
        pkg: &str,
        platform: &str,
        verdict: Verdict,
        emulated: bool,
    ) -> ((String, String), PackageResult) {
        let mut r = PackageResult::without_run(pkg, platform, verdict, String::new());
        r.emulated = emulated;
        ((pkg.to_string(), platform.to_string()), r)
    }

    #[test]
    fn the_matrix_marks_emulated_cells() {
        let platforms = vec!["linux/amd64".to_string(), "linux/s390x".to_string()];
        let results: Results = [
            result("p/fail", "linux/amd64", Verdict::Fail, false),
            result("p/fail", "linux/s390x", Verdict::Fail, true),
            result("p/pass", "linux/amd64", Verdict::Cached, false),
            result("p/pass", "linux/s390x", Verdict::Hang, true),
        ]
        .into_iter()
        .collect();
        let m = matrix(&platforms, &results);
        assert!(m.contains("fail*"), "{m}");
        assert!(m.contains("hang*"), "{m}");
        assert!(m.contains("cached "), "{m}");
        assert!(
            m.ends_with("* emulated: ran under qemu-user on an emulated agent"),
            "{m}"
        );
        assert_eq!(verdict_counts(&results), "1 cached, 2 fail, 1 hang");
        assert_eq!(exit_code(&results), 1);
        let good: Results = [result("p", "linux/amd64", Verdict::Flaky, false)]
            .into_iter()
            .collect();
        assert_eq!(exit_code(&good), 0);
        assert!(!matrix(&platforms, &good).contains("emulated"));
    }

    #[test]
    fn makespans_take_the_longest_shard() {
        let action = |p: &str, predicted: u64, took: Option<u64>| ActionStatus {
            platform: p.into(),
            predicted_ms: predicted,
            result: took.map(|d| ExecutionResult {
                duration_ms: d,
                ..Default::default()
            }),
            ..Default::default()
        };
        let actions = vec![
            action("linux/arm64", 60_000, Some(58_000)),
            action("linux/arm64", 62_000, Some(70_000)),
            action("linux/amd64", 5_000, None),
        ];
        let platforms = vec![
            "linux/amd64".into(),
            "linux/arm64".into(),
            "linux/s390x".into(),
        ];
        let m = makespans(&platforms, &actions);
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[1].shards, m[1].predicted_ms, m[1].actual_ms),
            (2, 62_000, 70_000)
        );
        assert_eq!(
            makespan_line(&m[1]),
            "linux/arm64: 2 shards, predicted makespan 1m 2s, actual 1m 10s"
        );
        assert_eq!(m[0].actual_ms, 0);
    }

    #[test]
    fn streams_are_written_per_platform() {
        let platforms = vec!["linux/amd64".to_string(), "linux/arm/v7".to_string()];
        let results: Results = [
            result("a", "linux/amd64", Verdict::Infra, false),
            result("b", "linux/amd64", Verdict::Infra, false),
        ]
        .into_iter()
        .collect();
        let dir = tempfile::tempdir().unwrap();
        let paths = write_json_streams(dir.path(), &platforms, &results).unwrap();
        assert_eq!(paths[1].file_name().unwrap(), "linux_arm_v7.json");
        let text = std::fs::read_to_string(&paths[0]).unwrap();
        let packages: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["Package"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(packages.first().unwrap(), "a");
        assert_eq!(packages.last().unwrap(), "b");
        assert_eq!(std::fs::read_to_string(&paths[1]).unwrap(), "");
    }
}
