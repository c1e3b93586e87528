//! The copy engine: an image from its origin into the cache registry under
//! `<host>[_<port>]/<repo>`, with the source's tag (or digest).
//!
//! By default everything is copied **verbatim**: the index (or manifest list) with every child
//! manifest, config and layer, byte for byte, so every digest in the cache equals the origin's
//! and digest-pinned pulls of the index or of any child work. With a platform filter only the
//! matching children are copied and a **new index** listing only them is pushed under the tag:
//! its bytes differ, so its digest differs from the origin's (`status.digest` ≠
//! `status.upstreamDigest`) and a pull of the origin index digest is not served by the cache.
//! A digest-pinned reference is therefore always copied whole, filter or not.
//!
//! Blobs are streamed from origin to cache (never held whole in memory) and hashed on the way;
//! a blob the target repository already has is skipped after a HEAD, and one that another
//! repository of the cache holds (as far as this process knows) is mounted, not uploaded.
//! Manifests are pushed after everything they reference, children before the index, so an
//! interrupted copy leaves no manifest pointing at missing content, and a re-run transfers only
//! what is missing.
//!
//! Private images: the origin is asked **anonymously first**; only when it refuses are the
//! candidate credentials asked for (lazily: finding them costs Secret reads) and tried in
//! order, and the first the origin accepts is used for the whole copy. Blobs of an image that
//! needed credentials are never offered as mount sources to other repositories: a manifest
//! anyone can publish could otherwise name a private layer's digest and have it mounted into
//! a repository the proxy treats as public.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use larder_core::digest::{Digest, Verifier};
use larder_core::dockerconfig::Credentials;
use larder_core::reference::Reference;

use super::client::{Endpoint, Manifest, Mount, RegistryClient};
use super::manifest::{AnyManifest, Descriptor, Platform};
use super::secrets::SecretCache;
use crate::{Error, Result};

/// Blobs of one image copied at the same time.
const BLOB_CONCURRENCY: usize = 3;
/// Remembered blob locations; the map is cleared when it grows past this (it is only a hint).
const MOUNT_HINTS_MAX: usize = 200_000;
/// Image configs larger than this are not read for `status.platforms`.
const CONFIG_MAX_BYTES: usize = 1 << 20;
/// Config media types that carry `os`/`architecture` (artifacts' configs do not).
const IMAGE_CONFIG_TYPES: [&str; 2] = [
    "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.container.image.v1+json",
];

/// No credentials: the candidate list of an anonymous copy.
pub async fn anonymous() -> Vec<Credentials> {
    Vec::new()
}

/// One `--platform` value: `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformFilter {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl PlatformFilter {
    /// Parses `linux/amd64` or `linux/arm64/v8`.
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: (*os).to_owned(),
                architecture: (*arch).to_owned(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self {
                    os: (*os).to_owned(),
                    architecture: (*arch).to_owned(),
                    variant: Some((*variant).to_owned()),
                })
            }
            _ => Err(Error::Config(format!(
                "platform `{s}` is not os/arch[/variant]"
            ))),
        }
    }

    fn matches(&self, d: &Descriptor) -> bool {
        d.platform.as_ref().is_some_and(|p| {
            p.os == self.os
                && p.architecture == self.architecture
                && self
                    .variant
                    .as_ref()
                    .is_none_or(|v| p.variant.as_ref() == Some(v))
        })
    }
}

/// Copy progress, shared with whoever reports it (the status writer).
#[derive(Debug, Default, Clone)]
pub struct Progress {
    copied: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
}

impl Progress {
    /// Bytes done so far (transferred, mounted or found present).
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
    /// Bytes of the whole image, once known (0 before).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
    fn add(&self, n: u64) {
        self.copied.fetch_add(n, Ordering::Relaxed);
    }
}

/// What a copy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutcome {
    /// The digest of the top manifest in the cache.
    pub digest: String,
    /// The digest the origin gave for the reference.
    pub upstream_digest: String,
    /// The platforms of the copied children (`os/arch[/variant]`); for a single manifest, the
    /// platform its config names (empty when it names none, e.g. an artifact).
    pub platforms: Vec<String>,
    /// Bytes of manifests and blobs of the copied image.
    pub size_bytes: u64,
    /// Bytes actually uploaded this time.
    pub uploaded_bytes: u64,
    /// Blobs uploaded, mounted from another repository, and found already present.
    pub uploaded: usize,
    pub mounted: usize,
    pub present: usize,
    /// Whether the origin needed credentials (a private image).
    pub authenticated: bool,
}

/// Copies images into one cache registry.
#[derive(Debug)]
pub struct Copier {
    client: Arc<RegistryClient>,
    cache: Endpoint,
    platforms: Vec<PlatformFilter>,
    /// digest → a cache repository known to hold it (pushed or seen by this process).
    hints: Mutex<HashMap<String, String>>,
    /// Pull Secrets read for private images, briefly cached.
    secrets: SecretCache,
}

#[derive(Debug, Default)]
struct Counters {
    uploaded_bytes: AtomicU64,
    uploaded: AtomicUsize,
    mounted: AtomicUsize,
    present: AtomicUsize,
}

impl Copier {
    /// A copier into `cache`, copying only `platforms` of indexes when not empty.
    pub fn new(
        client: Arc<RegistryClient>,
        cache: Endpoint,
        platforms: Vec<PlatformFilter>,
    ) -> Self {
        Self {
            client,
            cache,
            platforms,
            hints: Mutex::new(HashMap::new()),
            secrets: SecretCache::default(),
        }
    }

    /// The pull Secrets read for private images (kept here, beside the token cache, so that
    /// every reconcile shares them).
    pub fn secrets(&self) -> &SecretCache {
        &self.secrets
    }

    /// The cache registry endpoint.
    pub fn cache(&self) -> &Endpoint {
        &self.cache
    }

    fn hint(&self, digest: &str, repo: &str) {
        let mut hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        if hints.len() >= MOUNT_HINTS_MAX {
            hints.clear();
        }
        hints.insert(digest.to_owned(), repo.to_owned());
    }

    fn mount_source(&self, digest: &str, repo: &str) -> Option<String> {
        let hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        hints.get(digest).filter(|r| *r != repo).cloned()
    }

    fn target(source: &Reference) -> Result<String> {
        source.proxy_repository().map_err(|e| Error::Reference {
            reference: source.to_string(),
            source: e,
        })
    }

    /// Runs `op` against the origin anonymously, then, if the origin refuses (or pretends
    /// not to know the image, as some registries do for private repositories), with each
    /// candidate from `credentials` in turn. Returns the first success with the endpoint that
    /// got it, or [`Error::Unauthorized`].
    async fn authenticated<T, C, CF, Op, OF>(
        &self,
        source: &Reference,
        credentials: C,
        op: Op,
    ) -> Result<(Endpoint, T)>
    where
        C: FnOnce() -> CF,
        CF: Future<Output = Vec<Credentials>>,
        Op: Fn(Endpoint) -> OF,
        OF: Future<Output = Result<T>>,
    {
        let src = self.client.origin(source.registry())?;
        let refused = match op(src.clone()).await {
            Ok(t) => return Ok((src, t)),
            Err(e @ (Error::Denied { .. } | Error::NotFound { .. })) => e,
            Err(e) => return Err(e),
        };
        let candidates = credentials().await;
        if candidates.is_empty() {
            return Err(match refused {
                Error::Denied { .. } => Error::Unauthorized {
                    registry: src.name.clone(),
                    repository: source.repository().to_owned(),
                    tried: 0,
                },
                other => other,
            });
        }
        let tried = candidates.len();
        let mut not_found = None;
        for candidate in candidates {
            let ep = src.with_credentials(Some(Arc::new(candidate)));
            match op(ep.clone()).await {
                Ok(t) => return Ok((ep, t)),
                Err(Error::Denied { .. }) => {}
                Err(e @ Error::NotFound { .. }) => not_found = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(not_found.unwrap_or_else(|| Error::Unauthorized {
            registry: src.name.clone(),
            repository: source.repository().to_owned(),
            tried,
        }))
    }

    /// The origin's current digest for the reference (one HEAD), for refreshing tags.
    pub async fn origin_digest(&self, source: &Reference) -> Result<String> {
        self.origin_digest_with(source, anonymous).await
    }

    /// [`Copier::origin_digest`], with `credentials` asked for when the origin refuses.
    pub async fn origin_digest_with<C, CF>(
        &self,
        source: &Reference,
        credentials: C,
    ) -> Result<String>
    where
        C: FnOnce() -> CF,
        CF: Future<Output = Vec<Credentials>>,
    {
        let reference = source.manifest_reference();
        let client = &self.client;
        let (_, digest) = self
            .authenticated(source, credentials, |ep| {
                let reference = &reference;
                async move {
                    client
                        .head_manifest(&ep, source.repository(), reference)
                        .await?
                        .ok_or_else(|| Error::NotFound {
                            registry: ep.name.clone(),
                            what: format!("manifest {source}"),
                        })
                }
            })
            .await?;
        Ok(digest)
    }

    /// The digest the cache holds for the reference, if any.
    pub async fn cached_digest(&self, source: &Reference) -> Result<Option<String>> {
        let repo = Self::target(source)?;
        self.client
            .head_manifest(&self.cache, &repo, &source.manifest_reference())
            .await
    }

    /// The child manifests (digests) the cache's manifest `digest` of the image's repository
    /// lists: empty for an image manifest, or when the cache no longer has it.
    pub async fn cached_children(&self, source: &Reference, digest: &str) -> Result<Vec<String>> {
        let repo = Self::target(source)?;
        let manifest = match self.client.get_manifest(&self.cache, &repo, digest).await {
            Ok(m) => m,
            Err(Error::NotFound { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let parsed = parse(&manifest, &format!("cached {repo}@{digest}"))?;
        Ok(parsed
            .manifests
            .unwrap_or_default()
            .into_iter()
            .map(|d| d.digest)
            .collect())
    }

    /// Removes the manifest `digest` from the image's repository in the cache; absent counts
    /// as removed. Blobs stay until the registry's garbage collection.
    pub async fn delete_manifest(&self, source: &Reference, digest: &str) -> Result<()> {
        let repo = Self::target(source)?;
        self.client
            .delete_manifest(&self.cache, &repo, digest)
            .await
    }

    /// Removes the image's top manifest from the cache (by `digest`, or by what its tag points
    /// at). Blobs stay until the registry's garbage collection.
    pub async fn delete(&self, source: &Reference, digest: Option<&str>) -> Result<()> {
        let digest = match digest {
            Some(d) => Some(d.to_owned()),
            None => self.cached_digest(source).await?,
        };
        if let Some(digest) = digest {
            self.delete_manifest(source, &digest).await?;
        }
        Ok(())
    }

    /// Copies `source` into the cache anonymously; see the module documentation.
    pub async fn copy(&self, source: &Reference, progress: &Progress) -> Result<CopyOutcome> {
        self.copy_with(source, anonymous, progress).await
    }

    /// Copies `source` into the cache; `credentials` is called, once, only if the origin
    /// refuses anonymous access, and its candidates are tried in order.
    pub async fn copy_with<C, CF>(
        &self,
        source: &Reference,
        credentials: C,
        progress: &Progress,
    ) -> Result<CopyOutcome>
    where
        C: FnOnce() -> CF,
        CF: Future<Output = Vec<Credentials>>,
    {
        let src_repo = source.repository();
        let dst_repo = Self::target(source)?;
        let what = source.to_string();
        let reference = source.manifest_reference();
        let client = &self.client;
        let (src, top) = self
            .authenticated(source, credentials, |ep| {
                let reference = &reference;
                async move { client.get_manifest(&ep, src_repo, reference).await }
            })
            .await?;
        let public = src.credentials.is_none();
        let parsed = parse(&top, &what)?;
        let mut children: Vec<(Manifest, AnyManifest)> = Vec::new();
        let mut platforms = Vec::new();
        let mut to_push = top.clone();
        if let Some(entries) = &parsed.manifests {
            let filter = !self.platforms.is_empty() && source.digest().is_none();
            let kept: Vec<&Descriptor> = entries
                .iter()
                .filter(|d| !filter || self.platforms.iter().any(|p| p.matches(d)))
                .collect();
            if kept.is_empty() {
                return Err(Error::BadManifest {
                    what,
                    detail: "no child manifest matches the platform filter".into(),
                });
            }
            if kept.len() != entries.len() {
                to_push = filtered_index(&top, &kept, &what)?;
            }
            for d in kept {
                let child = self.client.get_manifest(&src, src_repo, &d.digest).await?;
                let child_parsed = parse(&child, &format!("{what} child {}", d.digest))?;
                if child_parsed.is_index() {
                    return Err(Error::BadManifest {
                        what,
                        detail: format!("nested index {} is not supported", d.digest),
                    });
                }
                if let Some(p) = &d.platform {
                    platforms.push(p.display());
                }
                children.push((child, child_parsed));
            }
        }

        // Every blob once, whichever manifests share it.
        let mut blobs: Vec<Descriptor> = Vec::new();
        let mut seen = BTreeSet::new();
        let image_manifests: Vec<&AnyManifest> = if parsed.is_index() {
            children.iter().map(|(_, p)| p).collect()
        } else {
            vec![&parsed]
        };
        for m in image_manifests {
            for b in m.blobs() {
                if seen.insert(b.digest.clone()) {
                    blobs.push(b);
                }
            }
        }
        let manifest_bytes: u64 = children
            .iter()
            .map(|(m, _)| m.bytes.len() as u64)
            .sum::<u64>()
            + to_push.bytes.len() as u64;
        let size_bytes = manifest_bytes + blobs.iter().map(|b| b.size).sum::<u64>();
        progress.total.store(size_bytes, Ordering::Relaxed);

        let counters = Counters::default();
        futures::stream::iter(blobs.iter().map(Ok::<_, Error>))
            .try_for_each_concurrent(BLOB_CONCURRENCY, |b| {
                self.copy_blob(&src, src_repo, &dst_repo, b, progress, &counters)
            })
            .await?;
        if !parsed.is_index()
            && let Some(config) = &parsed.config
        {
            platforms.extend(self.config_platform(&dst_repo, config).await);
        }

        for (child, _) in &children {
            self.client
                .put_manifest(&self.cache, &dst_repo, &child.digest.to_string(), child)
                .await?;
            progress.add(child.bytes.len() as u64);
        }
        let reference = match (source.digest(), source.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(tag)) => tag.to_owned(),
            (None, None) => to_push.digest.to_string(),
        };
        self.client
            .put_manifest(&self.cache, &dst_repo, &reference, &to_push)
            .await?;
        progress.add(to_push.bytes.len() as u64);
        tracing::info!(image = %source, digest = %to_push.digest, size_bytes,
            uploaded = counters.uploaded.load(Ordering::Relaxed),
            mounted = counters.mounted.load(Ordering::Relaxed),
            present = counters.present.load(Ordering::Relaxed), "copied into the cache");

        Ok(CopyOutcome {
            digest: to_push.digest.to_string(),
            upstream_digest: top.digest.to_string(),
            platforms,
            size_bytes,
            uploaded_bytes: counters.uploaded_bytes.load(Ordering::Relaxed),
            uploaded: counters.uploaded.load(Ordering::Relaxed),
            mounted: counters.mounted.load(Ordering::Relaxed),
            present: counters.present.load(Ordering::Relaxed),
            authenticated: !public,
        })
    }

    /// The platform an image config names (read back from the cache, where the copy just put
    /// it: no second request to the origin). `None`, logged, when it cannot be read: the
    /// platform is information, not worth failing a copy for.
    async fn config_platform(&self, repo: &str, config: &Descriptor) -> Option<String> {
        if !IMAGE_CONFIG_TYPES.contains(&config.media_type.as_str())
            || config.size > CONFIG_MAX_BYTES as u64
        {
            return None;
        }
        let bytes = match self
            .client
            .get_blob_bytes(&self.cache, repo, &config.digest, CONFIG_MAX_BYTES)
            .await
        {
            Ok(b) => b,
            Err(error) => {
                tracing::warn!(%repo, digest = %config.digest, %error, "reading the image config for its platform");
                return None;
            }
        };
        config_platform(&bytes)
    }

    async fn copy_blob(
        &self,
        src: &Endpoint,
        src_repo: &str,
        dst_repo: &str,
        blob: &Descriptor,
        progress: &Progress,
        counters: &Counters,
    ) -> Result<()> {
        let digest = blob.digest.as_str();
        // Only public content is offered for mounting elsewhere (see the module docs).
        let public = src.credentials.is_none();
        let hint = |digest: &str, repo: &str| {
            if public {
                self.hint(digest, repo);
            }
        };
        if self
            .client
            .blob_exists(&self.cache, dst_repo, digest)
            .await?
        {
            hint(digest, dst_repo);
            progress.add(blob.size);
            counters.present.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let from = self.mount_source(digest, dst_repo);
        let mount = from.as_deref().map(|f| (digest, f));
        let location = match self
            .client
            .start_upload(&self.cache, dst_repo, mount)
            .await?
        {
            Mount::Mounted => {
                hint(digest, dst_repo);
                progress.add(blob.size);
                counters.mounted.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            Mount::Upload(upload) => upload,
        };
        let expected = Digest::parse(digest).map_err(|e| Error::BadManifest {
            what: format!("blob {digest}"),
            detail: e.to_string(),
        })?;
        let response = self.client.get_blob(src, src_repo, digest).await?;
        let failure: Arc<Mutex<Option<Error>>> = Arc::default();
        let body = verified_stream(
            response,
            expected,
            blob.size,
            progress.clone(),
            failure.clone(),
            src.name.clone(),
        );
        let result = self
            .client
            .put_blob(&self.cache, dst_repo, location, digest, blob.size, body)
            .await;
        // A failure seen by the stream explains a failed PUT better than the PUT's own error.
        if let Some(e) = failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(e);
        }
        result?;
        hint(digest, dst_repo);
        counters.uploaded.fetch_add(1, Ordering::Relaxed);
        counters
            .uploaded_bytes
            .fetch_add(blob.size, Ordering::Relaxed);
        Ok(())
    }
}

/// `os/arch[/variant]` of an image config; `None` when it names no OS or architecture.
fn config_platform(bytes: &[u8]) -> Option<String> {
    let platform: Platform = serde_json::from_slice(bytes).ok()?;
    (!platform.os.is_empty() && !platform.architecture.is_empty()).then(|| platform.display())
}

fn parse(m: &Manifest, what: &str) -> Result<AnyManifest> {
    serde_json::from_slice(&m.bytes).map_err(|e| Error::BadManifest {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// The index with only `kept` children: a new document, hence a new digest.
fn filtered_index(top: &Manifest, kept: &[&Descriptor], what: &str) -> Result<Manifest> {
    let mut value: serde_json::Value =
        serde_json::from_slice(&top.bytes).map_err(|e| Error::BadManifest {
            what: what.to_owned(),
            detail: e.to_string(),
        })?;
    let keep: BTreeSet<&str> = kept.iter().map(|d| d.digest.as_str()).collect();
    if let Some(list) = value.get_mut("manifests").and_then(|m| m.as_array_mut()) {
        list.retain(|d| {
            d.get("digest")
                .and_then(|x| x.as_str())
                .is_some_and(|x| keep.contains(x))
        });
    }
    let bytes = Bytes::from(serde_json::to_vec(&value).map_err(|e| Error::BadManifest {
        what: what.to_owned(),
        detail: e.to_string(),
    })?);
    Ok(Manifest {
        digest: Digest::sha256_of(&bytes),
        bytes,
        media_type: top.media_type.clone(),
    })
}

struct StreamState {
    inner: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    verifier: Option<Verifier>,
    seen: u64,
    expected: Digest,
    size: u64,
    progress: Progress,
    failure: Arc<Mutex<Option<Error>>>,
    origin: String,
}

impl StreamState {
    fn fail(&mut self, e: Error) -> std::io::Error {
        self.verifier = None;
        let message = e.to_string();
        *self.failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
        std::io::Error::other(message)
    }
}

/// The origin's blob body as an upload body, hashed and counted on the way through; ends with
/// an error (and records why in `failure`) when the content is not the digest or the size the
/// manifest promised, so the upload is aborted rather than completed.
fn verified_stream(
    response: reqwest::Response,
    expected: Digest,
    size: u64,
    progress: Progress,
    failure: Arc<Mutex<Option<Error>>>,
    origin: String,
) -> reqwest::Body {
    let state = StreamState {
        inner: response.bytes_stream().boxed(),
        verifier: Some(Verifier::new(expected.algorithm())),
        seen: 0,
        expected,
        size,
        progress,
        failure,
        origin,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        st.verifier.as_ref()?;
        match st.inner.next().await {
            Some(Ok(chunk)) => {
                st.seen += chunk.len() as u64;
                if st.seen > st.size {
                    let e = st.fail(Error::DigestMismatch {
                        what: format!("blob {}", st.expected),
                        expected: format!("{} bytes", st.size),
                        actual: format!("more than {} bytes", st.size),
                    });
                    return Some((Err(e), st));
                }
                if let Some(v) = st.verifier.as_mut() {
                    v.update(&chunk);
                }
                // Check on the last byte, before handing it on: with a Content-Length the
                // upload completes as soon as it is sent, so an error after it would be late.
                if st.seen == st.size
                    && let Some(v) = st.verifier.take()
                {
                    let actual = v.finish();
                    if actual != st.expected {
                        let e = st.fail(Error::DigestMismatch {
                            what: format!("blob from {}", st.origin),
                            expected: st.expected.to_string(),
                            actual: actual.to_string(),
                        });
                        return Some((Err(e), st));
                    }
                }
                st.progress.add(chunk.len() as u64);
                Some((Ok(chunk), st))
            }
            Some(Err(e)) => {
                let e = st.fail(Error::Unreachable {
                    registry: st.origin.clone(),
                    detail: format!("reading blob {}: {e}", st.expected),
                });
                Some((Err(e), st))
            }
            None => {
                let actual = st.verifier.take()?.finish();
                if actual != st.expected || st.seen != st.size {
                    let e = st.fail(Error::DigestMismatch {
                        what: format!("blob from {}", st.origin),
                        expected: format!("{} ({} bytes)", st.expected, st.size),
                        actual: format!("{actual} ({} bytes)", st.seen),
                    });
                    return Some((Err(e), st));
                }
                None
            }
        }
    });
    reqwest::Body::wrap_stream(stream)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::registry::manifest::Platform;

    fn desc(os: &str, arch: &str, variant: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: "sha256:00".into(),
            size: 1,
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.map(Into::into),
            }),
        }
    }

    #[test]
    fn platforms_come_from_image_configs() {
        let config = br#"{"architecture":"arm","os":"linux","variant":"v7","rootfs":{}}"#;
        assert_eq!(config_platform(config).as_deref(), Some("linux/arm/v7"));
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        assert_eq!(config_platform(config).as_deref(), Some("linux/amd64"));
        assert_eq!(config_platform(br#"{"os":"linux"}"#), None);
        assert_eq!(config_platform(b"{}"), None);
        assert_eq!(config_platform(b"not json"), None);
    }

    #[test]
    fn platform_filters_parse_and_match() {
        let amd = PlatformFilter::parse("linux/amd64").unwrap();
        assert!(amd.matches(&desc("linux", "amd64", None)));
        assert!(!amd.matches(&desc("linux", "arm64", Some("v8"))));
        let arm = PlatformFilter::parse("linux/arm64/v8").unwrap();
        assert!(arm.matches(&desc("linux", "arm64", Some("v8"))));
        assert!(!arm.matches(&desc("linux", "arm64", None)));
        let mut no_platform = desc("", "", None);
        no_platform.platform = None;
        assert!(!amd.matches(&no_platform));
        for bad in ["linux", "/amd64", "a/b/c/d", ""] {
            assert!(PlatformFilter::parse(bad).is_err(), "{bad}");
        }
    }
}
