//! A rustls certificate resolver whose certificate can change while the server runs.
//!
//! Two sources feed it:
//! - files ([`CertResolver::from_files`]): every handshake stats the two files (cheap) and re-reads
//!   them when their identity (inode, size, times) changed, plus a full content check once a
//!   minute in case a filesystem's timestamps are too coarse to notice a quick rewrite. Polling
//!   per handshake, not inotify, because Kubernetes updates mounted Secrets by swapping a
//!   `..data` symlink, which file watches miss.
//! - memory ([`CertResolver::set_pem`]): the self-managed mode hands over renewed certificates.
//!
//! A broken update (unreadable file, key not matching the certificate, half-written rotation) is
//! logged and the previous certificate keeps being served: a webhook that stops serving TLS
//! would silently stop rewriting pods.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::{Error, Result, pem};

/// How often the files' contents are compared even when their metadata looks unchanged.
const CONTENT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Serves the current certificate and swaps in new ones without a restart.
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
    files: Option<FileSource>,
}

struct FileSource {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<FileState>,
}

struct FileState {
    stamp: Option<Stamp>,
    /// The bytes last loaded successfully, so touching a file without changing it costs no parse.
    loaded: (Vec<u8>, Vec<u8>),
    last_content_check: Instant,
}

/// What identifies a version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
    ctime: (i64, i64),
}

type Stamp = (FileStamp, FileStamp);

impl CertResolver {
    /// Loads a PEM certificate chain and key from files now (failing if they are unusable) and
    /// re-reads them whenever they change.
    pub fn from_files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self> {
        let (cert, key) = (cert.into(), key.into());
        let stamp = stamp_of(&cert, &key).ok();
        let (cert_pem, key_pem) = read_pair(&cert, &key)?;
        let certified = pem::certified_key(&cert_pem, &key_pem, &describe(&cert, &key))?;
        Ok(CertResolver {
            current: RwLock::new(Arc::new(certified)),
            files: Some(FileSource {
                cert,
                key,
                state: Mutex::new(FileState {
                    stamp,
                    loaded: (cert_pem, key_pem),
                    last_content_check: Instant::now(),
                }),
            }),
        })
    }

    /// A resolver serving the given PEM certificate chain and key until [`set_pem`](Self::set_pem)
    /// replaces them.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self> {
        let certified = pem::certified_key(cert_pem, key_pem, "in-memory certificate")?;
        Ok(CertResolver {
            current: RwLock::new(Arc::new(certified)),
            files: None,
        })
    }

    /// Replaces the served certificate; the next handshake uses it. On error the old one stays.
    pub fn set_pem(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<()> {
        let certified = pem::certified_key(cert_pem, key_pem, "in-memory certificate")?;
        self.store(certified);
        Ok(())
    }

    /// The certificate the next handshake would get (after checking the files).
    pub fn current(&self) -> Arc<CertifiedKey> {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!(error = %e, "keeping the previous TLS certificate; the new files are unusable");
        }
        self.served()
    }

    /// Re-reads the files if they changed; `Ok(true)` when a new certificate is now served.
    /// Does nothing for in-memory resolvers.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        // A poisoned lock only means another handshake panicked mid-check; the state is still
        // a valid (if stale) snapshot, so carry on with it.
        let mut state = files.state.lock().unwrap_or_else(PoisonError::into_inner);
        let stamp = stamp_of(&files.cert, &files.key).ok();
        let content_due = state.last_content_check.elapsed() >= CONTENT_CHECK_INTERVAL;
        if stamp.is_some() && stamp == state.stamp && !content_due {
            return Ok(false);
        }
        // Remember what we looked at even if it turns out broken: a broken pair is reported
        // once, not on every handshake, and the next change is picked up.
        state.stamp = stamp;
        state.last_content_check = Instant::now();
        let (cert_pem, key_pem) = read_pair(&files.cert, &files.key)?;
        if (&cert_pem, &key_pem) == (&state.loaded.0, &state.loaded.1) {
            return Ok(false);
        }
        let certified =
            pem::certified_key(&cert_pem, &key_pem, &describe(&files.cert, &files.key))?;
        state.loaded = (cert_pem, key_pem);
        self.store(certified);
        tracing::info!(cert = %files.cert.display(), "reloaded TLS certificate from disk");
        Ok(true)
    }

    fn served(&self) -> Arc<CertifiedKey> {
        // Poisoning cannot leave a half-written Arc behind; the value is always whole.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn store(&self, certified: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CertResolver");
        match &self.files {
            Some(files) => d.field("cert", &files.cert).field("key", &files.key),
            None => d.field("source", &"memory"),
        }
        .finish_non_exhaustive()
    }
}

fn describe(cert: &Path, key: &Path) -> String {
    format!("{} / {}", cert.display(), key.display())
}

fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| Error::ReadFile {
            path: path.to_owned(),
            source,
        })
    };
    Ok((read(cert)?, read(key)?))
}

fn stamp_of(cert: &Path, key: &Path) -> std::io::Result<Stamp> {
    // `metadata` follows symlinks, so a swapped `..data` link shows up as a new inode.
    let one = |path: &Path| {
        std::fs::metadata(path).map(|m| FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    };
    Ok((one(cert)?, one(key)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Older kernels stamp files with a clock that ticks every few milliseconds; a rewrite
    /// within the same tick (and of the same size) would only be seen by the periodic content
    /// check. Real rotations are never that close together.
    fn next_tick() {
        std::thread::sleep(Duration::from_millis(20));
    }

    fn leaf_der(resolver: &CertResolver) -> Vec<u8> {
        resolver.current().cert[0].to_vec()
    }

    fn der_of(pem_text: &str) -> Vec<u8> {
        pem::certificates(pem_text.as_bytes(), "t").unwrap()[0].to_vec()
    }

    #[test]
    fn file_changes_are_served_on_next_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert1, key1) = pem::self_signed("one.example");
        std::fs::write(&c, &cert1).unwrap();
        std::fs::write(&k, &key1).unwrap();
        let resolver = CertResolver::from_files(&c, &k).unwrap();
        assert_eq!(leaf_der(&resolver), der_of(&cert1));

        let (cert2, key2) = pem::self_signed("two.example");
        next_tick();
        std::fs::write(&c, &cert2).unwrap();
        std::fs::write(&k, &key2).unwrap();
        assert_eq!(leaf_der(&resolver), der_of(&cert2));
        assert!(
            !resolver.reload_if_changed().unwrap(),
            "nothing changed since"
        );
    }

    #[test]
    fn symlink_swap_is_noticed() {
        // The way the kubelet updates a mounted Secret: new directory, then swap a symlink.
        let dir = tempfile::tempdir().unwrap();
        let write_version = |name: &str, cert: &str, key: &str| {
            let v = dir.path().join(name);
            std::fs::create_dir(&v).unwrap();
            std::fs::write(v.join("tls.crt"), cert).unwrap();
            std::fs::write(v.join("tls.key"), key).unwrap();
            let tmp = dir.path().join("..data_tmp");
            std::os::unix::fs::symlink(&v, &tmp).unwrap();
            std::fs::rename(&tmp, dir.path().join("..data")).unwrap();
        };
        let (cert1, key1) = pem::self_signed("one.example");
        write_version("v1", &cert1, &key1);
        let data = dir.path().join("..data");
        let resolver =
            CertResolver::from_files(data.join("tls.crt"), data.join("tls.key")).unwrap();
        let (cert2, key2) = pem::self_signed("two.example");
        write_version("v2", &cert2, &key2);
        assert_eq!(leaf_der(&resolver), der_of(&cert2));
    }

    #[test]
    fn broken_update_keeps_previous_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let (cert1, key1) = pem::self_signed("one.example");
        std::fs::write(&c, &cert1).unwrap();
        std::fs::write(&k, &key1).unwrap();
        let resolver = CertResolver::from_files(&c, &k).unwrap();

        // Half a rotation: the certificate is new, the key still old.
        let (cert2, key2) = pem::self_signed("two.example");
        next_tick();
        std::fs::write(&c, &cert2).unwrap();
        assert!(resolver.reload_if_changed().is_err());
        assert_eq!(leaf_der(&resolver), der_of(&cert1));

        // The rotation completes: now it is picked up.
        next_tick();
        std::fs::write(&k, &key2).unwrap();
        assert_eq!(leaf_der(&resolver), der_of(&cert2));

        // Files vanish: still serving.
        std::fs::remove_file(&c).unwrap();
        assert_eq!(leaf_der(&resolver), der_of(&cert2));
    }

    #[test]
    fn from_files_fails_fast_on_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let err = CertResolver::from_files(dir.path().join("a"), dir.path().join("b")).unwrap_err();
        assert!(matches!(err, Error::ReadFile { .. }), "{err}");
    }

    #[test]
    fn in_memory_set_replaces_and_rejects_garbage() {
        let (cert1, key1) = pem::self_signed("one.example");
        let resolver = CertResolver::from_pem(cert1.as_bytes(), key1.as_bytes()).unwrap();
        let (cert2, key2) = pem::self_signed("two.example");
        resolver.set_pem(cert2.as_bytes(), key2.as_bytes()).unwrap();
        assert_eq!(leaf_der(&resolver), der_of(&cert2));
        assert!(resolver.set_pem(b"nonsense", key1.as_bytes()).is_err());
        assert_eq!(leaf_der(&resolver), der_of(&cert2));
    }
}
