//! The pub/sub listener on one Redis server: one connection, one task;
//! subscribing as local subscribers come and go, feeding the hub, and
//! reconnecting, resubscribing and checking every channel after an outage.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::Client;
use tokio::sync::mpsc;

use super::wire::{decode, Digest, WIRE_EPHEMERAL, WIRE_PRESENCE};
use super::{
    Command, Shared, Tracked, BACKOFF_CAP, BACKOFF_FIRST, PUBSUB_PING, RESYNC_CONCURRENCY,
    SUBSCRIBE_CHUNK,
};
use crate::broker::{BrokerError, Order};
use crate::message::{ChannelName, Publication};

/// The task that owns the pub/sub connection: subscribes and unsubscribes
/// as local subscribers come and go, feeds the hub, and reconnects.
pub(super) struct Listener {
    /// Weak, so the task ends when the engine is dropped.
    pub(super) shared: std::sync::Weak<Shared>,
    pub(super) client: Client,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
}

/// Why a connected spell ended.
enum Ended {
    /// The connection failed: reconnect.
    Lost(String),
    /// The engine is gone.
    Stopped,
}

impl Listener {
    pub(super) async fn run(mut self) {
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
            Command::Unsubscribe(channel, _done) => {
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
pub(super) fn on_payload(shared: &Shared, name: &str, payload: &[u8]) {
    shared.stats.messages.fetch_add(1, Ordering::Relaxed);
    if name == shared.keys.orders() {
        on_order(shared, payload);
        return;
    }
    if let Some(rest) = payload.strip_prefix(WIRE_EPHEMERAL.as_bytes()) {
        let ephemeral = shared
            .keys
            .channel_of(name)
            .and_then(|c| ChannelName::parse(c).ok())
            .and_then(|channel| {
                let (event, json) = std::str::from_utf8(rest).ok()?.split_once('\n')?;
                let event = match event {
                    "" => None,
                    name => Some(crate::message::EventName::parse(name).ok()?),
                };
                Publication::ephemeral_from(channel, event, json)
            });
        match ephemeral {
            Some(publication) => {
                shared.hub.deliver(&Arc::new(publication));
            }
            None => {
                shared.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
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
        // Digested once per publication on this node, whatever the number
        // of its subscribers here.
        Some(publication) => shared.deliver(Arc::new(publication), Some(Digest::of(payload))),
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

/// Carries out subscribe and unsubscribe requests on the connection.
async fn apply(
    shared: &Shared,
    sink: &mut redis::aio::PubSubSink,
    batch: Vec<Command>,
) -> Result<(), String> {
    let mut fresh = Vec::new();
    let mut replies = Vec::new();
    let mut unsubscribe = Vec::new();
    // Held until the UNSUBSCRIBE is answered: dropping one tells its
    // caller the node no longer listens.
    let mut unsubscribed = Vec::new();
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
                Command::Unsubscribe(channel, done) => {
                    unsubscribed.push(done);
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
    drop(unsubscribed);
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
