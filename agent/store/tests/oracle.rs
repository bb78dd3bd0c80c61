//! Oracle tests: random writes, removes, reads and flushes against a model, across reopens
//! (clean, and crashes simulated by dropping without a flush), on every engine.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};

use common::*;
use nencache_store::{IoEngineKind, LogStore, ReadOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
struct Live {
    version: u64,
    len: usize,
    meta: Vec<u8>,
}

#[derive(Default)]
struct Model {
    /// The last value written to each hash and not removed (the store may have evicted it).
    live: HashMap<u128, Live>,
    /// Removed since the last write or flush: their tombstones are only queued, so after a
    /// crash they may come back, with exactly the value they had.
    pending_removes: HashMap<u128, Live>,
}

const SIZES: [usize; 10] = [
    0, 1, 100, 4095, 4096, 4097, 10_000, 65_536, 200_000, 300_000,
];

/// Every entry the store indexes reads back byte-identical to the model's value, and the
/// model has it; entries the store no longer indexes were evicted and leave the model.
fn verify(store: &LogStore, model: &mut Model, when: &str) {
    let idx = store.indexed();
    let mut seen = HashSet::new();
    for chunk in idx.chunks(16) {
        let got = read_many(store, chunk);
        for ((h, loc), (outcome, bytes, meta)) in chunk.iter().zip(got) {
            let Some(m) = model.live.get(h) else {
                panic!(
                    "{when}: the store holds {h:x} (seq {}), which the model removed or never wrote",
                    loc.seq
                );
            };
            assert_eq!(outcome, ReadOutcome::Hit, "{when}: {h:x}");
            assert_eq!(bytes.len(), m.len, "{when}: {h:x}");
            assert!(
                bytes == value(*h, m.version, m.len)[..],
                "{when}: {h:x} returned other bytes"
            );
            assert_eq!(meta, m.meta, "{when}: {h:x} metadata");
            seen.insert(*h);
        }
    }
    model.live.retain(|h, _| seen.contains(h));
}

fn oracle(engine: IoEngineKind, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), engine, 6);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::default();
    let mut version = 0u64;
    let (mut store, rec) = LogStore::open(cfg.clone()).unwrap();
    assert_eq!(rec.entries, 0);
    let expected_engine = match engine {
        IoEngineKind::IoUring => "io_uring",
        IoEngineKind::Pread => "pread",
        _ => "mmap",
    };
    assert_eq!(store.io_engine(), expected_engine);
    let mut totals = (0u64, 0u64);
    for round in 0..8 {
        for _ in 0..120 {
            let dice = rng.random_range(0..100);
            if dice < 55 {
                let n = rng.random_range(1..=4);
                let mut items = Vec::new();
                for _ in 0..n {
                    let h: u128 = rng.random_range(0..64u128) * 0x1_0000_0001 + 7;
                    version += 1;
                    let len = SIZES[rng.random_range(0..SIZES.len())];
                    let meta: Vec<u8> = (0..rng.random_range(0..20))
                        .map(|i| (i as u8) ^ (version as u8))
                        .collect();
                    let expired = rng.random_range(0..20) == 0;
                    items.push((h, version, len, meta, expired));
                }
                let vals: Vec<_> = items
                    .iter()
                    .map(|(h, v, len, ..)| value(*h, *v, *len))
                    .collect();
                let keys: Vec<_> = items.iter().map(|(h, ..)| key(*h)).collect();
                let reqs: Vec<_> = items
                    .iter()
                    .zip(&vals)
                    .zip(&keys)
                    .map(|((it, v), k)| nencache_store::WriteReq {
                        hash: it.0,
                        key: k,
                        metadata: &it.3,
                        value: v.as_ptr(),
                        value_len: v.len() as u64,
                        expires_unix_ms: if it.4 { 1 } else { u64::MAX },
                    })
                    .collect();
                // SAFETY: the values are AlignedBufs that outlive the call.
                let res = unsafe { store.write(&reqs) };
                for (it, r) in items.iter().zip(res) {
                    let loc = r.unwrap();
                    assert_eq!(loc.value_len, it.2 as u64);
                    if it.4 {
                        model.live.remove(&it.0);
                    } else {
                        model.live.insert(
                            it.0,
                            Live {
                                version: it.1,
                                len: it.2,
                                meta: it.3.clone(),
                            },
                        );
                    }
                }
                model.pending_removes.clear();
            } else if dice < 72 {
                let h: u128 = rng.random_range(0..64u128) * 0x1_0000_0001 + 7;
                let existed = store.remove(h);
                let old = model.live.remove(&h);
                if existed {
                    let old = old.unwrap_or_else(|| {
                        panic!("remove found {h:x}, which the model does not hold")
                    });
                    model.pending_removes.insert(h, old);
                }
                assert!(store.locate(h).is_none());
            } else if dice < 95 {
                let h: u128 = rng.random_range(0..64u128) * 0x1_0000_0001 + 7;
                if let Some((outcome, bytes, meta)) = get(&store, h) {
                    let m = model
                        .live
                        .get(&h)
                        .unwrap_or_else(|| panic!("located {h:x}, not in the model"));
                    assert_eq!(outcome, ReadOutcome::Hit);
                    assert!(bytes == value(h, m.version, m.len)[..]);
                    assert_eq!(meta, m.meta);
                }
            } else {
                store.flush().unwrap();
                model.pending_removes.clear();
            }
        }
        verify(&store, &mut model, &format!("round {round} before close"));
        let s = store.stats();
        assert_eq!(s.corrupt, 0);
        assert_eq!(s.io_errors, 0);
        assert!(store.degraded().is_none());
        totals.0 += s.region_evictions;
        totals.1 += s.reinserted;
        let crash = match round % 3 {
            0 => {
                store.flush().unwrap();
                drop(store);
                false
            }
            1 => {
                drop(store);
                true
            }
            _ => {
                store.flush().unwrap();
                let h = 0xdead_0000u128 + round as u128;
                version += 1;
                put(&store, h, b"late", &value(h, version, 5000)).unwrap();
                model.live.insert(
                    h,
                    Live {
                        version,
                        len: 5000,
                        meta: b"late".to_vec(),
                    },
                );
                model.pending_removes.clear();
                drop(store);
                true
            }
        };
        let (s2, rec) = LogStore::open(cfg.clone()).unwrap();
        store = s2;
        assert!(rec.reset.is_none());
        if crash {
            for (h, old) in model.pending_removes.drain() {
                if store.locate(h).is_some() {
                    model.live.insert(h, old);
                }
            }
        } else {
            assert!(
                rec.from_checkpoint,
                "round {round}: a clean close reopens from its checkpoint"
            );
        }
        model.pending_removes.clear();
        let before = model.live.len();
        verify(
            &store,
            &mut model,
            &format!("round {round} after reopen (crash: {crash})"),
        );
        if !crash {
            assert_eq!(model.live.len(), before, "a clean close loses nothing");
        }
    }
    assert!(totals.0 > 0, "the test evicted no region");
    assert!(totals.1 > 0, "the test reinserted nothing");
}

#[test]
fn oracle_io_uring() {
    oracle(IoEngineKind::IoUring, 1);
}

#[test]
fn oracle_pread() {
    oracle(IoEngineKind::Pread, 2);
}

#[test]
fn oracle_mmap() {
    oracle(IoEngineKind::Mmap, 3);
}

#[test]
fn oracle_auto_picks_an_engine() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::Auto, 4);
    let (store, _) = LogStore::open(cfg).unwrap();
    assert!(["io_uring", "pread"].contains(&store.io_engine()));
    let h = 5;
    put(&store, h, b"m", &value(h, 1, 9000)).unwrap();
    let (o, b, m) = get(&store, h).unwrap();
    assert_eq!(o, ReadOutcome::Hit);
    assert!(b == value(h, 1, 9000)[..]);
    assert_eq!(m, b"m");
}
