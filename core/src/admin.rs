//! The admin HTTP server every role runs beside its real work: `/metrics`, `/healthz`, `/readyz`.
//!
//! It is plain HTTP on its own port, separate from the webhook's TLS port and the proxy's
//! registry port, so probes and scrapes never compete with (or depend on) the traffic they watch.
//!
//! - `GET /metrics`: the shared [`Registry`] in OpenMetrics text.
//! - `GET /healthz`: 200 while the process can answer at all (the liveness probe).
//! - `GET /readyz`: 200 once the role says it is ready, 503 with the reason before and whenever
//!   it says it is not (the readiness probe: a webhook without certificates, a controller that
//!   has not synced its caches).

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The content type of OpenMetrics text, which is what prometheus-client encodes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the admin server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The port is taken, or the address is not ours.
    #[error("binding the admin server to {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The listener failed while serving.
    #[error("serving the admin server on {addr}")]
    Serve {
        /// The address served, or the unspecified address if the listener could not say.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// A shared, cheaply cloned readiness flag with the reason it is not ready.
///
/// Starts not ready ("starting"): a role must say when it is ready, so a pod is never sent
/// traffic before its first successful setup.
#[derive(Clone, Debug)]
pub struct Readiness {
    // `None` when ready, otherwise why not. A mutex, not an atomic, because the reason goes
    // with the flag; it is held for a clone or a store only, never across an await.
    not_ready: Arc<Mutex<Option<Cow<'static, str>>>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    /// A flag that is not ready yet, with the reason "starting".
    pub fn new() -> Self {
        Self {
            not_ready: Arc::new(Mutex::new(Some(Cow::Borrowed("starting")))),
        }
    }

    /// Ready (`true`) or not ready for an unspecified reason (`false`).
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.store(None);
        } else {
            self.store(Some(Cow::Borrowed("not ready")));
        }
    }

    /// Not ready, saying why; the reason is what `/readyz` answers, so keep it short.
    pub fn set_not_ready(&self, reason: impl Into<Cow<'static, str>>) {
        self.store(Some(reason.into()));
    }

    /// Whether the flag is set.
    pub fn is_ready(&self) -> bool {
        self.status().is_ok()
    }

    /// `Ok` when ready, otherwise the reason.
    pub fn status(&self) -> Result<(), String> {
        // A poisoned lock only means a writer panicked mid-store of a plain value: the value is
        // still whole, so read it rather than taking the probe down with the writer.
        match &*self
            .not_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            None => Ok(()),
            Some(reason) => Err(reason.to_string()),
        }
    }

    fn store(&self, value: Option<Cow<'static, str>>) {
        *self
            .not_ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = value;
    }
}

/// What the admin endpoints read: the role's metrics and its readiness.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Every metric the role exposes. Register before serving: the registry is read-only here,
    /// and the metrics themselves are atomics that the role updates through its own handles.
    pub registry: Arc<Registry>,
    /// The flag `/readyz` reports.
    pub ready: Readiness,
}

impl AdminState {
    /// State over a registry and a readiness flag the role keeps a clone of.
    pub fn new(registry: Arc<Registry>, ready: Readiness) -> Self {
        Self { registry, ready }
    }
}

/// The admin routes, for [`serve`] or for tests to drive directly.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Binds the admin port; the error names the address, which is what an operator needs.
///
/// With SO_REUSEPORT: the node proxy's replacement in a rolling update with surge binds the same
/// host port while the old one still runs (the probes may then reach either; both answer).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    bind_shared(addr).map_err(|source| AdminError::Bind { addr, source })
}

/// Binds `addr` with SO_REUSEPORT (and SO_REUSEADDR), so a process replacing this one on the
/// node (the proxy's rolling update with surge) can bind the same port before this one goes:
/// connections then wait in a listener's queue instead of being refused. Only sockets of the
/// same user that also set SO_REUSEPORT can share it.
pub fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves the admin routes on `listener` until `shutdown` completes, then finishes the
/// requests in flight and returns.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    tracing::info!(%addr, "admin server listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| AdminError::Serve { addr, source })
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(error) => {
            // Writing into a String cannot fail, so this is a metric's own encoder refusing.
            tracing::error!(%error, "encoding metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.ready.status() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// Registers the standard `process_*` metrics (CPU seconds, resident and virtual memory, open
/// and maximum file descriptors, threads, start time), read from `/proc/self` on each scrape.
///
/// Register them on the root registry, not a prefixed sub-registry, to keep the names that
/// dashboards expect. Where `/proc` is absent (not Linux) nothing is reported.
pub fn register_process_metrics(registry: &mut Registry) {
    registry.register_collector(Box::new(process::ProcessCollector));
}

mod process {
    //! The `process_*` metrics from procfs: no unsafe, no extra crate.

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::registry::Unit;

    /// Clock ticks per second in `/proc/<pid>/stat`. The kernel reports times there in USER_HZ,
    /// which is 100 on every architecture Kubernetes nodes run (x86-64, arm64, s390x, ppc64le,
    /// riscv64); only alpha differs.
    const USER_HZ: f64 = 100.0;

    #[derive(Debug)]
    pub(super) struct ProcessCollector;

    impl Collector for ProcessCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let sample = Sample::read();
            if let Some(cpu) = sample.cpu_seconds {
                let metric = ConstCounter::new(cpu);
                let help = "Total user and system CPU time spent";
                metric.encode(encoder.encode_descriptor(
                    "process_cpu",
                    help,
                    Some(&Unit::Seconds),
                    metric.metric_type(),
                )?)?;
            }
            let gauges: [(&str, &str, Option<Unit>, Option<f64>); 6] = [
                (
                    "process_resident_memory",
                    "Resident memory size",
                    Some(Unit::Bytes),
                    sample.resident_bytes,
                ),
                (
                    "process_virtual_memory",
                    "Virtual memory size",
                    Some(Unit::Bytes),
                    sample.virtual_bytes,
                ),
                (
                    "process_open_fds",
                    "Open file descriptors",
                    None,
                    sample.open_fds,
                ),
                (
                    "process_max_fds",
                    "Maximum open file descriptors",
                    None,
                    sample.max_fds,
                ),
                (
                    "process_threads",
                    "OS threads in the process",
                    None,
                    sample.threads,
                ),
                (
                    "process_start_time",
                    "Start time of the process since the Unix epoch",
                    Some(Unit::Seconds),
                    sample.start_time_seconds,
                ),
            ];
            for (name, help, unit, value) in gauges {
                if let Some(value) = value {
                    let metric = ConstGauge::new(value);
                    metric.encode(encoder.encode_descriptor(
                        name,
                        help,
                        unit.as_ref(),
                        metric.metric_type(),
                    )?)?;
                }
            }
            Ok(())
        }
    }

    /// One reading of `/proc/self`; a field is `None` when its source could not be read.
    #[derive(Debug, Default)]
    pub(super) struct Sample {
        pub cpu_seconds: Option<f64>,
        pub resident_bytes: Option<f64>,
        pub virtual_bytes: Option<f64>,
        pub open_fds: Option<f64>,
        pub max_fds: Option<f64>,
        pub threads: Option<f64>,
        pub start_time_seconds: Option<f64>,
    }

    impl Sample {
        pub fn read() -> Self {
            let mut sample = Sample::default();
            if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
                let boot_time = std::fs::read_to_string("/proc/stat")
                    .ok()
                    .and_then(|s| boot_time(&s));
                sample.apply_stat(&stat, boot_time);
            }
            if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
                sample.resident_bytes = status_kib(&status, "VmRSS:").map(|k| k * 1024.0);
                sample.virtual_bytes = status_kib(&status, "VmSize:").map(|k| k * 1024.0);
            }
            if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
                sample.max_fds = max_open_files(&limits);
            }
            if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
                // The count includes the descriptor read_dir itself holds, as other exporters' does.
                sample.open_fds = Some(entries.count() as f64);
            }
            sample
        }

        /// Fills CPU, threads and start time from `/proc/self/stat`.
        pub fn apply_stat(&mut self, stat: &str, boot_time: Option<f64>) {
            // The command name (field 2) is in parentheses and may itself hold spaces or
            // parentheses, so fields are counted from after its last ')'; field 3 is then index 0.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                self.cpu_seconds = Some((utime + stime) / USER_HZ);
            }
            self.threads = field(20);
            if let (Some(start_ticks), Some(boot)) = (field(22), boot_time) {
                self.start_time_seconds = Some(boot + start_ticks / USER_HZ);
            }
        }
    }

    /// `btime` from `/proc/stat`: boot time in seconds since the epoch.
    pub(super) fn boot_time(proc_stat: &str) -> Option<f64> {
        proc_stat
            .lines()
            .find_map(|line| line.strip_prefix("btime "))
            .and_then(|v| v.trim().parse().ok())
    }

    /// A `Key:   1234 kB` line of `/proc/self/status`, in KiB.
    pub(super) fn status_kib(status: &str, key: &str) -> Option<f64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    /// The soft limit of `Max open files` in `/proc/self/limits`.
    pub(super) fn max_open_files(limits: &str) -> Option<f64> {
        limits
            .lines()
            .find_map(|line| line.strip_prefix("Max open files"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }
}

#[cfg(test)]
// A failed expectation in a test is the test failing, with the message saying which.
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    fn state_with_counter() -> (AdminState, Counter) {
        let mut registry = Registry::with_prefix("larder_test");
        let counter = Counter::default();
        registry.register("pings", "Pings seen", counter.clone());
        let state = AdminState::new(Arc::new(registry), Readiness::new());
        (state, counter)
    }

    async fn get(router: &Router, path: &str) -> (StatusCode, Option<String>, String) {
        let request = Request::get(path).body(Body::empty()).expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).expect("utf-8"),
        )
    }

    #[tokio::test]
    async fn healthz_is_ok() {
        let (state, _) = state_with_counter();
        let (status, _, body) = get(&router(state), "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.trim(), "ok");
    }

    #[tokio::test]
    async fn readyz_follows_the_flag() {
        let (state, _) = state_with_counter();
        let ready = state.ready.clone();
        let router = router(state);

        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("starting"), "{body}");

        ready.set_ready(true);
        let (status, _, _) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::OK);

        ready.set_not_ready("certificates not loaded");
        let (status, _, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("certificates not loaded"), "{body}");

        ready.set_ready(false);
        assert!(!ready.is_ready());
    }

    #[tokio::test]
    async fn metrics_are_openmetrics_text() {
        let (state, counter) = state_with_counter();
        counter.inc_by(3);
        let (status, content_type, body) = get(&router(state), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type.as_deref(), Some(OPENMETRICS_CONTENT_TYPE));
        assert!(body.contains("# TYPE larder_test_pings counter"), "{body}");
        assert!(body.contains("larder_test_pings_total 3"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        let (state, _) = state_with_counter();
        let (status, _, _) = get(&router(state), "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    /// One HTTP/1.1 request over a real socket, read until the server closes.
    async fn raw_get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn serves_on_a_real_socket_and_shuts_down() {
        let (state, counter) = state_with_counter();
        counter.inc();
        let ready = state.ready.clone();
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));

        let health = raw_get(addr, "/healthz").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let not_ready = raw_get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        ready.set_ready(true);
        let now_ready = raw_get(addr, "/readyz").await;
        assert!(now_ready.starts_with("HTTP/1.1 200"), "{now_ready}");
        let metrics = raw_get(addr, "/metrics").await;
        assert!(metrics.contains("larder_test_pings_total 1"), "{metrics}");
        assert!(metrics.ends_with("# EOF\n"), "{metrics}");

        stop.send(()).expect("server still running");
        let result = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("shut down in time")
            .expect("task");
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_replacement_process_can_bind_the_same_admin_port() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind");
        let addr = first.local_addr().expect("addr");
        let second = bind(addr).await.expect("shared with SO_REUSEPORT");
        assert_eq!(second.local_addr().expect("addr"), addr);
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        // Held without SO_REUSEPORT (as another program would): ours cannot share it.
        let taken =
            std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
        let addr = taken.local_addr().expect("addr");
        let error = bind(addr).await.expect_err("port is taken");
        assert!(matches!(error, AdminError::Bind { addr: a, .. } if a == addr));
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }

    #[tokio::test]
    async fn process_metrics_appear_on_linux() {
        let mut registry = Registry::default();
        register_process_metrics(&mut registry);
        let state = AdminState::new(Arc::new(registry), Readiness::new());
        let (status, _, body) = get(&router(state), "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        if std::path::Path::new("/proc/self/stat").exists() {
            for name in [
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_open_fds ",
                "process_max_fds ",
                "process_threads ",
                "process_start_time_seconds ",
            ] {
                assert!(body.contains(name), "missing {name} in {body}");
            }
        }
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[test]
    fn proc_stat_parsing_survives_odd_command_names() {
        // Fields 3.. after a command name holding spaces and a ')'.
        let mut fields: Vec<String> = (3..=30).map(|n| n.to_string()).collect();
        fields[14 - 3] = "250".into(); // utime
        fields[15 - 3] = "50".into(); // stime
        fields[20 - 3] = "7".into(); // threads
        fields[22 - 3] = "1000".into(); // start time in ticks after boot
        let stat = format!("42 (larder ) x) {}", fields.join(" "));
        let mut sample = process::Sample::default();
        sample.apply_stat(&stat, Some(1_700_000_000.0));
        assert_eq!(sample.cpu_seconds, Some(3.0));
        assert_eq!(sample.threads, Some(7.0));
        assert_eq!(sample.start_time_seconds, Some(1_700_000_010.0));

        let mut broken = process::Sample::default();
        broken.apply_stat("garbage", None);
        assert!(broken.cpu_seconds.is_none());
    }

    #[test]
    fn proc_text_parsing() {
        assert_eq!(
            process::boot_time("cpu 1 2\nbtime 1700000000\n"),
            Some(1_700_000_000.0)
        );
        assert_eq!(
            process::status_kib("Name:\tx\nVmRSS:\t  2048 kB\n", "VmRSS:"),
            Some(2048.0)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(process::max_open_files(limits), Some(1024.0));
    }
}
