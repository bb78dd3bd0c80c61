//! `nencache-bench compat`: the agent's LMCache-compatible listeners against what they
//! replace, measured in the same run:
//!
//! - Redis: `redis-benchmark` against a `redis-server` started here and against the agent's
//!   Redis listener, both on TCP loopback: `SET` and `GET` of 1 KiB and 1 MiB values, with
//!   and without pipelining, with 1 and 50 clients. Both servers are filled with the same
//!   keys first (`key:000000000000` and on, as `redis-benchmark -r` names them), so every
//!   `GET` hits; the keyspace is larger than the last-level cache. Each case runs against
//!   each server in turn, `--rounds` times; the best round of each is reported.
//! - `lm://`: a wire-level client written from the protocol (`docs/api.md`) doing PUT and GET
//!   of 32 MiB chunks (one Llama-8B chunk) over TCP loopback, against single-thread memcpy
//!   of the same bytes in the same run. PUTs have no reply: a batch of them is timed up to
//!   the reply of a HEALTH sent after it (requests on a connection are served in order).
//!
//! LMCache's own connectors against LMCache's own server are measured by
//! `python/benchmarks/lmcache_remote.py` (they need LMCache and torch).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, bail};
use clap::Args;

use crate::io::{Proc, caches, human, page_aligned, pool, wait_until};

/// Options of `nencache-bench compat`.
#[derive(Debug, Args)]
pub struct CompatArgs {
    /// Redis value sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 1 << 20])]
    pub sizes: Vec<usize>,
    /// redis-benchmark client counts (-c).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 50])]
    pub clients: Vec<usize>,
    /// redis-benchmark pipeline depths (-P).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16])]
    pub pipeline: Vec<usize>,
    /// Most requests per redis-benchmark case (fewer for large values: see --case-bytes).
    #[arg(long, default_value_t = 100_000)]
    pub requests: usize,
    /// Value bytes one redis-benchmark case moves at most.
    #[arg(long, default_value_t = 2 << 30)]
    pub case_bytes: usize,
    /// Rounds of each case per server, taking turns; the best is reported.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// lm:// chunk size in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub chunk: usize,
    /// lm:// connections (one thread each).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub connections: Vec<usize>,
    /// Seconds per lm:// case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Skip the Redis comparison.
    #[arg(long)]
    pub no_redis: bool,
    /// Skip the lm:// cases.
    #[arg(long)]
    pub no_lm: bool,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_tcp(addr: SocketAddr, child: &mut std::process::Child, what: &str) -> anyhow::Result<()> {
    wait_until(child, what, || TcpStream::connect(addr).is_ok())
}

/// The agent with its Redis and lm:// listeners on the given ports, host memory only.
fn start_agent(dir: &Path, redis: u16, lm: u16, chunk: usize) -> anyhow::Result<Proc> {
    let agent = std::env::current_exe()?.with_file_name("nencache-agent");
    let max_value = chunk.max(2 << 20);
    let mut child = Command::new(&agent)
        .args(["serve", "--admin-addr", "off", "--log-level", "warn"])
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .args(["--host-capacity", "3GiB", "--staging-size", "512MiB"])
        .args(["--max-value", &max_value.to_string(), "--nvme-size", "0"])
        .args(["--redis-tcp", &format!("127.0.0.1:{redis}")])
        .args(["--lm-tcp", &format!("127.0.0.1:{lm}")])
        .spawn()
        .with_context(|| format!("starting {} (build it with the bench)", agent.display()))?;
    wait_tcp(([127, 0, 0, 1], redis).into(), &mut child, "nencache-agent")?;
    wait_tcp(([127, 0, 0, 1], lm).into(), &mut child, "nencache-agent")?;
    Ok(Proc(child))
}

fn start_redis(port: u16) -> anyhow::Result<Proc> {
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--maxmemory", "4gb"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    wait_tcp(([127, 0, 0, 1], port).into(), &mut child, "redis-server")?;
    Ok(Proc(child))
}

/// SETs `key:000000000000` .. `key:<n-1>` to `size` bytes each, pipelined.
fn fill(port: u16, n: usize, size: usize) -> anyhow::Result<()> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut w = std::io::BufWriter::with_capacity(1 << 20, s);
    let value = vec![b'x'; size];
    let mut line = String::new();
    for batch in (0..n).collect::<Vec<_>>().chunks(64) {
        for i in batch {
            write!(w, "*3\r\n$3\r\nSET\r\n$16\r\nkey:{i:012}\r\n${size}\r\n")?;
            w.write_all(&value)?;
            w.write_all(b"\r\n")?;
        }
        w.flush()?;
        for _ in batch {
            line.clear();
            r.read_line(&mut line)?;
            if line != "+OK\r\n" {
                bail!("filling port {port}: {}", line.trim_end());
            }
        }
    }
    Ok(())
}

/// One redis-benchmark run; requests per second.
fn redis_benchmark(
    port: u16,
    test: &str,
    size: usize,
    n: usize,
    clients: usize,
    pipeline: usize,
    keys: usize,
) -> anyhow::Result<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            test,
            "--csv",
        ])
        .args(["-d", &size.to_string(), "-n", &n.to_string()])
        .args(["-c", &clients.to_string(), "-P", &pipeline.to_string()])
        .args(["-r", &keys.to_string()])
        .output()
        .context("running redis-benchmark (apt-get install redis-tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "test","rps","avg_latency_ms",...
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("\"{}\"", test.to_uppercase())))
        .with_context(|| {
            format!(
                "redis-benchmark printed no {test} row: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let rps = row
        .split(',')
        .nth(1)
        .map(|f| f.trim_matches('"'))
        .and_then(|f| f.parse::<f64>().ok())
        .with_context(|| format!("redis-benchmark row {row:?}"))?;
    Ok(rps)
}

fn redis_cases(a: &CompatArgs, agent_port: u16, redis_port: u16, llc: usize) -> anyhow::Result<()> {
    println!("## Redis protocol: redis-benchmark against redis-server and the agent\n");
    println!(
        "Requests per second (best of {} rounds, taking turns); values MB/s = requests x size.\n",
        a.rounds
    );
    println!(
        "| command | value | clients | pipeline | redis-server | agent | agent/redis | agent MB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &size in &a.sizes {
        // A keyspace of at least four times the last-level cache (and 1,000 keys).
        let keys = (4 * llc / size).max(1000);
        fill(redis_port, keys, size)?;
        fill(agent_port, keys, size)?;
        let n = a.requests.min(a.case_bytes / size).max(1000);
        for test in ["set", "get"] {
            for &clients in &a.clients {
                for &pipeline in &a.pipeline {
                    let (mut best_r, mut best_a) = (0f64, 0f64);
                    for _ in 0..a.rounds.max(1) {
                        let run =
                            |port| redis_benchmark(port, test, size, n, clients, pipeline, keys);
                        best_r = best_r.max(run(redis_port)?);
                        best_a = best_a.max(run(agent_port)?);
                    }
                    println!(
                        "| {} | {} | {clients} | {pipeline} | {best_r:.0} | {best_a:.0} | {:.2} | {:.0} |",
                        test.to_uppercase(),
                        human(size),
                        best_a / best_r,
                        best_a * size as f64 / 1e6
                    );
                }
            }
        }
    }
    println!();
    Ok(())
}

// ---- lm:// wire client

const PUT: i32 = 1;
const GET: i32 = 2;
const HEALTH: i32 = 5;

fn header(command: i32, length: usize, key: &str) -> [u8; 186] {
    let mut h = [b' '; 186];
    let ints = [
        command,
        length as i32,
        1,
        3,
        0,
        2,
        32,
        256,
        (length / 2 / 32 / 256 / 2) as i32,
    ];
    for (i, v) in ints.iter().enumerate() {
        h[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    h[36..36 + key.len()].copy_from_slice(key.as_bytes());
    h
}

fn reply(s: &mut TcpStream) -> anyhow::Result<(i32, usize)> {
    let mut r = [0u8; 36];
    s.read_exact(&mut r)?;
    let int = |i: usize| i32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
    Ok((int(0), usize::try_from(int(4)).context("negative length")?))
}

/// PUTs (`get` false) or GETs of `keys` in turn for `secs` on one connection; bytes moved
/// and seconds taken.
fn lm_case(
    addr: SocketAddr,
    keys: &[String],
    values: &[crate::io::AlignedBuf],
    get: bool,
    secs: f64,
) -> anyhow::Result<(u64, f64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let chunk = values[0].len();
    let mut into = page_aligned(chunk, 0);
    let (mut bytes, mut i) = (0u64, 0usize);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        let key = &keys[i % keys.len()];
        if get {
            s.write_all(&header(GET, 0, key))?;
            let (code, len) = reply(&mut s)?;
            if code != 200 || len != chunk {
                bail!("GET {key}: code {code}, {len} bytes");
            }
            s.read_exact(&mut into)?;
        } else {
            s.write_all(&header(PUT, chunk, key))?;
            s.write_all(&values[i % values.len()])?;
            if i % 4 == 3 {
                s.write_all(&header(HEALTH, 0, "h"))?;
                reply(&mut s)?;
            }
        }
        bytes += chunk as u64;
        i += 1;
    }
    if !get {
        s.write_all(&header(HEALTH, 0, "h"))?;
        reply(&mut s)?;
    }
    Ok((bytes, start.elapsed().as_secs_f64()))
}

fn memcpy_case(values: &[crate::io::AlignedBuf], secs: f64) -> (u64, f64) {
    let mut into = page_aligned(values[0].len(), 0);
    let (mut bytes, mut i) = (0u64, 0usize);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < secs {
        into.copy_from_slice(&values[i % values.len()]);
        std::hint::black_box(&into);
        bytes += into.len() as u64;
        i += 1;
    }
    (bytes, start.elapsed().as_secs_f64())
}

fn lm_cases(a: &CompatArgs, lm_port: u16, working_set: usize) -> anyhow::Result<()> {
    let addr: SocketAddr = ([127, 0, 0, 1], lm_port).into();
    println!(
        "## lm://: {} chunks over TCP loopback against single-thread memcpy\n",
        human(a.chunk)
    );
    println!("| connections | memcpy GB/s | PUT GB/s | PUT/memcpy | GET GB/s | GET/memcpy |");
    println!("|---|---|---|---|---|---|");
    for &conns in &a.connections {
        let per = (working_set / a.chunk).max(2);
        let keys: Vec<Vec<String>> = (0..conns)
            .map(|c| {
                (0..per)
                    .map(|i| format!("bench@{c}@{i}@bfloat16"))
                    .collect()
            })
            .collect();
        let values = pool(a.chunk, working_set);
        let (mb, ms) = memcpy_case(&values, a.seconds);
        let mut results = Vec::new();
        for get in [false, true] {
            let outcomes: Vec<anyhow::Result<(u64, f64)>> = std::thread::scope(|sc| {
                let handles: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        let values = &values;
                        sc.spawn(move || lm_case(addr, k, values, get, a.seconds))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                    })
                    .collect()
            });
            let (mut bytes, mut secs) = (0u64, 0f64);
            for o in outcomes {
                let (b, s) = o?;
                bytes += b;
                secs = secs.max(s);
            }
            results.push(bytes as f64 / secs / 1e9);
        }
        let memcpy = mb as f64 / ms / 1e9;
        println!(
            "| {conns} | {memcpy:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            results[0],
            results[0] / memcpy,
            results[1],
            results[1] / memcpy
        );
    }
    println!();
    Ok(())
}

/// Runs the cases and prints Markdown tables.
pub fn run(a: &CompatArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nencache-bench-")
        .tempdir()?;
    let (agent_redis, lm, redis_port) = (free_port()?, free_port()?, free_port()?);
    let _agent = start_agent(dir.path(), agent_redis, lm, a.chunk)?;
    let llc = caches().iter().map(|c| c.bytes).max().unwrap_or(32 << 20);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# nencache-bench compat\n");
    println!(
        "{cpus} CPUs; last-level cache {}; redis-benchmark keyspaces and lm:// chunks cycle \
         through at least four times that\n",
        human(llc)
    );
    if !a.no_redis {
        let _redis = start_redis(redis_port)?;
        redis_cases(a, agent_redis, redis_port, llc)?;
    }
    if !a.no_lm {
        lm_cases(a, lm, (4 * llc).max(256 << 20))?;
    }
    Ok(())
}
