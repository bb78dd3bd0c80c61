//! Pod injection: admission reviews in, JSON patches out, applied to the pod to check the
//! result, including every skip case.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::AdmissionReview;
use nencache_operator::{build::Policy, crd::NenCacheCluster, webhook::mutate};
use serde_json::{Value, json};

fn cluster(ns: &str, name: &str, socket_dir: &str) -> NenCacheCluster {
    serde_json::from_value(json!({
        "apiVersion": "nencache.io/v1alpha1",
        "kind": "NenCacheCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"socketDir": socket_dir},
    }))
    .unwrap()
}

fn pod(labels: Value, annotations: Value, containers: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "vllm-0", "namespace": "serving", "labels": labels, "annotations": annotations},
        "spec": {"containers": containers},
    })
}

fn vllm() -> Value {
    json!([{"name": "vllm", "image": "vllm/vllm-openai"}, {"name": "sidecar", "image": "busybox", "env": [{"name": "A", "value": "1"}]}])
}

/// Runs a review for `pod` and returns the pod after the answered patch, if there was one.
fn admit(pod: &Value, clusters: &[NenCacheCluster]) -> Option<Value> {
    admit_with(pod, clusters, &Policy::default())
}

/// As [`admit`], under `policy`.
fn admit_with(pod: &Value, clusters: &[NenCacheCluster], policy: &Policy) -> Option<Value> {
    let review: AdmissionReview<Pod> = serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "serving",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:serving:default"},
            "object": pod,
            "dryRun": false,
        },
    }))
    .unwrap();
    let out = mutate(review, clusters, policy);
    let resp = &out["response"];
    assert_eq!(resp["allowed"], json!(true), "{out}");
    assert_eq!(resp["uid"], json!("705ab4f5-6393-11e8-b7cc-42010a800002"));
    // The API server reads the patch as a base64 string.
    let b64 = resp
        .get("patch")?
        .as_str()
        .expect("the patch is a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(resp["patchType"], json!("JSONPatch"));
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    Some(patched)
}

#[test]
fn unlabelled_pods_are_left_alone() {
    let p = pod(json!({"app": "x"}), json!({}), vllm());
    assert_eq!(admit(&p, &[cluster("cache", "a", "/run/nencache")]), None);
}

#[test]
fn labelled_pods_get_the_socket_in_every_container_once() {
    let clusters = [cluster("cache", "a", "/run/nencache")];
    let p = pod(json!({"nencache.io/inject": "true"}), json!({}), vllm());
    let out = admit(&p, &clusters).unwrap();
    let vols = out["spec"]["volumes"].as_array().unwrap();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0]["hostPath"]["path"], json!("/run/nencache"));
    for c in out["spec"]["containers"].as_array().unwrap() {
        assert_eq!(
            c["volumeMounts"][0],
            json!({"name": "nencache-socket", "mountPath": "/run/nencache"})
        );
        let env = c["env"].as_array().unwrap();
        assert!(
            env.contains(&json!({"name": "NENCACHE_SOCKET", "value": "/run/nencache/agent.sock"})),
            "{c}"
        );
    }
    assert_eq!(
        out["metadata"]["annotations"]["nencache.io/injected-by"],
        json!("cache/a")
    );
    // Admitting the injected pod again changes nothing.
    assert_eq!(admit(&out, &clusters), None);
}

#[test]
fn a_socket_variable_set_by_the_pod_is_kept() {
    let containers =
        json!([{"name": "c", "env": [{"name": "NENCACHE_SOCKET", "value": "/custom.sock"}]}]);
    let p = pod(json!({"nencache.io/inject": "true"}), json!({}), containers);
    let out = admit(&p, &[cluster("cache", "a", "/run/nencache")]).unwrap();
    assert_eq!(
        out["spec"]["containers"][0]["env"],
        json!([{"name": "NENCACHE_SOCKET", "value": "/custom.sock"}])
    );
}

#[test]
fn skip_reasons_are_recorded() {
    let labelled = pod(json!({"nencache.io/inject": "true"}), json!({}), vllm());
    let reason = |out: Value| {
        out["metadata"]["annotations"]["nencache.io/skip-reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason(admit(&labelled, &[]).unwrap()).contains("no NenCacheCluster"));
    let two = [
        cluster("cache", "a", "/run/nencache/a"),
        cluster("cache", "b", "/run/nencache/b"),
    ];
    let out = admit(&labelled, &two).unwrap();
    assert!(reason(out.clone()).contains("nencache.io/cluster"), "{out}");
    assert!(
        out["spec"].get("volumes").is_none(),
        "a skipped pod is not injected"
    );
    let missing = pod(
        json!({"nencache.io/inject": "true"}),
        json!({"nencache.io/cluster": "cache/zzz"}),
        vllm(),
    );
    assert!(reason(admit(&missing, &two).unwrap()).contains("cache/zzz"));
}

#[test]
fn the_annotation_picks_one_of_several_clusters() {
    let two = [
        cluster("cache", "a", "/run/nencache/a"),
        cluster("cache", "b", "/run/nencache/b"),
    ];
    let p = pod(
        json!({"nencache.io/inject": "true"}),
        json!({"nencache.io/cluster": "cache/b"}),
        vllm(),
    );
    let out = admit(&p, &two).unwrap();
    assert_eq!(
        out["spec"]["volumes"][0]["hostPath"]["path"],
        json!("/run/nencache/b")
    );
    // A bare name means a cluster in the pod's own namespace.
    let local = [
        cluster("serving", "near", "/run/nencache/near"),
        cluster("cache", "a", "/run/nencache/a"),
    ];
    let p = pod(
        json!({"nencache.io/inject": "true"}),
        json!({"nencache.io/cluster": "near"}),
        vllm(),
    );
    assert_eq!(
        admit(&p, &local).unwrap()["spec"]["volumes"][0]["hostPath"]["path"],
        json!("/run/nencache/near")
    );
}

#[test]
fn the_lmcache_environment_points_lmcache_at_the_nodes_agent() {
    let mut with_lm = cluster("cache", "a", "/run/nencache");
    with_lm.spec.compat.lm_port = Some(65432);
    let containers = json!([
        {"name": "vllm", "image": "vllm", "env": [{"name": "PYTHONHASHSEED", "value": "7"}]},
        {"name": "plain", "image": "busybox"},
    ]);
    let p = pod(
        json!({"nencache.io/inject": "true"}),
        json!({"nencache.io/lmcache": "true"}),
        containers,
    );
    let out = admit(&p, std::slice::from_ref(&with_lm)).unwrap();
    let env = |i: usize| {
        out["spec"]["containers"][i]["env"]
            .as_array()
            .unwrap()
            .clone()
    };
    let names = |e: &[Value]| {
        e.iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // The pod's own PYTHONHASHSEED is kept; the URL names the cluster's compat Service.
    assert_eq!(
        names(&env(0)),
        [
            "PYTHONHASHSEED",
            "NENCACHE_SOCKET",
            "LMCACHE_REMOTE_URL",
            "LMCACHE_REMOTE_SERDE"
        ]
    );
    assert_eq!(env(0)[0]["value"], "7");
    assert_eq!(env(0)[2]["value"], "lm://a-agent-compat.cache.svc:65432");
    assert!(env(1).contains(&json!({"name": "PYTHONHASHSEED", "value": "0"})));
    assert!(
        out["metadata"]["annotations"]
            .get("nencache.io/skip-reason")
            .is_none()
    );
    // The patched pod is a valid Pod.
    serde_json::from_value::<Pod>(out.clone()).unwrap();

    // Without the annotation: only the socket.
    let plain = pod(json!({"nencache.io/inject": "true"}), json!({}), vllm());
    let out = admit(&plain, &[with_lm]).unwrap();
    assert_eq!(
        names(out["spec"]["containers"][0]["env"].as_array().unwrap()),
        ["NENCACHE_SOCKET"]
    );
}

#[test]
fn asking_for_lmcache_without_a_listener_injects_the_socket_and_says_why_not_lmcache() {
    let p = pod(
        json!({"nencache.io/inject": "true"}),
        json!({"nencache.io/lmcache": "true"}),
        vllm(),
    );
    let out = admit(&p, &[cluster("cache", "a", "/run/nencache")]).unwrap();
    let reason = out["metadata"]["annotations"]["nencache.io/skip-reason"]
        .as_str()
        .unwrap();
    assert!(reason.contains("spec.compat.lmPort"), "{reason}");
    assert_eq!(out["spec"]["volumes"][0]["name"], "nencache-socket");
    let env = out["spec"]["containers"][0]["env"].as_array().unwrap();
    assert!(
        !env.iter().any(|e| e["name"] == "LMCACHE_REMOTE_URL"),
        "{env:?}"
    );
}

#[test]
fn init_containers_get_the_socket_and_the_pod_joins_the_agents_group() {
    let clusters = [cluster("cache", "a", "/run/nencache")];
    let mut p = pod(json!({"nencache.io/inject": "true"}), json!({}), vllm());
    p["spec"]["initContainers"] = json!([{"name": "warm", "image": "warmer"}]);
    let out = admit(&p, &clusters).unwrap();
    let init = &out["spec"]["initContainers"][0];
    assert_eq!(init["volumeMounts"][0]["mountPath"], "/run/nencache");
    assert_eq!(init["env"][0]["name"], "NENCACHE_SOCKET");
    assert_eq!(
        out["spec"]["securityContext"]["supplementalGroups"],
        json!([65532])
    );
    serde_json::from_value::<Pod>(out).unwrap();

    // Groups the pod has are kept, and the agent's is added once.
    p["spec"]["securityContext"] = json!({"runAsUser": 1000, "supplementalGroups": [1000]});
    let out = admit(&p, &clusters).unwrap();
    assert_eq!(
        out["spec"]["securityContext"]["supplementalGroups"],
        json!([1000, 65532])
    );
    assert_eq!(out["spec"]["securityContext"]["runAsUser"], 1000);
    p["spec"]["securityContext"] = json!({"supplementalGroups": [65532]});
    let out = admit(&p, &clusters).unwrap();
    assert_eq!(
        out["spec"]["securityContext"]["supplementalGroups"],
        json!([65532])
    );
    p["spec"]["securityContext"] = json!({"fsGroup": 7});
    let out = admit(&p, &clusters).unwrap();
    assert_eq!(
        out["spec"]["securityContext"],
        json!({"fsGroup": 7, "supplementalGroups": [65532]})
    );
}

#[test]
fn a_pod_without_a_namespace_of_its_own_uses_the_requests() {
    // Pods made by a Deployment reach the webhook with no namespace in their metadata.
    let mut p = pod(
        json!({"nencache.io/inject": "true"}),
        json!({"nencache.io/cluster": "near"}),
        vllm(),
    );
    p["metadata"].as_object_mut().unwrap().remove("namespace");
    let clusters = [
        cluster("serving", "near", "/run/nencache/near"),
        cluster("cache", "a", "/run/nencache/a"),
    ];
    let out = admit(&p, &clusters).unwrap();
    assert_eq!(
        out["spec"]["volumes"][0]["hostPath"]["path"],
        "/run/nencache/near"
    );
}

#[test]
fn a_container_that_mounts_the_socket_path_itself_keeps_its_mount() {
    let containers = json!([{"name": "c", "image": "x",
        "volumeMounts": [{"name": "mine", "mountPath": "/run/nencache/"}]}]);
    let p = pod(json!({"nencache.io/inject": "true"}), json!({}), containers);
    let out = admit(&p, &[cluster("cache", "a", "/run/nencache")]).unwrap();
    let c = &out["spec"]["containers"][0];
    assert_eq!(c["volumeMounts"].as_array().unwrap().len(), 1, "{c}");
    assert_eq!(c["env"][0]["name"], "NENCACHE_SOCKET");
}

#[test]
fn a_cluster_whose_socket_dir_the_operator_does_not_allow_is_never_injected() {
    let labelled = pod(json!({"nencache.io/inject": "true"}), json!({}), vllm());
    for dir in [
        "/etc",
        "/run/nencache/../../etc",
        "/var/lib/kubelet",
        "/run/nencache/",
    ] {
        let out = admit(&labelled, &[cluster("cache", "evil", dir)]).unwrap();
        assert!(out["spec"].get("volumes").is_none(), "{dir}: {out}");
        let reason = out["metadata"]["annotations"]["nencache.io/skip-reason"]
            .as_str()
            .unwrap();
        assert!(
            reason.contains("cache/evil")
                && reason.contains("socketDir")
                && reason.contains("/run/nencache, /var/lib/nencache"),
            "{dir}: {reason}"
        );
    }
    // The prefixes are the operator's to set.
    let policy = Policy::new(
        ["/srv/cache".to_string()],
        "helper:1".into(),
        nencache_operator::crd::PullPolicy::IfNotPresent,
    )
    .unwrap();
    let out = admit_with(&labelled, &[cluster("cache", "a", "/srv/cache/a")], &policy).unwrap();
    assert_eq!(
        out["spec"]["volumes"][0]["hostPath"]["path"],
        "/srv/cache/a"
    );
    let out = admit_with(
        &labelled,
        &[cluster("cache", "a", "/run/nencache")],
        &policy,
    )
    .unwrap();
    assert!(out["spec"].get("volumes").is_none(), "{out}");
}
