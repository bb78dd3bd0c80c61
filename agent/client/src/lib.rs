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

use std::{
    fs::File,
    io::Write,
    os::unix::net::UnixStream as StdUnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::rt::TokioIo;
use memmap2::{Mmap, MmapOptions, MmapRaw};
use nencache_api::{
    PROTOCOL_VERSION,
    attach::{self, Hello, MAX_REPLY_LEN, Reply},
    frame::{Found, Request, ReserveItem, Response, op},
    v1::{self, node_cache_client::NodeCacheClient},
};
pub use nencache_engine::{ChunkKeys, DEFAULT_CHUNK_SIZE, MAX_KEY_LEN, checksum, hex};
use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};
use tonic::transport::{Channel, Endpoint};

/// What went wrong in a client call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gRPC channel could not be opened.
    #[error("connecting to {socket}: {source}")]
    Connect {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The agent refused or failed a call.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The attach exchange failed.
    #[error("attaching a session: {0}")]
    Attach(String),
    /// Mapping shared memory or another local operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The gRPC code, when the agent refused the call.
    #[must_use]
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

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

/// Leases of dropped values waiting to be released. Whoever sends some (the next get, the
/// background flusher, `flush_releases`) takes them as a [`ReleaseBatch`], which counts as in
/// flight until the agent has answered, so that `flush_releases` can wait for every release
/// already under way, not only the ones it sends itself.
#[derive(Debug, Default)]
struct ReleaseQueue {
    pending: Mutex<Vec<u64>>,
    wake: Notify,
    in_flight: AtomicUsize,
    settled: Notify,
}

impl ReleaseQueue {
    /// Takes every pending lease id.
    fn take(&self) -> ReleaseBatch<'_> {
        let mut pending = self.pending.lock();
        let ids = std::mem::take(&mut *pending);
        let counted = !ids.is_empty();
        if counted {
            // Under the lock, so a waiter never sees the ids neither pending nor in flight.
            self.in_flight.fetch_add(1, Ordering::AcqRel);
        }
        ReleaseBatch {
            queue: self,
            ids,
            counted,
        }
    }

    /// Returns once no taken batch is still being sent.
    async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Lease ids taken from the queue; in flight until dropped, which is done once the agent has
/// answered (or the ids went back to the queue).
struct ReleaseBatch<'a> {
    queue: &'a ReleaseQueue,
    ids: Vec<u64>,
    counted: bool,
}

impl Drop for ReleaseBatch<'_> {
    fn drop(&mut self) {
        if self.counted && self.queue.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.queue.settled.notify_waiters();
        }
    }
}

#[derive(Debug)]
struct Shared {
    arena: Mmap,
    staging: MmapRaw,
    releases: Arc<ReleaseQueue>,
    /// The session's connection: the agent ends the session when it closes, so values keep
    /// it alive; it also carries fast-path calls.
    conn: Arc<SessionConn>,
}

/// Longest fast-path response accepted.
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug)]
struct ConnState {
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
    /// False once a call was interrupted mid-exchange: the stream may then hold a stale
    /// response, so calls go over gRPC instead.
    in_step: bool,
}

/// The attach connection, used for fast-path calls one at a time.
#[derive(Debug)]
struct SessionConn(tokio::sync::Mutex<ConnState>);

impl ConnState {
    async fn send(&mut self, req: &Request<'_>) -> Result<()> {
        self.buf.clear();
        req.encode(&mut self.buf);
        self.stream
            .write_all(&self.buf)
            .await
            .map_err(|source| ClientError::Io {
                what: "session connection",
                source,
            })
    }

    /// Reads the response to a request of operation `op`. An agent refusal is an `Err` that
    /// leaves the stream in step; I/O and framing errors do not.
    async fn recv(&mut self, op: u8) -> Result<Response> {
        let io = |source| ClientError::Io {
            what: "session connection",
            source,
        };
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.map_err(io)?;
        let n = u32::from_le_bytes(len) as usize;
        if n == 0 || n > MAX_RESPONSE {
            return Err(ClientError::Protocol(format!(
                "fast-path response of {n} bytes"
            )));
        }
        self.buf.resize(n, 0);
        self.stream.read_exact(&mut self.buf).await.map_err(io)?;
        match Response::decode(op, &self.buf) {
            Ok(Response::Error { code, message }) => Err(ClientError::Status(tonic::Status::new(
                tonic::Code::from(i32::from(code)),
                message,
            ))),
            Ok(r) => Ok(r),
            Err(e) => Err(ClientError::Protocol(e.to_string())),
        }
    }
}

/// Whether the stream is still in step after an exchange that ended with `r`.
fn in_step<T>(r: &Result<T>) -> bool {
    matches!(r, Ok(_) | Err(ClientError::Status(_)))
}

impl SessionConn {
    /// Sends `req` and reads its response; `None` when the connection is out of step.
    async fn call(&self, req: &Request<'_>) -> Option<Result<Response>> {
        let mut st = self.0.lock().await;
        if !st.in_step {
            return None;
        }
        st.in_step = false;
        let r = match st.send(req).await {
            Ok(()) => st.recv(req.op()).await,
            Err(e) => Err(e),
        };
        st.in_step = in_step(&r);
        Some(r)
    }
}

/// Limits and layout the agent announced in the handshake.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// Agent version.
    pub agent_version: String,
    /// Arena size in bytes.
    pub arena_size: u64,
    /// Staging size in bytes.
    pub staging_size: u64,
    /// Allocation granule.
    pub page_size: u32,
    /// Limits.
    pub limits: v1::Limits,
}

/// A connected client with an attached session. Cheap to clone; clones share the session and
/// its connection, whose fast-path calls run one at a time: for parallel streams of calls,
/// connect one client per stream.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: NodeCacheClient<Channel>,
    session: u64,
    shared: Arc<Shared>,
    info: Arc<AgentInfo>,
    options: ClientOptions,
    _flusher: Arc<FlusherGuard>,
}

#[derive(Debug)]
struct FlusherGuard(tokio::task::JoinHandle<()>);

impl Drop for FlusherGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A value read from the cache: a view of the read-only arena, valid while this lives. Its
/// lease is released when it is dropped.
#[derive(Debug)]
pub struct Value {
    shared: Arc<Shared>,
    offset: usize,
    len: usize,
    lease: u64,
    metadata: Vec<u8>,
}

impl Value {
    /// The value's bytes, in place in shared memory.
    #[must_use]
    pub fn as_slice(&self) -> &[u8] {
        &self.shared.arena[self.offset..self.offset + self.len]
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

impl Drop for Value {
    fn drop(&mut self) {
        self.shared.releases.pending.lock().push(self.lease);
        self.shared.releases.wake.notify_one();
    }
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

/// A reserved staging slot: write the value into it, then [`Client::commit`].
#[derive(Debug)]
pub struct Slot {
    id: u64,
    offset: usize,
    len: usize,
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
        let path = socket.clone();
        // The URI is required by the API but unused: the connector dials the Unix socket.
        let channel = Endpoint::from_static("http://[::1]:50051")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.clone(),
                source,
            })?;
        let mut grpc = NodeCacheClient::new(channel);
        let hs = grpc
            .handshake(v1::HandshakeRequest {
                protocol_version: PROTOCOL_VERSION,
                client_name: options.client_name.clone(),
                tenant: String::new(),
            })
            .await?
            .into_inner();
        if hs.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "agent speaks protocol {}, this client {PROTOCOL_VERSION}",
                hs.protocol_version
            )));
        }
        let attach_path = socket
            .parent()
            .unwrap_or(Path::new("."))
            .join(&hs.attach_socket);
        let (reply, stream, fds) =
            tokio::task::spawn_blocking(move || attach_session(&attach_path))
                .await
                .map_err(|e| ClientError::Attach(e.to_string()))??;
        let [arena_fd, staging_fd]: [std::os::fd::OwnedFd; 2] =
            fds.try_into().map_err(|v: Vec<_>| {
                ClientError::Attach(format!("expected 2 descriptors, got {}", v.len()))
            })?;
        let arena_file = File::from(arena_fd);
        let staging_file = File::from(staging_fd);
        // SAFETY: the arena is mapped read-only from a read-only descriptor; the agent never
        // rewrites an extent while a lease on it is held, which is when `Value` reads it.
        let arena = unsafe {
            MmapOptions::new()
                .len(reply.arena_len as usize)
                .map(&arena_file)
        }
        .map_err(|source| ClientError::Io {
            what: "mapping the arena",
            source,
        })?;
        let staging = MmapOptions::new()
            .len(reply.staging_len as usize)
            .map_raw(&staging_file)
            .map_err(|source| ClientError::Io {
                what: "mapping the staging area",
                source,
            })?;
        let limits = hs.limits.unwrap_or_default();
        let info = AgentInfo {
            agent_version: hs.agent_version,
            arena_size: reply.arena_len,
            staging_size: reply.staging_len,
            page_size: hs.page_size,
            limits,
        };
        stream
            .set_nonblocking(true)
            .map_err(|source| ClientError::Io {
                what: "session connection",
                source,
            })?;
        let stream =
            tokio::net::UnixStream::from_std(stream).map_err(|source| ClientError::Io {
                what: "session connection",
                source,
            })?;
        let conn = Arc::new(SessionConn(tokio::sync::Mutex::new(ConnState {
            stream,
            buf: Vec::new(),
            in_step: true,
        })));
        let releases = Arc::new(ReleaseQueue::default());
        let shared = Arc::new(Shared {
            arena,
            staging,
            releases: releases.clone(),
            conn: conn.clone(),
        });
        let flusher = tokio::spawn(flush_releases(
            grpc.clone(),
            reply.session,
            releases,
            options.fast_path.then(|| conn.clone()),
        ));
        Ok(Self {
            grpc,
            session: reply.session,
            shared,
            info: Arc::new(info),
            options,
            _flusher: Arc::new(FlusherGuard(flusher)),
        })
    }

    /// The session id.
    #[must_use]
    pub fn session(&self) -> u64 {
        self.session
    }

    /// What the agent announced.
    #[must_use]
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// How many leading `keys` are cached, and the tier of each of those.
    ///
    /// # Errors
    /// The agent's refusal (an invalid key, an oversized batch) or a transport error.
    pub async fn lookup(&self, keys: &[&[u8]]) -> Result<(usize, Vec<v1::Tier>)> {
        if let Some(r) = self.fast(&Request::Lookup(keys.to_vec())).await {
            let Response::Lookup(tiers) = r? else {
                return Err(ClientError::Protocol(
                    "mismatched fast-path response".into(),
                ));
            };
            let tiers: Vec<v1::Tier> = tiers
                .into_iter()
                .map(|t| v1::Tier::try_from(i32::from(t)).unwrap_or_default())
                .collect();
            return Ok((tiers.len(), tiers));
        }
        let r = self
            .grpc
            .clone()
            .lookup(v1::LookupRequest {
                keys: keys.iter().map(|k| k.to_vec()).collect(),
            })
            .await?
            .into_inner();
        let tiers = r
            .tiers
            .into_iter()
            .map(|t| v1::Tier::try_from(t).unwrap_or_default())
            .collect();
        Ok((r.prefix_hits as usize, tiers))
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
        Ok(r[0])
    }

    /// Puts a batch of values: one reserve, the copies into staging, one commit.
    ///
    /// # Errors
    /// The agent's refusal (invalid or oversized input, `RESOURCE_EXHAUSTED` when no space
    /// can be made) or a transport error. A refused batch stores nothing.
    pub async fn put_many(&self, puts: &[Put<'_>]) -> Result<Vec<PutOutcome>> {
        let items: Vec<Reserve<'_>> = puts
            .iter()
            .map(|p| Reserve {
                key: p.key,
                value_len: p.value.len() as u64,
                metadata: p.metadata,
                ttl: p.ttl,
            })
            .collect();
        if self.options.fast_path
            && let Some(r) = self.put_many_fast(&items, puts).await
        {
            return r;
        }
        let slots = self.reserve(&items).await?;
        // Each group's commit is in flight while the next group is written: the agent's copy
        // into the arena then overlaps the client's copy into staging.
        let mut pending = Vec::new();
        for group in self.commit_groups(&slots, puts) {
            let req = v1::CommitRequest {
                session: self.session,
                items: group?
                    .into_iter()
                    .map(|(reservation_id, checksum)| v1::CommitItem {
                        reservation_id,
                        checksum,
                    })
                    .collect(),
            };
            pending.push(tokio::spawn(commit_request(self.grpc.clone(), req)));
        }
        let mut outcomes = Vec::with_capacity(slots.len());
        for h in pending {
            let r = h
                .await
                .map_err(|e| ClientError::Protocol(format!("commit task: {e}")))?;
            outcomes.extend(r?);
        }
        Ok(outcomes_of(&slots, outcomes))
    }

    /// The commits of a batch, in groups of about [`PIPELINE_BYTES`]: each group's values are
    /// written into their staging slots as the group is taken, so a caller that sends each
    /// group before taking the next lets the agent copy one group while this client writes
    /// the next.
    fn commit_groups<'a>(
        &'a self,
        slots: &'a [Option<Slot>],
        puts: &'a [Put<'_>],
    ) -> impl Iterator<Item = Result<Vec<(u64, Option<u64>)>>> + 'a {
        let mut reserved = slots
            .iter()
            .zip(puts)
            .filter_map(|(s, p)| Some((s.as_ref()?, p.value)));
        std::iter::from_fn(move || {
            let mut group = Vec::new();
            let mut bytes = 0;
            for (slot, value) in reserved.by_ref() {
                if let Err(e) = self.write_slot(slot, 0, value) {
                    return Some(Err(e));
                }
                group.push((slot.id, self.options.verify_puts.then(|| checksum(value))));
                bytes += value.len();
                if bytes >= PIPELINE_BYTES {
                    break;
                }
            }
            (!group.is_empty()).then_some(Ok(group))
        })
    }

    /// `put_many` over the session connection, pipelined: one reserve, then each group's
    /// commit is sent as soon as its values are in staging, and the responses are read at the
    /// end, so the agent copies one group while this client writes the next. `None` when the
    /// connection is out of step.
    async fn put_many_fast(
        &self,
        items: &[Reserve<'_>],
        puts: &[Put<'_>],
    ) -> Option<Result<Vec<PutOutcome>>> {
        let mut st = self.shared.conn.0.lock().await;
        if !st.in_step {
            return None;
        }
        st.in_step = false;
        let r = self.put_pipelined(&mut st, items, puts).await;
        st.in_step = in_step(&r);
        Some(r)
    }

    async fn put_pipelined(
        &self,
        st: &mut ConnState,
        items: &[Reserve<'_>],
        puts: &[Put<'_>],
    ) -> Result<Vec<PutOutcome>> {
        let req = Request::Reserve(
            items
                .iter()
                .map(|r| ReserveItem {
                    key: r.key,
                    value_len: r.value_len,
                    metadata: r.metadata,
                    ttl_ms: ttl_ms(r.ttl),
                    overwrite: false,
                })
                .collect(),
        );
        st.send(&req).await?;
        let Response::Reserve(slots) = st.recv(op::RESERVE).await? else {
            return Err(ClientError::Protocol(
                "mismatched fast-path response".into(),
            ));
        };
        if slots.len() != puts.len() {
            return Err(ClientError::Protocol(
                "reserve answered the wrong number of items".into(),
            ));
        }
        let slots: Vec<Option<Slot>> = slots
            .into_iter()
            .zip(puts)
            .map(|(s, p)| {
                s.map(|(id, off)| self.slot(id, off, p.value.len()))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let mut sent = 0;
        for group in self.commit_groups(&slots, puts) {
            st.send(&Request::Commit(group?)).await?;
            sent += 1;
        }
        // Read every response, even after a refusal, so the stream stays in step.
        let mut committed = Vec::with_capacity(slots.len());
        let mut refused = None;
        for _ in 0..sent {
            match st.recv(op::COMMIT).await {
                Ok(Response::Commit(c)) => committed.extend(c),
                Ok(_) => {
                    return Err(ClientError::Protocol(
                        "mismatched fast-path response".into(),
                    ));
                }
                Err(e @ ClientError::Status(_)) => refused = refused.or(Some(e)),
                Err(e) => return Err(e),
            }
        }
        if let Some(e) = refused {
            return Err(e);
        }
        let committed = committed.into_iter().map(|ok| {
            if ok {
                PutOutcome::Stored
            } else {
                PutOutcome::ChecksumMismatch
            }
        });
        Ok(outcomes_of(&slots, committed))
    }

    /// A slot at `offset` of `len` bytes, checked against the staging area.
    fn slot(&self, id: u64, offset: u64, len: usize) -> Result<Slot> {
        let offset = offset as usize;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.shared.staging.len())
        {
            return Err(ClientError::Protocol("staging slot out of bounds".into()));
        }
        Ok(Slot { id, offset, len })
    }

    /// Reserves staging slots; `None` for keys already cached.
    ///
    /// # Errors
    /// The agent's refusal or a transport error; then nothing is reserved.
    pub async fn reserve(&self, items: &[Reserve<'_>]) -> Result<Vec<Option<Slot>>> {
        let r = self
            .grpc
            .clone()
            .reserve(v1::ReserveRequest {
                session: self.session,
                items: items
                    .iter()
                    .map(|r| v1::PutItem {
                        key: r.key.to_vec(),
                        value_len: r.value_len,
                        metadata: r.metadata.to_vec(),
                        ttl_ms: ttl_ms(r.ttl),
                        overwrite: false,
                    })
                    .collect(),
            })
            .await?
            .into_inner();
        if r.reservations.len() != items.len() {
            return Err(ClientError::Protocol(
                "reserve answered the wrong number of items".into(),
            ));
        }
        r.reservations
            .iter()
            .zip(items)
            .map(
                |(res, item)| match v1::ReserveStatus::try_from(res.status) {
                    Ok(v1::ReserveStatus::Reserved) => self
                        .slot(
                            res.reservation_id,
                            res.staging_offset,
                            item.value_len as usize,
                        )
                        .map(Some),
                    Ok(v1::ReserveStatus::Exists) => Ok(None),
                    _ => Err(ClientError::Protocol(format!(
                        "unknown reserve status {}",
                        res.status
                    ))),
                },
            )
            .collect()
    }

    /// Writes `data` at `at` within `slot`.
    ///
    /// # Errors
    /// When the write would leave the slot.
    pub fn write_slot(&self, slot: &Slot, at: usize, data: &[u8]) -> Result<()> {
        if at.checked_add(data.len()).is_none_or(|end| end > slot.len) {
            return Err(ClientError::Protocol(format!(
                "write of {} bytes at {at} leaves a slot of {} bytes",
                data.len(),
                slot.len
            )));
        }
        // SAFETY: the range lies inside this session's reserved staging slot (bounds checked
        // here and at reserve); the agent does not touch it until commit, and no reference
        // into shared memory is created, only a raw copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.shared.staging.as_mut_ptr().add(slot.offset + at),
                data.len(),
            );
        }
        Ok(())
    }

    /// Commits slots filled by the caller (no checksum).
    ///
    /// # Errors
    /// The agent's refusal (unknown, foreign or duplicate reservation) or a transport error.
    pub async fn commit(&self, slots: &[Slot]) -> Result<Vec<PutOutcome>> {
        let items = slots
            .iter()
            .map(|s| v1::CommitItem {
                reservation_id: s.id,
                checksum: None,
            })
            .collect();
        commit_request(
            self.grpc.clone(),
            v1::CommitRequest {
                session: self.session,
                items,
            },
        )
        .await
    }

    /// Abandons reserved slots.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn abort(&self, slots: &[Slot]) -> Result<()> {
        self.grpc
            .clone()
            .abort(v1::AbortRequest {
                session: self.session,
                reservation_ids: slots.iter().map(|s| s.id).collect(),
            })
            .await?;
        Ok(())
    }

    /// Gets values; `None` for keys not cached. Each value holds a lease until dropped.
    ///
    /// # Errors
    /// The agent's refusal (an invalid key, too many leases) or a transport error.
    pub async fn get(&self, keys: &[&[u8]]) -> Result<Vec<Option<Value>>> {
        // Leases of dropped values ride along with the next get instead of a call of their own.
        let mut done = self.shared.releases.take();
        let req = Request::Get(keys.to_vec(), std::mem::take(&mut done.ids));
        let fast = self.fast(&req).await;
        if fast.is_none()
            && let Request::Get(_, ids) = req
        {
            // Not sent: they go with the next call instead.
            self.shared.releases.pending.lock().extend(ids);
        }
        drop(done);
        let found: Vec<Option<Found>> = match fast {
            Some(r) => {
                let Response::Get(items) = r? else {
                    return Err(ClientError::Protocol(
                        "mismatched fast-path response".into(),
                    ));
                };
                items
            }
            None => self
                .grpc
                .clone()
                .get(v1::GetRequest {
                    session: self.session,
                    keys: keys.iter().map(|k| k.to_vec()).collect(),
                })
                .await?
                .into_inner()
                .items
                .into_iter()
                .map(|it| {
                    it.found.then_some(Found {
                        lease: it.lease_id,
                        offset: it.offset,
                        len: it.len,
                        tier: it.tier as u8,
                        metadata: it.metadata,
                    })
                })
                .collect(),
        };
        if found.len() != keys.len() {
            return Err(ClientError::Protocol(
                "get answered the wrong number of keys".into(),
            ));
        }
        let arena_len = self.shared.arena.len() as u64;
        let mut out = Vec::with_capacity(found.len());
        for f in found {
            let Some(f) = f else {
                out.push(None);
                continue;
            };
            if f.offset
                .checked_add(f.len)
                .is_none_or(|end| end > arena_len)
            {
                return Err(ClientError::Protocol("value extent out of bounds".into()));
            }
            out.push(Some(Value {
                shared: self.shared.clone(),
                offset: f.offset as usize,
                len: f.len as usize,
                lease: f.lease,
                metadata: f.metadata,
            }));
        }
        Ok(out)
    }

    /// A fast-path call, when enabled and the connection is in step.
    async fn fast(&self, req: &Request<'_>) -> Option<Result<Response>> {
        if !self.options.fast_path {
            return None;
        }
        self.shared.conn.call(req).await
    }

    /// Releases the leases of every value dropped so far, and returns once the agent has
    /// applied them (including releases already under way in the background or riding on a
    /// concurrent get).
    ///
    /// # Errors
    /// A transport error.
    pub async fn flush_releases(&self) -> Result<()> {
        let queue = &self.shared.releases;
        loop {
            let mut batch = queue.take();
            if !batch.ids.is_empty() {
                self.grpc
                    .clone()
                    .release(v1::ReleaseRequest {
                        session: self.session,
                        lease_ids: std::mem::take(&mut batch.ids),
                    })
                    .await?;
            }
            drop(batch);
            queue.settled().await;
            // A get whose fast path was out of step puts its ids back: send those too.
            if queue.pending.lock().is_empty() {
                return Ok(());
            }
        }
    }

    /// Deletes keys; returns how many existed.
    ///
    /// # Errors
    /// The agent's refusal or a transport error.
    pub async fn delete(&self, keys: &[&[u8]]) -> Result<usize> {
        let r = self
            .grpc
            .clone()
            .delete(v1::DeleteRequest {
                keys: keys.iter().map(|k| k.to_vec()).collect(),
            })
            .await?;
        Ok(r.into_inner().deleted as usize)
    }

    /// The agent's counters.
    ///
    /// # Errors
    /// A transport error.
    pub async fn stats(&self) -> Result<v1::StatsResponse> {
        Ok(self
            .grpc
            .clone()
            .stats(v1::StatsRequest {})
            .await?
            .into_inner())
    }
}

/// A TTL on the wire: milliseconds, at least 1, or 0 for the agent's default.
fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| t.as_millis().max(1) as u64)
}

/// The outcome of each put: `committed` in order for the reserved ones, `Exists` for keys
/// that were cached already.
fn outcomes_of(
    slots: &[Option<Slot>],
    committed: impl IntoIterator<Item = PutOutcome>,
) -> Vec<PutOutcome> {
    let mut it = committed.into_iter();
    slots
        .iter()
        .map(|s| match s {
            Some(_) => it.next().unwrap_or(PutOutcome::Stored),
            None => PutOutcome::Exists,
        })
        .collect()
}

/// Values written to staging before their commit is sent, when a batch is pipelined.
const PIPELINE_BYTES: usize = 2 << 20;

async fn commit_request(
    mut grpc: NodeCacheClient<Channel>,
    req: v1::CommitRequest,
) -> Result<Vec<PutOutcome>> {
    if req.items.is_empty() {
        return Ok(Vec::new());
    }
    let r = grpc.commit(req).await?.into_inner();
    Ok(r.statuses
        .into_iter()
        .map(|s| match v1::CommitStatus::try_from(s) {
            Ok(v1::CommitStatus::ChecksumMismatch) => PutOutcome::ChecksumMismatch,
            _ => PutOutcome::Stored,
        })
        .collect())
}

/// Sends the releases of dropped values in batches; runs until the last clone of the client
/// is dropped.
async fn flush_releases(
    grpc: NodeCacheClient<Channel>,
    session: u64,
    queue: Arc<ReleaseQueue>,
    conn: Option<Arc<SessionConn>>,
) {
    loop {
        let notified = queue.wake.notified();
        let mut batch = queue.take();
        if batch.ids.is_empty() {
            notified.await;
            continue;
        }
        let ids = std::mem::take(&mut batch.ids);
        if let Err(e) = release(&grpc, session, conn.as_deref(), ids).await {
            tracing::warn!(error = %e, "releasing leases");
        }
    }
}

/// Releases `ids` over the session connection when given and in step, else over gRPC.
async fn release(
    grpc: &NodeCacheClient<Channel>,
    session: u64,
    conn: Option<&SessionConn>,
    ids: Vec<u64>,
) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    if let Some(c) = conn
        && let Some(r) = c.call(&Request::Release(ids.clone())).await
    {
        return r.map(|_| ());
    }
    grpc.clone()
        .release(v1::ReleaseRequest {
            session,
            lease_ids: ids,
        })
        .await?;
    Ok(())
}

fn attach_session(path: &Path) -> Result<(Reply, StdUnixStream, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::AsFd;
    let err = |e: std::io::Error| ClientError::Attach(format!("{}: {e}", path.display()));
    let mut stream = StdUnixStream::connect(path).map_err(err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    stream
        .write_all(
            &Hello {
                version: PROTOCOL_VERSION,
                tenant: String::new(),
            }
            .encode(),
        )
        .map_err(err)?;
    let mut buf = vec![0u8; MAX_REPLY_LEN];
    let mut have = 0;
    let mut fds = Vec::new();
    let reply = loop {
        let n = attach::recv_with_fds(stream.as_fd(), &mut buf[have..], &mut fds).map_err(err)?;
        if n == 0 {
            return Err(ClientError::Attach("agent closed the attach socket".into()));
        }
        have += n;
        match Reply::decode(&buf[..have]) {
            Ok(r) => break r,
            Err(_) if have < MAX_REPLY_LEN => {}
            Err(e) => return Err(ClientError::Attach(e.to_string())),
        }
    };
    if reply.status != attach::status::OK {
        return Err(ClientError::Attach(format!(
            "refused (status {}): {}",
            reply.status, reply.message
        )));
    }
    stream.set_read_timeout(None).map_err(err)?;
    Ok((reply, stream, fds))
}
