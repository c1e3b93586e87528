use serde_json::json;

use super::*;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn config() -> MutationConfig {
    MutationConfig {
        proxy_address: "localhost:7439".into(),
        exclude: Exclusions::new([r"^quay\.io/excluded/", r"^docker\.io/library/busybox:"])
            .unwrap(),
        pull_secrets: crate::pull_secrets::PullSecretsMode::Skip,
    }
}

fn pod_json(spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns"}, "spec": spec})
}

/// Mutates `raw`, applies the patch to it and returns the patched pod (and the mutation).
fn apply(raw: &Value, scope: &Scope) -> (Value, Mutation) {
    apply_with(raw, scope, PullSecretPlan::Unresolved)
}

/// [`apply`] with a pull-secret plan.
fn apply_with(raw: &Value, scope: &Scope, plan: PullSecretPlan<'_>) -> (Value, Mutation) {
    let pod: Pod = serde_json::from_value(raw.clone()).unwrap();
    let m = mutate(&pod, scope, &config(), plan);
    let mut doc = raw.clone();
    json_patch::patch(&mut doc, &m.patch).unwrap_or_else(|e| panic!("{e}: {:?}", m.patch));
    (doc, m)
}

fn originals(doc: &Value) -> BTreeMap<String, String> {
    let text = doc["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION]
        .as_str()
        .expect("annotation present");
    serde_json::from_str(text).unwrap()
}

#[test]
fn image_table() {
    let long_path = format!("ghcr.io/{}/app", "a".repeat(230));
    let rewritten = |s: &str| Action::Rewritten(format!("localhost:7439/{s}"));
    let skipped = Action::Skipped;
    let cases: Vec<(String, Option<&str>, Action)> = vec![
        // Docker Hub short names and their normal forms.
        (
            "nginx".to_owned(),
            None,
            rewritten("docker.io/library/nginx:latest"),
        ),
        (
            "nginx:1.27".to_owned(),
            None,
            rewritten("docker.io/library/nginx:1.27"),
        ),
        (
            "library/nginx:1.27".to_owned(),
            None,
            rewritten("docker.io/library/nginx:1.27"),
        ),
        (
            "bitnami/redis:7.2".to_owned(),
            None,
            rewritten("docker.io/bitnami/redis:7.2"),
        ),
        (
            "docker.io/nginx".to_owned(),
            None,
            rewritten("docker.io/library/nginx:latest"),
        ),
        (
            "index.docker.io/library/nginx:1".to_owned(),
            None,
            rewritten("docker.io/library/nginx:1"),
        ),
        // Other registries, ports, IPs, case of the host.
        (
            "ghcr.io/org/app:v1".to_owned(),
            None,
            rewritten("ghcr.io/org/app:v1"),
        ),
        (
            "Registry.Example.COM/team/app:2".to_owned(),
            None,
            rewritten("registry.example.com/team/app:2"),
        ),
        (
            "registry.example.com:5000/team/app:2".to_owned(),
            None,
            rewritten("registry.example.com_5000/team/app:2"),
        ),
        (
            "10.0.0.1:5000/app".to_owned(),
            None,
            rewritten("10.0.0.1_5000/app:latest"),
        ),
        (
            "10.0.0.1/app:1".to_owned(),
            None,
            rewritten("10.0.0.1/app:1"),
        ),
        // Digests are kept, with or without a tag.
        (
            format!("nginx@{DIGEST}"),
            None,
            Action::Rewritten(format!("localhost:7439/docker.io/library/nginx@{DIGEST}")),
        ),
        (
            format!("ghcr.io/o/a:1.0@{DIGEST}"),
            None,
            Action::Rewritten(format!("localhost:7439/ghcr.io/o/a:1.0@{DIGEST}")),
        ),
        // Pull policies other than Never do not matter.
        (
            "nginx:1".to_owned(),
            Some("Always"),
            rewritten("docker.io/library/nginx:1"),
        ),
        (
            "nginx:1".to_owned(),
            Some("IfNotPresent"),
            rewritten("docker.io/library/nginx:1"),
        ),
        // Skips.
        (
            "nginx:1".to_owned(),
            Some("Never"),
            skipped(Skip::PullPolicyNever),
        ),
        ("".to_owned(), None, skipped(Skip::NoImage)),
        (
            "localhost:7439/docker.io/library/nginx:1".to_owned(),
            None,
            skipped(Skip::OnProxy),
        ),
        (
            "LOCALHOST:7439/ghcr.io/o/a:1".to_owned(),
            None,
            skipped(Skip::OnProxy),
        ),
        (
            "localhost:5000/app:1".to_owned(),
            None,
            skipped(Skip::Loopback),
        ),
        ("localhost/app".to_owned(), None, skipped(Skip::Loopback)),
        (
            "127.0.0.1:5000/app".to_owned(),
            None,
            skipped(Skip::Loopback),
        ),
        ("127.1.2.3/app".to_owned(), None, skipped(Skip::Loopback)),
        ("[::1]:5000/app".to_owned(), None, skipped(Skip::Loopback)),
        (
            "[fd00::1]:5000/app".to_owned(),
            None,
            skipped(Skip::NotRewritable),
        ),
        (long_path, None, skipped(Skip::NotRewritable)),
        (
            "quay.io/excluded/thing:1".to_owned(),
            None,
            skipped(Skip::Excluded),
        ),
        // Exclusions also see the canonical form.
        ("busybox:1.36".to_owned(), None, skipped(Skip::Excluded)),
        ("busybox".to_owned(), None, skipped(Skip::Excluded)),
        ("Nginx".to_owned(), None, skipped(Skip::InvalidReference)),
        (
            "nginx:bad tag".to_owned(),
            None,
            skipped(Skip::InvalidReference),
        ),
        (
            "nginx@sha256:short".to_owned(),
            None,
            skipped(Skip::InvalidReference),
        ),
    ];
    for (image, policy, expected) in cases {
        let (action, detail) = decide(Some(&image), policy, &config());
        assert_eq!(action, expected, "image {image:?} policy {policy:?}");
        let needs_detail = matches!(
            action,
            Action::Skipped(Skip::InvalidReference | Skip::NotRewritable)
        );
        assert_eq!(detail.is_some(), needs_detail, "detail for {image:?}");
    }
    assert_eq!(
        decide(None, None, &config()).0,
        Action::Skipped(Skip::NoImage)
    );
}

#[test]
fn every_container_list_is_rewritten_and_recorded() {
    let raw = pod_json(json!({
        "initContainers": [{"name": "setup", "image": "busybox:1.36"}, {"name": "migrate", "image": "ghcr.io/o/migrate:3"}],
        "containers": [
            {"name": "app", "image": "nginx:1.27"},
            {"name": "sidecar", "image": "registry.example.com:5000/side@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},
            {"name": "local", "image": "localhost:5000/dev", "imagePullPolicy": "Never"}
        ],
        "ephemeralContainers": [{"name": "debug", "image": "alpine"}]
    }));
    let (doc, m) = apply(&raw, &Scope::Create);
    assert_eq!(m.rewritten(), 4);
    assert_eq!(
        doc["spec"]["containers"][0]["image"],
        "localhost:7439/docker.io/library/nginx:1.27"
    );
    assert_eq!(
        doc["spec"]["containers"][1]["image"],
        format!("localhost:7439/registry.example.com_5000/side@{DIGEST}")
    );
    assert_eq!(doc["spec"]["containers"][2]["image"], "localhost:5000/dev");
    assert_eq!(
        doc["spec"]["initContainers"][0]["image"], "busybox:1.36",
        "excluded"
    );
    assert_eq!(
        doc["spec"]["initContainers"][1]["image"],
        "localhost:7439/ghcr.io/o/migrate:3"
    );
    assert_eq!(
        doc["spec"]["ephemeralContainers"][0]["image"],
        "localhost:7439/docker.io/library/alpine:latest"
    );
    assert_eq!(
        originals(&doc),
        BTreeMap::from([
            ("app".to_owned(), "nginx:1.27".to_owned()),
            (
                "sidecar".to_owned(),
                format!("registry.example.com:5000/side@{DIGEST}")
            ),
            ("init:migrate".to_owned(), "ghcr.io/o/migrate:3".to_owned()),
            ("ephemeral:debug".to_owned(), "alpine".to_owned()),
        ])
    );
    assert_eq!(doc["metadata"]["labels"][MANAGED_LABEL], "true");
    let skips: Vec<_> = m
        .images
        .iter()
        .filter_map(|d| match d.action {
            Action::Skipped(s) => Some((d.container.as_str(), s)),
            Action::Rewritten(_) => None,
        })
        .collect();
    assert_eq!(
        skips,
        [("local", Skip::PullPolicyNever), ("setup", Skip::Excluded)]
    );

    // Idempotent: the output goes through unchanged.
    let (again, m2) = apply(&doc, &Scope::Create);
    assert!(m2.patch.is_empty(), "{:?}", m2.patch);
    assert_eq!(again, doc);
    assert_eq!(m2.rewritten(), 0);
}

#[test]
fn missing_maps_are_created_whole() {
    let raw = pod_json(json!({"containers": [{"name": "app", "image": "nginx"}]}));
    assert!(raw["metadata"].get("annotations").is_none());
    let (doc, m) = apply(&raw, &Scope::Create);
    assert_eq!(
        serde_json::to_value(&m.patch).unwrap(),
        json!([
            {"op": "replace", "path": "/spec/containers/0/image", "value": "localhost:7439/docker.io/library/nginx:latest"},
            {"op": "add", "path": "/metadata/annotations", "value": {"larder.dev/original-images": "{\"app\":\"nginx\"}"}},
            {"op": "add", "path": "/metadata/labels", "value": {"larder.dev/managed": "true"}},
        ])
    );
    assert_eq!(
        doc["metadata"]["labels"],
        json!({"larder.dev/managed": "true"})
    );
}

#[test]
fn existing_maps_keep_their_entries_and_keys_are_escaped() {
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": {"example.com/a~b": "1", "plain": "2", "x/y~z/w": "3"},
            "labels": {"app": "web", "team.example/owner": "me"}
        },
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}
    });
    let (doc, m) = apply(&raw, &Scope::Create);
    let paths: Vec<String> = m.patch.iter().map(|op| op.path().to_string()).collect();
    assert_eq!(
        paths,
        [
            "/spec/containers/0/image",
            "/metadata/annotations/larder.dev~1original-images",
            "/metadata/labels/larder.dev~1managed",
        ]
    );
    assert_eq!(
        doc["metadata"]["annotations"],
        json!({
            "example.com/a~b": "1", "plain": "2", "x/y~z/w": "3",
            "larder.dev/original-images": "{\"app\":\"nginx\"}"
        })
    );
    assert_eq!(
        doc["metadata"]["labels"],
        json!({"app": "web", "team.example/owner": "me", "larder.dev/managed": "true"})
    );
}

#[test]
fn empty_maps_get_the_key() {
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "annotations": {}, "labels": {}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}
    });
    let (doc, _) = apply(&raw, &Scope::Create);
    assert_eq!(originals(&doc).len(), 1);
    assert_eq!(doc["metadata"]["labels"][MANAGED_LABEL], "true");
}

#[test]
fn reinvocation_merges_with_the_first_pass() {
    // First pass rewrote `app`; another webhook then added a sidecar.
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "p",
            "annotations": {ORIGINAL_IMAGES_ANNOTATION: "{\"app\":\"nginx\"}"},
            "labels": {MANAGED_LABEL: "true"}
        },
        "spec": {"containers": [
            {"name": "app", "image": "localhost:7439/docker.io/library/nginx:latest"},
            {"name": "mesh", "image": "istio/proxyv2:1.22"}
        ]}
    });
    let (doc, m) = apply(&raw, &Scope::Create);
    assert_eq!(
        m.patch.len(),
        2,
        "image and annotation; the label is already right"
    );
    assert_eq!(
        originals(&doc),
        BTreeMap::from([
            ("app".to_owned(), "nginx".to_owned()),
            ("mesh".to_owned(), "istio/proxyv2:1.22".to_owned()),
        ])
    );
}

#[test]
fn unreadable_annotation_is_replaced_with_a_note() {
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "annotations": {ORIGINAL_IMAGES_ANNOTATION: "not json"}, "labels": {MANAGED_LABEL: "false"}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}
    });
    let (doc, m) = apply(&raw, &Scope::Create);
    assert_eq!(
        originals(&doc),
        BTreeMap::from([("app".to_owned(), "nginx".to_owned())])
    );
    assert_eq!(m.notes.len(), 1);
    assert_eq!(doc["metadata"]["labels"][MANAGED_LABEL], "true");
}

#[test]
fn mirror_pods_are_left_alone() {
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "etcd-node1", "annotations": {MIRROR_POD_ANNOTATION: "abc"}},
        "spec": {"containers": [{"name": "etcd", "image": "registry.k8s.io/etcd:3.5"}]}
    });
    let (doc, m) = apply(&raw, &Scope::Create);
    assert!(m.patch.is_empty());
    assert_eq!(doc, raw);
    assert_eq!(m.images[0].action, Action::Skipped(Skip::MirrorPod));
}

#[test]
fn nothing_to_rewrite_means_no_patch() {
    let raw = pod_json(json!({"containers": [
        {"name": "a", "image": "localhost:7439/docker.io/library/nginx:1"},
        {"name": "b", "image": "nginx", "imagePullPolicy": "Never"}
    ]}));
    let (doc, m) = apply(&raw, &Scope::Create);
    assert!(m.patch.is_empty());
    assert_eq!(doc, raw);
    assert_eq!(m.images.len(), 2);

    let no_spec = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
    let (_, m) = apply(&no_spec, &Scope::Create);
    assert_eq!(m, Mutation::default());
}

#[test]
fn ephemeral_update_touches_only_new_ephemeral_containers() {
    let raw = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "containers": [{"name": "app", "image": "nginx"}],
            "ephemeralContainers": [
                {"name": "old-debug", "image": "busybox:1.35"},
                {"name": "debug", "image": "nicolaka/netshoot"}
            ]
        }
    });
    let scope = Scope::EphemeralContainersUpdate {
        existing: BTreeSet::from(["old-debug".to_owned()]),
    };
    let (doc, m) = apply(&raw, &scope);
    assert_eq!(
        serde_json::to_value(&m.patch).unwrap(),
        json!([{"op": "replace", "path": "/spec/ephemeralContainers/1/image",
                "value": "localhost:7439/docker.io/nicolaka/netshoot:latest"}])
    );
    assert_eq!(
        doc["spec"]["containers"][0]["image"], "nginx",
        "out of scope"
    );
    assert_eq!(
        doc["spec"]["ephemeralContainers"][0]["image"],
        "busybox:1.35"
    );
    assert_eq!(m.images.len(), 1);
    assert_eq!(m.images[0].kind, ContainerKind::Ephemeral);
    assert!(doc["metadata"].get("annotations").is_none());
}

#[test]
fn skip_labels_are_distinct() {
    let labels: BTreeSet<_> = Skip::ALL.iter().map(|s| s.label()).collect();
    assert_eq!(labels.len(), Skip::ALL.len());
}

/// A pod whose service account (or author) gave it pull secrets.
fn pod_with_pull_secrets() -> Value {
    pod_json(json!({
        "imagePullSecrets": [{"name": "regcred"}],
        "initContainers": [{"name": "setup", "image": "busybox:1.36"}],
        "containers": [
            {"name": "app", "image": "ghcr.io/org/private:1"},
            {"name": "proxied", "image": "localhost:7439/docker.io/library/nginx:1.27"}
        ]
    }))
}

#[test]
fn unresolved_pull_secrets_leave_the_pod_untouched() {
    let raw = pod_with_pull_secrets();
    let (doc, m) = apply_with(&raw, &Scope::Create, PullSecretPlan::Unresolved);
    assert!(m.patch.is_empty(), "{:?}", m.patch);
    assert_eq!(doc, raw);
    assert_eq!(m.rewritten(), 0);
    let outcomes: Vec<_> = m
        .images
        .iter()
        .map(|d| (d.container.as_str(), d.action.clone()))
        .collect();
    // Only the image that would have been rewritten is counted as `pull_secrets`.
    assert_eq!(
        outcomes,
        [
            ("app", Action::Skipped(Skip::PullSecrets)),
            ("proxied", Action::Skipped(Skip::OnProxy)),
            ("setup", Action::Skipped(Skip::Excluded)),
        ]
    );
    assert_eq!(Skip::PullSecrets.label(), "pull_secrets");
}

#[test]
fn derived_secret_is_added_and_the_pod_rewritten() {
    let raw = pod_with_pull_secrets();
    let derived = "larder-pull-0123456789";
    let (doc, m) = apply_with(&raw, &Scope::Create, PullSecretPlan::Derived(derived));
    assert_eq!(m.rewritten(), 1);
    assert_eq!(
        doc["spec"]["containers"][0]["image"],
        "localhost:7439/ghcr.io/org/private:1"
    );
    assert_eq!(
        doc["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": derived}]),
        "originals kept for the images that are not rewritten"
    );
    assert_eq!(doc["metadata"]["labels"][MANAGED_LABEL], "true");
    assert_eq!(
        originals(&doc),
        BTreeMap::from([("app".to_owned(), "ghcr.io/org/private:1".to_owned())])
    );

    // Reinvocation: nothing left to do, no second entry.
    let (again, m2) = apply_with(&doc, &Scope::Create, PullSecretPlan::Derived(derived));
    assert!(m2.patch.is_empty(), "{:?}", m2.patch);
    assert_eq!(again, doc);
    // Even with an unresolved plan, the pass over our own output changes nothing.
    let (again, _) = apply_with(&doc, &Scope::Create, PullSecretPlan::Unresolved);
    assert_eq!(again, doc);
}

#[test]
fn derived_secret_already_listed_is_not_added_twice() {
    let derived = "larder-pull-0123456789";
    let mut raw = pod_with_pull_secrets();
    raw["spec"]["imagePullSecrets"] = json!([{"name": "regcred"}, {"name": derived}]);
    // Another webhook added a container after our first pass.
    raw["spec"]["containers"][1]["image"] = json!("quay.io/org/new:2");
    let (doc, m) = apply_with(&raw, &Scope::Create, PullSecretPlan::Derived(derived));
    assert_eq!(m.rewritten(), 2);
    assert_eq!(
        doc["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": derived}])
    );
}

#[test]
fn pull_secrets_holding_nothing_rewrite_without_an_added_secret() {
    let raw = pod_with_pull_secrets();
    let (doc, m) = apply_with(&raw, &Scope::Create, PullSecretPlan::NoneNeeded);
    assert_eq!(m.rewritten(), 1);
    assert_eq!(
        doc["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
}

#[test]
fn pods_without_pull_secrets_ignore_the_plan() {
    for pull_secrets in [json!(null), json!([]), json!([{"name": ""}])] {
        let mut raw = pod_json(json!({"containers": [{"name": "app", "image": "nginx:1.27"}]}));
        if !pull_secrets.is_null() {
            raw["spec"]["imagePullSecrets"] = pull_secrets.clone();
        }
        let (unresolved, m) = apply_with(&raw, &Scope::Create, PullSecretPlan::Unresolved);
        assert_eq!(m.rewritten(), 1, "{pull_secrets}");
        let (derived, _) = apply_with(&raw, &Scope::Create, PullSecretPlan::Derived("x"));
        assert_eq!(unresolved, derived, "{pull_secrets}");
        assert_eq!(
            unresolved["spec"].get("imagePullSecrets"),
            raw["spec"].get("imagePullSecrets")
        );
    }
}

#[test]
fn ephemeral_update_cannot_add_a_pull_secret() {
    let derived = "larder-pull-0123456789";
    let raw = |secrets: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {
                "imagePullSecrets": secrets,
                "containers": [{"name": "app", "image": "localhost:7439/ghcr.io/org/app:1"}],
                "ephemeralContainers": [{"name": "debug", "image": "ghcr.io/org/debug:1"}]
            }
        })
    };
    let scope = Scope::EphemeralContainersUpdate {
        existing: BTreeSet::new(),
    };
    // The derived Secret is not on the pod, and this subresource cannot put it there.
    let (_, m) = apply_with(
        &raw(json!([{"name": "regcred"}])),
        &scope,
        PullSecretPlan::Derived(derived),
    );
    assert!(m.patch.is_empty(), "{:?}", m.patch);
    assert_eq!(m.images[0].action, Action::Skipped(Skip::PullSecrets));
    // Created through the webhook: the derived Secret is there already.
    let (doc, m) = apply_with(
        &raw(json!([{"name": "regcred"}, {"name": derived}])),
        &scope,
        PullSecretPlan::Derived(derived),
    );
    assert_eq!(m.rewritten(), 1);
    assert_eq!(
        doc["spec"]["ephemeralContainers"][0]["image"],
        "localhost:7439/ghcr.io/org/debug:1"
    );
    assert_eq!(m.patch.len(), 1, "only the image: {:?}", m.patch);
}
