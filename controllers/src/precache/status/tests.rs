use super::*;
use crate::precache::plan::tests::{node, node_cache, now, precache, ready_image};
use crate::precache::plan::{SILENT_AFTER, node_specs};
use larder_core::crd::{NodeImageStatus, PrecacheSpec};

#[test]
fn images_are_counted_and_an_unchanged_world_gives_an_equal_status() {
    let pc = precache("p", &["nginx", "busybox", "nginx:latest", "Bad Ref"], None);
    let mut ci = ready_image("nginx", "sha256:aa");
    ci.status.as_mut().unwrap().size_bytes = Some(1234);
    let mut failing = ready_image("busybox", "sha256:bb");
    let s = failing.status.as_mut().unwrap();
    s.phase = Some(Phase::Failed);
    s.conditions = vec![Condition {
        type_: "Ready".into(),
        status: "False".into(),
        reason: "CopyFailed".into(),
        message: "origin said 404".into(),
        last_transition_time: Time(now()),
        observed_generation: None,
    }];
    let images = BTreeMap::from([(ci.name_any(), &ci), (failing.name_any(), &failing)]);
    let st = status(&pc, &images, &[], &BTreeMap::new(), None, now());
    // `nginx` and `nginx:latest` are one image.
    assert_eq!((st.images_ready, st.images_total), (1, 3));
    assert_eq!(st.images_summary.as_deref(), Some("1/3"));
    assert_eq!(
        st.nodes_summary.as_deref(),
        Some("-"),
        "no selector: no nodes"
    );
    assert_eq!(st.images[0].size_bytes, Some(1234));
    assert_eq!(
        st.images[0].cached_image.as_deref(),
        Some(ci.name_any().as_str())
    );
    assert_eq!(st.images[1].phase, Some(Phase::Failed));
    assert_eq!(st.images[1].message.as_deref(), Some("origin said 404"));
    assert_eq!(st.images[2].phase, Some(Phase::Failed));
    assert!(
        st.images[2]
            .message
            .as_deref()
            .unwrap()
            .contains("not an image reference")
    );
    let ready = &st.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Copying")
    );
    assert_eq!(st.observed_generation, Some(1));
    // A minute later, nothing changed: the same status, so nothing is written.
    let later = now() + SILENT_AFTER;
    assert_eq!(
        status(&pc, &images, &[], &BTreeMap::new(), Some(&st), later),
        st
    );
}

#[test]
fn nodes_show_the_least_advanced_phase_and_ready_needs_every_node() {
    let pc = precache("p", &["nginx", "busybox"], Some(&[("pool", "x")]));
    let nginx = ready_image("nginx", "sha256:aa");
    let busybox = ready_image("busybox", "sha256:bb");
    let images = BTreeMap::from([(nginx.name_any(), &nginx), (busybox.name_any(), &busybox)]);
    let nodes = [
        node("done", &[("pool", "x")], None),
        node("half", &[("pool", "x")], None),
        node("broken", &[("pool", "x")], None),
        node("waiting", &[("pool", "x")], None),
        node("other", &[("pool", "y")], None),
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    let specs = node_specs(
        &[&pc],
        &refs,
        &images,
        &BTreeMap::new(),
        &BTreeSet::new(),
        now(),
    );
    let (n, b) = (
        "docker.io/library/nginx:latest",
        "docker.io/library/busybox:latest",
    );
    let done = node_cache("done", specs["done"].clone(), &[n, b]);
    let mut half = node_cache("half", specs["half"].clone(), &[n]);
    half.status.as_mut().unwrap().images.push(NodeImageStatus {
        image: b.into(),
        phase: NodeImagePhase::Caching,
        digest: None,
        bytes_done: 100,
        size_bytes: Some(1000),
        reason: None,
    });
    let mut broken = node_cache("broken", specs["broken"].clone(), &[n]);
    broken
        .status
        .as_mut()
        .unwrap()
        .images
        .push(NodeImageStatus {
            image: b.into(),
            phase: NodeImagePhase::Failed,
            digest: None,
            bytes_done: 0,
            size_bytes: None,
            reason: Some("disk full".into()),
        });
    // Admitted, but its proxy never wrote a status.
    let mut waiting = NodeCache::new("waiting", specs["waiting"].clone());
    waiting.metadata.creation_timestamp = Some(Time(now()));
    let current = BTreeMap::from([
        ("done".to_owned(), &done),
        ("half".to_owned(), &half),
        ("broken".to_owned(), &broken),
        ("waiting".to_owned(), &waiting),
    ]);
    let st = status(&pc, &images, &refs, &current, None, now());
    let got: Vec<(&str, NodeImagePhase, u32, u64, Option<&str>)> = st
        .nodes
        .iter()
        .map(|n| {
            (
                n.node.as_str(),
                n.phase,
                n.images_ready,
                n.bytes_done,
                n.reason.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("broken", NodeImagePhase::Failed, 1, 5, Some("disk full")),
            ("half", NodeImagePhase::Caching, 1, 105, None),
            ("waiting", NodeImagePhase::Pending, 0, 0, None),
            ("done", NodeImagePhase::Ready, 2, 10, None),
        ]
    );
    assert_eq!(st.nodes_summary.as_deref(), Some("1/4"));
    assert_eq!((st.images_ready, st.images_total), (2, 2));
    let ready = &st.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NodesCaching")
    );
    assert_eq!(ready.message, "1 of 4 nodes hold every image");
    // Ten minutes on, the silent node says why.
    let st = status(&pc, &images, &refs, &current, None, now() + SILENT_AFTER);
    let waiting = st.nodes.iter().find(|n| n.node == "waiting").unwrap();
    assert!(
        waiting.reason.as_deref().unwrap().contains("no report"),
        "{waiting:?}"
    );
    // Every node done: Ready, and the transition time is when it became so.
    let all = [
        node_cache("done", specs["done"].clone(), &[n, b]),
        node_cache("half", specs["half"].clone(), &[n, b]),
        node_cache("broken", specs["broken"].clone(), &[n, b]),
        node_cache("waiting", specs["waiting"].clone(), &[n, b]),
    ];
    let current: BTreeMap<String, &NodeCache> = all.iter().map(|n| (n.name_any(), n)).collect();
    let later = now() + SILENT_AFTER;
    let done = status(&pc, &images, &refs, &current, Some(&st), later);
    assert_eq!(done.nodes_summary.as_deref(), Some("4/4"));
    assert_eq!(done.conditions[0].status, "True");
    assert_eq!(done.conditions[0].last_transition_time, Time(later));
}

#[test]
fn the_node_list_is_capped_not_ready_first_and_counts_stay_exact() {
    let pc = precache("p", &["nginx"], Some(&[]));
    let nodes: Vec<Node> = (0..STATUS_NODES_CAP + 50)
        .map(|i| node(&format!("n{i:05}"), &[], None))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    // The first 100 nodes hold the image; the rest have not started.
    let specs = node_specs(
        &[&pc],
        &refs,
        &BTreeMap::new(),
        &BTreeMap::new(),
        &BTreeSet::new(),
        now(),
    );
    let ready: Vec<NodeCache> = nodes[..100]
        .iter()
        .map(|n| {
            let spec = specs
                .get(&n.name_any())
                .cloned()
                .unwrap_or_else(|| specs["n00000"].clone());
            node_cache(&n.name_any(), spec, &["docker.io/library/nginx:latest"])
        })
        .collect();
    let current: BTreeMap<String, &NodeCache> = ready.iter().map(|n| (n.name_any(), n)).collect();
    let st = status(&pc, &BTreeMap::new(), &refs, &current, None, now());
    assert_eq!(st.nodes.len(), STATUS_NODES_CAP);
    assert_eq!((st.nodes_ready, st.nodes_total), (100, 1050));
    assert_eq!(st.nodes_summary.as_deref(), Some("100/1050"));
    // 950 not-ready nodes first, then 50 of the ready ones.
    assert!(
        st.nodes[..950]
            .iter()
            .all(|n| n.phase != NodeImagePhase::Ready)
    );
    assert!(
        st.nodes[950..]
            .iter()
            .all(|n| n.phase == NodeImagePhase::Ready)
    );
    let size = serde_json::to_vec(&st).unwrap().len();
    assert!(size < 200 * 1024, "status is {size} bytes");
}

#[test]
fn schedule_times_and_a_bad_expression_land_in_the_status() {
    let pc = precache("p", &["nginx"], None);
    let base = status(&pc, &BTreeMap::new(), &[], &BTreeMap::new(), None, now());
    let fine = schedule::State {
        last: Some(now()),
        next: Some(now() + SILENT_AFTER),
        fired: true,
        error: None,
    };
    let st = with_schedule(base.clone(), Some(&fine), None, Some(1), now());
    assert_eq!(st.last_schedule_time, Some(Time(now())));
    assert_eq!(st.next_schedule_time, Some(Time(now() + SILENT_AFTER)));
    assert_eq!(st.conditions.len(), 1);
    let bad = schedule::State {
        last: None,
        next: None,
        fired: false,
        error: Some("schedule `x`: expected 5 fields".into()),
    };
    let first = with_schedule(base.clone(), Some(&bad), None, Some(2), now());
    let cond = first
        .conditions
        .iter()
        .find(|c| c.type_ == "ScheduleValid")
        .unwrap();
    assert_eq!(
        (cond.status.as_str(), cond.observed_generation),
        ("False", Some(2))
    );
    assert!(cond.message.contains("expected 5 fields"));
    // Still bad later: the same condition, so no write.
    let later = now() + SILENT_AFTER;
    assert_eq!(
        with_schedule(base.clone(), Some(&bad), Some(&first), Some(2), later),
        first
    );
    // The schedule removed: the times go.
    let none = with_schedule(st, None, None, Some(3), now());
    assert_eq!(
        (none.last_schedule_time, none.next_schedule_time),
        (None, None)
    );
}

#[test]
fn merge_patches_clear_fields_that_became_empty() {
    let v = merge_patch(&PrecacheStatus::default());
    let st = &v["status"];
    for key in ["nodesSummary", "nodes", "conditions", "lastScheduleTime"] {
        assert!(st.get(key).is_some_and(Value::is_null), "{key}: {v}");
    }
    assert_eq!(st["imagesTotal"], 0);
    // A full status round-trips through the patch body.
    let pc = Precache::new(
        "p",
        PrecacheSpec {
            images: vec!["nginx".into()],
            ..precache("x", &[], None).spec
        },
    );
    let full = status(&pc, &BTreeMap::new(), &[], &BTreeMap::new(), None, now());
    // Nulls are what a merge patch removes; the rest reads back as the status.
    let mut sent = merge_patch(&full)["status"].clone();
    sent.as_object_mut().unwrap().retain(|_, v| !v.is_null());
    let back: PrecacheStatus = serde_json::from_value(sent).unwrap();
    assert_eq!(back, full);
}
