//! Prefetch: put one image, for one platform, into the disk tier before any client asks.
//!
//! Everything goes through the same tier logic a client pull uses: the tag is revalidated and
//! remembered, manifests and blobs come from the disk, the cache registry or the origin,
//! downloads are shared with concurrent client pulls of the same blob and verified against
//! their digests. No blob is held in memory: the download task writes it to disk and this
//! module only waits for it. No client credentials exist here, so a private image is prefetched
//! only when the cache registry has it or the proxy's own `--registry-credentials` open it.

use std::sync::Arc;

use larder_core::digest::Digest;
use larder_core::reference::Reference;
use serde::Deserialize;

use crate::error::ProxyError;
use crate::fetch::FetchState;
use crate::route::Image;
use crate::state::{Creds, Manifest, ProxyState};

/// A platform as `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `linux/amd64`, `linux/arm64/v8`.
    pub fn parse(text: &str) -> Result<Self, PrefetchError> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts[..] {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self {
                    os: os.into(),
                    architecture: arch.into(),
                    variant: Some(variant.into()),
                })
            }
            _ => Err(PrefetchError::BadPlatform(text.into())),
        }
    }

    /// How well an index entry's platform suits this node, as containerd chooses: `None` when
    /// it cannot run here, else a rank (0 best). Variants are compared after containerd's
    /// normalisation (`arm64` without a variant is `v8`, `arm` without one is `v7`, `amd64/v1`
    /// is plain `amd64`): equal is rank 0; a 32-bit `arm` node also runs older `arm` variants
    /// (`v7` runs `v6` and `v5`), ranked by distance. A node without a variant (`linux/amd64`)
    /// does not take `amd64/v3`: nothing says its CPU can run it.
    pub fn rank(&self, os: &str, architecture: &str, variant: Option<&str>) -> Option<u32> {
        if os != self.os || architecture != self.architecture {
            return None;
        }
        let (mine, theirs) = (
            normalise_variant(architecture, self.variant.as_deref()),
            normalise_variant(architecture, variant),
        );
        if mine == theirs {
            return Some(0);
        }
        let level = |v: Option<&str>| v?.strip_prefix('v')?.parse::<u32>().ok();
        match (architecture, level(mine), level(theirs)) {
            ("arm", Some(m), Some(t)) if t < m => Some(m - t),
            _ => None,
        }
    }

    /// Whether an index entry's platform can run on this node (see [`Platform::rank`]).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.rank(os, architecture, variant).is_some()
    }
}

/// containerd's variant normalisation for the architectures that have defaults.
fn normalise_variant<'a>(architecture: &str, variant: Option<&'a str>) -> Option<&'a str> {
    match (architecture, variant) {
        ("arm64", None) => Some("v8"),
        ("arm", None) => Some("v7"),
        ("amd64", Some("v1")) => None,
        (_, v) => v,
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Why a prefetch failed, and whose fault it was.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PrefetchError {
    #[error("`{0}` is not an image reference: {1}")]
    Reference(String, String),
    #[error("`{0}` is not a platform (os/architecture[/variant])")]
    BadPlatform(String),
    /// The tiers could not serve a manifest or blob (the error says which upstream and why).
    #[error(transparent)]
    Upstream(#[from] ProxyError),
    #[error("the index of {image} has no manifest for {platform} (it has: {available})")]
    NoPlatform {
        image: String,
        platform: String,
        available: String,
    },
    #[error("manifest {digest} of {image} is not an image manifest or index: {detail}")]
    BadManifest {
        image: String,
        digest: String,
        detail: String,
    },
}

impl PrefetchError {
    /// Whether retrying later can help (an upstream or disk problem), as opposed to a request
    /// that can never succeed (bad reference, no such platform, malformed manifest).
    pub fn is_retryable(&self) -> bool {
        matches!(self, PrefetchError::Upstream(_))
    }

    /// Whose fault it was, for logs and the status reason: `origin`, `cache` (the cache
    /// registry), `disk` (this node's disk tier), `policy` (the proxy's allow rules) or
    /// `request` (what was asked cannot be served: reference, platform, manifest).
    pub fn fault(&self) -> &'static str {
        match self {
            PrefetchError::Upstream(e) => match e {
                ProxyError::NotFound { upstream, .. }
                | ProxyError::Denied { upstream, .. }
                | ProxyError::RateLimited { upstream }
                | ProxyError::Unavailable { upstream, .. }
                | ProxyError::BadUpstream { upstream, .. } => upstream.as_str(),
                ProxyError::Disk(_) => "disk",
                ProxyError::Refused(_) => "policy",
                ProxyError::Route(_) => "request",
            },
            PrefetchError::Reference(..)
            | PrefetchError::BadPlatform(_)
            | PrefetchError::NoPlatform { .. }
            | PrefetchError::BadManifest { .. } => "request",
        }
    }
}

/// What a finished prefetch holds on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefetched {
    /// The platform's image manifest.
    pub manifest: Digest,
    /// Manifest, config and layers, bytes.
    pub size_bytes: u64,
    /// Config and layers: what the node agent re-checks stays on disk.
    pub blobs: Vec<Digest>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<DescriptorPlatform>,
}

#[derive(Deserialize)]
struct DescriptorPlatform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct AnyManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Makes every blob of `reference` for `platform` present in the disk tier. `progress` is
/// called with (bytes done, total bytes once known) as downloads advance; blobs already on
/// disk count as done at once.
///
/// With `expected_digest` (the digest the cache registry holds, from the NodeCache spec) that
/// manifest is downloaded, so every node ends up with the same content, and the reference's tag
/// is recorded on disk as naming it. Without one a tag goes through the same revalidation as a
/// client's pull.
pub async fn prefetch(
    state: &Arc<ProxyState>,
    reference: &str,
    expected_digest: Option<&Digest>,
    platform: &Platform,
    progress: &(dyn Fn(u64, Option<u64>) + Send + Sync),
) -> Result<Prefetched, PrefetchError> {
    let parsed = Reference::parse(reference)
        .map_err(|e| PrefetchError::Reference(reference.into(), e.to_string()))?;
    let image = Image {
        registry: parsed.registry().to_owned(),
        repository: parsed.repository().to_owned(),
    };
    // No client here: the operator's credentials (if any) are the agent's own.
    let creds = state.own_credentials(&image.registry);
    let pinned = match (parsed.digest(), expected_digest) {
        (Some(own), Some(expected)) if own != expected => {
            return Err(PrefetchError::Reference(
                reference.into(),
                format!("it names {own}, but {expected} is expected"),
            ));
        }
        (own, expected) => own.or(expected),
    };
    let (top, _) = match (pinned, parsed.tag()) {
        (Some(digest), tag) => {
            let found = state
                .manifest_by_digest(&image, digest, true, &creds)
                .await?;
            if let Some(tag) = tag {
                // Stale serving (origin down) then answers this tag with the prefetched content.
                if let Err(error) = state
                    .disk
                    .put_tag(&image.encoded_registry(), &image.repository, tag, digest)
                    .await
                {
                    tracing::warn!(%error, reference, "disk tier could not record a prefetched tag");
                }
            }
            found
        }
        (None, tag) => {
            state
                .manifest_by_tag(&image, tag.unwrap_or("latest"), &creds)
                .await?
        }
    };
    let manifest = resolve_platform(state, &image, top, platform, reference, &creds).await?;
    let parsed_manifest = parse(&manifest, reference)?;
    let mut blobs = Vec::new();
    if let Some(config) = parsed_manifest.config {
        blobs.push(config);
    }
    blobs.extend(parsed_manifest.layers.unwrap_or_default());
    let total = manifest.bytes.len() as u64 + blobs.iter().map(|b| b.size).sum::<u64>();
    let mut done = manifest.bytes.len() as u64;
    progress(done, Some(total));
    let mut held = Vec::with_capacity(blobs.len());
    for blob in &blobs {
        let digest = Digest::parse(&blob.digest).map_err(|e| PrefetchError::BadManifest {
            image: reference.into(),
            digest: manifest.digest.to_string(),
            detail: format!("blob digest {}: {e}", blob.digest),
        })?;
        let downloaded = fetch_blob(state, &image, &digest, &creds, &|n| {
            progress(done + n, Some(total))
        })
        .await?;
        if downloaded {
            state.metrics.prefetch_bytes.inc_by(blob.size);
        }
        done += blob.size;
        progress(done, Some(total));
        held.push(digest);
    }
    Ok(Prefetched {
        manifest: manifest.digest,
        size_bytes: total,
        blobs: held,
    })
}

fn parse(manifest: &Manifest, image: &str) -> Result<AnyManifest, PrefetchError> {
    serde_json::from_slice(&manifest.bytes).map_err(|e| PrefetchError::BadManifest {
        image: image.into(),
        digest: manifest.digest.to_string(),
        detail: e.to_string(),
    })
}

/// The index child for `platform` (pure): the best-ranked; of equals, the first listed, as
/// containerd picks.
fn choose_child<'a>(children: &'a [Descriptor], platform: &Platform) -> Option<&'a Descriptor> {
    children
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let p = c.platform.as_ref()?;
            let rank = platform.rank(&p.os, &p.architecture, p.variant.as_deref())?;
            Some(((rank, i), c))
        })
        .min_by_key(|(key, _)| *key)
        .map(|(_, c)| c)
}

/// The image manifest for `platform`: `top` itself, or the matching child of an index.
async fn resolve_platform(
    state: &Arc<ProxyState>,
    image: &Image,
    top: Manifest,
    platform: &Platform,
    reference: &str,
    creds: &Creds,
) -> Result<Manifest, PrefetchError> {
    let parsed = parse(&top, reference)?;
    let Some(children) = parsed.manifests else {
        if parsed.config.is_none() {
            return Err(PrefetchError::BadManifest {
                image: reference.into(),
                digest: top.digest.to_string(),
                detail: "neither `manifests` nor `config`".into(),
            });
        }
        return Ok(top);
    };
    let chosen = choose_child(&children, platform);
    let Some(child) = chosen else {
        let available: Vec<String> = children
            .iter()
            .filter_map(|c| c.platform.as_ref())
            .map(|p| {
                let mut s = format!("{}/{}", p.os, p.architecture);
                if let Some(v) = &p.variant {
                    s.push('/');
                    s.push_str(v);
                }
                s
            })
            .collect();
        return Err(PrefetchError::NoPlatform {
            image: reference.into(),
            platform: platform.to_string(),
            available: available.join(", "),
        });
    };
    let digest = Digest::parse(&child.digest).map_err(|e| PrefetchError::BadManifest {
        image: reference.into(),
        digest: top.digest.to_string(),
        detail: format!("child digest {}: {e}", child.digest),
    })?;
    let (manifest, _) = state
        .manifest_by_digest(image, &digest, true, creds)
        .await?;
    Ok(manifest)
}

/// Waits until the blob is on disk: joins (or starts) its one download and follows it.
/// Returns whether it waited for a download (false: the blob was already on disk).
async fn fetch_blob(
    state: &Arc<ProxyState>,
    image: &Image,
    digest: &Digest,
    creds: &Creds,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<bool, PrefetchError> {
    // Twice at most: a download may finish between the disk check and joining it.
    for _ in 0..2 {
        if state.disk.contains_blob(digest) {
            return Ok(false);
        }
        let Some(mut joined) = crate::download::join(state, image, digest, creds).await? else {
            continue;
        };
        // Followed to the end of the download task, which drops its sender only after the
        // verified blob is committed to disk (readers get `Done` before that fsync).
        loop {
            let snapshot = joined.state.borrow_and_update().clone();
            match snapshot {
                FetchState::Connecting | FetchState::Done { .. } => {}
                FetchState::Streaming { written, .. } => progress(written),
                FetchState::Failed(e) => return Err(e.into()),
            }
            if joined.state.changed().await.is_err() {
                return match &*joined.state.borrow() {
                    // A download is served to readers even when the disk tier cannot keep it
                    // (full, read-only): only the disk says whether the prefetch did its job.
                    FetchState::Done { .. } if state.disk.contains_blob(digest) => Ok(true),
                    FetchState::Done { .. } => Err(ProxyError::Disk(format!(
                        "{digest} was downloaded but the disk tier did not keep it (full or read-only?)"
                    ))
                    .into()),
                    FetchState::Failed(e) => Err(e.clone().into()),
                    _ => Err(ProxyError::Disk("a download ended without a result".into()).into()),
                };
            }
        }
    }
    if state.disk.contains_blob(digest) {
        return Ok(false);
    }
    Err(ProxyError::Disk(format!(
        "{digest} was downloaded but is not in the disk tier"
    ))
    .into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn platforms_match_as_containerd_does() {
        let arm64 = Platform::parse("linux/arm64/v8").unwrap();
        assert!(arm64.matches("linux", "arm64", None));
        assert!(arm64.matches("linux", "arm64", Some("v8")));
        assert!(!arm64.matches("linux", "arm64", Some("v9")));
        assert!(!arm64.matches("linux", "amd64", None));
        let plain_arm64 = Platform::parse("linux/arm64").unwrap();
        assert!(plain_arm64.matches("linux", "arm64", Some("v8")));
        assert!(!plain_arm64.matches("linux", "arm64", Some("v9")));
        let amd64 = Platform::parse("linux/amd64").unwrap();
        assert!(amd64.matches("linux", "amd64", None));
        assert!(amd64.matches("linux", "amd64", Some("v1")));
        assert!(!amd64.matches("linux", "amd64", Some("v3")));
        assert!(!amd64.matches("windows", "amd64", None));
        assert!(
            Platform::parse("linux/amd64/v3")
                .unwrap()
                .matches("linux", "amd64", Some("v3"))
        );
        let armv7 = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(armv7.rank("linux", "arm", Some("v7")), Some(0));
        assert_eq!(armv7.rank("linux", "arm", None), Some(0));
        assert_eq!(armv7.rank("linux", "arm", Some("v6")), Some(1));
        assert_eq!(armv7.rank("linux", "arm", Some("v5")), Some(2));
        assert_eq!(armv7.rank("linux", "arm", Some("v8")), None);
        assert!(
            !Platform::parse("linux/arm/v6")
                .unwrap()
                .matches("linux", "arm", None)
        );
        assert_eq!(arm64.to_string(), "linux/arm64/v8");
        for bad in ["linux", "", "linux/", "a/b/c/d", "/amd64"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_best_child_of_an_index_is_chosen() {
        let index: AnyManifest = serde_json::from_value(serde_json::json!({"manifests": [
            {"digest": "d-amd64-v3", "size": 1, "platform": {"os": "linux", "architecture": "amd64", "variant": "v3"}},
            {"digest": "d-amd64", "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": "d-arm-v6", "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v6"}},
            {"digest": "d-arm-v7", "size": 1, "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
            {"digest": "d-attestation", "size": 1, "platform": {"os": "unknown", "architecture": "unknown"}},
            {"digest": "d-none", "size": 1}
        ]}))
        .unwrap();
        let children = index.manifests.unwrap();
        let pick = |p: &str| {
            choose_child(&children, &Platform::parse(p).unwrap()).map(|c| c.digest.as_str())
        };
        assert_eq!(pick("linux/amd64"), Some("d-amd64"));
        assert_eq!(pick("linux/amd64/v3"), Some("d-amd64-v3"));
        assert_eq!(pick("linux/arm/v7"), Some("d-arm-v7"));
        assert_eq!(pick("linux/arm/v6"), Some("d-arm-v6"));
        assert_eq!(pick("linux/arm64"), None);
    }
}
