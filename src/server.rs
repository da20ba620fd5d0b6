//! The public listener: accept loop, TLS, per-connection limits and the
//! two-phase drain on shutdown.
//!
//! Each accepted connection takes a permit from a semaphore sized by
//! `limits.max_connections`; when none is left, the loop stops accepting (the
//! kernel's backlog holds newcomers) until a connection closes. Accept errors
//! such as `EMFILE` back off instead of spinning. Every connection gets
//! `limits.header_timeout` to finish its TLS handshake and first request head
//! ([`head_deadline`]); hyper's own header timeout covers later heads.

/// Implements `AsyncWrite` for an IO wrapper `$wrapper<I>` by passing every
/// call to its `inner` field: for wrappers that only look at reads.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $wrapper<I> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

mod head_deadline;
mod read_ahead;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::api::{self, ApiService};
use crate::body::Body;
use crate::broker::Broker;
use crate::config::{FastPathsConfig, Settings};
use crate::conn::ConnInfo;
use crate::detach::{self, DetachHandle, Detachable, Detached, Reclaim};
use crate::error::Error;
use crate::files::raise_open_file_limit;
use crate::hub::Hub;
use crate::node::Node;
use crate::proxy::{self, Proxy};
use crate::shutdown::Drain;
use crate::transport::Realtime;
use head_deadline::HeadDeadline;
use read_ahead::ReadAhead;

/// Pending connections the kernel queues per listening socket.
const LISTEN_BACKLOG: u32 = 1024;

/// hyper's HTTP/1 header count limit when none is set.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Longest pause between retries when accepting fails (e.g. out of files).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);

/// A bound, not yet running, pushgate server: the public listener (the
/// app's traffic, later the realtime transports) and the API listener.
pub struct Server {
    public: Listener,
    api: Listener,
    shared: Arc<Shared>,
    grace: Duration,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    /// What each shard of the public listener serves.
    realtime: Arc<Realtime>,
    proxy: Arc<Proxy>,
    /// The shards' switches.
    fast_paths: FastPathsConfig,
    shards: usize,
    reloader: Arc<crate::reload::Reloader>,
}

/// One listening socket and what its connections are served with.
struct Listener {
    tcp: TcpListener,
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    /// The listener's connection limit, shared by all its shards.
    permits: Arc<Semaphore>,
    /// The config key of `max_connections`, for the log line when it bites.
    limit_key: &'static str,
    handler: Handler,
}

/// What answers a listener's requests.
#[derive(Clone)]
enum Handler {
    /// pushgate's realtime paths, and the app behind it for everything else.
    Public {
        realtime: Arc<Realtime>,
        proxy: Arc<Proxy>,
    },
    /// The API, behind its tower layers (`api::service`).
    Api(ApiService),
}

/// A request's answer, as hyper's service wants it.
type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Handler {
    /// Starts answering `request`, boxed per request: hyper keeps room for
    /// the service's future for the connection's whole life, and an SSE
    /// stream or an idle keep-alive connection should not hold kilobytes of
    /// a finished request's state. Each kind of request gets a box of its
    /// own future's size, so a proxied request neither moves nor allocates
    /// room for a realtime session's state.
    ///
    /// `detach` (HTTP/1 only) lets a realtime handler take the socket, and
    /// `reclaim` (HTTP/1 only) lets it take an upgraded socket back out of
    /// hyper's wrapping; they go into the request's extensions only there,
    /// sparing every proxied request the allocations.
    fn handle(
        &self,
        mut request: Request<Incoming>,
        conn: ConnInfo,
        detach: Option<DetachHandle>,
        reclaim: Option<Reclaim>,
    ) -> Answer {
        match self {
            Handler::Public { realtime, .. } if realtime.owns(request.uri().path()) => {
                if let Some(refusal) = proxy::refusal(&request) {
                    return Box::pin(std::future::ready(Ok(refusal)));
                }
                if let Some(detach) = detach {
                    request.extensions_mut().insert(detach);
                }
                if let Some(reclaim) = reclaim {
                    request.extensions_mut().insert(reclaim);
                }
                let realtime = realtime.clone();
                Box::pin(async move { Ok(realtime.handle(request, conn).await) })
            }
            Handler::Public { proxy, .. } => Box::pin(proxy.forward(request, conn)),
            Handler::Api(service) => Box::pin(service.clone().oneshot(request)),
        }
    }
}

/// What every connection task needs.
struct Shared {
    http: auto::Builder<TokioExecutor>,
    drain: Drain,
    header_timeout: Duration,
    /// `fast_paths.read_ahead`.
    read_ahead: bool,
    /// `fast_paths.sse_detach`: realtime requests may take their socket.
    sse_detach: bool,
    /// `fast_paths.ws_reclaim`: an upgraded socket may leave hyper's wrapping.
    ws_reclaim: bool,
    /// `limits.unsent_bytes`; `None` leaves the kernel's default.
    unsent_bytes: Option<u32>,
}

async fn bind_tcp(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let bind_error = |source| Error::Bind { addr, source };
    let tcp = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = tcp.local_addr().map_err(bind_error)?;
    Ok((tcp, local))
}

impl Server {
    /// Binds both listeners and starts the engine. `127.0.0.1:0` picks a
    /// free port; [`Server::local_addr`] and [`Server::api_addr`] tell which.
    pub async fn bind(settings: Settings) -> Result<Server, Error> {
        Server::bind_sharded(settings, 1).await
    }

    /// Like [`Server::bind`], serving the public listener from `shards`
    /// threads, each with its own single-threaded runtime, its own socket on
    /// the same port (`SO_REUSEPORT`, so the kernel spreads connections) and
    /// its own pool of connections to the app. Requests then stay on the
    /// thread that accepted them, with no hand-off between threads; the
    /// engine, the hub and the limits are shared. [`Server::run`] starts
    /// every shard as a thread of its own; the caller's runtime serves the
    /// API and the engine.
    pub async fn bind_sharded(settings: Settings, shards: usize) -> Result<Server, Error> {
        let shards = shards.max(1);
        raise_open_file_limit();
        let config = &settings.config;
        let (public_tcp, public_addr) = if shards > 1 {
            let bind_error = |source| Error::Bind {
                addr: config.listen,
                source,
            };
            let tcp = reuseport_listener(config.listen).map_err(bind_error)?;
            let local = tcp.local_addr().map_err(bind_error)?;
            (tcp, local)
        } else {
            bind_tcp(config.listen).await?
        };
        let (api_tcp, api_addr) = bind_tcp(config.api.listen).await?;

        let tls = settings.tls.clone().map(TlsAcceptor::from);

        let limits = &config.limits;
        let header_bytes = usize::try_from(limits.max_header_bytes.bytes()).unwrap_or(usize::MAX);
        let mut http = auto::Builder::new(TokioExecutor::new());
        let mut http1 = http.http1();
        http1
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(header_bytes);
        // Head deadlines on timers each shard thread reuses (crate::timer),
        // unless `fast_paths.kept_timers` is off.
        if config.fast_paths.kept_timers {
            http1.timer(crate::timer::HyperTimer);
        } else {
            http1.timer(TokioTimer::new());
        }
        // Only when it differs from hyper's own default: set explicitly,
        // hyper re-initialises its header index on every parse.
        if limits.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            http1.max_headers(limits.max_headers);
        }
        http.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX));

        let node = Node::assemble(&settings, shards)?;
        let Node {
            hub,
            broker,
            realtime,
            api,
            proxy,
            drain,
            public_max,
            public_permits,
            reloader,
        } = node;

        Ok(Server {
            public: Listener {
                tcp: public_tcp,
                addr: public_addr,
                tls,
                max_connections: public_max,
                permits: public_permits,
                limit_key: "limits.max_connections",
                handler: Handler::Public {
                    realtime: realtime.clone(),
                    proxy: proxy.clone(),
                },
            },
            api: Listener {
                tcp: api_tcp,
                addr: api_addr,
                tls: None,
                max_connections: config.api.max_connections,
                permits: Arc::new(Semaphore::new(config.api.max_connections)),
                limit_key: "api.max_connections",
                handler: Handler::Api(api::service(api)),
            },
            shared: Arc::new(Shared {
                http,
                drain,
                header_timeout: limits.header_timeout,
                read_ahead: config.fast_paths.read_ahead,
                sse_detach: config.fast_paths.sse_detach,
                ws_reclaim: config.fast_paths.ws_reclaim,
                unsent_bytes: limits.unsent_bound(),
            }),
            grace: config.shutdown.grace,
            hub,
            broker,
            realtime,
            proxy,
            fast_paths: config.fast_paths.clone(),
            shards,
            reloader,
        })
    }

    /// What takes a new config while the server runs (see `reload`).
    pub fn reloader(&self) -> Arc<crate::reload::Reloader> {
        self.reloader.clone()
    }

    /// The address the public listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.public.addr
    }

    /// The address the API listener is bound to.
    pub fn api_addr(&self) -> SocketAddr {
        self.api.addr
    }

    /// This node's channel registry.
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    /// The engine.
    pub fn broker(&self) -> Arc<dyn Broker> {
        self.broker.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// work finish within `shutdown.grace`, and returns.
    ///
    /// The public listener is served by `shards` threads of its own (each a
    /// lane of the hub); the caller's runtime serves the API and the engine,
    /// so a publish is answered promptly however busy the fan-out is.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let Server {
            public,
            api,
            shared,
            grace,
            fast_paths,
            shards,
            hub,
            realtime,
            proxy,
            ..
        } = self;
        tracing::info!(
            addr = %public.addr,
            api_addr = %api.addr,
            tls = public.tls.is_some(),
            max_connections = public.max_connections,
            shards,
            "listening"
        );
        tracing::info!("{}", realtime.describe_auth());
        if let Some(pusher) = realtime.pusher() {
            tracing::info!("{}", pusher.describe());
        }
        let addr = public.addr;
        let first = public
            .tcp
            .into_std()
            .map_err(|source| Error::Bind { addr, source })?;
        // Shards keep their runtimes turning until the drain is decided here,
        // so their connections are neither cut early nor counted as done
        // because their runtime went away.
        let shard = Shard {
            addr,
            tls: public.tls,
            max_connections: public.max_connections,
            permits: public.permits,
            realtime,
            proxy,
            hub,
            fast_paths,
            shared: shared.clone(),
            finished: tokio_util::sync::CancellationToken::new(),
        };
        let mut first = Some(first);
        let (threads, stopped): (Vec<_>, Vec<_>) = (0..shards)
            .map(|index| shard.spawn(index, first.take()))
            .unzip();
        let api_loop = tokio::spawn(accept_loop(api, shared.clone()));
        shutdown.await;

        let drain = &shared.drain;
        drain.signal();
        // The loops end on the signal and drop their listeners: from here on
        // new connections are refused.
        let _ = api_loop.await;
        for stopped in stopped {
            let _ = stopped.await;
        }
        tracing::info!(
            in_flight = drain.in_flight(),
            grace_ms = grace.as_millis() as u64,
            "stopped accepting; draining"
        );
        if drain.wait(grace).await {
            tracing::info!("drained; bye");
        } else {
            tracing::warn!(
                still_open = drain.in_flight(),
                "shutdown.grace passed with work in flight; closing it"
            );
        }
        // The sessions' last events (their disconnects) are queued by now.
        shard.realtime.events().close().await;
        if let Some(pusher) = shard.realtime.pusher() {
            pusher.close().await;
        }
        shard.finished.cancel();
        for thread in threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        Ok(())
    }
}

/// What every thread of the public listener is started with.
struct Shard {
    addr: SocketAddr,
    tls: Option<TlsAcceptor>,
    max_connections: usize,
    /// The listener's connection limit, shared by all shards.
    permits: Arc<Semaphore>,
    realtime: Arc<Realtime>,
    proxy: Arc<Proxy>,
    hub: Arc<Hub>,
    fast_paths: FastPathsConfig,
    shared: Arc<Shared>,
    /// Cancelled when the drain is over: the shards' runtimes may stop.
    finished: tokio_util::sync::CancellationToken,
}

impl Shard {
    /// Starts shard `index` of the public listener: a thread with a
    /// single-threaded runtime that serves lane `index` of the hub, accepts
    /// on `tcp` (the socket bound first) or on its own `SO_REUSEPORT`
    /// socket on the public address, and has its own pool to the app. It
    /// accepts until shutdown begins, then runs its connections until the
    /// server says the drain is over.
    fn spawn(
        &self,
        index: usize,
        tcp: Option<std::net::TcpListener>,
    ) -> (std::thread::JoinHandle<()>, oneshot::Receiver<()>) {
        // Told when the shard's socket is closed, so shutdown can say "no
        // longer accepting" only once it is true of every shard.
        let (stopped_tx, stopped) = oneshot::channel();
        let addr = self.addr;
        let tls = self.tls.clone();
        let max_connections = self.max_connections;
        let permits = self.permits.clone();
        let realtime = self.realtime.clone();
        let proxy = self.proxy.clone();
        let hub = self.hub.clone();
        let kept_timers = self.fast_paths.kept_timers;
        let shared = self.shared.clone();
        let finished = self.finished.clone();
        std::thread::Builder::new()
            .name(format!("pushgate-shard-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        tracing::warn!(index, error = %err, "shard runtime failed to start");
                        return;
                    }
                };
                // This thread runs this one runtime for its whole life.
                if kept_timers {
                    crate::timer::keep_on_this_thread();
                }
                runtime.block_on(async move {
                    tokio::spawn(hub.serve_lane(index));
                    tokio::spawn(timer_anchor());
                    let tcp = match tcp {
                        Some(tcp) => TcpListener::from_std(tcp),
                        None => reuseport_listener(addr),
                    };
                    let tcp = match tcp {
                        Ok(tcp) => tcp,
                        Err(err) => {
                            tracing::warn!(index, %addr, error = %err, "shard could not listen; the others serve");
                            let _ = stopped_tx.send(());
                            finished.cancelled().await;
                            return;
                        }
                    };
                    let listener = Listener {
                        tcp,
                        addr,
                        tls,
                        max_connections,
                        permits,
                        limit_key: "limits.max_connections",
                        handler: Handler::Public { realtime, proxy },
                    };
                    accept_loop(listener, shared).await;
                    let _ = stopped_tx.send(());
                    // Keep this runtime turning while its connections drain.
                    finished.cancelled().await;
                });
                crate::timer::release_kept();
            })
            .map(|thread| (thread, stopped))
            .expect("spawn a shard thread")
    }
}

/// How often a shard's anchor timer fires; see [`timer_anchor`].
const TIMER_ANCHOR_PERIOD: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`TIMER_ANCHOR_PERIOD`] on the shard's runtime.
///
/// When a timer is set earlier than every timer tokio's driver held when it
/// last parked, tokio wakes the driver with an eventfd write, even from the
/// driver's own thread while it runs. hyper sets a head timer for every
/// request (`limits.header_timeout`, also the keep-alive idle timeout), and
/// with nothing earlier in the wheel each one paid that system call: about
/// 0.4 per proxied request and one per new connection. (A kept timer moved
/// later, see `crate::timer`, does not reach the driver; a new one, or one
/// moved earlier, does.) With this timer
/// always nearer, none of those is the earliest (for any
/// `limits.header_timeout` over the period; a shorter one only loses the
/// saving); it costs one wake-up a second.
async fn timer_anchor() {
    let mut tick = tokio::time::interval(TIMER_ANCHOR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// A listening socket on `addr` that shares the port with the others
/// (`SO_REUSEPORT`).
fn reuseport_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long a connection is left to read what its client had sent when
/// the drain began, before an idle one is closed: one turn of the runtime's
/// IO driver is what it takes.
const DRAIN_SETTLE: Duration = Duration::from_millis(2);

/// Accepts connections until shutdown begins, each holding a permit of the
/// listener's connection limit.
async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    let Listener {
        tcp,
        tls,
        max_connections,
        permits,
        limit_key,
        handler,
        ..
    } = listener;
    let mut backoff = MIN_ACCEPT_BACKOFF;
    let stop = shared.drain.clone();
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                tracing::info!(
                    max_connections,
                    "limit: {limit_key} reached; not accepting until a connection closes"
                );
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("semaphore never closed"),
                    () = stop.signalled() => return,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted,
            () = stop.signalled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = MIN_ACCEPT_BACKOFF;
                let connection = Connection {
                    peer,
                    tls: tls.clone(),
                    handler: handler.clone(),
                    shared: shared.clone(),
                    slot: permit,
                };
                shared.drain.spawn(connection.serve(stream));
            }
            Err(err) if is_per_connection(&err) => {
                tracing::debug!(error = %err, "accept: connection failed before it was accepted");
            }
            Err(err) => {
                tracing::warn!(
                    error = %err,
                    retry_in_ms = backoff.as_millis() as u64,
                    "accept failed; backing off"
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.signalled() => return,
                }
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
            }
        }
    }
}

/// Accept errors that concern only the connection being accepted; anything
/// else (out of files, out of memory) is the process's problem.
fn is_per_connection(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// An upgraded connection's socket (of type `I`) out of the wrappers it
/// went through to hyper; see [`Reclaim`]. The type named here is the one
/// `serve_http` hands hyper's auto builder.
fn reclaim<I: detach::Io>(
    upgraded: hyper::upgrade::Upgraded,
) -> Result<(Detached, bytes::Bytes), hyper::upgrade::Upgraded> {
    let parts = auto::upgrade::downcast::<TokioIo<HeadDeadline<Detachable<I>>>>(upgraded)?;
    let socket = parts.io.into_inner().into_inner().into_detached();
    Ok((socket, parts.read_buf))
}

/// Bounds what the kernel holds unsent on a client's socket
/// (`limits.unsent_bytes`, `TCP_NOTSENT_LOWAT`): past it the socket takes no
/// more, and what is still to send waits in pushgate.
///
/// The rule it keeps: a client that reads slower than pushgate writes is
/// seen by pushgate. Left to itself, the kernel grows a socket's send
/// buffer to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default): seconds of
/// publications per subscriber, held where no queue limit counts them,
/// neither a session's (`limits.queue_*`, the slow-consumer cut) nor the
/// fan-out's lateness that holds publishers back (`api.backpressure`).
/// Bytes already sent and not yet acknowledged are not counted, so the
/// bound costs no throughput on a long or fast path.
fn bound_unsent(stream: &TcpStream, bytes: Option<u32>) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Some(bytes) = bytes {
        if let Err(err) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(bytes) {
            tracing::debug!(error = %err, "TCP_NOTSENT_LOWAT not set");
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, bytes);
}

/// One accepted connection, until it closes.
struct Connection {
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    handler: Handler,
    shared: Arc<Shared>,
    /// Returned to the listener's limit when the socket closes, wherever
    /// it went (hyper, a WebSocket, a detached SSE stream).
    slot: OwnedSemaphorePermit,
}

impl Connection {
    async fn serve(self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        bound_unsent(&stream, self.shared.unsent_bytes);
        let peer = self.peer;
        let deadline = Instant::now() + self.shared.header_timeout;
        match self.tls.clone() {
            // TLS reads the socket through its own buffer already.
            None if self.shared.read_ahead => {
                self.serve_http(ReadAhead::new(stream), false, deadline)
                    .await
            }
            None => self.serve_http(stream, false, deadline).await,
            Some(acceptor) => {
                match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => self.serve_http(stream, true, deadline).await,
                    Ok(Err(err)) => tracing::debug!(%peer, error = %err, "TLS handshake failed"),
                    Err(_) => tracing::info!(
                        %peer,
                        "limit: TLS handshake not done within limits.header_timeout; closed"
                    ),
                }
            }
        }
    }

    /// Serves HTTP on the (plain or TLS) socket until it closes or leaves
    /// hyper (a WebSocket, a detached SSE stream), taking the connection's
    /// slot along.
    async fn serve_http<I: detach::Io>(self, io: I, tls: bool, deadline: Instant) {
        let conn = ConnInfo {
            peer: self.peer,
            tls,
        };
        let (io, detach) = Detachable::new(io, self.slot);
        let shared = &self.shared;
        let (io, head) = HeadDeadline::new(io, deadline);
        let handler = self.handler.clone();
        let head_seen = head.clone();
        let sse_detach = shared.sse_detach;
        let ws_reclaim = shared.ws_reclaim;
        let service = service_fn(move |request: Request<Incoming>| {
            head_seen.received();
            // Only an HTTP/1 connection is one request at a time, and so can
            // be handed over whole.
            let http1 = request.version() < http::Version::HTTP_2;
            let detach = (sse_detach && http1).then(|| detach.clone());
            let reclaim = (ws_reclaim && http1).then_some(Reclaim(reclaim::<I>));
            handler.handle(request, conn, detach, reclaim)
        });
        let connection = shared
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        // Polled each time the connection wakes: the kept wait reads a flag
        // where the token's own wait would take a lock.
        let drain = shared.drain.signalled_owned();
        tokio::pin!(connection, drain);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            () = drain => {
                // A request the client sent before the drain began is
                // answered, not cut off: hyper closes a connection it finds
                // idle at once, so it first reads what has arrived. The
                // timer lets the IO driver turn, which reports the bytes,
                // and the connection is polled first when both are ready.
                let settle = tokio::time::sleep(DRAIN_SETTLE);
                tokio::pin!(settle);
                let ended = tokio::select! {
                    biased;
                    result = connection.as_mut() => Some(result),
                    () = settle => None,
                };
                match ended {
                    Some(result) => result,
                    None => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                }
            }
        };

        let peer = conn.peer;
        if head.expired() {
            if head.partial() {
                tracing::info!(
                    %peer,
                    "limit: request head not complete within limits.header_timeout; closed"
                );
            } else {
                // Browsers open sockets they may never use; not worth a log line.
                tracing::debug!(%peer, "no request within limits.header_timeout; closed");
            }
            return;
        }
        if let Err(err) = result {
            match err.downcast_ref::<hyper::Error>() {
                Some(err) if err.is_parse_too_large() => tracing::info!(
                    %peer,
                    "limit: request head over limits.max_header_bytes or limits.max_headers; answered 431"
                ),
                // hyper's timer covers the wait for each later head too, so this
                // is mostly an idle keep-alive connection being closed.
                Some(err) if err.is_timeout() => tracing::debug!(
                    %peer,
                    "keep-alive connection idle, or its next head slow, past limits.header_timeout; closed"
                ),
                _ => tracing::debug!(%peer, error = %err, "connection ended with an error"),
            }
        }
    }
}
