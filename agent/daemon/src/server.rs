//! The agent's serving loop: claims the socket path, builds the engine, and serves gRPC,
//! the attach socket and the admin endpoint until asked to stop; then it stops accepting,
//! lets in-flight calls finish within the grace period, and removes its sockets.

use std::{
    future::Future,
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nencache_api::v1::node_cache_server::NodeCacheServer;
use nencache_engine::{Engine, EngineError};
use tokio::{
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tokio_stream::{StreamExt, wrappers::UnixListenerStream};

use crate::{
    admin::{self, AdminState},
    attach, compat,
    config::Settings,
    metrics::Metrics,
    ops::{Ops, WireLimits},
    service::NodeCacheService,
    socket::{SocketError, SocketPaths, attach_name},
};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The socket path is unusable or taken.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The engine could not be built.
    #[error("building the cache engine: {0}")]
    Engine(#[from] EngineError),
    /// A listener could not be bound.
    #[error("binding {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving gRPC: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// An agent whose sockets are bound, ready to serve.
#[derive(Debug)]
pub struct Agent {
    settings: Settings,
    paths: SocketPaths,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    grpc: UnixListener,
    attach: UnixListener,
    admin: Option<TcpListener>,
    /// The `lm://` listeners.
    lm: Vec<compat::Listener>,
    /// The Redis listeners.
    redis: Vec<compat::Listener>,
}

impl Agent {
    /// Claims the socket path, creates the shared memory and binds every listener.
    ///
    /// # Errors
    /// A socket path held by a live agent, shared memory that cannot be created, or a
    /// listener that cannot be bound.
    pub async fn bind(settings: Settings) -> Result<Self, AgentError> {
        let paths = SocketPaths::claim(&settings.socket)?;
        let cfg = settings.engine.clone();
        // Creating the arena pre-faults it (hundreds of ms per GiB): keep it off the reactor.
        let engine = tokio::task::spawn_blocking(move || Engine::new(cfg))
            .await
            .map_err(|e| EngineError::Config(format!("engine set-up panicked: {e}")))??;
        let bind = |what, p: &Path| {
            crate::socket::bind(p).map_err(|source| AgentError::Bind {
                what,
                addr: p.display().to_string(),
                source,
            })
        };
        let grpc = bind("gRPC socket", &paths.grpc)?;
        let attach = bind("attach socket", &paths.attach)?;
        let admin = match settings.admin_addr {
            Some(addr) => Some(bind_tcp("admin address", addr).await?),
            None => None,
        };
        let c = &settings.compat;
        let lm = compat_listeners(
            ["lm:// address", "lm:// socket"],
            c.lm_tcp,
            c.lm_socket.as_deref(),
            &bind,
        )
        .await?;
        let redis = compat_listeners(
            ["Redis address", "Redis socket"],
            c.redis_tcp,
            c.redis_socket.as_deref(),
            &bind,
        )
        .await?;
        Ok(Self {
            settings,
            paths,
            engine: Arc::new(engine),
            metrics: Arc::new(Metrics::new()),
            grpc,
            attach,
            admin,
            lm,
            redis,
        })
    }

    /// The engine (for in-process callers: the demo, tests).
    #[must_use]
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The gRPC socket path.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.paths.grpc
    }

    /// The bound TCP address of the `lm://` listener, if enabled.
    #[must_use]
    pub fn lm_addr(&self) -> Option<SocketAddr> {
        self.lm.iter().find_map(|l| match l {
            compat::Listener::Tcp(t) => t.local_addr().ok(),
            compat::Listener::Unix(_) => None,
        })
    }

    /// The admin endpoint's bound address, if enabled.
    #[must_use]
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serves until `shutdown` resolves, then drains and cleans up.
    ///
    /// # Errors
    /// When the gRPC server fails.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let Self {
            settings,
            paths,
            engine,
            metrics,
            grpc,
            attach,
            admin,
            lm,
            redis,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let state = Arc::new(AdminState {
            engine: engine.clone(),
            metrics: metrics.clone(),
            ready: false.into(),
        });
        let admin_task = admin.map(|l| {
            tracing::info!(addr = %l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "admin endpoint listening");
            tokio::spawn(admin::serve(l, state.clone(), stopped(stop_rx.clone())))
        });
        let ops = Ops::new(engine.clone(), WireLimits::default());
        let compat_ctx = compat::Context {
            ops: ops.clone(),
            metrics: metrics.clone(),
            stop: stop_rx.clone(),
        };
        let mut compat_tasks: Vec<_> = lm
            .into_iter()
            .map(|l| {
                tokio::spawn(compat::serve(
                    "lm",
                    l,
                    compat_ctx.clone(),
                    settings.shutdown_grace,
                    compat::lm::connection,
                ))
            })
            .collect();
        let redis_settings = Arc::new(settings.compat.redis.clone());
        let redis_shared = Arc::new(compat::resp::Shared::default());
        compat_tasks.extend(redis.into_iter().map(|l| {
            let (cfg, shared) = (redis_settings.clone(), redis_shared.clone());
            tokio::spawn(compat::serve(
                "redis",
                l,
                compat_ctx.clone(),
                settings.shutdown_grace,
                move |s, ctx| compat::resp::connection(s, ctx, cfg.clone(), shared.clone()),
            ))
        }));
        let (drained_tx, drained_rx) = watch::channel(false);
        let attach_task = tokio::spawn(attach::serve(
            attach,
            ops.clone(),
            metrics.clone(),
            attach::Shutdown {
                stop: stop_rx.clone(),
                drained: drained_rx,
            },
        ));
        let reaper = {
            let engine = engine.clone();
            let mut rx = stop_rx.clone();
            let every = (settings.engine.limits.reservation_timeout / 4)
                .clamp(Duration::from_millis(10), Duration::from_secs(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let n = engine.reap_expired_reservations();
                            if n > 0 {
                                tracing::info!(reclaimed = n, "reclaimed uncommitted reservations");
                            }
                        }
                        _ = rx.changed() => break,
                    }
                }
            })
        };
        // Demotion runs on its own thread: it blocks on device writes.
        let demoter_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let demoter = (!engine.lower_tiers().is_empty()).then(|| {
            let engine = engine.clone();
            let stop = demoter_stop.clone();
            std::thread::Builder::new()
                .name("nencache-demote".into())
                .spawn(move || engine.run_demoter(&stop, Duration::from_millis(50)))
        });
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<NodeCacheServer<NodeCacheService>>()
            .await;
        let name = paths
            .grpc
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let max_message = ops.wire().max_message_len;
        let svc = NodeCacheService::new(ops, metrics.clone(), attach_name(&name));
        let incoming = UnixListenerStream::new(grpc).map(|s| {
            if let Ok(s) = &s
                && let Ok(c) = s.peer_cred()
            {
                tracing::info!(pid = ?c.pid(), uid = c.uid(), gid = c.gid(), "gRPC connection");
            }
            s
        });
        let server = tonic::transport::Server::builder()
            .trace_fn(|req| tracing::debug_span!("grpc", path = %req.uri().path()))
            .add_service(health_service)
            .add_service(NodeCacheServer::new(svc).max_decoding_message_size(max_message))
            .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
        let mut server = std::pin::pin!(server);
        state.ready.store(true, Ordering::Release);
        tracing::info!(
            socket = %paths.grpc.display(),
            attach = %paths.attach.display(),
            host_capacity = settings.engine.host.capacity,
            staging = settings.engine.host.staging,
            eviction = ?settings.engine.host.policy,
            "nencache agent serving"
        );
        let mut deadline = None;
        let mut early_persist = None;
        let result = tokio::select! {
            r = &mut server => r.map_err(AgentError::from),
            () = shutdown => {
                let until = std::time::Instant::now() + settings.shutdown_grace;
                deadline = Some(until);
                if !engine.lower_tiers().is_empty() {
                    // Host entries go down while calls drain, so a client that never lets
                    // go of its connection cannot use up the grace period.
                    let e = engine.clone();
                    early_persist = Some(tokio::task::spawn_blocking(move || e.persist(until)));
                }
                tracing::info!(grace = ?settings.shutdown_grace, "shutting down: no new calls, draining in-flight ones");
                state.ready.store(false, Ordering::Release);
                health.set_not_serving::<NodeCacheServer<NodeCacheService>>().await;
                let _ = stop_tx.send(true);
                match tokio::time::timeout(settings.shutdown_grace, &mut server).await {
                    Ok(r) => r.map_err(AgentError::from),
                    Err(_) => {
                        tracing::warn!("grace period over; dropping remaining calls");
                        Ok(())
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        // Only now may sessions end and their leases go: no call is left that could reuse
        // an extent a client still reads.
        let _ = drained_tx.send(true);
        let _ = attach_task.await;
        for t in compat_tasks {
            let _ = t.await;
        }
        let _ = reaper.await;
        demoter_stop.store(true, Ordering::Release);
        engine.wake_demoter();
        if let Some(Ok(t)) = demoter {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        if !engine.lower_tiers().is_empty() {
            // A graceful stop keeps the host tier: what no lower tier holds yet is written
            // down, hottest first, within what is left of the grace period.
            let deadline =
                deadline.unwrap_or_else(|| std::time::Instant::now() + settings.shutdown_grace);
            let e = engine.clone();
            let start = std::time::Instant::now();
            let mut written = match early_persist {
                Some(t) => t.await.unwrap_or(0),
                None => 0,
            };
            // Then what was put while calls drained.
            written += tokio::task::spawn_blocking(move || e.persist(deadline))
                .await
                .unwrap_or(0);
            let left = engine.stats().entries;
            tracing::info!(
                written,
                host_entries = left,
                ms = start.elapsed().as_millis() as u64,
                "host entries written to the lower tiers"
            );
        }
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        for p in [&settings.compat.lm_socket, &settings.compat.redis_socket]
            .into_iter()
            .flatten()
        {
            let _ = std::fs::remove_file(p);
        }
        paths.remove();
        tracing::info!("agent stopped");
        result
    }
}

/// A TCP listener on `addr`; `what` names it in the error.
async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// The listeners of one compat protocol: on `tcp` and on the Unix socket `socket`, each if
/// configured; errors name them `tcp_what` and `unix_what`.
async fn compat_listeners(
    [tcp_what, unix_what]: [&'static str; 2],
    tcp: Option<SocketAddr>,
    socket: Option<&Path>,
    bind_unix: &impl Fn(&'static str, &Path) -> Result<UnixListener, AgentError>,
) -> Result<Vec<compat::Listener>, AgentError> {
    let mut out = Vec::new();
    if let Some(addr) = tcp {
        out.push(compat::Listener::Tcp(bind_tcp(tcp_what, addr).await?));
    }
    if let Some(p) = socket {
        out.push(compat::Listener::Unix(bind_unix(unix_what, p)?));
    }
    Ok(out)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
