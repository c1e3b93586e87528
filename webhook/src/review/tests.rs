use serde_json::json;

use super::*;
use crate::exclude::Exclusions;
use crate::mutate::{Action, Skip};

fn config() -> MutationConfig {
    MutationConfig {
        proxy_address: "localhost:7439".into(),
        exclude: Exclusions::none(),
        pull_secrets: crate::pull_secrets::PullSecretsMode::Skip,
    }
}

fn pod(containers: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-", "namespace": "shop", "labels": {"app": "web"}},
        "spec": {"containers": containers}
    })
}

fn review_json(operation: &str, sub_resource: Option<&str>, object: Value, old: Value) -> Value {
    let mut request = json!({
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "",
        "namespace": "shop",
        "operation": operation,
        "userInfo": {"username": "admin", "groups": ["system:authenticated"]},
        "object": object,
        "oldObject": old,
        "dryRun": false,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
    });
    if let Some(sub) = sub_resource {
        request["subResource"] = json!(sub);
        request["requestSubResource"] = json!(sub);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

fn run(body: &Value) -> (Reviewed, Value) {
    let reviewed = review(&serde_json::to_vec(body).unwrap(), &config());
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    (reviewed, answer)
}

/// The JSON patch inside an answer (base64 on the wire).
fn patch_of(answer: &Value) -> Patch {
    let bytes: ByteString = serde_json::from_value(answer["response"]["patch"].clone()).unwrap();
    serde_json::from_slice(&bytes.0).unwrap()
}

fn assert_review_envelope(answer: &Value) {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["allowed"], true,
        "never blocks: {answer}"
    );
    assert!(answer.get("request").is_none());
}

#[test]
fn create_is_rewritten_with_a_base64_json_patch() {
    let object = pod(json!([{"name": "app", "image": "nginx:1.27"}]));
    let (reviewed, answer) = run(&review_json("CREATE", None, object.clone(), Value::Null));
    assert_eq!(reviewed.status, StatusCode::OK);
    assert_eq!(reviewed.result, AdmissionResult::Rewritten);
    assert_review_envelope(&answer);
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    assert!(
        answer["response"]["patch"].is_string(),
        "base64, not a number array"
    );
    let mut patched = object;
    json_patch::patch(&mut patched, &patch_of(&answer)).unwrap();
    assert_eq!(
        patched["spec"]["containers"][0]["image"],
        "localhost:7439/docker.io/library/nginx:1.27"
    );
    assert_eq!(patched["metadata"]["labels"]["app"], "web");
    assert_eq!(patched["metadata"]["labels"]["larder.dev/managed"], "true");
    assert_eq!(
        reviewed.info,
        RequestInfo {
            uid: "705ab4f5-6393-11e8-b7cc-42010a800002".into(),
            namespace: "shop".into(),
            name: "web-".into(),
            operation: "CREATE".into(),
            sub_resource: String::new(),
        }
    );
}

#[test]
fn nothing_to_rewrite_answers_without_patch() {
    let object = pod(json!([{"name": "app", "image": "localhost:7439/docker.io/library/nginx:1"}]));
    let (reviewed, answer) = run(&review_json("CREATE", None, object, Value::Null));
    assert_eq!(reviewed.result, AdmissionResult::Skipped);
    assert_review_envelope(&answer);
    assert!(answer["response"].get("patch").is_none());
    assert!(answer["response"].get("patchType").is_none());
    assert_eq!(reviewed.mutation.images.len(), 1);
}

#[test]
fn ephemeral_containers_update_rewrites_the_new_one() {
    let old = json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "localhost:7439/docker.io/library/nginx:1"}],
                 "ephemeralContainers": [{"name": "dbg1", "image": "busybox"}]}
    });
    let mut new = old.clone();
    new["spec"]["ephemeralContainers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "dbg2", "image": "busybox:1.36", "targetContainerName": "app"}));
    let (reviewed, answer) = run(&review_json(
        "UPDATE",
        Some("ephemeralcontainers"),
        new.clone(),
        old,
    ));
    assert_eq!(reviewed.result, AdmissionResult::Rewritten);
    let mut patched = new;
    json_patch::patch(&mut patched, &patch_of(&answer)).unwrap();
    assert_eq!(
        patched["spec"]["ephemeralContainers"][0]["image"],
        "busybox"
    );
    assert_eq!(
        patched["spec"]["ephemeralContainers"][1]["image"],
        "localhost:7439/docker.io/library/busybox:1.36"
    );
}

#[test]
fn unreadable_bodies_get_400_and_still_allow() {
    let good = serde_json::to_vec(&review_json(
        "CREATE",
        None,
        pod(json!([{"name": "a", "image": "nginx"}])),
        Value::Null,
    ))
    .unwrap();
    let truncated = &good[..good.len() / 2];
    for body in [truncated, b"", b"null", b"[]", b"<xml/>"] {
        let reviewed = review(body, &config());
        assert_eq!(
            reviewed.status,
            StatusCode::BAD_REQUEST,
            "{:?}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(reviewed.result, AdmissionResult::Error);
        let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
        assert_review_envelope(&answer);
        let message = answer["response"]["status"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("larder: body is not an AdmissionReview"),
            "{message}"
        );
    }
}

#[test]
fn wrong_review_kind_or_version_gets_400_with_uid() {
    let mut body = review_json("CREATE", None, pod(json!([])), Value::Null);
    body["kind"] = json!("Pod");
    let (reviewed, answer) = run(&body);
    assert_eq!(reviewed.status, StatusCode::BAD_REQUEST);
    assert_review_envelope(&answer);
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );

    let mut body = review_json("CREATE", None, pod(json!([])), Value::Null);
    body["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (reviewed, _) = run(&body);
    assert_eq!(reviewed.status, StatusCode::BAD_REQUEST);
    assert!(reviewed.problem.unwrap().contains("v1beta1"));
}

#[test]
fn missing_request_gets_400() {
    let (reviewed, answer) =
        run(&json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}));
    assert_eq!(reviewed.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        reviewed.problem.as_deref(),
        Some("AdmissionReview has no request")
    );
    assert_review_envelope(&answer);
}

#[test]
fn broken_request_fields_salvage_the_uid() {
    let mut body = review_json("CREATE", None, pod(json!([])), Value::Null);
    body["request"]["operation"] = json!("EXPLODE");
    let (reviewed, answer) = run(&body);
    assert_eq!(reviewed.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
}

#[test]
fn unexpected_requests_are_allowed_unchanged_and_counted_as_errors() {
    let deployment = {
        let mut b = review_json(
            "CREATE",
            None,
            pod(json!([{"name": "a", "image": "nginx"}])),
            Value::Null,
        );
        b["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
        b["request"]["resource"] =
            json!({"group": "apps", "version": "v1", "resource": "deployments"});
        b
    };
    let cases = [
        ("other resource", deployment),
        (
            "delete",
            review_json("DELETE", None, Value::Null, pod(json!([]))),
        ),
        (
            "plain update",
            review_json(
                "UPDATE",
                None,
                pod(json!([{"name": "a", "image": "nginx"}])),
                pod(json!([])),
            ),
        ),
        (
            "status update",
            review_json("UPDATE", Some("status"), pod(json!([])), pod(json!([]))),
        ),
        (
            "no object",
            review_json("CREATE", None, Value::Null, Value::Null),
        ),
        (
            "ephemeral without old",
            review_json(
                "UPDATE",
                Some("ephemeralcontainers"),
                pod(json!([])),
                Value::Null,
            ),
        ),
        (
            "not a pod",
            review_json(
                "CREATE",
                None,
                json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}, "spec": {"containers": "nope"}}),
                Value::Null,
            ),
        ),
        (
            "image not a string",
            review_json(
                "CREATE",
                None,
                pod(json!([{"name": "a", "image": 5}])),
                Value::Null,
            ),
        ),
    ];
    for (case, body) in cases {
        let (reviewed, answer) = run(&body);
        assert_eq!(reviewed.status, StatusCode::OK, "{case}");
        assert_eq!(reviewed.result, AdmissionResult::Error, "{case}");
        assert!(reviewed.problem.is_some(), "{case}");
        assert_review_envelope(&answer);
        assert_eq!(
            answer["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
            "{case}"
        );
        assert!(answer["response"].get("patch").is_none(), "{case}");
    }
}

#[test]
fn unreadable_helper_answers_with_the_given_status() {
    let reviewed = unreadable(StatusCode::PAYLOAD_TOO_LARGE, "too big".into());
    assert_eq!(reviewed.status, StatusCode::PAYLOAD_TOO_LARGE);
    let answer: Value = serde_json::from_slice(&reviewed.body).unwrap();
    assert_review_envelope(&answer);
    assert_eq!(answer["response"]["status"]["message"], "larder: too big");
}

fn derive_config() -> MutationConfig {
    MutationConfig {
        pull_secrets: PullSecretsMode::Derive,
        ..config()
    }
}

fn pod_with_pull_secrets() -> Value {
    let mut object = pod(json!([{"name": "app", "image": "ghcr.io/org/private:1"}]));
    object["spec"]["imagePullSecrets"] = json!([{"name": "regcred"}]);
    object
}

fn answer_json(reviewed: &Reviewed) -> Value {
    serde_json::from_slice(&reviewed.body).unwrap()
}

fn body_of(review: &Value) -> Vec<u8> {
    serde_json::to_vec(review).unwrap()
}

#[test]
fn skip_mode_admits_pods_with_pull_secrets_unchanged() {
    let (reviewed, answer) = run(&review_json(
        "CREATE",
        None,
        pod_with_pull_secrets(),
        Value::Null,
    ));
    assert_eq!(reviewed.result, AdmissionResult::Skipped);
    assert_review_envelope(&answer);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    assert_eq!(
        reviewed.mutation.images[0].action,
        Action::Skipped(Skip::PullSecrets)
    );
}

#[test]
fn derive_mode_asks_for_the_pull_secrets_then_adds_the_derived_one() {
    let mut body = review_json("CREATE", None, pod_with_pull_secrets(), Value::Null);
    body["request"]["dryRun"] = json!(true);
    let Step::NeedsPullSecrets(pending) = start(&body_of(&body), &derive_config()) else {
        panic!("derive mode needs the pull secrets");
    };
    assert_eq!(pending.namespace(), "shop");
    assert_eq!(pending.secret_names(), ["regcred"]);
    assert!(pending.dry_run());
    let reviewed = pending.finish(&derive_config(), Ok(Some("larder-pull-0123456789".into())));
    assert_eq!(reviewed.result, AdmissionResult::Rewritten);
    let answer = answer_json(&reviewed);
    assert_review_envelope(&answer);
    let mut patched = pod_with_pull_secrets();
    json_patch::patch(&mut patched, &patch_of(&answer)).unwrap();
    assert_eq!(
        patched["spec"]["containers"][0]["image"],
        "localhost:7439/ghcr.io/org/private:1"
    );
    assert_eq!(
        patched["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": "larder-pull-0123456789"}])
    );
}

#[test]
fn derive_failure_admits_unchanged_as_an_error() {
    let body = review_json("CREATE", None, pod_with_pull_secrets(), Value::Null);
    let Step::NeedsPullSecrets(pending) = start(&body_of(&body), &derive_config()) else {
        panic!("derive mode needs the pull secrets");
    };
    let reviewed = pending.finish(
        &derive_config(),
        Err("cannot read pull secret `regcred`: forbidden".into()),
    );
    assert_eq!(reviewed.result, AdmissionResult::Error);
    assert!(reviewed.problem.as_deref().unwrap().contains("`regcred`"));
    let answer = answer_json(&reviewed);
    assert_review_envelope(&answer);
    assert!(answer["response"].get("patch").is_none(), "{answer}");
    // The pure entry point cannot read Secrets: the same, without I/O.
    let reviewed = review(&body_of(&body), &derive_config());
    assert_eq!(reviewed.result, AdmissionResult::Error);
}

#[test]
fn pods_without_pull_secrets_need_no_api_in_derive_mode() {
    let body = review_json(
        "CREATE",
        None,
        pod(json!([{"name": "app", "image": "nginx:1.27"}])),
        Value::Null,
    );
    let Step::Answered(derived) = start(&body_of(&body), &derive_config()) else {
        panic!("no pull secrets, no API");
    };
    let skipped = review(&body_of(&body), &config());
    assert_eq!(derived.result, AdmissionResult::Rewritten);
    assert_eq!(derived.body, skipped.body, "same answer in both modes");
}

#[test]
fn reinvocation_over_our_output_needs_no_api() {
    let mut object = pod_with_pull_secrets();
    object["spec"]["containers"][0]["image"] = json!("localhost:7439/ghcr.io/org/private:1");
    object["spec"]["imagePullSecrets"] =
        json!([{"name": "regcred"}, {"name": "larder-pull-0123456789"}]);
    let body = review_json("CREATE", None, object, Value::Null);
    let Step::Answered(reviewed) = start(&body_of(&body), &derive_config()) else {
        panic!("nothing to rewrite, no API");
    };
    assert_eq!(reviewed.result, AdmissionResult::Skipped);
    assert!(answer_json(&reviewed)["response"].get("patch").is_none());
}
