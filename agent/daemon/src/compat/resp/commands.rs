//! The Redis commands: each parses its arguments, works on the engine and writes its reply.

use std::time::{Duration, Instant};

use nencache_engine::{EngineError, Lease};

use super::{
    Arg, Closed, Conn, LM_META_ROOM, LmMeta, Part, Pending, REDIS_VERSION, Staged, engine_reply,
    glob, lm_part, outcome_of, within,
};
use tokio::io::AsyncWriteExt;

type Done = Result<(&'static str, &'static str), Closed>;

/// A `SET`'s options.
#[derive(Default)]
struct SetOptions {
    ttl: Option<Duration>,
    keep_ttl: bool,
    nx: bool,
    xx: bool,
}

/// The longest expiry accepted, in milliseconds (about 285,000 years): the engine's clock
/// plus it cannot overflow, and `PTTL` can answer it.
const MAX_EXPIRY_MS: u64 = 1 << 53;

/// A positive expiry of `n` seconds (or milliseconds) as a duration; `None` when it is
/// longer than [`MAX_EXPIRY_MS`] (Redis: "invalid expire time").
fn expiry(n: i64, millis: bool) -> Option<Duration> {
    let ms = u64::try_from(n)
        .ok()?
        .checked_mul(if millis { 1 } else { 1000 })?;
    (ms <= MAX_EXPIRY_MS).then(|| Duration::from_millis(ms))
}

/// The argument count of a `CLIENT` subcommand, the subcommand and `CLIENT` included.
fn client_arity(sub: &[u8]) -> usize {
    match sub {
        b"SETNAME" => 3,
        b"SETINFO" => 4,
        _ => 2,
    }
}

/// Values below this are committed on the connection's own thread.
const SMALL_COMMIT: u64 = 4 << 20;

fn parse_int(b: &[u8]) -> Option<i64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

impl Conn {
    pub(super) async fn dispatch(&mut self, name: &str, args: Vec<Arg>) -> Done {
        if name == "\0REFUSED" {
            let msg = String::from_utf8_lossy(args[1].bytes()).into_owned();
            self.error(&msg);
            return Ok(("set", "refused"));
        }
        if !self.authed && !matches!(name, "AUTH" | "HELLO" | "QUIT") {
            self.abort_staged(&args);
            self.error("NOAUTH Authentication required.");
            return Ok(("auth", "refused"));
        }
        let n = args.len();
        let arity = |min: usize, max: usize| (min..=max).contains(&n);
        macro_rules! need {
            ($min:expr, $max:expr, $label:expr) => {
                if !arity($min, $max) {
                    self.abort_staged(&args);
                    self.error(&format!(
                        "ERR wrong number of arguments for '{}' command",
                        name.to_ascii_lowercase()
                    ));
                    return Ok(($label, "refused"));
                }
            };
        }
        match name {
            "PING" => {
                need!(1, 2, "ping");
                if n == 2 {
                    self.bulk(args[1].bytes());
                } else {
                    self.simple("PONG");
                }
                Ok(("ping", "ok"))
            }
            "ECHO" => {
                need!(2, 2, "echo");
                self.bulk(args[1].bytes());
                Ok(("echo", "ok"))
            }
            "QUIT" => {
                self.ok();
                let out = std::mem::take(&mut self.out);
                within(self.wr.write_all(&out)).await?;
                within(self.wr.flush()).await?;
                Err(Closed::Quit)
            }
            "HELLO" => self.hello(&args),
            "AUTH" => {
                need!(2, 3, "auth");
                let pass = args[n - 1].bytes().to_vec();
                let user = (n == 3).then(|| args[1].bytes().to_vec());
                match self.check_auth(user.as_deref(), &pass) {
                    Ok(()) => {
                        self.ok();
                        Ok(("auth", "ok"))
                    }
                    Err(m) => {
                        self.error(&m);
                        Ok(("auth", "refused"))
                    }
                }
            }
            "SELECT" => {
                need!(2, 2, "select");
                if args[1].bytes() == b"0" {
                    self.ok();
                } else {
                    self.error("ERR DB index is out of range");
                }
                Ok(("select", "ok"))
            }
            "GET" => {
                need!(2, 2, "get");
                self.get_values(&args[1..], false).await
            }
            "MGET" => {
                need!(2, usize::MAX, "mget");
                self.get_values(&args[1..], true).await
            }
            "SET" => {
                need!(3, usize::MAX, "set");
                self.set(args).await
            }
            "MSET" => {
                if n < 3 || n.is_multiple_of(2) {
                    self.abort_staged(&args);
                    self.error("ERR wrong number of arguments for 'mset' command");
                    return Ok(("mset", "refused"));
                }
                // Pair by pair, in order; an error stops it (the pairs before stay stored,
                // the values after it that were staged are dropped).
                let mut pairs = args.into_iter().skip(1);
                while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                    let done = match v {
                        Arg::Staged(s) => self.finish_set(s, SetOptions::default()).await,
                        Arg::Bytes(b) => {
                            self.store_bytes(k.bytes(), &b, SetOptions::default()).await
                        }
                    };
                    if let Err(m) = done {
                        self.abort_staged(&pairs.collect::<Vec<_>>());
                        self.error(&m);
                        return Ok(("mset", "error"));
                    }
                }
                self.ok();
                Ok(("mset", "ok"))
            }
            "EXISTS" => {
                need!(2, usize::MAX, "exists");
                let mut count = 0;
                for a in &args[1..] {
                    if self.exists(a.bytes()) {
                        count += 1;
                    }
                }
                self.int(count);
                Ok(("exists", "ok"))
            }
            "DEL" | "UNLINK" => {
                need!(2, usize::MAX, "del");
                let mut count = 0;
                for a in &args[1..] {
                    count += i64::from(self.delete(a.bytes()));
                }
                self.int(count);
                Ok(("del", "ok"))
            }
            "EXPIRE" | "PEXPIRE" => {
                need!(3, 4, "expire");
                self.expire(&args, name == "PEXPIRE").await
            }
            "TTL" | "PTTL" => {
                need!(2, 2, "ttl");
                self.ttl(args[1].bytes(), name == "PTTL").await
            }
            "TYPE" => {
                need!(2, 2, "type");
                let t = if self.exists(args[1].bytes()) {
                    "string"
                } else {
                    "none"
                };
                self.simple(t);
                Ok(("type", "ok"))
            }
            "DBSIZE" => {
                need!(1, 1, "dbsize");
                let entries = self.ctx.ops.engine().stats().entries;
                self.int(entries as i64);
                Ok(("dbsize", "ok"))
            }
            "INFO" => {
                let info = self.info(&args[1..]);
                self.bulk(info.as_bytes());
                Ok(("info", "ok"))
            }
            "SCAN" => {
                need!(2, usize::MAX, "scan");
                self.scan(&args)
            }
            "KEYS" => {
                need!(2, 2, "keys");
                let pattern = args[1].bytes().to_vec();
                let keys = self.walk(|k| glob(&pattern, k));
                self.array(keys.len());
                for k in keys {
                    self.bulk(&k);
                }
                Ok(("keys", "ok"))
            }
            "FLUSHDB" | "FLUSHALL" => {
                need!(1, 2, "flushdb");
                if let Some(mode) = args.get(1).map(Arg::bytes)
                    && !mode.eq_ignore_ascii_case(b"SYNC")
                    && !mode.eq_ignore_ascii_case(b"ASYNC")
                {
                    self.error("ERR syntax error");
                    return Ok(("flushdb", "refused"));
                }
                if !self.settings.allow_flush {
                    self.error(&format!(
                        "ERR {name} is disabled on this agent (compat.redis.allow_flush)"
                    ));
                    return Ok(("flushdb", "refused"));
                }
                let keys = self.walk(|_| true);
                let max = self.ctx.ops.engine().config().limits.max_batch;
                for batch in keys.chunks(max) {
                    let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                    let _ = self.ctx.ops.delete(&refs);
                }
                self.ok();
                Ok(("flushdb", "ok"))
            }
            "CLIENT" => self.client(&args),
            "COMMAND" => {
                match args.get(1).map(|a| a.bytes().to_ascii_uppercase()) {
                    Some(s) if s == b"COUNT" => self.int(0),
                    Some(s) if s == b"DOCS" => self.map(0),
                    _ => self.array(0),
                }
                Ok(("command", "ok"))
            }
            "CONFIG" => {
                match args.get(1).map(|a| a.bytes().to_ascii_uppercase()) {
                    // What clients ask before they start (redis-benchmark: save, appendonly):
                    // the agent persists through its lower tiers, not Redis's files.
                    Some(s) if s == b"GET" => {
                        let known: [(&[u8], &[u8]); 2] = [(b"save", b""), (b"appendonly", b"no")];
                        let asked: Vec<_> = known
                            .iter()
                            .filter(|(name, _)| {
                                args[2..]
                                    .iter()
                                    .any(|a| a.bytes().eq_ignore_ascii_case(name))
                            })
                            .collect();
                        self.map(asked.len());
                        for (name, value) in asked {
                            self.bulk(name);
                            self.bulk(value);
                        }
                    }
                    _ => self.error("ERR only CONFIG GET is supported"),
                }
                Ok(("config", "ok"))
            }
            _ => {
                self.abort_staged(&args);
                let mut msg = format!(
                    "ERR unknown command '{}', with args beginning with:",
                    String::from_utf8_lossy(args[0].bytes())
                );
                for a in args[1..].iter().take(8) {
                    msg.push_str(&format!(" '{}'", String::from_utf8_lossy(a.bytes())));
                }
                self.error(&msg);
                Ok(("unknown", "refused"))
            }
        }
    }

    fn check_auth(&mut self, user: Option<&[u8]>, pass: &[u8]) -> Result<(), String> {
        let Some(want) = &self.settings.password else {
            return Err("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?".into());
        };
        if user.is_some_and(|u| u != b"default") || pass != want.as_bytes() {
            return Err("WRONGPASS invalid username-password pair or user is disabled.".into());
        }
        self.authed = true;
        Ok(())
    }

    fn hello(&mut self, args: &[Arg]) -> Done {
        let mut i = 1;
        let mut proto = if self.resp3 { 3 } else { 2 };
        if let Some(v) = args.get(1) {
            match parse_int(v.bytes()) {
                Some(2) => proto = 2,
                Some(3) => proto = 3,
                _ => {
                    self.error("NOPROTO unsupported protocol version");
                    return Ok(("hello", "refused"));
                }
            }
            i = 2;
        }
        while i < args.len() {
            let opt = args[i].bytes().to_ascii_uppercase();
            if opt == b"AUTH" && i + 2 < args.len() {
                let (u, p) = (args[i + 1].bytes().to_vec(), args[i + 2].bytes().to_vec());
                if let Err(m) = self.check_auth(Some(&u), &p) {
                    self.error(&m);
                    return Ok(("hello", "refused"));
                }
                i += 3;
            } else if opt == b"SETNAME" && i + 1 < args.len() {
                self.name = Some(args[i + 1].bytes().to_vec());
                i += 2;
            } else {
                self.error("ERR Syntax error in HELLO option");
                return Ok(("hello", "refused"));
            }
        }
        if !self.authed {
            self.error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
            return Ok(("hello", "refused"));
        }
        self.resp3 = proto == 3;
        self.map(7);
        self.bulk(b"server");
        self.bulk(b"nencache");
        self.bulk(b"version");
        self.bulk(REDIS_VERSION.as_bytes());
        self.bulk(b"proto");
        self.int(proto);
        self.bulk(b"id");
        self.int(self.id as i64);
        self.bulk(b"mode");
        self.bulk(b"standalone");
        self.bulk(b"role");
        self.bulk(b"master");
        self.bulk(b"modules");
        self.array(0);
        Ok(("hello", "ok"))
    }

    fn client(&mut self, args: &[Arg]) -> Done {
        let sub = args
            .get(1)
            .map(|a| a.bytes().to_ascii_uppercase())
            .unwrap_or_default();
        match sub.as_slice() {
            b"SETNAME" | b"SETINFO" | b"GETNAME" | b"ID" | b"INFO"
                if args.len() != client_arity(&sub) =>
            {
                self.error(&format!(
                    "ERR wrong number of arguments for 'client|{}' command",
                    String::from_utf8_lossy(&sub).to_ascii_lowercase()
                ));
                return Ok(("client", "refused"));
            }
            b"SETNAME" => {
                let name = args[2].bytes();
                // As Redis: a name is printable ASCII without spaces (CLIENT INFO lists it).
                if !name.iter().all(|c| c.is_ascii_graphic()) {
                    self.error(
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                    return Ok(("client", "refused"));
                }
                self.name = (!name.is_empty()).then(|| name.to_vec());
                self.ok();
            }
            b"GETNAME" => match self.name.clone() {
                Some(n) => self.bulk(&n),
                None => self.nil(),
            },
            b"SETINFO" => {
                let attr = args[2].bytes();
                if !(attr.eq_ignore_ascii_case(b"LIB-NAME")
                    || attr.eq_ignore_ascii_case(b"LIB-VER"))
                {
                    self.error(&format!(
                        "ERR Unrecognized option '{}'",
                        String::from_utf8_lossy(attr)
                    ));
                    return Ok(("client", "refused"));
                }
                self.ok();
            }
            b"ID" => self.int(self.id as i64),
            b"INFO" => {
                let name = self.name.clone().unwrap_or_default();
                let line = format!(
                    "id={} name={} db=0 resp={}\n",
                    self.id,
                    String::from_utf8_lossy(&name),
                    if self.resp3 { 3 } else { 2 }
                );
                self.bulk(line.as_bytes());
            }
            _ => {
                self.error(&format!(
                    "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                    String::from_utf8_lossy(&sub)
                ));
                return Ok(("client", "refused"));
            }
        }
        Ok(("client", "ok"))
    }

    fn exists(&self, key: &[u8]) -> bool {
        let found = |k: &[u8]| matches!(self.ctx.ops.lookup(&[k]), Ok(t) if !t.is_empty());
        lm_part(key).is_some_and(|(base, _)| found(base)) || found(key)
    }

    fn delete(&self, key: &[u8]) -> bool {
        let mut any = false;
        if let Some((base, _)) = lm_part(key) {
            if let Some(p) = self.shared.pending.lock().remove(base) {
                let _ = self.ctx.ops.abort(p.session, &[p.id]);
            }
            any |= self.ctx.ops.delete(&[base]).unwrap_or(0) > 0;
        }
        any |= self.ctx.ops.delete(&[key]).unwrap_or(0) > 0;
        any
    }

    /// The engine key `key` addresses: `<key>` for a name of LMCache's layout whose entry
    /// exists, else `key`.
    fn resolve(&self, key: &[u8]) -> Vec<u8> {
        match lm_part(key) {
            Some((base, _)) if matches!(self.ctx.ops.lookup(&[base]), Ok(t) if !t.is_empty()) => {
                base.to_vec()
            }
            _ => key.to_vec(),
        }
    }

    /// A lease on the value `key` names, and which part of an LMCache entry it is.
    async fn fetch(&mut self, key: &[u8]) -> Result<Option<(Lease, Option<Part>)>, EngineError> {
        let session = self.session.id()?;
        if let Some((base, part)) = lm_part(key) {
            let got = self
                .ctx
                .ops
                .get(session, &[base], &[])
                .await?
                .pop()
                .flatten();
            if let Some(l) = got {
                if LmMeta::decode(&l.metadata, l.len).is_some() {
                    return Ok(Some((l, Some(part))));
                }
                let _ = self.ctx.ops.release(session, &[l.id]);
            }
        }
        let got = self
            .ctx
            .ops
            .get(session, &[key], &[])
            .await?
            .pop()
            .flatten();
        Ok(got.map(|l| (l, None)))
    }

    async fn get_values(&mut self, keys: &[Arg], array: bool) -> Done {
        if array {
            self.array(keys.len());
        }
        let mut hits = 0;
        for k in keys {
            match self.fetch(k.bytes()).await {
                Ok(Some((lease, part))) => {
                    hits += 1;
                    self.send_value(&lease, part).await?;
                }
                Ok(None) => self.nil(),
                Err(e) if array => {
                    tracing::debug!(error = %e, "redis MGET of one key failed");
                    self.nil();
                }
                Err(e) => {
                    self.error(&engine_reply(&e));
                    return Ok(("get", outcome_of(&e)));
                }
            }
        }
        let label = if array { "mget" } else { "get" };
        Ok((label, if hits > 0 { "hit" } else { "miss" }))
    }

    /// Writes a leased value as a bulk string (its bytes straight from the arena, or its
    /// LMCache description), then returns the lease.
    async fn send_value(&mut self, lease: &Lease, part: Option<Part>) -> Result<(), Closed> {
        let session = self.session.id().unwrap_or_default();
        let result = if part == Some(Part::Meta) {
            let meta = lease.metadata.clone();
            self.bulk(&meta);
            Ok(())
        } else {
            self.out
                .extend_from_slice(format!("${}\r\n", lease.len).as_bytes());
            let engine = self.ctx.ops.engine().clone();
            let len = usize::try_from(lease.len).unwrap_or(usize::MAX);
            let ptr = engine.arena().ptr_at(lease.offset as usize, len);
            // SAFETY: the lease keeps these arena bytes from being evicted or rewritten until
            // it is returned below, after the write; `engine` keeps the arena mapped.
            let value = unsafe { std::slice::from_raw_parts(ptr.cast_const(), len) };
            if len < 64 << 10 {
                self.out.extend_from_slice(value);
                self.out.extend_from_slice(b"\r\n");
                Ok(())
            } else {
                let out = std::mem::take(&mut self.out);
                let r = async {
                    within(self.wr.write_all(&out)).await?;
                    within(self.wr.write_all(value)).await
                }
                .await;
                self.out = out;
                self.out.clear();
                self.out.extend_from_slice(b"\r\n");
                r
            }
        };
        let _ = self.ctx.ops.release(session, &[lease.id]);
        result
    }

    fn set_options(&mut self, opts: &[Arg]) -> Result<SetOptions, String> {
        let mut o = SetOptions::default();
        let mut i = 0;
        while i < opts.len() {
            let opt = opts[i].bytes().to_ascii_uppercase();
            match opt.as_slice() {
                b"NX" if !o.xx => o.nx = true,
                b"XX" if !o.nx => o.xx = true,
                b"KEEPTTL" if o.ttl.is_none() => o.keep_ttl = true,
                b"EX" | b"PX" if o.ttl.is_none() && !o.keep_ttl && i + 1 < opts.len() => {
                    let ttl = parse_int(opts[i + 1].bytes())
                        .filter(|&v| v > 0)
                        .and_then(|v| expiry(v, opt == b"PX"))
                        .ok_or_else(|| "ERR invalid expire time in 'set' command".to_string())?;
                    o.ttl = Some(ttl);
                    i += 1;
                }
                _ => return Err("ERR syntax error".into()),
            }
            i += 1;
        }
        Ok(o)
    }

    async fn set(&mut self, mut args: Vec<Arg>) -> Done {
        let opts = match self.set_options(&args[3..]) {
            Ok(o) => o,
            Err(m) => {
                self.abort_staged(&args);
                self.error(&m);
                return Ok(("set", "refused"));
            }
        };
        let key = args[1].bytes().to_vec();
        let value = std::mem::replace(&mut args[2], Arg::Bytes(Vec::new()));
        let done = match value {
            Arg::Staged(s) => self.finish_set(s, opts).await,
            Arg::Bytes(b) => self.store_bytes(&key, &b, opts).await,
        };
        match done {
            Ok(true) => {
                self.ok();
                Ok(("set", "ok"))
            }
            Ok(false) => {
                self.nil();
                Ok(("set", "not_set"))
            }
            Err(m) => {
                let outcome = if m.starts_with("OOM") {
                    "no_space"
                } else {
                    "error"
                };
                self.error(&m);
                Ok(("set", outcome))
            }
        }
    }

    /// A `SET` of a value held in memory: `<key>metadata` completes a pending chunk, anything
    /// else goes through staging as a streamed value does.
    async fn store_bytes(
        &mut self,
        key: &[u8],
        value: &[u8],
        opts: SetOptions,
    ) -> Result<bool, String> {
        if let Some((base, Part::Meta)) = lm_part(key) {
            let pending = self.shared.pending.lock().remove(base);
            if let Some(p) = pending {
                return self.complete(p, value, opts.ttl).await;
            }
            if let Some(done) = self.orphan_description(base, value).await? {
                return Ok(done);
            }
        }
        let staged = self.stage_bytes(key, value)?;
        self.finish_set(staged, opts).await
    }

    /// A description of LMCache's layout with no bytes waiting for it. Two writers of one
    /// chunk (two LMCache instances storing a shared prefix) interleave as bytes A, bytes B
    /// (which replaces A), description B (which publishes the entry), description A: the
    /// entry holding that same description makes the last one a no-op (`Some(true)`). A
    /// description that names no entry, or another one, is refused: stored beside nothing,
    /// it would make LMCache count a hit that it cannot load. `None`: not a description
    /// (the `SET` is an ordinary one).
    async fn orphan_description(
        &mut self,
        base: &[u8],
        value: &[u8],
    ) -> Result<Option<bool>, String> {
        if value.len() > LM_META_ROOM || LmMeta::parse(value).is_none() {
            return Ok(None);
        }
        let session = self.session.id().map_err(|e| engine_reply(&e))?;
        let got = self
            .ctx
            .ops
            .get(session, &[base], &[])
            .await
            .map_err(|e| engine_reply(&e))?
            .pop()
            .flatten();
        let same = got.is_some_and(|l| {
            let same = l.metadata == value;
            let _ = self.ctx.ops.release(session, &[l.id]);
            same
        });
        if same {
            return Ok(Some(true));
        }
        Err(format!(
            "ERR no {}kv_bytes waits for this metadata: SET {0}kv_bytes first, then {0}metadata",
            String::from_utf8_lossy(base)
        ))
    }

    fn stage_bytes(&mut self, key: &[u8], value: &[u8]) -> Result<Staged, String> {
        let (staged, offset) = self.reserve_value(key, value.len() as u64)?;
        // SAFETY: the reserved staging range is this reservation's alone.
        unsafe {
            self.ctx
                .ops
                .engine()
                .staging()
                .write(offset as usize, value)
        };
        Ok(staged)
    }

    /// Publishes a staged value under the `SET`'s options (`false`: NX/XX said not to), or,
    /// for `<key>kv_bytes`, holds it until its description comes.
    async fn finish_set(&mut self, s: Staged, opts: SetOptions) -> Result<bool, String> {
        let present = || matches!(self.ctx.ops.lookup(&[&s.key]), Ok(t) if !t.is_empty());
        if (opts.nx && present()) || (opts.xx && !present()) {
            let _ = self.ctx.ops.abort(s.session, &[s.id]);
            return Ok(false);
        }
        let kept = if opts.keep_ttl {
            self.ctx.ops.engine().ttl(&s.key).ok().flatten().flatten()
        } else {
            None
        };
        if let Some(ttl) = opts.ttl.or(kept) {
            self.ctx
                .ops
                .engine()
                .amend_reservation(s.session, s.id, Some(ttl), None)
                .map_err(|e| engine_reply(&e))?;
        }
        if s.lm {
            let old = self.shared.pending.lock().insert(
                s.key.clone(),
                Pending {
                    session: s.session,
                    id: s.id,
                    len: s.len,
                    since: Instant::now(),
                },
            );
            if let Some(old) = old {
                let _ = self.ctx.ops.abort(old.session, &[old.id]);
            }
            self.purge_pending();
            return Ok(true);
        }
        if s.len < SMALL_COMMIT {
            self.ctx.ops.commit_small(s.session, &[(s.id, None)])
        } else {
            self.ctx.ops.commit(s.session, vec![(s.id, None)]).await
        }
        .map_err(|e| engine_reply(&e))?;
        Ok(true)
    }

    /// Completes a chunk of LMCache's layout with its description: both are published as one
    /// entry.
    async fn complete(
        &mut self,
        p: Pending,
        meta: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool, String> {
        if meta.len() > LM_META_ROOM || LmMeta::decode(meta, p.len).is_none() {
            let _ = self.ctx.ops.abort(p.session, &[p.id]);
            return Err(format!(
                "ERR the metadata ({} bytes) does not describe the {}-byte value sent before it; both dropped",
                meta.len(),
                p.len
            ));
        }
        self.ctx
            .ops
            .engine()
            .amend_reservation(p.session, p.id, ttl, Some(meta))
            .map_err(|e| {
                format!("ERR the value this metadata describes is gone ({e}); send both again")
            })?;
        self.ctx
            .ops
            .commit(p.session, vec![(p.id, None)])
            .await
            .map_err(|e| engine_reply(&e))?;
        Ok(true)
    }

    /// Forgets pending chunks whose description never came (their reservations have been
    /// reclaimed by now).
    fn purge_pending(&self) {
        let limit = self.ctx.ops.engine().config().limits.reservation_timeout;
        self.shared
            .pending
            .lock()
            .retain(|_, p| p.since.elapsed() < limit);
    }

    /// Brings `key` into host memory from a lower tier (a read), so that its TTL can be read
    /// or set there.
    async fn promote(&mut self, key: &[u8]) -> bool {
        let Ok(session) = self.session.id() else {
            return false;
        };
        match self.ctx.ops.get(session, &[key], &[]).await {
            Ok(mut v) => match v.pop().flatten() {
                Some(l) => {
                    let _ = self.ctx.ops.release(session, &[l.id]);
                    true
                }
                None => false,
            },
            Err(_) => false,
        }
    }

    async fn expire(&mut self, args: &[Arg], millis: bool) -> Done {
        let Some(n) = parse_int(args[2].bytes()) else {
            self.error("ERR value is not an integer or out of range");
            return Ok(("expire", "refused"));
        };
        if args.len() == 4 {
            self.error("ERR NX, XX, GT and LT options are not supported");
            return Ok(("expire", "refused"));
        }
        let key = self.resolve(args[1].bytes());
        if n <= 0 {
            let gone = self.ctx.ops.delete(&[&key]).unwrap_or(0) > 0;
            self.int(i64::from(gone));
            return Ok(("expire", "ok"));
        }
        let Some(ttl) = expiry(n, millis) else {
            let name = if millis { "pexpire" } else { "expire" };
            self.error(&format!("ERR invalid expire time in '{name}' command"));
            return Ok(("expire", "refused"));
        };
        let engine = self.ctx.ops.engine().clone();
        let mut set = engine.set_ttl(&key, Some(ttl)).unwrap_or(false);
        if !set && self.promote(&key).await {
            set = engine.set_ttl(&key, Some(ttl)).unwrap_or(false);
        }
        self.int(i64::from(set));
        Ok(("expire", "ok"))
    }

    async fn ttl(&mut self, key: &[u8], millis: bool) -> Done {
        let key = self.resolve(key);
        let engine = self.ctx.ops.engine().clone();
        let mut t = engine.ttl(&key).unwrap_or(None);
        if t.is_none() && self.promote(&key).await {
            t = engine.ttl(&key).unwrap_or(None);
        }
        let v = match t {
            None => -2,
            Some(None) => -1,
            Some(Some(d)) => {
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                if millis {
                    ms
                } else {
                    ms.saturating_add(500) / 1000
                }
            }
        };
        self.int(v);
        Ok(("ttl", "ok"))
    }

    fn walk(&self, keep: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let engine = self.ctx.ops.engine();
        let mut out = Vec::new();
        let mut cursor = 0;
        loop {
            let (keys, next) = engine.scan_host(cursor, 4096, &keep);
            out.extend(keys);
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }

    fn scan(&mut self, args: &[Arg]) -> Done {
        let Some(cursor) = parse_int(args[1].bytes()).filter(|&c| c >= 0) else {
            self.error("ERR invalid cursor");
            return Ok(("scan", "refused"));
        };
        let mut pattern = b"*".to_vec();
        let mut count = 10usize;
        let mut i = 2;
        while i + 1 < args.len() {
            match args[i].bytes().to_ascii_uppercase().as_slice() {
                b"MATCH" => pattern = args[i + 1].bytes().to_vec(),
                b"COUNT" => match parse_int(args[i + 1].bytes()).filter(|&c| c > 0) {
                    Some(c) => count = c as usize,
                    None => {
                        self.error("ERR value is not an integer or out of range");
                        return Ok(("scan", "refused"));
                    }
                },
                b"TYPE" => {
                    if !args[i + 1].bytes().eq_ignore_ascii_case(b"string") {
                        pattern = b"\0never".to_vec();
                    }
                }
                _ => {
                    self.error("ERR syntax error");
                    return Ok(("scan", "refused"));
                }
            }
            i += 2;
        }
        if i != args.len() {
            self.error("ERR syntax error");
            return Ok(("scan", "refused"));
        }
        let (keys, next) = self
            .ctx
            .ops
            .engine()
            .scan_host(cursor as u64, count, |k| glob(&pattern, k));
        self.array(2);
        self.bulk(next.to_string().as_bytes());
        self.array(keys.len());
        for k in keys {
            self.bulk(&k);
        }
        Ok(("scan", "ok"))
    }

    /// `INFO [section…]`: the sections asked for (all of them for none, `all`, `default` or
    /// `everything`).
    fn info(&self, sections: &[Arg]) -> String {
        let all = self.info_all();
        let wanted = |title: &str| {
            sections.is_empty()
                || sections.iter().any(|a| {
                    let a = a.bytes();
                    a.eq_ignore_ascii_case(title.as_bytes())
                        || [&b"all"[..], b"default", b"everything"]
                            .iter()
                            .any(|w| a.eq_ignore_ascii_case(w))
                })
        };
        all.split("\r\n\r\n")
            .filter(|part| {
                part.strip_prefix("# ")
                    .and_then(|p| p.split("\r\n").next())
                    .is_some_and(wanted)
            })
            .map(|part| format!("{}\r\n", part.trim_end()))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn info_all(&self) -> String {
        let engine = self.ctx.ops.engine();
        let s = engine.stats();
        let cfg = engine.config();
        let clients = self.ctx.metrics.compat_connections("redis").get();
        let policy = match cfg.host.policy {
            nencache_engine::EvictionPolicy::Lru => "allkeys-lru",
            _ => "allkeys-s3fifo",
        };
        format!(
            "# Server\r\nredis_version:{REDIS_VERSION}\r\nnencache_version:{}\r\nredis_mode:standalone\r\nos:{}\r\narch_bits:64\r\n\r\n\
             # Clients\r\nconnected_clients:{clients}\r\n\r\n\
             # Memory\r\nused_memory:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:{}\r\n\r\n\
             # Stats\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\nevicted_keys:{}\r\nexpired_keys:{}\r\n\r\n\
             # Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            s.used_bytes,
            s.capacity_bytes,
            policy,
            s.hits,
            s.misses,
            s.evictions,
            s.expirations,
            s.entries,
        )
    }
}
