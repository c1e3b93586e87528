//! The controller's metrics, all prefixed `larder_controller_`.

use std::collections::BTreeMap;

use larder_core::crd::Phase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Handles to every metric; cheap to clone (the metrics are shared atomics).
#[derive(Clone, Debug)]
pub struct Metrics {
    cached_images: Family<PhaseLabels, Gauge>,
    copy_bytes: Counter,
    copy_duration: Histogram,
    reconcile_errors: Family<ReasonLabels, Counter>,
    reconciles: Counter,
    copies_skipped: Counter,
    derived_secrets_deleted: Counter,
    derived_secrets_errors: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            cached_images: Family::default(),
            copy_bytes: Counter::default(),
            // 0.5 s to about 2.3 h.
            copy_duration: Histogram::new(exponential_buckets(0.5, 2.0, 15)),
            reconcile_errors: Family::default(),
            reconciles: Counter::default(),
            copies_skipped: Counter::default(),
            derived_secrets_deleted: Counter::default(),
            derived_secrets_errors: Family::default(),
        };
        // Every known label value shows up as 0 from the start (as the webhook's do), so
        // rate() and increase() count each replica's first events instead of dropping them.
        m.set_phases(&BTreeMap::new());
        for reason in Error::METRIC_LABELS {
            drop(m.reconcile_errors.get_or_create(&ReasonLabels { reason }));
            drop(
                m.derived_secrets_errors
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        m
    }
}

impl Metrics {
    /// Creates the metrics and registers them under `larder_controller_` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("larder_controller");
        r.register(
            "cached_images",
            "CachedImage objects by phase",
            m.cached_images.clone(),
        );
        r.register(
            "copy_bytes",
            "Bytes uploaded into the cache registry (mounted or present blobs not counted)",
            m.copy_bytes.clone(),
        );
        r.register(
            "copy_duration_seconds",
            "Time taken by successful image copies",
            m.copy_duration.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles by reason",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconciles",
            "CachedImage reconciles run",
            m.reconciles.clone(),
        );
        r.register(
            "copies_skipped_behind_watch",
            "Copies not repeated: the cached object did not yet show the copy this controller had just finished",
            m.copies_skipped.clone(),
        );
        r.register(
            "derived_pull_secrets_deleted",
            "Superseded derived pull Secrets (larder-pull-*) deleted once no pod used them",
            m.derived_secrets_deleted.clone(),
        );
        r.register(
            "derived_pull_secret_errors",
            "Failed API calls of the derived pull Secret clean-up, by reason",
            m.derived_secrets_errors.clone(),
        );
        m
    }

    /// The clean-up deleted one derived pull Secret.
    pub fn derived_secret_deleted(&self) {
        self.derived_secrets_deleted.inc();
    }

    /// The clean-up failed for `reason` (an [`crate::Error::metric_label`]).
    pub fn derived_secret_error(&self, reason: &'static str) {
        self.derived_secrets_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Sets the per-phase gauge, zero for phases with no object.
    pub fn set_phases(&self, counts: &BTreeMap<&'static str, i64>) {
        for phase in Phase::ALL {
            let n = counts.get(phase.as_str()).copied().unwrap_or(0);
            self.cached_images
                .get_or_create(&PhaseLabels {
                    phase: phase.as_str(),
                })
                .set(n);
        }
    }

    /// One successful copy.
    pub fn copied(&self, uploaded_bytes: u64, seconds: f64) {
        self.copy_bytes.inc_by(uploaded_bytes);
        self.copy_duration.observe(seconds);
    }

    /// A reconcile skipped a copy finished here moments ago (the watch was behind).
    pub fn copy_skipped_behind_watch(&self) {
        self.copies_skipped.inc();
    }

    /// One reconcile started.
    pub fn reconcile(&self) {
        self.reconciles.inc();
    }

    /// One reconcile failed for `reason` (an [`crate::Error::metric_label`]).
    pub fn reconcile_error(&self, reason: &'static str) {
        self.reconcile_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_registry_shows_every_series_at_zero() {
        let mut registry = Registry::default();
        let _m = Metrics::register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut expected: Vec<String> = Phase::ALL
            .iter()
            .map(|p| format!("larder_controller_cached_images{{phase=\"{p}\"}} 0"))
            .collect();
        for reason in Error::METRIC_LABELS {
            expected.push(format!(
                "larder_controller_reconcile_errors_total{{reason=\"{reason}\"}} 0"
            ));
            expected.push(format!(
                "larder_controller_derived_pull_secret_errors_total{{reason=\"{reason}\"}} 0"
            ));
        }
        expected.extend(
            [
                "larder_controller_copy_bytes_total 0",
                "larder_controller_copy_duration_seconds_count 0",
                "larder_controller_reconciles_total 0",
            ]
            .map(String::from),
        );
        for line in &expected {
            assert!(text.contains(line.as_str()), "{line} missing in\n{text}");
        }
    }

    #[test]
    fn names_and_labels() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.set_phases(&[("Ready", 3)].into());
        m.copied(100, 1.0);
        m.reconcile_error("OriginUnreachable");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "larder_controller_cached_images{phase=\"Ready\"} 3",
            "larder_controller_cached_images{phase=\"Failed\"} 0",
            "larder_controller_copy_bytes_total 100",
            "larder_controller_copy_duration_seconds_count 1",
            "larder_controller_reconcile_errors_total{reason=\"OriginUnreachable\"} 1",
            "larder_controller_derived_pull_secrets_deleted_total 0",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
