//! Downloads in flight, as their readers see them: the progress of each ([`FetchState`]), the
//! registry that makes it one download per blob however many clients ask at once
//! ([`Fetches`]), and the streams a client is served from a download or a stored file.
//!
//! Every request for a blob being downloaded (the first one too) follows the download from the
//! first byte: what is already in the file is read from it, and the batch just received is
//! served from memory, so a client keeping up never waits for the disk and late joiners lose
//! nothing. A client that disconnects cancels nothing. The last byte of the blob is held back
//! from every reader until the digest is verified, so a corrupt download ends every client's
//! stream with an error instead of a wrong blob. The download itself is [`crate::download`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use larder_core::digest::{Digest, Verifier};
use tokio::sync::watch;

use crate::chunks::ChunkPool;
use crate::disk::DiskStore;
use crate::error::{ProxyError, Upstream};
use crate::metrics::Source;
use crate::temp_blob::TempBlob;

/// Bytes per read from a file being served (stored or still downloading).
pub const CHUNK: usize = 512 << 10;

/// Progress of one download, as readers see it.
#[derive(Debug, Clone)]
pub enum FetchState {
    /// Choosing and connecting to an upstream.
    Connecting,
    /// Bytes are arriving; `written` are in the file, and `received`, when present, is the
    /// batch that follows them, being written now. A ranged download also has `extents`: spans
    /// after `written` that are in the file too (for readers of a range).
    Streaming {
        source: Source,
        total: Option<u64>,
        written: u64,
        received: Option<Arc<Batch>>,
        extents: Option<Arc<Vec<(u64, u64)>>>,
    },
    /// Complete and verified.
    Done { source: Source, total: u64 },
    /// Abandoned; nothing was cached.
    Failed(ProxyError),
}

/// Bytes of a download that are in memory: received, not yet known to be in the file.
#[derive(Debug)]
pub struct Batch {
    /// Offset in the blob of the first piece.
    start: u64,
    pub(crate) pieces: Vec<Bytes>,
    len: u64,
}

impl Batch {
    pub(crate) fn new(start: u64, pieces: Vec<Bytes>) -> Self {
        let len = pieces.iter().map(|p| p.len() as u64).sum();
        Self { start, pieces, len }
    }

    fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The bytes from `pos` (inside this batch) to the end of their piece, at most `max` of
    /// them; a view of the received buffer, not a copy.
    fn slice_from(&self, pos: u64, max: usize) -> Option<Bytes> {
        let mut offset = pos.checked_sub(self.start)?;
        for piece in &self.pieces {
            let len = piece.len() as u64;
            if offset < len {
                let from = offset as usize;
                let to = piece.len().min(from.saturating_add(max));
                return (to > from).then(|| piece.slice(from..to));
            }
            offset -= len;
        }
        None
    }
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
    pub file: std::fs::File,
    pub state: watch::Receiver<FetchState>,
    /// True when this request joined a download another request started.
    pub coalesced: bool,
}

impl Fetches {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Inflight>> {
        // A panic while holding this lock leaves a consistent map (single inserts/removes).
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches to the download of `digest`; if none is in flight, registers one with a new
    /// temp file of `disk` and hands that file and the progress sender to `start` (which runs
    /// the download). Returns `Ok(None)` when the blob turned up on disk meanwhile (the caller
    /// serves it from there).
    pub async fn join(
        &self,
        disk: &DiskStore,
        digest: &Digest,
        start: impl FnOnce(TempBlob, watch::Sender<FetchState>),
    ) -> Result<Option<Joined>, ProxyError> {
        if let Some(joined) = self.attach(digest) {
            return Ok(Some(joined));
        }
        let temp = disk.create_temp().await?;
        let mut inflight = self.lock();
        if let Some(existing) = inflight.get(digest) {
            // Someone started the same download while we made our file: join theirs.
            if let Ok(file) = std::fs::File::open(&existing.path) {
                return Ok(Some(Joined {
                    file,
                    state: existing.state.clone(),
                    coalesced: true,
                }));
            }
            return Ok(None);
        }
        if disk.contains_blob(digest) {
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
        start(temp, tx);
        Ok(Some(Joined {
            file: reader,
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
            file,
            state: existing.state.clone(),
            coalesced: true,
        })
    }

    /// Forgets the download of `digest` (it is committed or failed).
    pub(crate) fn finish(&self, digest: &Digest) {
        self.lock().remove(digest);
    }
}

/// Chunks of a stored blob being read ahead of the one being sent: reading the next chunk
/// overlaps with sending this one, as sendfile's readahead would.
pub const READ_AHEAD: usize = 2;

/// The `len` bytes of a complete file from `start`, in chunks of [`CHUNK`], up to
/// [`READ_AHEAD`] of them read before the client asks (positional reads: no shared offset).
pub fn file_chunks(
    file: std::fs::File,
    start: u64,
    len: u64,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let file = Arc::new(file);
    let chunk = CHUNK as u64;
    let offsets = (0..len.div_ceil(chunk)).map(move |i| {
        let from = i * chunk;
        (start + from, (len - from).min(chunk) as usize)
    });
    futures::stream::iter(offsets)
        .map(move |(offset, want)| read_chunk_at(Arc::clone(&file), offset, want))
        .buffered(READ_AHEAD)
}

/// Buffers of [`CHUNK`] bytes for everything read from disk-tier files.
static FILE_CHUNKS: ChunkPool = ChunkPool::new(CHUNK);

/// Exactly `want` (at most [`CHUNK`]) bytes at `offset`, read on the blocking pool into a
/// pooled buffer; a file shorter than that is an error, never a silently short chunk.
async fn read_chunk_at(
    file: Arc<std::fs::File>,
    offset: u64,
    want: usize,
) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt as _;
    let want = want.min(FILE_CHUNKS.size());
    tokio::task::spawn_blocking(move || {
        let mut chunk = FILE_CHUNKS.take();
        file.read_exact_at(&mut chunk.space()[..want], offset)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    std::io::Error::new(e.kind(), "file shorter than the blob's recorded size")
                } else {
                    e
                }
            })?;
        Ok(chunk.freeze(want))
    })
    .await
    .map_err(std::io::Error::other)?
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
        file: Arc<std::fs::File>,
        state: watch::Receiver<FetchState>,
        pos: u64,
        end: Option<u64>,
    }
    let tail = Tail {
        file: Arc::new(joined.file),
        state: joined.state,
        pos: start,
        end,
    };
    futures::stream::unfold(tail, |mut t| async move {
        loop {
            let next = next_step(&t.state.borrow_and_update(), t.pos, t.end);
            let chunk = match next {
                Next::Send(bytes) => Ok(bytes),
                Next::Read(want) => read_chunk_at(Arc::clone(&t.file), t.pos, want).await,
                Next::End => return None,
                Next::Fail(e) => Err(e),
                Next::Wait => {
                    if t.state.changed().await.is_err() {
                        return Some((Err(std::io::Error::other("download abandoned")), t));
                    }
                    continue;
                }
            };
            if let Ok(bytes) = &chunk {
                t.pos += bytes.len() as u64;
            }
            return Some((chunk, t));
        }
    })
}

/// What a reader of a download does next.
#[derive(Debug)]
enum Next {
    /// Send these bytes, received and not yet in the file.
    Send(Bytes),
    /// Read this many bytes from the file.
    Read(usize),
    /// Wait for more of the download.
    Wait,
    /// The bytes asked for have all been sent.
    End,
    Fail(std::io::Error),
}

/// The next step of a reader at `pos` that wants the bytes up to `end` (`None`: to the end of
/// the blob), given the download's progress.
fn next_step(state: &FetchState, pos: u64, end: Option<u64>) -> Next {
    let (in_file, batch, arrived, complete) = match state {
        FetchState::Connecting => (0, None, 0, None),
        FetchState::Streaming {
            total,
            written,
            received,
            extents,
            ..
        } => {
            // A range reader past the prefix of a ranged download: its bytes may be written
            // already, by another connection (the last byte still waits for the digest).
            if let (Some(end), Some(extents), Some(total)) = (end, extents, total)
                && pos >= *written
                && pos < end
                && let Some(&(_, span_end)) = extents.iter().find(|&&(s, e)| s <= pos && pos < e)
            {
                let limit = span_end.min(end).min(total.saturating_sub(1));
                if pos < limit {
                    return Next::Read((limit - pos).min(CHUNK as u64) as usize);
                }
            }
            let arrived = received
                .as_deref()
                .map_or(*written, Batch::end)
                .max(*written);
            // Hold back the blob's last byte until the digest is verified.
            let arrived = match total {
                Some(total) => arrived.min(total.saturating_sub(1)),
                None => arrived.saturating_sub(1),
            };
            (*written, received.as_deref(), arrived, None)
        }
        FetchState::Done { total, .. } => (*total, None, *total, Some(*total)),
        FetchState::Failed(e) => return Next::Fail(std::io::Error::other(e.to_string())),
    };
    // `stop` is known only for a range or a finished download.
    let stop = end.or(complete);
    let limit = stop.map_or(arrived, |s| arrived.min(s));
    if pos < limit {
        let want = (limit - pos).min(CHUNK as u64);
        if pos < in_file {
            return Next::Read(want.min(in_file - pos) as usize);
        }
        if let Some(bytes) = batch.and_then(|b| b.slice_from(pos, want as usize)) {
            return Next::Send(bytes);
        }
    }
    if stop.is_some_and(|s| pos >= s) {
        return Next::End;
    }
    Next::Wait
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
        verifier: Verifier,
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn streaming(total: Option<u64>, written: u64, batch: Option<(u64, &[&[u8]])>) -> FetchState {
        FetchState::Streaming {
            source: Source::origin,
            total,
            written,
            received: batch.map(|(start, pieces)| {
                let pieces = pieces.iter().map(|p| Bytes::copy_from_slice(p)).collect();
                Arc::new(Batch::new(start, pieces))
            }),
            extents: None,
        }
    }

    fn sent(next: Next) -> Vec<u8> {
        match next {
            Next::Send(bytes) => bytes.to_vec(),
            other => panic!("expected bytes from memory, got {other:?}"),
        }
    }

    #[test]
    fn readers_take_the_file_up_to_what_is_written_and_the_received_batch_from_memory() {
        // 4 bytes in the file, the next 6 received in two pieces, 12 in all.
        let state = streaming(Some(12), 4, Some((4, &[b"abc", b"def"])));
        // Behind the batch: the file, never past what is written.
        assert!(matches!(next_step(&state, 0, None), Next::Read(4)));
        assert!(matches!(next_step(&state, 3, None), Next::Read(1)));
        // In the batch: a view of the piece holding `pos`, to that piece's end.
        assert_eq!(sent(next_step(&state, 4, None)), b"abc");
        assert_eq!(sent(next_step(&state, 5, None)), b"bc");
        assert_eq!(sent(next_step(&state, 7, None)), b"def");
        // A range ends inside the batch: not one byte more.
        assert_eq!(sent(next_step(&state, 7, Some(8))), b"d");
        assert!(matches!(next_step(&state, 8, Some(8)), Next::End));
        // Past what has arrived: wait.
        assert!(matches!(next_step(&state, 10, None), Next::Wait));
    }

    #[test]
    fn the_last_byte_waits_for_the_digest_whether_in_memory_or_on_disk() {
        // All 6 bytes arrived; the last is held back until Done.
        let state = streaming(Some(6), 0, Some((0, &[b"abcdef"])));
        assert_eq!(sent(next_step(&state, 0, None)), b"abcde");
        assert!(matches!(next_step(&state, 5, None), Next::Wait));
        let state = streaming(Some(6), 6, None);
        assert!(matches!(next_step(&state, 0, None), Next::Read(5)));
        assert!(matches!(next_step(&state, 5, None), Next::Wait));
        // Length unknown: the last byte seen so far could be the blob's last.
        let state = streaming(None, 2, Some((2, &[b"cd"])));
        assert_eq!(sent(next_step(&state, 2, None)), b"c");
        assert!(matches!(next_step(&state, 3, None), Next::Wait));
        // Verified: the rest comes from the file, then the stream ends.
        let done = FetchState::Done {
            source: Source::origin,
            total: 6,
        };
        assert!(matches!(next_step(&done, 5, None), Next::Read(1)));
        assert!(matches!(next_step(&done, 6, None), Next::End));
        let failed = FetchState::Failed(ProxyError::Disk("full".into()));
        assert!(matches!(next_step(&failed, 0, None), Next::Fail(_)));
        assert!(matches!(
            next_step(&FetchState::Connecting, 0, None),
            Next::Wait
        ));
    }

    #[test]
    fn range_readers_take_spans_written_beyond_the_prefix_and_in_order_readers_do_not() {
        let state = FetchState::Streaming {
            source: Source::origin,
            total: Some(100),
            written: 10,
            received: None,
            extents: Some(Arc::new(vec![(40, 60), (80, 100)])),
        };
        // A range inside a written span: read now.
        assert!(matches!(next_step(&state, 45, Some(50)), Next::Read(5)));
        // Up to the span's end only; then wait for the gap.
        assert!(matches!(next_step(&state, 50, Some(70)), Next::Read(10)));
        assert!(matches!(next_step(&state, 60, Some(70)), Next::Wait));
        // In a gap: wait.
        assert!(matches!(next_step(&state, 20, Some(30)), Next::Wait));
        // The blob's last byte waits for the digest, even when written.
        assert!(matches!(next_step(&state, 90, Some(100)), Next::Read(9)));
        assert!(matches!(next_step(&state, 99, Some(100)), Next::Wait));
        // Readers of the whole blob follow the prefix only.
        assert!(matches!(next_step(&state, 10, None), Next::Wait));
        assert!(matches!(next_step(&state, 5, None), Next::Read(5)));
    }

    #[test]
    fn file_reads_are_at_most_one_chunk() {
        let state = streaming(Some(10 * CHUNK as u64), 3 * CHUNK as u64, None);
        assert!(matches!(next_step(&state, 1, None), Next::Read(n) if n == CHUNK));
    }

    #[tokio::test]
    async fn file_chunks_serves_exactly_the_range_asked_and_fails_on_a_short_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = pattern(CHUNK * 2 + 123, 7);
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        for (start, len) in [
            (0u64, data.len() as u64),
            (1, 10),
            (CHUNK as u64 - 1, CHUNK as u64 + 2),
            (5, 0),
        ] {
            let chunks: Vec<Bytes> = file_chunks(std::fs::File::open(&path).unwrap(), start, len)
                .map(|c| c.unwrap())
                .collect()
                .await;
            assert!(chunks.iter().all(|c| c.len() <= CHUNK));
            let got: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            let (s, e) = (start as usize, (start + len) as usize);
            assert_eq!(got, data[s..e], "range {start}+{len}");
        }
        // Asking for more than the file holds is an error, not a silently short body.
        let results: Vec<_> = file_chunks(
            std::fs::File::open(&path).unwrap(),
            0,
            data.len() as u64 + 1,
        )
        .collect()
        .await;
        let last = results.last().unwrap();
        assert_eq!(
            last.as_ref().unwrap_err().kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        assert!(results[..results.len() - 1].iter().all(Result::is_ok));
    }
}
