//! The local channel registry: which sessions on this node hear which
//! channel, and the fan-out to them.
//!
//! Each session owns an [`Outbox`]: a bounded queue of shared publications
//! that its transport drains. Delivering a publication to a session is a
//! reference-count bump and a queue push under a short, uncontended lock; the
//! publisher never waits for a session to write anything.
//!
//! # Lag policy
//!
//! An outbox is bounded both in messages (`limits.queue_messages`) and in bytes
//! (`limits.queue_bytes`). When a push would exceed either bound, the session
//! has fallen behind: the outbox drops everything it holds, marks itself
//! lagging, refuses further pushes and wakes its transport, which closes the
//! connection as a slow consumer (WebSocket close 4008). The client reconnects
//! with its last position and recovers the gap from history, or is told
//! explicitly that history no longer covers it. We never drop only some
//! messages (a silent gap) and never block the fan-out (one slow client would
//! stall everyone on the channel).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::signal::{Signal, Wait};

use crate::message::{ChannelName, Publication};

/// Bounds of one session's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub messages: usize,
    pub bytes: usize,
}

/// What happened to a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push overflowed the queue: the session is now lagging.
    Overflowed,
    /// The session was already lagging or closed; nothing was queued.
    Refused,
}

/// One session's queue of publications waiting to be written.
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// In an `Arc` so a body can hold an owned wait ([`Outbox::ready_owned`]).
    ready: Arc<Signal>,
    limits: QueueLimits,
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Arc<Publication>>,
    bytes: usize,
    lagging: bool,
    closed: bool,
}

/// What a session finds when it drains its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Publications (possibly none) were moved out.
    Open,
    /// The session fell behind: close it as a slow consumer.
    Lagging,
    /// The outbox was closed.
    Closed,
}

impl Outbox {
    pub fn new(limits: QueueLimits) -> Arc<Outbox> {
        Arc::new(Outbox {
            state: Mutex::new(OutboxState::default()),
            ready: Arc::default(),
            limits,
        })
    }

    /// Queues a publication without waiting; see the lag policy above.
    pub fn push(&self, publication: &Arc<Publication>) -> Push {
        let mut state = self.state.lock().expect("outbox lock");
        if state.lagging || state.closed {
            return Push::Refused;
        }
        let bytes = state.bytes + publication.size();
        if state.queue.len() >= self.limits.messages || bytes > self.limits.bytes {
            state.lagging = true;
            state.bytes = 0;
            state.queue = VecDeque::new();
            drop(state);
            self.ready.notify();
            return Push::Overflowed;
        }
        let was_empty = state.queue.is_empty();
        // Past half of either bound, a session that holds its writes back
        // (`realtime.coalesce_window`) is woken to write now, well before
        // the queue would overflow.
        let half_full = (state.queue.len() + 1) * 2 > self.limits.messages
            && state.queue.len() * 2 <= self.limits.messages
            || bytes * 2 > self.limits.bytes && state.bytes * 2 <= self.limits.bytes;
        state.bytes = bytes;
        state.queue.push_back(publication.clone());
        drop(state);
        // One wake-up per batch: a session that has not drained yet will see
        // this publication with the ones before it.
        if was_empty || half_full {
            self.ready.notify();
        }
        Push::Queued
    }

    /// Moves every waiting publication into `batch` (in order) and says
    /// whether the session may go on.
    pub fn drain_into(&self, batch: &mut Vec<Arc<Publication>>) -> Drained {
        let mut state = self.state.lock().expect("outbox lock");
        if state.lagging {
            return Drained::Lagging;
        }
        batch.extend(state.queue.drain(..));
        state.bytes = 0;
        if state.closed {
            Drained::Closed
        } else {
            Drained::Open
        }
    }

    /// Waits until something was pushed, the session lags, or it is closed
    /// since the last drain.
    pub async fn ready(&self) {
        self.ready.wait().await
    }

    /// Like [`Outbox::ready`], as an owned future that a hand-written stream
    /// can keep and poll again after each wake-up. One session waits on its
    /// outbox at a time.
    pub fn ready_owned(&self) -> Wait {
        Wait::new(self.ready.clone())
    }

    /// Closes the outbox: later pushes are refused and the session is woken.
    pub fn close(&self) {
        let mut state = self.state.lock().expect("outbox lock");
        state.closed = true;
        state.queue = VecDeque::new();
        state.bytes = 0;
        drop(state);
        self.ready.notify();
    }

    pub fn is_lagging(&self) -> bool {
        self.state.lock().expect("outbox lock").lagging
    }

    /// Publications waiting.
    pub fn len(&self) -> usize {
        self.state.lock().expect("outbox lock").queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shards of the channel map: subscribing to one channel does not block
/// fan-out on the others.
const SHARDS: usize = 64;

type Subscribers = Vec<Arc<Outbox>>;

/// Who on this node hears which channel.
pub struct Hub {
    shards: Box<[RwLock<HashMap<ChannelName, Subscribers>>]>,
    hasher: RandomState,
    /// Sessions cut off as slow consumers, for /metrics.
    lagged: AtomicU64,
    /// Publications handed to sessions, for /metrics.
    delivered: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl Hub {
    pub fn new() -> Hub {
        Hub {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            lagged: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Subscribers>> {
        let index = self.hasher.hash_one(channel) as usize % SHARDS;
        &self.shards[index]
    }

    /// Adds `outbox` to `channel`. Returns `true` when it is the channel's
    /// first subscriber on this node (the engine may need to listen for it).
    pub fn subscribe(&self, channel: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        let mut shard = self.shard(channel.as_str()).write().expect("hub lock");
        let subscribers = shard.entry(channel.clone()).or_default();
        let first = subscribers.is_empty();
        if !subscribers.iter().any(|s| Arc::ptr_eq(s, outbox)) {
            subscribers.push(outbox.clone());
        }
        first
    }

    /// Removes `outbox` from `channel`. Returns `true` when no subscriber is
    /// left on this node.
    pub fn unsubscribe(&self, channel: &str, outbox: &Arc<Outbox>) -> bool {
        let mut shard = self.shard(channel).write().expect("hub lock");
        let Some(subscribers) = shard.get_mut(channel) else {
            return false;
        };
        if let Some(index) = subscribers.iter().position(|s| Arc::ptr_eq(s, outbox)) {
            subscribers.swap_remove(index);
        }
        if subscribers.is_empty() {
            shard.remove(channel);
            true
        } else {
            false
        }
    }

    /// Hands `publication` to every local subscriber of its channel; returns
    /// how many got it. Never waits on a session.
    pub fn deliver(&self, publication: &Arc<Publication>) -> usize {
        let shard = self
            .shard(publication.channel().as_str())
            .read()
            .expect("hub lock");
        let Some(subscribers) = shard.get(publication.channel().as_str()) else {
            return 0;
        };
        let mut delivered = 0;
        for outbox in subscribers {
            match outbox.push(publication) {
                Push::Queued => delivered += 1,
                Push::Overflowed => {
                    self.lagged.fetch_add(1, Ordering::Relaxed);
                }
                Push::Refused => {}
            }
        }
        self.delivered
            .fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Local subscribers of `channel`.
    pub fn subscribers(&self, channel: &str) -> usize {
        self.shard(channel)
            .read()
            .expect("hub lock")
            .get(channel)
            .map_or(0, Vec::len)
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.subscribers(channel) > 0
    }

    /// Every channel with local subscribers, and how many, sorted by name.
    pub fn channels(&self) -> Vec<(ChannelName, usize)> {
        let mut channels: Vec<(ChannelName, usize)> = self
            .shards
            .iter()
            .flat_map(|shard| {
                shard
                    .read()
                    .expect("hub lock")
                    .iter()
                    .map(|(name, subscribers)| (name.clone(), subscribers.len()))
                    .collect::<Vec<_>>()
            })
            .collect();
        channels.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        channels
    }

    /// Channels with local subscribers.
    pub fn channel_count(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.read().expect("hub lock").len())
            .sum()
    }

    /// Sessions cut off as slow consumers so far.
    pub fn lagged_total(&self) -> u64 {
        self.lagged.load(Ordering::Relaxed)
    }

    /// Publications handed to sessions so far.
    pub fn delivered_total(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::{Epoch, Position};

    const LIMITS: QueueLimits = QueueLimits {
        messages: 3,
        bytes: 1 << 20,
    };

    fn publication(channel: &str, offset: u64, data: &str) -> Arc<Publication> {
        Arc::new(Publication::new(
            ChannelName::parse(channel).unwrap(),
            Position::new(Epoch::parse("e").unwrap(), offset),
            None,
            data,
            0,
        ))
    }

    #[test]
    fn fan_out_reaches_every_subscriber_of_the_channel_only() {
        let hub = Hub::new();
        let chat = ChannelName::parse("chat").unwrap();
        let other = ChannelName::parse("other").unwrap();
        let (a, b, c) = (
            Outbox::new(LIMITS),
            Outbox::new(LIMITS),
            Outbox::new(LIMITS),
        );
        assert!(hub.subscribe(&chat, &a));
        assert!(!hub.subscribe(&chat, &b));
        assert!(
            !hub.subscribe(&chat, &b),
            "subscribing twice is one subscription"
        );
        hub.subscribe(&other, &c);

        assert_eq!(hub.deliver(&publication("chat", 1, "1")), 2);
        let mut batch = Vec::new();
        assert_eq!(a.drain_into(&mut batch), Drained::Open);
        assert_eq!(b.drain_into(&mut batch), Drained::Open);
        assert_eq!(c.drain_into(&mut batch), Drained::Open);
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|p| p.channel().as_str() == "chat"));
        // Shared, not copied.
        assert!(Arc::ptr_eq(&batch[0], &batch[1]));

        assert_eq!(hub.channels(), vec![(chat.clone(), 2), (other.clone(), 1)]);
        assert!(!hub.unsubscribe("chat", &a));
        assert!(hub.unsubscribe("chat", &b), "the last subscriber left");
        assert_eq!(hub.channel_count(), 1);
        assert_eq!(hub.deliver(&publication("chat", 2, "2")), 0);
    }

    #[test]
    fn a_session_over_its_message_bound_lags_and_the_others_keep_everything() {
        let hub = Hub::new();
        let chat = ChannelName::parse("chat").unwrap();
        let (slow, fast) = (Outbox::new(LIMITS), Outbox::new(LIMITS));
        hub.subscribe(&chat, &slow);
        hub.subscribe(&chat, &fast);
        let mut received = Vec::new();
        for offset in 1..=10 {
            hub.deliver(&publication("chat", offset, "0"));
            // The fast session drains as it goes; the slow one never does.
            assert_eq!(fast.drain_into(&mut received), Drained::Open);
        }
        let offsets: Vec<u64> = received.iter().map(|p| p.offset()).collect();
        assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
        assert!(slow.is_lagging());
        assert!(slow.is_empty(), "a lagging queue holds nothing");
        assert_eq!(slow.drain_into(&mut Vec::new()), Drained::Lagging);
        assert_eq!(hub.lagged_total(), 1);
    }

    #[test]
    fn the_byte_bound_also_cuts_a_session_off() {
        let outbox = Outbox::new(QueueLimits {
            messages: 1000,
            bytes: 200,
        });
        let big = publication("c", 1, &format!("\"{}\"", "x".repeat(120)));
        assert_eq!(outbox.push(&big), Push::Queued);
        assert_eq!(outbox.push(&big), Push::Overflowed);
        assert_eq!(outbox.push(&big), Push::Refused);
        assert!(outbox.is_lagging());
    }

    #[tokio::test]
    async fn a_push_wakes_the_waiting_session() {
        let outbox = Outbox::new(LIMITS);
        let waiter = {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                outbox.ready().await;
                let mut batch = Vec::new();
                outbox.drain_into(&mut batch);
                batch.len()
            })
        };
        outbox.push(&publication("c", 1, "1"));
        let drained = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(drained, 1);

        outbox.close();
        assert_eq!(outbox.push(&publication("c", 2, "2")), Push::Refused);
        assert_eq!(outbox.drain_into(&mut Vec::new()), Drained::Closed);
    }

    /// Whether a wake-up is pending, without waiting for one.
    fn woken(outbox: &Outbox) -> bool {
        use std::future::Future;
        let wait = outbox.ready();
        let mut wait = std::pin::pin!(wait);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        wait.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn pushes_wake_the_session_when_its_queue_starts_and_when_it_is_half_full() {
        let outbox = Outbox::new(QueueLimits {
            messages: 6,
            bytes: 1 << 20,
        });
        let wakes: Vec<bool> = (1..=6)
            .map(|n| {
                outbox.push(&publication("c", n, "x"));
                woken(&outbox)
            })
            .collect();
        // The first push, then the fourth (past half of 6); none between.
        assert_eq!(wakes, [true, false, false, true, false, false]);

        let big = "y".repeat(400);
        let small_size = publication("c", 1, "x").size();
        let big_size = publication("c", 2, &big).size();
        // Half the bound lies between one small and one big publication,
        // and one small and two big ones.
        let outbox = Outbox::new(QueueLimits {
            messages: 1000,
            bytes: 2 * (small_size + big_size) + big_size,
        });
        outbox.push(&publication("c", 1, "x"));
        assert!(woken(&outbox));
        outbox.push(&publication("c", 2, &big));
        assert!(!woken(&outbox), "under half the bytes");
        outbox.push(&publication("c", 3, &big));
        assert!(woken(&outbox), "past half the bytes");
    }
}
