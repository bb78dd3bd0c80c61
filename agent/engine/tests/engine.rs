//! Black-box tests of the host tier through its public API: the bad-input and fault cases of
//! the node-local API, placement and eviction under leases, per-session quotas, a model check
//! of put/get/delete under eviction (with oracles for refused puts and evicted bytes), and a
//! concurrent stress test of commit against session close, reaping and eviction.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use nencache_engine::{
    Committed, Engine, EngineConfig, EngineError, EvictionPolicy, HostConfig, Lease, Limits,
    PutItem, Reserved, traces::Rng,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;

fn engine(pages: u64) -> Engine {
    Engine::new(EngineConfig {
        limits: Limits {
            max_value: 16 * PAGE,
            max_leases: 64,
            max_leases_per_session: 32,
            max_reservations: 16,
            max_sessions: 8,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: pages * PAGE,
            staging: 64 * PAGE,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })
    .unwrap()
}

fn item(key: &[u8]) -> PutItem<'_> {
    PutItem {
        key,
        value_len: 0,
        metadata: b"",
        ttl: None,
        overwrite: false,
    }
}

fn value(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn get_one(e: &Engine, s: u64, key: &[u8]) -> Option<Vec<u8>> {
    let lease = e.get(s, &[key]).unwrap().pop().unwrap()?;
    let v = e.read_leased(s, &lease).unwrap();
    e.release(s, &[lease.id]).unwrap();
    Some(v)
}

#[test]
fn put_get_roundtrip_with_metadata() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    let v = value(1, 10_000);
    let it = PutItem {
        metadata: b"fmt=KV_2LTD",
        ..item(b"k1")
    };
    assert!(e.put_local(s, it, &v).unwrap());
    assert!(
        !e.put_local(s, it, &v).unwrap(),
        "second put of the same key reports Exists"
    );
    let lease = e.get(s, &[b"k1"]).unwrap().pop().unwrap().unwrap();
    assert_eq!(lease.len, 10_000);
    assert_eq!(lease.metadata, b"fmt=KV_2LTD");
    assert_eq!(e.read_leased(s, &lease).unwrap(), v);
    e.release(s, &[lease.id]).unwrap();
    let st = e.stats();
    assert_eq!((st.hits, st.entries, st.leases, st.commits), (1, 1, 0, 1));
}

#[test]
fn oversized_inputs_are_refused_and_nothing_is_lost() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    e.put_local(s, item(b"keep"), &value(3, 100)).unwrap();
    let long = vec![b'x'; 257];
    assert!(matches!(
        e.reserve(
            s,
            &[PutItem {
                value_len: 1,
                ..item(&long)
            }]
        ),
        Err(EngineError::InvalidKey { len: 257, .. })
    ));
    assert!(matches!(
        e.get(s, &[&long]),
        Err(EngineError::InvalidKey { .. })
    ));
    assert!(matches!(
        e.reserve(
            s,
            &[PutItem {
                value_len: 16 * PAGE + 1,
                ..item(b"big")
            }]
        ),
        Err(EngineError::ValueTooLarge { .. })
    ));
    let meta = vec![0; 5000];
    assert!(matches!(
        e.reserve(
            s,
            &[PutItem {
                value_len: 1,
                metadata: &meta,
                ..item(b"m")
            }]
        ),
        Err(EngineError::MetadataTooLarge { .. })
    ));
    // The whole batch is refused when one item is bad: nothing was reserved.
    assert!(
        e.reserve(
            s,
            &[
                PutItem {
                    value_len: 1,
                    ..item(b"ok")
                },
                item(&long)
            ]
        )
        .is_err()
    );
    assert_eq!(e.stats().reservations, 0);
    assert_eq!(get_one(&e, s, b"keep").unwrap(), value(3, 100));
}

#[test]
fn commit_without_reserve_double_commit_and_foreign_ids() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    let other = e.open_session().unwrap();
    assert!(matches!(
        e.commit(s, &[(12345, None)]),
        Err(EngineError::UnknownReservation(_))
    ));
    let Reserved::Space { id, .. } = e
        .reserve(
            s,
            &[PutItem {
                value_len: 10,
                ..item(b"a")
            }],
        )
        .unwrap()[0]
    else {
        panic!("expected space")
    };
    assert!(matches!(
        e.commit(other, &[(id, None)]),
        Err(EngineError::UnknownReservation(_))
    ));
    assert!(matches!(
        e.commit(s, &[(id, None), (id, None)]),
        Err(EngineError::DuplicateId(_))
    ));
    assert_eq!(e.commit(s, &[(id, None)]).unwrap(), vec![Committed::Done]);
    assert!(matches!(
        e.commit(s, &[(id, None)]),
        Err(EngineError::UnknownReservation(_))
    ));
    assert!(matches!(
        e.abort(s, &[id]),
        Err(EngineError::UnknownReservation(_))
    ));
    assert!(matches!(
        e.get(0xdead, &[b"a"]),
        Err(EngineError::UnknownSession(_))
    ));
    assert_eq!(e.stats().entries, 1);
}

#[test]
fn checksum_mismatch_aborts_the_put() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    let v = value(9, 5000);
    let Reserved::Space { id, staging_offset } = e
        .reserve(
            s,
            &[PutItem {
                value_len: 5000,
                ..item(b"c")
            }],
        )
        .unwrap()[0]
    else {
        panic!("expected space")
    };
    // SAFETY: the staging extent is reserved for this test.
    unsafe { e.staging().write(staging_offset as usize, &v) };
    let wrong = nencache_engine::checksum(&v) ^ 1;
    assert_eq!(
        e.commit(s, &[(id, Some(wrong))]).unwrap(),
        vec![Committed::ChecksumMismatch]
    );
    assert!(get_one(&e, s, b"c").is_none());
    let st = e.stats();
    assert_eq!(
        (st.checksum_failures, st.used_bytes, st.reservations),
        (1, 0, 0)
    );
}

#[test]
fn release_of_unknown_lease_changes_nothing() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    e.put_local(s, item(b"a"), &value(1, 10)).unwrap();
    let l = e.get(s, &[b"a"]).unwrap().pop().unwrap().unwrap();
    assert!(matches!(
        e.release(s, &[l.id, 999]),
        Err(EngineError::UnknownLease(999))
    ));
    assert_eq!(
        e.stats().leases,
        1,
        "the valid lease in a refused batch stays held"
    );
    assert!(matches!(
        e.release(s, &[l.id, l.id]),
        Err(EngineError::DuplicateId(_))
    ));
    e.release(s, &[l.id]).unwrap();
    assert!(matches!(
        e.release(s, &[l.id]),
        Err(EngineError::UnknownLease(_))
    ));
}

#[test]
fn leased_entries_survive_eviction_and_full_arena_is_resource_exhausted() {
    let e = engine(16);
    let s = e.open_session().unwrap();
    // Each value takes two pages (value plus key), so eight fill the arena.
    for i in 0..8u8 {
        e.put_local(s, item(&[b'k', i]), &value(i, 4096)).unwrap();
    }
    let leases: Vec<_> = (0..8u8)
        .map(|i| e.get(s, &[&[b'k', i]]).unwrap().pop().unwrap().unwrap())
        .collect();
    let err = e.put_local(s, item(b"new"), &value(50, 4096)).unwrap_err();
    assert!(matches!(err, EngineError::NoSpace { .. }), "{err}");
    for (i, l) in leases.iter().enumerate() {
        assert_eq!(e.read_leased(s, l).unwrap(), value(i as u8, 4096));
    }
    e.release(s, &[leases[3].id]).unwrap();
    e.put_local(s, item(b"new"), &value(50, 4096)).unwrap();
    assert!(
        get_one(&e, s, &[b'k', 3]).is_none(),
        "the released entry was the victim"
    );
    for (i, l) in leases.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert_eq!(e.read_leased(s, l).unwrap(), value(i as u8, 4096));
    }
    assert_eq!(e.stats().evictions, 1);
}

#[test]
fn closing_a_session_reclaims_leases_and_reservations() {
    let e = engine(64);
    let a = e.open_session().unwrap();
    let b = e.open_session().unwrap();
    e.put_local(a, item(b"x"), &value(1, 9000)).unwrap();
    let _lease = e.get(b, &[b"x"]).unwrap();
    e.reserve(
        b,
        &[PutItem {
            value_len: 20_000,
            ..item(b"y")
        }],
    )
    .unwrap();
    let before = e.stats();
    assert_eq!((before.leases, before.reservations), (1, 1));
    assert_eq!(e.close_session(b).unwrap(), (1, 1));
    let after = e.stats();
    assert_eq!(
        (after.leases, after.reservations, after.staging_used_bytes),
        (0, 0, 0)
    );
    assert_eq!(
        after.used_bytes,
        3 * PAGE,
        "only the committed value remains"
    );
    assert!(matches!(
        e.close_session(b),
        Err(EngineError::UnknownSession(_))
    ));
    assert_eq!(get_one(&e, a, b"x").unwrap(), value(1, 9000));
}

#[test]
fn stale_reservations_are_reaped() {
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: 16 * PAGE,
            reservation_timeout: Duration::from_millis(30),
            ..Limits::default()
        },
        host: HostConfig {
            capacity: 64 * PAGE,
            staging: 64 * PAGE,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })
    .unwrap();
    let s = e.open_session().unwrap();
    let r = e
        .reserve(
            s,
            &[PutItem {
                value_len: 100,
                ..item(b"slow")
            }],
        )
        .unwrap();
    assert_eq!(e.reap_expired_reservations(), 0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(e.reap_expired_reservations(), 1);
    let Reserved::Space { id, .. } = r[0] else {
        panic!()
    };
    assert!(matches!(
        e.commit(s, &[(id, None)]),
        Err(EngineError::UnknownReservation(_))
    ));
    assert_eq!(e.stats().used_bytes, 0);
}

#[test]
fn ttl_expires_entries() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    let it = PutItem {
        ttl: Some(Duration::from_millis(30)),
        ..item(b"t")
    };
    e.put_local(s, it, b"v").unwrap();
    e.put_local(s, item(b"forever"), b"v").unwrap();
    assert_eq!(e.lookup(&[b"t", b"forever"]).unwrap().prefix, 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(e.lookup(&[b"t", b"forever"]).unwrap().prefix, 0);
    assert_eq!(e.lookup(&[b"forever"]).unwrap().prefix, 1);
    assert_eq!(e.stats().expirations, 1);
}

#[test]
fn overwrite_and_delete_keep_leased_bytes_intact() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    e.put_local(s, item(b"k"), &value(1, 5000)).unwrap();
    let old = e.get(s, &[b"k"]).unwrap().pop().unwrap().unwrap();
    e.put_local(
        s,
        PutItem {
            overwrite: true,
            ..item(b"k")
        },
        &value(2, 5000),
    )
    .unwrap();
    assert_eq!(get_one(&e, s, b"k").unwrap(), value(2, 5000));
    assert_eq!(
        e.read_leased(s, &old).unwrap(),
        value(1, 5000),
        "old bytes stay until release"
    );
    assert_eq!(e.delete(&[b"k", b"missing"]).unwrap(), 1);
    assert!(get_one(&e, s, b"k").is_none());
    e.release(s, &[old.id]).unwrap();
    assert_eq!(e.stats().used_bytes, 0);
}

#[test]
fn lookup_counts_the_leading_prefix() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    for k in [b"a", b"b", b"d"] {
        e.put_local(s, item(k), b"v").unwrap();
    }
    let l = e.lookup(&[b"a", b"b", b"c", b"d"]).unwrap();
    assert_eq!(l.prefix, 2);
    assert_eq!(l.tiers.len(), 2);
}

#[test]
fn lease_limits_are_enforced_without_leaking() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    e.put_local(s, item(b"a"), b"v").unwrap();
    let keys: Vec<&[u8]> = vec![b"a"; 33];
    assert!(matches!(e.get(s, &keys), Err(EngineError::NoSpace { .. })));
    assert_eq!(
        e.stats().leases,
        0,
        "a refused batch keeps none of its leases"
    );
    assert_eq!(e.get(s, &keys[..32]).unwrap().len(), 32);
}

/// Pages an entry of `value_len` bytes under a key of `key_len` bytes takes (no metadata).
fn pages_of(value_len: u64, key_len: usize) -> u64 {
    (value_len + key_len as u64).div_ceil(PAGE).max(1)
}

fn present(e: &Engine, key: &[u8]) -> bool {
    e.lookup(&[key]).unwrap().prefix == 1
}

/// S3-FIFO with every entry of the main queue leased and unleased entries in the small
/// queue: the put evicts from the small queue instead of giving up.
#[test]
fn s3fifo_evicts_small_entries_when_main_is_all_leased() {
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: 5 * PAGE,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: 20 * PAGE,
            staging: 16 * PAGE,
            policy: EvictionPolicy::S3Fifo,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })
    .unwrap();
    let s = e.open_session().unwrap();
    // Ten two-page entries fill the arena; seven are read, so the next eviction moves them
    // to the main queue (and evicts one of them after a full pass).
    for i in 0..10u8 {
        e.put_local(s, item(&[b'k', i]), &value(i, 4096)).unwrap();
    }
    for i in 0..7u8 {
        assert!(get_one(&e, s, &[b'k', i]).is_some());
    }
    e.put_local(s, item(b"k10"), &value(10, 4096)).unwrap();
    // Lease everything still cached in the main queue (the entries read before).
    let mut held = Vec::new();
    for i in 0..7u8 {
        if let Some(l) = e.get(s, &[&[b'k', i]]).unwrap().pop().unwrap() {
            held.push(l);
        }
    }
    assert!(
        held.len() >= 5,
        "{} of the main queue still cached",
        held.len()
    );
    // Two small-queue entries leave: the small queue is now under its share of the arena.
    assert_eq!(e.delete(&[&[b'k', 7], &[b'k', 8]]).unwrap(), 2);
    // Five pages: more than the free pages, so an unleased small-queue entry must go.
    e.put_local(s, item(b"big"), &value(11, 4 * 4096)).unwrap();
    assert_eq!(get_one(&e, s, b"big").unwrap(), value(11, 4 * 4096));
    for l in &held {
        assert_eq!(e.read_leased(s, l).unwrap().len(), 4096);
    }
}

/// Eight two-page entries fill a 16-page arena; every other one is leased, so no run of
/// three pages can be made. Fills the arena and returns the leases.
fn checkerboard(e: &Engine, s: u64) -> Vec<Lease> {
    for i in 0..8u8 {
        e.put_local(s, item(&[b'k', i]), &value(i, 4096)).unwrap();
    }
    (0..8u8)
        .step_by(2)
        .map(|i| e.get(s, &[&[b'k', i]]).unwrap().pop().unwrap().unwrap())
        .collect()
}

/// A reserve that cannot be satisfied evicts nothing, alone or after other items of its
/// batch were placed by evicting.
#[test]
fn refused_reserve_evicts_nothing() {
    for policy in [EvictionPolicy::S3Fifo, EvictionPolicy::Lru] {
        let e = Engine::new(EngineConfig {
            limits: Limits {
                max_value: 4 * PAGE,
                ..Limits::default()
            },
            host: HostConfig {
                capacity: 16 * PAGE,
                staging: 16 * PAGE,
                policy,
                ..HostConfig::default()
            },
            ..EngineConfig::default()
        })
        .unwrap();
        let s = e.open_session().unwrap();
        let _held = checkerboard(&e, s);
        let three_pages = PutItem {
            value_len: 2 * PAGE,
            ..item(b"three")
        };
        let err = e.reserve(s, &[three_pages]).unwrap_err();
        assert!(matches!(err, EngineError::NoSpace { .. }), "{err}");
        let two_pages = PutItem {
            value_len: PAGE,
            ..item(b"two")
        };
        let err = e.reserve(s, &[two_pages, three_pages]).unwrap_err();
        assert!(matches!(err, EngineError::NoSpace { .. }), "{err}");
        for i in 0..8u8 {
            assert!(present(&e, &[b'k', i]), "{policy:?}: k{i} was evicted");
            assert_eq!(get_one(&e, s, &[b'k', i]).unwrap(), value(i, 4096));
        }
        let st = e.stats();
        assert_eq!(
            (
                st.evictions,
                st.reservations,
                st.staging_used_bytes,
                st.entries
            ),
            (0, 0, 0, 8)
        );
        assert_eq!(st.used_bytes, 16 * PAGE);
        // The two-page item alone fits by evicting one unleased entry.
        e.reserve(s, &[two_pages]).unwrap();
        assert_eq!(e.stats().evictions, 1);
    }
}

/// With leases scattered through the arena, one large put evicts about its own size, not
/// most of the cache.
#[test]
fn large_put_evicts_about_its_size_with_scattered_leases() {
    const PAGES: u64 = 2048;
    for policy in [EvictionPolicy::S3Fifo, EvictionPolicy::Lru] {
        let e = Engine::new(EngineConfig {
            limits: Limits {
                max_value: 256 * PAGE,
                max_leases: 4096,
                max_leases_per_session: 4096,
                ..Limits::default()
            },
            host: HostConfig {
                capacity: PAGES * PAGE,
                staging: 512 * PAGE,
                policy,
                ..HostConfig::default()
            },
            ..EngineConfig::default()
        })
        .unwrap();
        let s = e.open_session().unwrap();
        let mut rng = Rng::new(11);
        let sizes = [4u64, 8, 16, 32, 64];
        let mut held: Vec<Lease> = Vec::new();
        let mut len_of: HashMap<u32, u64> = HashMap::new();
        // Churn: mixed sizes, some keys read again, about one entry in six leased for a while.
        for i in 0..4000u32 {
            let k = rng.range(0, 600) as u32;
            let key = k.to_le_bytes();
            if rng.range(0, 3) == 0 {
                if let Some(l) = e.get(s, &[&key]).unwrap().pop().unwrap() {
                    if rng.range(0, 2) == 0 {
                        held.push(l);
                    } else {
                        e.release(s, &[l.id]).unwrap();
                    }
                }
            } else if !present(&e, &key) {
                let len = sizes[rng.range(0, sizes.len())] * PAGE - 64;
                if e.put_local(s, item(&key), &vec![7; len as usize]).is_ok() {
                    len_of.insert(k, len);
                }
            }
            if held.len() > 12 || (i % 97 == 0 && !held.is_empty()) {
                let l = held.swap_remove(rng.range(0, held.len()));
                e.release(s, &[l.id]).unwrap();
            }
        }
        let cached: Vec<u32> = (0..600u32)
            .filter(|k| present(&e, &k.to_le_bytes()))
            .collect();
        // The put asks for three quarters of the longest run of unpinned pages (at most 128).
        let mut pinned = vec![false; PAGES as usize];
        for l in &held {
            let first = l.offset / PAGE;
            for p in first..first + pages_of(l.len, 4) {
                pinned[p as usize] = true;
            }
        }
        let run = pinned.split(|&p| p).map(<[bool]>::len).max().unwrap_or(0) as u64;
        let big = (run * 3 / 4).min(128) * PAGE - 3;
        let before = e.stats();
        e.put_local(s, item(b"big"), &vec![9; big as usize])
            .unwrap();
        let after = e.stats();
        let evicted_pages: u64 = cached
            .iter()
            .filter(|k| !present(&e, &k.to_le_bytes()))
            .map(|k| pages_of(len_of[k], 4))
            .sum();
        let needed = pages_of(big, 3);
        assert_eq!(
            after.used_bytes,
            before.used_bytes + needed * PAGE - evicted_pages * PAGE,
            "used bytes account for exactly the evicted entries"
        );
        // At most the request plus one extent's overshoot (the largest entry is 64 pages).
        assert!(
            evicted_pages < needed + 64,
            "{policy:?}: a {needed}-page put (longest unpinned run {run}) evicted \
             {evicted_pages} pages of {} cached in {} entries ({} leased)",
            before.used_bytes / PAGE,
            cached.len(),
            held.len()
        );
    }
}

/// One session cannot take all of the staging area: by default a session holds at most a
/// quarter of it (and at least one largest value), so another session can still put.
#[test]
fn one_session_cannot_hold_all_staging() {
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: 8 * PAGE,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: 256 * PAGE,
            staging: 64 * PAGE,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })
    .unwrap();
    let greedy = e.open_session().unwrap();
    let other = e.open_session().unwrap();
    let big = |k: &'static [u8]| PutItem {
        value_len: 8 * PAGE,
        ..item(k)
    };
    let keys: Vec<[u8; 2]> = (0..8u8).map(|i| [b'g', i]).collect();
    let mut granted = 0;
    for k in &keys {
        let it = PutItem {
            value_len: 8 * PAGE,
            ..item(k)
        };
        match e.reserve(greedy, &[it]) {
            Ok(_) => granted += 1,
            Err(EngineError::NoSpace { what }) => {
                assert_eq!(what, "staging space of this session");
                break;
            }
            Err(err) => panic!("{err}"),
        }
    }
    assert!((1..8).contains(&granted), "granted {granted}");
    assert_eq!(e.stats().reservations, granted);
    e.reserve(other, &[big(b"o1")]).unwrap();
    // A batch refused for the quota keeps nothing of it.
    let err = e
        .reserve(
            greedy,
            &[
                PutItem {
                    value_len: 10,
                    ..item(b"small")
                },
                big(b"g9"),
            ],
        )
        .unwrap_err();
    assert!(matches!(err, EngineError::NoSpace { .. }), "{err}");
    assert_eq!(e.stats().reservations, granted + 1);
}

/// `release` refuses more ids than `max_batch` (the list is checked before the lock).
#[test]
fn release_refuses_more_than_max_batch_ids() {
    let e = Engine::new(EngineConfig {
        limits: Limits {
            max_value: 4 * PAGE,
            max_batch: 4,
            ..Limits::default()
        },
        host: HostConfig {
            capacity: 64 * PAGE,
            staging: 16 * PAGE,
            ..HostConfig::default()
        },
        ..EngineConfig::default()
    })
    .unwrap();
    let s = e.open_session().unwrap();
    e.put_local(s, item(b"a"), b"v").unwrap();
    let ids: Vec<u64> = (0..5)
        .map(|_| e.get(s, &[b"a"]).unwrap().pop().unwrap().unwrap().id)
        .collect();
    assert!(matches!(
        e.release(s, &ids),
        Err(EngineError::BatchTooLarge { len: 5, max: 4 })
    ));
    assert_eq!(e.stats().leases, 5, "nothing released");
    e.release(s, &ids[..4]).unwrap();
    e.release(s, &ids[4..]).unwrap();
    assert_eq!(e.stats().leases, 0);
}

/// `read_leased` reads the leased entry's bytes whatever offset and length the caller's
/// `Lease` claims.
#[test]
fn read_leased_uses_the_lease_record_not_the_callers_offset() {
    let e = engine(64);
    let s = e.open_session().unwrap();
    e.put_local(s, item(b"mine"), &value(1, 3000)).unwrap();
    e.put_local(s, item(b"other"), &value(2, 9000)).unwrap();
    let mine = e.get(s, &[b"mine"]).unwrap().pop().unwrap().unwrap();
    let other = e.get(s, &[b"other"]).unwrap().pop().unwrap().unwrap();
    let forged = Lease {
        offset: other.offset,
        len: 64 * PAGE,
        ..mine.clone()
    };
    assert_eq!(e.read_leased(s, &forged).unwrap(), value(1, 3000));
    e.release(s, &[mine.id, other.id]).unwrap();
}

/// A value for the stress test: a header (nonce, length) and bytes derived from key and nonce,
/// so that a reader can check every byte without knowing which put it reads.
fn stress_value(key: u8, nonce: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&nonce.to_le_bytes());
    v.extend_from_slice(&(len as u64).to_le_bytes());
    let mut x = nonce ^ u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    while v.len() < len {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        v.push((x >> 56) as u8);
    }
    v
}

fn check_stress_value(key: u8, bytes: &[u8]) {
    assert!(bytes.len() >= 16, "value of {} bytes", bytes.len());
    let nonce = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    assert_eq!(len, bytes.len(), "key {key}: length header");
    assert!(
        bytes == stress_value(key, nonce, len),
        "key {key}: wrong bytes"
    );
}

/// Commits copy outside the lock while other threads close sessions (the committers' too),
/// reap reservations with a tiny timeout, evict (small arena, leases held) and read. No
/// reader ever sees a wrong byte, and the tables end consistent.
#[test]
fn commit_races_close_reap_and_eviction() {
    const KEYS: u8 = 48;
    let e = Arc::new(
        Engine::new(EngineConfig {
            limits: Limits {
                max_value: 24 * PAGE,
                max_leases: 256,
                max_leases_per_session: 64,
                max_reservations: 64,
                max_sessions: 32,
                reservation_timeout: Duration::from_millis(1),
                ..Limits::default()
            },
            host: HostConfig {
                capacity: 256 * PAGE,
                staging: 96 * PAGE,
                ..HostConfig::default()
            },
            ..EngineConfig::default()
        })
        .unwrap(),
    );
    let done = Arc::new(AtomicBool::new(false));
    // Sessions of the committers and readers, which the closer thread closes at random.
    let slots: Arc<Vec<AtomicU64>> = Arc::new((0..5).map(|_| AtomicU64::new(0)).collect());
    let session_of = |e: &Engine, slot: &AtomicU64| {
        let s = slot.load(Ordering::SeqCst);
        if s != 0 {
            return s;
        }
        let s = e.open_session().unwrap();
        slot.store(s, Ordering::SeqCst);
        s
    };
    let mut threads = Vec::new();
    for w in 0..3u64 {
        let (e, slots) = (e.clone(), slots.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(100 + w);
            for _ in 0..1500 {
                let s = session_of(&e, &slots[w as usize]);
                let n = rng.range(1, 4);
                let mut vals = Vec::new();
                for _ in 0..n {
                    let key = rng.range(0, usize::from(KEYS)) as u8;
                    let len = rng.range(16, 24 * PAGE as usize);
                    vals.push((key, stress_value(key, rng.next_u64(), len)));
                }
                let keys: Vec<[u8; 1]> = vals.iter().map(|(k, _)| [*k]).collect();
                let items: Vec<PutItem<'_>> = keys
                    .iter()
                    .zip(&vals)
                    .map(|(k, (_, v))| PutItem {
                        value_len: v.len() as u64,
                        overwrite: true,
                        ..item(k)
                    })
                    .collect();
                let reserved = match e.reserve(s, &items) {
                    Ok(r) => r,
                    Err(EngineError::NoSpace { .. }) => continue,
                    Err(EngineError::UnknownSession(_)) => {
                        let _ = slots[w as usize].compare_exchange(
                            s,
                            0,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                        continue;
                    }
                    Err(err) => panic!("reserve: {err}"),
                };
                let mut commits = Vec::new();
                for (r, (_, v)) in reserved.iter().zip(&vals) {
                    if let Reserved::Space { id, staging_offset } = *r {
                        // SAFETY: the staging extent is this reservation's (if it was reaped
                        // meanwhile, the checksum refuses whatever the bytes became).
                        unsafe { e.staging().write(staging_offset as usize, v) };
                        commits.push((id, Some(nencache_engine::checksum(v))));
                    }
                }
                match e.commit(s, &commits) {
                    Ok(_)
                    | Err(EngineError::UnknownReservation(_))
                    | Err(EngineError::UnknownSession(_)) => {}
                    Err(err) => panic!("commit: {err}"),
                }
            }
            let s = slots[w as usize].swap(0, Ordering::SeqCst);
            if s != 0 {
                let _ = e.close_session(s);
            }
        }));
    }
    for r in 3..5usize {
        let (e, slots, done) = (e.clone(), slots.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng::new(200 + r as u64);
            let mut held: Vec<(u8, Lease, u64)> = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let s = session_of(&e, &slots[r]);
                held.retain(|(_, _, hs)| *hs == s);
                let key = [rng.range(0, usize::from(KEYS)) as u8];
                match e.get(s, &[&key]) {
                    Ok(mut v) => {
                        if let Some(l) = v.pop().unwrap() {
                            match e.read_leased(s, &l) {
                                Ok(bytes) => check_stress_value(key[0], &bytes),
                                Err(EngineError::UnknownLease(_)) => {}
                                Err(err) => panic!("read: {err}"),
                            }
                            held.push((key[0], l, s));
                        }
                    }
                    Err(EngineError::UnknownSession(_)) => {
                        let _ = slots[r].compare_exchange(s, 0, Ordering::SeqCst, Ordering::SeqCst);
                    }
                    Err(EngineError::NoSpace { .. }) => {}
                    Err(err) => panic!("get: {err}"),
                }
                if held.len() > 12 || rng.range(0, 3) == 0 {
                    while held.len() > 6 {
                        let (k, l, hs) = held.swap_remove(rng.range(0, held.len()));
                        if let Ok(bytes) = e.read_leased(hs, &l) {
                            check_stress_value(k, &bytes);
                        }
                        let _ = e.release(hs, &[l.id]);
                    }
                }
            }
            let s = slots[r].swap(0, Ordering::SeqCst);
            if s != 0 {
                let _ = e.close_session(s);
            }
        }));
    }
    let closer = {
        let (e, slots, done) = (e.clone(), slots.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(300);
            while !done.load(Ordering::SeqCst) {
                let slot = &slots[rng.range(0, slots.len())];
                let s = slot.load(Ordering::SeqCst);
                if s != 0
                    && slot
                        .compare_exchange(s, 0, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    let _ = e.close_session(s);
                }
                std::thread::sleep(Duration::from_micros(rng.range(50, 500) as u64));
            }
        })
    };
    let reaper = {
        let (e, done) = (e.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                e.reap_expired_reservations();
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let committers: Vec<_> = threads.drain(..3).collect();
    for t in committers {
        t.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    closer.join().unwrap();
    reaper.join().unwrap();
    for slot in slots.iter() {
        let s = slot.swap(0, Ordering::SeqCst);
        if s != 0 {
            let _ = e.close_session(s);
        }
    }
    let st = e.stats();
    assert_eq!(
        (
            st.leases,
            st.reservations,
            st.sessions,
            st.staging_used_bytes
        ),
        (0, 0, 0, 0),
        "{st:?}"
    );
    assert!(st.commits > 0, "{st:?}");
    let s = e.open_session().unwrap();
    let mut live_pages = 0;
    for k in 0..KEYS {
        if let Some(bytes) = get_one(&e, s, &[k]) {
            check_stress_value(k, &bytes);
            live_pages += pages_of(bytes.len() as u64, 1);
        }
    }
    let st = e.stats();
    assert_eq!(st.used_bytes, live_pages * PAGE, "{st:?}");
    let keys: Vec<[u8; 1]> = (0..KEYS).map(|k| [k]).collect();
    let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
    e.delete(&refs).unwrap();
    assert_eq!(e.stats().used_bytes, 0);
}

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8, usize),
    Get(u8),
    Delete(u8),
    /// Lease the n-th cached key and keep the lease.
    Hold(u8),
    ReleaseOne(usize),
    ReleaseAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40, any::<u8>(), 1usize..12_000).prop_map(|(k, s, l)| Op::Put(k, s, l)),
        3 => (0u8..40).prop_map(Op::Get),
        1 => (0u8..40).prop_map(Op::Delete),
        3 => (0u8..40).prop_map(Op::Hold),
        2 => any::<usize>().prop_map(Op::ReleaseOne),
        1 => Just(Op::ReleaseAll),
    ]
}

/// The model check's arena, and its largest entry (a value of under 12,000 bytes and its key).
const ARENA_PAGES: u64 = 24;
const MAX_ENTRY_PAGES: u64 = 3;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Against a HashMap of the last value put for each key: a hit always returns exactly
    /// that value (eviction may turn hits into misses, never into wrong values), a deleted key
    /// misses, a held lease always reads the bytes it was granted, and space accounting
    /// returns to zero once everything is deleted and released. Two oracles on puts: a put is
    /// refused for space only when no run of unpinned pages (free, or held by unleased
    /// entries) is long enough, and a put evicts less than its own size plus one entry.
    #[test]
    fn model_check(ops in proptest::collection::vec(op(), 1..300), lru in any::<bool>()) {
        let e = Engine::new(EngineConfig { limits: Limits { max_value: 4 * PAGE, ..Limits::default() }, host: HostConfig { capacity: ARENA_PAGES * PAGE, staging: 8 * PAGE, policy: if lru { EvictionPolicy::Lru } else { EvictionPolicy::S3Fifo }, ..HostConfig::default() }, ..EngineConfig::default() }).unwrap();
        let s = e.open_session().unwrap();
        let mut model: HashMap<u8, Vec<u8>> = HashMap::new();
        let mut held: Vec<(Lease, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                Op::Put(k, seed, len) => {
                    let v = value(seed, len);
                    let key = [k];
                    let it = PutItem { overwrite: true, ..item(&key) };
                    let needed = pages_of(len as u64, 1);
                    // Held leases pin their entries' pages (overwritten or deleted ones too);
                    // every other page is free or can be evicted.
                    let mut pinned = vec![false; ARENA_PAGES as usize];
                    for (l, _) in &held {
                        let first = l.offset / PAGE;
                        for p in first..first + pages_of(l.len, 1) {
                            pinned[p as usize] = true;
                        }
                    }
                    let window = pinned.split(|&p| p).map(<[bool]>::len).max().unwrap_or(0) as u64;
                    let cached: Vec<u8> = model.keys().copied().filter(|&c| c != k && present(&e, &[c])).collect();
                    match e.put_local(s, it, &v) {
                        Ok(_) => {
                            model.insert(k, v);
                            let evicted: u64 = cached
                                .iter()
                                .filter(|&&c| !present(&e, &[c]))
                                .map(|c| pages_of(model[c].len() as u64, 1))
                                .sum();
                            prop_assert!(
                                evicted < needed + MAX_ENTRY_PAGES,
                                "a {}-page put evicted {} pages", needed, evicted
                            );
                        }
                        Err(EngineError::NoSpace { what }) => prop_assert!(
                            window < needed,
                            "{}-page put refused ({}) with a run of {} unpinned pages",
                            needed, what, window
                        ),
                        Err(err) => prop_assert!(false, "put failed: {}", err),
                    }
                }
                Op::Get(k) => {
                    if let Some(got) = get_one(&e, s, &[k]) {
                        prop_assert_eq!(Some(&got), model.get(&k), "key {}", k);
                    }
                }
                Op::Delete(k) => {
                    e.delete(&[&[k]]).unwrap();
                    model.remove(&k);
                }
                Op::Hold(i) => {
                    // Lease one of the keys cached now, so that pins are common.
                    let cached: Vec<u8> = (0u8..40).filter(|&c| present(&e, &[c])).collect();
                    let Some(&k) = cached.get(usize::from(i) % cached.len().max(1)) else {
                        continue;
                    };
                    if let Ok(mut v) = e.get(s, &[&[k]])
                        && let Some(l) = v.pop().unwrap()
                    {
                        let bytes = e.read_leased(s, &l).unwrap();
                        prop_assert_eq!(Some(&bytes), model.get(&k));
                        held.push((l, bytes));
                    }
                }
                Op::ReleaseOne(i) => {
                    if !held.is_empty() {
                        let (l, bytes) = held.swap_remove(i % held.len());
                        prop_assert_eq!(e.read_leased(s, &l).unwrap(), bytes);
                        e.release(s, &[l.id]).unwrap();
                    }
                }
                Op::ReleaseAll => {
                    for (l, bytes) in held.drain(..) {
                        prop_assert_eq!(e.read_leased(s, &l).unwrap(), bytes);
                        e.release(s, &[l.id]).unwrap();
                    }
                }
            }
            let st = e.stats();
            prop_assert!(st.used_bytes <= st.capacity_bytes);
        }
        for (l, bytes) in held.drain(..) {
            prop_assert_eq!(e.read_leased(s, &l).unwrap(), bytes);
            e.release(s, &[l.id]).unwrap();
        }
        let keys: Vec<[u8; 1]> = (0u8..40).map(|k| [k]).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
        e.delete(&refs).unwrap();
        let st = e.stats();
        prop_assert_eq!((st.used_bytes, st.entries, st.leases, st.staging_used_bytes), (0, 0, 0, 0));
    }
}

#[test]
fn a_key_given_twice_in_one_reserve_is_put_once() {
    let e = engine(256);
    let s = e.open_session().unwrap();
    let item = |k: &'static [u8], overwrite| PutItem {
        key: k,
        value_len: 10,
        metadata: b"",
        ttl: None,
        overwrite,
    };
    let r = e
        .reserve(
            s,
            &[item(b"d", false), item(b"x", false), item(b"d", false)],
        )
        .unwrap();
    assert!(matches!(r[0], Reserved::Space { .. }));
    assert!(matches!(r[1], Reserved::Space { .. }));
    assert_eq!(r[2], Reserved::Exists, "the second `d` is the same put");
    // Overwrites are reserved each time; the last committed wins.
    let r = e.reserve(s, &[item(b"o", true), item(b"o", true)]).unwrap();
    assert!(r.iter().all(|r| matches!(r, Reserved::Space { .. })));
}
