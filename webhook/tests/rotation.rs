//! Certificates change while the webhook serves; the next handshake must see the new one.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Pki, TestWebhook, TlsClient, create_review, realistic_pod};
use http::StatusCode;
use rustls::pki_types::CertificateDer;

fn der(pem: &str) -> CertificateDer<'static> {
    larder_certs::pem::certificates(pem.as_bytes(), "test").unwrap()[0].clone()
}

/// Some kernels stamp files with a clock that ticks every few milliseconds; real rotations are
/// never this close together, so give the test's rewrite its own tick.
async fn next_tick() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

fn body() -> bytes::Bytes {
    serde_json::to_vec(&create_review(realistic_pod()))
        .unwrap()
        .into()
}

#[tokio::test]
async fn rotated_files_are_served_on_the_next_handshake() {
    let hook = TestWebhook::start().await;
    // One client throughout, as the apiserver would be: it must not resume its way around
    // the new certificate.
    let client = hook.client();
    let post = || client.post(hook.addr(), body());
    let first = post().await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    let original = std::fs::read_to_string(&hook.cert_path).unwrap();
    assert_eq!(first.peer_cert, der(&original));

    // In-place rewrite, as a sidecar or an operator would do it.
    let (cert, key) = hook.pki.issue();
    next_tick().await;
    std::fs::write(&hook.cert_path, &cert).unwrap();
    std::fs::write(&hook.key_path, &key).unwrap();
    let second = post().await.unwrap();
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        second.peer_cert,
        der(&cert),
        "new certificate on the next handshake"
    );

    // A broken update (certificate without its key) is not served; the last good one is.
    let (cert3, key3) = hook.pki.issue();
    next_tick().await;
    std::fs::write(&hook.cert_path, &cert3).unwrap();
    let third = post().await.unwrap();
    assert_eq!(third.status, StatusCode::OK);
    assert_eq!(
        third.peer_cert,
        der(&cert),
        "kept the last good certificate"
    );

    // The key arrives: now the new pair is served.
    next_tick().await;
    std::fs::write(&hook.key_path, &key3).unwrap();
    let fourth = post().await.unwrap();
    assert_eq!(fourth.peer_cert, der(&cert3));
    hook.stop().await;
}

#[tokio::test]
async fn rotation_to_a_new_ca_via_symlink_swap() {
    // Files behind a `..data` symlink, swapped atomically like a mounted Secret.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let write_version = |name: &str, (cert, key): &(String, String)| {
        let version = dir.path().join(name);
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("tls.crt"), cert).unwrap();
        std::fs::write(version.join("tls.key"), key).unwrap();
        let tmp = dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
    };
    let v1 = pki.issue();
    write_version("v1", &v1);
    let data = dir.path().join("..data");
    let hook = TestWebhook::start_with(|args| {
        args.tls_cert = Some(data.join("tls.crt"));
        args.tls_key = Some(data.join("tls.key"));
    })
    .await;
    let old_ca_client = TlsClient::new(&pki.ca_pem);
    let first = old_ca_client.post(hook.addr(), body()).await.unwrap();
    assert_eq!(first.peer_cert, der(&v1.0));

    let new_pki = Pki::new();
    let v2 = new_pki.issue();
    write_version("v2", &v2);
    let new_ca_client = TlsClient::new(&new_pki.ca_pem);
    let second = new_ca_client.post(hook.addr(), body()).await.unwrap();
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.peer_cert, der(&v2.0));
    // A client still trusting only the old CA now fails the handshake: the cert really changed.
    // (The same client object as before: no session resumption sneaks the old one back.)
    let refused = old_ca_client.post(hook.addr(), body()).await.unwrap_err();
    assert!(refused.contains("handshake"), "{refused}");
    hook.stop().await;
}

#[tokio::test]
async fn stop_is_graceful_and_final() {
    let hook = TestWebhook::start().await;
    let addr = hook.addr();
    let metrics = hook.metrics_addr();
    let client = hook.client();
    assert_eq!(
        client.post(addr, body()).await.unwrap().status,
        StatusCode::OK
    );
    hook.stop().await;
    assert!(
        client.post(addr, body()).await.is_err(),
        "no longer accepting"
    );
    assert!(
        tokio::net::TcpStream::connect(metrics).await.is_err(),
        "admin closed too"
    );
}

#[tokio::test]
async fn startup_fails_clearly_on_missing_certificates() {
    common::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let args = larder_webhook::WebhookArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: Some(dir.path().join("missing.crt")),
        tls_key: Some(dir.path().join("missing.key")),
        proxy_address: "localhost:7439".into(),
        exclude_images: Vec::new(),
        metrics_listen: "127.0.0.1:0".parse().unwrap(),
        self_managed_certs: false,
        webhook_configuration: None,
        service: None,
        namespace: None,
        cert_secret: None,
        shutdown_grace: std::time::Duration::from_secs(1),
        pull_secrets: larder_webhook::pull_secrets::PullSecretsMode::Skip,
    };
    let config = larder_webhook::config::Config::try_from(args).unwrap();
    let token = larder_webhook::CancellationToken::new();
    let err = tokio::time::timeout(
        common::STEP,
        larder_webhook::Webhook::start(config, token.clone()),
    )
    .await
    .unwrap()
    .unwrap_err();
    token.cancel();
    assert!(err.to_string().contains("missing.crt"), "{err}");
    assert_eq!(err.metric_label(), "read_file");
}
