//! A scripted apiserver for the tower-test scenarios of every controller: a scenario answers
//! the calls it expects, one at a time and in order, and fails on any other.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::Value;

pub(crate) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// How long a scenario waits for the code under test to make its next call.
pub(crate) const STEP: Duration = Duration::from_secs(2);

/// A client whose every request goes to the returned handle.
pub(crate) fn client() -> (kube::Client, Handle) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "default"), handle)
}

/// One call the code under test made.
#[derive(Debug)]
pub(crate) struct Call {
    /// The query string, empty when there was none.
    pub query: String,
    pub content_type: Option<String>,
    /// The JSON body sent; `Null` when there was none.
    pub body: Value,
}

/// Expects one `method` call of `path` within [`STEP`] and answers `status` with `reply`
/// (`Null`: the body that was sent, as the apiserver answers a create or a patch, near
/// enough); returns the body that was sent.
pub(crate) async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Value {
    expect_within(handle, STEP, method, path, status, reply)
        .await
        .body
}

/// [`expect`] waiting `within`, returning the whole call.
pub(crate) async fn expect_within(
    handle: &mut Handle,
    within: Duration,
    method: Method,
    path: &str,
    status: StatusCode,
    reply: Value,
) -> Call {
    let (request, send) = tokio::time::timeout(within, handle.next_request())
        .await
        .unwrap_or_else(|_| panic!("expected {method} {path} within {within:?}"))
        .unwrap_or_else(|| panic!("expected {method} {path}; the client was dropped"));
    assert_eq!(
        (request.method(), request.uri().path()),
        (&method, path),
        "an API call other than the one expected"
    );
    let query = request.uri().query().unwrap_or_default().to_owned();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let answer = if reply.is_null() { &body } else { &reply };
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(answer).unwrap()))
            .unwrap(),
    );
    Call {
        query,
        content_type,
        body,
    }
}

/// Fails if the code under test makes any call within `quiet`.
pub(crate) async fn no_more_calls(handle: &mut Handle, quiet: Duration) {
    if let Ok(Some((request, _))) = tokio::time::timeout(quiet, handle.next_request()).await {
        panic!("unexpected {} {}", request.method(), request.uri());
    }
}

/// The body of an apiserver error.
pub(crate) fn api_error(code: u16, reason: &str) -> Value {
    serde_json::json!({"kind":"Status","apiVersion":"v1","status":"Failure","message":reason,"reason":reason,"code":code})
}
