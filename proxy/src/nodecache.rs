//! The node agent: fulfils this node's `NodeCache` (written by the controller from Precaches)
//! by prefetching its images into the disk tier, and reports progress on that object's status.
//!
//! It writes only its own object's status: at once when an image changes phase, otherwise at
//! most every [`PROGRESS_INTERVAL`] while bytes move, so a thousand nodes never storm one object
//! and a busy node never storms its own. The apiserver being unreachable changes nothing for
//! pulls: the agent only retries its watch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::watcher;
use kube::{Api, ResourceExt as _};
use larder_core::crd::{
    NodeCache, NodeCacheSpec, NodeCacheStatus, NodeImagePhase, NodeImageStatus,
};
use larder_core::digest::Digest;
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinSet};

use crate::prefetch::{self, Platform, PrefetchError, Prefetched};
use crate::state::ProxyState;

/// Progress is written at most this often while bytes move.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// First retry delay after a failure; doubles per failure up to [`RETRY_MAX`].
pub const RETRY_BASE: Duration = Duration::from_secs(10);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);
/// Longest wait between status writes the apiserver keeps refusing.
pub const WRITE_RETRY_MAX: Duration = Duration::from_secs(60);
/// How often a Ready image's blobs are checked to be still on disk, unless
/// `--precache-check-interval` says otherwise. Each check also marks them used, so the disk
/// tier's LRU evicts other content first while the NodeCache lists them.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(60);

/// What the agent knows about one spec image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub phase: NodeImagePhase,
    /// The digest the spec asked for when this entry last ran.
    pub wanted_digest: Option<String>,
    pub digest: Option<String>,
    pub bytes_done: u64,
    pub size_bytes: Option<u64>,
    pub reason: Option<String>,
    pub failures: u32,
    /// Which run of this image a finishing download belongs to: a result of a run that was
    /// superseded (the spec's digest moved meanwhile) is ignored.
    pub run: u64,
    pub retry_at: Option<Instant>,
    /// The config and layers a Ready image holds on disk, and when that was last checked.
    pub blobs: Vec<Digest>,
    pub checked_at: Option<Instant>,
}

impl Entry {
    fn pending(wanted_digest: Option<String>) -> Self {
        Self {
            phase: NodeImagePhase::Pending,
            wanted_digest,
            digest: None,
            bytes_done: 0,
            size_bytes: None,
            reason: None,
            failures: 0,
            retry_at: None,
            run: 0,
            blobs: Vec::new(),
            checked_at: None,
        }
    }
}

/// Brings `entries` in line with `spec` (pure): new images are Pending, removed ones go, an
/// image whose wanted digest changed (a moved tag) or any finished image after an epoch rise
/// runs again. Returns the images whose downloads are to be cancelled: those that left the spec
/// and those downloading a digest the spec no longer asks for.
pub fn sync_with_spec(
    entries: &mut BTreeMap<String, Entry>,
    spec: &NodeCacheSpec,
    epoch_rose: bool,
) -> Vec<String> {
    let wanted: BTreeMap<&str, Option<&str>> = spec
        .images
        .iter()
        .map(|i| (i.image.as_str(), i.digest.as_deref()))
        .collect();
    let gone: Vec<String> = entries
        .keys()
        .filter(|k| !wanted.contains_key(k.as_str()))
        .cloned()
        .collect();
    let mut cancel = gone.clone();
    for k in &gone {
        entries.remove(k);
    }
    for (image, digest) in wanted {
        let digest = digest.map(str::to_owned);
        match entries.get_mut(image) {
            None => {
                entries.insert(image.to_owned(), Entry::pending(digest));
            }
            Some(e) => {
                let moved = e.wanted_digest != digest;
                let rerun = (epoch_rose || moved)
                    && matches!(e.phase, NodeImagePhase::Ready | NodeImagePhase::Failed);
                if moved && e.phase == NodeImagePhase::Caching {
                    cancel.push(image.to_owned());
                }
                if rerun || (moved && e.phase == NodeImagePhase::Caching) {
                    let run = e.run.wrapping_add(1);
                    *e = Entry::pending(digest);
                    e.run = run;
                } else {
                    e.wanted_digest = digest;
                }
            }
        }
    }
    cancel
}

/// The images to start now (pure): Pending or Failed-and-due, in name order, up to the free
/// slots under `max_concurrent`.
pub fn to_start(
    entries: &BTreeMap<String, Entry>,
    max_concurrent: u32,
    now: Instant,
) -> Vec<String> {
    let running = entries
        .values()
        .filter(|e| e.phase == NodeImagePhase::Caching)
        .count();
    let free = (max_concurrent.max(1) as usize).saturating_sub(running);
    entries
        .iter()
        .filter(|(_, e)| match e.phase {
            NodeImagePhase::Pending => e.retry_at.is_none_or(|t| t <= now),
            NodeImagePhase::Failed => e.retry_at.is_some_and(|t| t <= now),
            _ => false,
        })
        .map(|(k, _)| k.clone())
        .take(free)
        .collect()
}

/// The Ready images whose blobs are due to be checked (pure).
pub fn due_for_check(
    entries: &BTreeMap<String, Entry>,
    now: Instant,
    interval: Duration,
) -> Vec<String> {
    entries
        .iter()
        .filter(|(_, e)| {
            e.phase == NodeImagePhase::Ready
                && e.checked_at
                    .is_none_or(|t| now.duration_since(t) >= interval)
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// The delay before retry number `failures` (1-based).
pub fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(10);
    RETRY_BASE.saturating_mul(factor).min(RETRY_MAX)
}

/// Whether the status may be written now (pure). `last` is the last attempt and how many
/// attempts in a row have failed. After a success: at once on a phase change, else every
/// [`PROGRESS_INTERVAL`]. After failures: only once a backoff from [`PROGRESS_INTERVAL`]
/// (doubling, up to [`WRITE_RETRY_MAX`]) has passed, so an apiserver that is down or refuses
/// the patch is not asked every tick.
pub fn may_write(last: Option<(Instant, u32)>, phase_changed: bool, now: Instant) -> bool {
    match last {
        None => true,
        Some((at, 0)) => phase_changed || now.duration_since(at) >= PROGRESS_INTERVAL,
        Some((at, failures)) => {
            let factor = 1u32 << failures.saturating_sub(1).min(10);
            let wait = PROGRESS_INTERVAL
                .saturating_mul(factor)
                .min(WRITE_RETRY_MAX);
            now.duration_since(at) >= wait
        }
    }
}

/// The merge patch that writes `doc` (pure). A merge patch leaves alone what it omits, so an
/// emptied image list is written as `[]`, or the images that left the spec would stay listed.
pub fn status_patch(doc: &NodeCacheStatus) -> serde_json::Value {
    let mut body = json!({ "status": doc });
    body["status"]["images"] = json!(doc.images);
    body
}

/// The status document (pure).
pub fn status_doc(
    generation: Option<i64>,
    epoch: u64,
    entries: &BTreeMap<String, Entry>,
    now: Timestamp,
) -> NodeCacheStatus {
    let images: Vec<NodeImageStatus> = entries
        .iter()
        .map(|(image, e)| NodeImageStatus {
            image: image.clone(),
            phase: e.phase,
            digest: e.digest.clone(),
            bytes_done: e.bytes_done,
            size_bytes: e.size_bytes,
            reason: e.reason.clone(),
        })
        .collect();
    NodeCacheStatus {
        observed_generation: generation,
        observed_epoch: epoch,
        images_ready: u32::try_from(
            images
                .iter()
                .filter(|i| i.phase == NodeImagePhase::Ready)
                .count(),
        )
        .unwrap_or(u32::MAX),
        bytes_done: images.iter().map(|i| i.bytes_done).sum(),
        images,
        updated: Some(Time(now)),
        gate: None,
    }
}

/// The digest the spec pins an image to (every node gets the same content); a malformed one is
/// an error that names the image rather than a silent fall-back to the tag.
pub fn wanted_digest(image: &str, digest: Option<&str>) -> Result<Option<Digest>, PrefetchError> {
    digest
        .map(|d| {
            Digest::parse(d).map_err(|e| {
                PrefetchError::Reference(image.to_owned(), format!("spec digest {d}: {e}"))
            })
        })
        .transpose()
}

type Progress = Arc<Mutex<BTreeMap<String, (u64, Option<u64>)>>>;
type Finished = (String, u64, Result<Prefetched, PrefetchError>);

/// Runs the agent for `node` until `stop` turns true; Ready images are checked on disk every
/// `check_interval`.
pub async fn run(
    state: Arc<ProxyState>,
    client: kube::Client,
    node: String,
    check_interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<NodeCache> = Api::all(client);
    let changed = Arc::new(Notify::new());
    let (store, writer) = reflector::store::<NodeCache>();
    let stream = larder_core::watch::backoff_until_data(reflector(
        writer,
        watcher(
            api.clone(),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        ),
    ));
    let watch_task = {
        let changed = changed.clone();
        tokio::spawn(async move {
            stream
                .for_each(|event| {
                    if let Err(error) = event {
                        tracing::warn!(%error, "NodeCache watch (pulls are unaffected)");
                    }
                    changed.notify_one();
                    futures::future::ready(())
                })
                .await;
        })
    };
    let mut agent = Agent {
        state,
        api,
        node,
        check_interval,
        store,
        entries: BTreeMap::new(),
        epoch: None,
        tasks: JoinSet::new(),
        handles: BTreeMap::new(),
        progress: Arc::default(),
        last_write: None,
        written: None,
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let finished = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = changed.notified() => None,
            _ = tick.tick() => None,
            Some(done) = agent.tasks.join_next(), if !agent.tasks.is_empty() => done.ok(),
        };
        agent.step(finished).await;
    }
    watch_task.abort();
}

struct Agent {
    state: Arc<ProxyState>,
    api: Api<NodeCache>,
    node: String,
    check_interval: Duration,
    store: Store<NodeCache>,
    entries: BTreeMap<String, Entry>,
    epoch: Option<u64>,
    tasks: JoinSet<Finished>,
    handles: BTreeMap<String, AbortHandle>,
    progress: Progress,
    /// The last status write attempted, and how many in a row failed.
    last_write: Option<(Instant, u32)>,
    written: Option<NodeCacheStatus>,
}

impl Agent {
    async fn step(&mut self, finished: Option<Finished>) {
        let now = Instant::now();
        let mut phase_changed = false;
        // A result of a superseded run (cancelled too late) is dropped.
        if let Some((image, run, result)) = finished
            && let Some(e) = self.entries.get_mut(&image)
            && e.run == run
            && e.phase == NodeImagePhase::Caching
        {
            self.handles.remove(&image);
            phase_changed = true;
            match result {
                Ok(done) => {
                    e.phase = NodeImagePhase::Ready;
                    e.digest = Some(done.manifest.to_string());
                    e.bytes_done = done.size_bytes;
                    e.size_bytes = Some(done.size_bytes);
                    e.reason = None;
                    e.failures = 0;
                    e.retry_at = None;
                    e.blobs = done.blobs;
                    e.checked_at = Some(now);
                    tracing::info!(%image, bytes = done.size_bytes, "prefetched onto this node");
                }
                Err(error) => {
                    e.phase = NodeImagePhase::Failed;
                    e.failures = e.failures.saturating_add(1);
                    e.reason = Some(error.to_string());
                    // A request that cannot succeed is retried rarely, not never: the
                    // registry or the spec may change.
                    let delay = if error.is_retryable() {
                        retry_delay(e.failures)
                    } else {
                        RETRY_MAX
                    };
                    e.retry_at = Some(now + delay);
                    tracing::warn!(%image, %error, fault = error.fault(), ?delay, "prefetch failed");
                }
            }
        }
        let Some(nc) = self.store.get(&ObjectRef::new(&self.node)) else {
            // No NodeCache: nothing asked of this node.
            if !self.entries.is_empty() {
                self.cancel_all();
            }
            return;
        };
        let epoch_rose = self.epoch.is_some_and(|e| nc.spec.epoch > e);
        self.epoch = Some(nc.spec.epoch);
        for gone in sync_with_spec(&mut self.entries, &nc.spec, epoch_rose) {
            if let Some(h) = self.handles.remove(&gone) {
                h.abort();
            }
            // An aborted task never clears its own progress.
            self.progress
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&gone);
        }
        // Progress reported by running downloads.
        {
            let progress = self.progress.lock().unwrap_or_else(PoisonError::into_inner);
            for (image, (done, total)) in progress.iter() {
                if let Some(e) = self.entries.get_mut(image)
                    && e.phase == NodeImagePhase::Caching
                {
                    e.bytes_done = *done;
                    e.size_bytes = *total;
                }
            }
        }
        phase_changed |= self.check_ready(now).await;
        let platform = match Platform::parse(&nc.spec.platform) {
            Ok(p) => Some(p),
            Err(error) => {
                tracing::warn!(%error, "NodeCache spec.platform");
                None
            }
        };
        for image in to_start(&self.entries, nc.spec.max_concurrent, now) {
            let Some(e) = self.entries.get_mut(&image) else {
                continue;
            };
            e.phase = NodeImagePhase::Caching;
            e.reason = None;
            phase_changed = true;
            let wanted = wanted_digest(&image, e.wanted_digest.as_deref());
            let (state, progress, platform) =
                (self.state.clone(), self.progress.clone(), platform.clone());
            let key = image.clone();
            let run = e.run;
            let handle = self.tasks.spawn(async move {
                let report = {
                    let (progress, key) = (progress.clone(), key.clone());
                    move |done: u64, total: Option<u64>| {
                        progress
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .insert(key.clone(), (done, total));
                    }
                };
                let result = match (platform, wanted) {
                    (Some(p), Ok(digest)) => {
                        prefetch::prefetch(&state, &key, digest.as_ref(), &p, &report).await
                    }
                    (None, _) => Err(PrefetchError::BadPlatform("(spec.platform)".into())),
                    (_, Err(e)) => Err(e),
                };
                progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
                (key, run, result)
            });
            self.handles.insert(image, handle);
        }
        self.state
            .metrics
            .set_prefetch_phases(self.entries.values().map(|e| e.phase));
        self.write_status(&nc, phase_changed, now).await;
    }

    /// Marks the blobs of due Ready images used; an image that lost any (evicted, deleted) goes
    /// back to Pending and is fetched again after [`RETRY_BASE`], not at once, so a disk tier
    /// too small for its precached images does not churn. Whether any phase changed.
    async fn check_ready(&mut self, now: Instant) -> bool {
        let mut changed = false;
        for image in due_for_check(&self.entries, now, self.check_interval) {
            let Some(e) = self.entries.get_mut(&image) else {
                continue;
            };
            e.checked_at = Some(now);
            let mut missing = 0usize;
            for blob in &e.blobs {
                if !self.state.disk.touch_blob(blob).await {
                    missing += 1;
                }
            }
            if missing > 0 {
                tracing::warn!(%image, missing, disk_max_bytes = self.state.disk.max_bytes(),
                    "a precached image lost blobs from the disk tier; fetching it again \
                     (is --disk-cache-max-bytes smaller than the precached images?)");
                let (run, wanted) = (e.run.wrapping_add(1), e.wanted_digest.take());
                *e = Entry::pending(wanted);
                e.run = run;
                e.retry_at = Some(now + RETRY_BASE);
                e.reason = Some(format!(
                    "{missing} blob(s) were evicted from the node's disk cache; fetching again"
                ));
                changed = true;
            }
        }
        changed
    }

    fn cancel_all(&mut self) {
        for (_, h) in std::mem::take(&mut self.handles) {
            h.abort();
        }
        self.entries.clear();
        self.progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.written = None;
        self.state.metrics.set_prefetch_phases(std::iter::empty());
    }

    async fn write_status(&mut self, nc: &NodeCache, phase_changed: bool, now: Instant) {
        let doc = status_doc(
            nc.metadata.generation,
            nc.spec.epoch,
            &self.entries,
            Timestamp::now(),
        );
        let unchanged = self.written.as_ref().is_some_and(|w| {
            w.images == doc.images
                && w.observed_generation == doc.observed_generation
                && w.observed_epoch == doc.observed_epoch
        });
        if unchanged {
            return;
        }
        if !may_write(self.last_write, phase_changed, now) {
            return;
        }
        let body = status_patch(&doc);
        match self
            .api
            .patch_status(
                &nc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await
        {
            Ok(_) => {
                self.last_write = Some((now, 0));
                self.written = Some(doc);
            }
            Err(error) => {
                let failures = self.last_write.map_or(0, |(_, f)| f).saturating_add(1);
                self.last_write = Some((now, failures));
                tracing::warn!(%error, failures, "writing NodeCache status (retried with backoff)");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use larder_core::crd::NodeCacheImage;

    fn spec(images: &[(&str, Option<&str>)], epoch: u64) -> NodeCacheSpec {
        NodeCacheSpec {
            platform: "linux/amd64".into(),
            max_concurrent: 2,
            epoch,
            images: images
                .iter()
                .map(|(i, d)| NodeCacheImage {
                    image: (*i).into(),
                    digest: d.map(str::to_owned),
                    precaches: vec!["p".into()],
                })
                .collect(),
        }
    }

    #[test]
    fn entries_follow_the_spec_and_rerun_on_moved_digests_and_epochs() {
        let mut entries = BTreeMap::new();
        let s = spec(&[("a", None), ("b", Some("sha256:1")), ("c", None)], 0);
        assert!(sync_with_spec(&mut entries, &s, false).is_empty());
        assert_eq!(entries.len(), 3);
        let now = Instant::now();
        assert_eq!(to_start(&entries, 2, now), ["a", "b"]);
        for e in entries.values_mut() {
            e.phase = NodeImagePhase::Ready;
        }
        assert!(to_start(&entries, 2, now).is_empty());
        // b's tag moved, c left the spec.
        let s = spec(&[("a", None), ("b", Some("sha256:2"))], 0);
        assert_eq!(sync_with_spec(&mut entries, &s, false), ["c"]);
        assert_eq!(entries["a"].phase, NodeImagePhase::Ready);
        assert_eq!(entries["b"].phase, NodeImagePhase::Pending);
        assert_eq!(entries["b"].wanted_digest.as_deref(), Some("sha256:2"));
        // The schedule fired: everything is checked again.
        sync_with_spec(&mut entries, &s, true);
        assert!(entries.values().all(|e| e.phase == NodeImagePhase::Pending));
    }

    #[test]
    fn a_digest_moving_during_a_download_restarts_it_as_a_new_run() {
        let mut entries = BTreeMap::new();
        sync_with_spec(&mut entries, &spec(&[("a", Some("sha256:1"))], 0), false);
        entries.get_mut("a").unwrap().phase = NodeImagePhase::Caching;
        let first_run = entries["a"].run;
        // Same spec again: the download goes on.
        assert!(
            sync_with_spec(&mut entries, &spec(&[("a", Some("sha256:1"))], 0), true).is_empty()
        );
        assert_eq!(entries["a"].phase, NodeImagePhase::Caching);
        // The tag moved: the old download is cancelled and its result will not count.
        let cancel = sync_with_spec(&mut entries, &spec(&[("a", Some("sha256:2"))], 0), false);
        assert_eq!(cancel, ["a"]);
        assert_eq!(entries["a"].phase, NodeImagePhase::Pending);
        assert_eq!(entries["a"].wanted_digest.as_deref(), Some("sha256:2"));
        assert_ne!(entries["a"].run, first_run);
    }

    #[test]
    fn the_limit_holds_and_failures_wait_for_their_backoff() {
        let mut entries = BTreeMap::new();
        sync_with_spec(
            &mut entries,
            &spec(&[("a", None), ("b", None), ("c", None)], 0),
            false,
        );
        let now = Instant::now();
        entries.get_mut("a").unwrap().phase = NodeImagePhase::Caching;
        assert_eq!(to_start(&entries, 2, now), ["b"]);
        let b = entries.get_mut("b").unwrap();
        b.phase = NodeImagePhase::Failed;
        b.retry_at = Some(now + Duration::from_secs(10));
        assert_eq!(to_start(&entries, 2, now), ["c"]);
        assert_eq!(
            to_start(&entries, 3, now + Duration::from_secs(11)),
            ["b", "c"]
        );
        assert_eq!(retry_delay(1), RETRY_BASE);
        assert_eq!(retry_delay(2), RETRY_BASE * 2);
        assert_eq!(retry_delay(30), RETRY_MAX);
    }

    #[test]
    fn ready_images_are_checked_once_per_interval() {
        let mut entries = BTreeMap::new();
        sync_with_spec(
            &mut entries,
            &spec(&[("a", None), ("b", None), ("c", None)], 0),
            false,
        );
        let t = Instant::now();
        assert!(
            due_for_check(&entries, t, CHECK_INTERVAL).is_empty(),
            "nothing Ready yet"
        );
        for (name, checked) in [("a", Some(t)), ("b", None)] {
            let e = entries.get_mut(name).unwrap();
            e.phase = NodeImagePhase::Ready;
            e.checked_at = checked;
        }
        entries.get_mut("c").unwrap().phase = NodeImagePhase::Caching;
        assert_eq!(due_for_check(&entries, t, CHECK_INTERVAL), ["b"]);
        assert_eq!(
            due_for_check(
                &entries,
                t + CHECK_INTERVAL - Duration::from_millis(1),
                CHECK_INTERVAL
            ),
            ["b"]
        );
        assert_eq!(
            due_for_check(&entries, t + CHECK_INTERVAL, CHECK_INTERVAL),
            ["a", "b"]
        );
    }

    #[test]
    fn status_writes_are_paced_and_back_off_when_refused() {
        let t = Instant::now();
        let s = |n: u64| t + Duration::from_secs(n);
        assert!(may_write(None, false, t), "the first write goes at once");
        // After a success: phase changes at once, progress every 5 s.
        assert!(may_write(Some((t, 0)), true, s(1)));
        assert!(!may_write(Some((t, 0)), false, s(4)));
        assert!(may_write(Some((t, 0)), false, s(5)));
        // After failures: not even a phase change skips the backoff (5 s, 10 s, ... 60 s).
        assert!(!may_write(Some((t, 1)), true, s(4)));
        assert!(may_write(Some((t, 1)), false, s(5)));
        assert!(!may_write(Some((t, 2)), true, s(9)));
        assert!(may_write(Some((t, 2)), false, s(10)));
        assert!(!may_write(Some((t, 30)), true, s(59)));
        assert!(may_write(Some((t, 30)), false, s(60)));
    }

    #[test]
    fn an_emptied_image_list_is_written_as_empty() {
        let doc = status_doc(Some(1), 2, &BTreeMap::new(), Timestamp::UNIX_EPOCH);
        let patch = status_patch(&doc);
        assert_eq!(patch["status"]["images"], json!([]));
        assert_eq!(patch["status"]["observedEpoch"], 2);
        assert_eq!(patch.as_object().map(|o| o.len()), Some(1), "only status");
    }

    #[test]
    fn status_counts_ready_images_and_bytes() {
        let mut entries = BTreeMap::new();
        sync_with_spec(&mut entries, &spec(&[("a", None), ("b", None)], 3), false);
        let a = entries.get_mut("a").unwrap();
        a.phase = NodeImagePhase::Ready;
        a.bytes_done = 100;
        entries.get_mut("b").unwrap().bytes_done = 7;
        let doc = status_doc(Some(4), 3, &entries, Timestamp::now());
        assert_eq!(
            (doc.images_ready, doc.bytes_done, doc.observed_epoch),
            (1, 107, 3)
        );
        assert_eq!(doc.observed_generation, Some(4));
        let hex = "ab".repeat(32);
        assert_eq!(
            wanted_digest("nginx:1", Some(&format!("sha256:{hex}")))
                .unwrap()
                .map(|d| d.to_string()),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(wanted_digest("nginx:1", None).unwrap(), None);
        let bad = wanted_digest("nginx:1", Some("sha256:ab")).unwrap_err();
        assert!(bad.to_string().contains("nginx:1"), "{bad}");
    }
}
