//! The realtime transports (WebSocket, SSE, long-poll), resume and
//! cursors, presence, exactness, connection events to the app, and how
//! connections are authorized: one test binary, so the shared support in
//! tests/common is built once.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod backpressure;
mod cursors;
mod events;
mod exactness;
mod jwks;
mod jwt;
mod operator_metrics;
mod presence;
mod pusher;
mod rate_limits;
mod reload;
mod sse_poll;
mod two_way;
mod websocket;
mod ws_abuse;
mod ws_compression;
