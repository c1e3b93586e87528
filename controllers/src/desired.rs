//! Which `CachedImage`s the pod set implies, and which pods use each one. Pure functions over
//! pods (usually the contents of a reflector store), so they are tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use larder_core::crd::UsedBy;
use larder_core::reference::Reference;

/// The label the webhook puts on every pod it rewrote.
pub const MANAGED_LABEL: &str = "larder.dev/managed";
/// The annotation holding the original images (JSON object: container key → image).
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "larder.dev/original-images";

/// Whether the webhook manages this pod.
pub fn is_managed(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_LABEL))
        .is_some_and(|v| v == "true")
}

/// Whether the pod still needs its images: not finished. A pod being deleted still runs until
/// it is gone, so it still counts (deleting an image under a terminating pod that restarts a
/// container would break it).
pub fn needs_images(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The normalised original images of a managed pod, sorted and without duplicates. Entries
/// that do not parse are skipped (logged): a bad annotation must not stop the other images.
pub fn pod_images(pod: &Pod) -> Vec<Reference> {
    let Some(raw) = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_IMAGES_ANNOTATION))
    else {
        return Vec::new();
    };
    let map: BTreeMap<String, String> = match serde_json::from_str(raw) {
        Ok(map) => map,
        Err(error) => {
            tracing::warn!(pod = %pod_key(pod), %error, "unreadable {ORIGINAL_IMAGES_ANNOTATION} annotation");
            return Vec::new();
        }
    };
    let mut out: Vec<Reference> = map
        .values()
        .filter_map(|image| match Reference::parse(image) {
            Ok(r) => Some(r),
            Err(error) => {
                tracing::warn!(pod = %pod_key(pod), %image, %error, "skipping an unparsable original image");
                None
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `namespace/name`.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// One image the pod set uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageUsage {
    /// The normalised reference (`spec.sourceImage`).
    pub reference: Reference,
    /// Every pod using it, `namespace/name`, sorted.
    pub pods: Vec<String>,
}

impl ImageUsage {
    /// The status entry: exact count, capped sorted sample.
    pub fn used_by(&self) -> UsedBy {
        UsedBy::from_pods(self.pods.iter().cloned())
    }
}

/// Every image used by managed, unfinished pods, keyed by `CachedImage` name. One pass over
/// the pods: O(pods × images per pod).
pub fn usage<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> BTreeMap<String, ImageUsage> {
    let mut out: BTreeMap<String, ImageUsage> = BTreeMap::new();
    for pod in pods {
        if !is_managed(pod) || !needs_images(pod) {
            continue;
        }
        let key = pod_key(pod);
        for reference in pod_images(pod) {
            out.entry(reference.cached_image_name())
                .or_insert_with(|| ImageUsage {
                    reference,
                    pods: Vec::new(),
                })
                .pods
                .push(key.clone());
        }
    }
    for usage in out.values_mut() {
        usage.pods.sort_unstable();
        usage.pods.dedup();
    }
    out
}

/// How many unfinished managed pods use the `CachedImage` called `name`: the number the
/// retention decision reads, computed from the live pod cache rather than from the possibly
/// stale status.
pub fn users_of<'a>(pods: impl IntoIterator<Item = &'a Pod>, name: &str) -> usize {
    pods.into_iter()
        .filter(|p| is_managed(p) && needs_images(p))
        .filter(|p| pod_images(p).iter().any(|r| r.cached_image_name() == name))
        .count()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodStatus;
    use kube::api::ObjectMeta;

    pub(crate) fn pod(ns: &str, name: &str, images: &[(&str, &str)], managed: bool) -> Pod {
        let map: BTreeMap<&str, &str> = images.iter().copied().collect();
        let mut labels = BTreeMap::new();
        if managed {
            labels.insert(MANAGED_LABEL.to_owned(), "true".to_owned());
        }
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some(labels),
                annotations: Some(
                    [(
                        ORIGINAL_IMAGES_ANNOTATION.to_owned(),
                        serde_json::to_string(&map).unwrap_or_default(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn images_are_normalised_deduplicated_and_bad_entries_skipped() {
        let p = pod(
            "a",
            "p",
            &[
                ("app", "nginx:1.27"),
                ("init:setup", "docker.io/library/nginx:1.27"),
                ("ephemeral:debug", "busybox"),
                ("bad", "UPPER/Case::x"),
            ],
            true,
        );
        let names: Vec<String> = pod_images(&p).iter().map(|r| r.to_string()).collect();
        assert_eq!(
            names,
            [
                "docker.io/library/busybox:latest",
                "docker.io/library/nginx:1.27"
            ]
        );
    }

    #[test]
    fn usage_counts_managed_unfinished_pods_only() {
        let mut done = pod("b", "done", &[("c", "nginx:1.27")], true);
        done.status = Some(PodStatus {
            phase: Some("Succeeded".into()),
            ..PodStatus::default()
        });
        let pods = [
            pod("a", "p1", &[("c", "nginx:1.27"), ("d", "redis")], true),
            pod("a", "p0", &[("c", "nginx:1.27")], true),
            pod("a", "unmanaged", &[("c", "nginx:1.27")], false),
            done,
        ];
        let u = usage(&pods);
        assert_eq!(u.len(), 2);
        let nginx = Reference::parse("nginx:1.27").unwrap_or_else(|e| panic!("{e}"));
        let entry = &u[&nginx.cached_image_name()];
        assert_eq!(entry.pods, ["a/p0", "a/p1"]);
        assert_eq!(entry.used_by().count, 2);
        assert_eq!(users_of(&pods, &nginx.cached_image_name()), 2);
        assert_eq!(users_of(&pods, "nothing"), 0);
    }

    #[test]
    fn a_broken_annotation_yields_nothing() {
        let mut p = pod("a", "p", &[], true);
        p.metadata.annotations =
            Some([(ORIGINAL_IMAGES_ANNOTATION.to_owned(), "not json".to_owned())].into());
        assert!(pod_images(&p).is_empty());
    }

    #[test]
    fn used_by_list_is_capped_but_count_exact() {
        let pods: Vec<Pod> = (0..50)
            .map(|i| pod("ns", &format!("p{i:02}"), &[("c", "nginx")], true))
            .collect();
        let u = usage(&pods);
        let used = u
            .values()
            .next()
            .map(ImageUsage::used_by)
            .unwrap_or_default();
        assert_eq!(used.count, 50);
        assert_eq!(used.pods.len(), larder_core::crd::USED_BY_CAP);
    }
}
