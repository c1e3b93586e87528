//! The proxy against real servers: CNCF distribution registries as origin and cache registry,
//! skopeo and containerd's ctr as clients, and small fake origins (axum on 127.0.0.1) for the
//! misbehaviours a real registry will not produce on demand.

// Test helpers outside #[test] functions panic on setup failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use larder_proxy::RunningProxy;
use larder_testkit::{
    BuiltImage, Containerd, Credentials, CtrPullOptions, ImageBuilder, IndexBuilder, Platform,
    Registry, RegistryOptions, SkopeoPullOptions, pull_with_skopeo_async, sha256_digest,
    skip_on_skipped, write_hosts_toml,
};

const REPO: &str = "library/app";

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A running proxy with its own disk tier.
struct Proxy {
    running: Option<RunningProxy>,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    _disk: Option<tempfile::TempDir>,
}

impl Proxy {
    async fn start(extra: &[&str]) -> Proxy {
        let disk = tempfile::tempdir().expect("disk dir");
        let mut proxy = Proxy::start_on(disk.path(), extra).await;
        proxy._disk = Some(disk);
        proxy
    }

    /// A proxy whose disk tier is `disk` (kept by the caller, e.g. across restarts).
    async fn start_on(disk: &std::path::Path, extra: &[&str]) -> Proxy {
        init();
        let disk_arg = disk.to_str().expect("utf-8 path").to_owned();
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--disk-cache",
            &disk_arg,
            "--tag-freshness",
            "0s",
        ];
        args.extend_from_slice(extra);
        let args = larder_proxy::ProxyArgs::from_args(&args).expect("proxy args");
        let running = larder_proxy::start(args).await.expect("proxy starts");
        Proxy {
            addr: running.addrs[0],
            metrics_addr: running.metrics_addr,
            running: Some(running),
            _disk: None,
        }
    }

    fn state(&self) -> &larder_proxy::state::ProxyState {
        &self.running.as_ref().expect("running").state
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `127.0.0.1:PROXY/<origin encoded>/<repo>`.
    fn image(&self, origin: &str, repo: &str) -> String {
        format!("{}/{}/{repo}", self.addr, origin.replace(':', "_"))
    }

    async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics body")
    }

    /// Sum of the samples of `name` whose labels contain every `label="value"` in `labels`.
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|want| l.contains(want)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits (bounded) until a blob is committed to the disk tier: clients get their last byte
    /// once the digest is verified, and the commit (an fsync and a rename) follows.
    async fn wait_on_disk(&self, digest: &str) {
        let digest = digest.parse().expect("digest");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.state().disk.contains_blob(&digest) {
            assert!(
                Instant::now() < deadline,
                "{digest} never reached the disk tier"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown(Duration::from_secs(5)).await;
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn start_registry(options: RegistryOptions) -> Registry {
    blocking(move || Registry::start(options).expect("registry starts")).await
}

async fn push(registry: &Arc<Registry>, image: &BuiltImage, repo: &str, tag: &str) -> String {
    let (registry, image, repo, tag) = (
        Arc::clone(registry),
        image.clone(),
        repo.to_owned(),
        tag.to_owned(),
    );
    blocking(move || {
        registry
            .push_image(&image, &repo, &tag)
            .expect("push")
            .digest
    })
    .await
}

async fn skopeo_pull(reference: String, all: bool) -> Result<tempfile::TempDir, String> {
    let dest = tempfile::tempdir().expect("dest");
    let options = SkopeoPullOptions {
        all,
        timeout: Some(Duration::from_secs(120)),
        ..SkopeoPullOptions::default()
    };
    match pull_with_skopeo_async(reference, dest.path().join("out"), options).await {
        Ok(_) => Ok(dest),
        Err(e) => Err(e.to_string()),
    }
}

fn layer_digests(image: &BuiltImage) -> Vec<String> {
    image
        .manifests
        .iter()
        .flat_map(|m| m.layers.iter().map(|l| l.blob.digest.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_pull_then_warm_pull_with_the_origin_gone() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let image = ImageBuilder::new()
        .random_layer(1 << 20)
        .random_layer(300 << 10)
        .build()
        .expect("image");
    let digest = push(&origin, &image, REPO, "v1").await;
    let host = origin.host_port();
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;

    // Cold: everything comes from the origin, each blob fetched once.
    let dest = skopeo_pull(format!("{}:v1", proxy.image(&host, REPO)), false)
        .await
        .expect("cold pull");
    for layer in layer_digests(&image) {
        let hex = layer.trim_start_matches("sha256:");
        let bytes = std::fs::read(dest.path().join("out").join(hex)).expect("layer pulled");
        assert_eq!(sha256_digest(&bytes), layer);
        let path = format!("/v2/{REPO}/blobs/{layer}");
        assert_eq!(origin.count_requests("GET", &path), 1, "{path}");
    }
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["source=\"origin\"", "kind=\"blob\""]
            )
            .await
            >= 2.0
    );
    let registry_label = format!("registry=\"{host}\"");
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &[&registry_label, "kind=\"blob\""]
            )
            .await
            >= 2.0,
        "requests are labelled with their registry"
    );

    // Warm, origin gone: the tag is served from its last known digest, blobs from disk.
    let origin = Arc::try_unwrap(origin).unwrap_or_else(|_| panic!("origin still shared"));
    let mut origin = origin;
    blocking(move || {
        origin.stop().expect("stop origin");
        origin
    })
    .await;
    skopeo_pull(format!("{}:v1", proxy.image(&host, REPO)), false)
        .await
        .expect("warm pull by tag while the origin is down");
    skopeo_pull(format!("{}@{digest}", proxy.image(&host, REPO)), false)
        .await
        .expect("warm pull by digest while the origin is down");
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["source=\"stale\"", "kind=\"manifest\""]
            )
            .await
            >= 1.0
    );
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["source=\"disk\"", "kind=\"blob\""]
            )
            .await
            >= 2.0
    );
    assert!(
        proxy
            .metric("larder_proxy_bytes_total", &["source=\"disk\""])
            .await
            >= (1 << 20) as f64
    );

    // A tag the proxy never saw cannot be served stale: a clean 503, not a hang.
    let started = Instant::now();
    let response = client()
        .get(proxy.url(&format!(
            "/v2/{}/{REPO}/manifests/never-seen",
            host.replace(':', "_")
        )))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(10));
    let body: serde_json::Value = response.json().await.expect("OCI error body");
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_registry_hit_spares_the_origin_its_blobs() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let cache = Arc::new(start_registry(RegistryOptions::default().named("cache")).await);
    let image = ImageBuilder::new()
        .random_layer(512 << 10)
        .build()
        .expect("image");
    let host = origin.host_port();
    push(&origin, &image, REPO, "v1").await;
    // The controllers put an image of <host>[_<port>]/<repo> under that same path.
    let cache_repo = format!("{}/{REPO}", host.replace(':', "_"));
    push(&cache, &image, &cache_repo, "v1").await;

    let proxy = Proxy::start(&[
        "--insecure-registry",
        &host,
        "--cache-registry",
        &cache.url(),
    ])
    .await;
    skopeo_pull(format!("{}:v1", proxy.image(&host, REPO)), false)
        .await
        .expect("pull via the cache registry");
    for layer in layer_digests(&image) {
        assert_eq!(
            origin.count_requests("GET", &format!("/v2/{REPO}/blobs/{layer}")),
            0
        );
        let cache_path = format!("/v2/{cache_repo}/blobs/{layer}");
        cache
            .wait_for_requests(Duration::from_secs(5), |r| {
                r.iter().any(|e| e.is("GET", &cache_path))
            })
            .expect("the cache registry served the blob");
    }
    // The tag was still revalidated at the origin, with a HEAD.
    assert!(origin.count_requests("HEAD", &format!("/v2/{REPO}/manifests/v1")) >= 1);
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["source=\"cache\"", "kind=\"blob\""]
            )
            .await
            >= 1.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_or_dead_cache_registry_costs_only_its_timeout() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let image = ImageBuilder::new()
        .random_layer(256 << 10)
        .build()
        .expect("image");
    let host = origin.host_port();
    push(&origin, &image, REPO, "v1").await;
    let layer = layer_digests(&image).remove(0);

    // Hanging: accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hang_addr = hang.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            held.push(socket);
        }
    });
    let proxy = Proxy::start(&[
        "--insecure-registry",
        &host,
        "--cache-registry",
        &format!("http://{hang_addr}"),
        "--cache-registry-timeout",
        "300ms",
    ])
    .await;
    let started = Instant::now();
    let response = client()
        .get(proxy.url(&format!(
            "/v2/{}/{REPO}/blobs/{layer}",
            host.replace(':', "_")
        )))
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.expect("body");
    assert_eq!(sha256_digest(&body), layer);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let manifest = client()
        .get(proxy.url(&format!(
            "/v2/{}/{REPO}/manifests/v1",
            host.replace(':', "_")
        )))
        .send()
        .await
        .expect("manifest");
    assert_eq!(manifest.status(), StatusCode::OK);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        proxy
            .metric(
                "larder_proxy_upstream_errors_total",
                &["upstream=\"cache\""]
            )
            .await
            >= 1.0
    );
    proxy.shutdown().await;
    holder.abort();

    // Dead: nothing listens there.
    let dead = larder_testkit::free_addr().expect("free port");
    let proxy = Proxy::start(&[
        "--insecure-registry",
        &host,
        "--cache-registry",
        &format!("http://{dead}"),
    ])
    .await;
    let started = Instant::now();
    skopeo_pull(format!("{}:v1", proxy.image(&host, REPO)), false)
        .await
        .expect("pull with the cache registry down");
    assert!(started.elapsed() < Duration::from_secs(20));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_platform_indexes_are_served_verbatim() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let index = IndexBuilder::new()
        .platforms(
            &[Platform::linux("amd64"), Platform::linux("arm64")],
            &[200 << 10, 100 << 10],
        )
        .build()
        .expect("index");
    let host = origin.host_port();
    let digest = push(&origin, &index, REPO, "multi").await;
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;
    let base = format!("/v2/{}/{REPO}", host.replace(':', "_"));

    let response = client()
        .get(proxy.url(&format!("{base}/manifests/multi")))
        .send()
        .await
        .expect("index");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["docker-content-digest"]
            .to_str()
            .unwrap(),
        digest
    );
    assert_eq!(
        response.headers()[header::CONTENT_TYPE].to_str().unwrap(),
        "application/vnd.oci.image.index.v1+json"
    );
    let bytes = response.bytes().await.unwrap();
    assert_eq!(
        &bytes[..],
        &index.index.as_ref().unwrap().bytes[..],
        "byte for byte"
    );
    for child in &index.manifests {
        let response = client()
            .get(proxy.url(&format!("{base}/manifests/{}", child.manifest.digest)))
            .send()
            .await
            .expect("child");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            &response.bytes().await.unwrap()[..],
            &child.manifest.bytes[..]
        );
    }
    // A real client takes every platform through the proxy.
    skopeo_pull(format!("{}:multi", proxy.image(&host, REPO)), true)
        .await
        .expect("skopeo --all through the proxy");
    for layer in layer_digests(&index) {
        proxy.wait_on_disk(&layer).await;
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_moved_upstream_is_followed_and_an_unknown_tag_is_404() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let host = origin.host_port();
    let first = ImageBuilder::new().random_layer(1000).build().unwrap();
    let second = ImageBuilder::new().random_layer(2000).build().unwrap();
    let d1 = push(&origin, &first, REPO, "moving").await;
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;
    let url = proxy.url(&format!(
        "/v2/{}/{REPO}/manifests/moving",
        host.replace(':', "_")
    ));
    let got = client().get(&url).send().await.unwrap();
    assert_eq!(got.headers()["docker-content-digest"].to_str().unwrap(), d1);
    let d2 = push(&origin, &second, REPO, "moving").await;
    assert_ne!(d1, d2);
    let got = client().get(&url).send().await.unwrap();
    assert_eq!(got.headers()["docker-content-digest"].to_str().unwrap(), d2);
    assert_eq!(sha256_digest(&got.bytes().await.unwrap()), d2);

    let missing = client()
        .get(proxy.url(&format!(
            "/v2/{}/{REPO}/manifests/nope",
            host.replace(':', "_")
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn thirty_two_clients_on_one_cold_blob_cause_one_origin_fetch() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let host = origin.host_port();
    let image = ImageBuilder::new().random_layer(16 << 20).build().unwrap();
    push(&origin, &image, REPO, "big").await;
    let layer = layer_digests(&image).remove(0);
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;
    let url = proxy.url(&format!(
        "/v2/{}/{REPO}/blobs/{layer}",
        host.replace(':', "_")
    ));
    let client = client();
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let mut pulls = Vec::new();
    for _ in 0..32 {
        let (client, url, barrier) = (client.clone(), url.clone(), Arc::clone(&barrier));
        pulls.push(tokio::spawn(async move {
            barrier.wait().await;
            let response = client.get(&url).send().await.expect("answer");
            assert_eq!(response.status(), StatusCode::OK);
            sha256_digest(&response.bytes().await.expect("body"))
        }));
    }
    for pull in pulls {
        assert_eq!(pull.await.unwrap(), layer);
    }
    let path = format!("/v2/{REPO}/blobs/{layer}");
    origin
        .wait_for_requests(Duration::from_secs(5), |r| {
            r.iter().any(|e| e.is("GET", &path))
        })
        .unwrap();
    assert_eq!(
        origin.count_requests("GET", &path),
        1,
        "one origin fetch for 32 clients"
    );
    let coalesced = proxy.metric("larder_proxy_coalesced_total", &[]).await;
    let from_disk = proxy
        .metric(
            "larder_proxy_requests_total",
            &["kind=\"blob\"", "source=\"disk\""],
        )
        .await;
    assert_eq!(
        coalesced + from_disk,
        31.0,
        "every other client joined the fetch or read the disk"
    );
    proxy.shutdown().await;
}

/// A fake origin for misbehaviour: serves one blob under `/v2/bad/app/blobs/<digest>` with
/// the given behaviour, and counts requests.
struct FakeOrigin {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
enum Behaviour {
    /// Sends these bytes (which do not match the digest asked for).
    WrongBytes(bytes::Bytes),
    /// Sends these bytes slowly: `chunk` bytes every `every`.
    Slow {
        body: bytes::Bytes,
        chunk: usize,
        every: Duration,
    },
    /// Redirects every request to this URL.
    Redirect(String),
    /// Requires a Bearer token from `/token` (counted separately).
    Token {
        body: bytes::Bytes,
        token_hits: Arc<AtomicUsize>,
    },
}

impl FakeOrigin {
    async fn start(behaviour: Behaviour) -> FakeOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        let app = Router::new().fallback(move |headers: HeaderMap, uri: axum::http::Uri| {
            let behaviour = behaviour.clone();
            let counter = Arc::clone(&counter);
            async move {
                if uri.path() == "/token" {
                    if let Behaviour::Token { token_hits, .. } = &behaviour {
                        token_hits.fetch_add(1, Ordering::SeqCst);
                    }
                    return (StatusCode::OK, r#"{"token":"sesame","expires_in":300}"#).into_response();
                }
                counter.fetch_add(1, Ordering::SeqCst);
                match behaviour {
                    Behaviour::WrongBytes(body) => (StatusCode::OK, body).into_response(),
                    Behaviour::Redirect(to) => Response::builder()
                        .status(StatusCode::TEMPORARY_REDIRECT)
                        .header(header::LOCATION, to)
                        .body(Body::empty())
                        .unwrap(),
                    Behaviour::Slow { body, chunk, every } => {
                        let pieces: Vec<bytes::Bytes> =
                            body.chunks(chunk).map(bytes::Bytes::copy_from_slice).collect();
                        let len = body.len();
                        let stream = futures::stream::iter(pieces).then(move |piece| async move {
                            tokio::time::sleep(every).await;
                            Ok::<_, std::io::Error>(piece)
                        });
                        Response::builder()
                            .header(header::CONTENT_LENGTH, len)
                            .body(Body::from_stream(stream))
                            .unwrap()
                    }
                    Behaviour::Token { body, .. } => {
                        let authorized = headers
                            .get(header::AUTHORIZATION)
                            .is_some_and(|v| v == "Bearer sesame");
                        if authorized {
                            (StatusCode::OK, body).into_response()
                        } else {
                            let realm = format!("http://{addr}/token");
                            Response::builder()
                                .status(StatusCode::UNAUTHORIZED)
                                .header(
                                    header::WWW_AUTHENTICATE,
                                    format!(r#"Bearer realm="{realm}",service="fake",scope="repository:bad/app:pull""#),
                                )
                                .body(Body::from(r#"{"errors":[{"code":"UNAUTHORIZED"}]}"#))
                                .unwrap()
                        }
                    }
                }
            }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeOrigin { addr, hits, task }
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The proxy URL of a blob of this origin's `bad/app` repository.
    fn blob_url(&self, proxy: &Proxy, digest: &str) -> String {
        proxy.url(&format!(
            "/v2/{}/bad/app/blobs/{digest}",
            self.host().replace(':', "_")
        ))
    }
}

impl Drop for FakeOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

use futures::StreamExt as _;

fn random_bytes(n: usize) -> bytes::Bytes {
    let mut v = vec![0u8; n];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8 ^ (i as u8);
    }
    bytes::Bytes::from(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bytes_that_do_not_match_their_digest_fail_the_stream_and_are_never_cached() {
    let real = random_bytes(300 << 10);
    let digest = sha256_digest(&real);
    let mut wrong = real.to_vec();
    wrong[12345] ^= 0xff;
    let fake = FakeOrigin::start(Behaviour::WrongBytes(bytes::Bytes::from(wrong))).await;
    let proxy = Proxy::start(&["--insecure-registry", &fake.host()]).await;
    let url = fake.blob_url(&proxy, &digest);
    for attempt in 0..2 {
        let response = client().get(&url).send().await.expect("headers");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.bytes().await;
        assert!(
            body.is_err(),
            "attempt {attempt}: the stream must break, not complete with wrong bytes"
        );
    }
    assert_eq!(
        fake.hits.load(Ordering::SeqCst),
        2,
        "nothing cached: each attempt asked again"
    );
    assert!(!proxy.state().disk.contains_blob(&digest.parse().unwrap()));
    assert!(
        proxy
            .metric(
                "larder_proxy_upstream_errors_total",
                &["reason=\"digest_mismatch\""]
            )
            .await
            >= 2.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_leaving_mid_stream_does_not_cancel_the_download() {
    let body = random_bytes(1 << 20);
    let digest = sha256_digest(&body);
    let fake = FakeOrigin::start(Behaviour::Slow {
        body: body.clone(),
        chunk: 64 << 10,
        every: Duration::from_millis(25),
    })
    .await;
    let proxy = Proxy::start(&["--insecure-registry", &fake.host()]).await;
    let url = fake.blob_url(&proxy, &digest);
    {
        let response = client().get(&url).send().await.unwrap();
        let mut stream = response.bytes_stream();
        let first = stream.next().await.expect("some bytes").expect("ok chunk");
        assert!(!first.is_empty());
        // Dropped here: the client hangs up early.
    }
    // The download finishes without its client.
    proxy.wait_on_disk(&digest).await;
    let again = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(sha256_digest(&again), digest);
    assert_eq!(fake.hits.load(Ordering::SeqCst), 1);

    // Range requests, now from disk.
    let part = client()
        .get(&url)
        .header(header::RANGE, "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.headers()[header::CONTENT_RANGE].to_str().unwrap(),
        format!("bytes 1000-1999/{}", body.len())
    );
    assert_eq!(&part.bytes().await.unwrap()[..], &body[1000..2000]);
    let suffix = client()
        .get(&url)
        .header(header::RANGE, "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(&suffix.bytes().await.unwrap()[..], &body[body.len() - 10..]);
    let past = client()
        .get(&url)
        .header(header::RANGE, format!("bytes={}-", body.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn range_requests_on_a_blob_still_downloading() {
    let body = random_bytes(512 << 10);
    let digest = sha256_digest(&body);
    let fake = FakeOrigin::start(Behaviour::Slow {
        body: body.clone(),
        chunk: 32 << 10,
        every: Duration::from_millis(10),
    })
    .await;
    let proxy = Proxy::start(&["--insecure-registry", &fake.host()]).await;
    let url = fake.blob_url(&proxy, &digest);
    let part = client()
        .get(&url)
        .header(header::RANGE, "bytes=100000-100099")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(&part.bytes().await.unwrap()[..], &body[100_000..100_100]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn anonymous_bearer_tokens_are_fetched_once_and_reused() {
    let body = random_bytes(10 << 10);
    let digest = sha256_digest(&body);
    let token_hits = Arc::new(AtomicUsize::new(0));
    let fake = FakeOrigin::start(Behaviour::Token {
        body: body.clone(),
        token_hits: Arc::clone(&token_hits),
    })
    .await;
    let proxy = Proxy::start(&["--insecure-registry", &fake.host()]).await;
    let url = fake.blob_url(&proxy, &digest);
    let got = client().get(&url).send().await.unwrap();
    assert_eq!(got.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&got.bytes().await.unwrap()), digest);
    // A HEAD for another blob on the same repository reuses the cached token.
    let other = format!("sha256:{}", "a".repeat(64));
    let head = client()
        .head(proxy.url(&format!(
            "/v2/{}/bad/app/blobs/{other}",
            fake.host().replace(':', "_")
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        token_hits.load(Ordering::SeqCst),
        1,
        "one token for both requests"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_disk_tier_stays_under_its_limit() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let host = origin.host_port();
    let image = ImageBuilder::new()
        .random_layer(1 << 20)
        .random_layer(1 << 20)
        .random_layer(1 << 20)
        .random_layer(1 << 20)
        .build()
        .unwrap();
    push(&origin, &image, REPO, "v1").await;
    let limit = 3u64 << 20;
    let proxy = Proxy::start(&[
        "--insecure-registry",
        &host,
        "--disk-cache-max-bytes",
        "3MiB",
    ])
    .await;
    let layers = layer_digests(&image);
    for layer in &layers {
        let url = proxy.url(&format!(
            "/v2/{}/{REPO}/blobs/{layer}",
            host.replace(':', "_")
        ));
        let body = client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&sha256_digest(&body), layer);
        proxy.wait_on_disk(layer).await;
        assert!(
            proxy.state().disk.used_bytes() <= limit,
            "used {}",
            proxy.state().disk.used_bytes()
        );
    }
    assert!(
        !proxy
            .state()
            .disk
            .contains_blob(&layers[0].parse().unwrap()),
        "the oldest blob was evicted"
    );
    assert!(
        proxy
            .state()
            .disk
            .contains_blob(&layers[3].parse().unwrap()),
        "the newest blob was kept"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_clean_oci_errors() {
    let proxy = Proxy::start(&[]).await;
    // The version check asks for (optional) credentials, as registries with auth do.
    let base = client().get(proxy.url("/v2/")).send().await.unwrap();
    assert_eq!(base.status(), StatusCode::UNAUTHORIZED);
    assert!(base.headers().contains_key(header::WWW_AUTHENTICATE));
    assert_eq!(
        base.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    let with_creds = client()
        .get(proxy.url("/v2/"))
        .basic_auth("someone", Some("anything"))
        .send()
        .await
        .unwrap();
    assert_eq!(with_creds.status(), StatusCode::OK);
    let cases = [
        ("GET", "/v2/_catalog", 404, "UNSUPPORTED"),
        (
            "GET",
            "/v2/docker.io/library/x/tags/other",
            404,
            "UNSUPPORTED",
        ),
        (
            "GET",
            "/v2/docker.io/library/x/tags/list?n=many",
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        (
            "GET",
            "/v2/docker.io/library/x/referrers/latest",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/docker.io/library/x/blobs/sha256:123",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/docker.io/library/x/blobs/latest",
            400,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/docker.io/Library/x/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/docker.io/library/x/manifests/-tag",
            400,
            "TAG_INVALID",
        ),
        (
            "GET",
            "/v2/host_70000/x/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "PUT",
            "/v2/docker.io/library/x/manifests/latest",
            405,
            "UNSUPPORTED",
        ),
        (
            "POST",
            "/v2/docker.io/library/x/blobs/uploads/",
            405,
            "UNSUPPORTED",
        ),
        (
            "DELETE",
            "/v2/docker.io/library/x/manifests/latest",
            405,
            "UNSUPPORTED",
        ),
        ("GET", "/healthz", 404, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let response = client()
            .request(method.parse().unwrap(), proxy.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = response.json().await.expect("JSON error body");
        assert_eq!(body["errors"][0]["code"], code, "{method} {path}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_pulls_through_the_rewrite_and_the_mirror_form() {
    let containerd = skip_on_skipped!(blocking(Containerd::start).await);
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let host = origin.host_port();
    let image = ImageBuilder::new().random_layer(400 << 10).build().unwrap();
    push(&origin, &image, REPO, "v1").await;
    // Different layers, so containerd has to fetch them again through the mirror.
    let mirrored = ImageBuilder::new().random_layer(300 << 10).build().unwrap();
    push(&origin, &mirrored, "team/mirrored", "v1").await;
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;
    let containerd = Arc::new(containerd);

    // The rewritten reference, as the webhook writes it.
    let reference = format!("{}:v1", proxy.image(&host, REPO));
    let c = Arc::clone(&containerd);
    let pulled = blocking(move || c.pull(&reference, &CtrPullOptions::default())).await;
    pulled.expect("ctr pulls the rewritten image");

    // The mirror form: containerd asks the proxy first through hosts.toml, with ?ns=<origin>.
    let hosts = tempfile::tempdir().unwrap();
    write_hosts_toml(
        hosts.path(),
        &host,
        &origin.url(),
        &[&format!("http://{}", proxy.addr)],
    )
    .unwrap();
    let before = proxy
        .metric("larder_proxy_requests_total", &["kind=\"blob\""])
        .await;
    let options = CtrPullOptions {
        hosts_dir: Some(hosts.path().to_path_buf()),
        ..CtrPullOptions::default()
    };
    let reference = format!("{host}/team/mirrored:v1");
    let c = Arc::clone(&containerd);
    blocking(move || c.pull(&reference, &options))
        .await
        .expect("ctr pulls via the mirror");
    let after = proxy
        .metric("larder_proxy_requests_total", &["kind=\"blob\""])
        .await;
    assert!(after > before, "the mirror form went through the proxy");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_lets_an_in_flight_pull_finish_and_then_refuses_new_ones() {
    let body = random_bytes(1 << 20);
    let digest = sha256_digest(&body);
    let fake = FakeOrigin::start(Behaviour::Slow {
        body: body.clone(),
        chunk: 64 << 10,
        every: Duration::from_millis(30),
    })
    .await;
    let proxy = Proxy::start(&["--insecure-registry", &fake.host()]).await;
    let addr = proxy.addr;
    let url = fake.blob_url(&proxy, &digest);
    let response = client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // SIGTERM arrives while the pull is in flight.
    let stopping = tokio::spawn(proxy.shutdown());
    let received = response
        .bytes()
        .await
        .expect("the in-flight pull completes");
    assert_eq!(sha256_digest(&received), digest);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown finishes once the pull is done")
        .unwrap();
    let refused = client().get(format!("http://{addr}/v2/")).send().await;
    assert!(refused.is_err(), "no new connections after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_never_share_one_disk_directory() {
    init();
    let disk = tempfile::tempdir().unwrap();
    let dir = disk.path().to_str().unwrap().to_owned();
    let args = |_: ()| {
        larder_proxy::ProxyArgs::from_args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--disk-cache",
            &dir,
        ])
        .unwrap()
    };
    let first = larder_proxy::start(args(())).await.expect("first proxy");
    let err = larder_proxy::start(args(()))
        .await
        .expect_err("a second proxy on the same disk directory must refuse to start");
    assert!(
        err.to_string().contains("two proxies must never share"),
        "{err}"
    );
    first.shutdown(Duration::from_secs(1)).await;
    // Once the first is gone the directory is free again.
    let again = larder_proxy::start(args(()))
        .await
        .expect("restart after the first stopped");
    again.shutdown(Duration::from_secs(1)).await;
}

/// A listener that counts the connections it accepts: proof that nothing was attempted.
async fn counting_listener() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (addr, accepted, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_are_refused_without_a_connection() {
    let (internal, accepted, task) = counting_listener().await;
    let proxy = Proxy::start(&[]).await;
    let digest = format!("sha256:{}", "b".repeat(64));
    for target in [
        internal.to_string().replace(':', "_"),
        "169.254.169.254".to_owned(),
        "localhost_5000".to_owned(),
        "10.0.0.1".to_owned(),
        "registry.kube-system.svc".to_owned(),
    ] {
        for path in [
            format!("/v2/{target}/app/manifests/v1"),
            format!("/v2/{target}/app/blobs/{digest}"),
        ] {
            let started = Instant::now();
            let response = client().get(proxy.url(&path)).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["errors"][0]["code"], "DENIED", "{path}");
            assert!(
                body["errors"][0]["message"]
                    .as_str()
                    .unwrap()
                    .contains("--allow-registry"),
                "the error says how to allow it: {body}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{path}: no waiting on a connection"
            );
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "no connection was attempted"
    );
    // Allowed explicitly, the same address is reached.
    let allowed = Proxy::start(&["--allow-registry", &internal.to_string()]).await;
    let _ = client()
        .get(allowed.url(&format!(
            "/v2/{}/app/manifests/v1",
            internal.to_string().replace(':', "_")
        )))
        .send()
        .await;
    assert!(
        accepted.load(Ordering::SeqCst) >= 1,
        "--allow-registry lets it through"
    );
    task.abort();
    proxy.shutdown().await;
    allowed.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_refused_address_is_not_followed() {
    let (internal, accepted, task) = counting_listener().await;
    let fake = FakeOrigin::start(Behaviour::Redirect(format!("http://{internal}/stolen"))).await;
    let proxy = Proxy::start(&["--insecure-registry", &fake.host()]).await;
    let digest = format!("sha256:{}", "c".repeat(64));
    let response = client()
        .get(fake.blob_url(&proxy, &digest))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert!(
        fake.hits.load(Ordering::SeqCst) >= 1,
        "the origin was asked"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the redirect target was never contacted"
    );
    task.abort();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_repositories_are_served_only_to_clients_the_origin_accepts() {
    let origin = Arc::new(start_registry(RegistryOptions::basic_auth("alice", "wonderland")).await);
    let host = origin.host_port();
    let image = ImageBuilder::new().random_layer(200 << 10).build().unwrap();
    let digest = push(&origin, &image, "team/secret", "v1").await;
    let layer = layer_digests(&image).remove(0);
    let disk = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_on(disk.path(), &["--insecure-registry", &host]).await;
    let base = format!("/v2/{}/team/secret", host.replace(':', "_"));
    let get = |proxy: &Proxy, path: String, creds: Option<(&str, &str)>| {
        let request = client().get(proxy.url(&path));
        let request = match creds {
            Some((u, p)) => request.basic_auth(u, Some(p)),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };

    // Without credentials: a challenge, so containerd and skopeo retry with theirs.
    let anonymous = get(&proxy, format!("{base}/manifests/v1"), None).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(
        anonymous.headers()[header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );

    // A real client with the right credentials pulls, cold, through the proxy.
    let dest = tempfile::tempdir().unwrap();
    let options = SkopeoPullOptions {
        creds: Some(Credentials::new("alice", "wonderland")),
        timeout: Some(Duration::from_secs(60)),
        ..SkopeoPullOptions::default()
    };
    pull_with_skopeo_async(
        format!("{}:v1", proxy.image(&host, "team/secret")),
        dest.path().join("out"),
        options,
    )
    .await
    .expect("skopeo pulls a private image with credentials");
    proxy.wait_on_disk(&layer).await;

    // Now cached on disk, and still not served without credentials or with wrong ones.
    for (what, creds) in [
        ("anonymous", None),
        ("wrong password", Some(("alice", "guess"))),
        ("unknown user", Some(("mallory", "x"))),
    ] {
        for path in [
            format!("{base}/manifests/{digest}"),
            format!("{base}/blobs/{layer}"),
            format!("{base}/manifests/v1"),
        ] {
            let response = get(&proxy, path.clone(), creds).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{what}: {path}"
            );
        }
    }
    // The right credentials get the cached copy.
    let blob_requests = origin.count_requests("GET", &format!("/v2/team/secret/blobs/{layer}"));
    let served = get(
        &proxy,
        format!("{base}/blobs/{layer}"),
        Some(("alice", "wonderland")),
    )
    .await;
    assert_eq!(served.status(), StatusCode::OK);
    assert_eq!(sha256_digest(&served.bytes().await.unwrap()), layer);
    assert_eq!(
        origin.count_requests("GET", &format!("/v2/team/secret/blobs/{layer}")),
        blob_requests,
        "served from disk, not fetched again"
    );
    proxy.shutdown().await;

    // After a restart the repository is still known to be private.
    let restarted = Proxy::start_on(disk.path(), &["--insecure-registry", &host]).await;
    let anonymous = get(&restarted, format!("{base}/blobs/{layer}"), None).await;
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let served = get(
        &restarted,
        format!("{base}/blobs/{layer}"),
        Some(("alice", "wonderland")),
    )
    .await;
    assert_eq!(served.status(), StatusCode::OK);
    restarted.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_credentials_reach_the_origin_but_grant_clients_nothing() {
    let origin = Arc::new(start_registry(RegistryOptions::basic_auth("ops", "s3cret")).await);
    let host = origin.host_port();
    let image = ImageBuilder::new().random_layer(50 << 10).build().unwrap();
    push(&origin, &image, "team/tool", "v1").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = |u: &str, p: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
    };
    std::fs::write(
        &config,
        format!(
            r#"{{"auths": {{"{host}": {{"auth": "{}"}}}}}}"#,
            auth("ops", "s3cret")
        ),
    )
    .unwrap();
    let proxy = Proxy::start(&[
        "--insecure-registry",
        &host,
        "--registry-credentials",
        config.to_str().unwrap(),
    ])
    .await;
    let url = proxy.url(&format!(
        "/v2/{}/team/tool/manifests/v1",
        host.replace(':', "_")
    ));
    let anonymous = client().get(&url).send().await.unwrap();
    assert_eq!(
        anonymous.status(),
        StatusCode::UNAUTHORIZED,
        "the operator's credentials are not lent to clients"
    );
    let with_own = client()
        .get(&url)
        .basic_auth("ops", Some("s3cret"))
        .send()
        .await
        .unwrap();
    assert_eq!(with_own.status(), StatusCode::OK);
    // A broken credentials file stops the proxy from starting, with a reason.
    std::fs::write(&config, b"{not json").unwrap();
    let args = larder_proxy::ProxyArgs::from_args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        dir.path().join("disk").to_str().unwrap(),
        "--registry-credentials",
        config.to_str().unwrap(),
    ])
    .unwrap();
    let err = larder_proxy::start(args)
        .await
        .expect_err("bad credentials file");
    assert!(
        err.to_string().contains("not a docker config file"),
        "{err}"
    );
    proxy.shutdown().await;
}

// ---- The rest of the pull side: tags/list, referrers, artifacts of any media type ----

/// Runs a client command (skopeo, helm) bounded in time; its output on success, else the
/// command's stderr as the error.
async fn run_tool(mut cmd: std::process::Command) -> Result<String, String> {
    blocking(move || {
        cmd.current_dir("/");
        let out = larder_testkit::process::run(cmd, Duration::from_secs(120))
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await
}

fn skopeo_cmd(args: &[&str]) -> std::process::Command {
    let skopeo = larder_testkit::find_tool("skopeo").expect("skopeo (apt-get install skopeo)");
    let mut cmd = std::process::Command::new(skopeo);
    cmd.arg("--insecure-policy").args(args);
    cmd
}

/// Pushes `blobs` and then `manifest` (any media type) to `repo:reference` with the
/// distribution push API, as any artifact tool (oras, cosign) does.
async fn push_raw(
    origin: &Registry,
    repo: &str,
    reference: &str,
    manifest: &larder_testkit::Blob,
    blobs: &[&larder_testkit::Blob],
) {
    let base = origin.url();
    let http = client();
    for blob in blobs {
        let started = http
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(started.status(), StatusCode::ACCEPTED, "upload starts");
        let location = started.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_owned();
        let location = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = http
            .put(format!("{location}{sep}digest={}", blob.digest))
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .body(blob.bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::CREATED, "blob {}", blob.digest);
    }
    let put = http
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header(header::CONTENT_TYPE, &manifest.media_type)
        .body(manifest.bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        put.status(),
        StatusCode::CREATED,
        "manifest {reference}: {}",
        put.text().await.unwrap_or_default()
    );
}

/// A cosign-style signature of `subject`: an OCI artifact manifest (empty config, one
/// signature layer, `subject` set) and its blobs.
fn signature_of(
    subject: &larder_testkit::Blob,
) -> (larder_testkit::Blob, Vec<larder_testkit::Blob>) {
    let config = larder_testkit::Blob::new("application/vnd.oci.empty.v1+json", b"{}".to_vec());
    let payload = larder_testkit::Blob::new(
        "application/vnd.dev.cosign.simplesigning.v1+json",
        serde_json::to_vec(
            &serde_json::json!({"critical": {"image": {"docker-manifest-digest": subject.digest}}}),
        )
        .unwrap(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": config.descriptor(),
        "layers": [payload.descriptor()],
        "subject": subject.descriptor(),
    });
    let manifest = larder_testkit::Blob::new(
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_vec(&manifest).unwrap(),
    );
    (manifest, vec![config, payload])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_list_pages_through_both_forms_and_serves_the_last_list_when_the_origin_is_down() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let host = origin.host_port();
    let enc = host.replace(':', "_");
    let image = ImageBuilder::new().random_layer(64 << 10).build().unwrap();
    for tag in ["v1", "v2", "v3"] {
        push(&origin, &image, REPO, tag).await;
    }
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;

    // Whole list, rewritten form: the client's own repository name.
    let all = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/tags/list")))
        .send()
        .await
        .unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    assert_eq!(all.headers()[header::CONTENT_TYPE], "application/json");
    let body: serde_json::Value = all.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": format!("{enc}/{REPO}"), "tags": ["v1", "v2", "v3"]})
    );

    // n reaches the origin; distribution 2.8 does not paginate (3.x does), so the whole list
    // comes back: paging and Link are tested against a scripted origin below.
    let paged = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/tags/list?n=2")))
        .send()
        .await
        .unwrap();
    assert_eq!(paged.status(), StatusCode::OK);

    // The containerd mirror form answers with the repository as the client named it.
    let mirror = client()
        .get(proxy.url(&format!("/v2/{REPO}/tags/list?ns={host}")))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = mirror.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"name": REPO, "tags": ["v1", "v2", "v3"]})
    );

    // Real clients: skopeo list-tags, and skopeo inspect without --no-tags.
    let reference = format!("docker://{}", proxy.image(&host, REPO));
    let listed = run_tool(skopeo_cmd(&["list-tags", "--tls-verify=false", &reference]))
        .await
        .expect("skopeo list-tags through the proxy");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["Tags"], serde_json::json!(["v1", "v2", "v3"]));
    let inspected = run_tool(skopeo_cmd(&[
        "inspect",
        "--tls-verify=false",
        &format!("{reference}:v2"),
    ]))
    .await
    .expect("skopeo inspect (with tags) through the proxy");
    let inspected: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(inspected["RepoTags"], serde_json::json!(["v1", "v2", "v3"]));
    assert_eq!(inspected["Digest"], image.digest());
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["kind=\"tags\"", "source=\"origin\"", "code=\"200\""]
            )
            .await
            >= 5.0
    );

    // An unknown repository is the origin's 404, as an OCI error.
    let missing = client()
        .get(proxy.url(&format!("/v2/{enc}/no/such/tags/list")))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");

    // Origin down: the last list seen for the same request, marked stale; a request never
    // seen gets a clear 503.
    let origin = Arc::try_unwrap(origin).unwrap_or_else(|_| panic!("origin still shared"));
    let mut origin = origin;
    blocking(move || {
        origin.stop().expect("stop origin");
        origin
    })
    .await;
    let stale = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/tags/list")))
        .send()
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::OK);
    let body: serde_json::Value = stale.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["v1", "v2", "v3"]));
    run_tool(skopeo_cmd(&["list-tags", "--tls-verify=false", &reference]))
        .await
        .expect("skopeo list-tags from the last list seen");
    let never = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/tags/list?n=1&last=v1")))
        .send()
        .await
        .unwrap();
    assert_eq!(never.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = never.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["kind=\"tags\"", "source=\"stale\""]
            )
            .await
            >= 2.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn referrers_fall_back_to_signature_tags_on_an_origin_without_the_api() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let host = origin.host_port();
    let enc = host.replace(':', "_");
    let image = ImageBuilder::new().random_layer(64 << 10).build().unwrap();
    push(&origin, &image, REPO, "v1").await;
    let (sig, sig_blobs) = signature_of(image.top());
    let sig_tag = format!("{}.sig", image.digest().replace(':', "-"));
    push_raw(
        &origin,
        REPO,
        &sig_tag,
        &sig,
        &sig_blobs.iter().collect::<Vec<_>>(),
    )
    .await;
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;

    // Distribution 2.8 has no referrers API: its 404 reaches the client, as the spec wants,
    // so the client falls back to the tag schema.
    let referrers = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/referrers/{}", image.digest())))
        .send()
        .await
        .unwrap();
    assert_eq!(referrers.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = referrers.json().await.unwrap();
    assert!(body["errors"][0]["code"].is_string());

    // The fallback: the sha256-<hex>.sig tag is listed and served like any tag, verbatim.
    let tags: serde_json::Value = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/tags/list")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        tags["tags"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!(sig_tag))
    );
    let manifest = client()
        .get(proxy.url(&format!("/v2/{enc}/{REPO}/manifests/{sig_tag}")))
        .header(header::ACCEPT, "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(manifest.status(), StatusCode::OK);
    assert_eq!(
        manifest.headers()[header::CONTENT_TYPE],
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        manifest.headers()["docker-content-digest"],
        sig.digest.as_str()
    );
    assert_eq!(manifest.bytes().await.unwrap(), sig.bytes);
    for blob in &sig_blobs {
        let got = client()
            .get(proxy.url(&format!("/v2/{enc}/{REPO}/blobs/{}", blob.digest)))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), StatusCode::OK);
        assert_eq!(
            got.bytes().await.unwrap(),
            blob.bytes,
            "{}",
            blob.media_type
        );
    }
    proxy.wait_on_disk(&sig_blobs[1].digest).await;
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["kind=\"referrers\"", "code=\"404\""]
            )
            .await
            >= 1.0
    );
    proxy.shutdown().await;
}

/// An origin with the referrers API: answers `/v2/team/app/referrers/<digest>` with two
/// referrers, or (`filtering`) filters by `artifactType` itself and says so.
async fn referrers_origin(
    filtering: bool,
    hits: Arc<AtomicUsize>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(move |uri: axum::http::Uri| {
        let hits = Arc::clone(&hits);
        async move {
            hits.fetch_add(1, Ordering::SeqCst);
            if !uri.path().starts_with("/v2/team/app/referrers/sha256:") {
                return StatusCode::NOT_FOUND.into_response();
            }
            let all = [
                ("application/vnd.dev.cosign.artifact.sig.v1+json", "aa"),
                ("application/spdx+json", "bb"),
            ];
            let wanted = uri
                .query()
                .and_then(|q| q.strip_prefix("artifactType="))
                .map(|t| t.replace("%2F", "/").replace("%2B", "+"));
            let manifests: Vec<serde_json::Value> = all
                .iter()
                .filter(|(t, _)| !filtering || wanted.as_deref().is_none_or(|w| w == *t))
                .map(|(t, d)| {
                    serde_json::json!({
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": format!("sha256:{}", d.repeat(32)),
                        "size": 100,
                        "artifactType": t,
                    })
                })
                .collect();
            let body = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests,
            });
            let mut response = Response::builder().header(
                header::CONTENT_TYPE,
                "application/vnd.oci.image.index.v1+json",
            );
            if filtering && wanted.is_some() {
                response = response.header("OCI-Filters-Applied", "artifactType");
            }
            response.body(Body::from(body.to_string())).unwrap()
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn referrers_pass_through_filtered_and_stale_when_the_origin_is_down() {
    let subject = format!("sha256:{}", "cd".repeat(32));
    for filtering in [false, true] {
        let hits = Arc::new(AtomicUsize::new(0));
        let (addr, task) = referrers_origin(filtering, Arc::clone(&hits)).await;
        let host = addr.to_string();
        let proxy = Proxy::start(&["--insecure-registry", &host, "--allow-registry", &host]).await;
        let base = format!(
            "/v2/{}/team/app/referrers/{subject}",
            host.replace(':', "_")
        );
        let get = |path: String| async move {
            let r = client().get(path).send().await.unwrap();
            let status = r.status();
            let filtered = r.headers().get("oci-filters-applied").cloned();
            let ct = r.headers().get(header::CONTENT_TYPE).cloned();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, filtered, ct, body)
        };

        let (status, filtered, ct, body) = get(proxy.url(&base)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(filtered.is_none());
        assert_eq!(ct.unwrap(), "application/vnd.oci.image.index.v1+json");
        assert_eq!(body["manifests"].as_array().unwrap().len(), 2);

        let sbom = format!("{base}?artifactType=application/spdx%2Bjson");
        let (status, filtered, _, body) = get(proxy.url(&sbom)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(filtered.unwrap(), "artifactType", "filtering={filtering}");
        let m = body["manifests"].as_array().unwrap();
        assert_eq!(m.len(), 1, "filtering={filtering}: {body}");
        assert_eq!(m[0]["artifactType"], "application/spdx+json");
        // The mirror form reaches the same origin API.
        let (status, _, _, body) =
            get(proxy.url(&format!("/v2/team/app/referrers/{subject}?ns={host}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["manifests"].as_array().unwrap().len(), 2);

        // Origin gone: the last answer to the same request, counted as stale.
        task.abort();
        let _ = task.await;
        let (status, filtered, _, body) = get(proxy.url(&sbom)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(filtered.unwrap(), "artifactType");
        assert_eq!(body["manifests"].as_array().unwrap().len(), 1);
        let other = format!("{base}?artifactType=application/x-never-asked");
        let (status, _, _, body) = get(proxy.url(&other)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
        assert!(
            proxy
                .metric(
                    "larder_proxy_requests_total",
                    &["kind=\"referrers\"", "source=\"stale\"", "code=\"200\""]
                )
                .await
                >= 1.0
        );
        assert!(hits.load(Ordering::SeqCst) >= 3);
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn private_tag_lists_need_credentials_the_origin_accepts() {
    let origin = Arc::new(start_registry(RegistryOptions::basic_auth("alice", "wonderland")).await);
    let host = origin.host_port();
    let image = ImageBuilder::new().random_layer(32 << 10).build().unwrap();
    push(&origin, &image, "team/secret", "v1").await;
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;
    let tags = proxy.url(&format!(
        "/v2/{}/team/secret/tags/list",
        host.replace(':', "_")
    ));
    let anonymous = client().get(&tags).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key(header::WWW_AUTHENTICATE));
    let wrong = client()
        .get(&tags)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = client()
        .get(&tags)
        .basic_auth("alice", Some("wonderland"))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    let body: serde_json::Value = right.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["v1"]));

    // Origin down: the remembered list goes to no client without an accepted verdict.
    let origin = Arc::try_unwrap(origin).unwrap_or_else(|_| panic!("origin still shared"));
    let mut origin = origin;
    blocking(move || {
        origin.stop().expect("stop origin");
        origin
    })
    .await;
    let anonymous = client().get(&tags).send().await.unwrap();
    assert!(
        anonymous.status() == StatusCode::UNAUTHORIZED
            || anonymous.status() == StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        anonymous.status()
    );
    assert_ne!(anonymous.status(), StatusCode::OK);
    let wrong = client()
        .get(&tags)
        .basic_auth("alice", Some("wrong"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "refused before");
    let right = client()
        .get(&tags)
        .basic_auth("alice", Some("wonderland"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        right.status(),
        StatusCode::OK,
        "accepted before: stale list"
    );
    proxy.shutdown().await;
}

fn helm_bin() -> Option<std::path::PathBuf> {
    let local = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join(".tools/helm");
    if local.is_file() {
        return Some(local);
    }
    larder_testkit::find_tool("helm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_pulls_an_oci_chart_through_the_proxy() {
    let Some(helm) = helm_bin() else {
        eprintln!("SKIPPED: helm not found (bash scripts/install-test-deps.sh puts it in .tools/)");
        return;
    };
    let origin = start_registry(RegistryOptions::default()).await;
    let host = origin.host_port();
    let work = tempfile::tempdir().unwrap();
    let helm_cmd = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&helm);
        cmd.args(args)
            .env("HELM_CONFIG_HOME", work.path().join("config"))
            .env("HELM_CACHE_HOME", work.path().join("cache"))
            .env("HELM_DATA_HOME", work.path().join("data"))
            .env("HELM_REGISTRY_CONFIG", work.path().join("registry.json"));
        cmd
    };
    let dir = work.path().to_str().unwrap().to_owned();
    run_tool(helm_cmd(&["create", &format!("{dir}/demo")]))
        .await
        .expect("helm create");
    for version in ["0.1.0", "0.2.0"] {
        run_tool(helm_cmd(&[
            "package",
            &format!("{dir}/demo"),
            "--version",
            version,
            "--destination",
            &dir,
        ]))
        .await
        .expect("helm package");
        run_tool(helm_cmd(&[
            "push",
            &format!("{dir}/demo-{version}.tgz"),
            &format!("oci://{host}/charts"),
            "--plain-http",
        ]))
        .await
        .expect("helm push to the origin");
    }
    let proxy = Proxy::start(&["--insecure-registry", &host]).await;
    let chart = format!(
        "oci://{}/{}/charts/demo",
        proxy.addr,
        host.replace(':', "_")
    );

    // An exact version, then none: helm then lists the tags and picks the highest.
    for (version, want) in [(Some("0.1.0"), "0.1.0"), (None, "0.2.0")] {
        let out = work.path().join(format!("out-{want}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut args = vec![
            "pull".to_owned(),
            chart.clone(),
            "--plain-http".to_owned(),
            "--destination".to_owned(),
            out.to_str().unwrap().to_owned(),
        ];
        if let Some(v) = version {
            args.extend(["--version".to_owned(), v.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool(helm_cmd(&args))
            .await
            .unwrap_or_else(|e| panic!("helm pull {version:?} through the proxy: {e}"));
        let pulled = out.join(format!("demo-{want}.tgz"));
        assert_eq!(
            std::fs::read(&pulled).expect("chart pulled"),
            std::fs::read(work.path().join(format!("demo-{want}.tgz"))).unwrap(),
            "the chart arrives byte for byte"
        );
    }
    assert!(
        proxy
            .metric(
                "larder_proxy_requests_total",
                &["kind=\"tags\"", "code=\"200\""]
            )
            .await
            >= 1.0,
        "helm listed the tags through the proxy"
    );
    // The chart's layers (config application/vnd.cncf.helm.config.v1+json, the chart
    // tarball) are cached like image layers: the origin gone, the pinned version still pulls.
    let manifest: serde_json::Value = client()
        .get(proxy.url(&format!(
            "/v2/{}/charts/demo/manifests/0.1.0",
            host.replace(':', "_")
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.cncf.helm.config.v1+json"
    );
    for blob in std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().unwrap()) {
        proxy.wait_on_disk(blob["digest"].as_str().unwrap()).await;
    }
    drop(origin);
    let out = work.path().join("out-again");
    std::fs::create_dir_all(&out).unwrap();
    run_tool(helm_cmd(&[
        "pull",
        &chart,
        "--plain-http",
        "--version",
        "0.1.0",
        "--destination",
        out.to_str().unwrap(),
    ]))
    .await
    .expect("helm pull from the proxy's tiers with the origin gone");
    proxy.shutdown().await;
}

/// An origin that pages `tags/list` as distribution 3 does: `n` and `last`, and a `Link` to
/// the next page (absolute, to check only its query is kept).
async fn paging_origin() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().fallback(move |uri: axum::http::Uri| async move {
        if uri.path() != "/v2/team/app/tags/list" {
            return StatusCode::NOT_FOUND.into_response();
        }
        let all = ["a", "b", "c", "d", "e"];
        let mut n = all.len();
        let mut last = String::new();
        for pair in uri.query().unwrap_or_default().split('&') {
            match pair.split_once('=') {
                Some(("n", v)) => n = v.parse().unwrap(),
                Some(("last", v)) => last = v.to_owned(),
                _ => {}
            }
        }
        let page: Vec<&str> = all
            .iter()
            .copied()
            .filter(|t| *t > last.as_str())
            .take(n)
            .collect();
        let body = serde_json::json!({"name": "team/app", "tags": page});
        let mut response = Response::builder().header(header::CONTENT_TYPE, "application/json");
        if let Some(end) = page.last().filter(|end| **end != "e") {
            response = response.header(
                header::LINK,
                format!(r#"<http://{addr}/v2/team/app/tags/list?last={end}&n={n}>; rel="next""#),
            );
        }
        response.body(Body::from(body.to_string())).unwrap()
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tags_list_pages_follow_links_back_to_the_proxy_in_both_forms() {
    let (addr, task) = paging_origin().await;
    let host = addr.to_string();
    let enc = host.replace(':', "_");
    let proxy = Proxy::start(&["--insecure-registry", &host, "--allow-registry", &host]).await;
    for (first, name) in [
        (
            format!("/v2/{enc}/team/app/tags/list?n=2"),
            format!("{enc}/team/app"),
        ),
        (
            format!("/v2/team/app/tags/list?ns={host}&n=2"),
            "team/app".to_owned(),
        ),
    ] {
        let mut next = Some(first.clone());
        let mut seen = Vec::new();
        let mut pages = 0;
        while let Some(path) = next.take() {
            let response = client().get(proxy.url(&path)).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            if let Some(link) = response.headers().get(header::LINK) {
                let link = link.to_str().unwrap();
                assert!(link.ends_with(r#">; rel="next""#), "{link}");
                let target = link.trim_start_matches('<').split('>').next().unwrap();
                assert!(target.starts_with("/v2/"), "a path on the proxy: {link}");
                if first.contains("ns=") {
                    assert!(target.contains(&format!("ns={host}")), "{link}");
                } else {
                    assert!(
                        target.starts_with(&format!("/v2/{enc}/team/app/")),
                        "{link}"
                    );
                }
                next = Some(target.to_owned());
            }
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["name"], name.as_str());
            seen.extend(
                body["tags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_str().unwrap().to_owned()),
            );
            pages += 1;
        }
        assert_eq!(seen, ["a", "b", "c", "d", "e"], "{first}");
        assert_eq!(pages, 3, "{first}");
    }
    task.abort();
    proxy.shutdown().await;
}

// ---------------------------------------------------------------- ranged downloads (issue 16)

use larder_testkit::{RangeOrigin, RangeScript};

const MIB: u64 = 1 << 20;
/// Ranged blobs in these tests: 6 MiB with a 1 MiB threshold and 4 connections, so 1 MiB
/// chunks (`larder_proxy::ranged::chunk_size`'s floor): the first request `bytes=0-` and five
/// more, one per chunk.
const RANGED_BLOB: usize = 6 << 20;

async fn ranged_origin(blob: &bytes::Bytes, script: RangeScript) -> RangeOrigin {
    RangeOrigin::start(blob.clone(), script)
        .await
        .expect("range origin")
}

/// The flags of a proxy that fetches blobs of 1 MiB and more in 4 concurrent ranges, however
/// fast the first connection is (the fake origins on loopback are fast).
const RANGED_FLAGS: [&str; 6] = [
    "--upstream-ranged-threshold",
    "1MiB",
    "--upstream-ranged-connections",
    "4",
    "--upstream-ranged-fast-rate",
    "off",
];

/// A proxy that fetches blobs of 1 MiB and more from `origin` in 4 concurrent ranges.
async fn ranged_proxy(origin: &RangeOrigin, extra: &[&str]) -> Proxy {
    let host = origin.host();
    let mut args = vec!["--insecure-registry", &host];
    args.extend_from_slice(&RANGED_FLAGS);
    args.extend_from_slice(extra);
    Proxy::start(&args).await
}

/// A proxy whose first connection keeps a blob of `threshold` and more alone after the probe:
/// the origin on loopback is far faster than 1 MB/s, so it is read on as one stream.
async fn alone_proxy(origin: &RangeOrigin, threshold: &str) -> Proxy {
    let host = origin.host();
    Proxy::start(&[
        "--insecure-registry",
        &host,
        "--upstream-ranged-threshold",
        threshold,
        "--upstream-ranged-connections",
        "4",
        "--upstream-ranged-fast-rate",
        "1MB",
    ])
    .await
}

/// `larder_proxy_upstream_blob_downloads_total{mode}`.
async fn downloads(proxy: &Proxy, mode: &str) -> f64 {
    let label = format!("mode=\"{mode}\"");
    proxy
        .metric("larder_proxy_upstream_blob_downloads_total", &[&label])
        .await
}

/// `larder_proxy_upstream_range_requests_total{result}`.
async fn range_requests(proxy: &Proxy, result: &str) -> f64 {
    let label = format!("result=\"{result}\"");
    proxy
        .metric("larder_proxy_upstream_range_requests_total", &[&label])
        .await
}

/// Waits (5 s at most) until `proxy` has no download in flight.
async fn wait_no_download_in_flight(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.metric("larder_proxy_in_flight_fetches", &[]).await != 0.0 {
        assert!(Instant::now() < deadline, "the download never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A GET of the blob breaks within 10 s, the download ends and nothing is kept on disk.
async fn assert_get_breaks_and_nothing_is_cached(
    proxy: &Proxy,
    origin: &RangeOrigin,
    digest: &str,
) {
    let started = Instant::now();
    let response = client()
        .get(ranged_url(proxy, origin, digest))
        .send()
        .await
        .unwrap();
    assert!(response.bytes().await.is_err(), "the stream must break");
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_no_download_in_flight(proxy).await;
    assert!(!proxy.state().disk.contains_blob(&digest.parse().unwrap()));
}

fn ranged_url(proxy: &Proxy, origin: &RangeOrigin, digest: &str) -> String {
    proxy.url(&format!(
        "/v2/{}/bad/app/blobs/{digest}",
        origin.host().replace(':', "_")
    ))
}

/// The `Range` headers a 6 MiB blob's download asks for: `bytes=0-`, then one per later chunk.
fn chunk_requests(total: u64, chunk: u64) -> Vec<String> {
    let mut all = vec!["bytes=0-".to_owned()];
    let mut start = chunk;
    while start < total {
        let end = (start + chunk).min(total);
        all.push(format!("bytes={start}-{}", end - 1));
        start = end;
    }
    all
}

/// Asserts one set of requests for the blob: `bytes=0-` (the first answer, which the first
/// connection reads on for as many chunks as it takes before the others start), then every
/// later chunk exactly once, plus `extra` (remainders asked again).
fn assert_one_set(origin: &RangeOrigin, extra: &[String], what: &str) {
    let got = sorted_ranges(origin);
    let chunks = chunk_requests(RANGED_BLOB as u64, MIB);
    assert_eq!(
        got.first().map(String::as_str),
        Some("bytes=0-"),
        "{what}: {got:?}"
    );
    let from = (1..chunks.len())
        .find(|&k| got.contains(&chunks[k]))
        .unwrap_or(chunks.len());
    assert!(from >= 1, "{what}");
    let mut want: Vec<String> = std::iter::once(chunks[0].clone())
        .chain(chunks[from..].iter().cloned())
        .chain(extra.iter().cloned())
        .collect();
    want.sort_by_key(|r| {
        let start = r
            .trim_start_matches("bytes=")
            .split('-')
            .next()
            .unwrap_or("");
        (start.parse::<u64>().unwrap_or(u64::MAX), r.clone())
    });
    assert_eq!(got, want, "{what}: one request per chunk, none twice");
}

/// The origin's `Range` headers, sorted (connections race; the set is what matters).
fn sorted_ranges(origin: &RangeOrigin) -> Vec<String> {
    let mut ranges: Vec<String> = origin
        .ranges()
        .into_iter()
        .map(|r| r.unwrap_or_else(|| "(none)".into()))
        .collect();
    ranges.sort_by_key(|r| {
        let start = r
            .trim_start_matches("bytes=")
            .split('-')
            .next()
            .unwrap_or("");
        (start.parse::<u64>().unwrap_or(u64::MAX), r.clone())
    });
    ranges
}

async fn get_bytes(url: &str) -> Result<bytes::Bytes, String> {
    let response = client().get(url).send().await.map_err(|e| e.to_string())?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    response.bytes().await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_blob_is_fetched_in_ranges_once_and_verified() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    let origin = ranged_origin(&blob, RangeScript::default()).await;
    let proxy = ranged_proxy(&origin, &[]).await;
    let got = get_bytes(&ranged_url(&proxy, &origin, &digest))
        .await
        .unwrap();
    assert_eq!(sha256_digest(&got), digest);
    proxy.wait_on_disk(&digest).await;
    assert_eq!(origin.ranges()[0].as_deref(), Some("bytes=0-"), "first");
    assert_one_set(&origin, &[], "one client");
    assert!(origin.seen().iter().all(|s| s.status == 206));
    assert_eq!(downloads(&proxy, "ranged").await, 1.0);
    assert_eq!(downloads(&proxy, "single").await, 0.0);
    // One `ok` per part completed: 6 chunks, whichever answer brought them.
    assert_eq!(range_requests(&proxy, "ok").await, 6.0);
    // Served again from disk: the origin is not asked.
    let asked = origin.seen().len();
    let again = get_bytes(&ranged_url(&proxy, &origin, &digest))
        .await
        .unwrap();
    assert_eq!(sha256_digest(&again), digest);
    assert_eq!(origin.seen().len(), asked);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origins_ignoring_ranges_or_giving_no_length_are_read_in_one_stream() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    for (what, script) in [
        (
            "ignores Range (200)",
            RangeScript {
                ranges: false,
                ..RangeScript::default()
            },
        ),
        (
            "no length (206 bytes 0-N/*, chunked)",
            RangeScript {
                length: false,
                ..RangeScript::default()
            },
        ),
        (
            "ignores Range and gives no length",
            RangeScript {
                ranges: false,
                length: false,
                ..RangeScript::default()
            },
        ),
    ] {
        let origin = ranged_origin(&blob, script).await;
        let proxy = ranged_proxy(&origin, &[]).await;
        let got = get_bytes(&ranged_url(&proxy, &origin, &digest))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(sha256_digest(&got), digest, "{what}");
        proxy.wait_on_disk(&digest).await;
        assert_eq!(
            origin.ranges(),
            vec![Some("bytes=0-".to_owned())],
            "{what}: one request, one stream"
        );
        assert_eq!(downloads(&proxy, "single").await, 1.0, "{what}");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirects_are_followed_for_every_range_and_a_target_refusing_ranges_means_one_stream() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    for ranges in [false, true] {
        let target = ranged_origin(
            &blob,
            RangeScript {
                ranges,
                ..RangeScript::default()
            },
        )
        .await;
        let registry = ranged_origin(
            &blob,
            RangeScript {
                redirect: Some(format!("http://{}", target.host())),
                ..RangeScript::default()
            },
        )
        .await;
        let target_host = target.host();
        let proxy = ranged_proxy(&registry, &["--allow-registry", &target_host]).await;
        let got = get_bytes(&ranged_url(&proxy, &registry, &digest))
            .await
            .unwrap();
        assert_eq!(sha256_digest(&got), digest);
        proxy.wait_on_disk(&digest).await;
        if ranges {
            assert_one_set(&target, &[], "ranges reach the target");
            assert_eq!(
                sorted_ranges(&registry),
                sorted_ranges(&target),
                "every range went through the registry's redirect (allow rules re-checked)"
            );
        } else {
            assert_eq!(target.ranges(), vec![Some("bytes=0-".to_owned())]);
            assert_eq!(target.seen()[0].status, 200);
            assert_eq!(registry.seen().len(), 1, "one stream");
        }
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_or_stalled_range_is_resumed_where_it_stopped() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    let piece = 64 << 10;
    // Breaks 7 pieces into the fifth chunk; stalls 3 pieces into the sixth (longer than the
    // idle timeout): chunks the first answer does not reach before the others start.
    let break_at = 4 * MIB + 7 * piece;
    let stall_at = 5 * MIB + 3 * piece;
    for (what, script, at) in [
        (
            "break",
            RangeScript {
                break_at: Some(break_at),
                ..RangeScript::default()
            },
            break_at,
        ),
        (
            "stall",
            RangeScript {
                stall_at: Some((stall_at, Duration::from_secs(8))),
                ..RangeScript::default()
            },
            stall_at,
        ),
    ] {
        let origin = ranged_origin(&blob, script).await;
        let proxy = ranged_proxy(&origin, &["--upstream-idle-timeout", "1s"]).await;
        let started = Instant::now();
        let got = get_bytes(&ranged_url(&proxy, &origin, &digest))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(sha256_digest(&got), digest, "{what}");
        assert!(started.elapsed() < Duration::from_secs(6), "{what}");
        proxy.wait_on_disk(&digest).await;
        let chunk_start = at - at % MIB;
        // Only the remainder of the broken chunk is asked again.
        let remainder = format!("bytes={at}-{}", chunk_start + MIB - 1);
        assert_one_set(&origin, &[remainder], what);
        assert_eq!(range_requests(&proxy, "retried").await, 1.0, "{what}");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lying_ranged_origin_is_never_cached_nor_served_as_valid() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    for (what, alone) in [("split", false), ("kept alone after the probe", true)] {
        let origin = ranged_origin(
            &blob,
            RangeScript {
                corrupt_at: Some(5 * MIB + 100),
                ..RangeScript::default()
            },
        )
        .await;
        let proxy = if alone {
            alone_proxy(&origin, "1MiB").await
        } else {
            ranged_proxy(&origin, &[]).await
        };
        let url = ranged_url(&proxy, &origin, &digest);
        for attempt in 0..2 {
            let response = client().get(&url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let body = response.bytes().await;
            assert!(
                body.is_err(),
                "{what}, attempt {attempt}: the stream must break, not complete"
            );
            // The download ends (and is forgotten) right after the mismatch.
            wait_no_download_in_flight(&proxy).await;
        }
        assert!(
            !proxy.state().disk.contains_blob(&digest.parse().unwrap()),
            "{what}"
        );
        let firsts = origin
            .ranges()
            .iter()
            .filter(|r| r.as_deref() == Some("bytes=0-"))
            .count();
        assert_eq!(
            firsts, 2,
            "{what}: nothing cached, each attempt downloads again"
        );
        if alone {
            assert_eq!(origin.ranges().len(), 2, "{what}: one stream per attempt");
        }
        assert!(
            proxy
                .metric(
                    "larder_proxy_upstream_errors_total",
                    &["reason=\"digest_mismatch\""]
                )
                .await
                >= 2.0,
            "{what}"
        );
        // A client's range of good bytes is still served, but never the last byte unverified.
        let part = client()
            .get(&url)
            .header(header::RANGE, format!("bytes={}-", RANGED_BLOB - 10))
            .send()
            .await
            .unwrap();
        assert!(part.bytes().await.is_err(), "{what}: no unverified tail");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn many_clients_on_one_ranged_download_cause_one_set_of_range_requests() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    let origin = ranged_origin(
        &blob,
        RangeScript {
            // ~1 MiB per 160 ms per connection: the clients all arrive during the download.
            delay: Duration::from_millis(10),
            ..RangeScript::default()
        },
    )
    .await;
    let proxy = ranged_proxy(&origin, &[]).await;
    let url = ranged_url(&proxy, &origin, &digest);
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut pulls = Vec::new();
    for _ in 0..8 {
        let (url, barrier) = (url.clone(), Arc::clone(&barrier));
        pulls.push(tokio::spawn(async move {
            barrier.wait().await;
            sha256_digest(&get_bytes(&url).await.expect("pull"))
        }));
    }
    for pull in pulls {
        assert_eq!(pull.await.unwrap(), digest);
    }
    proxy.wait_on_disk(&digest).await;
    assert_one_set(&origin, &[], "8 clients");
    let coalesced = proxy.metric("larder_proxy_coalesced_total", &[]).await;
    assert_eq!(coalesced, 7.0, "every other client joined the download");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_range_on_a_ranged_download_is_served_once_its_bytes_are_written() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    let origin = ranged_origin(
        &blob,
        RangeScript {
            // The first range crawls (16 pieces × 250 ms = 4 s for its chunk); the rest is fast.
            first_delay: Duration::from_millis(250),
            ..RangeScript::default()
        },
    )
    .await;
    let proxy = ranged_proxy(&origin, &[]).await;
    let url = ranged_url(&proxy, &origin, &digest);
    // Starts the download.
    let full = tokio::spawn({
        let url = url.clone();
        async move { get_bytes(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A range in the last chunk, far past the prefix (which waits for the first chunk).
    let (from, to) = (5 * MIB + 1000, 5 * MIB + 300_000);
    let started = Instant::now();
    let part = client()
        .get(&url)
        .header(header::RANGE, format!("bytes={from}-{to}"))
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.headers()[header::CONTENT_RANGE].to_str().unwrap(),
        format!("bytes {from}-{to}/{RANGED_BLOB}")
    );
    let bytes = part.bytes().await.unwrap();
    assert_eq!(&bytes[..], &blob[from as usize..=to as usize]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served from the written chunk, not after the prefix: {:?}",
        started.elapsed()
    );
    assert_eq!(
        proxy.metric("larder_proxy_in_flight_fetches", &[]).await,
        1.0,
        "the download was still running"
    );
    // The whole blob, in order, verified; one download.
    let got = full.await.unwrap().unwrap();
    assert_eq!(sha256_digest(&got), digest);
    proxy.wait_on_disk(&digest).await;
    assert_one_set(&origin, &[], "a client range");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pulls_a_layer_a_real_registry_serves_in_ranges() {
    let origin = Arc::new(start_registry(RegistryOptions::default()).await);
    let image = ImageBuilder::new()
        .random_layer(6 << 20)
        .build()
        .expect("image");
    push(&origin, &image, REPO, "huge").await;
    let host = origin.host_port();
    let mut args = vec!["--insecure-registry", host.as_str()];
    args.extend_from_slice(&RANGED_FLAGS);
    let proxy = Proxy::start(&args).await;
    let mark = origin.requests().len();
    let dest = skopeo_pull(format!("{}:huge", proxy.image(&host, REPO)), false)
        .await
        .expect("pull through ranged downloads");
    let layer = &image.manifests[0].layers[0].blob;
    let hex = layer.digest.trim_start_matches("sha256:");
    let bytes = std::fs::read(dest.path().join("out").join(hex)).expect("layer pulled");
    assert_eq!(sha256_digest(&bytes), layer.digest);
    proxy.wait_on_disk(&layer.digest).await;
    let chunk = larder_proxy::ranged::chunk_size(layer.size, 4);
    let chunks = layer.size.div_ceil(chunk) as usize;
    assert!(chunks >= 6, "{chunks} chunks");
    let path = format!("/v2/{REPO}/blobs/{}", layer.digest);
    // The blob is committed, so every range has completed; distribution logs each request as
    // it ends, a moment later.
    origin
        .wait_for_requests(Duration::from_secs(5), |r| {
            r[mark.min(r.len())..]
                .iter()
                .filter(|e| e.is("GET", &path))
                .count()
                >= 2
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = origin.requests();
    let gets: Vec<_> = log[mark..].iter().filter(|e| e.is("GET", &path)).collect();
    // The first answer may bring the first chunks before the other connections start.
    assert!(
        (2..=chunks).contains(&gets.len()),
        "at most one request per chunk: {}",
        gets.len()
    );
    assert!(gets.iter().all(|e| e.status == 206), "{gets:?}");
    let sent: u64 = gets.iter().filter_map(|e| e.bytes).sum();
    // The first answer (bytes=0-) is cut at its chunk's end; the registry may log more than
    // was read, never less than the blob.
    assert!(sent >= layer.size, "{sent} bytes for {}", layer.size);
    assert_eq!(downloads(&proxy, "ranged").await, 1.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_that_keeps_failing_fails_the_download_cleanly_after_bounded_retries() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    let origin = ranged_origin(
        &blob,
        RangeScript {
            refuse_parts: true,
            ..RangeScript::default()
        },
    )
    .await;
    let proxy = ranged_proxy(&origin, &[]).await;
    assert_get_breaks_and_nothing_is_cached(&proxy, &origin, &digest).await;
    assert_eq!(
        range_requests(&proxy, "failed").await,
        1.0,
        "the first part to give up ends it"
    );
    assert!(range_requests(&proxy, "retried").await >= 3.0);
    // Bounded: 1 + 3 retries per connection at most, and the first request.
    let asked = origin.seen().len();
    assert!((5..=1 + 4 * 4).contains(&asked), "{asked} requests");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_connection_faster_than_the_bar_keeps_the_blob_in_one_stream() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    for (fast_rate, delay, ranged) in [
        // The origin on loopback brings the 1 MiB probe far faster than 1 MB/s: one stream.
        ("1MB", Duration::ZERO, false),
        // 64 KiB per 20 ms (3.3 MB/s) is below 100 MB/s: split.
        ("100MB", Duration::from_millis(20), true),
    ] {
        let origin = ranged_origin(
            &blob,
            RangeScript {
                delay,
                ..RangeScript::default()
            },
        )
        .await;
        let host = origin.host();
        let proxy = Proxy::start(&[
            "--insecure-registry",
            &host,
            "--upstream-ranged-threshold",
            "1MiB",
            "--upstream-ranged-connections",
            "4",
            "--upstream-ranged-fast-rate",
            fast_rate,
        ])
        .await;
        let got = get_bytes(&ranged_url(&proxy, &origin, &digest))
            .await
            .unwrap();
        assert_eq!(sha256_digest(&got), digest, "{fast_rate}");
        proxy.wait_on_disk(&digest).await;
        if ranged {
            assert_one_set(&origin, &[], fast_rate);
        } else {
            assert_eq!(origin.ranges(), vec![Some("bytes=0-".to_owned())]);
        }
        let mode = if ranged { "ranged" } else { "single" };
        assert_eq!(downloads(&proxy, mode).await, 1.0, "{fast_rate}");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_breaks_is_resumed_where_it_stopped_when_the_upstream_honours_ranges() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    // Past the 1 MiB probe, mid-way through the blob.
    let at = 3 * MIB + 5 * (64 << 10);
    for (what, threshold) in [
        ("kept alone after the probe", "1MiB"),
        ("below the ranged threshold", "64MiB"),
    ] {
        let origin = ranged_origin(
            &blob,
            RangeScript {
                first_break_at: Some(at),
                ..RangeScript::default()
            },
        )
        .await;
        let proxy = alone_proxy(&origin, threshold).await;
        let got = get_bytes(&ranged_url(&proxy, &origin, &digest))
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(sha256_digest(&got), digest, "{what}");
        proxy.wait_on_disk(&digest).await;
        // The rest is asked from the first byte larder lacks: the origin sent up to `at`, but
        // bytes still in the socket when the connection is reset may be lost; the digest
        // above shows none was skipped nor repeated.
        let ranges = origin.ranges();
        assert_eq!(ranges.len(), 2, "{what}: {ranges:?}");
        assert_eq!(ranges[0].as_deref(), Some("bytes=0-"), "{what}");
        let resumed: u64 = ranges[1]
            .as_deref()
            .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
            .unwrap_or_else(|| panic!("{what}: an open range, not {:?}", ranges[1]));
        assert!(
            (MIB..=at).contains(&resumed),
            "{what}: resumed at {resumed}"
        );
        assert_eq!(range_requests(&proxy, "retried").await, 1.0, "{what}");
        assert_eq!(range_requests(&proxy, "failed").await, 0.0, "{what}");
        assert_eq!(downloads(&proxy, "single").await, 1.0, "{what}");
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_stream_whose_rest_is_refused_fails_cleanly_after_bounded_retries() {
    let blob = random_bytes(RANGED_BLOB);
    let digest = sha256_digest(&blob);
    let origin = ranged_origin(
        &blob,
        RangeScript {
            first_break_at: Some(3 * MIB),
            refuse_parts: true,
            ..RangeScript::default()
        },
    )
    .await;
    let proxy = alone_proxy(&origin, "1MiB").await;
    assert_get_breaks_and_nothing_is_cached(&proxy, &origin, &digest).await;
    let seen = origin.seen();
    assert!(
        seen[1..].iter().all(|s| s.status == 503),
        "every resume was refused: {seen:?}"
    );
    // The first answer, then the resumes the budget allows: PART_RETRIES fruitless in a row.
    assert_eq!(
        seen.len(),
        1 + larder_proxy::ranged::PART_RETRIES as usize + 1,
        "{seen:?}"
    );
    assert_eq!(range_requests(&proxy, "failed").await, 1.0);
    proxy.shutdown().await;
}
