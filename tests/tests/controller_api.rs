//! `larder controller`, the real binary, against the fake API server and two real distribution
//! registries (origin and cache): managed pods get Ready CachedImages whose images are in the
//! cache registry with their digests, a second replica waits on the Lease and takes over within
//! seconds when the leader is killed, and once the pods are gone the images expire and are
//! deleted from the cache registry. Images that cannot be copied cost a bounded number of
//! requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use larder_core::reference::Reference;
use larder_testkit::fake_apiserver::{FakeApiServer, FakeOptions};
use larder_testkit::image::MANIFEST_ACCEPT;
use larder_testkit::process::{ChildGuard, file_tail, larder_binary, run_checked, wait_for};
use larder_testkit::{ImageBuilder, Registry, RegistryOptions};
use serde_json::{Value, json};

const LEASE_NS: &str = "larder";
const APPS_NS: &str = "apps";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/larder/leases/larder-controller";
const CACHED_IMAGES: &str = "/apis/larder.dev/v1alpha1/cachedimages";

struct Setup {
    api: FakeApiServer,
    origin: Registry,
    cache: Registry,
    larder: PathBuf,
    logs: tempfile::TempDir,
}

/// A failed test shows what its processes logged: the controller's and proxy's stderr say why
/// something never went Ready, which the assertion alone cannot.
impl Drop for Setup {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.logs.path()) else {
            return;
        };
        for entry in entries.flatten() {
            eprintln!(
                "--- {} (last 80 lines)\n{}",
                entry.file_name().to_string_lossy(),
                file_tail(&entry.path(), 80)
            );
        }
    }
}

impl Setup {
    /// The larder binary, an origin and a cache registry, and a fake API server with larder's
    /// CRDs and `namespaces`.
    fn start(namespaces: &[&str]) -> Setup {
        let api = FakeApiServer::start(FakeOptions::default()).expect("fake API server");
        api.install_larder_crds().expect("larder's CRDs");
        for ns in namespaces {
            api.create(
                "/api/v1/namespaces",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            )
            .unwrap();
        }
        Setup {
            api,
            origin: Registry::start(RegistryOptions::default()).expect("origin registry"),
            cache: Registry::start(RegistryOptions::default().named("cache"))
                .expect("cache registry"),
            larder: larder_binary().expect("the larder binary"),
            logs: tempfile::tempdir().unwrap(),
        }
    }

    fn controller(&self, identity: &str) -> ChildGuard {
        self.controller_with_retention(identity, "3s")
    }

    fn controller_with_retention(&self, identity: &str, retention: &str) -> ChildGuard {
        self.controller_with(identity, retention, &[])
    }

    fn controller_with(&self, identity: &str, retention: &str, extra: &[&str]) -> ChildGuard {
        let mut cmd = Command::new(&self.larder);
        cmd.args([
            "controller",
            "--cache-registry",
            &self.cache.url(),
            "--insecure-registry",
            &self.origin.host_port(),
            "--retention",
            retention,
            "--refresh-interval",
            "1h",
            "--leader-election-namespace",
            LEASE_NS,
            "--leader-election-identity",
            identity,
            "--leader-election-lease-duration",
            "3s",
            // No kubelet here: the fake's pods stay Pending, and no node proxy writes through.
            "--copy-wait-for-pulls",
            "0s",
        ])
        .args(extra)
        .args(if extra.contains(&"--metrics-listen") {
            &[][..]
        } else {
            &["--metrics-listen", "127.0.0.1:0"][..]
        })
        .env("KUBECONFIG", self.api.kubeconfig_path())
        .env("LARDER_LOG", "info,larder_controllers=debug");
        let log = |ext: &str| {
            self.logs
                .path()
                .join(format!("controller-{identity}.{ext}"))
        };
        ChildGuard::spawn(
            format!("larder controller {identity}"),
            cmd,
            &log("out"),
            &log("err"),
        )
        .expect("larder controller starts")
    }

    fn holder(&self) -> Option<String> {
        let lease = self.api.get(LEASE).unwrap()?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    }

    fn cached_image(&self, reference: &Reference) -> Option<Value> {
        let path = format!("{CACHED_IMAGES}/{}", reference.cached_image_name());
        self.api.get(&path).unwrap()
    }

    fn manifest_status(&self, reference: &Reference, digest: &str) -> u16 {
        let repo = reference.proxy_repository().unwrap();
        self.cache
            .request(
                "GET",
                &format!("/v2/{repo}/manifests/{digest}"),
                &[("Accept", MANIFEST_ACCEPT)],
            )
            .unwrap()
            .status
    }
}

fn pod(name: &str, images: &[&str]) -> Value {
    let annotation: serde_json::Map<String, Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| (format!("c{i}"), json!(image)))
        .collect();
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let rewritten = Reference::parse(image)
                .unwrap()
                .rewrite("localhost:7439")
                .unwrap();
            json!({"name": format!("c{i}"), "image": rewritten})
        })
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"larder.dev/managed": "true"},
            "annotations": {"larder.dev/original-images": Value::Object(annotation).to_string()}
        },
        "spec": {"containers": containers}
    })
}

#[test]
fn controller_binary_caches_expires_and_fails_over_against_the_fake_api_server() {
    let setup = Setup::start(&[LEASE_NS, APPS_NS]);
    let origin = &setup.origin;

    // Two images sharing a layer (the second copy mounts it).
    let mut pushed = Vec::new();
    for (repo, seed) in [("app/one", 1), ("app/two", 2)] {
        let image = ImageBuilder::new()
            .seeded_layer(256 << 10, 7)
            .seeded_layer(64 << 10, seed)
            .build()
            .unwrap();
        let p = origin.push_image(&image, repo, "v1").unwrap();
        let reference = Reference::parse(&format!("{}/{repo}:v1", origin.host_port())).unwrap();
        pushed.push((reference, p.digest));
    }
    let images: Vec<String> = pushed.iter().map(|(r, _)| r.to_string()).collect();

    let mut first = setup.controller("replica-a");
    wait_for(
        "replica-a to take the lease",
        Duration::from_secs(30),
        || (setup.holder().as_deref() == Some("replica-a")).then_some(()),
    );
    let pods = format!("/api/v1/namespaces/{APPS_NS}/pods");
    setup.api.create(&pods, pod("web", &[&images[0]])).unwrap();
    setup
        .api
        .create(&pods, pod("worker", &[&images[0], &images[1]]))
        .unwrap();

    for ((reference, digest), users) in pushed.iter().zip([2, 1]) {
        let ci = wait_for(
            &format!("{reference} Ready with usedBy.count {users}"),
            Duration::from_secs(90),
            || {
                let ci = setup.cached_image(reference)?;
                let status = &ci["status"];
                (status["phase"] == "Ready" && status["usedBy"]["count"] == users).then_some(ci)
            },
        );
        assert_eq!(ci["spec"]["sourceImage"], reference.to_string());
        assert_eq!(ci["status"]["digest"].as_str(), Some(digest.as_str()));
        assert_eq!(ci["metadata"]["finalizers"], json!(["larder.dev/cleanup"]));
        assert_eq!(
            setup.manifest_status(reference, digest),
            200,
            "{reference} is in the cache registry"
        );
    }

    // A second replica waits while the first renews.
    let mut second = setup.controller("replica-b");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        setup.holder().as_deref(),
        Some("replica-a"),
        "the follower waits"
    );
    assert!(
        second.try_exit_status().unwrap().is_none(),
        "the follower keeps running"
    );

    // SIGKILL the leader (by PID): the follower takes over once the lease runs out.
    let killed = Instant::now();
    first.stop().unwrap();
    wait_for("replica-b to take over", Duration::from_secs(20), || {
        (setup.holder().as_deref() == Some("replica-b")).then_some(())
    });
    let takeover = killed.elapsed();
    eprintln!("replica-b took over {takeover:?} after replica-a was killed");
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );

    // The new leader expires what the pods no longer use and removes it from the cache registry.
    setup.api.delete(&format!("{pods}/worker")).unwrap();
    setup.api.delete(&format!("{pods}/web")).unwrap();
    for (reference, digest) in &pushed {
        wait_for(
            &format!("{reference} to expire and be deleted"),
            Duration::from_secs(90),
            || setup.cached_image(reference).is_none().then_some(()),
        );
        assert_eq!(
            setup.manifest_status(reference, digest),
            404,
            "{reference} left the cache registry"
        );
    }
    assert!(
        second.try_exit_status().unwrap().is_none(),
        "{}",
        second.stderr_tail()
    );
    second.stop().unwrap();
}

/// PATCH requests to `cachedimages/status` the fake API server has answered so far.
fn status_patches(api: &FakeApiServer) -> u64 {
    api.store().stats()["requests"]["patch cachedimages/status"]
        .as_u64()
        .unwrap_or(0)
}

/// Issue #14: an image the origin does not have, and one of a registry nobody answers for,
/// must cost a few requests a minute, not a hot loop, also once their pod is gone. (They cost
/// the origin ~1,000 manifest GETs and the API server ~300 status writes per 15 s: each status
/// write woke the reconciler, which copied again at once.)
#[test]
fn failing_images_cost_origin_and_api_server_a_bounded_number_of_requests() {
    let setup = Setup::start(&[LEASE_NS, APPS_NS]);
    let origin = &setup.origin;
    let missing = Reference::parse(&format!("{}/app/missing:v1", origin.host_port())).unwrap();
    let port = larder_testkit::ports::free_port().unwrap();
    let unreachable = Reference::parse(&format!("127.0.0.1:{port}/app/gone:v1")).unwrap();
    let mut controller = setup.controller_with_retention("replica-a", "1h");
    let pods = format!("/api/v1/namespaces/{APPS_NS}/pods");
    setup
        .api
        .create(
            &pods,
            pod("ghost", &[&missing.to_string(), &unreachable.to_string()]),
        )
        .unwrap();
    for (reference, reason) in [(&missing, "NotFound"), (&unreachable, "OriginUnreachable")] {
        let ci = wait_for(
            &format!("{reference} Failed"),
            Duration::from_secs(60),
            || {
                let ci = setup.cached_image(reference)?;
                (ci["status"]["phase"] == "Failed" && ci["status"]["failures"] == 1).then_some(ci)
            },
        );
        assert_eq!(ci["status"]["conditions"][0]["reason"], reason, "{ci}");
        assert!(ci["status"]["retryAt"].is_string(), "{ci}");
    }
    let manifest_path = format!("/v2/{}/manifests/v1", missing.repository());
    let origin_requests = |mark| {
        setup
            .origin
            .requests_since(mark)
            .iter()
            .filter(|r| r.path == manifest_path)
            .count()
    };
    let mark = setup.origin.request_mark();
    let patches = status_patches(&setup.api);
    let started = Instant::now();

    // The pod goes: the usage pass writes both objects' usage, which wakes the reconciler, which
    // must wait for each image's retry time.
    setup.api.delete(&format!("{pods}/ghost")).unwrap();
    for reference in [&missing, &unreachable] {
        wait_for(
            &format!("{reference} unused, its pod list cleared"),
            Duration::from_secs(20),
            || {
                let ci = setup.cached_image(reference)?;
                (ci["status"]["usedBy"] == json!({"count": 0, "pods": []})).then_some(())
            },
        );
    }
    std::thread::sleep(Duration::from_secs(8).saturating_sub(started.elapsed()));
    let window = started.elapsed();
    let origin_gets = origin_requests(mark);
    let writes = status_patches(&setup.api) - patches;
    eprintln!(
        "in {window:?} after both images failed: {origin_gets} manifest requests to the origin, \
         {writes} status writes"
    );
    // Not found waits the longest backoff step (30 min): nothing in this window.
    assert_eq!(origin_gets, 0, "manifest requests for {missing}");
    // The usage pass's two writes, and at most one retry of the unreachable image (10-12 s
    // after its first failure) per object.
    assert!(writes <= 4, "{writes} status writes in {window:?}");
    for reference in [&missing, &unreachable] {
        let ci = setup.cached_image(reference).unwrap();
        assert_eq!(ci["status"]["phase"], "Failed", "{ci}");
    }
    assert!(
        controller.try_exit_status().unwrap().is_none(),
        "{}",
        controller.stderr_tail()
    );
    controller.stop().unwrap();
}

impl Setup {
    /// Runs `larder precache ARGS…` against the fake API server; its stdout.
    fn precache_cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.larder);
        cmd.arg("precache")
            .args(args)
            .env("KUBECONFIG", self.api.kubeconfig_path());
        let out = run_checked(cmd, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("larder precache {args:?}: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn object(&self, path: &str) -> Option<Value> {
        self.api.get(path).unwrap()
    }
}

const PRECACHES: &str = "/apis/larder.dev/v1alpha1/precaches";
const NODE_CACHES: &str = "/apis/larder.dev/v1alpha1/nodecaches";

fn node(name: &str, pool: &str, arch: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"pool": pool}},
        "status": {"nodeInfo": {
            "architecture": arch, "operatingSystem": "linux", "bootID": "", "containerRuntimeVersion": "",
            "kernelVersion": "", "kubeProxyVersion": "", "kubeletVersion": "", "machineID": "",
            "osImage": "", "systemUUID": ""
        }}
    })
}

#[test]
fn precache_retains_images_fills_node_caches_and_releases_them_through_the_cli() {
    let setup = Setup::start(&[LEASE_NS]);
    let (api, origin) = (&setup.api, &setup.origin);
    for (name, pool, arch) in [("gpu-1", "gpu", "arm64"), ("cpu-1", "cpu", "amd64")] {
        // As a kubelet does: the object, then its status through the subresource (a create
        // ignores status, as the real apiserver's does).
        let n = node(name, pool, arch);
        api.create("/api/v1/nodes", n.clone()).unwrap();
        api.merge_patch(
            &format!("/api/v1/nodes/{name}/status"),
            &json!({"status": n["status"]}),
        )
        .unwrap();
        let stored = api.get(&format!("/api/v1/nodes/{name}")).unwrap().unwrap();
        assert_eq!(
            stored["status"]["nodeInfo"]["architecture"], arch,
            "{stored}"
        );
    }
    let mut pushed = Vec::new();
    for (repo, seed) in [("base/one", 11), ("base/two", 12)] {
        let image = ImageBuilder::new()
            .seeded_layer(64 << 10, seed)
            .build()
            .unwrap();
        let p = origin.push_image(&image, repo, "v1").unwrap();
        let reference = Reference::parse(&format!("{}/{repo}:v1", origin.host_port())).unwrap();
        pushed.push((reference, p.digest));
    }
    let images: Vec<String> = pushed.iter().map(|(r, _)| r.to_string()).collect();
    let mut controller = setup.controller("replica-a");

    // Bad input is refused before anything is sent.
    let mut bad = Command::new(&setup.larder);
    bad.args(["precache", "add", "warm", "Not A Ref"])
        .env("KUBECONFIG", setup.api.kubeconfig_path());
    assert!(run_checked(bad, Duration::from_secs(60)).is_err());

    let out = setup.precache_cli(&[
        "add",
        "warm",
        &images[0],
        &images[1],
        "--node-selector",
        "pool=gpu",
        "--max-per-node",
        "3",
    ]);
    assert!(out.contains("precache/warm applied"), "{out}");

    // Cluster level: retained, labelled CachedImages, copied into the cache registry.
    for (reference, digest) in &pushed {
        let ci = wait_for(
            &format!("{reference} Ready"),
            Duration::from_secs(90),
            || {
                let ci = setup.cached_image(reference)?;
                (ci["status"]["phase"] == "Ready").then_some(ci)
            },
        );
        assert_eq!(ci["spec"]["retain"], true);
        assert_eq!(ci["metadata"]["labels"]["larder.dev/precached"], "true");
        assert_eq!(setup.manifest_status(reference, digest), 200);
    }
    // Node level: only the selected node gets a NodeCache, with its platform and the digests.
    let nc = wait_for(
        "NodeCache gpu-1 with digests",
        Duration::from_secs(30),
        || {
            let nc = setup.object(&format!("{NODE_CACHES}/gpu-1"))?;
            let images = nc["spec"]["images"].as_array()?;
            (images.len() == 2 && images.iter().all(|i| i["digest"].is_string())).then_some(nc)
        },
    );
    assert_eq!(nc["spec"]["platform"], "linux/arm64/v8");
    assert_eq!(nc["spec"]["maxConcurrent"], 3);
    assert_eq!(nc["metadata"]["ownerReferences"][0]["kind"], "Node");
    let digests: Vec<&str> = nc["spec"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["digest"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = pushed.iter().map(|(_, d)| d.as_str()).collect();
    expected.sort_unstable();
    let mut got = digests.clone();
    got.sort_unstable();
    assert_eq!(got, expected);
    assert!(setup.object(&format!("{NODE_CACHES}/cpu-1")).is_none());
    wait_for(
        "Precache status 2/2 images, 0/1 nodes",
        Duration::from_secs(30),
        || {
            let pc = setup.object(&format!("{PRECACHES}/warm"))?;
            (pc["status"]["imagesSummary"] == "2/2" && pc["status"]["nodesSummary"] == "0/1")
                .then_some(())
        },
    );

    // The node's proxy (the real binary, as the DaemonSet runs it on gpu-1) prefetches both
    // images into its disk tier and reports them on its NodeCache: the Precache is Ready.
    let disk = tempfile::tempdir().unwrap();
    let mut proxy_cmd = Command::new(&setup.larder);
    proxy_cmd
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--disk-cache",
            disk.path().to_str().unwrap(),
            "--cache-registry",
            &setup.cache.url(),
            "--insecure-registry",
            &setup.origin.host_port(),
            "--node-name",
            "gpu-1",
        ])
        .env("KUBECONFIG", setup.api.kubeconfig_path());
    let mut node_proxy = ChildGuard::spawn(
        "larder proxy gpu-1",
        proxy_cmd,
        &setup.logs.path().join("proxy.out"),
        &setup.logs.path().join("proxy.err"),
    )
    .expect("larder proxy starts");
    let pc = wait_for("Precache Ready", Duration::from_secs(30), || {
        let pc = setup.object(&format!("{PRECACHES}/warm"))?;
        let ready = pc["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ready.then_some(pc)
    });
    assert_eq!(pc["status"]["nodes"][0]["node"], "gpu-1");
    let nc = setup.object(&format!("{NODE_CACHES}/gpu-1")).unwrap();
    let expected_bytes: u64 = nc["status"]["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["phase"], "Ready", "{i}");
            i["sizeBytes"].as_u64().unwrap()
        })
        .sum();
    assert!(
        expected_bytes > 128 << 10,
        "both images' layers counted: {expected_bytes}"
    );
    assert_eq!(pc["status"]["nodes"][0]["bytesDone"], expected_bytes);
    // Every layer is on the node's disk, from the cache registry: the origin saw no blob GET
    // from the proxy.
    let origin_blob_gets_by_proxy = setup
        .origin
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET" && r.path.contains("/blobs/") && r.user_agent.contains("larder-proxy")
        })
        .count();
    assert_eq!(
        origin_blob_gets_by_proxy, 0,
        "the proxy read blobs from the cache registry"
    );
    let cache_blob_gets_by_proxy = setup
        .cache
        .requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET" && r.path.contains("/blobs/") && r.user_agent.contains("larder-proxy")
        })
        .count();
    assert!(
        cache_blob_gets_by_proxy >= 4,
        "config and layer of each image: {cache_blob_gets_by_proxy}"
    );
    let list = setup.precache_cli(&["list"]);
    assert!(
        list.contains("warm") && list.contains("2/2") && list.contains("1/1"),
        "{list}"
    );
    let info = setup.precache_cli(&["info", "warm"]);
    assert!(info.contains("gpu-1") && info.contains("Ready"), "{info}");

    // An image leaves the list: released to normal retention (3 s, no pod uses it) and deleted.
    setup.precache_cli(&["add", "warm", &images[0], "--node-selector", "pool=gpu"]);
    wait_for(
        &format!("{} released and expired", pushed[1].0),
        Duration::from_secs(60),
        || setup.cached_image(&pushed[1].0).is_none().then_some(()),
    );
    wait_for(
        "NodeCache gpu-1 down to one image",
        Duration::from_secs(30),
        || {
            let nc = setup.object(&format!("{NODE_CACHES}/gpu-1"))?;
            (nc["spec"]["images"].as_array()?.len() == 1).then_some(())
        },
    );
    let kept = setup.cached_image(&pushed[0].0).unwrap();
    assert_eq!(
        kept["spec"]["retain"], true,
        "the listed image stays retained"
    );

    // The Precache goes: its NodeCache goes, its image is released.
    let out = setup.precache_cli(&["delete", "warm"]);
    assert!(out.contains("deleted"), "{out}");
    wait_for("NodeCache gpu-1 deleted", Duration::from_secs(30), || {
        setup
            .object(&format!("{NODE_CACHES}/gpu-1"))
            .is_none()
            .then_some(())
    });
    wait_for(
        &format!("{} released", pushed[0].0),
        Duration::from_secs(60),
        || setup.cached_image(&pushed[0].0).is_none().then_some(()),
    );
    assert!(
        controller.try_exit_status().unwrap().is_none(),
        "{}",
        controller.stderr_tail()
    );
    assert!(
        node_proxy.try_exit_status().unwrap().is_none(),
        "{}",
        node_proxy.stderr_tail()
    );
    node_proxy.stop().unwrap();
    controller.stop().unwrap();
}

const NODES: &str = "/api/v1/nodes";
const TAINT: &str = "larder.dev/precache-pending";

/// A node in `pool`, registered with `taints` and then Ready (as a kubelet does: the object,
/// then its status through the subresource).
fn register_node(api: &FakeApiServer, name: &str, pool: &str, taints: Value) {
    let mut n = node(name, pool, "amd64");
    n["spec"] = json!({"taints": taints});
    api.create(NODES, n.clone()).unwrap();
    let mut status = n["status"].clone();
    status["conditions"] = json!([{
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "lastHeartbeatTime": "2026-12-06T00:00:00Z",
        "lastTransitionTime": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    }]);
    api.merge_patch(
        &format!("{NODES}/{name}/status"),
        &json!({"status": status}),
    )
    .unwrap();
}

fn taint_keys(node: &Value) -> Vec<String> {
    node["spec"]["taints"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| t["key"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The readiness gate with the real controller binary: a node registered with the startup
/// taint keeps it while one of its gating Precache's images is missing and loses it as soon as
/// the last one is Ready on its NodeCache (an Event and `status.gate` say so); a node whose
/// images never arrive loses it at the Precache's timeout, with a Warning Event and the timeout
/// counter; a tainted node no gating Precache selects is never written.
#[test]
fn readiness_gate_removes_the_taint_when_the_last_image_lands_or_at_the_timeout() {
    let setup = Setup::start(&[LEASE_NS]);
    let (api, origin) = (&setup.api, &setup.origin);
    let pending = json!({"key": TAINT, "effect": "NoSchedule"});
    let other = json!({"key": "example.com/other", "value": "x", "effect": "NoSchedule"});
    register_node(api, "gpu-1", "gpu", json!([other, pending]));
    register_node(api, "slow-1", "slow", json!([pending]));
    register_node(api, "cpu-1", "cpu", json!([pending]));
    let untouched_rv =
        api.get(&format!("{NODES}/cpu-1")).unwrap().unwrap()["metadata"]["resourceVersion"].clone();
    let host = origin.host_port();
    let (one, two, never) = (
        format!("{host}/gate/one:v1"),
        format!("{host}/gate/two:v1"),
        format!("{host}/gate/never:v1"),
    );
    let gating = |name: &str, images: &[&str], pool: &str, timeout: u32| {
        json!({
            "apiVersion": "larder.dev/v1alpha1", "kind": "Precache",
            "metadata": {"name": name},
            "spec": {"images": images, "nodeSelector": {"pool": pool},
                     "readinessGate": {"timeoutSeconds": timeout}}
        })
    };
    api.create(PRECACHES, gating("base", &[&one, &two], "gpu", 600))
        .unwrap();
    let metrics_addr = larder_testkit::ports::free_addr().unwrap().to_string();
    let mut controller = setup.controller_with(
        "replica-a",
        "1h",
        &["--readiness-gate", "--metrics-listen", &metrics_addr],
    );

    // gpu-1: held while its NodeCache lacks an image.
    let nc_path = format!("{NODE_CACHES}/gpu-1");
    let nc = wait_for("NodeCache gpu-1", Duration::from_secs(30), || {
        let nc = setup.object(&nc_path)?;
        (nc["spec"]["images"].as_array()?.len() == 2).then_some(nc)
    });
    let generation = nc["metadata"]["generation"].as_i64().unwrap();
    let image_status = |image: &str, phase: &str| {
        let r = Reference::parse(image).unwrap().to_string();
        json!({"image": r, "phase": phase, "bytesDone": 10, "sizeBytes": 10})
    };
    // As the node's proxy writes it: a merge patch of its own fields.
    let report = |images: Value, ready: u32| {
        setup
            .api
            .merge_patch(
                &format!("{nc_path}/status"),
                &json!({"status": {
                    "observedGeneration": generation, "observedEpoch": 0,
                    "images": images, "imagesReady": ready, "bytesDone": 20,
                    "updated": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
                }}),
            )
            .unwrap();
    };
    report(
        json!([image_status(&one, "Ready"), image_status(&two, "Caching")]),
        1,
    );
    let holding = wait_for("gpu-1 Holding", Duration::from_secs(30), || {
        let nc = setup.object(&nc_path)?;
        (nc["status"]["gate"]["state"] == "Holding").then_some(nc)
    });
    assert_eq!(holding["status"]["gate"]["precaches"], json!(["base"]));
    // Three passes later the taint is still there.
    std::thread::sleep(Duration::from_secs(6));
    let node = setup.object(&format!("{NODES}/gpu-1")).unwrap();
    assert_eq!(taint_keys(&node), ["example.com/other", TAINT], "{node}");

    // The last image lands: the taint goes at the next pass, the other taint stays.
    report(
        json!([image_status(&one, "Ready"), image_status(&two, "Ready")]),
        2,
    );
    let landed = Instant::now();
    let node = wait_for("gpu-1 released", Duration::from_secs(15), || {
        let node = setup.object(&format!("{NODES}/gpu-1"))?;
        (!taint_keys(&node).contains(&TAINT.to_owned())).then_some(node)
    });
    let released_after = landed.elapsed();
    assert!(
        released_after < Duration::from_secs(6),
        "released {released_after:?} after the last image"
    );
    assert_eq!(node["spec"]["taints"], json!([other]), "only ours removed");
    assert_eq!(node["metadata"]["labels"], json!({"pool": "gpu"}));
    let nc = wait_for("gpu-1 gate Complete", Duration::from_secs(15), || {
        let nc = setup.object(&nc_path)?;
        (nc["status"]["gate"]["state"] == "Complete").then_some(nc)
    });
    assert_eq!(nc["status"]["imagesReady"], 2, "the proxy's fields kept");

    // slow-1: its image never arrives; the taint goes at the Precache's 8 s timeout.
    let created = Instant::now();
    setup
        .api
        .create(PRECACHES, gating("slow", &[&never], "slow", 8))
        .unwrap();
    wait_for("slow-1 Holding", Duration::from_secs(15), || {
        let nc = setup.object(&format!("{NODE_CACHES}/slow-1"))?;
        (nc["status"]["gate"]["state"] == "Holding").then_some(())
    });
    assert!(
        taint_keys(&setup.object(&format!("{NODES}/slow-1")).unwrap()).contains(&TAINT.to_owned())
    );
    wait_for(
        "slow-1 released at the timeout",
        Duration::from_secs(30),
        || {
            let node = setup.object(&format!("{NODES}/slow-1"))?;
            (!taint_keys(&node).contains(&TAINT.to_owned())).then_some(())
        },
    );
    let waited = created.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(16),
        "released {waited:?} after the Precache was created (timeout 8 s)"
    );
    let nc = wait_for("slow-1 gate TimedOut", Duration::from_secs(15), || {
        let nc = setup.object(&format!("{NODE_CACHES}/slow-1"))?;
        (nc["status"]["gate"]["state"] == "TimedOut").then_some(nc)
    });
    assert!(
        nc["status"]["gate"]["message"]
            .as_str()
            .unwrap()
            .contains("gate/never"),
        "{nc}"
    );

    // Events on both nodes: Normal for the complete one, Warning for the timeout.
    let events = wait_for("two gate Events", Duration::from_secs(15), || {
        let mut all = setup
            .api
            .list("/apis/events.k8s.io/v1/namespaces/default/events")
            .unwrap();
        all.extend(setup.api.list("/api/v1/namespaces/default/events").unwrap());
        let gate: Vec<Value> = all
            .into_iter()
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("PrecacheGate"))
            })
            .collect();
        (gate.len() >= 2).then_some(gate)
    });
    let find = |reason: &str| {
        events
            .iter()
            .find(|e| e["reason"] == reason)
            .unwrap_or_else(|| panic!("{reason} in {events:?}"))
    };
    let complete = find("PrecacheGateComplete");
    assert_eq!(complete["type"], "Normal");
    assert_eq!(complete["regarding"]["name"], "gpu-1");
    let timed_out = find("PrecacheGateTimedOut");
    assert_eq!(timed_out["type"], "Warning");
    assert_eq!(timed_out["regarding"]["name"], "slow-1");

    // cpu-1 carries the taint but no gating Precache selects it: never written.
    let cpu = setup.object(&format!("{NODES}/cpu-1")).unwrap();
    assert_eq!(cpu["metadata"]["resourceVersion"], untouched_rv);
    assert_eq!(taint_keys(&cpu), [TAINT]);

    let metrics = larder_testkit::http::get(&format!("http://{metrics_addr}/metrics"), &[])
        .expect("controller metrics")
        .text();
    for series in [
        "larder_controller_gate_timeouts_total 1",
        "larder_controller_gate_wait_seconds_count 2",
        "larder_controller_gated_nodes 0",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
    assert!(
        controller.try_exit_status().unwrap().is_none(),
        "{}",
        controller.stderr_tail()
    );
    controller.stop().unwrap();
}

/// `larder uninstall --release-gate-taints` (helm uninstall's hook with the gate on) releases
/// every node still held: it removes only the gate's taint, keeps the others, and leaves a
/// node without it untouched (same resourceVersion); and it releases larder's finalizer from a
/// CachedImage, keeping another's (both go through the same guarded patch).
#[test]
fn uninstall_releases_every_node_the_gate_still_holds() {
    let api = FakeApiServer::start(FakeOptions::default()).expect("fake API server");
    api.install_larder_crds().expect("larder's CRDs");
    let gate = json!({"key": TAINT, "effect": "NoSchedule"});
    let other = json!({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"});
    register_node(&api, "held-1", "gpu", json!([other.clone(), gate.clone()]));
    register_node(&api, "held-2", "cpu", json!([gate]));
    register_node(&api, "free", "cpu", json!([other]));
    let free_before = api.get(&format!("{NODES}/free")).unwrap().unwrap();
    api.create(
        CACHED_IMAGES,
        json!({
            "apiVersion": "larder.dev/v1alpha1", "kind": "CachedImage",
            "metadata": {"name": "held", "finalizers": ["other.io/keep", "larder.dev/cleanup"]},
            "spec": {"sourceImage": "registry.example/app:v1"}
        }),
    )
    .unwrap();

    let mut cmd = Command::new(larder_binary().expect("the larder binary"));
    cmd.args([
        "uninstall",
        "--namespace",
        LEASE_NS,
        "--release-gate-taints",
    ])
    .env("KUBECONFIG", api.kubeconfig_path());
    run_checked(cmd, Duration::from_secs(60)).expect("larder uninstall");

    let node = |name: &str| api.get(&format!("{NODES}/{name}")).unwrap().unwrap();
    assert_eq!(taint_keys(&node("held-1")), ["dedicated"]);
    assert_eq!(taint_keys(&node("held-2")), Vec::<String>::new());
    let ci = api.get(&format!("{CACHED_IMAGES}/held")).unwrap().unwrap();
    assert_eq!(ci["metadata"]["finalizers"], json!(["other.io/keep"]));
    let free = node("free");
    assert_eq!(taint_keys(&free), ["dedicated"]);
    assert_eq!(
        free["metadata"]["resourceVersion"],
        free_before["metadata"]["resourceVersion"]
    );

    // Without the flag (the gate off) no node is written.
    register_node(
        &api,
        "held-3",
        "cpu",
        json!([{"key": TAINT, "effect": "NoSchedule"}]),
    );
    let mut cmd = Command::new(larder_binary().expect("the larder binary"));
    cmd.args(["uninstall", "--namespace", LEASE_NS])
        .env("KUBECONFIG", api.kubeconfig_path());
    run_checked(cmd, Duration::from_secs(60)).expect("larder uninstall");
    assert_eq!(taint_keys(&node("held-3")), [TAINT]);
}
