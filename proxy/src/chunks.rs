//! Reusable buffers for the chunks read from disk-tier files.
//!
//! Every chunk served from a file used to be a fresh 512 KiB allocation, freed on whichever
//! thread hyper dropped it. With the blocking pool's threads each owning a glibc arena, the
//! freed buffers stayed in those arenas: 16 concurrent warm pulls peaked at about twice the
//! RSS they peak at with a single arena. Buffers now come back here when the `Bytes` holding
//! them is dropped and are handed out again, so a steady stream of pulls allocates nothing and
//! never zeroes a buffer twice.

use std::sync::Mutex;

use bytes::Bytes;

/// Idle buffers kept for reuse; more than this are freed when returned. 32 × 512 KiB = 16 MiB
/// at most held while nothing is being served.
pub const MAX_IDLE: usize = 32;

/// Buffers of one fixed size, shared by the whole process.
#[derive(Debug)]
pub struct ChunkPool {
    size: usize,
    idle: Mutex<Vec<Vec<u8>>>,
}

impl ChunkPool {
    /// An empty pool of `size`-byte buffers.
    pub const fn new(size: usize) -> Self {
        Self {
            size,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Size of every buffer.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Buffers waiting for reuse.
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // The guarded Vec is valid after any panic (single push/pop).
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of [`Self::size`] bytes (contents unspecified: old data or zeroes).
    pub fn take(&'static self) -> Chunk {
        let buf = self.lock().pop().unwrap_or_else(|| vec![0u8; self.size]);
        Chunk {
            buf,
            len: 0,
            pool: self,
        }
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE && buf.len() == self.size {
            idle.push(buf);
        }
    }
}

/// A pooled buffer being filled; [`Chunk::freeze`] turns the filled part into `Bytes`.
#[derive(Debug)]
pub struct Chunk {
    buf: Vec<u8>,
    len: usize,
    pool: &'static ChunkPool,
}

impl Chunk {
    /// The whole buffer, to read into.
    pub fn space(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The first `len` bytes (at most the buffer's size) as `Bytes`; the buffer returns to the
    /// pool when the last clone of them is dropped.
    pub fn freeze(mut self, len: usize) -> Bytes {
        self.len = len.min(self.buf.len());
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_when_their_bytes_are_dropped_and_are_reused() {
        static POOL: ChunkPool = ChunkPool::new(8);
        let mut chunk = POOL.take();
        chunk.space()[..3].copy_from_slice(b"abc");
        let bytes = chunk.freeze(3);
        assert_eq!(&bytes[..], b"abc");
        let clone = bytes.slice(1..);
        drop(bytes);
        assert_eq!(POOL.idle(), 0, "a clone still holds the buffer");
        assert_eq!(&clone[..], b"bc");
        drop(clone);
        assert_eq!(POOL.idle(), 1);
        // Reused: the old contents are still there (never zeroed again).
        let mut again = POOL.take();
        assert_eq!(POOL.idle(), 0);
        assert_eq!(&again.space()[..3], b"abc");
        // A length past the buffer is clamped, never out of bounds.
        assert_eq!(again.freeze(100).len(), 8);
    }

    #[test]
    fn at_most_max_idle_buffers_are_kept() {
        static POOL: ChunkPool = ChunkPool::new(4);
        let held: Vec<Bytes> = (0..MAX_IDLE + 5).map(|_| POOL.take().freeze(4)).collect();
        drop(held);
        assert_eq!(POOL.idle(), MAX_IDLE);
    }
}
