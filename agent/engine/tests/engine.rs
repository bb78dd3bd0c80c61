//! Black-box tests of the host tier through its public API: the bad-input and fault cases of
//! the node-local API, and a model check of put/get/delete under eviction.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{collections::HashMap, time::Duration};

use nencache_engine::{
    Committed, Engine, EngineConfig, EngineError, EvictionPolicy, PutItem, Reserved,
};
use proptest::prelude::*;

const PAGE: u64 = 4096;

fn engine(pages: u64) -> Engine {
    Engine::new(EngineConfig {
        capacity: pages * PAGE,
        staging: 64 * PAGE,
        max_value: 16 * PAGE,
        max_leases: 64,
        max_leases_per_session: 32,
        max_reservations: 16,
        max_sessions: 8,
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
        capacity: 64 * PAGE,
        staging: 64 * PAGE,
        max_value: 16 * PAGE,
        reservation_timeout: Duration::from_millis(30),
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

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8, usize),
    Get(u8),
    Delete(u8),
    Hold(u8),
    ReleaseAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..40, any::<u8>(), 1usize..12_000).prop_map(|(k, s, l)| Op::Put(k, s, l)),
        4 => (0u8..40).prop_map(Op::Get),
        1 => (0u8..40).prop_map(Op::Delete),
        1 => (0u8..40).prop_map(Op::Hold),
        1 => Just(Op::ReleaseAll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Against a HashMap of the last value put for each key: a hit always returns exactly
    /// that value (eviction may turn hits into misses, never into wrong values), a deleted key
    /// misses, a held lease always reads the bytes it was granted, and space accounting
    /// returns to zero once everything is deleted and released.
    #[test]
    fn model_check(ops in proptest::collection::vec(op(), 1..300), lru in any::<bool>()) {
        let e = Engine::new(EngineConfig {
            capacity: 24 * PAGE,
            staging: 8 * PAGE,
            max_value: 4 * PAGE,
            policy: if lru { EvictionPolicy::Lru } else { EvictionPolicy::S3Fifo },
            ..EngineConfig::default()
        }).unwrap();
        let s = e.open_session().unwrap();
        let mut model: HashMap<u8, Vec<u8>> = HashMap::new();
        let mut held = Vec::new();
        for op in ops {
            match op {
                Op::Put(k, seed, len) => {
                    let v = value(seed, len);
                    let key = [k];
                    let it = PutItem { overwrite: true, ..item(&key) };
                    match e.put_local(s, it, &v) {
                        Ok(_) => { model.insert(k, v); }
                        Err(EngineError::NoSpace { .. }) => {}
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
                Op::Hold(k) => {
                    if let Ok(mut v) = e.get(s, &[&[k]])
                        && let Some(l) = v.pop().unwrap()
                    {
                        let bytes = e.read_leased(s, &l).unwrap();
                        prop_assert_eq!(Some(&bytes), model.get(&k));
                        held.push((l, bytes));
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
