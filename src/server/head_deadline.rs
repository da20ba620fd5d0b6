//! The deadline for a new connection's first request head.
//!
//! hyper's own `header_read_timeout` covers HTTP/1 heads once hyper has
//! chosen HTTP/1, and closes without a word. A slowloris client can instead
//! sit in protocol detection (sending nothing, or half an HTTP/2 preface), or
//! deserves a `408` when it did send part of a head. [`HeadDeadline`] wraps
//! the connection's IO from accept until the service sees the first request:
//! when the deadline passes first, it answers `408 Request Timeout` if the
//! client sent part of an HTTP/1 head, and then fails the read, which ends the
//! connection. Once the first request arrives the wrapper disarms and frees
//! its timer, so long-lived connections carry nothing extra.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: text/plain; charset=utf-8\r\n\
content-length: 35\r\n\
connection: close\r\n\
\r\n\
request head not received in time\r\n";

/// Shared between the IO wrapper and the connection's service.
#[derive(Default)]
pub struct HeadState {
    received: AtomicBool,
    expired: AtomicBool,
    /// Some bytes of a head had arrived when the deadline passed.
    partial: AtomicBool,
}

impl HeadState {
    /// Called by the service for each request: the head has arrived.
    pub fn received(&self) {
        self.received.store(true, Ordering::Relaxed);
    }

    /// Whether the deadline ended this connection.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// Whether the client had begun a head when the deadline passed (a slow
    /// client, rather than an unused preconnected socket).
    pub fn partial(&self) -> bool {
        self.partial.load(Ordering::Relaxed)
    }
}

pub struct HeadDeadline<I> {
    inner: I,
    state: Arc<HeadState>,
    phase: Phase,
}

enum Phase {
    /// Waiting for the first head.
    Armed {
        timer: Pin<Box<Sleep>>,
        first_bytes: Option<[u8; 3]>,
    },
    /// Deadline passed: writing the 408 (if any), then failing the read.
    Expired { reply: &'static [u8] },
    /// The first head arrived; plain pass-through.
    Disarmed,
}

impl<I> HeadDeadline<I> {
    pub fn new(inner: I, deadline: Instant) -> (Self, Arc<HeadState>) {
        let state = Arc::new(HeadState::default());
        let io = HeadDeadline {
            inner,
            state: state.clone(),
            phase: Phase::Armed {
                timer: Box::pin(tokio::time::sleep_until(deadline)),
                first_bytes: None,
            },
        };
        (io, state)
    }

    /// The connection's IO, once it has left hyper (an upgrade).
    pub fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Disarmed => return Pin::new(&mut this.inner).poll_read(cx, buf),
                Phase::Armed { timer, first_bytes } => {
                    if this.state.received.load(Ordering::Relaxed) {
                        this.phase = Phase::Disarmed;
                        continue;
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        this.state.expired.store(true, Ordering::Relaxed);
                        this.state
                            .partial
                            .store(first_bytes.is_some(), Ordering::Relaxed);
                        // HTTP/1 allows a 408 once a request has begun; an
                        // HTTP/2 client would read it as garbage, and a
                        // client that sent nothing asked nothing.
                        let reply = match first_bytes {
                            Some(prefix) if prefix != b"PRI" => REQUEST_TIMEOUT,
                            _ => b"",
                        };
                        this.phase = Phase::Expired { reply };
                        continue;
                    }
                    let before = buf.filled().len();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
                    let new = &buf.filled()[before..];
                    if first_bytes.is_none() && !new.is_empty() {
                        let mut prefix = [0; 3];
                        let n = new.len().min(3);
                        prefix[..n].copy_from_slice(&new[..n]);
                        *first_bytes = Some(prefix);
                    }
                    return Poll::Ready(Ok(()));
                }
                Phase::Expired { reply } => {
                    while !reply.is_empty() {
                        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, reply))?;
                        if n == 0 {
                            break;
                        }
                        *reply = &reply[n..];
                    }
                    ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "request head not received in time",
                    )));
                }
            }
        }
    }
}

// Writes are not this wrapper's business.
write_through!(HeadDeadline);
