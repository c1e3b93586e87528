use super::*;
use k8s_openapi::api::core::v1::{NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use larder_core::crd::{
    CachedImageStatus, MaxConcurrent, NodeCacheStatus, NodeImageStatus, PrecacheSpec,
};

pub(crate) fn now() -> Timestamp {
    "2026-11-22T12:00:00Z".parse().unwrap()
}

pub(crate) fn precache(name: &str, images: &[&str], selector: Option<&[(&str, &str)]>) -> Precache {
    let mut pc = Precache::new(
        name,
        PrecacheSpec {
            images: images.iter().map(|s| (*s).to_owned()).collect(),
            schedule: None,
            node_selector: selector.map(|s| {
                s.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect()
            }),
            max_concurrent: MaxConcurrent::default(),
            refresh: Refresh::Always,
            pull_secrets: Vec::new(),
            readiness_gate: None,
        },
    );
    pc.metadata.generation = Some(1);
    pc
}

pub(crate) fn node(name: &str, labels: &[(&str, &str)], arch: Option<&str>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        status: arch.map(|a| NodeStatus {
            node_info: Some(NodeSystemInfo {
                architecture: a.into(),
                operating_system: "linux".into(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

pub(crate) fn ready_image(reference: &str, digest: &str) -> CachedImage {
    let r = Reference::parse(reference).unwrap();
    let mut ci = CachedImage::new(&r.cached_image_name(), CachedImageSpec::new(r.to_string()));
    ci.status = Some(CachedImageStatus {
        phase: Some(Phase::Ready),
        digest: Some(digest.into()),
        size_bytes: Some(10),
        ..CachedImageStatus::default()
    });
    ci
}

pub(crate) fn node_cache(node: &str, spec: NodeCacheSpec, ready: &[&str]) -> NodeCache {
    let mut nc = NodeCache::new(node, spec);
    nc.status = Some(NodeCacheStatus {
        images: ready
            .iter()
            .map(|i| NodeImageStatus {
                image: (*i).into(),
                phase: NodeImagePhase::Ready,
                digest: None,
                bytes_done: 5,
                size_bytes: Some(5),
                reason: None,
            })
            .collect(),
        ..NodeCacheStatus::default()
    });
    nc
}

#[test]
fn listed_images_become_retained_labelled_cached_images_and_are_released_when_unlisted() {
    let mut pc = precache("p", &["nginx:1.27", "nginx:1.27", "not a ref"], None);
    pc.spec.pull_secrets = vec![SecretRef {
        namespace: "ns".into(),
        name: "creds".into(),
    }];
    let wanted = wanted_images([&pc]);
    assert_eq!(wanted.len(), 1);
    let changes = image_changes(&wanted, []);
    let [ImageChange::Create(ci)] = &changes[..] else {
        panic!("{changes:?}")
    };
    assert!(ci.spec.retain && is_precached(ci));
    assert_eq!(ci.spec.source_image, "docker.io/library/nginx:1.27");
    assert_eq!(ci.spec.pull_secrets[0].name, "creds");
    // Once it exists as asked: nothing to write.
    assert_eq!(image_changes(&wanted, [&**ci]), []);
    // An unlabelled, unretained object for the same image (a pod created it) is adopted.
    let mut by_pod = (**ci).clone();
    by_pod.metadata.labels = None;
    by_pod.metadata.annotations = None;
    by_pod.spec.pull_secrets = Vec::new();
    by_pod.spec.retain = false;
    let changes = image_changes(&wanted, [&by_pod]);
    assert!(matches!(&changes[..], [ImageChange::Patch { patch, .. }]
        if patch["spec"]["retain"] == true && patch["metadata"]["labels"][PRECACHED_LABEL] == "true"));
    // No Precache lists it any more: released, label and the Precache's secret removed.
    let changes = image_changes(&BTreeMap::new(), [&**ci]);
    let [ImageChange::Patch { patch, .. }] = &changes[..] else {
        panic!("{changes:?}")
    };
    assert_eq!(
        patch,
        &json!({
            "metadata": {
                "labels": {PRECACHED_LABEL: null},
                "annotations": {ADDED_SECRETS_ANNOTATION: null},
            },
            "spec": {"retain": false, "pullSecrets": null},
        })
    );
    // Retained by hand (no label): never touched.
    let mut by_hand = by_pod.clone();
    by_hand.spec.retain = true;
    assert_eq!(image_changes(&BTreeMap::new(), [&by_hand]), []);
    // A Precache being deleted wants nothing.
    pc.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    assert!(wanted_images([&pc]).is_empty());
}

#[test]
fn node_selectors_pick_nodes_and_platforms_come_from_the_node() {
    let gpu = node("a", &[("gpu", "yes")], Some("arm64"));
    let plain = node("b", &[("kubernetes.io/arch", "amd64")], None);
    let none = precache("none", &["nginx"], None);
    let all = precache("all", &["nginx"], Some(&[]));
    let some = precache("some", &["busybox"], Some(&[("gpu", "yes")]));
    assert!(!selects(&none, &gpu) && selects(&all, &gpu) && selects(&all, &plain));
    assert!(selects(&some, &gpu) && !selects(&some, &plain));
    assert_eq!(node_platform(&gpu), "linux/arm64/v8");
    assert_eq!(node_platform(&plain), "linux/amd64");
    let ci = ready_image("nginx", "sha256:aa");
    let images = BTreeMap::from([(ci.name_any(), &ci)]);
    let specs = node_specs(
        &[&none, &all, &some],
        &[&gpu, &plain],
        &images,
        &BTreeMap::new(),
        &BTreeSet::new(),
        now(),
    );
    assert_eq!(specs.len(), 2);
    let a = &specs["a"];
    let listed: Vec<(&str, Option<&str>, &[String])> = a
        .images
        .iter()
        .map(|i| (i.image.as_str(), i.digest.as_deref(), &i.precaches[..]))
        .collect();
    assert_eq!(
        listed,
        [
            (
                "docker.io/library/busybox:latest",
                None,
                &["some".to_owned()][..]
            ),
            (
                "docker.io/library/nginx:latest",
                Some("sha256:aa"),
                &["all".to_owned()][..]
            ),
        ]
    );
    assert_eq!(a.max_concurrent, MaxConcurrent::DEFAULT_PER_NODE);
    assert_eq!(specs["b"].images.len(), 1);
}

#[test]
fn max_nodes_is_a_rolling_wave() {
    let mut pc = precache("p", &["nginx"], Some(&[]));
    pc.spec.max_concurrent.nodes = 1;
    let nodes = [
        node("a", &[], None),
        node("b", &[], None),
        node("c", &[], None),
    ];
    let refs: Vec<&Node> = nodes.iter().collect();
    let none = BTreeSet::new();
    let specs = node_specs(
        &[&pc],
        &refs,
        &BTreeMap::new(),
        &BTreeMap::new(),
        &none,
        now(),
    );
    assert_eq!(specs.keys().collect::<Vec<_>>(), ["a"]);
    // a is working: still only a.
    let a_working = node_cache("a", specs["a"].clone(), &[]);
    let current = BTreeMap::from([("a".to_owned(), &a_working)]);
    let specs = node_specs(&[&pc], &refs, &BTreeMap::new(), &current, &none, now());
    assert_eq!(specs.keys().collect::<Vec<_>>(), ["a"]);
    // a is done: b joins, a keeps its images.
    let a_done = node_cache("a", specs["a"].clone(), &["docker.io/library/nginx:latest"]);
    let current = BTreeMap::from([("a".to_owned(), &a_done)]);
    let specs = node_specs(&[&pc], &refs, &BTreeMap::new(), &current, &none, now());
    assert_eq!(specs.keys().collect::<Vec<_>>(), ["a", "b"]);
}

#[test]
fn epochs_rise_when_the_schedule_fires_and_never_pins_digests() {
    let mut pc = precache("p", &["nginx"], Some(&[]));
    pc.spec.refresh = Refresh::Never;
    let n = node("a", &[], None);
    let old = ready_image("nginx", "sha256:old");
    let images = BTreeMap::from([(old.name_any(), &old)]);
    let first = node_specs(
        &[&pc],
        &[&n],
        &images,
        &BTreeMap::new(),
        &BTreeSet::new(),
        now(),
    );
    assert_eq!(first["a"].images[0].digest.as_deref(), Some("sha256:old"));
    assert_eq!(first["a"].epoch, 0);
    let nc = node_cache("a", first["a"].clone(), &[]);
    let current = BTreeMap::from([("a".to_owned(), &nc)]);
    let moved = ready_image("nginx", "sha256:new");
    let images = BTreeMap::from([(moved.name_any(), &moved)]);
    let fired = BTreeSet::from(["p".to_owned()]);
    let next = node_specs(&[&pc], &[&n], &images, &current, &fired, now());
    assert_eq!(next["a"].images[0].digest.as_deref(), Some("sha256:old"));
    assert_eq!(next["a"].epoch, 1);
    pc.spec.refresh = Refresh::Always;
    let next = node_specs(&[&pc], &[&n], &images, &current, &BTreeSet::new(), now());
    assert_eq!(next["a"].images[0].digest.as_deref(), Some("sha256:new"));
    assert_eq!(next["a"].epoch, 0);
}

fn with_phase(mut nc: NodeCache, image: &str, phase: NodeImagePhase) -> NodeCache {
    if let Some(st) = nc.status.as_mut() {
        st.images.push(NodeImageStatus {
            image: image.into(),
            phase,
            digest: None,
            bytes_done: 0,
            size_bytes: None,
            reason: Some("boom".into()),
        });
    }
    nc
}

fn names(specs: &BTreeMap<String, NodeCacheSpec>) -> Vec<&str> {
    specs.keys().map(String::as_str).collect()
}

#[test]
fn a_failed_or_silent_node_frees_its_place_in_the_wave_and_new_nodes_join() {
    let mut pc = precache("p", &["nginx"], Some(&[("pool", "x")]));
    pc.spec.max_concurrent.nodes = 2;
    let nodes: Vec<Node> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| node(n, &[("pool", "x")], None))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let none = BTreeSet::new();
    let specs = node_specs(
        &[&pc],
        &refs,
        &BTreeMap::new(),
        &BTreeMap::new(),
        &none,
        now(),
    );
    assert_eq!(names(&specs), ["a", "b"]);
    let image = "docker.io/library/nginx:latest";
    // a failed (retrying with backoff), b still caching: c takes a's place.
    let a = with_phase(
        node_cache("a", specs["a"].clone(), &[]),
        image,
        NodeImagePhase::Failed,
    );
    let b = with_phase(
        node_cache("b", specs["b"].clone(), &[]),
        image,
        NodeImagePhase::Caching,
    );
    let current = BTreeMap::from([("a".to_owned(), &a), ("b".to_owned(), &b)]);
    let specs = node_specs(&[&pc], &refs, &BTreeMap::new(), &current, &none, now());
    assert_eq!(names(&specs), ["a", "b", "c"]);
    // c has no proxy: no report for 10 minutes, so it stops holding a place; d joins.
    let mut c = NodeCache::new("c", specs["c"].clone());
    c.metadata.creation_timestamp = Some(Time(now()));
    let current = BTreeMap::from([
        ("a".to_owned(), &a),
        ("b".to_owned(), &b),
        ("c".to_owned(), &c),
    ]);
    let specs = node_specs(&[&pc], &refs, &BTreeMap::new(), &current, &none, now());
    assert_eq!(names(&specs), ["a", "b", "c"], "c is new, not yet silent");
    let later = now() + SILENT_AFTER;
    assert!(silent(Some(&c), later) && !silent(Some(&c), now()));
    let specs = node_specs(&[&pc], &refs, &BTreeMap::new(), &current, &none, later);
    assert_eq!(names(&specs), ["a", "b", "c", "d"]);
    // A node that leaves the pool (its label changed) gets no spec: its NodeCache goes.
    let mut moved = nodes.clone();
    moved[1].metadata.labels = Some([("pool".to_owned(), "y".to_owned())].into());
    let refs: Vec<&Node> = moved.iter().collect();
    let specs = node_specs(&[&pc], &refs, &BTreeMap::new(), &current, &none, later);
    assert!(!specs.contains_key("b"), "{specs:?}");
    // A deleted Node's NodeCache is not planned either.
    let specs = node_specs(&[&pc], &refs[2..], &BTreeMap::new(), &current, &none, later);
    assert!(!specs.contains_key("a") && !specs.contains_key("b"));
}

#[test]
fn on_schedule_moves_nodes_only_when_the_schedule_fires_and_a_pin_wins() {
    let mut on_schedule = precache("p", &["nginx"], Some(&[]));
    on_schedule.spec.refresh = Refresh::OnSchedule;
    let follows = precache("q", &["nginx"], Some(&[]));
    let n = node("a", &[], None);
    let old = ready_image("nginx", "sha256:old");
    let images = BTreeMap::from([(old.name_any(), &old)]);
    let none = BTreeSet::new();
    let first = node_specs(
        &[&on_schedule],
        &[&n],
        &images,
        &BTreeMap::new(),
        &none,
        now(),
    );
    assert_eq!(first["a"].images[0].digest.as_deref(), Some("sha256:old"));
    let nc = node_cache("a", first["a"].clone(), &[]);
    let current = BTreeMap::from([("a".to_owned(), &nc)]);
    let moved = ready_image("nginx", "sha256:new");
    let images = BTreeMap::from([(moved.name_any(), &moved)]);
    let both = [&on_schedule, &follows];
    let held = node_specs(&both, &[&n], &images, &current, &none, now());
    assert_eq!(held["a"].images[0].digest.as_deref(), Some("sha256:old"));
    assert_eq!(held["a"].images[0].precaches, ["p", "q"]);
    let fired = BTreeSet::from(["p".to_owned()]);
    let moved_on = node_specs(&both, &[&n], &images, &current, &fired, now());
    assert_eq!(
        moved_on["a"].images[0].digest.as_deref(),
        Some("sha256:new")
    );
    assert_eq!(moved_on["a"].epoch, 1);
    // Not Ready in the cache registry: no digest yet (the proxy waits for one).
    let mut copying = ready_image("nginx", "sha256:x");
    copying.status.as_mut().unwrap().phase = Some(Phase::Copying);
    let images = BTreeMap::from([(copying.name_any(), &copying)]);
    let specs = node_specs(&[&follows], &[&n], &images, &BTreeMap::new(), &none, now());
    assert_eq!(specs["a"].images[0].digest, None);
}

#[test]
fn per_node_limit_is_the_smallest_and_pull_secrets_are_a_union() {
    let secret = |name: &str| SecretRef {
        namespace: "ns".into(),
        name: name.into(),
    };
    let mut p = precache("p", &["nginx", "ghcr.io/org/app:1"], Some(&[]));
    p.spec.max_concurrent.per_node = 4;
    p.spec.pull_secrets = vec![secret("b"), secret("a")];
    let mut q = precache("q", &["ghcr.io/org/app:1"], Some(&[]));
    q.spec.max_concurrent.per_node = 1;
    q.spec.pull_secrets = vec![secret("a"), secret("c")];
    let n = node("a", &[], None);
    let specs = node_specs(
        &[&p, &q],
        &[&n],
        &BTreeMap::new(),
        &BTreeMap::new(),
        &BTreeSet::new(),
        now(),
    );
    assert_eq!(specs["a"].max_concurrent, 1);
    assert_eq!(specs["a"].images.len(), 2);
    let wanted = wanted_images([&p, &q]);
    let app = &wanted[&Reference::parse("ghcr.io/org/app:1")
        .unwrap()
        .cached_image_name()];
    let got: Vec<&str> = app.pull_secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(got, ["a", "b", "c"]);
    // The existing object's secrets differ from the union: patched to the union.
    let changes = image_changes(&wanted, []);
    let created: Vec<&CachedImage> = changes
        .iter()
        .map(|c| match c {
            ImageChange::Create(ci) => &**ci,
            ImageChange::Patch { .. } => panic!("{c:?}"),
        })
        .collect();
    let mut stale = created[0].clone();
    stale.spec.pull_secrets.pop();
    let changes = image_changes(&wanted, [&stale, created[1]]);
    assert!(matches!(&changes[..], [ImageChange::Patch { patch, .. }]
        if patch["spec"]["pullSecrets"].as_array().map(Vec::len) == Some(stale.spec.pull_secrets.len() + 1)));
    // A Precache being deleted puts nothing on nodes.
    let mut gone = p.clone();
    gone.metadata.deletion_timestamp = Some(Time(now()));
    assert!(
        node_specs(
            &[&gone],
            &[&n],
            &BTreeMap::new(),
            &BTreeMap::new(),
            &BTreeSet::new(),
            now()
        )
        .is_empty()
    );
}

#[test]
fn platforms_prefer_node_info_then_labels_with_arm_variants() {
    let mut n = node(
        "a",
        &[("kubernetes.io/arch", "arm"), ("kubernetes.io/os", "linux")],
        None,
    );
    assert_eq!(node_platform(&n), "linux/arm/v7");
    n.metadata.labels = Some([("kubernetes.io/os".to_owned(), "windows".to_owned())].into());
    assert_eq!(node_platform(&n), "windows/amd64");
    let mut info = node("b", &[("kubernetes.io/arch", "amd64")], Some("arm64"));
    assert_eq!(node_platform(&info), "linux/arm64/v8");
    info.status = Some(NodeStatus {
        node_info: Some(NodeSystemInfo {
            architecture: "s390x".into(),
            operating_system: String::new(),
            ..NodeSystemInfo::default()
        }),
        ..NodeStatus::default()
    });
    assert_eq!(node_platform(&info), "linux/s390x");
    assert_eq!(node_platform(&node("c", &[], None)), "linux/amd64");
}

#[test]
fn hand_retained_images_and_secrets_set_by_others_survive_a_precache() {
    let secret = |name: &str| SecretRef {
        namespace: "ns".into(),
        name: name.into(),
    };
    let mut pc = precache("p", &["nginx"], None);
    pc.spec.pull_secrets = vec![secret("ours"), secret("shared")];
    let wanted = wanted_images([&pc]);
    // Retained by hand, with the user's own secrets.
    let mut ci = ready_image("nginx", "sha256:aa");
    ci.spec.retain = true;
    ci.spec.pull_secrets = vec![secret("theirs"), secret("shared")];
    let changes = image_changes(&wanted, [&ci]);
    let [ImageChange::Patch { patch, .. }] = &changes[..] else {
        panic!("{changes:?}")
    };
    // Not labelled (so never released), retain untouched; only the missing secret is added,
    // after the user's, and recorded.
    assert_eq!(
        patch,
        &json!({
            "metadata": {"annotations": {ADDED_SECRETS_ANNOTATION: r#"[{"name":"ours","namespace":"ns"}]"#}},
            "spec": {"pullSecrets": [
                {"namespace": "ns", "name": "theirs"},
                {"namespace": "ns", "name": "shared"},
                {"namespace": "ns", "name": "ours"},
            ]},
        })
    );
    // Applied: nothing more to write.
    let mut applied = ci.clone();
    applied.metadata.annotations = Some(
        [(
            ADDED_SECRETS_ANNOTATION.to_owned(),
            patch["metadata"]["annotations"][ADDED_SECRETS_ANNOTATION]
                .as_str()
                .unwrap()
                .to_owned(),
        )]
        .into(),
    );
    applied.spec.pull_secrets =
        serde_json::from_value(patch["spec"]["pullSecrets"].clone()).unwrap();
    assert_eq!(image_changes(&wanted, [&applied]), []);
    // The Precache goes: exactly the added secret goes, the object stays retained.
    let changes = image_changes(&BTreeMap::new(), [&applied]);
    let [ImageChange::Patch { patch, .. }] = &changes[..] else {
        panic!("{changes:?}")
    };
    assert_eq!(
        patch,
        &json!({
            "metadata": {"annotations": {ADDED_SECRETS_ANNOTATION: null}},
            "spec": {"pullSecrets": [
                {"namespace": "ns", "name": "theirs"},
                {"namespace": "ns", "name": "shared"},
            ]},
        })
    );
    // Hand-retained without secrets, listed without secrets: nothing at all to write.
    let mut plain = ready_image("nginx", "sha256:aa");
    plain.spec.retain = true;
    let bare = wanted_images([&precache("q", &["nginx"], None)]);
    assert_eq!(image_changes(&bare, [&plain]), []);
    assert_eq!(image_changes(&BTreeMap::new(), [&plain]), []);
}
