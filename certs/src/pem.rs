//! PEM text to what rustls serves: a certificate chain and its signing key.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::{Error, Result};

/// Every certificate in `pem`, in order (leaf first for a serving chain).
pub fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(what.to_owned()));
    }
    Ok(certs)
}

/// The first private key in `pem` (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| Error::Pem {
        what: what.to_owned(),
        source,
    })
}

/// A servable certificate: chain plus key, checked to belong together so a half-written
/// rotation (new certificate, old key) is refused instead of served.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<CertifiedKey> {
    let chain = certificates(cert_pem, what)?;
    let key = private_key(key_pem, what)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| Error::Tls {
        what: what.to_owned(),
        source,
    })
}

/// The process-wide provider when one is installed (the binary installs ring), else ring:
/// loading a key must not depend on whether a test remembered to install one.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A fresh self-signed certificate for `name` and its key, both PEM: the crate's tests need
/// many of them.
#[cfg(test)]
pub(crate) fn self_signed(name: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_matching_pair() {
        let (cert, key) = self_signed("a.example");
        let ck = certified_key(cert.as_bytes(), key.as_bytes(), "test").unwrap();
        assert_eq!(ck.cert.len(), 1);
    }

    #[test]
    fn refuses_key_of_another_certificate() {
        let (cert, _) = self_signed("a.example");
        let (_, other_key) = self_signed("b.example");
        let err = certified_key(cert.as_bytes(), other_key.as_bytes(), "test").unwrap_err();
        assert!(matches!(err, Error::Tls { .. }), "{err}");
    }

    #[test]
    fn refuses_empty_and_garbage() {
        assert!(matches!(
            certificates(b"", "empty").unwrap_err(),
            Error::NoCertificate(_)
        ));
        let (cert, _) = self_signed("a.example");
        assert!(private_key(cert.as_bytes(), "cert as key").is_err());
        let truncated = &cert.as_bytes()[..cert.len() / 2];
        assert!(certificates(truncated, "truncated").is_err());
    }
}
