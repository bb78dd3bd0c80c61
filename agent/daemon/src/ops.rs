//! Each operation of the node-local API, once. The gRPC service ([`crate::service`]) and the
//! session fast path ([`crate::attach`]) decode their requests into these calls, so what an
//! operation accepts, how it is bounded, which work leaves the async workers and how an
//! engine error becomes a status code are decided here and nowhere else.

use std::{sync::Arc, time::Duration};

use nencache_api::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, negotiate, v1};
use nencache_engine::{
    Committed, Engine, EngineError, Get, Lease, MAX_KEY_LEN, MAX_METADATA_LEN, PutItem, Reserved,
    Tier,
};
use tonic::{Code, Status};

/// Limits of the transports themselves, announced in the handshake so that clients split
/// their batches to fit.
#[derive(Debug, Clone, Copy)]
pub struct WireLimits {
    /// Longest fast-path frame body read.
    pub max_frame_len: usize,
    /// Longest gRPC request message decoded.
    pub max_message_len: usize,
}

impl Default for WireLimits {
    fn default() -> Self {
        Self {
            max_frame_len: nencache_api::frame::MAX_FRAME,
            max_message_len: 4 << 20,
        }
    }
}

/// The one mapping from engine errors to gRPC statuses.
#[must_use]
pub fn status_of(e: &EngineError) -> Status {
    let code = match e {
        EngineError::InvalidKey { .. }
        | EngineError::ValueTooLarge { .. }
        | EngineError::MetadataTooLarge { .. }
        | EngineError::BatchTooLarge { .. }
        | EngineError::DuplicateId(_) => Code::InvalidArgument,
        EngineError::NoSpace { .. } => Code::ResourceExhausted,
        EngineError::UnknownReservation(_) | EngineError::UnknownLease(_) => Code::NotFound,
        EngineError::UnknownSession(_) => Code::FailedPrecondition,
        EngineError::CommitInProgress(_) => Code::Aborted,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The proto number of a tier.
#[must_use]
pub fn tier(t: Tier) -> i32 {
    match t {
        Tier::Host => v1::Tier::Host as i32,
        Tier::Nvme => v1::Tier::Nvme as i32,
        Tier::Disk => v1::Tier::Disk as i32,
    }
}

/// An engine put item from its wire fields (both transports send the same ones); a TTL of 0
/// takes the agent's default.
#[must_use]
pub fn put_item<'a>(
    key: &'a [u8],
    value_len: u64,
    metadata: &'a [u8],
    ttl_ms: u64,
    overwrite: bool,
) -> PutItem<'a> {
    let ttl = (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms));
    PutItem {
        key,
        value_len,
        metadata,
        ttl,
        overwrite,
    }
}

/// The tenant a handshake or hello names, if this agent serves it.
fn known_tenant(tenant: &str) -> bool {
    tenant.is_empty() || tenant == "default"
}

/// Why a tenant is refused, in the words both transports use.
#[must_use]
pub fn unknown_tenant(tenant: &str) -> String {
    format!("unknown tenant {tenant:?}; this agent serves only \"default\"")
}

/// Why a protocol version is refused, in the words both transports use.
#[must_use]
pub fn unsupported_version(version: u32) -> String {
    format!(
        "protocol version {version} is not supported (agent speaks \
         {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})"
    )
}

/// The operations over one engine (the default tenant).
#[derive(Debug, Clone)]
pub struct Ops {
    engine: Arc<Engine>,
    wire: WireLimits,
}

impl Ops {
    /// Operations over `engine`, with the transports bounded by `wire`.
    #[must_use]
    pub fn new(engine: Arc<Engine>, wire: WireLimits) -> Self {
        Self { engine, wire }
    }

    /// The engine.
    #[must_use]
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The transports' limits.
    #[must_use]
    pub fn wire(&self) -> WireLimits {
        self.wire
    }

    /// The attach hello's checks: a version the handshake could have answered, a known tenant.
    ///
    /// # Errors
    /// The attach status and message to refuse with.
    pub fn check_hello(&self, version: u32, tenant: &str) -> Result<(), (u32, String)> {
        use nencache_api::attach::status;
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err((status::BAD_VERSION, unsupported_version(version)));
        }
        if !known_tenant(tenant) {
            return Err((status::UNKNOWN_TENANT, unknown_tenant(tenant)));
        }
        Ok(())
    }

    /// The handshake: the negotiated version, the regions and every limit.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` for a version this agent cannot speak, `NOT_FOUND` for an
    /// unknown tenant.
    pub fn handshake(
        &self,
        req: &v1::HandshakeRequest,
        attach_socket: &str,
    ) -> Result<v1::HandshakeResponse, Status> {
        let version = negotiate(req.protocol_version).ok_or_else(|| {
            Status::failed_precondition(unsupported_version(req.protocol_version))
        })?;
        if !known_tenant(&req.tenant) {
            return Err(Status::not_found(unknown_tenant(&req.tenant)));
        }
        tracing::debug!(client = req.client_name, version, "handshake");
        let cfg = self.engine.config();
        Ok(v1::HandshakeResponse {
            protocol_version: version,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            tenant: "default".into(),
            arena: Some(v1::RegionDescription {
                size: self.engine.arena().len() as u64,
                writable: false,
            }),
            staging: Some(v1::RegionDescription {
                size: self.engine.staging().len() as u64,
                writable: true,
            }),
            page_size: cfg.host.page_size,
            attach_socket: attach_socket.to_owned(),
            limits: Some(v1::Limits {
                max_key_len: MAX_KEY_LEN as u32,
                max_value_len: cfg.limits.max_value,
                max_metadata_len: MAX_METADATA_LEN as u32,
                max_batch: cfg.limits.max_batch as u32,
                max_leases_per_session: cfg.limits.max_leases_per_session,
                max_reservations_per_session: cfg.limits.max_reservations_per_session,
                max_staging_per_session: cfg.staging_per_session(),
                reservation_timeout_ms: cfg.limits.reservation_timeout.as_millis() as u64,
                max_frame_len: self.wire.max_frame_len as u32,
                max_message_len: self.wire.max_message_len as u32,
            }),
        })
    }

    /// How many leading keys are cached, and the tier of each of those.
    ///
    /// # Errors
    /// An invalid key or an oversized batch.
    pub fn lookup(&self, keys: &[&[u8]]) -> Result<Vec<Tier>, EngineError> {
        Ok(self.engine.lookup(keys)?.tiers)
    }

    /// Releases the leases in `release`, each on its own (an unknown, foreign or repeated id
    /// is skipped: a stale id must neither keep the others nor fail the get), then leases the
    /// values of `keys`. A request refused as invalid (a bad key, more than `max_batch` keys
    /// or leases) does nothing; otherwise the releases take effect whatever becomes of the
    /// get (a full lease quota, say), so a client never has to send them again.
    ///
    /// # Errors
    /// An invalid request (then nothing is done), or as the engine's get.
    pub async fn get(
        &self,
        session: u64,
        keys: &[&[u8]],
        release: &[u64],
    ) -> Result<Vec<Option<Lease>>, EngineError> {
        // A GET refused as invalid does nothing at all, its releases included.
        let max = self.engine.config().limits.max_batch;
        for len in [keys.len(), release.len()] {
            if len > max {
                return Err(EngineError::BatchTooLarge { len, max });
            }
        }
        for k in keys {
            nencache_engine::validate_key(k)?;
        }
        if !release.is_empty() && self.engine.release(session, release).is_err() {
            for &id in release {
                let _ = self.engine.release(session, &[id]);
            }
        }
        // Host hits are leased at once; values in a lower tier are read on a blocking
        // thread, so a slow device holds up only the calls that need it.
        match self.engine.begin_get(session, keys)? {
            Get::Ready(out) => Ok(out),
            Get::Pending(pending) => {
                use tokio::runtime::{Handle, RuntimeFlavor};
                if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
                    // Read on this thread (its other tasks move to another worker): no
                    // hand-off to a blocking thread and back, and no await before the
                    // leases are in the caller's hands.
                    return tokio::task::block_in_place(|| pending.finish());
                }
                // If the call is dropped meanwhile (its client gave up), nobody will learn
                // the leases the read ends with: the blocking task returns them itself.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let engine = self.engine.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(Ok(undelivered)) = tx.send(pending.finish()) {
                        let ids: Vec<u64> =
                            undelivered.into_iter().flatten().map(|l| l.id).collect();
                        let _ = engine.release(session, &ids);
                    }
                });
                rx.await.map_err(|_| EngineError::Io {
                    what: "reading from a lower tier",
                    source: std::io::Error::other("the read task ended without an answer"),
                })?
            }
        }
    }

    /// Releases leases, all or nothing.
    ///
    /// # Errors
    /// As the engine's release.
    pub fn release(&self, session: u64, ids: &[u64]) -> Result<(), EngineError> {
        self.engine.release(session, ids)
    }

    /// Reserves space for puts, all or nothing.
    ///
    /// # Errors
    /// As the engine's reserve.
    pub fn reserve(
        &self,
        session: u64,
        items: &[PutItem<'_>],
    ) -> Result<Vec<Reserved>, EngineError> {
        self.engine.reserve(session, items)
    }

    /// Commits reservations. The copies from staging into the arena run off the async
    /// workers: in place on a multi-threaded runtime (its other tasks move to another
    /// worker), on the blocking pool otherwise.
    ///
    /// # Errors
    /// As the engine's commit.
    pub async fn commit(
        &self,
        session: u64,
        items: Vec<(u64, Option<u64>)>,
    ) -> Result<Vec<Committed>, EngineError> {
        let engine = self.engine.clone();
        blocking(move || engine.commit(session, &items)).await
    }

    /// Commits reservations on the calling thread, for values small enough (the Redis
    /// listener: below 4 MiB) that the copy costs less than handing the worker's other tasks
    /// to another thread as [`Self::commit`] does.
    ///
    /// # Errors
    /// As the engine's commit.
    pub fn commit_small(
        &self,
        session: u64,
        items: &[(u64, Option<u64>)],
    ) -> Result<Vec<Committed>, EngineError> {
        self.engine.commit(session, items)
    }

    /// Abandons reservations, all or nothing.
    ///
    /// # Errors
    /// As the engine's abort.
    pub fn abort(&self, session: u64, ids: &[u64]) -> Result<(), EngineError> {
        self.engine.abort(session, ids)
    }

    /// Deletes keys; how many existed.
    ///
    /// # Errors
    /// An invalid key or an oversized batch.
    pub fn delete(&self, keys: &[&[u8]]) -> Result<usize, EngineError> {
        self.engine.delete(keys)
    }
}

/// Runs `f`, which may block for a while, without stalling the async worker's other tasks.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(f)
    } else {
        match tokio::task::spawn_blocking(f).await {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nencache_engine::{EngineConfig, HostConfig, Limits};

    /// A 4 MiB host tier taking values of up to 1 MiB, no lower tier.
    fn config() -> EngineConfig {
        EngineConfig {
            limits: Limits {
                max_value: 1 << 20,
                ..Limits::default()
            },
            host: HostConfig {
                capacity: 4 << 20,
                staging: 1 << 20,
                ..HostConfig::default()
            },
            ..EngineConfig::default()
        }
    }

    fn ops() -> Ops {
        let cfg = config();
        Ops::new(
            Arc::new(Engine::new(cfg).expect("engine")),
            WireLimits::default(),
        )
    }

    /// A get reading from a slow lower tier that its caller abandons (a timeout drops the
    /// call) leaves no lease behind: the read's leases go back when it ends. (On a
    /// multi-threaded runtime the read blocks the call's own poll, so it cannot be dropped
    /// half-way; this is the current-thread case, where it runs on a blocking thread.)
    #[tokio::test(flavor = "current_thread")]
    async fn an_abandoned_lower_tier_get_returns_its_leases() {
        use nencache_engine::{Admission, IoEngineKind, StoreConfig, Tier, TierConfig};
        use nencache_store::testing::{FaultOp, FaultRule, Faults};
        let dir = tempfile::tempdir().expect("dir");
        let tier = TierConfig {
            tier: Tier::Nvme,
            store: StoreConfig {
                path: dir.path().join("t2"),
                capacity: 8 << 20,
                region_size: 2 << 20,
                io_engine: IoEngineKind::Pread,
                queue_depth: 4,
                slow_io: Duration::from_secs(10),
            },
            admission: Admission::All,
        };
        let cfg = EngineConfig {
            tiers: vec![tier.clone()],
            ..config()
        };
        {
            let e = Engine::new(cfg.clone()).expect("engine");
            let s = e.open_session().expect("session");
            let item = put_item(b"below", 5, b"", 0, false);
            e.put_local(s, item, b"bytes").expect("put");
            e.persist(std::time::Instant::now() + Duration::from_secs(10));
        }
        let faults = Faults::new();
        let (store, _) =
            nencache_store::LogStore::open_with_faults(tier.store, faults.clone()).expect("store");
        let engine = Arc::new(Engine::with_stores(cfg, vec![Box::new(store)]).expect("engine"));
        let ops = Ops::new(engine.clone(), WireLimits::default());
        let s = engine.open_session().expect("session");
        faults.add(FaultRule::delay(FaultOp::Read, Duration::from_millis(300)));
        let abandoned =
            tokio::time::timeout(Duration::from_millis(20), ops.get(s, &[b"below"], &[])).await;
        assert!(abandoned.is_err(), "the call was still reading");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            engine.stats().leases,
            0,
            "the undelivered lease was released"
        );
        // The value was promoted meanwhile: the next get is a host hit.
        let got = ops.get(s, &[b"below"], &[]).await.expect("get");
        assert!(got[0].is_some());
        assert_eq!(engine.stats().leases, 1);
    }

    /// A commit on a current-thread runtime (where `block_in_place` panics) still completes.
    #[tokio::test(flavor = "current_thread")]
    async fn commit_runs_on_a_current_thread_runtime() {
        let ops = ops();
        let s = ops.engine().open_session().expect("session");
        let r = ops
            .reserve(s, &[put_item(b"k", 3, b"", 0, false)])
            .expect("reserve");
        let Reserved::Space { id, .. } = r[0] else {
            panic!("not reserved")
        };
        assert_eq!(
            ops.commit(s, vec![(id, None)]).await.expect("commit"),
            vec![Committed::Done]
        );
    }

    #[test]
    fn hello_and_handshake_agree_on_versions() {
        let ops = ops();
        for v in [0, 1, 2, 99] {
            let hs = ops.handshake(
                &v1::HandshakeRequest {
                    protocol_version: v,
                    ..Default::default()
                },
                "a.attach",
            );
            match hs {
                Ok(r) => assert!(
                    ops.check_hello(r.protocol_version, "").is_ok(),
                    "the version the handshake answered ({}) must attach",
                    r.protocol_version
                ),
                Err(s) => assert_eq!(s.code(), Code::FailedPrecondition),
            }
        }
        assert!(ops.check_hello(PROTOCOL_VERSION + 1, "").is_err());
        assert!(ops.check_hello(PROTOCOL_VERSION, "other").is_err());
    }
}
