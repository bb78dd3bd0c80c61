//! The NenCache node agent.
//!
//! `nencache-agent serve` runs the host-memory tier of the cache and serves it to inference
//! pods on the node: gRPC control over a Unix socket ([`service`]), shared-memory handoff
//! through the attach socket ([`attach`]), health and metrics over HTTP ([`admin`],
//! [`metrics`]). [`config`] turns flags, `NENCACHE_AGENT_*` variables and a YAML file into
//! validated [`config::Settings`]; [`server::Agent`] binds and serves; [`cli`] holds the
//! `nencache` command-line tool, its demo included.
//!
//! # Layout
//! - [`config`]: settings and their sources;
//! - [`socket`]: socket paths as managed resources (lock, stale files, permissions);
//! - [`server`]: start-up, serving and graceful shutdown;
//! - [`ops`]: each operation once (checks, limits, blocking work, the one
//!   engine-error-to-status mapping), shared by both transports;
//! - [`service`]: the gRPC transport;
//! - [`attach`]: sessions, descriptor passing and the fast-path transport;
//! - [`compat`]: LMCache's remote protocols (`lm://`) over the same engine;
//! - [`admin`], [`metrics`], [`telemetry`]: observability;
//! - [`cli`]: `put`, `get`, `delete`, `lookup`, `stats`, `demo`, `lmcache convert`;
//! - [`lmconvert`]: an LMCache configuration turned into the agent's, key by key.

pub mod admin;
pub mod attach;
pub mod cli;
pub mod compat;
pub mod config;
pub mod lmconvert;
pub mod metrics;
pub mod ops;
pub mod server;
pub mod service;
pub mod socket;
pub mod telemetry;
