//! The few fields of image manifests and indexes the copy needs; everything else is carried
//! verbatim because the bytes, not a re-serialisation, are what gets pushed.

use serde::Deserialize;

/// Media types a manifest endpoint may answer with; all are asked for.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A content descriptor.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// A platform in an index entry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    /// `os/arch[/variant]`.
    pub fn display(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }
}

/// Either kind of manifest, told apart by which list it has.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnyManifest {
    #[serde(default)]
    pub media_type: Option<String>,
    /// Present in indexes / manifest lists.
    #[serde(default)]
    pub manifests: Option<Vec<Descriptor>>,
    /// Present in image manifests.
    #[serde(default)]
    pub config: Option<Descriptor>,
    #[serde(default)]
    pub layers: Option<Vec<Descriptor>>,
}

impl AnyManifest {
    /// Whether this is an index (or Docker manifest list).
    pub fn is_index(&self) -> bool {
        self.manifests.is_some()
    }

    /// The blobs an image manifest references: config first, then layers.
    pub fn blobs(&self) -> Vec<Descriptor> {
        self.config
            .iter()
            .cloned()
            .chain(self.layers.iter().flatten().cloned())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_index_and_manifest() {
        let index: AnyManifest = serde_json::from_str(
            r#"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"sha256:aa","size":3,
                "platform":{"os":"linux","architecture":"arm64","variant":"v8"}}]}"#,
        )
        .unwrap();
        assert!(index.is_index());
        let p = index.manifests.unwrap()[0].platform.clone().unwrap();
        assert_eq!(p.display(), "linux/arm64/v8");
        let image: AnyManifest = serde_json::from_str(
            r#"{"schemaVersion":2,"config":{"digest":"sha256:c","size":1},
                "layers":[{"digest":"sha256:l","size":2}]}"#,
        )
        .unwrap();
        assert!(!image.is_index());
        assert_eq!(image.blobs().len(), 2);
    }
}
