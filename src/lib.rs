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
//! The public surface is what the binary, the tests and the benchmarks use:
//! [`run`], [`Server`], [`Settings`] and the modules marked `pub` below; the
//! rest is private to the crate.
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
//!     - `app::h1::tests`: body framing across any split, and the
//!       response-head parser against every shape.
//!   - `app::streamed`: uploads and upgrades, over hyper's HTTP/1 client on
//!     the same pool.
//!   - `app::call`: a JSON request to the app on a client's behalf (auth,
//!     `rpc`, publishes the app decides on), bounded in size and time.
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
//!   - `transport::websocket`: WebSocket at `{prefix}/ws`: the handshake,
//!     the connection's loop, heartbeat and closing.
//!     - `transport::websocket::closing`: close codes, why a connection
//!       ended, the closing handshake and the TCP close.
//!     - `transport::websocket::commands`: a text frame parsed once into a
//!       typed command (`op` is the serde tag); replies and pushes.
//!     - `transport::websocket::extensions`: the client's
//!       `Sec-WebSocket-Extensions` offers, and the permessage-deflate one
//!       pushgate takes.
//!     - `transport::websocket::inflating`: the client's compressed
//!       messages inflated under tungstenite, which then reads exactly the
//!       uncompressed frame stream.
//!       - `transport::websocket::inflating::tests`: that invariant against
//!         random messages, fragments, pings and read splits; the refusals.
//!     - `transport::websocket::socket`: tungstenite's protocol state driven
//!       straight from the connection's task, over the socket taken back
//!       from hyper; no read buffer kept between frames.
//!     - `transport::websocket::tests`: frames, handshakes and closes over
//!       real sockets.
//!   - `transport::calls`: `rpc` and publishes from WebSocket clients,
//!     each a future beside the connection's loop; the publisher's user.
//!   - `transport::sse`: Server-Sent Events at `{prefix}/sse`.
//!   - `transport::longpoll`: long-poll at `{prefix}/poll`.
//!   - `transport::control`: reaching live sessions by user: the per-user
//!     limit, and the API's disconnect and unsubscribe.
//!   - `transport::pusher`: the Pusher Channels WebSocket (protocol 7) at
//!     `/app/{key}`: subscriptions signed by the app, presence members,
//!     client events, `pusher:signin`.
//!   - `transport::client_js`: the browser client, served at
//!     `{prefix}/client.js`.
//!   - `transport::origin`: the `Origin` check, and CORS for SSE and
//!     long-poll.
//!   - `transport::opening`: how an HTTP realtime request opens: method,
//!     Origin, channels and resume position from the query.
//!   - `transport::pace`: pacing a connection's writes
//!     (`realtime.coalesce_window`), and jitter for retries.
//! - [`auth`]: who a realtime connection is and which channels it may hear:
//!   the app's answer (with a grant cache), a JWT, or `none` on loopback.
//!   - `auth::grant`: what a connection is granted, and reading the app's
//!     answer.
//!   - `auth::app`: `auth.mode: upstream`, asking the app.
//!   - `auth::cache`: grants by a keyed digest of the request that earned
//!     them.
//!   - `auth::jwt`: `auth.mode: jwt`, tokens verified in-process.
//!   - `auth::jwks`: JWT verification keys from a JWKS document, fetched
//!     again for an unknown `kid` at a bounded rate.
//! - [`api`]: the publish/admin API on `api.listen`: publish, history,
//!   channels, presence, disconnect, unsubscribe; health, readiness and
//!   metrics.
//!   - `api::service`: the listener's tower layers: body limit, body
//!     timeout, requests in flight, tracing.
//!   - `api::tests`: the JSON nesting scan, against a real parse.
//! - [`pusher`]: the Pusher Channels protocol's apps, its channels' names
//!   inside pushgate (`pusher/{id}/…`), and an event framed once for every
//!   Pusher subscriber.
//!   - `pusher::api`: Pusher's HTTP API at `/apps/{id}/…` on the API
//!     listener: events, batches, channel and user queries,
//!     `terminate_connections`.
//!   - `pusher::sign`: Pusher's signatures: HTTP API requests, channel
//!     authorizations, sign-ins, webhooks.
//!   - `pusher::webhooks`: Pusher's webhooks to the app, each once across
//!     nodes.
//! - [`broker`]: the engine behind channels, one `Broker` trait: numbering,
//!   history, recovery, presence, and the bus between nodes.
//!   - `broker::tests`: a publish's fingerprint is its JSON value's, written
//!     any way.
//!   - `broker::memory`: the in-memory engine, for one node.
//!   - `broker::redis`: the Redis engine, for several nodes sharing one Redis
//!     (or a Redis Cluster): the engine's state, and each channel checked
//!     against its stream before it is heard again.
//!     - `broker::redis::engine`: the `Broker` methods.
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
//! - [`channels`]: the channel rules (presence by prefix), and local
//!   subscriptions counted across the hub and the engine, with one way out.
//! - [`hub`]: the local channel registry and the fan-out to sessions:
//!   bounded outboxes, the lag policy, one lane per shard thread.
//!   - `hub::lateness`: how late sessions take what they are handed: what
//!     publishers' backpressure waits on.
//!   - `hub::tests`: fan-out, lanes, the lag policy and discards.
//! - [`events`]: connection events sent to the app: a bounded queue that
//!   never makes a session wait, and one task per node posting signed
//!   batches, retried with backoff.
//! - [`posting`]: batches posted to the app (connection events, Pusher
//!   webhooks): a bounded queue nobody waits on, one task posting signed
//!   batches in order, retried with backoff.
//! - [`keyed`]: keyed digests (HMAC-SHA256 under a per-process random key)
//!   for the API keys and the grant cache.
//! - [`message`]: a publication and its per-transport encodings, made once.
//! - [`deflate`]: raw DEFLATE for one WebSocket message at a time
//!   (permessage-deflate without context takeover), inflated within a limit.
//! - [`names`]: channel and event names, checked once against the contract.
//! - [`cursor`]: epochs, positions (`<epoch>:<offset>`) and the cursor codec:
//!   any input is accepted or refused with a reason, never a panic.
//!   - `cursor::tests`: the codec against any input, and the examples of
//!     docs/protocol.md.
//! - [`signal`]: the lock-free wake-up of the one task that serves a session.
//! - [`timer`]: deadlines on timers a shard thread keeps and reuses.
//! - [`config`]: the settings document: serde structs with `DEFAULT_*`
//!   constants. A leaf: it imports none of the parts it configures.
//!   - `config::load`: the YAML file with `PUSHGATE_*` overrides laid over
//!     it, and the report of every problem at once.
//!   - `config::settings`: the checks that need the whole config, and the
//!     `Settings` a node runs on: every value parsed once.
//!   - `config::upstream`: the app's address.
//!   - `config::origin`: allowed origin patterns.
//!   - `config::tls`: certificate and key loading, ALPN.
//!   - `config::jwt`: the JWT key and where it comes from.
//!   - `config::redis`: `engine.redis.url` checked, and its CA file read.
//!   - `config::events`: `events` checked, and the kinds of event.
//!   - `config::pusher`: `pusher` checked, and each app's secret found.
//!   - `config::units`: sizes (`32KiB`) and durations (`10s`).
//!   - `config::tests`: loading and checking, end to end.
//! - [`shutdown`]: OS signals and the drain tracker that connections and
//!   sessions join.
//! - [`error`]: error types and the one mapping from error to HTTP answer
//!   (and WebSocket close code).
//! - [`body`]: the one response body type served.
//! - [`metrics`]: what `GET /metrics` exposes, encoded by prometheus-client
//!   in the Prometheus text format.
//! - [`latency`]: the latency histogram that auth and Redis observe into.
//! - [`rate`]: rate limits per connection, client address and API key.
//! - [`logging`]: tracing setup, human or JSON; `log.level` changed live.
//! - [`reload`]: `SIGHUP`: the config file read again, taken whole by the
//!   running node or refused whole; what cannot change live is named.
//! - [`demo`]: `pushgate demo`: a built-in chat app behind pushgate, for a
//!   first look in a browser.
//!
//! # Running
//!
//! ```no_run
//! # async fn example() -> Result<(), pushgate::Error> {
//! let settings = pushgate::config::load(
//!     std::path::Path::new("config.example.yaml"),
//!     std::env::vars(),
//! )?;
//! pushgate::run(settings, pushgate::shutdown::signal()).await
//! # }
//! ```
#![forbid(unsafe_code)]
// The Layout above links every module, private ones included: it is a map
// for those working on pushgate.
#![allow(rustdoc::private_intra_doc_links)]

mod api;
mod app;
mod auth;
mod body;
pub mod broker;
mod channels;
pub mod config;
mod conn;
pub mod cursor;
pub mod deflate;
pub mod demo;
mod detach;
mod error;
mod events;
pub mod files;
mod headers;
pub mod hub;
pub mod keyed;
mod latency;
pub mod logging;
pub mod message;
mod metrics;
mod names;
mod node;
mod posting;
mod proxy;
pub mod pusher;
mod rate;
pub mod reload;
mod server;
pub mod shutdown;
mod signal;
mod timer;
mod transport;

pub use config::{Config, Settings};
pub use error::Error;
pub use server::Server;

/// Binds the listeners of `settings` and serves until `shutdown` resolves;
/// then drains in-flight work within `shutdown.grace` and returns.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    Server::bind(settings).await?.run(shutdown).await
}
