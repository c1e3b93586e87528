//! Registry credentials: the ones a client presents (containerd sends what kubelet found for the
//! rewritten image) and per-registry ones from a mounted docker config file
//! (`--registry-credentials`, reloaded when it changes). Credentials never leave memory, never
//! reach logs (`Debug` redacts them), and are keyed by a hash wherever they are cached.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use sha2::Digest as _;

/// A username and password (or token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Reads `Authorization: Basic <base64(user:pass)>`; anything else is `None`.
    pub fn from_basic_header(value: &str) -> Option<Self> {
        let (scheme, encoded) = value.trim().split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = decode_base64(encoded.trim())?;
        Self::from_user_colon_pass(&String::from_utf8(decoded).ok()?)
    }

    fn from_user_colon_pass(text: &str) -> Option<Self> {
        let (username, password) = text.split_once(':')?;
        if username.is_empty() {
            return None;
        }
        Some(Credentials {
            username: username.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The `Authorization` header value that presents these credentials.
    pub fn basic_header(&self) -> String {
        format!(
            "Basic {}",
            encode_base64(format!("{}:{}", self.username, self.password).as_bytes())
        )
    }

    /// A stable, one-way key for caches: never the credentials themselves.
    pub fn fingerprint(&self) -> String {
        let mut hasher = sha2::Sha256::new();
        hasher.update(self.username.as_bytes());
        hasher.update([0]);
        hasher.update(self.password.as_bytes());
        hex::encode(&hasher.finalize()[..16])
    }
}

/// Why a credentials file could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("reading {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} is not a docker config file: {reason}")]
    Parse { path: String, reason: String },
}

/// Parses a docker config (`{"auths": {"<registry>": {"auth": "<base64 user:pass>"}}}`, or
/// `username`/`password` fields) into credentials by canonical registry (`host[:port]`).
pub fn parse_docker_config(json: &[u8]) -> Result<HashMap<String, Credentials>, String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let config: Config = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    let mut out = HashMap::new();
    for (key, entry) in config.auths {
        let credentials = match (&entry.auth, &entry.username, &entry.password) {
            (Some(auth), _, _) if !auth.is_empty() => decode_base64(auth)
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|text| Credentials::from_user_colon_pass(&text))
                .ok_or_else(|| format!("the `auth` of `{key}` is not base64 of user:password"))?,
            (_, Some(username), Some(password)) => Credentials {
                username: username.clone(),
                password: password.clone(),
            },
            _ => {
                return Err(format!(
                    "`{key}` has neither `auth` nor `username` and `password`"
                ));
            }
        };
        out.insert(registry_key(&key), credentials);
    }
    Ok(out)
}

/// `https://index.docker.io/v1/` → `docker.io`; `Registry.Example.com:5000/path` →
/// `registry.example.com:5000`.
pub fn registry_key(key: &str) -> String {
    let key = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = key
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        _ => host,
    }
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

fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for text in ["", "a", "ab", "abc", "user:p@ss:word", "ünïcode:✓"] {
            assert_eq!(
                decode_base64(&encode_base64(text.as_bytes())).unwrap(),
                text.as_bytes()
            );
        }
        assert_eq!(encode_base64(b"user:pass"), "dXNlcjpwYXNz");
        assert!(decode_base64("not base64!").is_none());
    }

    #[test]
    fn basic_headers_parse_and_print() {
        let c = Credentials::from_basic_header("Basic dXNlcjpwYXNz").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pass"));
        assert_eq!(c.basic_header(), "Basic dXNlcjpwYXNz");
        assert!(Credentials::from_basic_header("Bearer abc").is_none());
        assert!(Credentials::from_basic_header("Basic %%%").is_none());
        assert!(
            Credentials::from_basic_header(&format!("Basic {}", encode_base64(b"nocolon")))
                .is_none()
        );
        assert!(
            !format!("{c:?}").contains("pass\""),
            "Debug never shows the password"
        );
        assert_ne!(
            c.fingerprint(),
            Credentials {
                username: "user".into(),
                password: "other".into()
            }
            .fingerprint()
        );
    }

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
