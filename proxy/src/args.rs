//! `larder proxy` flags. Every flag is also an environment variable (`LARDER_<NAME>`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `larder proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Address to serve the registry API on; repeat for several. Default: 127.0.0.1:7439 and
    /// [::1]:7439 (a [::1] address that cannot be bound, on a host without IPv6, is skipped with
    /// a warning).
    #[arg(long = "listen", env = "LARDER_LISTEN", value_delimiter = ',',
          default_values_t = [SocketAddr::from(([127, 0, 0, 1], 7439)), SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7439))])]
    pub listen: Vec<SocketAddr>,

    /// Directory of the disk tier: verified blobs and manifests, content-addressed.
    #[arg(
        long,
        env = "LARDER_DISK_CACHE",
        default_value = "/var/lib/larder/cache"
    )]
    pub disk_cache: PathBuf,

    /// Size limit of the disk tier; least recently used content is evicted beyond it.
    /// Accepts bytes or a unit: 500MiB, 20GiB, 1TB.
    #[arg(long, env = "LARDER_DISK_CACHE_MAX_BYTES", default_value = "20GiB", value_parser = parse_bytes)]
    pub disk_cache_max_bytes: u64,

    /// The in-cluster cache registry (any OCI registry), e.g. http://larder-registry.larder:5000.
    /// Images of `<host>[_<port>]/<repo>` are looked up under that same path. Optional.
    #[arg(long, env = "LARDER_CACHE_REGISTRY")]
    pub cache_registry: Option<reqwest::Url>,

    /// How long the cache registry may take to answer before the origin is asked instead.
    #[arg(long, env = "LARDER_CACHE_REGISTRY_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub cache_registry_timeout: Duration,

    /// Push every blob the origin served this node to the cache registry once it is verified
    /// on disk (write-through), so the controller's copy finds it there and the origin serves
    /// each blob once cluster-wide. Needs push access to the cache registry.
    #[arg(long, env = "LARDER_CACHE_REGISTRY_WRITE_THROUGH", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub cache_registry_write_through: bool,

    /// Concurrent write-through uploads to the cache registry.
    #[arg(long, env = "LARDER_CACHE_REGISTRY_WRITERS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub cache_registry_writers: u16,

    /// A registry (HOST:PORT) reached over plain http instead of https; repeatable.
    #[arg(
        long = "insecure-registry",
        env = "LARDER_INSECURE_REGISTRY",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,

    /// A registry the proxy may reach although its addresses are not public: `host`,
    /// `host:port`, `*.domain` or `*.domain:port`; repeatable. By default only registries whose
    /// addresses are all public are reached; loopback, link-local (cloud metadata), private and
    /// cluster-internal ones are refused, redirects included. `--insecure-registry` entries and
    /// the cache registry are allowed by being named.
    #[arg(
        long = "allow-registry",
        env = "LARDER_ALLOW_REGISTRY",
        value_delimiter = ','
    )]
    pub allow_registries: Vec<String>,

    /// A docker config file (`{"auths": {"<registry>": {"auth": "<base64 user:pass>"}}}`, the
    /// format of a `kubernetes.io/dockerconfigjson` Secret) with per-registry credentials for
    /// pulls from origins; reloaded when it changes. These never grant a client access to a
    /// private repository: clients prove access with their own credentials.
    #[arg(long, env = "LARDER_REGISTRY_CREDENTIALS")]
    pub registry_credentials: Option<PathBuf>,

    /// How long a tag's revalidation HEAD to the origin may take before the last known digest
    /// is served instead (stale-if-error).
    #[arg(long, env = "LARDER_TAG_REVALIDATE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub tag_revalidate_timeout: Duration,

    /// A tag revalidated this recently is served without asking the origin again. Bounds the
    /// HEAD rate a burst of pulls sends upstream; 0s revalidates every request.
    #[arg(long, env = "LARDER_TAG_FRESHNESS", default_value = "10s", value_parser = humantime::parse_duration)]
    pub tag_freshness: Duration,

    /// Longest wait for an origin to connect and answer with headers.
    #[arg(long, env = "LARDER_UPSTREAM_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_timeout: Duration,

    /// Longest silence in the middle of a blob download before it is abandoned.
    #[arg(long, env = "LARDER_UPSTREAM_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub upstream_idle_timeout: Duration,

    /// Blobs of at least this size are fetched from the upstream (origin or cache registry) as
    /// several concurrent `Range` requests into one file, so a huge layer is not bounded by what
    /// one connection gets. Smaller blobs, and upstreams that ignore ranges, use one stream.
    #[arg(long, env = "LARDER_UPSTREAM_RANGED_THRESHOLD", default_value = "64MiB", value_parser = parse_bytes)]
    pub upstream_ranged_threshold: u64,

    /// Concurrent range requests per blob above `--upstream-ranged-threshold`; 1 turns ranged
    /// downloads off (no `Range` header is sent upstream at all).
    #[arg(long, env = "LARDER_UPSTREAM_RANGED_CONNECTIONS", default_value_t = crate::ranged::DEFAULT_CONNECTIONS,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub upstream_ranged_connections: u16,

    /// Bytes per second: when the upstream brings a blob's first chunk (8 MiB at most) to the
    /// first connection at least this fast, counting only the time larder waited on the socket,
    /// that connection keeps the whole blob in one stream, since more connections would only
    /// cost CPU. Accepts a size per second (300MB, 1GiB), or `off`: no probe, every blob above
    /// the threshold is split at once.
    #[arg(long, env = "LARDER_UPSTREAM_RANGED_FAST_RATE", default_value = "300MB", value_parser = parse_rate)]
    // Spelled out so clap takes the parser's `Option` as the value (`off` is `None`), not as
    // "the flag may be absent".
    pub upstream_ranged_fast_rate: std::option::Option<u64>,

    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "LARDER_METRICS_LISTEN", default_value = "127.0.0.1:9101")]
    pub metrics_listen: SocketAddr,

    /// How long to wait for another proxy to release the disk directory before giving up
    /// (a rolling update with surge: the new proxy shares the listening ports with the old one,
    /// SO_REUSEPORT, and takes the disk over when the old one exits). 0s: refuse at once.
    #[arg(long, env = "LARDER_DISK_LOCK_WAIT", default_value = "0s", value_parser = humantime::parse_duration)]
    pub disk_lock_wait: Duration,

    /// On SIGTERM, how long in-flight pulls may take to finish before the process exits.
    #[arg(long, env = "LARDER_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// This node's name (the chart sets it from the downward API). Given, the proxy fulfils the
    /// node's NodeCache: it prefetches the images Precaches ask for into the disk tier and
    /// reports progress on that object's status (needs the Kubernetes API: in-cluster config or
    /// KUBECONFIG). Not given: no Kubernetes access at all.
    #[arg(long, env = "LARDER_NODE_NAME")]
    pub node_name: Option<String>,

    /// With `--node-name`: how often each precached (Ready) image's blobs are checked to be
    /// still on the disk tier. A check also marks them used, so the LRU evicts other content
    /// first; an image that lost blobs anyway is fetched again.
    #[arg(long, env = "LARDER_PRECACHE_CHECK_INTERVAL", default_value = "1m",
          value_parser = larder_core::flags::positive_duration)]
    pub precache_check_interval: Duration,
}

impl ProxyArgs {
    /// Every flag's default with `args` (command-line style, without the subcommand) applied:
    /// how tests and embedders build a configuration without repeating the defaults.
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: ProxyArgs,
        }
        let argv = std::iter::once(std::ffi::OsString::from("proxy"))
            .chain(args.into_iter().map(Into::into));
        <Wrapper as clap::Parser>::try_parse_from(argv).map(|w| w.args)
    }
}

/// Parses `1234`, `500MiB`, `20GiB`, `1.5GB`, `10k`.
pub fn parse_bytes(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| {
        format!("`{input}` is not a size: expected a number with an optional unit like MiB or GB")
    })?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{input}` (use B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
            ));
        }
    };
    let bytes = number * multiplier as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{input}` is not a usable size"));
    }
    Ok(bytes as u64)
}

/// `--upstream-ranged-fast-rate`: a size per second, or `off` (`None`: always split).
pub fn parse_rate(input: &str) -> Result<Option<u64>, String> {
    if input.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    parse_bytes(input).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("1234"), Ok(1234));
        assert_eq!(parse_bytes("500MiB"), Ok(500 << 20));
        assert_eq!(parse_bytes("20GiB"), Ok(20 << 30));
        assert_eq!(parse_bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_bytes("10 k"), Ok(10_000));
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("0").is_err());
        assert!(
            parse_bytes("12 parsecs")
                .unwrap_err()
                .contains("unknown size unit")
        );
        assert!(parse_bytes("MiB").is_err());
    }

    #[test]
    fn ranged_download_defaults_are_the_modules_constants() {
        let args = ProxyArgs::from_args(["--listen", "127.0.0.1:0"]).unwrap();
        let defaults = crate::ranged::RangedConfig::default();
        assert_eq!(args.upstream_ranged_threshold, defaults.threshold);
        assert_eq!(args.upstream_ranged_connections, defaults.connections);
        assert_eq!(args.upstream_ranged_fast_rate, defaults.fast_rate);
        assert!(ProxyArgs::from_args(["--upstream-ranged-connections", "0"]).is_err());
        let off = ProxyArgs::from_args(["--upstream-ranged-fast-rate", "off"]).unwrap();
        assert_eq!(off.upstream_ranged_fast_rate, None);
        let rate = ProxyArgs::from_args(["--upstream-ranged-fast-rate", "1GB"]).unwrap();
        assert_eq!(rate.upstream_ranged_fast_rate, Some(1_000_000_000));
        let err = ProxyArgs::from_args(["--upstream-ranged-fast-rate", "fast"]).unwrap_err();
        assert!(err.to_string().contains("not a size"), "{err}");
    }

    #[test]
    fn the_precache_check_interval_defaults_to_the_agents_constant_and_is_never_zero() {
        let args = ProxyArgs::from_args(["--listen", "127.0.0.1:0"]).unwrap();
        assert_eq!(
            args.precache_check_interval,
            crate::nodecache::CHECK_INTERVAL
        );
        let args = ProxyArgs::from_args(["--precache-check-interval", "2s"]).unwrap();
        assert_eq!(args.precache_check_interval, Duration::from_secs(2));
        assert!(ProxyArgs::from_args(["--precache-check-interval", "0s"]).is_err());
    }
}
