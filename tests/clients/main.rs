//! Real clients: the browser client library in Node and in Chromium,
//! third-party Python clients, Pusher's libraries (pusher-js, the Node and
//! Python server SDKs, Laravel Echo), and the example apps: one test binary, so
//! the shared support in tests/common is built once.

#[path = "../common/mod.rs"]
mod common;

mod browser;
mod client_js;
mod example_app;
mod pusher;
mod pusher_example;
mod third_party;
