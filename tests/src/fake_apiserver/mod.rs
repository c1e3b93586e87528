//! A small fake Kubernetes API server, for running larder's controllers and end-to-end suite
//! where no kube-apiserver exists.
//!
//! **A test double, not an apiserver.** It stores any resource at any path, as JSON, with no
//! schema validation, no defaulting (beyond a pod's `status.phase: Pending`), no admission,
//! no authentication or RBAC, no garbage collection by owner, no kubelet. What it does
//! implement is what clients rely on to be correct against a real one:
//!
//! - paths `/api/v1/[namespaces/NS/]PLURAL[/NAME[/status]]` and
//!   `/apis/GROUP/VERSION/[namespaces/NS/]PLURAL[/NAME[/status]]`, over plain HTTP on loopback;
//! - `metadata.resourceVersion` from one global counter, `uid`, `creationTimestamp`,
//!   `generation` bumped when anything but metadata and status changes; no-op writes change
//!   nothing;
//! - GET, LIST (label selectors, field selectors on any dotted path, `limit`/`continue`
//!   pages), WATCH (replay after a `resourceVersion`, `ADDED`/`MODIFIED`/`DELETED`, `BOOKMARK`
//!   with `allowWatchBookmarks`, `sendInitialEvents` with the `k8s.io/initial-events-end`
//!   bookmark, an `ERROR` 410 event when the version is older than the kept history);
//! - POST (409 AlreadyExists, `generateName`), PUT (409 Conflict on a stale
//!   `resourceVersion`), PATCH as merge, strategic merge (treated as merge), JSON patch (with
//!   `test`) and server-side apply (**approximated as a merge patch** that creates missing
//!   objects: no field managers, no apply conflicts);
//! - a `status` subresource for built-in kinds that have one and for CRDs that declare it:
//!   writes to `…/status` change only status, main writes leave status alone;
//! - DELETE with finalizers (`deletionTimestamp` set; the object goes when the last finalizer
//!   is removed; no new finalizers while deleting), namespace deletion removing its contents;
//! - CRDs (`apiextensions.k8s.io/v1`) are stored, marked Established and register their
//!   kind and status subresource;
//! - `metav1.Status` error bodies with upstream codes and reasons;
//! - `GET /fake/stats`: requests by verb and resource, writes per resource and the number of
//!   distinct objects written, object counts.
//!
//! ```no_run
//! use larder_testkit::fake_apiserver::{FakeApiServer, FakeOptions};
//! let api = FakeApiServer::start(FakeOptions::default())?;
//! // Give it to a client in another process, as the tests do with `larder controller`:
//! let mut controller = std::process::Command::new("larder");
//! controller.arg("controller").env("KUBECONFIG", api.kubeconfig_path());
//! # Ok::<(), larder_testkit::HarnessError>(())
//! ```

mod error;
mod patch;
mod path;
mod selector;
mod server;
mod store;
#[cfg(test)]
mod tests;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::ApiError;
pub use patch::PatchKind;
pub use path::ResourcePath;
pub use selector::{FieldSelector, LabelSelector};
pub use store::{ChangeKind, Filter, ListOptions, ResourceInfo, Store};

use crate::error::{HarnessError, Result};

/// How to start a [`FakeApiServer`].
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Where to listen; default a free loopback port.
    pub listen: SocketAddr,
    /// Where to write the kubeconfig; default `kubeconfig` in a private temporary directory.
    pub kubeconfig: Option<PathBuf>,
    /// Changes kept for watches to resume from; older versions get 410 Gone.
    pub history: usize,
    /// A quiet watch gets a bookmark this often (when it allows bookmarks).
    pub bookmark_every: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig: None,
            history: 200_000,
            bookmark_every: Duration::from_secs(10),
        }
    }
}

/// The kubeconfig text for a server at `url` (no credentials: the fake checks none).
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: larder-fake\n  cluster:\n    server: {url}\n\
         users:\n- name: larder-fake\n  user: {{}}\ncontexts:\n- name: larder-fake\n  context:\n    \
         cluster: larder-fake\n    user: larder-fake\n    namespace: default\n\
         current-context: larder-fake\n"
    )
}

/// A running fake API server on its own thread and tokio runtime; stopped when dropped.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    store: Arc<Store>,
    kubeconfig: PathBuf,
    _dir: Option<tempfile::TempDir>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Binds, starts serving, and writes the kubeconfig.
    pub fn start(options: FakeOptions) -> Result<Self> {
        let store = Arc::new(Store::new(options.history));
        let listener = std::net::TcpListener::bind(options.listen)
            .map_err(|e| HarnessError::io(format!("binding {}", options.listen), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| HarnessError::io("configuring the listener", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| HarnessError::io("reading the listen address", e))?;
        let (dir, kubeconfig) = match options.kubeconfig {
            Some(path) => (None, path),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("larder-fake-apiserver-")
                    .tempdir()
                    .map_err(|e| HarnessError::io("creating a temporary directory", e))?;
                let path = dir.path().join("kubeconfig");
                (Some(dir), path)
            }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-apiserver")
            .enable_all()
            .build()
            .map_err(|e| HarnessError::io("starting a tokio runtime", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let router = server::router(store.clone(), options.bookmark_every);
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(error) => {
                            tracing::error!(%error, "fake apiserver listener");
                            return;
                        }
                    };
                    tokio::select! {
                        r = axum::serve(listener, router) => {
                            if let Err(error) = r {
                                tracing::error!(%error, "fake apiserver");
                            }
                        }
                        _ = rx => {}
                    }
                });
                // Open watches are simply dropped.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| HarnessError::io("starting the fake apiserver thread", e))?;
        let server = Self {
            addr,
            store,
            kubeconfig,
            _dir: dir,
            shutdown: Some(tx),
            thread: Some(thread),
        };
        write_atomically(&server.kubeconfig, &self::kubeconfig(&server.url()))?;
        Ok(server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig file naming this server.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The store, for direct reads and writes (the same code paths as HTTP requests).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Creates an object at `path` (a collection path, e.g. `/api/v1/namespaces/a/pods`).
    pub fn create(
        &self,
        path: &str,
        object: serde_json::Value,
    ) -> std::result::Result<serde_json::Value, ApiError> {
        self.store.create(&ResourcePath::parse(path)?, object)
    }

    /// Installs larder's CRDs, as `larder crds` prints them.
    pub fn install_larder_crds(&self) -> std::result::Result<(), ApiError> {
        for crd in larder_core::crd::crds() {
            let crd = serde_json::to_value(&crd)
                .map_err(|e| ApiError::invalid(format!("a CRD as JSON: {e}")))?;
            self.create(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                crd,
            )?;
        }
        Ok(())
    }

    /// Reads the object at `path`, `None` when it does not exist.
    pub fn get(&self, path: &str) -> std::result::Result<Option<serde_json::Value>, ApiError> {
        match self.store.get(&ResourcePath::parse(path)?) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.code == 404 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Lists every object at a collection `path`.
    pub fn list(&self, path: &str) -> std::result::Result<Vec<serde_json::Value>, ApiError> {
        let list = self
            .store
            .list(&ResourcePath::parse(path)?, &ListOptions::default())?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// Merge-patches the object at `path` (`…/status` patches only the status), as a client's
    /// `application/merge-patch+json` PATCH would.
    pub fn merge_patch(
        &self,
        path: &str,
        patch: &serde_json::Value,
    ) -> std::result::Result<serde_json::Value, ApiError> {
        self.store.patch(
            &ResourcePath::parse(path)?,
            PatchKind::Merge,
            patch.to_string().as_bytes(),
        )
    }

    /// Deletes the object at `path`.
    pub fn delete(&self, path: &str) -> std::result::Result<serde_json::Value, ApiError> {
        self.store.delete(&ResourcePath::parse(path)?)
    }

    /// Stops serving (idempotent; also on drop).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a reader polling for the
/// file never sees it half written.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))
}
