//! JUnit XML per platform in the layout TestGrid and gotestsum use: `<testsuites>` with one
//! `<testsuite name="<import path>">` per package and one `<testcase classname="<import path>"
//! name="<TestName>">` per test (subtests included), `<failure message="Failed">` holding the
//! test's output, `<skipped>` for skips. A flaky test is a pass whose system-out keeps the
//! first failure; a package that failed without a failed test gets a `TestMain` failure, and
//! one that could not run (hang, infra) an errored testcase that says why.
use super::events::TestOutcome;
use super::verdict::{PackageResult, Verdict};
use anyhow::Context;
use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use std::path::Path;
use std::time::Duration;

/// The file name for a platform: `junit_linux_arm64.xml`.
pub fn junit_file_name(platform: &str) -> String {
    format!("junit_{}.xml", platform.replace('/', "_"))
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()
}

fn failure(message: &str, kind: NonSuccessKind, text: &str) -> TestCaseStatus {
    let mut status = TestCaseStatus::non_success(kind);
    status.set_message(message);
    if !text.is_empty() {
        status.set_description(text);
    }
    status
}

/// The testsuite of one package.
pub fn package_suite(r: &PackageResult, go_version: &str) -> TestSuite {
    let mut suite = TestSuite::new(r.import_path.as_str());
    suite.set_time(Duration::from_millis(r.duration_ms));
    suite.add_property(("go.version", go_version));
    suite.add_property(("platform", r.platform.as_str()));
    if r.emulated {
        suite.add_property(("emulated", "true"));
    }
    for t in &r.tests {
        let status = match t.outcome {
            TestOutcome::Pass => TestCaseStatus::success(),
            TestOutcome::Skip => {
                let mut s = TestCaseStatus::skipped();
                s.set_message("Skipped");
                if !t.output.is_empty() {
                    s.set_description(t.output.as_str());
                }
                s
            }
            TestOutcome::Fail => failure("Failed", NonSuccessKind::Failure, &t.output),
            // Cut short by a hang or the farm: not the test's verdict.
            TestOutcome::Unfinished if matches!(r.verdict, Verdict::Hang | Verdict::Infra) => {
                failure(
                    &format!("did not finish: {}", r.verdict.word()),
                    NonSuccessKind::Error,
                    &t.output,
                )
            }
            TestOutcome::Unfinished => failure(
                "Failed: the test did not finish",
                NonSuccessKind::Failure,
                &t.output,
            ),
        };
        let mut case = TestCase::new(t.name.as_str(), status);
        case.set_classname(r.import_path.as_str());
        case.set_time(seconds(t.elapsed_s));
        if let Some(first) = t.first_failure.as_deref().filter(|_| t.flaky) {
            case.set_system_out(format!(
                "flaky: failed at first, passed on a rerun\n{first}"
            ));
        } else if let Some(first) = &t.first_failure {
            case.set_system_out(format!("first failure:\n{first}"));
        }
        suite.add_test_case(case);
    }
    let package_level = match r.verdict {
        Verdict::Hang | Verdict::Infra => Some((
            format!("[{}]", r.verdict.word()),
            failure(
                &format!(
                    "{}: {}",
                    r.verdict.word(),
                    r.detail.lines().next().unwrap_or("")
                ),
                NonSuccessKind::Error,
                &format!("{}\n{}", r.detail, r.output),
            ),
        )),
        Verdict::BuildFailed => Some((
            "TestMain".to_string(),
            failure("Build failed", NonSuccessKind::Failure, &r.detail),
        )),
        Verdict::Fail
            if !r
                .tests
                .iter()
                .any(|t| matches!(t.outcome, TestOutcome::Fail | TestOutcome::Unfinished)) =>
        {
            Some((
                "TestMain".to_string(),
                failure(
                    "Failed",
                    NonSuccessKind::Failure,
                    &format!("{}{}", r.output, r.detail),
                ),
            ))
        }
        _ => None,
    };
    if let Some((name, status)) = package_level {
        let mut case = TestCase::new(name, status);
        case.set_classname(r.import_path.as_str());
        case.set_time(Duration::from_millis(r.duration_ms));
        suite.add_test_case(case);
    }
    suite
}

/// The report of one platform's packages, in the given order.
pub fn platform_report<'a>(
    results: impl IntoIterator<Item = &'a PackageResult>,
    go_version: &str,
) -> Report {
    let mut report = Report::unnamed();
    let mut total = Duration::ZERO;
    for r in results {
        total += Duration::from_millis(r.duration_ms);
        report.add_test_suite(package_suite(r, go_version));
    }
    report.set_time(total);
    report
}

/// Writes `report` to `dir/junit_<os>_<arch>.xml`; returns the path.
pub fn write_report(
    dir: &Path,
    platform: &str,
    report: &Report,
) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let path = dir.join(junit_file_name(platform));
    let text = report
        .to_string()
        .with_context(|| format!("failed to encode the JUnit report of {platform}"))?;
    std::fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::super::events::TestRecord;
    use super::*;

    fn test(name: &str, outcome: TestOutcome, output: &str) -> TestRecord {
        TestRecord {
            name: name.into(),
            outcome,
            elapsed_s: 0.25,
            output: output.into(),
            flaky: false,
            first_failure: None,
        }
    }

    fn result(path: &str, verdict: Verdict, tests: Vec<TestRecord>) -> PackageResult {
        let mut r = PackageResult::without_run(path, "linux/arm64", verdict, String::new());
        r.tests = tests;
        r.duration_ms = 1500;
        r
    }

    /// Reads the XML back the way TestGrid does: elements and attributes, nothing else.
    #[derive(Debug, PartialEq)]
    struct Case {
        suite: String,
        classname: String,
        name: String,
        failure: Option<(String, String)>,
        error: Option<String>,
        skipped: bool,
        system_out: Option<String>,
    }

    fn read_back(xml: &str) -> (roxmltree::Document<'_>, Vec<Case>) {
        let doc = roxmltree::Document::parse(xml).unwrap();
        let mut cases = Vec::new();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "testsuites");
        for suite in root.children().filter(|n| n.has_tag_name("testsuite")) {
            for case in suite.children().filter(|n| n.has_tag_name("testcase")) {
                let child = |tag: &str| case.children().find(|n| n.has_tag_name(tag));
                cases.push(Case {
                    suite: suite.attribute("name").unwrap().to_string(),
                    classname: case.attribute("classname").unwrap().to_string(),
                    name: case.attribute("name").unwrap().to_string(),
                    failure: child("failure").map(|f| {
                        (
                            f.attribute("message").unwrap().to_string(),
                            f.text().unwrap_or("").to_string(),
                        )
                    }),
                    error: child("error").map(|e| e.attribute("message").unwrap().to_string()),
                    skipped: child("skipped").is_some(),
                    system_out: child("system-out")
                        .and_then(|n| n.text())
                        .map(str::to_string),
                });
            }
        }
        (doc, cases)
    }

    #[test]
    fn reports_parse_back_into_suites_cases_and_failures() {
        let mut flaky = test("TestFlaky", TestOutcome::Pass, "=== RUN TestFlaky\n");
        flaky.flaky = true;
        flaky.first_failure = Some("flaky_test.go:9: first run\n".into());
        let results = vec![
            result(
                "example.com/fixtures/fail",
                Verdict::Fail,
                vec![
                    test("TestAnswerIsRight", TestOutcome::Pass, ""),
                    test(
                        "TestAlwaysFails",
                        TestOutcome::Fail,
                        "fail_test.go:12: wants 43 <&>\n",
                    ),
                    test("TestAlwaysFails/sub", TestOutcome::Skip, "skipping\n"),
                ],
            ),
            result("example.com/fixtures/flaky", Verdict::Flaky, vec![flaky]),
            {
                let mut r = result(
                    "example.com/slow",
                    Verdict::Hang,
                    vec![test(
                        "TestSlow",
                        TestOutcome::Unfinished,
                        "=== RUN TestSlow\n",
                    )],
                );
                r.detail = "the watchdog killed the test binary after 3m 30s".into();
                r
            },
        ];
        let report = platform_report(&results, "go version go1.19.8 linux/amd64");
        let dir = tempfile::tempdir().unwrap();
        let path = write_report(dir.path(), "linux/arm64", &report).unwrap();
        assert_eq!(path.file_name().unwrap(), "junit_linux_arm64.xml");
        let xml = std::fs::read_to_string(&path).unwrap();
        let (doc, cases) = read_back(&xml);

        let root = doc.root_element();
        assert_eq!(root.attribute("tests"), Some("6"));
        assert_eq!(root.attribute("failures"), Some("1"));
        assert_eq!(root.attribute("errors"), Some("2"));
        assert_eq!(root.attribute("skipped"), Some("1"));
        let suites: Vec<_> = root
            .children()
            .filter(|n| n.has_tag_name("testsuite"))
            .collect();
        assert_eq!(suites.len(), 3);
        assert_eq!(
            suites[0].attribute("name"),
            Some("example.com/fixtures/fail")
        );
        assert_eq!(suites[0].attribute("tests"), Some("3"));
        assert_eq!(suites[0].attribute("failures"), Some("1"));
        assert_eq!(suites[0].attribute("time"), Some("1.500"));

        assert!(cases.iter().all(|c| c.classname == c.suite));
        let by_name = |n: &str| cases.iter().find(|c| c.name == n).unwrap();
        let failed = by_name("TestAlwaysFails");
        let (message, text) = failed.failure.clone().unwrap();
        assert_eq!(message, "Failed");
        assert_eq!(text, "fail_test.go:12: wants 43 <&>\n");
        assert!(by_name("TestAnswerIsRight").failure.is_none());
        assert!(by_name("TestAlwaysFails/sub").skipped);
        let f = by_name("TestFlaky");
        assert!(f.failure.is_none() && f.error.is_none());
        assert!(f.system_out.as_deref().unwrap().contains("first run"));
        let cut = by_name("TestSlow");
        assert!(cut.failure.is_none(), "a hang is not the test's failure");
        assert_eq!(cut.error.as_deref(), Some("did not finish: hang"));
        let hang = by_name("[hang]");
        assert_eq!(hang.suite, "example.com/slow");
        assert!(hang.error.as_deref().unwrap().contains("watchdog"));
    }

    #[test]
    fn packages_that_fail_without_a_failed_test_get_test_main() {
        let mut r = result(
            "p",
            Verdict::Fail,
            vec![test("TestA", TestOutcome::Pass, "")],
        );
        r.output = "panic: in init\n".into();
        let build = PackageResult::without_run(
            "q",
            "linux/amd64",
            Verdict::BuildFailed,
            "q.go:3: undefined: x".into(),
        );
        let report = platform_report([&r, &build], "go1.19");
        let xml = report.to_string().unwrap();
        let (_, cases) = read_back(&xml);
        let mains: Vec<&Case> = cases.iter().filter(|c| c.name == "TestMain").collect();
        assert_eq!(mains.len(), 2);
        assert!(mains[0]
            .failure
            .as_ref()
            .unwrap()
            .1
            .contains("panic: in init"));
        assert_eq!(mains[1].failure.as_ref().unwrap().0, "Build failed");
        assert!(mains[1]
            .failure
            .as_ref()
            .unwrap()
            .1
            .contains("undefined: x"));
    }
}
