//! The HTTPS server: `POST /mutate-pods`, nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum_server::tls_rustls::RustlsConfig;
use tokio::task::JoinHandle;
use tracing::field::Empty;

use crate::Error;
use crate::metrics::{AdmissionResult, WebhookMetrics};
use crate::mutate::{Action, MutationConfig};
use crate::pull_secrets;
use crate::review::{self, MAX_BODY_BYTES, PendingReview, Reviewed, Step};

/// The path the MutatingWebhookConfiguration points at.
pub const MUTATE_PODS_PATH: &str = "/mutate-pods";

/// Bodies above this size are parsed on the blocking pool so a 1 MiB pod does not stall the
/// reviews sharing its worker thread.
const BLOCKING_THRESHOLD: usize = 256 * 1024;

/// How long reading the pull Secrets and creating the derived one may take. Past this the pod
/// is admitted unchanged, with a log line saying why. Below the chart's webhook timeout (3 s):
/// if the apiserver gave up first, it would admit the pod unchanged too, but after the whole
/// timeout and with nothing in our logs.
pub const PULL_SECRETS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the handler needs.
#[derive(Clone)]
pub struct AppState {
    /// The mutation's configuration.
    pub mutation: Arc<MutationConfig>,
    /// Where results are counted.
    pub metrics: WebhookMetrics,
    /// The Kubernetes API, for `--pull-secrets derive` (`None` in `skip` mode).
    pub client: Option<kube::Client>,
}

impl std::fmt::Debug for AppState {
    // kube::Client has no Debug; whether there is one is what matters.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("mutation", &self.mutation)
            .field("metrics", &self.metrics)
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// The webhook's routes, for [`WebhookServer::start`] or for tests to drive directly.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route(MUTATE_PODS_PATH, post(mutate_pods))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

#[tracing::instrument(
    name = "admission",
    skip_all,
    fields(uid = Empty, namespace = Empty, pod = Empty, operation = Empty, result = Empty, rewritten = Empty)
)]
async fn mutate_pods(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let step = match body {
        Ok(bytes) if bytes.len() > BLOCKING_THRESHOLD => {
            let mutation = Arc::clone(&state.mutation);
            match tokio::task::spawn_blocking(move || review::start(&bytes, &mutation)).await {
                Ok(step) => step,
                Err(e) => Step::answered(review::unreadable(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("review task failed: {e}"),
                )),
            }
        }
        Ok(bytes) => review::start(&bytes, &state.mutation),
        Err(rejection) => Step::answered(review::unreadable(
            rejection.status(),
            rejection.body_text(),
        )),
    };
    let reviewed = match step {
        Step::Answered(reviewed) => *reviewed,
        Step::NeedsPullSecrets(pending) => resolve_pull_secrets(&state, *pending).await,
    };
    log(&reviewed);
    state
        .metrics
        .record(reviewed.result, &reviewed.mutation.images, started);
    (
        reviewed.status,
        [(CONTENT_TYPE, "application/json")],
        reviewed.body,
    )
        .into_response()
}

/// Reads the pod's pull Secrets, creates the derived one and finishes the review. Any failure
/// admits the pod unchanged; the problem (naming the Secret) is logged and counted as an error.
async fn resolve_pull_secrets(state: &AppState, pending: PendingReview) -> Reviewed {
    let outcome = match &state.client {
        Some(client) => {
            let names = pending.secret_names();
            let provided = pull_secrets::provide(
                client.clone(),
                pending.namespace(),
                &names,
                &state.mutation.proxy_address,
                pending.dry_run(),
            );
            match tokio::time::timeout(PULL_SECRETS_TIMEOUT, provided).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "reading the pull secrets took longer than {PULL_SECRETS_TIMEOUT:?}"
                )),
            }
        }
        None => Err("--pull-secrets derive without a Kubernetes client".into()),
    };
    pending.finish(&state.mutation, outcome)
}

fn log(reviewed: &Reviewed) {
    let span = tracing::Span::current();
    let info = &reviewed.info;
    span.record("uid", info.uid.as_str());
    span.record("namespace", info.namespace.as_str());
    span.record("pod", info.name.as_str());
    span.record("operation", info.operation.as_str());
    span.record("result", reviewed.result.label());
    span.record("rewritten", reviewed.mutation.rewritten());
    if let Some(problem) = &reviewed.problem {
        tracing::warn!(%problem, "admitted unchanged");
        return;
    }
    for note in &reviewed.mutation.notes {
        tracing::warn!(%note, "mutation note");
    }
    for d in &reviewed.mutation.images {
        match (&d.action, &d.detail) {
            (Action::Rewritten(to), _) => {
                tracing::debug!(container = %d.container, from = ?d.image, %to, "rewritten");
            }
            (Action::Skipped(skip), Some(detail)) => {
                tracing::info!(container = %d.container, image = ?d.image, reason = skip.label(), %detail, "not rewritten");
            }
            (Action::Skipped(skip), None) => {
                tracing::debug!(container = %d.container, image = ?d.image, reason = skip.label(), "not rewritten");
            }
        }
    }
    if reviewed.result != AdmissionResult::Error {
        tracing::debug!("admitted");
    }
}

/// The running HTTPS server.
#[derive(Debug)]
pub struct WebhookServer {
    addr: SocketAddr,
    handle: axum_server::Handle<SocketAddr>,
    task: JoinHandle<std::io::Result<()>>,
}

impl WebhookServer {
    /// Binds `addr` now, so a taken port fails start-up with a clear error.
    pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
        let listener =
            std::net::TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| Error::Bind { addr, source })?;
        Ok(listener)
    }

    /// Serves `router` over TLS on `listener`. Must be called inside a Tokio runtime.
    pub fn start(
        listener: std::net::TcpListener,
        tls: Arc<rustls::ServerConfig>,
        router: Router,
    ) -> Result<Self, Error> {
        let addr = listener.local_addr().map_err(Error::Serve)?;
        let server = axum_server::from_tcp_rustls(listener, RustlsConfig::from_config(tls))
            .map_err(|source| Error::Bind { addr, source })?;
        let handle = axum_server::Handle::new();
        let task = tokio::spawn(
            server
                .handle(handle.clone())
                .serve(router.into_make_service()),
        );
        tracing::info!(%addr, "webhook listening");
        Ok(WebhookServer { addr, handle, task })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves if the server stops on its own (it should not); the error says why.
    pub async fn failed(&mut self) -> Error {
        match (&mut self.task).await {
            Ok(Ok(())) => Error::Serve(std::io::Error::other("server stopped unexpectedly")),
            Ok(Err(e)) => Error::Serve(e),
            Err(_) => Error::Task("webhook server"),
        }
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then closes.
    pub async fn shutdown(self, grace: Duration) -> Result<(), Error> {
        self.handle.graceful_shutdown(Some(grace));
        match self.task.await {
            Ok(result) => result.map_err(Error::Serve),
            Err(_) => Err(Error::Task("webhook server")),
        }
    }
}
