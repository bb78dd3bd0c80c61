//! Heap buffers aligned to 4096 bytes: what O_DIRECT I/O needs, and what
//! [`crate::LogStore::read`] and [`crate::LogStore::write`] ask of the caller's memory.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of an [`AlignedBuf`].
pub const ALIGN: usize = 4096;

/// A zero-initialised heap buffer whose start is 4096-aligned and whose allocation is
/// rounded up to a multiple of 4096 bytes (so a value of `len` bytes can be read or written
/// with its padding, as the store does).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: an AlignedBuf owns its allocation exclusively, like a Vec<u8>; shared access only
// hands out `&[u8]`.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; `&AlignedBuf` only allows reads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes (allocation rounded up to 4096, at least 4096).
    #[must_use]
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).div_ceil(ALIGN) * ALIGN;
        let Ok(layout) = Layout::from_size_align(cap, ALIGN) else {
            panic!("AlignedBuf of {len} bytes exceeds the address space");
        };
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        Self { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    #[must_use]
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    /// Bytes usable through the slice view.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the slice view is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated (a multiple of 4096, at least `len`).
    #[must_use]
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The first byte (4096-aligned; valid for `capacity()` bytes).
    #[must_use]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// The first byte, writable (4096-aligned; valid for `capacity()` bytes).
    #[must_use]
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds `cap >= len` initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with exactly this layout (checked there).
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.cap, ALIGN),
            );
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_rounded() {
        for len in [0, 1, 4095, 4096, 4097, 100_000] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len.max(1) && b.capacity().is_multiple_of(ALIGN));
            assert!(b.iter().all(|&x| x == 0));
        }
        let c = AlignedBuf::from_slice(b"abc");
        assert_eq!(&c[..], b"abc");
    }
}
