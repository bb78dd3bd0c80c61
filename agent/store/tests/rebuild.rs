//! Property: for arbitrary operation sequences, the index rebuilt at open (from the
//! checkpoint and a scan, and from a scan alone) equals the index before close.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nencache_store::{IoEngineKind, Location, LogStore};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Put { h: u8, len: usize, expired: bool },
    Remove(u8),
    Read(u8),
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..12, prop::sample::select(vec![0usize, 1, 4096, 9000, 70_000, 300_000]), prop::bool::weighted(0.1))
            .prop_map(|(h, len, expired)| Op::Put { h, len, expired }),
        2 => (0u8..12).prop_map(Op::Remove),
        2 => (0u8..12).prop_map(Op::Read),
        1 => Just(Op::Flush),
    ]
}

fn snapshot(store: &LogStore) -> Vec<(u128, Location)> {
    let mut v = store.indexed();
    v.sort_by_key(|(h, _)| *h);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn rebuilt_index_equals_the_index_before_close(
        engine in prop::sample::select(vec![IoEngineKind::IoUring, IoEngineKind::Pread, IoEngineKind::Mmap]),
        ops in prop::collection::vec(op(), 1..50),
        clean in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 3);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        let mut version = 0;
        for op in ops {
            match op {
                Op::Put { h, len, expired } => {
                    version += 1;
                    let h = u128::from(h);
                    let exp = if expired { 1 } else { u64::MAX };
                    put_exp(&store, h, &[h as u8; 3], &value(h, version, len), exp).unwrap();
                }
                Op::Remove(h) => {
                    store.remove(u128::from(h));
                }
                Op::Read(h) => {
                    let _ = get(&store, u128::from(h));
                }
                Op::Flush => store.flush().unwrap(),
            }
        }
        if clean {
            store.flush().unwrap();
        } else {
            // Writes the queued tombstones, then "crashes" (no flush, no checkpoint).
            version += 1;
            put(&store, 1000, b"", &value(1000, version, 10)).unwrap();
        }
        let before = snapshot(&store);
        drop(store);
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        if clean {
            prop_assert!(rec.from_checkpoint);
        }
        prop_assert_eq!(&snapshot(&store), &before);
        drop(store);
        let _ = std::fs::remove_file(ckpt_path(&cfg));
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        prop_assert!(!rec.from_checkpoint);
        prop_assert_eq!(&snapshot(&store), &before);
    }
}
