//! larder-core: what every larder role shares.
//!
//! - [`mod@reference`]: container image references: parse, normalise, print, and the proxy rewrite.
//! - [`crd`]: the `CachedImage` custom resource (`larder.dev/v1alpha1`) and CRD generation.
//! - [`auth`]: registry `WWW-Authenticate` challenges and a Bearer token cache.
//! - [`admin`]: the small admin HTTP server every role runs: `/metrics`, `/healthz`, `/readyz`.
//! - [`telemetry`]: tracing setup (plain or JSON logs, level from the environment).
//! - [`watch`]: watch streams whose backoff grows while the API keeps failing.

pub mod admin;
pub mod auth;
pub mod crd;
pub mod derived_secrets;
pub mod digest;
pub mod dockerconfig;
pub mod flags;
pub mod reference;
pub mod telemetry;
pub mod watch;

/// The address the node proxy listens on and pods' images are rewritten to.
pub const DEFAULT_PROXY_ADDRESS: &str = "localhost:7439";
