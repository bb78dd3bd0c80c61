//! Leader election on a `coordination.k8s.io/v1` Lease, so that several operator replicas can
//! run and only one reconciles.
//!
//! The protocol is the one client-go uses: a replica takes the Lease when it is free or its
//! holder has not renewed it within `leaseDurationSeconds`, writing at the `resourceVersion`
//! it read so that of two replicas racing only one wins (the other gets 409). The leader
//! renews every `renew_every`, in a task of its own so that a slow API server never holds up
//! the work it guards; if it cannot renew for `renew_deadline` it stops leading
//! ([`LeaderError::Lost`]) before another replica can take over, and the caller exits so that
//! no two replicas reconcile at once. A leader that stops normally releases the Lease, so a
//! standby takes over at once instead of after the lease duration.
//!
//! Expiry never compares the holder's `renewTime` with this replica's clock (the two clocks
//! may disagree by any amount). As in client-go, a replica records the time on its own
//! monotonic clock at which it last saw the Lease record change (holder, times, duration,
//! transitions or `resourceVersion`), and considers the lease expired only once
//! `leaseDurationSeconds` have passed on that clock without a change.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use tokio::time::Instant;

/// How leadership is claimed and kept.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leading.
    pub renew_deadline: Duration,
    /// How often the leader renews.
    pub renew_every: Duration,
    /// How often a standby tries to acquire.
    pub retry_every: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    #[must_use]
    pub fn new(name: &str, identity: &str) -> Self {
        Self {
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
            retry_every: Duration::from_secs(2),
        }
    }
}

/// Why leading stopped.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The lease could not be renewed in time, or another replica holds it now.
    #[error("lost the leader lease {0}")]
    Lost(String),
}

/// The parts of a Lease whose change shows that its holder is alive.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    acquire_time: Option<MicroTime>,
    duration: Option<i32>,
    transitions: Option<i32>,
    resource_version: Option<String>,
}

impl Record {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        Self {
            holder: spec.holder_identity,
            renew_time: spec.renew_time,
            acquire_time: spec.acquire_time,
            duration: spec.lease_duration_seconds,
            transitions: spec.lease_transitions,
            resource_version: lease.metadata.resource_version.clone(),
        }
    }
}

/// The record last seen, and when (on this replica's monotonic clock) it was first seen.
#[derive(Debug)]
struct Observation {
    record: Record,
    at: Instant,
}

/// Claims, renews and releases one Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    observed: Arc<Mutex<Option<Observation>>>,
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

impl Elector {
    /// An elector over the Leases in `api` (the operator's namespace).
    #[must_use]
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Self {
            api,
            settings,
            observed: Arc::new(Mutex::new(None)),
        }
    }

    /// Records `lease` as seen at `now` unless it is the record seen last; returns when the
    /// record now current was first seen.
    fn observe(&self, lease: &Lease, now: Instant) -> Instant {
        let record = Record::of(lease);
        let mut observed = self.observed.lock().unwrap_or_else(|p| p.into_inner());
        match &*observed {
            Some(o) if o.record == record => o.at,
            _ => {
                *observed = Some(Observation { record, at: now });
                now
            }
        }
    }

    /// One attempt to acquire or renew. `Ok(true)` when this replica holds the lease after it.
    ///
    /// # Errors
    /// An API error other than a lost write race.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let s = &self.settings;
        // Written for people reading the Lease; expiry is judged on the monotonic clock.
        let now = Timestamp::now();
        let current = self.api.get_opt(&s.name).await?;
        let seen = Instant::now();
        let fresh_spec = |acquired: Timestamp, transitions: i32| LeaseSpec {
            holder_identity: Some(s.identity.clone()),
            lease_duration_seconds: Some(secs(s.duration)),
            acquire_time: Some(MicroTime(acquired)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        };
        let written = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(s.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(fresh_spec(now, 0)),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                let changed_at = self.observe(&lease, seen);
                let spec = lease.spec.take().unwrap_or_default();
                let holder = spec.holder_identity.as_deref().unwrap_or_default();
                let ours = holder == s.identity;
                let lasts = spec
                    .lease_duration_seconds
                    .and_then(|d| u64::try_from(d).ok())
                    .filter(|d| *d > 0)
                    .map_or(s.duration, Duration::from_secs);
                let expired = holder.is_empty() || seen.duration_since(changed_at) >= lasts;
                if !ours && !expired {
                    return Ok(false);
                }
                let transitions = spec.lease_transitions.unwrap_or(0);
                lease.spec = Some(if ours {
                    fresh_spec(spec.acquire_time.map_or(now, |t| t.0), transitions)
                } else {
                    fresh_spec(now, transitions.saturating_add(1))
                });
                self.api
                    .replace(&s.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observe(&lease, Instant::now());
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up if this replica holds it, so a standby need not wait for expiry.
    ///
    /// # Errors
    /// An API error other than a lost write race.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let s = &self.settings;
        let Some(mut lease) = self.api.get_opt(&s.name).await? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(s.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until this replica leads (or `stop` resolves: then returns `Ok(false)`).
    ///
    /// # Errors
    /// Never: API errors while standing by are logged and retried.
    pub async fn acquire(&self, stop: impl Future<Output = ()>) -> Result<bool, LeaderError> {
        let mut stop = std::pin::pin!(stop);
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "became leader");
                    return Ok(true);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election: acquiring failed"),
            }
            tokio::select! {
                () = &mut stop => return Ok(false),
                () = tokio::time::sleep(self.settings.retry_every) => {}
            }
        }
    }

    /// Runs `work` while this replica leads, renewing the lease in a task of its own (so a
    /// slow renewal never stops `work` from progressing); `work` is expected to be started
    /// only after [`Elector::acquire`]. Returns when `work` ends (the lease is then released)
    /// or when leadership is lost (`work` is dropped first).
    ///
    /// # Errors
    /// [`LeaderError::Lost`] when the lease could not be renewed in time or was taken.
    pub async fn lead(&self, work: impl Future<Output = ()>) -> Result<(), LeaderError> {
        let mut work = std::pin::pin!(work);
        let renewing = self.clone();
        let mut renewer = tokio::spawn(async move { renewing.keep_renewing().await });
        tokio::select! {
            () = &mut work => {}
            lost = &mut renewer => {
                return Err(lost.unwrap_or_else(|_| LeaderError::Lost(self.settings.name.clone())));
            }
        }
        // Stop renewing before releasing, so that no renewal lands after the release.
        renewer.abort();
        let _ = renewer.await;
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "leader election: releasing the lease failed");
        }
        Ok(())
    }

    /// Renews every `renew_every` until a renewal is refused or none succeeded for
    /// `renew_deadline`; returns why leading stopped.
    async fn keep_renewing(&self) -> LeaderError {
        let s = &self.settings;
        let mut last_renewed = Instant::now();
        let mut tick = tokio::time::interval(s.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // A renewal that would end after the deadline cannot keep the lease: give up then.
            let left = s.renew_deadline.saturating_sub(last_renewed.elapsed());
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewed = Instant::now(),
                Ok(Ok(false)) => return LeaderError::Lost(s.name.clone()),
                Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewing failed"),
                Err(_) => tracing::warn!("leader election: renewing timed out"),
            }
            if last_renewed.elapsed() >= s.renew_deadline {
                return LeaderError::Lost(s.name.clone());
            }
        }
    }
}
