//! Registry token auth: the one implementation in [`larder_core::auth`], shared with the proxy.

pub use larder_core::auth::{Challenge, DEFAULT_TOKEN_LIFETIME, TokenCache, parse_challenge};
