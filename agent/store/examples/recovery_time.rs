//! Measures how long opening a store takes after it was filled: after a crash (the
//! periodic checkpoint plus a scan of what came after it), after a clean close (the
//! checkpoint alone), and with no checkpoint (a full scan).
//!
//! ```text
//! cargo run --release -p nencache-store --example recovery_time -- \
//!     <dir> <GiB> <value KiB> <io_uring|pread|mmap> [region MiB] [--drop-caches]
//! ```
//!
//! `--drop-caches` (root) empties the page cache before each open, which matters for the
//! mmap engine (T2 uses O_DIRECT and bypasses it).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nencache_store::{AlignedBuf, IoEngineKind, LogStore, Recovery, StoreConfig, WriteReq};

fn drop_caches(enabled: bool) {
    if enabled {
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
            eprintln!("cannot drop caches: {e}");
        }
    }
}

fn report(what: &str, rec: &Recovery, gib: f64) {
    println!(
        "{what:<34} entries {:>8}  scanned {:>10} B  checkpoint {:<5}  {:>9.1} ms  = {:>8.1} ms per GiB stored",
        rec.entries,
        rec.scanned_bytes,
        rec.from_checkpoint,
        rec.elapsed.as_secs_f64() * 1e3,
        rec.elapsed.as_secs_f64() * 1e3 / gib,
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        return Err(
            "usage: recovery_time <dir> <GiB> <value KiB> <io_uring|pread|mmap> [region MiB] [--drop-caches]"
                .into(),
        );
    }
    let dir = PathBuf::from(&args[1]);
    let gib: u64 = args[2].parse()?;
    let value_kib: usize = args[3].parse()?;
    let engine = match args[4].as_str() {
        "io_uring" => IoEngineKind::IoUring,
        "pread" => IoEngineKind::Pread,
        "mmap" => IoEngineKind::Mmap,
        other => return Err(format!("unknown engine {other}").into()),
    };
    let region_mib: u64 = args
        .get(5)
        .filter(|a| !a.starts_with("--"))
        .map_or(Ok(4), |a| a.parse())?;
    let drop_cache = args.iter().any(|a| a == "--drop-caches");
    std::fs::create_dir_all(&dir)?;
    let path = if engine == IoEngineKind::Mmap {
        dir.join("t3")
    } else {
        dir.join("t2.store")
    };
    let cfg = StoreConfig {
        path: path.clone(),
        capacity: gib << 30,
        region_size: region_mib << 20,
        io_engine: engine,
        queue_depth: 32,
        slow_io: Duration::from_secs(60),
    };
    let (store, _) = LogStore::open(cfg.clone())?;
    let len = value_kib * 1024;
    let bufs: Vec<AlignedBuf> = (0..16u8)
        .map(|i| AlignedBuf::from_slice(&vec![i; len]))
        .collect();
    let keys: Vec<Vec<u8>> = (0..16).map(|i| format!("key-{i}").into_bytes()).collect();
    // Fill the store once (plus a little, so some regions were evicted and reused).
    let entries = (gib << 30) / (len as u64 + 4096) * 105 / 100;
    let t = Instant::now();
    let mut n = 0u64;
    while n < entries {
        let reqs: Vec<WriteReq<'_>> = (0..16usize)
            .map(|i| WriteReq {
                hash: u128::from(n + i as u64) * 0x9E37_79B9_7F4A_7C15,
                key: &keys[i],
                metadata: b"m",
                value: bufs[i].as_ptr(),
                value_len: len as u64,
                expires_unix_ms: u64::MAX,
            })
            .collect();
        // SAFETY: every value is an AlignedBuf that outlives the call.
        for r in unsafe { store.write(&reqs) } {
            r?;
        }
        n += 16;
    }
    let fill = t.elapsed();
    let st = store.stats();
    println!(
        "engine {} | {gib} GiB store, {region_mib} MiB regions, {value_kib} KiB values | filled in {:.1} s ({:.2} GB/s) | {} live entries, {} regions evicted",
        store.io_engine(),
        fill.as_secs_f64(),
        st.write_bytes as f64 / fill.as_secs_f64() / 1e9,
        st.entries,
        st.region_evictions,
    );
    let g = gib as f64;
    drop(store); // a crash: no flush
    drop_caches(drop_cache);
    let (store, rec) = LogStore::open(cfg.clone())?;
    report("after a crash (checkpoint + scan)", &rec, g);
    store.flush()?;
    drop(store);
    drop_caches(drop_cache);
    let (store, rec) = LogStore::open(cfg.clone())?;
    report("after a clean close (checkpoint)", &rec, g);
    drop(store);
    let ckpt = if engine == IoEngineKind::Mmap {
        path.join("index.ckpt")
    } else {
        PathBuf::from(format!("{}.ckpt", path.display()))
    };
    std::fs::remove_file(&ckpt)?;
    drop_caches(drop_cache);
    let (_store, rec) = LogStore::open(cfg)?;
    report("without a checkpoint (full scan)", &rec, g);
    Ok(())
}
