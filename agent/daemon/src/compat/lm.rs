//! LMCache's `lm://` remote protocol, the one its cache server (`python -m lmcache.v1.server`)
//! speaks, byte for byte; `docs/api.md` ("LMCache `lm://` protocol") is the specification.
//!
//! A request is a 186-byte header, nine native-order (little-endian) int32s and a 150-byte
//! key padded with spaces: `command, length, fmt, dtype, location, shape[4], key`. A PUT is
//! followed by `length` bytes and answered with nothing; GET, EXIST, LIST and HEALTH are
//! answered with a 36-byte header, `code, length, fmt, dtype, shape[4], location` (200
//! success, 400 failure), a GET's and a LIST's followed by `length` bytes. Requests of one
//! connection are served in order.
//!
//! A PUT's value is read from the socket straight into the agent's staging area and committed
//! into the arena; a GET's is written to the socket straight from the arena under a lease.
//! LMCache's fmt, dtype and shape travel as the value's metadata ([`LmMeta`]).
//!
//! Faults end at the connection: a header that stops short, a negative length, an unknown
//! command, or a peer that stalls mid-request for [`IO_TIMEOUT`] close it; a PUT the engine
//! refuses (a key too long or empty, a value over the maximum, no space) has its value read
//! and dropped, so the connection stays in step. Nothing half-written is ever published.

use std::time::{Duration, Instant};

use nencache_engine::{EngineError, PutItem, Reserved};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Context, IO_TIMEOUT, LmMeta, Session, Stream, int_at, put_ints};

/// Request header length.
pub const REQUEST_LEN: usize = 186;
/// Reply header length.
pub const REPLY_LEN: usize = 36;
/// The key field's length: keys are at most this long.
pub const KEY_LEN: usize = 150;
/// Reply code of a success.
pub const SUCCESS: i32 = 200;
/// Reply code of a failure (a miss).
pub const FAIL: i32 = 400;

/// The request commands.
pub mod command {
    /// Store a value (no reply).
    pub const PUT: i32 = 1;
    /// Fetch a value.
    pub const GET: i32 = 2;
    /// Whether a key is stored.
    pub const EXIST: i32 = 3;
    /// The stored keys.
    pub const LIST: i32 = 4;
    /// Liveness.
    pub const HEALTH: i32 = 5;
}

/// A decoded request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// One of [`command`].
    pub command: i32,
    /// The value's length (PUT), else 0.
    pub length: i32,
    /// LMCache's memory format code.
    pub fmt: i32,
    /// LMCache's dtype code.
    pub dtype: i32,
    /// LMCache's location code (unused by the server).
    pub location: i32,
    /// The shape, padded to four dimensions with zeros.
    pub shape: [i32; 4],
    /// The key, its space padding (and any surrounding whitespace) removed.
    pub key: Vec<u8>,
}

impl Request {
    /// Decodes a header.
    #[must_use]
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Self {
        Self {
            command: int_at(b, 0),
            length: int_at(b, 1),
            fmt: int_at(b, 2),
            dtype: int_at(b, 3),
            location: int_at(b, 4),
            shape: [int_at(b, 5), int_at(b, 6), int_at(b, 7), int_at(b, 8)],
            key: b[36..].trim_ascii().to_vec(),
        }
    }

    /// Encodes a header (for clients: tests, benchmarks). Keys longer than [`KEY_LEN`] are
    /// cut, as no server could read them.
    #[must_use]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [b' '; REQUEST_LEN];
        let ints = [
            self.command,
            self.length,
            self.fmt,
            self.dtype,
            self.location,
            self.shape[0],
            self.shape[1],
            self.shape[2],
            self.shape[3],
        ];
        put_ints(&mut out, &ints);
        let n = self.key.len().min(KEY_LEN);
        out[36..36 + n].copy_from_slice(&self.key[..n]);
        out
    }
}

/// A reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// [`SUCCESS`] or [`FAIL`].
    pub code: i32,
    /// Bytes that follow.
    pub length: i32,
    /// Memory format code.
    pub fmt: i32,
    /// Dtype code.
    pub dtype: i32,
    /// Shape, padded with zeros.
    pub shape: [i32; 4],
    /// Location code (always 0).
    pub location: i32,
}

impl Reply {
    /// A reply with nothing after it, as LMCache's server sends for EXIST and HEALTH and for
    /// a GET that misses: format 1 (`KV_2LTD`), dtype 2 (float16), shape zeros.
    #[must_use]
    pub fn empty(code: i32) -> Self {
        Self {
            code,
            length: 0,
            fmt: 1,
            dtype: 2,
            shape: [0; 4],
            location: 0,
        }
    }

    /// Encodes the header.
    #[must_use]
    pub fn encode(&self) -> [u8; REPLY_LEN] {
        let mut out = [0u8; REPLY_LEN];
        let ints = [
            self.code,
            self.length,
            self.fmt,
            self.dtype,
            self.shape[0],
            self.shape[1],
            self.shape[2],
            self.shape[3],
            self.location,
        ];
        put_ints(&mut out, &ints);
        out
    }

    /// Decodes a header (for clients).
    #[must_use]
    pub fn decode(b: &[u8; REPLY_LEN]) -> Self {
        Self {
            code: int_at(b, 0),
            length: int_at(b, 1),
            fmt: int_at(b, 2),
            dtype: int_at(b, 3),
            shape: [int_at(b, 4), int_at(b, 5), int_at(b, 6), int_at(b, 7)],
            location: int_at(b, 8),
        }
    }
}

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer stalled for {0:?} in the middle of a request")]
    Stalled(Duration),
    #[error("{0}")]
    Protocol(String),
}

/// Serves one connection until its peer closes it, it breaks the protocol, or the agent
/// stops (after the request in progress).
pub async fn connection(stream: Box<dyn Stream>, ctx: Context) {
    let engine = ctx.ops.engine().clone();
    let mut conn = Conn {
        stream,
        session: Session::new(engine),
        ctx,
    };
    match conn.run().await {
        Ok(()) => {}
        Err(Closed::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            tracing::info!("lm:// peer closed the connection in the middle of a request");
        }
        Err(e) => tracing::warn!(error = %e, "lm:// connection closed"),
    }
}

struct Conn {
    stream: Box<dyn Stream>,
    session: Session,
    ctx: Context,
}

/// One request's outcome, for the metrics.
type Outcome = &'static str;

async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Closed> {
    match super::within(limit, f).await {
        Some(r) => Ok(r?),
        None => Err(Closed::Stalled(limit)),
    }
}

fn outcome_of(e: &EngineError) -> Outcome {
    match e {
        EngineError::NoSpace { .. } => "no_space",
        EngineError::ValueTooLarge { .. } => "too_large",
        EngineError::InvalidKey { .. } => "invalid_key",
        _ => "error",
    }
}

impl Conn {
    async fn run(&mut self) -> Result<(), Closed> {
        let mut stop = self.ctx.stop.clone();
        loop {
            let mut hdr = [0u8; REQUEST_LEN];
            let n = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Ok(()),
                r = self.stream.read(&mut hdr) => r?,
            };
            if n == 0 {
                return Ok(());
            }
            within(IO_TIMEOUT, self.stream.read_exact(&mut hdr[n..]))
                .await
                .map_err(|e| match e {
                    Closed::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                        Closed::Protocol(format!(
                            "header cut short after {n} of {REQUEST_LEN} bytes"
                        ))
                    }
                    e => e,
                })?;
            let req = Request::decode(&hdr);
            let start = Instant::now();
            let (name, outcome) = match req.command {
                command::PUT => ("put", self.put(&req).await?),
                command::GET => ("get", self.get(&req).await?),
                command::EXIST => ("exist", self.exist(&req).await?),
                command::LIST => ("list", self.list().await?),
                command::HEALTH => {
                    self.reply(&Reply::empty(SUCCESS)).await?;
                    ("health", "ok")
                }
                other => {
                    self.ctx
                        .metrics
                        .observe_compat("lm", "unknown", "refused", 0.0);
                    return Err(Closed::Protocol(format!("unknown command {other}")));
                }
            };
            self.ctx
                .metrics
                .observe_compat("lm", name, outcome, start.elapsed().as_secs_f64());
        }
    }

    async fn reply(&mut self, r: &Reply) -> Result<(), Closed> {
        within(IO_TIMEOUT, self.stream.write_all(&r.encode())).await
    }

    /// Reads and drops `len` bytes: the value of a PUT that is not stored.
    async fn drain(&mut self, mut len: u64) -> Result<(), Closed> {
        let mut buf = vec![0u8; 64 << 10];
        while len > 0 {
            let want = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            within(IO_TIMEOUT, self.stream.read_exact(&mut buf[..want])).await?;
            len -= want as u64;
        }
        Ok(())
    }

    async fn put(&mut self, req: &Request) -> Result<Outcome, Closed> {
        let Ok(len) = u64::try_from(req.length) else {
            return Err(Closed::Protocol(format!(
                "PUT of negative length {}",
                req.length
            )));
        };
        let meta = LmMeta {
            length: req.length,
            fmt: req.fmt,
            dtype: req.dtype,
            shape: req.shape,
        }
        .encode();
        let engine = self.ctx.ops.engine().clone();
        let cfg = engine.config();
        let reserved = self.session.id().and_then(|session| {
            let item = PutItem {
                key: &req.key,
                value_len: len,
                metadata: &meta,
                ttl: None,
                // LMCache's server replaces what a key held, as a dictionary does.
                overwrite: true,
            };
            Ok((session, self.ctx.ops.reserve(session, &[item])?))
        });
        let (session, id, offset) = match reserved {
            Ok((session, r)) => match r.first() {
                Some(&Reserved::Space { id, staging_offset }) => (session, id, staging_offset),
                _ => {
                    self.drain(len).await?;
                    return Ok("error");
                }
            },
            Err(e) => {
                tracing::debug!(error = %e, key = %String::from_utf8_lossy(&req.key), "lm:// PUT not stored");
                self.drain(len).await?;
                return Ok(outcome_of(&e));
            }
        };
        // The staging range is this reservation's until it is committed, aborted, or reaped
        // after the reservation timeout: stop writing well before the reaper could take it.
        let limit = (cfg.limits.reservation_timeout * 3 / 4).min(IO_TIMEOUT);
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        let ptr = engine.staging().ptr_at(offset as usize, len_usize);
        // SAFETY: the reserved staging range [offset, offset + len) belongs to this
        // reservation alone (no other put is given it, and the client of this session cannot
        // be given it either: the session is the connection's own), and it stays mapped
        // while `engine` lives. Writes end before the reaper could reclaim it (see `limit`).
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len_usize) };
        let read = within(limit, self.stream.read_exact(buf)).await;
        if let Err(e) = read {
            let _ = self.ctx.ops.abort(session, &[id]);
            return Err(e);
        }
        match self.ctx.ops.commit(session, vec![(id, None)]).await {
            Ok(_) => Ok("ok"),
            Err(e) => {
                tracing::warn!(error = %e, "lm:// PUT commit failed");
                Ok(outcome_of(&e))
            }
        }
    }

    async fn get(&mut self, req: &Request) -> Result<Outcome, Closed> {
        let session = match self.session.id() {
            Ok(s) => s,
            Err(e) => {
                self.reply(&Reply::empty(FAIL)).await?;
                return Ok(outcome_of(&e));
            }
        };
        let found = match self.ctx.ops.get(session, &[&req.key], &[]).await {
            Ok(mut v) => v.pop().flatten(),
            Err(e) => {
                self.reply(&Reply::empty(FAIL)).await?;
                return Ok(outcome_of(&e));
            }
        };
        let Some(lease) = found else {
            self.reply(&Reply::empty(FAIL)).await?;
            return Ok("miss");
        };
        let Some(meta) = LmMeta::decode(&lease.metadata, lease.len) else {
            // Stored by another kind of client: LMCache could not read it as a tensor.
            let _ = self.ctx.ops.release(session, &[lease.id]);
            self.reply(&Reply::empty(FAIL)).await?;
            return Ok("foreign");
        };
        let header = Reply {
            code: SUCCESS,
            length: meta.length,
            fmt: meta.fmt,
            dtype: meta.dtype,
            shape: meta.shape,
            location: 0,
        };
        let engine = self.ctx.ops.engine().clone();
        let len = usize::try_from(lease.len).unwrap_or(usize::MAX);
        let ptr = engine.arena().ptr_at(lease.offset as usize, len);
        // SAFETY: the lease keeps the value's arena bytes from being evicted or rewritten
        // until it is released below, after the last write; `engine` keeps the arena mapped.
        let value = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
        let sent = async {
            within(IO_TIMEOUT, self.stream.write_all(&header.encode())).await?;
            within(IO_TIMEOUT, self.stream.write_all(value)).await
        }
        .await;
        let _ = self.ctx.ops.release(session, &[lease.id]);
        sent?;
        Ok("hit")
    }

    async fn exist(&mut self, req: &Request) -> Result<Outcome, Closed> {
        let found = matches!(self.ctx.ops.lookup(&[&req.key]), Ok(t) if !t.is_empty());
        self.reply(&Reply::empty(if found { SUCCESS } else { FAIL }))
            .await?;
        Ok(if found { "hit" } else { "miss" })
    }

    /// The keys held in host memory that could be LMCache keys (UTF-8 without line breaks),
    /// one per line.
    async fn list(&mut self) -> Result<Outcome, Closed> {
        let engine = self.ctx.ops.engine().clone();
        let body = tokio::task::spawn_blocking(move || {
            let mut body = Vec::new();
            let mut cursor = 0;
            loop {
                let (keys, next) = engine.scan_host(cursor, 4096, |k| {
                    std::str::from_utf8(k).is_ok_and(|s| !s.contains(['\n', '\r']))
                });
                for k in keys {
                    if body.len() + k.len() + 1 > i32::MAX as usize {
                        return body;
                    }
                    if !body.is_empty() {
                        body.push(b'\n');
                    }
                    body.extend_from_slice(&k);
                }
                if next == 0 {
                    return body;
                }
                cursor = next;
            }
        })
        .await
        .unwrap_or_default();
        let header = Reply {
            length: i32::try_from(body.len()).unwrap_or(i32::MAX),
            ..Reply::empty(SUCCESS)
        };
        self.reply(&header).await?;
        within(IO_TIMEOUT, self.stream.write_all(&body)).await?;
        Ok("ok")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn headers_match_the_golden_bytes_of_lmcaches_struct_packing() {
        let key = b"meta-llama/Llama-3.1-8B-Instruct@1@0@-3c1f0e2a9b@bfloat16";
        let put = Request {
            command: command::PUT,
            length: 33_554_432,
            fmt: 1,
            dtype: 3,
            location: 0,
            shape: [2, 32, 256, 1024],
            key: key.to_vec(),
        };
        let b = put.encode();
        assert_eq!(
            b[..36].to_vec(),
            hex("01000000 00000002 01000000 03000000 00000000 02000000 20000000 00010000 00040000")
        );
        assert_eq!(&b[36..36 + key.len()], key);
        assert!(b[36 + key.len()..].iter().all(|&c| c == b' '));
        assert_eq!(Request::decode(&b), put);

        let reply = Reply {
            code: SUCCESS,
            length: 33_554_432,
            fmt: 1,
            dtype: 3,
            shape: [2, 32, 256, 1024],
            location: 0,
        };
        assert_eq!(
            reply.encode().to_vec(),
            hex("c8000000 00000002 01000000 03000000 02000000 20000000 00010000 00040000 00000000")
        );
        assert_eq!(Reply::decode(&reply.encode()), reply);
    }

    #[test]
    fn keys_lose_their_padding_and_surrounding_whitespace() {
        let mut b = [b' '; REQUEST_LEN];
        b[36..41].copy_from_slice(b" k@1 ");
        assert_eq!(Request::decode(&b).key, b"k@1");
        let all_space = [b' '; REQUEST_LEN];
        assert!(Request::decode(&all_space).key.is_empty());
    }
}
