//! `archfarm cancel JOB`: stops a job's unfinished actions.
use super::{rpc, FarmClient};
use anyhow::Context;
use archfarm_proto::v1;

/// `archfarm cancel JOB [--reason TEXT]`.
#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The job's id.
    pub job_id: String,
    /// Why; recorded on each cancelled action.
    #[arg(long, default_value = "cancelled with `archfarm cancel`")]
    pub reason: String,
}

/// Cancels the job and says how many actions that stopped.
pub async fn command(client: &mut FarmClient, args: &CancelArgs) -> anyhow::Result<u8> {
    let cancelled = cancel_job(client, &args.job_id, &args.reason).await?;
    println!(
        "cancelled {cancelled} action{} of job {}",
        if cancelled == 1 { "" } else { "s" },
        args.job_id
    );
    Ok(0)
}

/// Jobs.CancelJob; returns how many actions were cancelled.
pub async fn cancel_job(
    client: &mut FarmClient,
    job_id: &str,
    reason: &str,
) -> anyhow::Result<u32> {
    Ok(rpc(client
        .jobs
        .cancel_job(v1::CancelJobRequest {
            job_id: job_id.to_string(),
            reason: reason.to_string(),
        })
        .await)
    .with_context(|| format!("failed to cancel job {job_id}"))?
    .cancelled)
}

/// How cancelling a job after a Ctrl-C went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterruptCancel {
    /// The coordinator cancelled this many unfinished actions.
    Cancelled {
        /// The job.
        job_id: String,
        /// Actions cancelled.
        actions: u32,
    },
    /// The coordinator refused or could not be reached: the error's words.
    Failed(String),
    /// No answer within [`INTERRUPT_CANCEL_TIMEOUT`].
    NoAnswer {
        /// The job.
        job_id: String,
    },
}

/// How long a cancel after Ctrl-C may take.
pub const INTERRUPT_CANCEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Cancels `job_id` after a Ctrl-C (at most [`INTERRUPT_CANCEL_TIMEOUT`]); says how it went.
pub async fn cancel_after_interrupt(
    client: &mut FarmClient,
    job_id: &str,
    reason: &str,
) -> InterruptCancel {
    let cancel = cancel_job(client, job_id, reason);
    match tokio::time::timeout(INTERRUPT_CANCEL_TIMEOUT, cancel).await {
        Ok(Ok(actions)) => InterruptCancel::Cancelled {
            job_id: job_id.to_string(),
            actions,
        },
        Ok(Err(e)) => InterruptCancel::Failed(format!("{e:#}")),
        Err(_) => InterruptCancel::NoAnswer {
            job_id: job_id.to_string(),
        },
    }
}
