//! The controllers' decisions as pure functions of plain data and `now`: retention, refresh,
//! the phase after a copy, and the retry backoff. Kept apart from the API calls so every rule
//! is tested directly.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use larder_core::crd::{CachedImage, CachedImageStatus, Phase};

/// `lastUsed` is refreshed while an image is in use at most this often, so a busy image does
/// not cost a status write per pod event.
pub const LAST_USED_RESOLUTION: Duration = Duration::from_secs(3600);

/// `t + d`, saturating at the far future.
pub fn after(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// `to - from` as a non-negative std duration (zero when `to` is not later).
pub fn until(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// The usage fields of the status the pod aggregator owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// `status.lastUsed`.
    pub last_used: Option<Timestamp>,
    /// `status.expiresAt`.
    pub expires_at: Option<Timestamp>,
}

/// What `lastUsed`/`expiresAt` should be, given how many pods use the image now.
///
/// - In use: no expiry; `lastUsed` is now (refreshed at most every [`LAST_USED_RESOLUTION`]).
/// - Unused and retained: no expiry.
/// - Unused: the last user just went (or was never seen): `lastUsed` = now when in use until
///   now, and `expiresAt` = now + retention. An expiry already set is **kept**, never pushed
///   forward by later passes: kube-image-keeper's expiries kept moving and nothing was ever
///   deleted (its issue #396).
pub fn retention(
    current: &CachedImageStatus,
    users: u32,
    retain: bool,
    now: Timestamp,
    retention: Duration,
) -> Retention {
    let last_used = current.last_used.as_ref().map(|t| t.0);
    let expires_at = current.expires_at.as_ref().map(|t| t.0);
    let was_in_use = current.used_by.as_ref().is_some_and(|u| u.count > 0);
    if users > 0 {
        let stale = !was_in_use || last_used.is_none_or(|t| until(t, now) >= LAST_USED_RESOLUTION);
        return Retention {
            last_used: if stale { Some(now) } else { last_used },
            expires_at: None,
        };
    }
    let last_used = if was_in_use { Some(now) } else { last_used };
    if retain {
        return Retention {
            last_used,
            expires_at: None,
        };
    }
    Retention {
        last_used,
        expires_at: Some(expires_at.unwrap_or_else(|| after(now, retention))),
    }
}

/// Whether the `CachedImage` must be deleted now. `live_users` must come from the live pod
/// cache (synced), not from `status.usedBy`, which may lag: an image a pod uses is never deleted.
pub fn should_delete(
    status: Option<&CachedImageStatus>,
    retain: bool,
    live_users: usize,
    now: Timestamp,
) -> bool {
    !retain
        && live_users == 0
        && status
            .and_then(|s| s.expires_at.as_ref())
            .is_some_and(|t| t.0 <= now)
}

/// What the `CachedImage` reconciler should do with the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Copy (or finish copying) the image into the cache.
    Copy,
    /// HEAD the origin: has the tag moved?
    Refresh,
    /// Nothing until then.
    Wait(Duration),
}

/// The next step for an image in `status`, the object being at `generation`.
///
/// After a failed copy nothing is tried before `retryAt` (see [`retry_wait`]). A digest-pinned
/// reference is immutable: once Ready it is never refreshed. A tag is re-checked
/// `refresh_interval` after `lastSync`. `Copying` found at reconcile time means a copy was
/// interrupted (restart): copy again, which only transfers what is missing.
pub fn next(
    status: Option<&CachedImageStatus>,
    generation: Option<i64>,
    pinned: bool,
    now: Timestamp,
    refresh_interval: Duration,
) -> Next {
    if let Some(wait) = status.and_then(|s| retry_wait(s, generation, now)) {
        return Next::Wait(wait);
    }
    let phase = status.and_then(|s| s.phase);
    match phase {
        None | Some(Phase::Pending | Phase::Copying | Phase::Failed) => Next::Copy,
        Some(Phase::Ready) if pinned => Next::Wait(refresh_interval),
        Some(Phase::Ready) => {
            let Some(last) = status.and_then(|s| s.last_sync.as_ref()) else {
                return Next::Refresh;
            };
            let due = after(last.0, refresh_interval);
            if due <= now {
                Next::Refresh
            } else {
                Next::Wait(until(now, due))
            }
        }
    }
}

/// How long a failed copy still waits for its `retryAt`; `None` when it is due. A spec that
/// changed since the failure (a fixed reference, new pull secrets: the `Ready` condition was
/// written at an older generation) is tried at once.
pub fn retry_wait(
    status: &CachedImageStatus,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Duration> {
    let at = status.retry_at.as_ref()?.0;
    let failed_at = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .and_then(|c| c.observed_generation);
    (failed_at == generation && at > now).then(|| until(now, at))
}

/// The wait before the next attempt after `failures` consecutive failed ones (at least 1):
/// [`backoff`] plus up to a fifth of it, `jitter` in [0, 1) being drawn by the caller, so that
/// an outage does not synchronise the retries of many images.
pub fn retry_delay(failures: u32, retryable: bool, jitter: f64) -> Duration {
    let base = backoff(failures.saturating_sub(1), retryable);
    base + base.mul_f64(jitter.clamp(0.0, 1.0) * 0.2)
}

/// A hash of what should wake the `CachedImage` reconciler, for the watch filter: spec and
/// generation, deletion and finalizers, the usage the pod aggregator writes (`usedBy`,
/// `expiresAt`), and a tag refresh asked for by clearing `lastSync` of a Ready image (the
/// precache pass does). Not the rest of the status, which the reconciler writes itself: woken
/// by its own writes, it ran a failing copy again per write, overriding its backoff.
pub fn trigger_hash(ci: &CachedImage) -> u64 {
    let meta = &ci.metadata;
    let status = ci.status.as_ref();
    let mut h = DefaultHasher::new();
    (meta.generation, &ci.spec, &meta.finalizers).hash(&mut h);
    meta.deletion_timestamp.as_ref().map(|t| t.0).hash(&mut h);
    status.and_then(|s| s.used_by.as_ref()).hash(&mut h);
    status
        .and_then(|s| s.expires_at.as_ref())
        .map(|t| t.0)
        .hash(&mut h);
    status
        .is_some_and(|s| s.phase == Some(Phase::Ready) && s.last_sync.is_none())
        .hash(&mut h);
    h.finish()
}

/// How often a new image waiting for its pods' pulls looks again.
pub const PULL_RECHECK: Duration = Duration::from_secs(2);
/// How long a new image's copy waits in any case, once no pod is pulling it any more: the
/// proxies push what they verified right away, and the last pushes may still be running.
pub const PULL_SETTLE: Duration = Duration::from_secs(5);

/// How long the first copy of an image created `age` ago should wait, given `pulling` pods
/// still pulling it (`None`: not counted yet; any wait at all is then worth counting them).
///
/// Why: the node proxies pulling a new image write each blob through to the cache registry
/// (larder-proxy's write-through), so a copy that starts after their pulls finds the blobs
/// there and the origin serves each blob once cluster-wide; a copy racing them fetched every
/// blob from the origin a second time. Only a never-copied image waits (phase unset or
/// `Pending`), never past `limit` after its creation (a pod that cannot pull must not keep its
/// image out of the cache); `limit` zero never waits.
pub fn copy_wait(
    phase: Option<Phase>,
    pulling: Option<usize>,
    age: Duration,
    limit: Duration,
) -> Option<Duration> {
    if limit.is_zero() || !matches!(phase, None | Some(Phase::Pending)) || age >= limit {
        return None;
    }
    let left = limit - age;
    match pulling {
        None => Some(left),
        Some(0) if age < PULL_SETTLE => Some(PULL_SETTLE - age),
        Some(0) => None,
        Some(_) => Some(PULL_RECHECK.min(left)),
    }
}

/// How long after this controller finished copying an image a cached copy of its object that
/// does not show `Ready` yet is taken to be behind the watch rather than in need of a copy.
pub const OWN_COPY_WINDOW: Duration = Duration::from_secs(60);
/// When to look again at an object that is behind this controller's own write (the watch
/// event of that write normally comes first).
pub const BEHIND_RECHECK: Duration = Duration::from_secs(5);

/// Whether a reconcile that would copy is looking at an object older than this controller's
/// own successful copy of it, `copied_ago` (same object and source image; `None`: no such
/// copy): a reconcile queued during the copy runs before the `Ready` status comes back
/// through the watch, and copying again would only repeat the work.
pub fn behind_own_copy(phase: Option<Phase>, copied_ago: Option<Duration>) -> bool {
    phase != Some(Phase::Ready) && copied_ago.is_some_and(|ago| ago < OWN_COPY_WINDOW)
}

/// The outcome of a copy or refresh, as the status should show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The new phase.
    pub phase: Phase,
    /// `Ready` condition: status and reason.
    pub ready: (bool, &'static str),
    /// `Synced` condition: status and reason.
    pub synced: (bool, &'static str),
}

/// The phase after a copy attempt. A failure on an image the cache already holds (a refresh
/// whose origin is down) keeps it `Ready`: the cached copy still serves pods; only `Synced`
/// says the origin could not be checked.
pub fn after_copy(previous: Option<Phase>, error: Option<&'static str>) -> Outcome {
    match (error, previous) {
        (None, _) => Outcome {
            phase: Phase::Ready,
            ready: (true, "Copied"),
            synced: (true, "UpToDate"),
        },
        (Some(reason), Some(Phase::Ready)) => Outcome {
            phase: Phase::Ready,
            ready: (true, "Cached"),
            synced: (false, reason),
        },
        (Some(reason), _) => Outcome {
            phase: Phase::Failed,
            ready: (false, reason),
            synced: (false, reason),
        },
    }
}

/// First retry delay after a failure.
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30 * 60);

/// The delay before retry number `attempt` (0 = first retry): 10 s doubling to 30 min.
/// Errors that cannot heal by themselves (not found, denied, bad reference) go straight to
/// the longest step. The caller adds jitter so a registry outage does not synchronise retries.
pub fn backoff(attempt: u32, retryable: bool) -> Duration {
    if !retryable {
        return BACKOFF_MAX;
    }
    BACKOFF_BASE
        .checked_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_MAX)
        .min(BACKOFF_MAX)
}

/// The child manifests of a deleted index that may go from the cache: those no other
/// `CachedImage` of the same repository still needs, either as its own top manifest
/// (`others_top`, e.g. a digest-pinned child) or as a child of its index (`others_children`).
/// `None` for `others_children` means they could not all be learned: nothing is deleted then.
pub fn children_to_delete(
    children: &[String],
    others_top: &[String],
    others_children: Option<&[String]>,
) -> Vec<String> {
    let Some(others_children) = others_children else {
        return Vec::new();
    };
    let mut out: Vec<String> = children
        .iter()
        .filter(|c| !others_top.contains(c) && !others_children.contains(c))
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// How long to wait after a failed refresh. The cached copy keeps serving meanwhile. Missing
/// or refused credentials do not heal by waiting (a pod bringing pull secrets changes the
/// object and wakes the reconciler anyway): wait long, at most a refresh interval.
pub fn refresh_retry(reason: &str, retryable: bool, refresh_interval: Duration) -> Duration {
    let floor = Duration::from_secs(60);
    match reason {
        "Unauthorized" | "CredentialsUnavailable" => BACKOFF_MAX.min(refresh_interval).max(floor),
        _ => backoff(0, retryable).max(floor),
    }
}

/// `Time` from a timestamp.
pub fn time(t: Timestamp) -> Time {
    Time(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use larder_core::crd::UsedBy;

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn status(users: u32, last_used: Option<i64>, expires: Option<i64>) -> CachedImageStatus {
        CachedImageStatus {
            used_by: Some(UsedBy {
                count: users,
                pods: Vec::new(),
            }),
            last_used: last_used.map(|s| Time(t(s))),
            expires_at: expires.map(|s| Time(t(s))),
            ..CachedImageStatus::default()
        }
    }

    #[test]
    fn last_user_gone_starts_the_clock_once() {
        let now = t(100);
        let r = retention(&status(1, Some(0), None), 0, false, now, DAY);
        assert_eq!(r.last_used, Some(now));
        assert_eq!(r.expires_at, Some(after(now, DAY)));
        // Later passes keep the expiry where it is.
        let later = t(5000);
        let s = status(0, Some(100), Some(100 + 86_400));
        let r2 = retention(&s, 0, false, later, DAY);
        assert_eq!(r2.expires_at, Some(t(100 + 86_400)));
        assert_eq!(r2.last_used, Some(t(100)));
    }

    #[test]
    fn a_user_coming_back_clears_the_expiry() {
        let r = retention(&status(0, Some(0), Some(500)), 2, false, t(200), DAY);
        assert_eq!(r.expires_at, None);
        assert_eq!(r.last_used, Some(t(200)));
    }

    #[test]
    fn last_used_is_refreshed_at_a_bounded_rate() {
        let r = retention(&status(1, Some(0), None), 1, false, t(60), DAY);
        assert_eq!(r.last_used, Some(t(0)));
        let r = retention(&status(1, Some(0), None), 1, false, t(3600), DAY);
        assert_eq!(r.last_used, Some(t(3600)));
    }

    #[test]
    fn retained_images_never_expire() {
        let r = retention(&status(0, None, Some(5)), 0, true, t(10), DAY);
        assert_eq!(r.expires_at, None);
        assert!(!should_delete(
            Some(&status(0, None, Some(5))),
            true,
            0,
            t(10)
        ));
    }

    #[test]
    fn deletion_needs_expiry_past_no_retain_and_no_live_user() {
        let s = status(0, None, Some(100));
        assert!(should_delete(Some(&s), false, 0, t(100)));
        assert!(!should_delete(Some(&s), false, 0, t(99)));
        // The status says unused but the live cache sees a pod: never delete.
        assert!(!should_delete(Some(&s), false, 1, t(200)));
        assert!(!should_delete(
            Some(&status(0, None, None)),
            false,
            0,
            t(200)
        ));
        assert!(!should_delete(None, false, 0, t(200)));
    }

    #[test]
    fn a_copy_just_finished_here_is_not_repeated_for_a_stale_object() {
        let just = Some(Duration::from_secs(2));
        for phase in [
            None,
            Some(Phase::Pending),
            Some(Phase::Copying),
            Some(Phase::Failed),
        ] {
            assert!(behind_own_copy(phase, just), "{phase:?}");
            assert!(
                !behind_own_copy(phase, None),
                "{phase:?}: never copied here"
            );
            assert!(
                !behind_own_copy(phase, Some(OWN_COPY_WINDOW)),
                "{phase:?}: too long ago, the watch is not that slow"
            );
        }
        // Ready is not behind; it goes its own way (refresh or wait).
        assert!(!behind_own_copy(Some(Phase::Ready), just));
    }

    #[test]
    fn next_step_by_phase_and_last_sync() {
        let hour = Duration::from_secs(3600);
        assert_eq!(next(None, None, false, t(0), hour), Next::Copy);
        for phase in [Phase::Pending, Phase::Copying, Phase::Failed] {
            let s = CachedImageStatus {
                phase: Some(phase),
                ..CachedImageStatus::default()
            };
            assert_eq!(
                next(Some(&s), None, false, t(0), hour),
                Next::Copy,
                "{phase}"
            );
        }
        let ready = CachedImageStatus {
            phase: Some(Phase::Ready),
            last_sync: Some(Time(t(0))),
            ..CachedImageStatus::default()
        };
        assert_eq!(
            next(Some(&ready), None, false, t(600), hour),
            Next::Wait(Duration::from_secs(3000))
        );
        assert_eq!(
            next(Some(&ready), None, false, t(3600), hour),
            Next::Refresh
        );
        assert_eq!(
            next(Some(&ready), None, true, t(99_999), hour),
            Next::Wait(hour)
        );
    }

    #[test]
    fn a_new_image_waits_for_its_pulls_then_settles_and_never_past_the_limit() {
        let s = Duration::from_secs;
        let limit = s(120);
        // Pods pulling: look again soon, but never past the limit.
        assert_eq!(copy_wait(None, Some(2), s(1), limit), Some(PULL_RECHECK));
        assert_eq!(copy_wait(None, Some(2), s(119), limit), Some(s(1)));
        assert_eq!(copy_wait(None, Some(2), s(120), limit), None);
        // Pulls done: a short settle for the last pushes, then copy.
        assert_eq!(
            copy_wait(Some(Phase::Pending), Some(0), s(2), limit),
            Some(s(3))
        );
        assert_eq!(copy_wait(Some(Phase::Pending), Some(0), s(5), limit), None);
        // Not counted yet: worth counting.
        assert!(copy_wait(None, None, s(1), limit).is_some());
        // Copied before, failed, interrupted, or switched off: no wait.
        for phase in [Phase::Ready, Phase::Failed, Phase::Copying] {
            assert_eq!(
                copy_wait(Some(phase), Some(3), s(1), limit),
                None,
                "{phase}"
            );
        }
        assert_eq!(copy_wait(None, Some(3), s(1), Duration::ZERO), None);
    }

    fn failed(failures: u32, retry_at: i64, generation: i64) -> CachedImageStatus {
        CachedImageStatus {
            phase: Some(Phase::Failed),
            failures: Some(failures),
            retry_at: Some(Time(t(retry_at))),
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "NotFound".into(),
                message: String::new(),
                last_transition_time: Time(t(0)),
                observed_generation: Some(generation),
            }],
            ..CachedImageStatus::default()
        }
    }

    #[test]
    fn a_failed_copy_waits_for_its_retry_time_even_after_a_restart() {
        let hour = Duration::from_secs(3600);
        // Everything comes from the status: a fresh controller decides the same.
        let s = failed(3, 600, 1);
        assert_eq!(
            next(Some(&s), Some(1), false, t(100), hour),
            Next::Wait(Duration::from_secs(500))
        );
        assert_eq!(next(Some(&s), Some(1), false, t(600), hour), Next::Copy);
        // The spec changed since (a fixed tag, new pull secrets): at once.
        assert_eq!(next(Some(&s), Some(2), false, t(100), hour), Next::Copy);
        // A Ready image whose re-copy failed waits too, then re-checks the tag.
        let ready = CachedImageStatus {
            phase: Some(Phase::Ready),
            ..failed(1, 600, 1)
        };
        assert_eq!(
            next(Some(&ready), Some(1), false, t(590), hour),
            Next::Wait(Duration::from_secs(10))
        );
        assert_eq!(
            next(Some(&ready), Some(1), false, t(600), hour),
            Next::Refresh
        );
    }

    #[test]
    fn retries_follow_the_backoff_with_a_bounded_jitter() {
        assert_eq!(retry_delay(1, true, 0.0), Duration::from_secs(10));
        assert_eq!(retry_delay(2, true, 0.0), Duration::from_secs(20));
        assert_eq!(retry_delay(1, true, 0.999), Duration::from_secs_f64(11.998));
        assert_eq!(retry_delay(0, true, 0.0), Duration::from_secs(10));
        // Not found, denied, bad reference: the longest step, the first time already.
        assert_eq!(retry_delay(1, false, 0.0), BACKOFF_MAX);
        assert_eq!(retry_delay(1, false, 7.0), BACKOFF_MAX.mul_f64(1.2));
    }

    #[test]
    fn only_spec_usage_deletion_and_refresh_requests_trigger() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        use larder_core::crd::CachedImageSpec;
        let base = CachedImage {
            metadata: ObjectMeta {
                name: Some("img".into()),
                generation: Some(1),
                resource_version: Some("1".into()),
                ..ObjectMeta::default()
            },
            spec: CachedImageSpec::new("docker.io/library/nginx:1.27"),
            status: Some(failed(1, 10, 1)),
        };
        let h = trigger_hash(&base);
        let with = |f: &dyn Fn(&mut CachedImage)| {
            let mut ci = base.clone();
            f(&mut ci);
            trigger_hash(&ci)
        };
        let status = |f: &dyn Fn(&mut CachedImageStatus)| {
            with(&|ci: &mut CachedImage| {
                ci.metadata.resource_version = Some("2".into());
                if let Some(s) = ci.status.as_mut() {
                    f(s);
                }
            })
        };
        // The reconciler's own writes: no trigger.
        assert_eq!(status(&|s| s.phase = Some(Phase::Copying)), h);
        assert_eq!(status(&|s| s.failures = Some(2)), h);
        assert_eq!(status(&|s| s.retry_at = None), h);
        assert_eq!(status(&|s| s.conditions.clear()), h);
        assert_eq!(status(&|s| s.copied_bytes = Some(5)), h);
        assert_eq!(status(&|s| s.last_used = Some(Time(t(1)))), h);
        // Everything else: a trigger.
        assert_ne!(with(&|ci| ci.spec.retain = true), h);
        assert_ne!(with(&|ci| ci.metadata.generation = Some(2)), h);
        assert_ne!(
            with(&|ci| ci.metadata.finalizers = Some(vec!["f".into()])),
            h
        );
        assert_ne!(
            with(&|ci| ci.metadata.deletion_timestamp = Some(Time(t(5)))),
            h
        );
        assert_ne!(status(&|s| s.used_by = Some(UsedBy::default())), h);
        assert_ne!(status(&|s| s.expires_at = Some(Time(t(9)))), h);
        let ready = |sync: Option<i64>| {
            status(&|s| {
                s.phase = Some(Phase::Ready);
                s.last_sync = sync.map(|x| Time(t(x)));
            })
        };
        assert_eq!(ready(Some(1)), ready(Some(2)), "a sync written here");
        assert_ne!(ready(None), ready(Some(1)), "a refresh asked for");
    }

    #[test]
    fn phase_after_copy() {
        assert_eq!(after_copy(Some(Phase::Copying), None).phase, Phase::Ready);
        let failed = after_copy(Some(Phase::Copying), Some("OriginUnreachable"));
        assert_eq!(failed.phase, Phase::Failed);
        assert_eq!(failed.ready, (false, "OriginUnreachable"));
        let stale = after_copy(Some(Phase::Ready), Some("OriginUnreachable"));
        assert_eq!(stale.phase, Phase::Ready);
        assert_eq!(stale.synced, (false, "OriginUnreachable"));
    }

    #[test]
    fn index_children_go_only_when_nobody_else_needs_them() {
        let children = ["sha256:a".to_owned(), "sha256:b".into(), "sha256:c".into()];
        let pinned = ["sha256:a".to_owned()];
        let other_index = ["sha256:b".to_owned()];
        assert_eq!(
            children_to_delete(&children, &pinned, Some(&other_index)),
            ["sha256:c"]
        );
        assert_eq!(children_to_delete(&children, &[], Some(&[])).len(), 3);
        assert!(
            children_to_delete(&children, &[], None).is_empty(),
            "unknown sharing keeps everything"
        );
    }

    #[test]
    fn refresh_retries_wait_longer_for_credentials() {
        let day = Duration::from_secs(86_400);
        assert_eq!(
            refresh_retry("OriginUnreachable", true, day),
            Duration::from_secs(60)
        );
        assert_eq!(refresh_retry("Unauthorized", true, day), BACKOFF_MAX);
        assert_eq!(
            refresh_retry("CredentialsUnavailable", true, Duration::from_secs(600)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn backoff_doubles_to_a_cap() {
        assert_eq!(backoff(0, true), Duration::from_secs(10));
        assert_eq!(backoff(1, true), Duration::from_secs(20));
        assert_eq!(backoff(5, true), Duration::from_secs(320));
        assert_eq!(backoff(20, true), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX, true), BACKOFF_MAX);
        assert_eq!(backoff(0, false), BACKOFF_MAX);
    }
}
