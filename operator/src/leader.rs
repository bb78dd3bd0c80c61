//! Leader election on a `coordination.k8s.io/v1` Lease, so that several operator replicas can
//! run and only one reconciles.
//!
//! The protocol is the one client-go uses: a replica takes the Lease when it is free or its
//! holder has not renewed it within `leaseDurationSeconds`, writing at the `resourceVersion`
//! it read so that of two replicas racing only one wins (the other gets 409). The leader
//! renews every `renew_every`; if it cannot renew for `renew_deadline` it stops leading
//! ([`LeaderError::Lost`]) before another replica can take over, and the caller exits so that
//! no two replicas reconcile at once. A leader that stops normally releases the Lease, so a
//! standby takes over at once instead of after the lease duration.

use std::{future::Future, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};

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

/// Claims, renews and releases one Lease.
#[derive(Clone)]
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX).max(1)
}

impl Elector {
    /// An elector over the Leases in `api` (the operator's namespace).
    #[must_use]
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> Self {
        Self { api, settings }
    }

    /// One attempt to acquire or renew. `Ok(true)` when this replica holds the lease after it.
    ///
    /// # Errors
    /// An API error other than a lost write race.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let s = &self.settings;
        let now = Timestamp::now();
        let current = self.api.get_opt(&s.name).await?;
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
                let spec = lease.spec.take().unwrap_or_default();
                let holder = spec.holder_identity.as_deref().unwrap_or_default();
                let ours = holder == s.identity;
                let expired = holder.is_empty()
                    || spec.renew_time.as_ref().is_none_or(|r| {
                        let lasts_ms = i64::from(spec.lease_duration_seconds.unwrap_or(0)) * 1000;
                        r.0.as_millisecond().saturating_add(lasts_ms) < now.as_millisecond()
                    });
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
            Ok(_) => Ok(true),
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

    /// Runs `work` while this replica leads, renewing the lease; `work` is expected to be
    /// started only after [`Elector::acquire`]. Returns when `work` ends (the lease is then
    /// released) or when leadership is lost (`work` is dropped first).
    ///
    /// # Errors
    /// [`LeaderError::Lost`] when the lease could not be renewed in time or was taken.
    pub async fn lead(&self, work: impl Future<Output = ()>) -> Result<(), LeaderError> {
        let s = &self.settings;
        let mut work = std::pin::pin!(work);
        let mut last_renewed = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(s.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut work => break,
                _ = tick.tick() => {
                    let renew = tokio::time::timeout(s.renew_deadline, self.try_acquire_or_renew());
                    match renew.await {
                        Ok(Ok(true)) => last_renewed = tokio::time::Instant::now(),
                        Ok(Ok(false)) => return Err(LeaderError::Lost(s.name.clone())),
                        Ok(Err(e)) => tracing::warn!(error = %e, "leader election: renewing failed"),
                        Err(_) => tracing::warn!("leader election: renewing timed out"),
                    }
                    if last_renewed.elapsed() >= s.renew_deadline {
                        return Err(LeaderError::Lost(s.name.clone()));
                    }
                }
            }
        }
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "leader election: releasing the lease failed");
        }
        Ok(())
    }
}
