//! The precache pass against a mock apiserver (tower-test): each scenario gives the pass a
//! snapshot of the caches, then answers the API calls it must make, in order, and checks that
//! nothing else is called.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt as _;
use larder_core::crd::{
    CachedImage, NodeCache, NodeCacheStatus, NodeImagePhase, NodeImageStatus, Precache,
    PrecacheStatus, Refresh,
};
use larder_core::reference::Reference;
use serde_json::{Value, json};

use crate::mock_apiserver::{self, Handle, STEP, api_error, client};

use super::plan::tests::{node, now, precache, ready_image};
use super::plan::{PRECACHED_LABEL, node_specs};
use super::reconcile::{Outcome, PrecacheMetrics, Snapshot, pass};

const API: &str = "/apis/larder.dev/v1alpha1";

fn ci_name(reference: &str) -> String {
    Reference::parse(reference).unwrap().cached_image_name()
}

/// Expects one call (see [`mock_apiserver::expect_within`]); a PATCH must be a merge patch,
/// the only kind the pass sends.
async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    body: Value,
) -> Value {
    let patch = method == Method::PATCH;
    let call = mock_apiserver::expect_within(handle, STEP, method, path, status, body).await;
    if patch {
        assert_eq!(
            call.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
    }
    call.body
}

async fn expect_nothing_more(handle: &mut Handle) {
    mock_apiserver::no_more_calls(handle, Duration::from_millis(200)).await;
}

/// A small object of `kind`, what a successful PATCH answers.
fn answer(kind: &str) -> Value {
    let spec = match kind {
        "Precache" => json!({"images": []}),
        _ => json!({"platform": "linux/amd64", "maxConcurrent": 1}),
    };
    json!({"apiVersion": "larder.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec})
}

fn with_uid(mut n: Node, uid: &str) -> Node {
    n.metadata.uid = Some(uid.into());
    n
}

fn labelled(mut ci: CachedImage) -> CachedImage {
    ci.metadata.labels = Some([(PRECACHED_LABEL.to_owned(), "true".to_owned())].into());
    ci.spec.retain = true;
    ci
}

fn snapshot(
    precaches: Vec<Precache>,
    nodes: Vec<Node>,
    node_caches: Vec<NodeCache>,
    images: Vec<CachedImage>,
) -> Snapshot {
    Snapshot::new(
        precaches.into_iter().map(Arc::new).collect(),
        nodes.into_iter().map(Arc::new).collect(),
        node_caches.into_iter().map(Arc::new).collect(),
        images.into_iter().map(Arc::new).collect(),
    )
}

/// Runs one pass while `server` answers; returns the pass's outcome.
async fn run_pass<F>(snap: Snapshot, at: Timestamp, server: impl FnOnce(Handle) -> F) -> Outcome
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (client, handle) = client();
    let server = tokio::spawn(server(handle));
    let outcome = pass(&client, &snap, &PrecacheMetrics::default(), at).await;
    server.await.unwrap();
    outcome
}

#[tokio::test]
async fn a_new_precache_creates_retained_images_and_node_caches_for_matching_nodes() {
    let pc = precache("base", &["nginx:1.27"], Some(&[("pool", "x")]));
    let nodes = vec![
        with_uid(node("a", &[("pool", "x")], Some("arm64")), "uid-a"),
        with_uid(node("b", &[("pool", "y")], None), "uid-b"),
    ];
    let snap = snapshot(vec![pc.clone()], nodes, vec![], vec![]);
    let image = ci_name("nginx:1.27");
    let outcome = run_pass(snap, now(), |mut h| async move {
        let created = expect(
            &mut h,
            Method::POST,
            &format!("{API}/cachedimages"),
            StatusCode::CREATED,
            Value::Null,
        )
        .await;
        assert_eq!(created["metadata"]["name"], image.as_str());
        assert_eq!(created["metadata"]["labels"][PRECACHED_LABEL], "true");
        assert_eq!(created["spec"]["retain"], true);
        assert_eq!(
            created["spec"]["sourceImage"],
            "docker.io/library/nginx:1.27"
        );
        serde_json::from_value::<CachedImage>(created).expect("a whole CachedImage");
        let nc = expect(
            &mut h,
            Method::POST,
            &format!("{API}/nodecaches"),
            StatusCode::CREATED,
            Value::Null,
        )
        .await;
        assert_eq!(nc["metadata"]["name"], "a");
        assert_eq!(nc["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(nc["metadata"]["ownerReferences"][0]["uid"], "uid-a");
        assert_eq!(nc["spec"]["platform"], "linux/arm64/v8");
        assert_eq!(nc["spec"]["maxConcurrent"], 2);
        assert_eq!(
            nc["spec"]["images"],
            json!([{"image": "docker.io/library/nginx:1.27", "precaches": ["base"]}])
        );
        let st = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/precaches/base/status"),
            StatusCode::OK,
            answer("Precache"),
        )
        .await;
        let st = &st["status"];
        assert_eq!(st["imagesSummary"], "0/1");
        assert_eq!(st["nodesSummary"], "0/1");
        assert_eq!(
            st["nodes"],
            json!([{"node": "a", "phase": "Pending", "imagesReady": 0, "bytesDone": 0}])
        );
        assert_eq!(st["conditions"][0]["reason"], "Copying");
        assert!(st["lastScheduleTime"].is_null());
        expect_nothing_more(&mut h).await;
    })
    .await;
    assert_eq!(outcome.image_writes, 1);
    assert_eq!(outcome.writes, 3);
    assert_eq!(outcome.next_fire, None);
}

#[tokio::test]
async fn an_unlisted_image_is_released_and_a_node_that_left_the_selector_loses_its_node_cache() {
    let pc = precache("base", &["busybox:1.36"], Some(&[("pool", "x")]));
    let nginx = labelled(ready_image("nginx:1.27", "sha256:aa"));
    let busybox = labelled(ready_image("busybox:1.36", "sha256:bb"));
    // Retained by hand: no label, never released.
    let mut by_hand = ready_image("redis:7", "sha256:cc");
    by_hand.spec.retain = true;
    // Node a was selected (it has a NodeCache) but its label changed; b is selected now.
    let a = node("a", &[("pool", "y")], None);
    let b = with_uid(node("b", &[("pool", "x")], None), "uid-b");
    let old_spec = node_specs(
        &[&pc],
        &[&node("a", &[("pool", "x")], None)],
        &Default::default(),
        &Default::default(),
        &Default::default(),
        now(),
    );
    let nc_a = NodeCache::new("a", old_spec["a"].clone());
    let snap = snapshot(
        vec![pc],
        vec![a, b],
        vec![nc_a],
        vec![nginx.clone(), busybox, by_hand],
    );
    let nginx_name = nginx.name_any();
    let outcome = run_pass(snap, now(), |mut h| async move {
        let patch = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/cachedimages/{nginx_name}"),
            StatusCode::OK,
            serde_json::to_value(&nginx).unwrap(),
        )
        .await;
        assert_eq!(
            patch,
            json!({"metadata": {"labels": {PRECACHED_LABEL: null}}, "spec": {"retain": false}})
        );
        let nc = expect(
            &mut h,
            Method::POST,
            &format!("{API}/nodecaches"),
            StatusCode::CREATED,
            Value::Null,
        )
        .await;
        assert_eq!(nc["metadata"]["name"], "b");
        assert_eq!(nc["spec"]["images"][0]["digest"], "sha256:bb");
        expect(
            &mut h,
            Method::DELETE,
            &format!("{API}/nodecaches/a"),
            StatusCode::OK,
            api_error(200, "Success"),
        )
        .await;
        let st = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/precaches/base/status"),
            StatusCode::OK,
            answer("Precache"),
        )
        .await;
        assert_eq!(st["status"]["imagesSummary"], "1/1");
        assert_eq!(st["status"]["nodesSummary"], "0/1");
        expect_nothing_more(&mut h).await;
    })
    .await;
    assert_eq!(outcome.image_writes, 1);
}

#[tokio::test]
async fn node_reports_fold_into_the_status_once_and_an_unchanged_world_writes_nothing() {
    let pc = precache("base", &["nginx:1.27"], Some(&[]));
    let ci = labelled(ready_image("nginx:1.27", "sha256:aa"));
    let n = node("a", &[], None);
    let spec = node_specs(
        &[&pc],
        &[&n],
        &[(ci.name_any(), &ci)].into(),
        &Default::default(),
        &Default::default(),
        now(),
    );
    let mut nc = NodeCache::new("a", spec["a"].clone());
    nc.status = Some(NodeCacheStatus {
        images: vec![NodeImageStatus {
            image: "docker.io/library/nginx:1.27".into(),
            phase: NodeImagePhase::Ready,
            digest: Some("sha256:aa".into()),
            bytes_done: 4096,
            size_bytes: Some(4096),
            reason: None,
        }],
        images_ready: 1,
        bytes_done: 4096,
        ..NodeCacheStatus::default()
    });
    let snap = snapshot(
        vec![pc.clone()],
        vec![n.clone()],
        vec![nc.clone()],
        vec![ci.clone()],
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_pass(snap, now(), |mut h| async move {
        let st = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/precaches/base/status"),
            StatusCode::OK,
            answer("Precache"),
        )
        .await;
        assert_eq!(st["status"]["nodesSummary"], "1/1");
        assert_eq!(st["status"]["nodes"][0]["bytesDone"], 4096);
        assert_eq!(st["status"]["conditions"][0]["status"], "True");
        expect_nothing_more(&mut h).await;
        tx.send(st["status"].clone()).unwrap();
    })
    .await;
    // The next pass sees the status it wrote (nulls are absent fields): no write at all.
    let mut written = rx.await.unwrap();
    written.as_object_mut().unwrap().retain(|_, v| !v.is_null());
    let mut pc = pc;
    pc.status = Some(serde_json::from_value::<PrecacheStatus>(written).unwrap());
    let snap = snapshot(vec![pc], vec![n], vec![nc], vec![ci]);
    let later = now() + k8s_openapi::jiff::SignedDuration::from_secs(30);
    let outcome = run_pass(snap, later, |mut h| async move {
        expect_nothing_more(&mut h).await
    })
    .await;
    assert_eq!(outcome, Outcome::default());
}

#[tokio::test]
async fn a_fired_schedule_rechecks_tags_raises_epochs_and_records_the_times() {
    let mut follows = precache("follows", &["nginx:1.27"], Some(&[]));
    follows.spec.schedule = Some("0 3 * * *".into());
    follows.metadata.creation_timestamp = Some(Time("2026-11-20T00:00:00Z".parse().unwrap()));
    let mut pinned = follows.clone();
    pinned.metadata.name = Some("pinned".into());
    pinned.spec.images = vec!["busybox:1.36".into()];
    pinned.spec.refresh = Refresh::Never;
    let mut broken = precache("broken", &["nginx:1.27"], None);
    broken.spec.schedule = Some("at three".into());
    let nginx = labelled(ready_image("nginx:1.27", "sha256:aa"));
    let busybox = labelled(ready_image("busybox:1.36", "sha256:bb"));
    let n = node("a", &[], None);
    let images = [(nginx.name_any(), &nginx), (busybox.name_any(), &busybox)].into();
    let spec = node_specs(
        &[&follows, &pinned],
        &[&n],
        &images,
        &Default::default(),
        &Default::default(),
        now(),
    );
    let mut nc = NodeCache::new("a", spec["a"].clone());
    nc.status = Some(NodeCacheStatus::default());
    let at: Timestamp = "2026-11-22T03:00:20Z".parse().unwrap();
    let snap = snapshot(
        vec![follows, pinned, broken],
        vec![n],
        vec![nc],
        vec![nginx.clone(), busybox],
    );
    let nginx_name = nginx.name_any();
    let outcome = run_pass(snap, at, |mut h| async move {
        // Only the Precache that follows tags asks for a re-check; `Never` does not.
        let refresh = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/cachedimages/{nginx_name}/status"),
            StatusCode::OK,
            serde_json::to_value(&nginx).unwrap(),
        )
        .await;
        assert_eq!(refresh, json!({"status": {"lastSync": null}}));
        let nc = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/nodecaches/a"),
            StatusCode::OK,
            answer("NodeCache"),
        )
        .await;
        assert_eq!(nc["spec"]["epoch"], 1);
        let st = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/precaches/broken/status"),
            StatusCode::OK,
            answer("Precache"),
        )
        .await;
        let cond = &st["status"]["conditions"][1];
        assert_eq!(
            (cond["type"].as_str(), cond["status"].as_str()),
            (Some("ScheduleValid"), Some("False"))
        );
        assert!(
            cond["message"]
                .as_str()
                .unwrap()
                .contains("expected 5 fields")
        );
        for name in ["follows", "pinned"] {
            let st = expect(
                &mut h,
                Method::PATCH,
                &format!("{API}/precaches/{name}/status"),
                StatusCode::OK,
                answer("Precache"),
            )
            .await;
            assert_eq!(st["status"]["lastScheduleTime"], "2026-11-22T03:00:20Z");
            assert_eq!(st["status"]["nextScheduleTime"], "2026-11-23T03:00:00Z");
        }
        expect_nothing_more(&mut h).await;
    })
    .await;
    assert_eq!(
        outcome.next_fire,
        Some("2026-11-23T03:00:00Z".parse().unwrap())
    );
}

#[tokio::test]
async fn refused_writes_are_logged_and_the_rest_of_the_pass_goes_on() {
    let pc = precache("base", &["nginx:1.27", "busybox:1.36"], Some(&[]));
    let n = with_uid(node("a", &[], None), "uid-a");
    let snap = snapshot(vec![pc], vec![n], vec![], vec![]);
    let outcome = run_pass(snap, now(), |mut h| async move {
        // Created meanwhile by someone else: fine. Forbidden: logged, next pass retries.
        expect(
            &mut h,
            Method::POST,
            &format!("{API}/cachedimages"),
            StatusCode::CONFLICT,
            api_error(409, "AlreadyExists"),
        )
        .await;
        expect(
            &mut h,
            Method::POST,
            &format!("{API}/cachedimages"),
            StatusCode::FORBIDDEN,
            api_error(403, "Forbidden"),
        )
        .await;
        expect(
            &mut h,
            Method::POST,
            &format!("{API}/nodecaches"),
            StatusCode::INTERNAL_SERVER_ERROR,
            api_error(500, "InternalError"),
        )
        .await;
        let st = expect(
            &mut h,
            Method::PATCH,
            &format!("{API}/precaches/base/status"),
            StatusCode::NOT_FOUND,
            api_error(404, "NotFound"),
        )
        .await;
        assert_eq!(st["status"]["imagesSummary"], "0/2");
        expect_nothing_more(&mut h).await;
    })
    .await;
    assert_eq!((outcome.image_writes, outcome.writes), (2, 4));
}
