//! End-to-end against a real cluster: runs only when `KUBECONFIG` names one, and says it skips
//! otherwise. It installs the CRDs generated from the Rust types, runs the controller as a local
//! process against the cluster and two local distribution registries (origin and cache), creates
//! a pod as the webhook leaves it (label, annotation, rewritten image), and watches its
//! CachedImage go Ready in the cache registry and expire once the pod is gone; then a Precache
//! over two test Nodes, and the clean-up of the webhook's derived pull Secrets.
//!
//! CI runs it against larder's fake API server (`larder_testkit::fake_apiserver`, a test double
//! without validation, admission or RBAC; see `scripts/test.sh`), so it runs on every change;
//! pointed at a real cluster it checks the same behaviour there.
//!
//! The webhook is not part of this run: a cluster calls webhooks over the network, and a local
//! process is reachable only from a local apiserver.

// Setup failures in a test should panic with their reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use larder_core::crd::{CachedImage, NodeCache, Phase, Precache, PrecacheSpec};
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
        "--collect-derived-pull-secrets",
        "--derived-pull-secret-interval",
        "2s",
        // No node proxy pulls (and writes through) here: on a real cluster the pod stays
        // Pending on its rewritten image, and the copy must not wait for it.
        "--copy-wait-for-pulls",
        "0s",
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
    let (copied, cache) = {
        let repo = repo.clone();
        tokio::task::spawn_blocking(move || cache.get_manifest(&repo, "v1").map(|r| (r, cache)))
            .await
            .unwrap()
            .expect("the cache registry has the image")
    };
    assert_eq!(copied.docker_content_digest(), Some(digest.as_str()));

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

    // The finalizer removed the manifest from the cache registry before the object went.
    let (status, cache) = tokio::task::spawn_blocking(move || {
        let status = cache
            .request(
                "GET",
                &format!("/v2/{repo}/manifests/{digest}"),
                &[("Accept", larder_testkit::image::MANIFEST_ACCEPT)],
            )
            .expect("the cache registry answers")
            .status;
        (status, cache)
    })
    .await
    .unwrap();
    assert_eq!(
        status, 404,
        "the expired image is gone from the cache registry"
    );

    // Precache over Node objects (created here; a real cluster's own nodes are not selected:
    // the label is unique to this run). The same controller serves it.
    let label = format!("larder-e2e-{}", std::process::id());
    let nodes: Api<Node> = Api::all(client.clone());
    for (node, selected) in [(format!("{label}-a"), "yes"), (format!("{label}-b"), "no")] {
        let object: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node, "labels": {"larder-e2e": selected, "kubernetes.io/arch": "arm64", "kubernetes.io/os": "linux"}},
            // Unschedulable and tainted: nothing may ever be scheduled onto these test nodes.
            "spec": {"unschedulable": true, "taints": [{"key": "larder-e2e", "effect": "NoExecute"}]}
        }))
        .unwrap();
        nodes
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("creating Node {node}: {e}"));
    }
    let precaches: Api<Precache> = Api::all(client.clone());
    let precache_name = format!("{label}-warm");
    let mut spec: PrecacheSpec = serde_json::from_value(serde_json::json!({
        "images": [original],
        "nodeSelector": {"larder-e2e": "yes"}
    }))
    .unwrap();
    spec.max_concurrent.per_node = 1;
    precaches
        .patch(
            &precache_name,
            &PatchParams::apply("larder-e2e").force(),
            &Patch::Apply(&Precache::new(&precache_name, spec)),
        )
        .await
        .expect("the apiserver accepts a Precache");
    let retained = wait_for(
        "the precached image to be retained and Ready",
        Duration::from_secs(120),
        || {
            let cached = cached.clone();
            let name = name.clone();
            async move {
                let ci = cached.get(&name).await.ok()?;
                let ready = ci.status.as_ref()?.phase == Some(Phase::Ready);
                (ready && ci.spec.retain).then_some(ci)
            }
        },
    )
    .await;
    assert_eq!(
        retained
            .labels()
            .get("larder.dev/precached")
            .map(String::as_str),
        Some("true")
    );
    let node_caches: Api<NodeCache> = Api::all(client.clone());
    let selected = format!("{label}-a");
    let nc = wait_for(
        "a NodeCache for the selected node, with the digest",
        Duration::from_secs(60),
        || {
            let node_caches = node_caches.clone();
            let selected = selected.clone();
            async move {
                let nc = node_caches.get_opt(&selected).await.ok()??;
                nc.spec.images.first()?.digest.as_ref()?;
                Some(nc)
            }
        },
    )
    .await;
    assert_eq!(nc.spec.platform, "linux/arm64/v8");
    assert_eq!(nc.spec.max_concurrent, 1);
    assert_eq!(nc.spec.images[0].image, reference.to_string());
    assert!(
        node_caches
            .get_opt(&format!("{label}-b"))
            .await
            .expect("get")
            .is_none(),
        "the unselected node gets no NodeCache"
    );
    // The Precache's status says 1/1 images and 0/1 nodes (no proxy runs on a test node).
    wait_for("the Precache status", Duration::from_secs(60), || {
        let precaches = precaches.clone();
        let precache_name = precache_name.clone();
        async move {
            let st = precaches.get(&precache_name).await.ok()?.status?;
            (st.images_summary.as_deref() == Some("1/1")
                && st.nodes_summary.as_deref() == Some("0/1"))
            .then_some(())
        }
    })
    .await;
    // The Precache goes: the NodeCache goes, the image is released and (unused) expires.
    precaches
        .delete(&precache_name, &DeleteParams::default())
        .await
        .expect("delete Precache");
    wait_for("the NodeCache to go", Duration::from_secs(60), || {
        let node_caches = node_caches.clone();
        let selected = selected.clone();
        async move { matches!(node_caches.get_opt(&selected).await, Ok(None)).then_some(()) }
    })
    .await;
    wait_for(
        "the released image to expire",
        Duration::from_secs(120),
        || {
            let cached = cached.clone();
            let name = name.clone();
            async move { matches!(cached.get_opt(&name).await, Ok(None)).then_some(()) }
        },
    )
    .await;
    for node in [format!("{label}-a"), format!("{label}-b")] {
        let _ = nodes.delete(&node, &DeleteParams::default()).await;
    }

    derived_pull_secrets_are_collected(&client, &namespace).await;

    controller.abort();
    let _ = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await;
    drop(origin);
    drop(cache);
}

/// The webhook's derived pull Secrets (`--pull-secrets=derive`), as it leaves them: the one
/// that is superseded (its source has changed since) and named by no pod is deleted; the one
/// still named by a pod and the one built from the source as it is now stay.
async fn derived_pull_secrets_are_collected(client: &Client, namespace: &str) {
    use larder_core::derived_secrets::{
        MANAGED_BY_LABEL, MANAGED_BY_VALUE, SOURCE_VERSIONS_ANNOTATION, secret_version,
        source_versions,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let docker_config = |name: &str, labels: serde_json::Value, annotations: serde_json::Value| {
        serde_json::from_value::<Secret>(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "labels": labels, "annotations": annotations},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": r#"{"auths":{}}"#}
        }))
        .unwrap()
    };
    // First, a managed pod naming one of them (no images to cache: no annotation), so that it
    // is in the controller's pod cache before any pass can see the Secret.
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "puller", "labels": {"larder.dev/managed": "true"}},
        "spec": {
            "containers": [{"name": "c", "image": "localhost:7439/example.invalid/none:v1"}],
            "imagePullSecrets": [{"name": "larder-pull-in-use"}],
            "nodeSelector": {"larder-e2e": "nowhere"},
            "terminationGracePeriodSeconds": 0
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("the pod naming a derived Secret");
    let source = secrets
        .create(
            &PostParams::default(),
            &docker_config("regcred", serde_json::json!({}), serde_json::json!({})),
        )
        .await
        .expect("the source Secret");
    let now = secret_version(&source.metadata);
    let before = format!("{}/0", source.uid().expect("a uid"));
    for (name, version) in [
        ("larder-pull-superseded", &before),
        ("larder-pull-in-use", &before),
        ("larder-pull-current", &now),
    ] {
        let derived = docker_config(
            name,
            serde_json::json!({ MANAGED_BY_LABEL: MANAGED_BY_VALUE }),
            serde_json::json!({
                SOURCE_VERSIONS_ANNOTATION: source_versions([("regcred", version.as_str())])
            }),
        );
        secrets
            .create(&PostParams::default(), &derived)
            .await
            .unwrap_or_else(|e| panic!("creating Secret {name}: {e}"));
    }
    wait_for(
        "the superseded, unused derived Secret to be deleted",
        Duration::from_secs(60),
        || {
            let secrets = secrets.clone();
            async move {
                matches!(secrets.get_opt("larder-pull-superseded").await, Ok(None)).then_some(())
            }
        },
    )
    .await;
    // Two more passes (2 s apart), so the one named by the pod has had its second look too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for kept in ["larder-pull-in-use", "larder-pull-current", "regcred"] {
        assert!(
            secrets.get_opt(kept).await.expect("get").is_some(),
            "{kept} was kept"
        );
    }
    pods.delete("puller", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete pod");
}
