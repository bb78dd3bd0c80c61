//! Eviction-policy comparison: replays a Zipf trace and a prefix-sharing chat trace through
//! the real engine (a small arena, one page per chunk) under S3-FIFO and under LRU, and
//! prints the hit ratio of each at several cache sizes.

use std::collections::HashSet;

use clap::Args;
use nencache_engine::{
    Engine, EngineConfig, EvictionPolicy, PutItem,
    traces::{ChatConfig, ChatWorkload, zipf_trace},
};

/// Options of `nencache-bench policy`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Requests per trace.
    #[arg(long, default_value_t = 200_000)]
    pub requests: usize,
    /// Zipf exponent.
    #[arg(long, default_value_t = 0.9)]
    pub alpha: f64,
    /// Distinct keys in the Zipf trace.
    #[arg(long, default_value_t = 100_000)]
    pub keys: usize,
    /// S3-FIFO small-queue shares to compare, in percent of the cache.
    #[arg(long, value_delimiter = ',', default_values_t = [10u8, 20, 30])]
    pub small_percent: Vec<u8>,
}

const PAGE: u64 = 4096;

/// Replays `trace` (a sequence of requests, each a run of keys read as a prompt prefix:
/// look up, get the cached prefix, put the rest) and returns the hit ratio in keys.
fn replay<'a>(
    policy: EvictionPolicy,
    small: u8,
    pages: u64,
    trace: impl Iterator<Item = Vec<&'a [u8]>>,
) -> f64 {
    // Each value is a few bytes: with its key it fits one page, so capacity = pages entries.
    let e = Engine::new(EngineConfig {
        capacity: pages * PAGE,
        staging: 64 * PAGE,
        max_value: PAGE,
        policy,
        small_queue_percent: small,
        ..EngineConfig::default()
    })
    .expect("engine");
    let s = e.open_session().expect("session");
    let (mut hits, mut total) = (0u64, 0u64);
    for keys in trace {
        total += keys.len() as u64;
        // As a client does: find the cached prefix, read it, compute and store the rest.
        let prefix = e.lookup(&keys).expect("lookup").prefix;
        let got = e.get(s, &keys[..prefix]).expect("get");
        let ids: Vec<u64> = got.iter().flatten().map(|l| l.id).collect();
        e.release(s, &ids).expect("release");
        hits += prefix as u64;
        for k in &keys[prefix..] {
            let it = PutItem {
                key: k,
                value_len: 8,
                metadata: b"",
                ttl: None,
                overwrite: false,
            };
            // A full arena of leased entries cannot happen here; ignore Exists.
            let _ = e.put_local(s, it, b"kvchunk!");
        }
    }
    hits as f64 / total.max(1) as f64
}

/// Runs the comparison and prints a table.
pub fn run(a: &PolicyArgs) -> anyhow::Result<()> {
    let zipf: Vec<Vec<Vec<u8>>> = zipf_trace(a.keys, a.alpha, a.requests, 42)
        .iter()
        .map(|k| vec![k.to_vec()])
        .collect();
    let chat: Vec<Vec<Vec<u8>>> = {
        let mut w = ChatWorkload::new(ChatConfig {
            users: 200,
            system_prompts: 20,
            ..ChatConfig::default()
        });
        (0..a.requests / 20)
            .map(|_| w.next_request().keys.iter().map(|k| k.to_vec()).collect())
            .collect()
    };
    let traces = [
        (
            format!(
                "Zipf α={}, {} keys, {} requests",
                a.alpha,
                a.keys,
                zipf.len()
            ),
            &zipf,
            [1u64, 5, 10],
        ),
        (
            format!(
                "chat: 200 users, 20 system prompts, {} requests",
                chat.len()
            ),
            &chat,
            [5, 10, 25],
        ),
    ];
    let s3_cols: String = a
        .small_percent
        .iter()
        .map(|p| format!(" S3-FIFO (small {p}%) |"))
        .collect();
    println!("| trace | cache size (% of distinct keys) | LRU |{s3_cols}");
    println!("|---|---|---|{}", "---|".repeat(a.small_percent.len()));
    for (name, trace, sizes) in traces {
        let distinct: HashSet<&Vec<u8>> = trace.iter().flatten().collect();
        for pct in sizes {
            let pages = (distinct.len() as u64 * pct / 100).max(64);
            let run = |p, small| {
                replay(
                    p,
                    small,
                    pages,
                    trace.iter().map(|r| r.iter().map(Vec::as_slice).collect()),
                )
            };
            let lru = run(EvictionPolicy::Lru, 10);
            let s3: Vec<f64> = a
                .small_percent
                .iter()
                .map(|&sp| run(EvictionPolicy::S3Fifo, sp))
                .collect();
            let cells: String = s3
                .iter()
                .map(|h| format!(" {h:.4} ({:.3}x) |", h / lru))
                .collect();
            println!("| {name} | {pct}% ({pages}) | {lru:.4} |{cells}");
        }
    }
    Ok(())
}
