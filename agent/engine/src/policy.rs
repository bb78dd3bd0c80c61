//! Eviction policies over the engine's entries: S3-FIFO (the default) and plain LRU (the
//! baseline it was chosen against; see `docs/benchmarks.md` for hit ratios on a Zipf trace
//! and a prefix-sharing chat trace).
//!
//! S3-FIFO (Yang et al., SOSP 2023) keeps a small FIFO for new entries, a main FIFO with
//! CLOCK-style reinsertion, and a ghost set of recently evicted hashes. A new entry enters the
//! small queue; when it reaches the tail it moves to main if it was read meanwhile, and is
//! evicted (its hash remembered in the ghost) otherwise. An entry whose hash is in the ghost
//! enters main directly. One-hit wonders (a long prompt read once) thus leave quickly without
//! flushing shared system prompts. Queues are measured in bytes, since values vary in size.
//!
//! Links are arrays indexed by entry number, allocated once: nothing here allocates after
//! construction. Entries under a lease are never chosen; they are rotated to the head.

use crate::engine::EvictionPolicy;

const NIL: u32 = u32::MAX;
const MAX_FREQ: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    None,
    Small,
    Main,
}

impl Queue {
    fn idx(self) -> usize {
        match self {
            Self::Small => 0,
            Self::Main | Self::None => 1,
        }
    }
}

/// What the policy needs to know about an entry when picking a victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Candidate {
    /// Evictable.
    Evictable,
    /// Past its TTL: evict whatever its frequency.
    Expired,
    /// Leased: must not be evicted now.
    Pinned,
}

/// Lossy set of 64-bit fingerprints, direct-mapped: a newer fingerprint overwrites an older
/// one in its slot, which ages the set without bookkeeping.
#[derive(Debug)]
struct Ghost {
    slots: Vec<u64>,
    mask: usize,
}

impl Ghost {
    fn new(capacity: usize) -> Self {
        let n = capacity.max(16).next_power_of_two();
        Self {
            slots: vec![0; n],
            mask: n - 1,
        }
    }

    /// Slot index and fingerprint (never zero, which marks an empty slot).
    fn fp(hash: u128) -> (usize, u64) {
        ((hash as usize), ((hash >> 64) as u64) | 1)
    }

    fn insert(&mut self, hash: u128) {
        let (i, fp) = Self::fp(hash);
        self.slots[i & self.mask] = fp;
    }

    /// Whether `hash` is remembered; forgets it if so.
    fn take(&mut self, hash: u128) -> bool {
        let (i, fp) = Self::fp(hash);
        let s = &mut self.slots[i & self.mask];
        let hit = *s == fp;
        if hit {
            *s = 0;
        }
        hit
    }
}

/// Eviction state for up to `capacity` entries.
#[derive(Debug)]
pub(crate) struct Policy {
    kind: EvictionPolicy,
    prev: Vec<u32>,
    next: Vec<u32>,
    queue: Vec<Queue>,
    freq: Vec<u8>,
    size: Vec<u64>,
    head: [u32; 2],
    tail: [u32; 2],
    bytes: [u64; 2],
    len: [usize; 2],
    small_target: u64,
    ghost: Ghost,
}

impl Policy {
    /// Policy state for `capacity` entries in `capacity_bytes`, the small queue starting at
    /// `small_percent` of it.
    pub(crate) fn new(
        kind: EvictionPolicy,
        capacity: u32,
        capacity_bytes: u64,
        small_percent: u8,
    ) -> Self {
        let n = capacity as usize;
        Self {
            kind,
            prev: vec![NIL; n],
            next: vec![NIL; n],
            queue: vec![Queue::None; n],
            freq: vec![0; n],
            size: vec![0; n],
            head: [NIL; 2],
            tail: [NIL; 2],
            bytes: [0; 2],
            len: [0; 2],
            small_target: capacity_bytes * u64::from(small_percent) / 100,
            ghost: Ghost::new(n),
        }
    }

    /// A newly committed entry.
    pub(crate) fn insert(&mut self, e: u32, hash: u128, bytes: u64) {
        let q = match self.kind {
            EvictionPolicy::Lru => Queue::Main,
            EvictionPolicy::S3Fifo if self.ghost.take(hash) => Queue::Main,
            EvictionPolicy::S3Fifo => Queue::Small,
        };
        self.freq[e as usize] = 0;
        self.size[e as usize] = bytes;
        self.push_head(q, e);
    }

    /// A read of the entry.
    pub(crate) fn touch(&mut self, e: u32) {
        match self.kind {
            EvictionPolicy::Lru => {
                self.unlink(e);
                self.push_head(Queue::Main, e);
            }
            EvictionPolicy::S3Fifo => {
                let f = &mut self.freq[e as usize];
                *f = (*f + 1).min(MAX_FREQ);
            }
        }
    }

    /// The entry left for another reason than eviction (delete, overwrite, expiry on access).
    pub(crate) fn remove(&mut self, e: u32) {
        self.unlink(e);
    }

    /// Picks the next victim and unlinks it, or `None` when every entry is pinned.
    /// `hash_of` gives the victim's hash, remembered in the ghost if it leaves the small queue.
    pub(crate) fn evict(
        &mut self,
        mut classify: impl FnMut(u32) -> Candidate,
        hash_of: impl Fn(u32) -> u128,
    ) -> Option<u32> {
        // Each entry can be rotated at most MAX_FREQ + 2 times before it is chosen or found
        // pinned on every pass.
        let mut budget = (self.len[0] + self.len[1]) * (usize::from(MAX_FREQ) + 2) + 2;
        while budget > 0 {
            budget -= 1;
            let from_small =
                self.len[0] > 0 && (self.bytes[0] > self.small_target || self.len[1] == 0);
            let q = if from_small {
                Queue::Small
            } else {
                Queue::Main
            };
            let e = self.tail[q.idx()];
            if e == NIL {
                return None;
            }
            match classify(e) {
                Candidate::Expired => {
                    self.unlink(e);
                    return Some(e);
                }
                Candidate::Pinned => {
                    self.unlink(e);
                    self.push_head(Queue::Main, e);
                }
                Candidate::Evictable if self.kind == EvictionPolicy::Lru => {
                    self.unlink(e);
                    return Some(e);
                }
                Candidate::Evictable if q == Queue::Small => {
                    self.unlink(e);
                    if self.freq[e as usize] > 0 {
                        self.freq[e as usize] = 0;
                        self.push_head(Queue::Main, e);
                    } else {
                        self.ghost.insert(hash_of(e));
                        return Some(e);
                    }
                }
                Candidate::Evictable => {
                    self.unlink(e);
                    if self.freq[e as usize] > 0 {
                        self.freq[e as usize] -= 1;
                        self.push_head(Queue::Main, e);
                    } else {
                        return Some(e);
                    }
                }
            }
        }
        None
    }

    fn push_head(&mut self, q: Queue, e: u32) {
        let qi = q.idx();
        let i = e as usize;
        self.queue[i] = q;
        self.prev[i] = NIL;
        self.next[i] = self.head[qi];
        if self.head[qi] == NIL {
            self.tail[qi] = e;
        } else {
            self.prev[self.head[qi] as usize] = e;
        }
        self.head[qi] = e;
        self.bytes[qi] += self.size[i];
        self.len[qi] += 1;
    }

    fn unlink(&mut self, e: u32) {
        let i = e as usize;
        let q = self.queue[i];
        if q == Queue::None {
            return;
        }
        let qi = q.idx();
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head[qi] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail[qi] = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.queue[i] = Queue::None;
        self.bytes[qi] -= self.size[i];
        self.len[qi] -= 1;
    }
}
