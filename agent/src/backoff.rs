//! Exponential backoff with jitter between reconnect attempts, shared by join and the session loop.
use rand::Rng;
use std::time::Duration;

/// First delay after a failure.
pub const MIN_DELAY: Duration = Duration::from_millis(250);
/// Largest delay between attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// Delays that double from `MIN_DELAY` up to `MAX_DELAY`, each jittered by ±20 %.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: MIN_DELAY }
    }
}

impl Backoff {
    /// The delay to wait now; the following one is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        base.mul_f64(rand::thread_rng().gen_range(0.8..1.2))
    }

    /// Jumps to the cap: used when retrying soon cannot help (e.g. a revoked certificate).
    pub fn to_max(&mut self) {
        self.next = MAX_DELAY;
    }

    /// Starts again from the shortest delay (after a session that worked).
    pub fn reset(&mut self) {
        self.next = MIN_DELAY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::default();
        let first = b.next_delay();
        assert!(first >= MIN_DELAY.mul_f64(0.8) && first <= MIN_DELAY.mul_f64(1.2));
        for _ in 0..10 {
            b.next_delay();
        }
        let late = b.next_delay();
        assert!(late >= MAX_DELAY.mul_f64(0.8) && late <= MAX_DELAY.mul_f64(1.2));
        b.reset();
        assert!(b.next_delay() <= MIN_DELAY.mul_f64(1.2));
        b.to_max();
        assert!(b.next_delay() >= MAX_DELAY.mul_f64(0.8));
    }
}
