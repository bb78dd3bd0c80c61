//! A store on a block device (a loop device over a file): a zeroed device is formatted, a
//! device with someone else's data is refused, a capacity larger than the device is refused,
//! and entries survive a reopen. Needs root for `losetup`; skipped (with a message) otherwise.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nencache_store::{IoEngineKind, LogStore, ReadOutcome, StoreConfig, StoreError};

/// Detaches the loop device on drop (also when the test fails).
struct Loop(PathBuf);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn attach(image: &Path) -> Option<Loop> {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(image)
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "skipped: needs root to attach a loop device ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(Loop(PathBuf::from(
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )))
}

fn dev_cfg(dev: &Path, engine: IoEngineKind, capacity: u64) -> StoreConfig {
    StoreConfig {
        path: dev.to_path_buf(),
        capacity,
        region_size: MIB,
        io_engine: engine,
        queue_depth: 4,
        slow_io: Duration::from_secs(30),
    }
}

#[test]
fn a_store_on_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let Some(dev) = attach(&image) else { return };
    for engine in [IoEngineKind::IoUring, IoEngineKind::Pread] {
        // Larger than the device: refused, naming it.
        match LogStore::open(dev_cfg(&dev.0, engine, 16 * MIB)) {
            Err(StoreError::Config(msg)) => {
                assert!(msg.contains(&dev.0.display().to_string()), "{msg}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("a 16 MiB store on an 8 MiB device"),
        }
        let cfg = dev_cfg(&dev.0, engine, 6 * MIB);
        let (store, rec) = LogStore::open(cfg.clone()).unwrap();
        let locs: Vec<_> = (1..=40u128)
            .map(|h| put(&store, h, b"b", &value(h, 1, 200_000)).unwrap())
            .collect();
        assert!(store.stats().region_evictions > 0);
        let live: Vec<_> = (1..=40u128)
            .filter(|&h| store.locate(h).is_some())
            .collect();
        assert!(!live.is_empty());
        store.flush().unwrap();
        drop(store);
        let (store, rec2) = LogStore::open(cfg.clone()).unwrap();
        assert!(
            rec2.reset.is_none(),
            "{engine:?}: {:?} then {:?}",
            rec.reset,
            rec2.reset
        );
        for h in live {
            let (o, b, m) = get(&store, h).unwrap();
            assert_eq!(o, ReadOutcome::Hit);
            assert!(b == value(h, 1, 200_000)[..]);
            assert_eq!(m, b"b");
        }
        let _ = locs;
        drop(store);
    }
    drop(dev);

    // A device holding someone else's data is refused and left alone.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.write_all_at(b"\x7fELF not a store", 0).unwrap();
    }
    let Some(dev) = attach(&image) else { return };
    assert!(matches!(
        LogStore::open(dev_cfg(&dev.0, IoEngineKind::Pread, 6 * MIB)),
        Err(StoreError::Config(_))
    ));
    drop(dev);
    let head = std::fs::read(&image).unwrap();
    assert_eq!(&head[..16], b"\x7fELF not a store");
}
