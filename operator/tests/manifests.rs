//! Every object the operator generates, and the CRD itself, validated offline against the
//! official Kubernetes schemas in strict mode (unknown fields rejected) with PyPI's
//! `kubernetes-validate`, which `.ci/run` installs; and the custom resource examples in
//! docs/examples and the test fixtures checked against the CRD's own schema. Where the
//! validators are not installed the tests say so and pass (under CI they fail).

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;

use common::tools;
use kube::CustomResourceExt;
use nencache_operator::{
    build::{Policy, build, validate},
    crd::NenCacheCluster,
};

#[test]
fn generated_manifests_pass_strict_kubernetes_validation() {
    if !tools::kubernetes_validate_present() {
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
    for fixture in ["minimal.yaml", "full.yaml", "tiers.yaml"] {
        let path = format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR"));
        let ncc: NenCacheCluster =
            serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let policy = Policy::default();
        let r = build(&ncc, &validate(&ncc, &policy).unwrap(), &policy);
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
        if let Some(svc) = &r.compat_service {
            write(
                format!("{fixture}-compat-svc.yaml"),
                serde_yaml_ng::to_string(svc).unwrap(),
            );
        }
        write(
            format!("{fixture}-sa.yaml"),
            serde_yaml_ng::to_string(&r.service_account).unwrap(),
        );
    }
    tools::kubernetes_validate(&files);
}

#[test]
fn custom_resource_examples_match_the_crd_schema() {
    if !tools::kubernetes_validate_present() {
        return;
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let crd = PathBuf::from(format!("{root}/crds/nencachecluster.yaml"));
    let mut files: Vec<PathBuf> = std::fs::read_dir(format!("{root}/docs/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .contains("kind: NenCacheCluster")
        })
        .collect();
    for fixture in ["minimal.yaml", "full.yaml", "tiers.yaml"] {
        files.push(format!("{}/tests/fixtures/{fixture}", env!("CARGO_MANIFEST_DIR")).into());
    }
    assert!(files.len() >= 4, "{files:?}");
    let errors = tools::crd_schema_errors(&crd, &files);
    for (file, error) in files.iter().zip(&errors) {
        assert_eq!(error, &None, "{}", file.display());
    }

    // The check can fail: wrong types, bad sizes, missing fields, unknown enum values and
    // out-of-range numbers are caught.
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        "spec: {tiers: {host: {size: lots}}}",
        "spec: {imagePullPolicy: Sometimes}",
        "spec: {metrics: {port: 0}}",
        "spec: {tiers: {host: {lockMemory: \"yes\"}}}",
        "spec: {tiers: {nvme: {size: 8Gi}}}",
        "spec: {tiers: {nvme: {size: 8Gi, hostPath: /var/lib/nencache/n, ioEngine: uring}}}",
        "spec: {tiers: {disk: {size: 8GB, hostPath: /var/lib/nencache/d}}}",
        "spec: {terminationGracePeriodSeconds: -1}",
    ];
    let bad_files: Vec<PathBuf> = bad
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let p = dir.path().join(format!("bad{i}.yaml"));
            let doc = format!(
                "apiVersion: nencache.io/v1alpha1\nkind: NenCacheCluster\nmetadata: {{name: c}}\n{spec}\n"
            );
            std::fs::write(&p, doc).unwrap();
            p
        })
        .collect();
    for (spec, error) in bad.iter().zip(tools::crd_schema_errors(&crd, &bad_files)) {
        assert!(error.is_some(), "{spec} was accepted");
    }
}
