//! Redis Cluster faults under publish load: a master killed and restarted
//! (empty, and from its AOF), a master that hangs, a master killed and its
//! replica promoted, and slots of subscribed channels moved to another
//! master. Two pushgate nodes
//! publish numbered streams on channels spread over every master, and a
//! WebSocket and an SSE subscriber on each node hear every channel
//! throughout. Each run checks that publishes to channels of healthy
//! masters never fail, and that every subscriber got every publication
//! answered 200 exactly once, in order, or an explicit reset where the store
//! lost it.
//!
//! Every random choice comes from a seed, printed on failure and settable
//! with `PUSHGATE_CHAOS_SEED`. Every wait is on a condition with a deadline.

use crate::common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::chaos::{
    check_channel, publish_stream, seed, two_nodes, wait_until, wait_until_async, Ledger, Node,
    Tally,
};
use common::realtime::{cursor_from_start, start_position, Got, Sse, Ws};
use common::redis::RedisCluster;
use common::{Pushgate, Upstream};
use http::StatusCode;
use pushgate::cursor::Position;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

/// Publications per channel.
const MESSAGES: u64 = 240;
/// Channels on each master.
const PER_MASTER: usize = 2;
/// The whole run fails past this.
const DEADLINE: Duration = Duration::from_secs(90);

/// What happens to the cluster mid-run.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The master of the first channels is killed, then started again with
    /// nothing (`empty`) or with its AOF.
    Restart { empty: bool },
    /// The master of the first channels is killed; its replica takes over.
    FailOver,
    /// The slot of the first channel moves to the next master.
    Reshard,
    /// The master of the first channels hangs (SIGSTOP: its connections
    /// stay open, nothing answers), then goes on.
    Hang,
}

async fn nodes(app: &Upstream, cluster: &RedisCluster) -> (Vec<Pushgate>, Vec<Node>) {
    let config = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    cluster: true\n    connect_timeout: 500ms\n    command_timeout: 1s\nhistory:\n  size: {}\n",
        cluster.url(),
        MESSAGES * 2
    );
    two_nodes(app, &config).await
}

/// Where the publishers stood as a fault began.
struct Before {
    refused: u64,
    stored_healthy: u64,
}

impl Before {
    fn now(faulty: &Tally, healthy: &Tally) -> Before {
        Before {
            refused: faulty.refused.load(Ordering::Relaxed),
            stored_healthy: healthy.stored.load(Ordering::Relaxed),
        }
    }

    /// Waits until the fault is felt as it must be: a publish to the faulty
    /// master's channels is refused, and the healthy masters' go on.
    async fn felt(&self, deadline: Instant, faulty: &Tally, healthy: &Tally, what: &str) {
        wait_until(deadline, &format!("a publish to meet the {what}"), || {
            faulty.refused.load(Ordering::Relaxed) > self.refused
        })
        .await;
        wait_until(deadline, "healthy masters to go on publishing", || {
            healthy.stored.load(Ordering::Relaxed) > self.stored_healthy + 20
        })
        .await;
    }
}

/// Waits until `/readyz` answers 503 naming the slots that are down.
async fn readyz_names_slots_down(deadline: Instant, api: std::net::SocketAddr) {
    wait_until_async(deadline, "/readyz to name the slots down", || async move {
        let (status, body) = common::get(&format!("http://{api}/readyz")).await;
        status == StatusCode::SERVICE_UNAVAILABLE && body.contains("down for slots")
    })
    .await;
}

/// `PER_MASTER` channel names served by each master, by master index.
fn channels_by_master(cluster: &RedisCluster) -> Vec<(usize, Vec<String>)> {
    let masters: Vec<usize> = cluster
        .view()
        .into_iter()
        .filter(|n| n.master && !n.slots.is_empty())
        .map(|n| cluster.index_of(n.port))
        .collect();
    let mut by_master: HashMap<usize, Vec<String>> = HashMap::new();
    let mut i = 0;
    while masters
        .iter()
        .any(|m| by_master.get(m).map_or(0, Vec::len) < PER_MASTER)
    {
        let channel = format!("fault:{i}");
        i += 1;
        let master = cluster.master_of(cluster.slot_of(&channel));
        let list = by_master.entry(master).or_default();
        if list.len() < PER_MASTER {
            list.push(channel);
        }
    }
    let mut out: Vec<(usize, Vec<String>)> = by_master.into_iter().collect();
    out.sort();
    out
}

/// Where a subscriber stands in each channel, as it goes.
type Progress = watch::Sender<HashMap<String, Position>>;

/// A subscriber that stays connected and records everything it is handed
/// until it reached every channel's final position.
async fn websocket_subscriber(
    node: Node,
    channels: Vec<String>,
    finals: watch::Receiver<Option<HashMap<String, Position>>>,
    progress: Progress,
    deadline: Instant,
) -> Result<HashMap<String, Vec<Got>>, String> {
    let mut ws = Ws::connect(node.public).await.map_err(|e| e.to_string())?;
    let mut got: HashMap<String, Vec<Got>> = HashMap::new();
    let mut at: HashMap<String, Position> = HashMap::new();
    let mut early = Vec::new();
    for channel in &channels {
        ws.subscribe(channel, Some(start_position()), &mut early)
            .await
            .map_err(|e| format!("subscribing to {channel}: {e}"))?;
    }
    let mut take = |item: Got, got: &mut HashMap<String, Vec<Got>>| {
        at.insert(item.channel().to_owned(), item.position());
        got.entry(item.channel().to_owned()).or_default().push(item);
    };
    for item in early.drain(..) {
        take(item, &mut got);
    }
    loop {
        progress.send_replace(at_positions(&got));
        if caught_up(&finals, &at_positions(&got)) {
            return Ok(got);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(Duration::from_millis(200)), ws.next()).await {
            Err(_) if Instant::now() < deadline => continue,
            Err(_) => return Err(format!("never caught up: {:?}", at_positions(&got))),
            Ok(Ok(Some(item))) => take(item, &mut got),
            Ok(Ok(None)) => return Err("the WebSocket closed".into()),
            Ok(Err(err)) => return Err(format!("the WebSocket failed: {err}")),
        }
    }
}

async fn sse_subscriber(
    node: Node,
    channels: Vec<String>,
    finals: watch::Receiver<Option<HashMap<String, Position>>>,
    progress: Progress,
    deadline: Instant,
) -> Result<HashMap<String, Vec<Got>>, String> {
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let mut sse = Sse::open(node.public, &names, Some(&cursor_from_start(&names)))
        .await
        .map_err(|e| e.to_string())?;
    let mut got: HashMap<String, Vec<Got>> = HashMap::new();
    loop {
        progress.send_replace(at_positions(&got));
        if caught_up(&finals, &at_positions(&got)) {
            return Ok(got);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left.min(Duration::from_millis(200)), sse.next()).await {
            Err(_) if Instant::now() < deadline => continue,
            Err(_) => return Err(format!("never caught up: {:?}", at_positions(&got))),
            Ok(Ok(Some((Some(item), _)))) => {
                got.entry(item.channel().to_owned()).or_default().push(item)
            }
            Ok(Ok(Some((None, _)))) => {}
            Ok(Ok(None)) => return Err("the SSE stream ended".into()),
            Ok(Err(err)) => return Err(format!("the SSE stream failed: {err}")),
        }
    }
}

fn at_positions(got: &HashMap<String, Vec<Got>>) -> HashMap<String, Position> {
    got.iter()
        .filter_map(|(c, items)| Some((c.clone(), items.last()?.position())))
        .collect()
}

fn caught_up(
    finals: &watch::Receiver<Option<HashMap<String, Position>>>,
    at: &HashMap<String, Position>,
) -> bool {
    finals
        .borrow()
        .as_ref()
        .is_some_and(|finals| finals.iter().all(|(c, p)| at.get(c) == Some(p)))
}

async fn wait_ready(nodes: &[Node], deadline: Instant) {
    for node in nodes {
        let api = node.api;
        wait_until_async(deadline, "every node to be ready", || async move {
            common::get(&format!("http://{api}/readyz")).await.0 == StatusCode::OK
        })
        .await;
    }
}

async fn run(mut cluster: RedisCluster, fault: Fault) {
    let seed = seed();
    eprintln!("cluster fault {fault:?}, seed {seed}: replay with PUSHGATE_CHAOS_SEED={seed}");
    let deadline = Instant::now() + DEADLINE;
    let mut rng = StdRng::seed_from_u64(seed);
    let app = Upstream::start().await;
    let (_gates, nodes) = nodes(&app, &cluster).await;
    let by_master = channels_by_master(&cluster);
    let (faulty_master, faulty) = by_master[0].clone();
    let all: Vec<String> = by_master.iter().flat_map(|(_, c)| c.clone()).collect();

    let (finals_tx, finals) = watch::channel(None::<HashMap<String, Position>>);
    let mut subscribers = Vec::new();
    for node in &nodes {
        subscribers.push((
            format!("WebSocket on {}", node.public),
            tokio::spawn(websocket_subscriber(
                *node,
                all.clone(),
                finals.clone(),
                watch::channel(HashMap::new()).0,
                deadline,
            )),
        ));
        subscribers.push((
            format!("SSE on {}", node.public),
            tokio::spawn(sse_subscriber(
                *node,
                all.clone(),
                finals.clone(),
                watch::channel(HashMap::new()).0,
                deadline,
            )),
        ));
    }
    // Every subscriber is subscribed before the first publish: a channel
    // is heard on both nodes throughout.
    for node in &nodes {
        let api = node.api;
        let want = all.len();
        wait_until_async(deadline, "the subscribers to subscribe", || async move {
            let (_, body) = common::api_call(api, "GET", "/api/channels", None).await;
            body["channels"].as_array().map_or(0, Vec::len) >= want
        })
        .await;
    }

    // Publishers run to a third, then on to two thirds only once the fault
    // began, so publishes flow while it lasts.
    let (gate, gated) = watch::channel(MESSAGES / 3);
    let faulty_tally = Tally::default();
    let healthy_tally = Tally::default();
    let publishers: Vec<_> = all
        .iter()
        .map(|channel| {
            let tally = if faulty.contains(channel) {
                faulty_tally.clone()
            } else {
                healthy_tally.clone()
            };
            tokio::spawn(publish_stream(
                channel.clone(),
                MESSAGES,
                nodes.clone(),
                StdRng::seed_from_u64(rng.random()),
                gated.clone(),
                tally,
                deadline,
            ))
        })
        .collect();
    let total = |tally: &Tally| tally.stored.load(Ordering::Relaxed);
    let third = MESSAGES / 3 * all.len() as u64;
    wait_until(deadline, "the publishers to reach a third", || {
        total(&faulty_tally) + total(&healthy_tally) >= third
    })
    .await;

    match fault {
        Fault::Restart { empty } => {
            let index = faulty_master;
            tokio::task::block_in_place(|| cluster.nodes[index].kill());
            gate.send_replace(MESSAGES * 2 / 3);
            // The outage lasts until the faulty master's channels were
            // refused and the healthy ones went on.
            Before::now(&faulty_tally, &healthy_tally)
                .felt(deadline, &faulty_tally, &healthy_tally, "outage")
                .await;
            // Readiness and metrics name the slots that are down.
            let api = nodes[0].api;
            readyz_names_slots_down(deadline, api).await;
            let (_, metrics) = common::get(&format!("http://{api}/metrics")).await;
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with("pushgate_redis_shard_up{") && l.ends_with(" 0")),
                "a shard is down in the metrics: {metrics}"
            );
            tokio::task::block_in_place(|| {
                if empty {
                    cluster.nodes[index].restart_empty();
                } else {
                    cluster.nodes[index].restart();
                }
            });
            let cluster_ref = &cluster;
            tokio::task::block_in_place(|| cluster_ref.wait_ok(Duration::from_secs(30)));
        }
        Fault::Hang => {
            let before = Before::now(&faulty_tally, &healthy_tally);
            cluster.nodes[faulty_master].pause();
            gate.send_replace(MESSAGES * 2 / 3);
            before
                .felt(deadline, &faulty_tally, &healthy_tally, "hang")
                .await;
            // A master that answers nothing is down too.
            readyz_names_slots_down(deadline, nodes[0].api).await;
            cluster.nodes[faulty_master].resume();
            let cluster_ref = &cluster;
            tokio::task::block_in_place(|| cluster_ref.wait_ok(Duration::from_secs(30)));
        }
        Fault::FailOver => {
            let before = Before::now(&faulty_tally, &healthy_tally);
            gate.send_replace(MESSAGES * 2 / 3);
            tokio::task::block_in_place(|| cluster.kill_and_fail_over(faulty_master));
            before
                .felt(deadline, &faulty_tally, &healthy_tally, "outage")
                .await;
        }
        Fault::Reshard => {
            let slot = cluster.slot_of(&faulty[0]);
            let to = by_master[1].0;
            gate.send_replace(MESSAGES * 2 / 3);
            let cluster_ref = &cluster;
            tokio::task::block_in_place(|| cluster_ref.move_slot(slot, faulty_master, to));
            assert_eq!(cluster.master_of(slot), to, "the slot moved");
        }
    }
    wait_ready(&nodes, deadline).await;
    gate.send_replace(MESSAGES);

    let mut ledger = Ledger::default();
    let mut refused_healthy = Vec::new();
    for (channel, publisher) in all.iter().zip(publishers) {
        let stream = publisher
            .await
            .unwrap_or_else(|err| panic!("seed {seed}: the publisher of {channel} failed: {err}"));
        if !faulty.contains(channel) && stream.refused > 0 {
            refused_healthy.push((channel.clone(), stream.refused));
        }
        ledger.stored.insert(channel.clone(), stream.stored);
        ledger.ambiguous.insert(channel.clone(), stream.ambiguous);
    }
    let lost = ledger.lost_epochs();
    finals_tx.send_replace(Some(
        ledger
            .stored
            .iter()
            .map(|(channel, stored)| (channel.clone(), *stored.last().unwrap()))
            .collect(),
    ));
    let mut resets = 0;
    for (name, subscriber) in subscribers {
        let got = match subscriber.await {
            Ok(Ok(got)) => got,
            Ok(Err(why)) => panic!("seed {seed}: {name}: {why}"),
            Err(err) => panic!("seed {seed}: {name} failed: {err}"),
        };
        for channel in &all {
            let items = got.get(channel).map(Vec::as_slice).unwrap_or_default();
            if let Err(why) = check_channel(&ledger, &lost[channel], channel, items) {
                panic!("seed {seed}: {name} on {channel}: {why}\nwhat it got: {items:?}");
            }
            resets += items
                .iter()
                .filter(|g| matches!(g, Got::Reset { .. }))
                .count();
        }
    }
    assert!(
        refused_healthy.is_empty(),
        "seed {seed}: publishes to channels of healthy masters failed: {refused_healthy:?}"
    );
    let mut unasked = 0;
    for node in &nodes {
        let (_, metrics) = common::get(&format!("http://{}/metrics", node.api)).await;
        unasked += metrics
            .lines()
            .find_map(|l| l.strip_prefix("pushgate_redis_unsolicited_unsubscribes_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    let lost_any = lost.values().any(|l: &HashSet<String>| !l.is_empty());
    eprintln!(
        "cluster fault {fault:?}, seed {seed}: {} refused on the faulty master, {resets} resets, data lost: {lost_any}, {unasked} unasked unsubscribes",
        faulty_tally.refused.load(Ordering::Relaxed)
    );
    match fault {
        Fault::Restart { empty: true } => {
            assert!(lost_any, "seed {seed}: the empty restart lost the streams")
        }
        // Nothing was lost, so nobody is told it was.
        Fault::Restart { empty: false } | Fault::Reshard => assert!(
            !lost_any && resets == 0,
            "seed {seed}: {fault:?} lost nothing, yet epochs changed ({lost_any}) or {resets} resets were sent"
        ),
        Fault::FailOver | Fault::Hang => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_empty_under_load_leaves_no_silent_gap() {
    run(RedisCluster::start(3), Fault::Restart { empty: true }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_from_its_aof_under_load_loses_nothing() {
    let cluster =
        RedisCluster::start_with(3, 0, &["--appendonly", "yes", "--appendfsync", "always"]);
    run(cluster, Fault::Restart { empty: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_under_load_leaves_no_silent_gap() {
    run(RedisCluster::start_with(3, 1, &[]), Fault::FailOver).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_subscribed_channels_moved_under_load_leave_no_silent_gap() {
    run(RedisCluster::start(3), Fault::Reshard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_hangs_under_load_fails_only_its_own_channels() {
    run(RedisCluster::start(3), Fault::Hang).await;
}

/// A numbered stream of `total` publications on each channel, through
/// both nodes, let through up to the gate's value (at first [`COPIED`]).
fn gated_publishers(
    channels: &[String],
    total: u64,
    nodes: &[Node],
    rng: &mut StdRng,
    deadline: Instant,
) -> (
    watch::Sender<u64>,
    Tally,
    Vec<tokio::task::JoinHandle<common::chaos::Stream>>,
) {
    let (gate, gated) = watch::channel(COPIED);
    let tally = Tally::default();
    let publishers = channels
        .iter()
        .map(|channel| {
            tokio::spawn(publish_stream(
                channel.clone(),
                total,
                nodes.to_vec(),
                StdRng::seed_from_u64(rng.random()),
                gated.clone(),
                tally.clone(),
                deadline,
            ))
        })
        .collect();
    (gate, tally, publishers)
}

/// Publications per channel in each phase of the lagging replica's test:
/// copied to the replica; acknowledged by the master and never copied;
/// numbered by the promoted replica before any node checked the channel;
/// and after.
const COPIED: u64 = 5;
const UNCOPIED: u64 = 3;
const NUMBERED_OVER: u64 = 5;
const AFTER: u64 = 5;

/// Redis replicates asynchronously: a replica promoted after its master
/// died can lack the last publications the master acknowledged (and the
/// nodes delivered), and numbers new ones over them. The replica is made
/// to lag for certain (stopped, its link cut, while the master takes
/// publications), and
/// refuses `SSUBSCRIBE` until it has numbered new publications over the
/// lost ones, so no node can check the channel before the offsets are
/// reused. Every publication answered 200 must still be delivered or
/// covered by a reset on both nodes, and a client resuming from a position
/// it had before the failover must be told it lost history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_that_lacked_acknowledged_publications_leaves_no_silent_gap() {
    let seed = seed();
    eprintln!("lagging replica, seed {seed}: replay with PUSHGATE_CHAOS_SEED={seed}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = RedisCluster::start_with(3, 1, &[]);
    let app = Upstream::start().await;
    let (_gates, nodes) = nodes(&app, &cluster).await;
    let (master, channels) = channels_by_master(&cluster)[0].clone();
    let replica = cluster.replica_of(master);
    let replica_port = cluster.nodes[replica].port;
    let acl = |cluster: &RedisCluster, rule: &str| {
        let reply = cluster.cli(replica_port, &["ACL", "SETUSER", "default", rule]);
        assert_eq!(reply.trim(), "OK", "ACL SETUSER default {rule}");
    };
    acl(&cluster, "-ssubscribe");

    let (finals_tx, finals) = watch::channel(None::<HashMap<String, Position>>);
    let mut subscribers = Vec::new();
    let mut progress = Vec::new();
    for node in &nodes {
        let (ws_at, ws_progress) = watch::channel(HashMap::new());
        let (sse_at, sse_progress) = watch::channel(HashMap::new());
        progress.extend([ws_progress, sse_progress]);
        subscribers.push((
            format!("WebSocket on {}", node.public),
            tokio::spawn(websocket_subscriber(
                *node,
                channels.clone(),
                finals.clone(),
                ws_at,
                deadline,
            )),
        ));
        subscribers.push((
            format!("SSE on {}", node.public),
            tokio::spawn(sse_subscriber(
                *node,
                channels.clone(),
                finals.clone(),
                sse_at,
                deadline,
            )),
        ));
    }
    for node in &nodes {
        let (api, want) = (node.api, channels.len());
        wait_until_async(deadline, "the subscribers to subscribe", || async move {
            let (_, body) = common::api_call(api, "GET", "/api/channels", None).await;
            body["channels"].as_array().map_or(0, Vec::len) >= want
        })
        .await;
    }

    let total = COPIED + UNCOPIED + NUMBERED_OVER + AFTER;
    let (gate, tally, publishers) = gated_publishers(&channels, total, &nodes, &mut rng, deadline);
    let n = channels.len() as u64;
    let stored = |tally: &Tally| tally.stored.load(Ordering::Relaxed);
    wait_until(deadline, "the copied publications", || {
        stored(&tally) >= COPIED * n
    })
    .await;
    tokio::task::block_in_place(|| cluster.wait_replicated(master, replica));
    // Stopped, and cut off: what the master sends it from now on cannot
    // wait in its socket either.
    cluster.nodes[replica].pause();
    let cut = cluster.cli(
        cluster.nodes[master].port,
        &["CLIENT", "KILL", "TYPE", "replica"],
    );
    assert_eq!(cut.trim(), "1", "the master's link to its replica was cut");
    gate.send_replace(COPIED + UNCOPIED);
    wait_until(deadline, "the uncopied publications", || {
        stored(&tally) >= (COPIED + UNCOPIED) * n
    })
    .await;
    // Both nodes handed them on: every subscriber holds them.
    for at in &mut progress {
        let heard = tokio::time::timeout_at(
            deadline.into(),
            at.wait_for(|at| {
                channels
                    .iter()
                    .all(|c| at.get(c).is_some_and(|p| p.offset == COPIED + UNCOPIED))
            }),
        )
        .await;
        assert!(
            matches!(heard, Ok(Ok(_))),
            "seed {seed}: a subscriber never heard the uncopied publications"
        );
    }
    cluster.nodes[master].kill();
    cluster.nodes[replica].resume();
    let cluster_ref = &cluster;
    tokio::task::block_in_place(|| cluster_ref.take_over(replica));
    gate.send_replace(COPIED + UNCOPIED + NUMBERED_OVER);
    wait_until(deadline, "publications numbered over the lost ones", || {
        stored(&tally) >= (COPIED + UNCOPIED + NUMBERED_OVER) * n
    })
    .await;
    acl(&cluster, "+ssubscribe");
    wait_ready(&nodes, deadline).await;
    gate.send_replace(total);

    let mut ledger = Ledger::default();
    for (channel, publisher) in channels.iter().zip(publishers) {
        let stream = publisher
            .await
            .unwrap_or_else(|err| panic!("seed {seed}: the publisher of {channel} failed: {err}"));
        ledger.stored.insert(channel.clone(), stream.stored);
        ledger.ambiguous.insert(channel.clone(), stream.ambiguous);
    }
    // The scene this test is for: the promoted replica numbered new
    // publications at positions the old master had answered 200 for.
    for (channel, stored) in &ledger.stored {
        let lost = &stored[COPIED as usize..(COPIED + UNCOPIED) as usize];
        let over =
            &stored[(COPIED + UNCOPIED) as usize..(COPIED + UNCOPIED + NUMBERED_OVER) as usize];
        assert!(
            over.iter().any(|p| lost.contains(p)),
            "seed {seed}: {channel}: no position was numbered twice: {stored:?}"
        );
    }
    let lost = ledger.lost_epochs();
    finals_tx.send_replace(Some(
        ledger
            .stored
            .iter()
            .map(|(channel, stored)| (channel.clone(), *stored.last().unwrap()))
            .collect(),
    ));
    for (name, subscriber) in subscribers {
        let got = match subscriber.await {
            Ok(Ok(got)) => got,
            Ok(Err(why)) => panic!("seed {seed}: {name}: {why}"),
            Err(err) => panic!("seed {seed}: {name} failed: {err}"),
        };
        for channel in &channels {
            let items = got.get(channel).map(Vec::as_slice).unwrap_or_default();
            if let Err(why) = check_channel(&ledger, &lost[channel], channel, items) {
                panic!("seed {seed}: {name} on {channel}: {why}\nwhat it got: {items:?}");
            }
        }
    }
    // A client that held the lost publications and resumes from there is
    // told, on either node.
    for node in &nodes {
        let mut ws = Ws::connect(node.public).await.expect("connects");
        for channel in &channels {
            let before = ledger.stored[channel][(COPIED + UNCOPIED - 1) as usize];
            let mut early = Vec::new();
            let subscribed = ws
                .subscribe(channel, Some(before), &mut early)
                .await
                .unwrap_or_else(|err| panic!("seed {seed}: subscribing to {channel}: {err:?}"));
            assert!(
                !subscribed.recovered,
                "seed {seed}: resuming {channel} from {before} on {} was answered as recovered at {}, skipping what was numbered over it",
                node.public, subscribed.position
            );
        }
    }
}

/// The lagging replica's scene with `engine.redis.wait_replicas: 1`, and no
/// subscriber anywhere, so no node could notice a loss: what the master
/// cannot copy to its replica is answered 503 `not_replicated`, never 200,
/// and the promoted replica holds every publication answered 200, at the
/// position it was answered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_replica_a_promoted_one_holds_every_acknowledged_publication() {
    let seed = seed();
    eprintln!("waiting for a replica, seed {seed}: replay with PUSHGATE_CHAOS_SEED={seed}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = RedisCluster::start_with(3, 1, &[]);
    let app = Upstream::start().await;
    let config = format!(
        "engine:\n  kind: redis\n  redis:\n    url: {}\n    cluster: true\n    connect_timeout: 500ms\n    command_timeout: 1s\n    wait_replicas: 1\n    wait_timeout: 200ms\n",
        cluster.url(),
    );
    let (_gates, nodes) = two_nodes(&app, &config).await;
    let by_master = channels_by_master(&cluster);
    let (master, channels) = by_master[0].clone();
    let healthy: Vec<String> = by_master[1..]
        .iter()
        .flat_map(|(_, channels)| channels.clone())
        .collect();
    let replica = cluster.replica_of(master);

    let total = COPIED + UNCOPIED + AFTER;
    let (gate, tally, publishers) = gated_publishers(&channels, total, &nodes, &mut rng, deadline);
    let n = channels.len() as u64;
    let stored = |tally: &Tally| tally.stored.load(Ordering::Relaxed);
    let refused = |tally: &Tally| tally.refused.load(Ordering::Relaxed);
    wait_until(deadline, "the replicated publications", || {
        stored(&tally) >= COPIED * n
    })
    .await;
    // The replica stops, cut off: nothing the master takes now reaches it.
    cluster.nodes[replica].pause();
    let cut = cluster.cli(
        cluster.nodes[master].port,
        &["CLIENT", "KILL", "TYPE", "replica"],
    );
    assert_eq!(cut.trim(), "1", "the master's link to its replica was cut");
    let refused_before = refused(&tally);
    gate.send_replace(COPIED + UNCOPIED);
    wait_until(deadline, "publishes the replica cannot confirm", || {
        refused(&tally) >= refused_before + 2 * n || stored(&tally) > COPIED * n
    })
    .await;
    assert_eq!(
        stored(&tally),
        COPIED * n,
        "seed {seed}: a publication no replica held was answered 200"
    );
    // The other masters' replicas are there: their publishes go on.
    for (i, channel) in healthy.iter().enumerate() {
        let body = serde_json::json!({"channel": channel, "data": {"healthy": i}});
        let node = nodes[i % nodes.len()];
        let (status, answer) = common::api_call(node.api, "POST", "/api/publish", Some(body)).await;
        assert_eq!(status, StatusCode::OK, "seed {seed}: {channel}: {answer}");
    }
    cluster.nodes[master].kill();
    cluster.nodes[replica].resume();
    let cluster_ref = &cluster;
    tokio::task::block_in_place(|| cluster_ref.take_over(replica));
    // The old master comes back empty and becomes the new one's replica,
    // which publishes need before they are answered 200 again.
    tokio::task::block_in_place(|| cluster.nodes[master].restart_empty());
    gate.send_replace(total);

    for (channel, publisher) in channels.iter().zip(publishers) {
        let stream = publisher
            .await
            .unwrap_or_else(|err| panic!("seed {seed}: the publisher of {channel} failed: {err}"));
        // Nothing was lost, so nothing moved the epoch: every publication
        // answered 200 is in the new master's history where it was
        // answered, on either node.
        for node in &nodes {
            let (status, history) = common::api_call(
                node.api,
                "GET",
                &format!("/api/history?channel={channel}&limit=100"),
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{history}");
            let held: HashMap<Position, u64> = history["messages"]
                .as_array()
                .unwrap_or_else(|| panic!("seed {seed}: no history for {channel}: {history}"))
                .iter()
                .map(|m| {
                    let position = Position::new(
                        pushgate::cursor::Epoch::parse(m["epoch"].as_str().unwrap()).unwrap(),
                        m["offset"].as_u64().unwrap(),
                    );
                    (position, m["data"]["seq"].as_u64().unwrap())
                })
                .collect();
            for (index, position) in stream.stored.iter().enumerate() {
                let seq = index as u64 + 1;
                assert_eq!(
                    held.get(position),
                    Some(&seq),
                    "seed {seed}: {channel}: seq {seq} was answered 200 at {position}, \
                     and the promoted replica does not hold it there: {history}"
                );
            }
        }
    }
}
