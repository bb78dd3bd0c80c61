//! The host-memory tier (T1): a shared arena of committed values, a staging area that
//! clients write puts into, and the bookkeeping that ties them together: index, eviction,
//! placement, reservations, leases, sessions and their quotas.
//!
//! All bookkeeping lives in one `State` behind a mutex, which is only held for table
//! updates; bulk copies (staging to arena at commit) run outside it on extents the caller
//! exclusively owns. What a client sends is checked before the lock is taken (batch sizes,
//! keys, duplicate ids), and what a call does under the lock is bounded by what it asks for
//! or holds: a session's leases and reservations are intrusive lists, so closing it walks
//! only those; reservations are also listed in creation order, which is deadline order (the
//! timeout is one constant), so the reaper walks only the expired ones.
//!
//! Placement: a reserve takes a free extent if one is long enough. Otherwise, if the free
//! pages and the pages of unleased entries together cannot hold the value, it is refused at
//! once. Else entries are evicted in policy order until about the requested size has been
//! freed, checking after each whether a long enough extent has formed. If none has (leased
//! entries scattered through the arena cut the freed pages into short runs), those evictions
//! are undone, and the arena is walked in address order, extent by extent, for the window of
//! free extents and unleased entries that is long enough and cheapest: evicted bytes weighted
//! by how often the entries were read, so cold entries go first. Exactly that window is
//! evicted. None means the value cannot fit: refused. Either way one reserve evicts less than
//! its own size plus one extent.
//!
//! Victims of a reserve call stay recoverable until the call succeeds: their extents go back
//! to the allocator but their bytes, entry slots and queue positions are kept, and key and
//! metadata of the new entries are written only once every item is placed. A refused reserve
//! (no space, a quota, a full table) undoes its reservations and victims in reverse order,
//! leaving the cache as it was.

use std::{
    collections::{HashSet, hash_map::RandomState},
    hash::BuildHasher,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use std::sync::atomic::AtomicBool;

use parking_lot::{Condvar, Mutex};

mod host;
mod lower;
mod sessions;

use host::{Entry, EntryState, NO_ENTRY, pages_for};
use sessions::{LeaseRec, Reservation, Session};

pub use crate::config::{
    Admission, DemotionConfig, EngineConfig, EvictionPolicy, HostConfig, Limits, MAX_METADATA_LEN,
    Tier, TierConfig,
};
use crate::{
    alloc::{Extent, ExtentAllocator},
    error::{EngineError, Result},
    index::RobinHoodIndex,
    key::{checksum, validate_key},
    policy::Policy,
    shm::SharedRegion,
    slab::{self, NIL, Slab},
};
pub use lower::{Get, LowerTier, PendingGet, TierStats, lower_hash};

/// Identifies a client session: the low 32 bits index a table, the high 32 bits are random.
pub type SessionId = u64;

/// One item of a batched reserve.
#[derive(Debug, Clone, Copy)]
pub struct PutItem<'a> {
    /// The key.
    pub key: &'a [u8],
    /// Length of the value the client will write.
    pub value_len: u64,
    /// Opaque metadata stored with the value.
    pub metadata: &'a [u8],
    /// Time to live; `None` takes the configured default.
    pub ttl: Option<Duration>,
    /// Replace an existing entry instead of reporting it.
    pub overwrite: bool,
}

/// Result of reserving one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// Space was reserved: write the value at `staging_offset` in the staging area, then
    /// commit `id`.
    Space {
        /// Reservation id.
        id: u64,
        /// Byte offset of the value in the staging area.
        staging_offset: u64,
    },
    /// The key is already cached and `overwrite` was not set: nothing to write.
    Exists,
}

/// Result of committing one reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The entry is published.
    Done,
    /// The bytes did not match the checksum the client sent; the reservation was aborted.
    ChecksumMismatch,
}

/// A granted lease on a committed value. Offset and length are for the client's reading;
/// the engine goes by the lease id alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Lease id, to release.
    pub id: u64,
    /// Byte offset of the value in the arena.
    pub offset: u64,
    /// Value length in bytes.
    pub len: u64,
    /// The metadata stored with the value.
    pub metadata: Vec<u8>,
    /// Tier the value is read from: always host memory (a value found in a lower tier is
    /// read into the arena first; `Stats::promotions` counts those).
    pub tier: Tier,
}

/// Result of a batched lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// How many leading keys are cached.
    pub prefix: usize,
    /// The tier of each of those.
    pub tiers: Vec<Tier>,
}

/// Counters and gauges of the host tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Arena size in bytes.
    pub capacity_bytes: u64,
    /// Arena bytes held by entries (committed or reserved), rounded to pages.
    pub used_bytes: u64,
    /// Staging area size in bytes.
    pub staging_bytes: u64,
    /// Staging bytes held by reservations.
    pub staging_used_bytes: u64,
    /// Committed entries.
    pub entries: u64,
    /// Keys found by `get`.
    pub hits: u64,
    /// Keys not found by `get`.
    pub misses: u64,
    /// Keys asked about by `lookup`.
    pub lookup_keys: u64,
    /// Keys `lookup` found in the leading prefix.
    pub lookup_hits: u64,
    /// Entries published by commit.
    pub commits: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Entries dropped because their TTL passed.
    pub expirations: u64,
    /// Entries removed by delete.
    pub deletes: u64,
    /// Reservations aborted by the client.
    pub aborts: u64,
    /// Reservations reclaimed because their session closed or they timed out.
    pub reclaimed_reservations: u64,
    /// Leases released because their session closed.
    pub reclaimed_leases: u64,
    /// Commits rejected by checksum.
    pub checksum_failures: u64,
    /// Reserves or gets refused for lack of space.
    pub no_space: u64,
    /// Leases held now.
    pub leases: u64,
    /// Reservations in flight now.
    pub reservations: u64,
    /// Sessions open now.
    pub sessions: u64,
    /// Values read from a lower tier into host memory by a get.
    pub promotions: u64,
    /// Entries written to a lower tier ahead of eviction or at shutdown.
    pub demotions: u64,
    /// Entries evicted from host memory that no lower tier held (with lower tiers only).
    pub evictions_unsaved: u64,
}

struct State {
    cfg: EngineConfig,
    page: u64,
    /// Seed of the index hash, drawn when the engine starts.
    seed: u64,
    arena: ExtentAllocator,
    staging: ExtentAllocator,
    index: RobinHoodIndex,
    entries: Vec<Entry>,
    /// The entry of each allocated arena extent, at its first page.
    owner: Vec<u32>,
    free_entry: u32,
    /// Pages of live entries without a lease: what eviction could free.
    evictable_pages: u64,
    /// Where the next window search starts: the end of the last window evicted, so that
    /// successive searches sweep the arena like a clock hand instead of rescanning it.
    window_cursor: u32,
    /// Undo stack of the reserve call in progress (its victims and the entries of its
    /// reservations, newest on top), linked through `Entry::link`.
    undo: u32,
    undo_len: u32,
    policy: Policy,
    reservations: Slab<Reservation>,
    oldest_res: u32,
    newest_res: u32,
    leases: Slab<LeaseRec>,
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<u32>,
    staging_quota_pages: u64,
    stats: Stats,
    random: RandomState,
    session_counter: u64,
    /// Whether lower tiers exist (an eviction of an entry none holds is then counted).
    has_lower: bool,
    /// Hashes of entries deleted or replaced while being demoted: their copy in a lower
    /// tier is stale until the demotion finishes and removes it.
    demoting_doomed: HashSet<u128>,
}

/// The cache: the host tier (arena, staging area, their bookkeeping), the session tables,
/// and the lower tiers. Shared by all sessions.
pub struct Engine {
    arena: SharedRegion,
    staging: SharedRegion,
    page: u64,
    epoch: Instant,
    /// Unix time in milliseconds at `epoch` (lower tiers store Unix expiry times).
    unix_epoch_ms: u64,
    /// Lower tiers, fastest first; chosen once from configuration.
    lower: Vec<lower::Lower>,
    /// Wakes the demoter.
    demote_wake: (Mutex<bool>, Condvar),
    /// Some lower tier has tombstones queued (a put or delete removed a key from it).
    tombstones_pending: AtomicBool,
    /// The configuration, also readable without the lock.
    cfg: EngineConfig,
    state: Mutex<State>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("arena", &self.arena.len())
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Creates the arena and staging area and the tables sized for them.
    ///
    /// # Errors
    /// An invalid configuration, or shared memory that cannot be created.
    pub fn new(cfg: EngineConfig) -> Result<Self> {
        Self::build(cfg, None)
    }

    /// As [`Engine::new`], with the lower tiers' stores given instead of opened from
    /// `cfg.tiers` (one per entry, in the same order; the entries still give each tier's
    /// kind and admission): stores opened another way, e.g. over a fault-injecting device.
    ///
    /// # Errors
    /// As [`Engine::new`], or a count of stores that does not match `cfg.tiers`.
    pub fn with_stores(cfg: EngineConfig, stores: Vec<Box<dyn LowerTier>>) -> Result<Self> {
        if stores.len() != cfg.tiers.len() {
            return Err(EngineError::Config(format!(
                "{} stores given for {} tiers",
                stores.len(),
                cfg.tiers.len()
            )));
        }
        Self::build(cfg, Some(stores))
    }

    fn build(cfg: EngineConfig, stores: Option<Vec<Box<dyn LowerTier>>>) -> Result<Self> {
        cfg.validate()?;
        let page = u64::from(cfg.host.page_size);
        let arena_pages = (cfg.host.capacity / page) as u32;
        let staging_pages = (cfg.host.staging / page) as u32;
        let arena = SharedRegion::create_read_only(
            "nencache-arena",
            (u64::from(arena_pages) * page) as usize,
            cfg.host.lock_memory,
        )?;
        let staging = SharedRegion::create(
            "nencache-staging",
            (u64::from(staging_pages) * page) as usize,
            cfg.host.lock_memory,
        )?;
        // One entry per arena page (each entry holds at least one), and one per item of the
        // reserve call in progress, whose victims keep their entries until it ends.
        let slots = arena_pages + cfg.limits.max_batch as u32;
        let entries = (0..slots)
            .map(|i| Entry {
                hash: 0,
                extent: Extent { start: 0, pages: 0 },
                value_len: 0,
                expires: u64::MAX,
                key_len: 0,
                meta_len: 0,
                state: EntryState::Free,
                leases: 0,
                link: if i + 1 < slots { i + 1 } else { NO_ENTRY },
                run: 0,
                lower: 0,
                demoting: false,
            })
            .collect();
        let random = RandomState::new();
        let mut state = State {
            page,
            seed: random.hash_one("nencache index seed"),
            arena: ExtentAllocator::new(arena_pages),
            staging: ExtentAllocator::new(staging_pages),
            index: RobinHoodIndex::with_capacity(arena_pages as usize),
            entries,
            owner: vec![NO_ENTRY; arena_pages as usize],
            free_entry: 0,
            evictable_pages: 0,
            window_cursor: 0,
            undo: NO_ENTRY,
            undo_len: 0,
            policy: Policy::new(
                cfg.host.policy,
                slots,
                arena_pages,
                u64::from(arena_pages) * page,
                cfg.host.small_queue_percent,
            ),
            reservations: Slab::with_capacity(cfg.limits.max_reservations),
            oldest_res: NIL,
            newest_res: NIL,
            leases: Slab::with_capacity(cfg.limits.max_leases),
            sessions: vec![None; cfg.limits.max_sessions as usize],
            free_sessions: (0..cfg.limits.max_sessions).rev().collect(),
            staging_quota_pages: cfg.staging_per_session().div_ceil(page),
            stats: Stats {
                capacity_bytes: arena.len() as u64,
                staging_bytes: staging.len() as u64,
                ..Stats::default()
            },
            random,
            session_counter: 0,
            has_lower: false,
            demoting_doomed: HashSet::new(),
            cfg: cfg.clone(),
        };
        let lower = match stores {
            None => lower::open_tiers(&cfg)?,
            Some(stores) => cfg
                .tiers
                .iter()
                .zip(stores)
                .map(|(t, store)| lower::Lower::new(t.tier, t.admission, store))
                .collect(),
        };
        state.has_lower = !lower.is_empty();
        let epoch = Instant::now();
        let unix_epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Ok(Self {
            arena,
            staging,
            page,
            epoch,
            unix_epoch_ms,
            lower,
            demote_wake: (Mutex::new(false), Condvar::new()),
            tombstones_pending: AtomicBool::new(false),
            cfg,
            state: Mutex::new(state),
        })
    }

    /// The arena (committed values; clients map it read-only).
    #[must_use]
    pub fn arena(&self) -> &SharedRegion {
        &self.arena
    }

    /// The staging area (puts in flight; clients map it read-write).
    #[must_use]
    pub fn staging(&self) -> &SharedRegion {
        &self.staging
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> EngineConfig {
        self.cfg.clone()
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn check_batch(&self, len: usize) -> Result<()> {
        if len > self.cfg.limits.max_batch {
            return Err(EngineError::BatchTooLarge {
                len,
                max: self.cfg.limits.max_batch,
            });
        }
        Ok(())
    }

    fn check_keys(&self, keys: &[&[u8]]) -> Result<()> {
        self.check_batch(keys.len())?;
        keys.iter().try_for_each(|k| validate_key(k))
    }

    /// Opens a session. Leases and reservations belong to a session and are reclaimed when it
    /// closes.
    ///
    /// # Errors
    /// [`EngineError::NoSpace`] when the session table is full.
    pub fn open_session(&self) -> Result<SessionId> {
        let mut st = self.state.lock();
        let Some(idx) = st.free_sessions.pop() else {
            return Err(EngineError::NoSpace {
                what: "session table",
            });
        };
        st.session_counter += 1;
        let nonce = (st.random.hash_one(st.session_counter) as u32) | 1;
        st.sessions[idx as usize] = Some(Session {
            nonce,
            leases: 0,
            reservations: 0,
            staging_pages: 0,
            lease_head: NIL,
            res_head: NIL,
        });
        st.stats.sessions += 1;
        Ok(u64::from(nonce) << 32 | u64::from(idx))
    }

    /// Closes a session: releases its leases and aborts its reservations (a reservation
    /// being committed finishes; its commit removes it). Returns how many of each were
    /// reclaimed. Costs what the session holds.
    ///
    /// # Errors
    /// [`EngineError::UnknownSession`].
    pub fn close_session(&self, session: SessionId) -> Result<(usize, usize)> {
        let mut st = self.state.lock();
        let s = st.session(session)?;
        let (mut leases, mut res) = (0, 0);
        let mut l = s.lease_head;
        while l != NIL {
            let next = st.leases.at(l).next;
            let id = st.leases.id_at(l);
            st.release_one(id);
            leases += 1;
            l = next;
        }
        let mut r = s.res_head;
        while r != NIL {
            let (next, committing) = {
                let x = st.reservations.at(r);
                (x.s_next, x.committing)
            };
            if !committing {
                let id = st.reservations.id_at(r);
                st.abort_one(id);
                res += 1;
            }
            r = next;
        }
        let idx = slab::index(session);
        st.sessions[idx as usize] = None;
        // Never exceeds the capacity reserved at construction.
        st.free_sessions.push(idx);
        st.stats.sessions -= 1;
        st.stats.reclaimed_leases += leases as u64;
        st.stats.reclaimed_reservations += res as u64;
        Ok((leases, res))
    }

    /// Aborts reservations older than the reservation timeout. Returns how many. Walks only
    /// the expired ones (and those past their deadline but being committed).
    pub fn reap_expired_reservations(&self) -> usize {
        let now = self.now();
        let mut st = self.state.lock();
        let mut n = 0;
        let mut r = st.oldest_res;
        while r != NIL {
            let (next, deadline, committing) = {
                let x = st.reservations.at(r);
                (x.f_next, x.deadline, x.committing)
            };
            if deadline > now {
                break;
            }
            if !committing {
                let id = st.reservations.id_at(r);
                st.abort_one(id);
                n += 1;
            }
            r = next;
        }
        st.stats.reclaimed_reservations += n as u64;
        n
    }

    /// How many leading `keys` are cached, and where.
    ///
    /// # Errors
    /// An invalid key or an oversized batch.
    pub fn lookup(&self, keys: &[&[u8]]) -> Result<Lookup> {
        self.check_keys(keys)?;
        let now = self.now();
        let mut st = self.state.lock();
        let mut tiers = Vec::with_capacity(keys.len());
        for k in keys {
            let tier = if st.find_live(&self.arena, k, now).is_some() {
                Tier::Host
            } else {
                match self.locate_lower(&st, k) {
                    Some((i, ..)) => self.lower[i].tier,
                    None => break,
                }
            };
            tiers.push(tier);
        }
        let prefix = tiers.len();
        st.stats.lookup_keys += keys.len() as u64;
        st.stats.lookup_hits += prefix as u64;
        Ok(Lookup { prefix, tiers })
    }

    /// Reserves space for a batch of puts, all or nothing: a refused batch reserves nothing
    /// and evicts nothing.
    ///
    /// # Errors
    /// An invalid item, an unknown session, a per-session quota (reservations, staging
    /// bytes), a full table or staging area, or no room in the arena for some item even
    /// after eviction.
    pub fn reserve(&self, session: SessionId, items: &[PutItem<'_>]) -> Result<Vec<Reserved>> {
        self.check_batch(items.len())?;
        for it in items {
            validate_key(it.key)?;
            if it.value_len > self.cfg.limits.max_value {
                return Err(EngineError::ValueTooLarge {
                    len: it.value_len,
                    max: self.cfg.limits.max_value,
                });
            }
            if it.metadata.len() > MAX_METADATA_LEN {
                return Err(EngineError::MetadataTooLarge {
                    len: it.metadata.len(),
                    max: MAX_METADATA_LEN,
                });
            }
        }
        // A key given twice in one call is put once: a later item finds it as a separate put
        // would (unless it overwrites). Found before the lock is taken.
        let mut repeated = vec![false; items.len()];
        if items.len() > 1 {
            let mut seen = std::collections::HashSet::with_capacity(items.len());
            for (i, it) in items.iter().enumerate() {
                repeated[i] = !seen.insert(it.key);
            }
        }
        let now = self.now();
        let mut st = self.state.lock();
        st.session(session)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, it) in items.iter().enumerate() {
            if !it.overwrite
                && (repeated[i]
                    || st.find_live(&self.arena, it.key, now).is_some()
                    || self.locate_lower(&st, it.key).is_some())
            {
                out.push(Reserved::Exists);
                continue;
            }
            match st.reserve_one(session, it, now) {
                Ok(r) => out.push(r),
                Err(e) => {
                    st.undo_reserve(&out);
                    if matches!(e, EngineError::NoSpace { .. }) {
                        st.stats.no_space += 1;
                    }
                    return Err(e);
                }
            }
        }
        st.finish_reserve(now);
        // Victims' bytes are no longer needed: the new entries' keys and metadata can go in.
        for (it, r) in items.iter().zip(&out) {
            if let Reserved::Space { id, .. } = *r
                && let Some(res) = st.reservations.get(id)
            {
                let ext = st.entries[res.entry as usize].extent;
                let off = (u64::from(ext.start) * self.page + it.value_len) as usize;
                // SAFETY: the extent was just allocated to this reservation; nothing else
                // refers to it and no client can commit it before this call returns.
                unsafe {
                    self.arena.write(off, it.key);
                    self.arena.write(off + it.key.len(), it.metadata);
                }
            }
        }
        Ok(out)
    }

    /// Publishes reserved entries: copies each value from staging into the arena (outside
    /// the lock), verifies its XXH3-64 checksum when one is given, and indexes it.
    ///
    /// # Errors
    /// An unknown session, or an id that is unknown, foreign, duplicated or already being
    /// committed; then nothing is committed.
    pub fn commit(
        &self,
        session: SessionId,
        items: &[(u64, Option<u64>)],
    ) -> Result<Vec<Committed>> {
        self.check_batch(items.len())?;
        let plan = {
            let mut st = self.state.lock();
            st.session(session)?;
            let mut plan: Vec<(u64, u64, u64, u64)> = Vec::with_capacity(items.len());
            for (i, &(id, _)) in items.iter().enumerate() {
                let checked = match st.reservations.get(id) {
                    Some(r) if r.session != session => Err(EngineError::UnknownReservation(id)),
                    Some(r) if r.committing => {
                        if items[..i].iter().any(|&(x, _)| x == id) {
                            Err(EngineError::DuplicateId(id))
                        } else {
                            Err(EngineError::CommitInProgress(id))
                        }
                    }
                    Some(r) => Ok((r.staging.start, r.entry)),
                    None => Err(EngineError::UnknownReservation(id)),
                };
                let (staging_page, entry) = match checked {
                    Ok(x) => x,
                    Err(e) => {
                        for &(id, ..) in &plan {
                            if let Some(r) = st.reservations.get_mut(id) {
                                r.committing = false;
                            }
                        }
                        return Err(e);
                    }
                };
                let e = &st.entries[entry as usize];
                let copy = (
                    id,
                    u64::from(staging_page) * self.page,
                    u64::from(e.extent.start) * self.page,
                    e.value_len,
                );
                if let Some(r) = st.reservations.get_mut(id) {
                    r.committing = true;
                }
                plan.push(copy);
            }
            plan
        };
        let mut ok = Vec::with_capacity(plan.len());
        for (&(_, src, dst, len), &(_, sum)) in plan.iter().zip(items) {
            // SAFETY: the arena extent belongs to a reservation marked `committing`, which no
            // other call frees or hands out until the publish step below; the staging bytes
            // are the client's, and are verified when the client sent a checksum.
            unsafe {
                self.arena
                    .copy_from(dst as usize, &self.staging, src as usize, len as usize)
            };
            let good = sum.is_none_or(|s| {
                // SAFETY: as above, the destination extent is owned by this commit.
                checksum(unsafe { self.arena.slice(dst as usize, len as usize) }) == s
            });
            ok.push(good);
        }
        let now = self.now();
        let mut st = self.state.lock();
        let mut out = Vec::with_capacity(plan.len());
        for (&(id, ..), good) in plan.iter().zip(ok) {
            if good {
                if let Some(e) = st.publish(id, now) {
                    // An older copy in a lower tier must not come back.
                    self.remove_lower_entry(&st, e);
                }
                out.push(Committed::Done);
            } else {
                st.abort_one(id);
                st.stats.checksum_failures += 1;
                out.push(Committed::ChecksumMismatch);
            }
        }
        if !self.lower.is_empty() {
            let target =
                u64::from(st.arena.pages()) * u64::from(self.cfg.demotion.clean_percent) / 100;
            let short = u64::from(st.arena.free_pages()) < target;
            drop(st);
            // A commit that replaced a key held below is durable when it returns: the old
            // copy's tombstone goes to the device now (outside the lock), or a crash right
            // after would bring the old value back.
            self.write_tombstones();
            if short {
                self.wake_demoter();
            }
        }
        Ok(out)
    }

    /// Aborts reservations, all or nothing.
    ///
    /// # Errors
    /// An unknown session, or an id that is unknown, foreign, listed twice or being
    /// committed.
    pub fn abort(&self, session: SessionId, ids: &[u64]) -> Result<()> {
        self.check_batch(ids.len())?;
        check_unique(ids)?;
        let mut st = self.state.lock();
        st.session(session)?;
        for &id in ids {
            match st.reservations.get(id) {
                Some(r) if r.session == session && !r.committing => {}
                Some(r) if r.session == session => return Err(EngineError::CommitInProgress(id)),
                _ => return Err(EngineError::UnknownReservation(id)),
            }
        }
        for &id in ids {
            st.abort_one(id);
        }
        st.stats.aborts += ids.len() as u64;
        Ok(())
    }

    /// Releases leases, all or nothing. The list is checked (length, duplicates) before the
    /// lock is taken.
    ///
    /// # Errors
    /// An unknown session, more ids than `max_batch`, or a lease that is unknown, foreign or
    /// listed twice.
    pub fn release(&self, session: SessionId, ids: &[u64]) -> Result<()> {
        self.check_batch(ids.len())?;
        check_unique(ids)?;
        let mut st = self.state.lock();
        st.session(session)?;
        for &id in ids {
            if st.leases.get(id).is_none_or(|l| l.session != session) {
                return Err(EngineError::UnknownLease(id));
            }
        }
        for &id in ids {
            st.release_one(id);
        }
        Ok(())
    }

    /// Deletes keys; returns how many existed. A leased value stays readable by its
    /// holders until released.
    ///
    /// # Errors
    /// An invalid key or an oversized batch.
    pub fn delete(&self, keys: &[&[u8]]) -> Result<usize> {
        self.check_keys(keys)?;
        let now = self.now();
        let mut st = self.state.lock();
        let mut n = 0;
        for k in keys {
            let mut found = false;
            if let Some(e) = st.find_live(&self.arena, k, now) {
                st.policy.remove(e);
                st.unpublish(e);
                found = true;
            }
            if !self.lower.is_empty() {
                found |= self.remove_lower(lower::lower_hash(k));
            }
            if found {
                st.stats.deletes += 1;
                n += 1;
            }
        }
        drop(st);
        // A delete is durable when it returns: the tombstones go to the device now, outside
        // the lock.
        self.write_tombstones();
        Ok(n)
    }

    /// Changes what a reservation will publish before it is committed: its time to live
    /// (`Some`: this one instead of the one reserved with) and its metadata (no longer than
    /// the metadata it was reserved with). For transports that learn them after the value: a
    /// Redis `SET`'s options follow its value, and LMCache's Redis layout sends a chunk's
    /// description after its bytes.
    ///
    /// # Errors
    /// An unknown session; an unknown, foreign or committing reservation; metadata longer
    /// than reserved.
    pub fn amend_reservation(
        &self,
        session: SessionId,
        id: u64,
        ttl: Option<Duration>,
        metadata: Option<&[u8]>,
    ) -> Result<()> {
        let mut st = self.state.lock();
        st.session(session)?;
        let entry = match st.reservations.get(id) {
            Some(r) if r.session == session && !r.committing => r.entry,
            Some(r) if r.committing => return Err(EngineError::CommitInProgress(id)),
            _ => return Err(EngineError::UnknownReservation(id)),
        };
        let ent = st.entries[entry as usize];
        if let Some(m) = metadata {
            if m.len() > usize::from(ent.meta_len) {
                return Err(EngineError::MetadataTooLarge {
                    len: m.len(),
                    max: usize::from(ent.meta_len),
                });
            }
            let off = (u64::from(ent.extent.start) * self.page + ent.value_len) as usize
                + usize::from(ent.key_len);
            // SAFETY: the extent belongs to this reservation, which is not being committed
            // (checked under the lock held here), so nothing reads or writes it meanwhile.
            unsafe { self.arena.write(off, m) };
            st.entries[entry as usize].meta_len = m.len() as u16;
        }
        if let Some(t) = ttl {
            st.entries[entry as usize].expires = t.as_millis() as u64;
        }
        Ok(())
    }

    /// Sets the time to live of a key held in host memory (`None`: it never expires).
    /// A copy in a lower tier, which keeps the expiry it was written with, is dropped, so
    /// that the entry is written down again with the new one. Answers whether the key was
    /// in host memory (read it first to bring it up from a lower tier).
    ///
    /// # Errors
    /// An invalid key.
    pub fn set_ttl(&self, key: &[u8], ttl: Option<Duration>) -> Result<bool> {
        validate_key(key)?;
        let now = self.now();
        let mut st = self.state.lock();
        let Some(e) = st.find_live(&self.arena, key, now) else {
            return Ok(false);
        };
        st.entries[e as usize].expires =
            ttl.map_or(u64::MAX, |t| now.saturating_add(t.as_millis() as u64));
        if st.entries[e as usize].lower != 0 {
            self.remove_lower_entry(&st, e);
            st.entries[e as usize].lower = 0;
        }
        // An entry being written down right now gets its copy with the old expiry; that copy
        // is read back only after this one is evicted, a window this leaves open.
        drop(st);
        self.write_tombstones();
        Ok(true)
    }

    /// The time left to a key held in host memory: `None` when it is not there (it may be
    /// in a lower tier), `Some(None)` when it never expires.
    ///
    /// # Errors
    /// An invalid key.
    pub fn ttl(&self, key: &[u8]) -> Result<Option<Option<Duration>>> {
        validate_key(key)?;
        let now = self.now();
        let mut st = self.state.lock();
        Ok(st.find_live(&self.arena, key, now).map(|e| {
            let exp = st.entries[e as usize].expires;
            (exp != u64::MAX).then(|| Duration::from_millis(exp.saturating_sub(now)))
        }))
    }

    /// One step of a walk over the keys held in host memory (live, unexpired entries):
    /// from `cursor` (0 to start), at most `count` live entries of the entry table are
    /// visited (free slots are skipped without limit) and the keys among them that `keep`
    /// accepts are answered, with the cursor of the next step: the slot of the next live
    /// entry, or 0 when there is none. An entry present for the whole walk is answered once;
    /// one put or deleted meanwhile may be or not. Keys of lower tiers are not walked.
    pub fn scan_host(
        &self,
        cursor: u64,
        count: usize,
        mut keep: impl FnMut(&[u8]) -> bool,
    ) -> (Vec<Vec<u8>>, u64) {
        let now = self.now();
        let st = self.state.lock();
        let len = st.entries.len();
        let mut i = usize::try_from(cursor).unwrap_or(usize::MAX).min(len);
        let (mut keys, mut visited) = (Vec::new(), 0);
        while i < len {
            let ent = &st.entries[i];
            if matches!(ent.state, EntryState::Live) && ent.expires > now {
                if visited == count.max(1) {
                    break;
                }
                visited += 1;
                let off = (u64::from(ent.extent.start) * self.page + ent.value_len) as usize;
                // SAFETY: a live entry's key bytes were written at reserve and are not
                // rewritten while it is indexed, which the lock held here keeps.
                let key = unsafe { self.arena.slice(off, usize::from(ent.key_len)) };
                if keep(key) {
                    keys.push(key.to_vec());
                }
            }
            i += 1;
        }
        (keys, if i >= len { 0 } else { i as u64 })
    }

    /// The lease record handed out for entry `e` under lease `id`.
    fn lease_of(&self, st: &State, e: u32, id: u64) -> Lease {
        let ent = st.entries[e as usize];
        let off = u64::from(ent.extent.start) * self.page;
        let meta_off = (off + ent.value_len) as usize + usize::from(ent.key_len);
        // SAFETY: the entry is live and leased: its extent is not rewritten.
        let meta = unsafe { self.arena.slice(meta_off, usize::from(ent.meta_len)) };
        Lease {
            id,
            offset: off,
            len: ent.value_len,
            metadata: meta.to_vec(),
            tier: Tier::Host,
        }
    }

    /// Current counters.
    #[must_use]
    pub fn stats(&self) -> Stats {
        let st = self.state.lock();
        let mut s = st.stats;
        s.used_bytes = u64::from(st.arena.pages() - st.arena.free_pages()) * self.page;
        s.staging_used_bytes = u64::from(st.staging.pages() - st.staging.free_pages()) * self.page;
        s.entries = st.index.len() as u64;
        s.leases = st.leases.len() as u64;
        s.reservations = st.reservations.len() as u64;
        s
    }

    /// Copies a leased value out of the arena (for in-process callers and tests; clients
    /// read their own mapping instead). Offset and length come from the lease record, not
    /// from `lease`, of which only the id is used.
    ///
    /// # Errors
    /// [`EngineError::UnknownLease`] when `lease` is not held by `session`.
    pub fn read_leased(&self, session: SessionId, lease: &Lease) -> Result<Vec<u8>> {
        let st = self.state.lock();
        let Some(rec) = st.leases.get(lease.id).filter(|l| l.session == session) else {
            return Err(EngineError::UnknownLease(lease.id));
        };
        let ent = &st.entries[rec.entry as usize];
        let off = u64::from(ent.extent.start) * self.page;
        // SAFETY: the lease is held, so the extent is not rewritten while we copy.
        Ok(unsafe { self.arena.slice(off as usize, ent.value_len as usize) }.to_vec())
    }

    /// Puts a value from this process: reserve, write into staging, commit. Returns `false`
    /// when the key already existed (and `overwrite` was not set).
    ///
    /// # Errors
    /// As [`Engine::reserve`] and [`Engine::commit`].
    pub fn put_local(&self, session: SessionId, item: PutItem<'_>, value: &[u8]) -> Result<bool> {
        let item = PutItem {
            value_len: value.len() as u64,
            ..item
        };
        match self.reserve(session, &[item])?[0] {
            Reserved::Exists => Ok(false),
            Reserved::Space { id, staging_offset } => {
                // SAFETY: the staging extent was just reserved for this call.
                unsafe { self.staging.write(staging_offset as usize, value) };
                self.commit(session, &[(id, None)])?;
                Ok(true)
            }
        }
    }
}

/// Refuses a list that names an id twice. Short lists are compared pairwise (no allocation);
/// longer ones sorted in a copy. Runs before the lock is taken.
fn check_unique(ids: &[u64]) -> Result<()> {
    if ids.len() <= 16 {
        for (i, a) in ids.iter().enumerate() {
            if ids[i + 1..].contains(a) {
                return Err(EngineError::DuplicateId(*a));
            }
        }
        return Ok(());
    }
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    match sorted.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(EngineError::DuplicateId(w[0])),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_hash;

    const PAGE: u64 = 4096;

    fn item(key: &[u8], value_len: u64) -> PutItem<'_> {
        PutItem {
            key,
            value_len,
            metadata: b"",
            ttl: None,
            overwrite: false,
        }
    }

    impl State {
        /// Every cross-table invariant: the free list, the allocator and the entries agree;
        /// the index holds exactly the live entries; the count of evictable pages is exact;
        /// each session's lists hold exactly its leases and reservations, with matching
        /// counters; the deadline list holds every reservation in deadline order.
        fn check_invariants(&self) {
            assert_eq!(self.undo, NO_ENTRY, "no reserve call in progress");
            let mut used = 0u64;
            let mut evictable = 0u64;
            let mut live = 0usize;
            let mut leases_per_entry = vec![0u32; self.entries.len()];
            for l in 0..self.cfg.limits.max_leases {
                if self.leases.is_occupied(l) {
                    leases_per_entry[self.leases.at(l).entry as usize] += 1;
                }
            }
            for (e, ent) in self.entries.iter().enumerate() {
                assert_eq!(ent.leases, leases_per_entry[e], "entry {e}");
                match ent.state {
                    EntryState::Free => continue,
                    EntryState::Evicted => panic!("entry {e} left evicted"),
                    EntryState::Live => {
                        live += 1;
                        assert_eq!(self.index.get(ent.hash), Some(e as u32));
                        if ent.leases == 0 {
                            evictable += u64::from(ent.extent.pages);
                            assert!(self.policy.is_queued(e as u32), "entry {e} not queued");
                        }
                    }
                    EntryState::Doomed => assert!(ent.leases > 0, "doomed entry {e} unleased"),
                    EntryState::Reserved => {}
                    EntryState::Loading => panic!("entry {e} left loading"),
                }
                used += u64::from(ent.extent.pages);
                assert_eq!(self.owner[ent.extent.start as usize], e as u32);
                assert_eq!(
                    self.arena.extent_at(ent.extent.start),
                    Some((false, ent.extent.pages))
                );
            }
            assert_eq!(live, self.index.len());
            assert_eq!(evictable, self.evictable_pages);
            assert_eq!(
                used,
                u64::from(self.arena.pages() - self.arena.free_pages())
            );
            // Sessions' lists.
            let mut listed_leases = 0;
            let mut listed_res = 0;
            for (i, s) in self.sessions.iter().enumerate() {
                let Some(s) = s else { continue };
                let sid = u64::from(s.nonce) << 32 | i as u64;
                let (mut n, mut prev, mut l) = (0, NIL, s.lease_head);
                while l != NIL {
                    let rec = self.leases.at(l);
                    assert_eq!((rec.session, rec.prev), (sid, prev));
                    (n, prev, l) = (n + 1, l, rec.next);
                }
                assert_eq!(n, s.leases);
                listed_leases += n as usize;
                let (mut n, mut pages, mut prev, mut r) = (0, 0, NIL, s.res_head);
                while r != NIL {
                    let rec = self.reservations.at(r);
                    assert_eq!((rec.session, rec.s_prev), (sid, prev));
                    pages += u64::from(rec.staging.pages);
                    (n, prev, r) = (n + 1, r, rec.s_next);
                }
                assert_eq!((n, pages), (s.reservations, s.staging_pages));
                listed_res += n as usize;
            }
            assert_eq!(
                listed_leases,
                self.leases.len(),
                "every lease in its session"
            );
            // Reservations of closed sessions being committed are in no session's list.
            let (mut n, mut prev, mut r, mut deadline) = (0, NIL, self.oldest_res, 0);
            while r != NIL {
                let rec = self.reservations.at(r);
                assert_eq!(rec.f_prev, prev);
                assert!(rec.deadline >= deadline, "deadline order");
                assert_eq!(self.entries[rec.entry as usize].state, EntryState::Reserved);
                deadline = rec.deadline;
                (n, prev, r) = (n + 1, r, rec.f_next);
            }
            assert_eq!(prev, self.newest_res);
            assert_eq!(n, self.reservations.len());
            assert!(listed_res <= n);
        }
    }

    fn small_engine(max_reservations_per_session: u32) -> Engine {
        Engine::new(EngineConfig {
            limits: Limits {
                max_value: 8 * PAGE,
                max_leases: 64,
                max_reservations: 32,
                max_reservations_per_session,
                max_sessions: 8,
                ..Limits::default()
            },
            host: HostConfig {
                capacity: 256 * PAGE,
                staging: 64 * PAGE,
                ..HostConfig::default()
            },
            ..EngineConfig::default()
        })
        .unwrap()
    }

    /// Each engine draws its own index seed: the same key hashes differently in two engines
    /// (so keys chosen to collide in one do not in another); chunk keys are unaffected.
    #[test]
    fn index_hash_is_seeded_per_engine() {
        let (a, b) = (small_engine(4), small_engine(4));
        let (sa, sb) = (a.state.lock().seed, b.state.lock().seed);
        assert_ne!(sa, sb);
        assert_ne!(key_hash(b"k", sa), key_hash(b"k", sb));
        let s = a.open_session().unwrap();
        a.put_local(s, item(b"k", 0), b"v").unwrap();
        let st = a.state.lock();
        assert_eq!(st.index.get(key_hash(b"k", sa)), Some(0));
        assert_eq!(st.index.get(crate::key::key_hash(b"k", 0)), None);
    }

    /// Per-session reservation quota: refused with its own message, leaving nothing reserved,
    /// while another session still reserves; closing and reaping keep the lists exact.
    #[test]
    fn reservation_quota_and_lists() {
        let e = small_engine(3);
        let a = e.open_session().unwrap();
        let b = e.open_session().unwrap();
        let keys: Vec<[u8; 2]> = (0..6u8).map(|i| [b'a', i]).collect();
        let items: Vec<PutItem<'_>> = keys.iter().map(|k| item(k, 10)).collect();
        let err = e.reserve(a, &items[..4]).unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::NoSpace {
                    what: "reservations of this session"
                }
            ),
            "{err}"
        );
        assert_eq!(e.stats().reservations, 0);
        e.state.lock().check_invariants();
        let ra = e.reserve(a, &items[..3]).unwrap();
        e.reserve(b, &items[3..5]).unwrap();
        e.state.lock().check_invariants();
        // Commit one of a's; a can then reserve one more.
        let Reserved::Space { id, .. } = ra[1] else {
            panic!()
        };
        e.commit(a, &[(id, None)]).unwrap();
        e.reserve(a, &items[5..6]).unwrap();
        e.state.lock().check_invariants();
        assert_eq!(e.close_session(a).unwrap(), (0, 3));
        e.state.lock().check_invariants();
        assert_eq!(e.stats().reservations, 2);
        assert_eq!(e.close_session(b).unwrap(), (0, 2));
        e.state.lock().check_invariants();
        assert_eq!(e.stats().staging_used_bytes, 0);
    }

    /// A reservation being committed when its session closes is published by its commit and
    /// leaves no trace in the (reused) session slot.
    #[test]
    fn commit_after_close_publishes_an_orphan() {
        let e = small_engine(8);
        let a = e.open_session().unwrap();
        let r = e.reserve(a, &[item(b"x", 100), item(b"y", 100)]).unwrap();
        let ids: Vec<u64> = r
            .iter()
            .map(|r| match *r {
                Reserved::Space { id, .. } => id,
                Reserved::Exists => panic!(),
            })
            .collect();
        // As commit does before copying outside the lock.
        for &id in &ids {
            e.state.lock().reservations.get_mut(id).unwrap().committing = true;
        }
        assert_eq!(e.close_session(a).unwrap(), (0, 0));
        let b = e.open_session().unwrap();
        assert_eq!(slab::index(a), slab::index(b), "the slot is reused");
        e.reserve(b, &[item(b"z", 100)]).unwrap();
        e.state.lock().check_invariants();
        let mut st = e.state.lock();
        st.publish(ids[0], 0);
        st.abort_one(ids[1]);
        st.check_invariants();
        let s = st.sessions[slab::index(b) as usize].unwrap();
        assert_eq!((s.reservations, s.staging_pages), (1, 1));
    }

    /// The reaper aborts only expired reservations not being committed, oldest first, and
    /// stops at the first that has time left.
    #[test]
    fn reaper_walks_the_deadline_list() {
        let e = Engine::new(EngineConfig {
            limits: Limits {
                max_value: 8 * PAGE,
                reservation_timeout: Duration::from_millis(20),
                ..Limits::default()
            },
            host: HostConfig {
                capacity: 256 * PAGE,
                staging: 64 * PAGE,
                ..HostConfig::default()
            },
            ..EngineConfig::default()
        })
        .unwrap();
        let s = e.open_session().unwrap();
        let old = e.reserve(s, &[item(b"a", 10), item(b"b", 10)]).unwrap();
        let Reserved::Space { id: busy, .. } = old[0] else {
            panic!()
        };
        e.state
            .lock()
            .reservations
            .get_mut(busy)
            .unwrap()
            .committing = true;
        std::thread::sleep(Duration::from_millis(30));
        e.reserve(s, &[item(b"c", 10)]).unwrap();
        assert_eq!(e.reap_expired_reservations(), 1);
        let st = e.state.lock();
        st.check_invariants();
        assert_eq!(st.reservations.len(), 2);
    }

    /// Random operations over several sessions, checking every invariant after each.
    #[test]
    fn invariants_hold_under_random_operations() {
        use crate::traces::Rng;
        for policy in [EvictionPolicy::S3Fifo, EvictionPolicy::Lru] {
            let e = Engine::new(EngineConfig {
                limits: Limits {
                    max_value: 6 * PAGE,
                    max_leases: 48,
                    max_leases_per_session: 16,
                    max_reservations: 12,
                    max_reservations_per_session: 5,
                    max_sessions: 4,
                    ..Limits::default()
                },
                host: HostConfig {
                    capacity: 64 * PAGE,
                    staging: 32 * PAGE,
                    policy,
                    ..HostConfig::default()
                },
                ..EngineConfig::default()
            })
            .unwrap();
            let mut rng = Rng::new(9);
            let mut sessions: Vec<u64> = Vec::new();
            let mut leases: Vec<(u64, u64)> = Vec::new();
            let mut reserved: Vec<(u64, u64)> = Vec::new();
            for _ in 0..4000 {
                if sessions.len() < 3 {
                    sessions.push(e.open_session().unwrap());
                }
                let s = sessions[rng.range(0, sessions.len())];
                let key = [rng.range(0, 30) as u8];
                match rng.range(0, 9) {
                    0 | 1 => {
                        let n = rng.range(1, 4);
                        let keys: Vec<[u8; 1]> = (0..n).map(|_| [rng.range(0, 30) as u8]).collect();
                        let items: Vec<PutItem<'_>> = keys
                            .iter()
                            .map(|k| PutItem {
                                overwrite: rng.range(0, 2) == 0,
                                ..item(k, rng.range(1, 6 * PAGE as usize) as u64)
                            })
                            .collect();
                        if let Ok(r) = e.reserve(s, &items) {
                            for r in r {
                                if let Reserved::Space { id, .. } = r {
                                    reserved.push((s, id));
                                }
                            }
                        }
                    }
                    2 | 3 if !reserved.is_empty() => {
                        let (rs, id) = reserved.swap_remove(rng.range(0, reserved.len()));
                        let _ = e.commit(rs, &[(id, None)]);
                    }
                    4 if !reserved.is_empty() => {
                        let (rs, id) = reserved.swap_remove(rng.range(0, reserved.len()));
                        let _ = e.abort(rs, &[id]);
                    }
                    5 => {
                        if let Ok(v) = e.get(s, &[&key]) {
                            leases.extend(v.into_iter().flatten().map(|l| (s, l.id)));
                        }
                    }
                    6 if !leases.is_empty() => {
                        let (ls, id) = leases.swap_remove(rng.range(0, leases.len()));
                        let _ = e.release(ls, &[id]);
                    }
                    7 => {
                        e.delete(&[&key]).unwrap();
                    }
                    8 if rng.range(0, 8) == 0 => {
                        let i = rng.range(0, sessions.len());
                        e.close_session(sessions.swap_remove(i)).unwrap();
                    }
                    _ => {
                        e.reap_expired_reservations();
                    }
                }
                e.state.lock().check_invariants();
            }
            for s in sessions {
                e.close_session(s).unwrap();
            }
            let st = e.state.lock();
            st.check_invariants();
            assert_eq!((st.leases.len(), st.reservations.len()), (0, 0));
        }
    }
}
