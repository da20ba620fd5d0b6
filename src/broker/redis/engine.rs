//! The Redis engine's `Broker` methods: what the node asks of it.

use super::*;

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
            // On a cluster the claim lives in the slot of the publish's
            // least channel, so a master that is away fails only publishes
            // to its own channels; a key reused for a publish to other
            // channels is then caught per channel, by the publish script.
            let claim_key = match (&shared.conn, publish.channels.iter().min()) {
                (Connector::Cluster(_), Some(least)) => shared.keys.claim_in(least.as_str(), key),
                _ => shared.keys.claim(key),
            };
            let claim = redis::cmd("SET")
                .arg(&claim_key)
                .arg(&fingerprint)
                .arg("NX")
                .arg("GET")
                .arg("PX")
                .arg(millis(shared.options.idempotency_window))
                .to_owned();
            let claim = &claim;
            let first: Option<String> = shared
                .run(Route::Key(&claim_key), false, |mut conn| async move {
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
        // Done when Redis no longer counts this node among the channel's
        // listeners: an occupancy check after it sees the node gone.
        let (done, finished) = tokio::sync::oneshot::channel();
        if self
            .listener
            .send(Command::Unsubscribe(channel.clone(), done))
            .is_ok()
        {
            let _ = finished.await;
        }
    }

    async fn join(
        &self,
        channel: &ChannelName,
        member: &Member,
        mode: PresenceMode,
    ) -> Result<bool, BrokerError> {
        let shared = &self.shared;
        let json = serde_json::to_string(member).expect("a member serializes");
        let event = if mode.announced {
            format!("{WIRE_PRESENCE}{}", member.event_json(channel, true))
        } else {
            String::new()
        };
        let first = shared
            .list(
                channel.as_str(),
                &member.connection,
                &json,
                mode.listed,
                &event,
                member.user.as_deref(),
            )
            .await?;
        if mode.listed {
            shared
                .listed
                .lock()
                .expect("listed lock")
                .insert((channel.clone(), member.connection.clone()), json);
        }
        Ok(first)
    }

    async fn leave(&self, channel: &ChannelName, member: &Member, mode: PresenceMode) -> bool {
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
            .arg(shared.publish_command)
            .arg(member.user.as_deref().unwrap_or(""));
        let invocation = &invocation;
        let left = shared
            .run(
                Route::Key(&shared.keys.presence(channel.as_str())),
                false,
                |mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await },
            )
            .await;
        match left {
            Ok(last) => last == 2,
            Err(err) => {
                // The entry expires with presence_ttl, unrefreshed.
                tracing::debug!(error = %err, %channel, "engine: could not remove a presence entry");
                false
            }
        }
    }

    async fn heard(&self, prefix: &str) -> Result<Vec<ChannelName>, BrokerError> {
        // A node subscribes to a channel's pub/sub channel exactly while it
        // has subscribers of its own: Redis's list of pub/sub channels is
        // the list of channels heard somewhere.
        let shared = &self.shared;
        let pattern = shared.keys.pubsub_pattern(prefix);
        let names: Vec<String> = match &shared.conn {
            Connector::Single(_) => {
                let pattern = &pattern;
                shared
                    .run(Route::Any, false, |mut conn| async move {
                        redis::cmd("PUBSUB")
                            .arg("CHANNELS")
                            .arg(pattern)
                            .query_async(&mut conn)
                            .await
                    })
                    .await?
            }
            // Sharded pub/sub channels live on their slot's master: ask
            // each.
            Connector::Cluster(router) => {
                let mut names = Vec::new();
                for (addr, _) in router.map().masters() {
                    let mut conn = router.node(&addr).map_err(|err| {
                        BrokerError::Unavailable(format!("Redis master {addr}: {err}"))
                    })?;
                    let asked = tokio::time::timeout(
                        shared.options.command_timeout,
                        redis::cmd("PUBSUB")
                            .arg("SHARDCHANNELS")
                            .arg(&pattern)
                            .query_async::<Vec<String>>(&mut conn),
                    )
                    .await;
                    match asked {
                        Ok(Ok(found)) => names.extend(found),
                        Ok(Err(err)) => {
                            return Err(BrokerError::Unavailable(format!(
                                "Redis master {addr}: {err}"
                            )))
                        }
                        Err(_) => {
                            return Err(BrokerError::Unavailable(format!(
                                "Redis master {addr} did not answer in time"
                            )))
                        }
                    }
                }
                names
            }
        };
        let mut heard: Vec<ChannelName> = names
            .iter()
            .filter_map(|name| shared.keys.channel_of(name))
            .filter_map(|channel| ChannelName::parse(channel).ok())
            .collect();
        heard.sort_unstable();
        heard.dedup();
        Ok(heard)
    }

    async fn hearing(&self, channel: &ChannelName) -> Result<usize, BrokerError> {
        let shared = &self.shared;
        let pubsub = shared.keys.pubsub(channel.as_str());
        let count = if shared.options.cluster {
            "SHARDNUMSUB"
        } else {
            "NUMSUB"
        };
        let pubsub = &pubsub;
        let answer: (String, usize) = shared
            .run(Route::Key(pubsub), false, |mut conn| async move {
                redis::cmd("PUBSUB")
                    .arg(count)
                    .arg(pubsub)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(answer.1)
    }

    async fn occupancy(&self, channel: &ChannelName) -> Result<Option<bool>, BrokerError> {
        let shared = &self.shared;
        let key = shared.keys.occupied(channel.as_str());
        let mut invocation = shared.occupancy_script.prepare_invoke();
        invocation
            .key(&key)
            .arg(shared.keys.pubsub(channel.as_str()))
            .arg(if shared.options.cluster {
                "SHARDNUMSUB"
            } else {
                "NUMSUB"
            });
        let invocation = &invocation;
        let changed: i64 = shared
            .run(Route::Key(&key), false, |mut conn| async move {
                invocation.invoke_async(&mut conn).await
            })
            .await?;
        Ok(match changed {
            1 => Some(true),
            0 => Some(false),
            _ => None,
        })
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<Member>, BrokerError> {
        let shared = &self.shared;
        let mut invocation = shared.presence_script.prepare_invoke();
        invocation.key(shared.keys.presence(channel.as_str()));
        let invocation = &invocation;
        let entries: Vec<String> = shared
            .run(
                Route::Key(&shared.keys.presence(channel.as_str())),
                false,
                |mut conn| async move { invocation.invoke_async(&mut conn).await },
            )
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
            .run(Route::Any, false, |mut conn| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn send_ephemeral(&self, publication: Arc<Publication>) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let event = publication.event().map_or("", EventName::as_str);
        let payload = format!(
            "{WIRE_EPHEMERAL}{event}\n{}",
            std::str::from_utf8(publication.envelope()).expect("an envelope is UTF-8")
        );
        let pubsub = shared.keys.pubsub(publication.channel().as_str());
        let (command, pubsub, payload) = (shared.publish_command, &pubsub, &payload);
        // Heard on this node too, through its own subscription, like a
        // publication.
        let _receivers: i64 = shared
            .run(Route::Key(pubsub), true, |mut conn| async move {
                redis::cmd(command)
                    .arg(pubsub)
                    .arg(payload)
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
            .run(Route::Key(key), false, |mut conn| async move {
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
        if let Connector::Cluster(router) = &self.shared.conn {
            return self.cluster_ready(router).await;
        }
        let pong: String = self
            .shared
            .run(Route::Any, false, |mut conn| async move {
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
                up: match &self.shared.conn {
                    Connector::Cluster(router) => {
                        !router.map().masters().is_empty() && router.down().is_empty()
                    }
                    Connector::Single(_) => stats.up.load(Ordering::Relaxed),
                },
                pubsub_up: stats.pubsub_up.load(Ordering::Relaxed),
                reconnects: load(&stats.reconnects),
                command_errors: load(&stats.command_errors),
                command_seconds: stats.command_seconds.clone(),
                messages: load(&stats.messages),
                malformed: load(&stats.malformed),
                resets: load(&stats.resets),
                not_replicated: load(&stats.not_replicated),
                shards: match &self.shared.conn {
                    Connector::Cluster(router) => {
                        let down = router.down();
                        router
                            .map()
                            .masters()
                            .into_iter()
                            .map(|(_, slots)| {
                                let up = !down.contains(&slots);
                                (slots, up)
                            })
                            .collect()
                    }
                    Connector::Single(_) => Vec::new(),
                },
                unsolicited_unsubscribes: load(&stats.unsolicited_unsubscribes),
            }),
        }
    }
}
