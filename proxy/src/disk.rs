//! The disk tier: a bounded, content-addressed store of verified blobs and manifests, plus the
//! digest each tag last resolved to (for serving a tag while its origin is down).
//!
//! Layout under the root directory:
//!
//! - `blobs/<alg>/<hex>`: complete blobs whose digest the caller verified while streaming.
//! - `manifests/<alg>/<hex>` and `manifests/<alg>/<hex>.type` (its media type). The type is
//!   renamed into place before the data and removed after it, so a data file always has a type.
//! - `tags/<registry>/<repository>/_tags/<tag>`: `<digest>\n`. Tag files live in a `_tags`
//!   directory of their repository because a tag and a deeper repository may share a name
//!   (`app:dev` and `app/dev:v1`); repository components never start with `_`, so `_tags`
//!   cannot clash. Tag files are tiny and are neither counted against the limit nor evicted.
//! - `tmp/`: files being written; emptied at open (leftovers of a crash).
//!
//! Invariants:
//!
//! - A file under `blobs/` or `manifests/` is complete. Everything is written in `tmp/` and
//!   renamed into place (atomic on one filesystem). Blobs are fsynced before the rename, so even
//!   a power loss cannot leave a short blob under a digest name; manifests are small and are
//!   re-verified on every read instead.
//! - The in-memory index and the files agree: every change to the set of stored files happens
//!   with [`DiskStore::mutate`] held, and the index is updated in the same critical section.
//!   Only content bytes are counted (not the per-file block overhead nor tag and type files).
//! - Deleting a file another task is reading is fine: on Linux (any Unix) an open descriptor
//!   keeps the inode alive until it is closed, so a reader of an evicted blob finishes normally
//!   and the space is freed when it closes the file.
//!
//! The in-memory index and its eviction plan are `disk/index.rs`; rebuilding it from the files at
//! open is `disk/scan.rs`.

mod index;
mod scan;

pub use crate::temp_blob::TempBlob;
pub use index::{Key, low_water, plan_eviction};

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use larder_core::digest::{Algorithm, Digest};
use tokio::io::AsyncWriteExt as _;

use index::Index;

/// Algorithms with a directory under `blobs/` and `manifests/`.
const ALGORITHMS: [Algorithm; 2] = [Algorithm::Sha256, Algorithm::Sha512];
/// Suffix of the file holding a manifest's media type.
const TYPE_SUFFIX: &str = ".type";
/// Directory of a repository holding its tag files (see the module docs).
const TAGS_DIR: &str = "_tags";
/// Longest tag the distribution spec allows.
const TAG_MAX: usize = 128;

/// What went wrong in the disk tier, and on which path.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A filesystem operation failed: our disk is full, read-only, unreadable or misconfigured.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The caller handed content that does not hash to its digest (upstream's or caller's
    /// fault). Nothing was stored.
    #[error("refusing to store {digest}: the content hashes to {actual}")]
    DigestMismatch { digest: Digest, actual: Digest },
    /// The caller committed a temp file whose length differs from the size it announced (a
    /// caller bug). Nothing was stored.
    #[error(
        "refusing to store blob {digest}: {} holds {actual} bytes, not the {expected} announced",
        path.display()
    )]
    SizeMismatch {
        digest: Digest,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// A manifest media type that cannot be stored and served back as a header (caller's fault).
    #[error(
        "refusing media type {media_type:?} for manifest {digest}: must be non-empty printable ASCII"
    )]
    BadMediaType { digest: Digest, media_type: String },
    /// A tag location that would not be one plain path below `tags/` (caller's fault).
    #[error("refusing tag {registry}/{repository}:{tag}: {why}")]
    BadTagPath {
        registry: String,
        repository: String,
        tag: String,
        why: &'static str,
    },
    /// A blocking filesystem task panicked or was cancelled by runtime shutdown.
    #[error("a disk task did not finish: {0}")]
    Task(String),
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DiskError + use<> {
    let path = path.to_path_buf();
    move |source| DiskError::Io { op, path, source }
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskStats {
    /// Content bytes stored (blobs and manifests).
    pub used_bytes: u64,
    /// The configured limit.
    pub max_bytes: u64,
    /// Blobs stored.
    pub blobs: u64,
    /// Manifests stored.
    pub manifests: u64,
    /// Entries evicted since open (at open too, when the limit shrank).
    pub evictions: u64,
}

/// The disk tier. Share it as `Arc<DiskStore>` (or inside a shared state); all methods take
/// `&self`.
pub struct DiskStore {
    root: PathBuf,
    max_bytes: u64,
    /// Never held across an `.await`.
    index: Mutex<Index>,
    /// Held while files enter or leave `blobs/` and `manifests/`, with the matching index
    /// update, so the index and the files never disagree (e.g. an eviction deleting a file a
    /// concurrent commit of the same digest just put back).
    mutate: tokio::sync::Mutex<()>,
}

impl fmt::Debug for DiskStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stats = self.stats();
        f.debug_struct("DiskStore")
            .field("root", &self.root)
            .field("stats", &stats)
            .finish()
    }
}

impl DiskStore {
    /// Opens (creating what is missing) the store at `root`: empties `tmp/`, deletes anything
    /// in the content directories that is not a well-formed entry, indexes the rest with last
    /// use from file mtimes, and evicts down to the limit if the content is over it.
    pub async fn open(root: PathBuf, max_bytes: u64) -> Result<Self, DiskError> {
        let scan_root = root.clone();
        let index = blocking(move || scan::scan(&scan_root, max_bytes)).await??;
        tracing::info!(
            root = %root.display(),
            used_bytes = index.used,
            max_bytes,
            blobs = index.blobs,
            manifests = index.manifests,
            evicted = index.evictions,
            "disk tier opened"
        );
        Ok(DiskStore {
            root,
            max_bytes,
            index: Mutex::new(index),
            mutate: tokio::sync::Mutex::new(()),
        })
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // Every critical section leaves the index consistent (plain field updates, saturating
        // arithmetic, no calls that panic), so a poisoned lock still holds a valid index.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The byte limit.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Content bytes stored now.
    pub fn used_bytes(&self) -> u64 {
        self.index().used
    }

    /// Entries evicted since open.
    pub fn evictions(&self) -> u64 {
        self.index().evictions
    }

    /// Everything for metrics at once.
    pub fn stats(&self) -> DiskStats {
        let index = self.index();
        DiskStats {
            used_bytes: index.used,
            max_bytes: self.max_bytes,
            blobs: index.blobs,
            manifests: index.manifests,
            evictions: index.evictions,
        }
    }

    /// Whether a complete blob is stored (does not mark it used).
    pub fn contains_blob(&self, digest: &Digest) -> bool {
        self.index().contains(&Key::Blob(digest.clone()))
    }

    /// Marks a stored blob used without reading it; whether it is stored. The node agent calls
    /// this for precached images so the LRU keeps them while their NodeCache asks for them.
    pub async fn touch_blob(&self, digest: &Digest) -> bool {
        let Some((_, persist)) = self
            .index()
            .touch(&Key::Blob(digest.clone()), Instant::now())
        else {
            return false;
        };
        if persist {
            // The mtime carries the LRU order across restarts, as for blobs that are read.
            let path = self.blob_path(digest);
            let _ = blocking(move || {
                if let Ok(file) = std::fs::File::open(&path) {
                    record_use(&file, &path);
                }
            })
            .await;
        }
        true
    }

    /// Opens a stored blob and marks it used: the file at offset 0 and its size.
    ///
    /// The file stays readable to its end even if the blob is evicted meanwhile.
    pub async fn open_blob(
        &self,
        digest: &Digest,
    ) -> Result<Option<(tokio::fs::File, u64)>, DiskError> {
        let key = Key::Blob(digest.clone());
        let Some((indexed, persist)) = self.index().touch(&key, Instant::now()) else {
            return Ok(None);
        };
        let path = self.blob_path(digest);
        let open_path = path.clone();
        let opened = blocking(move || -> io::Result<(std::fs::File, u64)> {
            let file = std::fs::File::open(&open_path)?;
            let size = file.metadata()?.len();
            if persist {
                record_use(&file, &open_path);
            }
            Ok((file, size))
        })
        .await?;
        match opened {
            Ok((file, size)) if size == indexed => {
                Ok(Some((tokio::fs::File::from_std(file), size)))
            }
            Ok((_, size)) => {
                tracing::warn!(%digest, path = %path.display(), size, indexed,
                    "a stored blob changed size behind our back; removing it");
                self.discard(&key).await;
                Ok(None)
            }
            // Evicted between the index check and the open, or deleted by someone else.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.discard_if_missing(&key, &path).await;
                Ok(None)
            }
            Err(source) => Err(DiskError::Io {
                op: "open blob",
                path,
                source,
            }),
        }
    }

    /// A stored manifest and its media type, marked used. The bytes are verified against the
    /// digest on every read: a file that no longer matches (bit rot, a torn write after a power
    /// loss) is deleted and reported as absent.
    pub async fn read_manifest(
        &self,
        digest: &Digest,
    ) -> Result<Option<(Bytes, String)>, DiskError> {
        let key = Key::Manifest(digest.clone());
        let Some((_, persist)) = self.index().touch(&key, Instant::now()) else {
            return Ok(None);
        };
        let data_path = self.manifest_path(digest);
        let bytes = match tokio::fs::read(&data_path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.discard_if_missing(&key, &data_path).await;
                return Ok(None);
            }
            Err(source) => {
                return Err(DiskError::Io {
                    op: "read manifest",
                    path: data_path,
                    source,
                });
            }
        };
        let type_path = self.manifest_type_path(digest);
        let media_type = match tokio::fs::read(&type_path).await {
            Ok(raw) => String::from_utf8(raw).ok().filter(|t| valid_media_type(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(DiskError::Io {
                    op: "read manifest media type",
                    path: type_path,
                    source,
                });
            }
        };
        let Some(media_type) = media_type else {
            tracing::warn!(%digest, path = %type_path.display(),
                "stored manifest has a missing or unreadable media type; removing it");
            self.discard(&key).await;
            return Ok(None);
        };
        let mut verifier = digest.verifier();
        verifier.update(&bytes);
        let actual = verifier.finish();
        if &actual != digest {
            tracing::warn!(%digest, %actual, path = %data_path.display(),
                "stored manifest no longer matches its digest (disk corruption); removing it");
            self.discard(&key).await;
            return Ok(None);
        }
        if persist {
            let touch_path = data_path.clone();
            // Best effort: a failure only makes the next restart's LRU order less precise.
            let _ = blocking(move || {
                if let Ok(file) = std::fs::File::open(&touch_path) {
                    record_use(&file, &touch_path);
                }
            })
            .await;
        }
        Ok(Some((Bytes::from(bytes), media_type)))
    }

    /// Stores a manifest after checking that `bytes` hash to `digest`. Storing one that is
    /// already there only marks it used (the first media type stays).
    pub async fn put_manifest(
        &self,
        digest: &Digest,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<(), DiskError> {
        let mut verifier = digest.verifier();
        verifier.update(bytes);
        let actual = verifier.finish();
        if &actual != digest {
            return Err(DiskError::DigestMismatch {
                digest: digest.clone(),
                actual,
            });
        }
        if !valid_media_type(media_type) {
            return Err(DiskError::BadMediaType {
                digest: digest.clone(),
                media_type: media_type.to_owned(),
            });
        }
        let size = bytes.len() as u64;
        if size > self.max_bytes {
            tracing::debug!(%digest, size, max_bytes = self.max_bytes, "manifest larger than the disk tier; not kept");
            return Ok(());
        }
        let key = Key::Manifest(digest.clone());
        let _mutating = self.mutate.lock().await;
        if self.index().touch(&key, Instant::now()).is_some() {
            return Ok(());
        }
        self.evict_for(size).await;
        let type_path = self.manifest_type_path(digest);
        let data_path = self.manifest_path(digest);
        // Type first: a data file always has its type.
        self.write_atomic(&type_path, media_type.as_bytes()).await?;
        if let Err(err) = self.write_atomic(&data_path, bytes).await {
            remove_quietly(&type_path).await;
            return Err(err);
        }
        self.index().insert(key, size, Instant::now());
        Ok(())
    }

    /// The digest a tag last resolved to, if recorded. An unreadable record counts as none
    /// (and is removed).
    pub async fn get_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
    ) -> Result<Option<Digest>, DiskError> {
        let path = self.tag_path(registry, repository, tag)?;
        let raw = match tokio::fs::read(&path).await {
            Ok(raw) => raw,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(source) => {
                return Err(DiskError::Io {
                    op: "read tag",
                    path,
                    source,
                });
            }
        };
        match std::str::from_utf8(&raw)
            .ok()
            .map(|s| Digest::parse(s.trim()))
        {
            Some(Ok(digest)) => Ok(Some(digest)),
            _ => {
                tracing::warn!(path = %path.display(), "stored tag record is unreadable; removing it");
                remove_quietly(&path).await;
                Ok(None)
            }
        }
    }

    /// Records the digest a tag resolved to (atomically: readers see the old or the new one).
    pub async fn put_tag(
        &self,
        registry: &str,
        repository: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<(), DiskError> {
        let path = self.tag_path(registry, repository, tag)?;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io_error("create tag directory", parent))?;
        }
        self.write_atomic(&path, format!("{digest}\n").as_bytes())
            .await
    }

    /// A new, uniquely named, empty file in `tmp/` to download into. Deleted when dropped
    /// unless [`DiskStore::commit_blob`] took it.
    pub async fn create_temp(&self) -> Result<TempBlob, DiskError> {
        let tmp = self.root.join("tmp");
        let mut last_error = None;
        // 128 random bits: a collision means something else is writing here; retry a little.
        for _ in 0..4 {
            let path = tmp.join(format!("{:032x}.part", rand::random::<u128>()));
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
            {
                Ok(file) => {
                    return Ok(TempBlob::new(path, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(source) => {
                    return Err(DiskError::Io {
                        op: "create temp file",
                        path,
                        source,
                    });
                }
            }
        }
        Err(DiskError::Io {
            op: "create a uniquely named temp file in",
            path: tmp,
            source: last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
        })
    }

    /// Keeps a downloaded blob. The caller has verified its digest while streaming and written
    /// exactly `size` bytes (checked here). The file is fsynced, then renamed into `blobs/`,
    /// evicting least recently used content first if needed.
    ///
    /// Why fsync: the rename is atomic but not ordered with the data on most filesystems, so a
    /// power loss could otherwise leave a short or zeroed file under the digest's name, and
    /// blobs are too large to re-verify on every read. Most of the data is usually written back
    /// already; what remains costs one flush per blob, outside all locks.
    ///
    /// A blob already stored is only marked used (the duplicate is deleted). A blob larger than
    /// the whole store is not kept, which is not an error.
    pub async fn commit_blob(
        &self,
        mut temp: TempBlob,
        digest: &Digest,
        size: u64,
    ) -> Result<(), DiskError> {
        if size > self.max_bytes {
            tracing::debug!(%digest, size, max_bytes = self.max_bytes, "blob larger than the disk tier; not kept");
            return Ok(());
        }
        let key = Key::Blob(digest.clone());
        if self.index().touch(&key, Instant::now()).is_some() {
            tracing::debug!(%digest, "blob already on disk; dropping the duplicate download");
            return Ok(());
        }
        temp.file
            .sync_data()
            .await
            .map_err(io_error("sync temp file", &temp.path))?;
        let actual = temp
            .file
            .metadata()
            .await
            .map_err(io_error("stat temp file", &temp.path))?
            .len();
        if actual != size {
            return Err(DiskError::SizeMismatch {
                digest: digest.clone(),
                path: temp.path.clone(),
                expected: size,
                actual,
            });
        }
        let _mutating = self.mutate.lock().await;
        // A concurrent commit of the same digest may have won while we synced.
        if self.index().touch(&key, Instant::now()).is_some() {
            return Ok(());
        }
        self.evict_for(size).await;
        let dest = self.blob_path(digest);
        tokio::fs::rename(&temp.path, &dest)
            .await
            .map_err(io_error("move a verified blob into", &dest))?;
        temp.committed = true;
        self.index().insert(key, size, Instant::now());
        Ok(())
    }

    /// Evicts what [`plan_eviction`] says to make room for `incoming` bytes. The caller holds
    /// `mutate`.
    async fn evict_for(&self, incoming: u64) {
        let victims = self.index().take_victims(self.max_bytes, incoming);
        for (key, size) in victims {
            tracing::debug!(?key, size, "evicting least recently used content");
            self.remove_files(&key).await;
        }
    }

    /// Forgets an entry and deletes its files (corrupt, or gone behind our back).
    async fn discard(&self, key: &Key) {
        let _mutating = self.mutate.lock().await;
        self.index().remove(key);
        self.remove_files(key).await;
    }

    /// Forgets an entry whose file was not found, unless a concurrent commit has put it back.
    async fn discard_if_missing(&self, key: &Key, path: &Path) {
        let _mutating = self.mutate.lock().await;
        if matches!(tokio::fs::try_exists(path).await, Ok(false)) {
            self.index().remove(key);
            self.remove_files(key).await;
        }
    }

    async fn remove_files(&self, key: &Key) {
        match key {
            Key::Blob(digest) => remove_quietly(&self.blob_path(digest)).await,
            Key::Manifest(digest) => {
                // Data first: a data file never outlives its type.
                remove_quietly(&self.manifest_path(digest)).await;
                remove_quietly(&self.manifest_type_path(digest)).await;
            }
        }
    }

    /// Writes `contents` to a temp file and renames it to `dest`.
    async fn write_atomic(&self, dest: &Path, contents: &[u8]) -> Result<(), DiskError> {
        let mut temp = self.create_temp().await?;
        temp.file
            .write_all(contents)
            .await
            .map_err(io_error("write temp file", &temp.path))?;
        // Completes the write before the rename (tokio writes in the background).
        temp.file
            .flush()
            .await
            .map_err(io_error("write temp file", &temp.path))?;
        tokio::fs::rename(&temp.path, dest)
            .await
            .map_err(io_error("rename a temp file to", dest))?;
        temp.committed = true;
        Ok(())
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        content_path(&self.root, "blobs", digest)
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        content_path(&self.root, "manifests", digest)
    }

    fn manifest_type_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("manifests")
            .join(digest.algorithm().as_str())
            .join(format!("{}{TYPE_SUFFIX}", digest.hex()))
    }

    fn tag_path(&self, registry: &str, repository: &str, tag: &str) -> Result<PathBuf, DiskError> {
        let refuse = |why| DiskError::BadTagPath {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            why,
        };
        if !plain_component(registry) {
            return Err(refuse("the registry must be one plain path component"));
        }
        if repository.is_empty() || repository.starts_with('/') {
            return Err(refuse("the repository must be a non-empty relative path"));
        }
        let components: Vec<&str> = repository.split('/').collect();
        if components
            .iter()
            .any(|c| !plain_component(c) || *c == TAGS_DIR)
        {
            return Err(refuse(
                "the repository has an empty, `.`, `..`, `_tags` or otherwise unusable component",
            ));
        }
        if !valid_tag(tag) {
            return Err(refuse(
                "the tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
            ));
        }
        let mut path = self.root.join("tags").join(registry);
        path.extend(components);
        path.push(TAGS_DIR);
        path.push(tag);
        Ok(path)
    }
}

fn content_path(root: &Path, kind: &str, digest: &Digest) -> PathBuf {
    root.join(kind)
        .join(digest.algorithm().as_str())
        .join(digest.hex())
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DiskError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DiskError::Task(e.to_string()))
}

async fn remove_quietly(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != io::ErrorKind::NotFound
    {
        // The index no longer counts it; the next open's scan will find it again.
        tracing::warn!(path = %path.display(), error = %e, "cannot delete a file of the disk tier");
    }
}

fn remove_quietly_sync(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot delete a file of the disk tier");
    }
}

/// Writes last use into the file's mtime, which the next open orders by.
fn record_use(file: &std::fs::File, path: &Path) {
    // Explicit times need only ownership, not write access, so a read-only handle works.
    if let Err(e) = file.set_modified(SystemTime::now()) {
        tracing::debug!(path = %path.display(), error = %e, "cannot record last use in mtime");
    }
}

fn valid_media_type(media_type: &str) -> bool {
    !media_type.is_empty()
        && media_type.len() <= 255
        && media_type
            .bytes()
            .all(|b| b.is_ascii_graphic() || b == b' ')
}

fn plain_component(c: &str) -> bool {
    !c.is_empty() && c.len() <= 255 && c != "." && c != ".." && !c.contains(['/', '\\', '\0'])
}

fn valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    first_ok
        && tag.len() <= TAG_MAX
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::AsyncReadExt as _;

    use larder_core::digest::Verifier;

    use super::*;

    const MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";

    async fn open(dir: &Path, max: u64) -> DiskStore {
        DiskStore::open(dir.to_path_buf(), max).await.unwrap()
    }

    async fn put_blob(store: &DiskStore, bytes: &[u8]) -> Digest {
        let digest = Digest::sha256_of(bytes);
        let mut temp = store.create_temp().await.unwrap();
        temp.file().write_all(bytes).await.unwrap();
        temp.file().flush().await.unwrap();
        store
            .commit_blob(temp, &digest, bytes.len() as u64)
            .await
            .unwrap();
        digest
    }

    async fn read_blob(store: &DiskStore, digest: &Digest) -> Option<Vec<u8>> {
        let (mut file, size) = store.open_blob(digest).await.unwrap()?;
        let mut out = Vec::new();
        file.read_to_end(&mut out).await.unwrap();
        assert_eq!(out.len() as u64, size);
        Some(out)
    }

    fn count_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    fn manifest(n: u32) -> Vec<u8> {
        format!(r#"{{"schemaVersion":2,"mediaType":"{MEDIA}","n":{n}}}"#).into_bytes()
    }

    #[test]
    fn tag_and_component_validation() {
        assert!(valid_tag("latest"));
        assert!(valid_tag("_x.1-rc"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".hidden"));
        assert!(!valid_tag("-x"));
        assert!(!valid_tag("a/b"));
        assert!(!valid_tag(""));
        assert!(!plain_component(".."));
        assert!(!plain_component("a\\b"));
        assert!(plain_component("registry_5000"));
    }

    #[tokio::test]
    async fn manifest_round_trip_keeps_media_type() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let bytes = manifest(1);
        let digest = Digest::sha256_of(&bytes);
        assert!(store.read_manifest(&digest).await.unwrap().is_none());
        store.put_manifest(&digest, &bytes, MEDIA).await.unwrap();
        let (read, media_type) = store.read_manifest(&digest).await.unwrap().unwrap();
        assert_eq!(&read[..], &bytes[..]);
        assert_eq!(media_type, MEDIA);
        assert_eq!(store.used_bytes(), bytes.len() as u64);
        // Storing it again counts it once.
        store.put_manifest(&digest, &bytes, MEDIA).await.unwrap();
        assert_eq!(store.used_bytes(), bytes.len() as u64);
        assert_eq!(store.stats().manifests, 1);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
    }

    #[tokio::test]
    async fn manifest_that_does_not_match_its_digest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let digest = Digest::sha256_of(&manifest(1));
        let err = store
            .put_manifest(&digest, &manifest(2), MEDIA)
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        assert!(store.read_manifest(&digest).await.unwrap().is_none());
        assert_eq!(store.used_bytes(), 0);
        assert_eq!(count_files(&dir.path().join("manifests/sha256")), 0);

        let bytes = manifest(3);
        let err = store
            .put_manifest(&Digest::sha256_of(&bytes), &bytes, "bad\ntype")
            .await
            .unwrap_err();
        assert!(matches!(err, DiskError::BadMediaType { .. }), "{err}");
    }

    #[tokio::test]
    async fn corrupted_manifest_on_disk_is_detected_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let bytes = manifest(1);
        let digest = Digest::sha256_of(&bytes);
        store.put_manifest(&digest, &bytes, MEDIA).await.unwrap();
        let path = dir.path().join("manifests/sha256").join(digest.hex());
        let mut rotten = bytes.clone();
        rotten[5] ^= 0x20;
        std::fs::write(&path, &rotten).unwrap();

        assert!(store.read_manifest(&digest).await.unwrap().is_none());
        assert!(!path.exists());
        assert!(
            !dir.path()
                .join(format!("manifests/sha256/{}.type", digest.hex()))
                .exists()
        );
        assert_eq!(store.used_bytes(), 0);
        // And it can be stored again.
        store.put_manifest(&digest, &bytes, MEDIA).await.unwrap();
        assert!(store.read_manifest(&digest).await.unwrap().is_some());

        // A lost media type is corruption too.
        std::fs::remove_file(
            dir.path()
                .join(format!("manifests/sha256/{}.type", digest.hex())),
        )
        .unwrap();
        assert!(store.read_manifest(&digest).await.unwrap().is_none());
        assert!(!path.exists());
        assert_eq!(store.stats().manifests, 0);
    }

    #[tokio::test]
    async fn committed_blob_opens_with_exact_bytes_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let digest = put_blob(&store, &bytes).await;
        assert!(store.contains_blob(&digest));
        assert_eq!(read_blob(&store, &digest).await.unwrap(), bytes);
        assert_eq!(store.used_bytes(), bytes.len() as u64);
        assert_eq!(store.stats().blobs, 1);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
        assert!(dir.path().join("blobs/sha256").join(digest.hex()).is_file());

        // sha512 blobs live beside them.
        let mut verifier = Verifier::new(Algorithm::Sha512);
        verifier.update(b"five twelve");
        let d512 = verifier.finish();
        let mut temp = store.create_temp().await.unwrap();
        temp.file().write_all(b"five twelve").await.unwrap();
        temp.file().flush().await.unwrap();
        store.commit_blob(temp, &d512, 11).await.unwrap();
        assert_eq!(read_blob(&store, &d512).await.unwrap(), b"five twelve");
        assert!(dir.path().join("blobs/sha512").join(d512.hex()).is_file());

        let missing = Digest::sha256_of(b"absent");
        assert!(!store.contains_blob(&missing));
        assert!(store.open_blob(&missing).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn commit_with_the_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let digest = Digest::sha256_of(b"abc");
        let mut temp = store.create_temp().await.unwrap();
        temp.file().write_all(b"abc").await.unwrap();
        temp.file().flush().await.unwrap();
        let err = store.commit_blob(temp, &digest, 4).await.unwrap_err();
        assert!(
            matches!(
                err,
                DiskError::SizeMismatch {
                    actual: 3,
                    expected: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!store.contains_blob(&digest));
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
    }

    #[tokio::test]
    async fn uncommitted_temp_files_vanish_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let mut temp = store.create_temp().await.unwrap();
        let other = store.create_temp().await.unwrap();
        assert_ne!(temp.path(), other.path());
        temp.file().write_all(b"partial").await.unwrap();
        temp.file().flush().await.unwrap();
        let path = temp.path().to_path_buf();
        assert!(path.starts_with(dir.path().join("tmp")));
        assert!(path.exists());
        drop(temp);
        drop(other);
        assert!(!path.exists());
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
    }

    #[tokio::test]
    async fn reopen_restores_the_index_and_removes_leftovers_and_junk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (blob, man, man_bytes) = {
            let store = open(root, 1 << 20).await;
            let blob = put_blob(&store, b"layer contents").await;
            let man_bytes = manifest(1);
            let man = Digest::sha256_of(&man_bytes);
            store.put_manifest(&man, &man_bytes, MEDIA).await.unwrap();
            store
                .put_tag("docker.io", "library/nginx", "latest", &man)
                .await
                .unwrap();
            (blob, man, man_bytes)
        };
        let used = (b"layer contents".len() + man_bytes.len()) as u64;
        // A crash mid-download, junk in the content directories, torn pairs.
        std::fs::write(root.join("tmp/0123.part"), b"half").unwrap();
        std::fs::create_dir(root.join("tmp/stray")).unwrap();
        std::fs::write(root.join("blobs/sha256/not-a-digest"), b"junk").unwrap();
        std::fs::write(root.join("blobs/sha256").join("A".repeat(64)), b"junk").unwrap();
        std::fs::create_dir(root.join("blobs/sha256/dir")).unwrap();
        let torn = Digest::sha256_of(b"torn");
        std::fs::write(root.join("blobs/sha256").join(torn.hex()), b"").unwrap();
        let empty = Digest::sha256_of(b"");
        std::fs::write(root.join("blobs/sha256").join(empty.hex()), b"").unwrap();
        let orphan = Digest::sha256_of(b"orphan data");
        std::fs::write(
            root.join("manifests/sha256").join(orphan.hex()),
            b"orphan data",
        )
        .unwrap();
        let lone = Digest::sha256_of(b"lone type");
        std::fs::write(
            root.join(format!("manifests/sha256/{}.type", lone.hex())),
            MEDIA,
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "/etc/passwd",
            root.join("blobs/sha256")
                .join(Digest::sha256_of(b"link").hex()),
        )
        .unwrap();

        let store = open(root, 1 << 20).await;
        assert_eq!(store.used_bytes(), used);
        assert_eq!(
            store.stats().blobs,
            2,
            "the blob and the legitimately empty blob"
        );
        assert_eq!(store.stats().manifests, 1);
        assert_eq!(read_blob(&store, &blob).await.unwrap(), b"layer contents");
        assert_eq!(read_blob(&store, &empty).await.unwrap(), b"");
        assert_eq!(store.read_manifest(&man).await.unwrap().unwrap().1, MEDIA);
        assert_eq!(
            store
                .get_tag("docker.io", "library/nginx", "latest")
                .await
                .unwrap(),
            Some(man)
        );
        assert_eq!(count_files(&root.join("tmp")), 0);
        let mut blobs: Vec<String> = std::fs::read_dir(root.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        blobs.sort();
        let mut want = vec![blob.hex().to_owned(), empty.hex().to_owned()];
        want.sort();
        assert_eq!(blobs, want);
        assert_eq!(count_files(&root.join("manifests/sha256")), 2);
        assert!(!store.contains_blob(&torn));
    }

    #[tokio::test]
    async fn reopen_with_a_smaller_limit_evicts_by_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let digests = {
            let store = open(root, 1 << 20).await;
            let mut digests = Vec::new();
            for i in 0..4u8 {
                digests.push(put_blob(&store, &[i; 100]).await);
            }
            digests
        };
        // Last use as recorded on disk: 2 is the oldest, then 0, 3, 1.
        let base = SystemTime::now() - Duration::from_secs(3600);
        for (i, age) in [(2usize, 0u64), (0, 10), (3, 20), (1, 30)] {
            let file = std::fs::File::options()
                .write(true)
                .open(root.join("blobs/sha256").join(digests[i].hex()))
                .unwrap();
            file.set_modified(base + Duration::from_secs(age)).unwrap();
        }
        // 400 bytes over a 300 limit: down to 270, so two go.
        let store = open(root, 300).await;
        assert_eq!(store.used_bytes(), 200);
        assert_eq!(store.evictions(), 2);
        assert!(!store.contains_blob(&digests[2]));
        assert!(!store.contains_blob(&digests[0]));
        assert!(store.contains_blob(&digests[3]));
        assert!(store.contains_blob(&digests[1]));
        assert_eq!(count_files(&root.join("blobs/sha256")), 2);
    }

    #[tokio::test]
    async fn eviction_removes_least_recently_used_first_and_keeps_under_max() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000).await;
        let a = put_blob(&store, &[1; 250]).await;
        let b = put_blob(&store, &[2; 250]).await;
        let m_bytes = manifest(1);
        let m = Digest::sha256_of(&m_bytes);
        store.put_manifest(&m, &m_bytes, MEDIA).await.unwrap();
        let c = put_blob(&store, &[3; 250]).await;
        // Use a (then the manifest): b is now the least recently used.
        assert!(read_blob(&store, &a).await.is_some());
        assert!(store.read_manifest(&m).await.unwrap().is_some());
        // 820 + 250 > 1000: evicting b alone gets to 820, under the 900 low-water mark.
        let d = put_blob(&store, &[4; 250]).await;
        assert!(!store.contains_blob(&b), "b was least recently used");
        assert!(store.contains_blob(&a) && store.contains_blob(&c) && store.contains_blob(&d));
        assert!(store.read_manifest(&m).await.unwrap().is_some());
        assert!(store.used_bytes() <= 1000);
        assert_eq!(store.evictions(), 1);
        assert!(!dir.path().join("blobs/sha256").join(b.hex()).exists());

        // Keep inserting: always under max, and the most recent insert always stays.
        for i in 10..30u8 {
            let digest = put_blob(&store, &[i; 250]).await;
            assert!(store.contains_blob(&digest));
            assert!(store.used_bytes() <= 1000, "{}", store.used_bytes());
        }
        // The manifest went too, with its type file; nothing else lingers on disk.
        assert!(store.read_manifest(&m).await.unwrap().is_none());
        assert_eq!(count_files(&dir.path().join("manifests/sha256")), 0);
        let on_disk: u64 = std::fs::read_dir(dir.path().join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, store.used_bytes());
    }

    #[tokio::test]
    async fn a_touched_blob_outlives_untouched_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1000).await;
        let pinned = put_blob(&store, &[1; 300]).await;
        let other = put_blob(&store, &[2; 300]).await;
        let third = put_blob(&store, &[3; 300]).await;
        // Oldest by insertion, but touched: `other` is now the least recently used.
        assert!(store.touch_blob(&pinned).await);
        let _new = put_blob(&store, &[4; 300]).await;
        assert!(store.contains_blob(&pinned), "touched, so kept");
        assert!(
            !store.contains_blob(&other),
            "least recently used, so evicted"
        );
        assert!(store.contains_blob(&third));
        // A blob that is not stored stays not stored, and says so.
        assert!(!store.touch_blob(&other).await);
        assert!(!store.contains_blob(&other));
    }

    #[tokio::test]
    async fn an_evicted_blob_stays_readable_to_whoever_has_it_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 500).await;
        let a = put_blob(&store, &[7; 300]).await;
        let (mut file, size) = store.open_blob(&a).await.unwrap().unwrap();
        let _b = put_blob(&store, &[8; 300]).await;
        assert!(!store.contains_blob(&a));
        let mut out = Vec::new();
        file.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, vec![7; 300]);
        assert_eq!(size, 300);
    }

    #[tokio::test]
    async fn content_larger_than_the_store_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 100).await;
        let small = put_blob(&store, &[1; 50]).await;
        let big = put_blob(&store, &[2; 101]).await;
        assert!(!store.contains_blob(&big));
        assert!(store.open_blob(&big).await.unwrap().is_none());
        assert!(
            store.contains_blob(&small),
            "nothing evicted for content that cannot fit"
        );
        assert_eq!(store.used_bytes(), 50);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
        assert_eq!(count_files(&dir.path().join("blobs/sha256")), 1);

        let bytes = format!(r#"{{"pad":"{}"}}"#, "x".repeat(200)).into_bytes();
        let digest = Digest::sha256_of(&bytes);
        store.put_manifest(&digest, &bytes, MEDIA).await.unwrap();
        assert!(store.read_manifest(&digest).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn tags_round_trip_and_refuse_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 20).await;
        let one = Digest::sha256_of(b"one");
        let two = Digest::sha256_of(b"two");
        assert_eq!(
            store
                .get_tag("docker.io", "library/nginx", "latest")
                .await
                .unwrap(),
            None
        );
        store
            .put_tag("docker.io", "library/nginx", "latest", &one)
            .await
            .unwrap();
        assert_eq!(
            store
                .get_tag("docker.io", "library/nginx", "latest")
                .await
                .unwrap(),
            Some(one.clone())
        );
        store
            .put_tag("docker.io", "library/nginx", "latest", &two)
            .await
            .unwrap();
        assert_eq!(
            store
                .get_tag("docker.io", "library/nginx", "latest")
                .await
                .unwrap(),
            Some(two.clone())
        );
        // A tag and a deeper repository with the same name do not collide.
        store
            .put_tag("registry_5000", "team/app", "dev", &one)
            .await
            .unwrap();
        store
            .put_tag("registry_5000", "team/app/dev", "v1", &two)
            .await
            .unwrap();
        assert_eq!(
            store
                .get_tag("registry_5000", "team/app", "dev")
                .await
                .unwrap(),
            Some(one)
        );
        assert_eq!(
            store
                .get_tag("registry_5000", "team/app/dev", "v1")
                .await
                .unwrap(),
            Some(two.clone())
        );
        assert_eq!(
            store.get_tag("registry_5000", "team", "app").await.unwrap(),
            None
        );

        let bad = [
            ("..", "library/nginx", "latest"),
            ("a/b", "library/nginx", "latest"),
            ("", "library/nginx", "latest"),
            ("docker.io", "../../etc", "latest"),
            ("docker.io", "/etc/passwd", "latest"),
            ("docker.io", "library/./nginx", "latest"),
            ("docker.io", "library//nginx", "latest"),
            ("docker.io", "", "latest"),
            ("docker.io", "library/_tags", "latest"),
            ("docker.io", "library/nginx", ".."),
            ("docker.io", "library/nginx", "../x"),
            ("docker.io", "library/nginx", "a/b"),
            ("docker.io", "library/nginx", ""),
        ];
        for (registry, repository, tag) in bad {
            let err = store
                .put_tag(registry, repository, tag, &two)
                .await
                .unwrap_err();
            assert!(
                matches!(err, DiskError::BadTagPath { .. }),
                "{registry} {repository} {tag}: {err}"
            );
            let err = store.get_tag(registry, repository, tag).await.unwrap_err();
            assert!(matches!(err, DiskError::BadTagPath { .. }), "{err}");
        }
        assert!(!dir.path().join("etc").exists());

        // An unreadable record counts as none and is cleared.
        let path = dir.path().join("tags/docker.io/library/nginx/_tags/latest");
        std::fs::write(&path, b"\0\0\0").unwrap();
        assert_eq!(
            store
                .get_tag("docker.io", "library/nginx", "latest")
                .await
                .unwrap(),
            None
        );
        assert!(!path.exists());
        assert_eq!(store.used_bytes(), 0, "tags are not counted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_commits_of_the_same_digest_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path(), 1 << 20).await);
        let bytes: Arc<Vec<u8>> = Arc::new((0..50_000u32).map(|i| (i % 256) as u8).collect());
        let digest = Digest::sha256_of(&bytes);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (store, bytes) = (Arc::clone(&store), Arc::clone(&bytes));
            tasks.push(tokio::spawn(async move { put_blob(&store, &bytes).await }));
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), digest);
        }
        assert_eq!(store.used_bytes(), bytes.len() as u64);
        assert_eq!(store.stats().blobs, 1);
        assert_eq!(read_blob(&store, &digest).await.unwrap(), *bytes);
        assert_eq!(count_files(&dir.path().join("tmp")), 0);
        assert_eq!(count_files(&dir.path().join("blobs/sha256")), 1);

        // Many different blobs at once under a tight limit: the accounting matches the disk.
        let store = Arc::new(open(&dir.path().join("tight"), 2_000).await);
        let mut tasks = Vec::new();
        for i in 0..32u8 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(
                async move { put_blob(&store, &[i; 300]).await },
            ));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(store.used_bytes() <= 2_000);
        let on_disk: u64 = std::fs::read_dir(dir.path().join("tight/blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, store.used_bytes());
    }
}
