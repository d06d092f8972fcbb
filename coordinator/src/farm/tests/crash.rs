//! An assignment that goes out before its commit, and what a crash before that commit makes
//! of its lease: the fence is never handed out again and the agent's result is refused in
//! the acknowledgement, like a stale one, instead of ending its session.
use super::*;
use crate::store::disk_image::DiskImage;

#[test]
fn an_early_assignment_lost_in_a_crash_is_answered_not_recorded_and_its_fence_never_returns() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    let first = h.submit(&["linux/arm64"], false, 0);
    // The first fence reserves a block: nothing is durable yet, so this assignment waits.
    assert!(
        h.rx.get_mut("a").unwrap().try_recv().is_err(),
        "an assignment went out before the fence ceiling was durable"
    );
    let f1 = h.assigns("a")[0].1;
    h.complete("a", &format!("{first}/linux/arm64"), f1, 0, 1);
    assert_eq!(h.acks("a"), vec![(true, String::new())]);

    // A job no agent serves yet, committed: durable and queued.
    let queued = h.submit(&["linux/s390x"], false, 2);
    let id = format!("{queued}/linux/s390x");
    h.farm.commit().unwrap();
    let state = h._dir.path().join("state");
    let image = DiskImage::capture(&state).unwrap();

    // An agent for it joins: the assignment goes out at once, before any commit.
    h.join("b", &[("linux/s390x", false)], 3);
    let early = match h.rx.get_mut("b").unwrap().try_recv() {
        Ok(AgentCommand::Assign { action, fence, .. }) => (action.id.0.clone(), fence),
        other => panic!("expected an assignment before the commit, got {other:?}"),
    };
    assert_eq!(early.0, id);
    assert!(early.1 > f1);

    // The coordinator dies before its next flush.
    let crashed = h._dir.path().join("crashed");
    image.restore(&crashed).unwrap();
    let cas = h.farm.cas.clone();
    h.farm = Farm::load(
        Store::open(&crashed).unwrap(),
        cas,
        FarmConfig::default(),
        10,
    )
    .unwrap();
    assert_eq!(
        h.state(&id).state,
        ActionState::Queued,
        "the lost lease is gone"
    );
    // b comes back (serving another platform for now, so the job stays queued) and reports
    // the lost lease it still ran: answered, nothing recorded.
    h.join("b", &[("linux/riscv64", false)], 10);
    h.complete("b", &id, early.1, 0, 11);
    let acks = h.acks("b");
    assert_eq!(acks.len(), 1);
    assert!(!acks[0].0);
    assert!(
        acks[0].1.contains(&format!("stale fence {}", early.1)) && acks[0].1.contains("queued"),
        "{}",
        acks[0].1
    );
    assert_eq!(h.state(&id).state, ActionState::Queued);
    assert_eq!(h.state(&id).attempts, 0);
    // So is a result for an action whose job the crash lost, under an earlier run's fence.
    h.complete("b", "j-999999/linux/s390x", early.1, 0, 11);
    let acks = h.acks("b");
    assert_eq!(acks.len(), 1);
    assert!(!acks[0].0);
    assert!(acks[0].1.contains("lost with it"), "{}", acks[0].1);

    // Placed again: under a new fence, and its result is recorded as usual.
    h.join("b", &[("linux/s390x", false)], 12);
    let again = h.assigns("b");
    assert_eq!(again.len(), 1);
    assert!(
        again[0].1 > early.1,
        "fence {} was handed out again",
        early.1
    );
    h.complete("b", &id, again[0].1, 0, 13);
    assert_eq!(h.acks("b"), vec![(true, String::new())]);
    assert_eq!(h.state(&id).state, ActionState::Succeeded);
}

#[test]
fn an_assignment_does_not_wait_for_the_commit_that_stores_its_composed_root() {
    let mut h = Harness::new();
    h.join("a", &[("linux/arm64", false)], 0);
    let first = h.submit(&["linux/arm64"], false, 0);
    let f1 = h.assigns("a")[0].1;
    h.complete("a", &format!("{first}/linux/arm64"), f1, 0, 1);
    assert_eq!(h.acks("a"), vec![(true, String::new())]);
    // A plan composed a root: staged for the next commit, pending for readers.
    let root = crate::cas::VerifiedBlob::check(Digest::of(b"root"), b"root".to_vec()).unwrap();
    let d = root.digest();
    h.farm.stage_blobs(vec![root]);
    assert!(h.farm.cas.pending().any_pending(&[d]));
    h.submit(&["linux/arm64"], false, 2);
    assert!(
        matches!(
            h.rx.get_mut("a").unwrap().try_recv(),
            Ok(AgentCommand::Assign { .. })
        ),
        "the assignment waited for the commit"
    );
    assert!(!h.farm.cas.contains(&d));
    h.farm.commit().unwrap();
    assert!(h.farm.cas.contains(&d), "the commit stores the root");
    assert!(!h.farm.cas.pending().any_pending(&[d]), "and readers go on");
}
