//! Reconciling one `NenCacheCluster`: `validate -> build -> apply -> status`.
//!
//! `validate` and `build` are pure ([`crate::build`]). `apply` server-side-applies every
//! owned object with the fixed field manager `nencache-operator`. `status` derives the
//! cluster's status from its DaemonSet (desired, ready and updated agents, and the conditions
//! Ready, Progressing, Degraded and ConfigValid) and writes it to the status subresource. An
//! invalid spec applies nothing and reports `ConfigValid=False` with the reason.
//!
//! A ServiceMonitor is applied when `metrics.serviceMonitor` is set and deleted when it is
//! not; where the Prometheus Operator's CRD is missing that is a Warning event, not a failed
//! reconcile. Transitions (a new generation applied, the spec turning invalid or valid again,
//! agents becoming ready or not, a failed apply) are published as Kubernetes Events on the
//! cluster; a failure to publish is logged and does not fail the reconcile.

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
    api::{DeleteParams, DynamicObject, Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::json;

use crate::{
    build::{
        FIELD_MANAGER, Policy, SpecError, Validated, agent_name, build, compat_service_name,
        service_monitor_resource, validate,
    },
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
    /// Publishes Events on clusters.
    pub recorder: Recorder,
    /// What clusters may ask of the nodes, and the helper image.
    pub policy: Policy,
}

impl Context {
    /// A context whose Events name `reporter` as their source, enforcing `policy`.
    #[must_use]
    pub fn new(client: Client, reporter: Reporter, policy: Policy) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            policy,
        }
    }
}

/// An Event to publish on a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// PascalCase reason.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
}

impl Note {
    fn normal(reason: &'static str, message: String) -> Self {
        Self {
            warning: false,
            reason,
            message,
        }
    }

    fn warning(reason: &'static str, message: String) -> Self {
        Self {
            warning: true,
            reason,
            message,
        }
    }
}

async fn publish(ctx: &Context, ncc: &NenCacheCluster, notes: &[Note]) {
    let reference = ncc.object_ref(&());
    for n in notes {
        let ev = Event {
            type_: if n.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: n.reason.into(),
            note: Some(n.message.chars().take(1024).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(cluster = %ncc.name_any(), reason = n.reason, error = %e, "publishing an event failed");
        }
    }
}

fn find<'a>(status: Option<&'a NenCacheClusterStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

/// The Events for going from status `old` to `new` of `ncc`.
#[must_use]
pub fn transitions(
    ncc: &NenCacheCluster,
    old: Option<&NenCacheClusterStatus>,
    new: &NenCacheClusterStatus,
) -> Vec<Note> {
    let mut notes = Vec::new();
    let was = |t: &str| find(old, t).map(|c| c.status == "True");
    let is = |t: &str| find(Some(new), t).map(|c| c.status == "True");
    let message = |t: &str| {
        find(Some(new), t)
            .map(|c| c.message.clone())
            .unwrap_or_default()
    };
    match (was("ConfigValid"), is("ConfigValid")) {
        (prev, Some(false)) if prev != Some(false) => {
            notes.push(Note::warning("InvalidSpec", message("ConfigValid")));
        }
        (Some(false), Some(true)) => notes.push(Note::normal("SpecValid", message("ConfigValid"))),
        _ => {}
    }
    let generation = ncc.meta().generation;
    if is("ConfigValid") == Some(true) && old.and_then(|s| s.observed_generation) != generation {
        notes.push(Note::normal(
            "Applied",
            format!("applied generation {}", generation.unwrap_or_default()),
        ));
    }
    if is("ConfigValid") == Some(true) {
        match (was("Ready"), is("Ready")) {
            (prev, Some(true)) if prev != Some(true) => {
                notes.push(Note::normal("AgentsReady", message("Ready")));
            }
            (Some(true), Some(false)) => {
                notes.push(Note::warning("AgentsNotReady", message("Ready")))
            }
            _ => {}
        }
    }
    notes
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
    let validated = validate(&ncc, &ctx.policy);
    let mut notes = Vec::new();
    let ds = match &validated {
        Ok(v) => match apply_all(&ctx.client, &ns, &ncc, v, &ctx.policy, &mut notes).await {
            Ok(ds) => Some(ds),
            Err(e) => {
                publish(&ctx, &ncc, &[Note::warning("ApplyFailed", e.to_string())]).await;
                return Err(e);
            }
        },
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
    let written = api
        .patch_status(
            &ncc.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await;
    match written {
        Ok(_) => {}
        // Deleted while we worked: its owned objects go with it, nothing is left to report.
        Err(kube::Error::Api(e)) if e.code == 404 => {
            tracing::debug!(cluster = %ncc.name_any(), "deleted during reconcile");
            return Ok(Action::await_change());
        }
        Err(e) => return Err(kube_err("patch_status")(e)),
    }
    notes.extend(transitions(&ncc, ncc.status.as_ref(), &status));
    publish(&ctx, &ncc, &notes).await;
    Ok(Action::requeue(std::time::Duration::from_secs(300)))
}

async fn apply_all(
    client: &Client,
    ns: &str,
    ncc: &NenCacheCluster,
    v: &Validated,
    policy: &Policy,
    notes: &mut Vec<Note>,
) -> Result<DaemonSet, Error> {
    let r = build(ncc, v, policy);
    apply::<ServiceAccount>(client, ns, &r.service_account, "apply_service_account").await?;
    apply::<ConfigMap>(client, ns, &r.config_map, "apply_config_map").await?;
    apply::<Service>(client, ns, &r.service, "apply_service").await?;
    let ds = apply::<DaemonSet>(client, ns, &r.daemon_set, "apply_daemon_set").await?;
    let monitors: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &service_monitor_resource());
    let name = agent_name(&ncc.name_any());
    match &r.service_monitor {
        Some(sm) => {
            let params = PatchParams::apply(FIELD_MANAGER).force();
            match monitors.patch(&name, &params, &Patch::Apply(sm)).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => notes.push(Note::warning(
                    "ServiceMonitorUnavailable",
                    "metrics.serviceMonitor is set but the ServiceMonitor CRD \
                     (monitoring.coreos.com/v1) is not installed"
                        .into(),
                )),
                Err(e) => return Err(kube_err("apply_service_monitor")(e)),
            }
        }
        // Switched off (or never on): remove one left from before. 404 covers both a missing
        // object and a missing CRD.
        None => match monitors.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_err("delete_service_monitor")(e)),
        },
    }
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    match &r.compat_service {
        Some(svc) => {
            apply::<Service>(client, ns, svc, "apply_compat_service").await?;
        }
        None => match services
            .delete(
                &compat_service_name(&ncc.name_any()),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_err("delete_compat_service")(e)),
        },
    }
    Ok(ds)
}

/// Builds the conditions of a status. A condition keeps the `lastTransitionTime` of the one
/// of its type in `old` when its status is the same (as Kubernetes' `meta.SetStatusCondition`
/// does), so an unchanged status is written unchanged and does not wake the controller again.
struct Conditions<'a> {
    old: &'a [Condition],
    now: Timestamp,
    generation: Option<i64>,
    out: Vec<Condition>,
}

impl Conditions<'_> {
    fn push(&mut self, type_: &str, ok: bool, reason: &str, message: String) {
        let status = if ok { "True" } else { "False" };
        let since = self
            .old
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or(self.now, |c| c.last_transition_time.0);
        self.out.push(Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: self.generation,
            last_transition_time: Time(since),
        });
    }
}

/// The status of `ncc` given the validation outcome and its applied DaemonSet; conditions
/// whose status did not change since `ncc.status` keep their `lastTransitionTime`.
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
    let mut c = Conditions {
        old: ncc.status.as_ref().map_or(&[], |s| s.conditions.as_slice()),
        now: Timestamp::now(),
        generation,
        out: Vec::with_capacity(4),
    };
    match validated {
        Ok(()) => {
            c.push("ConfigValid", true, "Valid", "spec is valid".into());
            let rolled = ds_current && updated == desired;
            let all_ready = rolled && ready == desired;
            c.push(
                "Ready",
                all_ready,
                if all_ready {
                    "AllAgentsReady"
                } else {
                    "AgentsNotReady"
                },
                format!("{ready} of {desired} agents ready"),
            );
            c.push(
                "Progressing",
                !rolled,
                if rolled {
                    "RolloutComplete"
                } else {
                    "RollingOut"
                },
                format!("{updated} of {desired} agents run the current spec"),
            );
            let degraded = rolled && ready < desired;
            c.push(
                "Degraded",
                degraded,
                if degraded {
                    "AgentsUnavailable"
                } else {
                    "AsExpected"
                },
                format!("{} agents unavailable", desired - ready),
            );
        }
        Err(e) => {
            c.push("ConfigValid", false, "InvalidSpec", e.to_string());
            c.push("Ready", false, "InvalidSpec", "spec is invalid".into());
        }
    }
    let conditions = c.out;
    NenCacheClusterStatus {
        observed_generation: generation,
        desired,
        ready,
        updated,
        conditions,
    }
}
