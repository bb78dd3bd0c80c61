//! The host-memory tier (T1): a shared arena of committed values, a staging area that
//! clients write puts into, and the bookkeeping that ties them together: index, eviction,
//! reservations, leases and sessions.
//!
//! All bookkeeping lives in one `State` behind a mutex, which is only held for table
//! updates; bulk copies (staging to arena at commit) run outside it on extents the caller
//! exclusively owns.

use std::{
    collections::hash_map::RandomState,
    hash::BuildHasher,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::{
    alloc::{Extent, ExtentAllocator},
    error::{EngineError, Result},
    index::RobinHoodIndex,
    key::{checksum, key_hash, validate_key},
    policy::{Candidate, Policy},
    shm::SharedRegion,
    slab::Slab,
};

/// Largest metadata blob stored beside a value.
pub const MAX_METADATA_LEN: usize = 4096;

/// Which eviction policy the host tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// S3-FIFO: small and main FIFO queues with a ghost set (the default).
    #[default]
    S3Fifo,
    /// Least recently used.
    Lru,
}

impl std::str::FromStr for EvictionPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "s3fifo" => Ok(Self::S3Fifo),
            "lru" => Ok(Self::Lru),
            _ => Err(format!(
                "unknown eviction policy {s:?} (expected s3fifo or lru)"
            )),
        }
    }
}

/// The storage tier a value lives in. Only the host tier exists so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// T1: host shared memory.
    Host,
}

/// Host-tier configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Arena size in bytes (committed values).
    pub capacity: u64,
    /// Staging area size in bytes (puts in flight).
    pub staging: u64,
    /// Allocation granule in bytes; a power of two of at least 4096.
    pub page_size: u32,
    /// Largest value accepted.
    pub max_value: u64,
    /// Most items in one batched call.
    pub max_batch: usize,
    /// Most leases held at once, over all sessions.
    pub max_leases: u32,
    /// Most leases one session may hold.
    pub max_leases_per_session: u32,
    /// Most reservations in flight at once.
    pub max_reservations: u32,
    /// Most sessions at once.
    pub max_sessions: u32,
    /// A reservation not committed within this time is aborted and its space reclaimed.
    pub reservation_timeout: Duration,
    /// TTL for entries put without one; `None` keeps them until evicted.
    pub default_ttl: Option<Duration>,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// S3-FIFO: share of the arena, in percent, given to the small (probationary) queue.
    pub small_queue_percent: u8,
    /// Lock the arena and staging area into RAM (needs `CAP_IPC_LOCK` beyond small sizes).
    pub lock_memory: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 30,
            staging: 256 << 20,
            page_size: 4096,
            max_value: 64 << 20,
            max_batch: 1024,
            max_leases: 65536,
            max_leases_per_session: 16384,
            max_reservations: 4096,
            max_sessions: 1024,
            reservation_timeout: Duration::from_secs(30),
            default_ttl: None,
            policy: EvictionPolicy::S3Fifo,
            // Chosen by measurement: docs/benchmarks.md, "Eviction policy".
            small_queue_percent: 30,
            lock_memory: false,
        }
    }
}

impl EngineConfig {
    /// Checks the configuration for consistency.
    ///
    /// # Errors
    /// [`EngineError::Config`] naming the first problem found.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if !self.page_size.is_power_of_two() || self.page_size < 4096 {
            return bad(format!(
                "page size {} is not a power of two >= 4096",
                self.page_size
            ));
        }
        let ps = u64::from(self.page_size);
        if self.capacity < 16 * ps || self.capacity / ps >= u64::from(u32::MAX) {
            return bad(format!("host capacity {} is out of range", self.capacity));
        }
        if self.staging < ps || self.staging / ps >= u64::from(u32::MAX) {
            return bad(format!("staging size {} is out of range", self.staging));
        }
        if self.max_value == 0 || self.max_value > self.staging || self.max_value > self.capacity {
            return bad(format!(
                "max value {} must be positive and fit both the arena ({}) and staging ({})",
                self.max_value, self.capacity, self.staging
            ));
        }
        if !(1..=90).contains(&self.small_queue_percent) {
            return bad(format!(
                "small queue share {}% is outside 1..=90",
                self.small_queue_percent
            ));
        }
        for (name, v) in [
            ("max_batch", self.max_batch as u64),
            ("max_leases", u64::from(self.max_leases)),
            (
                "max_leases_per_session",
                u64::from(self.max_leases_per_session),
            ),
            ("max_reservations", u64::from(self.max_reservations)),
            ("max_sessions", u64::from(self.max_sessions)),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}

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

/// A granted lease on a committed value.
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
    /// Tier that served it.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    Free,
    Reserved,
    Live,
    /// Removed from the index while leased; freed when the last lease goes.
    Doomed,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: u128,
    extent: Extent,
    value_len: u64,
    key_len: u16,
    meta_len: u16,
    state: EntryState,
    leases: u32,
    /// Milliseconds since the engine's epoch; `u64::MAX` never expires.
    expires: u64,
    ttl: u64,
    /// Next free entry while `Free`.
    next_free: u32,
}

const NO_ENTRY: u32 = u32::MAX;

#[derive(Debug)]
struct Reservation {
    entry: u32,
    staging: Extent,
    session: SessionId,
    deadline: u64,
    committing: bool,
}

#[derive(Debug)]
struct LeaseRec {
    entry: u32,
    session: SessionId,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    nonce: u32,
    leases: u32,
}

struct State {
    cfg: EngineConfig,
    arena: ExtentAllocator,
    staging: ExtentAllocator,
    index: RobinHoodIndex,
    entries: Vec<Entry>,
    free_entry: u32,
    policy: Policy,
    reservations: Slab<Reservation>,
    leases: Slab<LeaseRec>,
    sessions: Vec<Option<Session>>,
    free_sessions: Vec<u32>,
    stats: Stats,
    random: RandomState,
    session_counter: u64,
}

/// The host tier: arena, staging area and their bookkeeping. Shared by all sessions.
pub struct Engine {
    arena: SharedRegion,
    staging: SharedRegion,
    page: u64,
    epoch: Instant,
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
        cfg.validate()?;
        let page = u64::from(cfg.page_size);
        let arena_pages = (cfg.capacity / page) as u32;
        let staging_pages = (cfg.staging / page) as u32;
        let arena = SharedRegion::create_read_only(
            "nencache-arena",
            (u64::from(arena_pages) * page) as usize,
            cfg.lock_memory,
        )?;
        let staging = SharedRegion::create(
            "nencache-staging",
            (u64::from(staging_pages) * page) as usize,
            cfg.lock_memory,
        )?;
        let mut entries = vec![
            Entry {
                hash: 0,
                extent: Extent { start: 0, pages: 0 },
                value_len: 0,
                key_len: 0,
                meta_len: 0,
                state: EntryState::Free,
                leases: 0,
                expires: u64::MAX,
                ttl: 0,
                next_free: NO_ENTRY,
            };
            arena_pages as usize
        ];
        for (i, e) in entries.iter_mut().enumerate() {
            e.next_free = if i + 1 < arena_pages as usize {
                i as u32 + 1
            } else {
                NO_ENTRY
            };
        }
        let state = State {
            arena: ExtentAllocator::new(arena_pages),
            staging: ExtentAllocator::new(staging_pages),
            index: RobinHoodIndex::with_capacity(arena_pages as usize),
            entries,
            free_entry: 0,
            policy: Policy::new(
                cfg.policy,
                arena_pages,
                u64::from(arena_pages) * page,
                cfg.small_queue_percent,
            ),
            reservations: Slab::with_capacity(cfg.max_reservations),
            leases: Slab::with_capacity(cfg.max_leases),
            sessions: vec![None; cfg.max_sessions as usize],
            free_sessions: (0..cfg.max_sessions).rev().collect(),
            stats: Stats {
                capacity_bytes: arena.len() as u64,
                staging_bytes: staging.len() as u64,
                ..Stats::default()
            },
            random: RandomState::new(),
            session_counter: 0,
            cfg,
        };
        Ok(Self {
            arena,
            staging,
            page,
            epoch: Instant::now(),
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
        self.state.lock().cfg.clone()
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Opens a session. Leases and reservations belong to a session and are reclaimed when it
    /// closes.
    ///
    /// # Errors
    /// [`EngineError::NoSpace`] when the session table is full.
    pub fn open_session(&self) -> Result<SessionId> {
        let mut st = self.state.lock();
        let idx = st.free_sessions.pop().ok_or(EngineError::NoSpace {
            what: "session table",
        })?;
        st.session_counter += 1;
        let nonce = (st.random.hash_one(st.session_counter) as u32) | 1;
        st.sessions[idx as usize] = Some(Session { nonce, leases: 0 });
        st.stats.sessions += 1;
        Ok(u64::from(nonce) << 32 | u64::from(idx))
    }

    /// Closes a session: releases its leases and aborts its reservations. Returns how many of
    /// each were reclaimed.
    ///
    /// # Errors
    /// [`EngineError::UnknownSession`].
    pub fn close_session(&self, session: SessionId) -> Result<(usize, usize)> {
        let mut st = self.state.lock();
        st.check_session(session)?;
        let idx = (session & 0xffff_ffff) as u32;
        st.sessions[idx as usize] = None;
        // Never exceeds the capacity reserved at construction.
        st.free_sessions.push(idx);
        st.stats.sessions -= 1;
        let leases = st.leases.ids_where(|l| l.session == session);
        for &id in &leases {
            st.release_one(id);
        }
        // A reservation being committed finishes; the commit removes it.
        let res = st
            .reservations
            .ids_where(|r| r.session == session && !r.committing);
        for &id in &res {
            st.abort_one(id);
        }
        st.stats.reclaimed_leases += leases.len() as u64;
        st.stats.reclaimed_reservations += res.len() as u64;
        Ok((leases.len(), res.len()))
    }

    /// Aborts reservations older than the reservation timeout. Returns how many.
    pub fn reap_expired_reservations(&self) -> usize {
        let now = self.now();
        let mut st = self.state.lock();
        let ids = st
            .reservations
            .ids_where(|r| !r.committing && r.deadline <= now);
        for &id in &ids {
            st.abort_one(id);
        }
        st.stats.reclaimed_reservations += ids.len() as u64;
        ids.len()
    }

    /// How many leading `keys` are cached, and where.
    ///
    /// # Errors
    /// An invalid key or an oversized batch.
    pub fn lookup(&self, keys: &[&[u8]]) -> Result<Lookup> {
        let mut st = self.state.lock();
        st.check_batch(keys.len())?;
        for k in keys {
            validate_key(k)?;
        }
        let now = self.now();
        let mut prefix = 0;
        for k in keys {
            if st.find_live(&self.arena, self.page, k, now).is_none() {
                break;
            }
            prefix += 1;
        }
        st.stats.lookup_keys += keys.len() as u64;
        st.stats.lookup_hits += prefix as u64;
        Ok(Lookup {
            prefix,
            tiers: vec![Tier::Host; prefix],
        })
    }

    /// Reserves space for a batch of puts, all or nothing.
    ///
    /// # Errors
    /// An invalid item, an unknown session, or no space (after eviction) for the batch.
    pub fn reserve(&self, session: SessionId, items: &[PutItem<'_>]) -> Result<Vec<Reserved>> {
        let now = self.now();
        let mut st = self.state.lock();
        st.check_session(session)?;
        st.check_batch(items.len())?;
        for it in items {
            validate_key(it.key)?;
            if it.value_len > st.cfg.max_value {
                return Err(EngineError::ValueTooLarge {
                    len: it.value_len,
                    max: st.cfg.max_value,
                });
            }
            if it.metadata.len() > MAX_METADATA_LEN {
                return Err(EngineError::MetadataTooLarge {
                    len: it.metadata.len(),
                    max: MAX_METADATA_LEN,
                });
            }
        }
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            if !it.overwrite && st.find_live(&self.arena, self.page, it.key, now).is_some() {
                out.push(Reserved::Exists);
                continue;
            }
            match st.reserve_one(&self.arena, self.page, session, it, now) {
                Ok(r) => out.push(r),
                Err(e) => {
                    for r in out {
                        if let Reserved::Space { id, .. } = r {
                            st.abort_one(id);
                        }
                    }
                    if matches!(e, EngineError::NoSpace { .. }) {
                        st.stats.no_space += 1;
                    }
                    return Err(e);
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
        let plan = {
            let mut st = self.state.lock();
            st.check_session(session)?;
            st.check_batch(items.len())?;
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
                st.publish(self.page, id, now);
                out.push(Committed::Done);
            } else {
                st.abort_one(id);
                st.stats.checksum_failures += 1;
                out.push(Committed::ChecksumMismatch);
            }
        }
        Ok(out)
    }

    /// Aborts reservations, all or nothing.
    ///
    /// # Errors
    /// An unknown session, or an id that is unknown, foreign or being committed.
    pub fn abort(&self, session: SessionId, ids: &[u64]) -> Result<()> {
        let mut st = self.state.lock();
        st.check_session(session)?;
        st.check_batch(ids.len())?;
        check_unique(ids)?;
        for &id in ids {
            match st.reservations.get(id) {
                Some(r) if r.session == session && !r.committing => {}
                Some(r) if r.committing => return Err(EngineError::CommitInProgress(id)),
                _ => return Err(EngineError::UnknownReservation(id)),
            }
        }
        for &id in ids {
            st.abort_one(id);
        }
        st.stats.aborts += ids.len() as u64;
        Ok(())
    }

    /// Looks up each key and leases the ones found. A leased value is neither evicted nor
    /// overwritten in place until released.
    ///
    /// # Errors
    /// An unknown session, an invalid key, an oversized batch, or a full lease table (then
    /// no lease of this call is kept).
    pub fn get(&self, session: SessionId, keys: &[&[u8]]) -> Result<Vec<Option<Lease>>> {
        let now = self.now();
        let mut st = self.state.lock();
        st.check_session(session)?;
        st.check_batch(keys.len())?;
        for k in keys {
            validate_key(k)?;
        }
        let mut out: Vec<Option<Lease>> = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(e) = st.find_live(&self.arena, self.page, k, now) else {
                st.stats.misses += 1;
                out.push(None);
                continue;
            };
            match st.lease(session, e) {
                Ok(id) => {
                    st.stats.hits += 1;
                    st.policy.touch(e);
                    let ent = st.entries[e as usize];
                    let off = u64::from(ent.extent.start) * self.page;
                    let meta_off = (off + ent.value_len) as usize + usize::from(ent.key_len);
                    // SAFETY: the entry is live and now leased: its extent is not rewritten.
                    let meta = unsafe { self.arena.slice(meta_off, usize::from(ent.meta_len)) };
                    out.push(Some(Lease {
                        id,
                        offset: off,
                        len: ent.value_len,
                        metadata: meta.to_vec(),
                        tier: Tier::Host,
                    }));
                }
                Err(err) => {
                    for l in out.into_iter().flatten() {
                        st.release_one(l.id);
                    }
                    st.stats.no_space += 1;
                    return Err(err);
                }
            }
        }
        Ok(out)
    }

    /// Releases leases, all or nothing.
    ///
    /// # Errors
    /// An unknown session, or a lease that is unknown, foreign or listed twice.
    pub fn release(&self, session: SessionId, ids: &[u64]) -> Result<()> {
        let mut st = self.state.lock();
        st.check_session(session)?;
        check_unique(ids)?;
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
        let now = self.now();
        let mut st = self.state.lock();
        st.check_batch(keys.len())?;
        for k in keys {
            validate_key(k)?;
        }
        let mut n = 0;
        for k in keys {
            if let Some(e) = st.find_live(&self.arena, self.page, k, now) {
                st.policy.remove(e);
                st.unpublish(e);
                st.stats.deletes += 1;
                n += 1;
            }
        }
        Ok(n)
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
    /// read their own mapping instead).
    ///
    /// # Errors
    /// [`EngineError::UnknownLease`] when `lease` is not held by `session`.
    pub fn read_leased(&self, session: SessionId, lease: &Lease) -> Result<Vec<u8>> {
        let st = self.state.lock();
        if st.leases.get(lease.id).is_none_or(|l| l.session != session) {
            return Err(EngineError::UnknownLease(lease.id));
        }
        // SAFETY: the lease is held, so the extent is not rewritten while we copy.
        Ok(unsafe { self.arena.slice(lease.offset as usize, lease.len as usize) }.to_vec())
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

fn check_unique(ids: &[u64]) -> Result<()> {
    if ids.len() > 1 {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(EngineError::DuplicateId(w[0]));
        }
    }
    Ok(())
}

fn pages_for(bytes: u64, page: u64) -> u32 {
    bytes.div_ceil(page).max(1) as u32
}

impl State {
    fn check_session(&self, session: SessionId) -> Result<()> {
        let idx = (session & 0xffff_ffff) as usize;
        match self.sessions.get(idx) {
            Some(Some(s)) if u64::from(s.nonce) == session >> 32 => Ok(()),
            _ => Err(EngineError::UnknownSession(session)),
        }
    }

    fn check_batch(&self, len: usize) -> Result<()> {
        if len > self.cfg.max_batch {
            return Err(EngineError::BatchTooLarge {
                len,
                max: self.cfg.max_batch,
            });
        }
        Ok(())
    }

    /// The live entry for `key`, comparing the full key. An expired entry is dropped.
    fn find_live(&mut self, arena: &SharedRegion, page: u64, key: &[u8], now: u64) -> Option<u32> {
        let h = key_hash(key);
        let e = self.index.get(h)?;
        let ent = self.entries[e as usize];
        let off = (u64::from(ent.extent.start) * page + ent.value_len) as usize;
        // SAFETY: the key bytes of an indexed entry were written at reserve and are never
        // rewritten while it is indexed; only this process maps the arena writable.
        let stored = unsafe { arena.slice(off, usize::from(ent.key_len)) };
        if stored != key {
            // A 128-bit hash collision: a miss, never another key's value.
            return None;
        }
        if ent.expires <= now {
            self.policy.remove(e);
            self.unpublish(e);
            self.stats.expirations += 1;
            return None;
        }
        Some(e)
    }

    fn reserve_one(
        &mut self,
        arena: &SharedRegion,
        page: u64,
        session: SessionId,
        it: &PutItem<'_>,
        now: u64,
    ) -> Result<Reserved> {
        let total = it.value_len + it.key.len() as u64 + it.metadata.len() as u64;
        let staging =
            self.staging
                .alloc(pages_for(it.value_len, page))
                .ok_or(EngineError::NoSpace {
                    what: "staging area (too many puts in flight)",
                })?;
        let extent = match self.make_room(pages_for(total, page), now) {
            Ok(x) => x,
            Err(e) => {
                self.staging.free(staging);
                return Err(e);
            }
        };
        let e = self.free_entry;
        debug_assert_ne!(e, NO_ENTRY, "an entry per arena page");
        let ttl = it
            .ttl
            .or(self.cfg.default_ttl)
            .map_or(u64::MAX, |d| d.as_millis() as u64);
        let ent = &mut self.entries[e as usize];
        self.free_entry = ent.next_free;
        *ent = Entry {
            hash: key_hash(it.key),
            extent,
            value_len: it.value_len,
            key_len: it.key.len() as u16,
            meta_len: it.metadata.len() as u16,
            state: EntryState::Reserved,
            leases: 0,
            expires: u64::MAX,
            ttl,
            next_free: NO_ENTRY,
        };
        let off = (u64::from(extent.start) * page + it.value_len) as usize;
        // SAFETY: the extent was just allocated to this entry and nothing else refers to it.
        unsafe {
            arena.write(off, it.key);
            arena.write(off + it.key.len(), it.metadata);
        }
        let deadline = now + self.cfg.reservation_timeout.as_millis() as u64;
        let res = Reservation {
            entry: e,
            staging,
            session,
            deadline,
            committing: false,
        };
        match self.reservations.insert(res) {
            Some(id) => Ok(Reserved::Space {
                id,
                staging_offset: u64::from(staging.start) * page,
            }),
            None => {
                self.free_entry_slot(e);
                self.staging.free(staging);
                Err(EngineError::NoSpace {
                    what: "reservation table",
                })
            }
        }
    }

    /// Allocates `pages`, evicting as needed.
    fn make_room(&mut self, pages: u32, now: u64) -> Result<Extent> {
        loop {
            if let Some(x) = self.arena.alloc(pages) {
                return Ok(x);
            }
            let entries = &self.entries;
            let victim = self.policy.evict(
                |e| {
                    let ent = &entries[e as usize];
                    if ent.leases > 0 {
                        Candidate::Pinned
                    } else if ent.expires <= now {
                        Candidate::Expired
                    } else {
                        Candidate::Evictable
                    }
                },
                |e| entries[e as usize].hash,
            );
            let Some(v) = victim else {
                return Err(EngineError::NoSpace {
                    what: "host arena (every remaining entry is leased or reserved)",
                });
            };
            if self.entries[v as usize].expires <= now {
                self.stats.expirations += 1;
            } else {
                self.stats.evictions += 1;
            }
            self.unpublish(v);
        }
    }

    fn publish(&mut self, page: u64, id: u64, now: u64) {
        let Some(r) = self.reservations.remove(id) else {
            return;
        };
        self.staging.free(r.staging);
        let e = r.entry;
        let ent = &mut self.entries[e as usize];
        ent.state = EntryState::Live;
        ent.expires = if ent.ttl == u64::MAX {
            u64::MAX
        } else {
            now.saturating_add(ent.ttl)
        };
        let (hash, bytes) = (ent.hash, u64::from(ent.extent.pages) * page);
        if let Some(old) = self.index.insert(hash, e) {
            // Same key overwritten, or a different key with the same 128-bit hash: either
            // way the older entry leaves.
            self.policy.remove(old);
            self.entries[old as usize].state = EntryState::Doomed;
            self.drop_if_unleased(old);
        }
        self.policy.insert(e, hash, bytes);
        self.stats.commits += 1;
    }

    /// Takes a live entry out of the index (the caller has unlinked it from the policy).
    fn unpublish(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        debug_assert_eq!(ent.state, EntryState::Live);
        let hash = ent.hash;
        ent.state = EntryState::Doomed;
        if self.index.get(hash) == Some(e) {
            self.index.remove(hash);
        }
        self.drop_if_unleased(e);
    }

    fn drop_if_unleased(&mut self, e: u32) {
        let ent = &self.entries[e as usize];
        if ent.state == EntryState::Doomed && ent.leases == 0 {
            self.arena.free(ent.extent);
            self.free_entry_slot(e);
        }
    }

    fn free_entry_slot(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        ent.state = EntryState::Free;
        ent.next_free = self.free_entry;
        self.free_entry = e;
    }

    fn abort_one(&mut self, id: u64) {
        let Some(r) = self.reservations.remove(id) else {
            return;
        };
        self.staging.free(r.staging);
        let ext = self.entries[r.entry as usize].extent;
        self.arena.free(ext);
        self.free_entry_slot(r.entry);
    }

    fn lease(&mut self, session: SessionId, e: u32) -> Result<u64> {
        let idx = (session & 0xffff_ffff) as usize;
        let per_session = self.cfg.max_leases_per_session;
        let s = self.sessions[idx]
            .as_mut()
            .ok_or(EngineError::UnknownSession(session))?;
        if s.leases >= per_session {
            return Err(EngineError::NoSpace {
                what: "leases of this session",
            });
        }
        let id =
            self.leases
                .insert(LeaseRec { entry: e, session })
                .ok_or(EngineError::NoSpace {
                    what: "lease table",
                })?;
        s.leases += 1;
        self.entries[e as usize].leases += 1;
        Ok(id)
    }

    fn release_one(&mut self, id: u64) {
        let Some(l) = self.leases.remove(id) else {
            return;
        };
        let idx = (l.session & 0xffff_ffff) as usize;
        if let Some(s) = self.sessions[idx]
            .as_mut()
            .filter(|s| u64::from(s.nonce) == l.session >> 32)
        {
            s.leases -= 1;
        }
        self.entries[l.entry as usize].leases -= 1;
        self.drop_if_unleased(l.entry);
    }
}
