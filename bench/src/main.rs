//! `pushgate-bench`: the tools for measuring pushgate beside its peers.
//!
//! One binary, one subcommand per role, so the scripts in `bench/` need to
//! build only this crate and pushgate itself:
//!
//! - `upstream`: a fast stand-in for the app behind the proxy, answering every
//!   request with a small JSON body (see [`upstream`]), and GRIP holds for
//!   subscribers that come through Pushpin (see [`grip`]).
//! - `broadcast`: many SSE, WebSocket, long-poll or Pusher-protocol
//!   subscribers on one channel or many, a steady publish rate; reports
//!   delivery rate and ratio, latency percentiles, sequence faults and the
//!   server's memory (see [`broadcast`]).
//! - `floor`: the least a server can do to broadcast over SSE (one write per
//!   subscriber, no queues, a thread per core), to show what the machine
//!   allows (see [`floor`]).
//! - `connect`: authenticated realtime connections opened and closed as fast
//!   as the server (pushgate, Nchan or Pushpin) takes them, each one decided
//!   by the upstream; reports connects per second and connect latency (see
//!   [`connect`]).
//!
//! Load-generator scenarios (WebSocket/SSE fan-out, publish rate, …) are added
//! here as further subcommands, each in its own module with its own `Args`.
//! Plain HTTP pass-through load comes from `wrk` (see `bench/passthrough.sh`).

mod broadcast;
mod connect;
mod floor;
mod grip;
mod rpc;
mod subscriber;
mod upstream;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Test upstream and load generators for pushgate's benchmarks.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve `{"ok":true,"n":42}` to every request (the app behind the proxy),
    /// and grants to `POST /realtime/auth`.
    Upstream(upstream::Args),
    /// Many subscribers on one channel or many, publications at a steady rate.
    Broadcast(Box<broadcast::Args>),
    /// Authenticated realtime connects per second.
    Connect(connect::Args),
    /// The least a server can do to broadcast over SSE: the machine's floor.
    Floor(floor::Args),
    /// Calls to the app through pushgate: WebSocket `rpc`, or plain HTTP
    /// through its proxy.
    Rpc(rpc::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Upstream(args) => upstream::run(args),
        Command::Broadcast(args) => broadcast::run(*args),
        Command::Connect(args) => connect::run(args),
        Command::Floor(args) => floor::run(args),
        Command::Rpc(args) => rpc::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pushgate-bench: {err}");
            ExitCode::FAILURE
        }
    }
}
