//! The engine with lower tiers on real files: values evicted from host memory come back from
//! T2 or T3 byte for byte, survive a reopen, and deleted or replaced values never come back.
//! Every test runs on each I/O engine (io_uring, pread) and on the memory-mapped disk tier.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use nencache_engine::{
    Admission, DemotionConfig, Engine, EngineConfig, Get, HostConfig, IoEngineKind, Limits,
    PutItem, StoreConfig, Tier, TierConfig, traces::Rng,
};

const PAGE: u64 = 4096;

/// The lower-tier set-ups every test runs on.
fn kinds() -> [(Tier, IoEngineKind); 3] {
    [
        (Tier::Nvme, IoEngineKind::IoUring),
        (Tier::Nvme, IoEngineKind::Pread),
        (Tier::Disk, IoEngineKind::Mmap),
    ]
}

fn tier_config(dir: &Path, tier: Tier, io: IoEngineKind) -> TierConfig {
    let path = match tier {
        Tier::Disk => dir.join("disk"),
        _ => dir.join("cache.t2"),
    };
    TierConfig {
        tier,
        store: StoreConfig {
            path,
            capacity: 32 << 20,
            region_size: 1 << 20,
            io_engine: io,
            queue_depth: 16,
            slow_io: Duration::from_secs(5),
        },
        admission: Admission::All,
    }
}

/// A host arena of `pages` pages over `tier`.
fn config(tier: TierConfig, pages: u64) -> EngineConfig {
    EngineConfig {
        limits: Limits {
            max_value: 64 << 10,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: pages * PAGE,
            staging: 64 * PAGE,
            ..HostConfig::default()
        },
        tiers: vec![tier],
        demotion: DemotionConfig {
            clean_percent: 50,
            queue_bytes: 1 << 20,
        },
    }
}

/// A host arena of `pages` pages over one lower tier in `dir`.
fn engine(dir: &Path, tier: Tier, io: IoEngineKind, pages: u64) -> Engine {
    Engine::new(config(tier_config(dir, tier, io), pages)).expect("engine")
}

fn value(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

fn key(i: u64) -> Vec<u8> {
    format!("chunk-{i:06}").into_bytes()
}

fn put(e: &Engine, s: u64, k: &[u8], v: &[u8], meta: &[u8]) -> bool {
    e.put_local(
        s,
        PutItem {
            key: k,
            value_len: v.len() as u64,
            metadata: meta,
            ttl: None,
            overwrite: true,
        },
        v,
    )
    .expect("put")
}

/// The value of `k` if cached, read through a lease that is then released.
fn get(e: &Engine, s: u64, k: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let lease = e.get(s, &[k]).expect("get").pop().flatten()?;
    let bytes = e.read_leased(s, &lease).expect("read");
    e.release(s, &[lease.id]).expect("release");
    Some((bytes, lease.metadata))
}

fn len_of(i: u64) -> usize {
    // Sizes that are not multiples of a page, and some of exactly one.
    [4096, 10_000, 33_333, 65_536, 1, 61_000][(i % 6) as usize]
}

#[test]
fn values_evicted_from_host_memory_come_back_from_the_lower_tier() {
    for (tier, io) in kinds() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path(), tier, io, 64);
        let s = e.open_session().unwrap();
        let n = 200u64;
        for i in 0..n {
            assert!(put(&e, s, &key(i), &value(i, len_of(i)), &i.to_le_bytes()));
            while e.demote() > 0 {}
        }
        let st = e.stats();
        assert!(st.evictions > 50, "{tier:?}/{io:?}: the arena overflowed");
        assert_eq!(st.evictions_unsaved, 0, "{tier:?}/{io:?}: {st:?}");
        let lookup = e
            .lookup(&[key(0).as_slice(), key(n - 1).as_slice()])
            .unwrap();
        assert_eq!(lookup.prefix, 2, "{tier:?}/{io:?}");
        assert_eq!(
            lookup.tiers[0], tier,
            "the oldest key lives below host memory"
        );
        for i in 0..n {
            // As the agent's demoter thread does, between gets that promote.
            while e.demote() > 0 {}
            let (bytes, meta) =
                get(&e, s, &key(i)).unwrap_or_else(|| panic!("{tier:?}/{io:?}: key {i} lost"));
            assert!(
                bytes == value(i, len_of(i)),
                "{tier:?}/{io:?}: key {i} bytes"
            );
            assert_eq!(meta, i.to_le_bytes(), "{tier:?}/{io:?}: key {i} metadata");
        }
        let st = e.stats();
        assert!(st.promotions > 0, "{tier:?}/{io:?}: {st:?}");
        let ts = &e.tier_stats()[0];
        assert_eq!(ts.tier, tier);
        assert!(ts.hits > 0 && ts.demotions > 0, "{ts:?}");
        assert_eq!(ts.store.corrupt, 0, "{ts:?}");
        assert!(ts.degraded.is_none(), "{ts:?}");
    }
}

#[test]
fn persisted_entries_survive_a_reopen() {
    for (tier, io) in kinds() {
        let dir = tempfile::tempdir().unwrap();
        let n = 40u64;
        {
            let e = engine(dir.path(), tier, io, 512);
            let s = e.open_session().unwrap();
            for i in 0..n {
                put(&e, s, &key(i), &value(i, len_of(i)), b"m");
            }
            assert_eq!(e.stats().evictions, 0, "everything still in host memory");
            let written = e.persist(Instant::now() + Duration::from_secs(30));
            assert_eq!(written as u64, n, "{tier:?}/{io:?}");
        }
        let e = engine(dir.path(), tier, io, 512);
        let s = e.open_session().unwrap();
        let keys: Vec<Vec<u8>> = (0..n).map(key).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        let lookup = e.lookup(&refs).unwrap();
        assert_eq!(lookup.prefix as u64, n, "{tier:?}/{io:?}");
        assert!(lookup.tiers.iter().all(|&t| t == tier));
        for i in 0..n {
            let (bytes, meta) = get(&e, s, &key(i)).expect("recovered");
            assert!(bytes == value(i, len_of(i)), "{tier:?}/{io:?}: key {i}");
            assert_eq!(meta, b"m");
        }
        assert_eq!(e.lookup(&[key(0).as_slice()]).unwrap().tiers, [Tier::Host]);
    }
}

#[test]
fn deleted_and_replaced_values_never_come_back() {
    for (tier, io) in kinds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = engine(dir.path(), tier, io, 512);
            let s = e.open_session().unwrap();
            for i in 0..4 {
                put(&e, s, &key(i), &value(i, 5000), b"old");
            }
            e.persist(Instant::now() + Duration::from_secs(30));
            // 0: deleted; 1: replaced in host memory only; 2: replaced and persisted.
            assert_eq!(e.delete(&[key(0).as_slice()]).unwrap(), 1);
            assert!(get(&e, s, &key(0)).is_none(), "deleted from every tier");
            put(&e, s, &key(1), &value(100, 7000), b"new");
            put(&e, s, &key(2), &value(200, 7000), b"new");
            let reserved = e
                .reserve(
                    s,
                    &[PutItem {
                        key: &key(3),
                        value_len: 10,
                        metadata: b"",
                        ttl: None,
                        overwrite: false,
                    }],
                )
                .unwrap();
            assert_eq!(
                reserved,
                [nencache_engine::Reserved::Exists],
                "a key held only by a lower tier exists"
            );
            e.persist(Instant::now() + Duration::from_secs(30));
            assert!(get(&e, s, &key(1)).is_some());
        }
        let e = engine(dir.path(), tier, io, 512);
        let s = e.open_session().unwrap();
        assert!(
            get(&e, s, &key(0)).is_none(),
            "{tier:?}/{io:?}: deleted key"
        );
        for i in [1, 2] {
            let (bytes, meta) = get(&e, s, &key(i)).expect("persisted");
            assert_eq!(meta, b"new", "{tier:?}/{io:?}: key {i}");
            assert!(bytes == value(i * 100, 7000));
        }
        assert!(get(&e, s, &key(3)).is_some());
    }
}

#[test]
fn a_dropped_pending_get_frees_its_extents() {
    for (tier, io) in kinds() {
        let dir = tempfile::tempdir().unwrap();
        let e = Arc::new(engine(dir.path(), tier, io, 512));
        let s = e.open_session().unwrap();
        for i in 0..8 {
            put(&e, s, &key(i), &value(i, 20_000), b"");
        }
        e.persist(Instant::now() + Duration::from_secs(30));
        // Out of host memory, still in the lower tier.
        let keys: Vec<Vec<u8>> = (0..8).map(key).collect();
        let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        e.delete(&refs).unwrap();
        for i in 0..8 {
            put(&e, s, &key(i), &value(i, 20_000), b"");
        }
        e.persist(Instant::now() + Duration::from_secs(30));
        let used = e.stats().used_bytes;
        drop(e);
        let e = Arc::new(engine(dir.path(), tier, io, 512));
        let s = e.open_session().unwrap();
        let before = e.stats().used_bytes;
        match e.begin_get(s, &refs).unwrap() {
            Get::Pending(p) => {
                assert!(e.stats().used_bytes > before, "extents reserved");
                drop(p);
            }
            Get::Ready(_) => panic!("{tier:?}/{io:?}: the values are below host memory"),
        }
        assert_eq!(e.stats().used_bytes, before, "{tier:?}/{io:?}");
        assert!(used > 0);
        // A finished get of the same keys serves them.
        match e.begin_get(s, &refs).unwrap() {
            Get::Pending(p) => {
                let out = p.finish().unwrap();
                assert!(out.iter().all(Option::is_some), "{tier:?}/{io:?}");
            }
            Get::Ready(_) => panic!("still below host memory"),
        }
    }
}

/// An engine over one NVMe-style tier whose device goes through `faults`.
fn faulty_engine(
    dir: &Path,
    io: IoEngineKind,
    pages: u64,
    faults: &nencache_store::testing::Faults,
) -> Engine {
    let t = tier_config(dir, Tier::Nvme, io);
    let (store, _) =
        nencache_store::LogStore::open_with_faults(t.store.clone(), faults.clone()).expect("store");
    store.set_retry_interval(Duration::from_millis(50));
    Engine::with_stores(config(t, pages), vec![Box::new(store)]).expect("engine")
}

/// A tier directory whose NVMe-style store holds the value `below`, and no agent.
fn one_value_below(io: IoEngineKind) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(dir.path(), Tier::Nvme, io, 512);
    let s = e.open_session().unwrap();
    put(&e, s, b"below", &value(1, 30_000), b"");
    e.persist(Instant::now() + Duration::from_secs(30));
    dir
}

#[test]
fn a_slow_device_never_holds_up_host_hits() {
    use nencache_store::testing::{FaultOp, FaultRule, Faults};
    use std::sync::atomic::{AtomicBool, Ordering};
    for io in [IoEngineKind::IoUring, IoEngineKind::Pread] {
        let dir = one_value_below(io);
        let faults = Faults::new();
        let e = Arc::new(faulty_engine(dir.path(), io, 512, &faults));
        let s = e.open_session().unwrap();
        put(&e, s, b"host", &value(2, 30_000), b"");
        let reads = faults.seen(FaultOp::Read);
        faults.add(FaultRule::delay(FaultOp::Read, Duration::from_secs(2)));
        let done = Arc::new(AtomicBool::new(false));
        let slow = {
            let (e, done) = (e.clone(), done.clone());
            std::thread::spawn(move || {
                let s = e.open_session().unwrap();
                let got = get(&e, s, b"below");
                done.store(true, Ordering::SeqCst);
                got
            })
        };
        while faults.seen(FaultOp::Read) == reads {
            std::thread::yield_now();
        }
        // The slow read is in flight: host hits, lookups and puts go on meanwhile.
        let (bytes, _) = get(&e, s, b"host").expect("host hit");
        assert!(bytes == value(2, 30_000));
        assert_eq!(
            e.lookup(&[b"below".as_slice()]).unwrap().tiers,
            [Tier::Nvme]
        );
        put(&e, s, b"another", &value(3, 1000), b"");
        assert!(
            !done.load(Ordering::SeqCst),
            "{io:?}: host calls finished while the device read was still delayed"
        );
        let (bytes, _) = slow.join().unwrap().expect("the slow read completes");
        assert!(bytes == value(1, 30_000), "{io:?}");
    }
}

#[test]
fn a_failing_device_degrades_its_tier_and_host_memory_keeps_serving() {
    use nencache_store::testing::{FaultOp, FaultRule, Faults};
    const EIO: i32 = 5;
    for io in [IoEngineKind::IoUring, IoEngineKind::Pread] {
        let dir = one_value_below(io);
        let faults = Faults::new();
        let e = faulty_engine(dir.path(), io, 64, &faults);
        let s = e.open_session().unwrap();
        faults.add(FaultRule::fail(FaultOp::Read, EIO));
        faults.add(FaultRule::fail(FaultOp::Write, EIO));
        // A read that fails is a miss, never an error or wrong bytes.
        assert!(get(&e, s, b"below").is_none(), "{io:?}");
        // Demotion's writes fail: the tier is degraded; host memory goes on.
        for i in 0..100 {
            put(&e, s, &key(i), &value(i, 20_000), b"");
            while e.demote() > 0 {}
        }
        let ts = &e.tier_stats()[0];
        assert!(ts.degraded.is_some(), "{io:?}: {ts:?}");
        assert!(ts.store.io_errors > 0, "{ts:?}");
        assert!(e.stats().evictions_unsaved > 0, "{:?}", e.stats());
        let (bytes, _) = get(&e, s, &key(99)).expect("the newest value is in host memory");
        assert!(bytes == value(99, 20_000));
        for i in 0..100 {
            if let Some((bytes, _)) = get(&e, s, &key(i)) {
                assert!(bytes == value(i, 20_000), "{io:?}: key {i}");
            }
        }
    }
}

#[test]
fn deletes_and_overwrites_survive_a_crash_right_after_they_return() {
    for (tier, io) in kinds() {
        let dir = tempfile::tempdir().unwrap();
        {
            let e = engine(dir.path(), tier, io, 512);
            let s = e.open_session().unwrap();
            put(&e, s, b"doomed", &value(9, 9000), b"");
            put(&e, s, b"kept", &value(10, 9000), b"");
            e.persist(Instant::now() + Duration::from_secs(30));
            put(&e, s, b"replaced", &value(11, 9000), b"old");
            e.persist(Instant::now() + Duration::from_secs(30));
            assert_eq!(e.delete(&[b"doomed".as_slice()]).unwrap(), 1);
            put(&e, s, b"replaced", &value(12, 9000), b"new");
            // Dropped without a flush or checkpoint: as if killed.
        }
        let e = engine(dir.path(), tier, io, 512);
        let s = e.open_session().unwrap();
        assert!(get(&e, s, b"doomed").is_none(), "{tier:?}/{io:?}");
        assert!(
            get(&e, s, b"replaced").is_none(),
            "{tier:?}/{io:?}: the new value was in host memory only; the old one must not \
             come back"
        );
        assert!(get(&e, s, b"kept").is_some(), "{tier:?}/{io:?}");
    }
}

#[test]
fn a_degraded_tier_recovers_when_its_device_does() {
    use nencache_store::testing::{FaultOp, FaultRule, Faults};
    const ENOSPC: i32 = 28;
    for io in [IoEngineKind::IoUring, IoEngineKind::Pread] {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let e = faulty_engine(dir.path(), io, 64, &faults);
        let s = e.open_session().unwrap();
        let full = faults.add(FaultRule::fail(FaultOp::Allocate, ENOSPC));
        let mut i = 0;
        while e.tier_stats()[0].degraded.is_none() {
            put(&e, s, &key(i), &value(i, 20_000), b"");
            while e.demote() > 0 {}
            i += 1;
            assert!(i < 1000, "{io:?}: never degraded");
        }
        // Space comes back: demotion goes on and its probe write clears the state.
        faults.remove(full);
        let start = Instant::now();
        while e.tier_stats()[0].degraded.is_some() {
            put(&e, s, &key(i), &value(i, 20_000), b"");
            while e.demote() > 0 {}
            std::thread::sleep(Duration::from_millis(5));
            i += 1;
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{io:?}: still degraded: {:?}",
                e.tier_stats()[0]
            );
        }
        let before = e.tier_stats()[0].demotions;
        for j in i..i + 40 {
            put(&e, s, &key(j), &value(j, 20_000), b"");
            while e.demote() > 0 {}
        }
        assert!(
            e.tier_stats()[0].demotions > before,
            "{io:?}: demoting again"
        );
    }
}
