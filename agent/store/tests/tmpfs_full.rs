//! Real filesystems that fill up: small tmpfs mounts under stores configured for more.
//!
//! - Another user fills the filesystem before the store has two regions: the store reports
//!   ENOSPC when it preallocates a region (degraded, never SIGBUS on T3), keeps its entries
//!   readable, and recovers once space is freed.
//! - The filesystem is smaller than the store's capacity: once no further region fits, the
//!   store goes on with the regions it has (evicting the oldest), never degraded, and a
//!   reopen recovers it.
//!
//! Needs root to mount; skipped (with a message) otherwise.

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

fn mount_small_tmpfs(dir: &Path, size: &str) -> Option<Mount> {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
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
    let Some(_mount) = mount_small_tmpfs(dir.path(), "8m") else {
        return;
    };
    // 6.5 of the 8 MiB are someone else's: one region of 1 MiB fits, not two.
    let filler = dir.path().join("filler");
    std::fs::write(&filler, vec![7u8; 13 << 19]).unwrap();
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
    assert_eq!(written.len(), 3, "{engine:?}: one region's worth");
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
    assert_eq!(store.stats().capacity_bytes, 16 * MIB, "{engine:?}");
    assert_eq!(get(&store, 107).unwrap().0, ReadOutcome::Hit);
    for (h, loc) in &written {
        assert_eq!(read_at(&store, *h, *loc).0, ReadOutcome::Hit, "{engine:?}");
    }
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

/// Every indexed entry reads back byte-identical; returns how many there are.
fn all_read_back(store: &LogStore, len: usize, what: &str) -> usize {
    let items = store.indexed();
    for chunk in items.chunks(32) {
        for ((h, _), (o, b, _)) in chunk.iter().zip(read_many(store, chunk)) {
            assert_eq!(o, ReadOutcome::Hit, "{what}: {h}");
            assert!(b == value(*h, 1, len)[..], "{what}: {h}");
        }
    }
    items.len()
}

fn smaller_than_configured(engine: IoEngineKind) {
    const LEN: usize = 256 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_small_tmpfs(dir.path(), "80m") else {
        return;
    };
    // 256 MiB configured on an 80 MiB filesystem.
    let cfg = cfg(dir.path(), engine, 256);
    let (store, _) = LogStore::open(cfg.clone()).unwrap();
    // About 250 MiB: three times what fits.
    let total = 1000u128;
    for h in 0..total {
        put(&store, h, b"", &value(h, 1, LEN))
            .unwrap_or_else(|e| panic!("{engine:?}: write {h}: {e}"));
    }
    assert!(
        store.degraded().is_none(),
        "{engine:?}: {:?}",
        store.degraded()
    );
    let st = store.stats();
    assert!(
        st.capacity_bytes < 80 * MIB && st.capacity_bytes >= 60 * MIB,
        "{engine:?}: capped to what fits: {st:?}"
    );
    assert!(st.region_evictions > 0, "{engine:?}: {st:?}");
    assert_eq!(st.io_errors, 0, "{engine:?}");
    let n = all_read_back(&store, LEN, &format!("{engine:?}"));
    // Three entries a region, in every region but the one being refilled.
    assert!(
        n as u64 >= 3 * (st.capacity_bytes / MIB - 1),
        "{engine:?}: {n} entries in {st:?}"
    );
    for h in total - 10..total {
        assert_eq!(
            get(&store, h).unwrap().0,
            ReadOutcome::Hit,
            "{engine:?}: {h}"
        );
    }
    store.flush().unwrap();
    // More after the flush, recovered by a scan.
    for h in total..total + 20 {
        put(&store, h, b"", &value(h, 1, LEN)).unwrap();
    }
    let indexed = store.indexed().len();
    drop(store);

    let (store, rec) = LogStore::open(cfg.clone()).unwrap();
    assert!(rec.reset.is_none(), "{engine:?}: {:?}", rec.reset);
    assert_eq!(rec.entries as usize, indexed, "{engine:?}");
    assert_eq!(all_read_back(&store, LEN, "reopened"), indexed);
    // It caps itself again and goes on.
    for h in total + 20..total + 400 {
        put(&store, h, b"", &value(h, 1, LEN))
            .unwrap_or_else(|e| panic!("{engine:?}: reopened, write {h}: {e}"));
    }
    assert!(store.degraded().is_none(), "{engine:?}");
    assert!(store.stats().capacity_bytes < 80 * MIB, "{engine:?}");
    all_read_back(&store, LEN, "reopened and written");
}

#[test]
fn a_t2_store_larger_than_its_filesystem_reuses_its_regions() {
    smaller_than_configured(IoEngineKind::IoUring);
    smaller_than_configured(IoEngineKind::Pread);
}

#[test]
fn a_t3_store_larger_than_its_filesystem_reuses_its_regions() {
    smaller_than_configured(IoEngineKind::Mmap);
}
