//! The attach listener: opens a session for each client connection, hands over the arena
//! (read-only) and staging (read-write) descriptors, and closes the session, reclaiming its
//! leases and reservations, when the connection ends.

use std::{os::fd::AsFd, sync::Arc};

use nencache_api::{
    PROTOCOL_VERSION,
    attach::{HELLO_HEADER_LEN, Hello, Reply, send_with_fds, status},
    frame::{self, Found, Request, Response},
};

use nencache_engine::{Committed, Engine, PutItem, Reserved, SessionId};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use crate::{
    metrics::Metrics,
    service::{put_item, status_of, tier},
};

/// Accepts attach connections until `shutdown` flips.
pub async fn serve(
    listener: UnixListener,
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let engine = engine.clone();
                    let metrics = metrics.clone();
                    let shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        if let Err(e) = session(stream, &engine, &metrics, shutdown).await {
                            tracing::warn!(error = %e, "attach connection failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "attach accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn reply(
    stream: &UnixStream,
    r: &Reply,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> std::io::Result<()> {
    let bytes = r.encode();
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let with = if sent == 0 { fds } else { &[] };
        match stream.try_io(Interest::WRITABLE, || {
            send_with_fds(stream.as_fd(), &bytes[sent..], with)
        }) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn refusal(code: u32, message: impl Into<String>) -> Reply {
    Reply {
        status: code,
        session: 0,
        arena_len: 0,
        staging_len: 0,
        message: message.into(),
    }
}

async fn session(
    mut stream: UnixStream,
    engine: &Engine,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred().ok();
    let (pid, uid, gid) = cred.map_or((None, None, None), |c| {
        (c.pid(), Some(c.uid()), Some(c.gid()))
    });
    let mut header = [0u8; HELLO_HEADER_LEN];
    let hello = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        stream.read_exact(&mut header).await?;
        let (version, tenant_len) = Hello::decode_header(&header)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut tenant = vec![0; tenant_len];
        stream.read_exact(&mut tenant).await?;
        Ok::<_, std::io::Error>(Hello {
            version,
            tenant: String::from_utf8_lossy(&tenant).into(),
        })
    })
    .await;
    let hello = match hello {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            reply(&stream, &refusal(status::MALFORMED, e.to_string()), &[])
                .await
                .ok();
            return Err(e);
        }
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no hello within 5s",
            ));
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {} is not supported (agent speaks {PROTOCOL_VERSION})",
            hello.version
        );
        return reply(&stream, &refusal(status::BAD_VERSION, msg), &[]).await;
    }
    if !(hello.tenant.is_empty() || hello.tenant == "default") {
        let msg = format!(
            "unknown tenant {:?}; this agent serves only \"default\"",
            hello.tenant
        );
        return reply(&stream, &refusal(status::UNKNOWN_TENANT, msg), &[]).await;
    }
    let id = match engine.open_session() {
        Ok(id) => id,
        Err(e) => return reply(&stream, &refusal(status::EXHAUSTED, e.to_string()), &[]).await,
    };
    let result = async {
        let arena_ro = engine
            .arena()
            .read_only_fd()
            .map_err(std::io::Error::other)?;
        let ok = Reply {
            status: status::OK,
            session: id,
            arena_len: engine.arena().len() as u64,
            staging_len: engine.staging().len() as u64,
            message: String::new(),
        };
        reply(&stream, &ok, &[arena_ro.as_fd(), engine.staging().fd()]).await?;
        tracing::info!(
            session = format_args!("{id:#x}"),
            ?pid,
            ?uid,
            ?gid,
            "session opened"
        );
        metrics.sessions_opened.inc();
        // The session lives as long as the connection, which carries fast-path calls.
        serve_frames(&mut stream, engine, metrics, id, &mut shutdown).await
    }
    .await;
    match engine.close_session(id) {
        Ok((leases, reservations)) => tracing::info!(
            session = format_args!("{id:#x}"),
            ?pid,
            reclaimed_leases = leases,
            reclaimed_reservations = reservations,
            "session closed"
        ),
        Err(e) => tracing::warn!(error = %e, "closing session"),
    }
    result
}

/// Answers fast-path frames until the client disconnects, sends a malformed frame, or the
/// agent shuts down.
async fn serve_frames(
    stream: &mut UnixStream,
    engine: &Engine,
    metrics: &Metrics,
    session: SessionId,
    shutdown: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    let mut body = Vec::new();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            r = stream.read_exact(&mut len) => if r.is_err() { return Ok(()) },
            _ = shutdown.changed() => return Ok(()),
        }
        let start = std::time::Instant::now();
        let n = u32::from_le_bytes(len) as usize;
        out.clear();
        if n == 0 || n > frame::MAX_FRAME {
            let message = format!("frame of {n} bytes is outside 1..={}", frame::MAX_FRAME);
            Response::Error {
                code: frame::INVALID_ARGUMENT,
                message,
            }
            .encode(&mut out);
            stream.write_all(&out).await?;
            return Ok(());
        }
        body.resize(n, 0);
        stream.read_exact(&mut body).await?;
        let (method, resp, fatal) = match Request::decode(&body) {
            Ok(req) => {
                let (method, resp) = handle(engine, session, req);
                (method, resp, false)
            }
            Err(e) => {
                let resp = Response::Error {
                    code: frame::INVALID_ARGUMENT,
                    message: e.to_string(),
                };
                ("session_malformed", resp, true)
            }
        };
        let code = match &resp {
            Response::Error { code, .. } => tonic::Code::from(i32::from(*code)),
            _ => tonic::Code::Ok,
        };
        resp.encode(&mut out);
        stream.write_all(&out).await?;
        metrics.observe(method, code, start.elapsed().as_secs_f64());
        if fatal {
            return Ok(());
        }
    }
}

fn handle(engine: &Engine, session: SessionId, req: Request<'_>) -> (&'static str, Response) {
    let (method, r) = match req {
        Request::Lookup(keys) => (
            "session_lookup",
            engine
                .lookup(&keys)
                .map(|l| Response::Lookup(l.tiers.into_iter().map(|t| tier(t) as u8).collect())),
        ),
        Request::Get(keys, release) => (
            "session_get",
            engine
                .release(session, &release)
                .and_then(|()| engine.get(session, &keys))
                .map(|ls| {
                    Response::Get(
                        ls.into_iter()
                            .map(|l| {
                                l.map(|l| Found {
                                    lease: l.id,
                                    offset: l.offset,
                                    len: l.len,
                                    tier: tier(l.tier) as u8,
                                    metadata: l.metadata,
                                })
                            })
                            .collect(),
                    )
                }),
        ),
        Request::Release(ids) => (
            "session_release",
            engine.release(session, &ids).map(|()| Response::Release),
        ),
        Request::Reserve(items) => {
            let items: Vec<PutItem<'_>> = items
                .iter()
                .map(|i| put_item(i.key, i.value_len, i.metadata, i.ttl_ms, i.overwrite))
                .collect();
            let r = engine.reserve(session, &items).map(|rs| {
                Response::Reserve(
                    rs.into_iter()
                        .map(|r| match r {
                            Reserved::Space { id, staging_offset } => Some((id, staging_offset)),
                            Reserved::Exists => None,
                        })
                        .collect(),
                )
            });
            ("session_reserve", r)
        }
        Request::Commit(items) => {
            // The commit copies values into the arena: keep that off the reactor.
            let r = tokio::task::block_in_place(|| engine.commit(session, &items))
                .map(|cs| Response::Commit(cs.into_iter().map(|c| c == Committed::Done).collect()));
            ("session_commit", r)
        }
    };
    let resp = r.unwrap_or_else(|e| {
        let s = status_of(&e);
        Response::Error {
            code: s.code() as i32 as u8,
            message: s.message().to_string(),
        }
    });
    (method, resp)
}
