//! The pure part of reconciling a `NenCacheCluster`: [`validate`] checks the spec against what
//! the agent supports and what the operator's [`Policy`] allows (host paths only under its
//! prefixes) and turns sizes into bytes, [`build`] makes every object the cluster owns (its
//! privileged helper from the policy's image). Nothing here talks to the API server, so the
//! whole mapping is tested from YAML fixtures.

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

use crate::crd::{DEFAULT_IMAGE, NenCacheCluster, PullPolicy};

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

/// What the operator lets clusters ask of the nodes, and what it runs with privilege. Set by
/// the operator's flags (the chart's values), never by a `NenCacheCluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Host directories a cluster's host paths (`socketDir`) must be in (or be).
    host_path_prefixes: Vec<String>,
    /// Image of the privileged helper: the init container that hands the socket directory to
    /// the agent's user.
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
    if spec.tiers.nvme.is_some() {
        return Err(SpecError::Unsupported("tiers.nvme"));
    }
    if spec.tiers.disk.is_some() {
        return Err(SpecError::Unsupported("tiers.disk"));
    }
    if spec.tiers.host.huge_pages {
        return Err(SpecError::Unsupported("tiers.host.hugePages"));
    }
    if spec.compat.lm_port.is_some() || spec.compat.redis_port.is_some() {
        return Err(SpecError::Unsupported("compat listeners"));
    }
    if spec.peers.enabled {
        return Err(SpecError::Unsupported("peers"));
    }
    // The storage tiers' hostPaths are refused above with their tiers; when those tiers come,
    // their paths go through the same check.
    policy.check_host_path("socketDir", &spec.socket_dir)?;
    if spec.socket_dir.len() > MAX_SOCKET_DIR {
        return Err(SpecError::SocketDirTooLong(spec.socket_dir.clone()));
    }
    // The agent's own default: a quarter of the arena, at most 256 MiB, at least 64 MiB.
    let staging_bytes = (host_bytes / 4).clamp(64 << 20, 256 << 20);
    Ok(Validated {
        host_bytes,
        staging_bytes,
    })
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

/// The agent configuration file (the agent's YAML schema; see docs/configuration.md).
#[must_use]
pub fn agent_config(ncc: &NenCacheCluster, v: &Validated) -> String {
    let s = &ncc.spec;
    format!(
        "# Generated by nencache-operator from NenCacheCluster {name}.\n\
         socket: {dir}/agent.sock\n\
         admin_addr: 0.0.0.0:{port}\n\
         log_format: json\n\
         log_level: {level:?}\n\
         host:\n  capacity: {host}\n  staging: {staging}\n  lock_memory: {lock}\n",
        name = ncc.name_any(),
        dir = s.socket_dir.trim_end_matches('/'),
        port = s.metrics.port,
        level = s.log_level,
        host = v.host_bytes,
        staging = v.staging_bytes,
        lock = s.tiers.host.lock_memory,
    )
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

/// Memory for the agent: arena + staging + 256 MiB for everything else.
fn default_resources(v: &Validated) -> ResourceRequirements {
    let mem = Quantity(format!(
        "{}Mi",
        (v.host_bytes + v.staging_bytes).div_ceil(1 << 20) + 256
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
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: port,
            ..ContainerPort::default()
        }]),
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
        volume_mounts: Some(vec![
            VolumeMount {
                name: "config".into(),
                mount_path: "/etc/nencache".into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "sockets".into(),
                mount_path: s.socket_dir.clone(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    // The kubelet creates the hostPath socket directory owned by root; this hands it to the
    // agent's user before the agent starts. Root, but with CHOWN as its only capability, and
    // from the operator's own helper image, never the cluster's: `prepare-dir` takes over only
    // a directory it created, one the agent owns already, or an empty root-owned 0755 one (what
    // the kubelet creates), and the path is in a prefix the operator allows.
    let prepare = Container {
        name: "prepare-socket-dir".into(),
        image: Some(policy.helper_image.clone()),
        image_pull_policy: Some(policy.helper_image_pull_policy.as_str().into()),
        args: Some(vec![
            "prepare-dir".into(),
            "--uid".into(),
            AGENT_UID.to_string(),
            "--gid".into(),
            AGENT_UID.to_string(),
            "--mode".into(),
            "750".into(),
            s.socket_dir.clone(),
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
        volume_mounts: Some(vec![VolumeMount {
            name: "sockets".into(),
            mount_path: s.socket_dir.clone(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
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
            init_containers: Some(vec![prepare]),
            containers: vec![container],
            volumes: Some(vec![
                Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: format!("{agent}-config"),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                },
                Volume {
                    name: "sockets".into(),
                    host_path: Some(HostPathVolumeSource {
                        path: s.socket_dir.clone(),
                        type_: Some("DirectoryOrCreate".into()),
                    }),
                    ..Volume::default()
                },
            ]),
            ..PodSpec::default()
        }),
    }
}
