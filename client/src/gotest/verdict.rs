//! A package's verdict on one platform, from its step result and its test events: pass, fail,
//! skip, cached, flaky (after a rerun), hang (the watchdog fired: an infra problem, never a
//! pass), infra (the farm could not run it), build failed; and how reruns of failed tests
//! change it.
use super::events::{complete_stream, fold_events, PackageEvents, RunEnd, TestEvent, TestOutcome};
use archfarm_proto::v1::StepResult;
use std::fmt;

/// What became of one package on one platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Every test passed.
    Pass,
    /// A stored passing result was reused: nothing was built or run.
    Cached,
    /// No test ran (none matched, or all skipped).
    Skip,
    /// Failed at first, and every failed test passed on a rerun.
    Flaky,
    /// A test failed, or the binary exited non-zero.
    Fail,
    /// `go test -c` failed or `go list` reported the package broken.
    BuildFailed,
    /// The watchdog killed the binary: a hang, an infra problem rather than a verdict.
    Hang,
    /// The farm could not run it (infra failure, unschedulable, cancelled, never started).
    Infra,
}

impl Verdict {
    /// The matrix word.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Cached => "cached",
            Verdict::Skip => "skip",
            Verdict::Flaky => "flaky",
            Verdict::Fail => "fail",
            Verdict::BuildFailed => "build failed",
            Verdict::Hang => "hang",
            Verdict::Infra => "infra",
        }
    }

    /// Whether it makes `go-test` exit non-zero.
    pub fn is_bad(self) -> bool {
        matches!(
            self,
            Verdict::Fail | Verdict::BuildFailed | Verdict::Hang | Verdict::Infra
        )
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.word())
    }
}

/// One package on one platform, everything the reports need.
#[derive(Debug, Clone)]
pub struct PackageResult {
    /// Import path.
    pub import_path: String,
    /// Platform, e.g. `linux/arm64`.
    pub platform: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Whether any run of it was on an emulated agent (for a cached result: the stored run).
    pub emulated: bool,
    /// Its tests, after reruns.
    pub tests: Vec<TestRecord>,
    /// Output not attached to a test.
    pub output: String,
    /// Why, for verdicts the tests do not explain (hang, infra, build failed).
    pub detail: String,
    /// Wall-clock milliseconds of the first run.
    pub duration_ms: u64,
    /// Whether the binary got as far as its own PASS/FAIL line in the first run (not after a
    /// crash): only then are the tests that did not fail known to have run.
    pub binary_finished: bool,
    /// Its `go test -json` events, every round.
    pub events: Vec<TestEvent>,
}

pub use super::events::TestRecord;

impl PackageResult {
    /// A package that never produced events: build failures, list errors, infra problems.
    pub fn without_run(
        import_path: &str,
        platform: &str,
        verdict: Verdict,
        detail: String,
    ) -> Self {
        let mut events = Vec::new();
        complete_stream(
            import_path,
            &mut events,
            RunEnd {
                exit_code: 1,
                duration_ms: 0,
                cached: false,
            },
            Some(&detail),
        );
        Self {
            import_path: import_path.to_string(),
            platform: platform.to_string(),
            verdict,
            emulated: false,
            tests: Vec::new(),
            output: String::new(),
            detail,
            duration_ms: 0,
            binary_finished: false,
            events,
        }
    }

    /// From a step's result and its test2json events (not yet completed).
    pub fn from_step(
        import_path: &str,
        platform: &str,
        step: &StepResult,
        mut events: Vec<TestEvent>,
    ) -> Self {
        let folded = fold_events(&events);
        let (verdict, detail) = step_verdict(&folded, step);
        let binary_finished = folded.outcome.is_some();
        let note = match verdict {
            Verdict::Hang | Verdict::Infra => Some(format!("archfarm: {detail}")),
            _ => None,
        };
        complete_stream(
            import_path,
            &mut events,
            RunEnd {
                exit_code: if verdict.is_bad() && step.exit_code == 0 {
                    1
                } else {
                    step.exit_code
                },
                duration_ms: step.duration_ms,
                cached: step.cached,
            },
            note.as_deref(),
        );
        Self {
            import_path: import_path.to_string(),
            platform: platform.to_string(),
            verdict,
            emulated: step.emulated,
            tests: folded.tests,
            output: folded.output,
            detail,
            duration_ms: step.duration_ms,
            binary_finished,
            events,
        }
    }

    /// What a rerun should run: `Some(names)` of the failed top-level tests, `Some([])` for the
    /// whole package (it failed without a failed test to blame: a crash, TestMain), None when a
    /// rerun cannot help (not a test failure).
    pub fn rerun_selection(&self) -> Option<Vec<String>> {
        if self.verdict != Verdict::Fail {
            return None;
        }
        if !self.binary_finished {
            return Some(Vec::new());
        }
        let failed: Vec<String> = self
            .tests
            .iter()
            .filter(|t| t.is_top_level())
            .filter(|t| matches!(t.outcome, TestOutcome::Fail | TestOutcome::Unfinished))
            .map(|t| t.name.clone())
            .collect();
        Some(failed)
    }

    /// Folds in a rerun: tests that pass now are marked flaky (their first failure's output
    /// kept), tests that fail again keep failing; when nothing fails any more the package is
    /// flaky.
    pub fn apply_rerun(&mut self, step: &StepResult, mut events: Vec<TestEvent>) {
        self.emulated |= step.emulated;
        let folded = fold_events(&events);
        let (rerun_verdict, detail) = step_verdict(&folded, step);
        for t in folded.tests {
            match self.tests.iter_mut().find(|o| o.name == t.name) {
                Some(old) => {
                    let failed_before =
                        matches!(old.outcome, TestOutcome::Fail | TestOutcome::Unfinished);
                    if failed_before && old.first_failure.is_none() {
                        old.first_failure = Some(old.output.clone());
                    }
                    if failed_before && t.outcome == TestOutcome::Pass {
                        old.flaky = true;
                    }
                    old.outcome = t.outcome;
                    old.elapsed_s = t.elapsed_s;
                    old.output = t.output;
                }
                None => self.tests.push(t),
            }
        }
        let note = match rerun_verdict {
            Verdict::Hang | Verdict::Infra => Some(format!("archfarm: rerun: {detail}")),
            _ => None,
        };
        complete_stream(
            &self.import_path,
            &mut events,
            RunEnd {
                exit_code: if rerun_verdict.is_bad() && step.exit_code == 0 {
                    1
                } else {
                    step.exit_code
                },
                duration_ms: step.duration_ms,
                cached: false,
            },
            note.as_deref(),
        );
        self.events.extend(events);
        let still_failing = self
            .tests
            .iter()
            .any(|t| matches!(t.outcome, TestOutcome::Fail | TestOutcome::Unfinished));
        if !still_failing && matches!(rerun_verdict, Verdict::Pass | Verdict::Skip) {
            self.verdict = Verdict::Flaky;
        }
    }
}

/// A package's verdict from its folded events and its step's result, with the detail that
/// explains verdicts the tests do not.
pub fn step_verdict(events: &PackageEvents, step: &StepResult) -> (Verdict, String) {
    if step.timed_out {
        let msg = if step.message.is_empty() {
            format!(
                "the farm's watchdog killed the test binary after {}: a hang",
                crate::farm::display::format_ms(step.duration_ms)
            )
        } else {
            step.message.clone()
        };
        return (Verdict::Hang, msg);
    }
    if step.exit_code == -1 {
        let msg = if step.message.is_empty() {
            "the test binary never started".to_string()
        } else {
            format!("the test binary never started: {}", step.message)
        };
        return (Verdict::Infra, msg);
    }
    if step.cached {
        return (Verdict::Cached, String::new());
    }
    if step.exit_code != 0 || events.outcome == Some(TestOutcome::Fail) || events.any_failed() {
        let detail = if events.any_failed() {
            String::new()
        } else {
            format!("the test binary exited with code {}", step.exit_code)
        };
        return (Verdict::Fail, detail);
    }
    if events.nothing_ran() {
        return (Verdict::Skip, "no tests ran".to_string());
    }
    (Verdict::Pass, String::new())
}

#[cfg(test)]
mod tests {
    use super::super::events::parse_events;
    use super::*;

    fn step(exit_code: i32) -> StepResult {
        StepResult {
            name: "p".into(),
            exit_code,
            duration_ms: 100,
            ..Default::default()
        }
    }

    fn events(lines: &[(&str, Option<&str>)]) -> Vec<TestEvent> {
        let text: String = lines
            .iter()
            .map(|(action, test)| match test {
                Some(t) => {
                    format!("{{\"Action\":\"{action}\",\"Package\":\"p\",\"Test\":\"{t}\"}}\n")
                }
                None => format!("{{\"Action\":\"{action}\",\"Package\":\"p\"}}\n"),
            })
            .collect();
        parse_events("p", &text)
    }

    #[test]
    fn verdicts_follow_tests_and_exit_codes() {
        let passing = events(&[
            ("run", Some("TestA")),
            ("pass", Some("TestA")),
            ("pass", None),
        ]);
        let v = |e: &[TestEvent], s: &StepResult| {
            PackageResult::from_step("p", "linux/amd64", s, e.to_vec()).verdict
        };
        assert_eq!(v(&passing, &step(0)), Verdict::Pass);
        assert_eq!(
            v(&passing, &step(1)),
            Verdict::Fail,
            "TestMain may fail after the tests"
        );
        let failing = events(&[
            ("run", Some("TestA")),
            ("fail", Some("TestA")),
            ("fail", None),
        ]);
        assert_eq!(v(&failing, &step(1)), Verdict::Fail);
        let none = events(&[("pass", None)]);
        assert_eq!(v(&none, &step(0)), Verdict::Skip);
        let mut hung = step(137);
        hung.timed_out = true;
        let r = PackageResult::from_step("p", "linux/s390x", &hung, passing.clone());
        assert_eq!(r.verdict, Verdict::Hang);
        assert!(r.detail.contains("watchdog"), "{}", r.detail);
        assert_eq!(
            r.events.last().unwrap().action,
            "fail",
            "a hang is never a pass"
        );
        let mut cached = step(0);
        cached.cached = true;
        cached.emulated = true;
        let r = PackageResult::from_step("p", "linux/arm64", &cached, passing.clone());
        assert_eq!((r.verdict, r.emulated), (Verdict::Cached, true));
        assert_eq!(v(&[], &step(-1)), Verdict::Infra);
        assert!(Verdict::Hang.is_bad() && Verdict::Infra.is_bad() && !Verdict::Flaky.is_bad());
    }

    #[test]
    fn a_test_that_passes_on_rerun_is_flaky() {
        let first = events(&[
            ("run", Some("TestA")),
            ("fail", Some("TestA")),
            ("run", Some("TestB")),
            ("pass", Some("TestB")),
            ("fail", None),
        ]);
        let mut r = PackageResult::from_step("p", "linux/amd64", &step(1), first);
        r.tests[0].output = "first failure\n".into();
        assert_eq!(r.rerun_selection(), Some(vec!["TestA".to_string()]));
        let rerun = events(&[
            ("run", Some("TestA")),
            ("pass", Some("TestA")),
            ("pass", None),
        ]);
        r.apply_rerun(&step(0), rerun);
        assert_eq!(r.verdict, Verdict::Flaky);
        assert!(r.tests[0].flaky);
        assert_eq!(r.tests[0].outcome, TestOutcome::Pass);
        assert_eq!(r.tests[0].first_failure.as_deref(), Some("first failure\n"));
        let finals: Vec<&str> = r
            .events
            .iter()
            .filter(|e| e.test.is_none() && matches!(e.action.as_str(), "pass" | "fail"))
            .map(|e| e.action.as_str())
            .collect();
        assert_eq!(finals, ["fail", "pass"], "both rounds are in the stream");
        assert_eq!(r.rerun_selection(), None);
    }

    #[test]
    fn a_test_that_fails_again_keeps_the_package_failed() {
        let first = events(&[
            ("run", Some("TestA")),
            ("fail", Some("TestA")),
            ("fail", None),
        ]);
        let mut r = PackageResult::from_step("p", "linux/amd64", &step(1), first.clone());
        r.apply_rerun(&step(1), first);
        assert_eq!(r.verdict, Verdict::Fail);
        assert!(!r.tests[0].flaky);
        // A crash without a failed test to blame reruns the whole package.
        let crash = events(&[("run", Some("TestA")), ("fail", Some("TestA"))]);
        let r = PackageResult::from_step("p", "linux/amd64", &step(2), crash);
        assert_eq!(r.verdict, Verdict::Fail);
        assert_eq!(r.rerun_selection(), Some(vec![]));
    }
}
