//! The self-managed mode against the Kubernetes API: keep the Secret holding valid material,
//! publish the CA bundle in the MutatingWebhookConfiguration, and hand renewed certificates to
//! the TLS resolver.
//!
//! Several replicas may run this at once. They converge because every write is conditional:
//! the Secret is created (AlreadyExists → read what the other replica made) or replaced with the
//! resourceVersion we read (Conflict → read again and re-decide), and the caBundle patch tests
//! each entry's name. Each replica serves what the Secret holds, re-read every check interval.
//!
//! A serving certificate from a *new* CA is presented only once the bundle containing that CA
//! was already in the webhook configuration at the start of a pass, so the apiserver has had a
//! chance to see it; until then the previous certificate (still trusted) is served.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::{self, Outcome, Reason};
use crate::{CertResolver, Error, Identity, Lifetimes, Material, Result, ca_bundle, secret};

/// How many times a contended Secret write is re-read and retried within one pass.
const WRITE_ATTEMPTS: usize = 3;
/// Wait after a failed pass, or after publishing a new CA bundle before presenting its
/// certificate.
const RETRY_DELAY: Duration = Duration::from_secs(30);
/// A served certificate this close to its end is replaced even if its CA's publication is
/// unconfirmed: serving an expired certificate fails every call anyway.
const LAST_MOMENT: Duration = Duration::from_secs(60 * 60);

/// What the self-managed mode needs to know.
#[derive(Debug, Clone)]
pub struct SelfManagedConfig {
    /// The Service the certificate is for.
    pub identity: Identity,
    /// The Secret (in the Service's namespace) holding the CA and serving certificate.
    pub secret_name: String,
    /// The MutatingWebhookConfiguration whose entries get the CA bundle.
    pub webhook_configuration: String,
    /// Certificate lifetimes and renewal margins.
    pub lifetimes: Lifetimes,
    /// How often the Secret and the webhook configuration are checked.
    pub check_interval: Duration,
}

impl SelfManagedConfig {
    /// The defaults: Secret `<service>-certs`, [`Lifetimes::default`], a check every 5 minutes.
    pub fn new(identity: Identity, webhook_configuration: impl Into<String>) -> Self {
        SelfManagedConfig {
            secret_name: format!("{}-certs", identity.service),
            identity,
            webhook_configuration: webhook_configuration.into(),
            lifetimes: Lifetimes::default(),
            check_interval: Duration::from_secs(5 * 60),
        }
    }
}

/// Where the CA bundle stands after a pass.
#[derive(Debug)]
pub enum Publication {
    /// Every webhook entry already trusted the bundle when the pass started.
    AlreadyPublished,
    /// The pass patched the bundle in just now.
    JustPublished,
    /// Publishing failed; the error says why. Serving goes on.
    Failed(Error),
}

/// The result of one [`CertManager::reconcile`] pass.
#[derive(Debug)]
pub struct Reconciled {
    /// What the Secret now holds: serve this.
    pub material: Material,
    /// Why this pass replaced the material, if it did.
    pub renewed: Option<Reason>,
    /// Whether the apiserver can already know the bundle.
    pub publication: Publication,
}

/// Runs the self-managed mode.
#[derive(Clone)]
pub struct CertManager {
    secrets: Api<Secret>,
    webhooks: Api<MutatingWebhookConfiguration>,
    config: SelfManagedConfig,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// A manager using `client` (which needs get/create/update on the Secret and get/patch on
    /// the MutatingWebhookConfiguration).
    pub fn new(client: Client, config: SelfManagedConfig) -> Self {
        CertManager {
            secrets: Api::namespaced(client.clone(), &config.identity.namespace),
            webhooks: Api::all(client),
            config,
        }
    }

    /// One pass: make the Secret hold valid material, then publish its CA bundle.
    /// Fails only when the Secret cannot be read or written; a publication failure is reported
    /// in [`Reconciled::publication`] because serving must go on regardless.
    #[tracing::instrument(skip_all, fields(secret = %self.config.secret_name))]
    pub async fn reconcile(&self, now: OffsetDateTime) -> Result<Reconciled> {
        let (material, renewed) = self.ensure_secret(now).await?;
        let publication = match self.publish(&material.ca_bundle_pem).await {
            Ok(false) => Publication::AlreadyPublished,
            Ok(true) => Publication::JustPublished,
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish the CA bundle");
                Publication::Failed(e)
            }
        };
        Ok(Reconciled {
            material,
            renewed,
            publication,
        })
    }

    /// Reads the Secret and, if its material is missing or due for renewal, writes new material.
    /// Returns what the Secret holds afterwards, and why it changed.
    pub async fn ensure_secret(&self, now: OffsetDateTime) -> Result<(Material, Option<Reason>)> {
        let name = &self.config.secret_name;
        let namespace = &self.config.identity.namespace;
        for _ in 0..WRITE_ATTEMPTS {
            let existing = self
                .secrets
                .get_opt(name)
                .await
                .map_err(|e| Error::kube("get Secret", e))?;
            let stored = existing.as_ref().and_then(secret::material_from);
            let outcome = authority::ensure(
                stored.as_ref(),
                &self.config.identity,
                &self.config.lifetimes,
                now,
            )?;
            let (material, reason) = match (outcome, stored) {
                (Outcome::Unchanged, Some(stored)) => return Ok((stored, None)),
                (Outcome::Changed { material, reason }, _) => (material, reason),
                // `ensure` reports Unchanged only for existing material; treat anything else
                // as a contended read and look again.
                (Outcome::Unchanged, None) => continue,
            };
            let object = secret::secret_for(name, namespace, &material, existing.as_ref());
            let written = match existing {
                None => self.secrets.create(&PostParams::default(), &object).await,
                Some(_) => {
                    self.secrets
                        .replace(name, &PostParams::default(), &object)
                        .await
                }
            };
            match written {
                Ok(_) => {
                    tracing::info!(%reason, "stored new webhook certificates");
                    return Ok((material, Some(reason)));
                }
                // Another replica wrote first (AlreadyExists or Conflict): use what it made.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    tracing::debug!(%reason, "Secret changed under us; reading it again");
                }
                Err(e) => return Err(Error::kube("write Secret", e)),
            }
        }
        Err(Error::Contended(name.clone()))
    }

    /// Makes every entry of the webhook configuration trust `ca_bundle_pem`; `Ok(true)` when it
    /// had to patch.
    pub async fn publish(&self, ca_bundle_pem: &str) -> Result<bool> {
        let name = &self.config.webhook_configuration;
        let config = self
            .webhooks
            .get_opt(name)
            .await
            .map_err(|e| Error::kube("get MutatingWebhookConfiguration", e))?
            .ok_or_else(|| Error::WebhookConfigurationNotFound(name.clone()))?;
        if config.webhooks.as_ref().is_none_or(Vec::is_empty) {
            tracing::warn!(configuration = %name, "webhook configuration has no entries to trust the CA");
            return Ok(false);
        }
        let Some(patch) = ca_bundle::patch(&config, ca_bundle_pem) else {
            return Ok(false);
        };
        self.webhooks
            .patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
            .map_err(|e| Error::kube("patch MutatingWebhookConfiguration", e))?;
        tracing::info!(configuration = %name, "published CA bundle");
        Ok(true)
    }

    /// The first pass, retried until it succeeds or `shutdown` fires (`None`): the webhook has
    /// nothing to serve before it.
    pub async fn bootstrap(&self, shutdown: impl Future<Output = ()>) -> Option<Arc<CertResolver>> {
        tokio::pin!(shutdown);
        loop {
            let attempt = async {
                let r = self.reconcile(OffsetDateTime::now_utc()).await?;
                CertResolver::from_pem(
                    r.material.cert_pem.as_bytes(),
                    r.material.key_pem.as_bytes(),
                )
            };
            match attempt.await {
                Ok(resolver) => return Some(Arc::new(resolver)),
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?RETRY_DELAY, "cannot set up self-managed certificates");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY_DELAY) => {}
                () = &mut shutdown => return None,
            }
        }
    }

    /// Checks every interval until `shutdown`, handing renewed certificates to `resolver`.
    pub async fn run(self, resolver: Arc<CertResolver>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut delay = self.config.check_interval;
        loop {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = &mut shutdown => return,
            }
            let now = OffsetDateTime::now_utc();
            delay = match self.reconcile(now).await {
                Ok(r) => self.hand_over(&resolver, &r, now),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?RETRY_DELAY, "certificate check failed");
                    RETRY_DELAY
                }
            };
        }
    }

    /// Serves the reconciled material if it is new and allowed; returns the delay to the next
    /// pass.
    fn hand_over(&self, resolver: &CertResolver, r: &Reconciled, now: OffsetDateTime) -> Duration {
        let served = resolver.current();
        let served_leaf = served.cert.first().map(|c| c.as_ref());
        let stored = crate::pem::certificates(r.material.cert_pem.as_bytes(), "stored certificate");
        let stored_leaf = stored
            .as_ref()
            .ok()
            .and_then(|c| c.first())
            .map(|c| c.as_ref());
        if served_leaf == stored_leaf {
            return self.next_delay(&r.publication);
        }
        let expiring = served_leaf.is_none_or(|der| expires_within(der, now, LAST_MOMENT));
        if !should_serve(&r.publication, expiring) {
            tracing::info!(
                "new CA bundle not yet confirmed in the webhook configuration; serving the previous certificate a little longer"
            );
            return RETRY_DELAY;
        }
        match resolver.set_pem(
            r.material.cert_pem.as_bytes(),
            r.material.key_pem.as_bytes(),
        ) {
            Ok(()) => {
                tracing::info!("now serving the renewed certificate");
                self.next_delay(&r.publication)
            }
            Err(e) => {
                tracing::error!(error = %e, "renewed certificate cannot be served");
                RETRY_DELAY
            }
        }
    }

    fn next_delay(&self, publication: &Publication) -> Duration {
        match publication {
            Publication::AlreadyPublished => self.config.check_interval,
            Publication::JustPublished | Publication::Failed(_) => RETRY_DELAY,
        }
    }
}

/// Whether a stored certificate different from the served one may be presented now.
fn should_serve(publication: &Publication, served_is_expiring: bool) -> bool {
    matches!(publication, Publication::AlreadyPublished) || served_is_expiring
}

/// True when the certificate ends within `margin` of `now` (or cannot be read).
fn expires_within(der: &[u8], now: OffsetDateTime, margin: Duration) -> bool {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return true;
    };
    let left = cert.validity().not_after.timestamp() - now.unix_timestamp();
    u64::try_from(left).map_or(true, |left| left < margin.as_secs())
}

#[cfg(test)]
mod tests;
