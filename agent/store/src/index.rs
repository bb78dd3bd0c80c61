//! The in-memory index: key hash to [`Location`] plus a read count (for the hot rule at
//! eviction), and the bytes the live entries take.
//!
//! Hashes are the caller's 128-bit key hashes, already uniformly distributed, so the map
//! hashes them by folding instead of running SipHash over them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::Location;
use crate::format::entry_size;

/// Folds a u128 key (already a good hash) into the map's u64 hash.
#[derive(Default, Clone, Copy)]
pub(crate) struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            self.0 =
                (self.0.rotate_left(5) ^ u64::from_le_bytes(a)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 ^= (v as u64) ^ ((v >> 64) as u64);
    }
}

/// Build hasher for maps and sets keyed by u128 hashes.
pub(crate) type FoldBuild = BuildHasherDefault<FoldHasher>;

/// A set of u128 hashes.
pub(crate) type HashSet128 = std::collections::HashSet<u128, FoldBuild>;

/// One indexed entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Where it is.
    pub loc: Location,
    /// Hits since it was written (saturating).
    pub reads: u32,
}

/// Bytes an entry at `loc` takes on the device.
pub(crate) fn loc_size(loc: &Location) -> u64 {
    entry_size(
        u64::from(loc.key_len),
        u64::from(loc.meta_len),
        loc.value_len,
    )
}

/// The index.
#[derive(Debug, Default, Clone)]
pub(crate) struct Index {
    map: HashMap<u128, IndexEntry, FoldBuild>,
    used_bytes: u64,
}

impl Index {
    /// Live entries.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes the live entries take.
    pub(crate) fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// The entry of `hash`.
    pub(crate) fn get(&self, hash: u128) -> Option<&IndexEntry> {
        self.map.get(&hash)
    }

    /// Whether `hash` is indexed with exactly this seq.
    pub(crate) fn has_seq(&self, hash: u128, seq: u64) -> bool {
        self.map.get(&hash).is_some_and(|e| e.loc.seq == seq)
    }

    /// Indexes `loc` for `hash`, replacing (and returning) what was there.
    pub(crate) fn insert(&mut self, hash: u128, loc: Location) -> Option<IndexEntry> {
        self.used_bytes += loc_size(&loc);
        let old = self.map.insert(hash, IndexEntry { loc, reads: 0 });
        if let Some(o) = &old {
            self.used_bytes -= loc_size(&o.loc);
        }
        old
    }

    /// Drops `hash`.
    pub(crate) fn remove(&mut self, hash: u128) -> Option<IndexEntry> {
        let old = self.map.remove(&hash);
        if let Some(o) = &old {
            self.used_bytes -= loc_size(&o.loc);
        }
        old
    }

    /// Drops `hash` if it is indexed with this seq.
    pub(crate) fn remove_seq(&mut self, hash: u128, seq: u64) -> Option<IndexEntry> {
        if self.has_seq(hash, seq) {
            self.remove(hash)
        } else {
            None
        }
    }

    /// Counts a hit on `hash` if it is still indexed with this seq.
    pub(crate) fn note_read(&mut self, hash: u128, seq: u64) {
        if let Some(e) = self.map.get_mut(&hash)
            && e.loc.seq == seq
        {
            e.reads = e.reads.saturating_add(1);
        }
    }

    /// Every entry.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u128, &IndexEntry)> + '_ {
        self.map.iter().map(|(h, e)| (*h, e))
    }

    /// Drops every entry `pred` selects; returns how many.
    pub(crate) fn remove_where(&mut self, mut pred: impl FnMut(&IndexEntry) -> bool) -> u64 {
        let mut freed = 0;
        let mut n = 0;
        self.map.retain(|_, e| {
            if pred(e) {
                freed += loc_size(&e.loc);
                n += 1;
                false
            } else {
                true
            }
        });
        self.used_bytes -= freed;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(seq: u64, value_len: u64) -> Location {
        Location {
            value_len,
            key_len: 4,
            meta_len: 0,
            seq,
            expires_unix_ms: u64::MAX,
            offset: 4096,
        }
    }

    #[test]
    fn used_bytes_follow_inserts_and_removes() {
        let mut i = Index::default();
        i.insert(1, loc(1, 10));
        assert_eq!(i.used_bytes(), 8192);
        i.insert(1, loc(2, 5000));
        assert_eq!(i.used_bytes(), 4096 + 8192);
        assert!(i.remove_seq(1, 1).is_none());
        i.note_read(1, 2);
        assert_eq!(i.get(1).map(|e| e.reads), Some(1));
        i.insert(2, loc(3, 0));
        assert_eq!(i.remove_where(|e| e.loc.seq == 3), 1);
        assert!(i.remove_seq(1, 2).is_some());
        assert_eq!((i.len(), i.used_bytes()), (0, 0));
    }
}
