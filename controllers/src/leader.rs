//! Leader election on a `coordination.k8s.io/v1` Lease, written with get/create/replace and
//! the Lease's resourceVersion, so two replicas can never both believe they hold it.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::{Error, Result};

/// What to do with a Lease as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Take,
    /// Someone else holds it and is renewing.
    Follow,
}

/// Decides from the Lease's spec. A holder that has not renewed within its
/// `leaseDurationSeconds` is considered gone.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Take;
    };
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => return Decision::Renew,
        None | Some("") => return Decision::Take,
        Some(_) => {}
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .unwrap_or(15)
            .max(1)
            .unsigned_abs()
            .into(),
    );
    match spec.renew_time.as_ref() {
        Some(t) if crate::policy::after(t.0, duration) > now => Decision::Follow,
        _ => Decision::Take,
    }
}

/// One replica's handle on the Lease.
#[derive(Debug, Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    /// A lock on Lease `name` in the namespace of `api`.
    pub fn new(api: Api<Lease>, name: String, identity: String, duration: Duration) -> Self {
        Self {
            api,
            name,
            identity,
            duration,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, now: Timestamp, previous: Option<&LeaseSpec>, taking: bool) -> LeaseSpec {
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            renew_time: Some(MicroTime(now)),
            acquire_time: if taking {
                Some(MicroTime(now))
            } else {
                previous.and_then(|p| p.acquire_time.clone())
            },
            lease_transitions: Some(if taking && previous.is_some() {
                transitions + 1
            } else {
                transitions
            }),
            ..LeaseSpec::default()
        }
    }

    /// Takes or renews the Lease if it is ours to take; `Ok(true)` when we hold it now.
    /// A conflicting write (409) means another replica won this round: `Ok(false)`.
    pub async fn try_acquire(&self) -> Result<bool> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(now, None, true)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let decision = decide(lease.spec.as_ref(), &self.identity, now);
        if decision == Decision::Follow {
            return Ok(false);
        }
        lease.spec = Some(self.spec(now, lease.spec.as_ref(), decision == Decision::Take));
        // `replace` sends metadata.resourceVersion: the write fails if anyone wrote since our read.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica holds the Lease, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads"),
                Err(error) => tracing::warn!(%error, lease = %self.name, "leader election"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every third of the lease duration; returns (an error) once a renewal has not
    /// succeeded for a whole lease duration, or another replica took the Lease: from then on
    /// this replica must stop acting.
    pub async fn keep(&self) -> Error {
        let every = self.duration / 3;
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    return Error::LeaderLost(format!("{} taken by another replica", self.name));
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing the leader lease");
                    if last_ok.elapsed() >= self.duration {
                        return Error::LeaderLost(format!(
                            "{}: not renewed in time: {error}",
                            self.name
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn held(by: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(t(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", t(0)), Decision::Take);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "me", t(0)),
            Decision::Take
        );
        assert_eq!(decide(Some(&held("me", 0)), "me", t(100)), Decision::Renew);
        assert_eq!(
            decide(Some(&held("other", 0)), "me", t(10)),
            Decision::Follow
        );
        assert_eq!(decide(Some(&held("other", 0)), "me", t(15)), Decision::Take);
        let mut no_renew = held("other", 0);
        no_renew.renew_time = None;
        assert_eq!(decide(Some(&no_renew), "me", t(0)), Decision::Take);
    }
}
