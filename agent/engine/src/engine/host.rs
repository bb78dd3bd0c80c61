//! The host tier's entries and their placement in the arena: lookup by key, room for a new
//! value (policy order, else the cheapest window), recoverable evictions with their undo
//! stack, and publishing or dooming entries. The module docs of [`super`] describe the
//! placement rules.

use super::{Reserved, State};
use crate::{
    alloc::Extent,
    error::{EngineError, Result},
    key::key_hash,
    policy::Candidate,
    shm::SharedRegion,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EntryState {
    Free,
    Reserved,
    Live,
    /// Removed from the index while leased; freed when the last lease goes.
    Doomed,
    /// Evicted by the reserve call in progress: out of the index, its extent back in the
    /// allocator, but its bytes and slot kept until the call succeeds (then it is freed) or
    /// is refused (then it is restored).
    Evicted,
    /// Owns an extent that a value is being read into from a lower tier; known to no index
    /// or queue until published.
    Loading,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Entry {
    pub(super) hash: u128,
    pub(super) extent: Extent,
    pub(super) value_len: u64,
    /// Live: milliseconds since the engine's epoch from which it is expired (`u64::MAX`:
    /// never). Reserved: its TTL in milliseconds (`u64::MAX`: none), applied at publish.
    pub(super) expires: u64,
    pub(super) key_len: u16,
    pub(super) meta_len: u16,
    pub(super) state: EntryState,
    pub(super) leases: u32,
    /// Free: the next free entry. Reserved or Evicted within a reserve call: the next entry
    /// down the call's undo stack.
    pub(super) link: u32,
    /// Evicted: first page of the free extent its pages joined, to take them back.
    pub(super) run: u32,
    /// The lower tier (1-based index into the engine's tiers) holding a copy; 0: none.
    pub(super) lower: u8,
    /// Pinned while a demotion writes it (counted in `leases`).
    pub(super) demoting: bool,
}

pub(super) const NO_ENTRY: u32 = u32::MAX;

/// Pages that `bytes` take, at least one (`page` is a power of two: a shift, not a division).
pub(super) fn pages_for(bytes: u64, page: u64) -> u32 {
    ((bytes + page - 1) >> page.trailing_zeros()).max(1) as u32
}

/// When choosing a placement window, a page of an entry counts `1 + HOT_WEIGHT * heat` (heat:
/// its read count, plus one in S3-FIFO's main queue), so windows of cold entries win unless
/// they evict several times the bytes. Chosen on the policy benchmark's mixed-size trace
/// (with leases held 0 to 16 requests): hit ratios 0.465 (bytes only, heat as a tie-break),
/// 0.513 (1), 0.532 (4), 0.535 (8) for S3-FIFO; every choice evicts the same bytes per
/// admitted byte.
pub(super) const HOT_WEIGHT: u64 = 4;

pub(super) const NO_ROOM: EngineError = EngineError::NoSpace {
    what: "host arena (the rest is leased or reserved)",
};
pub(super) const NO_WINDOW: EngineError = EngineError::NoSpace {
    what: "host arena (leased or reserved entries leave no run of pages long enough)",
};

impl State {
    /// The live entry for `key`, comparing the full key. An expired entry is dropped.
    pub(super) fn find_live(&mut self, arena: &SharedRegion, key: &[u8], now: u64) -> Option<u32> {
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

    /// Allocates `pages`, evicting as needed (see the module docs for the order). Victims go
    /// on the undo stack; a refusal leaves none of this call's.
    pub(super) fn make_room(&mut self, pages: u32, now: u64) -> Result<Extent> {
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
    pub(super) fn extent_cost(&self, p: u32, now: u64) -> (u32, Option<(u64, u64)>) {
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
    pub(super) fn cheapest_window(&self, pages: u32, now: u64) -> Option<(u32, u32)> {
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
    pub(super) fn window_from(
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
    pub(super) fn evict(&mut self, v: u32) {
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
    pub(super) fn restore(&mut self, v: u32) {
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

    pub(super) fn push_undo(&mut self, e: u32) {
        self.entries[e as usize].link = self.undo;
        self.undo = e;
        self.undo_len += 1;
    }

    pub(super) fn pop_undo(&mut self) -> u32 {
        let e = self.undo;
        debug_assert_ne!(e, NO_ENTRY);
        self.undo = self.entries[e as usize].link;
        self.entries[e as usize].link = NO_ENTRY;
        self.undo_len -= 1;
        e
    }

    /// A reserve call was refused: undoes its reservations (`out`, in order) and evictions,
    /// newest first, so the allocator, index and queues are as before the call.
    pub(super) fn undo_reserve(&mut self, out: &[Reserved]) {
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
    pub(super) fn finish_reserve(&mut self, now: u64) {
        while self.undo != NO_ENTRY {
            let e = self.pop_undo();
            let ent = self.entries[e as usize];
            if ent.state == EntryState::Evicted {
                let expired = ent.expires <= now;
                if expired {
                    self.stats.expirations += 1;
                } else {
                    self.stats.evictions += 1;
                    if self.has_lower && ent.lower == 0 {
                        self.stats.evictions_unsaved += 1;
                    }
                }
                self.policy.forget(e, ent.hash, expired);
                self.free_entry_slot(e);
            }
        }
    }

    /// Publishes a committed reservation; returns its entry (`None` if the reservation is
    /// gone).
    pub(super) fn publish(&mut self, id: u64, now: u64) -> Option<u32> {
        let r = self.reservations.remove(id)?;
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
        Some(e)
    }

    /// Takes a live entry out of the index (the caller has unlinked it from the policy).
    pub(super) fn unpublish(&mut self, e: u32) {
        let hash = self.entries[e as usize].hash;
        if self.index.get(hash) == Some(e) {
            self.index.remove(hash);
        }
        self.doom(e);
    }

    /// A live entry out of the index: freed now, or when its last lease goes.
    pub(super) fn doom(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        debug_assert_eq!(ent.state, EntryState::Live);
        ent.state = EntryState::Doomed;
        if ent.demoting {
            let hash = ent.hash;
            self.demoting_doomed.insert(hash);
        }
        let ent = &mut self.entries[e as usize];
        if ent.leases == 0 {
            self.evictable_pages -= u64::from(ent.extent.pages);
            self.drop_entry(e);
        }
    }

    pub(super) fn drop_entry(&mut self, e: u32) {
        self.arena.free(self.entries[e as usize].extent);
        self.free_entry_slot(e);
    }

    pub(super) fn free_entry_slot(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        ent.state = EntryState::Free;
        ent.link = self.free_entry;
        self.free_entry = e;
    }

    /// Pins a live entry: not evictable until unpinned (a lease, or a demotion in flight).
    pub(super) fn pin(&mut self, e: u32) {
        let ent = &mut self.entries[e as usize];
        if ent.leases == 0 {
            debug_assert_eq!(ent.state, EntryState::Live);
            self.evictable_pages -= u64::from(ent.extent.pages);
        }
        ent.leases += 1;
    }

    /// Undoes [`State::pin`]. The last pin makes a live entry evictable again, back at the
    /// head of the main queue after a `read`, at its cold end otherwise (a demotion wrote it
    /// down: evicting it now costs nothing); it frees a doomed entry.
    pub(super) fn unpin(&mut self, e: u32, read: bool) {
        let ent = &mut self.entries[e as usize];
        ent.leases -= 1;
        if ent.leases == 0 {
            match ent.state {
                EntryState::Live => {
                    self.evictable_pages += u64::from(ent.extent.pages);
                    if read {
                        self.policy.unpark(e);
                    } else {
                        self.policy.unpark_cold(e);
                    }
                }
                EntryState::Doomed => self.drop_entry(e),
                _ => {}
            }
        }
    }

    /// Takes a free entry slot for a new entry owning `extent` (the caller has allocated
    /// it); `lens` are the key's and the metadata's lengths.
    pub(super) fn new_entry(
        &mut self,
        hash: u128,
        extent: Extent,
        value_len: u64,
        lens: (usize, usize),
        expires: u64,
        state: EntryState,
    ) -> u32 {
        let e = self.free_entry;
        assert_ne!(e, NO_ENTRY, "an entry per arena page and per batch item");
        let ent = &mut self.entries[e as usize];
        self.free_entry = ent.link;
        *ent = Entry {
            hash,
            extent,
            value_len,
            expires,
            key_len: lens.0 as u16,
            meta_len: lens.1 as u16,
            state,
            leases: 0,
            link: NO_ENTRY,
            run: 0,
            lower: 0,
            demoting: false,
        };
        self.owner[extent.start as usize] = e;
        e
    }
}
