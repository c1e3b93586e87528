use super::*;
use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus, Taint};
use larder_core::crd::{NodeCacheSpec, NodeImageStatus, ReadinessGate};

use crate::precache::plan::tests::{node, node_cache, now, precache};

const NGINX: &str = "docker.io/library/nginx:1.27";
const BUSYBOX: &str = "docker.io/library/busybox:1.36";

fn at(offset_secs: i64) -> Timestamp {
    now()
        .checked_add(SignedDuration::from_secs(offset_secs))
        .unwrap()
}

fn taint(key: &str, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        effect: effect.into(),
        ..Taint::default()
    }
}

/// A node in pool `gpu`, Ready since `ready` seconds after [`now`] (None: not Ready), with
/// these taints.
fn gpu_node(ready: Option<i64>, taints: Vec<Taint>) -> Node {
    let mut n = node("gpu-1", &[("pool", "gpu")], Some("amd64"));
    n.spec = Some(NodeSpec {
        taints: Some(taints),
        ..NodeSpec::default()
    });
    let status = n.status.get_or_insert_with(NodeStatus::default);
    status.conditions = Some(vec![NodeCondition {
        type_: "Ready".into(),
        status: if ready.is_some() { "True" } else { "False" }.into(),
        last_transition_time: Some(Time(at(ready.unwrap_or(0)))),
        ..NodeCondition::default()
    }]);
    n
}

fn pending() -> Taint {
    taint(PRECACHE_PENDING_TAINT, "NoSchedule")
}

/// A gating Precache selecting pool=gpu, created at [`now`].
fn gating_pc(name: &str, images: &[&str], timeout: u32) -> Precache {
    let mut pc = precache(name, images, Some(&[("pool", "gpu")]));
    pc.spec.readiness_gate = Some(ReadinessGate {
        timeout_seconds: timeout,
    });
    pc.metadata.creation_timestamp = Some(Time(now()));
    pc
}

fn nc(ready: &[&str]) -> NodeCache {
    let mut nc = node_cache(
        "gpu-1",
        NodeCacheSpec {
            platform: "linux/amd64".into(),
            max_concurrent: 2,
            epoch: 0,
            images: Vec::new(),
        },
        ready,
    );
    nc.metadata.generation = Some(3);
    if let Some(s) = nc.status.as_mut() {
        s.observed_generation = Some(3);
    }
    nc
}

fn kind(d: &Decision) -> String {
    match d {
        Decision::NotGated => "NotGated".into(),
        Decision::Keep { .. } => "Keep".into(),
        Decision::Remove { reason, index, .. } => format!("Remove({}, {index})", reason.as_str()),
    }
}

#[test]
fn decide_table() {
    let both = gating_pc("base", &["nginx:1.27", "busybox:1.36"], 600);
    let mut not_gating = both.clone();
    not_gating.spec.readiness_gate = None;
    let mut other_pool = both.clone();
    other_pool.spec.node_selector = Some([("pool".to_owned(), "cpu".to_owned())].into());
    let mut deleting = both.clone();
    deleting.metadata.deletion_timestamp = Some(Time(now()));
    let short = gating_pc("short", &["busybox:1.36"], 30);
    let mut stale = nc(&[NGINX, BUSYBOX]);
    stale.metadata.generation = Some(4);
    let mut failed = nc(&[NGINX, BUSYBOX]);
    if let Some(s) = failed.status.as_mut() {
        s.images[1] = NodeImageStatus {
            phase: NodeImagePhase::Failed,
            ..s.images[1].clone()
        };
    }
    let taints_with_other = vec![
        taint("node.kubernetes.io/not-ready", "NoSchedule"),
        pending(),
    ];

    // (what, node, precaches, nodecache, now, expected)
    type Row<'a> = (
        &'static str,
        Node,
        Vec<&'a Precache>,
        Option<NodeCache>,
        Timestamp,
        &'static str,
    );
    let rows: Vec<Row> = vec![
        (
            "no taint: never touched",
            gpu_node(Some(0), vec![]),
            vec![&both],
            Some(nc(&[])),
            at(10),
            "NotGated",
        ),
        (
            "taint with another effect is someone else's",
            gpu_node(Some(0), vec![taint(PRECACHE_PENDING_TAINT, "NoExecute")]),
            vec![&both],
            Some(nc(&[])),
            at(10),
            "NotGated",
        ),
        (
            "tainted, but no Precache asks for a gate",
            gpu_node(Some(0), vec![pending()]),
            vec![&not_gating],
            Some(nc(&[])),
            at(10_000),
            "NotGated",
        ),
        (
            "tainted, the gating Precache selects other nodes",
            gpu_node(Some(0), vec![pending()]),
            vec![&other_pool],
            None,
            at(10_000),
            "NotGated",
        ),
        (
            "tainted, the gating Precache is being deleted",
            gpu_node(Some(0), vec![pending()]),
            vec![&deleting],
            Some(nc(&[])),
            at(10),
            "NotGated",
        ),
        (
            "no NodeCache yet",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            None,
            at(10),
            "Keep",
        ),
        (
            "one of two images",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            Some(nc(&[NGINX])),
            at(10),
            "Keep",
        ),
        (
            "a Failed image is not on disk",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            Some(failed.clone()),
            at(10),
            "Keep",
        ),
        (
            "the last image completes",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            Some(nc(&[NGINX, BUSYBOX])),
            at(10),
            "Remove(Complete, 0)",
        ),
        (
            "complete, behind another taint",
            gpu_node(Some(0), taints_with_other.clone()),
            vec![&both],
            Some(nc(&[NGINX, BUSYBOX])),
            at(10),
            "Remove(Complete, 1)",
        ),
        (
            "complete on a status of an older spec: not yet",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            Some(stale),
            at(10),
            "Keep",
        ),
        (
            "complete though the node is not Ready",
            gpu_node(None, vec![pending()]),
            vec![&both],
            Some(nc(&[NGINX, BUSYBOX])),
            at(10),
            "Remove(Complete, 0)",
        ),
        (
            "not Ready: the clock has not started",
            gpu_node(None, vec![pending()]),
            vec![&both],
            Some(nc(&[])),
            at(100_000),
            "Keep",
        ),
        (
            "one second before the timeout",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            Some(failed.clone()),
            at(599),
            "Keep",
        ),
        (
            "at the timeout",
            gpu_node(Some(0), vec![pending()]),
            vec![&both],
            Some(failed.clone()),
            at(600),
            "Remove(TimedOut, 0)",
        ),
        (
            "Ready after the Precache was created: the clock starts at Ready",
            gpu_node(Some(100), vec![pending()]),
            vec![&both],
            Some(nc(&[])),
            at(650),
            "Keep",
        ),
        (
            "two gating Precaches: one complete, the other still in time",
            gpu_node(Some(0), vec![pending()]),
            vec![&both, &short],
            Some(nc(&[NGINX])),
            at(20),
            "Keep",
        ),
        (
            "two gating Precaches: both complete",
            gpu_node(Some(0), vec![pending()]),
            vec![&both, &short],
            Some(nc(&[NGINX, BUSYBOX])),
            at(20),
            "Remove(Complete, 0)",
        ),
        (
            "the short one timed out, the long one is incomplete and in time",
            gpu_node(Some(0), vec![pending()]),
            vec![&both, &short],
            Some(nc(&[])),
            at(31),
            "Keep",
        ),
        (
            "every incomplete one timed out",
            gpu_node(Some(0), vec![pending()]),
            vec![&both, &short],
            Some(nc(&[NGINX])),
            at(601),
            "Remove(TimedOut, 0)",
        ),
    ];
    for (what, node, pcs, nc, t, expected) in rows {
        let d = decide(&node, &pcs, nc.as_ref(), t);
        assert_eq!(kind(&d), expected, "{what}: {d:?}");
    }
}

#[test]
fn keep_reports_the_next_deadline_and_what_is_missing() {
    let long = gating_pc("long", &["nginx:1.27"], 600);
    let short = gating_pc("short", &["busybox:1.36"], 30);
    let node = gpu_node(Some(0), vec![pending()]);
    let d = decide(&node, &[&short, &long], Some(&nc(&[])), at(10));
    let Decision::Keep {
        precaches,
        deadline,
        waiting,
    } = &d
    else {
        panic!("{d:?}")
    };
    assert_eq!(precaches, &["long", "short"]);
    assert_eq!(*deadline, Some(at(30)));
    assert!(
        waiting.contains("short: docker.io/library/busybox:1.36"),
        "{waiting}"
    );
    let st = gate_status(&d, at(10)).unwrap();
    assert_eq!(st.state, "Holding");
    assert_eq!(st.time, Some(Time(at(30))));
    // Past the short one's deadline, the long one's is next.
    let d = decide(&node, &[&short, &long], Some(&nc(&[])), at(31));
    assert!(
        matches!(d, Decision::Keep { deadline: Some(t), .. } if t == at(600)),
        "{d:?}"
    );
}

#[test]
fn a_precache_created_for_an_already_gated_node_gets_its_whole_timeout() {
    let mut pc = gating_pc("late", &["nginx:1.27"], 60);
    pc.metadata.creation_timestamp = Some(Time(at(1_000)));
    let node = gpu_node(Some(0), vec![pending()]);
    assert_eq!(deadline(&pc, at(0)), at(1_060));
    assert_eq!(kind(&decide(&node, &[&pc], None, at(1_059))), "Keep");
    assert_eq!(
        kind(&decide(&node, &[&pc], None, at(1_060))),
        "Remove(TimedOut, 0)"
    );
}

#[test]
fn the_removal_patch_tests_the_taint_it_removes() {
    let patch = removal_patch(2);
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/spec/taints/2/key", "value": "larder.dev/precache-pending"},
            {"op": "test", "path": "/spec/taints/2/effect", "value": "NoSchedule"},
            {"op": "remove", "path": "/spec/taints/2"},
        ])
    );
    // On a node whose taints moved, the patch fails instead of removing another taint.
    let mut moved = json!({"spec": {"taints": [
        {"key": "a", "effect": "NoSchedule"},
        {"key": "larder.dev/precache-pending", "effect": "NoSchedule"},
    ]}});
    let p: json_patch::Patch = serde_json::from_value(removal_patch(0)).unwrap();
    assert!(json_patch::patch(&mut moved, &p).is_err());
    let p: json_patch::Patch = serde_json::from_value(removal_patch(1)).unwrap();
    json_patch::patch(&mut moved, &p).unwrap();
    assert_eq!(
        moved["spec"]["taints"],
        json!([{"key": "a", "effect": "NoSchedule"}])
    );
}

#[test]
fn status_is_rewritten_on_state_or_deadline_changes_only() {
    let holding = |deadline: i64, message: &str| NodeGateStatus {
        state: "Holding".into(),
        precaches: vec!["p".into()],
        time: Some(Time(at(deadline))),
        message: Some(message.into()),
    };
    let a = holding(30, "waiting for p: x, y");
    assert!(gate_status_changed(None, Some(&a)));
    assert!(!gate_status_changed(
        Some(&a),
        Some(&holding(30, "waiting for p: y"))
    ));
    assert!(gate_status_changed(
        Some(&a),
        Some(&holding(60, "waiting for p: y"))
    ));
    let done = NodeGateStatus {
        state: "Complete".into(),
        ..a.clone()
    };
    assert!(gate_status_changed(Some(&a), Some(&done)));
    assert!(!gate_status_changed(Some(&done), None));
}

#[test]
fn gated_nodes_jump_the_rolling_wave() {
    let mut pc = gating_pc("base", &["nginx:1.27"], 600);
    pc.spec.max_concurrent.nodes = 1;
    let mut busy = node("gpu-0", &[("pool", "gpu")], Some("amd64"));
    busy.metadata.uid = Some("u0".into());
    let gated = gpu_node(Some(0), vec![pending()]);
    let mut plain = node("gpu-2", &[("pool", "gpu")], Some("amd64"));
    plain.metadata.uid = Some("u2".into());
    let specs = crate::precache::plan::node_specs(
        &[&pc],
        &[&busy, &gated, &plain],
        &BTreeMap::new(),
        &BTreeMap::new(),
        &Default::default(),
        now(),
    );
    let names: Vec<&String> = specs.keys().collect();
    assert_eq!(
        names,
        ["gpu-0", "gpu-1"],
        "the wave of 1 takes gpu-0; gated gpu-1 too"
    );
}

#[test]
fn metrics_show_every_series_from_the_start() {
    let mut registry = Registry::default();
    GateMetrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for series in [
        "larder_controller_gated_nodes 0",
        "larder_controller_gate_wait_seconds_count 0",
        "larder_controller_gate_timeouts_total 0",
    ] {
        assert!(text.contains(series), "{series} in\n{text}");
    }
}

mod api {
    //! [`apply`] against a mock apiserver: exactly the calls it must make, in order.

    use std::sync::Arc;
    use std::time::Duration;

    use http::{Method, StatusCode};

    use super::*;
    use crate::mock_apiserver::{self, STEP, api_error, client};
    use crate::precache::reconcile::Snapshot;

    fn named(mut n: Node, name: &str, pool: &str) -> Node {
        n.metadata.name = Some(name.into());
        n.metadata.labels = Some([("pool".to_owned(), pool.to_owned())].into());
        n
    }

    fn nc_named(name: &str, ready: &[&str]) -> NodeCache {
        let mut n = nc(ready);
        n.metadata.name = Some(name.into());
        n
    }

    fn snapshot() -> Snapshot {
        let pc = gating_pc("base", &["nginx:1.27", "busybox:1.36"], 600);
        Snapshot::new(
            vec![Arc::new(pc)],
            vec![
                // Tainted, but no gating Precache selects it: no call at all.
                Arc::new(named(gpu_node(Some(0), vec![pending()]), "cpu-1", "cpu")),
                // Both images on disk: released.
                Arc::new(named(gpu_node(Some(0), vec![pending()]), "gpu-1", "gpu")),
                // One image missing: held, its status says so.
                Arc::new(named(gpu_node(Some(0), vec![pending()]), "gpu-2", "gpu")),
            ],
            vec![
                Arc::new(nc_named("gpu-1", &[NGINX, BUSYBOX])),
                Arc::new(nc_named("gpu-2", &[NGINX])),
            ],
            Vec::new(),
        )
    }

    fn node_answer(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    }

    fn nc_answer(name: &str) -> Value {
        json!({"apiVersion": "larder.dev/v1alpha1", "kind": "NodeCache", "metadata": {"name": name},
               "spec": {"platform": "linux/amd64", "maxConcurrent": 1}})
    }

    fn gate() -> Gate {
        Gate {
            recorder: None,
            metrics: GateMetrics::default(),
        }
    }

    #[tokio::test]
    async fn a_complete_node_is_patched_once_a_held_one_gets_its_status_and_the_rest_nothing() {
        let (client, mut h) = client();
        let server = tokio::spawn(async move {
            let call = mock_apiserver::expect_within(
                &mut h,
                STEP,
                Method::PATCH,
                "/api/v1/nodes/gpu-1",
                StatusCode::OK,
                node_answer("gpu-1"),
            )
            .await;
            assert_eq!(
                call.content_type.as_deref(),
                Some("application/json-patch+json")
            );
            assert_eq!(call.body, removal_patch(0));
            let call = mock_apiserver::expect_within(
                &mut h,
                STEP,
                Method::PATCH,
                "/apis/larder.dev/v1alpha1/nodecaches/gpu-1/status",
                StatusCode::OK,
                nc_answer("gpu-1"),
            )
            .await;
            assert_eq!(
                call.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            assert_eq!(call.body["status"]["gate"]["state"], "Complete");
            assert_eq!(
                call.body["status"].as_object().unwrap().len(),
                1,
                "only status.gate"
            );
            let call = mock_apiserver::expect_within(
                &mut h,
                STEP,
                Method::PATCH,
                "/apis/larder.dev/v1alpha1/nodecaches/gpu-2/status",
                StatusCode::OK,
                nc_answer("gpu-2"),
            )
            .await;
            assert_eq!(call.body["status"]["gate"]["state"], "Holding");
            assert!(
                call.body["status"]["gate"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(BUSYBOX)
            );
            mock_apiserver::no_more_calls(&mut h, Duration::from_millis(200)).await;
        });
        let out = apply(&client, &snapshot(), &gate(), at(10)).await;
        server.await.unwrap();
        assert_eq!(
            out,
            GateOutcome {
                gated: 1,
                removed: 1,
                writes: 3,
                next_deadline: Some(at(600)),
            }
        );
    }

    #[tokio::test]
    async fn a_refused_removal_keeps_the_node_gated_and_writes_nothing_else_for_it() {
        let (client, mut h) = client();
        let server = tokio::spawn(async move {
            mock_apiserver::expect_within(
                &mut h,
                STEP,
                Method::PATCH,
                "/api/v1/nodes/gpu-1",
                StatusCode::UNPROCESSABLE_ENTITY,
                api_error(422, "Invalid"),
            )
            .await;
            mock_apiserver::expect_within(
                &mut h,
                STEP,
                Method::PATCH,
                "/apis/larder.dev/v1alpha1/nodecaches/gpu-2/status",
                StatusCode::OK,
                nc_answer("gpu-2"),
            )
            .await;
            mock_apiserver::no_more_calls(&mut h, Duration::from_millis(200)).await;
        });
        let g = gate();
        let out = apply(&client, &snapshot(), &g, at(10)).await;
        server.await.unwrap();
        assert_eq!((out.gated, out.removed), (2, 0));
        assert_eq!(g.metrics.gated.get(), 2, "the gauge counts it as held");
    }
}
