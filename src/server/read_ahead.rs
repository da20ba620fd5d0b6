//! One system call for a new connection's first bytes.
//!
//! Before hyper reads a request it reads exactly 24 bytes, enough to tell an
//! HTTP/2 preface from an HTTP/1 request line, and only then reads the rest
//! of the head into its own buffer: two `recvfrom` for a head that arrived
//! in one segment, on every new connection (each WebSocket or SSE connect).
//! [`ReadAhead`] answers that first small read from one larger read into a
//! buffer on the stack, and keeps what did not fit (the rest of the head,
//! usually a few hundred bytes) for the reads that follow. Only what was
//! read ahead is kept, and only until it has been read; after the first read
//! the wrapper passes every call straight through.
//!
//! It sits right on the socket, below everything that may take the socket
//! over (an upgrade, a detach), so bytes read ahead go wherever the socket
//! goes.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// How much the first read asks for: room for a browser's request head with
/// its cookies; a longer head is read on as usual.
const FIRST_READ: usize = 4096;

pub struct ReadAhead<I> {
    inner: I,
    state: State,
}

enum State {
    /// Nothing read yet.
    First,
    /// Read ahead and not yet asked for (never empty).
    Ahead { bytes: Box<[u8]>, at: usize },
    /// Plain pass-through.
    Through,
}

impl<I> ReadAhead<I> {
    pub fn new(inner: I) -> ReadAhead<I> {
        ReadAhead {
            inner,
            state: State::First,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ReadAhead<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Through => Pin::new(&mut this.inner).poll_read(cx, buf),
            State::Ahead { bytes, at } => {
                let n = (bytes.len() - *at).min(buf.remaining());
                buf.put_slice(&bytes[*at..*at + n]);
                *at += n;
                if *at == bytes.len() {
                    this.state = State::Through;
                }
                Poll::Ready(Ok(()))
            }
            State::First if buf.remaining() >= FIRST_READ => {
                this.state = State::Through;
                Pin::new(&mut this.inner).poll_read(cx, buf)
            }
            State::First => {
                let mut space = [MaybeUninit::<u8>::uninit(); FIRST_READ];
                let mut first = ReadBuf::uninit(&mut space);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut first))?;
                let read = first.filled();
                let n = read.len().min(buf.remaining());
                buf.put_slice(&read[..n]);
                this.state = if n < read.len() {
                    State::Ahead {
                        bytes: read[n..].into(),
                        at: 0,
                    }
                } else {
                    State::Through
                };
                Poll::Ready(Ok(()))
            }
        }
    }
}

// Writes are not this wrapper's business.
write_through!(ReadAhead);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair of real sockets: (client, server side wrapped).
    async fn pair() -> (TcpStream, ReadAhead<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, ReadAhead::new(server))
    }

    #[tokio::test]
    async fn a_small_first_read_keeps_the_rest_for_the_next_reads() {
        let (mut client, mut server) = pair().await;
        let head = b"GET /a HTTP/1.1\r\nhost: example\r\nx-long: 0123456789\r\n\r\n";
        client.write_all(head).await.unwrap();

        // On loopback the head is in the socket before write_all returns.
        let mut first = [0u8; 24];
        assert_eq!(server.read(&mut first).await.unwrap(), 24);
        assert_eq!(&first, &head[..24]);
        let State::Ahead { bytes, at } = &server.state else {
            panic!("the rest of the head was not read ahead");
        };
        assert_eq!((bytes.len(), *at), (head.len() - 24, 0));

        let mut next = [0u8; 5];
        server.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, &head[24..29]);
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest, &head[29..]);
        assert!(matches!(server.state, State::Through));
    }

    #[tokio::test]
    async fn a_large_first_read_goes_straight_through() {
        let (mut client, mut server) = pair().await;
        client.write_all(b"hello").await.unwrap();
        let mut buf = vec![0u8; FIRST_READ];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &b"hello"[..n]);
        assert!(matches!(server.state, State::Through));
    }

    #[tokio::test]
    async fn writes_and_end_of_stream_pass_through() {
        let (mut client, mut server) = pair().await;
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");

        drop(client);
        let mut first = [0u8; 24];
        assert_eq!(server.read(&mut first).await.unwrap(), 0);
        assert!(matches!(server.state, State::Through));
    }
}
