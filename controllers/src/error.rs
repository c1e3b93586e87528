//! The crate's one error type, with a low-cardinality label for metrics.

use larder_core::reference::ReferenceError;

/// Everything that can go wrong in a controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    /// A Kubernetes API call got no answer in time.
    #[error("kubernetes API: no answer to {call} within {after:?}")]
    KubeTimeout {
        call: &'static str,
        after: std::time::Duration,
    },
    /// The finalizer helper failed (adding/removing the finalizer, or our apply/cleanup).
    // Boxed: `finalizer::Error<Error>` contains `Error`, so unboxed the type would be infinite.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// `spec.sourceImage` (or an annotation) is not an image reference.
    #[error("invalid image reference `{reference}`: {source}")]
    Reference {
        reference: String,
        #[source]
        source: ReferenceError,
    },
    /// A registry could not be reached or answered 5xx/429: worth retrying later.
    #[error("registry {registry} unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    /// A registry does not have what was asked for.
    #[error("{what} not found on {registry}")]
    NotFound { registry: String, what: String },
    /// A registry refused access.
    #[error("registry {registry} denied access: {detail}")]
    Denied { registry: String, detail: String },
    /// The origin refused the image anonymously and with every credential found for it
    /// (`tried` of them; none when no pull secret holds credentials for the registry).
    /// Never names or shows a credential.
    #[error("registry {registry} refused {repository} anonymously{}", tried_text(*.tried))]
    Unauthorized {
        registry: String,
        repository: String,
        tried: usize,
    },
    /// A registry answered in a way the distribution spec does not allow.
    #[error("registry {registry}: {detail}")]
    Protocol { registry: String, detail: String },
    /// Content did not hash to the digest it was fetched by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A manifest could not be understood.
    #[error("invalid manifest {what}: {detail}")]
    BadManifest { what: String, detail: String },
    /// The command line or environment is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The metrics/health server failed.
    #[error("admin server: {0}")]
    Admin(#[source] larder_core::admin::AdminError),
    /// This replica lost the leader Lease and must stop acting.
    #[error("lost the leader lease {0}")]
    LeaderLost(String),
}

fn tried_text(tried: usize) -> String {
    match tried {
        0 => " and no readable pull secret (spec.pullSecrets or the imagePullSecrets of pods using it) holds credentials for it (reading Secrets needs the chart value controller.privateImages=true)".into(),
        1 => " and with the one credential found for it".into(),
        n => format!(" and with each of the {n} credentials found for it"),
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Every value [`Error::metric_label`] can return: the `reason` series that counters
    /// show at 0 from the start.
    pub const METRIC_LABELS: [&'static str; 15] = [
        "KubeApi",
        "KubeApiTimeout",
        "Finalizer",
        "InvalidReference",
        "OriginUnreachable",
        "NotFound",
        "Denied",
        "CredentialsUnavailable",
        "Unauthorized",
        "RegistryProtocol",
        "DigestMismatch",
        "BadManifest",
        "Config",
        "Admin",
        "LeaderLost",
    ];

    /// A short, fixed label naming the kind of failure, for `reason` metric labels and
    /// condition reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubeApi",
            Error::KubeTimeout { .. } => "KubeApiTimeout",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "Finalizer",
            },
            Error::Reference { .. } => "InvalidReference",
            Error::Unreachable { .. } => "OriginUnreachable",
            Error::NotFound { .. } => "NotFound",
            Error::Denied { .. } => "Denied",
            Error::Unauthorized { tried: 0, .. } => "CredentialsUnavailable",
            Error::Unauthorized { .. } => "Unauthorized",
            Error::Protocol { .. } => "RegistryProtocol",
            Error::DigestMismatch { .. } => "DigestMismatch",
            Error::BadManifest { .. } => "BadManifest",
            Error::Config(_) => "Config",
            Error::Admin(_) => "Admin",
            Error::LeaderLost(_) => "LeaderLost",
        }
    }

    /// Whether trying again later can succeed without anyone changing anything. Permanent
    /// errors are still retried, but on the slowest backoff step.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube(_)
            | Error::KubeTimeout { .. }
            | Error::Unreachable { .. }
            | Error::Protocol { .. } => true,
            // Pull secrets can be fixed, and pods bringing new ones come, without any change
            // to the object: keep trying on the ordinary backoff.
            Error::Unauthorized { .. } => true,
            // A digest mismatch is a broken transfer or a broken origin; retry in case of the first.
            Error::DigestMismatch { .. } => true,
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.is_retryable(),
                _ => true,
            },
            Error::Reference { .. }
            | Error::NotFound { .. }
            | Error::Denied { .. }
            | Error::BadManifest { .. }
            | Error::Config(_)
            | Error::Admin(_)
            | Error::LeaderLost(_) => false,
        }
    }

    /// True for an HTTP 409 from the apiserver (someone else wrote first).
    pub fn is_conflict(&self) -> bool {
        use kube::runtime::finalizer::Error as F;
        match self {
            Error::Kube(kube::Error::Api(s)) => s.code == 409,
            Error::Finalizer(inner) => match inner.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.is_conflict(),
                F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s)) => {
                    s.code == 409
                }
                _ => false,
            },
            _ => false,
        }
    }
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_listed() {
        let s = |x: &str| x.to_owned();
        let io = || std::io::Error::other("x");
        let registry = || s("r");
        let errors = [
            Error::Kube(kube::Error::LinesCodecMaxLineLengthExceeded),
            Error::KubeTimeout {
                call: "get",
                after: std::time::Duration::ZERO,
            },
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::UnnamedObject)),
            Error::Reference {
                reference: s("x"),
                source: larder_core::reference::Reference::parse("Not A Ref")
                    .err()
                    .unwrap_or_else(|| panic!("an invalid reference")),
            },
            Error::Unreachable {
                registry: registry(),
                detail: s("x"),
            },
            Error::NotFound {
                registry: registry(),
                what: s("x"),
            },
            Error::Denied {
                registry: registry(),
                detail: s("x"),
            },
            Error::Unauthorized {
                registry: registry(),
                repository: s("x"),
                tried: 0,
            },
            Error::Unauthorized {
                registry: registry(),
                repository: s("x"),
                tried: 1,
            },
            Error::Protocol {
                registry: registry(),
                detail: s("x"),
            },
            Error::DigestMismatch {
                what: s("x"),
                expected: s("a"),
                actual: s("b"),
            },
            Error::BadManifest {
                what: s("x"),
                detail: s("x"),
            },
            Error::Config(s("x")),
            Error::Admin(larder_core::admin::AdminError::Bind {
                addr: ([127, 0, 0, 1], 0).into(),
                source: io(),
            }),
            Error::LeaderLost(s("x")),
        ];
        let labels: Vec<&str> = errors.iter().map(Error::metric_label).collect();
        assert_eq!(
            labels,
            Error::METRIC_LABELS,
            "one of each variant, in order"
        );
    }

    #[test]
    fn labels_are_fixed_and_retryability_follows_the_cause() {
        let down = Error::Unreachable {
            registry: "r".into(),
            detail: "refused".into(),
        };
        assert_eq!(down.metric_label(), "OriginUnreachable");
        assert!(down.is_retryable());
        let missing = Error::NotFound {
            registry: "r".into(),
            what: "x".into(),
        };
        assert!(!missing.is_retryable());
        let wrapped =
            Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(down)));
        assert_eq!(wrapped.metric_label(), "OriginUnreachable");
        assert!(wrapped.is_retryable());
        let unauthorized = |tried| Error::Unauthorized {
            registry: "r".into(),
            repository: "team/app".into(),
            tried,
        };
        assert_eq!(unauthorized(0).metric_label(), "CredentialsUnavailable");
        assert_eq!(unauthorized(2).metric_label(), "Unauthorized");
        assert!(unauthorized(2).is_retryable());
        assert!(
            unauthorized(0)
                .to_string()
                .contains("no readable pull secret")
        );
        assert!(unauthorized(2).to_string().contains("2 credentials"));
    }
}
