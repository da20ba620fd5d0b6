//! The proxy, what it refuses, its limits, and the binary as a process: one
//! test binary, so the shared support in tests/common is built once.

#[path = "../common/mod.rs"]
mod common;

mod access_log;
mod adversarial;
mod demo;
mod deploy;
mod limits;
mod process;
mod proxy;
