//! The Redis protocol (RESP2 and RESP3), enough for LMCache's Redis connector and for ordinary
//! Redis clients using the agent as a cache; `docs/api.md` ("Redis protocol") lists the
//! commands and what each answers.
//!
//! Commands are arrays of bulk strings (or inline commands); replies are RESP2 until a
//! client says `HELLO 3`. Replies are buffered and flushed when no further command is
//! already waiting, so pipelined commands are answered in one write.
//!
//! A `SET`'s value is read from the socket straight into the agent's staging area (its
//! options, which follow the value, amend the reservation before it is committed), and a
//! `GET`'s is written to the socket straight from the arena under a lease: a value is never
//! buffered whole in between.
//!
//! **LMCache's layout.** LMCache's connector stores a chunk as `<key>kv_bytes` (the bytes,
//! written first) and `<key>metadata` (its description). Here they are one engine entry,
//! `<key>`, whose metadata is the description: `SET <key>kv_bytes` reserves the entry and
//! holds it until `SET <key>metadata` (from any connection) supplies the description and
//! commits both at once, so neither can be evicted or seen without the other. `GET`,
//! `EXISTS`, `DEL`, `EXPIRE` and `TTL` of either name address that entry.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use nencache_engine::{PutItem, Reserved, SessionId};
use parking_lot::Mutex;
use tokio::io::{
    AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf,
};

use prometheus_client::metrics::{counter::Counter, histogram::Histogram};

use super::{Context, IO_TIMEOUT, LmMeta, Session, Stream};

/// `MSET` values at least this long, and `SET` values but small ones of `<key>metadata`
/// names (possible LMCache descriptions), are read straight into staging; the others are
/// buffered first.
const STREAM_MIN: usize = 64 << 10;
/// The longest line (a command's array or bulk header, or an inline command).
const MAX_LINE: usize = 64 << 10;
/// The most arguments in one command.
const MAX_ARGS: usize = 1 << 20;
/// The most bytes one command may buffer (its values that are not streamed).
const MAX_COMMAND_BYTES: usize = 512 << 20;
/// Room reserved for a chunk's LMCache description while its bytes wait for it.
const LM_META_ROOM: usize = 1024;
/// The Redis version announced (`HELLO`, `INFO`): the command set follows Redis 7.2.
const REDIS_VERSION: &str = "7.2.0";

/// Settings of the Redis listener.
#[derive(Debug, Clone, Default)]
pub struct RedisSettings {
    /// The password `AUTH` and `HELLO ... AUTH` must give; none: no authentication.
    pub password: Option<String>,
    /// Whether `FLUSHDB` and `FLUSHALL` may empty the cache.
    pub allow_flush: bool,
}

/// What every connection of the listener shares: chunks of LMCache's layout whose bytes
/// wait for their description, by key.
#[derive(Debug, Default)]
pub struct Shared {
    pending: Mutex<HashMap<Vec<u8>, Pending>>,
    next_client: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    session: SessionId,
    id: u64,
    /// The value's length, which its description must state.
    len: u64,
    since: Instant,
}

/// Serves one connection.
pub async fn connection(
    stream: Box<dyn Stream>,
    ctx: Context,
    settings: Arc<RedisSettings>,
    shared: Arc<Shared>,
) {
    let (rd, wr) = tokio::io::split(stream);
    let engine = ctx.ops.engine().clone();
    let id = shared
        .next_client
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    let mut conn = Conn {
        // Small buffers (an idle connection costs about 40 KiB); values bypass them.
        rd: BufReader::with_capacity(16 << 10, rd),
        wr: BufWriter::with_capacity(16 << 10, wr),
        session: Session::new(engine),
        authed: settings.password.is_none(),
        settings,
        shared,
        ctx,
        resp3: false,
        name: None,
        id,
        out: Vec::with_capacity(4096),
        meters: HashMap::new(),
    };
    match conn.run().await {
        Ok(()) => {}
        Err(e) => tracing::info!(error = %e, "redis connection closed"),
    }
    let _ = conn.wr.flush().await;
}

#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer stalled for {0:?} in the middle of a command")]
    Stalled(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the client quit")]
    Quit,
}

async fn within<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, Closed> {
    match super::within(IO_TIMEOUT, f).await {
        Some(r) => Ok(r?),
        None => Err(Closed::Stalled(IO_TIMEOUT)),
    }
}

/// One argument of a command: its bytes, or a value already in staging.
enum Arg {
    Bytes(Vec<u8>),
    /// A `SET` value read into staging under a reservation of `key`; `error` when it could
    /// not be (the value was read and dropped), to be answered once the command is read.
    Staged(Staged),
}

struct Staged {
    session: SessionId,
    id: u64,
    /// The engine key reserved (`<key>` for `<key>kv_bytes`).
    key: Vec<u8>,
    /// Whether it waits for its LMCache description.
    lm: bool,
    /// The value's length.
    len: u64,
}

impl Arg {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Bytes(b) => b,
            Self::Staged(_) => &[],
        }
    }
}

/// How a key of LMCache's layout maps to its engine entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Bytes,
    Meta,
}

fn lm_part(key: &[u8]) -> Option<(&[u8], Part)> {
    if let Some(base) = key.strip_suffix(b"kv_bytes").filter(|b| !b.is_empty()) {
        return Some((base, Part::Bytes));
    }
    key.strip_suffix(b"metadata")
        .filter(|b| !b.is_empty())
        .map(|b| (b, Part::Meta))
}

struct Conn {
    rd: BufReader<ReadHalf<Box<dyn Stream>>>,
    wr: BufWriter<WriteHalf<Box<dyn Stream>>>,
    session: Session,
    settings: Arc<RedisSettings>,
    shared: Arc<Shared>,
    ctx: Context,
    resp3: bool,
    authed: bool,
    name: Option<Vec<u8>>,
    id: u64,
    out: Vec<u8>,
    /// This connection's handles on the request metrics, by command and outcome.
    meters: HashMap<(&'static str, &'static str), (Histogram, Counter)>,
}

// Reply encoding, into `out`.
impl Conn {
    fn simple(&mut self, s: &str) {
        self.out.push(b'+');
        self.out.extend_from_slice(s.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }
    fn error(&mut self, s: &str) {
        self.out.push(b'-');
        // A line break would end the error early.
        self.out.extend(
            s.bytes()
                .map(|c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
        );
        self.out.extend_from_slice(b"\r\n");
    }
    fn int(&mut self, i: i64) {
        self.out.extend_from_slice(format!(":{i}\r\n").as_bytes());
    }
    fn bulk(&mut self, b: &[u8]) {
        self.out
            .extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        self.out.extend_from_slice(b);
        self.out.extend_from_slice(b"\r\n");
    }
    fn nil(&mut self) {
        self.out
            .extend_from_slice(if self.resp3 { b"_\r\n" } else { b"$-1\r\n" });
    }
    fn array(&mut self, n: usize) {
        self.out.extend_from_slice(format!("*{n}\r\n").as_bytes());
    }
    fn map(&mut self, n: usize) {
        if self.resp3 {
            self.out.extend_from_slice(format!("%{n}\r\n").as_bytes());
        } else {
            self.array(2 * n);
        }
    }
    fn ok(&mut self) {
        self.simple("OK");
    }
}

impl Conn {
    async fn run(&mut self) -> Result<(), Closed> {
        let mut stop = self.ctx.stop.clone();
        loop {
            if self.rd.buffer().is_empty() {
                // Nothing more is waiting: answer what was asked so far.
                if !self.out.is_empty() {
                    let out = std::mem::take(&mut self.out);
                    within(self.wr.write_all(&out)).await?;
                    self.out = out;
                    self.out.clear();
                }
                within(self.wr.flush()).await?;
                let more = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                    r = self.rd.fill_buf() => !r?.is_empty(),
                };
                if !more {
                    return Ok(());
                }
            }
            let start = Instant::now();
            let args = match self.read_command().await {
                Ok(a) => a,
                Err(Closed::Protocol(m)) => {
                    self.error(&format!("ERR Protocol error: {m}"));
                    let out = std::mem::take(&mut self.out);
                    let _ = within(self.wr.write_all(&out)).await;
                    self.ctx
                        .metrics
                        .observe_compat("redis", "malformed", "refused", 0.0);
                    return Err(Closed::Protocol(m));
                }
                Err(e) => return Err(e),
            };
            if args.is_empty() {
                continue;
            }
            let name = String::from_utf8_lossy(args[0].bytes()).to_ascii_uppercase();
            let (label, outcome) = self.dispatch(&name, args).await?;
            let ctx = &self.ctx;
            let (seconds, total) = self
                .meters
                .entry((label, outcome))
                .or_insert_with(|| ctx.metrics.compat_meters("redis", label, outcome));
            seconds.observe(start.elapsed().as_secs_f64());
            total.inc();
            if self.out.len() > 1 << 20 {
                let out = std::mem::take(&mut self.out);
                within(self.wr.write_all(&out)).await?;
                self.out = out;
                self.out.clear();
            }
        }
    }

    /// A line without its CRLF.
    async fn line(&mut self) -> Result<Vec<u8>, Closed> {
        // Most lines are already buffered whole: taken from the buffer without a read.
        let held = self.rd.buffer();
        if let Some(end) = held.iter().take(MAX_LINE + 2).position(|&c| c == b'\n') {
            let mut line = held[..end].to_vec();
            self.rd.consume(end + 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        let mut line = Vec::new();
        let mut limited = (&mut self.rd).take(MAX_LINE as u64 + 2);
        let n = within(limited.read_until(b'\n', &mut line)).await?;
        if n == 0 {
            return Err(Closed::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if !line.ends_with(b"\n") {
            return Err(Closed::Protocol(if line.len() > MAX_LINE {
                "line too long".into()
            } else {
                "connection closed in the middle of a line".into()
            }));
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(line)
    }

    fn number(line: &[u8], what: &str) -> Result<i64, Closed> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| Closed::Protocol(format!("invalid {what}")))
    }

    async fn read_command(&mut self) -> Result<Vec<Arg>, Closed> {
        let line = self.line().await?;
        if line.first() != Some(&b'*') {
            // An inline command: words separated by spaces.
            return Ok(line
                .split(|c| c.is_ascii_whitespace())
                .filter(|w| !w.is_empty())
                .map(|w| Arg::Bytes(w.to_vec()))
                .collect());
        }
        let n = Self::number(&line[1..], "multibulk length")?;
        if n <= 0 {
            return Ok(Vec::new());
        }
        if n as usize > MAX_ARGS {
            return Err(Closed::Protocol("invalid multibulk length".into()));
        }
        let max_value = self.ctx.ops.engine().config().limits.max_value;
        let mut args: Vec<Arg> = Vec::with_capacity((n as usize).min(64));
        let mut buffered = 0usize;
        let mut refused: Option<String> = None;
        for i in 0..n as usize {
            let h = self.line().await?;
            if h.first() != Some(&b'$') {
                return Err(Closed::Protocol(format!(
                    "expected '$', got '{}'",
                    h.first().map_or(' ', |&c| c as char)
                )));
            }
            let len = Self::number(&h[1..], "bulk length")?;
            if len < 0 {
                return Err(Closed::Protocol("invalid bulk length".into()));
            }
            let len = len as u64;
            // SET's value and MSET's values are streamed into staging when large.
            let is_set_value = i >= 2
                && ((i == 2 && args[0].bytes().eq_ignore_ascii_case(b"SET"))
                    || (i.is_multiple_of(2) && args[0].bytes().eq_ignore_ascii_case(b"MSET")));
            if len > max_value.max(MAX_LINE as u64) {
                // Too long for any value: read and dropped, the command refused.
                self.drain(len + 2).await?;
                refused.get_or_insert(format!(
                    "ERR argument of {len} bytes is over the agent's largest value ({max_value} bytes)"
                ));
                args.push(Arg::Bytes(Vec::new()));
                continue;
            }
            // `SET`'s value is read straight into staging unless it may be an LMCache
            // description (`<key>metadata`, handled in memory); `MSET`'s values when large
            // (each holds a reservation until the command is read whole).
            let small_ok = i == 2 && !matches!(lm_part(args[1].bytes()), Some((_, Part::Meta)));
            if is_set_value && (len as usize >= STREAM_MIN || small_ok) && refused.is_none() {
                let key = args[i - 1].bytes().to_vec();
                match self.stage(&key, len).await? {
                    Ok(staged) => args.push(Arg::Staged(staged)),
                    Err(msg) => {
                        refused.get_or_insert(msg);
                        args.push(Arg::Bytes(Vec::new()));
                    }
                }
                self.crlf().await?;
                continue;
            }
            buffered += len as usize;
            if buffered > MAX_COMMAND_BYTES {
                return Err(Closed::Protocol("command too large".into()));
            }
            let n = len as usize;
            let b = if let Some(held) = self.rd.buffer().get(..n + 2) {
                // Already read: taken from the buffer without a read.
                if &held[n..] != b"\r\n" {
                    return Err(Closed::Protocol("bulk string not followed by CRLF".into()));
                }
                let b = held[..n].to_vec();
                self.rd.consume(n + 2);
                b
            } else {
                let mut b = vec![0u8; n];
                within(self.rd.read_exact(&mut b)).await?;
                self.crlf().await?;
                b
            };
            args.push(Arg::Bytes(b));
        }
        if let Some(msg) = refused {
            self.abort_staged(&args);
            return Ok(vec![
                Arg::Bytes(b"\0refused".to_vec()),
                Arg::Bytes(msg.into_bytes()),
            ]);
        }
        Ok(args)
    }

    async fn crlf(&mut self) -> Result<(), Closed> {
        let mut t = [0u8; 2];
        within(self.rd.read_exact(&mut t)).await?;
        if &t != b"\r\n" {
            return Err(Closed::Protocol("bulk string not followed by CRLF".into()));
        }
        Ok(())
    }

    async fn drain(&mut self, mut len: u64) -> Result<(), Closed> {
        while len > 0 {
            let buf = within(self.rd.fill_buf()).await?;
            if buf.is_empty() {
                return Err(Closed::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let n = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
            self.rd.consume(n);
            len -= n as u64;
        }
        Ok(())
    }

    /// Reserves a `len`-byte value of `key`: `key` itself, or for `<key>kv_bytes` the entry
    /// `<key>` with room for its description. Returns the reservation and its offset in the
    /// staging area, or the reply of a refusal.
    fn reserve_value(&mut self, key: &[u8], len: u64) -> Result<(Staged, u64), String> {
        let (ekey, lm) = match lm_part(key) {
            Some((base, Part::Bytes)) => (base.to_vec(), true),
            _ => (key.to_vec(), false),
        };
        let room = [0u8; LM_META_ROOM];
        let item = PutItem {
            key: &ekey,
            value_len: len,
            metadata: if lm { &room } else { &[] },
            ttl: None,
            overwrite: true,
        };
        let session = self.session.id().map_err(|e| engine_reply(&e))?;
        match self
            .ctx
            .ops
            .reserve(session, &[item])
            .map_err(|e| engine_reply(&e))?
            .first()
        {
            Some(&Reserved::Space { id, staging_offset }) => Ok((
                Staged {
                    session,
                    id,
                    key: ekey,
                    lm,
                    len,
                },
                staging_offset,
            )),
            _ => Err("ERR the value could not be reserved".into()),
        }
    }

    /// Reserves the value of `key` ([`Self::reserve_value`]) and reads its `len` bytes into
    /// staging. The inner error is the reply of a value that could not be stored (then it
    /// was read and dropped).
    async fn stage(&mut self, key: &[u8], len: u64) -> Result<Result<Staged, String>, Closed> {
        let (staged, offset) = match self.reserve_value(key, len) {
            Ok(r) => r,
            Err(reply) => {
                self.drain(len).await?;
                return Ok(Err(reply));
            }
        };
        let (session, id) = (staged.session, staged.id);
        let engine = self.ctx.ops.engine().clone();
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        let ptr = engine.staging().ptr_at(offset as usize, n);
        // SAFETY: the reserved staging range belongs to this reservation alone until it is
        // committed, aborted or reaped; the read below ends (or the connection is closed and
        // the reservation aborted) within `IO_TIMEOUT` per read, and a value is at most
        // `max_value` long, well inside the reservation timeout for any live peer. `engine`
        // keeps the region mapped.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, n) };
        let deadline = engine.config().limits.reservation_timeout * 3 / 4;
        let read = if let Some(held) = self.rd.buffer().get(..n) {
            // Already read (small values, pipelined): no timer.
            buf.copy_from_slice(held);
            self.rd.consume(n);
            Ok(Ok(n))
        } else {
            tokio::time::timeout(deadline, within(self.rd.read_exact(buf))).await
        };
        match read {
            Ok(Ok(_)) => Ok(Ok(staged)),
            Ok(Err(e)) => {
                let _ = self.ctx.ops.abort(session, &[id]);
                Err(e)
            }
            Err(_) => {
                let _ = self.ctx.ops.abort(session, &[id]);
                Err(Closed::Stalled(deadline))
            }
        }
    }

    fn abort_staged(&self, args: &[Arg]) {
        for a in args {
            if let Arg::Staged(s) = a {
                let _ = self.ctx.ops.abort(s.session, &[s.id]);
            }
        }
    }
}

/// The error reply of an engine refusal.
fn engine_reply(e: &nencache_engine::EngineError) -> String {
    use nencache_engine::EngineError as E;
    match e {
        E::NoSpace { .. } => format!("OOM {e}"),
        _ => format!("ERR {e}"),
    }
}

fn outcome_of(e: &nencache_engine::EngineError) -> &'static str {
    use nencache_engine::EngineError as E;
    match e {
        E::NoSpace { .. } => "no_space",
        E::ValueTooLarge { .. } => "too_large",
        E::InvalidKey { .. } => "invalid_key",
        _ => "error",
    }
}

/// Redis's glob-style pattern matching (`*`, `?`, `[abc]`, `[^a-z]`, `\x`).
#[must_use]
pub fn glob(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star_p, mut star_i) = (usize::MAX, 0);
    while i < s.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star_p = p;
                    star_i = i;
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    i += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&pattern[p..], s[i])
                        && matched
                    {
                        p += next;
                        i += 1;
                        continue;
                    }
                }
                b'\\' if p + 1 < pattern.len() && pattern[p + 1] == s[i] => {
                    p += 2;
                    i += 1;
                    continue;
                }
                b'\\' if p + 1 < pattern.len() => {}
                c if c == s[i] => {
                    p += 1;
                    i += 1;
                    continue;
                }
                _ => {}
            }
        }
        if star_p == usize::MAX {
            return false;
        }
        p = star_p + 1;
        star_i += 1;
        i = star_i;
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Whether `c` is in the class at the start of `pat` (`[...]`), and the class's length.
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut j = 1;
    let negate = pat.get(1) == Some(&b'^');
    if negate {
        j += 1;
    }
    let mut matched = false;
    while j < pat.len() && pat[j] != b']' {
        if pat[j] == b'\\' && j + 1 < pat.len() {
            matched |= pat[j + 1] == c;
            j += 2;
        } else if j + 2 < pat.len() && pat[j + 1] == b'-' && pat[j + 2] != b']' {
            let (lo, hi) = (pat[j].min(pat[j + 2]), pat[j].max(pat[j + 2]));
            matched |= (lo..=hi).contains(&c);
            j += 3;
        } else {
            matched |= pat[j] == c;
            j += 1;
        }
    }
    if j >= pat.len() {
        return None; // an unclosed class matches nothing
    }
    Some((matched != negate, j + 1))
}

mod commands;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_as_redis_does() {
        for (p, s, want) in [
            ("*", "anything", true),
            ("h?llo", "hello", true),
            ("h?llo", "hllo", false),
            ("h*llo", "heeeello", true),
            ("h[ae]llo", "hallo", true),
            ("h[ae]llo", "hillo", false),
            ("h[^e]llo", "hallo", true),
            ("h[^e]llo", "hello", false),
            ("h[a-b]llo", "hbllo", true),
            ("h\\*llo", "h*llo", true),
            ("h\\*llo", "hallo", false),
            ("model@*@bfloat16", "model@1@0@-3c1f@bfloat16", true),
            ("*kv_bytes", "k@1kv_bytes", true),
            ("[abc", "a", false),
            ("", "", true),
            ("", "a", false),
        ] {
            assert_eq!(glob(p.as_bytes(), s.as_bytes()), want, "{p} ~ {s}");
        }
    }

    #[test]
    fn lmcache_key_names_map_to_their_entry() {
        assert_eq!(
            lm_part(b"m@1@0@ab@halfkv_bytes"),
            Some((&b"m@1@0@ab@half"[..], Part::Bytes))
        );
        assert_eq!(
            lm_part(b"m@1@0@ab@halfmetadata"),
            Some((&b"m@1@0@ab@half"[..], Part::Meta))
        );
        assert_eq!(lm_part(b"kv_bytes"), None);
        assert_eq!(lm_part(b"plain"), None);
    }
}
