//! Extent allocator: hands out runs of contiguous pages from a fixed range.
//!
//! Free extents sit in segregated lists by `floor(log2(length))` (a two-level scheme in the
//! spirit of TLSF, with one level), linked through arrays indexed by page, with boundary tags
//! at both ends of each extent so that a freed extent merges with its free neighbours in
//! O(1). Every table is sized once at construction: allocation and free never touch the heap.
//!
//! Two more operations serve the engine's placement: [`ExtentAllocator::extent_at`] lets it
//! walk the arena in address order, extent by extent (free runs from the boundary tags), and
//! [`ExtentAllocator::alloc_at`] takes back an exact extent, undoing a free when a reserve
//! that evicted has to leave the cache as it was.

const NIL: u32 = u32::MAX;
const BUCKETS: usize = 32;
/// How many candidates a first-fit scan of the exact bucket looks at before it takes a
/// larger extent instead.
const SCAN_LIMIT: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// Not the first page of an extent.
    Inner,
    /// First page of a free extent.
    Free,
    /// First page of an allocated extent.
    Used,
}

/// A run of pages handed out by [`ExtentAllocator::alloc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First page.
    pub start: u32,
    /// Number of pages.
    pub pages: u32,
}

/// Fixed-capacity extent allocator over `pages` pages.
#[derive(Debug)]
pub struct ExtentAllocator {
    tag: Vec<Tag>,
    /// At an extent's first page: its length.
    len: Vec<u32>,
    /// At an extent's last page: its first page.
    head_of: Vec<u32>,
    next: Vec<u32>,
    prev: Vec<u32>,
    heads: [u32; BUCKETS],
    nonempty: u32,
    free_pages: u32,
    pages: u32,
}

fn bucket(pages: u32) -> usize {
    debug_assert!(pages > 0);
    (31 - pages.leading_zeros()) as usize
}

impl ExtentAllocator {
    /// An allocator with every one of `pages` pages free.
    ///
    /// # Panics
    /// When `pages` is zero or `u32::MAX`.
    #[must_use]
    pub fn new(pages: u32) -> Self {
        assert!(pages > 0 && pages < NIL, "page count out of range");
        let n = pages as usize;
        let mut a = Self {
            tag: vec![Tag::Inner; n],
            len: vec![0; n],
            head_of: vec![0; n],
            next: vec![NIL; n],
            prev: vec![NIL; n],
            heads: [NIL; BUCKETS],
            nonempty: 0,
            free_pages: pages,
            pages,
        };
        a.insert_free(0, pages);
        a
    }

    /// Total pages managed.
    #[must_use]
    pub fn pages(&self) -> u32 {
        self.pages
    }

    /// Pages currently free.
    #[must_use]
    pub fn free_pages(&self) -> u32 {
        self.free_pages
    }

    /// Allocates `pages` contiguous pages, or `None` when no free extent is long enough.
    pub fn alloc(&mut self, pages: u32) -> Option<Extent> {
        if pages == 0 || pages > self.free_pages {
            return None;
        }
        let b = bucket(pages);
        let mut found = self.scan(b, pages, SCAN_LIMIT);
        if found == NIL {
            // Any extent in a higher bucket is at least 2^(b+1) > pages long.
            let higher = self.nonempty & !((2u32 << b).wrapping_sub(1));
            found = if b + 1 < BUCKETS && higher != 0 {
                self.heads[higher.trailing_zeros() as usize]
            } else {
                self.scan(b, pages, usize::MAX)
            };
        }
        if found == NIL {
            return None;
        }
        let have = self.len[found as usize];
        self.unlink(found);
        if have > pages {
            self.insert_free(found + pages, have - pages);
        }
        self.mark(found, pages, Tag::Used);
        self.free_pages -= pages;
        Some(Extent {
            start: found,
            pages,
        })
    }

    /// Returns an extent to the free pool, merging it with free neighbours, and returns the
    /// free extent it became part of.
    ///
    /// # Panics
    /// When `extent` is not an allocated extent (a double free or a forged extent).
    pub fn free(&mut self, extent: Extent) -> Extent {
        let Extent { mut start, pages } = extent;
        assert!(
            (start as usize) < self.tag.len()
                && self.tag[start as usize] == Tag::Used
                && self.len[start as usize] == pages,
            "free of an extent that is not allocated: {extent:?}"
        );
        self.free_pages += pages;
        self.tag[start as usize] = Tag::Inner;
        let mut len = pages;
        let end = start + len;
        if end < self.pages && self.tag[end as usize] == Tag::Free {
            let n = self.len[end as usize];
            self.unlink(end);
            self.tag[end as usize] = Tag::Inner;
            len += n;
        }
        if start > 0 {
            let p = self.head_of[start as usize - 1];
            if self.tag[p as usize] == Tag::Free {
                let n = self.len[p as usize];
                self.unlink(p);
                self.tag[p as usize] = Tag::Inner;
                start = p;
                len += n;
            }
        }
        self.insert_free(start, len);
        Extent { start, pages: len }
    }

    /// Allocates exactly `extent`, whose pages must all be free: the inverse of
    /// [`ExtentAllocator::free`], used to undo it. `hint` is the first page of the free extent
    /// that holds `extent` (what `free` returned, if nothing freed since has merged into it);
    /// a wrong hint costs a walk back to that extent's first page.
    ///
    /// # Panics
    /// When some page of `extent` is not free.
    pub fn alloc_at(&mut self, hint: u32, extent: Extent) {
        let Extent { start, pages } = extent;
        let end = start + pages;
        assert!(
            pages > 0 && end <= self.pages,
            "extent out of range: {extent:?}"
        );
        let holds = |h: u32| {
            h <= start && self.tag[h as usize] == Tag::Free && h + self.len[h as usize] >= end
        };
        let head = if (hint as usize) < self.tag.len() && holds(hint) {
            hint
        } else {
            // The first page of the extent holding `start` is the nearest extent head at or
            // before it.
            let mut h = start;
            while self.tag[h as usize] == Tag::Inner {
                h -= 1;
            }
            assert!(holds(h), "pages of {extent:?} are not all free");
            h
        };
        let run_end = head + self.len[head as usize];
        self.unlink(head);
        self.tag[head as usize] = Tag::Inner;
        if head < start {
            self.insert_free(head, start - head);
        }
        if end < run_end {
            self.insert_free(end, run_end - end);
        }
        self.mark(start, pages, Tag::Used);
        self.free_pages -= pages;
    }

    /// The extent that starts at `page`: whether it is free, and its length. `None` when
    /// `page` is inside an extent or out of range. Walking from page 0 by lengths visits every
    /// extent in address order.
    #[must_use]
    pub fn extent_at(&self, page: u32) -> Option<(bool, u32)> {
        match self.tag.get(page as usize)? {
            Tag::Inner => None,
            Tag::Free => Some((true, self.len[page as usize])),
            Tag::Used => Some((false, self.len[page as usize])),
        }
    }

    /// Length of the longest free extent (a linear walk; for stats and tests).
    #[must_use]
    pub fn largest_free(&self) -> u32 {
        let mut best = 0;
        for &h in &self.heads {
            let mut p = h;
            while p != NIL {
                best = best.max(self.len[p as usize]);
                p = self.next[p as usize];
            }
        }
        best
    }

    fn scan(&self, b: usize, pages: u32, limit: usize) -> u32 {
        let mut p = self.heads[b];
        let mut seen = 0;
        while p != NIL && seen < limit {
            if self.len[p as usize] >= pages {
                return p;
            }
            p = self.next[p as usize];
            seen += 1;
        }
        NIL
    }

    fn mark(&mut self, start: u32, len: u32, tag: Tag) {
        self.tag[start as usize] = tag;
        self.len[start as usize] = len;
        self.head_of[(start + len - 1) as usize] = start;
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        self.mark(start, len, Tag::Free);
        let b = bucket(len);
        let h = self.heads[b];
        self.next[start as usize] = h;
        self.prev[start as usize] = NIL;
        if h != NIL {
            self.prev[h as usize] = start;
        }
        self.heads[b] = start;
        self.nonempty |= 1 << b;
    }

    fn unlink(&mut self, start: u32) {
        let (n, p) = (self.next[start as usize], self.prev[start as usize]);
        if p == NIL {
            let b = bucket(self.len[start as usize]);
            self.heads[b] = n;
            if n == NIL {
                self.nonempty &= !(1 << b);
            }
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn fills_and_merges_back() {
        let mut a = ExtentAllocator::new(100);
        let x = a.alloc(30).unwrap();
        let y = a.alloc(30).unwrap();
        let z = a.alloc(40).unwrap();
        assert_eq!(a.alloc(1), None);
        a.free(y);
        assert_eq!(a.alloc(31), None);
        a.free(x);
        a.free(z);
        assert_eq!(a.largest_free(), 100);
        assert_eq!(
            a.alloc(100),
            Some(Extent {
                start: 0,
                pages: 100
            })
        );
    }

    #[test]
    #[should_panic(expected = "not allocated")]
    fn double_free_is_caught() {
        let mut a = ExtentAllocator::new(10);
        let x = a.alloc(3).unwrap();
        a.free(x);
        a.free(x);
    }

    #[test]
    fn alloc_at_undoes_free() {
        let mut a = ExtentAllocator::new(100);
        let x = a.alloc(10).unwrap();
        let y = a.alloc(20).unwrap();
        let z = a.alloc(30).unwrap();
        a.free(x);
        let merged = a.free(y);
        assert_eq!(
            merged,
            Extent {
                start: 0,
                pages: 30
            }
        );
        a.alloc_at(merged.start, y);
        assert_eq!(a.extent_at(0), Some((true, 10)));
        assert_eq!(a.extent_at(10), Some((false, 20)));
        assert_eq!(a.extent_at(30), Some((false, 30)));
        assert_eq!(a.extent_at(60), Some((true, 40)));
        assert_eq!(a.extent_at(61), None);
        // A stale hint: found by walking back.
        a.free(z);
        a.alloc_at(
            99,
            Extent {
                start: 40,
                pages: 5,
            },
        );
        assert_eq!(a.extent_at(30), Some((true, 10)));
        assert_eq!(a.extent_at(45), Some((true, 55)));
        assert_eq!(a.free_pages(), 100 - 25);
    }

    #[test]
    #[should_panic(expected = "not all free")]
    fn alloc_at_of_used_pages_is_caught() {
        let mut a = ExtentAllocator::new(10);
        let _x = a.alloc(3).unwrap();
        a.alloc_at(0, Extent { start: 2, pages: 2 });
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc(u32),
        Free(usize),
        /// Free an extent and take it back at once.
        FreeAndUndo(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u32..40).prop_map(Op::Alloc),
            any::<usize>().prop_map(Op::Free),
            any::<usize>().prop_map(Op::FreeAndUndo),
        ]
    }

    proptest! {
        /// Against a model that tracks page ownership: extents never overlap, the free count is
        /// exact, and an allocation fails only when no run of free pages is long enough.
        #[test]
        fn matches_page_model(ops in proptest::collection::vec(op(), 1..400)) {
            const N: u32 = 256;
            let mut a = ExtentAllocator::new(N);
            let mut owned = vec![false; N as usize];
            let mut live: Vec<Extent> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(n) => {
                        let longest_run = owned
                            .split(|&o| o)
                            .map(<[bool]>::len)
                            .max()
                            .unwrap_or(0) as u32;
                        match a.alloc(n) {
                            Some(e) => {
                                prop_assert_eq!(e.pages, n);
                                for p in e.start..e.start + n {
                                    prop_assert!(!owned[p as usize], "overlap at page {}", p);
                                    owned[p as usize] = true;
                                }
                                live.push(e);
                            }
                            None => prop_assert!(longest_run < n, "failed with a run of {}", longest_run),
                        }
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let e = live.swap_remove(i % live.len());
                        for p in e.start..e.start + e.pages {
                            owned[p as usize] = false;
                        }
                        a.free(e);
                    }
                    Op::FreeAndUndo(i) if !live.is_empty() => {
                        let e = live[i % live.len()];
                        let merged = a.free(e);
                        prop_assert!(merged.start <= e.start && merged.start + merged.pages >= e.start + e.pages);
                        a.alloc_at(merged.start, e);
                    }
                    Op::Free(_) | Op::FreeAndUndo(_) => {}
                }
                let free = owned.iter().filter(|&&o| !o).count() as u32;
                prop_assert_eq!(a.free_pages(), free);
                // The walk by extents agrees with the page model, and free extents are maximal.
                let mut p = 0;
                let mut last_free = false;
                while p < N {
                    let (is_free, len) = a.extent_at(p).expect("extent head");
                    prop_assert!(!(is_free && last_free), "adjacent free extents at {}", p);
                    for q in p..p + len {
                        prop_assert_eq!(!owned[q as usize], is_free);
                    }
                    last_free = is_free;
                    p += len;
                }
            }
            for e in live {
                a.free(e);
            }
            prop_assert_eq!(a.largest_free(), N);
        }
    }
}
