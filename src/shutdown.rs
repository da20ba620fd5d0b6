//! Shutdown: the OS signals that start it, and the drain tracker that lets
//! in-flight work finish.
//!
//! Shutdown has two phases. First the listeners stop accepting and every
//! connection and session is told to wind down ([`Drain::signal`]). Then the
//! server waits, at most `shutdown.grace`, for all of them to be done
//! ([`Drain::wait`]).
//!
//! Connections that hyper serves are tracked by their task. Upgraded
//! connections (WebSocket tunnels now, realtime sessions later) leave hyper's
//! connection future when they upgrade, so they hold a [`DrainGuard`] of their
//! own for as long as they live.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// Tells connections that shutdown has begun, and counts the ones still busy.
#[derive(Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    tracker: TaskTracker,
}

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

    /// Like [`Drain::signalled`], as an owned future a hand-written stream
    /// can keep between polls.
    pub fn signalled_owned(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.signal.clone().cancelled_owned()
    }

    pub fn is_signalled(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Starts shutdown: every [`Drain::signalled`] resolves.
    pub fn signal(&self) {
        self.signal.cancel();
        self.tracker.close();
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
}
