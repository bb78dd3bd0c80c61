//! The `NenCacheCluster` custom resource (group `nencache.io`, version `v1alpha1`), defined in
//! Rust; `crds/nencachecluster.yaml` is generated from it by the `crdgen` binary.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The agent image used when the spec names none.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/nencache/nencache-agent:",
    env!("CARGO_PKG_VERSION")
);
/// Default socket directory on each node.
pub const DEFAULT_SOCKET_DIR: &str = "/run/nencache";
/// Default admin (metrics, health) port of the agent.
pub const DEFAULT_METRICS_PORT: u16 = 9464;

/// A node-local KV cache: one agent on every selected node, with the given tiers.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "nencache.io",
    version = "v1alpha1",
    kind = "NenCacheCluster",
    namespaced,
    status = "NenCacheClusterStatus",
    shortname = "ncc",
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desired"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.tiers.host.size"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NenCacheClusterSpec {
    /// Agent container image.
    #[serde(default = "default_image")]
    pub image: String,
    /// Image pull policy.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,
    /// Nodes that run an agent (default: GPU nodes, `nvidia.com/gpu.present: "true"`).
    #[serde(default = "default_node_selector")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the agent pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Affinity of the agent pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Priority class of the agent pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Cache tiers.
    #[serde(default)]
    pub tiers: Tiers,
    /// Directory on each node holding the agent's sockets; mounted into injected pods. A
    /// normalized absolute path in one of the host directories the operator allows (by
    /// default `/run/nencache` and `/var/lib/nencache`); any other is refused.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: String,
    /// LMCache-compatible listeners.
    #[serde(default)]
    pub compat: Compat,
    /// Sharing chunks between agents on different nodes.
    #[serde(default)]
    pub peers: Peers,
    /// Metrics.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// Agent log filter (`info`, `debug`, ...).
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Agent container resources; computed from the tier sizes when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Extra environment of the agent container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Extra arguments of `nencache-agent serve`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Seconds an agent pod gets to stop after SIGTERM (default 30): the agent drains its
    /// calls and writes host-resident entries to the lower tiers for all but the last 10.
    /// Raised to at least 20, and to at least 60 with an `nvme` or `disk` tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub termination_grace_period_seconds: Option<i64>,
}

fn default_image() -> String {
    DEFAULT_IMAGE.into()
}

fn default_node_selector() -> BTreeMap<String, String> {
    BTreeMap::from([("nvidia.com/gpu.present".to_string(), "true".to_string())])
}

fn default_socket_dir() -> String {
    DEFAULT_SOCKET_DIR.into()
}

fn default_log_level() -> String {
    "info".into()
}

/// Image pull policy.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum PullPolicy {
    /// Pull when absent from the node.
    #[default]
    IfNotPresent,
    /// Always pull.
    Always,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// The Kubernetes string.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::IfNotPresent => "IfNotPresent",
            Self::Always => "Always",
            Self::Never => "Never",
        }
    }
}

/// The cache tiers of each agent.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Tiers {
    /// T0: GPU memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<SizedTier>,
    /// T1: host shared memory.
    #[serde(default)]
    pub host: HostTier,
    /// T2: NVMe, a log-structured store in one file (O_DIRECT, io_uring or pread).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvme: Option<NvmeTier>,
    /// T3: disk, a directory of memory-mapped segment files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<StorageTier>,
}

/// A size written as a Kubernetes quantity of bytes (`1073741824`, `512Mi`, `8Gi`, `1G`).
const SIZE_PATTERN: &str = "^[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)?$";

/// A tier with only a size.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SizedTier {
    /// Size as a Kubernetes quantity (`8Gi`).
    #[schemars(regex(pattern = SIZE_PATTERN))]
    pub size: String,
}

/// The host-memory tier.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostTier {
    /// Arena size as a Kubernetes quantity.
    #[serde(default = "default_host_size")]
    #[schemars(regex(pattern = SIZE_PATTERN))]
    pub size: String,
    /// Back the arena with huge pages (needs hugepages resources on the node).
    #[serde(default)]
    pub huge_pages: bool,
    /// Lock the arena into RAM (adds the IPC_LOCK capability).
    #[serde(default)]
    pub lock_memory: bool,
    /// Largest value the agent accepts, as a Kubernetes quantity (default: 64Mi, less for a
    /// small arena); from 1Mi to a quarter of `size`. Raise it for KV chunks of large models
    /// (a 256-token chunk of a 70B model in 16 bits is 80Mi); the staging area grows to twice
    /// it, and each lower tier must hold four times it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SIZE_PATTERN))]
    pub max_value: Option<String>,
}

fn default_host_size() -> String {
    "1Gi".into()
}

impl Default for HostTier {
    fn default() -> Self {
        Self {
            size: default_host_size(),
            huge_pages: false,
            lock_memory: false,
            max_value: None,
        }
    }
}

/// A storage tier on the node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageTier {
    /// Capacity as a Kubernetes quantity (at least `256Mi`).
    #[schemars(regex(pattern = SIZE_PATTERN))]
    pub size: String,
    /// Directory on the node that holds the tier's files: a normalized absolute path in one
    /// of the host directories the operator allows, as for `socketDir`, apart from the socket
    /// directory and the other tier's directory.
    pub host_path: String,
}

/// The NVMe tier: one file in a directory on the node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NvmeTier {
    /// Capacity as a Kubernetes quantity (at least `256Mi`).
    #[schemars(regex(pattern = SIZE_PATTERN))]
    pub size: String,
    /// Directory on the node that holds the tier's file: a normalized absolute path in one
    /// of the host directories the operator allows, as for `socketDir`, apart from the socket
    /// directory and the other tier's directory.
    pub host_path: String,
    /// I/O engine (default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Which entries the tier takes (default: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
}

/// The NVMe tier's I/O engine: `auto` (the default: io_uring where the kernel and the
/// container's seccomp profile allow it, else pread), `io_uring` (the agent does not start
/// without it) or `pread`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum IoEngine {
    /// io_uring where the kernel allows it, else pread.
    #[default]
    Auto,
    /// io_uring only (the agent does not start without it).
    IoUring,
    /// pread and pwrite on a small thread pool.
    Pread,
}

impl IoEngine {
    /// The agent's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::IoUring => "io_uring",
            Self::Pread => "pread",
        }
    }
}

/// Which entries the tier takes from the tier above: `all`, or `reused` (only entries read
/// again while in the tier above); the agent's default when absent.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Every entry the tier above moves down.
    All,
    /// Only entries that were read again while in the tier above.
    Reused,
}

impl Admission {
    /// The agent's spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Reused => "reused",
        }
    }
}

/// LMCache-compatible listeners.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Compat {
    /// Port of the `lm://` listener, if enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lm_port: Option<u16>,
    /// Port of the RESP (Redis protocol) listener, if enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_port: Option<u16>,
}

/// Peer sharing between agents.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.enabled || has(self.tlsSecret)").message("peers.tlsSecret is required when peers.enabled is true"))]
pub struct Peers {
    /// Share chunks with agents on other nodes.
    #[serde(default)]
    pub enabled: bool,
    /// Secret holding the mTLS certificate, key and CA (required when enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret: Option<String>,
}

/// Metrics settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Admin port (health, readiness, metrics).
    #[serde(default = "default_metrics_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// Create a Prometheus Operator ServiceMonitor.
    #[serde(default)]
    pub service_monitor: bool,
}

fn default_metrics_port() -> u16 {
    DEFAULT_METRICS_PORT
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            port: DEFAULT_METRICS_PORT,
            service_monitor: false,
        }
    }
}

/// Observed state.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NenCacheClusterStatus {
    /// The generation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes that should run an agent.
    #[serde(default)]
    pub desired: i32,
    /// Agents ready.
    #[serde(default)]
    pub ready: i32,
    /// Agents running the current spec.
    #[serde(default)]
    pub updated: i32,
    /// Ready, Progressing, Degraded, ConfigValid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
