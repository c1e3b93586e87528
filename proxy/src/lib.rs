//! larder-proxy: the node-local, read-only OCI distribution proxy.
//!
//! Every image pull on a node comes here (`localhost:7439/<registry>/<repo>`). Each request is
//! served from the first tier that has it: the node's disk, the in-cluster cache registry, the
//! origin registry. Whatever a lower tier serves is streamed to the client and kept on disk at
//! the same time, verified against its digest.
//!
//! - [`route`]: request paths → what is asked for (pure).
//! - [`range`]: `Range` header decisions (pure).
//! - [`disk`]: the bounded, content-addressed disk tier.
//! - [`upstream`]: requests to the cache registry and origins, token auth
//!   ([`larder_core::auth`]), credentials ([`credentials`]) and allow rules ([`policy`]).
//! - [`listing`]: `tags/list` and the referrers API, from the origin, stale-if-error.
//! - [`fetch`]: one download per blob for any number of readers; [`ranged`]: large blobs as
//!   concurrent ranges; [`coalesce`] for manifests.
//! - [`state`]: the tier decisions; [`server`]: the HTTP handlers; [`metrics`].

pub mod access;
pub mod args;
pub mod chunks;
pub mod coalesce;
pub mod credentials;
pub mod disk;
pub mod disk_owner;
pub mod download;
pub mod error;
pub mod fetch;
pub mod listing;
pub mod metrics;
pub mod nodecache;
pub mod policy;
pub mod prefetch;
pub mod range;
pub mod ranged;
pub mod route;
pub mod server;
pub mod state;
pub mod temp_blob;
pub mod upstream;
pub mod writeback;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use larder_core::admin::{self, AdminState, Readiness};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use args::ProxyArgs;
pub use error::ProxyError;

use crate::credentials::CredentialsFile;
use crate::disk::{DiskError, DiskStore};
use crate::metrics::ProxyMetrics;
use crate::state::{ProxyState, TagPolicy};
use crate::upstream::{UpstreamClient, UpstreamConfig};

/// Why the proxy could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no address to listen on could be bound")]
    NoListener,
    #[error(
        "another process holds the disk tier {dir} (its lock file {lock}); two proxies must never share one disk directory"
    )]
    DiskInUse { dir: PathBuf, lock: PathBuf },
    #[error("cannot lock the disk tier at {path}: {source}")]
    DiskLock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk tier: {0}")]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error("--registry-credentials: {0}")]
    Credentials(#[from] credentials::CredentialsError),
    #[error("setting up upstream access: {0}")]
    Upstream(#[from] ProxyError),
}

impl Error {
    /// Low-cardinality label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Bind { .. } | Error::NoListener => "bind",
            Error::Disk(_) | Error::DiskInUse { .. } | Error::DiskLock { .. } => "disk",
            Error::Admin(_) => "admin",
            Error::Credentials(_) => "credentials",
            Error::Upstream(_) => "upstream",
        }
    }
}

/// A proxy that is serving.
#[derive(Debug)]
pub struct RunningProxy {
    /// The registry API addresses actually bound (useful with port 0 in tests).
    pub addrs: Vec<SocketAddr>,
    /// The admin (metrics, health) address actually bound.
    pub metrics_addr: SocketAddr,
    pub state: Arc<ProxyState>,
    readiness: Readiness,
    stop: watch::Sender<bool>,
    servers: JoinSet<std::io::Result<()>>,
    /// Held for the proxy's lifetime: the OS releases the lock if the process dies.
    _disk_lock: std::fs::File,
}

/// Takes an exclusive lock on `<dir>/.lock`. A second proxy on the same directory (a rolling
/// update with surge, a misconfigured hostPath) would delete the first one's downloads in
/// progress at start-up and keep its own size accounting, so it must not start.
fn lock_disk_dir(dir: &Path) -> Result<std::fs::File, Error> {
    let lock = dir.join(".lock");
    let io = |source| Error::DiskLock {
        path: lock.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::DiskInUse {
            dir: dir.to_path_buf(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(Error::DiskLock { path: lock, source }),
    }
}

/// [`lock_disk_dir`], waiting up to `wait` for another proxy to release it (the old proxy of a
/// rolling update finishing its pulls); clients meanwhile queue on the shared listening ports.
async fn wait_for_disk_lock(dir: &Path, wait: Duration) -> Result<std::fs::File, Error> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut logged = false;
    loop {
        match lock_disk_dir(dir) {
            Err(Error::DiskInUse { .. }) if tokio::time::Instant::now() < deadline => {
                if !logged {
                    tracing::info!(dir = %dir.display(), ?wait, "another proxy holds the disk tier; waiting for it to exit");
                    logged = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Connects to the Kubernetes API (retrying: an apiserver that is down must not stop the proxy)
/// and runs the NodeCache agent until the proxy stops.
async fn run_node_agent(
    state: Arc<ProxyState>,
    node: String,
    check_interval: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let client = loop {
        match kube::Client::try_default().await {
            Ok(c) => break c,
            Err(error) => {
                tracing::warn!(%error, "no Kubernetes API for the NodeCache agent; retrying in 30 s (pulls are unaffected)");
                tokio::select! {
                    _ = stopped.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    };
    tracing::info!(%node, "NodeCache agent running");
    nodecache::run(state, client, node, check_interval, stopped).await;
}

/// Blobs waiting for a write-through upload at most (each holds an open file).
const WRITE_THROUGH_QUEUE: usize = 256;

/// Opens the disk tier, binds every address and starts serving.
pub async fn start(args: ProxyArgs) -> Result<RunningProxy, Error> {
    // Bound first: during a surge handover, clients queue here while the old proxy finishes.
    let mut listeners = Vec::new();
    for addr in &args.listen {
        // Shared (SO_REUSEPORT): the next proxy of a surge rollout binds beside this one.
        match admin::bind_shared(*addr) {
            Ok(l) => listeners.push(l),
            // Hosts without IPv6 cannot bind [::1]; the IPv4 address still serves.
            Err(e) if addr.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::warn!(%addr, error = %e, "skipping an IPv6 address this host cannot bind");
            }
            Err(source) => {
                return Err(Error::Bind {
                    addr: *addr,
                    source,
                });
            }
        }
    }
    if listeners.is_empty() {
        return Err(Error::NoListener);
    }
    let disk_lock = wait_for_disk_lock(&args.disk_cache, args.disk_lock_wait).await?;
    let disk = DiskStore::open(args.disk_cache.clone(), args.disk_cache_max_bytes).await?;
    let credentials_file = match &args.registry_credentials {
        Some(path) => Some(Arc::new(CredentialsFile::load(path.clone())?)),
        None => None,
    };
    let upstream = UpstreamClient::new(UpstreamConfig {
        cache_registry: args.cache_registry.clone(),
        cache_timeout: args.cache_registry_timeout,
        insecure_registries: args.insecure_registries.clone(),
        allow_registries: args.allow_registries.clone(),
        credentials_file: credentials_file.clone(),
        private_markers: Some(args.disk_cache.join("private")),
        upstream_timeout: args.upstream_timeout,
        idle_timeout: args.upstream_idle_timeout,
        ranged: ranged::RangedConfig {
            threshold: args.upstream_ranged_threshold,
            connections: args.upstream_ranged_connections,
            fast_rate: args.upstream_ranged_fast_rate,
        },
    })?;
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry);
    admin::register_process_metrics(&mut registry);
    let writer = match &args.cache_registry {
        Some(base) if args.cache_registry_write_through => {
            let counts = writeback::register_metrics(&mut registry);
            Some(writeback::CacheWriter::spawn(
                upstream.http().clone(),
                writeback::Settings {
                    base: base.clone(),
                    workers: usize::from(args.cache_registry_writers),
                    queue: WRITE_THROUGH_QUEUE,
                    request_timeout: args.cache_registry_timeout.max(Duration::from_secs(5)),
                },
                counts,
            ))
        }
        _ => None,
    };
    let state = Arc::new(
        ProxyState::new(
            disk,
            upstream,
            metrics,
            TagPolicy {
                revalidate_timeout: args.tag_revalidate_timeout,
                freshness: args.tag_freshness,
            },
        )
        .with_own_credentials(credentials_file)
        .with_cache_writer(writer),
    );

    let (stop, stopped) = watch::channel(false);
    let mut servers = JoinSet::new();
    let mut addrs = Vec::new();
    for listener in listeners {
        let bound = listener.local_addr().map_err(|source| Error::Bind {
            addr: args.listen[0],
            source,
        })?;
        addrs.push(bound);
        let app = server::router(Arc::clone(&state));
        let mut stopped = stopped.clone();
        servers.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await
        });
    }

    let readiness = Readiness::new();
    let admin_listener = admin::bind(args.metrics_listen).await?;
    let metrics_addr = admin_listener.local_addr().map_err(|source| Error::Bind {
        addr: args.metrics_listen,
        source,
    })?;
    let admin_state = AdminState::new(Arc::new(registry), readiness.clone());
    let mut admin_stopped = stopped.clone();
    servers.spawn(async move {
        admin::serve(admin_listener, admin_state, async move {
            let _ = admin_stopped.wait_for(|s| *s).await;
        })
        .await
        .map_err(std::io::Error::other)
    });
    if let Some(node) = args.node_name.clone() {
        let (state, stopped) = (Arc::clone(&state), stopped.clone());
        let check_interval = args.precache_check_interval;
        servers.spawn(async move {
            run_node_agent(state, node, check_interval, stopped).await;
            Ok(())
        });
    }
    readiness.set_ready(true);
    tracing::info!(?addrs, %metrics_addr, disk = %args.disk_cache.display(),
        disk_max_bytes = args.disk_cache_max_bytes, cache_registry = ?args.cache_registry.as_ref().map(|u| u.as_str()),
        "proxy serving");
    Ok(RunningProxy {
        addrs,
        metrics_addr,
        state,
        readiness,
        stop,
        servers,
        _disk_lock: disk_lock,
    })
}

impl RunningProxy {
    /// Stops accepting, lets in-flight requests finish for up to `grace`, then stops.
    pub async fn shutdown(mut self, grace: Duration) {
        self.readiness.set_not_ready("shutting down");
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(grace, async {
            while let Some(result) = self.servers.join_next().await {
                if let Ok(Err(e)) = result {
                    tracing::warn!(error = %e, "a listener ended with an error");
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                "in-flight requests did not finish within the grace period"
            );
            self.servers.abort_all();
        }
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C, then drains in-flight pulls.
pub async fn run(args: ProxyArgs) -> Result<(), Error> {
    let grace = args.shutdown_grace;
    let proxy = start(args).await?;
    shutdown_signal().await;
    tracing::info!(?grace, "shutting down; letting in-flight pulls finish");
    proxy.shutdown(grace).await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the proxy");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
