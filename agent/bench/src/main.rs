//! `nencache-bench`: measures a NenCache agent through the real client, side by side in the
//! same run with single-thread memcpy of the same bytes, Redis over a Unix socket doing SET and
//! GET of the same values, and a raw Unix-socket round trip; compares eviction policies'
//! hit ratios on synthetic traces; and measures the lower tiers against `fio` on the same
//! filesystem in the same run. It measures and reports; it asserts nothing about speed.
//!
//! ```text
//! nencache-bench io       # throughput and latency (starts its own agent and redis-server)
//! nencache-bench policy   # S3-FIFO vs LRU hit ratios on Zipf and chat traces
//! nencache-bench policy --hierarchy  # host memory alone vs host memory over a T2 tier
//! nencache-bench tiers    # T2 bandwidth, T2-only gets and recovery, against fio
//! nencache-bench compat   # Redis and lm:// listeners: redis-benchmark vs redis-server,
//!                         # 32 MiB lm:// chunks vs memcpy
//! ```

mod compat;
mod fio;
mod io;
mod policy;
mod resp;
mod tiers;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "nencache-bench", version, about = "Benchmarks for NenCache")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Put/get throughput and latency against memcpy, Redis and a raw socket round trip.
    Io(io::IoArgs),
    /// Hit ratios of the eviction policies on synthetic traces.
    Policy(policy::PolicyArgs),
    /// The lower tiers against fio on the same filesystem: T2 bandwidth, gets of values on
    /// T2 only, recovery time.
    Tiers(tiers::TiersArgs),
    /// The LMCache-compatible listeners: redis-benchmark against redis-server and the agent,
    /// lm:// chunk transfers against memcpy.
    Compat(compat::CompatArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Io(a) => io::run(&a),
        Command::Policy(a) => policy::run(&a),
        Command::Tiers(a) => tiers::run(&a),
        Command::Compat(a) => compat::run(&a),
    }
}
