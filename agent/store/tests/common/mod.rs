//! Helpers shared by the store's integration tests.
#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nencache_store::{
    AlignedBuf, IoEngineKind, Location, LogStore, ReadOutcome, ReadReq, StoreConfig, StoreError,
    WriteReq,
};

/// Every engine an I/O test runs on.
pub const ENGINES: [IoEngineKind; 3] = [
    IoEngineKind::IoUring,
    IoEngineKind::Pread,
    IoEngineKind::Mmap,
];

/// 1 MiB.
pub const MIB: u64 = 1 << 20;

/// A store of `regions` regions of 1 MiB under `dir` (a file for T2, a directory for T3).
pub fn cfg(dir: &Path, engine: IoEngineKind, regions: u64) -> StoreConfig {
    StoreConfig {
        path: store_path(dir, engine),
        capacity: regions * MIB,
        region_size: MIB,
        io_engine: engine,
        queue_depth: 8,
        slow_io: Duration::from_secs(30),
    }
}

/// Where [`cfg`] puts the store.
pub fn store_path(dir: &Path, engine: IoEngineKind) -> PathBuf {
    if engine == IoEngineKind::Mmap {
        dir.join("t3")
    } else {
        dir.join("t2.store")
    }
}

/// The checkpoint file of a store.
pub fn ckpt_path(cfg: &StoreConfig) -> PathBuf {
    if cfg.io_engine == IoEngineKind::Mmap {
        cfg.path.join("index.ckpt")
    } else {
        let mut s = cfg.path.as_os_str().to_os_string();
        s.push(".ckpt");
        PathBuf::from(s)
    }
}

/// The file and position holding device offset `offset` (see the format docs).
pub fn file_pos(cfg: &StoreConfig, offset: u64) -> (PathBuf, u64) {
    if cfg.io_engine == IoEngineKind::Mmap {
        let rel = offset - 4096;
        let r = rel / cfg.region_size;
        (
            cfg.path.join(format!("seg-{r:06}.dat")),
            rel % cfg.region_size,
        )
    } else {
        (cfg.path.clone(), offset)
    }
}

/// Overwrites bytes of the store's files at device offset `offset`.
pub fn patch(cfg: &StoreConfig, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let (path, pos) = file_pos(cfg, offset);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, pos).unwrap();
    f.sync_all().unwrap();
}

/// Reads bytes of the store's files at device offset `offset`.
pub fn peek(cfg: &StoreConfig, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let (path, pos) = file_pos(cfg, offset);
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, pos).unwrap();
    b
}

/// A deterministic value for (hash, version): the version in its first 8 bytes (when it
/// has room), then bytes derived from both.
pub fn value(hash: u128, version: u64, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    let mut x = (hash as u64)
        ^ ((hash >> 64) as u64).rotate_left(17)
        ^ version.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        | 1;
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = if i == 0 { version } else { x };
        let bytes = w.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    b
}

/// The key of a hash.
pub fn key(hash: u128) -> Vec<u8> {
    format!("key-{hash:x}").into_bytes()
}

/// Writes one entry.
pub fn put(
    store: &LogStore,
    hash: u128,
    meta: &[u8],
    v: &AlignedBuf,
) -> Result<Location, StoreError> {
    put_exp(store, hash, meta, v, u64::MAX)
}

/// Writes one entry with an expiry.
pub fn put_exp(
    store: &LogStore,
    hash: u128,
    meta: &[u8],
    v: &AlignedBuf,
    expires_unix_ms: u64,
) -> Result<Location, StoreError> {
    let k = key(hash);
    let req = WriteReq {
        hash,
        key: &k,
        metadata: meta,
        value: v.as_ptr(),
        value_len: v.len() as u64,
        expires_unix_ms,
    };
    // SAFETY: `v` is an AlignedBuf (aligned, padded) that outlives the call.
    let mut r = unsafe { store.write(&[req]) };
    r.pop().unwrap()
}

/// Reads an entry at a known location.
pub fn read_at(store: &LogStore, hash: u128, loc: Location) -> (ReadOutcome, Vec<u8>, Vec<u8>) {
    let k = key(hash);
    let mut dst = AlignedBuf::zeroed(loc.value_len as usize);
    let mut reqs = [ReadReq {
        hash,
        key: &k,
        loc,
        dst: dst.as_mut_ptr(),
        metadata: Vec::new(),
        outcome: ReadOutcome::Pending,
    }];
    // SAFETY: `dst` is aligned and padded to 4096 and outlives the call.
    unsafe { store.read(&mut reqs) };
    let [r] = reqs;
    (r.outcome, dst.to_vec(), r.metadata)
}

/// Locates and reads an entry.
pub fn get(store: &LogStore, hash: u128) -> Option<(ReadOutcome, Vec<u8>, Vec<u8>)> {
    let loc = store.locate(hash)?;
    Some(read_at(store, hash, loc))
}

/// Reads many located entries in one batch.
pub fn read_many(
    store: &LogStore,
    items: &[(u128, Location)],
) -> Vec<(ReadOutcome, Vec<u8>, Vec<u8>)> {
    let keys: Vec<Vec<u8>> = items.iter().map(|(h, _)| key(*h)).collect();
    let mut bufs: Vec<AlignedBuf> = items
        .iter()
        .map(|(_, l)| AlignedBuf::zeroed(l.value_len as usize))
        .collect();
    let mut reqs: Vec<ReadReq<'_>> = items
        .iter()
        .zip(&keys)
        .zip(bufs.iter_mut())
        .map(|((&(hash, loc), k), b)| ReadReq {
            hash,
            key: k,
            loc,
            dst: b.as_mut_ptr(),
            metadata: Vec::new(),
            outcome: ReadOutcome::Pending,
        })
        .collect();
    // SAFETY: every dst is an AlignedBuf of the value's length that outlives the call.
    unsafe { store.read(&mut reqs) };
    let outs: Vec<(ReadOutcome, Vec<u8>)> =
        reqs.into_iter().map(|r| (r.outcome, r.metadata)).collect();
    outs.into_iter()
        .zip(bufs)
        .map(|((o, m), b)| (o, b.to_vec(), m))
        .collect()
}
