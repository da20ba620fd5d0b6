//! Presence and connection places in Redis, refreshed while this node holds
//! them.

use super::{failures, millis, Route, Shared};
use crate::broker::BrokerError;
use crate::message::ChannelName;

impl Shared {
    /// Runs the join script for one member (also its heartbeat refresh);
    /// whether it is the first live entry of `user`, when one is given.
    pub(super) async fn list(
        &self,
        channel: &str,
        connection: &str,
        member_json: &str,
        listed: bool,
        event: &str,
        user: Option<&str>,
    ) -> Result<bool, BrokerError> {
        let mut invocation = self.join_script.prepare_invoke();
        invocation
            .key(self.keys.presence(channel))
            .arg(connection)
            .arg(member_json)
            .arg(millis(self.options.presence_ttl))
            .arg(if listed { "1" } else { "0" })
            .arg(self.keys.pubsub(channel))
            .arg(event)
            .arg(self.publish_command)
            .arg(user.unwrap_or(""));
        let invocation = &invocation;
        self.run(
            Route::Key(&self.keys.presence(channel)),
            false,
            |mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await },
        )
        .await
        .map(|first| first == 2)
    }

    pub(super) async fn take_user_slot(
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
            .run(
                Route::Key(&self.keys.user(user)),
                false,
                |mut conn| async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        Ok(taken == 1)
    }
}

/// Refreshes this node's presence entries and connection places every third
/// of `presence_ttl`, so they outlive neither the node nor its connections by
/// more than that.
pub(super) async fn refresh_presence(shared: std::sync::Weak<Shared>) {
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
        let failed_slots = failures(slots.into_iter().map(|(user, connection)| {
            let shared = &shared;
            async move { shared.take_user_slot(&user, &connection, usize::MAX).await }
        }))
        .await;
        if failed_slots > 0 {
            tracing::debug!(
                failed = failed_slots,
                "engine: some connection places were not refreshed"
            );
        }
        let refreshed = failures(listed.into_iter().map(|((channel, connection), json)| {
            let shared = &shared;
            async move {
                shared
                    .list(channel.as_str(), &connection, &json, true, "", None)
                    .await
                    .map(drop)
            }
        }))
        .await;
        if refreshed > 0 {
            tracing::debug!(
                failed = refreshed,
                "engine: some presence entries were not refreshed"
            );
        }
    }
}
