//! The Redis listener against a real agent process: RESP2 and RESP3 written by hand from the
//! protocol's specification, pipelining, LMCache's two-key layout, faults that must end at
//! the connection that made them, and `redis-cli` where it is installed.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::{TestAgent, listener_addr, pattern};

fn agent(extra: &[&str]) -> (TestAgent, String) {
    let mut args = vec!["--redis-tcp", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let a = TestAgent::start(&args);
    let addr = listener_addr(&a, "redis");
    (a, addr)
}

/// A reply, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum R {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    Nil,
    Array(Vec<R>),
    Map(Vec<(R, R)>),
}

fn bulk(s: &str) -> R {
    R::Bulk(s.as_bytes().to_vec())
}

struct Redis {
    rd: BufReader<TcpStream>,
    wr: TcpStream,
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

impl Redis {
    fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self {
            rd: BufReader::new(s.try_clone().unwrap()),
            wr: s,
        }
    }

    fn send(&mut self, args: &[&[u8]]) {
        self.wr.write_all(&encode(args)).unwrap();
    }

    fn cmd(&mut self, args: &[&str]) -> R {
        let a: Vec<&[u8]> = args.iter().map(|s| s.as_bytes()).collect();
        self.send(&a);
        self.reply()
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.rd.read_line(&mut l).unwrap();
        assert!(l.ends_with("\r\n"), "bad line {l:?}");
        l.truncate(l.len() - 2);
        l
    }

    fn reply(&mut self) -> R {
        let l = self.line();
        let (t, rest) = l.split_at(1);
        match t {
            "+" => R::Simple(rest.into()),
            "-" => R::Error(rest.into()),
            ":" => R::Int(rest.parse().unwrap()),
            "_" => R::Nil,
            "$" if rest == "-1" => R::Nil,
            "$" => {
                let n: usize = rest.parse().unwrap();
                let mut b = vec![0u8; n + 2];
                self.rd.read_exact(&mut b).unwrap();
                assert_eq!(&b[n..], b"\r\n");
                b.truncate(n);
                R::Bulk(b)
            }
            "*" => {
                let n: usize = rest.parse().unwrap();
                R::Array((0..n).map(|_| self.reply()).collect())
            }
            "%" => {
                let n: usize = rest.parse().unwrap();
                R::Map((0..n).map(|_| (self.reply(), self.reply())).collect())
            }
            other => panic!("unknown reply type {other:?} in {l:?}"),
        }
    }

    /// Whether the agent closed the connection (EOF or reset, not a timeout).
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.rd.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

#[test]
fn strings_expiry_and_the_keyspace() {
    let (_a, addr) = agent(&[]);
    let mut c = Redis::connect(&addr);
    assert_eq!(c.cmd(&["PING"]), R::Simple("PONG".into()));
    assert_eq!(c.cmd(&["ping", "hi"]), bulk("hi"));
    assert_eq!(c.cmd(&["ECHO", "x y"]), bulk("x y"));
    assert_eq!(c.cmd(&["SELECT", "0"]), R::Simple("OK".into()));
    assert!(matches!(c.cmd(&["SELECT", "1"]), R::Error(e) if e.contains("out of range")));
    assert_eq!(c.cmd(&["GET", "k"]), R::Nil);
    assert_eq!(c.cmd(&["SET", "k", "v1"]), R::Simple("OK".into()));
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v1"));
    assert_eq!(c.cmd(&["SET", "k", "v2", "NX"]), R::Nil);
    assert_eq!(c.cmd(&["SET", "k", "v2", "XX"]), R::Simple("OK".into()));
    assert_eq!(c.cmd(&["SET", "nokey", "v", "XX"]), R::Nil);
    assert_eq!(c.cmd(&["GET", "nokey"]), R::Nil);
    assert_eq!(c.cmd(&["GET", "k"]), bulk("v2"));
    assert_eq!(c.cmd(&["TTL", "k"]), R::Int(-1));
    assert_eq!(c.cmd(&["TTL", "nokey"]), R::Int(-2));
    assert_eq!(
        c.cmd(&["SET", "t", "v", "EX", "100"]),
        R::Simple("OK".into())
    );
    assert!(matches!(c.cmd(&["TTL", "t"]), R::Int(99 | 100)));
    assert_eq!(
        c.cmd(&["SET", "p", "v", "PX", "150"]),
        R::Simple("OK".into())
    );
    assert!(matches!(c.cmd(&["PTTL", "p"]), R::Int(1..=150)));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(c.cmd(&["GET", "p"]), R::Nil, "expired");
    assert_eq!(
        c.cmd(&["SET", "t", "v2", "KEEPTTL"]),
        R::Simple("OK".into())
    );
    assert!(matches!(c.cmd(&["TTL", "t"]), R::Int(98..=100)));
    assert_eq!(c.cmd(&["GET", "t"]), bulk("v2"));
    assert_eq!(c.cmd(&["EXPIRE", "k", "50"]), R::Int(1));
    assert!(matches!(c.cmd(&["TTL", "k"]), R::Int(49 | 50)));
    assert_eq!(c.cmd(&["PEXPIRE", "nokey", "50"]), R::Int(0));
    assert_eq!(c.cmd(&["EXPIRE", "t", "0"]), R::Int(1));
    assert_eq!(c.cmd(&["EXISTS", "t"]), R::Int(0));
    for bad in [
        &["SET", "k", "v", "EX", "0"][..],
        &["SET", "k", "v", "EX", "x"],
        &["SET", "k", "v", "NX", "XX"],
        &["SET", "k", "v", "BOGUS"],
    ] {
        assert!(matches!(c.cmd(bad), R::Error(_)), "{bad:?}");
    }
    assert_eq!(
        c.cmd(&["GET", "k"]),
        bulk("v2"),
        "a refused SET changes nothing"
    );
    assert_eq!(c.cmd(&["MSET", "a", "1", "b", "2"]), R::Simple("OK".into()));
    assert_eq!(
        c.cmd(&["MGET", "a", "missing", "b"]),
        R::Array(vec![bulk("1"), R::Nil, bulk("2")])
    );
    assert_eq!(c.cmd(&["EXISTS", "a", "b", "a", "missing"]), R::Int(3));
    assert_eq!(c.cmd(&["DEL", "a", "missing"]), R::Int(1));
    assert_eq!(c.cmd(&["UNLINK", "b"]), R::Int(1));
    assert_eq!(c.cmd(&["TYPE", "k"]), R::Simple("string".into()));
    assert_eq!(c.cmd(&["DBSIZE"]), R::Int(1));
    for i in 0..30 {
        c.cmd(&["SET", &format!("user:{i}"), "x"]);
    }
    let R::Array(keys) = c.cmd(&["KEYS", "user:1*"]) else {
        panic!()
    };
    assert_eq!(keys.len(), 11);
    // A full SCAN returns every key once, whatever COUNT.
    let mut seen = Vec::new();
    let mut cursor = "0".to_string();
    loop {
        let R::Array(r) = c.cmd(&["SCAN", &cursor, "MATCH", "user:*", "COUNT", "7"]) else {
            panic!()
        };
        let R::Bulk(next) = &r[0] else { panic!() };
        let R::Array(keys) = &r[1] else { panic!() };
        seen.extend(keys.iter().cloned());
        cursor = String::from_utf8(next.clone()).unwrap();
        if cursor == "0" {
            break;
        }
    }
    assert_eq!(seen.len(), 30);
    // COUNT counts keys, not table slots: 31 keys in a 64 MiB arena, one call.
    let R::Array(r) = c.cmd(&["SCAN", "0", "COUNT", "40"]) else {
        panic!()
    };
    assert_eq!(r[0], bulk("0"));
    // Expiries too long for the clock are refused, and nothing changes.
    for bad in [
        &["SET", "k", "v", "EX", "9999999999999999"][..],
        &["SET", "k", "v", "PX", "9223372036854775807"],
        &["EXPIRE", "k", "9223372036854775807"],
        &["PEXPIRE", "k", "9223372036854775807"],
    ] {
        assert!(
            matches!(c.cmd(bad), R::Error(e) if e.contains("invalid expire time")),
            "{bad:?}"
        );
    }
    assert!(matches!(c.cmd(&["TTL", "k"]), R::Int(49 | 50)));
    assert_eq!(c.cmd(&["EXPIRE", "k", "99999999999"]), R::Int(1));
    assert_eq!(c.cmd(&["TTL", "k"]), R::Int(99_999_999_999));
    assert!(matches!(
        c.cmd(&["PTTL", "k"]),
        R::Int(99_999_999_000..=99_999_999_999_000)
    ));
    assert!(matches!(c.cmd(&["DBSIZE", "x"]), R::Error(e) if e.contains("wrong number")));
    assert!(matches!(c.cmd(&["FLUSHALL", "BOGUS"]), R::Error(_)));
    let R::Bulk(info) = c.cmd(&["INFO", "memory"]) else {
        panic!()
    };
    let info = String::from_utf8(info).unwrap();
    assert!(
        info.starts_with("# Memory\r\n") && !info.contains("# Server"),
        "{info}"
    );
    let R::Bulk(info) = c.cmd(&["INFO"]) else {
        panic!()
    };
    let info = String::from_utf8(info).unwrap();
    assert!(
        info.contains("redis_version:") && info.contains("db0:keys=31"),
        "{info}"
    );
    assert!(matches!(c.cmd(&["FLUSHDB"]), R::Error(e) if e.contains("disabled")));
    assert_eq!(
        c.cmd(&["FOO", "bar"]),
        R::Error("ERR unknown command 'FOO', with args beginning with: 'bar'".into())
    );
    assert!(matches!(c.cmd(&["GET"]), R::Error(e) if e.contains("wrong number")));
    assert_eq!(c.cmd(&["CLIENT", "SETNAME", "me"]), R::Simple("OK".into()));
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), bulk("me"));
    assert_eq!(
        c.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "x"]),
        R::Simple("OK".into())
    );
    for bad in [
        &["CLIENT", "SETNAME", "a b"][..],
        &["CLIENT", "SETNAME"],
        &["CLIENT", "SETINFO", "bogus", "x"],
    ] {
        assert!(matches!(c.cmd(bad), R::Error(_)), "{bad:?}");
    }
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), bulk("me"));
    assert_eq!(c.cmd(&["COMMAND", "DOCS"]), R::Array(vec![]));
    assert_eq!(c.cmd(&["QUIT"]), R::Simple("OK".into()));
    assert!(c.closed());
}

#[test]
fn resp3_after_hello_and_a_password() {
    let (_a, addr) = agent(&["--redis-password", "s3cret", "--redis-allow-flush"]);
    let mut c = Redis::connect(&addr);
    assert_eq!(
        c.cmd(&["GET", "k"]),
        R::Error("NOAUTH Authentication required.".into())
    );
    assert!(matches!(c.cmd(&["HELLO", "3"]), R::Error(e) if e.starts_with("NOAUTH")));
    assert!(matches!(c.cmd(&["AUTH", "wrong"]), R::Error(e) if e.starts_with("WRONGPASS")));
    assert!(matches!(c.cmd(&["HELLO", "4"]), R::Error(e) if e.starts_with("NOPROTO")));
    let R::Map(hello) = c.cmd(&["HELLO", "3", "AUTH", "default", "s3cret", "SETNAME", "n"]) else {
        panic!()
    };
    assert!(hello.contains(&(bulk("proto"), R::Int(3))));
    assert_eq!(c.cmd(&["GET", "k"]), R::Nil);
    assert_eq!(c.cmd(&["CLIENT", "GETNAME"]), bulk("n"));
    c.cmd(&["SET", "k", "v"]);
    assert_eq!(
        c.cmd(&["MGET", "k", "x"]),
        R::Array(vec![bulk("v"), R::Nil])
    );
    assert_eq!(
        c.cmd(&["CONFIG", "GET", "SAVE", "maxclients"]),
        R::Map(vec![(bulk("save"), bulk(""))])
    );
    assert_eq!(c.cmd(&["FLUSHALL"]), R::Simple("OK".into()));
    assert_eq!(c.cmd(&["DBSIZE"]), R::Int(0));
    // Back to RESP2 on the same connection.
    let R::Array(_) = c.cmd(&["HELLO", "2"]) else {
        panic!()
    };
    assert_eq!(c.cmd(&["GET", "k"]), R::Nil);
    // AUTH on another connection, RESP2 throughout.
    let mut d = Redis::connect(&addr);
    assert_eq!(c.cmd(&["PING"]), R::Simple("PONG".into()));
    assert_eq!(d.cmd(&["AUTH", "s3cret"]), R::Simple("OK".into()));
    assert_eq!(
        d.cmd(&["AUTH", "default", "s3cret"]),
        R::Simple("OK".into())
    );
}

#[test]
fn pipelined_commands_are_answered_in_order() {
    let (_a, addr) = agent(&[]);
    let mut c = Redis::connect(&addr);
    let mut batch = Vec::new();
    for i in 0..500 {
        batch.extend(encode(&[
            b"SET",
            format!("k{i}").as_bytes(),
            &pattern(i, 100 + i as usize),
        ]));
        batch.extend(encode(&[b"GET", format!("k{i}").as_bytes()]));
    }
    batch.extend(b"PING\r\n"); // an inline command in the stream
    c.wr.write_all(&batch).unwrap();
    for i in 0..500 {
        assert_eq!(c.reply(), R::Simple("OK".into()));
        assert_eq!(c.reply(), R::Bulk(pattern(i, 100 + i as usize)));
    }
    assert_eq!(c.reply(), R::Simple("PONG".into()));
}

#[test]
fn large_values_round_trip_through_staging() {
    let (_a, addr) = agent(&["--host-capacity", "128MiB"]);
    let mut c = Redis::connect(&addr);
    for (i, len) in [65_535usize, 65_536, 1 << 20, 32 << 20]
        .into_iter()
        .enumerate()
    {
        let v = pattern(i as u64 + 7, len);
        c.send(&[b"SET", b"big", &v, b"EX", b"1000"]);
        assert_eq!(c.reply(), R::Simple("OK".into()), "{len}");
        c.send(&[b"GET", b"big"]);
        assert_eq!(c.reply(), R::Bulk(v), "{len}");
        assert!(matches!(c.cmd(&["TTL", "big"]), R::Int(999 | 1000)));
    }
    // NX on a streamed value that exists: nothing changes.
    c.send(&[b"SET", b"big", &pattern(1, 100_000), b"NX"]);
    assert_eq!(c.reply(), R::Nil);
    c.send(&[b"GET", b"big"]);
    assert_eq!(c.reply(), R::Bulk(pattern(10, 32 << 20)));
    // MSET streams its large values too.
    let (v1, v2) = (pattern(20, 1 << 20), pattern(21, 3 << 20));
    c.send(&[b"MSET", b"m1", &v1, b"small", b"s", b"m2", &v2]);
    assert_eq!(c.reply(), R::Simple("OK".into()));
    c.send(&[b"MGET", b"m1", b"small", b"m2"]);
    assert_eq!(
        c.reply(),
        R::Array(vec![R::Bulk(v1.clone()), bulk("s"), R::Bulk(v2)])
    );
    // More than the staging area (32 MiB here) in one MSET: refused whole, nothing stored,
    // and the connection goes on.
    let v = pattern(22, 12 << 20);
    c.send(&[b"MSET", b"m1", &v, b"m3", &v, b"m4", &v]);
    assert!(matches!(c.reply(), R::Error(e) if e.starts_with("OOM")));
    assert_eq!(c.cmd(&["EXISTS", "m3", "m4"]), R::Int(0));
    c.send(&[b"GET", b"m1"]);
    assert_eq!(c.reply(), R::Bulk(v1));
}

#[test]
fn lmcaches_two_keys_are_one_entry_committed_with_its_description() {
    let (_a, addr) = agent(&[]);
    let key = "m@1@0@-7a21c2fdc56b6a51@bfloat16";
    let value = pattern(3, 200_000);
    let mut meta = Vec::new();
    for v in [200_000i32, 1, 3, 2, 4, 25_000, 1] {
        meta.extend_from_slice(&v.to_le_bytes());
    }
    let mut a = Redis::connect(&addr);
    let mut b = Redis::connect(&addr);
    a.send(&[b"SET", format!("{key}kv_bytes").as_bytes(), &value]);
    assert_eq!(a.reply(), R::Simple("OK".into()));
    // Not visible until its description comes, on whatever connection.
    assert_eq!(b.cmd(&["EXISTS", &format!("{key}metadata")]), R::Int(0));
    assert_eq!(b.cmd(&["GET", &format!("{key}kv_bytes")]), R::Nil);
    b.send(&[b"SET", format!("{key}metadata").as_bytes(), &meta]);
    assert_eq!(b.reply(), R::Simple("OK".into()));
    assert_eq!(a.cmd(&["EXISTS", &format!("{key}metadata")]), R::Int(1));
    a.send(&[b"GET", format!("{key}metadata").as_bytes()]);
    assert_eq!(a.reply(), R::Bulk(meta.clone()));
    a.send(&[b"GET", format!("{key}kv_bytes").as_bytes()]);
    assert_eq!(a.reply(), R::Bulk(value.clone()));
    // One entry: the keyspace shows its base key.
    assert_eq!(a.cmd(&["DBSIZE"]), R::Int(1));
    assert_eq!(a.cmd(&["KEYS", "*"]), R::Array(vec![bulk(key)]));
    // A description that does not match the bytes drops both.
    let other = "m@1@0@12@bfloat16";
    a.send(&[b"SET", format!("{other}kv_bytes").as_bytes(), b"short"]);
    assert_eq!(a.reply(), R::Simple("OK".into()));
    a.send(&[b"SET", format!("{other}metadata").as_bytes(), &meta]);
    assert!(matches!(a.reply(), R::Error(e) if e.contains("does not describe")));
    assert_eq!(a.cmd(&["EXISTS", &format!("{other}metadata")]), R::Int(0));
    // Two writers of one chunk interleaved: bytes A, bytes B, description B, description A.
    // The last description finds the entry holding it: a no-op, no second key.
    let shared = "m@1@0@77@bfloat16";
    for c in [&mut a, &mut b] {
        c.send(&[b"SET", format!("{shared}kv_bytes").as_bytes(), &value]);
        assert_eq!(c.reply(), R::Simple("OK".into()));
    }
    for c in [&mut b, &mut a] {
        c.send(&[b"SET", format!("{shared}metadata").as_bytes(), &meta]);
        assert_eq!(c.reply(), R::Simple("OK".into()));
    }
    assert_eq!(a.cmd(&["KEYS", "m@1@0@77*"]), R::Array(vec![bulk(shared)]));
    a.send(&[b"GET", format!("{shared}kv_bytes").as_bytes()]);
    assert_eq!(a.reply(), R::Bulk(value.clone()));
    // A description with no bytes and no entry, or of another entry, is refused, and
    // stores nothing that EXISTS could find.
    let mut described = meta.clone();
    described[8..12].copy_from_slice(&9i32.to_le_bytes());
    for (name, m) in [("m@1@0@78@bfloat16", &meta), (shared, &described)] {
        a.send(&[b"SET", format!("{name}metadata").as_bytes(), m]);
        assert!(matches!(a.reply(), R::Error(e) if e.contains("kv_bytes first")));
    }
    assert_eq!(a.cmd(&["EXISTS", "m@1@0@78@bfloat16metadata"]), R::Int(0));
    a.send(&[b"GET", format!("{shared}metadata").as_bytes()]);
    assert_eq!(a.reply(), R::Bulk(meta.clone()));
    // A name ending in metadata with a value that is no description (or is too large to be
    // one: over 1,024 bytes) is an ordinary key.
    assert_eq!(
        a.cmd(&["SET", "notes-metadata", "hello"]),
        R::Simple("OK".into())
    );
    let mut long = vec![0u8; 8 + 20 * 60];
    long[..4].copy_from_slice(&100i32.to_le_bytes());
    a.send(&[b"SET", b"m@1@0@79@bfloat16metadata", &long]);
    assert_eq!(a.reply(), R::Simple("OK".into()));
    assert_eq!(a.cmd(&["EXISTS", "m@1@0@79@bfloat16metadata"]), R::Int(1));
    assert_eq!(a.cmd(&["GET", "notes-metadata"]), bulk("hello"));
    // Deleting either name deletes the entry.
    assert_eq!(a.cmd(&["DEL", &format!("{key}kv_bytes")]), R::Int(1));
    assert_eq!(a.cmd(&["EXISTS", &format!("{key}metadata")]), R::Int(0));
}

#[test]
fn faults_close_only_the_connection_that_made_them() {
    let (_a, addr) = agent(&["--max-value", "1MiB"]);
    let mut good = Redis::connect(&addr);
    good.cmd(&["SET", "kept", "yes"]);

    // Malformed frames get a protocol error and a closed connection.
    for bad in [
        &b"*2\r\n$3\r\nGET\r\n:5\r\n"[..],
        b"*1\r\n$-5\r\n",
        b"*x\r\n",
        b"*2\r\n$3\r\nGETxx$1\r\nk\r\n",
    ] {
        let mut c = Redis::connect(&addr);
        c.wr.write_all(bad).unwrap();
        assert!(
            matches!(c.reply(), R::Error(e) if e.starts_with("ERR Protocol error")),
            "{bad:?}"
        );
        assert!(c.closed());
    }
    // An over-long line, and a bulk string over the largest value (read and refused).
    let mut c = Redis::connect(&addr);
    c.wr.write_all(&vec![b'a'; 70_000]).unwrap();
    assert!(matches!(c.reply(), R::Error(e) if e.contains("too long")));
    let mut c = Redis::connect(&addr);
    c.send(&[b"SET", b"huge", &vec![1u8; (1 << 20) + 1]]);
    assert!(matches!(c.reply(), R::Error(e) if e.contains("largest value")));
    assert_eq!(c.cmd(&["GET", "huge"]), R::Nil);
    assert_eq!(c.cmd(&["PING"]), R::Simple("PONG".into()), "still in step");
    // A client that goes away in the middle of a streamed value: nothing is published.
    let mut c = Redis::connect(&addr);
    c.wr.write_all(b"*3\r\n$3\r\nSET\r\n$4\r\ngone\r\n$500000\r\n")
        .unwrap();
    c.wr.write_all(&[5u8; 200_000]).unwrap();
    drop(c);
    // 1,000 idle connections.
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    assert_eq!(good.cmd(&["GET", "kept"]), bulk("yes"));
    assert_eq!(good.cmd(&["GET", "gone"]), R::Nil);
    drop(idle);
}

#[test]
fn redis_cli_speaks_to_it() {
    let Ok(out) = std::process::Command::new("redis-cli")
        .arg("--version")
        .output()
    else {
        eprintln!("skipped: redis-cli is not installed (Debian's redis-tools)");
        return;
    };
    assert!(out.status.success());
    let (_a, addr) = agent(&[]);
    let (host, port) = addr.rsplit_once(':').unwrap();
    let cli = |args: &[&str], input: Option<&[u8]>| {
        let mut cmd = std::process::Command::new("redis-cli");
        cmd.args(["-h", host, "-p", port]).args(args);
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        if let Some(i) = input {
            child.stdin.take().unwrap().write_all(i).unwrap();
        } else {
            drop(child.stdin.take());
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        out.stdout
    };
    assert_eq!(cli(&["PING"], None), b"PONG\n");
    assert_eq!(cli(&["SET", "a", "hello"], None), b"OK\n");
    assert_eq!(cli(&["GET", "a"], None), b"hello\n");
    let v = pattern(9, 300_000);
    let hexed: Vec<u8> = v.iter().map(|b| b % 26 + b'a').collect();
    assert_eq!(cli(&["-x", "SET", "big"], Some(&hexed)), b"OK\n");
    let mut got = cli(&["GET", "big"], None);
    assert_eq!(got.pop(), Some(b'\n'));
    assert_eq!(got, hexed);
    assert!(cli(&["-3", "HELLO", "3"], None).starts_with(b"server nencache\nversion "));
    assert_eq!(cli(&["--scan", "--pattern", "b*"], None), b"big\n");
}

#[test]
fn a_chunk_put_through_one_protocol_is_found_through_the_other() {
    let a = TestAgent::start(&["--redis-tcp", "127.0.0.1:0", "--lm-tcp", "127.0.0.1:0"]);
    let (raddr, laddr) = (listener_addr(&a, "redis"), listener_addr(&a, "lm"));
    use nencache_agent::compat::lm::{REPLY_LEN, Reply, Request, SUCCESS, command};
    let mut lm = TcpStream::connect(&laddr).unwrap();
    let mut r = Redis::connect(&raddr);
    let value = pattern(11, 100_000);
    let put = Request {
        command: command::PUT,
        length: value.len() as i32,
        fmt: 1,
        dtype: 3,
        location: 0,
        shape: [2, 2, 25_000, 1],
        key: b"via-lm".to_vec(),
    };
    lm.write_all(&put.encode()).unwrap();
    lm.write_all(&value).unwrap();
    // The HEALTH reply orders the PUT before the reads below.
    let health = Request {
        command: command::HEALTH,
        length: 0,
        key: Vec::new(),
        ..put.clone()
    };
    lm.write_all(&health.encode()).unwrap();
    let mut h = [0u8; REPLY_LEN];
    lm.read_exact(&mut h).unwrap();
    r.send(&[b"GET", b"via-lmkv_bytes"]);
    assert_eq!(r.reply(), R::Bulk(value.clone()));
    let mut meta = Vec::new();
    for v in [100_000i32, 1, 3, 2, 2, 25_000, 1] {
        meta.extend_from_slice(&v.to_le_bytes());
    }
    r.send(&[b"GET", b"via-lmmetadata"]);
    assert_eq!(r.reply(), R::Bulk(meta.clone()));
    // And the other way.
    r.send(&[b"SET", b"via-rediskv_bytes", &value]);
    assert_eq!(r.reply(), R::Simple("OK".into()));
    r.send(&[b"SET", b"via-redismetadata", &meta]);
    assert_eq!(r.reply(), R::Simple("OK".into()));
    let get = Request {
        command: command::GET,
        length: 0,
        key: b"via-redis".to_vec(),
        ..put
    };
    lm.write_all(&get.encode()).unwrap();
    lm.read_exact(&mut h).unwrap();
    let reply = Reply::decode(&h);
    assert_eq!(
        (reply.code, reply.length, reply.dtype, reply.shape),
        (SUCCESS, 100_000, 3, [2, 2, 25_000, 1])
    );
    let mut got = vec![0u8; 100_000];
    lm.read_exact(&mut got).unwrap();
    assert_eq!(got, value);
}
