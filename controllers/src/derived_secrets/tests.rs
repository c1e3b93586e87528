#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::{LocalObjectReference, Pod, PodSpec};
use kube::api::ObjectMeta;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use serde_json::{Value, json};

use super::*;
use crate::mock_apiserver::{self, Handle, STEP, api_error, expect, expect_within, no_more_calls};

fn key(namespace: &str, name: &str) -> SecretRef {
    SecretRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn versions(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, v)| ((*n).into(), (*v).into()))
        .collect()
}

fn derived(namespace: &str, name: &str, uid: &str) -> Derived {
    Derived {
        key: key(namespace, name),
        uid: uid.into(),
        resource_version: "1".into(),
        sources: Some(versions(&[("regcred", "u1/5")])),
    }
}

fn pod(namespace: &str, pull_secrets: &[&str]) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("p-{}", pull_secrets.join("-"))),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            image_pull_secrets: Some(
                pull_secrets
                    .iter()
                    .map(|n| LocalObjectReference { name: (*n).into() })
                    .collect(),
            ),
            ..PodSpec::default()
        }),
        status: None,
    }
}

#[test]
fn only_labelled_prefixed_secrets_with_a_namespace_and_uid_are_derived() {
    let meta = |name: &str, labelled: bool, annotation: Option<&str>| ObjectMeta {
        name: Some(name.into()),
        namespace: Some("team".into()),
        uid: Some("u9".into()),
        resource_version: Some("3".into()),
        labels: labelled
            .then(|| BTreeMap::from([(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into())])),
        annotations: annotation
            .map(|a| BTreeMap::from([(SOURCE_VERSIONS_ANNOTATION.into(), a.to_owned())])),
        ..ObjectMeta::default()
    };
    let d = Derived::from_meta(&meta(
        "larder-pull-abc",
        true,
        Some(r#"{"regcred":"u1/5"}"#),
    ))
    .unwrap();
    assert_eq!(d.key, key("team", "larder-pull-abc"));
    assert_eq!((d.uid.as_str(), d.resource_version.as_str()), ("u9", "3"));
    assert_eq!(d.sources, Some(versions(&[("regcred", "u1/5")])));
    // An older derived Secret, or a damaged annotation: found, but never judged.
    let old = Derived::from_meta(&meta("larder-pull-abc", true, None)).unwrap();
    assert_eq!(old.sources, None);
    assert_eq!(
        Derived::from_meta(&meta("larder-pull-abc", true, Some("regcred=u1/5")))
            .unwrap()
            .sources,
        None
    );
    // Not ours: no label (someone else's Secret with a look-alike name), or another name
    // (larder's own certificate Secret carries the label too).
    assert!(Derived::from_meta(&meta("larder-pull-abc", false, None)).is_none());
    assert!(Derived::from_meta(&meta("larder-webhook-tls", true, None)).is_none());
}

#[test]
fn references_are_per_namespace_and_only_derived_names() {
    let pods = [
        pod("a", &["larder-pull-1", "regcred"]),
        pod("b", &["larder-pull-2"]),
        Pod::default(),
    ];
    let got = referenced(pods.iter());
    let want: HashSet<_> = [key("a", "larder-pull-1"), key("b", "larder-pull-2")].into();
    assert_eq!(got, want);
}

#[test]
fn a_secret_is_judged_only_after_two_unreferenced_passes_with_the_same_uid() {
    let all = [
        derived("a", "larder-pull-1", "u1"),
        derived("a", "larder-pull-2", "u2"),
        derived("b", "larder-pull-1", "u3"),
    ];
    let used: HashSet<_> = [key("a", "larder-pull-2")].into();
    let (first, ready) = unreferenced_twice(&all, &used, &HashSet::new());
    assert!(ready.is_empty(), "nothing is judged on first sight");
    assert_eq!(first.len(), 2);
    let (_, ready) = unreferenced_twice(&all, &used, &first);
    let names: Vec<_> = ready.iter().map(|d| d.key.clone()).collect();
    assert_eq!(
        names,
        [key("a", "larder-pull-1"), key("b", "larder-pull-1")]
    );
    // Re-created under the same name (another uid) since the last pass: starts over.
    let recreated = [derived("a", "larder-pull-1", "u7")];
    let (_, ready) = unreferenced_twice(&recreated, &HashSet::new(), &first);
    assert!(ready.is_empty());
    // Used again by a new pod: never judged.
    let used_again: HashSet<_> = [key("a", "larder-pull-1"), key("b", "larder-pull-1")].into();
    let (now, ready) = unreferenced_twice(&all, &used_again, &first);
    assert!(ready.is_empty());
    assert_eq!(now.len(), 1);
}

#[test]
fn superseded_when_a_source_changed_or_is_gone() {
    let recorded = versions(&[("a", "u1/5"), ("b", "u2/9")]);
    let current = |pairs: &[(&str, Option<&str>)]| -> BTreeMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).into(), v.map(str::to_owned)))
            .collect()
    };
    assert!(!superseded(
        &recorded,
        &current(&[("a", Some("u1/5")), ("b", Some("u2/9"))])
    ));
    assert!(superseded(
        &recorded,
        &current(&[("a", Some("u1/6")), ("b", Some("u2/9"))])
    ));
    assert!(superseded(
        &recorded,
        &current(&[("a", Some("u1/5")), ("b", None)])
    ));
    // Deleted and created again under the same name: another uid.
    assert!(superseded(
        &recorded,
        &current(&[("a", Some("u8/5")), ("b", Some("u2/9"))])
    ));
    // Not looked up: no evidence, kept.
    assert!(!superseded(&recorded, &current(&[("a", Some("u1/5"))])));
}

// ---- the pass against a mock apiserver

fn secret_meta(namespace: &str, name: &str, uid: &str, rv: &str, sources: Option<&str>) -> Value {
    let mut metadata = json!({
        "name": name, "namespace": namespace, "uid": uid, "resourceVersion": rv,
        "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE},
    });
    if let Some(s) = sources {
        metadata["annotations"] = json!({ SOURCE_VERSIONS_ANNOTATION: s });
    }
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": metadata})
}

fn listing(items: &[Value]) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
           "metadata": {"resourceVersion": "100"}, "items": items})
}

/// Expects the pass's metadata list of larder's Secrets, answers `items`; returns its query.
async fn expect_list(handle: &mut Handle, items: &[Value]) -> String {
    expect_within(
        handle,
        STEP,
        Method::GET,
        "/api/v1/secrets",
        StatusCode::OK,
        listing(items),
    )
    .await
    .query
}

fn deleted() -> Value {
    json!({"kind":"Status","apiVersion":"v1","status":"Success","code":200})
}

/// A collector over a mock apiserver, with `pods` in its pod store.
fn collector(pods: &[Pod]) -> (Collector, Handle) {
    let (client, handle) = mock_apiserver::client();
    let (store, mut writer) = reflector::store::<Pod>();
    for pod in pods {
        writer.apply_watcher_event(&Event::Apply(pod.clone()));
    }
    (Collector::new(client, store, Metrics::default()), handle)
}
#[tokio::test]
async fn superseded_unused_secrets_are_deleted_on_the_second_pass_and_nothing_else() {
    let (mut collector, mut handle) = collector(&[pod("team", &["larder-pull-used"])]);

    let items = [
        // Used by a pod: never touched.
        secret_meta(
            "team",
            "larder-pull-used",
            "u-used",
            "1",
            Some(r#"{"regcred":"s1/5"}"#),
        ),
        // Its source was edited since (s1/5 -> s1/6): superseded.
        secret_meta(
            "team",
            "larder-pull-old",
            "u-old",
            "2",
            Some(r#"{"regcred":"s1/5"}"#),
        ),
        // Its source is unchanged: the next pod reuses it, kept.
        secret_meta(
            "team",
            "larder-pull-current",
            "u-cur",
            "3",
            Some(r#"{"regcred":"s1/6"}"#),
        ),
        // Its source was deleted: superseded.
        secret_meta(
            "other",
            "larder-pull-orphan",
            "u-orph",
            "4",
            Some(r#"{"gone":"s2/1"}"#),
        ),
        // Made before the annotation existed: left alone.
        secret_meta("team", "larder-pull-legacy", "u-leg", "5", None),
    ];
    let server = tokio::spawn(async move {
        // Pass 1: a metadata list only; everything unused is merely noted.
        let query = expect_list(&mut handle, &items).await;
        assert!(
            query.contains("labelSelector=app.kubernetes.io%2Fmanaged-by%3Dlarder"),
            "{query}"
        );
        // Pass 2: the same list; candidates are judged by their sources' metadata, in order.
        expect_list(&mut handle, &items).await;
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/team/secrets/regcred",
            StatusCode::OK,
            secret_meta("team", "regcred", "s1", "6", None),
        )
        .await;
        let body = expect(
            &mut handle,
            Method::DELETE,
            "/api/v1/namespaces/team/secrets/larder-pull-old",
            StatusCode::OK,
            deleted(),
        )
        .await;
        assert_eq!(
            body["preconditions"],
            json!({"uid": "u-old", "resourceVersion": "2"})
        );
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/team/secrets/regcred",
            StatusCode::OK,
            secret_meta("team", "regcred", "s1", "6", None),
        )
        .await;
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/other/secrets/gone",
            StatusCode::NOT_FOUND,
            api_error(404, "NotFound"),
        )
        .await;
        // Already deleted by someone else: fine.
        expect(
            &mut handle,
            Method::DELETE,
            "/api/v1/namespaces/other/secrets/larder-pull-orphan",
            StatusCode::NOT_FOUND,
            api_error(404, "NotFound"),
        )
        .await;
        handle
    });
    assert_eq!(collector.pass().await.unwrap(), 0);
    assert_eq!(collector.pass().await.unwrap(), 1);
    let mut handle = server.await.unwrap();
    // Nothing more was asked.
    no_more_calls(&mut handle, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_failed_source_read_keeps_the_secret_and_the_pass_goes_on() {
    let (mut collector, mut handle) = collector(&[]);
    let items = [
        secret_meta(
            "a",
            "larder-pull-1",
            "u1",
            "1",
            Some(r#"{"forbidden":"s1/1"}"#),
        ),
        secret_meta("b", "larder-pull-2", "u2", "1", Some(r#"{"gone":"s2/1"}"#)),
    ];
    let server = tokio::spawn(async move {
        expect_list(&mut handle, &items).await;
        expect_list(&mut handle, &items).await;
        // RBAC or apiserver trouble on one source: that Secret is not deleted.
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/a/secrets/forbidden",
            StatusCode::FORBIDDEN,
            api_error(403, "Forbidden"),
        )
        .await;
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/namespaces/b/secrets/gone",
            StatusCode::NOT_FOUND,
            api_error(404, "NotFound"),
        )
        .await;
        expect(
            &mut handle,
            Method::DELETE,
            "/api/v1/namespaces/b/secrets/larder-pull-2",
            StatusCode::OK,
            deleted(),
        )
        .await;
    });
    assert_eq!(collector.pass().await.unwrap(), 0);
    assert_eq!(collector.pass().await.unwrap(), 1);
    server.await.unwrap();
}

#[tokio::test]
async fn a_failed_list_fails_the_pass_without_deleting() {
    let (mut collector, mut handle) = collector(&[]);
    let server = tokio::spawn(async move {
        expect(
            &mut handle,
            Method::GET,
            "/api/v1/secrets",
            StatusCode::FORBIDDEN,
            api_error(403, "Forbidden"),
        )
        .await;
    });
    let err = collector.pass().await.unwrap_err();
    assert_eq!(err.metric_label(), "KubeApi");
    server.await.unwrap();
}
