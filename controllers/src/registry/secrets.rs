//! Origin credentials for private images, from exactly the Secrets an image is pointed at: its
//! `CachedImage`'s `spec.pullSecrets` and the `imagePullSecrets` of the pods using it. Each
//! Secret is read with one `GET` (never a list or a watch, so the controller needs `secrets:
//! get` only) and the parsed result, or its absence, is kept for [`SECRET_TTL`], so a busy
//! controller does not ask the apiserver on every reconcile.
//!
//! Nothing here logs or returns a credential: warnings name the Secret and the reason only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use larder_core::crd::SecretRef;
use larder_core::dockerconfig::{Credentials, DockerConfig};

/// How long a Secret read (or its absence) is reused.
pub const SECRET_TTL: Duration = Duration::from_secs(60);
/// At most this many Secrets are read for one image; the rest are ignored (with a warning).
pub const SECRETS_PER_IMAGE_MAX: usize = 16;
/// Bound on one Secret `GET`.
pub const SECRET_GET_TIMEOUT: Duration = Duration::from_secs(10);
/// What a 403 on a pull Secret means with the chart's RBAC, said in the warning.
pub const FORBIDDEN_HINT: &str = "the controller may read pull Secrets only when private images \
are enabled: set the chart value controller.privateImages=true (or webhook.pullSecrets=derive)";
/// Cached Secrets; the cache is cleared of expired entries, then entirely, past this.
const CACHE_MAX: usize = 4096;
/// The webhook's derived pull Secrets (`larder-pull-…`) hold only keys on the proxy address
/// (`localhost:7439/<host>/`), which never match an origin: they are not read.
pub use larder_core::derived_secrets::DERIVED_PREFIX;

/// When a Secret was read, and what it held.
type Entry = (Instant, Option<Arc<DockerConfig>>);

/// Parsed pull Secrets, keyed by namespace and name; `None` remembers that a Secret is
/// missing, unreadable or not a docker config.
#[derive(Debug, Default)]
pub struct SecretCache {
    entries: Mutex<HashMap<SecretRef, Entry>>,
}

impl SecretCache {
    /// The cached answer for `secret`, while fresh.
    pub fn cached(&self, secret: &SecretRef) -> Option<Option<Arc<DockerConfig>>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(secret)
            .filter(|(at, _)| at.elapsed() < SECRET_TTL)
            .map(|(_, config)| config.clone())
    }

    fn put(&self, secret: &SecretRef, config: Option<Arc<DockerConfig>>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CACHE_MAX {
            entries.retain(|_, (at, _)| at.elapsed() < SECRET_TTL);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(secret.clone(), (Instant::now(), config));
    }

    /// The docker config `secret` holds: from the cache, else one `GET`. `None`, with a
    /// warning, for a Secret that is missing, unreadable (RBAC), of another type, or invalid.
    pub async fn load(
        &self,
        client: &kube::Client,
        secret: &SecretRef,
    ) -> Option<Arc<DockerConfig>> {
        if let Some(cached) = self.cached(secret) {
            return cached;
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), &secret.namespace);
        let shown = format!("{}/{}", secret.namespace, secret.name);
        let config = match tokio::time::timeout(SECRET_GET_TIMEOUT, api.get(&secret.name)).await {
            Err(_) => {
                tracing::warn!(secret = %shown, "pull secret not read: no answer in time");
                // Not cached: the apiserver being slow says nothing about the Secret.
                return None;
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
                tracing::warn!(secret = %shown, "pull secret not found; ignored");
                None
            }
            // Cached like any refusal, so a missing grant costs one GET per Secret per TTL.
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                tracing::warn!(secret = %shown, code = status.code, reason = %status.reason,
                    hint = FORBIDDEN_HINT, "pull secret not readable: forbidden; ignored");
                None
            }
            Ok(Err(kube::Error::Api(status))) => {
                tracing::warn!(secret = %shown, code = status.code, reason = %status.reason,
                    "pull secret not readable; ignored");
                None
            }
            Ok(Err(error)) => {
                tracing::warn!(secret = %shown, %error, "pull secret not read");
                return None;
            }
            Ok(Ok(found)) => parse_secret(&found, &shown).map(Arc::new),
        };
        self.put(secret, config.clone());
        config
    }

    /// The candidate credentials for `repository` on `registry` from `secrets`, in the order
    /// given (and most specific entry first within a Secret), each credential once.
    pub async fn credentials(
        &self,
        client: &kube::Client,
        secrets: &[SecretRef],
        registry: &str,
        repository: &str,
    ) -> Vec<Credentials> {
        let mut out: Vec<Credentials> = Vec::new();
        for secret in secrets {
            let Some(config) = self.load(client, secret).await else {
                continue;
            };
            for c in config.matching(registry, repository) {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
        out
    }
}

/// A Secret's docker config, or `None` (logged, naming the Secret only) when it is of another
/// type, lacks its key, or does not parse.
fn parse_secret(secret: &Secret, shown: &str) -> Option<DockerConfig> {
    let data = |key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.clone())
    };
    match DockerConfig::from_secret_data(secret.type_.as_deref(), data) {
        None => {
            tracing::warn!(secret = %shown, type_ = ?secret.type_,
                "pull secret is not a kubernetes.io/dockerconfigjson (or dockercfg) Secret with its key; ignored");
            None
        }
        Some(Err(error)) => {
            tracing::warn!(secret = %shown, %error, "pull secret is not a valid docker config; ignored");
            None
        }
        Some(Ok(config)) => Some(config),
    }
}

/// The Secrets to read for an image: `spec.pullSecrets` first, in their order, then the pods'
/// (`pods`, already sorted), each once, derived ones skipped, at most
/// [`SECRETS_PER_IMAGE_MAX`].
pub fn secrets_to_read(spec: &[SecretRef], pods: &[SecretRef]) -> Vec<SecretRef> {
    let mut out: Vec<SecretRef> = Vec::new();
    for secret in spec.iter().chain(pods) {
        if secret.name.is_empty() || secret.name.starts_with(DERIVED_PREFIX) || out.contains(secret)
        {
            continue;
        }
        if out.len() == SECRETS_PER_IMAGE_MAX {
            tracing::warn!(
                limit = SECRETS_PER_IMAGE_MAX,
                "more pull secrets name this image than are read; the rest are ignored"
            );
            break;
        }
        out.push(secret.clone());
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn r(ns: &str, name: &str) -> SecretRef {
        SecretRef {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    #[test]
    fn spec_secrets_come_first_each_once_derived_ones_skipped() {
        let spec = [r("a", "one"), r("a", "two")];
        let pods = [
            r("a", "larder-pull-0123456789"),
            r("a", "two"),
            r("b", "one"),
            r("b", ""),
        ];
        assert_eq!(
            secrets_to_read(&spec, &pods),
            [r("a", "one"), r("a", "two"), r("b", "one")]
        );
        let many: Vec<SecretRef> = (0..40).map(|i| r("n", &format!("s{i}"))).collect();
        assert_eq!(secrets_to_read(&[], &many).len(), SECRETS_PER_IMAGE_MAX);
    }

    #[test]
    fn only_docker_config_secrets_parse() {
        let mut secret = Secret {
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(
                [(
                    ".dockerconfigjson".to_owned(),
                    ByteString(br#"{"auths":{"r.example":{"auth":"dXNlcjpwYXNz"}}}"#.to_vec()),
                )]
                .into(),
            ),
            ..Secret::default()
        };
        let config = parse_secret(&secret, "a/s").unwrap();
        assert_eq!(config.matching("r.example", "x")[0].username, "user");
        secret.type_ = Some("Opaque".into());
        assert!(parse_secret(&secret, "a/s").is_none());
        secret.type_ = Some("kubernetes.io/dockerconfigjson".into());
        secret.data = Some([(".dockerconfigjson".to_owned(), ByteString(b"{".to_vec()))].into());
        assert!(parse_secret(&secret, "a/s").is_none());
        secret.data = None;
        assert!(parse_secret(&secret, "a/s").is_none());
    }

    #[test]
    fn the_cache_forgets_after_its_ttl() {
        let cache = SecretCache::default();
        let s = r("a", "s");
        assert!(cache.cached(&s).is_none());
        cache.put(&s, None);
        assert_eq!(cache.cached(&s), Some(None), "absence is cached too");
        cache.entries.lock().unwrap().get_mut(&s).unwrap().0 = Instant::now() - SECRET_TTL;
        assert!(cache.cached(&s).is_none());
    }
}
