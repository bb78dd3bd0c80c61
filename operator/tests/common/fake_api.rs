//! An in-memory API server behind kube's mocked service: objects by path, with
//! `resourceVersion`s, 404 for missing objects, and 409 for a create of an existing object or
//! a write at a stale version, as the real API server answers. Patches are recorded, not
//! merged.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::{Method, Request, Response, StatusCode};
use kube::{Client, client::Body};
use serde_json::{Value, json};

/// The server's state, shared by every client made with [`client`].
#[derive(Default)]
pub struct FakeApi {
    /// Objects by their path (`{collection}/{name}`).
    pub objects: HashMap<String, Value>,
    version: u64,
    /// Answer every request with 500 while set.
    pub failing: bool,
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
}

fn status(code: StatusCode, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "code": code.as_u16(), "message": reason});
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap()
}

fn ok(v: &Value) -> Response<Body> {
    Response::builder()
        .body(Body::from(serde_json::to_vec(v).unwrap()))
        .unwrap()
}

async fn answer(api: &Mutex<FakeApi>, req: Request<Body>) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let content_type = req
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = req.into_body().collect_bytes().await.unwrap();
    let mut s = api.lock().unwrap();
    if s.failing {
        return status(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    }
    let parse = || serde_json::from_slice::<Value>(&body).unwrap();
    match method {
        Method::GET => match s.objects.get(&path) {
            Some(o) => ok(o),
            None => status(StatusCode::NOT_FOUND, "NotFound"),
        },
        Method::POST => {
            let obj = parse();
            let name = obj["metadata"]["name"].as_str().unwrap().to_string();
            let path = format!("{path}/{name}");
            if s.objects.contains_key(&path) {
                return status(StatusCode::CONFLICT, "AlreadyExists");
            }
            ok(&s.put(&path, obj))
        }
        Method::PUT => {
            let obj = parse();
            let current = s
                .objects
                .get(&path)
                .map(|c| &c["metadata"]["resourceVersion"]);
            if current != Some(&obj["metadata"]["resourceVersion"]) {
                return status(StatusCode::CONFLICT, "Conflict");
            }
            ok(&s.put(&path, obj))
        }
        Method::PATCH => {
            s.patches.push((path.clone(), content_type, parse()));
            match s.objects.get(&path) {
                Some(o) => ok(o),
                None => status(StatusCode::NOT_FOUND, "NotFound"),
            }
        }
        m => panic!("unexpected request {m} {path}"),
    }
}

/// A client, with default namespace `ns`, whose requests `api` answers.
pub fn client(api: &Arc<Mutex<FakeApi>>, ns: &str) -> Client {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = api.clone();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            send.send_response(answer(&api, req).await);
        }
    });
    Client::new(svc, ns)
}
