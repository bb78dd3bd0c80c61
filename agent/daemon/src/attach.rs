//! The attach listener: opens a session for each client connection, hands over the arena
//! (read-only) and staging (read-write) descriptors, serves the session's fast-path frames,
//! and closes the session, reclaiming its leases and reservations, when the connection ends.
//!
//! A request never ends a session: an oversized frame is skipped, a malformed one or an
//! unknown operation is answered with an error, and the connection stays in step. At
//! shutdown the sessions stay open until the gRPC server has drained (or the grace period ran
//! out), so no extent a client
//! still reads is handed to another put while the agent winds down.

use std::{os::fd::AsFd, sync::Arc};

use nencache_api::{
    attach::{AttachError, HELLO_HEADER_LEN, Hello, Reply, send_with_fds, status},
    frame::{self, Found, Request, Response},
};

use nencache_engine::{Committed, Reserved, SessionId};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use crate::{
    metrics::Metrics,
    ops::{Ops, put_item, status_of, tier},
};

/// When the listener stops accepting, and when open sessions end.
#[derive(Debug, Clone)]
pub struct Shutdown {
    /// Flips when the agent stops accepting new sessions.
    pub stop: watch::Receiver<bool>,
    /// Flips once in-flight gRPC calls have drained; sessions then end.
    pub drained: watch::Receiver<bool>,
}

/// Accepts attach connections until `shutdown.stop` flips.
pub async fn serve(listener: UnixListener, ops: Ops, metrics: Arc<Metrics>, shutdown: Shutdown) {
    let mut stop = shutdown.stop.clone();
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ops = ops.clone();
                    let metrics = metrics.clone();
                    let drained = shutdown.drained.clone();
                    tokio::spawn(async move {
                        if let Err(e) = session(stream, &ops, &metrics, drained).await {
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
    ops: &Ops,
    metrics: &Metrics,
    mut drained: watch::Receiver<bool>,
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
    if let Err((code, msg)) = ops.check_hello(hello.version, &hello.tenant) {
        return reply(&stream, &refusal(code, msg), &[]).await;
    }
    let engine = ops.engine();
    let id = match engine.open_session() {
        Ok(id) => id,
        Err(e) => return reply(&stream, &refusal(status::EXHAUSTED, e.to_string()), &[]).await,
    };
    let result = async {
        let arena_ro = match engine.arena().read_only_fd() {
            Ok(fd) => fd,
            Err(e) => {
                let msg = format!("the agent cannot hand out the arena: {e}");
                reply(&stream, &refusal(status::INTERNAL, msg), &[])
                    .await
                    .ok();
                return Err(std::io::Error::other(e));
            }
        };
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
        serve_frames(&mut stream, ops, metrics, id, &mut drained).await
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

/// Reads and drops `n` bytes (the body of a frame too long to take).
async fn skip(stream: &mut UnixStream, mut n: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.resize(64 << 10, 0);
    while n > 0 {
        let take = n.min(buf.len());
        stream.read_exact(&mut buf[..take]).await?;
        n -= take;
    }
    Ok(())
}

/// Answers fast-path frames until the client disconnects or the agent has drained its
/// in-flight calls at shutdown. No request ends the session.
async fn serve_frames(
    stream: &mut UnixStream,
    ops: &Ops,
    metrics: &Metrics,
    session: SessionId,
    drained: &mut watch::Receiver<bool>,
) -> std::io::Result<()> {
    let max = ops.wire().max_frame_len;
    let mut len = [0u8; 4];
    let mut body = Vec::new();
    let mut out = Vec::new();
    loop {
        tokio::select! {
            r = stream.read_exact(&mut len) => if r.is_err() { return Ok(()) },
            _ = async { drained.wait_for(|d| *d).await.map(|_| ()) } => return Ok(()),
        }
        let start = std::time::Instant::now();
        let n = u32::from_le_bytes(len) as usize;
        out.clear();
        let (method, resp) = if n == 0 || n > max {
            if n > max {
                skip(stream, n, &mut body).await?;
            }
            let message = format!("frame of {n} bytes is outside 1..={max}");
            (
                "session_malformed",
                Response::Error {
                    code: frame::INVALID_ARGUMENT,
                    message,
                },
            )
        } else {
            body.resize(n, 0);
            stream.read_exact(&mut body).await?;
            match Request::decode(&body) {
                Ok(req) => handle(ops, session, req).await,
                Err(e) => {
                    let code = match e {
                        AttachError::UnknownOperation => frame::UNIMPLEMENTED,
                        _ => frame::INVALID_ARGUMENT,
                    };
                    let message = match e {
                        AttachError::UnknownOperation => format!("unknown operation {}", body[0]),
                        e => e.to_string(),
                    };
                    ("session_malformed", Response::Error { code, message })
                }
            }
        };
        let code = match &resp {
            Response::Error { code, .. } => tonic::Code::from(i32::from(*code)),
            _ => tonic::Code::Ok,
        };
        resp.encode(&mut out);
        stream.write_all(&out).await?;
        metrics.observe(method, code, start.elapsed().as_secs_f64());
    }
}

async fn handle(ops: &Ops, session: SessionId, req: Request<'_>) -> (&'static str, Response) {
    let (method, r) = match req {
        Request::Lookup(keys) => (
            "session_lookup",
            ops.lookup(&keys)
                .map(|tiers| Response::Lookup(tiers.into_iter().map(|t| tier(t) as u8).collect())),
        ),
        Request::Get(keys, release) => (
            "session_get",
            ops.get(session, &keys, &release).await.map(|ls| {
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
            ops.release(session, &ids).map(|()| Response::Release),
        ),
        Request::Reserve(items) => {
            let items: Vec<_> = items
                .iter()
                .map(|i| put_item(i.key, i.value_len, i.metadata, i.ttl_ms, i.overwrite))
                .collect();
            let r = ops.reserve(session, &items).map(|rs| {
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
            let r = ops
                .commit(session, items)
                .await
                .map(|cs| Response::Commit(cs.into_iter().map(|c| c == Committed::Done).collect()));
            ("session_commit", r)
        }
        Request::Abort(ids) => (
            "session_abort",
            ops.abort(session, &ids).map(|()| Response::Abort),
        ),
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
