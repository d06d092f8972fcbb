//! Following a go-test job to its end: quiet by default (one line per finished shard), the
//! shards' raw output and every state change with `-v` (through `farm run`'s [`JobWatch`]).
//! A broken stream is watched again for a while; Ctrl-C cancels the job, twice gives up.
use crate::farm::display::{format_ms, is_final};
use crate::farm::run::{progress_line, Emit, JobWatch, REWATCH_FOR};
use crate::farm::{FarmClient, WatchPoint};
use anyhow::{bail, Context};
use archfarm_proto::v1::{job_event, ActionStatus, JobStatus};
use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

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

/// Follows job `job_id` until every action is final; returns its final status.
pub async fn follow_job(
    client: &mut FarmClient,
    job_id: &str,
    verbosity: Verbosity,
) -> anyhow::Result<JobStatus> {
    let mut watch = JobWatch::default();
    let mut lines = ShardLines::default();
    let mut stream = Some(
        client
            .watch_job(job_id, WatchPoint::default())
            .await
            .with_context(|| format!("failed to watch job {job_id}"))?,
    );
    let mut interrupts = 0;
    let mut broken_since: Option<Instant> = None;
    loop {
        let Some(s) = stream.as_mut() else {
            let since = *broken_since.get_or_insert_with(Instant::now);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let error = match client.reconnect().await {
                Err(e) => format!("{e:#}"),
                Ok(()) => match crate::farm::job::get_job(client, job_id).await {
                    Ok(job) if job.finished => {
                        if verbosity == Verbosity::Verbose {
                            print(watch.on_finished(&job));
                        }
                        return Ok(job);
                    }
                    Ok(_) => match client.watch_job(job_id, watch.point()).await {
                        Ok(s) => {
                            stream = Some(s);
                            broken_since = None;
                            continue;
                        }
                        Err(e) => e.to_string(),
                    },
                    Err(e) => format!("{e:#}"),
                },
            };
            if since.elapsed() > REWATCH_FOR {
                bail!(
                    "failed to watch job {job_id} again within {}: {error}",
                    format_ms(REWATCH_FOR.as_millis() as u64)
                );
            }
            continue;
        };
        let message = tokio::select! {
            m = s.message() => m,
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                if interrupts >= 2 {
                    bail!("interrupted again; stopped watching job {job_id}");
                }
                eprintln!("cancelling job {job_id} (Ctrl-C again to stop watching)");
                if let Err(e) = crate::farm::cancel::cancel_job(client, job_id, "cancelled by Ctrl-C in `farm go-test`").await {
                    eprintln!("{e:#}");
                }
                continue;
            }
        };
        match message {
            Ok(Some(event)) => {
                if let Some(job_event::Kind::Action(a)) = &event.kind {
                    if verbosity == Verbosity::Quiet {
                        lines.on_status(a);
                    }
                }
                let (emits, finished) = watch.on_event(event);
                if verbosity == Verbosity::Verbose {
                    print(emits);
                }
                if let Some(job) = finished {
                    if verbosity == Verbosity::Quiet {
                        for a in &job.actions {
                            lines.on_status(a);
                        }
                    }
                    return Ok(job);
                }
            }
            Ok(None) | Err(_) => {
                if broken_since.is_none() {
                    eprintln!("lost the watch of job {job_id}; reconnecting");
                }
                stream = None;
            }
        }
    }
}
