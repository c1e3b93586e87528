//! The download of one blob into a temp file of the disk tier: pick an upstream, stream into the
//! file, hashing as it goes, verify, commit. The task belongs to no client (readers follow it
//! through [`crate::fetch`]), and memory stays bounded by two batches per download.
//!
//! Blobs of at least `--upstream-ranged-threshold` go through [`crate::ranged`], which hands a
//! fast first answer back here to be read on as one stream. A stream whose upstream honours
//! ranges (it answered `bytes=0-` with a 206) is resumed from its first missing byte when it
//! breaks, stalls or ends early.

use std::io::{IoSlice, Seek as _, Write as _};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use larder_core::digest::{Digest, Verifier};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{ProxyError, Upstream};
use crate::fetch::{Batch, FetchState, Joined};
use crate::metrics::{DownloadMode, RangeResult, Source};
use crate::ranged::{self, Filled, Mode};
use crate::route::Image;
use crate::state::{Creds, ProxyState};
use crate::temp_blob::TempBlob;

/// Bytes gathered before each write into the temp file: every write is a hop through the
/// blocking pool, which costs more than the copy for small pieces. One batch is written while
/// the next arrives, so a download holds at most two batches in memory.
pub const WRITE_BATCH: usize = 1 << 20;

/// Attaches to the download of `digest`, starting it if none is in flight. Returns `Ok(None)`
/// when the blob turned up on disk meanwhile (the caller serves it from there).
pub async fn join(
    state: &Arc<ProxyState>,
    image: &Image,
    digest: &Digest,
    creds: &Creds,
) -> Result<Option<Joined>, ProxyError> {
    state
        .fetches
        .join(&state.disk, digest, |temp, tx| {
            state.metrics.in_flight_fetches.inc();
            tokio::spawn(download(
                Arc::clone(state),
                image.clone(),
                digest.clone(),
                creds.clone(),
                temp,
                tx,
            ));
        })
        .await
}

/// The download task: pick an upstream, stream into the temp file, verify, commit.
async fn download(
    state: Arc<ProxyState>,
    image: Image,
    digest: Digest,
    creds: Creds,
    mut temp: TempBlob,
    tx: watch::Sender<FetchState>,
) {
    let result = fill(&state, &image, &digest, &creds, &mut temp, &tx).await;
    match result {
        Ok((source, total)) => {
            // Verified: readers may have the last byte now, before the (fsyncing) commit.
            tx.send_replace(FetchState::Done { source, total });
            match state.disk.commit_blob(temp, &digest, total).await {
                Ok(_) => write_through(&state, &image, &digest, source).await,
                // Readers hold the file open and still get every byte; only caching failed.
                Err(err) => {
                    tracing::warn!(%digest, error = %err, "could not keep a verified blob on disk");
                }
            }
            state.refresh_disk_gauges();
            // Only now: a request that finds neither this entry nor the blob on disk would
            // start a second download. One that opens the moved path fails and retries disk.
            state.fetches.finish(&digest);
        }
        Err(err) => {
            tracing::warn!(%digest, image = %image.proxy_repository(), error = %err, "blob download failed");
            state.fetches.finish(&digest);
            drop(temp);
            tx.send_replace(FetchState::Failed(err));
        }
    }
    state.metrics.in_flight_fetches.dec();
}

/// Offers a blob the origin served to the cache registry (see [`crate::writeback`]).
async fn write_through(state: &ProxyState, image: &Image, digest: &Digest, source: Source) {
    let Some(writer) = &state.cache_writer else {
        return;
    };
    if source != Source::origin {
        return;
    }
    match state.disk.open_blob(digest).await {
        Ok(Some((file, size))) => writer.offer(crate::writeback::Job {
            repository: image.proxy_repository(),
            digest: digest.clone(),
            size,
            file,
        }),
        Ok(None) => {}
        Err(err) => tracing::debug!(%digest, error = %err, "write-through: blob not readable"),
    }
}

async fn fill(
    state: &ProxyState,
    image: &Image,
    digest: &Digest,
    creds: &Creds,
    temp: &mut TempBlob,
    tx: &watch::Sender<FetchState>,
) -> Result<(Source, u64), ProxyError> {
    let ranges = state.upstream.config().ranged;
    // With ranges on, the first request asks for `bytes=0-`: it starts the blob at once, like
    // a single stream, and its answer says whether and how the rest is fetched in ranges.
    let first_range = ranges
        .enabled()
        .then(|| crate::range::request_header(0, None));
    let asked_range = first_range.is_some();
    let (response, source, upstream) = state
        .open_blob_upstream(image, digest, creds, first_range)
        .await?;
    if asked_range {
        let content_range = response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok());
        match ranged::choose_mode(response.status().as_u16(), content_range, ranges) {
            Ok(Mode::Single) => {}
            Ok(Mode::Ranged { total, workers }) => {
                let file = temp
                    .file()
                    .try_clone()
                    .await
                    .map_err(|e| ProxyError::Disk(format!("opening the temp file: {e}")))?
                    .into_std()
                    .await;
                let reader = temp
                    .reader()
                    .map_err(|e| ProxyError::Disk(format!("reading the temp file: {e}")))?;
                let job = ranged::Job {
                    state,
                    image,
                    digest,
                    creds,
                    upstream,
                    source,
                    total,
                    workers,
                    fast_rate: ranges.fast_rate,
                    file: Arc::new(file),
                    reader: Arc::new(reader),
                    tx,
                };
                return match ranged::fill(job, response).await? {
                    Filled::Verified { source, total } => Ok((source, total)),
                    Filled::Alone {
                        body,
                        written,
                        verifier,
                    } => {
                        let rest = OneStream {
                            source,
                            upstream,
                            total: Some(total),
                            written,
                            verifier,
                            body: body.into_stream(),
                            resume: Some(Resume::new(image, creds, written)),
                        };
                        read_to_end(state, digest, temp, tx, rest).await
                    }
                };
            }
            Err(detail) => return Err(ProxyError::BadUpstream { upstream, detail }),
        }
    }
    state.metrics.download(DownloadMode::single);
    // A 206 to `bytes=0-` (the blob below the ranged threshold) shows the upstream honours
    // ranges: a break is resumed.
    let honours_ranges = response.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    let whole = OneStream {
        source,
        upstream,
        total: response.content_length(),
        written: 0,
        verifier: digest.verifier(),
        body: response.bytes_stream().boxed(),
        resume: honours_ranges.then(|| Resume::new(image, creds, 0)),
    };
    read_to_end(state, digest, temp, tx, whole).await
}

/// A blob's answer read as one stream from byte `written` on: the bytes before it (if any) are
/// in the file already and went through `verifier`.
struct OneStream<'a> {
    source: Source,
    upstream: Upstream,
    total: Option<u64>,
    written: u64,
    verifier: Verifier,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    /// Set when the upstream honours ranges: a break is then asked again from where it stopped.
    resume: Option<Resume<'a>>,
}

/// How a stream that broke, stalled or ended early is asked again from where it stopped, with
/// the budget of a ranged download's part ([`ranged::Retries`]).
struct Resume<'a> {
    image: &'a Image,
    creds: &'a Creds,
    retries: ranged::Retries,
    /// Where the answer being read started.
    from: u64,
}

impl<'a> Resume<'a> {
    fn new(image: &'a Image, creds: &'a Creds, from: u64) -> Self {
        Resume {
            image,
            creds,
            retries: ranged::Retries::default(),
            from,
        }
    }

    /// The rest of the blob from byte `pos`, after `err` ended the answer being read; `err`
    /// (or the last attempt's error) once the budget is spent.
    async fn reopen(
        &mut self,
        state: &ProxyState,
        digest: &Digest,
        upstream: Upstream,
        total: u64,
        pos: u64,
        mut err: ProxyError,
    ) -> Result<BoxStream<'static, reqwest::Result<Bytes>>, ProxyError> {
        loop {
            if !ranged::worth_retrying(&err) || !self.retries.another(self.from, pos) {
                state.metrics.range_request(RangeResult::failed);
                return Err(err);
            }
            state.metrics.range_request(RangeResult::retried);
            tracing::debug!(%digest, pos, total, error = %err, "blob stream broke; asking for the rest");
            tokio::time::sleep(self.retries.pause()).await;
            self.from = pos;
            let range = Some(crate::range::request_header(pos, None));
            err = match state
                .open_blob_part(upstream, self.image, digest, self.creds, range)
                .await
            {
                Ok(answer) => {
                    let content_range = answer
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok());
                    let status = answer.status().as_u16();
                    match ranged::check_part(status, content_range, pos, total) {
                        Ok(_) => return Ok(answer.bytes_stream().boxed()),
                        Err(detail) => ProxyError::BadUpstream { upstream, detail },
                    }
                }
                Err(err) => err,
            };
        }
    }
}

/// Reads `rest` to its end into the temp file, hashing as it goes, and verifies the digest.
async fn read_to_end(
    state: &ProxyState,
    digest: &Digest,
    temp: &mut TempBlob,
    tx: &watch::Sender<FetchState>,
    rest: OneStream<'_>,
) -> Result<(Source, u64), ProxyError> {
    let OneStream {
        source,
        upstream,
        total,
        mut written,
        verifier,
        mut body,
        mut resume,
    } = rest;
    // What readers see: `written` bytes in the file, then the batch `received` in memory.
    let publish = |written: u64, received: Option<Arc<Batch>>| {
        tx.send_replace(FetchState::Streaming {
            source,
            total,
            written,
            received,
            extents: None,
        });
    };
    publish(written, None);
    let limit = total.unwrap_or_else(|| state.disk.max_bytes());
    let idle = state.upstream.config().idle_timeout;
    // The hasher moves into each batch's blocking job and comes back with it: hashing runs off
    // the task that receives, so the next batch arrives while this one is hashed and written.
    let mut hashing = Hashing::Idle(verifier);
    let path = temp.path().to_path_buf();
    let disk_error =
        |e: std::io::Error| ProxyError::Disk(format!("writing {}: {e}", path.display()));
    // Written through a second descriptor of the same open file, on the blocking pool, straight
    // from the received buffers: no copy in user space. `TempBlob` keeps the original for commit.
    let file = Arc::new(
        temp.file()
            .try_clone()
            .await
            .map_err(disk_error)?
            .into_std()
            .await,
    );
    if written > 0 {
        // Written at offsets so far (ranged writes leave the descriptor's offset at 0).
        (&*file)
            .seek(std::io::SeekFrom::Start(written))
            .map_err(disk_error)?;
    }
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batch_len: usize = 0;
    let mut received: u64 = written;
    loop {
        let broke = match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
            Ok(None) if resume.is_none() || total.is_none_or(|t| received >= t) => Ok(None),
            Ok(None) => Err(format!("blob download ended after {received} bytes")),
            Ok(Some(Err(e))) => Err(format!(
                "blob download broke: {}",
                crate::upstream::describe(&e)
            )),
            Err(_) => Err(format!("blob download stalled for {idle:?}")),
        };
        let chunk = match broke {
            Ok(chunk) => chunk,
            Err(detail) => {
                let err = ProxyError::Unavailable { upstream, detail };
                let (Some(resume), Some(total)) = (resume.as_mut(), total) else {
                    return Err(err);
                };
                body = resume
                    .reopen(state, digest, upstream, total, received, err)
                    .await?;
                continue;
            }
        };
        if let Some(chunk) = chunk.clone() {
            received += chunk.len() as u64;
            if received > limit {
                return Err(ProxyError::BadUpstream {
                    upstream,
                    detail: format!("blob {digest} is longer than the {limit} bytes announced"),
                });
            }
            batch_len += chunk.len();
            batch.push(chunk);
        }
        if batch_len >= WRITE_BATCH || (chunk.is_none() && !batch.is_empty()) {
            // One batch in the blocking pool at a time: memory stays bounded by two batches.
            let (previous, mut hasher) = hashing.settle().await.map_err(disk_error)?;
            written += previous.unwrap_or(0);
            let received = Arc::new(Batch::new(written, std::mem::take(&mut batch)));
            batch_len = 0;
            // Readers get the new batch from memory now, and everything before it from the file.
            publish(written, Some(Arc::clone(&received)));
            let file = Arc::clone(&file);
            hashing = Hashing::Busy(tokio::task::spawn_blocking(move || {
                for piece in &received.pieces {
                    hasher.update(piece);
                }
                write_pieces(&file, &received.pieces).map(|n| (n, hasher))
            }));
        }
        if chunk.is_none() {
            break;
        }
    }
    let (last, verifier) = hashing.settle().await.map_err(disk_error)?;
    if let Some(n) = last {
        written += n;
        publish(written, None);
    }
    if let Some(total) = total
        && written != total
    {
        return Err(ProxyError::BadUpstream {
            upstream,
            detail: format!("blob {digest} ended after {written} of {total} bytes"),
        });
    }
    let actual = verifier.finish();
    if &actual != digest {
        state.metrics.upstream_error(upstream, "digest_mismatch");
        return Err(ProxyError::BadUpstream {
            upstream,
            detail: format!("blob content hashes to {actual}, not {digest}; nothing was cached"),
        });
    }
    Ok((source, written))
}

/// Where a download's hasher is: here, or lent to the job hashing and writing the previous
/// batch (which hands it back with the number of bytes it wrote).
#[expect(
    clippy::large_enum_variant,
    reason = "one per download, on its task's stack; boxing would add an allocation per batch"
)]
enum Hashing {
    Idle(Verifier),
    Busy(JoinHandle<std::io::Result<(u64, Verifier)>>),
}

impl Hashing {
    /// Waits for the job in progress, if any: the bytes it wrote, and the hasher.
    async fn settle(self) -> std::io::Result<(Option<u64>, Verifier)> {
        match self {
            Hashing::Idle(verifier) => Ok((None, verifier)),
            Hashing::Busy(job) => {
                let (n, verifier) = job.await.map_err(std::io::Error::other)??;
                Ok((Some(n), verifier))
            }
        }
    }
}

/// Writes every piece, in order, with as few system calls as the kernel allows.
fn write_pieces(mut file: &std::fs::File, pieces: &[Bytes]) -> std::io::Result<u64> {
    // At most this many buffers per call (Linux's IOV_MAX is 1024).
    const MAX_SLICES: usize = 64;
    let (mut index, mut offset, mut total) = (0, 0, 0u64);
    while index < pieces.len() {
        let slices: Vec<IoSlice<'_>> = std::iter::once(&pieces[index][offset..])
            .chain(pieces[index + 1..].iter().map(|p| &p[..]))
            .take(MAX_SLICES)
            .map(IoSlice::new)
            .collect();
        let mut n = match file.write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        total += n as u64;
        while n > 0 {
            let left = pieces[index].len() - offset;
            if n >= left {
                n -= left;
                index += 1;
                offset = 0;
            } else {
                offset += n;
                n = 0;
            }
        }
        // Empty pieces (none are expected) would otherwise stall the loop.
        while index < pieces.len() && pieces[index].len() == offset {
            index += 1;
            offset = 0;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn write_pieces_writes_every_byte_in_order_whatever_the_piece_sizes() {
        let dir = tempfile::tempdir().unwrap();
        // Empty pieces, tiny ones, and more pieces than one vectored call takes.
        let mut pieces: Vec<Bytes> = vec![Bytes::new(), Bytes::from(pattern(1, 1))];
        for i in 0..200 {
            pieces.push(Bytes::from(pattern(i * 37 % 5000, i as u8)));
            if i % 50 == 0 {
                pieces.push(Bytes::new());
            }
        }
        pieces.push(Bytes::from(pattern(3 << 20, 9)));
        let expected: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
        let path = dir.path().join("blob");
        let file = std::fs::File::create(&path).unwrap();
        let n = write_pieces(&file, &pieces).unwrap();
        assert_eq!(n, expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        assert_eq!(write_pieces(&file, &[]).unwrap(), 0);
    }
}
