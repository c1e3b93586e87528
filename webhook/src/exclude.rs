//! `--exclude-image` patterns: images that keep their original reference.

use regex::RegexSet;

use crate::Error;

/// A set of regular expressions matched against image references.
///
/// Patterns are unanchored (`nginx` matches `docker.io/library/nginx:1.27`); write `^…$` to
/// match a whole reference. An image is excluded when a pattern matches either the reference
/// as written in the pod (`nginx:1.27`) or its canonical form (`docker.io/library/nginx:1.27`),
/// so patterns work whichever way users think of their images.
#[derive(Debug, Clone)]
pub struct Exclusions {
    set: RegexSet,
}

impl Exclusions {
    /// Compiles `patterns`; the error names the first invalid one.
    pub fn new<I, S>(patterns: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns: Vec<String> = patterns
            .into_iter()
            .map(|p| p.as_ref().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        // Compiled one by one first so the error says which pattern is wrong.
        for pattern in &patterns {
            regex::Regex::new(pattern).map_err(|source| Error::ExcludePattern {
                pattern: pattern.clone(),
                source,
            })?;
        }
        let set = RegexSet::new(&patterns).map_err(|source| Error::ExcludePattern {
            pattern: patterns.join(" | "),
            source,
        })?;
        Ok(Exclusions { set })
    }

    /// No exclusions.
    pub fn none() -> Self {
        Exclusions {
            set: RegexSet::empty(),
        }
    }

    /// True when any pattern matches `reference`.
    pub fn matches(&self, reference: &str) -> bool {
        self.set.is_match(reference)
    }

    /// How many patterns there are.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

impl Default for Exclusions {
    fn default() -> Self {
        Self::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanchored_and_anchored_patterns() {
        let ex = Exclusions::new([r"^registry\.internal/", "nginx", ""]).unwrap();
        assert_eq!(ex.len(), 2, "empty patterns are ignored");
        assert!(ex.matches("registry.internal/team/app:1"));
        assert!(!ex.matches("mirror.registry.internal/team/app:1"));
        assert!(ex.matches("docker.io/library/nginx:1.27"));
        assert!(!ex.matches("docker.io/library/redis:7"));
        assert!(!Exclusions::none().matches("anything"));
    }

    #[test]
    fn invalid_pattern_is_named() {
        let err = Exclusions::new(["ok", "(unclosed"]).unwrap_err();
        assert!(err.to_string().contains("(unclosed"), "{err}");
        assert_eq!(err.metric_label(), "exclude_pattern");
    }
}
