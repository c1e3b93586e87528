//! Access control for private repositories, on every tier.
//!
//! A repository the origin refuses anonymously is private. Its manifests and blobs are served,
//! from disk, the cache registry or the origin alike, only to a client whose credentials the
//! origin accepts for it; the verdict is cached briefly per (credentials hash, repository).
//! Private verdicts are persisted beside the disk tier, so a restart does not turn cached
//! private content public; public verdicts expire, so a repository made private is noticed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a "public" verdict is trusted before the origin is asked again.
pub const PUBLIC_TTL: Duration = Duration::from_secs(600);
/// How long a client's accepted credentials are trusted for a repository.
pub const GRANT_TTL: Duration = Duration::from_secs(60);
/// How long refused credentials stay refused (short: a fixed password should work soon).
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);
const MAX_ENTRIES: usize = 16_384;
const MARKER: &str = "_private";

/// What the proxy knows about a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privacy {
    Public,
    Private,
    Unknown,
}

/// Privacy verdicts and credential grants, by `<host>[_<port>]/<repo>`.
#[derive(Debug)]
pub struct Access {
    private: Mutex<HashSet<String>>,
    public: Mutex<HashMap<String, Instant>>,
    grants: Mutex<HashMap<(String, String), (bool, Instant)>>,
    markers: Option<PathBuf>,
}

impl Access {
    /// Loads persisted private verdicts from `markers` (a directory of marker files).
    pub fn open(markers: Option<PathBuf>) -> Self {
        let mut private = HashSet::new();
        if let Some(dir) = &markers {
            collect_markers(dir, dir, &mut private);
        }
        Access {
            private: Mutex::new(private),
            public: Mutex::default(),
            grants: Mutex::default(),
            markers,
        }
    }

    pub fn privacy(&self, repository: &str) -> Privacy {
        if lock(&self.private).contains(repository) {
            return Privacy::Private;
        }
        match lock(&self.public).get(repository) {
            Some(until) if Instant::now() < *until => Privacy::Public,
            _ => Privacy::Unknown,
        }
    }

    /// The origin refused anonymous access: private from now on (and after restarts).
    pub fn mark_private(&self, repository: &str) {
        lock(&self.public).remove(repository);
        if !lock(&self.private).insert(repository.to_owned()) {
            return;
        }
        tracing::info!(
            repository,
            "repository is private: serving it only to clients the origin accepts"
        );
        if let Some(dir) = &self.markers {
            let path = dir.join(repository);
            let written = std::fs::create_dir_all(&path)
                .and_then(|()| std::fs::write(path.join(MARKER), b""));
            if let Err(err) = written {
                tracing::warn!(repository, error = %err, "could not persist a private verdict");
            }
        }
    }

    /// The origin served the repository anonymously.
    pub fn mark_public(&self, repository: &str) {
        if lock(&self.private).contains(repository) {
            // Public again upstream: forget the marker so anonymous clients are served.
            lock(&self.private).remove(repository);
            if let Some(dir) = &self.markers {
                let _ = std::fs::remove_file(dir.join(repository).join(MARKER));
            }
        }
        let mut public = lock(&self.public);
        if public.len() >= MAX_ENTRIES {
            public.retain(|_, until| Instant::now() < *until);
        }
        public.insert(repository.to_owned(), Instant::now() + PUBLIC_TTL);
    }

    /// A cached verdict on `fingerprint`'s access to `repository`.
    pub fn grant(&self, fingerprint: &str, repository: &str) -> Option<bool> {
        let grants = lock(&self.grants);
        let (allowed, until) = grants.get(&(fingerprint.to_owned(), repository.to_owned()))?;
        (Instant::now() < *until).then_some(*allowed)
    }

    pub fn remember_grant(&self, fingerprint: &str, repository: &str, allowed: bool) {
        let ttl = if allowed { GRANT_TTL } else { REFUSAL_TTL };
        let mut grants = lock(&self.grants);
        if grants.len() >= MAX_ENTRIES {
            grants.retain(|_, (_, until)| Instant::now() < *until);
            if grants.len() >= MAX_ENTRIES {
                grants.clear();
            }
        }
        grants.insert(
            (fingerprint.to_owned(), repository.to_owned()),
            (allowed, Instant::now() + ttl),
        );
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each critical section is a single insert/remove/lookup: a panic leaves the data usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn collect_markers(root: &std::path::Path, dir: &std::path::Path, out: &mut HashSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_markers(root, &path, out);
        } else if entry.file_name() == MARKER
            && let Some(repo) = dir.strip_prefix(root).ok().and_then(|p| p.to_str())
        {
            out.insert(repo.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_verdicts_survive_a_restart_and_public_ones_expire() {
        let dir = tempfile::tempdir().unwrap();
        let access = Access::open(Some(dir.path().to_path_buf()));
        assert_eq!(access.privacy("reg_5000/team/app"), Privacy::Unknown);
        access.mark_private("reg_5000/team/app");
        access.mark_public("ghcr.io/org/pub");
        assert_eq!(access.privacy("reg_5000/team/app"), Privacy::Private);
        assert_eq!(access.privacy("ghcr.io/org/pub"), Privacy::Public);
        let reopened = Access::open(Some(dir.path().to_path_buf()));
        assert_eq!(reopened.privacy("reg_5000/team/app"), Privacy::Private);
        assert_eq!(
            reopened.privacy("ghcr.io/org/pub"),
            Privacy::Unknown,
            "public verdicts are not persisted"
        );
        reopened.mark_public("reg_5000/team/app");
        assert_eq!(
            Access::open(Some(dir.path().to_path_buf())).privacy("reg_5000/team/app"),
            Privacy::Unknown
        );
    }

    #[test]
    fn grants_are_per_credentials_and_repository() {
        let access = Access::open(None);
        access.remember_grant("fp1", "r/a", true);
        access.remember_grant("fp2", "r/a", false);
        assert_eq!(access.grant("fp1", "r/a"), Some(true));
        assert_eq!(access.grant("fp2", "r/a"), Some(false));
        assert_eq!(access.grant("fp1", "r/b"), None);
    }
}
