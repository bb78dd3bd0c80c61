//! Prometheus metrics: RPC latency histograms and outcome counters (labels bounded by method
//! and status code), plus the engine's counters and gauges read at scrape time.

use std::fmt::Write;

use nencache_engine::Engine;
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

/// Labels of the compat listeners' request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompatLabels {
    /// `lm` or `redis`.
    pub protocol: &'static str,
    /// The command, lower case.
    pub command: &'static str,
    /// `ok`, `hit`, `miss`, `no_space`, ...
    pub outcome: &'static str,
}

/// Labels of the compat listeners' latency histogram.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompatCommandLabels {
    /// `lm` or `redis`.
    pub protocol: &'static str,
    /// The command, lower case.
    pub command: &'static str,
}

/// Labels of the compat listeners' connection gauge.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// `lm` or `redis`.
    pub protocol: &'static str,
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
    /// Compat-protocol requests by protocol, command and outcome.
    pub compat_total: Family<CompatLabels, Counter>,
    /// Compat-protocol request latency by protocol and command.
    pub compat_seconds: Family<CompatCommandLabels, Histogram>,
    /// Open compat-protocol connections by protocol.
    pub compat_open: Family<ProtocolLabels, Gauge>,
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
        let compat_total = Family::<CompatLabels, Counter>::default();
        let compat_seconds = Family::<CompatCommandLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(4e-6, 2.0, 21))
        });
        let compat_open = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "compat_requests",
            "Requests of the LMCache-compatible listeners by protocol, command and outcome",
            compat_total.clone(),
        );
        registry.register(
            "compat_request_duration_seconds",
            "Request latency of the LMCache-compatible listeners",
            compat_seconds.clone(),
        );
        registry.register(
            "compat_connections",
            "Open connections of the LMCache-compatible listeners",
            compat_open.clone(),
        );
        Self {
            registry,
            rpc_seconds,
            rpc_total,
            sessions_opened,
            compat_total,
            compat_seconds,
            compat_open,
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
                code: nencache_api::code_name(code),
            })
            .inc();
    }

    /// Records one request of a compat listener.
    pub fn observe_compat(
        &self,
        protocol: &'static str,
        command: &'static str,
        outcome: &'static str,
        seconds: f64,
    ) {
        self.compat_seconds
            .get_or_create(&CompatCommandLabels { protocol, command })
            .observe(seconds);
        self.compat_total
            .get_or_create(&CompatLabels {
                protocol,
                command,
                outcome,
            })
            .inc();
    }

    /// The duration histogram and request counter of one compat command and outcome, for a
    /// connection to keep and observe without looking them up each time.
    #[must_use]
    pub fn compat_meters(
        &self,
        protocol: &'static str,
        command: &'static str,
        outcome: &'static str,
    ) -> (Histogram, Counter) {
        (
            self.compat_seconds
                .get_or_create(&CompatCommandLabels { protocol, command })
                .clone(),
            self.compat_total
                .get_or_create(&CompatLabels {
                    protocol,
                    command,
                    outcome,
                })
                .clone(),
        )
    }

    /// The gauge of open connections of a compat protocol.
    #[must_use]
    pub fn compat_connections(&self, protocol: &'static str) -> Gauge {
        self.compat_open
            .get_or_create(&ProtocolLabels { protocol })
            .clone()
    }

    /// The Prometheus text exposition, engine statistics included.
    #[allow(clippy::too_many_lines)]
    #[must_use]
    pub fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        if let Some(stripped) = out.strip_suffix("# EOF\n") {
            out.truncate(stripped.len());
        }
        let s = engine.stats();
        let tiers = engine.tier_stats();
        let label = |t: &nencache_engine::TierStats| format!("{{tier=\"{}\"}}", t.tier.name());
        let per_tier = |host: Option<u64>, f: &dyn Fn(&nencache_engine::TierStats) -> u64| {
            let mut v: Vec<(String, u64)> = host
                .map(|h| ("{tier=\"host\"}".to_string(), h))
                .into_iter()
                .collect();
            v.extend(tiers.iter().map(|t| (label(t), f(t))));
            v
        };
        let hits = per_tier(Some(s.hits - s.promotions), &|t| t.hits);
        let evictions = per_tier(Some(s.evictions), &|t| t.store.evictions);
        let entries = per_tier(Some(s.entries), &|t| t.store.entries);
        let capacity = per_tier(None, &|t| t.store.capacity_bytes);
        let used = per_tier(None, &|t| t.store.used_bytes);
        let demotions = per_tier(None, &|t| t.demotions);
        let demoted_bytes = per_tier(None, &|t| t.demoted_bytes);
        let read_bytes = per_tier(None, &|t| t.store.read_bytes);
        let corrupt = per_tier(None, &|t| t.store.corrupt);
        let io_errors = per_tier(None, &|t| t.store.io_errors);
        let degraded = per_tier(None, &|t| u64::from(t.degraded.is_some()));
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
            "Keys found by get, by the tier that held them (a lower-tier hit is promoted)",
            &series(&hits),
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
            "Entries evicted to make room (lower tiers: with their region)",
            &series(&evictions),
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
                &[
                    ("{tier=\"host\"}", s.capacity_bytes),
                    ("{tier=\"staging\"}", s.staging_bytes),
                ][..],
                &series(&capacity),
            ]
            .concat(),
        );
        metric(
            "tier_used_bytes",
            "gauge",
            "Tier bytes in use",
            &[
                &[
                    ("{tier=\"host\"}", s.used_bytes),
                    ("{tier=\"staging\"}", s.staging_used_bytes),
                ][..],
                &series(&used),
            ]
            .concat(),
        );
        metric("entries", "gauge", "Committed entries", &series(&entries));
        metric(
            "promotions",
            "counter",
            "Values read from a lower tier into host memory",
            &[("", s.promotions)],
        );
        metric(
            "demotions",
            "counter",
            "Entries written from host memory to a lower tier",
            &series(&demotions),
        );
        metric(
            "demoted_bytes",
            "counter",
            "Value bytes written from host memory to a lower tier",
            &series(&demoted_bytes),
        );
        metric(
            "tier_read_bytes",
            "counter",
            "Value bytes read back from a lower tier",
            &series(&read_bytes),
        );
        metric(
            "evictions_unsaved",
            "counter",
            "Host entries evicted that no lower tier held",
            &[("", s.evictions_unsaved)],
        );
        metric(
            "tier_corrupt_entries",
            "counter",
            "Lower-tier entries found torn or corrupt (never served)",
            &series(&corrupt),
        );
        metric(
            "tier_io_errors",
            "counter",
            "Failed lower-tier I/O operations",
            &series(&io_errors),
        );
        metric(
            "tier_degraded",
            "gauge",
            "1 while a lower tier is degraded (full, failing, slow, or its file gone)",
            &series(&degraded),
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

/// Borrowed series of a metric from owned labels.
fn series(v: &[(String, u64)]) -> Vec<(&str, u64)> {
    v.iter().map(|(l, n)| (l.as_str(), *n)).collect()
}
