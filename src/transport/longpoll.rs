//! Long-poll at `{prefix}/poll?channel=..&since=<cursor>&timeout=<s>`.
//!
//! Each request is a short session: subscribe (live first, then history from
//! the cursor), answer at once when anything is newer than the cursor, else
//! wait for the outbox up to the timeout. The answer is always
//! `{"messages": [...], "cursor": "...", "reset": [...]}`; the cursor is the
//! `since` of the next request.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{cors, open_http, parse_cursor, Admit, Opening, Realtime, Transport};
use crate::body::Body;
use crate::conn::ConnInfo;
use crate::cursor::{Position, Start};
use crate::error::{json_bytes, Refusal};
use crate::hub::Drained;
use crate::message::{ChannelName, Publication};

pub(super) async fn handle(
    realtime: &Arc<Realtime>,
    request: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Refusal> {
    let (origin, query) = match open_http(realtime, &request, &["since", "timeout"])? {
        Opening::Preflight(answer) => return answer,
        Opening::Stream(origin, query) => (origin, query),
    };
    let timeout = poll_timeout(realtime, query.timeout.as_deref())?;
    let resume = query.since.as_deref().map(parse_cursor).transpose()?;

    let admission = realtime
        .admit(Transport::Poll, &request, &query, conn)
        .await?;
    let _gauge = realtime.count(Transport::Poll);
    let mut session = realtime.session(Transport::Poll, admission);

    let mut messages: Vec<Arc<Publication>> = Vec::new();
    let mut resets: Vec<(ChannelName, Position)> = Vec::new();
    let starts = resume.map(|c| c.resolve(&query.channels));
    for (index, channel) in query.channels.iter().enumerate() {
        // A channel the cursor does not know (newly added by the client)
        // starts from now; one it cannot tell apart is reset.
        let from = starts.as_ref().map_or(Start::Now, |starts| starts[index]);
        let since = from.after();
        let subscribed = session.subscribe(channel.clone(), since).await?;
        if from == Start::Lost || (since.is_some() && !subscribed.recovered) {
            resets.push((channel.clone(), subscribed.position));
        }
        messages.extend(subscribed.replay);
    }

    if messages.is_empty() && resets.is_empty() && !timeout.is_zero() {
        let deadline = tokio::time::Instant::now() + timeout;
        let outbox = session.outbox().clone();
        let control = session.control().clone();
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                biased;
                // Shutting down: answer now, the client comes back elsewhere.
                () = realtime.drain.signalled() => break,
                // Disconnected or unsubscribed by the app: answer now; the
                // next poll is authorized afresh.
                () = control.ordered() => break,
                () = outbox.ready() => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
            if outbox.drain_all_into(&mut batch) != Drained::Open {
                // Lagging cannot happen within one short wait unless a flood
                // arrived: answer with what the cursor says; the next request
                // recovers from history.
                break;
            }
            if let Some(oldest) = batch.first() {
                realtime.gauges.delivered(oldest);
            }
            for publication in batch.drain(..) {
                match session.admit(&publication) {
                    // Join and leave events are for WebSocket and SSE,
                    // which hold the connection; a poll answer carries
                    // publications and resets only.
                    Admit::Skip | Admit::Event => {}
                    Admit::Deliver => messages.push(publication),
                    Admit::ResetThenDeliver(position) => {
                        resets.push((publication.channel().clone(), position));
                        messages.push(publication);
                    }
                    Admit::Reset(position) => {
                        resets.push((publication.channel().clone(), position));
                    }
                }
            }
            if !messages.is_empty() || !resets.is_empty() {
                break;
            }
        }
    }

    let mut response = json_bytes(
        StatusCode::OK,
        answer(&messages, &resets, &session.cursor().encode()),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    if realtime.drain.is_signalled() && request.version() < http::Version::HTTP_2 {
        // Shutting down: this answer is the connection's last. Said in the
        // answer itself, so the client polls again on a new connection (to
        // another node) instead of sending its next poll down this one,
        // which the drain closes unanswered.
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    cors(&mut response, &origin);
    Ok(response)
}

/// `timeout=` in whole seconds, capped by `realtime.poll.max_timeout`.
fn poll_timeout(realtime: &Realtime, text: Option<&str>) -> Result<Duration, Refusal> {
    let poll = &realtime.config().poll;
    let Some(text) = text else {
        return Ok(poll.default_timeout);
    };
    let seconds: u64 = text
        .parse()
        .ok()
        .filter(|_| text.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            Refusal::bad_request("bad_timeout", "`timeout` is a whole number of seconds")
        })?;
    Ok(Duration::from_secs(seconds).min(poll.max_timeout))
}

/// The answer body; envelopes are spliced in as they are, not re-encoded.
fn answer(
    messages: &[Arc<Publication>],
    resets: &[(ChannelName, Position)],
    cursor: &str,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(
        64 + cursor.len()
            + messages
                .iter()
                .map(|p| p.envelope().len() + 1)
                .sum::<usize>(),
    );
    body.extend_from_slice(b"{\"messages\":[");
    for (index, publication) in messages.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(publication.envelope());
    }
    body.extend_from_slice(b"],\"cursor\":\"");
    // Cursors are URL-safe ASCII: no JSON escaping needed.
    body.extend_from_slice(cursor.as_bytes());
    body.extend_from_slice(b"\",\"reset\":[");
    for (index, (channel, position)) in resets.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(
            serde_json::json!({
                "channel": channel,
                "epoch": position.epoch,
                "offset": position.offset,
            })
            .to_string()
            .as_bytes(),
        );
    }
    body.extend_from_slice(b"]}");
    body
}
