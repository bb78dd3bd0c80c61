//! The lower tiers against the device, each measured in the same run as `fio` on a file of
//! the same size in the same directory (so the same filesystem and device), with
//! `direct=1`, `ioengine=io_uring` and the store's queue depth:
//!
//! - **seq**: sequential write, then read, of 1 MiB values through `LogStore` directly (a
//!   batch of queue-depth entries per call), with each I/O engine, against fio's sequential
//!   write and read with `bs=1M`;
//! - **get**: gets through the real client of values that live only on T2: an agent (a
//!   child process) with a small host tier takes the values, is stopped with SIGTERM (it
//!   writes what host memory holds to T2) and started again, so host memory starts empty and
//!   every value is on T2 alone; then every key is read once in random order, one key per
//!   call (QD 1) and 32 keys per call (QD 32), against fio's `randread` with the value size
//!   as block size at iodepth 1 and 32;
//! - **recovery**: how long `LogStore::open` takes to rebuild the index of a store written
//!   full of values, after a drop without flush (a crash: a scan) and after a flush (a
//!   checkpoint), per GiB of values.
//!
//! Source and destination buffers rotate through pools of at least four times the
//! last-level cache, as in `nencache-bench io`. It measures and reports; it asserts nothing
//! about speed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use nencache_api::v1;
use nencache_client::{Client, Put};
use nencache_engine::{IoEngineKind, StoreConfig, traces::Rng};
use nencache_store::{LogStore, ReadOutcome, ReadReq, WriteReq};

use crate::{
    fio,
    io::{AlignedBuf, Proc, caches, human, page_aligned, wait_for},
};

/// Options of `nencache-bench tiers`.
#[derive(Debug, Args)]
pub struct TiersArgs {
    /// Directory for every file (stores, fio's files, the agent's tier): a temporary
    /// directory is made under it and removed at the end. Must not be tmpfs.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Parts to run: seq, get, recovery.
    #[arg(long, value_delimiter = ',', default_values_t = ["seq".to_string(), "get".into(), "recovery".into()])]
    pub parts: Vec<String>,
    /// Queue depth: the stores' (the agent's tier's too), entries per write or read call,
    /// keys per get at QD > 1, fio's iodepth.
    #[arg(long, default_value_t = 32)]
    pub queue_depth: u32,
    /// seq: MiB of 1 MiB values written then read (and the size of fio's file).
    #[arg(long, default_value_t = 2048)]
    pub seq_mib: u64,
    /// seq: the store's I/O engines to measure.
    #[arg(long, value_delimiter = ',', default_values_t = ["io_uring".to_string(), "pread".into()])]
    pub engines: Vec<String>,
    /// seq: rounds, fio and each engine taking turns.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// get: value sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize << 10, 1 << 20])]
    pub get_sizes: Vec<usize>,
    /// get: MiB of values put per size (and the size of fio's file).
    #[arg(long, default_value_t = 1024)]
    pub get_mib: u64,
    /// get: the agent's host tier in MiB.
    #[arg(long, default_value_t = 64)]
    pub host_mib: u64,
    /// get: rounds, fio, LogStore and the agent taking turns.
    #[arg(long, default_value_t = 3)]
    pub get_rounds: usize,
    /// get: the agent's T2 I/O engine (auto, io_uring, pread).
    #[arg(long, default_value = "auto")]
    pub agent_io_engine: String,
    /// recovery: GiB of values written per value size.
    #[arg(long, default_value_t = 2)]
    pub recovery_gib: u64,
    /// recovery: value sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize << 20, 64 << 10])]
    pub recovery_sizes: Vec<usize>,
    /// Run without fio (no baseline, no ratios).
    #[arg(long)]
    pub no_fio: bool,
    /// fio's ioengine.
    #[arg(long, default_value = "io_uring")]
    pub fio_engine: String,
}

/// Region size of the stores made here (the agent's default for T2).
const REGION: u64 = 16 << 20;
const MIB: usize = 1 << 20;

/// Bytes an entry of a `value`-byte value takes on the device: a header block, the value
/// padded to 4096.
fn entry_bytes(value: u64) -> u64 {
    4096 + value.div_ceil(4096) * 4096
}

/// A capacity that holds `n` values of `value` bytes without evicting (entries do not cross
/// regions), with two regions to spare.
fn capacity_for(n: u64, value: u64) -> u64 {
    let per = (REGION / entry_bytes(value)).max(1);
    (n.div_ceil(per) + 2) * REGION
}

/// A 128-bit key hash for entry `i` of a case (`salt`).
fn hash_of(i: usize, salt: u64) -> u128 {
    let x = ((u128::from(salt) << 64) | i as u128).wrapping_add(1);
    x.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
}

fn engine_kind(s: &str) -> anyhow::Result<IoEngineKind> {
    Ok(match s {
        "auto" => IoEngineKind::Auto,
        "io_uring" | "io-uring" | "uring" => IoEngineKind::IoUring,
        "pread" => IoEngineKind::Pread,
        other => bail!("unknown I/O engine {other:?} (expected io_uring, pread or auto)"),
    })
}

fn store_config(path: &Path, capacity: u64, engine: IoEngineKind, qd: u32) -> StoreConfig {
    StoreConfig {
        path: path.to_path_buf(),
        capacity,
        region_size: REGION,
        io_engine: engine,
        queue_depth: qd,
        // A shared, noisy machine must not mark the store degraded mid-case.
        slow_io: Duration::from_secs(60),
    }
}

/// Removes a store's file and everything beside it named after it (checkpoint, lock).
fn remove_store(path: &Path) -> anyhow::Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Ok(());
    };
    let name = name.to_string_lossy().to_string();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(&name) {
            fio::remove(&e.path())?;
        }
    }
    Ok(())
}

/// Page-aligned buffers of `size` bytes, at least `total` bytes and `min` buffers in all,
/// each filled differently.
fn buffers(size: usize, total: usize, min: usize) -> Vec<AlignedBuf> {
    (0..(total / size).max(min).max(1))
        .map(|i| page_aligned(size, (i as u8).wrapping_mul(37).wrapping_add(11)))
        .collect()
}

/// Writes `keys` (values of `size` bytes taken from `src` in turn) in batches of `qd`.
/// Returns the seconds the writes took.
fn write_all(
    store: &LogStore,
    keys: &[Vec<u8>],
    salt: u64,
    size: usize,
    src: &[AlignedBuf],
    qd: usize,
) -> anyhow::Result<f64> {
    let start = Instant::now();
    for first in (0..keys.len()).step_by(qd) {
        let reqs: Vec<WriteReq<'_>> = (first..keys.len().min(first + qd))
            .map(|i| WriteReq {
                hash: hash_of(i, salt),
                key: &keys[i],
                metadata: b"",
                value: src[i % src.len()].as_ptr(),
                value_len: size as u64,
                expires_unix_ms: u64::MAX,
            })
            .collect();
        // SAFETY: every value points at a live, 4096-aligned buffer of `size` bytes (a
        // multiple of 4096), which nothing writes while the call runs.
        let results = unsafe { store.write(&reqs) };
        for r in results {
            r.context("store write")?;
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Reads `keys` back in batches of `qd` into `dst` in turn. Returns the seconds taken and
/// how many reads were hits.
fn read_all(
    store: &LogStore,
    keys: &[Vec<u8>],
    salt: u64,
    dst: &mut [AlignedBuf],
    qd: usize,
) -> anyhow::Result<(f64, u64)> {
    if dst.len() < qd {
        bail!("fewer destination buffers than the queue depth");
    }
    let ptrs: Vec<*mut u8> = dst.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let size = dst[0].len() as u64;
    let mut hits = 0;
    let start = Instant::now();
    for first in (0..keys.len()).step_by(qd) {
        let mut reqs: Vec<ReadReq<'_>> = Vec::with_capacity(qd);
        for i in first..keys.len().min(first + qd) {
            let hash = hash_of(i, salt);
            let loc = store
                .locate(hash)
                .with_context(|| format!("entry {i} is not in the store's index"))?;
            if loc.value_len > size {
                bail!("entry {i} is larger than its buffer");
            }
            reqs.push(ReadReq {
                hash,
                key: &keys[i],
                loc,
                dst: ptrs[i % ptrs.len()],
                metadata: Vec::new(),
                outcome: ReadOutcome::Pending,
            });
        }
        // SAFETY: the destinations of one batch are distinct buffers (`qd` consecutive
        // indexes modulo at least `qd` buffers), 4096-aligned and at least `value_len`
        // (a multiple of 4096) long; nothing else touches them during the call.
        unsafe { store.read(&mut reqs) };
        hits += reqs
            .iter()
            .filter(|r| r.outcome == ReadOutcome::Hit)
            .count() as u64;
    }
    Ok((start.elapsed().as_secs_f64(), hits))
}

/// The mount holding `dir`: (device, mount point, filesystem type).
fn mount_of(dir: &Path) -> Option<(String, String, String)> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_string(),
                f.next()?.replace("\\040", " "),
                f.next()?.to_string(),
            ))
        })
        .filter(|(_, m, _)| dir.starts_with(m))
        .max_by_key(|(_, m, _)| m.len())
}

fn read_trim(p: impl AsRef<Path>) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

/// One line describing the machine: CPU, last-level cache, where the files go.
fn describe(dir: &Path, llc: usize) -> anyhow::Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (dev, mnt, fs) = mount_of(dir).context("no mount holds the bench directory")?;
    if fs == "tmpfs" || fs == "ramfs" {
        bail!(
            "{} is on {fs} (memory, not a device): pass --dir on the filesystem to measure",
            dir.display()
        );
    }
    let name = dev.rsplit('/').next().unwrap_or_default().to_string();
    let block = Path::new("/sys/class/block").join(&name);
    let rota = read_trim(block.join("queue/rotational"))
        .or_else(|| read_trim(block.join("../queue/rotational")));
    let model = read_trim(block.join("device/model"))
        .or_else(|| read_trim(block.join("../device/model")))
        .unwrap_or_default();
    let size = read_trim(block.join("size"))
        .and_then(|s| s.parse::<u64>().ok())
        .map(|sectors| format!(", {} GiB", (sectors * 512) >> 30))
        .unwrap_or_default();
    Ok(format!(
        "{cpus} CPUs ({cpu}); last-level cache {}; files on {dev} ({fs} mounted on {mnt}{size}{}{})",
        human(llc),
        if model.is_empty() {
            String::new()
        } else {
            format!(", model {model}")
        },
        match rota.as_deref() {
            Some("1") => ", reported rotational",
            Some("0") => ", reported non-rotational",
            _ => "",
        }
    ))
}

fn ratio(a: f64, b: Option<f64>) -> String {
    b.map_or("-".into(), |b| format!("{:.2}x", a / b))
}

fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "not met" }
}

/// Runs the chosen parts and prints Markdown tables.
pub fn run(a: &TiersArgs) -> anyhow::Result<()> {
    let fio_version = if a.no_fio { None } else { Some(fio::check()?) };
    std::fs::create_dir_all(&a.dir)?;
    let dir = tempfile::Builder::new()
        .prefix("nencache-tiers-")
        .tempdir_in(&a.dir)
        .with_context(|| format!("making a directory under {}", a.dir.display()))?;
    let llc = caches().iter().map(|c| c.bytes).max().unwrap_or(32 << 20);
    println!("# nencache-bench tiers\n");
    println!("{}", describe(dir.path(), llc)?);
    println!(
        "queue depth {}; buffers rotate through at least {} (4x the last-level cache); {}\n",
        a.queue_depth,
        human(4 * llc),
        fio_version.as_deref().map_or_else(
            || "no fio baseline".to_string(),
            |v| format!("baseline: {v}, direct=1, ioengine={}", a.fio_engine)
        )
    );
    let fio = !a.no_fio;
    for part in &a.parts {
        match part.as_str() {
            "seq" => seq(a, dir.path(), llc, fio)?,
            "get" => gets(a, dir.path(), llc, fio)?,
            "recovery" => recovery(a, dir.path(), llc)?,
            other => bail!("unknown part {other:?} (expected seq, get or recovery)"),
        }
    }
    Ok(())
}

/// Bytes and seconds of a throughput case, summed over rounds.
#[derive(Default, Clone, Copy)]
struct Tput {
    bytes: u64,
    secs: f64,
}

impl Tput {
    fn add(&mut self, bytes: u64, secs: f64) {
        self.bytes += bytes;
        self.secs += secs;
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e9
    }
}

fn seq(a: &TiersArgs, dir: &Path, llc: usize, with_fio: bool) -> anyhow::Result<()> {
    let qd = a.queue_depth as usize;
    let n = a.seq_mib as usize;
    let bytes = (n * MIB) as u64;
    let src = buffers(MIB, 4 * llc, qd);
    let mut dst = buffers(MIB, 4 * llc, qd);
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("seq/{i}").into_bytes()).collect();
    let (mut fio_w, mut fio_r) = (fio::Run::default(), fio::Run::default());
    let mut cases: Vec<(String, Tput, Tput)> = a
        .engines
        .iter()
        .map(|e| (e.clone(), Tput::default(), Tput::default()))
        .collect();
    let fio_file = dir.join("fio-seq.dat");
    let store_file = dir.join("seq.t2");
    for round in 0..a.rounds {
        eprintln!("seq: round {} of {}", round + 1, a.rounds);
        if with_fio {
            let job = |rw| fio::Job {
                file: fio_file.clone(),
                size: bytes,
                bs: MIB as u64,
                rw,
                iodepth: a.queue_depth,
                engine: a.fio_engine.clone(),
            };
            fio_w.append(&fio::run(&job("write"))?);
            fio_r.append(&fio::run(&job("read"))?);
            fio::remove(&fio_file)?;
        }
        for (name, w, r) in &mut cases {
            remove_store(&store_file)?;
            let cfg = store_config(
                &store_file,
                capacity_for(n as u64, MIB as u64),
                engine_kind(name)?,
                a.queue_depth,
            );
            let (store, _) = LogStore::open(cfg).context("opening the store")?;
            *name = store.io_engine().to_string();
            let secs = write_all(&store, &keys, 1, MIB, &src, qd)?;
            w.add(bytes, secs);
            let (secs, hits) = read_all(&store, &keys, 1, &mut dst, qd)?;
            if hits != n as u64 {
                bail!("seq: {hits} of {n} reads hit");
            }
            r.add(bytes, secs);
            let st = store.stats();
            if st.evictions > 0 || st.corrupt > 0 || st.io_errors > 0 {
                bail!("seq: the store evicted, found corrupt entries or failed I/O: {st:?}");
            }
            drop(store);
            remove_store(&store_file)?;
        }
    }
    let fw = with_fio.then(|| fio_w.gbps());
    let fr = with_fio.then(|| fio_r.gbps());
    // The store checksums every value (XXH3-64) on the caller's thread, before a batch's
    // writes and after its reads: measured here on the same cold pool, for context.
    // The best of three passes over the pool.
    let hash = (0..3)
        .map(|_| {
            let start = Instant::now();
            let mut x = 0u64;
            for b in &src {
                x ^= nencache_engine::checksum(std::hint::black_box(b));
            }
            std::hint::black_box(x);
            (src.len() * MIB) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max);
    println!(
        "## T2 sequential bandwidth, 1 MiB values, {} per pass, {} rounds (GB/s)\n",
        human(n * MIB),
        a.rounds
    );
    println!("| case | write | read | write / fio | read / fio |");
    println!("|---|---|---|---|---|");
    if with_fio {
        println!(
            "| fio {} bs=1M iodepth={} | {:.2} | {:.2} | 1.00x | 1.00x |",
            a.fio_engine,
            a.queue_depth,
            fio_w.gbps(),
            fio_r.gbps()
        );
    }
    let mut all = true;
    for (name, w, r) in &cases {
        println!(
            "| LogStore {name}, {} entries per call | {:.2} | {:.2} | {} | {} |",
            a.queue_depth,
            w.gbps(),
            r.gbps(),
            ratio(w.gbps(), fw),
            ratio(r.gbps(), fr)
        );
        if let (Some(fw), Some(fr)) = (fw, fr) {
            all &= w.gbps() >= 0.9 * fw && r.gbps() >= 0.9 * fr;
        }
    }
    println!(
        "\nXXH3-64 of 1 MiB values from the same pool, one thread (best of three passes): \
         {hash:.2} GB/s{}",
        match (fw, fr) {
            (Some(fw), Some(fr)) => format!(
                "; checksumming each batch, then doing its I/O at fio's speed, would give \
                 {:.2} GB/s write ({:.2}x fio) and {:.2} GB/s read ({:.2}x fio)",
                1.0 / (1.0 / fw + 1.0 / hash),
                1.0 / (1.0 / fw + 1.0 / hash) / fw,
                1.0 / (1.0 / fr + 1.0 / hash),
                1.0 / (1.0 / fr + 1.0 / hash) / fr,
            ),
            _ => String::new(),
        }
    );
    if with_fio {
        for (name, w, r) in &cases {
            let (fw, fr) = (fio_w.gbps(), fio_r.gbps());
            println!(
                "\ngoal >= 0.9x fio both ways, {name}: write {:.2}x {}, read {:.2}x {}",
                w.gbps() / fw,
                met(w.gbps() >= 0.9 * fw),
                r.gbps() / fr,
                met(r.gbps() >= 0.9 * fr)
            );
        }
        println!("all engines: {}", met(all));
    }
    println!();
    Ok(())
}

/// An agent run as a child process with a host tier and a T2 tier in the bench directory.
struct Agent {
    socket: PathBuf,
    args: Vec<String>,
}

impl Agent {
    fn start(&self) -> anyhow::Result<Proc> {
        let exe = std::env::current_exe()?;
        let agent = exe.with_file_name("nencache-agent");
        let mut child = Command::new(&agent)
            .args(&self.args)
            .spawn()
            .with_context(|| format!("starting {} (build it with the bench)", agent.display()))?;
        wait_for(&self.socket, &mut child, "nencache-agent")?;
        Ok(Proc(child))
    }

    /// Stops the agent with SIGTERM (it writes what host memory holds to T2 and flushes) and
    /// waits for it to exit.
    fn stop(mut p: Proc) -> anyhow::Result<()> {
        let pid = rustix::process::Pid::from_raw(p.0.id() as i32).context("agent pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        let t = Instant::now();
        loop {
            if let Some(s) = p.0.try_wait()? {
                if !s.success() {
                    bail!("the agent exited with {s} after SIGTERM");
                }
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(300) {
                bail!("the agent did not exit within 300 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the agent gracefully and starts it again: host memory is then empty.
    fn restart(&self, p: Proc) -> anyhow::Result<Proc> {
        Self::stop(p)?;
        self.start()
    }
}

/// Runs `f` on a runtime of its own, dropped at the end: the client's connections close
/// with it (an agent stopping gracefully waits for open connections).
fn on_runtime<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn tier_stats(s: &v1::StatsResponse, tier: v1::Tier) -> v1::TierStats {
    s.tiers
        .iter()
        .find(|t| t.tier == tier as i32)
        .cloned()
        .unwrap_or_default()
}

/// Puts `which` keys, pacing the puts so that demotion keeps up: after each batch, while
/// more than nine tenths of the host tier's entries wait to be written down, waits as long
/// as demotion makes progress. (Demotion keeps only the coldest fifth of the arena written
/// down, so about four fifths normally wait.)
async fn fill(
    socket: &Path,
    keys: &[Vec<u8>],
    which: &[usize],
    src: &[AlignedBuf],
    host_entries: u64,
) -> anyhow::Result<()> {
    let c = Client::connect(socket).await?;
    let size = src[0].len();
    let batch = ((4 * MIB) / size).max(1);
    let limit = host_entries * 9 / 10;
    for chunk in which.chunks(batch) {
        let puts: Vec<Put<'_>> = chunk
            .iter()
            .map(|&i| Put {
                key: &keys[i],
                value: &src[i % src.len()],
                metadata: b"",
                ttl: None,
            })
            .collect();
        c.put_many(&puts).await?;
        let (mut last, mut since) = (u64::MAX, Instant::now());
        loop {
            let s = c.stats().await?;
            if s.commits.saturating_sub(s.demotions) <= limit {
                break;
            }
            if s.demotions != last {
                (last, since) = (s.demotions, Instant::now());
            } else if since.elapsed() > Duration::from_millis(50) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    Ok(())
}

/// The keys that are not on T2 alone (missing, or in host memory), by index.
async fn not_on_t2(socket: &Path, keys: &[Vec<u8>]) -> anyhow::Result<(Vec<usize>, u64)> {
    let c = Client::connect(socket).await?;
    let mut missing = Vec::new();
    let mut in_host = 0;
    for (i, k) in keys.iter().enumerate() {
        let (n, tiers) = c.lookup(&[k.as_slice()]).await?;
        match (n, tiers.first()) {
            (1, Some(v1::Tier::Nvme)) => {}
            (1, _) => in_host += 1,
            _ => missing.push(i),
        }
    }
    Ok((missing, in_host))
}

/// What a get case measured.
struct GetCase {
    bytes: u64,
    secs: f64,
    lat: Histogram<u64>,
    misses: u64,
    from_t2: u64,
    no_space: u64,
    /// Gets of one key already in host memory, after the case.
    host_lat: Histogram<u64>,
    /// Of those, how many were read from T2 all the same.
    host_probe_t2: u64,
    /// The agent's T2 I/O engine, as its stats report it.
    io_engine: String,
}

impl GetCase {
    /// An empty case, its histograms ready.
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            bytes: 0,
            secs: 0.0,
            lat: Histogram::new(3)?,
            misses: 0,
            from_t2: 0,
            no_space: 0,
            host_lat: Histogram::new(3)?,
            host_probe_t2: 0,
            io_engine: String::new(),
        })
    }
}

impl GetCase {
    /// Adds a later round of the same case to `acc`.
    fn add(acc: &mut Option<Self>, o: Self) -> anyhow::Result<()> {
        match acc {
            None => *acc = Some(o),
            Some(a) => {
                a.bytes += o.bytes;
                a.secs += o.secs;
                a.lat.add(&o.lat)?;
                a.misses += o.misses;
                a.from_t2 += o.from_t2;
                a.no_space += o.no_space;
                a.host_lat.add(&o.host_lat)?;
                a.host_probe_t2 += o.host_probe_t2;
            }
        }
        Ok(())
    }

    fn gbps(&self) -> f64 {
        self.bytes as f64 / self.secs.max(1e-9) / 1e9
    }

    fn us(&self, q: f64) -> f64 {
        self.lat.value_at_quantile(q) as f64 / 1e3
    }
}

/// The indexes `0..n` in a random order (the same for the same `seed`).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.range(0, i + 1));
    }
    order
}

/// Reads every key once, in the get cases' order, `per_call` per `LogStore::read` call,
/// straight from the agent's tier file (the agent stopped): the store's share of a get.
fn direct_reads(
    cfg: &StoreConfig,
    keys: &[Vec<u8>],
    per_call: usize,
    dst: &mut [AlignedBuf],
    seed: u64,
) -> anyhow::Result<GetCase> {
    let (store, rec) = LogStore::open(cfg.clone()).context("opening the agent's tier")?;
    if rec.entries < keys.len() as u64 {
        bail!(
            "the agent's tier holds {} entries, fewer than the {} put (reset: {:?})",
            rec.entries,
            keys.len(),
            rec.reset
        );
    }
    if dst.len() < per_call {
        bail!("fewer destination buffers than keys per call");
    }
    let ptrs: Vec<*mut u8> = dst.iter_mut().map(|b| b.as_mut_ptr()).collect();
    let mut out = GetCase::new()?;
    let mut next = 0;
    let start = Instant::now();
    for chunk in shuffled(keys.len(), seed).chunks(per_call) {
        let t0 = Instant::now();
        let mut reqs: Vec<ReadReq<'_>> = Vec::with_capacity(per_call);
        for &i in chunk {
            // Lower tiers index a key by XXH3-128 with seed 0 (the engine's `lower_hash`).
            let hash = nencache_engine::key_hash(&keys[i], 0);
            let Some(loc) = store.locate(hash) else {
                out.misses += 1;
                continue;
            };
            if loc.value_len > dst[0].len() as u64 {
                bail!("an entry is larger than its buffer");
            }
            reqs.push(ReadReq {
                hash,
                key: &keys[i],
                loc,
                dst: ptrs[next % ptrs.len()],
                metadata: Vec::new(),
                outcome: ReadOutcome::Pending,
            });
            next += 1;
        }
        // SAFETY: the destinations of one call are distinct buffers (at most `per_call`
        // consecutive indexes modulo at least `per_call` buffers), 4096-aligned and at least
        // `value_len` (a multiple of 4096) long; nothing else touches them meanwhile.
        unsafe { store.read(&mut reqs) };
        out.lat.record(t0.elapsed().as_nanos() as u64)?;
        for r in &reqs {
            if r.outcome == ReadOutcome::Hit {
                out.bytes += r.loc.value_len;
                out.from_t2 += 1;
            } else {
                out.misses += 1;
            }
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    Ok(out)
}

/// Gets every key once in random order, `per_call` keys per call.
async fn get_case(
    socket: &Path,
    keys: &[Vec<u8>],
    per_call: usize,
    seed: u64,
    host_probe: usize,
) -> anyhow::Result<GetCase> {
    let c = Client::connect(socket).await?;
    let order = shuffled(keys.len(), seed);
    let before = c.stats().await?;
    let mut out = GetCase::new()?;
    let start = Instant::now();
    for chunk in order.chunks(per_call) {
        let ks: Vec<&[u8]> = chunk.iter().map(|&i| keys[i].as_slice()).collect();
        let t0 = Instant::now();
        let got = c.get(&ks).await?;
        out.lat.record(t0.elapsed().as_nanos() as u64)?;
        for v in got {
            match v {
                Some(v) => out.bytes += v.len() as u64,
                None => out.misses += 1,
            }
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    c.flush_releases().await?;
    let after = c.stats().await?;
    out.from_t2 = tier_stats(&after, v1::Tier::Nvme)
        .hits
        .saturating_sub(tier_stats(&before, v1::Tier::Nvme).hits);
    out.no_space = after.no_space.saturating_sub(before.no_space);
    out.io_engine = tier_stats(&after, v1::Tier::Nvme).io_engine;
    // The floor of a get: the last keys read are now in host memory; get them again, one
    // per call (host hits: no device read).
    let recent = &order[order.len().saturating_sub(host_probe)..];
    for &i in recent {
        let t0 = Instant::now();
        let got = c.get(&[keys[i].as_slice()]).await?;
        out.host_lat.record(t0.elapsed().as_nanos() as u64)?;
        drop(got);
    }
    c.flush_releases().await?;
    let probe = c.stats().await?;
    out.host_probe_t2 = tier_stats(&probe, v1::Tier::Nvme)
        .hits
        .saturating_sub(tier_stats(&after, v1::Tier::Nvme).hits);
    Ok(out)
}

fn gets(a: &TiersArgs, dir: &Path, llc: usize, with_fio: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &size in &a.get_sizes {
        if size % 4096 != 0 {
            bail!("get: value size {size} is not a multiple of 4096");
        }
        let n = ((a.get_mib as usize) << 20) / size;
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("t2get/{size}/{i}").into_bytes())
            .collect();
        let src = buffers(size, 4 * llc, 1);
        let tier = dir.join(format!("agent-{size}.t2"));
        let socket = dir.join("agent.sock");
        let host = a.host_mib << 20;
        let t2 = capacity_for(n as u64, size as u64) + 2 * REGION;
        // The tier goes in a configuration file: its queue depth and region size have no
        // flags, and the direct reads below open the same file with the same layout.
        let t2_cfg = store_config(&tier, t2, engine_kind(&a.agent_io_engine)?, a.queue_depth);
        let config = dir.join("agent.yaml");
        std::fs::write(
            &config,
            format!(
                "tiers:\n  nvme:\n    path: {:?}\n    size: {t2}\n    region_size: {REGION}\n    \
                 io_engine: {}\n    queue_depth: {}\n",
                tier.display().to_string(),
                a.agent_io_engine,
                a.queue_depth
            ),
        )?;
        let agent = Agent {
            socket: socket.clone(),
            args: [
                "serve",
                "--admin-addr",
                "off",
                "--log-level",
                "warn",
                "--shutdown-grace",
                "300s",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([
                "--config".into(),
                config.display().to_string(),
                "--socket".into(),
                socket.display().to_string(),
                "--host-capacity".into(),
                format!("{host}"),
                "--staging-size".into(),
                format!("{}", (host / 4).max(3 * size as u64)),
                "--max-value".into(),
                format!("{size}"),
            ])
            .collect(),
        };
        eprintln!("get {}: filling {} values", human(size), n);
        let mut p = agent.start()?;
        // An entry takes the value's pages and one for its key.
        let host_entries = host / ((size as u64).div_ceil(4096) + 1) / 4096;
        let all: Vec<usize> = (0..n).collect();
        on_runtime(fill(&socket, &keys, &all, &src, host_entries))?;
        let mut left = 0;
        for attempt in 0..5 {
            p = agent.restart(p)?;
            let (missing, in_host) = on_runtime(not_on_t2(&socket, &keys))?;
            if in_host > 0 {
                bail!("{in_host} keys are in host memory right after a restart");
            }
            left = missing.len();
            if missing.is_empty() {
                break;
            }
            eprintln!(
                "get {}: {} values were evicted before demotion wrote them (attempt {}); \
                 putting them again",
                human(size),
                missing.len(),
                attempt + 1
            );
            on_runtime(fill(&socket, &keys, &missing, &src, host_entries))?;
        }
        if left > 0 {
            bail!("{left} values never reached T2");
        }
        let fio_file = dir.join("fio-rand.dat");
        let job = |rw, iodepth| fio::Job {
            file: fio_file.clone(),
            size: (n * size) as u64,
            bs: size as u64,
            rw,
            iodepth,
            engine: a.fio_engine.clone(),
        };
        if with_fio {
            // Lay the file out (not measured).
            fio::run(&job("write", a.queue_depth))?;
        }
        let mut dst = buffers(size, 4 * llc, a.queue_depth as usize);
        let mut running = Some(p);
        // Keys re-read as host hits after each case: the last quarter of the host tier's.
        let probe = (host_entries as usize / 4).clamp(1, 256);
        let qds = [1usize, a.queue_depth as usize];
        let mut acc: Vec<(Vec<fio::Run>, Option<GetCase>, Option<GetCase>)> =
            qds.iter().map(|_| (Vec::new(), None, None)).collect();
        // Rounds take turns (fio, LogStore, agent; QD 1, then QD 32), so that the device's
        // moods fall on every case alike.
        for round in 0..a.get_rounds {
            eprintln!(
                "get {}: round {} of {}",
                human(size),
                round + 1,
                a.get_rounds
            );
            for (c, &per_call) in qds.iter().enumerate() {
                let seed = 7 + per_call as u64 + 1000 * round as u64;
                if with_fio {
                    acc[c].0.push(fio::run(&job("randread", per_call as u32))?);
                }
                // The same reads straight from the agent's tier file, without the agent.
                if let Some(p) = running.take() {
                    Agent::stop(p)?;
                }
                let d = direct_reads(&t2_cfg, &keys, per_call, &mut dst, seed)?;
                // Host memory empty: every value is read from T2.
                let p = agent.start()?;
                let g = on_runtime(get_case(&socket, &keys, per_call, seed, probe))?;
                running = Some(p);
                GetCase::add(&mut acc[c].1, d)?;
                GetCase::add(&mut acc[c].2, g)?;
            }
        }
        for ((runs, d, g), &per_call) in acc.into_iter().zip(&qds) {
            let (Some(d), Some(g)) = (d, g) else {
                bail!("get: no rounds (--get-rounds 0)");
            };
            rows.push((size, per_call, fio::combine(&runs), d, g));
        }
        if let Some(p) = running {
            Agent::stop(p)?;
        }
        fio::remove(&fio_file)?;
        remove_store(&tier)?;
    }
    println!(
        "## Gets of values on T2 only, through the client ({} MiB of values per size, host \
         tier {} MiB, every key once per round in random order, {} rounds)\n",
        a.get_mib, a.host_mib, a.get_rounds
    );
    if let Some((_, _, _, _, g)) = rows.first() {
        println!("The agent's T2 I/O engine: {}.\n", g.io_engine);
    }
    println!(
        "| value | keys per call (QD) | fio GB/s | LogStore GB/s | get GB/s | LogStore / fio | \
         get / fio | fio p50 µs | LogStore p50 µs | get p50 µs | get p50 / fio | fio p99 µs | \
         get p99 µs | get misses | values read from T2 by gets | host-hit get p50 µs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut goals = Vec::new();
    for (size, qd, base, d, g) in &rows {
        let f = base.as_ref();
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        println!(
            "| {} | {qd} | {} | {:.2} | {:.2} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {:.0} | {} \
             | {} | {:.0}{} |",
            human(*size),
            opt(f.map(fio::Run::gbps), 2),
            d.gbps(),
            g.gbps(),
            ratio(d.gbps(), f.map(fio::Run::gbps)),
            ratio(g.gbps(), f.map(fio::Run::gbps)),
            opt(f.map(|f| f.p50_us), 0),
            d.us(0.5),
            g.us(0.5),
            ratio(g.us(0.5), f.map(|f| f.p50_us)),
            opt(f.map(|f| f.p99_us), 0),
            g.us(0.99),
            if g.no_space > 0 {
                format!("{} ({} no space)", g.misses, g.no_space)
            } else {
                g.misses.to_string()
            },
            g.from_t2,
            g.host_lat.value_at_quantile(0.5) as f64 / 1e3,
            if g.host_probe_t2 > 0 {
                format!(
                    " ({} of {} read from T2)",
                    g.host_probe_t2,
                    g.host_lat.len()
                )
            } else {
                String::new()
            },
        );
        if d.misses > 0 {
            println!(
                "\n(direct reads: {} of {} missed)\n",
                d.misses,
                d.misses + d.from_t2
            );
        }
        if let Some(f) = f {
            let tput = g.gbps() * 1.2 >= f.gbps();
            let lat = *qd > 1 || g.us(0.5) <= 1.2 * f.p50_us;
            goals.push(format!(
                "{} QD {qd}: throughput {:.2}x fio{}: {}",
                human(*size),
                g.gbps() / f.gbps(),
                if *qd == 1 {
                    format!(", p50 latency {:.2}x fio", g.us(0.5) / f.p50_us)
                } else {
                    String::new()
                },
                met(tput && lat)
            ));
        }
    }
    println!(
        "\nAt QD 1 a get's latency is one call for one value; at QD {} it is one call for {} \
         values (so is LogStore's), while fio's is one I/O's. LogStore: the same reads in the same \
         order through `LogStore::read` on the agent's tier file, the agent stopped. Throughput is \
         summed over the rounds; fio's percentiles are the median of its rounds', the others' \
         are over every call of every round. Host-hit get: after each case, the last keys it read \
         (now in host memory) got again, one per call: the agent's round trip without the device.",
        a.queue_depth, a.queue_depth
    );
    if !goals.is_empty() {
        println!("\ngoal: within 1.2x of fio (throughput; and p50 latency at QD 1)\n");
        for g in goals {
            println!("- {g}");
        }
    }
    println!();
    Ok(())
}

fn recovery(a: &TiersArgs, dir: &Path, llc: usize) -> anyhow::Result<()> {
    let qd = a.queue_depth as usize;
    let mut rows = Vec::new();
    for &size in &a.recovery_sizes {
        if size % 4096 != 0 {
            bail!("recovery: value size {size} is not a multiple of 4096");
        }
        let n = ((a.recovery_gib as usize) << 30) / size;
        let gib = (n * size) as f64 / f64::from(1u32 << 30);
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("recovery/{size}/{i}").into_bytes())
            .collect();
        let src = buffers(size, 4 * llc, qd);
        let path = dir.join("recovery.t2");
        remove_store(&path)?;
        let cfg = store_config(
            &path,
            capacity_for(n as u64, size as u64),
            IoEngineKind::Auto,
            a.queue_depth,
        );
        eprintln!("recovery {}: writing {gib:.1} GiB", human(size));
        let (s, _) = LogStore::open(cfg.clone())?;
        write_all(&s, &keys, 3, size, &src, qd)?;
        let written = s.stats().entries;
        let timed_open = || -> anyhow::Result<(LogStore, nencache_store::Recovery, Duration)> {
            let t = Instant::now();
            let (s, r) = LogStore::open(cfg.clone())?;
            Ok((s, r, t.elapsed()))
        };
        // Dropped without flush: what a crash (kill -9) leaves.
        drop(s);
        let (s, crash, crash_wall) = timed_open()?;
        s.flush()?;
        drop(s);
        let (s, clean, clean_wall) = timed_open()?;
        drop(s);
        // Without any checkpoint: every region is scanned.
        fio::remove(&PathBuf::from(format!("{}.ckpt", path.display())))?;
        let (s, scan, scan_wall) = timed_open()?;
        drop(s);
        remove_store(&path)?;
        for (case, r, wall) in [
            ("crash: dropped without flush", crash, crash_wall),
            ("clean: flushed, then dropped", clean, clean_wall),
            ("no checkpoint file: full scan", scan, scan_wall),
        ] {
            rows.push((size, gib, written, case, r, wall));
        }
    }
    println!("## Recovery: `LogStore::open` of a store full of values\n");
    println!(
        "| values | GiB | entries written | case | recovery ms | ms per GiB | open, wall ms | \
         entries found | scanned MiB | checkpoint used |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (size, gib, written, case, r, wall) in &rows {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "| {} | {gib:.2} | {written} | {case} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {} |",
            human(*size),
            ms(r.elapsed),
            ms(r.elapsed) / gib,
            ms(*wall),
            r.entries,
            r.scanned_bytes as f64 / f64::from(1u32 << 20),
            if r.from_checkpoint { "yes" } else { "no" },
        );
    }
    println!(
        "\nrecovery ms is the store's own `Recovery::elapsed`; open is the wall time of the \
         whole `LogStore::open` call."
    );
    println!();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_holds_the_values() {
        // 1 MiB values: 15 entries of 1 MiB + 4 KiB per 16 MiB region.
        assert_eq!(capacity_for(15, 1 << 20), 3 * REGION);
        assert_eq!(capacity_for(16, 1 << 20), 4 * REGION);
        assert_eq!(entry_bytes(64 << 10), 68 << 10);
        assert_ne!(hash_of(1, 1), hash_of(1, 2));
        assert_ne!(hash_of(1, 1), hash_of(2, 1));
    }

    #[test]
    fn store_round_trip_and_recovery() -> anyhow::Result<()> {
        let dir = tempfile::tempdir_in(".")?;
        let path = dir.path().join("t.t2");
        let cfg = store_config(&path, 8 * REGION, IoEngineKind::Auto, 4);
        let keys: Vec<Vec<u8>> = (0..10).map(|i| format!("k{i}").into_bytes()).collect();
        let src = buffers(64 << 10, 0, 4);
        let mut dst = buffers(64 << 10, 0, 4);
        let (s, _) = LogStore::open(cfg.clone())?;
        write_all(&s, &keys, 9, 64 << 10, &src, 4)?;
        let (_, hits) = read_all(&s, &keys, 9, &mut dst, 4)?;
        assert_eq!(hits, 10);
        drop(s);
        let (s, rec) = LogStore::open(cfg)?;
        assert_eq!(rec.entries, 10);
        drop(s);
        remove_store(&path)?;
        assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
        Ok(())
    }
}
