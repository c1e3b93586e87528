//! Free loopback ports.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use crate::error::{HarnessError, Result};

/// A loopback address whose port was free a moment ago (bound to `127.0.0.1:0`, then released).
/// Someone else can take it before we use it; callers that start servers retry on "address in use".
pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| HarnessError::io("binding 127.0.0.1:0 to find a free port", e))?;
    listener
        .local_addr()
        .map_err(|e| HarnessError::io("reading the address of a bound listener", e))
}

/// A port on 127.0.0.1 that was free a moment ago; see [`free_addr`].
pub fn free_port() -> Result<u16> {
    Ok(free_addr()?.port())
}

/// True when `host` (an IP literal, `[v6]` or `localhost`) is a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}
