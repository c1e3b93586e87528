//! Registry token authentication, shared by the proxy and the controllers: parsing
//! `WWW-Authenticate` challenges (pure) and caching Bearer tokens until shortly before they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer` or `basic`, lowercase.
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, ...), keys lowercase.
    pub params: HashMap<String, String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }
}

/// Parses one challenge, e.g. `Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull"`.
/// Quoted values may contain commas and backslash escapes. Returns `None` when there is no scheme.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r.trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = HashMap::new();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        // Empty list elements (`a="1", , ,b="2"`) are allowed (RFC 9110 §5.6.1): skip every
        // comma and space before a name, not only the first run of each.
        let key = key
            .trim_start_matches(list_separator)
            .trim_end()
            .to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end.min(quoted.len())..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        if !key.is_empty() {
            params.insert(key, value);
        }
        rest = remaining.trim_start_matches(list_separator);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Commas and whitespace between a challenge's parameters.
fn list_separator(c: char) -> bool {
    c == ',' || c.is_whitespace()
}

/// Why a token service's answer is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token service sent invalid JSON")]
    Json,
    #[error("token service sent no token")]
    Empty,
}

/// Reads a token service's answer (`token` or `access_token`, and `expires_in` seconds; the
/// default lifetime when absent). The body is never quoted in errors: it holds the token.
pub fn parse_token_response(body: &[u8]) -> Result<(String, Duration), TokenError> {
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let parsed: TokenResponse = serde_json::from_slice(body).map_err(|_| TokenError::Json)?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or(TokenError::Empty)?;
    let lifetime = parsed
        .expires_in
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    Ok((token, lifetime))
}

/// How long a token without `expires_in` lives (the distribution spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
const MAX_TOKENS: usize = 4096;

/// Bearer tokens per (upstream, key), kept until shortly before they expire. The key is the
/// caller's: a repository or scope, with a credential fingerprint when the token was bought with
/// credentials, so that anonymous tokens and each credential's tokens stay apart.
#[derive(Debug, Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, upstream: &str, repository: &str) -> Option<String> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let (token, expires) = tokens.get(&(upstream.to_owned(), repository.to_owned()))?;
        (Instant::now() < *expires).then(|| token.clone())
    }

    /// Stores a token, expiring 10% (at least 5 s) before the registry said it would so that it
    /// is never sent stale.
    pub fn put(&self, upstream: &str, repository: &str, token: String, lifetime: Duration) {
        let margin = (lifetime / 10).max(Duration::from_secs(5));
        let expires = Instant::now() + lifetime.saturating_sub(margin);
        let mut tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= MAX_TOKENS {
            let now = Instant::now();
            tokens.retain(|_, (_, e)| *e > now);
            if tokens.len() >= MAX_TOKENS {
                tokens.clear();
            }
        }
        tokens.insert(
            (upstream.to_owned(), repository.to_owned()),
            (token, expires),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_style_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(c.param("service"), Some("registry.docker.io"));
        assert_eq!(c.param("scope"), Some("repository:library/nginx:pull,push"));
    }

    #[test]
    fn parses_basic_unquoted_and_escaped_values() {
        let c = parse_challenge(r#"Basic realm="a \"quoted\" realm""#).unwrap();
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.param("realm"), Some(r#"a "quoted" realm"#));
        let c = parse_challenge("Bearer realm=http://127.0.0.1:1/t, service=x").unwrap();
        assert_eq!(c.param("realm"), Some("http://127.0.0.1:1/t"));
        assert_eq!(c.param("service"), Some("x"));
        assert!(parse_challenge("").is_none());
        let c = parse_challenge(r#"Bearer realm="unterminated"#).unwrap();
        assert_eq!(c.param("realm"), Some("unterminated"));
    }

    /// Found by the `www_authenticate` fuzz target: a name after two or more empty list
    /// elements kept a comma (`, service`) and the parameter was lost.
    #[test]
    fn empty_list_elements_between_parameters_are_skipped() {
        let c = parse_challenge(r#"Bearer realm="r", , , service="s",,, ,scope=x"#).unwrap();
        assert_eq!(c.param("realm"), Some("r"));
        assert_eq!(c.param("service"), Some("s"));
        assert_eq!(c.param("scope"), Some("x"));
        let c = parse_challenge(",earer , \u{b}, \u{b}a=b").unwrap();
        assert_eq!(c.param("a"), Some("b"));
        assert_eq!(c.params.len(), 1);
    }

    #[test]
    fn token_responses_parse_either_field() {
        assert_eq!(
            parse_token_response(br#"{"token":"t","expires_in":300}"#),
            Ok(("t".into(), Duration::from_secs(300)))
        );
        assert_eq!(
            parse_token_response(br#"{"token":"","access_token":"a"}"#),
            Ok(("a".into(), DEFAULT_TOKEN_LIFETIME))
        );
        assert_eq!(parse_token_response(b"{}"), Err(TokenError::Empty));
        assert_eq!(parse_token_response(b"<html>"), Err(TokenError::Json));
    }

    #[test]
    fn tokens_expire_before_the_registry_says() {
        let cache = TokenCache::default();
        cache.put("reg", "a/b", "t1".into(), Duration::from_secs(300));
        assert_eq!(cache.get("reg", "a/b").as_deref(), Some("t1"));
        assert_eq!(cache.get("reg", "a/c"), None);
        cache.put("reg", "a/c", "t2".into(), Duration::from_secs(3));
        assert_eq!(
            cache.get("reg", "a/c"),
            None,
            "a 3 s token is already inside the margin"
        );
    }
}
