//! The `CachedImage` reconciler: copy into the cache registry, refresh tags, expire unused
//! images, and (through the `larder.dev/cleanup` finalizer) remove manifests from the cache
//! registry before the object goes.
//!
//! Private images: the origin is always asked anonymously first. Only when it refuses are
//! credentials looked for, in the Secrets named by `spec.pullSecrets` and then by the
//! `imagePullSecrets` of the pods using the image (see [`crate::registry::secrets`]); each is
//! read with one `GET` and cached briefly. Credentials appear in no log, event, status or metric.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};
use larder_core::crd::{CachedImage, CachedImageStatus, Phase};
use larder_core::dockerconfig::Credentials;
use larder_core::reference::Reference;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::policy::{self, Next};
use crate::registry::{Copier, CopyOutcome, Progress, secrets};
use crate::{Error, Result, desired};

/// The finalizer that removes the image from the cache registry before the object goes.
pub const FINALIZER: &str = "larder.dev/cleanup";
/// How often `copiedBytes` is written while a copy runs.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);

/// Timing settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long an unused image is kept.
    pub retention: Duration,
    /// How often tags are re-checked.
    pub refresh_interval: Duration,
    /// Longest wait of a new image's first copy for the pods pulling it (see
    /// [`policy::copy_wait`]).
    pub copy_wait_for_pulls: Duration,
}

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub copier: Arc<Copier>,
    /// Managed pods (the live usage the retention decision reads).
    pub pods: Store<Pod>,
    /// Set once the pod store has its first full list: before that, nothing is deleted.
    pub pods_synced: Arc<AtomicBool>,
    /// The controller's own CachedImage cache, for shared-digest checks on cleanup.
    pub images: Store<CachedImage>,
    /// Events; `None` sends none (tests).
    pub recorder: Option<Recorder>,
    pub metrics: Metrics,
    pub settings: Settings,
    /// Bounds concurrent copies (refreshes and expiries do not wait for it).
    pub copies: Semaphore,
    /// Consecutive reconcile errors per object, for [`error_policy`]'s backoff (failed copies
    /// are not errors: their count and retry time are in the status).
    pub failures: Mutex<HashMap<String, u32>>,
    /// Copies this controller finished lately, by object name (see [`policy::behind_own_copy`]).
    pub copied: Mutex<HashMap<String, OwnCopy>>,
}

/// A copy this controller finished, and of what.
#[derive(Debug, Clone)]
pub struct OwnCopy {
    uid: Option<String>,
    source_image: String,
    at: Instant,
}

impl Context {
    /// Records that `ci` was copied and its `Ready` status written; forgets old records.
    pub(crate) fn record_copy(&self, ci: &CachedImage) {
        let mut copied = self.copied.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        copied.retain(|_, c| now.duration_since(c.at) < policy::OWN_COPY_WINDOW);
        copied.insert(
            ci.name_any(),
            OwnCopy {
                uid: ci.uid(),
                source_image: ci.spec.source_image.clone(),
                at: now,
            },
        );
    }

    /// How long ago this controller finished copying this very object and source image.
    pub(crate) fn copied_ago(&self, ci: &CachedImage) -> Option<Duration> {
        let copied = self.copied.lock().unwrap_or_else(PoisonError::into_inner);
        let c = copied.get(&ci.name_any())?;
        (c.uid == ci.uid() && c.source_image == ci.spec.source_image).then(|| c.at.elapsed())
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Reconciles one `CachedImage`.
pub async fn reconcile(ci: Arc<CachedImage>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconcile();
    let api: Api<CachedImage> = Api::all(ctx.client.clone());
    finalizer(&api, FINALIZER, ci, |event| async {
        match event {
            Finalizer::Apply(ci) => apply(&ci, &ctx).await,
            Finalizer::Cleanup(ci) => cleanup(&ci, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Requeues after an error with the backoff for this object's consecutive failures.
pub fn error_policy(ci: Arc<CachedImage>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = error.metric_label();
    ctx.metrics.reconcile_error(label);
    let failures = {
        let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = failures.entry(ci.name_any()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = if error.is_conflict() {
        // Someone wrote first: look again soon with the fresh object.
        Duration::from_secs(1)
    } else {
        policy::retry_delay(failures, error.is_retryable(), rand::random())
    };
    tracing::warn!(name = %ci.name_any(), %error, reason = label, ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn parse_source(ci: &CachedImage) -> Result<Reference> {
    Reference::parse(&ci.spec.source_image).map_err(|source| Error::Reference {
        reference: ci.spec.source_image.clone(),
        source,
    })
}

async fn publish(ctx: &Context, ci: &CachedImage, type_: EventType, reason: &str, note: String) {
    let Some(recorder) = &ctx.recorder else {
        return;
    };
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &ci.object_ref(&())).await {
        tracing::debug!(%error, "publishing an event");
    }
}

async fn apply(ci: &CachedImage, ctx: &Context) -> Result<Action> {
    let name = ci.name_any();
    let source = match parse_source(ci) {
        Ok(s) => s,
        Err(e) => {
            patch_outcome(
                ctx,
                ci,
                policy::after_copy(None, Some(e.metric_label())),
                Written::Failure(None),
                &e.to_string(),
            )
            .await?;
            return Err(e);
        }
    };
    let now = Timestamp::now();
    let status = ci.status.as_ref();
    // Counting live users walks every pod (10,000 pods: ~99 CPU-seconds over 1,000 images in
    // bench/controller.sh): count only once the status says the image has expired. The count
    // below still decides, so an image a pod uses is never deleted.
    if ctx.pods_synced.load(Ordering::Acquire)
        && policy::should_delete(status, ci.spec.retain, 0, now)
    {
        let state = ctx.pods.state();
        let users = desired::users_of(state.iter().map(AsRef::as_ref), &source.cached_image_name());
        if policy::should_delete(status, ci.spec.retain, users, now) {
            publish(
                ctx,
                ci,
                EventType::Normal,
                "Expired",
                "unused for the whole retention period".into(),
            )
            .await;
            tracing::info!(%name, "expired; deleting");
            Api::<CachedImage>::all(ctx.client.clone())
                .delete(&name, &DeleteParams::default())
                .await?;
            return Ok(Action::await_change());
        }
    }
    let until_expiry = status
        .and_then(|s| s.expires_at.as_ref())
        .map(|t| policy::until(now, t.0) + Duration::from_secs(1));
    let cap = |d: Duration| until_expiry.map_or(d, |e| d.min(e));
    let pinned = source.digest().is_some();
    let generation = ci.metadata.generation;
    match policy::next(
        status,
        generation,
        pinned,
        now,
        ctx.settings.refresh_interval,
    ) {
        Next::Wait(d) => Ok(Action::requeue(cap(d))),
        Next::Copy if policy::behind_own_copy(status.and_then(|s| s.phase), ctx.copied_ago(ci)) => {
            tracing::debug!(%name, "copied here moments ago; waiting for the watch to show it");
            ctx.metrics.copy_skipped_behind_watch();
            Ok(Action::requeue(policy::BEHIND_RECHECK))
        }
        Next::Copy => {
            if let Some(wait) = wait_for_pulls(ci, ctx, &source) {
                tracing::debug!(%name, ?wait, "pods are pulling this image through their proxies; copy later");
                return Ok(Action::requeue(wait));
            }
            copy(ci, ctx, &source)
                .await
                .map(|d| Action::requeue(cap(d)))
        }
        Next::Refresh => refresh(ci, ctx, &source)
            .await
            .map(|d| Action::requeue(cap(d))),
    }
}

/// Whether the first copy of `ci` should wait for the pods pulling it (see
/// [`policy::copy_wait`]); walks the pod cache only for a new image within the wait window.
fn wait_for_pulls(ci: &CachedImage, ctx: &Context, source: &Reference) -> Option<Duration> {
    let limit = ctx.settings.copy_wait_for_pulls;
    let phase = ci.status.as_ref().and_then(|s| s.phase);
    let age = ci
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(Duration::MAX, |t| policy::until(t.0, Timestamp::now()));
    policy::copy_wait(phase, None, age, limit)?;
    if !ctx.pods_synced.load(Ordering::Acquire) {
        return policy::copy_wait(phase, Some(1), age, limit);
    }
    let state = ctx.pods.state();
    let pulling =
        desired::pulling_users_of(state.iter().map(AsRef::as_ref), &source.cached_image_name());
    policy::copy_wait(phase, Some(pulling), age, limit)
}

/// The candidate origin credentials for a private image: from `spec.pullSecrets`, then from
/// the pull secrets of the pods using it (only once the pod cache is complete). Called only
/// after the origin refused anonymous access.
async fn credentials(ctx: &Context, ci: &CachedImage, source: &Reference) -> Vec<Credentials> {
    let from_pods = if ctx.pods_synced.load(Ordering::Acquire) {
        let state = ctx.pods.state();
        desired::pull_secrets_of(state.iter().map(AsRef::as_ref), &source.cached_image_name())
    } else {
        Vec::new()
    };
    let to_read = secrets::secrets_to_read(&ci.spec.pull_secrets, &from_pods);
    let found = ctx
        .copier
        .secrets()
        .credentials(
            &ctx.client,
            &to_read,
            source.registry(),
            source.repository(),
        )
        .await;
    tracing::info!(name = %ci.name_any(), image = %source, secrets = to_read.len(),
        credentials = found.len(), "the origin refused anonymous access; trying pull secrets");
    found
}

async fn refresh(ci: &CachedImage, ctx: &Context, source: &Reference) -> Result<Duration> {
    let status = ci.status.clone().unwrap_or_default();
    let found = ctx
        .copier
        .origin_digest_with(source, || credentials(ctx, ci, source))
        .await;
    match found {
        Ok(digest) if Some(&digest) == status.upstream_digest.as_ref() => {
            // Unchanged upstream; make sure the cache still has it (a wiped cache registry).
            if ctx.copier.cached_digest(source).await?.is_none() {
                return copy(ci, ctx, source).await;
            }
            let outcome = policy::after_copy(status.phase, None);
            patch_outcome(
                ctx,
                ci,
                outcome,
                Written::Success(None),
                "the origin still has the cached digest",
            )
            .await?;
            Ok(ctx.settings.refresh_interval)
        }
        Ok(digest) => {
            publish(
                ctx,
                ci,
                EventType::Normal,
                "TagMoved",
                format!("{source} now points at {digest}"),
            )
            .await;
            copy(ci, ctx, source).await
        }
        Err(e) => {
            // The cached copy keeps serving; only Synced says the origin could not be checked.
            let outcome = policy::after_copy(status.phase, Some(e.metric_label()));
            patch_outcome(ctx, ci, outcome, Written::Failure(None), &e.to_string()).await?;
            publish(ctx, ci, EventType::Warning, e.metric_label(), e.to_string()).await;
            Ok(policy::refresh_retry(
                e.metric_label(),
                e.is_retryable(),
                ctx.settings.refresh_interval,
            ))
        }
    }
}

async fn copy(ci: &CachedImage, ctx: &Context, source: &Reference) -> Result<Duration> {
    let _permit = ctx.copies.acquire().await;
    let api: Api<CachedImage> = Api::all(ctx.client.clone());
    let name = ci.name_any();
    let previous = ci.status.as_ref().and_then(|s| s.phase);
    let copying_status = || {
        let conditions = conditions(
            ci,
            (false, "Copying"),
            None,
            "copying into the cache registry",
        );
        json!({"phase": "Copying", "conditions": conditions})
    };
    // A retry after a failure says Copying only once it has run for a progress interval: an
    // origin that still fails costs one status write per attempt (Failed), not three.
    let mut show_copying = previous == Some(Phase::Failed);
    if matches!(previous, None | Some(Phase::Pending)) {
        patch_status(&api, &name, copying_status()).await?;
    }
    let progress = Progress::default();
    let started = Instant::now();
    let copying = ctx
        .copier
        .copy_with(source, || credentials(ctx, ci, source), &progress);
    tokio::pin!(copying);
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.tick().await;
    let result = loop {
        tokio::select! {
            r = &mut copying => break r,
            _ = tick.tick() => {
                let mut body = if show_copying { copying_status() } else { json!({}) };
                body["copiedBytes"] = json!(progress.copied());
                body["sizeBytes"] = json!(progress.total());
                match patch_status(&api, &name, body).await {
                    Ok(()) => show_copying = false,
                    Err(error) => tracing::debug!(%error, "progress update"),
                }
            }
        }
    };
    match result {
        Ok(out) => {
            ctx.metrics
                .copied(out.uploaded_bytes, started.elapsed().as_secs_f64());
            ctx.failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&name);
            let note = format!(
                "{} bytes ({} uploaded, {} blobs mounted, {} present)",
                out.size_bytes, out.uploaded_bytes, out.mounted, out.present
            );
            patch_outcome(
                ctx,
                ci,
                policy::after_copy(previous, None),
                Written::Success(Some(&out)),
                &note,
            )
            .await?;
            ctx.record_copy(ci);
            publish(ctx, ci, EventType::Normal, "Copied", note).await;
            Ok(if source.digest().is_some() {
                ctx.settings.refresh_interval.max(Duration::from_secs(3600))
            } else {
                ctx.settings.refresh_interval
            })
        }
        Err(e) => {
            // The failure and when to retry go into the status, so the backoff holds across
            // restarts and whatever else wakes the reconciler (`policy::next` waits for it).
            // Not an `Err`: `error_policy` would back off a second time, from memory.
            let reason = e.metric_label();
            let failures = ci
                .status
                .as_ref()
                .and_then(|s| s.failures)
                .unwrap_or(0)
                .saturating_add(1);
            let delay = policy::retry_delay(failures, e.is_retryable(), rand::random());
            let retry = Retry {
                failures,
                at: policy::after(Timestamp::now(), delay),
            };
            let outcome = policy::after_copy(previous, Some(reason));
            patch_outcome(
                ctx,
                ci,
                outcome,
                Written::Failure(Some(retry)),
                &e.to_string(),
            )
            .await?;
            publish(ctx, ci, EventType::Warning, "CopyFailed", e.to_string()).await;
            ctx.metrics.reconcile_error(reason);
            tracing::warn!(%name, error = %e, reason, failures, ?delay, "copy failed; retrying later");
            Ok(delay)
        }
    }
}

async fn patch_status(api: &Api<CachedImage>, name: &str, status: serde_json::Value) -> Result<()> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// The `Ready` and `Synced` conditions, keeping transition times of unchanged ones.
fn conditions(
    ci: &CachedImage,
    ready: (bool, &str),
    synced: Option<(bool, &str)>,
    message: &str,
) -> Vec<Condition> {
    let now = Time(Timestamp::now());
    let existing = ci
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let make = |type_: &str, (ok, reason): (bool, &str)| {
        let status = if ok { "True" } else { "False" };
        let last = existing
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.chars().take(1024).collect(),
            last_transition_time: last,
            observed_generation: ci.metadata.generation,
        }
    };
    let mut out = vec![make("Ready", ready)];
    match synced {
        Some(s) => out.push(make("Synced", s)),
        None => out.extend(existing.iter().filter(|c| c.type_ == "Synced").cloned()),
    }
    out
}

/// When a failed copy is tried again.
#[derive(Debug, Clone, Copy)]
struct Retry {
    /// Consecutive failed copies, this one included.
    failures: u32,
    at: Timestamp,
}

/// What an attempt adds to the status besides phase and conditions.
#[derive(Debug, Clone, Copy)]
enum Written<'a> {
    /// The origin answered: clears the failure count and retry time; what a copy copied.
    Success(Option<&'a CopyOutcome>),
    /// It did not; a failed copy sets the retry.
    Failure(Option<Retry>),
}

async fn patch_outcome(
    ctx: &Context,
    ci: &CachedImage,
    outcome: policy::Outcome,
    written: Written<'_>,
    message: &str,
) -> Result<()> {
    let api: Api<CachedImage> = Api::all(ctx.client.clone());
    let conditions = conditions(ci, outcome.ready, Some(outcome.synced), message);
    let mut status = json!({ "phase": outcome.phase, "conditions": conditions });
    if outcome.synced.0 {
        status["lastSync"] = json!(Time(Timestamp::now()));
    }
    match written {
        Written::Success(copied) => {
            // Null removes them in a merge patch.
            status["failures"] = serde_json::Value::Null;
            status["retryAt"] = serde_json::Value::Null;
            if let Some(out) = copied {
                status["digest"] = json!(out.digest);
                status["upstreamDigest"] = json!(out.upstream_digest);
                status["platforms"] = json!(out.platforms);
                status["sizeBytes"] = json!(out.size_bytes);
                status["copiedBytes"] = json!(out.size_bytes);
            }
        }
        Written::Failure(Some(retry)) => {
            status["failures"] = json!(retry.failures);
            status["retryAt"] = json!(Time(retry.at));
        }
        Written::Failure(None) => {}
    }
    patch_status(&api, &ci.name_any(), status).await
}

/// Other `CachedImage`s whose indexes are read to decide about shared children, at most.
const SHARING_CHECK_MAX: usize = 32;

/// The children of a deleted index that no other `CachedImage` of the same cache repository
/// needs: neither as its own manifest (a digest-pinned child) nor as a child of its index
/// (read from the cache). Too many others to check: none (they stay until the registry's GC).
async fn unshared_children(
    ci: &CachedImage,
    ctx: &Context,
    source: &Reference,
    children: &[String],
) -> Result<Vec<String>> {
    let repo = source.proxy_repository().ok();
    let others: Vec<(Reference, String)> = ctx
        .images
        .state()
        .iter()
        .filter(|o| o.name_any() != ci.name_any() && o.metadata.deletion_timestamp.is_none())
        .filter_map(|o| {
            let r = Reference::parse(&o.spec.source_image).ok()?;
            let digest = o.status.as_ref()?.digest.clone()?;
            (r.proxy_repository().ok() == repo).then_some((r, digest))
        })
        .collect();
    let tops: Vec<String> = others.iter().map(|(_, d)| d.clone()).collect();
    if others.len() > SHARING_CHECK_MAX {
        tracing::info!(name = %ci.name_any(), others = others.len(),
            "too many images share the repository to check; index children are left to the registry's GC");
        return Ok(policy::children_to_delete(children, &tops, None));
    }
    let mut others_children = Vec::new();
    for (other, digest) in &others {
        others_children.extend(ctx.copier.cached_children(other, digest).await?);
    }
    Ok(policy::children_to_delete(
        children,
        &tops,
        Some(&others_children),
    ))
}

async fn cleanup(ci: &CachedImage, ctx: &Context) -> Result<Action> {
    let Ok(source) = parse_source(ci) else {
        return Ok(Action::await_change());
    };
    let status: CachedImageStatus = ci.status.clone().unwrap_or_default();
    let repo = source.proxy_repository().ok();
    // Two objects may name the same manifest (`app:1` and `app@sha256:…`): keep it for the other.
    let shared = status.digest.as_ref().is_some_and(|digest| {
        ctx.images.state().iter().any(|other| {
            other.name_any() != ci.name_any()
                && other.metadata.deletion_timestamp.is_none()
                && other.status.as_ref().and_then(|s| s.digest.as_ref()) == Some(digest)
                && Reference::parse(&other.spec.source_image)
                    .ok()
                    .and_then(|r| r.proxy_repository().ok())
                    == repo
        })
    });
    if !shared && status.phase.is_some() {
        let digest = match &status.digest {
            Some(d) => Some(d.clone()),
            None => ctx.copier.cached_digest(&source).await?,
        };
        if let Some(digest) = digest {
            // Children first: should this stop half-way, the index is still there to list them.
            let children = ctx.copier.cached_children(&source, &digest).await?;
            if !children.is_empty() {
                for child in unshared_children(ci, ctx, &source, &children).await? {
                    ctx.copier.delete_manifest(&source, &child).await?;
                }
            }
            ctx.copier.delete_manifest(&source, &digest).await?;
        }
    }
    publish(
        ctx,
        ci,
        EventType::Normal,
        "Deleted",
        format!("{source} removed from the cache registry"),
    )
    .await;
    ctx.failures
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&ci.name_any());
    Ok(Action::await_change())
}
