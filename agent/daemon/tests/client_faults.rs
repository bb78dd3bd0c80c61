//! The client against the faults real callers meet: batches past every request limit,
//! calls cancelled by timeouts, an agent killed and restarted under a live client, slots used
//! after their reservation is gone, and version skew. Each test runs the real agent binary.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use nencache_api::{
    PROTOCOL_VERSION,
    attach::{self, Reply},
    v1,
};
use nencache_client::{Client, ClientError, ClientOptions, Put, PutOutcome, Reserve};
use tonic::Code;

fn options(fast_path: bool) -> ClientOptions {
    ClientOptions {
        fast_path,
        ..ClientOptions::default()
    }
}

/// Keys, 4 KiB metadata each and small values: a batch whose reserve request is several
/// times the 1 MiB frame limit and over the 4 MiB gRPC message limit, with more items than
/// `max_batch`.
fn heavy_batch(tag: &str, n: usize) -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let key = format!("{tag}-{i:05}-{}", "k".repeat(200)).into_bytes();
            (
                key,
                pattern(i as u64, 100 + i % 3000),
                pattern(i as u64 + 7, 4096),
            )
        })
        .collect()
}

fn puts(batch: &[(Vec<u8>, Vec<u8>, Vec<u8>)]) -> Vec<Put<'_>> {
    batch
        .iter()
        .map(|(k, v, m)| Put {
            key: k,
            value: v,
            metadata: m,
            ttl: None,
        })
        .collect()
}

/// Defect: a `put_many` past the agent's frame or message limit ended the session, its
/// leases went with it, and a value still held showed the next put's bytes.
#[tokio::test(flavor = "multi_thread")]
async fn batches_past_every_limit_are_split_and_held_values_never_change() {
    let agent = TestAgent::start(&["--host-capacity", "256MiB"]);
    for fast in [true, false] {
        let c = Client::connect_with(&agent.socket, options(fast))
            .await
            .unwrap();
        let tag = if fast { "fast" } else { "grpc" };
        let held_key = format!("{tag}-held");
        let held_value = pattern(99, 1 << 20);
        c.put(held_key.as_bytes(), &held_value, b"meta")
            .await
            .unwrap();
        let held = c
            .get(&[held_key.as_bytes()])
            .await
            .unwrap()
            .pop()
            .flatten()
            .unwrap();
        let session = c.session();

        let batch = heavy_batch(tag, 1100);
        let outcomes = c.put_many(&puts(&batch)).await.unwrap();
        assert_eq!(outcomes, vec![PutOutcome::Stored; batch.len()]);
        assert_eq!(c.session(), session, "the session survived");

        // Gets past the limits too: a response of more than 4 MiB of metadata.
        let keys: Vec<&[u8]> = batch.iter().map(|(k, ..)| &k[..]).collect();
        let values = c.get(&keys).await.unwrap();
        for ((_, v, m), got) in batch.iter().zip(&values) {
            let got = got.as_ref().unwrap();
            assert_eq!((&got[..], got.metadata()), (&v[..], &m[..]));
        }
        let (prefix, _) = c.lookup(&keys).await.unwrap();
        assert_eq!(prefix, keys.len());
        drop(values);

        // Churn the arena: if the held lease had been lost, its extent would be reused.
        for i in 0..64u64 {
            let k = format!("{tag}-churn-{i}");
            c.put(k.as_bytes(), &pattern(i + 1000, 1 << 20), b"")
                .await
                .unwrap();
        }
        assert_eq!(&held[..], &held_value[..]);
        assert_eq!(held.metadata(), b"meta");
        assert_eq!(c.delete(&keys).await.unwrap(), keys.len());
    }
}

/// Defect: a `get` cancelled after its request was sent leaked its lease for the life of the
/// session and turned the fast path off for good; a cancelled put leaked its reservations.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_calls_leak_nothing_and_the_fast_path_stays_on() {
    let agent = TestAgent::start(&[]);
    for fast in [true, false] {
        let c = Client::connect_with(&agent.socket, options(fast))
            .await
            .unwrap();
        let value = pattern(5, 256 << 10);
        c.put(b"hot", &value, b"").await.unwrap();
        for i in 0..300u64 {
            // Polled once (the request goes out), then dropped before its answer.
            let _ = tokio::time::timeout(Duration::ZERO, c.get(&[b"hot", b"cold"])).await;
            let k = format!("put-{fast}-{i}");
            let v = pattern(i, 64 << 10);
            let _ = tokio::time::timeout(Duration::ZERO, c.put(k.as_bytes(), &v, b"")).await;
            if i % 50 == 0 {
                // Some answered, some held while others are cancelled.
                let held = c.get(&[b"hot"]).await.unwrap();
                assert_eq!(&held[0].as_ref().unwrap()[..], &value[..]);
            }
        }
        eventually("cancelled leases and reservations returned", async || {
            c.flush_releases().await.unwrap();
            let s = c.stats().await.unwrap();
            s.leases == 0 && s.reservations == 0
        })
        .await;
        if fast {
            let before = (agent.calls("session_get"), agent.calls("get"));
            let v = c.get(&[b"hot"]).await.unwrap();
            assert_eq!(&v[0].as_ref().unwrap()[..], &value[..]);
            assert_eq!(
                (agent.calls("session_get"), agent.calls("get")),
                (before.0 + 1, before.1),
                "gets still take the fast path"
            );
        }
    }
}

/// Defect: after an agent restart every call of an existing client failed forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_re_attaches_after_the_agent_is_killed_and_restarted() {
    let mut agent = TestAgent::start(&[]);
    let fast = Client::connect(&agent.socket).await.unwrap();
    let slow = Client::connect_with(&agent.socket, options(false))
        .await
        .unwrap();
    let before = pattern(1, 300 << 10);
    fast.put(b"before", &before, b"m").await.unwrap();
    let held = fast
        .get(&[b"before"])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    let slot = fast
        .reserve(&[Reserve {
            key: b"pending",
            value_len: 10,
            metadata: b"",
            ttl: None,
        }])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    let old = (fast.session(), slow.session());

    agent.kill_and_restart();

    // The next call of each client works, on a new session of the new agent.
    for c in [&fast, &slow] {
        assert!(
            c.get(&[b"before"]).await.unwrap()[0].is_none(),
            "a new, empty cache"
        );
        c.put(b"after", b"new agent", b"").await.unwrap();
        let v = c.get(&[b"after"]).await.unwrap();
        assert_eq!(&v[0].as_ref().unwrap()[..], b"new agent");
    }
    assert_ne!((fast.session(), slow.session()), old);
    assert_eq!(fast.stats().await.unwrap().sessions, 2);
    // A value of the old session still reads its bytes (it maps the old region).
    assert_eq!((&held[..], held.metadata()), (&before[..], &b"m"[..]));
    // A slot of the old session refuses writes and commits instead of touching the new one.
    assert!(matches!(
        fast.write_slot(&slot, 0, b"x"),
        Err(ClientError::Disconnected(_))
    ));
    assert!(fast.commit(vec![slot]).await.is_err());
    drop(held);
    fast.flush_releases().await.unwrap();
    let s = fast.stats().await.unwrap();
    assert_eq!((s.leases, s.reservations), (0, 0));
}

/// Defect: slots were committed and aborted by reference, so one could be written after its
/// staging extent went to another put. They are consumed now; a dropped slot is aborted, and
/// one past its reservation's deadline refuses writes.
#[tokio::test(flavor = "multi_thread")]
async fn slots_are_consumed_aborted_when_dropped_and_refused_when_expired() {
    let agent = TestAgent::start(&["--reservation-timeout", "400ms"]);
    let c = agent.client().await;
    let reserve = |key: &'static [u8]| Reserve {
        key,
        value_len: 4096,
        metadata: b"",
        ttl: None,
    };
    let slots = c.reserve(&[reserve(b"a"), reserve(b"b")]).await.unwrap();
    assert_eq!(c.stats().await.unwrap().reservations, 2);
    drop(slots);
    eventually("dropped slots aborted", async || {
        c.stats().await.unwrap().reservations == 0
    })
    .await;
    assert_eq!(
        c.stats().await.unwrap().reclaimed_reservations,
        0,
        "aborted, not reaped"
    );

    let slot = c
        .reserve(&[reserve(b"late")])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    c.write_slot(&slot, 0, &[1; 4096]).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = c.write_slot(&slot, 0, &[2; 4096]).unwrap_err();
    assert!(err.to_string().contains("time out"), "{err}");
    let slot2 = c
        .reserve(&[reserve(b"ok")])
        .await
        .unwrap()
        .pop()
        .flatten()
        .unwrap();
    c.write_slot(&slot2, 0, &[3; 4096]).unwrap();
    assert_eq!(
        c.commit(vec![slot2]).await.unwrap(),
        vec![PutOutcome::Stored]
    );
    c.abort(vec![slot]).await.ok();
}

/// Defect: the gRPC handshake accepted any version >= 1 while attach required an exact
/// match. The handshake answers the version to attach with, and attach accepts it.
#[tokio::test(flavor = "multi_thread")]
async fn handshake_and_attach_agree_on_versions() {
    let agent = TestAgent::start(&[]);
    let mut grpc = raw_grpc(&agent.socket).await;
    for offered in [0, 1, 2, 1000] {
        let r = grpc
            .handshake(v1::HandshakeRequest {
                protocol_version: offered,
                ..Default::default()
            })
            .await;
        let Ok(r) = r else {
            assert_eq!(offered, 0);
            assert_eq!(r.unwrap_err().code(), Code::FailedPrecondition);
            continue;
        };
        let version = r.into_inner().protocol_version;
        assert_eq!(version, offered.min(PROTOCOL_VERSION));
        let reply = hello(&agent, version);
        assert_eq!(reply.status, attach::status::OK, "{}", reply.message);
    }
    let reply = hello(&agent, PROTOCOL_VERSION + 1);
    assert_eq!(reply.status, attach::status::BAD_VERSION);
    assert!(reply.message.contains("not supported"), "{}", reply.message);
}

fn hello(agent: &TestAgent, version: u32) -> Reply {
    raw_attach_as(agent, version).1
}

/// A put batch refused part-way reports what was stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_refused_part_way_reports_each_outcome() {
    // 8 MiB of arena and values of up to 1 MiB; 2 MiB of staging, of which one session may
    // hold 1 MiB, so a batch goes in rounds of at most 1 MiB.
    let agent = TestAgent::start(&[
        "--host-capacity",
        "8MiB",
        "--max-value",
        "1MiB",
        "--staging-size",
        "2MiB",
    ]);
    let c = agent.client().await;
    // Pin 512 KiB values until the arena is full, then unpin one in the middle: the runs left
    // for new values are its extent and the free tail, each shorter than 1 MiB.
    let mut held = Vec::new();
    for i in 0..20 {
        let k = format!("pinned-{i}");
        match c.put(k.as_bytes(), &pattern(i, 512 << 10), b"").await {
            Ok(_) => held.push(c.get(&[k.as_bytes()]).await.unwrap()),
            Err(e) => {
                assert_eq!(e.code(), Some(Code::ResourceExhausted), "{e}");
                break;
            }
        }
    }
    assert!(held.len() < 20);
    drop(held.remove(held.len() / 2));
    c.flush_releases().await.unwrap();
    // Two 256 KiB values fit (the first round); a 1 MiB value fits in no run (the second).
    let values: Vec<Vec<u8>> = [256 << 10, 256 << 10, 1 << 20, 256 << 10]
        .iter()
        .enumerate()
        .map(|(i, &len)| pattern(100 + i as u64, len))
        .collect();
    let keys: Vec<String> = (0..4).map(|i| format!("batch-{i}")).collect();
    let batch: Vec<Put<'_>> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| Put {
            key: k.as_bytes(),
            value: v,
            metadata: b"",
            ttl: None,
        })
        .collect();
    let Err(ClientError::PartialPut { outcomes, source }) = c.put_many(&batch).await else {
        panic!("expected a partial put")
    };
    assert_eq!(source.code(), Some(Code::ResourceExhausted));
    assert_eq!(
        outcomes,
        vec![
            Some(PutOutcome::Stored),
            Some(PutOutcome::Stored),
            None,
            None
        ]
    );
    for (k, o) in keys.iter().zip(&outcomes) {
        let got = c.get(&[k.as_bytes()]).await.unwrap();
        assert_eq!(got[0].is_some(), o.is_some(), "{k}: {o:?}");
    }
}

/// A key or metadata too long for its length field is refused by the client with the
/// agent's words, before anything is encoded: a wrapped length would be read as other
/// fields (once, as lease ids to release, taking the lease of a value still held).
#[tokio::test(flavor = "multi_thread")]
async fn over_long_keys_and_metadata_are_refused_before_encoding() {
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    let value = pattern(8, 64 << 10);
    c.put(b"held", &value, b"").await.unwrap();
    let held = c.get(&[b"held"]).await.unwrap().pop().flatten().unwrap();
    let long = vec![7u8; (1 << 16) + 2];
    for e in [
        c.get(&[&long[..]]).await.map(drop).unwrap_err(),
        c.lookup(&[&long[..]]).await.map(drop).unwrap_err(),
        c.put(&long, b"v", b"").await.map(drop).unwrap_err(),
        c.put(b"k", b"v", &long).await.map(drop).unwrap_err(),
        c.delete(&[&long[..]]).await.map(drop).unwrap_err(),
    ] {
        assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
        let m = e.to_string();
        assert!(m.contains("65538"), "the message names the length: {m}");
    }
    assert_eq!(
        c.stats().await.unwrap().leases,
        1,
        "the held lease is still held"
    );
    c.delete(&[b"held"]).await.unwrap();
    for i in 0..40u64 {
        c.put(format!("churn-{i}").as_bytes(), &pattern(i, 2 << 20), b"")
            .await
            .unwrap();
    }
    assert_eq!(&held[..], &value[..]);
}

/// Tasks sharing one client share its session's quotas: concurrent `put_many` calls wait
/// for each other's rounds instead of being refused, and a slot the caller keeps shrinks a
/// round rather than failing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_sharing_a_client_share_its_quota() {
    let agent = TestAgent::start(&["--host-capacity", "256MiB"]);
    let c = agent.client().await;
    let slot = c
        .reserve(&[Reserve {
            key: b"kept",
            value_len: 4096,
            metadata: b"",
            ttl: None,
        }])
        .await
        .unwrap();
    let quota = c.info().limits.max_reservations_per_session as usize;
    let tasks: Vec<_> = (0..6)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                let batch: Vec<(Vec<u8>, Vec<u8>)> = (0..quota)
                    .map(|i| (format!("t{t}-{i}").into_bytes(), pattern(i as u64, 256)))
                    .collect();
                let puts: Vec<Put<'_>> = batch
                    .iter()
                    .map(|(k, v)| Put {
                        key: k,
                        value: v,
                        metadata: b"",
                        ttl: None,
                    })
                    .collect();
                c.put_many(&puts).await.map(|o| o.len())
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), quota);
    }
    drop(slot);
    c.flush_releases().await.unwrap();
}

/// A client whose runtime was shut down (a global client shared by tests, bindings with a
/// runtime per call) attaches a new session on its next call, on the caller's runtime.
#[test]
fn a_client_outliving_its_runtime_re_attaches() {
    let agent = TestAgent::start(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = rt.block_on(async { agent.client().await });
    rt.block_on(c.put(b"k", b"v", b"")).unwrap();
    let first = c.session();
    drop(rt);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async {
        match c.get(&[b"k"]).await {
            Err(ClientError::Disconnected(_)) => c.get(&[b"k"]).await,
            r => r,
        }
    });
    assert_eq!(&got.unwrap()[0].as_ref().unwrap()[..], b"v");
    assert_ne!(c.session(), first);
}

/// Connecting where no agent answers says why, with the cause, not just "transport error".
#[tokio::test(flavor = "multi_thread")]
async fn connect_errors_name_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let e = Client::connect(dir.path().join("none.sock"))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    assert!(e.to_string().contains("No such file"), "{e}");
}

/// Reservations of one byte under `keys`.
fn one_byte_slots(keys: &[String]) -> Vec<Reserve<'_>> {
    keys.iter()
        .map(|k| Reserve {
            key: k.as_bytes(),
            value_len: 1,
            metadata: b"",
            ttl: None,
        })
        .collect()
}

/// Puts of the one-byte value `v` under `keys`.
fn one_byte_puts(keys: &[String]) -> Vec<Put<'_>> {
    keys.iter()
        .map(|k| Put {
            key: k.as_bytes(),
            value: b"v",
            metadata: b"",
            ttl: None,
        })
        .collect()
}

/// The agent counts a dropped slot's reservation until its abort arrives, a moment after the
/// client has given the quota back: a put straight after dropping a whole quota of slots is
/// not refused for it.
#[tokio::test(flavor = "multi_thread")]
async fn dropped_slots_free_the_quota_for_the_next_put() {
    let agent = TestAgent::start(&[]);
    for fast in [true, false] {
        let c = Client::connect_with(&agent.socket, options(fast))
            .await
            .unwrap();
        let quota = c.info().limits.max_reservations_per_session as usize;
        for round in 0..8 {
            let keys: Vec<String> = (0..quota).map(|i| format!("{fast}-{round}-{i}")).collect();
            let slots = c.reserve(&one_byte_slots(&keys)).await.unwrap();
            drop(slots);
            let outcomes = c.put_many(&one_byte_puts(&keys)).await.unwrap();
            assert_eq!(outcomes, vec![PutOutcome::Stored; quota]);
        }
    }
}

/// Puts waiting for quota held by slots of a session that dies (the agent restarted) stop
/// waiting at once: they move to a new session, or fail as calls do while no agent answers,
/// instead of waiting out the reservation timeout.
#[tokio::test(flavor = "multi_thread")]
async fn puts_waiting_on_quota_move_to_the_new_session_after_a_restart() {
    let mut agent = TestAgent::start(&[]);
    let c = agent.client().await;
    let quota = c.info().limits.max_reservations_per_session as usize;
    let keys: Vec<String> = (0..quota).map(|i| format!("held-{i}")).collect();
    let held = c.reserve(&one_byte_slots(&keys)).await.unwrap();
    let waiters: Vec<_> = (0..4)
        .map(|t| {
            let c = c.clone();
            tokio::spawn(async move {
                let keys: Vec<String> = (0..50).map(|i| format!("w{t}-{i}")).collect();
                c.put_many(&one_byte_puts(&keys)).await.map(|o| o.len())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.kill_and_restart();
    let started = std::time::Instant::now();
    for w in waiters {
        match w.await.unwrap() {
            Ok(n) => assert_eq!(n, 50),
            Err(e @ (ClientError::Connect { .. } | ClientError::Disconnected(_))) => {
                eprintln!("a waiter failed while the agent restarted: {e}");
            }
            Err(e) => panic!("a waiter failed with {e}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the waiters moved on at once, not after the reservation timeout: {:?}",
        started.elapsed()
    );
    drop(held);
    assert_eq!(
        c.put(b"after", b"v", b"").await.unwrap(),
        PutOutcome::Stored
    );
}
