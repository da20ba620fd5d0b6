//! The Redis engine: several pushgate nodes share channels, history and
//! presence through one Redis.
//!
//! # Keys (all under `engine.redis.prefix`, `P` below)
//!
//! - `P:{c}:m`, a hash: the channel's `epoch` and newest offset `top`.
//! - `P:{c}:h`, a stream: recent publications, oldest first, contiguous up
//!   to `top`; entry ids are Redis time, so `XTRIM MINID` trims by age.
//!   An entry holds the payload (`p`), byte for byte the pub/sub message.
//! - `P:{c}:i:<key>`: an idempotency key's result on channel `c`.
//! - `P:i:<key>`: the fingerprint of the publish that first used the key;
//!   on a cluster `P:{c}:c:<key>`, in the slot of the publish's least
//!   channel `c`, so that no publish depends on a master none of its
//!   channels lives on.
//! - `P:{c}`: the pub/sub channel carrying `c`'s publications.
//!
//! Channel names cannot hold `{` or `}`, so the braces are a Redis Cluster
//! hash tag: every key of one channel lives in one slot.
//!
//! # Publishing
//!
//! One script per channel ([`PUBLISH_SCRIPT`]) does everything atomically:
//! the idempotency check, the epoch (created on first use), the next offset,
//! `XADD` with `MAXLEN`, trimming by age, expiry, and `PUBLISH` of the
//! encoded publication. Its cost is O(1) whatever the number of
//! subscribers. A publish is answered only after the script ran.
//!
//! # Hearing publications
//!
//! A node subscribes in Redis only to channels with local subscribers, on
//! one dedicated pub/sub connection driven by one task (`listener::Listener`). A
//! publication arrives encoded once ([`encode`]'s format), is decoded once
//! into a [`Publication`] and handed to the hub.
//!
//! # Outages
//!
//! When Redis goes away, publishes answer 503 and connected clients stay
//! connected. The listener reconnects with capped, jittered backoff,
//! resubscribes, and checks every channel against its stream from the last
//! publication this node saw: the gap is delivered from history, or every
//! local subscriber gets an explicit reset ([`Publication::reset_marker`]).
//! A channel that Redis lost (restarted empty) comes back with a new epoch;
//! a reader ahead of the stream (Redis restored an older snapshot) makes the
//! read bump the epoch, and so does a node whose last delivered publication
//! is no longer the one at its offset (Redis lost the tail and numbered new
//! publications over it: see [`Shared::resync`]), so an offset a node
//! handed on is never reused silently.
//!
//! On a Redis Cluster each master is its own outage ([`router`] routes
//! commands per master and tracks which are down; [`cluster`] listens on
//! one connection per master): while one is away only its slots' channels
//! answer 503, and after any topology event (the master back, a replica
//! promoted, a slot moved) each affected channel is subscribed where its
//! slot lives and checked against its stream the same way.

mod cluster;
mod connection;
mod engine;
mod keys;
mod listener;
mod presence;
mod router;
mod scripts;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Client, Script, Value};
use tokio::sync::{mpsc, oneshot};

use self::connection::{client, failure, invoke_replicated, Commands, Connector};
use self::keys::Keys;
use self::router::{routed, Router};
use self::scripts::{
    parse_history_reply, parse_publish_reply, HISTORY_SCRIPT, JOIN_SCRIPT, LEAVE_SCRIPT,
    OCCUPANCY_SCRIPT, PRESENCE_SCRIPT, PUBLISH_SCRIPT, USER_SLOT_SCRIPT,
};
pub use self::wire::{decode, encode};
use self::wire::{Digest, WIRE_EPHEMERAL, WIRE_PRESENCE};
use super::{
    replay_from, Broker, BrokerError, EngineStats, Fanout, History, Member, Order, OrderHandler,
    PresenceMode, Publish, PublishOutcome, Published, RedisStats,
};
use crate::cursor::{Epoch, Position};
use crate::message::{compact_json, ChannelName, EventName, Publication};

/// Reconnect backoff of the pub/sub connection: from the first to the cap,
/// doubling, with full jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How often an idle pub/sub connection is checked with a PING.
const PUBSUB_PING: Duration = Duration::from_secs(5);
/// Channels per SUBSCRIBE when many are (re)subscribed at once.
const SUBSCRIBE_CHUNK: usize = 512;
/// Channels checked against Redis at once after a reconnect.
const RESYNC_CONCURRENCY: usize = 64;

/// How the Redis engine keeps history and reaches Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    /// `url` is one node of a Redis Cluster: keys and sharded pub/sub are
    /// routed by slot.
    pub cluster: bool,
    /// The CA certificates (PEM) a `rediss://` server is checked against,
    /// beside the system's: `engine.redis.tls_ca_file`'s, read once.
    pub tls_ca: Option<Vec<u8>>,
    pub prefix: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub idempotency_window: Duration,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// A publish is answered 200 only once this many replicas of its
    /// master confirm they hold it (`WAIT`); 0 does not wait.
    pub wait_replicas: u32,
    /// How long a publish waits for them.
    pub wait_timeout: Duration,
    /// Presence entries expire this long after their node last refreshed
    /// them.
    pub presence_ttl: Duration,
    /// This node's name: orders it broadcasts are not carried out twice.
    pub node: String,
}

/// Counters behind `/metrics`.
#[derive(Default)]
struct Stats {
    /// The command connection answered its last command.
    up: AtomicBool,
    /// The pub/sub connection is subscribed and in sync.
    pubsub_up: AtomicBool,
    reconnects: AtomicU64,
    command_errors: AtomicU64,
    command_seconds: crate::latency::Latency,
    messages: AtomicU64,
    malformed: AtomicU64,
    resets: AtomicU64,
    /// Publishes stored on a master but not confirmed by enough replicas.
    not_replicated: AtomicU64,
    /// `sunsubscribe`s a cluster master sent unasked (a slot moved).
    unsolicited_unsubscribes: AtomicU64,
}

/// What the node knows of a channel it listens to.
///
/// The invariant that keeps recovery exact on this node, so that a local
/// session is sent a reset only when history cannot cover its gap, never
/// because of a race between its history read and the pub/sub copy: while
/// `live`, the pub/sub connection is subscribed to the channel and every
/// publication after `last` is either handed to the hub already or on its
/// way through that connection; and no check of the channel against its
/// stream (a resync, which may end in a reset) is under way. A session
/// reads history only once its subscribe returned, which is once the
/// channel is live, and drops what the hub was handed before that read
/// (`Hub::discard`). So the read plus what the hub is handed afterwards
/// cover every publication after the session's position, and no reset made
/// from a reading of the stream older than the session's own reaches it.
/// This rests on the node knowing its connection is down: until the
/// listener sees a dead connection end (its stream closes, or a PING goes
/// unanswered), the channel stays live, so a session that reads a stream
/// Redis restarted meanwhile could still be handed what the dead
/// connection held, of the stream's previous epoch. On a cluster "the
/// pub/sub connection" is the one to the master serving the channel's slot
/// now; a channel whose subscription there is lost or moved is not live
/// until it is subscribed again and checked (see `cluster`).
#[derive(Default)]
struct Tracked {
    /// The newest publication handed to the hub, or the stream's position
    /// read once the subscription in Redis was confirmed (before any local
    /// session read history). `None` only until that first read.
    last: Option<Position>,
    /// Subscribed in Redis, `last` known, and the pub/sub connection in
    /// sync: a new local subscriber may read history at once. Cleared
    /// while the connection is down and while the channel is checked
    /// against its stream.
    live: bool,
    /// The digest of the publication at `last` (see [`Digest`]): what a
    /// check of the channel against its stream compares with the entry
    /// there. `None` when `last` is not a publication (a reset point, an
    /// empty stream).
    digest: Option<Digest>,
    /// An epoch the channel was moved away from after this node last read
    /// it: its publications still on their way through the pub/sub
    /// connection were published before the move, covered by the reset
    /// already handed to the hub, and are dropped.
    retired: Option<Epoch>,
}

/// State shared by the broker and its listener task.
struct Shared {
    conn: Connector,
    /// `PUBLISH`, or `SPUBLISH` (sharded, to the channel's slot) on a
    /// cluster.
    publish_command: &'static str,
    hub: Arc<dyn Fanout>,
    keys: Keys,
    options: RedisOptions,
    publish_script: Script,
    history_script: Script,
    join_script: Script,
    leave_script: Script,
    presence_script: Script,
    occupancy_script: Script,
    user_slot_script: Script,
    stats: Stats,
    /// Connection places this node holds, refreshed until released: user
    /// and connection.
    slots: Mutex<std::collections::HashSet<(String, String)>>,
    /// Carries out orders from other nodes.
    orders: Mutex<Option<super::OrderHandler>>,
    /// Members this node listed, refreshed until they leave: by channel and
    /// connection, the member JSON.
    listed: Mutex<HashMap<(ChannelName, String), String>>,
    /// Channels this node listens to, by name.
    tracked: Mutex<HashMap<ChannelName, Tracked>>,
}

enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), BrokerError>>),
    /// Stop listening (unless a local subscriber came back meanwhile). The
    /// sender is dropped once Redis has answered the unsubscribe, or once
    /// the command was found to need none: the caller's wait ends then.
    Unsubscribe(ChannelName, oneshot::Sender<()>),
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    listener: mpsc::UnboundedSender<Command>,
}

impl RedisBroker {
    /// Creates the engine and starts its listener. Redis need not be up:
    /// the engine connects when it is, and reports unavailable until then.
    pub fn new(hub: Arc<dyn Fanout>, options: RedisOptions) -> Result<Arc<RedisBroker>, String> {
        let (conn, listen) = if options.cluster {
            let router = Arc::new(Router::new(&options));
            (Connector::Cluster(router.clone()), Listen::Cluster(router))
        } else {
            let client = client(&options)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(options.connect_timeout))
                .set_response_timeout(Some(options.command_timeout))
                .set_number_of_retries(1)
                .set_max_delay(BACKOFF_CAP);
            let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
                .map_err(|err| format!("cannot set up the Redis connection: {err}"))?;
            (Connector::Single(conn), Listen::Single(Box::new(client)))
        };
        let shared = Arc::new(Shared {
            conn,
            publish_command: if options.cluster {
                "SPUBLISH"
            } else {
                "PUBLISH"
            },
            hub,
            keys: Keys {
                prefix: options.prefix.clone(),
            },
            options,
            publish_script: Script::new(PUBLISH_SCRIPT),
            history_script: Script::new(HISTORY_SCRIPT),
            join_script: Script::new(JOIN_SCRIPT),
            leave_script: Script::new(LEAVE_SCRIPT),
            presence_script: Script::new(PRESENCE_SCRIPT),
            occupancy_script: Script::new(OCCUPANCY_SCRIPT),
            user_slot_script: Script::new(USER_SLOT_SCRIPT),
            stats: Stats::default(),
            slots: Mutex::default(),
            orders: Mutex::default(),
            listed: Mutex::default(),
            tracked: Mutex::default(),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        match listen {
            Listen::Single(client) => {
                tokio::spawn(
                    listener::Listener {
                        shared: Arc::downgrade(&shared),
                        client: *client,
                        commands: receiver,
                    }
                    .run(),
                );
            }
            Listen::Cluster(router) => {
                tokio::spawn(cluster::cluster_listener(
                    Arc::downgrade(&shared),
                    router,
                    receiver,
                ));
            }
        }
        tokio::spawn(keep_alive(Arc::downgrade(&shared)));
        tokio::spawn(presence::refresh_presence(Arc::downgrade(&shared)));
        Ok(Arc::new(RedisBroker {
            shared,
            listener: commands,
        }))
    }
}

impl RedisBroker {
    /// Ready on a cluster: every master of the slot map answers PING, and
    /// every local channel is subscribed where its slot lives and checked.
    /// Otherwise the reason names the slots of the masters that are down.
    async fn cluster_ready(&self, router: &Arc<Router>) -> Result<(), BrokerError> {
        router.refresh(false).await;
        let masters = router.map().masters();
        if masters.is_empty() {
            return Err(BrokerError::Unavailable(
                "no Redis Cluster node answered CLUSTER SLOTS".into(),
            ));
        }
        let timeout = self.shared.options.command_timeout;
        futures_util::future::join_all(masters.iter().map(|(addr, _)| async move {
            let answered = match router.node(addr) {
                Ok(mut conn) => matches!(
                    tokio::time::timeout(
                        timeout,
                        redis::cmd("PING").query_async::<String>(&mut conn)
                    )
                    .await,
                    Ok(Ok(_))
                ),
                Err(_) => false,
            };
            router.reached(addr, answered);
        }))
        .await;
        let down = router.down();
        if !down.is_empty() {
            return Err(BrokerError::Unavailable(format!(
                "Redis Cluster masters are down for slots {}",
                down.join(" ")
            )));
        }
        if !self.shared.stats.pubsub_up.load(Ordering::Relaxed) {
            return Err(BrokerError::Unavailable(
                "the pub/sub connections to the Redis Cluster are not up yet".into(),
            ));
        }
        Ok(())
    }
}

/// How a node hears Redis: a dedicated pub/sub connection to one server, or
/// one per cluster master (see `cluster`).
enum Listen {
    Single(Box<Client>),
    Cluster(Arc<Router>),
}

/// Which cluster master a command must reach: the one serving a key's
/// slot, or any. One server takes every command.
#[derive(Clone, Copy)]
enum Route<'a> {
    Key(&'a str),
    Any,
}

impl Shared {
    /// Runs a command with the configured deadline, counting it. A command
    /// refused before it was sent (the connection was down when it was
    /// issued) is tried once more: the connection manager reconnects on a
    /// failure, so the first command after Redis came back would otherwise
    /// fail for nothing.
    async fn run<T, F, Fut>(
        &self,
        route: Route<'_>,
        may_write: bool,
        command: F,
    ) -> Result<T, BrokerError>
    where
        F: Fn(Commands) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.options.command_timeout;
        let outcome = match &self.conn {
            Connector::Single(manager) => {
                let attempt = || command(Commands::Single(manager.clone()));
                let mut outcome = tokio::time::timeout_at(deadline, attempt()).await;
                if let Ok(Err(err)) = &outcome {
                    if err.is_connection_refusal() {
                        outcome = tokio::time::timeout_at(deadline, attempt()).await;
                    }
                }
                outcome
            }
            Connector::Cluster(router) => routed(router, route, deadline, &command).await,
        };
        let stats = &self.stats;
        stats.command_seconds.observe(started.elapsed());
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(failure(&err, may_write)),
            Err(_) => Err(if may_write {
                BrokerError::OutcomeUnknown("Redis did not answer in time".into())
            } else {
                BrokerError::Unavailable("Redis did not answer in time".into())
            }),
        };
        if result.is_err() {
            stats.command_errors.fetch_add(1, Ordering::Relaxed);
        }
        // On a cluster, reachability is per master (the router's).
        if let Connector::Single(_) = self.conn {
            match &result {
                Ok(_) => {
                    if !stats.up.swap(true, Ordering::Relaxed) {
                        tracing::info!("engine: Redis is reachable");
                    }
                }
                Err(err) => {
                    if stats.up.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %err, "engine: Redis is unreachable");
                    }
                }
            }
        }
        result
    }

    async fn publish_one(
        &self,
        channel: &ChannelName,
        publish: &Publish,
        data: &str,
        fingerprint: &str,
    ) -> Result<(Published, bool), BrokerError> {
        let name = channel.as_str();
        let mut invocation = self.publish_script.prepare_invoke();
        invocation
            .key(self.keys.meta(name))
            .key(self.keys.stream(name));
        if let Some(key) = &publish.idempotency_key {
            invocation.key(self.keys.idempotency(name, key));
        }
        invocation
            .arg(Epoch::random().as_str())
            .arg(self.options.history_size)
            .arg(millis(self.options.history_ttl))
            .arg(millis(self.options.history_ttl))
            .arg(millis(self.options.idempotency_window))
            .arg(fingerprint)
            .arg(self.keys.pubsub(name))
            .arg(name)
            .arg(publish.event.as_ref().map_or("", EventName::as_str))
            .arg(data)
            .arg(self.publish_command);
        let (replicas, wait) = (self.options.wait_replicas, self.options.wait_timeout);
        invocation.arg(if replicas > 0 { "1" } else { "0" });
        invocation.arg(match &publish.publisher {
            Some(user) => serde_json::to_string(user).expect("a string serializes"),
            None => String::new(),
        });
        let invocation = &invocation;
        let route = Route::Key(&self.keys.meta(name));
        let value: Value = if replicas == 0 {
            self.run(route, true, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?
        } else {
            // 200 means stored where a failover keeps it: on the master and
            // on `replicas` of its replicas.
            let (value, confirmed) = self
                .run(route, true, |mut conn| async move {
                    invoke_replicated(invocation, replicas, wait, &mut conn).await
                })
                .await?;
            if confirmed < replicas {
                self.stats.not_replicated.fetch_add(1, Ordering::Relaxed);
                return Err(BrokerError::NotReplicated(format!(
                    "{confirmed} of {replicas} replicas confirmed `{channel}` within {wait:?}"
                )));
            }
            value
        };
        let (epoch, offset, duplicate, seen) = parse_publish_reply(&value)
            .ok_or_else(|| BrokerError::OutcomeUnknown(format!("unexpected reply {value:?}")))?;
        if duplicate && seen.as_deref() != Some(fingerprint) {
            return Err(BrokerError::KeyReused);
        }
        Ok((
            Published::new(channel.clone(), Position::new(epoch, offset)),
            duplicate,
        ))
    }

    /// Reads a channel's stream for a reader at `since` (or the newest
    /// `limit` without one).
    async fn read(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let (history, _) = self
            .read_checked(channel, since, None, limit, false)
            .await?;
        Ok(history)
    }

    /// Reads a channel's stream like [`Shared::read`], and with `digest`,
    /// the node's own record of the publication at `since`, checks that
    /// the stream still holds that publication there: when it does not,
    /// the script moves the channel to a new epoch and the history read is
    /// not recovered. With `digests`, also returns each publication's
    /// digest (for a node handing them on).
    async fn read_checked(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        digest: Option<Digest>,
        limit: usize,
        digests: bool,
    ) -> Result<(History, Vec<Option<Digest>>), BrokerError> {
        let name = channel.as_str();
        let (since_epoch, since_offset) = match since {
            Some(since) => (since.epoch.as_str().to_owned(), since.offset),
            None => (String::new(), 0),
        };
        let mut invocation = self.history_script.prepare_invoke();
        invocation
            .key(self.keys.meta(name))
            .key(self.keys.stream(name))
            .arg(since_epoch)
            .arg(since_offset)
            .arg(limit.min(self.options.history_size))
            .arg(millis(self.options.history_ttl))
            .arg(Epoch::random().as_str())
            .arg(millis(super::EPOCH_MOVE_INTERVAL))
            .arg(digest.as_ref().map_or(String::new(), Digest::hex));
        // The script may move the epoch; doing so twice is harmless.
        let invocation = &invocation;
        let value: Value = self
            .run(
                Route::Key(&self.keys.meta(name)),
                false,
                |mut conn| async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        let unexpected = || BrokerError::Unavailable(format!("unexpected history reply {value:?}"));
        let reply = parse_history_reply(&value).ok_or_else(unexpected)?;
        let (top, len) = (reply.top, reply.len);
        let Some(epoch) = reply.epoch else {
            // Unknown channel: empty, offset 0, valid in any later epoch.
            return Ok((
                History {
                    publications: Vec::new(),
                    position: Position::new(Epoch::random(), 0),
                    recovered: since.is_none_or(|since| since.offset == 0),
                },
                Vec::new(),
            ));
        };
        let position = Position::new(epoch, top);
        let oldest = top + 1 - len.min(top);
        let mut publications = Vec::with_capacity(reply.payloads.len());
        for payload in reply.payloads.iter().rev() {
            match decode(payload) {
                Some(publication) => {
                    publications.push((Arc::new(publication), digests.then(|| Digest::of(payload))))
                }
                None => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return Err(BrokerError::Unavailable(format!(
                        "channel `{channel}` holds a publication pushgate cannot read"
                    )));
                }
            }
        }
        let first = match since {
            None => 1,
            Some(since) => match replay_from(since, epoch, top, oldest) {
                Some(first) => first,
                None => return Ok((History::lost(position), Vec::new())),
            },
        };
        publications.retain(|(p, _)| p.position().epoch == epoch && p.offset() >= first);
        publications.truncate(limit);
        let (publications, digests) = publications.into_iter().unzip();
        Ok((
            History {
                publications,
                position,
                recovered: true,
            },
            digests,
        ))
    }

    /// Marks every tracked channel live, or none (see [`Tracked::live`]).
    fn set_live(&self, live: bool) {
        for state in self.tracked.lock().expect("tracked lock").values_mut() {
            state.live = live && state.last.is_some();
        }
    }

    /// Marks one tracked channel live, or not (see [`Tracked::live`]).
    fn set_channel_live(&self, channel: &ChannelName, live: bool) {
        if let Some(state) = self
            .tracked
            .lock()
            .expect("tracked lock")
            .get_mut(channel.as_str())
        {
            state.live = live && state.last.is_some();
        }
    }

    /// Hands a publication from Redis to the hub, once and in order, with
    /// its digest (see [`Tracked::digest`]).
    fn deliver(&self, publication: Arc<Publication>, digest: Option<Digest>) {
        let mut tracked = self.tracked.lock().expect("tracked lock");
        let Some(state) = tracked.get_mut(publication.channel().as_str()) else {
            return; // No longer listened to here.
        };
        let epoch = publication.position().epoch;
        if state.retired == Some(epoch) {
            return; // Published before a move this node reset its subscribers for.
        }
        if let Some(last) = state.last {
            if last.epoch == epoch && publication.offset() <= last.offset {
                return; // Delivered already (a resync overlapping live ones).
            }
        }
        state.last = Some(publication.position());
        state.digest = digest;
        // Under the lock, so a resync and the live path never interleave.
        self.hub.deliver(&publication);
    }

    /// Reads where a channel's stream stands, just after its subscription
    /// in Redis was confirmed and before any local session reads history
    /// (they wait for `live`): from here on the hub is handed everything
    /// (see [`Tracked`]).
    async fn start_at_stream(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        // The newest publication too, for its digest: where this node
        // starts is checked like any publication it handed on.
        let (history, digests) = self.read_checked(channel, None, None, 1, true).await?;
        let position = history.position;
        let digest = match history.publications.last() {
            Some(newest) if newest.position() == position => digests.last().copied().flatten(),
            _ => None,
        };
        let mut tracked = self.tracked.lock().expect("tracked lock");
        if let Some(state) = tracked.get_mut(channel.as_str()) {
            if state.last.is_none() {
                state.last = Some(position);
                state.digest = digest;
            }
        }
        Ok(())
    }

    /// Brings a channel's local subscribers up to its stream after the
    /// pub/sub connection was lost, or its subscription moved: the gap
    /// from history, or a reset.
    ///
    /// The invariant that keeps a lost publication from being skipped
    /// silently when the store numbered others over it (a promoted replica
    /// that lacked the tail, a snapshot restored without it), enforced
    /// here and in the history script: the gap after `last` is taken from
    /// history only if the entry at `last` is still the publication this
    /// node handed on (its payload has the same SHA-1, see [`Digest`]),
    /// read in the same script as the gap. The payload holds the channel,
    /// epoch, offset, Redis time in ms, event and data: another publication
    /// numbered at `last` matches only if it is identical in content and
    /// millisecond, and then nothing was lost. Otherwise the channel moves
    /// to a new epoch in Redis, once per loss whichever nodes notice it:
    /// every position in the old epoch, a client's cursor as well as a
    /// node's, is then answered with a reset, and whatever was numbered in
    /// the old epoch after the loss is covered by that reset (`retired`
    /// drops its copies still on their way). A `last` without a digest (a
    /// reset point, an empty stream) is checked only for being ahead of the
    /// stream.
    async fn resync(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let (last, digest) = {
            let tracked = self.tracked.lock().expect("tracked lock");
            match tracked.get(channel.as_str()) {
                Some(state) => (state.last, state.digest),
                None => return Ok(()),
            }
        };
        let Some(since) = last else {
            // Its start was never read, so no local session has read
            // history yet: the stream's position now is where they start.
            return self.start_at_stream(channel).await;
        };
        let (history, digests) = self
            .read_checked(channel, Some(since), digest, usize::MAX, true)
            .await?;
        if history.recovered {
            for (publication, digest) in history.publications.into_iter().zip(digests) {
                self.deliver(publication, digest);
            }
            return Ok(());
        }
        // Not covered: the subscribers are told, and get what the stream
        // still holds after the reset point (all of it is newer than what
        // they lost).
        let (stream, digests) = self
            .read_checked(channel, None, None, usize::MAX, true)
            .await?;
        let reset_to = match stream.publications.first() {
            Some(oldest) => Position::new(stream.position.epoch, oldest.offset() - 1),
            None => stream.position,
        };
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            %channel,
            from = %since,
            to = %reset_to,
            "engine: history does not hold what this node handed on after that point; subscribers get a reset"
        );
        {
            let mut tracked = self.tracked.lock().expect("tracked lock");
            let Some(state) = tracked.get_mut(channel.as_str()) else {
                return Ok(());
            };
            state.last = Some(reset_to);
            state.digest = None;
            if since.epoch != reset_to.epoch {
                state.retired = Some(since.epoch);
            }
            self.hub.deliver(&Arc::new(Publication::reset_marker(
                channel.clone(),
                reset_to,
            )));
        }
        for (publication, digest) in stream.publications.into_iter().zip(digests) {
            self.deliver(publication, digest);
        }
        Ok(())
    }
}

/// A channel's state in Redis expires with its history (`history.ttl` after
/// its last publication), like a channel the memory engine frees; while a
/// node has subscribers for it, that node keeps it alive, so an idle channel
/// keeps its epoch and its subscribers are never reset for nothing.
async fn keep_alive(shared: std::sync::Weak<Shared>) {
    let every = {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        (shared.options.history_ttl / 3).clamp(Duration::from_millis(100), Duration::from_secs(60))
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.reset();
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let metas: Vec<String> = shared
            .tracked
            .lock()
            .expect("tracked lock")
            .keys()
            .map(|channel| shared.keys.meta(channel.as_str()))
            .collect();
        let ttl = millis(shared.options.history_ttl);
        // One command per channel, many in flight (a cluster routes each
        // to its channel's slot).
        let failed = failures(metas.into_iter().map(|meta| {
            let shared = &shared;
            async move {
                let meta = &meta;
                shared
                    .run(Route::Key(meta), false, |mut conn| async move {
                        redis::cmd("PEXPIRE")
                            .arg(meta)
                            .arg(ttl)
                            .query_async::<i64>(&mut conn)
                            .await
                    })
                    .await
            }
        }))
        .await;
        if failed > 0 {
            tracing::debug!(
                failed,
                "engine: could not keep some subscribed channels alive"
            );
        }
    }
}

/// Runs `tasks`, at most [`RESYNC_CONCURRENCY`] at a time, and answers how
/// many failed: upkeep that retries on its next round needs no more.
async fn failures<T, E>(
    tasks: impl IntoIterator<Item = impl std::future::Future<Output = Result<T, E>>>,
) -> usize {
    futures_util::stream::iter(tasks)
        .buffer_unordered(RESYNC_CONCURRENCY)
        .filter(|outcome| std::future::ready(outcome.is_err()))
        .count()
        .await
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u128::from(u64::MAX)) as u64
}
