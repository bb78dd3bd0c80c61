//! A writer process killed with SIGKILL mid-stream: reopening finds every acknowledged write
//! (or a later one of the same key), byte-identical, on every engine.
//!
//! The child is this test binary run again with `NENCACHE_STORE_CHILD` set: it writes
//! without end and prints each write once `write` has returned.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use nencache_store::{IoEngineKind, LogStore, ReadOutcome};

const CHILD: &str = "NENCACHE_STORE_CHILD";

fn engine_name(e: IoEngineKind) -> &'static str {
    match e {
        IoEngineKind::IoUring => "io_uring",
        IoEngineKind::Pread => "pread",
        _ => "mmap",
    }
}

fn engine_of(name: &str) -> IoEngineKind {
    match name {
        "io_uring" => IoEngineKind::IoUring,
        "pread" => IoEngineKind::Pread,
        _ => IoEngineKind::Mmap,
    }
}

fn len_of(version: u64) -> usize {
    (version as usize * 7919) % 20_000 + 8
}

/// The child's body: runs only in the child process.
#[test]
fn child_writer() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (engine, dir) = spec.split_once(':').unwrap();
    let cfg = cfg(Path::new(dir), engine_of(engine), 16);
    let (store, _) = LogStore::open(cfg).unwrap();
    let mut out = std::io::stdout().lock();
    for version in 1u64.. {
        let h = u128::from(version % 50);
        put(
            &store,
            h,
            &version.to_le_bytes(),
            &value(h, version, len_of(version)),
        )
        .unwrap();
        writeln!(out, "{h} {version}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
            .env(
                CHILD,
                format!("{}:{}", engine_name(engine), dir.path().display()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut acked: HashMap<u128, u64> = HashMap::new();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        while acked.values().copied().max().unwrap_or(0) < 300 {
            let Some(Ok(line)) = lines.next() else { break };
            let mut it = line.split(' ');
            let (Some(h), Some(v)) = (it.next(), it.next()) else {
                continue;
            };
            let (Ok(h), Ok(v)) = (h.parse::<u128>(), v.parse::<u64>()) else {
                continue;
            };
            acked.insert(h, v);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            acked.len() >= 50,
            "{engine:?}: the child wrote too little ({} keys)",
            acked.len()
        );

        let (store, _) = LogStore::open(cfg(dir.path(), engine, 16)).unwrap();
        for (h, v) in acked {
            let (o, b, m) =
                get(&store, h).unwrap_or_else(|| panic!("{engine:?}: acknowledged key {h} lost"));
            assert_eq!(o, ReadOutcome::Hit);
            let found = u64::from_le_bytes(m.try_into().unwrap());
            assert!(
                found >= v,
                "{engine:?}: key {h} went back from version {v} to {found}"
            );
            assert!(
                b == value(h, found, len_of(found))[..],
                "{engine:?}: key {h} bytes"
            );
        }
    }
}
