//! A Redis Cluster's topology as this node knows it: which master serves
//! which slots, one command connection per master, and which masters are
//! unreachable now.
//!
//! Each master is reached on its own connection, so one that is away costs
//! only the commands for its own slots: they fail at once (503), while
//! commands for the other masters' slots go on as before. The slot map is
//! read again (`CLUSTER SLOTS`) when a master redirects a command
//! (`MOVED`), when a master stops answering (it may have been replaced by
//! its replica), and every [`TOPOLOGY_EVERY`] by the listener.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::Value;

use super::connection::{client_for, Commands};
use super::{RedisOptions, Route};

/// Slots in a Redis Cluster.
const SLOTS: u16 = 16384;
/// Least time between two reads of the slot map, unless a `MOVED` forces
/// one: a master that is away must not turn every command into a read.
const REFRESH_AT_MOST_EVERY: Duration = Duration::from_millis(200);
/// How often the listener checks the slot map on its own, to notice slots
/// that moved without a redirect or an unsubscription telling it.
pub(super) const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// The slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole key
/// when it has none, modulo 16384 (the Redis Cluster specification).
pub(super) fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &bytes[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(bytes)) % SLOTS
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which master serves which slots: ranges sorted by their first slot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct SlotMap {
    ranges: Vec<(u16, u16, String)>,
    /// Some master has a replica, which a failover may promote.
    replicated: bool,
}

impl SlotMap {
    /// The address of the master serving `slot`.
    pub(super) fn master(&self, slot: u16) -> Option<&str> {
        self.ranges
            .iter()
            .find(|(first, last, _)| *first <= slot && slot <= *last)
            .map(|(_, _, addr)| addr.as_str())
    }

    /// Every master, with the slot ranges it serves written out
    /// (`0-5460`), sorted by its first slot.
    pub(super) fn masters(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (first, last, addr) in &self.ranges {
            let range = if first == last {
                first.to_string()
            } else {
                format!("{first}-{last}")
            };
            match out.iter_mut().find(|(a, _)| a == addr) {
                Some((_, ranges)) => {
                    ranges.push(',');
                    ranges.push_str(&range);
                }
                None => out.push((addr.clone(), range)),
            }
        }
        out
    }

    /// Reads a `CLUSTER SLOTS` reply; `fallback_host` stands in for a
    /// master that announces no host.
    fn parse(reply: &Value, fallback_host: &str) -> Option<SlotMap> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut ranges = Vec::new();
        let mut replicated = false;
        for entry in entries {
            let Value::Array(fields) = entry else {
                return None;
            };
            let number = |value: &Value| match value {
                Value::Int(n) => u16::try_from(*n).ok(),
                _ => None,
            };
            let first = number(fields.first()?)?;
            let last = number(fields.get(1)?)?;
            let Value::Array(master) = fields.get(2)? else {
                return None;
            };
            let host = match master.first()? {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
                Value::SimpleString(text) => text.clone(),
                _ => String::new(),
            };
            let host = if host.is_empty() || host == "?" {
                fallback_host.to_owned()
            } else {
                host
            };
            let port = number(master.get(1)?)?;
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            ranges.push((first, last, addr));
            replicated |= fields.len() > 3;
        }
        ranges.sort();
        Some(SlotMap { ranges, replicated })
    }
}

/// The URL of one cluster node: `url` with its host and port replaced by
/// `addr`, asking for RESP3 when `resp3`.
pub(super) fn node_url(url: &str, addr: &str, resp3: bool) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    let mut out = format!("{scheme}://{userinfo}{addr}{tail}");
    if resp3 {
        out.push(if tail.contains('?') { '&' } else { '?' });
        out.push_str("protocol=resp3");
    }
    out
}

/// The host and port `engine.redis.url` names.
fn seed_addr(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host_port = authority
        .rfind('@')
        .map_or(authority, |at| &authority[at + 1..]);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:6379")
    }
}

pub(super) struct Router {
    options: RedisOptions,
    map: Mutex<Arc<SlotMap>>,
    /// Command connections, by master address; each reconnects by itself.
    conns: Mutex<HashMap<String, ConnectionManager>>,
    /// Masters whose last command did not reach them.
    unreachable: Mutex<HashSet<String>>,
    /// Masters the listener has channels waiting for (their pub/sub
    /// connection is lost).
    pub(super) pubsub_down: Mutex<HashSet<String>>,
    /// When the slot map was last read; held while it is read, so reads
    /// do not pile up.
    refreshed: tokio::sync::Mutex<Option<Instant>>,
    /// The risk of failing over without waiting for replicas was logged.
    warned_unreplicated: AtomicBool,
}

impl Router {
    pub(super) fn new(options: &RedisOptions) -> Router {
        Router {
            options: options.clone(),
            map: Mutex::default(),
            conns: Mutex::default(),
            unreachable: Mutex::default(),
            pubsub_down: Mutex::default(),
            refreshed: tokio::sync::Mutex::new(None),
            warned_unreplicated: AtomicBool::new(false),
        }
    }

    pub(super) fn map(&self) -> Arc<SlotMap> {
        self.map.lock().expect("slot map lock").clone()
    }

    pub(super) fn options(&self) -> &RedisOptions {
        &self.options
    }

    /// The command connection to the node at `addr`.
    pub(super) fn node(&self, addr: &str) -> redis::RedisResult<ConnectionManager> {
        let mut conns = self.conns.lock().expect("connections lock");
        if let Some(conn) = conns.get(addr) {
            return Ok(conn.clone());
        }
        let client = client_for(&self.options, &node_url(&self.options.url, addr, false)).map_err(
            |why| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "bad node URL",
                    why,
                ))
            },
        )?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.options.connect_timeout))
            .set_response_timeout(Some(self.options.command_timeout))
            .set_number_of_retries(1)
            .set_max_delay(super::BACKOFF_CAP);
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        conns.insert(addr.to_owned(), conn.clone());
        Ok(conn)
    }

    /// The master serving `slot` (any master for `None`) and its
    /// connection, reading the slot map first if it is not known yet.
    pub(super) async fn route(
        &self,
        slot: Option<u16>,
    ) -> redis::RedisResult<(String, ConnectionManager)> {
        if self.map().ranges.is_empty() {
            self.refresh(true).await;
        }
        let map = self.map();
        let addr = match slot {
            Some(slot) => map.master(slot),
            // Any master: one that answered lately, if there is one.
            None => {
                let unreachable = self.unreachable.lock().expect("unreachable lock").clone();
                map.ranges
                    .iter()
                    .map(|(_, _, addr)| addr.as_str())
                    .find(|addr| !unreachable.contains(*addr))
                    .or_else(|| map.ranges.first().map(|(_, _, addr)| addr.as_str()))
            }
        };
        let Some(addr) = addr else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no Redis Cluster master is known for this slot",
            )));
        };
        Ok((addr.to_owned(), self.node(addr)?))
    }

    /// Notes whether the master at `addr` answered.
    pub(super) fn reached(&self, addr: &str, reached: bool) {
        let mut unreachable = self.unreachable.lock().expect("unreachable lock");
        if reached {
            if unreachable.remove(addr) {
                tracing::info!(
                    master = addr,
                    "engine: a Redis Cluster master is reachable again"
                );
            }
        } else if unreachable.insert(addr.to_owned()) {
            tracing::warn!(
                master = addr,
                "engine: a Redis Cluster master is unreachable; publishes to its slots answer 503"
            );
        }
    }

    /// The masters of the current map that are down (no command reaches
    /// them, or channels wait for their pub/sub), as their slot ranges.
    pub(super) fn down(&self) -> Vec<String> {
        let unreachable = self.unreachable.lock().expect("unreachable lock").clone();
        let pubsub = self.pubsub_down.lock().expect("pubsub lock").clone();
        self.map()
            .masters()
            .into_iter()
            .filter(|(addr, _)| unreachable.contains(addr) || pubsub.contains(addr))
            .map(|(_, slots)| slots)
            .collect()
    }

    /// Reads the slot map from the first node that answers: known masters
    /// first, then the seed. At most once per [`REFRESH_AT_MOST_EVERY`]
    /// unless `force`d (a redirect said the map is wrong).
    pub(super) async fn refresh(&self, force: bool) {
        let mut refreshed = self.refreshed.lock().await;
        if let Some(at) = *refreshed {
            if at.elapsed() < REFRESH_AT_MOST_EVERY && !force {
                return;
            }
            if at.elapsed() < Duration::from_millis(20) {
                return; // Read by whoever held the lock just now.
            }
        }
        let mut candidates: Vec<String> = self
            .map()
            .masters()
            .into_iter()
            .map(|(addr, _)| addr)
            .collect();
        let seed = seed_addr(&self.options.url);
        if !candidates.contains(&seed) {
            candidates.push(seed);
        }
        // Masters that answered lately first.
        let unreachable = self.unreachable.lock().expect("unreachable lock").clone();
        candidates.sort_by_key(|addr| unreachable.contains(addr));
        for addr in candidates {
            let Ok(mut conn) = self.node(&addr) else {
                continue;
            };
            let read = tokio::time::timeout(
                self.options.command_timeout,
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async::<Value>(&mut conn),
            )
            .await;
            let host = addr.rsplit_once(':').map_or("127.0.0.1", |(host, _)| host);
            if let Ok(Ok(reply)) = read {
                if let Some(map) = SlotMap::parse(&reply, host) {
                    if !map.ranges.is_empty() {
                        if map.replicated
                            && self.options.wait_replicas == 0
                            && !self.warned_unreplicated.swap(true, Ordering::Relaxed)
                        {
                            tracing::warn!(
                                "engine: the Redis Cluster has replicas, and engine.redis.wait_replicas \
                                 is 0: a replica promoted after its master died can lack the last \
                                 publications the master answered, and a client that no node \
                                 delivered them to is not told; set wait_replicas: 1 to answer a \
                                 publish only once a replica holds it"
                            );
                        }
                        let mut current = self.map.lock().expect("slot map lock");
                        if **current != map {
                            tracing::info!(masters = ?map.masters(), "engine: Redis Cluster slot map read");
                            *current = Arc::new(map);
                        }
                        break;
                    }
                }
            }
        }
        *refreshed = Some(Instant::now());
    }
}

/// Runs a command on the master serving its slot, by `deadline`. A
/// `MOVED` reply (the command did not run) reads the slot map again and
/// tries once more; an `ASK` reply (the slot is being moved and the key is
/// already on the importing master) sends it there after `ASKING`. A
/// master that cannot be reached is noted, and the slot map read again in
/// the background, in case a replica took its place.
pub(super) async fn routed<T, F, Fut>(
    router: &Arc<Router>,
    route: Route<'_>,
    deadline: tokio::time::Instant,
    command: &F,
) -> Result<redis::RedisResult<T>, tokio::time::error::Elapsed>
where
    F: Fn(Commands) -> Fut,
    Fut: std::future::Future<Output = redis::RedisResult<T>>,
{
    let slot = match route {
        Route::Key(key) => Some(slot(key)),
        Route::Any => None,
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let (addr, conn) = match tokio::time::timeout_at(deadline, router.route(slot)).await? {
            Ok(found) => found,
            Err(err) => return Ok(Err(err)),
        };
        let outcome = tokio::time::timeout_at(deadline, command(Commands::Single(conn))).await;
        let err = match &outcome {
            Ok(Ok(_)) => {
                router.reached(&addr, true);
                return outcome;
            }
            Ok(Err(err)) => err,
            Err(_) => {
                router.reached(&addr, false);
                refresh_later(router);
                return outcome;
            }
        };
        match err.kind() {
            redis::ErrorKind::Server(redis::ServerErrorKind::Moved) if tries < 3 => {
                router.refresh(true).await;
                continue;
            }
            redis::ErrorKind::Server(redis::ServerErrorKind::Ask) => {
                let Some((host, port)) = err.redirect_node() else {
                    return outcome;
                };
                let conn = match router.node(&format!("{host}:{port}")) {
                    Ok(conn) => conn,
                    Err(err) => return Ok(Err(err)),
                };
                return tokio::time::timeout_at(deadline, command(Commands::Asking(conn))).await;
            }
            _ => {}
        }
        let unreachable = err.is_connection_refusal()
            || err.is_io_error()
            || err.is_connection_dropped()
            || err.is_timeout();
        if unreachable {
            // The first command after a master came back finds its
            // connection broken; the manager reconnects for the next.
            if err.is_connection_refusal() && tries < 2 {
                continue;
            }
            router.reached(&addr, false);
            refresh_later(router);
        } else {
            router.reached(&addr, true);
        }
        return outcome;
    }
}

/// Reads the slot map again, off the command's path.
fn refresh_later(router: &Arc<Router>) {
    let router = router.clone();
    tokio::spawn(async move { router.refresh(false).await });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_cluster_specification() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("pushgate:{foo}:m"), slot("foo"));
        assert_eq!(slot("a{}b"), slot("a{}b"), "an empty tag hashes the key");
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
    }

    #[test]
    fn a_slot_map_reads_masters_and_whether_any_has_a_replica() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |first: i64, last: i64, nodes: Vec<Value>| {
            let mut fields = vec![Value::Int(first), Value::Int(last)];
            fields.extend(nodes);
            Value::Array(fields)
        };
        let bare = Value::Array(vec![
            range(8192, 16383, vec![node("", 7001)]),
            range(0, 8191, vec![node("10.0.0.1", 7000)]),
        ]);
        let map = SlotMap::parse(&bare, "seed").unwrap();
        assert_eq!(map.master(0), Some("10.0.0.1:7000"));
        assert_eq!(map.master(16383), Some("seed:7001"), "no host: the seed's");
        assert!(!map.replicated);
        let replicated = Value::Array(vec![range(
            0,
            16383,
            vec![node("10.0.0.1", 7000), node("10.0.0.2", 7003)],
        )]);
        let map = SlotMap::parse(&replicated, "seed").unwrap();
        assert_eq!(map.master(100), Some("10.0.0.1:7000"));
        assert!(map.replicated);
        assert!(SlotMap::parse(&Value::Int(1), "seed").is_none());
    }

    #[test]
    fn node_urls_keep_credentials_and_database() {
        assert_eq!(
            node_url("redis://u:p@seed:7000/0", "10.0.0.2:7001", true),
            "redis://u:p@10.0.0.2:7001/0?protocol=resp3"
        );
        assert_eq!(node_url("rediss://seed:7000", "h:1", false), "rediss://h:1");
        assert_eq!(seed_addr("redis://u:p@seed:7000/0"), "seed:7000");
        assert_eq!(seed_addr("redis://seed"), "seed:6379");
    }
}
