//! `?watch=true`: a chunked stream of newline-delimited JSON events, replayed from the store's
//! history after the requested `resourceVersion`, then live.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::ApiError;
use super::store::{Filter, Store};

/// Events per chunk at most (bounds one chunk's size).
const BATCH: usize = 500;

/// What the client asked for.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// Selection.
    pub filter: Filter,
    /// `resourceVersion`: `None` or `0` starts with the current state as `ADDED` events.
    pub resource_version: Option<u64>,
    /// `sendInitialEvents=true`: the current state first, then a bookmark marking its end.
    pub send_initial_events: bool,
    /// `allowWatchBookmarks=true`.
    pub bookmarks: bool,
    /// `timeoutSeconds`: the stream ends after it.
    pub timeout: Duration,
    /// `apiVersion` and `kind` for bookmarks.
    pub api_version: String,
    /// Kind of the watched objects.
    pub kind: String,
}

fn line(kind: &str, object: &Value) -> String {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    s
}

fn bookmark(req: &WatchRequest, rv: u64, initial_end: bool) -> String {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    line(
        "BOOKMARK",
        &json!({"apiVersion": req.api_version, "kind": req.kind, "metadata": meta}),
    )
}

struct State {
    store: Arc<Store>,
    req: WatchRequest,
    changed: watch::Receiver<u64>,
    cursor: u64,
    first: Option<String>,
    deadline: Instant,
    bookmark_every: Duration,
    done: bool,
}

/// The event stream for `req`; bookmarks (when allowed) every `bookmark_every` of quiet.
pub fn stream(
    store: Arc<Store>,
    req: WatchRequest,
    bookmark_every: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let mut changed = store.subscribe();
    changed.borrow_and_update();
    let initial = req.send_initial_events || matches!(req.resource_version, None | Some(0));
    let (first, cursor) = if initial {
        let (items, rv) = store.snapshot(&req.filter);
        let mut text: String = items.iter().map(|o| line("ADDED", o)).collect();
        if req.send_initial_events && req.bookmarks {
            text.push_str(&bookmark(&req, rv, true));
        }
        (Some(text), rv)
    } else {
        (None, req.resource_version.unwrap_or_default())
    };
    let state = State {
        store,
        deadline: Instant::now() + req.timeout,
        req,
        changed,
        cursor,
        first,
        bookmark_every,
        done: false,
    };
    futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(text) = st.first.take().filter(|t| !t.is_empty()) {
            return Some((Ok(Bytes::from(text)), st));
        }
        loop {
            st.changed.borrow_and_update();
            match st.store.changes_since(st.cursor, &st.req.filter, BATCH) {
                Err(gone) => {
                    st.done = true;
                    let text = line("ERROR", &gone.status());
                    return Some((Ok(Bytes::from(text)), st));
                }
                Ok((events, cursor)) => {
                    st.cursor = cursor;
                    if !events.is_empty() {
                        let text: String = events.iter().map(|(k, o)| line(k, o)).collect();
                        return Some((Ok(Bytes::from(text)), st));
                    }
                }
            }
            tokio::select! {
                r = st.changed.changed() => if r.is_err() { return None },
                () = tokio::time::sleep(st.bookmark_every) => {
                    if st.req.bookmarks {
                        let text = bookmark(&st.req, st.cursor, false);
                        return Some((Ok(Bytes::from(text)), st));
                    }
                }
                () = tokio::time::sleep_until(st.deadline) => return None,
            }
        }
    })
}

/// Parses a `resourceVersion` parameter.
pub fn parse_rv(s: Option<&str>) -> Result<Option<u64>, ApiError> {
    match s {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}"))),
    }
}
