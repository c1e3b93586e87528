//! The copy engine against real CNCF distribution registries (origin and cache), plus one
//! fake origin (axum on 127.0.0.1) that serves a blob not matching its digest.

// Test setup failing is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use larder_controllers::Error;
use larder_controllers::registry::{Copier, Endpoint, PlatformFilter, Progress, RegistryClient};
use larder_core::reference::Reference;
use larder_testkit::{BuiltImage, ImageBuilder, IndexBuilder, Platform, Registry, RegistryOptions};

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn registries() -> (Registry, Registry) {
    tokio::task::spawn_blocking(|| {
        let origin = Registry::start(RegistryOptions::default().named("origin")).unwrap();
        let cache = Registry::start(RegistryOptions::default().named("cache")).unwrap();
        (origin, cache)
    })
    .await
    .unwrap()
}

async fn push(origin: &Registry, image: &BuiltImage, repo: &str, tag: &str) -> String {
    let (image, repo, tag) = (image.clone(), repo.to_owned(), tag.to_owned());
    let url = origin.url();
    // Registry is not Clone; push through skopeo by address.
    let host = origin.host_port();
    tokio::task::spawn_blocking(move || {
        let layout = tempfile::tempdir().unwrap();
        image.write_oci_layout(layout.path(), &tag).unwrap();
        let pushed = larder_testkit::push(layout.path(), &tag, &host, &repo, None).unwrap();
        let _ = url;
        pushed.digest
    })
    .await
    .unwrap()
}

fn copier(origin: &str, cache: &Registry, platforms: &[&str]) -> Copier {
    init();
    let client = Arc::new(RegistryClient::new(vec![origin.to_owned()]).unwrap());
    let endpoint = Endpoint::new(cache.url().parse().unwrap());
    let platforms = platforms
        .iter()
        .map(|p| PlatformFilter::parse(p).unwrap())
        .collect();
    Copier::new(client, endpoint, platforms)
}

/// The path the cache stores `repo` of `origin` under.
fn cache_repo(origin: &str, repo: &str) -> String {
    format!("{}/{repo}", origin.replace(':', "_"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test]
async fn single_platform_image_is_copied_verbatim() {
    let (origin, cache) = registries().await;
    let image = ImageBuilder::new()
        .random_layer(300_000)
        .random_layer(1000)
        .build()
        .unwrap();
    let digest = push(&origin, &image, "library/app", "v1").await;
    let source = Reference::parse(&origin.reference("library/app", "v1")).unwrap();
    let copier = copier(&origin.host_port(), &cache, &[]);
    let progress = Progress::default();
    let outcome = copier.copy(&source, &progress).await.unwrap();
    assert_eq!(outcome.digest, digest);
    assert_eq!(outcome.upstream_digest, digest);
    assert_eq!(outcome.uploaded, 3, "config and two layers");
    assert_eq!(progress.copied(), progress.total());
    assert_eq!(outcome.size_bytes, progress.total());

    let repo = cache_repo(&origin.host_port(), "library/app");
    let (o, c) = blocking(move || {
        let o = origin.get_manifest("library/app", "v1").unwrap().body;
        let c = cache.get_manifest(&repo, "v1").unwrap().body;
        for blob in image.blobs() {
            let got = cache.get_blob(&repo, &blob.digest).unwrap();
            assert_eq!(got.body_digest(), blob.digest);
        }
        (o, c)
    })
    .await;
    assert_eq!(o, c, "manifest bytes unchanged");
}

#[tokio::test]
async fn multi_platform_index_keeps_every_digest() {
    let (origin, cache) = registries().await;
    let image = IndexBuilder::new()
        .platforms(
            &[
                Platform::linux("amd64"),
                Platform::linux("arm64").with_variant("v8"),
            ],
            &[50_000],
        )
        .build()
        .unwrap();
    let digest = push(&origin, &image, "org/multi", "1.0").await;
    let source = Reference::parse(&origin.reference("org/multi", "1.0")).unwrap();
    let outcome = copier(&origin.host_port(), &cache, &[])
        .copy(&source, &Progress::default())
        .await
        .unwrap();
    assert_eq!(outcome.digest, digest);
    assert_eq!(outcome.platforms, ["linux/amd64", "linux/arm64/v8"]);
    let repo = cache_repo(&origin.host_port(), "org/multi");
    blocking(move || {
        assert_eq!(
            origin.get_manifest("org/multi", "1.0").unwrap().body,
            cache.get_manifest(&repo, "1.0").unwrap().body
        );
        for m in image.manifest_blobs() {
            let got = cache.get_manifest(&repo, &m.digest).unwrap();
            assert_eq!(got.body, m.bytes, "child {} verbatim", m.digest);
        }
        for blob in image.blobs() {
            cache.get_blob(&repo, &blob.digest).unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn platform_filter_makes_a_new_index_but_digest_pins_copy_whole() {
    let (origin, cache) = registries().await;
    let image = IndexBuilder::new()
        .platforms(
            &[Platform::linux("amd64"), Platform::linux("arm64")],
            &[10_000],
        )
        .build()
        .unwrap();
    let digest = push(&origin, &image, "org/filtered", "1.0").await;
    let copier = copier(&origin.host_port(), &cache, &["linux/arm64"]);
    let tagged = Reference::parse(&origin.reference("org/filtered", "1.0")).unwrap();
    let outcome = copier.copy(&tagged, &Progress::default()).await.unwrap();
    assert_eq!(outcome.upstream_digest, digest);
    assert_ne!(outcome.digest, digest, "a filtered index is a new document");
    assert_eq!(outcome.platforms, ["linux/arm64"]);
    assert_eq!(outcome.uploaded, 2, "only arm64's config and layer");

    let pinned =
        Reference::parse(&format!("{}/org/filtered@{digest}", origin.host_port())).unwrap();
    let outcome = copier.copy(&pinned, &Progress::default()).await.unwrap();
    assert_eq!(outcome.digest, digest);
    assert_eq!(outcome.platforms.len(), 2);
    let repo = cache_repo(&origin.host_port(), "org/filtered");
    blocking(move || {
        let got = cache.get_manifest(&repo, &digest).unwrap();
        assert_eq!(got.body_digest(), digest);
        drop(origin);
    })
    .await;
}

#[tokio::test]
async fn digest_pinned_single_manifest() {
    let (origin, cache) = registries().await;
    let image = ImageBuilder::new().random_layer(2000).build().unwrap();
    let digest = push(&origin, &image, "library/pinned", "v1").await;
    let source =
        Reference::parse(&format!("{}/library/pinned@{digest}", origin.host_port())).unwrap();
    let outcome = copier(&origin.host_port(), &cache, &[])
        .copy(&source, &Progress::default())
        .await
        .unwrap();
    assert_eq!(outcome.digest, digest);
    let repo = cache_repo(&origin.host_port(), "library/pinned");
    blocking(move || {
        assert_eq!(
            cache.get_manifest(&repo, &digest).unwrap().body_digest(),
            digest
        );
        drop(origin);
    })
    .await;
}

#[tokio::test]
async fn a_shared_layer_is_mounted_not_uploaded_again() {
    let (origin, cache) = registries().await;
    let a = ImageBuilder::new()
        .seeded_layer(200_000, 7)
        .random_layer(1000)
        .build()
        .unwrap();
    let b = ImageBuilder::new()
        .seeded_layer(200_000, 7)
        .random_layer(1000)
        .build()
        .unwrap();
    let shared = a.manifests[0].layers[0].blob.digest.clone();
    assert_eq!(shared, b.manifests[0].layers[0].blob.digest);
    push(&origin, &a, "team/a", "v1").await;
    push(&origin, &b, "team/b", "v1").await;
    let copier = copier(&origin.host_port(), &cache, &[]);
    let first = copier
        .copy(
            &Reference::parse(&origin.reference("team/a", "v1")).unwrap(),
            &Progress::default(),
        )
        .await
        .unwrap();
    assert_eq!(first.uploaded, 3);
    let second = copier
        .copy(
            &Reference::parse(&origin.reference("team/b", "v1")).unwrap(),
            &Progress::default(),
        )
        .await
        .unwrap();
    assert_eq!((second.uploaded, second.mounted), (2, 1));

    let repo_a = cache_repo(&origin.host_port(), "team/a");
    let repo_b = cache_repo(&origin.host_port(), "team/b");
    blocking(move || {
        let log = cache
            .wait_for_requests(std::time::Duration::from_secs(5), |reqs| {
                reqs.iter()
                    .any(|r| r.method == "POST" && r.path.contains("mount="))
            })
            .unwrap();
        let mount = log
            .iter()
            .find(|r| r.method == "POST" && r.path.contains("mount="))
            .unwrap();
        assert!(
            mount
                .path
                .starts_with(&format!("/v2/{repo_b}/blobs/uploads/"))
        );
        assert!(mount.path.contains(&shared.replace(':', "%3A")) || mount.path.contains(&shared));
        assert!(mount.path.contains(&repo_a.replace('/', "%2F")) || mount.path.contains(&repo_a));
        assert_eq!(mount.status, 201);
        // The shared layer was fetched from the origin once only.
        let shared_gets = origin
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&shared))
            .count();
        assert_eq!(shared_gets, 1);
        cache.get_blob(&repo_b, &shared).unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_rerun_after_an_interrupted_copy_copies_only_what_is_missing() {
    let (origin, cache) = registries().await;
    let image = ImageBuilder::new()
        .random_layer(100_000)
        .random_layer(100_000)
        .build()
        .unwrap();
    push(&origin, &image, "library/resume", "v1").await;
    let source = Reference::parse(&origin.reference("library/resume", "v1")).unwrap();
    let copier = copier(&origin.host_port(), &cache, &[]);
    copier.copy(&source, &Progress::default()).await.unwrap();
    // Simulate an interruption: the tag and one layer never made it.
    let repo = cache_repo(&origin.host_port(), "library/resume");
    let lost = image.manifests[0].layers[1].blob.digest.clone();
    let cache = blocking({
        let (repo, lost, digest) = (repo.clone(), lost.clone(), image.digest().to_owned());
        move || {
            for path in [
                format!("/v2/{repo}/manifests/{digest}"),
                format!("/v2/{repo}/blobs/{lost}"),
            ] {
                let r = cache.request("DELETE", &path, &[]).unwrap();
                assert_eq!(r.status, 202, "DELETE {path}");
            }
            cache
        }
    })
    .await;
    let outcome = copier.copy(&source, &Progress::default()).await.unwrap();
    assert_eq!((outcome.uploaded, outcome.present), (1, 2));
    assert_eq!(
        outcome.uploaded_bytes,
        image.manifests[0].layers[1].blob.size
    );
    blocking(move || {
        cache.get_manifest(&repo, "v1").unwrap();
        cache.get_blob(&repo, &lost).unwrap();
        drop(origin);
    })
    .await;
}

#[tokio::test]
async fn origin_down_is_a_retryable_error() {
    let (origin, cache) = registries().await;
    let host = origin.host_port();
    let source = Reference::parse(&format!("{host}/library/app:v1")).unwrap();
    let mut origin = origin;
    blocking(move || {
        origin.stop().unwrap();
        drop(cache);
    })
    .await;
    let cache = blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await;
    let err = copier(&host, &cache, &[])
        .copy(&source, &Progress::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.metric_label(), "OriginUnreachable");
    assert!(err.to_string().contains(&host), "{err}");
}

#[tokio::test]
async fn a_blob_not_matching_its_digest_is_refused() {
    use axum::Router;
    use axum::http::header;
    use axum::routing::get;

    init();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let promised = vec![1u8; 4096];
    let served = vec![2u8; 4096];
    let digest_of = |b: &[u8]| larder_testkit::sha256_digest(b);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest_of(&promised), "size": promised.len()}],
    }))
    .unwrap();
    let config_path = format!("/v2/evil/app/blobs/{}", digest_of(&config));
    let layer_path = format!("/v2/evil/app/blobs/{}", digest_of(&promised));
    let app = Router::new()
        .route(
            "/v2/evil/app/manifests/v1",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/vnd.oci.image.manifest.v1+json",
                    )],
                    manifest,
                )
            }),
        )
        .route(&config_path, get(move || async move { config }))
        .route(&layer_path, get(move || async move { served }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let cache = blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await;
    let source = Reference::parse(&format!("{addr}/evil/app:v1")).unwrap();
    let err = copier(&addr.to_string(), &cache, &[])
        .copy(&source, &Progress::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    let repo = cache_repo(&addr.to_string(), "evil/app");
    let layer = digest_of(&promised);
    blocking(move || {
        let r = cache
            .request("HEAD", &format!("/v2/{repo}/blobs/{layer}"), &[])
            .unwrap();
        assert_eq!(r.status, 404, "the bad blob was not stored");
        let r = cache
            .request("HEAD", &format!("/v2/{repo}/manifests/v1"), &[])
            .unwrap();
        assert_eq!(r.status, 404, "no manifest points at it");
    })
    .await;
    server.abort();
}
