//! The NenCache Kubernetes operator.
//!
//! - [`crd`]: the `NenCacheCluster` resource, from which `crds/` is generated (`crdgen`);
//! - [`build`]: the pure step of the reconcile pipeline (`validate -> build -> apply ->
//!   status`): from a cluster resource to the ConfigMap, DaemonSet, headless Service and
//!   ServiceAccount that run its agents, with no API calls, so it is unit-tested from YAML;
//! - [`reconcile`]: the reconcile itself, `validate -> build -> apply (server-side apply with
//!   the `nencache-operator` field manager) -> status`;
//! - [`controller`]: the watch loop around `reconcile`, its metrics and admin endpoint;
//! - [`webhook`]: the pod-injection admission logic (review in, JSON patch out).

pub mod build;
pub mod certs;
pub mod controller;
pub mod crd;
pub mod https;
pub mod leader;
pub mod reconcile;
pub mod webhook;
