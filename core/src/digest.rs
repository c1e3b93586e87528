//! Content digests (`sha256:<hex>`), as used in image references and the distribution API.
//!
//! Only the algorithms registries actually use are accepted, with their exact hex lengths, so a
//! digest that parses can name a file on disk and be verified byte for byte.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A digest algorithm larder can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// `sha256`: what every registry uses today.
    Sha256,
    /// `sha512`: allowed by the OCI image spec, rarely seen.
    Sha512,
}

impl Algorithm {
    /// The name as written before the `:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// Why a digest string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest `{0}` has no `:` between algorithm and hex")]
    MissingSeparator(String),
    #[error("digest algorithm `{0}` is not supported (use sha256 or sha512)")]
    UnsupportedAlgorithm(String),
    #[error("digest `{digest}` must have {expected} lowercase hex characters after `{algorithm}:`")]
    BadHex {
        digest: String,
        algorithm: &'static str,
        expected: usize,
    },
}

/// A validated content digest: algorithm plus lowercase hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>` or `sha512:<128 lowercase hex>`.
    pub fn parse(input: &str) -> Result<Self, DigestError> {
        let (algorithm, hex) = input
            .split_once(':')
            .ok_or_else(|| DigestError::MissingSeparator(input.to_owned()))?;
        let algorithm = match algorithm {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::UnsupportedAlgorithm(other.to_owned())),
        };
        let hex_ok = hex.len() == algorithm.hex_len()
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !hex_ok {
            return Err(DigestError::BadHex {
                digest: input.to_owned(),
                algorithm: algorithm.as_str(),
                expected: algorithm.hex_len(),
            });
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }

    /// The sha256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        Digest {
            algorithm: Algorithm::Sha256,
            hex: hex::encode(sha2::Sha256::digest(bytes)),
        }
    }

    /// The algorithm part.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part, lowercase, of the algorithm's exact length: safe to use as a file name.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher for this digest's algorithm, to verify streamed content against it.
    pub fn verifier(&self) -> Verifier {
        Verifier::new(self.algorithm)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

/// Incremental hashing of streamed content, finished into a [`Digest`].
#[derive(Debug, Clone)]
pub enum Verifier {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Verifier {
    /// A fresh hasher for `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Verifier::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Verifier::Sha512(sha2::Sha512::new()),
        }
    }

    /// Feeds more content.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Verifier::Sha256(h) => h.update(bytes),
            Verifier::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self {
            Verifier::Sha256(h) => Digest {
                algorithm: Algorithm::Sha256,
                hex: hex::encode(h.finalize()),
            },
            Verifier::Sha512(h) => Digest {
                algorithm: Algorithm::Sha512,
                hex: hex::encode(h.finalize()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints_sha256() {
        let d = Digest::parse(EMPTY_SHA256).unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY_SHA256);
        assert_eq!(Digest::sha256_of(b""), d);
    }

    #[test]
    fn verifier_matches_one_shot_hash() {
        let d = Digest::sha256_of(b"hello world");
        let mut v = d.verifier();
        v.update(b"hello ");
        v.update(b"world");
        assert_eq!(v.finish(), d);
        let mut v = Verifier::new(Algorithm::Sha512);
        v.update(b"x");
        let d512 = v.finish();
        assert_eq!(d512.hex().len(), 128);
        assert_eq!(Digest::parse(&d512.to_string()).unwrap(), d512);
    }

    #[test]
    fn rejects_bad_digests_with_reason() {
        let cases = [
            ("sha256", "no `:`"),
            ("md5:d41d8cd98f00b204e9800998ecf8427e", "not supported"),
            ("sha256:abc", "64 lowercase hex"),
            (
                "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
                "lowercase hex",
            ),
            (
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
                "hex",
            ),
            ("sha256:../../etc/passwd", "hex"),
            ("", "no `:`"),
        ];
        for (input, want) in cases {
            let err = Digest::parse(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }
}
