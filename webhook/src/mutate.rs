//! The pod mutation, as pure functions: a pod and the configuration in, JSON-patch operations
//! and one decision per image out. Nothing here does I/O, so every case is a table test.
//!
//! For each container, init container and ephemeral container whose image should go through
//! the node proxy, the image is replaced by its rewritten form; the originals are recorded in
//! the annotation [`ORIGINAL_IMAGES_ANNOTATION`] (a JSON object: container name → image as
//! written; `init:<name>` and `ephemeral:<name>` for the other lists) and the pod gets the label
//! [`MANAGED_LABEL`]`=true`. A pod with nothing to rewrite gets no patch at all, which also makes
//! the mutation idempotent: its own output has every image on the proxy already.
//!
//! A pod with `imagePullSecrets` needs credentials for the rewritten images too (kubelet looks
//! them up by the image as written). [`PullSecretPlan`] says whether the webhook has them: with
//! [`PullSecretPlan::Unresolved`] (the `skip` mode, or `derive` before the Secrets are read) such
//! a pod is not rewritten at all, each image that would have been counted as
//! [`Skip::PullSecrets`]; with [`PullSecretPlan::Derived`] it is rewritten and the derived
//! Secret is appended to its `imagePullSecrets` (see [`crate::pull_secrets`]).

use std::collections::{BTreeMap, BTreeSet};

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation, ReplaceOperation};
use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;
use larder_core::reference::{self, Reference};
use serde_json::Value;

use crate::exclude::Exclusions;
use crate::pull_secrets::PullSecretsMode;

/// Annotation holding the original images (JSON object, container key → image as written).
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "larder.dev/original-images";
/// Label marking pods whose images were rewritten.
pub const MANAGED_LABEL: &str = "larder.dev/managed";
/// Annotation the kubelet puts on mirror pods of static pods; those are never touched, the
/// kubelet runs the static manifest, not what the apiserver stores.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the mutation needs to know.
#[derive(Debug, Clone)]
pub struct MutationConfig {
    /// The node proxy's address, lowercase (`localhost:7439`).
    pub proxy_address: String,
    /// Images to leave alone.
    pub exclude: Exclusions,
    /// What to do with pods that have `imagePullSecrets`.
    pub pull_secrets: PullSecretsMode,
}

/// What the mutation knows about credentials for the rewritten images of a pod that has
/// `imagePullSecrets`. Pods without pull secrets are rewritten the same whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullSecretPlan<'a> {
    /// Not known: leave the pod unrewritten (its images may be private, and kubelet would find
    /// no credentials for the proxy address).
    Unresolved,
    /// The pod's pull secrets hold no credentials kubelet would use: rewrite as if it had none.
    NoneNeeded,
    /// This Secret holds the credentials keyed for the proxy: rewrite and add it to the pod.
    Derived(&'a str),
}

/// Which part of the pod a request may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A pod being created: every container list, plus the annotation and label.
    Create,
    /// An update of the `ephemeralcontainers` subresource: only ephemeral containers that are
    /// not in the old pod (existing ones cannot be changed; trying would fail the request).
    /// No annotation or label: on this subresource the apiserver keeps the old metadata, so
    /// the change would be dropped; the rewritten image itself names its origin.
    EphemeralContainersUpdate {
        /// Names of the ephemeral containers the pod already had.
        existing: BTreeSet<String>,
    },
}

/// The three container lists of a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContainerKind {
    /// `spec.containers`
    Container,
    /// `spec.initContainers`
    Init,
    /// `spec.ephemeralContainers`
    Ephemeral,
}

impl ContainerKind {
    /// The field of the pod spec holding this list.
    pub fn field(self) -> &'static str {
        match self {
            ContainerKind::Container => "containers",
            ContainerKind::Init => "initContainers",
            ContainerKind::Ephemeral => "ephemeralContainers",
        }
    }

    /// The key of a container of this kind in the original-images annotation.
    pub fn annotation_key(self, name: &str) -> String {
        match self {
            ContainerKind::Container => name.to_owned(),
            ContainerKind::Init => format!("init:{name}"),
            ContainerKind::Ephemeral => format!("ephemeral:{name}"),
        }
    }
}

/// Why an image was left as it is. Each has a fixed metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// The container has no image (only valid in templates, but never trust input).
    NoImage,
    /// `imagePullPolicy: Never`: the image must already be on the node under this name.
    PullPolicyNever,
    /// Already on the proxy (our own earlier output, or written that way).
    OnProxy,
    /// Matches an `--exclude-image` pattern.
    Excluded,
    /// Not a valid image reference; the kubelet will report it, we do not guess.
    InvalidReference,
    /// The registry is on the node itself (`localhost`, 127.0.0.0/8, `::1`).
    Loopback,
    /// Cannot be expressed on the proxy (IPv6 literal host, name too long).
    NotRewritable,
    /// The pod is a static pod's mirror.
    MirrorPod,
    /// The pod has `imagePullSecrets` and the webhook has no credentials for the proxy address
    /// (`--pull-secrets skip`, or a pull Secret could not be carried over).
    PullSecrets,
}

impl Skip {
    /// Every reason, for metrics that show each one from the start.
    pub const ALL: [Skip; 9] = [
        Skip::NoImage,
        Skip::PullPolicyNever,
        Skip::OnProxy,
        Skip::Excluded,
        Skip::InvalidReference,
        Skip::Loopback,
        Skip::NotRewritable,
        Skip::MirrorPod,
        Skip::PullSecrets,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Skip::NoImage => "no_image",
            Skip::PullPolicyNever => "pull_policy_never",
            Skip::OnProxy => "on_proxy",
            Skip::Excluded => "excluded",
            Skip::InvalidReference => "invalid_reference",
            Skip::Loopback => "loopback",
            Skip::NotRewritable => "not_rewritable",
            Skip::MirrorPod => "mirror_pod",
            Skip::PullSecrets => "pull_secrets",
        }
    }
}

/// What happens to one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replaced by this reference on the proxy.
    Rewritten(String),
    /// Left alone, for this reason.
    Skipped(Skip),
}

/// The decision for one container's image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDecision {
    /// Which list the container is in.
    pub kind: ContainerKind,
    /// The container's name.
    pub container: String,
    /// The image as written, if any.
    pub image: Option<String>,
    /// What happens to it.
    pub action: Action,
    /// Why, when the reason needs more than the [`Skip`] (e.g. the parse error).
    pub detail: Option<String>,
}

/// The mutation of one pod.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mutation {
    /// JSON-patch operations; empty when nothing is rewritten.
    pub patch: Vec<PatchOperation>,
    /// One decision per container in scope.
    pub images: Vec<ImageDecision>,
    /// Things worth a log line that did not stop the mutation.
    pub notes: Vec<String>,
}

impl Mutation {
    /// How many images are rewritten.
    pub fn rewritten(&self) -> usize {
        self.images
            .iter()
            .filter(|d| matches!(d.action, Action::Rewritten(_)))
            .count()
    }
}

/// Decides what happens to one image; the second value is the detail for skips that need one
/// (the parse or rewrite error).
pub fn decide(
    image: Option<&str>,
    pull_policy: Option<&str>,
    config: &MutationConfig,
) -> (Action, Option<String>) {
    let skip = |s| (Action::Skipped(s), None);
    let Some(image) = image.filter(|i| !i.is_empty()) else {
        return skip(Skip::NoImage);
    };
    if pull_policy == Some("Never") {
        return skip(Skip::PullPolicyNever);
    }
    if reference::is_on_proxy(image, &config.proxy_address) {
        return skip(Skip::OnProxy);
    }
    if config.exclude.matches(image) {
        return skip(Skip::Excluded);
    }
    let parsed = match Reference::parse(image) {
        Ok(r) => r,
        Err(e) => return (Action::Skipped(Skip::InvalidReference), Some(e.to_string())),
    };
    if config.exclude.matches(&parsed.to_string()) {
        return skip(Skip::Excluded);
    }
    if parsed.is_loopback_registry() {
        return skip(Skip::Loopback);
    }
    match parsed.rewrite(&config.proxy_address) {
        Ok(rewritten) => (Action::Rewritten(rewritten), None),
        Err(e) => (Action::Skipped(Skip::NotRewritable), Some(e.to_string())),
    }
}

/// The mutation of `pod` within `scope`; `pull` matters only when the pod has
/// `imagePullSecrets`.
pub fn mutate(
    pod: &Pod,
    scope: &Scope,
    config: &MutationConfig,
    pull: PullSecretPlan<'_>,
) -> Mutation {
    let pull_secrets = pull_secret_names(pod);
    // Whether the credentials for rewritten images will be there when kubelet pulls.
    let (covered, add_secret) = match pull {
        _ if pull_secrets.is_empty() => (true, None),
        PullSecretPlan::Unresolved => (false, None),
        PullSecretPlan::NoneNeeded => (true, None),
        PullSecretPlan::Derived(name) if pull_secrets.contains(&name) => (true, None),
        // The ephemeralcontainers subresource cannot change imagePullSecrets (the apiserver
        // keeps the old spec apart from the ephemeral containers), so a Secret the pod does
        // not already list would never reach kubelet.
        PullSecretPlan::Derived(_) if *scope != Scope::Create => (false, None),
        PullSecretPlan::Derived(name) => (true, Some(name)),
    };
    let mirror = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION));
    let mut m = Mutation::default();
    let mut originals = BTreeMap::new();
    for container in containers(pod) {
        let in_scope = match scope {
            Scope::Create => true,
            Scope::EphemeralContainersUpdate { existing } => {
                container.kind == ContainerKind::Ephemeral && !existing.contains(container.name)
            }
        };
        if !in_scope {
            continue;
        }
        let (action, detail) = if mirror {
            (Action::Skipped(Skip::MirrorPod), None)
        } else {
            decide(container.image, container.pull_policy, config)
        };
        let action = match action {
            Action::Rewritten(_) if !covered => Action::Skipped(Skip::PullSecrets),
            other => other,
        };
        if let (Action::Rewritten(new), Some(old)) = (&action, container.image) {
            m.patch.push(PatchOperation::Replace(ReplaceOperation {
                path: image_path(container.kind, container.index),
                value: Value::String(new.clone()),
            }));
            originals.insert(
                container.kind.annotation_key(container.name),
                old.to_owned(),
            );
        }
        m.images.push(ImageDecision {
            kind: container.kind,
            container: container.name.to_owned(),
            image: container.image.map(str::to_owned),
            action,
            detail,
        });
    }
    if !originals.is_empty() && *scope == Scope::Create {
        record_originals(&pod.metadata, originals, &mut m);
        label_managed(&pod.metadata, &mut m);
        if let Some(name) = add_secret {
            // The list exists and is not empty (the pod has pull secrets), so `-` appends; the
            // originals stay for the images that are not rewritten.
            m.patch.push(PatchOperation::Add(AddOperation {
                path: PointerBuf::from_tokens(["spec", "imagePullSecrets", "-"]),
                value: serde_json::json!({ "name": name }),
            }));
        }
    }
    m
}

/// The names in `spec.imagePullSecrets`, in order, without empty ones.
pub fn pull_secret_names(pod: &Pod) -> Vec<&str> {
    pod.spec
        .iter()
        .flat_map(|s| s.image_pull_secrets.iter().flatten())
        .map(|r| r.name.as_str())
        .filter(|n| !n.is_empty())
        .collect()
}

struct ContainerRef<'a> {
    kind: ContainerKind,
    index: usize,
    name: &'a str,
    image: Option<&'a str>,
    pull_policy: Option<&'a str>,
}

fn containers(pod: &Pod) -> Vec<ContainerRef<'_>> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let lists = [
        (ContainerKind::Container, Some(&spec.containers)),
        (ContainerKind::Init, spec.init_containers.as_ref()),
    ];
    for (kind, list) in lists {
        for (index, c) in list.into_iter().flatten().enumerate() {
            out.push(ContainerRef {
                kind,
                index,
                name: &c.name,
                image: c.image.as_deref(),
                pull_policy: c.image_pull_policy.as_deref(),
            });
        }
    }
    for (index, c) in spec.ephemeral_containers.iter().flatten().enumerate() {
        out.push(ContainerRef {
            kind: ContainerKind::Ephemeral,
            index,
            name: &c.name,
            image: c.image.as_deref(),
            pull_policy: c.image_pull_policy.as_deref(),
        });
    }
    out
}

fn image_path(kind: ContainerKind, index: usize) -> PointerBuf {
    let mut path = PointerBuf::from_tokens(["spec", kind.field()]);
    path.push_back(index);
    path.push_back("image");
    path
}

/// Merges `originals` into the annotation, keeping entries already there (a reinvocation after
/// another webhook added a container must not forget the first pass).
fn record_originals(meta: &ObjectMeta, originals: BTreeMap<String, String>, m: &mut Mutation) {
    let annotations = meta.annotations.as_ref();
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    if let Some(existing) = annotations.and_then(|a| a.get(ORIGINAL_IMAGES_ANNOTATION)) {
        match serde_json::from_str(existing) {
            Ok(previous) => merged = previous,
            Err(e) => m.notes.push(format!(
                "replacing unreadable {ORIGINAL_IMAGES_ANNOTATION} annotation: {e}"
            )),
        }
    }
    merged.extend(originals);
    let value = Value::Object(
        merged
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect(),
    )
    .to_string();
    m.patch.push(set_map_entry(
        "annotations",
        annotations.is_some(),
        ORIGINAL_IMAGES_ANNOTATION,
        value,
    ));
}

fn label_managed(meta: &ObjectMeta, m: &mut Mutation) {
    let labels = meta.labels.as_ref();
    if labels
        .and_then(|l| l.get(MANAGED_LABEL))
        .map(String::as_str)
        == Some("true")
    {
        return;
    }
    m.patch.push(set_map_entry(
        "labels",
        labels.is_some(),
        MANAGED_LABEL,
        "true".to_owned(),
    ));
}

/// Sets `metadata.<map>[key]`. JSON-patch `add` needs the parent to exist, so a missing map is
/// added whole; an existing one gets the key (`add` replaces a member that is already there).
/// The key goes through the pointer's token escaping (`/` → `~1`), never string formatting.
fn set_map_entry(map: &str, map_exists: bool, key: &str, value: String) -> PatchOperation {
    if map_exists {
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", map, key]),
            value: Value::String(value),
        })
    } else {
        let mut object = serde_json::Map::new();
        object.insert(key.to_owned(), Value::String(value));
        PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["metadata", map]),
            value: Value::Object(object),
        })
    }
}

#[cfg(test)]
mod tests;
