//! Parsing proxy request paths into what is asked for. Pure: no I/O, tested below.
//!
//! Two forms are served:
//! - rewritten images: `/v2/<host>[_<port>]/<repo>/{manifests|blobs}/<ref>`;
//! - containerd's mirror form: `/v2/<repo>/{manifests|blobs}/<ref>?ns=<host[:port]>`.

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
}

/// A request the proxy cannot serve; the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("not a registry API path: {0}")]
    NotRegistryApi(String),
    #[error("unsupported endpoint `{0}`: this proxy serves pulls only (manifests and blobs)")]
    Unsupported(String),
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    #[error("invalid tag: {0}")]
    TagInvalid(String),
    #[error("method {0} not allowed: this proxy is read-only")]
    MethodNotAllowed(String),
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
    if name.is_empty() || !matches!(*kind, "manifests" | "blobs") {
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
                "/v2/docker.io/library/nginx/tags/list",
                None,
                "UNSUPPORTED",
                404,
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
}
