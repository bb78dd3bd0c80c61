//! Eviction-policy comparison: replays a Zipf trace and a prefix-sharing chat trace through
//! the real engine (a small arena, one page per chunk) under S3-FIFO and under LRU, and
//! prints the hit ratio of each at several cache sizes.

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
}

const PAGE: u64 = 4096;

/// Replays `trace` (a sequence of requests, each a run of keys read as a prompt prefix:
/// look up, get the cached prefix, put the rest) and returns the hit ratio in keys.
fn replay<'a>(
    policy: EvictionPolicy,
    pages: u64,
    trace: impl Iterator<Item = Vec<&'a [u8]>>,
) -> f64 {
    // Each value is a few bytes: with its key it fits one page, so capacity = pages entries.
    let e = Engine::new(EngineConfig {
        capacity: pages * PAGE,
        staging: 64 * PAGE,
        max_value: PAGE,
        policy,
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
    let zipf = zipf_trace(a.keys, a.alpha, a.requests, 42);
    println!("| trace | cache size | S3-FIFO hit ratio | LRU hit ratio | S3-FIFO / LRU |");
    println!("|---|---|---|---|---|");
    for pct in [1u64, 5, 10] {
        let pages = (a.keys as u64 * pct / 100).max(64);
        let run = |p| replay(p, pages, zipf.iter().map(|k| vec![&k[..]]));
        let (s3, lru) = (run(EvictionPolicy::S3Fifo), run(EvictionPolicy::Lru));
        println!(
            "| Zipf α={} ({} keys, {} requests) | {pct}% ({pages} entries) | {:.4} | {:.4} | {:.3} |",
            a.alpha,
            a.keys,
            a.requests,
            s3,
            lru,
            s3 / lru
        );
    }
    let chat_requests = a.requests / 20;
    let chat: Vec<Vec<[u8; 16]>> = {
        let mut w = ChatWorkload::new(ChatConfig {
            users: 200,
            system_prompts: 20,
            ..ChatConfig::default()
        });
        (0..chat_requests).map(|_| w.next_request().keys).collect()
    };
    let distinct: std::collections::HashSet<&[u8; 16]> = chat.iter().flatten().collect();
    for pct in [5u64, 10, 25] {
        let pages = (distinct.len() as u64 * pct / 100).max(64);
        let run = |p| {
            replay(
                p,
                pages,
                chat.iter().map(|r| r.iter().map(|k| &k[..]).collect()),
            )
        };
        let (s3, lru) = (run(EvictionPolicy::S3Fifo), run(EvictionPolicy::Lru));
        println!(
            "| chat (200 users, 20 system prompts, {} requests, {} distinct chunks) | {pct}% ({pages} entries) | {:.4} | {:.4} | {:.3} |",
            chat_requests,
            distinct.len(),
            s3,
            lru,
            s3 / lru
        );
    }
    Ok(())
}
