//! The engines: the Broker conformance suite on memory and Redis, Redis
//! connections, Redis Cluster and its faults, several nodes on one Redis,
//! and chaos under load: one test binary, so the shared support in
//! tests/common is built once.

#[path = "../common/mod.rs"]
mod common;

mod broker;
mod chaos;
mod redis_cluster;
mod redis_cluster_faults;
mod redis_connect;
mod redis_replicas;
mod scale_out;
