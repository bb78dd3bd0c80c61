//! Shared-memory regions: an anonymous memory file (memfd) mapped by the agent, handed to
//! clients as a file descriptor.
//!
//! The agent maps each region read-write. Every region is sealed against resizing
//! (`F_SEAL_SHRINK | F_SEAL_GROW`), so a client cannot shrink the file under a mapping and
//! make the agent fault, and against further seals (`F_SEAL_SEAL`).
//!
//! A region that clients must only read (the arena, [`SharedRegion::create_read_only`]) is
//! also sealed with `F_SEAL_FUTURE_WRITE`, added right after the agent has made its own
//! writable mapping and before the memory is allocated or any descriptor leaves the process.
//! From then on the kernel refuses, on every descriptor of the file, whoever holds it and
//! however it was opened (including a re-open of `/proc/self/fd/N` with `O_RDWR`, by the
//! agent's own user or by root): `write` and `pwrite` (`EPERM`), a new `MAP_SHARED` mapping
//! with `PROT_WRITE` (`EPERM`), `mprotect(PROT_WRITE)` of a shared read-only mapping
//! (`EACCES`: the kernel clears `VM_MAYWRITE` on such mappings), hole punching with
//! `fallocate` and `madvise(MADV_REMOVE)` (`EPERM`, the agent's own mapping included), and
//! `ftruncate` to another size (`EPERM`). The agent's mapping, made before the seal, stays
//! writable: that is where commits copy values. `F_SEAL_WRITE` would not do, since it
//! cannot be added while a writable mapping exists (`EBUSY`) and forbids the agent's writes.
//! Clients are handed the arena through a descriptor re-opened read-only
//! ([`SharedRegion::read_only_fd`]), which adds `EBADF` for `write` and `fallocate` and
//! `EACCES` for writable mappings even before the seal is consulted.
//!
//! A region that clients write (the staging area, [`SharedRegion::create`]) is not sealed
//! against writes; it is handed over read-write.
//!
//! What the seal does not cover: a process allowed to ptrace the agent (its own user, unless
//! the agent is made non-dumpable, and root) can write the agent's writable mapping through
//! `ptrace`, `process_vm_writev` or `/proc/<pid>/mem`; such a process could also have opened
//! `/proc/<pid>/fd/N` in the few microseconds between `memfd_create` and the seal.

use std::{
    fs::{File, OpenOptions},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use memmap2::{Advice, MmapOptions, MmapRaw};
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
    /// Creates a region of `len` bytes that clients may write through the read-write
    /// descriptor ([`Self::fd`]): the staging area. Its memory is allocated up front (so
    /// that it is accounted to this process, and so that a shortage fails here rather than as
    /// a fault later) and, with `lock`, locked into RAM.
    ///
    /// # Errors
    /// When the memfd cannot be created, sized, mapped, sealed, allocated or locked.
    pub fn create(name: &str, len: usize, lock: bool) -> Result<Self> {
        Self::create_sealed(name, len, lock, SealFlags::empty())
    }

    /// Creates a region of `len` bytes that only this process can write, through its own
    /// mapping ([`Self::write`], [`Self::copy_from`]): the arena. The memfd is sealed with
    /// `F_SEAL_FUTURE_WRITE` once that mapping exists, so no descriptor of it, however
    /// obtained, can write it or map it writable (see the module documentation). Allocated
    /// and locked as with [`Self::create`].
    ///
    /// # Errors
    /// As [`Self::create`]; also on a kernel without `F_SEAL_FUTURE_WRITE` (before 5.1).
    pub fn create_read_only(name: &str, len: usize, lock: bool) -> Result<Self> {
        Self::create_sealed(name, len, lock, SealFlags::FUTURE_WRITE)
    }

    fn create_sealed(name: &str, len: usize, lock: bool, extra: SealFlags) -> Result<Self> {
        if len == 0 {
            return Err(EngineError::Config(format!(
                "region {name} has zero length"
            )));
        }
        let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
            .map_err(|e| EngineError::io("memfd_create")(e.into()))?;
        rustix::fs::ftruncate(&fd, len as u64)
            .map_err(|e| EngineError::io("sizing shared memory")(e.into()))?;
        let file = File::from(fd);
        // Map before sealing: F_SEAL_FUTURE_WRITE leaves existing writable mappings writable
        // and refuses new ones. Nothing is faulted in yet, so the file is unsealed for only as
        // long as these two calls take.
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(EngineError::io("mapping shared memory"))?;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::SHRINK | SealFlags::GROW | extra | SealFlags::SEAL,
        )
        .map_err(|e| EngineError::io("sealing shared memory")(e.into()))?;
        // Allocating within the current size is allowed under every seal set here.
        rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, len as u64)
            .map_err(|e| EngineError::io("allocating shared memory")(e.into()))?;
        populate(&map, len);
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

    /// Whether the region was created with [`Self::create_read_only`]: sealed so that only
    /// this process's own mapping can write it.
    #[must_use]
    pub fn is_write_sealed(&self) -> bool {
        rustix::fs::fcntl_get_seals(&self.file).is_ok_and(|s| s.contains(SealFlags::FUTURE_WRITE))
    }

    /// The read-write descriptor. For a region created with [`Self::create_read_only`],
    /// writes through it (or through any descriptor re-opened from it) fail: only this
    /// process's mapping can write.
    #[must_use]
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// A new descriptor for the same memory, opened read-only, for a client. Only a region
    /// created with [`Self::create_read_only`] has one: a read-only descriptor of a region
    /// that is not sealed against writes could be re-opened read-write through
    /// `/proc/self/fd`.
    ///
    /// # Errors
    /// When the region is not sealed against writes, or `/proc/self/fd` cannot be opened.
    pub fn read_only_fd(&self) -> Result<OwnedFd> {
        if !self.is_write_sealed() {
            return Err(EngineError::Config(
                "a read-only descriptor is handed out only for a region sealed against writes \
                 (SharedRegion::create_read_only)"
                    .into(),
            ));
        }
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
    /// (a committed extent, which only the agent's mapping can write, and the agent never
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

    /// A raw pointer to the byte at `offset`, for I/O straight into or out of the region
    /// (a lower tier's reads and writes).
    ///
    /// # Panics
    /// When `offset + len` is out of bounds.
    #[must_use]
    pub fn ptr_at(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above); forming the pointer reads nothing.
        unsafe { self.map.as_ptr().add(offset).cast_mut() }
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

/// Faults in every page of a fresh mapping so that later writes (commit copies) take no page
/// faults. `MADV_POPULATE_WRITE` (Linux 5.14) where the kernel has it, else one read per
/// page, which is what `MAP_POPULATE` does for a shared mapping.
fn populate(map: &MmapRaw, len: usize) {
    if map.advise(Advice::PopulateWrite).is_ok() {
        return;
    }
    // Pages are at least 4 KiB: a read every 4 KiB touches each one.
    for off in (0..len).step_by(4096) {
        // SAFETY: `off` is inside the mapping, which is valid for reads for its whole length.
        unsafe { std::ptr::read_volatile(map.as_ptr().add(off)) };
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
    use std::os::unix::fs::FileExt;

    use rustix::{
        io::Errno,
        mm::{Advice as MmAdvice, MapFlags, ProtFlags},
    };

    use super::*;

    const LEN: usize = 1 << 16;
    const PAGE: usize = 4096;

    /// Every way a descriptor of the region could write it, tried on `fd`; returns what each
    /// got. Each attempt aims at its own page, so that a success shows in the bytes.
    fn try_every_write_path(fd: BorrowedFd<'_>) -> Vec<(&'static str, rustix::io::Result<()>)> {
        let f = File::from(fd.try_clone_to_owned().unwrap());
        let mut out = Vec::new();
        out.push(("write", rustix::io::write(&f, b"X").map(drop)));
        out.push((
            "pwrite",
            rustix::io::pwrite(&f, b"X", PAGE as u64).map(drop),
        ));
        // SAFETY: a fresh mapping, unmapped below; nothing else uses its address range.
        let shared_rw = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                LEN,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &f,
                0,
            )
        };
        if let Ok(p) = shared_rw {
            // SAFETY: the mapping is LEN bytes; it is unmapped once.
            unsafe {
                p.cast::<u8>().add(2 * PAGE).write(b'X');
                rustix::mm::munmap(p, LEN).unwrap();
            }
        }
        out.push(("mmap MAP_SHARED PROT_WRITE", shared_rw.map(drop)));
        // SAFETY: as above.
        let ro = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                LEN,
                ProtFlags::READ,
                MapFlags::SHARED,
                &f,
                0,
            )
        }
        .unwrap();
        // SAFETY: `ro` is a LEN-byte mapping made above.
        let mprotect = unsafe {
            rustix::mm::mprotect(
                ro,
                LEN,
                rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
            )
        };
        if mprotect.is_ok() {
            // SAFETY: made writable just above.
            unsafe { ro.cast::<u8>().add(3 * PAGE).write(b'X') };
        }
        out.push(("mprotect PROT_WRITE", mprotect));
        out.push((
            "fallocate PUNCH_HOLE",
            rustix::fs::fallocate(
                &f,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                4 * PAGE as u64,
                PAGE as u64,
            ),
        ));
        out.push((
            "ftruncate shrink",
            rustix::fs::ftruncate(&f, (LEN / 2) as u64),
        ));
        out.push((
            "ftruncate grow",
            rustix::fs::ftruncate(&f, (2 * LEN) as u64),
        ));
        // SAFETY: the range lies inside `ro`.
        out.push(("madvise MADV_REMOVE", unsafe {
            rustix::mm::madvise(
                ro.cast::<u8>().add(5 * PAGE).cast(),
                PAGE,
                MmAdvice::LinuxRemove,
            )
        }));
        // SAFETY: `ro` is unmapped once, and nothing refers to it afterwards.
        unsafe { rustix::mm::munmap(ro, LEN) }.unwrap();
        out
    }

    fn filled(r: &SharedRegion) -> Vec<u8> {
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8 + 1).collect();
        // SAFETY: the test owns the whole region.
        unsafe { r.write(0, &data) };
        data
    }

    fn reopen_read_write(fd: BorrowedFd<'_>) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
    }

    #[test]
    fn a_read_only_region_is_written_only_through_its_own_mapping() {
        let r = SharedRegion::create_read_only("t", LEN, false).unwrap();
        assert!(r.is_write_sealed());
        let data = filled(&r);
        let seals = rustix::fs::fcntl_get_seals(r.fd()).unwrap();
        assert_eq!(
            seals,
            SealFlags::SHRINK | SealFlags::GROW | SealFlags::FUTURE_WRITE | SealFlags::SEAL
        );
        // The descriptor the region was created with, and a read-write re-open of it (what a
        // client could do with its read-only descriptor, or anyone of the agent's user with
        // /proc/<agent>/fd): every write path is refused.
        let reopened = reopen_read_write(r.fd());
        for fd in [r.fd(), reopened.as_fd()] {
            for (path, got) in try_every_write_path(fd) {
                let want = if path == "mprotect PROT_WRITE" || path == "madvise MADV_REMOVE" {
                    Errno::ACCESS
                } else {
                    Errno::PERM
                };
                assert_eq!(got, Err(want), "{path}");
            }
        }
        // Hole punching through the agent's own writable mapping is refused too.
        // SAFETY: the range lies inside the region's mapping.
        let remove =
            unsafe { rustix::mm::madvise(r.map.as_mut_ptr().cast(), PAGE, MmAdvice::LinuxRemove) };
        assert_eq!(remove, Err(Errno::PERM));
        // SAFETY: the test owns the whole region.
        assert_eq!(unsafe { r.slice(0, LEN) }, &data[..], "no byte changed");
        // The agent's mapping still writes.
        // SAFETY: the test owns the whole region.
        unsafe { r.write(7, b"agent") };
        let mut got = [0; 5];
        reopened.read_exact_at(&mut got, 7).unwrap();
        assert_eq!(&got, b"agent");
    }

    #[test]
    fn read_only_descriptor_cannot_be_mapped_writable() {
        let r = SharedRegion::create_read_only("t", LEN, false).unwrap();
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
        for (path, got) in try_every_write_path(ro.as_fd()) {
            assert!(got.is_err(), "{path}: {got:?}");
        }
        // SAFETY: as above.
        assert_eq!(unsafe { r.slice(10, 5) }, b"hello");
    }

    #[test]
    fn a_client_writable_region_stays_writable_and_has_no_read_only_descriptor() {
        let r = SharedRegion::create("staging", LEN, false).unwrap();
        assert!(!r.is_write_sealed());
        assert!(r.read_only_fd().is_err());
        let f = File::from(r.fd().try_clone_to_owned().unwrap());
        f.write_all_at(b"client", 100).unwrap();
        // SAFETY: the client's write above is complete; nothing writes meanwhile.
        assert_eq!(unsafe { r.slice(100, 6) }, b"client");
        // SAFETY: a shared writable mapping of the staging area, as a client makes.
        let mut m = unsafe { MmapOptions::new().map_mut(&f) }.unwrap();
        m[200] = 9;
        // SAFETY: as above.
        assert_eq!(unsafe { r.slice(200, 1) }, &[9]);
        // Resizing stays refused.
        assert!(rustix::fs::ftruncate(r.fd(), 0).is_err());
        assert!(rustix::fs::ftruncate(r.fd(), 2 * LEN as u64).is_err());
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
