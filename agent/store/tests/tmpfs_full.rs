//! A real filesystem that fills up: an 8 MiB tmpfs under a store configured for more. The
//! store reports ENOSPC when it preallocates a region (degraded, never SIGBUS on T3), keeps
//! its entries readable, and recovers once space is freed. Needs root to mount; skipped (with
//! a message) otherwise.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nencache_store::{IoEngineKind, LogStore, ReadOutcome, StoreError};

/// Unmounts on drop (also when the test fails).
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_small_tmpfs(dir: &Path) -> Option<Mount> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(dir)
        .output()
        .ok()?;
    if out.status.success() {
        Some(Mount(dir.to_path_buf()))
    } else {
        eprintln!(
            "skipped: needs root to mount a small tmpfs ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        None
    }
}

fn fill_then_recover(engine: IoEngineKind) {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_small_tmpfs(dir.path()) else {
        return;
    };
    // 3 MiB that someone else uses.
    let filler = dir.path().join("filler");
    std::fs::write(&filler, vec![7u8; 3 << 20]).unwrap();
    let cfg = cfg(dir.path(), engine, 16);
    let (store, _) = LogStore::open(cfg.clone()).unwrap();
    let mut written = Vec::new();
    let mut failure = None;
    for h in 0..64u128 {
        match put(&store, h, b"", &value(h, 1, 256 * 1024)) {
            Ok(loc) => written.push((h, loc)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    match failure {
        Some(StoreError::Io { source, .. }) => {
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{engine:?}")
        }
        other => panic!("{engine:?}: expected ENOSPC, got {other:?}"),
    }
    assert!(written.len() >= 4, "{engine:?}: wrote {}", written.len());
    let why = store.degraded().expect("degraded on a full filesystem");
    assert!(why.contains("space"), "{why}");
    assert!(matches!(
        put(&store, 99, b"", &value(99, 1, 10)),
        Err(StoreError::Degraded(_))
    ));
    for (h, loc) in &written {
        let (o, b, _) = read_at(&store, *h, *loc);
        assert_eq!(
            o,
            ReadOutcome::Hit,
            "{engine:?}: entries written before the filesystem filled stay readable"
        );
        assert!(b == value(*h, 1, 256 * 1024)[..]);
    }
    // Space comes back.
    std::fs::remove_file(&filler).unwrap();
    store.set_retry_interval(Duration::ZERO);
    for h in 100..108u128 {
        put(&store, h, b"", &value(h, 1, 256 * 1024)).unwrap();
    }
    assert!(store.degraded().is_none(), "{engine:?}");
    assert_eq!(get(&store, 107).unwrap().0, ReadOutcome::Hit);
    drop(store);
}

#[test]
fn a_full_small_tmpfs_degrades_and_recovers_t2() {
    fill_then_recover(IoEngineKind::IoUring);
    fill_then_recover(IoEngineKind::Pread);
}

#[test]
fn a_full_small_tmpfs_degrades_and_recovers_t3() {
    fill_then_recover(IoEngineKind::Mmap);
}
