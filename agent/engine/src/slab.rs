//! A fixed-capacity slab whose ids carry a generation, so that a stale or forged id is
//! recognised as unknown instead of aliasing a newer occupant. Its tables are allocated once.

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
        let s = self.slots.get((id & 0xffff_ffff) as usize)?;
        (u64::from(s.0) == id >> 32).then_some(s)
    }

    pub(crate) fn get(&self, id: u64) -> Option<&T> {
        self.slot(id)?.1.as_ref()
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut T> {
        self.slot(id)?;
        self.slots[(id & 0xffff_ffff) as usize].1.as_mut()
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<T> {
        self.slot(id)?;
        let i = (id & 0xffff_ffff) as u32;
        let v = self.slots[i as usize].1.take()?;
        // Never exceeds the capacity reserved at construction, so this does not allocate.
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// Ids of the values for which `pred` holds (a linear walk, for rare bulk operations).
    pub(crate) fn ids_where(&self, mut pred: impl FnMut(&T) -> bool) -> Vec<u64> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, (g, v))| {
                v.as_ref()
                    .filter(|v| pred(v))
                    .map(|_| u64::from(*g) << 32 | i as u64)
            })
            .collect()
    }
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
        assert_eq!(s.remove(a), Some(1));
        let c = s.insert(4).unwrap();
        assert_eq!(c & 0xffff_ffff, a & 0xffff_ffff);
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        assert_eq!(s.get(c), Some(&4));
        assert_eq!(s.get(u64::MAX), None);
    }
}
