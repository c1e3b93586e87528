//! The HTTP side: routes every request to the store by method and path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::error::ApiError;
use super::patch::PatchKind;
use super::path::ResourcePath;
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Filter, ListOptions, Store};
use super::watch::{self, WatchRequest};

#[derive(Clone)]
struct AppState {
    store: Arc<Store>,
    bookmark_every: Duration,
}

/// The router over `store`.
pub fn router(store: Arc<Store>, bookmark_every: Duration) -> Router {
    Router::new()
        .route("/fake/stats", axum::routing::get(stats))
        .route("/version", axum::routing::get(version))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/readyz", axum::routing::get(|| async { "ok" }))
        .fallback(handle)
        .with_state(AppState {
            store,
            bookmark_every,
        })
}

async fn stats(State(state): State<AppState>) -> Response {
    json_response(StatusCode::OK, &state.store.stats())
}

async fn version() -> Response {
    json_response(
        StatusCode::OK,
        &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-larder-fake", "platform": "linux/amd64"}),
    )
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.status(),
    )
}

fn flag(q: &HashMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v == "true" || v == "1")
}

async fn handle(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match dispatch(&state, &method, &uri, &query, &headers, &body) {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(%method, %uri, error = %e, "fake apiserver error");
            error_response(&e)
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

fn dispatch(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let store = &state.store;
    let p = ResourcePath::parse(uri.path())?;
    let ok = |v: Value| Ok(json_response(StatusCode::OK, &v));
    match (method.as_str(), p.name.is_some()) {
        ("GET", true) => {
            store.count_request("get", &p);
            ok(store.get(&p)?)
        }
        ("GET", false) => {
            let labels =
                LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
            let fields =
                FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))?;
            if flag(query, "watch") {
                store.count_request("watch", &p);
                let info = store.info(&p);
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .unwrap_or(1800);
                let req = WatchRequest {
                    filter: Filter {
                        resource: p.resource_key(),
                        namespace: p.namespace.clone(),
                        labels,
                        fields,
                    },
                    resource_version: watch::parse_rv(
                        query.get("resourceVersion").map(String::as_str),
                    )?,
                    send_initial_events: flag(query, "sendInitialEvents"),
                    bookmarks: flag(query, "allowWatchBookmarks"),
                    timeout: Duration::from_secs(timeout),
                    api_version: p.api_version(),
                    kind: info.kind,
                };
                let body =
                    Body::from_stream(watch::stream(store.clone(), req, state.bookmark_every));
                return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
            }
            store.count_request("list", &p);
            let options = ListOptions {
                labels,
                fields,
                limit: query.get("limit").and_then(|l| l.parse().ok()),
                continue_token: query.get("continue").cloned(),
            };
            ok(store.list(&p, &options)?)
        }
        ("POST", false) => {
            store.count_request("create", &p);
            let created = store.create(&p, parse_json(body)?)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        ("PUT", true) => {
            store.count_request("update", &p);
            ok(store.replace(&p, parse_json(body)?)?)
        }
        ("PATCH", true) => {
            store.count_request("patch", &p);
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let kind = PatchKind::from_content_type(content_type)?;
            ok(store.patch(&p, kind, body)?)
        }
        ("DELETE", true) => {
            store.count_request("delete", &p);
            ok(store.delete(&p)?)
        }
        (m, named) => Err(ApiError::method_not_allowed(format!(
            "{m} is not supported on {} ({})",
            uri.path(),
            if named { "an object" } else { "a collection" }
        ))),
    }
}
