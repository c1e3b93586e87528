//! larder-webhook: the mutating admission webhook that sends pod images through the node proxy.
//!
//! - [`mutate`]: the pod mutation as pure functions (decisions per image, JSON patch).
//! - [`review`]: one AdmissionReview in, one out; never blocks a pod.
//! - [`server`]: the HTTPS server (`POST /mutate-pods`) around it.
//! - [`config`]: the `larder webhook` flags ([`WebhookArgs`]) and their validation.
//! - [`exclude`]: `--exclude-image` patterns.
//! - [`metrics`]: admission counters and latency.
//! - [`pull_secrets`]: carrying a pod's pull secrets over to the proxy address (`--pull-secrets`).
//! - [`run`]: start everything, serve until SIGTERM or ctrl-c, shut down gracefully.

pub mod config;
mod error;
pub mod exclude;
pub mod metrics;
pub mod mutate;
pub mod pull_secrets;
pub mod review;
pub mod run;
pub mod server;

pub use config::WebhookArgs;
pub use error::Error;
pub use run::{Webhook, run};
pub use tokio_util::sync::CancellationToken;
