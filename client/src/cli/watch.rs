//! How the command line shows a followed job of step sets (go-test, ginkgo) and a cancel
//! after Ctrl-C (every recipe): one line per finished shard, or with `-v` every state change
//! and the shards' raw output.
use super::shell::Shell;
use crate::farm::cancel::InterruptCancel;
use crate::farm::job_watch::progress_line;
use crate::gotest::watch::WatchProgress;

/// The line saying how a cancel after Ctrl-C went.
pub fn interrupt_cancel_line(c: &InterruptCancel) -> String {
    match c {
        InterruptCancel::Cancelled { job_id, actions } => format!(
            "cancelled {actions} unfinished action{} of job {job_id}",
            if *actions == 1 { "" } else { "s" }
        ),
        InterruptCancel::Failed(e) => e.clone(),
        InterruptCancel::NoAnswer { job_id } => {
            format!("failed to cancel job {job_id}: no answer in 10s")
        }
    }
}

/// Shows a step job's progress: quiet, a line per finished shard; verbose, what `farm run`
/// shows. A resumed watch says nothing (the lost one said it reconnects).
pub fn show_watch(sh: &mut Shell, verbose: bool, p: &WatchProgress) {
    match p {
        WatchProgress::ShardFinished(a) if !verbose => {
            let steps = a.step_names.len();
            sh.err(format!(
                "{} ({} package{})",
                progress_line(a),
                steps,
                if steps == 1 { "" } else { "s" }
            ));
        }
        WatchProgress::ShardFinished(_) => {}
        WatchProgress::Event(e) if verbose => sh.emit(e),
        WatchProgress::Event(_) => {}
        WatchProgress::Cancelling { job_id } => {
            sh.err(format!(
                "cancelling job {job_id} (Ctrl-C again to stop watching)"
            ));
        }
        WatchProgress::Cancelled(c) => sh.err(interrupt_cancel_line(c)),
        WatchProgress::Lost { job_id, why } => {
            sh.err(format!(
                "lost the watch of job {job_id} ({why}); reconnecting"
            ));
        }
        WatchProgress::Resumed { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::farm::job_watch::Emit;
    use archfarm_proto::v1::{ActionState, ActionStatus};

    #[test]
    fn quiet_shows_finished_shards_and_verbose_the_events() {
        let shard = WatchProgress::ShardFinished(Box::new(ActionStatus {
            platform: "linux/arm64".into(),
            state: ActionState::Cancelled as i32,
            reason: "by Ctrl-C".into(),
            step_names: vec!["a".into(), "b".into()],
            ..Default::default()
        }));
        let output = WatchProgress::Event(Emit::Stdout(b"[linux/arm64] ok\n".to_vec()));
        let mut quiet = Shell::memory();
        let mut verbose = Shell::memory();
        for p in [&shard, &output] {
            show_watch(&mut quiet, false, p);
            show_watch(&mut verbose, true, p);
        }
        assert_eq!(
            quiet.stderr(),
            "[linux/arm64] cancelled: by Ctrl-C (2 packages)\n"
        );
        assert_eq!(quiet.stdout(), "");
        assert_eq!(verbose.stdout(), "[linux/arm64] ok\n");
        assert_eq!(verbose.stderr(), "");
    }

    #[test]
    fn cancels_after_ctrl_c_say_how_they_went() {
        let mut sh = Shell::memory();
        show_watch(
            &mut sh,
            false,
            &WatchProgress::Cancelling {
                job_id: "j1".into(),
            },
        );
        show_watch(
            &mut sh,
            false,
            &WatchProgress::Cancelled(InterruptCancel::Cancelled {
                job_id: "j1".into(),
                actions: 1,
            }),
        );
        assert_eq!(
            sh.stderr(),
            "cancelling job j1 (Ctrl-C again to stop watching)\n\
             cancelled 1 unfinished action of job j1\n"
        );
        assert_eq!(
            interrupt_cancel_line(&InterruptCancel::NoAnswer {
                job_id: "j2".into()
            }),
            "failed to cancel job j2: no answer in 10s"
        );
    }
}
