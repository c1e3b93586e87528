//! The object store: every resource kept as JSON under one global `resourceVersion` counter,
//! with a bounded history of changes that watches replay.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::error::ApiError;
use super::patch::{self, PatchKind};
use super::path::ResourcePath;
use super::selector::{FieldSelector, LabelSelector};

/// The CRD resource: creating one registers its resource (kind, status subresource).
const CRD_RESOURCE: &str = "apiextensions.k8s.io/customresourcedefinitions";

/// What kind of change a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created.
    Added,
    /// Updated (including a deletion that is waiting for finalizers).
    Modified,
    /// Removed.
    Deleted,
}

/// One entry of the change history.
#[derive(Debug, Clone)]
pub struct Change {
    /// The `resourceVersion` this change produced.
    pub rv: u64,
    /// Storage key of the resource (`GROUP/PLURAL`).
    pub resource: String,
    /// The object's namespace (empty when cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub kind: ChangeKind,
    /// The object before (for `Modified`), so label-filtered watches can turn a change that
    /// leaves their selection into `DELETED`.
    pub old: Option<Arc<Value>>,
    /// The object after (the last state for `Deleted`).
    pub new: Arc<Value>,
}

/// What a resource is, as far as the fake cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceInfo {
    /// `kind` of its objects.
    pub kind: String,
    /// Whether `status` is a subresource: main writes then leave status alone, and
    /// `…/status` writes change only status.
    pub status_subresource: bool,
}

fn builtin(resource: &str) -> Option<ResourceInfo> {
    let (kind, status) = match resource {
        "/pods" => ("Pod", true),
        "/namespaces" => ("Namespace", true),
        "/nodes" => ("Node", true),
        "/services" => ("Service", true),
        "/secrets" => ("Secret", false),
        "/configmaps" => ("ConfigMap", false),
        "/serviceaccounts" => ("ServiceAccount", false),
        "/events" => ("Event", false),
        "events.k8s.io/events" => ("Event", false),
        "coordination.k8s.io/leases" => ("Lease", false),
        "apps/deployments" => ("Deployment", true),
        "apps/daemonsets" => ("DaemonSet", true),
        CRD_RESOURCE => ("CustomResourceDefinition", true),
        _ => return None,
    };
    Some(ResourceInfo {
        kind: kind.to_owned(),
        status_subresource: status,
    })
}

/// Options of a list request.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
    /// `limit` (page size); `None` or 0: everything.
    pub limit: Option<usize>,
    /// `continue` token from the previous page.
    pub continue_token: Option<String>,
}

/// Which objects a watch or list selects.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Storage key of the resource.
    pub resource: String,
    /// Only this namespace, if set.
    pub namespace: Option<String>,
    /// `labelSelector`.
    pub labels: LabelSelector,
    /// `fieldSelector`.
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether `object` (already known to be of this resource) is selected.
    pub fn matches(&self, namespace: &str, object: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
            && self.labels.matches(object)
            && self.fields.matches(object)
    }
}

/// Writes per resource, for `/fake/stats`.
#[derive(Debug, Default)]
struct WriteStats {
    count: u64,
    objects: BTreeSet<(String, String)>,
}

type ObjectKey = (String, String);

/// Watch events: type (`ADDED`, `MODIFIED`, `DELETED`) and object.
pub type WatchEvents = Vec<(&'static str, Arc<Value>)>;

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    objects: HashMap<String, BTreeMap<ObjectKey, Arc<Value>>>,
    history: VecDeque<Change>,
    /// Changes at or below this version are no longer in `history`.
    compacted: u64,
    registered: HashMap<String, ResourceInfo>,
    writes: BTreeMap<String, WriteStats>,
    requests: BTreeMap<String, u64>,
}

/// The shared store.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    history_cap: usize,
    changed: watch::Sender<u64>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn meta(object: &Value) -> Option<&Map<String, Value>> {
    object.get("metadata").and_then(Value::as_object)
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object)
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

fn meta_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata must be an object"))
}

fn finalizers(object: &Value) -> Vec<String> {
    meta(object)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Drops what Go's `omitempty` drops, so stored objects look like the apiserver's: null
/// top-level fields, and null or empty metadata lists and maps.
fn normalize(object: &mut Value) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    map.retain(|_, v| !v.is_null());
    if let Some(Value::Object(meta)) = map.get_mut("metadata") {
        meta.retain(|_, v| match v {
            Value::Null => false,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            Value::String(s) => !s.is_empty(),
            _ => true,
        });
    }
}

/// Everything but metadata and status: a change here bumps `metadata.generation`.
fn spec_part(object: &Value) -> Value {
    let mut v = object.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    v
}

impl Store {
    /// An empty store keeping at most `history_cap` changes for watches to resume from.
    pub fn new(history_cap: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            history_cap: history_cap.max(1),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves plain data; keep serving it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notified with the new `resourceVersion` after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The current `resourceVersion`.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// What the fake knows about a resource (built in, or registered by a CRD).
    pub fn info(&self, p: &ResourcePath) -> ResourceInfo {
        self.lock().info(p)
    }

    /// Counts one request (`VERB plural[/sub]`) for `/fake/stats`.
    pub fn count_request(&self, verb: &str, p: &ResourcePath) {
        *self
            .lock()
            .requests
            .entry(format!("{verb} {}", p.stats_name()))
            .or_default() += 1;
    }

    /// Request counts, writes per resource (and how many distinct objects they touched),
    /// object counts and the current `resourceVersion`.
    pub fn stats(&self) -> Value {
        let inner = self.lock();
        let writes: Map<String, Value> = inner
            .writes
            .iter()
            .map(|(k, w)| {
                (
                    k.clone(),
                    json!({"count": w.count, "objects": w.objects.len()}),
                )
            })
            .collect();
        let mut objects: Vec<(&String, usize)> =
            inner.objects.iter().map(|(k, m)| (k, m.len())).collect();
        objects.sort();
        json!({
            "resourceVersion": inner.rv,
            "requests": inner.requests,
            "writes": writes,
            "objects": objects.into_iter().collect::<BTreeMap<_, _>>(),
            "history": inner.history.len(),
        })
    }

    /// `GET` one object.
    pub fn get(&self, p: &ResourcePath) -> Result<Value, ApiError> {
        let inner = self.lock();
        let name = p.name.as_deref().unwrap_or_default();
        inner
            .object(p, name)
            .map(|o| (*o).clone())
            .ok_or_else(|| ApiError::not_found(&p.plural, name))
    }

    /// Every selected object (sorted by namespace and name) and the current version.
    pub fn snapshot(&self, filter: &Filter) -> (Vec<Arc<Value>>, u64) {
        let inner = self.lock();
        let items = inner
            .objects
            .get(&filter.resource)
            .into_iter()
            .flatten()
            .filter(|((ns, _), o)| filter.matches(ns, o))
            .map(|(_, o)| o.clone())
            .collect();
        (items, inner.rv)
    }

    /// `LIST`, with `limit`/`continue` pages. A page's `resourceVersion` is the version of the
    /// first page, so a watch started from it replays whatever changed while paging.
    pub fn list(&self, p: &ResourcePath, options: &ListOptions) -> Result<Value, ApiError> {
        let inner = self.lock();
        let (list_rv, after) = match options.continue_token.as_deref() {
            Some(token) if !token.is_empty() => {
                let bad = || ApiError::bad_request(format!("invalid continue token {token:?}"));
                let (rv, key) = token.split_once('|').ok_or_else(bad)?;
                let (ns, name) = key.split_once('/').ok_or_else(bad)?;
                let rv: u64 = rv.parse().map_err(|_| bad())?;
                if rv < inner.compacted {
                    return Err(ApiError::gone(rv));
                }
                (rv, Some((ns.to_owned(), name.to_owned())))
            }
            _ => (inner.rv, None),
        };
        let filter = Filter {
            resource: p.resource_key(),
            namespace: p.namespace.clone(),
            labels: options.labels.clone(),
            fields: options.fields.clone(),
        };
        let limit = options.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let empty = BTreeMap::new();
        let all = inner.objects.get(&filter.resource).unwrap_or(&empty);
        let range = match &after {
            Some(key) => all.range::<ObjectKey, _>((
                std::ops::Bound::Excluded(key),
                std::ops::Bound::Unbounded,
            )),
            None => all.range::<ObjectKey, _>(..),
        };
        let mut items = Vec::new();
        let mut last_key: Option<&ObjectKey> = None;
        let mut continue_token = None;
        for (key, o) in range {
            if !filter.matches(&key.0, o) {
                continue;
            }
            if items.len() == limit {
                // More remain: the next page resumes after the last item returned.
                if let Some((ns, name)) = last_key {
                    continue_token = Some(format!("{list_rv}|{ns}/{name}"));
                }
                break;
            }
            items.push((**o).clone());
            last_key = Some(key);
        }
        let info = inner.info(p);
        let mut metadata = json!({"resourceVersion": list_rv.to_string()});
        if let Some(token) = continue_token {
            metadata["continue"] = json!(token);
        }
        Ok(json!({
            "apiVersion": p.api_version(),
            "kind": format!("{}List", info.kind),
            "metadata": metadata,
            "items": items,
        }))
    }

    /// `POST`: creates an object (409 AlreadyExists when the name is taken).
    pub fn create(&self, p: &ResourcePath, body: Value) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let out = inner.create(p, body, self.history_cap)?;
        let rv = inner.rv;
        drop(inner);
        self.changed.send_replace(rv);
        Ok(out)
    }

    /// `PUT` (on the object or its `status`): 409 Conflict when `metadata.resourceVersion` is
    /// set and not the current one.
    pub fn replace(&self, p: &ResourcePath, body: Value) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let name = p.name.clone().unwrap_or_default();
        let old = inner
            .object(p, &name)
            .ok_or_else(|| ApiError::not_found(&p.plural, &name))?;
        if meta_str(&body, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name in the URL",
            ));
        }
        let out = inner.update(p, old, body, self.history_cap)?;
        let rv = inner.rv;
        drop(inner);
        self.changed.send_replace(rv);
        Ok(out)
    }

    /// `PATCH` (on the object or its `status`). Apply patches create missing objects.
    pub fn patch(&self, p: &ResourcePath, kind: PatchKind, body: &[u8]) -> Result<Value, ApiError> {
        let patch_doc = patch::parse_body(kind, body)?;
        let mut inner = self.lock();
        let name = p.name.clone().unwrap_or_default();
        let out = match inner.object(p, &name) {
            Some(old) => {
                let mut doc = (*old).clone();
                patch::apply(kind, &mut doc, &patch_doc)?;
                inner.update(p, old, doc, self.history_cap)?
            }
            None if kind == PatchKind::Apply && p.subresource.is_none() => {
                let mut doc = patch_doc;
                meta_mut(&mut doc)?.insert("name".into(), json!(name));
                inner.create(&p.collection(), doc, self.history_cap)?
            }
            None => return Err(ApiError::not_found(&p.plural, &name)),
        };
        let rv = inner.rv;
        drop(inner);
        self.changed.send_replace(rv);
        Ok(out)
    }

    /// `DELETE`: with finalizers, sets `deletionTimestamp` and keeps the object until they are
    /// all removed; otherwise removes it. Deleting a namespace deletes what is in it.
    pub fn delete(&self, p: &ResourcePath) -> Result<Value, ApiError> {
        let mut inner = self.lock();
        let name = p.name.clone().unwrap_or_default();
        let out = inner.delete(p, &name, self.history_cap)?;
        if p.resource_key() == "/namespaces" && p.namespace.is_none() {
            let victims: Vec<(String, String)> = inner
                .objects
                .iter()
                .flat_map(|(res, objs)| {
                    objs.keys()
                        .filter(|(ns, _)| *ns == name)
                        .map(move |(_, n)| (res.clone(), n.clone()))
                })
                .collect();
            for (resource, victim) in victims {
                let (group, plural) = resource.split_once('/').unwrap_or_default();
                let vp = ResourcePath {
                    group: group.to_owned(),
                    version: String::new(),
                    namespace: Some(name.clone()),
                    plural: plural.to_owned(),
                    name: Some(victim.clone()),
                    subresource: None,
                };
                let _ = inner.delete(&vp, &victim, self.history_cap);
            }
        }
        let rv = inner.rv;
        drop(inner);
        self.changed.send_replace(rv);
        Ok(out)
    }

    /// Up to `max` changes after `after` that `filter` selects, as watch event kinds and
    /// objects, and the version to resume from. 410 Gone when `after` is older than the history.
    pub fn changes_since(
        &self,
        after: u64,
        filter: &Filter,
        max: usize,
    ) -> Result<(WatchEvents, u64), ApiError> {
        let inner = self.lock();
        if after < inner.compacted {
            return Err(ApiError::gone(after));
        }
        let start = inner.history.partition_point(|c| c.rv <= after);
        let mut out = Vec::new();
        // Everything up to the current version has been looked at unless the page filled up.
        let mut cursor = inner.rv;
        for change in inner.history.range(start..) {
            if out.len() >= max {
                break;
            }
            cursor = change.rv;
            if change.resource != filter.resource {
                continue;
            }
            let now = filter.matches(&change.namespace, &change.new);
            let before = change
                .old
                .as_ref()
                .is_some_and(|o| filter.matches(&change.namespace, o));
            let kind = match (change.kind, before, now) {
                (ChangeKind::Added, _, true) => "ADDED",
                (ChangeKind::Deleted, _, true) => "DELETED",
                (ChangeKind::Modified, true, true) => "MODIFIED",
                (ChangeKind::Modified, true, false) => "DELETED",
                (ChangeKind::Modified, false, true) => "ADDED",
                _ => continue,
            };
            out.push((kind, change.new.clone()));
        }
        if out.len() < max {
            cursor = inner.rv;
        }
        Ok((out, cursor))
    }
}

impl Inner {
    fn info(&self, p: &ResourcePath) -> ResourceInfo {
        let key = p.resource_key();
        if let Some(info) = builtin(&key).or_else(|| self.registered.get(&key).cloned()) {
            return info;
        }
        // Unknown resource: guess the kind from a stored object, else from the plural.
        let kind = self
            .objects
            .get(&key)
            .and_then(|m| m.values().next())
            .and_then(|o| o.get("kind").and_then(Value::as_str))
            .map(str::to_owned)
            .unwrap_or_else(|| {
                let mut k = p.plural.trim_end_matches('s').to_owned();
                if let Some(first) = k.get_mut(0..1) {
                    first.make_ascii_uppercase();
                }
                k
            });
        ResourceInfo {
            kind,
            status_subresource: false,
        }
    }

    fn object(&self, p: &ResourcePath, name: &str) -> Option<Arc<Value>> {
        let key = (p.namespace.clone().unwrap_or_default(), name.to_owned());
        self.objects.get(&p.resource_key())?.get(&key).cloned()
    }

    fn record(&mut self, change: Change, cap: usize, write: &str) {
        let name = meta_str(&change.new, "name").unwrap_or_default().to_owned();
        let w = self.writes.entry(write.to_owned()).or_default();
        w.count += 1;
        w.objects.insert((change.namespace.clone(), name));
        self.history.push_back(change);
        while self.history.len() > cap {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn create(&mut self, p: &ResourcePath, mut body: Value, cap: usize) -> Result<Value, ApiError> {
        if p.name.is_some() {
            return Err(ApiError::method_not_allowed(format!(
                "POST is not supported on {} with a name",
                p.plural
            )));
        }
        let info = self.info(p);
        let namespace = p.namespace.clone().unwrap_or_default();
        let meta = meta_mut(&mut body)?;
        if let Some(ns) = meta.get("namespace").and_then(Value::as_str)
            && !ns.is_empty()
            && p.namespace.as_deref().is_some_and(|pns| pns != ns)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    format!("{prefix}{}", &hex::encode(rand::random::<[u8; 3]>())[..5])
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "{}: metadata.name or metadata.generateName is required",
                        p.plural
                    )));
                }
            },
        };
        let resource = p.resource_key();
        let key = (namespace.clone(), name.clone());
        if self
            .objects
            .get(&resource)
            .is_some_and(|m| m.contains_key(&key))
        {
            return Err(ApiError::already_exists(&p.plural, &name));
        }
        let rv = self.next_rv();
        meta.insert("name".into(), json!(name));
        if p.namespace.is_some() {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("uid".into(), json!(uid()));
        meta.insert("creationTimestamp".into(), json!(now()));
        meta.insert("generation".into(), json!(1));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        if let Some(map) = body.as_object_mut() {
            if info.status_subresource {
                map.remove("status");
            }
            if resource == "/pods" {
                map.insert("status".into(), json!({"phase": "Pending"}));
            }
            map.entry("apiVersion")
                .or_insert_with(|| json!(p.api_version()));
            map.entry("kind").or_insert_with(|| json!(info.kind));
        }
        if resource == CRD_RESOURCE {
            self.register_crd(&mut body);
        }
        normalize(&mut body);
        let object = Arc::new(body);
        self.objects
            .entry(resource.clone())
            .or_default()
            .insert(key, object.clone());
        self.record(
            Change {
                rv,
                resource,
                namespace,
                kind: ChangeKind::Added,
                old: None,
                new: object.clone(),
            },
            cap,
            &p.stats_name(),
        );
        Ok((*object).clone())
    }

    /// Registers the resource a CRD defines and marks the CRD Established.
    fn register_crd(&mut self, crd: &mut Value) {
        let spec = crd.get("spec").cloned().unwrap_or_default();
        let group = spec["group"].as_str().unwrap_or_default().to_owned();
        let plural = spec["names"]["plural"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let kind = spec["names"]["kind"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let versions = spec["versions"].as_array().cloned().unwrap_or_default();
        let status_subresource = versions
            .iter()
            .any(|v| v.pointer("/subresources/status").is_some());
        self.registered.insert(
            format!("{group}/{plural}"),
            ResourceInfo {
                kind,
                status_subresource,
            },
        );
        let stored: Vec<Value> = versions
            .iter()
            .filter(|v| v["storage"].as_bool() == Some(true))
            .map(|v| v["name"].clone())
            .collect();
        let now = now();
        if let Some(map) = crd.as_object_mut() {
            map.insert(
                "status".into(),
                json!({
                    "acceptedNames": spec["names"],
                    "storedVersions": stored,
                    "conditions": [
                        {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                         "message": "no conflicts found", "lastTransitionTime": now},
                        {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                         "message": "the initial names have been accepted", "lastTransitionTime": now},
                    ],
                }),
            );
        }
    }

    fn update(
        &mut self,
        p: &ResourcePath,
        old: Arc<Value>,
        mut new: Value,
        cap: usize,
    ) -> Result<Value, ApiError> {
        let name = p.name.clone().unwrap_or_default();
        let current_rv = meta_str(&old, "resourceVersion")
            .unwrap_or_default()
            .to_owned();
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && rv != current_rv
        {
            return Err(ApiError::conflict(&p.plural, &name));
        }
        if !new.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        let info = self.info(p);
        let status_write = p.subresource.as_deref() == Some("status");
        if let Some(sub) = p.subresource.as_deref()
            && !status_write
        {
            return Err(ApiError::not_found_path(&format!("{}/{sub}", p.plural)));
        }
        if status_write {
            // Only status changes; everything else stays as stored.
            let status = new.get("status").cloned();
            new = (*old).clone();
            match status {
                Some(s) => new["status"] = s,
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        } else if info.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(m) = new.as_object_mut() {
                        m.remove("status");
                    }
                }
            }
        }
        // System metadata is the server's.
        let deleting = meta(&old)
            .and_then(|m| m.get("deletionTimestamp"))
            .is_some();
        {
            let old_meta = meta(&old).cloned().unwrap_or_default();
            let meta = meta_mut(&mut new)?;
            for field in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(field) {
                    Some(v) => meta.insert(field.into(), v.clone()),
                    None => meta.remove(field),
                };
            }
        }
        if deleting {
            let before = finalizers(&old);
            if let Some(added) = finalizers(&new).iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(format!(
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers [\"{added}\"]"
                )));
            }
        }
        if spec_part(&old) != spec_part(&new) {
            let generation = meta(&old)
                .and_then(|m| m.get("generation"))
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new)?.insert("generation".into(), json!(generation + 1));
        }
        normalize(&mut new);
        if new == *old {
            // A no-op write changes nothing, not even the resourceVersion (as upstream).
            return Ok(new);
        }
        let rv = self.next_rv();
        meta_mut(&mut new)?.insert("resourceVersion".into(), json!(rv.to_string()));
        let namespace = p.namespace.clone().unwrap_or_default();
        let resource = p.resource_key();
        let gone = deleting && finalizers(&new).is_empty();
        let object = Arc::new(new);
        let objects = self.objects.entry(resource.clone()).or_default();
        let key = (namespace.clone(), name);
        if gone {
            objects.remove(&key);
        } else {
            objects.insert(key, object.clone());
        }
        if resource == CRD_RESOURCE && gone {
            self.unregister_crd(&object);
        }
        self.record(
            Change {
                rv,
                resource,
                namespace,
                kind: if gone {
                    ChangeKind::Deleted
                } else {
                    ChangeKind::Modified
                },
                old: Some(old),
                new: object.clone(),
            },
            cap,
            &p.stats_name(),
        );
        Ok((*object).clone())
    }

    fn unregister_crd(&mut self, crd: &Value) {
        let spec = &crd["spec"];
        let key = format!(
            "{}/{}",
            spec["group"].as_str().unwrap_or_default(),
            spec["names"]["plural"].as_str().unwrap_or_default()
        );
        self.registered.remove(&key);
    }

    fn delete(&mut self, p: &ResourcePath, name: &str, cap: usize) -> Result<Value, ApiError> {
        let old = self
            .object(p, name)
            .ok_or_else(|| ApiError::not_found(&p.plural, name))?;
        let namespace = p.namespace.clone().unwrap_or_default();
        let resource = p.resource_key();
        let pending = !finalizers(&old).is_empty();
        if pending
            && meta(&old)
                .and_then(|m| m.get("deletionTimestamp"))
                .is_some()
        {
            // Already waiting for its finalizers: nothing changes.
            return Ok((*old).clone());
        }
        let rv = self.next_rv();
        let mut new = (*old).clone();
        let meta = meta_mut(&mut new)?;
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        if pending {
            meta.insert("deletionTimestamp".into(), json!(now()));
            meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        }
        let object = Arc::new(new);
        let objects = self.objects.entry(resource.clone()).or_default();
        let key = (namespace.clone(), name.to_owned());
        if pending {
            objects.insert(key, object.clone());
        } else {
            objects.remove(&key);
            if resource == CRD_RESOURCE {
                self.unregister_crd(&object);
            }
        }
        self.record(
            Change {
                rv,
                resource,
                namespace,
                kind: if pending {
                    ChangeKind::Modified
                } else {
                    ChangeKind::Deleted
                },
                old: Some(old),
                new: object.clone(),
            },
            cap,
            &format!("{} delete", p.plural),
        );
        Ok((*object).clone())
    }
}
