//! The self-managed certificate mode end to end, against a mock apiserver: the webhook creates
//! its CA and certificate, publishes the CA, and serves a certificate a client trusting only
//! that CA accepts for the Service's DNS name.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{STEP, TlsClient, create_review, patch_of, realistic_pod};
use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::client::Body;
use larder_webhook::config::Config;
use larder_webhook::{CancellationToken, Webhook, WebhookArgs};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const SECRET: &str = "/api/v1/namespaces/larder/secrets/larder-webhook-certs";
const SECRETS: &str = "/api/v1/namespaces/larder/secrets";
const MWC: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/larder";

fn args() -> WebhookArgs {
    WebhookArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: None,
        tls_key: None,
        proxy_address: "localhost:7439".into(),
        exclude_images: Vec::new(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        self_managed_certs: true,
        webhook_configuration: Some("larder".into()),
        service: Some("larder-webhook".into()),
        namespace: Some("larder".into()),
        cert_secret: None,
        shutdown_grace: std::time::Duration::from_secs(1),
        pull_secrets: larder_webhook::pull_secrets::PullSecretsMode::Skip,
    }
}

fn reply(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, body: Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
}

async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
) -> (
    Request<Body>,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (request, send) = handle.next_request().await.expect("apiserver called");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    (request, send)
}

/// Answers a fresh install and returns the CA bundle that was published.
async fn fresh_install(mut handle: Handle) -> String {
    let (_, send) = expect(&mut handle, Method::GET, SECRET).await;
    reply(send, 404, not_found());

    let (request, send) = expect(&mut handle, Method::POST, SECRETS).await;
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let secret: Secret = serde_json::from_slice(&bytes).unwrap();
    let ca = String::from_utf8(secret.data.as_ref().unwrap()["ca.crt"].0.clone()).unwrap();
    reply(send, 201, serde_json::to_value(&secret).unwrap());

    let (_, send) = expect(&mut handle, Method::GET, MWC).await;
    let config = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "larder"},
        "webhooks": [{"name": "pods.larder.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "clientConfig": {"service": {"name": "larder-webhook", "namespace": "larder", "path": "/mutate-pods"}}}]
    });
    reply(send, 200, config.clone());

    let (request, send) = expect(&mut handle, Method::PATCH, MWC).await;
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let patch: Value = serde_json::from_slice(&bytes).unwrap();
    let published: ByteString = serde_json::from_value(patch[1]["value"].clone()).unwrap();
    assert_eq!(
        published.0,
        ca.as_bytes(),
        "the CA of the stored Secret is published"
    );
    reply(send, 200, config);
    ca
}

#[tokio::test]
async fn creates_publishes_and_serves_its_own_certificate() {
    common::install_crypto_provider();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "larder");
    let apiserver = tokio::spawn(fresh_install(handle));
    let shutdown = CancellationToken::new();
    let config = Config::try_from(args()).unwrap();
    let webhook = tokio::time::timeout(STEP, Webhook::start_with_client(config, client, shutdown))
        .await
        .expect("started in time")
        .expect("started")
        .expect("certificates obtained");
    let ca = tokio::time::timeout(STEP, apiserver)
        .await
        .unwrap()
        .unwrap();

    let pod = realistic_pod();
    let body = serde_json::to_vec(&create_review(pod.clone())).unwrap();
    for name in [
        "larder-webhook.larder.svc",
        "larder-webhook.larder.svc.cluster.local",
    ] {
        let client = TlsClient::new(&ca).with_server_name(name);
        let answer = client
            .post(webhook.webhook_addr(), body.clone().into())
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{name}");
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch_of(&answer.json())).unwrap();
        assert_eq!(
            patched["spec"]["containers"][0]["image"],
            "localhost:7439/docker.io/library/nginx:1.27"
        );
    }
    let wrong_name = TlsClient::new(&ca).with_server_name("other.larder.svc");
    assert!(
        wrong_name
            .post(webhook.webhook_addr(), body.into())
            .await
            .is_err()
    );
    tokio::time::timeout(STEP, webhook.stop())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_while_waiting_for_the_api_is_clean() {
    common::install_crypto_provider();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "larder");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    let apiserver = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, SECRET).await;
        reply(
            send,
            500,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500}),
        );
        // The webhook now waits to retry; SIGTERM arrives meanwhile.
        trigger.cancel();
    });
    let config = Config::try_from(args()).unwrap();
    let started = tokio::time::timeout(STEP, Webhook::start_with_client(config, client, shutdown))
        .await
        .expect("gave up in time")
        .expect("no error, just nothing to serve");
    assert!(started.is_none());
    apiserver.await.unwrap();
}
