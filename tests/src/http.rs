//! A small blocking HTTP/1.1 client for loopback servers.
//!
//! It refuses any host that is not loopback, so harness traffic never leaves the machine.
//! It is blocking on purpose: it works from plain `#[test]`s and from async tests alike, as long as the
//! server it talks to is a separate process (a [`crate::Registry`]). To call an in-process server from a
//! current-thread tokio test, run it in `tokio::task::spawn_blocking` or use an async client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};
use crate::ports::is_loopback_host;

/// Bound on one whole exchange unless told otherwise.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A complete response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers in the order received (names as sent).
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked; empty for HEAD.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `Docker-Content-Digest` header.
    pub fn docker_content_digest(&self) -> Option<&str> {
        self.header("Docker-Content-Digest")
    }

    /// The `Content-Length` header, parsed.
    pub fn content_length(&self) -> Option<u64> {
        self.header("Content-Length")?.trim().parse().ok()
    }

    /// `sha256:<hex>` of the body.
    pub fn body_digest(&self) -> String {
        crate::image::sha256_digest(&self.body)
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `Ok(self)` for a 2xx status, otherwise [`HarnessError::HttpStatus`].
    pub fn error_for_status(self, method: &str, url: &str) -> Result<Self> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(HarnessError::HttpStatus {
                method: method.to_owned(),
                url: url.to_owned(),
                status: self.status,
                body_tail: self.text().chars().take(500).collect(),
            })
        }
    }
}

/// `GET url` with extra headers.
pub fn get(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    request("GET", url, headers, DEFAULT_HTTP_TIMEOUT)
}

/// `HEAD url` with extra headers.
pub fn head(url: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    request("HEAD", url, headers, DEFAULT_HTTP_TIMEOUT)
}

/// One request without a body to a loopback `http://` URL, bounded by `timeout` as a whole.
/// Redirects are returned, not followed.
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<HttpResponse> {
    let fail = |reason: String| HarnessError::Http {
        method: method.to_owned(),
        url: url.to_owned(),
        reason,
    };
    let (authority, path) = split_url(url).map_err(&fail)?;
    let addr = resolve_loopback(authority).map_err(&fail)?;
    let deadline = Instant::now() + timeout;

    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| fail(format!("connecting to {addr}: {e}")))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| fail(e.to_string()))?;

    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: larder-testkit\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        req.push_str(name);
        req.push_str(": ");
        req.push_str(value);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .map_err(|e| fail(format!("sending request: {e}")))?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(fail(format!("no complete response within {timeout:?}")));
        }
        stream
            .set_read_timeout(Some(remaining))
            .map_err(|e| fail(e.to_string()))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(fail(format!("reading response: {e}"))),
        }
    }
    parse_response(method, &raw).map_err(fail)
}

fn split_url(url: &str) -> std::result::Result<(&str, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| "only plain http:// URLs are supported".to_owned())?;
    Ok(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    })
}

fn resolve_loopback(authority: &str) -> std::result::Result<SocketAddr, String> {
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], &authority[i + 1..]),
        _ => (authority, "80"),
    };
    if !is_loopback_host(host) {
        return Err(format!(
            "refusing non-loopback host {host:?}: the harness only talks to 127.0.0.1/::1"
        ));
    }
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.eq_ignore_ascii_case("localhost") {
        "127.0.0.1"
    } else {
        host
    };
    (host, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{host} resolves to nothing"))
}

fn parse_response(method: &str, raw: &[u8]) -> std::result::Result<HttpResponse, String> {
    let mut rest = raw;
    loop {
        let end = find(rest, b"\r\n\r\n")
            .ok_or_else(|| format!("incomplete response head ({} bytes received)", rest.len()))?;
        let head = std::str::from_utf8(&rest[..end]).map_err(|_| "non-UTF-8 response head")?;
        let body = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            })
            .collect();
        if (100..200).contains(&status) {
            rest = body;
            continue;
        }
        let mut resp = HttpResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
            return Ok(resp);
        }
        let chunked = resp
            .header("Transfer-Encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
        resp.body = if chunked {
            dechunk(body)?
        } else if let Some(len) = resp.content_length() {
            let len = usize::try_from(len).map_err(|_| "Content-Length too large")?;
            if body.len() < len {
                return Err(format!(
                    "truncated body: Content-Length {len}, received {}",
                    body.len()
                ));
            }
            body[..len].to_vec()
        } else {
            body.to_vec()
        };
        return Ok(resp);
    }
}

fn dechunk(mut data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(data, b"\r\n").ok_or("truncated chunk size line")?;
        let size_text = std::str::from_utf8(&data[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".to_owned());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_and_length_bodies() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let r = parse_response("GET", raw).expect("chunked parses");
        assert_eq!(r.body, b"abcde");
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}";
        let r = parse_response("GET", raw).expect("length parses");
        assert_eq!(
            (r.status, r.body.as_slice(), r.header("x-a")),
            (404, &b"{}"[..], Some("b"))
        );
    }

    #[test]
    fn refuses_non_loopback() {
        assert!(resolve_loopback("example.com:80").is_err());
        assert!(resolve_loopback("10.0.0.1:5000").is_err());
        assert!(resolve_loopback("127.0.0.1:5000").is_ok());
        assert!(resolve_loopback("[::1]:5000").is_ok());
        assert!(resolve_loopback("localhost:5000").is_ok());
    }
}
