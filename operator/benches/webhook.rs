//! The admission hot path: deciding and patching one pod, against the floor of decoding the
//! review and encoding an answer without any injection work (what any webhook pays). Run with
//! `cargo bench -p nencache-operator --bench webhook`.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{
    DynamicObject,
    admission::{AdmissionRequest, AdmissionResponse, AdmissionReview},
};
use nencache_operator::{build::Policy, crd::NenCacheCluster, webhook::mutate};
use serde_json::json;

fn review_bytes() -> Vec<u8> {
    let containers: Vec<_> = (0..3)
        .map(|i| {
            json!({"name": format!("c{i}"), "image": "vllm/vllm-openai",
            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
            "volumeMounts": [{"name": "models", "mountPath": "/models"}]})
        })
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "r-1", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "serving", "userInfo": {"username": "u"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "vllm", "namespace": "serving",
                    "labels": {"nencache.io/inject": "true", "app": "vllm"},
                    "annotations": {"nencache.io/cluster": "cache/c7", "nencache.io/lmcache": "true"}},
                "spec": {"containers": containers, "volumes": [{"name": "models", "emptyDir": {}}]},
            },
        },
    }))
    .unwrap()
}

fn clusters(n: usize) -> Vec<NenCacheCluster> {
    (0..n)
        .map(|i| {
            serde_json::from_value(json!({
                "apiVersion": "nencache.io/v1alpha1", "kind": "NenCacheCluster",
                "metadata": {"name": format!("c{i}"), "namespace": "cache"},
                "spec": {"compat": {"lmPort": 65432}},
            }))
            .unwrap()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let bytes = review_bytes();
    let mut g = c.benchmark_group("admission");
    g.bench_function("decode_and_answer_without_patch", |b| {
        b.iter(|| {
            let review: AdmissionReview<Pod> = serde_json::from_slice(black_box(&bytes)).unwrap();
            let req: AdmissionRequest<Pod> = review.try_into().unwrap();
            let answer: AdmissionReview<DynamicObject> =
                AdmissionResponse::from(&req).into_review();
            black_box(serde_json::to_string(&answer).unwrap())
        });
    });
    for n in [10, 1000] {
        let known = clusters(n);
        let policy = Policy::default();
        g.bench_function(format!("inject_with_{n}_clusters"), |b| {
            b.iter(|| {
                let review: AdmissionReview<Pod> =
                    serde_json::from_slice(black_box(&bytes)).unwrap();
                black_box(mutate(review, &known, &policy).to_string())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
