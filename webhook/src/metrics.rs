//! The webhook's metrics.
//!
//! - `larder_webhook_admissions_total{result="rewritten|skipped|error"}`: reviews answered.
//!   `error` means the review was answered "allowed, unchanged" because something was off
//!   (unreadable body, wrong resource, a patch that would not apply).
//! - `larder_webhook_images_total{outcome}`: per image, `rewritten` or the skip reason
//!   (`pull_policy_never`, `on_proxy`, `loopback`, `excluded`, `mirror_pod`, `pull_secrets`
//!   for images of pods with `imagePullSecrets` left alone, ...).
//! - `larder_webhook_admission_duration_seconds`: time from body received to answer ready.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::mutate::{Action, ImageDecision, Skip};

/// How a review ended, for `larder_webhook_admissions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdmissionResult {
    /// At least one image was rewritten.
    Rewritten,
    /// Answered without a patch: nothing to rewrite.
    Skipped,
    /// Answered "allowed, unchanged" because of a problem.
    Error,
}

impl AdmissionResult {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            AdmissionResult::Rewritten => "rewritten",
            AdmissionResult::Skipped => "skipped",
            AdmissionResult::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The `outcome` of a rewritten image; the others are [`Skip::label`]s.
const REWRITTEN: &str = "rewritten";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ImageLabels {
    outcome: &'static str,
}

/// Histogram buckets: a review normally takes tens of microseconds; the apiserver's timeout
/// is seconds. Fine resolution below 10 ms is where the latency target lives.
const DURATION_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    2.5,
];

/// Handles to the webhook's metrics; cheap to clone.
#[derive(Debug, Clone)]
pub struct WebhookMetrics {
    admissions: Family<ResultLabels, Counter>,
    images: Family<ImageLabels, Counter>,
    duration: Histogram,
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        let metrics = WebhookMetrics {
            admissions: Family::default(),
            images: Family::default(),
            duration: Histogram::new(DURATION_BUCKETS),
        };
        // Every result shows up as 0 from the start, so rate() and alerts work before the
        // first error ever happens.
        for result in [
            AdmissionResult::Rewritten,
            AdmissionResult::Skipped,
            AdmissionResult::Error,
        ] {
            drop(metrics.admissions.get_or_create(&ResultLabels {
                result: result.label(),
            }));
        }
        for outcome in Skip::ALL.map(Skip::label).into_iter().chain([REWRITTEN]) {
            drop(metrics.images.get_or_create(&ImageLabels { outcome }));
        }
        metrics
    }
}

impl WebhookMetrics {
    /// Registers every metric in `registry` (names as in the module docs).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "larder_webhook_admissions",
            "Admission reviews answered, by result",
            self.admissions.clone(),
        );
        registry.register(
            "larder_webhook_images",
            "Container images seen in admission reviews: rewritten, or why not",
            self.images.clone(),
        );
        registry.register_with_unit(
            "larder_webhook_admission_duration",
            "Time to answer an admission review",
            Unit::Seconds,
            self.duration.clone(),
        );
    }

    /// Counts one answered review and the decisions for its images.
    pub fn record(&self, result: AdmissionResult, images: &[ImageDecision], started: Instant) {
        self.duration.observe(started.elapsed().as_secs_f64());
        self.admissions
            .get_or_create(&ResultLabels {
                result: result.label(),
            })
            .inc();
        for decision in images {
            let outcome = match decision.action {
                Action::Rewritten(_) => REWRITTEN,
                Action::Skipped(skip) => skip.label(),
            };
            self.images.get_or_create(&ImageLabels { outcome }).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mutate::ContainerKind;

    #[test]
    fn a_fresh_registry_shows_every_series_at_zero() {
        let metrics = WebhookMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let outcomes = Skip::ALL.map(Skip::label).into_iter().chain([REWRITTEN]);
        for outcome in outcomes {
            let line = format!("larder_webhook_images_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        for result in ["rewritten", "skipped", "error"] {
            let line = format!("larder_webhook_admissions_total{{result=\"{result}\"}} 0");
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
        let series = text
            .lines()
            .filter(|l| l.starts_with("larder_webhook_images_total"));
        assert_eq!(series.count(), Skip::ALL.len() + 1, "{text}");
    }

    #[test]
    fn exposition_names_and_labels() {
        let metrics = WebhookMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let decision = |action| ImageDecision {
            kind: ContainerKind::Container,
            container: "c".into(),
            image: Some("nginx".into()),
            action,
            detail: None,
        };
        metrics.record(
            AdmissionResult::Rewritten,
            &[
                decision(Action::Rewritten("x".into())),
                decision(Action::Skipped(Skip::Loopback)),
            ],
            Instant::now(),
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"larder_webhook_admissions_total{result="rewritten"} 1"#,
            r#"larder_webhook_admissions_total{result="error"} 0"#,
            r#"larder_webhook_admissions_total{result="skipped"} 0"#,
            r#"larder_webhook_images_total{outcome="loopback"} 1"#,
            r#"larder_webhook_images_total{outcome="rewritten"} 1"#,
            "larder_webhook_admission_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
