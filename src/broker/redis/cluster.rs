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
//!
//! The task never waits on a master that may not answer: connections are
//! made, and idle connections pinged, by tasks of their own that report
//! back, so a master that hangs (no reset, no answer) delays nothing of the
//! others. A subscriber whose channel's master has no connection yet waits
//! for it.

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
    /// Connections being made, by the id they will have; and where each
    /// reports.
    connecting: HashSet<u64>,
    connected: mpsc::UnboundedSender<Connected>,
    /// Subscribers waiting for their channel's master to be connected, by
    /// master address.
    waiting: HashMap<String, Vec<(ChannelName, Reply)>>,
}

type Reply = tokio::sync::oneshot::Sender<Result<(), BrokerError>>;

/// A connection attempt's outcome: its id, and the connection or why not.
type Connected = (u64, Result<MultiplexedConnection, String>);

pub(super) async fn cluster_listener(
    shared: Weak<Shared>,
    router: Arc<Router>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let (pushes, mut received) = mpsc::unbounded_channel();
    let (connected, mut made) = mpsc::unbounded_channel();
    let mut listener = Listener {
        shared,
        router,
        pushes,
        shards: HashMap::new(),
        ids: HashMap::new(),
        orders: None,
        homeless: HashSet::new(),
        next_id: 0,
        connecting: HashSet::new(),
        connected,
        waiting: HashMap::new(),
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
            connected = made.recv() => {
                let Some((id, outcome)) = connected else { return };
                listener.on_connected(&shared, id, outcome).await;
            }
            _ = replace.tick() => listener.repair(&shared).await,
            _ = topology.tick() => listener.follow_topology(&shared).await,
            _ = ping.tick() => listener.ping(&shared),
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
                // Only the connection this id is: a newer one to the same
                // master stays.
                Some(addr) if self.shards.get(&addr).is_some_and(|shard| shard.id == id) => {
                    self.drop_shard(shared, &addr, "its connection was lost")
                }
                Some(_) => {}
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
                // or homeless (then placed now, or refused), or waiting for
                // its master's connection (then this subscriber waits too).
                if !fresh && live() {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.homeless.remove(&channel);
                match self.master_of(shared, &channel).await {
                    Some(addr) if !self.shards.contains_key(&addr) => {
                        self.connect(shared, Some(addr.clone()));
                        self.waiting.entry(addr).or_default().push((channel, reply));
                    }
                    _ => {
                        let outcome = self.place(shared, &channel).await;
                        self.answer(shared, channel, fresh, reply, outcome);
                    }
                }
            }
            Command::Unsubscribe(channel, _done) => {
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

    /// Answers a subscriber; a channel that could not be placed is
    /// forgotten when it was new here, or waits as homeless.
    fn answer(
        &mut self,
        shared: &Shared,
        channel: ChannelName,
        fresh: bool,
        reply: Reply,
        outcome: Result<(), String>,
    ) {
        if let Err(why) = &outcome {
            if fresh && !shared.hub.has_subscribers(channel.as_str()) {
                shared
                    .tracked
                    .lock()
                    .expect("tracked lock")
                    .remove(channel.as_str());
            } else {
                self.make_homeless(shared, channel.clone());
            }
            tracing::debug!(%channel, error = %why, "engine: could not subscribe on the Redis Cluster");
        }
        let _ = reply.send(outcome.map_err(|why| {
            BrokerError::Unavailable(format!(
                "the Redis Cluster master of this channel is unavailable: {why}"
            ))
        }));
    }

    /// The address of the master serving a channel's slot, reading the
    /// slot map first if it names none.
    async fn master_of(&self, shared: &Shared, channel: &ChannelName) -> Option<String> {
        let slot = slot(&shared.keys.pubsub(channel.as_str()));
        if self.router.map().master(slot).is_none() {
            self.router.refresh(false).await;
        }
        self.router.map().master(slot).map(str::to_owned)
    }

    /// Subscribes a channel on the master serving its slot and checks it
    /// against its stream; live once both succeeded.
    async fn place(&mut self, shared: &Shared, channel: &ChannelName) -> Result<(), String> {
        let name = shared.keys.pubsub(channel.as_str());
        let addr = self
            .master_of(shared, channel)
            .await
            .ok_or("no master is known for its slot")?;
        let timeout = shared.options.command_timeout;
        let Some(mut conn) = self.shards.get(&addr).map(|shard| shard.conn.clone()) else {
            self.connect(shared, Some(addr));
            return Err("its master is not connected yet".into());
        };
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

    /// Starts connecting to the master at `addr` (`None`: any master, for
    /// the orders connection) unless that is under way; the outcome comes
    /// back through `connected`.
    fn connect(&mut self, shared: &Shared, owner: Option<String>) {
        let busy = self
            .connecting
            .iter()
            .any(|id| self.ids.get(id) == Some(&owner));
        if busy {
            return;
        }
        let addr = match &owner {
            Some(addr) => addr.clone(),
            None => {
                // The orders connection goes to a master that answers.
                let unreachable = self.router.down();
                let masters = self.router.map().masters();
                match masters
                    .iter()
                    .find(|(_, slots)| !unreachable.contains(slots))
                    .or(masters.first())
                {
                    Some((addr, _)) => addr.clone(),
                    None => return,
                }
            }
        };
        self.next_id += 1;
        let id = self.next_id;
        self.ids.insert(id, owner);
        self.connecting.insert(id);
        let options = self.router.options();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(shared.options.command_timeout))
            .set_push_sender(Tagged {
                id,
                pushes: self.pushes.clone(),
            });
        let client = super::connection::client_for(options, &node_url(&options.url, &addr, true));
        let (orders, timeout) = (shared.keys.orders(), shared.options.command_timeout);
        let is_orders = self.ids.get(&id) == Some(&None);
        let connected = self.connected.clone();
        tokio::spawn(async move {
            let outcome = async {
                let mut conn = client?
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|err| err.to_string())?;
                if is_orders {
                    tokio::time::timeout(timeout, conn.subscribe(orders))
                        .await
                        .map_err(|_| "SUBSCRIBE was not answered in time".to_owned())?
                        .map_err(|err| err.to_string())?;
                }
                Ok(conn)
            }
            .await;
            let _ = connected.send((id, outcome));
        });
    }

    /// A connection attempt ended: the connection is taken, and the
    /// channels waiting for it placed (or their subscribers refused).
    async fn on_connected(
        &mut self,
        shared: &Shared,
        id: u64,
        outcome: Result<MultiplexedConnection, String>,
    ) {
        self.connecting.remove(&id);
        let Some(owner) = self.ids.get(&id).cloned() else {
            return;
        };
        let conn = match outcome {
            Ok(conn) => conn,
            Err(why) => {
                self.ids.remove(&id);
                tracing::debug!(master = ?owner, error = %why, "engine: could not connect to a Redis Cluster master");
                if let Some(addr) = owner {
                    for (channel, reply) in self.waiting.remove(&addr).unwrap_or_default() {
                        let fresh = !shared.hub.has_subscribers(channel.as_str());
                        self.answer(shared, channel, fresh, reply, Err(why.clone()));
                    }
                }
                return;
            }
        };
        let Some(addr) = owner else {
            self.orders = Some(conn);
            return;
        };
        if let Some(old) = self.shards.remove(&addr) {
            self.ids.remove(&old.id);
        }
        self.shards.insert(
            addr.clone(),
            Shard {
                id,
                conn,
                channels: HashSet::new(),
                solicited: HashMap::new(),
            },
        );
        for (channel, reply) in self.waiting.remove(&addr).unwrap_or_default() {
            let live = shared
                .tracked
                .lock()
                .expect("tracked lock")
                .get(channel.as_str())
                .is_some_and(|state| state.live);
            let outcome = if live {
                Ok(())
            } else {
                self.place(shared, &channel).await
            };
            let fresh = !shared.hub.has_subscribers(channel.as_str());
            self.answer(shared, channel, fresh, reply, outcome);
        }
        self.repair(shared).await;
    }

    /// Connects the orders connection if it is down, and places homeless
    /// channels where the slot map says their slots live.
    async fn repair(&mut self, shared: &Shared) {
        if self.orders.is_none() {
            self.connect(shared, None);
        }
        if self.homeless.is_empty() {
            return;
        }
        self.refresh_map();
        let map = self.router.map();
        // One attempt per master per round: a master that does not answer
        // costs one connect timeout, not one per channel.
        let mut failed: HashSet<String> = HashSet::new();
        let channels: Vec<ChannelName> = self.homeless.iter().cloned().collect();
        for channel in channels {
            let master = map
                .master(slot(&shared.keys.pubsub(channel.as_str())))
                .map(str::to_owned);
            let Some(master) = master else {
                continue;
            };
            if failed.contains(&master) {
                continue;
            }
            if !self.shards.contains_key(&master) {
                self.connect(shared, Some(master));
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
                    failed.insert(master);
                }
            }
        }
    }

    /// Moves every channel whose slot the slot map gives to another master
    /// now: unsubscribed where it was, placed again. The map is read again
    /// in the background for the next round.
    async fn follow_topology(&mut self, shared: &Shared) {
        self.refresh_map();
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

    /// Reads the slot map again by a task of its own (a master that hangs
    /// must not hold up this one); the next round sees the new map.
    fn refresh_map(&self) {
        let router = self.router.clone();
        tokio::spawn(async move { router.refresh(false).await });
    }

    /// A connection that stops answering without closing is dropped: each
    /// is pinged by a task of its own, which reports a failure as the
    /// connection's disconnection.
    fn ping(&self, shared: &Shared) {
        let timeout = shared.options.command_timeout;
        for shard in self.shards.values() {
            let (id, mut conn, pushes) = (shard.id, shard.conn.clone(), self.pushes.clone());
            tokio::spawn(async move {
                let answered = tokio::time::timeout(
                    timeout,
                    redis::cmd("PING").query_async::<Value>(&mut conn),
                )
                .await;
                if !matches!(answered, Ok(Ok(_))) {
                    let _ = pushes.send((
                        id,
                        PushInfo {
                            kind: PushKind::Disconnection,
                            data: Vec::new(),
                        },
                    ));
                }
            });
        }
    }
}
