//! The `Precache` custom resource: images to cache before any workload asks for them, in the
//! cache registry and, where a node selector says so, on the nodes' proxy disks.
//!
//! The controller turns each listed image into a retained `CachedImage` (the cluster level) and
//! writes, per selected node, a [`NodeCache`](super::NodeCache) saying which images that node's
//! proxy should hold (the node level). Proxies report progress on their own `NodeCache`, one
//! object per node, and the controller folds those reports into this object's status at a
//! bounded rate: a thousand nodes never write to one object.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Phase, SecretRef};
use crate::crd::NodeImagePhase;

/// How many images one `Precache` may list: each becomes a `CachedImage` and an entry on every
/// selected node's `NodeCache`, so the list is bounded to keep those objects small.
pub const PRECACHE_MAX_IMAGES: usize = 256;

/// What to cache, where, when and how fast.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "larder.dev",
    version = "v1alpha1",
    kind = "Precache",
    plural = "precaches",
    shortname = "pc",
    category = "larder",
    status = "PrecacheStatus",
    derive = "PartialEq",
    doc = "Images larder caches ahead of need: in the cache registry and on the selected nodes.",
    printcolumn(
        name = "Images",
        type_ = "string",
        json_path = ".status.imagesSummary",
        description = "Images ready in the cache registry / listed"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.nodesSummary",
        description = "Nodes holding every image / selected"
    ),
    printcolumn(
        name = "Schedule",
        type_ = "string",
        json_path = ".spec.schedule",
        priority = "1"
    ),
    printcolumn(
        name = "Last Run",
        type_ = "date",
        json_path = ".status.lastScheduleTime",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PrecacheSpec {
    /// Image references, as a pod would name them (`nginx:1.27`, `ghcr.io/org/app@sha256:…`).
    #[schemars(length(max = PRECACHE_MAX_IMAGES))]
    pub images: Vec<String>,
    /// A five-field cron expression in UTC (`0 3 * * *`): when it fires, tags are re-resolved
    /// against their origins and every selected node re-checks that it holds every image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Which nodes also get the images on their proxy's disk, by node labels. Absent: the cache
    /// registry only. Empty (`{}`): every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Concurrency limits.
    #[serde(default)]
    pub max_concurrent: MaxConcurrent,
    /// When tags are re-resolved.
    #[serde(default)]
    pub refresh: Refresh,
    /// `kubernetes.io/dockerconfigjson` Secrets holding credentials for private images.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<SecretRef>,
    /// Hold new nodes out of scheduling until these images are on their disks: a selected node
    /// that carries the startup taint `larder.dev/precache-pending:NoSchedule` keeps it until
    /// every image of every gating Precache selecting it is Ready on that node, or until the
    /// timeout. Needs the controller's `--readiness-gate` (chart: `controller.readinessGate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_gate: Option<ReadinessGate>,
}

/// The startup taint a [`ReadinessGate`] removes. Nodes get it when they register (kubelet
/// `registerWithTaints`, Karpenter `startupTaints`); larder never adds it.
pub const PRECACHE_PENDING_TAINT: &str = "larder.dev/precache-pending";

/// How long a gating Precache may hold a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessGate {
    /// Seconds after the later of the node becoming Ready and this Precache's creation after
    /// which the taint is removed even if images are missing (a Warning Event says so), so a
    /// broken registry never keeps nodes out of service.
    #[serde(default = "ReadinessGate::default_timeout_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

impl ReadinessGate {
    /// Ten minutes: far above a normal image set's download, far below an outage's length.
    pub const DEFAULT_TIMEOUT_SECONDS: u32 = 600;

    fn default_timeout_seconds() -> u32 {
        Self::DEFAULT_TIMEOUT_SECONDS
    }
}

impl Default for ReadinessGate {
    fn default() -> Self {
        Self {
            timeout_seconds: Self::DEFAULT_TIMEOUT_SECONDS,
        }
    }
}

/// How many downloads run at once.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaxConcurrent {
    /// Images one node downloads at once.
    #[serde(default = "MaxConcurrent::default_per_node")]
    #[schemars(range(min = 1))]
    pub per_node: u32,
    /// Nodes that download this Precache's images at once (a rolling wave across the cluster,
    /// so a thousand nodes never pull from the cache registry together).
    #[serde(default = "MaxConcurrent::default_nodes")]
    #[schemars(range(min = 1))]
    pub nodes: u32,
}

impl MaxConcurrent {
    /// Two images per node: enough to overlap one image's small blobs with another's big layer.
    pub const DEFAULT_PER_NODE: u32 = 2;
    /// Ten nodes at once.
    pub const DEFAULT_NODES: u32 = 10;

    fn default_per_node() -> u32 {
        Self::DEFAULT_PER_NODE
    }

    fn default_nodes() -> u32 {
        Self::DEFAULT_NODES
    }
}

impl Default for MaxConcurrent {
    fn default() -> Self {
        Self {
            per_node: Self::DEFAULT_PER_NODE,
            nodes: Self::DEFAULT_NODES,
        }
    }
}

/// When the tags of a Precache's images are re-resolved against their origins.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Refresh {
    /// At the controller's refresh interval and whenever the schedule fires: nodes follow tags.
    #[default]
    Always,
    /// Only when the schedule fires (or the spec changes).
    OnSchedule,
    /// Never: the digest first resolved stays, whatever the tag does later.
    Never,
}

/// What the controller last observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrecacheStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// One entry per listed image, in spec order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<PrecacheImageStatus>,
    /// One entry per selected node, sorted by node name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<PrecacheNodeStatus>,
    /// Listed images `Ready` in the cache registry.
    #[serde(default)]
    pub images_ready: u32,
    /// Listed images.
    #[serde(default)]
    pub images_total: u32,
    /// Selected nodes holding every image.
    #[serde(default)]
    pub nodes_ready: u32,
    /// Selected nodes.
    #[serde(default)]
    pub nodes_total: u32,
    /// `imagesReady/imagesTotal`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_summary: Option<String>,
    /// `nodesReady/nodesTotal`, for the printer column (`-` without a node selector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_summary: Option<String>,
    /// When the schedule last fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,
    /// When the schedule fires next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,
    /// `Ready` (every image everywhere it was asked for) and others, one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One listed image at the cluster level.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrecacheImageStatus {
    /// The reference as listed in the spec.
    pub image: String,
    /// The `CachedImage` holding it (absent when the reference does not parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_image: Option<String>,
    /// The `CachedImage`'s phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The digest in the cache registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Bytes, every cached platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Why the image is not ready (bad reference, copy failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One selected node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrecacheNodeStatus {
    /// The node's name.
    pub node: String,
    /// The least advanced phase over this Precache's images on the node.
    pub phase: NodeImagePhase,
    /// This Precache's images the node holds.
    #[serde(default)]
    pub images_ready: u32,
    /// Bytes the node has downloaded for this Precache's images.
    #[serde(default)]
    pub bytes_done: u64,
    /// Why the node failed, when it did (the first failed image's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
