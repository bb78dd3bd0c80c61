//! Pod injection: the mutating admission logic that gives pods labelled
//! `nencache.io/inject: "true"` the node's agent socket. The logic is pure (an admission
//! review and the known clusters in, a JSON patch out); [`router`] puts it behind
//! `POST /mutate-pods`, which [`crate::https`] serves over TLS.
//!
//! An injected pod gets a hostPath volume of the cluster's socket directory, mounted at the
//! same path in every container and init container, `NENCACHE_SOCKET` pointing at the
//! agent's socket (a value the pod already sets is kept), and the agent's group as a
//! supplemental group, since the sockets are open to that group only. Injection is
//! idempotent: a pod that already has the volume is left alone. A labelled pod that cannot
//! be injected (no cluster, or several and no `nencache.io/cluster` annotation naming one) is
//! admitted unchanged except for a `nencache.io/skip-reason` annotation saying why.
//!
//! A pod annotated `nencache.io/lmcache: "true"` also gets the environment that points an
//! unmodified LMCache at the node's agent:
//! `LMCACHE_REMOTE_URL=lm://<cluster>-agent-compat.<namespace>.svc:<lmPort>` (the cluster's
//! compat Service, whose `internalTrafficPolicy: Local` routes to the agent of the pod's own
//! node), `LMCACHE_REMOTE_SERDE=naive`, and `PYTHONHASHSEED=0`
//! (LMCache's builtin chunk hash must agree across processes). Variables the container sets
//! already are kept. When the cluster has no `lm://` listener (`spec.compat.lmPort`) the
//! socket is still injected and the skip reason says why the LMCache environment was not.
//!
//! A cluster whose socket directory the operator's [`Policy`] does not allow (outside the
//! allowed host path prefixes) is never injected: the pod gets the skip reason instead, so a
//! cluster cannot have pods mount arbitrary host directories.

use std::{borrow::Borrow, sync::Arc};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    ResourceExt,
    core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
    runtime::reflector::Store,
};
use serde_json::{Value, json};

use crate::{
    build::{AGENT_UID, Policy},
    crd::NenCacheCluster,
};

/// Label that asks for injection.
pub const INJECT_LABEL: &str = "nencache.io/inject";
/// Annotation naming the cluster (`name` or `namespace/name`) when there are several.
pub const CLUSTER_ANNOTATION: &str = "nencache.io/cluster";
/// Annotation recording why a labelled pod was not injected.
pub const SKIP_ANNOTATION: &str = "nencache.io/skip-reason";
/// Annotation recording which cluster a pod was injected for.
pub const INJECTED_ANNOTATION: &str = "nencache.io/injected-by";
/// Name of the socket volume added to pods.
pub const SOCKET_VOLUME: &str = "nencache-socket";
/// Environment variable naming the agent's socket.
pub const SOCKET_ENV: &str = "NENCACHE_SOCKET";
/// Annotation asking for the LMCache environment.
pub const LMCACHE_ANNOTATION: &str = "nencache.io/lmcache";

/// The LMCache part of an injection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lmcache {
    /// Not asked for.
    NotAsked,
    /// Point LMCache at this `lm://` URL: the cluster's compat Service, which routes to the
    /// agent of the pod's own node.
    Url(String),
    /// Asked for, but the cluster cannot serve it, for this reason.
    Unavailable(String),
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not labelled for injection, or already injected.
    Ignore,
    /// Labelled but not injectable, for this reason.
    Skip(String),
    /// Inject the socket of this cluster (`namespace/name`, socket directory).
    Inject {
        /// `namespace/name` of the cluster.
        cluster: String,
        /// The cluster's socket directory on the node.
        socket_dir: String,
        /// Whether and how to add the LMCache environment.
        lmcache: Lmcache,
    },
}

fn cluster_id(c: &NenCacheCluster) -> String {
    format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any())
}

/// Decides what to do with `pod`, created in namespace `namespace`, given the clusters that
/// exist and what `policy` allows. (A pod made by a controller often has no namespace in its
/// own metadata at admission; the request names it.)
#[must_use]
pub fn decide<C: Borrow<NenCacheCluster>>(
    pod: &Pod,
    namespace: &str,
    clusters: &[C],
    policy: &Policy,
) -> Decision {
    if pod.labels().get(INJECT_LABEL).map(String::as_str) != Some("true") {
        return Decision::Ignore;
    }
    let spec_volumes = pod.spec.as_ref().and_then(|s| s.volumes.as_ref());
    if spec_volumes.is_some_and(|v| v.iter().any(|v| v.name == SOCKET_VOLUME)) {
        return Decision::Ignore;
    }
    let chosen = match pod.annotations().get(CLUSTER_ANNOTATION) {
        Some(want) => {
            let (ns, name) = want.split_once('/').unwrap_or((namespace, want.as_str()));
            match clusters
                .iter()
                .map(Borrow::borrow)
                .find(|c: &&NenCacheCluster| {
                    c.name_any() == name && c.namespace().as_deref() == Some(ns)
                }) {
                Some(c) => c,
                None => return Decision::Skip(format!("no NenCacheCluster {ns}/{name}")),
            }
        }
        None => match clusters {
            [] => return Decision::Skip("no NenCacheCluster exists".into()),
            [one] => one.borrow(),
            _ => {
                return Decision::Skip(format!(
                    "{} NenCacheClusters exist; name one with the {CLUSTER_ANNOTATION} annotation",
                    clusters.len()
                ));
            }
        },
    };
    if let Err(e) = policy.check_host_path("socketDir", &chosen.spec.socket_dir) {
        return Decision::Skip(format!(
            "NenCacheCluster {} is not injected: {e}",
            cluster_id(chosen)
        ));
    }
    let asked = pod
        .annotations()
        .get(LMCACHE_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    let lmcache = match (asked, chosen.spec.compat.lm_port) {
        (false, _) => Lmcache::NotAsked,
        (true, Some(port)) => Lmcache::Url(format!(
            "lm://{}.{}.svc:{port}",
            crate::build::compat_service_name(&chosen.name_any()),
            chosen.namespace().unwrap_or_else(|| "default".into())
        )),
        (true, None) => Lmcache::Unavailable(format!(
            "LMCache environment not injected: NenCacheCluster {} has no lm:// listener (spec.compat.lmPort)",
            cluster_id(chosen)
        )),
    };
    Decision::Inject {
        cluster: cluster_id(chosen),
        socket_dir: chosen.spec.socket_dir.trim_end_matches('/').to_string(),
        lmcache,
    }
}

/// The environment variables an injected container gets, in order (later ones may refer to
/// earlier ones with `$(NAME)`).
fn injected_env(socket_dir: &str, lmcache: &Lmcache) -> Vec<Value> {
    let mut env = vec![json!({"name": SOCKET_ENV, "value": format!("{socket_dir}/agent.sock")})];
    if let Lmcache::Url(url) = lmcache {
        env.push(json!({"name": "LMCACHE_REMOTE_URL", "value": url}));
        env.push(json!({"name": "LMCACHE_REMOTE_SERDE", "value": "naive"}));
        env.push(json!({"name": "PYTHONHASHSEED", "value": "0"}));
    }
    env
}

/// A JSON-patch `add` of `value` at `path`.
fn add(path: impl Into<String>, value: impl Into<Value>) -> Value {
    json!({"op": "add", "path": path.into(), "value": value.into()})
}

/// JSON-pointer escaping of one path segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn annotate(pod: &Pod, key: &str, value: &str, ops: &mut Vec<Value>) {
    if pod.metadata.annotations.is_none() {
        ops.push(add("/metadata/annotations", json!({})));
    }
    let path = format!("/metadata/annotations/{}", escape(key));
    ops.push(add(path, value));
}

/// The JSON patch operations for `decision` on `pod` (empty for [`Decision::Ignore`]).
#[must_use]
pub fn patch_ops(pod: &Pod, decision: &Decision) -> Vec<Value> {
    let mut ops = Vec::new();
    match decision {
        Decision::Ignore => {}
        Decision::Skip(reason) => annotate(pod, SKIP_ANNOTATION, reason, &mut ops),
        Decision::Inject {
            cluster,
            socket_dir,
            lmcache,
        } => {
            let volume = json!({
                "name": SOCKET_VOLUME,
                "hostPath": {"path": socket_dir, "type": "DirectoryOrCreate"},
            });
            let spec = pod.spec.as_ref();
            if spec.and_then(|s| s.volumes.as_ref()).is_none() {
                ops.push(add("/spec/volumes", json!([volume])));
            } else {
                ops.push(add("/spec/volumes/-", volume));
            }
            let mount = json!({"name": SOCKET_VOLUME, "mountPath": socket_dir});
            let env = injected_env(socket_dir, lmcache);
            let lists = [
                ("containers", spec.map(|s| s.containers.as_slice())),
                (
                    "initContainers",
                    spec.and_then(|s| s.init_containers.as_deref()),
                ),
            ];
            for (list, containers) in lists {
                for (i, c) in containers.unwrap_or_default().iter().enumerate() {
                    let base = format!("/spec/{list}/{i}");
                    // A container that mounts something at the socket path already keeps it: a
                    // second mount there would make the pod invalid.
                    match &c.volume_mounts {
                        None => ops.push(add(format!("{base}/volumeMounts"), json!([mount]))),
                        Some(m)
                            if m.iter()
                                .any(|m| m.mount_path.trim_end_matches('/') == socket_dir) => {}
                        Some(_) => ops.push(add(format!("{base}/volumeMounts/-"), mount.clone())),
                    }
                    let has = |name: &Value| {
                        c.env
                            .iter()
                            .flatten()
                            .any(|v| Some(v.name.as_str()) == name.as_str())
                    };
                    let missing: Vec<Value> =
                        env.iter().filter(|e| !has(&e["name"])).cloned().collect();
                    match &c.env {
                        _ if missing.is_empty() => {}
                        None => ops.push(add(format!("{base}/env"), missing)),
                        Some(_) => {
                            ops.extend(missing.into_iter().map(|e| add(format!("{base}/env/-"), e)))
                        }
                    }
                }
            }
            // The agent's sockets are group-accessible (0660, directory 0750): join its group.
            let sc = spec.and_then(|s| s.security_context.as_ref());
            match sc.map(|sc| sc.supplemental_groups.as_deref()) {
                None => ops.push(add(
                    "/spec/securityContext",
                    json!({"supplementalGroups": [AGENT_UID]}),
                )),
                Some(None) => ops.push(add(
                    "/spec/securityContext/supplementalGroups",
                    json!([AGENT_UID]),
                )),
                Some(Some(groups)) if !groups.contains(&AGENT_UID) => {
                    ops.push(add("/spec/securityContext/supplementalGroups/-", AGENT_UID));
                }
                Some(Some(_)) => {}
            }
            annotate(pod, INJECTED_ANNOTATION, cluster, &mut ops);
            if let Lmcache::Unavailable(reason) = lmcache {
                // The pod carries the lmcache annotation, so it has annotations already.
                annotate(pod, SKIP_ANNOTATION, reason, &mut ops);
            }
        }
    }
    ops
}

/// The JSON the API server expects for `resp`, with `ops` (if any) as its JSON patch. The
/// patch is written here, base64-encoded, rather than through kube's
/// `AdmissionResponse::with_patch`, which serializes `[]byte` as an array of numbers (kube-rs
/// issue 1781) that the API server does not read.
fn to_wire(resp: AdmissionResponse, ops: &[Value]) -> Value {
    use base64::Engine;
    let mut v = serde_json::to_value(resp.into_review()).unwrap_or(Value::Null);
    if !ops.is_empty()
        && let Some(r) = v.get_mut("response").and_then(Value::as_object_mut)
        && let Ok(patch) = serde_json::to_vec(ops)
    {
        r.insert("patchType".into(), "JSONPatch".into());
        let encoded = base64::engine::general_purpose::STANDARD.encode(patch);
        r.insert("patch".into(), encoded.into());
    }
    v
}

/// Answers an admission review for a pod with the JSON the API server expects. Never denies:
/// a pod that cannot be injected is admitted (with a skip reason), as `failurePolicy: Ignore`
/// would admit it anyway.
#[must_use]
pub fn mutate<C: Borrow<NenCacheCluster>>(
    review: AdmissionReview<Pod>,
    clusters: &[C],
    policy: &Policy,
) -> Value {
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(r) => r,
        Err(e) => return to_wire(AdmissionResponse::invalid(e.to_string()), &[]),
    };
    let resp = AdmissionResponse::from(&req);
    let ops = req
        .object
        .as_ref()
        .map(|pod| {
            let namespace = req
                .namespace
                .clone()
                .or_else(|| pod.namespace())
                .unwrap_or_default();
            patch_ops(pod, &decide(pod, &namespace, clusters, policy))
        })
        .unwrap_or_default();
    to_wire(resp, &ops)
}

/// Path the webhook configuration points at.
pub const MUTATE_PATH: &str = "/mutate-pods";

/// The webhook's routes: `POST /mutate-pods` answers an `AdmissionReview` of a pod, using the
/// clusters in `clusters` (a reflector kept current by a watch) and what `policy` allows;
/// `GET /healthz`.
pub fn router(clusters: Store<NenCacheCluster>, policy: Policy) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(review))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .with_state((clusters, Arc::new(policy)))
}

async fn review(
    State((clusters, policy)): State<(Store<NenCacheCluster>, Arc<Policy>)>,
    body: Bytes,
) -> Response {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("not an AdmissionReview of a Pod: {e}\n");
            return (StatusCode::BAD_REQUEST, msg).into_response();
        }
    };
    let answer = mutate(review, &clusters.state(), &policy);
    (
        [(header::CONTENT_TYPE, "application/json")],
        answer.to_string(),
    )
        .into_response()
}
