//! `archfarm go-test` on the command line: [`go_test`]'s progress as the lines `go test`
//! users know (`?` and `FAIL` on their streams, progress on stderr), then the report: what
//! failed with its output, the files written (`--json`, `--junit`), the matrix, the
//! makespans and the verdict counts.
use super::shell::{Shell, Stream};
use super::watch::show_watch;
use crate::farm::display::format_duration;
use crate::farm::FarmClient;
use crate::gotest::report::{makespan_line, matrix, problems_text, verdict_counts};
use crate::gotest::{go_test, GoTestArgs, GoTestProgress, GoTestReport};

/// `archfarm go-test`: returns the exit code (1 when anything failed, hung or could not
/// run).
pub async fn command(client: &mut FarmClient, args: &GoTestArgs) -> anyhow::Result<u8> {
    let mut sh = Shell::terminal();
    let report = go_test(client, args, &mut |p| {
        show_progress(&mut sh, args.verbose, &p)
    })
    .await?;
    show_report(&mut sh, args, &report)?;
    Ok(report.exit_code())
}

/// Shows one step of go-test's progress.
pub fn show_progress(sh: &mut Shell, verbose: bool, p: &GoTestProgress) {
    let s = |n: usize| if n == 1 { "" } else { "s" };
    match p {
        GoTestProgress::NoGoFiles { package } => sh.out(format!("?   \t{package}\t[no Go files]")),
        GoTestProgress::NoTestFiles { package } => {
            sh.out(format!("?   \t{package}\t[no test files]"));
        }
        GoTestProgress::SetupFailed { package, error } => {
            sh.err(format!("FAIL\t{package} [setup failed]: {error}"));
        }
        GoTestProgress::Planned {
            packages,
            platforms,
            cached,
            cached_by_scope,
            to_run,
        } => {
            let scopes = if cached_by_scope.is_empty() {
                String::new()
            } else {
                let parts: Vec<String> = cached_by_scope
                    .iter()
                    .map(|(scope, n)| format!("{n} from the {scope} scope"))
                    .collect();
                format!(" ({})", parts.join(", "))
            };
            sh.err(format!(
                "{packages} package{} with tests on {platforms} platform{}: {cached} \
                 cached{scopes}, {to_run} to build and run",
                s(*packages),
                s(*platforms)
            ))
        }
        GoTestProgress::BuildFailed { package, platform } => {
            sh.err(format!("FAIL\t{package} [build failed on {platform}]"));
        }
        GoTestProgress::Built { built, of, took } => sh.err(format!(
            "built {built} of {of} test binar{} in {}",
            if *of == 1 { "y" } else { "ies" },
            format_duration(*took)
        )),
        GoTestProgress::Uploaded(upload) => sh.err(upload.summary()),
        GoTestProgress::Submitted {
            job_id,
            packages,
            platforms,
            shards,
        } => sh.err(format!(
            "job {job_id}: running {packages} package{} on {platforms} platform{} in {shards} \
             shard{}",
            s(*packages),
            s(*platforms),
            s(*shards)
        )),
        GoTestProgress::Watch(w) => show_watch(sh, verbose, w),
        GoTestProgress::RerunStarted { round, of, runs } => sh.err(format!(
            "rerun {round} of {of}: {runs} failed package run{}",
            s(*runs)
        )),
        GoTestProgress::RerunNotRun {
            package,
            platform,
            why,
        } => sh.err(format!(
            "rerun of {package} on {platform} did not run: {why}"
        )),
        GoTestProgress::RerunUnreadable {
            package,
            platform,
            error,
        } => sh.err(format!("rerun of {package} on {platform}: {error}")),
    }
}

/// Shows the report and writes the files `--json` and `--junit` ask for.
pub fn show_report(sh: &mut Shell, args: &GoTestArgs, report: &GoTestReport) -> anyhow::Result<()> {
    sh.write(Stream::Stdout, problems_text(&report.results).as_bytes());
    if let Some(dir) = &args.json {
        for path in report.write_json_streams(dir)? {
            sh.err(format!("wrote {}", path.display()));
        }
    }
    if let Some(dir) = &args.junit {
        for path in report.write_junit(dir)? {
            sh.err(format!("wrote {}", path.display()));
        }
    }
    if !report.results.is_empty() {
        sh.out(matrix(&report.platforms, &report.results));
    }
    for m in &report.makespans {
        sh.out(makespan_line(m));
    }
    sh.out(verdict_counts(&report.results));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gotest::report::Makespan;
    use crate::gotest::verdict::{PackageResult, Verdict};
    use std::time::Duration;

    #[test]
    fn progress_goes_to_the_streams_go_test_uses() {
        let mut sh = Shell::memory();
        for p in [
            GoTestProgress::NoTestFiles {
                package: "example.com/fixtures/notests".into(),
            },
            GoTestProgress::SetupFailed {
                package: "example.com/fixtures/broken".into(),
                error: "no such file".into(),
            },
            GoTestProgress::Planned {
                packages: 1,
                platforms: 2,
                cached: 0,
                cached_by_scope: Default::default(),
                to_run: 2,
            },
            GoTestProgress::Planned {
                packages: 2,
                platforms: 2,
                cached: 3,
                cached_by_scope: [("principal pr-1".to_string(), 1), ("shared".to_string(), 2)]
                    .into(),
                to_run: 1,
            },
            GoTestProgress::Built {
                built: 1,
                of: 1,
                took: Duration::from_millis(1500),
            },
            GoTestProgress::Submitted {
                job_id: "j1".into(),
                packages: 2,
                platforms: 2,
                shards: 1,
            },
        ] {
            show_progress(&mut sh, false, &p);
        }
        assert_eq!(
            sh.stdout(),
            "?   \texample.com/fixtures/notests\t[no test files]\n"
        );
        assert_eq!(
            sh.stderr().lines().collect::<Vec<_>>(),
            [
                "FAIL\texample.com/fixtures/broken [setup failed]: no such file",
                "1 package with tests on 2 platforms: 0 cached, 2 to build and run",
                "2 packages with tests on 2 platforms: 3 cached (1 from the principal pr-1 \
                 scope, 2 from the shared scope), 1 to build and run",
                "built 1 of 1 test binary in 1.5s",
                "job j1: running 2 packages on 2 platforms in 1 shard",
            ]
        );
    }

    #[test]
    fn the_report_shows_problems_then_the_matrix_then_the_counts() {
        let mut fail = PackageResult::without_run(
            "example.com/fixtures/fail",
            "linux/amd64",
            Verdict::BuildFailed,
            "go list: broken\n".into(),
        );
        fail.emulated = true;
        let pass = PackageResult::without_run(
            "example.com/fixtures/pass",
            "linux/amd64",
            Verdict::Cached,
            String::new(),
        );
        let report = GoTestReport {
            platforms: vec!["linux/amd64".into()],
            go_version: "go1.19".into(),
            results: [fail, pass]
                .into_iter()
                .map(|r| ((r.import_path.clone(), r.platform.clone()), r))
                .collect(),
            makespans: vec![Makespan {
                platform: "linux/amd64".into(),
                shards: 1,
                predicted_ms: 1000,
                actual_ms: 2000,
            }],
        };
        let mut sh = Shell::memory();
        show_report(&mut sh, &GoTestArgs::new(["./..."]), &report).unwrap();
        let out = sh.stdout();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[..2],
            [
                "--- BUILD FAILED example.com/fixtures/fail on linux/amd64 (emulated)",
                "go list: broken"
            ]
        );
        assert!(lines[2].starts_with('┌'), "{out}");
        assert!(out.contains("build failed*"), "{out}");
        assert_eq!(
            lines[lines.len() - 2..],
            [
                "linux/amd64: 1 shard, predicted makespan 1.0s, actual 2.0s",
                "1 cached, 1 build failed"
            ]
        );
        assert_eq!(sh.stderr(), "");
        assert_eq!(report.exit_code(), 1);
    }
}
