//! The pub/sub listener on a Redis Cluster: sharded subscriptions over one
//! RESP3 cluster connection.

use std::sync::atomic::Ordering;

use redis::Value;
use tokio::sync::mpsc;

use super::listener::on_payload;
use super::{Command, Shared, BACKOFF_CAP, BACKOFF_FIRST};
use crate::broker::BrokerError;
use crate::message::ChannelName;

/// messages, orders, subscription confirmations, disconnections) arrive on
/// `pushes`. The client resubscribes by itself after a node fails over or
/// comes back; each confirmation of a channel's subscription checks that
/// channel against its stream, so what was missed meanwhile is delivered or
/// announced by a reset, as on one server.
pub(super) async fn cluster_listener(
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
