//! `--pull-secrets` end to end: the real server over real TLS, with a mock apiserver for the
//! Secrets in `derive` mode.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{STEP, TestWebhook, create_review, http_get, patch_of, realistic_pod};
use http::{Method, Request, Response};
use kube::client::Body;
use larder_webhook::pull_secrets::PullSecretsMode;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Respond = tower_test::mock::SendResponse<Response<Body>>;

const REGCRED: &str = "/api/v1/namespaces/shop/secrets/regcred";
const SECRETS: &str = "/api/v1/namespaces/shop/secrets";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The realistic pod, with the pull secret its service account gave it.
fn pod_with_pull_secret() -> Value {
    let mut pod = realistic_pod();
    pod["spec"]["imagePullSecrets"] = json!([{"name": "regcred"}]);
    pod
}

fn regcred() -> Value {
    let config = json!({"auths": {
        "ghcr.io": {"auth": b64("robot:token")},
        "https://index.docker.io/v1/": {"username": "me", "password": "pw"},
    }});
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "regcred", "namespace": "shop", "uid": "u-1", "resourceVersion": "42"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": b64(&config.to_string())},
    })
}

fn reply(send: Respond, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

async fn expect(handle: &mut Handle, method: Method, path: &str) -> (Request<Body>, Respond) {
    let (request, send) = tokio::time::timeout(STEP, handle.next_request())
        .await
        .expect("apiserver called in time")
        .expect("apiserver called");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    (request, send)
}

async fn no_more_requests(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await;
    assert!(next.is_err(), "unexpected request to the apiserver");
}

async fn derive_webhook() -> (TestWebhook, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let hook = TestWebhook::start_with_client(client, |args| {
        args.pull_secrets = PullSecretsMode::Derive;
    })
    .await;
    (hook, handle)
}

#[tokio::test]
async fn derive_mode_creates_the_secret_and_adds_it_to_the_pod() {
    let (hook, mut handle) = derive_webhook().await;
    let body = serde_json::to_vec(&create_review(pod_with_pull_secret())).unwrap();
    let post = tokio::spawn({
        let client = hook.client();
        let addr = hook.addr();
        async move { client.post(addr, body.into()).await.unwrap() }
    });
    let (_, send) = expect(&mut handle, Method::GET, REGCRED).await;
    reply(send, 200, &regcred());
    let (request, send) = expect(&mut handle, Method::POST, SECRETS).await;
    let created: Value =
        serde_json::from_slice(&request.into_body().collect_bytes().await.unwrap()).unwrap();
    reply(send, 201, &created);
    let answer = post.await.unwrap().json();
    assert_eq!(answer["response"]["allowed"], true);

    let name = created["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("larder-pull-"), "{name}");
    let config: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(created["data"][".dockerconfigjson"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let keys: Vec<&String> = config["auths"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["localhost:7439/docker.io/", "localhost:7439/ghcr.io/"]
    );

    let mut pod = pod_with_pull_secret();
    json_patch::patch(&mut pod, &patch_of(&answer)).unwrap();
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": name}])
    );
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        "localhost:7439/docker.io/library/nginx:1.27"
    );

    // Reinvocation over our own output: no API call, no patch.
    let again = hook
        .post(serde_json::to_vec(&create_review(pod.clone())).unwrap())
        .await
        .json();
    assert!(again["response"].get("patch").is_none(), "{again}");
    no_more_requests(&mut handle).await;
    hook.stop().await;
}

#[tokio::test]
async fn derive_mode_dry_run_reads_but_writes_nothing() {
    let (hook, mut handle) = derive_webhook().await;
    let mut review = create_review(pod_with_pull_secret());
    review["request"]["dryRun"] = json!(true);
    let body = serde_json::to_vec(&review).unwrap();
    let post = tokio::spawn({
        let client = hook.client();
        let addr = hook.addr();
        async move { client.post(addr, body.into()).await.unwrap() }
    });
    let (_, send) = expect(&mut handle, Method::GET, REGCRED).await;
    reply(send, 200, &regcred());
    let answer = post.await.unwrap().json();
    let mut pod = pod_with_pull_secret();
    json_patch::patch(&mut pod, &patch_of(&answer)).unwrap();
    let secrets = pod["spec"]["imagePullSecrets"].as_array().unwrap();
    assert_eq!(secrets.len(), 2, "the same patch as a real request");
    no_more_requests(&mut handle).await;
    hook.stop().await;
}

#[tokio::test]
async fn derive_mode_forbidden_secret_leaves_the_pod_alone() {
    let (hook, mut handle) = derive_webhook().await;
    let body = serde_json::to_vec(&create_review(pod_with_pull_secret())).unwrap();
    let post = tokio::spawn({
        let client = hook.client();
        let addr = hook.addr();
        async move { client.post(addr, body.into()).await.unwrap() }
    });
    let (_, send) = expect(&mut handle, Method::GET, REGCRED).await;
    reply(
        send,
        403,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "secrets \"regcred\" is forbidden", "reason": "Forbidden", "code": 403}),
    );
    let answer = post.await.unwrap().json();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    no_more_requests(&mut handle).await;
    let (_, metrics) = http_get(hook.metrics_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"larder_webhook_admissions_total{result="error"} 1"#),
        "{metrics}"
    );
    hook.stop().await;
}

#[tokio::test]
async fn skip_mode_leaves_pods_with_pull_secrets_alone_and_counts_them() {
    let hook = TestWebhook::start().await;
    let answer = hook
        .post(serde_json::to_vec(&create_review(pod_with_pull_secret())).unwrap())
        .await
        .json();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // Without pull secrets the same pod is rewritten as before.
    let plain = hook
        .post(serde_json::to_vec(&create_review(realistic_pod())).unwrap())
        .await
        .json();
    assert!(plain["response"]["patch"].is_string(), "{plain}");
    let (_, metrics) = http_get(hook.metrics_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"larder_webhook_images_total{outcome="pull_secrets"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"larder_webhook_admissions_total{result="skipped"} 1"#),
        "{metrics}"
    );
    hook.stop().await;
}
