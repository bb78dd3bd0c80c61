//! The device layer: one private trait, [`Device`], with batched submission of reads and
//! writes (each an iovec list at a device offset), chosen once at open:
//!
//! - [`uring::UringDevice`]: io_uring, one ring per calling thread (created lazily);
//! - [`pread::PreadDevice`]: preadv/pwritev on a small thread pool;
//! - [`mmap::MmapDevice`]: memory-mapped segment files (T3).
//!
//! The first two work on a [`DataFile`] (a T2 file or block device opened with O_DIRECT where
//! the filesystem allows it). Offsets are device offsets as described in [`crate::format`].

pub(crate) mod mmap;
pub(crate) mod pread;
pub(crate) mod uring;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// Read into the iovecs.
    Read,
    /// Write from the iovecs.
    Write,
}

/// One I/O: up to two buffers at one device offset, and its result (bytes transferred).
pub(crate) struct IoOp {
    /// Read or write.
    pub kind: OpKind,
    /// Device offset.
    pub offset: u64,
    /// The buffers (only the first `iovcnt` count).
    pub iov: [libc::iovec; 2],
    /// Buffers in use.
    pub iovcnt: usize,
    /// Bytes transferred, or the error. A read shorter than [`IoOp::len`] hit the end of the
    /// file; a write is complete or failed.
    pub result: io::Result<usize>,
}

// SAFETY: an IoOp carries raw pointers to buffers that its submitter keeps valid and
// unaliased until the batch completes; handing the op to an I/O thread for the duration of
// the batch is what those pointers are for.
unsafe impl Send for IoOp {}

impl IoOp {
    /// An op over `bufs` (empty buffers are left out; at most two).
    pub(crate) fn new(kind: OpKind, offset: u64, bufs: &[(*mut u8, usize)]) -> Self {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let mut n = 0;
        for &(p, len) in bufs {
            if len > 0 && n < 2 {
                iov[n] = libc::iovec {
                    iov_base: p.cast(),
                    iov_len: len,
                };
                n += 1;
            }
        }
        Self {
            kind,
            offset,
            iov,
            iovcnt: n,
            result: Ok(0),
        }
    }

    /// A copy of the op's description (kind, offset, buffers), without its result.
    pub(crate) fn clone_op(&self) -> Self {
        Self {
            kind: self.kind,
            offset: self.offset,
            iov: self.iov,
            iovcnt: self.iovcnt,
            result: Ok(0),
        }
    }

    /// Bytes the op covers.
    pub(crate) fn len(&self) -> usize {
        self.iov[..self.iovcnt].iter().map(|v| v.iov_len).sum()
    }

    /// Whether it completed in full.
    pub(crate) fn complete(&self) -> bool {
        matches!(self.result, Ok(n) if n == self.len())
    }

    /// The iovecs from byte `done` on.
    fn iov_from(&self, mut done: usize) -> ([libc::iovec; 2], usize) {
        let mut out = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2];
        let mut n = 0;
        for v in &self.iov[..self.iovcnt] {
            if done >= v.iov_len {
                done -= v.iov_len;
                continue;
            }
            out[n] = libc::iovec {
                iov_base: v.iov_base.cast::<u8>().wrapping_add(done).cast(),
                iov_len: v.iov_len - done,
            };
            done = 0;
            n += 1;
        }
        (out, n)
    }
}

/// What a device check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    /// Nothing wrong.
    Ok,
    /// The file (or directory) was deleted or replaced under the store.
    Deleted(String),
    /// Some of the store's bytes are gone: these device offset ranges.
    Truncated {
        /// Lost ranges of device offsets.
        lost: Vec<std::ops::Range<u64>>,
        /// What was found.
        detail: String,
    },
}

/// A storage device with batched I/O. Implementations never panic on I/O errors.
pub(crate) trait Device: Send + Sync {
    /// `"io_uring"`, `"pread"` or `"mmap"`.
    fn name(&self) -> &'static str;

    /// Runs every op, filling in each `result`; returns when all are complete.
    ///
    /// # Safety
    /// Every op's buffers must be valid for the op (writable for reads, readable for writes)
    /// until this returns, and not accessed by anything else meanwhile.
    unsafe fn submit(&self, ops: &mut [IoOp]);

    /// Makes completed writes durable.
    fn sync(&self) -> io::Result<()>;

    /// Prepares (preallocates) `len` bytes at `offset` for appending: a full filesystem fails
    /// here, not later.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Checks that the store's files are still there and whole.
    fn health(&self) -> Health;

    /// Restores lost length after a truncation (the data in it is gone).
    fn repair(&self) -> io::Result<()>;
}

/// Runs one op to completion with preadv/pwritev, starting `done` bytes in. A read stops
/// early at the end of the file.
pub(crate) fn rw_sync(fd: RawFd, op: &IoOp, mut done: usize) -> io::Result<usize> {
    let total = op.len();
    while done < total {
        let (iov, n) = op.iov_from(done);
        let off = (op.offset + done as u64) as libc::off_t;
        let r = match op.kind {
            // SAFETY: the iovecs point into buffers the submitter keeps valid (Device::submit
            // contract); `n` of them are initialised.
            OpKind::Read => unsafe { libc::preadv(fd, iov.as_ptr(), n as libc::c_int, off) },
            // SAFETY: as above.
            OpKind::Write => unsafe { libc::pwritev(fd, iov.as_ptr(), n as libc::c_int, off) },
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return match op.kind {
                OpKind::Read => Ok(done),
                OpKind::Write => Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write made no progress",
                )),
            };
        }
        done += r as usize;
    }
    Ok(done)
}

/// A T2 data file or block device.
pub(crate) struct DataFile {
    /// The open file.
    pub file: File,
    /// Its path.
    pub path: PathBuf,
    /// Whether it is open with O_DIRECT.
    pub direct: bool,
    /// Whether it is a block device.
    pub block_device: bool,
    /// Bytes the store needs (superblock plus regions).
    pub expected_len: u64,
    dev_ino: (u64, u64),
}

impl DataFile {
    /// Opens (creating if missing) `path` for reading and writing, with O_DIRECT unless the
    /// filesystem refuses it (then buffered, with a warning).
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let open = |flags: i32| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(flags | libc::O_CLOEXEC)
                .open(path)
        };
        let (file, direct) = match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(
                    path = %path.display(),
                    "the filesystem refuses O_DIRECT; using buffered I/O (reads and writes go \
                     through the page cache)"
                );
                (open(0)?, false)
            }
            Err(e) => return Err(e),
        };
        let md = file.metadata()?;
        let block_device = std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type());
        Ok(Self {
            file,
            path: path.to_path_buf(),
            direct,
            block_device,
            expected_len: 0,
            dev_ino: (md.dev(), md.ino()),
        })
    }

    /// Bytes in the file or on the device.
    pub(crate) fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
            const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
            // SAFETY: the ioctl writes one u64 into `size`, which outlives the call.
            let r = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(size)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// The raw descriptor.
    pub(crate) fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// See [`Device::sync`].
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// See [`Device::allocate`].
    pub(crate) fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        match rustix::fs::fallocate(
            self.file.as_fd(),
            rustix::fs::FallocateFlags::empty(),
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// See [`Device::health`].
    pub(crate) fn health(&self) -> Health {
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Health::Deleted(format!("{} was deleted", self.path.display()));
            }
            Err(_) => {}
            Ok(md) => {
                if (md.dev(), md.ino()) != self.dev_ino {
                    return Health::Deleted(format!(
                        "{} was replaced by another file",
                        self.path.display()
                    ));
                }
            }
        }
        if !self.block_device
            && let Ok(len) = self.len()
            && len < self.expected_len
        {
            return Health::Truncated {
                lost: std::iter::once(len..self.expected_len).collect(),
                detail: format!(
                    "{} was truncated to {len} bytes (the store needs {})",
                    self.path.display(),
                    self.expected_len
                ),
            };
        }
        Health::Ok
    }

    /// See [`Device::repair`].
    pub(crate) fn repair(&self) -> io::Result<()> {
        if !self.block_device && self.len()? < self.expected_len {
            self.file.set_len(self.expected_len)?;
        }
        Ok(())
    }
}

/// Takes an exclusive, non-blocking lock on `file`; `Ok(false)` if another holder has it.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    match rustix::fs::flock(
        file.as_fd(),
        rustix::fs::FlockOperation::NonBlockingLockExclusive,
    ) {
        Ok(()) => Ok(true),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iov_from_skips_done_bytes() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let op = IoOp::new(OpKind::Read, 0, &[(a.as_mut_ptr(), 8), (b.as_mut_ptr(), 8)]);
        assert_eq!(op.len(), 16);
        let (v, n) = op.iov_from(10);
        assert_eq!(n, 1);
        assert_eq!(v[0].iov_len, 6);
        assert_eq!(v[0].iov_base as usize, b.as_ptr() as usize + 2);
        let (v, n) = op.iov_from(3);
        assert_eq!((n, v[0].iov_len, v[1].iov_len), (2, 5, 8));
    }
}
