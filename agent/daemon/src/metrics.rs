//! Prometheus metrics: RPC latency histograms and outcome counters (labels bounded by method
//! and status code), plus the engine's counters and gauges read at scrape time.

use std::fmt::Write;

use nencache_engine::Engine;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Labels of the RPC latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// RPC method name.
    pub method: &'static str,
}

/// Labels of the RPC outcome counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// RPC method name.
    pub method: &'static str,
    /// gRPC status code name.
    pub code: &'static str,
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// RPC latency by method.
    pub rpc_seconds: Family<MethodLabels, Histogram>,
    /// RPC outcomes by method and code.
    pub rpc_total: Family<OutcomeLabels, Counter>,
    /// Sessions opened.
    pub sessions_opened: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `nencache_agent` prefix.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nencache_agent");
        let rpc_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            // 4 µs to about 4 s (4 µs × 2^20), then +Inf.
            Histogram::new(exponential_buckets(4e-6, 2.0, 21))
        });
        let rpc_total = Family::<OutcomeLabels, Counter>::default();
        let sessions_opened = Counter::default();
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency",
            rpc_seconds.clone(),
        );
        registry.register("rpc", "gRPC calls by outcome", rpc_total.clone());
        registry.register(
            "sessions_opened",
            "Client sessions opened",
            sessions_opened.clone(),
        );
        Self {
            registry,
            rpc_seconds,
            rpc_total,
            sessions_opened,
        }
    }

    /// Records one call.
    pub fn observe(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        self.rpc_seconds
            .get_or_create(&MethodLabels { method })
            .observe(seconds);
        self.rpc_total
            .get_or_create(&OutcomeLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// The Prometheus text exposition, engine statistics included.
    #[must_use]
    pub fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        if let Some(stripped) = out.strip_suffix("# EOF\n") {
            out.truncate(stripped.len());
        }
        let s = engine.stats();
        let mut metric = |name: &str, kind: &str, help: &str, series: &[(&str, u64)]| {
            let full = format!("nencache_agent_{name}");
            let _ = writeln!(out, "# HELP {full} {help}\n# TYPE {full} {kind}");
            for (labels, v) in series {
                let sfx = if kind == "counter" { "_total" } else { "" };
                let _ = writeln!(out, "{full}{sfx}{labels} {v}");
            }
        };
        metric(
            "hits",
            "counter",
            "Keys found by get",
            &[("{tier=\"host\"}", s.hits)],
        );
        metric(
            "misses",
            "counter",
            "Keys not found by get",
            &[("", s.misses)],
        );
        metric(
            "lookup_keys",
            "counter",
            "Keys asked about by lookup",
            &[("", s.lookup_keys)],
        );
        metric(
            "lookup_hits",
            "counter",
            "Keys lookup found in the cached prefix",
            &[("", s.lookup_hits)],
        );
        metric(
            "commits",
            "counter",
            "Entries published",
            &[("{tier=\"host\"}", s.commits)],
        );
        metric(
            "evictions",
            "counter",
            "Entries evicted to make room",
            &[("{tier=\"host\"}", s.evictions)],
        );
        metric(
            "expirations",
            "counter",
            "Entries dropped at TTL",
            &[("", s.expirations)],
        );
        metric("deletes", "counter", "Entries deleted", &[("", s.deletes)]);
        metric(
            "checksum_failures",
            "counter",
            "Commits whose bytes failed the checksum",
            &[("", s.checksum_failures)],
        );
        metric(
            "no_space",
            "counter",
            "Calls refused for lack of space",
            &[("", s.no_space)],
        );
        metric(
            "reclaimed_leases",
            "counter",
            "Leases released because a session ended",
            &[("", s.reclaimed_leases)],
        );
        metric(
            "reclaimed_reservations",
            "counter",
            "Reservations reclaimed at session end or timeout",
            &[("", s.reclaimed_reservations)],
        );
        metric(
            "tier_capacity_bytes",
            "gauge",
            "Tier capacity",
            &[
                ("{tier=\"host\"}", s.capacity_bytes),
                ("{tier=\"staging\"}", s.staging_bytes),
            ],
        );
        metric(
            "tier_used_bytes",
            "gauge",
            "Tier bytes in use",
            &[
                ("{tier=\"host\"}", s.used_bytes),
                ("{tier=\"staging\"}", s.staging_used_bytes),
            ],
        );
        metric(
            "entries",
            "gauge",
            "Committed entries",
            &[("{tier=\"host\"}", s.entries)],
        );
        metric("leases", "gauge", "Leases held", &[("", s.leases)]);
        metric(
            "reservations",
            "gauge",
            "Reservations in flight",
            &[("", s.reservations)],
        );
        metric("sessions", "gauge", "Sessions open", &[("", s.sessions)]);
        out.push_str("# EOF\n");
        out
    }
}

/// The canonical name of a gRPC code (a bounded label value).
#[must_use]
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}
