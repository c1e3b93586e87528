//! Anonymous Bearer token auth: the `WWW-Authenticate` challenge parser and a token cache.
//! (Kept here rather than borrowed from the proxy crate so the controller builds on its own.)

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How long a token without `expires_in` lives (the distribution spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_TOKENS: usize = 1024;

/// A parsed challenge: scheme (lowercase) and parameters (keys lowercase).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: HashMap<String, String>,
}

impl Challenge {
    /// A parameter by lowercase name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses `Bearer realm="…",service="…",scope="…"`; quoted values may hold commas and
/// backslash escapes.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Tokens per (registry origin, scope), dropped shortly before they expire.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl TokenCache {
    /// A live token for this registry and scope.
    pub fn get(&self, registry: &str, scope: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        let (token, expires) = tokens.get(&(registry.to_owned(), scope.to_owned()))?;
        (Instant::now() < *expires).then(|| token.clone())
    }

    /// Keeps a token until 10% (at least 5 s) before its lifetime ends.
    pub fn put(&self, registry: &str, scope: &str, token: String, lifetime: Duration) {
        let margin = (lifetime / 10).max(Duration::from_secs(5));
        let expires = Instant::now() + lifetime.saturating_sub(margin);
        let mut tokens = self.tokens.lock().unwrap_or_else(PoisonError::into_inner);
        if tokens.len() >= MAX_TOKENS {
            tokens.clear();
        }
        tokens.insert((registry.to_owned(), scope.to_owned()), (token, expires));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push",error="x\"y""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.example/token"));
        assert_eq!(c.param("service"), Some("reg"));
        assert_eq!(c.param("scope"), Some("repository:a/b:pull,push"));
        assert_eq!(c.param("error"), Some("x\"y"));
        let basic = parse_challenge("Basic realm=x").unwrap();
        assert_eq!(basic.scheme, "basic");
        assert_eq!(basic.param("realm"), Some("x"));
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn tokens_expire_early() {
        let cache = TokenCache::default();
        cache.put("r", "s", "t".into(), Duration::from_secs(60));
        assert_eq!(cache.get("r", "s").as_deref(), Some("t"));
        cache.put("r", "s", "t".into(), Duration::from_secs(3));
        assert_eq!(cache.get("r", "s"), None);
    }
}
