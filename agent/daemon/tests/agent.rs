//! End-to-end tests: the real `nencache-agent` binary on a temporary socket, driven by the
//! real client from several tasks and from separate processes, through every bad-input and
//! fault case of the node-local API.

// Helpers outside #[test] functions fail loudly too.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use nencache_api::{
    attach::{self, Reply},
    v1,
};
use nencache_client::{Client, Put, PutOutcome, Reserve};
use tonic::Code;

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_get_from_many_tasks() {
    let agent = TestAgent::start(&[]);
    let client = agent.client().await;
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20u64 {
                let key = format!("task{t}/key{i}");
                let v = pattern(t * 1000 + i, 1000 + (i as usize) * 7919);
                assert_eq!(
                    c.put(key.as_bytes(), &v, b"meta").await.unwrap(),
                    PutOutcome::Stored
                );
            }
            for i in 0..20u64 {
                let key = format!("task{t}/key{i}");
                let got = c
                    .get(&[key.as_bytes()])
                    .await
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    &got[..],
                    &pattern(t * 1000 + i, 1000 + (i as usize) * 7919)[..]
                );
                assert_eq!(got.metadata(), b"meta");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let keys: Vec<Vec<u8>> = (0..8)
        .map(|t| format!("task{t}/key0").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    assert_eq!(client.lookup(&refs).await.unwrap().0, 8);
    client.flush_releases().await.unwrap();
    let s = client.stats().await.unwrap();
    assert_eq!((s.hits, s.commits, s.leases), (160, 160, 0));
    // A second put of the same key is reported, not rewritten.
    let r = client.put(b"task0/key0", b"other", b"").await.unwrap();
    assert_eq!(r, PutOutcome::Exists);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_and_fast_path_serve_the_same_cache() {
    let agent = TestAgent::start(&[]);
    let opts = nencache_client::ClientOptions {
        fast_path: false,
        ..Default::default()
    };
    let slow = Client::connect_with(&agent.socket, opts).await.unwrap();
    let fast = agent.client().await;
    slow.put(b"a", &pattern(1, 50_000), b"via-grpc")
        .await
        .unwrap();
    fast.put(b"b", &pattern(2, 50_000), b"").await.unwrap();
    for c in [&slow, &fast] {
        assert_eq!(c.lookup(&[b"a", b"b", b"c"]).await.unwrap().0, 2);
        let v = c.get(&[b"a", b"c", b"b"]).await.unwrap();
        assert_eq!(&v[0].as_ref().unwrap()[..], &pattern(1, 50_000)[..]);
        assert_eq!(v[0].as_ref().unwrap().metadata(), b"via-grpc");
        assert!(v[1].is_none());
        assert_eq!(&v[2].as_ref().unwrap()[..], &pattern(2, 50_000)[..]);
        assert_eq!(code(c.get(&[&[0u8; 300]]).await), Code::InvalidArgument);
        drop(v);
        c.flush_releases().await.unwrap();
    }
    let s = fast.stats().await.unwrap();
    assert_eq!((s.hits, s.misses, s.leases), (4, 2, 0));
}

/// Reads one fast-path response frame: its status byte and the rest of its body.
fn read_response(s: &mut std::os::unix::net::UnixStream) -> (u8, Vec<u8>) {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    (body[0], body[1..].to_vec())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_fast_path_frames_are_refused_and_the_session_goes_on() {
    use nencache_api::frame::{self, Request};
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    c.put(b"k", b"v", b"").await.unwrap();
    let (mut s, reply, _fds) = raw_attach(&agent);
    assert_eq!(reply.status, attach::status::OK);
    let mut oversized = ((frame::MAX_FRAME + 1) as u32).to_le_bytes().to_vec();
    oversized.extend(std::iter::repeat_n(0u8, frame::MAX_FRAME + 1));
    let mut lookup = Vec::new();
    Request::Lookup(vec![b"k"]).encode(&mut lookup);
    for (bad, want) in [
        (&b"\x03\x00\x00\x00\x09\x00\x00"[..], frame::UNIMPLEMENTED),
        (
            &b"\x03\x00\x00\x00\x02\x01\x00"[..],
            frame::INVALID_ARGUMENT,
        ),
        (&b"\x00\x00\x00\x00"[..], frame::INVALID_ARGUMENT),
        (&oversized[..], frame::INVALID_ARGUMENT),
    ] {
        s.write_all(bad).unwrap();
        let (status, body) = read_response(&mut s);
        assert_eq!(status, want, "{:?}", String::from_utf8_lossy(&body));
        // The same connection is still in step and its session still serves.
        s.write_all(&lookup).unwrap();
        let (status, body) = read_response(&mut s);
        assert_eq!((status, &body[..4]), (frame::OK, &1u32.to_le_bytes()[..]));
    }
    assert_eq!(c.stats().await.unwrap().sessions, 2);
    drop(s);
    eventually("raw session closed", async || {
        c.stats().await.unwrap().sessions == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn separate_processes_share_the_cache() {
    let agent = TestAgent::start(&[]);
    let sock = agent.socket.to_str().unwrap();
    let dir = agent.dir.path();
    let input = dir.join("in.bin");
    std::fs::write(&input, pattern(7, 300_000)).unwrap();
    let put = Command::new(CLI)
        .args([
            "--socket",
            sock,
            "put",
            "shared-key",
            "--file",
            input.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let out = dir.join("out.bin");
    let get = Command::new(CLI)
        .args([
            "--socket",
            sock,
            "get",
            "shared-key",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), pattern(7, 300_000));
    let miss = Command::new(CLI)
        .args(["--socket", sock, "get", "nope"])
        .output()
        .unwrap();
    assert_eq!(miss.status.code(), Some(1));
    // And this process sees what the others wrote.
    let c = agent.client().await;
    assert_eq!(
        &c.get(&[b"shared-key"]).await.unwrap()[0].as_ref().unwrap()[..10],
        &pattern(7, 10)[..]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_get_clear_errors_and_lose_nothing() {
    let agent = TestAgent::start(&["--max-value", "1MiB"]);
    let c = agent.client().await;
    c.put(b"precious", &pattern(1, 5000), b"").await.unwrap();
    let long = vec![b'k'; 257];
    assert_eq!(code(c.put(&long, b"v", b"").await), Code::InvalidArgument);
    assert_eq!(code(c.get(&[&long]).await), Code::InvalidArgument);
    let big = vec![0u8; (1 << 20) + 1];
    let err = c.put(b"big", &big, b"").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().contains("exceeds the maximum"), "{err}");
    // Commit without reserve, and double commit.
    let grpc = raw_grpc(&agent.socket).await;
    let commit = |id| v1::CommitRequest {
        session: c.session(),
        items: vec![v1::CommitItem {
            reservation_id: id,
            checksum: None,
        }],
    };
    let e = grpc.clone().commit(commit(0x1234)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let slots = c
        .reserve(&[Reserve {
            key: b"two-phase",
            value_len: 10,
            metadata: b"",
            ttl: None,
        }])
        .await
        .unwrap();
    let slot = slots.into_iter().next().unwrap().unwrap();
    c.write_slot(&slot, 0, b"0123456789").unwrap();
    assert!(
        c.write_slot(&slot, 5, b"0123456789").is_err(),
        "writes stay inside the slot"
    );
    let id = slot.id();
    assert_eq!(
        c.commit(vec![slot]).await.unwrap(),
        vec![PutOutcome::Stored]
    );
    assert_eq!(
        grpc.clone().commit(commit(id)).await.unwrap_err().code(),
        Code::NotFound
    );
    // Release of an unknown lease.
    let e = grpc
        .clone()
        .release(v1::ReleaseRequest {
            session: c.session(),
            lease_ids: vec![42],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Calls naming no session.
    let e = grpc
        .clone()
        .get(v1::GetRequest {
            session: 7,
            keys: vec![b"x".to_vec()],
        })
        .await;
    assert_eq!(e.unwrap_err().code(), Code::FailedPrecondition);
    let v = c.get(&[b"precious", b"two-phase"]).await.unwrap();
    assert_eq!(&v[0].as_ref().unwrap()[..], &pattern(1, 5000)[..]);
    assert_eq!(&v[1].as_ref().unwrap()[..], b"0123456789");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_are_refused_and_the_agent_keeps_serving() {
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    c.put(b"k", b"value", b"").await.unwrap();
    // Not HTTP/2 at all.
    let mut raw = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage")
        .unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.read(&mut [0u8; 256]);
    drop(raw);
    // A well-formed gRPC frame holding a message of the wrong type (bytes where a uint64
    // session belongs).
    let mut g = tonic::client::Grpc::new(raw_channel(&agent.socket).await);
    let req = v1::LookupRequest {
        keys: vec![vec![1; 300]],
    };
    g.ready().await.unwrap();
    let r: Result<tonic::Response<v1::StatsResponse>, _> = g
        .unary(
            tonic::Request::new(req),
            "/nencache.v1.NodeCache/Release".parse().unwrap(),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let code = r.unwrap_err().code();
    assert!(
        matches!(code, Code::Internal | Code::InvalidArgument),
        "{code:?}"
    );
    // A garbage attach hello.
    let mut a = std::os::unix::net::UnixStream::connect(agent.attach_path()).unwrap();
    a.write_all(b"NOTMAGIC\x01\x00\x00\x00\x00\x00").unwrap();
    let mut buf = vec![0u8; 512];
    let n = a.read(&mut buf).unwrap();
    let reply = Reply::decode(&buf[..n]).unwrap();
    assert_eq!(reply.status, attach::status::MALFORMED);
    // Everything still works.
    let v = c.get(&[b"k"]).await.unwrap();
    assert_eq!(&v[0].as_ref().unwrap()[..], b"value");
    assert!(agent.client().await.stats().await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_arena_is_read_only_to_clients() {
    let agent = TestAgent::start(&[]);
    let (_s, reply, mut fds) = raw_attach(&agent);
    assert_eq!(reply.status, attach::status::OK);
    assert_eq!(fds.len(), 2);
    let arena = std::fs::File::from(fds.remove(0));
    let staging = std::fs::File::from(fds.remove(0));
    // SAFETY: expected to fail; nothing is accessed.
    let w = unsafe { memmap2::MmapOptions::new().len(4096).map_mut(&arena) };
    assert!(
        w.is_err(),
        "a client must not be able to map committed data writable"
    );
    // SAFETY: read-only mapping of shared memory that outlives it.
    let ro = unsafe { memmap2::MmapOptions::new().len(4096).map(&arena) }.unwrap();
    assert!(ro.make_mut().is_err(), "nor upgrade a read-only mapping");
    // SAFETY: the staging area is meant to be written by clients.
    let st = unsafe { memmap2::MmapOptions::new().len(4096).map_mut(&staging) };
    assert!(st.is_ok(), "the staging area is writable");
    // Socket files are group-accessible, not world-accessible.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660);
}

/// Runs inside a child process spawned by the tests below; a no-op otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn child_helper() {
    let Ok(mode) = std::env::var("NENCACHE_TEST_CHILD") else {
        return;
    };
    let socket = std::env::var("NENCACHE_TEST_SOCKET").unwrap();
    let c = Client::connect(&socket).await.unwrap();
    let mut held = Vec::new();
    // Kept until the process is killed: a dropped slot would be aborted.
    let mut slots = Vec::new();
    match mode.as_str() {
        "reserve" => {
            slots = c
                .reserve(&[Reserve {
                    key: b"doomed",
                    value_len: 4 << 20,
                    metadata: b"",
                    ttl: None,
                }])
                .await
                .unwrap();
            c.write_slot(slots[0].as_ref().unwrap(), 0, &[1; 1000])
                .unwrap();
        }
        "lease" => held = c.get(&[b"popular", b"popular"]).await.unwrap(),
        _ => unreachable!(),
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    drop((held, slots));
}

fn spawn_child(mode: &str, socket: &Path) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env("NENCACHE_TEST_CHILD", mode)
        .env("NENCACHE_TEST_SOCKET", socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("READY")),
        "child never got ready"
    );
    child
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_killed_mid_put_or_holding_leases_is_cleaned_up() {
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    c.put(b"popular", &pattern(3, 70_000), b"").await.unwrap();

    let mut child = spawn_child("reserve", &agent.socket);
    let s = c.stats().await.unwrap();
    assert_eq!(s.reservations, 1);
    assert!(s.staging_used_bytes >= 4 << 20);
    child.kill().unwrap();
    child.wait().unwrap();
    eventually("reservation reclaimed", async || {
        let s = c.stats().await.unwrap();
        s.reservations == 0 && s.staging_used_bytes == 0
    })
    .await;

    let mut child = spawn_child("lease", &agent.socket);
    assert_eq!(c.stats().await.unwrap().leases, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    eventually("leases released", async || {
        c.stats().await.unwrap().leases == 0
    })
    .await;
    let s = c.stats().await.unwrap();
    assert_eq!((s.reclaimed_leases, s.reclaimed_reservations), (2, 1));
    let v = c.get(&[b"popular"]).await.unwrap();
    assert_eq!(&v[0].as_ref().unwrap()[..], &pattern(3, 70_000)[..]);
    assert!(agent.log().contains("session closed"));
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_reservations_time_out() {
    let agent = TestAgent::start(&["--reservation-timeout", "200ms"]);
    let c = agent.client().await;
    let slots = c
        .reserve(&[Reserve {
            key: b"slow",
            value_len: 1 << 20,
            metadata: b"",
            ttl: None,
        }])
        .await
        .unwrap();
    assert_eq!(c.stats().await.unwrap().reservations, 1);
    eventually("reservation timed out", async || {
        c.stats().await.unwrap().reservations == 0
    })
    .await;
    let slot = slots.into_iter().next().unwrap().unwrap();
    assert_eq!(code(c.commit(vec![slot]).await), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_arena_evicts_then_reports_resource_exhausted() {
    let agent = TestAgent::start(&["--host-capacity", "8MiB", "--max-value", "1MiB"]);
    let c = agent.client().await;
    let value = |i: u64| pattern(i, 1 << 20);
    // Twice the arena: older entries are evicted to make room.
    for i in 0..16u64 {
        let key = format!("v{i}");
        c.put(key.as_bytes(), &value(i), b"").await.unwrap();
    }
    let s = c.stats().await.unwrap();
    assert!(s.tiers[0].evictions >= 8, "{s:?}");
    // Hold a lease on everything that is cached: nothing can be evicted any more.
    let keys: Vec<Vec<u8>> = (0..16u64).map(|i| format!("v{i}").into_bytes()).collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let held = c.get(&refs).await.unwrap();
    let cached = held.iter().filter(|v| v.is_some()).count();
    assert!(cached >= 6, "{cached} cached");
    let err = c.put(b"one-more", &value(99), b"").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    for (i, v) in held.iter().enumerate() {
        if let Some(v) = v {
            assert_eq!(&v[..], &value(i as u64)[..], "leased value {i} intact");
        }
    }
    drop(held);
    c.flush_releases().await.unwrap();
    assert_eq!(
        c.put(b"one-more", &value(99), b"").await.unwrap(),
        PutOutcome::Stored
    );
}

/// Puts of `(key, value)` pairs, with no metadata or TTL.
fn batch(puts: &[(Vec<u8>, Vec<u8>)]) -> Vec<Put<'_>> {
    puts.iter()
        .map(|(k, v)| Put {
            key: k,
            value: v,
            metadata: b"",
            ttl: None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn checksummed_puts_are_verified() {
    let agent = TestAgent::start(&[]);
    let opts = nencache_client::ClientOptions {
        verify_puts: true,
        ..Default::default()
    };
    let c = Client::connect_with(&agent.socket, opts).await.unwrap();
    let puts: Vec<(Vec<u8>, Vec<u8>)> = (0..4u64)
        .map(|i| (format!("c{i}").into_bytes(), pattern(i, 200_000)))
        .collect();
    assert_eq!(
        c.put_many(&batch(&puts)).await.unwrap(),
        vec![PutOutcome::Stored; 4]
    );
    assert_eq!(c.stats().await.unwrap().checksum_failures, 0);
}

#[test]
fn a_second_agent_on_the_same_socket_is_refused() {
    let first = TestAgent::start(&[]);
    let out = common::no_default_tier(&mut Command::new(AGENT))
        .args([
            "serve",
            "--socket",
            first.socket.to_str().unwrap(),
            "--admin-addr",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving"), "{err}");
    assert!(
        first.socket.exists(),
        "the first agent's socket is untouched"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_is_replaced_and_sigterm_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    std::fs::write(&socket, b"left by a crashed agent").unwrap();
    let mut agent = TestAgent::start_at(dir, socket.clone(), &[]);
    let c = agent.client().await;
    c.put(b"k", b"v", b"").await.unwrap();
    let status = agent.terminate();
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket removed at shutdown");
    assert!(agent.log().contains("agent stopped"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoint_serves_health_and_metrics() {
    let agent = TestAgent::start(&[]);
    let c = agent.client().await;
    c.put(b"m", b"v", b"").await.unwrap();
    let _ = c.get(&[b"m", b"missing"]).await.unwrap();
    let http = |path: &str| agent.http(path);
    assert!(http("/healthz").starts_with("HTTP/1.1 200"));
    assert!(http("/readyz").starts_with("HTTP/1.1 200"));
    let m = http("/metrics");
    for needle in [
        "nencache_agent_hits_total{tier=\"host\"} 1",
        "nencache_agent_misses_total 1",
        "nencache_agent_rpc_duration_seconds_bucket{le=",
        "method=\"session_get\"",
        "method=\"session_commit\"",
        "nencache_agent_tier_used_bytes{tier=\"host\"} 4096",
        "nencache_agent_leases",
    ] {
        assert!(m.contains(needle), "metrics lack {needle}:\n{m}");
    }
    // The chart's Grafana dashboard only queries series the agent exports.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../charts/nencache/dashboards/agents.json"
    ))
    .unwrap();
    let mut queried: Vec<&str> = dashboard
        .match_indices("nencache_agent_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    queried.sort_unstable();
    queried.dedup();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in queried {
        let exported = m.lines().any(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        });
        assert!(
            exported,
            "the dashboard queries {name}, which the agent does not export"
        );
    }
}

/// A real OTLP/gRPC trace collector on loopback that counts the spans it receives.
#[derive(Default, Clone)]
struct Collector(Arc<parking_lot::Mutex<Vec<String>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let names = req
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans)
            .map(|s| s.name);
        self.0.lock().extend(names);
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn traces_are_exported_over_otlp() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);
    let mut agent = TestAgent::start(&["--otlp-endpoint", &endpoint]);
    let c = agent.client().await;
    c.stats().await.unwrap();
    drop(c);
    // Shutdown flushes the batch exporter.
    assert!(agent.terminate().success());
    let spans = collector.0.lock().clone();
    assert!(
        spans.iter().any(|n| n == "grpc"),
        "spans received: {spans:?}"
    );
    server.abort();
}

/// The init container's job: `nencache-agent prepare-dir` creates the socket directory with
/// the owner and mode asked for, and refuses a mode that is not octal.
/// A batch bigger than one pipelined group (2 MiB), with keys already cached among the new
/// ones, over both transports and with checksums: every outcome lines up with its put and
/// every value reads back.
#[tokio::test(flavor = "multi_thread")]
async fn pipelined_batches_line_up_over_both_transports() {
    let agent = TestAgent::start(&[]);
    for fast_path in [false, true] {
        let opts = nencache_client::ClientOptions {
            fast_path,
            verify_puts: true,
            ..Default::default()
        };
        let c = Client::connect_with(&agent.socket, opts).await.unwrap();
        let tag = if fast_path { "fast" } else { "grpc" };
        let puts: Vec<(Vec<u8>, Vec<u8>)> = (0..10u64)
            .map(|i| (format!("{tag}/{i}").into_bytes(), pattern(i, 512 << 10)))
            .collect();
        for i in [2, 7] {
            c.put(&puts[i].0, &puts[i].1, b"").await.unwrap();
        }
        let outcomes = c.put_many(&batch(&puts)).await.unwrap();
        let expected: Vec<PutOutcome> = (0..10)
            .map(|i| {
                if i == 2 || i == 7 {
                    PutOutcome::Exists
                } else {
                    PutOutcome::Stored
                }
            })
            .collect();
        assert_eq!(outcomes, expected, "{tag}");
        let keys: Vec<&[u8]> = puts.iter().map(|(k, _)| k.as_slice()).collect();
        let got = c.get(&keys).await.unwrap();
        for ((_, v), g) in puts.iter().zip(&got) {
            assert_eq!(&g.as_ref().unwrap()[..], &v[..], "{tag}");
        }
    }
}
