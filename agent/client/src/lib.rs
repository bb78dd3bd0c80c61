//! Rust client for the NenCache agent.
//!
//! [`Client::connect`] opens a gRPC channel on the agent's Unix socket, performs the
//! handshake, attaches a session (receiving the arena and staging descriptors) and maps both
//! regions. Then:
//!
//! - [`Client::put`] / [`Client::put_many`] reserve space, write values into the staging
//!   area and commit them; [`Client::reserve`] exposes the staging slot for callers that fill
//!   it themselves (a device-to-host copy, for instance);
//! - [`Client::get`] returns [`Value`]s: zero-copy views of the read-only arena, each holding
//!   a lease that is released (in batches, in the background) when the value is dropped;
//! - [`Client::lookup`], [`Client::delete`], [`Client::stats`].
//!
//! Every call may be cancelled (a timeout dropping its future): the request still completes,
//! and leases or reservations it obtained are returned in the background. Batches of any size
//! are split to fit the limits the agent announced. When the agent restarts, the call under
//! way fails with [`ClientError::Disconnected`] and the next call attaches a new session;
//! values of the old session stay readable (they map the old region) until dropped.
//!
//! Chunk keys for prompts come from [`ChunkKeys`] (re-exported from the engine).
//!
//! ```no_run
//! # async fn demo() -> Result<(), nencache_client::ClientError> {
//! let client = nencache_client::Client::connect("/run/nencache/agent.sock").await?;
//! client.put(b"key", b"value", b"").await?;
//! let values = client.get(&[b"key"]).await?;
//! assert_eq!(values[0].as_ref().map(|v| v.as_slice()), Some(&b"value"[..]));
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`session`](crate::session): one attached session, and the one `call` every operation
//!   goes through (fast path or gRPC, cancellation-safe);
//! - `conn`: the task pair that owns the session connection;
//! - `batch`: splitting batches to the agent's limits;
//! - `value`: [`Value`], [`Slot`] and the queues that return their leases and reservations;
//! - `error`: [`ClientError`].

mod batch;
mod conn;
mod error;
mod session;
mod value;

use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use nencache_api::{
    frame::{Found, Request, ReserveItem, Response, op},
    v1,
};
pub use nencache_engine::{ChunkKeys, DEFAULT_CHUNK_SIZE, MAX_KEY_LEN, checksum, hex};

use crate::session::{Session, count, mismatched};
pub use crate::{
    error::ClientError,
    value::{Slot, Value},
};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Connection options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name sent in the handshake, for the agent's logs.
    pub client_name: String,
    /// Send an XXH3-64 checksum with each commit, so the agent verifies the bytes it copied
    /// from staging (protects a put against another process writing the staging area).
    pub verify_puts: bool,
    /// Send lookups, gets, releases and puts over the session connection (one socket round
    /// trip each, no HTTP/2) instead of gRPC.
    pub fast_path: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_name: format!("nencache-client/{}", std::process::id()),
            verify_puts: false,
            fast_path: true,
        }
    }
}

/// Limits and layout the agent announced in the handshake.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Agent version.
    pub agent_version: String,
    /// The protocol version agreed on.
    pub protocol_version: u32,
    /// Arena size in bytes.
    pub arena_size: u64,
    /// Staging size in bytes.
    pub staging_size: u64,
    /// Allocation granule.
    pub page_size: u32,
    /// Limits.
    pub limits: v1::Limits,
}

/// One value to put.
#[derive(Debug, Clone, Copy)]
pub struct Put<'a> {
    /// Key (1 to 256 bytes).
    pub key: &'a [u8],
    /// Value bytes.
    pub value: &'a [u8],
    /// Opaque metadata.
    pub metadata: &'a [u8],
    /// Time to live; `None` takes the agent's default.
    pub ttl: Option<Duration>,
}

/// One slot to reserve (see [`Client::reserve`]).
#[derive(Debug, Clone, Copy)]
pub struct Reserve<'a> {
    /// Key (1 to 256 bytes).
    pub key: &'a [u8],
    /// Length of the value that will be written.
    pub value_len: u64,
    /// Opaque metadata.
    pub metadata: &'a [u8],
    /// Time to live; `None` takes the agent's default.
    pub ttl: Option<Duration>,
}

/// What happened to one put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored.
    Stored,
    /// The key was already cached; nothing was written.
    Exists,
    /// The agent found different bytes than the checksum said; nothing was stored.
    ChecksumMismatch,
}

/// A connected client. Cheap to clone; clones share one session, whose calls are pipelined
/// on its connection (many tasks may call at once).
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: PathBuf,
    options: ClientOptions,
    current: parking_lot::Mutex<Arc<Session>>,
    reconnecting: tokio::sync::Mutex<()>,
}

/// Values written to staging before their commit is sent, when a batch is pipelined.
const PIPELINE_BYTES: usize = 2 << 20;

impl Client {
    /// Connects with default options.
    ///
    /// # Errors
    /// When the socket is unreachable, the handshake or attach fails, or mapping fails.
    pub async fn connect(socket: impl AsRef<Path>) -> Result<Self> {
        Self::connect_with(socket, ClientOptions::default()).await
    }

    /// Connects with `options`.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn connect_with(socket: impl AsRef<Path>, options: ClientOptions) -> Result<Self> {
        let socket = socket.as_ref().to_path_buf();
        let session = Session::connect(&socket, &options).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                socket,
                options,
                current: parking_lot::Mutex::new(session),
                reconnecting: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The live session, attaching a new one when the agent closed the last (it restarted).
    async fn live(&self) -> Result<Arc<Session>> {
        let s = self.inner.current.lock().clone();
        if !s.is_dead() {
            return Ok(s);
        }
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        let s = self.inner.current.lock().clone();
        if !s.is_dead() {
            return Ok(s);
        }
        let fresh = Session::connect(&self.inner.socket, &self.inner.options).await?;
        tracing::info!(
            old = format_args!("{:#x}", s.id),
            new = format_args!("{:#x}", fresh.id),
            "re-attached after the session ended"
        );
        *self.inner.current.lock() = fresh.clone();
        Ok(fresh)
    }

    /// The current session's id.
    #[must_use]
    pub fn session(&self) -> u64 {
        self.inner.current.lock().id
    }

    /// What the agent announced when the current session was attached.
    #[must_use]
    pub fn info(&self) -> Arc<AgentInfo> {
        self.inner.current.lock().info.clone()
    }

    /// How many leading `keys` are cached, and the tier of each of those. A prompt longer than
    /// one request allows is looked up in consecutive requests, stopping at the first miss.
    ///
    /// # Errors
    /// The agent's refusal (an invalid key) or a transport error.
    pub async fn lookup(&self, keys: &[&[u8]]) -> Result<(usize, Vec<v1::Tier>)> {
        let s = self.live().await?;
        match lookup_on(&s, keys).await {
            Err(e) if lost(&s, &e) => lookup_on(&self.live().await?, keys).await,
            r => r,
        }
    }

    /// Puts one value.
    ///
    /// # Errors
    /// As [`Client::put_many`].
    pub async fn put(&self, key: &[u8], value: &[u8], metadata: &[u8]) -> Result<PutOutcome> {
        let r = self
            .put_many(&[Put {
                key,
                value,
                metadata,
                ttl: None,
            }])
            .await?;
        r.into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("no outcome for the put".into()))
    }

    /// Puts a batch of values. The batch is sent in rounds that fit the agent's limits (items
    /// per request, request size, staging space per session); in each round one reserve is
    /// sent, then the values are written into staging in groups of about 2 MiB, each group's
    /// commit sent as soon as it is written, so the agent copies one group while this client
    /// writes the next.
    ///
    /// # Errors
    /// Invalid input, the agent's refusal (`RESOURCE_EXHAUSTED` when no space can be made) or
    /// a transport error. When nothing was stored the error is the refusal itself; when an
    /// earlier round was stored it is [`ClientError::PartialPut`], which gives the outcome of
    /// every item (`None` for those not stored).
    pub async fn put_many(&self, puts: &[Put<'_>]) -> Result<Vec<PutOutcome>> {
        let s = self.live().await?;
        match put_many_on(&s, puts).await {
            Err(e) if lost(&s, &e) => put_many_on(&self.live().await?, puts).await,
            r => r,
        }
    }

    /// Reserves staging slots; `None` for keys already cached. All or nothing: when a batch
    /// is sent in several requests and one is refused, the slots already reserved are
    /// aborted.
    ///
    /// # Errors
    /// The agent's refusal or a transport error; then nothing is reserved.
    pub async fn reserve(&self, items: &[Reserve<'_>]) -> Result<Vec<Option<Slot>>> {
        let s = self.live().await?;
        let items: Vec<ReserveItem<'_>> = items
            .iter()
            .map(|r| ReserveItem {
                key: r.key,
                value_len: r.value_len,
                metadata: r.metadata,
                ttl_ms: ttl_ms(r.ttl),
                overwrite: false,
            })
            .collect();
        let mut slots = Vec::with_capacity(items.len());
        for round in rounds(&s, &items) {
            // Slots of earlier rounds are aborted when dropped on this error.
            slots.extend(reserve(&s, &items[round]).await?);
        }
        Ok(slots)
    }

    /// Writes `data` at `at` within `slot`.
    ///
    /// # Errors
    /// When the write would leave the slot, the slot's session ended, or its reservation is
    /// about to time out (see [`Slot`]).
    pub fn write_slot(&self, slot: &Slot, at: usize, data: &[u8]) -> Result<()> {
        slot.write(at, data)
    }

    /// Commits slots filled by the caller (no checksum); the slots are consumed, so none can
    /// be written after its commit.
    ///
    /// # Errors
    /// The agent's refusal (an expired reservation, for instance) or a transport error. When
    /// the slots span several requests and a later one is refused, the error is
    /// [`ClientError::PartialPut`] with the outcome of each slot.
    pub async fn commit(&self, slots: Vec<Slot>) -> Result<Vec<PutOutcome>> {
        let mut outcomes: Vec<Option<PutOutcome>> = vec![None; slots.len()];
        let mut at = 0;
        for group in group_by_session(slots) {
            let s = group[0].session.clone();
            let ranges = s.sizer.split(group.iter().map(|_| s.sizer.commit()));
            let mut ids: Vec<(u64, Option<u64>)> = group
                .into_iter()
                .map(|slot| (slot.disarm(), None))
                .collect();
            let mut pending = Vec::new();
            for r in ranges {
                let n = r.len();
                let part: Vec<_> = ids.drain(..n).collect();
                pending.push((at, n, s.call(&Request::Commit(part), None)));
                at += n;
            }
            for (start, n, p) in pending {
                match commit_outcomes(p.await, n) {
                    Ok(o) => {
                        for (slot, o) in outcomes[start..start + n].iter_mut().zip(o) {
                            *slot = Some(o);
                        }
                    }
                    Err(e) => return Err(partial(outcomes, e)),
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| ClientError::Protocol("a commit has no outcome".into())))
            .collect()
    }

    /// Abandons reserved slots.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn abort(&self, slots: Vec<Slot>) -> Result<()> {
        for group in group_by_session(slots) {
            let s = group[0].session.clone();
            let ranges = s.sizer.split(group.iter().map(|_| s.sizer.id()));
            let mut ids: Vec<u64> = group.into_iter().map(Slot::disarm).collect();
            for r in ranges {
                let part: Vec<u64> = ids.drain(..r.len()).collect();
                match s.call(&Request::Abort(part), None).await? {
                    Response::Abort => {}
                    _ => return Err(mismatched(op::ABORT)),
                }
            }
        }
        Ok(())
    }

    /// Gets values; `None` for keys not cached. Each value holds a lease until dropped. A
    /// batch larger than one request allows is sent as several pipelined requests.
    ///
    /// # Errors
    /// The agent's refusal (an invalid key, too many leases) or a transport error; then no
    /// lease of this call is kept.
    pub async fn get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Value>>> {
        let s = self.live().await?;
        match get_on(&s, keys).await {
            Err(e) if lost(&s, &e) => get_on(&self.live().await?, keys).await,
            r => r,
        }
    }

    /// Releases the leases of every value dropped so far, and returns once the agent has
    /// applied them (including releases already under way in the background or riding on a
    /// concurrent get).
    ///
    /// # Errors
    /// A transport error.
    pub async fn flush_releases(&self) -> Result<()> {
        let s = self.inner.current.lock().clone();
        loop {
            s.send_queued().await;
            s.queues.settled().await;
            if s.is_dead() {
                return Err(s.disconnected());
            }
            if !s.queues.releases_pending() {
                return Ok(());
            }
        }
    }

    /// Deletes keys; returns how many existed.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn delete(&self, keys: &[&[u8]]) -> Result<usize> {
        let s = self.live().await?;
        let sizer = batch::Sizer {
            fast: false,
            ..s.sizer
        };
        let mut deleted = 0;
        for r in sizer.split(keys.iter().map(|k| sizer.key(k))) {
            let req = v1::DeleteRequest {
                keys: keys[r].iter().map(|k| k.to_vec()).collect(),
            };
            deleted += s.grpc.clone().delete(req).await?.into_inner().deleted as usize;
        }
        Ok(deleted)
    }

    /// The agent's counters.
    ///
    /// # Errors
    /// A transport error.
    pub async fn stats(&self) -> Result<v1::StatsResponse> {
        let s = self.live().await?;
        Ok(s.grpc
            .clone()
            .stats(v1::StatsRequest {})
            .await?
            .into_inner())
    }
}

/// Whether `e` means the session died under a call that changed nothing, so that the call
/// may run again on a new session (the agent stopped or restarted).
fn lost(s: &Session, e: &ClientError) -> bool {
    let lost = matches!(e, ClientError::Disconnected(_)) && s.is_dead();
    if lost {
        tracing::debug!(error = %e, "session lost during a call; retrying on a new one");
    }
    lost
}

/// A TTL on the wire: milliseconds, at least 1, or 0 for the agent's default.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| t.as_millis().max(1) as u64)
}

/// `e` as the error of a batch of which `outcomes` is known: the error itself when nothing
/// was done, else a [`ClientError::PartialPut`].
fn partial(outcomes: Vec<Option<PutOutcome>>, e: ClientError) -> ClientError {
    if outcomes.iter().all(Option::is_none) {
        e
    } else {
        ClientError::PartialPut {
            outcomes,
            source: Box::new(e),
        }
    }
}

/// The rounds a batch of puts is sent in: each round's reserve fits one request, and its
/// values fit the staging space and reservations one session may hold.
fn rounds(s: &Session, items: &[ReserveItem<'_>]) -> Vec<Range<usize>> {
    let limits = &s.info.limits;
    let page = u64::from(s.info.page_size.max(1));
    let staging_quota = match limits.max_staging_per_session {
        0 => s.staging_len() as u64,
        n => n,
    };
    let max_items = match limits.max_reservations_per_session {
        0 => s.sizer.max_batch,
        n => s.sizer.max_batch.min(n as usize),
    };
    let mut out = Vec::new();
    let (mut start, mut bytes, mut staging) = (0, 0, 0u64);
    for (i, it) in items.iter().enumerate() {
        let size = s.sizer.reserve(it);
        let pages = it.value_len.div_ceil(page).max(1) * page;
        if i > start
            && (i - start == max_items
                || bytes + size > s.sizer.budget
                || staging + pages > staging_quota)
        {
            out.push(start..i);
            (start, bytes, staging) = (i, 0, 0);
        }
        bytes += size;
        staging += pages;
    }
    if items.len() > start {
        out.push(start..items.len());
    }
    out
}

/// One reserve request; slots are checked against the staging area.
async fn reserve(s: &Arc<Session>, items: &[ReserveItem<'_>]) -> Result<Vec<Option<Slot>>> {
    let sent = Instant::now();
    let resp = s.call(&Request::Reserve(items.to_vec()), None).await?;
    let Response::Reserve(granted) = resp else {
        return Err(mismatched(op::RESERVE));
    };
    // Slots are made for every grant first, so an error below aborts them all.
    let timeout = Duration::from_millis(s.info.limits.reservation_timeout_ms);
    let write_by = sent + timeout.saturating_sub((timeout / 4).min(Duration::from_secs(2)));
    let slots: Vec<Option<Slot>> = granted
        .iter()
        .zip(
            items
                .iter()
                .map(|i| i.value_len)
                .chain(std::iter::repeat(0)),
        )
        .map(|(g, len)| {
            g.map(|(id, offset)| Slot {
                session: s.clone(),
                id,
                offset: offset as usize,
                len: len as usize,
                write_by,
                armed: true,
            })
        })
        .collect();
    count(op::RESERVE, slots.len(), items.len())?;
    if slots.iter().flatten().any(|slot| {
        slot.offset
            .checked_add(slot.len)
            .is_none_or(|end| end > s.staging_len())
    }) {
        return Err(ClientError::Protocol("staging slot out of bounds".into()));
    }
    Ok(slots)
}

/// One round of `put_many`: reserve, then write and commit in pipelined groups. Records the
/// outcome of each item in `outcomes` as it becomes known, so that a failure part-way leaves
/// there what was stored.
async fn put_round(
    s: &Arc<Session>,
    items: &[ReserveItem<'_>],
    puts: &[Put<'_>],
    outcomes: &mut [Option<PutOutcome>],
) -> Result<()> {
    let slots = reserve(s, items).await?;
    for (o, slot) in outcomes.iter_mut().zip(&slots) {
        if slot.is_none() {
            *o = Some(PutOutcome::Exists);
        }
    }
    let mut reserved: Vec<(usize, Slot, &[u8])> = Vec::with_capacity(slots.len());
    for (i, (slot, p)) in slots.into_iter().zip(puts).enumerate() {
        if let Some(slot) = slot {
            reserved.push((i, slot, p.value));
        }
    }
    let mut reserved = reserved.into_iter().peekable();
    let mut pending = Vec::new();
    let mut refused = None;
    while refused.is_none() && reserved.peek().is_some() {
        let (mut group, mut bytes, mut at) = (Vec::new(), 0, Vec::new());
        while let Some((i, slot, value)) =
            reserved.next_if(|_| bytes < PIPELINE_BYTES && group.len() < s.sizer.max_batch)
        {
            if let Err(e) = slot.write(0, value) {
                // This slot and every one not yet written are dropped, and so aborted.
                refused = Some(e);
                break;
            }
            let sum = s.verify.then(|| checksum(value));
            bytes += value.len();
            at.push(i);
            group.push((slot, sum));
        }
        if group.is_empty() {
            break;
        }
        let group: Vec<(u64, Option<u64>)> = group
            .into_iter()
            .map(|(slot, sum)| (slot.disarm(), sum))
            .collect();
        pending.push((at, s.call(&Request::Commit(group), None)));
    }
    drop(reserved);
    // Every commit sent is awaited, even after a refusal, so that each outcome is known.
    for (at, p) in pending {
        match commit_outcomes(p.await, at.len()) {
            Ok(o) => {
                for (i, o) in at.into_iter().zip(o) {
                    outcomes[i] = Some(o);
                }
            }
            Err(e) => refused = refused.or(Some(e)),
        }
    }
    refused.map_or(Ok(()), Err)
}

fn commit_outcomes(r: Result<Response>, n: usize) -> Result<Vec<PutOutcome>> {
    let Response::Commit(done) = r? else {
        return Err(mismatched(op::COMMIT));
    };
    count(op::COMMIT, done.len(), n)?;
    Ok(done
        .into_iter()
        .map(|ok| {
            if ok {
                PutOutcome::Stored
            } else {
                PutOutcome::ChecksumMismatch
            }
        })
        .collect())
}

/// Consecutive runs of slots of one session (slots outlive a reconnect).
fn group_by_session(slots: Vec<Slot>) -> Vec<Vec<Slot>> {
    let mut out: Vec<Vec<Slot>> = Vec::new();
    for slot in slots {
        match out.last_mut() {
            Some(g) if Arc::ptr_eq(&g[0].session, &slot.session) => g.push(slot),
            _ => out.push(vec![slot]),
        }
    }
    out
}

/// A [`Value`] for a found item; its lease is returned when it is dropped.
fn value(s: &Arc<Session>, f: Found) -> Value {
    Value {
        session: s.clone(),
        offset: f.offset as usize,
        len: f.len as usize,
        lease: f.lease,
        metadata: f.metadata,
    }
}

async fn lookup_on(s: &Arc<Session>, keys: &[&[u8]]) -> Result<(usize, Vec<v1::Tier>)> {
    let mut tiers = Vec::new();
    for r in s.sizer.split(keys.iter().map(|k| s.sizer.key(k))) {
        let want = r.len();
        let Response::Lookup(t) = s.call(&Request::Lookup(keys[r].to_vec()), None).await? else {
            return Err(mismatched(op::LOOKUP));
        };
        if t.len() > want {
            return Err(ClientError::Protocol(format!(
                "lookup answered {} tiers for {want} keys",
                t.len()
            )));
        }
        let full = t.len() == want;
        tiers.extend(
            t.into_iter()
                .map(|t| v1::Tier::try_from(i32::from(t)).unwrap_or_default()),
        );
        if !full {
            break;
        }
    }
    Ok((tiers.len(), tiers))
}

async fn put_many_on(s: &Arc<Session>, puts: &[Put<'_>]) -> Result<Vec<PutOutcome>> {
    let items: Vec<ReserveItem<'_>> = puts
        .iter()
        .map(|p| ReserveItem {
            key: p.key,
            value_len: p.value.len() as u64,
            metadata: p.metadata,
            ttl_ms: ttl_ms(p.ttl),
            overwrite: false,
        })
        .collect();
    let mut outcomes: Vec<Option<PutOutcome>> = vec![None; puts.len()];
    for round in rounds(s, &items) {
        let r = put_round(
            s,
            &items[round.clone()],
            &puts[round.clone()],
            &mut outcomes[round],
        )
        .await;
        if let Err(e) = r {
            return Err(partial(outcomes, e));
        }
    }
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| ClientError::Protocol("a put has no outcome".into())))
        .collect()
}

async fn get_on(s: &Arc<Session>, keys: &[&[u8]]) -> Result<Vec<Option<Value>>> {
    let sizes: Vec<usize> = keys.iter().map(|k| s.sizer.key(k)).collect();
    let mut pending = Vec::new();
    for r in s.sizer.split(sizes.iter().copied()) {
        let used: usize = sizes[r.clone()].iter().sum();
        // Leases of dropped values ride along instead of a call of their own.
        let room = s.sizer.budget.saturating_sub(used) / s.sizer.id();
        let (ids, settle) = s.queues.take_releases(room.min(s.sizer.max_batch));
        let n = r.len();
        pending.push((n, s.call(&Request::Get(keys[r].to_vec(), ids), settle)));
    }
    let mut out = Vec::with_capacity(keys.len());
    for (n, p) in pending {
        let Response::Get(found) = p.await? else {
            return Err(mismatched(op::GET));
        };
        // Values first, so that an error below drops them all and so returns every lease.
        let values: Vec<Option<Value>> =
            found.into_iter().map(|f| f.map(|f| value(s, f))).collect();
        count(op::GET, values.len(), n)?;
        let arena = s.arena().len();
        if values
            .iter()
            .flatten()
            .any(|v| v.offset.checked_add(v.len).is_none_or(|end| end > arena))
        {
            return Err(ClientError::Protocol("value extent out of bounds".into()));
        }
        out.extend(values);
    }
    Ok(out)
}
