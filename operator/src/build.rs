//! The pure part of reconciling a `NenCacheCluster`: [`validate`] checks the spec against what
//! the agent supports and what the operator's [`Policy`] allows (host paths only under its
//! prefixes, and apart from each other) and turns sizes into bytes, [`build`] makes every
//! object the cluster owns (its privileged helpers from the policy's image). Nothing here
//! talks to the API server, so the whole mapping is tested from YAML fixtures.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort,
            HTTPGetAction, HostPathVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
            Probe, ResourceRequirements, SeccompProfile, SecurityContext, Service, ServiceAccount,
            ServicePort, ServiceSpec, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::{
    Resource, ResourceExt,
    core::{ApiResource, DynamicObject, GroupVersionKind},
};
use serde_json::json;

use crate::crd::{DEFAULT_IMAGE, IoEngine, NenCacheCluster, PullPolicy};

/// Field manager used for server-side apply.
pub const FIELD_MANAGER: &str = "nencache-operator";
/// Path of the agent's configuration file inside its container.
pub const CONFIG_PATH: &str = "/etc/nencache/agent.yaml";
/// User the agent runs as.
pub const AGENT_UID: i64 = 65532;
/// Annotation on the agents' pod template holding a hash of their configuration, so that a
/// change of the configuration rolls the agents.
pub const CONFIG_HASH_ANNOTATION: &str = "nencache.io/config-hash";
/// Host directories a cluster's host paths may be in unless the operator is told otherwise.
pub const DEFAULT_HOST_PATH_PREFIXES: &[&str] = &["/run/nencache", "/var/lib/nencache"];
/// Longest socket directory: the agent's attach socket (`<dir>/agent.sock.attach`) must fit in
/// a Unix socket address (108 bytes with its terminating NUL).
const MAX_SOCKET_DIR: usize = 107 - "/agent.sock.attach".len();
/// Where the agent's container mounts the NVMe tier's host directory.
pub const NVME_MOUNT: &str = "/var/lib/nencache/nvme";
/// The NVMe tier's file, in [`NVME_MOUNT`].
pub const NVME_FILE: &str = "cache.t2";
/// Where the agent's container mounts the disk tier's host directory (the tier's segment
/// files go straight into it).
pub const DISK_MOUNT: &str = "/var/lib/nencache/disk";
/// Smallest storage tier: the agent needs two regions in a tier, and sizes each region (16 MiB
/// for NVMe, 64 MiB for disk by default) up to the power of two that holds its largest value
/// with headers: 128 MiB for the 64 MiB largest value it gets from the configuration written
/// here (its staging area is never below 64 MiB).
const MIN_LOWER_TIER_BYTES: u64 = 256 << 20;
/// The agent's default demotion queue (`tiers.demotion_queue`), which must hold the largest
/// value: the operator writes a larger one for a larger `maxValue`.
const DEFAULT_DEMOTION_QUEUE: u64 = 64 << 20;
/// The agent's in-memory index of a lower tier takes about 128 bytes per 64 KiB of the tier's
/// capacity: capacity / 512.
const LOWER_TIER_INDEX_DIVISOR: u64 = 512;
/// After SIGTERM the agent drains in-flight calls, then writes the host-resident entries no
/// lower tier holds to the lower tiers, all within its `shutdown_grace`; then it flushes the
/// tiers and exits. The operator writes `shutdown_grace` as the pods' grace period less this
/// many seconds, left for the flush, for a write batch that outlasts the deadline, and for
/// the exit, so the kubelet's SIGKILL never cuts the agent short.
pub const SHUTDOWN_MARGIN_SECONDS: i64 = 10;
/// The agents' pods' grace period when the spec sets none (Kubernetes' own default).
pub const DEFAULT_GRACE_SECONDS: i64 = 30;
/// Least grace period of the agents' pods: the agent keeps at least its default 10 s drain.
pub const MIN_GRACE_SECONDS: i64 = 10 + SHUTDOWN_MARGIN_SECONDS;
/// Least grace period of the agents' pods with an NVMe or disk tier, for writing the
/// host-resident entries down.
pub const LOWER_TIERS_MIN_GRACE_SECONDS: i64 = 60;

/// What the operator lets clusters ask of the nodes, and what it runs with privilege. Set by
/// the operator's flags (the chart's values), never by a `NenCacheCluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Host directories a cluster's host paths (`socketDir`, the storage tiers' `hostPath`)
    /// must be in (or be).
    host_path_prefixes: Vec<String>,
    /// Image of the privileged helper: the init containers that hand the socket directory and
    /// the storage tiers' directories to the agent's user.
    pub helper_image: String,
    /// Pull policy of the helper image.
    pub helper_image_pull_policy: PullPolicy,
}

impl Default for Policy {
    /// [`DEFAULT_HOST_PATH_PREFIXES`], and the agent image of this operator's version as the
    /// helper image.
    fn default() -> Self {
        Self {
            host_path_prefixes: DEFAULT_HOST_PATH_PREFIXES
                .iter()
                .map(|p| (*p).to_string())
                .collect(),
            helper_image: DEFAULT_IMAGE.into(),
            helper_image_pull_policy: PullPolicy::IfNotPresent,
        }
    }
}

impl Policy {
    /// A policy allowing host paths under `prefixes`, running the helper from `helper_image`.
    ///
    /// # Errors
    /// When no prefix is given, or one is not a normalized absolute path other than `/`.
    pub fn new(
        prefixes: impl IntoIterator<Item = String>,
        helper_image: String,
        helper_image_pull_policy: PullPolicy,
    ) -> Result<Self, String> {
        let host_path_prefixes: Vec<String> = prefixes.into_iter().collect();
        if host_path_prefixes.is_empty() {
            return Err("at least one host path prefix is needed".into());
        }
        for p in &host_path_prefixes {
            if let Some(why) = path_problem(p) {
                return Err(format!("host path prefix {p:?} {why}"));
            }
        }
        if helper_image.trim().is_empty() {
            return Err("the helper image is empty".into());
        }
        Ok(Self {
            host_path_prefixes,
            helper_image,
            helper_image_pull_policy,
        })
    }

    /// The host directories host paths must be in.
    #[must_use]
    pub fn host_path_prefixes(&self) -> &[String] {
        &self.host_path_prefixes
    }

    /// Checks that host path `value` of `field` is a normalized absolute path in one of the
    /// allowed prefixes.
    ///
    /// # Errors
    /// [`SpecError::HostPath`] naming the field, the problem and the allowed prefixes.
    pub fn check_host_path(&self, field: &'static str, value: &str) -> Result<(), SpecError> {
        let refuse = |reason: String| SpecError::HostPath {
            field,
            value: value.to_string(),
            reason,
            allowed: self.host_path_prefixes.join(", "),
        };
        if let Some(why) = path_problem(value) {
            return Err(refuse(why));
        }
        let inside = self.host_path_prefixes.iter().any(|p| {
            value == p
                || value
                    .strip_prefix(p.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if !inside {
            return Err(refuse(
                "is outside the host directories the operator allows".into(),
            ));
        }
        Ok(())
    }
}

/// Why `path` is not a normalized absolute path of plain components (letters, digits, `.`,
/// `_`, `-`; no empty, `.` or `..` component, no trailing `/`), or `None` when it is one.
fn path_problem(path: &str) -> Option<String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Some("must be an absolute path".into());
    };
    if rest.is_empty() {
        return Some("must not be the root directory".into());
    }
    for component in rest.split('/') {
        match component {
            "" => return Some("must be normalized (no empty component, no trailing /)".into()),
            "." | ".." => return Some(format!("must be normalized (no {component:?} component)")),
            c if !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')) =>
            {
                return Some(format!(
                    "has a component {c:?} with characters other than letters, digits, '.', '_' and '-'"
                ));
            }
            _ => {}
        }
    }
    None
}

/// Whether directories `a` and `b` (normalized absolute paths) are the same or one is inside
/// the other.
fn overlaps(a: &str, b: &str) -> bool {
    let inside = |x: &str, y: &str| x.strip_prefix(y).is_some_and(|rest| rest.starts_with('/'));
    a == b || inside(a, b) || inside(b, a)
}

/// A spec the operator cannot run (reported as the `ConfigValid` condition).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A size is not a Kubernetes quantity of bytes.
    #[error("{field}: {value:?} is not a size (use e.g. 512Mi, 8Gi)")]
    InvalidSize {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A size is out of range.
    #[error("{field}: {value} is out of range ({reason})")]
    SizeOutOfRange {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A feature the agent of this version does not provide.
    #[error("{0} is not supported by this version of the agent yet")]
    Unsupported(&'static str),
    /// A host path the operator does not allow.
    #[error("{field}: {value:?} {reason}; host paths must be in one of: {allowed}")]
    HostPath {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: String,
        /// The prefixes the operator allows, comma-separated.
        allowed: String,
    },
    /// Two directories that must be apart are the same, or one is inside the other.
    #[error(
        "{field}: {value:?} overlaps {other} {other_value:?}; each needs a directory of its own, neither inside the other"
    )]
    Overlap {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
        /// What it overlaps.
        other: &'static str,
        /// The directory it overlaps.
        other_value: String,
    },
    /// The socket directory is too long for the agent's socket addresses.
    #[error(
        "socketDir: {0:?} is longer than {MAX_SOCKET_DIR} bytes (the agent's socket paths must fit in a Unix socket address)"
    )]
    SocketDirTooLong(String),
}

/// A spec checked and converted to what the agent needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    /// Host arena in bytes.
    pub host_bytes: u64,
    /// Staging area in bytes.
    pub staging_bytes: u64,
    /// The largest value in bytes, when the spec sets it.
    pub max_value_bytes: Option<u64>,
    /// NVMe tier capacity in bytes, if the cluster has the tier.
    pub nvme_bytes: Option<u64>,
    /// Disk tier capacity in bytes, if the cluster has the tier.
    pub disk_bytes: Option<u64>,
    /// Seconds the agents' pods get to stop after SIGTERM.
    pub grace_seconds: i64,
}

impl Validated {
    /// The agent's own shutdown budget (`shutdown_grace`), in seconds: the pods' grace period
    /// less [`SHUTDOWN_MARGIN_SECONDS`].
    #[must_use]
    pub fn agent_shutdown_grace_seconds(&self) -> i64 {
        self.grace_seconds - SHUTDOWN_MARGIN_SECONDS
    }
}

/// Parses a Kubernetes quantity of bytes (`1073741824`, `512Mi`, `8Gi`, `1G`, `500M`).
///
/// # Errors
/// When `value` is not such a quantity.
pub fn parse_bytes(field: &'static str, value: &str) -> Result<u64, SpecError> {
    let bad = || SpecError::InvalidSize {
        field,
        value: value.to_string(),
    };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mul: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).ok_or_else(bad)
}

/// Checks the spec against what the agent supports and what `policy` allows.
///
/// # Errors
/// The first problem found.
pub fn validate(ncc: &NenCacheCluster, policy: &Policy) -> Result<Validated, SpecError> {
    let spec = &ncc.spec;
    let host_bytes = parse_bytes("tiers.host.size", &spec.tiers.host.size)?;
    if host_bytes < 64 << 20 {
        return Err(SpecError::SizeOutOfRange {
            field: "tiers.host.size",
            value: spec.tiers.host.size.clone(),
            reason: "at least 64Mi",
        });
    }
    if spec.tiers.gpu.is_some() {
        return Err(SpecError::Unsupported("tiers.gpu"));
    }
    if spec.tiers.host.huge_pages {
        return Err(SpecError::Unsupported("tiers.host.hugePages"));
    }
    let ports = [
        ("compat.lmPort", spec.compat.lm_port),
        ("compat.redisPort", spec.compat.redis_port),
    ];
    for (i, (field, port)) in ports.iter().enumerate() {
        let Some(port) = *port else { continue };
        let clash = if port == 0 {
            Some("a port number from 1 to 65535")
        } else if port == spec.metrics.port {
            Some("the same as metrics.port")
        } else if ports[..i].iter().any(|(_, p)| *p == Some(port)) {
            Some("the same as compat.lmPort")
        } else {
            None
        };
        if let Some(reason) = clash {
            return Err(SpecError::SizeOutOfRange {
                field,
                value: port.to_string(),
                reason,
            });
        }
    }
    if spec.peers.enabled {
        return Err(SpecError::Unsupported("peers"));
    }
    policy.check_host_path("socketDir", &spec.socket_dir)?;
    if spec.socket_dir.len() > MAX_SOCKET_DIR {
        return Err(SpecError::SocketDirTooLong(spec.socket_dir.clone()));
    }
    let nvme_bytes = spec
        .tiers
        .nvme
        .as_ref()
        .map(|t| lower_tier(&NVME, &t.size, &t.host_path, &spec.socket_dir, policy))
        .transpose()?;
    let disk_bytes = spec
        .tiers
        .disk
        .as_ref()
        .map(|t| lower_tier(&DISK, &t.size, &t.host_path, &spec.socket_dir, policy))
        .transpose()?;
    if let (Some(nvme), Some(disk)) = (&spec.tiers.nvme, &spec.tiers.disk)
        && overlaps(&disk.host_path, &nvme.host_path)
    {
        return Err(SpecError::Overlap {
            field: DISK.host_path_field,
            value: disk.host_path.clone(),
            other: NVME.host_path_field,
            other_value: nvme.host_path.clone(),
        });
    }
    let max_value_bytes = match &spec.tiers.host.max_value {
        Some(q) => {
            let b = parse_bytes("tiers.host.maxValue", q)?;
            if b < 1 << 20 || b > host_bytes / 4 {
                return Err(SpecError::SizeOutOfRange {
                    field: "tiers.host.maxValue",
                    value: q.clone(),
                    reason: "from 1Mi to a quarter of tiers.host.size",
                });
            }
            for (field, tier) in [
                ("tiers.nvme.size", nvme_bytes),
                ("tiers.disk.size", disk_bytes),
            ] {
                // A tier holds at least two regions, each a power of two that holds the
                // largest value with its headers: four times the value is always enough.
                if tier.is_some_and(|t| t < 4 * b) {
                    return Err(SpecError::SizeOutOfRange {
                        field,
                        value: tier.unwrap_or_default().to_string(),
                        reason: "at least four times tiers.host.maxValue",
                    });
                }
            }
            Some(b)
        }
        None => None,
    };
    // The agent's own default: a quarter of the arena, at most 256 MiB, at least 64 MiB; and
    // room for two of the largest values.
    let staging_bytes = (host_bytes / 4)
        .clamp(64 << 20, 256 << 20)
        .max(2 * max_value_bytes.unwrap_or(0));
    let least_grace = if nvme_bytes.is_some() || disk_bytes.is_some() {
        LOWER_TIERS_MIN_GRACE_SECONDS
    } else {
        MIN_GRACE_SECONDS
    };
    let grace_seconds = spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        .max(least_grace);
    Ok(Validated {
        host_bytes,
        staging_bytes,
        max_value_bytes,
        nvme_bytes,
        disk_bytes,
        grace_seconds,
    })
}

/// The fields and limits of a storage tier.
struct LowerTier {
    /// Field of its size.
    size_field: &'static str,
    /// Field of its host directory.
    host_path_field: &'static str,
    /// Smallest size, and how the error says it.
    min_bytes: u64,
    min_text: &'static str,
    /// Where the agent's container mounts its host directory, and how an error names that.
    mount: &'static str,
    mount_text: &'static str,
    /// Name of its volume (and, prefixed `prepare-`, of the init container preparing it).
    volume: &'static str,
}

const NVME: LowerTier = LowerTier {
    size_field: "tiers.nvme.size",
    host_path_field: "tiers.nvme.hostPath",
    min_bytes: MIN_LOWER_TIER_BYTES,
    min_text: "at least 256Mi",
    mount: NVME_MOUNT,
    mount_text: "the agent container's mount of tiers.nvme",
    volume: "tier-nvme",
};

const DISK: LowerTier = LowerTier {
    size_field: "tiers.disk.size",
    host_path_field: "tiers.disk.hostPath",
    min_bytes: MIN_LOWER_TIER_BYTES,
    min_text: "at least 256Mi",
    mount: DISK_MOUNT,
    mount_text: "the agent container's mount of tiers.disk",
    volume: "tier-disk",
};

/// Checks a storage tier: its size, its host directory (allowed by `policy`, and apart from
/// the socket directory, which the prepare step needs empty or the agent's and which injected
/// pods mount), and that the socket directory, mounted at its own path in the agent's
/// container, stays apart from where the tier is mounted there. Returns the size in bytes.
fn lower_tier(
    tier: &LowerTier,
    size: &str,
    host_path: &str,
    socket_dir: &str,
    policy: &Policy,
) -> Result<u64, SpecError> {
    let bytes = parse_bytes(tier.size_field, size)?;
    if bytes < tier.min_bytes {
        return Err(SpecError::SizeOutOfRange {
            field: tier.size_field,
            value: size.to_string(),
            reason: tier.min_text,
        });
    }
    policy.check_host_path(tier.host_path_field, host_path)?;
    if overlaps(host_path, socket_dir) {
        return Err(SpecError::Overlap {
            field: tier.host_path_field,
            value: host_path.to_string(),
            other: "socketDir",
            other_value: socket_dir.to_string(),
        });
    }
    if overlaps(socket_dir, tier.mount) {
        return Err(SpecError::Overlap {
            field: "socketDir",
            value: socket_dir.to_string(),
            other: tier.mount_text,
            other_value: tier.mount.to_string(),
        });
    }
    Ok(bytes)
}

/// Everything a cluster owns.
#[derive(Debug, Clone)]
pub struct Resources {
    /// The agent's configuration file.
    pub config_map: ConfigMap,
    /// One agent per selected node.
    pub daemon_set: DaemonSet,
    /// Headless Service for peers and metrics.
    pub service: Service,
    /// The LMCache-compatible listeners' Service (`<agent>-compat`), when the cluster has
    /// any: a ClusterIP Service with `internalTrafficPolicy: Local`, so that a pod reaches
    /// the agent of its own node.
    pub compat_service: Option<Service>,
    /// The agents' identity.
    pub service_account: ServiceAccount,
    /// A Prometheus Operator ServiceMonitor for the agents' metrics, when asked for.
    pub service_monitor: Option<DynamicObject>,
}

/// The Prometheus Operator's `monitoring.coreos.com/v1` ServiceMonitor resource.
#[must_use]
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

fn service_monitor(ncc: &NenCacheCluster, agent: &str) -> DynamicObject {
    let mut sm = DynamicObject::new(agent, &service_monitor_resource()).data(json!({
        "spec": {
            "selector": {"matchLabels": selector_labels(&ncc.name_any())},
            "namespaceSelector": {"matchNames": [ncc.namespace().unwrap_or_default()]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
        }
    }));
    sm.metadata = meta(ncc, agent.to_string());
    sm
}

/// The name of a cluster's compat Service: `<cluster>-agent-compat`.
#[must_use]
pub fn compat_service_name(name: &str) -> String {
    format!("{}-compat", agent_name(name))
}

/// Name shared by the objects of cluster `name`.
#[must_use]
pub fn agent_name(name: &str) -> String {
    format!("{name}-agent")
}

/// Labels selecting the agents of cluster `name`.
#[must_use]
pub fn selector_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".into(), "nencache-agent".into()),
        ("app.kubernetes.io/instance".into(), name.into()),
    ])
}

fn labels(name: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(name);
    l.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
    l.insert("app.kubernetes.io/component".into(), "agent".into());
    l
}

/// The agent configuration file (the agent's YAML schema; see docs/configuration.md). It
/// always has a `tiers:` section: without one the agent would give itself a disk tier in a
/// directory of its own choosing, so a cluster without lower tiers writes `tiers: {}`.
#[must_use]
pub fn agent_config(ncc: &NenCacheCluster, v: &Validated) -> String {
    use std::fmt::Write as _;
    let s = &ncc.spec;
    let mut out = format!(
        "# Generated by nencache-operator from NenCacheCluster {name}.\n\
         socket: {dir}/agent.sock\n\
         admin_addr: 0.0.0.0:{port}\n\
         log_format: json\n\
         log_level: {level:?}\n\
         shutdown_grace: {grace}s\n\
         host:\n  capacity: {host}\n  staging: {staging}\n  lock_memory: {lock}\n",
        name = ncc.name_any(),
        dir = s.socket_dir.trim_end_matches('/'),
        port = s.metrics.port,
        level = s.log_level,
        host = v.host_bytes,
        staging = v.staging_bytes,
        lock = s.tiers.host.lock_memory,
        grace = v.agent_shutdown_grace_seconds(),
    );
    if let Some(m) = v.max_value_bytes {
        let _ = writeln!(out, "  max_value: {m}");
    }
    let (nvme, disk) = (
        s.tiers.nvme.as_ref().zip(v.nvme_bytes),
        s.tiers.disk.as_ref().zip(v.disk_bytes),
    );
    // Writing to a String cannot fail.
    if s.compat.lm_port.is_some() || s.compat.redis_port.is_some() {
        out.push_str("compat:\n");
        if let Some(p) = s.compat.lm_port {
            let _ = write!(out, "  lm:\n    tcp: 0.0.0.0:{p}\n");
        }
        if let Some(p) = s.compat.redis_port {
            let _ = write!(out, "  redis:\n    tcp: 0.0.0.0:{p}\n");
        }
    }
    // The demotion queue must hold the largest value (its default is 64 MiB).
    let queue = v.max_value_bytes.filter(|&m| m > DEFAULT_DEMOTION_QUEUE);
    if nvme.is_none() && disk.is_none() && queue.is_none() {
        out.push_str("tiers: {}\n");
        return out;
    }
    out.push_str("tiers:\n");
    if let Some(q) = queue {
        let _ = writeln!(out, "  demotion_queue: {q}");
    }
    if let Some((t, bytes)) = nvme {
        let _ = write!(
            out,
            "  nvme:\n    path: {NVME_MOUNT}/{NVME_FILE}\n    size: {bytes}\n    io_engine: {}\n",
            t.io_engine.unwrap_or(IoEngine::Auto).as_str()
        );
        if let Some(a) = t.admission {
            let _ = writeln!(out, "    admission: {}", a.as_str());
        }
    }
    if let Some((_, bytes)) = disk {
        let _ = write!(out, "  disk:\n    path: {DISK_MOUNT}\n    size: {bytes}\n");
    }
    out
}

fn meta(ncc: &NenCacheCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ncc.namespace(),
        labels: Some(labels(&ncc.name_any())),
        owner_references: owner(ncc).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn owner(ncc: &NenCacheCluster) -> Option<OwnerReference> {
    ncc.controller_owner_ref(&())
}

/// A hash (SHA-256, hex) of a ConfigMap's data, for [`CONFIG_HASH_ANNOTATION`].
#[must_use]
pub fn config_hash(data: &BTreeMap<String, String>) -> String {
    use std::fmt::Write as _;
    use tokio_rustls::rustls::{SupportedCipherSuite, crypto::ring::cipher_suite};
    // Keys in order, each entry length-prefixed, so distinct maps never hash the same input.
    let mut input = Vec::new();
    for (k, v) in data {
        for part in [k, v] {
            input.extend_from_slice(&(part.len() as u64).to_be_bytes());
            input.extend_from_slice(part.as_bytes());
        }
    }
    // ring's SHA-256, reached through rustls (already the webhook's TLS provider).
    let SupportedCipherSuite::Tls13(suite) = cipher_suite::TLS13_AES_128_GCM_SHA256 else {
        unreachable!("a TLS 1.3 cipher suite")
    };
    let digest = suite.common.hash_provider.hash(&input);
    digest.as_ref().iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Builds every object of the cluster; privileged helpers run what `policy` says.
#[must_use]
pub fn build(ncc: &NenCacheCluster, v: &Validated, policy: &Policy) -> Resources {
    let name = ncc.name_any();
    let agent = agent_name(&name);
    let data = BTreeMap::from([("agent.yaml".to_string(), agent_config(ncc, v))]);
    let hash = config_hash(&data);
    let config_map = ConfigMap {
        metadata: meta(ncc, format!("{agent}-config")),
        data: Some(data),
        ..ConfigMap::default()
    };
    // The agent never calls the API server: its identity carries no token and no RBAC.
    let service_account = ServiceAccount {
        metadata: meta(ncc, agent.clone()),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    };
    let port = i32::from(ncc.spec.metrics.port);
    let service = Service {
        metadata: meta(ncc, agent.clone()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("metrics".into()),
                port,
                target_port: Some(IntOrString::Int(port)),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let compat_ports: Vec<ServicePort> = [
        ("lm", ncc.spec.compat.lm_port),
        ("redis", ncc.spec.compat.redis_port),
    ]
    .into_iter()
    .filter_map(|(name, port)| {
        port.map(|p| ServicePort {
            name: Some(name.into()),
            port: i32::from(p),
            target_port: Some(IntOrString::String(name.into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        })
    })
    .collect();
    let compat_service = (!compat_ports.is_empty()).then(|| Service {
        metadata: meta(ncc, compat_service_name(&name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(compat_ports),
            internal_traffic_policy: Some("Local".into()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    });
    let daemon_set = DaemonSet {
        metadata: meta(ncc, agent.clone()),
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..RollingUpdateDaemonSet::default()
                }),
            }),
            template: pod_template(ncc, v, policy, &agent, hash),
            ..DaemonSetSpec::default()
        },
        ..DaemonSet::default()
    };
    Resources {
        config_map,
        daemon_set,
        service,
        compat_service,
        service_account,
        service_monitor: ncc
            .spec
            .metrics
            .service_monitor
            .then(|| service_monitor(ncc, &agent)),
    }
}

fn probe(path: &str, port: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// Memory for the agent: arena + staging + the lower tiers' in-memory index (about 128
/// bytes per 64 KiB of their capacity) + a demotion queue grown past its default for large
/// values + 256 MiB for everything else. The disk tier's
/// memory-mapped segments are not in it: they are file-backed page cache, charged to the
/// pod's cgroup while resident but reclaimable, so the kernel evicts them at the limit
/// instead of killing the agent. The NVMe tier uses O_DIRECT and so no page cache.
fn default_resources(v: &Validated) -> ResourceRequirements {
    // Saturating: sizes are bounded only by u64, and the sums must not wrap.
    let index = (v
        .nvme_bytes
        .unwrap_or(0)
        .saturating_add(v.disk_bytes.unwrap_or(0)))
    .div_ceil(LOWER_TIER_INDEX_DIVISOR);
    let mem = Quantity(format!(
        "{}Mi",
        v.host_bytes
            .saturating_add(v.staging_bytes)
            .saturating_add(
                v.max_value_bytes
                    .unwrap_or(0)
                    .saturating_sub(DEFAULT_DEMOTION_QUEUE),
            )
            .div_ceil(1 << 20)
            .saturating_add(index.div_ceil(1 << 20))
            .saturating_add(256)
    ));
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), Quantity("250m".into())),
            ("memory".into(), mem.clone()),
        ])),
        limits: Some(BTreeMap::from([("memory".into(), mem)])),
        ..ResourceRequirements::default()
    }
}

fn pod_template(
    ncc: &NenCacheCluster,
    v: &Validated,
    policy: &Policy,
    agent: &str,
    config_hash: String,
) -> PodTemplateSpec {
    let s = &ncc.spec;
    let port = i32::from(s.metrics.port);
    // The storage tiers the cluster has, each with its host directory.
    let lower: Vec<(&LowerTier, &str)> = [
        s.tiers.nvme.as_ref().map(|t| (&NVME, t.host_path.as_str())),
        s.tiers.disk.as_ref().map(|t| (&DISK, t.host_path.as_str())),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut args = vec!["serve".to_string(), "--config".into(), CONFIG_PATH.into()];
    args.extend(s.args.iter().cloned());
    let add = s
        .tiers
        .host
        .lock_memory
        .then(|| vec!["IPC_LOCK".to_string()]);
    let container = Container {
        name: "agent".into(),
        image: Some(s.image.clone()),
        image_pull_policy: Some(s.image_pull_policy.as_str().into()),
        args: Some(args),
        env: (!s.env.is_empty()).then(|| s.env.clone()),
        ports: Some(
            std::iter::once(("metrics", Some(s.metrics.port)))
                .chain([("lm", s.compat.lm_port), ("redis", s.compat.redis_port)])
                .filter_map(|(name, p)| {
                    p.map(|p| ContainerPort {
                        name: Some(name.into()),
                        container_port: i32::from(p),
                        protocol: Some("TCP".into()),
                        ..ContainerPort::default()
                    })
                })
                .collect(),
        ),
        readiness_probe: Some(probe("/readyz", port, 5)),
        liveness_probe: Some(probe("/healthz", port, 10)),
        resources: Some(s.resources.clone().unwrap_or_else(|| default_resources(v))),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(
            [
                VolumeMount {
                    name: "config".into(),
                    mount_path: "/etc/nencache".into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                mount("sockets", &s.socket_dir),
            ]
            .into_iter()
            .chain(lower.iter().map(|(t, _)| mount(t.volume, t.mount)))
            .collect(),
        ),
        ..Container::default()
    };
    // The kubelet creates hostPath directories owned by root; these hand the socket directory
    // (0750: clients connect through the agent's group) and each storage tier's directory
    // (0700: the agent's alone) to the agent's user before the agent starts.
    let init_containers = std::iter::once(prepare_dir(
        policy,
        "prepare-socket-dir",
        "sockets",
        &s.socket_dir,
        "750",
    ))
    .chain(lower.iter().map(|(t, _)| {
        prepare_dir(
            policy,
            &format!("prepare-{}-dir", t.volume),
            t.volume,
            t.mount,
            "700",
        )
    }))
    .collect();
    let host_dir = |name: &str, path: &str| Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Volume::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&ncc.name_any())),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.into(),
                config_hash,
            )])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(agent.into()),
            automount_service_account_token: Some(false),
            node_selector: Some(s.node_selector.clone()),
            tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
            affinity: s.affinity.clone(),
            priority_class_name: s.priority_class_name.clone(),
            host_ipc: Some(false),
            host_network: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_user: Some(AGENT_UID),
                run_as_group: Some(AGENT_UID),
                fs_group: Some(AGENT_UID),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            init_containers: Some(init_containers),
            containers: vec![container],
            // Time for the agent to drain its calls and, with lower tiers, to write the
            // host-resident entries to them; its own budget ends 10 s earlier.
            termination_grace_period_seconds: Some(v.grace_seconds),
            volumes: Some(
                [
                    Volume {
                        name: "config".into(),
                        config_map: Some(ConfigMapVolumeSource {
                            name: format!("{agent}-config"),
                            ..ConfigMapVolumeSource::default()
                        }),
                        ..Volume::default()
                    },
                    host_dir("sockets", &s.socket_dir),
                ]
                .into_iter()
                .chain(lower.iter().map(|(t, path)| host_dir(t.volume, path)))
                .collect(),
            ),
            ..PodSpec::default()
        }),
    }
}

fn mount(volume: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: volume.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    }
}

/// An init container that hands hostPath directory `volume`, mounted at `path`, to the agent's
/// user with `mode`. Root, but with CHOWN as its only capability, and from the operator's own
/// helper image, never the cluster's: `prepare-dir` takes over only a directory it created,
/// one the agent owns already, or an empty root-owned 0755 one (what the kubelet creates),
/// and the host path is in a prefix the operator allows.
fn prepare_dir(policy: &Policy, name: &str, volume: &str, path: &str, mode: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(policy.helper_image.clone()),
        image_pull_policy: Some(policy.helper_image_pull_policy.as_str().into()),
        args: Some(vec![
            "prepare-dir".into(),
            "--uid".into(),
            AGENT_UID.to_string(),
            "--gid".into(),
            AGENT_UID.to_string(),
            "--mode".into(),
            mode.into(),
            path.into(),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("32Mi".into()))])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: Some(vec!["CHOWN".into()]),
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![mount(volume, path)]),
        ..Container::default()
    }
}
