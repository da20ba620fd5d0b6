//! Batches posted to the app: a bounded queue its producers never wait on,
//! and one task per queue posting signed batches. Connection events
//! (`events`) and Pusher webhooks (`pusher::webhooks`) both go this way;
//! each says how its batch is written and signed ([`Format`]).
//!
//! The invariants:
//! - **In order, at least once while the app answers.** The batch in flight
//!   is always the front of the queue, and leaves it only when the app
//!   answers it: `2xx` acknowledges it; a `4xx` other than `408` and `429`
//!   refuses it (retrying the same body would not help), and it is dropped
//!   and counted. Anything else (a `5xx`, `408`, `429`, no answer within
//!   the timeout, a refused connection) sends the front again after a
//!   backoff, written and signed anew: a batch may arrive more than once.
//! - **Bounded.** At most `capacity` items are held, the batch in flight
//!   included: while the app is down, the oldest go first, counted.
//! - **Never waits.** [`Poster::send`] takes a lock for a push and returns.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};
use tokio::sync::Notify;

use crate::app::AppCalls;

/// The first pause before a failed batch is sent again; it doubles with each
/// failure in a row, up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most of the app's answer read (and dropped): read to its end, its
/// connection is used again.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How one kind of batch is written and signed.
pub trait Format: Send + Sync + 'static {
    type Item: Clone + Send + Sync + 'static;
    /// The body of a batch sent at `time_ms`.
    fn encode(&self, time_ms: u64, batch: &[Queued<Self::Item>]) -> Vec<u8>;
    /// The headers that go with `body`: its type and signature.
    fn headers(&self, body: &[u8]) -> HeaderMap;
    /// What the log calls the items ("connection events").
    fn what(&self) -> &'static str;
}

/// An item in the queue, numbered and timed when it was sent.
#[derive(Debug, Clone)]
pub struct Queued<T> {
    pub item: T,
    /// Counts up from 0 in this process.
    pub number: u64,
    pub time_ms: u64,
}

/// Sizes and times of one queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most items held.
    pub capacity: usize,
    /// Most items in one batch.
    pub batch_size: usize,
    /// How long an item may wait for others to share its batch.
    pub interval: Duration,
    /// How long the app may take to answer a batch (its answer's head, then
    /// its body, each within this).
    pub timeout: Duration,
}

/// Counts for /metrics.
#[derive(Debug, Clone, Default)]
pub struct PostStats {
    /// Items the app acknowledged (2xx).
    pub sent: u64,
    /// Dropped because the queue was full (the oldest went).
    pub dropped_queue_full: u64,
    /// Dropped because the app refused their batch (a 4xx).
    pub dropped_refused: u64,
    /// Left unsent when the node stopped.
    pub dropped_shutdown: u64,
    /// Batches sent that failed and were sent again later.
    pub retries: u64,
    /// Items waiting, the batch in flight included.
    pub queued: u64,
}

/// A queue and the task that posts it. Cheap to clone.
pub struct Poster<T>(Arc<Shared<T>>);

impl<T> Clone for Poster<T> {
    fn clone(&self) -> Self {
        Poster(self.0.clone())
    }
}

struct Shared<T> {
    limits: Limits,
    queue: Mutex<Queue<T>>,
    /// Wakes the sender: a first item, a full batch, or shutdown.
    wake: Notify,
    closing: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    sent: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_refused: AtomicU64,
    dropped_shutdown: AtomicU64,
    retries: AtomicU64,
    what: &'static str,
}

struct Queue<T> {
    items: VecDeque<Queued<T>>,
    /// How many of the front items belong to the batch in flight.
    in_flight: usize,
    next_number: u64,
}

impl<T: Clone + Send + Sync + 'static> Poster<T> {
    /// Starts posting batches written by `format` to `target` on the app.
    /// Must be called within a tokio runtime.
    pub fn start<F: Format<Item = T>>(
        format: F,
        calls: AppCalls,
        target: String,
        limits: Limits,
    ) -> Poster<T> {
        let shared = Arc::new(Shared {
            limits,
            queue: Mutex::new(Queue {
                items: VecDeque::with_capacity(limits.batch_size),
                in_flight: 0,
                next_number: 0,
            }),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            task: Mutex::new(None),
            sent: AtomicU64::new(0),
            dropped_queue_full: AtomicU64::new(0),
            dropped_refused: AtomicU64::new(0),
            dropped_shutdown: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            what: format.what(),
        });
        let sender = Sender {
            shared: shared.clone(),
            calls,
            target,
            format,
        };
        let task = tokio::spawn(sender.run());
        *shared.task.lock().expect("posting task lock") = Some(task);
        Poster(shared)
    }

    /// Queues `item`. Never waits: with the queue full, the oldest item is
    /// dropped.
    pub fn send(&self, item: T) {
        let shared = &self.0;
        let time_ms = now_ms();
        let mut queue = shared.queue.lock().expect("posting queue lock");
        if queue.items.len() >= shared.limits.capacity {
            queue.items.pop_front();
            queue.in_flight = queue.in_flight.saturating_sub(1);
            shared.dropped_queue_full.fetch_add(1, Ordering::Relaxed);
        }
        let number = queue.next_number;
        queue.next_number += 1;
        queue.items.push_back(Queued {
            item,
            number,
            time_ms,
        });
        let len = queue.items.len();
        drop(queue);
        // The sender waits for a first item, then for a full batch.
        if len == 1 || len == shared.limits.batch_size {
            shared.wake.notify_one();
        }
    }

    pub fn stats(&self) -> PostStats {
        let shared = &self.0;
        let queued = shared.len();
        PostStats {
            sent: shared.sent.load(Ordering::Relaxed),
            dropped_queue_full: shared.dropped_queue_full.load(Ordering::Relaxed),
            dropped_refused: shared.dropped_refused.load(Ordering::Relaxed),
            dropped_shutdown: shared.dropped_shutdown.load(Ordering::Relaxed),
            retries: shared.retries.load(Ordering::Relaxed),
            queued: queued as u64,
        }
    }

    /// Stops the sender once it has tried, once, to send what is queued,
    /// within the timeout. What is left is counted as dropped.
    pub async fn close(&self) {
        let shared = &self.0;
        shared.closing.store(true, Ordering::Release);
        shared.wake.notify_one();
        let task = shared.task.lock().expect("posting task lock").take();
        if let Some(mut task) = task {
            if tokio::time::timeout(shared.limits.timeout, &mut task)
                .await
                .is_err()
            {
                task.abort();
                let _ = task.await;
                shared.abandon();
            }
        }
    }
}

impl<T> Shared<T> {
    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    fn len(&self) -> usize {
        self.queue.lock().expect("posting queue lock").items.len()
    }

    /// Counts every queued item as dropped at shutdown, and forgets them.
    fn abandon(&self) {
        let mut queue = self.queue.lock().expect("posting queue lock");
        let left = queue.items.len();
        queue.items.clear();
        queue.in_flight = 0;
        self.dropped_shutdown
            .fetch_add(left as u64, Ordering::Relaxed);
        if left > 0 {
            tracing::warn!(count = left, "stopping with {} unsent", self.what);
        }
    }

    /// The batch in flight leaves the queue: acknowledged, or refused.
    fn settle(&self, acknowledged: bool) -> usize {
        let mut queue = self.queue.lock().expect("posting queue lock");
        let settled = queue.in_flight;
        queue.items.drain(..settled);
        queue.in_flight = 0;
        let counter = if acknowledged {
            &self.sent
        } else {
            &self.dropped_refused
        };
        counter.fetch_add(settled as u64, Ordering::Relaxed);
        settled
    }
}

/// What became of one batch.
enum Outcome {
    Acknowledged,
    Refused(StatusCode),
    /// To be sent again: why it failed.
    Failed(String),
}

/// The task that posts batches to the app.
struct Sender<F: Format> {
    shared: Arc<Shared<F::Item>>,
    /// The app client the proxy and the auth requests share, and its
    /// budget of files.
    calls: AppCalls,
    target: String,
    format: F,
}

impl<F: Format> Sender<F> {
    async fn run(self) {
        let what = self.shared.what;
        let mut backoff = FIRST_BACKOFF;
        let mut failing = false;
        while self.gather().await {
            let closing = self.shared.is_closing();
            match self.attempt().await {
                Outcome::Acknowledged => {
                    self.shared.settle(true);
                    if std::mem::take(&mut failing) {
                        tracing::info!("the app takes {what} again");
                    }
                    backoff = FIRST_BACKOFF;
                }
                Outcome::Refused(status) => {
                    let dropped = self.shared.settle(false);
                    tracing::warn!(
                        %status,
                        count = dropped,
                        target = %self.target,
                        "the app refused a batch of {what}; dropped"
                    );
                    backoff = FIRST_BACKOFF;
                }
                Outcome::Failed(why) => {
                    if closing {
                        self.shared.abandon();
                        return;
                    }
                    self.shared.retries.fetch_add(1, Ordering::Relaxed);
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(
                            target = %self.target,
                            why,
                            "sending {what} to the app failed; retrying with backoff"
                        );
                    } else {
                        tracing::debug!(why, "sending {what} failed again");
                    }
                    // New items wake the sender too; only shutdown cuts
                    // the pause short.
                    let pause = tokio::time::sleep(jittered(backoff));
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            () = &mut pause => break,
                            () = self.shared.wake.notified() => {
                                if self.shared.is_closing() {
                                    break;
                                }
                            }
                        }
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Waits until a batch is ready: `batch_size` items, or the first
    /// item has waited `interval`, or shutdown (then at once). `false`
    /// when the node is stopping and nothing is left.
    async fn gather(&self) -> bool {
        let shared = &self.shared;
        loop {
            let len = shared.len();
            if shared.is_closing() {
                return len > 0;
            }
            if len > 0 {
                break;
            }
            shared.wake.notified().await;
        }
        let deadline = tokio::time::Instant::now() + shared.limits.interval;
        loop {
            if shared.is_closing() || shared.len() >= shared.limits.batch_size {
                return true;
            }
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep_until(deadline) => return true,
            }
        }
    }

    /// Sends the front of the queue, once.
    async fn attempt(&self) -> Outcome {
        let batch: Vec<Queued<F::Item>> = {
            let mut queue = self.shared.queue.lock().expect("posting queue lock");
            let count = queue.items.len().min(self.shared.limits.batch_size);
            queue.in_flight = count;
            queue.items.iter().take(count).cloned().collect()
        };
        let body = self.format.encode(now_ms(), &batch);
        let headers = self.format.headers(&body);
        let answer = self
            .calls
            .post(
                &self.target,
                &headers,
                &body,
                self.shared.limits.timeout,
                MAX_ANSWER_BYTES,
            )
            .await;
        match answer {
            Err(err) => Outcome::Failed(err.to_string()),
            Ok(answer) if answer.status.is_success() => Outcome::Acknowledged,
            Ok(answer)
                if answer.status.is_client_error()
                    && answer.status != StatusCode::REQUEST_TIMEOUT
                    && answer.status != StatusCode::TOO_MANY_REQUESTS =>
            {
                Outcome::Refused(answer.status)
            }
            Ok(answer) => Outcome::Failed(format!("the app answered {}", answer.status)),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

/// `duration` with jitter in `[d/2, d]`, so nodes that lost the app at
/// once do not all come back at once.
fn jittered(duration: Duration) -> Duration {
    use rand::Rng;
    let millis = duration.as_millis().max(2) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}
