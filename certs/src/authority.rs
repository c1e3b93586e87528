//! The self-managed certificate authority, as pure functions of (stored material, now).
//!
//! [`ensure`] looks at what is stored and returns either "keep it" or new material with the
//! reason. Rules:
//! - No material, unreadable CA, CA key not matching, or CA near expiry: a new CA and a new
//!   serving certificate. Still-valid older CAs stay in the trust bundle, so serving certificates
//!   that other replicas still present keep verifying while the rotation spreads.
//! - CA fine, serving certificate unreadable, not issued by this CA, missing a DNS name, or near
//!   expiry: a new serving certificate from the same CA (the trust bundle does not change).
//! - Expired older CAs are dropped from the bundle.
//!
//! Keys are ECDSA P-256. Serving certificates never outlive their CA.

use std::fmt;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::{Result, pem};

/// Certificates start this much in the past so nodes with a slightly slow clock accept them.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Who the serving certificate is for: a Service in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The Service name in front of the webhook.
    pub service: String,
    /// The Service's namespace.
    pub namespace: String,
}

impl Identity {
    /// The names the apiserver may use to reach the Service, most specific last:
    /// `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`.
    pub fn dns_names(&self) -> Vec<String> {
        let (s, n) = (&self.service, &self.namespace);
        vec![
            s.clone(),
            format!("{s}.{n}"),
            format!("{s}.{n}.svc"),
            format!("{s}.{n}.svc.cluster.local"),
        ]
    }
}

/// How long certificates live and how early they are replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Validity of a new CA.
    pub ca_validity: Duration,
    /// A CA with less than this left is replaced.
    pub ca_renew_before: Duration,
    /// Validity of a new serving certificate (capped at the CA's end).
    pub leaf_validity: Duration,
    /// A serving certificate with less than this left is replaced.
    pub leaf_renew_before: Duration,
}

const DAY: u64 = 24 * 60 * 60;

impl Default for Lifetimes {
    /// A 10-year CA renewed a year early; 90-day serving certificates renewed 30 days early, so
    /// the renewal path runs every two months instead of rotting untested for a decade.
    fn default() -> Self {
        Lifetimes {
            ca_validity: Duration::from_secs(3650 * DAY),
            ca_renew_before: Duration::from_secs(365 * DAY),
            leaf_validity: Duration::from_secs(90 * DAY),
            leaf_renew_before: Duration::from_secs(30 * DAY),
        }
    }
}

/// Everything the self-managed mode stores, as PEM text.
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// The CAs clients should trust: the current one first, then older ones not yet expired.
    pub ca_bundle_pem: String,
    /// The current CA's private key.
    pub ca_key_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key.
    pub key_pem: String,
}

impl fmt::Debug for Material {
    /// Never prints keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("ca_bundle_pem", &self.ca_bundle_pem)
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// Why new material was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Nothing was stored yet.
    Missing,
    /// The stored CA cannot be used; the text says why.
    CaUnusable(String),
    /// The CA is within `ca_renew_before` of its end.
    CaExpiring,
    /// The stored serving certificate cannot be used; the text says why.
    LeafUnusable(String),
    /// The serving certificate is within `leaf_renew_before` of its end.
    LeafExpiring,
    /// Expired older CAs were dropped from the trust bundle.
    PrunedExpiredAuthorities,
}

impl Reason {
    /// True when the trust bundle changes (so it must be published before the new serving
    /// certificate is presented).
    pub fn changes_authority(&self) -> bool {
        matches!(
            self,
            Reason::Missing | Reason::CaUnusable(_) | Reason::CaExpiring
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Missing => f.write_str("no certificates stored yet"),
            Reason::CaUnusable(why) => write!(f, "stored CA unusable: {why}"),
            Reason::CaExpiring => f.write_str("CA close to expiry"),
            Reason::LeafUnusable(why) => write!(f, "stored serving certificate unusable: {why}"),
            Reason::LeafExpiring => f.write_str("serving certificate close to expiry"),
            Reason::PrunedExpiredAuthorities => f.write_str("expired CAs dropped from the bundle"),
        }
    }
}

/// The result of [`ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// What is stored is fine.
    Unchanged,
    /// Store (and serve) this instead.
    Changed {
        /// The new material.
        material: Material,
        /// Why.
        reason: Reason,
    },
}

/// Decides whether `existing` can stay, and makes replacement material when it cannot.
pub fn ensure(
    existing: Option<&Material>,
    identity: &Identity,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<Outcome> {
    let Some(existing) = existing else {
        return new_authority(identity, lifetimes, now, &[], Reason::Missing);
    };
    let bundle = match pem::certificates(existing.ca_bundle_pem.as_bytes(), "CA bundle") {
        Ok(bundle) => bundle,
        Err(e) => {
            return new_authority(
                identity,
                lifetimes,
                now,
                &[],
                Reason::CaUnusable(e.to_string()),
            );
        }
    };
    let still_trusted = unexpired(&bundle, now);
    // `certificates` never returns an empty list, so `bundle[0]` exists.
    let ca = match check_authority(existing, &bundle[0], lifetimes, now) {
        Ok(Health::Good(ca)) => ca,
        Ok(Health::Expiring) => {
            return new_authority(identity, lifetimes, now, &still_trusted, Reason::CaExpiring);
        }
        Err(why) => {
            return new_authority(
                identity,
                lifetimes,
                now,
                &still_trusted,
                Reason::CaUnusable(why),
            );
        }
    };
    // The current CA passed its checks, so it is valid and heads `still_trusted` too.
    let pruned = still_trusted.len() < bundle.len();
    let ca_bundle_pem = if pruned {
        encode_bundle(&still_trusted)
    } else {
        existing.ca_bundle_pem.clone()
    };
    let reason = match check_leaf(existing, &bundle[0], identity, lifetimes, now) {
        Ok(Health::Good(())) if pruned => Reason::PrunedExpiredAuthorities,
        Ok(Health::Good(())) => return Ok(Outcome::Unchanged),
        Ok(Health::Expiring) => Reason::LeafExpiring,
        Err(why) => Reason::LeafUnusable(why),
    };
    let (cert_pem, key_pem) = if reason == Reason::PrunedExpiredAuthorities {
        (existing.cert_pem.clone(), existing.key_pem.clone())
    } else {
        issue_leaf(&ca.issuer, ca.not_after, identity, lifetimes, now)?
    };
    Ok(Outcome::Changed {
        material: Material {
            ca_bundle_pem,
            ca_key_pem: existing.ca_key_pem.clone(),
            cert_pem,
            key_pem,
        },
        reason,
    })
}

enum Health<T> {
    Good(T),
    Expiring,
}

struct Authority {
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

fn check_authority(
    existing: &Material,
    ca_der: &CertificateDer<'_>,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<Health<Authority>, String> {
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| format!("CA certificate: {e}"))?;
    if !ca.is_ca() {
        return Err("the first certificate of the bundle is not a CA".into());
    }
    let key = KeyPair::from_pem(&existing.ca_key_pem).map_err(|e| format!("CA key: {e}"))?;
    if key.subject_public_key_info() != ca.public_key().raw {
        return Err("CA key does not belong to the CA certificate".into());
    }
    let not_after = health_of(&ca, lifetimes.ca_renew_before, now)?;
    let Some(not_after) = not_after else {
        return Ok(Health::Expiring);
    };
    let issuer =
        Issuer::from_ca_cert_der(ca_der, key).map_err(|e| format!("CA certificate: {e}"))?;
    Ok(Health::Good(Authority { issuer, not_after }))
}

fn check_leaf(
    existing: &Material,
    ca_der: &CertificateDer<'_>,
    identity: &Identity,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<Health<()>, String> {
    let chain = pem::certificates(existing.cert_pem.as_bytes(), "serving certificate")
        .map_err(|e| e.to_string())?;
    let (_, leaf) = X509Certificate::from_der(&chain[0]).map_err(|e| e.to_string())?;
    let key = KeyPair::from_pem(&existing.key_pem).map_err(|e| format!("key: {e}"))?;
    if key.subject_public_key_info() != leaf.public_key().raw {
        return Err("key does not belong to the certificate".into());
    }
    let (_, ca) = X509Certificate::from_der(ca_der).map_err(|e| e.to_string())?;
    leaf.verify_signature(Some(ca.public_key()))
        .map_err(|_| "not issued by the current CA".to_owned())?;
    let present: Vec<&str> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(format!("subject alternative names: {e}")),
    };
    if let Some(missing) = identity
        .dns_names()
        .into_iter()
        .find(|n| !present.contains(&n.as_str()))
    {
        return Err(format!("does not cover `{missing}`"));
    }
    Ok(match health_of(&leaf, lifetimes.leaf_renew_before, now)? {
        Some(_) => Health::Good(()),
        None => Health::Expiring,
    })
}

/// `Ok(Some(not_after))` when valid now and for longer than `renew_before`, `Ok(None)` when
/// valid but due for renewal, `Err` when not valid now.
fn health_of(
    cert: &X509Certificate<'_>,
    renew_before: Duration,
    now: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, String> {
    let validity = cert.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    let now_ts = now.unix_timestamp();
    if now_ts < not_before {
        return Err("not valid yet".into());
    }
    if now_ts >= not_after {
        return Err("expired".into());
    }
    let left = u64::try_from(not_after - now_ts).unwrap_or(0);
    if left < renew_before.as_secs() {
        return Ok(None);
    }
    OffsetDateTime::from_unix_timestamp(not_after)
        .map(Some)
        .map_err(|e| format!("end of validity: {e}"))
}

/// The bundle's certificates that are still valid at `now`, in order.
fn unexpired(
    bundle: &[CertificateDer<'static>],
    now: OffsetDateTime,
) -> Vec<CertificateDer<'static>> {
    bundle
        .iter()
        .filter(|der| {
            X509Certificate::from_der(der)
                .is_ok_and(|(_, c)| c.validity().not_after.timestamp() > now.unix_timestamp())
        })
        .cloned()
        .collect()
}

fn encode_bundle(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<::pem::Pem> = certs
        .iter()
        .map(|c| ::pem::Pem::new("CERTIFICATE", c.to_vec()))
        .collect();
    ::pem::encode_many(&blocks)
}

fn new_authority(
    identity: &Identity,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
    keep_trusting: &[CertificateDer<'static>],
    reason: Reason,
) -> Result<Outcome> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "larder");
    // The creation time keeps successive CAs apart by name as well as by key.
    dn.push(
        DnType::CommonName,
        format!(
            "larder webhook CA for {}/{} ({})",
            identity.namespace,
            identity.service,
            now.unix_timestamp()
        ),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetimes.ca_validity;
    let ca_cert = params.self_signed(&key)?;
    let not_after = params.not_after;
    let ca_key_pem = key.serialize_pem();
    let issuer = Issuer::new(params, key);
    let (cert_pem, key_pem) = issue_leaf(&issuer, not_after, identity, lifetimes, now)?;
    let mut bundle = vec![ca_cert.der().clone()];
    bundle.extend(keep_trusting.iter().cloned());
    Ok(Outcome::Changed {
        material: Material {
            ca_bundle_pem: encode_bundle(&bundle),
            ca_key_pem,
            cert_pem,
            key_pem,
        },
        reason,
    })
}

fn issue_leaf(
    issuer: &Issuer<'_, KeyPair>,
    ca_not_after: OffsetDateTime,
    identity: &Identity,
    lifetimes: &Lifetimes,
    now: OffsetDateTime,
) -> Result<(String, String)> {
    let names = identity.dns_names();
    let mut params = CertificateParams::new(names.clone())?;
    let mut dn = DistinguishedName::new();
    // `dns_names` always has four entries; the third is the canonical `svc.ns.svc`.
    dn.push(DnType::CommonName, names[2].clone());
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = (now + lifetimes.leaf_validity).min(ca_not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests;
