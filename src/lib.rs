//! pushgate: a sidecar reverse proxy that adds real-time push to an existing
//! web app.
//!
//! pushgate sits in front of the app and passes its ordinary HTTP through. It
//! serves WebSocket, Server-Sent Events and long-poll connections itself,
//! asks the app who each connection is and which channels it may hear, and
//! takes publications from the app's backend over an HTTP API. One node runs
//! on the in-memory engine; several share channels, history and presence
//! through Redis. docs/architecture.md follows a connection, a publication and
//! a session through these modules.
//!
//! # Layout
//!
//! - [`server`]: the listeners: accept loop, one shard thread per core for
//!   the public one, TLS, the connection limit, and the drain on shutdown.
//! - [`node`]: one node assembled from its settings (engine, hub, realtime
//!   transports and their auth, API, proxy): the one place that knows how
//!   the parts fit.
//! - [`files`]: the open-file limit, and how connections spend it.
//!   - `server::read_ahead`: one read for a new connection's first bytes.
//!   - `server::head_deadline`: the deadline for a new connection's first
//!     request head (`408`).
//!   - `server::tls`: certificate and key loading, ALPN.
//! - [`proxy`]: the reverse proxy to the app: bodies streamed both ways,
//!   hop-by-hop headers dropped, `X-Forwarded-*` set, WebSocket upgrades
//!   tunnelled.
//!   - `proxy::request`: what a request must be to go to the app (anything
//!     pushgate could not forward exactly as framed is refused with `400`),
//!     and the fields it goes with.
//! - [`app`]: the app behind pushgate: where it is, and the kept-alive
//!   connections to it that the proxy and the auth requests share.
//!   - `app::pool`: the connections, one pool per thread, and the one rule
//!     for reusing them.
//!   - `app::h1`: the lean HTTP/1.1 client for requests without a body
//!     (most of them) and for the auth requests.
//!   - `app::streamed`: uploads and upgrades, over hyper's HTTP/1 client on
//!     the same pool.
//! - [`conn`]: facts about a client connection, and the `X-Forwarded-For`
//!   the app is told of it.
//! - [`headers`]: reading header fields of comma-separated tokens.
//! - [`detach`]: taking a socket back from hyper after a response head, so
//!   an SSE stream does not keep hyper's buffers.
//! - [`transport`]: the realtime transports under `realtime.prefix`, each an
//!   adapter around one session; the checks before a session starts
//!   (origin, per-address limit, auth).
//!   - `transport::session`: a session: the channels one connection hears,
//!     its position in each and its outbox; replay, duplicates, resets.
//!   - `transport::websocket`: WebSocket at `{prefix}/ws`: commands with
//!     replies, envelopes, heartbeat.
//!   - `transport::sse`: Server-Sent Events at `{prefix}/sse`.
//!   - `transport::longpoll`: long-poll at `{prefix}/poll`.
//!   - `transport::control`: reaching live sessions by user: the per-user
//!     limit, and the API's disconnect and unsubscribe.
//!   - `transport::client_js`: the browser client, served at
//!     `{prefix}/client.js`.
//! - [`auth`]: who a realtime connection is and which channels it may hear:
//!   the app's answer (with a grant cache), a JWT, or `none` on loopback.
//! - [`jwks`]: JWT verification keys from a JWKS document, fetched again
//!   for an unknown `kid` at a bounded rate.
//! - [`api`]: the publish/admin API on `api.listen`: publish, history,
//!   channels, presence, disconnect, unsubscribe; health, readiness and
//!   metrics.
//! - [`broker`]: the engine behind channels, one `Broker` trait: numbering,
//!   history, recovery, presence, and the bus between nodes.
//!   - `broker::memory`: the in-memory engine, for one node.
//!   - `broker::redis`: the Redis engine, for several nodes sharing one Redis
//!     (or a Redis Cluster): the engine's state and the `Broker` methods.
//!     - `broker::redis::keys`: the names of keys and pub/sub channels.
//!     - `broker::redis::scripts`: the Lua scripts and their replies.
//!     - `broker::redis::wire`: a publication's encoding on pub/sub and in
//!       a stream.
//!     - `broker::redis::connection`: the command connection (one server or
//!       a cluster) and which failures mean a command never ran.
//!     - `broker::redis::listener`: the pub/sub listener on one server:
//!       subscribing, reconnecting, checking channels after an outage.
//!     - `broker::redis::router`: a cluster's slot map, one command
//!       connection per master, and which masters are down.
//!     - `broker::redis::cluster`: the sharded pub/sub listener on a
//!       cluster: each channel subscribed on its slot's master, placed
//!       again and checked after every topology event.
//!     - `broker::redis::presence`: presence and connection places, kept
//!       fresh.
//!     - `broker::redis::url`: `engine.redis.url` and its CA file, checked.
//! - [`hub`]: the local channel registry and the fan-out to sessions:
//!   bounded outboxes, the lag policy, one lane per shard thread.
//! - [`message`]: a publication and its per-transport encodings, made once.
//! - [`names`]: channel and event names, checked once against the contract.
//! - [`cursor`]: epochs, positions (`<epoch>:<offset>`) and the cursor codec:
//!   any input is accepted or refused with a reason, never a panic.
//! - [`signal`]: the lock-free wake-up of the one task that serves a session.
//! - [`timer`]: deadlines on timers a shard thread keeps and reuses.
//! - [`config`]: serde structs with `DEFAULT_*` constants; load, environment
//!   overrides, validation that reports every problem at once.
//! - [`shutdown`]: OS signals and the drain tracker that connections and
//!   sessions join.
//! - [`error`]: error types and the one mapping from error to HTTP answer
//!   (and WebSocket close code).
//! - [`body`]: the one response body type served.
//! - [`metrics`]: counters and gauges for `GET /metrics`, in the Prometheus
//!   text format.
//! - [`logging`]: tracing setup, human or JSON.
//! - [`demo`]: `pushgate demo`: a built-in chat app behind pushgate, for a
//!   first look in a browser.
//!
//! # Running
//!
//! ```no_run
//! # async fn example() -> Result<(), pushgate::Error> {
//! let config = pushgate::config::load(
//!     std::path::Path::new("config.example.yaml"),
//!     std::env::vars(),
//! )?;
//! pushgate::run(config, pushgate::shutdown::signal()).await
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod broker;
pub mod config;
pub mod conn;
pub mod cursor;
pub mod demo;
pub mod detach;
pub mod error;
pub mod files;
pub mod headers;
pub mod hub;
pub mod jwks;
pub mod logging;
pub mod message;
pub mod metrics;
pub mod names;
pub mod node;
pub mod proxy;
pub mod server;
pub mod shutdown;
pub mod signal;
pub mod timer;
pub mod transport;

pub use config::Config;
pub use error::Error;
pub use server::Server;

/// Binds the listeners of `config` and serves until `shutdown` resolves;
/// then drains in-flight work within `shutdown.grace` and returns.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}
