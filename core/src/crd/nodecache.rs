//! The `NodeCache` custom resource: what one node's proxy should hold on its disk, and how far it
//! got. One object per node, named after the node.
//!
//! The split is deliberate: the controller writes `spec` (a pure function of the `Precache`s, the
//! nodes' labels and the concurrency limits), the node's proxy writes only `status`. So each node
//! writes only its own object, the proxy needs no right to read Nodes, Precaches or Secrets, and
//! the controller reads every node's progress from one watch.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The images one node's proxy is asked to hold.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "larder.dev",
    version = "v1alpha1",
    kind = "NodeCache",
    plural = "nodecaches",
    shortname = "nc",
    category = "larder",
    status = "NodeCacheStatus",
    derive = "PartialEq",
    doc = "The images one node's larder proxy keeps on its disk, written by the controller from Precaches.",
    printcolumn(name = "Platform", type_ = "string", json_path = ".spec.platform"),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.imagesReady",
        description = "Images the node holds"
    ),
    printcolumn(
        name = "Bytes",
        type_ = "integer",
        json_path = ".status.bytesDone",
        description = "Bytes downloaded"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeCacheSpec {
    /// The node's platform, `os/architecture[/variant]` (e.g. `linux/arm64/v8`): the child of a
    /// multi-platform index the proxy downloads.
    pub platform: String,
    /// Images downloaded at once on this node.
    #[schemars(range(min = 1))]
    pub max_concurrent: u32,
    /// Raised by the controller when a schedule fires: the proxy re-resolves tags and re-checks
    /// that every blob is still on its disk (the disk tier evicts by recency).
    #[serde(default)]
    pub epoch: u64,
    /// What to hold, sorted by image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<NodeCacheImage>,
}

/// One image a node should hold.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCacheImage {
    /// The normalised reference (`docker.io/library/nginx:1.27`).
    pub image: String,
    /// The digest the cache registry holds for it, when known: the proxy downloads that manifest
    /// (so every node ends up with the same content) and records the tag as pointing at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The Precaches asking for it, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub precaches: Vec<String>,
}

/// What the node's proxy reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCacheStatus {
    /// The `metadata.generation` of the spec last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The spec `epoch` last acted on.
    #[serde(default)]
    pub observed_epoch: u64,
    /// One entry per spec image, sorted by image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<NodeImageStatus>,
    /// Images in phase `Ready`.
    #[serde(default)]
    pub images_ready: u32,
    /// Bytes downloaded over all images.
    #[serde(default)]
    pub bytes_done: u64,
    /// When the proxy last wrote this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
    /// The readiness gate on this node, written by the controller (the proxy never sends this
    /// field, so its merge patches leave it alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<NodeGateStatus>,
}

/// Where the node's readiness gate stands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeGateStatus {
    /// `Holding` (the taint stays), `Complete` (removed: every image on disk) or `TimedOut`
    /// (removed at the timeout with images missing).
    pub state: String,
    /// The gating Precaches, sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub precaches: Vec<String>,
    /// Holding: when the timeout removes the taint. Otherwise: when it was removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// What it waits for, or what was missing at the timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One image on one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeImageStatus {
    /// The reference, as in the spec.
    pub image: String,
    /// Where the download stands.
    pub phase: NodeImagePhase,
    /// The manifest digest held (the platform's manifest, not the index).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Bytes downloaded so far (blobs already on disk count as done).
    #[serde(default)]
    pub bytes_done: u64,
    /// Bytes of the platform's manifest, config and layers, once the manifest is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Where one image stands on one node.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
pub enum NodeImagePhase {
    /// Waiting for a download slot (or for the node's proxy to start).
    Pending,
    /// Downloading.
    Caching,
    /// Every blob of the node's platform is on the node's disk.
    Ready,
    /// The last attempt failed; `reason` says why, the proxy retries with backoff.
    Failed,
}

impl NodeImagePhase {
    /// The name as it appears in the resource and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeImagePhase::Pending => "Pending",
            NodeImagePhase::Caching => "Caching",
            NodeImagePhase::Ready => "Ready",
            NodeImagePhase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for NodeImagePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
