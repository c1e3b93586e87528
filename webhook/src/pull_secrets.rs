//! Pull secrets through the rewrite (`--pull-secrets`).
//!
//! kubelet looks up registry credentials by the image as written in the pod. Once an image is
//! rewritten to `localhost:7439/ghcr.io/org/app`, the pod's `imagePullSecrets` (keyed `ghcr.io`)
//! no longer match, kubelet pulls anonymously and the proxy answers a private repository with
//! 401. Two answers, chosen by [`PullSecretsMode`]:
//!
//! - `skip` (the default): a pod with `imagePullSecrets` is not rewritten at all; the webhook
//!   needs no access to Secrets.
//! - `derive`: the webhook reads the Secrets the pod names (and only those), builds one derived
//!   `kubernetes.io/dockerconfigjson` Secret whose entries are keyed by the proxy form of each
//!   registry (`localhost:7439/ghcr.io/`, `localhost:7439/registry.example.com_5000/`; the
//!   trailing `/` matters, see `proxy_key`), creates it
//!   in the pod's namespace and adds it to the pod. The originals stay: images that are not
//!   rewritten still need them.
//!
//! [`derive_pull_secret`] is the pure part; [`provide`] does the Kubernetes I/O around it.
//!
//! The derived Secret's name is a hash of the proxy address and of the identity of its sources
//! (name, uid, resourceVersion), never of their content: pod specs are readable by many more
//! subjects than Secrets, and a short hash of credentials in a name would let them test guesses
//! of a weak password offline. The same sources give the same name on every replica and every
//! reinvocation, so creation is idempotent (`AlreadyExists` is success) and a second pass finds
//! the name already in the pod.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use larder_core::derived_secrets;
use larder_core::dockerconfig;
use larder_core::reference::{self, Reference};
use serde::Deserialize;
use sha2::Digest as _;

/// Secrets named with [`DERIVED_PREFIX`] are never read as sources (they are our own output;
/// reading them would only cost a request).
pub use larder_core::derived_secrets::{
    DERIVED_FROM_ANNOTATION, DERIVED_PREFIX, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    SOURCE_VERSIONS_ANNOTATION,
};
/// Secret type and key of the current docker config format.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// Key of [`DOCKER_CONFIG_JSON_TYPE`] Secrets.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
/// Secret type of the legacy format (a bare map of registry → entry).
pub const DOCKER_CFG_TYPE: &str = "kubernetes.io/dockercfg";
/// Key of [`DOCKER_CFG_TYPE`] Secrets.
pub const DOCKER_CFG_KEY: &str = ".dockercfg";

/// What to do with pods that have `imagePullSecrets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PullSecretsMode {
    /// Leave such pods unrewritten. No Secret access.
    #[default]
    Skip,
    /// Derive a Secret for the proxy address and add it to the pod.
    Derive,
}

/// Which docker config format a source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// `{"auths": {"<registry>": {...}}}` (`.dockerconfigjson`).
    Json,
    /// `{"<registry>": {...}}` (`.dockercfg`).
    Legacy,
}

/// One pull Secret of the pod, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSecret {
    /// The Secret's name.
    pub name: String,
    /// Its identity and version (`<uid>/<resourceVersion>`): the derived name changes when a
    /// source is replaced or edited.
    pub version: String,
    /// Which format `data` is in.
    pub format: SourceFormat,
    /// The raw docker config.
    pub data: Vec<u8>,
}

/// The derived docker config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivedSecret {
    /// `larder-pull-<10 hex>`.
    pub name: String,
    /// The `.dockerconfigjson` content (deterministic: keys sorted).
    pub config: Vec<u8>,
    /// The derived keys (`<proxy>/<host>[_<port>]/`, or `<proxy>/<host>[_<port>]/<path>`), sorted.
    pub keys: Vec<String>,
    /// Names of the sources, in the order given.
    pub sources: Vec<String>,
    /// The [`SOURCE_VERSIONS_ANNOTATION`] value: the version of each source, so the controller
    /// can tell when this Secret is superseded.
    pub source_versions: String,
}

impl DerivedSecret {
    /// True when no source had credentials kubelet would use: nothing to add to the pod.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The Secret object to create in `namespace`. Immutable: its name fixes its content.
    pub fn to_secret(&self, namespace: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(namespace.to_owned()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    MANAGED_BY_VALUE.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([
                    (DERIVED_FROM_ANNOTATION.to_owned(), self.sources.join(",")),
                    (
                        SOURCE_VERSIONS_ANNOTATION.to_owned(),
                        self.source_versions.clone(),
                    ),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some(DOCKER_CONFIG_JSON_TYPE.to_owned()),
            data: Some(BTreeMap::from([(
                DOCKER_CONFIG_JSON_KEY.to_owned(),
                ByteString(self.config.clone()),
            )])),
            immutable: Some(true),
            ..Secret::default()
        }
    }
}

/// Why the pull secrets of a pod could not be carried over. Any of these leaves the pod
/// unrewritten (never half-rewritten); the message names the Secret.
#[derive(Debug, thiserror::Error)]
pub enum PullSecretError {
    /// GET of a pull Secret failed (403: RBAC; 404: the pod names a Secret that is not there).
    #[error("cannot read pull secret `{secret}`: {source}")]
    Read {
        secret: String,
        #[source]
        source: kube::Error,
    },
    /// A pull Secret's content is not a docker config kubelet could use.
    #[error("pull secret `{secret}`: {reason}")]
    Invalid { secret: String, reason: String },
    /// Two pull Secrets give different credentials for the same registry key. kubelet would
    /// try both; one derived entry cannot hold both, so the pod is left to kubelet.
    #[error(
        "pull secrets `{first}` and `{second}` hold different credentials for `{key}`; one derived entry cannot carry both"
    )]
    Conflict {
        key: String,
        first: String,
        second: String,
    },
    /// Creating the derived Secret failed (other than AlreadyExists).
    #[error("cannot create derived pull secret `{secret}`: {source}")]
    Create {
        secret: String,
        #[source]
        source: kube::Error,
    },
    /// The request had no namespace (pods always have one; never trust input).
    #[error("the pod has no namespace")]
    NoNamespace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Credentials {
    username: String,
    password: String,
}

#[derive(Deserialize)]
struct JsonConfig {
    #[serde(default)]
    auths: BTreeMap<String, Entry>,
}

/// One registry's entry. Other fields (`email`, `identitytoken`) are ignored, as kubelet does.
#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Builds the derived docker config for `proxy_address` from the pod's pull Secrets, in the
/// order the pod lists them. Entries already keyed on the proxy address are skipped (they are
/// a derived Secret's own). Pure: same input, same output, on every replica.
pub fn derive_pull_secret(
    proxy_address: &str,
    sources: &[SourceSecret],
) -> Result<DerivedSecret, PullSecretError> {
    // key -> (credentials, source name)
    let mut entries: BTreeMap<String, (Credentials, &str)> = BTreeMap::new();
    for source in sources {
        let invalid = |reason: String| PullSecretError::Invalid {
            secret: source.name.clone(),
            reason,
        };
        let auths = match source.format {
            SourceFormat::Json => serde_json::from_slice::<JsonConfig>(&source.data)
                .map(|c| c.auths)
                .map_err(|e| invalid(format!("not a docker config: {e}")))?,
            SourceFormat::Legacy => serde_json::from_slice::<BTreeMap<String, Entry>>(&source.data)
                .map_err(|e| invalid(format!("not a legacy docker config: {e}")))?,
        };
        for (key, entry) in auths {
            let Some(derived_key) = proxy_key(proxy_address, &key).map_err(&invalid)? else {
                continue;
            };
            let Some(credentials) = credentials(&key, &entry).map_err(&invalid)? else {
                continue;
            };
            match entries.get(&derived_key) {
                Some((existing, first)) if *existing != credentials => {
                    return Err(PullSecretError::Conflict {
                        key: derived_key,
                        first: (*first).to_owned(),
                        second: source.name.clone(),
                    });
                }
                Some(_) => {}
                None => {
                    entries.insert(derived_key, (credentials, &source.name));
                }
            }
        }
    }
    // A BTreeMap, not serde_json's map (whose order depends on a feature another crate may
    // switch on): the bytes must be the same on every replica.
    let auths: BTreeMap<&str, serde_json::Value> = entries
        .iter()
        .map(|(key, (c, _))| {
            let auth = base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", c.username, c.password));
            let value = serde_json::json!({
                "auth": auth,
                "password": c.password,
                "username": c.username,
            });
            (key.as_str(), value)
        })
        .collect();
    let config = serde_json::json!({ "auths": auths })
        .to_string()
        .into_bytes();
    Ok(DerivedSecret {
        name: derived_name(proxy_address, sources),
        config,
        keys: entries.into_keys().collect(),
        sources: sources.iter().map(|s| s.name.clone()).collect(),
        source_versions: derived_secrets::source_versions(
            sources
                .iter()
                .map(|s| (s.name.as_str(), s.version.as_str())),
        ),
    })
}

/// `larder-pull-` and 10 hex digits of a hash of the proxy address and the sources' names and
/// versions (not their content: see the module docs).
fn derived_name(proxy_address: &str, sources: &[SourceSecret]) -> String {
    let mut hasher = sha2::Sha256::new();
    hasher.update(proxy_address.as_bytes());
    for source in sources {
        for part in [&source.name, &source.version] {
            hasher.update([0]);
            hasher.update(part.as_bytes());
        }
    }
    let hash = hex::encode(hasher.finalize());
    format!("{DERIVED_PREFIX}{}", &hash[..10])
}

/// The derived key for an original docker config key, or `None` for a key already on the
/// proxy. Keys are read as kubelet reads them: an optional scheme, a host, and a path that
/// kubelet matches as a prefix, where a leading `/v1/` or `/v2/` (the docker CLI's API
/// suffix, `https://index.docker.io/v1/`) means the host alone.
fn proxy_key(proxy_address: &str, key: &str) -> Result<Option<String>, String> {
    let (host, path) = dockerconfig::key_parts(key);
    if host.eq_ignore_ascii_case(proxy_address) {
        return Ok(None);
    }
    if host.contains('*') {
        return Err(format!(
            "`{key}` is a wildcard; it cannot be carried to the proxy address"
        ));
    }
    // The registry's canonical form by the same rules as image references (lowercase, Docker
    // Hub aliases folded into docker.io, ports without leading zeros), so the key matches the
    // rewritten images exactly.
    let registry = Reference::parse_on_registry(host, "probe")
        .map_err(|e| format!("`{key}` is not a registry: {e}"))?
        .registry()
        .to_owned();
    let encoded = reference::encode_registry(&registry)
        .map_err(|e| format!("`{key}` cannot be put on the proxy: {e}"))?;
    // kubelet compares the path as a plain string prefix. On the proxy the registry is in the
    // path, so a bare `localhost:7439/ghcr.io` would also match
    // `localhost:7439/ghcr.io.example.com/x` and send ghcr.io's credentials, through the
    // proxy, to another registry. The trailing `/` ends the registry component. (A key with
    // a path cannot cross hosts: its registry component is already ended by the path.)
    Ok(Some(if path.is_empty() {
        format!("{proxy_address}/{encoded}/")
    } else {
        format!("{proxy_address}/{encoded}/{path}")
    }))
}

/// The credentials of one entry as kubelet reads them: `auth` (base64 `user:password`) wins
/// over `username`/`password`. `None` for an entry with no credentials at all (kubelet would
/// pull anonymously with it, as it does with nothing).
fn credentials(key: &str, entry: &Entry) -> Result<Option<Credentials>, String> {
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("the `auth` of `{key}` is not base64: {e}"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| format!("the `auth` of `{key}` is not UTF-8"))?;
        let (username, password) = text
            .split_once(':')
            .ok_or_else(|| format!("the `auth` of `{key}` is not `user:password`"))?;
        return Ok(Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        }));
    }
    let username = entry.username.clone().unwrap_or_default();
    let password = entry.password.clone().unwrap_or_default();
    if username.is_empty() && password.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials { username, password }))
}

/// The docker config a Secret holds, or `None` for a Secret kubelet would not use for pulls
/// (another type, or the key missing or empty: kubelet skips those too).
pub fn source_of(secret: &Secret) -> Option<SourceSecret> {
    let (format, key) = match secret.type_.as_deref() {
        Some(DOCKER_CONFIG_JSON_TYPE) => (SourceFormat::Json, DOCKER_CONFIG_JSON_KEY),
        Some(DOCKER_CFG_TYPE) => (SourceFormat::Legacy, DOCKER_CFG_KEY),
        _ => return None,
    };
    let data = secret.data.as_ref()?.get(key)?;
    if data.0.is_empty() {
        return None;
    }
    let meta = &secret.metadata;
    Some(SourceSecret {
        name: meta.name.clone().unwrap_or_default(),
        version: derived_secrets::secret_version(meta),
        format,
        data: data.0.clone(),
    })
}

/// Reads the pod's pull Secrets `names` in `namespace`, derives the proxy's Secret and creates
/// it (unless `dry_run`). Returns its name, or `None` when the sources hold no credentials.
/// Only the named Secrets are read, one GET each; derived Secrets among them are skipped.
pub async fn provide(
    client: kube::Client,
    namespace: &str,
    names: &[String],
    proxy_address: &str,
    dry_run: bool,
) -> Result<Option<String>, PullSecretError> {
    if namespace.is_empty() {
        return Err(PullSecretError::NoNamespace);
    }
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let mut seen = BTreeSet::new();
    let mut sources = Vec::new();
    for name in names {
        if name.is_empty() || name.starts_with(DERIVED_PREFIX) || !seen.insert(name.as_str()) {
            continue;
        }
        let secret = api
            .get(name)
            .await
            .map_err(|source| PullSecretError::Read {
                secret: name.clone(),
                source,
            })?;
        match source_of(&secret) {
            Some(source) => sources.push(source),
            None => tracing::info!(
                secret = %name,
                kind = secret.type_.as_deref().unwrap_or_default(),
                "pull secret holds no docker config; kubelet ignores it too"
            ),
        }
    }
    let derived = derive_pull_secret(proxy_address, &sources)?;
    if derived.is_empty() {
        return Ok(None);
    }
    if dry_run {
        tracing::debug!(secret = %derived.name, "dry run: derived pull secret not created");
        return Ok(Some(derived.name));
    }
    match api
        .create(&PostParams::default(), &derived.to_secret(namespace))
        .await
    {
        Ok(_) => tracing::info!(secret = %derived.name, %namespace, "derived pull secret created"),
        // Same name, same sources, same content: made by an earlier pod or another replica.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::debug!(secret = %derived.name, "derived pull secret already exists");
        }
        Err(source) => {
            return Err(PullSecretError::Create {
                secret: derived.name,
                source,
            });
        }
    }
    Ok(Some(derived.name))
}

#[cfg(test)]
mod tests;
