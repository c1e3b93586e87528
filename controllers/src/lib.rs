//! larder's controllers: from managed pods to `CachedImage` objects, and from `CachedImage`
//! objects to verbatim copies in the in-cluster cache registry, refreshed and expired.
//!
//! - [`desired`]: which images the pod set implies and who uses them (pure).
//! - [`policy`]: retention, refresh, phase and backoff decisions (pure).
//! - [`registry`]: a small OCI distribution client and the streaming copy engine.
//! - [`cachedimage`]: the `CachedImage` reconciler (copy, refresh, expire, finalizer cleanup).
//! - [`usage`]: the pod aggregator that creates `CachedImage`s and keeps `usedBy` right.
//! - [`precache`]: Precache → retained CachedImages and per-node NodeCaches, and its CLI.
//! - [`derived_secrets`]: deleting the webhook's superseded derived pull Secrets no pod uses.
//! - [`stores`]: waiting for a watch cache's first list from several tasks.
//! - [`leader`]: leader election on a `coordination.k8s.io/v1` Lease.
//! - [`metrics`]: the `larder_controller_*` metrics.
//! - [`uninstall`]: what the chart's pre-delete hook runs (`larder uninstall`).

pub mod args;
pub mod cachedimage;
pub mod derived_secrets;
pub mod desired;
pub mod error;
pub mod leader;
pub mod metrics;
#[cfg(test)]
mod mock_apiserver;
#[cfg(test)]
mod mock_tests;
pub mod policy;
pub mod precache;
pub mod registry;
mod run;
pub mod stores;
pub mod uninstall;
pub mod usage;

pub use args::ControllerArgs;
pub use error::{Error, Result};
pub use run::run;
