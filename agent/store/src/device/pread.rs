//! preadv/pwritev engine, the fallback for kernels that refuse io_uring: a batch is executed
//! in parallel by the calling thread and a small pool of I/O threads (width = queue depth,
//! capped at 8). A batch of one op runs on the caller alone (no thread hand-off).
//!
//! The calling thread publishes the batch as a job (shared by reference count), wakes up to
//! `width - 1` workers, claims ops itself, and waits until every op has finished. Workers
//! touch the caller's ops only through claims made before the last op finished, so once the
//! caller sees the count complete, no thread can reach its memory any more.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex};

use super::{DataFile, Device, Health, IoOp, rw_sync};

/// Most I/O threads.
const MAX_WIDTH: u32 = 8;

struct Job {
    ops: *mut IoOp,
    len: usize,
    fd: i32,
    next: AtomicUsize,
    finished: Mutex<usize>,
    all_done: Condvar,
}

// SAFETY: `ops` points to the submitter's slice, which stays valid and is accessed only
// through claimed indices (each by one thread) until `finished` reaches `len`, after which no
// thread dereferences it (claims fail once `next >= len`).
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs ops until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::AcqRel);
            if i >= self.len {
                return;
            }
            // SAFETY: `i < len` was claimed by this thread alone, and the submitter waits for
            // `finished == len` before it lets go of the slice.
            let op = unsafe { &mut *self.ops.add(i) };
            op.result = rw_sync(self.fd, op, 0);
            let mut f = self.finished.lock();
            *f += 1;
            if *f == self.len {
                self.all_done.notify_all();
            }
        }
    }
}

struct Shared {
    queue: Mutex<VecDeque<Arc<Job>>>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The pread engine over a T2 file.
pub(crate) struct PreadDevice {
    file: Arc<DataFile>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl PreadDevice {
    /// An engine with `depth.min(8)` I/O threads in all (the caller counts as one).
    pub(crate) fn new(file: Arc<DataFile>, depth: u32) -> io::Result<Self> {
        let width = depth.clamp(1, MAX_WIDTH);
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let mut workers = Vec::new();
        for i in 1..width {
            let s = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("nencache-io-{i}"))
                .spawn(move || worker(&s));
            match h {
                Ok(h) => workers.push(h),
                Err(e) => {
                    shared.stop.store(true, Ordering::Release);
                    shared.wake.notify_all();
                    for w in workers {
                        let _ = w.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self {
            file,
            shared,
            workers,
        })
    }
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queue.lock();
            loop {
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(j) = q.pop_front() {
                    break j;
                }
                s.wake.wait(&mut q);
            }
        };
        job.work();
    }
}

impl Device for PreadDevice {
    fn name(&self) -> &'static str {
        "pread"
    }

    unsafe fn submit(&self, ops: &mut [IoOp]) {
        let fd = self.file.fd();
        if ops.len() <= 1 || self.workers.is_empty() {
            for op in ops.iter_mut() {
                op.result = rw_sync(fd, op, 0);
            }
            return;
        }
        let job = Arc::new(Job {
            ops: ops.as_mut_ptr(),
            len: ops.len(),
            fd,
            next: AtomicUsize::new(0),
            finished: Mutex::new(0),
            all_done: Condvar::new(),
        });
        let helpers = (ops.len() - 1).min(self.workers.len());
        {
            let mut q = self.shared.queue.lock();
            for _ in 0..helpers {
                q.push_back(job.clone());
            }
        }
        for _ in 0..helpers {
            self.shared.wake.notify_one();
        }
        job.work();
        let mut f = job.finished.lock();
        while *f < job.len {
            job.all_done.wait(&mut f);
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

impl Drop for PreadDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        {
            let _q = self.shared.queue.lock();
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
