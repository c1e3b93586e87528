//! Ranged downloads: a large blob fetched from its upstream as several concurrent `Range`
//! requests, written into the download's temp file at their offsets.
//!
//! Registries and the CDNs behind them cap what one connection gets, so a cold multi-GiB layer
//! fetched in one stream is bounded by one connection's rate. Here the first request asks for
//! `bytes=0-` and starts streaming the blob's first chunk at once (first byte as early as a
//! single stream would give it); its `Content-Range` gives the size, and when that is at least
//! the threshold, the rest is cut into chunks that K connections take in order (a fast
//! connection takes more of them). Each connection writes through a 1 MiB batch with positional
//! writes, so memory stays bounded by K batches whatever the blob size.
//!
//! The other connections start only once the first one has shown it is slow: it brings the
//! probe's bytes (the first 8 MiB, or its first chunk) alone, and if the upstream brought them
//! at `--upstream-ranged-fast-rate` or faster (an origin next door, an uncapped link), its answer
//! is handed back to the single-stream path ([`Filled::Alone`]), because more connections would
//! only add work for the CPU (every byte written out of order is read back to be hashed).
//!
//! Readers follow the contiguous prefix (the watermark) exactly as with a single stream; the
//! digest is computed over that prefix as it grows (read back from the page cache), so it is
//! verified right after the last range lands, and the last byte is still held back from every
//! reader until then. Completed chunks beyond the prefix are published too, so a client's own
//! `Range` request is served as soon as its bytes are written.
//!
//! A part that breaks or stalls is asked again from where it stopped, never from its start;
//! after [`PART_RETRIES`] attempts in a row without progress the whole download fails (every
//! reader gets an error, nothing is cached). An upstream that ignores `Range` (answers 200) or
//! gives no length is read as one stream, as before.

use std::os::unix::fs::FileExt as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use larder_core::digest::{Digest, Verifier};
use reqwest::header::CONTENT_RANGE;
use tokio::sync::watch;

use crate::error::{ProxyError, Upstream};
use crate::fetch::FetchState;
use crate::metrics::{DownloadMode, RangeResult, Source};
use crate::range::{parse_content_range, request_header};
use crate::route::Image;
use crate::state::{Creds, ProxyState};

/// Default `--upstream-ranged-threshold`: blobs smaller than this are fetched in one stream.
/// Most image layers are below it, so an ordinary pull keeps one connection per layer
/// (containerd already fetches a few layers at once).
pub const DEFAULT_THRESHOLD: u64 = 64 << 20;
/// Default `--upstream-ranged-connections` (see docs/benchmarks.md for the measurements).
pub const DEFAULT_CONNECTIONS: u16 = 8;
/// Default `--upstream-ranged-fast-rate` (bytes/s): one connection at least this fast keeps the
/// blob. 300 MB/s is 2.4 Gbit/s: no registry CDN's per-connection cap measured so far is near
/// it, and on this project's 2-core machines splitting a loopback download cost CPU and speed
/// (docs/benchmarks.md).
pub const DEFAULT_FAST_RATE: u64 = 300_000_000;
/// Bytes the first connection brings alone before the decision (or its whole first chunk).
const PROBE_BYTES: u64 = 8 << 20;
/// Longest the first connection is left alone: one that has not brought [`PROBE_BYTES`] by then
/// is slower than 40 MB/s (or larder is), and the decision is taken on what it brought so far.
const PROBE_TIME: Duration = Duration::from_millis(200);
/// Fewest bytes the upstream's rate is judged on: less than this in [`PROBE_TIME`] is a slow
/// upstream whatever the clock says.
const PROBE_MIN_SAMPLE: u64 = 1 << 20;
/// Attempts in a row of one part that bring no new byte before the download is abandoned.
pub const PART_RETRIES: u32 = 3;
/// Attempts of one part in all, progress or not: a connection that delivers a byte and breaks,
/// over and over, must not keep a download alive for ever.
const PART_ATTEMPTS: u32 = 16;
/// Bytes gathered before each positional write (one hop to the blocking pool per batch).
const PART_BATCH: usize = 1 << 20;
/// Bytes read back from the file per hashing step.
const HASH_READ: usize = 1 << 20;
const MIN_CHUNK: u64 = 1 << 20;
const MAX_CHUNK: u64 = 64 << 20;

/// When and how wide blobs are fetched in ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangedConfig {
    /// Blobs of at least this many bytes are fetched in ranges.
    pub threshold: u64,
    /// Concurrent range requests per blob; 1 turns ranged downloads off (no `Range` is sent).
    pub connections: u16,
    /// Bytes/s: a first connection at least this fast keeps the whole blob. `None`
    /// (`--upstream-ranged-fast-rate off`): no probe, every blob above the threshold is split
    /// at once (an upstream known to cap each connection).
    pub fast_rate: Option<u64>,
}

impl Default for RangedConfig {
    fn default() -> Self {
        RangedConfig {
            threshold: DEFAULT_THRESHOLD,
            connections: DEFAULT_CONNECTIONS,
            fast_rate: Some(DEFAULT_FAST_RATE),
        }
    }
}

impl RangedConfig {
    pub fn enabled(&self) -> bool {
        self.connections > 1
    }
}

/// How a download continues after the answer to its first request (`Range: bytes=0-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read this answer to its end: the upstream ignored the range (200), gave no length, or
    /// the blob is below the threshold and the answer holds all of it.
    Single,
    /// Fetch `total` bytes with `workers` connections, the first answer being the first.
    Ranged { total: u64, workers: u16 },
}

/// Decides [`Mode`] from the first answer's status and `Content-Range`. An answer that is not
/// the start of the blob is a lie, never served.
pub fn choose_mode(
    status: u16,
    content_range: Option<&str>,
    config: RangedConfig,
) -> Result<Mode, String> {
    match status {
        // The upstream (or the host a redirect led to) ignores ranges: one stream, as before.
        200 => return Ok(Mode::Single),
        206 => {}
        other => return Err(format!("unexpected status {other} to a range request")),
    }
    let Some(range) = content_range.and_then(parse_content_range) else {
        return Err(format!(
            "answered 206 with an unusable Content-Range {content_range:?}"
        ));
    };
    if range.start != 0 {
        return Err(format!(
            "asked for the blob from byte 0, answered from byte {}",
            range.start
        ));
    }
    let Some(total) = range.total else {
        // No length: nothing to split; the digest still decides.
        return Ok(Mode::Single);
    };
    if total >= config.threshold && config.enabled() {
        return Ok(Mode::Ranged {
            total,
            workers: config.connections,
        });
    }
    if range.end == total {
        return Ok(Mode::Single);
    }
    // A short answer (some CDNs cap a range's length): continue from where it stopped.
    Ok(Mode::Ranged { total, workers: 1 })
}

/// Whether the first connection alone is fast enough to keep the blob: it brought `bytes` while
/// larder waited `elapsed` on its socket, at least `fast_rate` bytes/s. Only the time spent
/// waiting for the upstream counts: time larder spends writing and hashing is its own, and on
/// a busy node splitting would make that worse, not better.
pub fn one_is_enough(bytes: u64, elapsed: Duration, fast_rate: u64) -> bool {
    bytes as f64 >= fast_rate as f64 * elapsed.as_secs_f64()
}

/// The probe's verdict (pure): the upstream brought enough to judge (at least a MiB, or all the
/// probe asks for) and at the fast rate or faster over the time larder waited for it.
pub fn keeps_alone(received: u64, waited: Duration, probe_end: u64, fast_rate: u64) -> bool {
    received >= PROBE_MIN_SAMPLE.min(probe_end) && one_is_enough(received, waited, fast_rate)
}

/// Bytes per chunk: about four chunks per connection, so a fast connection takes more of them
/// and the last chunk (which the slowest connection may hold) is a small part of the blob.
pub fn chunk_size(total: u64, workers: u16) -> u64 {
    (total / (u64::from(workers.max(1)) * 4)).clamp(MIN_CHUNK, MAX_CHUNK)
}

/// The chunks not yet handed to a connection, in blob order (the prefix readers wait for
/// comes first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    next: u64,
    total: u64,
    chunk: u64,
}

impl Queue {
    /// Chunks of `chunk` bytes from `from` to `total`.
    pub fn new(from: u64, total: u64, chunk: u64) -> Self {
        Queue {
            next: from.min(total),
            total,
            chunk: chunk.max(1),
        }
    }

    /// The next chunk, `start..end`.
    pub fn claim(&mut self) -> Option<(u64, u64)> {
        if self.next >= self.total {
            return None;
        }
        let start = self.next;
        self.next = start.saturating_add(self.chunk).min(self.total);
        Some((start, self.next))
    }
}

/// The byte spans of a blob already written, sorted, disjoint and not touching.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extents {
    spans: Vec<(u64, u64)>,
}

impl Extents {
    /// Adds `start..end`, merging with the spans it touches.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        let mut merged = Vec::with_capacity(self.spans.len() + 1);
        let mut placed = false;
        for &(s, e) in &self.spans {
            if e < start {
                merged.push((s, e));
            } else if s > end {
                if !placed {
                    merged.push((start, end));
                    placed = true;
                }
                merged.push((s, e));
            } else {
                start = start.min(s);
                end = end.max(e);
            }
        }
        if !placed {
            merged.push((start, end));
        }
        self.spans = merged;
    }

    /// Bytes written from the blob's start without a gap: what in-order readers may have.
    pub fn prefix(&self) -> u64 {
        match self.spans.first() {
            Some(&(0, end)) => end,
            _ => 0,
        }
    }

    /// The spans after the prefix (for range readers).
    pub fn beyond_prefix(&self) -> Vec<(u64, u64)> {
        self.spans.iter().copied().filter(|&(s, _)| s > 0).collect()
    }
}

/// Checks a later part's answer: a 206 starting exactly where it was asked, of a blob of the
/// size the first answer gave. Returns where the answer's bytes end.
pub fn check_part(
    status: u16,
    content_range: Option<&str>,
    asked: u64,
    total: u64,
) -> Result<u64, String> {
    if status == 200 {
        return Err("the upstream stopped honouring Range (answered 200 to a part)".into());
    }
    if status != 206 {
        return Err(format!("unexpected status {status} to a range request"));
    }
    let range = content_range
        .and_then(parse_content_range)
        .ok_or_else(|| format!("answered 206 with an unusable Content-Range {content_range:?}"))?;
    if range.start != asked {
        return Err(format!(
            "asked for bytes from {asked}, answered from {}",
            range.start
        ));
    }
    if range.total != Some(total) {
        return Err(format!(
            "the blob was {total} bytes, a part says {:?}",
            range.total
        ));
    }
    Ok(range.end)
}

/// The retry budget of one part (or of one stream resumed with ranges): [`PART_RETRIES`]
/// attempts in a row that bring nothing, [`PART_ATTEMPTS`] in all.
#[derive(Debug, Default)]
pub struct Retries {
    fruitless: u32,
    attempts: u32,
}

impl Retries {
    /// Counts an attempt that started at byte `from` and broke at `pos`; whether another one
    /// may be made.
    pub fn another(&mut self, from: u64, pos: u64) -> bool {
        self.attempts += 1;
        self.fruitless = if pos > from { 0 } else { self.fruitless + 1 };
        self.fruitless <= PART_RETRIES && self.attempts < PART_ATTEMPTS
    }

    /// A short pause before the next attempt, longer after each fruitless one: an upstream
    /// that just failed is not asked again in the same instant.
    pub fn pause(&self) -> Duration {
        Duration::from_millis(50) * 2u32.pow(self.fruitless.min(5))
    }
}

/// Whether asking again for a part may help: it broke, stalled, or the upstream was briefly
/// unavailable. Lies, refusals and disk errors end the download.
pub fn worth_retrying(err: &ProxyError) -> bool {
    matches!(
        err,
        ProxyError::Unavailable { .. } | ProxyError::RateLimited { .. }
    )
}

/// Everything the connections of one download share.
#[derive(Debug)]
pub struct Job<'a> {
    pub state: &'a ProxyState,
    pub image: &'a Image,
    pub digest: &'a Digest,
    pub creds: &'a Creds,
    pub upstream: Upstream,
    pub source: Source,
    pub total: u64,
    pub workers: u16,
    /// See [`RangedConfig::fast_rate`].
    pub fast_rate: Option<u64>,
    /// The temp file, written at offsets (positional writes: no shared cursor).
    pub file: Arc<std::fs::File>,
    /// The same file opened for reading (the temp file's own descriptor is write-only).
    pub reader: Arc<std::fs::File>,
    pub tx: &'a watch::Sender<FetchState>,
}

struct Shared {
    queue: Mutex<Queue>,
    extents: Mutex<Extents>,
    /// The upstream's own pace while the first connection is alone: bytes received and the
    /// nanoseconds spent waiting for them (see [`Probe::verdict`]).
    wire: WireClock,
    /// The first connection handed its answer back (see [`Filled::Alone`]): the hashing
    /// stops at the prefix.
    handed_off: AtomicBool,
}

struct WireClock {
    probing: AtomicBool,
    received: AtomicU64,
    waited_nanos: AtomicU64,
}

impl WireClock {
    /// A clock that counts from the start while `probing` (the first connection is alone
    /// until [`Self::stop`]); without a probe it counts nothing.
    fn new(probing: bool) -> Self {
        WireClock {
            probing: AtomicBool::new(probing),
            received: AtomicU64::new(0),
            waited_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, bytes: usize, waited: Duration) {
        if self.probing.load(Ordering::Relaxed) {
            self.received.fetch_add(bytes as u64, Ordering::Relaxed);
            let nanos = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
            self.waited_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
    }

    /// Ends the probe; what the upstream brought and how long larder waited for it.
    fn stop(&self) -> (u64, Duration) {
        self.probing.store(false, Ordering::Relaxed);
        (
            self.received.load(Ordering::Relaxed),
            Duration::from_nanos(self.waited_nanos.load(Ordering::Relaxed)),
        )
    }
}

impl Shared {
    fn claim(&self) -> Option<(u64, u64)> {
        // Poisoning cannot leave a Queue half-updated (two plain assignments).
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).claim()
    }
}

/// An answer's body, and the bytes a part read from it but did not take: they are the first
/// bytes of the next part read from the same answer, or of the stream handed off after the
/// probe.
pub struct Body {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    leftover: Option<Bytes>,
}

impl Body {
    fn of(response: reqwest::Response) -> Self {
        Body {
            stream: response.bytes_stream().boxed(),
            leftover: None,
        }
    }

    async fn next(&mut self) -> Option<reqwest::Result<Bytes>> {
        match self.leftover.take() {
            Some(bytes) => Some(Ok(bytes)),
            None => self.stream.next().await,
        }
    }

    /// The rest of the answer, leftover first.
    pub fn into_stream(self) -> futures::stream::BoxStream<'static, reqwest::Result<Bytes>> {
        futures::stream::iter(self.leftover.map(Ok))
            .chain(self.stream)
            .boxed()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("leftover", &self.leftover.as_ref().map(Bytes::len))
            .finish_non_exhaustive()
    }
}

/// How a ranged download ended.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per download, returned once; boxing would only add an allocation"
)]
pub enum Filled {
    /// Every byte is written and the digest verified.
    Verified { source: Source, total: u64 },
    /// The probe found the upstream fast enough for one stream: the first answer, standing at
    /// byte `written` (every byte before it is in the file and went through `verifier`), is
    /// for the caller to read on as one stream, which costs less than this module's
    /// positional writes and read-back hashing.
    Alone {
        body: Body,
        written: u64,
        verifier: Verifier,
    },
}

/// Fetches the blob, `first` (the answer to `bytes=0-`) being the first connection. With a
/// fast rate set, that connection first brings the probe's bytes alone; if the upstream was
/// fast, the answer is handed back to be read on as one stream ([`Filled::Alone`]), otherwise
/// the other connections start (at [`PROBE_TIME`] at the latest) and every byte is written and
/// verified here.
pub async fn fill(job: Job<'_>, first: reqwest::Response) -> Result<Filled, ProxyError> {
    let chunk = chunk_size(job.total, job.workers);
    let probe = job.fast_rate.map(|fast_rate| Probe {
        fast_rate,
        end: PROBE_BYTES.min(chunk).min(job.total),
        verdict: std::sync::OnceLock::new(),
        done: tokio::sync::Notify::new(),
    });
    let shared = Shared {
        queue: Mutex::new(Queue::new(
            probe.as_ref().map_or(0, |p| p.end),
            job.total,
            chunk,
        )),
        extents: Mutex::default(),
        wire: WireClock::new(probe.is_some()),
        handed_off: AtomicBool::new(false),
    };
    publish(&job, &Extents::default());
    let first = first_connection(&job, &shared, probe.as_ref(), Body::of(first));
    let others = async {
        if let Some(probe) = &probe {
            // Until the first connection has brought the probe's bytes, or for PROBE_TIME.
            let _ = tokio::time::timeout(PROBE_TIME, probe.done.notified()).await;
            if probe.verdict(&job, &shared.wire) {
                return Ok(());
            }
        } else {
            job.state.metrics.download(DownloadMode::ranged);
        }
        let others = (1..job.workers).map(|_| connection(&job, &shared, None, None));
        futures::future::try_join_all(others).await?;
        Ok::<_, ProxyError>(())
    };
    let all = async {
        let (handed, ()) = tokio::try_join!(first, others)?;
        Ok::<_, ProxyError>(handed)
    };
    // Every part completes to its end before its connection takes the next, and the queue
    // hands out every byte, so when all connections are done the prefix is the whole blob and
    // the hashing below finishes too (or stops where the first connection handed off).
    let (handed, verifier) = tokio::try_join!(all, hash_prefix(&job, &shared))?;
    if let Some((body, written)) = handed {
        return Ok(Filled::Alone {
            body,
            written,
            verifier,
        });
    }
    let actual = verifier.finish();
    if &actual != job.digest {
        job.state
            .metrics
            .upstream_error(job.upstream, "digest_mismatch");
        return Err(ProxyError::BadUpstream {
            upstream: job.upstream,
            detail: format!(
                "blob content hashes to {actual}, not {}; nothing was cached",
                job.digest
            ),
        });
    }
    Ok(Filled::Verified {
        source: job.source,
        total: job.total,
    })
}

/// The first connection: the probe's bytes (if probing), then either the hand-off of its
/// answer (the upstream was fast) or chunk after chunk from the queue like the others. Returns
/// the answer and where it stands when it hands off.
async fn first_connection(
    job: &Job<'_>,
    shared: &Shared,
    probe: Option<&Probe>,
    body: Body,
) -> Result<Option<(Body, u64)>, ProxyError> {
    let Some(probe) = probe else {
        let part = shared.claim();
        connection(job, shared, Some((body, 0)), part).await?;
        return Ok(None);
    };
    let kept = fetch_part(job, shared, 0, probe.end, Some(body)).await?;
    probe.done.notify_one();
    let alone = probe.verdict(job, &shared.wire);
    match kept {
        // Only the answer to `bytes=0-` runs to the blob's end; one re-asked after a break
        // ends with its part, and the connection then walks the queue alone.
        Some(body) if alone && probe.end < job.total => {
            shared.handed_off.store(true, Ordering::SeqCst);
            // Wakes the hashing, which stops at the hand-off.
            publish(
                job,
                &shared.extents.lock().unwrap_or_else(|p| p.into_inner()),
            );
            Ok(Some((body, probe.end)))
        }
        kept => {
            connection(job, shared, kept.map(|b| (b, probe.end)), None).await?;
            Ok(None)
        }
    }
}

/// The probe of one download: whether the first connection keeps the blob alone.
struct Probe {
    fast_rate: u64,
    /// The probe's bytes: `0..end` (the first connection's first part).
    end: u64,
    verdict: std::sync::OnceLock<bool>,
    /// Notified when the first connection has brought the probe's bytes.
    done: tokio::sync::Notify,
}

impl Probe {
    /// Whether the first connection may keep the blob alone, decided once: once it brought the
    /// probe's bytes, or at [`PROBE_TIME`], on the upstream's own rate (what it brought over the
    /// time larder waited on its socket) against the fast rate. Larder's write progress is not
    /// the measure: on a busy node it is slow because larder is, and splitting then costs more
    /// than it brings (docs/benchmarks.md).
    fn verdict(&self, job: &Job<'_>, wire: &WireClock) -> bool {
        *self.verdict.get_or_init(|| {
            let (received, waited) = wire.stop();
            let alone = keeps_alone(received, waited, self.end, self.fast_rate);
            job.state.metrics.download(if alone {
                DownloadMode::single
            } else {
                DownloadMode::ranged
            });
            tracing::debug!(digest = %job.digest, total = job.total, workers = job.workers, received, ?waited, alone, "blob download");
            alone
        })
    }
}

fn publish(job: &Job<'_>, extents: &Extents) {
    job.tx.send_replace(FetchState::Streaming {
        source: job.source,
        total: Some(job.total),
        written: extents.prefix(),
        received: None,
        extents: Some(Arc::new(extents.beyond_prefix())),
    });
}

/// One connection: its first part (if given), then chunk after chunk until none is left.
/// `body` is an answer already open and where it stands in the blob: it is read on as long as
/// the next part starts exactly there (the first connection, alone, reads one stream).
async fn connection(
    job: &Job<'_>,
    shared: &Shared,
    mut body: Option<(Body, u64)>,
    mut part: Option<(u64, u64)>,
) -> Result<(), ProxyError> {
    while let Some((start, end)) = part.take().or_else(|| shared.claim()) {
        let reuse = body.take().filter(|(_, at)| *at == start).map(|(b, _)| b);
        body = fetch_part(job, shared, start, end, reuse)
            .await?
            .map(|b| (b, end));
    }
    Ok(())
}

/// Bytes `start..end` into the file, resuming from the last byte written when the answer
/// breaks, stalls or ends early. Returns the answer it started with if that answer brought the
/// whole part (it stands at `end`, and may go on).
async fn fetch_part(
    job: &Job<'_>,
    shared: &Shared,
    start: u64,
    end: u64,
    mut body: Option<Body>,
) -> Result<Option<Body>, ProxyError> {
    let metrics = &job.state.metrics;
    let mut pos = start;
    let mut retries = Retries::default();
    let mut kept = None;
    while pos < end {
        let from = pos;
        let outcome = match body.take() {
            Some(mut first) => {
                let result = copy(job, shared, &mut first, &mut pos, end).await;
                if result.is_ok() && pos >= end {
                    kept = Some(first);
                }
                result
            }
            None => match open(job, pos, end).await {
                Ok(answer) => copy(job, shared, &mut Body::of(answer), &mut pos, end).await,
                Err(err) => Err(err),
            },
        };
        let err = match outcome {
            Ok(()) if pos >= end => break,
            // Ended early without an error (a short range): ask for the rest.
            Ok(()) => ProxyError::Unavailable {
                upstream: job.upstream,
                detail: format!("a range ended at byte {pos} of {from}..{end}"),
            },
            Err(err) if !worth_retrying(&err) => {
                metrics.range_request(RangeResult::failed);
                return Err(err);
            }
            Err(err) => err,
        };
        if !retries.another(from, pos) {
            metrics.range_request(RangeResult::failed);
            return Err(err);
        }
        metrics.range_request(RangeResult::retried);
        tracing::debug!(digest = %job.digest, pos, end, error = %err, "range broke; asking for the rest");
        tokio::time::sleep(retries.pause()).await;
    }
    metrics.range_request(RangeResult::ok);
    Ok(kept)
}

/// Asks for `pos..end` and checks the answer.
async fn open(job: &Job<'_>, pos: u64, end: u64) -> Result<reqwest::Response, ProxyError> {
    let response = job
        .state
        .open_blob_part(
            job.upstream,
            job.image,
            job.digest,
            job.creds,
            Some(request_header(pos, Some(end))),
        )
        .await?;
    let content_range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    check_part(response.status().as_u16(), content_range, pos, job.total).map_err(|detail| {
        ProxyError::BadUpstream {
            upstream: job.upstream,
            detail,
        }
    })?;
    Ok(response)
}

/// Copies an answer's body into the file from `pos` until `end` (bytes past `end` are not
/// this part's: they stay in `body` for whoever reads on, if anyone). `pos` follows what is
/// written, also when the body breaks, so a retry resumes there.
async fn copy(
    job: &Job<'_>,
    shared: &Shared,
    body: &mut Body,
    pos: &mut u64,
    end: u64,
) -> Result<(), ProxyError> {
    let idle = job.state.upstream.config().idle_timeout;
    let upstream = job.upstream;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut result = Ok(());
    loop {
        let remaining = end - *pos - batch_len as u64;
        let next = if remaining == 0 {
            None
        } else {
            // Bytes already waiting in the socket cost the upstream no time: only a read that
            // had to wait counts. That wait still includes larder's own scheduling delay on a
            // saturated node, but there the socket fills and most reads find bytes waiting.
            let asked = tokio::time::Instant::now();
            let (answer, waited) = match body.next().now_or_never() {
                Some(ready) => (Ok(ready), Duration::ZERO),
                None => {
                    let answer = tokio::time::timeout(idle, body.next()).await;
                    (answer, asked.elapsed())
                }
            };
            if let Ok(Some(Ok(chunk))) = &answer {
                shared.wire.record(chunk.len(), waited);
            }
            match answer {
                Err(_) => {
                    result = Err(ProxyError::Unavailable {
                        upstream,
                        detail: format!("a range stalled for {idle:?}"),
                    });
                    None
                }
                Ok(None) => None,
                Ok(Some(Err(e))) => {
                    result = Err(ProxyError::Unavailable {
                        upstream,
                        detail: format!("a range broke: {}", crate::upstream::describe(&e)),
                    });
                    None
                }
                Ok(Some(Ok(mut chunk))) => {
                    if chunk.len() as u64 > remaining {
                        // Not this part's: kept for the next part read from this answer.
                        body.leftover = Some(chunk.split_off(remaining as usize));
                    }
                    Some(chunk)
                }
            }
        };
        let done = next.is_none();
        if let Some(chunk) = next {
            batch_len += chunk.len();
            batch.push(chunk);
        }
        if batch_len >= PART_BATCH || (done && batch_len > 0) {
            let len = batch_len as u64;
            write_at(&job.file, *pos, std::mem::take(&mut batch))
                .await
                .map_err(|e| ProxyError::Disk(format!("writing a range of the temp file: {e}")))?;
            batch_len = 0;
            let mut extents = shared.extents.lock().unwrap_or_else(|p| p.into_inner());
            extents.insert(*pos, *pos + len);
            *pos += len;
            publish(job, &extents);
        }
        if done {
            return result;
        }
    }
}

/// Writes `pieces` one after the other from `offset`, on the blocking pool.
async fn write_at(
    file: &Arc<std::fs::File>,
    offset: u64,
    pieces: Vec<Bytes>,
) -> std::io::Result<()> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut offset = offset;
        for piece in &pieces {
            file.write_all_at(piece, offset)?;
            offset += piece.len() as u64;
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Hashes the contiguous prefix as it grows, reading it back from the file (the page cache),
/// until the whole blob is hashed, or up to the prefix once the first connection handed off.
async fn hash_prefix(job: &Job<'_>, shared: &Shared) -> Result<Verifier, ProxyError> {
    let mut progress = job.tx.subscribe();
    let mut verifier = job.digest.verifier();
    let mut buffer = vec![0u8; HASH_READ];
    let mut hashed = 0u64;
    let disk = |e: std::io::Error| ProxyError::Disk(format!("reading back a ranged download: {e}"));
    loop {
        // Read before the prefix: the hand-off is flagged after its bytes were published, so
        // a prefix read after the flag holds them all.
        let handed_off = shared.handed_off.load(Ordering::SeqCst);
        let prefix = match &*progress.borrow_and_update() {
            FetchState::Streaming { written, .. } => *written,
            _ => hashed,
        };
        while hashed < prefix {
            let len = (prefix - hashed).min(HASH_READ as u64) as usize;
            let file = Arc::clone(&job.reader);
            let (v, b) = tokio::task::spawn_blocking(move || {
                file.read_exact_at(&mut buffer[..len], hashed)?;
                verifier.update(&buffer[..len]);
                Ok::<_, std::io::Error>((verifier, buffer))
            })
            .await
            .map_err(|e| disk(std::io::Error::other(e)))?
            .map_err(disk)?;
            (verifier, buffer) = (v, b);
            hashed += len as u64;
        }
        // A hand-off flagged after the read above is published again: the wait below sees it.
        if hashed >= job.total || handed_off {
            return Ok(verifier);
        }
        if progress.changed().await.is_err() {
            return Err(ProxyError::Disk(
                "a ranged download lost its progress".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: RangedConfig = RangedConfig {
        threshold: 100,
        connections: 4,
        fast_rate: Some(1000),
    };

    #[test]
    fn the_first_answer_decides_single_or_ranged() {
        // Range ignored: one stream, whatever the size.
        assert_eq!(choose_mode(200, None, ON), Ok(Mode::Single));
        assert_eq!(
            choose_mode(200, Some("bytes 0-999/1000"), ON),
            Ok(Mode::Single)
        );
        // Large enough: ranged.
        assert_eq!(
            choose_mode(206, Some("bytes 0-999/1000"), ON),
            Ok(Mode::Ranged {
                total: 1000,
                workers: 4
            })
        );
        assert_eq!(
            choose_mode(206, Some("bytes 0-99/100"), ON),
            Ok(Mode::Ranged {
                total: 100,
                workers: 4
            })
        );
        // Below the threshold and complete: one stream.
        assert_eq!(
            choose_mode(206, Some("bytes 0-98/99"), ON),
            Ok(Mode::Single)
        );
        // Below the threshold but short: the rest on the same (one) connection.
        assert_eq!(
            choose_mode(206, Some("bytes 0-9/99"), ON),
            Ok(Mode::Ranged {
                total: 99,
                workers: 1
            })
        );
        // No length: one stream, the digest decides.
        assert_eq!(choose_mode(206, Some("bytes 0-9/*"), ON), Ok(Mode::Single));
        // Lies and nonsense are never served.
        assert!(choose_mode(206, Some("bytes 5-9/1000"), ON).is_err());
        assert!(choose_mode(206, None, ON).is_err());
        assert!(choose_mode(206, Some("bytes */1000"), ON).is_err());
        assert!(choose_mode(204, None, ON).is_err());
        // Turned off: never ranged (and no Range is sent at all, see fetch).
        let off = RangedConfig {
            threshold: 100,
            connections: 1,
            fast_rate: Some(1000),
        };
        assert_eq!(
            choose_mode(206, Some("bytes 0-9/1000"), off),
            Ok(Mode::Ranged {
                total: 1000,
                workers: 1
            })
        );
    }

    #[test]
    fn a_first_connection_faster_than_the_bar_keeps_the_blob() {
        let second = Duration::from_secs(1);
        assert!(one_is_enough(300_000_000, second, DEFAULT_FAST_RATE));
        assert!(!one_is_enough(299_999_999, second, DEFAULT_FAST_RATE));
        // 8 MiB in 10 ms (839 MB/s, loopback) keeps it; in 80 ms (105 MB/s, capped) splits.
        let probe = 8 << 20;
        assert!(one_is_enough(
            probe,
            Duration::from_millis(10),
            DEFAULT_FAST_RATE
        ));
        assert!(!one_is_enough(
            probe,
            Duration::from_millis(80),
            DEFAULT_FAST_RATE
        ));
    }

    #[test]
    fn the_probe_judges_the_upstream_not_larders_own_pace() {
        let probe = 8 << 20;
        // A fast upstream whose bytes sat in the socket while a busy larder wrote them: 8 MiB
        // for 5 ms of waiting keeps one stream, however long the writes took.
        assert!(keeps_alone(
            probe,
            Duration::from_millis(5),
            probe,
            DEFAULT_FAST_RATE
        ));
        // An upstream capped at ~40 MB/s: 8 MiB for 200 ms of waiting splits.
        assert!(!keeps_alone(
            probe,
            Duration::from_millis(200),
            probe,
            DEFAULT_FAST_RATE
        ));
        // Too little to judge by the probe's end (under a MiB in 200 ms): a slow upstream.
        assert!(!keeps_alone(
            64 << 10,
            Duration::ZERO,
            probe,
            DEFAULT_FAST_RATE
        ));
        // A first chunk smaller than a MiB is judged whole.
        assert!(keeps_alone(
            512 << 10,
            Duration::ZERO,
            512 << 10,
            DEFAULT_FAST_RATE
        ));
    }

    #[test]
    fn retries_allow_a_few_fruitless_attempts_in_a_row_and_a_bounded_number_in_all() {
        let mut retries = Retries::default();
        // Attempts that bring bytes reset the fruitless count, the pause stays short.
        for k in 0..PART_ATTEMPTS - 1 {
            assert!(retries.another(k as u64 * 10, k as u64 * 10 + 5), "{k}");
            assert_eq!(retries.pause(), Duration::from_millis(50));
        }
        assert!(!retries.another(1000, 1005), "PART_ATTEMPTS in all");
        let mut retries = Retries::default();
        for k in 0..PART_RETRIES {
            assert!(retries.another(7, 7), "{k}");
        }
        assert_eq!(retries.pause(), Duration::from_millis(50 << PART_RETRIES));
        assert!(!retries.another(7, 7), "PART_RETRIES fruitless in a row");
    }

    #[test]
    fn chunks_are_a_quarter_of_a_connections_share_within_bounds() {
        assert_eq!(chunk_size(1 << 30, 8), 32 << 20);
        assert_eq!(chunk_size(4 << 20, 4), MIN_CHUNK);
        assert_eq!(chunk_size(100 << 30, 8), MAX_CHUNK);
        assert_eq!(chunk_size(10, 0), MIN_CHUNK);
    }

    #[test]
    fn the_queue_hands_out_every_byte_once_in_order() {
        let mut queue = Queue::new(10, 35, 10);
        assert_eq!(queue.claim(), Some((10, 20)));
        assert_eq!(queue.claim(), Some((20, 30)));
        assert_eq!(queue.claim(), Some((30, 35)));
        assert_eq!(queue.claim(), None);
        assert_eq!(Queue::new(50, 35, 10).claim(), None);
    }

    #[test]
    fn extents_merge_and_the_prefix_is_what_has_no_gap() {
        let mut e = Extents::default();
        assert_eq!(e.prefix(), 0);
        e.insert(20, 30);
        assert_eq!(e.prefix(), 0);
        assert_eq!(e.beyond_prefix(), vec![(20, 30)]);
        e.insert(0, 10);
        assert_eq!(e.prefix(), 10);
        e.insert(40, 50);
        e.insert(10, 20);
        assert_eq!(e.prefix(), 30);
        assert_eq!(e.beyond_prefix(), vec![(40, 50)]);
        e.insert(35, 45);
        e.insert(5, 5);
        assert_eq!(e.spans, vec![(0, 30), (35, 50)]);
        e.insert(30, 35);
        assert_eq!(e.spans, vec![(0, 50)]);
        assert!(e.beyond_prefix().is_empty());
    }

    #[test]
    fn later_parts_must_start_where_asked_in_a_blob_of_the_same_size() {
        assert_eq!(check_part(206, Some("bytes 10-19/100"), 10, 100), Ok(20));
        // Shorter than asked is fine: the rest is asked again.
        assert_eq!(check_part(206, Some("bytes 10-11/100"), 10, 100), Ok(12));
        assert!(check_part(200, None, 10, 100).is_err());
        assert!(check_part(206, Some("bytes 0-19/100"), 10, 100).is_err());
        assert!(check_part(206, Some("bytes 10-19/200"), 10, 100).is_err());
        assert!(check_part(206, Some("bytes 10-19/*"), 10, 100).is_err());
        assert!(check_part(503, None, 10, 100).is_err());
    }
}
