//! One attached session: the gRPC channel, the attach connection (owned by [`Conn`]), the
//! two mapped regions and the queues of leases and reservations to return.
//!
//! Every call goes through [`Session::call`], which sends the request at once (over the
//! fast path, or over gRPC in a task of its own) and returns a future for the answer. The
//! request completes whether or not that future is awaited: an answer nobody waits for any
//! more has its leases released and its reservations aborted. That is what makes every
//! client call safe to cancel.

use std::{
    fs::File,
    io::Write,
    os::unix::net::UnixStream as StdUnixStream,
    path::Path,
    sync::{Arc, Weak},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use memmap2::{Mmap, MmapOptions, MmapRaw};
use nencache_api::{
    PROTOCOL_VERSION,
    attach::{self, Hello, MAX_REPLY_LEN, Reply},
    frame::{Found, Request, Response, op},
    v1::{self, node_cache_client::NodeCacheClient},
};
use tonic::transport::{Channel, Endpoint};

use crate::{
    AgentInfo, ClientOptions,
    batch::Sizer,
    conn::{Answer, Conn, Liveness, Orphans},
    error::ClientError,
    value::{Queues, Settle},
};

type Result<T, E = ClientError> = std::result::Result<T, E>;

/// An attached session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) info: Arc<AgentInfo>,
    arena: Mmap,
    staging: MmapRaw,
    pub(crate) grpc: NodeCacheClient<Channel>,
    conn: Conn,
    live: Arc<Liveness>,
    pub(crate) queues: Arc<Queues>,
    pub(crate) fast: bool,
    pub(crate) verify: bool,
    pub(crate) sizer: Sizer,
    /// What the session may hold in reservations, shared by every call on it.
    pub(crate) quota: Quota,
    flusher: tokio::task::AbortHandle,
}

/// The session's reservation quotas (count, and staging pages), mirrored on the client side:
/// a round of puts or reserves waits for its share instead of being refused because other
/// calls on the same session (other tasks, slots not committed yet) hold the rest.
#[derive(Debug)]
pub(crate) struct Quota {
    reservations: Arc<tokio::sync::Semaphore>,
    pages: Arc<tokio::sync::Semaphore>,
    /// Most reservations, and most staging pages, one round may take.
    pub(crate) max_reservations: usize,
    pub(crate) max_pages: u64,
    pub(crate) page: u64,
}

/// A share of the session's quota, given back when dropped.
#[derive(Debug)]
pub(crate) struct Held {
    _reservations: tokio::sync::OwnedSemaphorePermit,
    _pages: tokio::sync::OwnedSemaphorePermit,
}

impl Quota {
    fn new(limits: &v1::Limits, staging_len: u64, page: u64) -> Self {
        let max_reservations = match limits.max_reservations_per_session {
            0 => tokio::sync::Semaphore::MAX_PERMITS.min(u32::MAX as usize),
            n => n as usize,
        };
        let max_pages = match limits.max_staging_per_session {
            0 => staging_len,
            n => n.min(staging_len),
        } / page;
        Self {
            reservations: Arc::new(tokio::sync::Semaphore::new(max_reservations)),
            pages: Arc::new(tokio::sync::Semaphore::new(max_pages as usize)),
            max_reservations,
            max_pages,
            page,
        }
    }

    /// Reservations and staging pages free now.
    pub(crate) fn available(&self) -> (usize, u64) {
        (
            self.reservations.available_permits(),
            self.pages.available_permits() as u64,
        )
    }

    /// Staging pages a value of `len` bytes takes (as the agent counts them).
    pub(crate) fn pages(&self, len: u64) -> u64 {
        len.div_ceil(self.page).max(1)
    }

    /// Takes `reservations` reservations and `pages` staging pages of the quota, waiting up
    /// to `wait` for them (not at all when `None`). Refused as the agent would refuse it
    /// (`RESOURCE_EXHAUSTED`) when they do not come free in time.
    pub(crate) async fn acquire(
        &self,
        reservations: usize,
        pages: u64,
        wait: Option<Duration>,
    ) -> Result<Held> {
        use tokio::sync::{OwnedSemaphorePermit, Semaphore};
        let r = reservations.min(self.max_reservations) as u32;
        let p = pages.min(self.max_pages) as u32;
        let take = |sem: &Arc<Semaphore>, n: u32, what: &'static str| {
            let sem = sem.clone();
            async move {
                let refused = || {
                    ClientError::Status(tonic::Status::resource_exhausted(format!(
                        "no space: {what} (held by other calls or slots of this client)"
                    )))
                };
                let got: Option<OwnedSemaphorePermit> = match wait {
                    None => sem.try_acquire_many_owned(n).ok(),
                    Some(w) => tokio::time::timeout(w, sem.acquire_many_owned(n))
                        .await
                        .ok()
                        .and_then(Result::ok),
                };
                got.ok_or_else(refused)
            }
        };
        Ok(Held {
            _reservations: take(&self.reservations, r, "reservations of this session").await?,
            _pages: take(&self.pages, p, "staging space of this session").await?,
        })
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.flusher.abort();
    }
}

impl Session {
    /// Handshake, attach, map, and start the connection's tasks and the release flusher.
    pub(crate) async fn connect(socket: &Path, options: &ClientOptions) -> Result<Arc<Self>> {
        let path = socket.to_path_buf();
        // The URI is required by the API but unused: the connector dials the Unix socket.
        let channel = Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(|e| ClientError::Connect {
                socket: socket.to_path_buf(),
                reason: crate::error::chain(&e),
            })?;
        // Requests are split to fit the agent's limit; answers are bounded by its limits.
        let mut grpc = NodeCacheClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let hs = grpc
            .handshake(v1::HandshakeRequest {
                protocol_version: PROTOCOL_VERSION,
                client_name: options.client_name.clone(),
                tenant: String::new(),
            })
            .await
            .map_err(|st| {
                use std::error::Error;
                // A transport failure means no agent answered; anything else is its answer.
                if st.source().is_some() {
                    ClientError::Connect {
                        socket: socket.to_path_buf(),
                        reason: crate::error::chain(&st),
                    }
                } else {
                    ClientError::Status(st)
                }
            })?
            .into_inner();
        let version = nencache_api::negotiate(hs.protocol_version)
            .filter(|&v| v == hs.protocol_version)
            .ok_or_else(|| {
                ClientError::Protocol(format!(
                    "agent answered protocol {}, this client speaks {}..={PROTOCOL_VERSION}",
                    hs.protocol_version,
                    nencache_api::MIN_PROTOCOL_VERSION
                ))
            })?;
        let attach_path = socket
            .parent()
            .unwrap_or(Path::new("."))
            .join(&hs.attach_socket);
        let (reply, stream, fds) =
            tokio::task::spawn_blocking(move || attach_session(&attach_path, version))
                .await
                .map_err(|e| ClientError::Attach(e.to_string()))??;
        let [arena_fd, staging_fd]: [std::os::fd::OwnedFd; 2] =
            fds.try_into().map_err(|v: Vec<_>| {
                ClientError::Attach(format!("expected 2 descriptors, got {}", v.len()))
            })?;
        let io = |what| move |source| ClientError::Io { what, source };
        // SAFETY: the arena is mapped read-only from a read-only descriptor; the agent never
        // rewrites an extent while a lease on it is held, which is when `Value` reads it.
        let arena = unsafe {
            MmapOptions::new()
                .len(reply.arena_len as usize)
                .map(&File::from(arena_fd))
        }
        .map_err(io("mapping the arena"))?;
        let staging = MmapOptions::new()
            .len(reply.staging_len as usize)
            .map_raw(&File::from(staging_fd))
            .map_err(io("mapping the staging area"))?;
        stream
            .set_nonblocking(true)
            .map_err(io("session connection"))?;
        let stream = tokio::net::UnixStream::from_std(stream).map_err(io("session connection"))?;
        let limits = hs.limits.unwrap_or_default();
        let queues = Arc::new(Queues::default());
        let (conn, live) = Conn::start(stream, queues.clone() as Arc<dyn Orphans>);
        let sizer = Sizer::new(options.fast_path, &limits);
        let quota = Quota::new(&limits, reply.staging_len, u64::from(hs.page_size.max(1)));
        let info = AgentInfo {
            agent_version: hs.agent_version,
            protocol_version: version,
            arena_size: reply.arena_len,
            staging_size: reply.staging_len,
            page_size: hs.page_size,
            limits,
        };
        Ok(Arc::new_cyclic(|weak: &Weak<Self>| {
            let flusher = tokio::spawn(flush_loop(weak.clone(), queues.clone())).abort_handle();
            Self {
                id: reply.session,
                info: Arc::new(info),
                arena,
                staging,
                grpc,
                conn,
                live,
                queues,
                fast: options.fast_path,
                verify: options.verify_puts,
                sizer,
                quota,
                flusher,
            }
        }))
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.live.is_dead()
    }

    /// `st`, from a gRPC call on this session, as the error the caller should see.
    pub(crate) fn grpc_error(&self, st: tonic::Status) -> ClientError {
        grpc_error(&self.live, st)
    }

    pub(crate) fn disconnected(&self) -> ClientError {
        self.live.error()
    }

    /// Resolves once the session is dead.
    pub(crate) async fn dead(&self) {
        self.live.dead().await;
    }

    pub(crate) fn arena(&self) -> &[u8] {
        &self.arena
    }

    pub(crate) fn staging_len(&self) -> usize {
        self.staging.len()
    }

    pub(crate) fn staging_ptr(&self) -> *mut u8 {
        self.staging.as_mut_ptr()
    }

    /// Sends `req` now and returns a future for its answer. The request completes even if
    /// the future is dropped; see the module documentation. `settle` is dropped once the
    /// agent has answered.
    pub(crate) fn call(
        &self,
        req: &Request<'_>,
        settle: Option<Settle>,
    ) -> impl Future<Output = Result<Response>> + Send + use<> {
        let op = req.op();
        let rx = if self.fast {
            let mut frame = Vec::new();
            req.encode(&mut frame);
            self.conn.submit(op, frame, settle)
        } else {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let queues = self.queues.clone();
            let call = grpc_call(self.grpc.clone(), self.id, req, queues.clone());
            tokio::spawn(async move {
                let r = call.await;
                drop(settle);
                // Settled by `Answer`'s drop if the caller is gone.
                let _ = tx.send(r.map(|resp| Answer::new(op, resp, queues)));
            });
            rx
        };
        let live = self.live.clone();
        async move {
            match rx.await {
                Ok(Ok(answer)) => match answer.take() {
                    Response::Error { code, message } => Err(ClientError::Status(
                        tonic::Status::new(tonic::Code::from(i32::from(code)), message),
                    )),
                    resp => Ok(resp),
                },
                Ok(Err(ClientError::Status(st))) => Err(grpc_error(&live, st)),
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    // The tasks that serve the session are gone (their runtime shut down):
                    // the next call attaches a new session on the caller's runtime.
                    live.kill("the session's tasks stopped (their runtime shut down)");
                    Err(live.error())
                }
            }
        }
    }

    /// Sends queued releases and aborts, each batch within the limits; waits for the answers.
    pub(crate) async fn send_queued(&self) {
        loop {
            let max = self
                .sizer
                .max_batch
                .min(self.sizer.budget / self.sizer.id());
            let (ids, settle) = self.queues.take_releases(max);
            let aborts = self.queues.take_aborts(max);
            if ids.is_empty() && aborts.is_empty() {
                return;
            }
            if !ids.is_empty() {
                self.send_ids(&ids, Request::Release, settle).await;
            }
            if !aborts.is_empty() {
                self.send_ids(&aborts, Request::Abort, None).await;
            }
            if self.is_dead() {
                return;
            }
        }
    }

    /// Releases or aborts `ids`. The agent takes a batch all or nothing, so a refused batch
    /// is retried id by id: one stale id does not keep the others.
    async fn send_ids(
        &self,
        ids: &[u64],
        make: fn(Vec<u64>) -> Request<'static>,
        settle: Option<Settle>,
    ) {
        let r = self.call(&make(ids.to_vec()), settle).await;
        match r {
            Err(ClientError::Status(s)) if ids.len() > 1 => {
                tracing::debug!(error = %s, "batch refused; returning ids one by one");
                for &id in ids {
                    if let Err(e) = self.call(&make(vec![id]), None).await {
                        // Typically one that a refused get had released after all.
                        tracing::debug!(error = %e, id, "returning a lease or reservation");
                    }
                }
            }
            Err(e) if !self.is_dead() => {
                tracing::warn!(error = %e, "returning leases or reservations");
            }
            _ => {}
        }
    }
}

/// A gRPC failure as the caller should see it: a transport failure (the agent is gone) or an
/// agent that no longer knows the session (it restarted) ends the session, so that the next
/// call attaches a new one, and is [`ClientError::Disconnected`]; anything else is the
/// agent's answer.
fn grpc_error(live: &Liveness, st: tonic::Status) -> ClientError {
    use std::error::Error;
    let unknown_session = st.code() == tonic::Code::FailedPrecondition
        && st.message().starts_with("unknown or closed session");
    if st.source().is_some() || unknown_session {
        let mut why = format!("gRPC: {}", st.message());
        let mut cause = st.source();
        while let Some(c) = cause {
            why = format!("{why}: {c}");
            cause = c.source();
        }
        live.kill(why);
        return live.error();
    }
    ClientError::Status(st)
}

/// Returns the leases of dropped values and the reservations of dropped slots in the
/// background, until the session is gone.
async fn flush_loop(session: Weak<Session>, queues: Arc<Queues>) {
    loop {
        let notified = queues.wake.notified();
        if queues.is_empty() {
            notified.await;
            continue;
        }
        let Some(s) = session.upgrade() else { return };
        if s.is_dead() {
            return;
        }
        s.send_queued().await;
    }
}

/// The gRPC form of a fast-path request, sent in a task of its own.
fn grpc_call(
    mut grpc: NodeCacheClient<Channel>,
    session: u64,
    req: &Request<'_>,
    queues: Arc<Queues>,
) -> impl Future<Output = Result<Response>> + Send + use<> {
    let keys = |k: &[&[u8]]| k.iter().map(|k| k.to_vec()).collect::<Vec<_>>();
    enum Call {
        Lookup(v1::LookupRequest),
        Get(Vec<u64>, v1::GetRequest),
        Release(v1::ReleaseRequest),
        Reserve(v1::ReserveRequest),
        Commit(v1::CommitRequest),
        Abort(v1::AbortRequest),
    }
    let call = match req {
        Request::Lookup(k) => Call::Lookup(v1::LookupRequest { keys: keys(k) }),
        Request::Get(k, release) => Call::Get(
            release.clone(),
            v1::GetRequest {
                session,
                keys: keys(k),
            },
        ),
        Request::Release(ids) => Call::Release(v1::ReleaseRequest {
            session,
            lease_ids: ids.clone(),
        }),
        Request::Reserve(items) => Call::Reserve(v1::ReserveRequest {
            session,
            items: items.iter().map(crate::batch::put_item).collect(),
        }),
        Request::Commit(items) => Call::Commit(v1::CommitRequest {
            session,
            items: items
                .iter()
                .map(|&(reservation_id, checksum)| v1::CommitItem {
                    reservation_id,
                    checksum,
                })
                .collect(),
        }),
        Request::Abort(ids) => Call::Abort(v1::AbortRequest {
            session,
            reservation_ids: ids.clone(),
        }),
    };
    async move {
        Ok(match call {
            Call::Lookup(r) => {
                let r = grpc.lookup(r).await?.into_inner();
                if r.tiers.len() != r.prefix_hits as usize {
                    return Err(ClientError::Protocol(
                        "lookup answered a tier count unlike its prefix".into(),
                    ));
                }
                Response::Lookup(r.tiers.into_iter().map(|t| t as u8).collect())
            }
            Call::Get(release, r) => {
                if !release.is_empty()
                    && let Err(e) = grpc
                        .release(v1::ReleaseRequest {
                            session,
                            lease_ids: release.clone(),
                        })
                        .await
                {
                    // As on the fast path, releases never fail the get: the flusher returns
                    // them one by one.
                    tracing::debug!(error = %e, "release refused; returning leases one by one");
                    for id in release {
                        queues.push_release(id);
                    }
                }
                let items = grpc.get(r).await?.into_inner().items;
                Response::Get(
                    items
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
                )
            }
            Call::Release(r) => {
                grpc.release(r).await?;
                Response::Release
            }
            Call::Reserve(r) => {
                let rs = grpc.reserve(r).await?.into_inner().reservations;
                let mut unknown = None;
                let items = rs
                    .into_iter()
                    .map(|r| match v1::ReserveStatus::try_from(r.status) {
                        Ok(v1::ReserveStatus::Reserved) => {
                            Some((r.reservation_id, r.staging_offset))
                        }
                        Ok(v1::ReserveStatus::Exists) => None,
                        _ => {
                            unknown = Some(r.status);
                            None
                        }
                    })
                    .collect();
                let resp = Response::Reserve(items);
                if let Some(s) = unknown {
                    // Nobody will use what was reserved next to it.
                    queues.orphaned(op::RESERVE, &resp);
                    return Err(ClientError::Protocol(format!("unknown reserve status {s}")));
                }
                resp
            }
            Call::Commit(r) => {
                let statuses = grpc.commit(r).await?.into_inner().statuses;
                let done = statuses
                    .into_iter()
                    .map(|s| match v1::CommitStatus::try_from(s) {
                        Ok(v1::CommitStatus::Committed) => Ok(true),
                        Ok(v1::CommitStatus::ChecksumMismatch) => Ok(false),
                        _ => Err(ClientError::Protocol(format!("unknown commit status {s}"))),
                    })
                    .collect::<Result<_>>()?;
                Response::Commit(done)
            }
            Call::Abort(r) => {
                grpc.abort(r).await?;
                Response::Abort
            }
        })
    }
}

/// The op a response answers must be the op asked; a mismatch is a protocol error.
pub(crate) fn mismatched(op: u8) -> ClientError {
    ClientError::Protocol(format!("answer does not match operation {op}"))
}

/// Checks that an answer has one item per request item.
pub(crate) fn count(op: u8, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(ClientError::Protocol(format!(
            "operation {op} answered {got} items for {want}"
        )))
    }
}

fn attach_session(
    path: &Path,
    version: u32,
) -> Result<(Reply, StdUnixStream, Vec<std::os::fd::OwnedFd>)> {
    use std::os::fd::AsFd;
    let err = |e: std::io::Error| ClientError::Attach(format!("{}: {e}", path.display()));
    let mut stream = StdUnixStream::connect(path).map_err(err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    stream
        .write_all(
            &Hello {
                version,
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
