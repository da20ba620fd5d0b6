//! How late a node's fan-out runs: what publishers' backpressure
//! (`api.backpressure`) waits on.
//!
//! Lateness shows where sessions take publications from their outboxes: the
//! oldest publication a session takes has waited since it was published, and
//! that wait is what its client sees added to every message. Each lane keeps
//! the share of recent takes that came later than `max_delay`, as a moving
//! average over takes, so a lane is **behind** when most of its sessions
//! take their publications late:
//!
//! - a whole thread that cannot keep up (more to write than it has time
//!   for) shows in every session, and trips it;
//! - one client that stopped reading shows in its own session alone, which
//!   is one take among the lane's many: it never trips it (that session
//!   is the slow-consumer policy's, see the hub's "Lag policy");
//! - a lane whose last late take is older than [`FRESH`] has nothing waiting
//!   late any more: it is not behind, however its average was left.
//!
//! A lane's takes happen on its own thread, so each lane has one writer:
//! plain loads and stores, no read-modify-write on the fan-out path.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The average's scale: `ONE` is every take late.
const ONE: u32 = 1 << 16;
/// Each take moves the average by 1/16 of the way: about the last few dozen
/// takes count.
const WEIGHT_SHIFT: u32 = 4;
/// How long a late take keeps a lane behind when no take follows it.
pub const FRESH: Duration = Duration::from_secs(1);

/// One lane's lateness.
#[derive(Debug, Default)]
pub(super) struct Lateness {
    /// The share of recent takes that were late, in `ONE`ths.
    late_share: AtomicU32,
    /// When the last late take was, in ms since the Unix epoch.
    late_at_ms: AtomicU64,
}

thread_local! {
    /// The lateness of the lane this thread serves, and the delay past
    /// which its takes are late (ms; 0: nothing is measured).
    static CURRENT: RefCell<Option<(Arc<Lateness>, Arc<AtomicU64>)>> = const { RefCell::new(None) };
}

impl Lateness {
    /// Makes `lateness` the one this thread's takes count into, late past
    /// `max_delay_ms` (read at each take, so a reload changes it).
    pub(super) fn serve_on_this_thread(lateness: Arc<Lateness>, max_delay_ms: Arc<AtomicU64>) {
        CURRENT.set(Some((lateness, max_delay_ms)));
    }

    /// A session on this thread took publications, the oldest published at
    /// `published_at_ms`, at `now_ms`.
    pub(super) fn took(published_at_ms: u64, now_ms: impl FnOnce() -> u64) {
        CURRENT.with_borrow(|current| {
            let Some((lateness, max_delay_ms)) = current else {
                return;
            };
            let max_delay_ms = max_delay_ms.load(Ordering::Relaxed);
            if max_delay_ms == 0 || published_at_ms == 0 {
                return;
            }
            let now_ms = now_ms();
            let late = now_ms.saturating_sub(published_at_ms) > max_delay_ms;
            lateness.record(late, now_ms);
        });
    }

    fn record(&self, late: bool, now_ms: u64) {
        let share = self.late_share.load(Ordering::Relaxed);
        // A fraction of the gap, and at least one step while there is one,
        // so the share reaches both ends.
        let step = |gap: u32| (gap >> WEIGHT_SHIFT).max(u32::from(gap > 0));
        let moved = if late {
            share + step(ONE - share)
        } else {
            share - step(share)
        };
        self.late_share.store(moved, Ordering::Relaxed);
        if late {
            self.late_at_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// The share of recent takes that were late (0 to 1), or 0 when the
    /// last late one is older than [`FRESH`].
    pub(super) fn late_share(&self, now_ms: u64) -> f64 {
        let late_at = self.late_at_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(late_at) > FRESH.as_millis() as u64 {
            return 0.0;
        }
        f64::from(self.late_share.load(Ordering::Relaxed)) / f64::from(ONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_takes_late_is_behind_and_one_slow_session_is_not() {
        let lane = Lateness::default();
        let now = 1_000_000;
        // A thousand sessions on time, one of them late every time.
        for i in 0..1000 {
            lane.record(i % 100 == 0, now);
        }
        assert!(lane.late_share(now) < 0.1, "{}", lane.late_share(now));
        // Then the whole lane falls behind.
        for _ in 0..40 {
            lane.record(true, now);
        }
        assert!(lane.late_share(now) > 0.9, "{}", lane.late_share(now));
        // Caught up: takes on time bring it down again.
        for _ in 0..40 {
            lane.record(false, now);
        }
        assert!(lane.late_share(now) < 0.1, "{}", lane.late_share(now));
    }

    #[test]
    fn a_late_share_left_without_takes_goes_stale() {
        let lane = Lateness::default();
        for _ in 0..100 {
            lane.record(true, 5_000);
        }
        assert!(lane.late_share(5_000) > 0.99);
        assert!(lane.late_share(5_000 + FRESH.as_millis() as u64) > 0.99);
        assert_eq!(lane.late_share(5_001 + FRESH.as_millis() as u64), 0.0);
    }

    #[test]
    fn the_share_stays_within_bounds_whatever_the_takes() {
        let lane = Lateness::default();
        let mut seed = 7u64;
        for _ in 0..100_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            lane.record(seed >> 63 == 1, 1);
            let share = lane.late_share(1);
            assert!((0.0..=1.0).contains(&share), "{share}");
        }
        for _ in 0..1000 {
            lane.record(true, 1);
        }
        assert_eq!(lane.late_share(1), 1.0);
        for _ in 0..1000 {
            lane.record(false, 1);
        }
        assert_eq!(lane.late_share(1), 0.0);
    }
}
