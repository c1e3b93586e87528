//! Write-through to the cache registry (proxy/src/writeback.rs) against real CNCF distribution
//! registries: a blob the origin served the proxy lands in the cache registry, under the path
//! the controllers copy to, verified by the registry itself (it checks the digest on PUT).

// Test helpers outside #[test] functions panic on setup failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_testkit::{
    ImageBuilder, Registry, RegistryOptions, SkopeoPullOptions, pull_with_skopeo_async,
};

const REPO: &str = "library/app";

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn metric(addr: std::net::SocketAddr, line_prefix: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(line_prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Pulls `<host>/library/app:v1` through `proxy` with skopeo into a throw-away directory.
async fn pull(proxy: &larder_proxy::RunningProxy, host: &str) -> Result<(), String> {
    let dest = tempfile::tempdir().map_err(|e| e.to_string())?;
    let reference = format!("{}/{}/{REPO}:v1", proxy.addrs[0], host.replace(':', "_"));
    let options = SkopeoPullOptions {
        timeout: Some(Duration::from_secs(60)),
        ..SkopeoPullOptions::default()
    };
    pull_with_skopeo_async(reference, dest.path().join("out"), options)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

async fn start_proxy(disk: &std::path::Path, extra: &[&str]) -> larder_proxy::RunningProxy {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let disk = disk.to_str().unwrap();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        disk,
    ];
    args.extend_from_slice(extra);
    larder_proxy::start(larder_proxy::ProxyArgs::from_args(&args).unwrap())
        .await
        .expect("proxy starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_the_origin_served_are_written_through_to_the_cache_registry() {
    let origin = Arc::new(blocking(|| Registry::start_default().unwrap()).await);
    let cache = Arc::new(
        blocking(|| Registry::start(RegistryOptions::default().named("cache")).unwrap()).await,
    );
    let image = ImageBuilder::new()
        .random_layer(2 << 20)
        .random_layer(100 << 10)
        .build()
        .unwrap();
    let (o, img) = (Arc::clone(&origin), image.clone());
    blocking(move || o.push_image(&img, REPO, "v1").unwrap()).await;
    let host = origin.host_port();
    let cache_repo = format!("{}/{REPO}", host.replace(':', "_"));

    let disk = tempfile::tempdir().unwrap();
    let cache_url = cache.url();
    let proxy = start_proxy(
        disk.path(),
        &["--insecure-registry", &host, "--cache-registry", &cache_url],
    )
    .await;
    pull(&proxy, &host).await.expect("pull through the proxy");

    // Every blob (layers and config) reaches the cache registry, each pushed once, and the
    // origin served each once.
    let mut blobs: Vec<String> = image.manifests[0]
        .layers
        .iter()
        .map(|l| l.blob.digest.clone())
        .collect();
    blobs.push(image.manifests[0].config.digest.clone());
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for blob in &blobs {
        loop {
            let head = http
                .head(format!("{}/v2/{cache_repo}/blobs/{blob}", cache.url()))
                .send()
                .await
                .unwrap();
            if head.status().is_success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{blob} never reached the cache registry"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            origin.count_requests("GET", &format!("/v2/{REPO}/blobs/{blob}")),
            1,
            "{blob}"
        );
    }
    let pushed = metric(
        proxy.metrics_addr,
        "larder_proxy_cache_writes_total{result=\"pushed\"}",
    )
    .await;
    assert_eq!(pushed, blobs.len() as f64);
    let puts = cache
        .requests()
        .iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, blobs.len(), "one upload per blob");

    // A second proxy (another node) finds the blobs in the cache registry: the origin serves
    // them no more. Its own write-through finds nothing to do: it never fetched from the origin.
    let disk2 = tempfile::tempdir().unwrap();
    let proxy2 = start_proxy(
        disk2.path(),
        &["--insecure-registry", &host, "--cache-registry", &cache_url],
    )
    .await;
    pull(&proxy2, &host).await.expect("second node's pull");
    for blob in &blobs {
        assert_eq!(
            origin.count_requests("GET", &format!("/v2/{REPO}/blobs/{blob}")),
            1,
            "{blob} fetched from the origin again"
        );
    }
    assert_eq!(
        metric(
            proxy2.metrics_addr,
            "larder_proxy_cache_writes_total{result=\"pushed\"}"
        )
        .await,
        0.0
    );
    proxy.shutdown(Duration::from_secs(5)).await;
    proxy2.shutdown(Duration::from_secs(5)).await;
}

/// Off by flag: nothing is written, and the counter family is not there at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_can_be_switched_off() {
    let origin = Arc::new(blocking(|| Registry::start_default().unwrap()).await);
    let cache = Arc::new(
        blocking(|| Registry::start(RegistryOptions::default().named("cache")).unwrap()).await,
    );
    let image = ImageBuilder::new().random_layer(64 << 10).build().unwrap();
    let (o, img) = (Arc::clone(&origin), image.clone());
    blocking(move || o.push_image(&img, REPO, "v1").unwrap()).await;
    let host = origin.host_port();
    let disk = tempfile::tempdir().unwrap();
    let cache_url = cache.url();
    let proxy = start_proxy(
        disk.path(),
        &[
            "--insecure-registry",
            &host,
            "--cache-registry",
            &cache_url,
            "--cache-registry-write-through",
            "false",
        ],
    )
    .await;
    pull(&proxy, &host).await.expect("pull");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = cache
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" || r.method == "POST")
        .count();
    assert_eq!(writes, 0, "nothing is pushed with write-through off");
    proxy.shutdown(Duration::from_secs(5)).await;
}
