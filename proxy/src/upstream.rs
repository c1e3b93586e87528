//! HTTP requests to the two upstreams: the cache registry and the image's origin registry.
//! Every request has a deadline; 401 challenges are answered with an anonymous Bearer token.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode, Url};

use std::sync::Arc;

use crate::access::{Access, Privacy};
use crate::credentials::{Credentials, CredentialsFile};
use crate::error::{ProxyError, Upstream};
use crate::metrics::{Kind, ProxyMetrics};
use crate::policy::{PolicyResolver, RegistryPolicy, find_refusal};
use crate::route::Image;
use larder_core::auth::{self, DEFAULT_TOKEN_LIFETIME, TokenCache};

/// What the proxy accepts for manifests: every kind, so images are served verbatim.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, \
application/vnd.docker.distribution.manifest.v1+json;q=0.5";

/// What a referrers response is: an image index.
pub const REFERRERS_ACCEPT: &str = "application/vnd.oci.image.index.v1+json";

/// Manifests larger than this are refused (distribution's own limit is 4 MiB).
pub const MANIFEST_MAX_BYTES: usize = 4 << 20;
const TOKEN_RESPONSE_MAX_BYTES: usize = 64 << 10;

/// One request to an upstream: `<method> /v2/<image>/<suffix>`.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub upstream: Upstream,
    pub method: Method,
    pub image: &'a Image,
    /// `manifests/<ref>`, `blobs/<digest>`, `tags/list[?query]` or `referrers/<digest>[?query]`.
    pub suffix: &'a str,
    pub kind: Kind,
    /// What the client presented; used with the origin only.
    pub credentials: Option<Arc<Credentials>>,
    /// A `Range` header value (`bytes=N-` or `bytes=N-M`) for ranged blob downloads; it follows
    /// redirects (reqwest drops only credentials when the host changes).
    pub range: Option<String>,
}

/// Settings of [`UpstreamClient`].
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub cache_registry: Option<Url>,
    pub cache_timeout: Duration,
    pub insecure_registries: Vec<String>,
    pub allow_registries: Vec<String>,
    pub credentials_file: Option<Arc<CredentialsFile>>,
    /// Where private verdicts are persisted (beside the disk tier).
    pub private_markers: Option<std::path::PathBuf>,
    pub upstream_timeout: Duration,
    pub idle_timeout: Duration,
    /// When blobs are fetched as concurrent ranges (see [`crate::ranged`]).
    pub ranged: crate::ranged::RangedConfig,
}

/// The client for both upstreams.
#[derive(Debug)]
pub struct UpstreamClient {
    http: reqwest::Client,
    config: UpstreamConfig,
    insecure: HashSet<String>,
    policy: Arc<RegistryPolicy>,
    tokens: TokenCache,
    credentials_file: Option<Arc<CredentialsFile>>,
    /// Which repositories are private, and which clients may read them.
    pub access: Access,
}

/// How many redirects one request may follow (blob GETs are usually redirected once, to a CDN).
const MAX_REDIRECTS: usize = 5;

impl UpstreamClient {
    pub fn new(config: UpstreamConfig) -> Result<Self, ProxyError> {
        let mut named = config.insecure_registries.clone();
        if let Some(cache) = &config.cache_registry
            && let Some(host) = cache.host_str()
        {
            // The operator named the cache registry; it is usually cluster-internal.
            named.push(match cache.port_or_known_default() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            });
        }
        let policy = Arc::new(
            RegistryPolicy::new(config.allow_registries.clone(), named).map_err(|detail| {
                ProxyError::BadUpstream {
                    upstream: Upstream::Origin,
                    detail: format!("--allow-registry {detail}"),
                }
            })?,
        );
        let redirect_policy = Arc::clone(&policy);
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            let from_https = attempt
                .previous()
                .last()
                .is_some_and(|u| u.scheme() == "https");
            match redirect_policy.check_redirect(attempt.url(), from_https) {
                // reqwest drops Authorization and cookies when the host changes.
                Ok(()) => attempt.follow(),
                Err(refusal) => attempt.error(refusal),
            }
        });
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(PolicyResolver {
                policy: Arc::clone(&policy),
            }))
            .redirect(redirects)
            .connect_timeout(config.upstream_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(32)
            .user_agent(concat!("larder-proxy/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProxyError::Unavailable {
                upstream: Upstream::Origin,
                detail: format!("building the HTTP client: {e}"),
            })?;
        let insecure = config
            .insecure_registries
            .iter()
            .map(|r| r.to_ascii_lowercase())
            .collect();
        Ok(UpstreamClient {
            http,
            insecure,
            policy,
            tokens: TokenCache::default(),
            credentials_file: config.credentials_file.clone(),
            access: Access::open(config.private_markers.clone()),
            config,
        })
    }

    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// The HTTP client (allow rules, timeouts, redirects), for the write-through's uploads.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    pub fn has_cache(&self) -> bool {
        self.config.cache_registry.is_some()
    }

    /// The URL of `<suffix>` (`manifests/<ref>` or `blobs/<digest>`) for `image` on `upstream`.
    pub fn url(&self, upstream: Upstream, image: &Image, suffix: &str) -> Option<Url> {
        let text = match upstream {
            Upstream::Cache => {
                let base = self.config.cache_registry.as_ref()?;
                format!(
                    "{}/v2/{}/{suffix}",
                    base.as_str().trim_end_matches('/'),
                    image.proxy_repository()
                )
            }
            Upstream::Origin => {
                let scheme = if self.insecure.contains(&image.registry) {
                    "http"
                } else {
                    "https"
                };
                // Docker Hub's API lives on another name than its references use.
                let host = match image.registry.as_str() {
                    "docker.io" => "registry-1.docker.io",
                    other => other,
                };
                format!("{scheme}://{host}/v2/{}/{suffix}", image.repository)
            }
        };
        Url::parse(&text).ok()
    }

    /// Deadline for an answer from `upstream`.
    pub fn timeout(&self, upstream: Upstream) -> Duration {
        match upstream {
            Upstream::Cache => self.config.cache_timeout,
            Upstream::Origin => self.config.upstream_timeout,
        }
    }

    /// Sends one request and returns the response if it succeeded (2xx); every other outcome
    /// is mapped to a [`ProxyError`] that says whose fault it was. `deadline` bounds the time
    /// until response headers, including one token exchange.
    pub async fn send(
        &self,
        call: Call<'_>,
        deadline: Duration,
        metrics: &ProxyMetrics,
    ) -> Result<reqwest::Response, ProxyError> {
        let (upstream, kind) = (call.upstream, call.kind);
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, self.send_with_auth(&call))
            .await
            .unwrap_or_else(|_| {
                Err(ProxyError::Unavailable {
                    upstream,
                    detail: format!("no answer within {deadline:?}"),
                })
            });
        metrics.upstream_latency(upstream, kind, started.elapsed().as_secs_f64());
        if let Err(err) = &result
            && !matches!(err, ProxyError::NotFound { .. })
        {
            metrics.upstream_error(upstream, err.metric_label());
        }
        result
    }

    async fn send_with_auth(&self, call: &Call<'_>) -> Result<reqwest::Response, ProxyError> {
        let Call {
            upstream,
            ref method,
            image,
            suffix,
            kind,
            ref credentials,
            ref range,
        } = *call;
        let range = range.as_deref();
        let url = self
            .url(upstream, image, suffix)
            .ok_or_else(|| ProxyError::BadUpstream {
                upstream,
                detail: format!(
                    "cannot build a URL for {}/{suffix}",
                    image.proxy_repository()
                ),
            })?;
        if upstream == Upstream::Origin {
            self.policy.precheck(
                url.host_str().unwrap_or_default(),
                url.port_or_known_default(),
            )?;
        }
        let origin_key = url.origin().ascii_serialization();
        let repository = image.proxy_repository();
        // Credentials only ever go to the origin: the client's own, else the operator's file.
        let credentials = match upstream {
            Upstream::Origin => credentials.clone().or_else(|| {
                self.credentials_file
                    .as_ref()
                    .and_then(|f| f.get(&image.registry))
                    .map(Arc::new)
            }),
            Upstream::Cache => None,
        };
        let privacy = self.access.privacy(&repository);
        let mut challenge = None;
        // Anonymous first, unless we already know the answer: that is how a repository is
        // found to be private before any of its content reaches a cache tier.
        let skip_anonymous = credentials.is_some()
            && (privacy == Privacy::Private
                || (privacy == Privacy::Public && call.credentials.is_none()));
        if !skip_anonymous {
            let scope = token_scope(&image.repository, None);
            let token = self.tokens.get(&origin_key, &scope);
            let response = self
                .raw(upstream, method, &url, kind, range, token.map(bearer))
                .await?;
            if !is_auth_failure(response.status()) {
                return self.anonymous_answer(upstream, &repository, response, kind);
            }
            challenge = parse_challenge_of(&response);
            if let Some(c) = challenge.as_ref().filter(|c| c.scheme == "bearer")
                && let Ok((token, lifetime)) = self.fetch_token(upstream, c, image, None).await
            {
                let response = self
                    .raw(
                        upstream,
                        method,
                        &url,
                        kind,
                        range,
                        Some(bearer(token.clone())),
                    )
                    .await?;
                if !is_auth_failure(response.status()) {
                    if response.status().is_success() {
                        self.tokens.put(&origin_key, &scope, token, lifetime);
                    }
                    return self.anonymous_answer(upstream, &repository, response, kind);
                }
            }
            if upstream == Upstream::Origin {
                self.access.mark_private(&repository);
            }
            // The operator's credentials fetch public content; they never stand in for a
            // client's own proof of access to a private repository.
            if call.credentials.is_none() {
                return Err(ProxyError::Denied {
                    upstream,
                    status: StatusCode::UNAUTHORIZED,
                    detail: format!(
                        "{repository} is private: present credentials its registry accepts"
                    ),
                });
            }
        }
        let Some(credentials) = credentials else {
            return Err(ProxyError::Denied {
                upstream,
                status: StatusCode::UNAUTHORIZED,
                detail: format!("{repository} needs credentials"),
            });
        };
        let scope = token_scope(&image.repository, Some(&credentials.fingerprint()));
        if let Some(token) = self.tokens.get(&origin_key, &scope) {
            let response = self
                .raw(upstream, method, &url, kind, range, Some(bearer(token)))
                .await?;
            if !is_auth_failure(response.status()) {
                return check_status(upstream, response, kind);
            }
        }
        let challenge = match challenge {
            Some(c) => Some(c),
            None => {
                let response = self.raw(upstream, method, &url, kind, range, None).await?;
                if !is_auth_failure(response.status()) {
                    return check_status(upstream, response, kind);
                }
                parse_challenge_of(&response)
            }
        };
        match challenge.filter(|c| c.scheme == "bearer") {
            Some(c) => {
                let (token, lifetime) = self
                    .fetch_token(upstream, &c, image, Some(&credentials))
                    .await?;
                let response = self
                    .raw(
                        upstream,
                        method,
                        &url,
                        kind,
                        range,
                        Some(bearer(token.clone())),
                    )
                    .await?;
                let response = check_status(upstream, response, kind)?;
                self.tokens.put(&origin_key, &scope, token, lifetime);
                Ok(response)
            }
            None => {
                let response = self
                    .raw(
                        upstream,
                        method,
                        &url,
                        kind,
                        range,
                        Some(credentials.basic_header()),
                    )
                    .await?;
                check_status(upstream, response, kind)
            }
        }
    }

    /// An answer to an anonymous request: the repository is public if the origin served it.
    fn anonymous_answer(
        &self,
        upstream: Upstream,
        repository: &str,
        response: reqwest::Response,
        kind: Kind,
    ) -> Result<reqwest::Response, ProxyError> {
        let response = check_status(upstream, response, kind)?;
        if upstream == Upstream::Origin {
            self.access.mark_public(repository);
        }
        Ok(response)
    }

    async fn raw(
        &self,
        upstream: Upstream,
        method: &Method,
        url: &Url,
        kind: Kind,
        range: Option<&str>,
        authorization: Option<String>,
    ) -> Result<reqwest::Response, ProxyError> {
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(range) = range {
            request = request.header(reqwest::header::RANGE, range);
        }
        match kind {
            Kind::manifest => request = request.header(ACCEPT, MANIFEST_ACCEPT),
            Kind::referrers => request = request.header(ACCEPT, REFERRERS_ACCEPT),
            Kind::tags => request = request.header(ACCEPT, "application/json"),
            Kind::blob | Kind::base => {}
        }
        if let Some(authorization) = authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        request.send().await.map_err(|e| send_error(upstream, &e))
    }

    /// The anonymous token flow: `GET realm?service=..&scope=..`.
    async fn fetch_token(
        &self,
        upstream: Upstream,
        challenge: &auth::Challenge,
        image: &Image,
        credentials: Option<&Credentials>,
    ) -> Result<(String, Duration), ProxyError> {
        let denied = |detail: String| ProxyError::Denied {
            upstream,
            status: StatusCode::UNAUTHORIZED,
            detail,
        };
        let realm = challenge
            .param("realm")
            .ok_or_else(|| denied("the Bearer challenge has no realm".into()))?;
        let mut url =
            Url::parse(realm).map_err(|e| denied(format!("bad token realm `{realm}`: {e}")))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(denied(format!("token realm `{realm}` is not http(s)")));
        }
        // A registry must not be able to send us to the metadata service through its realm.
        self.policy.precheck(
            url.host_str().unwrap_or_default(),
            url.port_or_known_default(),
        )?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = challenge.param("service") {
                query.append_pair("service", service);
            }
            let scope = challenge
                .param("scope")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("repository:{}:pull", image.repository));
            query.append_pair("scope", &scope);
        }
        let mut request = self.http.get(url);
        if let Some(credentials) = credentials {
            request = request.header(AUTHORIZATION, credentials.basic_header());
        }
        let response = request
            .send()
            .await
            .map_err(|e| match send_error(upstream, &e) {
                ProxyError::Unavailable { upstream, detail } => ProxyError::Unavailable {
                    upstream,
                    detail: format!("token service: {detail}"),
                },
                other => other,
            })?;
        if !response.status().is_success() {
            return Err(denied(format!(
                "token service answered {}",
                response.status()
            )));
        }
        let body = read_limited(response, TOKEN_RESPONSE_MAX_BYTES, upstream).await?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| denied(format!("token service sent invalid JSON: {e}")))?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| denied("token service sent no token".into()))?;
        let lifetime = parsed
            .expires_in
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        Ok((token, lifetime))
    }
}

fn check_status(
    upstream: Upstream,
    response: reqwest::Response,
    kind: Kind,
) -> Result<reqwest::Response, ProxyError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let what = match kind {
        Kind::blob => "blob",
        Kind::tags => "tag list",
        Kind::referrers => "referrers",
        Kind::manifest | Kind::base => "manifest",
    };
    Err(match status {
        StatusCode::NOT_FOUND => ProxyError::NotFound { what, upstream },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ProxyError::Denied {
            upstream,
            status,
            detail: format!("{what} request answered {status}"),
        },
        StatusCode::TOO_MANY_REQUESTS => ProxyError::RateLimited { upstream },
        s if s.is_server_error() => ProxyError::Unavailable {
            upstream,
            detail: format!("answered {s}"),
        },
        s => ProxyError::BadUpstream {
            upstream,
            detail: format!("unexpected status {s}"),
        },
    })
}

/// Reads a whole (small) body, refusing more than `limit` bytes.
pub async fn read_limited(
    response: reqwest::Response,
    limit: usize,
    upstream: Upstream,
) -> Result<Bytes, ProxyError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BadUpstream {
            upstream,
            detail: format!("body larger than {limit} bytes"),
        });
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ProxyError::Unavailable {
            upstream,
            detail: format!("reading body: {}", describe(&e)),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ProxyError::BadUpstream {
                upstream,
                detail: format!("body larger than {limit} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

fn bearer(token: String) -> String {
    format!("Bearer {token}")
}

/// Token cache key: anonymous tokens and each credential's tokens are kept apart.
fn token_scope(repository: &str, fingerprint: Option<&str>) -> String {
    format!("{repository}#{}", fingerprint.unwrap_or("anonymous"))
}

fn is_auth_failure(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

fn parse_challenge_of(response: &reqwest::Response) -> Option<auth::Challenge> {
    response
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::parse_challenge)
}

/// A failed send: refused by the allow rules (in DNS or a redirect), or the upstream is
/// unreachable.
fn send_error(upstream: Upstream, err: &reqwest::Error) -> ProxyError {
    match find_refusal(err) {
        Some(refusal) => ProxyError::Refused(refusal),
        None => ProxyError::Unavailable {
            upstream,
            detail: describe(err),
        },
    }
}

/// reqwest's Display hides the cause ("error sending request"); walk the chain.
pub fn describe(err: &reqwest::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
