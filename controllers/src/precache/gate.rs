//! The readiness gate: a node registered with the startup taint
//! [`PRECACHE_PENDING_TAINT`]`:NoSchedule` keeps it until every image of every gating Precache
//! selecting it is on its disk (its NodeCache says `Ready`), or until a gating Precache's
//! timeout; then the controller removes the taint, records why on the NodeCache status and in
//! an Event, and counts it.
//!
//! [`decide`] is the whole policy, pure; [`apply`] is the I/O around it, run by the precache
//! loop after each pass when the controller runs with `--readiness-gate`.
//!
//! Why the controller and not each node's proxy removes the taint: the timeout must be enforced
//! by someone other than the proxy, since a proxy that crash-loops, or never gets its image, is
//! exactly the failure the timeout exists for; with the controller doing both, one identity
//! patches nodes (the chart's ValidatingAdmissionPolicy lets it remove this taint and change
//! nothing else), and the proxies keep no right on Nodes at all.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource as _, ResourceExt as _};
use larder_core::crd::{
    NodeCache, NodeGateStatus, NodeImagePhase, PRECACHE_PENDING_TAINT, Precache,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::{Value, json};

use super::plan::{node_image_phases, precache_references, selects};
use super::reconcile::Snapshot;

/// The only effect the gate acts on: a `NoExecute` taint of the same key is someone else's.
pub const TAINT_EFFECT: &str = "NoSchedule";

/// Why the taint was removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Every image of every gating Precache is Ready on the node.
    Complete,
    /// Some gating Precache is incomplete, and every incomplete one is past its timeout.
    TimedOut,
}

impl Reason {
    /// As in the NodeCache's `status.gate.state` and the Event's reason suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Complete => "Complete",
            Reason::TimedOut => "TimedOut",
        }
    }
}

/// What to do with one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No gate taint, or no gating Precache selects the node: never touched.
    NotGated,
    /// The taint stays.
    Keep {
        /// The gating Precaches, sorted.
        precaches: Vec<String>,
        /// When the earliest incomplete Precache times out (None while the node is not Ready:
        /// the clock has not started).
        deadline: Option<Timestamp>,
        /// What is missing, for the status.
        waiting: String,
    },
    /// Remove the taint now (it is `spec.taints[index]`).
    Remove {
        index: usize,
        reason: Reason,
        precaches: Vec<String>,
        /// What was missing (TimedOut), for the Event and the status.
        missing: String,
    },
}

/// The index of the gate taint in `spec.taints`.
pub fn taint_index(node: &Node) -> Option<usize> {
    node.spec
        .as_ref()?
        .taints
        .as_ref()?
        .iter()
        .position(|t| t.key == PRECACHE_PENDING_TAINT && t.effect == TAINT_EFFECT)
}

/// When the node's `Ready` condition last became `True`; None while it is not Ready.
pub fn ready_since(node: &Node) -> Option<Timestamp> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

/// The Precaches that gate `node`: not being deleted, asking for a gate, selecting it.
pub fn gating<'a>(precaches: &[&'a Precache], node: &Node) -> Vec<&'a Precache> {
    let mut out: Vec<&Precache> = precaches
        .iter()
        .copied()
        .filter(|pc| pc.metadata.deletion_timestamp.is_none())
        .filter(|pc| pc.spec.readiness_gate.is_some() && selects(pc, node))
        .collect();
    out.sort_by_key(|pc| pc.name_any());
    out
}

/// Whether the NodeCache's status describes its current spec (the proxy acted on it).
fn current(nc: &NodeCache) -> bool {
    match (nc.metadata.generation, nc.status.as_ref()) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(g), Some(s)) => s.observed_generation.is_some_and(|o| o >= g),
    }
}

/// `pc`'s images not Ready on the node (all of them when the NodeCache is absent or stale).
fn missing_images(pc: &Precache, nc: Option<&NodeCache>) -> Vec<String> {
    let refs = precache_references(pc);
    let Some(nc) = nc.filter(|nc| current(nc)) else {
        return refs.iter().map(ToString::to_string).collect();
    };
    let phases = node_image_phases(Some(nc));
    refs.iter()
        .map(ToString::to_string)
        .filter(|r| {
            phases
                .get(r.as_str())
                .is_none_or(|s| s.phase != NodeImagePhase::Ready)
        })
        .collect()
}

/// When `pc` stops holding a node Ready since `ready`: its timeout after the later of the two
/// (a Precache created for an already gated node gets its whole timeout).
pub fn deadline(pc: &Precache, ready: Timestamp) -> Timestamp {
    let start = pc
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(ready, |c| c.0.max(ready));
    let timeout = pc.spec.readiness_gate.unwrap_or_default().timeout_seconds;
    start
        .checked_add(SignedDuration::from_secs(i64::from(timeout)))
        .unwrap_or(Timestamp::MAX)
}

fn describe(missing: &[(String, Vec<String>)]) -> String {
    missing
        .iter()
        .map(|(pc, images)| format!("{pc}: {}", images.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The gate's verdict on one node (pure).
///
/// - no `larder.dev/precache-pending:NoSchedule` taint, or no gating Precache selects the node:
///   [`Decision::NotGated`] (a node no Precache gates is never touched, taint or not);
/// - every image of every gating Precache `Ready` on the node's NodeCache, whose status is
///   current (its `observedGeneration` is the spec's): remove, [`Reason::Complete`];
/// - otherwise, once the node is Ready and every incomplete gating Precache is past its
///   [`deadline`]: remove, [`Reason::TimedOut`];
/// - otherwise keep, with the earliest deadline still ahead.
pub fn decide(
    node: &Node,
    precaches: &[&Precache],
    nc: Option<&NodeCache>,
    now: Timestamp,
) -> Decision {
    let Some(index) = taint_index(node) else {
        return Decision::NotGated;
    };
    let gating = gating(precaches, node);
    if gating.is_empty() {
        return Decision::NotGated;
    }
    let names: Vec<String> = gating.iter().map(|pc| pc.name_any()).collect();
    let incomplete: Vec<(&Precache, Vec<String>)> = gating
        .iter()
        .map(|pc| (*pc, missing_images(pc, nc)))
        .filter(|(_, m)| !m.is_empty())
        .collect();
    let missing: Vec<(String, Vec<String>)> = incomplete
        .iter()
        .map(|(pc, m)| (pc.name_any(), m.clone()))
        .collect();
    if incomplete.is_empty() {
        return Decision::Remove {
            index,
            reason: Reason::Complete,
            precaches: names,
            missing: String::new(),
        };
    }
    let ready = ready_since(node);
    let pending_deadline = ready.and_then(|r| {
        incomplete
            .iter()
            .map(|(pc, _)| deadline(pc, r))
            .filter(|d| *d > now)
            .min()
    });
    if ready.is_some() && pending_deadline.is_none() {
        return Decision::Remove {
            index,
            reason: Reason::TimedOut,
            precaches: names,
            missing: describe(&missing),
        };
    }
    Decision::Keep {
        precaches: names,
        deadline: pending_deadline,
        waiting: if ready.is_some() {
            format!("waiting for {}", describe(&missing))
        } else {
            format!(
                "node not Ready (the timeout starts when it is); waiting for {}",
                describe(&missing)
            )
        },
    }
}

/// The JSON patch removing `spec.taints[index]`, guarded by `test`s of its key and effect: a
/// concurrent edit that moved the taint makes the patch fail (422) instead of removing another
/// taint, and any other change to the node is kept since the patch touches nothing else.
pub fn removal_patch(index: usize) -> Value {
    let path = format!("/spec/taints/{index}");
    json!([
        {"op": "test", "path": format!("{path}/key"), "value": PRECACHE_PENDING_TAINT},
        {"op": "test", "path": format!("{path}/effect"), "value": TAINT_EFFECT},
        {"op": "remove", "path": path},
    ])
}

/// The NodeCache's `status.gate` for a decision (None for [`Decision::NotGated`]).
pub fn gate_status(decision: &Decision, now: Timestamp) -> Option<NodeGateStatus> {
    match decision {
        Decision::NotGated => None,
        Decision::Keep {
            precaches,
            deadline,
            waiting,
        } => Some(NodeGateStatus {
            state: "Holding".into(),
            precaches: precaches.clone(),
            time: deadline.map(Time),
            message: Some(waiting.clone()),
        }),
        Decision::Remove {
            reason,
            precaches,
            missing,
            ..
        } => Some(NodeGateStatus {
            state: reason.as_str().into(),
            precaches: precaches.clone(),
            time: Some(Time(now)),
            message: Some(match reason {
                Reason::Complete => "every image is on the node's disk; taint removed".into(),
                Reason::TimedOut => format!("timed out; taint removed with missing {missing}"),
            }),
        }),
    }
}

/// `larder_controller_gate_*` metrics; every series exists from the start.
#[derive(Clone, Debug)]
pub struct GateMetrics {
    gated: Gauge,
    wait: Histogram,
    timeouts: Counter,
}

impl Default for GateMetrics {
    fn default() -> Self {
        Self {
            gated: Gauge::default(),
            // 5 s .. ~1.4 h: a small image set lands in seconds, a timeout is minutes.
            wait: Histogram::new([
                5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0, 4800.0,
            ]),
            timeouts: Counter::default(),
        }
    }
}

impl GateMetrics {
    /// Creates the metrics and registers them in `registry` under `larder_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("larder_controller");
        r.register(
            "gated_nodes",
            "Nodes the readiness gate currently holds under the larder.dev/precache-pending taint",
            m.gated.clone(),
        );
        r.register(
            "gate_wait_seconds",
            "Seconds from a node's Ready condition to the removal of its precache-pending taint",
            m.wait.clone(),
        );
        r.register(
            "gate_timeouts",
            "Precache-pending taints removed at the timeout with images still missing",
            m.timeouts.clone(),
        );
        m
    }
}

/// What [`apply`] needs besides the snapshot.
#[derive(Clone)]
pub struct Gate {
    /// Publishes the Events on Nodes (None in tests).
    pub recorder: Option<Recorder>,
    pub metrics: GateMetrics,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("recorder", &self.recorder.is_some())
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// What one [`apply`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateOutcome {
    /// Nodes held.
    pub gated: usize,
    /// Taints removed.
    pub removed: usize,
    /// Writes attempted (node patches, NodeCache status patches).
    pub writes: usize,
    /// The earliest timeout ahead: the loop must run a pass by then.
    pub next_deadline: Option<Timestamp>,
}

/// Applies [`decide`] to every node of `snap`: removes taints, writes `status.gate` on the
/// NodeCaches where it changed, publishes Events, updates the metrics. A refused write is
/// logged and left to the next pass (the decision is made again from fresh caches).
pub async fn apply(
    client: &kube::Client,
    snap: &Snapshot,
    gate: &Gate,
    now: Timestamp,
) -> GateOutcome {
    let mut out = GateOutcome::default();
    let pcs: Vec<&Precache> = snap.precaches.iter().map(AsRef::as_ref).collect();
    let ncs: BTreeMap<String, &NodeCache> = snap
        .node_caches
        .iter()
        .map(|n| (n.name_any(), n.as_ref()))
        .collect();
    let nodes: Api<Node> = Api::all(client.clone());
    let nc_api: Api<NodeCache> = Api::all(client.clone());
    for node in &snap.nodes {
        let name = node.name_any();
        let nc = ncs.get(&name).copied();
        let decision = decide(node, &pcs, nc, now);
        match &decision {
            Decision::NotGated => continue,
            Decision::Keep { deadline, .. } => {
                out.gated += 1;
                out.next_deadline = match (out.next_deadline, *deadline) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Decision::Remove {
                index,
                reason,
                missing,
                ..
            } => {
                out.writes += 1;
                let patch: json_patch::Patch = match serde_json::from_value(removal_patch(*index)) {
                    Ok(p) => p,
                    Err(error) => {
                        // A fixed shape: only a bug here could fail.
                        tracing::error!(%error, "building the taint removal patch");
                        continue;
                    }
                };
                match nodes
                    .patch(&name, &PatchParams::default(), &Patch::Json::<()>(patch))
                    .await
                {
                    Ok(_) => {
                        out.removed += 1;
                        released(gate, node, *reason, missing, now).await;
                    }
                    Err(error) => {
                        // 422 (the taint moved) or 403 (RBAC or the admission policy):
                        // still gated; the next pass decides again.
                        out.gated += 1;
                        tracing::warn!(node = %name, %error, "removing the precache-pending taint");
                        continue;
                    }
                }
            }
        }
        let Some(nc) = nc else { continue };
        let wanted = gate_status(&decision, now);
        let have = nc.status.as_ref().and_then(|s| s.gate.as_ref());
        if !gate_status_changed(have, wanted.as_ref()) {
            continue;
        }
        out.writes += 1;
        let body = json!({"status": {"gate": wanted}});
        if let Err(error) = nc_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            tracing::warn!(node = %name, %error, "writing the NodeCache's gate status");
        }
    }
    gate.metrics
        .gated
        .set(i64::try_from(out.gated).unwrap_or(i64::MAX));
    out
}

/// Whether `status.gate` must be written: another state, other Precaches, or (while
/// `Holding`) another deadline. Never for the message alone, which follows the proxy's
/// progress: the gate must not add a write per image downloaded.
fn gate_status_changed(have: Option<&NodeGateStatus>, wanted: Option<&NodeGateStatus>) -> bool {
    match (have, wanted) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(h), Some(w)) if w.state == "Holding" => {
            h.state != w.state || h.precaches != w.precaches || h.time != w.time
        }
        (Some(h), Some(w)) => h.state != w.state || h.precaches != w.precaches,
    }
}

async fn released(gate: &Gate, node: &Node, reason: Reason, missing: &str, now: Timestamp) {
    let name = node.name_any();
    let waited = ready_since(node).map(|r| crate::policy::until(r, now));
    if let Some(w) = waited {
        gate.metrics.wait.observe(w.as_secs_f64());
    }
    let after = waited.map_or_else(String::new, |w| {
        format!(
            " {} after the node became Ready",
            humantime::format_duration(Duration::from_secs(w.as_secs()))
        )
    });
    let (type_, note) = match reason {
        Reason::Complete => {
            tracing::info!(node = %name, ?waited, "precached images on disk: removed the precache-pending taint");
            (
                EventType::Normal,
                format!(
                    "every precached image is on the node's disk: removed the {PRECACHE_PENDING_TAINT} taint{after}"
                ),
            )
        }
        Reason::TimedOut => {
            gate.metrics.timeouts.inc();
            tracing::warn!(node = %name, ?waited, missing, "readiness gate timed out: removed the precache-pending taint");
            (
                EventType::Warning,
                format!(
                    "readiness gate timed out: removed the {PRECACHE_PENDING_TAINT} taint{after} with images missing ({missing})"
                ),
            )
        }
    };
    let Some(recorder) = &gate.recorder else {
        return;
    };
    let event = Event {
        type_,
        reason: format!("PrecacheGate{}", reason.as_str()),
        note: Some(note),
        action: "RemoveTaint".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &node.object_ref(&())).await {
        tracing::debug!(%error, "publishing an event");
    }
}

/// Nodes a gating Precache holds although the controller runs without `--readiness-gate`:
/// nothing will remove their taint, which the loop says in its log.
pub fn held_without_gate(snap: &Snapshot) -> Vec<String> {
    let pcs: Vec<&Precache> = snap.precaches.iter().map(AsRef::as_ref).collect();
    snap.nodes
        .iter()
        .filter(|n| taint_index(n).is_some() && !gating(&pcs, n).is_empty())
        .map(|n| n.name_any())
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
