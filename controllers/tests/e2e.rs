//! End-to-end against a real cluster: runs only when `KUBECONFIG` names one, and says it skips
//! otherwise. It installs the CRDs generated from the Rust types, runs the controller as a local
//! process against the cluster and two local distribution registries (origin and cache), creates
//! a pod as the webhook leaves it (label, annotation, rewritten image), and watches its
//! CachedImage go Ready in the cache registry and expire once the pod is gone.
//!
//! The webhook is not part of this run: a cluster calls webhooks over the network, and a local
//! process is reachable only from a local apiserver.

// Setup failures in a test should panic with their reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use larder_core::crd::{CachedImage, Phase};
use larder_core::reference::Reference;
use larder_testkit::{ImageBuilder, Registry, RegistryOptions};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    controller: larder_controllers::ControllerArgs,
}

fn cluster_given() -> bool {
    match std::env::var("KUBECONFIG") {
        Ok(path) if !path.is_empty() => true,
        _ => {
            eprintln!(
                "skipped: KUBECONFIG is not set; the end-to-end suite needs a real cluster \
                 (kind, k3d, or any other) and runs when KUBECONFIG names one"
            );
            false
        }
    }
}

async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_managed_pod_gets_a_ready_cached_image_that_expires_after_it_is_gone() {
    if !cluster_given() {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::try_default()
        .await
        .expect("a cluster from KUBECONFIG");

    // The CRDs, exactly as `larder crds` prints them.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in larder_core::crd::crds() {
        let name = crd.name_any();
        crds.patch(
            &name,
            &PatchParams::apply("larder-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("the apiserver accepts CRD {name}: {e}"));
        wait_for(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await.ok()?;
                    let established = crd
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True");
                    established.then_some(())
                }
            },
        )
        .await;
    }

    // Real registries on this machine: the controller runs here too.
    let (origin, cache) = tokio::task::spawn_blocking(|| {
        let origin = Registry::start(RegistryOptions::default()).expect("origin");
        let cache = Registry::start(RegistryOptions::default().named("cache")).expect("cache");
        let image = ImageBuilder::new()
            .random_layer(256 << 10)
            .build()
            .expect("image");
        origin.push_image(&image, "e2e/app", "v1").expect("push");
        (origin, cache)
    })
    .await
    .unwrap();
    let original = format!("{}/e2e/app:v1", origin.host_port());
    let reference = Reference::parse(&original).unwrap();
    let rewritten = reference.rewrite("localhost:7439").unwrap();

    let namespace = format!("larder-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}
    }))
    .unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");

    let args = Args::try_parse_from([
        "controller",
        "--cache-registry",
        &cache.url(),
        "--insecure-registry",
        &origin.host_port(),
        "--retention",
        "3s",
        "--refresh-interval",
        "1h",
        "--metrics-listen",
        "127.0.0.1:0",
        "--leader-election-namespace",
        &namespace,
    ])
    .expect("controller flags")
    .controller;
    let controller = tokio::spawn(larder_controllers::run(args));

    // A pod as the webhook leaves it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let annotation = serde_json::json!({ "app": original }).to_string();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "app",
            "labels": {"larder.dev/managed": "true"},
            "annotations": {"larder.dev/original-images": annotation}
        },
        "spec": {"containers": [{"name": "app", "image": rewritten}], "terminationGracePeriodSeconds": 0}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");

    let cached: Api<CachedImage> = Api::all(client.clone());
    let name = reference.cached_image_name();
    let ready = wait_for(
        "the CachedImage to be Ready and used by the pod",
        Duration::from_secs(120),
        || {
            let cached = cached.clone();
            let name = name.clone();
            async move {
                let ci = cached.get(&name).await.ok()?;
                let status = ci.status.clone()?;
                let used = status.used_by.as_ref().is_some_and(|u| u.count == 1);
                (status.phase == Some(Phase::Ready) && used).then_some(ci)
            }
        },
    )
    .await;
    assert_eq!(ready.spec.source_image, reference.to_string());
    let digest = ready
        .status
        .as_ref()
        .and_then(|s| s.digest.clone())
        .expect("a digest in status");
    // The copy is in the cache registry under <host>_<port>/<repo>, digest unchanged.
    let repo = reference.proxy_repository().unwrap();
    let copied =
        tokio::task::spawn_blocking(move || cache.get_manifest(&repo, "v1").map(|r| (r, cache)))
            .await
            .unwrap()
            .expect("the cache registry has the image");
    assert_eq!(copied.0.docker_content_digest(), Some(digest.as_str()));

    // Gone pod, short retention: the CachedImage expires and is deleted.
    pods.delete("app", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
    wait_for(
        "the CachedImage to expire and be deleted",
        Duration::from_secs(120),
        || {
            let cached = cached.clone();
            let name = name.clone();
            async move { matches!(cached.get_opt(&name).await, Ok(None)).then_some(()) }
        },
    )
    .await;

    controller.abort();
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    drop(origin);
    drop(copied);
}
