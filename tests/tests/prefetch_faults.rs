//! Node-level prefetch when things go wrong, against a real CNCF distribution origin: a blob
//! whose stored bytes no longer match its digest, and a prefetch racing a client's pull of the
//! same blob.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_proxy::prefetch::{Platform, PrefetchError, prefetch};
use larder_proxy::{ProxyArgs, ProxyError, RunningProxy};
use larder_testkit::{ImageBuilder, Registry, RegistryOptions, sha256_digest};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn proxy(disk: &std::path::Path, origin: &str) -> RunningProxy {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let disk = disk.to_str().unwrap().to_owned();
    let args = ProxyArgs::from_args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        &disk,
        "--insecure-registry",
        origin,
    ])
    .unwrap();
    larder_proxy::start(args).await.expect("proxy starts")
}

/// Where distribution's filesystem driver keeps a blob's bytes.
fn stored_blob(origin: &Registry, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    origin
        .storage_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn tmp_files(disk: &std::path::Path) -> usize {
    std::fs::read_dir(disk.join("tmp")).map_or(0, |d| d.count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_does_not_match_its_digest_fails_the_prefetch_and_is_never_kept() {
    let origin = Arc::new(blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await);
    let image = ImageBuilder::new()
        .random_layer(200 << 10)
        .random_layer(300 << 10)
        .build()
        .unwrap();
    {
        let (origin, image) = (origin.clone(), image.clone());
        blocking(move || origin.push_image(&image, "library/bad", "v1").unwrap()).await;
    }
    // The origin's copy of the second layer rots: same length, one byte flipped.
    let manifest = &image.manifests[0];
    let (good, bad) = (&manifest.layers[0].blob, &manifest.layers[1].blob);
    let path = stored_blob(&origin, &bad.digest);
    let mut bytes = std::fs::read(&path).expect("the registry stores the layer there");
    bytes[1000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let host = origin.host_port();
    let disk = tempfile::tempdir().unwrap();
    let running = proxy(disk.path(), &host).await;
    let state = running.state.clone();
    let reference = format!("{host}/library/bad:v1");
    let platform = Platform::parse("linux/amd64").unwrap();
    let bad_path = format!("/v2/library/bad/blobs/{}", bad.digest);
    for attempt in 1..=2 {
        let err = prefetch(&state, &reference, None, &platform, &|_, _| {})
            .await
            .expect_err("a corrupt blob must fail the prefetch");
        // Whose fault and what: the origin sent bytes that hash to something else.
        assert!(
            matches!(
                &err,
                PrefetchError::Upstream(ProxyError::BadUpstream {
                    upstream: larder_proxy::error::Upstream::Origin,
                    ..
                })
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("origin") && text.contains(&bad.digest) && text.contains("hashes to"),
            "{text}"
        );
        assert!(err.is_retryable(), "the origin may be repaired: {text}");
        // Nothing wrong is kept, so the next attempt asks the origin again.
        assert!(!state.disk.contains_blob(&bad.digest.parse().unwrap()));
        assert_eq!(origin.count_requests("GET", &bad_path), attempt);
        assert_eq!(tmp_files(disk.path()), 0, "no temp file left behind");
    }
    // The intact blobs are kept and are not downloaded twice.
    assert!(state.disk.contains_blob(&good.digest.parse().unwrap()));
    assert_eq!(
        origin.count_requests("GET", &format!("/v2/library/bad/blobs/{}", good.digest)),
        1
    );
    running.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefetch_racing_a_client_pull_shares_its_one_download() {
    let origin = Arc::new(blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await);
    let image = ImageBuilder::new().random_layer(32 << 20).build().unwrap();
    {
        let (origin, image) = (origin.clone(), image.clone());
        blocking(move || origin.push_image(&image, "library/big", "v1").unwrap()).await;
    }
    let layer = &image.manifests[0].layers[0].blob;
    let host = origin.host_port();
    let disk = tempfile::tempdir().unwrap();
    let running = proxy(disk.path(), &host).await;
    let state = running.state.clone();

    // A client starts pulling the big layer; once its download is under way, the prefetch of
    // the image reaches the same blob and must join that download, not start another.
    let url = format!(
        "http://{}/v2/{}/library/big/blobs/{}",
        running.addrs[0],
        host.replace(':', "_"),
        layer.digest
    );
    let client = tokio::spawn(async move {
        let body = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        sha256_digest(&body)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while state.metrics.in_flight_fetches.get() == 0 {
        assert!(
            Instant::now() < deadline,
            "the client's download never started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let platform = Platform::parse("linux/amd64").unwrap();
    let done = prefetch(
        &state,
        &format!("{host}/library/big:v1"),
        None,
        &platform,
        &|_, _| {},
    )
    .await
    .expect("prefetch");
    assert_eq!(
        client.await.unwrap(),
        layer.digest,
        "the client got the layer"
    );
    assert_eq!(
        done.manifest.to_string(),
        image.manifests[0].manifest.digest
    );
    assert!(state.disk.contains_blob(&layer.digest.parse().unwrap()));
    let path = format!("/v2/library/big/blobs/{}", layer.digest);
    assert_eq!(
        origin.count_requests("GET", &path),
        1,
        "one origin GET for the client and the prefetch"
    );
    // The prefetch waited on that download (it did not find the layer on disk already), so the
    // two really overlapped.
    assert!(
        state.metrics.prefetch_bytes.get() >= layer.size,
        "prefetch joined the download: {} bytes counted",
        state.metrics.prefetch_bytes.get()
    );
    running.shutdown(Duration::from_secs(5)).await;
}
