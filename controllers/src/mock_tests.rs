//! The reconciler against a mock apiserver (tower-test), controller-rs style: each scenario
//! lists the API calls the reconcile must make, in order, and answers them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::reflector;
use larder_core::crd::{CachedImage, CachedImageSpec, CachedImageStatus, Phase, UsedBy};
use tokio::sync::Semaphore;

use crate::cachedimage::{Context, FINALIZER, Settings, error_policy, reconcile};
use crate::metrics::Metrics;
use crate::mock_apiserver::{self, Handle, api_error, expect, expect_within, no_more_calls};
use crate::policy;
use crate::registry::{Copier, Endpoint, RegistryClient};

const PATH: &str = "/apis/larder.dev/v1alpha1/cachedimages/img";

fn context() -> (Arc<Context>, Handle) {
    let (client, handle) = mock_apiserver::client();
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
            copy_wait_for_pulls: Duration::ZERO,
        },
        copies: Semaphore::new(1),
        failures: Mutex::default(),
        copied: Mutex::default(),
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
    no_more_calls(&mut handle, Duration::from_millis(100)).await;
}

#[tokio::test]
async fn an_object_behind_a_copy_finished_here_is_not_copied_again() {
    let (ctx, mut handle) = context();
    let copying = CachedImageStatus {
        phase: Some(Phase::Copying),
        ..CachedImageStatus::default()
    };
    let mut ci = image(true, Some(copying));
    ci.metadata.uid = Some("u1".into());
    ctx.record_copy(&ci);
    // A reconcile queued during the copy sees the object from before its Ready write: no API
    // call, no copy (the copier's endpoint would refuse), a look again shortly.
    let action = reconcile(Arc::new(ci.clone()), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(crate::policy::BEHIND_RECHECK));
    no_more_calls(&mut handle, Duration::from_millis(100)).await;
    // Only this very object and source image count.
    assert!(ctx.copied_ago(&ci).is_some());
    let mut recreated = ci.clone();
    recreated.metadata.uid = Some("u2".into());
    assert!(ctx.copied_ago(&recreated).is_none());
    let mut retargeted = ci.clone();
    retargeted.spec.source_image = "docker.io/library/nginx:1.28".into();
    assert!(ctx.copied_ago(&retargeted).is_none());
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

/// The delay of a requeue of a second or more (kube's `Action` keeps it private; its Debug
/// shows it, as `Action { requeue_after: Some(10.5s) }`).
fn requeue_after(action: &Action) -> Duration {
    let text = format!("{action:?}");
    let seconds = text
        .split_once("Some(")
        .and_then(|(_, rest)| rest.strip_suffix("s) }"))
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("not a requeue of seconds: {text}"));
    Duration::from_secs_f64(seconds)
}

/// An image on a registry that refuses connections (nothing listens on port 9).
fn unreachable(status: CachedImageStatus) -> CachedImage {
    let mut ci = image(true, Some(status));
    ci.spec.source_image = "127.0.0.1:9/team/app:v1".into();
    ci
}

fn failed(failures: u32, retry_at: Timestamp) -> CachedImageStatus {
    CachedImageStatus {
        phase: Some(Phase::Failed),
        failures: Some(failures),
        retry_at: Some(Time(retry_at)),
        ..CachedImageStatus::default()
    }
}

#[tokio::test]
async fn a_failed_image_waits_for_its_retry_time_without_any_call() {
    let (ctx, mut handle) = context();
    let soon = policy::after(Timestamp::now(), Duration::from_secs(20));
    let ci = unreachable(failed(1, soon));
    let server = tokio::spawn(async move {
        no_more_calls(&mut handle, Duration::from_millis(300)).await;
    });
    // Whatever woke it (a usage write, a restart): no copy, no write, a requeue for the rest.
    let action = reconcile(Arc::new(ci), ctx).await.unwrap();
    let wait = requeue_after(&action);
    assert!(
        (Duration::from_secs(18)..=Duration::from_secs(20)).contains(&wait),
        "{action:?}"
    );
    server.await.unwrap();
}

#[tokio::test]
async fn a_retry_that_fails_again_writes_the_status_once_and_backs_off_further() {
    let (ctx, mut handle) = context();
    let due = policy::after(Timestamp::UNIX_EPOCH, Duration::from_secs(1));
    let ci = unreachable(failed(2, due));
    let echo = serde_json::to_value(&ci).unwrap();
    let server = tokio::spawn(async move {
        // No Copying first: Failed -> Copying -> Failed per attempt flipped the phase and
        // tripled the writes.
        let patch = expect(
            &mut handle,
            Method::PATCH,
            &format!("{PATH}/status"),
            StatusCode::OK,
            echo,
        )
        .await;
        no_more_calls(&mut handle, Duration::from_millis(300)).await;
        patch
    });
    let action = reconcile(Arc::new(ci), ctx).await.unwrap();
    let patch = server.await.unwrap();
    let status = &patch["status"];
    assert_eq!(status["phase"], "Failed", "{patch}");
    assert_eq!(status["conditions"][0]["reason"], "OriginUnreachable");
    assert_eq!(status["failures"], 3);
    let retry_at: Timestamp = status["retryAt"].as_str().unwrap().parse().unwrap();
    // The third failure: 40 s, plus up to a fifth.
    let wait = requeue_after(&action);
    assert!(
        (Duration::from_secs(40)..=Duration::from_secs(48)).contains(&wait),
        "{action:?}"
    );
    let until = policy::until(Timestamp::now(), retry_at);
    assert!(
        until <= wait && wait - until < Duration::from_secs(2),
        "{until:?} {wait:?}"
    );
}

// ---- Private images: the Secrets read, against real registries ----

mod private {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{LocalObjectReference, PodSpec, Secret};
    use kube::runtime::watcher;
    use larder_core::crd::SecretRef;
    use larder_core::dockerconfig::Credentials;
    use larder_core::reference::Reference;
    use larder_testkit::{
        BuiltImage, ImageBuilder, IndexBuilder, Platform, Registry, RegistryOptions,
    };

    const USER: &str = "alice";
    const PASSWORD: &str = "wonderland";
    /// Real registries answer between the API calls: a roomier bound than [`expect`]'s.
    const SLOW: Duration = Duration::from_secs(30);

    async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    /// A private (htpasswd) origin with `image` as `team/app:v1`, and an anonymous cache.
    async fn registries(image: &BuiltImage) -> (Registry, Registry, String) {
        let image = image.clone();
        blocking(move || {
            let origin =
                Registry::start(RegistryOptions::basic_auth(USER, PASSWORD).named("origin"))
                    .unwrap();
            let cache = Registry::start(RegistryOptions::default().named("cache")).unwrap();
            let digest = origin.push_image(&image, "team/app", "v1").unwrap().digest;
            (origin, cache, digest)
        })
        .await
    }

    fn context_with(
        origin: &Registry,
        cache: &Registry,
        pods: Vec<Pod>,
        images: Vec<CachedImage>,
    ) -> (Arc<Context>, Handle) {
        let (client, handle) = mock_apiserver::client();
        let (pod_store, mut pod_writer) = reflector::store::<Pod>();
        for pod in pods {
            pod_writer.apply_watcher_event(&watcher::Event::Apply(pod));
        }
        let (image_store, mut image_writer) = reflector::store::<CachedImage>();
        for image in images {
            image_writer.apply_watcher_event(&watcher::Event::Apply(image));
        }
        let copier = Copier::new(
            Arc::new(RegistryClient::new(vec![origin.host_port()]).unwrap()),
            Endpoint::new(cache.url().parse().unwrap()),
            Vec::new(),
        );
        let ctx = Context {
            client,
            copier: Arc::new(copier),
            pods: pod_store,
            pods_synced: Arc::new(AtomicBool::new(true)),
            images: image_store,
            recorder: None,
            metrics: Metrics::default(),
            settings: Settings {
                retention: Duration::from_secs(3600),
                refresh_interval: Duration::from_secs(3600),
                copy_wait_for_pulls: Duration::ZERO,
            },
            copies: Semaphore::new(1),
            failures: Mutex::default(),
            copied: Mutex::default(),
        };
        (Arc::new(ctx), handle)
    }

    fn private_image(origin: &Registry, pull_secrets: &[(&str, &str)]) -> CachedImage {
        let mut ci = image(true, None);
        ci.spec.source_image = origin.reference("team/app", "v1");
        ci.spec.pull_secrets = pull_secrets
            .iter()
            .map(|(ns, name)| SecretRef {
                namespace: (*ns).into(),
                name: (*name).into(),
            })
            .collect();
        ci
    }

    fn user_pod(ns: &str, name: &str, image: &str, secrets: &[&str]) -> Pod {
        let mut pod = crate::desired::tests::pod(ns, name, &[("app", image)], true);
        pod.spec = Some(PodSpec {
            image_pull_secrets: Some(
                secrets
                    .iter()
                    .map(|s| LocalObjectReference {
                        name: (*s).to_owned(),
                    })
                    .collect(),
            ),
            ..PodSpec::default()
        });
        crate::desired::trim_pod(&mut pod);
        pod
    }

    fn docker_config_secret(
        origin: &Registry,
        ns: &str,
        name: &str,
        password: &str,
    ) -> serde_json::Value {
        let header = Credentials::new(USER, password).basic_header();
        let auth = header.trim_start_matches("Basic ");
        let config = serde_json::json!({"auths": {origin.host_port(): {"auth": auth}}});
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(
                [(
                    ".dockerconfigjson".to_owned(),
                    ByteString(config.to_string().into_bytes()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        serde_json::to_value(secret).unwrap()
    }

    fn secret_path(ns: &str, name: &str) -> String {
        format!("/api/v1/namespaces/{ns}/secrets/{name}")
    }

    /// [`expect`] with a bound that leaves room for the registries.
    async fn expect_slow(
        handle: &mut Handle,
        method: Method,
        path: &str,
        status: StatusCode,
        body: serde_json::Value,
    ) -> serde_json::Value {
        expect_within(handle, SLOW, method, path, status, body)
            .await
            .body
    }

    #[tokio::test]
    async fn exactly_the_named_and_the_pods_pull_secrets_are_read() {
        let built = ImageBuilder::new().random_layer(20_000).build().unwrap();
        let (origin, cache, digest) = registries(&built).await;
        let ci = private_image(
            &origin,
            &[
                ("larder", "opaque"),
                ("larder", "missing"),
                ("locked", "forbidden"),
                ("larder", "stale"),
            ],
        );
        let image_ref = origin.reference("team/app", "v1");
        let pods = vec![
            // The derived Secret the webhook adds is never read; nor are unrelated pods'.
            user_pod(
                "apps",
                "web-1",
                &image_ref,
                &["regcred", "larder-pull-0123456789"],
            ),
            user_pod("apps", "web-2", &image_ref, &["regcred"]),
            user_pod("other", "db", "postgres:16", &["db-secret"]),
        ];
        let (ctx, mut handle) = context_with(&origin, &cache, pods, Vec::new());
        let stale = docker_config_secret(&origin, "larder", "stale", "old-password");
        let regcred = docker_config_secret(&origin, "apps", "regcred", PASSWORD);
        let echo = serde_json::to_value(&ci).unwrap();
        let server = tokio::spawn(async move {
            let copying = expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo.clone(),
            )
            .await;
            assert_eq!(copying["status"]["phase"], "Copying");
            let mut opaque = serde_json::json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "opaque", "namespace": "larder"}, "type": "Opaque",
                "data": {"password": "c2VjcmV0"}});
            opaque["type"] = "Opaque".into();
            expect_slow(
                &mut handle,
                Method::GET,
                &secret_path("larder", "opaque"),
                StatusCode::OK,
                opaque,
            )
            .await;
            expect_slow(
                &mut handle,
                Method::GET,
                &secret_path("larder", "missing"),
                StatusCode::NOT_FOUND,
                api_error(404, "NotFound"),
            )
            .await;
            // No RBAC for it (or any other refusal): ignored as well.
            expect_slow(
                &mut handle,
                Method::GET,
                &secret_path("locked", "forbidden"),
                StatusCode::FORBIDDEN,
                api_error(403, "Forbidden"),
            )
            .await;
            expect_slow(
                &mut handle,
                Method::GET,
                &secret_path("larder", "stale"),
                StatusCode::OK,
                stale,
            )
            .await;
            expect_slow(
                &mut handle,
                Method::GET,
                &secret_path("apps", "regcred"),
                StatusCode::OK,
                regcred,
            )
            .await;
            let ready = expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo.clone(),
            )
            .await;
            no_more_calls(&mut handle, Duration::from_millis(200)).await;
            (handle, ready)
        });
        let action = reconcile(Arc::new(ci.clone()), ctx.clone()).await.unwrap();
        assert_ne!(action, Action::await_change());
        let (mut handle, ready) = server.await.unwrap();
        let status = &ready["status"];
        assert_eq!(status["phase"], "Ready", "{ready}");
        assert_eq!(status["digest"], digest.as_str());
        assert_eq!(status["upstreamDigest"], digest.as_str());
        assert_eq!(status["platforms"], serde_json::json!(["linux/amd64"]));
        let shown = ready.to_string();
        assert!(!shown.contains(PASSWORD) && !shown.contains("old-password"));

        // Again within the TTL: the Secrets come from the cache, no GET at all. (The copy just
        // finished is forgotten first, as if the watch had shown it: otherwise this reconcile
        // of the same stale object would rightly not copy at all.)
        ctx.copied.lock().unwrap().clear();
        let echo = serde_json::to_value(&ci).unwrap();
        let server = tokio::spawn(async move {
            expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo.clone(),
            )
            .await;
            let ready = expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo,
            )
            .await;
            no_more_calls(&mut handle, Duration::from_millis(200)).await;
            ready
        });
        reconcile(Arc::new(ci), ctx).await.unwrap();
        assert_eq!(server.await.unwrap()["status"]["phase"], "Ready");
        blocking(move || {
            let repo = format!("{}/team/app", origin.host_port().replace(':', "_"));
            assert_eq!(
                cache.get_manifest(&repo, "v1").unwrap().body_digest(),
                digest
            );
        })
        .await;
    }

    #[tokio::test]
    async fn no_working_credentials_fail_the_copy_with_unauthorized() {
        let built = ImageBuilder::new().random_layer(1000).build().unwrap();
        let (origin, cache, _) = registries(&built).await;
        let ci = private_image(&origin, &[("larder", "wrong")]);
        let (ctx, mut handle) = context_with(&origin, &cache, Vec::new(), Vec::new());
        let wrong = docker_config_secret(&origin, "larder", "wrong", "not-it");
        let echo = serde_json::to_value(&ci).unwrap();
        let server = tokio::spawn(async move {
            expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo.clone(),
            )
            .await;
            expect_slow(
                &mut handle,
                Method::GET,
                &secret_path("larder", "wrong"),
                StatusCode::OK,
                wrong,
            )
            .await;
            let failed = expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo,
            )
            .await;
            no_more_calls(&mut handle, Duration::from_millis(200)).await;
            failed
        });
        // A failed copy is recorded, not returned: the retry time is in the status.
        let action = reconcile(Arc::new(ci.clone()), ctx.clone()).await.unwrap();
        let failed = server.await.unwrap();
        assert_eq!(failed["status"]["phase"], "Failed");
        assert_eq!(failed["status"]["conditions"][0]["reason"], "Unauthorized");
        assert_eq!(failed["status"]["failures"], 1);
        assert!(failed["status"]["retryAt"].is_string(), "{failed}");
        assert!(!failed.to_string().contains("not-it"));
        // Retryable (a fixed Secret needs no change to the object): the first backoff step.
        assert!(
            (Duration::from_secs(10)..=Duration::from_secs(12)).contains(&requeue_after(&action)),
            "{action:?}"
        );
        drop((origin, cache));
    }

    #[tokio::test]
    async fn a_refresh_without_credentials_keeps_the_cached_copy_ready() {
        let built = ImageBuilder::new().random_layer(1000).build().unwrap();
        let (origin, cache, digest) = registries(&built).await;
        let mut ci = private_image(&origin, &[]);
        ci.status = Some(CachedImageStatus {
            phase: Some(Phase::Ready),
            digest: Some(digest.clone()),
            upstream_digest: Some(digest),
            last_sync: Some(Time(Timestamp::UNIX_EPOCH)),
            ..CachedImageStatus::default()
        });
        // No pod uses it and spec.pullSecrets is empty: nothing to read.
        let (ctx, mut handle) = context_with(&origin, &cache, Vec::new(), Vec::new());
        let echo = serde_json::to_value(&ci).unwrap();
        let server = tokio::spawn(async move {
            let patch = expect_slow(
                &mut handle,
                Method::PATCH,
                &format!("{PATH}/status"),
                StatusCode::OK,
                echo,
            )
            .await;
            no_more_calls(&mut handle, Duration::from_millis(200)).await;
            patch
        });
        let action = reconcile(Arc::new(ci), ctx).await.unwrap();
        assert_ne!(action, Action::await_change());
        let patch = server.await.unwrap();
        let status = &patch["status"];
        assert_eq!(status["phase"], "Ready", "{patch}");
        let conditions = status["conditions"].as_array().unwrap();
        let find = |t: &str| conditions.iter().find(|c| c["type"] == t).unwrap().clone();
        assert_eq!(find("Ready")["status"], "True");
        assert_eq!(find("Synced")["status"], "False");
        assert_eq!(find("Synced")["reason"], "CredentialsUnavailable");
        assert!(
            find("Synced")["message"]
                .as_str()
                .unwrap()
                .contains("no readable pull secret")
        );
        drop((origin, cache));
    }

    #[tokio::test]
    async fn cleanup_removes_an_index_and_only_its_unshared_children() {
        let index = IndexBuilder::new()
            .platforms(
                &[Platform::linux("amd64"), Platform::linux("arm64")],
                &[5000],
            )
            .build()
            .unwrap();
        let (origin, cache) = blocking(|| {
            (
                Registry::start(RegistryOptions::default().named("origin")).unwrap(),
                Registry::start(RegistryOptions::default().named("cache")).unwrap(),
            )
        })
        .await;
        let (origin, index_digest) = blocking({
            let index = index.clone();
            move || {
                let d = origin.push_image(&index, "team/app", "v1").unwrap().digest;
                (origin, d)
            }
        })
        .await;
        let children: Vec<String> = index
            .manifests
            .iter()
            .map(|m| m.manifest.digest.clone())
            .collect();
        let (ctx0, _) = context_with(&origin, &cache, Vec::new(), Vec::new());
        let source = Reference::parse(&origin.reference("team/app", "v1")).unwrap();
        ctx0.copier
            .copy(&source, &crate::registry::Progress::default())
            .await
            .unwrap();

        // Another CachedImage pins the first child by digest: that child must stay.
        let mut pinned = image(true, None);
        pinned.metadata.name = Some("pinned".into());
        pinned.spec.source_image = format!("{}/team/app@{}", origin.host_port(), children[0]);
        pinned.status = Some(CachedImageStatus {
            phase: Some(Phase::Ready),
            digest: Some(children[0].clone()),
            ..CachedImageStatus::default()
        });
        let mut going = private_image(&origin, &[]);
        going.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        going.status = Some(CachedImageStatus {
            phase: Some(Phase::Ready),
            digest: Some(index_digest.clone()),
            ..CachedImageStatus::default()
        });
        let (ctx, mut handle) =
            context_with(&origin, &cache, Vec::new(), vec![pinned, going.clone()]);
        let echo = serde_json::to_value(&going).unwrap();
        let server = tokio::spawn(async move {
            // Only the finalizer's removal: registry work needs no API call.
            let patch = expect_slow(&mut handle, Method::PATCH, PATH, StatusCode::OK, echo).await;
            no_more_calls(&mut handle, Duration::from_millis(200)).await;
            patch
        });
        reconcile(Arc::new(going), ctx).await.unwrap();
        let patch = server.await.unwrap();
        assert!(patch.to_string().contains("finalizers"), "{patch}");
        let repo = format!("{}/team/app", origin.host_port().replace(':', "_"));
        blocking(move || {
            let status = |reference: &str| {
                cache
                    .request("HEAD", &format!("/v2/{repo}/manifests/{reference}"), &[("Accept", "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json")])
                    .unwrap()
                    .status
            };
            assert_eq!(status(&index_digest), 404, "the index is gone");
            assert_eq!(status("v1"), 404, "and its tag");
            assert_eq!(status(&children[1]), 404, "the unshared child is gone");
            assert_eq!(status(&children[0]), 200, "the pinned child stays");
            drop(origin);
        })
        .await;
    }
}
