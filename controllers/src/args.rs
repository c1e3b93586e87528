//! `larder controller`'s command line; every flag can also come from a `LARDER_<FLAG>` variable.

use std::net::SocketAddr;
use std::time::Duration;

/// Flags of `larder controller`.
#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// The cache registry images are copied into (any OCI registry), e.g.
    /// http://larder-registry.larder:5000. Images land under `<host>[_<port>]/<repo>`.
    #[arg(long, env = "LARDER_CACHE_REGISTRY")]
    pub cache_registry: reqwest::Url,

    /// An origin registry (HOST:PORT) reached over plain http instead of https; repeatable.
    #[arg(
        long = "insecure-registry",
        env = "LARDER_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,

    /// How long an image no pod uses stays in the cache before it is deleted.
    #[arg(long, env = "LARDER_RETENTION", default_value = "720h", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// How often a cached tag is re-checked against its origin (one HEAD request).
    #[arg(long, env = "LARDER_REFRESH_INTERVAL", default_value = "6h", value_parser = humantime::parse_duration)]
    pub refresh_interval: Duration,

    /// How long the first copy of a new image may wait while pods using it are still pulling
    /// it: their node proxies write what they fetch through to the cache registry, so the copy
    /// then finds it there and the origin serves each blob once. 0s copies at once.
    #[arg(long, env = "LARDER_COPY_WAIT_FOR_PULLS", default_value = "2m", value_parser = humantime::parse_duration)]
    pub copy_wait_for_pulls: Duration,

    /// How many images are copied at the same time.
    #[arg(long, env = "LARDER_MAX_CONCURRENT_COPIES", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent_copies: u16,

    /// Copy only these platforms (os/arch[/variant]) of multi-platform images; repeatable.
    /// Default: every platform, verbatim. A filtered index is a new index with a new digest,
    /// so pulls of the original index digest are then not served from the cache (digest-pinned
    /// references are therefore always copied whole).
    #[arg(long = "platform", env = "LARDER_PLATFORM", value_delimiter = ',')]
    pub platforms: Vec<String>,

    /// Delete the webhook's derived pull Secrets (`larder-pull-*`, `--pull-secrets=derive`)
    /// once they are superseded (a source was edited or deleted) and no pod uses them. Needs
    /// `list` and `delete` on Secrets; the chart grants both only with `pullSecrets: derive`.
    #[arg(long, env = "LARDER_COLLECT_DERIVED_PULL_SECRETS")]
    pub collect_derived_pull_secrets: bool,

    /// How often derived pull Secrets are looked over (one metadata list of larder's Secrets).
    /// A Secret no pod names is deleted at the second look, so one lives at least this long
    /// unused.
    #[arg(long, env = "LARDER_DERIVED_PULL_SECRET_INTERVAL", default_value = "10m",
          value_parser = larder_core::flags::positive_duration)]
    pub derived_pull_secret_interval: Duration,

    /// Run the Precache readiness gate: remove the startup taint `larder.dev/precache-pending`
    /// from a node once every gating Precache's images are on its disk, or at their timeout.
    /// Needs `patch` on Nodes (the chart grants it, narrowed by a ValidatingAdmissionPolicy to
    /// removing that taint, with `controller.readinessGate.enabled`).
    #[arg(long, env = "LARDER_READINESS_GATE")]
    pub readiness_gate: bool,

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "LARDER_METRICS_LISTEN", default_value = "0.0.0.0:9103")]
    pub metrics_listen: SocketAddr,

    /// The namespace of the leader-election Lease (the controller's own namespace).
    /// Without it, the controller reads the in-cluster service account's namespace, and runs
    /// without leader election when there is none (a single replica beside a cluster).
    #[arg(long, env = "LARDER_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// The name of the leader-election Lease.
    #[arg(
        long,
        env = "LARDER_LEADER_ELECTION_LEASE",
        default_value = "larder-controller"
    )]
    pub leader_election_lease: String,

    /// This replica's identity in the Lease; default: $POD_NAME, else the hostname.
    #[arg(long, env = "LARDER_LEADER_ELECTION_IDENTITY")]
    pub leader_election_identity: Option<String>,

    /// How long a Lease holder that stops renewing keeps it before another replica takes over.
    #[arg(long, env = "LARDER_LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_election_lease_duration: Duration,
}

impl ControllerArgs {
    /// This replica's Lease identity: the flag, `$POD_NAME`, the hostname, or a random name.
    pub fn identity(&self) -> String {
        if let Some(id) = self
            .leader_election_identity
            .as_deref()
            .filter(|s| !s.is_empty())
        {
            return id.to_owned();
        }
        if let Ok(pod) = std::env::var("POD_NAME")
            && !pod.is_empty()
        {
            return pod;
        }
        if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
            let host = host.trim();
            if !host.is_empty() {
                return host.to_owned();
            }
        }
        format!("larder-controller-{:08x}", rand::random::<u32>())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn defaults_and_repeatable_flags() {
        let cli = Cli::try_parse_from([
            "x",
            "--cache-registry",
            "http://127.0.0.1:5000",
            "--platform",
            "linux/amd64,linux/arm64",
            "--insecure-registry",
            "a:5000",
            "--insecure-registry",
            "b:5000",
        ])
        .unwrap();
        let a = cli.args;
        assert_eq!(a.retention, Duration::from_secs(720 * 3600));
        assert_eq!(a.refresh_interval, Duration::from_secs(6 * 3600));
        assert_eq!(a.max_concurrent_copies, 4);
        assert_eq!(a.platforms, ["linux/amd64", "linux/arm64"]);
        assert_eq!(a.insecure_registries, ["a:5000", "b:5000"]);
        assert_eq!(a.metrics_listen.port(), 9103);
        assert!(!a.collect_derived_pull_secrets);
        assert!(!a.readiness_gate);
        assert_eq!(a.derived_pull_secret_interval, Duration::from_secs(600));
        assert!(
            Cli::try_parse_from(["x"]).is_err(),
            "cache registry is required"
        );
    }

    #[test]
    fn the_derived_secret_interval_is_never_zero() {
        let parse = |interval: &str| {
            Cli::try_parse_from([
                "x",
                "--cache-registry",
                "http://127.0.0.1:5000",
                "--derived-pull-secret-interval",
                interval,
            ])
        };
        assert_eq!(
            parse("90s").unwrap().args.derived_pull_secret_interval,
            Duration::from_secs(90)
        );
        let zero = parse("0s").unwrap_err().to_string();
        assert!(zero.contains("longer than 0s"), "{zero}");
        assert!(parse("soon").is_err());
    }
}
