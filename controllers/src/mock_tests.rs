//! The reconciler against a mock apiserver (tower-test), controller-rs style: each scenario
//! lists the API calls the reconcile must make, in order, and answers them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::reflector;
use larder_core::crd::{CachedImage, CachedImageSpec, CachedImageStatus, Phase, UsedBy};
use tokio::sync::Semaphore;

use crate::cachedimage::{Context, FINALIZER, Settings, error_policy, reconcile};
use crate::metrics::Metrics;
use crate::registry::{Copier, Endpoint, RegistryClient};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const PATH: &str = "/apis/larder.dev/v1alpha1/cachedimages/img";

fn context() -> (Arc<Context>, Handle) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (pods, _w) = reflector::store::<Pod>();
    let (images, _w2) = reflector::store::<CachedImage>();
    let copier = Copier::new(
        Arc::new(RegistryClient::new(Vec::new()).unwrap()),
        // Never contacted by these scenarios.
        Endpoint::new("http://127.0.0.1:9/".parse().unwrap()),
        Vec::new(),
    );
    let ctx = Context {
        client,
        copier: Arc::new(copier),
        pods,
        pods_synced: Arc::new(AtomicBool::new(true)),
        images,
        recorder: None,
        metrics: Metrics::default(),
        settings: Settings {
            retention: Duration::from_secs(3600),
            refresh_interval: Duration::from_secs(3600),
        },
        copies: Semaphore::new(1),
        failures: Mutex::default(),
    };
    (Arc::new(ctx), handle)
}

fn image(finalizer: bool, status: Option<CachedImageStatus>) -> CachedImage {
    CachedImage {
        metadata: ObjectMeta {
            name: Some("img".into()),
            finalizers: finalizer.then(|| vec![FINALIZER.to_owned()]),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        spec: CachedImageSpec::new("docker.io/library/nginx:1.27"),
        status,
    }
}

fn expired() -> CachedImageStatus {
    CachedImageStatus {
        phase: Some(Phase::Ready),
        used_by: Some(UsedBy::default()),
        expires_at: Some(Time(Timestamp::UNIX_EPOCH)),
        last_sync: Some(Time(Timestamp::now())),
        ..CachedImageStatus::default()
    }
}

/// Expects one request, checks it, answers `status` with `body`; returns the request body.
async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    body: serde_json::Value,
) -> serde_json::Value {
    let (request, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("the reconciler made the call in time")
        .expect("a request");
    assert_eq!(request.method(), method);
    assert_eq!(request.uri().path(), path);
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let sent = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
    sent
}

fn api_error(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","message":reason,"reason":reason,"code":code})
}

#[tokio::test]
async fn a_new_object_gets_the_finalizer_first() {
    let (ctx, mut handle) = context();
    let ci = image(false, None);
    let server = tokio::spawn(async move {
        let patch = expect(
            &mut handle,
            Method::PATCH,
            PATH,
            StatusCode::OK,
            serde_json::to_value(image(true, None)).unwrap(),
        )
        .await;
        assert!(patch.to_string().contains(FINALIZER), "{patch}");
    });
    let action = reconcile(Arc::new(ci), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    server.await.unwrap();
}

#[tokio::test]
async fn an_expired_unused_image_is_deleted() {
    let (ctx, mut handle) = context();
    let ci = image(true, Some(expired()));
    let server = tokio::spawn(async move {
        expect(
            &mut handle,
            Method::DELETE,
            PATH,
            StatusCode::OK,
            serde_json::to_value(image(true, Some(expired()))).unwrap(),
        )
        .await;
    });
    let action = reconcile(Arc::new(ci), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    server.await.unwrap();
}

#[tokio::test]
async fn nothing_is_deleted_before_the_pod_cache_synced() {
    let (ctx, mut handle) = context();
    ctx.pods_synced
        .store(false, std::sync::atomic::Ordering::Release);
    let ci = image(true, Some(expired()));
    // Ready and recently synced: no API call at all, just a requeue.
    let action = reconcile(Arc::new(ci), ctx).await.unwrap();
    assert!(action != Action::await_change());
    let next = tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await;
    assert!(matches!(next, Err(_) | Ok(None)), "no API call expected");
}

#[tokio::test]
async fn an_invalid_reference_patches_a_failed_status() {
    let (ctx, mut handle) = context();
    let mut ci = image(true, None);
    ci.spec.source_image = "Not A Reference".into();
    let server = tokio::spawn(async move {
        let patch = expect(
            &mut handle,
            Method::PATCH,
            &format!("{PATH}/status"),
            StatusCode::OK,
            serde_json::to_value(image(true, None)).unwrap(),
        )
        .await;
        assert_eq!(patch["status"]["phase"], "Failed");
        assert_eq!(
            patch["status"]["conditions"][0]["reason"],
            "InvalidReference"
        );
    });
    let err = reconcile(Arc::new(ci.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "InvalidReference");
    let action = error_policy(Arc::new(ci), &err, ctx);
    // Permanent: the slowest step (30 min plus jitter), not a quick retry.
    assert!(
        format!("{action:?}").contains("requeue_after: Some("),
        "{action:?}"
    );
    assert_ne!(action, Action::requeue(Duration::from_secs(1)));
    server.await.unwrap();
}

#[tokio::test]
async fn a_conflict_is_retried_soon() {
    let (ctx, mut handle) = context();
    let ci = image(true, Some(expired()));
    let server = tokio::spawn(async move {
        expect(
            &mut handle,
            Method::DELETE,
            PATH,
            StatusCode::CONFLICT,
            api_error(409, "Conflict"),
        )
        .await;
    });
    let err = reconcile(Arc::new(ci.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert!(err.is_conflict(), "{err}");
    assert_eq!(
        error_policy(Arc::new(ci), &err, ctx),
        Action::requeue(Duration::from_secs(1))
    );
    server.await.unwrap();
}

#[tokio::test]
async fn an_apiserver_error_backs_off_and_is_counted() {
    let (ctx, mut handle) = context();
    let ci = image(true, Some(expired()));
    let server = tokio::spawn(async move {
        expect(
            &mut handle,
            Method::DELETE,
            PATH,
            StatusCode::INTERNAL_SERVER_ERROR,
            api_error(500, "InternalError"),
        )
        .await;
    });
    let err = reconcile(Arc::new(ci.clone()), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "KubeApi");
    let first = error_policy(Arc::new(ci.clone()), &err, ctx.clone());
    let second = error_policy(Arc::new(ci), &err, ctx);
    // 10 s (+ up to 20% jitter), then 20 s (+ jitter).
    assert_ne!(first, Action::await_change());
    assert_ne!(first, second);
    server.await.unwrap();
}
