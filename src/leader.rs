//! Leader election on a `coordination.k8s.io` Lease, so that only one of
//! several replicas exports.
//!
//! The holder renews the Lease every retry period. Another replica takes it
//! over once `renewTime + leaseDurationSeconds` has passed without renewal.
//! A holder that cannot renew within the renew deadline stops its
//! controllers and exits, so two replicas never export at the same time for
//! longer than the gap between the deadline and the lease duration.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Timing of the election.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// Identity written as holder.
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it gives up.
    pub renew_deadline: Duration,
    /// Time between attempts to acquire or renew.
    pub retry_period: Duration,
}

/// A Lease-based lock.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: Settings,
}

/// Why holding the lease ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Release was requested; the lease was released.
    Shutdown,
    /// The lease could not be renewed in time, or another replica took it.
    Lost,
}

impl LeaderElector {
    /// Builds an elector.
    pub fn new(client: kube::Client, settings: Settings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    /// Waits until this process holds the lease. Returns `false` when
    /// shutdown was requested first.
    pub async fn acquire(&self, shutdown: &CancellationToken) -> bool {
        let mut logged_holder = None;
        loop {
            match self.try_acquire().await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "Became leader");
                    return true;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if logged_holder.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.settings.name, %holder, "Waiting for the leader Lease");
                        logged_holder = Some(holder);
                    }
                }
                Err(error) => {
                    tracing::warn!(lease = %self.settings.name, error = %crate::failure_chain(&error), "Failed to acquire the leader Lease");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
        }
    }

    /// Renews the lease until `release` is cancelled (then releases it) or
    /// until it is lost.
    pub async fn hold(&self, release: &CancellationToken) -> Ended {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = release.cancelled() => {
                    self.release().await;
                    return Ended::Shutdown;
                }
                _ = tokio::time::sleep(self.settings.retry_period) => {}
            }
            match self.try_acquire().await {
                Ok(Attempt::Held) => last_renewal = Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    tracing::error!(lease = %self.settings.name, %holder, "Another replica holds the leader Lease");
                    return Ended::Lost;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::failure_chain(&error), "Failed to renew the leader Lease");
                    if last_renewal.elapsed() > self.settings.renew_deadline {
                        tracing::error!(lease = %self.settings.name, "Could not renew the leader Lease within the renew deadline");
                        return Ended::Lost;
                    }
                }
            }
        }
    }

    async fn try_acquire(&self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let identity = &self.settings.identity;
        let duration_seconds = self.settings.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    Ok(Attempt::HeldBy("another replica".into()))
                }
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == *identity;
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(renewed), Some(seconds)) => {
                renewed.0 + SignedDuration::from_secs(i64::from(seconds)) < now
            }
            _ => true,
        };
        if !mine && !holder.is_empty() && !expired {
            return Ok(Attempt::HeldBy(holder));
        }
        if !mine {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(identity.clone());
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(MicroTime(now));
        // The replace carries the resourceVersion read above, so two replicas
        // racing for an expired lease cannot both win.
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                Ok(Attempt::HeldBy("another replica".into()))
            }
            Err(error) => Err(error),
        }
    }

    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.settings.name, "Released the leader Lease"),
            Err(error) => {
                tracing::warn!(error = %crate::failure_chain(&error), "Failed to release the leader Lease")
            }
        }
    }
}

enum Attempt {
    Held,
    HeldBy(String),
}
