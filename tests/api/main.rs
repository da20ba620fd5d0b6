//! The publish/admin API and its OpenAPI description: one test binary, so
//! the shared support in tests/common is built once.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod monitoring;
mod openapi;
