//! Chaos: clients on all three transports (WebSocket, SSE, long-poll) drop
//! and reconnect at random, sometimes to the other node, while numbered
//! streams are published; on the memory engine, and on Redis with two nodes
//! and Redis restarts (keeping its data, and once losing it). Publishes
//! answered 503 are retried with their idempotency key. At the end every
//! client's record is checked: every publish answered 200 was delivered
//! exactly once, in order, or skipped by an explicit reset, and a reset
//! came only where history could not cover the gap (history here is large
//! enough for everything, so only across the restart that lost data).
//!
//! The size fits CI; `PUSHGATE_SUITE_SIZE=full` runs more clients, more
//! messages, more restarts. Every random choice comes from a seed, printed
//! on failure and settable with `PUSHGATE_CHAOS_SEED`. Every wait is on a
//! condition with a deadline.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::chaos::{
    check_channel, publish_stream, seed, two_nodes, wait_until, Ledger, Node, Tally,
};
use common::realtime::{cursor_from_start, poll, start_position, Failure, Got, Sse, Ws};
use common::redis::Redis;
use common::{Pushgate, Upstream};
use http::StatusCode;
use pushgate::cursor::Position;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::watch;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
struct Size {
    /// Clients of each transport.
    clients_per_transport: usize,
    channels: usize,
    /// Publications per channel.
    messages: u64,
    /// Redis restarts that keep its data (the Redis runs).
    restarts: usize,
    /// Most items a client reads before it drops the connection.
    max_read: usize,
    /// The whole run fails past this.
    deadline: Duration,
}

fn size() -> Size {
    if std::env::var("PUSHGATE_SUITE_SIZE").as_deref() == Ok("full") {
        Size {
            clients_per_transport: 10,
            channels: 3,
            messages: 2000,
            restarts: 5,
            max_read: 120,
            deadline: Duration::from_secs(600),
        }
    } else {
        Size {
            clients_per_transport: 3,
            channels: 2,
            messages: 150,
            restarts: 2,
            max_read: 40,
            deadline: Duration::from_secs(120),
        }
    }
}

/// Where a client gives up waiting for more and drops the connection.
const IDLE: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    WebSocket,
    Sse,
    Poll,
}

/// What one client saw, per channel, in order.
#[derive(Debug, Default)]
struct Record {
    got: HashMap<String, Vec<Got>>,
    reconnects: usize,
    failures: usize,
}

/// State a client carries across its connections.
struct Client {
    index: usize,
    transport: Transport,
    channels: Vec<String>,
    rng: StdRng,
    positions: HashMap<String, Position>,
    /// The SSE last event id / the long-poll cursor.
    cursor: String,
    record: Record,
}

impl Client {
    fn new(index: usize, transport: Transport, channels: Vec<String>, seed: u64) -> Client {
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        Client {
            index,
            transport,
            cursor: cursor_from_start(&names),
            positions: channels
                .iter()
                .map(|c| (c.clone(), start_position()))
                .collect(),
            channels,
            rng: StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            record: Record::default(),
        }
    }

    fn take(&mut self, got: Got) {
        self.positions
            .insert(got.channel().to_owned(), got.position());
        self.record
            .got
            .entry(got.channel().to_owned())
            .or_default()
            .push(got);
    }

    fn done(&self, finals: &Option<HashMap<String, Position>>) -> bool {
        finals.as_ref().is_some_and(|finals| {
            self.channels
                .iter()
                .all(|c| self.positions.get(c) == finals.get(c))
        })
    }

    fn names(&self) -> Vec<&str> {
        self.channels.iter().map(String::as_str).collect()
    }

    /// Connects, reads a random number of items, drops; until done.
    async fn run(
        mut self,
        nodes: Vec<Node>,
        finals: watch::Receiver<Option<HashMap<String, Position>>>,
        deadline: Instant,
    ) -> Result<Record, String> {
        while !self.done(&finals.borrow()) {
            if Instant::now() > deadline {
                return Err(format!(
                    "client {} ({:?} on {:?}) never caught up: at {:?}, wanted {:?}",
                    self.index,
                    self.transport,
                    self.channels,
                    self.positions,
                    finals.borrow()
                ));
            }
            let node = nodes[self.rng.random_range(0..nodes.len())];
            let budget = self.rng.random_range(1..=size().max_read);
            self.record.reconnects += 1;
            let outcome = match self.transport {
                Transport::WebSocket => self.websocket(node, budget, &finals).await,
                Transport::Sse => self.sse(node, budget, &finals).await,
                Transport::Poll => self.long_polls(node, &finals).await,
            };
            if outcome.is_err() {
                // Refused (Redis away) or cut: come back a little later.
                self.record.failures += 1;
                let pause = self.rng.random_range(10..40);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        Ok(self.record)
    }

    async fn websocket(
        &mut self,
        node: Node,
        budget: usize,
        finals: &watch::Receiver<Option<HashMap<String, Position>>>,
    ) -> Result<(), Failure> {
        let mut ws = Ws::connect(node.public).await?;
        let mut early = Vec::new();
        for channel in self.channels.clone() {
            let since = self.positions[&channel];
            ws.subscribe(&channel, Some(since), &mut early).await?;
            for got in early.drain(..) {
                self.take(got);
            }
        }
        let mut read = 0;
        while read < budget && !self.done(&finals.borrow()) {
            match tokio::time::timeout(IDLE, ws.next()).await {
                Err(_) | Ok(Ok(None)) => break,
                Ok(Err(err)) => return Err(err),
                Ok(Ok(Some(got))) => {
                    self.take(got);
                    read += 1;
                }
            }
        }
        Ok(())
    }

    async fn sse(
        &mut self,
        node: Node,
        budget: usize,
        finals: &watch::Receiver<Option<HashMap<String, Position>>>,
    ) -> Result<(), Failure> {
        let cursor = self.cursor.clone();
        let mut sse = Sse::open(node.public, &self.names(), Some(&cursor)).await?;
        let mut read = 0;
        while read < budget && !self.done(&finals.borrow()) {
            match tokio::time::timeout(IDLE, sse.next()).await {
                Err(_) | Ok(Ok(None)) => break,
                Ok(Err(err)) => return Err(err),
                Ok(Ok(Some((got, id)))) => {
                    // As a browser does: the event, then its id.
                    if let Some(got) = got {
                        self.take(got);
                        read += 1;
                    }
                    if let Some(id) = id {
                        self.cursor = id;
                    }
                }
            }
        }
        Ok(())
    }

    /// A few polls in a row; now and then one is given up before its
    /// answer, as a client whose page navigates away would.
    async fn long_polls(
        &mut self,
        node: Node,
        finals: &watch::Receiver<Option<HashMap<String, Position>>>,
    ) -> Result<(), Failure> {
        let rounds = self.rng.random_range(1..=4);
        for _ in 0..rounds {
            if self.done(&finals.borrow()) {
                return Ok(());
            }
            let give_up = self
                .rng
                .random_bool(0.2)
                .then(|| Duration::from_millis(self.rng.random_range(1..50)));
            let cursor = self.cursor.clone();
            let names = self.names();
            let polled = poll(node.public, &names, Some(&cursor), 1);
            let polled = match give_up {
                Some(after) => match tokio::time::timeout(after, polled).await {
                    Ok(polled) => polled?,
                    Err(_) => return Ok(()),
                },
                None => polled.await?,
            };
            for got in polled.got {
                self.take(got);
            }
            self.cursor = polled.cursor;
        }
        Ok(())
    }
}

/// What the Redis side does during a run.
enum Outages<'a> {
    None,
    /// Restarts keeping the data, then (when `lose_data`) one that loses it.
    Redis {
        redis: &'a mut Option<Redis>,
        nodes: Vec<Node>,
        restarts: usize,
        lose_data: bool,
    },
}

/// Everything a run produced, for the checks.
struct Run {
    seed: u64,
    ledger: Ledger,
    records: Vec<(String, Record)>,
    /// Epochs that Redis lost (of publications answered before the restart
    /// that lost data).
    lost_epochs: HashMap<String, HashSet<String>>,
}

async fn chaos(nodes: Vec<Node>, mut outages: Outages<'_>) -> Run {
    let seed = seed();
    eprintln!("chaos seed {seed}: replay with PUSHGATE_CHAOS_SEED={seed}");
    let size = size();
    let deadline = Instant::now() + size.deadline;
    let mut rng = StdRng::seed_from_u64(seed);
    let channels: Vec<String> = (0..size.channels).map(|c| format!("chaos:{c}")).collect();
    // Heard by long-polls only: a node subscribes to it in the engine as
    // polls come and may drop it between them, the path where a poll is
    // most exposed to a race between its history read and live copies.
    let polled_only = "chaos:polled".to_owned();

    let (finals_tx, finals) = watch::channel(None::<HashMap<String, Position>>);
    let mut clients = Vec::new();
    let mut index = 0;
    for transport in [Transport::WebSocket, Transport::Sse, Transport::Poll] {
        // Twice as many long-pollers: each stays on a node only while it
        // polls.
        let count = match transport {
            Transport::Poll => 2 * size.clients_per_transport,
            _ => size.clients_per_transport,
        };
        for _ in 0..count {
            // One channel or two, the first chosen at random; long-polls
            // hear the polled-only channel too.
            let first = rng.random_range(0..channels.len());
            let mut heard = vec![channels[first].clone()];
            if channels.len() > 1 && rng.random_bool(0.5) {
                heard.push(channels[(first + 1) % channels.len()].clone());
            }
            if transport == Transport::Poll {
                heard.push(polled_only.clone());
            }
            let name = format!("client {index} ({transport:?} on {heard:?})");
            let client = Client::new(index, transport, heard, seed);
            clients.push((
                name,
                tokio::spawn(client.run(nodes.clone(), finals.clone(), deadline)),
            ));
            index += 1;
        }
    }

    // Where each outage falls, by seq (the same on every channel): after
    // 1/(n+1), 2/(n+1), ... of the run; the last mark is the end. Until
    // outage r has begun, publishers may run on to `holds[r]`, halfway to
    // the next mark, and no further: however slowly the outage comes (a
    // loaded machine), publishes are left to meet it, and they are still
    // flowing as Redis goes down.
    let rounds = match &outages {
        Outages::None => 0,
        Outages::Redis {
            restarts,
            lose_data,
            ..
        } => *restarts + usize::from(*lose_data),
    };
    let marks: Vec<u64> = (1..=rounds as u64)
        .map(|r| size.messages * r / (rounds as u64 + 1))
        .chain(std::iter::once(size.messages))
        .collect();
    let holds: Vec<u64> = marks.windows(2).map(|w| (w[0] + w[1]) / 2).collect();
    let (gate, gated) = watch::channel(holds.first().copied().unwrap_or(size.messages));
    let tally = Tally::default();
    let published: Vec<String> = channels
        .iter()
        .cloned()
        .chain(std::iter::once(polled_only))
        .collect();
    let publishers: Vec<_> = published
        .iter()
        .map(|channel| {
            tokio::spawn(publish_stream(
                channel.clone(),
                size.messages,
                nodes.clone(),
                StdRng::seed_from_u64(rng.random()),
                gated.clone(),
                tally.clone(),
                deadline,
            ))
        })
        .collect();

    if let Outages::Redis {
        redis,
        nodes,
        lose_data,
        ..
    } = &mut outages
    {
        for (round, mark) in marks.iter().take(rounds).enumerate() {
            let losing = *lose_data && round == rounds - 1;
            let mark = mark * published.len() as u64;
            wait_until(deadline, "the publishers to reach the next outage", || {
                tally.stored.load(Ordering::Relaxed) >= mark
            })
            .await;
            let mut server = redis.take().expect("the Redis server");
            let server = tokio::task::spawn_blocking(move || {
                server.kill();
                server
            })
            .await
            .unwrap();
            // Redis is down: the publishers may go on to the next hold, and
            // it stays down until one of them met it.
            let before = tally.refused.load(Ordering::Relaxed);
            gate.send_replace(holds.get(round + 1).copied().unwrap_or(size.messages));
            wait_until(deadline, "a publish to meet the outage", || {
                tally.refused.load(Ordering::Relaxed) > before
            })
            .await;
            let mut server = server;
            let server = tokio::task::spawn_blocking(move || {
                if losing {
                    server.restart_empty();
                } else {
                    server.restart();
                }
                server
            })
            .await
            .unwrap();
            **redis = Some(server);
            for node in nodes.iter() {
                let api = node.api;
                let ready_deadline = deadline.min(Instant::now() + common::PATIENCE * 2);
                loop {
                    if common::get(&format!("http://{api}/readyz")).await.0 == StatusCode::OK {
                        break;
                    }
                    assert!(
                        Instant::now() < ready_deadline,
                        "seed {seed}: node {api} never became ready after Redis came back"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    let mut ledger = Ledger::default();
    for (channel, publisher) in published.iter().zip(publishers) {
        let stream = publisher
            .await
            .unwrap_or_else(|err| panic!("seed {seed}: the publisher of {channel} failed: {err}"));
        ledger.stored.insert(channel.clone(), stream.stored);
        ledger.ambiguous.insert(channel.clone(), stream.ambiguous);
    }
    let lost_epochs = ledger.lost_epochs();
    finals_tx.send_replace(Some(
        ledger
            .stored
            .iter()
            .map(|(channel, stored)| (channel.clone(), *stored.last().unwrap()))
            .collect(),
    ));
    let mut records = Vec::new();
    for (name, client) in clients {
        match client.await {
            Ok(Ok(record)) => records.push((name, record)),
            Ok(Err(why)) => panic!("seed {seed}: {why}"),
            Err(err) => panic!("seed {seed}: {name} failed: {err}"),
        }
    }
    Run {
        seed,
        ledger,
        records,
        lost_epochs,
    }
}

/// Checks every record; `resets_allowed` is false when no data was lost.
fn check(run: &Run, resets_allowed: bool) {
    let mut resets = 0;
    for (name, record) in &run.records {
        for (channel, got) in &record.got {
            if let Err(why) = check_channel(
                &run.ledger,
                &run.lost_epochs[channel.as_str()],
                channel,
                got,
            ) {
                panic!(
                    "seed {}: {name} on {channel}: {why}\nwhat it got: {got:?}",
                    run.seed
                );
            }
            resets += got
                .iter()
                .filter(|g| matches!(g, Got::Reset { .. }))
                .count();
        }
    }
    if !resets_allowed {
        assert_eq!(
            resets, 0,
            "seed {}: resets although history covered everything",
            run.seed
        );
    }
    let reconnects: usize = run.records.iter().map(|(_, r)| r.reconnects).sum();
    eprintln!(
        "chaos seed {}: {} clients, {reconnects} connections, {resets} resets",
        run.seed,
        run.records.len()
    );
}

fn history_config() -> String {
    format!("history:\n  size: {}\n", size().messages * 2 + 100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_the_memory_engine_delivers_everything_exactly_once() {
    let app = Upstream::start().await;
    let gate = Pushgate::start(&app.url(), &history_config()).await;
    let nodes = vec![Node {
        public: gate.addr,
        api: gate.api_addr,
    }];
    let run = chaos(nodes, Outages::None).await;
    check(&run, false);
}

async fn redis_nodes(app: &Upstream, redis: &Redis) -> (Vec<Pushgate>, Vec<Node>) {
    let config = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    connect_timeout: 500ms\n    command_timeout: 1s\n{}",
        redis.url(),
        history_config()
    );
    two_nodes(app, &config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_two_redis_nodes_through_restarts_that_keep_data_delivers_everything_exactly_once()
{
    let redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let app = Upstream::start().await;
    let (_gates, nodes) = redis_nodes(&app, &redis).await;
    let mut redis = Some(redis);
    let run = chaos(
        nodes.clone(),
        Outages::Redis {
            redis: &mut redis,
            nodes,
            restarts: size().restarts,
            lose_data: false,
        },
    )
    .await;
    check(&run, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_two_redis_nodes_resets_only_across_a_restart_that_lost_data() {
    let redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let app = Upstream::start().await;
    let (_gates, nodes) = redis_nodes(&app, &redis).await;
    let mut redis = Some(redis);
    let run = chaos(
        nodes.clone(),
        Outages::Redis {
            redis: &mut redis,
            nodes,
            restarts: 1,
            lose_data: true,
        },
    )
    .await;
    check(&run, true);
    assert!(
        run.lost_epochs.values().any(|lost| !lost.is_empty()),
        "seed {}: the restart lost the streams, so they have a new epoch",
        run.seed
    );
}

/// The checks above can fail: a gap, a duplicate, a needless reset and an
/// unannounced epoch change are each caught; a reset out of a lost epoch
/// is not.
#[test]
fn the_checks_catch_gaps_duplicates_and_needless_resets() {
    let position =
        |epoch: &str, offset| Position::new(pushgate::cursor::Epoch::parse(epoch).unwrap(), offset);
    let message = |epoch: &str, offset, seq: u64| Got::Message {
        channel: "c".into(),
        epoch: epoch.into(),
        offset,
        data: json!({ "seq": seq }),
    };
    let reset = |epoch: &str, offset| Got::Reset {
        channel: "c".into(),
        epoch: epoch.into(),
        offset,
    };
    // Seqs 1-3 stored in epoch `old`, which was lost; 4-5 in `new`.
    let run = Run {
        seed: 0,
        ledger: Ledger {
            stored: HashMap::from([(
                "c".to_owned(),
                vec![
                    position("old", 1),
                    position("old", 2),
                    position("old", 3),
                    position("new", 1),
                    position("new", 2),
                ],
            )]),
            ambiguous: HashMap::from([("c".to_owned(), HashSet::new())]),
        },
        records: Vec::new(),
        lost_epochs: HashMap::from([("c".to_owned(), HashSet::from(["old".to_owned()]))]),
    };
    let whole = [
        message("old", 1, 1),
        message("old", 2, 2),
        reset("new", 0),
        message("new", 1, 4),
        message("new", 2, 5),
    ];
    assert_eq!(
        check_channel(&run.ledger, &run.lost_epochs["c"], "c", &whole),
        Ok(())
    );
    let wrong: [(&str, Vec<Got>); 5] = [
        ("a gap", vec![message("old", 1, 1), message("old", 3, 3)]),
        (
            "a duplicate",
            vec![message("old", 1, 1), message("old", 1, 1)],
        ),
        (
            "a needless reset",
            vec![message("old", 1, 1), reset("old", 2), message("old", 3, 3)],
        ),
        (
            "an unannounced epoch change",
            vec![message("old", 1, 1), message("new", 1, 4)],
        ),
        (
            "a seq neither delivered nor reset",
            vec![message("new", 1, 4)],
        ),
    ];
    for (what, got) in wrong {
        assert!(
            check_channel(&run.ledger, &run.lost_epochs["c"], "c", &got).is_err(),
            "{what} is caught"
        );
    }
}
