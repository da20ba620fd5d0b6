//! pushgate: a sidecar reverse proxy that adds real-time push to an existing
//! web app.
//!
//! pushgate sits in front of the app and passes its ordinary HTTP through.
//! Realtime transports (WebSocket, Server-Sent Events, long-poll), the publish
//! API and the engines arrive on top of this base.
//!
//! # Layout
//!
//! - [`config`]: serde structs with `DEFAULT_*` constants; load, environment
//!   overrides, validation that reports every problem at once.
//! - [`cursor`]: epochs, positions (`<epoch>:<offset>`) and the cursor codec.
//! - [`server`]: the public listener: accept loop, TLS, connection limits,
//!   the request-head deadline, and the drain on shutdown.
//! - [`proxy`]: the reverse proxy to the app: pooled, streaming, hop-by-hop
//!   headers dropped, `X-Forwarded-*` set, WebSocket upgrades tunnelled.
//! - [`demo`]: `pushgate demo`: a built-in chat app behind pushgate, for a
//!   first look in a browser.
//! - [`shutdown`]: OS signals and the drain tracker that connections and
//!   upgraded sessions join.
//! - [`error`]: error types and the one mapping from error to HTTP answer.
//! - [`body`]: the one body type served.
//! - [`logging`]: tracing setup, human or JSON.
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
pub mod auth;
pub mod body;
pub mod broker;
pub mod config;
pub mod cursor;
pub mod demo;
pub mod error;
pub mod hub;
pub mod jwks;
pub mod logging;
pub mod message;
pub mod metrics;
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
