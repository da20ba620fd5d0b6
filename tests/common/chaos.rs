//! What chaos tests share: numbered publishers that retry refused publishes
//! with their idempotency key, the ledger of what was answered 200, and the
//! check of one client's record of a channel against it: every publication
//! answered 200 delivered exactly once, in order, or skipped by an explicit
//! reset, and a reset only where history could not cover the gap.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use pushgate::cursor::Position;
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::realtime::{start_position, Got};
use super::{Pushgate, Upstream};

/// The run's seed: `PUSHGATE_CHAOS_SEED`, or a fresh one.
pub fn seed() -> u64 {
    match std::env::var("PUSHGATE_CHAOS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("PUSHGATE_CHAOS_SEED={text:?} is not a number")),
        Err(_) => rand::random(),
    }
}

/// One node: its public and API addresses.
#[derive(Debug, Clone, Copy)]
pub struct Node {
    pub public: SocketAddr,
    pub api: SocketAddr,
}

/// Where each publish answered 200 landed, per channel, by sequence number.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// `(epoch, offset)` of the 200 answer for seq n, at index n - 1.
    pub stored: HashMap<String, Vec<Position>>,
    /// Seqs an attempt of which ended `outcome_unknown`: they may also be
    /// stored by that attempt.
    pub ambiguous: HashMap<String, HashSet<u64>>,
}

/// What every publisher has done so far, for the outages to follow.
#[derive(Clone, Default)]
pub struct Tally {
    /// Publishes answered 200.
    pub stored: Arc<AtomicU64>,
    /// Publishes answered 503.
    pub refused: Arc<AtomicU64>,
}

/// Publishes `{"seq": n}` for n in 1..=messages on `channel`, one at a
/// time through a random node, each with its idempotency key, retrying 503s
/// with that key until it is stored. Seq n starts only once `gate` is at
/// least n.
pub async fn publish_stream(
    channel: String,
    messages: u64,
    nodes: Vec<Node>,
    mut rng: StdRng,
    mut gate: watch::Receiver<u64>,
    tally: Tally,
    deadline: Instant,
) -> Stream {
    let mut stored = Vec::new();
    let mut ambiguous = HashSet::new();
    let mut refused = 0;
    for seq in 1..=messages {
        let opened = tokio::time::timeout_at(deadline.into(), gate.wait_for(|gate| *gate >= seq));
        assert!(
            matches!(opened.await, Ok(Ok(_))),
            "seq {seq} on {channel} was never let through"
        );
        let body = json!({
            "channel": channel,
            "data": {"seq": seq},
            "idempotency_key": format!("{channel}-{seq}"),
        });
        loop {
            assert!(
                Instant::now() < deadline,
                "seq {seq} on {channel} was never stored"
            );
            let node = nodes[rng.random_range(0..nodes.len())];
            let (status, answer) =
                super::api_call(node.api, "POST", "/api/publish", Some(body.clone())).await;
            match status {
                StatusCode::OK => {
                    let result = &answer["results"][0];
                    stored.push(Position::new(
                        pushgate::cursor::Epoch::parse(result["epoch"].as_str().unwrap()).unwrap(),
                        result["offset"].as_u64().unwrap(),
                    ));
                    tally.stored.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    refused += 1;
                    // Perhaps stored, and perhaps handed to subscribers.
                    if ["outcome_unknown", "not_replicated"]
                        .contains(&answer["error"]["code"].as_str().unwrap_or(""))
                    {
                        ambiguous.insert(seq);
                    }
                    tokio::time::sleep(Duration::from_millis(rng.random_range(5..25))).await;
                }
                other => panic!("publish of seq {seq} answered {other}: {answer}"),
            }
        }
    }
    Stream {
        stored,
        ambiguous,
        refused,
    }
}

pub async fn wait_until(deadline: Instant, what: &str, mut condition: impl FnMut() -> bool) {
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// [`wait_until`] for a condition that has to ask over the network.
pub async fn wait_until_async<F, Fut>(deadline: Instant, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two pushgate nodes in front of `app`, both with `config`, and their
/// addresses for the publishers and subscribers.
pub async fn two_nodes(app: &Upstream, config: &str) -> (Vec<Pushgate>, Vec<Node>) {
    let mut gates = Vec::new();
    for _ in 0..2 {
        gates.push(Pushgate::start(&app.url(), config).await);
    }
    let nodes = gates
        .iter()
        .map(|g| Node {
            public: g.addr,
            api: g.api_addr,
        })
        .collect();
    (gates, nodes)
}

pub fn seq_of(data: &Value) -> u64 {
    data["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("not a chaos publication: {data}"))
}

/// Checks one client's record of one channel; returns why it is wrong.
pub fn check_channel(
    ledger: &Ledger,
    lost: &HashSet<String>,
    channel: &str,
    got: &[Got],
) -> Result<(), String> {
    let stored = &ledger.stored[channel];
    let ambiguous = &ledger.ambiguous[channel];
    let mut at = start_position();
    let mut last_seq = 0u64;
    let mut reset_since_message = false;
    let mut seen = HashSet::new();
    for (index, item) in got.iter().enumerate() {
        let here = item.position();
        match item {
            Got::Message { data, .. } => {
                let seq = seq_of(data);
                if at.offset == 0 {
                    if here.offset != 1 {
                        return Err(format!(
                            "item {index}: from offset 0, {here} came first without a reset"
                        ));
                    }
                } else if here.epoch != at.epoch {
                    return Err(format!(
                        "item {index}: the epoch changed from {at} to {here} without a reset"
                    ));
                } else if here.offset != at.offset + 1 {
                    return Err(format!(
                        "item {index}: {here} does not follow {at} (a gap or a duplicate)"
                    ));
                }
                let answered = stored[(seq - 1) as usize];
                if answered.epoch == here.epoch && answered.offset != here.offset {
                    return Err(format!(
                        "item {index}: seq {seq} at {here}, but its publish was stored at {answered}"
                    ));
                }
                if seq <= last_seq
                    && !(seq == last_seq && reset_since_message && ambiguous.contains(&seq))
                {
                    return Err(format!(
                        "item {index}: seq {seq} after seq {last_seq}: out of order or twice"
                    ));
                }
                last_seq = seq;
                reset_since_message = false;
                seen.insert(seq);
            }
            Got::Reset { .. } => {
                if !lost.contains(at.epoch.as_str()) || here.epoch == at.epoch {
                    return Err(format!(
                        "item {index}: a reset from {at} to {here}, but history covered that gap"
                    ));
                }
                reset_since_message = true;
            }
        }
        at = here;
    }
    // Every seq answered 200 arrived, or a reset stands where it would be.
    for seq in 1..=stored.len() as u64 {
        if seen.contains(&seq) {
            continue;
        }
        let before = got
            .iter()
            .rposition(|g| matches!(g, Got::Message { data, .. } if seq_of(data) < seq));
        let after = got
            .iter()
            .position(|g| matches!(g, Got::Message { data, .. } if seq_of(data) > seq));
        let window = &got[before.map_or(0, |i| i + 1)..after.unwrap_or(got.len())];
        if !window.iter().any(|g| matches!(g, Got::Reset { .. })) {
            return Err(format!(
                "seq {seq} was answered 200 but neither delivered nor skipped by a reset"
            ));
        }
    }
    Ok(())
}

/// What one publisher did on its channel.
#[derive(Debug, Default)]
pub struct Stream {
    /// `(epoch, offset)` of the 200 answer for seq n, at index n - 1.
    pub stored: Vec<Position>,
    /// Seqs an attempt of which ended `outcome_unknown`.
    pub ambiguous: HashSet<u64>,
    /// Attempts answered 503.
    pub refused: u64,
}

impl Ledger {
    /// Epochs of publications answered 200 that the store later lost: every
    /// epoch of a channel but its last.
    pub fn lost_epochs(&self) -> HashMap<String, HashSet<String>> {
        self.stored
            .iter()
            .map(|(channel, stored)| {
                let last = stored.last().map(|p| p.epoch);
                let lost = stored
                    .iter()
                    .filter(|p| Some(p.epoch) != last)
                    .map(|p| p.epoch.to_string())
                    .collect();
                (channel.clone(), lost)
            })
            .collect()
    }
}
