//! The pod side: from the watched cache of managed pods, create missing `CachedImage`s and keep
//! `usedBy`, `lastUsed` and `expiresAt` right. One pass over the whole cache after changes
//! settle (debounced), writing only objects whose usage changed: never a write per pod event.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use larder_core::crd::{CachedImage, CachedImageSpec, UsedBy};
use larder_core::reference::Reference;
use serde_json::json;
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::{Result, desired, policy};

/// Quiet time after a pod change before a pass; bounds the pass rate under churn.
pub const DEBOUNCE: Duration = Duration::from_secs(2);
/// A pass runs at least this often (expiries start without any pod event).
pub const RESYNC: Duration = Duration::from_secs(60);

/// The status fields a pass wants written for one object, or `None` when nothing changed.
pub fn status_patch(
    ci: &CachedImage,
    usage: Option<&desired::ImageUsage>,
    now: Timestamp,
    retention: Duration,
) -> Option<serde_json::Value> {
    let status = ci.status.clone().unwrap_or_default();
    let used_by = usage.map(desired::ImageUsage::used_by).unwrap_or_default();
    let r = policy::retention(&status, used_by.count, ci.spec.retain, now, retention);
    let current_used = status.used_by.clone().unwrap_or_default();
    let unchanged = current_used == used_by
        && status.last_used.as_ref().map(|t| t.0) == r.last_used
        && status.expires_at.as_ref().map(|t| t.0) == r.expires_at;
    if unchanged && status.used_by.is_some() {
        return None;
    }
    Some(json!({
        "usedBy": used_by,
        "lastUsed": r.last_used.map(Time),
        "expiresAt": r.expires_at.map(Time),
    }))
}

/// A new object for an image no `CachedImage` exists for yet.
pub fn new_cached_image(name: &str, reference: &Reference) -> CachedImage {
    CachedImage {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        },
        spec: CachedImageSpec::new(reference.to_string()),
        status: None,
    }
}

/// One pass: create what is missing, patch usage that changed, set the phase gauge.
pub async fn pass(
    client: &kube::Client,
    pods: &Store<Pod>,
    images: &Store<CachedImage>,
    retention: Duration,
    metrics: &Metrics,
) -> Result<()> {
    let api: Api<CachedImage> = Api::all(client.clone());
    let pod_state = pods.state();
    let usage = desired::usage(pod_state.iter().map(AsRef::as_ref));
    let image_state = images.state();
    let mut phases: BTreeMap<&'static str, i64> = BTreeMap::new();
    let mut known = std::collections::BTreeSet::new();
    let now = Timestamp::now();
    for ci in &image_state {
        known.insert(ci.name_any());
        if let Some(phase) = ci.status.as_ref().and_then(|s| s.phase) {
            *phases.entry(phase.as_str()).or_default() += 1;
        }
        if ci.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let key = Reference::parse(&ci.spec.source_image).map(|r| r.cached_image_name());
        let Ok(key) = key else { continue };
        if let Some(patch) = status_patch(ci, usage.get(&key), now, retention)
            && let Err(error) = api
                .patch_status(
                    &ci.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "status": patch })),
                )
                .await
        {
            tracing::warn!(name = %ci.name_any(), %error, "updating usage");
        }
    }
    for (name, u) in &usage {
        if known.contains(name) {
            continue;
        }
        match api
            .create(
                &PostParams::default(),
                &new_cached_image(name, &u.reference),
            )
            .await
        {
            Ok(_) => tracing::info!(%name, image = %u.reference, "created CachedImage"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(error) => tracing::warn!(%name, %error, "creating CachedImage"),
        }
    }
    metrics.set_phases(&phases);
    Ok(())
}

/// Runs passes whenever `changed` is notified (debounced) and every [`RESYNC`].
pub async fn run(
    client: kube::Client,
    pods: Store<Pod>,
    images: Store<CachedImage>,
    changed: Arc<Notify>,
    retention: Duration,
    metrics: Metrics,
) {
    loop {
        let _ = tokio::time::timeout(RESYNC, changed.notified()).await;
        tokio::time::sleep(DEBOUNCE).await;
        if let Err(error) = pass(&client, &pods, &images, retention, &metrics).await {
            tracing::warn!(%error, "usage pass");
        }
    }
}

/// The status entry an unused image shows (for symmetry with [`UsedBy::from_pods`]).
pub fn unused() -> UsedBy {
    UsedBy::default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::tests::pod;
    use larder_core::crd::CachedImageStatus;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn patches_only_when_usage_changes() {
        let r = Reference::parse("nginx:1.27").unwrap_or_else(|e| panic!("{e}"));
        let name = r.cached_image_name();
        let pods = [pod("a", "p", &[("c", "nginx:1.27")], true)];
        let usage = desired::usage(&pods);
        let mut ci = new_cached_image(&name, &r);
        let now = Timestamp::now();
        let patch = status_patch(&ci, usage.get(&name), now, DAY).unwrap_or_default();
        assert_eq!(patch["usedBy"]["count"], 1);
        assert!(patch["expiresAt"].is_null());
        // Apply it: the next pass has nothing to write.
        ci.status = Some(CachedImageStatus {
            used_by: Some(usage[&name].used_by()),
            last_used: Some(Time(now)),
            ..CachedImageStatus::default()
        });
        assert_eq!(status_patch(&ci, usage.get(&name), now, DAY), None);
        // The pod goes: count 0, an empty list (a merge patch replaces lists whole, so the old
        // name goes; an absent list would keep it) and an expiry.
        let patch = status_patch(&ci, None, now, DAY).unwrap_or_default();
        assert_eq!(patch["usedBy"], json!({"count": 0, "pods": []}));
        assert!(patch["expiresAt"].is_string());
        assert_eq!(unused().count, 0);
    }

    /// A JSON merge patch (RFC 7386) as the apiserver applies it: objects merge key by key,
    /// `null` removes, anything else (lists too) replaces.
    fn merge(doc: &mut serde_json::Value, patch: &serde_json::Value) {
        let Some(fields) = patch.as_object() else {
            *doc = patch.clone();
            return;
        };
        if !doc.is_object() {
            *doc = json!({});
        }
        for (key, value) in fields {
            if value.is_null() {
                doc.as_object_mut().map(|d| d.remove(key));
            } else {
                merge(&mut doc[key], value);
            }
        }
    }

    #[test]
    fn a_status_read_back_after_the_last_pod_went_needs_no_more_writes() {
        let r = Reference::parse("nginx:1.27").unwrap_or_else(|e| panic!("{e}"));
        let mut ci = new_cached_image(&r.cached_image_name(), &r);
        let now = Timestamp::now();
        let used: CachedImageStatus = serde_json::from_value(json!({
            "usedBy": {"count": 1, "pods": ["ns/pod"]},
            "lastUsed": Time(now),
        }))
        .unwrap_or_default();
        ci.status = Some(used);
        let patch = status_patch(&ci, None, now, DAY).unwrap_or_default();
        // What the apiserver stores after the merge patch, as the next pass reads it.
        let mut stored = serde_json::to_value(ci.status.take()).unwrap_or_default();
        merge(&mut stored, &patch);
        ci.status = serde_json::from_value(stored).unwrap_or_default();
        let used_by = ci.status.as_ref().and_then(|s| s.used_by.clone());
        assert_eq!(used_by, Some(UsedBy::default()), "{patch}");
        assert_eq!(
            status_patch(&ci, None, now, DAY),
            None,
            "unchanged: no write"
        );
    }
}
