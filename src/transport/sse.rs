//! Server-Sent Events at `{prefix}/sse?channel=a&channel=b`.
//!
//! On HTTP/1 a stream leaves hyper once its head is decided
//! (`detach`, `fast_paths.sse_detach`): a task per stream writes the
//! head and then the events on the socket itself, so hyper's buffers are
//! freed. On HTTP/2, or while the connection still holds unsent bytes of an
//! earlier response, the response body is the session itself: [`SseStream`]
//! drains the outbox when hyper asks for the next frame. Each event is the
//! publication's shared `event:`/`data:` lines and this connection's
//! `id: <cursor>` line, so the only per-connection bytes are the cursor's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use super::{
    cors, jittered, open_http, parse_cursor, Admit, Obeyed, Opening, Ordered, Realtime, Session,
    Transport,
};
use crate::body::{Body, BoxError};
use crate::conn::ConnInfo;
use crate::cursor::{Cursor, Position, Start};
use crate::detach::{DetachHandle, Detached};
use crate::error::Refusal;
use crate::events::Reason;
use crate::hub::Drained;
use crate::message::{ChannelName, Publication};

pub(super) async fn handle(
    realtime: &Arc<Realtime>,
    request: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Refusal> {
    let (origin, query) = match open_http(realtime, &request, &["last_event_id"])? {
        Opening::Preflight(answer) => return answer,
        Opening::Stream(origin, query) => (origin, query),
    };
    let headers = request.headers();
    // On a reconnect the browser sends the last id as a header; it is newer
    // than anything in the URL.
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| Refusal::bad_request("bad_cursor", "Last-Event-ID is not text"))
        })
        .transpose()?
        .or(query.last_event_id.clone())
        .filter(|text| !text.is_empty());
    let resume = last_event_id.as_deref().map(parse_cursor).transpose()?;

    let admission = realtime
        .admit(Transport::Sse, &request, &query, conn)
        .await?;
    let gauge = realtime.count(Transport::Sse);
    let mut session = realtime.session(Transport::Sse, admission);

    // Subscribe to everything first; then replay, with ids that advance one
    // publication at a time, so a drop mid-replay resumes exactly.
    let mut ids = Cursor::new();
    // Channels whose gap history cannot cover, each with where it goes on
    // from, and whether the cursor could not tell which of its entries was
    // the channel's.
    let mut resets = Vec::new();
    let mut replays = Vec::new();
    let starts = resume.as_ref().map(|c| c.resolve(&query.channels));
    for (index, channel) in query.channels.iter().enumerate() {
        let from = starts.as_ref().map_or(Start::Now, |starts| starts[index]);
        let since = from.after();
        let subscribed = session.subscribe(channel.clone(), since).await?;
        // Where the client stands until anything is announced: where it
        // left off, even when that was lost (its reset moves it on).
        ids.set(channel, since.unwrap_or(subscribed.position));
        if from == Start::Lost || (since.is_some() && !subscribed.recovered) {
            resets.push((channel.clone(), subscribed.position, from == Start::Lost));
        }
        replays.push(subscribed.replay);
    }

    let retry = realtime.config().sse.retry;
    let mut stream = SseStream::new(realtime, session, gauge);
    // Every id names where the client may resume from: the opening's (so a
    // stream that drops before its first event still resumes from here),
    // then each reset's, which moves its own channel on and no channel past
    // a reset still to come, so a drop between resets has the next
    // connection announce the rest, never skip them in silence. A channel
    // the cursor could not tell apart has no place of its own to stay at:
    // those are announced first, and until they all are, the ids are the
    // client's own cursor, which still cannot tell them apart.
    resets.sort_by_key(|(_, _, untold)| !untold);
    let mut untold = resets.iter().filter(|(_, _, untold)| *untold).count();
    let held = resume.as_ref().map(|resume| resume.encode());
    let id = |ids: &Cursor, untold: usize| match &held {
        Some(held) if untold > 0 => held.clone(),
        _ if ids.is_empty() => String::new(),
        _ => ids.encode(),
    };
    stream.push_opening(&id(&ids, untold), retry);
    for (channel, position, was_untold) in resets {
        ids.set(&channel, position);
        untold -= usize::from(was_untold);
        stream.push_reset(&id(&ids, untold), &channel, position);
    }
    for publication in replays.into_iter().flatten() {
        ids.set(publication.channel(), publication.position());
        stream.push_event(&ids, &publication);
    }

    // On HTTP/1 the stream leaves hyper after its head, which frees hyper's
    // buffers for the stream's life; on HTTP/2 it stays a hyper body.
    let detach = request
        .extensions()
        .get::<DetachHandle>()
        .and_then(DetachHandle::request);
    let (mut response, detached) = match detach {
        Some(socket) => (Response::new(crate::body::empty()), Some((stream, socket))),
        None => (Response::new(http_body_util::BodyExt::boxed(stream)), None),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-transform"),
    );
    // Tells nginx and similar proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    cors(&mut response, &origin);
    if let Some((stream, socket)) = detached {
        let head = detached_head(&response);
        let write_timeout = realtime.config().sse.keepalive;
        realtime.drain.spawn(serve_detached(
            head,
            Box::pin(stream),
            socket,
            write_timeout,
        ));
        // What hyper writes of this is dropped; `close` makes it finish.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// The head a detached stream writes itself: the response's status and
/// headers, and `Connection: close`, which makes the end of the connection
/// the end of the body (no chunk framing around every event).
fn detached_head(response: &Response<Body>) -> Bytes {
    let mut head = BytesMut::with_capacity(256);
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(response.status().as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(
        response
            .status()
            .canonical_reason()
            .unwrap_or("")
            .as_bytes(),
    );
    head.put_slice(b"\r\n");
    for (name, value) in response.headers() {
        head.put_slice(name.as_str().as_bytes());
        head.put_slice(b": ");
        head.put_slice(value.as_bytes());
        head.put_slice(b"\r\n");
    }
    head.put_slice(b"connection: close\r\n\r\n");
    head.freeze()
}

/// Serves an SSE stream on a socket taken out of hyper: the head, then the
/// events as they come, every frame ready at once in one write, until the
/// stream ends or the client goes. Anything the client sends is read and
/// dropped, which is how its leaving is noticed without waiting for a write
/// to fail. The stream comes boxed: an async fn keeps its arguments twice,
/// and this task lives as long as the connection.
async fn serve_detached(
    head: Bytes,
    mut stream: Pin<Box<SseStream>>,
    socket: oneshot::Receiver<Detached>,
    write_timeout: Duration,
) {
    let Ok(mut detached) = socket.await else {
        return;
    };
    let io = &mut detached.io;
    let mut out = Frames::default();
    out.0.push_back(head);
    let mut ended = false;
    // Clients send nothing on an SSE stream; this only notices them go.
    let mut discard = [0u8; 16];
    loop {
        if out.has_remaining() {
            // Boxed while it runs: an idle stream's task holds no timer.
            // A plain `timeout`, whose timer is never filed when the write
            // completes at once (the usual case); a kept timer would be
            // filed on its way back to the thread, a wheel insertion per
            // write that cost 1.6 µs per delivery.
            let write = tokio::time::timeout(write_timeout, write_frames(io, &mut out));
            match Box::pin(write).await.ok() {
                Some(Ok(())) => {}
                Some(Err(err)) => {
                    tracing::debug!(error = %err, "SSE write failed");
                    stream.as_mut().lost();
                    return;
                }
                None => {
                    tracing::debug!(
                        "SSE client read nothing within realtime.sse.keepalive; dropped"
                    );
                    stream.as_mut().lost();
                    return;
                }
            }
            // No room is kept for an idle stream: the next batch brings
            // its own (see `Frames::gather`).
            out.0 = VecDeque::new();
        }
        if ended {
            let _ = crate::timer::within(write_timeout, io.shutdown()).await;
            return;
        }
        let frames = std::future::poll_fn(|cx| out.gather(stream.as_mut(), cx));
        tokio::select! {
            more = frames => ended = !more,
            read = io.read(&mut discard) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
        }
    }
}

/// Batches of at most this many bytes are copied into one buffer and sent
/// with one `send`; larger ones go as one `writev` of their frames.
const FLAT_MAX: usize = 16 * 1024;

thread_local! {
    /// The buffer a small batch is copied into: one per thread, so an idle
    /// stream holds none.
    static FLAT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes every frame of `out`, in order, whatever part of them each write
/// takes: the one place the stream's bytes reach the socket.
///
/// A batch of at most [`FLAT_MAX`] bytes is first tried as one `send` of a
/// contiguous copy: a delivery is two frames (the publication's shared
/// lines, the id line), and a `writev` of them costs more in the kernel than
/// copying them (about 0.3 µs a write, measured on loopback). What that
/// leaves unwritten (the socket's buffer full, or only part of the copy
/// taken) goes the vectored way, which waits for room.
async fn write_frames<W: AsyncWrite + Unpin>(io: &mut W, out: &mut Frames) -> std::io::Result<()> {
    if out.0.len() > 1 && out.remaining() <= FLAT_MAX {
        std::future::poll_fn(|cx| {
            FLAT.with_borrow_mut(|flat| {
                flat.clear();
                for frame in &out.0 {
                    flat.extend_from_slice(frame);
                }
                match Pin::new(&mut *io).poll_write(cx, flat) {
                    Poll::Ready(Ok(written)) => {
                        out.advance(written);
                        Poll::Ready(Ok(()))
                    }
                    Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                    // No room now: the vectored write below waits for it.
                    Poll::Pending => Poll::Ready(Ok(())),
                }
            })
        })
        .await?;
    }
    io.write_all_buf(out).await
}

/// Bytes waiting to be written, as one vectored write.
#[derive(Default)]
struct Frames(VecDeque<Bytes>);

impl Frames {
    /// Moves the frames the stream has ready into `self`: one take from the
    /// outbox at most (see `Outbox::drain_into`), so that what the client
    /// has not read beyond that and the socket stays in the outbox, counted.
    /// Ready once there is at least one, or the stream ended (`false`).
    fn gather(&mut self, mut stream: Pin<&mut SseStream>, cx: &mut Context<'_>) -> Poll<bool> {
        debug_assert!(
            self.0.is_empty(),
            "gathered only once the last frames are written"
        );
        match stream.as_mut().poll_frames(cx) {
            // The stream's frames as they are, room and all: between writes
            // neither side keeps any.
            Poll::Ready(Some(frames)) => {
                self.0 = frames;
                Poll::Ready(true)
            }
            Poll::Ready(None) => Poll::Ready(false),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Buf for Frames {
    fn remaining(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.0.front().map_or(&[], |b| &b[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, bytes) in dst.iter_mut().zip(&self.0) {
            *slot = std::io::IoSlice::new(bytes);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut count: usize) {
        while count > 0 {
            let front = self.0.front_mut().expect("advance within remaining");
            if count < front.len() {
                front.advance(count);
                return;
            }
            count -= front.len();
            self.0.pop_front();
        }
    }

    fn has_remaining(&self) -> bool {
        !self.0.is_empty()
    }
}

pin_project_lite::pin_project! {
    /// An SSE response body driven by its session.
    pub struct SseStream {
        ready: crate::signal::Wait,
        // Orders: the app's, and shutdown's.
        ordered: crate::signal::Wait,
        // The pace's wait (see `State::pace`).
        hold: super::Hold,
        keepalive: tokio::time::Interval,
        state: State,
    }
}

/// The stream's unpinned part.
struct State {
    session: Session,
    out: Out,
    /// While it holds a write back, the outbox is drained when `hold`
    /// fires, with everything that came meanwhile.
    pace: super::Pace,
    done: bool,
    _gauge: super::ConnectionGauge,
}

impl SseStream {
    fn new(realtime: &Arc<Realtime>, session: Session, gauge: super::ConnectionGauge) -> SseStream {
        let ready = session.outbox().ready_owned();
        let ordered = session.control().ordered_owned();
        let every = realtime.config().sse.keepalive;
        let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        SseStream {
            ready,
            ordered,
            hold: super::Hold::default(),
            keepalive,
            state: State {
                session,
                out: Out::default(),
                pace: super::Pace::new(realtime.config().coalesce_window),
                done: false,
                _gauge: gauge,
            },
        }
    }

    /// `retry:` and, unless `id` is empty, `id:` with the encoded cursor
    /// the connection starts from: a blank-data block, which sets the
    /// browser's last event id without dispatching an event.
    fn push_opening(&mut self, id: &str, retry: std::time::Duration) {
        let mut text = format!("retry: {}\n", retry.as_millis());
        if !id.is_empty() {
            text.push_str("id: ");
            text.push_str(id);
            text.push('\n');
        }
        text.push('\n');
        self.state.out.push_static(text);
    }

    fn push_event(&mut self, ids: &Cursor, publication: &Publication) {
        self.state.out.push_event(ids, publication);
    }

    /// The connection failed, or its client stopped reading.
    fn lost(self: Pin<&mut Self>) {
        self.project()
            .state
            .session
            .end_with(Reason::ConnectionLost);
    }

    /// A `pushgate.reset` event whose id is `id`, an encoded cursor.
    fn push_reset(&mut self, id: &str, channel: &ChannelName, position: Position) {
        self.state.out.push_reset_with_id(id, channel, position);
    }
}

/// What the stream has queued to send, and the buffers it writes a
/// connection's own lines with.
#[derive(Default)]
struct Out {
    frames: VecDeque<Bytes>,
    /// Whether an event was sent since the last keep-alive tick.
    active: bool,
}

/// Room for a connection's own lines, shared by the streams of one thread
/// (a stream writes its lines without yielding in between): an id line is
/// written into `bytes` and split off, so steady streaming reuses one
/// allocation, and an idle stream holds none.
#[derive(Default)]
struct Scratch {
    bytes: BytesMut,
    /// The encoded cursor.
    text: String,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

impl Out {
    fn push_static(&mut self, text: String) {
        self.frames.push_back(Bytes::from(text));
    }

    /// `publication`'s event lines, then `id: <ids>` and the blank line:
    /// shared too when `ids` holds the publication's channel alone, else
    /// written for this connection.
    fn push_event(&mut self, ids: &Cursor, publication: &Publication) {
        self.active = true;
        self.frames.push_back(publication.sse_lines().clone());
        if let Some(id) = publication.sse_sole_id(ids) {
            self.frames.push_back(id.clone());
            return;
        }
        let line = SCRATCH.with_borrow_mut(|Scratch { bytes, text }| {
            text.clear();
            ids.encode_into(text);
            bytes.reserve(text.len() + 6);
            bytes.put_slice(b"id: ");
            bytes.put_slice(text.as_bytes());
            bytes.put_slice(b"\n\n");
            bytes.split().freeze()
        });
        self.frames.push_back(line);
    }

    /// A join or leave event: no id, as it is not a position.
    fn push_presence(&mut self, publication: &Publication) {
        self.frames.push_back(publication.sse_lines().clone());
        self.frames.push_back(Bytes::from_static(b"\n"));
    }

    /// A `pushgate.reset` event, with `id: <ids>`.
    fn push_reset(&mut self, ids: &Cursor, channel: &ChannelName, position: Position) {
        self.push_reset_with_id(&ids.encode(), channel, position);
    }

    /// A `pushgate.reset` event, with `id: <id>` (an encoded cursor).
    fn push_reset_with_id(&mut self, id: &str, channel: &ChannelName, position: Position) {
        let event = format!(
            "event: pushgate.reset\ndata: {{\"channel\":\"{channel}\",\"epoch\":\"{}\",\"offset\":{}}}\nid: {id}\n\n",
            position.epoch, position.offset
        );
        self.frames.push_back(Bytes::from(event));
    }
}

impl State {
    /// Carries out the orders. SSE has no close codes: a disconnect is a
    /// `pushgate.disconnect` event, then the end of the stream; shutdown is
    /// a `retry` (come back soon, but not all at once), then the end; an
    /// unsubscribe is a `pushgate.unsubscribed` event.
    fn obey(&mut self) {
        let Obeyed { left, end } = self.session.obey();
        for channel in left {
            let data = serde_json::json!({ "channel": channel });
            self.out
                .push_static(format!("event: pushgate.unsubscribed\ndata: {data}\n\n"));
        }
        match end {
            Some(Ordered::Disconnect(code, reason)) => {
                let data = serde_json::json!({ "code": code, "reason": reason });
                self.out
                    .push_static(format!("event: pushgate.disconnect\ndata: {data}\n\n"));
                self.done = true;
            }
            Some(Ordered::Shutdown) => {
                let retry = jittered(self.session.realtime().config().sse.retry);
                self.out
                    .push_static(format!("retry: {}\n\n", retry.as_millis()));
                self.done = true;
            }
            None => {}
        }
    }

    /// Moves whatever the outbox holds into frames (the pace's write at
    /// `now`). Returns `false` when the stream must end (the session lagged
    /// or was closed).
    fn take_outbox(&mut self, now: tokio::time::Instant) -> bool {
        let mut batch = super::take_batch();
        let drained = self.session.outbox().drain_into(&mut batch);
        let open = match drained {
            Drained::Lagging => {
                tracing::info!(
                    "slow consumer: SSE stream ended; the client resumes from its last id"
                );
                self.session.end_with(Reason::SlowConsumer);
                self.out
                    .push_static(": slow consumer; reconnect to resume\n\n".into());
                false
            }
            Drained::Closed => false,
            Drained::Open => true,
        };
        if open {
            if let Some(oldest) = batch.first() {
                self.session.delivered(oldest);
            }
            for publication in batch.drain(..) {
                let verdict = self.session.admit(&publication);
                if verdict == Admit::Skip {
                    continue;
                }
                if verdict == Admit::Event {
                    self.out.push_presence(&publication);
                    continue;
                }
                if let Admit::Reset(position) = verdict {
                    // The cursor already stands at the reset.
                    let ids = self.session.cursor();
                    self.out.push_reset(ids, publication.channel(), position);
                    continue;
                }
                if let Admit::ResetThenDeliver(position) = verdict {
                    // The reset's id stands at the reset, not past the
                    // publication that follows it: a drop between the two
                    // must not skip that publication. Rare, so a copy.
                    let mut at_reset = self.session.cursor().clone();
                    at_reset.set(publication.channel(), position);
                    self.out
                        .push_reset(&at_reset, publication.channel(), position);
                }
                self.out.push_event(self.session.cursor(), &publication);
            }
        }
        super::give_batch(batch);
        if !self.out.frames.is_empty() {
            self.pace.wrote(now);
        }
        open
    }
}

impl http_body::Body for SseStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.as_mut().poll_ready(cx) {
            Poll::Ready(true) => {
                let frame = self.project().state.out.frames.pop_front();
                Poll::Ready(frame.map(|bytes| Ok(Frame::data(bytes))))
            }
            Poll::Ready(false) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl SseStream {
    /// Every frame ready now, at least one; `None` once the stream ended.
    fn poll_frames(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<VecDeque<Bytes>>> {
        self.as_mut()
            .poll_ready(cx)
            .map(|more| more.then(|| std::mem::take(&mut self.project().state.out.frames)))
    }

    /// Runs the stream until it has a frame to send (`true`) or has ended
    /// (`false`).
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let this = self.project();
        loop {
            let state = &mut *this.state;
            if !state.out.frames.is_empty() {
                return Poll::Ready(true);
            }
            if state.done {
                return Poll::Ready(false);
            }
            if Pin::new(&mut *this.ordered).poll(cx).is_ready() {
                state.obey();
                continue;
            }
            // A wake-up while holding (the outbox half full, lagging or
            // closed) writes at once.
            let woken = Pin::new(&mut *this.ready).poll(cx).is_ready();
            let held_out = state.pace.holding() && Pin::new(&mut *this.hold).poll(cx).is_ready();
            if woken || held_out {
                let now = tokio::time::Instant::now();
                match state
                    .pace
                    .on_wake(now, || state.session.outbox().is_urgent())
                {
                    Some(until) => this.hold.until(until),
                    None => {
                        this.hold.release();
                        state.done |= !state.take_outbox(now);
                    }
                }
                continue;
            }
            if this.keepalive.poll_tick(cx).is_ready() {
                if !std::mem::take(&mut state.out.active) {
                    state.out.push_static(": keepalive\n\n".into());
                }
                continue;
            }
            return Poll::Pending;
        }
    }
}

impl std::fmt::Debug for SseStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseStream").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A socket that takes at most a given number of bytes per write, and
    /// now and then has no room (and says when it has again).
    struct Trickle {
        taken: Vec<u8>,
        /// Per call, in turn: at most this many bytes, or no room at all (0).
        steps: Vec<usize>,
        calls: usize,
        vectored: bool,
    }

    impl Trickle {
        /// How much the next write may take; `None`: no room this time.
        fn room(&mut self, cx: &mut Context<'_>) -> Option<usize> {
            let step = self.steps[self.calls % self.steps.len()];
            self.calls += 1;
            if step == 0 {
                cx.waker().wake_by_ref();
                return None;
            }
            Some(step)
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let Some(room) = self.room(cx) else {
                return Poll::Pending;
            };
            let take = room.min(buf.len());
            self.taken.extend_from_slice(&buf[..take]);
            Poll::Ready(Ok(take))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let Some(mut room) = self.room(cx) else {
                return Poll::Pending;
            };
            let mut took = 0;
            for buf in bufs {
                let take = room.min(buf.len());
                self.taken.extend_from_slice(&buf[..take]);
                took += take;
                room -= take;
                if room == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(took))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The rule `write_frames` keeps: the socket gets exactly the
        /// frames, in order, whatever part of them each write takes, for
        /// batches on both sides of the one-copy bound.
        #[test]
        fn prop_frames_reach_the_socket_exactly(
            sizes in proptest::collection::vec(1usize..6_000, 0..8),
            steps in proptest::collection::vec(prop_oneof![Just(0usize), 1usize..40_000], 1..6),
            vectored in any::<bool>(),
        ) {
            // Some step must take something, or nothing could be written.
            let mut steps = steps;
            steps.push(4_096);
            let frames: Vec<Bytes> = sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| Bytes::from((0..size).map(|j| (i * 31 + j) as u8).collect::<Vec<_>>()))
                .collect();
            let expected: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
            let mut out = Frames(frames.into_iter().collect());
            let mut socket = Trickle { taken: Vec::new(), steps, calls: 0, vectored };
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(write_frames(&mut socket, &mut out)).unwrap();
            prop_assert_eq!(socket.taken, expected);
            prop_assert!(!out.has_remaining());
        }
    }
}
