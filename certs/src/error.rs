//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading, issuing or publishing certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// PEM text was not well-formed.
    #[error("invalid PEM in {what}: {source}")]
    Pem {
        what: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// PEM text held no certificate.
    #[error("no certificate found in {0}")]
    NoCertificate(String),
    /// rustls refused the certificate or key (unsupported key type, key does not match).
    #[error("certificate and key in {what} cannot be served: {source}")]
    Tls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    /// rcgen failed to generate or sign a certificate.
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed ({action}): {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: Box<kube::Error>,
    },
    /// The MutatingWebhookConfiguration whose caBundle we maintain does not exist.
    #[error(
        "MutatingWebhookConfiguration `{0}` not found; it must exist before its caBundle can be set"
    )]
    WebhookConfigurationNotFound(String),
    /// Other writers kept changing the Secret between our read and our write.
    #[error("Secret `{0}` kept changing under us; will try again later")]
    Contended(String),
}

impl Error {
    /// A short, fixed label for metrics and logs: one per variant, never user data.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::ReadFile { .. } => "read_file",
            Error::Pem { .. } => "pem",
            Error::NoCertificate(_) => "no_certificate",
            Error::Tls { .. } => "tls",
            Error::Generate(_) => "generate",
            Error::Kube { .. } => "kube",
            Error::WebhookConfigurationNotFound(_) => "webhook_configuration_not_found",
            Error::Contended(_) => "contended",
        }
    }

    pub(crate) fn kube(action: &'static str, source: kube::Error) -> Self {
        Error::Kube {
            action,
            source: Box::new(source),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_labels_are_snake_case_constants() {
        let errors = [
            Error::NoCertificate("x".into()),
            Error::WebhookConfigurationNotFound("x".into()),
            Error::Contended("x".into()),
        ];
        for e in errors {
            let label = e.metric_label();
            assert!(
                label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{label}"
            );
        }
    }
}
