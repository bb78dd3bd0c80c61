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
//! are split to fit the limits the agent announced, and puts share the session's quotas among
//! the tasks that use one client. When the agent restarts, a lookup, get or put under way that
//! had changed nothing runs once more on a new session; any other call under way fails with
//! [`ClientError::Disconnected`] and the next call attaches a new session. While no agent
//! answers, calls fail with [`ClientError::Connect`]. Values of an old session stay readable
//! (they map the old region) until dropped.
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
//! - `lib` (this file): [`Client`] and the types of its API;
//! - `calls`: the operations on one session (splitting, the pipelined put, answers into
//!   values, slots and outcomes);
//! - `session`: one attached session, and the one `call` every operation goes through
//!   (fast path or gRPC, cancellation-safe);
//! - `conn`: the task pair that owns the session connection;
//! - `batch`: splitting batches to the agent's limits;
//! - `value`: [`Value`], [`Slot`] and the queues that return their leases and reservations;
//! - `error`: [`ClientError`].

mod batch;
mod calls;
mod conn;
mod error;
mod session;
mod value;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use nencache_api::{
    frame::{Request, ReserveItem, Response, op},
    v1,
};
pub use nencache_engine::{ChunkKeys, DEFAULT_CHUNK_SIZE, MAX_KEY_LEN, checksum, hex};

use crate::{
    calls::{
        check_items, check_keys, commit_outcomes, get_on, group_by_session, lookup_on, next_round,
        partial, put_many_on, reserve_patiently, ttl_ms,
    },
    session::{Session, mismatched},
};
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
    /// aborted. Slots count against the session's quotas (`max_reservations_per_session`,
    /// `max_staging_per_session`) until committed, aborted or dropped.
    ///
    /// # Errors
    /// The agent's refusal, `RESOURCE_EXHAUSTED` when the session's quota is held by other
    /// slots or calls of this client, or a transport error; then nothing is reserved.
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
        check_items(&s, &items)?;
        let mut slots = Vec::with_capacity(items.len());
        while slots.len() < items.len() {
            let round = next_round(&s, &items, slots.len());
            // Slots hold their round's share of the session's quota until consumed; slots
            // of earlier rounds are aborted when dropped on an error here.
            // Slots may be kept for long: never wait for another call's share.
            let held = round.hold(&s, None).await?;
            let patience = Duration::from_secs(1);
            slots.extend(reserve_patiently(&s, &held, &items[round.items], patience).await?);
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
            // The slots' quota shares stay held until their commits are answered.
            let held: Vec<_> = group.iter().map(|slot| slot.held.clone()).collect();
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
            let answers = pending;
            let _held = held;
            for (start, n, p) in answers {
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
            // Every part is sent before any answer is awaited, so a cancelled or refused
            // call still aborts the rest.
            let sent: Vec<_> = ranges
                .into_iter()
                .map(|r| {
                    let part: Vec<u64> = ids.drain(..r.len()).collect();
                    s.call(&Request::Abort(part), None)
                })
                .collect();
            for answer in sent {
                match answer.await? {
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
    /// concurrent get). Leases of a session the agent has closed ended with it.
    ///
    /// # Errors
    /// None today; kept fallible for transports that may fail.
    pub async fn flush_releases(&self) -> Result<()> {
        let s = self.inner.current.lock().clone();
        loop {
            s.send_queued().await;
            s.queues.settled().await;
            if s.is_dead() {
                // Its leases ended with it.
                return Ok(());
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
        check_keys(&s, keys)?;
        let sizer = batch::Sizer {
            fast: false,
            ..s.sizer
        };
        let mut deleted = 0;
        for r in sizer.split(keys.iter().map(|k| sizer.key(k))) {
            let req = v1::DeleteRequest {
                keys: keys[r].iter().map(|k| k.to_vec()).collect(),
            };
            let r = s.grpc.clone().delete(req).await;
            deleted += r.map_err(|e| s.grpc_error(e))?.into_inner().deleted as usize;
        }
        Ok(deleted)
    }

    /// The agent's counters.
    ///
    /// # Errors
    /// A transport error.
    pub async fn stats(&self) -> Result<v1::StatsResponse> {
        let s = self.live().await?;
        let r = s.grpc.clone().stats(v1::StatsRequest {}).await;
        Ok(r.map_err(|e| s.grpc_error(e))?.into_inner())
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
