//! Wiring: kube client, admin server, leader election, the pod aggregator and the
//! `CachedImage` controller, until SIGTERM or Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, PredicateConfig, WatchStreamExt, reflector, watcher};
use larder_core::admin::{self, AdminState, Readiness};
use larder_core::crd::CachedImage;
use prometheus_client::registry::Registry;
use tokio::sync::{Notify, Semaphore};

use crate::cachedimage::{self, Context, Settings};
use crate::leader::LeaseLock;
use crate::metrics::Metrics;
use crate::registry::{Copier, Endpoint, PlatformFilter, RegistryClient};
use crate::{ControllerArgs, Error, Result, desired, policy, usage};

const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term => {} }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `larder controller` until SIGTERM/Ctrl-C (Ok) or a fatal error, such as losing the
/// leader Lease (Err: the process should exit and be restarted as a follower).
pub async fn run(args: ControllerArgs) -> Result<()> {
    let platforms = args
        .platforms
        .iter()
        .map(|p| PlatformFilter::parse(p))
        .collect::<Result<Vec<_>>>()?;
    let client = kube::Client::try_default().await?;

    let mut registry = Registry::default();
    admin::register_process_metrics(&mut registry);
    let metrics = Metrics::register(&mut registry);
    let precache_metrics = crate::precache::reconcile::PrecacheMetrics::register(&mut registry);
    // Registered whether or not the gate runs: the dashboard's queries find zero series.
    let gate_metrics = crate::precache::gate::GateMetrics::register(&mut registry);
    let ready = Readiness::new();
    let listener = admin::bind(args.metrics_listen)
        .await
        .map_err(Error::Admin)?;
    let admin_task = tokio::spawn(admin::serve(
        listener,
        AdminState::new(Arc::new(registry), ready.clone()),
        shutdown_signal(),
    ));

    let namespace = args.leader_election_namespace.clone().or_else(|| {
        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
            .ok()
            .map(|s| s.trim().to_owned())
    });
    let identity = args.identity();
    let lock = namespace.map(|ns| {
        LeaseLock::new(
            Api::<Lease>::namespaced(client.clone(), &ns),
            args.leader_election_lease.clone(),
            identity.clone(),
            args.leader_election_lease_duration,
        )
    });
    // Ready (for the webhook sharing this Deployment) before leading: followers serve too.
    ready.set_ready(true);
    if let Some(lock) = &lock {
        ready.set_not_ready("waiting for the leader lease");
        tokio::select! {
            _ = lock.acquire(std::time::Duration::from_secs(2)) => {}
            _ = shutdown_signal() => return Ok(()),
        }
        ready.set_ready(true);
    } else {
        tracing::warn!("no namespace for leader election: running as the only replica");
    }

    let copier = Arc::new(Copier::new(
        Arc::new(RegistryClient::new(args.insecure_registries.clone())?),
        Endpoint::new(args.cache_registry.clone()),
        platforms,
    ));

    // Managed pods, reduced to what usage needs (labels, annotations, phase) to keep memory low.
    let (pods, pod_writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let pods_synced = Arc::new(AtomicBool::new(false));
    let pod_stream = larder_core::watch::backoff_until_data(reflector(
        pod_writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().labels(&format!("{}=true", desired::MANAGED_LABEL)),
        )
        .modify(desired::trim_pod),
    ));
    let pod_task = {
        let changed = changed.clone();
        tokio::spawn(async move {
            pod_stream
                .for_each(|event| {
                    if let Err(error) = event {
                        tracing::warn!(%error, "pod watch");
                    }
                    changed.notify_one();
                    futures::future::ready(())
                })
                .await;
        })
    };
    let sync_task = {
        let (pods, synced, changed) = (pods.clone(), pods_synced.clone(), changed.clone());
        tokio::spawn(async move {
            if crate::stores::ready(&pods).await.is_ok() {
                synced.store(true, Ordering::Release);
                changed.notify_one();
            }
        })
    };

    let api: Api<CachedImage> = Api::all(client.clone());
    let max = usize::from(args.max_concurrent_copies);
    // The store sees every change; reconciles are triggered only by what `trigger_hash`
    // covers (spec, usage, deletion, refresh requests), never by the reconciler's own status
    // writes: those would run a failing copy again per write, whatever its backoff. Timers
    // are the reconciler's requeues.
    let (images, image_writer) = reflector::store::<CachedImage>();
    let triggers = larder_core::watch::backoff_until_data(
        watcher(api, watcher::Config::default()).reflect(image_writer),
    )
    .applied_objects()
    .predicate_filter(
        |ci: &CachedImage| Some(policy::trigger_hash(ci)),
        PredicateConfig::default(),
    );
    let controller = Controller::for_stream(triggers, images.clone()).with_config(
        ControllerConfig::default().concurrency(u16::try_from(max * 4).unwrap_or(u16::MAX)),
    );
    let usage_task = tokio::spawn(usage::run(
        client.clone(),
        pods.clone(),
        images.clone(),
        changed.clone(),
        args.retention,
        metrics.clone(),
    ));
    let gate = args.readiness_gate.then(|| crate::precache::gate::Gate {
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: "larder-controller".into(),
                instance: Some(identity.clone()),
            },
        )),
        metrics: gate_metrics,
    });
    let precache_task = tokio::spawn(crate::precache::reconcile::run(
        client.clone(),
        images.clone(),
        precache_metrics,
        changed.clone(),
        gate,
    ));
    let derived_task = args.collect_derived_pull_secrets.then(|| {
        tokio::spawn(crate::derived_secrets::run(
            client.clone(),
            pods.clone(),
            pods_synced.clone(),
            metrics.clone(),
            args.derived_pull_secret_interval,
        ))
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        copier,
        pods,
        pods_synced,
        images,
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: "larder-controller".into(),
                instance: Some(identity),
            },
        )),
        metrics,
        settings: Settings {
            retention: args.retention,
            refresh_interval: args.refresh_interval,
            copy_wait_for_pulls: args.copy_wait_for_pulls,
        },
        copies: Semaphore::new(max),
        failures: Mutex::default(),
        copied: Mutex::default(),
    });
    let controller_run = controller
        .graceful_shutdown_on(shutdown_signal())
        .run(cachedimage::reconcile, cachedimage::error_policy, ctx)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "controller");
            }
            futures::future::ready(())
        });

    let outcome = match &lock {
        Some(lock) => tokio::select! {
            () = controller_run => Ok(()),
            lost = lock.keep() => Err(lost),
        },
        None => {
            controller_run.await;
            Ok(())
        }
    };
    for task in [pod_task, sync_task, usage_task, precache_task]
        .into_iter()
        .chain(derived_task)
    {
        task.abort();
    }
    admin_task.abort();
    outcome
}
