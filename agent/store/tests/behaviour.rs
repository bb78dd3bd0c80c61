//! Behaviour of the store's operations: hot entries survive eviction, deletes survive a
//! restart, expiry, periodic checkpoints, refused requests, counters.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use nencache_store::{AlignedBuf, IoEngineKind, LogStore, ReadOutcome, StoreError, WriteReq};

fn assert_send_sync<T: Send + Sync>() {}

#[test]
fn the_store_is_send_and_sync() {
    assert_send_sync::<LogStore>();
}

#[test]
fn hot_entries_are_reinserted_at_eviction_and_cold_ones_dropped() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        put(&store, 1, b"hot", &value(1, 1, 100_000)).unwrap();
        put(&store, 2, b"cold", &value(2, 1, 100_000)).unwrap();
        for h in 10..80u128 {
            if h % 4 == 0 {
                let (o, b, m) =
                    get(&store, 1).unwrap_or_else(|| panic!("{engine:?}: hot entry lost at {h}"));
                assert_eq!(o, ReadOutcome::Hit);
                assert!(b == value(1, 1, 100_000)[..]);
                assert_eq!(m, b"hot");
            }
            put(&store, h, b"", &value(h, 1, 100_000)).unwrap();
        }
        assert!(
            store.locate(2).is_none(),
            "{engine:?}: a cold entry is evicted with its region"
        );
        let st = store.stats();
        assert!(
            st.reinserted >= 1 && st.evictions >= 1 && st.region_evictions >= 2,
            "{st:?}"
        );
        assert!(st.used_bytes <= st.capacity_bytes);
        assert_eq!(st.entries, store.indexed().len() as u64);
        // The reinserted copy survives a restart too.
        drop(store);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        assert_eq!(get(&store, 1).unwrap().0, ReadOutcome::Hit);
    }
}

#[test]
fn removes_survive_a_restart_once_written() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        for h in 1..=4u128 {
            put(&store, h, b"", &value(h, 1, 5000)).unwrap();
        }
        store.flush().unwrap();
        assert!(store.remove(1));
        assert!(!store.remove(1), "already gone");
        assert!(!store.remove(77), "never there");
        assert!(store.locate(1).is_none());
        // The tombstone goes out with the next write...
        put(&store, 5, b"", &value(5, 1, 10)).unwrap();
        assert!(store.remove(2));
        // ...or the next flush.
        store.flush().unwrap();
        drop(store);
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(rec.from_checkpoint);
        assert!(
            store.locate(1).is_none() && store.locate(2).is_none(),
            "{engine:?}"
        );
        // Without the checkpoint, the scan finds the tombstones.
        drop(store);
        std::fs::remove_file(ckpt_path(&cfg)).unwrap();
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(!rec.from_checkpoint);
        assert!(
            store.locate(1).is_none() && store.locate(2).is_none(),
            "{engine:?}"
        );
        assert_eq!(rec.entries, 3);
        // A new write of a removed key wins over its tombstone.
        put(&store, 1, b"", &value(1, 2, 100)).unwrap();
        drop(store);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        let (o, b, _) = get(&store, 1).unwrap();
        assert_eq!(o, ReadOutcome::Hit);
        assert!(b == value(1, 2, 100)[..]);
    }
}

#[test]
fn a_remove_racing_a_write_of_the_same_key_wins_in_memory_and_on_disk() {
    // The removal lands after the entry was indexed: it is simply removed.
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::Pread, 4);
    let (store, _) = LogStore::open(cfg.clone()).unwrap();
    put(&store, 1, b"", &value(1, 1, 10)).unwrap();
    put(&store, 1, b"", &value(1, 2, 10)).unwrap();
    assert!(store.remove(1));
    store.flush().unwrap();
    drop(store);
    let (store, _) = LogStore::open(cfg.clone()).unwrap();
    assert!(store.locate(1).is_none());
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn expired_entries_are_hidden_and_not_recovered() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        put(&store, 1, b"", &value(1, 1, 100)).unwrap();
        let later = now_ms() + 3_600_000;
        let l = put_exp(&store, 2, b"", &value(2, 1, 100), later).unwrap();
        assert_eq!(store.locate(2).unwrap().expires_unix_ms, later);
        assert_eq!(l.expires_unix_ms, later);
        // An expired write replaces the older entry and is itself invisible.
        put_exp(&store, 1, b"", &value(1, 2, 100), now_ms() - 1).unwrap();
        assert!(store.locate(1).is_none());
        assert!(!store.remove(1));
        put_exp(&store, 3, b"", &value(3, 1, 100), 5).unwrap();
        assert!(store.indexed().iter().all(|(h, _)| *h == 2));
        drop(store);
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(rec.skipped >= 2, "{rec:?}");
        assert!(store.locate(1).is_none() && store.locate(3).is_none());
        assert_eq!(get(&store, 2).unwrap().0, ReadOutcome::Hit);
    }
}

#[test]
fn checkpoints_are_written_periodically_and_bound_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::IoUring, 32);
    let (store, _) = LogStore::open(cfg.clone()).unwrap();
    for h in 0..100u128 {
        put(&store, h, b"", &value(h, 1, 200_000)).unwrap();
    }
    assert!(
        ckpt_path(&cfg).exists(),
        "a checkpoint after a few sealed regions, without flush"
    );
    drop(store);
    let (store, rec) = LogStore::open(cfg.clone()).unwrap();
    assert!(rec.from_checkpoint);
    assert!(
        rec.scanned_bytes < 20 * MIB,
        "scanned {}",
        rec.scanned_bytes
    );
    assert_eq!(rec.entries, store.indexed().len() as u64);
    assert_eq!(get(&store, 99).unwrap().0, ReadOutcome::Hit);
    drop(store);
    std::fs::remove_file(ckpt_path(&cfg)).unwrap();
    let (_, full) = LogStore::open(cfg.clone()).unwrap();
    assert_eq!(full.entries, rec.entries);
}

#[test]
fn refused_requests_are_reported_per_entry() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::Pread, 4);
    let (store, _) = LogStore::open(cfg).unwrap();
    let big = AlignedBuf::zeroed(MIB as usize);
    let ok = value(2, 1, 4096);
    let unaligned = AlignedBuf::zeroed(8192);
    let long_key = vec![b'k'; 70_000];
    let reqs = [
        WriteReq {
            hash: 1,
            key: b"big",
            metadata: b"",
            value: big.as_ptr(),
            value_len: MIB,
            expires_unix_ms: u64::MAX,
        },
        WriteReq {
            hash: 2,
            key: &key(2),
            metadata: b"",
            value: ok.as_ptr(),
            value_len: 4096,
            expires_unix_ms: u64::MAX,
        },
        WriteReq {
            hash: 3,
            key: b"odd",
            metadata: b"",
            // SAFETY (of the pointer arithmetic): inside the buffer.
            value: unaligned.as_ptr().wrapping_add(1),
            value_len: 10,
            expires_unix_ms: u64::MAX,
        },
        WriteReq {
            hash: 4,
            key: &long_key,
            metadata: b"",
            value: ok.as_ptr(),
            value_len: 1,
            expires_unix_ms: u64::MAX,
        },
    ];
    // SAFETY: every value pointer is readable for its padded length (the unaligned one is
    // refused before it is read).
    let res = unsafe { store.write(&reqs) };
    assert!(
        matches!(res[0], Err(StoreError::TooLarge { len, region }) if len == MIB + 4096 && region == MIB)
    );
    assert!(res[1].is_ok());
    assert!(matches!(res[2], Err(StoreError::Config(_))));
    assert!(matches!(res[3], Err(StoreError::Config(_))));
    assert_eq!(store.stats().write_refusals, 3);
    assert_eq!(store.stats().writes, 1);
    // SAFETY: empty batches touch nothing.
    assert!(unsafe { store.write(&[]) }.is_empty());
    // SAFETY: as above.
    unsafe { store.read(&mut []) };
}

#[test]
fn zero_length_values_and_metadata_round_trip() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        let meta = vec![9u8; 5000]; // a header longer than one block
        let l = put(&store, 1, &meta, &AlignedBuf::zeroed(0)).unwrap();
        assert_eq!((l.value_len, l.meta_len), (0, 5000));
        let (o, b, m) = get(&store, 1).unwrap();
        assert_eq!(o, ReadOutcome::Hit);
        assert!(b.is_empty());
        assert_eq!(m, meta);
        drop(store);
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        let (o, _, m) = get(&store, 1).unwrap();
        assert_eq!((o, m), (ReadOutcome::Hit, meta));
    }
}

#[test]
fn a_read_with_a_wrong_key_or_location_is_never_a_hit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::IoUring, 4);
    let (store, _) = LogStore::open(cfg).unwrap();
    let l1 = put(&store, 1, b"", &value(1, 1, 5000)).unwrap();
    let l2 = put(&store, 2, b"", &value(2, 1, 5000)).unwrap();
    // Hash 2's location read as hash 1 (key and hash differ): not a hit, and 2 stays.
    assert_ne!(read_at(&store, 1, l2).0, ReadOutcome::Hit);
    assert!(store.locate(2).is_some());
    // A made-up location outside the store.
    let bogus = nencache_store::Location {
        offset: 1 << 40,
        ..l1
    };
    assert_eq!(read_at(&store, 1, bogus).0, ReadOutcome::Miss);
    // An overwritten entry's old location still holds its (old, intact) bytes until the
    // region is reused; a read of it returns exactly those bytes or misses.
    put(&store, 1, b"", &value(1, 2, 5000)).unwrap();
    let (o, b, _) = read_at(&store, 1, l1);
    if o == ReadOutcome::Hit {
        assert!(b == value(1, 1, 5000)[..]);
    }
    let (o, b, _) = get(&store, 1).unwrap();
    assert_eq!(o, ReadOutcome::Hit);
    assert!(b == value(1, 2, 5000)[..]);
}
