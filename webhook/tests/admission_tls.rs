//! The real server on a loopback port, over real TLS, answering AdmissionReviews.

// Test code: a panic is how a failure is reported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{STEP, TestWebhook, TlsClient, create_review, http_get, patch_of, realistic_pod};
use http::{Method, StatusCode};
use serde_json::{Value, json};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn to_body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

#[tokio::test]
async fn rewrites_a_realistic_pod_and_a_second_pass_changes_nothing() {
    let hook = TestWebhook::start().await;
    let pod = realistic_pod();
    let answer = hook.post(to_body(&create_review(pod.clone()))).await;
    assert_eq!(answer.status, StatusCode::OK);
    let review = answer.json();
    assert_eq!(review["kind"], "AdmissionReview");
    assert_eq!(
        review["response"]["uid"],
        "3c2f6a5e-0b1d-4e3a-9f6c-1a2b3c4d5e6f"
    );
    assert_eq!(review["response"]["allowed"], true);
    assert_eq!(review["response"]["patchType"], "JSONPatch");

    let mut patched = pod;
    json_patch::patch(&mut patched, &patch_of(&review)).unwrap();
    let spec = &patched["spec"];
    assert_eq!(
        spec["containers"][0]["image"],
        "localhost:7439/docker.io/library/nginx:1.27"
    );
    assert_eq!(
        spec["containers"][1]["image"],
        format!("localhost:7439/registry.example.com_5000/ops/exporter@{DIGEST}")
    );
    assert_eq!(spec["containers"][2]["image"], "quay.io/excluded/agent:1");
    assert_eq!(
        spec["initContainers"][0]["image"],
        "localhost:7439/ghcr.io/shop/migrate:2.4.1"
    );
    let meta = &patched["metadata"];
    assert_eq!(meta["labels"]["larder.dev/managed"], "true");
    assert_eq!(meta["labels"]["pod-template-hash"], "7d9c8b6f5");
    assert_eq!(
        meta["annotations"]["kubectl.kubernetes.io/restartedAt"],
        "2025-01-01T00:00:00Z"
    );
    let originals: Value = serde_json::from_str(
        meta["annotations"]["larder.dev/original-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        originals,
        json!({
            "web": "nginx:1.27",
            "metrics": format!("registry.example.com:5000/ops/exporter@{DIGEST}"),
            "init:migrate": "ghcr.io/shop/migrate:2.4.1"
        })
    );

    // The chart uses reinvocationPolicy: IfNeeded, so our own output comes back: no patch.
    let again = hook.post(to_body(&create_review(patched))).await;
    assert_eq!(again.status, StatusCode::OK);
    let again = again.json();
    assert_eq!(again["response"]["allowed"], true);
    assert!(again["response"].get("patch").is_none(), "{again}");
    hook.stop().await;
}

#[tokio::test]
async fn http2_is_offered_and_served() {
    let hook = TestWebhook::start().await;
    let client = TlsClient::with_alpn(&hook.pki.ca_pem, vec![b"h2".to_vec()]);
    let answer = client
        .post(hook.addr(), to_body(&create_review(realistic_pod())).into())
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["response"]["patchType"], "JSONPatch");
    hook.stop().await;
}

/// A pod whose JSON is over 1 MiB (40 containers with 250 environment variables each).
fn one_mib_pod() -> Value {
    let containers: Vec<Value> = (0..40)
        .map(|i| {
            let env: Vec<Value> = (0..250)
                .map(|j| json!({"name": format!("VAR_{j:04}"), "value": "x".repeat(80)}))
                .collect();
            json!({"name": format!("c{i}"), "image": format!("ghcr.io/big/app{i}:1"), "env": env})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "big", "namespace": "shop"},
           "spec": {"containers": containers}})
}

#[tokio::test]
async fn one_mib_pod_spec_is_rewritten() {
    let hook = TestWebhook::start().await;
    let pod = one_mib_pod();
    let body = to_body(&create_review(pod.clone()));
    assert!(body.len() > 1024 * 1024, "body is {} bytes", body.len());
    let answer = hook.post(body).await;
    assert_eq!(answer.status, StatusCode::OK);
    let mut patched = pod;
    json_patch::patch(&mut patched, &patch_of(&answer.json())).unwrap();
    for i in 0..40 {
        assert_eq!(
            patched["spec"]["containers"][i]["image"],
            format!("localhost:7439/ghcr.io/big/app{i}:1")
        );
    }
    hook.stop().await;
}

#[tokio::test]
async fn oversized_body_is_refused_and_the_server_carries_on() {
    let hook = TestWebhook::start().await;
    let mut huge = one_mib_pod();
    huge["metadata"]["annotations"] = json!({"filler": "y".repeat(5 * 1024 * 1024)});
    let answer = hook.post(to_body(&create_review(huge))).await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    let review = answer.json();
    assert_eq!(review["response"]["allowed"], true);
    assert!(
        review["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("larder:"),
        "{review}"
    );
    // Still serving.
    let ok = hook.post(to_body(&create_review(realistic_pod()))).await;
    assert_eq!(ok.status, StatusCode::OK);
    hook.stop().await;
}

#[tokio::test]
async fn malformed_reviews_get_clear_answers_and_never_block() {
    let hook = TestWebhook::start().await;
    let good = to_body(&create_review(realistic_pod()));
    let mut wrong_kind = create_review(realistic_pod());
    wrong_kind["kind"] = json!("ConversionReview");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated JSON",
            good[..good.len() - 40].to_vec(),
            "not an AdmissionReview",
        ),
        ("not JSON", b"hello".to_vec(), "not an AdmissionReview"),
        ("empty", Vec::new(), "not an AdmissionReview"),
        ("wrong kind", to_body(&wrong_kind), "ConversionReview"),
        (
            "missing request",
            to_body(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"})),
            "no request",
        ),
    ];
    for (case, body, says) in cases {
        let answer = hook.post(body).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{case}");
        let review = answer.json();
        assert_eq!(review["response"]["allowed"], true, "{case}");
        let message = review["response"]["status"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{case}: {message}");
    }
    // A readable request for something else: allowed unchanged, with its uid.
    let mut deployment = create_review(realistic_pod());
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let answer = hook.post(to_body(&deployment)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let review = answer.json();
    assert_eq!(
        review["response"]["uid"],
        "3c2f6a5e-0b1d-4e3a-9f6c-1a2b3c4d5e6f"
    );
    assert!(review["response"].get("patch").is_none());

    let (_, metrics) = http_get(hook.metrics_addr(), "/metrics").await;
    assert!(
        metrics.contains(r#"larder_webhook_admissions_total{result="error"} 6"#),
        "{metrics}"
    );
    hook.stop().await;
}

#[tokio::test]
async fn metrics_and_probes_on_the_admin_port() {
    let hook = TestWebhook::start().await;
    assert_eq!(
        http_get(hook.metrics_addr(), "/readyz").await.0,
        StatusCode::OK
    );
    assert_eq!(
        http_get(hook.metrics_addr(), "/healthz").await.0,
        StatusCode::OK
    );

    hook.post(to_body(&create_review(realistic_pod()))).await;
    let nothing = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                         "spec": {"containers": [{"name": "a", "image": "localhost:5000/dev"}]}});
    hook.post(to_body(&create_review(nothing))).await;

    let (status, text) = http_get(hook.metrics_addr(), "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        r#"larder_webhook_admissions_total{result="rewritten"} 1"#,
        r#"larder_webhook_admissions_total{result="skipped"} 1"#,
        r#"larder_webhook_admissions_total{result="error"} 0"#,
        r#"larder_webhook_images_total{outcome="rewritten"} 3"#,
        r#"larder_webhook_images_total{outcome="excluded"} 1"#,
        r#"larder_webhook_images_total{outcome="loopback"} 1"#,
        "larder_webhook_admission_duration_seconds_count 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    hook.stop().await;
}

#[tokio::test]
async fn only_post_mutate_pods_is_served() {
    let hook = TestWebhook::start().await;
    let client = hook.client();
    let empty = bytes::Bytes::new;
    let get = client
        .send(hook.addr(), Method::GET, "/mutate-pods", empty())
        .await
        .unwrap();
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    let other = client
        .send(hook.addr(), Method::POST, "/validate", empty())
        .await
        .unwrap();
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    hook.stop().await;
}

#[tokio::test]
async fn many_concurrent_reviews() {
    let hook = TestWebhook::start().await;
    let body = bytes::Bytes::from(to_body(&create_review(realistic_pod())));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let client = hook.client();
        let (addr, body) = (hook.addr(), body.clone());
        tasks.push(tokio::spawn(async move { client.post(addr, body).await }));
    }
    for task in tasks {
        let answer = tokio::time::timeout(STEP, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }
    hook.stop().await;
}
