//! Deadlines that reuse their timers.
//!
//! Every proxied request sets two deadlines: hyper's for the next request
//! head (`limits.header_timeout`, also the keep-alive idle timeout) and
//! pushgate's for the app's answer (`upstream.timeout`). A fresh tokio timer
//! for each costs a clock read, an insertion into the runtime's timer wheel
//! under its lock, and a removal when the request is done: about 2,000
//! instructions a deadline, a seventh of pushgate's own work per request
//! (docs/perf-log/2026-12-03-fewer-instructions-per-request.md).
//!
//! A shard thread keeps the timers of finished deadlines instead. A timer
//! still in the wheel whose deadline moves later is only marked with the new
//! time (tokio re-files it when the old time comes), so a reused timer costs
//! a clock read and one atomic update. Timers belong to the runtime that made
//! them, so only a thread that runs one runtime for its whole life may keep
//! them: [`keep_on_this_thread`] says so, and [`release_kept`] lets them go
//! before that runtime stops. Elsewhere a [`Deadline`] is a plain timer.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Most timers a thread keeps for reuse: about as many as requests it has in
/// flight at once, beyond which a burst's timers are simply dropped. A kept
/// timer is about 200 bytes.
const MAX_KEPT: usize = 1024;

thread_local! {
    /// `None` on threads that do not keep timers.
    static KEPT: RefCell<Option<Vec<Pin<Box<Sleep>>>>> = const { RefCell::new(None) };
}

/// Lets this thread keep the timers of finished deadlines, for a runtime
/// that runs on this thread alone until [`release_kept`].
pub fn keep_on_this_thread() {
    KEPT.with(|kept| *kept.borrow_mut() = Some(Vec::new()));
}

/// Drops this thread's kept timers and keeps no more; call it while their
/// runtime still runs.
pub fn release_kept() {
    let timers = KEPT.with(|kept| kept.borrow_mut().take());
    drop(timers);
}

/// How far down the kept timers [`take_kept`] looks.
const LOOK_DOWN: usize = 4;

/// A kept timer set no later than `deadline`, from near the top (most
/// recently kept) of the stack. Moving a timer later is the cheap update;
/// moving it earlier files it again. Deadlines of one length come back in
/// order, so the top few hold one for each length in use.
fn take_kept(kept: &mut Vec<Pin<Box<Sleep>>>, deadline: Instant) -> Option<Pin<Box<Sleep>>> {
    let from = kept.len().saturating_sub(LOOK_DOWN);
    let found = kept[from..]
        .iter()
        .rposition(|sleep| sleep.deadline() <= deadline)
        .map_or(kept.len().checked_sub(1)?, |at| from + at);
    Some(kept.swap_remove(found))
}

/// A future that resolves at its deadline, on a kept timer when the thread
/// has one. Its timer goes back to the thread when it is dropped.
pub struct Deadline {
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Deadline {
    /// Resolves `duration` from now.
    pub fn after(duration: Duration) -> Deadline {
        Deadline::at(Instant::now() + duration)
    }

    /// Resolves at `deadline`.
    pub fn at(deadline: Instant) -> Deadline {
        let kept = KEPT.with(|kept| {
            kept.borrow_mut()
                .as_mut()
                .and_then(|kept| take_kept(kept, deadline))
        });
        let sleep = match kept {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Deadline { sleep: Some(sleep) }
    }

    /// Moves the deadline.
    pub fn reset(&mut self, deadline: Instant) {
        self.timer().reset(deadline);
    }

    /// When it resolves.
    #[cfg(test)]
    pub fn deadline(&self) -> Instant {
        self.sleep.as_ref().expect(TAKEN_ON_DROP).deadline()
    }

    fn timer(&mut self) -> Pin<&mut Sleep> {
        self.sleep.as_mut().expect(TAKEN_ON_DROP).as_mut()
    }
}

/// Why a [`Deadline`]'s timer is always there: it is an `Option` only so
/// that `drop` can hand it back.
const TAKEN_ON_DROP: &str = "a deadline's timer is taken only when it is dropped";

impl Future for Deadline {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.timer().poll(cx)
    }
}

/// `future`'s output, or `None` when `duration` passes first:
/// `tokio::time::timeout` on a [`Deadline`], so that a deadline set for
/// every request or connect takes a kept timer. The deadline is set when
/// this is called. A plain struct rather than an `async fn`, which would
/// hold `future` twice (as its argument and as what it awaits): this sits
/// in every proxied request's future.
pub fn within<F: Future>(duration: Duration, future: F) -> Within<F> {
    Within {
        future,
        deadline: Deadline::after(duration),
    }
}

pin_project_lite::pin_project! {
    /// The future [`within`] returns.
    pub struct Within<F> {
        #[pin]
        future: F,
        deadline: Deadline,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The future first: an output ready at the deadline is not lost.
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(this.deadline).poll(cx).map(|()| None)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let Some(mut sleep) = self.sleep.take() else {
            return;
        };
        // During the thread's teardown the store may be gone, and on a
        // thread that keeps none there is none: then the timer is dropped.
        let _ = KEPT.try_with(|kept| {
            let Ok(mut kept) = kept.try_borrow_mut() else {
                return;
            };
            if let Some(kept) = kept.as_mut().filter(|kept| kept.len() < MAX_KEPT) {
                // The timer holds the waker of the task that last waited on
                // it, and with it that task's memory: swap in one that holds
                // nothing.
                let _ = sleep.as_mut().poll(&mut Context::from_waker(Waker::noop()));
                kept.push(sleep);
            }
        });
    }
}

/// hyper's timer for HTTP/1 connections: its head deadlines are [`Deadline`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct HyperTimer;

impl hyper::rt::Sleep for Deadline {}

impl hyper::rt::Timer for HyperTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::after(duration))
    }

    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline::at(deadline.into()))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, new_deadline: std::time::Instant) {
        match sleep.as_mut().downcast_mut_pin::<Deadline>() {
            Some(deadline) => deadline.get_mut().reset(new_deadline.into()),
            None => *sleep = self.sleep_until(new_deadline),
        }
    }

    fn now(&self) -> std::time::Instant {
        Instant::now().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept() -> usize {
        KEPT.with(|kept| kept.borrow().as_ref().map_or(0, Vec::len))
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_timer_fires_at_its_new_deadline_earlier_or_later() {
        keep_on_this_thread();
        let start = Instant::now();
        Deadline::after(Duration::from_secs(5)).await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(kept(), 1, "the finished deadline's timer is kept");

        // A pending deadline given back, then its timer reused: later, then
        // earlier than the time it was filed for.
        for (set, wait) in [(30, 40), (1, 2)] {
            let pending = Deadline::after(Duration::from_secs(set));
            drop(pending);
            assert_eq!(kept(), 1);
            let reused = Deadline::after(Duration::from_secs(wait));
            assert_eq!(kept(), 0, "the kept timer is taken");
            let from = Instant::now();
            reused.await;
            assert_eq!(from.elapsed(), Duration::from_secs(wait));
        }
        release_kept();
        assert_eq!(kept(), 0);
        Deadline::after(Duration::from_millis(1)).await;
        assert_eq!(kept(), 0, "after release, nothing is kept");
    }

    /// Which timer a deadline runs on.
    fn timer_of(deadline: &Deadline) -> *const Sleep {
        deadline
            .sleep
            .as_deref()
            .map_or(std::ptr::null(), |sleep| sleep as *const Sleep)
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_is_taken_that_need_only_move_later() {
        keep_on_this_thread();
        let now = Instant::now();
        let at = |secs| Deadline::at(now + Duration::from_secs(secs));
        let (long, short) = (at(30), at(10));
        let (due_30, due_10) = (timer_of(&long), timer_of(&short));
        drop(short);
        drop(long);
        assert_eq!(kept(), 2);
        // The most recently kept is due at 30 s: a deadline at 20 s passes
        // it over for the one due at 10 s, and one at 35 s takes it.
        let (at_20, at_35) = (at(20), at(35));
        assert_eq!(kept(), 0);
        assert_eq!(timer_of(&at_20), due_10);
        assert_eq!(timer_of(&at_35), due_30);
        assert_eq!(at_20.deadline(), now + Duration::from_secs(20));
        drop(at_35);
        drop(at_20);
        // None is due before 5 s: the top one is taken and filed earlier.
        let at_5 = at(5);
        assert_eq!(timer_of(&at_5), due_10);
        assert_eq!(kept(), 1);
        release_kept();
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_limit_is_kept() {
        keep_on_this_thread();
        let deadlines: Vec<_> = (0..MAX_KEPT + 10)
            .map(|_| Deadline::after(Duration::from_secs(1)))
            .collect();
        drop(deadlines);
        assert_eq!(kept(), MAX_KEPT);
        release_kept();
    }

    #[tokio::test(start_paused = true)]
    async fn within_gives_the_output_or_none_at_the_deadline() {
        keep_on_this_thread();
        let start = Instant::now();
        assert_eq!(within(Duration::from_secs(5), async { 7 }).await, Some(7));
        let late = tokio::time::sleep(Duration::from_secs(10));
        assert_eq!(within(Duration::from_secs(5), late).await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(kept(), 1, "both deadlines ran on one kept timer");
        // Ready at the deadline itself: the output wins.
        let on_time = tokio::time::sleep(Duration::from_secs(5));
        assert_eq!(within(Duration::from_secs(5), on_time).await, Some(()));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        release_kept();
    }

    #[tokio::test]
    async fn a_thread_that_keeps_none_drops_its_timers() {
        Deadline::after(Duration::from_millis(1)).await;
        assert_eq!(kept(), 0);
    }
}
