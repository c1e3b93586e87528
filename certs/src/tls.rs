//! The rustls server configuration the webhook listens with.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::NoServerSessionStorage;

use crate::{CertResolver, Error, Result, pem};

/// A TLS 1.2/1.3 server configuration that asks `resolver` for the certificate on every
/// handshake and offers HTTP/2 and HTTP/1.1 (the apiserver uses HTTP/2 when offered).
///
/// Session resumption is off: a resumed session skips the certificate, so after a rotation a
/// client could go on connecting under the old certificate (or a CA since withdrawn). The
/// apiserver keeps its connections open, so full handshakes are rare and cheap enough.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(pem::provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| Error::Tls {
            what: "server configuration".into(),
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_h2_and_never_resumes() {
        let (cert, key) = crate::pem::self_signed("a.example");
        let resolver = CertResolver::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        let config = server_config(Arc::new(resolver)).unwrap();
        assert_eq!(
            config.alpn_protocols,
            [b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.session_storage.can_cache());
    }
}
