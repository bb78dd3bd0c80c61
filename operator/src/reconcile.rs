//! Reconciling one `NenCacheCluster`: `validate -> build -> apply -> status`.
//!
//! `validate` and `build` are pure ([`crate::build`]). `apply` server-side-applies every
//! owned object with the fixed field manager `nencache-operator`. `status` derives the
//! cluster's status from its DaemonSet (desired, ready and updated agents, and the conditions
//! Ready, Progressing, Degraded and ConfigValid) and writes it to the status subresource. An
//! invalid spec applies nothing and reports `ConfigValid=False` with the reason.

use std::sync::Arc;

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Service, ServiceAccount},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::{
    build::{FIELD_MANAGER, SpecError, Validated, build, validate},
    crd::{NenCacheCluster, NenCacheClusterStatus},
};

/// A reconcile failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The resource has no namespace (it is namespaced, so this is a malformed event).
    #[error("NenCacheCluster without a namespace")]
    NoNamespace,
}

impl Error {
    /// A bounded label for metrics.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube { what, .. } => what,
            Self::NoNamespace => "no_namespace",
        }
    }
}

/// What reconciles share.
#[derive(Clone)]
pub struct Context {
    /// The API client.
    pub client: Client,
}

fn kube_err(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { what, source }
}

async fn apply<K>(client: &Client, ns: &str, obj: &K, what: &'static str) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await
        .map_err(kube_err(what))
}

/// Reconciles one cluster.
///
/// # Errors
/// A failed API call (the controller retries with back-off).
pub async fn reconcile(ncc: Arc<NenCacheCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ncc.namespace().ok_or(Error::NoNamespace)?;
    let validated = validate(&ncc);
    let ds = match &validated {
        Ok(v) => Some(apply_all(&ctx.client, &ns, &ncc, v).await?),
        Err(e) => {
            tracing::warn!(cluster = %ncc.name_any(), error = %e, "invalid spec");
            None
        }
    };
    let status = status_of(&ncc, validated.as_ref().map(|_| ()), ds.as_ref());
    let api: Api<NenCacheCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": "nencache.io/v1alpha1",
        "kind": "NenCacheCluster",
        "status": status,
    });
    api.patch_status(
        &ncc.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err("patch_status"))?;
    Ok(Action::requeue(std::time::Duration::from_secs(300)))
}

async fn apply_all(
    client: &Client,
    ns: &str,
    ncc: &NenCacheCluster,
    v: &Validated,
) -> Result<DaemonSet, Error> {
    let r = build(ncc, v);
    apply::<ServiceAccount>(client, ns, &r.service_account, "apply_service_account").await?;
    apply::<ConfigMap>(client, ns, &r.config_map, "apply_config_map").await?;
    apply::<Service>(client, ns, &r.service, "apply_service").await?;
    apply::<DaemonSet>(client, ns, &r.daemon_set, "apply_daemon_set").await
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(Timestamp::now()),
    }
}

/// The status of `ncc` given the validation outcome and its applied DaemonSet.
#[must_use]
pub fn status_of(
    ncc: &NenCacheCluster,
    validated: Result<(), &SpecError>,
    ds: Option<&DaemonSet>,
) -> NenCacheClusterStatus {
    let generation = ncc.meta().generation;
    let s = ds.and_then(|d| d.status.as_ref());
    let desired = s.map_or(0, |s| s.desired_number_scheduled);
    let ready = s.map_or(0, |s| s.number_ready);
    let updated = s.and_then(|s| s.updated_number_scheduled).unwrap_or(0);
    let ds_current = match (
        ds.and_then(|d| d.metadata.generation),
        s.and_then(|s| s.observed_generation),
    ) {
        (Some(g), Some(o)) => o >= g,
        _ => false,
    };
    let mut conditions = Vec::with_capacity(4);
    match validated {
        Ok(()) => {
            conditions.push(condition(
                "ConfigValid",
                true,
                "Valid",
                "spec is valid".into(),
                generation,
            ));
            let rolled = ds_current && updated == desired;
            let all_ready = rolled && ready == desired;
            conditions.push(condition(
                "Ready",
                all_ready,
                if all_ready {
                    "AllAgentsReady"
                } else {
                    "AgentsNotReady"
                },
                format!("{ready} of {desired} agents ready"),
                generation,
            ));
            conditions.push(condition(
                "Progressing",
                !rolled,
                if rolled {
                    "RolloutComplete"
                } else {
                    "RollingOut"
                },
                format!("{updated} of {desired} agents run the current spec"),
                generation,
            ));
            let degraded = rolled && ready < desired;
            conditions.push(condition(
                "Degraded",
                degraded,
                if degraded {
                    "AgentsUnavailable"
                } else {
                    "AsExpected"
                },
                format!("{} agents unavailable", desired - ready),
                generation,
            ));
        }
        Err(e) => {
            conditions.push(condition(
                "ConfigValid",
                false,
                "InvalidSpec",
                e.to_string(),
                generation,
            ));
            conditions.push(condition(
                "Ready",
                false,
                "InvalidSpec",
                "spec is invalid".into(),
                generation,
            ));
        }
    }
    NenCacheClusterStatus {
        observed_generation: generation,
        desired,
        ready,
        updated,
        conditions,
    }
}
