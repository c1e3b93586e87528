//! The webhook's derived pull Secrets (`--pull-secrets=derive`): the names, label and
//! annotations the webhook writes on them and the controller's clean-up reads back.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Names of derived Secrets start with this.
pub const DERIVED_PREFIX: &str = "larder-pull-";
/// Label on derived Secrets, so an operator (and the clean-up) can find what larder created.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY_VALUE: &str = "larder";
/// Annotation naming a derived Secret's sources (comma-separated), for humans.
pub const DERIVED_FROM_ANNOTATION: &str = "larder.dev/derived-from";
/// Annotation holding the version of every source a derived Secret was built from, as a JSON
/// object of name → [`secret_version`]. When a source no longer has that version (edited,
/// replaced or deleted), the webhook can never produce this Secret's name again: it is
/// superseded, and deletable once no pod refers to it.
pub const SOURCE_VERSIONS_ANNOTATION: &str = "larder.dev/source-versions";

/// A Secret's identity and version, `<uid>/<resourceVersion>`: changes when the Secret is
/// edited or deleted and created again under the same name.
pub fn secret_version(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.uid.as_deref().unwrap_or_default(),
        meta.resource_version.as_deref().unwrap_or_default()
    )
}

/// The [`SOURCE_VERSIONS_ANNOTATION`] value for `sources` (name, version); keys sorted, so
/// every replica writes the same bytes.
pub fn source_versions<'a>(sources: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let map: BTreeMap<&str, &str> = sources.into_iter().collect();
    serde_json::to_string(&map).unwrap_or_default()
}

/// Reads a [`SOURCE_VERSIONS_ANNOTATION`] value; `None` when it is not a JSON object of strings.
pub fn parse_source_versions(value: &str) -> Option<BTreeMap<String, String>> {
    serde_json::from_str(value).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn source_versions_round_trip_in_a_stable_order() {
        let written = source_versions([("b", "u2/7"), ("a", "u1/3")]);
        assert_eq!(written, r#"{"a":"u1/3","b":"u2/7"}"#);
        let read = parse_source_versions(&written).unwrap();
        assert_eq!(read.get("b").map(String::as_str), Some("u2/7"));
        assert_eq!(read.len(), 2);
    }

    #[test]
    fn anything_but_an_object_of_strings_is_unreadable() {
        for bad in ["", "[]", r#"{"a":1}"#, "a=u1/3", r#"{"a":"u1/3""#] {
            assert!(parse_source_versions(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn version_is_uid_and_resource_version() {
        let meta = ObjectMeta {
            uid: Some("u1".into()),
            resource_version: Some("42".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(secret_version(&meta), "u1/42");
        assert_eq!(secret_version(&ObjectMeta::default()), "/");
    }
}
