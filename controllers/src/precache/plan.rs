//! What the Precaches imply, as pure functions over the objects the reconciler's caches hold:
//! which `CachedImage`s are retained and what each node's `NodeCache` spec says. (Each
//! Precache's status is in [`super::status`].)

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use kube::api::ObjectMeta;
use larder_core::crd::{
    CachedImage, CachedImageSpec, NodeCache, NodeCacheImage, NodeCacheSpec, NodeImagePhase,
    NodeImageStatus, Phase, Precache, Refresh, SecretRef,
};
use larder_core::reference::Reference;
use serde_json::{Value, json};

/// The label on `CachedImage`s retained because a Precache lists them. Only labelled objects are
/// ever un-retained: an image a user retained by hand stays retained.
pub const PRECACHED_LABEL: &str = "larder.dev/precached";
/// The pull secrets the pass added to a `CachedImage`'s `spec.pullSecrets` (a JSON list), so
/// that releasing it removes exactly those and keeps any set by someone else.
pub const ADDED_SECRETS_ANNOTATION: &str = "larder.dev/precache-pull-secrets";
/// A `NodeCache` its proxy has never reported on for this long holds no place in a rolling
/// wave: the node runs no proxy with precache enabled, and must not stall every other node.
pub const SILENT_AFTER: Duration = Duration::from_secs(600);

/// One image some Precache lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The normalised reference.
    pub reference: Reference,
    /// The union of the listing Precaches' pull secrets.
    pub pull_secrets: BTreeSet<SecretRef>,
}

/// Every image the Precaches list, by `CachedImage` name; references that do not parse are
/// skipped here and reported in each Precache's status.
pub fn wanted_images<'a>(
    precaches: impl IntoIterator<Item = &'a Precache>,
) -> BTreeMap<String, Wanted> {
    let mut out: BTreeMap<String, Wanted> = BTreeMap::new();
    for pc in precaches {
        if pc.metadata.deletion_timestamp.is_some() {
            continue;
        }
        for image in &pc.spec.images {
            let Ok(reference) = Reference::parse(image) else {
                continue;
            };
            out.entry(reference.cached_image_name())
                .or_insert_with(|| Wanted {
                    reference,
                    pull_secrets: BTreeSet::new(),
                })
                .pull_secrets
                .extend(pc.spec.pull_secrets.iter().cloned());
        }
    }
    out
}

/// A write to a `CachedImage`.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageChange {
    /// A new retained object.
    Create(Box<CachedImage>),
    /// A merge patch of an existing object's metadata and spec.
    Patch { name: String, patch: Value },
}

fn is_precached(ci: &CachedImage) -> bool {
    ci.labels()
        .get(PRECACHED_LABEL)
        .is_some_and(|v| v == "true")
}

/// The pull secrets the precache pass added to `spec.pullSecrets` (not there before), as its
/// annotation records them; unreadable counts as none.
fn added_secrets(ci: &CachedImage) -> Vec<SecretRef> {
    ci.annotations()
        .get(ADDED_SECRETS_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// `spec.pullSecrets` as it should be with `wanted` from the Precaches, and the part of it the
/// Precaches added. Secrets someone else set stay first, in their order.
fn desired_secrets(
    ci: &CachedImage,
    wanted: &BTreeSet<SecretRef>,
) -> (Vec<SecretRef>, Vec<SecretRef>) {
    let added_before = added_secrets(ci);
    let mut all: Vec<SecretRef> = ci
        .spec
        .pull_secrets
        .iter()
        .filter(|s| !added_before.contains(s))
        .cloned()
        .collect();
    let added: Vec<SecretRef> = wanted
        .iter()
        .filter(|s| !all.contains(s))
        .cloned()
        .collect();
    all.extend(added.iter().cloned());
    (all, added)
}

/// The merge patch bringing an existing `CachedImage` in line with `wanted` (None: no Precache
/// lists it), or `None` when it already is.
///
/// `retain` is the pass's only when the object carries [`PRECACHED_LABEL`]: an object retained
/// by hand is never labelled and so never released. Pull secrets the Precaches add are recorded
/// in [`ADDED_SECRETS_ANNOTATION`], so releasing removes exactly those.
fn image_patch(ci: &CachedImage, wanted: Option<&Wanted>) -> Option<Value> {
    let empty = BTreeSet::new();
    let (secrets, added) = desired_secrets(ci, wanted.map_or(&empty, |w| &w.pull_secrets));
    let mut labels = serde_json::Map::new();
    let mut annotations = serde_json::Map::new();
    let mut spec = serde_json::Map::new();
    if secrets != ci.spec.pull_secrets {
        spec.insert(
            "pullSecrets".into(),
            if secrets.is_empty() {
                Value::Null
            } else {
                json!(secrets)
            },
        );
    }
    let recorded = ci.annotations().get(ADDED_SECRETS_ANNOTATION).cloned();
    let record = (!added.is_empty()).then(|| json!(added).to_string());
    if recorded != record {
        annotations.insert(ADDED_SECRETS_ANNOTATION.into(), json!(record));
    }
    match (wanted.is_some(), is_precached(ci)) {
        (true, true) if !ci.spec.retain => {
            spec.insert("retain".into(), true.into());
        }
        (true, false) if !ci.spec.retain => {
            labels.insert(PRECACHED_LABEL.into(), "true".into());
            spec.insert("retain".into(), true.into());
        }
        (false, true) => {
            labels.insert(PRECACHED_LABEL.into(), Value::Null);
            spec.insert("retain".into(), false.into());
        }
        _ => {}
    }
    let mut patch = serde_json::Map::new();
    let mut metadata = serde_json::Map::new();
    if !labels.is_empty() {
        metadata.insert("labels".into(), labels.into());
    }
    if !annotations.is_empty() {
        metadata.insert("annotations".into(), annotations.into());
    }
    if !metadata.is_empty() {
        patch.insert("metadata".into(), metadata.into());
    }
    if !spec.is_empty() {
        patch.insert("spec".into(), spec.into());
    }
    (!patch.is_empty()).then(|| patch.into())
}

/// The writes that make the `CachedImage`s match `wanted`: create what is missing, retain and
/// label what is listed, release what no Precache lists any more. Nothing when all agree.
pub fn image_changes<'a>(
    wanted: &BTreeMap<String, Wanted>,
    existing: impl IntoIterator<Item = &'a CachedImage>,
) -> Vec<ImageChange> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for ci in existing {
        let name = ci.name_any();
        seen.insert(name.clone());
        if ci.metadata.deletion_timestamp.is_some() {
            // Going away; the next pass after it is gone creates it again if still wanted.
            continue;
        }
        if let Some(patch) = image_patch(ci, wanted.get(&name)) {
            out.push(ImageChange::Patch { name, patch });
        }
    }
    for (name, w) in wanted {
        if seen.contains(name) {
            continue;
        }
        out.push(ImageChange::Create(Box::new(CachedImage {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(PRECACHED_LABEL.to_owned(), "true".to_owned())].into()),
                annotations: (!w.pull_secrets.is_empty()).then(|| {
                    [(
                        ADDED_SECRETS_ANNOTATION.to_owned(),
                        json!(w.pull_secrets).to_string(),
                    )]
                    .into()
                }),
                ..ObjectMeta::default()
            },
            spec: CachedImageSpec {
                retain: true,
                pull_secrets: w.pull_secrets.iter().cloned().collect(),
                ..CachedImageSpec::new(w.reference.to_string())
            },
            status: None,
        })));
    }
    out
}

/// The node's platform as `os/architecture[/variant]`: from `status.nodeInfo`, else from the
/// well-known labels, else `linux/amd64`.
pub fn node_platform(node: &Node) -> String {
    let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
    let label = |key: &str| node.labels().get(key).cloned();
    let os = info
        .map(|i| i.operating_system.clone())
        .filter(|s| !s.is_empty())
        .or_else(|| label("kubernetes.io/os"))
        .unwrap_or_else(|| "linux".into());
    let arch = info
        .map(|i| i.architecture.clone())
        .filter(|s| !s.is_empty())
        .or_else(|| label("kubernetes.io/arch"))
        .unwrap_or_else(|| "amd64".into());
    match arch.as_str() {
        // What containerd picks on these nodes when an index offers variants.
        "arm64" => format!("{os}/arm64/v8"),
        "arm" => format!("{os}/arm/v7"),
        _ => format!("{os}/{arch}"),
    }
}

/// Whether the Precache puts its images on `node`: `nodeSelector` absent selects none, `{}` all.
pub fn selects(pc: &Precache, node: &Node) -> bool {
    let Some(selector) = &pc.spec.node_selector else {
        return false;
    };
    let labels = node.labels();
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The images a Precache lists, normalised, in spec order, without duplicates.
pub fn precache_references(pc: &Precache) -> Vec<Reference> {
    let mut seen = BTreeSet::new();
    pc.spec
        .images
        .iter()
        .filter_map(|i| Reference::parse(i).ok())
        .filter(|r| seen.insert(r.cached_image_name()))
        .collect()
}

pub(crate) fn node_image_phases(nc: Option<&NodeCache>) -> BTreeMap<&str, &NodeImageStatus> {
    nc.and_then(|n| n.status.as_ref())
        .map(|s| s.images.iter().map(|i| (i.image.as_str(), i)).collect())
        .unwrap_or_default()
}

/// Whether `node`'s current NodeCache spec already carries `precache`'s images (it was admitted
/// into the Precache's rolling wave earlier).
pub(crate) fn admitted(nc: Option<&NodeCache>, precache: &str) -> bool {
    nc.is_some_and(|n| {
        n.spec
            .images
            .iter()
            .any(|i| i.precaches.iter().any(|p| p == precache))
    })
}

/// Whether the node's proxy never reported on its `NodeCache` (no `status.updated`), created
/// over [`SILENT_AFTER`] ago.
pub(crate) fn silent(nc: Option<&NodeCache>, now: Timestamp) -> bool {
    nc.is_some_and(|n| {
        // The controller's own `status.gate` is no report: the proxy always sets `updated`.
        n.status.as_ref().is_none_or(|s| s.updated.is_none())
            && n.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| crate::policy::until(t.0, now) >= SILENT_AFTER)
    })
}

/// Whether the node holds a place in `precache`'s rolling wave: admitted, some of `refs` neither
/// `Ready` nor `Failed` there (a failing node retries with backoff and must not stall the rest),
/// and its proxy not [`silent`].
fn in_wave(nc: Option<&NodeCache>, precache: &str, refs: &[Reference], now: Timestamp) -> bool {
    if !admitted(nc, precache) || silent(nc, now) {
        return false;
    }
    let phases = node_image_phases(nc);
    !refs.iter().all(|r| {
        phases
            .get(r.to_string().as_str())
            .is_some_and(|s| matches!(s.phase, NodeImagePhase::Ready | NodeImagePhase::Failed))
    })
}

/// The NodeCache spec every node should have (nodes absent from the result should have none).
///
/// `maxConcurrent.nodes` is a rolling wave: a selected node is admitted into a Precache (gets
/// its images) only while fewer than that many admitted nodes are still working on them (see
/// [`in_wave`]), so a new Precache never sends every node to the cache registry at once. Once
/// admitted, a node keeps the images. A node the Precache's readiness gate holds (it carries
/// the startup taint) is admitted at once, whatever the wave. `fired` names the Precaches whose schedule fired this
/// pass: their nodes' `epoch` rises, so proxies re-check everything.
///
/// Digests follow the `CachedImage` (`Ready` only) unless a listing Precache pins the one the
/// node already has: `Never` always, `OnSchedule` except when its schedule fires. A pin wins
/// over a Precache that follows the tag.
pub fn node_specs<'a>(
    precaches: &[&'a Precache],
    nodes: &[&'a Node],
    images: &BTreeMap<String, &'a CachedImage>,
    current: &BTreeMap<String, &'a NodeCache>,
    fired: &BTreeSet<String>,
    now: Timestamp,
) -> BTreeMap<String, NodeCacheSpec> {
    // node → precache names admitted, in name order
    let mut admitted_to: BTreeMap<String, Vec<&Precache>> = BTreeMap::new();
    let mut sorted: Vec<&Precache> = precaches
        .iter()
        .copied()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    sorted.sort_by_key(|p| p.name_any());
    for pc in &sorted {
        let name = pc.name_any();
        let refs = precache_references(pc);
        if refs.is_empty() {
            continue;
        }
        let mut selected: Vec<&Node> = nodes.iter().copied().filter(|n| selects(pc, n)).collect();
        selected.sort_by_key(|n| n.name_any());
        let limit = pc.spec.max_concurrent.nodes.max(1) as usize;
        let mut in_progress = selected
            .iter()
            .filter(|n| in_wave(current.get(&n.name_any()).copied(), &name, &refs, now))
            .count();
        for node in selected {
            let nc = current.get(&node.name_any()).copied();
            // A node held by this Precache's readiness gate is out of service until it has
            // the images: it never waits for a place in the wave.
            let gated =
                pc.spec.readiness_gate.is_some() && super::gate::taint_index(node).is_some();
            let admit = if admitted(nc, &name) {
                true
            } else if gated || in_progress < limit {
                in_progress += 1;
                true
            } else {
                false
            };
            if admit {
                admitted_to.entry(node.name_any()).or_default().push(pc);
            }
        }
    }
    let mut out = BTreeMap::new();
    for node in nodes {
        let node_name = node.name_any();
        let Some(pcs) = admitted_to.get(&node_name) else {
            continue;
        };
        let nc = current.get(&node_name).copied();
        let pinned: BTreeMap<&str, &str> = nc
            .map(|n| {
                n.spec
                    .images
                    .iter()
                    .filter_map(|i| Some((i.image.as_str(), i.digest.as_deref()?)))
                    .collect()
            })
            .unwrap_or_default();
        let mut entries: BTreeMap<String, NodeCacheImage> = BTreeMap::new();
        let mut pins: BTreeMap<String, String> = BTreeMap::new();
        for pc in pcs {
            let pc_name = pc.name_any();
            for r in precache_references(pc) {
                let image = r.to_string();
                let pin = match pc.spec.refresh {
                    Refresh::Never => true,
                    Refresh::OnSchedule => !fired.contains(&pc_name),
                    Refresh::Always => false,
                };
                if let Some(d) = pinned.get(image.as_str()).filter(|_| pin) {
                    pins.insert(image.clone(), (*d).to_owned());
                }
                entries
                    .entry(image.clone())
                    .or_insert_with(|| NodeCacheImage {
                        digest: images
                            .get(&r.cached_image_name())
                            .and_then(|ci| ci.status.as_ref())
                            .filter(|s| s.phase == Some(Phase::Ready))
                            .and_then(|s| s.digest.clone()),
                        image,
                        precaches: Vec::new(),
                    })
                    .precaches
                    .push(pc_name.clone());
            }
        }
        for e in entries.values_mut() {
            if let Some(pin) = pins.remove(&e.image) {
                e.digest = Some(pin);
            }
            e.precaches.sort();
            e.precaches.dedup();
        }
        let epoch = nc.map_or(0, |n| n.spec.epoch)
            + u64::from(pcs.iter().any(|p| fired.contains(&p.name_any())));
        out.insert(
            node_name,
            NodeCacheSpec {
                platform: node_platform(node),
                max_concurrent: pcs
                    .iter()
                    .map(|p| p.spec.max_concurrent.per_node.max(1))
                    .min()
                    .unwrap_or(1),
                epoch,
                images: entries.into_values().collect(),
            },
        );
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests;
