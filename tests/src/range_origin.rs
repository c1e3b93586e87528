//! A programmable origin for ranged downloads: serves one blob on 127.0.0.1 and answers `Range`
//! requests (or ignores them), slowly, breaking, stalling, lying or redirecting on demand, and
//! logs every request's `Range` header, so tests can assert exactly which bytes were asked for.
//!
//! A real registry will not break a range in the middle or stall on request; this one does,
//! once, at a byte offset a test chooses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;

/// How the origin answers. The default honours ranges, sends lengths and answers at once.
#[derive(Debug, Clone)]
pub struct Script {
    /// Answer `Range` requests with 206; `false`: always 200 with the whole blob.
    pub ranges: bool,
    /// Send the length (`Content-Length`, and the total in `Content-Range`); `false`: chunked,
    /// `Content-Range: bytes A-B/*`.
    pub length: bool,
    /// Body pieces, aligned to multiples of this offset in the blob.
    pub piece: usize,
    /// Pause before each piece (a per-connection rate cap).
    pub delay: Duration,
    /// Extra pause before each piece of answers that start at byte 0 (a slow first range).
    pub first_delay: Duration,
    /// The first answer that reaches this offset (a multiple of `piece`) breaks there. Answers
    /// from byte 0 are left alone: the proxy's open-ended first request (`bytes=0-`) is read
    /// only up to its first chunk, but the server may have sent further ahead into the socket.
    pub break_at: Option<u64>,
    /// The first answer from byte 0 (the proxy's `bytes=0-`, or a plain GET) breaks at this
    /// offset (a multiple of `piece`): a stream kept alone dies mid-way.
    pub first_break_at: Option<u64>,
    /// The first answer that reaches this offset (a multiple of `piece`) stalls there this
    /// long (answers from byte 0 left alone, as for `break_at`).
    pub stall_at: Option<(u64, Duration)>,
    /// This byte is flipped in every answer that covers it (a lying origin).
    pub corrupt_at: Option<u64>,
    /// Every request is answered `307` to this base URL plus the same path.
    pub redirect: Option<String>,
    /// Range requests that do not start at byte 0 are answered `503` (an origin that lets
    /// one connection through and refuses the others).
    pub refuse_parts: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            ranges: true,
            length: true,
            piece: 64 << 10,
            delay: Duration::ZERO,
            first_delay: Duration::ZERO,
            break_at: None,
            first_break_at: None,
            stall_at: None,
            corrupt_at: None,
            redirect: None,
            refuse_parts: false,
        }
    }
}

/// One request the origin saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// The `Range` header, verbatim.
    pub range: Option<String>,
    pub status: u16,
}

/// The running origin; stopped when dropped.
#[derive(Debug)]
pub struct RangeOrigin {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

struct Served {
    blob: Bytes,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    broke: AtomicBool,
    first_broke: AtomicBool,
    stalled: AtomicBool,
}

impl RangeOrigin {
    /// Serves `blob` at every path (`/v2/<repo>/blobs/<digest>` is what the proxy asks for).
    pub async fn start(blob: Bytes, script: Script) -> std::io::Result<RangeOrigin> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Served {
            blob,
            script,
            seen: Arc::clone(&seen),
            broke: AtomicBool::new(false),
            first_broke: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
        });
        let app = Router::new().fallback(move |headers: HeaderMap, uri: axum::http::Uri| {
            let served = Arc::clone(&served);
            async move { answer(&served, uri.path(), &headers) }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(RangeOrigin { addr, seen, task })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Every request so far, in order of arrival.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The `Range` headers of the requests so far (`None` for requests without one).
    pub fn ranges(&self) -> Vec<Option<String>> {
        self.seen().into_iter().map(|s| s.range).collect()
    }
}

impl Drop for RangeOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `bytes=A-B` or `bytes=A-` → `A..B+1` (or to `total`).
fn parse_range(value: &str, total: u64) -> Option<(u64, u64)> {
    let (first, last) = value.trim().strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = first.trim().parse().ok()?;
    let end = match last.trim() {
        "" => total,
        l => l.parse::<u64>().ok()?.saturating_add(1).min(total),
    };
    (start < end).then_some((start, end))
}

fn answer(served: &Arc<Served>, path: &str, headers: &HeaderMap) -> Response {
    let script = &served.script;
    let range_header = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let total = served.blob.len() as u64;
    let log = |status: u16| {
        served
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Seen {
                path: path.to_owned(),
                range: range_header.clone(),
                status,
            });
    };
    if let Some(base) = &script.redirect {
        log(307);
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, format!("{base}{path}"))
            .body(Body::empty())
            .unwrap_or_default();
    }
    let asked = range_header
        .as_deref()
        .filter(|_| script.ranges)
        .and_then(|r| parse_range(r, total));
    if script.refuse_parts && asked.is_some_and(|(start, _)| start > 0) {
        log(503);
        return Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .body(Body::empty())
            .unwrap_or_default();
    }
    let (status, start, end) = match asked {
        Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
        None => (StatusCode::OK, 0, total),
    };
    log(status.as_u16());
    let mut response = Response::builder().status(status);
    if script.length {
        response = response.header(header::CONTENT_LENGTH, end - start);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let of = if script.length {
            total.to_string()
        } else {
            "*".to_owned()
        };
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{of}", end - 1),
        );
    }
    response
        .body(Body::from_stream(body(Arc::clone(served), start, end)))
        .unwrap_or_default()
}

/// The bytes `start..end`, in pieces aligned to `script.piece`, with the script's faults.
fn body(
    served: Arc<Served>,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    futures::stream::unfold(start, move |pos| {
        let served = Arc::clone(&served);
        async move {
            if pos >= end {
                return None;
            }
            let script = &served.script;
            let piece = script.piece.max(1) as u64;
            let next = ((pos / piece + 1) * piece).min(end);
            let mut pause = script.delay;
            if start == 0 {
                pause += script.first_delay;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if start > 0
                && script.break_at == Some(pos)
                && !served.broke.swap(true, Ordering::SeqCst)
            {
                return Some((Err(std::io::Error::other("scripted break")), end));
            }
            if start == 0
                && script.first_break_at == Some(pos)
                && !served.first_broke.swap(true, Ordering::SeqCst)
            {
                return Some((Err(std::io::Error::other("scripted break")), end));
            }
            if let Some((at, how_long)) = script.stall_at
                && start > 0
                && at == pos
                && !served.stalled.swap(true, Ordering::SeqCst)
            {
                tokio::time::sleep(how_long).await;
            }
            let mut bytes = served.blob.slice(pos as usize..next as usize);
            if let Some(bad) = script.corrupt_at
                && (pos..next).contains(&bad)
            {
                let mut copy = bytes.to_vec();
                copy[(bad - pos) as usize] ^= 0xff;
                bytes = Bytes::from(copy);
            }
            Some((Ok(bytes), next))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_like_an_http_server() {
        assert_eq!(parse_range("bytes=0-", 100), Some((0, 100)));
        assert_eq!(parse_range("bytes=10-19", 100), Some((10, 20)));
        assert_eq!(parse_range("bytes=90-200", 100), Some((90, 100)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
