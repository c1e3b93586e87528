use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};

use super::*;

const PROXY: &str = "localhost:7439";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn json_source(name: &str, auths: Value) -> SourceSecret {
    SourceSecret {
        name: name.into(),
        version: format!("uid-{name}/1"),
        format: SourceFormat::Json,
        data: serde_json::to_vec(&json!({ "auths": auths })).unwrap(),
    }
}

/// The derived config's `auths`, as JSON.
fn auths_of(derived: &DerivedSecret) -> Value {
    let config: Value = serde_json::from_slice(&derived.config).unwrap();
    config["auths"].clone()
}

#[test]
fn key_table() {
    let cases: &[(&str, Option<&str>)] = &[
        ("ghcr.io", Some("localhost:7439/ghcr.io/")),
        ("GHCR.io", Some("localhost:7439/ghcr.io/")),
        ("https://ghcr.io", Some("localhost:7439/ghcr.io/")),
        (
            "https://index.docker.io/v1/",
            Some("localhost:7439/docker.io/"),
        ),
        ("index.docker.io", Some("localhost:7439/docker.io/")),
        ("docker.io", Some("localhost:7439/docker.io/")),
        ("registry-1.docker.io", Some("localhost:7439/docker.io/")),
        (
            "registry.example.com:5000",
            Some("localhost:7439/registry.example.com_5000/"),
        ),
        (
            "http://registry.example.com:05000/",
            Some("localhost:7439/registry.example.com_5000/"),
        ),
        // A key with a path covers only that path, for kubelet as for the original key.
        (
            "registry.example.com/team/",
            Some("localhost:7439/registry.example.com/team"),
        ),
        (
            "https://registry.example.com/v2/team",
            Some("localhost:7439/registry.example.com/team"),
        ),
        ("https://quay.io/v2/", Some("localhost:7439/quay.io/")),
        // As kubelet reads it: without its slash the API segment is a path.
        (
            "https://index.docker.io/v1",
            Some("localhost:7439/docker.io/v1"),
        ),
        // Our own derived entries are not carried again.
        ("localhost:7439", None),
        ("localhost:7439/ghcr.io", None),
    ];
    // kubelet matches paths by string prefix: a host key must not cover another host.
    let ghcr = proxy_key(PROXY, "ghcr.io").unwrap().unwrap();
    assert!("localhost:7439/ghcr.io/org/app".starts_with(&ghcr));
    assert!(!"localhost:7439/ghcr.io.example.com/org/app".starts_with(&ghcr));
    for (key, want) in cases {
        assert_eq!(
            proxy_key(PROXY, key).unwrap().as_deref(),
            *want,
            "key `{key}`"
        );
    }
    for bad in ["*.gcr.io", "[::1]:5000", "bad host", "", "registry:99999"] {
        assert!(proxy_key(PROXY, bad).is_err(), "`{bad}` should be refused");
    }
}

#[test]
fn auth_and_username_password_forms_give_the_same_entry() {
    let derived = derive_pull_secret(
        PROXY,
        &[
            json_source("a", json!({"ghcr.io": {"auth": b64("alice:s3cr:et")}})),
            json_source(
                "b",
                json!({"https://index.docker.io/v1/": {"username": "bob", "password": "pw", "email": "b@x"}}),
            ),
        ],
    )
    .unwrap();
    assert_eq!(
        derived.keys,
        ["localhost:7439/docker.io/", "localhost:7439/ghcr.io/"]
    );
    assert_eq!(
        auths_of(&derived),
        json!({
            "localhost:7439/ghcr.io/": {"username": "alice", "password": "s3cr:et", "auth": b64("alice:s3cr:et")},
            "localhost:7439/docker.io/": {"username": "bob", "password": "pw", "auth": b64("bob:pw")},
        })
    );
    assert_eq!(derived.sources, ["a", "b"]);
    assert!(!derived.is_empty());
}

#[test]
fn auth_wins_over_username_and_password_as_in_kubelet() {
    let derived = derive_pull_secret(
        PROXY,
        &[json_source(
            "a",
            json!({"ghcr.io": {"auth": b64("real:one"), "username": "other", "password": "x"}}),
        )],
    )
    .unwrap();
    assert_eq!(
        auths_of(&derived)["localhost:7439/ghcr.io/"]["username"],
        "real"
    );
}

#[test]
fn ports_and_paths_are_kept_apart() {
    let derived = derive_pull_secret(
        PROXY,
        &[json_source(
            "a",
            json!({
                "registry.example.com:5000": {"auth": b64("u:p")},
                "registry.example.com/team": {"auth": b64("t:p")},
            }),
        )],
    )
    .unwrap();
    assert_eq!(
        derived.keys,
        [
            "localhost:7439/registry.example.com/team",
            "localhost:7439/registry.example.com_5000/"
        ]
    );
}

#[test]
fn legacy_dockercfg() {
    let source = SourceSecret {
        name: "old".into(),
        version: "u/1".into(),
        format: SourceFormat::Legacy,
        data: serde_json::to_vec(
            &json!({"https://index.docker.io/v1/": {"auth": b64("u:p"), "email": "e"}}),
        )
        .unwrap(),
    };
    let derived = derive_pull_secret(PROXY, &[source]).unwrap();
    assert_eq!(derived.keys, ["localhost:7439/docker.io/"]);
}

#[test]
fn broken_content_is_an_error_naming_the_secret() {
    let cases = [
        json!({"ghcr.io": {"auth": "!!not base64!!"}}),
        json!({"ghcr.io": {"auth": b64("no-colon")}}),
        json!({"*.example.com": {"auth": b64("u:p")}}),
    ];
    for auths in cases {
        match derive_pull_secret(PROXY, &[json_source("regcred", auths.clone())]) {
            Err(PullSecretError::Invalid { secret, reason }) => {
                assert_eq!(secret, "regcred");
                assert!(reason.contains('`'), "reason names the key: {reason}");
            }
            other => panic!("{auths}: expected Invalid, got {other:?}"),
        }
    }
    let not_json = SourceSecret {
        name: "regcred".into(),
        version: String::new(),
        format: SourceFormat::Json,
        data: b"not json".to_vec(),
    };
    let err = derive_pull_secret(PROXY, &[not_json]).unwrap_err();
    assert!(err.to_string().contains("`regcred`"), "{err}");
}

#[test]
fn empty_configs_derive_nothing() {
    let empty = derive_pull_secret(PROXY, &[json_source("a", json!({}))]).unwrap();
    assert!(empty.is_empty());
    let no_auths = SourceSecret {
        data: b"{}".to_vec(),
        ..json_source("b", json!({}))
    };
    assert!(derive_pull_secret(PROXY, &[no_auths]).unwrap().is_empty());
    // An entry without any credentials is what kubelet would use as anonymous.
    let anonymous = derive_pull_secret(PROXY, &[json_source("c", json!({"ghcr.io": {}}))]);
    assert!(anonymous.unwrap().is_empty());
    assert!(derive_pull_secret(PROXY, &[]).unwrap().is_empty());
}

#[test]
fn a_derived_secret_as_source_adds_nothing() {
    let ours = json_source(
        "larder-pull-0123456789",
        json!({"localhost:7439/ghcr.io": {"auth": b64("u:p")}}),
    );
    assert!(derive_pull_secret(PROXY, &[ours]).unwrap().is_empty());
}

#[test]
fn different_credentials_for_one_key_conflict() {
    let a = json_source("a", json!({"ghcr.io": {"auth": b64("u:p")}}));
    let same = json_source("b", json!({"https://ghcr.io": {"auth": b64("u:p")}}));
    let other = json_source("c", json!({"GHCR.IO": {"auth": b64("v:q")}}));
    assert_eq!(
        derive_pull_secret(PROXY, &[a.clone(), same])
            .unwrap()
            .keys
            .len(),
        1
    );
    match derive_pull_secret(PROXY, &[a, other]) {
        Err(PullSecretError::Conflict { key, first, second }) => {
            assert_eq!(
                (key.as_str(), first.as_str(), second.as_str()),
                ("localhost:7439/ghcr.io/", "a", "c")
            );
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn names_are_deterministic_dns_names_without_credential_material() {
    let a = json_source("a", json!({"ghcr.io": {"auth": b64("u:p")}}));
    let first = derive_pull_secret(PROXY, std::slice::from_ref(&a)).unwrap();
    let again = derive_pull_secret(PROXY, std::slice::from_ref(&a)).unwrap();
    assert_eq!(first, again);
    assert_eq!(first.name.len(), DERIVED_PREFIX.len() + 10);
    assert!(first.name.starts_with(DERIVED_PREFIX));
    assert!(
        first
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    );
    // The name follows the sources' identity, not their content...
    let other_password = json_source("a", json!({"ghcr.io": {"auth": b64("u:other")}}));
    assert_eq!(
        derive_pull_secret(PROXY, &[other_password]).unwrap().name,
        first.name
    );
    // ...so an edited Secret (new resourceVersion) or another proxy address gives a new one.
    let edited = SourceSecret {
        version: "uid-a/2".into(),
        ..a.clone()
    };
    assert_ne!(
        derive_pull_secret(PROXY, &[edited]).unwrap().name,
        first.name
    );
    assert_ne!(
        derive_pull_secret("proxy.local:7439", &[a]).unwrap().name,
        first.name
    );
}

#[test]
fn the_secret_object() {
    let derived = derive_pull_secret(
        PROXY,
        &[json_source("a", json!({"ghcr.io": {"auth": b64("u:p")}}))],
    )
    .unwrap();
    let secret = derived.to_secret("shop");
    assert_eq!(secret.metadata.name.as_deref(), Some(derived.name.as_str()));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(secret.type_.as_deref(), Some(DOCKER_CONFIG_JSON_TYPE));
    assert_eq!(secret.immutable, Some(true));
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL],
        "larder"
    );
    assert_eq!(
        secret.data.as_ref().unwrap()[DOCKER_CONFIG_JSON_KEY].0,
        derived.config
    );
    // Round trip: what we write is what we can read back as a source.
    let mut stored = secret;
    stored.metadata.uid = Some("x".into());
    let source = source_of(&stored).unwrap();
    assert_eq!(source.format, SourceFormat::Json);
    assert!(derive_pull_secret(PROXY, &[source]).unwrap().is_empty());
}

fn secret_json(name: &str, kind: &str, key: &str, config: &Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": "7"},
        "type": kind,
        "data": {key: b64(&config.to_string())},
    })
}

#[test]
fn which_secrets_are_sources() {
    let config = json!({"auths": {}});
    let read = |v: Value| source_of(&serde_json::from_value(v).unwrap());
    let json_secret = read(secret_json(
        "a",
        DOCKER_CONFIG_JSON_TYPE,
        DOCKER_CONFIG_JSON_KEY,
        &config,
    ))
    .unwrap();
    assert_eq!(json_secret.version, "uid-a/7");
    assert_eq!(
        read(secret_json(
            "b",
            DOCKER_CFG_TYPE,
            DOCKER_CFG_KEY,
            &json!({})
        ))
        .unwrap()
        .format,
        SourceFormat::Legacy
    );
    // kubelet reads neither of these for pulls.
    assert!(read(secret_json("c", "Opaque", DOCKER_CONFIG_JSON_KEY, &config)).is_none());
    assert!(
        read(secret_json(
            "d",
            DOCKER_CONFIG_JSON_TYPE,
            DOCKER_CFG_KEY,
            &config
        ))
        .is_none()
    );
}

// --- The Kubernetes I/O against a mock apiserver -------------------------------------------

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Respond = tower_test::mock::SendResponse<Response<Body>>;

const REGCRED: &str = "/api/v1/namespaces/shop/secrets/regcred";
const SECRETS: &str = "/api/v1/namespaces/shop/secrets";

fn mock() -> (kube::Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), handle)
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

fn status(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("mock says {reason}"), "reason": reason, "code": code,
    })
}

async fn expect(handle: &mut Handle, method: Method, path: &str) -> (Request<Body>, Respond) {
    let (request, send) = handle.next_request().await.expect("apiserver called");
    assert_eq!((request.method(), request.uri().path()), (&method, path));
    (request, send)
}

async fn body_json(request: Request<Body>) -> Value {
    let bytes = request.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn regcred() -> Value {
    secret_json(
        "regcred",
        DOCKER_CONFIG_JSON_TYPE,
        DOCKER_CONFIG_JSON_KEY,
        &json!({"auths": {"ghcr.io": {"auth": b64("u:p")}}}),
    )
}

/// What the apiserver is asked, in order, and what it answers.
enum Scenario {
    /// The pull secret is read and the derived one created.
    Created,
    /// The derived Secret exists already (an earlier pod, another replica).
    AlreadyExists,
    /// RBAC forbids reading the pull secret.
    ReadForbidden,
    /// A dry run: the pull secret is read, nothing is written.
    DryRun,
    /// The pull secret is not a docker config: read, nothing derived, nothing written.
    NotADockerConfig,
}

/// Runs `scenario`; returns what [`provide`] returned and the created Secret's body, if any.
async fn run(
    scenario: Scenario,
    names: &[&str],
    dry_run: bool,
) -> (Result<Option<String>, PullSecretError>, Option<Value>) {
    let (client, mut handle) = mock();
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let server = tokio::spawn(async move {
        let (_, send) = expect(&mut handle, Method::GET, REGCRED).await;
        let created = match scenario {
            Scenario::ReadForbidden => {
                reply(send, 403, &status(403, "Forbidden"));
                None
            }
            Scenario::DryRun => {
                reply(send, 200, &regcred());
                None
            }
            Scenario::NotADockerConfig => {
                let mut opaque = regcred();
                opaque["type"] = json!("Opaque");
                reply(send, 200, &opaque);
                None
            }
            Scenario::Created | Scenario::AlreadyExists => {
                reply(send, 200, &regcred());
                let (request, send) = expect(&mut handle, Method::POST, SECRETS).await;
                let body = body_json(request).await;
                match scenario {
                    Scenario::Created => reply(send, 201, &body),
                    _ => reply(send, 409, &status(409, "AlreadyExists")),
                }
                Some(body)
            }
        };
        // Nothing else is asked: the client is dropped once `provide` returns.
        assert!(
            handle.next_request().await.is_none(),
            "unexpected extra request"
        );
        created
    });
    let result = provide(client, "shop", &names, PROXY, dry_run).await;
    let created = tokio::time::timeout(std::time::Duration::from_secs(5), server)
        .await
        .expect("mock finished")
        .expect("mock did not panic");
    (result, created)
}

#[tokio::test]
async fn secret_found_derived_secret_created() {
    let (result, created) = run(Scenario::Created, &["regcred"], false).await;
    let name = result.unwrap().expect("a derived secret");
    let created = created.expect("a POST");
    assert_eq!(created["metadata"]["name"], name.as_str());
    assert_eq!(created["metadata"]["namespace"], "shop");
    assert_eq!(created["type"], DOCKER_CONFIG_JSON_TYPE);
    assert_eq!(created["immutable"], true);
    assert_eq!(
        created["metadata"]["labels"][MANAGED_BY_LABEL],
        MANAGED_BY_VALUE
    );
    assert_eq!(
        created["metadata"]["annotations"][DERIVED_FROM_ANNOTATION],
        "regcred"
    );
    // The version it was built from (uid/resourceVersion of the GET), for the controller's
    // clean-up to tell when this Secret is superseded.
    assert_eq!(
        created["metadata"]["annotations"][SOURCE_VERSIONS_ANNOTATION],
        r#"{"regcred":"uid-regcred/7"}"#
    );
    let data = created["data"][DOCKER_CONFIG_JSON_KEY].as_str().unwrap();
    let config: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        config["auths"]["localhost:7439/ghcr.io/"]["auth"],
        b64("u:p")
    );
}

#[tokio::test]
async fn already_exists_is_fine() {
    let (result, created) = run(Scenario::AlreadyExists, &["regcred"], false).await;
    let name = result.unwrap().expect("a derived secret");
    assert_eq!(created.unwrap()["metadata"]["name"], name.as_str());
}

#[tokio::test]
async fn forbidden_read_is_an_error_naming_the_secret() {
    let (result, created) = run(Scenario::ReadForbidden, &["regcred"], false).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, PullSecretError::Read { secret, .. } if secret == "regcred"),
        "{err:?}"
    );
    assert!(err.to_string().contains("`regcred`"), "{err}");
    assert!(created.is_none());
}

#[tokio::test]
async fn dry_run_writes_nothing_and_names_the_same_secret() {
    let (dry, created) = run(Scenario::DryRun, &["regcred"], true).await;
    assert!(created.is_none(), "no POST on a dry run");
    let (real, _) = run(Scenario::Created, &["regcred"], false).await;
    assert_eq!(dry.unwrap(), real.unwrap());
}

#[tokio::test]
async fn derived_and_duplicate_names_are_not_read() {
    // One GET only: the derived Secret is ours, the second `regcred` a repeat.
    let (result, _) = run(
        Scenario::Created,
        &["regcred", "larder-pull-0123456789", "regcred", ""],
        false,
    )
    .await;
    assert!(result.unwrap().is_some());
}

#[tokio::test]
async fn a_secret_kubelet_would_not_use_derives_nothing() {
    let (result, created) = run(Scenario::NotADockerConfig, &["regcred"], false).await;
    assert_eq!(result.unwrap(), None);
    assert!(created.is_none());
}

#[tokio::test]
async fn no_namespace_is_an_error_without_requests() {
    let (client, mut handle) = mock();
    let err = provide(client, "", &["regcred".to_owned()], PROXY, false)
        .await
        .unwrap_err();
    assert!(matches!(err, PullSecretError::NoNamespace));
    assert!(handle.next_request().await.is_none());
}
