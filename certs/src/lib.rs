//! larder-certs: the webhook's serving certificates.
//!
//! - [`resolver`]: a rustls certificate resolver that picks up new certificates without a
//!   restart, from files (cert-manager, any mounted Secret) or handed over in memory.
//! - [`tls`]: the rustls server configuration around that resolver.
//! - [`authority`]: the self-managed CA and serving certificate, renewal decisions as pure
//!   functions of the stored material and the time.
//! - [`secret`]: how that material is stored in a Kubernetes Secret.
//! - [`ca_bundle`]: the JSON patch that publishes the CA bundle in a MutatingWebhookConfiguration.
//! - [`manager`]: the self-managed mode's loop against the Kubernetes API.

pub mod authority;
pub mod ca_bundle;
mod error;
pub mod manager;
pub mod pem;
pub mod resolver;
pub mod secret;
pub mod tls;

pub use authority::{Identity, Lifetimes, Material};
pub use error::{Error, Result};
pub use manager::{CertManager, SelfManagedConfig};
pub use resolver::CertResolver;
