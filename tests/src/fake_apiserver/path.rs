//! Resource paths: `/api/v1/[namespaces/NS/]PLURAL[/NAME[/SUB]]` and
//! `/apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME[/SUB]]`.

use super::error::ApiError;

/// One parsed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourcePath {
    /// API group; empty for the core group (`/api/v1`).
    pub group: String,
    /// API version (`v1`, `v1alpha1`, ...).
    pub version: String,
    /// The namespace in the path, if any.
    pub namespace: Option<String>,
    /// Resource plural (`pods`, `cachedimages`).
    pub plural: String,
    /// Object name, for single-object requests.
    pub name: Option<String>,
    /// Subresource (`status`), if any.
    pub subresource: Option<String>,
}

impl ResourcePath {
    /// Parses a request path (without query).
    pub fn parse(path: &str) -> Result<Self, ApiError> {
        let not_found = || ApiError::not_found_path(path);
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return Err(not_found()),
        };
        // `/namespaces/NAME/status` is the namespace's own subresource, not a resource called
        // `status` inside namespace NAME.
        let namespaced = rest.first() == Some(&"namespaces")
            && rest.len() >= 3
            && !(rest.len() == 3 && matches!(rest[2], "status" | "finalize"));
        let (namespace, rest) = if namespaced {
            (Some(rest[1].to_owned()), &rest[2..])
        } else {
            (None, rest)
        };
        let (plural, name, subresource) = match rest {
            [plural] => (*plural, None, None),
            [plural, name] => (*plural, Some(*name), None),
            [plural, name, sub] => (*plural, Some(*name), Some(*sub)),
            _ => return Err(not_found()),
        };
        Ok(Self {
            group: group.to_owned(),
            version: version.to_owned(),
            namespace,
            plural: plural.to_owned(),
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    }

    /// The storage key of the resource: `GROUP/PLURAL` (`/pods` for core). Versions share storage.
    pub fn resource_key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// `apiVersion` of objects at this path.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `PLURAL[/SUB]`, for request statistics.
    pub fn stats_name(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.plural),
            None => self.plural.clone(),
        }
    }

    /// The same path without name and subresource (the collection).
    pub fn collection(&self) -> Self {
        Self {
            name: None,
            subresource: None,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ResourcePath {
        ResourcePath::parse(s).unwrap_or_else(|e| panic!("{s}: {e:?}"))
    }

    #[test]
    fn core_and_group_paths() {
        let pods = p("/api/v1/namespaces/ns1/pods/web/status");
        assert_eq!(pods.group, "");
        assert_eq!(pods.namespace.as_deref(), Some("ns1"));
        assert_eq!(pods.plural, "pods");
        assert_eq!(pods.name.as_deref(), Some("web"));
        assert_eq!(pods.subresource.as_deref(), Some("status"));
        assert_eq!(pods.resource_key(), "/pods");

        let all = p("/api/v1/pods");
        assert_eq!((all.namespace, all.name), (None, None));

        let ci = p("/apis/larder.dev/v1alpha1/cachedimages/x");
        assert_eq!(ci.resource_key(), "larder.dev/cachedimages");
        assert_eq!(ci.api_version(), "larder.dev/v1alpha1");
        assert_eq!(ci.namespace, None);

        let lease = p("/apis/coordination.k8s.io/v1/namespaces/n/leases");
        assert_eq!(lease.plural, "leases");
        assert_eq!(lease.name, None);
    }

    #[test]
    fn namespaces_themselves() {
        let ns = p("/api/v1/namespaces/n1");
        assert_eq!(ns.plural, "namespaces");
        assert_eq!(ns.name.as_deref(), Some("n1"));
        let status = p("/api/v1/namespaces/n1/status");
        assert_eq!(status.plural, "namespaces");
        assert_eq!(status.subresource.as_deref(), Some("status"));
        assert_eq!(p("/api/v1/namespaces").name, None);
    }

    #[test]
    fn unknown_shapes_are_not_found() {
        for bad in ["/", "/healthz", "/api", "/api/v1/namespaces/n/pods/a/b/c"] {
            assert_eq!(
                ResourcePath::parse(bad).map_err(|e| e.code),
                Err(404),
                "{bad}"
            );
        }
    }
}
