//! Shared-memory regions: an anonymous memory file (memfd) mapped by the agent, handed to
//! clients as a file descriptor.
//!
//! The agent maps each region read-write. It hands clients the arena through a descriptor
//! re-opened read-only, so a client's mapping of committed data can never be made writable;
//! the staging region is handed read-write. Regions are sealed against resizing, so a client
//! cannot shrink the file under a mapping and make the agent fault.

use std::{
    fs::{File, OpenOptions},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

use crate::error::{EngineError, Result};

/// A sealed memfd of fixed length, mapped read-write into this process.
#[derive(Debug)]
pub struct SharedRegion {
    file: File,
    map: MmapRaw,
    len: usize,
}

impl SharedRegion {
    /// Creates a region of `len` bytes. Its memory is allocated up front (so that it is
    /// accounted to this process, and so that a shortage fails here rather than as a fault
    /// later) and, with `lock`, locked into RAM.
    ///
    /// # Errors
    /// When the memfd cannot be created, sized, allocated, sealed, mapped or locked.
    pub fn create(name: &str, len: usize, lock: bool) -> Result<Self> {
        if len == 0 {
            return Err(EngineError::Config(format!(
                "region {name} has zero length"
            )));
        }
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| EngineError::io("memfd_create")(e.into()))?;
        rustix::fs::ftruncate(&fd, len as u64)
            .map_err(|e| EngineError::io("sizing shared memory")(e.into()))?;
        rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, len as u64)
            .map_err(|e| EngineError::io("allocating shared memory")(e.into()))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| EngineError::io("sealing shared memory")(e.into()))?;
        let file = File::from(fd);
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(EngineError::io("mapping shared memory"))?;
        if lock {
            map.lock().map_err(EngineError::io(
                "locking shared memory (needs CAP_IPC_LOCK)",
            ))?;
        }
        Ok(Self { file, map, len })
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true for a created region).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The read-write descriptor.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A new descriptor for the same memory, opened read-only: a mapping made from it can
    /// never be written, not even after `mprotect`.
    ///
    /// # Errors
    /// When `/proc/self/fd` cannot be opened.
    pub fn read_only_fd(&self) -> Result<OwnedFd> {
        let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let f = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(EngineError::io("re-opening shared memory read-only"))?;
        Ok(f.into())
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Safety
    /// No one may write the range while the returned slice lives: the caller must own it
    /// (a committed extent, which no mapping but the agent's can write and the agent never
    /// rewrites while it is indexed or leased).
    ///
    /// # Panics
    /// When the range is out of bounds.
    #[must_use]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above); exclusive use of the range is the caller's
        // contract.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    /// Writes `data` at `offset`.
    ///
    /// # Safety
    /// The caller must own the range: no one else reads or writes it meanwhile.
    ///
    /// # Panics
    /// When the range is out of bounds.
    pub unsafe fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|end| end <= self.len)
        );
        // SAFETY: in bounds (checked above), and `data` cannot overlap the mapping's owned
        // range by the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                data.len(),
            );
        }
    }

    /// Copies `len` bytes from `src` at `src_offset` into this region at `dst_offset`.
    ///
    /// # Safety
    /// The caller must own the destination range. The source range may be written
    /// concurrently by another process (it is a client's staging area); the bytes copied
    /// are then whatever was there, which the caller verifies if it must.
    ///
    /// # Panics
    /// When either range is out of bounds.
    pub unsafe fn copy_from(&self, dst_offset: usize, src: &Self, src_offset: usize, len: usize) {
        assert!(
            dst_offset
                .checked_add(len)
                .is_some_and(|end| end <= self.len)
        );
        assert!(
            src_offset
                .checked_add(len)
                .is_some_and(|end| end <= src.len)
        );
        // SAFETY: both ranges are in bounds (checked above) and lie in distinct mappings,
        // so they do not overlap; the destination is owned by the caller's contract.
        unsafe {
            copy_streaming(
                src.map.as_ptr().add(src_offset),
                self.map.as_mut_ptr().add(dst_offset),
                len,
            );
        }
    }
}

/// Copies `len` bytes, using non-temporal stores for large copies where the CPU has AVX2: the
/// destination (a freshly committed value) is not read by this process soon, so streaming it
/// past the cache saves the read-for-ownership of every destination line and leaves the cache
/// to the hot data.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the ranges must not
/// overlap.
unsafe fn copy_streaming(src: *const u8, dst: *mut u8, len: usize) {
    const STREAM_MIN: usize = 256 << 10;
    #[cfg(target_arch = "x86_64")]
    if len >= STREAM_MIN && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked above); the caller's contract covers the ranges.
        unsafe { stream_avx2(src, dst, len) };
        return;
    }
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_avx2(src: *const u8, dst: *mut u8, len: usize) {
    use std::arch::x86_64::{__m256i, _mm_sfence, _mm256_loadu_si256, _mm256_stream_si256};
    // Copy a plain head until the destination is 32-byte aligned, as streaming stores require.
    let head = dst.align_offset(32).min(len);
    // SAFETY: the caller guarantees both ranges; every access below stays inside them.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let (mut s, mut d) = (src.add(head), dst.add(head));
        let mut left = len - head;
        while left >= 128 {
            let a = _mm256_loadu_si256(s.cast::<__m256i>());
            let b = _mm256_loadu_si256(s.add(32).cast::<__m256i>());
            let c = _mm256_loadu_si256(s.add(64).cast::<__m256i>());
            let e = _mm256_loadu_si256(s.add(96).cast::<__m256i>());
            _mm256_stream_si256(d.cast::<__m256i>(), a);
            _mm256_stream_si256(d.add(32).cast::<__m256i>(), b);
            _mm256_stream_si256(d.add(64).cast::<__m256i>(), c);
            _mm256_stream_si256(d.add(96).cast::<__m256i>(), e);
            s = s.add(128);
            d = d.add(128);
            left -= 128;
        }
        std::ptr::copy_nonoverlapping(s, d, left);
        // Order the streaming stores before whatever publishes the value.
        _mm_sfence();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_descriptor_cannot_be_mapped_writable() {
        let r = SharedRegion::create("t", 1 << 16, false).unwrap();
        // SAFETY: the test owns the whole region.
        unsafe { r.write(10, b"hello") };
        let ro = File::from(r.read_only_fd().unwrap());
        // SAFETY: the mapping is read-only and the region outlives it.
        let m = unsafe { MmapOptions::new().map(&ro) }.unwrap();
        assert_eq!(&m[10..15], b"hello");
        // SAFETY: this mapping is expected to fail; nothing is read through it.
        let w = unsafe { MmapOptions::new().map_mut(&ro) };
        assert!(w.is_err(), "a read-only descriptor must not map writable");
        assert!(m.make_mut().is_err(), "mprotect to writable must fail");
    }

    #[test]
    fn region_copies_are_exact_at_every_alignment_and_length() {
        let src = SharedRegion::create("src", 4 << 20, false).unwrap();
        let dst = SharedRegion::create("dst", 4 << 20, false).unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 777)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        // SAFETY: the test owns both regions.
        unsafe { src.write(0, &data) };
        for (so, doff, len) in [
            (0, 0, data.len()),
            (3, 5, (1 << 20) + 3),
            (64, 4096, 300 << 10),
            (1, 0, 100),
        ] {
            // SAFETY: the test owns both regions.
            unsafe { dst.copy_from(doff, &src, so, len) };
            // SAFETY: as above.
            assert_eq!(unsafe { dst.slice(doff, len) }, &data[so..so + len]);
        }
    }

    #[test]
    fn sealed_against_shrinking() {
        let r = SharedRegion::create("t", 1 << 16, false).unwrap();
        assert!(rustix::fs::ftruncate(r.fd(), 0).is_err());
    }
}
