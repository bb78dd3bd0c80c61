//! Agent configuration: one typed structure read from an optional YAML file, then overridden
//! by command-line flags and `NENCACHE_AGENT_*` environment variables, and validated once into
//! [`Settings`]. Every setting has a default, so the agent runs with no configuration at all.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::Args;
use nencache_engine::{
    Admission, DemotionConfig, EngineConfig, EvictionPolicy, HostConfig, IoEngineKind, Limits,
    StoreConfig, Tier, TierConfig,
};
use serde::Deserialize;

/// A configuration problem, reported before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid YAML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_yaml_ng::Error,
    },
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// A byte count written as an integer or with a binary or decimal unit (`512MiB`, `1GiB`,
/// `4k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid byte size {s:?}"))?;
        let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "ki" | "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mi" | "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gi" | "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "ti" | "tib" => 1 << 40,
            other => return Err(format!("unknown unit {other:?} in byte size {s:?}")),
        };
        n.checked_mul(mul)
            .map(Self)
            .ok_or_else(|| format!("byte size {s:?} overflows"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Self(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n >= 1 << shift {
                return if n.is_multiple_of(1 << shift) {
                    write!(f, "{}{unit}", n >> shift)
                } else {
                    write!(f, "{:.1}{unit}", n as f64 / (1u64 << shift) as f64)
                };
            }
        }
        write!(f, "{n}B")
    }
}

/// A duration written as milliseconds (integer) or with a unit (`250ms`, `30s`, `5m`, `1h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
        let d = match unit.trim() {
            "" | "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => return Err(format!("unknown unit {other:?} in duration {s:?}")),
        };
        Ok(Self(d))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Self(Duration::from_millis(n))),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The configuration file's schema (every field optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    /// gRPC socket path.
    pub socket: Option<PathBuf>,
    /// Admin HTTP address (health, readiness, metrics); `off` disables it.
    pub admin_addr: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
    /// Log filter (`info`, `nencache_agent=debug`, ...).
    pub log_level: Option<String>,
    /// OTLP/gRPC endpoint for traces; unset means no export.
    pub otlp_endpoint: Option<String>,
    /// Time allowed for in-flight calls at shutdown.
    pub shutdown_grace: Option<HumanDuration>,
    /// Host-memory tier.
    #[serde(default)]
    pub host: HostFileConfig,
    /// Bounds on tables and batches.
    #[serde(default)]
    pub limits: LimitsFileConfig,
    /// Directory for the default lower tier (when no `tiers` section is given).
    pub data_dir: Option<PathBuf>,
    /// Lower tiers. Absent: a default disk-backed tier in `data_dir`; `{}`: none.
    pub tiers: Option<TiersFileConfig>,
    /// LMCache-compatible listeners (off unless given).
    #[serde(default)]
    pub compat: CompatFileConfig,
}

/// `compat:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct CompatFileConfig {
    /// LMCache's `lm://` protocol.
    pub lm: Option<ListenFileConfig>,
    /// The Redis protocol (RESP2, RESP3).
    pub redis: Option<RedisFileConfig>,
}

/// `compat.redis:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RedisFileConfig {
    /// TCP address, `host:port`.
    pub tcp: Option<String>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// The password clients must give (`AUTH`, `HELLO ... AUTH`).
    pub password: Option<String>,
    /// Whether `FLUSHDB`/`FLUSHALL` may empty the cache.
    pub allow_flush: Option<bool>,
}

/// Where a compat listener listens: TCP, a Unix socket, or both.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ListenFileConfig {
    /// TCP address, `host:port`.
    pub tcp: Option<String>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
}

/// `tiers:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TiersFileConfig {
    /// T2: a log-structured store on one file or block device, O_DIRECT.
    pub nvme: Option<TierFileConfig>,
    /// T3: memory-mapped segment files in a directory.
    pub disk: Option<TierFileConfig>,
    /// Share of the arena, in percent, whose coldest entries are written down ahead of
    /// eviction.
    pub demotion_clean_percent: Option<u8>,
    /// Most bytes being written down at once.
    pub demotion_queue: Option<ByteSize>,
}

/// One lower tier.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TierFileConfig {
    /// nvme: the file or block device; disk: the directory.
    pub path: Option<PathBuf>,
    /// Capacity; 0 disables the tier.
    pub size: Option<ByteSize>,
    /// Unit of allocation and eviction.
    pub region_size: Option<ByteSize>,
    /// nvme only: `auto`, `io_uring` or `pread`.
    pub io_engine: Option<String>,
    /// I/Os in flight per batch.
    pub queue_depth: Option<u32>,
    /// `all` or `reused`.
    pub admission: Option<String>,
}

/// `host:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct HostFileConfig {
    /// Arena size.
    pub capacity: Option<ByteSize>,
    /// Staging area size.
    pub staging: Option<ByteSize>,
    /// Allocation granule.
    pub page_size: Option<ByteSize>,
    /// Largest value.
    pub max_value: Option<ByteSize>,
    /// `s3fifo` or `lru`.
    pub eviction: Option<String>,
    /// S3-FIFO small-queue share of the arena, in percent.
    pub small_queue_percent: Option<u8>,
    /// Lock the arena into RAM.
    pub lock_memory: Option<bool>,
    /// Default TTL for entries.
    pub default_ttl: Option<HumanDuration>,
}

/// `limits:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LimitsFileConfig {
    /// Most items per batched call.
    pub max_batch: Option<usize>,
    /// Most leases held at once.
    pub max_leases: Option<u32>,
    /// Most leases per session.
    pub max_leases_per_session: Option<u32>,
    /// Most reservations in flight.
    pub max_reservations: Option<u32>,
    /// Most reservations one session may hold.
    pub max_reservations_per_session: Option<u32>,
    /// Most staging bytes one session's reservations may hold.
    pub max_staging_per_session: Option<ByteSize>,
    /// Most sessions.
    pub max_sessions: Option<u32>,
    /// Uncommitted reservations are reclaimed after this.
    pub reservation_timeout: Option<HumanDuration>,
}

/// Flags of `nencache-agent serve`; each also reads `NENCACHE_AGENT_<NAME>`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// YAML configuration file; flags and environment override it.
    #[arg(long, env = "NENCACHE_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC Unix socket [default: $XDG_RUNTIME_DIR/nencache/agent.sock, else
    /// /tmp/nencache-$UID/agent.sock].
    #[arg(long, env = "NENCACHE_AGENT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Admin HTTP address for /healthz, /readyz and /metrics, or `off` [default:
    /// 127.0.0.1:9464].
    #[arg(long, env = "NENCACHE_AGENT_ADMIN_ADDR")]
    pub admin_addr: Option<String>,
    /// Host-memory arena size [default: 1GiB].
    #[arg(long, env = "NENCACHE_AGENT_HOST_CAPACITY")]
    pub host_capacity: Option<ByteSize>,
    /// Staging area size for puts in flight [default: a quarter of the arena, at most
    /// 256MiB, at least the largest value].
    #[arg(long, env = "NENCACHE_AGENT_STAGING_SIZE")]
    pub staging_size: Option<ByteSize>,
    /// Largest value accepted [default: 64MiB, capped by the staging area].
    #[arg(long, env = "NENCACHE_AGENT_MAX_VALUE")]
    pub max_value: Option<ByteSize>,
    /// Allocation granule [default: 4KiB].
    #[arg(long, env = "NENCACHE_AGENT_PAGE_SIZE")]
    pub page_size: Option<ByteSize>,
    /// Eviction policy: s3fifo or lru [default: s3fifo].
    #[arg(long, env = "NENCACHE_AGENT_EVICTION")]
    pub eviction: Option<String>,
    /// S3-FIFO small-queue share of the arena, in percent [default: 30].
    #[arg(long, env = "NENCACHE_AGENT_SMALL_QUEUE_PERCENT")]
    pub small_queue_percent: Option<u8>,
    /// Lock the arena into RAM (needs CAP_IPC_LOCK).
    #[arg(
        long,
        env = "NENCACHE_AGENT_LOCK_MEMORY",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub lock_memory: Option<bool>,
    /// Default TTL of entries (e.g. 10m) [default: none].
    #[arg(long, env = "NENCACHE_AGENT_DEFAULT_TTL")]
    pub default_ttl: Option<HumanDuration>,
    /// Reclaim reservations not committed within this time [default: 30s].
    #[arg(long, env = "NENCACHE_AGENT_RESERVATION_TIMEOUT")]
    pub reservation_timeout: Option<HumanDuration>,
    /// Log format [default: text].
    #[arg(long, env = "NENCACHE_AGENT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter [default: info].
    #[arg(long, env = "NENCACHE_AGENT_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// OTLP/gRPC endpoint for traces (e.g. http://127.0.0.1:4317) [default: off].
    #[arg(long, env = "NENCACHE_AGENT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Grace period for in-flight calls at shutdown [default: 10s].
    #[arg(long, env = "NENCACHE_AGENT_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<HumanDuration>,
    /// Directory of the default lower tier [default: $XDG_DATA_HOME/nencache, else
    /// ~/.local/share/nencache].
    #[arg(long, env = "NENCACHE_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NVMe tier (T2) file or block device [default: <data-dir>/cache.t2 when no tier is
    /// configured].
    #[arg(long, env = "NENCACHE_AGENT_NVME_PATH")]
    pub nvme_path: Option<PathBuf>,
    /// NVMe tier size; 0 disables it [default: 4GiB for the default tier].
    #[arg(long, env = "NENCACHE_AGENT_NVME_SIZE")]
    pub nvme_size: Option<ByteSize>,
    /// Disk tier (T3) directory of segment files.
    #[arg(long, env = "NENCACHE_AGENT_DISK_PATH")]
    pub disk_path: Option<PathBuf>,
    /// Disk tier size; 0 disables it.
    #[arg(long, env = "NENCACHE_AGENT_DISK_SIZE")]
    pub disk_size: Option<ByteSize>,
    /// NVMe tier I/O engine: auto, io_uring or pread [default: auto].
    #[arg(long, env = "NENCACHE_AGENT_IO_ENGINE")]
    pub io_engine: Option<String>,
    /// Serve LMCache's `lm://` protocol on this TCP address (`host:port`) [default: off]
    #[arg(long, env = "NENCACHE_AGENT_LM_TCP")]
    pub lm_tcp: Option<String>,
    /// Serve LMCache's `lm://` protocol on this Unix socket [default: off]
    #[arg(long, env = "NENCACHE_AGENT_LM_SOCKET")]
    pub lm_socket: Option<PathBuf>,
    /// Serve the Redis protocol on this TCP address (`host:port`) [default: off]
    #[arg(long, env = "NENCACHE_AGENT_REDIS_TCP")]
    pub redis_tcp: Option<String>,
    /// Serve the Redis protocol on this Unix socket [default: off]
    #[arg(long, env = "NENCACHE_AGENT_REDIS_SOCKET")]
    pub redis_socket: Option<PathBuf>,
    /// The password Redis clients must give [default: none]
    #[arg(long, env = "NENCACHE_AGENT_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// Let Redis clients empty the cache with FLUSHDB/FLUSHALL [default: false]
    #[arg(
        long,
        env = "NENCACHE_AGENT_REDIS_ALLOW_FLUSH",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub redis_allow_flush: Option<bool>,
}

/// Size of the default lower tier: enough to matter, small enough for a laptop.
pub const DEFAULT_TIER_SIZE: u64 = 4 << 30;

/// The per-user data directory of the default lower tier.
#[must_use]
pub fn default_data_dir(xdg_data_home: Option<&Path>, home: Option<&Path>) -> PathBuf {
    match (xdg_data_home, home) {
        (Some(d), _) if d.is_absolute() => d.join("nencache"),
        (_, Some(h)) if h.is_absolute() => h.join(".local/share/nencache"),
        _ => PathBuf::from(format!(
            "/var/tmp/nencache-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

/// The process environment the settings depend on, passed in so that resolving reads no
/// environment itself.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `$XDG_RUNTIME_DIR`.
    pub xdg_runtime_dir: Option<PathBuf>,
    /// `$XDG_DATA_HOME`.
    pub xdg_data_home: Option<PathBuf>,
    /// `$HOME`.
    pub home: Option<PathBuf>,
}

impl Env {
    /// Reads the variables from the process environment.
    #[must_use]
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from);
        Self {
            xdg_runtime_dir: var("XDG_RUNTIME_DIR"),
            xdg_data_home: var("XDG_DATA_HOME"),
            home: var("HOME"),
        }
    }
}

/// Validated settings the agent runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// gRPC socket path.
    pub socket: PathBuf,
    /// Admin HTTP address, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// OTLP endpoint, if traces are exported.
    pub otlp_endpoint: Option<String>,
    /// Shutdown grace period.
    pub shutdown_grace: Duration,
    /// The engine: limits, host tier, lower tiers.
    pub engine: EngineConfig,
    /// Whether the lower tier is the built-in default (said in the first log line).
    pub default_tier: bool,
    /// LMCache-compatible listeners.
    pub compat: CompatSettings,
}

/// Where the LMCache-compatible listeners listen (none by default).
#[derive(Debug, Clone, Default)]
pub struct CompatSettings {
    /// `lm://` over TCP.
    pub lm_tcp: Option<SocketAddr>,
    /// `lm://` over a Unix socket.
    pub lm_socket: Option<PathBuf>,
    /// Redis over TCP.
    pub redis_tcp: Option<SocketAddr>,
    /// Redis over a Unix socket.
    pub redis_socket: Option<PathBuf>,
    /// The Redis listener's password and flush permission.
    pub redis: crate::compat::resp::RedisSettings,
}

/// The per-user runtime directory the agent uses when no socket is configured.
#[must_use]
pub fn default_runtime_dir(xdg_runtime_dir: Option<&Path>) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if d.is_absolute() => d.join("nencache"),
        _ => PathBuf::from(format!(
            "/tmp/nencache-{}",
            rustix::process::getuid().as_raw()
        )),
    }
}

impl ServeArgs {
    /// Merges the file (if any), these flags and defaults, and validates the result.
    /// `xdg_runtime_dir` is passed in so that nothing here reads the environment.
    ///
    /// # Errors
    /// An unreadable or invalid file, or invalid values.
    pub fn resolve(&self, xdg_runtime_dir: Option<&Path>) -> Result<Settings, ConfigError> {
        let env = Env {
            xdg_runtime_dir: xdg_runtime_dir.map(Path::to_path_buf),
            ..Env::from_process()
        };
        self.resolve_in(&env)
    }

    /// [`ServeArgs::resolve`] with every environment input given.
    ///
    /// # Errors
    /// As [`ServeArgs::resolve`].
    pub fn resolve_in(&self, env: &Env) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                serde_yaml_ng::from_str::<FileConfig>(&text).map_err(|source| {
                    ConfigError::Parse {
                        path: path.clone(),
                        source,
                    }
                })?
            }
            None => FileConfig::default(),
        };
        Self::merge(self.clone(), file, env)
    }

    fn merge(a: Self, f: FileConfig, env: &Env) -> Result<Settings, ConfigError> {
        let xdg_runtime_dir = env.xdg_runtime_dir.as_deref();
        let (tiers, demotion, default_tier) =
            Self::tiers(&a, f.tiers.clone(), f.data_dir.clone(), env)?;
        let invalid = ConfigError::Invalid;
        let socket = a
            .socket
            .or(f.socket)
            .unwrap_or_else(|| default_runtime_dir(xdg_runtime_dir).join("agent.sock"));
        if socket.file_name().is_none() {
            return Err(invalid(format!(
                "socket path {} has no file name",
                socket.display()
            )));
        }
        let admin = a
            .admin_addr
            .or(f.admin_addr)
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let admin_addr = if admin.eq_ignore_ascii_case("off") {
            None
        } else {
            Some(
                admin
                    .parse()
                    .map_err(|e| invalid(format!("admin address {admin:?}: {e}")))?,
            )
        };
        let d = HostConfig::default();
        let capacity = a
            .host_capacity
            .or(f.host.capacity)
            .map_or(d.capacity, |b| b.0);
        let max_value_set = a.max_value.or(f.host.max_value).map(|b| b.0);
        let staging = a.staging_size.or(f.host.staging).map_or_else(
            || {
                (capacity / 4)
                    .min(d.staging)
                    .max(max_value_set.unwrap_or(0))
            },
            |b| b.0,
        );
        let max_value =
            max_value_set.unwrap_or_else(|| Limits::default().max_value.min(staging).min(capacity));
        let page_size = a
            .page_size
            .or(f.host.page_size)
            .map_or(u64::from(d.page_size), |b| b.0);
        let policy = match a.eviction.or(f.host.eviction) {
            Some(p) => p.parse::<EvictionPolicy>().map_err(invalid)?,
            None => d.policy,
        };
        let l = f.limits;
        let dl = Limits::default();
        let engine = EngineConfig {
            limits: Limits {
                max_value,
                max_batch: l.max_batch.unwrap_or(dl.max_batch),
                max_leases: l.max_leases.unwrap_or(dl.max_leases),
                max_leases_per_session: l
                    .max_leases_per_session
                    .unwrap_or(dl.max_leases_per_session),
                max_reservations: l.max_reservations.unwrap_or(dl.max_reservations),
                max_reservations_per_session: l
                    .max_reservations_per_session
                    .unwrap_or(dl.max_reservations_per_session),
                max_staging_per_session: l.max_staging_per_session.map(|b| b.0),
                max_sessions: l.max_sessions.unwrap_or(dl.max_sessions),
                reservation_timeout: a
                    .reservation_timeout
                    .or(l.reservation_timeout)
                    .map_or(dl.reservation_timeout, |h| h.0),
                default_ttl: a.default_ttl.or(f.host.default_ttl).map(|h| h.0),
            },
            host: HostConfig {
                capacity,
                staging,
                page_size: u32::try_from(page_size)
                    .map_err(|_| invalid(format!("page size {page_size} is too large")))?,
                policy,
                small_queue_percent: a
                    .small_queue_percent
                    .or(f.host.small_queue_percent)
                    .unwrap_or(d.small_queue_percent),
                lock_memory: a.lock_memory.or(f.host.lock_memory).unwrap_or(false),
            },
            tiers,
            demotion,
        };
        let lm = f.compat.lm.unwrap_or_default();
        let redis = f.compat.redis.unwrap_or_default();
        let tcp = |addr: Option<String>, what: &str| {
            addr.filter(|a| !a.is_empty())
                .map(|a| {
                    a.parse::<SocketAddr>()
                        .map_err(|e| invalid(format!("{what} address {a:?}: {e}")))
                })
                .transpose()
        };
        let compat = CompatSettings {
            lm_tcp: tcp(a.lm_tcp.or(lm.tcp), "lm:// TCP")?,
            lm_socket: a
                .lm_socket
                .or(lm.socket)
                .filter(|p| !p.as_os_str().is_empty()),
            redis_tcp: tcp(a.redis_tcp.or(redis.tcp), "Redis TCP")?,
            redis_socket: a
                .redis_socket
                .or(redis.socket)
                .filter(|p| !p.as_os_str().is_empty()),
            redis: crate::compat::resp::RedisSettings {
                password: a
                    .redis_password
                    .or(redis.password)
                    .filter(|p| !p.is_empty()),
                allow_flush: a.redis_allow_flush.or(redis.allow_flush).unwrap_or(false),
            },
        };
        let mut engine = engine;
        // Limits and host tier first, so their errors are the ones reported.
        EngineConfig {
            tiers: Vec::new(),
            ..engine.clone()
        }
        .validate()
        .map_err(engine_invalid)?;
        fit_regions(&mut engine)?;
        engine.validate().map_err(engine_invalid)?;
        Ok(Settings {
            socket,
            admin_addr,
            log_format: a.log_format.or(f.log_format).unwrap_or_default(),
            log_level: a.log_level.or(f.log_level).unwrap_or_else(|| "info".into()),
            otlp_endpoint: a
                .otlp_endpoint
                .or(f.otlp_endpoint)
                .filter(|s| !s.is_empty()),
            shutdown_grace: a
                .shutdown_grace
                .or(f.shutdown_grace)
                .map_or(Duration::from_secs(10), |h| h.0),
            engine,
            default_tier,
            compat,
        })
    }

    /// The lower tiers: from flags over the file's `tiers` section; with neither, one
    /// default NVMe-style tier in the data directory.
    fn tiers(
        a: &Self,
        f: Option<TiersFileConfig>,
        data_dir: Option<PathBuf>,
        env: &Env,
    ) -> Result<(Vec<TierConfig>, DemotionConfig, bool), ConfigError> {
        let invalid = ConfigError::Invalid;
        let flags_set = a.nvme_path.is_some()
            || a.nvme_size.is_some()
            || a.disk_path.is_some()
            || a.disk_size.is_some();
        let default_tier = f.is_none() && !flags_set;
        let mut f = f.unwrap_or_default();
        let data_dir =
            a.data_dir.clone().or(data_dir).unwrap_or_else(|| {
                default_data_dir(env.xdg_data_home.as_deref(), env.home.as_deref())
            });
        if default_tier {
            f.nvme = Some(TierFileConfig {
                path: Some(data_dir.join("cache.t2")),
                size: Some(ByteSize(DEFAULT_TIER_SIZE)),
                ..TierFileConfig::default()
            });
        }
        let mut nvme = f.nvme.take().unwrap_or_default();
        nvme.path = a.nvme_path.clone().or(nvme.path);
        nvme.size = a.nvme_size.or(nvme.size);
        nvme.io_engine = a.io_engine.clone().or(nvme.io_engine);
        let mut disk = f.disk.take().unwrap_or_default();
        disk.path = a.disk_path.clone().or(disk.path);
        disk.size = a.disk_size.or(disk.size);
        let both = [&nvme, &disk]
            .iter()
            .all(|t| t.size.is_some_and(|s| s.0 > 0));
        let mut out = Vec::new();
        for (tier, t) in [(Tier::Nvme, nvme), (Tier::Disk, disk)] {
            let name = tier.name();
            let size = match t.size {
                Some(s) if s.0 > 0 => s.0,
                Some(_) => continue,
                None if t.path.is_none() => continue,
                None => return Err(invalid(format!("tiers.{name}: a path needs a size"))),
            };
            let Some(path) = t.path else {
                return Err(invalid(format!("tiers.{name}: a size needs a path")));
            };
            let io_engine = match (tier, t.io_engine.as_deref()) {
                (Tier::Disk, None | Some("mmap")) => IoEngineKind::Mmap,
                (Tier::Disk, Some(other)) => {
                    return Err(invalid(format!(
                        "tiers.disk: io_engine {other:?}: the disk tier is memory-mapped"
                    )));
                }
                (_, None | Some("auto")) => IoEngineKind::Auto,
                (_, Some("io_uring")) => IoEngineKind::IoUring,
                (_, Some("pread")) => IoEngineKind::Pread,
                (_, Some(other)) => {
                    return Err(invalid(format!(
                        "tiers.{name}: unknown io_engine {other:?} (expected auto, io_uring or \
                         pread)"
                    )));
                }
            };
            // Regions of the default size grow to hold the largest value (`fit_regions`).
            let region_size = t.region_size.map_or(0, |b| b.0);
            if region_size != 0 && (!region_size.is_power_of_two() || region_size < 1 << 20) {
                return Err(invalid(format!(
                    "tiers.{name}: region size {region_size} is not a power of two of at least \
                     1MiB"
                )));
            }
            let admission = match t.admission {
                Some(s) => s
                    .parse::<Admission>()
                    .map_err(|e| invalid(format!("tiers.{name}: {e}")))?,
                // With both tiers, chunks read while in host memory go to NVMe, the rest to
                // the cheaper disk tier.
                None if both && tier == Tier::Nvme => Admission::Reused,
                None => Admission::All,
            };
            out.push(TierConfig {
                tier,
                store: StoreConfig {
                    path,
                    capacity: size,
                    region_size,
                    io_engine,
                    queue_depth: t.queue_depth.unwrap_or(32).clamp(1, 4096),
                    slow_io: Duration::from_secs(2),
                },
                admission,
            });
        }
        let dd = DemotionConfig::default();
        let demotion = DemotionConfig {
            clean_percent: f.demotion_clean_percent.unwrap_or(dd.clean_percent),
            queue_bytes: f.demotion_queue.map_or(dd.queue_bytes, |b| b.0),
        };
        Ok((out, demotion, default_tier))
    }
}

/// An engine configuration error as a configuration error (without a second "invalid
/// configuration" prefix).
fn engine_invalid(e: nencache_engine::EngineError) -> ConfigError {
    match e {
        nencache_engine::EngineError::Config(m) => ConfigError::Invalid(m),
        e => ConfigError::Invalid(e.to_string()),
    }
}

/// Gives tiers without a region size the default (16MiB for nvme, 64MiB for disk), or the
/// power of two that holds the largest value with its header if that is more; then checks
/// that each tier has at least two regions.
fn fit_regions(engine: &mut EngineConfig) -> Result<(), ConfigError> {
    let need = (engine.limits.max_value + 2 * 4096 + nencache_engine::MAX_METADATA_LEN as u64)
        .next_power_of_two();
    for t in &mut engine.tiers {
        if t.store.region_size == 0 {
            let default = if t.tier == Tier::Nvme {
                16 << 20
            } else {
                64 << 20
            };
            t.store.region_size = need.max(default);
        }
        if t.store.capacity < 2 * t.store.region_size {
            return Err(ConfigError::Invalid(format!(
                "tiers.{}: size {} is less than two regions of {}",
                t.tier.name(),
                ByteSize(t.store.capacity),
                ByteSize(t.store.region_size)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_no_configuration() {
        let s = ServeArgs::default()
            .resolve(Some(Path::new("/run/user/1000")))
            .unwrap();
        assert_eq!(s.socket, Path::new("/run/user/1000/nencache/agent.sock"));
        assert_eq!(s.engine.host.capacity, 1 << 30);
        assert_eq!(s.engine.host.staging, 256 << 20);
        assert_eq!(s.admin_addr, Some("127.0.0.1:9464".parse().unwrap()));
        let s = ServeArgs::default().resolve(None).unwrap();
        assert!(s.socket.starts_with("/tmp"));
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(
            &path,
            "socket: /x/a.sock\nadmin_addr: 'off'\nhost:\n  capacity: 64MiB\n  eviction: lru\n  \
             default_ttl: 5m\nlimits:\n  reservation_timeout: 2s\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            host_capacity: Some(ByteSize(32 << 20)),
            ..Default::default()
        };
        let s = args.resolve(None).unwrap();
        assert_eq!(s.socket, Path::new("/x/a.sock"));
        assert_eq!(s.admin_addr, None);
        assert_eq!(s.engine.host.capacity, 32 << 20);
        assert_eq!(s.engine.host.staging, 8 << 20);
        assert_eq!(s.engine.host.policy, EvictionPolicy::Lru);
        assert_eq!(s.engine.limits.default_ttl, Some(Duration::from_secs(300)));
        assert_eq!(s.engine.limits.reservation_timeout, Duration::from_secs(2));
    }

    #[test]
    fn per_session_quotas_are_read_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        let s = ServeArgs::default().resolve(None).unwrap();
        assert_eq!(s.engine.limits.max_reservations_per_session, 1024);
        assert_eq!(
            s.engine.staging_per_session(),
            64 << 20,
            "a quarter of 256MiB"
        );
        std::fs::write(
            &path,
            "host:\n  staging: 64MiB\n  max_value: 8MiB\nlimits:\n  \
             max_reservations_per_session: 16\n  max_staging_per_session: 12MiB\n",
        )
        .unwrap();
        let s = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        }
        .resolve(None)
        .unwrap();
        assert_eq!(s.engine.limits.max_reservations_per_session, 16);
        assert_eq!(s.engine.staging_per_session(), 12 << 20);
        for (yaml, why) in [
            (
                "limits:\n  max_staging_per_session: 1MiB\n",
                "max staging per session",
            ),
            (
                "limits:\n  max_staging_per_session: 2GiB\n",
                "max staging per session",
            ),
            (
                "limits:\n  max_reservations_per_session: 0\n",
                "max_reservations_per_session",
            ),
        ] {
            std::fs::write(&path, yaml).unwrap();
            let err = ServeArgs {
                config: Some(path.clone()),
                ..Default::default()
            }
            .resolve(None)
            .unwrap_err();
            assert!(err.to_string().contains(why), "{yaml}: {err}");
        }
    }

    #[test]
    fn bad_configuration_is_reported_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, "host:\n  capacty: 1GiB\n").unwrap();
        let err = ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve(None)
        .unwrap_err();
        assert!(err.to_string().contains("capacty"), "{err}");
        let err = ServeArgs {
            eviction: Some("mru".into()),
            ..Default::default()
        }
        .resolve(None)
        .unwrap_err();
        assert!(err.to_string().contains("unknown eviction policy"), "{err}");
        let err = ServeArgs {
            max_value: Some(ByteSize(2 << 30)),
            ..Default::default()
        }
        .resolve(None)
        .unwrap_err();
        assert!(err.to_string().contains("max value"), "{err}");
    }

    #[test]
    fn byte_sizes_and_durations_parse() {
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("4k".parse::<ByteSize>().unwrap().0, 4000);
        assert_eq!("1gib".parse::<ByteSize>().unwrap().0, 1 << 30);
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(3 << 20).to_string(), "3MiB");
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "2h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7200)
        );
    }
}
