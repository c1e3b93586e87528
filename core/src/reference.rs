//! Container image references: the docker reference grammar, normalisation, and the proxy rewrite.
//!
//! Grammar (as containerd and docker read it):
//!
//! ```text
//! reference      := name [ ":" tag ] [ "@" digest ]
//! name           := [ domain "/" ] path            (at most 255 characters)
//! domain         := host [ ":" port ]
//! host           := domain-name | IPv4 | "[" IPv6 "]"
//! path           := path-component ( "/" path-component )*
//! path-component := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
//! tag            := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
//! ```
//!
//! The first `/`-separated component is a domain only if it contains `.` or `:`, is `localhost`,
//! or has uppercase letters; otherwise the image is on Docker Hub (`docker.io`), where one-component
//! paths live under `library/`. Hosts are lowercased (DNS is case-insensitive), so every reference
//! has one canonical form.
//!
//! The proxy rewrite puts the registry into the first path component on the proxy:
//! `<host>[:port]/<path>` ⇄ `<proxy>/<host>[_<port>]/<path>`. Hosts never contain `_`, so the
//! encoding is reversible, and the result is itself a valid reference that containerd accepts.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use sha2::Digest as _;

use crate::digest::{Digest, DigestError};

/// Docker Hub's canonical registry name.
pub const DOCKER_HUB: &str = "docker.io";
/// The longest name (domain and path, without tag or digest) that the grammar allows.
pub const NAME_MAX_LEN: usize = 255;
/// The longest tag the grammar allows.
pub const TAG_MAX_LEN: usize = 128;

/// Why a reference was refused; each says what is wrong with the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("image reference `{0}` contains whitespace or control characters")]
    BadCharacter(String),
    #[error("image reference `{0}` has more than one `@`")]
    MultipleDigests(String),
    #[error("invalid digest in `{reference}`: {source}")]
    Digest {
        reference: String,
        #[source]
        source: DigestError,
    },
    #[error(
        "invalid tag `{tag}` in `{reference}`: a tag is 1 to 128 of [A-Za-z0-9_.-] and does not start with `.` or `-`"
    )]
    BadTag { reference: String, tag: String },
    #[error("invalid registry host `{host}` in `{reference}`: {why}")]
    BadHost {
        reference: String,
        host: String,
        why: &'static str,
    },
    #[error("invalid port `{port}` in `{reference}`: a port is a number from 1 to 65535")]
    BadPort { reference: String, port: String },
    #[error("repository name is missing in `{0}`")]
    MissingRepository(String),
    #[error(
        "repository `{repository}` in `{reference}` has uppercase letters; repository names are lowercase"
    )]
    UppercaseRepository {
        reference: String,
        repository: String,
    },
    #[error(
        "invalid path component `{component}` in `{reference}`: components are lowercase letters and digits, separated by `.`, `_`, `__` or dashes, and are not empty"
    )]
    BadPathComponent {
        reference: String,
        component: String,
    },
    #[error("image name in `{reference}` is {len} characters long; the limit is {NAME_MAX_LEN}")]
    NameTooLong { reference: String, len: usize },
    #[error("`{0}` is not on the proxy address `{1}`")]
    NotOnProxy(String, String),
    #[error(
        "registry `{registry}` cannot be rewritten: {why} (the image keeps its original reference)"
    )]
    NotRewritable { registry: String, why: &'static str },
}

/// A parsed, normalised image reference.
///
/// `registry` is `host[:port]`, lowercase, `docker.io` for Docker Hub; `repository` is the path
/// (with `library/` added for one-component Docker Hub names); `tag` is `latest` when the input
/// had neither tag nor digest, and absent when only a digest was given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalises a reference such as `nginx`, `ghcr.io/org/app:v1`,
    /// `registry:5000/x@sha256:…`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let (name, tag, digest) = split_tag_and_digest(input)?;
        let (registry, path) = split_domain(input, name)?;
        Self::from_parts(input, registry, path, tag, digest)
    }

    /// Builds a reference from a registry and a `path[:tag][@digest]` remainder: the form the
    /// proxy sees in `/v2/<host>/<path>/...` URLs and in rewritten images.
    pub fn parse_on_registry(registry: &str, remainder: &str) -> Result<Self, ReferenceError> {
        let full = format!("{registry}/{remainder}");
        let (path, tag, digest) =
            split_tag_and_digest(remainder).map_err(|e| retarget(e, remainder, &full))?;
        Self::from_parts(&full, registry.to_owned(), path.to_owned(), tag, digest)
    }

    fn from_parts(
        input: &str,
        registry: String,
        path: String,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Result<Self, ReferenceError> {
        let registry = normalise_registry(input, &registry)?;
        let mut repository = path;
        if repository.is_empty() {
            return Err(ReferenceError::MissingRepository(input.to_owned()));
        }
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        validate_path(input, &repository)?;
        let name_len = registry.len() + 1 + repository.len();
        if name_len > NAME_MAX_LEN {
            return Err(ReferenceError::NameTooLong {
                reference: input.to_owned(),
                len: name_len,
            });
        }
        if let Some(tag) = tag {
            validate_tag(input, tag)?;
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, None) => Some("latest".to_owned()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// `host[:port]`, lowercase; `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path, e.g. `library/nginx`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag, if any (`latest` when the input had neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, if the reference pins one.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask a registry's manifest endpoint for: the digest when pinned, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            // Invariant of `from_parts`: a reference without digest always has a tag.
            (None, None) => "latest".to_owned(),
        }
    }

    /// `host[:port]/path`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The registry as one path component: `host` or `host_port`.
    pub fn encoded_registry(&self) -> Result<String, ReferenceError> {
        encode_registry(&self.registry)
    }

    /// The registry's repository path as larder stores it in the cache registry and serves it
    /// on the proxy: `<host>[_<port>]/<path>`.
    pub fn proxy_repository(&self) -> Result<String, ReferenceError> {
        Ok(format!("{}/{}", self.encoded_registry()?, self.repository))
    }

    /// The reference rewritten onto the node proxy:
    /// `<proxy_address>/<host>[_<port>]/<path>[:tag][@digest]`.
    ///
    /// Fails when the registry is an IPv6 literal (not expressible as a path component) or when
    /// the result would exceed the 255-character name limit containerd enforces.
    pub fn rewrite(&self, proxy_address: &str) -> Result<String, ReferenceError> {
        let repository = self.proxy_repository()?;
        let name_len = proxy_address.len() + 1 + repository.len();
        if name_len > NAME_MAX_LEN {
            return Err(ReferenceError::NotRewritable {
                registry: self.registry.clone(),
                why: "the rewritten name would exceed 255 characters",
            });
        }
        let mut out = format!("{proxy_address}/{repository}");
        self.push_tag_and_digest(&mut out);
        Ok(out)
    }

    /// The original reference behind a rewritten one, or `None` when `input` is not on
    /// `proxy_address`. The inverse of [`Reference::rewrite`].
    pub fn from_rewritten(
        input: &str,
        proxy_address: &str,
    ) -> Result<Option<Self>, ReferenceError> {
        let Some(rest) = strip_proxy(input, proxy_address) else {
            return Ok(None);
        };
        let (encoded, remainder) = rest
            .split_once('/')
            .ok_or_else(|| ReferenceError::MissingRepository(input.to_owned()))?;
        let registry = decode_registry(encoded).map_err(|e| retarget(e, encoded, input))?;
        let reference = Self::parse_on_registry(&registry, remainder)
            .map_err(|e| retarget(e, &format!("{registry}/{remainder}"), input))?;
        Ok(Some(reference))
    }

    /// True when the registry is on this host (`localhost`, 127.0.0.0/8, `::1`): such images are
    /// already local and rewriting them to the node proxy would only add a hop.
    pub fn is_loopback_registry(&self) -> bool {
        let host = host_of(&self.registry);
        if host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        if let Ok(ip) = host.parse::<Ipv4Addr>() {
            return ip.is_loopback();
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        bare.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The name of this image's `CachedImage` object: a readable, DNS-1123-safe prefix of the
    /// canonical reference plus a hash of all of it, at most 63 characters, so two references
    /// never share a name even when their readable prefixes do.
    pub fn cached_image_name(&self) -> String {
        const PREFIX_MAX: usize = 50;
        let canonical = self.to_string();
        let hash = hex::encode(sha2::Sha256::digest(canonical.as_bytes()));
        let mut prefix = String::with_capacity(PREFIX_MAX);
        for c in canonical.chars() {
            if prefix.len() >= PREFIX_MAX || c == '@' {
                break;
            }
            let c = c.to_ascii_lowercase();
            let c = if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            };
            // Collapse runs of separators: `a/-b` reads better as `a-b`.
            let is_sep = c == '-' || c == '.';
            if is_sep && prefix.ends_with(['-', '.']) {
                continue;
            }
            prefix.push(c);
        }
        let prefix = prefix.trim_matches(|c| c == '-' || c == '.');
        format!("{prefix}-{}", &hash[..12])
    }

    fn push_tag_and_digest(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
    }
}

impl fmt::Display for Reference {
    /// The canonical form: `host[:port]/path[:tag][@digest]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.name();
        self.push_tag_and_digest(&mut out);
        f.write_str(&out)
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// True when `image` is already on the proxy at `proxy_address` (so rewriting is a no-op).
pub fn is_on_proxy(image: &str, proxy_address: &str) -> bool {
    strip_proxy(image, proxy_address).is_some()
}

/// Encodes `host[:port]` as one path component: `host` or `host_port`.
pub fn encode_registry(registry: &str) -> Result<String, ReferenceError> {
    if registry.starts_with('[') {
        return Err(ReferenceError::NotRewritable {
            registry: registry.to_owned(),
            why: "IPv6 literal hosts cannot be written as a path component",
        });
    }
    Ok(registry.replacen(':', "_", 1))
}

/// Decodes a path component made by [`encode_registry`] back into `host[:port]`, validated.
pub fn decode_registry(component: &str) -> Result<String, ReferenceError> {
    let registry = match component.rsplit_once('_') {
        Some((host, port)) => format!("{host}:{port}"),
        None => component.to_owned(),
    };
    normalise_registry(component, &registry)
}

/// Splits `name[:tag][@digest]`.
fn split_tag_and_digest(
    input: &str,
) -> Result<(&str, Option<&str>, Option<Digest>), ReferenceError> {
    if input.is_empty() {
        return Err(ReferenceError::Empty);
    }
    if input.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ReferenceError::BadCharacter(input.to_owned()));
    }
    let (rest, digest) = match input.split_once('@') {
        Some((_, d)) if d.contains('@') => {
            return Err(ReferenceError::MultipleDigests(input.to_owned()));
        }
        Some((rest, d)) => {
            let digest = Digest::parse(d).map_err(|source| ReferenceError::Digest {
                reference: input.to_owned(),
                source,
            })?;
            (rest, Some(digest))
        }
        None => (input, None),
    };
    // A tag's `:` comes after the last `/`; an earlier `:` is the registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (&rest[..at], Some(&rest[at + 1..]))
        }
        None => (rest, None),
    };
    if name.is_empty() {
        return Err(ReferenceError::MissingRepository(input.to_owned()));
    }
    Ok((name, tag, digest))
}

/// Splits a name into registry and path, applying Docker Hub's default.
fn split_domain(input: &str, name: &str) -> Result<(String, String), ReferenceError> {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.starts_with('[')
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            if first.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && first.chars().any(|c| c.is_ascii_uppercase())
            {
                // Docker would read this as a host, but lowercased it would read as a path.
                return Err(ReferenceError::BadHost {
                    reference: input.to_owned(),
                    host: first.to_owned(),
                    why: "a host with uppercase letters and no dot or port is ambiguous; write it in lowercase with its domain or port",
                });
            }
            Ok((first.to_owned(), rest.to_owned()))
        }
        _ => Ok((DOCKER_HUB.to_owned(), name.to_owned())),
    }
}

/// Validates `host[:port]` and returns it in canonical form (lowercase, Docker Hub aliases
/// folded into `docker.io`).
fn normalise_registry(input: &str, registry: &str) -> Result<String, ReferenceError> {
    let bad_host = |why| ReferenceError::BadHost {
        reference: input.to_owned(),
        host: registry.to_owned(),
        why,
    };
    let (host, port) = if let Some(v6) = registry.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| bad_host("an IPv6 host needs a closing `]`"))?;
        addr.parse::<Ipv6Addr>()
            .map_err(|_| bad_host("not a valid IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| bad_host("only `:port` may follow an IPv6 address"))?,
            ),
        };
        (format!("[{}]", addr.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match registry.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (registry, None),
        };
        validate_domain_name(host).map_err(bad_host)?;
        (host.to_ascii_lowercase(), port)
    };
    let host = match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_owned(),
        _ => host,
    };
    match port {
        None => Ok(host),
        Some(p) => {
            let valid = !p.is_empty()
                && p.len() <= 5
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n));
            if !valid {
                return Err(ReferenceError::BadPort {
                    reference: input.to_owned(),
                    port: p.to_owned(),
                });
            }
            // Leading zeros would give two spellings of one registry.
            let port = p.trim_start_matches('0');
            Ok(format!("{host}:{port}"))
        }
    }
}

fn validate_domain_name(host: &str) -> Result<(), &'static str> {
    if host.is_empty() {
        return Err("the host is empty");
    }
    if host.len() > 253 {
        return Err("a host name is at most 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("a host name has no empty labels");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("a host name is letters, digits, dashes and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("a host name label does not start or end with a dash");
        }
    }
    Ok(())
}

fn validate_path(input: &str, path: &str) -> Result<(), ReferenceError> {
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err(ReferenceError::UppercaseRepository {
            reference: input.to_owned(),
            repository: path.to_owned(),
        });
    }
    for component in path.split('/') {
        if !is_path_component(component) {
            return Err(ReferenceError::BadPathComponent {
                reference: input.to_owned(),
                component: component.to_owned(),
            });
        }
    }
    Ok(())
}

/// `[a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*`
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        match bytes[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < bytes.len() && bytes[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < bytes.len() && bytes[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        debug_assert!(i > sep_start);
    }
}

fn validate_tag(input: &str, tag: &str) -> Result<(), ReferenceError> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let valid = !bytes.is_empty()
        && bytes.len() <= TAG_MAX_LEN
        && word(bytes[0])
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::BadTag {
            reference: input.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

fn strip_proxy<'a>(image: &'a str, proxy_address: &str) -> Option<&'a str> {
    let prefix_len = proxy_address.len();
    let head = image.get(..prefix_len)?;
    if !head.eq_ignore_ascii_case(proxy_address) {
        return None;
    }
    image[prefix_len..].strip_prefix('/')
}

fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry.split_once(']').map_or(registry, |(h, _)| h);
    }
    registry.split_once(':').map_or(registry, |(h, _)| h)
}

/// Errors from parsing a part are reported against the whole input the user gave.
fn retarget(err: ReferenceError, part: &str, whole: &str) -> ReferenceError {
    let fix = |s: String| if s == part { whole.to_owned() } else { s };
    match err {
        ReferenceError::BadCharacter(r) => ReferenceError::BadCharacter(fix(r)),
        ReferenceError::MultipleDigests(r) => ReferenceError::MultipleDigests(fix(r)),
        ReferenceError::MissingRepository(r) => ReferenceError::MissingRepository(fix(r)),
        ReferenceError::Digest { reference, source } => ReferenceError::Digest {
            reference: fix(reference),
            source,
        },
        ReferenceError::BadTag { reference, tag } => ReferenceError::BadTag {
            reference: fix(reference),
            tag,
        },
        ReferenceError::BadHost {
            reference,
            host,
            why,
        } => ReferenceError::BadHost {
            reference: fix(reference),
            host,
            why,
        },
        ReferenceError::BadPort { reference, port } => ReferenceError::BadPort {
            reference: fix(reference),
            port,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests;
