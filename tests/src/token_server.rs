//! A tiny registry token server (the distribution "token" auth scheme) on a free loopback port,
//! so tests can run a real CNCF distribution registry with `auth: token` and exercise Bearer
//! token exchange with credentials.
//!
//! - `GET /token?service=..&scope=..` with `Authorization: Basic` (or none, for an anonymous
//!   token that grants nothing), and `POST /token` with the OAuth2 refresh-token grant
//!   (`grant_type=refresh_token&refresh_token=..`, a docker config's `identitytoken`).
//! - Known users get every action they ask for; wrong credentials get `401`.
//! - Tokens are ES256 JWTs whose `x5c` header carries a self-signed certificate; the same
//!   certificate is the registry's `rootcertbundle` ([`TokenServer::registry_yaml`]).
//!
//! Every request is logged (user, method, scopes; never a password) for assertions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

use crate::credentials::Credentials;
use crate::error::{HarnessError, Result};
use crate::image::{BuiltImage, MANIFEST_ACCEPT};
use crate::process::{run_checked, tool};

/// The `service` (JWT audience) the registry and the token server agree on.
pub const SERVICE: &str = "larder-test-registry";
/// The JWT issuer.
pub const ISSUER: &str = "larder-test-token-server";
/// How long issued tokens live.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// One request the token server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` (Basic or anonymous) or `POST` (refresh-token grant).
    pub method: String,
    /// The authenticated user; `None` for anonymous requests and refused ones.
    pub user: Option<String>,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    /// The status answered.
    pub status: u16,
}

struct Shared {
    users: HashMap<String, String>,
    refresh_tokens: HashMap<String, String>,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    rng: SystemRandom,
    log: Mutex<Vec<TokenRequest>>,
}

/// A running token server on its own thread and tokio runtime; stopped when dropped.
pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TokenServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Builds a [`TokenServer`].
#[derive(Debug, Default, Clone)]
pub struct TokenServerBuilder {
    users: Vec<(String, String)>,
    refresh_tokens: Vec<(String, String)>,
}

impl TokenServerBuilder {
    /// A user who may do anything, authenticated by `password`.
    pub fn user(mut self, username: &str, password: &str) -> Self {
        self.users.push((username.to_owned(), password.to_owned()));
        self
    }

    /// A refresh token (an `identitytoken`) standing for `username`.
    pub fn refresh_token(mut self, token: &str, username: &str) -> Self {
        self.refresh_tokens
            .push((token.to_owned(), username.to_owned()));
        self
    }

    /// Generates the signing key and certificate, binds a free loopback port and serves.
    pub fn start(self) -> Result<TokenServer> {
        let certified = rcgen::generate_simple_self_signed(vec!["larder-token-server".to_owned()])
            .map_err(|e| HarnessError::InvalidInput(format!("generating a certificate: {e}")))?;
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &certified.signing_key.serialize_der(),
            &rng,
        )
        .map_err(|e| HarnessError::InvalidInput(format!("loading the signing key: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("larder-token-server-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating a token server temp dir", e))?;
        let bundle = dir.path().join("root.pem");
        std::fs::write(&bundle, certified.cert.pem())
            .map_err(|e| HarnessError::io(format!("writing {}", bundle.display()), e))?;
        let shared = Arc::new(Shared {
            users: self.users.into_iter().collect(),
            refresh_tokens: self.refresh_tokens.into_iter().collect(),
            key,
            cert_der: certified.cert.der().to_vec(),
            rng,
            log: Mutex::default(),
        });

        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .map_err(|e| HarnessError::io("binding the token server", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| HarnessError::io("configuring the listener", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the listen address", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::io("starting a tokio runtime", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let router = Router::new()
            .route("/token", get(token_get).post(token_post))
            .with_state(shared.clone());
        let thread = std::thread::Builder::new()
            .name("token-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        r = axum::serve(listener, router) => {
                            if let Err(error) = r {
                                tracing::error!(%error, "token server");
                            }
                        }
                        _ = rx => {}
                    }
                });
            })
            .map_err(|e| HarnessError::io("starting the token server thread", e))?;
        Ok(TokenServer {
            addr,
            shared,
            dir,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }
}

impl TokenServer {
    /// A builder with no users.
    pub fn builder() -> TokenServerBuilder {
        TokenServerBuilder::default()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The realm: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The PEM file holding the signing certificate (the registry's `rootcertbundle`).
    pub fn root_cert_bundle(&self) -> PathBuf {
        self.dir.path().join("root.pem")
    }

    /// The YAML to merge into a distribution registry's configuration (see
    /// `RegistryOptions::with_extra_yaml`) so that it trusts this server.
    pub fn registry_yaml(&self) -> String {
        registry_yaml(&self.realm(), &self.root_cert_bundle())
    }

    /// A token for `user` granting `scope` (e.g. `repository:team/app:pull`), minted directly:
    /// for a test's own checks against the registry, without a request to the server.
    pub fn mint(&self, user: &str, scope: &str) -> Result<String> {
        let access = resource_actions(scope).into_iter().collect();
        sign(&self.shared, user, access).map_err(HarnessError::InvalidInput)
    }

    /// Pushes `image` as `<repo>:<tag>` to a registry trusting this server, with skopeo and
    /// `creds` (skopeo buys its token here), then checks with a minted token that the registry
    /// serves the image's digest for the tag. Returns the digest.
    pub fn push(
        &self,
        image: &BuiltImage,
        registry_host_port: &str,
        repo: &str,
        tag: &str,
        creds: &Credentials,
    ) -> Result<String> {
        let layout = tempfile::Builder::new()
            .prefix("larder-layout-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating an OCI layout temp dir", e))?;
        image.write_oci_layout(layout.path(), tag)?;
        let mut cmd = std::process::Command::new(tool("skopeo", "apt-get install skopeo")?);
        cmd.args([
            "copy",
            "--all",
            "--preserve-digests",
            "--quiet",
            "--dest-tls-verify=false",
            "--dest-creds",
        ])
        .arg(creds.user_colon_pass())
        .arg(format!("oci:{}:{tag}", layout.path().display()))
        .arg(format!("docker://{registry_host_port}/{repo}:{tag}"));
        run_checked(cmd, Duration::from_secs(120))?;
        let token = self.mint(&creds.username, &format!("repository:{repo}:pull"))?;
        let url = format!("http://{registry_host_port}/v2/{repo}/manifests/{tag}");
        let auth = format!("Bearer {token}");
        let response = crate::http::get(
            &url,
            &[("Accept", MANIFEST_ACCEPT), ("Authorization", &auth)],
        )?
        .error_for_status("GET", &url)?;
        let served = response.body_digest();
        if served != image.digest() {
            return Err(HarnessError::DigestMismatch {
                what: format!("body of {url} after push"),
                expected: image.digest().to_owned(),
                actual: served,
            });
        }
        Ok(served)
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn registry_yaml(realm: &str, bundle: &Path) -> String {
    serde_json::json!({"auth": {"token": {
        "realm": realm,
        "service": SERVICE,
        "issuer": ISSUER,
        "rootcertbundle": bundle,
    }}})
    .to_string()
}

async fn token_get(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
) -> Response {
    let scopes: Vec<String> = query
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned))
        .collect();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(basic_credentials);
    let user = match presented {
        None => None,
        Some(Some((user, password))) if shared.users.get(&user).is_some_and(|p| *p == password) => {
            Some(user)
        }
        Some(_) => return refuse(&shared, "GET", scopes),
    };
    issue(&shared, "GET", user, scopes)
}

async fn token_post(State(shared): State<Arc<Shared>>, body: String) -> Response {
    let form: Vec<(String, String)> = form_pairs(&body);
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let scopes: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_owned))
        .collect();
    let user = (field("grant_type").as_deref() == Some("refresh_token"))
        .then(|| field("refresh_token"))
        .flatten()
        .and_then(|t| shared.refresh_tokens.get(&t).cloned());
    match user {
        Some(user) => issue(&shared, "POST", Some(user), scopes),
        None => refuse(&shared, "POST", scopes),
    }
}

/// `a=b&c=d` (percent- and `+`-decoded).
fn form_pairs(body: &str) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%'
                && let Some(b) = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn basic_credentials(value: &str) -> Option<(String, String)> {
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn log(shared: &Shared, method: &str, user: Option<String>, scopes: Vec<String>, status: u16) {
    shared
        .log
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(TokenRequest {
            method: method.to_owned(),
            user,
            scopes,
            status,
        });
}

fn refuse(shared: &Shared, method: &str, scopes: Vec<String>) -> Response {
    log(shared, method, None, scopes, 401);
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(
            serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}),
        ),
    )
        .into_response()
}

/// A token for `user` granting every action asked for (nothing for anonymous requests).
fn issue(shared: &Shared, method: &str, user: Option<String>, scopes: Vec<String>) -> Response {
    let access: Vec<serde_json::Value> = match &user {
        None => Vec::new(),
        Some(_) => scopes.iter().filter_map(|s| resource_actions(s)).collect(),
    };
    match sign(shared, user.as_deref().unwrap_or(""), access) {
        Ok(token) => {
            log(shared, method, user, scopes, 200);
            axum::Json(serde_json::json!({
                "token": token,
                "access_token": token,
                "expires_in": TOKEN_LIFETIME.as_secs(),
            }))
            .into_response()
        }
        Err(detail) => {
            log(shared, method, user, scopes, 500);
            (StatusCode::INTERNAL_SERVER_ERROR, detail).into_response()
        }
    }
}

/// `repository:team/app:pull,push` → `{"type", "name", "actions"}`.
fn resource_actions(scope: &str) -> Option<serde_json::Value> {
    let (rest, actions) = scope.rsplit_once(':')?;
    let (type_, name) = rest.split_once(':')?;
    Some(serde_json::json!({
        "type": type_,
        "name": name,
        "actions": actions.split(',').filter(|a| !a.is_empty()).collect::<Vec<_>>(),
    }))
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn sign(
    shared: &Shared,
    subject: &str,
    access: Vec<serde_json::Value>,
) -> std::result::Result<String, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&shared.cert_der)],
    });
    let jti: [u8; 16] = rand::random();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + TOKEN_LIFETIME.as_secs(),
        "nbf": now.saturating_sub(10),
        "iat": now,
        "jti": hex::encode(jti),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let signature = shared
        .key
        .sign(&shared.rng, signing_input.as_bytes())
        .map_err(|e| format!("signing: {e}"))?;
    Ok(format!("{signing_input}.{}", b64url(signature.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_forms_parse() {
        assert_eq!(
            resource_actions("repository:team/app:pull,push"),
            Some(
                serde_json::json!({"type": "repository", "name": "team/app", "actions": ["pull", "push"]})
            )
        );
        assert_eq!(resource_actions("nonsense"), None);
        assert_eq!(
            form_pairs("grant_type=refresh_token&scope=repository%3Aa%2Fb%3Apull&x=a+b"),
            [
                ("grant_type".to_owned(), "refresh_token".to_owned()),
                ("scope".to_owned(), "repository:a/b:pull".to_owned()),
                ("x".to_owned(), "a b".to_owned()),
            ]
        );
        assert_eq!(
            basic_credentials("Basic YWxpY2U6d29uZGVybGFuZA=="),
            Some(("alice".to_owned(), "wonderland".to_owned()))
        );
    }
}
