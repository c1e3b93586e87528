//! The dashboard against real data: a real larder proxy in front of a real CNCF distribution
//! origin serves cold, warm, stale and bad pulls while a real Prometheus (Debian `prometheus`)
//! scrapes it every second; then every query of every proxy panel of
//! `charts/larder/dashboards/*.json` must return data, every other panel's query must at least
//! be valid PromQL, and `promtool check metrics` must accept the proxy's `/metrics`.

// A failed expectation in a test is the test failing, with the message saying which.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder_testkit::{
    ChildGuard, ImageBuilder, Registry, RegistryOptions, SkopeoPullOptions, pull_with_skopeo_async,
};

const REPO: &str = "library/app";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Every PromQL expression of every dashboard, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let dir = repo_root().join("charts/larder/dashboards");
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("charts/larder/dashboards")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    for file in files {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).expect("dashboard JSON");
        let mut panels: Vec<&serde_json::Value> = Vec::new();
        for p in dashboard["panels"].as_array().expect("panels") {
            panels.push(p);
            if let Some(inner) = p["panels"].as_array() {
                panels.extend(inner);
            }
        }
        for p in panels {
            for t in p["targets"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((
                        p["title"].as_str().unwrap_or("?").to_owned(),
                        expr.to_owned(),
                    ));
                }
            }
        }
    }
    out
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn pull(reference: String) -> Result<(), String> {
    let dest = tempfile::tempdir().expect("dest");
    let options = SkopeoPullOptions {
        timeout: Some(Duration::from_secs(120)),
        ..SkopeoPullOptions::default()
    };
    pull_with_skopeo_async(reference, dest.path().join("out"), options)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A Prometheus scraping `target` every second, killed by its PID when dropped.
struct Prometheus {
    _process: ChildGuard,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let bin = larder_testkit::find_tool("prometheus")
            .expect("prometheus is not installed: run `bash scripts/install-test-deps.sh`");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: larder-proxy\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = larder_testkit::free_addr().unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"));
        let process = ChildGuard::spawn(
            "prometheus",
            cmd,
            &dir.path().join("stdout.log"),
            &dir.path().join("stderr.log"),
        )
        .expect("prometheus starts");
        Prometheus {
            _process: process,
            addr,
            _dir: dir,
        }
    }

    async fn wait_ready(&self) {
        let url = format!("http://{}/-/ready", self.addr);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The `data.result` of an instant query; panics unless Prometheus says `success`.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("http://{}/api/v1/query", self.addr),
            &[("query", expr)],
        )
        .unwrap();
        let body: serde_json::Value = reqwest::get(url)
            .await
            .expect("prometheus answers")
            .json()
            .await
            .expect("JSON answer");
        assert_eq!(body["status"], "success", "query {expr} failed: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// True when some sample of `result` is a finite number.
fn has_finite_value(result: &[serde_json::Value]) -> bool {
    result.iter().any(|r| {
        r["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_proxy_panel_returns_data_from_a_real_prometheus() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let queries = dashboard_queries();
    assert!(queries.len() >= 10, "dashboard queries: {queries:?}");

    // A real origin with one image.
    let origin =
        blocking(|| Registry::start(RegistryOptions::default()).expect("origin starts")).await;
    let image = ImageBuilder::new()
        .random_layer(512 << 10)
        .random_layer(64 << 10)
        .build()
        .unwrap();
    let host = origin.host_port();
    let origin = Arc::new(origin);
    {
        let (origin, image) = (origin.clone(), image.clone());
        blocking(move || origin.push_image(&image, REPO, "v1").expect("push")).await;
    }

    // A real proxy.
    let disk = tempfile::tempdir().unwrap();
    let args = larder_proxy::ProxyArgs::from_args([
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--disk-cache",
        disk.path().to_str().unwrap(),
        "--tag-freshness",
        "0s",
        "--tag-revalidate-timeout",
        "1s",
        "--insecure-registry",
        &host,
    ])
    .expect("proxy args");
    let proxy = larder_proxy::start(args).await.expect("proxy starts");
    let proxy_addr = proxy.addrs[0];
    let metrics_addr = proxy.metrics_addr;

    let prometheus = Prometheus::start(metrics_addr);
    prometheus.wait_ready().await;
    // The first scrape, so the counters' first samples precede the traffic.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prometheus
        .query("up{job=\"larder-proxy\"} == 1")
        .await
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped the proxy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let image_ref = format!("{proxy_addr}/{}/{REPO}", host.replace(':', "_"));
    // Cold pull (origin), then warm pulls (disk), a few concurrent ones (coalescing when they
    // overlap), and requests that fail (a malformed path, an unknown tag).
    pull(format!("{image_ref}:v1")).await.expect("cold pull");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pull(format!("{image_ref}:v1")).await.expect("warm pull");
    let concurrent: Vec<_> = (0..3)
        .map(|_| tokio::spawn(pull(format!("{image_ref}:v1"))))
        .collect();
    for c in concurrent {
        c.await.unwrap().expect("concurrent warm pull");
    }
    let client = reqwest::Client::new();
    for path in [
        "/v2/not-a-valid-path",
        &format!("/v2/{}/{REPO}/manifests/missing", host.replace(':', "_")),
    ] {
        let status = client
            .get(format!("http://{proxy_addr}{path}"))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_client_error(), "{path}: {status}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The origin goes away: tags are served stale, upstream errors are counted.
    let mut origin = Arc::try_unwrap(origin).unwrap_or_else(|_| panic!("origin still shared"));
    blocking(move || {
        origin.stop().expect("stop origin");
        origin
    })
    .await;
    for _ in 0..2 {
        pull(format!("{image_ref}:v1"))
            .await
            .expect("stale pull while the origin is down");
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }

    // Every proxy panel's query returns data (bounded wait for the last scrapes).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut missing: Vec<(String, String)>;
    loop {
        missing = Vec::new();
        for (title, expr) in &queries {
            if !expr.contains("larder_proxy_") {
                continue;
            }
            let result = prometheus.query(expr).await;
            if !has_finite_value(&result) {
                missing.push((title.clone(), expr.clone()));
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        missing.is_empty(),
        "proxy panels without data: {missing:#?}\n/metrics:\n{}",
        reqwest::get(format!("http://{metrics_addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    );

    // The other panels (webhook, controller: no such process here) are valid PromQL.
    for (title, expr) in &queries {
        if !expr.contains("larder_proxy_") {
            prometheus.query(expr).await;
            eprintln!("checked syntax only (no such metrics in this test): {title}");
        }
    }

    // The exposition itself passes promtool's lint.
    let text = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let checked = text.clone();
    let (_, report) = blocking(move || promtool_check_metrics(&checked)).await;
    // larder serves OpenMetrics, where a counter's HELP and TYPE name the family
    // (`larder_proxy_bytes`) and its sample carries `_total`; promtool 2.42 reads the classic
    // format and reports such counters as having "no help text". Accept exactly that finding,
    // for counters whose family does have HELP and TYPE counter; anything else fails.
    let problems: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            let Some(name) = l.strip_suffix(" no help text") else {
                return true;
            };
            let Some(family) = name.strip_suffix("_total") else {
                return true;
            };
            !(text.contains(&format!("# HELP {family} "))
                && text.contains(&format!("# TYPE {family} counter")))
        })
        .collect();
    assert!(
        problems.is_empty(),
        "promtool check metrics found problems:\n{report}"
    );

    proxy.shutdown(Duration::from_secs(5)).await;
}

/// `promtool check metrics` on `text`: (success, its output).
fn promtool_check_metrics(text: &str) -> (bool, String) {
    let bin = larder_testkit::find_tool("promtool")
        .expect("promtool is not installed: run `bash scripts/install-test-deps.sh`");
    let mut child = Command::new(bin)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("promtool did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}
