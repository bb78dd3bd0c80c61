//! A fixed-capacity slab whose ids carry a generation, so that a stale or forged id is
//! recognised as unknown instead of aliasing a newer occupant. Its tables are allocated once.
//!
//! Besides ids, occupants can be addressed by slot index, which is what the engine's intrusive
//! lists (a session's leases and reservations, the reservations in deadline order) link by.

/// No slot: the end of an intrusive list.
pub(crate) const NIL: u32 = u32::MAX;

/// Slab of at most `capacity` values addressed by `u64` ids (`generation << 32 | index`).
#[derive(Debug)]
pub(crate) struct Slab<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(capacity: u32) -> Self {
        let mut slots = Vec::with_capacity(capacity as usize);
        slots.resize_with(capacity as usize, || (0, None));
        Self {
            slots,
            free: (0..capacity).rev().collect(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether every slot is taken.
    pub(crate) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Stores `value` and returns its id, or `None` when full.
    pub(crate) fn insert(&mut self, value: T) -> Option<u64> {
        let i = self.free.pop()?;
        let slot = &mut self.slots[i as usize];
        slot.0 = slot.0.wrapping_add(1);
        slot.1 = Some(value);
        self.len += 1;
        Some(u64::from(slot.0) << 32 | u64::from(i))
    }

    fn slot(&self, id: u64) -> Option<&(u32, Option<T>)> {
        let s = self.slots.get(index(id) as usize)?;
        (u64::from(s.0) == id >> 32).then_some(s)
    }

    pub(crate) fn get(&self, id: u64) -> Option<&T> {
        self.slot(id)?.1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.slot(id)?;
        self.slots[index(id) as usize].1.as_mut()
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        self.slot(id)?;
        let i = index(id);
        let v = self.slots[i as usize].1.take()?;
        // Never exceeds the capacity reserved at construction, so this does not allocate.
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// Whether slot `i` is occupied.
    #[cfg(test)]
    pub(crate) fn is_occupied(&self, i: u32) -> bool {
        self.slots.get(i as usize).is_some_and(|s| s.1.is_some())
    }

    /// The id of the occupant of slot `i`.
    ///
    /// # Panics
    /// When slot `i` is empty (a broken intrusive list).
    pub(crate) fn id_at(&self, i: u32) -> u64 {
        let s = &self.slots[i as usize];
        assert!(s.1.is_some(), "slot {i} is empty");
        u64::from(s.0) << 32 | u64::from(i)
    }

    /// The occupant of slot `i`.
    ///
    /// # Panics
    /// When slot `i` is empty (a broken intrusive list).
    pub(crate) fn at(&self, i: u32) -> &T {
        self.slots[i as usize].1.as_ref().expect("occupied slot")
    }

    /// The occupant of slot `i`, mutably.
    ///
    /// # Panics
    /// When slot `i` is empty (a broken intrusive list).
    pub(crate) fn at_mut(&mut self, i: u32) -> &mut T {
        self.slots[i as usize].1.as_mut().expect("occupied slot")
    }
}

/// The slot index of an id.
pub(crate) fn index(id: u64) -> u32 {
    (id & 0xffff_ffff) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_are_unknown() {
        let mut s = Slab::with_capacity(2);
        let a = s.insert(1).unwrap();
        let _b = s.insert(2).unwrap();
        assert_eq!(s.insert(3), None);
        assert!(s.is_full());
        assert_eq!(s.remove(a), Some(1));
        let c = s.insert(4).unwrap();
        assert_eq!(index(c), index(a));
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(c), Some(&4));
        assert_eq!(s.id_at(index(c)), c);
        assert_eq!(*s.at(index(c)), 4);
        assert_eq!(s.get(u64::MAX), None);
    }
}
