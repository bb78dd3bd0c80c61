//! The `nencache-operator` binary itself, run as a process against the in-memory API server
//! of tests/common served over real HTTP (kubeconfig and all): it issues its webhook
//! certificate and writes the CA bundle, becomes leader, reconciles an existing cluster
//! (objects applied, status written, an Event published), answers an admission review over
//! TLS, reports it all on its admin endpoint, and on SIGTERM stops and releases the Lease.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine;
use common::{
    fake_api::{FakeApi, serve},
    http::{http, https, patch_of, review},
};
use serde_json::{Value, json};

const SECRET: &str = "/api/v1/namespaces/nencache-system/secrets/nencache-webhook-tls";
const LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/nencache-system/leases/nencache-operator";
const CONFIG: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/nencache";
const CLUSTER: &str = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache";
const DAEMON_SET: &str = "/apis/apps/v1/namespaces/ml/daemonsets/cache-agent";

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn get(fake: &Mutex<FakeApi>, path: &str) -> Option<Value> {
    fake.lock().unwrap().objects.get(path).cloned()
}

/// Polls `f` every 100 ms until it holds, for up to 30 s.
async fn eventually(what: &str, log: &std::path::Path, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; operator log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A running operator process; killed if the test ends early.
struct Operator {
    child: std::process::Child,
    admin: SocketAddr,
    webhook: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    /// Starts replica `name` against the API server at `api`, and waits until it is ready.
    async fn start(api: SocketAddr, dir: &std::path::Path, name: &str) -> Self {
        Self::start_with(api, dir, name, &[]).await
    }

    /// As [`Operator::start`], with extra environment.
    async fn start_with(
        api: SocketAddr,
        dir: &std::path::Path,
        name: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
                 clusters: [{{name: fake, cluster: {{server: \"http://{api}\"}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
                 users: [{{name: fake, user: {{token: t}}}}]\n"
            ),
        )
        .unwrap();
        let (admin, webhook) = (free_port(), free_port());
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_nencache-operator"))
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "nencache-system")
            .env("NENCACHE_OPERATOR_ADMIN_ADDR", admin.to_string())
            .env("NENCACHE_OPERATOR_WEBHOOK_ADDR", webhook.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let op = Self {
            child,
            admin,
            webhook,
            log,
        };
        let start = Instant::now();
        while !http(admin, "GET", "/readyz")
            .await
            .is_ok_and(|(c, _)| c == 200)
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} never ready:\n{}",
                op.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends the test admission review to its webhook, trusting `ca`.
    async fn admit(&self, ca: &str) -> (u16, String) {
        https(
            self.webhook,
            ca,
            "POST",
            "/mutate-pods",
            &review().to_string(),
        )
        .await
        .unwrap()
    }

    async fn metrics(&self) -> String {
        http(self.admin, "GET", "/metrics").await.unwrap().1
    }

    /// Sends SIGTERM and waits for a successful exit.
    async fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "still running after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(status.success(), "{status}:\n{}", self.log_text());
    }
}

/// The CA bundle (PEM) in the webhook certificate Secret.
fn ca_of(fake: &Mutex<FakeApi>) -> String {
    let secret = get(fake, SECRET).expect("the certificate Secret");
    let b64 = secret["data"]["ca.crt"].as_str().unwrap();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

fn holder(fake: &Mutex<FakeApi>) -> Option<String> {
    get(fake, LEASE).and_then(|l| l["spec"]["holderIdentity"].as_str().map(String::from))
}

/// The API server with a webhook configuration and one cluster, served over HTTP.
async fn api_with_a_cluster() -> (Arc<Mutex<FakeApi>>, SocketAddr) {
    let fake = FakeApi::shared();
    {
        let mut f = fake.lock().unwrap();
        f.put(CONFIG, json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "nencache"},
            "webhooks": [{"name": "pods.nencache.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {"name": "nencache-webhook", "namespace": "nencache-system"}}}],
        }));
        f.put(
            CLUSTER,
            json!({
                "apiVersion": "nencache.io/v1alpha1", "kind": "NenCacheCluster",
                "metadata": {"name": "cache", "namespace": "ml", "uid": "u-1", "generation": 1},
                "spec": {"tiers": {"host": {"size": "2Gi"}}},
            }),
        );
    }
    let addr = serve(&fake).await;
    (fake, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_binary_leads_reconciles_injects_and_stops_cleanly() {
    let (fake, api) = api_with_a_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let mut op = Operator::start(api, dir.path(), "op-0").await;
    let log = op.log.clone();
    let log = log.as_path();

    // Serving: certificate issued and stored, CA bundle written.
    let ca = ca_of(&fake);
    assert_eq!(
        get(&fake, CONFIG).unwrap()["webhooks"][0]["clientConfig"]["caBundle"],
        base64::engine::general_purpose::STANDARD.encode(&ca)
    );

    // Leading and reconciling the cluster that was there before it started.
    eventually("the Lease", log, || {
        holder(&fake).as_deref() == Some("op-0")
    })
    .await;
    eventually("the DaemonSet", log, || get(&fake, DAEMON_SET).is_some()).await;
    eventually("the status", log, || {
        get(&fake, CLUSTER).is_some_and(|c| c["status"]["observedGeneration"] == 1)
    })
    .await;
    let status = get(&fake, CLUSTER).unwrap()["status"].clone();
    let valid = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ConfigValid")
        .unwrap()
        .clone();
    assert_eq!(valid["status"], "True");
    eventually("the Applied event", log, || {
        let f = fake.lock().unwrap();
        f.objects.iter().any(|(k, v)| {
            k.starts_with("/apis/events.k8s.io/v1/namespaces/ml/events/")
                && v["reason"] == "Applied"
        })
    })
    .await;
    let ds = get(&fake, DAEMON_SET).unwrap();
    assert_eq!(ds["metadata"]["ownerReferences"][0]["uid"], "u-1");

    // The webhook answers over TLS with the CA it published, knowing the cluster.
    let (code, body) = op.admit(&ca).await;
    assert_eq!(code, 200, "{body}");
    let ops = patch_of(&serde_json::from_str(&body).unwrap());
    assert!(ops.iter().any(|o| o["value"] == "ml/cache"), "{ops:?}");

    let metrics = op.metrics().await;
    assert!(metrics.contains("nencache_operator_leader 1"), "{metrics}");
    assert!(
        metrics.contains("nencache_operator_reconciles_total{result=\"ok\"}"),
        "{metrics}"
    );

    // SIGTERM: a clean exit that hands the Lease back.
    op.terminate().await;
    assert_eq!(holder(&fake), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_replica_serves_the_webhook_and_takes_over_when_the_leader_stops() {
    let (fake, api) = api_with_a_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = Operator::start(api, dir.path(), "op-0").await;
    eventually("op-0 to lead", &first.log.clone(), || {
        holder(&fake).as_deref() == Some("op-0")
    })
    .await;
    let second = Operator::start(api, dir.path(), "op-1").await;

    // Both serve the webhook with the one certificate; only the first leads.
    let ca = ca_of(&fake);
    for op in [&first, &second] {
        assert_eq!(op.admit(&ca).await.0, 200);
    }
    assert!(
        second
            .metrics()
            .await
            .contains("nencache_operator_leader 0")
    );
    assert_eq!(holder(&fake).as_deref(), Some("op-0"));

    // The leader stops: the standby leads within a few retry periods, not a lease duration.
    first.terminate().await;
    let stopped = Instant::now();
    eventually("op-1 to lead", &second.log.clone(), || {
        holder(&fake).as_deref() == Some("op-1")
    })
    .await;
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopped.elapsed()
    );
    let start = Instant::now();
    while !second
        .metrics()
        .await
        .contains("nencache_operator_leader 1")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "op-1 never ran the controller"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_webhook_and_leader_election_off_it_only_reconciles() {
    let (fake, api) = api_with_a_cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let mut op = Operator::start_with(
        api,
        dir.path(),
        "solo",
        &[
            ("NENCACHE_OPERATOR_WEBHOOK", "false"),
            ("NENCACHE_OPERATOR_LEADER_ELECT", "false"),
        ],
    )
    .await;
    let log = op.log.clone();
    eventually("the DaemonSet", &log, || get(&fake, DAEMON_SET).is_some()).await;
    assert!(op.metrics().await.contains("nencache_operator_leader 1"));
    assert!(
        get(&fake, SECRET).is_none(),
        "no certificate without the webhook"
    );
    assert!(
        get(&fake, LEASE).is_none(),
        "no Lease without leader election"
    );
    assert!(https(op.webhook, "", "GET", "/healthz", "").await.is_err());
    op.terminate().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_enforces_the_host_paths_and_helper_image_it_is_configured_with() {
    let (fake, api) = api_with_a_cluster().await;
    const EVIL: &str = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/evil";
    const SRV: &str = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/srv";
    {
        let mut f = fake.lock().unwrap();
        for (path, name, uid, dir) in [
            (EVIL, "evil", "u-2", "/etc"),
            (SRV, "srv", "u-3", "/srv/nencache/srv"),
        ] {
            f.put(
                path,
                json!({
                    "apiVersion": "nencache.io/v1alpha1", "kind": "NenCacheCluster",
                    "metadata": {"name": name, "namespace": "ml", "uid": uid, "generation": 1},
                    "spec": {"socketDir": dir, "image": "example.com/whatever:latest"},
                }),
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mut op = Operator::start_with(
        api,
        dir.path(),
        "op-0",
        &[
            (
                "NENCACHE_OPERATOR_HOST_PATH_PREFIXES",
                "/srv/nencache,/run/nencache",
            ),
            (
                "NENCACHE_OPERATOR_HELPER_IMAGE",
                "registry.internal/helper:7",
            ),
            ("NENCACHE_OPERATOR_HELPER_IMAGE_PULL_POLICY", "Always"),
        ],
    )
    .await;
    let log = op.log.clone();
    let condition = |path: &str, type_: &str| {
        get(&fake, path).and_then(|c| {
            c["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == type_)
                .cloned()
        })
    };
    eventually("the refused cluster's status", &log, || {
        condition(EVIL, "ConfigValid").is_some()
    })
    .await;
    let refused = condition(EVIL, "ConfigValid").unwrap();
    assert_eq!(refused["status"], "False");
    let msg = refused["message"].as_str().unwrap();
    assert!(
        msg.contains("socketDir") && msg.contains("/srv/nencache, /run/nencache"),
        "{msg}"
    );
    assert!(
        get(&fake, "/apis/apps/v1/namespaces/ml/daemonsets/evil-agent").is_none(),
        "nothing applied for a refused cluster"
    );

    // An allowed cluster: its privileged helper runs the operator's image, not the cluster's.
    let srv_ds = "/apis/apps/v1/namespaces/ml/daemonsets/srv-agent";
    eventually("the allowed cluster's DaemonSet", &log, || {
        get(&fake, srv_ds).is_some()
    })
    .await;
    let pod = get(&fake, srv_ds).unwrap()["spec"]["template"]["spec"].clone();
    assert_eq!(
        pod["initContainers"][0]["image"],
        "registry.internal/helper:7"
    );
    assert_eq!(pod["initContainers"][0]["imagePullPolicy"], "Always");
    assert_eq!(pod["containers"][0]["image"], "example.com/whatever:latest");
    assert_eq!(pod["volumes"][1]["hostPath"]["path"], "/srv/nencache/srv");

    // The webhook does not hand the refused cluster's directory to pods.
    let ca = ca_of(&fake);
    let mut review = review();
    review["request"]["object"]["metadata"]["annotations"] = json!({"nencache.io/cluster": "evil"});
    let (code, body) = https(op.webhook, &ca, "POST", "/mutate-pods", &review.to_string())
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let ops = patch_of(&serde_json::from_str(&body).unwrap());
    assert!(!ops.iter().any(|o| o["path"] == "/spec/volumes"), "{ops:?}");
    assert!(
        ops.iter().any(|o| o["value"]
            .as_str()
            .is_some_and(|v| v.contains("is not injected"))),
        "{ops:?}"
    );
    op.terminate().await;
}

#[test]
fn the_operator_refuses_to_start_with_unsound_host_path_prefixes() {
    for prefixes in ["/", "relative", "/run/../etc", "/run/nencache/"] {
        let out = Command::new(env!("CARGO_BIN_EXE_nencache-operator"))
            .env("NENCACHE_OPERATOR_HOST_PATH_PREFIXES", prefixes)
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{prefixes}: {text}");
        assert!(text.contains("host path prefix"), "{prefixes}: {text}");
    }
}
