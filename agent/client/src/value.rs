//! What a caller holds between calls: [`Value`]s (leased views of the arena) and [`Slot`]s
//! (reserved staging space), and the queues that return their leases and reservations to
//! the agent when they are dropped.
//!
//! Both hold their session, so the session's connection (and with it every lease and
//! reservation) lives as long as they do, and the mappings they point into stay valid even
//! after the client has moved to a new session.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use nencache_api::frame::{Response, op};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{
    conn::Orphans,
    error::ClientError,
    session::{Held, Session},
};

/// Lease ids of dropped values and reservation ids of dropped slots, waiting to be returned.
/// Whoever sends releases (a get carrying them, the background flusher, `flush_releases`)
/// holds a [`Settle`] until the agent has answered, so `flush_releases` can wait for every
/// release already under way.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    releases: Mutex<Vec<u64>>,
    aborts: Mutex<Vec<u64>>,
    pub(crate) wake: Notify,
    in_flight: AtomicUsize,
    settled: Notify,
}

/// Counts a batch of releases as in flight until dropped.
#[derive(Debug)]
pub(crate) struct Settle(Arc<Queues>);

impl Drop for Settle {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.settled.notify_waiters();
        }
    }
}

impl Queues {
    pub(crate) fn push_release(&self, id: u64) {
        self.releases.lock().push(id);
        self.wake.notify_one();
    }

    pub(crate) fn push_abort(&self, id: u64) {
        self.aborts.lock().push(id);
        self.wake.notify_one();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.releases.lock().is_empty() && self.aborts.lock().is_empty()
    }

    pub(crate) fn releases_pending(&self) -> bool {
        !self.releases.lock().is_empty()
    }

    /// Takes up to `max` lease ids, counted as in flight until the returned guard drops.
    pub(crate) fn take_releases(self: &Arc<Self>, max: usize) -> (Vec<u64>, Option<Settle>) {
        let mut q = self.releases.lock();
        if q.is_empty() || max == 0 {
            return (Vec::new(), None);
        }
        let n = q.len().min(max);
        let ids: Vec<u64> = q.drain(..n).collect();
        // Under the lock, so a waiter never sees the ids neither pending nor in flight.
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        (ids, Some(Settle(self.clone())))
    }

    /// Takes up to `max` reservation ids to abort.
    pub(crate) fn take_aborts(&self, max: usize) -> Vec<u64> {
        let mut q = self.aborts.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }

    /// Returns once no taken release batch is still waiting for its answer.
    pub(crate) async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Orphans for Queues {
    fn orphaned(&self, op: u8, resp: &Response) {
        match (op, resp) {
            (op::GET, Response::Get(items)) => {
                for f in items.iter().flatten() {
                    self.push_release(f.lease);
                }
            }
            (op::RESERVE, Response::Reserve(items)) => {
                for (id, _) in items.iter().flatten() {
                    self.push_abort(*id);
                }
            }
            _ => {}
        }
    }
}

/// A value read from the cache: a view of the read-only arena, valid while this lives. Its
/// lease is released when it is dropped. It stays readable after the client has re-attached
/// to a restarted agent: it maps the region of the session it came from.
#[derive(Debug)]
pub struct Value {
    pub(crate) session: Arc<Session>,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) lease: u64,
    pub(crate) metadata: Vec<u8>,
}

impl Value {
    /// The value's bytes, in place in shared memory.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        &self.session.arena()[self.offset..self.offset + self.len]
    }

    /// The metadata stored with the value.
    #[must_use]
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }

    /// The lease id.
    #[must_use]
    pub fn lease(&self) -> u64 {
        self.lease
    }
}

impl std::ops::Deref for Value {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        // A dead session's leases died with it.
        if !self.session.is_dead() {
            self.session.queues.push_release(self.lease);
        }
    }
}

/// A reserved staging slot: write the value into it with [`crate::Client::write_slot`], then
/// hand it to [`crate::Client::commit`] (or [`crate::Client::abort`]), which consume it. A
/// slot dropped without either is aborted in the background.
#[derive(Debug)]
pub struct Slot {
    pub(crate) session: Arc<Session>,
    pub(crate) id: u64,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    /// After this the agent may have reclaimed the reservation: writing is refused.
    pub(crate) write_by: Instant,
    pub(crate) armed: bool,
    /// The share of the session's quota its reservation round holds.
    pub(crate) held: Option<Arc<Held>>,
}

impl Slot {
    /// The reservation id.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Length of the value to write.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the value is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `data` at `at` within the slot.
    ///
    /// # Errors
    /// A write that would leave the slot; a slot whose session ended or whose reservation is
    /// close to its timeout (the agent may hand the space to another put once it expires, so
    /// a late write is refused rather than risked).
    pub(crate) fn write(&self, at: usize, data: &[u8]) -> Result<(), ClientError> {
        if at.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return Err(ClientError::Invalid(format!(
                "write of {} bytes at {at} leaves a slot of {} bytes",
                data.len(),
                self.len
            )));
        }
        if self.session.is_dead() {
            return Err(self.session.disconnected());
        }
        if Instant::now() >= self.write_by {
            return Err(ClientError::Invalid(format!(
                "reservation {:#x} is about to time out; reserve again",
                self.id
            )));
        }
        // SAFETY: the range lies inside this slot (checked above), which the agent reserved
        // for this session (bounds checked when the slot was made); the agent does not touch
        // it until the commit, which consumes the slot, and no reference into shared memory
        // is created, only a raw copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.session.staging_ptr().add(self.offset + at),
                data.len(),
            );
        }
        Ok(())
    }

    /// Takes the reservation id for a commit or abort: the slot will not abort it on drop.
    pub(crate) fn disarm(mut self) -> u64 {
        self.armed = false;
        self.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed && !self.session.is_dead() {
            self.session.queues.push_abort(self.id);
        }
    }
}
