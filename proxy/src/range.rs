//! HTTP `Range` requests on blobs (RFC 9110 §14), asked by clients and asked of upstreams. Pure.

/// A byte range to serve, `start..end` (end exclusive), within a blob of `total` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// What to do with a `Range` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeDecision {
    /// No (usable) range: serve everything with 200. Multi-range and malformed headers land
    /// here, as RFC 9110 allows a server to ignore them.
    Full,
    /// Serve this part with 206.
    Partial(ByteRange),
    /// The range starts past the end: 416.
    NotSatisfiable,
}

/// Decides how to answer `header` for a blob of `total` bytes.
pub fn decide(header: Option<&str>, total: u64) -> RangeDecision {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeDecision::Full;
    };
    if spec.contains(',') {
        return RangeDecision::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeDecision::Full;
    };
    let parse = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (first.trim().is_empty(), parse(first), parse(last)) {
        // `bytes=-N`: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 {
                return RangeDecision::NotSatisfiable;
            }
            let start = total.saturating_sub(n);
            if total == 0 {
                return RangeDecision::NotSatisfiable;
            }
            RangeDecision::Partial(ByteRange { start, end: total })
        }
        (false, Some(start), last) => {
            // `bytes=N-` is open-ended; anything unparseable after the dash is ignored.
            if last.is_none() && !last_str(spec).trim().is_empty() {
                return RangeDecision::Full;
            }
            if start >= total {
                return RangeDecision::NotSatisfiable;
            }
            let end = match last {
                Some(l) if l < start => return RangeDecision::Full,
                Some(l) => l.saturating_add(1).min(total),
                None => total,
            };
            RangeDecision::Partial(ByteRange { start, end })
        }
        _ => RangeDecision::Full,
    }
}

fn last_str(spec: &str) -> &str {
    spec.split_once('-').map_or("", |(_, l)| l)
}

impl ByteRange {
    /// The `Content-Range` value for this range of a `total`-byte blob.
    pub fn content_range(&self, total: u64) -> String {
        format!(
            "bytes {}-{}/{}",
            self.start,
            self.end.saturating_sub(1),
            total
        )
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// A `Content-Range` an upstream answered a range request with: bytes `start..end` (end
/// exclusive) of a blob of `total` bytes, when the upstream says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total: Option<u64>,
}

/// Parses `bytes A-B/T` or `bytes A-B/*`; anything else (including `bytes */T`) is `None`.
pub fn parse_content_range(value: &str) -> Option<ContentRange> {
    let rest = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = rest.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (start, last) = (number(first)?, number(last)?);
    let total = match total.trim() {
        "*" => None,
        t => Some(number(t)?),
    };
    if last < start || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange {
        start,
        end: last.checked_add(1)?,
        total,
    })
}

/// The `Range` header asking an upstream for `start..end` (`None`: to the end of the blob).
pub fn request_header(start: u64, end: Option<u64>) -> String {
    match end {
        Some(end) => format!("bytes={start}-{}", end.saturating_sub(1)),
        None => format!("bytes={start}-"),
    }
}

#[cfg(test)]
mod upstream_tests {
    use super::*;

    #[test]
    fn content_ranges_parse_and_lies_are_refused() {
        let cr = |start, end, total| Some(ContentRange { start, end, total });
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            cr(0, 100, Some(1000))
        );
        assert_eq!(parse_content_range("bytes 10-19/*"), cr(10, 20, None));
        assert_eq!(parse_content_range(" bytes  5-5/6 "), cr(5, 6, Some(6)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("bytes 9-3/1000"), None);
        assert_eq!(parse_content_range("bytes 0-1000/1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-x/2"), None);
        assert_eq!(parse_content_range("bytes 0-1"), None);
        assert_eq!(request_header(0, None), "bytes=0-");
        assert_eq!(request_header(100, Some(200)), "bytes=100-199");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeDecision {
        RangeDecision::Partial(ByteRange { start, end })
    }

    #[test]
    fn decides_ranges() {
        assert_eq!(decide(None, 100), RangeDecision::Full);
        assert_eq!(decide(Some("bytes=0-9"), 100), part(0, 10));
        assert_eq!(decide(Some("bytes=90-"), 100), part(90, 100));
        assert_eq!(decide(Some("bytes=90-1000"), 100), part(90, 100));
        assert_eq!(decide(Some("bytes=-10"), 100), part(90, 100));
        assert_eq!(decide(Some("bytes=-1000"), 100), part(0, 100));
        assert_eq!(
            decide(Some("bytes=100-"), 100),
            RangeDecision::NotSatisfiable
        );
        assert_eq!(decide(Some("bytes=-0"), 100), RangeDecision::NotSatisfiable);
        assert_eq!(decide(Some("bytes=0-1,5-6"), 100), RangeDecision::Full);
        assert_eq!(decide(Some("bytes=5-1"), 100), RangeDecision::Full);
        assert_eq!(decide(Some("items=0-1"), 100), RangeDecision::Full);
        assert_eq!(decide(Some("bytes=a-b"), 100), RangeDecision::Full);
        assert_eq!(decide(Some("bytes=1-x"), 100), RangeDecision::Full);
        assert_eq!(decide(Some("bytes=-"), 100), RangeDecision::Full);
        assert_eq!(
            ByteRange {
                start: 90,
                end: 100
            }
            .content_range(100),
            "bytes 90-99/100"
        );
    }
}
