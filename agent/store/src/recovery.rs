//! Recovery: a checkpoint plus a scan of what came after it.
//!
//! For each region, the first entry header is read. With a valid checkpoint (same store id,
//! region size and region count):
//!
//! - a region the checkpoint lists as used whose first header still has the recorded seq is
//!   taken from the checkpoint (its listed entries), then scanned on from the recorded end,
//!   accepting only entries with a seq of at least the checkpoint's next seq;
//! - a region whose first header has a seq of at least the checkpoint's next seq was
//!   (re)started after the checkpoint and is scanned from its start;
//! - a region the checkpoint lists as used whose first header is not valid (corrupt, torn,
//!   zeroed or unreadable) has lost its entries: those the checkpoint lists for it are
//!   counted as skipped and corrupt (checking each listed header would cost a read per entry
//!   at open; headers of the other regions' listed entries are checked when read);
//! - any other region holds nothing live (free, or stale data the checkpoint had dropped).
//!
//! Without a checkpoint every region whose first header is valid is scanned from its start;
//! a region whose first header is torn or corrupt counts one skipped, corrupt entry (what
//! followed it cannot be found).
//! A scan walks headers (verifying the header checksum, not values) in increasing offset
//! order and stops at the first position without a valid header of this store, at a seq not
//! larger than the previous one (data of an earlier use of the region), at an entry version
//! it does not read, or at an entry that would cross the region's end. Entries with unknown
//! flags are skipped (counted). Values are verified when read.
//!
//! All entries found (checkpoint and scan) are then applied in seq order: an entry replaces
//! what its hash had, a tombstone removes it, an expired entry removes it and is counted as
//! skipped. Regions are scanned in parallel by a few threads.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::Location;
use crate::buf::AlignedBuf;
use crate::device::{Device, IoOp, OpKind};
use crate::format::{BLOCK, Checkpoint, DATA_START, EntryHeader, HeaderError, entry_size};
use crate::index::Index;

/// Bytes read at a time while scanning entries of small values.
const SCAN_CHUNK: usize = 256 * 1024;
/// After an entry at least this large, the next read is one block (the header alone):
/// reading past a value costs more than a separate small read from this size on.
const SMALL_READS_FROM: u64 = 32 * 1024;

/// The store's geometry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    /// Region size.
    pub region_size: u64,
    /// Region count.
    pub count: u32,
    /// Store id.
    pub store_id: u64,
}

impl Layout {
    /// Device offset of region `r`.
    pub(crate) fn base(&self, r: u32) -> u64 {
        DATA_START + u64::from(r) * self.region_size
    }

    /// The region holding device offset `off`.
    pub(crate) fn region_of(&self, off: u64) -> u32 {
        ((off - DATA_START) / self.region_size) as u32
    }

    /// Whether an entry of `size` bytes at device offset `off` lies inside one region.
    pub(crate) fn fits(&self, off: u64, size: u64) -> bool {
        let Some(rel) = off.checked_sub(DATA_START) else {
            return false;
        };
        rel % BLOCK == 0
            && rel / self.region_size < u64::from(self.count)
            && rel % self.region_size + size <= self.region_size
    }
}

/// One operation found on the device or in the checkpoint.
#[derive(Debug, Clone, Copy)]
enum Op {
    Put(u128, Location),
    Delete(u128),
}

/// What recovery rebuilt.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    /// The index.
    pub index: Index,
    /// Regions holding entries: (region, first seq, end).
    pub used: Vec<(u32, u64, u64)>,
    /// The largest seq seen (0: none).
    pub max_seq: u64,
    /// Bytes read from the device.
    pub scanned_bytes: u64,
    /// Whether the checkpoint was used.
    pub from_checkpoint: bool,
    /// Entries skipped (torn, corrupt, not understood, expired).
    pub skipped: u64,
    /// Entries found torn or corrupt.
    pub corrupt: u64,
}

#[derive(Default)]
struct RegionScan {
    first_seq: Option<u64>,
    end: u64,
    ops: Vec<(u64, Op)>,
    scanned: u64,
    skipped: u64,
    corrupt: u64,
}

/// Reads through one region, keeping a window of it in memory.
struct Scanner<'a> {
    dev: &'a dyn Device,
    base: u64,
    region_size: u64,
    store_id: u64,
    buf: AlignedBuf,
    /// Region offset of `buf[0]`, and valid bytes in it.
    at: u64,
    valid: usize,
    scanned: u64,
    /// Read only one block next time (the last entry was large).
    small_reads: bool,
}

enum Found {
    Entry(EntryHeader),
    /// Nothing (more) of ours here.
    End,
    /// A header of a version this build does not read.
    Version,
    /// A torn or corrupt header.
    Corrupt,
}

impl<'a> Scanner<'a> {
    fn new(dev: &'a dyn Device, layout: &Layout, r: u32) -> Self {
        Self {
            dev,
            base: layout.base(r),
            region_size: layout.region_size,
            store_id: layout.store_id,
            buf: AlignedBuf::zeroed(SCAN_CHUNK),
            at: 0,
            valid: 0,
            scanned: 0,
            // The first read at a position is one block: most regions are checked by their
            // first header alone.
            small_reads: true,
        }
    }

    /// `need` bytes at region offset `pos`, reading if they are not in the window.
    fn bytes(&mut self, pos: u64, need: usize) -> Option<&[u8]> {
        let in_window = pos >= self.at && pos + need as u64 <= self.at + self.valid as u64;
        if !in_window {
            let left = self.region_size.checked_sub(pos)?;
            let want = if self.small_reads {
                BLOCK as usize
            } else {
                SCAN_CHUNK
            };
            let len = (want.max(need).div_ceil(BLOCK as usize) * BLOCK as usize).min(left as usize);
            if len < need {
                return None;
            }
            if self.buf.capacity() < len {
                self.buf = AlignedBuf::zeroed(len);
            }
            let mut op = IoOp::new(
                OpKind::Read,
                self.base + pos,
                &[(self.buf.as_mut_ptr(), len)],
            );
            // SAFETY: the buffer is ours, 4096-aligned and at least `len` bytes long, and
            // nothing else touches it during the call.
            unsafe { self.dev.submit(std::slice::from_mut(&mut op)) };
            let n = op.result.unwrap_or(0);
            self.scanned += n as u64;
            self.at = pos;
            self.valid = n;
            if n < need {
                return None;
            }
        }
        let from = (pos - self.at) as usize;
        // SAFETY: `from + need <= valid <= capacity` bytes of the buffer were written by the
        // read (or zeroed at allocation).
        Some(unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(from), need) })
    }

    /// The header at region offset `pos`.
    fn header(&mut self, pos: u64) -> Found {
        let mut need = BLOCK as usize;
        loop {
            let store_id = self.store_id;
            let Some(b) = self.bytes(pos, need) else {
                return Found::End;
            };
            match EntryHeader::decode(b, store_id) {
                Ok(h) => return Found::Entry(h),
                Err(HeaderError::Short(n)) if n > need => need = n,
                Err(HeaderError::Short(_)) | Err(HeaderError::Corrupt) => return Found::Corrupt,
                Err(HeaderError::Absent) => return Found::End,
                Err(HeaderError::Version(_)) => return Found::Version,
            }
        }
    }

    /// Walks entries from `pos`, accepting seqs larger than `floor` and increasing.
    fn scan(&mut self, mut pos: u64, floor: u64, out: &mut RegionScan) {
        let mut prev = floor;
        while pos + BLOCK <= self.region_size {
            let h = match self.header(pos) {
                Found::Entry(h) => h,
                Found::End => break,
                Found::Version => {
                    out.skipped += 1;
                    break;
                }
                Found::Corrupt => {
                    out.skipped += 1;
                    out.corrupt += 1;
                    break;
                }
            };
            if h.seq <= prev {
                break;
            }
            let size = h.entry_size();
            if pos + size > self.region_size {
                out.skipped += 1;
                out.corrupt += 1;
                break;
            }
            if out.first_seq.is_none() {
                out.first_seq = Some(h.seq);
            }
            prev = h.seq;
            if !h.understood() {
                out.skipped += 1;
            } else if h.is_tombstone() {
                out.ops.push((h.seq, Op::Delete(h.hash)));
            } else {
                out.ops.push((
                    h.seq,
                    Op::Put(
                        h.hash,
                        Location {
                            value_len: h.value_len,
                            key_len: u32::from(h.key_len),
                            meta_len: h.meta_len,
                            seq: h.seq,
                            expires_unix_ms: h.expires_unix_ms,
                            offset: self.base + pos,
                        },
                    ),
                ));
            }
            self.small_reads = size >= SMALL_READS_FROM;
            pos += size;
            out.end = pos;
        }
    }
}

fn recover_region(
    dev: &dyn Device,
    layout: &Layout,
    r: u32,
    ckpt: Option<&Checkpoint>,
) -> RegionScan {
    let mut out = RegionScan::default();
    let mut sc = Scanner::new(dev, layout, r);
    let found = sc.header(0);
    let first = match &found {
        Found::Entry(h) => Some(h.seq),
        _ => None,
    };
    match (ckpt, first) {
        (Some(c), None) if c.regions[r as usize].used => {
            // The checkpoint lists entries here but the region no longer starts with a valid
            // header (corrupt, torn, zeroed, unreadable): its entries cannot be trusted and
            // are dropped, counted.
            let listed = c.regions[r as usize].entries.len() as u64;
            match found {
                Found::Version => out.skipped += listed.max(1),
                Found::Corrupt => {
                    out.skipped += listed.max(1);
                    out.corrupt += listed.max(1);
                }
                Found::End | Found::Entry(_) => {
                    out.skipped += listed;
                    out.corrupt += listed;
                }
            }
        }
        (_, None) => match found {
            // A torn or corrupt first entry (a region that was not in use, or no
            // checkpoint): one entry lost.
            Found::Corrupt => {
                out.skipped += 1;
                out.corrupt += 1;
            }
            Found::Version => out.skipped += 1,
            Found::End | Found::Entry(_) => {}
        },
        (None, Some(_)) => sc.scan(0, 0, &mut out),
        (Some(c), Some(first)) => {
            let rec = &c.regions[r as usize];
            if rec.used && first == rec.first_seq {
                out.first_seq = Some(first);
                out.end = rec.end.min(layout.region_size);
                for e in &rec.entries {
                    let loc = Location {
                        value_len: e.value_len,
                        key_len: e.key_len,
                        meta_len: e.meta_len,
                        seq: e.seq,
                        expires_unix_ms: e.expires_unix_ms,
                        offset: e.offset,
                    };
                    let size = entry_size(u64::from(e.key_len), u64::from(e.meta_len), e.value_len);
                    let inside = layout.fits(e.offset, size) && layout.region_of(e.offset) == r;
                    if inside && e.seq < c.next_seq && e.key_len <= u32::from(u16::MAX) {
                        out.ops.push((e.seq, Op::Put(e.hash, loc)));
                    } else {
                        out.skipped += 1;
                    }
                }
                let end = out.end;
                sc.scan(end, c.next_seq.saturating_sub(1), &mut out);
            } else if first >= c.next_seq {
                sc.scan(0, c.next_seq - 1, &mut out);
            }
        }
    }
    out.scanned = sc.scanned;
    out
}

/// Rebuilds the index from the device and, if given, a checkpoint already checked against
/// the layout. `now_ms` decides expiry.
pub(crate) fn recover(
    dev: &dyn Device,
    layout: &Layout,
    ckpt: Option<&Checkpoint>,
    threads: usize,
    now_ms: u64,
) -> Recovered {
    let count = layout.count as usize;
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, count.max(1));
    let mut scans: Vec<(u32, RegionScan)> = Vec::with_capacity(count);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let r = next.fetch_add(1, Ordering::Relaxed);
                        if r >= count {
                            break;
                        }
                        mine.push((r as u32, recover_region(dev, layout, r as u32, ckpt)));
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(v) => scans.extend(v),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
    });
    scans.sort_by_key(|(r, _)| *r);

    let mut out = Recovered {
        from_checkpoint: ckpt.is_some(),
        ..Recovered::default()
    };
    let mut ops = Vec::new();
    for (r, sc) in scans {
        out.scanned_bytes += sc.scanned;
        out.skipped += sc.skipped;
        out.corrupt += sc.corrupt;
        if let Some(first) = sc.first_seq
            && sc.end > 0
        {
            out.used.push((r, first, sc.end));
        }
        ops.extend(sc.ops);
    }
    ops.sort_by_key(|(seq, _)| *seq);
    if let Some(c) = ckpt {
        out.max_seq = c.next_seq.saturating_sub(1);
    }
    for (seq, op) in ops {
        out.max_seq = out.max_seq.max(seq);
        match op {
            Op::Put(h, loc) if loc.expires_unix_ms <= now_ms => {
                out.index.remove(h);
                out.skipped += 1;
            }
            Op::Put(h, loc) => {
                out.index.insert(h, loc);
            }
            Op::Delete(h) => {
                out.index.remove(h);
            }
        }
    }
    out
}
