//! The session connection's owner: two tasks, a writer and a reader, around the attach
//! connection. A call hands the writer an encoded frame and gets a receiver for its response;
//! the reader matches responses to calls in order (the agent answers in request order).
//!
//! Because these tasks, not the callers, own the connection, a caller that gives up (a
//! timeout dropping its future) can never leave the stream out of step, and a response that
//! nobody awaits any more is still read and settled: the leases it grants are queued for
//! release and the reservations it makes for abort ([`Orphans`]). When the agent closes the
//! connection (it stopped or restarted), every waiting call fails with
//! [`ClientError::Disconnected`] and the session is marked dead, so the client attaches a new
//! one on its next call.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use nencache_api::frame::Response;
use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, oneshot},
};

use crate::{error::ClientError, value::Settle};

/// Largest response frame accepted. Responses are bounded by the agent's limits (a GET of
/// `max_batch` values with the largest metadata is a few MiB); this only stops a corrupt
/// length from allocating without bound.
const MAX_RESPONSE: usize = 1 << 30;

/// A response, or why there is none.
pub(crate) type Reply = Result<Answer, ClientError>;

/// A response on its way to its caller. If it is dropped before the caller took it (the
/// caller gave up, even after the response was handed over), what it granted is settled
/// through [`Orphans`]: no lease or reservation is ever lost to a cancelled call.
pub(crate) struct Answer {
    op: u8,
    resp: Option<Response>,
    orphans: Arc<dyn Orphans>,
}

impl Answer {
    pub(crate) fn new(op: u8, resp: Response, orphans: Arc<dyn Orphans>) -> Self {
        Self {
            op,
            resp: Some(resp),
            orphans,
        }
    }

    /// The response, now the caller's to settle.
    pub(crate) fn take(mut self) -> Response {
        // Always present until taken, and taking consumes the answer.
        self.resp.take().unwrap_or(Response::Abort)
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if let Some(resp) = self.resp.take() {
            self.orphans.orphaned(self.op, &resp);
        }
    }
}

/// What the reader settles when a response finds no one waiting.
pub(crate) trait Orphans: Send + Sync + 'static {
    /// Queues the leases or reservations that `resp` (to a request of `op`) granted for
    /// release or abort.
    fn orphaned(&self, op: u8, resp: &Response);
}

/// A request on its way: its operation, who waits for the answer, and what must stay
/// counted as in flight until the answer arrives.
struct Pending {
    op: u8,
    reply: oneshot::Sender<Reply>,
    _settle: Option<Settle>,
}

struct Outgoing {
    frame: Vec<u8>,
    pending: Pending,
}

/// Whether the connection is still usable, shared by the tasks and the session.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    dead: AtomicBool,
    why: Mutex<Option<String>>,
    died: tokio::sync::Notify,
}

impl Liveness {
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    pub(crate) fn kill(&self, why: impl Into<String>) {
        let mut w = self.why.lock();
        if w.is_none() {
            *w = Some(why.into());
        }
        self.dead.store(true, Ordering::Release);
        self.died.notify_waiters();
    }

    /// Resolves once the session is dead.
    pub(crate) async fn dead(&self) {
        let notified = self.died.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !self.is_dead() {
            notified.await;
        }
    }

    pub(crate) fn error(&self) -> ClientError {
        ClientError::Disconnected(
            self.why
                .lock()
                .clone()
                .unwrap_or_else(|| "the session connection closed".into()),
        )
    }
}

/// The handle calls use to reach the writer.
#[derive(Debug)]
pub(crate) struct Conn {
    tx: mpsc::UnboundedSender<Outgoing>,
    live: Arc<Liveness>,
}

impl std::fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("op", &self.pending.op)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Starts the writer and reader over `stream`. They stop when every handle is dropped
    /// (the connection then closes, ending the session) or when the agent closes it.
    pub(crate) fn start(stream: UnixStream, orphans: Arc<dyn Orphans>) -> (Self, Arc<Liveness>) {
        let live = Arc::new(Liveness::default());
        let (rd, wr) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(Mutex::new(VecDeque::new()));
        tokio::spawn(write_loop(wr, rx, in_flight.clone(), live.clone()));
        tokio::spawn(read_loop(rd, in_flight, live.clone(), orphans));
        (
            Self {
                tx,
                live: live.clone(),
            },
            live,
        )
    }

    /// Queues `frame` (an encoded request of operation `op`) and returns the receiver of its
    /// response. Never waits: the request is on its way when this returns, whatever becomes
    /// of the receiver. `settle` is dropped once the response has arrived.
    pub(crate) fn submit(
        &self,
        op: u8,
        frame: Vec<u8>,
        settle: Option<Settle>,
    ) -> oneshot::Receiver<Reply> {
        let (reply, rx) = oneshot::channel();
        let out = Outgoing {
            frame,
            pending: Pending {
                op,
                reply,
                _settle: settle,
            },
        };
        if self.live.is_dead() {
            let _ = out.pending.reply.send(Err(self.live.error()));
        } else if let Err(mpsc::error::SendError(out)) = self.tx.send(out) {
            self.live
                .kill("the session's tasks stopped (their runtime shut down)");
            let _ = out.pending.reply.send(Err(self.live.error()));
        }
        rx
    }
}

/// Requests written, in order, whose responses have not been read yet.
type InFlight = Arc<Mutex<VecDeque<Pending>>>;

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    in_flight: InFlight,
    live: Arc<Liveness>,
) {
    while let Some(out) = rx.recv().await {
        if live.is_dead() {
            let _ = out.pending.reply.send(Err(live.error()));
            continue;
        }
        // Registered before the bytes leave, so the reader always finds it.
        in_flight.lock().push_back(out.pending);
        if let Err(e) = wr.write_all(&out.frame).await {
            live.kill(format!("writing to the session connection: {e}"));
        }
        if live.is_dead() {
            // The reader may have stopped before this request was registered: answer it here.
            fail_all(&in_flight, &live);
        }
    }
    // Every handle is gone: closing the write side ends the session at the agent.
    let _ = wr.shutdown().await;
}

fn fail_all(in_flight: &InFlight, live: &Liveness) {
    let pending: Vec<Pending> = in_flight.lock().drain(..).collect();
    for p in pending {
        let _ = p.reply.send(Err(live.error()));
    }
}

async fn read_loop(
    mut rd: OwnedReadHalf,
    in_flight: InFlight,
    live: Arc<Liveness>,
    orphans: Arc<dyn Orphans>,
) {
    let mut buf = Vec::new();
    loop {
        let why = match read_frame(&mut rd, &mut buf).await {
            Ok(()) => {
                let Some(p) = in_flight.lock().pop_front() else {
                    live.kill("the agent sent a response to no request");
                    break;
                };
                let reply = Response::decode(p.op, &buf)
                    .map_err(|e| ClientError::Protocol(format!("fast-path response: {e}")));
                match reply {
                    Ok(resp) => {
                        // Settled by `Answer`'s drop if the caller is gone.
                        let _ = p.reply.send(Ok(Answer::new(p.op, resp, orphans.clone())));
                        continue;
                    }
                    Err(e) => {
                        // The stream can no longer be trusted to be in step.
                        let why = e.to_string();
                        let _ = p.reply.send(Err(e));
                        why
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                "the agent closed the session connection".into()
            }
            Err(e) => format!("reading the session connection: {e}"),
        };
        live.kill(why);
        break;
    }
    live.kill("the session connection closed");
    fail_all(&in_flight, &live);
}

async fn read_frame(rd: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await?;
    let n = u32::from_le_bytes(len) as usize;
    if n == 0 || n > MAX_RESPONSE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("fast-path response of {n} bytes"),
        ));
    }
    buf.resize(n, 0);
    rd.read_exact(buf).await.map(drop)
}
