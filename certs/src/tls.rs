//! The rustls server configuration the webhook listens with.

use std::sync::Arc;

use rustls::ServerConfig;

use crate::{CertResolver, Error, Result, pem};

/// A TLS 1.2/1.3 server configuration that asks `resolver` for the certificate on every
/// handshake and offers HTTP/2 and HTTP/1.1 (the apiserver uses HTTP/2 when offered).
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
    Ok(Arc::new(config))
}
