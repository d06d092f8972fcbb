//! `archfarm ginkgo` on the command line: [`ginkgo`]'s progress on stderr, then the report:
//! the failed specs with their output, the JUnit file (`--junit`), the shard table and the
//! totals.
use super::shell::{Shell, Stream};
use super::watch::show_watch;
use crate::farm::display::format_duration;
use crate::farm::FarmClient;
use crate::ginkgo::report::{problems_text, table, totals_line};
use crate::ginkgo::{ginkgo, GinkgoArgs, GinkgoProgress, GinkgoReport, NODE_E2E_LABEL};

/// `archfarm ginkgo`: returns the exit code (1 when any spec failed or did not run).
pub async fn command(client: &mut FarmClient, args: &GinkgoArgs) -> anyhow::Result<u8> {
    let mut sh = Shell::terminal();
    let report = ginkgo(client, args, &mut |p| {
        show_progress(&mut sh, args.verbose, &p)
    })
    .await?;
    show_report(&mut sh, args, &report)?;
    Ok(report.exit_code())
}

/// Shows one step of a ginkgo run's progress.
pub fn show_progress(sh: &mut Shell, verbose: bool, p: &GinkgoProgress) {
    let s = |n: usize| if n == 1 { "" } else { "s" };
    match p {
        GinkgoProgress::Built {
            import_path,
            platform,
            host,
            took,
        } => sh.err(format!(
            "built {import_path} for {platform}{} in {}",
            host.as_ref().map_or(String::new(), |h| format!(" and {h}")),
            format_duration(*took)
        )),
        GinkgoProgress::Sharded {
            specs,
            description,
            shards,
            asked,
        } => sh.err(format!(
            "{specs} spec{} of {description:?} (ginkgo v1) in {shards} shard{} by location{}",
            s(*specs),
            s(*shards),
            if *shards < *asked as usize {
                format!(" (only {shards} location groups for --shards {asked})")
            } else {
                String::new()
            }
        )),
        GinkgoProgress::Uploaded(upload) => sh.err(upload.summary()),
        GinkgoProgress::Submitted {
            job_id,
            shards,
            platform,
        } => sh.err(format!(
            "job {job_id}: {shards} shard{} on {platform}, each on an idle agent labelled \
             {NODE_E2E_LABEL} with the agent to itself",
            s(*shards)
        )),
        GinkgoProgress::Watch(w) => show_watch(sh, verbose, w),
    }
}

/// Shows the report and writes the JUnit file `--junit` asks for.
pub fn show_report(sh: &mut Shell, args: &GinkgoArgs, report: &GinkgoReport) -> anyhow::Result<()> {
    if report.nothing_selected() {
        sh.out(format!(
            "no specs of {} are selected; nothing to run",
            report.import_path
        ));
        return Ok(());
    }
    sh.write(Stream::Stdout, problems_text(&report.shards).as_bytes());
    if let Some(dir) = &args.junit {
        let path = report.write_junit(dir)?;
        sh.err(format!("wrote {}", path.display()));
    }
    sh.out(table(&report.shards));
    sh.out(totals_line(&report.shards));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn progress_lines() {
        let mut sh = Shell::memory();
        for p in [
            GinkgoProgress::Built {
                import_path: "example.com/fixtures/e2e".into(),
                platform: "linux/arm64".into(),
                host: Some("linux/amd64".into()),
                took: Duration::from_secs(3),
            },
            GinkgoProgress::Sharded {
                specs: 6,
                description: "E2E Fixture Suite".into(),
                shards: 2,
                asked: 3,
            },
            GinkgoProgress::Submitted {
                job_id: "j1".into(),
                shards: 2,
                platform: "linux/arm64".into(),
            },
        ] {
            show_progress(&mut sh, false, &p);
        }
        assert_eq!(
            sh.stderr().lines().collect::<Vec<_>>(),
            [
                "built example.com/fixtures/e2e for linux/arm64 and linux/amd64 in 3.0s",
                "6 specs of \"E2E Fixture Suite\" (ginkgo v1) in 2 shards by location \
                 (only 2 location groups for --shards 3)",
                "job j1: 2 shards on linux/arm64, each on an idle agent labelled node-e2e with \
                 the agent to itself",
            ]
        );
        assert_eq!(sh.stdout(), "");
    }

    #[test]
    fn nothing_selected_says_so_and_passes() {
        let report = GinkgoReport {
            import_path: "example.com/fixtures/e2e".into(),
            description: String::new(),
            platform: "linux/arm64".into(),
            shards: Vec::new(),
        };
        let args = GinkgoArgs {
            platform: "linux/arm64".into(),
            focus: vec![],
            skip: vec![],
            label_filter: None,
            shards: 1,
            timeout: Duration::from_secs(60),
            junit: None,
            allow_emulation: false,
            env: vec![],
            tags: None,
            verbose: false,
            package: None,
        };
        let mut sh = Shell::memory();
        show_report(&mut sh, &args, &report).unwrap();
        assert_eq!(
            sh.stdout(),
            "no specs of example.com/fixtures/e2e are selected; nothing to run\n"
        );
        assert_eq!(report.exit_code(), 0);
    }
}
