//! Minimal HTTP/1.1 clients for the tests: plain (admin endpoints) and over TLS trusting only
//! a given CA (the webhook), plus the admission review the webhook tests send.

use std::{net::SocketAddr, sync::Arc};

use base64::Engine;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore, crypto::ring},
};

/// The webhook Service's name as the API server would use it.
pub const HOST: &str = "nencache-webhook.nencache-system.svc";

async fn exchange(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))?;
    let code = head
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .parse()
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

/// One plain HTTP/1.1 request; returns (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    exchange(TcpStream::connect(addr).await?, method, path, "").await
}

/// One HTTP/1.1 request over TLS trusting only `ca_pem`; returns (status, body).
pub async fn https(
    addr: SocketAddr,
    ca_pem: &str,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await?;
    exchange(tls, method, path, body).await
}

/// One HTTP/2 POST over TLS (ALPN `h2`, as the API server calls webhooks) trusting only
/// `ca_pem`; returns (status, body).
pub async fn https_h2(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    body: String,
) -> std::io::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await?;
    let tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).unwrap(), tcp)
        .await?;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 negotiated"
    );
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let req = http::Request::post(format!("https://{HOST}{path}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(body)))
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .map_err(std::io::Error::other)?;
    let code = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((code, String::from_utf8_lossy(&bytes).into_owned()))
}

/// An admission review of a pod labelled for injection, in namespace `ml`.
pub fn review() -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "r-1", "operation": "CREATE",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ml", "userInfo": {"username": "u"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "vllm", "namespace": "ml", "labels": {"nencache.io/inject": "true"}},
                "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
            },
        },
    })
}

/// The JSON patch in an admission response, decoded from base64.
pub fn patch_of(resp: &Value) -> Vec<Value> {
    let b64 = resp["response"]["patch"].as_str().unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}
