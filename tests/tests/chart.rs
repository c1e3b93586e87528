//! The Helm chart (`charts/larder`): `helm lint`, `helm template` with the default values and
//! with every major option, and checks on the rendered objects (RBAC verbs, probes, security
//! contexts, the proxy DaemonSet, the webhook configuration); the CRDs against the Rust types;
//! the dashboard; the registry's garbage-collection script against a real CNCF distribution.
//!
//! helm is the binary `bash scripts/install-test-deps.sh` puts in `.tools/helm` (or one on PATH).

// A failed expectation in a test is the test failing, with the message saying which.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use larder_testkit::{ChildGuard, ImageBuilder, process};
use serde_yaml::Value;

const NAMESPACE: &str = "larder";
const RELEASE: &str = "larder";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/larder")
}

fn helm() -> PathBuf {
    let local = repo_root().join(".tools/helm");
    if local.is_file() {
        return local;
    }
    larder_testkit::find_tool("helm").unwrap_or_else(|| {
        panic!(
            "helm not found at {} nor on PATH: run `bash scripts/install-test-deps.sh`",
            local.display()
        )
    })
}

fn run_helm(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(helm());
    cmd.args(args).current_dir(repo_root());
    process::run(cmd, Duration::from_secs(60)).expect("helm runs")
}

/// `helm template` with `args`; panics with helm's stderr when it fails.
fn render(args: &[&str]) -> Vec<Value> {
    let chart = chart_dir();
    let mut all = vec![
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        NAMESPACE,
    ];
    all.extend_from_slice(args);
    let out = run_helm(&all);
    assert!(
        out.status.success(),
        "helm {all:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8 manifests");
    parse_docs(&text)
}

fn parse_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

use serde::Deserialize as _;

/// The option sets every structural check runs against.
fn variants() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("default", vec![]),
        (
            "monitoring",
            vec!["--api-versions", "monitoring.coreos.com/v1"],
        ),
        (
            "s3",
            vec![
                "--set",
                "cacheRegistry.storage=s3",
                "--set",
                "cacheRegistry.s3.bucket=images",
                "--set",
                "cacheRegistry.s3.regionEndpoint=https://minio.example:9000",
                "--set",
                "cacheRegistry.s3.existingSecret=larder-s3",
            ],
        ),
        ("cert-manager", vec!["--set", "certs.mode=cert-manager"]),
        ("no-registry", vec!["--set", "cacheRegistry.enabled=false"]),
        (
            "external-registry",
            vec![
                "--set",
                "cacheRegistry.enabled=false",
                "--set",
                "cacheRegistry.externalUrl=http://registry.example:5000",
            ],
        ),
        (
            "platforms",
            vec!["--set", "controller.platforms={linux/amd64,linux/arm64/v8}"],
        ),
        ("no-controller", vec!["--set", "controller.enabled=false"]),
        ("no-precache", vec!["--set", "proxy.precache.enabled=false"]),
        (
            "readiness-gate",
            vec!["--set", "controller.readinessGate.enabled=true"],
        ),
        (
            "pull-secrets-derive",
            vec!["--set", "webhook.pullSecrets=derive"],
        ),
        (
            "private-images",
            vec!["--set", "controller.privateImages=true"],
        ),
    ]
}

fn kind(v: &Value) -> &str {
    v["kind"].as_str().unwrap_or_default()
}

fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or_default()
}

fn find<'a>(docs: &'a [Value], k: &str, n: &str) -> Option<&'a Value> {
    docs.iter().find(|d| kind(d) == k && name(d) == n)
}

fn get<'a>(docs: &'a [Value], k: &str, n: &str) -> &'a Value {
    find(docs, k, n).unwrap_or_else(|| {
        let have: Vec<String> = docs
            .iter()
            .map(|d| format!("{}/{}", kind(d), name(d)))
            .collect();
        panic!("{k}/{n} not rendered; have {have:?}")
    })
}

fn seq(v: &Value) -> &[Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    seq(v)
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

fn container<'a>(workload: &'a Value, n: &str) -> Option<&'a Value> {
    seq(&workload["spec"]["template"]["spec"]["containers"])
        .iter()
        .find(|c| c["name"].as_str() == Some(n))
}

fn args(c: &Value) -> Vec<String> {
    strings(&c["args"])
}

fn workloads(docs: &[Value]) -> impl Iterator<Item = &Value> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Deployment" | "DaemonSet" | "StatefulSet"))
}

#[test]
fn helm_lint_passes() {
    // `helm lint` has no --api-versions: lint the --set variants.
    for (what, extra) in variants()
        .into_iter()
        .filter(|(_, a)| a.first() != Some(&"--api-versions"))
    {
        let chart = chart_dir();
        let mut all = vec!["lint", "--strict", chart.to_str().unwrap()];
        all.extend_from_slice(&extra);
        let out = run_helm(&all);
        assert!(
            out.status.success(),
            "helm lint ({what}) failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn default_install_renders_every_component() {
    let docs = render(&[]);
    for (k, n) in [
        ("DaemonSet", "larder-proxy"),
        ("Deployment", "larder"),
        ("PodDisruptionBudget", "larder"),
        ("StatefulSet", "larder-registry"),
        ("Service", "larder-registry"),
        ("Service", "larder-webhook"),
        ("Service", "larder-metrics"),
        ("Secret", "larder-registry-config"),
        ("MutatingWebhookConfiguration", "larder"),
        ("ConfigMap", "larder-dashboard"),
    ] {
        get(&docs, k, n);
    }
    for d in &docs {
        if kind(d) != "ClusterRole"
            && kind(d) != "ClusterRoleBinding"
            && kind(d) != "MutatingWebhookConfiguration"
        {
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some(NAMESPACE),
                "{}/{} is not in the release namespace",
                kind(d),
                name(d)
            );
        }
    }
    // Without the Prometheus Operator's API, no monitors.
    assert!(
        !docs
            .iter()
            .any(|d| matches!(kind(d), "PodMonitor" | "ServiceMonitor"))
    );

    let deploy = get(&docs, "Deployment", "larder");
    assert_eq!(deploy["spec"]["replicas"].as_i64(), Some(2));
    let pod = &deploy["spec"]["template"]["spec"];
    assert!(
        !pod["affinity"]["podAntiAffinity"].is_null(),
        "replicas spread over nodes"
    );
    let controller = container(deploy, "controller").expect("controller container");
    let a = args(controller);
    assert!(
        a.contains(&"--leader-election-namespace=larder".to_owned()),
        "{a:?}"
    );
    assert!(
        a.contains(&"--cache-registry=http://larder-registry.larder.svc:5000".to_owned()),
        "{a:?}"
    );
    assert!(!a.iter().any(|a| a.starts_with("--platform")));
    let webhook = container(deploy, "webhook").expect("webhook container");
    let a = args(webhook);
    for want in [
        "--self-managed-certs",
        "--webhook-configuration=larder",
        "--service=larder-webhook",
        "--namespace=larder",
        "--cert-secret=larder-webhook-certs",
        "--pull-secrets=skip",
    ] {
        assert!(a.contains(&want.to_owned()), "{want} missing in {a:?}");
    }
    let pdb = get(&docs, "PodDisruptionBudget", "larder");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deploy["spec"]["selector"]["matchLabels"]
    );

    // The cache registry: distribution with deletes on, a PVC, and the GC wrapper.
    let sts = get(&docs, "StatefulSet", "larder-registry");
    assert!(!seq(&sts["spec"]["volumeClaimTemplates"]).is_empty());
    let registry = container(sts, "registry").unwrap();
    assert!(
        registry["image"]
            .as_str()
            .unwrap()
            .starts_with("registry:2")
    );
    let config = registry_config(&docs, "config.yml");
    assert_eq!(config["storage"]["delete"]["enabled"], Value::Bool(true));
    assert!(!config["storage"]["filesystem"].is_null());
    assert_eq!(
        config["storage"]["maintenance"]["readonly"]["enabled"],
        Value::Bool(false)
    );
    let readonly = registry_config(&docs, "config-readonly.yml");
    assert_eq!(
        readonly["storage"]["maintenance"]["readonly"]["enabled"],
        Value::Bool(true)
    );
}

fn registry_config(docs: &[Value], key: &str) -> Value {
    let secret = get(docs, "Secret", "larder-registry-config");
    let text = secret["stringData"][key].as_str().expect(key);
    serde_yaml::from_str(text).expect("registry config parses")
}

/// The ranged-download values become flags the proxy's own parser accepts, with its defaults.
#[test]
fn ranged_download_values_are_flags_the_proxy_accepts() {
    let ranged_flags = |extra: &[&str]| {
        let docs = render(extra);
        let ds = get(&docs, "DaemonSet", "larder-proxy");
        let flags: Vec<String> = args(&ds["spec"]["template"]["spec"]["containers"][0])
            .into_iter()
            .filter(|a| a.starts_with("--upstream-ranged-"))
            .collect();
        assert_eq!(flags.len(), 3, "{flags:?}");
        larder_proxy::args::ProxyArgs::from_args(&flags)
            .unwrap_or_else(|e| panic!("{flags:?}: {e}"))
    };
    let defaults = larder_proxy::ranged::RangedConfig::default();
    let args = ranged_flags(&[]);
    assert_eq!(args.upstream_ranged_threshold, defaults.threshold);
    assert_eq!(args.upstream_ranged_connections, defaults.connections);
    assert_eq!(args.upstream_ranged_fast_rate, defaults.fast_rate);
    let args = ranged_flags(&[
        "--set",
        "proxy.upstreamRanged.threshold=1GiB",
        "--set",
        "proxy.upstreamRanged.connections=16",
        "--set",
        "proxy.upstreamRanged.fastRate=off",
    ]);
    assert_eq!(args.upstream_ranged_threshold, 1 << 30);
    assert_eq!(args.upstream_ranged_connections, 16);
    assert_eq!(args.upstream_ranged_fast_rate, None);
}

#[test]
fn proxy_daemonset_is_node_critical_and_never_surges() {
    for (what, extra) in variants() {
        let docs = render(&extra);
        let ds = get(&docs, "DaemonSet", "larder-proxy");
        let spec = &ds["spec"];
        assert_eq!(
            spec["updateStrategy"]["type"].as_str(),
            Some("RollingUpdate")
        );
        // Surge, never a node without a proxy: the new one shares the ports and waits for the
        // old one's disk lock at least as long as the old one may take to exit.
        assert_eq!(
            spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"].as_i64(),
            Some(0),
            "{what}"
        );
        assert_eq!(
            spec["updateStrategy"]["rollingUpdate"]["maxSurge"].as_i64(),
            Some(1),
            "{what}"
        );
        let grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap();
        let proxy_args = args(&spec["template"]["spec"]["containers"][0]);
        let wait = proxy_args
            .iter()
            .find_map(|a| a.strip_prefix("--disk-lock-wait="))
            .and_then(|w| w.strip_suffix('s'))
            .and_then(|w| w.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("{what}: no --disk-lock-wait in {proxy_args:?}"));
        assert!(
            wait > grace,
            "{what}: waits {wait}s for a proxy that may take {grace}s"
        );
        let pod = &spec["template"]["spec"];
        assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "{what}");
        // On the host network a declared container port is a host port: the scheduler would
        // refuse the surge pod beside the old one (seen on a real node).
        assert!(
            seq(&pod["containers"]).iter().all(|c| c["ports"].is_null()),
            "{what}: the proxy must declare no port"
        );
        assert_eq!(pod["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
        assert_eq!(
            pod["priorityClassName"].as_str(),
            Some("system-node-critical")
        );
        // A token only for node-level precache (its own NodeCache), with the node name to match.
        let precache = what != "no-precache";
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(precache),
            "{what}"
        );
        let node_name_env = seq(&pod["containers"][0]["env"])
            .iter()
            .find(|e| e["name"].as_str() == Some("LARDER_NODE_NAME"))
            .map(|e| {
                e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            });
        assert_eq!(
            node_name_env.as_deref(),
            precache.then_some("spec.nodeName"),
            "{what}"
        );
        let tolerations = seq(&pod["tolerations"]);
        assert!(
            tolerations
                .iter()
                .any(|t| t["operator"].as_str() == Some("Exists") && t["key"].is_null()),
            "{what}: tolerates every taint"
        );
        let disk = seq(&pod["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some("disk"))
            .expect("disk volume");
        assert_eq!(
            disk["hostPath"]["path"].as_str(),
            Some("/var/lib/larder/cache")
        );
        let proxy = container(ds, "proxy").unwrap();
        let a = args(proxy);
        assert_eq!(a[0], "proxy");
        assert!(
            a.contains(&"--disk-cache-max-bytes=20GiB".to_owned()),
            "{a:?}"
        );
        assert!(
            a.contains(&"--metrics-listen=$(HOST_IP):9101".to_owned()),
            "{a:?}"
        );
        assert!(
            !a.iter().any(|a| a.starts_with("--listen")),
            "default listen: 127.0.0.1:7439 and [::1]:7439"
        );
        let has_registry = a.iter().any(|a| a.starts_with("--cache-registry="));
        assert_eq!(
            has_registry,
            what != "no-registry",
            "{what}: --cache-registry in {a:?}"
        );
        let env = seq(&proxy["env"]);
        assert!(env.iter().any(|e| e["name"].as_str() == Some("HOST_IP")
            && e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("status.hostIP")));
    }
}

/// Runs `argv` as root holding only the CHOWN capability (bounding set); `None` when this
/// machine cannot (not root, or no `setpriv`).
fn run_with_only_chown(argv: &[String]) -> Option<std::process::Output> {
    let setpriv = larder_testkit::find_tool("setpriv")?;
    if !process::is_root() {
        return None;
    }
    let mut cmd = Command::new(setpriv);
    cmd.args(["--bounding-set=-all,+chown", "--"]).args(argv);
    Some(process::run(cmd, Duration::from_secs(30)).expect("setpriv runs"))
}

/// The proxy's init container, as rendered, run twice on one directory as the kubelet runs it
/// (root with only CHOWN): the second start on a node must succeed too. The busybox
/// `chmod && chown` it replaced failed there, and the proxy never started again on that node;
/// that command is run as the control, so the test cannot pass with capabilities not dropped.
#[test]
fn proxy_init_container_succeeds_on_every_start() {
    let docs = render(&[]);
    let ds = get(&docs, "DaemonSet", "larder-proxy");
    let init = &seq(&ds["spec"]["template"]["spec"]["initContainers"])[0];
    assert_eq!(init["name"].as_str(), Some("disk-owner"));
    assert_eq!(
        init["image"].as_str(),
        get(&docs, "DaemonSet", "larder-proxy")["spec"]["template"]["spec"]["containers"][0]
            ["image"]
            .as_str(),
        "the init container runs the larder image: no other image to mirror"
    );
    assert_eq!(
        strings(&init["securityContext"]["capabilities"]["add"]),
        ["CHOWN"]
    );
    let mount = init["volumeMounts"][0]["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let larder = process::larder_binary().expect("the larder binary");
    let mut argv = vec![larder.display().to_string()];
    argv.extend(
        args(init)
            .into_iter()
            .map(|a| a.replace(&mount, dir.to_str().unwrap())),
    );

    let control = dir.with_file_name("control");
    std::fs::create_dir(&control).unwrap();
    let busybox_way = |path: &Path| {
        let p = path.display();
        vec![
            "/bin/sh".to_owned(),
            "-c".to_owned(),
            format!("chmod 0700 {p} && chown 65532:65532 {p}"),
        ]
    };
    let Some(first) = run_with_only_chown(&busybox_way(&control)) else {
        eprintln!("SKIP: needs root and setpriv to run the init container with only CHOWN");
        return;
    };
    assert!(first.status.success(), "control, first start: {first:?}");
    let second = run_with_only_chown(&busybox_way(&control)).unwrap();
    assert!(
        !second.status.success(),
        "control: chmod of a directory root no longer owns must fail without FOWNER"
    );

    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for start in 1..=3 {
        let out = run_with_only_chown(&argv).unwrap();
        assert!(out.status.success(), "start {start}: {out:?}");
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (65532, 65532, 0o700)
        );
        if start == 2 {
            // Someone loosened the mode between starts: fixed without FOWNER too.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
}

/// Every container: non-root (but the one-shot chown, which is checked to hold only CHOWN),
/// read-only root filesystem, no privilege escalation, no capability, seccomp RuntimeDefault;
/// long-running containers have resources and liveness probes, serving ones readiness probes.
#[test]
fn security_contexts_and_probes() {
    for (what, extra) in variants() {
        let docs = render(&extra);
        for w in workloads(&docs) {
            let pod = &w["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"].as_bool(),
                Some(true),
                "{what}: {}",
                name(w)
            );
            assert_eq!(
                pod["securityContext"]["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault")
            );
            for init in seq(&pod["initContainers"]) {
                let sc = &init["securityContext"];
                assert_eq!(init["name"].as_str(), Some("disk-owner"), "{what}");
                assert_eq!(strings(&sc["capabilities"]["add"]), ["CHOWN"]);
                assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
                assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
                assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
            }
            for c in seq(&pod["containers"]) {
                let id = format!("{what}: {}/{}", name(w), c["name"].as_str().unwrap());
                let sc = &c["securityContext"];
                assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{id}");
                assert!(sc["runAsUser"].as_i64().unwrap() > 0, "{id}: fixed uid");
                assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true), "{id}");
                assert_eq!(
                    sc["allowPrivilegeEscalation"].as_bool(),
                    Some(false),
                    "{id}"
                );
                assert_eq!(sc["privileged"].as_bool(), Some(false), "{id}");
                assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{id}");
                assert!(sc["capabilities"]["add"].is_null(), "{id}");
                assert_eq!(
                    sc["seccompProfile"]["type"].as_str(),
                    Some("RuntimeDefault"),
                    "{id}"
                );
                assert!(
                    !c["resources"]["requests"].is_null(),
                    "{id}: resource requests"
                );
                assert!(!c["livenessProbe"].is_null(), "{id}: liveness probe");
                let readiness = c["readinessProbe"]["httpGet"]["path"].as_str();
                match c["name"].as_str().unwrap() {
                    "proxy" | "webhook" => {
                        assert_eq!(readiness, Some("/readyz"), "{id}");
                        assert_eq!(
                            c["livenessProbe"]["httpGet"]["path"].as_str(),
                            Some("/healthz"),
                            "{id}"
                        );
                    }
                    "registry" => assert_eq!(readiness, Some("/v2/"), "{id}"),
                    // Not ready while waiting for the Lease; a readiness probe would take the
                    // follower's webhook out of the Service.
                    "controller" => assert_eq!(readiness, None, "{id}"),
                    other => panic!("{id}: unexpected container {other}"),
                }
            }
        }
    }
}

type Rules = BTreeMap<String, BTreeSet<String>>;

/// `group/resource[:names]` -> verbs, for one Role or ClusterRole.
fn rules(role: &Value) -> Rules {
    let mut out = Rules::new();
    for rule in seq(&role["rules"]) {
        let names = strings(&rule["resourceNames"]);
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                let mut key = format!("{group}/{resource}");
                if !names.is_empty() {
                    key = format!("{key}:{}", names.join(","));
                }
                out.entry(key).or_default().extend(strings(&rule["verbs"]));
            }
        }
    }
    out
}

fn expect_rules(pairs: &[(&str, &[&str])]) -> Rules {
    pairs
        .iter()
        .map(|(k, verbs)| {
            (
                (*k).to_owned(),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect()
}

/// The chart switches that change RBAC.
#[derive(Debug, Clone, Copy)]
struct RbacSwitches {
    webhook: bool,
    derive: bool,
    private_images: bool,
    controller: bool,
    cert_manager: bool,
    precache: bool,
    gate: bool,
}

impl RbacSwitches {
    fn all() -> Vec<RbacSwitches> {
        (0u8..128)
            .map(|bits| RbacSwitches {
                webhook: bits & 1 != 0,
                derive: bits & 2 != 0,
                private_images: bits & 4 != 0,
                controller: bits & 8 != 0,
                cert_manager: bits & 16 != 0,
                precache: bits & 32 != 0,
                gate: bits & 64 != 0,
            })
            .collect()
    }

    fn args(self) -> Vec<String> {
        let set = |k: &str, v: &str| ["--set".to_owned(), format!("{k}={v}")];
        let mut out = Vec::new();
        out.extend(set("webhook.enabled", &self.webhook.to_string()));
        let mode = if self.derive { "derive" } else { "skip" };
        out.extend(set("webhook.pullSecrets", mode));
        out.extend(set(
            "controller.privateImages",
            &self.private_images.to_string(),
        ));
        out.extend(set("controller.enabled", &self.controller.to_string()));
        let certs = if self.cert_manager {
            "cert-manager"
        } else {
            "self-managed"
        };
        out.extend(set("certs.mode", certs));
        out.extend(set("proxy.precache.enabled", &self.precache.to_string()));
        out.extend(set(
            "controller.readinessGate.enabled",
            &self.gate.to_string(),
        ));
        out
    }

    /// The exact Role and ClusterRole rule sets these switches must render.
    fn expected(self) -> BTreeMap<(String, String), Rules> {
        let mut expected = BTreeMap::new();
        let mut put = |kind: &str, name: &str, rules: Rules| {
            expected.insert((kind.to_owned(), name.to_owned()), rules);
        };
        let derive = self.webhook && self.derive;
        if self.webhook && !self.cert_manager {
            put(
                "Role",
                "larder-webhook",
                expect_rules(&[
                    ("/secrets:larder-webhook-certs", &["get", "update"]),
                    ("/secrets", &["create"]),
                ]),
            );
            put(
                "ClusterRole",
                "larder-webhook",
                expect_rules(&[(
                    "admissionregistration.k8s.io/mutatingwebhookconfigurations:larder",
                    &["get", "patch"],
                )]),
            );
        }
        if derive {
            put(
                "ClusterRole",
                "larder-webhook-pull-secrets",
                expect_rules(&[("/secrets", &["get", "create"])]),
            );
        }
        if self.controller {
            put(
                "ClusterRole",
                "larder-controller",
                expect_rules(&[
                    ("/pods", &["get", "list", "watch"]),
                    (
                        "larder.dev/cachedimages",
                        &[
                            "get", "list", "watch", "create", "patch", "update", "delete",
                        ],
                    ),
                    (
                        "larder.dev/cachedimages/status",
                        &["get", "patch", "update"],
                    ),
                    ("larder.dev/cachedimages/finalizers", &["update"]),
                    ("larder.dev/precaches", &["get", "list", "watch"]),
                    ("larder.dev/precaches/status", &["get", "patch"]),
                    (
                        "larder.dev/nodecaches",
                        &["get", "list", "watch", "create", "patch", "delete"],
                    ),
                    ("/nodes", &["get", "list", "watch"]),
                    ("/events", &["create", "patch"]),
                    ("events.k8s.io/events", &["create", "patch"]),
                ]),
            );
            put(
                "Role",
                "larder-controller",
                expect_rules(&[(
                    "coordination.k8s.io/leases",
                    &["get", "create", "update", "patch"],
                )]),
            );
            if self.private_images || derive {
                put(
                    "ClusterRole",
                    "larder-controller-pull-secrets",
                    expect_rules(&[("/secrets", &["get"])]),
                );
            }
            if self.gate {
                put(
                    "ClusterRole",
                    "larder-controller-readiness-gate",
                    expect_rules(&[
                        ("/nodes", &["patch"]),
                        ("larder.dev/nodecaches/status", &["patch"]),
                    ]),
                );
            }
            if derive {
                put(
                    "ClusterRole",
                    "larder-controller-derived-secrets",
                    expect_rules(&[("/secrets", &["list", "delete"])]),
                );
            }
        }
        // helm uninstall's pre-delete hook, wherever the Deployment is rendered.
        if self.webhook || self.controller {
            let mut cluster = vec![("larder.dev/cachedimages", &["get", "list", "patch"][..])];
            if self.webhook {
                cluster.push((
                    "admissionregistration.k8s.io/mutatingwebhookconfigurations:larder",
                    &["delete"][..],
                ));
            }
            if self.gate && self.controller {
                cluster.push(("/nodes", &["list", "patch"][..]));
            }
            put("ClusterRole", "larder-uninstall", expect_rules(&cluster));
            let mut ns = vec![
                ("apps/deployments/scale:larder", &["patch"][..]),
                ("/pods", &["list"][..]),
            ];
            if self.webhook && !self.cert_manager {
                ns.push(("/secrets:larder-webhook-certs", &["delete"][..]));
            }
            if self.controller {
                ns.push((
                    "coordination.k8s.io/leases:larder-controller",
                    &["delete"][..],
                ));
            }
            put("Role", "larder-uninstall", expect_rules(&ns));
        }
        if self.precache {
            put(
                "ClusterRole",
                "larder-proxy",
                expect_rules(&[
                    ("larder.dev/nodecaches", &["get", "list", "watch"]),
                    ("larder.dev/nodecaches/status", &["get", "patch"]),
                ]),
            );
        }
        expected
    }
}

fn actual_rules(docs: &[Value]) -> BTreeMap<(String, String), Rules> {
    docs.iter()
        .filter(|d| matches!(kind(d), "Role" | "ClusterRole"))
        .map(|d| ((kind(d).to_owned(), name(d).to_owned()), rules(d)))
        .collect()
}

/// Every Role and ClusterRole, rule for rule, for each of the 128 combinations of the switches
/// that change RBAC; a default install reads no Secret outside the release namespace.
#[test]
fn rbac_is_exactly_what_the_switches_enable() {
    for switches in RbacSwitches::all() {
        let args = switches.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let docs = render(&args);
        let actual = actual_rules(&docs);
        assert_eq!(actual, switches.expected(), "{switches:?}: RBAC differs");
        for ((k, n), r) in &actual {
            for (resource, verbs) in r {
                assert!(
                    !verbs.contains("*"),
                    "{switches:?}: {k}/{n} has a wildcard verb"
                );
                if !resource.starts_with("/secrets") {
                    continue;
                }
                assert!(
                    !verbs.contains("watch"),
                    "{switches:?}: {k}/{n} watches Secrets"
                );
                // Cluster-wide Secret rights only where a switch for private images says so.
                if k == "ClusterRole" {
                    assert!(
                        switches.private_images || (switches.webhook && switches.derive),
                        "{switches:?}: {k}/{n} reaches Secrets cluster-wide"
                    );
                }
            }
        }
        // Every binding names a rendered role, bound to the right ServiceAccount.
        for b in docs
            .iter()
            .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
        {
            let role_kind = b["roleRef"]["kind"].as_str().unwrap();
            let role_name = b["roleRef"]["name"].as_str().unwrap();
            get(&docs, role_kind, role_name);
            assert_eq!(
                name(b),
                role_name,
                "{switches:?}: binding and role share a name"
            );
        }
        // Node patch is granted exactly where the admission policy narrowing it is rendered.
        let gate = switches.gate && switches.controller;
        for k in [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ] {
            assert_eq!(
                find(&docs, k, "larder-controller-readiness-gate").is_some(),
                gate,
                "{switches:?}: {k}"
            );
        }
    }
}

#[test]
fn default_install_reads_no_secret_outside_its_namespace() {
    let docs = render(&[]);
    for ((k, n), r) in actual_rules(&docs) {
        if k == "ClusterRole" {
            assert!(
                r.keys().all(|res| !res.starts_with("/secrets")),
                "default install: {k}/{n} reaches Secrets in every namespace: {r:?}"
            );
        }
    }
    // The one Role touching Secrets is the webhook's, in the release namespace.
    let role = get(&docs, "Role", "larder-webhook");
    assert_eq!(role["metadata"]["namespace"].as_str(), Some(NAMESPACE));
}

#[test]
fn rbac_is_least_privilege() {
    for (what, extra) in variants() {
        let docs = render(&extra);
        let actual = actual_rules(&docs);
        let controller = !matches!(what, "no-registry" | "no-controller");
        if controller {
            let deploy = get(&docs, "Deployment", "larder");
            let collects = args(container(deploy, "controller").unwrap())
                .contains(&"--collect-derived-pull-secrets".to_owned());
            assert_eq!(
                collects,
                what == "pull-secrets-derive",
                "{what}: the derived Secret clean-up runs exactly where its RBAC is granted"
            );
        }

        // Every binding names a rendered role and the one ServiceAccount of the Deployment.
        for b in docs
            .iter()
            .filter(|d| matches!(kind(d), "RoleBinding" | "ClusterRoleBinding"))
        {
            let role_kind = b["roleRef"]["kind"].as_str().unwrap();
            let role_name = b["roleRef"]["name"].as_str().unwrap();
            get(&docs, role_kind, role_name);
            // The proxy DaemonSet's own account holds only its NodeCache rights; the uninstall
            // hook's account only the hook's.
            let account = match role_name {
                "larder-proxy" | "larder-uninstall" => role_name,
                _ => "larder",
            };
            for s in seq(&b["subjects"]) {
                assert_eq!(s["kind"].as_str(), Some("ServiceAccount"));
                assert_eq!(s["name"].as_str(), Some(account), "{what}");
                assert_eq!(s["namespace"].as_str(), Some(NAMESPACE));
            }
        }

        // Nothing watches Secrets; only the derive mode's clean-up lists them (by label,
        // metadata only), and the controller only GETs them.
        for ((k, n), r) in &actual {
            for (resource, verbs) in r {
                if resource.starts_with("/secrets") {
                    assert!(
                        !verbs.contains("watch") && !verbs.contains("*"),
                        "{what}: {k}/{n} watches Secrets"
                    );
                    if verbs.contains("list") {
                        assert_eq!(
                            (what, n.as_str()),
                            ("pull-secrets-derive", "larder-controller-derived-secrets"),
                            "{k}/{n} lists Secrets"
                        );
                    }
                    if k == "ClusterRole" {
                        assert!(
                            what == "pull-secrets-derive"
                                || (what == "private-images"
                                    && n == "larder-controller-pull-secrets"),
                            "{what}: {k}/{n} reaches Secrets cluster-wide"
                        );
                    }
                    if n == "larder-controller-pull-secrets" {
                        assert!(
                            verbs.len() == 1 && verbs.contains("get"),
                            "{what}: the controller only GETs Secrets: {verbs:?}"
                        );
                    }
                }
                assert!(!verbs.contains("*"), "{what}: {k}/{n} has a wildcard verb");
            }
        }
    }
}

fn tolerates_gate(workload: &Value) -> bool {
    seq(&workload["spec"]["template"]["spec"]["tolerations"])
        .iter()
        .any(|t| {
            t["key"] == "larder.dev/precache-pending"
                && t["operator"] == "Exists"
                && t["effect"] == "NoSchedule"
        })
}

/// `controller.readinessGate.enabled`: the controller runs the gate, what must run before a
/// gated node is released tolerates the taint, and the admission policy narrowing the node
/// patch is bound to larder's accounts with Deny. Off (the default): none of it.
#[test]
fn readiness_gate_renders_its_policy_flag_and_tolerations() {
    let off = render(&[]);
    assert!(
        find(
            &off,
            "ValidatingAdmissionPolicy",
            "larder-controller-readiness-gate"
        )
        .is_none()
    );
    let deploy = get(&off, "Deployment", "larder");
    assert!(
        !args(container(deploy, "controller").unwrap()).contains(&"--readiness-gate".to_owned())
    );
    assert!(!tolerates_gate(deploy));
    assert!(!tolerates_gate(get(&off, "StatefulSet", "larder-registry")));
    let hook = get(&off, "Job", "larder-uninstall");
    assert!(
        !args(container(hook, "uninstall").unwrap()).contains(&"--release-gate-taints".to_owned())
    );

    let on = render(&["--set", "controller.readinessGate.enabled=true"]);
    let deploy = get(&on, "Deployment", "larder");
    assert!(
        args(container(deploy, "controller").unwrap()).contains(&"--readiness-gate".to_owned())
    );
    assert!(
        tolerates_gate(deploy),
        "the controller removes the taint: it must run first"
    );
    assert!(
        tolerates_gate(get(&on, "StatefulSet", "larder-registry")),
        "the images come from it"
    );
    assert!(
        tolerates_gate(get(&on, "DaemonSet", "larder-proxy")),
        "the proxy fills the disk"
    );
    // helm uninstall releases the nodes still held: nothing else would once the controller is
    // gone. Its Job must run on a gated node too.
    let hook = get(&on, "Job", "larder-uninstall");
    assert!(
        args(container(hook, "uninstall").unwrap()).contains(&"--release-gate-taints".to_owned())
    );
    assert!(tolerates_gate(hook));
    // Explicit proxy tolerations still get the gate's.
    let narrow = render(&[
        "--set",
        "controller.readinessGate.enabled=true",
        "--set",
        "proxy.tolerations[0].key=dedicated",
        "--set",
        "proxy.tolerations[0].operator=Exists",
    ]);
    let proxy = get(&narrow, "DaemonSet", "larder-proxy");
    assert!(tolerates_gate(proxy));
    assert_eq!(
        seq(&proxy["spec"]["template"]["spec"]["tolerations"]).len(),
        2
    );

    let policy = get(
        &on,
        "ValidatingAdmissionPolicy",
        "larder-controller-readiness-gate",
    );
    assert_eq!(policy["spec"]["failurePolicy"], "Fail");
    let rules = seq(&policy["spec"]["matchConstraints"]["resourceRules"]);
    assert_eq!(strings(&rules[0]["resources"]), ["nodes", "nodes/*"]);
    assert_eq!(strings(&rules[0]["operations"]), ["*"]);
    let matched = policy["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .unwrap();
    assert!(
        matched.contains(&format!("'system:serviceaccount:{NAMESPACE}:larder'"))
            && matched.contains(&format!("'system:serviceaccount:{NAMESPACE}:larder-proxy'"))
            && matched.contains(&format!(
                "'system:serviceaccount:{NAMESPACE}:larder-uninstall'"
            )),
        "{matched}"
    );
    let validations: Vec<&str> = seq(&policy["spec"]["validations"])
        .iter()
        .map(|v| v["expression"].as_str().unwrap())
        .collect();
    assert!(validations.iter().any(|v| v.contains("oldTaints.filter")));
    let binding = get(
        &on,
        "ValidatingAdmissionPolicyBinding",
        "larder-controller-readiness-gate",
    );
    assert_eq!(
        binding["spec"]["policyName"],
        "larder-controller-readiness-gate"
    );
    assert_eq!(strings(&binding["spec"]["validationActions"]), ["Deny"]);
}

#[test]
fn webhook_configuration_never_blocks_pods() {
    for (what, extra) in variants() {
        let docs = render(&extra);
        let mwc = get(&docs, "MutatingWebhookConfiguration", "larder");
        let hooks = seq(&mwc["webhooks"]);
        assert_eq!(hooks.len(), 1);
        let h = &hooks[0];
        assert_eq!(h["failurePolicy"].as_str(), Some("Ignore"), "{what}");
        assert!(h["timeoutSeconds"].as_i64().unwrap() <= 5);
        assert_eq!(h["reinvocationPolicy"].as_str(), Some("IfNeeded"));
        assert_eq!(strings(&h["admissionReviewVersions"]), ["v1"]);
        let side_effects = if what == "pull-secrets-derive" {
            "NoneOnDryRun"
        } else {
            "None"
        };
        assert_eq!(h["sideEffects"].as_str(), Some(side_effects), "{what}");
        let svc = &h["clientConfig"]["service"];
        assert_eq!(svc["name"].as_str(), Some("larder-webhook"));
        assert_eq!(svc["namespace"].as_str(), Some(NAMESPACE));
        assert_eq!(svc["path"].as_str(), Some("/mutate-pods"));
        get(&docs, "Service", "larder-webhook");

        let rules: BTreeSet<(String, String)> = seq(&h["rules"])
            .iter()
            .flat_map(|r| {
                let ops = strings(&r["operations"]);
                strings(&r["resources"])
                    .into_iter()
                    .flat_map(move |res| ops.clone().into_iter().map(move |op| (res.clone(), op)))
            })
            .collect();
        let want: BTreeSet<(String, String)> = [
            ("pods".to_owned(), "CREATE".to_owned()),
            ("pods/ephemeralcontainers".to_owned(), "UPDATE".to_owned()),
        ]
        .into();
        assert_eq!(rules, want, "{what}");

        let exprs = seq(&h["namespaceSelector"]["matchExpressions"]);
        let by_name = exprs
            .iter()
            .find(|e| e["key"].as_str() == Some("kubernetes.io/metadata.name"))
            .expect("namespace name exclusion");
        assert_eq!(by_name["operator"].as_str(), Some("NotIn"));
        let excluded = strings(&by_name["values"]);
        assert!(excluded.contains(&"kube-system".to_owned()), "{excluded:?}");
        assert!(excluded.contains(&NAMESPACE.to_owned()), "{excluded:?}");
        let ignore = exprs
            .iter()
            .find(|e| e["key"].as_str() == Some("larder.dev/ignore"))
            .expect("larder.dev/ignore exclusion");
        assert_eq!(ignore["operator"].as_str(), Some("NotIn"));
        assert_eq!(strings(&ignore["values"]), ["true"]);

        let inject = mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].as_str();
        if what == "cert-manager" {
            assert_eq!(inject, Some("larder/larder-webhook"));
        } else {
            assert_eq!(inject, None, "{what}");
        }
    }
}

#[test]
fn cert_manager_mode() {
    let docs = render(&["--set", "certs.mode=cert-manager"]);
    let cert = get(&docs, "Certificate", "larder-webhook");
    assert_eq!(
        cert["spec"]["secretName"].as_str(),
        Some("larder-webhook-certs")
    );
    let dns = strings(&cert["spec"]["dnsNames"]);
    assert!(
        dns.contains(&"larder-webhook.larder.svc".to_owned()),
        "{dns:?}"
    );
    assert_eq!(
        cert["spec"]["issuerRef"]["name"].as_str(),
        Some("larder-webhook-selfsigned")
    );
    get(&docs, "Issuer", "larder-webhook-selfsigned");
    let deploy = get(&docs, "Deployment", "larder");
    let a = args(container(deploy, "webhook").unwrap());
    assert!(a.contains(&"--tls-cert=/etc/larder/certs/tls.crt".to_owned()));
    assert!(!a.contains(&"--self-managed-certs".to_owned()));
    let volumes = seq(&deploy["spec"]["template"]["spec"]["volumes"]);
    assert_eq!(
        volumes[0]["secret"]["secretName"].as_str(),
        Some("larder-webhook-certs")
    );

    // An existing issuer: no Issuer of ours.
    let docs = render(&[
        "--set",
        "certs.mode=cert-manager",
        "--set",
        "certs.certManager.issuerRef.name=corp-ca",
        "--set",
        "certs.certManager.issuerRef.kind=ClusterIssuer",
    ]);
    assert!(!docs.iter().any(|d| kind(d) == "Issuer"));
    let cert = get(&docs, "Certificate", "larder-webhook");
    assert_eq!(
        cert["spec"]["issuerRef"]["kind"].as_str(),
        Some("ClusterIssuer")
    );
}

#[test]
fn s3_storage_mode() {
    let (_, extra) = variants().into_iter().find(|(w, _)| *w == "s3").unwrap();
    let docs = render(&extra);
    let sts = get(&docs, "StatefulSet", "larder-registry");
    assert!(
        sts["spec"]["volumeClaimTemplates"].is_null(),
        "no PVC with S3"
    );
    let config = registry_config(&docs, "config.yml");
    let s3 = &config["storage"]["s3"];
    assert_eq!(s3["bucket"].as_str(), Some("images"));
    assert_eq!(
        s3["regionendpoint"].as_str(),
        Some("https://minio.example:9000")
    );
    assert!(config["storage"]["filesystem"].is_null());
    assert_eq!(config["storage"]["delete"]["enabled"], Value::Bool(true));
    assert!(
        !serde_yaml::to_string(&config)
            .unwrap()
            .contains("secretkey"),
        "credentials stay in their own Secret"
    );
    let env = seq(&container(sts, "registry").unwrap()["env"]);
    for var in [
        "REGISTRY_STORAGE_S3_ACCESSKEY",
        "REGISTRY_STORAGE_S3_SECRETKEY",
    ] {
        let e = env
            .iter()
            .find(|e| e["name"].as_str() == Some(var))
            .expect(var);
        assert_eq!(
            e["valueFrom"]["secretKeyRef"]["name"].as_str(),
            Some("larder-s3")
        );
    }

    // A bucket is required.
    let chart = chart_dir();
    let out = run_helm(&[
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--set",
        "cacheRegistry.storage=s3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cacheRegistry.s3.bucket"));
}

#[test]
fn optional_components() {
    // No cache registry: the proxy uses disk and origin, the controller (which needs one) is off.
    let docs = render(&["--set", "cacheRegistry.enabled=false"]);
    assert!(find(&docs, "StatefulSet", "larder-registry").is_none());
    assert!(find(&docs, "Secret", "larder-registry-config").is_none());
    let deploy = get(&docs, "Deployment", "larder");
    assert!(container(deploy, "controller").is_none());
    assert!(container(deploy, "webhook").is_some());

    // An external cache registry: both the proxy and the controller use it.
    let docs = render(&[
        "--set",
        "cacheRegistry.enabled=false",
        "--set",
        "cacheRegistry.externalUrl=http://registry.example:5000",
    ]);
    let want = "--cache-registry=http://registry.example:5000".to_owned();
    assert!(
        args(container(get(&docs, "DaemonSet", "larder-proxy"), "proxy").unwrap()).contains(&want)
    );
    assert!(
        args(container(get(&docs, "Deployment", "larder"), "controller").unwrap()).contains(&want)
    );

    // Platform filter.
    let docs = render(&["--set", "controller.platforms={linux/amd64,linux/arm64/v8}"]);
    let a = args(container(get(&docs, "Deployment", "larder"), "controller").unwrap());
    assert!(a.contains(&"--platform=linux/amd64".to_owned()), "{a:?}");
    assert!(a.contains(&"--platform=linux/arm64/v8".to_owned()), "{a:?}");

    // Controller disabled: the webhook alone, no controller RBAC.
    let docs = render(&["--set", "controller.enabled=false"]);
    let deploy = get(&docs, "Deployment", "larder");
    assert!(container(deploy, "controller").is_none());
    assert!(container(deploy, "webhook").is_some());
    assert!(find(&docs, "ClusterRole", "larder-controller").is_none());

    // Monitors when the Prometheus Operator's API exists.
    let docs = render(&["--api-versions", "monitoring.coreos.com/v1"]);
    let pm = get(&docs, "PodMonitor", "larder-proxy");
    // No named port (the proxy declares none, see the DaemonSet test): the address is set.
    let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
    assert!(endpoint["port"].is_null());
    assert_eq!(
        endpoint["relabelings"][0]["replacement"].as_str(),
        Some("$1:9101")
    );
    let sm = get(&docs, "ServiceMonitor", "larder");
    let ports: Vec<&str> = seq(&sm["spec"]["endpoints"])
        .iter()
        .map(|e| e["port"].as_str().unwrap())
        .collect();
    assert_eq!(ports, ["webhook-metrics", "ctrl-metrics"]);
    get(&docs, "ServiceMonitor", "larder-registry");
    let docs = render(&[
        "--api-versions",
        "monitoring.coreos.com/v1",
        "--set",
        "metrics.podMonitor.enabled=false",
        "--set",
        "metrics.serviceMonitor.enabled=false",
    ]);
    assert!(
        !docs
            .iter()
            .any(|d| matches!(kind(d), "PodMonitor" | "ServiceMonitor"))
    );
}

#[test]
fn schema_rejects_bad_values() {
    let chart = chart_dir();
    for bad in [
        "certs.mode=vault",
        "cacheRegistry.storage=nfs",
        "logFormat=xml",
        "webhook.failurePolicy=Sometimes",
        "controller.maxConcurrentCopies=0",
        "proxy.tagFreshness=soon",
        "proxy.upstreamRanged.fastRate=quick",
        "proxy.upstreamRanged.connections=0",
        "proxy.upstreamRanged.threshold=huge",
        "controller.platforms={amd64}",
        "controller.privateImages=sometimes",
        "no.such.key=1",
    ] {
        let out = run_helm(&["template", RELEASE, chart.to_str().unwrap(), "--set", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
    }
}

#[test]
fn crds_match_the_rust_types() {
    let generated = larder_core::crd::crds_yaml().expect("CRDs generate");
    let dir = chart_dir().join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("charts/larder/crds")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let shipped: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        shipped == generated,
        "charts/larder/crds/ differs from the Rust types; regenerate with\n  \
         cargo run -q -- crds > charts/larder/crds/larder.dev.yaml"
    );
}

#[test]
fn dashboard_configmap_carries_the_dashboard() {
    let file = std::fs::read_to_string(chart_dir().join("dashboards/larder.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&file).expect("dashboard JSON");
    let docs = render(&[]);
    let cm = get(&docs, "ConfigMap", "larder-dashboard");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let shipped: serde_json::Value =
        serde_json::from_str(cm["data"]["larder.json"].as_str().unwrap()).unwrap();
    assert_eq!(shipped, dashboard);

    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for want in [
        "Hit rate (all nodes)",
        "Hit rate by registry",
        "Bytes sent by source",
        "Requests by kind and source",
        "Stale serves",
        "Coalesced requests",
        "Upstream errors",
        "Upstream latency (time to headers)",
        "Admissions by result",
        "Cached images by phase",
        "Copy throughput",
        "Copy and reconcile failures",
    ] {
        assert!(titles.contains(&want), "panel {want:?} missing: {titles:?}");
    }
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("larder_")));
        }
    }
}

/// Every key of values.yaml is described in docs/configuration.md.
#[test]
fn every_value_is_documented() {
    let values: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let doc = std::fs::read_to_string(repo_root().join("docs/configuration.md"))
        .expect("docs/configuration.md");
    let mut keys = Vec::new();
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        const FREE: [&str; 9] = [
            "resources",
            "extraConfig",
            "labels",
            "annotations",
            "nodeSelector",
            "affinity",
            "podLabels",
            "podAnnotations",
            "objectSelector",
        ];
        if let Value::Mapping(m) = v {
            for (k, child) in m {
                let k = k.as_str().unwrap();
                let path = if prefix.is_empty() {
                    k.to_owned()
                } else {
                    format!("{prefix}.{k}")
                };
                if child.is_mapping()
                    && !child.as_mapping().unwrap().is_empty()
                    && !FREE.contains(&k)
                    && k != "issuerRef"
                {
                    walk(&path, child, out);
                } else {
                    out.push(path);
                }
            }
        }
    }
    walk("", &values, &mut keys);
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "values not described in docs/configuration.md: {missing:?}"
    );
}

/// The registry's wrapper against a real CNCF distribution: a deleted image's blobs are
/// collected in a read-only window, pulls work during it, and the registry takes pushes again
/// afterwards.
#[test]
fn registry_garbage_collection_window() {
    let docs = render(&[]);
    let secret = get(&docs, "Secret", "larder-registry-config");
    let data = &secret["stringData"];
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("data");
    let port = larder_testkit::free_port().unwrap();
    let debug = larder_testkit::free_port().unwrap();
    for key in ["config.yml", "config-readonly.yml", "run-registry.sh"] {
        let text = data[key]
            .as_str()
            .unwrap()
            .replace("/var/lib/registry", storage.to_str().unwrap())
            .replace("addr: :5000", &format!("addr: 127.0.0.1:{port}"))
            .replace("addr: :5001", &format!("addr: 127.0.0.1:{debug}"));
        std::fs::write(work.path().join(key), text).unwrap();
    }
    let bin = larder_testkit::find_tool("docker-registry")
        .expect("docker-registry: run `bash scripts/install-test-deps.sh`");
    let mut cmd = Command::new("sh");
    cmd.arg(work.path().join("run-registry.sh"))
        .env("REGISTRY_BIN", &bin)
        .env("REGISTRY_CONFIG", work.path().join("config.yml"))
        .env(
            "REGISTRY_CONFIG_READONLY",
            work.path().join("config-readonly.yml"),
        )
        .env("GC_ENABLED", "true")
        .env("GC_INTERVAL", "5");
    let mut guard = ChildGuard::spawn(
        "run-registry.sh",
        cmd,
        &work.path().join("out.log"),
        &work.path().join("err.log"),
    )
    .unwrap();
    let host = format!("127.0.0.1:{port}");
    let up = |host: &str| {
        larder_testkit::http::get(&format!("http://{host}/v2/"), &[])
            .map(|r| r.status == 200)
            .unwrap_or(false)
    };
    wait_for(Duration::from_secs(20), "the registry to serve", || {
        up(&host)
    });

    let image = ImageBuilder::new().random_layer(200 << 10).build().unwrap();
    let layout = tempfile::tempdir().unwrap();
    image.write_oci_layout(layout.path(), "v1").unwrap();
    let pushed = push_retrying(layout.path(), &host, "team/old");
    let keep = ImageBuilder::new().random_layer(100 << 10).build().unwrap();
    let keep_layout = tempfile::tempdir().unwrap();
    keep.write_oci_layout(keep_layout.path(), "v1").unwrap();
    push_retrying(keep_layout.path(), &host, "team/kept");

    let layer = image.manifests[0].layers[0].blob.digest.clone();
    let blob_file = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        storage.join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        ))
    };
    assert!(blob_file(&layer).is_file());
    let url = format!("http://{host}/v2/team/old/manifests/{}", pushed.digest);
    let deleted =
        larder_testkit::http::request("DELETE", &url, &[], Duration::from_secs(10)).unwrap();
    assert_eq!(deleted.status, 202, "manifest delete: {}", deleted.text());

    // Within a few intervals the layer is gone, the kept image still pulls, and all along the
    // registry answers (but for the two restarts).
    let kept_layer = keep.manifests[0].layers[0].blob.digest.clone();
    wait_for(
        Duration::from_secs(60),
        "the deleted image's layer to be collected",
        || !blob_file(&layer).exists(),
    );
    wait_for(
        Duration::from_secs(20),
        "the registry to serve again",
        || up(&host),
    );
    // Collections keep running every interval, so the registry may be restarting again right
    // now: retry a refused connection, bounded.
    let kept_url = format!("http://{host}/v2/team/kept/blobs/{kept_layer}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let kept = loop {
        match larder_testkit::http::get(&kept_url, &[]) {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("kept blob GET failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("kept blob GET: {e}"),
        }
    };
    assert_eq!(kept.status, 200);
    assert_eq!(kept.body_digest(), kept_layer);
    // Read-write again: a push succeeds.
    push_retrying(layout.path(), &host, "team/again");
    let log = std::fs::read_to_string(work.path().join("err.log")).unwrap_or_default();
    assert!(
        log.contains("garbage collection: restarting read-only"),
        "{log}"
    );

    // SIGTERM (by PID) stops the wrapper and the registry it runs.
    let pid = guard.pid().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while guard.try_exit_status().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the wrapper ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for(
        Duration::from_secs(10),
        "the registry to stop with its wrapper",
        || !up(&host),
    );
}

/// Pushes, retrying while the registry restarts for a collection (bounded).
fn push_retrying(layout: &Path, host: &str, repo: &str) -> larder_testkit::PushedImage {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match larder_testkit::skopeo::push(layout, "v1", host, repo, None) {
            Ok(p) => return p,
            Err(e) if Instant::now() < deadline => {
                eprintln!("push to {repo} failed, retrying: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("push to {repo}: {e}"),
        }
    }
}

fn wait_for(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
