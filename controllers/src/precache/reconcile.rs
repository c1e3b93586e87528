//! The precache pass: from the watched Precaches, Nodes, NodeCaches and CachedImages, write the
//! retained CachedImages, each node's NodeCache spec and each Precache's status.
//!
//! One debounced global pass (like the usage aggregator) rather than a per-object `Controller`:
//! a NodeCache spec depends on every Precache and the rolling wave on every node, so a pass over
//! the whole picture is both simpler and cheaper than fanning each event out to the objects it
//! touches. Each pass writes only what differs, and passes are at least [`DEBOUNCE`] apart, so
//! however many proxies report, each Precache's status is written at most once per pass.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Resource as _, ResourceExt as _};
use larder_core::crd::{
    CachedImage, NodeCache, NodeCacheSpec, NodeImagePhase, Phase, Precache, Refresh,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::gate::{self, Gate};
use super::plan::{self, ImageChange};
use super::{schedule, status};

/// Quiet time after a change before a pass.
pub const DEBOUNCE: Duration = Duration::from_secs(2);
/// A pass runs at least this often (schedules fire without any event).
pub const RESYNC: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    resource: &'static str,
    verb: &'static str,
}

/// `larder_controller_precache_*` metrics.
#[derive(Clone, Debug, Default)]
pub struct PrecacheMetrics {
    nodes: Family<PhaseLabels, Gauge>,
    precaches: Gauge,
    writes: Family<WriteLabels, Counter>,
}

impl PrecacheMetrics {
    /// Creates the metrics and registers them in `registry` under `larder_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("larder_controller");
        r.register(
            "precache_nodes",
            "Node entries of all Precaches by phase (a node counts once per Precache selecting it)",
            m.nodes.clone(),
        );
        r.register("precaches", "Precache objects", m.precaches.clone());
        r.register(
            "precache_writes",
            "API writes by the precache pass, by resource and verb (failed ones included)",
            m.writes.clone(),
        );
        m
    }

    fn wrote(&self, resource: &'static str, verb: &'static str) {
        self.writes
            .get_or_create(&WriteLabels { resource, verb })
            .inc();
    }
}

/// Watches what the pass reads and runs passes until aborted. `images` is the CachedImage
/// controller's store. `usage_changed` wakes the usage aggregator after CachedImages were
/// retained or released, so a released image gets its expiry without waiting for a pod event.
/// With `gate` (`--readiness-gate`), each pass is followed by the readiness gate's.
pub async fn run(
    client: kube::Client,
    images: Store<CachedImage>,
    metrics: PrecacheMetrics,
    usage_changed: Arc<Notify>,
    gate: Option<Gate>,
) {
    let changed = Arc::new(Notify::new());
    let mut tasks = JoinSet::new();
    let precaches = watch_into(
        &mut tasks,
        Api::<Precache>::all(client.clone()),
        changed.clone(),
        |pc| pc.metadata.managed_fields = None,
    );
    let nodes = watch_into(
        &mut tasks,
        Api::<Node>::all(client.clone()),
        changed.clone(),
        trim_node,
    );
    let node_caches = watch_into(
        &mut tasks,
        Api::<NodeCache>::all(client.clone()),
        changed.clone(),
        |nc| nc.metadata.managed_fields = None,
    );
    // Every cache complete before the first pass: a pass over a partial picture would delete
    // the NodeCaches of nodes not listed yet and re-create CachedImages that exist.
    // `stores::ready`, not `wait_until_ready`: the CachedImage controller waits on `images` too.
    for (what, ready) in [
        ("precaches", crate::stores::ready(&precaches).await),
        ("nodes", crate::stores::ready(&nodes).await),
        ("nodecaches", crate::stores::ready(&node_caches).await),
        ("cachedimages", crate::stores::ready(&images).await),
    ] {
        if ready.is_err() {
            tracing::warn!(what, "watch ended before its first list; precache disabled");
            return;
        }
    }
    tracing::info!(
        gate = gate.is_some(),
        "precache caches synced; passes start"
    );
    let mut warned_gate_off = false;
    loop {
        let snapshot = Snapshot::from_stores(&precaches, &nodes, &node_caches, &images);
        let now = Timestamp::now();
        let outcome = pass(&client, &snapshot, &metrics, now).await;
        tracing::debug!(
            precaches = snapshot.precaches.len(),
            nodes = snapshot.nodes.len(),
            writes = outcome.writes,
            "precache pass"
        );
        if outcome.image_writes > 0 {
            usage_changed.notify_one();
        }
        let mut next = outcome.next_fire;
        match &gate {
            Some(gate) => {
                let g = gate::apply(&client, &snapshot, gate, now).await;
                if g.gated > 0 || g.writes > 0 {
                    tracing::debug!(
                        gated = g.gated,
                        removed = g.removed,
                        writes = g.writes,
                        "readiness gate"
                    );
                }
                next = [next, g.next_deadline].into_iter().flatten().min();
            }
            None => {
                let held = gate::held_without_gate(&snapshot);
                if !held.is_empty() && !warned_gate_off {
                    warned_gate_off = true;
                    tracing::warn!(
                        nodes = ?held,
                        "a Precache asks for a readiness gate, but this controller runs without --readiness-gate (chart: controller.readinessGate.enabled): nothing removes these nodes' larder.dev/precache-pending taint"
                    );
                }
            }
        }
        // Until something changes, at most RESYNC, and no later than the next schedule slot or
        // gate timeout.
        let wait = next.map_or(RESYNC, |t| crate::policy::until(now, t).min(RESYNC));
        let _ = tokio::time::timeout(wait, changed.notified()).await;
        tokio::time::sleep(DEBOUNCE).await;
    }
}

/// What one pass reads, each list sorted by name so the pass writes in a stable order.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub precaches: Vec<Arc<Precache>>,
    pub nodes: Vec<Arc<Node>>,
    pub node_caches: Vec<Arc<NodeCache>>,
    pub images: Vec<Arc<CachedImage>>,
}

impl Snapshot {
    /// The stores' current contents.
    pub fn from_stores(
        precaches: &Store<Precache>,
        nodes: &Store<Node>,
        node_caches: &Store<NodeCache>,
        images: &Store<CachedImage>,
    ) -> Self {
        Self::new(
            precaches.state(),
            nodes.state(),
            node_caches.state(),
            images.state(),
        )
    }

    /// From plain lists, in any order.
    pub fn new(
        mut precaches: Vec<Arc<Precache>>,
        mut nodes: Vec<Arc<Node>>,
        mut node_caches: Vec<Arc<NodeCache>>,
        mut images: Vec<Arc<CachedImage>>,
    ) -> Self {
        precaches.sort_by_key(|o| o.name_any());
        nodes.sort_by_key(|o| o.name_any());
        node_caches.sort_by_key(|o| o.name_any());
        images.sort_by_key(|o| o.name_any());
        Self {
            precaches,
            nodes,
            node_caches,
            images,
        }
    }
}

/// What a pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// CachedImages created, retained or released.
    pub image_writes: usize,
    /// Every write the pass attempted.
    pub writes: usize,
    /// The earliest next schedule slot over all Precaches.
    pub next_fire: Option<Timestamp>,
}

fn watch_into<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    changed: Arc<Notify>,
    trim: impl FnMut(&mut K) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = larder_core::watch::backoff_until_data(reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(trim),
    ));
    tasks.spawn(async move {
        stream
            .for_each(|event| {
                if let Err(error) = event {
                    tracing::warn!(%error, "precache watch");
                }
                changed.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    store
}

/// Keeps of a Node only what the plan and the gate read: name, uid, labels, platform, taints
/// and the Ready condition (without its heartbeat).
fn trim_node(node: &mut Node) {
    node.spec = node.spec.take().map(|spec| NodeSpec {
        taints: spec.taints,
        ..NodeSpec::default()
    });
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(status) = node.status.as_mut() {
        let ready = status.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| NodeCondition {
                    last_heartbeat_time: None,
                    ..c
                })
                .collect()
        });
        *status = NodeStatus {
            node_info: status.node_info.take(),
            conditions: ready,
            ..NodeStatus::default()
        };
    }
}

/// One pass over `snap`: CachedImages, schedules, NodeCaches, then Precache statuses. A failed
/// write is logged and left for the next pass; the others go ahead.
pub async fn pass(
    client: &kube::Client,
    snap: &Snapshot,
    metrics: &PrecacheMetrics,
    now: Timestamp,
) -> Outcome {
    let mut outcome = Outcome::default();
    let pcs: Vec<&Precache> = snap.precaches.iter().map(AsRef::as_ref).collect();
    let node_list: Vec<&Node> = snap.nodes.iter().map(AsRef::as_ref).collect();
    let current: BTreeMap<String, &NodeCache> = snap
        .node_caches
        .iter()
        .map(|n| (n.name_any(), n.as_ref()))
        .collect();
    let by_name: BTreeMap<String, &CachedImage> = snap
        .images
        .iter()
        .map(|c| (c.name_any(), c.as_ref()))
        .collect();

    let ci_api: Api<CachedImage> = Api::all(client.clone());
    let wanted = plan::wanted_images(pcs.iter().copied());
    for change in plan::image_changes(&wanted, by_name.values().copied()) {
        outcome.image_writes += 1;
        match change {
            ImageChange::Create(ci) => {
                metrics.wrote("cachedimages", "create");
                match ci_api.create(&PostParams::default(), &ci).await {
                    Ok(_) => {
                        tracing::info!(image = %ci.spec.source_image, "created a precached CachedImage")
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(error) => tracing::warn!(%error, "creating a precached CachedImage"),
                }
            }
            ImageChange::Patch { name, patch } => {
                metrics.wrote("cachedimages", "patch");
                if let Err(error) = ci_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    tracing::warn!(%name, %error, "updating a precached CachedImage");
                }
            }
        }
    }

    let schedules: BTreeMap<String, schedule::State> = pcs
        .iter()
        .filter(|pc| pc.metadata.deletion_timestamp.is_none())
        .filter_map(|pc| Some((pc.name_any(), schedule::state(pc, now)?)))
        .collect();
    outcome.next_fire = schedules.values().filter_map(|s| s.next).min();
    let fired: BTreeSet<String> = schedules
        .iter()
        .filter(|(_, s)| s.fired)
        .map(|(n, _)| n.clone())
        .collect();
    for pc in pcs.iter().filter(|p| fired.contains(&p.name_any())) {
        tracing::info!(precache = %pc.name_any(), "schedule fired: re-checking tags and nodes");
        if pc.spec.refresh != Refresh::Never {
            outcome.writes += refresh_tags(&ci_api, pc, &by_name, metrics).await;
        }
    }

    let specs = plan::node_specs(&pcs, &node_list, &by_name, &current, &fired, now);
    outcome.writes += apply_node_caches(client, &node_list, &current, &specs, metrics).await;

    let pc_api: Api<Precache> = Api::all(client.clone());
    let mut node_phases: BTreeMap<&'static str, i64> = BTreeMap::new();
    for pc in &pcs {
        if pc.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pc.name_any();
        let st = status::status(pc, &by_name, &node_list, &current, pc.status.as_ref(), now);
        let st = status::with_schedule(
            st,
            schedules.get(&name),
            pc.status.as_ref(),
            pc.metadata.generation,
            now,
        );
        for n in &st.nodes {
            *node_phases.entry(n.phase.as_str()).or_default() += 1;
        }
        if pc.status.as_ref() == Some(&st) {
            continue;
        }
        metrics.wrote("precaches/status", "patch");
        outcome.writes += 1;
        if let Err(error) = pc_api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&status::merge_patch(&st)),
            )
            .await
        {
            tracing::warn!(precache = %name, %error, "writing Precache status");
        }
    }
    for phase in [
        NodeImagePhase::Pending,
        NodeImagePhase::Caching,
        NodeImagePhase::Ready,
        NodeImagePhase::Failed,
    ] {
        let n = node_phases.get(phase.as_str()).copied().unwrap_or(0);
        metrics
            .nodes
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .set(n);
    }
    metrics
        .precaches
        .set(i64::try_from(pcs.len()).unwrap_or(i64::MAX));
    outcome.writes += outcome.image_writes;
    outcome
}

/// Makes the CachedImage reconciler re-check the Precache's tags now: a Ready image without
/// `lastSync` is refreshed at once (`policy::next`), so no change to that reconciler is needed.
/// Digest-pinned references never move. Returns the writes made.
async fn refresh_tags(
    api: &Api<CachedImage>,
    pc: &Precache,
    images: &BTreeMap<String, &CachedImage>,
    metrics: &PrecacheMetrics,
) -> usize {
    let mut writes = 0;
    for r in plan::precache_references(pc) {
        if r.digest().is_some() {
            continue;
        }
        let name = r.cached_image_name();
        let ready = images
            .get(&name)
            .and_then(|ci| ci.status.as_ref())
            .is_some_and(|s| s.phase == Some(Phase::Ready));
        if !ready {
            continue;
        }
        let body = json!({"status": {"lastSync": null}});
        metrics.wrote("cachedimages/status", "patch");
        writes += 1;
        if let Err(error) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            tracing::warn!(%name, %error, "asking for a tag refresh");
        }
    }
    writes
}

/// Creates, patches and deletes NodeCaches so they match `specs`; returns the writes made.
async fn apply_node_caches(
    client: &kube::Client,
    nodes: &[&Node],
    current: &BTreeMap<String, &NodeCache>,
    specs: &BTreeMap<String, NodeCacheSpec>,
    metrics: &PrecacheMetrics,
) -> usize {
    let api: Api<NodeCache> = Api::all(client.clone());
    let mut writes = 0;
    for (name, spec) in specs {
        match current.get(name) {
            Some(nc) if &nc.spec == spec => {}
            Some(_) => {
                metrics.wrote("nodecaches", "patch");
                writes += 1;
                let body = json!({ "spec": spec });
                if let Err(error) = api
                    .patch(name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                {
                    tracing::warn!(node = %name, %error, "updating NodeCache");
                }
            }
            None => {
                let owner = nodes
                    .iter()
                    .find(|n| &n.name_any() == name)
                    .and_then(|n| node_owner(n));
                let nc = NodeCache {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        // Garbage-collected with its Node.
                        owner_references: owner.map(|o| vec![o]),
                        ..ObjectMeta::default()
                    },
                    spec: spec.clone(),
                    status: None,
                };
                metrics.wrote("nodecaches", "create");
                writes += 1;
                match api.create(&PostParams::default(), &nc).await {
                    Ok(_) => tracing::info!(node = %name, "created NodeCache"),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(error) => tracing::warn!(node = %name, %error, "creating NodeCache"),
                }
            }
        }
    }
    for name in current.keys().filter(|n| !specs.contains_key(*n)) {
        metrics.wrote("nodecaches", "delete");
        writes += 1;
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(node = %name, "deleted NodeCache: no Precache selects the node")
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(error) => tracing::warn!(node = %name, %error, "deleting NodeCache"),
        }
    }
    writes
}

fn node_owner(node: &Node) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: Node::api_version(&()).into_owned(),
        kind: Node::kind(&()).into_owned(),
        name: node.name_any(),
        uid: node.metadata.uid.clone()?,
        ..OwnerReference::default()
    })
}
