//! A small OCI distribution client: manifests, blob HEAD/GET, uploads with cross-repository
//! mounts, streamed monolithic PUTs, and manifest DELETE.
//!
//! Auth follows a 401 challenge (parsed by [`larder_core::auth`]): `Bearer` buys a token from
//! the realm (anonymously, or with the endpoint's credentials as Basic, or their identity token
//! as an OAuth2 refresh token), cached per registry, scope and credential fingerprint; `Basic`
//! is answered with the endpoint's credentials, and sent up front from then on. Credentials
//! only go to the endpoint's own origin and its token realm: reqwest drops `Authorization` on
//! redirects to another host.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::auth::{Challenge, TokenCache, parse_challenge};
use bytes::Bytes;
use http::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use http::{Method, StatusCode};
use larder_core::auth::parse_token_response;
use larder_core::digest::Digest;
use larder_core::dockerconfig::Credentials;
use reqwest::Url;

use super::manifest::MANIFEST_ACCEPT;
use crate::{Error, Result};

/// Manifests larger than this are refused (the distribution default limit is 4 MiB).
pub const MANIFEST_MAX_BYTES: usize = 4 << 20;

/// Origins remembered as answering Basic challenges; cleared past this (it is only a hint).
const BASIC_HOSTS_MAX: usize = 1024;

/// One registry: its base URL, a name for messages, and the credentials to present there.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `scheme://host[:port]/`.
    pub base: Url,
    /// `host[:port]` as users write it (`docker.io` for Docker Hub).
    pub name: String,
    /// Presented only when the registry challenges; `None` is anonymous.
    pub credentials: Option<Arc<Credentials>>,
}

impl Endpoint {
    /// An endpoint at `base`, named by its host and port.
    pub fn new(base: Url) -> Self {
        let name = match (base.host_str(), base.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            _ => base.to_string(),
        };
        Self {
            base,
            name,
            credentials: None,
        }
    }

    /// The same registry, presenting `credentials`.
    pub fn with_credentials(&self, credentials: Option<Arc<Credentials>>) -> Self {
        Self {
            credentials,
            ..self.clone()
        }
    }

    /// The token cache key of `scope` here: anonymous tokens and each credential's apart.
    fn token_key(&self, scope: &str) -> String {
        match &self.credentials {
            Some(c) => format!("{scope}#{}", c.fingerprint()),
            None => format!("{scope}#anonymous"),
        }
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base.join(path).map_err(|e| Error::Protocol {
            registry: self.name.clone(),
            detail: format!("bad URL path {path}: {e}"),
        })
    }
}

/// A fetched manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its exact bytes.
    pub bytes: Bytes,
    /// The `Content-Type` it was served with (or its own `mediaType`).
    pub media_type: String,
    /// The digest of the bytes.
    pub digest: Digest,
}

/// The answer to a mount attempt.
#[derive(Debug, Clone)]
pub enum Mount {
    /// The blob is now in the target repository.
    Mounted,
    /// The registry opened an ordinary upload instead (mount refused or source unknown).
    Upload(Upload),
}

/// An open upload: where to `PUT` the blob, and the token scope that opened it (the `PUT` is
/// a stream, never retried, so it must carry the token bought for that scope).
#[derive(Debug, Clone)]
pub struct Upload {
    pub location: Url,
    scope: String,
}

/// The client; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    tokens: TokenCache,
    insecure: Vec<String>,
    /// Origins (`scheme://host:port`) that answered a Basic challenge.
    basic: Mutex<HashSet<String>>,
}

impl RegistryClient {
    /// A client reaching `insecure` registries (`host[:port]`) over plain http.
    pub fn new(insecure: Vec<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("larder-controller/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::Config(format!("building the HTTP client: {e}")))?;
        Ok(Self {
            http,
            tokens: TokenCache::default(),
            insecure,
            basic: Mutex::default(),
        })
    }

    /// The endpoint of an origin registry named as in image references.
    pub fn origin(&self, registry: &str) -> Result<Endpoint> {
        let scheme = if self.insecure.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        };
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let base = Url::parse(&format!("{scheme}://{host}/"))
            .map_err(|e| Error::Config(format!("registry `{registry}` is not a host: {e}")))?;
        Ok(Endpoint {
            base,
            name: registry.to_owned(),
            credentials: None,
        })
    }

    fn unreachable(ep: &Endpoint, e: &reqwest::Error) -> Error {
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        Error::Unreachable {
            registry: ep.name.clone(),
            detail,
        }
    }

    fn answers_basic(&self, origin: &str) -> bool {
        self.basic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(origin)
    }

    fn remember_basic(&self, origin: &str) {
        let mut basic = self.basic.lock().unwrap_or_else(PoisonError::into_inner);
        if basic.len() >= BASIC_HOSTS_MAX {
            basic.clear();
        }
        basic.insert(origin.to_owned());
    }

    /// Sends a request, answering one challenge: Bearer with a token for `scope` (bought with
    /// the endpoint's credentials when it has some), Basic with the endpoint's credentials.
    async fn send(
        &self,
        ep: &Endpoint,
        method: Method,
        url: Url,
        accept: Option<&str>,
        body: Option<(Bytes, &str)>,
        scope: &str,
    ) -> Result<reqwest::Response> {
        let origin = ep.base.origin().ascii_serialization();
        let token_key = ep.token_key(scope);
        let build = |authorization: Option<&str>| {
            let mut req = self.http.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(a) = authorization {
                req = req.header(AUTHORIZATION, a);
            }
            match &body {
                Some((bytes, content_type)) => {
                    req.header(CONTENT_TYPE, *content_type).body(bytes.clone())
                }
                None if method == Method::POST || method == Method::PUT => {
                    req.header(CONTENT_LENGTH, "0")
                }
                None => req,
            }
        };
        let basic = ep.credentials.as_ref().map(|c| c.basic_header());
        let first = match self.tokens.get(&origin, &token_key) {
            Some(token) => Some(format!("Bearer {token}")),
            None if self.answers_basic(&origin) => basic.clone(),
            None => None,
        };
        let response = build(first.as_deref())
            .send()
            .await
            .map_err(|e| Self::unreachable(ep, &e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let Some(challenge) = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge)
        else {
            return Ok(response);
        };
        let authorization = match challenge.scheme.as_str() {
            "bearer" => {
                let (token, lifetime) = self.fetch_token(ep, &challenge, scope).await?;
                let response = build(Some(&format!("Bearer {token}")))
                    .send()
                    .await
                    .map_err(|e| Self::unreachable(ep, &e))?;
                if response.status() != StatusCode::UNAUTHORIZED {
                    self.tokens.put(&origin, &token_key, token, lifetime);
                }
                return Ok(response);
            }
            // Already sent (or nothing to send): the 401 is the answer.
            "basic" if first.is_some() || basic.is_none() => return Ok(response),
            "basic" => basic,
            _ => return Ok(response),
        };
        let response = build(authorization.as_deref())
            .send()
            .await
            .map_err(|e| Self::unreachable(ep, &e))?;
        if response.status() != StatusCode::UNAUTHORIZED {
            self.remember_basic(&origin);
        }
        Ok(response)
    }

    /// The token flow: `GET realm?service=..&scope=..` (with Basic credentials when the
    /// endpoint has some), or, for an identity token, the OAuth2 refresh-token grant (`POST`).
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<(String, Duration)> {
        let denied = |detail: String| Error::Denied {
            registry: ep.name.clone(),
            detail,
        };
        let realm = challenge
            .param("realm")
            .ok_or_else(|| denied("Bearer challenge without realm".into()))?;
        let mut url = Url::parse(realm).map_err(|e| denied(format!("bad realm {realm}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(denied(format!("realm {realm} is not http(s)")));
        }
        let credentials = ep.credentials.as_deref();
        let request = match credentials.and_then(|c| c.identity_token.as_deref()) {
            Some(refresh_token) => {
                let mut form: Vec<(&str, &str)> = vec![
                    ("grant_type", "refresh_token"),
                    ("refresh_token", refresh_token),
                    ("client_id", "larder"),
                ];
                if let Some(service) = challenge.param("service") {
                    form.push(("service", service));
                }
                // The form encoding of a URL query is `application/x-www-form-urlencoded`.
                let mut encoder = url.clone();
                encoder.set_query(None);
                encoder
                    .query_pairs_mut()
                    .extend_pairs(form)
                    .extend_pairs(scope.split(' ').map(|s| ("scope", s)));
                let body = encoder.query().unwrap_or_default().to_owned();
                self.http
                    .post(url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body)
            }
            None => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(service) = challenge.param("service") {
                        q.append_pair("service", service);
                    }
                    for s in scope.split(' ') {
                        q.append_pair("scope", s);
                    }
                }
                let request = self.http.get(url);
                match credentials {
                    Some(c) => request.header(AUTHORIZATION, c.basic_header()),
                    None => request,
                }
            }
        };
        let response = request
            .send()
            .await
            .map_err(|e| Self::unreachable(ep, &e))?;
        if !response.status().is_success() {
            return Err(denied(format!(
                "token service answered {}",
                response.status()
            )));
        }
        let bytes = read_limited(ep, response, 64 << 10).await?;
        parse_token_response(&bytes).map_err(|e| denied(e.to_string()))
    }

    /// `GET /v2/<repo>/manifests/<reference>`, size-limited, digest computed (and checked
    /// against `reference` when it is a digest, and against `Docker-Content-Digest`).
    pub async fn get_manifest(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
    ) -> Result<Manifest> {
        let url = ep.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let what = format!("manifest {repo}:{reference}");
        let response = self
            .send(
                ep,
                Method::GET,
                url,
                Some(MANIFEST_ACCEPT),
                None,
                &pull(repo),
            )
            .await?;
        let response = check(ep, response, &what).await?;
        let header_digest = header_str(&response, "docker-content-digest");
        let content_type = header_str(&response, CONTENT_TYPE.as_str());
        let bytes = read_limited(ep, response, MANIFEST_MAX_BYTES).await?;
        let digest = Digest::sha256_of(&bytes);
        for expected in [Some(reference), header_digest.as_deref()]
            .into_iter()
            .flatten()
        {
            if let Ok(expected) = Digest::parse(expected)
                && expected.algorithm() == digest.algorithm()
                && expected != digest
            {
                return Err(Error::DigestMismatch {
                    what,
                    expected: expected.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let media_type = content_type
            .filter(|c| !c.is_empty() && c != "application/json")
            .or_else(|| {
                serde_json::from_slice::<super::manifest::AnyManifest>(&bytes)
                    .ok()
                    .and_then(|m| m.media_type)
            })
            .ok_or_else(|| Error::BadManifest {
                what: what.clone(),
                detail: "no media type".into(),
            })?;
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// `HEAD /v2/<repo>/manifests/<reference>`: the digest, or `None` when absent.
    pub async fn head_manifest(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
    ) -> Result<Option<String>> {
        let url = ep.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let what = format!("manifest {repo}:{reference}");
        let response = self
            .send(
                ep,
                Method::HEAD,
                url,
                Some(MANIFEST_ACCEPT),
                None,
                &pull(repo),
            )
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let response = check(ep, response, &what).await?;
        header_str(&response, "docker-content-digest")
            .map(Some)
            .ok_or_else(|| Error::Protocol {
                registry: ep.name.clone(),
                detail: format!("HEAD {what} without Docker-Content-Digest"),
            })
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with the exact bytes.
    pub async fn put_manifest(
        &self,
        ep: &Endpoint,
        repo: &str,
        reference: &str,
        manifest: &Manifest,
    ) -> Result<()> {
        let url = ep.url(&format!("v2/{repo}/manifests/{reference}"))?;
        let response = self
            .send(
                ep,
                Method::PUT,
                url,
                None,
                Some((manifest.bytes.clone(), &manifest.media_type)),
                &push(repo),
            )
            .await?;
        check(ep, response, &format!("PUT manifest {repo}:{reference}")).await?;
        Ok(())
    }

    /// `DELETE /v2/<repo>/manifests/<digest>`; absent counts as deleted.
    pub async fn delete_manifest(&self, ep: &Endpoint, repo: &str, digest: &str) -> Result<()> {
        let url = ep.url(&format!("v2/{repo}/manifests/{digest}"))?;
        let response = self
            .send(
                ep,
                Method::DELETE,
                url,
                None,
                None,
                &format!("repository:{repo}:delete"),
            )
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        check(ep, response, &format!("DELETE manifest {repo}@{digest}")).await?;
        Ok(())
    }

    /// `HEAD /v2/<repo>/blobs/<digest>`: whether the repository has the blob.
    pub async fn blob_exists(&self, ep: &Endpoint, repo: &str, digest: &str) -> Result<bool> {
        let url = ep.url(&format!("v2/{repo}/blobs/{digest}"))?;
        let response = self
            .send(ep, Method::HEAD, url, None, None, &pull(repo))
            .await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        check(ep, response, &format!("blob {repo}@{digest}")).await?;
        Ok(true)
    }

    /// `GET /v2/<repo>/blobs/<digest>`, redirects followed; the body is read by the caller.
    pub async fn get_blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
    ) -> Result<reqwest::Response> {
        let url = ep.url(&format!("v2/{repo}/blobs/{digest}"))?;
        let response = self
            .send(ep, Method::GET, url, None, None, &pull(repo))
            .await?;
        check(ep, response, &format!("blob {repo}@{digest}")).await
    }

    /// `GET /v2/<repo>/blobs/<digest>` read whole, for small blobs (image configs): refused
    /// past `limit` bytes, and checked against the digest.
    pub async fn get_blob_bytes(
        &self,
        ep: &Endpoint,
        repo: &str,
        digest: &str,
        limit: usize,
    ) -> Result<Bytes> {
        let response = self.get_blob(ep, repo, digest).await?;
        let bytes = read_limited(ep, response, limit).await?;
        if let Ok(expected) = Digest::parse(digest) {
            let actual = Digest::sha256_of(&bytes);
            if expected.algorithm() == actual.algorithm() && expected != actual {
                return Err(Error::DigestMismatch {
                    what: format!("blob {repo}@{digest}"),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        Ok(bytes)
    }

    /// Starts an upload into `repo`, asking to mount `digest` from `from` when given.
    pub async fn start_upload(
        &self,
        ep: &Endpoint,
        repo: &str,
        mount: Option<(&str, &str)>,
    ) -> Result<Mount> {
        let mut url = ep.url(&format!("v2/{repo}/blobs/uploads/"))?;
        let mut scope = push(repo);
        if let Some((digest, from)) = mount {
            url.query_pairs_mut()
                .append_pair("mount", digest)
                .append_pair("from", from);
            scope = format!("{scope} {}", pull(from));
        }
        let response = self.send(ep, Method::POST, url, None, None, &scope).await?;
        let status = response.status();
        let response = check(ep, response, &format!("upload into {repo}")).await?;
        if status == StatusCode::CREATED && mount.is_some() {
            return Ok(Mount::Mounted);
        }
        let location = header_str(&response, LOCATION.as_str()).ok_or_else(|| Error::Protocol {
            registry: ep.name.clone(),
            detail: format!("upload into {repo} answered {status} without Location"),
        })?;
        let url = ep.base.join(&location).map_err(|e| Error::Protocol {
            registry: ep.name.clone(),
            detail: format!("bad upload Location {location}: {e}"),
        })?;
        Ok(Mount::Upload(Upload {
            location: url,
            scope,
        }))
    }

    /// Completes an upload with one streamed `PUT <location>?digest=…` of `size` bytes.
    /// The body is never retried (it is a stream), so the token must already be cached by
    /// [`RegistryClient::start_upload`].
    pub async fn put_blob(
        &self,
        ep: &Endpoint,
        repo: &str,
        upload: Upload,
        digest: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<()> {
        let Upload {
            mut location,
            scope,
        } = upload;
        location.query_pairs_mut().append_pair("digest", digest);
        let key = ep.base.origin().ascii_serialization();
        let mut req = self
            .http
            .put(location)
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        if let Some(token) = self.tokens.get(&key, &ep.token_key(&scope)) {
            req = req.header(AUTHORIZATION, format!("Bearer {token}"));
        } else if self.answers_basic(&key)
            && let Some(c) = &ep.credentials
        {
            req = req.header(AUTHORIZATION, c.basic_header());
        }
        let response = req.send().await.map_err(|e| Self::unreachable(ep, &e))?;
        check(ep, response, &format!("PUT blob {repo}@{digest}")).await?;
        Ok(())
    }
}

fn pull(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn push(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

fn header_str(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Maps a non-2xx answer to the error that says whose problem it is.
async fn check(
    ep: &Endpoint,
    response: reqwest::Response,
    what: &str,
) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = read_limited(ep, response, 4096).await.unwrap_or_default();
    let detail = format!("{what}: {status} {}", String::from_utf8_lossy(&body).trim());
    let registry = ep.name.clone();
    Err(match status {
        StatusCode::NOT_FOUND => Error::NotFound {
            registry,
            what: what.to_owned(),
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Denied { registry, detail },
        StatusCode::TOO_MANY_REQUESTS => Error::Unreachable { registry, detail },
        s if s.is_server_error() => Error::Unreachable { registry, detail },
        _ => Error::Protocol { registry, detail },
    })
}

async fn read_limited(
    ep: &Endpoint,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes> {
    let mut out = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| RegistryClient::unreachable(ep, &e))?
    {
        if out.len() + chunk.len() > limit {
            return Err(Error::Protocol {
                registry: ep.name.clone(),
                detail: format!("response larger than {limit} bytes"),
            });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}
