//! Every object the operator generates, and the CRD itself, validated offline against the
//! official Kubernetes schemas in strict mode (unknown fields rejected) with PyPI's
//! `kubernetes-validate`, which `.ci/run` installs. Where it is not installed the test says so
//! and passes.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use kube::CustomResourceExt;
use nencache_operator::{
    build::{build, validate},
    crd::NenCacheCluster,
};

fn validator_present() -> bool {
    Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn generated_manifests_pass_strict_kubernetes_validation() {
    if !validator_present() {
        // CI installs it, so there a missing validator is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "kubernetes-validate is not installed"
        );
        eprintln!(
            "skipped: kubernetes-validate is not installed (pip install kubernetes-validate)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut write = |name: String, yaml: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, yaml).unwrap();
        files.push(p);
    };
    write(
        "crd.yaml".into(),
        serde_yaml_ng::to_string(&NenCacheCluster::crd()).unwrap(),
    );
    for fixture in ["minimal.yaml", "full.yaml"] {
        let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let ncc: NenCacheCluster =
            serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let r = build(&ncc, &validate(&ncc).unwrap());
        write(
            format!("{fixture}-cm.yaml"),
            serde_yaml_ng::to_string(&r.config_map).unwrap(),
        );
        write(
            format!("{fixture}-ds.yaml"),
            serde_yaml_ng::to_string(&r.daemon_set).unwrap(),
        );
        write(
            format!("{fixture}-svc.yaml"),
            serde_yaml_ng::to_string(&r.service).unwrap(),
        );
        write(
            format!("{fixture}-sa.yaml"),
            serde_yaml_ng::to_string(&r.service_account).unwrap(),
        );
    }
    // The oldest and newest Kubernetes versions k8s-openapi is built for here.
    for version in ["1.33.0", "1.37.0"] {
        let out = Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--no-warn",
                "-k",
                version,
            ])
            .args(&files)
            .output()
            .unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "Kubernetes {version}: {report}");
        assert_eq!(
            report.matches("passed for resource").count(),
            files.len(),
            "{report}"
        );
    }
}
