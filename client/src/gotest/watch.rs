//! Following a go-test job to its end: quiet by default (one line per finished shard), the
//! shards' raw output and every state change with `-v` (through `farm run`'s [`JobWatch`]).
//! A broken stream is watched again for a while; Ctrl-C cancels the job, twice gives up.
use crate::farm::display::is_final;
use crate::farm::job_watch::{progress_line, Emit, JobWatch};
use crate::farm::run::cancel_on_interrupt;
use crate::farm::watch::{CtrlC, JobEvents, Watched};
use crate::farm::FarmClient;
use anyhow::bail;
use archfarm_proto::v1::{job_event, ActionStatus, JobStatus};
use std::collections::HashSet;
use std::io::Write;

/// How much a watch prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// A line per finished shard.
    Quiet,
    /// Every state change and the shards' output.
    Verbose,
}

fn print(emits: Vec<Emit>) {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    for e in emits {
        let _ = match e {
            Emit::Stdout(b) => stdout.write_all(&b),
            Emit::Stderr(b) => stderr.write_all(&b),
            Emit::Progress(s) => writeln!(stderr, "{s}"),
        };
    }
}

/// Prints final states once each, in quiet mode.
#[derive(Default)]
struct ShardLines {
    done: HashSet<String>,
}

impl ShardLines {
    fn on_status(&mut self, a: &ActionStatus) {
        if is_final(a.state()) && self.done.insert(a.action_id.clone()) {
            let steps = a.step_names.len();
            eprintln!(
                "{} ({} package{})",
                progress_line(a),
                steps,
                if steps == 1 { "" } else { "s" }
            );
        }
    }
}

/// Follows job `job_id` until every action is final; returns its final status. Ctrl-C
/// cancels the job; a second one gives up.
pub async fn follow_job(
    client: &mut FarmClient,
    job_id: &str,
    verbosity: Verbosity,
) -> anyhow::Result<JobStatus> {
    let mut watch = JobWatch::default();
    let mut lines = ShardLines::default();
    let mut events = JobEvents::open(client, job_id).await?;
    let mut ctrl_c = CtrlC::default();
    loop {
        let watched = tokio::select! {
            w = events.next() => w?,
            n = ctrl_c.pressed() => {
                if n >= 2 {
                    bail!("interrupted again; stopped watching job {job_id}");
                }
                eprintln!("cancelling job {job_id} (Ctrl-C again to stop watching)");
                cancel_on_interrupt(client, job_id, "cancelled by Ctrl-C in `archfarm go-test`").await;
                continue;
            }
        };
        let finished = match watched {
            Watched::Event(event) => {
                if let Some(job_event::Kind::Action(a)) = &event.kind {
                    if verbosity == Verbosity::Quiet {
                        lines.on_status(a);
                    }
                }
                let (emits, finished) = watch.on_event(event);
                if verbosity == Verbosity::Verbose {
                    print(emits);
                }
                finished
            }
            Watched::FinishedMeanwhile(job) => {
                if verbosity == Verbosity::Verbose {
                    print(watch.on_finished(&job));
                }
                Some(job)
            }
            Watched::Lost(why) => {
                eprintln!("lost the watch of job {job_id} ({why}); reconnecting");
                None
            }
            Watched::Resumed => None,
        };
        if let Some(job) = finished {
            if verbosity == Verbosity::Quiet {
                for a in &job.actions {
                    lines.on_status(a);
                }
            }
            return Ok(job);
        }
    }
}
