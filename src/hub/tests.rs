use super::*;
use crate::cursor::{Epoch, Position};
use std::pin::Pin;

const LIMITS: QueueLimits = QueueLimits {
    messages: 3,
    bytes: 1 << 20,
    take: usize::MAX,
};

fn publication(channel: &str, offset: u64, data: &str) -> Arc<Publication> {
    Arc::new(Publication::new(
        ChannelName::parse(channel).unwrap(),
        Position::new(Epoch::parse("e").unwrap(), offset),
        None,
        data,
        0,
    ))
}

#[test]
fn fan_out_reaches_every_subscriber_of_the_channel_only() {
    let hub = Hub::new();
    let chat = ChannelName::parse("chat").unwrap();
    let other = ChannelName::parse("other").unwrap();
    let (a, b, c) = (
        Outbox::new(LIMITS),
        Outbox::new(LIMITS),
        Outbox::new(LIMITS),
    );
    assert!(hub.subscribe(&chat, &a));
    assert!(!hub.subscribe(&chat, &b));
    assert!(
        !hub.subscribe(&chat, &b),
        "subscribing twice is one subscription"
    );
    hub.subscribe(&other, &c);

    assert_eq!(hub.deliver(&publication("chat", 1, "1")), 2);
    let mut batch = Vec::new();
    assert_eq!(a.drain_into(&mut batch), Drained::Open);
    assert_eq!(b.drain_into(&mut batch), Drained::Open);
    assert_eq!(c.drain_into(&mut batch), Drained::Open);
    assert_eq!(batch.len(), 2);
    assert!(batch.iter().all(|p| p.channel().as_str() == "chat"));
    // Shared, not copied.
    assert!(Arc::ptr_eq(&batch[0], &batch[1]));

    assert_eq!(hub.channels(), vec![(chat.clone(), 2), (other.clone(), 1)]);
    assert!(!hub.unsubscribe("chat", &a));
    assert!(hub.unsubscribe("chat", &b), "the last subscriber left");
    assert_eq!(hub.channel_count(), 1);
    assert_eq!(hub.deliver(&publication("chat", 2, "2")), 0);
}

#[test]
fn discarding_a_channel_keeps_the_others_in_order_and_frees_its_bytes() {
    let outbox = Outbox::new(QueueLimits {
        messages: 10,
        bytes: 1 << 20,
        take: usize::MAX,
    });
    let hub = Hub::new();
    let name = |channel: &str| ChannelName::parse(channel).unwrap();
    for (channel, offset) in [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("b", 2)] {
        outbox.push(&publication(channel, offset, "12345"));
    }
    hub.discard(&name("b"), &outbox);
    hub.discard(&name("none"), &outbox);
    let mut batch = Vec::new();
    assert_eq!(outbox.drain_into(&mut batch), Drained::Open);
    let left: Vec<(&str, u64)> = batch
        .iter()
        .map(|p| (p.channel().as_str(), p.offset()))
        .collect();
    assert_eq!(left, [("a", 1), ("a", 2), ("c", 1)]);
    // The bytes of what went are free again: exactly the bound fits.
    let tight = Outbox::new(QueueLimits {
        messages: 10,
        bytes: 2 * publication("a", 1, "12345").size(),
        take: usize::MAX,
    });
    tight.push(&publication("a", 1, "12345"));
    tight.push(&publication("b", 1, "12345"));
    hub.discard(&name("b"), &tight);
    assert_eq!(tight.push(&publication("a", 2, "12345")), Push::Urged);
    assert!(!tight.is_lagging());
}

#[test]
fn a_session_over_its_message_bound_lags_and_the_others_keep_everything() {
    let hub = Hub::new();
    let chat = ChannelName::parse("chat").unwrap();
    let (slow, fast) = (Outbox::new(LIMITS), Outbox::new(LIMITS));
    hub.subscribe(&chat, &slow);
    hub.subscribe(&chat, &fast);
    let mut received = Vec::new();
    for offset in 1..=10 {
        hub.deliver(&publication("chat", offset, "0"));
        // The fast session drains as it goes; the slow one never does.
        assert_eq!(fast.drain_into(&mut received), Drained::Open);
    }
    let offsets: Vec<u64> = received.iter().map(|p| p.offset()).collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
    assert!(slow.is_lagging());
    assert!(slow.is_empty(), "a lagging queue holds nothing");
    assert_eq!(slow.drain_into(&mut Vec::new()), Drained::Lagging);
    assert_eq!(hub.lagged_total(), 1);
}

#[test]
fn the_byte_bound_also_cuts_a_session_off() {
    let outbox = Outbox::new(QueueLimits {
        messages: 1000,
        bytes: 200,
        take: usize::MAX,
    });
    let big = publication("c", 1, &format!("\"{}\"", "x".repeat(120)));
    assert_eq!(outbox.push(&big), Push::Urged);
    assert_eq!(outbox.push(&big), Push::Overflowed);
    assert_eq!(outbox.push(&big), Push::Refused);
    assert!(outbox.is_lagging());
}

#[tokio::test]
async fn a_push_wakes_the_waiting_session() {
    let outbox = Outbox::new(LIMITS);
    let waiter = {
        let outbox = outbox.clone();
        tokio::spawn(async move {
            outbox.ready().await;
            let mut batch = Vec::new();
            outbox.drain_into(&mut batch);
            batch.len()
        })
    };
    outbox.push(&publication("c", 1, "1"));
    let drained = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(drained, 1);

    outbox.close();
    assert_eq!(outbox.push(&publication("c", 2, "2")), Push::Refused);
    assert_eq!(outbox.drain_into(&mut Vec::new()), Drained::Closed);
}

#[test]
fn a_queue_holding_more_than_one_take_is_written_at_once() {
    let one = publication("c", 1, "\"12345\"").size();
    let outbox = Outbox::new(QueueLimits {
        messages: 1000,
        bytes: 1 << 20,
        take: 2 * one,
    });
    outbox.push(&publication("c", 1, "\"12345\""));
    outbox.push(&publication("c", 2, "\"12345\""));
    assert!(!outbox.is_urgent(), "one take's worth waits for the window");
    outbox.push(&publication("c", 3, "\"12345\""));
    assert!(outbox.is_urgent(), "a backlog is written at once");
    let mut batch = Vec::new();
    outbox.drain_into(&mut batch);
    assert_eq!(batch.len(), 2);
    assert!(!outbox.is_urgent(), "what is left fits one take");
}

/// Whether a wake-up is pending, without waiting for one.
fn woken(outbox: &Outbox) -> bool {
    use std::future::Future;
    let wait = outbox.ready();
    let mut wait = std::pin::pin!(wait);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    wait.as_mut().poll(&mut cx).is_ready()
}

#[test]
fn pushes_wake_the_session_when_its_queue_starts_and_when_it_is_half_full() {
    let outbox = Outbox::new(QueueLimits {
        messages: 6,
        bytes: 1 << 20,
        take: usize::MAX,
    });
    let wakes: Vec<(bool, bool)> = (1..=6)
        .map(|n| {
            outbox.push(&publication("c", n, "x"));
            (woken(&outbox), outbox.is_urgent())
        })
        .collect();
    // The first push, then the fourth (past half of 6); none between.
    // From the fourth on, the queue stays urgent, woken or not.
    assert_eq!(
        wakes,
        [
            (true, false),
            (false, false),
            (false, false),
            (true, true),
            (false, true),
            (false, true)
        ]
    );
    let mut batch = Vec::new();
    outbox.drain_into(&mut batch);
    assert!(!outbox.is_urgent(), "drained");

    let big = "y".repeat(400);
    let small_size = publication("c", 1, "x").size();
    let big_size = publication("c", 2, &big).size();
    // Half the bound lies between one small and one big publication,
    // and one small and two big ones.
    let outbox = Outbox::new(QueueLimits {
        messages: 1000,
        bytes: 2 * (small_size + big_size) + big_size,
        take: usize::MAX,
    });
    outbox.push(&publication("c", 1, "x"));
    assert!(woken(&outbox));
    outbox.push(&publication("c", 2, &big));
    assert!(!woken(&outbox), "under half the bytes");
    outbox.push(&publication("c", 3, &big));
    assert!(woken(&outbox), "past half the bytes");
}

type LaneTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs `body` on a new thread that serves lane 0 of `hub`, inside a
/// current-thread runtime; the lane's fan-out task is spawned only when
/// `body` awaits, so what `body` does before that is seen before it.
fn on_lane<T: Send + 'static>(
    hub: &Arc<Hub>,
    body: impl FnOnce(LaneTask) -> Pin<Box<dyn Future<Output = T>>> + Send + 'static,
) -> T {
    let hub = hub.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let lane = Box::pin(hub.serve_lane(0));
        runtime.block_on(body(lane))
    })
    .join()
    .unwrap()
}

/// From a thread outside any lane.
fn deliver_from_outside(hub: &Arc<Hub>, publication: Arc<Publication>) -> usize {
    let hub = hub.clone();
    std::thread::spawn(move || hub.deliver(&publication))
        .join()
        .unwrap()
}

async fn drained(outbox: &Outbox) -> Vec<u64> {
    tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
        .await
        .expect("the lane fills the outbox");
    let mut batch = Vec::new();
    assert_eq!(outbox.drain_into(&mut batch), Drained::Open);
    batch.iter().map(|p| p.offset()).collect()
}

#[test]
fn a_lane_fills_its_sessions_outboxes_in_order_and_its_own_thread_never_overtakes_it() {
    let hub = Arc::new(Hub::with_lanes(1));
    let outside = Outbox::new(LIMITS);
    let chat = ChannelName::parse("chat").unwrap();
    hub.subscribe(&chat, &outside);
    let hub2 = hub.clone();
    let lane_offsets = on_lane(&hub, move |lane| {
        Box::pin(async move {
            let hub = hub2;
            let chat = ChannelName::parse("chat").unwrap();
            // Made on the lane's thread: the outbox belongs to the lane.
            let outbox = Outbox::new(LIMITS);
            hub.subscribe(&chat, &outbox);
            assert_eq!(hub.subscribers("chat"), 2);

            // From outside: queued for the lane, handed at once to the
            // session outside any lane.
            assert_eq!(deliver_from_outside(&hub, publication("chat", 1, "1")), 1);
            assert!(outbox.is_empty(), "the lane has not run yet");
            // On the lane's own thread while the lane still holds
            // offset 1: queued behind it, not handed over first.
            assert_eq!(hub.deliver(&publication("chat", 2, "2")), 1);
            assert!(outbox.is_empty());

            tokio::spawn(lane);
            let first = drained(&outbox).await;
            // Nothing waits in the lane now: its own thread hands
            // publications over at once.
            assert_eq!(hub.deliver(&publication("chat", 3, "3")), 2);
            let mut batch = Vec::new();
            outbox.drain_into(&mut batch);
            (first, batch.iter().map(|p| p.offset()).collect::<Vec<_>>())
        })
    });
    assert_eq!(lane_offsets, (vec![1, 2], vec![3]));
    let mut batch = Vec::new();
    outside.drain_into(&mut batch);
    let offsets: Vec<u64> = batch.iter().map(|p| p.offset()).collect();
    assert_eq!(offsets, [1, 2, 3]);
    assert_eq!(hub.delivered_total(), 6);
}

#[test]
fn a_lane_whose_queue_fills_cuts_off_every_session_on_it() {
    let hub = Arc::new(Hub::with_lanes(1));
    let outside = Outbox::new(QueueLimits {
        messages: LANE_QUEUE_MAX + 10,
        bytes: usize::MAX,
        take: usize::MAX,
    });
    let chat = ChannelName::parse("chat").unwrap();
    hub.subscribe(&chat, &outside);
    let hub2 = hub.clone();
    let lane_sessions_lagged = on_lane(&hub, move |lane| {
        Box::pin(async move {
            let hub = hub2;
            let roomy = QueueLimits {
                messages: LANE_QUEUE_MAX + 10,
                bytes: usize::MAX,
                take: usize::MAX,
            };
            let chat = ChannelName::parse("chat").unwrap();
            let other = ChannelName::parse("other").unwrap();
            let (a, b) = (Outbox::new(roomy), Outbox::new(roomy));
            hub.subscribe(&chat, &a);
            hub.subscribe(&other, &b);
            let one = publication("chat", 1, "1");
            let sender = hub.clone();
            std::thread::spawn(move || {
                for _ in 0..=LANE_QUEUE_MAX {
                    sender.deliver(&one);
                }
            })
            .join()
            .unwrap();
            tokio::spawn(lane);
            for outbox in [&a, &b] {
                tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
                    .await
                    .expect("woken");
            }
            [a.is_lagging(), b.is_lagging()]
        })
    });
    // Both of the lane's sessions, even the one on another channel; the
    // session outside the lane kept everything.
    assert_eq!(lane_sessions_lagged, [true, true]);
    assert!(!outside.is_lagging());
    assert_eq!(outside.len(), LANE_QUEUE_MAX + 1);
    assert_eq!(hub.lagged_total(), 2);
}

/// A burst queued for a lane is larger than a session's queue: the lane
/// lets the session (on the same thread) drain past half full rather
/// than filling its queue in one go and cutting it off. What the thread
/// publishes meanwhile waits behind the rest of the burst.
#[test]
fn a_lane_lets_its_sessions_drain_during_a_burst_larger_than_their_queues() {
    let hub = Arc::new(Hub::with_lanes(1));
    let hub2 = hub.clone();
    let (offsets, lagging) = on_lane(&hub, move |lane| {
        Box::pin(async move {
            let hub = hub2;
            let small = QueueLimits {
                messages: 4,
                bytes: usize::MAX,
                take: usize::MAX,
            };
            let outbox = Outbox::new(small);
            hub.subscribe(&ChannelName::parse("chat").unwrap(), &outbox);
            let sender = hub.clone();
            std::thread::spawn(move || {
                for offset in 1..=12 {
                    sender.deliver(&publication("chat", offset, "x"));
                }
            })
            .join()
            .unwrap();
            tokio::spawn(lane);
            let mut offsets = Vec::new();
            while offsets.len() < 13 {
                tokio::time::timeout(std::time::Duration::from_secs(5), outbox.ready())
                    .await
                    .expect("the lane fills the outbox");
                let mut batch = Vec::new();
                if outbox.drain_into(&mut batch) != Drained::Open {
                    break;
                }
                if offsets.is_empty() {
                    // Mid-burst, from the lane's own thread.
                    hub.deliver(&publication("chat", 13, "x"));
                }
                offsets.extend(batch.iter().map(|p| p.offset()));
            }
            (offsets, outbox.is_lagging())
        })
    });
    assert!(!lagging, "cut off after {offsets:?}");
    assert_eq!(offsets, (1..=13).collect::<Vec<_>>());
    assert_eq!(hub.lagged_total(), 0);
}

#[test]
fn outboxes_of_another_hubs_lane_are_handed_publications_directly() {
    let theirs = Arc::new(Hub::with_lanes(1));
    let ours = Arc::new(Hub::with_lanes(1));
    let ours2 = ours.clone();
    let delivered = on_lane(&theirs, move |_lane| {
        Box::pin(async move {
            let outbox = Outbox::new(LIMITS);
            ours2.subscribe(&ChannelName::parse("chat").unwrap(), &outbox);
            let delivered = ours2.deliver(&publication("chat", 1, "1"));
            (delivered, outbox.len())
        })
    });
    assert_eq!(delivered, (1, 1));
}

/// Polls a lane's fan-out task once, outside any runtime: it hands over
/// one batch, or the part of one before a session it urged.
fn step(lane: &mut LaneTask) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _ = lane.as_mut().poll(&mut cx);
}

/// Runs `f` as a thread outside any lane would.
fn outside<T>(f: impl FnOnce() -> T) -> T {
    let home = LANE.replace(None);
    let out = f();
    LANE.set(home);
    out
}

fn offsets(outbox: &Outbox) -> Vec<(String, u64)> {
    let mut batch = Vec::new();
    outbox.drain_into(&mut batch);
    batch
        .iter()
        .map(|p| (p.channel().to_string(), p.offset()))
        .collect()
}

/// What the chaos test caught: an engine's reset, handed to the hub
/// while a session was getting ready, still waited in the session's
/// lane when the session discarded its channel and read history; the
/// lane then handed it over after the read, moving the session back.
#[test]
fn a_discard_drops_what_the_sessions_lane_still_holds_for_that_channel_only() {
    std::thread::spawn(|| {
        let hub = Arc::new(Hub::with_lanes(1));
        let mut lane: LaneTask = Box::pin(hub.clone().serve_lane(0));
        let chat = ChannelName::parse("chat").unwrap();
        let other = ChannelName::parse("other").unwrap();
        let roomy = QueueLimits {
            messages: 100,
            bytes: 1 << 20,
            take: usize::MAX,
        };
        let (session, neighbour) = (Outbox::new(roomy), Outbox::new(roomy));
        for outbox in [&session, &neighbour] {
            hub.subscribe(&chat, outbox);
            hub.subscribe(&other, outbox);
        }
        let stale = Arc::new(Publication::reset_marker(
            chat.clone(),
            Position::new(Epoch::parse("phantom").unwrap(), 0),
        ));
        outside(|| {
            hub.deliver(&stale);
            hub.deliver(&publication("other", 1, "1"));
            hub.deliver(&publication("chat", 7, "7"));
        });
        hub.discard(&chat, &session);
        outside(|| hub.deliver(&publication("chat", 8, "8")));
        step(&mut lane);
        let c = |offset| ("chat".to_owned(), offset);
        let o = |offset| ("other".to_owned(), offset);
        assert_eq!(offsets(&session), [o(1), c(8)]);
        assert_eq!(offsets(&neighbour), [c(0), o(1), c(7), c(8)]);
        assert!(
            session.state.lock().unwrap().fences.is_none(),
            "the lane is past the fence: it is gone"
        );
        // Later ones come through, from either side of the lane.
        outside(|| hub.deliver(&publication("chat", 9, "9")));
        step(&mut lane);
        hub.deliver(&publication("chat", 10, "10"));
        assert_eq!(offsets(&session), [c(9), c(10)]);
    })
    .join()
    .unwrap();
}

/// The lane paused in a burst with the rest of it in hand (a session
/// past half full runs first): a session that discards then drops that
/// rest too, and a neighbour still gets all of it.
#[test]
fn a_discard_drops_what_a_paused_lane_holds_in_hand() {
    std::thread::spawn(|| {
        let hub = Arc::new(Hub::with_lanes(1));
        let mut lane: LaneTask = Box::pin(hub.clone().serve_lane(0));
        let chat = ChannelName::parse("chat").unwrap();
        let small = QueueLimits {
            messages: 4,
            bytes: 1 << 20,
            take: usize::MAX,
        };
        let (session, neighbour) = (Outbox::new(small), Outbox::new(small));
        hub.subscribe(&chat, &session);
        hub.subscribe(&chat, &neighbour);
        outside(|| {
            for offset in 1..=6 {
                hub.deliver(&publication("chat", offset, "x"));
            }
        });
        step(&mut lane);
        // Urged at the third: the lane paused with 4-6 in hand.
        assert_eq!(session.len(), 3);
        assert!(!hub.lanes[0].is_idle(), "paused");
        let mut early = offsets(&neighbour);
        hub.discard(&chat, &session);
        step(&mut lane);
        step(&mut lane);
        assert!(
            offsets(&session).is_empty(),
            "1-6 were handed before the discard"
        );
        early.extend(offsets(&neighbour));
        let early: Vec<u64> = early.iter().map(|(_, offset)| *offset).collect();
        assert_eq!(early, [1, 2, 3, 4, 5, 6]);
    })
    .join()
    .unwrap();
}

#[derive(Debug, Clone)]
enum LaneOp {
    /// Hands the hub a publication on channel 0 or 1, from outside any
    /// lane or from the lane's own thread.
    Deliver { channel: usize, outside: bool },
    /// Session 0 or 1 (on the lane) or 2 (outside any lane) discards a
    /// channel.
    Discard { session: usize, channel: usize },
    /// The lane's task runs once.
    Step,
    /// A session drains its outbox.
    Drain { session: usize },
}

fn lane_op() -> impl proptest::strategy::Strategy<Value = LaneOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..2usize, any::<bool>())
            .prop_map(|(channel, outside)| LaneOp::Deliver { channel, outside }),
        2 => (0..3usize, 0..2usize)
            .prop_map(|(session, channel)| LaneOp::Discard { session, channel }),
        2 => Just(LaneOp::Step),
        2 => (0..3usize).prop_map(|session| LaneOp::Drain { session }),
    ]
}

proptest::proptest! {
    /// Whatever the interleaving of deliveries (from outside the lane or
    /// on its thread), lane steps, drains and discards, each session
    /// gets the publications of its channels in the order the hub was
    /// handed them, none twice; none handed before one of its discards
    /// of that channel after that discard; and, once the lane is idle,
    /// every one handed after its last discard of that channel.
    #[test]
    fn discards_fence_exactly_what_came_before_them(
        ops in proptest::collection::vec(lane_op(), 1..80),
    ) {
        let failure = std::thread::spawn(move || check_lane_ops(&ops)).join().unwrap();
        proptest::prop_assert!(failure.is_none(), "{}", failure.unwrap_or_default());
    }
}

/// Runs `ops` and returns what went wrong, if anything.
fn check_lane_ops(ops: &[LaneOp]) -> Option<String> {
    let hub = Arc::new(Hub::with_lanes(1));
    let mut lane: LaneTask = Box::pin(hub.clone().serve_lane(0));
    let channels = [
        ChannelName::parse("a").unwrap(),
        ChannelName::parse("b").unwrap(),
    ];
    let roomy = QueueLimits {
        messages: 1000,
        bytes: 1 << 24,
        take: usize::MAX,
    };
    let sessions = [
        Outbox::new(roomy),
        Outbox::new(roomy),
        outside(|| Outbox::new(roomy)),
    ];
    for outbox in &sessions {
        for channel in &channels {
            hub.subscribe(channel, outbox);
        }
    }
    // Times: each op is one tick. Handed: (tick, channel) by offset
    // (offsets are unique across channels). Discards: by session,
    // (tick, channel). Received: by session, (offset, tick drained).
    let mut handed: Vec<(usize, usize)> = Vec::new();
    let mut discards: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 3];
    let mut received: Vec<Vec<(u64, usize)>> = vec![Vec::new(); 3];
    let drain = |session: usize, tick: usize, received: &mut Vec<Vec<(u64, usize)>>| {
        let mut batch = Vec::new();
        sessions[session].drain_into(&mut batch);
        received[session].extend(batch.iter().map(|p| (p.offset(), tick)));
    };
    let mut tick = 0;
    for op in ops {
        tick += 1;
        match *op {
            LaneOp::Deliver {
                channel,
                outside: away,
            } => {
                handed.push((tick, channel));
                let offset = handed.len() as u64;
                let name = channels[channel].as_str();
                let publication = publication(name, offset, "x");
                if away {
                    outside(|| hub.deliver(&publication));
                } else {
                    hub.deliver(&publication);
                }
            }
            LaneOp::Discard { session, channel } => {
                hub.discard(&channels[channel], &sessions[session]);
                discards[session].push((tick, channel));
            }
            LaneOp::Step => step(&mut lane),
            LaneOp::Drain { session } => drain(session, tick, &mut received),
        }
    }
    for _ in 0..=ops.len() {
        step(&mut lane);
    }
    tick += 1;
    for session in 0..3 {
        drain(session, tick, &mut received);
    }
    for (session, got) in received.iter().enumerate() {
        let offsets: Vec<u64> = got.iter().map(|(offset, _)| *offset).collect();
        if offsets.windows(2).any(|w| w[0] >= w[1]) {
            return Some(format!(
                "session {session}: out of order or twice: {offsets:?}"
            ));
        }
        let fenced = |offset: u64, at: usize| {
            let (handed_at, channel) = handed[offset as usize - 1];
            discards[session]
                .iter()
                .any(|&(d, c)| c == channel && handed_at < d && d <= at)
        };
        for &(offset, drained_at) in got {
            if fenced(offset, drained_at) {
                return Some(format!(
                    "session {session}: got {offset} after a discard of its channel that came later than it"
                ));
            }
        }
        for offset in 1..=handed.len() as u64 {
            if !fenced(offset, tick) && !offsets.contains(&offset) {
                return Some(format!(
                    "session {session}: never got {offset}, handed after its last discard; got {offsets:?}"
                ));
            }
        }
    }
    None
}

proptest::proptest! {
    /// A capped take, whatever the sizes, the budget and how pushes and
    /// takes interleave: publications come out whole, once, in order; each
    /// take holds at most the budget, or one publication; what is left
    /// stays counted (the byte bound cuts the session off exactly when the
    /// publications still queued pass it), and the session is woken while
    /// anything is left.
    #[test]
    fn a_capped_take_keeps_order_and_leaves_the_rest_counted(
        steps in proptest::collection::vec((0usize..300, proptest::bool::ANY), 1..200),
        budget in 1usize..2_000,
        bound in 500usize..5_000,
    ) {
        let outbox = Outbox::new(QueueLimits { messages: usize::MAX, bytes: bound, take: budget });
        let mut queued: VecDeque<Arc<Publication>> = VecDeque::new();
        let mut taken = Vec::new();
        let mut offset = 0;
        for (size, take) in steps {
            if take {
                let mut batch = Vec::new();
                proptest::prop_assert_eq!(outbox.drain_into(&mut batch), Drained::Open);
                let bytes: usize = batch.iter().map(|p| p.size()).sum();
                proptest::prop_assert!(batch.len() <= 1 || bytes <= budget, "{} bytes over {}", bytes, budget);
                proptest::prop_assert_eq!(batch.is_empty(), queued.is_empty());
                for publication in batch {
                    proptest::prop_assert!(Arc::ptr_eq(&publication, &queued.pop_front().unwrap()));
                    taken.push(publication.offset());
                }
                if !queued.is_empty() {
                    proptest::prop_assert!(woken(&outbox), "something is left, and nobody was woken");
                }
            } else {
                offset += 1;
                let publication = publication("c", offset, &format!("\"{}\"", "x".repeat(size)));
                let held: usize = queued.iter().map(|p| p.size()).sum();
                let push = outbox.push(&publication);
                if held + publication.size() > bound {
                    proptest::prop_assert_eq!(push, Push::Overflowed);
                    break;
                }
                proptest::prop_assert_ne!(push, Push::Overflowed);
                queued.push_back(publication);
            }
        }
        proptest::prop_assert!(taken.windows(2).all(|w| w[0] + 1 == w[1]));
    }
}
