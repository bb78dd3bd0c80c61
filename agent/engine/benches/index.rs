//! Criterion benchmarks of the Robin Hood index at 50% and 87% load, against std's HashMap
//! with the same keys in the same run.
//!
//! Run: `cargo bench -p nencache-engine --bench index`

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::{collections::HashMap, hint::black_box};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nencache_engine::{index::RobinHoodIndex, key_hash};

fn hashes(n: usize) -> Vec<u128> {
    (0..n as u64)
        .map(|i| key_hash(&i.to_le_bytes(), 0x5eed))
        .collect()
}

fn bench(c: &mut Criterion) {
    const CAP: usize = 1 << 18;
    let mut g = c.benchmark_group("index");
    for load in [50usize, 87] {
        let n = CAP * load / 100;
        let hs = hashes(n);
        let misses = hashes(2 * n)[n..].to_vec();
        let mut ix = RobinHoodIndex::with_capacity(CAP);
        let mut map = HashMap::with_capacity(CAP);
        for (i, &h) in hs.iter().enumerate() {
            ix.insert(h, i as u32);
            map.insert(h, i as u32);
        }
        g.bench_function(BenchmarkId::new("robin_hood_hit", load), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(ix.get(hs[i]))
            });
        });
        g.bench_function(BenchmarkId::new("hashmap_hit", load), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(map.get(&hs[i]))
            });
        });
        g.bench_function(BenchmarkId::new("robin_hood_miss", load), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(ix.get(misses[i]))
            });
        });
        g.bench_function(BenchmarkId::new("robin_hood_remove_insert", load), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7919) % n;
                let e = ix.remove(hs[i]);
                ix.insert(hs[i], e.unwrap_or(0));
            });
        });
        g.bench_function(BenchmarkId::new("hashmap_remove_insert", load), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 7919) % n;
                let e = map.remove(&hs[i]);
                map.insert(hs[i], e.unwrap_or(0));
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
