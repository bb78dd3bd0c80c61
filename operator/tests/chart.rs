//! The Helm chart, linted and rendered with a real `helm` under several value sets; every
//! rendered object validated against the official Kubernetes schemas in strict mode, the
//! NenCacheCluster it can create validated against the CRD's schema, and the wiring between
//! the chart and the operator binary checked: environment variables the binary reads, and
//! RBAC names matching the Lease, Secret and webhook configuration the operator uses.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::{path::Path, process::Command};

use common::tools;
use nencache_operator::{
    build::{Policy, validate},
    crd::NenCacheCluster,
};
use serde_json::Value;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/nencache");
const CRD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/nencachecluster.yaml");

/// Value sets the chart is rendered with.
const VALUE_SETS: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    (
        "cluster-and-dashboard",
        &[
            "cluster.enabled=true",
            "cluster.name=cache",
            "cluster.spec.tiers.host.size=8Gi",
            "cluster.spec.tiers.nvme.size=64Gi",
            "cluster.spec.tiers.nvme.hostPath=/var/lib/nencache/nvme",
            "cluster.spec.tiers.nvme.ioEngine=pread",
            "cluster.spec.tiers.disk.size=1Ti",
            "cluster.spec.tiers.disk.hostPath=/var/lib/nencache/disk",
            "cluster.spec.terminationGracePeriodSeconds=90",
            "cluster.spec.metrics.serviceMonitor=true",
            "dashboard.enabled=true",
        ],
    ),
    (
        "single-replica-no-webhook",
        &[
            "operator.replicas=1",
            "operator.leaderElection=false",
            "webhook.enabled=false",
        ],
    ),
    (
        "customised",
        &[
            "operator.image.tag=dev",
            "operator.image.pullPolicy=Always",
            "operator.imagePullSecrets[0].name=registry",
            "operator.nodeSelector.pool=system",
            "operator.tolerations[0].key=dedicated",
            "operator.tolerations[0].operator=Exists",
            "operator.podAnnotations.team=ml",
            "operator.priorityClassName=system-cluster-critical",
            "webhook.failurePolicy=Fail",
            "webhook.excludeNamespaces={kube-system,monitoring}",
            "agents.hostPathPrefixes={/srv/nencache,/run/nencache}",
            "agents.helperImage.repository=registry.internal/nencache-agent",
            "agents.helperImage.tag=1.2.3",
            "agents.helperImage.pullPolicy=Always",
        ],
    ),
];

fn run(helm: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(helm).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn set_args(sets: &[&str]) -> Vec<String> {
    sets.iter()
        .flat_map(|s| ["--set".into(), s.to_string()])
        .collect()
}

/// Renders the chart (release `nencache` in `nencache-system`) into its objects.
fn render(helm: &Path, sets: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        "nencache",
        CHART,
        "--namespace",
        "nencache-system",
    ];
    let sets = set_args(sets);
    args.extend(sets.iter().map(String::as_str));
    let (ok, out) = run(helm, &args);
    assert!(ok, "{out}");
    serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str) -> Option<&'a Value> {
    objs.iter().find(|o| o["kind"] == kind)
}

fn env_of(deploy: &Value) -> Vec<(String, String)> {
    deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = e["value"].as_str().unwrap_or_default().to_string();
            (e["name"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

#[test]
fn the_chart_lints_and_renders_valid_objects_with_every_value_set() {
    let Some(helm) = tools::helm() else { return };
    if !tools::kubernetes_validate_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, sets) in VALUE_SETS {
        let mut lint = vec!["lint", "--strict", CHART];
        let args = set_args(sets);
        lint.extend(args.iter().map(String::as_str));
        let (ok, out) = run(&helm, &lint);
        assert!(ok, "{name}: {out}");

        let objs = render(&helm, sets);
        let mut files = Vec::new();
        let mut custom = Vec::new();
        for (i, o) in objs.iter().enumerate() {
            let p = dir.path().join(format!("{name}-{i}.yaml"));
            std::fs::write(&p, serde_yaml_ng::to_string(o).unwrap()).unwrap();
            if o["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("nencache.io/")
            {
                custom.push(p);
            } else {
                files.push(p);
            }
        }
        tools::kubernetes_validate(&files);
        for e in tools::crd_schema_errors(Path::new(CRD), &custom) {
            assert_eq!(e, None, "{name}");
        }
        // And the operator runs the cluster the chart creates (with its default policy).
        for o in objs.iter().filter(|o| o["kind"] == "NenCacheCluster") {
            let ncc: NenCacheCluster = serde_json::from_value(o.clone()).unwrap();
            let v = validate(&ncc, &Policy::default());
            assert!(v.is_ok(), "{name}: {v:?}");
        }
        let kinds: Vec<&str> = objs.iter().map(|o| o["kind"].as_str().unwrap()).collect();
        let has = |k: &str| kinds.contains(&k);
        assert!(
            has("Deployment") && has("ClusterRole") && has("Role"),
            "{name}: {kinds:?}"
        );
        let webhook = !sets.contains(&"webhook.enabled=false");
        assert_eq!(has("MutatingWebhookConfiguration"), webhook, "{name}");
        assert_eq!(
            has("NenCacheCluster"),
            sets.contains(&"cluster.enabled=true"),
            "{name}"
        );
        assert_eq!(
            has("ConfigMap"),
            sets.contains(&"dashboard.enabled=true"),
            "{name}"
        );
        assert_eq!(
            has("PodDisruptionBudget"),
            !sets.contains(&"operator.replicas=1"),
            "{name}"
        );
    }
}

#[test]
fn the_chart_and_the_operator_binary_agree() {
    let Some(helm) = tools::helm() else { return };
    let objs = render(&helm, &[]);
    let deploy = find(&objs, "Deployment").unwrap();
    let env = env_of(deploy);

    // Every NENCACHE_OPERATOR_* variable the chart sets is one the binary reads.
    let help = Command::new(env!("CARGO_BIN_EXE_nencache-operator"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for (name, _) in &env {
        assert!(
            help.contains(&format!("[env: {name}=")),
            "{name} is not read by the operator:\n{help}"
        );
    }
    let value = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();

    // RBAC names the objects the operator uses.
    let role = find(&objs, "Role").unwrap();
    let named: Vec<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resourceNames"].as_array().into_iter().flatten())
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        named.contains(&value("NENCACHE_OPERATOR_LEASE").as_str()),
        "{named:?}"
    );
    assert!(
        named.contains(&value("NENCACHE_OPERATOR_WEBHOOK_SECRET").as_str()),
        "{named:?}"
    );
    let hook = find(&objs, "MutatingWebhookConfiguration").unwrap();
    assert_eq!(
        hook["metadata"]["name"],
        value("NENCACHE_OPERATOR_WEBHOOK_CONFIG")
    );
    let cluster_role = find(&objs, "ClusterRole").unwrap().to_string();
    assert!(cluster_role.contains(&format!(
        "\"{}\"",
        value("NENCACHE_OPERATOR_WEBHOOK_CONFIG")
    )));
    for resource in [
        "nencacheclusters/status",
        "daemonsets",
        "servicemonitors",
        "events",
        "serviceaccounts",
    ] {
        assert!(
            cluster_role.contains(&format!("\"{resource}\"")),
            "{resource}"
        );
    }

    // The webhook: only labelled pods, failures ignored, served by the operator's Service.
    let w = &hook["webhooks"][0];
    assert_eq!(w["failurePolicy"], "Ignore");
    assert_eq!(
        w["objectSelector"]["matchLabels"]["nencache.io/inject"],
        "true"
    );
    assert_eq!(
        w["clientConfig"]["service"]["name"],
        value("NENCACHE_OPERATOR_WEBHOOK_SERVICE")
    );
    assert_eq!(w["clientConfig"]["service"]["path"], "/mutate-pods");
    assert!(
        w["clientConfig"].get("caBundle").is_none(),
        "the operator writes the CA bundle"
    );
    let excluded = w["namespaceSelector"]["matchExpressions"][0]["values"].to_string();
    assert!(
        excluded.contains("nencache-system"),
        "the operator's own namespace: {excluded}"
    );

    // Not privileged, as for the agents.
    let sc = &deploy["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");

    // What clusters may ask of the nodes, and the privileged helper, are the operator's: by
    // default the binary's own defaults (the agent image of the chart's version).
    assert_eq!(
        value("NENCACHE_OPERATOR_HOST_PATH_PREFIXES"),
        nencache_operator::build::DEFAULT_HOST_PATH_PREFIXES.join(",")
    );
    assert_eq!(
        value("NENCACHE_OPERATOR_HELPER_IMAGE"),
        nencache_operator::crd::DEFAULT_IMAGE
    );
    assert_eq!(
        value("NENCACHE_OPERATOR_HELPER_IMAGE_PULL_POLICY"),
        "IfNotPresent"
    );
}

#[test]
fn host_path_prefixes_and_the_helper_image_are_set_through_the_chart() {
    let Some(helm) = tools::helm() else { return };
    let objs = render(
        &helm,
        &[
            "agents.hostPathPrefixes={/srv/nencache,/mnt/fast/nencache}",
            "agents.helperImage.repository=registry.internal/nencache-agent",
            "agents.helperImage.tag=1.2.3",
            "agents.helperImage.pullPolicy=Never",
        ],
    );
    let env = env_of(find(&objs, "Deployment").unwrap());
    let value = |k: &str| env.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(
        value("NENCACHE_OPERATOR_HOST_PATH_PREFIXES"),
        "/srv/nencache,/mnt/fast/nencache"
    );
    assert_eq!(
        value("NENCACHE_OPERATOR_HELPER_IMAGE"),
        "registry.internal/nencache-agent:1.2.3"
    );
    assert_eq!(value("NENCACHE_OPERATOR_HELPER_IMAGE_PULL_POLICY"), "Never");
    // The operator accepts what the chart passes: it parses its flags and gets as far as
    // looking for a cluster (none in this kubeconfig).
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nencache-operator"))
        .env("KUBECONFIG", dir.path().join("none"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .envs(
            env.iter()
                .filter(|(n, _)| {
                    n.starts_with("NENCACHE_OPERATOR_HELPER") || n.ends_with("PREFIXES")
                })
                .map(|(n, v)| (n, v)),
        )
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("/mnt/fast/nencache")
            && log.contains("registry.internal/nencache-agent:1.2.3"),
        "{log}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_chart_carries_the_generated_crd_and_rejects_bad_values() {
    let chart_crd = std::fs::read_to_string(format!("{CHART}/crds/nencachecluster.yaml")).unwrap();
    assert_eq!(
        chart_crd,
        std::fs::read_to_string(CRD).unwrap(),
        "charts/nencache/crds is a copy of crds/: cp crds/nencachecluster.yaml charts/nencache/crds/"
    );
    let Some(helm) = tools::helm() else { return };
    for bad in [
        "operator.replicas=0",
        "webhook.failurePolicy=Sometimes",
        "operator.image.pullPolicy=Often",
        "cluster.name=Not_A_Name",
        "surprise=1",
        "agents.hostPathPrefixes={relative/path}",
        "agents.hostPathPrefixes={/}",
        "agents.hostPathPrefixes={/run/nencache/../../etc}",
        "agents.hostPathPrefixes={/run/./nencache}",
        "agents.hostPathPrefixes={/run/nencache/}",
        "agents.hostPathPrefixes={/run//nencache}",
        "agents.hostPathPrefixes={}",
        "agents.helperImage.repository=",
        "agents.helperImage.pullPolicy=Sometimes",
    ] {
        let args = ["template", "nencache", CHART, "--set", bad];
        let (ok, out) = run(&helm, &args);
        assert!(!ok, "{bad} was accepted");
        assert!(
            out.contains("values don't meet the specifications of the schema"),
            "{bad}: {out}"
        );
    }
}
