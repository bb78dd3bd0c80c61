//! The lower tiers (T2 NVMe, T3 disk) and how entries move between them and host memory.
//! Everything that happens on a lower-tier hit or a demotion is in this file.
//!
//! **A get that misses host memory** ([`Engine::begin_get`]) asks each lower tier's
//! in-memory index, fastest tier first. On a hit it reserves an arena extent for the value
//! (placement and eviction as for a put) in an entry marked `Loading`, which no index or
//! queue knows, so nothing else can see or evict it. The bookkeeping lock is then dropped and
//! [`PendingGet::finish`] reads the value from the device straight into that extent (O_DIRECT
//! into the shared arena: no bounce buffer), verifying key, sequence number and checksum.
//! Under the lock again, the entry is published and leased unless the key changed meanwhile
//! (a put, a delete, or another load of it won): then the loaded bytes are dropped and the
//! current state answers. The client sees a promoted value as any host hit. Host hits of the
//! same call are leased in the first step, so a slow device never delays them beyond that
//! call, and never delays other calls at all.
//!
//! **Demotion** ([`Engine::demote`]) writes back ahead of eviction: when the free pages of
//! the arena fall below the demotion share (`demotion.clean_percent`), the coldest entries of
//! the eviction order that no lower tier holds are pinned (state stays `Live`, readable and
//! leasable, but not evictable), written outside the lock to the first tier that admits them
//! (`admission`: all, or only entries read while in host memory), and marked clean. Evicting
//! a clean entry then loses nothing; evicting one that no tier holds is counted as
//! `evictions_unsaved`. The batch is bounded by `demotion.queue_bytes`: that is the
//! write-back queue, and a device slower than the put rate makes evictions unsaved rather
//! than stalling puts. On shutdown [`Engine::persist`] writes every entry no tier holds,
//! hottest first, until its deadline.
//!
//! A put or delete of a key drops it from every lower tier first (the store writes a
//! tombstone), so an older copy never comes back; a demotion that finishes after its entry
//! was deleted or replaced removes the copy it wrote.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use nencache_store::{Location, LogStore, ReadOutcome, ReadReq, StoreError, StoreStats, WriteReq};

use super::{Engine, EntryState, Lease, SessionId, State, pages_for};
use crate::{
    config::{Admission, Tier},
    error::{EngineError, Result},
    key::key_hash,
};

/// What the engine needs of a lower tier. Built once from configuration; [`LogStore`] is
/// the implementation (on O_DIRECT files for T2, memory-mapped segments for T3).
pub trait LowerTier: Send + Sync {
    /// The I/O engine in use (`io_uring`, `pread`, `mmap`).
    fn io_engine(&self) -> &'static str;
    /// Where the entry with this key hash is, without I/O.
    fn locate(&self, hash: u128) -> Option<Location>;
    /// Reads entries into their destinations (blocking).
    ///
    /// # Safety
    /// As [`LogStore::read`].
    unsafe fn read(&self, reqs: &mut [ReadReq<'_>]);
    /// Appends entries (blocking).
    ///
    /// # Safety
    /// As [`LogStore::write`].
    unsafe fn write(&self, reqs: &[WriteReq<'_>]) -> Vec<Result<Location, StoreError>>;
    /// Forgets an entry (and makes that durable on the next flush).
    fn remove(&self, hash: u128) -> bool;
    /// Makes everything written durable.
    ///
    /// # Errors
    /// An I/O error.
    fn flush(&self) -> Result<(), StoreError>;
    /// The store's counters.
    fn stats(&self) -> StoreStats;
    /// Why the tier is degraded, if it is.
    fn degraded(&self) -> Option<String>;
}

impl LowerTier for LogStore {
    fn io_engine(&self) -> &'static str {
        LogStore::io_engine(self)
    }
    fn locate(&self, hash: u128) -> Option<Location> {
        LogStore::locate(self, hash)
    }
    unsafe fn read(&self, reqs: &mut [ReadReq<'_>]) {
        // SAFETY: the caller's contract is the store's.
        unsafe { LogStore::read(self, reqs) }
    }
    unsafe fn write(&self, reqs: &[WriteReq<'_>]) -> Vec<Result<Location, StoreError>> {
        // SAFETY: the caller's contract is the store's.
        unsafe { LogStore::write(self, reqs) }
    }
    fn remove(&self, hash: u128) -> bool {
        LogStore::remove(self, hash)
    }
    fn flush(&self) -> Result<(), StoreError> {
        LogStore::flush(self)
    }
    fn stats(&self) -> StoreStats {
        LogStore::stats(self)
    }
    fn degraded(&self) -> Option<String> {
        LogStore::degraded(self)
    }
}

/// The hash lower tiers index a key by: XXH3-128 with seed 0, the same in every agent and
/// after every restart (the host index's hash is seeded per engine, so it cannot be stored).
/// The key itself is compared when an entry is read, so a collision is a miss, never
/// another key's value.
#[must_use]
pub fn lower_hash(key: &[u8]) -> u128 {
    key_hash(key, 0)
}

/// Least time between two demotion rounds that found nothing to write.
const DEMOTER_SPACING: Duration = Duration::from_millis(5);

/// A lower tier as the engine holds it.
pub(super) struct Lower {
    pub(super) tier: Tier,
    pub(super) admission: Admission,
    pub(super) store: Box<dyn LowerTier>,
    /// Gets served from this tier (promotions).
    pub(super) hits: AtomicU64,
    /// Entries demoted into it.
    pub(super) demotions: AtomicU64,
    /// Value bytes demoted into it.
    pub(super) demoted_bytes: AtomicU64,
}

impl Lower {
    pub(super) fn new(tier: Tier, admission: Admission, store: Box<dyn LowerTier>) -> Self {
        Self {
            tier,
            admission,
            store,
            hits: AtomicU64::new(0),
            demotions: AtomicU64::new(0),
            demoted_bytes: AtomicU64::new(0),
        }
    }
}

/// Counters and state of one lower tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStats {
    /// Which tier.
    pub tier: Tier,
    /// Its I/O engine.
    pub io_engine: &'static str,
    /// Gets it served (values promoted into host memory).
    pub hits: u64,
    /// Entries demoted into it.
    pub demotions: u64,
    /// Value bytes demoted into it.
    pub demoted_bytes: u64,
    /// The store's own counters (entries, bytes, evictions, corrupt entries, I/O errors).
    pub store: StoreStats,
    /// Why it is degraded, if it is.
    pub degraded: Option<String>,
}

/// A value being read from a lower tier into its arena extent.
struct Load {
    /// Position in the call's key list.
    slot: usize,
    /// The `Loading` entry that owns the extent.
    entry: u32,
    /// Index of the tier in [`Engine::lower`].
    tier: usize,
    /// The key's [`lower_hash`].
    hash: u128,
    loc: Location,
    key: Vec<u8>,
    metadata: Vec<u8>,
    outcome: ReadOutcome,
}

/// The result of the first step of a get.
#[derive(Debug)]
pub enum Get {
    /// Every key was answered from host memory.
    Ready(Vec<Option<Lease>>),
    /// Some values are to be read from a lower tier: call [`PendingGet::finish`] (blocking;
    /// run it where blocking is allowed).
    Pending(PendingGet),
}

/// A get waiting for reads from lower tiers. Dropping it unfinished frees the extents it
/// reserved (the leases of its host hits stay with the session, as for a lost response).
pub struct PendingGet {
    engine: Arc<Engine>,
    session: SessionId,
    out: Vec<Option<Lease>>,
    loads: Vec<Load>,
}

impl std::fmt::Debug for PendingGet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingGet")
            .field("session", &self.session)
            .field("loads", &self.loads.len())
            .finish_non_exhaustive()
    }
}

impl PendingGet {
    /// Reads the values from their tiers into the arena, then publishes and leases them.
    ///
    /// # Errors
    /// As [`Engine::get`]: an unknown session or a full lease table (then no lease of this
    /// call is kept).
    pub fn finish(mut self) -> Result<Vec<Option<Lease>>> {
        let engine = Arc::clone(&self.engine);
        engine.read_loads(&mut self.loads);
        let loads = std::mem::take(&mut self.loads);
        let out = std::mem::take(&mut self.out);
        engine.publish_loads(self.session, out, loads)
    }
}

impl Drop for PendingGet {
    fn drop(&mut self) {
        if self.loads.is_empty() {
            return;
        }
        let mut st = self.engine.state.lock();
        for l in &self.loads {
            st.drop_loading(l.entry);
        }
    }
}

/// An entry pinned for demotion.
struct Demotion {
    entry: u32,
    tier: usize,
    /// The key's [`lower_hash`].
    hash: u128,
    /// The entry's host index hash.
    host_hash: u128,
    offset: usize,
    value_len: u64,
    key_len: usize,
    meta_len: usize,
    expires_unix_ms: u64,
}

impl Engine {
    /// The lower tiers, fastest first.
    #[must_use]
    pub fn lower_tiers(&self) -> Vec<Tier> {
        self.lower.iter().map(|l| l.tier).collect()
    }

    /// Counters of each lower tier.
    #[must_use]
    pub fn tier_stats(&self) -> Vec<TierStats> {
        self.lower
            .iter()
            .map(|l| TierStats {
                tier: l.tier,
                io_engine: l.store.io_engine(),
                hits: l.hits.load(Relaxed),
                demotions: l.demotions.load(Relaxed),
                demoted_bytes: l.demoted_bytes.load(Relaxed),
                store: l.store.stats(),
                degraded: l.store.degraded(),
            })
            .collect()
    }

    /// The first lower tier holding `key`: its index, the entry's location, and the key's
    /// [`lower_hash`]. A key whose host entry was deleted or replaced while being demoted
    /// is absent here until that demotion has removed its copy.
    pub(super) fn locate_lower(&self, st: &State, key: &[u8]) -> Option<(usize, Location, u128)> {
        if self.lower.is_empty()
            || (!st.demoting_doomed.is_empty()
                && st.demoting_doomed.contains(&key_hash(key, st.seed)))
        {
            return None;
        }
        let hash = lower_hash(key);
        self.lower.iter().enumerate().find_map(|(i, l)| {
            l.store
                .locate(hash)
                .filter(|loc| loc.key_len as usize == key.len())
                .map(|loc| (i, loc, hash))
        })
    }

    /// The [`lower_hash`] of the key of host entry `e` (read from the arena).
    fn entry_lower_hash(&self, st: &State, e: u32) -> u128 {
        let ent = &st.entries[e as usize];
        let off = u64::from(ent.extent.start) * self.page + ent.value_len;
        // SAFETY: the entry's key was written before it was published or loaded, and a key
        // is never rewritten while its entry holds the extent.
        lower_hash(unsafe { self.arena.slice(off as usize, usize::from(ent.key_len)) })
    }

    /// Drops the key of host entry `e` from every lower tier (it was just replaced).
    pub(super) fn remove_lower_entry(&self, st: &State, e: u32) {
        if !self.lower.is_empty() {
            self.remove_lower(self.entry_lower_hash(st, e));
        }
    }

    /// Drops `hash` from every lower tier (a put or delete of the key). Returns whether any
    /// held it.
    pub(super) fn remove_lower(&self, hash: u128) -> bool {
        let mut any = false;
        for l in &self.lower {
            any |= l.store.remove(hash);
        }
        if any {
            self.tombstones_pending.store(true, Relaxed);
        }
        any
    }

    /// Writes the tombstones the lower tiers have queued (blocking I/O: never under the
    /// lock). Called by deletes before they return, and by the demoter for the keys that
    /// puts replaced, so that a restart after a crash brings none of them back.
    pub(super) fn write_tombstones(&self) {
        if !self.tombstones_pending.swap(false, Relaxed) {
            return;
        }
        for l in &self.lower {
            // SAFETY: an empty batch references no caller memory; the store appends only
            // its queued tombstones.
            let _ = unsafe { l.store.write(&[]) };
        }
    }

    /// Looks up each key and leases the ones found, reading from lower tiers if needed.
    /// Blocks on device reads: async callers use [`Engine::begin_get`].
    ///
    /// # Errors
    /// An unknown session, an invalid key, an oversized batch, or a full lease table (then
    /// no lease of this call is kept).
    pub fn get(&self, session: SessionId, keys: &[&[u8]]) -> Result<Vec<Option<Lease>>> {
        let (out, mut loads) = self.start_get(session, keys)?;
        if loads.is_empty() {
            return Ok(out);
        }
        self.read_loads(&mut loads);
        self.publish_loads(session, out, loads)
    }

    /// The first step of a get: leases host hits, and reserves arena extents for the keys a
    /// lower tier holds. Never blocks on I/O.
    ///
    /// # Errors
    /// As [`Engine::get`].
    pub fn begin_get(self: &Arc<Self>, session: SessionId, keys: &[&[u8]]) -> Result<Get> {
        let (out, loads) = self.start_get(session, keys)?;
        if loads.is_empty() {
            return Ok(Get::Ready(out));
        }
        Ok(Get::Pending(PendingGet {
            engine: Arc::clone(self),
            session,
            out,
            loads,
        }))
    }

    fn start_get(
        &self,
        session: SessionId,
        keys: &[&[u8]],
    ) -> Result<(Vec<Option<Lease>>, Vec<Load>)> {
        self.check_keys(keys)?;
        let now = self.now();
        let mut st = self.state.lock();
        st.session(session)?;
        let mut out: Vec<Option<Lease>> = Vec::with_capacity(keys.len());
        let mut loads: Vec<Load> = Vec::new();
        for (slot, k) in keys.iter().enumerate() {
            if let Some(e) = st.find_live(&self.arena, k, now) {
                match st.lease(session, e) {
                    Ok(id) => {
                        st.stats.hits += 1;
                        st.policy.touch(e);
                        out.push(Some(self.lease_of(&st, e, id)));
                        continue;
                    }
                    Err(err) => {
                        for l in out.into_iter().flatten() {
                            st.release_one(l.id);
                        }
                        for l in &loads {
                            st.drop_loading(l.entry);
                        }
                        st.stats.no_space += 1;
                        return Err(err);
                    }
                }
            }
            out.push(None);
            let Some((tier, loc, hash)) = self.locate_lower(&st, k) else {
                st.stats.misses += 1;
                continue;
            };
            if loc.value_len > self.cfg.limits.max_value {
                st.stats.misses += 1;
                continue;
            }
            let total = loc.value_len + k.len() as u64 + u64::from(loc.meta_len);
            match st.make_room(pages_for(total, self.page), now) {
                Ok(extent) => {
                    st.finish_reserve(now);
                    let host_hash = key_hash(k, st.seed);
                    let entry = st.new_loading(host_hash, extent, loc, k.len());
                    loads.push(Load {
                        slot,
                        entry,
                        tier,
                        hash,
                        loc,
                        key: k.to_vec(),
                        metadata: Vec::new(),
                        outcome: ReadOutcome::Pending,
                    });
                }
                Err(_) => {
                    // No room to promote: a miss now; the value stays where it is.
                    st.stats.no_space += 1;
                    st.stats.misses += 1;
                }
            }
        }
        Ok((out, loads))
    }

    /// Reads each load's value into its extent, per tier in one batch, outside the lock.
    fn read_loads(&self, loads: &mut [Load]) {
        let st_page = self.page;
        for (t, lower) in self.lower.iter().enumerate() {
            let (entries, ptrs): (Vec<usize>, Vec<*mut u8>) = {
                let st = self.state.lock();
                loads
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.tier == t)
                    .map(|(i, l)| {
                        let ext = st.entries[l.entry as usize].extent;
                        let off = u64::from(ext.start) * st_page;
                        let len = u64::from(ext.pages) * st_page;
                        (i, self.arena.ptr_at(off as usize, len as usize))
                    })
                    .unzip()
            };
            if entries.is_empty() {
                continue;
            }
            let mut reqs: Vec<ReadReq<'_>> = entries
                .iter()
                .zip(&ptrs)
                .map(|(&i, &dst)| ReadReq {
                    hash: loads[i].hash,
                    key: &loads[i].key,
                    loc: loads[i].loc,
                    dst,
                    metadata: Vec::new(),
                    outcome: ReadOutcome::Pending,
                })
                .collect();
            // SAFETY: each destination is the extent of a `Loading` entry, page-aligned and
            // at least the value rounded up to a page long (pages for value, key and
            // metadata); no index, queue or client knows it until it is published, so
            // nothing else reads or writes it meanwhile.
            unsafe { lower.store.read(&mut reqs) };
            let results: Vec<(ReadOutcome, Vec<u8>)> =
                reqs.into_iter().map(|r| (r.outcome, r.metadata)).collect();
            for (&i, (outcome, meta)) in entries.iter().zip(results) {
                loads[i].outcome = outcome;
                loads[i].metadata = meta;
            }
        }
        // Key and metadata go after the value, as for an entry put by a client.
        for l in loads.iter().filter(|l| l.outcome == ReadOutcome::Hit) {
            let ext = self.state.lock().entries[l.entry as usize].extent;
            let off = (u64::from(ext.start) * self.page + l.loc.value_len) as usize;
            // SAFETY: the extent belongs to the `Loading` entry, as above; key and metadata
            // fit in it (it was sized for value, key and metadata).
            unsafe {
                self.arena.write(off, &l.key);
                self.arena.write(off + l.key.len(), &l.metadata);
            }
        }
    }

    /// The last step of a get: publishes and leases what was read.
    fn publish_loads(
        &self,
        session: SessionId,
        mut out: Vec<Option<Lease>>,
        loads: Vec<Load>,
    ) -> Result<Vec<Option<Lease>>> {
        let now = self.now();
        let unix_now = self.unix_ms(now);
        let mut st = self.state.lock();
        let mut failed = None;
        for l in &loads {
            let lower = &self.lower[l.tier];
            let still_there = self
                .locate_lower(&st, &l.key)
                .is_some_and(|(t, loc, _)| t == l.tier && loc.seq == l.loc.seq);
            let fresh = l.outcome == ReadOutcome::Hit
                && still_there
                && l.metadata.len() == l.loc.meta_len as usize
                && l.loc.expires_unix_ms > unix_now;
            // The key may have been put, or loaded by another call, meanwhile: that entry
            // is newer or the same, and answers.
            let e = match st.find_live(&self.arena, &l.key, now) {
                Some(e) => {
                    st.drop_loading(l.entry);
                    e
                }
                None if fresh => {
                    let expires = self.engine_ms(l.loc.expires_unix_ms, unix_now, now);
                    st.publish_loaded(l.entry, expires, l.tier as u8 + 1);
                    st.stats.promotions += 1;
                    lower.hits.fetch_add(1, Relaxed);
                    l.entry
                }
                None => {
                    st.drop_loading(l.entry);
                    st.stats.misses += 1;
                    continue;
                }
            };
            if failed.is_some() {
                continue;
            }
            match st.lease(session, e) {
                Ok(id) => {
                    st.stats.hits += 1;
                    st.policy.touch(e);
                    out[l.slot] = Some(self.lease_of(&st, e, id));
                }
                Err(err) => failed = Some(err),
            }
        }
        if let Some(err) = failed {
            for l in out.into_iter().flatten() {
                st.release_one(l.id);
            }
            st.stats.no_space += 1;
            return Err(err);
        }
        Ok(out)
    }

    /// Unix time in milliseconds of engine time `now`.
    pub(super) fn unix_ms(&self, now: u64) -> u64 {
        self.unix_epoch_ms + now
    }

    /// Engine expiry time of a Unix expiry time.
    fn engine_ms(&self, unix: u64, unix_now: u64, now: u64) -> u64 {
        if unix == u64::MAX {
            u64::MAX
        } else {
            now + unix.saturating_sub(unix_now)
        }
    }

    /// One round of demotion: when the arena's free share is below the demotion share,
    /// writes the coldest entries that no lower tier holds to the first tier admitting
    /// them (at most `demotion.queue_bytes`). Returns how many were written.
    pub fn demote(&self) -> usize {
        if self.lower.is_empty() {
            return 0;
        }
        let batch = {
            let mut st = self.state.lock();
            let target =
                u64::from(st.arena.pages()) * u64::from(self.cfg.demotion.clean_percent) / 100;
            if u64::from(st.arena.free_pages()) >= target {
                return 0;
            }
            let mut walked = u64::from(st.arena.free_pages());
            let mut picked = Vec::new();
            let mut bytes = 0u64;
            let cold = st.policy.coldest();
            for e in cold {
                if walked >= target || bytes >= self.cfg.demotion.queue_bytes {
                    break;
                }
                let ent = st.entries[e as usize];
                walked += u64::from(ent.extent.pages);
                if ent.state != EntryState::Live || ent.demoting || ent.leases > 0 {
                    continue;
                }
                if ent.lower != 0
                    && self.lower[ent.lower as usize - 1]
                        .store
                        .locate(self.entry_lower_hash(&st, e))
                        .is_some()
                {
                    continue;
                }
                let heat = st.policy.heat(e);
                // The round's first entry goes to the first tier that admits it even if that
                // tier is degraded: the store refuses it quickly or takes it as the probe
                // write that tells it the device is back (one per retry interval).
                let Some(tier) = self.admitting_tier(heat, picked.is_empty()) else {
                    continue;
                };
                bytes += ent.value_len;
                picked.push((e, tier));
            }
            let now = self.now();
            picked
                .into_iter()
                .map(|(e, tier)| self.pin_for_demotion(&mut st, e, tier, now))
                .collect::<Vec<_>>()
        };
        self.write_down(batch)
    }

    /// The first healthy tier whose admission takes an entry of this heat; with `probe`,
    /// the first whose admission takes it, healthy or not.
    fn admitting_tier(&self, heat: u64, probe: bool) -> Option<usize> {
        self.lower.iter().position(|l| {
            (probe || l.store.degraded().is_none()) && (l.admission == Admission::All || heat > 0)
        })
    }

    fn pin_for_demotion(&self, st: &mut State, e: u32, tier: usize, now: u64) -> Demotion {
        st.pin(e);
        let hash = self.entry_lower_hash(st, e);
        let ent = &mut st.entries[e as usize];
        ent.demoting = true;
        Demotion {
            entry: e,
            tier,
            hash,
            host_hash: ent.hash,
            offset: (u64::from(ent.extent.start) * self.page) as usize,
            value_len: ent.value_len,
            key_len: usize::from(ent.key_len),
            meta_len: usize::from(ent.meta_len),
            expires_unix_ms: if ent.expires == u64::MAX {
                u64::MAX
            } else {
                self.unix_ms(ent.expires.min(u64::MAX / 2))
                    .max(self.unix_ms(now))
            },
        }
    }

    /// Writes pinned entries to their tiers (outside the lock), then unpins them and marks
    /// the ones still live as clean.
    fn write_down(&self, batch: Vec<Demotion>) -> usize {
        if batch.is_empty() {
            return 0;
        }
        let mut results: Vec<Option<Location>> = vec![None; batch.len()];
        for (t, lower) in self.lower.iter().enumerate() {
            let idx: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].tier == t).collect();
            if idx.is_empty() {
                continue;
            }
            let reqs: Vec<WriteReq<'_>> = idx
                .iter()
                .map(|&i| {
                    let d = &batch[i];
                    let kv = d.offset + d.value_len as usize;
                    // SAFETY: the entry is pinned for demotion: its extent is neither freed
                    // nor rewritten until unpinned below, and key and metadata were written
                    // before it was published.
                    let (key, metadata) = unsafe {
                        (
                            self.arena.slice(kv, d.key_len),
                            self.arena.slice(kv + d.key_len, d.meta_len),
                        )
                    };
                    WriteReq {
                        hash: d.hash,
                        key,
                        metadata,
                        value: self.arena.ptr_at(d.offset, d.value_len as usize),
                        value_len: d.value_len,
                        expires_unix_ms: d.expires_unix_ms,
                    }
                })
                .collect();
            // SAFETY: each value starts a page-aligned extent at least the value rounded up
            // to a page long, pinned as above: nothing writes it until this returns.
            let written = unsafe { lower.store.write(&reqs) };
            for (&i, r) in idx.iter().zip(written) {
                if let Ok(loc) = r {
                    lower.demotions.fetch_add(1, Relaxed);
                    lower.demoted_bytes.fetch_add(batch[i].value_len, Relaxed);
                    results[i] = Some(loc);
                }
            }
        }
        let mut st = self.state.lock();
        let mut n = 0;
        for (d, r) in batch.iter().zip(results) {
            let ent = &mut st.entries[d.entry as usize];
            ent.demoting = false;
            let live = ent.state == EntryState::Live;
            if let Some(loc) = r {
                if live {
                    ent.lower = d.tier as u8 + 1;
                    n += 1;
                } else {
                    // Deleted or replaced while being written: the copy must not outlive it.
                    let store = &self.lower[d.tier].store;
                    if store.locate(d.hash).is_some_and(|l| l.seq == loc.seq) {
                        store.remove(d.hash);
                    }
                }
            }
            if !live {
                st.demoting_doomed.remove(&d.host_hash);
            }
            st.unpin(d.entry, false);
        }
        st.stats.demotions += n as u64;
        n
    }

    /// Writes every host entry that no lower tier holds, hottest first, until `deadline`;
    /// then flushes the tiers. For a graceful shutdown, so that a restarted agent finds the
    /// host tier's contents in the lower tiers. Returns the entries written.
    pub fn persist(&self, deadline: Instant) -> usize {
        if self.lower.is_empty() {
            return 0;
        }
        let mut order: Vec<(u64, u32)> = {
            let st = self.state.lock();
            (0..st.entries.len() as u32)
                .filter(|&e| {
                    let ent = &st.entries[e as usize];
                    ent.state == EntryState::Live && ent.lower == 0 && !ent.demoting
                })
                .map(|e| (st.policy.heat(e), e))
                .collect()
        };
        order.sort_unstable_by(|a, b| b.cmp(a));
        let mut written = 0;
        for chunk in order.chunks(64) {
            if Instant::now() >= deadline {
                break;
            }
            let batch = {
                let mut st = self.state.lock();
                let now = self.now();
                chunk
                    .iter()
                    .filter_map(|&(heat, e)| {
                        let ent = &st.entries[e as usize];
                        if ent.state != EntryState::Live || ent.lower != 0 || ent.demoting {
                            return None;
                        }
                        // Everything goes down now, whatever the admission rule.
                        let tier = self.admitting_tier(heat.max(1), false)?;
                        Some((e, tier))
                    })
                    .collect::<Vec<_>>()
                    .into_iter()
                    .map(|(e, tier)| self.pin_for_demotion(&mut st, e, tier, now))
                    .collect::<Vec<_>>()
            };
            written += self.write_down(batch);
        }
        self.flush_lower();
        written
    }

    /// Makes the lower tiers durable (tombstones, data, checkpoints). Errors are the
    /// stores' to report (they mark themselves degraded).
    pub fn flush_lower(&self) {
        for l in &self.lower {
            if let Err(e) = l.store.flush() {
                tracing::warn!(tier = l.tier.name(), error = %e, "flushing tier failed");
            }
        }
    }

    /// Runs demotion rounds on this thread until `stop` is set: a round whenever the arena
    /// is short of clean entries, else a wait of `idle` (or until woken by a commit).
    pub fn run_demoter(&self, stop: &std::sync::atomic::AtomicBool, idle: Duration) {
        while !stop.load(Relaxed) {
            self.write_tombstones();
            if self.demote() == 0 {
                // Nothing to write: wait for a commit to wake us, but not more often than
                // every few milliseconds, so that a full arena of clean entries does not
                // cost a walk of its cold end per commit.
                std::thread::sleep(DEMOTER_SPACING.min(idle));
                let mut woken = self.demote_wake.0.lock();
                if !*woken && !stop.load(Relaxed) {
                    self.demote_wake.1.wait_for(&mut woken, idle);
                }
                *woken = false;
            }
        }
    }

    /// Wakes the demoter: after commits when the arena is short of free pages, and to
    /// make it see its stop flag.
    pub fn wake_demoter(&self) {
        let mut woken = self.demote_wake.0.lock();
        *woken = true;
        self.demote_wake.1.notify_one();
    }
}

impl State {
    /// A new `Loading` entry owning `extent`, for a value `loc` describes.
    fn new_loading(
        &mut self,
        hash: u128,
        extent: crate::alloc::Extent,
        loc: Location,
        key_len: usize,
    ) -> u32 {
        self.new_entry(
            hash,
            extent,
            loc.value_len,
            (key_len, loc.meta_len as usize),
            u64::MAX,
            EntryState::Loading,
        )
    }

    /// Frees a `Loading` entry whose read failed or lost.
    fn drop_loading(&mut self, e: u32) {
        debug_assert_eq!(self.entries[e as usize].state, EntryState::Loading);
        self.drop_entry(e);
    }

    /// Publishes a loaded entry, clean (tier `lower`, 1-based, holds it).
    fn publish_loaded(&mut self, e: u32, expires: u64, lower: u8) {
        let ent = &mut self.entries[e as usize];
        ent.state = EntryState::Live;
        ent.expires = expires;
        ent.lower = lower;
        let (hash, pages) = (ent.hash, ent.extent.pages);
        self.evictable_pages += u64::from(pages);
        let displaced = self.index.insert(hash, e);
        debug_assert!(displaced.is_none(), "checked absent under the same lock");
        self.policy.insert(e, hash, u64::from(pages) * self.page);
    }
}

/// Refuses an engine configuration whose tiers cannot open. Used by [`Engine::new`].
pub(super) fn open_tiers(cfg: &crate::config::EngineConfig) -> Result<Vec<Lower>> {
    let mut out = Vec::with_capacity(cfg.tiers.len());
    for t in &cfg.tiers {
        // The tier's directory (the default one lives in a data directory that may not
        // exist yet): created private to the agent's user.
        let dir = match t.tier {
            Tier::Disk => Some(t.store.path.as_path()),
            _ => t.store.path.parent(),
        };
        if let Some(dir) = dir.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| EngineError::TierOpen {
                    tier: t.tier.name(),
                    reason: format!("creating {}: {e}", dir.display()),
                })?;
        }
        let (store, rec) = open_store(t).map_err(|e| EngineError::TierOpen {
            tier: t.tier.name(),
            reason: e.to_string(),
        })?;
        tracing::info!(
            tier = t.tier.name(),
            path = %t.store.path.display(),
            io_engine = store.io_engine(),
            entries = rec.entries,
            scanned_bytes = rec.scanned_bytes,
            from_checkpoint = rec.from_checkpoint,
            skipped = rec.skipped,
            recovery_ms = rec.elapsed.as_millis() as u64,
            reset = rec.reset.as_deref().unwrap_or(""),
            "lower tier opened"
        );
        out.push(Lower::new(t.tier, t.admission, Box::new(store)));
    }
    Ok(out)
}

/// How long opening a store waits for a previous holder of its lock to go away.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Opens a tier's store. A store still locked is waited for a while: an agent killed with
/// SIGKILL releases its lock only when the kernel has torn down its io_uring rings, which
/// finishes after the process is gone, so a restart can find the lock still held for a
/// moment.
fn open_store(
    t: &crate::config::TierConfig,
) -> Result<(LogStore, nencache_store::Recovery), StoreError> {
    let start = Instant::now();
    let mut said = false;
    loop {
        match LogStore::open(t.store.clone()) {
            Err(StoreError::Locked { .. }) if start.elapsed() < LOCK_WAIT => {
                if !said {
                    tracing::info!(
                        tier = t.tier.name(),
                        path = %t.store.path.display(),
                        "tier locked by another process; waiting for it to go away"
                    );
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}
