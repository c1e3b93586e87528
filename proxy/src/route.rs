//! Parsing proxy request paths into what is asked for. Pure: no I/O, tested below.
//!
//! Two forms are served:
//! - rewritten images: `/v2/<host>[_<port>]/<repo>/<endpoint>`;
//! - containerd's mirror form: `/v2/<repo>/<endpoint>?ns=<host[:port]>`;
//!
//! where `<endpoint>` is any pull-side endpoint of the distribution spec: `manifests/<ref>`,
//! `blobs/<digest>`, `tags/list` and `referrers/<digest>`.

use axum::http::StatusCode;
use larder_core::digest::Digest;
use larder_core::reference::{Reference, ReferenceError, decode_registry, encode_registry};

/// A repository on some registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Image {
    /// `host[:port]`, canonical (`docker.io` for Docker Hub).
    pub registry: String,
    /// Repository path, e.g. `library/nginx`.
    pub repository: String,
}

impl Image {
    /// The registry as one path component (`host` or `host_port`).
    pub fn encoded_registry(&self) -> String {
        // Registries reach an `Image` only through `Reference` parsing, which refuses nothing
        // that `encode_registry` refuses except IPv6 literals; those keep their brackets.
        encode_registry(&self.registry).unwrap_or_else(|_| self.registry.clone())
    }

    /// `<host>[_<port>]/<repo>`: the path the image has on the proxy and in the cache registry.
    pub fn proxy_repository(&self) -> String {
        format!("{}/{}", self.encoded_registry(), self.repository)
    }
}

/// What a manifest request names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ManifestRef {
    Tag(String),
    Digest(Digest),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: the API version check.
    Base,
    Manifest {
        image: Image,
        reference: ManifestRef,
    },
    Blob {
        image: Image,
        digest: Digest,
    },
    /// `GET /v2/<name>/tags/list` (`n` and `last` are query parameters, see [`TagsQuery`]).
    Tags {
        image: Image,
        /// How the client named the repository, for the `Link` back to the proxy.
        form: PathForm,
    },
    /// `GET /v2/<name>/referrers/<digest>` (`artifactType` is a query parameter).
    Referrers {
        image: Image,
        digest: Digest,
    },
}

/// Which of the two path forms a request used; links the proxy sends back use the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathForm {
    /// `/v2/<host>[_<port>]/<repo>/...`.
    Rewritten,
    /// `/v2/<repo>/...?ns=<host>`, with the `ns` value as the client sent it.
    Mirror { ns: String },
}

impl PathForm {
    /// The proxy's own path of `image`'s tag list in this form, with `query` (already encoded,
    /// without `ns`) appended.
    pub fn tags_path(&self, image: &Image, query: &str) -> String {
        let join = |base: String, extra: &str| {
            let q: Vec<&str> = [query, extra]
                .into_iter()
                .filter(|q| !q.is_empty())
                .collect();
            if q.is_empty() {
                base
            } else {
                format!("{base}?{}", q.join("&"))
            }
        };
        match self {
            PathForm::Rewritten => join(format!("/v2/{}/tags/list", image.proxy_repository()), ""),
            PathForm::Mirror { ns } => join(
                format!("/v2/{}/tags/list", image.repository),
                &format!("ns={}", percent_encode_query(ns)),
            ),
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters and `:` kept).
pub fn percent_encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Most tags one `tags/list` page may ask for; larger `n` are lowered to it (the spec lets a
/// registry return fewer than `n`, with a `Link` to the rest).
pub const TAGS_PAGE_MAX: u32 = 10_000;

/// The `n` and `last` query parameters of a `tags/list` request, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TagsQuery {
    pub n: Option<u32>,
    pub last: Option<String>,
}

impl TagsQuery {
    /// Checks `n` (a non-negative integer, capped at [`TAGS_PAGE_MAX`]) and `last` (a tag).
    pub fn parse(n: Option<&str>, last: Option<&str>) -> Result<Self, RouteError> {
        let n = match n.filter(|n| !n.is_empty()) {
            None => None,
            Some(n) => Some(
                n.parse::<u64>()
                    .map_err(|_| RouteError::PaginationInvalid(format!("n={n}")))?
                    .min(u64::from(TAGS_PAGE_MAX)) as u32,
            ),
        };
        let last = match last.filter(|l| !l.is_empty()) {
            None => None,
            Some(l) if is_tag(l) => Some(l.to_owned()),
            Some(l) => return Err(RouteError::PaginationInvalid(format!("last={l}"))),
        };
        Ok(TagsQuery { n, last })
    }

    /// The query string (`n=..&last=..`, either may be absent), ready for a URL.
    pub fn encode(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.n {
            parts.push(format!("n={n}"));
        }
        if let Some(last) = &self.last {
            parts.push(format!("last={}", percent_encode_query(last)));
        }
        parts.join("&")
    }

    /// The request suffix for an upstream: `tags/list[?n=..&last=..]`.
    pub fn suffix(&self) -> String {
        match self.encode() {
            q if q.is_empty() => "tags/list".to_owned(),
            q => format!("tags/list?{q}"),
        }
    }
}

/// The tag grammar of the distribution spec: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn is_tag(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// The `Link` header of an origin's `tags/list` page, pointed back at the proxy: only the
/// `n` and `last` parameters of the origin's next-page URL are kept (never its host or path,
/// which could name another repository), in the client's own [`PathForm`]. `None` when the
/// header names no usable next page.
pub fn rewrite_tags_link(link: &str, image: &Image, form: &PathForm) -> Option<String> {
    let start = link.find('<')?;
    let end = start + link[start..].find('>')?;
    let params = &link[end + 1..];
    if !params.to_ascii_lowercase().contains("rel=\"next\"")
        && !params.to_ascii_lowercase().contains("rel=next")
    {
        return None;
    }
    let target = &link[start + 1..end];
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut n = None;
    let mut last = None;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = percent_decode(v)?;
        match k {
            "n" => n = Some(v),
            "last" => last = Some(v),
            _ => {}
        }
    }
    let query = TagsQuery::parse(n.as_deref(), last.as_deref()).ok()?;
    query.last.as_ref()?;
    Some(format!(
        "<{}>; rel=\"next\"",
        form.tags_path(image, &query.encode())
    ))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A request the proxy cannot serve; the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not a registry API path: {0}")]
    NotRegistryApi(String),
    #[error(
        "unsupported endpoint `{0}`: this proxy serves pulls only (manifests, blobs, tags/list, referrers)"
    )]
    Unsupported(String),
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("invalid tag: {0}")]
    TagInvalid(String),
    #[error("method {0} not allowed: this proxy is read-only")]
    MethodNotAllowed(String),
    #[error("invalid pagination parameter {0}: n is a number, last a tag")]
    PaginationInvalid(String),
    #[error("invalid query parameter {0}")]
    QueryInvalid(String),
}

impl RouteError {
    pub fn status(&self) -> StatusCode {
        match self {
            RouteError::NotRegistryApi(_) | RouteError::Unsupported(_) => StatusCode::NOT_FOUND,
            RouteError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn oci_code(&self) -> &'static str {
        match self {
            RouteError::NotRegistryApi(_) | RouteError::Unsupported(_) => "UNSUPPORTED",
            RouteError::MethodNotAllowed(_) => "UNSUPPORTED",
            RouteError::NameInvalid(_) => "NAME_INVALID",
            RouteError::DigestInvalid(_) => "DIGEST_INVALID",
            RouteError::TagInvalid(_) => "TAG_INVALID",
            RouteError::PaginationInvalid(_) => "PAGINATION_NUMBER_INVALID",
            RouteError::QueryInvalid(_) => "UNSUPPORTED",
        }
    }
}

/// Parses a request path (and the `ns` query parameter of containerd's mirror form).
pub fn parse(path: &str, ns: Option<&str>) -> Result<Route, RouteError> {
    let rest = path
        .strip_prefix("/v2")
        .ok_or_else(|| RouteError::NotRegistryApi(path.to_owned()))?;
    if rest.is_empty() || rest == "/" {
        return Ok(Route::Base);
    }
    let rest = rest
        .strip_prefix('/')
        .ok_or_else(|| RouteError::NotRegistryApi(path.to_owned()))?;
    let segments: Vec<&str> = rest.split('/').collect();
    let [name @ .., kind, reference] = segments.as_slice() else {
        return Err(RouteError::Unsupported(path.to_owned()));
    };
    let endpoint_ok = match *kind {
        "manifests" | "blobs" | "referrers" => true,
        "tags" => *reference == "list",
        _ => false,
    };
    if name.is_empty() || !endpoint_ok {
        return Err(RouteError::Unsupported(path.to_owned()));
    }
    let (registry, repository) = match ns {
        Some(ns) => (
            decode_registry(&encode_registry(ns).map_err(name_invalid)?).map_err(name_invalid)?,
            name.join("/"),
        ),
        None => {
            let [encoded, repo @ ..] = name else {
                return Err(RouteError::Unsupported(path.to_owned()));
            };
            if repo.is_empty() {
                return Err(RouteError::NameInvalid(format!(
                    "`{rest}` names a registry but no repository: expected /v2/<registry>/<repository>/..."
                )));
            }
            (
                decode_registry(encoded).map_err(name_invalid)?,
                repo.join("/"),
            )
        }
    };
    if reference.is_empty() {
        return Err(RouteError::Unsupported(path.to_owned()));
    }
    if *kind == "tags" {
        // `library/` for Docker Hub's one-component names, as for manifests.
        let image = image_of(&registry, &format!("{repository}:latest"))?;
        let form = match ns {
            Some(ns) => PathForm::Mirror { ns: ns.to_owned() },
            None => PathForm::Rewritten,
        };
        return Ok(Route::Tags { image, form });
    }
    if *kind == "referrers" {
        let digest =
            Digest::parse(reference).map_err(|e| RouteError::DigestInvalid(e.to_string()))?;
        let image = image_of(&registry, &format!("{repository}@{digest}"))?;
        return Ok(Route::Referrers { image, digest });
    }
    if *kind == "blobs" {
        let digest =
            Digest::parse(reference).map_err(|e| RouteError::DigestInvalid(e.to_string()))?;
        let image = image_of(&registry, &format!("{repository}@{digest}"))?;
        return Ok(Route::Blob { image, digest });
    }
    if reference.contains(':') {
        let digest =
            Digest::parse(reference).map_err(|e| RouteError::DigestInvalid(e.to_string()))?;
        let image = image_of(&registry, &format!("{repository}@{digest}"))?;
        Ok(Route::Manifest {
            image,
            reference: ManifestRef::Digest(digest),
        })
    } else {
        let image = image_of(&registry, &format!("{repository}:{reference}"))?;
        Ok(Route::Manifest {
            image,
            reference: ManifestRef::Tag((*reference).to_owned()),
        })
    }
}

fn image_of(registry: &str, remainder: &str) -> Result<Image, RouteError> {
    let parsed = Reference::parse_on_registry(registry, remainder).map_err(|e| match e {
        ReferenceError::BadTag { .. } => RouteError::TagInvalid(e.to_string()),
        other => name_invalid(other),
    })?;
    Ok(Image {
        registry: parsed.registry().to_owned(),
        repository: parsed.repository().to_owned(),
    })
}

fn name_invalid(err: ReferenceError) -> RouteError {
    RouteError::NameInvalid(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn image(registry: &str, repository: &str) -> Image {
        Image {
            registry: registry.into(),
            repository: repository.into(),
        }
    }

    #[test]
    fn parses_rewritten_paths() {
        assert_eq!(parse("/v2/", None), Ok(Route::Base));
        assert_eq!(parse("/v2", None), Ok(Route::Base));
        assert_eq!(
            parse("/v2/docker.io/library/nginx/manifests/1.27", None),
            Ok(Route::Manifest {
                image: image("docker.io", "library/nginx"),
                reference: ManifestRef::Tag("1.27".into())
            })
        );
        assert_eq!(
            parse(&format!("/v2/registry_5000/a/b/c/manifests/{D}"), None),
            Ok(Route::Manifest {
                image: image("registry:5000", "a/b/c"),
                reference: ManifestRef::Digest(Digest::parse(D).unwrap())
            })
        );
        assert_eq!(
            parse(&format!("/v2/127.0.0.1_5000/app/blobs/{D}"), None),
            Ok(Route::Blob {
                image: image("127.0.0.1:5000", "app"),
                digest: Digest::parse(D).unwrap()
            })
        );
        // A repository named like an endpoint still parses: the last two segments decide.
        assert_eq!(
            parse("/v2/ghcr.io/org/manifests/manifests/v1", None),
            Ok(Route::Manifest {
                image: image("ghcr.io", "org/manifests"),
                reference: ManifestRef::Tag("v1".into())
            })
        );
    }

    #[test]
    fn parses_the_containerd_mirror_form() {
        assert_eq!(
            parse("/v2/library/nginx/manifests/latest", Some("docker.io")),
            Ok(Route::Manifest {
                image: image("docker.io", "library/nginx"),
                reference: ManifestRef::Tag("latest".into())
            })
        );
        assert_eq!(
            parse(
                &format!("/v2/team/app/blobs/{D}"),
                Some("Registry.Example.com:5000")
            ),
            Ok(Route::Blob {
                image: image("registry.example.com:5000", "team/app"),
                digest: Digest::parse(D).unwrap()
            })
        );
        // Docker Hub's one-component names get `library/`, as everywhere else.
        let Ok(Route::Manifest { image: i, .. }) =
            parse("/v2/nginx/manifests/1", Some("docker.io"))
        else {
            panic!("should parse");
        };
        assert_eq!(i.repository, "library/nginx");
    }

    #[test]
    fn refuses_malformed_requests_with_the_right_code() {
        let cases: &[(&str, Option<&str>, &str, u16)] = &[
            ("/v3/", None, "UNSUPPORTED", 404),
            ("/v2x", None, "UNSUPPORTED", 404),
            ("/v2/_catalog", None, "UNSUPPORTED", 404),
            (
                "/v2/docker.io/library/nginx/tags/other",
                None,
                "UNSUPPORTED",
                404,
            ),
            (
                "/v2/docker.io/library/nginx/referrers/latest",
                None,
                "DIGEST_INVALID",
                400,
            ),
            (
                "/v2/docker.io/library/nginx/blobs/uploads/",
                None,
                "UNSUPPORTED",
                404,
            ),
            ("/v2/docker.io/manifests/latest", None, "NAME_INVALID", 400),
            (
                "/v2/docker.io/Library/nginx/manifests/latest",
                None,
                "NAME_INVALID",
                400,
            ),
            (
                "/v2/host_99999/app/manifests/latest",
                None,
                "NAME_INVALID",
                400,
            ),
            (
                "/v2/bad!host/app/manifests/latest",
                None,
                "NAME_INVALID",
                400,
            ),
            (
                "/v2/docker.io/a//b/manifests/latest",
                None,
                "NAME_INVALID",
                400,
            ),
            (
                "/v2/docker.io/library/nginx/manifests/-bad",
                None,
                "TAG_INVALID",
                400,
            ),
            (
                "/v2/docker.io/library/nginx/manifests/sha256:abc",
                None,
                "DIGEST_INVALID",
                400,
            ),
            (
                "/v2/docker.io/library/nginx/blobs/latest",
                None,
                "DIGEST_INVALID",
                400,
            ),
            (
                "/v2/docker.io/library/nginx/blobs/sha256:../../etc",
                None,
                "UNSUPPORTED",
                404,
            ),
            (
                "/v2/docker.io/library/nginx/blobs/sha256:..%2f..%2fetc",
                None,
                "DIGEST_INVALID",
                400,
            ),
            (
                "/v2/docker.io/library/nginx/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
                None,
                "DIGEST_INVALID",
                400,
            ),
            (
                "/v2/library/nginx/manifests/latest",
                Some("bad host"),
                "NAME_INVALID",
                400,
            ),
            (
                "/v2/library/nginx/manifests/latest",
                Some("[::1]:5000"),
                "NAME_INVALID",
                400,
            ),
        ];
        for (path, ns, code, status) in cases {
            let err = parse(path, *ns).expect_err(path);
            assert_eq!(err.oci_code(), *code, "{path}: {err}");
            assert_eq!(err.status().as_u16(), *status, "{path}: {err}");
        }
    }

    #[test]
    fn parses_tags_and_referrers_in_both_forms() {
        assert_eq!(
            parse("/v2/docker.io/library/nginx/tags/list", None),
            Ok(Route::Tags {
                image: image("docker.io", "library/nginx"),
                form: PathForm::Rewritten
            })
        );
        assert_eq!(
            parse("/v2/nginx/tags/list", Some("docker.io")),
            Ok(Route::Tags {
                image: image("docker.io", "library/nginx"),
                form: PathForm::Mirror {
                    ns: "docker.io".into()
                }
            })
        );
        assert_eq!(
            parse(&format!("/v2/127.0.0.1_5000/a/b/referrers/{D}"), None),
            Ok(Route::Referrers {
                image: image("127.0.0.1:5000", "a/b"),
                digest: Digest::parse(D).unwrap()
            })
        );
        assert_eq!(
            parse(&format!("/v2/a/b/referrers/{D}"), Some("ghcr.io")),
            Ok(Route::Referrers {
                image: image("ghcr.io", "a/b"),
                digest: Digest::parse(D).unwrap()
            })
        );
        // cosign's fallback tags are ordinary tags.
        let sig = format!("{}.sig", D.replace(':', "-"));
        assert_eq!(
            parse(&format!("/v2/ghcr.io/a/manifests/{sig}"), None),
            Ok(Route::Manifest {
                image: image("ghcr.io", "a"),
                reference: ManifestRef::Tag(sig)
            })
        );
        // A repository whose last component is `tags` still has manifests.
        assert!(matches!(
            parse("/v2/ghcr.io/org/tags/manifests/v1", None),
            Ok(Route::Manifest { .. })
        ));
    }

    #[test]
    fn tags_query_is_checked_and_encoded() {
        assert_eq!(TagsQuery::parse(None, None), Ok(TagsQuery::default()));
        assert_eq!(TagsQuery::default().suffix(), "tags/list");
        let q = TagsQuery::parse(Some("10"), Some("v1.2")).unwrap();
        assert_eq!(q.suffix(), "tags/list?n=10&last=v1.2");
        assert_eq!(
            TagsQuery::parse(Some("99999999999"), None).unwrap().n,
            Some(TAGS_PAGE_MAX)
        );
        assert_eq!(
            TagsQuery::parse(Some(""), Some("")),
            Ok(TagsQuery::default())
        );
        for (n, last) in [
            (Some("-1"), None),
            (Some("x"), None),
            (None, Some("a/b")),
            (None, Some("-a")),
        ] {
            let err = TagsQuery::parse(n, last).unwrap_err();
            assert_eq!(err.oci_code(), "PAGINATION_NUMBER_INVALID");
            assert_eq!(err.status().as_u16(), 400);
        }
    }

    #[test]
    fn tag_links_point_back_at_the_proxy_in_the_clients_form() {
        let img = image("registry.example.com:5000", "team/app");
        let rewritten = PathForm::Rewritten;
        let mirror = PathForm::Mirror {
            ns: "registry.example.com:5000".into(),
        };
        let link = r#"</v2/team/app/tags/list?last=v2&n=2>; rel="next""#;
        assert_eq!(
            rewrite_tags_link(link, &img, &rewritten).as_deref(),
            Some(r#"</v2/registry.example.com_5000/team/app/tags/list?n=2&last=v2>; rel="next""#)
        );
        assert_eq!(
            rewrite_tags_link(link, &img, &mirror).as_deref(),
            Some(
                r#"</v2/team/app/tags/list?n=2&last=v2&ns=registry.example.com:5000>; rel="next""#
            )
        );
        // An absolute URL elsewhere, or naming another repository: only n and last are kept.
        let link = r#"<https://evil.example/v2/other/tags/list?n=5&last=a%2Db&x=1>; rel="next""#;
        assert_eq!(
            rewrite_tags_link(link, &img, &rewritten).as_deref(),
            Some(r#"</v2/registry.example.com_5000/team/app/tags/list?n=5&last=a-b>; rel="next""#)
        );
        // No next page, no `last`, bad values, garbage: no link.
        for bad in [
            r#"</v2/team/app/tags/list?n=2&last=v2>; rel="prev""#,
            r#"</v2/team/app/tags/list?n=2>; rel="next""#,
            r#"</v2/team/app/tags/list?last=..%2F..>; rel="next""#,
            r#"</v2/team/app/tags/list?last=%zz>; rel="next""#,
            "garbage",
            "",
        ] {
            assert_eq!(rewrite_tags_link(bad, &img, &rewritten), None, "{bad}");
        }
    }
}
