//! The webhook served for real: certificates issued by the operator's own CA, a TLS server on
//! a loopback port, admission reviews sent over HTTPS by a client that trusts only that CA,
//! certificate rotation while serving, and the Secret and CA-bundle bookkeeping against an
//! in-memory API server (tests/common).

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use base64::Engine;
use common::{
    fake_api::{FakeApi, client},
    http::{https, https_h2, patch_of, review},
};
use k8s_openapi::{
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
    jiff::Timestamp,
};
use kube::{
    Api,
    runtime::{reflector::store::Writer, watcher},
};
use nencache_operator::{
    build::Policy,
    certs::{self, Bundle, CertSettings, NOT_AFTER_ANNOTATION},
    crd::NenCacheCluster,
    https::{CertStore, serve},
    webhook::{self, MUTATE_PATH},
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

fn settings() -> CertSettings {
    CertSettings::new("nencache-webhook", "nencache-system")
}

fn cluster() -> NenCacheCluster {
    serde_json::from_value(json!({
        "apiVersion": "nencache.io/v1alpha1", "kind": "NenCacheCluster",
        "metadata": {"name": "cache", "namespace": "ml"}, "spec": {},
    }))
    .unwrap()
}

/// Starts the webhook on a loopback port; returns its address and certificate store.
async fn start(bundle: &Bundle) -> (std::net::SocketAddr, Arc<CertStore>) {
    let mut w = Writer::<NenCacheCluster>::default();
    w.apply_watcher_event(&watcher::Event::Apply(cluster()));
    let store = CertStore::new(&bundle.cert_pem, &bundle.key_pem).unwrap();
    let config = store.server_config().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(
        listener,
        config,
        webhook::router(w.as_reader(), Policy::default()),
        std::future::pending(),
    ));
    (addr, store)
}

#[tokio::test]
async fn admission_reviews_are_answered_over_tls_with_the_operators_own_ca() {
    let bundle = certs::issue(&settings(), Timestamp::now(), None).unwrap();
    let (addr, _) = start(&bundle).await;
    let (code, body) = https(
        addr,
        &bundle.ca_pem,
        "POST",
        MUTATE_PATH,
        &review().to_string(),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resp["response"]["uid"], "r-1");
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let ops = patch_of(&resp);
    assert!(ops.iter().any(|o| o["path"] == "/spec/volumes"), "{ops:?}");
    assert!(
        ops.iter().any(|o| o["value"]
            == json!([{"name": "NENCACHE_SOCKET", "value": "/run/nencache/agent.sock"}])),
        "{ops:?}"
    );

    // The same over HTTP/2, which the API server negotiates when the webhook offers it.
    let (code, body) = https_h2(addr, &bundle.ca_pem, MUTATE_PATH, review().to_string())
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(patch_of(&resp), ops);

    // Malformed input gets a clear 400, and the server keeps serving.
    let (code, body) = https(addr, &bundle.ca_pem, "POST", MUTATE_PATH, "{not json")
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("not an AdmissionReview"), "{body}");
    let (code, _) = https(addr, &bundle.ca_pem, "GET", "/healthz", "")
        .await
        .unwrap();
    assert_eq!(code, 200);

    // A client trusting another CA refuses the server.
    let other = certs::issue(&settings(), Timestamp::now(), None).unwrap();
    assert!(
        https(addr, &other.ca_pem, "GET", "/healthz", "")
            .await
            .is_err()
    );
}

/// The status of `GET /healthz` for a client trusting `ca_pem`, or the TLS failure.
async fn health(addr: std::net::SocketAddr, ca_pem: &str) -> std::io::Result<u16> {
    Ok(https(addr, ca_pem, "GET", "/healthz", "").await?.0)
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_without_a_restart() {
    let old = certs::issue(&settings(), Timestamp::now(), None).unwrap();
    let (addr, store) = start(&old).await;
    let new = certs::issue(&settings(), Timestamp::now(), Some(&old.ca_pem)).unwrap();
    // The new bundle trusts both CAs: replicas still serving the old certificate stay valid.
    assert_eq!(new.ca_pem.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(health(addr, &new.ca_pem).await.unwrap(), 200);
    let new_ca_only = new
        .ca_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap();
    assert!(health(addr, new_ca_only).await.is_err());
    store.set(&new.cert_pem, &new.key_pem).unwrap();
    assert_eq!(health(addr, new_ca_only).await.unwrap(), 200);
    assert!(health(addr, &old.ca_pem).await.is_err());
    // A bad certificate is refused and the current one kept.
    assert!(store.set("garbage", &new.key_pem).is_err());
    assert!(
        store.set(&new.cert_pem, &old.key_pem).is_err(),
        "key must match"
    );
    assert_eq!(health(addr, new_ca_only).await.unwrap(), 200);
}

const SECRET: &str = "/api/v1/namespaces/nencache-system/secrets/nencache-webhook-tls";

#[tokio::test]
async fn the_certificate_secret_is_created_once_kept_while_valid_and_renewed_near_expiry() {
    let fake = FakeApi::shared();
    let api: Api<Secret> = Api::namespaced(client(&fake, "nencache-system"), "nencache-system");
    let s = settings();
    let first = certs::ensure(&api, "nencache-webhook-tls", &s, None)
        .await
        .unwrap();
    let stored = fake.lock().unwrap().objects[SECRET].clone();
    assert_eq!(stored["type"], "kubernetes.io/tls");
    assert_eq!(
        certs::ensure(&api, "nencache-webhook-tls", &s, None)
            .await
            .unwrap(),
        first,
        "kept"
    );

    // Expiring within the renewal window: a new pair, the old CA still in the bundle.
    {
        let mut f = fake.lock().unwrap();
        let mut obj = f.objects[SECRET].clone();
        let soon = Timestamp::from_second(Timestamp::now().as_second() + 86_400).unwrap();
        obj["metadata"]["annotations"][NOT_AFTER_ANNOTATION] = json!(soon.to_string());
        f.put(SECRET, obj);
    }
    let renewed = certs::ensure(&api, "nencache-webhook-tls", &s, None)
        .await
        .unwrap();
    assert_ne!(renewed.cert_pem, first.cert_pem);
    assert!(
        renewed
            .ca_pem
            .ends_with(&format!("{}\n", first.ca_pem.trim())),
        "old CA kept"
    );

    // A corrupt Secret is replaced, not trusted.
    {
        let mut f = fake.lock().unwrap();
        let mut obj = f.objects[SECRET].clone();
        obj["data"]["tls.crt"] = json!(base64::engine::general_purpose::STANDARD.encode("junk"));
        f.put(SECRET, obj);
    }
    let replaced = certs::ensure(&api, "nencache-webhook-tls", &s, None)
        .await
        .unwrap();
    assert!(replaced.cert_pem.contains("BEGIN CERTIFICATE"));
    let back = Bundle::from_secret(
        &serde_json::from_value(fake.lock().unwrap().objects[SECRET].clone()).unwrap(),
    );
    assert_eq!(back, Some(replaced.clone()));

    // The Secret deleted under a serving replica: the CA it serves stays in the new bundle.
    fake.lock().unwrap().objects.remove(SECRET);
    let reissued = certs::ensure(&api, "nencache-webhook-tls", &s, Some(&replaced))
        .await
        .unwrap();
    assert_ne!(reissued.cert_pem, replaced.cert_pem);
    let serving_ca = replaced
        .ca_pem
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap();
    assert!(
        reissued.ca_pem.contains(serving_ca.trim()),
        "serving CA kept"
    );
}

#[tokio::test]
async fn replicas_starting_together_agree_on_one_certificate() {
    let fake = FakeApi::shared();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let api: Api<Secret> =
                Api::namespaced(client(&fake, "nencache-system"), "nencache-system");
            tokio::spawn(async move {
                certs::ensure(&api, "nencache-webhook-tls", &settings(), None)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.unwrap());
    }
    assert!(
        got.iter().all(|b| *b == got[0]),
        "every replica serves the stored pair"
    );
}

#[tokio::test]
async fn the_ca_bundle_is_patched_into_stale_webhooks_only() {
    let fake = FakeApi::shared();
    let path = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/nencache";
    let ca = certs::issue(&settings(), Timestamp::now(), None)
        .unwrap()
        .ca_pem;
    let current = base64::engine::general_purpose::STANDARD.encode(&ca);
    let hook = |name: &str, bundle: Option<&str>| {
        json!({
            "name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"service": {"name": "nencache-webhook", "namespace": "nencache-system"}, "caBundle": bundle},
        })
    };
    fake.lock().unwrap().put(
        path,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "nencache"},
            "webhooks": [hook("pods.nencache.io", None), hook("other.nencache.io", Some(&current))],
        }),
    );
    let api: Api<MutatingWebhookConfiguration> = Api::all(client(&fake, "default"));
    assert!(certs::patch_ca_bundle(&api, "nencache", &ca).await.unwrap());
    let (p, content_type, body) = fake.lock().unwrap().patches[0].clone();
    assert_eq!(p, path);
    assert_eq!(content_type, "application/strategic-merge-patch+json");
    assert_eq!(
        body,
        json!({"webhooks": [{"name": "pods.nencache.io", "clientConfig": {"caBundle": current}}]})
    );
    // Missing configuration: nothing to do, no error.
    assert!(!certs::patch_ca_bundle(&api, "absent", &ca).await.unwrap());
}

const CONFIG: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/nencache";

/// The CA bundle (PEM) in the webhook configuration, if written.
fn ca_bundle_of(fake: &std::sync::Mutex<FakeApi>) -> Option<String> {
    let config = fake.lock().unwrap().objects[CONFIG].clone();
    let b64 = config["webhooks"][0]["clientConfig"]["caBundle"].as_str()?;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(String::from_utf8(pem).unwrap())
}

#[tokio::test]
async fn a_renewed_certificate_is_served_only_once_the_api_server_trusts_it() {
    let fake = FakeApi::shared();
    fake.lock().unwrap().put(
        CONFIG,
        json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "nencache"},
            "webhooks": [{"name": "pods.nencache.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                "clientConfig": {"service": {"name": "nencache-webhook", "namespace": "nencache-system"}}}],
        }),
    );
    let secrets: Api<Secret> = Api::namespaced(client(&fake, "nencache-system"), "nencache-system");
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client(&fake, "default"));
    let name = "nencache-webhook-tls";
    // Serving, with the CA bundle written.
    let first = certs::ensure(&secrets, name, &settings(), None)
        .await
        .unwrap();
    certs::patch_ca_bundle(&configs, "nencache", &first.ca_pem)
        .await
        .unwrap();
    let (addr, store) = start(&first).await;
    let same = certs::refresh(
        &secrets,
        name,
        &configs,
        "nencache",
        &settings(),
        &first,
        &store,
    )
    .await
    .unwrap();
    assert_eq!(same, first, "nothing due, nothing changed");

    // Renewal is due, but the webhook configuration cannot be written: the API server would
    // not trust the new certificate, so the old one stays served.
    let mut due = settings();
    due.renew_before = due.validity + std::time::Duration::from_secs(86_400);
    fake.lock().unwrap().failing_paths.push(CONFIG.into());
    let r = certs::refresh(&secrets, name, &configs, "nencache", &due, &first, &store).await;
    assert!(r.is_err(), "{r:?}");
    let trusted = ca_bundle_of(&fake).unwrap();
    assert_eq!(trusted, first.ca_pem, "the bundle was not written");
    assert_eq!(
        health(addr, &trusted).await.unwrap(),
        200,
        "what is served is still what the API server trusts"
    );
    let renewed = Bundle::from_secret(
        &serde_json::from_value(fake.lock().unwrap().objects[SECRET].clone()).unwrap(),
    )
    .unwrap();
    assert_ne!(renewed, first, "the Secret was renewed");

    // The next check writes the bundle (new and old CA) first, then serves the new pair.
    fake.lock().unwrap().failing_paths.clear();
    let now = certs::refresh(
        &secrets,
        name,
        &configs,
        "nencache",
        &settings(),
        &first,
        &store,
    )
    .await
    .unwrap();
    assert_eq!(now, renewed);
    let trusted = ca_bundle_of(&fake).unwrap();
    assert_eq!(trusted, renewed.ca_pem);
    assert_eq!(
        trusted.matches("BEGIN CERTIFICATE").count(),
        2,
        "old CA kept"
    );
    assert_eq!(health(addr, &trusted).await.unwrap(), 200);
    let new_ca_only = trusted
        .split_inclusive("-----END CERTIFICATE-----")
        .next()
        .unwrap();
    assert_eq!(
        health(addr, new_ca_only).await.unwrap(),
        200,
        "the new certificate is served"
    );
}
