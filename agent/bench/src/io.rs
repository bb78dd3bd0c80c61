//! Throughput and latency of puts, gets and lookups through the real client against a real
//! agent process, with the references measured in the same run:
//!
//! - memcpy: one thread copying the same number of bytes between two buffers;
//! - Redis: `redis-server` on a Unix socket (started here) doing SET and GET of the same
//!   values, read into a client-owned buffer;
//! - raw socket: a 64-byte ping-pong over a Unix socket pair between two threads.
//!
//! Gets count bytes copied out of the shared arena into a client-owned buffer, as a
//! host-to-device copy would consume them. Every case works on a working set several times
//! the last-level cache (`--working-set-mib`, by default four times the largest cache, at
//! least 256 MiB): memcpy and gets read values rotating through it, puts and Redis SETs take
//! their source values from a rotating pool of that size, so no case runs from cache while
//! another runs from memory. The machine's cache sizes are printed with the figures. Latency-sensitive cases run twice: unpinned, and
//! with the agent, Redis and the client pinned to CPU 0 (cross-CPU wakeups cost tens of
//! microseconds on small VMs).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use nencache_client::{Client, ClientOptions, Put, PutOutcome};

use crate::resp::Redis;

/// Options of `nencache-bench io`.
#[derive(Debug, Args)]
pub struct IoArgs {
    /// Use an agent already serving this socket instead of starting one.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Client threads (each with its own connection and session).
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 2])]
    pub threads: Vec<usize>,
    /// Value sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize << 10, 1 << 20, 16 << 20])]
    pub sizes: Vec<usize>,
    /// Seconds per measured case.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Bytes moved per batched call (values per call = this / value size, at least 1).
    #[arg(long, default_value_t = 8 << 20)]
    pub batch_bytes: usize,
    /// Skip Redis.
    #[arg(long)]
    pub no_redis: bool,
    /// Rounds each throughput case is split into, taking turns with the others.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Host arena of the agent started by the bench, in MiB.
    #[arg(long, default_value_t = 2048)]
    pub host_mib: u64,
    /// Bytes each case cycles through, in MiB (default: four times the last-level cache, at
    /// least 256 MiB).
    #[arg(long)]
    pub working_set_mib: Option<u64>,
}

/// One CPU cache, as sysfs describes it.
pub(crate) struct Cache {
    pub(crate) level: u32,
    pub(crate) kind: String,
    pub(crate) bytes: usize,
}

/// The caches of CPU 0 (empty where sysfs does not say).
pub(crate) fn caches() -> Vec<Cache> {
    let base = Path::new("/sys/devices/system/cpu/cpu0/cache");
    let Ok(dir) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let read = |p: &Path, f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
    let mut out: Vec<Cache> = dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("index"))
        .filter_map(|e| {
            let p = e.path();
            let size = read(&p, "size");
            let size = size.trim();
            let (num, mul) = match size.strip_suffix('K') {
                Some(n) => (n, 1 << 10),
                None => match size.strip_suffix('M') {
                    Some(n) => (n, 1 << 20),
                    None => (size, 1),
                },
            };
            Some(Cache {
                level: read(&p, "level").trim().parse().ok()?,
                kind: read(&p, "type").trim().to_string(),
                bytes: num.parse::<usize>().ok()? * mul,
            })
        })
        .collect();
    out.sort_by_key(|c| (c.level, c.kind.clone()));
    out
}

/// Page-aligned buffers of `size` bytes, `total` bytes in all (at least one), each filled
/// differently, to rotate through.
pub(crate) fn pool(size: usize, total: usize) -> Vec<AlignedBuf> {
    (0..(total / size).max(1))
        .map(|i| page_aligned(size, (i as u8).wrapping_mul(31).wrapping_add(1)))
        .collect()
}

struct Stat {
    bytes: u64,
    ops: u64,
    secs: f64,
    lat: Histogram<u64>,
}

impl Stat {
    fn new() -> Self {
        Self {
            bytes: 0,
            ops: 0,
            secs: 0.0,
            lat: Histogram::new(3).expect("histogram"),
        }
    }

    fn merge(&mut self, o: &Self) {
        self.bytes += o.bytes;
        self.ops += o.ops;
        self.secs = self.secs.max(o.secs);
        let _ = self.lat.add(&o.lat);
    }

    /// Adds a later, sequential measurement of the same case.
    fn append(&mut self, o: &Self) {
        self.bytes += o.bytes;
        self.ops += o.ops;
        self.secs += o.secs;
        let _ = self.lat.add(&o.lat);
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e9
    }

    fn us(&self, q: f64) -> f64 {
        self.lat.value_at_quantile(q) as f64 / 1e3
    }
}

/// Runs `f` repeatedly for `secs`, timing each call in nanoseconds.
fn timed(secs: f64, mut f: impl FnMut() -> anyhow::Result<u64>) -> anyhow::Result<Stat> {
    let mut s = Stat::new();
    let start = Instant::now();
    let limit = Duration::from_secs_f64(secs);
    while start.elapsed() < limit {
        let t = Instant::now();
        s.bytes += f()?;
        s.lat.record(t.elapsed().as_nanos() as u64)?;
        s.ops += 1;
    }
    s.secs = start.elapsed().as_secs_f64();
    Ok(s)
}

fn pin_thread(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

fn unpin_thread() {
    let mut set = rustix::thread::CpuSet::new();
    for c in 0..rustix::thread::CpuSet::MAX_CPU.min(256) {
        set.set(c);
    }
    let _ = rustix::thread::sched_setaffinity(None, &set);
}

/// Sets the affinity of every thread of process `pid` (all CPUs when `cpu` is `None`).
fn pin_process(pid: u32, cpu: Option<usize>) -> anyhow::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    match cpu {
        Some(c) => set.set(c),
        None => (0..std::thread::available_parallelism().map_or(1, |n| n.get()))
            .for_each(|c| set.set(c)),
    }
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: i32 = t?.file_name().to_string_lossy().parse()?;
        if let Some(p) = rustix::process::Pid::from_raw(tid) {
            let _ = rustix::thread::sched_setaffinity(Some(p), &set);
        }
    }
    Ok(())
}

/// A child process, killed and reaped when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn wait_for(path: &Path, child: &mut Child, what: &str) -> anyhow::Result<()> {
    wait_until(child, what, || UnixStream::connect(path).is_ok())
}

/// Waits up to 30 s for `ready`, failing early if `child` exits.
pub(crate) fn wait_until(
    child: &mut Child,
    what: &str,
    ready: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while !ready() {
        if let Some(s) = child.try_wait()? {
            bail!("{what} exited early: {s}");
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!("{what} did not start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn start_agent(dir: &Path, host_mib: u64, max_value: usize) -> anyhow::Result<(Proc, PathBuf)> {
    let exe = std::env::current_exe()?;
    let agent = exe.with_file_name("nencache-agent");
    let socket = dir.join("agent.sock");
    let staging = (host_mib / 4).max((max_value as u64 * 3) >> 20);
    let mut child = Command::new(&agent)
        .args(["serve", "--admin-addr", "off", "--log-level", "warn"])
        .arg("--socket")
        .arg(&socket)
        .args(["--host-capacity", &format!("{host_mib}MiB")])
        .args(["--staging-size", &format!("{staging}MiB")])
        .args(["--max-value", &format!("{}", max_value)])
        // Host memory alone: no default lower tier (its demotion writes would load the
        // machine during the cases; `nencache-bench tiers` measures the lower tiers).
        .args(["--nvme-size", "0"])
        .spawn()
        .with_context(|| format!("starting {} (build it with the bench)", agent.display()))?;
    wait_for(&socket, &mut child, "nencache-agent")?;
    Ok((Proc(child), socket))
}

fn start_redis(dir: &Path) -> anyhow::Result<(Proc, PathBuf)> {
    let socket = dir.join("redis.sock");
    let mut child = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--save",
            "",
            "--appendonly",
            "no",
            "--unixsocketperm",
            "700",
        ])
        .arg("--unixsocket")
        .arg(&socket)
        .args(["--proto-max-bulk-len", "1gb", "--maxmemory", "4gb"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    wait_for(&socket, &mut child, "redis-server")?;
    Ok((Proc(child), socket))
}

/// A page-aligned buffer of `len` bytes filled with `fill`. Every buffer a case copies from or
/// into is page-aligned, as arena values are (and as pinned host buffers for GPU copies are),
/// so that alignment does not differ between the cases compared.
pub(crate) fn page_aligned(len: usize, fill: u8) -> AlignedBuf {
    let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).expect("layout");
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc(layout) };
    assert!(!ptr.is_null(), "out of memory");
    // SAFETY: `ptr` is valid for `len` bytes, freshly allocated.
    unsafe { ptr.write_bytes(fill, len) };
    AlignedBuf { ptr, len, layout }
}

/// A page-aligned heap buffer.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is uniquely owned, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes (mutation needs `&mut`), like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid and initialised for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `page_aligned` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Copies values of `size` bytes from a rotating pool of `pool_bytes` into one destination,
/// as the get cases read rotating keys into one client buffer (so neither runs from cache
/// when the other would not).
fn memcpy_case(size: usize, pool_bytes: usize, secs: f64) -> anyhow::Result<Stat> {
    let pool = pool(size, pool_bytes);
    let mut dst = page_aligned(size, 0);
    let mut i = 0;
    timed(secs, || {
        i = (i + 1) % pool.len();
        dst.copy_from_slice(std::hint::black_box(&pool[i]));
        std::hint::black_box(&mut dst);
        Ok(size as u64)
    })
}

/// Runs `per_thread` on `threads` OS threads, each with its own runtime, and merges stats.
fn on_threads<F>(threads: usize, pin: Option<usize>, per_thread: F) -> anyhow::Result<Stat>
where
    F: Fn(usize, &Barrier) -> anyhow::Result<Stat> + Send + Sync + 'static,
{
    let f = Arc::new(per_thread);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let f = f.clone();
            let b = barrier.clone();
            std::thread::spawn(move || {
                match pin {
                    Some(c) => pin_thread(c),
                    None => unpin_thread(),
                }
                f(t, &b)
            })
        })
        .collect();
    let mut total = Stat::new();
    for h in handles {
        let s = h
            .join()
            .map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
        total.merge(&s);
    }
    Ok(total)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A key unique to one case (`ns`), thread and index, so no case finds another's values.
fn key(ns: &str, t: usize, i: usize) -> Vec<u8> {
    format!("bench/{ns}/t{t}/k{i}").into_bytes()
}

/// Puts under keys no earlier call used; counts only values actually stored (a key found
/// already cached would cost no copy).
#[allow(clippy::too_many_arguments)]
fn nencache_put(
    socket: &Path,
    threads: usize,
    size: usize,
    batch: usize,
    secs: f64,
    verify: bool,
    working_set: usize,
) -> anyhow::Result<Stat> {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let ns = format!("put-{}", CALLS.fetch_add(1, Ordering::Relaxed));
    let socket = socket.to_path_buf();
    on_threads(threads, None, move |t, barrier| {
        let rt = runtime()?;
        rt.block_on(async {
            let opts = ClientOptions {
                verify_puts: verify,
                ..ClientOptions::default()
            };
            let c = Client::connect_with(&socket, opts).await?;
            // Source values as cold as memcpy's: a rotating pool the size of the working set.
            let values = pool(size, working_set / threads);
            let mut next = 0usize;
            barrier.wait();
            let mut s = Stat::new();
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                let keys: Vec<Vec<u8>> = (0..batch).map(|i| key(&ns, t, next + i)).collect();
                next += batch;
                let puts: Vec<Put<'_>> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| Put {
                        key: k,
                        value: &values[(next + i) % values.len()],
                        metadata: b"",
                        ttl: None,
                    })
                    .collect();
                let t0 = Instant::now();
                let outcomes = c.put_many(&puts).await?;
                s.lat.record(t0.elapsed().as_nanos() as u64)?;
                let stored = outcomes
                    .iter()
                    .filter(|o| **o == PutOutcome::Stored)
                    .count();
                s.bytes += (stored * size) as u64;
                s.ops += 1;
            }
            s.secs = start.elapsed().as_secs_f64();
            Ok(s)
        })
    })
}

/// Fills `per_thread` keys per thread, so gets always hit.
fn nencache_fill(
    socket: &Path,
    ns: &str,
    threads: usize,
    size: usize,
    per_thread: usize,
) -> anyhow::Result<()> {
    let rt = runtime()?;
    rt.block_on(async {
        let c = Client::connect(socket).await?;
        let value = vec![0xa5u8; size];
        let keys: Vec<Vec<u8>> = (0..threads)
            .flat_map(|t| (0..per_thread).map(move |i| key(ns, t, i)))
            .collect();
        let puts: Vec<Put<'_>> = keys
            .iter()
            .map(|k| Put {
                key: k,
                value: &value,
                metadata: b"",
                ttl: None,
            })
            .collect();
        c.put_many(&puts).await?;
        // Placing a large value may evict a neighbour put moments before (placement prefers
        // a contiguous window to policy order): put back what went, until all are there.
        for _ in 0..8 {
            let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            let mut missing = Vec::new();
            for chunk in refs.chunks(256) {
                for (k, v) in chunk.iter().zip(c.get(chunk).await?) {
                    if v.is_none() {
                        missing.push(Put {
                            key: k,
                            value: &value,
                            metadata: b"",
                            ttl: None,
                        });
                    }
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            c.put_many(&missing).await?;
        }
        anyhow::bail!("could not fill the get working set; raise --host-mib")
    })
}

#[allow(clippy::too_many_arguments)]
fn nencache_get(
    socket: &Path,
    ns: &str,
    threads: usize,
    size: usize,
    batch: usize,
    keys_per_thread: usize,
    secs: f64,
    pin: Option<usize>,
) -> anyhow::Result<Stat> {
    let socket = socket.to_path_buf();
    let ns = ns.to_string();
    on_threads(threads, pin, move |t, barrier| {
        let rt = runtime()?;
        rt.block_on(async {
            let c = Client::connect(&socket).await?;
            let keys: Vec<Vec<u8>> = (0..keys_per_thread).map(|i| key(&ns, t, i)).collect();
            let mut buf = page_aligned(size, 0);
            let mut i = 0;
            barrier.wait();
            let mut s = Stat::new();
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                let ks: Vec<&[u8]> = (0..batch)
                    .map(|j| keys[(i + j) % keys.len()].as_slice())
                    .collect();
                i += batch;
                let t0 = Instant::now();
                for v in c.get(&ks).await? {
                    let v = v.context(
                        "a filled key was evicted; lower --batch-bytes or raise --host-mib",
                    )?;
                    buf[..v.len()].copy_from_slice(&v);
                    s.bytes += v.len() as u64;
                }
                std::hint::black_box(&mut buf);
                s.lat.record(t0.elapsed().as_nanos() as u64)?;
                s.ops += 1;
            }
            s.secs = start.elapsed().as_secs_f64();
            c.flush_releases().await?;
            Ok(s)
        })
    })
}

#[allow(clippy::too_many_arguments)]
fn redis_case(
    socket: &Path,
    threads: usize,
    size: usize,
    secs: f64,
    get: bool,
    pin: Option<usize>,
    working_set: usize,
) -> anyhow::Result<Stat> {
    let socket = socket.to_path_buf();
    on_threads(threads, pin, move |t, barrier| {
        let mut r = Redis::connect(&socket)?;
        // Keys and source values rotate through the working set, as the other cases do.
        let values = pool(size, working_set / threads);
        let mut buf = page_aligned(size, 0);
        let keys: Vec<Vec<u8>> = (0..values.len()).map(|i| key("redis", t, i)).collect();
        if get {
            for (k, v) in keys.iter().zip(&values) {
                r.set(k, v)?;
            }
        }
        barrier.wait();
        let mut i = 0;
        timed(secs, || {
            i += 1;
            let k = &keys[i % keys.len()];
            if get {
                r.get_into(k, &mut buf)?.context("redis lost a key")?;
            } else {
                r.set(k, &values[i % values.len()])?;
            }
            Ok(size as u64)
        })
    })
}

fn uds_round_trip(secs: f64, pin: Option<usize>) -> anyhow::Result<Stat> {
    let (mut a, mut b) = UnixStream::pair()?;
    let echo = std::thread::spawn(move || {
        if let Some(c) = pin {
            pin_thread(c);
        }
        let mut m = [0u8; 64];
        while b.read_exact(&mut m).is_ok() {
            if b.write_all(&m).is_err() {
                break;
            }
        }
    });
    match pin {
        Some(c) => pin_thread(c),
        None => unpin_thread(),
    }
    let mut m = [1u8; 64];
    let s = timed(secs, || {
        a.write_all(&m)?;
        a.read_exact(&mut m)?;
        Ok(64)
    })?;
    drop(a);
    let _ = echo.join();
    unpin_thread();
    Ok(s)
}

fn stats_case(socket: &Path, secs: f64, pin: Option<usize>) -> anyhow::Result<Stat> {
    let socket = socket.to_path_buf();
    on_threads(1, pin, move |_, _| {
        let rt = runtime()?;
        rt.block_on(async {
            let c = Client::connect(&socket).await?;
            let mut s = Stat::new();
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                let t0 = Instant::now();
                std::hint::black_box(c.stats().await?);
                s.lat.record(t0.elapsed().as_nanos() as u64)?;
                s.ops += 1;
            }
            s.secs = start.elapsed().as_secs_f64();
            Ok(s)
        })
    })
}

fn lookup_case(socket: &Path, secs: f64, pin: Option<usize>) -> anyhow::Result<Stat> {
    let socket = socket.to_path_buf();
    on_threads(1, pin, move |_, _| {
        let rt = runtime()?;
        rt.block_on(async {
            let c = Client::connect(&socket).await?;
            let ck = nencache_client::ChunkKeys::new("bench", 256);
            let tokens: Vec<u32> = (0..64 * 256).collect();
            let keys = ck.keys(&tokens);
            let refs: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
            c.put(refs[0], b"x", b"").await?;
            let mut s = Stat::new();
            let start = Instant::now();
            while start.elapsed().as_secs_f64() < secs {
                let t0 = Instant::now();
                std::hint::black_box(c.lookup(&refs).await?);
                s.lat.record(t0.elapsed().as_nanos() as u64)?;
                s.ops += 1;
            }
            s.secs = start.elapsed().as_secs_f64();
            Ok(s)
        })
    })
}

pub(crate) fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

/// Runs every case and prints Markdown tables.
pub fn run(a: &IoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nencache-bench-")
        .tempdir()?;
    let max_size = a.sizes.iter().copied().max().unwrap_or(1 << 20);
    let (agent, socket) = match &a.socket {
        Some(s) => (None, s.clone()),
        None => {
            let (p, s) = start_agent(dir.path(), a.host_mib, max_size)?;
            (Some(p), s)
        }
    };
    let redis = if a.no_redis {
        None
    } else {
        Some(start_redis(dir.path())?)
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let caches = caches();
    let llc = caches.iter().map(|c| c.bytes).max().unwrap_or(32 << 20);
    let working_set = a
        .working_set_mib
        .map_or((4 * llc).max(256 << 20), |m| (m as usize) << 20);
    println!("# nencache-bench io\n");
    let described: Vec<String> = caches
        .iter()
        .map(|c| format!("L{} {} {}", c.level, c.kind.to_lowercase(), human(c.bytes)))
        .collect();
    println!(
        "{cpus} CPUs; caches (CPU 0): {}; every case cycles through {} ({:.0}x the last-level \
         cache); {:.1} s per case; batched calls move about {} per call\n",
        if described.is_empty() {
            "not reported".into()
        } else {
            described.join(", ")
        },
        human(working_set),
        working_set as f64 / llc as f64,
        a.seconds,
        human(a.batch_bytes)
    );
    println!(
        "## Throughput (GB/s; ratios against the same run's single-thread memcpy and Redis)\n"
    );
    println!(
        "| value | threads | memcpy | put | put/memcpy | put, verified | get | get/memcpy | redis SET | redis GET | get/redis GET | get p50 µs | get p99 µs | redis GET p50 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &size in &a.sizes {
        let batch = (a.batch_bytes / size).max(1);
        for &threads in &a.threads {
            // Gets cycle through the working set, within half of the arena (the rest takes
            // the puts, which evict).
            let budget = (a.host_mib as usize) << 20;
            let per_thread = (working_set / size / threads)
                .min(budget / 2 / size / threads)
                .max(batch)
                .max(1);
            let ns = format!("get-{size}-{threads}");
            // The cases take turns in short rounds, so that a noisy moment on a shared machine
            // falls on all of them alike instead of skewing one ratio.
            let slice = a.seconds / a.rounds as f64;
            let (mut memcpy, mut put, mut get) = (Stat::new(), Stat::new(), Stat::new());
            let mut put_verified = Stat::new();
            let (mut rset, mut rget) = (Stat::new(), Stat::new());
            for _ in 0..a.rounds {
                memcpy.append(&memcpy_case(size, working_set, slice)?);
                put.append(&nencache_put(
                    &socket,
                    threads,
                    size,
                    batch,
                    slice,
                    false,
                    working_set,
                )?);
                put_verified.append(&nencache_put(
                    &socket,
                    threads,
                    size,
                    batch,
                    slice,
                    true,
                    working_set,
                )?);
                // Puts evict: (re)fill what the gets read.
                nencache_fill(&socket, &ns, threads, size, per_thread)?;
                let g = batch.min(per_thread);
                get.append(&nencache_get(
                    &socket, &ns, threads, size, g, per_thread, slice, None,
                )?);
                if let Some((_, rs)) = &redis {
                    rset.append(&redis_case(
                        rs,
                        threads,
                        size,
                        slice,
                        false,
                        None,
                        working_set,
                    )?);
                    rget.append(&redis_case(
                        rs,
                        threads,
                        size,
                        slice,
                        true,
                        None,
                        working_set,
                    )?);
                }
            }
            let (rset, rget) = if redis.is_some() {
                (Some(rset), Some(rget))
            } else {
                (None, None)
            };
            let opt = |s: &Option<Stat>| {
                s.as_ref()
                    .map_or("-".into(), |s| format!("{:.2}", s.gbps()))
            };
            println!(
                "| {} | {threads} | {:.2} | {:.2} | {:.2}x | {:.2} | {:.2} | {:.2}x | {} | {} | {} | {:.0} | {:.0} | {} |",
                human(size),
                memcpy.gbps(),
                put.gbps(),
                put.gbps() / memcpy.gbps(),
                put_verified.gbps(),
                get.gbps(),
                get.gbps() / memcpy.gbps(),
                opt(&rset),
                opt(&rget),
                rget.as_ref()
                    .map_or("-".into(), |r| format!("{:.1}x", get.gbps() / r.gbps())),
                get.us(0.5) / batch.min(per_thread) as f64,
                get.us(0.99) / batch.min(per_thread) as f64,
                rget.as_ref()
                    .map_or("-".into(), |r| format!("{:.0}", r.us(0.5))),
            );
        }
    }
    println!(
        "\nget latency columns are per value (one batched call's time divided by its values).\n"
    );
    println!("## Latency, unpinned and with every process on CPU 0 (µs)\n");
    println!("| case | unpinned p50 | unpinned p99 | pinned p50 | pinned p99 |");
    println!("|---|---|---|---|---|");
    let mut rows: Vec<(String, Stat, Stat)> = Vec::new();
    for pinned in [false, true] {
        let pin = pinned.then_some(0);
        if let Some(a) = &agent {
            pin_process(a.0.id(), pin)?;
        }
        if let Some((r, _)) = &redis {
            pin_process(r.0.id(), pin)?;
        }
        let uds = uds_round_trip(a.seconds, pin)?;
        let look = lookup_case(&socket, a.seconds, pin)?;
        let empty = stats_case(&socket, a.seconds, pin)?;
        nencache_fill(&socket, "latency", 1, 64 << 10, 1)?;
        let get1 = nencache_get(&socket, "latency", 1, 64 << 10, 1, 1, a.seconds, pin)?;
        let rget = match &redis {
            Some((_, rs)) => Some(redis_case(rs, 1, 64 << 10, a.seconds, true, pin, 64 << 10)?),
            None => None,
        };
        let mut cases = vec![
            ("raw Unix-socket round trip (64 B)".to_string(), uds),
            ("nencache lookup, 64 keys".to_string(), look),
            ("nencache stats (smallest gRPC call)".to_string(), empty),
            (
                "nencache get, one 64 KiB value, copied out".to_string(),
                get1,
            ),
        ];
        if let Some(r) = rget {
            cases.push(("redis GET, one 64 KiB value".to_string(), r));
        }
        for (i, (name, s)) in cases.into_iter().enumerate() {
            if pinned {
                rows[i].2 = s;
            } else {
                rows.push((name, s, Stat::new()));
            }
        }
    }
    for (name, u, p) in &rows {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            u.us(0.5),
            u.us(0.99),
            p.us(0.5),
            p.us(0.99)
        );
    }
    let ratio = |i: usize, q: f64, pinned: bool| {
        let (a, b) = if pinned {
            (&rows[i].2, &rows[0].2)
        } else {
            (&rows[i].1, &rows[0].1)
        };
        a.us(q) / b.us(q)
    };
    println!(
        "\nlookup of 64 keys vs raw round trip (p50): {:.1}x unpinned, {:.1}x pinned",
        ratio(1, 0.5, false),
        ratio(1, 0.5, true)
    );
    Ok(())
}
