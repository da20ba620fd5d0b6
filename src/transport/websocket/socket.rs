//! A WebSocket over a connection's socket: tungstenite's protocol state
//! (`WebSocketContext`), driven straight from the task that polls it.
//!
//! tungstenite speaks through blocking `Read`/`Write`; [`Socket`] lends it
//! the socket together with the polling task's `Context` for the length of
//! each call, so a read or write that would block registers that task's
//! waker with the socket and comes back as `WouldBlock`, which is
//! `Pending`. One task owns a connection and polls every read and write of
//! it, so its waker is the only one there is: nothing is kept between calls
//! to forward wake-ups (an adapter that keeps wakers costs two `Arc`s per
//! connection). As a `Stream` and a `Sink` it behaves as tokio-tungstenite's
//! `WebSocketStream` does: a read that fails ends the stream, a queued write
//! that would block is flushed by the next `poll_ready`, and
//! `ConnectionClosed` after a flush is no error.
//!
//! Idle, a connection holds no read buffer: tungstenite's frame codec starts
//! empty and grows only to the frame it is reading, and the bytes one read
//! takes beyond what tungstenite asked for ([`Reads`]) are kept only until
//! they are asked for.

// tungstenite's calls return its own error, 136 bytes, which the `Stream` and
// `Sink` here pass on as tokio-tungstenite's do.
#![allow(clippy::result_large_err)]

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tokio_tungstenite::tungstenite::{Error, Message};

use super::inflating::Inflating;
use crate::detach::Detached;

/// Reads take at most this much from the socket on the stack when
/// tungstenite asks for less (`realtime.websocket.read_buffer_size` above
/// it is read in steps of this size).
const STACK_READ: usize = 4096;

/// A server-side WebSocket on a socket; see the module's doc.
pub(in crate::transport) struct Socket {
    io: Inflating<Reads>,
    ws: WebSocketContext,
    /// A read failed or the connection closed: the stream is over.
    ended: bool,
    /// No write waits to be flushed for `poll_ready`.
    ready: bool,
    /// `poll_close` has queued the Close frame.
    closing: bool,
}

impl Socket {
    /// The WebSocket on `socket`, whose first bytes are `ahead` (read from
    /// it before the socket came here); `config`'s `read_buffer_size` is
    /// what one read takes from the socket.
    pub fn new(socket: Detached, ahead: Bytes, config: WebSocketConfig, deflate: bool) -> Socket {
        let reads = Reads {
            wire: socket,
            ahead: (!ahead.is_empty()).then(|| Box::new(ahead)),
            chunk: config.read_buffer_size.clamp(1, STACK_READ),
        };
        let io = if deflate {
            Inflating::deflate(reads, config.max_message_size.unwrap_or(usize::MAX))
        } else {
            Inflating::plain(reads)
        };
        // The codec's own read buffer starts empty and grows to the frame
        // being read: an idle connection holds none.
        let config = config.read_buffer_size(0);
        Socket {
            io,
            ws: WebSocketContext::new(Role::Server, Some(config)),
            ended: false,
            ready: true,
            closing: false,
        }
    }

    /// The connection's byte stream under the WebSocket (for the TCP
    /// close, once the closing handshake is done).
    pub fn get_mut(&mut self) -> &mut (impl AsyncRead + AsyncWrite + Unpin) {
        &mut self.io
    }

    /// Runs `call` on tungstenite with the socket lent as blocking IO that
    /// answers `WouldBlock` where the socket is not ready; `Pending` then.
    fn with<R>(
        &mut self,
        cx: &mut Context<'_>,
        call: impl FnOnce(&mut WebSocketContext, &mut Lent<'_, '_>) -> Result<R, Error>,
    ) -> Poll<Result<R, Error>> {
        let mut lent = Lent {
            io: &mut self.io,
            cx,
        };
        match call(&mut self.ws, &mut lent) {
            Err(Error::Io(err)) if err.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            other => Poll::Ready(other),
        }
    }
}

impl Stream for Socket {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match ready!(this.with(cx, |ws, io| ws.read(io))) {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(err) => {
                this.ended = true;
                match err {
                    Error::AlreadyClosed | Error::ConnectionClosed => Poll::Ready(None),
                    err => Poll::Ready(Some(Err(err))),
                }
            }
        }
    }
}

impl Sink<Message> for Socket {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.ready {
            return Poll::Ready(Ok(()));
        }
        let flushed = ready!(this.with(cx, |ws, io| ws.flush(io)));
        this.ready = true;
        Poll::Ready(flushed)
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
        let this = self.get_mut();
        // No task to wake here: a write that would block leaves the message
        // queued, and `poll_ready` (which every send calls next) flushes it
        // with the polling task's waker.
        let mut cx = Context::from_waker(Waker::noop());
        match this.with(&mut cx, |ws, io| ws.write(io, message)) {
            Poll::Ready(Ok(())) => {
                this.ready = true;
                Ok(())
            }
            Poll::Pending => {
                this.ready = false;
                Ok(())
            }
            Poll::Ready(Err(err)) => {
                this.ready = true;
                Err(err)
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        let flushed = ready!(this.with(cx, |ws, io| ws.flush(io)));
        this.ready = true;
        // The closing handshake has just completed: flushed, not failed.
        Poll::Ready(match flushed {
            Err(Error::ConnectionClosed) => Ok(()),
            other => other,
        })
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        this.ready = true;
        let closing = this.closing;
        let closed = this.with(cx, |ws, io| {
            if closing {
                ws.flush(io)
            } else {
                ws.close(io, None)
            }
        });
        match closed {
            Poll::Ready(Ok(()) | Err(Error::ConnectionClosed)) => Poll::Ready(Ok(())),
            Poll::Pending => {
                this.closing = true;
                Poll::Pending
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
        }
    }
}

/// The socket lent to tungstenite for one call, with the polling task's
/// context.
struct Lent<'a, 'b> {
    io: &'a mut Inflating<Reads>,
    cx: &'a mut Context<'b>,
}

fn would_block<T>(poll: Poll<io::Result<T>>) -> io::Result<T> {
    match poll {
        Poll::Ready(result) => result,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Read for Lent<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut buf = ReadBuf::new(buf);
        would_block(Pin::new(&mut *self.io).poll_read(self.cx, &mut buf))?;
        Ok(buf.filled().len())
    }
}

impl Write for Lent<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        would_block(Pin::new(&mut *self.io).poll_write(self.cx, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        would_block(Pin::new(&mut *self.io).poll_flush(self.cx))
    }
}

/// The socket's reads as tungstenite makes them. tungstenite asks for what
/// its frame codec has room for, which starts small (a frame header's few
/// bytes); one read from the socket takes at least `chunk` bytes, and what
/// tungstenite did not ask for is kept in `ahead` only until it does.
struct Reads {
    wire: Detached,
    /// Read from the socket and not yet asked for (never empty).
    ahead: Option<Box<Bytes>>,
    /// How much one read from the socket takes at least (at most
    /// [`STACK_READ`]).
    chunk: usize,
}

impl AsyncRead for Reads {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(ahead) = &mut this.ahead {
            let n = ahead.len().min(buf.remaining());
            buf.put_slice(&ahead[..n]);
            ahead.advance(n);
            if ahead.is_empty() {
                this.ahead = None;
            }
            return Poll::Ready(Ok(()));
        }
        let io = Pin::new(&mut *this.wire.io);
        if buf.remaining() >= this.chunk {
            return io.poll_read(cx, buf);
        }
        let mut space = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut read = ReadBuf::uninit(&mut space[..this.chunk]);
        ready!(io.poll_read(cx, &mut read))?;
        let read = read.filled();
        let n = read.len().min(buf.remaining());
        buf.put_slice(&read[..n]);
        if n < read.len() {
            this.ahead = Some(Box::new(Bytes::copy_from_slice(&read[n..])));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Reads {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().wire.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().wire.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.wire.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().wire.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().wire.io).poll_shutdown(cx)
    }
}
