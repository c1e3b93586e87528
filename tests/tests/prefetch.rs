//! Node-level precache: `larder_proxy::prefetch` fills a real proxy's disk tier from a real
//! distribution origin, through the same tiers as client pulls, with only the node's platform.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use larder_proxy::prefetch::{Platform, PrefetchError, prefetch};
use larder_proxy::{ProxyArgs, RunningProxy};
use larder_testkit::{
    ImageBuilder, IndexBuilder, Registry, RegistryOptions, SkopeoPullOptions,
    pull_with_skopeo_async,
};

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn proxy(disk: &std::path::Path, origin: &str, extra: &[&str]) -> RunningProxy {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let disk = disk.to_str().unwrap().to_owned();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        &disk,
        "--insecure-registry",
        origin,
    ];
    args.extend_from_slice(extra);
    let args = ProxyArgs::from_args(args).unwrap();
    larder_proxy::start(args).await.expect("proxy starts")
}

fn blob_gets(origin: &Registry) -> Vec<String> {
    origin
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .map(|r| r.path)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_puts_only_the_nodes_platform_on_disk_and_pulls_then_stay_local() {
    let origin = Arc::new(blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await);
    let index = IndexBuilder::new()
        .platforms(
            &[
                larder_testkit::Platform::linux("amd64"),
                larder_testkit::Platform::linux("arm64"),
            ],
            &[300 << 10, 200 << 10],
        )
        .build()
        .unwrap();
    {
        let (origin, index) = (origin.clone(), index.clone());
        blocking(move || origin.push_image(&index, "library/app", "multi").unwrap()).await;
    }
    let host = origin.host_port();
    let disk = tempfile::tempdir().unwrap();
    let running = proxy(disk.path(), &host, &[]).await;
    let state = running.state.clone();
    let arm = index
        .manifests
        .iter()
        .find(|m| m.platform.architecture == "arm64")
        .unwrap();
    let amd = index
        .manifests
        .iter()
        .find(|m| m.platform.architecture == "amd64")
        .unwrap();

    let reported = Arc::new(AtomicU64::new(0));
    let seen = reported.clone();
    let report = move |done: u64, _total: Option<u64>| seen.store(done, Ordering::Relaxed);
    let platform = Platform::parse("linux/arm64/v8").unwrap();
    let reference = format!("{host}/library/app:multi");
    let done = prefetch(&state, &reference, None, &platform, &report)
        .await
        .expect("prefetch");
    assert_eq!(done.manifest.to_string(), arm.manifest.digest);
    let expected_size =
        arm.manifest.size + arm.config.size + arm.layers.iter().map(|l| l.blob.size).sum::<u64>();
    assert_eq!(done.size_bytes, expected_size);
    assert_eq!(reported.load(Ordering::Relaxed), expected_size);
    for digest in
        std::iter::once(&arm.config.digest).chain(arm.layers.iter().map(|l| &l.blob.digest))
    {
        assert!(
            state.disk.contains_blob(&digest.parse().unwrap()),
            "{digest} on disk"
        );
    }
    for layer in &amd.layers {
        assert!(
            !state
                .disk
                .contains_blob(&layer.blob.digest.parse().unwrap())
        );
    }
    let fetched = blob_gets(&origin);
    assert!(
        amd.layers
            .iter()
            .all(|l| fetched.iter().all(|p| !p.contains(&l.blob.digest))),
        "another platform's layers were fetched: {fetched:?}"
    );

    // A second prefetch finds everything on disk: no blob leaves the origin again.
    let before = blob_gets(&origin).len();
    prefetch(&state, &reference, None, &platform, &|_, _| {})
        .await
        .expect("again");
    assert_eq!(blob_gets(&origin).len(), before);
    // And a client's pull of the layer is served from disk.
    let layer = &arm.layers[0].blob;
    let url = format!(
        "http://{}/v2/{}/library/app/blobs/{}",
        running.addrs[0],
        host.replace(':', "_"),
        layer.digest
    );
    let body = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(&body[..], &layer.bytes[..]);
    assert_eq!(blob_gets(&origin).len(), before, "served from disk");
    // A real client pulling the node's platform through the proxy: no blob leaves the origin.
    let dest = tempfile::tempdir().unwrap();
    let pulled = format!(
        "{}/{}/library/app:multi",
        running.addrs[0],
        host.replace(':', "_")
    );
    pull_with_skopeo_async(
        pulled,
        dest.path().join("out"),
        SkopeoPullOptions {
            override_arch: Some("arm64".into()),
            timeout: Some(Duration::from_secs(120)),
            ..SkopeoPullOptions::default()
        },
    )
    .await
    .expect("skopeo pulls the prefetched platform through the proxy");
    let hex = layer.digest.trim_start_matches("sha256:");
    assert_eq!(
        std::fs::read(dest.path().join("out").join(hex)).unwrap(),
        layer.bytes
    );
    assert_eq!(
        blob_gets(&origin).len(),
        before,
        "skopeo's pull made blob GETs to the origin: {:?}",
        blob_gets(&origin)
    );
    let metrics = reqwest::get(format!("http://{}/metrics", running.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted: u64 = metrics
        .lines()
        .find(|l| l.starts_with("larder_proxy_prefetch_bytes_total "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("prefetch bytes metric");
    assert_eq!(counted, expected_size - arm.manifest.size, "{metrics}");

    // Bad requests say what is wrong, and only upstream trouble is worth retrying.
    let none = prefetch(
        &state,
        &reference,
        None,
        &Platform::parse("linux/s390x").unwrap(),
        &|_, _| {},
    )
    .await;
    let err = none.unwrap_err();
    assert!(matches!(err, PrefetchError::NoPlatform { .. }), "{err}");
    assert!(
        err.to_string().contains("linux/amd64") && !err.is_retryable(),
        "{err}"
    );
    let missing = prefetch(
        &state,
        &format!("{host}/library/app:nope"),
        None,
        &platform,
        &|_, _| {},
    )
    .await;
    assert!(
        matches!(missing, Err(PrefetchError::Upstream(_))),
        "{missing:?}"
    );
    let bad = prefetch(&state, "Not A Reference", None, &platform, &|_, _| {}).await;
    assert!(matches!(bad, Err(PrefetchError::Reference(..))));
    running.shutdown(Duration::from_secs(5)).await;
}

/// With the cache registry holding the image and the spec pinning its digest, a prefetch never
/// touches the origin, records the tag on disk, and a wrong platform says what there is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_of_a_pinned_digest_comes_from_the_cache_registry() {
    let origin = Arc::new(blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await);
    let cache = Arc::new(
        blocking(|| Registry::start(RegistryOptions::default().named("cache")).unwrap()).await,
    );
    let image = ImageBuilder::new()
        .random_layer(400 << 10)
        .random_layer(100 << 10)
        .build()
        .unwrap();
    let host = origin.host_port();
    let cache_repo = format!("{}/library/one", host.replace(':', "_"));
    let digest = {
        let (origin, cache, image) = (origin.clone(), cache.clone(), image.clone());
        blocking(move || {
            let digest = origin
                .push_image(&image, "library/one", "v1")
                .unwrap()
                .digest;
            cache.push_image(&image, &cache_repo, "v1").unwrap();
            digest
        })
        .await
    };
    let disk = tempfile::tempdir().unwrap();
    let cache_url = cache.url();
    let running = proxy(disk.path(), &host, &["--cache-registry", &cache_url]).await;
    let state = running.state.clone();
    let origin_before = origin.requests().len();
    let cache_before = cache.requests().len();

    let reference = format!("{host}/library/one:v1");
    let pinned: larder_core::digest::Digest = digest.parse().unwrap();
    let platform = Platform::parse("linux/amd64").unwrap();
    let done = prefetch(&state, &reference, Some(&pinned), &platform, &|_, _| {})
        .await
        .expect("prefetch from the cache registry");
    assert_eq!(done.manifest, pinned);
    let manifest = &image.manifests[0];
    for blob in std::iter::once(&manifest.config.digest)
        .chain(manifest.layers.iter().map(|l| &l.blob.digest))
    {
        assert!(
            state.disk.contains_blob(&blob.parse().unwrap()),
            "{blob} on disk"
        );
    }
    // The origin only sees the privacy probe (a HEAD: may this image be served from the
    // cache registry without credentials?), no manifest or blob download.
    let origin_gets: Vec<_> = origin.requests()[origin_before..]
        .iter()
        .filter(|r| r.method != "HEAD")
        .cloned()
        .collect();
    assert!(origin_gets.is_empty(), "the origin served: {origin_gets:?}");
    let cache_blob_gets = cache.requests()[cache_before..]
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .count();
    assert_eq!(
        cache_blob_gets,
        1 + manifest.layers.len(),
        "config and layers from the cache"
    );
    let encoded = host.replace(':', "_");
    assert_eq!(
        state
            .disk
            .get_tag(&encoded, "library/one", "v1")
            .await
            .unwrap(),
        Some(pinned.clone()),
        "the tag is recorded as naming the pinned digest"
    );

    // A reference whose own digest disagrees with the pin is refused before any request.
    let other = format!("{host}/library/one@sha256:{}", "0".repeat(64));
    let conflict = prefetch(&state, &other, Some(&pinned), &platform, &|_, _| {}).await;
    assert!(
        matches!(conflict, Err(PrefetchError::Reference(..))),
        "{conflict:?}"
    );

    // An index without the node's platform is a clear, non-retryable error.
    let index = IndexBuilder::new()
        .platforms(&[larder_testkit::Platform::linux("amd64")], &[10 << 10])
        .build()
        .unwrap();
    {
        let (origin, index) = (origin.clone(), index.clone());
        blocking(move || origin.push_image(&index, "library/idx", "v1").unwrap()).await;
    }
    let err = prefetch(
        &state,
        &format!("{host}/library/idx:v1"),
        None,
        &Platform::parse("linux/arm64").unwrap(),
        &|_, _| {},
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, PrefetchError::NoPlatform { .. })
            && err.to_string().contains("linux/arm64")
            && err.to_string().contains("linux/amd64")
            && !err.is_retryable(),
        "{err}"
    );
    running.shutdown(Duration::from_secs(5)).await;
}

/// The agent has no client: a private image is prefetched with the operator's
/// `--registry-credentials`, and without them fails as the origin's refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_images_need_the_operators_credentials() {
    let origin = Arc::new(
        blocking(|| Registry::start(RegistryOptions::basic_auth("ops", "s3cret")).unwrap()).await,
    );
    let image = ImageBuilder::new().random_layer(60 << 10).build().unwrap();
    {
        let (origin, image) = (origin.clone(), image.clone());
        blocking(move || origin.push_image(&image, "team/tool", "v1").unwrap()).await;
    }
    let host = origin.host_port();
    let reference = format!("{host}/team/tool:v1");
    let platform = Platform::parse("linux/amd64").unwrap();
    let layer: larder_core::digest::Digest =
        image.manifests[0].layers[0].blob.digest.parse().unwrap();

    let bare = tempfile::tempdir().unwrap();
    let running = proxy(bare.path(), &host, &[]).await;
    let err = prefetch(&running.state, &reference, None, &platform, &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            PrefetchError::Upstream(larder_proxy::ProxyError::Denied { .. })
        ),
        "{err:?}"
    );
    assert!(err.is_retryable(), "credentials may be mounted later");
    assert!(!running.state.disk.contains_blob(&layer));
    running.shutdown(Duration::from_secs(5)).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.json");
    let auth = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode("ops:s3cret")
    };
    std::fs::write(
        &config,
        format!(r#"{{"auths": {{"{host}": {{"auth": "{auth}"}}}}}}"#),
    )
    .unwrap();
    let running = proxy(
        &dir.path().join("disk"),
        &host,
        &["--registry-credentials", config.to_str().unwrap()],
    )
    .await;
    let done = prefetch(&running.state, &reference, None, &platform, &|_, _| {})
        .await
        .expect("prefetch with the operator's credentials");
    assert_eq!(
        done.manifest.to_string(),
        image.manifests[0].manifest.digest
    );
    assert!(running.state.disk.contains_blob(&layer));
    // Clients still have to show their own: the operator's credentials are not lent to them.
    let url = format!(
        "http://{}/v2/{}/team/tool/blobs/{layer}",
        running.addrs[0],
        host.replace(':', "_")
    );
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
    running.shutdown(Duration::from_secs(5)).await;
}

/// A real origin holding `library/app:v1`: two layers, 300 and 50 KiB.
fn origin_with_app() -> (Registry, larder_testkit::BuiltImage) {
    let origin = Registry::start(RegistryOptions::default()).unwrap();
    let image = ImageBuilder::new()
        .random_layer(300 << 10)
        .random_layer(50 << 10)
        .build()
        .unwrap();
    origin.push_image(&image, "library/app", "v1").unwrap();
    (origin, image)
}

/// The real `larder proxy` as node `n1`'s agent, against a fake API server holding larder's
/// CRDs and a real origin: what the two binary-level tests below share.
struct NodeAgentRig {
    api: larder_testkit::fake_apiserver::FakeApiServer,
    listen: std::net::SocketAddr,
    metrics_addr: std::net::SocketAddr,
    _proxy: larder_testkit::process::ChildGuard,
    _dirs: [tempfile::TempDir; 2],
}

const NODECACHES: &str = "/apis/larder.dev/v1alpha1/nodecaches";

impl NodeAgentRig {
    /// Creates NodeCache `n1` with `spec`, then starts the proxy with `extra` flags.
    fn start(origin: &str, spec: serde_json::Value, extra: &[&str]) -> Self {
        use larder_testkit::fake_apiserver::{FakeApiServer, FakeOptions};
        use larder_testkit::process::{ChildGuard, larder_binary};
        let larder = larder_binary().expect("the larder binary");
        let api = FakeApiServer::start(FakeOptions::default()).unwrap();
        api.install_larder_crds().expect("larder's CRDs");
        api.create(
            NODECACHES,
            serde_json::json!({
                "apiVersion": "larder.dev/v1alpha1", "kind": "NodeCache",
                "metadata": {"name": "n1"},
                "spec": spec,
            }),
        )
        .unwrap();
        let disk = tempfile::tempdir().unwrap();
        let logs = tempfile::tempdir().unwrap();
        let listen = larder_testkit::ports::free_addr().unwrap();
        let metrics_addr = larder_testkit::ports::free_addr().unwrap();
        let (listen_arg, metrics_arg) = (listen.to_string(), metrics_addr.to_string());
        let mut cmd = std::process::Command::new(&larder);
        cmd.args([
            "proxy",
            "--listen",
            &listen_arg,
            "--metrics-listen",
            &metrics_arg,
            "--disk-cache",
            disk.path().to_str().unwrap(),
            "--insecure-registry",
            origin,
            "--node-name",
            "n1",
        ])
        .args(extra)
        .env("KUBECONFIG", api.kubeconfig_path());
        let proxy = ChildGuard::spawn(
            "larder proxy n1",
            cmd,
            &logs.path().join("proxy.out"),
            &logs.path().join("proxy.err"),
        )
        .expect("larder proxy starts");
        Self {
            api,
            listen,
            metrics_addr,
            _proxy: proxy,
            _dirs: [disk, logs],
        }
    }

    /// NodeCache `n1` as the API server has it now.
    fn nodecache(&self) -> Option<serde_json::Value> {
        self.api.get(&format!("{NODECACHES}/n1")).unwrap()
    }

    fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_addr);
        String::from_utf8(larder_testkit::http::get(&url, &[]).unwrap().body).unwrap()
    }
}

/// The node agent in the real binary against the fake API server: it fills its NodeCache's
/// status (Ready with bytes, Failed with a reason), follows the spec when an image leaves it and
/// the epoch rises (re-checking from disk, no new download), and reports its metrics.
#[test]
fn node_agent_fulfils_its_nodecache_and_follows_spec_changes() {
    use larder_testkit::process::wait_for;
    use serde_json::{Value, json};

    let (origin, image) = origin_with_app();
    let host = origin.host_port();
    let good = format!("{host}/library/app:v1");
    let missing = format!("{host}/library/app:nope");
    let spec = |images: &[&str], epoch: u64| {
        json!({
            "platform": "linux/amd64",
            "maxConcurrent": 1,
            "epoch": epoch,
            "images": images.iter().map(|i| json!({"image": i, "precaches": ["p"]})).collect::<Vec<_>>(),
        })
    };
    let rig = NodeAgentRig::start(&host, spec(&[&good, &missing], 1), &[]);

    let image_status = |nc: &Value, image: &str| -> Option<Value> {
        nc["status"]["images"]
            .as_array()?
            .iter()
            .find(|i| i["image"] == image)
            .cloned()
    };
    let nc = wait_for(
        "one image Ready, one Failed",
        Duration::from_secs(60),
        || {
            let nc = rig.nodecache()?;
            let ok = image_status(&nc, &good)?["phase"] == "Ready"
                && image_status(&nc, &missing)?["phase"] == "Failed";
            ok.then_some(nc)
        },
    );
    let manifest = &image.manifests[0];
    let size = manifest.manifest.size
        + manifest.config.size
        + manifest.layers.iter().map(|l| l.blob.size).sum::<u64>();
    let ready = image_status(&nc, &good).unwrap();
    assert_eq!(ready["sizeBytes"], size, "{nc}");
    assert_eq!(ready["bytesDone"], size, "{nc}");
    assert_eq!(ready["digest"], manifest.manifest.digest.as_str(), "{nc}");
    let failed = image_status(&nc, &missing).unwrap();
    assert!(
        failed["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{failed}"
    );
    assert_eq!(nc["status"]["imagesReady"], 1, "{nc}");
    assert_eq!(nc["status"]["observedEpoch"], 1, "{nc}");
    assert!(nc["status"]["bytesDone"].as_u64().unwrap() >= size, "{nc}");
    let metrics = rig.metrics();
    assert!(
        metrics.contains("larder_proxy_prefetch_images{phase=\"Ready\"} 1")
            && metrics.contains("larder_proxy_prefetch_images{phase=\"Failed\"} 1"),
        "{metrics}"
    );
    let fetched = blob_gets(&origin).len();
    assert_eq!(fetched, 1 + manifest.layers.len(), "each blob once");

    // The failing image leaves the spec and the schedule fires: the agent drops it and
    // re-checks the other, from its disk.
    rig.api
        .merge_patch(
            &format!("{NODECACHES}/n1"),
            &json!({"spec": spec(&[&good], 2)}),
        )
        .unwrap();
    let nc = wait_for("the new epoch observed", Duration::from_secs(30), || {
        let nc = rig.nodecache()?;
        let images = nc["status"]["images"].as_array()?;
        (nc["status"]["observedEpoch"] == 2 && images.len() == 1 && images[0]["phase"] == "Ready")
            .then_some(nc)
    });
    assert_eq!(nc["status"]["images"][0]["image"], good.as_str());
    assert_eq!(nc["status"]["imagesReady"], 1);
    assert_eq!(
        blob_gets(&origin).len(),
        fetched,
        "re-checked from disk, nothing downloaded again"
    );
}

/// A precached image that loses blobs to the disk tier's LRU anyway (a pull of other content
/// past the size limit) goes back to Pending saying why, is fetched again, and is Ready again;
/// the evictions show in the proxy's metrics. The real binary, a real origin, the fake API
/// server.
#[test]
fn an_evicted_precached_image_is_fetched_again() {
    use larder_testkit::process::wait_for;
    use serde_json::{Value, json};

    let (origin, _) = origin_with_app();
    let filler = ImageBuilder::new().random_layer(400 << 10).build().unwrap();
    origin.push_image(&filler, "library/filler", "v1").unwrap();
    let host = origin.host_port();
    let app = format!("{host}/library/app:v1");
    let spec = json!({"platform": "linux/amd64", "maxConcurrent": 1, "epoch": 1,
        "images": [{"image": app, "precaches": ["p"]}]});
    // Room for the image (~351 KiB) or the filler (400 KiB), not both.
    let rig = NodeAgentRig::start(
        &host,
        spec,
        &[
            "--disk-cache-max-bytes",
            "600KiB",
            "--precache-check-interval",
            "1s",
        ],
    );

    let app_status = |phase: &str| -> Option<Value> {
        let nc = rig.nodecache()?;
        let status = nc["status"]["images"].as_array()?.first()?.clone();
        (status["phase"] == phase).then_some(status)
    };
    let app_gets = || {
        blob_gets(&origin)
            .into_iter()
            .filter(|p| p.contains("/library/app/"))
            .count()
    };
    wait_for("the image Ready", Duration::from_secs(60), || {
        app_status("Ready")
    });
    let fetched = app_gets();
    assert_eq!(fetched, 3, "config and two layers, once each");

    // A client pulls other content through the proxy: the disk tier evicts to make room.
    let layer = &filler.manifests[0].layers[0].blob;
    let path = format!(
        "/v2/{}/library/filler/blobs/{}",
        host.replace(':', "_"),
        layer.digest
    );
    let pulled = larder_testkit::http::get(&format!("http://{}{path}", rig.listen), &[]).unwrap();
    assert_eq!(pulled.status, 200);
    assert_eq!(pulled.body.len() as u64, layer.size);

    let pending = wait_for("the image back to Pending", Duration::from_secs(30), || {
        app_status("Pending")
    });
    let reason = pending["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("evicted from the node's disk cache"),
        "{pending}"
    );
    wait_for("the image Ready again", Duration::from_secs(60), || {
        app_status("Ready")
    });
    assert!(
        app_gets() > fetched,
        "the lost blobs came from the origin again"
    );
    let metrics = rig.metrics();
    let evictions = metrics
        .lines()
        .find_map(|l| l.strip_prefix("larder_proxy_disk_evictions_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no eviction counter in\n{metrics}"));
    assert!(evictions >= 2.0, "{evictions} evictions");
}

/// A disk tier that cannot keep a blob (here: smaller than the layer) fails the prefetch as the
/// disk's fault, rather than reporting an image the node does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_too_small_is_the_disks_fault() {
    let origin = Arc::new(blocking(|| Registry::start(RegistryOptions::default()).unwrap()).await);
    let image = ImageBuilder::new().random_layer(512 << 10).build().unwrap();
    {
        let (origin, image) = (origin.clone(), image.clone());
        blocking(move || origin.push_image(&image, "library/big", "v1").unwrap()).await;
    }
    let host = origin.host_port();
    let disk = tempfile::tempdir().unwrap();
    let running = proxy(disk.path(), &host, &["--disk-cache-max-bytes", "65536"]).await;
    let err = prefetch(
        &running.state,
        &format!("{host}/library/big:v1"),
        None,
        &Platform::parse("linux/amd64").unwrap(),
        &|_, _| {},
    )
    .await
    .unwrap_err();
    assert_eq!(err.fault(), "disk", "{err}");
    assert!(err.is_retryable(), "{err}");
    running.shutdown(Duration::from_secs(5)).await;
}
