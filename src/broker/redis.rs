//! The Redis engine: several pushgate nodes share channels, history and
//! presence through one Redis.
//!
//! # Keys (all under `engine.redis.prefix`, `P` below)
//!
//! - `P:{c}:m`, a hash: the channel's `epoch` and newest offset `top`.
//! - `P:{c}:h`, a stream: recent publications, oldest first, contiguous up
//!   to `top`; entry ids are Redis time, so `XTRIM MINID` trims by age.
//! - `P:{c}:i:<key>`: an idempotency key's result on channel `c`.
//! - `P:i:<key>`: the fingerprint of the publish that first used the key.
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
//! one dedicated pub/sub connection driven by one task ([`Listener`]). A
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
//! read bump the epoch, so an offset is never reused silently.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::{Client, Script, Value};
use tokio::sync::{mpsc, oneshot};

use super::{
    replay_from, Broker, BrokerError, EngineStats, History, Member, Order, OrderHandler,
    PresenceMode, Publish, PublishOutcome, Published, RedisStats,
};
use crate::cursor::{Epoch, Position};
use crate::hub::Hub;
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
/// Version tag of the encoded publication.
const WIRE_VERSION: &str = "1";

/// A Lua script for the engine, with `now` (Redis time, in milliseconds)
/// defined first: Redis's clock decides expiry, so nodes' clocks need not
/// agree.
macro_rules! script {
    ($body:literal) => {
        concat!(
            "local t = redis.call('TIME')\n",
            "local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n",
            $body
        )
    };
}

/// Numbers, stores and fans out one publication on one channel.
///
/// KEYS: meta, stream, channel idempotency key (may be absent).
/// ARGV: new epoch, history size, ttl ms, meta ttl ms, idempotency window
/// ms, fingerprint, pub/sub channel, then the wire header's channel and
/// event, then data, then `PUBLISH` or `SPUBLISH`.
///
/// Returns `{epoch, offset, 0}`, or `{epoch, offset, 1, fingerprint}` for a
/// key seen before.
const PUBLISH_SCRIPT: &str = script!(
    r#"
local meta, stream = KEYS[1], KEYS[2]
local idem = KEYS[3]
if idem then
  local seen = redis.call('GET', idem)
  if seen then
    local fp, epoch, offset = string.match(seen, '^(%S+) (%S+) (%d+)$')
    return {epoch, tonumber(offset), 1, fp}
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', meta, 'epoch', epoch)
end
local top = redis.call('HINCRBY', meta, 'top', 1)
local ttl = tonumber(ARGV[3])
local payload = '1\n' .. ARGV[8] .. '\n' .. epoch .. '\n' .. string.format('%d', top) .. '\n'
  .. string.format('%d', now) .. '\n' .. ARGV[9] .. '\n' .. ARGV[10]
redis.call('XADD', stream, 'MAXLEN', ARGV[2], '*', 'p', payload)
redis.call('XTRIM', stream, 'MINID', string.format('%d', now - ttl))
redis.call('PEXPIRE', stream, ttl)
redis.call('PEXPIRE', meta, ARGV[4])
if idem then
  redis.call('SET', idem, ARGV[6] .. ' ' .. epoch .. ' ' .. string.format('%d', top), 'PX', ARGV[5])
end
redis.call(ARGV[11], ARGV[7], payload)
return {epoch, top, 0}
"#
);

/// Reads a channel's position and the publications a reader needs.
///
/// KEYS: meta, stream. ARGV: the reader's epoch ('' for none), its offset,
/// how many of the newest publications a reader without a position wants,
/// ttl ms, an epoch to move to if the reader is ahead of the stream, the
/// least ms between two such moves.
///
/// Returns `{epoch, top, len, payloads newest first}`; epoch '' when the
/// channel does not exist.
const HISTORY_SCRIPT: &str = script!(
    r#"
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  return {'', 0, 0, {}}
end
local top = tonumber(redis.call('HGET', meta, 'top') or '0')
local since_epoch, since = ARGV[1], tonumber(ARGV[2])
if since_epoch == epoch and since > top then
  -- The reader saw offsets this stream no longer has: Redis lost data.
  -- A new epoch makes every such position invalid, so none is reused. At
  -- most one move per interval, so forged positions cannot keep resetting
  -- everyone.
  local moved = tonumber(redis.call('HGET', meta, 'moved') or '0')
  if now - moved >= tonumber(ARGV[6]) then
    epoch = ARGV[5]
    redis.call('HSET', meta, 'epoch', epoch, 'moved', string.format('%d', now))
    redis.call('DEL', stream)
  end
  return {epoch, top, 0, {}}
end
redis.call('XTRIM', stream, 'MINID', string.format('%d', now - tonumber(ARGV[4])))
local len = redis.call('XLEN', stream)
local want
if since_epoch == '' then
  want = tonumber(ARGV[3])
elseif since == 0 or since_epoch == epoch then
  want = top - since
else
  want = 0
end
if want > len then want = len end
local out = {}
if want > 0 then
  local entries = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', want)
  for i, entry in ipairs(entries) do
    out[i] = entry[2][2]
  end
end
return {epoch, top, len, out}
"#
);

/// Lists and/or announces a member.
///
/// KEYS: the channel's presence hash. ARGV: connection, member JSON, ttl ms,
/// '1' to list, pub/sub channel, the event to publish ('' for none),
/// `PUBLISH` or `SPUBLISH`.
/// A listed entry is `<expiry ms> <member JSON>`; Redis time decides
/// expiry, so nodes' clocks need not agree.
const JOIN_SCRIPT: &str = script!(
    r#"
if ARGV[4] == '1' then
  local ttl = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', now + ttl) .. ' ' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
if ARGV[6] ~= '' then
  redis.call(ARGV[7], ARGV[5], ARGV[6])
end
return 1
"#
);

/// Unlists and/or announces a member. KEYS: presence hash. ARGV:
/// connection, pub/sub channel, event ('' for none), `PUBLISH` or
/// `SPUBLISH`.
const LEAVE_SCRIPT: &str = script!(
    r#"
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[3] ~= '' then
  redis.call(ARGV[4], ARGV[2], ARGV[3])
end
return 1
"#
);

/// The live members of a channel, dropping expired entries (a crashed
/// node's). KEYS: presence hash. Returns member JSON texts.
const PRESENCE_SCRIPT: &str = script!(
    r#"
local entries = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #entries, 2 do
  local expiry, member = string.match(entries[i + 1], '^(%d+) (.*)$')
  if expiry and tonumber(expiry) > now then
    out[#out + 1] = member
  else
    redis.call('HDEL', KEYS[1], entries[i])
  end
end
return out
"#
);

/// Takes (or refreshes) one of a user's connection places. KEYS: the
/// user's sorted set (connection → expiry ms). ARGV: connection, limit, ttl
/// ms. Returns 1 when taken, 0 when the user has `limit` live connections.
const USER_SLOT_SCRIPT: &str = script!(
    r#"
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#
);

/// Tag of a presence event on the wire (publications start with
/// [`WIRE_VERSION`]).
const WIRE_PRESENCE: &str = "p\n";

/// How the Redis engine keeps history and reaches Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    /// `url` is one node of a Redis Cluster: keys and sharded pub/sub are
    /// routed by slot.
    pub cluster: bool,
    pub tls_ca_file: Option<std::path::PathBuf>,
    pub prefix: String,
    pub history_size: usize,
    pub history_ttl: Duration,
    pub idempotency_window: Duration,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Presence entries expire this long after their node last refreshed
    /// them.
    pub presence_ttl: Duration,
    /// This node's name: orders it broadcasts are not carried out twice.
    pub node: String,
}

/// Checks an `engine.redis.url`, for config validation.
pub fn parse_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!("`{url}` is not a redis:// or rediss:// URL"));
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|err| format!("`{}` is not a usable Redis URL: {err}", redact(url)))
}

/// The database number an `engine.redis.url` names.
pub fn url_database(url: &str) -> Option<i64> {
    use redis::IntoConnectionInfo;
    Some(url.into_connection_info().ok()?.redis_settings().db())
}

/// Reads `engine.redis.tls_ca_file`, checking it holds a certificate.
pub fn read_ca_file(path: &Path) -> Result<Vec<u8>, String> {
    let pem =
        std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(pem)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

/// Key names.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn meta(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:m", self.prefix)
    }

    fn stream(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:h", self.prefix)
    }

    fn idempotency(&self, channel: &str, key: &str) -> String {
        format!("{}:{{{channel}}}:i:{key}", self.prefix)
    }

    fn presence(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:p", self.prefix)
    }

    fn user(&self, user: &str) -> String {
        format!("{}:u:{{{user}}}", self.prefix)
    }

    /// Where orders for every node travel.
    fn orders(&self) -> String {
        format!("{}:orders", self.prefix)
    }

    fn claim(&self, key: &str) -> String {
        format!("{}:i:{key}", self.prefix)
    }

    fn pubsub(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}", self.prefix)
    }

    /// The channel a pub/sub channel name carries.
    fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(":{")?
            .strip_suffix('}')
    }
}

/// Encodes a publication the way the publish script does (tests and the
/// wire format's documentation use it).
pub fn encode(publication: &Publication) -> String {
    format!(
        "{WIRE_VERSION}\n{}\n{}\n{}\n{}\n{}\n{}",
        publication.channel(),
        publication.position().epoch,
        publication.offset(),
        publication.published_at_ms(),
        publication.event().map_or("", EventName::as_str),
        publication.data()
    )
}

/// Decodes a publication from the publish script's format. `None` for
/// anything malformed (logged by the caller; never trusted blindly).
pub fn decode(payload: &[u8]) -> Option<Publication> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut fields = text.splitn(7, '\n');
    if fields.next()? != WIRE_VERSION {
        return None;
    }
    let channel = ChannelName::parse(fields.next()?).ok()?;
    let epoch = Epoch::parse(fields.next()?).ok()?;
    let offset = fields.next()?.parse().ok()?;
    let published_at_ms = fields.next()?.parse().ok()?;
    let event = match fields.next()? {
        "" => None,
        name => Some(EventName::parse(name).ok()?),
    };
    let data = fields.next()?;
    serde_json::from_str::<&serde_json::value::RawValue>(data).ok()?;
    Some(Publication::new(
        channel,
        Position::new(epoch, offset),
        event,
        data,
        published_at_ms,
    ))
}

/// The connection commands go through: one server, or a Redis Cluster
/// (commands routed by key slot).
#[derive(Clone)]
enum Commands {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        match self {
            Commands::Single(conn) => conn.req_packed_command(cmd),
            Commands::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        match self {
            Commands::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Commands::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Commands::Single(conn) => conn.get_db(),
            Commands::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Makes the command connection: a connection manager (lazy, reconnecting)
/// for one server; a cluster connection, made on first use and remade after
/// it failed, for a cluster.
enum Connector {
    Single(ConnectionManager),
    Cluster(Box<LazyCluster>),
}

struct LazyCluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::Mutex<Option<redis::cluster_async::ClusterConnection>>,
}

impl Connector {
    async fn get(&self) -> redis::RedisResult<Commands> {
        match self {
            Connector::Single(manager) => Ok(Commands::Single(manager.clone())),
            Connector::Cluster(lazy) => {
                let mut conn = lazy.conn.lock().await;
                if let Some(conn) = conn.as_ref() {
                    return Ok(Commands::Cluster(conn.clone()));
                }
                let made = lazy.client.get_async_connection().await?;
                *conn = Some(made.clone());
                Ok(Commands::Cluster(made))
            }
        }
    }
}

/// Counters behind `/metrics`.
#[derive(Default)]
struct Stats {
    /// The command connection answered its last command.
    up: AtomicBool,
    /// The pub/sub connection is subscribed and in sync.
    pubsub_up: AtomicBool,
    reconnects: AtomicU64,
    commands: AtomicU64,
    command_errors: AtomicU64,
    command_micros: AtomicU64,
    messages: AtomicU64,
    malformed: AtomicU64,
    resets: AtomicU64,
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
/// ([`Hub::discard`]). So the read plus what the hub is handed afterwards
/// cover every publication after the session's position, and no reset made
/// from a reading of the stream older than the session's own reaches it.
/// This rests on the node knowing its connection is down: until the
/// listener sees a dead connection end (its stream closes, or a PING goes
/// unanswered), the channel stays live, so a session that reads a stream
/// Redis restarted meanwhile could still be handed what the dead
/// connection held, of the stream's previous epoch.
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
}

/// State shared by the broker and its listener task.
struct Shared {
    conn: Connector,
    /// `PUBLISH`, or `SPUBLISH` (sharded, to the channel's slot) on a
    /// cluster.
    publish_command: &'static str,
    hub: Arc<Hub>,
    keys: Keys,
    options: RedisOptions,
    publish_script: Script,
    history_script: Script,
    join_script: Script,
    leave_script: Script,
    presence_script: Script,
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
    Unsubscribe(ChannelName),
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    listener: mpsc::UnboundedSender<Command>,
}

impl RedisBroker {
    /// Creates the engine and starts its listener. Redis need not be up:
    /// the engine connects when it is, and reports unavailable until then.
    pub fn new(hub: Arc<Hub>, options: RedisOptions) -> Result<Arc<RedisBroker>, String> {
        let (conn, listen) = if options.cluster {
            let (pushes, received) = mpsc::unbounded_channel();
            let commands = cluster_client(&options, None)?;
            let listening = cluster_client(&options, Some(pushes))?;
            (
                Connector::Cluster(Box::new(LazyCluster {
                    client: commands,
                    conn: tokio::sync::Mutex::new(None),
                })),
                Listen::Cluster(Box::new(listening), received),
            )
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
                    Listener {
                        shared: Arc::downgrade(&shared),
                        client: *client,
                        commands: receiver,
                    }
                    .run(),
                );
            }
            Listen::Cluster(client, pushes) => {
                tokio::spawn(cluster_listener(
                    Arc::downgrade(&shared),
                    *client,
                    pushes,
                    receiver,
                ));
            }
        }
        tokio::spawn(keep_alive(Arc::downgrade(&shared)));
        tokio::spawn(refresh_presence(Arc::downgrade(&shared)));
        Ok(Arc::new(RedisBroker {
            shared,
            listener: commands,
        }))
    }
}

/// How a node hears Redis: a dedicated pub/sub connection to one server, or
/// a RESP3 cluster connection whose pushes arrive on a channel.
enum Listen {
    Single(Box<Client>),
    Cluster(
        Box<redis::cluster::ClusterClient>,
        mpsc::UnboundedReceiver<redis::PushInfo>,
    ),
}

/// A cluster client seeded with `engine.redis.url`; with `pushes`, a RESP3
/// client whose pub/sub messages go there.
fn cluster_client(
    options: &RedisOptions,
    pushes: Option<mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient, String> {
    if options.url.starts_with("rediss://") {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let mut builder = redis::cluster::ClusterClientBuilder::new(vec![options.url.as_str()])
        .connection_timeout(options.connect_timeout)
        .response_timeout(options.command_timeout)
        .use_protocol(redis::ProtocolVersion::RESP3);
    if let Some(file) = &options.tls_ca_file {
        builder = builder.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(read_ca_file(file)?),
        });
    }
    if let Some(pushes) = pushes {
        builder = builder.push_sender(pushes);
    }
    builder
        .build()
        .map_err(|err| format!("engine.redis.url: {err}"))
}

fn client(options: &RedisOptions) -> Result<Client, String> {
    if options.url.starts_with("rediss://") {
        // rustls needs a process-wide provider; pushgate uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = match &options.tls_ca_file {
        Some(file) => Client::build_with_tls(
            options.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(read_ca_file(file)?),
            },
        ),
        None => Client::open(options.url.as_str()),
    };
    client.map_err(|err| format!("engine.redis.url: {err}"))
}

/// Server errors that refuse a command before it runs.
const REFUSED_BEFORE_RUNNING: &[&str] = &[
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "OOM",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "BUSY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MOVED",
    "ASK",
    "MISCONF",
];

/// Classifies a failed command: nothing happened, or perhaps something did.
fn failure(err: &redis::RedisError, may_have_run: bool) -> BrokerError {
    let text = err.to_string();
    let refused = err.is_connection_refusal()
        || err.kind() == redis::ErrorKind::AuthenticationFailed
        || err
            .code()
            .is_some_and(|code| REFUSED_BEFORE_RUNNING.contains(&code));
    if !may_have_run || refused {
        BrokerError::Unavailable(text)
    } else {
        BrokerError::OutcomeUnknown(text)
    }
}

impl Shared {
    /// Runs a command with the configured deadline, counting it. A command
    /// refused before it was sent (the connection was down when it was
    /// issued) is tried once more: the connection manager reconnects on a
    /// failure, so the first command after Redis came back would otherwise
    /// fail for nothing.
    async fn run<T, F, Fut>(&self, may_write: bool, command: F) -> Result<T, BrokerError>
    where
        F: Fn(Commands) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.options.command_timeout;
        let attempt = || async {
            match self.conn.get().await {
                Ok(conn) => command(conn).await,
                Err(err) => Err(err),
            }
        };
        let mut outcome = tokio::time::timeout_at(deadline, attempt()).await;
        if let Ok(Err(err)) = &outcome {
            if err.is_connection_refusal() {
                outcome = tokio::time::timeout_at(deadline, attempt()).await;
            }
        }
        let stats = &self.stats;
        stats.commands.fetch_add(1, Ordering::Relaxed);
        stats
            .command_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        let result = match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(failure(&err, may_write)),
            Err(_) => Err(if may_write {
                BrokerError::OutcomeUnknown("Redis did not answer in time".into())
            } else {
                BrokerError::Unavailable("Redis did not answer in time".into())
            }),
        };
        match &result {
            Ok(_) => {
                if !stats.up.swap(true, Ordering::Relaxed) {
                    tracing::info!("engine: Redis is reachable");
                }
            }
            Err(err) => {
                stats.command_errors.fetch_add(1, Ordering::Relaxed);
                if stats.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "engine: Redis is unreachable");
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
        let invocation = &invocation;
        let value: Value = self
            .run(true, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
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
            .arg(millis(super::EPOCH_MOVE_INTERVAL));
        // The script may move the epoch; doing so twice is harmless.
        let invocation = &invocation;
        let value: Value = self
            .run(false, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let unexpected = || BrokerError::Unavailable(format!("unexpected history reply {value:?}"));
        let (epoch, top, len, payloads) = parse_history_reply(&value).ok_or_else(unexpected)?;
        let Some(epoch) = epoch else {
            // Unknown channel: empty, offset 0, valid in any later epoch.
            return Ok(History {
                publications: Vec::new(),
                position: Position::new(Epoch::random(), 0),
                recovered: since.is_none_or(|since| since.offset == 0),
            });
        };
        let position = Position::new(epoch, top);
        let oldest = top + 1 - len.min(top);
        let mut publications = Vec::with_capacity(payloads.len());
        for payload in payloads.iter().rev() {
            match decode(payload) {
                Some(publication) => publications.push(Arc::new(publication)),
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
                None => return Ok(History::lost(position)),
            },
        };
        publications.retain(|p| p.position().epoch == epoch && p.offset() >= first);
        publications.truncate(limit);
        Ok(History {
            publications,
            position,
            recovered: true,
        })
    }

    /// Runs the join script for one member (also its heartbeat refresh).
    async fn list(
        &self,
        channel: &str,
        connection: &str,
        member_json: &str,
        listed: bool,
        event: &str,
    ) -> Result<(), BrokerError> {
        let mut invocation = self.join_script.prepare_invoke();
        invocation
            .key(self.keys.presence(channel))
            .arg(connection)
            .arg(member_json)
            .arg(millis(self.options.presence_ttl))
            .arg(if listed { "1" } else { "0" })
            .arg(self.keys.pubsub(channel))
            .arg(event)
            .arg(self.publish_command);
        let invocation = &invocation;
        self.run(false, |mut conn| async move {
            invocation.invoke_async::<i64>(&mut conn).await
        })
        .await
        .map(drop)
    }

    async fn take_user_slot(
        &self,
        user: &str,
        connection: &str,
        limit: usize,
    ) -> Result<bool, BrokerError> {
        let mut invocation = self.user_slot_script.prepare_invoke();
        invocation
            .key(self.keys.user(user))
            .arg(connection)
            .arg(limit)
            .arg(millis(self.options.presence_ttl));
        let invocation = &invocation;
        let taken: i64 = self
            .run(false, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(taken == 1)
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

    /// Hands a publication from Redis to the hub, once and in order.
    fn deliver(&self, publication: Arc<Publication>) {
        let mut tracked = self.tracked.lock().expect("tracked lock");
        let Some(state) = tracked.get_mut(publication.channel().as_str()) else {
            return; // No longer listened to here.
        };
        if let Some(last) = state.last {
            if last.epoch == publication.position().epoch && publication.offset() <= last.offset {
                return; // Delivered already (a resync overlapping live ones).
            }
        }
        state.last = Some(publication.position());
        // Under the lock, so a resync and the live path never interleave.
        self.hub.deliver(&publication);
    }

    /// Reads where a channel's stream stands, just after its subscription
    /// in Redis was confirmed and before any local session reads history
    /// (they wait for `live`): from here on the hub is handed everything
    /// (see [`Tracked`]).
    async fn start_at_stream(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let position = self.read(channel, None, 0).await?.position;
        let mut tracked = self.tracked.lock().expect("tracked lock");
        if let Some(state) = tracked.get_mut(channel.as_str()) {
            state.last.get_or_insert(position);
        }
        Ok(())
    }

    /// Brings a channel's local subscribers up to its stream after the
    /// pub/sub connection was lost: the gap from history, or a reset.
    async fn resync(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let last = {
            let tracked = self.tracked.lock().expect("tracked lock");
            match tracked.get(channel.as_str()) {
                Some(state) => state.last,
                None => return Ok(()),
            }
        };
        let Some(since) = last else {
            // Its start was never read, so no local session has read
            // history yet: the stream's position now is where they start.
            return self.start_at_stream(channel).await;
        };
        let history = self.read(channel, Some(since), usize::MAX).await?;
        if history.recovered {
            for publication in history.publications {
                self.deliver(publication);
            }
            return Ok(());
        }
        // Not covered: the subscribers are told, and get what the stream
        // still holds after the reset point (all of it is newer than what
        // they lost).
        let stream = self.read(channel, None, usize::MAX).await?;
        let reset_to = match stream.publications.first() {
            Some(oldest) => Position::new(stream.position.epoch, oldest.offset() - 1),
            None => stream.position,
        };
        self.stats.resets.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            %channel,
            from = %since,
            to = %reset_to,
            "engine: history does not cover what this node missed while Redis was away; subscribers get a reset"
        );
        {
            let mut tracked = self.tracked.lock().expect("tracked lock");
            let Some(state) = tracked.get_mut(channel.as_str()) else {
                return Ok(());
            };
            state.last = Some(reset_to);
            self.hub.deliver(&Arc::new(Publication::reset_marker(
                channel.clone(),
                reset_to,
            )));
        }
        for publication in stream.publications {
            self.deliver(publication);
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
        let failed = futures_util::stream::iter(metas)
            .map(|meta| {
                let shared = &shared;
                async move {
                    let meta = &meta;
                    shared
                        .run(false, |mut conn| async move {
                            redis::cmd("PEXPIRE")
                                .arg(meta)
                                .arg(ttl)
                                .query_async::<i64>(&mut conn)
                                .await
                        })
                        .await
                }
            })
            .buffer_unordered(RESYNC_CONCURRENCY)
            .filter(|outcome| std::future::ready(outcome.is_err()))
            .count()
            .await;
        if failed > 0 {
            tracing::debug!(
                failed,
                "engine: could not keep some subscribed channels alive"
            );
        }
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis().min(u128::from(u64::MAX)) as u64
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

fn parse_publish_reply(value: &Value) -> Option<(Epoch, u64, bool, Option<String>)> {
    let Value::Array(items) = value else {
        return None;
    };
    let epoch = Epoch::parse(&text(items.first()?)?).ok()?;
    let offset = number(items.get(1)?)?;
    let duplicate = number(items.get(2)?)? == 1;
    let seen = items.get(3).and_then(text);
    Some((epoch, offset, duplicate, seen))
}

type HistoryReply = (Option<Epoch>, u64, u64, Vec<Vec<u8>>);

fn parse_history_reply(value: &Value) -> Option<HistoryReply> {
    let Value::Array(items) = value else {
        return None;
    };
    let epoch = match text(items.first()?)?.as_str() {
        "" => None,
        epoch => Some(Epoch::parse(epoch).ok()?),
    };
    let top = number(items.get(1)?)?;
    let len = number(items.get(2)?)?;
    let payloads = match items.get(3)? {
        Value::Array(entries) => entries
            .iter()
            .map(|entry| match entry {
                Value::BulkString(bytes) => Some(bytes.clone()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?,
        _ => return None,
    };
    Some((epoch, top, len, payloads))
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, publish: Publish) -> Result<PublishOutcome, BrokerError> {
        let shared = &self.shared;
        // Only a publish with a key is compared with another.
        let fingerprint = match &publish.idempotency_key {
            Some(_) => format!("{:016x}", publish.fingerprint()),
            None => String::new(),
        };
        if let Some(key) = &publish.idempotency_key {
            // Claim the key for this publish before anything is published:
            // a key reused for a different publish then publishes nothing.
            let claim = redis::cmd("SET")
                .arg(shared.keys.claim(key))
                .arg(&fingerprint)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(millis(shared.options.idempotency_window))
                .to_owned();
            let claim = &claim;
            let first: Option<String> = shared
                .run(false, |mut conn| async move {
                    claim.query_async(&mut conn).await
                })
                .await?;
            if first.is_some_and(|first| first != fingerprint) {
                return Err(BrokerError::KeyReused);
            }
        }
        let mut data = Vec::with_capacity(publish.data.get().len());
        compact_json(publish.data.get(), &mut data);
        let data = String::from_utf8(data).expect("compacted JSON is UTF-8");
        // One script per channel, all in flight at once on the pipelined
        // connection.
        let outcomes = futures_util::future::join_all(
            publish
                .channels
                .iter()
                .map(|channel| shared.publish_one(channel, &publish, &data, &fingerprint)),
        )
        .await;
        let mut results = Vec::with_capacity(outcomes.len());
        let mut duplicate = true;
        let mut stored_some = false;
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Ok((published, was_duplicate)) => {
                    duplicate &= was_duplicate;
                    stored_some |= !was_duplicate;
                    results.push(published);
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            None => Ok(PublishOutcome { results, duplicate }),
            // Some channels got it and some did not: only a retry with the
            // same key completes it without duplicates.
            Some(BrokerError::Unavailable(why)) if stored_some => {
                Err(BrokerError::OutcomeUnknown(why))
            }
            Some(err) => Err(err),
        }
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<Position>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        self.shared.read(channel, since, limit).await
    }

    async fn position(&self, channel: &ChannelName) -> Result<Position, BrokerError> {
        Ok(self.history(channel, None, 0).await?.position)
    }

    async fn subscribe(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        let live = self
            .shared
            .tracked
            .lock()
            .expect("tracked lock")
            .get(channel.as_str())
            .is_some_and(|state| state.live);
        if live {
            return Ok(());
        }
        // The listener answers once the channel is live: commands run in
        // order, so one queued behind the first subscriber's waits for its
        // SUBSCRIBE and start position too.
        let (reply, answer) = oneshot::channel();
        self.listener
            .send(Command::Subscribe(channel.clone(), reply))
            .map_err(|_| BrokerError::Unavailable("the engine is stopping".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(BrokerError::Unavailable("the engine is stopping".into())))
    }

    async fn unsubscribe(&self, channel: &ChannelName) {
        let _ = self.listener.send(Command::Unsubscribe(channel.clone()));
    }

    async fn join(
        &self,
        channel: &ChannelName,
        member: &Member,
        mode: PresenceMode,
    ) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let json = serde_json::to_string(member).expect("a member serializes");
        let event = if mode.announced {
            format!("{WIRE_PRESENCE}{}", member.event_json(channel, true))
        } else {
            String::new()
        };
        shared
            .list(
                channel.as_str(),
                &member.connection,
                &json,
                mode.listed,
                &event,
            )
            .await?;
        if mode.listed {
            shared
                .listed
                .lock()
                .expect("listed lock")
                .insert((channel.clone(), member.connection.clone()), json);
        }
        Ok(())
    }

    async fn leave(&self, channel: &ChannelName, member: &Member, mode: PresenceMode) {
        let shared = &self.shared;
        if mode.listed {
            shared
                .listed
                .lock()
                .expect("listed lock")
                .remove(&(channel.clone(), member.connection.clone()));
        }
        let event = if mode.announced {
            format!("{WIRE_PRESENCE}{}", member.event_json(channel, false))
        } else {
            String::new()
        };
        let mut invocation = shared.leave_script.prepare_invoke();
        invocation
            .key(shared.keys.presence(channel.as_str()))
            .arg(&member.connection)
            .arg(shared.keys.pubsub(channel.as_str()))
            .arg(event)
            .arg(shared.publish_command);
        let invocation = &invocation;
        let left = shared
            .run(false, |mut conn| async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await;
        if let Err(err) = left {
            // The entry expires with presence_ttl, unrefreshed.
            tracing::debug!(error = %err, %channel, "engine: could not remove a presence entry");
        }
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let shared = &self.shared;
        let mut invocation = shared.presence_script.prepare_invoke();
        invocation.key(shared.keys.presence(channel.as_str()));
        let invocation = &invocation;
        let entries: Vec<String> = shared
            .run(false, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        let mut members: Vec<Member> = entries
            .iter()
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect();
        members.sort_by(|a, b| a.connection.cmp(&b.connection));
        Ok(members)
    }

    async fn broadcast(&self, order: &Order) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let message =
            serde_json::json!({ "node": shared.options.node, "order": order }).to_string();
        let channel = shared.keys.orders();
        let (channel, message) = (&channel, &message);
        let _receivers: i64 = shared
            .run(false, |mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    fn on_orders(&self, handler: OrderHandler) {
        *self.shared.orders.lock().expect("orders lock") = Some(handler);
    }

    async fn claim_user_slot(
        &self,
        user: &str,
        connection: &str,
        limit: usize,
    ) -> Result<bool, BrokerError> {
        let shared = &self.shared;
        let taken = shared.take_user_slot(user, connection, limit).await?;
        if taken {
            shared
                .slots
                .lock()
                .expect("slots lock")
                .insert((user.to_owned(), connection.to_owned()));
        }
        Ok(taken)
    }

    async fn release_user_slot(&self, user: &str, connection: &str) {
        let shared = &self.shared;
        shared
            .slots
            .lock()
            .expect("slots lock")
            .remove(&(user.to_owned(), connection.to_owned()));
        let key = shared.keys.user(user);
        let (key, connection) = (&key, connection);
        let released = shared
            .run(false, |mut conn| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(connection)
                    .query_async::<i64>(&mut conn)
                    .await
            })
            .await;
        if let Err(err) = released {
            // It expires with presence_ttl, unrefreshed.
            tracing::debug!(error = %err, "engine: could not release a connection place");
        }
    }

    async fn ready(&self) -> Result<(), BrokerError> {
        let pong: String = self
            .shared
            .run(false, |mut conn| async move {
                redis::cmd("PING").query_async(&mut conn).await
            })
            .await?;
        if pong != "PONG" {
            return Err(BrokerError::Unavailable(format!(
                "Redis answered PING with {pong}"
            )));
        }
        if !self.shared.stats.pubsub_up.load(Ordering::Relaxed) {
            return Err(BrokerError::Unavailable(
                "the pub/sub connection to Redis is not up yet".into(),
            ));
        }
        Ok(())
    }

    fn stats(&self) -> EngineStats {
        let stats = &self.shared.stats;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        EngineStats {
            channels: self.shared.tracked.lock().expect("tracked lock").len() as u64,
            history_publications: 0,
            redis: Some(RedisStats {
                up: stats.up.load(Ordering::Relaxed),
                pubsub_up: stats.pubsub_up.load(Ordering::Relaxed),
                reconnects: load(&stats.reconnects),
                commands: load(&stats.commands),
                command_errors: load(&stats.command_errors),
                command_seconds: load(&stats.command_micros) as f64 / 1e6,
                messages: load(&stats.messages),
                malformed: load(&stats.malformed),
                resets: load(&stats.resets),
            }),
        }
    }
}

/// The task that owns the pub/sub connection: subscribes and unsubscribes
/// as local subscribers come and go, feeds the hub, and reconnects.
struct Listener {
    /// Weak, so the task ends when the engine is dropped.
    shared: std::sync::Weak<Shared>,
    client: Client,
    commands: mpsc::UnboundedReceiver<Command>,
}

/// Why a connected spell ended.
enum Ended {
    /// The connection failed: reconnect.
    Lost(String),
    /// The engine is gone.
    Stopped,
}

impl Listener {
    async fn run(mut self) {
        let mut backoff = BACKOFF_FIRST;
        let mut connected_before = false;
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let why = match self.connect(&shared).await {
                Ok((sink, stream)) => {
                    if connected_before {
                        shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    backoff = BACKOFF_FIRST;
                    drop(shared);
                    match self.serve(sink, stream).await {
                        Ended::Stopped => return,
                        Ended::Lost(why) => why,
                    }
                }
                Err(why) => {
                    drop(shared);
                    why
                }
            };
            if let Some(shared) = self.shared.upgrade() {
                // New local subscribers wait for the resync (their subscribe
                // goes through the listener) rather than read history that
                // nothing would follow up.
                shared.set_live(false);
                if shared.stats.pubsub_up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %why, "engine: lost the Redis pub/sub connection; reconnecting");
                } else {
                    tracing::debug!(error = %why, "engine: Redis pub/sub still unreachable");
                }
            }
            // Wait before the next attempt, answering subscribe requests
            // (Redis is away: they fail) meanwhile.
            let jittered = backoff
                .mul_f64(rand::random::<f64>())
                .max(Duration::from_millis(10));
            let deadline = tokio::time::Instant::now() + jittered;
            backoff = (backoff * 2).min(BACKOFF_CAP);
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => break,
                    command = self.commands.recv() => match command {
                        None => return,
                        Some(command) => self.refuse(command),
                    },
                }
            }
        }
    }

    /// While disconnected: a subscribe fails now; an unsubscribe is taken.
    fn refuse(&self, command: Command) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        match command {
            Command::Subscribe(_, reply) => {
                let _ = reply.send(Err(BrokerError::Unavailable(
                    "the engine's pub/sub connection to Redis is down".into(),
                )));
            }
            Command::Unsubscribe(channel) => {
                if !shared.hub.has_subscribers(channel.as_str()) {
                    shared
                        .tracked
                        .lock()
                        .expect("tracked lock")
                        .remove(channel.as_str());
                }
            }
        }
    }

    /// Connects, subscribes to every tracked channel and brings each up to
    /// its stream.
    async fn connect(
        &self,
        shared: &Shared,
    ) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), String> {
        let timeout = shared.options.connect_timeout;
        let pubsub = tokio::time::timeout(timeout, self.client.get_async_pubsub())
            .await
            .map_err(|_| "connecting timed out".to_owned())?
            .map_err(|err| err.to_string())?;
        let (mut sink, stream) = pubsub.split();
        tokio::time::timeout(
            shared.options.command_timeout,
            sink.subscribe(shared.keys.orders()),
        )
        .await
        .map_err(|_| "subscribing to orders timed out".to_owned())?
        .map_err(|err| err.to_string())?;
        let channels: Vec<ChannelName> = shared
            .tracked
            .lock()
            .expect("tracked lock")
            .keys()
            .cloned()
            .collect();
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            let names: Vec<String> = chunk
                .iter()
                .map(|c| shared.keys.pubsub(c.as_str()))
                .collect();
            tokio::time::timeout(shared.options.command_timeout, sink.subscribe(&names))
                .await
                .map_err(|_| "resubscribing timed out".to_owned())?
                .map_err(|err| err.to_string())?;
        }
        // Subscribed again: whatever is published from now on arrives (and
        // waits in the stream while the gap is read).
        let mut resyncs = futures_util::stream::iter(channels.iter().cloned())
            .map(|channel| async move { shared.resync(&channel).await })
            .buffer_unordered(RESYNC_CONCURRENCY);
        while let Some(resynced) = resyncs.next().await {
            resynced.map_err(|err| err.to_string())?;
        }
        drop(resyncs);
        shared.set_live(true);
        shared.stats.pubsub_up.store(true, Ordering::Relaxed);
        if !channels.is_empty() {
            tracing::info!(
                channels = channels.len(),
                "engine: Redis pub/sub connected; channels resubscribed and checked"
            );
        }
        Ok((sink, stream))
    }

    /// Serves one connected spell: messages to the hub, commands to Redis.
    async fn serve(
        &mut self,
        mut sink: redis::aio::PubSubSink,
        mut stream: redis::aio::PubSubStream,
    ) -> Ended {
        let mut ping = tokio::time::interval(PUBSUB_PING);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.reset();
        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else {
                        return Ended::Lost("the connection closed".into());
                    };
                    let Some(shared) = self.shared.upgrade() else {
                        return Ended::Stopped;
                    };
                    on_message(&shared, &message);
                }
                command = self.commands.recv() => {
                    let Some(command) = command else {
                        return Ended::Stopped;
                    };
                    let Some(shared) = self.shared.upgrade() else {
                        return Ended::Stopped;
                    };
                    // Take every command waiting, so a burst of first
                    // subscribers costs one round trip.
                    let mut batch = vec![command];
                    while let Ok(more) = self.commands.try_recv() {
                        batch.push(more);
                    }
                    if let Err(why) = apply(&shared, &mut sink, batch).await {
                        return Ended::Lost(why);
                    }
                }
                _ = ping.tick() => {
                    let Some(shared) = self.shared.upgrade() else {
                        return Ended::Stopped;
                    };
                    let timeout = shared.options.command_timeout;
                    // A subscribed connection answers `["pong", ""]`, not
                    // `PONG`: any answer will do.
                    match tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(err)) => return Ended::Lost(err.to_string()),
                        Err(_) => return Ended::Lost("PING was not answered in time".into()),
                    }
                }
            }
        }
    }
}

fn on_message(shared: &Shared, message: &redis::Msg) {
    on_payload(
        shared,
        message.get_channel_name(),
        message.get_payload_bytes(),
    );
}

/// A message on one of pushgate's pub/sub channels: an order, a presence
/// event or a publication.
fn on_payload(shared: &Shared, name: &str, payload: &[u8]) {
    shared.stats.messages.fetch_add(1, Ordering::Relaxed);
    if name == shared.keys.orders() {
        on_order(shared, payload);
        return;
    }
    if let Some(event) = payload.strip_prefix(WIRE_PRESENCE.as_bytes()) {
        match shared
            .keys
            .channel_of(name)
            .and_then(|c| ChannelName::parse(c).ok())
        {
            Some(channel) => on_presence_event(shared, channel, event),
            None => {
                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    let decoded = shared.keys.channel_of(name).and_then(|_| decode(payload));
    match decoded {
        Some(publication) => shared.deliver(Arc::new(publication)),
        None => {
            shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                channel = name,
                "engine: ignored a malformed publication from Redis"
            );
        }
    }
}

/// An order from another node's API: carried out on this node's sessions.
fn on_order(shared: &Shared, payload: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        node: String,
        order: Order,
    }
    match serde_json::from_slice::<Envelope>(payload) {
        Ok(envelope) if envelope.node == shared.options.node => {}
        Ok(envelope) => {
            let handler = shared.orders.lock().expect("orders lock").clone();
            if let Some(handler) = handler {
                handler(envelope.order);
            }
        }
        Err(err) => {
            shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "engine: ignored a malformed order from Redis");
        }
    }
}

/// A join or leave event from Redis: checked, then handed to the hub.
fn on_presence_event(shared: &Shared, channel: ChannelName, json: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Event<'a> {
        op: &'a str,
        channel: &'a str,
    }
    let Ok(text) = std::str::from_utf8(json) else {
        shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match serde_json::from_str::<Event>(text) {
        Ok(event) if event.channel == channel.as_str() && matches!(event.op, "join" | "leave") => {
            let joined = event.op == "join";
            shared.hub.deliver(&Arc::new(Publication::presence_event(
                channel,
                joined,
                text.to_owned(),
            )));
        }
        _ => {
            shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Refreshes this node's presence entries and connection places every third
/// of `presence_ttl`, so they outlive neither the node nor its connections by
/// more than that.
async fn refresh_presence(shared: std::sync::Weak<Shared>) {
    let every = {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.options.presence_ttl / 3
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.reset();
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let listed: Vec<((ChannelName, String), String)> = shared
            .listed
            .lock()
            .expect("listed lock")
            .iter()
            .map(|(key, json)| (key.clone(), json.clone()))
            .collect();
        let slots: Vec<(String, String)> = shared
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .cloned()
            .collect();
        // A place held by an open connection stays held whatever the count
        // says now: refreshed with no limit.
        let failed_slots = futures_util::stream::iter(slots)
            .map(|(user, connection)| {
                let shared = &shared;
                async move { shared.take_user_slot(&user, &connection, usize::MAX).await }
            })
            .buffer_unordered(RESYNC_CONCURRENCY)
            .filter(|outcome| std::future::ready(outcome.is_err()))
            .count()
            .await;
        if failed_slots > 0 {
            tracing::debug!(
                failed = failed_slots,
                "engine: some connection places were not refreshed"
            );
        }
        let refreshed = futures_util::stream::iter(listed)
            .map(|((channel, connection), json)| {
                let shared = &shared;
                async move {
                    shared
                        .list(channel.as_str(), &connection, &json, true, "")
                        .await
                }
            })
            .buffer_unordered(RESYNC_CONCURRENCY)
            .filter(|outcome| std::future::ready(outcome.is_err()))
            .count()
            .await;
        if refreshed > 0 {
            tracing::debug!(
                failed = refreshed,
                "engine: some presence entries were not refreshed"
            );
        }
    }
}

/// The cluster listener: one RESP3 connection whose pushes (sharded
/// messages, orders, subscription confirmations, disconnections) arrive on
/// `pushes`. The client resubscribes by itself after a node fails over or
/// comes back; each confirmation of a channel's subscription checks that
/// channel against its stream, so what was missed meanwhile is delivered or
/// announced by a reset, as on one server.
async fn cluster_listener(
    shared: std::sync::Weak<Shared>,
    client: redis::cluster::ClusterClient,
    mut pushes: mpsc::UnboundedReceiver<redis::PushInfo>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut backoff = BACKOFF_FIRST;
    // Connect and hear orders; meanwhile subscribe requests fail.
    let mut conn = loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let attempt = async {
            let mut conn = client.get_async_connection().await?;
            conn.subscribe(strong.keys.orders()).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(strong.options.connect_timeout, attempt).await {
            Ok(Ok(conn)) => {
                strong.stats.pubsub_up.store(true, Ordering::Relaxed);
                break conn;
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "engine: cannot reach the Redis cluster"),
            Err(_) => tracing::warn!("engine: connecting to the Redis cluster timed out"),
        }
        drop(strong);
        let deadline = tokio::time::Instant::now() + backoff.mul_f64(rand::random::<f64>());
        backoff = (backoff * 2).min(BACKOFF_CAP);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, reply)) => {
                        let _ = reply.send(Err(BrokerError::Unavailable(
                            "the engine cannot reach the Redis cluster".into(),
                        )));
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        if let Some(shared) = shared.upgrade() {
                            if !shared.hub.has_subscribers(channel.as_str()) {
                                shared.tracked.lock().expect("tracked lock").remove(channel.as_str());
                            }
                        }
                    }
                },
            }
        }
    };
    loop {
        tokio::select! {
            push = pushes.recv() => {
                let Some(push) = push else { return };
                let Some(shared) = shared.upgrade() else { return };
                on_push(&shared, push).await;
            }
            command = commands.recv() => {
                let Some(command) = command else { return };
                let Some(shared) = shared.upgrade() else { return };
                apply_cluster(&shared, &mut conn, command).await;
            }
        }
    }
}

/// One push from the cluster connection.
async fn on_push(shared: &Shared, push: redis::PushInfo) {
    let text = |value: Option<&Value>| match value {
        Some(Value::BulkString(bytes)) => Some(bytes.clone()),
        _ => None,
    };
    match push.kind {
        redis::PushKind::SMessage | redis::PushKind::Message => {
            if let (Some(name), Some(payload)) = (text(push.data.first()), text(push.data.get(1))) {
                on_payload(shared, &String::from_utf8_lossy(&name), &payload);
            }
        }
        redis::PushKind::SSubscribe => {
            // Subscribed, or subscribed again after a failure: whatever was
            // published in between is in the stream.
            let name = text(push.data.first()).unwrap_or_default();
            let name = String::from_utf8_lossy(&name);
            if let Some(channel) = shared
                .keys
                .channel_of(&name)
                .and_then(|c| ChannelName::parse(c).ok())
            {
                shared.stats.pubsub_up.store(true, Ordering::Relaxed);
                // Not live while it is checked (see `Tracked`): new local
                // subscribers queue behind this push, in this task.
                shared.set_channel_live(&channel, false);
                if let Err(err) = shared.resync(&channel).await {
                    tracing::warn!(error = %err, %channel, "engine: could not check a channel after resubscribing");
                }
                shared.set_channel_live(&channel, true);
            }
        }
        redis::PushKind::Disconnection => {
            shared.stats.pubsub_up.store(false, Ordering::Relaxed);
            shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("engine: a Redis cluster node's connection was lost; the client reconnects and resubscribes");
        }
        _ => {}
    }
}

/// Subscribes or unsubscribes one channel on the cluster (sharded pub/sub
/// takes one slot per command, so channels go one at a time).
async fn apply_cluster(
    shared: &Shared,
    conn: &mut redis::cluster_async::ClusterConnection,
    command: Command,
) {
    let timeout = shared.options.command_timeout;
    match command {
        Command::Subscribe(channel, reply) => {
            let fresh = {
                let mut tracked = shared.tracked.lock().expect("tracked lock");
                let fresh = !tracked.contains_key(channel.as_str());
                tracked.entry(channel.clone()).or_default();
                fresh
            };
            let outcome = if fresh {
                match tokio::time::timeout(
                    timeout,
                    conn.ssubscribe(shared.keys.pubsub(channel.as_str())),
                )
                .await
                {
                    // Subscribed: now where the stream stands, before the
                    // subscriber reads history (see `Tracked`).
                    Ok(Ok(())) => shared
                        .start_at_stream(&channel)
                        .await
                        .map_err(|err| err.to_string()),
                    Ok(Err(err)) => Err(err.to_string()),
                    Err(_) => Err("SSUBSCRIBE was not answered in time".into()),
                }
            } else {
                Ok(())
            };
            if outcome.is_ok() {
                if let Some(state) = shared
                    .tracked
                    .lock()
                    .expect("tracked lock")
                    .get_mut(channel.as_str())
                {
                    state.live = state.last.is_some();
                }
            }
            if outcome.is_err() {
                shared
                    .tracked
                    .lock()
                    .expect("tracked lock")
                    .remove(channel.as_str());
            }
            let _ = reply.send(outcome.map_err(|why| {
                BrokerError::Unavailable(format!("Redis SSUBSCRIBE failed: {why}"))
            }));
        }
        Command::Unsubscribe(channel) => {
            let gone = !shared.hub.has_subscribers(channel.as_str())
                && shared
                    .tracked
                    .lock()
                    .expect("tracked lock")
                    .remove(channel.as_str())
                    .is_some();
            if gone {
                let name = shared.keys.pubsub(channel.as_str());
                if let Ok(Err(err)) = tokio::time::timeout(timeout, conn.sunsubscribe(name)).await {
                    tracing::debug!(error = %err, "engine: SUNSUBSCRIBE failed");
                }
            }
        }
    }
}

/// Carries out subscribe and unsubscribe requests on the connection.
async fn apply(
    shared: &Shared,
    sink: &mut redis::aio::PubSubSink,
    batch: Vec<Command>,
) -> Result<(), String> {
    let mut fresh = Vec::new();
    let mut replies = Vec::new();
    let mut unsubscribe = Vec::new();
    {
        let mut tracked = shared.tracked.lock().expect("tracked lock");
        for command in batch {
            match command {
                Command::Subscribe(channel, reply) => {
                    // A channel tracked already is live: commands run in
                    // order, after the one that subscribed it.
                    if !tracked.contains_key(channel.as_str()) {
                        tracked.insert(channel.clone(), Tracked::default());
                        fresh.push(channel);
                    }
                    replies.push(reply);
                }
                Command::Unsubscribe(channel) => {
                    // A new local subscriber may have come since the last
                    // one left: then keep listening.
                    if !shared.hub.has_subscribers(channel.as_str())
                        && tracked.remove(channel.as_str()).is_some()
                    {
                        unsubscribe.push(shared.keys.pubsub(channel.as_str()));
                    }
                }
            }
        }
    }
    let timeout = shared.options.command_timeout;
    let mut outcome = Ok(());
    if !unsubscribe.is_empty() {
        outcome = match tokio::time::timeout(timeout, sink.unsubscribe(&unsubscribe)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("UNSUBSCRIBE was not answered in time".into()),
        };
    }
    if outcome.is_ok() && !fresh.is_empty() {
        for chunk in fresh.chunks(SUBSCRIBE_CHUNK) {
            let names: Vec<String> = chunk
                .iter()
                .map(|c| shared.keys.pubsub(c.as_str()))
                .collect();
            outcome = match tokio::time::timeout(timeout, sink.subscribe(&names)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err("SUBSCRIBE was not answered in time".into()),
            };
            if outcome.is_err() {
                break;
            }
        }
    }
    if outcome.is_ok() && !fresh.is_empty() {
        // Subscribed: now where each stream stands, before any waiting
        // subscriber reads history (see `Tracked`). Messages meanwhile wait
        // in the connection's stream.
        let mut starts = futures_util::stream::iter(fresh.iter().cloned())
            .map(|channel| async move { shared.start_at_stream(&channel).await })
            .buffer_unordered(RESYNC_CONCURRENCY);
        while let Some(started) = starts.next().await {
            if let Err(err) = started {
                outcome = Err(err.to_string());
            }
        }
        drop(starts);
        if outcome.is_ok() {
            let mut tracked = shared.tracked.lock().expect("tracked lock");
            for channel in &fresh {
                if let Some(state) = tracked.get_mut(channel.as_str()) {
                    state.live = state.last.is_some();
                }
            }
        }
    }
    for reply in replies {
        let _ = reply.send(
            outcome
                .clone()
                .map_err(|why| BrokerError::Unavailable(format!("Redis SUBSCRIBE failed: {why}"))),
        );
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_round_trips() {
        let publication = Publication::new(
            ChannelName::parse("chat:1").unwrap(),
            Position::new(Epoch::parse("abc").unwrap(), 42),
            Some(EventName::parse("msg").unwrap()),
            "{\"text\": \"a\\nb\"}",
            1_700_000_000_123,
        );
        let wire = encode(&publication);
        let back = decode(wire.as_bytes()).expect("decodes");
        assert_eq!(back.envelope(), publication.envelope());
        assert_eq!(back.published_at_ms(), 1_700_000_000_123);
        assert_eq!(back.position(), publication.position());

        for bad in [
            "",
            "2\nchat\nabc\n1\n0\n\n1",
            "1\nbad channel\nabc\n1\n0\n\n1",
            "1\nchat\nabc\nx\n0\n\n1",
            "1\nchat\nabc\n1\n0\n\nnot json",
            "1\nchat\nabc\n1\n0\n",
        ] {
            assert!(decode(bad.as_bytes()).is_none(), "{bad:?} refused");
        }
    }

    #[test]
    fn keys_carry_the_channel_as_a_hash_tag() {
        let keys = Keys {
            prefix: "pg".into(),
        };
        assert_eq!(keys.meta("a:b"), "pg:{a:b}:m");
        assert_eq!(keys.pubsub("a:b"), "pg:{a:b}");
        assert_eq!(keys.channel_of("pg:{a:b}"), Some("a:b"));
        assert_eq!(keys.channel_of("other:{a:b}"), None);
    }

    #[test]
    fn urls_are_checked_and_passwords_never_echoed() {
        assert!(parse_url("redis://127.0.0.1:6379/2").is_ok());
        assert!(parse_url("rediss://user:pw@example.com:6380").is_ok());
        assert!(parse_url("http://127.0.0.1").is_err());
        assert_eq!(redact("redis://u:secret@h:1/0"), "redis://***@h:1/0");
    }
}
