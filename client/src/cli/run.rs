//! `archfarm run` on the command line: [`run_job`]'s progress (each action's output on the
//! stream it came from, behind its platform; state changes and notes on stderr), then the
//! actions table, the downloads and the `N ran, M cached` line, all on stderr.
use super::shell::Shell;
use super::watch::interrupt_cancel_line;
use crate::farm::display::{format_ms, mib};
use crate::farm::job::actions_table;
use crate::farm::run::{ran_cached_line, run_job, RunArgs, RunOutcome, RunProgress};
use crate::farm::upload::Progress;
use crate::farm::watch::REWATCH_FOR;
use crate::farm::FarmClient;

/// `archfarm run`: runs the job and returns its exit code.
pub async fn command(client: &mut FarmClient, args: &RunArgs) -> anyhow::Result<u8> {
    Ok(run_printed(client, args).await?.exit_code)
}

/// Runs the job as `archfarm run` does, printing as it goes (also `cargo xtask demo`).
pub async fn run_printed(client: &mut FarmClient, args: &RunArgs) -> anyhow::Result<RunOutcome> {
    let mut sh = Shell::terminal();
    let outcome = run_job(client, args, Progress::Auto, &mut |p| {
        show_progress(&mut sh, &p)
    })
    .await?;
    show_outcome(&mut sh, &outcome);
    Ok(outcome)
}

/// Shows one step of a run's progress.
pub fn show_progress(sh: &mut Shell, p: &RunProgress) {
    match p {
        RunProgress::Uploaded(upload) => sh.err(upload.summary()),
        RunProgress::Submitted { job_id } => sh.err(format!("job {job_id} submitted")),
        RunProgress::Event(e) => sh.emit(e),
        RunProgress::Lost { job_id, why, again } => {
            if *again {
                sh.err(format!(
                    "lost the watch of job {job_id} again ({why}); reconnecting"
                ));
            } else {
                sh.err(format!(
                    "lost the watch of job {job_id} ({why}); reconnecting for up to {}; \
                     output written meanwhile may be missing",
                    format_ms(REWATCH_FOR.as_millis() as u64)
                ));
            }
        }
        RunProgress::Resumed { job_id } => sh.err(format!("watching job {job_id} again")),
        RunProgress::Cancelling { job_id } => sh.err(format!(
            "cancelling job {job_id} (Ctrl-C again to stop watching)"
        )),
        RunProgress::Cancelled(c) => sh.err(interrupt_cancel_line(c)),
        RunProgress::InterruptedAgain { job_id } => {
            sh.err(format!("interrupted again; stopped watching job {job_id}"))
        }
        RunProgress::OutputNotShown { platform, digest } => sh.err(format!(
            "[{platform}] {} MiB of output not shown; it is blob {digest}",
            mib(digest.size_bytes())
        )),
        RunProgress::OutputUnreadable(e) => sh.err(e),
        RunProgress::Finished { platforms, job } => {
            sh.err(actions_table(platforms, &job.actions).to_string());
        }
    }
}

/// Shows what a finished run brought home and the `N ran, M cached` line; nothing when the
/// watch was abandoned.
pub fn show_outcome(sh: &mut Shell, outcome: &RunOutcome) {
    let Some(job) = &outcome.job else {
        return;
    };
    for d in &outcome.downloads {
        sh.err(format!(
            "[{}] downloaded {} to {}{}",
            d.platform,
            d.path,
            d.destination.display(),
            if d.kind == "directory" {
                format!(" ({} files, {} MiB)", d.files, mib(d.bytes))
            } else {
                String::new()
            }
        ));
    }
    sh.err(ran_cached_line(&job.actions));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::farm::job_watch::Emit;

    #[test]
    fn a_broken_watch_warns_once_at_length() {
        let mut sh = Shell::memory();
        for again in [false, true] {
            show_progress(
                &mut sh,
                &RunProgress::Lost {
                    job_id: "j1".into(),
                    why: "connection reset".into(),
                    again,
                },
            );
        }
        show_progress(
            &mut sh,
            &RunProgress::Resumed {
                job_id: "j1".into(),
            },
        );
        show_progress(
            &mut sh,
            &RunProgress::Event(Emit::Stdout(b"[linux/arm64] hi\n".to_vec())),
        );
        assert_eq!(
            sh.stderr().lines().collect::<Vec<_>>(),
            [
                "lost the watch of job j1 (connection reset); reconnecting for up to 2m; \
                 output written meanwhile may be missing",
                "lost the watch of job j1 again (connection reset); reconnecting",
                "watching job j1 again",
            ]
        );
        assert_eq!(sh.stdout(), "[linux/arm64] hi\n");
    }
}
