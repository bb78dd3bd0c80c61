//! Reads from several threads while a writer keeps reusing regions: every hit carries
//! exactly the bytes written for that key and version, never a mix.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use nencache_store::{LogStore, ReadOutcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn readers_racing_region_reuse_see_whole_values_or_misses() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 3);
        let (store, _) = LogStore::open(cfg).unwrap();
        let store = Arc::new(store);
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..3)
            .map(|t| {
                let (store, stop, hits) = (store.clone(), stop.clone(), hits.clone());
                std::thread::spawn(move || {
                    let mut rng = StdRng::seed_from_u64(t);
                    while !stop.load(Ordering::Relaxed) {
                        let h: u128 = rng.random_range(0..24);
                        let Some(loc) = store.locate(h) else { continue };
                        let (o, b, m) = read_at(&store, h, loc);
                        match o {
                            ReadOutcome::Hit => {
                                let version = u64::from_le_bytes(b[..8].try_into().unwrap());
                                assert_eq!(m, version.to_le_bytes(), "metadata of another write");
                                assert!(
                                    b == value(h, version, b.len())[..],
                                    "torn or foreign bytes for {h}"
                                );
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                            ReadOutcome::Miss => {}
                            other => panic!("{other:?} without any fault"),
                        }
                    }
                })
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(99);
        for version in 1..=400u64 {
            let h: u128 = rng.random_range(0..24);
            let len = rng.random_range(8..120_000);
            put(&store, h, &version.to_le_bytes(), &value(h, version, len)).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        let st = store.stats();
        assert!(
            st.region_evictions >= 3,
            "{engine:?}: regions were reused ({st:?})"
        );
        assert_eq!(st.corrupt, 0);
        assert!(hits.load(Ordering::Relaxed) > 0);
    }
}
