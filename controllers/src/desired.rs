//! Which `CachedImage`s the pod set implies, and which pods use each one. Pure functions over
//! pods (usually the contents of a reflector store), so they are tested without a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use larder_core::crd::{SecretRef, UsedBy};
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

/// Reduces a watched pod to what the controllers read (labels, annotations, phase, namespace,
/// and the names of its `imagePullSecrets`, the credentials of private images), so the pod
/// cache of a large cluster stays small. Pods without pull secrets keep no spec at all.
pub fn trim_pod(pod: &mut Pod) {
    let pull_secrets = pod
        .spec
        .take()
        .and_then(|s| s.image_pull_secrets)
        .map(|refs| {
            refs.into_iter()
                .filter(|r| !r.name.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|refs| !refs.is_empty());
    pod.spec = pull_secrets.map(|refs| PodSpec {
        image_pull_secrets: Some(refs),
        ..PodSpec::default()
    });
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.generate_name = None;
    meta.creation_timestamp = None;
    meta.finalizers = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|k, _| k == MANAGED_LABEL);
    }
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|k, _| k == ORIGINAL_IMAGES_ANNOTATION);
    }
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
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

/// How many managed pods using the `CachedImage` called `name` have not started yet (phase
/// `Pending`): their nodes are still pulling it. (The API server gives every pod a phase; one
/// without is not counted, so a client that writes none never delays a copy.)
pub fn pulling_users_of<'a>(pods: impl IntoIterator<Item = &'a Pod>, name: &str) -> usize {
    pods.into_iter()
        .filter(|p| is_managed(p))
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            phase == Some("Pending")
        })
        .filter(|p| pod_images(p).iter().any(|r| r.cached_image_name() == name))
        .count()
}

/// The pull Secrets of the unfinished managed pods using the `CachedImage` called `name`
/// (each `namespace/name` once, sorted): where a private image's credentials are. Walks every
/// pod, so it is called only once the origin has refused anonymous access.
pub fn pull_secrets_of<'a>(pods: impl IntoIterator<Item = &'a Pod>, name: &str) -> Vec<SecretRef> {
    let mut out: Vec<SecretRef> = pods
        .into_iter()
        .filter(|p| is_managed(p) && needs_images(p))
        .filter(|p| {
            p.spec
                .as_ref()
                .is_some_and(|s| s.image_pull_secrets.as_ref().is_some_and(|r| !r.is_empty()))
        })
        .filter(|p| pod_images(p).iter().any(|r| r.cached_image_name() == name))
        .flat_map(pull_secret_refs)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The Secrets a pod's `imagePullSecrets` name, in its namespace (none for a pod without one).
pub fn pull_secret_refs(pod: &Pod) -> impl Iterator<Item = SecretRef> + '_ {
    let namespace = pod.metadata.namespace.as_deref().filter(|n| !n.is_empty());
    namespace.into_iter().flat_map(move |namespace| {
        pod.spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
            .filter(|r| !r.name.is_empty())
            .map(move |r| SecretRef {
                namespace: namespace.to_owned(),
                name: r.name.clone(),
            })
    })
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
    fn trimmed_pods_keep_exactly_what_usage_reads() {
        let mut p = pod("a", "p", &[("app", "nginx:1.27")], true);
        let meta = &mut p.metadata;
        meta.labels
            .get_or_insert_default()
            .insert("app.kubernetes.io/name".into(), "web".into());
        meta.annotations
            .get_or_insert_default()
            .insert("big".into(), "x".repeat(1024));
        meta.generate_name = Some("p-".into());
        meta.finalizers = Some(vec!["f".into()]);
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec::default());
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.1".into()),
            ..PodStatus::default()
        });
        let before_usage = usage([&p]);
        trim_pod(&mut p);
        assert_eq!(usage([&p]), before_usage);
        assert!(is_managed(&p) && needs_images(&p));
        let labels = p.metadata.labels.as_ref().map(|l| l.len());
        let annotations = p.metadata.annotations.as_ref().map(|a| a.len());
        assert_eq!((labels, annotations), (Some(1), Some(1)));
        assert!(p.spec.is_none(), "no pull secrets: no spec kept");
        assert!(p.metadata.generate_name.is_none());
        assert!(p.metadata.finalizers.is_none());
        let status = p
            .status
            .as_ref()
            .map(|s| (s.phase.clone(), s.pod_ip.clone()));
        assert_eq!(status, Some((Some("Running".into()), None)));
    }

    pub(crate) fn with_pull_secrets(mut p: Pod, names: &[&str]) -> Pod {
        p.spec = Some(PodSpec {
            image_pull_secrets: Some(
                names
                    .iter()
                    .map(|n| k8s_openapi::api::core::v1::LocalObjectReference {
                        name: (*n).to_owned(),
                    })
                    .collect(),
            ),
            ..PodSpec::default()
        });
        p
    }

    #[test]
    fn trimmed_pods_keep_only_their_pull_secret_names() {
        let mut p = with_pull_secrets(
            pod("ns", "p", &[("c", "ghcr.io/org/app:1")], true),
            &["regcred", ""],
        );
        if let Some(spec) = p.spec.as_mut() {
            spec.containers = vec![k8s_openapi::api::core::v1::Container {
                name: "c".into(),
                image: Some("localhost:7439/ghcr.io/org/app:1".into()),
                ..Default::default()
            }];
            spec.node_name = Some("node-1".into());
        }
        trim_pod(&mut p);
        let spec = p.spec.clone().unwrap_or_default();
        assert!(spec.containers.is_empty() && spec.node_name.is_none());
        assert_eq!(
            spec.image_pull_secrets.map(|r| r.len()),
            Some(1),
            "only the named secret"
        );
        assert_eq!(p.metadata.namespace.as_deref(), Some("ns"));
        let name = Reference::parse("ghcr.io/org/app:1")
            .unwrap_or_else(|e| panic!("{e}"))
            .cached_image_name();
        assert_eq!(
            pull_secrets_of([&p], &name),
            [SecretRef {
                namespace: "ns".into(),
                name: "regcred".into()
            }]
        );
    }

    #[test]
    fn pull_secrets_come_from_the_pods_using_the_image_only() {
        let app = Reference::parse("ghcr.io/org/app:1").unwrap_or_else(|e| panic!("{e}"));
        let mut done = with_pull_secrets(
            pod("c", "done", &[("c", "ghcr.io/org/app:1")], true),
            &["old"],
        );
        done.status = Some(PodStatus {
            phase: Some("Failed".into()),
            ..PodStatus::default()
        });
        let pods = [
            with_pull_secrets(
                pod("b", "p1", &[("c", "ghcr.io/org/app:1")], true),
                &["s2", "s1"],
            ),
            with_pull_secrets(pod("a", "p2", &[("c", "ghcr.io/org/app:1")], true), &["s1"]),
            with_pull_secrets(pod("b", "p3", &[("c", "ghcr.io/org/app:1")], true), &["s1"]),
            with_pull_secrets(
                pod("a", "other", &[("c", "nginx")], true),
                &["nginx-secret"],
            ),
            with_pull_secrets(
                pod("a", "unmanaged", &[("c", "ghcr.io/org/app:1")], false),
                &["x"],
            ),
            pod("a", "no-secrets", &[("c", "ghcr.io/org/app:1")], true),
            done,
        ];
        let got: Vec<String> = pull_secrets_of(&pods, &app.cached_image_name())
            .iter()
            .map(|r| format!("{}/{}", r.namespace, r.name))
            .collect();
        assert_eq!(got, ["a/s1", "b/s1", "b/s2"]);
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
    fn pods_not_started_are_the_ones_pulling() {
        use k8s_openapi::api::core::v1::PodStatus;
        let with_phase = |name: &str, phase: Option<&str>| {
            let mut p = pod("ns", name, &[("c", "nginx")], true);
            p.status = phase.map(|ph| PodStatus {
                phase: Some(ph.into()),
                ..PodStatus::default()
            });
            p
        };
        let pods = [
            with_phase("new", None),
            with_phase("pending", Some("Pending")),
            with_phase("running", Some("Running")),
            with_phase("done", Some("Succeeded")),
            pod("ns", "unmanaged", &[("c", "nginx")], false),
        ];
        let nginx = Reference::parse("nginx").unwrap().cached_image_name();
        assert_eq!(pulling_users_of(&pods, &nginx), 1);
        assert_eq!(pulling_users_of(&pods, "other"), 0);
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
