//! The store proper: the write path (append, region allocation, FIFO eviction with
//! reinsertion of hot entries), the read path (verification), removal with tombstones,
//! flush and checkpoints, and the degraded state (and a device smaller than configured:
//! see `cap_to_allocated`).
//!
//! # Locks
//!
//! - `state` (a `parking_lot::Mutex`): index, region table, next seq, pending tombstones.
//!   Held only for bookkeeping, never across I/O.
//! - `writer`: serializes writers (write, flush, checkpoint) with each other; held across
//!   their I/O. Readers never take it.
//! - `health`: the degraded state.
//!
//! # Ordering that keeps reads correct
//!
//! Before a region is overwritten, its entries leave the index (under `state`). A reader
//! whose entry fails any check looks the entry up again: if the index still holds that seq,
//! the entry was really damaged (`Corrupt`, dropped); if not, it was evicted or replaced
//! while the read ran (`Miss`). No check failure is ever a hit.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::buf::AlignedBuf;
use crate::device::{Device, Health, IoOp, OpKind};
use crate::format::{
    Checkpoint, CkptEntry, CkptRegion, EntryHeader, FLAG_TOMBSTONE, HEADER_FIXED, round_up,
    value_checksum,
};
use crate::index::{HashSet128, Index, loc_size};
use crate::recovery::{Layout, recover};
use crate::region::{RegionState, Regions};
use crate::{
    Location, ReadOutcome, ReadReq, Recovery, StoreConfig, StoreError, StoreStats, WriteReq,
};

/// Default wait between probe writes while degraded.
pub(crate) const DEFAULT_RETRY: Duration = Duration::from_secs(10);
/// Least time between two checks of the files (deleted, truncated).
const CHECK_EVERY_MS: u64 = 1000;

/// The current Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    read_bytes: AtomicU64,
    evictions: AtomicU64,
    reinserted: AtomicU64,
    region_evictions: AtomicU64,
    corrupt: AtomicU64,
    io_errors: AtomicU64,
    write_refusals: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    if n > 0 {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why the store is degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// The device failed an operation (EIO and the like).
    Io,
    /// No space left.
    Space,
    /// An operation took longer than `slow_io`.
    Slow,
    /// The file or directory was deleted or replaced.
    Deleted,
    /// The file was truncated.
    Truncated,
}

fn cause_of(e: &std::io::Error) -> Cause {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => Cause::Space,
        _ => Cause::Io,
    }
}

struct HealthState {
    reason: Option<String>,
    cause: Option<Cause>,
    next_probe: Instant,
    retry: Duration,
    /// Entries dropped from the index since the file was found truncated (while `cause` is
    /// `Truncated`).
    truncated_lost: u64,
}

struct State {
    index: Index,
    regions: Regions,
    next_seq: u64,
    /// Removed hashes whose tombstones are not written yet.
    tombstones: HashSet128,
    /// Hashes removed since the current write call took the queued tombstones: an entry of
    /// one of them that this call writes lost a race with the remove and is not indexed.
    removed_meanwhile: HashSet128,
    /// Hot entries taken out of an evicted region and not yet rewritten.
    reinserting: HashSet128,
}

struct Writer {
    seals_since_ckpt: u32,
}

/// One entry queued for writing.
struct Item {
    hdr: AlignedBuf,
    value: *const u8,
    value_pad: usize,
    /// Keeps a reinserted entry's bytes alive (`value` points into it).
    _owned: Option<AlignedBuf>,
    hash: u128,
    loc: Location,
    region: u32,
    kind: ItemKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ItemKind {
    Req(usize),
    Tombstone,
    Reinsert,
}

/// What to append.
enum Entry<'r, 'a> {
    Req(usize, &'r WriteReq<'a>),
    Tombstone(u128),
}

type Results = Vec<Option<Result<Location, StoreError>>>;

/// The store.
pub(crate) struct Store {
    layout: Layout,
    slow_io: Duration,
    queue_depth: u32,
    ckpt_path: PathBuf,
    ckpt_every: u32,
    dev: Box<dyn Device>,
    _lock: File,
    state: Mutex<State>,
    writer: Mutex<Writer>,
    health: Mutex<HealthState>,
    opened: Instant,
    last_check_ms: AtomicU64,
    c: Counters,
}

impl Store {
    /// Opens (creating or recovering) a store; `wrap` may wrap the device (fault injection).
    pub(crate) fn open(
        cfg: StoreConfig,
        wrap: impl FnOnce(Box<dyn Device>) -> Box<dyn Device>,
    ) -> Result<(Self, Recovery), StoreError> {
        let t0 = Instant::now();
        let count = crate::open::validate(&cfg)?;
        let opened = crate::open::open(&cfg, count)?;
        let dev = wrap(opened.dev);
        let layout = Layout {
            region_size: cfg.region_size,
            count,
            store_id: opened.store_id,
        };
        let ckpt = if opened.reset.is_none() {
            load_checkpoint(&opened.ckpt_path, &layout)
        } else {
            None
        };
        let threads = (cfg.queue_depth as usize).clamp(1, 8);
        let rec = recover(&*dev, &layout, ckpt.as_ref(), threads, now_ms());
        let ckpt_next = ckpt.as_ref().map_or(1, |c| c.next_seq);
        drop(ckpt);

        let mut regions = Regions::restore(count, cfg.region_size, rec.used.clone());
        for (h, e) in rec.index.iter() {
            let r = layout.region_of(e.loc.offset);
            if regions.get(r).state == RegionState::Sealed {
                regions.get_mut(r).entries.push((h, e.loc.seq));
            }
        }
        // Entries written but never found (a torn batch at a crash) may carry seqs above the
        // largest one seen; skipping as many seqs as entries fit in the store keeps every new
        // seq above them, so the scan's ordering rules stay sound.
        let gap = u64::from(count) * (cfg.region_size / crate::format::BLOCK) + 1;
        let next_seq = (rec.max_seq + 1).max(ckpt_next) + gap;
        let report = Recovery {
            entries: rec.index.len() as u64,
            scanned_bytes: rec.scanned_bytes,
            from_checkpoint: rec.from_checkpoint,
            skipped: rec.skipped,
            elapsed: t0.elapsed(),
            reset: opened.reset.clone(),
        };
        if let Some(why) = &opened.reset {
            tracing::warn!(path = %cfg.path.display(), reason = %why, "store started empty");
        }
        if rec.corrupt > 0 {
            tracing::warn!(
                path = %cfg.path.display(),
                corrupt = rec.corrupt,
                "recovery dropped {} torn or corrupt entries",
                rec.corrupt
            );
        }
        let store = Self {
            layout,
            slow_io: cfg.slow_io,
            queue_depth: cfg.queue_depth,
            ckpt_path: opened.ckpt_path,
            ckpt_every: (count / 8).max(4),
            dev,
            _lock: opened.lock,
            state: Mutex::new(State {
                index: rec.index,
                regions,
                next_seq,
                tombstones: HashSet128::default(),
                removed_meanwhile: HashSet128::default(),
                reinserting: HashSet128::default(),
            }),
            writer: Mutex::new(Writer {
                seals_since_ckpt: 0,
            }),
            health: Mutex::new(HealthState {
                reason: None,
                cause: None,
                next_probe: Instant::now(),
                retry: DEFAULT_RETRY,
                truncated_lost: 0,
            }),
            opened: Instant::now(),
            last_check_ms: AtomicU64::new(0),
            c: Counters::default(),
        };
        add(&store.c.corrupt, rec.corrupt);
        if report.entries > 0
            && (!report.from_checkpoint || report.scanned_bytes > 8 * cfg.region_size)
        {
            // What this scan found need not be scanned again after the next crash.
            let mut w = store.writer.lock();
            if let Err(e) = store.checkpoint(&mut w) {
                tracing::warn!(error = %e, "cannot write a checkpoint after recovery");
            }
        }
        tracing::info!(
            path = %cfg.path.display(),
            engine = store.dev.name(),
            entries = report.entries,
            scanned_bytes = report.scanned_bytes,
            from_checkpoint = report.from_checkpoint,
            skipped = report.skipped,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "store opened"
        );
        Ok((store, report))
    }

    /// The engine's name.
    pub(crate) fn io_engine(&self) -> &'static str {
        self.dev.name()
    }

    /// See [`crate::LogStore::locate`].
    pub(crate) fn locate(&self, hash: u128) -> Option<Location> {
        let mut st = self.state.lock();
        let loc = st.index.get(hash)?.loc;
        if loc.expires_unix_ms != u64::MAX && loc.expires_unix_ms <= now_ms() {
            st.index.remove(hash);
            return None;
        }
        Some(loc)
    }

    /// See [`crate::LogStore::indexed`].
    pub(crate) fn indexed(&self) -> Vec<(u128, Location)> {
        let now = now_ms();
        let st = self.state.lock();
        st.index
            .iter()
            .filter(|(_, e)| e.loc.expires_unix_ms > now)
            .map(|(h, e)| (h, e.loc))
            .collect()
    }

    /// See [`crate::LogStore::remove`].
    pub(crate) fn remove(&self, hash: u128) -> bool {
        let mut st = self.state.lock();
        let existed = match st.index.remove(hash) {
            // An expired entry is already gone (and, newer than what it replaced, keeps that
            // gone across a restart without a tombstone).
            Some(e) => e.loc.expires_unix_ms == u64::MAX || e.loc.expires_unix_ms > now_ms(),
            None => st.reinserting.remove(&hash),
        };
        if existed {
            st.tombstones.insert(hash);
            st.removed_meanwhile.insert(hash);
        }
        existed
    }

    /// See [`crate::LogStore::stats`].
    pub(crate) fn stats(&self) -> StoreStats {
        let (entries, used_bytes, usable) = {
            let st = self.state.lock();
            (
                st.index.len() as u64,
                st.index.used_bytes(),
                st.regions.usable(),
            )
        };
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StoreStats {
            capacity_bytes: u64::from(usable) * self.layout.region_size,
            used_bytes,
            entries,
            hits: g(&self.c.hits),
            misses: g(&self.c.misses),
            writes: g(&self.c.writes),
            write_bytes: g(&self.c.write_bytes),
            read_bytes: g(&self.c.read_bytes),
            evictions: g(&self.c.evictions),
            reinserted: g(&self.c.reinserted),
            region_evictions: g(&self.c.region_evictions),
            corrupt: g(&self.c.corrupt),
            io_errors: g(&self.c.io_errors),
            write_refusals: g(&self.c.write_refusals),
        }
    }

    /// See [`crate::LogStore::degraded`].
    pub(crate) fn degraded(&self) -> Option<String> {
        self.maybe_check(false);
        self.health.lock().reason.clone()
    }

    /// See [`crate::LogStore::set_retry_interval`].
    pub(crate) fn set_retry_interval(&self, every: Duration) {
        let mut h = self.health.lock();
        h.retry = every;
        let soonest = Instant::now() + every;
        if h.next_probe > soonest {
            h.next_probe = soonest;
        }
    }

    // ---- health ---------------------------------------------------------------------

    fn degrade(&self, cause: Cause, reason: String) {
        let mut h = self.health.lock();
        Self::degrade_locked(&mut h, cause, reason);
    }

    /// [`Self::degrade`] with the health lock held.
    fn degrade_locked(h: &mut HealthState, cause: Cause, reason: String) {
        if h.cause != Some(cause) {
            tracing::warn!(reason = %reason, "store degraded: writes are refused (retried every {:?})", h.retry);
        }
        if h.cause.is_none() {
            h.next_probe = Instant::now() + h.retry;
        }
        h.reason = Some(reason);
        h.cause = Some(cause);
    }

    fn clear(&self, only: Option<Cause>) {
        let mut h = self.health.lock();
        if h.cause.is_some() && (only.is_none() || only == h.cause) {
            tracing::info!(was = ?h.reason, "store no longer degraded");
            h.reason = None;
            h.cause = None;
        }
    }

    /// Whether a write may run now: `Ok(false)` healthy, `Ok(true)` degraded but due a probe,
    /// `Err(reason)` refused.
    fn admit(&self) -> Result<bool, String> {
        let cause = {
            let mut h = self.health.lock();
            let Some(reason) = h.reason.clone() else {
                return Ok(false);
            };
            let now = Instant::now();
            if now < h.next_probe {
                return Err(reason);
            }
            h.next_probe = now + h.retry;
            h.cause
        };
        if matches!(cause, Some(Cause::Deleted) | Some(Cause::Truncated)) {
            let mut health = self.dev.health();
            if matches!(health, Health::Truncated { .. }) && self.dev.repair().is_ok() {
                health = self.dev.health();
            }
            if health != Health::Ok {
                let reason = self.health.lock().reason.clone().unwrap_or_default();
                return Err(reason);
            }
        }
        Ok(true)
    }

    /// Checks the files at most once a second (or now if `force`).
    fn maybe_check(&self, force: bool) {
        let now = self.opened.elapsed().as_millis() as u64 + CHECK_EVERY_MS;
        let last = self.last_check_ms.load(Ordering::Relaxed);
        if !force && now < last + CHECK_EVERY_MS {
            return;
        }
        if self
            .last_check_ms
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
            && !force
        {
            return;
        }
        match self.dev.health() {
            Health::Ok => {}
            Health::Deleted(why) => self.degrade(Cause::Deleted, why),
            Health::Truncated { lost, detail } => {
                // Every check of a file that is still short finds it so again, but only the
                // first one drops entries: the count is kept for the whole truncated spell,
                // so that the reason (logged once, shown by `degraded`) keeps the real
                // number. The health lock is held across the drop so that concurrent checks
                // add up in order.
                let mut h = self.health.lock();
                let dropped = {
                    let mut st = self.state.lock();
                    st.index.remove_where(|e| {
                        let end = e.loc.offset + loc_size(&e.loc);
                        lost.iter().any(|r| e.loc.offset < r.end && r.start < end)
                    })
                };
                let total = if h.cause == Some(Cause::Truncated) {
                    h.truncated_lost + dropped
                } else {
                    dropped
                };
                h.truncated_lost = total;
                Self::degrade_locked(
                    &mut h,
                    Cause::Truncated,
                    format!("{detail}; {total} entries lost"),
                );
            }
        }
    }

    /// Records a batch's latency: slow batches degrade, a normal one ends a slow spell.
    fn note_latency(&self, elapsed: Duration, ops: usize) {
        if self.slow_io.is_zero() || ops == 0 {
            return;
        }
        let rounds = ops.div_ceil(self.queue_depth as usize).max(1) as u32;
        let per = elapsed / rounds;
        if per > self.slow_io {
            self.degrade(
                Cause::Slow,
                format!(
                    "slow device: an I/O took {per:?} (limit {:?})",
                    self.slow_io
                ),
            );
        } else {
            self.clear(Some(Cause::Slow));
        }
    }

    fn io_failed(&self, what: String, e: std::io::Error) -> StoreError {
        add(&self.c.io_errors, 1);
        self.degrade(cause_of(&e), format!("{what}: {e}"));
        StoreError::Io { what, source: e }
    }

    // ---- write path -----------------------------------------------------------------

    /// See [`crate::LogStore::write`].
    ///
    /// # Safety
    /// As [`crate::LogStore::write`].
    pub(crate) unsafe fn write(&self, reqs: &[WriteReq<'_>]) -> Vec<Result<Location, StoreError>> {
        let mut results: Results = (0..reqs.len()).map(|_| None).collect();
        let mut w = self.writer.lock();
        self.maybe_check(false);
        let probe = match self.admit() {
            Ok(p) => p,
            Err(reason) => {
                add(&self.c.write_refusals, reqs.len() as u64);
                return reqs
                    .iter()
                    .map(|_| Err(StoreError::Degraded(reason.clone())))
                    .collect();
            }
        };
        let io_errors_before = self.c.io_errors.load(Ordering::Relaxed);
        let mut batch: Vec<Item> = Vec::new();
        let tombstones: Vec<u128> = {
            let mut st = self.state.lock();
            st.removed_meanwhile.clear();
            st.tombstones.drain().collect()
        };
        let mut failed = false;
        for (i, &h) in tombstones.iter().enumerate() {
            // SAFETY: a tombstone references no caller memory.
            let r = unsafe { self.append(&mut w, &mut batch, &mut results, Entry::Tombstone(h)) };
            if let Err(e) = r {
                let mut st = self.state.lock();
                st.tombstones.extend(tombstones[i..].iter().copied());
                drop(st);
                tracing::debug!(error = %e, "tombstones stay queued");
                failed = true;
                break;
            }
        }
        for (i, r) in reqs.iter().enumerate() {
            if failed {
                let reason = self
                    .health
                    .lock()
                    .reason
                    .clone()
                    .unwrap_or_else(|| "device error".into());
                add(&self.c.write_refusals, 1);
                results[i] = Some(Err(StoreError::Degraded(reason)));
                continue;
            }
            if let Err(e) = self.check_req(r) {
                add(&self.c.write_refusals, 1);
                results[i] = Some(Err(e));
                continue;
            }
            // SAFETY: the caller's contract covers `r.value`.
            let res = unsafe { self.append(&mut w, &mut batch, &mut results, Entry::Req(i, r)) };
            if let Err(e) = res {
                results[i] = Some(Err(e));
                failed = true;
            }
        }
        self.complete(&mut batch, &mut results);
        let wrote_any = results.iter().any(|r| matches!(r, Some(Ok(_))));
        let new_errors = self.c.io_errors.load(Ordering::Relaxed) != io_errors_before;
        if probe && wrote_any && !new_errors {
            self.clear(None);
        }
        if w.seals_since_ckpt >= self.ckpt_every
            && !new_errors
            && let Err(e) = self.checkpoint(&mut w)
        {
            tracing::warn!(error = %e, "periodic checkpoint failed");
        }
        drop(w);
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(StoreError::Io {
                        what: "entry not written".into(),
                        source: std::io::Error::other("not written"),
                    })
                })
            })
            .collect()
    }

    fn check_req(&self, r: &WriteReq<'_>) -> Result<(), StoreError> {
        if r.key.len() > usize::from(u16::MAX) {
            return Err(StoreError::Config(format!(
                "a key of {} bytes is longer than 65535",
                r.key.len()
            )));
        }
        if r.metadata.len() as u64 > u64::from(u32::MAX) {
            return Err(StoreError::Config("metadata longer than 4 GiB".into()));
        }
        if r.value_len > 0 && (r.value.is_null() || !(r.value as usize).is_multiple_of(4096)) {
            return Err(StoreError::Config(
                "a value must start at a 4096-aligned address".into(),
            ));
        }
        let size =
            crate::format::entry_size(r.key.len() as u64, r.metadata.len() as u64, r.value_len);
        if size > self.layout.region_size {
            return Err(StoreError::TooLarge {
                len: size,
                region: self.layout.region_size,
            });
        }
        Ok(())
    }

    /// Reserves room for `entry` and queues it (making room first if needed).
    ///
    /// # Safety
    /// A request's value must be valid for reads of `value_len` rounded up to 4096 until the
    /// batch completes.
    unsafe fn append(
        &self,
        w: &mut Writer,
        batch: &mut Vec<Item>,
        results: &mut Results,
        entry: Entry<'_, '_>,
    ) -> Result<(), StoreError> {
        let (key, meta, value_len, size) = match &entry {
            Entry::Req(_, r) => {
                let size = crate::format::entry_size(
                    r.key.len() as u64,
                    r.metadata.len() as u64,
                    r.value_len,
                );
                (r.key, r.metadata, r.value_len, size)
            }
            Entry::Tombstone(_) => (&[][..], &[][..], 0, crate::format::BLOCK),
        };
        loop {
            let placed = {
                let mut st = self.state.lock();
                let seq = st.next_seq;
                let p = st.regions.reserve(size, seq);
                if p.is_some() {
                    st.next_seq += 1;
                }
                p.map(|(r, off)| (r, off, seq))
            };
            let Some((region, off, seq)) = placed else {
                self.make_room(w, batch, results)?;
                continue;
            };
            let (hash, flags, value, expires, kind) = match &entry {
                Entry::Req(i, r) => (r.hash, 0, r.value, r.expires_unix_ms, ItemKind::Req(*i)),
                Entry::Tombstone(h) => (
                    *h,
                    FLAG_TOMBSTONE,
                    std::ptr::null(),
                    u64::MAX,
                    ItemKind::Tombstone,
                ),
            };
            let vsum = if value_len > 0 {
                // SAFETY: the caller guarantees `value` is readable for `value_len` bytes.
                value_checksum(unsafe { std::slice::from_raw_parts(value, value_len as usize) })
            } else {
                value_checksum(&[])
            };
            let h = EntryHeader {
                flags,
                key_len: key.len() as u16,
                meta_len: meta.len() as u32,
                value_len,
                seq,
                expires_unix_ms: expires,
                store_id: self.layout.store_id,
                hash,
                value_checksum: vsum,
            };
            let mut hdr = AlignedBuf::zeroed(h.header_block() as usize);
            h.encode(key, meta, &mut hdr);
            batch.push(Item {
                hdr,
                value,
                value_pad: round_up(value_len) as usize,
                _owned: None,
                hash,
                loc: Location {
                    value_len,
                    key_len: key.len() as u32,
                    meta_len: meta.len() as u32,
                    seq,
                    expires_unix_ms: expires,
                    offset: self.layout.base(region) + off,
                },
                region,
                kind,
            });
            return Ok(());
        }
    }

    /// Seals the active region and activates another: a free one, or the oldest sealed one
    /// after evicting it (which first completes the queued batch).
    fn make_room(
        &self,
        w: &mut Writer,
        batch: &mut Vec<Item>,
        results: &mut Results,
    ) -> Result<(), StoreError> {
        let free = {
            let mut st = self.state.lock();
            if st.regions.seal_active() {
                w.seals_since_ckpt += 1;
            }
            st.regions.take_free()
        };
        if let Some(r) = free {
            match self
                .dev
                .allocate(self.layout.base(r), self.layout.region_size)
            {
                Ok(()) => {
                    self.state.lock().regions.activate(r);
                    return Ok(());
                }
                Err(e) => {
                    self.state.lock().regions.return_free(r);
                    if cause_of(&e) != Cause::Space || !self.cap_to_allocated(r) {
                        return Err(self.io_failed(format!("preallocating region {r}"), e));
                    }
                    // Capped: make room by evicting, as a full store does.
                }
            }
        }
        self.complete(batch, results);
        self.evict(batch)
    }

    /// After no space was left to preallocate free region `failed`: if at least two regions
    /// are sealed and the oldest one can be allocated again (its space is the store's
    /// already), the device is taken to be smaller than configured and the free regions are
    /// set aside for the rest of the run (a restart tries them again), so that the store goes
    /// on evicting and reusing its own regions instead of staying degraded. Returns whether
    /// it capped.
    fn cap_to_allocated(&self, failed: u32) -> bool {
        let oldest = {
            let st = self.state.lock();
            if st.regions.sealed_count() < 2 {
                return false;
            }
            st.regions.oldest_sealed()
        };
        let Some(oldest) = oldest else {
            return false;
        };
        // Allocating an allocated range again changes no data; if even that fails the
        // device is out of space for the store's own regions too.
        if self
            .dev
            .allocate(self.layout.base(oldest), self.layout.region_size)
            .is_err()
        {
            return false;
        }
        let usable = self.state.lock().regions.cap_to_allocated();
        tracing::warn!(
            regions = usable,
            configured = self.layout.count,
            region_size = self.layout.region_size,
            "no space left to preallocate region {failed}: the device holds {usable} of the \
             {} configured regions; going on with {usable} (oldest evicted first) until the \
             store is reopened",
            self.layout.count
        );
        true
    }

    /// Evicts the oldest sealed region and makes it the active one, queueing its hot
    /// entries (read since written; at most half a region) to be rewritten into it.
    fn evict(&self, batch: &mut Vec<Item>) -> Result<(), StoreError> {
        let region_size = self.layout.region_size;
        let (victim, hot) = {
            let st = self.state.lock();
            let Some(victim) = st.regions.oldest_sealed() else {
                return Err(StoreError::Config("no region to evict (a bug)".into()));
            };
            let now = now_ms();
            let mut hot: Vec<(u128, Location)> = st
                .regions
                .get(victim)
                .entries
                .iter()
                .filter_map(|&(h, seq)| {
                    let e = st.index.get(h)?;
                    (e.loc.seq == seq && e.reads > 0 && e.loc.expires_unix_ms > now)
                        .then_some((h, e.loc))
                })
                .collect();
            hot.sort_by_key(|(_, l)| l.seq);
            let mut budget = region_size / 2;
            hot.retain(|(_, l)| {
                let s = loc_size(l);
                if s <= budget {
                    budget -= s;
                    true
                } else {
                    false
                }
            });
            (victim, hot)
        };

        // Read the hot entries back while the region is intact.
        let mut bufs: Vec<AlignedBuf> = hot
            .iter()
            .map(|(_, l)| AlignedBuf::zeroed(loc_size(l) as usize))
            .collect();
        let mut ops: Vec<IoOp> = hot
            .iter()
            .zip(bufs.iter_mut())
            .map(|((_, l), b)| IoOp::new(OpKind::Read, l.offset, &[(b.as_mut_ptr(), b.len())]))
            .collect();
        let t = Instant::now();
        // SAFETY: every buffer is ours, aligned, as long as its op, and untouched meanwhile.
        unsafe { self.dev.submit(&mut ops) };
        self.note_latency(t.elapsed(), ops.len());
        let mut kept: Vec<(u128, Location, AlignedBuf, EntryHeader)> = Vec::new();
        let mut kept_seq: std::collections::HashMap<u128, u64, crate::index::FoldBuild> =
            std::collections::HashMap::default();
        let mut bad = 0;
        for (((h, l), buf), op) in hot.into_iter().zip(bufs).zip(&ops) {
            if !op.complete() {
                if op.result.is_err() {
                    add(&self.c.io_errors, 1);
                }
                continue;
            }
            match verify_entry(&buf, self.layout.store_id, h, &l) {
                Some(hd) => {
                    kept_seq.insert(h, l.seq);
                    kept.push((h, l, buf, hd));
                }
                None => bad += 1,
            }
        }
        drop(ops);

        // Drop the region from the index.
        {
            let mut st = self.state.lock();
            let Some((r, entries)) = st.regions.take_oldest_sealed() else {
                return Err(StoreError::Config(
                    "the region to evict vanished (a bug)".into(),
                ));
            };
            debug_assert_eq!(r, victim);
            let mut dropped = 0;
            for (h, seq) in entries {
                if st.index.remove_seq(h, seq).is_some() {
                    if kept_seq.get(&h) == Some(&seq) {
                        st.reinserting.insert(h);
                    } else {
                        dropped += 1;
                    }
                }
            }
            add(&self.c.evictions, dropped);
            add(&self.c.region_evictions, 1);
            add(&self.c.corrupt, bad);
        }
        if let Err(e) = self.dev.allocate(self.layout.base(victim), region_size) {
            let mut st = self.state.lock();
            st.regions.return_free(victim);
            let mut lost = 0;
            for (h, ..) in &kept {
                if st.reinserting.remove(h) {
                    lost += 1;
                }
            }
            add(&self.c.evictions, lost);
            drop(st);
            return Err(self.io_failed(format!("preallocating region {victim}"), e));
        }
        let mut st = self.state.lock();
        st.regions.activate(victim);
        for (h, l, buf, old) in kept {
            if !st.reinserting.contains(&h) {
                continue; // removed meanwhile (its tombstone is queued)
            }
            let size = loc_size(&l);
            let seq = st.next_seq;
            let Some((region, off)) = st.regions.reserve(size, seq) else {
                st.reinserting.remove(&h);
                add(&self.c.evictions, 1);
                continue;
            };
            st.next_seq += 1;
            let hb = old.header_block() as usize;
            let k = usize::from(old.key_len);
            let m = old.meta_len as usize;
            let key = &buf[HEADER_FIXED..HEADER_FIXED + k];
            let meta = &buf[HEADER_FIXED + k..HEADER_FIXED + k + m];
            let new = EntryHeader { seq, ..old };
            let mut hdr = AlignedBuf::zeroed(hb);
            new.encode(key, meta, &mut hdr);
            // SAFETY: `hb <= buf.len()` (the buffer holds the whole entry).
            let value = unsafe { buf.as_ptr().add(hb) };
            batch.push(Item {
                hdr,
                value,
                value_pad: round_up(l.value_len) as usize,
                _owned: Some(buf),
                hash: h,
                loc: Location {
                    seq,
                    offset: self.layout.base(region) + off,
                    ..l
                },
                region,
                kind: ItemKind::Reinsert,
            });
        }
        Ok(())
    }

    /// Writes the queued batch and applies the outcome to the index.
    fn complete(&self, batch: &mut Vec<Item>, results: &mut Results) {
        if batch.is_empty() {
            return;
        }
        let mut ops: Vec<IoOp> = batch
            .iter()
            .map(|it| {
                IoOp::new(
                    OpKind::Write,
                    it.loc.offset,
                    &[
                        (it.hdr.as_ptr().cast_mut(), it.hdr.len()),
                        (it.value.cast_mut(), it.value_pad),
                    ],
                )
            })
            .collect();
        let t = Instant::now();
        // SAFETY: header buffers are owned by the batch; values are the callers' (valid per
        // the write contract) or owned by the batch (reinsertions). The device only reads
        // them, and the batch outlives the call.
        unsafe { self.dev.submit(&mut ops) };
        self.note_latency(t.elapsed(), ops.len());
        let mut failure: Option<(String, std::io::Error)> = None;
        let mut written_tombstones = Vec::new();
        let mut failed_tombstones = Vec::new();
        {
            let mut st = self.state.lock();
            for (it, op) in batch.iter().zip(ops.iter_mut()) {
                if op.complete() {
                    match it.kind {
                        ItemKind::Req(i) => {
                            // A remove() that ran while this entry was being written wins
                            // (its tombstone is written later, with a larger seq).
                            if !st.removed_meanwhile.contains(&it.hash) {
                                // A tombstone still queued for the hash is one of this call
                                // that failed; this newer entry supersedes what it deletes.
                                st.tombstones.remove(&it.hash);
                                st.index.insert(it.hash, it.loc);
                                st.regions
                                    .get_mut(it.region)
                                    .entries
                                    .push((it.hash, it.loc.seq));
                            }
                            add(&self.c.writes, 1);
                            add(&self.c.write_bytes, it.loc.value_len);
                            results[i] = Some(Ok(it.loc));
                        }
                        ItemKind::Tombstone => written_tombstones.push(it.hash),
                        ItemKind::Reinsert => {
                            if st.reinserting.remove(&it.hash) {
                                st.index.insert(it.hash, it.loc);
                                st.regions
                                    .get_mut(it.region)
                                    .entries
                                    .push((it.hash, it.loc.seq));
                                add(&self.c.reinserted, 1);
                            }
                        }
                    }
                    continue;
                }
                let err = match std::mem::replace(&mut op.result, Ok(0)) {
                    Err(e) => e,
                    Ok(n) => std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("short write ({n} of {} bytes)", op.len()),
                    ),
                };
                add(&self.c.io_errors, 1);
                // Nothing more goes into a region with a hole in it.
                st.regions.seal_if_active(it.region);
                let what = format!("writing an entry at offset {}", it.loc.offset);
                match it.kind {
                    ItemKind::Req(i) => {
                        let source = match err.raw_os_error() {
                            Some(code) => std::io::Error::from_raw_os_error(code),
                            None => std::io::Error::new(err.kind(), err.to_string()),
                        };
                        results[i] = Some(Err(StoreError::Io {
                            what: what.clone(),
                            source,
                        }));
                    }
                    ItemKind::Tombstone => failed_tombstones.push(it.hash),
                    ItemKind::Reinsert => {
                        if st.reinserting.remove(&it.hash) {
                            add(&self.c.evictions, 1);
                        }
                    }
                }
                if failure.is_none() {
                    failure = Some((what, err));
                }
            }
            // Failed tombstones are queued again; after a failure, so are the written ones (a
            // scan stops at the hole and might not reach them). Not where a newer entry of
            // the hash is indexed: the tombstone would delete it.
            let again = if failure.is_some() {
                failed_tombstones
                    .into_iter()
                    .chain(written_tombstones)
                    .collect::<Vec<_>>()
            } else {
                Vec::new()
            };
            for h in again {
                if st.index.get(h).is_none() {
                    st.tombstones.insert(h);
                }
            }
        }
        batch.clear();
        if let Some((what, e)) = failure {
            self.degrade(cause_of(&e), format!("{what}: {e}"));
        }
    }

    // ---- read path ------------------------------------------------------------------

    /// Whether `loc` could be an entry of this store.
    fn plausible(&self, loc: &Location) -> bool {
        loc.key_len <= u32::from(u16::MAX)
            && loc.value_len < (1 << 56)
            && self.layout.fits(loc.offset, loc_size(loc))
    }

    /// See [`crate::LogStore::read`].
    ///
    /// # Safety
    /// As [`crate::LogStore::read`].
    pub(crate) unsafe fn read(&self, reqs: &mut [ReadReq<'_>]) {
        self.maybe_check(false);
        let mut hb = Vec::with_capacity(reqs.len());
        let mut total = 0usize;
        for req in reqs.iter_mut() {
            req.metadata.clear();
            req.outcome = ReadOutcome::Pending;
            let ok = self.plausible(&req.loc)
                && (req.loc.value_len == 0
                    || (!req.dst.is_null() && (req.dst as usize).is_multiple_of(4096)));
            if ok {
                let b = crate::format::header_block(
                    u64::from(req.loc.key_len),
                    u64::from(req.loc.meta_len),
                ) as usize;
                hb.push(Some((total, b)));
                total += b;
            } else {
                req.outcome = ReadOutcome::Miss;
                hb.push(None);
            }
        }
        let mut hdrs = AlignedBuf::zeroed(total);
        let base = hdrs.as_mut_ptr();
        let mut ops = Vec::with_capacity(reqs.len());
        let mut which = Vec::with_capacity(reqs.len());
        for (i, req) in reqs.iter().enumerate() {
            let Some((at, b)) = hb[i] else { continue };
            // SAFETY: `at + b <= total`, the buffer's length.
            let h = unsafe { base.add(at) };
            ops.push(IoOp::new(
                OpKind::Read,
                req.loc.offset,
                &[(h, b), (req.dst, round_up(req.loc.value_len) as usize)],
            ));
            which.push(i);
        }
        let t = Instant::now();
        // SAFETY: header slices are ours; each `dst` is valid for its padded value length per
        // this function's contract; no two ops share memory.
        unsafe { self.dev.submit(&mut ops) };
        self.note_latency(t.elapsed(), ops.len());

        let mut short = false;
        let mut verdicts: Vec<(usize, Verdict)> = Vec::with_capacity(ops.len());
        for (op, &i) in ops.iter().zip(&which) {
            let req = &mut reqs[i];
            let v = match &op.result {
                Err(e) => {
                    add(&self.c.io_errors, 1);
                    if cause_of(e) == Cause::Io {
                        self.degrade(
                            Cause::Io,
                            format!("reading an entry at offset {}: {e}", req.loc.offset),
                        );
                    }
                    Verdict::IoError
                }
                Ok(n) if *n < op.len() => {
                    short = true;
                    Verdict::Bad
                }
                Ok(_) => {
                    let Some((at, b)) = hb[i] else { continue };
                    let hdr = &hdrs[at..at + b];
                    if self.verify_read(hdr, req) {
                        Verdict::Hit
                    } else {
                        Verdict::Bad
                    }
                }
            };
            verdicts.push((i, v));
        }
        {
            let mut st = self.state.lock();
            for &(i, v) in &verdicts {
                let req = &mut reqs[i];
                req.outcome = match v {
                    Verdict::Hit => {
                        st.index.note_read(req.hash, req.loc.seq);
                        ReadOutcome::Hit
                    }
                    Verdict::IoError => ReadOutcome::IoError,
                    Verdict::Bad => {
                        if st.index.remove_seq(req.hash, req.loc.seq).is_some() {
                            ReadOutcome::Corrupt
                        } else {
                            ReadOutcome::Miss
                        }
                    }
                };
                if req.outcome != ReadOutcome::Hit {
                    req.metadata.clear();
                }
            }
        }
        for req in reqs.iter() {
            match req.outcome {
                ReadOutcome::Hit => {
                    add(&self.c.hits, 1);
                    add(&self.c.read_bytes, req.loc.value_len);
                }
                ReadOutcome::Miss => add(&self.c.misses, 1),
                ReadOutcome::Corrupt => add(&self.c.corrupt, 1),
                _ => {}
            }
        }
        if short {
            self.maybe_check(true);
        }
    }

    /// Checks a read entry against its request; fills `metadata` on success.
    fn verify_read(&self, hdr: &[u8], req: &mut ReadReq<'_>) -> bool {
        let Ok(h) = EntryHeader::decode(hdr, self.layout.store_id) else {
            return false;
        };
        let loc = &req.loc;
        if !h.understood()
            || h.is_tombstone()
            || h.seq != loc.seq
            || h.hash != req.hash
            || h.value_len != loc.value_len
            || u32::from(h.key_len) != loc.key_len
            || h.meta_len != loc.meta_len
        {
            return false;
        }
        let k = usize::from(h.key_len);
        if &hdr[HEADER_FIXED..HEADER_FIXED + k] != req.key {
            return false;
        }
        let sum = if loc.value_len == 0 {
            value_checksum(&[])
        } else {
            // SAFETY: the read filled `dst` (valid for the padded length per the contract).
            value_checksum(unsafe { std::slice::from_raw_parts(req.dst, loc.value_len as usize) })
        };
        if sum != h.value_checksum {
            return false;
        }
        req.metadata.clear();
        req.metadata
            .extend_from_slice(&hdr[HEADER_FIXED + k..HEADER_FIXED + k + h.meta_len as usize]);
        true
    }

    // ---- flush and checkpoints --------------------------------------------------------

    /// See [`crate::LogStore::flush`].
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        let mut w = self.writer.lock();
        self.maybe_check(true);
        {
            let h = self.health.lock();
            if h.cause == Some(Cause::Deleted) {
                // Nothing to make durable: the files are gone (and a checkpoint written next
                // to them would describe a store that no longer exists).
                return Err(StoreError::Degraded(h.reason.clone().unwrap_or_default()));
            }
        }
        let tombstones: Vec<u128> = {
            let mut st = self.state.lock();
            st.removed_meanwhile.clear();
            st.tombstones.drain().collect()
        };
        if !tombstones.is_empty() {
            let mut batch = Vec::new();
            let mut results: Results = Vec::new();
            for (i, &h) in tombstones.iter().enumerate() {
                // SAFETY: a tombstone references no caller memory.
                let r =
                    unsafe { self.append(&mut w, &mut batch, &mut results, Entry::Tombstone(h)) };
                if let Err(e) = r {
                    self.complete(&mut batch, &mut results);
                    self.state
                        .lock()
                        .tombstones
                        .extend(tombstones[i..].iter().copied());
                    return Err(e);
                }
            }
            let before = self.c.io_errors.load(Ordering::Relaxed);
            self.complete(&mut batch, &mut results);
            if self.c.io_errors.load(Ordering::Relaxed) != before {
                let reason = self.health.lock().reason.clone().unwrap_or_default();
                return Err(StoreError::Degraded(reason));
            }
        }
        self.checkpoint(&mut w)
    }

    /// Syncs the device and writes a checkpoint (the writer lock is held).
    fn checkpoint(&self, w: &mut Writer) -> Result<(), StoreError> {
        if let Err(e) = self.dev.sync() {
            return Err(self.io_failed("syncing the store".into(), e));
        }
        // The writer lock keeps regions and seqs still; only removals (and drops of entries
        // found corrupt or expired) run meanwhile, so the index is copied one region at a
        // time without holding the state lock across the whole index. An entry removed after
        // its region was copied is deleted again by its queued tombstone, which is written
        // later with a larger seq.
        let (next_seq, mut regions) = {
            let st = self.state.lock();
            let regions: Vec<CkptRegion> = (0..self.layout.count)
                .map(|r| {
                    let reg = st.regions.get(r);
                    let used = reg.state != RegionState::Free && reg.write_off > 0;
                    CkptRegion {
                        used,
                        first_seq: if used { reg.first_seq } else { 0 },
                        end: if used { reg.write_off } else { 0 },
                        entries: Vec::new(),
                    }
                })
                .collect();
            (st.next_seq, regions)
        };
        for (r, rec) in regions.iter_mut().enumerate() {
            if !rec.used {
                continue;
            }
            let st = self.state.lock();
            for &(h, seq) in &st.regions.get(r as u32).entries {
                let Some(e) = st.index.get(h) else { continue };
                if e.loc.seq != seq {
                    continue;
                }
                rec.entries.push(CkptEntry {
                    hash: h,
                    offset: e.loc.offset,
                    seq: e.loc.seq,
                    value_len: e.loc.value_len,
                    expires_unix_ms: e.loc.expires_unix_ms,
                    key_len: e.loc.key_len,
                    meta_len: e.loc.meta_len,
                });
            }
        }
        let ck = Checkpoint {
            store_id: self.layout.store_id,
            region_size: self.layout.region_size,
            next_seq,
            regions,
        };
        let bytes = ck.encode();
        if let Err(e) = write_atomic(&self.ckpt_path, &bytes) {
            return Err(self.io_failed(
                format!("writing the checkpoint {}", self.ckpt_path.display()),
                e,
            ));
        }
        w.seals_since_ckpt = 0;
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Verdict {
    Hit,
    Bad,
    IoError,
}

/// Verifies a whole entry (header and value) read into `buf`; returns its header.
fn verify_entry(buf: &[u8], store_id: u64, hash: u128, loc: &Location) -> Option<EntryHeader> {
    let h = EntryHeader::decode(buf, store_id).ok()?;
    if !h.understood()
        || h.is_tombstone()
        || h.seq != loc.seq
        || h.hash != hash
        || h.value_len != loc.value_len
        || u32::from(h.key_len) != loc.key_len
        || h.meta_len != loc.meta_len
    {
        return None;
    }
    let hb = h.header_block() as usize;
    let v = buf.get(hb..hb + h.value_len as usize)?;
    (value_checksum(v) == h.value_checksum).then_some(h)
}

/// Loads the checkpoint if it is valid and matches the layout.
fn load_checkpoint(path: &Path, layout: &Layout) -> Option<Checkpoint> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the checkpoint; scanning");
            return None;
        }
    };
    match Checkpoint::decode(&bytes) {
        Ok(c)
            if c.store_id == layout.store_id
                && c.region_size == layout.region_size
                && c.regions.len() == layout.count as usize =>
        {
            Some(c)
        }
        Ok(_) => {
            tracing::warn!(path = %path.display(), "the checkpoint is of another store layout; scanning");
            None
        }
        Err(why) => {
            tracing::warn!(path = %path.display(), reason = %why, "ignoring an invalid checkpoint; scanning");
            None
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, fsync, rename, fsync of the
/// directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}
