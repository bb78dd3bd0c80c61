//! The engine's configuration, in three parts: [`Limits`] on what clients may ask and hold,
//! [`HostConfig`] for the host-memory tier (T1), and a list of [`TierConfig`] for the lower
//! tiers (T2 NVMe, T3 disk), each a [`nencache_store::StoreConfig`] with an admission rule.
//! [`EngineConfig::validate`] checks it once, before anything is built.

use std::time::Duration;

pub use nencache_store::{IoEngineKind, StoreConfig};

use crate::error::{EngineError, Result};

/// Largest metadata blob stored beside a value.
pub const MAX_METADATA_LEN: usize = 4096;

/// Which eviction policy the host tier uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// S3-FIFO: small and main FIFO queues with a ghost set (the default).
    #[default]
    S3Fifo,
    /// Least recently used.
    Lru,
}

impl std::str::FromStr for EvictionPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "s3fifo" => Ok(Self::S3Fifo),
            "lru" => Ok(Self::Lru),
            _ => Err(format!(
                "unknown eviction policy {s:?} (expected s3fifo or lru)"
            )),
        }
    }
}

/// A storage tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// T1: host shared memory.
    Host,
    /// T2: NVMe, a log-structured store with O_DIRECT I/O.
    Nvme,
    /// T3: disk, memory-mapped segment files.
    Disk,
}

impl Tier {
    /// The tier's name in configuration, metrics and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Nvme => "nvme",
            Self::Disk => "disk",
        }
    }
}

/// Which host entries a lower tier takes when they are demoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admission {
    /// Every entry.
    #[default]
    All,
    /// Only entries read at least once while in host memory, so that chunks used once do
    /// not spend the device's write budget.
    Reused,
}

impl std::str::FromStr for Admission {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "all" => Ok(Self::All),
            "reused" => Ok(Self::Reused),
            _ => Err(format!("unknown admission {s:?} (expected all or reused)")),
        }
    }
}

/// Bounds on what clients may ask for and hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest value accepted.
    pub max_value: u64,
    /// Most items in one batched call.
    pub max_batch: usize,
    /// Most leases held at once, over all sessions.
    pub max_leases: u32,
    /// Most leases one session may hold.
    pub max_leases_per_session: u32,
    /// Most reservations in flight at once.
    pub max_reservations: u32,
    /// Most reservations one session may hold at once.
    pub max_reservations_per_session: u32,
    /// Most staging bytes one session's reservations may hold at once; `None` takes a
    /// quarter of the staging area, or `max_value` if that is more (see
    /// [`EngineConfig::staging_per_session`]).
    pub max_staging_per_session: Option<u64>,
    /// Most sessions at once.
    pub max_sessions: u32,
    /// A reservation not committed within this time is aborted and its space reclaimed.
    pub reservation_timeout: Duration,
    /// TTL for entries put without one; `None` keeps them until evicted.
    pub default_ttl: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_value: 64 << 20,
            max_batch: 1024,
            max_leases: 65536,
            max_leases_per_session: 16384,
            max_reservations: 65536,
            max_reservations_per_session: 1024,
            max_staging_per_session: None,
            max_sessions: 1024,
            reservation_timeout: Duration::from_secs(30),
            default_ttl: None,
        }
    }
}

/// The host-memory tier (T1).
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Arena size in bytes (committed values).
    pub capacity: u64,
    /// Staging area size in bytes (puts in flight).
    pub staging: u64,
    /// Allocation granule in bytes; a power of two of at least 4096.
    pub page_size: u32,
    /// Eviction policy.
    pub policy: EvictionPolicy,
    /// S3-FIFO: share of the arena, in percent, given to the small (probationary) queue.
    pub small_queue_percent: u8,
    /// Lock the arena and staging area into RAM (needs `CAP_IPC_LOCK` beyond small sizes).
    pub lock_memory: bool,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            capacity: 1 << 30,
            staging: 256 << 20,
            page_size: 4096,
            policy: EvictionPolicy::S3Fifo,
            // Chosen by measurement: docs/benchmarks.md, "Eviction policy".
            small_queue_percent: 30,
            lock_memory: false,
        }
    }
}

/// A lower tier: where it stores, and what it admits.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// [`Tier::Nvme`] or [`Tier::Disk`].
    pub tier: Tier,
    /// The store's layout and I/O engine.
    pub store: StoreConfig,
    /// Which demoted entries it takes.
    pub admission: Admission,
}

/// How host entries move down.
#[derive(Debug, Clone)]
pub struct DemotionConfig {
    /// Demotion keeps the coldest entries of this share of the arena, in percent, written
    /// to a lower tier ahead of eviction (so that evicting them loses nothing).
    pub clean_percent: u8,
    /// Most bytes being written down at once (the write-back queue's bound).
    pub queue_bytes: u64,
}

impl Default for DemotionConfig {
    fn default() -> Self {
        Self {
            clean_percent: 20,
            queue_bytes: 64 << 20,
        }
    }
}

/// The whole engine.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Bounds on calls and tables.
    pub limits: Limits,
    /// The host-memory tier.
    pub host: HostConfig,
    /// Lower tiers, fastest first; entries are demoted to the first that admits them.
    pub tiers: Vec<TierConfig>,
    /// Write-back from host memory to the lower tiers.
    pub demotion: DemotionConfig,
}

impl EngineConfig {
    /// The staging bytes one session may hold: `max_staging_per_session`, or by default a
    /// quarter of the staging area but at least `max_value`, so one value always fits.
    #[must_use]
    pub fn staging_per_session(&self) -> u64 {
        self.limits
            .max_staging_per_session
            .unwrap_or_else(|| (self.host.staging / 4).max(self.limits.max_value))
    }

    /// Checks the configuration for consistency.
    ///
    /// # Errors
    /// [`EngineError::Config`] naming the first problem found.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        let (h, l) = (&self.host, &self.limits);
        if !h.page_size.is_power_of_two() || h.page_size < 4096 {
            return bad(format!(
                "page size {} is not a power of two >= 4096",
                h.page_size
            ));
        }
        let ps = u64::from(h.page_size);
        if h.capacity < 16 * ps || h.capacity / ps >= u64::from(u32::MAX) {
            return bad(format!("host capacity {} is out of range", h.capacity));
        }
        if h.staging < ps || h.staging / ps >= u64::from(u32::MAX) {
            return bad(format!("staging size {} is out of range", h.staging));
        }
        if l.max_value == 0 || l.max_value > h.staging || l.max_value > h.capacity {
            return bad(format!(
                "max value {} must be positive and fit both the arena ({}) and staging ({})",
                l.max_value, h.capacity, h.staging
            ));
        }
        if let Some(v) = l.max_staging_per_session
            && (v < l.max_value || v > h.staging)
        {
            return bad(format!(
                "max staging per session {v} must be at least the max value ({}) and at most \
                 the staging area ({})",
                l.max_value, h.staging
            ));
        }
        // An entry slot per arena page, and one per item of the reserve call in progress.
        if h.capacity / ps + l.max_batch as u64 >= u64::from(u32::MAX) {
            return bad(format!("max_batch {} is out of range", l.max_batch));
        }
        if !(1..=90).contains(&h.small_queue_percent) {
            return bad(format!(
                "small queue share {}% is outside 1..=90",
                h.small_queue_percent
            ));
        }
        for (name, v) in [
            ("max_batch", l.max_batch as u64),
            ("max_leases", u64::from(l.max_leases)),
            (
                "max_leases_per_session",
                u64::from(l.max_leases_per_session),
            ),
            ("max_reservations", u64::from(l.max_reservations)),
            (
                "max_reservations_per_session",
                u64::from(l.max_reservations_per_session),
            ),
            ("max_sessions", u64::from(l.max_sessions)),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        let mut seen = Vec::new();
        for t in &self.tiers {
            if t.tier == Tier::Host {
                return bad("the host tier is not a lower tier".into());
            }
            if seen.contains(&t.tier) {
                return bad(format!("tier {} is configured twice", t.tier.name()));
            }
            seen.push(t.tier);
            if t.store.region_size < l.max_value + 2 * 4096 + MAX_METADATA_LEN as u64 {
                return bad(format!(
                    "{} region size {} cannot hold the largest value ({}) with its header",
                    t.tier.name(),
                    t.store.region_size,
                    l.max_value
                ));
            }
        }
        if !(1..=90).contains(&self.demotion.clean_percent) {
            return bad(format!(
                "demotion clean share {}% is outside 1..=90",
                self.demotion.clean_percent
            ));
        }
        if self.demotion.queue_bytes < l.max_value {
            return bad(format!(
                "demotion queue {} is smaller than the largest value ({})",
                self.demotion.queue_bytes, l.max_value
            ));
        }
        Ok(())
    }
}
