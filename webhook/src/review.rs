//! One AdmissionReview in, one out: parsing, scope, mutation, a self-check of the patch, and
//! the response bytes. No I/O, so every malformed input is a plain unit test.
//!
//! With `--pull-secrets derive`, a pod that has `imagePullSecrets` and images to rewrite needs
//! the Kubernetes API in the middle: [`start`] then returns [`Step::NeedsPullSecrets`], the
//! caller reads and creates the Secrets ([`crate::pull_secrets::provide`]) and hands the
//! outcome to [`PendingReview::finish`]. If that fails, the pod is admitted unchanged.
//!
//! Never blocking a pod is the rule. Every answer says `allowed: true`:
//! - a body that is not an `admission.k8s.io/v1` AdmissionReview with a request gets HTTP 400
//!   and a review explaining why (the apiserver then applies the webhook's `failurePolicy`,
//!   which the chart sets to `Ignore`);
//! - a readable request we do not expect (another resource, another operation, an object that
//!   is not a pod) gets HTTP 200, allowed, unchanged, counted as an error;
//! - a patch that would not apply to the object we were sent is dropped (the apiserver would
//!   otherwise fail the request, whatever the failure policy says).
//!
//! The `patch` field is written as base64, as `admission.k8s.io/v1` defines `[]byte` on the
//! wire (kube's type serializes it as a number array, which Go happens to accept too).

use std::collections::BTreeSet;

use axum::http::StatusCode;
use json_patch::Patch;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{
    AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND, Operation,
};
use serde::Deserialize;
use serde_json::Value;

use crate::metrics::AdmissionResult;
use crate::mutate::{self, Action, Mutation, MutationConfig, PullSecretPlan, Scope, Skip};
use crate::pull_secrets::PullSecretsMode;

/// The largest body accepted. A pod object is at most about 1.5 MiB (etcd's request limit);
/// an UPDATE carries it twice, plus JSON's overhead.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Who asked what, for logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    /// The review's uid (empty when unreadable).
    pub uid: String,
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name, or its `generateName` prefix on CREATE.
    pub name: String,
    /// `CREATE`, `UPDATE`, ...
    pub operation: String,
    /// The subresource, if any.
    pub sub_resource: String,
}

/// The answer to one review.
#[derive(Debug)]
pub struct Reviewed {
    /// HTTP status: 200, or 400/413 for bodies that are not a review at all.
    pub status: StatusCode,
    /// The AdmissionReview to send back, as JSON.
    pub body: Vec<u8>,
    /// For the metrics.
    pub result: AdmissionResult,
    /// The request, as far as it could be read.
    pub info: RequestInfo,
    /// What the mutation decided (empty on errors).
    pub mutation: Mutation,
    /// Why the result is `Error`.
    pub problem: Option<String>,
}

/// Answers one review body without any I/O: in `derive` mode a pod that would need its pull
/// secrets carried over is admitted unchanged (the server uses [`start`] instead).
pub fn review(body: &[u8], config: &MutationConfig) -> Reviewed {
    match start(body, config) {
        Step::Answered(reviewed) => *reviewed,
        Step::NeedsPullSecrets(pending) => {
            pending.finish(config, Err("pull secrets were not resolved".into()))
        }
    }
}

/// Where a review stands after the pure part.
#[derive(Debug)]
pub enum Step {
    /// The answer is ready.
    Answered(Box<Reviewed>),
    /// `derive` mode: the pod's pull secrets must be read and the derived one created first.
    NeedsPullSecrets(Box<PendingReview>),
}

impl Step {
    /// [`Step::Answered`] with `reviewed`.
    pub fn answered(reviewed: Reviewed) -> Self {
        Step::Answered(Box::new(reviewed))
    }
}

/// A review waiting for the pod's pull secrets to be carried over.
#[derive(Debug)]
pub struct PendingReview {
    response: AdmissionResponse,
    info: RequestInfo,
    raw: Value,
    pod: Pod,
    scope: Scope,
    dry_run: bool,
}

impl PendingReview {
    /// The pod's namespace, where its pull secrets are and the derived one goes.
    pub fn namespace(&self) -> &str {
        &self.info.namespace
    }

    /// The pod's `imagePullSecrets` names, in order.
    pub fn secret_names(&self) -> Vec<String> {
        mutate::pull_secret_names(&self.pod)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// `request.dryRun`: nothing may be written.
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// The answer, given the derived Secret's name (`Ok(None)`: the pull secrets hold no
    /// credentials) or why it could not be had (the pod is then admitted unchanged).
    pub fn finish(
        self,
        config: &MutationConfig,
        derived: Result<Option<String>, String>,
    ) -> Reviewed {
        let PendingReview {
            response,
            info,
            raw,
            pod,
            scope,
            ..
        } = self;
        let plan = match &derived {
            Ok(Some(name)) => PullSecretPlan::Derived(name),
            Ok(None) => PullSecretPlan::NoneNeeded,
            Err(problem) => return unchanged(response, info, problem.clone()),
        };
        let mutation = mutate::mutate(&pod, &scope, config, plan);
        answer(response, info, checked(raw, mutation))
    }
}

/// Parses one review body and runs the pure mutation; see [`Step`].
pub fn start(body: &[u8], config: &MutationConfig) -> Step {
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Step::answered(malformed(
                StatusCode::BAD_REQUEST,
                salvage_uid(body),
                format!("body is not an AdmissionReview: {e}"),
            ));
        }
    };
    if review.types.kind != META_KIND || review.types.api_version != META_API_VERSION_V1 {
        let uid = review.request.as_ref().map(|r| r.uid.clone());
        let problem = format!(
            "expected kind {META_KIND} of {META_API_VERSION_V1}, got kind `{}` of `{}`",
            review.types.kind, review.types.api_version
        );
        return Step::answered(malformed(StatusCode::BAD_REQUEST, uid, problem));
    }
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => {
            return Step::answered(malformed(
                StatusCode::BAD_REQUEST,
                None,
                "AdmissionReview has no request".into(),
            ));
        }
    };
    let info = request_info(&request);
    let response = AdmissionResponse::from(&request);
    let (raw, pod, scope) = match prepare(&request) {
        Ok(prepared) => prepared,
        Err(problem) => return Step::answered(unchanged(response, info, problem)),
    };
    let mutation = mutate::mutate(&pod, &scope, config, PullSecretPlan::Unresolved);
    let needs_secrets = config.pull_secrets == PullSecretsMode::Derive
        && mutation
            .images
            .iter()
            .any(|d| d.action == Action::Skipped(Skip::PullSecrets));
    if needs_secrets {
        return Step::NeedsPullSecrets(Box::new(PendingReview {
            response,
            info,
            raw,
            pod,
            scope,
            dry_run: request.dry_run,
        }));
    }
    Step::answered(answer(response, info, checked(raw, mutation)))
}

/// The answer for a mutation (or the problem that stopped it).
fn answer(
    response: AdmissionResponse,
    info: RequestInfo,
    mutation: Result<Mutation, String>,
) -> Reviewed {
    match mutation {
        Ok(mutation) if mutation.patch.is_empty() => Reviewed {
            status: StatusCode::OK,
            body: encode(response),
            result: AdmissionResult::Skipped,
            info,
            mutation,
            problem: None,
        },
        Ok(mutation) => match response.clone().with_patch(Patch(mutation.patch.clone())) {
            Ok(patched) => Reviewed {
                status: StatusCode::OK,
                body: encode(patched),
                result: AdmissionResult::Rewritten,
                info,
                mutation,
                problem: None,
            },
            Err(e) => unchanged(response, info, format!("cannot encode the patch: {e}")),
        },
        Err(problem) => unchanged(response, info, problem),
    }
}

/// The answer for a body that could not be read at all (too large, broken connection).
pub fn unreadable(status: StatusCode, problem: String) -> Reviewed {
    malformed(status, None, problem)
}

/// Works out the scope and reads the pod (as JSON, to check the patch against, and typed).
fn prepare(request: &AdmissionRequest<DynamicObject>) -> Result<(Value, Pod, Scope), String> {
    let (kind, resource) = (&request.kind, &request.resource);
    if !kind.group.is_empty() || kind.kind != "Pod" || resource.resource != "pods" {
        return Err(format!(
            "expected a Pod, got {}/{} {} (check the webhook's rules)",
            kind.group, kind.version, kind.kind
        ));
    }
    let scope = match (&request.operation, request.sub_resource.as_deref()) {
        (Operation::Create, None | Some("")) => Scope::Create,
        (Operation::Update, Some("ephemeralcontainers")) => {
            let old = request
                .old_object
                .as_ref()
                .ok_or("ephemeralcontainers update without oldObject")?;
            let (_, old_pod) = read_pod(old)?;
            let existing: BTreeSet<String> = old_pod
                .spec
                .iter()
                .flat_map(|s| s.ephemeral_containers.iter().flatten())
                .map(|c| c.name.clone())
                .collect();
            Scope::EphemeralContainersUpdate { existing }
        }
        (op, sub) => {
            return Err(format!(
                "unexpected operation {op:?} on pods{} (check the webhook's rules)",
                sub.map(|s| format!("/{s}")).unwrap_or_default()
            ));
        }
    };
    let object = request.object.as_ref().ok_or("request has no object")?;
    let (raw, pod) = read_pod(object)?;
    Ok((raw, pod, scope))
}

/// Checks the patch applies to exactly the object we were sent.
fn checked(mut raw: Value, mutation: Mutation) -> Result<Mutation, String> {
    if !mutation.patch.is_empty() {
        // The raw object is ours to consume; a failed check leaves nothing behind to undo.
        json_patch::patch_unsafe(&mut raw, &mutation.patch)
            .map_err(|e| format!("the patch would not apply to the pod: {e}"))?;
    }
    Ok(mutation)
}

/// The object as JSON (to check the patch against) and as a typed pod.
fn read_pod(object: &DynamicObject) -> Result<(Value, Pod), String> {
    let raw = serde_json::to_value(object).map_err(|e| format!("cannot read the object: {e}"))?;
    let pod = Pod::deserialize(&raw).map_err(|e| format!("the object is not a valid Pod: {e}"))?;
    Ok((raw, pod))
}

fn request_info(request: &AdmissionRequest<DynamicObject>) -> RequestInfo {
    let name = if request.name.is_empty() {
        request
            .object
            .as_ref()
            .and_then(|o| o.metadata.generate_name.clone())
            .unwrap_or_default()
    } else {
        request.name.clone()
    };
    RequestInfo {
        uid: request.uid.clone(),
        namespace: request.namespace.clone().unwrap_or_default(),
        name,
        operation: format!("{:?}", request.operation).to_uppercase(),
        sub_resource: request.sub_resource.clone().unwrap_or_default(),
    }
}

fn unchanged(response: AdmissionResponse, info: RequestInfo, problem: String) -> Reviewed {
    Reviewed {
        status: StatusCode::OK,
        body: encode(response),
        result: AdmissionResult::Error,
        info,
        mutation: Mutation::default(),
        problem: Some(problem),
    }
}

fn malformed(status: StatusCode, uid: Option<String>, problem: String) -> Reviewed {
    let mut response = AdmissionResponse::invalid(format!("larder: {problem}"));
    // Never block: even a broken review is answered "allowed". The status code tells the
    // caller it was not understood.
    response.allowed = true;
    response.uid = uid.clone().unwrap_or_default();
    Reviewed {
        status,
        body: encode(response),
        result: AdmissionResult::Error,
        info: RequestInfo {
            uid: uid.unwrap_or_default(),
            ..RequestInfo::default()
        },
        mutation: Mutation::default(),
        problem: Some(problem),
    }
}

/// The uid of a body that is JSON but not a well-formed review, so the answer can still be
/// matched to the request.
fn salvage_uid(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        request: Option<ProbeRequest>,
    }
    #[derive(Deserialize)]
    struct ProbeRequest {
        uid: Option<String>,
    }
    serde_json::from_slice::<Probe>(body).ok()?.request?.uid
}

/// A fixed answer for the impossible case that a response cannot be serialized.
const FALLBACK: &[u8] =
    br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":true}}"#;

fn encode(mut response: AdmissionResponse) -> Vec<u8> {
    let patch = response.patch.take();
    let encoded = serde_json::to_value(response.into_review()).and_then(|mut review| {
        if let Some(bytes) = patch {
            review["response"]["patch"] = serde_json::to_value(ByteString(bytes))?;
        }
        serde_json::to_vec(&review)
    });
    encoded.unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialize an admission response");
        FALLBACK.to_vec()
    })
}

#[cfg(test)]
mod tests;
