//! Torn and corrupt entries, truncated files, unknown formats, foreign files, stores of the
//! other kind, locks and layout changes: a damaged entry is a miss or `Corrupt` (counted), never a hit; a file that
//! is not ours is never overwritten.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use nencache_store::{IoEngineKind, LogStore, ReadOutcome, StoreError};

fn open(cfg: &nencache_store::StoreConfig) -> LogStore {
    LogStore::open(cfg.clone()).unwrap().0
}

#[test]
fn flipped_value_or_header_bytes_are_corrupt_never_a_hit() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        let mut locs = Vec::new();
        for h in 1..=4u128 {
            locs.push(put(&store, h, b"meta", &value(h, 1, 20_000)).unwrap());
        }
        // A value byte.
        let v = peek(&cfg, locs[0].offset + 4096 + 100, 1);
        patch(&cfg, locs[0].offset + 4096 + 100, &[v[0] ^ 0x40]);
        // A key byte (inside the header checksum).
        let k = peek(&cfg, locs[1].offset + 98, 1);
        patch(&cfg, locs[1].offset + 98, &[k[0] ^ 1]);
        // The seq field.
        let s = peek(&cfg, locs[2].offset + 33, 1);
        patch(&cfg, locs[2].offset + 33, &[s[0] ^ 1]);
        for (i, h) in (1..=3u128).enumerate() {
            let (o, _, meta) = read_at(&store, h, locs[i]);
            assert_eq!(o, ReadOutcome::Corrupt, "{engine:?} entry {h}");
            assert!(meta.is_empty());
            assert!(
                store.locate(h).is_none(),
                "a corrupt entry leaves the index"
            );
            // Read again with the stale location: gone, so a miss, and still never a hit.
            assert_eq!(read_at(&store, h, locs[i]).0, ReadOutcome::Miss);
        }
        let (o, b, _) = get(&store, 4).unwrap();
        assert_eq!(o, ReadOutcome::Hit);
        assert!(b == value(4, 1, 20_000)[..]);
        let st = store.stats();
        assert_eq!(st.corrupt, 3, "{engine:?}");
        assert_eq!(st.hits, 1);
        assert_eq!(st.entries, 1);
    }
}

#[test]
fn a_header_without_its_value_is_corrupt_after_recovery() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        let a = put(&store, 1, b"", &value(1, 1, 10_000)).unwrap();
        let b = put(&store, 2, b"", &value(2, 1, 10_000)).unwrap();
        drop(store);
        // The value never made it to the device (a torn write).
        patch(&cfg, b.offset + 4096, &vec![0u8; 12_288]);
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert_eq!(rec.entries, 2, "the scan checks headers only");
        assert_eq!(
            get(&store, 2).unwrap().0,
            ReadOutcome::Corrupt,
            "{engine:?}"
        );
        assert!(store.locate(2).is_none());
        assert_eq!(read_at(&store, 1, a).0, ReadOutcome::Hit);
        assert_eq!(store.stats().corrupt, 1);
    }
}

#[test]
fn a_file_truncated_mid_entry_while_closed_never_serves_it() {
    for engine in [IoEngineKind::IoUring, IoEngineKind::Pread] {
        // Mid-value: the header survives (and is found), the value reads back as zeros.
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 10_000)).unwrap();
        let b = put(&store, 2, b"", &value(2, 1, 10_000)).unwrap();
        drop(store);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&cfg.path)
            .unwrap()
            .set_len(b.offset + 4096 + 100)
            .unwrap();
        let (store, _) = LogStore::open(cfg.clone()).unwrap();
        assert_eq!(get(&store, 1).unwrap().0, ReadOutcome::Hit);
        if let Some((o, ..)) = get(&store, 2) {
            assert_eq!(o, ReadOutcome::Corrupt);
        }
        assert!(store.locate(2).is_none());
        drop(store);

        // Mid-header: the scan stops there.
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_in(dir.path(), engine);
        let store = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 10_000)).unwrap();
        let b = put(&store, 2, b"", &value(2, 1, 10_000)).unwrap();
        drop(store);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&cfg.path)
            .unwrap()
            .set_len(b.offset + 50)
            .unwrap();
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert_eq!(rec.entries, 1);
        assert!(rec.skipped >= 1);
        assert!(store.locate(2).is_none());
        assert_eq!(get(&store, 1).unwrap().0, ReadOutcome::Hit);
    }
    // T3: a segment cut short is not mapped at open; its region's entries are gone, not
    // served, and the region is used again later.
    let dir = tempfile::tempdir().unwrap();
    let cfg = cfg(dir.path(), IoEngineKind::Mmap, 4);
    let store = open(&cfg);
    put(&store, 1, b"", &value(1, 1, 10_000)).unwrap();
    let b = put(&store, 2, b"", &value(2, 1, 10_000)).unwrap();
    drop(store);
    let (seg, pos) = file_pos(&cfg, b.offset);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(pos + 4096 + 100)
        .unwrap();
    let (store, rec) = LogStore::open(cfg.clone()).unwrap();
    assert_eq!(rec.entries, 0);
    assert!(store.locate(1).is_none() && store.locate(2).is_none());
    assert_eq!(read_at(&store, 2, b).0, ReadOutcome::Miss);
    for h in 10..40u128 {
        put(&store, h, b"", &value(h, 1, 200_000)).unwrap();
    }
    assert_eq!(get(&store, 39).unwrap().0, ReadOutcome::Hit);
}

fn cfg_in(dir: &std::path::Path, engine: IoEngineKind) -> nencache_store::StoreConfig {
    cfg(dir, engine, 4)
}

#[test]
fn truncation_under_an_open_store_degrades_it_and_never_crashes() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        let a = put(&store, 1, b"", &value(1, 1, 10_000)).unwrap();
        let b = put(&store, 2, b"", &value(2, 1, 10_000)).unwrap();
        let (path, pos) = file_pos(&cfg, b.offset);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(pos)
            .unwrap();
        let (o, ..) = read_at(&store, 2, b);
        assert!(
            matches!(o, ReadOutcome::Corrupt | ReadOutcome::Miss),
            "{engine:?}: {o:?}"
        );
        let why = store
            .degraded()
            .expect("a truncated file degrades the store");
        assert!(why.contains("truncated"), "{why}");
        assert_eq!(
            read_at(&store, 1, a).0,
            ReadOutcome::Hit,
            "what precedes the cut still reads"
        );
        // Writes are refused until a probe, which restores the length and succeeds.
        assert!(matches!(
            put(&store, 3, b"", &value(3, 1, 100)),
            Err(StoreError::Degraded(_))
        ));
        store.set_retry_interval(std::time::Duration::ZERO);
        put(&store, 3, b"", &value(3, 1, 100)).unwrap();
        assert!(store.degraded().is_none(), "{engine:?}");
        assert_eq!(get(&store, 3).unwrap().0, ReadOutcome::Hit);
    }
}

#[test]
fn an_unknown_format_version_is_refused_naming_path_and_versions() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        drop(open(&cfg));
        let meta = if engine == IoEngineKind::Mmap {
            cfg.path.join("store.meta")
        } else {
            cfg.path.clone()
        };
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
            f.write_all_at(&2u32.to_le_bytes(), 8).unwrap();
        }
        match LogStore::open(cfg.clone()) {
            Err(e @ StoreError::UnknownFormat { .. }) => {
                let StoreError::UnknownFormat {
                    path,
                    found,
                    supported,
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(path, &cfg.path);
                assert_eq!((*found, *supported), (2, 1));
                let msg = e.to_string();
                assert!(
                    msg.contains(&cfg.path.display().to_string()) && msg.contains('2'),
                    "{msg}"
                );
            }
            Err(e) => panic!("{engine:?}: {e}"),
            Ok(_) => panic!("{engine:?}: opened a store of format version 2"),
        }
    }
}

#[test]
fn a_foreign_file_or_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), IoEngineKind::Pread, 4);
    std::fs::write(&c.path, b"my precious notes").unwrap();
    match LogStore::open(c.clone()) {
        Err(StoreError::Config(msg)) => {
            assert!(msg.contains(&c.path.display().to_string()), "{msg}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a foreign file"),
    }
    assert_eq!(std::fs::read(&c.path).unwrap(), b"my precious notes");

    let c = cfg(dir.path(), IoEngineKind::Mmap, 4);
    std::fs::create_dir_all(&c.path).unwrap();
    std::fs::write(c.path.join("notes.txt"), b"x").unwrap();
    match LogStore::open(c.clone()) {
        Err(StoreError::Config(msg)) => assert!(msg.contains("notes.txt"), "{msg}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("opened a foreign directory"),
    }
    assert!(!c.path.join("store.meta").exists());
    std::fs::remove_file(c.path.join("notes.txt")).unwrap();
    std::fs::write(c.path.join("store.meta"), b"not a superblock").unwrap();
    assert!(matches!(
        LogStore::open(c.clone()),
        Err(StoreError::Config(_))
    ));
    assert_eq!(
        std::fs::read(c.path.join("store.meta")).unwrap(),
        b"not a superblock"
    );
}

/// Every file in `dir` (not recursive) with its bytes, sorted by name.
fn snapshot_dir(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

/// Opens `cfg` expecting [`StoreError::WrongKind`] for `path` with these kinds.
fn expect_wrong_kind(cfg: &nencache_store::StoreConfig, path: &std::path::Path, kinds: (u32, u32)) {
    match LogStore::open(cfg.clone()) {
        Err(e @ StoreError::WrongKind { .. }) => {
            let StoreError::WrongKind {
                path: p,
                found,
                configured,
            } = &e
            else {
                unreachable!()
            };
            assert_eq!(p, path);
            assert_eq!((*found, *configured), kinds);
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains(&format!("kind {}", kinds.0))
                    && msg.contains(&format!("kind {}", kinds.1)),
                "{msg}"
            );
        }
        Err(e) => panic!("{:?}: {e}", cfg.io_engine),
        Ok(_) => panic!("{:?}: opened a store of the other kind", cfg.io_engine),
    }
}

#[test]
fn a_store_of_the_other_kind_is_refused_and_left_alone() {
    let t2_engines = [
        IoEngineKind::Auto,
        IoEngineKind::IoUring,
        IoEngineKind::Pread,
    ];
    let values: Vec<(u128, usize)> = (1..=6u128).map(|h| (h, 50_000 * h as usize)).collect();
    let fill = |store: &LogStore| {
        for &(h, len) in &values {
            put(store, h, b"m", &value(h, 1, len)).unwrap();
        }
    };
    let check = |store: &LogStore, what: &str| {
        for &(h, len) in &values {
            let (o, b, m) = get(store, h).unwrap_or_else(|| panic!("{what}: {h} lost"));
            assert_eq!(o, ReadOutcome::Hit, "{what}: {h}");
            assert!(b == value(h, 1, len)[..] && m == b"m", "{what}: {h}");
        }
    };

    // A T2 store pointed at a T3 directory's store.meta.
    let dir = tempfile::tempdir().unwrap();
    let t3 = cfg(dir.path(), IoEngineKind::Mmap, 8);
    let store = open(&t3);
    fill(&store);
    store.flush().unwrap();
    put(&store, 99, b"", &value(99, 1, 9000)).unwrap(); // after the checkpoint
    drop(store);
    let before = snapshot_dir(&t3.path);
    for engine in t2_engines {
        let mut t2 = cfg(dir.path(), engine, 8);
        t2.path = t3.path.join("store.meta");
        expect_wrong_kind(&t2, &t2.path, (2, 1));
        assert!(
            snapshot_dir(&t3.path) == before,
            "{engine:?}: the T3 store's files changed"
        );
        // Another capacity or region size changes nothing: the kind is checked first.
        t2.capacity = 32 * MIB;
        expect_wrong_kind(&t2, &t2.path, (2, 1));
        assert!(snapshot_dir(&t3.path) == before, "{engine:?}");
    }
    let (store, rec) = LogStore::open(t3.clone()).unwrap();
    assert!(rec.reset.is_none(), "{:?}", rec.reset);
    assert_eq!(rec.entries, values.len() as u64 + 1);
    check(&store, "T3 after a T2 open");
    assert_eq!(get(&store, 99).unwrap().0, ReadOutcome::Hit);
    drop(store);

    // A T3 store pointed at a directory whose store.meta is a T2 store.
    for engine in t2_engines {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("t2home");
        std::fs::create_dir(&home).unwrap();
        let mut t2 = cfg(dir.path(), engine, 8);
        t2.path = home.join("store.meta");
        let store = open(&t2);
        fill(&store);
        store.flush().unwrap();
        drop(store);
        let before = snapshot_dir(&home);
        let mut t3 = cfg(dir.path(), IoEngineKind::Mmap, 8);
        t3.path = home.clone();
        expect_wrong_kind(&t3, &home.join("store.meta"), (1, 2));
        assert!(
            snapshot_dir(&home) == before,
            "{engine:?}: the T2 store's files changed"
        );
        let (store, rec) = LogStore::open(t2.clone()).unwrap();
        assert!(rec.reset.is_none(), "{:?}", rec.reset);
        assert_eq!(rec.entries, values.len() as u64);
        check(&store, "T2 after a T3 open");
    }
}

#[test]
fn a_second_open_is_locked() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let first = open(&cfg);
        match LogStore::open(cfg.clone()) {
            Err(StoreError::Locked { path }) => assert_eq!(path, cfg.path),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("{engine:?}: opened twice"),
        }
        drop(first);
        open(&cfg);
    }
}

#[test]
fn a_changed_layout_starts_empty_and_says_why() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        put(&store, 1, b"", &value(1, 1, 1000)).unwrap();
        store.flush().unwrap();
        drop(store);
        cfg.region_size = 2 * MIB;
        cfg.capacity = 8 * MIB;
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(
            rec.reset
                .as_deref()
                .is_some_and(|r| r.contains("region size")),
            "{:?}",
            rec.reset
        );
        assert_eq!(rec.entries, 0);
        assert!(store.locate(1).is_none());
        put(&store, 2, b"", &value(2, 1, 1000)).unwrap();
        store.flush().unwrap();
        drop(store);
        cfg.capacity = 16 * MIB;
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(
            rec.reset.as_deref().is_some_and(|r| r.contains("capacity")),
            "{:?}",
            rec.reset
        );
        assert!(store.locate(2).is_none());
        drop(store);
        let (_, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(rec.reset.is_none());
    }
}

#[test]
fn a_corrupt_checkpoint_is_ignored_for_a_full_scan() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        for h in 0..20u128 {
            put(&store, h, b"", &value(h, 1, 30_000)).unwrap();
        }
        store.remove(3);
        store.flush().unwrap();
        drop(store);
        let (_, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(rec.from_checkpoint);
        assert_eq!(rec.entries, 19);
        let ck = ckpt_path(&cfg);
        let mut b = std::fs::read(&ck).unwrap();
        let n = b.len();
        b[n - 10] ^= 0xff;
        std::fs::write(&ck, &b).unwrap();
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(!rec.from_checkpoint, "{engine:?}");
        assert_eq!(rec.entries, 19);
        assert!(
            store.locate(3).is_none(),
            "the tombstone is found by the scan"
        );
        for h in (0..20u128).filter(|&h| h != 3) {
            let (o, b, _) = get(&store, h).unwrap();
            assert_eq!(o, ReadOutcome::Hit);
            assert!(b == value(h, 1, 30_000)[..]);
        }
    }
}

/// Rewrites an entry's flags and fixes its header checksum (a valid entry of a later
/// version of this format that uses a flag this build does not know).
fn set_flags(cfg: &nencache_store::StoreConfig, offset: u64, flags: u16) {
    let mut h = peek(cfg, offset, 4096);
    let hl = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[80..88].fill(0);
    let sum = xxhash_rust::xxh3::xxh3_64(&h[..hl]);
    h[80..88].copy_from_slice(&sum.to_le_bytes());
    patch(cfg, offset, &h[..hl]);
}

#[test]
fn entries_with_unknown_flags_are_skipped_counted_and_never_served() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        let mut locs = Vec::new();
        for h in 1..=3u128 {
            locs.push(put(&store, h, b"", &value(h, 1, 5000)).unwrap());
        }
        set_flags(&cfg, locs[1].offset, 0b10);
        assert_eq!(
            read_at(&store, 2, locs[1]).0,
            ReadOutcome::Corrupt,
            "{engine:?}"
        );
        drop(store);
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        assert!(rec.skipped >= 1);
        assert!(store.locate(2).is_none());
        assert_eq!(read_at(&store, 2, locs[1]).0, ReadOutcome::Miss);
        for h in [1u128, 3] {
            assert_eq!(
                get(&store, h).unwrap().0,
                ReadOutcome::Hit,
                "{engine:?}: the scan goes on past it"
            );
        }
    }
}

#[test]
fn invalid_configurations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = cfg(dir.path(), IoEngineKind::Pread, 4);
    for (what, c) in [
        (
            "region size",
            nencache_store::StoreConfig {
                region_size: 3 * MIB,
                ..base.clone()
            },
        ),
        (
            "small region",
            nencache_store::StoreConfig {
                region_size: 4096,
                ..base.clone()
            },
        ),
        (
            "one region",
            nencache_store::StoreConfig {
                capacity: MIB,
                ..base.clone()
            },
        ),
        (
            "queue depth",
            nencache_store::StoreConfig {
                queue_depth: 0,
                ..base.clone()
            },
        ),
    ] {
        assert!(
            matches!(LogStore::open(c), Err(StoreError::Config(_))),
            "{what}"
        );
    }
    assert!(
        !base.path.exists(),
        "nothing is created for a refused configuration"
    );
}

#[test]
fn a_deleted_store_degrades_on_flush_and_keeps_serving_reads() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        let a = put(&store, 1, b"", &value(1, 1, 10_000)).unwrap();
        if engine == IoEngineKind::Mmap {
            std::fs::remove_dir_all(&cfg.path).unwrap();
        } else {
            std::fs::remove_file(&cfg.path).unwrap();
        }
        assert!(
            matches!(store.flush(), Err(StoreError::Degraded(_))),
            "{engine:?}"
        );
        let why = store.degraded().expect("degraded");
        assert!(why.contains("deleted"), "{why}");
        assert!(matches!(
            put(&store, 2, b"", &value(2, 1, 10)),
            Err(StoreError::Degraded(_))
        ));
        store.set_retry_interval(std::time::Duration::ZERO);
        assert!(
            matches!(
                put(&store, 2, b"", &value(2, 1, 10)),
                Err(StoreError::Degraded(_))
            ),
            "the probe sees it is still gone"
        );
        let (o, b, _) = read_at(&store, 1, a);
        assert_eq!(
            o,
            ReadOutcome::Hit,
            "{engine:?}: the open descriptor still reads"
        );
        assert!(b == value(1, 1, 10_000)[..]);
        assert!(!ckpt_path(&cfg).exists());
    }
}

#[test]
fn entries_dropped_at_open_for_damaged_headers_are_counted() {
    // 60 entries over three regions; a clean close leaves a checkpoint listing them all.
    for engine in ENGINES {
        for zero_header in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = cfg(dir.path(), engine, 4);
            let store = open(&cfg);
            let locs: Vec<_> = (1..=60u128)
                .map(|h| put(&store, h, b"m", &value(h, 1, 40_000)).unwrap())
                .collect();
            store.flush().unwrap();
            drop(store);
            for l in &locs {
                if zero_header {
                    patch(&cfg, l.offset, &[0u8; 4096]);
                } else {
                    // A key byte (inside the header checksum).
                    let k = peek(&cfg, l.offset + 98, 1);
                    patch(&cfg, l.offset + 98, &[k[0] ^ 1]);
                }
            }
            let what = format!("{engine:?} zero_header={zero_header}");
            let (store, rec) = LogStore::open(cfg.clone()).unwrap();
            assert!(rec.from_checkpoint, "{what}");
            // No header is served, and every entry the checkpoint listed is accounted for:
            // in the index (counted as corrupt when read) or skipped (counted now).
            let mut corrupt_reads = 0;
            for (h, l) in (1..=60u128).zip(&locs) {
                match store.locate(h) {
                    Some(_) => {
                        assert_eq!(get(&store, h).unwrap().0, ReadOutcome::Corrupt, "{what}");
                        corrupt_reads += 1;
                    }
                    None => assert_eq!(read_at(&store, h, *l).0, ReadOutcome::Miss, "{what}"),
                }
            }
            assert_eq!(rec.entries + rec.skipped, 60, "{what}: {rec:?}");
            assert_eq!(rec.entries, corrupt_reads, "{what}");
            let st = store.stats();
            assert_eq!(st.corrupt, 60, "{what}: {rec:?}");
            assert_eq!(st.hits, 0, "{what}");
            assert_eq!(st.entries, 0, "{what}");
            drop(store);

            // Without the checkpoint, a scan finds each region's first header torn.
            if !zero_header {
                std::fs::remove_file(ckpt_path(&cfg)).unwrap();
                let (store, rec) = LogStore::open(cfg.clone()).unwrap();
                assert!(!rec.from_checkpoint);
                assert_eq!(rec.entries, 0, "{what}");
                assert_eq!(rec.skipped, 3, "{what}: {rec:?}");
                assert_eq!(store.stats().corrupt, 3, "{what}");
            }
        }
    }
}

#[test]
fn entries_lost_to_truncation_are_counted_once_and_reported_alike() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg(dir.path(), engine, 4);
        let store = open(&cfg);
        let locs: Vec<_> = (1..=60u128)
            .map(|h| put(&store, h, b"", &value(h, 1, 10_000)).unwrap())
            .collect();
        let (path, _) = file_pos(&cfg, locs[0].offset);
        let keep = if engine == IoEngineKind::Mmap {
            0
        } else {
            4096
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(keep)
            .unwrap();
        // A flush checks the files at once; every later check finds the file short again.
        let _ = store.flush();
        let first = store.degraded().expect("degraded");
        assert!(first.contains("; 60 entries lost"), "{engine:?}: {first}");
        // A short read checks again.
        let o = read_at(&store, 1, locs[0]).0;
        assert_eq!(o, ReadOutcome::Miss, "{engine:?}");
        let _ = store.flush();
        let again = store.degraded().expect("still degraded");
        assert_eq!(again, first, "{engine:?}");
        assert_eq!(store.stats().entries, 0);
    }
}
