//! Fault injection for tests (feature `testing`): a device wrapper that fails or delays
//! chosen operations, switchable at run time through a shared [`Faults`] handle, and
//! [`crate::LogStore::open_with_faults`] to open a store over it.
//!
//! ```no_run
//! # use nencache_store::testing::{FaultOp, FaultRule, Faults};
//! # use nencache_store::{LogStore, StoreConfig};
//! # fn f(cfg: StoreConfig) -> Result<(), nencache_store::StoreError> {
//! let faults = Faults::new();
//! let (store, _) = LogStore::open_with_faults(cfg, faults.clone())?;
//! // Every write from now on fails with EIO, until the rule is removed.
//! let id = faults.add(FaultRule::fail(FaultOp::Write, libc_eio()));
//! // ...
//! faults.remove(id);
//! # Ok(()) }
//! # fn libc_eio() -> i32 { 5 }
//! ```
//!
//! A rule matches an operation by kind (or any kind) and, optionally, by a range of device
//! offsets it must overlap; it lets the first `skip` matching operations through, then acts
//! on the next `times` ones (all of them if `None`). The first rule (in the order added)
//! that acts on an operation decides. Operations that a rule fails never reach the device.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::device::{Device, Health, IoOp, OpKind};

/// Which operation a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultOp {
    /// Reads (entry reads, reinsertion reads, recovery scans).
    Read,
    /// Writes of entries.
    Write,
    /// Syncs (flush, checkpoint).
    Sync,
    /// Preallocation of a region for appending.
    Allocate,
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail the operation with this errno (e.g. `libc::EIO`, `libc::ENOSPC`).
    Fail(i32),
    /// Delay the operation (the whole batch waits for the longest delay), then run it.
    Delay(Duration),
}

/// One fault rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// The operation kind; `None`: any.
    pub op: Option<FaultOp>,
    /// Device offsets the operation must overlap; `None`: any (syncs have no offset and
    /// match only rules without a range).
    pub offsets: Option<Range<u64>>,
    /// Matching operations let through before the rule acts.
    pub skip: u64,
    /// Operations the rule acts on after that; `None`: every one.
    pub times: Option<u64>,
    /// What it does.
    pub action: FaultAction,
}

impl FaultRule {
    /// Fails every `op` with `errno`.
    #[must_use]
    pub fn fail(op: FaultOp, errno: i32) -> Self {
        Self {
            op: Some(op),
            offsets: None,
            skip: 0,
            times: None,
            action: FaultAction::Fail(errno),
        }
    }

    /// Delays every `op` by `by`.
    #[must_use]
    pub fn delay(op: FaultOp, by: Duration) -> Self {
        Self {
            op: Some(op),
            offsets: None,
            skip: 0,
            times: None,
            action: FaultAction::Delay(by),
        }
    }

    /// Only operations overlapping these device offsets.
    #[must_use]
    pub fn at_offsets(mut self, range: Range<u64>) -> Self {
        self.offsets = Some(range);
        self
    }

    /// Lets the first `n` matching operations through.
    #[must_use]
    pub fn after(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Acts on `n` operations only.
    #[must_use]
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }

    fn matches(&self, op: FaultOp, span: Option<Range<u64>>) -> bool {
        if self.op.is_some_and(|o| o != op) {
            return false;
        }
        match (&self.offsets, span) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(r), Some(s)) => s.start < r.end && r.start < s.end.max(s.start + 1),
        }
    }
}

/// Identifies a rule added to [`Faults`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RuleId(u64);

#[derive(Debug, Default)]
struct State {
    rules: Vec<(RuleId, FaultRule, u64)>,
    next_id: u64,
    seen: [u64; 4],
    injected: u64,
}

/// A shared, switchable set of fault rules. Clones share the same rules.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

fn slot(op: FaultOp) -> usize {
    match op {
        FaultOp::Read => 0,
        FaultOp::Write => 1,
        FaultOp::Sync => 2,
        FaultOp::Allocate => 3,
    }
}

impl Faults {
    /// No rules.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule (after the existing ones).
    pub fn add(&self, rule: FaultRule) -> RuleId {
        let mut s = self.state.lock();
        let id = RuleId(s.next_id);
        s.next_id += 1;
        s.rules.push((id, rule, 0));
        id
    }

    /// Removes a rule.
    pub fn remove(&self, id: RuleId) {
        self.state.lock().rules.retain(|(i, _, _)| *i != id);
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.state.lock().rules.clear();
    }

    /// Operations of this kind the wrapper has seen (faulted or not).
    #[must_use]
    pub fn seen(&self, op: FaultOp) -> u64 {
        self.state.lock().seen[slot(op)]
    }

    /// Faults injected so far (failures and delays).
    #[must_use]
    pub fn injected(&self) -> u64 {
        self.state.lock().injected
    }

    /// Decides the fate of one operation.
    fn decide(&self, op: FaultOp, span: Option<Range<u64>>) -> Option<FaultAction> {
        let mut s = self.state.lock();
        s.seen[slot(op)] += 1;
        let mut acted = None;
        for (_, rule, matched) in &mut s.rules {
            if !rule.matches(op, span.clone()) {
                continue;
            }
            *matched += 1;
            if *matched <= rule.skip {
                continue;
            }
            if rule.times.is_some_and(|t| *matched - rule.skip > t) {
                continue;
            }
            acted = Some(rule.action);
            break;
        }
        if acted.is_some() {
            s.injected += 1;
        }
        acted
    }
}

/// The fault-injecting wrapper around a real device.
pub(crate) struct FaultDevice {
    inner: Box<dyn Device>,
    faults: Faults,
}

impl FaultDevice {
    /// Wraps `inner`.
    pub(crate) fn new(inner: Box<dyn Device>, faults: Faults) -> Self {
        Self { inner, faults }
    }

    fn simple(&self, op: FaultOp, span: Option<Range<u64>>) -> io::Result<()> {
        match self.faults.decide(op, span) {
            Some(FaultAction::Fail(errno)) => Err(io::Error::from_raw_os_error(errno)),
            Some(FaultAction::Delay(d)) => {
                std::thread::sleep(d);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Device for FaultDevice {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    unsafe fn submit(&self, ops: &mut [IoOp]) {
        let mut delay = Duration::ZERO;
        let mut pass = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter_mut().enumerate() {
            let kind = match op.kind {
                OpKind::Read => FaultOp::Read,
                OpKind::Write => FaultOp::Write,
            };
            let span = op.offset..op.offset + op.len() as u64;
            match self.faults.decide(kind, Some(span)) {
                Some(FaultAction::Fail(errno)) => {
                    op.result = Err(io::Error::from_raw_os_error(errno))
                }
                Some(FaultAction::Delay(d)) => {
                    delay = delay.max(d);
                    pass.push(i);
                }
                None => pass.push(i),
            }
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        if pass.len() == ops.len() {
            // SAFETY: forwarded from this function's contract.
            unsafe { self.inner.submit(ops) };
            return;
        }
        let mut sub: Vec<IoOp> = pass
            .iter()
            .map(|&i| IoOp {
                result: Ok(0),
                ..ops[i].clone_op()
            })
            .collect();
        // SAFETY: the copies name the same buffers as the originals, which the caller keeps
        // valid until this returns; each buffer is used by one op only, as before.
        unsafe { self.inner.submit(&mut sub) };
        for (&i, s) in pass.iter().zip(sub) {
            ops[i].result = s.result;
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.simple(FaultOp::Sync, None)?;
        self.inner.sync()
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.simple(FaultOp::Allocate, Some(offset..offset + len))?;
        self.inner.allocate(offset, len)
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    fn repair(&self) -> io::Result<()> {
        self.inner.repair()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_skip_count_and_match_offsets() {
        let f = Faults::new();
        let id = f.add(
            FaultRule::fail(FaultOp::Write, 5)
                .at_offsets(100..200)
                .after(1)
                .times(2),
        );
        assert_eq!(f.decide(FaultOp::Write, Some(0..50)), None);
        assert_eq!(f.decide(FaultOp::Read, Some(150..160)), None);
        assert_eq!(f.decide(FaultOp::Write, Some(150..160)), None); // skipped
        assert_eq!(
            f.decide(FaultOp::Write, Some(50..101)),
            Some(FaultAction::Fail(5))
        );
        assert_eq!(
            f.decide(FaultOp::Write, Some(199..300)),
            Some(FaultAction::Fail(5))
        );
        assert_eq!(f.decide(FaultOp::Write, Some(150..160)), None); // used up
        assert_eq!(f.decide(FaultOp::Sync, None), None);
        f.remove(id);
        f.add(FaultRule {
            op: None,
            ..FaultRule::delay(FaultOp::Read, Duration::from_millis(1))
        });
        assert!(matches!(
            f.decide(FaultOp::Sync, None),
            Some(FaultAction::Delay(_))
        ));
        assert_eq!(f.injected(), 3);
        assert_eq!(f.seen(FaultOp::Write), 5);
    }
}
