//! Talking to OCI distribution registries: a small client ([`client`]), the copy engine
//! ([`copy`]) that puts an origin's image into the cache registry verbatim, and the origin
//! credentials of private images from the pull Secrets they are pointed at ([`secrets`]).

pub mod auth;
pub mod client;
pub mod copy;
pub mod manifest;
pub mod secrets;

pub use client::{Endpoint, RegistryClient};
pub use copy::{Copier, CopyOutcome, PlatformFilter, Progress, anonymous};
pub use secrets::SecretCache;
