//! The proxy's shared state and its tier decisions: disk, then the cache registry, then the
//! origin, with tags revalidated at the origin and served stale when it cannot answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use larder_core::digest::Digest;
use reqwest::Method;
use reqwest::header::CONTENT_TYPE;

use crate::access::Privacy;
use crate::coalesce::Coalescer;
use crate::credentials::{Credentials, CredentialsFile};
use crate::disk::DiskStore;
use crate::error::{ProxyError, Upstream};
use crate::fetch::Fetches;
use crate::metrics::{Kind, ProxyMetrics, Source};
use crate::route::Image;
use crate::upstream::{Call, MANIFEST_MAX_BYTES, UpstreamClient, read_limited};
use crate::writeback::CacheWriter;

/// The credentials a client presented, if any (used with origins only).
pub type Creds = Option<Arc<Credentials>>;

/// `Docker-Content-Digest`, the header registries put the digest in.
pub const DIGEST_HEADER: &str = "docker-content-digest";
const TAG_MEMORY_MAX: usize = 16_384;

/// Manifest downloads in flight, by (repository, digest, whether the origin may be asked).
type ManifestFetches = Coalescer<(String, Digest, bool), (Manifest, Source)>;

/// A manifest, verbatim.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: Digest,
}

/// Tag-revalidation settings.
#[derive(Debug, Clone, Copy)]
pub struct TagPolicy {
    /// Deadline of the revalidation HEAD; past it the last known digest is served.
    pub revalidate_timeout: Duration,
    /// A tag checked this recently is not checked again.
    pub freshness: Duration,
}

/// Everything a request handler needs, shared by all of them.
#[derive(Debug)]
pub struct ProxyState {
    pub disk: DiskStore,
    pub upstream: UpstreamClient,
    pub metrics: ProxyMetrics,
    pub fetches: Fetches,
    pub tag_policy: TagPolicy,
    /// The last tag lists and referrers seen, for when the origin cannot answer.
    pub lists: crate::listing::ListMemory,
    manifests: Arc<ManifestFetches>,
    tag_heads: Arc<Coalescer<(String, String), Digest>>,
    /// When each tag was last revalidated at its origin, and what it said.
    tag_memory: Mutex<HashMap<(String, String), (Digest, Instant)>>,
    /// The operator's `--registry-credentials`: what the precache agent, which has no client,
    /// presents as its own credentials (so private images pass the privacy gate).
    own_credentials: Option<Arc<CredentialsFile>>,
    /// Write-through of origin blobs to the cache registry, when there is one and it is on.
    pub cache_writer: Option<CacheWriter>,
}

impl ProxyState {
    pub fn new(
        disk: DiskStore,
        upstream: UpstreamClient,
        metrics: ProxyMetrics,
        tag_policy: TagPolicy,
    ) -> Self {
        let state = ProxyState {
            disk,
            upstream,
            metrics,
            fetches: Fetches::default(),
            tag_policy,
            lists: crate::listing::ListMemory::default(),
            manifests: Arc::default(),
            tag_heads: Arc::default(),
            tag_memory: Mutex::default(),
            own_credentials: None,
            cache_writer: None,
        };
        state
            .metrics
            .disk_max_bytes
            .set(i64::try_from(state.disk.max_bytes()).unwrap_or(i64::MAX));
        state.refresh_disk_gauges();
        state
    }

    /// Sets the credentials the proxy presents for requests of its own (precache).
    pub fn with_own_credentials(mut self, file: Option<Arc<CredentialsFile>>) -> Self {
        self.own_credentials = file;
        self
    }

    /// Sets the write-through to the cache registry.
    pub fn with_cache_writer(mut self, writer: Option<CacheWriter>) -> Self {
        self.cache_writer = writer;
        self
    }

    /// The operator's credentials for `registry`, as a client's would be presented.
    pub fn own_credentials(&self, registry: &str) -> Creds {
        self.own_credentials
            .as_ref()
            .and_then(|f| f.get(registry))
            .map(Arc::new)
    }

    pub fn refresh_disk_gauges(&self) {
        let stats = self.disk.stats();
        self.metrics
            .disk_used_bytes
            .set(i64::try_from(stats.used_bytes).unwrap_or(i64::MAX));
        // The store counts evictions; the counter follows it (fetch_max: refreshes may race).
        self.metrics
            .disk_evictions
            .inner()
            .fetch_max(stats.evictions, std::sync::atomic::Ordering::Relaxed);
    }

    /// Opens a blob download: the cache registry if it answers in time, else the origin.
    /// `range` (a `Range` header value) asks for part of it; the answer may still be all of it
    /// (200) if the upstream ignores ranges.
    pub async fn open_blob_upstream(
        &self,
        image: &Image,
        digest: &Digest,
        creds: &Creds,
        range: Option<String>,
    ) -> Result<(reqwest::Response, Source, Upstream), ProxyError> {
        if self.upstream.has_cache() {
            let suffix = format!("blobs/{digest}");
            self.probe_privacy(image, &suffix, Kind::blob, creds)
                .await?;
            match self
                .open_blob_part(Upstream::Cache, image, digest, creds, range.clone())
                .await
            {
                Ok(response) => return Ok((response, Source::cache, Upstream::Cache)),
                Err(err) => tracing::debug!(%digest, error = %err, "cache registry miss"),
            }
        }
        let response = self
            .open_blob_part(Upstream::Origin, image, digest, creds, range)
            .await?;
        Ok((response, Source::origin, Upstream::Origin))
    }

    /// One GET of a blob from `upstream`, optionally of a part of it (`range`, a `Range`
    /// header value): the same auth, allow rules and redirect checks as every request.
    pub async fn open_blob_part(
        &self,
        upstream: Upstream,
        image: &Image,
        digest: &Digest,
        creds: &Creds,
        range: Option<String>,
    ) -> Result<reqwest::Response, ProxyError> {
        let suffix = format!("blobs/{digest}");
        let call = Call {
            upstream,
            method: Method::GET,
            image,
            suffix: &suffix,
            kind: Kind::blob,
            credentials: creds.clone(),
            range,
        };
        self.upstream
            .send(call, self.upstream.timeout(upstream), &self.metrics)
            .await
    }

    /// Size of a blob no tier below the disk has been asked for yet (HEAD requests).
    pub async fn head_blob_upstream(
        &self,
        image: &Image,
        digest: &Digest,
        creds: &Creds,
    ) -> Result<(Option<u64>, Source), ProxyError> {
        let suffix = format!("blobs/{digest}");
        if self.upstream.has_cache()
            && let Ok(r) = self
                .send(
                    Upstream::Cache,
                    Method::HEAD,
                    image,
                    &suffix,
                    Kind::blob,
                    creds,
                )
                .await
        {
            return Ok((content_length(&r), Source::cache));
        }
        let r = self
            .send(
                Upstream::Origin,
                Method::HEAD,
                image,
                &suffix,
                Kind::blob,
                creds,
            )
            .await?;
        Ok((content_length(&r), Source::origin))
    }

    /// Lets a request through unless its repository is private and the client has not shown
    /// credentials the origin accepts (checked with a HEAD, the verdict cached briefly).
    pub async fn authorize(
        &self,
        image: &Image,
        suffix: &str,
        kind: Kind,
        creds: &Creds,
    ) -> Result<(), ProxyError> {
        let access = &self.upstream.access;
        let repository = image.proxy_repository();
        if access.privacy(&repository) != Privacy::Private {
            return Ok(());
        }
        let denied = |detail: String| ProxyError::Denied {
            upstream: Upstream::Origin,
            status: reqwest::StatusCode::UNAUTHORIZED,
            detail,
        };
        let Some(credentials) = creds else {
            return Err(denied(format!(
                "{repository} is private: present credentials its registry accepts"
            )));
        };
        let fingerprint = credentials.fingerprint();
        match access.grant(&fingerprint, &repository) {
            Some(true) => return Ok(()),
            Some(false) => {
                return Err(denied(format!(
                    "the registry refused these credentials for {repository}"
                )));
            }
            None => {}
        }
        let call = Call {
            upstream: Upstream::Origin,
            method: Method::HEAD,
            image,
            suffix,
            kind,
            credentials: creds.clone(),
            range: None,
        };
        match self
            .upstream
            .send(call, self.tag_policy.revalidate_timeout, &self.metrics)
            .await
        {
            // A 404 with credentials still means they were accepted.
            Ok(_) | Err(ProxyError::NotFound { .. }) => {
                access.remember_grant(&fingerprint, &repository, true);
                Ok(())
            }
            Err(ProxyError::Denied { .. }) => {
                access.remember_grant(&fingerprint, &repository, false);
                Err(denied(format!(
                    "the registry refused these credentials for {repository}"
                )))
            }
            // No verdict (origin down): private content is not served on an old one.
            Err(other) => Err(other),
        }
    }

    /// Before the cache registry serves a repository the proxy knows nothing about, asks the
    /// origin anonymously whether it is private (the controllers copy private images too).
    /// When the origin cannot answer, the cache registry serves: availability first; see
    /// docs/security.md.
    async fn probe_privacy(
        &self,
        image: &Image,
        suffix: &str,
        kind: Kind,
        creds: &Creds,
    ) -> Result<(), ProxyError> {
        if self.upstream.access.privacy(&image.proxy_repository()) != Privacy::Unknown {
            return self.authorize(image, suffix, kind, creds).await;
        }
        let call = Call {
            upstream: Upstream::Origin,
            method: Method::HEAD,
            image,
            suffix,
            kind,
            credentials: None,
            range: None,
        };
        match self
            .upstream
            .send(call, self.tag_policy.revalidate_timeout, &self.metrics)
            .await
        {
            // Marked private by the refusal: the client must now prove access.
            Err(ProxyError::Denied { .. }) => self.authorize(image, suffix, kind, creds).await,
            _ => Ok(()),
        }
    }

    async fn send(
        &self,
        upstream: Upstream,
        method: Method,
        image: &Image,
        suffix: &str,
        kind: Kind,
        creds: &Creds,
    ) -> Result<reqwest::Response, ProxyError> {
        let deadline = self.upstream.timeout(upstream);
        self.upstream
            .send(
                Call {
                    upstream,
                    method,
                    image,
                    suffix,
                    kind,
                    credentials: creds.clone(),
                    range: None,
                },
                deadline,
                &self.metrics,
            )
            .await
    }

    /// A manifest by digest: immutable, so any tier that has it serves it. With
    /// `allow_origin == false` only the disk and the cache registry are asked (stale serving).
    pub async fn manifest_by_digest(
        self: &Arc<Self>,
        image: &Image,
        digest: &Digest,
        allow_origin: bool,
        creds: &Creds,
    ) -> Result<(Manifest, Source), ProxyError> {
        match self.disk.read_manifest(digest).await {
            Ok(Some((bytes, media_type))) => {
                let manifest = Manifest {
                    bytes,
                    media_type,
                    digest: digest.clone(),
                };
                return Ok((manifest, Source::disk));
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(%digest, error = %err, "disk tier could not read a manifest")
            }
        }
        let this = Arc::clone(self);
        let (image, digest, creds) = (image.clone(), digest.clone(), creds.clone());
        let key = (image.proxy_repository(), digest.clone(), allow_origin);
        let (result, joined) = self
            .manifests
            .run(key, async move {
                let reference = digest.to_string();
                let mut last_error = None;
                if this.upstream.has_cache() {
                    this.probe_privacy(
                        &image,
                        &format!("manifests/{reference}"),
                        Kind::manifest,
                        &creds,
                    )
                    .await?;
                    match this
                        .fetch_manifest(Upstream::Cache, &image, &reference, Some(&digest), &creds)
                        .await
                    {
                        Ok(m) => {
                            this.keep_manifest(&m).await;
                            return Ok((m, Source::cache));
                        }
                        Err(err) => last_error = Some(err),
                    }
                }
                if !allow_origin {
                    return Err(last_error.unwrap_or(ProxyError::NotFound {
                        what: "manifest",
                        upstream: Upstream::Cache,
                    }));
                }
                let m = this
                    .fetch_manifest(Upstream::Origin, &image, &reference, Some(&digest), &creds)
                    .await?;
                this.keep_manifest(&m).await;
                Ok((m, Source::origin))
            })
            .await;
        if joined {
            self.metrics.coalesced.inc();
        }
        result
    }

    /// A manifest by tag: revalidated at the origin (at most once per freshness window), served
    /// from its last known digest when the origin cannot answer.
    pub async fn manifest_by_tag(
        self: &Arc<Self>,
        image: &Image,
        tag: &str,
        creds: &Creds,
    ) -> Result<(Manifest, Source), ProxyError> {
        let key = (image.proxy_repository(), tag.to_owned());
        if let Some(digest) = self.fresh_tag(&key) {
            return self.manifest_by_digest(image, &digest, true, creds).await;
        }
        let this = Arc::clone(self);
        let (task_image, task_tag, task_creds) = (image.clone(), tag.to_owned(), creds.clone());
        let (resolved, joined) = self
            .tag_heads
            .run(key.clone(), async move {
                this.resolve_tag(&task_image, &task_tag, &task_creds).await
            })
            .await;
        if joined {
            self.metrics.coalesced.inc();
        }
        match resolved {
            Ok(digest) => {
                self.remember_tag(key, &digest);
                if let Err(err) = self
                    .disk
                    .put_tag(&image.encoded_registry(), &image.repository, tag, &digest)
                    .await
                {
                    tracing::warn!(error = %err, "disk tier could not record a tag");
                }
                self.manifest_by_digest(image, &digest, true, creds).await
            }
            Err(err) if !err.is_retryable() => Err(err),
            Err(err) => {
                tracing::info!(image = %image.proxy_repository(), tag, error = %err, "origin cannot revalidate the tag; serving the last known digest");
                self.stale_by_tag(image, tag, creds)
                    .await
                    .map_err(|stale_err| {
                        tracing::debug!(error = %stale_err, "no stale copy either");
                        err
                    })
            }
        }
    }

    async fn stale_by_tag(
        self: &Arc<Self>,
        image: &Image,
        tag: &str,
        creds: &Creds,
    ) -> Result<(Manifest, Source), ProxyError> {
        let registry = image.encoded_registry();
        if let Ok(Some(digest)) = self.disk.get_tag(&registry, &image.repository, tag).await {
            let (manifest, _) = self
                .manifest_by_digest(image, &digest, false, creds)
                .await?;
            return Ok((manifest, Source::stale));
        }
        if self.upstream.has_cache() {
            self.probe_privacy(image, &format!("manifests/{tag}"), Kind::manifest, creds)
                .await?;
            let manifest = self
                .fetch_manifest(Upstream::Cache, image, tag, None, creds)
                .await?;
            self.keep_manifest(&manifest).await;
            let _ = self
                .disk
                .put_tag(&registry, &image.repository, tag, &manifest.digest)
                .await;
            return Ok((manifest, Source::stale));
        }
        Err(ProxyError::NotFound {
            what: "manifest",
            upstream: Upstream::Cache,
        })
    }

    /// Asks the origin which digest a tag names: a HEAD (cheap, and not counted against Docker
    /// Hub's pull limit), or a GET when the registry does not send the digest header.
    async fn resolve_tag(
        &self,
        image: &Image,
        tag: &str,
        creds: &Creds,
    ) -> Result<Digest, ProxyError> {
        let suffix = format!("manifests/{tag}");
        let deadline = self.tag_policy.revalidate_timeout;
        let response = self
            .upstream
            .send(
                Call {
                    upstream: Upstream::Origin,
                    method: Method::HEAD,
                    image,
                    suffix: &suffix,
                    kind: Kind::manifest,
                    credentials: creds.clone(),
                    range: None,
                },
                deadline,
                &self.metrics,
            )
            .await?;
        if let Some(digest) = header_digest(&response) {
            return Ok(digest);
        }
        let manifest = self
            .fetch_manifest(Upstream::Origin, image, tag, None, creds)
            .await?;
        self.keep_manifest(&manifest).await;
        Ok(manifest.digest)
    }

    /// GETs a manifest and checks it: against `expected` when asking by digest, and against the
    /// registry's own digest header.
    async fn fetch_manifest(
        &self,
        upstream: Upstream,
        image: &Image,
        reference: &str,
        expected: Option<&Digest>,
        creds: &Creds,
    ) -> Result<Manifest, ProxyError> {
        let suffix = format!("manifests/{reference}");
        let response = self
            .send(upstream, Method::GET, image, &suffix, Kind::manifest, creds)
            .await?;
        let claimed = header_digest(&response);
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = read_limited(response, MANIFEST_MAX_BYTES, upstream).await?;
        let digest = match expected.or(claimed.as_ref()) {
            Some(want) => {
                let mut verifier = want.verifier();
                verifier.update(&bytes);
                let actual = verifier.finish();
                if &actual != want {
                    self.metrics.upstream_error(upstream, "digest_mismatch");
                    return Err(ProxyError::BadUpstream {
                        upstream,
                        detail: format!("manifest {reference} hashes to {actual}, not {want}"),
                    });
                }
                actual
            }
            None => Digest::sha256_of(&bytes),
        };
        let media_type = content_type
            .filter(|t| !t.is_empty() && t != "application/octet-stream")
            .or_else(|| media_type_in(&bytes))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned());
        Ok(Manifest {
            bytes,
            media_type,
            digest,
        })
    }

    async fn keep_manifest(&self, manifest: &Manifest) {
        if let Err(err) = self
            .disk
            .put_manifest(&manifest.digest, &manifest.bytes, &manifest.media_type)
            .await
        {
            tracing::warn!(digest = %manifest.digest, error = %err, "disk tier could not keep a manifest");
        }
        self.refresh_disk_gauges();
    }

    fn fresh_tag(&self, key: &(String, String)) -> Option<Digest> {
        if self.tag_policy.freshness.is_zero() {
            return None;
        }
        let memory = self.tag_memory.lock().unwrap_or_else(|p| p.into_inner());
        let (digest, checked) = memory.get(key)?;
        (checked.elapsed() < self.tag_policy.freshness).then(|| digest.clone())
    }

    fn remember_tag(&self, key: (String, String), digest: &Digest) {
        if self.tag_policy.freshness.is_zero() {
            return;
        }
        let mut memory = self.tag_memory.lock().unwrap_or_else(|p| p.into_inner());
        if memory.len() >= TAG_MEMORY_MAX {
            let freshness = self.tag_policy.freshness;
            memory.retain(|_, (_, checked)| checked.elapsed() < freshness);
            if memory.len() >= TAG_MEMORY_MAX {
                memory.clear();
            }
        }
        memory.insert(key, (digest.clone(), Instant::now()));
    }
}

fn header_digest(response: &reqwest::Response) -> Option<Digest> {
    response
        .headers()
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v.trim()).ok())
}

fn content_length(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The `mediaType` field of a manifest, for registries that do not send a Content-Type.
fn media_type_in(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<Typed>(bytes).ok()?.media_type
}
