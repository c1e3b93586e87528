//! Starting, serving and stopping `larder webhook`.
//!
//! Order: the admin server first (so probes answer, `/readyz` saying why not ready), then the
//! certificates (self-managed mode may wait for the API), then the TLS server; ready after
//! that. On shutdown: not ready first, then stop accepting and let in-flight reviews finish.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use larder_certs::{CertManager, CertResolver};
use larder_core::admin::{self, AdminError, AdminState, Readiness};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TlsSource};
use crate::metrics::WebhookMetrics;
use crate::pull_secrets::PullSecretsMode;
use crate::server::{AppState, WebhookServer, router};
use crate::{Error, WebhookArgs};

/// Serves until SIGTERM or ctrl-c, then shuts down gracefully.
pub async fn run(args: WebhookArgs) -> Result<(), Error> {
    let config = Config::try_from(args)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let Some(mut webhook) = Webhook::start(config, shutdown.clone()).await? else {
        return Ok(());
    };
    let failure = tokio::select! {
        () = shutdown.cancelled() => None,
        e = webhook.server.failed() => Some(e),
    };
    tracing::info!("shutting down");
    let stopped = webhook.stop().await;
    match failure {
        Some(e) => Err(e),
        None => stopped,
    }
}

/// A started webhook: TLS server, admin server and (self-managed mode) certificate manager.
#[derive(Debug)]
pub struct Webhook {
    server: WebhookServer,
    metrics_addr: SocketAddr,
    admin: JoinHandle<Result<(), AdminError>>,
    certs: Option<JoinHandle<()>>,
    ready: Readiness,
    tasks: CancellationToken,
    grace: Duration,
}

impl Webhook {
    /// Starts everything; `Ok(None)` when `shutdown` fired before there were certificates to
    /// serve. Cancelling `shutdown` stops the background tasks (admin server, certificate
    /// manager); call [`stop`](Self::stop) to stop the webhook server too.
    pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Option<Self>, Error> {
        Self::start_inner(config, None, shutdown).await
    }

    /// [`start`](Self::start) with a given Kubernetes client for the self-managed mode (instead
    /// of the one from the environment): for tests against a mock apiserver.
    pub async fn start_with_client(
        config: Config,
        client: kube::Client,
        shutdown: CancellationToken,
    ) -> Result<Option<Self>, Error> {
        Self::start_inner(config, Some(client), shutdown).await
    }

    async fn start_inner(
        config: Config,
        client: Option<kube::Client>,
        shutdown: CancellationToken,
    ) -> Result<Option<Self>, Error> {
        let metrics = WebhookMetrics::default();
        let mut registry = Registry::default();
        admin::register_process_metrics(&mut registry);
        metrics.register(&mut registry);
        let ready = Readiness::new();
        ready.set_not_ready("loading certificates");

        // Our own token: cancelled with the caller's, and by us when start-up fails half-way,
        // so no background task outlives a failed start.
        let tasks = shutdown.child_token();
        let admin_listener = admin::bind(config.metrics_listen).await?;
        let metrics_addr = admin_listener.local_addr().unwrap_or(config.metrics_listen);
        let admin = tokio::spawn(admin::serve(
            admin_listener,
            AdminState::new(Arc::new(registry), ready.clone()),
            tasks.clone().cancelled_owned(),
        ));
        let started = Self::start_serving(&config, client, &tasks, metrics).await;
        let (server, certs) = match started {
            Ok(Some(parts)) => parts,
            Ok(None) | Err(_) => {
                tasks.cancel();
                // The admin server's own outcome matters less than why start-up stopped.
                let _ = admin.await;
                return started.map(|_| None);
            }
        };
        ready.set_ready(true);
        Ok(Some(Webhook {
            server,
            metrics_addr,
            admin,
            certs,
            ready,
            tasks,
            grace: config.shutdown_grace,
        }))
    }

    /// Certificates, then the TLS server; `None` when shut down while waiting for certificates.
    async fn start_serving(
        config: &Config,
        client: Option<kube::Client>,
        tasks: &CancellationToken,
        metrics: WebhookMetrics,
    ) -> Result<Option<(WebhookServer, Option<JoinHandle<()>>)>, Error> {
        // Bound before the certificates: a taken port should fail at once, not after the API.
        let listener = WebhookServer::bind(config.listen)?;
        let needs_client = matches!(config.tls, TlsSource::SelfManaged(_))
            || config.mutation.pull_secrets == PullSecretsMode::Derive;
        let client = match client {
            Some(client) => Some(client),
            None if needs_client => Some(kube::Client::try_default().await?),
            None => None,
        };
        let (resolver, certs) = match &config.tls {
            TlsSource::Files { cert, key } => {
                (Arc::new(CertResolver::from_files(cert, key)?), None)
            }
            TlsSource::SelfManaged(managed) => {
                let client = match &client {
                    Some(client) => client.clone(),
                    None => kube::Client::try_default().await?,
                };
                let manager = CertManager::new(client, managed.clone());
                let Some(resolver) = manager.bootstrap(tasks.clone().cancelled_owned()).await
                else {
                    return Ok(None);
                };
                let task = tokio::spawn(
                    manager.run(Arc::clone(&resolver), tasks.clone().cancelled_owned()),
                );
                (resolver, Some(task))
            }
        };
        let tls = larder_certs::tls::server_config(resolver)?;
        let state = AppState {
            mutation: Arc::new(config.mutation.clone()),
            metrics,
            // Only `derive` mode talks to the API about Secrets; `skip` keeps no client.
            client: client.filter(|_| config.mutation.pull_secrets == PullSecretsMode::Derive),
        };
        let server = WebhookServer::start(listener, tls, router(state))?;
        Ok(Some((server, certs)))
    }

    /// Where the webhook (HTTPS) listens.
    pub fn webhook_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Where the admin server (HTTP: `/metrics`, `/healthz`, `/readyz`) listens.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Stops everything: not ready, no new connections, in-flight reviews finish within the
    /// grace period.
    pub async fn stop(self) -> Result<(), Error> {
        self.ready.set_not_ready("shutting down");
        let served = self.server.shutdown(self.grace).await;
        self.tasks.cancel();
        if let Some(certs) = self.certs {
            certs
                .await
                .map_err(|_| Error::Task("certificate manager"))?;
        }
        let admin = self.admin.await.map_err(|_| Error::Task("admin server"))?;
        served?;
        admin?;
        tracing::info!("webhook stopped");
        Ok(())
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    () = ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only ctrl-c stops the webhook");
                ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c().await;
    shutdown.cancel();
}

/// Resolves on ctrl-c. If no handler can be installed it never resolves: the process can still
/// be killed, and shutting down at once would be worse than serving on.
async fn ctrl_c() {
    match tokio::signal::ctrl_c().await {
        Ok(()) => tracing::info!("ctrl-c received"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    }
}
