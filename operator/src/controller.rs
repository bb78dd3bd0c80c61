//! The controller loop: watches `NenCacheCluster`s and the objects they own, runs
//! [`reconcile`] for each change (at most a few at a time), records metrics with bounded
//! labels, and stops gracefully when asked. Also the operator's admin endpoint: `/healthz`,
//! `/readyz` (the replica serves) and `/metrics` (reconciles, latency, leadership).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Service, ServiceAccount},
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{Controller, controller::Action, events::Reporter, watcher},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio_stream::StreamExt;

use crate::{
    build::Policy,
    crd::NenCacheCluster,
    reconcile::{Context, Error, reconcile},
};

/// Labels of the reconcile counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    /// `ok` or the error's bounded label.
    result: &'static str,
}

/// The operator's metrics and readiness.
#[derive(Debug)]
pub struct Observed {
    registry: Registry,
    reconciles: Family<Outcome, Counter>,
    duration: Histogram,
    leader: Gauge,
    ready: AtomicBool,
}

impl Default for Observed {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nencache_operator");
        let reconciles = Family::<Outcome, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile latency",
            duration.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica runs the controller",
            leader.clone(),
        );
        Self {
            registry,
            reconciles,
            duration,
            leader,
            ready: AtomicBool::new(false),
        }
    }
}

impl Observed {
    fn record(&self, result: &'static str, took: Duration) {
        self.reconciles.get_or_create(&Outcome { result }).inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Marks the replica ready (serving) or not, for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Routes of the admin endpoint. `/readyz` answers 200 once the replica serves (its webhook
/// is up, or it has started with the webhook off), whether it leads or stands by.
pub fn admin_router(observed: Arc<Observed>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(o): State<Arc<Observed>>| async move {
                if o.ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(o): State<Arc<Observed>>| async move { o.render() }),
        )
        .with_state(observed)
}

struct Ctx {
    inner: Arc<Context>,
    observed: Arc<Observed>,
}

/// Runs the controller, enforcing `policy`, until `shutdown` resolves; in-flight reconciles
/// finish first.
pub async fn run(
    client: Client,
    reporter: Reporter,
    policy: Policy,
    observed: Arc<Observed>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let wc = watcher::Config::default();
    let clusters: Api<NenCacheCluster> = Api::all(client.clone());
    let ctx = Arc::new(Ctx {
        inner: Arc::new(Context::new(client.clone(), reporter, policy)),
        observed: observed.clone(),
    });
    let stream = Controller::new(clusters, wc.clone())
        .owns(Api::<DaemonSet>::all(client.clone()), wc.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), wc.clone())
        .owns(Api::<Service>::all(client.clone()), wc.clone())
        .owns(Api::<ServiceAccount>::all(client), wc)
        .with_config(kube::runtime::controller::Config::default().concurrency(4))
        .graceful_shutdown_on(shutdown)
        .run(
            |ncc, ctx: Arc<Ctx>| async move {
                let start = Instant::now();
                let r = reconcile(ncc, ctx.inner.clone()).await;
                ctx.observed.record(r.as_ref().map_or_else(Error::metric_label, |_| "ok"), start.elapsed());
                r
            },
            |ncc, err: &Error, _| {
                tracing::warn!(cluster = %ncc.name_any(), error = %err, "reconcile failed; retrying");
                Action::requeue(Duration::from_secs(30))
            },
            ctx,
        );
    observed.leader.set(1);
    let mut stream = std::pin::pin!(stream);
    while let Some(r) = stream.next().await {
        match r {
            Ok((obj, _)) => tracing::debug!(cluster = %obj.name, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "controller event"),
        }
    }
    observed.leader.set(0);
    tracing::info!("controller stopped");
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, to_bytes};
    use tower::ServiceExt;

    use super::*;

    async fn get(o: &Arc<Observed>, path: &str) -> (StatusCode, String) {
        let req = axum::http::Request::get(path).body(Body::empty()).unwrap();
        let resp = admin_router(o.clone()).oneshot(req).await.unwrap();
        let status = resp.status();
        let body = to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn admin_endpoint_reports_readiness_and_reconcile_metrics() {
        let o = Arc::new(Observed::default());
        assert_eq!(get(&o, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(&o, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        o.set_ready(true);
        assert_eq!(get(&o, "/readyz").await.0, StatusCode::OK);
        o.record("ok", Duration::from_millis(3));
        o.record("apply_daemon_set", Duration::from_millis(9));
        let (_, m) = get(&o, "/metrics").await;
        assert!(
            m.contains("nencache_operator_reconciles_total{result=\"ok\"} 1"),
            "{m}"
        );
        assert!(m.contains("result=\"apply_daemon_set\""), "{m}");
        assert!(
            m.contains("nencache_operator_reconcile_duration_seconds_count 2"),
            "{m}"
        );
    }
}
