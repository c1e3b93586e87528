//! The NodeCache agent against a mock apiserver (tower-test): what it reads, what it writes and
//! when. The image is put on the proxy's disk tier first, so the prefetch itself needs no
//! registry and every request the agent makes is one the mock sees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use larder_core::digest::Digest;
use larder_proxy::state::ProxyState;
use larder_proxy::{ProxyArgs, RunningProxy};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, watch};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const NODE: &str = "node-1";
const IMAGE: &str = "registry.test/team/app:v1";
const LIST: &str = "/apis/larder.dev/v1alpha1/nodecaches";
const STATUS: &str = "/apis/larder.dev/v1alpha1/nodecaches/node-1/status";

/// One request the agent made.
#[derive(Debug, Clone)]
enum Call {
    List,
    Watch,
    /// The content type and the JSON body of a status patch.
    Patch(String, Value),
    Other(Method, String),
}

/// How the mock apiserver answers.
#[derive(Clone)]
struct Script {
    /// The NodeCache the LIST returns (`None`: an empty list).
    object: Arc<Mutex<Option<Value>>>,
    /// LIST answers 404 (the CRD is not installed).
    list_404: bool,
    /// Status patches answer 500.
    patch_fails: bool,
}

/// Answers the agent's requests until the handle closes; every call is logged.
fn serve(mut handle: Handle, script: Script, mut events: mpsc::Receiver<Value>) -> Log {
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        // Watch requests are held open until an event is sent (then answered and closed, and
        // the watcher comes back with the next one).
        let (watch_tx, mut watch_rx) =
            mpsc::unbounded_channel::<tower_test::mock::SendResponse<Response<Body>>>();
        tokio::spawn(async move {
            while let Some(send) = watch_rx.recv().await {
                let Some(event) = events.recv().await else {
                    // Held forever: the test ends first.
                    std::mem::forget(send);
                    continue;
                };
                send.send_response(json_response(StatusCode::OK, &event));
            }
        });
        while let Some((request, send)) = handle.next_request().await {
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let query = request.uri().query().unwrap_or_default().to_owned();
            let content_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = request.into_body().collect_bytes().await.unwrap();
            let call = match (&method, path.as_str()) {
                (&Method::GET, LIST) if query.contains("watch=true") => Call::Watch,
                (&Method::GET, LIST) => Call::List,
                (&Method::PATCH, STATUS) => {
                    Call::Patch(content_type, serde_json::from_slice(&body).unwrap())
                }
                _ => Call::Other(method.clone(), path.clone()),
            };
            seen.lock().unwrap().push((Instant::now(), call.clone()));
            assert!(
                query.is_empty()
                    || !matches!(call, Call::List | Call::Watch)
                    || query.contains("fieldSelector=metadata.name%3Dnode-1"),
                "the agent reads only its own NodeCache: {query}"
            );
            match call {
                Call::List if script.list_404 => {
                    send.send_response(json_response(StatusCode::NOT_FOUND, &not_found()))
                }
                Call::List => {
                    let items: Vec<Value> = script.object.lock().unwrap().iter().cloned().collect();
                    let list = json!({
                        "apiVersion": "larder.dev/v1alpha1", "kind": "NodeCacheList",
                        "metadata": {"resourceVersion": "10"}, "items": items,
                    });
                    send.send_response(json_response(StatusCode::OK, &list));
                }
                Call::Watch => {
                    let _ = watch_tx.send(send);
                }
                Call::Patch(..) if script.patch_fails => send.send_response(json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": "etcd is down", "reason": "InternalError", "code": 500}),
                )),
                Call::Patch(_, patch) => {
                    let mut object = script.object.lock().unwrap().clone().unwrap_or(json!({}));
                    object["status"] = patch["status"].clone();
                    send.send_response(json_response(StatusCode::OK, &object));
                }
                Call::Other(..) => {
                    send.send_response(json_response(StatusCode::NOT_FOUND, &not_found()))
                }
            }
        }
    });
    log
}

type Log = Arc<Mutex<Vec<(Instant, Call)>>>;

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(body).unwrap()))
        .unwrap()
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "not found",
        "reason": "NotFound", "code": 404})
}

fn patches(log: &Log) -> Vec<Value> {
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|(_, c)| match c {
            Call::Patch(_, body) => Some(body.clone()),
            _ => None,
        })
        .collect()
}

fn count(log: &Log, pick: impl Fn(&Call) -> bool) -> usize {
    log.lock().unwrap().iter().filter(|(_, c)| pick(c)).count()
}

/// Waits (bounded) for a status patch, after the first `skip`, satisfying `want`; returns it.
async fn wait_patch(log: &Log, skip: usize, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(p) = patches(log).into_iter().skip(skip).find(|p| want(p)) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no status patch {what}; patches: {:#?}",
            patches(log)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy without `--node-name` (its own agent off) whose disk holds one small image.
struct Node {
    running: RunningProxy,
    _disk: tempfile::TempDir,
    manifest: Digest,
    size: u64,
}

async fn node() -> Node {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let disk = tempfile::tempdir().unwrap();
    let dir = disk.path().to_str().unwrap().to_owned();
    let args = ProxyArgs::from_args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        &dir,
    ])
    .unwrap();
    let running = larder_proxy::start(args).await.expect("proxy starts");
    let state = &running.state;
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = vec![7u8; 10_000];
    let config_digest = put_blob(state, config).await;
    let layer_digest = put_blob(state, &layer).await;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest.to_string(), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest.to_string(), "size": layer.len()}],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let digest = Digest::sha256_of(&bytes);
    state
        .disk
        .put_manifest(
            &digest,
            &bytes,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .await
        .unwrap();
    let size = (bytes.len() + config.len() + layer.len()) as u64;
    Node {
        running,
        _disk: disk,
        manifest: digest,
        size,
    }
}

async fn put_blob(state: &ProxyState, bytes: &[u8]) -> Digest {
    let digest = Digest::sha256_of(bytes);
    let mut temp = state.disk.create_temp().await.unwrap();
    temp.file().write_all(bytes).await.unwrap();
    temp.file().flush().await.unwrap();
    state
        .disk
        .commit_blob(temp, &digest, bytes.len() as u64)
        .await
        .unwrap();
    digest
}

fn nodecache(epoch: u64, images: &[(&str, Option<&Digest>)]) -> Value {
    let images: Vec<Value> = images
        .iter()
        .map(|(image, digest)| match digest {
            Some(d) => json!({"image": image, "digest": d.to_string(), "precaches": ["p"]}),
            None => json!({"image": image, "precaches": ["p"]}),
        })
        .collect();
    json!({
        "apiVersion": "larder.dev/v1alpha1", "kind": "NodeCache",
        "metadata": {"name": NODE, "uid": "u-1", "generation": 3 + epoch,
            "resourceVersion": format!("{}", 10 + epoch)},
        "spec": {"platform": "linux/amd64", "maxConcurrent": 2, "epoch": epoch, "images": images},
    })
}

/// Starts the agent on `node` against the mock; returns its stop switch.
fn agent(node: &Node, script: Script, events: mpsc::Receiver<Value>) -> (Log, watch::Sender<bool>) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let log = serve(handle, script, events);
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(larder_proxy::nodecache::run(
        node.running.state.clone(),
        client,
        NODE.to_owned(),
        larder_proxy::nodecache::CHECK_INTERVAL,
        stopped,
    ));
    (log, stop)
}

fn script(object: Option<Value>) -> Script {
    Script {
        object: Arc::new(Mutex::new(object)),
        list_404: false,
        patch_fails: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fulfils_its_nodecache_and_writes_only_its_status() {
    let node = node().await;
    let object = nodecache(1, &[(IMAGE, Some(&node.manifest))]);
    let (events_tx, events) = mpsc::channel(4);
    let (log, stop) = agent(&node, script(Some(object)), events);

    let ready = wait_patch(&log, 0, "with the image Ready", |p| {
        p["status"]["images"][0]["phase"] == "Ready"
    })
    .await;
    assert_eq!(
        ready["status"]["images"],
        json!([{"image": IMAGE, "phase": "Ready", "digest": node.manifest.to_string(),
            "bytesDone": node.size, "sizeBytes": node.size}]),
    );
    assert_eq!(ready["status"]["imagesReady"], 1);
    assert_eq!(ready["status"]["bytesDone"], node.size);
    assert_eq!(ready["status"]["observedEpoch"], 1);
    assert_eq!(ready["status"]["observedGeneration"], 4);
    assert!(ready["status"]["updated"].is_string());
    assert_eq!(
        ready.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["status"],
        "only status is written"
    );
    for (_, call) in log.lock().unwrap().iter() {
        match call {
            Call::List | Call::Watch => {}
            Call::Patch(content_type, _) => {
                assert_eq!(content_type, "application/merge-patch+json")
            }
            Call::Other(method, path) => panic!("unexpected call {method} {path}"),
        }
    }
    // The tag now names the pinned manifest on this node's disk.
    assert_eq!(
        node.running
            .state
            .disk
            .get_tag("registry.test", "team/app", "v1")
            .await
            .unwrap(),
        Some(node.manifest.clone())
    );
    // Idle and unchanged: nothing more is written (the agent ticks every second).
    let written = patches(&log).len();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        patches(&log).len(),
        written,
        "an unchanged status is never rewritten"
    );

    // The schedule fired: the image is checked again and the new epoch acknowledged.
    let written = patches(&log).len();
    let modified = nodecache(2, &[(IMAGE, Some(&node.manifest))]);
    events_tx
        .send(json!({"type": "MODIFIED", "object": modified}))
        .await
        .unwrap();
    let again = wait_patch(&log, written, "acknowledging epoch 2", |p| {
        p["status"]["observedEpoch"] == 2 && p["status"]["images"][0]["phase"] == "Ready"
    })
    .await;
    assert_eq!(again["status"]["observedGeneration"], 5);

    // The image left the spec: the status says so (a merge patch must name the empty list,
    // or the old entries would stay).
    let written = patches(&log).len();
    let emptied = nodecache(2, &[]);
    events_tx
        .send(json!({"type": "MODIFIED", "object": emptied}))
        .await
        .unwrap();
    let gone = wait_patch(&log, written, "without the image", |p| {
        p["status"]["imagesReady"] == 0
    })
    .await;
    assert_eq!(gone["status"]["images"], json!([]), "{gone}");
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_nodecache_means_nothing_to_do() {
    let node = node().await;
    let (_events_tx, events) = mpsc::channel(1);
    let (log, stop) = agent(&node, script(None), events);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(count(&log, |c| matches!(c, Call::List)) >= 1, "it looked");
    assert_eq!(count(&log, |c| matches!(c, Call::Patch(..))), 0);
    assert_eq!(count(&log, |c| matches!(c, Call::Other(..))), 0);
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_resource_type_is_retried_with_backoff_and_nothing_written() {
    let node = node().await;
    let (_events_tx, events) = mpsc::channel(1);
    let mut s = script(None);
    s.list_404 = true;
    let started = Instant::now();
    let (log, stop) = agent(&node, s, events);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let calls: Vec<(Duration, Call)> = log
        .lock()
        .unwrap()
        .iter()
        .map(|(at, call)| (at.duration_since(started), call.clone()))
        .collect();
    let lists: Vec<Duration> = calls
        .iter()
        .filter(|(_, c)| matches!(c, Call::List))
        .map(|(at, _)| *at)
        .collect();
    // The backoff doubles: LISTs at 0, then 0.8-1.6 s later, then 1.6-3.2 s after that (with
    // kube's own backoff, reset before each LIST, up to 5 came in 4 s).
    assert!(
        (2..=3).contains(&lists.len()),
        "{} LISTs in 4 s: retried, but not in a hot loop; calls: {calls:?}",
        lists.len()
    );
    if let [_, second, third] = lists[..] {
        assert!(
            third - second >= Duration::from_millis(1500),
            "the second wait is longer than the first: {calls:?}"
        );
    }
    assert_eq!(count(&log, |c| matches!(c, Call::Patch(..))), 0);
    // Pulls are unaffected: the proxy still answers.
    let ping = reqwest::get(format!("http://{}/v2/", node.running.addrs[0]))
        .await
        .unwrap();
    assert!(ping.status().is_client_error() || ping.status().is_success());
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_status_write_is_retried_without_a_hot_loop() {
    let node = node().await;
    let object = nodecache(1, &[(IMAGE, Some(&node.manifest))]);
    let (_events_tx, events) = mpsc::channel(1);
    let mut s = script(Some(object));
    s.patch_fails = true;
    let (log, stop) = agent(&node, s, events);
    wait_patch(&log, 0, "at all", |_| true).await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let attempts = count(&log, |c| matches!(c, Call::Patch(..)));
    assert!(
        (2..=4).contains(&attempts),
        "{attempts} status writes in ~7 s against a failing apiserver"
    );
    let _ = stop.send(true);
}
