//! The temp file a download writes into, in the disk tier's `tmp/` (moved out of `disk.rs`:
//! the download path and the store share it, and it is the one thing they share).

use std::io;
use std::path::{Path, PathBuf};

/// A file in `tmp/` being downloaded into. Deleted on drop unless committed.
#[derive(Debug)]
pub struct TempBlob {
    pub(crate) path: PathBuf,
    pub(crate) file: tokio::fs::File,
    /// Set by the store once the file is renamed into place; then drop leaves it alone.
    pub(crate) committed: bool,
}

impl TempBlob {
    /// Wraps a file just created at `path` (see [`crate::disk::DiskStore::create_temp`]).
    pub(crate) fn new(path: PathBuf, file: tokio::fs::File) -> Self {
        TempBlob {
            path,
            file,
            committed: false,
        }
    }

    /// A second, read-only descriptor of the file (its own descriptor is write-only): for
    /// reading back what the download wrote.
    pub fn reader(&self) -> io::Result<std::fs::File> {
        std::fs::File::open(&self.path)
    }

    /// Where the file is (other readers may open it to follow the download).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file, opened for writing. Flush it before committing.
    pub fn file(&mut self) -> &mut tokio::fs::File {
        &mut self.file
    }
}

impl Drop for TempBlob {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Open readers keep their descriptors (see the module docs).
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot delete an abandoned temp file");
        }
    }
}
