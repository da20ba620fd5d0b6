//! The in-memory engine: one node, no dependencies.
//!
//! Channels live in a sharded map. Each holds its epoch (fresh for every
//! incarnation of the channel), its newest offset, and a ring of recent
//! publications: at least `history.size` of them, none older than
//! `history.ttl`. Publishing numbers, stores and hands the publication to the
//! hub under the shard's lock, so every channel's subscribers see its offsets
//! in order.
//!
//! A sweeper drops expired history and frees channels that have neither
//! history nor local subscribers, so a million one-off channels leave no
//! trace. A freed channel that comes back gets a new epoch; a reader at offset
//! 0 (the usual case for an empty channel) is still valid in it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    replay_from, Broker, BrokerError, EngineStats, Fanout, History, Member, Order, OrderHandler,
    PresenceMode, Publish, PublishOutcome, Published, EPOCH_MOVE_INTERVAL,
};
use crate::cursor::{Epoch, Position};
use crate::message::{now_ms, ChannelName, EventName, Publication};

/// Shards of the channel map; publishes to different shards never contend.
const SHARDS: usize = 64;

/// How the memory engine keeps history.
#[derive(Debug, Clone, Copy)]
pub struct MemoryOptions {
    /// Publications kept per channel.
    pub history_size: usize,
    /// Older publications are never replayed.
    pub history_ttl: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_window: Duration,
}

pub struct MemoryBroker {
    shards: Box<[Mutex<HashMap<ChannelName, Channel>>]>,
    hasher: RandomState,
    hub: Arc<dyn Fanout>,
    options: MemoryOptions,
    idempotency: Mutex<Idempotency>,
    /// Publications held in history across all channels, for /metrics.
    history_len: AtomicU64,
    /// Who is on each channel with presence, by connection.
    presence: Mutex<HashMap<ChannelName, HashMap<String, Member>>>,
    /// The channels [`Broker::occupancy`] last found heard.
    occupied: Mutex<std::collections::HashSet<ChannelName>>,
}

struct Channel {
    epoch: Epoch,
    /// Newest offset; 0 before the first publication.
    top: u64,
    /// Contiguous offsets, oldest first, ending at `top` (when not empty).
    history: VecDeque<Arc<Publication>>,
    /// When a reader ahead of the stream last moved the epoch.
    moved: Option<Instant>,
}

impl Channel {
    fn new() -> Channel {
        Channel {
            epoch: Epoch::random(),
            top: 0,
            history: VecDeque::new(),
            moved: None,
        }
    }

    /// A reader claims offsets past `top`: they cannot have come from this
    /// stream, so its epoch moves (at most once per
    /// [`EPOCH_MOVE_INTERVAL`]) and no offset is ever reused silently.
    /// Returns how many publications went with the old epoch.
    fn move_epoch(&mut self, now: Instant) -> usize {
        if self
            .moved
            .is_some_and(|moved| now.duration_since(moved) < EPOCH_MOVE_INTERVAL)
        {
            return 0;
        }
        self.moved = Some(now);
        self.epoch = Epoch::random();
        std::mem::take(&mut self.history).len()
    }

    /// Drops publications beyond `size` or published before `cutoff_ms`;
    /// returns how many went.
    fn trim(&mut self, size: usize, cutoff_ms: u64) -> usize {
        let before = self.history.len();
        while self.history.len() > size
            || self
                .history
                .front()
                .is_some_and(|p| p.published_at_ms() < cutoff_ms)
        {
            self.history.pop_front();
        }
        before - self.history.len()
    }

    /// The oldest offset that may be replayed (`top + 1` when none).
    fn oldest(&self) -> u64 {
        self.history.front().map_or(self.top + 1, |p| p.offset())
    }

    fn position(&self) -> Position {
        Position::new(self.epoch, self.top)
    }
}

/// Idempotency keys seen within the window, and what they published.
#[derive(Default)]
struct Idempotency {
    /// The publish's fingerprint and where it landed.
    results: HashMap<String, (u64, Vec<Published>)>,
    /// Keys in the order they expire.
    expiry: VecDeque<(Instant, String)>,
}

impl Idempotency {
    fn purge(&mut self, now: Instant) {
        while let Some((expires, _)) = self.expiry.front() {
            if *expires > now {
                break;
            }
            let (_, key) = self.expiry.pop_front().expect("front exists");
            self.results.remove(&key);
        }
        if self.results.capacity() > 64 && self.results.len() < self.results.capacity() / 4 {
            self.results.shrink_to_fit();
            self.expiry.shrink_to_fit();
        }
    }
}

impl MemoryBroker {
    /// Creates the engine and starts its sweeper (which stops when the
    /// engine is dropped).
    pub fn new(hub: Arc<dyn Fanout>, options: MemoryOptions) -> Arc<MemoryBroker> {
        let broker = Arc::new(MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            hub,
            options,
            idempotency: Mutex::default(),
            history_len: AtomicU64::new(0),
            presence: Mutex::default(),
            occupied: Mutex::default(),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep(
                Arc::downgrade(&broker),
                sweep_interval(options.history_ttl),
            ));
        }
        broker
    }

    fn shard(&self, channel: &str) -> &Mutex<HashMap<ChannelName, Channel>> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    fn cutoff_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.options.history_ttl.as_millis() as u64)
    }

    fn publish_one(
        &self,
        channel: &ChannelName,
        event: Option<&EventName>,
        publisher: Option<&str>,
        data: &str,
        now: u64,
    ) -> Published {
        let mut shard = self.shard(channel.as_str()).lock().expect("channel lock");
        let state = shard.entry(channel.clone()).or_insert_with(Channel::new);
        state.top += 1;
        let publication = Arc::new(Publication::by(
            channel.clone(),
            state.position(),
            event.cloned(),
            publisher,
            data,
            now,
        ));
        state.history.push_back(publication.clone());
        let dropped = state.trim(self.options.history_size, self.cutoff_ms(now));
        self.history_len.fetch_add(1, Ordering::Relaxed);
        self.history_len
            .fetch_sub(dropped as u64, Ordering::Relaxed);
        // Under the lock, so concurrent publishers cannot reorder a channel.
        self.hub.deliver(&publication);
        Published::new(channel.clone(), publication.position())
    }

    fn publish_now(&self, publish: &Publish) -> Vec<Published> {
        let now = now_ms();
        publish
            .channels
            .iter()
            .map(|channel| {
                self.publish_one(
                    channel,
                    publish.event.as_ref(),
                    publish.publisher.as_deref(),
                    publish.data.get(),
                    now,
                )
            })
            .collect()
    }

    /// Drops expired history and frees channels with neither history nor
    /// local subscribers. Returns how many channels were freed.
    pub fn sweep_once(&self) -> usize {
        let cutoff = self.cutoff_ms(now_ms());
        let mut freed = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock().expect("channel lock");
            let before = shard.len();
            shard.retain(|name, channel| {
                let dropped = channel.trim(self.options.history_size, cutoff);
                self.history_len
                    .fetch_sub(dropped as u64, Ordering::Relaxed);
                !channel.history.is_empty() || self.hub.has_subscribers(name.as_str())
            });
            freed += before - shard.len();
            // A burst of one-off channels must not leave its table behind.
            if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
                shard.shrink_to_fit();
            }
        }
        self.idempotency
            .lock()
            .expect("idempotency lock")
            .purge(Instant::now());
        freed
    }
}

/// How often the sweeper runs: often enough that expired history goes soon
/// after its ttl, rarely enough to cost nothing.
fn sweep_interval(ttl: Duration) -> Duration {
    (ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

async fn sweep(broker: Weak<MemoryBroker>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(broker) = broker.upgrade() else {
            return;
        };
        broker.sweep_once();
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, publish: Publish) -> Result<PublishOutcome, BrokerError> {
        let Some(key) = &publish.idempotency_key else {
            return Ok(PublishOutcome {
                results: self.publish_now(&publish),
                duplicate: false,
            });
        };
        // Parsed outside the lock: it reads the whole of `data`.
        let fingerprint = publish.fingerprint();
        // Held across the publish, so two racing requests with one key
        // publish once. The memory engine never waits inside.
        let mut seen = self.idempotency.lock().expect("idempotency lock");
        let now = Instant::now();
        seen.purge(now);
        if let Some((first, results)) = seen.results.get(key) {
            if *first != fingerprint {
                return Err(BrokerError::KeyReused);
            }
            return Ok(PublishOutcome {
                results: results.clone(),
                duplicate: true,
            });
        }
        let results = self.publish_now(&publish);
        seen.results
            .insert(key.clone(), (fingerprint, results.clone()));
        seen.expiry
            .push_back((now + self.options.idempotency_window, key.clone()));
        Ok(PublishOutcome {
            results,
            duplicate: false,
        })
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let cutoff = self.cutoff_ms(now_ms());
        let mut shard = self.shard(channel.as_str()).lock().expect("channel lock");
        let Some(state) = shard.get_mut(channel.as_str()) else {
            // Reading creates nothing. An unknown channel is empty: offset 0,
            // valid in whatever epoch the channel later gets.
            return Ok(History {
                publications: Vec::new(),
                position: Position::new(Epoch::random(), 0),
                recovered: since.is_none_or(|since| since.offset == 0),
            });
        };
        let dropped = state.trim(self.options.history_size, cutoff);
        self.history_len
            .fetch_sub(dropped as u64, Ordering::Relaxed);
        if let Some(since) = since {
            if since.epoch == state.epoch && since.offset > state.top {
                let dropped = state.move_epoch(Instant::now());
                self.history_len
                    .fetch_sub(dropped as u64, Ordering::Relaxed);
            }
        }
        let position = state.position();
        let oldest = state.oldest();

        let first = match since {
            None => (state.top.saturating_sub(limit as u64) + 1).max(oldest),
            Some(since) => match replay_from(since, state.epoch, state.top, oldest) {
                Some(first) => first,
                None => return Ok(History::lost(position)),
            },
        };
        let skip = first.saturating_sub(oldest) as usize;
        let publications = state
            .history
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect();
        Ok(History {
            publications,
            position,
            recovered: true,
        })
    }

    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError> {
        let shard = self.shard(channel.as_str()).lock().expect("channel lock");
        Ok(shard
            .get(channel.as_str())
            .map_or_else(|| Position::new(Epoch::random(), 0), Channel::position))
    }

    async fn subscribe(&self, _channel: &ChannelName) -> Result<(), BrokerError> {
        // Publications reach the hub directly; the sweeper asks the hub
        // before freeing a channel.
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &ChannelName) {}

    async fn join(
        &self,
        channel: &ChannelName,
        member: &Member,
        mode: PresenceMode,
    ) -> Result<bool, BrokerError> {
        let mut first = false;
        if mode.listed {
            let mut presence = self.presence.lock().expect("presence lock");
            let members = presence.entry(channel.clone()).or_default();
            first = member.user.is_some()
                && !members
                    .values()
                    .any(|m| m.user == member.user && m.connection != member.connection);
            members.insert(member.connection.clone(), member.clone());
        }
        if mode.announced {
            self.hub.deliver(&Arc::new(Publication::presence_event(
                channel.clone(),
                true,
                member.event_json(channel, true),
            )));
        }
        Ok(first)
    }

    async fn leave(&self, channel: &ChannelName, member: &Member, mode: PresenceMode) -> bool {
        let mut last = false;
        if mode.listed {
            let mut presence = self.presence.lock().expect("presence lock");
            if let Some(members) = presence.get_mut(channel.as_str()) {
                let removed = members.remove(&member.connection).is_some();
                last = removed
                    && member.user.is_some()
                    && !members.values().any(|m| m.user == member.user);
                if members.is_empty() {
                    presence.remove(channel.as_str());
                }
            }
        }
        if mode.announced {
            self.hub.deliver(&Arc::new(Publication::presence_event(
                channel.clone(),
                false,
                member.event_json(channel, false),
            )));
        }
        last
    }

    async fn heard(&self, prefix: &str) -> Result<Vec<ChannelName>, BrokerError> {
        Ok(self.hub.heard_here(prefix))
    }

    async fn hearing(&self, channel: &ChannelName) -> Result<usize, BrokerError> {
        Ok(usize::from(self.hub.has_subscribers(channel.as_str())))
    }

    async fn occupancy(&self, channel: &ChannelName) -> Result<Option<bool>, BrokerError> {
        let heard = self.hub.has_subscribers(channel.as_str());
        let mut occupied = self.occupied.lock().expect("occupied lock");
        let changed = if heard {
            occupied.insert(channel.clone())
        } else {
            occupied.remove(channel)
        };
        Ok(changed.then_some(heard))
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let presence = self.presence.lock().expect("presence lock");
        let mut members: Vec<Member> = presence
            .get(channel.as_str())
            .map(|members| members.values().cloned().collect())
            .unwrap_or_default();
        members.sort_by(|a, b| a.connection.cmp(&b.connection));
        Ok(members)
    }

    async fn broadcast(&self, _order: &Order) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn send_ephemeral(&self, publication: Arc<Publication>) -> Result<(), BrokerError> {
        self.hub.deliver(&publication);
        Ok(())
    }

    fn on_orders(&self, _handler: OrderHandler) {}

    async fn claim_user_slot(
        &self,
        _user: &str,
        _connection: &str,
        _limit: usize,
    ) -> Result<bool, BrokerError> {
        Ok(true)
    }

    async fn release_user_slot(&self, _user: &str, _connection: &str) {}

    async fn ready(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        EngineStats {
            channels: self
                .shards
                .iter()
                .map(|shard| shard.lock().expect("channel lock").len() as u64)
                .sum(),
            history_publications: self.history_len.load(Ordering::Relaxed),
            redis: None,
        }
    }
}
