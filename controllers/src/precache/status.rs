//! A Precache's status, as a pure function of what the caches hold: per image from the
//! `CachedImage`s, per node from the `NodeCache` statuses the proxies write, counts and
//! summaries for the printer columns, and the `Ready` and `ScheduleValid` conditions.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use larder_core::crd::{
    CachedImage, NodeCache, NodeImagePhase, Phase, Precache, PrecacheImageStatus,
    PrecacheNodeStatus, PrecacheStatus,
};
use larder_core::reference::Reference;
use serde_json::Value;

use super::plan;
use super::schedule;

/// How many nodes a Precache's status lists (not-ready nodes first); the counts stay exact.
/// A thousand entries of ~100 bytes keep the object far below etcd's 1.5 MiB limit.
pub const STATUS_NODES_CAP: usize = 1000;

/// A Precache's status from the `CachedImage`s and the selected nodes' `NodeCache`s, with the
/// schedule times of `previous` (see [`with_schedule`]). `previous` keeps the `Ready`
/// condition's transition time when its status did not change, so an unchanged world writes
/// nothing.
pub fn status(
    pc: &Precache,
    images: &BTreeMap<String, &CachedImage>,
    nodes: &[&Node],
    current: &BTreeMap<String, &NodeCache>,
    previous: Option<&PrecacheStatus>,
    now: Timestamp,
) -> PrecacheStatus {
    let name = pc.name_any();
    let mut image_statuses = Vec::new();
    let mut seen = BTreeSet::new();
    for listed in &pc.spec.images {
        let entry = match Reference::parse(listed) {
            Err(e) => PrecacheImageStatus {
                image: listed.clone(),
                cached_image: None,
                phase: Some(Phase::Failed),
                digest: None,
                size_bytes: None,
                message: Some(format!("not an image reference: {e}")),
            },
            Ok(r) => {
                if !seen.insert(r.cached_image_name()) {
                    continue;
                }
                let ci_status = images
                    .get(&r.cached_image_name())
                    .and_then(|ci| ci.status.clone())
                    .unwrap_or_default();
                let message = ci_status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Ready" && c.status == "False")
                    .map(|c| c.message.clone())
                    .filter(|m| !m.is_empty());
                PrecacheImageStatus {
                    image: listed.clone(),
                    cached_image: Some(r.cached_image_name()),
                    phase: Some(ci_status.phase.unwrap_or(Phase::Pending)),
                    digest: ci_status.digest,
                    size_bytes: ci_status.size_bytes,
                    message,
                }
            }
        };
        image_statuses.push(entry);
    }
    let refs = plan::precache_references(pc);
    let mut node_statuses: Vec<PrecacheNodeStatus> = nodes
        .iter()
        .filter(|n| plan::selects(pc, n))
        .map(|n| {
            let nc = current.get(&n.name_any()).copied();
            let phases = plan::node_image_phases(nc);
            let mine: Vec<_> = refs
                .iter()
                .filter_map(|r| phases.get(r.to_string().as_str()).copied())
                .collect();
            let ready = mine
                .iter()
                .filter(|s| s.phase == NodeImagePhase::Ready)
                .count();
            let failed = mine.iter().find(|s| s.phase == NodeImagePhase::Failed);
            let reason = failed.and_then(|s| s.reason.clone()).or_else(|| {
                plan::silent(nc, now).then(|| {
                    "no report from the node's proxy: is larder's proxy running there with \
                     precache enabled?"
                        .to_owned()
                })
            });
            let phase = if !plan::admitted(nc, &name) {
                NodeImagePhase::Pending
            } else if failed.is_some() {
                NodeImagePhase::Failed
            } else if ready == refs.len() {
                NodeImagePhase::Ready
            } else if mine.iter().any(|s| s.phase != NodeImagePhase::Pending) {
                NodeImagePhase::Caching
            } else {
                NodeImagePhase::Pending
            };
            PrecacheNodeStatus {
                node: n.name_any(),
                phase,
                images_ready: u32::try_from(ready).unwrap_or(u32::MAX),
                bytes_done: mine.iter().map(|s| s.bytes_done).sum(),
                reason,
            }
        })
        .collect();
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let images_total = count(image_statuses.len());
    let images_ready = count(
        image_statuses
            .iter()
            .filter(|i| i.phase == Some(Phase::Ready))
            .count(),
    );
    let nodes_total = count(node_statuses.len());
    let nodes_ready = count(
        node_statuses
            .iter()
            .filter(|n| n.phase == NodeImagePhase::Ready)
            .count(),
    );
    // Not-ready nodes first (they are what a reader looks for), then by name; capped.
    node_statuses.sort_by(|a, b| {
        (a.phase == NodeImagePhase::Ready, &a.node)
            .cmp(&(b.phase == NodeImagePhase::Ready, &b.node))
    });
    node_statuses.truncate(STATUS_NODES_CAP);
    let on_nodes = pc.spec.node_selector.is_some();
    let all_ready = images_ready == images_total && (!on_nodes || nodes_ready == nodes_total);
    let (cond_status, reason, message) = if all_ready {
        (
            "True",
            "Cached",
            "every image is cached everywhere it was asked for".to_owned(),
        )
    } else if images_ready < images_total {
        (
            "False",
            "Copying",
            format!("{images_ready} of {images_total} images in the cache registry"),
        )
    } else {
        (
            "False",
            "NodesCaching",
            format!("{nodes_ready} of {nodes_total} nodes hold every image"),
        )
    };
    let transition = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == "Ready"))
        .filter(|c| c.status == cond_status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    PrecacheStatus {
        observed_generation: pc.metadata.generation,
        images: image_statuses,
        nodes: node_statuses,
        images_ready,
        images_total,
        nodes_ready,
        nodes_total,
        images_summary: Some(format!("{images_ready}/{images_total}")),
        nodes_summary: Some(if on_nodes {
            format!("{nodes_ready}/{nodes_total}")
        } else {
            "-".into()
        }),
        last_schedule_time: previous.and_then(|p| p.last_schedule_time.clone()),
        next_schedule_time: previous.and_then(|p| p.next_schedule_time.clone()),
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: cond_status.into(),
            reason: reason.into(),
            message,
            last_transition_time: transition,
            observed_generation: pc.metadata.generation,
        }],
    }
}

/// Sets the schedule times from `state`, and the `ScheduleValid` condition when the expression
/// is bad (keeping its transition time from `previous` while it stays bad).
pub fn with_schedule(
    mut st: PrecacheStatus,
    state: Option<&schedule::State>,
    previous: Option<&PrecacheStatus>,
    generation: Option<i64>,
    now: Timestamp,
) -> PrecacheStatus {
    let Some(state) = state else {
        st.last_schedule_time = None;
        st.next_schedule_time = None;
        return st;
    };
    st.last_schedule_time = state.last.map(Time);
    st.next_schedule_time = state.next.map(Time);
    if let Some(error) = &state.error {
        let since = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == "ScheduleValid"))
            .filter(|c| c.status == "False" && &c.message == error)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        st.conditions.push(Condition {
            type_: "ScheduleValid".into(),
            status: "False".into(),
            reason: "InvalidSchedule".into(),
            message: error.clone(),
            last_transition_time: since,
            observed_generation: generation,
        });
    }
    st
}

/// The status as a merge patch body: fields that became empty are written as `null`, since a
/// merge patch leaves absent fields as they were.
pub fn merge_patch(status: &PrecacheStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        for key in [
            "observedGeneration",
            "images",
            "nodes",
            "imagesSummary",
            "nodesSummary",
            "lastScheduleTime",
            "nextScheduleTime",
            "conditions",
        ] {
            map.entry(key).or_insert(Value::Null);
        }
    }
    serde_json::json!({ "status": v })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
