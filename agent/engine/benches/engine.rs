//! Criterion benchmarks of the engine's bookkeeping per call, with values of one page so that
//! copies do not hide it: a put into a full arena (each one evicts), the same with a tenth of
//! the entries leased (eviction has to pass over them), and a get of a cached key with its
//! release.
//!
//! Run: `cargo bench -p nencache-engine --bench engine`

// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use nencache_engine::{Engine, EngineConfig, HostConfig, Limits, PutItem, traces::Rng};

const PAGES: u64 = 4096;

fn item(key: &[u8]) -> PutItem<'_> {
    PutItem {
        key,
        value_len: 0,
        metadata: b"",
        ttl: None,
        overwrite: false,
    }
}

fn full_engine() -> (Engine, u64) {
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: 1 << 20,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: PAGES * 4096,
            staging: 1 << 20,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })
    .expect("engine");
    let s = e.open_session().expect("session");
    for k in 0..PAGES {
        e.put_local(s, item(&k.to_le_bytes()), &[1; 100])
            .expect("fill");
    }
    (e, s)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine");
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("put_evicting_one_page", |b| {
        let (e, s) = full_engine();
        let mut k = PAGES;
        b.iter(|| {
            k += 1;
            black_box(e.put_local(s, item(&k.to_le_bytes()), &[2; 100]))
        });
    });
    g.bench_function("put_evicting_one_page_tenth_leased", |b| {
        let (e, s) = full_engine();
        let mut rng = Rng::new(3);
        // Lease a tenth of the entries, spread over the key space; read the rest once so that
        // S3-FIFO has moved them to its main queue.
        let mut held = 0;
        for k in 0..PAGES {
            let l = e.get(s, &[&k.to_le_bytes()]).expect("get");
            if rng.range(0, 10) == 0 {
                held += 1;
            } else {
                let ids: Vec<u64> = l.iter().flatten().map(|l| l.id).collect();
                e.release(s, &ids).expect("release");
            }
        }
        black_box(held);
        let mut k = PAGES;
        b.iter(|| {
            k += 1;
            black_box(e.put_local(s, item(&k.to_le_bytes()), &[2; 100]))
        });
    });
    g.bench_function("get_and_release_hit", |b| {
        let (e, s) = full_engine();
        let mut rng = Rng::new(5);
        b.iter(|| {
            let k = (rng.range(0, PAGES as usize) as u64).to_le_bytes();
            let l = e.get(s, &[&k]).expect("get");
            let ids: Vec<u64> = l.iter().flatten().map(|l| l.id).collect();
            e.release(s, &ids).expect("release");
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
