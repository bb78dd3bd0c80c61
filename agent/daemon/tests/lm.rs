//! The `lm://` listener against a real agent process, spoken to with our own client code
//! written from the specification (`docs/api.md`): round trips, what LMCache's client
//! relies on, and every fault ending at the connection that caused it.

#![allow(clippy::unwrap_used)]

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use common::{TestAgent, listener_addr, pattern};
use nencache_agent::compat::lm::{FAIL, REPLY_LEN, Reply, Request, SUCCESS, command};

fn lm_addr(agent: &TestAgent) -> String {
    listener_addr(agent, "lm")
}

fn agent(extra: &[&str]) -> (TestAgent, String) {
    let mut args = vec!["--lm-tcp", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let a = TestAgent::start(&args);
    let addr = lm_addr(&a);
    (a, addr)
}

struct Lm(TcpStream);

fn req(cmd: i32, key: &str, length: i32) -> Request {
    Request {
        command: cmd,
        length,
        fmt: 1,
        dtype: if cmd == command::PUT { 3 } else { 2 },
        location: 0,
        shape: if cmd == command::PUT {
            [2, 4, length / 16, 2]
        } else {
            [0; 4]
        },
        key: key.as_bytes().to_vec(),
    }
}

impl Lm {
    fn connect(addr: &str) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self(s)
    }

    fn put(&mut self, key: &str, value: &[u8]) {
        let r = req(command::PUT, key, value.len() as i32);
        self.0.write_all(&r.encode()).unwrap();
        self.0.write_all(value).unwrap();
    }

    fn reply(&mut self) -> Reply {
        let mut b = [0u8; REPLY_LEN];
        self.0.read_exact(&mut b).unwrap();
        Reply::decode(&b)
    }

    fn get(&mut self, key: &str) -> Option<(Reply, Vec<u8>)> {
        self.0
            .write_all(&req(command::GET, key, 0).encode())
            .unwrap();
        let r = self.reply();
        if r.code != SUCCESS {
            assert_eq!(r, Reply::empty(FAIL));
            return None;
        }
        let mut v = vec![0u8; r.length as usize];
        self.0.read_exact(&mut v).unwrap();
        Some((r, v))
    }

    fn exists(&mut self, key: &str) -> bool {
        self.0
            .write_all(&req(command::EXIST, key, 0).encode())
            .unwrap();
        let r = self.reply();
        assert_eq!(r.length, 0);
        r.code == SUCCESS
    }

    fn health(&mut self) -> i32 {
        self.0
            .write_all(&req(command::HEALTH, "", 0).encode())
            .unwrap();
        self.reply().code
    }

    fn list(&mut self) -> Vec<String> {
        self.0
            .write_all(&req(command::LIST, "", 0).encode())
            .unwrap();
        let r = self.reply();
        assert_eq!(r.code, SUCCESS);
        let mut v = vec![0u8; r.length as usize];
        self.0.read_exact(&mut v).unwrap();
        String::from_utf8(v)
            .unwrap()
            .split('\n')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Whether the agent closed this connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn puts_and_gets_round_trip_with_their_tensor_description() {
    let (a, addr) = agent(&[]);
    let mut c = Lm::connect(&addr);
    assert_eq!(c.health(), SUCCESS);
    let key = "meta-llama/Llama-3.1-8B-Instruct@1@0@-3c1f0e2a9b@bfloat16";
    let value = pattern(1, 1 << 20);
    assert!(!c.exists(key));
    assert!(c.get(key).is_none());
    c.put(key, &value);
    assert!(c.exists(key));
    let (r, got) = c.get(key).unwrap();
    assert_eq!(got, value);
    assert_eq!(
        (r.code, r.length, r.fmt, r.dtype, r.shape, r.location),
        (SUCCESS, 1 << 20, 1, 3, [2, 4, 65536, 2], 0)
    );
    // A key of exactly 150 bytes (no padding at all), and a value of zero bytes.
    let long = "k".repeat(150);
    c.put(&long, b"");
    c.put("small", b"abc");
    assert_eq!(c.get(&long).unwrap().1, b"");
    assert_eq!(c.get("small").unwrap().1, b"abc");
    // A PUT replaces, as LMCache's server does.
    c.put("small", b"defg");
    assert_eq!(c.get("small").unwrap().1, b"defg");
    let mut keys = c.list();
    keys.sort();
    let mut want = vec![long.clone(), key.to_owned(), "small".to_owned()];
    want.sort();
    assert_eq!(keys, want);
    let metrics = a.http("/metrics");
    assert!(
        metrics.contains("compat_requests_total{protocol=\"lm\",command=\"put\",outcome=\"ok\"} 4"),
        "{metrics}"
    );
    assert!(metrics.contains("protocol=\"lm\",command=\"get\",outcome=\"hit\""));
    assert!(metrics.contains("compat_connections{protocol=\"lm\"} 1"));
}

#[test]
fn values_of_other_clients_are_misses_not_garbage() {
    let (a, addr) = agent(&[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = a.client().await;
        client
            .put(b"native", b"not a tensor", b"json")
            .await
            .unwrap();
    });
    let mut c = Lm::connect(&addr);
    assert!(c.exists("native"));
    assert!(c.get("native").is_none());
}

#[test]
fn faults_close_only_the_connection_that_made_them() {
    let (a, addr) = agent(&["--max-value", "1MiB"]);
    let mut good = Lm::connect(&addr);
    good.put("kept", &pattern(2, 4096));

    // A header cut short, then silence until the peer closes.
    let mut c = Lm::connect(&addr);
    c.0.write_all(&req(command::GET, "kept", 0).encode()[..100])
        .unwrap();
    c.0.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.closed());

    // A value shorter than declared, then the peer goes away: nothing is published.
    let mut c = Lm::connect(&addr);
    c.0.write_all(&req(command::PUT, "short", 8192).encode())
        .unwrap();
    c.0.write_all(&[7u8; 5000]).unwrap();
    drop(c);

    // A value longer than declared: the extra bytes are the next header, which is garbage.
    let mut c = Lm::connect(&addr);
    c.0.write_all(&req(command::PUT, "long", 16).encode())
        .unwrap();
    c.0.write_all(&[9u8; 16 + REQUEST_TAIL]).unwrap();
    assert!(c.closed());

    // A negative length, and an unknown command.
    for r in [req(command::PUT, "neg", -5), req(99, "x", 0)] {
        let mut c = Lm::connect(&addr);
        c.0.write_all(&r.encode()).unwrap();
        assert!(c.closed());
    }

    // A value over the maximum is read and dropped: the connection stays in step.
    let mut c = Lm::connect(&addr);
    c.put("big", &pattern(3, (1 << 20) + 1));
    assert!(c.get("big").is_none());
    c.put("after-big", b"fine");
    assert_eq!(c.get("after-big").unwrap().1, b"fine");
    // An empty key is refused the same way.
    c.put("", b"nothing");
    assert!(c.get("").is_none());

    // Others kept working, and nothing committed was lost or half-written.
    assert_eq!(good.get("kept").unwrap().1, pattern(2, 4096));
    assert_eq!(good.get("long").unwrap().1, vec![9u8; 16]);
    for k in ["short", "neg", "x"] {
        assert!(good.get(k).is_none(), "{k}");
    }
    let mut fresh = Lm::connect(&addr);
    assert_eq!(fresh.health(), SUCCESS);
    assert!(a.log().contains("header cut short"));
}

/// Bytes that make a full (garbage) request header after a 16-byte value.
const REQUEST_TAIL: usize = nencache_agent::compat::lm::REQUEST_LEN;

#[test]
fn a_value_larger_than_the_tier_can_hold_is_dropped_and_the_connection_goes_on() {
    let (a, addr) = agent(&["--host-capacity", "4MiB", "--max-value", "4MiB"]);
    let mut c = Lm::connect(&addr);
    // The largest value accepted, but with its key and metadata it needs more pages than
    // the whole arena has.
    c.put("huge", &pattern(4, 4 << 20));
    c.put("next", b"ok");
    assert_eq!(c.get("next").unwrap().1, b"ok");
    assert!(c.get("huge").is_none());
    let metrics = a.http("/metrics");
    assert!(
        metrics.contains("command=\"put\",outcome=\"no_space\"} 1"),
        "{metrics}"
    );
}

#[test]
fn a_thousand_idle_connections_hold_no_sessions_and_block_no_one() {
    let (a, addr) = agent(&[]);
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let mut c = Lm::connect(&addr);
    c.put("busy", &pattern(5, 100_000));
    assert_eq!(c.get("busy").unwrap().1, pattern(5, 100_000));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sessions = rt.block_on(async { a.client().await.stats().await.unwrap().sessions });
    assert!(sessions < 10, "{sessions} sessions open");
    drop(idle);
}

#[test]
fn concurrent_connections_each_see_their_own_requests_in_order() {
    let (_a, addr) = agent(&[]);
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut c = Lm::connect(&addr);
                for i in 0..40 {
                    let key = format!("t{t}-k{i}");
                    let v = pattern(t * 1000 + i, 1000 + (i as usize) * 517);
                    c.put(&key, &v);
                    assert!(c.exists(&key));
                    assert_eq!(c.get(&key).unwrap().1, v, "{key}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn persisted_chunks_are_found_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/agent.sock");
    let t2 = dir.path().join("cache.t2");
    let t2 = t2.to_str().unwrap().to_owned();
    let mut a = TestAgent::start_at(
        dir,
        socket,
        &[
            "--lm-tcp",
            "127.0.0.1:0",
            "--nvme-path",
            &t2,
            "--nvme-size",
            "64MiB",
        ],
    );
    let addr = lm_addr(&a);
    let mut c = Lm::connect(&addr);
    let value = pattern(6, 300_000);
    c.put("persist-me", &value);
    assert!(c.exists("persist-me"));
    drop(c);
    assert!(a.terminate().success());
    // A new process, a new port: the chunk comes back from the lower tier.
    let log = a.dir.path().join("agent.log");
    std::fs::remove_file(&log).unwrap();
    a.kill_and_restart();
    let addr = lm_addr(&a);
    let mut c = Lm::connect(&addr);
    let (r, got) = c.get("persist-me").unwrap();
    assert_eq!(got, value);
    assert_eq!(r.dtype, 3);
}

/// `nencache lmcache convert` on an LMCache configuration, and an agent started from what
/// it wrote: LMCache's disk becomes the agent's NVMe tier and the lm:// listener serves.
#[test]
fn a_converted_lmcache_configuration_runs_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let lmc = dir.path().join("lmc");
    let src = dir.path().join("lmcache.yaml");
    std::fs::write(
        &src,
        format!(
            "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 0.25\n\
             local_disk: file://{}/\nmax_local_disk_size: 0.125\nremote_serde: naive\n",
            lmc.display()
        ),
    )
    .unwrap();
    let out = dir.path().join("out");
    let convert = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nencache"))
            .args(["lmcache", "convert", src.to_str().unwrap()])
            .args(["--lm-listen", "127.0.0.1:0", "--ranks-per-node", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let done = convert(&["--out-dir", out.to_str().unwrap(), "--strict"]);
    assert!(done.status.success(), "{done:?}");
    let lm_yaml = std::fs::read_to_string(out.join("lmcache.yaml")).unwrap();
    assert!(lm_yaml.contains("local_cpu: false"), "{lm_yaml}");
    let report = std::fs::read_to_string(out.join("report.txt")).unwrap();
    assert_eq!(report.lines().count(), 6, "{report}");

    // --env: LMCache's file with its LMCACHE_* variables over it, as LMCache reads them.
    let from_env = std::process::Command::new(env!("CARGO_BIN_EXE_nencache"))
        .args(["lmcache", "convert", "--env", "--ranks-per-node", "2"])
        .env("LMCACHE_CONFIG_FILE", &src)
        .env("LMCACHE_MAX_LOCAL_CPU_SIZE", "1")
        .output()
        .unwrap();
    let text = String::from_utf8(from_env.stdout).unwrap();
    assert!(
        text.contains("capacity: 2GiB\n") && text.contains("cache.t2"),
        "{text}"
    );

    std::fs::create_dir_all(&lmc).unwrap();
    let socket = dir.path().join("run/agent.sock");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nencache-agent"));
    cmd.args(["serve", "--socket", socket.to_str().unwrap()])
        .args(["--admin-addr", "127.0.0.1:0", "--log-format", "json"])
        .args(["--config", out.join("agent.yaml").to_str().unwrap()]);
    let a = TestAgent::spawn(tempfile::tempdir().unwrap(), socket, cmd);
    let mut c = Lm::connect(&lm_addr(&a));
    let value = pattern(11, 1 << 20);
    c.put("converted", &value);
    assert_eq!(c.get("converted").unwrap().1, value);
    let t2 = std::fs::metadata(lmc.join("cache.t2")).unwrap();
    // Two ranks of 0.125 GB, and the store's header page.
    assert!((256 << 20..257 << 20).contains(&t2.len()), "{}", t2.len());

    // A key with no counterpart fails --strict with status 2, and still writes.
    std::fs::write(&src, "chunk_size: 256\nenable_pd: true\n").unwrap();
    let strict = convert(&["--strict"]);
    assert_eq!(strict.status.code(), Some(2), "{strict:?}");
    let text = String::from_utf8(strict.stdout).unwrap();
    assert!(
        text.contains("enable_pd") && text.contains("unsupported"),
        "{text}"
    );
    // A file that is not there is an error naming it.
    std::fs::remove_file(&src).unwrap();
    let missing = convert(&[]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("lmcache.yaml"));
}
