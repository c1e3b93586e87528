//! Registry credentials: the ones a client presents (containerd sends what kubelet found for the
//! rewritten image) and per-registry ones from a mounted docker config file
//! (`--registry-credentials`, reloaded when it changes). Credentials never leave memory, never
//! reach logs (`Debug` redacts them), and are keyed by a hash wherever they are cached.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use larder_core::dockerconfig::DockerConfig;
pub use larder_core::dockerconfig::{Credentials, registry_key};

/// Why a credentials file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not a docker config file: {reason}")]
    Parse { path: String, reason: String },
}

/// Parses a docker config (the one parser, in [`larder_core::dockerconfig`]) into the
/// credentials to use for each canonical registry (`host[:port]`). Wildcard keys apply to no
/// single registry here and are left out; of several entries for one host, the host-wide one
/// wins.
pub fn parse_docker_config(json: &[u8]) -> Result<HashMap<String, Credentials>, String> {
    let config = DockerConfig::parse(json).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for entry in &config.entries {
        if entry.host.contains('*') || out.contains_key(&entry.host) {
            continue;
        }
        if let Some(credentials) = config.for_registry(&entry.host) {
            out.insert(entry.host.clone(), credentials.clone());
        }
    }
    Ok(out)
}

/// How often the file's modification time is looked at, at most.
const RECHECK: Duration = Duration::from_secs(2);

/// `--registry-credentials FILE`, reloaded when its modification time changes (a mounted
/// Secret is updated by an atomic symlink swap, which changes it).
#[derive(Debug)]
pub struct CredentialsFile {
    path: PathBuf,
    state: Mutex<FileState>,
}

#[derive(Debug)]
struct FileState {
    modified: Option<SystemTime>,
    checked: Instant,
    entries: HashMap<String, Credentials>,
}

impl CredentialsFile {
    /// Loads the file; an unreadable or invalid file at start-up is an error (a typo should
    /// not silently mean "no credentials").
    pub fn load(path: PathBuf) -> Result<Self, CredentialsError> {
        let (modified, entries) = read(&path)?;
        Ok(CredentialsFile {
            path,
            state: Mutex::new(FileState {
                modified,
                checked: Instant::now(),
                entries,
            }),
        })
    }

    /// The credentials for `registry` (`host[:port]`), from the file as it is now.
    pub fn get(&self, registry: &str) -> Option<Credentials> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.checked.elapsed() >= RECHECK {
            state.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != state.modified {
                match read(&self.path) {
                    Ok((modified, entries)) => {
                        tracing::info!(path = %self.path.display(), registries = entries.len(), "registry credentials reloaded");
                        state.modified = modified;
                        state.entries = entries;
                    }
                    // Keep what worked; a half-written file must not drop every credential.
                    Err(err) => {
                        tracing::warn!(error = %err, "keeping the previous registry credentials")
                    }
                }
            }
        }
        state.entries.get(registry).cloned()
    }
}

fn read(
    path: &PathBuf,
) -> Result<(Option<SystemTime>, HashMap<String, Credentials>), CredentialsError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| CredentialsError::Read {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let entries = parse_docker_config(&bytes).map_err(|reason| CredentialsError::Parse {
        path: shown,
        reason,
    })?;
    Ok((modified, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_configs_parse_with_normalised_keys() {
        let json = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "dXNlcjpwYXNz"},
            "Registry.Example.com:5000": {"username": "u", "password": "p"}
        }}"#;
        let creds = parse_docker_config(json).unwrap();
        assert_eq!(creds["docker.io"].username, "user");
        assert_eq!(creds["registry.example.com:5000"].password, "p");
        assert!(parse_docker_config(br#"{"auths": {"x": {}}}"#).is_err());
        assert!(parse_docker_config(b"not json").is_err());
    }

    #[test]
    fn the_file_is_reloaded_when_it_changes_and_kept_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            br#"{"auths": {"reg.example": {"auth": "dXNlcjpwYXNz"}}}"#,
        )
        .unwrap();
        let file = CredentialsFile::load(path.clone()).unwrap();
        assert_eq!(file.get("reg.example").unwrap().username, "user");
        std::fs::write(
            &path,
            br#"{"auths": {"reg.example": {"username": "new", "password": "x"}}}"#,
        )
        .unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        file.state.lock().unwrap().checked = Instant::now() - RECHECK;
        assert_eq!(file.get("reg.example").unwrap().username, "new");
        std::fs::write(&path, b"{broken").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(5))
            .unwrap();
        file.state.lock().unwrap().checked = Instant::now() - RECHECK;
        assert_eq!(
            file.get("reg.example").unwrap().username,
            "new",
            "a broken file keeps the last good one"
        );
        assert!(CredentialsFile::load(dir.path().join("missing.json")).is_err());
    }
}
