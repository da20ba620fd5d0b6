//! Taking a connection's socket back from hyper after a response head.
//!
//! An SSE stream is one long response. Left inside hyper's HTTP/1
//! connection, it keeps hyper's read and write buffers (about 24 KiB) for
//! its whole life, several times what the stream itself needs. [`Detachable`]
//! wraps a connection's IO below hyper: a handler that wants the socket asks
//! through the request's [`DetachHandle`], answers hyper with a throwaway
//! `Connection: close` response, and gets the socket when hyper goes to write
//! that response's head. From then on hyper sees a connection that swallows
//! its writes and reads as closed, so it finishes and frees its buffers,
//! while the handler's task owns the socket and writes the response itself.
//!
//! A WebSocket leaves hyper by an upgrade instead, with hyper's 101 and
//! whatever the client sent behind its handshake; [`Reclaim`] then takes the
//! socket out of the wrappers it went through inside hyper, so the
//! connection holds the socket alone.
//!
//! The wrapper also carries the connection's slot of `limits.max_connections`
//! (the file budget), so the slot is held for exactly as long as the socket
//! is open: inside hyper, after a WebSocket upgrade, or after a detach.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

/// A socket taken out of hyper: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A connection's socket and its slot, after a detach or a reclaim.
pub struct Detached {
    pub io: Box<dyn Io>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Detached {
    /// A socket whose slot, if any, stays with it inside `io` (an upgraded
    /// connection hyper's wrapping still holds).
    pub fn unslotted(io: Box<dyn Io>) -> Detached {
        Detached { io, _slot: None }
    }
}

/// Takes an upgraded HTTP/1 connection's socket back out of what hyper and
/// the server wrapped it in: the socket with its slot, and the bytes hyper
/// had read past the handshake. The server puts one in each realtime
/// request's extensions, as only it knows the socket's type; an upgrade of
/// any other type comes back unchanged.
#[derive(Clone, Copy)]
pub struct Reclaim(
    pub fn(hyper::upgrade::Upgraded) -> Result<(Detached, bytes::Bytes), hyper::upgrade::Upgraded>,
);

/// Shared by the wrapper and the requests of its connection.
#[derive(Default)]
struct Shared {
    /// Everything hyper has written has been flushed (nothing of an earlier
    /// response waits in hyper's buffer): a detach now loses nothing.
    clean: AtomicBool,
    /// A handler asked for the socket; set together with `sender`.
    requested: AtomicBool,
    sender: Mutex<Option<oneshot::Sender<Detached>>>,
}

/// Put into an HTTP/1 realtime request's extensions: lets its handler take the
/// connection's socket.
#[derive(Clone)]
pub struct DetachHandle(Arc<Shared>);

impl DetachHandle {
    /// Asks for the socket, handed over when hyper writes this request's
    /// response (whose bytes are then dropped: the handler writes its own).
    /// `None` when hyper may still hold unsent bytes of an earlier response,
    /// or the socket was already asked for; the caller then answers through
    /// hyper as usual.
    pub fn request(&self) -> Option<oneshot::Receiver<Detached>> {
        if !self.0.clean.load(Ordering::Acquire) {
            return None;
        }
        let mut sender = self.0.sender.lock().expect("detach lock");
        if self.0.requested.load(Ordering::Relaxed) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        *sender = Some(tx);
        self.0.requested.store(true, Ordering::Release);
        Some(rx)
    }
}

/// A connection's IO as hyper sees it; see the module's doc.
pub struct Detachable<I> {
    /// `None` once handed over.
    io: Option<I>,
    slot: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl<I: Io> Detachable<I> {
    pub fn new(io: I, slot: OwnedSemaphorePermit) -> (Self, DetachHandle) {
        let shared = Arc::new(Shared {
            clean: AtomicBool::new(true),
            ..Shared::default()
        });
        let handle = DetachHandle(shared.clone());
        let io = Detachable {
            io: Some(io),
            slot: Some(slot),
            shared,
        };
        (io, handle)
    }

    /// The socket and its slot, out of the wrapper (which itself, should the
    /// socket have gone to a detach, is what is left).
    pub fn into_detached(mut self) -> Detached {
        match self.io.take() {
            Some(io) => Detached {
                io: Box::new(io),
                _slot: self.slot.take(),
            },
            None => Detached::unslotted(Box::new(self)),
        }
    }

    /// The socket, unless a handler has asked for it: then it is handed over
    /// (once) and `None` is returned.
    fn io(&mut self) -> Option<&mut I> {
        if self.io.is_some() && self.shared.requested.load(Ordering::Acquire) {
            let sender = self.shared.sender.lock().expect("detach lock").take();
            if let (Some(sender), Some(io)) = (sender, self.io.take()) {
                // A handler that gave up meanwhile drops the socket here.
                let _ = sender.send(Detached {
                    io: Box::new(io),
                    _slot: self.slot.take(),
                });
            }
        }
        self.io.as_mut()
    }

    /// Writes with `write`, after which hyper has unflushed bytes again; or,
    /// once the socket is handed over, drops what hyper writes (`dropped`
    /// bytes).
    fn write_with(
        &mut self,
        write: impl FnOnce(Pin<&mut I>) -> Poll<io::Result<usize>>,
        dropped: impl FnOnce() -> usize,
    ) -> Poll<io::Result<usize>> {
        let Some(io) = self.io() else {
            return Poll::Ready(Ok(dropped()));
        };
        let written = write(Pin::new(io));
        if self.shared.clean.load(Ordering::Relaxed) {
            self.shared.clean.store(false, Ordering::Release);
        }
        written
    }
}

impl<I> Drop for Detachable<I> {
    fn drop(&mut self) {
        // A handler still waiting for the socket learns it will not come.
        if let Ok(mut sender) = self.shared.sender.lock() {
            sender.take();
        }
    }
}

impl<I: Io> AsyncRead for Detachable<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            // Handed over: hyper reads the end of the connection.
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<I: Io> AsyncWrite for Detachable<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .write_with(|io| io.poll_write(cx, buf), || buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().write_with(
            |io| io.poll_write_vectored(cx, bufs),
            || bufs.iter().map(|b| b.len()).sum(),
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(I::is_write_vectored)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.io() {
            Some(io) => {
                let flushed = Pin::new(io).poll_flush(cx);
                if let Poll::Ready(Ok(())) = flushed {
                    this.shared.clean.store(true, Ordering::Release);
                }
                flushed
            }
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().io() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Semaphore;

    fn slot(semaphore: &Arc<Semaphore>) -> OwnedSemaphorePermit {
        semaphore.clone().try_acquire_owned().unwrap()
    }

    #[tokio::test]
    async fn the_socket_is_handed_over_at_the_next_write_with_its_slot() {
        let slots = Arc::new(Semaphore::new(1));
        let (near, mut far) = tokio::io::duplex(64);
        let (mut wrapped, handle) = Detachable::new(near, slot(&slots));

        wrapped.write_all(b"first").await.unwrap();
        wrapped.flush().await.unwrap();
        let receiver = handle.request().expect("clean after a flush");
        assert!(handle.request().is_none(), "asked once");

        // What hyper writes now is dropped; hyper then reads the end.
        wrapped.write_all(b"hyper's head").await.unwrap();
        let mut buf = [0; 8];
        assert_eq!(wrapped.read(&mut buf).await.unwrap(), 0);
        drop(wrapped);
        assert_eq!(
            slots.available_permits(),
            0,
            "the slot went with the socket"
        );

        let mut detached = receiver.await.expect("handed over");
        detached.io.write_all(b"own").await.unwrap();
        drop(detached);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"firstown",
            "hyper's bytes after the request were dropped"
        );
        assert_eq!(slots.available_permits(), 1);
    }

    #[tokio::test]
    async fn unflushed_writes_refuse_a_detach() {
        let slots = Arc::new(Semaphore::new(1));
        let (near, _far) = tokio::io::duplex(64);
        let (mut wrapped, handle) = Detachable::new(near, slot(&slots));
        wrapped.write_all(b"part of a response").await.unwrap();
        assert!(handle.request().is_none());
        wrapped.flush().await.unwrap();
        assert!(handle.request().is_some());
    }

    #[tokio::test]
    async fn a_wrapper_dropped_before_the_hand_over_tells_the_handler() {
        let slots = Arc::new(Semaphore::new(1));
        let (near, _far) = tokio::io::duplex(64);
        let (wrapped, handle) = Detachable::new(near, slot(&slots));
        let receiver = handle.request().unwrap();
        drop(wrapped);
        assert!(receiver.await.is_err());
        assert_eq!(slots.available_permits(), 1);
    }
}
