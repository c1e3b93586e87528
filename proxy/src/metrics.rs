//! The proxy's Prometheus metrics (names from DESIGN.md).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::error::Upstream;

/// Where the bytes of a response came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values are lowercase on the wire
pub enum Source {
    /// The node's disk tier.
    disk,
    /// The in-cluster cache registry.
    cache,
    /// The image's own registry.
    origin,
    /// A tag served from its last known digest because the origin could not be asked.
    stale,
    /// The request never reached a tier (malformed, or the API version check).
    none,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Kind {
    manifest,
    blob,
    /// The API version check (`GET /v2/`) and requests no endpoint matched.
    base,
    /// `tags/list`.
    tags,
    /// The referrers API.
    referrers,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub kind: Kind,
    pub source: Source,
    pub code: u16,
    /// `host[:port]` of the image's registry; empty for requests that name none, `other`
    /// past [`MAX_REGISTRY_LABELS`] distinct registries.
    pub registry: String,
}

/// Distinct `registry` label values kept; any client can ask for any host, so the label set
/// must be bounded.
pub const MAX_REGISTRY_LABELS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: &'static str,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    pub upstream: &'static str,
    pub reason: &'static str,
}

/// How a blob download from an upstream ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DownloadMode {
    /// One stream (below the threshold, ranges off, or the upstream ignores ranges).
    single,
    /// Several concurrent range requests (see [`crate::ranged`]).
    ranged,
}

/// What became of one range request of a ranged download.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RangeResult {
    /// Its part was written completely.
    ok,
    /// It broke, stalled or ended early; the rest of its part (or of a single stream whose
    /// upstream honours ranges) was asked for again.
    retried,
    /// It failed for good, and the download with it.
    failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DownloadLabels {
    pub mode: DownloadMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RangeLabels {
    pub result: RangeResult,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PrefetchLabels {
    pub phase: &'static str,
}

/// All of the proxy's metrics; cheap to share (`Arc`).
#[derive(Debug)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub bytes: Family<SourceLabels, Counter>,
    pub coalesced: Counter,
    pub upstream_duration: Family<UpstreamLabels, Histogram>,
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    pub disk_used_bytes: Gauge,
    pub disk_max_bytes: Gauge,
    /// Entries the disk tier evicted (least recently used first) since the proxy started.
    pub disk_evictions: Counter,
    pub in_flight_fetches: Gauge,
    /// Blob downloads from an upstream, by how they ran.
    pub blob_downloads: Family<DownloadLabels, Counter>,
    /// Range requests of ranged downloads, and resumes of single streams, by outcome.
    pub range_requests: Family<RangeLabels, Counter>,
    /// Images of this node's NodeCache by phase (the precache agent's view).
    pub prefetch_images: Family<PrefetchLabels, Gauge>,
    /// Blob bytes the precache agent waited on downloads for (blobs already on disk excluded).
    pub prefetch_bytes: Counter,
    registries: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ProxyMetrics {
    /// Creates the metrics and registers them under the `larder_proxy` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = ProxyMetrics {
            requests: Family::default(),
            bytes: Family::default(),
            coalesced: Counter::default(),
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ])
            }),
            upstream_errors: Family::default(),
            disk_used_bytes: Gauge::default(),
            disk_max_bytes: Gauge::default(),
            disk_evictions: Counter::default(),
            in_flight_fetches: Gauge::default(),
            blob_downloads: Family::default(),
            range_requests: Family::default(),
            prefetch_images: Family::default(),
            prefetch_bytes: Counter::default(),
            registries: std::sync::Mutex::default(),
        };
        let r = registry.sub_registry_with_prefix("larder_proxy");
        r.register(
            "requests",
            "Registry API requests served (manifests, blobs, tag lists, referrers), by kind, the tier that served them, HTTP status and registry",
            metrics.requests.clone(),
        );
        r.register(
            "bytes",
            "Response body bytes sent to clients, by the tier they came from",
            metrics.bytes.clone(),
        );
        r.register(
            "coalesced",
            "Requests that joined an upstream fetch already in flight instead of starting one",
            metrics.coalesced.clone(),
        );
        r.register(
            "upstream_request_duration_seconds",
            "Time until an upstream (cache registry or origin) answered with headers",
            metrics.upstream_duration.clone(),
        );
        r.register(
            "upstream_errors",
            "Upstream requests that failed, by upstream and reason",
            metrics.upstream_errors.clone(),
        );
        r.register(
            "prefetch_images",
            "Images this node's NodeCache asks for, by phase (Pending, Caching, Ready, Failed)",
            metrics.prefetch_images.clone(),
        );
        r.register(
            "prefetch_bytes",
            "Blob bytes downloaded into the disk tier by node-level precache (blobs already on disk not counted)",
            metrics.prefetch_bytes.clone(),
        );
        r.register(
            "disk_used_bytes",
            "Bytes held by the disk tier",
            metrics.disk_used_bytes.clone(),
        );
        r.register(
            "disk_max_bytes",
            "Configured size limit of the disk tier",
            metrics.disk_max_bytes.clone(),
        );
        r.register(
            "disk_evictions",
            "Blobs and manifests evicted from the disk tier to keep it under its size limit, least recently used first",
            metrics.disk_evictions.clone(),
        );
        r.register(
            "in_flight_fetches",
            "Blob downloads from an upstream in progress",
            metrics.in_flight_fetches.clone(),
        );
        r.register(
            "upstream_blob_downloads",
            "Blob downloads from an upstream, by mode: one stream, or several concurrent range requests",
            metrics.blob_downloads.clone(),
        );
        r.register(
            "upstream_range_requests",
            "Range requests of ranged blob downloads, and resumes of single streams, by result: ok (part complete), retried (broke, stalled or ended early; the rest asked again), failed (the download failed)",
            metrics.range_requests.clone(),
        );
        // Every series exists from the start, so rates and alerts see zeros, not gaps.
        for mode in [DownloadMode::single, DownloadMode::ranged] {
            metrics
                .blob_downloads
                .get_or_create(&DownloadLabels { mode })
                .inc_by(0);
        }
        for result in [RangeResult::ok, RangeResult::retried, RangeResult::failed] {
            metrics
                .range_requests
                .get_or_create(&RangeLabels { result })
                .inc_by(0);
        }
        metrics
    }

    pub fn download(&self, mode: DownloadMode) {
        self.blob_downloads
            .get_or_create(&DownloadLabels { mode })
            .inc();
    }

    pub fn range_request(&self, result: RangeResult) {
        self.range_requests
            .get_or_create(&RangeLabels { result })
            .inc();
    }

    pub fn request(&self, kind: Kind, source: Source, code: u16, registry: &str) {
        let registry = self.registry_label(registry);
        self.requests
            .get_or_create(&RequestLabels {
                kind,
                source,
                code,
                registry,
            })
            .inc();
    }

    fn registry_label(&self, registry: &str) -> String {
        let mut seen = self.registries.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(registry) {
            return registry.to_owned();
        }
        if seen.len() < MAX_REGISTRY_LABELS {
            seen.insert(registry.to_owned());
            return registry.to_owned();
        }
        "other".to_owned()
    }

    pub fn upstream_error(&self, upstream: Upstream, reason: &'static str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                upstream: upstream.as_str(),
                reason,
            })
            .inc();
    }

    pub fn upstream_latency(&self, upstream: Upstream, kind: Kind, seconds: f64) {
        self.upstream_duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.as_str(),
                kind,
            })
            .observe(seconds);
    }

    pub fn sent(&self, source: Source, bytes: u64) {
        self.bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
    }
}

impl ProxyMetrics {
    /// Sets `larder_proxy_prefetch_images{phase}` from the agent's entries (every phase reported,
    /// zero included).
    pub fn set_prefetch_phases(
        &self,
        phases: impl Iterator<Item = larder_core::crd::NodeImagePhase>,
    ) {
        use larder_core::crd::NodeImagePhase as P;
        let mut counts = [0i64; 4];
        for p in phases {
            counts[p as usize] += 1;
        }
        for (i, phase) in [P::Pending, P::Caching, P::Ready, P::Failed]
            .into_iter()
            .enumerate()
        {
            self.prefetch_images
                .get_or_create(&PrefetchLabels {
                    phase: phase.as_str(),
                })
                .set(counts[i]);
        }
    }
}
