//! The NenCache Kubernetes operator.
//!
//! - [`crd`]: the `NenCacheCluster` resource, from which `crds/` is generated (`crdgen`);
//! - [`build`]: the pure step of the reconcile pipeline (`validate -> build -> apply ->
//!   status`): from a cluster resource to the ConfigMap, DaemonSet, headless Service,
//!   ServiceAccount and optional ServiceMonitor that run its agents, with no API calls, so it
//!   is unit-tested from YAML;
//! - [`reconcile`]: the reconcile itself, `validate -> build -> apply (server-side apply with
//!   the `nencache-operator` field manager) -> status`, and the Events for its transitions;
//! - [`controller`]: the watch loop around `reconcile`, its metrics and admin endpoint;
//! - [`leader`]: leader election on a Lease, so that only one replica reconciles;
//! - [`webhook`]: the pod-injection admission logic (review in, JSON patch out) and its router;
//! - [`certs`]: the webhook's own CA and serving certificate, kept in a Secret and renewed,
//!   and the CA bundle written into the webhook configuration;
//! - [`https`]: the TLS server for the webhook, with a certificate swappable while serving.

pub mod build;
pub mod certs;
pub mod controller;
pub mod crd;
pub mod https;
pub mod leader;
pub mod reconcile;
pub mod webhook;
