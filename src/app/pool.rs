//! Kept-alive connections to the app, and the one rule for reusing them.
//!
//! Every connection pushgate opens to the app (the lean client's, hyper's
//! for uploads and upgrades, the auth requests') comes from here and, when
//! its exchange ends, is either handed back through [`Pool::release`] or
//! closed. The rule that decides it lives in [`Outcome::reusable`] and
//! nowhere else.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::uri::Authority;
use thread_local::ThreadLocal;
use tokio::net::TcpStream;

/// Room made in a connection's read buffer before each read from the app.
const READ_SIZE: usize = 16 * 1024;

/// What is known about one exchange on a connection when it ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// The request was written whole as framed: its head and every body
    /// byte the head announced. Never true of an upgrade attempt, whatever
    /// the app answered: the app may have switched protocols in its own
    /// mind, and the client's next bytes were never meant as HTTP.
    pub request_whole: bool,
    /// The answer was read to the end its framing gives (a length or the
    /// last chunk; an answer that ends when the app closes never is).
    pub answer_whole: bool,
    /// Neither side asked to close: the answer is HTTP/1.1 without
    /// `Connection: close`.
    pub keep_alive: bool,
}

impl Outcome {
    /// The rule for app connections: a connection is reused only when the
    /// request was written whole as framed and the answer was read whole as
    /// framed, and neither asked to close. Any doubt, and the connection is
    /// closed: a connection whose framing the two ends might read
    /// differently would hand one user's bytes to another's request.
    pub fn reusable(&self) -> bool {
        self.request_whole && self.answer_whole && self.keep_alive
    }
}

/// One connection to the app and what has been read from it but not used.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_SIZE / 4 {
            self.buf.reserve(READ_SIZE);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.buf)
    }

    pub async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Whether the app has closed (or written out of turn on) this idle
    /// connection. Costs a system call only when the socket has news.
    fn is_spent(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Where the app is and how to reach it, with each thread's pool of idle
/// connections to it: a request is written and answered on the thread that
/// serves it, with no hand-off between threads.
pub struct Pools {
    authority: Authority,
    /// The app's address when `authority` names an IP; else resolved per
    /// connect, as the system resolver answers.
    addr: Option<SocketAddr>,
    per_thread: ThreadLocal<Arc<Pool>>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl Pools {
    pub fn new(authority: &Authority, max_idle: usize, idle_timeout: Duration) -> Pools {
        let port = authority.port_u16().unwrap_or(80);
        let addr = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .ok()
            .map(|ip| SocketAddr::new(ip, port));
        Pools {
            authority: authority.clone(),
            addr,
            per_thread: ThreadLocal::new(),
            max_idle,
            idle_timeout,
        }
    }

    /// This thread's pool.
    pub fn local(&self) -> &Arc<Pool> {
        self.per_thread.get_or(|| {
            Arc::new(Pool {
                idle: Mutex::new(Idle::default()),
                max_idle: self.max_idle,
                idle_timeout: self.idle_timeout,
            })
        })
    }

    /// A new connection to the app, never used before. A host name that
    /// does not resolve is `NotFound`, told apart from a failed connect.
    pub async fn connect(&self) -> io::Result<Conn> {
        let stream = match self.addr {
            Some(addr) => TcpStream::connect(addr).await,
            None => {
                let addrs: Vec<_> = tokio::net::lookup_host(self.authority.as_str())
                    .await
                    .map_err(|err| io::Error::new(io::ErrorKind::NotFound, err))?
                    .collect();
                if addrs.is_empty() {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} resolved to no address", self.authority),
                    ));
                }
                TcpStream::connect(&addrs[..]).await
            }
        }?;
        stream.set_nodelay(true)?;
        Ok(Conn::new(stream))
    }
}

/// Idle kept-alive connections to the app, the most recently used first
/// out. A reaper task closes each as it passes `upstream.pool_idle_timeout`,
/// while there are any.
pub struct Pool {
    idle: Mutex<Idle>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct Idle {
    conns: Vec<(Conn, Instant)>,
    reaping: bool,
}

impl Pool {
    /// An idle connection the app has not closed, if there is one.
    pub fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((conn, since)) = idle.conns.pop() {
            if now.duration_since(since) < self.idle_timeout && !conn.is_spent() {
                return Some(conn);
            }
        }
        None
    }

    /// Takes back a connection whose exchange has ended: kept when the
    /// exchange's [`Outcome`] allows it and nothing followed the answer
    /// (bytes after it answer nothing we sent), else closed.
    pub fn release(self: &Arc<Self>, conn: Conn, outcome: Outcome) {
        if !outcome.reusable() || !conn.buf.is_empty() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.conns.len() >= self.max_idle {
            return;
        }
        idle.conns.push((conn, Instant::now()));
        if !idle.reaping {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                idle.reaping = true;
                runtime.spawn(reap(Arc::downgrade(self), self.idle_timeout));
            }
        }
    }

    /// How many connections wait idle (for tests).
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }
}

/// Closes idle connections as they pass `idle_timeout` (and any the app
/// closed meanwhile), until the pool is empty or gone.
async fn reap(pool: Weak<Pool>, idle_timeout: Duration) {
    let mut next = Instant::now() + idle_timeout;
    loop {
        tokio::time::sleep_until(tokio::time::Instant::from_std(next)).await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.conns
            .retain(|(conn, since)| now.duration_since(*since) < idle_timeout && !conn.is_spent());
        // Checked in at the end, so the first is the oldest.
        match idle.conns.first() {
            Some((_, since)) => next = *since + idle_timeout,
            None => {
                idle.reaping = false;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule holds for every combination: reuse only when all three hold.
    #[test]
    fn only_a_whole_kept_alive_exchange_is_reusable() {
        for bits in 0..8u8 {
            let outcome = Outcome {
                request_whole: bits & 1 != 0,
                answer_whole: bits & 2 != 0,
                keep_alive: bits & 4 != 0,
            };
            assert_eq!(outcome.reusable(), bits == 7, "{outcome:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_comes_back_only_by_the_rule_and_with_nothing_unread() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority: Authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let pools = Pools::new(&authority, 4, Duration::from_secs(60));
        let pool = pools.local().clone();
        let whole = Outcome {
            request_whole: true,
            answer_whole: true,
            keep_alive: true,
        };
        let mut accepted = Vec::new();
        for outcome in [
            Outcome {
                request_whole: false,
                ..whole
            },
            Outcome {
                answer_whole: false,
                ..whole
            },
            Outcome {
                keep_alive: false,
                ..whole
            },
        ] {
            let conn = pools.connect().await.unwrap();
            accepted.push(listener.accept().await.unwrap());
            pool.release(conn, outcome);
            assert_eq!(pool.idle(), 0, "{outcome:?}");
        }
        let mut leftover = pools.connect().await.unwrap();
        accepted.push(listener.accept().await.unwrap());
        leftover.buf.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        pool.release(leftover, whole);
        assert_eq!(pool.idle(), 0, "bytes after the answer");

        let conn = pools.connect().await.unwrap();
        accepted.push(listener.accept().await.unwrap());
        pool.release(conn, whole);
        assert_eq!(pool.idle(), 1);
        assert!(pool.checkout().is_some());
    }
}
