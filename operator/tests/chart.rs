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
