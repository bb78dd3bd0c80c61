//! Listeners for LMCache's remote protocols, over the same engine as the node-local API: the
//! `lm://` protocol of LMCache's cache server ([`lm`]) and the Redis protocol, RESP2 and
//! RESP3 ([`resp`]). Off unless configured; each listens on TCP, on a Unix socket, or both.
//!
//! What the listeners share lives here: the accept loop with its shutdown, the session a
//! connection opens on its first data request (an idle connection holds none), and the
//! LMCache metadata record stored with each value.

pub mod lm;
pub mod resp;

use std::{future::Future, sync::Arc, time::Duration};

use nencache_engine::{Engine, EngineError, SessionId};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::watch,
    task::JoinSet,
};

use prometheus_client::metrics::gauge::Gauge;

use crate::{metrics::Metrics, ops::Ops};

/// How long one read or write of a connection may wait for its peer in the middle of a
/// request (a header begun, a value being sent or received) before the connection is
/// closed. Between requests a connection may idle for as long as it likes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Awaits `f` for at most `limit`; `None` when it did not finish in time. An operation that
/// completes on its first poll (bytes already buffered, room in the socket: most of them
/// under load) arms no timer, which costs a clock read and a timer-wheel entry per call.
pub(crate) async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = T>,
) -> Option<T> {
    use std::task::Poll;
    let mut f = std::pin::pin!(f);
    if let Poll::Ready(v) = std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await {
        return Some(v);
    }
    tokio::time::timeout(limit, f).await.ok()
}

/// One open connection in the `compat_connections` gauge, however its task ends (a
/// panic included).
struct Open(Gauge);

impl Open {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a protocol's connections share.
#[derive(Debug, Clone)]
pub struct Context {
    /// The operations over the engine.
    pub ops: Ops,
    /// The agent's metrics.
    pub metrics: Arc<Metrics>,
    /// Flips when the agent stops: connections end after their current request.
    pub stop: watch::Receiver<bool>,
}

/// A listener of one protocol: TCP or a Unix socket.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix-socket listener.
    Unix(UnixListener),
}

impl Listener {
    /// Where it listens, for logs.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(l) => l
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string()),
            Self::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
                .unwrap_or_else(|| "a Unix socket".into()),
        }
    }
}

/// Accepts connections on `listener` until the agent stops, serving each with `handle`,
/// then waits up to `grace` for the connections to finish their current request.
pub async fn serve<F, Fut>(
    protocol: &'static str,
    listener: Listener,
    ctx: Context,
    grace: Duration,
    handle: F,
) where
    F: Fn(Box<dyn Stream>, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut stop = ctx.stop.clone();
    let mut conns = JoinSet::new();
    tracing::info!(protocol, addr = %listener.describe(), "compat listener serving");
    loop {
        let accepted: std::io::Result<Box<dyn Stream>> = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            a = accept(&listener) => a,
        };
        match accepted {
            Ok(stream) => {
                let open = Open::new(ctx.metrics.compat_connections(protocol));
                let fut = handle(stream, ctx.clone());
                conns.spawn(async move {
                    fut.await;
                    drop(open);
                });
            }
            Err(e) => {
                tracing::warn!(protocol, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    if tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!(
            protocol,
            "grace period over; closing the remaining connections"
        );
        conns.abort_all();
    }
}

/// A connection's byte stream, whatever its transport.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

async fn accept(listener: &Listener) -> std::io::Result<Box<dyn Stream>> {
    Ok(match listener {
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            // Requests and replies are small headers followed by values: no Nagle delay.
            s.set_nodelay(true)?;
            // Chunks are tens of MiB: a 4 MiB send buffer lets one write move more of a
            // value before the socket is full and the task waits for room.
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(&s, 4 << 20);
            Box::new(s)
        }
        Listener::Unix(l) => Box::new(l.accept().await?.0),
    })
}

/// A connection's engine session, opened on first use and closed (its leases and
/// reservations returned) when dropped.
#[derive(Debug)]
pub struct Session {
    engine: Arc<Engine>,
    id: Option<SessionId>,
}

impl Session {
    /// No session yet.
    #[must_use]
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine, id: None }
    }

    /// The session, opened now if need be.
    ///
    /// # Errors
    /// When the agent's session table is full.
    pub fn id(&mut self) -> Result<SessionId, EngineError> {
        match self.id {
            Some(id) => Ok(id),
            None => {
                let id = self.engine.open_session()?;
                self.id = Some(id);
                Ok(id)
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = self.engine.close_session(id);
        }
    }
}

/// Writes `ints` as little-endian int32s at the start of `out` (LMCache packs its headers
/// and records with `struct` in native order, little-endian where it runs).
pub(crate) fn put_ints(out: &mut [u8], ints: &[i32]) {
    for (i, v) in ints.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// The `i`-th little-endian int32 of `b`.
pub(crate) fn int_at(b: &[u8], i: usize) -> i32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[i * 4..i * 4 + 4]);
    i32::from_le_bytes(w)
}

/// LMCache's metadata of a stored object (its `RemoteMetadata`, as the Redis connector
/// writes it): native-order (little-endian) int32s `length, fmt`, then `dtype, shape[0..4]`
/// per group (one group: 28 bytes). It is stored as the value's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmMeta {
    /// The value's length in bytes.
    pub length: i32,
    /// LMCache's `MemoryFormat` code.
    pub fmt: i32,
    /// LMCache's dtype code.
    pub dtype: i32,
    /// The shape, padded with zeros to four dimensions.
    pub shape: [i32; 4],
}

impl LmMeta {
    /// The size of a one-group record.
    pub const LEN: usize = 28;

    /// The one-group record.
    #[must_use]
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let fields = [
            self.length,
            self.fmt,
            self.dtype,
            self.shape[0],
            self.shape[1],
            self.shape[2],
            self.shape[3],
        ];
        put_ints(&mut out, &fields);
        out
    }

    /// The first group of an LMCache record, whatever value it describes; `None` when `meta`
    /// is not shaped as one (`8 + 20·groups` bytes) or its length is negative.
    #[must_use]
    pub fn parse(meta: &[u8]) -> Option<Self> {
        if meta.len() < Self::LEN || !(meta.len() - 8).is_multiple_of(20) {
            return None;
        }
        let m = Self {
            length: int_at(meta, 0),
            fmt: int_at(meta, 1),
            dtype: int_at(meta, 2),
            shape: [3, 4, 5, 6].map(|i| int_at(meta, i)),
        };
        (m.length >= 0).then_some(m)
    }

    /// The first group of a record stored with a value of `value_len` bytes; `None` when the
    /// metadata is not an LMCache record for that value (a value some other client stored).
    #[must_use]
    pub fn decode(meta: &[u8], value_len: u64) -> Option<Self> {
        Self::parse(meta).filter(|m| u64::try_from(m.length).ok() == Some(value_len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_record_round_trips_and_checks_the_length() {
        let m = LmMeta {
            length: 33_554_432,
            fmt: 1,
            dtype: 3,
            shape: [2, 32, 256, 1024],
        };
        let b = m.encode();
        assert_eq!(&b[..8], &[0, 0, 0, 2, 1, 0, 0, 0]);
        assert_eq!(LmMeta::decode(&b, 33_554_432), Some(m));
        assert_eq!(LmMeta::decode(&b, 5), None);
        assert_eq!(LmMeta::decode(&b[..27], 33_554_432), None);
        assert_eq!(LmMeta::decode(b"{\"format\":1}", 12), None);
        // Two groups: 48 bytes, the first one answered.
        let mut two = b.to_vec();
        two.extend_from_slice(&[0; 20]);
        assert_eq!(LmMeta::decode(&two, 33_554_432), Some(m));
    }
}
