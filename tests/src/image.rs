//! Synthetic OCI images, made locally: random-content layers, configs, manifests and indexes,
//! in memory ([`BuiltImage`]) and as an OCI image layout directory ([`BuiltImage::write_oci_layout`]).
//!
//! Everything is deterministic given the layer seeds: two builds with the same seeded layers produce the
//! same bytes, so tests can make images that share layers. Layer content is random, hence incompressible,
//! so a layer blob is only slightly larger than the file inside it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use flate2::Compression;
use flate2::write::GzEncoder;
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::error::{HarnessError, Result};

/// `application/vnd.oci.image.manifest.v1+json`
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// `application/vnd.oci.image.index.v1+json`
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// `application/vnd.oci.image.config.v1+json`
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// `application/vnd.oci.image.layer.v1.tar+gzip`
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// `application/vnd.docker.distribution.manifest.v2+json`
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// `application/vnd.docker.distribution.manifest.list.v2+json`
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// An `Accept` header value asking for any manifest or index kind.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The annotation an OCI layout's `index.json` names tags with.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OS/architecture pair (and optional variant).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// e.g. `v8`.
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/<architecture>`.
    pub fn linux(architecture: &str) -> Self {
        Platform {
            os: "linux".to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    /// The same platform with a variant.
    pub fn with_variant(mut self, variant: &str) -> Self {
        self.variant = Some(variant.to_owned());
        self
    }

    fn to_json(&self) -> Value {
        let mut v = json!({ "architecture": self.architecture, "os": self.os });
        if let Some(variant) = &self.variant {
            v["variant"] = json!(variant);
        }
        v
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform::linux("amd64")
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A piece of content-addressed data: a manifest, an index, a config or a layer.
#[derive(Clone, PartialEq, Eq)]
pub struct Blob {
    /// Its media type.
    pub media_type: String,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// `bytes.len()`.
    pub size: u64,
    /// The content.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// Content with its digest and size computed.
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Blob {
            media_type: media_type.to_owned(),
            digest: sha256_digest(&bytes),
            size: bytes.len() as u64,
            bytes,
        }
    }

    /// The hex part of the digest.
    pub fn hex(&self) -> &str {
        self.digest.trim_start_matches("sha256:")
    }

    /// The OCI descriptor `{mediaType, digest, size}`.
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.size })
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blob")
            .field("media_type", &self.media_type)
            .field("digest", &self.digest)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// How to make one layer: a gzipped tar holding one file of random bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSpec {
    /// Size of the file inside the tar, in bytes.
    pub size: usize,
    /// Seed of the random content; `None` draws a fresh seed. Equal seeds and sizes (and paths) give
    /// byte-identical layers, so images can share them.
    pub seed: Option<u64>,
    /// Path of the file inside the tar; `None` derives it from the content.
    pub path: Option<String>,
}

impl LayerSpec {
    /// A layer of `size` random bytes that no other layer shares.
    pub fn random(size: usize) -> Self {
        LayerSpec {
            size,
            seed: None,
            path: None,
        }
    }

    /// A layer of `size` bytes from `seed`: the same seed and size always give the same blob.
    pub fn seeded(size: usize, seed: u64) -> Self {
        LayerSpec {
            size,
            seed: Some(seed),
            path: None,
        }
    }

    /// Puts the file at `path` inside the tar.
    pub fn at_path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Builds the layer.
    pub fn build(&self) -> Result<Layer> {
        let seed = self.seed.unwrap_or_else(rand::random);
        let mut content = vec![0u8; self.size];
        StdRng::seed_from_u64(seed).fill_bytes(&mut content);
        let path = match &self.path {
            Some(p) => p.trim_start_matches('/').to_owned(),
            None => format!(
                "larder-test/{}.bin",
                &hex::encode(Sha256::digest(&content))[..16]
            ),
        };
        let tar = make_tar(&path, &content)?;
        let diff_id = sha256_digest(&tar);
        let mut gz = GzEncoder::new(Vec::with_capacity(tar.len() + 1024), Compression::fast());
        std::io::Write::write_all(&mut gz, &tar)
            .map_err(|e| HarnessError::io("gzipping a layer", e))?;
        let compressed = gz
            .finish()
            .map_err(|e| HarnessError::io("gzipping a layer", e))?;
        Ok(Layer {
            blob: Blob::new(OCI_LAYER_GZIP, compressed),
            diff_id,
            tar_size: tar.len() as u64,
            file_path: path,
            file_size: self.size as u64,
        })
    }
}

fn make_tar(path: &str, content: &[u8]) -> Result<Vec<u8>> {
    let io = |e| HarnessError::io("writing a layer tar", e);
    let mut builder = tar::Builder::new(Vec::with_capacity(content.len() + 4096));
    if let Some((dir, _)) = path.rsplit_once('/') {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(0);
        builder
            .append_data(&mut header, format!("{dir}/"), std::io::empty())
            .map_err(io)?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(content.len() as u64);
    builder
        .append_data(&mut header, path, content)
        .map_err(io)?;
    builder.into_inner().map_err(io)
}

/// One built layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The gzipped tar, as stored in a registry.
    pub blob: Blob,
    /// `sha256:` of the uncompressed tar (what the config's `rootfs.diff_ids` lists).
    pub diff_id: String,
    /// Size of the uncompressed tar.
    pub tar_size: u64,
    /// Path of the file inside the tar.
    pub file_path: String,
    /// Size of that file.
    pub file_size: u64,
}

/// One built image manifest with its config and layers.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    /// The platform its config declares.
    pub platform: Platform,
    /// The manifest (`application/vnd.oci.image.manifest.v1+json`).
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
}

impl ImageManifest {
    /// Config plus layer sizes: what a client downloads besides the manifest.
    pub fn blobs_size(&self) -> u64 {
        self.config.size + self.layers.iter().map(|l| l.blob.size).sum::<u64>()
    }
}

/// Builds a single-platform image.
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    platform: Platform,
    layers: Vec<LayerSpec>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

impl ImageBuilder {
    /// An image for linux/amd64 with no layers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the platform the config declares.
    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Appends a layer.
    pub fn layer(mut self, spec: LayerSpec) -> Self {
        self.layers.push(spec);
        self
    }

    /// Appends a layer of `size` fresh random bytes.
    pub fn random_layer(self, size: usize) -> Self {
        self.layer(LayerSpec::random(size))
    }

    /// Appends a layer of `size` bytes from `seed` (shareable between images).
    pub fn seeded_layer(self, size: usize, seed: u64) -> Self {
        self.layer(LayerSpec::seeded(size, seed))
    }

    /// Adds a label to the config (`config.Labels`): distinct labels make distinct configs and manifests
    /// over the same layers.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Adds an annotation to the manifest.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Builds the manifest, config and layers.
    pub fn build_manifest(&self) -> Result<ImageManifest> {
        let layers = self
            .layers
            .iter()
            .map(LayerSpec::build)
            .collect::<Result<Vec<_>>>()?;
        let mut config = self.platform.to_json();
        config["created"] = json!("1970-01-01T00:00:00Z");
        config["config"] = if self.labels.is_empty() {
            json!({})
        } else {
            json!({ "Labels": self.labels })
        };
        config["rootfs"] = json!({
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.as_str()).collect::<Vec<_>>(),
        });
        let config = Blob::new(OCI_CONFIG, to_json_bytes(&config, "image config")?);
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
        });
        if !self.annotations.is_empty() {
            manifest["annotations"] = json!(self.annotations);
        }
        let manifest = Blob::new(OCI_MANIFEST, to_json_bytes(&manifest, "image manifest")?);
        Ok(ImageManifest {
            platform: self.platform.clone(),
            manifest,
            config,
            layers,
        })
    }

    /// Builds a single-platform image (no index).
    pub fn build(&self) -> Result<BuiltImage> {
        Ok(BuiltImage {
            index: None,
            manifests: vec![self.build_manifest()?],
        })
    }
}

/// Builds a multi-platform image: an OCI index over one image per platform.
#[derive(Debug, Clone, Default)]
pub struct IndexBuilder {
    images: Vec<ImageBuilder>,
    annotations: BTreeMap<String, String>,
}

impl IndexBuilder {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an image; its platform (see [`ImageBuilder::platform`]) becomes the index entry's `platform`.
    pub fn image(mut self, image: ImageBuilder) -> Self {
        self.images.push(image);
        self
    }

    /// Adds one image per platform, each with fresh random layers of the given sizes.
    pub fn platforms(mut self, platforms: &[Platform], layer_sizes: &[usize]) -> Self {
        for p in platforms {
            let img = layer_sizes
                .iter()
                .fold(ImageBuilder::new().platform(p.clone()), |b, &size| {
                    b.random_layer(size)
                });
            self.images.push(img);
        }
        self
    }

    /// Adds an annotation to the index.
    pub fn annotation(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.annotations.insert(key.into(), value.into());
        self
    }

    /// Builds the index and every image in it.
    pub fn build(&self) -> Result<BuiltImage> {
        if self.images.is_empty() {
            return Err(HarnessError::InvalidInput(
                "an index needs at least one image".to_owned(),
            ));
        }
        let manifests = self
            .images
            .iter()
            .map(ImageBuilder::build_manifest)
            .collect::<Result<Vec<_>>>()?;
        let entries: Vec<Value> = manifests
            .iter()
            .map(|m| {
                let mut d = m.manifest.descriptor();
                d["platform"] = m.platform.to_json();
                d
            })
            .collect();
        let mut index = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries });
        if !self.annotations.is_empty() {
            index["annotations"] = json!(self.annotations);
        }
        let index = Blob::new(OCI_INDEX, to_json_bytes(&index, "image index")?);
        Ok(BuiltImage {
            index: Some(index),
            manifests,
        })
    }
}

fn to_json_bytes(v: &Value, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|source| HarnessError::Json {
        context: format!("serialising {what}"),
        source,
    })
}

/// What was built: every digest and size, and the bytes, for serving from a fake origin or pushing.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The index, for a multi-platform image.
    pub index: Option<Blob>,
    /// The image manifests (one for a single-platform image).
    pub manifests: Vec<ImageManifest>,
}

impl BuiltImage {
    /// The top-level manifest: the index, or the only image manifest.
    pub fn top(&self) -> &Blob {
        match &self.index {
            Some(index) => index,
            None => &self.manifests[0].manifest,
        }
    }

    /// Digest of [`BuiltImage::top`]: what a tag points at.
    pub fn digest(&self) -> &str {
        &self.top().digest
    }

    /// Media type of [`BuiltImage::top`].
    pub fn media_type(&self) -> &str {
        &self.top().media_type
    }

    /// The image for `platform`.
    pub fn manifest_for(&self, platform: &Platform) -> Option<&ImageManifest> {
        self.manifests.iter().find(|m| &m.platform == platform)
    }

    /// Everything served under `/v2/<repo>/manifests/`: the index (if any) and each manifest.
    pub fn manifest_blobs(&self) -> Vec<&Blob> {
        self.index
            .iter()
            .chain(self.manifests.iter().map(|m| &m.manifest))
            .collect()
    }

    /// Everything served under `/v2/<repo>/blobs/`: configs and layers, each distinct digest once.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut seen = BTreeSet::new();
        self.manifests
            .iter()
            .flat_map(|m| std::iter::once(&m.config).chain(m.layers.iter().map(|l| &l.blob)))
            .filter(|b| seen.insert(b.digest.clone()))
            .collect()
    }

    /// Any content of this image by digest (manifest, index, config or layer).
    pub fn find(&self, digest: &str) -> Option<&Blob> {
        self.manifest_blobs()
            .into_iter()
            .chain(self.blobs())
            .find(|b| b.digest == digest)
    }

    /// Sum of the sizes of the distinct configs and layers.
    pub fn blobs_size(&self) -> u64 {
        self.blobs().iter().map(|b| b.size).sum()
    }

    /// Writes (or adds to) an OCI image layout at `dir` with this image tagged `tag`
    /// (`oci-layout`, `index.json`, `blobs/sha256/<hex>`). A tag already in the layout is replaced.
    pub fn write_oci_layout(&self, dir: &Path, tag: &str) -> Result<()> {
        let io = |what: &str, p: &Path, e| HarnessError::io(format!("{what} {}", p.display()), e);
        let blob_dir = dir.join("blobs").join("sha256");
        std::fs::create_dir_all(&blob_dir).map_err(|e| io("creating", &blob_dir, e))?;
        let layout_file = dir.join("oci-layout");
        std::fs::write(&layout_file, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(|e| io("writing", &layout_file, e))?;
        for blob in self.manifest_blobs().into_iter().chain(self.blobs()) {
            let path = blob_dir.join(blob.hex());
            if !path.exists() {
                std::fs::write(&path, &blob.bytes).map_err(|e| io("writing", &path, e))?;
            }
        }

        let index_path = dir.join("index.json");
        let mut index: Value = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| HarnessError::Json {
                context: format!("reading {}", index_path.display()),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] })
            }
            Err(e) => return Err(io("reading", &index_path, e)),
        };
        let mut entries: Vec<Value> = index["manifests"].as_array().cloned().unwrap_or_default();
        entries.retain(|e| e["annotations"][REF_NAME_ANNOTATION] != json!(tag));
        let mut entry = self.top().descriptor();
        entry["annotations"] = json!({ REF_NAME_ANNOTATION: tag });
        entries.push(entry);
        index["manifests"] = json!(entries);
        std::fs::write(&index_path, to_json_bytes(&index, "layout index.json")?)
            .map_err(|e| io("writing", &index_path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_layers_are_identical_and_random_ones_differ() {
        let a = LayerSpec::seeded(10_000, 7).build().expect("layer");
        let b = LayerSpec::seeded(10_000, 7).build().expect("layer");
        let c = LayerSpec::random(10_000).build().expect("layer");
        assert_eq!(a.blob.digest, b.blob.digest);
        assert_ne!(a.blob.digest, c.blob.digest);
        // Random content does not compress: the blob is the file plus tar and gzip overhead.
        assert!(
            a.blob.size >= 10_000 && a.blob.size < 10_000 + 4096,
            "{}",
            a.blob.size
        );
    }

    #[test]
    fn manifest_and_config_reference_their_parts() {
        let img = ImageBuilder::new()
            .random_layer(1000)
            .random_layer(2000)
            .build()
            .expect("image");
        assert!(img.index.is_none());
        let m = &img.manifests[0];
        let manifest: Value = serde_json::from_slice(&m.manifest.bytes).expect("json");
        assert_eq!(manifest["config"]["digest"], json!(m.config.digest));
        assert_eq!(manifest["layers"][1]["size"], json!(m.layers[1].blob.size));
        let config: Value = serde_json::from_slice(&m.config.bytes).expect("json");
        assert_eq!(config["rootfs"]["diff_ids"][0], json!(m.layers[0].diff_id));
        assert_eq!(config["architecture"], json!("amd64"));
        assert_eq!(img.digest(), m.manifest.digest);
    }
}
