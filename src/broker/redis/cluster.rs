//! The pub/sub listener on a Redis Cluster: one task, one RESP3 connection
//! per master, each channel subscribed (`SSUBSCRIBE`) on the master that
//! serves its slot now.
//!
//! A channel loses its subscription when its master's connection is lost
//! (the master died, or restarted), when the master unsubscribes it
//! unasked (Redis does so when the slot moves away or the master becomes a
//! replica), or when the slot map says another master serves it now. Each
//! of these makes the channel *homeless*: not live (see `Tracked`), and
//! placed again as soon as the slot map names a master that answers:
//! subscribed there, then checked against its stream exactly as after a
//! single-Redis outage (the gap from history, or a reset), before any new
//! publication on it is handed to the hub. So no acknowledged publication
//! is ever skipped silently, whichever topology event took the
//! subscription away.
//!
//! Every reply to a subscription command is checked: a connection whose
//! replies no longer match its requests (an unasked `sunsubscribe` taken
//! for the reply to a request) is dropped, and its channels placed again.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::listener::on_payload;
use super::router::{node_url, slot, Router, TOPOLOGY_EVERY};
use super::{Command, Shared, PUBSUB_PING};
use crate::broker::BrokerError;
use crate::message::ChannelName;

/// How often homeless channels are tried again.
const REPLACE_EVERY: Duration = Duration::from_millis(100);

/// Hands a connection's pushes to the listener, tagged with the
/// connection, so pushes of a connection already dropped are told apart.
struct Tagged {
    id: u64,
    pushes: mpsc::UnboundedSender<(u64, PushInfo)>,
}

impl redis::aio::AsyncPushSender for Tagged {
    fn send(&self, info: PushInfo) -> Result<(), redis::aio::SendError> {
        self.pushes
            .send((self.id, info))
            .map_err(|_| redis::aio::SendError)
    }
}

/// The pub/sub connection to one master.
struct Shard {
    id: u64,
    conn: MultiplexedConnection,
    /// Channels subscribed here, confirmed by their reply.
    channels: HashSet<ChannelName>,
    /// `SUNSUBSCRIBE`s sent and not yet confirmed, by pub/sub name: the
    /// `sunsubscribe` pushes that answer them; any other is unasked.
    solicited: HashMap<String, u32>,
}

struct Listener {
    shared: Weak<Shared>,
    router: Arc<Router>,
    pushes: mpsc::UnboundedSender<(u64, PushInfo)>,
    /// By master address.
    shards: HashMap<String, Shard>,
    /// Which connection an id is: a master's address, or `None` for the
    /// orders connection.
    ids: HashMap<u64, Option<String>>,
    orders: Option<MultiplexedConnection>,
    /// Tracked channels subscribed nowhere now.
    homeless: HashSet<ChannelName>,
    next_id: u64,
}

pub(super) async fn cluster_listener(
    shared: Weak<Shared>,
    router: Arc<Router>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let (pushes, mut received) = mpsc::unbounded_channel();
    let mut listener = Listener {
        shared,
        router,
        pushes,
        shards: HashMap::new(),
        ids: HashMap::new(),
        orders: None,
        homeless: HashSet::new(),
        next_id: 0,
    };
    let mut replace = tokio::time::interval(REPLACE_EVERY);
    replace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut topology = tokio::time::interval(TOPOLOGY_EVERY);
    topology.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping = tokio::time::interval(PUBSUB_PING);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset();
    loop {
        let Some(shared) = listener.shared.upgrade() else {
            return;
        };
        tokio::select! {
            push = received.recv() => {
                let Some((id, push)) = push else { return };
                listener.on_push(&shared, id, push);
            }
            command = commands.recv() => {
                let Some(command) = command else { return };
                listener.apply(&shared, command).await;
            }
            _ = replace.tick() => listener.repair(&shared).await,
            _ = topology.tick() => listener.follow_topology(&shared).await,
            _ = ping.tick() => listener.ping(&shared).await,
        }
        listener.report(&shared);
    }
}

impl Listener {
    /// Publishes this listener's state: the masters channels wait for, and
    /// whether everything is subscribed and checked.
    fn report(&self, shared: &Shared) {
        let map = self.router.map();
        let waiting: HashSet<String> = self
            .homeless
            .iter()
            .filter_map(|channel| {
                map.master(slot(&shared.keys.pubsub(channel.as_str())))
                    .map(str::to_owned)
            })
            .collect();
        *self.router.pubsub_down.lock().expect("pubsub lock") = waiting;
        let up = self.orders.is_some() && self.homeless.is_empty();
        if shared.stats.pubsub_up.swap(up, Ordering::Relaxed) != up && up {
            tracing::info!(
                "engine: every channel is subscribed on its Redis Cluster master and checked"
            );
        }
    }

    fn on_push(&mut self, shared: &Shared, id: u64, push: PushInfo) {
        let Some(owner) = self.ids.get(&id).cloned() else {
            return; // A connection dropped already: its channels were placed again.
        };
        let bytes = |value: Option<&Value>| match value {
            Some(Value::BulkString(bytes)) => Some(bytes.clone()),
            _ => None,
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let (Some(name), Some(payload)) =
                    (bytes(push.data.first()), bytes(push.data.get(1)))
                {
                    on_payload(shared, &String::from_utf8_lossy(&name), &payload);
                }
            }
            PushKind::SUnsubscribe => {
                let Some(addr) = owner else { return };
                let name = String::from_utf8_lossy(&bytes(push.data.first()).unwrap_or_default())
                    .into_owned();
                let Some(shard) = self.shards.get_mut(&addr) else {
                    return;
                };
                if let Some(count) = shard.solicited.get_mut(&name) {
                    *count -= 1;
                    if *count == 0 {
                        shard.solicited.remove(&name);
                    }
                    return;
                }
                // Unasked: the slot moved away, or the master is a replica
                // now. The channel is placed again where its slot lives.
                let Some(channel) = shared
                    .keys
                    .channel_of(&name)
                    .and_then(|c| ChannelName::parse(c).ok())
                else {
                    return;
                };
                if shard.channels.remove(&channel) {
                    shared
                        .stats
                        .unsolicited_unsubscribes
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%channel, master = %addr, "engine: a Redis Cluster master unsubscribed a channel (its slot moved); subscribing where it lives now");
                    self.make_homeless(shared, channel);
                }
            }
            PushKind::Disconnection => match owner {
                None => {
                    self.ids.remove(&id);
                    self.orders = None;
                    tracing::warn!(
                        "engine: lost the Redis Cluster orders connection; reconnecting"
                    );
                }
                Some(addr) => self.drop_shard(shared, &addr, "its connection was lost"),
            },
            _ => {}
        }
    }

    /// The channel is subscribed nowhere: not live until placed again.
    fn make_homeless(&mut self, shared: &Shared, channel: ChannelName) {
        shared.set_channel_live(&channel, false);
        if shared
            .tracked
            .lock()
            .expect("tracked lock")
            .contains_key(channel.as_str())
        {
            self.homeless.insert(channel);
        }
    }

    /// Forgets a master's connection; its channels are placed again.
    fn drop_shard(&mut self, shared: &Shared, addr: &str, why: &str) {
        let Some(shard) = self.shards.remove(addr) else {
            return;
        };
        self.ids.remove(&shard.id);
        shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(master = addr, channels = shard.channels.len(), "engine: dropped the pub/sub connection to a Redis Cluster master ({why}); its channels are subscribed again and checked once it answers");
        for channel in shard.channels {
            self.make_homeless(shared, channel);
        }
    }

    async fn apply(&mut self, shared: &Shared, command: Command) {
        match command {
            Command::Subscribe(channel, reply) => {
                let fresh = {
                    let mut tracked = shared.tracked.lock().expect("tracked lock");
                    let fresh = !tracked.contains_key(channel.as_str());
                    tracked.entry(channel.clone()).or_default();
                    fresh
                };
                let live = || {
                    shared
                        .tracked
                        .lock()
                        .expect("tracked lock")
                        .get(channel.as_str())
                        .is_some_and(|state| state.live)
                };
                // Commands run in order: a channel tracked already is live,
                // or homeless (then placed now, or refused).
                let outcome = if !fresh && live() {
                    Ok(())
                } else {
                    self.homeless.remove(&channel);
                    self.place(shared, &channel).await
                };
                if let Err(why) = &outcome {
                    if fresh {
                        shared
                            .tracked
                            .lock()
                            .expect("tracked lock")
                            .remove(channel.as_str());
                    } else {
                        self.homeless.insert(channel.clone());
                    }
                    tracing::debug!(%channel, error = %why, "engine: could not subscribe on the Redis Cluster");
                }
                let _ = reply.send(outcome.map_err(|why| {
                    BrokerError::Unavailable(format!(
                        "the Redis Cluster master of this channel is unavailable: {why}"
                    ))
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
                    self.homeless.remove(&channel);
                    let addr = self
                        .shards
                        .iter()
                        .find(|(_, shard)| shard.channels.contains(&channel))
                        .map(|(addr, _)| addr.clone());
                    if let Some(addr) = addr {
                        self.unsubscribe(shared, &addr, &channel).await;
                    }
                }
            }
        }
    }

    /// Subscribes a channel on the master serving its slot and checks it
    /// against its stream; live once both succeeded.
    async fn place(&mut self, shared: &Shared, channel: &ChannelName) -> Result<(), String> {
        let name = shared.keys.pubsub(channel.as_str());
        let slot = slot(&name);
        let mut map = self.router.map();
        if map.master(slot).is_none() {
            self.router.refresh(false).await;
            map = self.router.map();
        }
        let addr = map
            .master(slot)
            .ok_or("no master is known for its slot")?
            .to_owned();
        let timeout = shared.options.command_timeout;
        let mut conn = self.shard(shared, &addr).await?;
        let reply = tokio::time::timeout(
            timeout,
            redis::cmd("SSUBSCRIBE")
                .arg(&name)
                .query_async::<Value>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(Value::Push {
                kind: PushKind::SSubscribe,
                data,
            })) if data.first() == Some(&Value::BulkString(name.clone().into_bytes())) => {}
            Ok(Err(err))
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::Moved) =>
            {
                self.router.refresh(true).await;
                return Err(err.to_string());
            }
            Ok(Err(err)) if err.code().is_some() => return Err(err.to_string()),
            other => {
                let why = format!("SSUBSCRIBE was answered {other:?}");
                self.drop_shard(shared, &addr, &why);
                return Err(why);
            }
        }
        if let Some(shard) = self.shards.get_mut(&addr) {
            shard.channels.insert(channel.clone());
        }
        // Subscribed: whatever is published from now on arrives, and waits
        // in this task's queue while the stream is read. Not live
        // meanwhile (see `Tracked`).
        shared.set_channel_live(channel, false);
        if let Err(err) = shared.resync(channel).await {
            // Checked again from the start once placed again.
            self.unsubscribe(shared, &addr, channel).await;
            return Err(err.to_string());
        }
        shared.set_channel_live(channel, true);
        Ok(())
    }

    /// `SUNSUBSCRIBE` on a master, its reply checked.
    async fn unsubscribe(&mut self, shared: &Shared, addr: &str, channel: &ChannelName) {
        let Some(shard) = self.shards.get_mut(addr) else {
            return;
        };
        shard.channels.remove(channel);
        let name = shared.keys.pubsub(channel.as_str());
        *shard.solicited.entry(name.clone()).or_default() += 1;
        let mut conn = shard.conn.clone();
        let reply = tokio::time::timeout(
            shared.options.command_timeout,
            redis::cmd("SUNSUBSCRIBE")
                .arg(&name)
                .query_async::<Value>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok(Value::Push {
                kind: PushKind::SUnsubscribe,
                data,
            })) if data.first() == Some(&Value::BulkString(name.into_bytes())) => {}
            other => {
                let why = format!("SUNSUBSCRIBE was answered {other:?}");
                self.drop_shard(shared, addr, &why);
            }
        }
    }

    /// The pub/sub connection to the master at `addr`, made if needed.
    async fn shard(
        &mut self,
        shared: &Shared,
        addr: &str,
    ) -> Result<MultiplexedConnection, String> {
        if let Some(shard) = self.shards.get(addr) {
            return Ok(shard.conn.clone());
        }
        let id = self.connection_id(Some(addr.to_owned()));
        let conn = self.connect(shared, addr, id).await.inspect_err(|_| {
            self.ids.remove(&id);
        })?;
        self.shards.insert(
            addr.to_owned(),
            Shard {
                id,
                conn: conn.clone(),
                channels: HashSet::new(),
                solicited: HashMap::new(),
            },
        );
        Ok(conn)
    }

    fn connection_id(&mut self, owner: Option<String>) -> u64 {
        self.next_id += 1;
        self.ids.insert(self.next_id, owner);
        self.next_id
    }

    async fn connect(
        &self,
        shared: &Shared,
        addr: &str,
        id: u64,
    ) -> Result<MultiplexedConnection, String> {
        let options = self.router.options();
        let client = super::connection::client_for(options, &node_url(&options.url, addr, true))?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(shared.options.command_timeout))
            .set_push_sender(Tagged {
                id,
                pushes: self.pushes.clone(),
            });
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|err| err.to_string())
    }

    /// Connects the orders connection if it is down, and places homeless
    /// channels where the slot map says their slots live.
    async fn repair(&mut self, shared: &Shared) {
        if self.orders.is_none() {
            self.connect_orders(shared).await;
        }
        if self.homeless.is_empty() {
            return;
        }
        self.router.refresh(false).await;
        let map = self.router.map();
        // One attempt per master per round: a master that does not answer
        // costs one connect timeout, not one per channel.
        let mut failed: HashSet<String> = HashSet::new();
        let channels: Vec<ChannelName> = self.homeless.iter().cloned().collect();
        for channel in channels {
            let master = map
                .master(slot(&shared.keys.pubsub(channel.as_str())))
                .map(str::to_owned);
            if master.as_ref().is_none_or(|m| failed.contains(m)) {
                continue;
            }
            if !shared
                .tracked
                .lock()
                .expect("tracked lock")
                .contains_key(channel.as_str())
            {
                self.homeless.remove(&channel);
                continue;
            }
            match self.place(shared, &channel).await {
                Ok(()) => {
                    self.homeless.remove(&channel);
                }
                Err(why) => {
                    tracing::debug!(%channel, error = %why, "engine: a channel waits for its Redis Cluster master");
                    failed.extend(master);
                }
            }
        }
    }

    async fn connect_orders(&mut self, shared: &Shared) {
        let Ok((addr, _)) = self.router.route(None).await else {
            return;
        };
        let id = self.connection_id(None);
        let connected = match self.connect(shared, &addr, id).await {
            Ok(mut conn) => tokio::time::timeout(
                shared.options.command_timeout,
                conn.subscribe(shared.keys.orders()),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|()| conn),
            Err(_) => None,
        };
        match connected {
            Some(conn) => self.orders = Some(conn),
            None => {
                self.ids.remove(&id);
            }
        }
    }

    /// Reads the slot map and moves every channel whose slot another
    /// master serves now: unsubscribed where it was, placed again.
    async fn follow_topology(&mut self, shared: &Shared) {
        self.router.refresh(false).await;
        let map = self.router.map();
        let moved: Vec<(String, ChannelName)> = self
            .shards
            .iter()
            .flat_map(|(addr, shard)| {
                shard
                    .channels
                    .iter()
                    .filter(|c| map.master(slot(&shared.keys.pubsub(c.as_str()))) != Some(addr))
                    .map(|c| (addr.clone(), c.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (addr, channel) in moved {
            tracing::info!(%channel, from = %addr, "engine: a channel's slot moved to another Redis Cluster master; subscribing there");
            self.unsubscribe(shared, &addr, &channel).await;
            self.make_homeless(shared, channel);
        }
        // Connections no channel needs are closed.
        let idle: Vec<String> = self
            .shards
            .iter()
            .filter(|(_, shard)| shard.channels.is_empty() && shard.solicited.is_empty())
            .map(|(addr, _)| addr.clone())
            .collect();
        for addr in idle {
            if let Some(shard) = self.shards.remove(&addr) {
                self.ids.remove(&shard.id);
            }
        }
    }

    /// A connection that stopped answering without closing is dropped.
    async fn ping(&mut self, shared: &Shared) {
        let timeout = shared.options.command_timeout;
        let conns: Vec<(String, MultiplexedConnection)> = self
            .shards
            .iter()
            .map(|(addr, shard)| (addr.clone(), shard.conn.clone()))
            .collect();
        for (addr, mut conn) in conns {
            let answered =
                tokio::time::timeout(timeout, redis::cmd("PING").query_async::<Value>(&mut conn))
                    .await;
            if !matches!(answered, Ok(Ok(_))) {
                self.drop_shard(shared, &addr, "PING was not answered");
            }
        }
    }
}
