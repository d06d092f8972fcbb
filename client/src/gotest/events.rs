//! `go test -json` events: converting a test binary's raw `-test.v` output with `go tool
//! test2json`, folding the events into per-test outcomes, and completing a package's stream
//! the way `go test` would (the `ok`/`FAIL` line and the package's final event, which the
//! binary itself does not print).
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// One event of `go test -json` (test2json's TestEvent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestEvent {
    /// When, RFC 3339 (only with `test2json -t`).
    #[serde(rename = "Time", default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// run, pause, cont, pass, bench, fail, output, skip.
    #[serde(rename = "Action")]
    pub action: String,
    /// Import path.
    #[serde(rename = "Package", default, skip_serializing_if = "String::is_empty")]
    pub package: String,
    /// Test name (`TestA/sub` for subtests); absent for package-level events.
    #[serde(rename = "Test", default, skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    /// Seconds, on pass/fail/skip.
    #[serde(rename = "Elapsed", default, skip_serializing_if = "Option::is_none")]
    pub elapsed: Option<f64>,
    /// A line (or part) of output, on output events.
    #[serde(rename = "Output", default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl TestEvent {
    /// A package-level event.
    pub fn package(package: &str, action: &str) -> Self {
        Self {
            time: None,
            action: action.to_string(),
            package: package.to_string(),
            test: None,
            elapsed: None,
            output: None,
        }
    }

    /// A package-level output event.
    pub fn output(package: &str, text: String) -> Self {
        Self {
            output: Some(text),
            ..Self::package(package, "output")
        }
    }

    /// One line of the `go test -json` stream, with its newline.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Parses test2json's output: one JSON event per line; lines that are not events (test2json
/// does not print any, but a crashed converter might) are kept as package output.
pub fn parse_events(package: &str, text: &str) -> Vec<TestEvent> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|_| TestEvent::output(package, format!("{l}\n")))
        })
        .collect()
}

/// Runs `go tool test2json -p IMPORT_PATH` over a test binary's raw `-test.v` output.
pub async fn test2json(
    dir: &Path,
    import_path: &str,
    raw: &[u8],
) -> anyhow::Result<Vec<TestEvent>> {
    let mut child = tokio::process::Command::new("go")
        .args(["tool", "test2json", "-p", import_path])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start `go tool test2json`")?;
    let mut stdin = child.stdin.take().context("test2json has no stdin")?;
    let input = raw.to_vec();
    let writer = tokio::spawn(async move {
        let written = stdin.write_all(&input).await;
        drop(stdin);
        written
    });
    let out = child
        .wait_with_output()
        .await
        .context("failed to run `go tool test2json`")?;
    writer
        .await
        .context("failed to join test2json's input")?
        .context("failed to feed test2json")?;
    if !out.status.success() {
        bail!(
            "`go tool test2json -p {import_path}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(parse_events(
        import_path,
        &String::from_utf8_lossy(&out.stdout),
    ))
}

/// How one test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestOutcome {
    /// Passed.
    Pass,
    /// Failed.
    Fail,
    /// Skipped.
    Skip,
    /// Started and never ended (the binary crashed or was killed).
    Unfinished,
}

/// One test as the events tell it.
#[derive(Debug, Clone, PartialEq)]
pub struct TestRecord {
    /// `TestA` or `TestA/sub`.
    pub name: String,
    /// How it ended (after reruns: the last run's outcome).
    pub outcome: TestOutcome,
    /// Seconds.
    pub elapsed_s: f64,
    /// Its output lines.
    pub output: String,
    /// Failed at first and passed on a rerun.
    pub flaky: bool,
    /// The first failure's output, kept when a rerun replaced it.
    pub first_failure: Option<String>,
}

impl TestRecord {
    /// Whether it is a top-level test (not a subtest).
    pub fn is_top_level(&self) -> bool {
        !self.name.contains('/')
    }
}

/// What one package's events say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackageEvents {
    /// Tests in the order they started.
    pub tests: Vec<TestRecord>,
    /// The package-level verdict the binary printed (PASS/FAIL), if it got that far.
    pub outcome: Option<TestOutcome>,
    /// Output not attached to any test (PASS, FAIL, panics outside tests, build notes).
    pub output: String,
}

impl PackageEvents {
    /// Top-level tests that failed or never finished, in order.
    pub fn failed_top_level(&self) -> Vec<String> {
        self.tests
            .iter()
            .filter(|t| t.is_top_level())
            .filter(|t| matches!(t.outcome, TestOutcome::Fail | TestOutcome::Unfinished))
            .map(|t| t.name.clone())
            .collect()
    }

    /// Whether any test failed or never finished.
    pub fn any_failed(&self) -> bool {
        self.tests
            .iter()
            .any(|t| matches!(t.outcome, TestOutcome::Fail | TestOutcome::Unfinished))
    }

    /// Whether no top-level test ran to a pass or a failure (none at all, or all skipped).
    pub fn nothing_ran(&self) -> bool {
        self.tests
            .iter()
            .filter(|t| t.is_top_level())
            .all(|t| t.outcome == TestOutcome::Skip)
    }
}

/// Folds a package's events into tests and a package outcome.
pub fn fold_events(events: &[TestEvent]) -> PackageEvents {
    let mut folded = PackageEvents::default();
    let index_of = |tests: &mut Vec<TestRecord>, name: &str| -> usize {
        if let Some(i) = tests.iter().position(|t| t.name == name) {
            return i;
        }
        tests.push(TestRecord {
            name: name.to_string(),
            outcome: TestOutcome::Unfinished,
            elapsed_s: 0.0,
            output: String::new(),
            flaky: false,
            first_failure: None,
        });
        tests.len() - 1
    };
    for e in events {
        let outcome = match e.action.as_str() {
            "pass" => Some(TestOutcome::Pass),
            "fail" => Some(TestOutcome::Fail),
            "skip" => Some(TestOutcome::Skip),
            _ => None,
        };
        match &e.test {
            Some(name) => {
                let i = index_of(&mut folded.tests, name);
                let t = &mut folded.tests[i];
                if let Some(o) = outcome {
                    t.outcome = o;
                    t.elapsed_s = e.elapsed.unwrap_or(0.0);
                } else if e.action == "output" {
                    t.output.push_str(e.output.as_deref().unwrap_or(""));
                } else if e.action == "run" {
                    t.outcome = TestOutcome::Unfinished;
                }
            }
            None => {
                if let Some(o) = outcome {
                    folded.outcome = Some(o);
                } else if e.action == "output" {
                    folded.output.push_str(e.output.as_deref().unwrap_or(""));
                }
            }
        }
    }
    folded
}

/// How a package's run ended, for completing its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunEnd {
    /// The binary's exit code.
    pub exit_code: i32,
    /// Wall-clock milliseconds.
    pub duration_ms: u64,
    /// The result came from the step cache.
    pub cached: bool,
}

/// Completes a package's events as `go test -json` prints them: test2json over a bare binary
/// stops at the binary's own `PASS`/`FAIL` line (or at a crash, with no final event), so the
/// `ok`/`FAIL` line and the final event with its Elapsed are added here, the verdict taken from
/// the exit code. `note` (e.g. why the watchdog fired) is put before them as output.
pub fn complete_stream(
    package: &str,
    events: &mut Vec<TestEvent>,
    end: RunEnd,
    note: Option<&str>,
) {
    let terminal =
        |e: &TestEvent| e.test.is_none() && matches!(e.action.as_str(), "pass" | "fail" | "skip");
    let printed = events.iter().rposition(terminal).map(|i| events.remove(i));
    let failed = end.exit_code != 0 || printed.as_ref().is_some_and(|e| e.action == "fail");
    if let Some(n) = note {
        let mut text = n.trim_end().to_string();
        text.push('\n');
        events.push(TestEvent::output(package, text));
    }
    let elapsed = end.duration_ms as f64 / 1000.0;
    let took = if end.cached {
        "(cached)".to_string()
    } else {
        format!("{elapsed:.3}s")
    };
    let line = if failed {
        format!("FAIL\t{package}\t{took}\n")
    } else {
        format!("ok  \t{package}\t{took}\n")
    };
    events.push(TestEvent::output(package, line));
    let action = if failed {
        "fail"
    } else {
        printed.as_ref().map_or("pass", |e| e.action.as_str())
    };
    events.push(TestEvent {
        elapsed: Some(elapsed),
        ..TestEvent::package(package, action)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const PKG: &str = "example.com/fixtures/fail";

    fn stream() -> Vec<TestEvent> {
        let text = r#"{"Action":"run","Package":"example.com/fixtures/fail","Test":"TestAnswerIsRight"}
{"Action":"output","Package":"example.com/fixtures/fail","Test":"TestAnswerIsRight","Output":"=== RUN   TestAnswerIsRight\n"}
{"Action":"output","Package":"example.com/fixtures/fail","Test":"TestAnswerIsRight","Output":"--- PASS: TestAnswerIsRight (0.00s)\n"}
{"Action":"pass","Package":"example.com/fixtures/fail","Test":"TestAnswerIsRight","Elapsed":0.001}
{"Action":"run","Package":"example.com/fixtures/fail","Test":"TestAlwaysFails"}
{"Action":"output","Package":"example.com/fixtures/fail","Test":"TestAlwaysFails","Output":"=== RUN   TestAlwaysFails\n"}
{"Action":"run","Package":"example.com/fixtures/fail","Test":"TestAlwaysFails/sub"}
{"Action":"output","Package":"example.com/fixtures/fail","Test":"TestAlwaysFails/sub","Output":"    fail_test.go:12: wants 43\n"}
{"Action":"fail","Package":"example.com/fixtures/fail","Test":"TestAlwaysFails/sub","Elapsed":0}
{"Action":"fail","Package":"example.com/fixtures/fail","Test":"TestAlwaysFails","Elapsed":0.02}
{"Action":"run","Package":"example.com/fixtures/fail","Test":"TestSkipped"}
{"Action":"skip","Package":"example.com/fixtures/fail","Test":"TestSkipped","Elapsed":0}
{"Action":"output","Package":"example.com/fixtures/fail","Output":"FAIL\n"}
{"Action":"fail","Package":"example.com/fixtures/fail"}
"#;
        parse_events(PKG, text)
    }

    #[test]
    fn events_fold_into_tests_and_a_package_outcome() {
        let folded = fold_events(&stream());
        let names: Vec<(&str, TestOutcome)> = folded
            .tests
            .iter()
            .map(|t| (t.name.as_str(), t.outcome))
            .collect();
        assert_eq!(
            names,
            [
                ("TestAnswerIsRight", TestOutcome::Pass),
                ("TestAlwaysFails", TestOutcome::Fail),
                ("TestAlwaysFails/sub", TestOutcome::Fail),
                ("TestSkipped", TestOutcome::Skip),
            ]
        );
        assert_eq!(folded.outcome, Some(TestOutcome::Fail));
        assert_eq!(folded.failed_top_level(), ["TestAlwaysFails"]);
        assert!(folded.tests[2].output.contains("wants 43"));
        assert_eq!(folded.tests[1].elapsed_s, 0.02);
        assert_eq!(folded.output, "FAIL\n");
        assert!(folded.any_failed() && !folded.nothing_ran());
    }

    #[test]
    fn a_crash_leaves_the_running_test_unfinished() {
        let text = r#"{"Action":"run","Package":"p","Test":"TestA"}
{"Action":"output","Package":"p","Test":"TestA","Output":"panic: boom\n"}
not json at all
"#;
        let events = parse_events("p", text);
        assert_eq!(events[2].output.as_deref(), Some("not json at all\n"));
        let folded = fold_events(&events);
        assert_eq!(folded.tests[0].outcome, TestOutcome::Unfinished);
        assert_eq!(folded.outcome, None);
        assert_eq!(folded.failed_top_level(), ["TestA"]);
    }

    #[test]
    fn no_tests_or_only_skips_is_nothing_ran() {
        assert!(fold_events(&[]).nothing_ran());
        let text = r#"{"Action":"skip","Package":"p","Test":"TestA","Elapsed":0}"#;
        assert!(fold_events(&parse_events("p", text)).nothing_ran());
    }

    #[test]
    fn streams_end_like_go_test_json() {
        let mut events = stream();
        complete_stream(
            PKG,
            &mut events,
            RunEnd {
                exit_code: 1,
                duration_ms: 1234,
                cached: false,
            },
            None,
        );
        let n = events.len();
        assert_eq!(
            events[n - 2].output.as_deref(),
            Some("FAIL\texample.com/fixtures/fail\t1.234s\n")
        );
        assert_eq!(events[n - 1].action, "fail");
        assert_eq!(events[n - 1].elapsed, Some(1.234));
        assert_eq!(
            events
                .iter()
                .filter(|e| e.test.is_none() && e.action == "fail")
                .count(),
            1,
            "the binary's own final event is replaced"
        );

        // A passing cached result; a crash (no final event, exit 2) with a note.
        let mut ok = vec![
            TestEvent::output("p", "PASS\n".into()),
            TestEvent::package("p", "pass"),
        ];
        complete_stream(
            "p",
            &mut ok,
            RunEnd {
                exit_code: 0,
                duration_ms: 5,
                cached: true,
            },
            None,
        );
        assert_eq!(ok[1].output.as_deref(), Some("ok  \tp\t(cached)\n"));
        assert_eq!(ok[2].action, "pass");
        let mut crash = vec![];
        complete_stream(
            "p",
            &mut crash,
            RunEnd {
                exit_code: 137,
                duration_ms: 10,
                cached: false,
            },
            Some("archfarm: killed by the watchdog"),
        );
        assert_eq!(
            crash[0].output.as_deref(),
            Some("archfarm: killed by the watchdog\n")
        );
        assert_eq!(crash[2].action, "fail");
        let line = crash[2].to_line();
        assert_eq!(
            line,
            "{\"Action\":\"fail\",\"Package\":\"p\",\"Elapsed\":0.01}\n"
        );
    }
}
