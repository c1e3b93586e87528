//! Bearer token exchange with credentials against a real CNCF distribution registry configured
//! with `auth: token`, trusting the testkit's token server (ES256 JWTs with an `x5c` header).
//! The proxy: a private repository behind token auth is served only to clients whose
//! credentials buy a token, whatever tier serves it. (The controllers' copy is tested against
//! the same pair in `controllers/tests/copy.rs`.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use larder_testkit::token_server::TokenServer;
use larder_testkit::{
    BuiltImage, Credentials, ImageBuilder, Registry, RegistryOptions, SkopeoPullOptions,
    pull_with_skopeo_async, sha256_digest,
};
use reqwest::StatusCode;

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

/// The digest of the manifest skopeo wrote into a `dir:` destination.
fn manifest_digest(dir: &std::path::Path) -> String {
    sha256_digest(&std::fs::read(dir.join("manifest.json")).unwrap())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// A token server knowing alice and a distribution origin trusting it, with `image` pushed
/// (with alice's credentials) as `team/secret:v1`.
async fn token_origin(image: &BuiltImage) -> (TokenServer, Registry, String) {
    let image = image.clone();
    blocking(move || {
        let tokens = TokenServer::builder().user(USER, PASSWORD).start().unwrap();
        let origin = Registry::start(
            RegistryOptions::default()
                .named("token origin")
                .with_extra_yaml(tokens.registry_yaml()),
        )
        .unwrap();
        let digest = tokens
            .push(
                &image,
                &origin.host_port(),
                "team/secret",
                "v1",
                &Credentials::new(USER, PASSWORD),
            )
            .unwrap();
        (tokens, origin, digest)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_trusts_the_token_server() {
    let image = ImageBuilder::new().random_layer(1000).build().unwrap();
    let (tokens, origin, digest) = token_origin(&image).await;
    blocking(move || {
        // No token: a Bearer challenge naming the token server.
        let r = origin
            .request("GET", "/v2/team/secret/manifests/v1", &[])
            .unwrap();
        assert_eq!(r.status, 401);
        let challenge = r
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("www-authenticate"))
            .map(|(_, v)| v.clone())
            .unwrap();
        assert!(challenge.starts_with("Bearer "), "{challenge}");
        assert!(challenge.contains(&tokens.realm()), "{challenge}");
        // skopeo pulls with the credentials (it bought a token), and not without.
        let dest = tempfile::tempdir().unwrap();
        larder_testkit::pull_with_skopeo_opts(
            &format!("{}/team/secret:v1", origin.host_port()),
            &dest.path().join("ok"),
            &SkopeoPullOptions {
                creds: Some(Credentials::new(USER, PASSWORD)),
                timeout: Some(Duration::from_secs(60)),
                ..SkopeoPullOptions::default()
            },
        )
        .unwrap();
        assert_eq!(manifest_digest(&dest.path().join("ok")), digest);
        let refused = larder_testkit::pull_with_skopeo_opts(
            &format!("{}/team/secret:v1", origin.host_port()),
            &dest.path().join("refused"),
            &SkopeoPullOptions {
                timeout: Some(Duration::from_secs(60)),
                ..SkopeoPullOptions::default()
            },
        );
        assert!(refused.is_err(), "an anonymous token grants nothing");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxy_serves_a_token_auth_private_repository_only_with_credentials() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let image = ImageBuilder::new().random_layer(100 << 10).build().unwrap();
    let layer = image.manifests[0].layers[0].blob.digest.clone();
    let (tokens, origin, digest) = token_origin(&image).await;
    let host = origin.host_port();
    let disk = tempfile::tempdir().unwrap();
    let disk_arg = disk.path().to_str().unwrap().to_owned();
    let token_host = tokens.addr().to_string();
    let args = larder_proxy::ProxyArgs::from_args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        &disk_arg,
        "--insecure-registry",
        &host,
        // The token realm is on loopback too: allowed explicitly, as an operator would.
        "--allow-registry",
        &token_host,
    ])
    .unwrap();
    let proxy = larder_proxy::start(args).await.unwrap();
    let base = format!(
        "http://{}/v2/{}/team/secret",
        proxy.addrs[0],
        host.replace(':', "_")
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let get = |path: String, creds: Option<(&str, &str)>| {
        let request = client.get(format!("{base}/{path}")).header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        );
        let request = match creds {
            Some((u, p)) => request.basic_auth(u, Some(p)),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };

    let anonymous = get("manifests/v1".into(), None).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let wrong = get("manifests/v1".into(), Some((USER, "guess"))).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);

    // A real client with the right credentials pulls through the proxy: the proxy buys a
    // token with them at the token server.
    let dest = tempfile::tempdir().unwrap();
    pull_with_skopeo_async(
        format!(
            "{}/{}/team/secret:v1",
            proxy.addrs[0],
            host.replace(':', "_")
        ),
        dest.path().join("out"),
        SkopeoPullOptions {
            creds: Some(Credentials::new(USER, PASSWORD)),
            timeout: Some(Duration::from_secs(60)),
            ..SkopeoPullOptions::default()
        },
    )
    .await
    .expect("skopeo pulls the private image through the proxy");
    assert_eq!(manifest_digest(&dest.path().join("out")), digest);
    let log = tokens.requests();
    assert!(
        log.iter()
            .any(|r| r.user.as_deref() == Some(USER) && r.status == 200),
        "the proxy bought a token with alice's credentials: {log:?}"
    );

    // Cached now, and still refused without credentials or with wrong ones.
    for creds in [None, Some((USER, "guess")), Some(("mallory", PASSWORD))] {
        for path in [format!("manifests/{digest}"), format!("blobs/{layer}")] {
            let r = get(path.clone(), creds).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{creds:?} {path}");
        }
    }
    let served = get(format!("blobs/{layer}"), Some((USER, PASSWORD))).await;
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&served.bytes().await.unwrap()), layer);
    proxy.shutdown(Duration::from_secs(5)).await;
    drop((origin, tokens));
}
