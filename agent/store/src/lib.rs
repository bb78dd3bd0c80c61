//! NenCache's lower tiers: a log-structured store of self-describing entries on a file or
//! block device (T2, O_DIRECT through io_uring or pread) or in memory-mapped segment files
//! (T3). The engine (`nencache-engine`) drives it: it demotes entries into it from host
//! memory and reads hits straight back into the shared arena.
//!
//! CONTRACT (kept stable for the engine; the implementation fills it in):
//! - [`LogStore::open`] creates or recovers a store (checkpoint plus scan), refusing an
//!   on-disk format it does not know with [`StoreError::UnknownFormat`] naming the path and
//!   both versions, a store of the other kind (T2 for T3 or the reverse) with
//!   [`StoreError::WrongKind`] naming the path and both kinds (either file left as it is),
//!   and a store another process holds with [`StoreError::Locked`].
//! - [`LogStore::locate`] answers from the in-memory index, no I/O.
//! - [`LogStore::read`] and [`LogStore::write`] do blocking, batched I/O on the caller's
//!   thread (never under a lock the engine holds).
//! - A torn or corrupt entry is reported as [`ReadOutcome::Corrupt`] and counted; it is never
//!   returned as a hit.
//!
//! Additions beyond the contract: [`LogStore::indexed`] (what the index holds, e.g. to seed
//! an upper tier's index after a restart), [`LogStore::set_retry_interval`] (how often a
//! degraded store probes with a write), [`AlignedBuf`] (4096-aligned memory for values), and,
//! with the `testing` feature, [`testing`] and `LogStore::open_with_faults`.
//!
//! # How it works
//!
//! - Space is split into regions (`region_size`, a power of two of at least 1 MiB). Entries
//!   are appended to one active region; a full region is sealed; when no region is free the
//!   oldest sealed one is evicted whole (FIFO). Entries of the evicted region that were read
//!   at least once since written are rewritten first (at most half a region per eviction);
//!   the rest leave the index.
//! - Values go from the caller's aligned memory to the device and back without a bounce
//!   buffer (a two-element iovec: header block, value).
//! - A read verifies magic, version, flags, header checksum, key, seq and value checksum. A
//!   failed check is `Corrupt` (counted, dropped from the index) if the index still holds
//!   that entry, else `Miss` (the entry was evicted or replaced while the read ran: the
//!   index drops a region's entries before the region is overwritten).
//! - `remove` drops the entry from the index at once and queues a tombstone, appended by the
//!   next write or flush; a remove racing a write of the same key wins.
//! - Recovery: a checkpoint (written by `flush` and after every few sealed regions) plus a
//!   scan of what came after it; see `recovery`. An invalid checkpoint is ignored.
//! - Degraded state: ENOSPC, EIO, a deleted or truncated file, or an I/O slower than
//!   `slow_io` degrade the store ([`LogStore::degraded`], one `tracing` warning per cause).
//!   Writes are then refused except one probe call per retry interval (10 s by default),
//!   whose success ends the degraded state; a slow spell also ends with the next normal
//!   I/O. Reads go on where they can. The files are checked (deleted: the path's inode
//!   differs from the descriptor's; truncated: shorter than the store) at most once a
//!   second, at each flush, and after a short read.
//! - A device smaller than configured: ENOSPC while preallocating a free region, when at
//!   least two regions are sealed and the oldest can be allocated again, caps the store to
//!   the regions it has (one warning naming how many fit; `capacity_bytes` shrinks to them)
//!   and it goes on evicting and reusing those, not degraded. The cap holds until the store
//!   is reopened (space that comes back meanwhile is not taken up); a reopen tries the
//!   configured size again. ENOSPC with fewer sealed regions degrades as above.
//!
//! # Durability
//!
//! Writes are durable after [`LogStore::flush`] (which also writes pending tombstones and a
//! checkpoint). Dropping a store does not flush: it is what a crash looks like, and the next
//! open recovers from the last checkpoint and a scan. Entries whose `write` returned survive
//! the death of the process (T2 writes are O_DIRECT; T3 writes are in the page cache);
//! removes made since the last write or flush do not (their tombstones were only queued).
//!
//! # Limits
//!
//! - T3 reads copy out of a shared mapping after checking the segment's length with
//!   `fstat`; a segment truncated by another process between that check and the end of the
//!   copy still raises SIGBUS (the store holds an exclusive lock, so this takes a process
//!   that ignores it). T3 writes use `pwritev` and cannot fault.
//! - A filesystem that refuses O_DIRECT is used with buffered I/O (a warning is logged).
//! - Keys are at most 65535 bytes; an entry (header block plus padded value) must fit a
//!   region ([`StoreError::TooLarge`]).
//! - After a crash the next seq skips as many numbers as entries fit in the store, so that
//!   entries of a torn last batch can never be mistaken for newer ones.
//!
//! # Modules
//!
//! - `format`: on-disk layouts; `region`: the region allocator (FIFO eviction); `index`:
//!   hash to location; `device`: the I/O engines (`uring`, `pread`, `mmap`) behind one
//!   batched trait; `recovery`: checkpoint plus scan; `open`: files, lock, superblock;
//!   `store`: the write and read paths, eviction, tombstones, checkpoints, degradation.
//!
#![doc = include_str!("../FORMAT.md")]

use std::path::PathBuf;

mod buf;
mod device;
mod format;
mod index;
mod open;
mod recovery;
mod region;
mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use buf::{ALIGN, AlignedBuf};

/// Which I/O engine a store uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngineKind {
    /// io_uring if the kernel allows it, else pread/pwrite (decided once at open, logged).
    #[default]
    Auto,
    /// io_uring with batched submissions.
    IoUring,
    /// pread/pwrite on a small thread pool.
    Pread,
    /// Memory-mapped segment files (T3): `path` is a directory.
    Mmap,
}

/// How a store is laid out and driven.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// T2: a file (created if missing) or a block device. T3 (`Mmap`): a directory.
    pub path: PathBuf,
    /// Bytes the store may use; rounded down to whole regions (at least two).
    pub capacity: u64,
    /// Region size: the unit of allocation and eviction; a power of two of at least 1 MiB.
    pub region_size: u64,
    /// I/O engine.
    pub io_engine: IoEngineKind,
    /// Most I/Os in flight per batch (io_uring ring size; pread pool width).
    pub queue_depth: u32,
    /// An I/O slower than this marks the store degraded until a normal one completes.
    pub slow_io: std::time::Duration,
}

/// Where an entry lives in the store; returned by [`LogStore::locate`], passed back to
/// [`LogStore::read`]. Plain data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Value length in bytes.
    pub value_len: u64,
    /// Key length in bytes.
    pub key_len: u32,
    /// Metadata length in bytes.
    pub meta_len: u32,
    /// Write sequence number (unique per entry written; later writes have larger ones).
    pub seq: u64,
    /// Unix time in milliseconds from which the entry is expired (`u64::MAX`: never).
    pub expires_unix_ms: u64,
    /// Byte offset of the entry's header on the device (opaque to callers).
    pub offset: u64,
}

/// One entry to append.
#[derive(Debug, Clone, Copy)]
pub struct WriteReq<'a> {
    /// 128-bit hash of the key (the engine's index hash).
    pub hash: u128,
    /// The key.
    pub key: &'a [u8],
    /// Opaque metadata.
    pub metadata: &'a [u8],
    /// The value's first byte: 4096-aligned, readable for `value_len` rounded up to 4096.
    pub value: *const u8,
    /// Value length.
    pub value_len: u64,
    /// Unix time in milliseconds from which the entry is expired (`u64::MAX`: never).
    pub expires_unix_ms: u64,
}

/// One entry to read back.
#[derive(Debug)]
pub struct ReadReq<'a> {
    /// Hash of the key.
    pub hash: u128,
    /// The key (compared with the stored one).
    pub key: &'a [u8],
    /// Where [`LogStore::locate`] said it is.
    pub loc: Location,
    /// Destination: 4096-aligned, writable for `loc.value_len` rounded up to 4096.
    pub dst: *mut u8,
    /// Out: the stored metadata, on a hit.
    pub metadata: Vec<u8>,
    /// Out: what happened.
    pub outcome: ReadOutcome,
}

/// The result of one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadOutcome {
    /// Not attempted yet.
    #[default]
    Pending,
    /// The value is in `dst`, checksum verified.
    Hit,
    /// The entry is gone (overwritten, evicted, or its region reused meanwhile).
    Miss,
    /// The entry failed its checks (torn or corrupt); dropped from the index and counted.
    Corrupt,
    /// The device failed the read; counted.
    IoError,
}

/// Counters and gauges of one store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Usable capacity in bytes (whole regions; fewer than configured once the device was
    /// found smaller).
    pub capacity_bytes: u64,
    /// Bytes of live entries (headers and padding included).
    pub used_bytes: u64,
    /// Live entries in the index.
    pub entries: u64,
    /// Reads that returned a verified value.
    pub hits: u64,
    /// Reads of entries that were gone.
    pub misses: u64,
    /// Entries written.
    pub writes: u64,
    /// Value bytes written.
    pub write_bytes: u64,
    /// Value bytes read back.
    pub read_bytes: u64,
    /// Entries dropped with their region.
    pub evictions: u64,
    /// Hot entries rewritten when their region was evicted.
    pub reinserted: u64,
    /// Regions evicted.
    pub region_evictions: u64,
    /// Entries found torn or corrupt (at read or recovery).
    pub corrupt: u64,
    /// Failed I/O operations.
    pub io_errors: u64,
    /// Writes refused (degraded, or an entry larger than a region).
    pub write_refusals: u64,
}

/// What [`LogStore::open`] found.
#[derive(Debug, Clone, Default)]
pub struct Recovery {
    /// Entries recovered into the index.
    pub entries: u64,
    /// Bytes of regions scanned.
    pub scanned_bytes: u64,
    /// Whether a checkpoint was used.
    pub from_checkpoint: bool,
    /// Entries skipped as torn, corrupt or expired.
    pub skipped: u64,
    /// Wall time of the recovery.
    pub elapsed: std::time::Duration,
    /// Why the store was started empty, if it was (a changed layout, say).
    pub reset: Option<String>,
}

/// A store error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The on-disk format is one this build does not read.
    #[error(
        "{path}: on-disk format version {found} is not one this agent reads (it reads version \
         {supported}); move the file aside or point the tier elsewhere"
    )]
    UnknownFormat {
        /// The file or directory.
        path: PathBuf,
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The superblock is of another kind of store (T2 where T3 is configured, or the
    /// reverse); the file is left as it is.
    #[error(
        "{path} holds a store of kind {found} ({}) but kind {configured} ({}) is configured; \
         refusing to use it (the store never overwrites a store of another kind): configure \
         the matching tier or point this one elsewhere",
        kind_name(*.found),
        kind_name(*.configured)
    )]
    WrongKind {
        /// The file holding the superblock (T3: `store.meta`).
        path: PathBuf,
        /// The kind found (1: T2 file or block device, 2: T3 directory).
        found: u32,
        /// The kind configured.
        configured: u32,
    },
    /// Another process holds the store.
    #[error("{path} is in use by another process (is a second agent running?)")]
    Locked {
        /// The file or directory.
        path: PathBuf,
    },
    /// An invalid configuration.
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The store is degraded and refuses writes.
    #[error("store degraded: {0}")]
    Degraded(String),
    /// The entry cannot be stored (larger than a region).
    #[error("entry of {len} bytes does not fit a region of {region} bytes")]
    TooLarge {
        /// Bytes the entry needs.
        len: u64,
        /// Region size.
        region: u64,
    },
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// How [`StoreError::WrongKind`] names a superblock kind.
fn kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "T2: a file or block device",
        2 => "T3: a directory of segment files",
        _ => "unknown",
    }
}

/// The log-structured store. `Send + Sync`: reads run concurrently; writes are serialized.
pub struct LogStore {
    inner: store::Store,
}

impl LogStore {
    /// Opens (creating or recovering) a store.
    ///
    /// # Errors
    /// See [`StoreError`].
    pub fn open(cfg: StoreConfig) -> Result<(Self, Recovery), StoreError> {
        let (inner, rec) = store::Store::open(cfg, |d| d)?;
        Ok((Self { inner }, rec))
    }

    /// Opens a store whose device operations pass through the fault rules of `faults`
    /// (switchable while the store runs).
    ///
    /// # Errors
    /// See [`StoreError`].
    #[cfg(feature = "testing")]
    pub fn open_with_faults(
        cfg: StoreConfig,
        faults: testing::Faults,
    ) -> Result<(Self, Recovery), StoreError> {
        let (inner, rec) =
            store::Store::open(cfg, |d| Box::new(testing::FaultDevice::new(d, faults)))?;
        Ok((Self { inner }, rec))
    }

    /// The I/O engine in use: `"io_uring"`, `"pread"` or `"mmap"`.
    #[must_use]
    pub fn io_engine(&self) -> &'static str {
        self.inner.io_engine()
    }

    /// Where the entry with this key hash is, from the in-memory index (no I/O). Expired
    /// entries are not returned.
    #[must_use]
    pub fn locate(&self, hash: u128) -> Option<Location> {
        self.inner.locate(hash)
    }

    /// Every (hash, location) the index holds (expired entries left out), in no order. No
    /// I/O; takes the index lock for the copy.
    #[must_use]
    pub fn indexed(&self) -> Vec<(u128, Location)> {
        self.inner.indexed()
    }

    /// Reads entries into their `dst`, verifying key, sequence number and checksum; fills
    /// each `outcome` and, on a hit, `metadata`. Blocks until all are done.
    ///
    /// # Safety
    /// Each `dst` must be valid for writes of `loc.value_len` rounded up to 4096 bytes,
    /// 4096-aligned, and not accessed by anything else until this returns.
    pub unsafe fn read(&self, reqs: &mut [ReadReq<'_>]) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.inner.read(reqs) }
    }

    /// Appends entries (replacing earlier entries of the same hash); returns each one's
    /// location or why it was not stored. Blocks until written.
    ///
    /// # Safety
    /// Each `value` must be valid for reads of `value_len` rounded up to 4096 bytes,
    /// 4096-aligned, and not written by anything until this returns.
    pub unsafe fn write(&self, reqs: &[WriteReq<'_>]) -> Vec<Result<Location, StoreError>> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.inner.write(reqs) }
    }

    /// Drops the entry with this hash from the index at once (a later `locate` misses) and
    /// queues a tombstone so that it stays gone after a restart. Returns whether it existed.
    pub fn remove(&self, hash: u128) -> bool {
        self.inner.remove(hash)
    }

    /// Makes everything written so far durable (pending tombstones, data, a checkpoint).
    ///
    /// # Errors
    /// An I/O error (the store is then degraded).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    /// Counters and gauges.
    #[must_use]
    pub fn stats(&self) -> StoreStats {
        self.inner.stats()
    }

    /// Why the store is degraded, if it is (ENOSPC, I/O errors, a slow device, a deleted or
    /// truncated file).
    #[must_use]
    pub fn degraded(&self) -> Option<String> {
        self.inner.degraded()
    }

    /// How long a degraded store waits between probe writes (default 10 s): while degraded,
    /// writes are refused except one call per interval, whose success ends the degraded
    /// state.
    pub fn set_retry_interval(&self, every: std::time::Duration) {
        self.inner.set_retry_interval(every);
    }
}
