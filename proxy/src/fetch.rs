//! One upstream download per blob, however many clients ask at once.
//!
//! The first request for a missing blob starts a download task that writes into a temporary
//! file of the disk tier, hashing as it goes. Every request (the first one too) reads that file
//! as it grows, from the first byte, so late joiners lose nothing and memory stays bounded by
//! the chunk size. The task belongs to no client: a client that disconnects cancels nothing.
//! The last byte of the blob is held back from every reader until the digest is verified, so a
//! corrupt download ends every client's stream with an error instead of a wrong blob.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::{BufMut as _, Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use larder_core::digest::Digest;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

use crate::disk::TempBlob;
use crate::error::{ProxyError, Upstream};
use crate::metrics::Source;
use crate::route::Image;
use crate::state::{Creds, ProxyState};

/// Bytes per read from the growing file.
pub const CHUNK: usize = 256 << 10;
/// Bytes gathered before each write into the temp file: every write (and its flush) is a hop
/// through tokio's blocking pool, which costs more than the copy for small pieces.
pub const WRITE_BATCH: usize = 1 << 20;

/// Progress of one download, as readers see it.
#[derive(Debug, Clone)]
pub enum FetchState {
    /// Choosing and connecting to an upstream.
    Connecting,
    /// Bytes are arriving; `written` are in the file.
    Streaming {
        source: Source,
        total: Option<u64>,
        written: u64,
    },
    /// Complete and verified.
    Done { source: Source, total: u64 },
    /// Abandoned; nothing was cached.
    Failed(ProxyError),
}

struct Inflight {
    path: PathBuf,
    state: watch::Receiver<FetchState>,
}

/// The downloads in progress, by digest.
#[derive(Default)]
pub struct Fetches {
    inflight: Mutex<HashMap<Digest, Inflight>>,
}

impl std::fmt::Debug for Fetches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.lock().len();
        f.debug_struct("Fetches").field("inflight", &n).finish()
    }
}

/// A reader attached to a download.
#[derive(Debug)]
pub struct Joined {
    pub file: tokio::fs::File,
    pub state: watch::Receiver<FetchState>,
    /// True when this request joined a download another request started.
    pub coalesced: bool,
}

impl Fetches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Inflight>> {
        // A panic while holding this lock leaves a consistent map (single inserts/removes).
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches to the download of `digest`, starting it if none is in flight. Returns
    /// `Ok(None)` when the blob turned up on disk meanwhile (the caller serves it from there).
    pub async fn join(
        &self,
        state: &Arc<ProxyState>,
        image: &Image,
        digest: &Digest,
        creds: &Creds,
    ) -> Result<Option<Joined>, ProxyError> {
        if let Some(joined) = self.attach(digest) {
            return Ok(Some(joined));
        }
        let temp = state.disk.create_temp().await?;
        let mut inflight = self.lock();
        if let Some(existing) = inflight.get(digest) {
            // Someone started the same download while we made our file: join theirs.
            if let Ok(file) = std::fs::File::open(&existing.path) {
                return Ok(Some(Joined {
                    file: tokio::fs::File::from_std(file),
                    state: existing.state.clone(),
                    coalesced: true,
                }));
            }
            return Ok(None);
        }
        if state.disk.contains_blob(digest) {
            return Ok(None);
        }
        let path = temp.path().to_path_buf();
        let reader = std::fs::File::open(&path)
            .map_err(|e| ProxyError::Disk(format!("opening {}: {e}", path.display())))?;
        let (tx, rx) = watch::channel(FetchState::Connecting);
        inflight.insert(
            digest.clone(),
            Inflight {
                path,
                state: rx.clone(),
            },
        );
        drop(inflight);
        state.metrics.in_flight_fetches.inc();
        tokio::spawn(download(
            Arc::clone(state),
            image.clone(),
            digest.clone(),
            creds.clone(),
            temp,
            tx,
        ));
        Ok(Some(Joined {
            file: tokio::fs::File::from_std(reader),
            state: rx,
            coalesced: false,
        }))
    }

    fn attach(&self, digest: &Digest) -> Option<Joined> {
        let inflight = self.lock();
        let existing = inflight.get(digest)?;
        // Fails (and the caller looks on disk again) if the download was just committed.
        let file = std::fs::File::open(&existing.path).ok()?;
        Some(Joined {
            file: tokio::fs::File::from_std(file),
            state: existing.state.clone(),
            coalesced: true,
        })
    }

    fn finish(&self, digest: &Digest) {
        self.lock().remove(digest);
    }
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
            if let Err(err) = state.disk.commit_blob(temp, &digest, total).await {
                // Readers hold the file open and still get every byte; only caching failed.
                tracing::warn!(%digest, error = %err, "could not keep a verified blob on disk");
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

async fn fill(
    state: &ProxyState,
    image: &Image,
    digest: &Digest,
    creds: &Creds,
    temp: &mut TempBlob,
    tx: &watch::Sender<FetchState>,
) -> Result<(Source, u64), ProxyError> {
    let (response, source, upstream) = state.open_blob_upstream(image, digest, creds).await?;
    let total = response.content_length();
    tx.send_replace(FetchState::Streaming {
        source,
        total,
        written: 0,
    });
    let limit = total.unwrap_or_else(|| state.disk.max_bytes());
    let idle = state.upstream.config().idle_timeout;
    let mut body = response.bytes_stream();
    let mut verifier = digest.verifier();
    let mut pending = BytesMut::with_capacity(WRITE_BATCH);
    let mut written: u64 = 0;
    let path = temp.path().to_path_buf();
    let file = temp.file();
    loop {
        let next =
            tokio::time::timeout(idle, body.next())
                .await
                .map_err(|_| ProxyError::Unavailable {
                    upstream,
                    detail: format!("blob download stalled for {idle:?}"),
                })?;
        let chunk = match next {
            None => None,
            Some(Ok(chunk)) => Some(chunk),
            Some(Err(e)) => {
                return Err(ProxyError::Unavailable {
                    upstream,
                    detail: format!("blob download broke: {}", crate::upstream::describe(&e)),
                });
            }
        };
        if let Some(chunk) = &chunk {
            if written + pending.len() as u64 + chunk.len() as u64 > limit {
                return Err(ProxyError::BadUpstream {
                    upstream,
                    detail: format!("blob {digest} is longer than the {limit} bytes announced"),
                });
            }
            verifier.update(chunk);
            pending.extend_from_slice(chunk);
        }
        // Write in large pieces: one blocking write per small network chunk would cost more
        // than the copy.
        if pending.len() >= WRITE_BATCH || (chunk.is_none() && !pending.is_empty()) {
            // tokio's File hands writes to a background thread; `flush` waits until the bytes
            // are in the OS, so readers never see `written` ahead of the file.
            let write = async {
                file.write_all(&pending).await?;
                file.flush().await
            };
            write
                .await
                .map_err(|e| ProxyError::Disk(format!("writing {}: {e}", path.display())))?;
            written += pending.len() as u64;
            pending.clear();
            tx.send_replace(FetchState::Streaming {
                source,
                total,
                written,
            });
        }
        if chunk.is_none() {
            break;
        }
    }
    file.flush()
        .await
        .map_err(|e| ProxyError::Disk(format!("flushing a download: {e}")))?;
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

/// Waits until the download has chosen an upstream (or failed before sending anything).
pub async fn wait_started(
    state: &mut watch::Receiver<FetchState>,
) -> Result<(Source, Option<u64>), ProxyError> {
    loop {
        match &*state.borrow_and_update() {
            FetchState::Connecting => {}
            FetchState::Streaming { source, total, .. } => return Ok((*source, *total)),
            FetchState::Done { source, total } => return Ok((*source, Some(*total))),
            FetchState::Failed(e) => return Err(e.clone()),
        }
        if state.changed().await.is_err() {
            return Err(ProxyError::Disk("a download ended without a result".into()));
        }
    }
}

/// The bytes `start..end` of a download as they arrive (`end` = `None`: to the end of the blob).
pub fn tail(
    joined: Joined,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct Tail {
        file: tokio::fs::File,
        state: watch::Receiver<FetchState>,
        pos: u64,
        end: Option<u64>,
        seeked: bool,
    }
    let tail = Tail {
        file: joined.file,
        state: joined.state,
        pos: start,
        end,
        seeked: start == 0,
    };
    futures::stream::unfold(tail, |mut t| async move {
        loop {
            if !t.seeked {
                if let Err(e) = t.file.seek(SeekFrom::Start(t.pos)).await {
                    return Some((Err(e), t));
                }
                t.seeked = true;
            }
            let snapshot = t.state.borrow_and_update().clone();
            let (readable, complete) = match &snapshot {
                FetchState::Connecting => (0, None),
                // Hold back the blob's last byte until the digest is verified.
                FetchState::Streaming { total, written, .. } => match total {
                    Some(total) => ((*written).min(total.saturating_sub(1)), None),
                    None => (written.saturating_sub(1), None),
                },
                FetchState::Done { total, .. } => (*total, Some(*total)),
                FetchState::Failed(e) => {
                    return Some((Err(std::io::Error::other(e.to_string())), t));
                }
            };
            let stop = t.end.or(complete);
            let limit = stop.map_or(readable, |s| readable.min(s));
            if t.pos < limit {
                let want = ((limit - t.pos) as usize).min(CHUNK);
                // Not zeroed: read_buf writes only into what it reports as filled.
                let mut buf = BytesMut::with_capacity(want);
                match t.file.read_buf(&mut (&mut buf).limit(want)).await {
                    Ok(0) => {
                        return Some((
                            Err(std::io::Error::other("download file shorter than reported")),
                            t,
                        ));
                    }
                    Ok(n) => {
                        t.pos += n as u64;
                        return Some((Ok(buf.freeze()), t));
                    }
                    Err(e) => return Some((Err(e), t)),
                }
            }
            // `stop` is known only for a range or a finished download.
            if stop.is_some_and(|s| t.pos >= s) {
                return None;
            }
            if t.state.changed().await.is_err() {
                return Some((Err(std::io::Error::other("download abandoned")), t));
            }
        }
    })
}

/// Serves a blob straight from an upstream without the disk tier (used when the disk cannot
/// take a download). The last chunk is held back until the digest checks out.
pub fn passthrough(
    response: reqwest::Response,
    digest: Digest,
    upstream: Upstream,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    struct Pass {
        body: futures::stream::BoxStream<'static, reqwest::Result<Bytes>>,
        verifier: larder_core::digest::Verifier,
        held: Option<Bytes>,
        digest: Digest,
        finished: bool,
    }
    let pass = Pass {
        verifier: digest.verifier(),
        body: response.bytes_stream().boxed(),
        held: None,
        digest,
        finished: false,
    };
    futures::stream::unfold(pass, move |mut p| async move {
        if p.finished {
            return None;
        }
        loop {
            match p.body.next().await {
                Some(Ok(chunk)) => {
                    p.verifier.update(&chunk);
                    if let Some(previous) = p.held.replace(chunk) {
                        return Some((Ok(previous), p));
                    }
                }
                Some(Err(e)) => {
                    p.finished = true;
                    let detail = crate::upstream::describe(&e);
                    return Some((
                        Err(std::io::Error::other(format!(
                            "{} broke: {detail}",
                            upstream.as_str()
                        ))),
                        p,
                    ));
                }
                None => {
                    p.finished = true;
                    let actual = p.verifier.clone().finish();
                    if actual != p.digest {
                        return Some((
                            Err(std::io::Error::other(format!(
                                "content hashes to {actual}, not {}",
                                p.digest
                            ))),
                            p,
                        ));
                    }
                    return p.held.take().map(|last| (Ok(last), p));
                }
            }
        }
    })
}
