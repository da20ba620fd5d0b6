//! Channels as this node holds them: the rules a name gets from the
//! `channels` config (presence, join/leave events, by prefix), and the
//! subscriptions of local sessions, counted across the hub and the engine
//! in one place.
//!
//! The invariant kept here: **the engine listens to a channel exactly while
//! the hub has a subscriber for it.** A session's subscription enters the
//! hub first and the engine second ([`Channels::join`]); it leaves the hub
//! first, and the engine stops listening only when that was the node's
//! last subscriber ([`Channels::release`]). Every way out of a
//! subscription, a failed setup as much as an unsubscribe or a closed
//! connection, goes through `release`, so the two counts cannot drift. The
//! engine's part of a release runs later, on its own task, and an engine
//! checks the hub again when it acts (`Hub::has_subscribers`): a release
//! that arrives after a new subscriber joined never silences the channel.

use std::sync::Arc;

use crate::broker::{Broker, BrokerError, Member, PresenceMode};
use crate::config::{ChannelRule, ClientPublish};
use crate::hub::{Hub, Outbox};
use crate::message::ChannelName;

/// The node's channels: the hub (local fan-out), the engine, and the rules.
pub struct Channels {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    /// Replaced whole by a reload: a subscription takes the rules of the
    /// moment it is made, and leaves by them.
    rules: arc_swap::ArcSwap<ChannelRules>,
    /// Told when a channel's first subscriber on this node arrived or its
    /// last left.
    watch: Option<Arc<dyn Watch>>,
}

/// What wants to know when this node starts or stops hearing a channel
/// (Pusher's occupied and vacated webhooks).
pub trait Watch: Send + Sync + 'static {
    /// Whether `channel` is watched at all: only those are reported.
    fn watches(&self, channel: &str) -> bool;
    /// This node's first subscriber to `channel` arrived or its last left,
    /// and the engine has started or stopped listening. A first
    /// subscriber's subscribe waits for it; a last one's runs on the
    /// release's own task.
    fn changed(
        self: Arc<Self>,
        channel: ChannelName,
    ) -> futures_util::future::BoxFuture<'static, ()>;
}

impl Channels {
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>, rules: ChannelRules) -> Channels {
        Channels {
            hub,
            broker,
            rules: arc_swap::ArcSwap::from_pointee(rules),
            watch: None,
        }
    }

    /// Reports first and last subscribers to `watch`.
    pub fn watched_by(mut self, watch: Option<Arc<dyn Watch>>) -> Channels {
        self.watch = watch;
        self
    }

    pub fn rules(&self) -> arc_swap::Guard<Arc<ChannelRules>> {
        self.rules.load()
    }

    /// Takes the `channels` rules of a reload.
    pub fn reload(&self, rules: ChannelRules) {
        self.rules.store(Arc::new(rules));
    }

    /// Tells the watch that `channel` changed here.
    async fn report(&self, channel: &ChannelName) {
        if let Some(watch) = &self.watch {
            if watch.watches(channel.as_str()) {
                watch.clone().changed(channel.clone()).await;
            }
        }
    }

    /// Subscribes `outbox` to `channel`: the hub first, then the engine, so
    /// nothing the engine hears once it listens misses the hub. Every
    /// subscriber waits for the engine, not only the node's first: a second
    /// one arriving while the first one's engine subscription is under way
    /// would otherwise read history before publications reach the hub.
    ///
    /// The [`Joining`] answered undoes the subscription when dropped, until
    /// [`Joining::keep`]: the rest of a subscribe (history, presence) can
    /// fail and return early without undoing anything by hand.
    pub async fn join<'a>(
        &'a self,
        channel: &'a ChannelName,
        outbox: &'a Arc<Outbox>,
    ) -> Result<Joining<'a>, BrokerError> {
        let first = self.hub.subscribe(channel, outbox);
        let joining = Joining {
            channels: self,
            channel,
            outbox,
            kept: false,
        };
        self.broker.subscribe(channel).await?;
        if first {
            // Awaited: what the subscriber does next on the channel (a
            // presence join) is reported after the channel's occupancy.
            self.report(channel).await;
        }
        Ok(joining)
    }

    /// Takes `outbox` off `channel`. When `present` names a presence entry,
    /// the engine is told it left; when the hub had no other subscriber on
    /// this node, the engine stops listening. The engine's part runs on its
    /// own task: it needs no answer.
    pub fn release(
        &self,
        channel: &ChannelName,
        outbox: &Arc<Outbox>,
        present: Option<(Arc<Member>, PresenceMode)>,
    ) {
        let last = self.hub.unsubscribe(channel.as_str(), outbox);
        if !last && present.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.broker.clone();
        let channel = channel.clone();
        let watch = (last
            && self
                .watch
                .as_ref()
                .is_some_and(|w| w.watches(channel.as_str())))
        .then(|| self.watch.clone())
        .flatten();
        runtime.spawn(async move {
            if let Some((member, mode)) = present {
                broker.leave(&channel, &member, mode).await;
            }
            if last {
                broker.unsubscribe(&channel).await;
            }
            if let Some(watch) = watch {
                watch.changed(channel).await;
            }
        });
    }
}

/// A subscription being set up. Dropped before [`Joining::keep`], it is
/// released: the one rollback path of a subscribe.
#[must_use = "dropping a Joining undoes the subscription"]
pub struct Joining<'a> {
    channels: &'a Channels,
    channel: &'a ChannelName,
    outbox: &'a Arc<Outbox>,
    kept: bool,
}

impl Joining<'_> {
    /// The subscription is complete: the session owns it from now on.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.channels.release(self.channel, self.outbox, None);
        }
    }
}

/// The `channels` rules: what a channel does about presence, by the longest
/// prefix of its name that has a rule.
#[derive(Debug, Clone, Default)]
pub struct ChannelRules(Vec<ChannelRule>);

impl ChannelRules {
    pub fn new(rules: &[ChannelRule]) -> ChannelRules {
        ChannelRules(rules.to_vec())
    }

    /// The rule for `channel`: the one with the longest prefix of its name.
    fn rule(&self, channel: &str) -> Option<&ChannelRule> {
        self.0
            .iter()
            .filter(|rule| channel.starts_with(rule.prefix.as_str()))
            .max_by_key(|rule| rule.prefix.len())
    }

    /// What `channel` does about presence.
    pub fn presence(&self, channel: &str) -> PresenceMode {
        self.rule(channel)
            .map_or_else(Default::default, |rule| PresenceMode {
                listed: rule.presence,
                announced: rule.join_leave,
            })
    }

    /// Whether, and how, clients may publish on `channel`, and whether
    /// their publications there are ephemeral.
    pub fn publish(&self, channel: &str) -> (ClientPublish, bool) {
        self.rule(channel)
            .map_or((ClientPublish::Off, false), |rule| {
                (rule.publish, rule.ephemeral)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::{MemoryBroker, MemoryOptions};
    use crate::hub::QueueLimits;
    use std::time::Duration;

    fn channels() -> Channels {
        let hub = Arc::new(Hub::new());
        let broker = MemoryBroker::new(
            hub.clone(),
            MemoryOptions {
                history_size: 10,
                history_ttl: Duration::from_secs(60),
                idempotency_window: Duration::from_secs(60),
            },
        );
        Channels::new(hub, broker, ChannelRules::default())
    }

    fn outbox() -> Arc<Outbox> {
        Outbox::new(QueueLimits {
            messages: 10,
            bytes: 1 << 20,
            take: usize::MAX,
        })
    }

    /// The invariant in every order of joins, keeps, drops and releases:
    /// the hub holds exactly the subscriptions kept and not released.
    #[tokio::test]
    async fn only_kept_subscriptions_stay_and_each_leaves_once() {
        let channels = channels();
        let channel = ChannelName::parse("room:1").unwrap();
        let (a, b) = (outbox(), outbox());

        // A setup that fails part-way (the Joining is dropped) leaves nothing.
        drop(channels.join(&channel, &a).await.unwrap());
        assert_eq!(channels.hub.subscribers("room:1"), 0);

        channels.join(&channel, &a).await.unwrap().keep();
        drop(channels.join(&channel, &b).await.unwrap());
        assert_eq!(channels.hub.subscribers("room:1"), 1, "only a's was kept");

        channels.join(&channel, &b).await.unwrap().keep();
        assert_eq!(channels.hub.subscribers("room:1"), 2);
        channels.release(&channel, &a, None);
        assert_eq!(channels.hub.subscribers("room:1"), 1);
        channels.release(&channel, &b, None);
        assert!(!channels.hub.has_subscribers("room:1"));
    }

    fn rule(prefix: &str, presence: bool, join_leave: bool) -> ChannelRule {
        ChannelRule {
            prefix: prefix.into(),
            presence,
            join_leave,
            publish: ClientPublish::Off,
            ephemeral: false,
        }
    }

    #[test]
    fn the_longest_matching_prefix_decides() {
        let rules = ChannelRules::new(&[
            rule("room:", true, false),
            rule("room:quiet:", false, false),
            rule("lobby", true, true),
        ]);
        let mode = |channel| rules.presence(channel);
        assert_eq!(
            mode("room:1"),
            PresenceMode {
                listed: true,
                announced: false
            }
        );
        assert_eq!(mode("room:quiet:1"), PresenceMode::default());
        assert_eq!(
            mode("lobby:x"),
            PresenceMode {
                listed: true,
                announced: true
            }
        );
        assert_eq!(mode("chat:1"), PresenceMode::default());
        assert_eq!(
            ChannelRules::default().presence("room:1"),
            PresenceMode::default()
        );
    }
}
