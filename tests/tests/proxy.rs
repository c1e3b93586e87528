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
            "/v2/docker.io/library/x/tags/list",
            404,
            "UNSUPPORTED",
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
