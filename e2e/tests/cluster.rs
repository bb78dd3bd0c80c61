//! The whole path on a real cluster: `helm install` the chart, apply a NenCacheCluster, wait
//! for its agents, then run a pod labelled for injection whose init container puts a value
//! through `$NENCACHE_SOCKET` and whose container gets it back. It changes the cluster the
//! kubeconfig points at, so it runs only with `NENCACHE_E2E=1` (e2e/kind.sh sets it);
//! otherwise it says why and passes without reading the kubeconfig. Opted in, a cluster that
//! cannot be reached fails it.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Namespace, Pod},
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, DynamicObject, LogParams, Patch, PatchParams, PostParams},
    core::{ApiResource, GroupVersionKind},
};
use nencache_e2e::{OPT_IN, Settings, helm, opted_in_cluster, wait_for};
use serde_json::json;

const VALUE: &str = "hello-from-nencache-e2e";

fn clusters_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("nencache.io", "v1alpha1", "NenCacheCluster"),
        "nencacheclusters",
    )
}

#[tokio::test]
async fn install_apply_inject_put_and_get() {
    let Some(client) = opted_in_cluster().await.unwrap() else {
        return;
    };
    let s = Settings::from_env().unwrap();
    helm(&s, &["version"])
        .expect("NENCACHE_E2E=1 but helm does not run; set HELM or put helm on the PATH");
    let result = run(&client, &s).await;
    if !s.keep {
        cleanup(&client, &s).await;
    }
    result.unwrap();
}

async fn run(client: &Client, s: &Settings) -> anyhow::Result<()> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/nencache");
    let repo = format!("operator.image.repository={}", s.operator_repository);
    let tag = format!("operator.image.tag={}", s.operator_tag);
    // The agents' privileged init container runs the operator's helper image, not the
    // cluster's: here the agent image under test.
    let (agent_repo, agent_tag) = s
        .agent_image
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("E2E_AGENT_IMAGE needs a tag (repository:tag)"))?;
    let helper_repo = format!("agents.helperImage.repository={agent_repo}");
    let helper_tag = format!("agents.helperImage.tag={agent_tag}");
    eprintln!("installing the chart into {}", s.operator_namespace);
    helm(
        s,
        &[
            "upgrade",
            "--install",
            "nencache",
            chart,
            "--namespace",
            &s.operator_namespace,
            "--create-namespace",
            "--set",
            &repo,
            "--set",
            &tag,
            "--set",
            &helper_repo,
            "--set",
            &helper_tag,
            "--set",
            "operator.replicas=1",
            "--wait",
            "--timeout",
            "5m",
        ],
    )?;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": s.namespace}});
    namespaces
        .patch(
            &s.namespace,
            &PatchParams::apply("nencache-e2e"),
            &Patch::Apply(&ns),
        )
        .await?;

    // A small cache on every Linux node (kind nodes carry no GPU label).
    let clusters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &s.namespace, &clusters_resource());
    let ncc = json!({
        "apiVersion": "nencache.io/v1alpha1", "kind": "NenCacheCluster",
        "metadata": {"name": "cache", "namespace": s.namespace},
        "spec": {
            "image": s.agent_image,
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tiers": {"host": {"size": "256Mi"}},
        },
    });
    clusters
        .patch(
            "cache",
            &PatchParams::apply("nencache-e2e").force(),
            &Patch::Apply(&ncc),
        )
        .await?;
    eprintln!("waiting for the agents");
    wait_for(
        "the NenCacheCluster to be Ready",
        Duration::from_secs(300),
        || {
            let clusters = clusters.clone();
            async move {
                let c = clusters.get("cache").await?;
                let ready = c.data["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                Ok(ready.then_some(()))
            }
        },
    )
    .await?;
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), &s.namespace);
    let agents = ds.get("cache-agent").await?;
    let ready = agents.status.map_or(0, |s| s.number_ready);
    anyhow::ensure!(ready >= 1, "no agent ready");

    // An injected pod, running as an arbitrary user: the agent's group is what lets it in.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &s.namespace);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "put-get", "labels": {"nencache.io/inject": "true"}},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsUser": 1234, "runAsGroup": 1234, "runAsNonRoot": true},
            "initContainers": [{
                "name": "put", "image": s.agent_image,
                "command": ["/usr/local/bin/nencache"], "args": ["put", "e2e-key", "--value", VALUE],
            }],
            "containers": [{
                "name": "get", "image": s.agent_image,
                "command": ["/usr/local/bin/nencache"], "args": ["get", "e2e-key"],
            }],
        },
    }))?;
    let _ = pods.delete("put-get", &DeleteParams::default()).await;
    wait_for("the old test pod to go", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { Ok(pods.get_opt("put-get").await?.is_none().then_some(())) }
    })
    .await?;
    let created = pods.create(&PostParams::default(), &pod).await?;
    let annotations = created.annotations();
    anyhow::ensure!(
        annotations
            .get("nencache.io/injected-by")
            .map(String::as_str)
            == Some(&format!("{}/cache", s.namespace)),
        "the pod was not injected: {annotations:?}"
    );
    eprintln!("waiting for the put and the get");
    let phase = wait_for("the test pod to finish", Duration::from_secs(180), || {
        let pods = pods.clone();
        async move {
            let p = pods.get("put-get").await?;
            let phase = p.status.and_then(|s| s.phase).unwrap_or_default();
            Ok(matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase))
        }
    })
    .await?;
    let log_of = |container: &str| {
        let params = LogParams {
            container: Some(container.into()),
            ..LogParams::default()
        };
        let pods = pods.clone();
        async move { pods.logs("put-get", &params).await.unwrap_or_default() }
    };
    let (put_log, get_log) = (log_of("put").await, log_of("get").await);
    anyhow::ensure!(
        phase == "Succeeded" && get_log.contains(VALUE),
        "pod {phase}; put said {put_log:?}; get said {get_log:?}"
    );
    eprintln!("the value came back through the node's agent");
    Ok(())
}

async fn cleanup(client: &Client, s: &Settings) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces
        .delete(&s.namespace, &DeleteParams::default())
        .await;
    let _ = helm(
        s,
        &[
            "uninstall",
            "nencache",
            "--namespace",
            &s.operator_namespace,
        ],
    );
}

/// `cargo test` never touches a cluster unless asked: runs this binary's end-to-end test
/// without `NENCACHE_E2E`, with a kubeconfig whose API server is a loopback listener, and
/// checks that it passed, said why it skipped, and never connected.
#[test]
fn without_opting_in_no_cluster_is_touched() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let home = std::env::temp_dir().join(format!("nencache-e2e-opt-in-{}", std::process::id()));
    std::fs::create_dir_all(home.join(".kube")).unwrap();
    let kubeconfig = home.join(".kube/config");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: c, cluster: {{server: \"http://{addr}\"}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "install_apply_inject_put_and_get", "--nocapture"])
        .env_remove(OPT_IN)
        .env("KUBECONFIG", &kubeconfig)
        .env("HOME", &home)
        .output()
        .unwrap();
    let mut connections = 0;
    loop {
        match listener.accept() {
            Ok(_) => connections += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    let _ = std::fs::remove_dir_all(&home);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        connections, 0,
        "the API server in the kubeconfig was contacted without NENCACHE_E2E=1: {text}"
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 passed"),
        "the test ran (and skipped): {text}"
    );
    assert!(
        text.contains("skipped") && text.contains("NENCACHE_E2E=1"),
        "says why: {text}"
    );
}
