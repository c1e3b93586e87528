//! `controller-bench`: `larder controller` at scale against the fake API server and two real
//! distribution registries. Run through `bench/controller.sh`, which builds everything in
//! release mode. Every phase has a deadline; every process it starts is stopped by PID.
//!
//! 1. Push `--images` distinct tiny images (one shared layer, a config of their own) into the
//!    origin, plus `--churn-images` more that only churned-in pods use.
//! 2. Preload the fake API server with `--pods` managed pods over `--namespaces` namespaces,
//!    each using 1–3 of the images (every image used).
//! 3. Start `larder controller` and wait until every CachedImage is Ready with the right
//!    `usedBy.count`; sample its RSS (VmRSS, VmHWM) and CPU time throughout.
//! 4. Churn: delete `--churn-percent` of the pods, add as many new ones (some using new
//!    images), and wait until everything is right again.
//!
//! Prints a JSON result on stdout (progress on stderr).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod push;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use larder_core::reference::Reference;
use larder_testkit::fake_apiserver::{FakeApiServer, FakeOptions};
use larder_testkit::process::ChildGuard;
use larder_testkit::{ImageBuilder, Registry, RegistryOptions};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// The `larder` binary (release build).
    #[arg(long)]
    larder: PathBuf,
    /// Distinct images the pods use.
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Further images only the churned-in pods use.
    #[arg(long, default_value_t = 50)]
    churn_images: usize,
    /// Managed pods preloaded.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Namespaces they are spread over.
    #[arg(long, default_value_t = 100)]
    namespaces: usize,
    /// Percentage of pods deleted, and of new pods added, in the churn phase.
    #[arg(long, default_value_t = 10)]
    churn_percent: usize,
    /// Deadline of each phase.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    phase_timeout: Duration,
    /// Extra flags for `larder controller` (e.g. `--max-concurrent-copies=8`).
    #[arg(long = "controller-arg", allow_hyphen_values = true)]
    controller_args: Vec<String>,
    /// Bytes of an extra annotation on every pod, standing in for what real pods carry besides
    /// larder's (sidecar status, checksums, last-applied configuration); with it, pods also get
    /// an ownerReference and the labels a Deployment adds. 0: only larder's label and annotation.
    #[arg(long, default_value_t = 1024)]
    extra_metadata_bytes: usize,
    /// Keep logs here (default: a temporary directory, removed).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

const TAGS_PER_REPO: usize = 10;
const CACHED_IMAGES: &str = "/apis/larder.dev/v1alpha1/cachedimages";

fn log(msg: impl AsRef<str>) {
    eprintln!("[controller-bench] {}", msg.as_ref());
}

fn image_ref(origin: &str, i: usize) -> String {
    format!(
        "{origin}/bench/app-{:03}:v{}",
        i / TAGS_PER_REPO,
        i % TAGS_PER_REPO
    )
}

/// The 1–3 images of pod `i`, among `n`: pod i always uses image i mod n, so every image is
/// used once there are at least `n` pods.
fn pod_images(i: usize, n: usize, offset: usize) -> Vec<usize> {
    let mut out = vec![offset + i % n];
    if i % 3 >= 1 {
        out.push(offset + (i * 7 + 3) % n);
    }
    if i % 3 == 2 {
        out.push(offset + (i * 13 + 5) % n);
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn pod(name: &str, images: &[String], extra: usize) -> Value {
    let annotation: serde_json::Map<String, Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| (format!("c{i}"), json!(image)))
        .collect();
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let rewritten = Reference::parse(image)
                .unwrap()
                .rewrite("localhost:7439")
                .unwrap();
            json!({
                "name": format!("c{i}"), "image": rewritten,
                "env": [{"name": "MODE", "value": "bench"}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}
            })
        })
        .collect();
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"larder.dev/managed": "true"},
            "annotations": {"larder.dev/original-images": Value::Object(annotation).to_string()}
        },
        "spec": {"containers": containers, "nodeName": "node-1", "restartPolicy": "Always"}
    });
    if extra > 0 {
        let meta = &mut pod["metadata"];
        meta["labels"]["app.kubernetes.io/name"] = json!("bench");
        meta["labels"]["app.kubernetes.io/instance"] = json!(name);
        meta["labels"]["pod-template-hash"] = json!("5d8f7c9b4");
        meta["annotations"]["bench.larder.dev/filler"] = json!("x".repeat(extra));
        meta["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "bench-5d8f7c9b4",
            "uid": "6f1c2d3e-0000-4000-8000-000000000000", "controller": true,
            "blockOwnerDeletion": true
        }]);
    }
    pod
}

/// Peak and current resident memory of a process, and its CPU seconds.
struct Proc(u32);

impl Proc {
    fn status_kib(&self, field: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.0)).ok()?;
        text.lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    fn cpu_seconds(&self, ticks: f64) -> Option<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/stat", self.0)).ok()?;
        let rest = text.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the command: state is field 3, utime 14, stime 15 (1-based, whole line).
        let utime: f64 = f.get(11)?.parse().ok()?;
        let stime: f64 = f.get(12)?.parse().ok()?;
        Some((utime + stime) / ticks)
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// How many CachedImages are Ready with the expected count, and how many expected ones are
/// wrong (missing, not Ready, wrong count).
fn converged(api: &FakeApiServer, expected: &BTreeMap<String, usize>) -> (usize, usize) {
    let items = api.list(CACHED_IMAGES).unwrap();
    let by_name: BTreeMap<&str, &Value> = items
        .iter()
        .filter_map(|ci| Some((ci["metadata"]["name"].as_str()?, ci)))
        .collect();
    let mut ok = 0;
    for (name, count) in expected {
        let good = by_name.get(name.as_str()).is_some_and(|ci| {
            ci["status"]["phase"] == "Ready"
                && ci["status"]["usedBy"]["count"].as_u64() == Some(*count as u64)
        });
        ok += usize::from(good);
    }
    (ok, expected.len() - ok)
}

fn wait_converged(
    api: &FakeApiServer,
    expected: &BTreeMap<String, usize>,
    timeout: Duration,
    controller: &mut ChildGuard,
    start: Instant,
) -> Duration {
    let mut last_report = Instant::now();
    loop {
        let (ok, wrong) = converged(api, expected);
        if wrong == 0 {
            return start.elapsed();
        }
        if let Ok(Some(status)) = controller.try_exit_status() {
            panic!(
                "the controller exited ({status}): {}",
                controller.stderr_tail()
            );
        }
        assert!(
            start.elapsed() < timeout,
            "not converged after {timeout:?}: {ok} right, {wrong} not; controller log tail:\n{}",
            controller.stderr_tail()
        );
        if last_report.elapsed() > Duration::from_secs(10) {
            log(format!(
                "{:>5.0}s: {ok} right, {wrong} to go",
                start.elapsed().as_secs_f64()
            ));
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn usage(pods: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for images in pods.values() {
        for image in images {
            *out.entry(Reference::parse(image).unwrap().cached_image_name())
                .or_default() += 1;
        }
    }
    out
}

fn main() {
    let args = Args::parse();
    let work = tempfile::Builder::new()
        .prefix("larder-controller-bench-")
        .tempdir()
        .unwrap();
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| work.path().to_owned());
    std::fs::create_dir_all(&work_dir).unwrap();

    log("starting origin and cache registries");
    let origin = Registry::start(RegistryOptions::default()).expect("origin registry");
    let cache = Registry::start(RegistryOptions::default().named("cache")).expect("cache registry");
    let total_images = args.images + args.churn_images;
    let started = Instant::now();
    let shared_layer = ImageBuilder::new()
        .seeded_layer(32 << 10, 1)
        .build()
        .unwrap();
    let shared: BTreeSet<String> = shared_layer
        .blobs()
        .iter()
        .skip(1)
        .map(|b| b.digest.clone())
        .collect();
    let build = |i: usize| {
        ImageBuilder::new()
            .seeded_layer(32 << 10, 1)
            .label("bench.larder.dev/image", i.to_string())
            .build()
            .unwrap()
    };
    // The first repository gets the shared layer by upload; every other one mounts it.
    let first_repo = "bench/app-000".to_owned();
    let mut present = BTreeSet::new();
    let pusher = push::Pusher {
        addr: origin.addr(),
        mount_from: None,
        shared: shared.clone(),
    };
    pusher
        .push(&build(0), &first_repo, "v0", &mut present)
        .unwrap();
    let repos = total_images.div_ceil(TAGS_PER_REPO);
    let next_repo = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        for _ in 0..4 {
            let next_repo = next_repo.clone();
            let (addr, first_repo, shared) = (origin.addr(), first_repo.clone(), shared.clone());
            s.spawn(move || {
                let pusher = push::Pusher {
                    addr,
                    mount_from: Some(first_repo),
                    shared,
                };
                loop {
                    let r = usize::try_from(next_repo.fetch_add(1, Ordering::Relaxed)).unwrap();
                    if r >= repos {
                        break;
                    }
                    let repo = format!("bench/app-{r:03}");
                    let mut present = BTreeSet::new();
                    for i in r * TAGS_PER_REPO..((r + 1) * TAGS_PER_REPO).min(total_images) {
                        if i == 0 {
                            continue;
                        }
                        pusher
                            .push(
                                &build(i),
                                &repo,
                                &format!("v{}", i % TAGS_PER_REPO),
                                &mut present,
                            )
                            .unwrap();
                    }
                }
            });
        }
    });
    let push_secs = started.elapsed().as_secs_f64();
    log(format!("pushed {total_images} images in {push_secs:.1}s"));

    let api = FakeApiServer::start(FakeOptions::default()).expect("fake API server");
    api.install_larder_crds().expect("larder's CRDs");
    for n in 0..args.namespaces {
        api.create("/api/v1/namespaces", json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": format!("bench-{n:03}")}}))
            .unwrap();
    }
    api.create(
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "larder"}}),
    )
    .unwrap();
    let host = origin.host_port();
    let mut pods: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..args.pods {
        let ns = format!("bench-{:03}", i % args.namespaces);
        let name = format!("pod-{i:05}");
        let images: Vec<String> = pod_images(i, args.images, 0)
            .into_iter()
            .map(|k| image_ref(&host, k))
            .collect();
        api.create(
            &format!("/api/v1/namespaces/{ns}/pods"),
            pod(&name, &images, args.extra_metadata_bytes),
        )
        .unwrap();
        pods.insert(format!("{ns}/{name}"), images);
    }
    let expected = usage(&pods);
    log(format!(
        "preloaded {} pods using {} images",
        pods.len(),
        expected.len()
    ));
    let stats_before = api.store().stats();

    let mut cmd = Command::new(&args.larder);
    cmd.args([
        "controller",
        "--cache-registry",
        &cache.url(),
        "--insecure-registry",
        &host,
    ])
    .args([
        "--metrics-listen",
        "127.0.0.1:0",
        "--leader-election-namespace",
        "larder",
    ])
    .args(["--leader-election-identity", "bench"])
    // No kubelet: the fake's pods stay Pending, and no node proxy writes through.
    .args(["--copy-wait-for-pulls", "0s"])
    .args(&args.controller_args)
    .env("KUBECONFIG", api.kubeconfig_path())
    .env("LARDER_LOG", "warn");
    let t0 = Instant::now();
    let mut controller = ChildGuard::spawn(
        "larder controller",
        cmd,
        &work_dir.join("controller.out"),
        &work_dir.join("controller.err"),
    )
    .expect("larder controller starts");
    let pid = controller.pid().unwrap();
    let proc_ = Proc(pid);
    let ticks = clock_ticks();
    let stop = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak_rss) = (stop.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            let p = Proc(pid);
            while !stop.load(Ordering::Relaxed) {
                if let Some(rss) = p.status_kib("VmRSS:") {
                    peak_rss.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    log("phase 1: converging");
    let converge = wait_converged(&api, &expected, args.phase_timeout, &mut controller, t0);
    let cpu1 = proc_.cpu_seconds(ticks).unwrap_or_default();
    let hwm1 = proc_.status_kib("VmHWM:").unwrap_or_default();
    let rss1 = proc_.status_kib("VmRSS:").unwrap_or_default();
    let stats1 = api.store().stats();
    log(format!(
        "converged in {:.1}s; VmHWM {} MiB, CPU {cpu1:.1}s",
        converge.as_secs_f64(),
        hwm1 / 1024
    ));
    // Settle: a minute of steady state (resyncs, lease renewals) shows the idle cost.
    std::thread::sleep(Duration::from_secs(20));
    let cpu_settled = proc_.cpu_seconds(ticks).unwrap_or_default();
    let stats_settled = api.store().stats();

    log("phase 2: churn");
    let churn = args.pods * args.churn_percent / 100;
    let victims: Vec<String> = pods
        .keys()
        .step_by((pods.len() / churn.max(1)).max(1))
        .take(churn)
        .cloned()
        .collect();
    let t_churn = Instant::now();
    for key in &victims {
        let (ns, name) = key.split_once('/').unwrap();
        api.delete(&format!("/api/v1/namespaces/{ns}/pods/{name}"))
            .unwrap();
        pods.remove(key);
    }
    for j in 0..churn {
        let ns = format!("bench-{:03}", j % args.namespaces);
        let name = format!("churn-{j:05}");
        // One in five new pods also uses one of the churn-only images.
        let mut images: Vec<String> = pod_images(j, args.images, 0)
            .into_iter()
            .map(|k| image_ref(&host, k))
            .collect();
        if j % 5 == 0 && args.churn_images > 0 {
            images.push(image_ref(&host, args.images + (j / 5) % args.churn_images));
        }
        api.create(
            &format!("/api/v1/namespaces/{ns}/pods"),
            pod(&name, &images, args.extra_metadata_bytes),
        )
        .unwrap();
        pods.insert(format!("{ns}/{name}"), images);
    }
    let mut expected2 = usage(&pods);
    for name in expected.keys() {
        expected2.entry(name.clone()).or_insert(0);
    }
    let reconverge = wait_converged(
        &api,
        &expected2,
        args.phase_timeout,
        &mut controller,
        t_churn,
    );
    let cpu2 = proc_.cpu_seconds(ticks).unwrap_or_default();
    let hwm2 = proc_.status_kib("VmHWM:").unwrap_or_default();
    let stats2 = api.store().stats();
    log(format!(
        "reconverged in {:.1}s after churn of {churn} pods",
        reconverge.as_secs_f64()
    ));
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    controller.stop().unwrap();

    let writes = |s: &Value, k: &str| s["writes"][k]["count"].as_u64().unwrap_or(0);
    let requests = |s: &Value| -> BTreeMap<String, u64> {
        s["requests"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
            .collect()
    };
    let diff = |a: &Value, b: &Value| -> BTreeMap<String, u64> {
        let (a, b) = (requests(a), requests(b));
        b.iter()
            .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0)))
            .filter(|(_, v)| *v > 0)
            .collect()
    };
    let ci_writes1 = ["cachedimages", "cachedimages/status"]
        .iter()
        .map(|k| writes(&stats1, k))
        .sum::<u64>();
    let result = json!({
        "images": args.images,
        "churn_images": args.churn_images,
        "pods": args.pods,
        "extra_metadata_bytes": args.extra_metadata_bytes,
        "namespaces": args.namespaces,
        "push_seconds": push_secs,
        "converge_seconds": converge.as_secs_f64(),
        "controller_cpu_seconds_at_convergence": cpu1,
        "controller_cpu_seconds_idle_20s": cpu_settled - cpu1,
        "vm_hwm_mib_at_convergence": hwm1 as f64 / 1024.0,
        "vm_rss_mib_at_convergence": rss1 as f64 / 1024.0,
        "cachedimage_writes_per_object_phase1": ci_writes1 as f64 / expected.len() as f64,
        "writes_phase1": stats1["writes"],
        "requests_phase1": diff(&stats_before, &stats1),
        "requests_idle_20s": diff(&stats1, &stats_settled),
        "churn_pods_deleted": victims.len(),
        "churn_pods_added": churn,
        "reconverge_seconds": reconverge.as_secs_f64(),
        "controller_cpu_seconds_churn": cpu2 - cpu_settled,
        "requests_churn": diff(&stats_settled, &stats2),
        "vm_hwm_mib_end": hwm2 as f64 / 1024.0,
        "sampled_peak_rss_mib": peak_rss.load(Ordering::Relaxed) as f64 / 1024.0,
        "total_seconds": t0.elapsed().as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&result).unwrap());
    drop(api);
    drop(cache);
    drop(origin);
}
