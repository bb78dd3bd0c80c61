//! An in-memory API server: objects by path, with `resourceVersion`s, 404 for missing
//! objects, 409 for a create of an existing object or a write at a stale version, lists of
//! collections, server-side apply as an upsert, strategic and merge patches as a deep merge
//! (lists of named objects merged by name), the status subresource, and watches that stay
//! open without events. It answers kube's mocked service ([`client`]) or real HTTP
//! ([`serve`]), so the operator binary itself can run against it. It can be made slow
//! ([`FakeApi::delay`]) or fail for some paths ([`FakeApi::failing_paths`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::body::Bytes;
use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};

/// The server's state, shared by every client made with [`client`] and by [`serve`].
#[derive(Default)]
pub struct FakeApi {
    /// Objects by their path (`{collection}/{name}`).
    pub objects: BTreeMap<String, Value>,
    version: u64,
    /// Answer every request with 500 while set.
    pub failing: bool,
    /// Answer requests for paths starting with one of these with 500.
    pub failing_paths: Vec<String>,
    /// Answer each request (to [`client`]) only after this long, as a slow server would.
    pub delay: Duration,
    /// `(path, content-type, body)` of every PATCH.
    pub patches: Vec<(String, String, Value)>,
}

impl FakeApi {
    /// A shared, empty server.
    pub fn shared() -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self::default()))
    }

    /// Stores `obj` at `path` with a fresh version.
    pub fn put(&mut self, path: &str, mut obj: Value) -> Value {
        self.version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.version.to_string());
        self.objects.insert(path.into(), obj.clone());
        obj
    }

    /// The objects directly in the collection `path`, for a list.
    fn list(&self, path: &str) -> Vec<Value> {
        let depth = path.matches('/').count();
        let in_collection = |k: &str| {
            let segs: Vec<&str> = k.split('/').collect();
            if let Some(rest) = k.strip_prefix(&format!("{path}/")) {
                return !rest.contains('/');
            }
            // A cluster-wide list of a namespaced resource: {prefix}/namespaces/{ns}/{resource}/{name}.
            let (prefix, resource) = path.rsplit_once('/').unwrap_or_default();
            segs.len() == depth + 4
                && k.starts_with(&format!("{prefix}/namespaces/"))
                && segs[segs.len() - 2] == resource
        };
        self.objects
            .iter()
            .filter(|(k, _)| in_collection(k))
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// The segments of `path` after the API group and version.
fn rest(path: &str) -> Vec<&str> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let skip = if segs.first() == Some(&"api") { 2 } else { 3 };
    segs.into_iter().skip(skip).collect()
}

/// Whether `path` is a collection (list, create) rather than an object.
fn is_collection(path: &str) -> bool {
    matches!(rest(path).as_slice(), ["namespaces", _, _] | [_])
}

/// Whether `path` names an object's subresource (`.../status`).
fn is_subresource(path: &str) -> bool {
    matches!(
        rest(path).as_slice(),
        ["namespaces", _, _, _, _] | [_, _, _]
    )
}

/// Merges `patch` into `target`: objects key by key, lists of objects with a `name` by name,
/// anything else replaced; `null` deletes.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (Value::Array(t), Value::Array(p))
            if p.iter().all(|e| e.get("name").is_some())
                && t.iter().all(|e| e.get("name").is_some()) =>
        {
            for e in p {
                match t.iter_mut().find(|x| x["name"] == e["name"]) {
                    Some(x) => merge(x, e),
                    None => t.push(e.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn status(code: StatusCode, reason: &str) -> (StatusCode, Value) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "code": code.as_u16(), "message": reason});
    (code, body)
}

/// What the server answers; `None` for a watch, which stays open without events.
fn answer(
    api: &Mutex<FakeApi>,
    method: &Method,
    path: &str,
    query: &str,
    content_type: &str,
    body: &[u8],
) -> Option<(StatusCode, Value)> {
    let mut s = api.lock().unwrap();
    if s.failing || s.failing_paths.iter().any(|p| path.starts_with(p.as_str())) {
        return Some(status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError"));
    }
    let parse = || serde_json::from_slice::<Value>(body).unwrap();
    let subresource = is_subresource(path);
    let object_path = match path.rsplit_once('/') {
        Some((p, _)) if subresource => p.to_string(),
        _ => path.to_string(),
    };
    Some(match method.clone() {
        Method::GET
            if query
                .split('&')
                .any(|q| q == "watch=true" || q == "watch=1") =>
        {
            return None;
        }
        Method::GET if is_collection(path) => {
            let rv = s.version.to_string();
            let items = s.list(path);
            (
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items}),
            )
        }
        Method::GET => match s.objects.get(&object_path) {
            Some(o) => (StatusCode::OK, o.clone()),
            None => status(StatusCode::NOT_FOUND, "NotFound"),
        },
        Method::POST => {
            let obj = parse();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let path = format!("{path}/{name}");
            if s.objects.contains_key(&path) {
                return Some(status(StatusCode::CONFLICT, "AlreadyExists"));
            }
            (StatusCode::CREATED, s.put(&path, obj))
        }
        Method::PUT => {
            let obj = parse();
            let current = s
                .objects
                .get(path)
                .map(|c| &c["metadata"]["resourceVersion"]);
            if current != Some(&obj["metadata"]["resourceVersion"]) {
                return Some(status(StatusCode::CONFLICT, "Conflict"));
            }
            (StatusCode::OK, s.put(path, obj))
        }
        Method::PATCH => {
            let patch = parse();
            s.patches
                .push((path.to_string(), content_type.into(), patch.clone()));
            let current = s.objects.get(&object_path).cloned();
            let apply = content_type.starts_with("application/apply-patch");
            let merged = match (current, apply, subresource) {
                (Some(mut obj), _, true) => {
                    obj["status"] = patch["status"].clone();
                    obj
                }
                (Some(mut obj), _, false) => {
                    merge(&mut obj, &patch);
                    obj
                }
                // Server-side apply creates what is missing.
                (None, true, false) => patch,
                (None, _, _) => return Some(status(StatusCode::NOT_FOUND, "NotFound")),
            };
            (StatusCode::OK, s.put(&object_path, merged))
        }
        Method::DELETE => match s.objects.remove(&object_path) {
            Some(o) => (StatusCode::OK, o),
            None => status(StatusCode::NOT_FOUND, "NotFound"),
        },
        m => panic!("unexpected request {m} {path}"),
    })
}

fn answer_request(
    api: &Mutex<FakeApi>,
    parts: &http::request::Parts,
    body: &[u8],
) -> Option<(StatusCode, Value)> {
    let content_type = parts
        .headers
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let query = parts.uri.query().unwrap_or_default();
    answer(
        api,
        &parts.method,
        parts.uri.path(),
        query,
        &content_type,
        body,
    )
}

/// A client, with default namespace `ns`, whose requests `api` answers.
pub fn client(api: &Arc<Mutex<FakeApi>>, ns: &str) -> Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = api.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let body = body.collect_bytes().await.unwrap();
            let respond = {
                let api = api.clone();
                async move {
                    let Some((code, v)) = answer_request(&api, &parts, &body) else {
                        return; // A watch: never answered.
                    };
                    send.send_response(
                        Response::builder()
                            .status(code)
                            .body(Body::from(serde_json::to_vec(&v).unwrap()))
                            .unwrap(),
                    );
                }
            };
            let delay = api.lock().unwrap().delay;
            if delay.is_zero() {
                respond.await;
            } else {
                // Slow, but not one at a time: requests overlap as on a real server.
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    respond.await;
                });
            }
        }
    });
    Client::new(svc, ns)
}

/// Serves `api` over plain HTTP on a loopback port; returns the address.
pub async fn serve(api: &Arc<Mutex<FakeApi>>) -> std::net::SocketAddr {
    let api = api.clone();
    let handler = move |req: axum::extract::Request| {
        let api = api.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            let resp = axum::http::Response::builder().header("content-type", "application/json");
            match answer_request(&api, &parts, &body) {
                Some((code, v)) => resp
                    .status(code)
                    .body(axum::body::Body::from(serde_json::to_vec(&v).unwrap()))
                    .unwrap(),
                None => resp
                    .body(axum::body::Body::from_stream(tokio_stream::pending::<
                        Result<Bytes, Infallible>,
                    >()))
                    .unwrap(),
            }
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(handler))
            .await
            .unwrap();
    });
    addr
}
