//! The copy engine against real CNCF distribution registries (origin and cache), plus one
//! fake origin (axum on 127.0.0.1) that serves a blob not matching its digest.

// Test setup failing is the test failing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use larder_controllers::Error;
use larder_controllers::registry::{Copier, Endpoint, PlatformFilter, Progress, RegistryClient};
use larder_core::dockerconfig::{Credentials, DockerConfig};
use larder_core::reference::Reference;
use larder_testkit::token_server::TokenServer;
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

// ---- Private images: an htpasswd-protected distribution origin ----

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

/// A private origin (Basic auth) holding `image` as `repo:tag`, and an anonymous cache.
async fn private_origin(image: &BuiltImage, repo: &str, tag: &str) -> (Registry, Registry, String) {
    let (image, repo, tag) = (image.clone(), repo.to_owned(), tag.to_owned());
    blocking(move || {
        let origin =
            Registry::start(RegistryOptions::basic_auth(USER, PASSWORD).named("private origin"))
                .unwrap();
        let cache = Registry::start(RegistryOptions::default().named("cache")).unwrap();
        let digest = origin.push_image(&image, &repo, &tag).unwrap().digest;
        (origin, cache, digest)
    })
    .await
}

/// Candidates as the controller finds them: parsed from a `.dockerconfigjson`.
fn from_docker_config(origin: &Registry, password: &str, repo: &str) -> Vec<Credentials> {
    let header = Credentials::new(USER, password).basic_header();
    let auth = header.trim_start_matches("Basic ");
    let json = serde_json::json!({"auths": {
        format!("http://{}", origin.host_port()): {"auth": auth},
        "elsewhere.example": {"username": "x", "password": "y"},
    }});
    let config = DockerConfig::parse(json.to_string().as_bytes()).unwrap();
    let found: Vec<Credentials> = config
        .matching(&origin.host_port(), repo)
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(found.len(), 1, "only the origin's entry matches");
    found
}

#[tokio::test]
async fn a_private_image_is_copied_with_credentials_after_anonymous_is_refused() {
    let image = ImageBuilder::new()
        .random_layer(200_000)
        .random_layer(1000)
        .build()
        .unwrap();
    let (origin, cache, digest) = private_origin(&image, "team/private", "v1").await;
    let source = Reference::parse(&origin.reference("team/private", "v1")).unwrap();
    let copier = copier(&origin.host_port(), &cache, &[]);

    // Anonymous only: refused, and the reason says no credentials were found.
    let err = copier
        .copy(&source, &Progress::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { tried: 0, .. }), "{err}");
    assert_eq!(err.metric_label(), "CredentialsUnavailable");

    // A wrong candidate first, then the right one from a docker config.
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let mut candidates = vec![Credentials::new(USER, "wrong")];
    candidates.extend(from_docker_config(&origin, PASSWORD, "team/private"));
    let progress = Progress::default();
    let outcome = copier
        .copy_with(
            &source,
            || {
                asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async { candidates }
            },
            &progress,
        )
        .await
        .unwrap();
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(outcome.digest, digest);
    assert_eq!(outcome.upstream_digest, digest);
    assert!(outcome.authenticated);
    assert_eq!(outcome.platforms, ["linux/amd64"], "from the image config");
    assert_eq!(outcome.uploaded, 3);
    assert_eq!(progress.copied(), progress.total());
    let right = || async { vec![Credentials::new(USER, PASSWORD)] };
    assert_eq!(
        copier.origin_digest_with(&source, right).await.unwrap(),
        digest,
        "tag refresh of a private image"
    );

    let repo = cache_repo(&origin.host_port(), "team/private");
    blocking(move || {
        let o = origin.get_manifest("team/private", "v1").unwrap().body;
        let c = cache.get_manifest(&repo, "v1").unwrap().body;
        assert_eq!(o, c, "manifest bytes unchanged");
        for blob in image.blobs() {
            assert_eq!(
                cache.get_blob(&repo, &blob.digest).unwrap().body_digest(),
                blob.digest
            );
        }
        // Anonymous first, and no credential after the right one was found.
        let log = origin.requests();
        assert!(
            log.iter()
                .any(|r| r.status == 401 && r.path.ends_with("/manifests/v1"))
        );
    })
    .await;
}

#[tokio::test]
async fn public_images_never_look_for_credentials() {
    let (origin, cache) = registries().await;
    let image = ImageBuilder::new().random_layer(1000).build().unwrap();
    push(&origin, &image, "library/open", "v1").await;
    let source = Reference::parse(&origin.reference("library/open", "v1")).unwrap();
    let outcome = copier(&origin.host_port(), &cache, &[])
        .copy_with(
            &source,
            || async { panic!("credentials looked up for a public image") },
            &Progress::default(),
        )
        .await
        .unwrap();
    assert!(!outcome.authenticated);
    assert_eq!(outcome.platforms, ["linux/amd64"]);
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_and_nothing_is_written() {
    let image = IndexBuilder::new()
        .platforms(
            &[Platform::linux("amd64"), Platform::linux("arm64")],
            &[20_000],
        )
        .build()
        .unwrap();
    let (origin, cache, _) = private_origin(&image, "team/locked", "v1").await;
    let source = Reference::parse(&origin.reference("team/locked", "v1")).unwrap();
    let copier = copier(&origin.host_port(), &cache, &[]);
    let wrong = || async {
        vec![
            Credentials::new(USER, "wrong"),
            Credentials::new("mallory", PASSWORD),
        ]
    };
    let err = copier
        .copy_with(&source, wrong, &Progress::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { tried: 2, .. }), "{err}");
    assert_eq!(err.metric_label(), "Unauthorized");
    assert!(!err.to_string().contains("wrong") && !err.to_string().contains(PASSWORD));
    let err = copier.origin_digest_with(&source, wrong).await.unwrap_err();
    assert_eq!(err.metric_label(), "Unauthorized");
    let repo = cache_repo(&origin.host_port(), "team/locked");
    blocking(move || {
        let r = cache
            .request("HEAD", &format!("/v2/{repo}/manifests/v1"), &[])
            .unwrap();
        assert_eq!(r.status, 404, "no manifest in the cache");
        for blob in image.blobs() {
            let r = cache
                .request("HEAD", &format!("/v2/{repo}/blobs/{}", blob.digest), &[])
                .unwrap();
            assert_eq!(r.status, 404, "no blob in the cache");
        }
        let catalog = cache.request("GET", "/v2/_catalog", &[]).unwrap();
        assert!(
            !String::from_utf8_lossy(&catalog.body).contains("team"),
            "nothing written"
        );
        drop(origin);
    })
    .await;
}

#[tokio::test]
async fn a_private_multi_platform_index_keeps_every_digest() {
    let image = IndexBuilder::new()
        .platforms(
            &[
                Platform::linux("amd64"),
                Platform::linux("arm64").with_variant("v8"),
            ],
            &[30_000, 500],
        )
        .build()
        .unwrap();
    let (origin, cache, digest) = private_origin(&image, "team/multi", "2.0").await;
    let source = Reference::parse(&origin.reference("team/multi", "2.0")).unwrap();
    let copier = copier(&origin.host_port(), &cache, &[]);
    let right = || async { vec![Credentials::new(USER, PASSWORD)] };
    let outcome = copier
        .copy_with(&source, right, &Progress::default())
        .await
        .unwrap();
    assert_eq!(outcome.digest, digest);
    assert_eq!(outcome.platforms, ["linux/amd64", "linux/arm64/v8"]);
    // What the finalizer's cleanup reads: the cached index's children.
    let mut children = copier.cached_children(&source, &digest).await.unwrap();
    children.sort();
    let mut expected: Vec<String> = image
        .manifest_blobs()
        .iter()
        .map(|m| m.digest.clone())
        .filter(|d| *d != digest)
        .collect();
    expected.sort();
    assert_eq!(children, expected);
    let repo = cache_repo(&origin.host_port(), "team/multi");
    blocking(move || {
        assert_eq!(
            origin.get_manifest("team/multi", "2.0").unwrap().body,
            cache.get_manifest(&repo, "2.0").unwrap().body
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
async fn private_layers_are_never_mounted_into_other_repositories() {
    // A private image and a public one share a layer. Copying the public one must fetch that
    // layer from its own origin, not mount it from the private repository: a manifest anyone
    // can publish could otherwise name a private layer and get it served as public.
    let private = ImageBuilder::new()
        .seeded_layer(100_000, 42)
        .build()
        .unwrap();
    let public = ImageBuilder::new()
        .seeded_layer(100_000, 42)
        .random_layer(500)
        .build()
        .unwrap();
    let shared = private.manifests[0].layers[0].blob.digest.clone();
    assert_eq!(shared, public.manifests[0].layers[0].blob.digest);
    let (origin, cache, _) = private_origin(&private, "team/secret", "v1").await;
    let open =
        blocking(|| Registry::start(RegistryOptions::default().named("public origin")).unwrap())
            .await;
    push(&open, &public, "team/open", "v1").await;
    init();
    let client = Arc::new(RegistryClient::new(vec![origin.host_port(), open.host_port()]).unwrap());
    let copier = Copier::new(
        client,
        Endpoint::new(cache.url().parse().unwrap()),
        Vec::new(),
    );
    let right = || async { vec![Credentials::new(USER, PASSWORD)] };
    let source = Reference::parse(&origin.reference("team/secret", "v1")).unwrap();
    copier
        .copy_with(&source, right, &Progress::default())
        .await
        .unwrap();
    let source = Reference::parse(&open.reference("team/open", "v1")).unwrap();
    let outcome = copier.copy(&source, &Progress::default()).await.unwrap();
    assert_eq!((outcome.mounted, outcome.uploaded), (0, 3), "{outcome:?}");
    blocking(move || {
        assert!(!cache.requests().iter().any(|r| r.path.contains("mount=")));
        let fetched = open
            .requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&shared))
            .count();
        assert_eq!(fetched, 1, "the shared layer came from the public origin");
        drop(origin);
    })
    .await;
}

// ---- Token auth: distribution with `auth: token` and the testkit's token server ----

/// A token server knowing alice (password and refresh token), a distribution origin trusting
/// it with `team/app:v1` pushed, and an anonymous cache.
async fn token_origin(image: &BuiltImage) -> (TokenServer, Registry, Registry, String) {
    let image = image.clone();
    blocking(move || {
        let tokens = TokenServer::builder()
            .user(USER, PASSWORD)
            .refresh_token("rt-alice", USER)
            .start()
            .unwrap();
        let origin = Registry::start(
            RegistryOptions::default()
                .named("token origin")
                .with_extra_yaml(tokens.registry_yaml()),
        )
        .unwrap();
        let cache = Registry::start(RegistryOptions::default().named("cache")).unwrap();
        let digest = tokens
            .push(
                &image,
                &origin.host_port(),
                "team/app",
                "v1",
                &larder_testkit::Credentials::new(USER, PASSWORD),
            )
            .unwrap();
        (tokens, origin, cache, digest)
    })
    .await
}

#[tokio::test]
async fn bearer_tokens_bought_with_credentials_copy_a_private_image() {
    let image = IndexBuilder::new()
        .platforms(
            &[Platform::linux("amd64"), Platform::linux("arm64")],
            &[10_000],
        )
        .build()
        .unwrap();
    let (tokens, origin, cache, digest) = token_origin(&image).await;
    let source = Reference::parse(&origin.reference("team/app", "v1")).unwrap();
    let copier = copier(&origin.host_port(), &cache, &[]);

    // The anonymous token grants nothing: refused, no credentials to try.
    let err = copier
        .copy(&source, &Progress::default())
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "CredentialsUnavailable", "{err}");
    // A wrong password is refused by the token service.
    let wrong = || async { vec![Credentials::new(USER, "guess")] };
    let err = copier
        .copy_with(&source, wrong, &Progress::default())
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "Unauthorized", "{err}");

    let right = || async { vec![Credentials::new(USER, PASSWORD)] };
    let outcome = copier
        .copy_with(&source, right, &Progress::default())
        .await
        .unwrap();
    assert_eq!(outcome.digest, digest);
    assert!(outcome.authenticated);
    assert_eq!(outcome.platforms, ["linux/amd64", "linux/arm64"]);

    // An identity token (OAuth2 refresh-token grant) works as well, for a tag refresh.
    let identity = || async {
        let mut c = Credentials::new("", "");
        c.identity_token = Some("rt-alice".into());
        vec![c]
    };
    assert_eq!(
        copier.origin_digest_with(&source, identity).await.unwrap(),
        digest
    );

    let log = tokens.requests();
    assert!(
        log.iter().any(|r| r.method == "GET"
            && r.user.is_none()
            && r.status == 200
            && r.scopes == ["repository:team/app:pull"]),
        "anonymous first: {log:?}"
    );
    assert!(
        log.iter().any(|r| r.method == "GET" && r.status == 401),
        "the wrong password reached the token service and was refused: {log:?}"
    );
    assert!(
        log.iter()
            .any(|r| r.method == "GET" && r.user.as_deref() == Some(USER) && r.status == 200),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|r| r.method == "POST" && r.user.as_deref() == Some(USER) && r.status == 200),
        "{log:?}"
    );
    // One token per scope and credential: the blobs and children reused it. (skopeo's push
    // asked for `pull,push`.)
    let alice_gets = log
        .iter()
        .filter(|r| r.method == "GET" && r.user.as_deref() == Some(USER))
        .filter(|r| r.scopes == ["repository:team/app:pull"])
        .count();
    assert_eq!(alice_gets, 1, "{log:?}");

    let repo = cache_repo(&origin.host_port(), "team/app");
    blocking(move || {
        let cached = cache.get_manifest(&repo, "v1").unwrap();
        assert_eq!(cached.body_digest(), digest);
        for m in image.manifest_blobs() {
            assert_eq!(cache.get_manifest(&repo, &m.digest).unwrap().body, m.bytes);
        }
        drop((origin, tokens));
    })
    .await;
}
