//! The reconciler against kube's mocked API service: which requests it makes (server-side
//! apply with the operator's field manager, then the status), what status it derives, and how
//! it handles an invalid spec and API errors.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use http::{Request, Response, StatusCode};
use kube::{Client, client::Body, runtime::events::Reporter};
use nencache_operator::{
    build::Policy,
    crd::NenCacheCluster,
    reconcile::{Context, reconcile, transitions},
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

/// Answers the next request, checking its method and path; returns its body (JSON or null).
/// The DaemonSet's apply, answered with 2 of 3 agents ready, then the delete of a
/// ServiceMonitor nobody asked for (none exists).
async fn expect_agents_two_of_three_ready(h: &mut Mock) {
    let ds_path = "/apis/apps/v1/namespaces/ml/daemonsets/cache-agent";
    expect_apply(h, ds_path, StatusCode::OK, |mut b| {
        b["metadata"]["generation"] = json!(2);
        b["status"] = json!({
            "desiredNumberScheduled": 3, "numberReady": 2, "updatedNumberScheduled": 3,
            "currentNumberScheduled": 3, "numberMisscheduled": 0, "observedGeneration": 2,
        });
        b
    })
    .await;
    expect(
        h,
        http::Method::DELETE,
        SERVICE_MONITOR,
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    // No compat listeners: a compat Service left from before is deleted (none here).
    expect(
        h,
        http::Method::DELETE,
        COMPAT_SERVICE,
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
}

const COMPAT_SERVICE: &str = "/api/v1/namespaces/ml/services/cache-agent-compat";

async fn expect(
    h: &mut Mock,
    method: http::Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Value {
    let (req, send) = h.next_request().await.expect("a request");
    assert_eq!((req.method(), req.uri().path()), (&method, path));
    let raw = req.into_body().collect_bytes().await.unwrap();
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    serde_json::from_slice(&raw).unwrap_or(Value::Null)
}

fn not_found() -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "NotFound",
        "message": "the server could not find the requested resource", "code": 404})
}

const SERVICE_MONITOR: &str =
    "/apis/monitoring.coreos.com/v1/namespaces/ml/servicemonitors/cache-agent";

/// Answers the next request, which must publish an Event on the cluster; returns
/// `(type, reason, note)`.
async fn expect_event(h: &mut Mock) -> (String, String, String) {
    let ev = expect(
        h,
        http::Method::POST,
        "/apis/events.k8s.io/v1/namespaces/ml/events",
        StatusCode::CREATED,
        json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e"}, "eventTime": null}),
    )
    .await;
    assert_eq!(ev["regarding"]["kind"], "NenCacheCluster");
    assert_eq!(ev["regarding"]["name"], "cache");
    assert_eq!(ev["reportingController"], "nencache-operator");
    let s = |k: &str| ev[k].as_str().unwrap_or_default().to_string();
    (s("type"), s("reason"), s("note"))
}

fn mock() -> (Arc<Context>, Mock) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        Arc::new(Context::new(
            Client::new(svc, "default"),
            Reporter {
                controller: "nencache-operator".into(),
                instance: Some("op-0".into()),
            },
            Policy::default(),
        )),
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
    // No ServiceMonitor asked for: any left from before is deleted (none here).
    expect_agents_two_of_three_ready(&mut h).await;
    let status_path = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache/status";
    let patch = expect_apply(&mut h, status_path, StatusCode::OK, |_| {
        serde_json::to_value(cluster(json!({}))).unwrap()
    })
    .await;
    let (kind, reason, note) = expect_event(&mut h).await;
    assert_eq!(
        (kind.as_str(), reason.as_str(), note.as_str()),
        ("Normal", "Applied", "applied generation 4")
    );
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
    let (kind, reason, note) = expect_event(&mut h).await;
    assert_eq!((kind.as_str(), reason.as_str()), ("Warning", "InvalidSpec"));
    assert!(note.contains("tiers.host.size"), "{note}");
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
    let (kind, reason, note) = expect_event(&mut h).await;
    assert_eq!((kind.as_str(), reason.as_str()), ("Warning", "ApplyFailed"));
    assert!(note.contains("conflict"), "{note}");
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.metric_label(), "apply_service_account");
    assert!(err.to_string().contains("conflict"), "{err}");
}

#[tokio::test]
async fn a_service_monitor_is_applied_and_a_missing_prometheus_operator_is_a_warning() {
    let (ctx, mut h) = mock();
    let spec = json!({"metrics": {"serviceMonitor": true}});
    let task = tokio::spawn(reconcile(Arc::new(cluster(spec.clone())), ctx));
    for path in [
        "/api/v1/namespaces/ml/serviceaccounts/cache-agent",
        "/api/v1/namespaces/ml/configmaps/cache-agent-config",
        "/api/v1/namespaces/ml/services/cache-agent",
        "/apis/apps/v1/namespaces/ml/daemonsets/cache-agent",
    ] {
        expect_apply(&mut h, path, StatusCode::OK, |b| b).await;
    }
    // The Prometheus Operator is not installed: its resource type is unknown (404).
    let (req, send) = h.next_request().await.unwrap();
    assert_eq!(
        (req.method(), req.uri().path()),
        (&http::Method::PATCH, SERVICE_MONITOR)
    );
    let sm: Value =
        serde_json::from_slice(&req.into_body().collect_bytes().await.unwrap()).unwrap();
    assert_eq!(sm["kind"], "ServiceMonitor");
    assert_eq!(sm["metadata"]["ownerReferences"][0]["uid"], "u-1");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"],
        "cache"
    );
    send.send_response(
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(serde_json::to_vec(&not_found()).unwrap()))
            .unwrap(),
    );
    expect(
        &mut h,
        http::Method::DELETE,
        COMPAT_SERVICE,
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    let status_path = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache/status";
    expect_apply(&mut h, status_path, StatusCode::OK, |_| {
        serde_json::to_value(cluster(spec)).unwrap()
    })
    .await;
    let (kind, reason, _) = expect_event(&mut h).await;
    assert_eq!(
        (kind.as_str(), reason.as_str()),
        ("Warning", "ServiceMonitorUnavailable")
    );
    assert_eq!(expect_event(&mut h).await.1, "Applied");
    task.await.unwrap().unwrap();
}

fn with_status(generation: i64, conditions: &[(&str, &str)]) -> NenCacheCluster {
    let mut c = cluster(json!({}));
    c.metadata.generation = Some(generation);
    c.status = Some(
        serde_json::from_value(json!({
            "observedGeneration": 4,
            "conditions": conditions.iter().map(|(t, s)| json!({
                "type": t, "status": s, "reason": "R", "message": format!("{t} is {s}"),
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            })).collect::<Vec<_>>(),
        }))
        .unwrap(),
    );
    c
}

#[test]
fn events_are_published_on_transitions_only() {
    let reasons = |c: &NenCacheCluster, now: &NenCacheCluster| {
        transitions(c, c.status.as_ref(), now.status.as_ref().unwrap())
            .into_iter()
            .map(|n| (n.warning, n.reason))
            .collect::<Vec<_>>()
    };
    let ready = with_status(4, &[("ConfigValid", "True"), ("Ready", "True")]);
    let unready = with_status(4, &[("ConfigValid", "True"), ("Ready", "False")]);
    let invalid = with_status(4, &[("ConfigValid", "False"), ("Ready", "False")]);
    assert_eq!(reasons(&ready, &ready), vec![], "nothing changed");
    assert_eq!(reasons(&unready, &ready), vec![(false, "AgentsReady")]);
    assert_eq!(reasons(&ready, &unready), vec![(true, "AgentsNotReady")]);
    assert_eq!(reasons(&ready, &invalid), vec![(true, "InvalidSpec")]);
    assert_eq!(
        reasons(&invalid, &invalid),
        vec![],
        "no repeat while still invalid"
    );
    assert_eq!(
        reasons(&invalid, &ready),
        vec![(false, "SpecValid"), (false, "AgentsReady")]
    );
    // A new generation applied is worth an event even when readiness did not change.
    let newer = with_status(5, &[("ConfigValid", "True"), ("Ready", "True")]);
    assert_eq!(reasons(&newer, &ready), vec![(false, "Applied")]);
}

#[tokio::test]
async fn a_cluster_deleted_mid_reconcile_ends_it_quietly() {
    let (ctx, mut h) = mock();
    let spec = json!({"tiers": {"host": {"size": "lots"}}});
    let task = tokio::spawn(reconcile(Arc::new(cluster(spec)), ctx));
    let status_path = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache/status";
    expect_apply(&mut h, status_path, StatusCode::NOT_FOUND, |_| not_found()).await;
    // No event for a cluster that is gone (one would wait on the mock forever), and no error
    // to retry.
    let action = tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("the reconcile made another request")
        .unwrap()
        .unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

const STATUS: &str = "/apis/nencache.io/v1alpha1/namespaces/ml/nencacheclusters/cache/status";

/// Runs one reconcile of `ncc` to the end, answering every request as a healthy API server
/// would, with a DaemonSet whose 3 agents are rolled out and 2 ready; returns the status
/// written and the reasons of the Events published.
async fn reconcile_once(ncc: NenCacheCluster) -> (Value, Vec<String>) {
    let (ctx, mut h) = mock();
    let mut task = tokio::spawn(reconcile(Arc::new(ncc.clone()), ctx));
    let base = "/api/v1/namespaces/ml";
    for path in [
        format!("{base}/serviceaccounts/cache-agent"),
        format!("{base}/configmaps/cache-agent-config"),
        format!("{base}/services/cache-agent"),
    ] {
        expect_apply(&mut h, &path, StatusCode::OK, |b| b).await;
    }
    expect_agents_two_of_three_ready(&mut h).await;
    let patch = expect_apply(&mut h, STATUS, StatusCode::OK, |_| {
        serde_json::to_value(&ncc).unwrap()
    })
    .await;
    let mut events = Vec::new();
    loop {
        // The task first: once it has ended, the mock has no more requests to give.
        tokio::select! {
            biased;
            done = &mut task => {
                done.unwrap().unwrap();
                break;
            }
            () = async { events.push(expect_event(&mut h).await.1) } => {}
        }
    }
    (patch["status"].clone(), events)
}

fn transition_time(status: &Value, type_: &str) -> String {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()["lastTransitionTime"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_condition_keeps_its_transition_time_until_its_status_changes() {
    // Before: valid, not ready, still rolling out, degraded; all since New Year.
    let ncc = with_status(
        4,
        &[
            ("ConfigValid", "True"),
            ("Ready", "False"),
            ("Progressing", "True"),
            ("Degraded", "True"),
        ],
    );
    let (status, _) = reconcile_once(ncc).await;
    // Now the rollout is complete (Progressing turns False); nothing else changed status.
    assert_eq!(condition(&status, "Progressing").0, "False");
    for unchanged in ["ConfigValid", "Ready", "Degraded"] {
        assert_eq!(
            transition_time(&status, unchanged),
            "2026-01-01T00:00:00Z",
            "{unchanged}: {status}"
        );
    }
    assert_ne!(
        transition_time(&status, "Progressing"),
        "2026-01-01T00:00:00Z",
        "{status}"
    );
}

#[tokio::test]
async fn reconciling_an_unchanged_cluster_writes_the_same_status() {
    let (first, events) = reconcile_once(cluster(json!({}))).await;
    assert_eq!(events, ["Applied"]);
    // The status write wakes the controller; by then the clock has moved on.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut again = cluster(json!({}));
    again.status = Some(serde_json::from_value(first.clone()).unwrap());
    let (second, events) = reconcile_once(again).await;
    // Byte for byte the same apply: the API server makes it a no-op (no new resourceVersion,
    // no watch event), so the controller is not woken again.
    assert_eq!(second, first);
    assert_eq!(events, Vec::<String>::new(), "no transition, no event");
}

#[tokio::test]
async fn a_socket_dir_outside_the_allowed_host_paths_is_refused_before_anything_is_applied() {
    let (ctx, mut h) = mock();
    let spec = json!({"socketDir": "/etc"});
    let task = tokio::spawn(reconcile(Arc::new(cluster(spec.clone())), ctx));
    // The first request is the status: no DaemonSet (and so no hostPath) was applied.
    let patch = expect_apply(&mut h, STATUS, StatusCode::OK, |_| {
        serde_json::to_value(cluster(spec)).unwrap()
    })
    .await;
    let status = &patch["status"];
    assert_eq!(
        condition(status, "ConfigValid"),
        ("False".into(), "InvalidSpec".into())
    );
    let msg = status["conditions"][0]["message"].as_str().unwrap();
    assert!(
        msg.contains("socketDir")
            && msg.contains("\"/etc\"")
            && msg.contains("/run/nencache, /var/lib/nencache"),
        "{msg}"
    );
    let (kind, reason, note) = expect_event(&mut h).await;
    assert_eq!((kind.as_str(), reason.as_str()), ("Warning", "InvalidSpec"));
    assert_eq!(note, msg);
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn compat_listeners_get_their_node_local_service_applied() {
    let (ctx, mut h) = mock();
    let spec = json!({"compat": {"lmPort": 65432}});
    let task = tokio::spawn(reconcile(Arc::new(cluster(spec.clone())), ctx));
    for path in [
        "/api/v1/namespaces/ml/serviceaccounts/cache-agent",
        "/api/v1/namespaces/ml/configmaps/cache-agent-config",
        "/api/v1/namespaces/ml/services/cache-agent",
        "/apis/apps/v1/namespaces/ml/daemonsets/cache-agent",
    ] {
        expect_apply(&mut h, path, StatusCode::OK, |b| b).await;
    }
    expect(
        &mut h,
        http::Method::DELETE,
        SERVICE_MONITOR,
        StatusCode::NOT_FOUND,
        not_found(),
    )
    .await;
    let svc = expect_apply(&mut h, COMPAT_SERVICE, StatusCode::OK, |b| b).await;
    assert_eq!(svc["spec"]["internalTrafficPolicy"], "Local");
    assert_eq!(svc["spec"]["ports"][0]["port"], 65432);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "lm");
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "u-1");
    expect_apply(&mut h, STATUS, StatusCode::OK, |_| {
        serde_json::to_value(cluster(spec)).unwrap()
    })
    .await;
    assert_eq!(expect_event(&mut h).await.1, "Applied");
    task.await.unwrap().unwrap();
}
