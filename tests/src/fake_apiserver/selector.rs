//! Label selectors (equality and set-based) and field selectors (`a.b=v`, `a.b!=v` on any
//! dotted path, e.g. `metadata.name`).

use serde_json::Value;

use super::error::ApiError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

impl LabelSelector {
    /// Parses `k=v,k2!=v2,k3 in (a,b),!k4,k5`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |t: &str| ApiError::bad_request(format!("unable to parse requirement: {t:?}"));
        let mut out = Vec::new();
        for term in terms(s) {
            let req = if let Some(key) = term.strip_prefix('!') {
                Requirement::DoesNotExist(key.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==") {
                Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once('=') {
                Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once(" notin ") {
                Requirement::NotIn(k.trim().to_owned(), set_values(v).ok_or_else(|| bad(term))?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                Requirement::In(k.trim().to_owned(), set_values(v).ok_or_else(|| bad(term))?)
            } else if term.contains([' ', '(', ')']) {
                return Err(bad(term));
            } else {
                Requirement::Exists(term.to_owned())
            };
            out.push(req);
        }
        Ok(Self(out))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v),
            Requirement::NotEquals(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::DoesNotExist(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`: equality and inequality on dotted paths of the object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `metadata.name=x,spec.nodeName!=y`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut out = Vec::new();
        for term in terms(s) {
            let (path, equal, value) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            let pointer = format!("/{}", path.trim().replace('.', "/"));
            out.push((pointer, equal, value.trim().to_owned()));
        }
        Ok(Self(out))
    }

    /// Whether every term holds; a missing field compares as the empty string, as upstream.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = match object.pointer(pointer) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(other) => other.to_string(),
            };
            (actual == *value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "n", "labels": labels}, "spec": {"nodeName": "node1"}})
    }

    fn ls(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn label_selectors() {
        let o = obj(json!({"larder.dev/managed": "true", "tier": "web"}));
        assert!(ls("").matches(&o));
        assert!(ls("larder.dev/managed=true").matches(&o));
        assert!(ls("larder.dev/managed==true,tier").matches(&o));
        assert!(!ls("larder.dev/managed=false").matches(&o));
        assert!(ls("tier in (web, db)").matches(&o));
        assert!(!ls("tier notin (web)").matches(&o));
        assert!(ls("tier!=db,!absent").matches(&o));
        assert!(!ls("absent").matches(&o));
        assert!(!ls("larder.dev/managed=true").matches(&obj(Value::Null)));
        assert!(LabelSelector::parse("tier in web").is_err());
    }

    #[test]
    fn field_selectors() {
        let o = obj(json!({}));
        let fs = |s: &str| FieldSelector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(fs("metadata.name=a").matches(&o));
        assert!(!fs("metadata.name=b").matches(&o));
        assert!(fs("metadata.name!=b,spec.nodeName=node1").matches(&o));
        assert!(fs("spec.missing=").matches(&o));
        assert!(FieldSelector::parse("metadata.name").is_err());
    }
}
