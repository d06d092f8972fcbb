//! Fences: handed out from memory, reserved in the store a block at a time and ahead of need,
//! so that an assignment whose fence the store already covers can go out before the group
//! commit that records its lease (a crash loses that lease, never the fence's uniqueness).

/// Fences are reserved from the store this many at a time: the farm hands them out from
/// memory and writes a new ceiling (in a group commit) once per block, not one counter
/// update per placement.
pub(super) const FENCE_BLOCK: u64 = 4_096;

/// The fence counter as the farm keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fences {
    /// The highest fence handed out.
    issued: u64,
    /// The highest fence reserved (written, or about to be, as the store's ceiling).
    reserved: u64,
    /// The highest ceiling a flush has made durable: a restart starts past it, so a fence up
    /// to it is never handed out again, whatever the crash loses.
    durable: u64,
    /// The store's ceiling when this farm was loaded: fences up to it were handed out (or
    /// skipped) by an earlier run of the coordinator.
    before_start: u64,
}

impl Fences {
    /// The counter as the store holds it (the ceiling the last run reserved).
    pub(super) fn load(stored_ceiling: u64) -> Self {
        Self {
            issued: stored_ceiling,
            reserved: stored_ceiling,
            durable: stored_ceiling,
            before_start: stored_ceiling,
        }
    }

    /// The next fence, and a new ceiling for the store when this one starts a reservation: a
    /// block is reserved when half of the one before is used, so the commit that makes it
    /// durable is usually done before the first fence past the old ceiling is needed.
    pub(super) fn next(&mut self) -> (u64, Option<u64>) {
        self.issued += 1;
        let mut raised = None;
        if self.issued + FENCE_BLOCK / 2 > self.reserved {
            self.reserved = self.issued.max(self.reserved) + FENCE_BLOCK;
            raised = Some(self.reserved);
        }
        (self.issued, raised)
    }

    /// The highest fence handed out.
    pub(super) fn issued(&self) -> u64 {
        self.issued
    }

    /// A flush made this ceiling durable.
    pub(super) fn made_durable(&mut self, ceiling: u64) {
        self.durable = self.durable.max(ceiling);
    }

    /// Whether a restart can never hand out `fence` again (the store's durable ceiling
    /// covers it), so what carries it may be announced before its own commit.
    pub(super) fn durable_covers(&self, fence: u64) -> bool {
        fence <= self.durable
    }

    /// Whether an earlier run of the coordinator handed out `fence`: a lease under it may
    /// have been lost with that run (announced before its commit).
    pub(super) fn issued_before_start(&self, fence: u64) -> bool {
        fence != 0 && fence <= self.before_start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_grow_and_a_block_is_reserved_before_the_last_one_runs_out() {
        let mut f = Fences::load(0);
        let (first, raised) = f.next();
        assert_eq!((first, raised), (1, Some(FENCE_BLOCK + 1)));
        assert!(!f.durable_covers(1), "nothing is durable before a flush");
        f.made_durable(FENCE_BLOCK + 1);
        assert!(f.durable_covers(1));
        let mut raises = vec![];
        let mut last = first;
        for _ in 1..3 * FENCE_BLOCK {
            let (fence, raised) = f.next();
            assert_eq!(fence, last + 1, "fences are consecutive");
            last = fence;
            if let Some(c) = raised {
                // A new block is asked for while half of the durable one is still unused.
                assert!(
                    f.durable_covers(fence + FENCE_BLOCK / 2 - 1),
                    "{fence}: {c}"
                );
                raises.push(c);
                f.made_durable(c);
            }
            assert!(f.durable_covers(fence), "fence {fence} waits for no flush");
        }
        assert_eq!(raises.len(), 3, "one reservation per block: {raises:?}");
        assert_eq!(f.issued(), 3 * FENCE_BLOCK);
    }

    #[test]
    fn a_reload_starts_past_the_durable_ceiling_and_knows_what_came_before() {
        let mut f = Fences::load(0);
        let (_, raised) = f.next();
        let ceiling = raised.expect("the first fence reserves a block");
        // A restart reads the ceiling the store holds.
        let mut g = Fences::load(ceiling);
        let (fence, _) = g.next();
        assert!(
            fence > ceiling,
            "no fence of the earlier run is handed out again"
        );
        assert!(g.issued_before_start(1) && g.issued_before_start(ceiling));
        assert!(!g.issued_before_start(fence) && !g.issued_before_start(0));
        assert!(!f.issued_before_start(1), "a new store has no earlier run");
    }

    #[test]
    fn a_ceiling_made_durable_late_never_lowers_what_is_covered() {
        let mut f = Fences::load(10);
        f.made_durable(50);
        f.made_durable(20);
        assert!(f.durable_covers(50));
        assert!(!f.durable_covers(51));
    }
}
