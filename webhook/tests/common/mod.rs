//! Shared harness for the integration tests: generated certificates, a real webhook on a
//! loopback port, and a TLS client that trusts only the generated CA.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use larder_webhook::config::Config;
use larder_webhook::{CancellationToken, Webhook, WebhookArgs};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Every network step of a test is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

/// The binary installs the ring provider in `main`, which tests do not run.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only means another test binary's code already installed one: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A throwaway CA that issues serving certificates for `localhost` and 127.0.0.1.
pub struct Pki {
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca_pem: ca.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A fresh certificate and key (PEM) for the loopback names.
    pub fn issue(&self) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A webhook served from certificate files in a temporary directory.
pub struct TestWebhook {
    pub webhook: Option<Webhook>,
    pub pki: Pki,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl TestWebhook {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut WebhookArgs)) -> Self {
        Self::start_inner(adjust, None).await
    }

    /// [`start_with`](Self::start_with), talking to `client` (a mock apiserver) for Secrets.
    pub async fn start_with_client(
        client: kube::Client,
        adjust: impl FnOnce(&mut WebhookArgs),
    ) -> Self {
        Self::start_inner(adjust, Some(client)).await
    }

    async fn start_inner(
        adjust: impl FnOnce(&mut WebhookArgs),
        client: Option<kube::Client>,
    ) -> Self {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let (cert, key) = pki.issue();
        let cert_path = dir.path().join("tls.crt");
        let key_path = dir.path().join("tls.key");
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let mut args = WebhookArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert: Some(cert_path.clone()),
            tls_key: Some(key_path.clone()),
            proxy_address: "localhost:7439".into(),
            exclude_images: vec![r"^quay\.io/excluded/".into()],
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            self_managed_certs: false,
            webhook_configuration: None,
            service: None,
            namespace: None,
            cert_secret: None,
            shutdown_grace: Duration::from_secs(2),
            pull_secrets: larder_webhook::pull_secrets::PullSecretsMode::Skip,
        };
        adjust(&mut args);
        let config = Config::try_from(args).unwrap();
        let shutdown = CancellationToken::new();
        let start = async {
            match client {
                Some(client) => Webhook::start_with_client(config, client, shutdown.clone()).await,
                None => Webhook::start(config, shutdown.clone()).await,
            }
        };
        let webhook = tokio::time::timeout(STEP, start)
            .await
            .expect("started in time")
            .expect("started")
            .expect("files mode always has certificates");
        TestWebhook {
            webhook: Some(webhook),
            pki,
            cert_path,
            key_path,
            shutdown,
            _dir: dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.webhook.as_ref().unwrap().webhook_addr()
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.webhook.as_ref().unwrap().metrics_addr()
    }

    pub fn client(&self) -> TlsClient {
        TlsClient::new(&self.pki.ca_pem)
    }

    /// POSTs `body` to `/mutate-pods` over a new TLS connection.
    pub async fn post(&self, body: impl Into<Bytes>) -> Answer {
        self.client()
            .post(self.addr(), body.into())
            .await
            .expect("request completed")
    }

    pub async fn stop(mut self) {
        let webhook = self.webhook.take().unwrap();
        tokio::time::timeout(STEP, webhook.stop())
            .await
            .expect("stopped in time")
            .expect("stopped cleanly");
    }
}

/// What came back from one request.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
    /// The certificate the server presented in this connection's handshake.
    pub peer_cert: CertificateDer<'static>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A rustls client trusting one CA, one connection per request (so every request sees the
/// certificate the server has at that moment).
pub struct TlsClient {
    connector: TlsConnector,
    server_name: String,
}

impl TlsClient {
    pub fn new(ca_pem: &str) -> Self {
        Self::with_alpn(ca_pem, vec![b"http/1.1".to_vec()])
    }

    pub fn with_alpn(ca_pem: &str, alpn: Vec<Vec<u8>>) -> Self {
        install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        for cert in larder_certs::pem::certificates(ca_pem.as_bytes(), "test CA").unwrap() {
            roots.add(cert).unwrap();
        }
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn;
        TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name: "localhost".to_owned(),
        }
    }

    /// Verify the server as `name` (and send it as SNI) instead of `localhost`.
    pub fn with_server_name(mut self, name: &str) -> Self {
        self.server_name = name.to_owned();
        self
    }

    pub async fn post(&self, addr: SocketAddr, body: Bytes) -> Result<Answer, String> {
        self.send(addr, Method::POST, "/mutate-pods", body).await
    }

    pub async fn send(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, String> {
        tokio::time::timeout(STEP, self.send_inner(addr, method, path, body))
            .await
            .map_err(|_| "timed out".to_owned())?
    }

    async fn send_inner(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Answer, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from(self.server_name.clone()).unwrap();
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let peer_cert = session
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no peer certificate")?
            .clone()
            .into_owned();
        let h2 = session.alpn_protocol() == Some(b"h2");
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("host", "localhost")
            .body(Full::new(body))
            .unwrap();
        let response = if h2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(request).await
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| format!("http1 handshake: {e}"))?;
            tokio::spawn(conn);
            send.send_request(request).await
        }
        .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            body,
            peer_cert,
        })
    }
}

/// GET over plain HTTP (the admin port).
pub async fn http_get(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let fut = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::get(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(STEP, fut)
        .await
        .expect("admin answered in time")
}

/// An AdmissionReview for creating `pod`.
pub fn create_review(pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "3c2f6a5e-0b1d-4e3a-9f6c-1a2b3c4d5e6f",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "",
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// A realistic pod as a ReplicaSet controller creates it (defaults applied).
pub fn realistic_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9c8b6f5-",
            "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9c8b6f5"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9c8b6f5",
                                  "uid": "0b6e1c2a-1111-2222-3333-444455556666", "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "initContainers": [{"name": "migrate", "image": "ghcr.io/shop/migrate:2.4.1", "imagePullPolicy": "IfNotPresent",
                                "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"}],
            "containers": [
                {"name": "web", "image": "nginx:1.27", "imagePullPolicy": "IfNotPresent",
                 "ports": [{"containerPort": 80, "protocol": "TCP"}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                 "volumeMounts": [{"name": "kube-api-access-abcde", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}],
                 "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File"},
                {"name": "metrics", "image": "registry.example.com:5000/ops/exporter@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                 "imagePullPolicy": "IfNotPresent"},
                {"name": "vendor", "image": "quay.io/excluded/agent:1", "imagePullPolicy": "IfNotPresent"}
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority",
            "volumes": [{"name": "kube-api-access-abcde", "projected": {"sources": [{"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}}]}}]
        },
        "status": {}
    })
}

/// The JSON patch in an answer (base64 on the wire).
pub fn patch_of(answer: &Value) -> json_patch::Patch {
    let bytes: k8s_openapi::ByteString =
        serde_json::from_value(answer["response"]["patch"].clone()).expect("patch present");
    serde_json::from_slice(&bytes.0).unwrap()
}
