//! `nencache lmcache convert`: an LMCache configuration (a YAML file or the `LMCACHE_*`
//! environment) turned into the NenCache agent configuration that replaces its storage, the
//! LMCache settings that point LMCache at that agent, and a report that names every LMCache
//! key: mapped into the agent, kept in LMCache, not needed, or unsupported (with why).
//!
//! LMCache sizes (`max_local_cpu_size`, `max_local_disk_size`, in GB) are per
//! tensor-parallel rank: each rank's process holds its own cache. One NenCache agent serves
//! every rank on a node, so its sizes are the per-rank size times the ranks per node
//! (`--ranks-per-node`, default 1).

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context, bail};

/// How a key is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Its meaning moves into the agent's configuration.
    Mapped,
    /// It stays in LMCache's configuration, unchanged: LMCache still does it.
    Kept,
    /// NenCache does what it configured, or it configures something that no longer runs.
    NotNeeded,
    /// NenCache has no counterpart yet.
    Unsupported,
}

impl Class {
    /// The report's word for it.
    #[must_use]
    pub fn word(self) -> &'static str {
        match self {
            Self::Mapped => "mapped",
            Self::Kept => "kept",
            Self::NotNeeded => "not needed",
            Self::Unsupported => "unsupported",
        }
    }
}

/// Every LMCache key this converter knows, with its class and why. Keys with a class that
/// depends on their value (sizes, backends, the remote URL) are decided in [`convert`].
pub const KEYS: &[(&str, Class, &str)] = &[
    // Core.
    (
        "chunk_size",
        Class::Kept,
        "LMCache chunks the KV; the agent stores whole chunks of any size",
    ),
    (
        "local_cpu",
        Class::Mapped,
        "LMCache's in-process CPU cache becomes the agent's shared host tier; LMCache keeps its CPU memory (the old size, at most 2 GB) as the buffer its remote connectors allocate from",
    ),
    (
        "max_local_cpu_size",
        Class::Mapped,
        "per rank; the agent's host.capacity is this times the ranks per node",
    ),
    (
        "local_cpu_use_hugepages",
        Class::Unsupported,
        "the agent's arena does not use huge pages yet",
    ),
    (
        "reserve_local_cpu_size",
        Class::Kept,
        "applies to LMCache's own (now small) CPU buffer",
    ),
    (
        "local_disk",
        Class::Mapped,
        "becomes the agent's NVMe tier (tiers.nvme.path), a log-structured store with O_DIRECT I/O that survives restarts",
    ),
    (
        "local_disk_path_sharding",
        Class::NotNeeded,
        "one agent per node holds one tier for all ranks",
    ),
    (
        "max_local_disk_size",
        Class::Mapped,
        "per rank; tiers.nvme.size is this times the ranks per node",
    ),
    (
        "remote_url",
        Class::Mapped,
        "LMCache's remote becomes the node's agent; the agent's lower tiers and persistence replace the old remote server",
    ),
    (
        "remote_serde",
        Class::Kept,
        "serialization happens in LMCache; the agent stores the bytes it is given (naive is the fastest over shared memory)",
    ),
    (
        "use_layerwise",
        Class::Kept,
        "layer-wise keys are stored like any other",
    ),
    (
        "save_decode_cache",
        Class::Kept,
        "LMCache decides what it saves",
    ),
    (
        "pre_caching_hash_algorithm",
        Class::Kept,
        "keys are computed by LMCache (set PYTHONHASHSEED=0 with builtin hashing so that processes agree)",
    ),
    (
        "save_unfull_chunk",
        Class::Kept,
        "LMCache decides what it saves; partial chunks are stored like any other",
    ),
    ("blocking_timeout_secs", Class::Kept, "LMCache-side timeout"),
    (
        "cache_policy",
        Class::Mapped,
        "eviction moves to the agent: LRU maps to lru, the others to s3fifo (the agent's default, scan-resistant)",
    ),
    (
        "cost_aware_half_life_seconds",
        Class::NotNeeded,
        "eviction is the agent's (S3-FIFO or LRU)",
    ),
    (
        "cost_aware_ewma_alpha",
        Class::NotNeeded,
        "eviction is the agent's (S3-FIFO or LRU)",
    ),
    (
        "numa_mode",
        Class::Unsupported,
        "the agent does not place its arena by NUMA node yet",
    ),
    ("enable_async_loading", Class::Kept, "LMCache-side"),
    ("py_enable_gc", Class::Kept, "LMCache-side"),
    ("priority_limit", Class::Kept, "LMCache-side"),
    ("lookup_timeout_ms", Class::Kept, "LMCache-side"),
    ("min_retrieve_tokens", Class::Kept, "LMCache-side"),
    ("hit_miss_ratio", Class::Kept, "LMCache-side"),
    (
        "enable_scheduler_bypass_lookup",
        Class::Kept,
        "LMCache-side",
    ),
    (
        "external_lookup_client",
        Class::Unsupported,
        "the agent is not an external lookup service",
    ),
    ("extra_config", Class::Kept, "passed through to LMCache"),
    (
        "storage_plugins",
        Class::Kept,
        "LMCache-side plugins keep working beside the agent",
    ),
    (
        "remote_storage_plugins",
        Class::Kept,
        "kept; NenCache's own plugin (nencache.lmcache_remote) is an alternative to lm://",
    ),
    ("runtime_plugin_locations", Class::Kept, "LMCache-side"),
    ("pin_timeout_sec", Class::Kept, "LMCache-side"),
    ("pin_check_interval_sec", Class::Kept, "LMCache-side"),
    (
        "enable_lazy_memory_allocator",
        Class::Kept,
        "applies to LMCache's own CPU buffer",
    ),
    (
        "lazy_memory_initial_ratio",
        Class::Kept,
        "applies to LMCache's own CPU buffer",
    ),
    (
        "lazy_memory_expand_trigger_ratio",
        Class::Kept,
        "applies to LMCache's own CPU buffer",
    ),
    (
        "lazy_memory_step_ratio",
        Class::Kept,
        "applies to LMCache's own CPU buffer",
    ),
    (
        "lazy_memory_safe_size",
        Class::Kept,
        "applies to LMCache's own CPU buffer",
    ),
    ("enable_kv_events", Class::Kept, "LMCache-side"),
    ("use_gpu_connector_v3", Class::Kept, "LMCache-side"),
    ("remote_config_url", Class::Kept, "LMCache-side"),
    ("app_id", Class::Kept, "LMCache-side"),
    ("enable_chunk_statistics", Class::Kept, "LMCache-side"),
    ("chunk_statistics_auto_start", Class::Kept, "LMCache-side"),
    (
        "chunk_statistics_auto_exit_timeout_hours",
        Class::Kept,
        "LMCache-side",
    ),
    (
        "chunk_statistics_target_unique_chunks",
        Class::Kept,
        "LMCache-side",
    ),
    ("chunk_statistics_strategy", Class::Kept, "LMCache-side"),
    ("enable_hidden_state_cache", Class::Kept, "LMCache-side"),
    ("max_hidden_state_cpu_size", Class::Kept, "LMCache-side"),
    ("hidden_state_layers", Class::Kept, "LMCache-side"),
    ("hidden_states_retrieve_mode", Class::Kept, "LMCache-side"),
    // Blending.
    (
        "enable_blending",
        Class::Kept,
        "CacheBlend runs in LMCache; its chunks are stored like any other",
    ),
    ("blend_recompute_ratios", Class::Kept, "LMCache-side"),
    ("blend_thresholds", Class::Kept, "LMCache-side"),
    ("blend_check_layers", Class::Kept, "LMCache-side"),
    ("blend_min_tokens", Class::Kept, "LMCache-side"),
    ("blend_special_str", Class::Kept, "LMCache-side"),
    ("retrieve_locations", Class::Kept, "LMCache-side"),
    ("store_location", Class::Kept, "LMCache-side"),
    // P2P and the controller.
    (
        "enable_p2p",
        Class::Unsupported,
        "sharing chunks between nodes is not built into the agent yet",
    ),
    ("p2p_host", Class::Unsupported, "see enable_p2p"),
    ("p2p_init_ports", Class::Unsupported, "see enable_p2p"),
    ("p2p_lookup_ports", Class::Unsupported, "see enable_p2p"),
    (
        "enable_controller",
        Class::Kept,
        "LMCache's controller keeps working; it sees LMCache's own state",
    ),
    ("lmcache_instance_id", Class::Kept, "LMCache-side"),
    ("controller_pull_url", Class::Kept, "LMCache-side"),
    ("controller_reply_url", Class::Kept, "LMCache-side"),
    ("lmcache_worker_ports", Class::Kept, "LMCache-side"),
    ("lmcache_worker_ids", Class::Kept, "LMCache-side"),
    (
        "lmcache_worker_heartbeat_delay_time",
        Class::Kept,
        "LMCache-side",
    ),
    ("lmcache_worker_heartbeat_time", Class::Kept, "LMCache-side"),
    ("lookup_server_worker_ids", Class::Kept, "LMCache-side"),
    // Disaggregated prefill.
    (
        "enable_pd",
        Class::Unsupported,
        "disaggregated prefill moves KV between GPUs (NIXL), which the agent does not do",
    ),
    ("pd_role", Class::Unsupported, "see enable_pd"),
    ("pd_buffer_size", Class::Unsupported, "see enable_pd"),
    ("pd_buffer_device", Class::Unsupported, "see enable_pd"),
    ("pd_peer_host", Class::Unsupported, "see enable_pd"),
    ("pd_peer_init_port", Class::Unsupported, "see enable_pd"),
    ("pd_peer_alloc_port", Class::Unsupported, "see enable_pd"),
    ("pd_peer_query_port", Class::Unsupported, "see enable_pd"),
    ("pd_proxy_host", Class::Unsupported, "see enable_pd"),
    ("pd_proxy_port", Class::Unsupported, "see enable_pd"),
    (
        "pd_allocation_timeout_sec",
        Class::Unsupported,
        "see enable_pd",
    ),
    (
        "pd_shutdown_timeout_sec",
        Class::Unsupported,
        "see enable_pd",
    ),
    (
        "pd_condition_poll_interval_sec",
        Class::Unsupported,
        "see enable_pd",
    ),
    ("pd_max_prefill_len", Class::Unsupported, "see enable_pd"),
    ("pd_backend_mode", Class::Unsupported, "see enable_pd"),
    (
        "pd_skip_proxy_notification",
        Class::Unsupported,
        "see enable_pd",
    ),
    ("pd_bidirectional", Class::Unsupported, "see enable_pd"),
    (
        "transfer_channel",
        Class::Unsupported,
        "see enable_pd and enable_p2p",
    ),
    ("nixl_backends", Class::Unsupported, "see enable_pd"),
    ("nixl_buffer_size", Class::Unsupported, "see enable_pd"),
    ("nixl_buffer_device", Class::Unsupported, "see enable_pd"),
    // Storage extras.
    (
        "gds_path",
        Class::Unsupported,
        "GPUDirect Storage: the agent has no GPU tier yet",
    ),
    ("gds_path_sharding", Class::Unsupported, "see gds_path"),
    ("gds_buffer_size", Class::Unsupported, "see gds_path"),
    ("use_gds", Class::Unsupported, "see gds_path"),
    ("gds_backend", Class::Unsupported, "see gds_path"),
    (
        "maru_path",
        Class::Unsupported,
        "Maru (CXL) memory is not an agent tier",
    ),
    ("maru_pool_size", Class::Unsupported, "see maru_path"),
    (
        "mp_host",
        Class::Kept,
        "LMCache's multiprocess mode; NenCache plugs into it through the native_plugin L2 adapter (nencache.lmcache.NativeClient)",
    ),
    ("mp_port", Class::Kept, "see mp_host"),
    ("internal_api_server_enabled", Class::Kept, "LMCache-side"),
    ("internal_api_server_host", Class::Kept, "LMCache-side"),
    (
        "internal_api_server_port_start",
        Class::Kept,
        "LMCache-side",
    ),
    (
        "internal_api_server_include_index_list",
        Class::Kept,
        "LMCache-side",
    ),
    (
        "internal_api_server_socket_path_prefix",
        Class::Kept,
        "LMCache-side",
    ),
    ("script_allowed_imports", Class::Kept, "LMCache-side"),
    (
        "audit_actual_remote_url",
        Class::NotNeeded,
        "deprecated in LMCache",
    ),
    // Aliases LMCache still reads.
    ("enable_xpyd", Class::Unsupported, "alias of enable_pd"),
    (
        "controller_url",
        Class::Kept,
        "alias of controller_pull_url",
    ),
    (
        "lmcache_worker_port",
        Class::Kept,
        "alias of lmcache_worker_ports",
    ),
    (
        "plugin_locations",
        Class::Kept,
        "alias of runtime_plugin_locations",
    ),
    ("external_backends", Class::Kept, "alias of storage_plugins"),
    // Legacy keys of older examples.
    (
        "local_device",
        Class::Mapped,
        "v0 form of local_cpu / local_disk: \"cpu\" or \"file://PATH\"",
    ),
    (
        "pipelined_backend",
        Class::NotNeeded,
        "v0 only; LMCache 0.5 ignores it",
    ),
    (
        "use_experimental",
        Class::NotNeeded,
        "v0/v1 switch of old releases",
    ),
];

/// The converter's inputs besides the configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// Tensor-parallel ranks (LMCache processes) per node that the agent serves.
    pub ranks_per_node: u32,
    /// Where LMCache reaches the agent's `lm://` listener (`host:port`).
    pub lm_addr: String,
    /// The agent's `lm://` listen address.
    pub lm_listen: String,
    /// The NVMe tier's file when LMCache's disk path is not an absolute path.
    pub default_disk_path: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ranks_per_node: 1,
            lm_addr: "localhost:65432".into(),
            lm_listen: "0.0.0.0:65432".into(),
            default_disk_path: "/var/lib/nencache/cache.t2".into(),
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The LMCache key.
    pub key: String,
    /// How it is handled.
    pub class: Class,
    /// What became of it, and why.
    pub why: String,
}

/// What the conversion produced.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The agent's configuration file (YAML).
    pub agent_yaml: String,
    /// LMCache's configuration, pointed at the agent (YAML).
    pub lmcache_yaml: String,
    /// One note per key given.
    pub report: Vec<Note>,
}

impl Converted {
    /// Whether a key given is unsupported (or unknown).
    #[must_use]
    pub fn has_unsupported(&self) -> bool {
        self.report.iter().any(|n| n.class == Class::Unsupported)
    }

    /// The report as text, one key per line.
    #[must_use]
    pub fn report_text(&self) -> String {
        let mut out = String::new();
        for n in &self.report {
            let _ = writeln!(out, "{:<34} {:<12} {}", n.key, n.class.word(), n.why);
        }
        out
    }
}

/// An LMCache value as YAML gives it: strings, numbers, booleans; nested values as text.
fn text(v: &serde_yaml_ng::Value) -> String {
    match v {
        serde_yaml_ng::Value::String(s) => s.clone(),
        serde_yaml_ng::Value::Null => String::new(),
        other => serde_yaml_ng::to_string(other)
            .unwrap_or_default()
            .trim_end()
            .to_owned(),
    }
}

/// LMCache's `_to_bool`.
fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "yes" | "y" | "on"
    )
}

/// LMCache's GB (it multiplies by 1024³) as bytes.
fn gb(key: &str, v: &str) -> anyhow::Result<u64> {
    let g: f64 = v
        .trim()
        .parse()
        .with_context(|| format!("{key}: {v:?} is not a number of GB"))?;
    if !(g.is_finite() && g >= 0.0) {
        bail!("{key}: {v:?} is not a size");
    }
    Ok((g * f64::from(1u32 << 30)) as u64)
}

/// A byte count as the agent's configuration writes it: in the largest binary unit that
/// divides it.
fn size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// The entry of [`KEYS`] for `key`.
fn known(key: &str) -> Option<(&'static str, Class, &'static str)> {
    KEYS.iter().find(|(n, ..)| *n == key).copied()
}

/// A `file://` location's path.
fn file_path(v: &str) -> Option<String> {
    v.strip_prefix("file://").map(|p| p.to_owned())
}

/// Reads the LMCache configuration: a YAML (or JSON) mapping.
///
/// # Errors
/// Text that is not a mapping.
pub fn parse_file(source: &str) -> anyhow::Result<BTreeMap<String, serde_yaml_ng::Value>> {
    let v: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(source).context("the LMCache configuration is not YAML")?;
    let map = match v {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => serde_yaml_ng::Mapping::new(),
        _ => bail!("the LMCache configuration is not a mapping of keys to values"),
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let k = text(&k);
        out.insert(k, v);
    }
    Ok(out)
}

/// The LMCache configuration in `LMCACHE_*` variables (`LMCACHE_CONFIG_FILE` excluded), as
/// LMCache reads them: numbers and booleans as such, `extra_config` as JSON.
#[must_use]
pub fn from_env(
    vars: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, serde_yaml_ng::Value> {
    vars.into_iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("LMCACHE_")?.to_ascii_lowercase();
            let value = match key.as_str() {
                "config_file" => return None,
                "extra_config" => {
                    serde_yaml_ng::from_str(&v).unwrap_or(serde_yaml_ng::Value::String(v))
                }
                _ => match serde_yaml_ng::from_str(&v) {
                    Ok(n @ (serde_yaml_ng::Value::Number(_) | serde_yaml_ng::Value::Bool(_))) => n,
                    _ => serde_yaml_ng::Value::String(v),
                },
            };
            Some((key, value))
        })
        .collect()
}

/// Converts an LMCache configuration.
///
/// # Errors
/// A value that cannot be read (a size that is not a number).
pub fn convert(
    cfg: &BTreeMap<String, serde_yaml_ng::Value>,
    opts: &Options,
) -> anyhow::Result<Converted> {
    let ranks = u64::from(opts.ranks_per_node.max(1));
    let get = |k: &str| cfg.get(k).map(text);
    let mut report = Vec::new();
    let mut note = |key: &str, class: Class, why: String| {
        report.push(Note {
            key: key.to_owned(),
            class,
            why,
        });
    };

    // Host tier: LMCache's CPU cache, per rank.
    let local_cpu = get("local_cpu").is_none_or(|v| truthy(&v))
        && get("local_device").is_none_or(|d| !d.starts_with("file://"));
    let cpu_gb = get("max_local_cpu_size").unwrap_or_else(|| "5.0".into());
    let cpu_bytes = gb("max_local_cpu_size", &cpu_gb)?;
    let host = (cpu_bytes * ranks).max(64 << 20);
    // Disk: `local_disk`, or the v0 `local_device: file://...`.
    let disk = get("local_disk")
        .filter(|d| !d.is_empty() && d != "None")
        .or_else(|| get("local_device").and_then(|d| d.starts_with("file://").then_some(d)));
    let disk_bytes = match get("max_local_disk_size") {
        Some(v) => gb("max_local_disk_size", &v)?,
        None => 0,
    };
    let eviction = match get("cache_policy").as_deref().map(str::to_ascii_uppercase) {
        Some(p) if p == "LRU" => "lru",
        _ => "s3fifo",
    };

    // The NVMe tier: LMCache's default of 0 means "no limit set", so it gets four times
    // the host tier.
    let tier = disk.as_ref().map(|_| {
        if disk_bytes > 0 {
            disk_bytes * ranks
        } else {
            (host * 4).max(256 << 20)
        }
    });
    // Values up to 96 MiB (a 256-token chunk of a 70B model in 16 bits is 80 MiB), less
    // where the host or NVMe tier is small (a tier holds at least two regions of twice the
    // largest value); staging for several chunks in flight per rank.
    let max_value: u64 = (96u64 << 20)
        .min(host / 2)
        .min(tier.map_or(u64::MAX, |t| t / 4));
    let staging = (host / 8)
        .clamp(256 << 20, 2 << 30)
        .max(2 * max_value)
        .min(host / 2);

    let mut agent = String::from(
        "# NenCache agent configuration converted from an LMCache configuration\n\
         # (nencache lmcache convert). One agent per node serves every LMCache process there.\n",
    );
    let _ = write!(
        agent,
        "host:\n  capacity: {}\n  staging: {}\n  max_value: {}\n  \
         eviction: {eviction}\ncompat:\n  lm:\n    tcp: {}\n",
        size(host),
        size(staging),
        size(max_value),
        opts.lm_listen
    );
    let _ = writeln!(agent, "tiers:\n  demotion_queue: {}", size(2 * max_value));
    if let (Some(d), Some(tier)) = (&disk, tier) {
        let raw = file_path(d).unwrap_or_else(|| d.clone());
        let path = if raw.starts_with('/') {
            format!("{}/cache.t2", raw.trim_end_matches('/'))
        } else {
            opts.default_disk_path.clone()
        };
        let _ = write!(
            agent,
            "  nvme:\n    path: {path}\n    size: {}\n",
            size(tier)
        );
    }

    // LMCache, pointed at the agent. Its CPU backend stays as the buffer its remote
    // connector reads into and writes from; its hot cache is off, so each chunk is held
    // once per node (in the agent), not once per rank.
    let buffer_gb = (cpu_bytes as f64 / f64::from(1u32 << 30)).min(2.0);
    let mut lm: BTreeMap<String, serde_yaml_ng::Value> = BTreeMap::new();
    for (k, v) in cfg {
        if known(k).is_some_and(|(_, class, _)| class == Class::Kept) {
            lm.insert(k.clone(), v.clone());
        }
    }
    lm.insert(
        "remote_url".into(),
        serde_yaml_ng::Value::String(format!("lm://{}", opts.lm_addr)),
    );
    lm.entry("remote_serde".into())
        .or_insert_with(|| "naive".into());
    lm.insert("local_cpu".into(), serde_yaml_ng::Value::Bool(false));
    lm.insert("max_local_cpu_size".into(), buffer_gb.into());
    let mut lmcache_yaml = String::from(
        "# LMCache configuration pointed at the node's NenCache agent (nencache lmcache convert).\n\
         # Also set PYTHONHASHSEED=0 in every LMCache process (builtin chunk hashing).\n",
    );
    lmcache_yaml.push_str(&serde_yaml_ng::to_string(&lm).context("writing LMCache's YAML")?);

    for k in cfg.keys() {
        let Some((_, class, why)) = known(k) else {
            note(
                k,
                Class::Unsupported,
                "not a key this converter knows (LMCache may have added it): check it by hand"
                    .into(),
            );
            continue;
        };
        let v = get(k).unwrap_or_default();
        let why = match k.as_str() {
            "max_local_cpu_size" => format!(
                "{v} GB per rank x {ranks} rank(s) per node -> host.capacity {}; \
                 LMCache keeps a {buffer_gb} GB buffer per rank for transfers",
                size(host)
            ),
            "local_cpu" if !local_cpu => {
                "LMCache's CPU cache was off; the agent's host tier serves in its place".into()
            }
            "local_cpu" => {
                format!("{why}; local_cpu: false in LMCache, so each chunk is held once per node")
            }
            "local_disk" | "local_device" if disk.is_some() => format!("{v} -> tiers.nvme ({why})"),
            "local_device" => "\"cpu\": the agent's host tier".into(),
            "max_local_disk_size" if disk.is_some() => {
                format!("{v} GB per rank x {ranks} rank(s) per node -> tiers.nvme.size")
            }
            "max_local_disk_size" => "no local disk configured".into(),
            "remote_url" => format!("{v} -> lm://{} (the node's agent; {why})", opts.lm_addr),
            "cache_policy" => format!("{v} -> host.eviction {eviction}"),
            "enable_p2p" | "enable_pd" | "enable_xpyd" | "local_cpu_use_hugepages"
                if !truthy(&v) =>
            {
                note(
                    k,
                    Class::NotNeeded,
                    format!("{v}: off, nothing to carry over"),
                );
                continue;
            }
            // LMCache's default is true; it only matters with a gds_path.
            "use_gds" if get("gds_path").is_none() => {
                note(k, Class::NotNeeded, "no gds_path: GDS is not in use".into());
                continue;
            }
            _ => why.to_owned(),
        };
        note(k, class, why);
    }
    Ok(Converted {
        agent_yaml: agent,
        lmcache_yaml,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeArgs;

    fn run(yaml: &str, ranks: u32) -> Converted {
        convert(
            &parse_file(yaml).unwrap(),
            &Options {
                ranks_per_node: ranks,
                ..Options::default()
            },
        )
        .unwrap()
    }

    /// The agent accepts what the converter wrote.
    fn resolves(c: &Converted) -> crate::config::Settings {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, &c.agent_yaml).unwrap();
        ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve_in(&crate::config::Env::default())
        .unwrap_or_else(|e| panic!("{e}: {}", c.agent_yaml))
    }

    fn class_of(c: &Converted, key: &str) -> Class {
        c.report.iter().find(|n| n.key == key).unwrap().class
    }

    #[test]
    fn every_key_is_listed_once() {
        let mut names: Vec<_> = KEYS.iter().map(|(n, ..)| *n).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n);
    }

    /// Every key of LMCache's configuration table in the reference (section 2.2 and its
    /// aliases) is one the converter knows.
    #[test]
    fn the_reference_key_table_is_covered() {
        let md = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/lmcache.md"
        ))
        .unwrap();
        let start = md.find("### 2.1").unwrap();
        let end = md.find("`extra_config` knobs").unwrap();
        let ident = |w: &str| {
            let w = w.trim();
            (w.len() > 2
                && w.contains('_')
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !w.starts_with('_'))
            .then(|| w.to_owned())
        };
        let mut names = Vec::new();
        for line in md[start..end].lines() {
            if let Some(row) = line.strip_prefix("| ") {
                let cell = row.split(" |").next().unwrap();
                let cell = cell.split(" (").next().unwrap();
                names.extend(cell.split(" / ").filter_map(ident));
            }
            for span in line.split('`').skip(1).step_by(2) {
                for part in span.split(['→', ' ', '=']) {
                    names.extend(ident(
                        part.trim_start_matches("LMCACHE_")
                            .to_ascii_lowercase()
                            .as_str(),
                    ));
                }
            }
        }
        names.retain(|n| !n.starts_with("lmcache_config") && !n.ends_with(".py"));
        assert!(names.len() > 100, "{names:?}");
        let known: Vec<_> = KEYS.iter().map(|(n, ..)| *n).collect();
        let missing: Vec<_> = names
            .iter()
            .filter(|n| {
                !known.contains(&n.as_str())
                    && !n.starts_with("nixl_")
                    && *n != "update_config_from_env"
                    && *n != "parse_local_disk"
                    && *n != "config_definitions"
                    && *n != "to_bool"
                    && *n != "config_file"
                    && !n.starts_with("p2p_socket_")
            })
            .collect();
        assert!(
            missing.is_empty(),
            "keys the converter does not know: {missing:?}"
        );
    }

    /// A configuration with every key the converter knows: each is reported once, and
    /// what is written parses (the agent's file and LMCache's YAML).
    #[test]
    fn every_key_is_reported_and_the_output_parses() {
        let mut yaml = String::new();
        for (k, ..) in KEYS {
            let v = match *k {
                "max_local_cpu_size" => "1.5",
                "max_local_disk_size" => "3",
                "local_disk" => "file:///var/cache/lmc/",
                "local_device" => "cpu",
                "remote_url" => "lm://cache-server:65432",
                "cache_policy" => "LRU",
                "extra_config" => "{use_odirect: true}",
                "enable_p2p"
                | "enable_pd"
                | "use_gds"
                | "enable_xpyd"
                | "local_cpu_use_hugepages" => "true",
                "gds_path" => "/mnt/gds",
                _ => "x",
            };
            yaml.push_str(&format!("{k}: {v}\n"));
        }
        let c = run(&yaml, 2);
        assert_eq!(c.report.len(), KEYS.len());
        for (k, class, _) in KEYS {
            assert_eq!(class_of(&c, k), *class, "{k}");
        }
        assert!(c.has_unsupported());
        let s = resolves(&c);
        assert_eq!(s.engine.host.capacity, 3 << 30);
        assert_eq!(s.engine.tiers.len(), 1);
        assert_eq!(
            s.engine.tiers[0].store.path,
            std::path::Path::new("/var/cache/lmc/cache.t2")
        );
        assert_eq!(s.engine.tiers[0].store.capacity, 6 << 30);
        let lm: BTreeMap<String, serde_yaml_ng::Value> =
            serde_yaml_ng::from_str(&c.lmcache_yaml).unwrap();
        assert_eq!(lm["remote_url"], "lm://localhost:65432");
        assert_eq!(lm["local_cpu"], false);
        assert_eq!(lm["chunk_size"], "x");
        assert_eq!(lm["extra_config"]["use_odirect"], true);
        for gone in [
            "local_disk",
            "max_local_disk_size",
            "enable_pd",
            "gds_path",
            "cache_policy",
        ] {
            assert!(
                !lm.contains_key(gone),
                "{gone} left in LMCache's configuration"
            );
        }
        assert!(c.report_text().lines().count() == KEYS.len());
    }

    #[test]
    fn sizes_are_per_rank() {
        let c = run(
            "max_local_cpu_size: 5\nlocal_disk: file:///data/lmc/\nmax_local_disk_size: 100\n",
            4,
        );
        assert!(
            c.agent_yaml.contains("capacity: 20GiB\n"),
            "{}",
            c.agent_yaml
        );
        let s = resolves(&c);
        assert_eq!(s.engine.host.capacity, 20 << 30);
        assert_eq!(s.engine.tiers[0].store.capacity, 400 << 30);
        assert_eq!(s.engine.limits.max_value, 96 << 20);
        assert!(c.report.iter().any(|n| n.why.contains("x 4 rank(s)")));
    }

    #[test]
    fn the_reference_configurations_convert() {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/reference/lmcache-configs"
        );
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            seen += 1;
            let c = run(&std::fs::read_to_string(&path).unwrap(), 1);
            assert!(
                !c.has_unsupported(),
                "{}: {}",
                path.display(),
                c.report_text()
            );
            let s = resolves(&c);
            assert_eq!(s.engine.host.capacity, 5 << 30, "{}", path.display());
            let name = path.file_name().unwrap().to_str().unwrap();
            // `local_device: file://local_disk/` is relative: the default path is used.
            assert_eq!(
                s.engine.tiers.len(),
                usize::from(name.contains("disk")),
                "{name}"
            );
            assert!(c.lmcache_yaml.contains("remote_url: lm://localhost:65432"));
        }
        assert_eq!(seen, 5);
    }

    #[test]
    fn the_environment_is_read_as_lmcache_reads_it() {
        let cfg = from_env([
            ("LMCACHE_MAX_LOCAL_CPU_SIZE".to_owned(), "0.5".to_owned()),
            ("LMCACHE_CACHE_POLICY".to_owned(), "lru".to_owned()),
            ("LMCACHE_ENABLE_PD".to_owned(), "False".to_owned()),
            ("LMCACHE_CONFIG_FILE".to_owned(), "/x.yaml".to_owned()),
            (
                "LMCACHE_EXTRA_CONFIG".to_owned(),
                r#"{"use_odirect": true}"#.to_owned(),
            ),
            ("PATH".to_owned(), "/bin".to_owned()),
        ]);
        assert_eq!(cfg.len(), 4);
        assert_eq!(cfg["extra_config"]["use_odirect"], true);
        assert_eq!(cfg["max_local_cpu_size"], 0.5);
        assert_eq!(cfg["enable_pd"], false);
        assert_eq!(cfg["cache_policy"], "lru");
        let c = convert(&cfg, &Options::default()).unwrap();
        assert_eq!(class_of(&c, "enable_pd"), Class::NotNeeded);
        assert!(!c.has_unsupported());
        let s = resolves(&c);
        assert_eq!(s.engine.host.capacity, 512 << 20);
        assert!(c.agent_yaml.contains("eviction: lru"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_reported() {
        let c = run("chunk_size: 256\nsome_future_key: 1\n", 1);
        assert_eq!(class_of(&c, "some_future_key"), Class::Unsupported);
        let e = convert(
            &parse_file("max_local_cpu_size: lots\n").unwrap(),
            &Options::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_local_cpu_size"), "{e}");
        assert!(parse_file("- a\n- b\n").is_err());
        assert!(parse_file("a: [").is_err());
        assert!(
            convert(
                &parse_file("max_local_cpu_size: -1\n").unwrap(),
                &Options::default()
            )
            .is_err()
        );
    }
}
