//! Leader election against an in-memory API server (tests/common) that keeps
//! `resourceVersion`s and answers stale writes with 409, as the real one does, so electors
//! really race.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::Lease, apimachinery::pkg::apis::meta::v1::MicroTime, jiff::Timestamp,
};
use kube::Api;
use nencache_operator::leader::{Elector, LeaderError, LeaseSettings};

mod common;

use common::fake_api::{FakeApi, client};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/leader";

fn elector(store: &Arc<Mutex<FakeApi>>, identity: &str) -> Elector {
    elector_lasting(store, identity, Duration::from_secs(2))
}

fn elector_lasting(store: &Arc<Mutex<FakeApi>>, identity: &str, lease: Duration) -> Elector {
    let mut s = LeaseSettings::new("leader", identity);
    s.duration = lease;
    s.renew_deadline = Duration::from_millis(1200);
    s.renew_every = Duration::from_millis(200);
    s.retry_every = Duration::from_millis(100);
    Elector::new(Api::namespaced(client(store, "ops"), "ops"), s)
}

fn holder(store: &Mutex<FakeApi>) -> Option<String> {
    let s = store.lock().unwrap();
    let l: Lease = serde_json::from_value(s.objects.get(LEASE)?.clone()).unwrap();
    l.spec?.holder_identity
}

#[tokio::test]
async fn one_replica_leads_and_the_other_waits_until_the_lease_expires() {
    let store = FakeApi::shared();
    let lease = Duration::from_secs(5);
    let (a, b) = (
        elector_lasting(&store, "a", lease),
        elector_lasting(&store, "b", lease),
    );
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "b must not take a live lease"
    );
    assert!(a.try_acquire_or_renew().await.unwrap(), "a renews");
    assert_eq!(holder(&store).as_deref(), Some("a"));
    // b sees the renewed record now, and counts the lease from then, on its own clock.
    assert!(!b.try_acquire_or_renew().await.unwrap());
    // a stops renewing (crashed): b takes over once the 5 s lease has run out, not before.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!b.try_acquire_or_renew().await.unwrap());
    tokio::time::sleep(Duration::from_millis(4200)).await;
    assert!(b.try_acquire_or_renew().await.unwrap());
    assert_eq!(holder(&store).as_deref(), Some("b"));
    let l: Lease = serde_json::from_value(store.lock().unwrap().objects[LEASE].clone()).unwrap();
    assert_eq!(l.spec.unwrap().lease_transitions, Some(1));
    // a comes back and finds b leading.
    assert!(!a.try_acquire_or_renew().await.unwrap());
}

#[tokio::test]
async fn racing_replicas_never_both_win() {
    for _ in 0..20 {
        let store = FakeApi::shared();
        // Spawned together, their reads interleave before their writes.
        let tries: Vec<_> = (0..4)
            .map(|i| {
                let e = elector(&store, &format!("r{i}"));
                tokio::spawn(async move { e.try_acquire_or_renew().await.unwrap() })
            })
            .collect();
        let mut won = Vec::new();
        for t in tries {
            won.push(t.await.unwrap());
        }
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    }
}

#[tokio::test]
async fn a_leader_that_finishes_releases_the_lease_for_a_standby() {
    let store = FakeApi::shared();
    let (a, b) = (elector(&store, "a"), elector(&store, "b"));
    assert!(a.acquire(std::future::pending()).await.unwrap());
    a.lead(tokio::time::sleep(Duration::from_millis(500)))
        .await
        .unwrap();
    assert_eq!(holder(&store), None, "released");
    // b acquires at once, not after the 2 s lease.
    let t = std::time::Instant::now();
    assert!(b.acquire(std::future::pending()).await.unwrap());
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_leader_that_cannot_renew_stops_before_the_lease_expires() {
    let store = FakeApi::shared();
    let a = elector_lasting(&store, "a", Duration::from_secs(3));
    assert!(a.acquire(std::future::pending()).await.unwrap());
    store.lock().unwrap().failing = true;
    let t = std::time::Instant::now();
    let r = a.lead(std::future::pending()).await;
    assert!(matches!(r, Err(LeaderError::Lost(_))), "{r:?}");
    // Stopped after the renew deadline (1.2 s) plus at most one renew period, well before the
    // 3 s lease ran out and another replica could have taken over.
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    assert!(
        t.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn a_standby_stops_waiting_when_asked() {
    let store = FakeApi::shared();
    let (a, b) = (elector(&store, "a"), elector(&store, "b"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    let acquired = b
        .acquire(tokio::time::sleep(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(!acquired);
}

/// Writes the Lease as held by `holder` since `renewed` (by the holder's clock) for `secs`
/// seconds, as a holder whose clock disagrees with ours would.
fn put_lease(store: &Mutex<FakeApi>, holder: &str, renewed: Timestamp, secs: i32) {
    let at = serde_json::to_value(MicroTime(renewed)).unwrap();
    store.lock().unwrap().put(
        LEASE,
        serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "leader", "namespace": "ops"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": secs,
                "acquireTime": at, "renewTime": at, "leaseTransitions": 0},
        }),
    );
}

fn hours_from_now(h: i64) -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second() + h * 3600).unwrap()
}

#[tokio::test]
async fn a_holder_whose_clock_is_behind_keeps_the_lease_while_it_renews() {
    let store = FakeApi::shared();
    let b = elector(&store, "b");
    // a's clock is an hour behind: by b's clock every renewTime a writes is long past.
    let renewing = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut k = 0;
            loop {
                k += 1;
                let stamp = Timestamp::from_second(hours_from_now(-1).as_second() + k).unwrap();
                put_lease(&store, "a", stamp, 2);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        assert!(
            !b.try_acquire_or_renew().await.unwrap(),
            "b took a lease a kept renewing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // a stops: b takes over once the 2 s lease has passed on its own clock.
    renewing.abort();
    let _ = renewing.await;
    let stopped = std::time::Instant::now();
    while !b.try_acquire_or_renew().await.unwrap() {
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "b never took over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        stopped.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        stopped.elapsed()
    );
    assert_eq!(holder(&store).as_deref(), Some("b"));
}

#[tokio::test]
async fn a_lease_stamped_by_a_clock_that_is_ahead_is_taken_once_its_holder_stops() {
    let store = FakeApi::shared();
    let b = elector(&store, "b");
    // a's clock is an hour ahead and a has died: its last renewTime lies in b's future.
    put_lease(&store, "a", hours_from_now(1), 2);
    assert!(
        !b.try_acquire_or_renew().await.unwrap(),
        "not at first sight"
    );
    let seen = std::time::Instant::now();
    while !b.try_acquire_or_renew().await.unwrap() {
        assert!(
            seen.elapsed() < Duration::from_secs(5),
            "b waits for a's clock instead of its own"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.elapsed() >= Duration::from_secs(2),
        "{:?}",
        seen.elapsed()
    );
    assert_eq!(holder(&store).as_deref(), Some("b"));
}

#[tokio::test]
async fn renewing_never_holds_up_the_work_it_guards() {
    let store = FakeApi::shared();
    let mut s = LeaseSettings::new("leader", "a");
    s.duration = Duration::from_secs(10);
    s.renew_deadline = Duration::from_secs(5);
    s.renew_every = Duration::from_millis(200);
    let a = Elector::new(Api::namespaced(client(&store, "ops"), "ops"), s);
    assert!(a.acquire(std::future::pending()).await.unwrap());
    // A slow API server: each renewal (a read and a write) takes about 800 ms.
    store.lock().unwrap().delay = Duration::from_millis(400);
    let longest_stall = Arc::new(Mutex::new(Duration::ZERO));
    let work = {
        let longest_stall = longest_stall.clone();
        async move {
            let start = tokio::time::Instant::now();
            let mut last = start;
            while start.elapsed() < Duration::from_millis(2500) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let now = tokio::time::Instant::now();
                let mut l = longest_stall.lock().unwrap();
                *l = (*l).max(now - last);
                last = now;
            }
        }
    };
    a.lead(work).await.unwrap();
    let stall = *longest_stall.lock().unwrap();
    assert!(
        stall < Duration::from_millis(500),
        "the work stood still for {stall:?} while the lease was renewed"
    );
    // It led throughout and released the lease at the end.
    assert_eq!(holder(&store), None);
}
