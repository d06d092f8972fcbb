//! A ginkgo run's report ([`GinkgoReport`]) and its verdicts: each shard's step output matched against the specs the shard was
//! meant to run (every one exactly once, nothing else), the shard table, the failures as
//! text, JUnit XML (`junit_<os>_<arch>.xml`: a testsuite per shard, a testcase per spec, as
//! ginkgo v1's own JUnit reporter names them: classname the suite description, name the
//! spec's full text) and the exit code.
use super::output::{Outcome, Spec, SuiteOutput, Summary};
use crate::farm::display::format_ms;
use archfarm_proto::v1::StepResult;
use comfy_table::{presets, Cell, ContentArrangement, Table};
use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use std::collections::BTreeMap;
use std::time::Duration;

/// What a ginkgo run found. `shards` is empty when no spec was selected (nothing ran).
#[derive(Debug, Clone)]
pub struct GinkgoReport {
    /// The suite's package.
    pub import_path: String,
    /// The suite's description (`Running Suite: ...`); empty when nothing was selected.
    pub description: String,
    /// The platform it ran on.
    pub platform: String,
    /// Every shard's verdict, in shard order.
    pub shards: Vec<ShardResult>,
}

impl GinkgoReport {
    /// Whether no spec was selected, so nothing ran.
    pub fn nothing_selected(&self) -> bool {
        self.shards.is_empty()
    }

    /// 0 when every shard passed (or nothing was selected), else 1.
    pub fn exit_code(&self) -> u8 {
        if self.nothing_selected() {
            0
        } else {
            exit_code(&self.shards)
        }
    }

    /// Writes `dir/junit_<os>_<arch>.xml`; returns its path.
    pub fn write_junit(&self, dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
        let junit = junit_report(
            &self.description,
            &self.import_path,
            &self.platform,
            &self.shards,
        );
        crate::gotest::junit::write_report(dir, &self.platform, &junit)
    }
}

/// What became of one spec of a shard.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecResult {
    /// The spec.
    pub spec: Spec,
    /// Its outcome; None when the suite binary never announced it.
    pub outcome: Option<Outcome>,
    /// Seconds, when ginkgo printed them.
    pub seconds: Option<f64>,
    /// What it printed.
    pub output: String,
    /// Its verdict block, or why it did not run.
    pub detail: String,
}

impl SpecResult {
    fn not_run(spec: &Spec, why: &str) -> Self {
        Self {
            spec: spec.clone(),
            outcome: None,
            seconds: None,
            output: String::new(),
            detail: why.to_string(),
        }
    }
}

/// One shard's verdict.
#[derive(Debug, Clone, Default)]
pub struct ShardResult {
    /// 1-based number.
    pub number: usize,
    /// Shards in the job.
    pub of: usize,
    /// Its specs, in location order.
    pub specs: Vec<SpecResult>,
    /// Agent that ran it; empty when none did.
    pub agent_id: String,
    /// Whether it ran under emulation.
    pub emulated: bool,
    /// Wall-clock time of the suite binary.
    pub duration_ms: u64,
    /// Exit code of the suite binary, when it ran.
    pub exit_code: Option<i32>,
    /// What went wrong besides failed specs: not run, a hang, a setup failure, a selection
    /// that did not match the shard.
    pub problems: Vec<String>,
    /// The suite's closing summary.
    pub summary: Option<Summary>,
}

/// Counts of spec outcomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub not_run: usize,
}

impl Counts {
    fn add(&mut self, s: &SpecResult) {
        match s.outcome {
            Some(Outcome::Passed) => self.passed += 1,
            Some(Outcome::Skipped) => self.skipped += 1,
            Some(_) => self.failed += 1,
            None => self.not_run += 1,
        }
    }
}

impl ShardResult {
    /// Outcome counts of its specs.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.specs {
            c.add(s);
        }
        c
    }

    /// Whether every spec passed or was skipped and nothing else went wrong.
    pub fn passed(&self) -> bool {
        let c = self.counts();
        self.problems.is_empty() && c.failed == 0 && c.not_run == 0
    }

    /// `shard 2/3`.
    pub fn name(&self) -> String {
        format!("shard {}/{}", self.number, self.of)
    }
}

/// A shard whose step has no result: every spec not run, for `why`.
pub fn not_run_shard(number: usize, of: usize, specs: &[Spec], why: &str) -> ShardResult {
    ShardResult {
        number,
        of,
        specs: specs.iter().map(|s| SpecResult::not_run(s, why)).collect(),
        problems: vec![why.to_string()],
        ..ShardResult::default()
    }
}

/// Matches a shard's parsed output against its specs.
pub fn shard_result(
    number: usize,
    of: usize,
    expected: &[Spec],
    step: &StepResult,
    parsed: SuiteOutput,
) -> ShardResult {
    let mut r = ShardResult {
        number,
        of,
        agent_id: step.agent_id.clone(),
        emulated: step.emulated,
        duration_ms: step.duration_ms,
        exit_code: (step.exit_code >= 0).then_some(step.exit_code),
        summary: parsed.summary,
        ..ShardResult::default()
    };
    let mut runs: Vec<Option<super::output::SpecRun>> =
        parsed.specs.into_iter().map(Some).collect();
    let why_missing = if step.timed_out {
        format!(
            "the watchdog stopped the suite binary before it got here (a hang): {}",
            step.message
        )
    } else if parsed.setup_failure.is_some() {
        "not run: the suite's setup failed".to_string()
    } else if step.exit_code < 0 {
        format!("the suite binary did not start: {}", step.message)
    } else {
        format!(
            "the suite binary never announced it (exit code {})",
            step.exit_code
        )
    };
    for spec in expected {
        let found = runs
            .iter_mut()
            .find(|run| run.as_ref().is_some_and(|run| run.spec == *spec))
            .and_then(Option::take);
        r.specs.push(match found {
            Some(run) => {
                let mut detail = run.detail;
                if run.outcome == Outcome::Unfinished {
                    detail = format!("did not finish: {why_missing}\n{detail}");
                }
                SpecResult {
                    spec: run.spec,
                    outcome: Some(run.outcome),
                    seconds: run.seconds,
                    output: run.output,
                    detail,
                }
            }
            None => SpecResult::not_run(spec, &why_missing),
        });
    }
    for extra in runs.into_iter().flatten() {
        r.problems.push(format!(
            "the suite binary ran {:?} ({}), which is not in this shard: the focus did not \
             select exactly the shard's specs",
            extra.spec.text, extra.spec.location
        ));
    }
    if step.timed_out {
        r.problems.push(format!(
            "hang: the watchdog killed the suite binary after {}",
            format_ms(step.duration_ms)
        ));
    }
    if let Some(setup) = parsed.setup_failure {
        r.problems
            .push(format!("the suite's setup failed:\n{setup}"));
    }
    let c = r.counts();
    if !step.timed_out && step.exit_code != 0 && c.failed == 0 && r.problems.is_empty() {
        r.problems.push(format!(
            "the suite binary exited with code {} without a failed spec{}",
            step.exit_code,
            if step.message.is_empty() {
                String::new()
            } else {
                format!(": {}", step.message)
            }
        ));
    }
    if step.exit_code == 0 && c.failed > 0 {
        r.problems
            .push("the suite binary exited 0 although a spec failed".to_string());
    }
    r
}

/// The files a shard covers with their spec counts: `node_test.go (3)`.
fn files_cell(s: &ShardResult) -> String {
    let mut files: BTreeMap<String, usize> = BTreeMap::new();
    for spec in &s.specs {
        let f = &spec.spec.location.file;
        let base = f.rsplit('/').next().unwrap_or(f).to_string();
        *files.entry(base).or_default() += 1;
    }
    files
        .iter()
        .map(|(f, n)| format!("{f} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The table of shards: their files, agent, and spec counts.
pub fn table(shards: &[ShardResult]) -> String {
    let mut t = Table::new();
    t.load_preset(presets::UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(vec![
            "shard", "specs in", "agent", "specs", "passed", "failed", "skipped", "not run",
            "time", "verdict",
        ]);
    for s in shards {
        let c = s.counts();
        let agent = match (s.agent_id.as_str(), s.emulated) {
            ("", _) => "-".to_string(),
            (a, true) => format!("{a} (emulated)"),
            (a, false) => a.to_string(),
        };
        t.add_row(vec![
            Cell::new(s.name()),
            Cell::new(files_cell(s)),
            Cell::new(agent),
            Cell::new(s.specs.len()),
            Cell::new(c.passed),
            Cell::new(c.failed),
            Cell::new(c.skipped),
            Cell::new(c.not_run),
            Cell::new(if s.agent_id.is_empty() {
                "-".to_string()
            } else {
                format_ms(s.duration_ms)
            }),
            Cell::new(if s.passed() { "pass" } else { "FAIL" }),
        ]);
    }
    t.to_string()
}

/// `6 specs in 2 shards: 5 passed, 1 failed, 0 skipped, 0 not run`.
pub fn totals_line(shards: &[ShardResult]) -> String {
    let mut c = Counts::default();
    let mut specs = 0;
    for s in shards {
        specs += s.specs.len();
        for r in &s.specs {
            c.add(r);
        }
    }
    format!(
        "{specs} spec{} in {} shard{}: {} passed, {} failed, {} skipped, {} not run",
        if specs == 1 { "" } else { "s" },
        shards.len(),
        if shards.len() == 1 { "" } else { "s" },
        c.passed,
        c.failed,
        c.skipped,
        c.not_run
    )
}

/// The failures as text, like ginkgo's own summary: each failed or unrun spec with its
/// block, then each shard problem.
pub fn problems_text(shards: &[ShardResult]) -> String {
    let mut out = String::new();
    for s in shards {
        for r in &s.specs {
            let word = match r.outcome {
                Some(o) if o.is_failure() => "FAIL",
                None => "NOT RUN",
                _ => continue,
            };
            out.push_str(&format!(
                "--- {word}: {} ({}) [{}]\n",
                r.spec.text,
                r.spec.location.short(),
                s.name()
            ));
            out.push_str(&r.output);
            out.push_str(&r.detail);
            if !r.detail.ends_with('\n') {
                out.push('\n');
            }
        }
        for p in &s.problems {
            out.push_str(&format!("--- {}: {p}\n", s.name()));
        }
    }
    out
}

/// The exit code: 0 when every shard passed.
pub fn exit_code(shards: &[ShardResult]) -> u8 {
    u8::from(!shards.iter().all(ShardResult::passed))
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()
}

/// The failure's own message from a verdict block: the first line after the code location
/// block (which ends at the first blank line), as ginkgo's JUnit reporter puts it first.
pub fn failure_message(detail: &str) -> Option<&str> {
    detail
        .lines()
        .skip_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .find(|l| !l.is_empty())
}

fn non_success(kind: NonSuccessKind, message: &str, ty: &str, text: &str) -> TestCaseStatus {
    let mut st = TestCaseStatus::non_success(kind);
    st.set_message(message);
    st.set_type(ty);
    if !text.is_empty() {
        st.set_description(text);
    }
    st
}

/// The JUnit report of one platform's shards.
pub fn junit_report(
    description: &str,
    import_path: &str,
    platform: &str,
    shards: &[ShardResult],
) -> Report {
    let mut report = Report::new(description);
    let mut total = Duration::ZERO;
    for s in shards {
        let mut suite = TestSuite::new(format!("{description} ({})", s.name()));
        suite.set_time(Duration::from_millis(s.duration_ms));
        total += Duration::from_millis(s.duration_ms);
        suite.add_property(("package", import_path));
        suite.add_property(("platform", platform));
        suite.add_property(("shard", s.name().as_str()));
        if !s.agent_id.is_empty() {
            suite.add_property(("agent", s.agent_id.as_str()));
        }
        if s.emulated {
            suite.add_property(("emulated", "true"));
        }
        for r in &s.specs {
            let status = match r.outcome {
                Some(Outcome::Passed) => TestCaseStatus::success(),
                Some(Outcome::Skipped) => {
                    let mut st = TestCaseStatus::skipped();
                    st.set_message("Skipped");
                    if !r.detail.is_empty() {
                        st.set_description(r.detail.as_str());
                    }
                    st
                }
                Some(o @ (Outcome::Failed | Outcome::Panicked | Outcome::TimedOut)) => {
                    let ty = match o {
                        Outcome::Panicked => "Panic",
                        Outcome::TimedOut => "Timeout",
                        _ => "Failure",
                    };
                    let message = failure_message(&r.detail).unwrap_or(ty);
                    non_success(NonSuccessKind::Failure, message, ty, &r.detail)
                }
                Some(Outcome::Unfinished) => non_success(
                    NonSuccessKind::Error,
                    "did not finish",
                    "Unfinished",
                    &r.detail,
                ),
                None => non_success(
                    NonSuccessKind::Error,
                    &format!("did not run: {}", r.detail.lines().next().unwrap_or("")),
                    "NotRun",
                    &r.detail,
                ),
            };
            let mut case = TestCase::new(r.spec.text.as_str(), status);
            case.set_classname(description);
            case.set_time(seconds(r.seconds.unwrap_or(0.0)));
            case.add_property(("location", r.spec.location.to_string().as_str()));
            if !r.output.is_empty() {
                case.set_system_out(r.output.as_str());
            }
            suite.add_test_case(case);
        }
        if !s.problems.is_empty() {
            let text = s.problems.join("\n");
            let first = s.problems[0].lines().next().unwrap_or("");
            let mut case = TestCase::new(
                format!("[{}]", s.name()),
                non_success(NonSuccessKind::Error, first, "Shard", &text),
            );
            case.set_classname(description);
            suite.add_test_case(case);
        }
        report.add_test_suite(suite);
    }
    report.set_time(total);
    report
}

#[cfg(test)]
mod tests {
    use super::super::output::{self, parse};
    use super::*;

    fn step(exit_code: i32) -> StepResult {
        StepResult {
            name: "shard-1-of-1".into(),
            exit_code,
            duration_ms: 1200,
            agent_id: "a1".into(),
            ..StepResult::default()
        }
    }

    fn listed() -> Vec<Spec> {
        parse(output::tests::E2E_DRY_RUN)
            .specs
            .into_iter()
            .map(|r| r.spec)
            .collect()
    }

    #[test]
    fn a_failed_spec_fails_its_shard_and_shows_in_junit() {
        let specs = listed();
        let r = shard_result(1, 1, &specs, &step(1), parse(output::tests::E2E_FAIL_RUN));
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert_eq!(
            r.counts(),
            Counts {
                passed: 5,
                failed: 1,
                skipped: 0,
                not_run: 0
            }
        );
        assert!(!r.passed());
        assert_eq!(exit_code(std::slice::from_ref(&r)), 1);
        let text = problems_text(std::slice::from_ref(&r));
        assert!(
            text.starts_with("--- FAIL: [sig-node] Pods when a pod is deleted"),
            "{text}"
        );
        assert!(totals_line(std::slice::from_ref(&r)).contains("5 passed, 1 failed"));

        let xml = junit_report(
            "E2E Fixture Suite",
            "example.com/fixtures/e2e",
            "linux/amd64",
            &[r],
        )
        .to_string()
        .unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "testsuites");
        assert_eq!(root.attribute("tests"), Some("6"));
        assert_eq!(root.attribute("failures"), Some("1"));
        let suite = root
            .children()
            .find(|n| n.has_tag_name("testsuite"))
            .unwrap();
        assert_eq!(
            suite.attribute("name"),
            Some("E2E Fixture Suite (shard 1/1)")
        );
        let failed: Vec<_> = suite
            .children()
            .filter(|c| c.has_tag_name("testcase"))
            .filter(|c| c.children().any(|f| f.has_tag_name("failure")))
            .collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].attribute("classname"), Some("E2E Fixture Suite"));
        let f = failed[0]
            .children()
            .find(|f| f.has_tag_name("failure"))
            .unwrap();
        assert_eq!(
            f.attribute("message"),
            Some("archfarm fixture failure: E2E_FAIL=1 asks this spec to fail")
        );
        assert_eq!(f.attribute("type"), Some("Failure"));
        assert!(f
            .text()
            .unwrap()
            .contains("E2E_FAIL=1 asks this spec to fail"));
    }

    #[test]
    fn missing_specs_extra_specs_and_hangs_are_problems() {
        let specs = listed();
        // The dry run's output as a run of only the first three specs: the rest never ran.
        let r = shard_result(
            1,
            2,
            &specs[..3],
            &step(0),
            parse(output::tests::E2E_DRY_RUN),
        );
        assert_eq!(r.counts().passed, 3);
        assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
        assert!(r.problems[0].contains("not in this shard"));
        assert!(!r.passed());

        let mut hung = step(137);
        hung.timed_out = true;
        hung.message = "no end after 30s".into();
        let cut = "Running Suite: E2E Fixture Suite\nWill run 2 of 6 specs\n\n[sig-node] Node \n  should carry the node-e2e label\n  /gopath/src/example.com/fixtures/e2e/node_test.go:15\n";
        let r = shard_result(2, 2, &specs[..2], &hung, parse(cut));
        assert_eq!(r.specs[0].outcome, Some(Outcome::Unfinished));
        assert!(
            r.specs[0].detail.contains("a hang"),
            "{}",
            r.specs[0].detail
        );
        assert_eq!(r.specs[1].outcome, None);
        assert!(r.problems.iter().any(|p| p.starts_with("hang")));

        let never = not_run_shard(1, 1, &specs, "unschedulable: no agent has label node-e2e");
        assert_eq!(never.counts().not_run, 6);
        let xml = junit_report("S", "p", "linux/amd64", &[never])
            .to_string()
            .unwrap();
        assert!(xml.contains("did not run: unschedulable"), "{xml}");
    }

    #[test]
    fn a_passing_shard_passes() {
        let specs = listed();
        let r = shard_result(1, 1, &specs, &step(0), parse(output::tests::E2E_DRY_RUN));
        assert!(r.passed(), "{:?}", r.problems);
        assert_eq!(exit_code(std::slice::from_ref(&r)), 0);
        let t = table(&[r]);
        assert!(t.contains("node_test.go (3), pods_test.go (3)"), "{t}");
        assert!(t.contains("pass"));
    }
}
