//! Precache: images cached ahead of need, in the cache registry (retained `CachedImage`s) and
//! on selected nodes (one `NodeCache` per node, which that node's proxy fulfils).
//!
//! - [`plan`]: which CachedImages are retained, each node's NodeCache spec (pure).
//! - [`status`]: each Precache's status (pure).
//! - [`schedule`]: five-field cron expressions and when a schedule fires (pure).
//! - [`gate`]: the readiness gate, a node's startup taint removed once its images are on disk.
//! - [`reconcile`]: the debounced pass applying the plan with minimal writes.
//! - [`cli`]: `larder precache add|list|info|delete`.

pub mod cli;
pub mod gate;
pub mod plan;
pub mod reconcile;
pub mod schedule;
pub mod status;

#[cfg(test)]
mod mock_tests;
