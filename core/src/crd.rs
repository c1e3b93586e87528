//! The `CachedImage` custom resource (`larder.dev/v1alpha1`) and the CRD YAML the chart installs.
//!
//! One `CachedImage` stands for one original image reference that some managed pod uses. It is
//! cluster-scoped because the cache registry is shared by every namespace: two namespaces
//! running `nginx:1.27` share one copy, so they share one object.
//!
//! The chart's CRDs are generated from these types (`larder crds`), never written by hand,
//! so the schema the apiserver validates against is always the one the controllers compile.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod nodecache;
mod precache;

pub use nodecache::{
    NodeCache, NodeCacheImage, NodeCacheSpec, NodeCacheStatus, NodeGateStatus, NodeImagePhase,
    NodeImageStatus,
};
pub use precache::{
    MaxConcurrent, PRECACHE_PENDING_TAINT, Precache, PrecacheImageStatus, PrecacheNodeStatus,
    PrecacheSpec, PrecacheStatus, ReadinessGate, Refresh,
};

/// The API group of every larder resource.
pub const GROUP: &str = "larder.dev";

/// The API version of every larder resource ([`CachedImage`], [`Precache`], [`NodeCache`]).
pub const VERSION: &str = "v1alpha1";

/// How many pods [`UsedBy::pods`] lists at most.
///
/// A popular image (a sidecar, a logging agent) can be used by thousands of pods; listing them
/// all would push the object towards etcd's size limit and make every status write large.
/// Twenty names are enough to answer "who uses this?" at a glance; [`UsedBy::count`] stays exact,
/// and it is the count, not the list, that retention decisions read.
pub const USED_BY_CAP: usize = 20;

/// What the user (or the pod controller) asks for: keep this image in the cache.
// clippy reads the repeated `type_ = "string"`, `priority = "1"` of different printer columns as
// duplicated attributes; they are separate columns.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[kube(
    group = "larder.dev",
    version = "v1alpha1",
    kind = "CachedImage",
    plural = "cachedimages",
    shortname = "cimg",
    shortname = "ci",
    category = "larder",
    status = "CachedImageStatus",
    derive = "PartialEq",
    doc = "An image kept in larder's in-cluster cache registry, with its copy progress and users.",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.sourceImage"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizeBytes",
        description = "Bytes of the image in the cache registry, all platforms"
    ),
    printcolumn(
        name = "Used By",
        type_ = "integer",
        json_path = ".status.usedBy.count",
        description = "Pods using the image now"
    ),
    printcolumn(
        name = "Digest",
        type_ = "string",
        json_path = ".status.digest",
        priority = "1"
    ),
    printcolumn(
        name = "Retain",
        type_ = "boolean",
        json_path = ".spec.retain",
        priority = "1"
    ),
    printcolumn(
        name = "Last Used",
        type_ = "date",
        json_path = ".status.lastUsed",
        priority = "1"
    ),
    printcolumn(
        name = "Expires",
        type_ = "date",
        json_path = ".status.expiresAt",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct CachedImageSpec {
    /// The normalised original reference, e.g. `docker.io/library/nginx:1.27` (a digest may follow).
    pub source_image: String,
    /// Keep the image forever, even when no pod has used it for the whole retention period.
    #[serde(default)]
    pub retain: bool,
    /// `kubernetes.io/dockerconfigjson` Secrets to read origin credentials from when the image is
    /// private (set from a `Precache`'s `pullSecrets`, or by hand). Pods' own `imagePullSecrets`
    /// are used as well and need not be listed. The controller reads exactly these Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_secrets: Vec<SecretRef>,
}

/// A Secret named by namespace and name (the objects are cluster-scoped, so both are needed).
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub name: String,
}

impl CachedImageSpec {
    /// A spec for `source_image` under the default retention.
    pub fn new(source_image: impl Into<String>) -> Self {
        Self {
            source_image: source_image.into(),
            retain: false,
            pull_secrets: Vec::new(),
        }
    }
}

/// What the controllers last observed; every field is optional, as a new object has none yet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachedImageStatus {
    /// Where the copy into the cache registry stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The manifest (or index) digest the cache registry holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The digest the origin registry gave for the reference at the last sync; differs from
    /// `digest` while a moved tag is being re-copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_digest: Option<String>,
    /// The platforms cached, e.g. `linux/amd64`, `linux/arm64/v8`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Total bytes of the image (manifests and blobs of every cached platform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes copied so far; equals `sizeBytes` once `Ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_bytes: Option<u64>,
    /// The pods that use the image now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<UsedBy>,
    /// When the image was last checked against (or copied from) the origin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<Time>,
    /// When a pod last used the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<Time>,
    /// When the image will be removed from the cache if no pod uses it before then; absent
    /// while it is in use or retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Consecutive failed copies since the last success; absent after a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<u32>,
    /// After a failed copy: the controller tries the origin again no earlier than this (the
    /// backoff, kept here so that it holds across controller restarts). A change to the spec
    /// makes it try at once. Absent after a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Time>,
    /// Standard Kubernetes conditions (`Ready`, `Synced`, ...), one per type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Where the copy of an image into the cache registry stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Known, not copied yet.
    Pending,
    /// Being copied from the origin into the cache registry.
    Copying,
    /// Fully in the cache registry.
    Ready,
    /// The last copy failed; the `Ready` condition says why, and the controller retries with backoff.
    Failed,
}

impl Phase {
    /// Every phase, in lifecycle order: for metrics that must report zero for absent phases.
    pub const ALL: [Phase; 4] = [Phase::Pending, Phase::Copying, Phase::Ready, Phase::Failed];

    /// The name as it appears in the resource and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Copying => "Copying",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pods that use an image: an exact count and a capped, sorted sample of their names.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsedBy {
    /// How many pods use the image, all of them, not only those listed.
    pub count: u32,
    /// A sorted sample of those pods as `namespace/name`, at most 20 (larder's USED_BY_CAP).
    // Always serialised, even empty: status is written with merge patches, where an absent
    // list keeps the old pods next to a count of 0.
    #[serde(default)]
    #[schemars(length(max = USED_BY_CAP))]
    pub pods: Vec<String>,
}

impl UsedBy {
    /// Builds the status entry from every pod using the image (`namespace/name`), in any order,
    /// duplicates allowed.
    ///
    /// Sorting before capping makes the list a function of the set of pods, so a controller
    /// that recomputes it sees no change, and writes no status, when nothing changed.
    pub fn from_pods<I, S>(pods: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut pods: Vec<String> = pods.into_iter().map(Into::into).collect();
        pods.sort_unstable();
        pods.dedup();
        let count = u32::try_from(pods.len()).unwrap_or(u32::MAX);
        pods.truncate(USED_BY_CAP);
        Self { count, pods }
    }
}

/// Why the CRDs could not be printed.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// A CRD did not serialise to YAML (a bug in the types, not in the input).
    #[error("serialising CustomResourceDefinition {name} to YAML")]
    Yaml {
        /// The CRD's name, e.g. `cachedimages.larder.dev`.
        name: String,
        /// What serde_yaml said.
        #[source]
        source: serde_yaml::Error,
    },
}

/// Every CustomResourceDefinition larder installs, in the order to apply them.
///
/// A new resource type is one more entry here; `larder crds`, the chart and the tests pick it up.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![CachedImage::crd(), Precache::crd(), NodeCache::crd()]
}

/// [`crds`] as one multi-document YAML stream (`---` between documents), ready for
/// `kubectl apply -f -` or the chart's `crds/` folder.
pub fn crds_yaml() -> Result<String, CrdError> {
    let mut out = String::new();
    for crd in crds() {
        let yaml = serde_yaml::to_string(&crd).map_err(|source| CrdError::Yaml {
            name: crd.metadata.name.clone().unwrap_or_default(),
            source,
        })?;
        out.push_str("---\n");
        out.push_str(&yaml);
    }
    Ok(out)
}

#[cfg(test)]
// A failed expectation in a test is the test failing, with the message saying which.
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceDefinitionVersion, JSONSchemaProps, JSONSchemaPropsOrArray,
    };

    fn only_version(crd: &CustomResourceDefinition) -> &CustomResourceDefinitionVersion {
        assert_eq!(crd.spec.versions.len(), 1);
        &crd.spec.versions[0]
    }

    fn root_schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
        only_version(crd)
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("the derive always emits a schema")
    }

    /// Follows a printer column path (`.status.usedBy.count`) through object properties.
    fn schema_at<'a>(root: &'a JSONSchemaProps, json_path: &str) -> Option<&'a JSONSchemaProps> {
        let mut here = root;
        for segment in json_path.trim_start_matches('.').split('.') {
            here = here.properties.as_ref()?.get(segment)?;
        }
        Some(here)
    }

    /// Walks every subschema, calling `check` with a path for messages.
    fn walk(path: &str, schema: &JSONSchemaProps, check: &mut dyn FnMut(&str, &JSONSchemaProps)) {
        check(path, schema);
        for (name, child) in schema.properties.iter().flatten() {
            walk(&format!("{path}.{name}"), child, check);
        }
        match &schema.items {
            Some(JSONSchemaPropsOrArray::Schema(item)) => walk(&format!("{path}[]"), item, check),
            Some(JSONSchemaPropsOrArray::Schemas(items)) => {
                for item in items {
                    walk(&format!("{path}[]"), item, check);
                }
            }
            None => {}
        }
        for (kind, list) in [
            ("allOf", &schema.all_of),
            ("anyOf", &schema.any_of),
            ("oneOf", &schema.one_of),
        ] {
            for (i, child) in list.iter().flatten().enumerate() {
                walk(&format!("{path}/{kind}[{i}]"), child, check);
            }
        }
    }

    #[test]
    fn identity_scope_and_names() {
        let crd = CachedImage::crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("cachedimages.larder.dev")
        );
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.kind, "CachedImage");
        assert_eq!(crd.spec.names.plural, "cachedimages");
        assert_eq!(crd.spec.names.singular.as_deref(), Some("cachedimage"));
        let short = crd.spec.names.short_names.clone().unwrap_or_default();
        assert!(short.contains(&"ci".to_owned()) && short.contains(&"cimg".to_owned()));
        let version = only_version(&crd);
        assert_eq!(version.name, VERSION);
        assert!(version.served && version.storage);
    }

    #[test]
    fn has_status_subresource() {
        let crd = CachedImage::crd();
        let sub = only_version(&crd)
            .subresources
            .as_ref()
            .expect("subresources");
        assert!(sub.status.is_some());
        assert!(
            root_schema(&crd)
                .properties
                .as_ref()
                .expect("props")
                .contains_key("status")
        );
    }

    #[test]
    fn printer_columns_point_into_the_schema() {
        let crd = CachedImage::crd();
        let root = root_schema(&crd);
        let columns = only_version(&crd)
            .additional_printer_columns
            .as_ref()
            .expect("printer columns");
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        for wanted in ["Image", "Phase", "Size", "Used By", "Digest", "Age"] {
            assert!(
                names.contains(&wanted),
                "missing column {wanted}: {names:?}"
            );
        }
        for column in columns {
            if column.json_path == ".metadata.creationTimestamp" {
                // metadata is the apiserver's, not part of the CRD schema.
                continue;
            }
            let at = schema_at(root, &column.json_path).unwrap_or_else(|| {
                panic!(
                    "column {} path {} not in schema",
                    column.name, column.json_path
                )
            });
            let schema_type = at.type_.as_deref();
            let expected = match column.type_.as_str() {
                "date" => "string",
                other => other,
            };
            assert_eq!(schema_type, Some(expected), "column {} type", column.name);
            if column.type_ == "date" {
                assert_eq!(
                    at.format.as_deref(),
                    Some("date-time"),
                    "column {}",
                    column.name
                );
            }
        }
    }

    #[test]
    fn schema_is_structural() {
        let mut problems = Vec::new();
        for crd in crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            structural_problems(&name, root_schema(&crd), &mut problems);
        }
        assert!(problems.is_empty(), "{problems:#?}");
    }

    fn structural_problems(crd: &str, root: &JSONSchemaProps, problems: &mut Vec<String>) {
        walk(crd, root, &mut |path, s| {
            // Structural rule: every node but the root of a *Of branch declares its type.
            let in_branch = path.contains("Of[");
            if s.type_.is_none() && !in_branch && s.x_kubernetes_int_or_string != Some(true) {
                problems.push(format!("{path}: no type"));
            }
            if s.nullable == Some(true) && s.type_.is_none() {
                problems.push(format!("{path}: nullable without type"));
            }
            if s.ref_path.is_some() {
                problems.push(format!("{path}: $ref is not allowed"));
            }
            if in_branch && (s.type_.is_some() || s.default.is_some() || s.description.is_some()) {
                problems.push(format!("{path}: type/default/description inside *Of"));
            }
        });
    }

    #[test]
    fn every_resource_is_cluster_scoped_with_status_and_columns_in_schema() {
        let names: Vec<String> = crds()
            .iter()
            .map(|c| c.metadata.name.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [
                "cachedimages.larder.dev",
                "precaches.larder.dev",
                "nodecaches.larder.dev"
            ]
        );
        for crd in crds() {
            assert_eq!(crd.spec.scope, "Cluster");
            let version = only_version(&crd);
            assert!(
                version
                    .subresources
                    .as_ref()
                    .is_some_and(|s| s.status.is_some())
            );
            let root = root_schema(&crd);
            for column in version.additional_printer_columns.iter().flatten() {
                if column.json_path == ".metadata.creationTimestamp" {
                    continue;
                }
                assert!(
                    schema_at(root, &column.json_path).is_some(),
                    "{}: column {} path {} not in schema",
                    crd.spec.names.kind,
                    column.name,
                    column.json_path
                );
            }
        }
    }

    #[test]
    fn precache_defaults_fill_in_from_minimal_yaml() {
        let spec: PrecacheSpec =
            serde_json::from_str(r#"{"images":["nginx:1.27"]}"#).expect("minimal spec");
        assert_eq!(spec.max_concurrent, MaxConcurrent::default());
        assert_eq!(spec.refresh, Refresh::Always);
        assert_eq!(spec.node_selector, None);
        let spec: PrecacheSpec =
            serde_json::from_str(r#"{"images":[],"maxConcurrent":{"perNode":5}}"#)
                .expect("partial");
        assert_eq!(spec.max_concurrent.per_node, 5);
        assert_eq!(spec.max_concurrent.nodes, MaxConcurrent::DEFAULT_NODES);
        let ci: CachedImageSpec = serde_json::from_str(
            r#"{"sourceImage":"a/b:c","pullSecrets":[{"namespace":"n","name":"s"}]}"#,
        )
        .expect("pull secrets");
        assert_eq!(ci.pull_secrets[0].name, "s");
        assert!(
            !serde_json::to_string(&CachedImageSpec::new("a/b:c"))
                .expect("json")
                .contains("pullSecrets")
        );
    }

    #[test]
    fn enum_and_time_fields_have_plain_schemas() {
        let crd = CachedImage::crd();
        let root = root_schema(&crd);
        let phase = schema_at(root, ".status.phase").expect("phase");
        assert_eq!(phase.type_.as_deref(), Some("string"));
        let values: Vec<String> = phase
            .enum_
            .iter()
            .flatten()
            .filter_map(|v| v.0.as_str().map(str::to_owned))
            .collect();
        assert_eq!(values, ["Pending", "Copying", "Ready", "Failed"]);
        for time in ["lastSync", "lastUsed", "expiresAt"] {
            let s = schema_at(root, &format!(".status.{time}")).expect(time);
            assert_eq!(s.type_.as_deref(), Some("string"), "{time}");
            assert_eq!(s.format.as_deref(), Some("date-time"), "{time}");
        }
        let conditions = schema_at(root, ".status.conditions").expect("conditions");
        assert_eq!(conditions.x_kubernetes_list_type.as_deref(), Some("map"));
        assert_eq!(
            conditions.x_kubernetes_list_map_keys.as_deref(),
            Some(&["type".to_owned()][..])
        );
        let pods = schema_at(root, ".status.usedBy.pods").expect("pods");
        assert_eq!(pods.max_items, Some(USED_BY_CAP as i64));
        let described = pods.description.as_deref().unwrap_or_default();
        assert!(described.contains(&USED_BY_CAP.to_string()), "{described}");
        let spec = schema_at(root, ".spec").expect("spec");
        assert_eq!(
            spec.required.as_deref(),
            Some(&["sourceImage".to_owned()][..])
        );
    }

    #[test]
    fn yaml_round_trips_into_crds() {
        let yaml = crds_yaml().expect("yaml");
        assert!(yaml.starts_with("---\n"));
        let parsed: Vec<CustomResourceDefinition> = serde_yaml::Deserializer::from_str(&yaml)
            .map(CustomResourceDefinition::deserialize)
            .collect::<Result<_, _>>()
            .expect("every document is a CRD");
        assert_eq!(parsed, crds());
        let value: serde_yaml::Value = serde_yaml::Deserializer::from_str(&yaml)
            .next()
            .map(serde_yaml::Value::deserialize)
            .expect("a first document")
            .expect("first document");
        assert_eq!(
            value["apiVersion"].as_str(),
            Some("apiextensions.k8s.io/v1")
        );
        assert_eq!(value["kind"].as_str(), Some("CustomResourceDefinition"));
    }

    #[test]
    fn status_serialises_camel_case_and_omits_empty() {
        let status = CachedImageStatus {
            phase: Some(Phase::Copying),
            size_bytes: Some(10),
            copied_bytes: Some(4),
            used_by: Some(UsedBy::from_pods(["b/p", "a/p"])),
            ..CachedImageStatus::default()
        };
        let json = serde_json::to_value(&status).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "phase": "Copying",
                "sizeBytes": 10,
                "copiedBytes": 4,
                "usedBy": {"count": 2, "pods": ["a/p", "b/p"]},
            })
        );
        // An empty pod list is written, so a merge patch clears the old names.
        assert_eq!(
            serde_json::to_value(UsedBy::default()).expect("json"),
            serde_json::json!({"count": 0, "pods": []})
        );
        let empty: CachedImageStatus = serde_json::from_str("{}").expect("empty status");
        assert_eq!(empty, CachedImageStatus::default());
        let spec: CachedImageSpec =
            serde_json::from_str(r#"{"sourceImage":"docker.io/library/nginx:1.27"}"#)
                .expect("spec");
        assert_eq!(spec, CachedImageSpec::new("docker.io/library/nginx:1.27"));
    }

    #[test]
    fn time_fields_round_trip_rfc3339() {
        let json = r#"{"lastUsed":"2026-05-01T12:30:00Z"}"#;
        let status: CachedImageStatus = serde_json::from_str(json).expect("parse");
        assert!(status.last_used.is_some());
        assert_eq!(serde_json::to_string(&status).expect("print"), json);
    }

    #[test]
    fn used_by_counts_everything_lists_a_sorted_capped_sample() {
        let pods: Vec<String> = (0..USED_BY_CAP + 5)
            .rev()
            .map(|i| format!("ns/pod-{i:03}"))
            .collect();
        let mut with_duplicate = pods.clone();
        with_duplicate.push(pods[0].clone());
        let used = UsedBy::from_pods(with_duplicate);
        assert_eq!(used.count as usize, USED_BY_CAP + 5);
        assert_eq!(used.pods.len(), USED_BY_CAP);
        assert_eq!(used.pods[0], "ns/pod-000");
        assert!(used.pods.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(UsedBy::from_pods(Vec::<String>::new()), UsedBy::default());
    }

    #[test]
    fn phase_names_match_serde() {
        for phase in Phase::ALL {
            assert_eq!(
                serde_json::to_value(phase).expect("json"),
                serde_json::Value::String(phase.to_string())
            );
        }
    }
}
