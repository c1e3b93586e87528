//! Patch bodies by content type: JSON merge patch (RFC 7386), JSON patch (RFC 6902, `test`
//! included) and server-side apply, which this fake approximates as a merge patch (no field
//! ownership, no conflicts between managers).

use serde_json::Value;

use super::error::ApiError;

/// The patch flavours the fake accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`, applied as a merge patch (lists are replaced,
    /// not merged by key).
    Strategic,
    /// `application/json-patch+json`.
    Json,
    /// `application/apply-patch+yaml` (server-side apply), applied as a merge patch; creates the
    /// object when it does not exist.
    Apply,
}

impl PatchKind {
    /// From a `Content-Type` header (parameters ignored).
    pub fn from_content_type(content_type: &str) -> Result<Self, ApiError> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/json-patch+json" => Ok(Self::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(Self::Apply),
            _ => Err(ApiError::unsupported_media_type(content_type)),
        }
    }
}

/// Parses a patch body: JSON, or YAML for apply.
pub fn parse_body(kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(json_error) if kind == PatchKind::Apply => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid apply body: {e} ({json_error})"))),
        Err(e) => Err(ApiError::bad_request(format!("invalid patch body: {e}"))),
    }
}

/// Applies `patch` to `doc`.
///
/// A JSON patch `test` of `null` against a path that does not exist succeeds, as in the
/// apiserver (kube-runtime's finalizer helper tests `/metadata/finalizers` for `null` on an
/// object without finalizers). A failed `test` is 422 Invalid, like upstream.
pub fn apply(kind: PatchKind, doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    match kind {
        PatchKind::Merge | PatchKind::Strategic | PatchKind::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request("a merge patch must be a JSON object"));
            }
            json_patch::merge(doc, patch);
            Ok(())
        }
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            for op in &ops.0 {
                if let json_patch::PatchOperation::Test(test) = op
                    && test.value.is_null()
                    && doc.pointer(test.path.as_str()).is_none()
                {
                    continue;
                }
                json_patch::patch(doc, std::slice::from_ref(op)).map_err(|e| {
                    ApiError::invalid(format!("the JSON patch does not apply: {e}"))
                })?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Ok(PatchKind::Merge)
        );
        assert_eq!(
            PatchKind::from_content_type("application/apply-patch+yaml"),
            Ok(PatchKind::Apply)
        );
        assert_eq!(
            PatchKind::from_content_type("text/plain").map_err(|e| e.code),
            Err(415)
        );
    }

    #[test]
    fn merge_removes_nulls_and_replaces_lists() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "l": [1, 2]});
        apply(
            PatchKind::Merge,
            &mut doc,
            &json!({"b": {"c": null}, "l": [3]}),
        )
        .unwrap_or_default();
        assert_eq!(doc, json!({"a": 1, "b": {"d": 3}, "l": [3]}));
    }

    #[test]
    fn json_patch_test_op_as_the_finalizer_helper_uses_it() {
        // Adding the first finalizer: test for null on a missing list, then add.
        let mut doc = json!({"metadata": {"name": "x"}});
        let add = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}
        ]);
        apply(PatchKind::Json, &mut doc, &add).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["metadata"]["finalizers"], json!(["f"]));
        // The same patch again fails its test: the list is no longer null.
        let err = apply(PatchKind::Json, &mut doc, &add).map_err(|e| e.code);
        assert_eq!(err, Err(422));
        // Removing it by index, guarded by a test of the value at that index.
        let remove = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "f"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]);
        apply(PatchKind::Json, &mut doc, &remove).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(doc["metadata"]["finalizers"], json!([]));
        let wrong = json!([{"op": "test", "path": "/metadata/name", "value": "y"}]);
        assert_eq!(
            apply(PatchKind::Json, &mut doc, &wrong).map_err(|e| e.code),
            Err(422)
        );
    }

    #[test]
    fn apply_bodies_may_be_yaml() {
        let body = b"metadata:\n  labels:\n    a: b\n";
        let v = parse_body(PatchKind::Apply, body).unwrap_or_default();
        assert_eq!(v["metadata"]["labels"]["a"], "b");
        assert!(parse_body(PatchKind::Merge, body).is_err());
    }
}
