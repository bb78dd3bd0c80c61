//! Device faults through the `testing` wrapper: EIO and ENOSPC on writes and allocation,
//! failed reads and syncs, slow reads, a batch torn by a failed write. The store degrades,
//! keeps serving reads where it can, refuses writes, and recovers through a probe write;
//! ENOSPC beyond the regions it already has caps it to those instead.

#![cfg(feature = "testing")]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use nencache_store::testing::{FaultOp, FaultRule, Faults};
use nencache_store::{LogStore, ReadOutcome, StoreConfig, StoreError};

fn open(cfg: &StoreConfig) -> (LogStore, Faults) {
    let faults = Faults::new();
    let (store, _) = LogStore::open_with_faults(cfg.clone(), faults.clone()).unwrap();
    (store, faults)
}

#[test]
fn eio_on_write_degrades_and_older_entries_stay_readable() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 9000)).unwrap();
        put(&store, 2, b"", &value(2, 1, 9000)).unwrap();
        let rule = faults.add(FaultRule::fail(FaultOp::Write, libc::EIO));
        match put(&store, 3, b"", &value(3, 1, 9000)) {
            Err(StoreError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EIO))
            }
            other => panic!("{engine:?}: {other:?}"),
        }
        let why = store.degraded().expect("degraded after EIO");
        assert!(why.contains("offset"), "{why}");
        assert!(store.locate(3).is_none());
        // Refused without touching the device while degraded.
        let before = faults.seen(FaultOp::Write);
        assert!(matches!(
            put(&store, 4, b"", &value(4, 1, 10)),
            Err(StoreError::Degraded(_))
        ));
        assert_eq!(faults.seen(FaultOp::Write), before);
        for h in [1u128, 2] {
            let (o, b, _) = get(&store, h).unwrap();
            assert_eq!(
                o,
                ReadOutcome::Hit,
                "{engine:?}: reads go on while degraded"
            );
            assert!(b == value(h, 1, 9000)[..]);
        }
        let st = store.stats();
        assert_eq!(st.io_errors, 1);
        assert_eq!(st.write_refusals, 1);
        // The device heals; the next probe write succeeds and ends the degraded state.
        faults.remove(rule);
        store.set_retry_interval(Duration::ZERO);
        put(&store, 5, b"", &value(5, 1, 9000)).unwrap();
        assert!(store.degraded().is_none());
        assert_eq!(get(&store, 5).unwrap().0, ReadOutcome::Hit);
        // A probe that fails keeps the store degraded.
        faults.add(FaultRule::fail(FaultOp::Write, libc::EIO).times(1));
        assert!(put(&store, 6, b"", &value(6, 1, 10)).is_err());
        assert!(
            put(&store, 6, b"", &value(6, 1, 10)).is_ok(),
            "the rule fired once; the probe succeeds"
        );
        assert!(store.degraded().is_none());
        drop(store);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        for h in [1u128, 2, 5, 6] {
            assert_eq!(
                get(&store, h).unwrap().0,
                ReadOutcome::Hit,
                "{engine:?} {h}"
            );
        }
        assert!(store.locate(3).is_none());
    }
}

#[test]
fn enospc_at_region_allocation_degrades_then_recovers() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        let a = put(&store, 1, b"", &value(1, 1, 300_000)).unwrap();
        faults.add(FaultRule::fail(FaultOp::Allocate, libc::ENOSPC));
        let mut refused = None;
        for h in 2..10u128 {
            if let Err(e) = put(&store, h, b"", &value(h, 1, 300_000)) {
                refused = Some(e);
                break;
            }
        }
        match refused {
            Some(StoreError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC))
            }
            other => panic!("{engine:?}: {other:?}"),
        }
        let why = store.degraded().unwrap();
        assert!(why.contains("No space") || why.contains("space"), "{why}");
        assert_eq!(read_at(&store, 1, a).0, ReadOutcome::Hit);
        faults.clear();
        store.set_retry_interval(Duration::ZERO);
        put(&store, 20, b"", &value(20, 1, 300_000)).unwrap();
        assert!(store.degraded().is_none());
    }
}

/// Every indexed entry reads back as `value(h, 1, len)`; returns how many there are.
fn all_indexed_read_back(store: &LogStore, len: usize, what: &str) -> usize {
    let items = store.indexed();
    for ((h, _), (o, b, _)) in items.iter().zip(read_many(store, &items)) {
        assert_eq!(o, ReadOutcome::Hit, "{what}: {h}");
        assert!(b == value(*h, 1, len)[..], "{what}: {h}");
    }
    items.len()
}

#[test]
fn enospc_beyond_the_allocated_regions_caps_the_store_instead_of_degrading_it() {
    const LEN: usize = 300_000; // three per 1 MiB region
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 6);
        let (store, faults) = open(&cfg);
        // The device holds three regions: preallocating any later one fails.
        faults.add(
            FaultRule::fail(FaultOp::Allocate, libc::ENOSPC).at_offsets(4096 + 3 * MIB..u64::MAX),
        );
        for h in 1..=40u128 {
            put(&store, h, b"", &value(h, 1, LEN))
                .unwrap_or_else(|e| panic!("{engine:?}: write {h}: {e}"));
            assert!(store.degraded().is_none(), "{engine:?}: {h}");
        }
        let st = store.stats();
        assert_eq!(st.capacity_bytes, 3 * MIB, "{engine:?}");
        assert!(st.region_evictions > 0, "{engine:?}: {st:?}");
        assert_eq!(st.io_errors, 0, "{engine:?}");
        let n = all_indexed_read_back(&store, LEN, &format!("{engine:?}"));
        assert!((6..=9).contains(&n), "{engine:?}: {n} entries");
        assert_eq!(get(&store, 40).unwrap().0, ReadOutcome::Hit);
        drop(store);
        // A restart tries the configured size again.
        let (store, faults) = open(&cfg);
        assert_eq!(store.stats().capacity_bytes, 6 * MIB, "{engine:?}");
        assert_eq!(all_indexed_read_back(&store, LEN, "reopened"), n);
        drop((store, faults));

        // When even the store's own regions cannot be allocated again, the store degrades
        // (and evicts nothing), as with no sealed region.
        let dir = tempfile::tempdir().unwrap();
        let cfg = common::cfg(dir.path(), engine, 6);
        let (store, faults) = open(&cfg);
        for h in 1..=7u128 {
            put(&store, h, b"", &value(h, 1, LEN)).unwrap();
        }
        let full = faults.add(FaultRule::fail(FaultOp::Allocate, libc::ENOSPC));
        let mut refused = None;
        for h in 8..20u128 {
            if let Err(e) = put(&store, h, b"", &value(h, 1, LEN)) {
                refused = Some(e);
                break;
            }
        }
        assert!(
            matches!(&refused, Some(StoreError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOSPC)),
            "{engine:?}: {refused:?}"
        );
        assert!(store.degraded().is_some(), "{engine:?}");
        let st = store.stats();
        assert_eq!((st.region_evictions, st.capacity_bytes), (0, 6 * MIB));
        assert_eq!(all_indexed_read_back(&store, LEN, "degraded"), 9);
        faults.remove(full);
        store.set_retry_interval(Duration::ZERO);
        put(&store, 30, b"", &value(30, 1, LEN)).unwrap();
        assert!(store.degraded().is_none(), "{engine:?}");
    }
}

#[test]
fn delayed_reads_mark_the_store_slow_until_a_normal_read() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg(dir.path(), engine, 4);
        cfg.slow_io = Duration::from_millis(200);
        let (store, faults) = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 9000)).unwrap();
        let rule = faults.add(FaultRule::delay(FaultOp::Read, Duration::from_millis(400)));
        let (o, b, _) = get(&store, 1).unwrap();
        assert_eq!(o, ReadOutcome::Hit, "a slow read still returns the value");
        assert!(b == value(1, 1, 9000)[..]);
        let why = store.degraded().expect("slow");
        assert!(why.contains("slow"), "{why}");
        assert!(matches!(
            put(&store, 2, b"", &value(2, 1, 10)),
            Err(StoreError::Degraded(_))
        ));
        faults.remove(rule);
        // The next read is not delayed: it ends the slow spell (no timing asserted beyond
        // the delay being far longer than the limit).
        let mut cleared = false;
        for _ in 0..20 {
            assert_eq!(get(&store, 1).unwrap().0, ReadOutcome::Hit);
            if store.degraded().is_none() {
                cleared = true;
                break;
            }
        }
        assert!(cleared, "{engine:?}: normal reads end the slow state");
        put(&store, 2, b"", &value(2, 1, 10)).unwrap();
    }
}

#[test]
fn eio_on_read_is_an_io_error_never_a_hit() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        let a = put(&store, 1, b"", &value(1, 1, 9000)).unwrap();
        let b = put(&store, 2, b"", &value(2, 1, 9000)).unwrap();
        let rule = faults
            .add(FaultRule::fail(FaultOp::Read, libc::EIO).at_offsets(a.offset..a.offset + 1));
        let got = read_many(&store, &[(1, a), (2, b)]);
        assert_eq!(got[0].0, ReadOutcome::IoError, "{engine:?}");
        assert_eq!(got[1].0, ReadOutcome::Hit);
        assert_eq!(store.stats().io_errors, 1);
        assert!(
            store.locate(1).is_some(),
            "an I/O error does not drop the entry"
        );
        faults.remove(rule);
        assert_eq!(read_at(&store, 1, a).0, ReadOutcome::Hit);
    }
}

#[test]
fn a_failed_sync_fails_flush_and_degrades() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 9000)).unwrap();
        faults.add(FaultRule::fail(FaultOp::Sync, libc::EIO).times(1));
        assert!(matches!(store.flush(), Err(StoreError::Io { .. })));
        assert!(store.degraded().is_some());
        store.flush().unwrap();
        store.set_retry_interval(Duration::ZERO);
        put(&store, 2, b"", &value(2, 1, 10)).unwrap();
        assert!(store.degraded().is_none(), "{engine:?}");
    }
}

#[test]
fn a_batch_torn_by_a_failed_write_never_serves_the_hole() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        put(&store, 100, b"", &value(100, 1, 5000)).unwrap();
        faults.add(FaultRule::fail(FaultOp::Write, libc::EIO).after(1).times(1));
        let vals: Vec<_> = (1..=3u128).map(|h| value(h, 1, 5000)).collect();
        let keys: Vec<_> = (1..=3u128).map(key).collect();
        let reqs: Vec<_> = (0..3)
            .map(|i| nencache_store::WriteReq {
                hash: i as u128 + 1,
                key: &keys[i],
                metadata: b"",
                value: vals[i].as_ptr(),
                value_len: 5000,
                expires_unix_ms: u64::MAX,
            })
            .collect();
        // SAFETY: the values outlive the call.
        let res = unsafe { store.write(&reqs) };
        assert!(
            res[0].is_ok() && res[1].is_err() && res[2].is_ok(),
            "{engine:?}: {res:?}"
        );
        assert!(store.locate(2).is_none());
        drop(store);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        assert!(store.locate(2).is_none(), "the failed entry never appears");
        for h in [100u128, 1, 3] {
            if let Some((o, b, _)) = get(&store, h) {
                assert_eq!(o, ReadOutcome::Hit);
                assert!(b == value(h, 1, 5000)[..]);
            }
        }
        assert!(
            store.locate(100).is_some() && store.locate(1).is_some(),
            "what precedes the hole survives"
        );
    }
}

#[test]
fn a_failed_tombstone_is_written_again() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 5000)).unwrap();
        store.flush().unwrap();
        assert!(store.remove(1));
        // The tombstone is the first write of the next call; it fails.
        let rule = faults.add(FaultRule::fail(FaultOp::Write, libc::EIO).times(1));
        let _ = put(&store, 2, b"", &value(2, 1, 5000));
        faults.remove(rule);
        store.set_retry_interval(Duration::ZERO);
        put(&store, 3, b"", &value(3, 1, 5000)).unwrap();
        drop(store); // no flush: only written tombstones count
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        assert!(
            store.locate(1).is_none(),
            "{engine:?}: the delete survived the restart"
        );
        assert!(store.locate(3).is_some());
    }
}

#[test]
fn a_remove_during_a_write_of_the_same_key_wins() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, faults) = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 5000)).unwrap();
        // The next write is held at the device long enough for a remove to run meanwhile
        // (the remove waits until the write has reached the device; no timing is asserted).
        faults.add(FaultRule::delay(FaultOp::Write, Duration::from_millis(300)).times(1));
        let seen = faults.seen(FaultOp::Write);
        std::thread::scope(|s| {
            let w = s.spawn(|| put(&store, 1, b"", &value(1, 2, 5000)).unwrap());
            while faults.seen(FaultOp::Write) == seen {
                std::thread::yield_now();
            }
            assert!(store.remove(1), "the old entry was there");
            w.join().unwrap();
        });
        assert!(
            store.locate(1).is_none(),
            "{engine:?}: the remove came last"
        );
        store.flush().unwrap();
        drop(store);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        assert!(
            store.locate(1).is_none(),
            "{engine:?}: and stays last after a restart"
        );
    }
}
