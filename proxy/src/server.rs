//! The HTTP face of the proxy: one catch-all route (axum allows a wildcard only last, and image
//! names have any number of segments), parsed by [`crate::route`].

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt as _};
use larder_core::digest::Digest;

use crate::credentials::Credentials;
use crate::error::{ProxyError, oci_error};
use crate::fetch;
use crate::listing::{self, ListRequest};
use crate::metrics::{Kind, Source};
use crate::range::{self, RangeDecision};
use crate::route::{self, Image, ManifestRef, PathForm, Route, TagsQuery};
use crate::state::{Creds, DIGEST_HEADER, ProxyState};

/// The proxy's router.
pub fn router(state: Arc<ProxyState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

/// The query parameters any endpoint reads: containerd's `ns`, `tags/list`'s `n` and `last`,
/// the referrers API's `artifactType`.
#[derive(Debug, serde::Deserialize)]
struct MirrorQuery {
    ns: Option<String>,
    n: Option<String>,
    last: Option<String>,
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

/// What a response was, for the request counter; set by [`served`], read once in [`handle`].
#[derive(Debug, Clone, Copy)]
struct Served {
    kind: Kind,
    source: Source,
}

async fn handle(
    State(state): State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    Query(query): Query<MirrorQuery>,
    headers: HeaderMap,
) -> Response {
    let route = route::parse(uri.path(), query.ns.as_deref());
    let registry = match &route {
        Ok(
            Route::Manifest { image, .. }
            | Route::Blob { image, .. }
            | Route::Tags { image, .. }
            | Route::Referrers { image, .. },
        ) => image.registry.clone(),
        _ => String::new(),
    };
    let response = serve(&state, method, &uri, &query, route, &headers).await;
    if let Some(served) = response.extensions().get::<Served>() {
        let code = response.status().as_u16();
        state
            .metrics
            .request(served.kind, served.source, code, &registry);
    }
    response
}

async fn serve(
    state: &Arc<ProxyState>,
    method: Method,
    uri: &Uri,
    query: &MirrorQuery,
    route: Result<Route, route::RouteError>,
    headers: &HeaderMap,
) -> Response {
    let head = method == Method::HEAD;
    if method != Method::GET && !head {
        let err = ProxyError::Route(route::RouteError::MethodNotAllowed(method.to_string()));
        return served(Kind::base, Source::none, err.into_response());
    }
    // Credentials the client presents (after a 401 challenge) are used for this request only.
    let creds: Creds = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(Credentials::from_basic_header)
        .map(Arc::new);
    let route = match route {
        Ok(route) => route,
        Err(err) => {
            tracing::debug!(path = uri.path(), error = %err, "refused request");
            return served(
                Kind::base,
                Source::none,
                ProxyError::Route(err).into_response(),
            );
        }
    };
    match route {
        // Clients decide at this ping whether to send credentials later (skopeo and docker do;
        // containerd answers any 401). So ask for them, as registries with auth do; a client
        // without any goes on anonymously.
        Route::Base if creds.is_none() => {
            let mut response = ProxyError::Denied {
                upstream: crate::error::Upstream::Origin,
                status: StatusCode::UNAUTHORIZED,
                detail: "credentials are optional; they are needed for private repositories".into(),
            }
            .into_response();
            response.headers_mut().insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            served(Kind::base, Source::none, response)
        }
        Route::Base => {
            let mut response = (StatusCode::OK, "{}").into_response();
            response.headers_mut().insert(
                "docker-distribution-api-version",
                HeaderValue::from_static("registry/2.0"),
            );
            served(Kind::base, Source::none, response)
        }
        Route::Manifest { image, reference } => {
            let suffix = match &reference {
                ManifestRef::Digest(d) => format!("manifests/{d}"),
                ManifestRef::Tag(t) => format!("manifests/{t}"),
            };
            let result = match state
                .authorize(&image, &suffix, Kind::manifest, &creds)
                .await
            {
                Err(err) => Err(err),
                Ok(()) => match &reference {
                    ManifestRef::Digest(d) => {
                        state.manifest_by_digest(&image, d, true, &creds).await
                    }
                    ManifestRef::Tag(t) => state.manifest_by_tag(&image, t, &creds).await,
                },
            };
            match result {
                Ok((manifest, source)) => {
                    let len = manifest.bytes.len() as u64;
                    let mut response = if head {
                        Response::new(Body::empty())
                    } else {
                        state.metrics.sent(source, len);
                        Response::new(Body::from(manifest.bytes))
                    };
                    let h = response.headers_mut();
                    set(h, header::CONTENT_TYPE, &manifest.media_type);
                    set(h, header::CONTENT_LENGTH, &len.to_string());
                    set(h, DIGEST_HEADER, &manifest.digest.to_string());
                    set(h, header::ETAG, &format!("\"{}\"", manifest.digest));
                    served(Kind::manifest, source, response)
                }
                Err(err) => error(Kind::manifest, &image, err),
            }
        }
        Route::Blob { image, digest } => {
            let suffix = format!("blobs/{digest}");
            if let Err(err) = state.authorize(&image, &suffix, Kind::blob, &creds).await {
                return error(Kind::blob, &image, err);
            }
            serve_blob(state, &image, &digest, head, headers, &creds).await
        }
        Route::Tags { image, form } => {
            let tags = match TagsQuery::parse(query.n.as_deref(), query.last.as_deref()) {
                Ok(q) => q,
                Err(err) => return error_plain(Kind::tags, ProxyError::Route(err)),
            };
            let request = ListRequest::Tags(tags);
            match listing::fetch_list(state, &image, &request, &creds).await {
                Ok((list, source)) => {
                    let name = match &form {
                        PathForm::Rewritten => image.proxy_repository(),
                        PathForm::Mirror { .. } => image.repository.clone(),
                    };
                    let body = match listing::tags_body(&list.body, &name) {
                        Ok(body) => body,
                        Err(detail) => {
                            let err = ProxyError::BadUpstream {
                                upstream: crate::error::Upstream::Origin,
                                detail,
                            };
                            return error(Kind::tags, &image, err);
                        }
                    };
                    let link = list
                        .link
                        .as_deref()
                        .and_then(|l| route::rewrite_tags_link(l, &image, &form));
                    let mut response = list_response(state, source, body, "application/json", head);
                    if let Some(link) = link {
                        set(response.headers_mut(), header::LINK, &link);
                    }
                    served(Kind::tags, source, response)
                }
                Err(err) => error(Kind::tags, &image, err),
            }
        }
        Route::Referrers { image, digest } => {
            let artifact_type = match listing::artifact_type(query.artifact_type.as_deref()) {
                Ok(t) => t,
                Err(err) => return error_plain(Kind::referrers, ProxyError::Route(err)),
            };
            let request = ListRequest::Referrers {
                digest,
                artifact_type,
            };
            match listing::fetch_list(state, &image, &request, &creds).await {
                Ok((list, source)) => {
                    let mut response =
                        list_response(state, source, list.body, listing::INDEX_MEDIA_TYPE, head);
                    if list.filtered {
                        set(
                            response.headers_mut(),
                            listing::FILTERS_APPLIED,
                            "artifactType",
                        );
                    }
                    served(Kind::referrers, source, response)
                }
                Err(err) => error(Kind::referrers, &image, err),
            }
        }
    }
}

/// A small JSON answer (tag list, referrers index).
fn list_response(
    state: &Arc<ProxyState>,
    source: Source,
    body: bytes::Bytes,
    content_type: &str,
    head: bool,
) -> Response {
    let len = body.len() as u64;
    let mut response = if head {
        Response::new(Body::empty())
    } else {
        state.metrics.sent(source, len);
        Response::new(Body::from(body))
    };
    let h = response.headers_mut();
    set(h, header::CONTENT_TYPE, content_type);
    set(h, header::CONTENT_LENGTH, &len.to_string());
    response
}

async fn serve_blob(
    state: &Arc<ProxyState>,
    image: &Image,
    digest: &Digest,
    head: bool,
    headers: &HeaderMap,
    creds: &Creds,
) -> Response {
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // Twice at most: a download may finish between the disk check and joining it.
    for _ in 0..2 {
        match state.disk.open_blob(digest).await {
            Ok(Some((file, size))) => {
                return from_disk(state, digest, file, size, head, range_header).await;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(%digest, error = %err, "disk tier could not open a blob"),
        }
        if head {
            return match state.head_blob_upstream(image, digest, creds).await {
                Ok((size, source)) => {
                    let mut response = Response::new(Body::empty());
                    let h = response.headers_mut();
                    if let Some(size) = size {
                        set(h, header::CONTENT_LENGTH, &size.to_string());
                    }
                    blob_headers(h, digest);
                    served(Kind::blob, source, response)
                }
                Err(err) => error(Kind::blob, image, err),
            };
        }
        match crate::download::join(state, image, digest, creds).await {
            Ok(Some(joined)) => {
                return from_download(state, image, digest, joined, range_header).await;
            }
            Ok(None) => continue,
            Err(ProxyError::Disk(detail)) => {
                tracing::warn!(%digest, detail, "disk tier cannot take the download; streaming without caching");
                return passthrough(state, image, digest, creds).await;
            }
            Err(err) => return error(Kind::blob, image, err),
        }
    }
    passthrough(state, image, digest, creds).await
}

async fn from_disk(
    state: &Arc<ProxyState>,
    digest: &Digest,
    file: tokio::fs::File,
    size: u64,
    head: bool,
    range_header: Option<&str>,
) -> Response {
    let decision = range::decide(range_header, size);
    let (status, start, len) = match decision {
        RangeDecision::Full => (StatusCode::OK, 0, size),
        RangeDecision::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.len()),
        RangeDecision::NotSatisfiable => return not_satisfiable(size, Source::disk),
    };
    let body = if head {
        Body::empty()
    } else {
        let stream = fetch::file_chunks(file.into_std().await, start, len);
        counted(state, Source::disk, stream)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    set(h, header::CONTENT_LENGTH, &len.to_string());
    if let RangeDecision::Partial(r) = decision {
        set(h, header::CONTENT_RANGE, &r.content_range(size));
    }
    blob_headers(h, digest);
    served(Kind::blob, Source::disk, response)
}

async fn from_download(
    state: &Arc<ProxyState>,
    image: &Image,
    digest: &Digest,
    mut joined: fetch::Joined,
    range_header: Option<&str>,
) -> Response {
    if joined.coalesced {
        state.metrics.coalesced.inc();
    }
    let (source, total) = match fetch::wait_started(&mut joined.state).await {
        Ok(started) => started,
        Err(err) => return error(Kind::blob, image, err),
    };
    let decision = match total {
        Some(total) => range::decide(range_header, total),
        None => RangeDecision::Full,
    };
    let (status, stream, len) = match decision {
        RangeDecision::Full => (StatusCode::OK, fetch::tail(joined, 0, None).boxed(), total),
        RangeDecision::Partial(r) => (
            StatusCode::PARTIAL_CONTENT,
            fetch::tail(joined, r.start, Some(r.end)).boxed(),
            Some(r.len()),
        ),
        RangeDecision::NotSatisfiable => {
            return not_satisfiable(total.unwrap_or_default(), source);
        }
    };
    let mut response = Response::new(counted(state, source, stream));
    *response.status_mut() = status;
    let h = response.headers_mut();
    if let Some(len) = len {
        set(h, header::CONTENT_LENGTH, &len.to_string());
    }
    if let (RangeDecision::Partial(r), Some(total)) = (decision, total) {
        set(h, header::CONTENT_RANGE, &r.content_range(total));
    }
    blob_headers(h, digest);
    served(Kind::blob, source, response)
}

async fn passthrough(
    state: &Arc<ProxyState>,
    image: &Image,
    digest: &Digest,
    creds: &Creds,
) -> Response {
    match state.open_blob_upstream(image, digest, creds, None).await {
        Ok((upstream_response, source, upstream)) => {
            let len = upstream_response.content_length();
            let stream = fetch::passthrough(upstream_response, digest.clone(), upstream);
            let mut response = Response::new(counted(state, source, stream));
            let h = response.headers_mut();
            if let Some(len) = len {
                set(h, header::CONTENT_LENGTH, &len.to_string());
            }
            blob_headers(h, digest);
            served(Kind::blob, source, response)
        }
        Err(err) => error(Kind::blob, image, err),
    }
}

fn counted<S>(state: &Arc<ProxyState>, source: Source, stream: S) -> Body
where
    S: Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
{
    let state = Arc::clone(state);
    Body::from_stream(stream.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            state.metrics.sent(source, bytes.len() as u64);
        }
    }))
}

fn not_satisfiable(size: u64, source: Source) -> Response {
    let mut response = oci_error(
        StatusCode::RANGE_NOT_SATISFIABLE,
        "SIZE_INVALID",
        "requested range starts past the end of the blob",
    );
    set(
        response.headers_mut(),
        header::CONTENT_RANGE,
        &format!("bytes */{size}"),
    );
    served(Kind::blob, source, response)
}

fn blob_headers(h: &mut HeaderMap, digest: &Digest) {
    set(h, header::CONTENT_TYPE, "application/octet-stream");
    set(h, DIGEST_HEADER, &digest.to_string());
    set(h, header::ACCEPT_RANGES, "bytes");
    set(h, header::ETAG, &format!("\"{digest}\""));
}

fn error(kind: Kind, image: &Image, err: ProxyError) -> Response {
    if err.is_retryable() {
        tracing::warn!(image = %image.proxy_repository(), error = %err, "request failed");
    } else {
        tracing::debug!(image = %image.proxy_repository(), error = %err, "request refused");
    }
    error_plain(kind, err)
}

fn error_plain(kind: Kind, err: ProxyError) -> Response {
    let source = match &err {
        ProxyError::Route(_) => Source::none,
        ProxyError::Disk(_) => Source::disk,
        _ => Source::origin,
    };
    served(kind, source, err.into_response())
}

/// Marks what served the response; [`handle`] counts it, with the registry, once.
fn served(kind: Kind, source: Source, mut response: Response) -> Response {
    response.extensions_mut().insert(Served { kind, source });
    response
}

fn set<K: header::IntoHeaderName>(headers: &mut HeaderMap, name: K, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}
