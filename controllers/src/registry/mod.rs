//! Talking to OCI distribution registries: a small client ([`client`]) and the copy engine
//! ([`copy`]) that puts an origin's image into the cache registry verbatim.

pub mod auth;
pub mod client;
pub mod copy;
pub mod manifest;

pub use client::{Endpoint, RegistryClient};
pub use copy::{Copier, CopyOutcome, PlatformFilter, Progress};
