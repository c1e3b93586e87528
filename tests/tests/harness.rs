//! Exercises the harness itself against the real tools: distribution registries (plain, pull-through,
//! basic auth), skopeo and, where possible, containerd.

use std::time::Duration;

use larder_testkit::{
    Containerd, Credentials, CtrPullOptions, HarnessError, ImageBuilder, IndexBuilder, LayerSpec,
    Platform, Registry, RegistryOptions, SkopeoPullOptions, pull_with_skopeo,
    pull_with_skopeo_async, pull_with_skopeo_opts, skip_on_skipped, write_hosts_toml,
};

const MIB: usize = 1 << 20;
const KIB: usize = 1 << 10;
const LOG_WAIT: Duration = Duration::from_secs(5);

fn amd64() -> Platform {
    Platform::linux("amd64")
}

fn arm64() -> Platform {
    Platform::linux("arm64")
}

#[test]
fn pushed_images_read_back_with_the_built_digests_and_sizes() {
    let registry = Registry::start(RegistryOptions::default()).expect("registry starts");
    assert_eq!(
        registry.host_port(),
        format!("127.0.0.1:{}", registry.addr().port())
    );
    assert!(registry.storage_dir().is_dir());

    let single = ImageBuilder::new()
        .random_layer(MIB)
        .random_layer(300 * KIB)
        .build()
        .expect("single-platform image builds");
    // The two platforms share their bottom layer (same seed and size), like real multi-arch images
    // share e.g. a data layer.
    let index = IndexBuilder::new()
        .image(
            ImageBuilder::new()
                .platform(amd64())
                .seeded_layer(64 * KIB, 42)
                .random_layer(32 * KIB),
        )
        .image(
            ImageBuilder::new()
                .platform(arm64())
                .seeded_layer(64 * KIB, 42)
                .random_layer(16 * KIB),
        )
        .build()
        .expect("index builds");
    assert_eq!(
        index.manifests[0].layers[0].blob.digest,
        index.manifests[1].layers[0].blob.digest
    );
    assert_eq!(index.blobs().len(), 5, "2 configs + 3 distinct layers");

    let pushed_single = registry
        .push_image(&single, "library/single", "v1")
        .expect("single pushes");
    assert_eq!(pushed_single.digest, single.digest());
    assert_eq!(
        pushed_single.reference(),
        format!("{}/library/single:v1", registry.host_port())
    );
    let pushed_index = registry
        .push_image(&index, "library/multi", "v1")
        .expect("index pushes");
    assert_eq!(pushed_index.digest, index.digest());

    // Manifests, by tag and by digest: the exact bytes the builder made.
    let by_tag = registry
        .get_manifest("library/single", "v1")
        .expect("manifest by tag");
    assert_eq!(by_tag.docker_content_digest(), Some(single.digest()));
    assert_eq!(by_tag.body, single.top().bytes);
    assert_eq!(by_tag.header("Content-Type"), Some(single.media_type()));
    let top = registry
        .get_manifest("library/multi", "v1")
        .expect("index by tag");
    assert_eq!(top.body, index.top().bytes);
    assert_eq!(top.header("Content-Type"), Some(index.media_type()));
    for m in &index.manifests {
        let got = registry
            .get_manifest("library/multi", &m.manifest.digest)
            .expect("child manifest by digest");
        assert_eq!(got.body_digest(), m.manifest.digest);
        assert_eq!(got.body.len() as u64, m.manifest.size);
    }

    // Blobs: digests and sizes equal what the builder reported.
    for (repo, image) in [("library/single", &single), ("library/multi", &index)] {
        for blob in image.blobs() {
            let got = registry.get_blob(repo, &blob.digest).expect("blob");
            assert_eq!(got.body_digest(), blob.digest);
            assert_eq!(got.body.len() as u64, blob.size);
            assert_eq!(got.content_length(), Some(blob.size));
        }
    }
    let big = &single.manifests[0].layers[0];
    assert!(big.blob.size >= MIB as u64 && big.blob.size < MIB as u64 + 8 * KIB as u64);
    assert_eq!(big.file_size, MIB as u64);

    // The request log saw exactly one GET of the big layer (ours; skopeo pushed with HEAD/PUT).
    let big_path = format!("/v2/library/single/blobs/{}", big.blob.digest);
    let log = registry
        .wait_for_requests(LOG_WAIT, |reqs| {
            reqs.iter()
                .any(|r| r.is("GET", &big_path) && r.status == 200)
        })
        .expect("GET of the big layer is logged");
    assert_eq!(log.iter().filter(|r| r.is("GET", &big_path)).count(), 1);
    assert!(log.iter().any(|r| r.method == "PUT" && r.status == 201));
    let ours = log
        .iter()
        .find(|r| r.is("GET", &big_path))
        .expect("our GET");
    assert_eq!(ours.user_agent, "larder-testkit");
    assert_eq!(ours.bytes, Some(big.blob.size));
}

#[test]
fn skopeo_pulls_what_was_pushed() {
    let registry = Registry::start(RegistryOptions::default()).expect("registry starts");
    let index = IndexBuilder::new()
        .platforms(&[amd64(), arm64()], &[20 * KIB, 10 * KIB])
        .build()
        .expect("index builds");
    let pushed = registry
        .push_image(&index, "team/app", "1.0")
        .expect("index pushes");

    let mark = registry.request_mark();
    let out = tempfile::tempdir().expect("temp dir");
    let arm = out.path().join("arm64");
    pull_with_skopeo_opts(
        &pushed.reference(),
        &arm,
        &SkopeoPullOptions {
            override_arch: Some("arm64".to_owned()),
            ..SkopeoPullOptions::default()
        },
    )
    .expect("skopeo pulls arm64");
    let arm_image = index.manifest_for(&arm64()).expect("arm64 image");
    let manifest = std::fs::read(arm.join("manifest.json")).expect("manifest.json");
    assert_eq!(manifest, arm_image.manifest.bytes);
    for layer in &arm_image.layers {
        let file = std::fs::read(arm.join(layer.blob.hex())).expect("layer file");
        assert_eq!(larder_testkit::sha256_digest(&file), layer.blob.digest);
    }

    // The pull shows up in the request log: the arm64 manifest and each of its blobs, once.
    let since = registry
        .wait_for_requests(LOG_WAIT, |reqs| {
            arm_image.layers.iter().all(|l| {
                reqs[mark..]
                    .iter()
                    .any(|r| r.is("GET", &format!("/v2/team/app/blobs/{}", l.blob.digest)))
            })
        })
        .expect("pull logged")
        .split_off(mark);
    assert!(since.iter().any(|r| r.is(
        "GET",
        &format!("/v2/team/app/manifests/{}", arm_image.manifest.digest)
    )));
    let amd_image = index.manifest_for(&amd64()).expect("amd64 image");
    assert!(
        !since
            .iter()
            .any(|r| r.path.contains(&amd_image.layers[0].blob.digest)),
        "only the chosen platform's layers are fetched"
    );

    // By digest, default platform.
    let amd = out.path().join("amd64");
    pull_with_skopeo(&pushed.digest_reference(), &amd, None).expect("pull by digest");
    assert!(amd.join(amd_image.config.hex()).is_file());
}

#[tokio::test]
async fn skopeo_pull_from_an_async_test() {
    let registry = Registry::start(RegistryOptions::default()).expect("registry starts");
    let image = ImageBuilder::new()
        .random_layer(8 * KIB)
        .build()
        .expect("image builds");
    let pushed = registry
        .push_image(&image, "async/app", "latest")
        .expect("pushes");
    let out = tempfile::tempdir().expect("temp dir");
    pull_with_skopeo_async(
        pushed.reference(),
        out.path().join("pulled"),
        SkopeoPullOptions::default(),
    )
    .await
    .expect("async pull");
    assert!(out.path().join("pulled").join("manifest.json").is_file());
}

#[test]
fn pull_through_registry_serves_the_origin_image_and_fetches_blobs_once() {
    let origin =
        Registry::start(RegistryOptions::default().named("origin")).expect("origin starts");
    let cache = Registry::start(RegistryOptions::pull_through(origin.url()).named("cache"))
        .expect("pull-through cache starts");
    let image = ImageBuilder::new()
        .layer(LayerSpec::random(200 * KIB))
        .build()
        .expect("image builds");
    let pushed = origin
        .push_image(&image, "library/cached", "v1")
        .expect("pushes to origin");
    let mark = origin.request_mark();

    let out = tempfile::tempdir().expect("temp dir");
    let reference = cache.reference("library/cached", "v1");
    let layer = &image.manifests[0].layers[0].blob;
    let blob_path = format!("/v2/library/cached/blobs/{}", layer.digest);

    pull_with_skopeo(&reference, &out.path().join("first"), None).expect("first pull via cache");
    let origin_log = origin
        .wait_for_requests(LOG_WAIT, |reqs| {
            reqs[mark..].iter().any(|r| r.is("GET", &blob_path))
        })
        .expect("the origin served the layer to the cache");
    let origin_gets = |log: &[larder_testkit::AccessLogEntry]| {
        log[mark..]
            .iter()
            .filter(|r| r.is("GET", &blob_path))
            .count()
    };
    // distribution 2.8's pull-through cache GETs a missing blob from its remote twice: once to stream
    // to the client, once in the background to store it. larder's proxy must do better (one fetch).
    let first = origin_gets(&origin_log);
    assert!((1..=2).contains(&first), "{origin_log:?}");

    // Let the background store finish, then pull again: served from the cache's storage alone.
    cache
        .wait_for_requests(LOG_WAIT, |reqs| {
            reqs.iter().any(|r| r.is("GET", &blob_path))
        })
        .expect("cache served the layer");
    std::thread::sleep(Duration::from_millis(300));
    let settled = origin_gets(&origin.requests());
    pull_with_skopeo(&reference, &out.path().join("second"), None).expect("second pull via cache");
    cache
        .wait_for_requests(LOG_WAIT, |reqs| {
            reqs.iter().filter(|r| r.is("GET", &blob_path)).count() == 2
        })
        .expect("cache served the layer twice");
    assert_eq!(
        origin_gets(&origin.requests()),
        settled,
        "the second pull's layer came from the cache, not the origin"
    );
    let served = cache
        .get_manifest("library/cached", "v1")
        .expect("cache serves the manifest");
    assert_eq!(served.docker_content_digest(), Some(pushed.digest.as_str()));
}

#[test]
fn basic_auth_registry_refuses_anonymous_and_accepts_the_user() {
    let registry =
        Registry::start(RegistryOptions::basic_auth("alice", "s3cret")).expect("registry starts");
    let anonymous = larder_testkit::http::get(&format!("{}/v2/", registry.url()), &[])
        .expect("anonymous request answered");
    assert_eq!(anonymous.status, 401);
    assert!(
        anonymous
            .header("WWW-Authenticate")
            .is_some_and(|h| h.starts_with("Basic"))
    );
    let wrong = Credentials::new("alice", "wrong");
    let refused = larder_testkit::http::get(
        &format!("{}/v2/", registry.url()),
        &[("Authorization", &wrong.basic_auth_header())],
    )
    .expect("wrong-password request answered");
    assert_eq!(refused.status, 401);
    let ok = registry
        .request("GET", "/v2/", &[])
        .expect("authorised request");
    assert_eq!(ok.status, 200);

    let image = ImageBuilder::new()
        .random_layer(16 * KIB)
        .build()
        .expect("image builds");
    let pushed = registry
        .push_image(&image, "private/app", "v1")
        .expect("push with credentials");

    let out = tempfile::tempdir().expect("temp dir");
    let err = pull_with_skopeo(&pushed.reference(), &out.path().join("anon"), None)
        .expect_err("anonymous pull is refused");
    assert!(matches!(err, HarnessError::CommandFailed { .. }), "{err}");
    pull_with_skopeo(
        &pushed.reference(),
        &out.path().join("alice"),
        registry.credentials(),
    )
    .expect("pull with credentials");
}

#[test]
fn restart_keeps_port_and_storage() {
    let mut registry = Registry::start(RegistryOptions::default()).expect("registry starts");
    let image = ImageBuilder::new()
        .random_layer(4 * KIB)
        .build()
        .expect("image builds");
    registry
        .push_image(&image, "library/durable", "v1")
        .expect("pushes");
    let addr = registry.addr();

    registry.stop().expect("stops");
    assert!(!registry.is_running());
    assert!(
        registry.request("GET", "/v2/", &[]).is_err(),
        "origin is down"
    );

    registry.restart().expect("restarts");
    assert_eq!(registry.addr(), addr);
    let got = registry
        .get_manifest("library/durable", "v1")
        .expect("manifest survives");
    assert_eq!(got.docker_content_digest(), Some(image.digest()));
}

#[test]
fn an_occupied_fixed_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = Registry::start(RegistryOptions {
        addr: Some(addr),
        ..RegistryOptions::default()
    })
    .expect_err("the port is taken");
    match err {
        HarnessError::ProcessExited { stderr_tail, .. } => {
            assert!(
                stderr_tail.contains("address already in use"),
                "{stderr_tail}"
            );
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn extra_yaml_is_merged_into_the_config() {
    let registry = Registry::start(
        RegistryOptions::default()
            .with_extra_yaml("log: {level: debug}\nhttp: {headers: {X-Larder-Test: [yes]}}"),
    )
    .expect("registry starts");
    let config = std::fs::read_to_string(registry.config_path()).expect("config");
    assert!(config.contains("level: debug"), "{config}");
    assert!(config.contains("accesslog"), "{config}");
    let resp = registry.request("GET", "/v2/", &[]).expect("answers");
    assert_eq!(resp.header("X-Larder-Test"), Some("yes"));
}

#[test]
fn containerd_pulls_directly_and_through_a_mirror() {
    let containerd = skip_on_skipped!(Containerd::start());
    let origin =
        Registry::start(RegistryOptions::default().named("origin")).expect("origin starts");
    let mirror = Registry::start(RegistryOptions::pull_through(origin.url()).named("mirror"))
        .expect("mirror starts");
    let image = ImageBuilder::new()
        .random_layer(32 * KIB)
        .build()
        .expect("image builds");
    let direct = origin
        .push_image(&image, "library/ctr", "v1")
        .expect("pushes");
    // A different image, so containerd cannot reuse content it already holds.
    let other = ImageBuilder::new()
        .random_layer(16 * KIB)
        .build()
        .expect("image builds");
    let mirrored = origin
        .push_image(&other, "library/ctr", "v2")
        .expect("pushes");

    containerd
        .pull(&direct.reference(), &CtrPullOptions::default())
        .expect("ctr pulls from the origin");

    let hosts = tempfile::tempdir().expect("temp dir");
    write_hosts_toml(
        hosts.path(),
        &origin.host_port(),
        &origin.url(),
        &[&mirror.url()],
    )
    .expect("hosts.toml");
    containerd
        .pull(
            &mirrored.reference(),
            &CtrPullOptions {
                hosts_dir: Some(hosts.path().to_owned()),
                ..CtrPullOptions::default()
            },
        )
        .expect("ctr pulls through the mirror");
    // containerd adds ?ns=<origin host> to mirror requests; the mirror served manifest and layer.
    let layer_path = format!(
        "/v2/library/ctr/blobs/{}",
        other.manifests[0].layers[0].blob.digest
    );
    mirror
        .wait_for_requests(LOG_WAIT, |reqs| {
            reqs.iter().any(|r| {
                r.method == "GET" && r.path.starts_with(&layer_path) && r.path.contains("?ns=")
            })
        })
        .expect("the mirror served the pull");

    let images = containerd.images().expect("ctr image ls");
    assert!(images.contains(&direct.reference()), "{images:?}");
    assert!(images.contains(&mirrored.reference()), "{images:?}");
}
