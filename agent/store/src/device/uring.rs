//! io_uring engine: readv/writev SQEs submitted in batches of up to the ring size, one ring
//! per calling thread (a `thread_local`, created on the thread's first I/O with the store's
//! queue depth and kept for the thread's life), so concurrent readers never share a ring.
//!
//! A batch never returns with an operation in flight: on an `io_uring_enter` error other
//! than EINTR/EAGAIN/EBUSY the ring is abandoned only after the operations it had consumed
//! have completed (their completions are polled from the shared ring memory); operations it
//! never consumed are run with preadv/pwritev instead. A short completion (end of file, or a
//! partial transfer) is finished synchronously.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use io_uring::{IoUring, opcode, types};

use super::{DataFile, Device, Health, IoOp, OpKind, rw_sync};

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Checks once that the kernel lets this process use io_uring (a ring and a NOP).
pub(crate) fn probe() -> io::Result<()> {
    let mut ring = IoUring::new(2)?;
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe {
        ring.submission()
            .push(&nop)
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
    }
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("io_uring NOP did not complete"))?;
    if cqe.result() < 0 {
        return Err(io::Error::from_raw_os_error(-cqe.result()));
    }
    Ok(())
}

/// The io_uring engine over a T2 file.
pub(crate) struct UringDevice {
    file: Arc<DataFile>,
    depth: u32,
}

impl UringDevice {
    /// An engine with rings of `depth` entries (rounded by the kernel to a power of two).
    pub(crate) fn new(file: Arc<DataFile>, depth: u32) -> Self {
        Self {
            file,
            depth: depth.clamp(1, 4096),
        }
    }

    /// Runs `ops` on `ring`; `Err` if the ring must be abandoned (every op has a result).
    ///
    /// # Safety
    /// As [`Device::submit`].
    unsafe fn run(&self, ring: &mut IoUring, ops: &mut [IoOp]) -> Result<(), ()> {
        let fd = self.file.fd();
        let cap = (ring.params().sq_entries() as usize).max(1);
        let mut start = 0;
        while start < ops.len() {
            let end = (start + cap).min(ops.len());
            let chunk = &mut ops[start..end];
            let mut done = vec![false; chunk.len()];
            for i in 0..chunk.len() {
                let op = &chunk[i];
                let sqe = match op.kind {
                    OpKind::Read => {
                        opcode::Readv::new(types::Fd(fd), op.iov.as_ptr(), op.iovcnt as u32)
                            .offset(op.offset)
                            .build()
                    }
                    OpKind::Write => {
                        opcode::Writev::new(types::Fd(fd), op.iov.as_ptr(), op.iovcnt as u32)
                            .offset(op.offset)
                            .build()
                    }
                }
                .user_data(i as u64);
                // SAFETY: the iovec array lives in `op`, which the caller keeps in place and
                // does not touch until this batch completes, and the buffers it names are
                // valid per the submit contract. The queue has room: at most `cap` entries
                // are pushed and all earlier ones were consumed.
                if unsafe { ring.submission().push(&sqe) }.is_err() {
                    // Cannot happen (see above); finish the op without the ring.
                    let op = &mut chunk[i];
                    op.result = rw_sync(fd, op, 0);
                    done[i] = true;
                }
            }
            let pushed = ring.submission().len();
            let mut pending = pushed;
            while pending > 0 {
                match ring.submit_and_wait(pending) {
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                        ) => {}
                    Err(e) => {
                        // Wait for what the kernel consumed, run the rest ourselves, and give
                        // the ring up.
                        let unconsumed = ring.submission().len();
                        let mut inflight = pending - unconsumed.min(pending);
                        while inflight > 0 {
                            inflight -= reap(ring, chunk, &mut done, fd);
                            if inflight > 0 {
                                std::thread::yield_now();
                            }
                        }
                        for (i, op) in chunk.iter_mut().enumerate() {
                            if !done[i] {
                                op.result = rw_sync(fd, op, 0);
                            }
                        }
                        tracing::warn!(error = %e, "io_uring_enter failed; this thread's ring is dropped");
                        // The remaining ops (after this chunk) run synchronously.
                        chunk_fallback(fd, &mut ops[end..]);
                        return Err(());
                    }
                }
                pending -= reap(ring, chunk, &mut done, fd);
            }
            start = end;
        }
        Ok(())
    }
}

/// Collects the completions available; returns how many.
fn reap(ring: &mut IoUring, chunk: &mut [IoOp], done: &mut [bool], fd: i32) -> usize {
    let mut n = 0;
    for cqe in ring.completion() {
        let i = cqe.user_data() as usize;
        let Some(op) = chunk.get_mut(i) else { continue };
        let res = cqe.result();
        op.result = if res < 0 {
            if matches!(-res, libc::EAGAIN | libc::EINTR) {
                rw_sync(fd, op, 0)
            } else {
                Err(io::Error::from_raw_os_error(-res))
            }
        } else if (res as usize) < op.len() {
            // Short: finish it (a read stops again at the end of the file).
            rw_sync(fd, op, res as usize)
        } else {
            Ok(res as usize)
        };
        done[i] = true;
        n += 1;
    }
    n
}

fn chunk_fallback(fd: i32, ops: &mut [IoOp]) {
    for op in ops {
        op.result = rw_sync(fd, op, 0);
    }
}

impl Device for UringDevice {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    unsafe fn submit(&self, ops: &mut [IoOp]) {
        if ops.is_empty() {
            return;
        }
        let ring = RING.with(|c| c.borrow_mut().take());
        let mut ring = match ring {
            Some(r) => r,
            None => match IoUring::new(self.depth) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create an io_uring on this thread; using pwritev/preadv");
                    chunk_fallback(self.file.fd(), ops);
                    return;
                }
            },
        };
        // SAFETY: forwarded from this function's contract.
        let ok = unsafe { self.run(&mut ring, ops) };
        if ok.is_ok() {
            RING.with(|c| *c.borrow_mut() = Some(ring));
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.file.allocate(offset, len)
    }

    fn health(&self) -> Health {
        self.file.health()
    }

    fn repair(&self) -> io::Result<()> {
        self.file.repair()
    }
}
