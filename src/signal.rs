//! A wake-up for the one task that serves a session: its outbox has
//! something, or an order came for it.
//!
//! A flag and an `AtomicWaker`: no lock and no list of waiters. tokio's
//! `Notify` (which this replaces) took its lock on every wake and on every
//! poll of a waiting future, and a session's loop polls its waits once per
//! delivery, so on a channel with thousands of subscribers that was thousands
//! of lock round trips per publication. The price is that only one task may
//! wait on a signal at a time, which is how sessions use it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

/// Set by any number of senders, waited on by one task. A wake-up sent
/// while nobody waits is kept for the next wait; several make one.
#[derive(Default)]
pub struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub fn notify(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub fn poll_wait(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.set.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A notify between the check and the registration woke no one.
        if self.set.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    pub async fn wait(&self) {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await
    }
}

/// A wait that a `select!` loop or a hand-written stream keeps: it resolves
/// once per wake-up and may be polled again after that.
pub struct Wait(Arc<Signal>);

impl Wait {
    pub fn new(signal: Arc<Signal>) -> Wait {
        Wait(signal)
    }
}

impl Future for Wait {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_wait(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts how often it is woken.
    struct CountingWaker(AtomicUsize);

    impl std::task::Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_kept_wait_wakes_its_task_once_per_wake_up_and_keeps_an_early_one() {
        let signal = Arc::new(Signal::default());
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = Wait::new(signal.clone());

        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        signal.notify();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "the waiting task is woken"
        );
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
        // Fired once; the same wait can be polled again.
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());

        // Wake-ups while nobody waits are kept for the next wait, and two
        // make one.
        drop(wait);
        signal.notify();
        signal.notify();
        let mut wait = Wait::new(signal.clone());
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
    }

    #[tokio::test]
    async fn a_notify_from_another_thread_ends_the_wait() {
        let signal = Arc::new(Signal::default());
        let sender = signal.clone();
        let waiting = tokio::spawn(async move { signal.wait().await });
        std::thread::spawn(move || sender.notify());
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken within 5 s")
            .unwrap();
    }
}
