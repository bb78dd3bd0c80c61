//! Open-addressing hash index with Robin Hood displacement, keyed by a 128-bit hash.
//!
//! The table maps a key's 128-bit hash to an entry number. Capacity is fixed at
//! construction (a power of two), so inserts never allocate. Deletion shifts the following
//! run back by one slot (no tombstones), which keeps probe lengths short under churn.
//! The full key is compared by the caller; this table only knows hashes.

const EMPTY: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    hash: u128,
    entry: u32,
    /// Distance from the slot's home position.
    dist: u32,
}

const VACANT: Slot = Slot {
    hash: 0,
    entry: EMPTY,
    dist: 0,
};

/// Fixed-capacity Robin Hood hash index from 128-bit hashes to entry numbers.
#[derive(Debug)]
pub struct RobinHoodIndex {
    slots: Box<[Slot]>,
    mask: usize,
    len: usize,
    max_len: usize,
}

impl RobinHoodIndex {
    /// An index that holds up to `max_len` hashes at a load factor of at most 7/8.
    #[must_use]
    pub fn with_capacity(max_len: usize) -> Self {
        let slots = (max_len.max(1) * 8 / 7 + 1).next_power_of_two();
        Self {
            slots: vec![VACANT; slots].into_boxed_slice(),
            mask: slots - 1,
            len: 0,
            max_len,
        }
    }

    /// Number of hashes present.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most hashes the index accepts.
    #[must_use]
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    fn home(&self, hash: u128) -> usize {
        // The low bits of XXH3-128 are well mixed.
        (hash as usize) & self.mask
    }

    /// The entry stored under `hash`.
    #[must_use]
    pub fn get(&self, hash: u128) -> Option<u32> {
        self.find(hash).map(|i| self.slots[i].entry)
    }

    fn find(&self, hash: u128) -> Option<usize> {
        let mut i = self.home(hash);
        let mut dist = 0;
        loop {
            let s = &self.slots[i];
            if s.entry == EMPTY || s.dist < dist {
                return None;
            }
            if s.hash == hash {
                return Some(i);
            }
            i = (i + 1) & self.mask;
            dist += 1;
        }
    }

    /// Stores `entry` under `hash` and returns the entry it replaced, if any.
    ///
    /// # Panics
    /// When the index already holds `max_len` hashes and `hash` is new; callers bound the
    /// number of live entries by the same limit.
    pub fn insert(&mut self, hash: u128, entry: u32) -> Option<u32> {
        debug_assert_ne!(entry, EMPTY);
        if let Some(i) = self.find(hash) {
            return Some(std::mem::replace(&mut self.slots[i].entry, entry));
        }
        assert!(self.len < self.max_len, "index full");
        let mut cur = Slot {
            hash,
            entry,
            dist: 0,
        };
        let mut i = self.home(hash);
        loop {
            let s = &mut self.slots[i];
            if s.entry == EMPTY {
                *s = cur;
                self.len += 1;
                return None;
            }
            if s.dist < cur.dist {
                std::mem::swap(s, &mut cur);
            }
            i = (i + 1) & self.mask;
            cur.dist += 1;
        }
    }

    /// Removes `hash` and returns its entry.
    pub fn remove(&mut self, hash: u128) -> Option<u32> {
        let mut i = self.find(hash)?;
        let entry = self.slots[i].entry;
        loop {
            let j = (i + 1) & self.mask;
            let next = self.slots[j];
            if next.entry == EMPTY || next.dist == 0 {
                self.slots[i] = VACANT;
                break;
            }
            self.slots[i] = Slot {
                dist: next.dist - 1,
                ..next
            };
            i = j;
        }
        self.len -= 1;
        Some(entry)
    }

    /// Longest probe distance present (for tests and stats; a linear walk).
    #[must_use]
    pub fn max_probe(&self) -> u32 {
        self.slots
            .iter()
            .filter(|s| s.entry != EMPTY)
            .map(|s| s.dist)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn colliding_home_slots_all_found() {
        let mut ix = RobinHoodIndex::with_capacity(64);
        let n = ix.slots.len() as u128;
        // Same home slot, different hashes.
        for k in 0..20u128 {
            assert_eq!(ix.insert(5 + k * n, k as u32), None);
        }
        for k in 0..20u128 {
            assert_eq!(ix.get(5 + k * n), Some(k as u32));
        }
        assert_eq!(ix.remove(5 + 3 * n), Some(3));
        assert_eq!(ix.get(5 + 3 * n), None);
        assert_eq!(ix.get(5 + 19 * n), Some(19));
    }

    proptest! {
        /// Against a HashMap: every operation returns what the model returns, and the length
        /// agrees. Hashes are drawn from a small space so that home slots collide often.
        #[test]
        fn matches_hashmap(ops in proptest::collection::vec((0u8..3, 0u128..200, 0u32..1000), 1..2000)) {
            let mut ix = RobinHoodIndex::with_capacity(200);
            let mut model = HashMap::new();
            for (op, h, e) in ops {
                // Spread the small space over high bits too, keeping collisions on low bits.
                let hash = h | (h << 64);
                match op {
                    0 => prop_assert_eq!(ix.insert(hash, e), model.insert(hash, e)),
                    1 => prop_assert_eq!(ix.remove(hash), model.remove(&hash)),
                    _ => prop_assert_eq!(ix.get(hash), model.get(&hash).copied()),
                }
                prop_assert_eq!(ix.len(), model.len());
            }
            for (h, e) in &model {
                prop_assert_eq!(ix.get(*h), Some(*e));
            }
        }
    }
}
