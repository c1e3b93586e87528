//! The fake's own behaviour: what the controllers and kube-runtime rely on.

use std::time::Duration;

use serde_json::{Value, json};

use super::*;

fn p(s: &str) -> ResourcePath {
    ResourcePath::parse(s).unwrap()
}

fn rv(o: &Value) -> u64 {
    o["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn pod(name: &str, managed: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"larder.dev/managed": managed.to_string()}},
        "spec": {"containers": [{"name": "c", "image": "x"}]}
    })
}

fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Cluster",
                 "names": {"plural": "widgets", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "subresources": {"status": {}}}]}
    })
}

fn filter(resource: &str, labels: &str) -> Filter {
    Filter {
        resource: resource.into(),
        namespace: None,
        labels: LabelSelector::parse(labels).unwrap(),
        fields: FieldSelector::default(),
    }
}

#[test]
fn create_sets_system_fields_and_refuses_duplicates() {
    let store = Store::new(100);
    let pods = p("/api/v1/namespaces/a/pods");
    let created = store.create(&pods, pod("p1", true)).unwrap();
    let meta = &created["metadata"];
    assert_eq!(meta["namespace"], "a");
    assert_eq!(meta["generation"], 1);
    assert_eq!(meta["uid"].as_str().unwrap().len(), 36);
    assert!(meta["creationTimestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(created["status"]["phase"], "Pending");
    let again = store.create(&pods, pod("p1", true)).unwrap_err();
    assert_eq!((again.code, again.reason), (409, "AlreadyExists"));
    // Same name in another namespace is another object; versions only go up.
    let other = store
        .create(&p("/api/v1/namespaces/b/pods"), pod("p1", true))
        .unwrap();
    assert!(rv(&other) > rv(&created));
    let missing = store.get(&p("/api/v1/namespaces/c/pods/p1")).unwrap_err();
    assert_eq!(missing.status()["reason"], "NotFound");
    assert_eq!(missing.status()["code"], 404);
}

#[test]
fn stale_resource_version_is_a_conflict() {
    let store = Store::new(100);
    let leases = p("/apis/coordination.k8s.io/v1/namespaces/n/leases");
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                       "metadata": {"name": "l"}, "spec": {"holderIdentity": "a"}});
    let v1 = store.create(&leases, lease).unwrap();
    let path = p("/apis/coordination.k8s.io/v1/namespaces/n/leases/l");
    let mut by_b = v1.clone();
    by_b["spec"]["holderIdentity"] = json!("b");
    let v2 = store.replace(&path, by_b).unwrap();
    assert_eq!(v2["metadata"]["generation"], 2);
    // A second writer still holding v1 loses.
    let mut by_c = v1.clone();
    by_c["spec"]["holderIdentity"] = json!("c");
    let err = store.replace(&path, by_c).unwrap_err();
    assert_eq!((err.code, err.reason), (409, "Conflict"));
    assert_eq!(store.get(&path).unwrap()["spec"]["holderIdentity"], "b");
    // A merge patch naming a stale version also conflicts.
    let stale = json!({"metadata": {"resourceVersion": rv(&v1).to_string()}, "spec": {"holderIdentity": "d"}});
    let err = store
        .patch(&path, PatchKind::Merge, stale.to_string().as_bytes())
        .unwrap_err();
    assert_eq!(err.code, 409);
    // A no-op write changes nothing, not even the version.
    let same = store.replace(&path, v2.clone()).unwrap();
    assert_eq!(rv(&same), rv(&v2));
}

#[test]
fn status_subresource_separates_spec_and_status_writes() {
    let store = Store::new(100);
    store
        .create(
            &p("/apis/apiextensions.k8s.io/v1/customresourcedefinitions"),
            crd(),
        )
        .unwrap();
    let established = store
        .get(&p(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com",
        ))
        .unwrap();
    assert!(
        established["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
    );
    let widgets = p("/apis/example.com/v1/widgets");
    let w = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
                   "spec": {"size": 1}, "status": {"phase": "Ignored"}});
    let created = store.create(&widgets, w).unwrap();
    assert!(
        created.get("status").is_none(),
        "status is dropped on create"
    );
    let status = p("/apis/example.com/v1/widgets/w/status");
    let patched = store
        .patch(
            &status,
            PatchKind::Merge,
            br#"{"status": {"phase": "Ready"}, "spec": {"size": 9}}"#,
        )
        .unwrap();
    assert_eq!(patched["status"]["phase"], "Ready");
    assert_eq!(
        patched["spec"]["size"], 1,
        "a status write leaves spec alone"
    );
    assert_eq!(patched["metadata"]["generation"], 1);
    let main = p("/apis/example.com/v1/widgets/w");
    let patched = store
        .patch(
            &main,
            PatchKind::Merge,
            br#"{"status": {"phase": "Lost"}, "spec": {"size": 2}}"#,
        )
        .unwrap();
    assert_eq!(
        patched["status"]["phase"], "Ready",
        "a main write leaves status alone"
    );
    assert_eq!(patched["spec"]["size"], 2);
    assert_eq!(patched["metadata"]["generation"], 2);
}

#[test]
fn deletion_waits_for_finalizers_removed_by_json_patch() {
    let store = Store::new(100);
    let widgets = p("/apis/example.com/v1/widgets");
    store
        .create(&widgets, json!({"metadata": {"name": "w"}, "spec": {}}))
        .unwrap();
    let w = p("/apis/example.com/v1/widgets/w");
    // kube-runtime's finalizer helper: test for null, then add.
    let add = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/cleanup"]}
    ]);
    store
        .patch(&w, PatchKind::Json, add.to_string().as_bytes())
        .unwrap();
    let again = store
        .patch(&w, PatchKind::Json, add.to_string().as_bytes())
        .unwrap_err();
    assert_eq!(
        again.code, 422,
        "the test op guards against a concurrent add"
    );

    let deleting = store.delete(&w).unwrap();
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    assert!(store.get(&w).is_ok(), "kept while a finalizer remains");
    let sneak = json!([{"op": "add", "path": "/metadata/finalizers/-", "value": "other"}]);
    assert_eq!(
        store
            .patch(&w, PatchKind::Json, sneak.to_string().as_bytes())
            .unwrap_err()
            .code,
        422,
        "no new finalizers while deleting"
    );
    let remove = json!([
        {"op": "test", "path": "/metadata/finalizers/0", "value": "example.com/cleanup"},
        {"op": "remove", "path": "/metadata/finalizers/0"}
    ]);
    store
        .patch(&w, PatchKind::Json, remove.to_string().as_bytes())
        .unwrap();
    assert_eq!(
        store.get(&w).unwrap_err().code,
        404,
        "gone with its last finalizer"
    );
}

#[test]
fn watch_history_resumes_after_a_version_and_follows_label_selection() {
    let store = Store::new(100);
    let pods = p("/api/v1/namespaces/a/pods");
    let first = store.create(&pods, pod("p1", true)).unwrap();
    let start = rv(&first);
    store.create(&pods, pod("p2", false)).unwrap();
    let p1 = p("/api/v1/namespaces/a/pods/p1");
    store
        .patch(
            &p1,
            PatchKind::Merge,
            br#"{"metadata": {"annotations": {"x": "1"}}}"#,
        )
        .unwrap();
    // p2 enters the selection, p1 leaves it.
    store
        .patch(
            &p("/api/v1/namespaces/a/pods/p2"),
            PatchKind::Merge,
            br#"{"metadata": {"labels": {"larder.dev/managed": "true"}}}"#,
        )
        .unwrap();
    store
        .patch(
            &p1,
            PatchKind::Merge,
            br#"{"metadata": {"labels": {"larder.dev/managed": null}}}"#,
        )
        .unwrap();
    let f = filter("/pods", "larder.dev/managed=true");
    let (events, cursor) = store.changes_since(start, &f, 100).unwrap();
    let seen: Vec<(&str, &str)> = events
        .iter()
        .map(|(k, o)| (*k, o["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [("MODIFIED", "p1"), ("ADDED", "p2"), ("DELETED", "p1")]
    );
    assert_eq!(cursor, store.resource_version());
    // Paged replay resumes where the page stopped.
    let (page, mid) = store.changes_since(start, &f, 1).unwrap();
    assert_eq!(page.len(), 1);
    let (rest, _) = store.changes_since(mid, &f, 100).unwrap();
    assert_eq!(rest.len(), 2);
}

#[test]
fn history_is_bounded_and_old_versions_are_gone() {
    let store = Store::new(3);
    let pods = p("/api/v1/namespaces/a/pods");
    for i in 0..10 {
        store.create(&pods, pod(&format!("p{i}"), true)).unwrap();
    }
    let f = filter("/pods", "");
    let gone = store.changes_since(1, &f, 100).unwrap_err();
    assert_eq!((gone.code, gone.reason), (410, "Expired"));
    assert_eq!(store.changes_since(7, &f, 100).unwrap().0.len(), 3);
}

#[test]
fn lists_page_with_continue_and_select_by_label_and_field() {
    let store = Store::new(100);
    for ns in ["a", "b"] {
        for i in 0..3 {
            let managed = i != 1;
            store
                .create(
                    &p(&format!("/api/v1/namespaces/{ns}/pods")),
                    pod(&format!("p{i}"), managed),
                )
                .unwrap();
        }
    }
    let all = p("/api/v1/pods");
    let mut options = ListOptions {
        labels: LabelSelector::parse("larder.dev/managed=true").unwrap(),
        limit: Some(3),
        ..ListOptions::default()
    };
    let first = store.list(&all, &options).unwrap();
    assert_eq!(first["kind"], "PodList");
    assert_eq!(first["items"].as_array().unwrap().len(), 3);
    let list_rv = first["metadata"]["resourceVersion"].clone();
    options.continue_token = first["metadata"]["continue"].as_str().map(str::to_owned);
    assert!(options.continue_token.is_some());
    let second = store.list(&all, &options).unwrap();
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert!(second["metadata"].get("continue").is_none());
    assert_eq!(
        second["metadata"]["resourceVersion"], list_rv,
        "pages share the first page's version"
    );
    let by_name = ListOptions {
        fields: FieldSelector::parse("metadata.name=p2").unwrap(),
        ..ListOptions::default()
    };
    let named = store
        .list(&p("/api/v1/namespaces/b/pods"), &by_name)
        .unwrap();
    assert_eq!(named["items"].as_array().unwrap().len(), 1);
    assert_eq!(named["items"][0]["metadata"]["namespace"], "b");
}

#[test]
fn apply_creates_then_merges_and_namespace_deletion_cascades() {
    let store = Store::new(100);
    let crd_path = p("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.example.com");
    let body = crd().to_string();
    let created = store
        .patch(&crd_path, PatchKind::Apply, body.as_bytes())
        .unwrap();
    assert_eq!(created["metadata"]["generation"], 1);
    let reapplied = store
        .patch(&crd_path, PatchKind::Apply, body.as_bytes())
        .unwrap();
    assert_eq!(
        rv(&reapplied),
        rv(&created),
        "applying the same object is a no-op"
    );

    store
        .create(
            &p("/api/v1/namespaces"),
            json!({"metadata": {"name": "gone"}}),
        )
        .unwrap();
    store
        .create(&p("/api/v1/namespaces/gone/pods"), pod("p", true))
        .unwrap();
    store.delete(&p("/api/v1/namespaces/gone")).unwrap();
    assert_eq!(
        store
            .get(&p("/api/v1/namespaces/gone/pods/p"))
            .unwrap_err()
            .code,
        404
    );
}

#[test]
fn served_over_http_with_watch_stream_and_stats() {
    let api = FakeApiServer::start(FakeOptions::default()).unwrap();
    let kubeconfig = std::fs::read_to_string(api.kubeconfig_path()).unwrap();
    assert!(kubeconfig.contains(&api.url()));
    api.create("/api/v1/namespaces/a/pods", pod("p1", true))
        .unwrap();
    let url = |path: &str| format!("{}{path}", api.url());
    let list = crate::http::get(
        &url("/api/v1/pods?labelSelector=larder.dev%2Fmanaged%3Dtrue&limit=500"),
        &[],
    )
    .unwrap();
    assert_eq!(list.status, 200);
    let list: Value = serde_json::from_slice(&list.body).unwrap();
    let from = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    api.create("/api/v1/namespaces/a/pods", pod("p2", true))
        .unwrap();
    // A bounded watch from the list's version sees only the later pod, then a bookmark.
    let watch = crate::http::request(
        "GET",
        &url(&format!(
            "/api/v1/pods?watch=true&resourceVersion={from}&allowWatchBookmarks=true&timeoutSeconds=2"
        )),
        &[],
        Duration::from_secs(10),
    )
    .unwrap();
    let events: Vec<Value> = watch
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "ADDED");
    assert_eq!(events[0]["object"]["metadata"]["name"], "p2");
    assert_eq!(events.len(), 1, "{events:?}");
    let missing = crate::http::get(&url("/api/v1/namespaces/a/pods/nope"), &[]).unwrap();
    assert_eq!(missing.status, 404);
    let status: Value = serde_json::from_slice(&missing.body).unwrap();
    assert_eq!(
        (status["kind"].as_str(), status["reason"].as_str()),
        (Some("Status"), Some("NotFound"))
    );
    let stats: Value =
        serde_json::from_slice(&crate::http::get(&url("/fake/stats"), &[]).unwrap().body).unwrap();
    assert_eq!(stats["requests"]["list pods"], 1);
    assert_eq!(stats["requests"]["watch pods"], 1);
    assert_eq!(stats["writes"]["pods"]["count"], 2);
    assert_eq!(stats["objects"]["/pods"], 2);
}

fn watch_request(resource_version: Option<u64>, send_initial_events: bool) -> watch::WatchRequest {
    watch::WatchRequest {
        filter: filter("/pods", "larder.dev/managed=true"),
        resource_version,
        send_initial_events,
        bookmarks: true,
        timeout: Duration::from_millis(300),
        api_version: "v1".into(),
        kind: "Pod".into(),
    }
}

async fn collect(store: &std::sync::Arc<Store>, req: watch::WatchRequest) -> Vec<Value> {
    use futures::StreamExt;
    let chunks: Vec<_> = watch::stream(store.clone(), req, Duration::from_secs(60))
        .collect()
        .await;
    chunks
        .into_iter()
        .flat_map(|c| {
            let text = String::from_utf8(c.unwrap().to_vec()).unwrap();
            text.lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn streaming_list_ends_its_initial_events_with_a_bookmark_and_old_versions_get_410() {
    let store = std::sync::Arc::new(Store::new(2));
    let pods = p("/api/v1/namespaces/a/pods");
    for i in 0..4 {
        store.create(&pods, pod(&format!("p{i}"), i != 1)).unwrap();
    }
    let events = collect(&store, watch_request(None, true)).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ADDED", "ADDED", "ADDED", "BOOKMARK"]);
    let end = &events[3]["object"];
    assert_eq!(
        end["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(
        end["metadata"]["resourceVersion"],
        store.resource_version().to_string()
    );
    assert_eq!(end["kind"], "Pod");

    // Version 1 is no longer in the two-entry history: one ERROR event with a 410 Status.
    let gone = collect(&store, watch_request(Some(1), false)).await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["type"], "ERROR");
    assert_eq!(gone[0]["object"]["code"], 410);

    // From a kept version: only what came after it.
    let recent = collect(
        &store,
        watch_request(Some(store.resource_version() - 1), false),
    )
    .await;
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0]["object"]["metadata"]["name"], "p3");
}
