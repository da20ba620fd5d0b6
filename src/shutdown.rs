//! Shutdown: the OS signals that start it, and the drain tracker that lets
//! in-flight work finish.
//!
//! Shutdown has two phases. First the listeners stop accepting and every
//! connection and session is told to wind down ([`Drain::signal`]). Then the
//! server waits, at most `shutdown.grace`, for all of them to be done
//! ([`Drain::wait`]).
//!
//! Connections that hyper serves are tracked by their task. Connections that
//! leave hyper's connection future (WebSocket sessions and tunnels after
//! their upgrade, SSE streams after a detach) hold a [`DrainGuard`] of their
//! own for as long as they live.
//!
//! HTTP connections and requests wait on the signal themselves. Realtime
//! sessions, which are most of the connections and idle for long, keep no
//! wait of their own (96 bytes each): a hook ([`Drain::on_signal`]) orders
//! every session to end through its control, as `POST /api/disconnect`
//! would, and each ends the way its transport does at shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// Tells connections that shutdown has begun, and counts the ones still busy.
#[derive(Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    /// Set before `signal` is cancelled: what a kept wait checks.
    signalled: Arc<AtomicBool>,
    tracker: TaskTracker,
    /// Run once when shutdown begins ([`Drain::on_signal`]).
    hooks: Arc<std::sync::Mutex<Vec<Hook>>>,
}

/// What runs when shutdown begins.
type Hook = Box<dyn FnOnce() + Send>;

/// Held by a piece of work that must finish (or give up) before the process
/// exits. Dropping it marks the work done.
pub struct DrainGuard {
    _token: TaskTrackerToken,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers work that shutdown should wait for.
    pub fn guard(&self) -> DrainGuard {
        DrainGuard {
            _token: self.tracker.token(),
        }
    }

    /// Spawns a task that shutdown waits for.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Resolves when shutdown has begun. Sessions select on this.
    pub async fn signalled(&self) {
        self.signal.cancelled().await
    }

    /// Like [`Drain::signalled`], as an owned future that a session's loop
    /// keeps and polls on every turn (see [`Signalled`]).
    pub fn signalled_owned(&self) -> Signalled {
        Signalled {
            signalled: self.signalled.clone(),
            wait: self.signal.clone().cancelled_owned(),
            registered: None,
        }
    }

    pub fn is_signalled(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Runs `hook` when shutdown begins (at once if it has): for what tells
    /// many pieces of work at once, such as every realtime session, rather
    /// than each keeping a wait of its own.
    pub fn on_signal(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = self.hooks.lock().expect("drain hooks lock");
        if self.is_signalled() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }

    /// Starts shutdown: every [`Drain::signalled`] resolves and every
    /// [`Drain::on_signal`] hook runs.
    pub fn signal(&self) {
        let hooks = {
            let mut hooks = self.hooks.lock().expect("drain hooks lock");
            self.signalled.store(true, Ordering::Release);
            self.signal.cancel();
            std::mem::take(&mut *hooks)
        };
        self.tracker.close();
        for hook in hooks {
            hook();
        }
    }

    /// How much tracked work is still running.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }

    /// Waits for tracked work to finish, at most `grace`. Returns `true` when
    /// everything finished in time.
    pub async fn wait(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

pin_project_lite::pin_project! {
    /// A kept wait for shutdown. A session's loop polls its waits on every
    /// turn, once per delivery; the token's own wait takes a lock each time.
    /// This one registers with the token once per waker and otherwise reads
    /// one flag.
    pub struct Signalled {
        signalled: Arc<AtomicBool>,
        #[pin]
        wait: WaitForCancellationFutureOwned,
        // The waker the token will wake; the token is asked again only for
        // another one.
        registered: Option<Waker>,
    }
}

impl Future for Signalled {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.signalled.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if let Some(waker) = this.registered {
            if waker.will_wake(cx.waker()) {
                return Poll::Pending;
            }
        }
        match this.wait.poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                *this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    use tokio::signal::unix::{signal, SignalKind};

    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_guards_and_tasks_up_to_the_grace() {
        let drain = Drain::new();
        let guard = drain.guard();
        let task_drain = drain.clone();
        drain.spawn(async move { task_drain.signalled().await });
        assert_eq!(drain.in_flight(), 2);

        drain.signal();
        assert!(drain.is_signalled());
        // The task ends on the signal; the guard still holds.
        assert!(!drain.wait(Duration::from_millis(50)).await);
        drop(guard);
        assert!(drain.wait(Duration::from_secs(5)).await);
        assert_eq!(drain.in_flight(), 0);
    }

    #[test]
    fn hooks_run_once_at_the_signal_and_at_once_after_it() {
        use std::sync::atomic::AtomicUsize;
        let drain = Drain::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = || {
            let runs = runs.clone();
            move || {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        };
        drain.on_signal(counter());
        drain.clone().on_signal(counter());
        assert_eq!(runs.load(Ordering::SeqCst), 0, "not before the signal");
        drain.signal();
        assert_eq!(runs.load(Ordering::SeqCst), 2, "each clone's hook, once");
        drain.signal();
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "a second signal runs none again"
        );
        drain.on_signal(counter());
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "a hook after the signal runs at once"
        );
    }

    #[tokio::test]
    async fn a_kept_wait_polled_many_times_ends_on_the_signal() {
        let drain = Drain::new();
        let mut wait = Box::pin(drain.signalled_owned());
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..3 {
            assert!(wait.as_mut().poll(&mut cx).is_pending());
        }
        // The same wait, now kept by a task (another waker than the polls
        // above), polled on every turn of its loop as a session's is: the
        // signal must wake that task.
        let turns = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = turns.clone();
        let task = tokio::spawn(async move {
            loop {
                let turn = counted.load(Ordering::SeqCst);
                tokio::select! {
                    biased;
                    () = &mut wait => return,
                    () = tokio::task::yield_now(), if turn < 3 => {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        });
        // Signal only once the task has polled the wait with its own waker
        // and gone quiet on it.
        while turns.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        drain.signal();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("woken by the signal")
            .unwrap();
    }
}
