//! Clean-up of the webhook's derived pull Secrets (`--collect-derived-pull-secrets`, on in the
//! chart whenever `webhook.pullSecrets=derive`).
//!
//! The webhook names a derived `larder-pull-…` Secret after the versions of its sources, so
//! editing or rotating a source (registry tokens refreshed every few hours) gives the next pod
//! a new one, and the old ones used to stay forever. A derived Secret is deleted when both:
//!
//! - no managed pod in its namespace names it, at two passes in a row: a pod admitted just
//!   before one pass is in the pod store by the next, `--derived-pull-secret-interval` (10
//!   minutes) later;
//! - it is superseded: one of its sources is gone or no longer has the version it was built
//!   from, so the webhook will never hand its name out again.
//!
//! One whose sources are unchanged is kept even when no pod uses it: the next pod reuses it,
//! and there is at most one per namespace per set of credentials. Secrets without the
//! source-versions annotation (made before it existed) are left alone.
//!
//! Reads: one metadata-only list of the Secrets carrying larder's managed-by label (no Secret
//! data is ever received), and one GET per source of a candidate. Deletes carry the uid and
//! resourceVersion that were judged, as preconditions.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Preconditions};
use kube::runtime::reflector::Store;
use larder_core::crd::SecretRef;
use larder_core::derived_secrets::{
    self, DERIVED_PREFIX, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SOURCE_VERSIONS_ANNOTATION,
};

use crate::metrics::Metrics;
use crate::{Error, Result, desired};

/// Intervals below this are for tests: the two-pass rule protects a Secret a new pod names
/// only while the pod watch is less than one interval behind.
pub const SHORT_INTERVAL: Duration = Duration::from_secs(60);
/// Bound on each API call of a pass.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What a pass knows of one derived Secret (from its metadata only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    pub key: SecretRef,
    pub uid: String,
    pub resource_version: String,
    /// Source name → the version it was built from; `None` when the annotation is missing or
    /// unreadable (never collected).
    pub sources: Option<BTreeMap<String, String>>,
}

impl Derived {
    /// The derived Secret `meta` describes, or `None` for any other Secret.
    pub fn from_meta(meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_deref()?;
        let ours = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(MANAGED_BY_LABEL))
            .is_some_and(|v| v == MANAGED_BY_VALUE);
        if !name.starts_with(DERIVED_PREFIX) || !ours {
            return None;
        }
        Some(Self {
            key: SecretRef {
                namespace: meta.namespace.clone()?,
                name: name.to_owned(),
            },
            uid: meta.uid.clone()?,
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            sources: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(SOURCE_VERSIONS_ANNOTATION))
                .and_then(|v| derived_secrets::parse_source_versions(v)),
        })
    }
}

/// The derived Secrets named by any of `pods`' `imagePullSecrets`.
pub fn referenced<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> HashSet<SecretRef> {
    pods.into_iter()
        .flat_map(desired::pull_secret_refs)
        .filter(|r| r.name.starts_with(DERIVED_PREFIX))
        .collect()
}

/// Splits this pass's unreferenced Secrets into all of them (to remember for the next pass)
/// and those that were already unreferenced, same uid, at the previous pass (to judge now).
pub fn unreferenced_twice<'a>(
    derived: &'a [Derived],
    referenced: &HashSet<SecretRef>,
    previous: &HashSet<(SecretRef, String)>,
) -> (HashSet<(SecretRef, String)>, Vec<&'a Derived>) {
    let mut now = HashSet::new();
    let mut ready = Vec::new();
    for d in derived.iter().filter(|d| !referenced.contains(&d.key)) {
        let id = (d.key.clone(), d.uid.clone());
        if previous.contains(&id) {
            ready.push(d);
        }
        now.insert(id);
    }
    (now, ready)
}

/// True when a source is gone (`None`) or has another version than the one recorded.
/// Sources missing from `current` (not looked up) count as unchanged.
pub fn superseded(
    recorded: &BTreeMap<String, String>,
    current: &BTreeMap<String, Option<String>>,
) -> bool {
    recorded
        .iter()
        .any(|(name, version)| match current.get(name) {
            Some(Some(now)) => now != version,
            Some(None) => true,
            None => false,
        })
}

/// One collector, run by the leader.
pub struct Collector {
    client: kube::Client,
    pods: Store<Pod>,
    metrics: Metrics,
    previous: HashSet<(SecretRef, String)>,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collector")
            .field("candidates", &self.previous.len())
            .finish_non_exhaustive()
    }
}

impl Collector {
    pub fn new(client: kube::Client, pods: Store<Pod>, metrics: Metrics) -> Self {
        Self {
            client,
            pods,
            metrics,
            previous: HashSet::new(),
        }
    }

    /// One pass; returns how many Secrets it deleted. The pod store must be synced.
    pub async fn pass(&mut self) -> Result<usize> {
        let all: Api<Secret> = Api::all(self.client.clone());
        let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}");
        let list = timed(
            "list Secrets",
            all.list_metadata(&ListParams::default().labels(&selector)),
        )
        .await?;
        let derived: Vec<Derived> = list
            .items
            .iter()
            .filter_map(|s| Derived::from_meta(&s.metadata))
            .collect();
        let referenced = referenced(self.pods.state().iter().map(|p| p.as_ref()));
        let (now, ready) = unreferenced_twice(&derived, &referenced, &self.previous);
        self.previous = now;
        let mut deleted = 0;
        for d in ready {
            let Some(recorded) = &d.sources else {
                continue;
            };
            match self.judge_and_delete(d, recorded).await {
                Ok(true) => deleted += 1,
                Ok(false) => {}
                // One Secret's trouble does not stop the pass; it is judged again next time.
                Err(error) => {
                    tracing::warn!(secret = %d.key.name, namespace = %d.key.namespace, %error,
                        "derived pull secret clean-up");
                    self.metrics.derived_secret_error(error.metric_label());
                }
            }
        }
        Ok(deleted)
    }

    async fn judge_and_delete(
        &self,
        d: &Derived,
        recorded: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &d.key.namespace);
        let mut current = BTreeMap::new();
        for name in recorded.keys() {
            // Metadata only: the version is all that is compared.
            let meta = timed("get Secret", api.get_metadata_opt(name)).await?;
            current.insert(
                name.clone(),
                meta.map(|m| derived_secrets::secret_version(&m.metadata)),
            );
        }
        if !superseded(recorded, &current) {
            return Ok(false);
        }
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(d.uid.clone()),
                resource_version: Some(d.resource_version.clone()),
            }),
            ..DeleteParams::default()
        };
        match timed("delete Secret", api.delete(&d.key.name, &params)).await {
            Ok(_) => {
                tracing::info!(secret = %d.key.name, namespace = %d.key.namespace,
                    "deleted a superseded derived pull secret no pod uses");
                self.metrics.derived_secret_deleted();
                Ok(true)
            }
            // Gone already, or changed since it was judged: nothing to do this pass.
            Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 || s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

async fn timed<T>(call: &'static str, fut: impl Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(result) => result.map_err(Error::Kube),
        Err(_) => Err(Error::KubeTimeout {
            call,
            after: CALL_TIMEOUT,
        }),
    }
}

/// Runs passes every `interval` (`--derived-pull-secret-interval`, never zero) once the pod
/// store is synced, until aborted.
pub async fn run(
    client: kube::Client,
    pods: Store<Pod>,
    pods_synced: Arc<AtomicBool>,
    metrics: Metrics,
    interval: Duration,
) {
    if interval < SHORT_INTERVAL {
        tracing::warn!(
            ?interval,
            "--derived-pull-secret-interval is short: a pod admitted with a \
            superseded Secret is only safe if the pod watch is less than one interval behind"
        );
    }
    let mut collector = Collector::new(client, pods, metrics);
    // A zero period would panic; the flag's parser refuses it, this is for other callers.
    let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !pods_synced.load(Ordering::Acquire) {
            continue;
        }
        match collector.pass().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "derived pull secret clean-up pass"),
            Err(error) => {
                tracing::warn!(%error, "derived pull secret clean-up pass failed");
                collector.metrics.derived_secret_error(error.metric_label());
            }
        }
    }
}

#[cfg(test)]
#[path = "derived_secrets/tests.rs"]
mod tests;
