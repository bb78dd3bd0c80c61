//! The real agent with a lower tier on real files: a graceful stop keeps the host tier, a
//! `kill -9` at any point of a write-heavy load leaves every key absent or byte-identical,
//! and a filesystem that fills up degrades the tier while the agent keeps serving.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use nencache_api::v1;
use nencache_client::Client;

mod common;

use common::*;

/// Flags for an agent with a small host tier over an NVMe-style tier in `dir`.
fn tier_flags(dir: &std::path::Path, io_engine: &str, host: &str) -> Vec<String> {
    [
        "--host-capacity",
        host,
        "--staging-size",
        "4MiB",
        "--max-value",
        "256KiB",
        "--nvme-path",
        dir.join("t2/cache.t2").to_str().unwrap(),
        "--nvme-size",
        "128MiB",
        "--io-engine",
        io_engine,
        "--shutdown-grace",
        "20s",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

fn start(dir: &tempfile::TempDir, io_engine: &str, host: &str) -> TestAgent {
    let flags = tier_flags(dir.path(), io_engine, host);
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let run = tempfile::tempdir().unwrap();
    let socket = run.path().join("run/agent.sock");
    TestAgent::start_at(run, socket, &refs)
}

/// The value stored under key number `i`: its bytes follow from the key alone.
fn value_of(i: u64) -> Vec<u8> {
    let len = [4096, 70_000, 131_072, 200_001, 9][(i % 5) as usize];
    pattern(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), len)
}

fn key_of(i: u64) -> Vec<u8> {
    format!("crash-{i:08}").into_bytes()
}

fn metric(agent: &TestAgent, name: &str, tier: &str) -> u64 {
    let needle = format!("nencache_agent_{name}{{tier=\"{tier}\"}} ");
    agent
        .http("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&needle)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {needle} in metrics"))
}

/// Gets `keys` and checks each is absent or byte-identical; returns how many were present.
async fn check(client: &Client, keys: &[u64]) -> usize {
    let mut present = 0;
    for batch in keys.chunks(32) {
        let ks: Vec<Vec<u8>> = batch.iter().map(|&i| key_of(i)).collect();
        let refs: Vec<&[u8]> = ks.iter().map(Vec::as_slice).collect();
        let got = client.get(&refs).await.unwrap();
        for (&i, v) in batch.iter().zip(got) {
            if let Some(v) = v {
                assert!(
                    v.as_slice() == value_of(i).as_slice(),
                    "key {i}: wrong bytes after a restart"
                );
                present += 1;
            }
        }
    }
    present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_keeps_the_host_tier() {
    for io in ["io_uring", "pread"] {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = start(&dir, io, "64MiB");
        let client = agent.client().await;
        let keys: Vec<u64> = (0..60).collect();
        for &i in &keys {
            client.put(&key_of(i), &value_of(i), b"meta").await.unwrap();
        }
        assert_eq!(
            metric(&agent, "demotions_total", "nvme"),
            0,
            "all in host memory"
        );
        drop(client);
        let status = agent.terminate();
        assert!(status.success(), "{status}");
        assert!(
            agent
                .log()
                .contains("host entries written to the lower tiers"),
            "{}",
            agent.log()
        );
        agent.kill_and_restart();
        let client = agent.client().await;
        let refs: Vec<Vec<u8>> = keys.iter().map(|&i| key_of(i)).collect();
        let refs: Vec<&[u8]> = refs.iter().map(Vec::as_slice).collect();
        let (n, tiers) = client.lookup(&refs).await.unwrap();
        assert_eq!(n, keys.len(), "{io}: every key survived");
        assert!(tiers.iter().all(|&t| t == v1::Tier::Nvme), "{tiers:?}");
        assert_eq!(check(&client, &keys).await, keys.len(), "{io}");
        assert!(metric(&agent, "hits_total", "nvme") >= keys.len() as u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_lets_go_does_not_cost_the_host_tier() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let flags: Vec<String> = tier_flags(dir.path(), "io_uring", "64MiB")
        .into_iter()
        .map(|f| if f == "20s" { "3s".to_string() } else { f })
        .collect();
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let run = tempfile::tempdir().unwrap();
    let socket = run.path().join("run/agent.sock");
    let mut agent = TestAgent::start_at(run, socket.clone(), &refs);
    let client = agent.client().await;
    let keys: Vec<u64> = (0..40).collect();
    for &i in &keys {
        client.put(&key_of(i), &value_of(i), b"").await.unwrap();
    }
    drop(client);
    // An HTTP/2 connection that opens and then never reads: the drain waits for it until
    // the grace period is over.
    let mut stuck = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stuck
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    stuck.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let status = agent.terminate();
    assert!(status.success(), "{status}");
    drop(stuck);
    agent.kill_and_restart();
    let client = agent.client().await;
    assert_eq!(check(&client, &keys).await, keys.len(), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agents_serve_every_entry_written_or_nothing() {
    let mut rng = nencache_engine::traces::Rng::new(7);
    let mut recovered = 0;
    let mut next = 0u64;
    for (io, rounds) in [("io_uring", 25), ("pread", 25)] {
        let dir = tempfile::tempdir().unwrap();
        // A host tier of 8 MiB under a load of about 20 MiB a round: demotion runs
        // throughout, so kills land in the middle of device writes.
        let mut agent = start(&dir, io, "8MiB");
        let mut written: Vec<u64> = Vec::new();
        for _ in 0..rounds {
            let attempted = Arc::new(Mutex::new(Vec::new()));
            let client = agent.client().await;
            let load = {
                let attempted = attempted.clone();
                let first = next;
                tokio::spawn(async move {
                    for i in first.. {
                        attempted.lock().unwrap().push(i);
                        if client.put(&key_of(i), &value_of(i), b"").await.is_err() {
                            break;
                        }
                    }
                })
            };
            let ms = 30 + rng.next_u64() % 250;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            agent.kill_and_restart();
            load.abort();
            let _ = load.await;
            let attempted = attempted.lock().unwrap().clone();
            next = attempted.last().map_or(next, |&l| l + 1);
            written.extend(&attempted);
            // Every key of this round, and a sample of older ones.
            let mut keys = attempted.clone();
            for _ in 0..64 {
                if !written.is_empty() {
                    keys.push(written[(rng.next_u64() % written.len() as u64) as usize]);
                }
            }
            let client = agent.client().await;
            let present = check(&client, &keys).await;
            recovered += present;
            // A torn entry (killed between its header and its value reaching the device)
            // may be found and counted as corrupt: `check` saw that it was never served.
        }
    }
    assert!(
        recovered > 0,
        "some values written before the kills came back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_degrades_the_tier_and_the_agent_keeps_serving() {
    let mnt = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: needs root to mount a small tmpfs");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let flags = [
        "--host-capacity",
        "8MiB",
        "--staging-size",
        "4MiB",
        "--max-value",
        "256KiB",
        "--nvme-path",
        &format!("{}/cache.t2", mnt.path().display()),
        "--nvme-size",
        "64MiB",
    ];
    let run = tempfile::tempdir().unwrap();
    let socket = run.path().join("run/agent.sock");
    let agent = TestAgent::start_at(run, socket, &flags);
    let client = agent.client().await;
    // 40 MiB through an 8 MiB host tier onto a 12 MiB filesystem.
    let mut last = HashMap::new();
    for i in 0..200u64 {
        client
            .put(&key_of(i), &value_of(i % 5 + 2), b"")
            .await
            .unwrap();
        last.insert(i, ());
    }
    eventually("the tier is marked degraded", async || {
        metric(&agent, "tier_degraded", "nvme") == 1
    })
    .await;
    let ready = agent.http("/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("tier nvme: degraded"), "{ready}");
    assert!(agent.log().contains("degraded"), "a log line says why");
    // Still serving from host memory: a fresh put reads back.
    client.put(b"after-full", b"still here", b"").await.unwrap();
    let got = client.get(&[b"after-full".as_slice()]).await.unwrap();
    assert_eq!(got[0].as_ref().unwrap().as_slice(), b"still here");
    // Whatever the tier kept reads back intact.
    let keys: Vec<u64> = last.keys().copied().collect();
    let ks: Vec<Vec<u8>> = keys.iter().map(|&i| key_of(i)).collect();
    for (batch, kb) in keys.chunks(32).zip(ks.chunks(32)) {
        let refs: Vec<&[u8]> = kb.iter().map(Vec::as_slice).collect();
        for (&i, v) in batch.iter().zip(client.get(&refs).await.unwrap()) {
            if let Some(v) = v {
                assert!(v.as_slice() == value_of(i % 5 + 2).as_slice(), "key {i}");
            }
        }
    }
}
