//! The region table: which regions are free, which one is being appended to, and the sealed
//! ones in the order they will be evicted (FIFO: oldest first).
//!
//! Every region is in exactly one of three places: the free queue, the active slot (at most
//! one region) or the sealed queue (or, once the table is capped, set aside). Regions leave the free queue from the front and are
//! returned to its front when their preparation fails; sealed regions are evicted from the
//! front of the sealed queue, so a region is reused only after every region filled before it
//! (tombstones, which are newer than what they delete, are therefore never overwritten while
//! the entries they delete could still be found by a scan).
//!
//! A device smaller than configured (ENOSPC while preallocating a free region) caps the table
//! with [`Regions::cap_to_allocated`]: the free regions are set aside for the rest of the run
//! and the store goes on reusing the regions it has (FIFO), whose space is already allocated.
//!
//! This module only does bookkeeping; the store holds it under its state mutex.

use std::collections::VecDeque;

/// Where a region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegionState {
    /// Holds nothing the index points to; may be allocated.
    Free,
    /// Being appended to.
    Active,
    /// Full (or closed after an error); evicted in FIFO order.
    Sealed,
}

/// One region's bookkeeping.
#[derive(Debug, Clone)]
pub(crate) struct Region {
    /// Where it is.
    pub state: RegionState,
    /// Seq of its first entry (0: none yet).
    pub first_seq: u64,
    /// Bytes appended from its start.
    pub write_off: u64,
    /// (hash, seq) of entries appended, some of which may since have been replaced or
    /// removed (the index decides which are live).
    pub entries: Vec<(u128, u64)>,
}

impl Region {
    fn empty() -> Self {
        Self {
            state: RegionState::Free,
            first_seq: 0,
            write_off: 0,
            entries: Vec::new(),
        }
    }
}

/// The region table.
#[derive(Debug, Clone)]
pub(crate) struct Regions {
    regions: Vec<Region>,
    free: VecDeque<u32>,
    sealed: VecDeque<u32>,
    active: Option<u32>,
    /// Free regions set aside by [`Self::cap_to_allocated`] (never allocated again).
    retired: Vec<u32>,
    region_size: u64,
}

impl Regions {
    /// `count` free regions of `region_size` bytes.
    pub(crate) fn new(count: u32, region_size: u64) -> Self {
        Self {
            regions: (0..count).map(|_| Region::empty()).collect(),
            free: (0..count).collect(),
            sealed: VecDeque::new(),
            active: None,
            retired: Vec::new(),
            region_size,
        }
    }

    /// Regions the store may use: all of them unless capped.
    pub(crate) fn usable(&self) -> u32 {
        (self.regions.len() - self.retired.len()) as u32
    }

    /// Sealed regions.
    pub(crate) fn sealed_count(&self) -> usize {
        self.sealed.len()
    }

    /// Sets every free region aside for good (the device has no room for them): from now on
    /// room is made only by evicting sealed regions. Returns the regions still usable.
    pub(crate) fn cap_to_allocated(&mut self) -> u32 {
        self.retired.extend(self.free.drain(..));
        self.usable()
    }

    /// One region.
    pub(crate) fn get(&self, r: u32) -> &Region {
        &self.regions[r as usize]
    }

    /// One region, mutable.
    pub(crate) fn get_mut(&mut self, r: u32) -> &mut Region {
        &mut self.regions[r as usize]
    }

    /// The active region.
    #[cfg(test)]
    pub(crate) fn active(&self) -> Option<u32> {
        self.active
    }

    /// Sealed regions, oldest first.
    #[cfg(test)]
    pub(crate) fn sealed(&self) -> impl Iterator<Item = u32> + '_ {
        self.sealed.iter().copied()
    }

    /// Free regions, next to be allocated first.
    #[cfg(test)]
    pub(crate) fn free(&self) -> impl Iterator<Item = u32> + '_ {
        self.free.iter().copied()
    }

    /// Reserves `size` bytes at the end of the active region; returns (region, offset in
    /// region) or `None` if there is no active region or it lacks the room.
    pub(crate) fn reserve(&mut self, size: u64, seq: u64) -> Option<(u32, u64)> {
        let r = self.active?;
        let reg = &mut self.regions[r as usize];
        if reg.write_off + size > self.region_size {
            return None;
        }
        let off = reg.write_off;
        if off == 0 {
            reg.first_seq = seq;
        }
        reg.write_off += size;
        Some((r, off))
    }

    /// Seals the active region (if any, and if anything was appended to it; an empty one
    /// goes back to the front of the free queue). Returns whether a region was sealed.
    pub(crate) fn seal_active(&mut self) -> bool {
        let Some(r) = self.active.take() else {
            return false;
        };
        let reg = &mut self.regions[r as usize];
        if reg.write_off == 0 {
            reg.state = RegionState::Free;
            self.free.push_front(r);
            false
        } else {
            reg.state = RegionState::Sealed;
            self.sealed.push_back(r);
            true
        }
    }

    /// Seals `r` if it is the active region (after a failed write into it).
    pub(crate) fn seal_if_active(&mut self, r: u32) -> bool {
        if self.active == Some(r) {
            self.seal_active()
        } else {
            false
        }
    }

    /// Takes the next free region (not yet active: call [`Self::activate`] once it is
    /// prepared, or [`Self::return_free`] if preparing it failed).
    pub(crate) fn take_free(&mut self) -> Option<u32> {
        self.free.pop_front()
    }

    /// Takes the oldest sealed region for eviction; the caller drops its entries from the
    /// index, then activates or returns it. Its entry list is handed over.
    pub(crate) fn take_oldest_sealed(&mut self) -> Option<(u32, Vec<(u128, u64)>)> {
        let r = self.sealed.pop_front()?;
        let reg = &mut self.regions[r as usize];
        reg.state = RegionState::Free;
        reg.first_seq = 0;
        reg.write_off = 0;
        Some((r, std::mem::take(&mut reg.entries)))
    }

    /// The oldest sealed region, without taking it.
    pub(crate) fn oldest_sealed(&self) -> Option<u32> {
        self.sealed.front().copied()
    }

    /// Makes a taken region the active one (there must be none).
    pub(crate) fn activate(&mut self, r: u32) {
        debug_assert!(self.active.is_none());
        let reg = &mut self.regions[r as usize];
        reg.state = RegionState::Active;
        reg.first_seq = 0;
        reg.write_off = 0;
        reg.entries.clear();
        self.active = Some(r);
    }

    /// Returns a taken region to the front of the free queue.
    pub(crate) fn return_free(&mut self, r: u32) {
        let reg = &mut self.regions[r as usize];
        reg.state = RegionState::Free;
        reg.first_seq = 0;
        reg.write_off = 0;
        reg.entries.clear();
        self.free.push_front(r);
    }

    /// Rebuilds the table after recovery: `used` lists (region, first seq, end) of regions
    /// holding entries; they become sealed, oldest (smallest first seq) first; the rest are
    /// free in ascending order.
    pub(crate) fn restore(count: u32, region_size: u64, mut used: Vec<(u32, u64, u64)>) -> Self {
        let mut t = Self::new(count, region_size);
        used.sort_by_key(|&(_, first, _)| first);
        let mut is_used = vec![false; count as usize];
        for &(r, first, end) in &used {
            let reg = &mut t.regions[r as usize];
            reg.state = RegionState::Sealed;
            reg.first_seq = first;
            reg.write_off = end.min(region_size);
            is_used[r as usize] = true;
            t.sealed.push_back(r);
        }
        t.free = (0..count).filter(|&r| !is_used[r as usize]).collect();
        t
    }

    /// Checks the invariants (every region in exactly one place, states agree).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut seen = vec![0u8; self.regions.len()];
        for &r in self.free.iter().chain(&self.retired) {
            seen[r as usize] += 1;
            assert_eq!(self.regions[r as usize].state, RegionState::Free);
        }
        for &r in &self.sealed {
            seen[r as usize] += 1;
            assert_eq!(self.regions[r as usize].state, RegionState::Sealed);
            assert!(self.regions[r as usize].write_off > 0);
        }
        if let Some(r) = self.active {
            seen[r as usize] += 1;
            assert_eq!(self.regions[r as usize].state, RegionState::Active);
        }
        for reg in &self.regions {
            assert!(reg.write_off <= self.region_size);
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "a region is in two places or none: {seen:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append(u64),
        Seal,
        FailPrepare,
        Cap,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u64..=64).prop_map(|b| Op::Append(b * 4096)),
            1 => Just(Op::Seal),
            1 => Just(Op::FailPrepare),
            1 => Just(Op::Cap),
        ]
    }

    /// Drives the table the way the store does: append; when the active region is full,
    /// seal it, take a free region or evict the oldest sealed one.
    fn append(t: &mut Regions, size: u64, seq: u64, fail: bool, evicted: &mut Vec<u32>) {
        if t.reserve(size, seq).is_some() {
            return;
        }
        t.seal_active();
        let r = if let Some(r) = t.take_free() {
            r
        } else {
            let (r, _) = t
                .take_oldest_sealed()
                .expect("with two regions one is sealed");
            evicted.push(r);
            r
        };
        if fail {
            t.return_free(r);
            return;
        }
        t.activate(r);
        assert_eq!(t.reserve(size, seq), Some((r, 0)));
        assert_eq!(t.get(r).first_seq, seq);
    }

    proptest! {
        #[test]
        fn allocator_keeps_every_region_in_one_place_and_evicts_fifo(
            count in 2u32..8,
            ops in prop::collection::vec(op(), 1..200),
        ) {
            let size = 64 * 4096;
            let mut t = Regions::new(count, size);
            let mut evicted = Vec::new();
            let mut activations: Vec<u32> = Vec::new();
            let mut seq = 1;
            let mut fail_next = false;
            for op in ops {
                let before = t.active();
                match op {
                    Op::Append(b) => {
                        append(&mut t, b, seq, fail_next, &mut evicted);
                        fail_next = false;
                        seq += 1;
                    }
                    Op::Seal => { t.seal_active(); }
                    Op::FailPrepare => fail_next = true,
                    // As the store does: only with at least two sealed regions to reuse.
                    Op::Cap => if t.sealed_count() >= 2 {
                        let allocated = t.usable() - t.free().count() as u32;
                        prop_assert_eq!(t.cap_to_allocated(), allocated);
                        prop_assert_eq!(t.free().count(), 0);
                    },
                }
                if let Some(a) = t.active() && before != Some(a) {
                    activations.push(a);
                }
                t.check();
            }
            // Regions are evicted in the order they were (last) activated, never one that is
            // younger than another sealed region.
            let mut seals: Vec<u32> = Vec::new();
            for a in &activations {
                seals.retain(|x| x != a);
                seals.push(*a);
            }
            let sealed: Vec<u32> = t.sealed().collect();
            let mut order = seals.clone();
            order.retain(|r| sealed.contains(r));
            prop_assert_eq!(sealed, order);
        }
    }

    #[test]
    fn restore_orders_by_first_seq() {
        let t = Regions::restore(
            4,
            1 << 20,
            vec![(2, 50, 4096), (0, 70, 8192), (3, 10, 4096)],
        );
        t.check();
        assert_eq!(t.sealed().collect::<Vec<_>>(), vec![3, 2, 0]);
        assert_eq!(t.free().collect::<Vec<_>>(), vec![1]);
        assert_eq!(t.get(0).write_off, 8192);
    }
}
