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
//!
//! # Lanes
//!
//! The public listener runs on several threads, each with its own
//! single-threaded runtime (see `Server::bind_sharded`). Waking a task from
//! another thread costs that runtime a locked queue push and a system call
//! (an `eventfd` write), so waking thousands of sessions one by one from the
//! thread a publication arrives on was a system call per subscriber. Each
//! such thread is a **lane** of the hub: a channel's subscribers are kept by
//! the lane their session runs on, and a publication is handed to each lane
//! that has subscribers with one queue push and at most one wake-up; the
//! lane's own fan-out task, on that thread, then fills its sessions' outboxes
//! with local wake-ups. A publication that arrives on a lane's own thread
//! while that lane's queue is empty is handed to its sessions at once, which
//! keeps the lane's order. Sessions outside any lane (an embedding runtime,
//! tests) are handed publications directly, as before.
//!
//! A session about to read a channel's history drops what the hub was
//! handed for that channel so far, in its outbox or still in its lane: the
//! read covers it ([`Hub::discard`], which keeps this exact across lanes).
//!
//! A lane's queue is bounded ([`LANE_QUEUE_MAX`]). A lane so far behind that
//! it fills is behind for all its sessions: the queue is dropped and every
//! session of the lane is cut off as a slow consumer, to recover from history
//! when it comes back — the lag policy above, applied to the whole thread.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
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
    /// Queued, and the queue is now past half of a bound: the session was
    /// woken to write at once, and whoever fills it should let it run.
    Urged,
    /// This push overflowed the queue: the session is now lagging.
    Overflowed,
    /// The session was already lagging or closed; nothing was queued.
    Refused,
    /// Handed to the hub before the session discarded its channel (see
    /// [`Hub::discard`]); nothing was queued.
    Superseded,
}

/// What [`Hub::push_all`] did.
#[derive(Debug, Default, Clone, Copy)]
struct Pushed {
    /// Sessions that took the publication.
    delivered: usize,
    /// Whether one of them is past half full ([`Push::Urged`]).
    urged: bool,
}

/// One session's queue of publications waiting to be written.
pub struct Outbox {
    state: Mutex<OutboxState>,
    /// In an `Arc` so a body can hold an owned wait ([`Outbox::ready_owned`]).
    ready: Arc<Signal>,
    limits: QueueLimits,
    /// The lane of the thread the outbox was made on: its session's task
    /// runs there.
    home: Option<Home>,
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<Arc<Publication>>,
    bytes: usize,
    lagging: bool,
    closed: bool,
    /// Channels discarded while the session's lane may still hold
    /// publications for them, each with the lane's newest stamp at the
    /// discard (see [`Hub::discard`]). At most one per channel; dropped once
    /// the lane hands over anything stamped later.
    fences: Vec<(ChannelName, u64)>,
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
            home: LANE.get(),
        })
    }

    /// Queues a publication without waiting; see the lag policy above.
    pub fn push(&self, publication: &Arc<Publication>) -> Push {
        self.push_stamped(publication, None)
    }

    /// Queues a publication; `stamp` is its place in the session's lane
    /// when the lane hands it over.
    fn push_stamped(&self, publication: &Arc<Publication>, stamp: Option<u64>) -> Push {
        let mut state = self.state.lock().expect("outbox lock");
        if state.lagging || state.closed {
            return Push::Refused;
        }
        if let (Some(stamp), false) = (stamp, state.fences.is_empty()) {
            // The lane hands publications over in stamp order: a fence
            // older than this one has nothing left behind it.
            state.fences.retain(|(_, fence)| *fence >= stamp);
            let superseded = state
                .fences
                .iter()
                .any(|(channel, _)| channel == publication.channel());
            if superseded {
                return Push::Superseded;
            }
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
        let half_full = self.past_half(state.queue.len() + 1, bytes)
            && !self.past_half(state.queue.len(), state.bytes);
        state.bytes = bytes;
        state.queue.push_back(publication.clone());
        drop(state);
        // One wake-up per batch: a session that has not drained yet will see
        // this publication with the ones before it.
        if was_empty || half_full {
            self.ready.notify();
        }
        if half_full {
            Push::Urged
        } else {
            Push::Queued
        }
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

    /// Marks the session lagging (its lane fell behind): it holds nothing,
    /// refuses pushes and is woken to close as a slow consumer. Says whether
    /// it was not lagging already.
    fn lag(&self) -> bool {
        let mut state = self.state.lock().expect("outbox lock");
        if state.lagging || state.closed {
            return false;
        }
        state.lagging = true;
        state.queue = VecDeque::new();
        state.bytes = 0;
        drop(state);
        self.ready.notify();
        true
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

    /// Whether the session should write at once rather than hold its writes
    /// back: its queue is past half of a bound, it lags, or it is closed.
    /// Wake-ups coalesce (the one for the first publication of a batch and
    /// the one for passing half full may arrive as one), so a session asks
    /// this on every wake-up instead of counting them.
    pub fn is_urgent(&self) -> bool {
        let state = self.state.lock().expect("outbox lock");
        state.lagging || state.closed || self.past_half(state.queue.len(), state.bytes)
    }

    fn past_half(&self, messages: usize, bytes: usize) -> bool {
        messages * 2 > self.limits.messages || bytes * 2 > self.limits.bytes
    }

    pub fn is_lagging(&self) -> bool {
        self.state.lock().expect("outbox lock").lagging
    }

    /// Drops whatever waits for `channel` and, with `fence` (the newest
    /// stamp of the session's lane), whatever the lane hands over later
    /// with a stamp at or before it. See [`Hub::discard`].
    fn discard(&self, channel: &ChannelName, fence: Option<u64>) {
        let mut state = self.state.lock().expect("outbox lock");
        let mut dropped = 0;
        state.queue.retain(|publication| {
            let keep = publication.channel() != channel;
            if !keep {
                dropped += publication.size();
            }
            keep
        });
        state.bytes -= dropped;
        if let Some(fence) = fence {
            state.fences.retain(|(fenced, _)| fenced != channel);
            state.fences.push((channel.clone(), fence));
        }
    }

    /// Publications waiting.
    pub fn len(&self) -> usize {
        self.state.lock().expect("outbox lock").queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Buckets of the channel map: subscribing to one channel does not block
/// fan-out on the others.
const BUCKETS: usize = 64;

/// Publications a lane may hold before it counts as hopelessly behind (see
/// the module's "Lanes").
pub const LANE_QUEUE_MAX: usize = 65_536;

/// Where a session's task runs: one lane of one hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Home {
    hub: u64,
    lane: usize,
}

thread_local! {
    /// The lane served by this thread, if it serves one.
    static LANE: Cell<Option<Home>> = const { Cell::new(None) };
}

/// Tells hubs apart in [`Home`].
static NEXT_HUB_ID: AtomicU64 = AtomicU64::new(1);

/// A channel's local subscribers: one list per lane, then one for the
/// sessions that run outside any lane.
struct Subscribers(Box<[Vec<Arc<Outbox>>]>);

impl Subscribers {
    fn new(lanes: usize) -> Subscribers {
        Subscribers((0..=lanes).map(|_| Vec::new()).collect())
    }

    fn len(&self) -> usize {
        self.0.iter().map(Vec::len).sum()
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(Vec::is_empty)
    }
}

/// One lane's publications, waiting for its fan-out task.
#[derive(Default)]
struct Lane {
    queue: Mutex<LaneQueue>,
    ready: Signal,
}

#[derive(Default)]
struct LaneQueue {
    /// Each with its stamp: 1, 2, 3... in the order the lane was handed
    /// them.
    publications: VecDeque<(u64, Arc<Publication>)>,
    /// The stamp of the newest publication the lane was handed.
    stamped: u64,
    /// The queue filled: the lane drops it and cuts its sessions off.
    overflowed: bool,
    /// The lane's task let its sessions run with part of a batch still in
    /// hand.
    paused: bool,
}

impl Lane {
    /// Queues `publication`, waking the lane's task when the queue starts.
    fn send(&self, publication: &Arc<Publication>) {
        let mut queue = self.queue.lock().expect("lane lock");
        if queue.overflowed {
            return;
        }
        if queue.publications.len() >= LANE_QUEUE_MAX {
            // Every session of the lane is cut off: no fence needs what is
            // dropped here.
            queue.overflowed = true;
            queue.publications = VecDeque::new();
            drop(queue);
            self.ready.notify();
            return;
        }
        let was_empty = queue.publications.is_empty();
        queue.stamped += 1;
        let stamp = queue.stamped;
        queue.publications.push_back((stamp, publication.clone()));
        drop(queue);
        if was_empty {
            self.ready.notify();
        }
    }

    /// Nothing queued: a publication handed to the lane's sessions now
    /// overtakes none.
    fn is_idle(&self) -> bool {
        let queue = self.queue.lock().expect("lane lock");
        queue.publications.is_empty() && !queue.overflowed && !queue.paused
    }
}

/// Who on this node hears which channel.
pub struct Hub {
    id: u64,
    buckets: Box<[RwLock<HashMap<ChannelName, Subscribers>>]>,
    hasher: RandomState,
    lanes: Box<[Lane]>,
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
    /// A hub without lanes: every session is handed publications directly.
    pub fn new() -> Hub {
        Hub::with_lanes(0)
    }

    /// A hub with `lanes` lanes, each to be served by its own thread
    /// ([`Hub::serve_lane`]).
    pub fn with_lanes(lanes: usize) -> Hub {
        Hub {
            id: NEXT_HUB_ID.fetch_add(1, Ordering::Relaxed),
            buckets: (0..BUCKETS).map(|_| RwLock::default()).collect(),
            hasher: RandomState::new(),
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            lagged: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn bucket(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Subscribers>> {
        let index = self.hasher.hash_one(channel) as usize % BUCKETS;
        &self.buckets[index]
    }

    /// The lane served by the calling thread, if it is one of this hub's.
    fn current_lane(&self) -> Option<usize> {
        self.lane_of(LANE.get())
    }

    fn lane_of(&self, home: Option<Home>) -> Option<usize> {
        home.filter(|home| home.hub == self.id && home.lane < self.lanes.len())
            .map(|home| home.lane)
    }

    /// Which of a channel's lists holds `outbox`.
    fn slot(&self, outbox: &Outbox) -> usize {
        self.lane_of(outbox.home).unwrap_or(self.lanes.len())
    }

    /// Makes the calling thread lane `index` of this hub and returns the
    /// lane's fan-out task, which must run on this thread's (single-threaded)
    /// runtime for as long as the thread serves sessions. Outboxes made on
    /// this thread from now on belong to the lane.
    ///
    /// # Panics
    ///
    /// When the hub has no lane `index`.
    pub fn serve_lane(self: Arc<Hub>, index: usize) -> impl Future<Output = ()> {
        assert!(index < self.lanes.len(), "the hub has no lane {index}");
        LANE.set(Some(Home {
            hub: self.id,
            lane: index,
        }));
        async move {
            let lane = &self.lanes[index];
            let mut batch = VecDeque::new();
            loop {
                lane.ready.wait().await;
                let overflowed = {
                    let mut queue = lane.queue.lock().expect("lane lock");
                    std::mem::swap(&mut batch, &mut queue.publications);
                    std::mem::take(&mut queue.overflowed)
                };
                if overflowed {
                    batch.clear();
                    self.lag_lane(index);
                    continue;
                }
                // The lane's sessions run on this thread, so they write only
                // when this task lets them: a burst pushed in one go would
                // fill queues their sessions never got to drain. When one is
                // past half full, it runs before the rest of the batch, and
                // the sessions a batch woke run before the next is taken.
                let mut paused = false;
                while let Some((stamp, publication)) = batch.pop_front() {
                    let urged = {
                        let bucket = self
                            .bucket(publication.channel().as_str())
                            .read()
                            .expect("hub lock");
                        bucket
                            .get(publication.channel().as_str())
                            .is_some_and(|subscribers| {
                                self.push_all(&subscribers.0[index], &publication, Some(stamp))
                                    .urged
                            })
                    };
                    if urged && !batch.is_empty() {
                        if !paused {
                            // What this task holds is still to come: the
                            // thread may not hand publications over past it.
                            lane.queue.lock().expect("lane lock").paused = true;
                            paused = true;
                        }
                        tokio::task::yield_now().await;
                    }
                }
                if paused {
                    lane.queue.lock().expect("lane lock").paused = false;
                }
                tokio::task::yield_now().await;
            }
        }
    }

    /// Cuts off every session of lane `index` as a slow consumer.
    fn lag_lane(&self, index: usize) {
        let mut lagged = 0;
        for bucket in self.buckets.iter() {
            for subscribers in bucket.read().expect("hub lock").values() {
                lagged += subscribers.0[index].iter().filter(|o| o.lag()).count();
            }
        }
        tracing::warn!(
            lane = index,
            sessions = lagged,
            "a fan-out lane fell {LANE_QUEUE_MAX} publications behind; its sessions were cut off as slow consumers"
        );
        self.lagged.fetch_add(lagged as u64, Ordering::Relaxed);
    }

    /// Adds `outbox` to `channel`. Returns `true` when it is the channel's
    /// first subscriber on this node (the engine may need to listen for it).
    pub fn subscribe(&self, channel: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        let mut bucket = self.bucket(channel.as_str()).write().expect("hub lock");
        let subscribers = bucket
            .entry(channel.clone())
            .or_insert_with(|| Subscribers::new(self.lanes.len()));
        let first = subscribers.is_empty();
        let list = &mut subscribers.0[self.slot(outbox)];
        if !list.iter().any(|s| Arc::ptr_eq(s, outbox)) {
            list.push(outbox.clone());
        }
        first
    }

    /// Removes `outbox` from `channel`. Returns `true` when no subscriber is
    /// left on this node.
    pub fn unsubscribe(&self, channel: &str, outbox: &Arc<Outbox>) -> bool {
        let mut bucket = self.bucket(channel).write().expect("hub lock");
        let Some(subscribers) = bucket.get_mut(channel) else {
            return false;
        };
        let list = &mut subscribers.0[self.slot(outbox)];
        if let Some(index) = list.iter().position(|s| Arc::ptr_eq(s, outbox)) {
            list.swap_remove(index);
        }
        if subscribers.is_empty() {
            bucket.remove(channel);
            true
        } else {
            false
        }
    }

    /// Drops, for one session, everything this hub was handed for `channel`
    /// until now, wherever it waits: in the session's outbox, or still
    /// queued in (or held by) the session's lane. A session calls it just
    /// before it reads the channel's history, which becomes its position.
    ///
    /// The invariant this enforces: **a session never receives, after the
    /// history read that set its position, anything the hub was handed
    /// before that read.** Such a publication was stored before the read,
    /// so the read covers it or says it cannot; and an engine event from
    /// then (a reset after an outage, made from a reading of the stream
    /// older than the session's) would move the session back, to an epoch
    /// or an offset it is already past. A lane hands publications over in
    /// the order it was handed them, each stamped with its place, so the
    /// lane's newest stamp now is the fence: whatever the lane hands this
    /// session later with a stamp at or before it is dropped.
    pub fn discard(&self, channel: &ChannelName, outbox: &Outbox) {
        let fence = self
            .lane_of(outbox.home)
            .map(|lane| self.lanes[lane].queue.lock().expect("lane lock").stamped);
        outbox.discard(channel, fence);
    }

    /// Hands `publication` to every local subscriber of its channel: at once
    /// to sessions outside any lane (and to the calling thread's own lane
    /// when nothing waits there), queued for the other lanes. Returns how
    /// many sessions got it now; lanes count theirs in
    /// [`Hub::delivered_total`] as they run. Never waits on a session.
    pub fn deliver(&self, publication: &Arc<Publication>) -> usize {
        let bucket = self
            .bucket(publication.channel().as_str())
            .read()
            .expect("hub lock");
        let Some(subscribers) = bucket.get(publication.channel().as_str()) else {
            return 0;
        };
        let (lanes, elsewhere) = subscribers.0.split_at(self.lanes.len());
        let here = self.current_lane();
        let mut delivered = 0;
        for (index, outboxes) in lanes.iter().enumerate() {
            if outboxes.is_empty() {
                continue;
            }
            let lane = &self.lanes[index];
            if here == Some(index) && lane.is_idle() {
                delivered += self.push_all(outboxes, publication, None).delivered;
            } else {
                lane.send(publication);
            }
        }
        delivered + self.push_all(&elsewhere[0], publication, None).delivered
    }

    /// Pushes `publication` into each of `outboxes`; `stamp` is its place
    /// in their lane when the lane hands it over.
    fn push_all(
        &self,
        outboxes: &[Arc<Outbox>],
        publication: &Arc<Publication>,
        stamp: Option<u64>,
    ) -> Pushed {
        let mut pushed = Pushed::default();
        for outbox in outboxes {
            match outbox.push_stamped(publication, stamp) {
                Push::Queued => pushed.delivered += 1,
                Push::Urged => {
                    pushed.delivered += 1;
                    pushed.urged = true;
                }
                Push::Overflowed => {
                    self.lagged.fetch_add(1, Ordering::Relaxed);
                }
                Push::Refused | Push::Superseded => {}
            }
        }
        if pushed.delivered > 0 {
            self.delivered
                .fetch_add(pushed.delivered as u64, Ordering::Relaxed);
        }
        pushed
    }

    /// Local subscribers of `channel`.
    pub fn subscribers(&self, channel: &str) -> usize {
        self.bucket(channel)
            .read()
            .expect("hub lock")
            .get(channel)
            .map_or(0, Subscribers::len)
    }

    pub fn has_subscribers(&self, channel: &str) -> bool {
        self.subscribers(channel) > 0
    }

    /// Every channel with local subscribers, and how many, sorted by name.
    pub fn channels(&self) -> Vec<(ChannelName, usize)> {
        let mut channels: Vec<(ChannelName, usize)> = self
            .buckets
            .iter()
            .flat_map(|bucket| {
                bucket
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
        self.buckets
            .iter()
            .map(|bucket| bucket.read().expect("hub lock").len())
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
    use std::pin::Pin;

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
    fn discarding_a_channel_keeps_the_others_in_order_and_frees_its_bytes() {
        let outbox = Outbox::new(QueueLimits {
            messages: 10,
            bytes: 1 << 20,
        });
        let hub = Hub::new();
        let name = |channel: &str| ChannelName::parse(channel).unwrap();
        for (channel, offset) in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2)] {
            outbox.push(&publication(channel, offset, "12345"));
        }
        hub.discard(&name("b"), &outbox);
        hub.discard(&name("none"), &outbox);
        let mut batch = Vec::new();
        assert_eq!(outbox.drain_into(&mut batch), Drained::Open);
        let left: Vec<(&str, u64)> = batch
            .iter()
            .map(|p| (p.channel().as_str(), p.offset()))
            .collect();
        assert_eq!(left, [("a", 1), ("a", 2), ("c", 1)]);
        // The bytes of what went are free again: exactly the bound fits.
        let tight = Outbox::new(QueueLimits {
            messages: 10,
            bytes: 2 * publication("a", 1, "12345").size(),
        });
        tight.push(&publication("a", 1, "12345"));
        tight.push(&publication("b", 1, "12345"));
        hub.discard(&name("b"), &tight);
        assert_eq!(tight.push(&publication("a", 2, "12345")), Push::Urged);
        assert!(!tight.is_lagging());
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
        assert_eq!(outbox.push(&big), Push::Urged);
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
        let wakes: Vec<(bool, bool)> = (1..=6)
            .map(|n| {
                outbox.push(&publication("c", n, "x"));
                (woken(&outbox), outbox.is_urgent())
            })
            .collect();
        // The first push, then the fourth (past half of 6); none between.
        // From the fourth on, the queue stays urgent, woken or not.
        assert_eq!(
            wakes,
            [
                (true, false),
                (false, false),
                (false, false),
                (true, true),
                (false, true),
                (false, true)
            ]
        );
        let mut batch = Vec::new();
        outbox.drain_into(&mut batch);
        assert!(!outbox.is_urgent(), "drained");

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

    type LaneTask = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// Runs `body` on a new thread that serves lane 0 of `hub`, inside a
    /// current-thread runtime; the lane's fan-out task is spawned only when
    /// `body` awaits, so what `body` does before that is seen before it.
    fn on_lane<T: Send + 'static>(
        hub: &Arc<Hub>,
        body: impl FnOnce(LaneTask) -> Pin<Box<dyn Future<Output = T>>> + Send + 'static,
    ) -> T {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let lane = Box::pin(hub.serve_lane(0));
            runtime.block_on(body(lane))
        })
        .join()
        .unwrap()
    }

    /// From a thread outside any lane.
    fn deliver_from_outside(hub: &Arc<Hub>, publication: Arc<Publication>) -> usize {
        let hub = hub.clone();
        std::thread::spawn(move || hub.deliver(&publication))
            .join()
            .unwrap()
    }

    async fn drained(outbox: &Outbox) -> Vec<u64> {
        tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
            .await
            .expect("the lane fills the outbox");
        let mut batch = Vec::new();
        assert_eq!(outbox.drain_into(&mut batch), Drained::Open);
        batch.iter().map(|p| p.offset()).collect()
    }

    #[test]
    fn a_lane_fills_its_sessions_outboxes_in_order_and_its_own_thread_never_overtakes_it() {
        let hub = Arc::new(Hub::with_lanes(1));
        let outside = Outbox::new(LIMITS);
        let chat = ChannelName::parse("chat").unwrap();
        hub.subscribe(&chat, &outside);
        let hub2 = hub.clone();
        let lane_offsets = on_lane(&hub, move |lane| {
            Box::pin(async move {
                let hub = hub2;
                let chat = ChannelName::parse("chat").unwrap();
                // Made on the lane's thread: the outbox belongs to the lane.
                let outbox = Outbox::new(LIMITS);
                hub.subscribe(&chat, &outbox);
                assert_eq!(hub.subscribers("chat"), 2);

                // From outside: queued for the lane, handed at once to the
                // session outside any lane.
                assert_eq!(deliver_from_outside(&hub, publication("chat", 1, "1")), 1);
                assert!(outbox.is_empty(), "the lane has not run yet");
                // On the lane's own thread while the lane still holds
                // offset 1: queued behind it, not handed over first.
                assert_eq!(hub.deliver(&publication("chat", 2, "2")), 1);
                assert!(outbox.is_empty());

                tokio::spawn(lane);
                let first = drained(&outbox).await;
                // Nothing waits in the lane now: its own thread hands
                // publications over at once.
                assert_eq!(hub.deliver(&publication("chat", 3, "3")), 2);
                let mut batch = Vec::new();
                outbox.drain_into(&mut batch);
                (first, batch.iter().map(|p| p.offset()).collect::<Vec<_>>())
            })
        });
        assert_eq!(lane_offsets, (vec![1, 2], vec![3]));
        let mut batch = Vec::new();
        outside.drain_into(&mut batch);
        let offsets: Vec<u64> = batch.iter().map(|p| p.offset()).collect();
        assert_eq!(offsets, [1, 2, 3]);
        assert_eq!(hub.delivered_total(), 6);
    }

    #[test]
    fn a_lane_whose_queue_fills_cuts_off_every_session_on_it() {
        let hub = Arc::new(Hub::with_lanes(1));
        let outside = Outbox::new(QueueLimits {
            messages: LANE_QUEUE_MAX + 10,
            bytes: usize::MAX,
        });
        let chat = ChannelName::parse("chat").unwrap();
        hub.subscribe(&chat, &outside);
        let hub2 = hub.clone();
        let lane_sessions_lagged = on_lane(&hub, move |lane| {
            Box::pin(async move {
                let hub = hub2;
                let roomy = QueueLimits {
                    messages: LANE_QUEUE_MAX + 10,
                    bytes: usize::MAX,
                };
                let chat = ChannelName::parse("chat").unwrap();
                let other = ChannelName::parse("other").unwrap();
                let (a, b) = (Outbox::new(roomy), Outbox::new(roomy));
                hub.subscribe(&chat, &a);
                hub.subscribe(&other, &b);
                let one = publication("chat", 1, "1");
                let sender = hub.clone();
                std::thread::spawn(move || {
                    for _ in 0..=LANE_QUEUE_MAX {
                        sender.deliver(&one);
                    }
                })
                .join()
                .unwrap();
                tokio::spawn(lane);
                for outbox in [&a, &b] {
                    tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
                        .await
                        .expect("woken");
                }
                [a.is_lagging(), b.is_lagging()]
            })
        });
        // Both of the lane's sessions, even the one on another channel; the
        // session outside the lane kept everything.
        assert_eq!(lane_sessions_lagged, [true, true]);
        assert!(!outside.is_lagging());
        assert_eq!(outside.len(), LANE_QUEUE_MAX + 1);
        assert_eq!(hub.lagged_total(), 2);
    }

    /// A burst queued for a lane is larger than a session's queue: the lane
    /// lets the session (on the same thread) drain past half full rather
    /// than filling its queue in one go and cutting it off. What the thread
    /// publishes meanwhile waits behind the rest of the burst.
    #[test]
    fn a_lane_lets_its_sessions_drain_during_a_burst_larger_than_their_queues() {
        let hub = Arc::new(Hub::with_lanes(1));
        let hub2 = hub.clone();
        let (offsets, lagging) = on_lane(&hub, move |lane| {
            Box::pin(async move {
                let hub = hub2;
                let small = QueueLimits {
                    messages: 4,
                    bytes: usize::MAX,
                };
                let outbox = Outbox::new(small);
                hub.subscribe(&ChannelName::parse("chat").unwrap(), &outbox);
                let sender = hub.clone();
                std::thread::spawn(move || {
                    for offset in 1..=12 {
                        sender.deliver(&publication("chat", offset, "x"));
                    }
                })
                .join()
                .unwrap();
                tokio::spawn(lane);
                let mut offsets = Vec::new();
                while offsets.len() < 13 {
                    tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
                        .await
                        .expect("the lane fills the outbox");
                    let mut batch = Vec::new();
                    if outbox.drain_into(&mut batch) != Drained::Open {
                        break;
                    }
                    if offsets.is_empty() {
                        // Mid-burst, from the lane's own thread.
                        hub.deliver(&publication("chat", 13, "x"));
                    }
                    offsets.extend(batch.iter().map(|p| p.offset()));
                }
                (offsets, outbox.is_lagging())
            })
        });
        assert!(!lagging, "cut off after {offsets:?}");
        assert_eq!(offsets, (1..=13).collect::<Vec<_>>());
        assert_eq!(hub.lagged_total(), 0);
    }

    #[test]
    fn outboxes_of_another_hubs_lane_are_handed_publications_directly() {
        let theirs = Arc::new(Hub::with_lanes(1));
        let ours = Arc::new(Hub::with_lanes(1));
        let ours2 = ours.clone();
        let delivered = on_lane(&theirs, move |_lane| {
            Box::pin(async move {
                let outbox = Outbox::new(LIMITS);
                ours2.subscribe(&ChannelName::parse("chat").unwrap(), &outbox);
                let delivered = ours2.deliver(&publication("chat", 1, "1"));
                (delivered, outbox.len())
            })
        });
        assert_eq!(delivered, (1, 1));
    }

    /// Polls a lane's fan-out task once, outside any runtime: it hands over
    /// one batch, or the part of one before a session it urged.
    fn step(lane: &mut LaneTask) {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = lane.as_mut().poll(&mut cx);
    }

    /// Runs `f` as a thread outside any lane would.
    fn outside<T>(f: impl FnOnce() -> T) -> T {
        let home = LANE.replace(None);
        let out = f();
        LANE.set(home);
        out
    }

    fn offsets(outbox: &Outbox) -> Vec<(String, u64)> {
        let mut batch = Vec::new();
        outbox.drain_into(&mut batch);
        batch
            .iter()
            .map(|p| (p.channel().to_string(), p.offset()))
            .collect()
    }

    /// What the chaos test caught: an engine's reset, handed to the hub
    /// while a session was getting ready, still waited in the session's
    /// lane when the session discarded its channel and read history; the
    /// lane then handed it over after the read, moving the session back.
    #[test]
    fn a_discard_drops_what_the_sessions_lane_still_holds_for_that_channel_only() {
        std::thread::spawn(|| {
            let hub = Arc::new(Hub::with_lanes(1));
            let mut lane: LaneTask = Box::pin(hub.clone().serve_lane(0));
            let chat = ChannelName::parse("chat").unwrap();
            let other = ChannelName::parse("other").unwrap();
            let roomy = QueueLimits {
                messages: 100,
                bytes: 1 << 20,
            };
            let (session, neighbour) = (Outbox::new(roomy), Outbox::new(roomy));
            for outbox in [&session, &neighbour] {
                hub.subscribe(&chat, outbox);
                hub.subscribe(&other, outbox);
            }
            let stale = Arc::new(Publication::reset_marker(
                chat.clone(),
                Position::new(Epoch::parse("phantom").unwrap(), 0),
            ));
            outside(|| {
                hub.deliver(&stale);
                hub.deliver(&publication("other", 1, "1"));
                hub.deliver(&publication("chat", 7, "7"));
            });
            hub.discard(&chat, &session);
            outside(|| hub.deliver(&publication("chat", 8, "8")));
            step(&mut lane);
            let c = |offset| ("chat".to_owned(), offset);
            let o = |offset| ("other".to_owned(), offset);
            assert_eq!(offsets(&session), [o(1), c(8)]);
            assert_eq!(offsets(&neighbour), [c(0), o(1), c(7), c(8)]);
            assert!(
                session.state.lock().unwrap().fences.is_empty(),
                "the lane is past the fence: it is gone"
            );
            // Later ones come through, from either side of the lane.
            outside(|| hub.deliver(&publication("chat", 9, "9")));
            step(&mut lane);
            hub.deliver(&publication("chat", 10, "10"));
            assert_eq!(offsets(&session), [c(9), c(10)]);
        })
        .join()
        .unwrap();
    }

    /// The lane paused in a burst with the rest of it in hand (a session
    /// past half full runs first): a session that discards then drops that
    /// rest too, and a neighbour still gets all of it.
    #[test]
    fn a_discard_drops_what_a_paused_lane_holds_in_hand() {
        std::thread::spawn(|| {
            let hub = Arc::new(Hub::with_lanes(1));
            let mut lane: LaneTask = Box::pin(hub.clone().serve_lane(0));
            let chat = ChannelName::parse("chat").unwrap();
            let small = QueueLimits {
                messages: 4,
                bytes: 1 << 20,
            };
            let (session, neighbour) = (Outbox::new(small), Outbox::new(small));
            hub.subscribe(&chat, &session);
            hub.subscribe(&chat, &neighbour);
            outside(|| {
                for offset in 1..=6 {
                    hub.deliver(&publication("chat", offset, "x"));
                }
            });
            step(&mut lane);
            // Urged at the third: the lane paused with 4-6 in hand.
            assert_eq!(session.len(), 3);
            assert!(!hub.lanes[0].is_idle(), "paused");
            let mut early = offsets(&neighbour);
            hub.discard(&chat, &session);
            step(&mut lane);
            step(&mut lane);
            assert!(
                offsets(&session).is_empty(),
                "1-6 were handed before the discard"
            );
            early.extend(offsets(&neighbour));
            let early: Vec<u64> = early.iter().map(|(_, offset)| *offset).collect();
            assert_eq!(early, [1, 2, 3, 4, 5, 6]);
        })
        .join()
        .unwrap();
    }

    #[derive(Debug, Clone)]
    enum LaneOp {
        /// Hands the hub a publication on channel 0 or 1, from outside any
        /// lane or from the lane's own thread.
        Deliver { channel: usize, outside: bool },
        /// Session 0 or 1 (on the lane) or 2 (outside any lane) discards a
        /// channel.
        Discard { session: usize, channel: usize },
        /// The lane's task runs once.
        Step,
        /// A session drains its outbox.
        Drain { session: usize },
    }

    fn lane_op() -> impl proptest::strategy::Strategy<Value = LaneOp> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0..2usize, any::<bool>())
                .prop_map(|(channel, outside)| LaneOp::Deliver { channel, outside }),
            2 => (0..3usize, 0..2usize)
                .prop_map(|(session, channel)| LaneOp::Discard { session, channel }),
            2 => Just(LaneOp::Step),
            2 => (0..3usize).prop_map(|session| LaneOp::Drain { session }),
        ]
    }

    proptest::proptest! {
        /// Whatever the interleaving of deliveries (from outside the lane or
        /// on its thread), lane steps, drains and discards, each session
        /// gets the publications of its channels in the order the hub was
        /// handed them, none twice; none handed before one of its discards
        /// of that channel after that discard; and, once the lane is idle,
        /// every one handed after its last discard of that channel.
        #[test]
        fn discards_fence_exactly_what_came_before_them(
            ops in proptest::collection::vec(lane_op(), 1..80),
        ) {
            let failure = std::thread::spawn(move || check_lane_ops(&ops)).join().unwrap();
            proptest::prop_assert!(failure.is_none(), "{}", failure.unwrap_or_default());
        }
    }

    /// Runs `ops` and returns what went wrong, if anything.
    fn check_lane_ops(ops: &[LaneOp]) -> Option<String> {
        let hub = Arc::new(Hub::with_lanes(1));
        let mut lane: LaneTask = Box::pin(hub.clone().serve_lane(0));
        let channels = [
            ChannelName::parse("a").unwrap(),
            ChannelName::parse("b").unwrap(),
        ];
        let roomy = QueueLimits {
            messages: 1000,
            bytes: 1 << 24,
        };
        let sessions = [
            Outbox::new(roomy),
            Outbox::new(roomy),
            outside(|| Outbox::new(roomy)),
        ];
        for outbox in &sessions {
            for channel in &channels {
                hub.subscribe(channel, outbox);
            }
        }
        // Times: each op is one tick. Handed: (tick, channel) by offset
        // (offsets are unique across channels). Discards: by session,
        // (tick, channel). Received: by session, (offset, tick drained).
        let mut handed: Vec<(usize, usize)> = Vec::new();
        let mut discards: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 3];
        let mut received: Vec<Vec<(u64, usize)>> = vec![Vec::new(); 3];
        let drain = |session: usize, tick: usize, received: &mut Vec<Vec<(u64, usize)>>| {
            let mut batch = Vec::new();
            sessions[session].drain_into(&mut batch);
            received[session].extend(batch.iter().map(|p| (p.offset(), tick)));
        };
        let mut tick = 0;
        for op in ops {
            tick += 1;
            match *op {
                LaneOp::Deliver {
                    channel,
                    outside: away,
                } => {
                    handed.push((tick, channel));
                    let offset = handed.len() as u64;
                    let name = channels[channel].as_str();
                    let publication = publication(name, offset, "x");
                    if away {
                        outside(|| hub.deliver(&publication));
                    } else {
                        hub.deliver(&publication);
                    }
                }
                LaneOp::Discard { session, channel } => {
                    hub.discard(&channels[channel], &sessions[session]);
                    discards[session].push((tick, channel));
                }
                LaneOp::Step => step(&mut lane),
                LaneOp::Drain { session } => drain(session, tick, &mut received),
            }
        }
        for _ in 0..=ops.len() {
            step(&mut lane);
        }
        tick += 1;
        for session in 0..3 {
            drain(session, tick, &mut received);
        }
        for (session, got) in received.iter().enumerate() {
            let offsets: Vec<u64> = got.iter().map(|(offset, _)| *offset).collect();
            if offsets.windows(2).any(|w| w[0] >= w[1]) {
                return Some(format!(
                    "session {session}: out of order or twice: {offsets:?}"
                ));
            }
            let fenced = |offset: u64, at: usize| {
                let (handed_at, channel) = handed[offset as usize - 1];
                discards[session]
                    .iter()
                    .any(|&(d, c)| c == channel && handed_at < d && d <= at)
            };
            for &(offset, drained_at) in got {
                if fenced(offset, drained_at) {
                    return Some(format!(
                        "session {session}: got {offset} after a discard of its channel that came later than it"
                    ));
                }
            }
            for offset in 1..=handed.len() as u64 {
                if !fenced(offset, tick) && !offsets.contains(&offset) {
                    return Some(format!(
                        "session {session}: never got {offset}, handed after its last discard; got {offsets:?}"
                    ));
                }
            }
        }
        None
    }
}
