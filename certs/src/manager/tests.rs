//! Mock-apiserver scenarios: each asserts the exact calls the manager makes and answers them
//! as the apiserver would.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::*;

const NS: &str = "larder";
const SECRET_PATH: &str = "/api/v1/namespaces/larder/secrets/larder-webhook-certs";
const SECRETS_PATH: &str = "/api/v1/namespaces/larder/secrets";
const MWC_PATH: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/larder";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Respond = tower_test::mock::SendResponse<Response<Body>>;

fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
}

fn config() -> SelfManagedConfig {
    SelfManagedConfig::new(
        Identity {
            service: "larder-webhook".into(),
            namespace: NS.into(),
        },
        "larder",
    )
}

fn testcontext() -> (CertManager, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, NS);
    (CertManager::new(client, config()), ApiServer(handle))
}

fn fresh_material(now: OffsetDateTime) -> Material {
    let cfg = config();
    match authority::ensure(None, &cfg.identity, &cfg.lifetimes, now).unwrap() {
        Outcome::Changed { material, .. } => material,
        Outcome::Unchanged => unreachable!(),
    }
}

fn stored_secret(material: &Material, resource_version: &str) -> Secret {
    let mut s = secret::secret_for("larder-webhook-certs", NS, material, None);
    s.metadata.resource_version = Some(resource_version.into());
    s
}

fn webhook_configuration(bundle: Option<&str>) -> MutatingWebhookConfiguration {
    let entry = |name: &str| MutatingWebhook {
        name: name.into(),
        admission_review_versions: vec!["v1".into()],
        side_effects: "None".into(),
        client_config: WebhookClientConfig {
            ca_bundle: bundle.map(|b| ByteString(b.as_bytes().to_vec())),
            ..WebhookClientConfig::default()
        },
        ..MutatingWebhook::default()
    };
    MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some("larder".into()),
            ..Default::default()
        },
        webhooks: Some(vec![
            entry("pods.larder.dev"),
            entry("ephemeral.larder.dev"),
        ]),
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("mock says {reason}"), "reason": reason, "code": code,
    })
}

/// What the apiserver will be asked, in order, and what it answers.
enum Scenario {
    /// Nothing stored yet: create the Secret, patch both webhook entries.
    FreshInstall,
    /// Valid material stored and published: two reads, no writes.
    AllInPlace(Material),
    /// Another replica creates the Secret between our read and our create.
    CreateRace { theirs: Material },
    /// Our replace conflicts with another replica's renewal, which we then adopt.
    ReplaceConflict { stale: Material, theirs: Material },
    /// The webhook configuration does not exist (yet).
    ConfigurationMissing,
    /// RBAC forbids reading the Secret.
    SecretForbidden,
}

struct ApiServer(Handle);

impl ApiServer {
    fn run(mut self, scenario: Scenario) -> JoinHandle<()> {
        tokio::spawn(async move {
            match scenario {
                Scenario::FreshInstall => {
                    let created = self.get_secret(None).await.create_secret().await;
                    let bundle = created.1.ca_bundle_pem.clone();
                    created
                        .0
                        .get_configuration(Some(webhook_configuration(None)))
                        .await
                        .patch_configuration(&bundle, &[0, 1])
                        .await;
                }
                Scenario::AllInPlace(m) => {
                    self.get_secret(Some(stored_secret(&m, "1")))
                        .await
                        .get_configuration(Some(webhook_configuration(Some(&m.ca_bundle_pem))))
                        .await;
                }
                Scenario::CreateRace { theirs } => {
                    self.get_secret(None)
                        .await
                        .answer_write(Method::POST, SECRETS_PATH, 409, "AlreadyExists")
                        .await
                        .get_secret(Some(stored_secret(&theirs, "7")))
                        .await
                        .get_configuration(Some(webhook_configuration(Some(&theirs.ca_bundle_pem))))
                        .await;
                }
                Scenario::ReplaceConflict { stale, theirs } => {
                    self.get_secret(Some(stored_secret(&stale, "3")))
                        .await
                        .answer_write(Method::PUT, SECRET_PATH, 409, "Conflict")
                        .await
                        .get_secret(Some(stored_secret(&theirs, "4")))
                        .await
                        .get_configuration(Some(webhook_configuration(Some(&theirs.ca_bundle_pem))))
                        .await;
                }
                Scenario::ConfigurationMissing => {
                    self.get_secret(None)
                        .await
                        .create_secret()
                        .await
                        .0
                        .get_configuration(None)
                        .await;
                }
                Scenario::SecretForbidden => {
                    let (req, send) = self.next(Method::GET, SECRET_PATH).await;
                    drop(req);
                    reply(send, 403, status(403, "Forbidden"));
                }
            }
        })
    }

    async fn next(&mut self, method: Method, path: &str) -> (Request<Body>, Respond) {
        let (request, send) = self.0.next_request().await.expect("service not called");
        assert_eq!(request.method(), method, "method of {}", request.uri());
        assert_eq!(request.uri().path(), path);
        (request, send)
    }

    async fn get_secret(mut self, stored: Option<Secret>) -> Self {
        let (_, send) = self.next(Method::GET, SECRET_PATH).await;
        match stored {
            Some(s) => reply(send, 200, serde_json::to_value(s).unwrap()),
            None => reply(send, 404, status(404, "NotFound")),
        }
        self
    }

    /// Accepts a create and returns what was stored.
    async fn create_secret(mut self) -> (Self, Material) {
        let (request, send) = self.next(Method::POST, SECRETS_PATH).await;
        let body: Secret = body_json(request).await;
        assert_eq!(body.metadata.name.as_deref(), Some("larder-webhook-certs"));
        assert_eq!(body.type_.as_deref(), Some("kubernetes.io/tls"));
        let material = secret::material_from(&body).expect("complete material");
        let mut stored = body.clone();
        stored.metadata.resource_version = Some("1".into());
        reply(send, 201, serde_json::to_value(stored).unwrap());
        (self, material)
    }

    async fn answer_write(mut self, method: Method, path: &str, code: u16, reason: &str) -> Self {
        let (request, send) = self.next(method.clone(), path).await;
        let body: Secret = body_json(request).await;
        if method == Method::PUT {
            assert!(
                body.metadata.resource_version.is_some(),
                "replace must be conditional"
            );
        }
        reply(send, code, status(code, reason));
        self
    }

    async fn get_configuration(mut self, config: Option<MutatingWebhookConfiguration>) -> Self {
        let (_, send) = self.next(Method::GET, MWC_PATH).await;
        match config {
            Some(c) => reply(send, 200, serde_json::to_value(c).unwrap()),
            None => reply(send, 404, status(404, "NotFound")),
        }
        self
    }

    async fn patch_configuration(mut self, bundle: &str, entries: &[usize]) -> Self {
        let (request, send) = self.next(Method::PATCH, MWC_PATH).await;
        assert_eq!(
            request.headers().get("content-type").unwrap(),
            "application/json-patch+json"
        );
        let patch: Value = body_json(request).await;
        let value = serde_json::to_value(ByteString(bundle.as_bytes().to_vec())).unwrap();
        let names = ["pods.larder.dev", "ephemeral.larder.dev"];
        let expected: Vec<Value> = entries
            .iter()
            .flat_map(|i| {
                [
                    json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": names[*i]}),
                    json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": value}),
                ]
            })
            .collect();
        assert_eq!(patch, Value::Array(expected));
        reply(
            send,
            200,
            serde_json::to_value(webhook_configuration(Some(bundle))).unwrap(),
        );
        self
    }
}

async fn body_json<T: serde::de::DeserializeOwned>(request: Request<Body>) -> T {
    let bytes = request.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn reply(send: Respond, code: u16, body: Value) {
    let response = Response::builder()
        .status(StatusCode::from_u16(code).unwrap())
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    send.send_response(response);
}

async fn finish(server: JoinHandle<()>) {
    tokio::time::timeout(Duration::from_secs(1), server)
        .await
        .expect("scenario finished in time")
        .expect("scenario assertions held");
}

#[tokio::test]
async fn fresh_install_creates_secret_and_publishes_bundle() {
    let (manager, server) = testcontext();
    let server = server.run(Scenario::FreshInstall);
    let r = manager.reconcile(t0()).await.unwrap();
    finish(server).await;
    assert_eq!(r.renewed, Some(Reason::Missing));
    assert!(matches!(r.publication, Publication::JustPublished));
}

#[tokio::test]
async fn valid_material_is_reused_without_writes() {
    let m = fresh_material(t0());
    let (manager, server) = testcontext();
    let server = server.run(Scenario::AllInPlace(m.clone()));
    let r = manager.reconcile(t0() + DAY).await.unwrap();
    finish(server).await;
    assert_eq!(r.material, m);
    assert_eq!(r.renewed, None);
    assert!(matches!(r.publication, Publication::AlreadyPublished));
}

#[tokio::test]
async fn create_race_adopts_the_other_replicas_material() {
    let theirs = fresh_material(t0());
    let (manager, server) = testcontext();
    let server = server.run(Scenario::CreateRace {
        theirs: theirs.clone(),
    });
    let r = manager.reconcile(t0()).await.unwrap();
    finish(server).await;
    assert_eq!(r.material, theirs);
    assert_eq!(r.renewed, None);
}

#[tokio::test]
async fn replace_conflict_rereads_and_adopts_the_renewal() {
    // Stored 80 days ago: the 90-day certificate is due. The other replica renewed it first.
    let stale = fresh_material(t0() - DAY * 80);
    let theirs =
        match authority::ensure(Some(&stale), &config().identity, &config().lifetimes, t0())
            .unwrap()
        {
            Outcome::Changed { material, reason } => {
                assert_eq!(reason, Reason::LeafExpiring);
                material
            }
            Outcome::Unchanged => unreachable!(),
        };
    let (manager, server) = testcontext();
    let server = server.run(Scenario::ReplaceConflict {
        stale,
        theirs: theirs.clone(),
    });
    let r = manager.reconcile(t0()).await.unwrap();
    finish(server).await;
    assert_eq!(r.material, theirs);
    assert_eq!(r.renewed, None);
}

#[tokio::test]
async fn missing_configuration_does_not_stop_serving() {
    let (manager, server) = testcontext();
    let server = server.run(Scenario::ConfigurationMissing);
    let r = manager.reconcile(t0()).await.unwrap();
    finish(server).await;
    assert!(matches!(
        r.publication,
        Publication::Failed(Error::WebhookConfigurationNotFound(_))
    ));
}

#[tokio::test]
async fn forbidden_secret_is_an_error() {
    let (manager, server) = testcontext();
    let server = server.run(Scenario::SecretForbidden);
    let err = manager.reconcile(t0()).await.unwrap_err();
    finish(server).await;
    assert_eq!(err.metric_label(), "kube");
    assert!(err.to_string().contains("get Secret"), "{err}");
}

#[test]
fn new_certificates_wait_for_their_bundle_unless_time_is_up() {
    assert!(should_serve(&Publication::AlreadyPublished, false));
    assert!(!should_serve(&Publication::JustPublished, false));
    assert!(!should_serve(
        &Publication::Failed(Error::Contended("s".into())),
        false
    ));
    assert!(should_serve(&Publication::JustPublished, true));
}

#[test]
fn expiry_margin() {
    let m = fresh_material(t0());
    let leaf = crate::pem::certificates(m.cert_pem.as_bytes(), "t").unwrap();
    assert!(!expires_within(&leaf[0], t0(), LAST_MOMENT));
    assert!(expires_within(
        &leaf[0],
        t0() + DAY * 90 - LAST_MOMENT / 2,
        LAST_MOMENT
    ));
    assert!(expires_within(&leaf[0], t0() + DAY * 91, LAST_MOMENT));
    assert!(expires_within(b"garbage", t0(), LAST_MOMENT));
}

#[tokio::test]
async fn hand_over_serves_renewals_and_holds_back_unpublished_authorities() {
    let (manager, _server) = testcontext();
    let m1 = fresh_material(t0());
    let resolver = CertResolver::from_pem(m1.cert_pem.as_bytes(), m1.key_pem.as_bytes()).unwrap();
    let leaf_of =
        |m: &Material| crate::pem::certificates(m.cert_pem.as_bytes(), "t").unwrap()[0].to_vec();

    // A new CA whose bundle was only just published: keep serving the old certificate.
    let m2 = fresh_material(t0());
    let r = Reconciled {
        material: m2.clone(),
        renewed: Some(Reason::CaExpiring),
        publication: Publication::JustPublished,
    };
    assert_eq!(manager.hand_over(&resolver, &r, t0()), RETRY_DELAY);
    assert_eq!(resolver.current().cert[0].to_vec(), leaf_of(&m1));

    // Next pass: the bundle was already there, so the new certificate is served.
    let r = Reconciled {
        publication: Publication::AlreadyPublished,
        renewed: None,
        ..r
    };
    assert_eq!(
        manager.hand_over(&resolver, &r, t0()),
        config().check_interval
    );
    assert_eq!(resolver.current().cert[0].to_vec(), leaf_of(&m2));
}
