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
    slab::{self, NIL, Slab},
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
    /// Most reservations one session may hold at once.
    pub max_reservations_per_session: u32,
    /// Most staging bytes one session's reservations may hold at once; `None` takes a
    /// quarter of the staging area, or `max_value` if that is more (see
    /// [`EngineConfig::staging_per_session`]).
    pub max_staging_per_session: Option<u64>,
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
            max_reservations: 65536,
            max_reservations_per_session: 1024,
            max_staging_per_session: None,
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
    /// The staging bytes one session may hold: `max_staging_per_session`, or by default a
    /// quarter of the staging area but at least `max_value`, so one value always fits.
    #[must_use]
    pub fn staging_per_session(&self) -> u64 {
        self.max_staging_per_session
            .unwrap_or_else(|| (self.staging / 4).max(self.max_value))
    }

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
        if let Some(v) = self.max_staging_per_session
            && (v < self.max_value || v > self.staging)
        {
            return bad(format!(
                "max staging per session {v} must be at least the max value ({}) and at most \
                 the staging area ({})",
                self.max_value, self.staging
            ));
        }
        // An entry slot per arena page, and one per item of the reserve call in progress.
        if self.capacity / ps + self.max_batch as u64 >= u64::from(u32::MAX) {
            return bad(format!("max_batch {} is out of range", self.max_batch));
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
            (
                "max_reservations_per_session",
                u64::from(self.max_reservations_per_session),
            ),
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
    /// Evicted by the reserve call in progress: out of the index, its extent back in the
    /// allocator, but its bytes and slot kept until the call succeeds (then it is freed) or
    /// is refused (then it is restored).
    Evicted,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: u128,
    extent: Extent,
    value_len: u64,
    /// Live: milliseconds since the engine's epoch from which it is expired (`u64::MAX`:
    /// never). Reserved: its TTL in milliseconds (`u64::MAX`: none), applied at publish.
    expires: u64,
    key_len: u16,
    meta_len: u16,
    state: EntryState,
    leases: u32,
    /// Free: the next free entry. Reserved or Evicted within a reserve call: the next entry
    /// down the call's undo stack.
    link: u32,
    /// Evicted: first page of the free extent its pages joined, to take them back.
    run: u32,
}

const NO_ENTRY: u32 = u32::MAX;

#[derive(Debug)]
struct Reservation {
    entry: u32,
    staging: Extent,
    session: SessionId,
    deadline: u64,
    committing: bool,
    /// The session's reservations (slab slots).
    s_prev: u32,
    s_next: u32,
    /// Every reservation, oldest first: deadline order.
    f_prev: u32,
    f_next: u32,
}

#[derive(Debug)]
struct LeaseRec {
    entry: u32,
    session: SessionId,
    /// The session's leases (slab slots).
    prev: u32,
    next: u32,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    nonce: u32,
    leases: u32,
    reservations: u32,
    staging_pages: u64,
    lease_head: u32,
    res_head: u32,
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
}

/// The host tier: arena, staging area and their bookkeeping. Shared by all sessions.
pub struct Engine {
    arena: SharedRegion,
    staging: SharedRegion,
    page: u64,
    epoch: Instant,
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
        // One entry per arena page (each entry holds at least one), and one per item of the
        // reserve call in progress, whose victims keep their entries until it ends.
        let slots = arena_pages + cfg.max_batch as u32;
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
            })
            .collect();
        let random = RandomState::new();
        let state = State {
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
                cfg.policy,
                slots,
                arena_pages,
                u64::from(arena_pages) * page,
                cfg.small_queue_percent,
            ),
            reservations: Slab::with_capacity(cfg.max_reservations),
            oldest_res: NIL,
            newest_res: NIL,
            leases: Slab::with_capacity(cfg.max_leases),
            sessions: vec![None; cfg.max_sessions as usize],
            free_sessions: (0..cfg.max_sessions).rev().collect(),
            staging_quota_pages: cfg.staging_per_session().div_ceil(page),
            stats: Stats {
                capacity_bytes: arena.len() as u64,
                staging_bytes: staging.len() as u64,
                ..Stats::default()
            },
            random,
            session_counter: 0,
            cfg: cfg.clone(),
        };
        Ok(Self {
            arena,
            staging,
            page,
            epoch: Instant::now(),
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
        if len > self.cfg.max_batch {
            return Err(EngineError::BatchTooLarge {
                len,
                max: self.cfg.max_batch,
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
        let mut prefix = 0;
        for k in keys {
            if st.find_live(&self.arena, k, now).is_none() {
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
            if it.value_len > self.cfg.max_value {
                return Err(EngineError::ValueTooLarge {
                    len: it.value_len,
                    max: self.cfg.max_value,
                });
            }
            if it.metadata.len() > MAX_METADATA_LEN {
                return Err(EngineError::MetadataTooLarge {
                    len: it.metadata.len(),
                    max: MAX_METADATA_LEN,
                });
            }
        }
        let now = self.now();
        let mut st = self.state.lock();
        st.session(session)?;
        let mut out = Vec::with_capacity(items.len());
        for it in items {
            if !it.overwrite && st.find_live(&self.arena, it.key, now).is_some() {
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
                st.publish(id, now);
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

    /// Looks up each key and leases the ones found. A leased value is neither evicted nor
    /// overwritten in place until released.
    ///
    /// # Errors
    /// An unknown session, an invalid key, an oversized batch, or a full lease table (then
    /// no lease of this call is kept).
    pub fn get(&self, session: SessionId, keys: &[&[u8]]) -> Result<Vec<Option<Lease>>> {
        self.check_keys(keys)?;
        let now = self.now();
        let mut st = self.state.lock();
        st.session(session)?;
        let mut out: Vec<Option<Lease>> = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(e) = st.find_live(&self.arena, k, now) else {
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
            if let Some(e) = st.find_live(&self.arena, k, now) {
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

/// Pages that `bytes` take, at least one (`page` is a power of two: a shift, not a division).
fn pages_for(bytes: u64, page: u64) -> u32 {
    ((bytes + page - 1) >> page.trailing_zeros()).max(1) as u32
}

/// When choosing a placement window, a page of an entry counts `1 + HOT_WEIGHT * heat` (heat:
/// its read count, plus one in S3-FIFO's main queue), so windows of cold entries win unless
/// they evict several times the bytes. Chosen on the policy benchmark's mixed-size trace
/// (with leases held 0 to 16 requests): hit ratios 0.465 (bytes only, heat as a tie-break),
/// 0.513 (1), 0.532 (4), 0.535 (8) for S3-FIFO; every choice evicts the same bytes per
/// admitted byte.
const HOT_WEIGHT: u64 = 4;

const NO_ROOM: EngineError = EngineError::NoSpace {
    what: "host arena (the rest is leased or reserved)",
};
const NO_WINDOW: EngineError = EngineError::NoSpace {
    what: "host arena (leased or reserved entries leave no run of pages long enough)",
};

impl State {
    /// The open session `session`.
    fn session(&self, session: SessionId) -> Result<Session> {
        // Errors are built only on failure: an unused one would still be dropped.
        match self.open_index(session) {
            Some(i) => Ok(self.sessions[i].expect("open")),
            None => Err(EngineError::UnknownSession(session)),
        }
    }

    /// The table index of `session` if it is open (its nonce matches).
    fn open_index(&self, session: SessionId) -> Option<usize> {
        let idx = slab::index(session) as usize;
        match self.sessions.get(idx) {
            Some(Some(s)) if u64::from(s.nonce) == session >> 32 => Some(idx),
            _ => None,
        }
    }

    /// The live entry for `key`, comparing the full key. An expired entry is dropped.
    fn find_live(&mut self, arena: &SharedRegion, key: &[u8], now: u64) -> Option<u32> {
        let h = key_hash(key, self.seed);
        let e = self.index.get(h)?;
        let ent = self.entries[e as usize];
        let off = (u64::from(ent.extent.start) * self.page + ent.value_len) as usize;
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

    fn reserve_one(&mut self, session: SessionId, it: &PutItem<'_>, now: u64) -> Result<Reserved> {
        let page = self.page;
        let total = it.value_len + it.key.len() as u64 + it.metadata.len() as u64;
        let staging_pages = pages_for(it.value_len, page);
        let sidx = slab::index(session) as usize;
        let s = self.sessions[sidx].expect("checked by the caller");
        if s.reservations >= self.cfg.max_reservations_per_session {
            return Err(EngineError::NoSpace {
                what: "reservations of this session",
            });
        }
        if s.staging_pages + u64::from(staging_pages) > self.staging_quota_pages {
            return Err(EngineError::NoSpace {
                what: "staging space of this session",
            });
        }
        if self.reservations.is_full() {
            return Err(EngineError::NoSpace {
                what: "reservation table",
            });
        }
        let Some(staging) = self.staging.alloc(staging_pages) else {
            return Err(EngineError::NoSpace {
                what: "staging area (too many puts in flight)",
            });
        };
        let extent = match self.make_room(pages_for(total, page), now) {
            Ok(x) => x,
            Err(e) => {
                self.staging.free(staging);
                return Err(e);
            }
        };
        let e = self.free_entry;
        assert_ne!(e, NO_ENTRY, "an entry per arena page and per batch item");
        let ttl = it
            .ttl
            .or(self.cfg.default_ttl)
            .map_or(u64::MAX, |d| d.as_millis() as u64);
        let ent = &mut self.entries[e as usize];
        self.free_entry = ent.link;
        *ent = Entry {
            hash: key_hash(it.key, self.seed),
            extent,
            value_len: it.value_len,
            expires: ttl,
            key_len: it.key.len() as u16,
            meta_len: it.metadata.len() as u16,
            state: EntryState::Reserved,
            leases: 0,
            link: NO_ENTRY,
            run: 0,
        };
        self.owner[extent.start as usize] = e;
        self.push_undo(e);
        let mut deadline = now + self.cfg.reservation_timeout.as_millis() as u64;
        if self.newest_res != NIL {
            // Creation order stays deadline order, which the reaper relies on.
            deadline = deadline.max(self.reservations.at(self.newest_res).deadline);
        }
        let id = self
            .reservations
            .insert(Reservation {
                entry: e,
                staging,
                session,
                deadline,
                committing: false,
                s_prev: NIL,
                s_next: s.res_head,
                f_prev: self.newest_res,
                f_next: NIL,
            })
            .expect("checked not full");
        let r = slab::index(id);
        if s.res_head != NIL {
            self.reservations.at_mut(s.res_head).s_prev = r;
        }
        if self.newest_res == NIL {
            self.oldest_res = r;
        } else {
            self.reservations.at_mut(self.newest_res).f_next = r;
        }
        self.newest_res = r;
        let s = self.sessions[sidx].as_mut().expect("open");
        s.res_head = r;
        s.reservations += 1;
        s.staging_pages += u64::from(staging_pages);
        Ok(Reserved::Space {
            id,
            staging_offset: u64::from(staging.start) * page,
        })
    }

    /// Allocates `pages`, evicting as needed (see the module docs for the order). Victims go
    /// on the undo stack; a refusal leaves none of this call's.
    fn make_room(&mut self, pages: u32, now: u64) -> Result<Extent> {
        if let Some(x) = self.arena.alloc(pages) {
            return Ok(x);
        }
        if u64::from(self.arena.free_pages()) + self.evictable_pages < u64::from(pages) {
            return Err(NO_ROOM);
        }
        // Policy order, about the requested size.
        let mark = self.undo_len;
        let mut freed = 0u64;
        while freed < u64::from(pages) {
            let entries = &self.entries;
            let Some(v) = self.policy.victim(|e| {
                let ent = &entries[e as usize];
                if ent.leases > 0 {
                    Candidate::Pinned
                } else if ent.expires <= now {
                    Candidate::Expired
                } else {
                    Candidate::Evictable
                }
            }) else {
                break;
            };
            freed += u64::from(self.entries[v as usize].extent.pages);
            self.evict(v);
            if let Some(x) = self.arena.alloc(pages) {
                return Ok(x);
            }
        }
        // The freed pages do not make a long enough run: take them back and evict the
        // cheapest window instead.
        while self.undo_len > mark {
            let v = self.pop_undo();
            self.restore(v);
        }
        let Some((first, end)) = self.cheapest_window(pages, now) else {
            return Err(NO_WINDOW);
        };
        self.window_cursor = end;
        let mut p = first;
        while p < end {
            let (free, len) = self.arena.extent_at(p).expect("an extent starts here");
            if free {
                p += len;
                continue;
            }
            // Find the next entry before freeing this one merges the free runs between.
            let mut next = p + len;
            while next < end {
                match self.arena.extent_at(next) {
                    Some((true, l)) => next += l,
                    _ => break,
                }
            }
            let e = self.owner[p as usize];
            self.policy.take(e);
            self.evict(e);
            p = next;
        }
        match self.arena.alloc(pages) {
            Some(x) => Ok(x),
            None => Err(NO_WINDOW),
        }
    }

    /// Cost of the extent that starts at `p` for a placement window: its length, and `None`
    /// when it cannot be evicted (leased, reserved, doomed), else the pages evicting it costs
    /// weighted by the entry's heat, and the pages themselves (both none for a free extent or
    /// an expired entry).
    fn extent_cost(&self, p: u32, now: u64) -> (u32, Option<(u64, u64)>) {
        let (free, len) = self.arena.extent_at(p).expect("an extent starts here");
        if free {
            return (len, Some((0, 0)));
        }
        let e = self.owner[p as usize];
        let ent = &self.entries[e as usize];
        if ent.state != EntryState::Live || ent.leases > 0 {
            return (len, None);
        }
        if ent.expires <= now {
            return (len, Some((0, 0)));
        }
        let n = u64::from(len);
        (len, Some((n * (1 + HOT_WEIGHT * self.policy.heat(e)), n)))
    }

    /// The window `[first, end)` of consecutive free extents and evictable entries, at least
    /// `pages` long, whose evicted pages weighted by heat cost least (then the fewest pages),
    /// or `None` if leased and reserved entries leave no run that long. A walk over the
    /// arena's extents in address order, with a window that shrinks from the left while it
    /// stays long enough, so every candidate evicts less than `pages` plus its first extent.
    ///
    /// The walk starts where the last window ended and stops at the first window whose
    /// weighted cost is at most `pages` (cold entries, or free pages and a little heat: no
    /// window of a full arena costs less than its unread pages), so that in an arena of
    /// unread entries a search costs about the window's own extents rather than the whole
    /// arena; otherwise it goes on, wrapping once, and takes the cheapest. Windows found
    /// this way sweep the arena like a clock hand.
    fn cheapest_window(&self, pages: u32, now: u64) -> Option<(u32, u32)> {
        let n = self.arena.pages();
        let start = match self.arena.extent_at(self.window_cursor) {
            Some(_) if self.window_cursor < n => self.window_cursor,
            _ => 0,
        };
        let mut best = None;
        for from in [start, 0] {
            let (found, cold) = self.window_from(from, pages, now, &mut best);
            if cold {
                return found;
            }
            if from == 0 {
                break;
            }
        }
        best.map(|(_, first, end)| (first, end))
    }

    /// One pass of [`State::cheapest_window`] from extent `from` to the arena's end, keeping
    /// the cheapest window in `best`. Returns the first window cheap enough to take at once,
    /// and whether there was one.
    #[allow(clippy::type_complexity)]
    fn window_from(
        &self,
        from: u32,
        pages: u32,
        now: u64,
        best: &mut Option<((u64, u64), u32, u32)>,
    ) -> (Option<(u32, u32)>, bool) {
        let need = u64::from(pages);
        let n = self.arena.pages();
        let (mut lo, mut total, mut cost) = (from, 0u64, (0u64, 0u64));
        let mut p = from;
        while p < n {
            let (len, c) = self.extent_cost(p, now);
            let end = p + len;
            p = end;
            let Some(c) = c else {
                (lo, total, cost) = (end, 0, (0, 0));
                continue;
            };
            total += u64::from(len);
            cost = (cost.0 + c.0, cost.1 + c.1);
            loop {
                let (l0, c0) = self.extent_cost(lo, now);
                if total - u64::from(l0) < need {
                    break;
                }
                let c0 = c0.expect("inside the window");
                total -= u64::from(l0);
                cost = (cost.0 - c0.0, cost.1 - c0.1);
                lo += l0;
            }
            if total >= need {
                if cost.0 <= need {
                    return (Some((lo, end)), true);
                }
                if best.is_none_or(|(b, ..)| cost < b) {
                    *best = Some((cost, lo, end));
                }
            }
        }
        (None, false)
    }

    /// Evicts a live, unleased entry that the policy has unlinked (`Policy::victim` or
    /// `Policy::take`), recoverably: see [`EntryState::Evicted`].
    fn evict(&mut self, v: u32) {
        let ent = &mut self.entries[v as usize];
        debug_assert!(ent.state == EntryState::Live && ent.leases == 0);
        ent.state = EntryState::Evicted;
        let (hash, extent) = (ent.hash, ent.extent);
        if self.index.get(hash) == Some(v) {
            self.index.remove(hash);
        }
        self.evictable_pages -= u64::from(extent.pages);
        self.entries[v as usize].run = self.arena.free(extent).start;
        self.push_undo(v);
    }

    /// Undoes [`State::evict`]; called in the reverse order of the evictions (and of the
    /// reserve call's allocations), so the victim's pages are free and in one extent.
    fn restore(&mut self, v: u32) {
        let ent = self.entries[v as usize];
        debug_assert_eq!(ent.state, EntryState::Evicted);
        self.arena.alloc_at(ent.run, ent.extent);
        self.owner[ent.extent.start as usize] = v;
        let displaced = self.index.insert(ent.hash, v);
        debug_assert!(displaced.is_none());
        self.entries[v as usize].state = EntryState::Live;
        self.evictable_pages += u64::from(ent.extent.pages);
        self.policy.restore(v);
    }

    fn push_undo(&mut self, e: u32) {
        self.entries[e as usize].link = self.undo;
        self.undo = e;
        self.undo_len += 1;
    }

    fn pop_undo(&mut self) -> u32 {
        let e = self.undo;
        debug_assert_ne!(e, NO_ENTRY);
        self.undo = self.entries[e as usize].link;
        self.entries[e as usize].link = NO_ENTRY;
        self.undo_len -= 1;
        e
    }

    /// A reserve call was refused: undoes its reservations (`out`, in order) and evictions,
    /// newest first, so the allocator, index and queues are as before the call.
    fn undo_reserve(&mut self, out: &[Reserved]) {
        let mut ids = out.iter().rev().filter_map(|r| match *r {
            Reserved::Space { id, .. } => Some(id),
            Reserved::Exists => None,
        });
        while self.undo != NO_ENTRY {
            let e = self.pop_undo();
            match self.entries[e as usize].state {
                EntryState::Evicted => self.restore(e),
                EntryState::Reserved => {
                    let id = ids.next().expect("a reservation per reserved entry");
                    debug_assert_eq!(self.reservations.get(id).map(|r| r.entry), Some(e));
                    self.abort_one(id);
                }
                s => unreachable!("entry {e} in state {s:?} on the undo stack"),
            }
        }
    }

    /// A reserve call succeeded: its victims leave for good.
    fn finish_reserve(&mut self, now: u64) {
        while self.undo != NO_ENTRY {
            let e = self.pop_undo();
            let ent = self.entries[e as usize];
            if ent.state == EntryState::Evicted {
                let expired = ent.expires <= now;
                if expired {
                    self.stats.expirations += 1;
                } else {
                    self.stats.evictions += 1;
                }
                self.policy.forget(e, ent.hash, expired);
                self.free_entry_slot(e);
            }
        }
    }

    fn publish(&mut self, id: u64, now: u64) {
        let Some(r) = self.reservations.remove(id) else {
            return;
        };
        self.unlink_reservation(&r);
        self.staging.free(r.staging);
        let e = r.entry;
        let ent = &mut self.entries[e as usize];
        ent.state = EntryState::Live;
        ent.expires = if ent.expires == u64::MAX {
            u64::MAX
        } else {
            now.saturating_add(ent.expires)
        };
        let (hash, pages) = (ent.hash, ent.extent.pages);
        self.evictable_pages += u64::from(pages);
        if let Some(old) = self.index.insert(hash, e) {
            // Same key overwritten, or a different key with the same 128-bit hash: either
            // way the older entry leaves.
            self.policy.remove(old);
            self.doom(old);
        }
        self.policy.insert(e, hash, u64::from(pages) * self.page);
        self.stats.commits += 1;
    }

    /// Takes a live entry out of the index (the caller has unlinked it from the policy).
    fn unpublish(&mut self, e: u32) {
        let hash = self.entries[e as usize].hash;
        if self.index.get(hash) == Some(e) {
            self.index.remove(hash);
        }
        self.doom(e);
    }

    /// A live entry out of the index: freed now, or when its last lease goes.
    fn doom(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        debug_assert_eq!(ent.state, EntryState::Live);
        ent.state = EntryState::Doomed;
        if ent.leases == 0 {
            self.evictable_pages -= u64::from(ent.extent.pages);
            self.drop_entry(e);
        }
    }

    fn drop_entry(&mut self, e: u32) {
        self.arena.free(self.entries[e as usize].extent);
        self.free_entry_slot(e);
    }

    fn free_entry_slot(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        ent.state = EntryState::Free;
        ent.link = self.free_entry;
        self.free_entry = e;
    }

    /// Unlinks a reservation just removed from the slab from the deadline list and, if its
    /// session is still open, from the session's list and quotas.
    fn unlink_reservation(&mut self, r: &Reservation) {
        let res = &mut self.reservations;
        if r.f_prev == NIL {
            self.oldest_res = r.f_next;
        } else {
            res.at_mut(r.f_prev).f_next = r.f_next;
        }
        if r.f_next == NIL {
            self.newest_res = r.f_prev;
        } else {
            res.at_mut(r.f_next).f_prev = r.f_prev;
        }
        // A closed session's reservations being committed are no longer in any list.
        let Some(idx) = self.open_index(r.session) else {
            return;
        };
        let s = self.sessions[idx].as_mut().expect("open");
        let res = &mut self.reservations;
        if r.s_prev == NIL {
            s.res_head = r.s_next;
        } else {
            res.at_mut(r.s_prev).s_next = r.s_next;
        }
        if r.s_next != NIL {
            res.at_mut(r.s_next).s_prev = r.s_prev;
        }
        s.reservations -= 1;
        s.staging_pages -= u64::from(r.staging.pages);
    }

    fn abort_one(&mut self, id: u64) {
        let Some(r) = self.reservations.remove(id) else {
            return;
        };
        self.unlink_reservation(&r);
        self.staging.free(r.staging);
        self.drop_entry(r.entry);
    }

    fn lease(&mut self, session: SessionId, e: u32) -> Result<u64> {
        let Some(idx) = self.open_index(session) else {
            return Err(EngineError::UnknownSession(session));
        };
        let s = self.sessions[idx].as_mut().expect("open");
        if s.leases >= self.cfg.max_leases_per_session {
            return Err(EngineError::NoSpace {
                what: "leases of this session",
            });
        }
        let Some(id) = self.leases.insert(LeaseRec {
            entry: e,
            session,
            prev: NIL,
            next: s.lease_head,
        }) else {
            return Err(EngineError::NoSpace {
                what: "lease table",
            });
        };
        let l = slab::index(id);
        if s.lease_head != NIL {
            self.leases.at_mut(s.lease_head).prev = l;
        }
        s.lease_head = l;
        s.leases += 1;
        let ent = &mut self.entries[e as usize];
        if ent.leases == 0 {
            debug_assert_eq!(ent.state, EntryState::Live);
            self.evictable_pages -= u64::from(ent.extent.pages);
        }
        ent.leases += 1;
        Ok(id)
    }

    fn release_one(&mut self, id: u64) {
        let Some(l) = self.leases.remove(id) else {
            return;
        };
        if let Some(idx) = self.open_index(l.session) {
            let s = self.sessions[idx].as_mut().expect("open");
            if l.prev == NIL {
                s.lease_head = l.next;
            } else {
                self.leases.at_mut(l.prev).next = l.next;
            }
            if l.next != NIL {
                self.leases.at_mut(l.next).prev = l.prev;
            }
            s.leases -= 1;
        }
        let e = l.entry;
        let ent = &mut self.entries[e as usize];
        ent.leases -= 1;
        if ent.leases == 0 {
            match ent.state {
                EntryState::Live => {
                    self.evictable_pages += u64::from(ent.extent.pages);
                    self.policy.unpark(e);
                }
                EntryState::Doomed => self.drop_entry(e),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            for l in 0..self.cfg.max_leases {
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
            capacity: 256 * PAGE,
            staging: 64 * PAGE,
            max_value: 8 * PAGE,
            max_leases: 64,
            max_reservations: 32,
            max_reservations_per_session,
            max_sessions: 8,
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
            capacity: 256 * PAGE,
            staging: 64 * PAGE,
            max_value: 8 * PAGE,
            reservation_timeout: Duration::from_millis(20),
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
                capacity: 64 * PAGE,
                staging: 32 * PAGE,
                max_value: 6 * PAGE,
                max_leases: 48,
                max_leases_per_session: 16,
                max_reservations: 12,
                max_reservations_per_session: 5,
                max_sessions: 4,
                policy,
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
