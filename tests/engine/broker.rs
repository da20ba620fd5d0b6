//! The engine conformance suite: every engine must pass every case here.
//! `broker_suite!` instantiates the cases for one engine: the memory engine,
//! and the Redis engine against a real redis-server per case.

use crate::common;

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::Redis;
use pushgate::broker::memory::{MemoryBroker, MemoryOptions};
use pushgate::broker::redis::{RedisBroker, RedisOptions};
use pushgate::broker::{Broker, Member, PresenceMode, Publish};
use pushgate::cursor::{Epoch, Position};
use pushgate::hub::{Drained, Hub, Outbox, QueueLimits};
use pushgate::message::{ChannelName, Publication};
use serde_json::value::RawValue;

/// Builds an engine over `hub` with these history options.
type Factory = fn(Arc<Hub>, MemoryOptions) -> Engine;

/// An engine, and the Redis behind it (stopped with it).
struct Engine {
    broker: Arc<dyn Broker>,
    _redis: Option<Redis>,
}

impl Deref for Engine {
    type Target = dyn Broker;

    fn deref(&self) -> &dyn Broker {
        &*self.broker
    }
}

const OPTIONS: MemoryOptions = MemoryOptions {
    history_size: 100,
    history_ttl: Duration::from_secs(600),
    idempotency_window: Duration::from_secs(300),
};

const ROOMY: QueueLimits = QueueLimits {
    messages: 100_000,
    bytes: 1 << 30,
    take: usize::MAX,
};

fn memory(hub: Arc<Hub>, options: MemoryOptions) -> Engine {
    Engine {
        broker: MemoryBroker::new(hub, options),
        _redis: None,
    }
}

fn redis(hub: Arc<Hub>, options: MemoryOptions) -> Engine {
    let redis = Redis::start();
    let broker = RedisBroker::new(hub, redis_options(&redis, options)).unwrap();
    Engine {
        broker,
        _redis: Some(redis),
    }
}

fn redis_options(redis: &Redis, options: MemoryOptions) -> RedisOptions {
    RedisOptions {
        url: redis.url(),
        cluster: false,
        tls_ca: None,
        prefix: "pushgate-test".into(),
        history_size: options.history_size,
        history_ttl: options.history_ttl,
        idempotency_window: options.idempotency_window,
        connect_timeout: Duration::from_secs(2),
        command_timeout: Duration::from_secs(2),
        wait_replicas: 0,
        wait_timeout: Duration::from_secs(1),
        presence_ttl: Duration::from_secs(30),
        node: "test-node".into(),
    }
}

fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).unwrap()
}

fn publish(name: &str, data: &str) -> Publish {
    Publish {
        channels: vec![channel(name)],
        data: RawValue::from_string(data.to_owned()).unwrap(),
        event: None,
        idempotency_key: None,
        publisher: None,
    }
}

async fn publish_n(broker: &dyn Broker, name: &str, n: u64) -> Vec<Position> {
    let mut positions = Vec::new();
    for i in 0..n {
        let outcome = broker.publish(publish(name, &i.to_string())).await.unwrap();
        positions.push(outcome.results[0].position());
    }
    positions
}

fn offsets(publications: &[Arc<Publication>]) -> Vec<u64> {
    publications.iter().map(|p| p.offset()).collect()
}

/// Waits, up to a bound, until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn numbering_and_order_under_concurrent_publishers(make: Factory) {
    let hub = Arc::new(Hub::new());
    let broker = make(
        hub.clone(),
        MemoryOptions {
            history_size: 10_000,
            ..OPTIONS
        },
    );
    let chat = channel("chat");
    let listener = Outbox::new(ROOMY);
    hub.subscribe(&chat, &listener);
    broker.subscribe(&chat).await.unwrap();

    const TASKS: u64 = 8;
    const EACH: u64 = 250;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let broker = broker.broker.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                for i in 0..EACH {
                    let outcome = broker
                        .publish(publish("chat", &format!("[{t},{i}]")))
                        .await
                        .unwrap();
                    mine.push(outcome.results[0].offset);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "one publisher's offsets grow"
        );
        all.extend(mine);
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=TASKS * EACH).collect::<Vec<_>>(),
        "each offset once, no gaps"
    );

    // Delivery may trail the answers (Redis pub/sub): wait for all of it.
    let mut delivered = Vec::new();
    eventually("every publication is delivered", || {
        assert_eq!(listener.drain_into(&mut delivered), Drained::Open);
        delivered.len() >= (TASKS * EACH) as usize
    })
    .await;
    assert_eq!(offsets(&delivered), (1..=TASKS * EACH).collect::<Vec<_>>());
    let history = broker.history(&chat, None, 100_000).await.unwrap();
    assert_eq!(offsets(&history.publications), offsets(&delivered));
    for (a, b) in history.publications.iter().zip(&delivered) {
        assert_eq!(a.envelope(), b.envelope());
    }
}

async fn history_keeps_the_last_size_publications(make: Factory) {
    let broker = make(
        Arc::new(Hub::new()),
        MemoryOptions {
            history_size: 10,
            ..OPTIONS
        },
    );
    let positions = publish_n(&*broker, "h", 25).await;
    let epoch = positions[0].epoch;
    let c = channel("h");

    let latest = broker.history(&c, None, 100).await.unwrap();
    assert_eq!(offsets(&latest.publications), (16..=25).collect::<Vec<_>>());
    assert_eq!(latest.position, Position::new(epoch, 25));
    let three = broker.history(&c, None, 3).await.unwrap();
    assert_eq!(offsets(&three.publications), vec![23, 24, 25]);

    // Exact replay from inside history.
    let inside = broker
        .history(&c, Some(Position::new(epoch, 15)), 100)
        .await
        .unwrap();
    assert!(inside.recovered);
    assert_eq!(offsets(&inside.publications), (16..=25).collect::<Vec<_>>());
    let limited = broker
        .history(&c, Some(Position::new(epoch, 17)), 2)
        .await
        .unwrap();
    assert_eq!(offsets(&limited.publications), vec![18, 19]);

    // Up to date: nothing to replay, recovered.
    let current = broker
        .history(&c, Some(Position::new(epoch, 25)), 100)
        .await
        .unwrap();
    assert!(current.recovered && current.publications.is_empty());

    // Outside history: an explicit reset, never a partial replay.
    let outside = broker
        .history(&c, Some(Position::new(epoch, 14)), 100)
        .await
        .unwrap();
    assert!(!outside.recovered);
    assert!(outside.publications.is_empty());
    assert_eq!(outside.position, Position::new(epoch, 25));
}

async fn positions_ahead_of_the_stream_or_in_another_epoch_reset(make: Factory) {
    let broker = make(Arc::new(Hub::new()), OPTIONS);
    let positions = publish_n(&*broker, "a", 5).await;
    let epoch = positions[0].epoch;
    let c = channel("a");

    let other = Epoch::parse("elsewhere").unwrap();
    assert_ne!(other, epoch);
    let foreign = broker
        .history(&c, Some(Position::new(other, 3)), 100)
        .await
        .unwrap();
    assert!(!foreign.recovered, "another epoch: history was lost");
    assert_eq!(foreign.position, Position::new(epoch, 5));

    // Offset 0 is valid in any epoch: everything from the start.
    let start = broker
        .history(&c, Some(Position::new(other, 0)), 100)
        .await
        .unwrap();
    assert!(start.recovered);
    assert_eq!(offsets(&start.publications), vec![1, 2, 3, 4, 5]);

    // A reader ahead of the stream saw offsets the store lost: the epoch
    // moves, so those offsets are never handed out again in its epoch.
    let ahead = broker
        .history(&c, Some(Position::new(epoch, 9)), 100)
        .await
        .unwrap();
    assert!(
        !ahead.recovered,
        "a position ahead of the stream means lost data"
    );
    assert_eq!(
        ahead.position.offset, 5,
        "offsets go on from the stream's end"
    );
    assert_ne!(ahead.position.epoch, epoch, "a new epoch");
    let next = broker.publish(publish("a", "6")).await.unwrap().results[0].position();
    assert_eq!(next, Position::new(ahead.position.epoch, 6));
    let stale = broker
        .history(&c, Some(Position::new(epoch, 5)), 100)
        .await
        .unwrap();
    assert!(!stale.recovered, "the old epoch is gone");
    let caught_up = broker.history(&c, Some(ahead.position), 100).await.unwrap();
    assert!(caught_up.recovered, "the reset position follows on");
    assert_eq!(offsets(&caught_up.publications), vec![6]);

    // Forged positions cannot keep moving the epoch (resetting everyone).
    let forged = broker
        .history(&c, Some(Position::new(next.epoch, 1_000)), 100)
        .await
        .unwrap();
    assert!(!forged.recovered);
    assert_eq!(forged.position, next, "at most one move per interval");
}

async fn history_older_than_the_ttl_is_never_replayed(make: Factory) {
    let ttl = Duration::from_millis(300);
    let broker = make(
        Arc::new(Hub::new()),
        MemoryOptions {
            history_ttl: ttl,
            ..OPTIONS
        },
    );
    let positions = publish_n(&*broker, "t", 3).await;
    let epoch = positions[0].epoch;
    let c = channel("t");
    let fresh = broker
        .history(&c, Some(Position::new(epoch, 1)), 100)
        .await
        .unwrap();
    assert_eq!(offsets(&fresh.publications), vec![2, 3]);

    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let expired = broker.history(&c, None, 100).await.unwrap();
    assert!(
        expired.publications.is_empty(),
        "nothing older than the ttl"
    );
    let behind = broker
        .history(&c, Some(Position::new(epoch, 1)), 100)
        .await
        .unwrap();
    assert!(!behind.recovered, "the gap is older than history: reset");
    assert!(behind.publications.is_empty());
}

async fn a_freed_channel_comes_back_in_a_new_epoch(make: Factory) {
    let ttl = Duration::from_millis(100);
    let broker = make(
        Arc::new(Hub::new()),
        MemoryOptions {
            history_ttl: ttl,
            ..OPTIONS
        },
    );
    let first = publish_n(&*broker, "f", 3).await;
    let c = channel("f");
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.position(&c).await.unwrap().offset != 0 {
        assert!(Instant::now() < deadline, "the channel was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = publish_n(&*broker, "f", 2).await;
    assert_ne!(
        first[0].epoch, second[0].epoch,
        "a new incarnation, a new epoch"
    );
    assert_eq!(second[0].offset, 1);
    let old = broker.history(&c, Some(first[2]), 100).await.unwrap();
    assert!(!old.recovered, "a position from the old epoch resets");
    assert_eq!(old.position, second[1]);
    let zero = broker
        .history(&c, Some(Position::new(first[0].epoch, 0)), 100)
        .await
        .unwrap();
    assert!(zero.recovered, "offset 0 stays valid across incarnations");
    assert_eq!(offsets(&zero.publications), vec![1, 2]);
}

/// A channel with subscribers on this node keeps its epoch however long it
/// stays quiet: its subscribers are never reset for nothing.
async fn a_subscribed_channel_keeps_its_epoch_while_idle(make: Factory) {
    let ttl = Duration::from_millis(300);
    let hub = Arc::new(Hub::new());
    let broker = make(
        hub.clone(),
        MemoryOptions {
            history_ttl: ttl,
            ..OPTIONS
        },
    );
    let c = channel("idle");
    let outbox = Outbox::new(ROOMY);
    hub.subscribe(&c, &outbox);
    broker.subscribe(&c).await.unwrap();
    let start = broker.history(&c, None, 0).await.unwrap().position;
    let first = publish_n(&*broker, "idle", 1).await;
    tokio::time::sleep(ttl * 4).await;
    let later = publish_n(&*broker, "idle", 1).await;
    assert_eq!(
        later[0],
        Position::new(first[0].epoch, 2),
        "same epoch, next offset"
    );
    assert_eq!(start.offset, 0);
    let mut got = Vec::new();
    eventually("both publications arrive", || {
        outbox.drain_into(&mut got);
        got.len() == 2
    })
    .await;
    assert_eq!(offsets(&got), vec![1, 2]);
}

async fn an_idempotency_key_publishes_once_within_the_window(make: Factory) {
    let window = Duration::from_millis(300);
    let broker = make(
        Arc::new(Hub::new()),
        MemoryOptions {
            idempotency_window: window,
            ..OPTIONS
        },
    );
    let keyed = || Publish {
        idempotency_key: Some("order-7".into()),
        publisher: None,
        channels: vec![channel("i"), channel("j")],
        ..publish("i", "{\"n\":7}")
    };
    let first = broker.publish(keyed()).await.unwrap();
    assert!(!first.duplicate);
    let again = broker.publish(keyed()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.results, first.results);
    let history = broker.history(&channel("i"), None, 100).await.unwrap();
    assert_eq!(history.publications.len(), 1, "published once");

    tokio::time::sleep(window + Duration::from_millis(200)).await;
    let later = broker.publish(keyed()).await.unwrap();
    assert!(!later.duplicate, "the window has passed");
    assert_eq!(later.results[0].offset, 2);
}

async fn a_lagging_subscriber_is_cut_off_and_the_others_get_everything(make: Factory) {
    let hub = Arc::new(Hub::new());
    let broker = make(hub.clone(), OPTIONS);
    let c = channel("lag");
    let slow = Outbox::new(QueueLimits {
        messages: 10,
        bytes: 1 << 20,
        take: usize::MAX,
    });
    let fast: Vec<_> = (0..3).map(|_| Outbox::new(ROOMY)).collect();
    hub.subscribe(&c, &slow);
    for outbox in &fast {
        hub.subscribe(&c, outbox);
    }
    broker.subscribe(&c).await.unwrap();
    publish_n(&*broker, "lag", 100).await;

    for outbox in &fast {
        let mut got = Vec::new();
        eventually("a fast subscriber gets everything", || {
            assert_eq!(outbox.drain_into(&mut got), Drained::Open);
            got.len() >= 100
        })
        .await;
        assert_eq!(offsets(&got), (1..=100).collect::<Vec<_>>());
    }
    assert_eq!(slow.drain_into(&mut Vec::new()), Drained::Lagging);
    assert_eq!(hub.lagged_total(), 1);
}

async fn one_off_channels_leave_no_trace(make: Factory) {
    let hub = Arc::new(Hub::new());
    let broker = make(
        hub.clone(),
        MemoryOptions {
            history_ttl: Duration::from_millis(200),
            ..OPTIONS
        },
    );
    // Subscribed channels stay while subscribed, whatever their history.
    let kept = channel("once:0");
    let outbox = Outbox::new(ROOMY);
    hub.subscribe(&kept, &outbox);
    broker.subscribe(&kept).await.unwrap();
    for i in 0..100_000 {
        broker
            .publish(publish(&format!("once:{i}"), "1"))
            .await
            .unwrap();
    }
    eventually("one-off channels are freed", || {
        let stats = broker.stats();
        stats.channels == 1 && stats.history_publications == 0
    })
    .await;
    hub.unsubscribe(kept.as_str(), &outbox);
    broker.unsubscribe(&kept).await;
    eventually("the last channel is freed", || broker.stats().channels == 0).await;
}

async fn position_of_a_new_channel_is_offset_zero(make: Factory) {
    let broker = make(Arc::new(Hub::new()), OPTIONS);
    let c = channel("fresh");
    let start = broker.position(&c).await.unwrap();
    assert_eq!(start.offset, 0);
    assert_eq!(broker.stats().channels, 0, "reading creates no channel");
    let published = publish_n(&*broker, "fresh", 2).await;
    let now = broker.position(&c).await.unwrap();
    assert_eq!(
        now,
        Position::new(published[0].epoch, 2),
        "same epoch while the channel lives"
    );
    // A reader that started at offset 0, in whatever epoch, gets everything.
    let replay = broker.history(&c, Some(start), 100).await.unwrap();
    assert!(replay.recovered);
    assert_eq!(offsets(&replay.publications), vec![1, 2]);
}

fn member(user: Option<&str>, connection: usize) -> Member {
    Member {
        user: user.map(str::to_owned),
        connection: format!("test-node-{connection}"),
        node: "test-node".into(),
        info: None,
    }
}

/// The invariant `Broker::join` and `Broker::leave` keep: of a user's
/// connections on a channel, however they race, exactly one is told it is
/// the first (while none was there) and exactly one that it is the last
/// (when none is left). Connections without a user, and unlisted ones,
/// are never first or last.
async fn a_users_first_and_last_connection_are_told_once_however_they_race(make: Factory) {
    let broker = make(Arc::new(Hub::new()), OPTIONS);
    let c = channel("presence-room");
    let listed = PresenceMode {
        listed: true,
        announced: true,
    };
    for round in 0..5 {
        let members: Vec<Member> = (0..8).map(|i| member(Some("ada"), round * 8 + i)).collect();
        let firsts =
            futures_util::future::join_all(members.iter().map(|m| broker.join(&c, m, listed)))
                .await;
        let firsts = firsts
            .into_iter()
            .map(Result::unwrap)
            .filter(|first| *first)
            .count();
        assert_eq!(firsts, 1, "round {round}: first joins");
        // Another user's comings and goings do not count for ada.
        assert!(broker
            .join(&c, &member(Some("bob"), 1000), listed)
            .await
            .unwrap());
        assert!(broker.leave(&c, &member(Some("bob"), 1000), listed).await);
        let lasts =
            futures_util::future::join_all(members.iter().map(|m| broker.leave(&c, m, listed)))
                .await;
        assert_eq!(
            lasts.iter().filter(|last| **last).count(),
            1,
            "round {round}: last leaves"
        );
        // Leaving again (a connection already gone) is nobody's last.
        assert!(!broker.leave(&c, &members[0], listed).await);
    }
    let anonymous = member(None, 2000);
    assert!(!broker.join(&c, &anonymous, listed).await.unwrap());
    assert!(!broker.leave(&c, &anonymous, listed).await);
    let unlisted = PresenceMode {
        listed: false,
        announced: true,
    };
    assert!(!broker
        .join(&c, &member(Some("cy"), 3000), unlisted)
        .await
        .unwrap());
    assert!(!broker.leave(&c, &member(Some("cy"), 3000), unlisted).await);
}

/// `Broker::occupancy` answers each change of a channel's occupancy once,
/// however many ask at once, and `None` when nothing changed.
async fn occupancy_changes_are_answered_once(make: Factory) {
    let hub = Arc::new(Hub::new());
    let broker = make(hub.clone(), OPTIONS);
    let c = channel("pusher/1/room");
    let ask_all = || futures_util::future::join_all((0..6).map(|_| broker.occupancy(&c)));
    assert!(ask_all()
        .await
        .into_iter()
        .all(|answer| answer.unwrap().is_none()));
    for _ in 0..3 {
        let outbox = Outbox::new(ROOMY);
        hub.subscribe(&c, &outbox);
        broker.subscribe(&c).await.unwrap();
        let answers: Vec<_> = ask_all().await.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            answers.iter().filter(|a| **a == Some(true)).count(),
            1,
            "{answers:?}"
        );
        assert!(answers.iter().all(|a| *a != Some(false)), "{answers:?}");
        hub.unsubscribe(c.as_str(), &outbox);
        broker.unsubscribe(&c).await;
        let answers: Vec<_> = ask_all().await.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            answers.iter().filter(|a| **a == Some(false)).count(),
            1,
            "{answers:?}"
        );
        assert!(answers.iter().all(|a| *a != Some(true)), "{answers:?}");
    }
}

/// `Broker::heard` lists the channels some node hears, by prefix, and
/// `Broker::hearing` counts the nodes; both follow subscribes and
/// unsubscribes.
async fn the_engine_knows_which_channels_are_heard(make: Factory) {
    let hub = Arc::new(Hub::new());
    let broker = make(hub.clone(), OPTIONS);
    let names = ["pusher/1/a", "pusher/1/b", "pusher/10/c", "other"];
    let outbox = Outbox::new(ROOMY);
    for name in names {
        hub.subscribe(&channel(name), &outbox);
        broker.subscribe(&channel(name)).await.unwrap();
    }
    let heard = broker.heard("pusher/1/").await.unwrap();
    assert_eq!(heard, [channel("pusher/1/a"), channel("pusher/1/b")]);
    assert_eq!(broker.hearing(&channel("pusher/1/a")).await.unwrap(), 1);
    assert_eq!(broker.hearing(&channel("nobody")).await.unwrap(), 0);
    hub.unsubscribe("pusher/1/a", &outbox);
    broker.unsubscribe(&channel("pusher/1/a")).await;
    assert_eq!(
        broker.heard("pusher/1/").await.unwrap(),
        [channel("pusher/1/b")]
    );
    assert_eq!(broker.hearing(&channel("pusher/1/a")).await.unwrap(), 0);
    assert_eq!(broker.heard("").await.unwrap().len(), 3);
}

macro_rules! broker_suite {
    ($engine:ident, $factory:expr) => {
        mod $engine {
            use super::*;

            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name($factory).await
                    }
                };
            }

            case!(numbering_and_order_under_concurrent_publishers);
            case!(history_keeps_the_last_size_publications);
            case!(positions_ahead_of_the_stream_or_in_another_epoch_reset);
            case!(history_older_than_the_ttl_is_never_replayed);
            case!(a_freed_channel_comes_back_in_a_new_epoch);
            case!(an_idempotency_key_publishes_once_within_the_window);
            case!(a_lagging_subscriber_is_cut_off_and_the_others_get_everything);
            case!(a_subscribed_channel_keeps_its_epoch_while_idle);
            case!(position_of_a_new_channel_is_offset_zero);
            case!(a_users_first_and_last_connection_are_told_once_however_they_race);
            case!(occupancy_changes_are_answered_once);
            case!(the_engine_knows_which_channels_are_heard);
        }
    };
}

broker_suite!(memory_engine, memory);
broker_suite!(redis_engine, redis);

/// The memory engine frees what it no longer needs; Redis expires it (see
/// `redis_keys_expire_with_history`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_one_off_channels_leave_no_trace() {
    one_off_channels_leave_no_trace(memory).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_expire_with_history() {
    let redis = Redis::start();
    let hub = Arc::new(Hub::new());
    // Long enough that all 200 publications' keys are still there when
    // counted, on a machine busy with other tests too.
    let ttl = Duration::from_secs(2);
    let options = MemoryOptions {
        history_ttl: ttl,
        idempotency_window: ttl,
        ..OPTIONS
    };
    let broker = RedisBroker::new(hub, redis_options(&redis, options)).unwrap();
    let started = Instant::now();
    for i in 0..200 {
        let mut keyed = publish(&format!("once:{i}"), "1");
        keyed.idempotency_key = Some(format!("k{i}"));
        broker.publish(keyed).await.unwrap();
    }
    let keys = redis.count_keys("pushgate-test:*");
    // Should the publications have taken longer than the ttl, the first
    // keys may be gone already: the count proves nothing then.
    if started.elapsed() < ttl {
        assert!(keys >= 600, "{keys} keys for 200 publications");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.count_keys("pushgate-test:*") > 0 {
        assert!(Instant::now() < deadline, "keys outlived their ttl");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a publication puts on pub/sub and in its stream entry is the wire
/// format nodes of every version read (`pushgate::broker::redis::encode`),
/// with nothing ahead of it or beside it: a node not yet upgraded drops
/// anything else as malformed, and its subscribers would miss it silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publishes_exactly_the_wire_format_every_version_reads() {
    use futures_util::StreamExt;

    let redis = Redis::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("pushgate-test:{wire:1}").await.unwrap();
    let broker = RedisBroker::new(Arc::new(Hub::new()), redis_options(&redis, OPTIONS)).unwrap();
    let mut sent = publish("wire:1", "{\"a\":[1,2]}");
    sent.event = Some(pushgate::message::EventName::parse("msg").unwrap());
    broker.publish(sent).await.unwrap();

    let message = tokio::time::timeout(Duration::from_secs(10), pubsub.on_message().next())
        .await
        .expect("the publication reaches pub/sub")
        .expect("pub/sub open");
    let payload = message.get_payload_bytes().to_vec();
    let history = broker.history(&channel("wire:1"), None, 10).await.unwrap();
    let [publication] = &history.publications[..] else {
        panic!("one publication: {:?}", history.publications.len());
    };
    let wire = pushgate::broker::redis::encode(publication);
    assert_eq!(String::from_utf8(payload).unwrap(), wire);
    assert!(wire.starts_with(&format!("1\nwire:1\n{}\n1\n", publication.position().epoch)));
    assert!(wire.ends_with("\nmsg\n{\"a\":[1,2]}"));

    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("pushgate-test:{wire:1}:h")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let [(_, fields)] = &entries[..] else {
        panic!("one stream entry: {entries:?}");
    };
    assert_eq!(fields, &[("p".to_owned(), wire)]);

    // The history script's digest of a payload is the one a node makes
    // (pinned in `wire`'s unit tests for this sample).
    let sample = "1\nchat:1\nabc\n42\n1700000000123\nmsg\n{\"a\":1}";
    let digest: String = redis::cmd("EVAL")
        .arg("return redis.sha1hex(ARGV[1])")
        .arg(0)
        .arg(sample)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(digest, "aa60737816e3a5db51480ff005f6813fd05a6aeb");
}

/// Two nodes on one Redis: a channel is occupied while either hears it,
/// and each change is answered to exactly one of them, however they race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_occupancy_spans_nodes_and_each_change_is_answered_once() {
    let redis = Redis::start();
    let node = |name: &str| {
        let hub = Arc::new(Hub::new());
        let mut options = redis_options(&redis, OPTIONS);
        options.node = name.into();
        let broker: Arc<dyn Broker> = RedisBroker::new(hub.clone(), options).unwrap();
        (hub, broker)
    };
    let (hub_a, a) = node("a");
    let (hub_b, b) = node("b");
    let c = channel("pusher/1/shared");
    let (outbox_a, outbox_b) = (Outbox::new(ROOMY), Outbox::new(ROOMY));
    let hear = |hub: &Arc<Hub>, broker: &Arc<dyn Broker>, outbox: &Arc<Outbox>| {
        let (hub, broker, outbox, c) = (hub.clone(), broker.clone(), outbox.clone(), c.clone());
        async move {
            hub.subscribe(&c, &outbox);
            broker.subscribe(&c).await.unwrap();
            broker.occupancy(&c).await.unwrap()
        }
    };
    let leave = |hub: &Arc<Hub>, broker: &Arc<dyn Broker>, outbox: &Arc<Outbox>| {
        let (hub, broker, outbox, c) = (hub.clone(), broker.clone(), outbox.clone(), c.clone());
        async move {
            hub.unsubscribe(c.as_str(), &outbox);
            broker.unsubscribe(&c).await;
            broker.occupancy(&c).await.unwrap()
        }
    };
    // One after the other: the first to hear and the last to leave tell.
    assert_eq!(hear(&hub_a, &a, &outbox_a).await, Some(true));
    // Heard on a, so listed by b too.
    assert_eq!(
        b.heard("pusher/1/").await.unwrap(),
        std::slice::from_ref(&c)
    );
    assert_eq!(b.hearing(&c).await.unwrap(), 1);
    assert_eq!(hear(&hub_b, &b, &outbox_b).await, None);
    assert_eq!(a.hearing(&c).await.unwrap(), 2);
    assert_eq!(leave(&hub_a, &a, &outbox_a).await, None);
    assert_eq!(leave(&hub_b, &b, &outbox_b).await, Some(false));
    // At once, again and again: exactly one each way.
    for round in 0..10 {
        let (x, y) = tokio::join!(hear(&hub_a, &a, &outbox_a), hear(&hub_b, &b, &outbox_b));
        assert_eq!(
            [x, y].iter().filter(|o| **o == Some(true)).count(),
            1,
            "round {round}: {x:?} {y:?}"
        );
        let (x, y) = tokio::join!(leave(&hub_a, &a, &outbox_a), leave(&hub_b, &b, &outbox_b));
        assert_eq!(
            [x, y].iter().filter(|o| **o == Some(false)).count(),
            1,
            "round {round}: {x:?} {y:?}"
        );
    }
}
