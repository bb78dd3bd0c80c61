//! Eviction-policy comparison: replays a Zipf trace and a prefix-sharing chat trace through
//! the real engine (a small arena, one page per chunk) under S3-FIFO and under LRU, and
//! prints the hit ratio of each at several cache sizes; then replays a trace of mixed value
//! sizes (64 KiB to 16 MiB) with leases held across requests, as real clients hold them, and
//! prints the hit ratio and how many bytes each policy evicted per byte it admitted.
//!
//! With `--hierarchy` it instead replays the Zipf and chat traces through S3-FIFO host
//! memory of a tenth of the distinct keys, alone and over a T2 tier (a store file) sized for
//! the other nine tenths, and compares the hit ratios.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Args;
use nencache_engine::{
    Engine, EngineConfig, EngineError, EvictionPolicy, HostConfig, IoEngineKind, Limits, PutItem,
    Reserved, StoreConfig,
    config::{Admission, Tier, TierConfig},
    traces::{ChatConfig, ChatWorkload, Rng, Zipf, zipf_trace},
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
    /// Mixed-size trace: requests.
    #[arg(long, default_value_t = 20_000)]
    pub mixed_requests: usize,
    /// Mixed-size trace: distinct values (Zipf-popular, α as above).
    #[arg(long, default_value_t = 1000)]
    pub mixed_keys: usize,
    /// Mixed-size trace: arena size in MiB.
    #[arg(long, default_value_t = 256)]
    pub mixed_arena_mib: u64,
    /// Mixed-size trace: a hit's lease is held for a uniform 0 to twice this many requests.
    #[arg(long, default_value_t = 32)]
    pub mixed_hold: usize,
    /// Instead of the tables above: S3-FIFO host memory of a tenth of the distinct keys,
    /// alone and over a T2 tier holding the other nine tenths, on the Zipf and chat traces.
    #[arg(long)]
    pub hierarchy: bool,
    /// `--hierarchy`: where the T2 file goes (in a temporary directory made under it; not
    /// tmpfs, which O_DIRECT cannot use).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
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
        limits: Limits {
            max_value: PAGE,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: pages * PAGE,
            staging: 64 * PAGE,
            policy,
            small_queue_percent: small,
            ..HostConfig::default()
        },
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

/// The Zipf trace (one key per request) and the chat trace (a prompt's chunk keys per
/// request).
type Trace = Vec<Vec<Vec<u8>>>;

fn traces(a: &PolicyArgs) -> (Trace, Trace) {
    let zipf: Trace = zipf_trace(a.keys, a.alpha, a.requests, 42)
        .iter()
        .map(|k| vec![k.to_vec()])
        .collect();
    let chat: Trace = {
        let mut w = ChatWorkload::new(ChatConfig {
            users: 200,
            system_prompts: 20,
            ..ChatConfig::default()
        });
        (0..a.requests / 20)
            .map(|_| w.next_request().keys.iter().map(|k| k.to_vec()).collect())
            .collect()
    };
    (zipf, chat)
}

/// Runs the comparison and prints a table.
pub fn run(a: &PolicyArgs) -> anyhow::Result<()> {
    if a.hierarchy {
        return hierarchy(a);
    }
    let (zipf, chat) = traces(a);
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
    println!();
    println!(
        "Mixed sizes (64 KiB to 16 MiB, log-uniform), {} values, Zipf α={}, {} requests, {} MiB \
         arena, hit leases held 0 to {} requests:",
        a.mixed_keys,
        a.alpha,
        a.mixed_requests,
        a.mixed_arena_mib,
        2 * a.mixed_hold
    );
    println!();
    println!(
        "| policy | hit ratio | evicted/admitted bytes | same, puts that evicted | most evicted \
         by one put | mean occupancy | entries leased (mean) | puts refused |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, policy) in [
        ("S3-FIFO (small 30%)", EvictionPolicy::S3Fifo),
        ("LRU", EvictionPolicy::Lru),
    ] {
        let m = replay_mixed(policy, a)?;
        println!(
            "| {name} | {:.4} | {:.3} | {:.3} | {:.1} MiB ({:.1}% of the arena) | {:.1}% | {:.1} of {:.1} | {} |",
            m.hit_ratio,
            m.evicted_per_admitted,
            m.evicted_per_admitted_evicting,
            m.most_evicted as f64 / f64::from(1 << 20),
            m.most_evicted as f64 * 100.0 / (a.mixed_arena_mib << 20) as f64,
            m.occupancy * 100.0,
            m.mean_leases,
            m.mean_entries,
            m.refused
        );
    }
    Ok(())
}

/// What the mixed-size replay measured, after the cache first filled.
struct Mixed {
    hit_ratio: f64,
    /// Bytes evicted per byte admitted, over every put.
    evicted_per_admitted: f64,
    /// The same over the puts that evicted something.
    evicted_per_admitted_evicting: f64,
    /// The most bytes one put evicted.
    most_evicted: u64,
    /// Mean share of the arena in use, seen at each put.
    occupancy: f64,
    mean_leases: f64,
    mean_entries: f64,
    refused: u64,
}

/// Replays a Zipf trace of values of mixed sizes: a hit keeps its lease for a while (so leased
/// entries are scattered through the arena, as with real clients), a miss puts the value.
/// Evicted bytes are measured from the arena's use around each put (nothing else frees space
/// in this trace: no deletes, overwrites or TTLs).
fn replay_mixed(policy: EvictionPolicy, a: &PolicyArgs) -> anyhow::Result<Mixed> {
    const MIN: f64 = 64.0 * 1024.0;
    const MAX: u64 = 16 << 20;
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: MAX,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: a.mixed_arena_mib << 20,
            staging: 64 << 20,
            policy,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })?;
    let s = e.open_session()?;
    let mut rng = Rng::new(17);
    let sizes: Vec<u64> = (0..a.mixed_keys)
        .map(|_| ((MIN * (MAX as f64 / MIN).powf(rng.unit())) as u64).min(MAX))
        .collect();
    let zipf = Zipf::new(a.mixed_keys, a.alpha);
    let mut held: BinaryHeap<Reverse<(usize, u64)>> = BinaryHeap::new();
    let (mut hits, mut requests, mut refused) = (0u64, 0u64, 0u64);
    let (mut admitted, mut evicted) = (0u64, 0u64);
    let (mut admitted_ev, mut evicted_ev, mut most) = (0u64, 0u64, 0u64);
    let (mut occupancy, mut leases, mut entries) = (0f64, 0f64, 0f64);
    let mut warm = false;
    for i in 0..a.mixed_requests {
        while let Some(&Reverse((due, id))) = held.peek() {
            if due > i {
                break;
            }
            held.pop();
            e.release(s, &[id])?;
        }
        let k = zipf.sample(&mut rng);
        let key = (k as u64).to_le_bytes();
        let got = e.get(s, &[&key])?;
        if let Some(l) = got.into_iter().flatten().next() {
            held.push(Reverse((i + rng.range(0, 2 * a.mixed_hold + 1), l.id)));
            if warm {
                hits += 1;
                requests += 1;
            }
            continue;
        }
        let before = e.stats();
        let it = PutItem {
            key: &key,
            value_len: sizes[k],
            metadata: b"",
            ttl: None,
            overwrite: false,
        };
        // The value's bytes do not matter here: reserve and commit what staging holds.
        let put = match e.reserve(s, &[it]) {
            Ok(r) => match r[0] {
                Reserved::Space { id, .. } => {
                    e.commit(s, &[(id, None)])?;
                    true
                }
                Reserved::Exists => false,
            },
            Err(EngineError::NoSpace { .. }) => {
                refused += u64::from(warm);
                false
            }
            Err(err) => return Err(err.into()),
        };
        let after = e.stats();
        if !warm {
            // Measure from the first eviction on: the cache is full from there.
            warm = after.evictions > 0;
            continue;
        }
        requests += 1;
        occupancy += after.used_bytes as f64 / after.capacity_bytes as f64;
        leases += after.leases as f64;
        entries += after.entries as f64;
        if put {
            let page = 4096;
            let size = (sizes[k] + key.len() as u64).div_ceil(page) * page;
            let ev = (before.used_bytes + size).saturating_sub(after.used_bytes);
            admitted += size;
            evicted += ev;
            if ev > 0 {
                admitted_ev += size;
                evicted_ev += ev;
                most = most.max(ev);
            }
        }
    }
    let n = requests.max(1) as f64;
    Ok(Mixed {
        hit_ratio: hits as f64 / n,
        evicted_per_admitted: evicted as f64 / admitted.max(1) as f64,
        evicted_per_admitted_evicting: evicted_ev as f64 / admitted_ev.max(1) as f64,
        most_evicted: most,
        occupancy: occupancy / (requests - hits).max(1) as f64,
        mean_leases: leases / (requests - hits).max(1) as f64,
        mean_entries: entries / (requests - hits).max(1) as f64,
        refused,
    })
}

/// What a replay through host memory, and maybe a T2 tier, measured.
#[derive(Debug, Default)]
struct TierReplay {
    /// Keys requested.
    keys: u64,
    /// Keys a get returned (from any tier).
    hits: u64,
    /// Of those, values read from T2 (promotions).
    t2_hits: u64,
    /// Entries written to T2.
    demotions: u64,
    /// Host entries evicted that T2 did not hold.
    unsaved: u64,
    /// T2 entries dropped with their region.
    t2_evictions: u64,
    /// Wall time of the replay.
    elapsed: Duration,
}

/// Replays `trace` as [`replay`] does (S3-FIFO, small queue 30%, one page per entry), over a
/// T2 tier if `t2` is given. After each get and each put it runs demotion rounds until one
/// writes nothing, as the agent's background demoter would between requests, so that the
/// replay does not depend on thread timing.
fn replay_tiers(pages: u64, t2: Option<StoreConfig>, trace: &Trace) -> anyhow::Result<TierReplay> {
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: PAGE,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: pages * PAGE,
            staging: 64 * PAGE,
            policy: EvictionPolicy::S3Fifo,
            small_queue_percent: 30,
            ..HostConfig::default()
        },
        tiers: t2
            .into_iter()
            .map(|store| TierConfig {
                tier: Tier::Nvme,
                store,
                admission: Admission::All,
            })
            .collect(),
        ..EngineConfig::default()
    })?;
    let s = e.open_session()?;
    let settle = || while e.demote() > 0 {};
    let mut r = TierReplay::default();
    let start = Instant::now();
    for request in trace {
        let keys: Vec<&[u8]> = request.iter().map(Vec::as_slice).collect();
        r.keys += keys.len() as u64;
        let prefix = e.lookup(&keys)?.prefix;
        let got = e.get(s, &keys[..prefix])?;
        let ids: Vec<u64> = got.iter().flatten().map(|l| l.id).collect();
        r.hits += ids.len() as u64;
        e.release(s, &ids)?;
        settle();
        for k in &keys[prefix..] {
            let it = PutItem {
                key: k,
                value_len: 8,
                metadata: b"",
                ttl: None,
                overwrite: false,
            };
            // A key some tier already holds answers Exists; nothing to do then.
            let _ = e.put_local(s, it, b"kvchunk!");
            settle();
        }
    }
    r.elapsed = start.elapsed();
    let st = e.stats();
    r.t2_hits = st.promotions;
    r.demotions = st.demotions;
    r.unsaved = st.evictions_unsaved;
    r.t2_evictions = e.tier_stats().iter().map(|t| t.store.evictions).sum();
    Ok(r)
}

/// Host memory alone against host memory over T2, on both traces.
fn hierarchy(a: &PolicyArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.dir)?;
    let dir = tempfile::Builder::new()
        .prefix("nencache-policy-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("making a directory under {}", a.dir.display()))?;
    let (zipf, chat) = traces(a);
    println!(
        "| trace | distinct keys | host (1/10) | T2 (entries) | host only: hit ratio | \
         host + T2: hit ratio | of which from T2 | host + T2 / host only | every key cached \
         (compulsory misses only) | entries written to T2 | host evictions T2 did not hold | \
         T2 evictions |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, trace) in [
        (
            format!(
                "Zipf α={}, {} keys, {} requests",
                a.alpha,
                a.keys,
                zipf.len()
            ),
            &zipf,
        ),
        (
            format!(
                "chat: 200 users, 20 system prompts, {} requests",
                chat.len()
            ),
            &chat,
        ),
    ] {
        let distinct = trace.iter().flatten().collect::<HashSet<_>>().len() as u64;
        let pages = (distinct / 10).max(64);
        let rest = distinct.saturating_sub(pages);
        // A T2 entry of a one-page value takes a header block and the value's page; regions
        // of 1 MiB hold 128, and one more region is the one being filled.
        let region = 1u64 << 20;
        let per_region = region / (2 * PAGE);
        let regions = rest.div_ceil(per_region).max(1) + 1;
        let path = dir.path().join("hierarchy.t2");
        let store = StoreConfig {
            path: path.clone(),
            capacity: regions * region,
            region_size: region,
            io_engine: IoEngineKind::Auto,
            queue_depth: 32,
            slow_io: Duration::from_secs(60),
        };
        eprintln!("{name}: host only");
        let alone = replay_tiers(pages, None, trace)?;
        eprintln!("{name}: host over T2");
        let both = replay_tiers(pages, Some(store), trace)?;
        for e in std::fs::read_dir(dir.path())? {
            std::fs::remove_file(e?.path())?;
        }
        let ratio = |r: &TierReplay| r.hits as f64 / r.keys.max(1) as f64;
        let bound = 1.0 - distinct as f64 / alone.keys.max(1) as f64;
        println!(
            "| {name} | {distinct} | {pages} | {} | {:.4} | {:.4} | {:.4} | {:.3}x | {bound:.4} | \
             {} | {} | {} |",
            regions * per_region,
            ratio(&alone),
            ratio(&both),
            both.t2_hits as f64 / both.keys.max(1) as f64,
            ratio(&both) / ratio(&alone),
            both.demotions,
            both.unsaved,
            both.t2_evictions,
        );
        eprintln!(
            "{name}: host only {:.1} s, host over T2 {:.1} s",
            alone.elapsed.as_secs_f64(),
            both.elapsed.as_secs_f64()
        );
    }
    Ok(())
}
