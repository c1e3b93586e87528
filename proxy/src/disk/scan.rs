//! The startup scan: the index rebuilt from the files, and whatever a crash or a stranger left
//! in the tier's directories removed.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use larder_core::digest::{Algorithm, Digest, Verifier};

use super::index::{Index, Key};
use super::{ALGORITHMS, DiskError, TYPE_SUFFIX, content_path, io_error, remove_quietly_sync};

/// `hex` as a digest of `algorithm`, if it is a well-formed one.
fn digest_named(algorithm: Algorithm, hex: &str) -> Option<Digest> {
    Digest::parse(&format!("{}:{hex}", algorithm.as_str())).ok()
}

/// Builds the index from the files (blocking; runs once at open).
pub(super) fn scan(root: &Path, max_bytes: u64) -> Result<Index, DiskError> {
    let mut dirs = vec![root.join("tmp"), root.join("tags")];
    for algorithm in ALGORITHMS {
        dirs.push(root.join("blobs").join(algorithm.as_str()));
        dirs.push(root.join("manifests").join(algorithm.as_str()));
    }
    for dir in &dirs {
        std::fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
    }
    let tmp = root.join("tmp");
    for entry in read_dir(&tmp)? {
        remove_junk(&entry, "an interrupted write");
    }
    let mut found: Vec<(Key, u64, SystemTime)> = Vec::new();
    for algorithm in ALGORITHMS {
        scan_blobs(
            &root.join("blobs").join(algorithm.as_str()),
            algorithm,
            &mut found,
        )?;
        scan_manifests(
            &root.join("manifests").join(algorithm.as_str()),
            algorithm,
            &mut found,
        )?;
    }
    found.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
    let mut index = Index::default();
    let now = Instant::now();
    for (key, size, _) in found {
        index.insert(key, size, now);
    }
    for (key, size) in index.take_victims(max_bytes, 0) {
        tracing::debug!(?key, size, "evicting at open: over the limit");
        match &key {
            Key::Blob(digest) => remove_quietly_sync(&content_path(root, "blobs", digest)),
            Key::Manifest(digest) => {
                let data = content_path(root, "manifests", digest);
                remove_quietly_sync(&data);
                let mut name = data.into_os_string();
                name.push(TYPE_SUFFIX);
                remove_quietly_sync(Path::new(&name));
            }
        }
    }
    Ok(index)
}

struct Found {
    path: PathBuf,
    name: Option<String>,
    file_type: std::fs::FileType,
    metadata: Option<std::fs::Metadata>,
}

fn read_dir(dir: &Path) -> Result<Vec<Found>, DiskError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error("list directory", dir))? {
        let entry = entry.map_err(io_error("list directory", dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_error("stat", &path))?;
        // `DirEntry::metadata` does not follow symlinks: a link is junk, never followed.
        let metadata = if file_type.is_file() {
            Some(entry.metadata().map_err(io_error("stat", &path))?)
        } else {
            None
        };
        out.push(Found {
            name: entry.file_name().into_string().ok(),
            path,
            file_type,
            metadata,
        });
    }
    Ok(out)
}

fn remove_junk(found: &Found, what: &str) {
    tracing::info!(path = %found.path.display(), what, "removing from the disk tier");
    let result = if found.file_type.is_dir() {
        std::fs::remove_dir_all(&found.path)
    } else {
        std::fs::remove_file(&found.path)
    };
    if let Err(e) = result
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %found.path.display(), error = %e, "cannot delete a file of the disk tier");
    }
}

fn mtime(metadata: &std::fs::Metadata) -> SystemTime {
    metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH)
}

fn scan_blobs(
    dir: &Path,
    algorithm: Algorithm,
    found: &mut Vec<(Key, u64, SystemTime)>,
) -> Result<(), DiskError> {
    let empty = Verifier::new(algorithm).finish();
    for entry in read_dir(dir)? {
        let digest = entry
            .name
            .as_deref()
            .and_then(|n| digest_named(algorithm, n));
        match (digest, &entry.metadata) {
            // An empty file is a torn write unless it is the empty blob.
            (Some(digest), Some(meta)) if meta.len() > 0 || digest == empty => {
                found.push((Key::Blob(digest), meta.len(), mtime(meta)));
            }
            (Some(_), Some(_)) => remove_junk(&entry, "an empty file under a non-empty digest"),
            _ => remove_junk(&entry, "not a blob"),
        }
    }
    Ok(())
}

fn scan_manifests(
    dir: &Path,
    algorithm: Algorithm,
    found: &mut Vec<(Key, u64, SystemTime)>,
) -> Result<(), DiskError> {
    let mut data = HashMap::new();
    let mut types = HashMap::new();
    for entry in read_dir(dir)? {
        let Some(name) = entry.name.clone().filter(|_| entry.metadata.is_some()) else {
            remove_junk(&entry, "not a manifest");
            continue;
        };
        if let Some(digest) = name
            .strip_suffix(TYPE_SUFFIX)
            .and_then(|hex| digest_named(algorithm, hex))
        {
            types.insert(digest, entry);
        } else if let Some(digest) = digest_named(algorithm, &name) {
            data.insert(digest, entry);
        } else {
            remove_junk(&entry, "not a manifest");
        }
    }
    for (digest, entry) in data {
        match (types.remove(&digest), &entry.metadata) {
            (Some(_), Some(meta)) => found.push((Key::Manifest(digest), meta.len(), mtime(meta))),
            _ => remove_junk(&entry, "a manifest without its media type"),
        }
    }
    for entry in types.values() {
        remove_junk(entry, "a media type without its manifest");
    }
    Ok(())
}
