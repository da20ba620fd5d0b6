//! Timing: pacing a connection's writes, and jitter for retries.

use std::time::Duration;

/// A duration with jitter in `[d/2, d]`, so clients told to come back do
/// not all come back at once.
pub(super) fn jittered(duration: Duration) -> Duration {
    use rand::Rng;
    let millis = duration.as_millis().max(2) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

/// Paces one connection's writes (`realtime.coalesce_window`): when messages
/// come closer together than the window, the next write waits until a window
/// has passed since the last one and carries everything queued by then. The
/// first message after a quiet spell is written at once, so pacing costs
/// latency only under load, and at most one window.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    /// The window in microseconds (saturated at about 71 minutes): every
    /// connection holds a pace, and its state is 8 bytes smaller than with
    /// a `Duration` (it sits in the WebSocket task, see `websocket::run`).
    window_us: u32,
    pub(super) last_write: Option<tokio::time::Instant>,
    /// A write is being held back until the window has passed.
    pub(super) holding: bool,
}

impl Pace {
    pub(super) fn new(window: Duration) -> Pace {
        Pace {
            window_us: u32::try_from(window.as_micros()).unwrap_or(u32::MAX),
            last_write: None,
            holding: false,
        }
    }

    /// The outbox woke the connection, or the hold it asked for ended, at
    /// `now`: `None` to write at once, or the instant to hold the write
    /// until. A wake-up while holding (the outbox half full, lagging or
    /// closed) ends the hold, and an `urgent` outbox
    /// ([`crate::hub::Outbox::is_urgent`]) is never held: write at once.
    /// `urgent` is asked only when the write would otherwise be held, so a
    /// wake-up outside the window costs no look at the outbox.
    pub(super) fn on_wake(
        &mut self,
        now: tokio::time::Instant,
        urgent: impl FnOnce() -> bool,
    ) -> Option<tokio::time::Instant> {
        if std::mem::take(&mut self.holding) {
            return None;
        }
        let next = self.last_write? + Duration::from_micros(self.window_us.into());
        self.holding = next > now && !urgent();
        self.holding.then_some(next)
    }

    pub(super) fn holding(&self) -> bool {
        self.holding
    }

    /// A write went out at `now`.
    pub(super) fn wrote(&mut self, now: tokio::time::Instant) {
        if self.window_us != 0 {
            self.last_write = Some(now);
        }
    }
}

/// What a paced connection waits on while it holds a write back: a timer
/// taken (a kept one, where the thread keeps them) when a hold starts and
/// given back when it ends, so an idle connection holds none. Pending for
/// as long as nothing is held.
#[derive(Default)]
pub(super) struct Hold(Option<crate::timer::Deadline>);

impl Hold {
    /// Holds until `at`.
    pub(super) fn until(&mut self, at: tokio::time::Instant) {
        match &mut self.0 {
            Some(deadline) => deadline.reset(at),
            None => self.0 = Some(crate::timer::Deadline::at(at)),
        }
    }

    /// The hold is over: its timer goes back.
    pub(super) fn release(&mut self) {
        self.0 = None;
    }
}

impl std::future::Future for Hold {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        match &mut self.0 {
            Some(deadline) => std::pin::Pin::new(deadline).poll(cx),
            None => std::task::Poll::Pending,
        }
    }
}

#[cfg(test)]
mod pace_tests {
    use super::Pace;
    use std::time::Duration;
    use tokio::time::Instant;

    #[test]
    fn the_first_write_goes_at_once_and_the_next_waits_out_the_window() {
        let mut pace = Pace::new(Duration::from_millis(10));
        let start = Instant::now();
        assert_eq!(pace.on_wake(start, || false), None);
        pace.wrote(start);
        let soon = start + Duration::from_millis(3);
        assert_eq!(
            pace.on_wake(soon, || false),
            Some(start + Duration::from_millis(10))
        );
        assert!(pace.holding());
        // The hold ends (its timer, or the outbox insisting): write.
        assert_eq!(pace.on_wake(soon, || false), None);
        assert!(!pace.holding());
        assert_eq!(
            pace.on_wake(start + Duration::from_millis(10), || false),
            None
        );
        assert_eq!(
            pace.on_wake(start + Duration::from_millis(25), || false),
            None
        );
    }

    /// The wake-up for a batch's first publication and the one for passing
    /// half full can arrive as one: an outbox already past half full is
    /// written at once, not held for the window.
    #[test]
    fn an_urgent_outbox_is_written_within_the_window() {
        let mut pace = Pace::new(Duration::from_secs(1));
        let start = Instant::now();
        pace.wrote(start);
        let soon = start + Duration::from_millis(3);
        assert_eq!(pace.on_wake(soon, || true), None);
        assert!(!pace.holding());
        // Outside the window the outbox is not asked at all.
        let later = start + Duration::from_secs(2);
        assert_eq!(
            pace.on_wake(later, || unreachable!("asked outside the window")),
            None
        );
    }

    #[test]
    fn a_zero_window_never_holds() {
        let mut pace = Pace::new(Duration::ZERO);
        let now = Instant::now();
        pace.wrote(now);
        assert_eq!(pace.on_wake(now, || false), None);
        assert!(!pace.holding());
    }
}
