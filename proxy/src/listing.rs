//! `tags/list` and the referrers API: lists that change at the origin at any time, so they are
//! always asked of the origin (with the same upstream auth as manifests) and never of the cache
//! registry, whose tags are only the ones larder copied. When the origin cannot answer, the last
//! list the proxy saw for the very same request is served (stale-if-error, counted as
//! `source="stale"`), from a memory bounded in entries and bytes ([`ListMemory`]); with none,
//! the client gets the origin's error (503 `UNAVAILABLE`, saying why).
//!
//! Private repositories: the live request carries the client's own credentials and the origin
//! decides; a remembered list of a private repository is served only to a client
//! [`ProxyState::authorize`] lets through, exactly as cached manifests are.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use larder_core::digest::Digest;
use reqwest::Method;

use crate::access::Privacy;
use crate::error::{ProxyError, Upstream};
use crate::metrics::{Kind, Source};
use crate::route::{Image, TagsQuery, percent_encode_query};
use crate::state::{Creds, ProxyState};
use crate::upstream::{Call, read_limited};

/// Largest tag list or referrers index accepted from an origin (distribution's manifest limit).
pub const LIST_MAX_BYTES: usize = 4 << 20;
/// Bytes of lists remembered for stale serving, all repositories together.
pub const MEMORY_MAX_BYTES: usize = 16 << 20;
/// Lists remembered for stale serving.
pub const MEMORY_MAX_ENTRIES: usize = 1024;
/// `OCI-Filters-Applied`, the header saying a referrers list was filtered.
pub const FILTERS_APPLIED: &str = "oci-filters-applied";
/// The media type of a referrers response.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Longest `artifactType` filter accepted (a media type; RFC 6838 allows 127+1+127).
const ARTIFACT_TYPE_MAX: usize = 255;

/// One list, as it will be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub body: Bytes,
    /// The origin's `Link` header (tag lists), still pointing at the origin.
    pub link: Option<String>,
    /// Whether the referrers list was filtered by `artifactType`.
    pub filtered: bool,
}

impl Listing {
    fn weight(&self) -> usize {
        self.body.len() + self.link.as_ref().map_or(0, String::len)
    }
}

/// The last list seen per request, for stale serving: at most [`MEMORY_MAX_ENTRIES`] lists and
/// [`MEMORY_MAX_BYTES`] bytes; the least recently stored go first. Memory only: a restarted
/// proxy has none (and a list older than the proxy is not worth a disk format).
#[derive(Debug, Default)]
pub struct ListMemory {
    inner: Mutex<MemoryInner>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    entries: HashMap<String, (Listing, u64)>,
    bytes: usize,
    next: u64,
}

impl ListMemory {
    pub fn get(&self, key: &str) -> Option<Listing> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.entries.get(key).map(|(l, _)| l.clone())
    }

    pub fn put(&self, key: String, listing: Listing) {
        let weight = listing.weight();
        if weight > MEMORY_MAX_BYTES {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((old, _)) = inner.entries.remove(&key) {
            inner.bytes -= old.weight();
        }
        while !inner.entries.is_empty()
            && (inner.entries.len() >= MEMORY_MAX_ENTRIES
                || inner.bytes + weight > MEMORY_MAX_BYTES)
        {
            let oldest = inner
                .entries
                .iter()
                .min_by_key(|(_, (_, seq))| *seq)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest
                && let Some((old, _)) = inner.entries.remove(&k)
            {
                inner.bytes -= old.weight();
            }
        }
        let seq = inner.next;
        inner.next += 1;
        inner.bytes += weight;
        inner.entries.insert(key, (listing, seq));
    }

    /// (entries, bytes) held.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (inner.entries.len(), inner.bytes)
    }
}

/// A checked `artifactType` filter value (a media type), or `None` for an empty one.
pub fn artifact_type(value: Option<&str>) -> Result<Option<String>, crate::route::RouteError> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v)
            if v.len() <= ARTIFACT_TYPE_MAX
                && v.contains('/')
                && v.bytes().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'!' | b'#' | b'$' | b'&' | b'^' | b'_' | b'.' | b'+' | b'-' | b'/'
                        )
                }) =>
        {
            Ok(Some(v.to_owned()))
        }
        Some(v) => Err(crate::route::RouteError::QueryInvalid(format!(
            "artifactType={v}: not a media type"
        ))),
    }
}

/// A tag list as the client should see it: the origin's `tags` (checked to be a list of
/// strings, `null` read as empty) under the repository `name` the client asked for.
pub fn tags_body(origin: &[u8], name: &str) -> Result<Bytes, String> {
    #[derive(serde::Deserialize)]
    struct TagList {
        tags: Option<Vec<String>>,
    }
    let list: TagList =
        serde_json::from_slice(origin).map_err(|e| format!("tag list is not valid JSON: {e}"))?;
    let body = serde_json::json!({ "name": name, "tags": list.tags.unwrap_or_default() });
    Ok(Bytes::from(body.to_string()))
}

/// A referrers index as served: checked to be an index, and filtered by `artifact_type` unless
/// the origin already did (`filtered_upstream`). Returns the body and whether it is filtered.
pub fn referrers_body(
    origin: &[u8],
    artifact_type: Option<&str>,
    filtered_upstream: bool,
) -> Result<(Bytes, bool), String> {
    let mut index: serde_json::Value = serde_json::from_slice(origin)
        .map_err(|e| format!("referrers response is not valid JSON: {e}"))?;
    let Some(manifests) = index
        .get_mut("manifests")
        .and_then(serde_json::Value::as_array_mut)
    else {
        return Err("referrers response is not an image index (no manifests list)".into());
    };
    let Some(wanted) = artifact_type else {
        return Ok((Bytes::copy_from_slice(origin), false));
    };
    if filtered_upstream {
        return Ok((Bytes::copy_from_slice(origin), true));
    }
    manifests.retain(|d| d.get("artifactType").and_then(|t| t.as_str()) == Some(wanted));
    Ok((Bytes::from(index.to_string()), true))
}

/// What a list request asks the origin for.
#[derive(Debug, Clone)]
pub enum ListRequest {
    Tags(TagsQuery),
    Referrers {
        digest: Digest,
        artifact_type: Option<String>,
    },
}

impl ListRequest {
    fn kind(&self) -> Kind {
        match self {
            ListRequest::Tags(_) => Kind::tags,
            ListRequest::Referrers { .. } => Kind::referrers,
        }
    }

    fn suffix(&self) -> String {
        match self {
            ListRequest::Tags(q) => q.suffix(),
            ListRequest::Referrers {
                digest,
                artifact_type: None,
            } => format!("referrers/{digest}"),
            ListRequest::Referrers {
                digest,
                artifact_type: Some(t),
            } => format!(
                "referrers/{digest}?artifactType={}",
                percent_encode_query(t)
            ),
        }
    }

    /// The stale-memory key: the repository and the whole request.
    fn key(&self, image: &Image) -> String {
        format!("{} {}", image.proxy_repository(), self.suffix())
    }
}

/// Asks the origin for a list; on an origin that cannot answer, the last one seen.
pub async fn fetch_list(
    state: &ProxyState,
    image: &Image,
    request: &ListRequest,
    creds: &Creds,
) -> Result<(Listing, Source), ProxyError> {
    let suffix = request.suffix();
    let kind = request.kind();
    let key = request.key(image);
    let live = fetch_from_origin(state, image, request, &suffix, creds).await;
    remember_verdict(state, image, creds, &live);
    match live {
        Ok(listing) => {
            state.lists.put(key, listing.clone());
            Ok((listing, Source::origin))
        }
        Err(err) if err.is_retryable() => {
            let Some(listing) = state.lists.get(&key) else {
                return Err(err);
            };
            // The same gate as cached manifests: a private repository's remembered list only
            // goes to a client whose access the origin confirmed (verdict cached briefly).
            state.authorize(image, &suffix, kind, creds).await?;
            tracing::info!(image = %image.proxy_repository(), %suffix, error = %err,
                "origin cannot answer; serving the last list seen");
            Ok((listing, Source::stale))
        }
        Err(err) => Err(err),
    }
}

/// The origin's answer to a client's own credentials on a private repository is a verdict,
/// kept like [`ProxyState::authorize`] keeps its own, so a stale list goes only to clients the
/// origin accepted.
fn remember_verdict(
    state: &ProxyState,
    image: &Image,
    creds: &Creds,
    live: &Result<Listing, ProxyError>,
) {
    let access = &state.upstream.access;
    let repository = image.proxy_repository();
    let Some(credentials) = creds else { return };
    if access.privacy(&repository) != Privacy::Private {
        return;
    }
    let fingerprint = credentials.fingerprint();
    match live {
        Ok(_) | Err(ProxyError::NotFound { .. }) => {
            access.remember_grant(&fingerprint, &repository, true)
        }
        Err(ProxyError::Denied { .. }) => access.remember_grant(&fingerprint, &repository, false),
        Err(_) => {}
    }
}

async fn fetch_from_origin(
    state: &ProxyState,
    image: &Image,
    request: &ListRequest,
    suffix: &str,
    creds: &Creds,
) -> Result<Listing, ProxyError> {
    let call = Call {
        upstream: Upstream::Origin,
        method: Method::GET,
        image,
        suffix,
        kind: request.kind(),
        credentials: creds.clone(),
        range: None,
    };
    // Until headers: the tag revalidation deadline, since a stale list is the fallback.
    let response = state
        .upstream
        .send(call, state.tag_policy.revalidate_timeout, &state.metrics)
        .await?;
    let link = response
        .headers()
        .get(reqwest::header::LINK)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let filtered_upstream = response
        .headers()
        .get(FILTERS_APPLIED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|f| f.trim() == "artifactType"));
    let deadline = state.upstream.timeout(Upstream::Origin);
    let body = tokio::time::timeout(
        deadline,
        read_limited(response, LIST_MAX_BYTES, Upstream::Origin),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ProxyError::Unavailable {
            upstream: Upstream::Origin,
            detail: format!("list body not read within {deadline:?}"),
        })
    })?;
    let bad = |detail: String| ProxyError::BadUpstream {
        upstream: Upstream::Origin,
        detail,
    };
    match request {
        ListRequest::Tags(_) => {
            // Checked now, rewritten per client later (the name depends on the path form).
            tags_body(&body, "").map_err(bad)?;
            Ok(Listing {
                body,
                link,
                filtered: false,
            })
        }
        ListRequest::Referrers { artifact_type, .. } => {
            let (body, filtered) =
                referrers_body(&body, artifact_type.as_deref(), filtered_upstream).map_err(bad)?;
            Ok(Listing {
                body,
                link: None,
                filtered,
            })
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn listing(n: usize) -> Listing {
        Listing {
            body: Bytes::from(vec![b'x'; n]),
            link: None,
            filtered: false,
        }
    }

    #[test]
    fn memory_is_bounded_in_entries_and_bytes_oldest_first() {
        let m = ListMemory::default();
        for i in 0..MEMORY_MAX_ENTRIES + 10 {
            m.put(format!("k{i}"), listing(1));
        }
        assert_eq!(m.usage(), (MEMORY_MAX_ENTRIES, MEMORY_MAX_ENTRIES));
        assert!(m.get("k0").is_none());
        assert!(m.get(&format!("k{}", MEMORY_MAX_ENTRIES + 9)).is_some());

        let m = ListMemory::default();
        m.put("a".into(), listing(MEMORY_MAX_BYTES / 2));
        m.put("b".into(), listing(MEMORY_MAX_BYTES / 2));
        m.put("c".into(), listing(10));
        assert!(m.get("a").is_none(), "the oldest made room");
        assert_eq!(m.usage(), (2, MEMORY_MAX_BYTES / 2 + 10));
        // Replacing an entry releases its bytes; an entry above the whole budget is not kept.
        m.put("b".into(), listing(1));
        assert_eq!(m.usage(), (2, 11));
        m.put("huge".into(), listing(MEMORY_MAX_BYTES + 1));
        assert!(m.get("huge").is_none());
    }

    #[test]
    fn tag_lists_get_the_clients_name_and_are_checked() {
        let body = tags_body(
            br#"{"name":"library/nginx","tags":["1","2"]}"#,
            "docker.io/library/nginx",
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"name": "docker.io/library/nginx", "tags": ["1", "2"]})
        );
        let empty = tags_body(br#"{"name":"x","tags":null}"#, "x").unwrap();
        assert_eq!(&empty[..], br#"{"name":"x","tags":[]}"#);
        assert!(tags_body(b"<html>", "x").is_err());
        assert!(tags_body(br#"{"tags":[1]}"#, "x").is_err());
    }

    #[test]
    fn referrers_are_filtered_unless_the_origin_did() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:aa","size":1,"artifactType":"application/vnd.dev.cosign.artifact.sig.v1+json"},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:bb","size":1,"artifactType":"application/spdx+json"}]}"#;
        let (body, filtered) = referrers_body(index, None, false).unwrap();
        assert_eq!((&body[..], filtered), (&index[..], false));
        let (body, filtered) = referrers_body(index, Some("application/spdx+json"), false).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(filtered);
        assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(v["manifests"][0]["digest"], "sha256:bb");
        assert_eq!(v["schemaVersion"], 2);
        let (body, filtered) = referrers_body(index, Some("application/spdx+json"), true).unwrap();
        assert_eq!((&body[..], filtered), (&index[..], true));
        assert!(referrers_body(b"{}", None, false).is_err());
        assert!(referrers_body(b"not json", None, false).is_err());
    }

    #[test]
    fn artifact_type_filters_are_media_types() {
        assert_eq!(artifact_type(None), Ok(None));
        assert_eq!(artifact_type(Some("")), Ok(None));
        assert_eq!(
            artifact_type(Some("application/vnd.cncf.helm.config.v1+json")),
            Ok(Some("application/vnd.cncf.helm.config.v1+json".into()))
        );
        for bad in ["nothing", "a/b c", "a/b&x=1\n", &"a/".repeat(200)] {
            assert!(artifact_type(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_have_distinct_keys_and_upstream_suffixes() {
        let image = Image {
            registry: "ghcr.io".into(),
            repository: "a/b".into(),
        };
        let d = Digest::sha256_of(b"x");
        let tags = ListRequest::Tags(TagsQuery::parse(Some("5"), Some("v1")).unwrap());
        assert_eq!(tags.suffix(), "tags/list?n=5&last=v1");
        let all = ListRequest::Referrers {
            digest: d.clone(),
            artifact_type: None,
        };
        let some = ListRequest::Referrers {
            digest: d.clone(),
            artifact_type: Some("application/spdx+json".into()),
        };
        assert_eq!(all.suffix(), format!("referrers/{d}"));
        assert_eq!(
            some.suffix(),
            format!("referrers/{d}?artifactType=application%2Fspdx%2Bjson")
        );
        assert_ne!(all.key(&image), some.key(&image));
        assert!(tags.key(&image).starts_with("ghcr.io/a/b "));
    }
}
