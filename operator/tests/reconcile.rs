//! The reconciler against kube's mocked API service: which requests it makes (server-side
//! apply with the operator's field manager, then the status), what status it derives, and how
//! it handles an invalid spec and API errors.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use kube::{Client, client::Body};
use nencache_operator::{
    crd::NenCacheCluster,
    reconcile::{Context, reconcile},
};
use serde_json::{Value, json};
use tower_test::mock::Handle;

fn cluster(spec: Value) -> NenCacheCluster {
    serde_json::from_value(json!({
        "apiVersion": "nencache.io/v1alpha1",
        "kind": "NenCacheCluster",
        "metadata": {"name": "cache", "namespace": "ml", "uid": "u-1", "generation": 4},
        "spec": spec,
    }))
    .unwrap()
}

type Mock = Handle<Request<Body>, Response<Body>>;

/// Answers the next request, checking it is a server-side apply of `path`, and returns its
/// body. `reply` builds the response body from the request body.
async fn expect_apply(
    h: &mut Mock,
    path: &str,
    status: StatusCode,
    reply: impl FnOnce(Value) -> Value,
) -> Value {
    let (req, send) = h.next_request().await.expect("a request");
    assert_eq!(req.method(), http::Method::PATCH, "{}", req.uri());
    assert_eq!(req.uri().path(), path);
    let q = req.uri().query().unwrap_or_default().to_string();
    assert!(
        q.contains("fieldManager=nencache-operator") && q.contains("force=true"),
        "{q}"
    );
    assert_eq!(
        req.headers()["content-type"],
        "application/apply-patch+yaml"
    );
    let body: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    let out = serde_json::to_vec(&reply(body.clone())).unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(out))
            .unwrap(),
    );
    body
}

fn mock() -> (Arc<Context>, Mock) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        Arc::new(Context {
            client: Client::new(svc, "default"),
        }),
        handle,
    )
}

fn condition(status: &Value, type_: &str) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap();
    (
        c["status"].as_str().unwrap().into(),
        c["reason"].as_str().unwrap().into(),
    )
}

#[tokio::test]
async fn applies_every_object_then_reports_status_from_the_daemon_set() {
    let (ctx, mut h) = mock();
    let task = tokio::spawn(reconcile(Arc::new(cluster(json!({}))), ctx));
    let base = "/api/v1/namespaces/ml";
    let sa = expect_apply(
        &mut h,
        &format!("{base}/serviceaccounts/cache-agent"),
        StatusCode::OK,
        |b| b,
    )
    .await;
    assert_eq!(sa["metadata"]["ownerReferences"][0]["uid"], "u-1");
    let cm = expect_apply(
        &mut h,
        &format!("{base}/configmaps/cache-agent-config"),
        StatusCode::OK,
        |b| b,
    )
    .await;
    assert!(
        cm["data"]["agent.yaml"]
            .as_str()
            .unwrap()
            .contains("capacity: 1073741824")
    );
    expect_apply(
        &mut h,
        &format!("{base}/services/cache-agent"),
        StatusCode::OK,
        |b| b,
    )
    .await;
    let ds_path = "/apis/apps/v1/namespaces/ml/daemonsets/cache-agent";
    expect_apply(&mut h, ds_path, StatusCode::OK, |mut b| {
        b["metadata"]["generation"] = json!(2);
        b["status"] = json!({
            "desiredNumberScheduled": 3, "numberReady": 2, "updatedNumberScheduled": 3,
            "currentNumberScheduled": 3, "numberMisscheduled": 0, "observedGeneration": 2,
        });
        b
    })
    .await;
    let status_path = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache/status";
    let patch = expect_apply(&mut h, status_path, StatusCode::OK, |_| {
        serde_json::to_value(cluster(json!({}))).unwrap()
    })
    .await;
    let status = &patch["status"];
    assert_eq!(
        (
            status["desired"].clone(),
            status["ready"].clone(),
            status["updated"].clone()
        ),
        (json!(3), json!(2), json!(3))
    );
    assert_eq!(status["observedGeneration"], 4);
    assert_eq!(condition(status, "ConfigValid").0, "True");
    assert_eq!(
        condition(status, "Ready"),
        ("False".into(), "AgentsNotReady".into())
    );
    assert_eq!(condition(status, "Progressing").0, "False");
    assert_eq!(
        condition(status, "Degraded"),
        ("True".into(), "AgentsUnavailable".into())
    );
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_says_why() {
    let (ctx, mut h) = mock();
    let task = tokio::spawn(reconcile(
        Arc::new(cluster(json!({"tiers": {"host": {"size": "lots"}}}))),
        ctx,
    ));
    let status_path = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache/status";
    let patch = expect_apply(&mut h, status_path, StatusCode::OK, |_| {
        serde_json::to_value(cluster(json!({}))).unwrap()
    })
    .await;
    let (ok, reason) = condition(&patch["status"], "ConfigValid");
    assert_eq!((ok.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    let msg = patch["status"]["conditions"][0]["message"]
        .as_str()
        .unwrap();
    assert!(msg.contains("tiers.host.size"), "{msg}");
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_api_error_fails_the_reconcile_with_a_bounded_label() {
    let (ctx, mut h) = mock();
    let task = tokio::spawn(reconcile(Arc::new(cluster(json!({}))), ctx));
    let conflict = json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Conflict",
        "message": "Apply failed with 1 conflict", "code": 409,
    });
    expect_apply(
        &mut h,
        "/api/v1/namespaces/ml/serviceaccounts/cache-agent",
        StatusCode::CONFLICT,
        |_| conflict,
    )
    .await;
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "apply_service_account");
    assert!(err.to_string().contains("conflict"), "{err}");
}
