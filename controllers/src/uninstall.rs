//! `larder uninstall`: what the chart's pre-delete hook runs so that `helm uninstall` leaves
//! nothing stuck.
//!
//! Order matters:
//! 1. The MutatingWebhookConfiguration goes first, so no pod is rewritten to a proxy that is
//!    about to disappear.
//! 2. The controller Deployment is scaled to zero and its pods waited for: a running controller
//!    would put the finalizer back on the next reconcile.
//! 3. The `larder.dev/cleanup` finalizer is released from every `CachedImage`. The objects
//!    themselves stay (so do the CRDs, which Helm never deletes): they describe what the cache
//!    registry's volume still holds, and a later install adopts them. Without this step they
//!    could never be deleted once no controller runs (deletion would hang on the finalizer).
//! 4. What the roles created at run time in the release namespace: the webhook's certificate
//!    Secret and the leader-election Lease.
//! 5. With the readiness gate on (`--release-gate-taints`), the `larder.dev/precache-pending`
//!    taint is removed from every node still carrying it: once the controller is gone nothing
//!    else would ever remove it, and those nodes would take no pod again.
//!
//! Every step is idempotent and a missing object is success, so the hook may run again.

use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use larder_core::crd::CachedImage;
use serde_json::json;

use crate::cachedimage::FINALIZER;
use crate::precache::gate;
use crate::{Error, Result};

/// Flags of `larder uninstall`.
#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    /// Namespace of the release (Deployment, Secret, Lease). Default: the pod's own namespace.
    #[arg(long, env = "LARDER_NAMESPACE")]
    pub namespace: Option<String>,
    /// MutatingWebhookConfiguration to delete first.
    #[arg(long, env = "LARDER_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: Option<String>,
    /// Deployment running the controller, scaled to zero before finalizers are released.
    #[arg(long, env = "LARDER_CONTROLLER_DEPLOYMENT")]
    pub controller_deployment: Option<String>,
    /// Label selector of that Deployment's pods, to wait until none is left.
    #[arg(long, env = "LARDER_CONTROLLER_SELECTOR")]
    pub controller_selector: Option<String>,
    /// Secrets in the namespace to delete (e.g. the webhook's certificate); repeatable.
    #[arg(
        long = "delete-secret",
        env = "LARDER_DELETE_SECRET",
        value_delimiter = ','
    )]
    pub delete_secrets: Vec<String>,
    /// Leases in the namespace to delete (leader election); repeatable.
    #[arg(
        long = "delete-lease",
        env = "LARDER_DELETE_LEASE",
        value_delimiter = ','
    )]
    pub delete_leases: Vec<String>,
    /// Remove the readiness gate's `larder.dev/precache-pending` taint from every node that
    /// still has it (the chart sets this when `controller.readinessGate.enabled`).
    #[arg(long, env = "LARDER_RELEASE_GATE_TAINTS")]
    pub release_gate_taints: bool,
    /// Longest wait for the controller's pods to stop.
    #[arg(long, env = "LARDER_UNINSTALL_TIMEOUT", default_value = "90s",
          value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// What `larder uninstall` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub webhook_configuration_deleted: bool,
    pub controller_stopped: bool,
    pub finalizers_released: usize,
    pub objects_deleted: usize,
    pub gate_taints_removed: usize,
}

/// The finalizer list without larder's, or `None` when larder's is not on it.
pub fn without_finalizer(finalizers: &[String]) -> Option<Vec<String>> {
    finalizers.iter().any(|f| f == FINALIZER).then(|| {
        finalizers
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect()
    })
}

/// Runs the steps in order (see the module doc).
pub async fn run(args: UninstallArgs) -> Result<Report> {
    let client = Client::try_default().await.map_err(Error::Kube)?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    uninstall(client, &namespace, &args).await
}

/// [`run`] with a given client, for tests.
pub async fn uninstall(client: Client, namespace: &str, args: &UninstallArgs) -> Result<Report> {
    let mut report = Report::default();
    if let Some(name) = &args.webhook_configuration {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        report.webhook_configuration_deleted = delete_if_present(&api, name).await?;
        tracing::info!(name, "webhook configuration removed");
    }
    if let Some(name) = &args.controller_deployment {
        stop_controller(client.clone(), namespace, name, args).await?;
        report.controller_stopped = true;
    }
    report.finalizers_released = release_finalizers(client.clone()).await?;
    tracing::info!(
        count = report.finalizers_released,
        "finalizers released from CachedImages"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in &args.delete_secrets {
        report.objects_deleted += usize::from(delete_if_present(&secrets, name).await?);
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    for name in &args.delete_leases {
        report.objects_deleted += usize::from(delete_if_present(&leases, name).await?);
    }
    if args.release_gate_taints {
        report.gate_taints_removed = release_gate_taints(client).await?;
        tracing::info!(
            count = report.gate_taints_removed,
            "readiness gate taints removed from nodes"
        );
    }
    Ok(report)
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<bool>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Scales the controller Deployment to zero and waits until none of its pods is left.
async fn stop_controller(
    client: Client,
    namespace: &str,
    name: &str,
    args: &UninstallArgs,
) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let scale = json!({"spec": {"replicas": 0}});
    match deployments
        .patch_scale(name, &PatchParams::default(), &Patch::Merge(&scale))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(Error::Kube(e)),
    }
    let Some(selector) = &args.controller_selector else {
        return Ok(());
    };
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let deadline = Instant::now() + args.timeout;
    loop {
        let left = pods
            .list(&ListParams::default().labels(selector))
            .await
            .map_err(Error::Kube)?
            .items
            .len();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            // Go on: a controller that outlives this can only re-add finalizers a later
            // `larder uninstall` releases again; stopping here would leave all of them.
            tracing::warn!(
                left,
                "controller pods still running; releasing finalizers anyway"
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Removes larder's finalizer from every `CachedImage` that has it; returns how many.
/// The patch tests the list it read, so a concurrent change makes it fail and retry.
async fn release_finalizers(client: Client) -> Result<usize> {
    let api: Api<CachedImage> = Api::all(client);
    patch_every(&api, "finalizer patch", |ci| {
        let rest = without_finalizer(ci.finalizers())?;
        Some(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": ci.finalizers()},
            {"op": "replace", "path": "/metadata/finalizers", "value": rest},
        ]))
    })
    .await
}

/// Removes the readiness gate's taint from every node that has it; returns how many. The
/// patch is the controller's own ([`gate::removal_patch`]): it tests the taint at its index,
/// so a concurrent taint edit makes it fail (422) and the node is read again.
async fn release_gate_taints(client: Client) -> Result<usize> {
    let api: Api<Node> = Api::all(client);
    patch_every(&api, "taint removal patch", |node| {
        gate::taint_index(node).map(gate::removal_patch)
    })
    .await
}

/// Applies `patch_for(object)` (a JSON patch guarded by `test` operations, or None when the
/// object needs nothing) to every object `api` lists; returns how many were patched. A failed
/// test (422: the object changed under us) or a 404 reads the object again and retries, at
/// most five times in all.
async fn patch_every<K>(
    api: &Api<K>,
    what: &'static str,
    patch_for: impl Fn(&K) -> Option<serde_json::Value>,
) -> Result<usize>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut patched = 0;
    for object in api
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?
    {
        let name = object.name_any();
        for attempt in 0..5 {
            let current = if attempt == 0 {
                object.clone()
            } else {
                match api.get_opt(&name).await.map_err(Error::Kube)? {
                    Some(c) => c,
                    None => break,
                }
            };
            let Some(patch) = patch_for(&current) else {
                break;
            };
            let patch: json_patch::Patch =
                serde_json::from_value(patch).map_err(|e| Error::Config(format!("{what}: {e}")))?;
            match api
                .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(name, what, "patched");
                    patched += 1;
                    break;
                }
                // 422: the test failed (the object changed under us); 404: gone. Look again.
                Err(kube::Error::Api(e)) if e.code == 422 || e.code == 404 => continue,
                Err(e) => return Err(Error::Kube(e)),
            }
        }
    }
    Ok(patched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_larders_finalizer_is_removed() {
        let list = vec!["other.io/keep".to_owned(), FINALIZER.to_owned()];
        assert_eq!(
            without_finalizer(&list),
            Some(vec!["other.io/keep".to_owned()])
        );
        assert_eq!(without_finalizer(&["other.io/keep".to_owned()]), None);
        assert_eq!(without_finalizer(&[]), None);
    }
}
