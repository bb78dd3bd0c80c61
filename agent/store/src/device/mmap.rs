//! Memory-mapped engine (T3): one segment file per region, `seg-RRRRRR.dat` in the store's
//! directory, each exactly `region_size` bytes and mapped shared in full. Reads copy from the
//! mapping into the caller's buffer; writes go through `pwritev` on the segment file into the
//! same page cache the mapping shows (as LMDB does by default: whole pages are written
//! without faulting each one in first, and a failed write is an error, never a signal).
//! [`Device::sync`] is `fdatasync` of the segments written since the last one (plus an fsync
//! of the directory after new segment files).
//!
//! Every segment is preallocated with `fallocate` when its region is allocated for appending,
//! so a full filesystem fails that allocation (an error; the store degrades) rather than a
//! later write. Before each copy out of the mapping the segment's length is checked with
//! `fstat`: a segment truncated under the store makes the read short (a corrupt or missing
//! entry), not a crash.
//!
//! Residual race: a segment truncated by another process *between* that `fstat` and the end
//! of the copy still raises SIGBUS (the kernel gives a mapping no way to fail a single
//! access). The store holds an exclusive `flock` on its directory's `store.meta`, so this
//! takes a process that ignores the lock and shrinks a segment while the store copies from
//! it; the check narrows the window to the copy itself.
//!
//! The mappings are advised `MADV_RANDOM` (no read-around on a fault: with a large device
//! readahead one header would pull in a whole segment) and each read first advises
//! `MADV_WILLNEED` over its exact range, so a cold read is one request for its bytes.
//!
//! Reads of a region race with its reuse as on T2: a copy may see a mix of old and new
//! bytes (a racy copy of shared file pages, validated afterwards like a seqlock read), which
//! the entry checks (seq, checksums) reject; the store then reports a miss because the index
//! no longer holds the entry.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::RwLock;

use super::{Device, Health, IoOp, OpKind};
use crate::format::DATA_START;

/// A mapped segment file.
struct Segment {
    file: File,
    path: PathBuf,
    map: MmapRaw,
    dev_ino: (u64, u64),
    dirty: AtomicBool,
}

/// The mmap engine over a directory of segment files.
pub(crate) struct MmapDevice {
    dir: PathBuf,
    meta_path: PathBuf,
    meta_dev_ino: (u64, u64),
    region_size: u64,
    count: u32,
    segs: RwLock<Vec<Option<Arc<Segment>>>>,
    new_files: AtomicBool,
}

/// The file name of region `r`'s segment.
pub(crate) fn segment_name(r: u32) -> String {
    format!("seg-{r:06}.dat")
}

impl MmapDevice {
    /// Opens the segments present in `dir` (those of the right length; others are left
    /// unmapped until their region is allocated again). `meta` is the locked `store.meta`.
    pub(crate) fn open(dir: &Path, meta: &File, region_size: u64, count: u32) -> io::Result<Self> {
        let md = meta.metadata()?;
        let dev = Self {
            dir: dir.to_path_buf(),
            meta_path: dir.join("store.meta"),
            meta_dev_ino: (md.dev(), md.ino()),
            region_size,
            count,
            segs: RwLock::new((0..count).map(|_| None).collect()),
            new_files: AtomicBool::new(false),
        };
        for r in 0..count {
            let path = dir.join(segment_name(r));
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let len = file.metadata()?.len();
            if len != region_size {
                tracing::warn!(
                    path = %path.display(),
                    len,
                    region_size,
                    "segment file has the wrong length; its region is treated as empty"
                );
                continue;
            }
            let seg = dev.map(file, path)?;
            dev.segs.write()[r as usize] = Some(Arc::new(seg));
        }
        Ok(dev)
    }

    fn map(&self, file: File, path: PathBuf) -> io::Result<Segment> {
        let md = file.metadata()?;
        let map = MmapOptions::new()
            .len(self.region_size as usize)
            .map_raw(&file)?;
        // No read-around on faults: with a large device readahead, touching one header would
        // read a whole segment. Reads ask for their exact range instead (see `one`).
        if let Err(e) = map.advise(memmap2::Advice::Random) {
            tracing::debug!(error = %e, "madvise(MADV_RANDOM) failed");
        }
        Ok(Segment {
            file,
            path,
            map,
            dev_ino: (md.dev(), md.ino()),
            dirty: AtomicBool::new(false),
        })
    }

    /// (region, offset in region) of a device offset, if it is inside the store.
    fn place(&self, offset: u64, len: usize) -> Option<(u32, u64)> {
        let base = offset.checked_sub(DATA_START)?;
        let r = base / self.region_size;
        let off = base % self.region_size;
        if r >= u64::from(self.count) || off + len as u64 > self.region_size {
            return None;
        }
        Some((r as u32, off))
    }

    /// Preallocates a whole segment.
    fn reserve(&self, file: &File) -> io::Result<()> {
        match rustix::fs::fallocate(
            file.as_fd(),
            rustix::fs::FallocateFlags::empty(),
            0,
            self.region_size,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {
                // No preallocation on this filesystem: size it (a full filesystem may then
                // surface as SIGBUS on a store; nothing better is available here).
                if file.metadata()?.len() < self.region_size {
                    file.set_len(self.region_size)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn one(&self, op: &IoOp) -> io::Result<usize> {
        let len = op.len();
        let (r, off) = self
            .place(op.offset, len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let Some(seg) = self.segs.read()[r as usize].clone() else {
            // No segment: nothing was ever stored there (a read is short, like one past the
            // end of a file); regions are allocated, and so mapped, before any write.
            return match op.kind {
                OpKind::Read => Ok(0),
                OpKind::Write => Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    "segment file missing",
                )),
            };
        };
        let file_len = rustix::fs::fstat(seg.file.as_fd())?.st_size.max(0) as u64;
        let avail = file_len.min(self.region_size).saturating_sub(off) as usize;
        let n = match op.kind {
            OpKind::Read => len.min(avail),
            OpKind::Write => {
                if avail < len {
                    return Err(io::Error::other(format!(
                        "segment {} was truncated to {file_len} bytes",
                        seg.path.display()
                    )));
                }
                len
            }
        };
        if op.kind == OpKind::Write {
            // Through the page cache with pwritev (the mapping sees the same pages): whole
            // pages are written without faulting each one in, and a failure is an error, not
            // a signal.
            let seg_op = IoOp {
                offset: off,
                ..op.clone_op()
            };
            let done = super::rw_sync(seg.file.as_raw_fd(), &seg_op, 0)?;
            seg.dirty.store(true, Ordering::Release);
            return Ok(done);
        }
        if n > 0 {
            // Start reading the whole range at once (a no-op for cached pages), rather than
            // one page per fault.
            let _ = seg
                .map
                .advise_range(memmap2::Advice::WillNeed, off as usize, n);
        }
        let mut pos = off as usize;
        let mut left = n;
        for v in &op.iov[..op.iovcnt] {
            if left == 0 {
                break;
            }
            let take = v.iov_len.min(left);
            // SAFETY: `pos + take <= off + n <= region_size`, the mapping's length, and the
            // file is at least that long (checked just above; see the module docs for the
            // race that remains). The iovec is valid for writes of `take` bytes per the
            // submit contract, and it does not overlap the mapping (caller memory).
            unsafe {
                let m = seg.map.as_ptr().add(pos);
                std::ptr::copy_nonoverlapping(m, v.iov_base.cast::<u8>(), take);
            }
            pos += take;
            left -= take;
        }
        Ok(n)
    }
}

impl Device for MmapDevice {
    fn name(&self) -> &'static str {
        "mmap"
    }

    unsafe fn submit(&self, ops: &mut [IoOp]) {
        for op in ops {
            op.result = self.one(op);
        }
    }

    fn sync(&self) -> io::Result<()> {
        let segs: Vec<Arc<Segment>> = self.segs.read().iter().flatten().cloned().collect();
        for s in segs {
            if s.dirty.swap(false, Ordering::AcqRel)
                && let Err(e) = s.file.sync_data()
            {
                s.dirty.store(true, Ordering::Release);
                return Err(e);
            }
        }
        if self.new_files.swap(false, Ordering::AcqRel)
            && let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all())
        {
            self.new_files.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    fn allocate(&self, offset: u64, _len: u64) -> io::Result<()> {
        let (r, _) = self
            .place(offset, 0)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let existing = self.segs.read()[r as usize].clone();
        if let Some(seg) = existing {
            return self.reserve(&seg.file);
        }
        let path = self.dir.join(segment_name(r));
        let created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        self.reserve(&file)?;
        if created {
            self.new_files.store(true, Ordering::Release);
        }
        let seg = self.map(file, path)?;
        self.segs.write()[r as usize] = Some(Arc::new(seg));
        Ok(())
    }

    fn health(&self) -> Health {
        match std::fs::metadata(&self.meta_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Health::Deleted(format!("{} was deleted", self.meta_path.display()));
            }
            Ok(md) if (md.dev(), md.ino()) != self.meta_dev_ino => {
                return Health::Deleted(format!("{} was replaced", self.meta_path.display()));
            }
            _ => {}
        }
        let segs: Vec<(u32, Arc<Segment>)> = self
            .segs
            .read()
            .iter()
            .enumerate()
            .filter_map(|(r, s)| s.clone().map(|s| (r as u32, s)))
            .collect();
        let mut lost = Vec::new();
        let mut detail = String::new();
        for (r, s) in segs {
            match std::fs::metadata(&s.path) {
                Ok(md) if (md.dev(), md.ino()) == s.dev_ino => {}
                _ => {
                    return Health::Deleted(format!(
                        "{} was deleted or replaced",
                        s.path.display()
                    ));
                }
            }
            if let Ok(st) = rustix::fs::fstat(s.file.as_fd()) {
                let len = st.st_size.max(0) as u64;
                if len < self.region_size {
                    let base = DATA_START + u64::from(r) * self.region_size;
                    lost.push(base + len..base + self.region_size);
                    if detail.is_empty() {
                        detail = format!(
                            "{} was truncated to {len} bytes (a segment is {})",
                            s.path.display(),
                            self.region_size
                        );
                    }
                }
            }
        }
        if lost.is_empty() {
            Health::Ok
        } else {
            Health::Truncated { lost, detail }
        }
    }

    fn repair(&self) -> io::Result<()> {
        let segs: Vec<Arc<Segment>> = self.segs.read().iter().flatten().cloned().collect();
        for s in segs {
            if s.file.metadata()?.len() < self.region_size {
                self.reserve(&s.file)?;
            }
        }
        Ok(())
    }
}
