//! What a ginkgo v1 suite binary prints with `-ginkgo.v -ginkgo.noColor`, parsed: the suite's
//! description, every spec it announced (full text and code location) with its outcome and
//! output, a BeforeSuite/AfterSuite failure, and the closing summary. The same parser reads the
//! dry run that lists the specs and the shards' real runs.
//!
//! The shape comes from ginkgo v1's console stenographer (reporters/stenographer): with `-v`
//! each spec that will run is announced by a header, the spec's own output follows, then `•`
//! (passed), `• Failure [s]`, `•! Panic [s]`, `•... Timeout [s]` or `S [SKIPPING] [s]` blocks;
//! blocks end with a line of 30 dashes. A header is the containers' texts on one line (each
//! followed by a space), then the It's text and its `file:line`, both indented by two spaces;
//! a spec outside any container has no containers line and no indentation. The samples in
//! `testdata/` are real output of the fixture suite and of `testdata/scratch_suite.go.txt`.

/// The line ginkgo v1 ends a block with.
const DELIMITER: &str = "------------------------------";

/// Where a spec's It is: the file as the compiler saw it and the line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Location {
    /// Absolute path of the spec file on the machine that compiled the suite.
    pub file: String,
    /// Line of the It.
    pub line: u32,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

impl Location {
    /// `file.go:12`: the file's base name and the line, for tables.
    pub fn short(&self) -> String {
        let base = self.file.rsplit('/').next().unwrap_or(&self.file);
        format!("{base}:{}", self.line)
    }
}

/// A spec as the suite names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Spec {
    /// The containers' texts and the It's text joined by spaces, as ginkgo v1 matches
    /// `-ginkgo.focus` against it (after the suite description and `[Top Level]`).
    pub text: String,
    /// The It's code location.
    pub location: Location,
}

/// How a spec ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `•`, `• [SLOW TEST:...]`, `• [MEASUREMENT]`.
    Passed,
    /// `• Failure`: an assertion failed (in the It or its setup/teardown).
    Failed,
    /// `•! Panic`.
    Panicked,
    /// `•... Timeout`: an async spec ran out of time.
    TimedOut,
    /// `S [SKIPPING]`: the spec called Skip.
    Skipped,
    /// Announced, but the output ends before its verdict (the binary died or was killed).
    Unfinished,
}

impl Outcome {
    /// Whether it counts as a failure.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Outcome::Failed | Outcome::Panicked | Outcome::TimedOut | Outcome::Unfinished
        )
    }
}

/// One announced spec and what became of it.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecRun {
    /// Which spec.
    pub spec: Spec,
    /// Its verdict.
    pub outcome: Outcome,
    /// Seconds, when ginkgo printed them (failures, skips, slow specs).
    pub seconds: Option<f64>,
    /// What the spec printed (stdout, GinkgoWriter) between its header and its verdict.
    pub output: String,
    /// The verdict block: failure message and location, panic and stack, skip message.
    pub detail: String,
}

/// The closing `Ran N of M Specs` and `SUCCESS!`/`FAIL! -- a Passed | b Failed | ...` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Specs that ran.
    pub ran: u32,
    /// Specs in the suite.
    pub total: u32,
    /// SUCCESS! rather than FAIL!.
    pub succeeded: bool,
    /// The counts of the last line.
    pub passed: u32,
    pub failed: u32,
    pub pending: u32,
    pub skipped: u32,
}

/// Everything parsed from one run of a suite binary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SuiteOutput {
    /// The description given to RunSpecs (`Running Suite: ...`).
    pub description: Option<String>,
    /// `Will run N of M specs`.
    pub will_run: Option<(u32, u32)>,
    /// The announced specs in the order they ran.
    pub specs: Vec<SpecRun>,
    /// Pending specs (`P [PENDING]` blocks): listed but never run.
    pub pending: Vec<Spec>,
    /// A BeforeSuite or AfterSuite failure block.
    pub setup_failure: Option<String>,
    /// The closing summary; absent when the binary did not get that far.
    pub summary: Option<Summary>,
}

/// Parses `file:line` (possibly indented); None for anything else.
fn location(line: &str) -> Option<Location> {
    let (file, number) = line.trim_start_matches(' ').rsplit_once(':')?;
    if file.is_empty() || number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !file.ends_with(".go") {
        return None;
    }
    Some(Location {
        file: file.to_string(),
        line: number.parse().ok()?,
    })
}

/// The spec named by header lines (everything before the location line, blanks dropped at
/// the start). With containers, the location is indented: the containers' line(s) come first,
/// unindented, ending in a space; the It's lines carry two spaces of indentation each.
fn header_text(lines: &[&str], indented: bool) -> String {
    if !indented {
        return lines.join("\n");
    }
    let split = lines
        .iter()
        .position(|l| l.starts_with("  "))
        .unwrap_or(lines.len());
    let containers = lines[..split].join("\n");
    let it: Vec<&str> = lines[split..]
        .iter()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    if containers.is_empty() {
        it.join("\n")
    } else if containers.ends_with(' ') {
        format!("{containers}{}", it.join("\n"))
    } else {
        format!("{containers} {}", it.join("\n"))
    }
}

/// `[0.001 seconds]` in a verdict line.
fn bracket_seconds(line: &str) -> Option<f64> {
    let start = line.rfind('[')?;
    let inner = line[start + 1..].strip_suffix(" seconds]")?;
    let inner = inner.strip_prefix("SLOW TEST:").unwrap_or(inner);
    inner.parse().ok()
}

/// The verdict a line starts, if any (blocks that carry one).
fn verdict_line(line: &str) -> Option<Outcome> {
    if line.starts_with("• Failure") {
        Some(Outcome::Failed)
    } else if line.starts_with("•! Panic") {
        Some(Outcome::Panicked)
    } else if line.starts_with("•... Timeout") {
        Some(Outcome::TimedOut)
    } else if line.starts_with("S [SKIPPING]") {
        Some(Outcome::Skipped)
    } else if line.starts_with("• [SLOW TEST:") || line.starts_with("• [MEASUREMENT]") {
        Some(Outcome::Passed)
    } else {
        None
    }
}

/// A streamed pass: `•`, possibly after output without a newline, possibly followed by the
/// `S`/`P` of skipped and pending specs streamed after it.
fn is_pass_mark(line: &str) -> bool {
    line.trim_end().trim_end_matches(['S', 'P']).ends_with('•')
}

/// Whether a line is only streamed skip/pending marks (`SSSS`).
fn is_stream_marks(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && t.chars().all(|c| c == 'S' || c == 'P')
}

/// Parses `Ran N of M Specs in ...` and the line after it.
fn summary(lines: &[&str]) -> Option<Summary> {
    let i = lines.iter().position(|l| l.starts_with("Ran "))?;
    let words: Vec<&str> = lines[i].split_whitespace().collect();
    let (ran, total) = match words.as_slice() {
        ["Ran", ran, "of", total, "Specs", ..] => (ran.parse().ok()?, total.parse().ok()?),
        _ => return None,
    };
    let mut s = Summary {
        ran,
        total,
        ..Summary::default()
    };
    if let Some(counts) = lines.get(i + 1) {
        s.succeeded = counts.starts_with("SUCCESS!");
        for part in counts.split(['|', '-']) {
            let mut w = part.split_whitespace();
            if let (Some(n), Some(what)) = (w.next(), w.next()) {
                let Ok(n) = n.parse::<u32>() else { continue };
                match what {
                    "Passed" => s.passed = n,
                    "Failed" => s.failed = n,
                    "Pending" => s.pending = n,
                    "Skipped" => s.skipped = n,
                    _ => {}
                }
            }
        }
    }
    Some(s)
}

/// One delimited piece of the output, read as a spec block.
fn spec_block(lines: &[&str]) -> Option<SpecRun> {
    let first = lines.iter().position(|l| !l.trim().is_empty())?;
    // The header: at most a few lines, then the It's location.
    let end = (first..lines.len().min(first + 12)).find(|&i| location(lines[i]).is_some())?;
    let head = &lines[first..end];
    if head.is_empty() || head.iter().any(|l| verdict_line(l).is_some()) {
        return None;
    }
    let loc_line = lines[end];
    let spec = Spec {
        text: header_text(head, loc_line.starts_with("  ")),
        location: location(loc_line)?,
    };
    let rest = &lines[end + 1..];
    let (outcome, seconds, output, detail) =
        match rest.iter().position(|l| verdict_line(l).is_some()) {
            Some(v) => {
                let outcome = verdict_line(rest[v]).unwrap_or(Outcome::Unfinished);
                let output = rest[..v].join("\n");
                (
                    outcome,
                    bracket_seconds(rest[v]),
                    output,
                    rest[v..].join("\n"),
                )
            }
            None => match rest.iter().rposition(|l| is_pass_mark(l)) {
                Some(p) => {
                    let mut output: Vec<&str> = rest[..p].to_vec();
                    let mark = rest[p].trim_end().trim_end_matches(['S', 'P']);
                    let before = mark.strip_suffix('•').unwrap_or("");
                    if !before.is_empty() {
                        output.push(before);
                    }
                    (Outcome::Passed, None, output.join("\n"), String::new())
                }
                None => (Outcome::Unfinished, None, rest.join("\n"), String::new()),
            },
        };
    Some(SpecRun {
        spec,
        outcome,
        seconds,
        output: tidy(&output),
        detail: tidy(&detail),
    })
}

/// Blank lines at the ends dropped, a newline at the end when anything is left.
fn tidy(text: &str) -> String {
    let t = text.trim_matches('\n');
    if t.trim().is_empty() {
        String::new()
    } else {
        format!("{t}\n")
    }
}

/// A `P [PENDING]` block's spec: the last text and location of its code location block.
fn pending_block(lines: &[&str]) -> Option<Spec> {
    let at = lines.iter().position(|l| l.starts_with("P [PENDING]"))?;
    let block = &lines[at + 1..];
    let last = block.iter().rposition(|l| location(l).is_some())?;
    let texts: Vec<&str> = block[..last]
        .iter()
        .enumerate()
        .filter(|(i, _)| location(block[*i]).is_none())
        .map(|(_, l)| l.trim_start())
        .collect();
    Some(Spec {
        text: texts.join(" "),
        location: location(block[last])?,
    })
}

/// Parses a whole run's output.
pub fn parse(text: &str) -> SuiteOutput {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = SuiteOutput {
        description: lines
            .iter()
            .find_map(|l| l.strip_prefix("Running Suite: "))
            .map(str::to_string),
        ..SuiteOutput::default()
    };
    let start = match lines.iter().position(|l| l.starts_with("Will run ")) {
        Some(i) => {
            let w: Vec<&str> = lines[i].split_whitespace().collect();
            if let ["Will", "run", n, "of", m, ..] = w.as_slice() {
                out.will_run = n.parse().ok().zip(m.parse().ok());
            }
            i + 1
        }
        None => 0,
    };
    let body = &lines[start.min(lines.len())..];
    // The closing part: the failure summary and the `Ran` lines, after the last block.
    let last_delimiter = body.iter().rposition(|l| *l == DELIMITER);
    let tail_from = last_delimiter.map_or(0, |d| d + 1);
    let closing = body[tail_from..]
        .iter()
        .position(|l| l.starts_with("Summarizing ") || summary(&[l]).is_some())
        .map(|i| tail_from + i);
    if let Some(c) = closing {
        out.summary = summary(&body[c..]);
    }
    let body = &body[..closing.unwrap_or(body.len())];
    for segment in body.split(|l| *l == DELIMITER) {
        let first = segment.iter().find(|l| !l.trim().is_empty());
        match first {
            None => {}
            Some(l)
                if is_stream_marks(l)
                    && segment
                        .iter()
                        .all(|l| l.trim().is_empty() || is_stream_marks(l)) => {}
            Some(l) if l.starts_with("P [PENDING]") => out.pending.extend(pending_block(segment)),
            Some(l)
                if l.starts_with("Failure [")
                    || l.starts_with("Panic [")
                    || l.starts_with("Timeout [") =>
            {
                let text = tidy(&segment.join("\n"));
                out.setup_failure = Some(match out.setup_failure.take() {
                    Some(before) => format!("{before}{text}"),
                    None => text,
                });
            }
            Some(_) => out.specs.extend(spec_block(segment)),
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const E2E_DRY_RUN: &str = include_str!("testdata/e2e_dry_run.txt");
    pub(crate) const E2E_FAIL_RUN: &str = include_str!("testdata/e2e_fail_run.txt");
    pub(crate) const SCRATCH_DRY_RUN: &str = include_str!("testdata/scratch_dry_run.txt");
    const SCRATCH_RUN: &str = include_str!("testdata/scratch_run.txt");
    const SCRATCH_BEFORE_SUITE: &str = include_str!("testdata/scratch_before_suite.txt");

    fn at(file: &str, line: u32) -> Location {
        Location {
            file: format!("/gopath/src/{file}"),
            line,
        }
    }

    #[test]
    fn a_dry_run_lists_every_spec_with_its_full_text_and_location() {
        let out = parse(E2E_DRY_RUN);
        assert_eq!(out.description.as_deref(), Some("E2E Fixture Suite"));
        assert_eq!(out.will_run, Some((6, 6)));
        let listed: Vec<(&str, String)> = out
            .specs
            .iter()
            .map(|s| (s.spec.text.as_str(), s.spec.location.short()))
            .collect();
        assert_eq!(
            listed,
            [
                (
                    "[sig-node] Node should carry the node-e2e label",
                    "node_test.go:15".to_string()
                ),
                (
                    "[sig-node] Node with no pods should have an empty pod list",
                    "node_test.go:20".to_string()
                ),
                (
                    "[sig-node] Node with no pods should report a missing pod as not deleted [Slow]",
                    "node_test.go:24".to_string()
                ),
                ("[sig-node] Pods should run a pod", "pods_test.go:17".to_string()),
                (
                    "[sig-node] Pods should refuse a pod that already runs",
                    "pods_test.go:22".to_string()
                ),
                (
                    "[sig-node] Pods when a pod is deleted should be gone (fails with E2E_FAIL=1)",
                    "pods_test.go:28".to_string()
                ),
            ]
        );
        assert_eq!(
            out.specs[0].spec.location,
            at("example.com/fixtures/e2e/node_test.go", 15)
        );
        assert!(out.specs.iter().all(|s| s.outcome == Outcome::Passed));
        let summary = out.summary.unwrap();
        assert_eq!(
            (summary.ran, summary.total, summary.succeeded),
            (6, 6, true)
        );
    }

    #[test]
    fn a_failure_carries_its_message_and_location() {
        let out = parse(E2E_FAIL_RUN);
        assert_eq!(out.specs.len(), 6);
        let failed: Vec<&SpecRun> = out
            .specs
            .iter()
            .filter(|s| s.outcome.is_failure())
            .collect();
        assert_eq!(failed.len(), 1);
        let f = failed[0];
        assert_eq!(
            f.spec.text,
            "[sig-node] Pods when a pod is deleted should be gone (fails with E2E_FAIL=1)"
        );
        assert_eq!(f.outcome, Outcome::Failed);
        assert_eq!(f.seconds, Some(0.0));
        assert!(
            f.detail.starts_with("• Failure [0.000 seconds]\n"),
            "{}",
            f.detail
        );
        assert!(f.detail.contains("E2E_FAIL=1 asks this spec to fail"));
        assert!(f.detail.contains("pods_test.go:32"));
        assert!(!f.detail.contains("Summarizing"), "{}", f.detail);
        let s = out.summary.unwrap();
        assert_eq!((s.ran, s.passed, s.failed, s.succeeded), (6, 5, 1, false));
    }

    #[test]
    fn skips_panics_pending_loops_and_multiline_texts() {
        let dry = parse(SCRATCH_DRY_RUN);
        assert_eq!(dry.will_run, Some((8, 9)));
        assert_eq!(dry.specs.len(), 8);
        assert_eq!(dry.pending.len(), 1);
        assert_eq!(dry.pending[0].text, "A is pending");
        let texts: Vec<&str> = dry.specs.iter().map(|s| s.spec.text.as_str()).collect();
        assert!(
            texts.contains(&"A multi\nline in a\nmultiline context"),
            "{texts:?}"
        );
        assert!(texts.contains(&"top level spec"), "{texts:?}");
        assert_eq!(texts.iter().filter(|t| **t == "A same text").count(), 2);

        let run = parse(SCRATCH_RUN);
        let by_text = |t: &str| run.specs.iter().find(|s| s.spec.text == t).unwrap();
        assert_eq!(by_text("A skips").outcome, Outcome::Skipped);
        assert!(by_text("A skips").detail.contains("not today"));
        let panic = by_text("A panics");
        assert_eq!(panic.outcome, Outcome::Panicked);
        assert!(panic.detail.contains("boom") && panic.detail.contains("Full Stack Trace"));
        let top = by_text("top level spec");
        assert_eq!(top.outcome, Outcome::Passed);
        assert_eq!(top.output, "printed by a spec\nno newline\n");
        assert_eq!(top.spec.location.short(), "x_test.go:21");
        assert_eq!(run.specs.len(), 8);
        let s = run.summary.unwrap();
        assert_eq!((s.ran, s.failed, s.pending, s.skipped), (7, 1, 1, 1));
    }

    #[test]
    fn a_before_suite_failure_runs_nothing() {
        let out = parse(SCRATCH_BEFORE_SUITE);
        assert!(out.specs.is_empty());
        let f = out.setup_failure.unwrap();
        assert!(
            f.contains("[BeforeSuite]") && f.contains("before suite broke"),
            "{f}"
        );
        assert!(!out.summary.unwrap().succeeded);
    }

    #[test]
    fn a_binary_that_died_leaves_its_spec_unfinished() {
        let cut = "Running Suite: S\n==\nRandom Seed: 1\nWill run 2 of 2 specs\n\nA \n  b\n  /x/a_test.go:3\n•\n------------------------------\nA \n  c\n  /x/a_test.go:5\nsome output\nfatal error: out of memory\n";
        let out = parse(cut);
        assert_eq!(out.specs.len(), 2);
        assert_eq!(out.specs[0].outcome, Outcome::Passed);
        assert_eq!(out.specs[1].outcome, Outcome::Unfinished);
        assert!(out.specs[1].output.contains("out of memory"));
        assert!(out.summary.is_none());
    }
}
