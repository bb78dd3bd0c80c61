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
//! Leased entries are never chosen. One found at a tail is *parked*: taken out of the queues
//! until its last lease is released, when it goes back to the head of the main queue (as an
//! entry read). Each lease thus costs eviction at most one look, however many entries are
//! leased, and a victim is found whenever an unleased entry is queued: every step of the
//! search parks an entry, evicts one, moves one from small to main with its count cleared, or
//! spends one of an entry's bounded read count.
//!
//! Eviction is two-step so that a reserve that cannot be satisfied can put its victims back:
//! [`Policy::victim`] and [`Policy::take`] unlink an entry and remember where it was;
//! [`Policy::restore`] (in the reverse order of the unlinks) puts it back there, and
//! [`Policy::forget`] makes the eviction final (and remembers a small-queue victim in the
//! ghost).
//!
//! Links are arrays indexed by entry number, allocated once: nothing here allocates after
//! construction.

use crate::engine::EvictionPolicy;

const NIL: u32 = u32::MAX;
const MAX_FREQ: u8 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queue {
    /// Not known to the policy (free, reserved or removed).
    None,
    Small,
    Main,
    /// Leased, found at a tail: out of the queues until its last lease goes.
    Parked,
    /// Unlinked as a victim from the small queue; `next` holds its older neighbour.
    TakenSmall,
    /// Unlinked as a victim from the main queue; `next` holds its older neighbour.
    TakenMain,
}

impl Queue {
    fn idx(self) -> usize {
        match self {
            Self::Small => 0,
            _ => 1,
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
    /// Towards the head (newer).
    prev: Vec<u32>,
    /// Towards the tail (older).
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
    /// `small_percent` of it; the ghost remembers about `ghost` hashes (as many as the cache
    /// holds entries of one page).
    pub(crate) fn new(
        kind: EvictionPolicy,
        capacity: u32,
        ghost: u32,
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
            ghost: Ghost::new(ghost as usize),
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
        let f = &mut self.freq[e as usize];
        *f = (*f + 1).min(MAX_FREQ);
        // LRU moves a read entry to the head; a parked one goes there on its last release.
        if self.kind == EvictionPolicy::Lru && self.queue[e as usize] == Queue::Main {
            self.unlink(e);
            self.push_head(Queue::Main, e);
        }
    }

    /// The last lease on a live entry was released: a parked entry comes back as read.
    pub(crate) fn unpark(&mut self, e: u32) {
        if self.queue[e as usize] == Queue::Parked {
            self.queue[e as usize] = Queue::None;
            self.push_head(Queue::Main, e);
        }
    }

    /// The last pin on a live entry went, and it was not a read (a demotion wrote it down):
    /// a parked entry goes back to the tail of the main queue, first in line for eviction,
    /// which now costs nothing.
    pub(crate) fn unpark_cold(&mut self, e: u32) {
        if self.queue[e as usize] == Queue::Parked {
            self.queue[e as usize] = Queue::None;
            self.push_tail(Queue::Main, e);
        }
    }

    /// The entry left for another reason than eviction (delete, overwrite, expiry on access).
    pub(crate) fn remove(&mut self, e: u32) {
        self.unlink(e);
        self.queue[e as usize] = Queue::None;
    }

    /// How hot the entry is, for choosing between placements that evict as many bytes: its
    /// read count, plus one in S3-FIFO's main queue.
    pub(crate) fn heat(&self, e: u32) -> u64 {
        let main = self.kind == EvictionPolicy::S3Fifo && self.queue[e as usize] == Queue::Main;
        u64::from(self.freq[e as usize]) + u64::from(main)
    }

    /// Whether the entry is in one of the queues (for invariant checks).
    #[cfg(test)]
    pub(crate) fn is_queued(&self, e: u32) -> bool {
        matches!(self.queue[e as usize], Queue::Small | Queue::Main)
    }

    /// Queued entries from the cold end, in about the order [`Policy::victim`] would take
    /// them (the small queue's tail first when it is over its share), without changing
    /// anything: what demotion writes down ahead of eviction.
    pub(crate) fn coldest(&self) -> impl Iterator<Item = u32> + '_ {
        let small_first =
            self.len[0] > 0 && (self.bytes[0] > self.small_target || self.len[1] == 0);
        let order = if small_first { [0, 1] } else { [1, 0] };
        order.into_iter().flat_map(move |q| {
            std::iter::successors(Some(self.tail[q]).filter(|&e| e != NIL), move |&e| {
                Some(self.prev[e as usize]).filter(|&p| p != NIL)
            })
        })
    }

    /// Picks the next victim in policy order and unlinks it (see [`Policy::take`]), or `None`
    /// when no queued entry is left. Leased entries met on the way are parked.
    pub(crate) fn victim(&mut self, mut classify: impl FnMut(u32) -> Candidate) -> Option<u32> {
        loop {
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
                Candidate::Pinned => {
                    self.unlink(e);
                    self.queue[e as usize] = Queue::Parked;
                }
                Candidate::Expired => {
                    self.take(e);
                    return Some(e);
                }
                Candidate::Evictable if self.kind == EvictionPolicy::Lru => {
                    self.take(e);
                    return Some(e);
                }
                Candidate::Evictable => {
                    let f = &mut self.freq[e as usize];
                    if *f == 0 {
                        self.take(e);
                        return Some(e);
                    }
                    if q == Queue::Small {
                        *f = 0;
                    } else {
                        *f -= 1;
                    }
                    self.unlink(e);
                    self.push_head(Queue::Main, e);
                }
            }
        }
    }

    /// Unlinks a queued entry chosen as a victim, remembering its queue and its older
    /// neighbour so that [`Policy::restore`] can put it back.
    pub(crate) fn take(&mut self, e: u32) {
        let i = e as usize;
        let taken = match self.queue[i] {
            Queue::Small => Queue::TakenSmall,
            Queue::Main => Queue::TakenMain,
            q => panic!("entry {e} taken from {q:?}"),
        };
        let older = self.next[i];
        self.unlink(e);
        self.queue[i] = taken;
        self.next[i] = older;
    }

    /// Puts back an entry unlinked by [`Policy::take`], beside its older neighbour if that is
    /// still in the same queue, at the tail otherwise. Undone in the reverse order of the
    /// takes, this restores the queues' order (an older neighbour that has since left the
    /// queue left from the tail, so the tail is where the entry belongs).
    pub(crate) fn restore(&mut self, e: u32) {
        let i = e as usize;
        let q = match self.queue[i] {
            Queue::TakenSmall => Queue::Small,
            Queue::TakenMain => Queue::Main,
            q => panic!("entry {e} restored from {q:?}"),
        };
        let older = self.next[i];
        self.queue[i] = Queue::None;
        if older != NIL && self.queue[older as usize] == q {
            self.insert_before(q, older, e);
        } else {
            self.push_tail(q, e);
        }
    }

    /// Makes the eviction of a taken entry final; a victim of the small queue that did not
    /// expire is remembered in the ghost (S3-FIFO).
    pub(crate) fn forget(&mut self, e: u32, hash: u128, expired: bool) {
        let i = e as usize;
        if self.kind == EvictionPolicy::S3Fifo && self.queue[i] == Queue::TakenSmall && !expired {
            self.ghost.insert(hash);
        }
        self.queue[i] = Queue::None;
    }

    fn push_head(&mut self, q: Queue, e: u32) {
        let qi = q.idx();
        let i = e as usize;
        debug_assert_eq!(self.queue[i], Queue::None);
        self.queue[i] = q;
        self.prev[i] = NIL;
        self.next[i] = self.head[qi];
        if self.head[qi] == NIL {
            self.tail[qi] = e;
        } else {
            self.prev[self.head[qi] as usize] = e;
        }
        self.head[qi] = e;
        self.account(qi, i);
    }

    fn push_tail(&mut self, q: Queue, e: u32) {
        let qi = q.idx();
        let i = e as usize;
        self.queue[i] = q;
        self.next[i] = NIL;
        self.prev[i] = self.tail[qi];
        if self.tail[qi] == NIL {
            self.head[qi] = e;
        } else {
            self.next[self.tail[qi] as usize] = e;
        }
        self.tail[qi] = e;
        self.account(qi, i);
    }

    /// Links `e` on the newer side of `older`, which is in queue `q`.
    fn insert_before(&mut self, q: Queue, older: u32, e: u32) {
        let qi = q.idx();
        let i = e as usize;
        let newer = self.prev[older as usize];
        self.queue[i] = q;
        self.next[i] = older;
        self.prev[i] = newer;
        self.prev[older as usize] = e;
        if newer == NIL {
            self.head[qi] = e;
        } else {
            self.next[newer as usize] = e;
        }
        self.account(qi, i);
    }

    fn account(&mut self, qi: usize, i: usize) {
        self.bytes[qi] += self.size[i];
        self.len[qi] += 1;
    }

    /// Unlinks a queued entry; leaves any other state's marker for the caller to set.
    fn unlink(&mut self, e: u32) {
        let i = e as usize;
        let q = self.queue[i];
        if !matches!(q, Queue::Small | Queue::Main) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A thousand leased entries and a few unleased ones: every eviction finds an unleased
    /// entry, and the leased ones are looked at about once in all, not once per eviction.
    #[test]
    fn leased_entries_cost_eviction_once_not_every_time() {
        for kind in [EvictionPolicy::S3Fifo, EvictionPolicy::Lru] {
            let n = 1000u32;
            let mut p = Policy::new(kind, n + 20, n + 20, u64::from(n + 20), 30);
            for e in 0..n + 10 {
                p.insert(e, u128::from(e), 1);
            }
            let pinned = |e: u32| e < n;
            let mut looked = 0usize;
            for round in 0..10 {
                let v = p.victim(|e| {
                    looked += 1;
                    if pinned(e) {
                        Candidate::Pinned
                    } else {
                        Candidate::Evictable
                    }
                });
                assert!(
                    v.is_some_and(|v| !pinned(v)),
                    "{kind:?}: eviction {round} found {v:?}"
                );
                let v = v.unwrap();
                p.forget(v, u128::from(v), false);
            }
            assert!(
                looked <= n as usize + 40,
                "{kind:?}: {looked} entries looked at for 10 evictions"
            );
        }
    }

    /// Victims unlinked in policy order and out of the middle (a placement window), then put
    /// back in reverse order: the queues read as before.
    #[test]
    fn restore_in_reverse_order_puts_victims_back_in_place() {
        for kind in [EvictionPolicy::S3Fifo, EvictionPolicy::Lru] {
            let mut p = Policy::new(kind, 32, 32, 1 << 20, 30);
            for e in 0..20 {
                p.insert(e, u128::from(e), 1);
            }
            let order = |p: &Policy| -> Vec<Vec<u32>> {
                (0..2)
                    .map(|q| {
                        let mut v = Vec::new();
                        let mut e = p.tail[q];
                        while e != NIL {
                            v.push(e);
                            e = p.prev[e as usize];
                        }
                        v
                    })
                    .collect()
            };
            let before = order(&p);
            let a = p.victim(|_| Candidate::Evictable).unwrap();
            p.take(7);
            p.take(8);
            let b = p.victim(|_| Candidate::Evictable).unwrap();
            p.take(12);
            for e in [12, b, 8, 7, a] {
                p.restore(e);
            }
            assert_eq!(order(&p), before, "{kind:?}");
            assert_eq!((p.len[0] + p.len[1], p.bytes[0] + p.bytes[1]), (20, 20));
        }
    }

    /// A parked entry comes back at the head of the main queue on its last release; removing
    /// one leaves nothing behind.
    #[test]
    fn parked_entries_return_as_read() {
        let mut p = Policy::new(EvictionPolicy::S3Fifo, 8, 8, 1 << 20, 30);
        for e in 0..4 {
            p.insert(e, u128::from(e), 1);
        }
        let v = p.victim(|e| {
            if e < 2 {
                Candidate::Pinned
            } else {
                Candidate::Evictable
            }
        });
        assert_eq!(v, Some(2));
        assert_eq!((p.queue[0], p.queue[1]), (Queue::Parked, Queue::Parked));
        p.unpark(0);
        assert_eq!((p.queue[0], p.head[1]), (Queue::Main, 0));
        p.remove(1);
        p.unpark(1);
        assert_eq!(p.queue[1], Queue::None);
        assert_eq!(p.len[0] + p.len[1], 2);
    }
}
