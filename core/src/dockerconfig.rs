//! Docker config credentials, the one parser shared by the proxy (`--registry-credentials`) and
//! the controllers (pull Secrets): `kubernetes.io/dockerconfigjson` Secrets (`.dockerconfigjson`,
//! `{"auths": {...}}`), the legacy `kubernetes.io/dockercfg` (`.dockercfg`, the bare map) and
//! `~/.docker/config.json`.
//!
//! An entry is keyed by a registry as users write it (`https://index.docker.io/v1/`, `docker.io`,
//! `host:port`, `host/path`, `*.example.com`) and holds `auth` (base64 `user:password`, which
//! wins, as in kubelet), or `username` and `password`, and optionally an `identitytoken` (an
//! OAuth2 refresh token, used with the token service instead of the password).
//!
//! Credentials never reach logs or errors: `Debug` redacts them and parse errors carry only the
//! entry's key and a position, never a value (serde's messages quote the values they reject).

use std::collections::HashMap;

use base64::Engine as _;
use sha2::Digest as _;

/// Secret type of the current docker config format.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// The data key of [`DOCKER_CONFIG_JSON_TYPE`] Secrets.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
/// Secret type of the legacy format (a bare map of registry → entry).
pub const DOCKER_CFG_TYPE: &str = "kubernetes.io/dockercfg";
/// The data key of [`DOCKER_CFG_TYPE`] Secrets.
pub const DOCKER_CFG_KEY: &str = ".dockercfg";

/// A username and password (or token) for one registry, and optionally an identity token.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// `identitytoken`: an OAuth2 refresh token for the registry's token service.
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field(
                "identity_token",
                &self.identity_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Credentials {
    /// A username and password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
            identity_token: None,
        }
    }

    /// Reads `Authorization: Basic <base64(user:pass)>`; anything else is `None`.
    pub fn from_basic_header(value: &str) -> Option<Self> {
        let (scheme, encoded) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = decode_base64(encoded.trim())?;
        Self::from_user_colon_pass(&String::from_utf8(decoded).ok()?)
    }

    fn from_user_colon_pass(text: &str) -> Option<Self> {
        let (username, password) = text.split_once(':')?;
        if username.is_empty() {
            return None;
        }
        Some(Self::new(username, password))
    }

    /// The `Authorization` header value that presents these credentials.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            encode_base64(format!("{}:{}", self.username, self.password).as_bytes())
        )
    }

    /// A stable, one-way key for caches: never the credentials themselves.
    pub fn fingerprint(&self) -> String {
        let mut hasher = sha2::Sha256::new();
        hasher.update(self.username.as_bytes());
        hasher.update([0]);
        hasher.update(self.password.as_bytes());
        if let Some(token) = &self.identity_token {
            hasher.update([1]);
            hasher.update(token.as_bytes());
        }
        hex::encode(&hasher.finalize()[..16])
    }
}

/// Why a docker config could not be read. Never contains a credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerConfigError {
    /// The document is not JSON of the expected shape (position only, no content).
    #[error("not a docker config: {0}")]
    Syntax(String),
    /// One entry cannot be used.
    #[error("the entry `{key}`: {reason}")]
    Entry { key: String, reason: String },
}

/// One `auths` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key as written.
    pub key: String,
    /// The canonical host (`host[:port]`, lowercase, Docker Hub aliases folded into
    /// `docker.io`); may hold `*` labels (`*.example.com`).
    pub host: String,
    /// The path after the host, without `/v1/`-style API suffixes and slashes at the ends
    /// (`""` for a host-wide entry).
    pub path: String,
    pub credentials: Credentials,
}

/// A parsed docker config: its entries, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerConfig {
    pub entries: Vec<Entry>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// serde's message without the value it quotes.
fn syntax(e: &serde_json::Error) -> DockerConfigError {
    let kind = match e.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected content",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    DockerConfigError::Syntax(format!("{kind} at line {} column {}", e.line(), e.column()))
}

impl DockerConfig {
    /// Parses `{"auths": {...}}` (a `.dockerconfigjson` or `~/.docker/config.json`; other
    /// top-level fields are ignored). Any unusable entry fails the whole document: a typo must
    /// not silently mean "no credentials".
    pub fn parse(json: &[u8]) -> Result<Self, DockerConfigError> {
        #[derive(serde::Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, RawEntry>,
        }
        let config: Config = serde_json::from_slice(json).map_err(|e| syntax(&e))?;
        Self::from_raw(config.auths)
    }

    /// Parses the legacy `.dockercfg` format: the `auths` map alone.
    pub fn parse_legacy(json: &[u8]) -> Result<Self, DockerConfigError> {
        let auths: HashMap<String, RawEntry> =
            serde_json::from_slice(json).map_err(|e| syntax(&e))?;
        Self::from_raw(auths)
    }

    /// The docker config a Secret's `type` and `data` hold: `None` for a Secret of another
    /// type or without its key (kubelet skips those too).
    pub fn from_secret_data(
        type_: Option<&str>,
        data: impl Fn(&str) -> Option<Vec<u8>>,
    ) -> Option<Result<Self, DockerConfigError>> {
        match type_ {
            Some(DOCKER_CONFIG_JSON_TYPE) => data(DOCKER_CONFIG_JSON_KEY).map(|d| Self::parse(&d)),
            Some(DOCKER_CFG_TYPE) => data(DOCKER_CFG_KEY).map(|d| Self::parse_legacy(&d)),
            _ => None,
        }
    }

    fn from_raw(auths: HashMap<String, RawEntry>) -> Result<Self, DockerConfigError> {
        let mut entries = Vec::with_capacity(auths.len());
        for (key, raw) in auths {
            let invalid = |reason: &str| DockerConfigError::Entry {
                key: key.clone(),
                reason: reason.to_owned(),
            };
            let identity_token = raw.identitytoken.filter(|t| !t.is_empty());
            let mut credentials = match (&raw.auth, &raw.username, &raw.password) {
                (Some(auth), _, _) if !auth.is_empty() => decode_base64(auth)
                    .and_then(|d| String::from_utf8(d).ok())
                    .and_then(|text| {
                        // An identity token entry often has an empty user (`<token>:` or `:`).
                        let (user, pass) = text.split_once(':')?;
                        (identity_token.is_some() || !user.is_empty())
                            .then(|| Credentials::new(user, pass))
                    })
                    .ok_or_else(|| invalid("`auth` is not base64 of user:password"))?,
                (_, Some(username), Some(password)) => {
                    Credentials::new(username.clone(), password.clone())
                }
                _ if identity_token.is_some() => {
                    Credentials::new(raw.username.clone().unwrap_or_default(), "")
                }
                _ => {
                    return Err(invalid(
                        "has neither `auth`, `username` and `password`, nor `identitytoken`",
                    ));
                }
            };
            credentials.identity_token = identity_token;
            let (host, path) = split_key(&key);
            if host.is_empty() {
                return Err(invalid("names no registry"));
            }
            entries.push(Entry {
                key,
                host,
                path,
                credentials,
            });
        }
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Self { entries })
    }

    /// The credentials for an image in `repository` on `registry` (`host[:port]` as in image
    /// references; Docker Hub aliases are the same registry), most specific first: entries
    /// whose path is a prefix of the repository (by segments) before host-wide ones, exact hosts
    /// before wildcards. Each distinct credential appears once.
    pub fn matching(&self, registry: &str, repository: &str) -> Vec<&Credentials> {
        let registry = canonical_host(registry);
        let mut found: Vec<(&Entry, bool)> = self
            .entries
            .iter()
            .filter_map(|e| {
                let exact = e.host == registry;
                (exact || host_matches(&e.host, &registry)).then_some((e, exact))
            })
            .filter(|(e, _)| path_matches(&e.path, repository))
            .collect();
        found.sort_by(|(a, ax), (b, bx)| {
            b.path
                .len()
                .cmp(&a.path.len())
                .then(bx.cmp(ax))
                .then(a.key.cmp(&b.key))
        });
        let mut out: Vec<&Credentials> = Vec::new();
        for (e, _) in found {
            if !out.contains(&&e.credentials) {
                out.push(&e.credentials);
            }
        }
        out
    }

    /// The credentials for `registry` as a whole (the proxy's `--registry-credentials`):
    /// host-wide entries first, exact before wildcard, then path-scoped ones.
    pub fn for_registry(&self, registry: &str) -> Option<&Credentials> {
        let registry = canonical_host(registry);
        let rank = |e: &Entry| {
            (
                !e.path.is_empty(),
                e.host != registry,
                e.path.len(),
                e.key.clone(),
            )
        };
        self.entries
            .iter()
            .filter(|e| e.host == registry || host_matches(&e.host, &registry))
            .min_by_key(|e| rank(e))
            .map(|e| &e.credentials)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`; `Registry.Example.com:5000/path` →
/// `registry.example.com:5000`.
pub fn registry_key(key: &str) -> String {
    split_key(key).0
}

/// The host and the path of a key (scheme dropped, `/v1/` or `/v2/` API suffix dropped).
fn split_key(key: &str) -> (String, String) {
    let (host, path) = key_parts(key);
    (canonical_host(host), path.to_owned())
}

/// A docker config key read as kubelet's keyring reads it: the host as written (an `http://`
/// or `https://` scheme dropped) and the path under it without surrounding slashes, a leading
/// `v1/` or `v2/` dropped (the docker CLI's API suffix: `https://index.docker.io/v1/` means the
/// host alone). Kubelet drops the segment only with its slash: `…/v1` is a path `v1`.
pub fn key_parts(key: &str) -> (&str, &str) {
    let trimmed = key.trim();
    let rest = ["https://", "http://"]
        .iter()
        .find_map(|scheme| {
            trimmed
                .get(..scheme.len())
                .filter(|p| p.eq_ignore_ascii_case(scheme))
                .map(|_| &trimmed[scheme.len()..])
        })
        .unwrap_or(trimmed);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let path = ["v1/", "v2/"]
        .iter()
        .find_map(|api| path.strip_prefix(api))
        .unwrap_or(path)
        .trim_matches('/');
    (host, path)
}

/// Lowercase, Docker Hub's aliases folded into `docker.io`.
pub fn canonical_host(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
}

/// `*.example.com` matches `a.example.com` (one label per `*`, as kubelet's glob does); ports
/// must be equal.
fn host_matches(pattern: &str, host: &str) -> bool {
    if !pattern.contains('*') {
        return false;
    }
    let split = |h: &str| -> (String, Option<String>) {
        match h.rsplit_once(':') {
            Some((name, port)) => (name.to_owned(), Some(port.to_owned())),
            None => (h.to_owned(), None),
        }
    };
    let (pattern_name, pattern_port) = split(pattern);
    let (name, port) = split(host);
    if pattern_port != port {
        return false;
    }
    let labels: Vec<&str> = name.split('.').collect();
    let patterns: Vec<&str> = pattern_name.split('.').collect();
    labels.len() == patterns.len()
        && patterns
            .iter()
            .zip(&labels)
            .all(|(p, l)| *p == "*" && !l.is_empty() || p == l)
}

/// A path-scoped entry applies to that repository and everything under it.
fn path_matches(path: &str, repository: &str) -> bool {
    path.is_empty()
        || repository == path
        || repository
            .strip_prefix(path)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn creds(user: &str, pass: &str) -> Credentials {
        Credentials::new(user, pass)
    }

    #[test]
    fn basic_headers_parse_print_and_never_show_the_password() {
        let c = Credentials::from_basic_header("Basic dXNlcjpwYXNz").unwrap();
        assert_eq!(c, creds("user", "pass"));
        assert_eq!(c.basic_header(), "Basic dXNlcjpwYXNz");
        assert!(Credentials::from_basic_header("Bearer abc").is_none());
        assert!(Credentials::from_basic_header("Basic %%%").is_none());
        assert!(
            Credentials::from_basic_header(&format!("Basic {}", encode_base64(b"nocolon")))
                .is_none()
        );
        let mut with_token = c.clone();
        with_token.identity_token = Some("refresh-me".into());
        let shown = format!("{with_token:?}");
        assert!(
            !shown.contains("pass\"") && !shown.contains("refresh-me"),
            "{shown}"
        );
        assert_ne!(c.fingerprint(), creds("user", "other").fingerprint());
        assert_ne!(c.fingerprint(), with_token.fingerprint());
    }

    #[test]
    fn keys_are_normalised() {
        for (key, host) in [
            ("https://index.docker.io/v1/", "docker.io"),
            ("registry-1.docker.io", "docker.io"),
            ("docker.io", "docker.io"),
            (
                "Registry.Example.com:5000/path",
                "registry.example.com:5000",
            ),
            ("http://127.0.0.1:5000", "127.0.0.1:5000"),
        ] {
            assert_eq!(registry_key(key), host, "{key}");
        }
        assert_eq!(split_key("https://index.docker.io/v1/").1, "");
        assert_eq!(split_key("ghcr.io/org/team/").1, "org/team");
        assert_eq!(split_key("ghcr.io/v1team").1, "v1team");
        // The host as written, for callers that compare it before normalising.
        assert_eq!(
            key_parts("HTTPS://Registry.Example.com:5000/v2/team/"),
            ("Registry.Example.com:5000", "team")
        );
        assert_eq!(
            key_parts("https://index.docker.io/v1/"),
            ("index.docker.io", "")
        );
        // As kubelet: without its slash the API segment is a path, matching no image of
        // Docker Hub's (`library/…`), so these credentials are not used for them.
        assert_eq!(
            key_parts("https://index.docker.io/v1"),
            ("index.docker.io", "v1")
        );
    }

    #[test]
    fn entries_parse_in_every_form() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "Registry.Example.com:5000": {"username": "u", "password": "p"},
            "acr.example": {"auth": "MDAwMDAwMDAtMDAwMDo=", "identitytoken": "rt"},
            "token-only.example": {"identitytoken": "rt2"}
        }, "credsStore": "desktop"}"#;
        let config = DockerConfig::parse(json).unwrap();
        assert_eq!(config.entries.len(), 4);
        assert_eq!(
            config.for_registry("docker.io"),
            Some(&creds("user", "pass"))
        );
        assert_eq!(
            config.for_registry("index.docker.io"),
            Some(&creds("user", "pass")),
            "aliases are the same registry"
        );
        assert_eq!(
            config
                .for_registry("registry.example.com:5000")
                .unwrap()
                .password,
            "p"
        );
        let acr = config.for_registry("acr.example").unwrap();
        assert_eq!(
            (acr.username.as_str(), acr.identity_token.as_deref()),
            ("00000000-0000", Some("rt"))
        );
        assert_eq!(
            config
                .for_registry("token-only.example")
                .unwrap()
                .identity_token
                .as_deref(),
            Some("rt2")
        );
        assert!(config.for_registry("elsewhere.example").is_none());
        let legacy =
            DockerConfig::parse_legacy(br#"{"quay.io": {"auth": "dXNlcjpwYXNz"}}"#).unwrap();
        assert_eq!(legacy.for_registry("quay.io"), Some(&creds("user", "pass")));
    }

    #[test]
    fn bad_documents_are_refused_without_echoing_values() {
        for bad in [
            &br#"{"auths": {"x": {}}}"#[..],
            br#"{"auths": {"x": {"auth": "bm9jb2xvbg=="}}}"#,
            br#"{"auths": {"x": {"auth": "!!!"}}}"#,
            br#"{"auths": {"": {"username": "u", "password": "p"}}}"#,
            b"not json",
        ] {
            assert!(
                DockerConfig::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let err =
            DockerConfig::parse(br#"{"auths": {"x": {"username": "u", "password": 987654321}}}"#)
                .unwrap_err()
                .to_string();
        assert!(!err.contains("987654321"), "{err}");
        let err = DockerConfig::parse(br#"{"auths": {"x": {"auth": "c2VjcmV0LXZhbHVl"}}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            !err.contains("c2VjcmV0") && !err.contains("secret-value"),
            "{err}"
        );
    }

    #[test]
    fn lookup_prefers_paths_then_exact_hosts_and_respects_ports() {
        let json = br#"{"auths": {
            "ghcr.io": {"username": "any", "password": "1"},
            "ghcr.io/org": {"username": "org", "password": "2"},
            "ghcr.io/org/team": {"username": "team", "password": "3"},
            "*.example.com": {"username": "wild", "password": "4"},
            "a.example.com": {"username": "exact", "password": "5"},
            "reg.local:5000": {"username": "port", "password": "6"}
        }}"#;
        let config = DockerConfig::parse(json).unwrap();
        let users = |registry: &str, repo: &str| -> Vec<String> {
            config
                .matching(registry, repo)
                .iter()
                .map(|c| c.username.clone())
                .collect()
        };
        assert_eq!(users("ghcr.io", "org/team/app"), ["team", "org", "any"]);
        assert_eq!(users("ghcr.io", "org/teamx"), ["org", "any"]);
        assert_eq!(users("ghcr.io", "other/app"), ["any"]);
        assert_eq!(users("a.example.com", "x"), ["exact", "wild"]);
        assert_eq!(users("b.example.com", "x"), ["wild"]);
        assert!(users("a.b.example.com", "x").is_empty(), "one label per *");
        assert_eq!(users("reg.local:5000", "x"), ["port"]);
        assert!(users("reg.local", "x").is_empty());
        assert!(users("reg.local:5001", "x").is_empty());
        assert_eq!(config.for_registry("ghcr.io").unwrap().username, "any");
    }

    #[test]
    fn secrets_of_other_types_hold_nothing() {
        let data = |key: &str| {
            (key == DOCKER_CONFIG_JSON_KEY)
                .then(|| br#"{"auths": {"r.example": {"auth": "dXNlcjpwYXNz"}}}"#.to_vec())
        };
        let parsed = DockerConfig::from_secret_data(Some(DOCKER_CONFIG_JSON_TYPE), data)
            .unwrap()
            .unwrap();
        assert_eq!(parsed.entries.len(), 1);
        assert!(DockerConfig::from_secret_data(Some("Opaque"), data).is_none());
        assert!(DockerConfig::from_secret_data(None, data).is_none());
        assert!(DockerConfig::from_secret_data(Some(DOCKER_CFG_TYPE), data).is_none());
    }
}
