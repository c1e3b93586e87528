//! Write-through to the cache registry: a blob the origin served this node, once verified and
//! kept on disk, is pushed to the cache registry from the disk file.
//!
//! Why: without it each blob of a new image left the origin twice, once for the node's pull
//! and once for the controller's copy into the cache registry. With it the copy (which waits
//! for the image's first pulls, see the controller's `policy::copy_wait`) finds the blobs there
//! and moves only what no node pulled (other platforms), so the origin serves each blob once
//! cluster-wide. Other nodes pulling the same image meanwhile find it in the cache registry.
//!
//! Bounded: a fixed number of workers and a fixed queue; when the queue is full the push is
//! dropped (the controller's copy then fetches that blob itself) and counted. A push that fails
//! is not retried for the same reason. Nothing here ever delays a client.

use std::sync::Arc;
use std::time::Duration;

use larder_core::digest::Digest;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{StatusCode, Url};
use tokio::sync::mpsc;

/// What became of one blob offered to the cache registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Uploaded.
    Pushed,
    /// The cache registry had it already.
    Present,
    /// The upload failed (the controller's copy will bring the blob).
    Failed,
    /// The queue was full; not attempted.
    Dropped,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Pushed,
        Outcome::Present,
        Outcome::Failed,
        Outcome::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pushed => "pushed",
            Outcome::Present => "present",
            Outcome::Failed => "failed",
            Outcome::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct WritebackLabels {
    pub result: &'static str,
}

/// `larder_proxy_cache_writes_total{result}`, every result present from the start.
pub fn register_metrics(
    registry: &mut prometheus_client::registry::Registry,
) -> Family<WritebackLabels, Counter> {
    let family = Family::<WritebackLabels, Counter>::default();
    for outcome in Outcome::ALL {
        drop(family.get_or_create(&WritebackLabels {
            result: outcome.as_str(),
        }));
    }
    registry.sub_registry_with_prefix("larder_proxy").register(
        "cache_writes",
        "Blobs the origin served that were offered to the cache registry (write-through), by result",
        family.clone(),
    );
    family
}

/// One blob to push: the open file stays readable even if the disk tier evicts it meanwhile.
#[derive(Debug)]
pub struct Job {
    /// `<host>[_<port>]/<repo>`: where the controllers keep this image in the cache registry.
    pub repository: String,
    pub digest: Digest,
    pub size: u64,
    pub file: tokio::fs::File,
}

/// The sending side, cheap to clone.
#[derive(Debug, Clone)]
pub struct CacheWriter {
    queue: mpsc::Sender<Job>,
    counts: Family<WritebackLabels, Counter>,
}

/// Settings of the write-through.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The cache registry's base URL.
    pub base: Url,
    /// Concurrent uploads.
    pub workers: usize,
    /// Blobs waiting for a worker at most.
    pub queue: usize,
    /// Deadline of the HEAD and POST requests.
    pub request_timeout: Duration,
}

impl CacheWriter {
    /// Starts the workers on the current runtime.
    pub fn spawn(
        http: reqwest::Client,
        settings: Settings,
        counts: Family<WritebackLabels, Counter>,
    ) -> CacheWriter {
        let (tx, rx) = mpsc::channel::<Job>(settings.queue.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..settings.workers.max(1) {
            let (rx, http, settings, counts) = (
                Arc::clone(&rx),
                http.clone(),
                settings.clone(),
                counts.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let Some(job) = rx.lock().await.recv().await else {
                        return;
                    };
                    let (repository, digest) = (job.repository.clone(), job.digest.clone());
                    let outcome = match push(&http, &settings, job).await {
                        Ok(outcome) => outcome,
                        Err(detail) => {
                            tracing::warn!(%digest, repository, detail, "write-through to the cache registry failed");
                            Outcome::Failed
                        }
                    };
                    tracing::debug!(%digest, repository, outcome = outcome.as_str(), "write-through");
                    counts
                        .get_or_create(&WritebackLabels {
                            result: outcome.as_str(),
                        })
                        .inc();
                }
            });
        }
        CacheWriter { queue: tx, counts }
    }

    /// Offers a blob; never waits.
    pub fn offer(&self, job: Job) {
        if self.queue.try_send(job).is_err() {
            self.counts
                .get_or_create(&WritebackLabels {
                    result: Outcome::Dropped.as_str(),
                })
                .inc();
        }
    }
}

/// The upload's PUT URL: the `Location` of the POST (absolute or relative to the registry, as
/// the distribution spec allows) with `digest=` added to its query.
pub fn put_url(base: &Url, location: &str, digest: &Digest) -> Result<Url, String> {
    let mut url = base
        .join(location)
        .map_err(|e| format!("upload location {location:?}: {e}"))?;
    if url.host_str() != base.host_str()
        || url.port_or_known_default() != base.port_or_known_default()
    {
        // Never send the blob to a host the operator did not name as the cache registry.
        return Err(format!(
            "upload location {location:?} points away from the cache registry"
        ));
    }
    url.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    Ok(url)
}

/// Deadline of the PUT that carries `size` bytes: the request timeout plus 1 s per 20 MiB (a
/// cache registry slower than that is not worth waiting for).
pub fn put_deadline(request_timeout: Duration, size: u64) -> Duration {
    request_timeout + Duration::from_secs(size / (20 << 20))
}

async fn push(http: &reqwest::Client, settings: &Settings, job: Job) -> Result<Outcome, String> {
    let base = &settings.base;
    let blob = base
        .join(&format!("v2/{}/blobs/{}", job.repository, job.digest))
        .map_err(|e| e.to_string())?;
    let head = http
        .head(blob)
        .timeout(settings.request_timeout)
        .send()
        .await
        .map_err(|e| format!("HEAD: {e}"))?;
    if head.status().is_success() {
        return Ok(Outcome::Present);
    }
    let start = base
        .join(&format!("v2/{}/blobs/uploads/", job.repository))
        .map_err(|e| e.to_string())?;
    let started = http
        .post(start)
        .header(CONTENT_LENGTH, 0)
        .timeout(settings.request_timeout)
        .send()
        .await
        .map_err(|e| format!("POST: {e}"))?;
    if started.status() != StatusCode::ACCEPTED {
        return Err(format!("POST answered {}", started.status()));
    }
    let location = started
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or("POST answered without a Location")?;
    let url = put_url(base, location, &job.digest)?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(
        job.file,
        256 << 10,
    ));
    let put = http
        .put(url)
        .header(CONTENT_TYPE, "application/octet-stream")
        .header(CONTENT_LENGTH, job.size)
        .body(body)
        .timeout(put_deadline(settings.request_timeout, job.size))
        .send()
        .await
        .map_err(|e| format!("PUT: {e}"))?;
    if put.status() == StatusCode::CREATED {
        Ok(Outcome::Pushed)
    } else {
        Err(format!("PUT answered {}", put.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        format!("sha256:{}", "ab".repeat(32)).parse().unwrap()
    }

    #[test]
    fn relative_and_absolute_locations_get_the_digest() {
        let base = Url::parse("http://cache.larder.svc:5000").unwrap();
        let url = put_url(&base, "/v2/r/blobs/uploads/u1?_state=x", &digest()).unwrap();
        assert_eq!(
            url.as_str(),
            format!(
                "http://cache.larder.svc:5000/v2/r/blobs/uploads/u1?_state=x&digest=sha256%3A{}",
                "ab".repeat(32)
            )
        );
        let url = put_url(
            &base,
            "http://cache.larder.svc:5000/v2/r/blobs/uploads/u2",
            &digest(),
        )
        .unwrap();
        assert_eq!(
            url.query(),
            Some(format!("digest=sha256%3A{}", "ab".repeat(32)).as_str())
        );
    }

    #[test]
    fn a_location_on_another_host_is_refused() {
        let base = Url::parse("http://cache.larder.svc:5000").unwrap();
        assert!(
            put_url(
                &base,
                "http://elsewhere:5000/v2/r/blobs/uploads/u",
                &digest()
            )
            .is_err()
        );
        assert!(
            put_url(
                &base,
                "http://cache.larder.svc:6000/v2/r/blobs/uploads/u",
                &digest()
            )
            .is_err()
        );
    }

    #[test]
    fn big_blobs_get_more_time() {
        let t = Duration::from_secs(5);
        assert_eq!(put_deadline(t, 1 << 20), t);
        assert_eq!(put_deadline(t, 1 << 30), t + Duration::from_secs(51));
    }
}
