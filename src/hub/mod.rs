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
//! What a client has not read is held in three places: its outbox, what its
//! session took out to write, and the socket's buffers. The bounds above
//! count only the first, so the other two are kept small: the kernel holds
//! at most `limits.unsent_bytes` unsent (see `server::bound_unsent`), and a
//! streaming session takes about as much at a time ([`Outbox::drain_into`]).
//! A client that reads slowly then leaves its publications in the outbox,
//! where the bounds cut it off and its lateness holds publishers back
//! (`api.backpressure`), instead of in buffers no limit sees.
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

use crate::broker::Fanout;
use crate::signal::{Signal, Wait};

use crate::message::{ChannelName, Publication};

mod lateness;
use lateness::Lateness;

/// Bounds of one session's queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub messages: usize,
    pub bytes: usize,
    /// Most bytes a streaming session takes out at a time (at least one
    /// publication): `limits.unsent_bytes`, or everything when that is 0.
    pub take: usize,
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
    /// Boxed, and none at all without a fence: every session has an
    /// outbox, and almost none has a fence for long.
    #[expect(
        clippy::box_collection,
        reason = "8 bytes in every outbox against a Vec's 24; the extra allocation is made only while a fence stands"
    )]
    fences: Option<Box<Vec<(ChannelName, u64)>>>,
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
        if let (Some(stamp), Some(fences)) = (stamp, state.fences.as_mut()) {
            // The lane hands publications over in stamp order: a fence
            // older than this one has nothing left behind it.
            fences.retain(|(_, fence)| *fence >= stamp);
            let superseded = fences
                .iter()
                .any(|(channel, _)| channel == publication.channel());
            if fences.is_empty() {
                state.fences = None;
            }
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

    /// Moves the oldest waiting publications into `batch` (in order), at
    /// most the limits' `take` bytes of them but at least one, and says
    /// whether the session may go on. What is left stays queued, counted by
    /// the bounds and by the lateness of the next take, and the session is
    /// woken to take it once it has written these.
    ///
    /// This keeps the rule of the lag policy for a client that reads
    /// slowly: whatever it has not read beyond one take and its socket's
    /// unsent bytes is in the outbox.
    pub fn drain_into(&self, batch: &mut Vec<Arc<Publication>>) -> Drained {
        self.drain_up_to(batch, self.limits.take)
    }

    /// Moves every waiting publication into `batch`: for a long-poll
    /// answer, which is written whole and ends the session.
    pub fn drain_all_into(&self, batch: &mut Vec<Arc<Publication>>) -> Drained {
        self.drain_up_to(batch, usize::MAX)
    }

    fn drain_up_to(&self, batch: &mut Vec<Arc<Publication>>, budget: usize) -> Drained {
        let mut state = self.state.lock().expect("outbox lock");
        if state.lagging {
            return Drained::Lagging;
        }
        let from = batch.len();
        let mut count = 0;
        let mut taken = 0;
        for publication in &state.queue {
            if count > 0 && taken + publication.size() > budget {
                break;
            }
            count += 1;
            taken += publication.size();
        }
        batch.extend(state.queue.drain(..count));
        state.bytes -= taken;
        if !state.queue.is_empty() {
            self.ready.notify();
        }
        if let Some(oldest) = batch.get(from) {
            Lateness::took(oldest.published_at_ms(), crate::message::now_ms);
        }
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
    /// back: its queue is past half of a bound, holds more than one take
    /// (a backlog is paced by the socket, not by the coalesce window), it
    /// lags, or it is closed.
    /// Wake-ups coalesce (the one for the first publication of a batch and
    /// the one for passing half full may arrive as one), so a session asks
    /// this on every wake-up instead of counting them.
    pub fn is_urgent(&self) -> bool {
        let state = self.state.lock().expect("outbox lock");
        state.lagging
            || state.closed
            || state.bytes > self.limits.take
            || self.past_half(state.queue.len(), state.bytes)
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
            let fences = state.fences.get_or_insert_default();
            fences.retain(|(fenced, _)| fenced != channel);
            fences.push((channel.clone(), fence));
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
    hub: u32,
    lane: u32,
}

thread_local! {
    /// The lane served by this thread, if it serves one.
    static LANE: Cell<Option<Home>> = const { Cell::new(None) };
}

/// Tells hubs apart in [`Home`].
static NEXT_HUB_ID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

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
    /// How late its sessions take what they are handed.
    lateness: Arc<Lateness>,
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
    id: u32,
    buckets: Box<[RwLock<HashMap<ChannelName, Subscribers>>]>,
    hasher: RandomState,
    lanes: Box<[Lane]>,
    /// Sessions cut off as slow consumers, for /metrics.
    lagged: AtomicU64,
    /// Publications handed to sessions, for /metrics.
    delivered: AtomicU64,
    /// Past this (ms), a session takes its publications late (see
    /// [`Hub::is_behind`]); 0 measures nothing.
    max_delay_ms: Arc<AtomicU64>,
    /// How long [`Hub::caught_up`] waits (ms).
    max_wait_ms: AtomicU64,
}

/// How often a publish held back looks again whether the fan-out caught up.
const CATCH_UP_POLL: std::time::Duration = std::time::Duration::from_millis(5);

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
            max_delay_ms: Arc::default(),
            max_wait_ms: AtomicU64::new(0),
        }
    }

    /// Takes `api.backpressure`: sessions that take publications more than
    /// `max_delay` after they were published take them late (zero turns
    /// backpressure off), and a publish waits at most `max_wait` for the
    /// fan-out to catch up ([`Hub::caught_up`]).
    pub fn set_backpressure(&self, config: &crate::config::BackpressureConfig) {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.max_delay_ms
            .store(ms(config.max_delay), Ordering::Relaxed);
        self.max_wait_ms
            .store(ms(config.max_wait), Ordering::Relaxed);
    }

    /// Waits while the fan-out runs behind ([`Hub::is_behind`]), at most
    /// the max wait; says whether it caught up. A publisher calls it before
    /// it stores anything, so one refused has stored nothing.
    ///
    /// This is the node's overload policy: when publications come faster
    /// than its sessions can write them, publishers are slowed (and told to
    /// retry when slowing them is not enough), rather than every message
    /// arriving ever later.
    pub async fn caught_up(&self) -> bool {
        if !self.is_behind() {
            return true;
        }
        let max_wait = self.max_wait_ms.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(max_wait);
        loop {
            // Looked at again after each short pause: only an overloaded
            // node's publishers pay for it.
            let pause = deadline.min(tokio::time::Instant::now() + CATCH_UP_POLL);
            tokio::time::sleep_until(pause).await;
            if !self.is_behind() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// The largest share, over the lanes, of recent takes from outboxes
    /// that came late (0 to 1; see `hub::lateness`).
    pub fn late_share(&self) -> f64 {
        let now = crate::message::now_ms();
        self.lanes
            .iter()
            .map(|lane| lane.lateness.late_share(now))
            .fold(0.0, f64::max)
    }

    /// Whether the fan-out runs behind: on some lane, most sessions take
    /// their publications more than the max delay after they were
    /// published. Never with the measure off.
    pub fn is_behind(&self) -> bool {
        self.max_delay_ms.load(Ordering::Relaxed) > 0 && self.late_share() > 0.5
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
        home.map(|home| (home.hub, home.lane as usize))
            .filter(|&(hub, lane)| hub == self.id && lane < self.lanes.len())
            .map(|(_, lane)| lane)
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
            lane: u32::try_from(index).expect("fewer lanes than u32::MAX"),
        }));
        Lateness::serve_on_this_thread(
            self.lanes[index].lateness.clone(),
            self.max_delay_ms.clone(),
        );
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
    ///
    /// No fence is needed when the session discards on its lane's own thread
    /// while the lane neither queues nor holds anything: the lane's task is
    /// not running then (one thread), so everything stamped so far has been
    /// handed over already. That is the common case (a session subscribing
    /// on its own task), and it keeps an idle session from holding a fence.
    pub fn discard(&self, channel: &ChannelName, outbox: &Outbox) {
        let fence = self.lane_of(outbox.home).and_then(|lane| {
            let queue = self.lanes[lane].queue.lock().expect("lane lock");
            let settled = self.current_lane() == Some(lane)
                && queue.publications.is_empty()
                && !queue.overflowed
                && !queue.paused;
            (!settled).then_some(queue.stamped)
        });
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

impl Fanout for Hub {
    fn deliver(&self, publication: &Arc<Publication>) -> usize {
        Hub::deliver(self, publication)
    }

    fn has_subscribers(&self, channel: &str) -> bool {
        Hub::has_subscribers(self, channel)
    }

    fn heard_here(&self, prefix: &str) -> Vec<ChannelName> {
        self.channels()
            .into_iter()
            .filter(|(name, subscribers)| *subscribers > 0 && name.as_str().starts_with(prefix))
            .map(|(name, _)| name)
            .collect()
    }
}

#[cfg(test)]
mod tests;
