//! The `nencache` command-line tool: `put`, `get`, `delete`, `lookup` and `stats` against a
//! running agent; `demo`, which starts an agent with embedded defaults on a temporary
//! socket and drives an LLM chat workload through the real client; and `lmcache convert`,
//! which turns an LMCache configuration into the agent's ([`crate::lmconvert`]).

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use nencache_client::{Client, Put};
use nencache_engine::traces::{ChatConfig, ChatWorkload};

use crate::{
    config::{ByteSize, ServeArgs, default_runtime_dir},
    server::Agent,
};

/// `nencache`: talk to a NenCache agent, or run the demo.
#[derive(Debug, Parser)]
#[command(
    name = "nencache",
    version,
    about = "Talk to a NenCache agent (put, get, lookup, delete, stats), or run the demo"
)]
pub struct Cli {
    /// The agent's gRPC socket [default: $NENCACHE_SOCKET, else the agent's default path].
    #[arg(long, global = true, env = "NENCACHE_SOCKET")]
    pub socket: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Store a value.
    Put {
        /// The key (UTF-8; use --hex-key for bytes).
        key: String,
        /// The value, from the command line.
        #[arg(long, conflicts_with = "file")]
        value: Option<String>,
        /// The value, from a file (`-` for standard input).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Metadata stored with the value.
        #[arg(long, default_value = "")]
        metadata: String,
        /// Treat the key as hex.
        #[arg(long)]
        hex_key: bool,
    },
    /// Print a value to standard output (exit status 1 when missing).
    Get {
        /// The key.
        key: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Treat the key as hex.
        #[arg(long)]
        hex_key: bool,
    },
    /// Delete keys.
    Delete {
        /// The keys.
        keys: Vec<String>,
    },
    /// How many leading keys are cached.
    Lookup {
        /// The keys, in prompt order.
        keys: Vec<String>,
    },
    /// Print the agent's counters.
    Stats,
    /// Start an agent on a temporary socket and drive a chat workload through it.
    Demo(DemoArgs),
    /// LMCache compatibility tools.
    #[command(subcommand)]
    Lmcache(LmcacheCommand),
}

/// `nencache lmcache ...`.
#[derive(Debug, Subcommand)]
pub enum LmcacheCommand {
    /// Turn an LMCache configuration into a NenCache agent configuration, the LMCache
    /// settings that point LMCache at the agent, and a report on every key.
    Convert(ConvertArgs),
}

/// `nencache lmcache convert` options.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// The LMCache configuration file (YAML or JSON).
    #[arg(required_unless_present = "env", conflicts_with = "env")]
    pub file: Option<PathBuf>,
    /// Read the configuration as LMCache does from its environment: the file named by
    /// LMCACHE_CONFIG_FILE when set, with the LMCACHE_* variables over it.
    #[arg(long)]
    pub env: bool,
    /// LMCache processes (tensor-parallel ranks) per node; LMCache's sizes are per rank.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub ranks_per_node: u32,
    /// Where LMCache reaches the agent's lm:// listener.
    #[arg(long, default_value = "localhost:65432")]
    pub lm_addr: String,
    /// The address the agent's lm:// listener binds.
    #[arg(long, default_value = "0.0.0.0:65432")]
    pub lm_listen: String,
    /// Write agent.yaml, lmcache.yaml and report.txt here instead of standard output.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Exit with status 2 when a key given has no NenCache counterpart.
    #[arg(long)]
    pub strict: bool,
}

/// Demo options.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Chat requests to send.
    #[arg(long, default_value_t = 600)]
    pub requests: usize,
    /// Concurrent users.
    #[arg(long, default_value_t = 24)]
    pub users: usize,
    /// Client tasks sending requests in parallel.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Bytes of KV per chunk of 256 tokens.
    #[arg(long, default_value = "2MiB")]
    pub chunk_bytes: ByteSize,
    /// Host-memory arena of the demo agent: small, so that the workload spills to the
    /// lower tier and comes back.
    #[arg(long, default_value = "256MiB")]
    pub host_capacity: ByteSize,
    /// The demo agent's lower tier (a file in its temporary directory, O_DIRECT).
    #[arg(long, default_value = "2GiB")]
    pub tier_size: ByteSize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn key_bytes(key: &str, hex: bool) -> anyhow::Result<Vec<u8>> {
    if !hex {
        return Ok(key.as_bytes().to_vec());
    }
    if !key.len().is_multiple_of(2) {
        bail!("hex key {key:?} has an odd number of digits");
    }
    (0..key.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&key[i..i + 2], 16).with_context(|| format!("hex key {key:?}")))
        .collect()
}

/// Runs the tool. `xdg_runtime_dir` locates the default socket.
///
/// # Errors
/// Whatever the agent or the local system refused, with context.
pub async fn run(cli: Cli, xdg_runtime_dir: Option<&Path>) -> anyhow::Result<i32> {
    let socket = cli
        .socket
        .unwrap_or_else(|| default_runtime_dir(xdg_runtime_dir).join("agent.sock"));
    let connect = || async {
        Client::connect(&socket)
            .await
            .with_context(|| format!("is an agent serving {}?", socket.display()))
    };
    match cli.command {
        Command::Put {
            key,
            value,
            file,
            metadata,
            hex_key,
        } => {
            let key = key_bytes(&key, hex_key)?;
            let data = match (value, file) {
                (Some(v), _) => v.into_bytes(),
                (None, Some(f)) if f.as_os_str() == "-" => {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                    b
                }
                (None, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?
                }
                (None, None) => bail!("give the value with --value or --file"),
            };
            let outcome = connect()
                .await?
                .put(&key, &data, metadata.as_bytes())
                .await?;
            println!("{outcome:?}: {} bytes", data.len());
            Ok(0)
        }
        Command::Get { key, out, hex_key } => {
            let key = key_bytes(&key, hex_key)?;
            let client = connect().await?;
            let Some(v) = client.get(&[&key]).await?.pop().flatten() else {
                eprintln!("not found");
                return Ok(1);
            };
            match out {
                Some(p) => std::fs::write(&p, v.as_slice())
                    .with_context(|| format!("writing {}", p.display()))?,
                None => std::io::stdout().write_all(&v)?,
            }
            Ok(0)
        }
        Command::Delete { keys } => {
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            println!("deleted {}", connect().await?.delete(&refs).await?);
            Ok(0)
        }
        Command::Lookup { keys } => {
            let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
            let (n, tiers) = connect().await?.lookup(&refs).await?;
            println!("{n} of {} leading keys cached {tiers:?}", keys.len());
            Ok(0)
        }
        Command::Stats => {
            println!("{:#?}", connect().await?.stats().await?);
            Ok(0)
        }
        Command::Demo(args) => demo(args).await.map(|()| 0),
        Command::Lmcache(LmcacheCommand::Convert(args)) => convert(&args),
    }
}

/// `nencache lmcache convert`.
fn convert(args: &ConvertArgs) -> anyhow::Result<i32> {
    use crate::lmconvert;
    let file = if args.env {
        std::env::var_os("LMCACHE_CONFIG_FILE").map(PathBuf::from)
    } else {
        args.file.clone()
    };
    let mut cfg = match file {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            lmconvert::parse_file(&text).with_context(|| path.display().to_string())?
        }
        None => Default::default(),
    };
    if args.env {
        // LMCache 0.5 applies its LMCACHE_* variables over the file's values.
        cfg.extend(lmconvert::from_env(std::env::vars()));
    }
    let out = lmconvert::convert(
        &cfg,
        &lmconvert::Options {
            ranks_per_node: args.ranks_per_node,
            lm_addr: args.lm_addr.clone(),
            lm_listen: args.lm_listen.clone(),
            ..lmconvert::Options::default()
        },
    )?;
    match &args.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, body) in [
                ("agent.yaml", &out.agent_yaml),
                ("lmcache.yaml", &out.lmcache_yaml),
                ("report.txt", &out.report_text()),
            ] {
                std::fs::write(dir.join(name), body)
                    .with_context(|| format!("writing {}", dir.join(name).display()))?;
            }
            eprintln!(
                "wrote agent.yaml, lmcache.yaml and report.txt to {}",
                dir.display()
            );
        }
        None => {
            print!(
                "# ---- NenCache agent configuration (agent.yaml) ----\n{}\n\
                 # ---- LMCache configuration (lmcache.yaml) ----\n{}\n\
                 # ---- Report: key, what became of it, why ----\n",
                out.agent_yaml, out.lmcache_yaml
            );
            for line in out.report_text().lines() {
                println!("# {line}");
            }
        }
    }
    Ok(if args.strict && out.has_unsupported() {
        2
    } else {
        0
    })
}

/// Fills `buf` with bytes derived from `key`, as a stand-in for a chunk's KV tensors.
fn synth_kv(key: &[u8], buf: &mut [u8]) {
    let mut x = u64::from_le_bytes(key[..8].try_into().unwrap_or([1; 8])) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
}

#[derive(Debug, Default)]
struct DemoTotals {
    chunks: u64,
    hit_chunks: u64,
    bytes_read: u64,
    bytes_written: u64,
    corrupt: u64,
}

/// The demo: an agent with embedded defaults on a temporary socket, and chat traffic.
///
/// # Errors
/// When the agent cannot start or a call fails.
pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("nencache-demo-")
        .tempdir()?;
    let serve = ServeArgs {
        socket: Some(dir.path().join("agent.sock")),
        admin_addr: Some("127.0.0.1:0".into()),
        host_capacity: Some(args.host_capacity),
        staging_size: Some(ByteSize(args.host_capacity.0 / 4)),
        max_value: Some(ByteSize(args.chunk_bytes.0.max(1 << 20))),
        nvme_path: Some(dir.path().join("cache.t2")),
        nvme_size: Some(args.tier_size),
        ..ServeArgs::default()
    };
    let settings = serve.resolve(None)?;
    let capacity = settings.engine.host.capacity;
    let started = Instant::now();
    let agent = Agent::bind(settings).await?;
    let socket = agent.socket().to_path_buf();
    let engine = agent.engine().clone();
    println!(
        "agent: host tier {}, nvme tier {} ({}) on {} (admin http://{}/metrics), ready in {:.0} ms",
        ByteSize(capacity),
        args.tier_size,
        engine.tier_stats().first().map_or("none", |t| t.io_engine),
        socket.display(),
        agent
            .admin_addr()
            .map_or_else(|| "off".into(), |a| a.to_string()),
        started.elapsed().as_secs_f64() * 1e3
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(agent.serve(async {
        let _ = stop_rx.await;
    }));

    let chunk = args.chunk_bytes.0 as usize;
    println!(
        "workload: {} requests from {} users sharing system prompts, {} KV per 256-token chunk, {} client tasks",
        args.requests,
        args.users,
        ByteSize(chunk as u64),
        args.clients
    );
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.requests as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let per = args.requests.div_ceil(args.clients.max(1));
    for c in 0..args.clients.max(1) {
        let socket = socket.clone();
        let bar = bar.clone();
        let n = per.min(args.requests.saturating_sub(c * per));
        let users = args.users.div_ceil(args.clients.max(1)).max(1);
        tasks.push(tokio::spawn(async move {
            demo_client(&socket, c as u64, users, n, chunk, &bar).await
        }));
    }
    let mut totals = DemoTotals::default();
    let mut lat = Histogram::<u64>::new(3)?;
    for t in tasks {
        let (tot, h) = t.await??;
        totals.chunks += tot.chunks;
        totals.hit_chunks += tot.hit_chunks;
        totals.bytes_read += tot.bytes_read;
        totals.bytes_written += tot.bytes_written;
        totals.corrupt += tot.corrupt;
        lat.add(h)?;
    }
    bar.finish_and_clear();
    let wall = t0.elapsed().as_secs_f64();
    let stats = Client::connect(&socket).await?.stats().await?;
    println!("results over {wall:.2} s:");
    println!(
        "  chunk hit rate   {:.1}% ({} of {} prompt chunks served from cache)",
        100.0 * totals.hit_chunks as f64 / totals.chunks.max(1) as f64,
        totals.hit_chunks,
        totals.chunks
    );
    println!(
        "  requests         {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms (lookup + get + copy out + put of misses)",
        args.requests as f64 / wall,
        lat.value_at_quantile(0.5) as f64 / 1e3,
        lat.value_at_quantile(0.99) as f64 / 1e3
    );
    println!(
        "  data moved       {:.2} GB read from the cache into client buffers, {:.2} GB written into it: {:.2} GB/s combined over the wall time",
        totals.bytes_read as f64 / 1e9,
        totals.bytes_written as f64 / 1e9,
        (totals.bytes_read + totals.bytes_written) as f64 / wall / 1e9
    );
    for t in &stats.tiers {
        let name = nencache_api::v1::Tier::try_from(t.tier)
            .map_or("?", |t| t.as_str_name())
            .trim_start_matches("TIER_")
            .to_ascii_lowercase();
        println!(
            "  tier {name:<11} {} hits, {} entries, {} used of {}, {} evictions{}",
            t.hits,
            t.entries,
            ByteSize(t.used_bytes),
            ByteSize(t.capacity_bytes),
            t.evictions,
            if t.degraded.is_empty() {
                String::new()
            } else {
                format!(", degraded: {}", t.degraded)
            }
        );
    }
    println!(
        "  movement         {} values promoted from the lower tier, {} demoted to it, {} evicted unsaved",
        stats.promotions, stats.demotions, stats.evictions_unsaved
    );
    let _ = stop_tx.send(());
    server.await??;
    if totals.corrupt > 0 {
        bail!("{} values read back with the wrong bytes", totals.corrupt);
    }
    println!("  integrity        every value read back matched what was written");
    Ok(())
}

async fn demo_client(
    socket: &Path,
    seed: u64,
    users: usize,
    requests: usize,
    chunk: usize,
    bar: &ProgressBar,
) -> anyhow::Result<(DemoTotals, Histogram<u64>)> {
    let client = Client::connect(socket).await?;
    let mut w = ChatWorkload::new(ChatConfig {
        users,
        seed: 0x5eed + seed,
        ..ChatConfig::default()
    });
    let mut tot = DemoTotals::default();
    let mut lat = Histogram::<u64>::new(3)?;
    let mut gpu = vec![0u8; chunk];
    let mut expect = vec![0u8; chunk];
    let mut fresh: Vec<Vec<u8>> = Vec::new();
    for _ in 0..requests {
        let req = w.next_request();
        let t = Instant::now();
        let keys: Vec<&[u8]> = req.keys.iter().map(|k| &k[..]).collect();
        let (prefix, _) = client.lookup(&keys).await?;
        let mut served = 0;
        if prefix > 0 {
            for v in client.get(&keys[..prefix]).await? {
                // A value evicted between lookup and get is recomputed like any miss.
                let Some(v) = v else { break };
                gpu[..v.len()].copy_from_slice(&v);
                // Check every byte that came back.
                synth_kv(keys[served], &mut expect[..v.len()]);
                if gpu[..v.len()] != expect[..v.len()] {
                    tot.corrupt += 1;
                }
                tot.bytes_read += v.len() as u64;
                served += 1;
            }
        }
        // "Prefill" the rest and store it.
        fresh.resize_with(keys.len() - served, Vec::new);
        for (buf, k) in fresh.iter_mut().zip(&keys[served..]) {
            buf.resize(chunk, 0);
            synth_kv(k, buf);
        }
        let puts: Vec<Put<'_>> = fresh
            .iter()
            .zip(&keys[served..])
            .map(|(v, k)| Put {
                key: k,
                value: v,
                metadata: b"fmt=KV_2LTD",
                ttl: None,
            })
            .collect();
        for batch in puts.chunks(16) {
            client.put_many(batch).await?;
        }
        tot.bytes_written += (puts.len() * chunk) as u64;
        tot.chunks += keys.len() as u64;
        tot.hit_chunks += served as u64;
        lat.record(t.elapsed().as_micros() as u64)?;
        bar.inc(1);
        bar.set_message(format!(
            "hit rate {:.0}%",
            100.0 * tot.hit_chunks as f64 / tot.chunks.max(1) as f64
        ));
    }
    Ok((tot, lat))
}
