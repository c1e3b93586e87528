//! A real CNCF distribution registry (`docker-registry serve`) on a free loopback port, with its own
//! storage and a parsed request log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::credentials::Credentials;
use crate::error::{HarnessError, Result};
use crate::http::{self, HttpResponse};
use crate::image::{BuiltImage, MANIFEST_ACCEPT};
use crate::ports::{free_addr, is_loopback_host};
use crate::process::{ChildGuard, TAIL_LINES, file_tail, poll_until, run_checked, tool};
use crate::skopeo::{self, PushedImage};

/// The distribution binary and how to get it.
pub const REGISTRY_TOOL: (&str, &str) = ("docker-registry", "apt-get install docker-registry");

/// How long [`Registry::start`] waits for `GET /v2/` to answer, unless told otherwise.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);

/// How many fresh ports [`Registry::start`] tries when another process takes the chosen one first.
const PORT_ATTEMPTS: usize = 5;

/// How to run a [`Registry`]. `Default` is a plain, anonymous, writable registry on a free port.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Run as a pull-through cache of this registry (`proxy.remoteurl`), e.g. another [`Registry::url`].
    /// Must be a loopback URL. A pull-through cache refuses pushes.
    pub proxy_remote_url: Option<String>,
    /// Credentials the pull-through cache presents to its remote.
    pub proxy_credentials: Option<Credentials>,
    /// Require HTTP basic auth with this user (htpasswd, bcrypt).
    pub basic_auth: Option<Credentials>,
    /// Listen on exactly this address instead of a free port (no retry on a port race).
    pub addr: Option<SocketAddr>,
    /// Use this storage directory (kept after the registry stops) instead of a fresh temp one.
    pub storage_dir: Option<PathBuf>,
    /// YAML merged over the generated configuration (mappings merge key by key, anything else replaces),
    /// e.g. `"log: {level: debug}"` or `"validation: {disabled: true}"`.
    pub extra_yaml: Option<String>,
    /// A name for messages (defaults to `registry` or `pull-through registry`).
    pub name: Option<String>,
    /// Bound on the wait for readiness; [`DEFAULT_START_TIMEOUT`] when `None`.
    pub start_timeout: Option<Duration>,
}

impl RegistryOptions {
    /// A pull-through cache in front of `remote_url`.
    pub fn pull_through(remote_url: impl Into<String>) -> Self {
        RegistryOptions {
            proxy_remote_url: Some(remote_url.into()),
            ..Self::default()
        }
    }

    /// A registry that requires basic auth as `username`/`password`.
    pub fn basic_auth(username: &str, password: &str) -> Self {
        RegistryOptions {
            basic_auth: Some(Credentials::new(username, password)),
            ..Self::default()
        }
    }

    /// Sets [`RegistryOptions::extra_yaml`].
    pub fn with_extra_yaml(mut self, yaml: impl Into<String>) -> Self {
        self.extra_yaml = Some(yaml.into());
        self
    }

    /// Sets [`RegistryOptions::name`].
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
}

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogEntry {
    /// `GET`, `HEAD`, `PUT`, ...
    pub method: String,
    /// The request URI (path and query), e.g. `/v2/library/x/blobs/sha256:...`.
    pub path: String,
    /// The response status.
    pub status: u16,
    /// Response body bytes written, when logged.
    pub bytes: Option<u64>,
    /// The client's User-Agent.
    pub user_agent: String,
}

impl AccessLogEntry {
    /// Parses one combined-log-format line:
    /// `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "user agent"`.
    pub fn parse(line: &str) -> Option<Self> {
        let (_, rest) = line.split_once('"')?;
        let (request, rest) = rest.split_once('"')?;
        let mut request = request.split(' ');
        let method = request.next()?.to_owned();
        let path = request.next()?.to_owned();
        request.next().filter(|proto| proto.starts_with("HTTP/"))?;
        let mut fields = rest.split_whitespace();
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next().and_then(|b| b.parse().ok());
        let user_agent = line
            .trim_end()
            .strip_suffix('"')
            .and_then(|l| l.rsplit_once('"'))
            .map(|(_, ua)| ua.to_owned())
            .unwrap_or_default();
        Some(AccessLogEntry {
            method,
            path,
            status,
            bytes,
            user_agent,
        })
    }

    /// True for this method (case-insensitive) and exact path.
    pub fn is(&self, method: &str, path: &str) -> bool {
        self.method.eq_ignore_ascii_case(method) && self.path == path
    }
}

/// A running `docker-registry serve` process. Stopped (killed by PID, reaped) on [`Registry::stop`] and on drop;
/// its temp directory (config, logs, storage unless given) is removed on drop.
#[derive(Debug)]
pub struct Registry {
    // Declared first so it is dropped (killed) before the directories go.
    child: Option<ChildGuard>,
    name: String,
    addr: SocketAddr,
    storage: PathBuf,
    config_path: PathBuf,
    access_log: PathBuf,
    stderr_log: PathBuf,
    credentials: Option<Credentials>,
    start_timeout: Duration,
    work: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry and waits (bounded) until `GET /v2/` answers.
    ///
    /// Fails with [`HarnessError::MissingTool`] when `docker-registry` (or, for basic auth, `htpasswd`)
    /// is not installed: CI installs them, so tests should fail rather than skip.
    pub fn start(options: RegistryOptions) -> Result<Registry> {
        let binary = tool(REGISTRY_TOOL.0, REGISTRY_TOOL.1)?;
        if let Some(url) = &options.proxy_remote_url {
            check_loopback_url(url)?;
        }
        let name = options.name.clone().unwrap_or_else(|| {
            if options.proxy_remote_url.is_some() {
                "pull-through registry".to_owned()
            } else {
                "registry".to_owned()
            }
        });
        let work = tempfile::Builder::new()
            .prefix("larder-registry-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating a registry temp dir", e))?;
        let storage = match &options.storage_dir {
            Some(dir) => dir.clone(),
            None => work.path().join("storage"),
        };
        std::fs::create_dir_all(&storage)
            .map_err(|e| HarnessError::io(format!("creating {}", storage.display()), e))?;
        let htpasswd = match &options.basic_auth {
            Some(creds) => Some(write_htpasswd(work.path(), creds)?),
            None => None,
        };

        let mut registry = Registry {
            child: None,
            name,
            addr: options
                .addr
                .unwrap_or_else(|| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0))),
            storage,
            config_path: work.path().join("config.yml"),
            access_log: work.path().join("access.log"),
            stderr_log: work.path().join("stderr.log"),
            credentials: options.basic_auth.clone(),
            start_timeout: options.start_timeout.unwrap_or(DEFAULT_START_TIMEOUT),
            work,
        };

        let attempts = if options.addr.is_some() {
            1
        } else {
            PORT_ATTEMPTS
        };
        let mut last_error = None;
        for _ in 0..attempts {
            if options.addr.is_none() {
                registry.addr = free_addr()?;
            }
            registry.write_config(&options, htpasswd.as_deref())?;
            // A failed attempt's output must not be mistaken for this one's.
            for log in [&registry.access_log, &registry.stderr_log] {
                match std::fs::remove_file(log) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(HarnessError::io(format!("removing {}", log.display()), e));
                    }
                    _ => {}
                }
            }
            match registry.launch(&binary) {
                Ok(()) => return Ok(registry),
                Err(e) if is_port_race(&e) && options.addr.is_none() => {
                    tracing::debug!(addr = %registry.addr, "port taken before the registry bound it; retrying");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            HarnessError::InvalidInput("no attempt to start the registry was made".to_owned())
        }))
    }

    /// Starts a plain anonymous registry.
    pub fn start_default() -> Result<Registry> {
        Self::start(RegistryOptions::default())
    }

    fn write_config(&self, options: &RegistryOptions, htpasswd: Option<&Path>) -> Result<()> {
        let mut config = json!({
            "version": "0.1",
            "log": {
                "level": "info",
                "formatter": "text",
                "accesslog": { "disabled": false },
            },
            "storage": {
                "filesystem": { "rootdirectory": self.storage },
                "delete": { "enabled": true },
                "maintenance": { "uploadpurging": { "enabled": false } },
            },
            "http": { "addr": self.addr.to_string(), "secret": "larder-testkit" },
        });
        if let Some(url) = &options.proxy_remote_url {
            let mut proxy = json!({ "remoteurl": url });
            if let Some(c) = &options.proxy_credentials {
                proxy["username"] = json!(c.username);
                proxy["password"] = json!(c.password);
            }
            config["proxy"] = proxy;
        }
        if let Some(path) = htpasswd {
            config["auth"] = json!({ "htpasswd": { "realm": "larder-test", "path": path } });
        }
        let yaml_err = |context: &str, source| HarnessError::Yaml {
            context: context.to_owned(),
            source,
        };
        let mut config: serde_yaml::Value =
            serde_yaml::to_value(&config).map_err(|e| yaml_err("building registry config", e))?;
        if let Some(extra) = &options.extra_yaml {
            let extra: serde_yaml::Value =
                serde_yaml::from_str(extra).map_err(|e| yaml_err("parsing extra_yaml", e))?;
            merge_yaml(&mut config, extra);
        }
        let text =
            serde_yaml::to_string(&config).map_err(|e| yaml_err("writing registry config", e))?;
        std::fs::write(&self.config_path, text)
            .map_err(|e| HarnessError::io(format!("writing {}", self.config_path.display()), e))
    }

    fn launch(&mut self, binary: &Path) -> Result<()> {
        let mut cmd = Command::new(binary);
        cmd.arg("serve").arg(&self.config_path);
        // The registry reads REGISTRY_* variables as config overrides; keep the ones we did not set out.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        let mut child = ChildGuard::spawn(
            format!("{} on {}", self.name, self.addr),
            cmd,
            &self.access_log,
            &self.stderr_log,
        )?;
        let url = format!("{}/v2/", self.url());
        let ready = poll_until(self.start_timeout, || {
            if let Some(status) = child.try_exit_status()? {
                return Err(child.exited_error(status));
            }
            Ok(http::request("GET", &url, &[], Duration::from_secs(2)).ok())
        })?;
        if ready.is_none() {
            let detail = format!("stderr tail:\n{}", child.stderr_tail());
            child.stop()?;
            return Err(HarnessError::Timeout {
                what: format!("{} to answer GET {url}", self.name),
                after: self.start_timeout,
                detail,
            });
        }
        self.child = Some(child);
        Ok(())
    }

    /// Kills the registry by PID and waits until it is gone. Storage, logs and port choice are kept,
    /// so [`Registry::restart`] brings the same registry back (an origin going down and coming back).
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut child) => child.stop(),
            None => Ok(()),
        }
    }

    /// Starts the registry again on the same address with the same storage and config
    /// (stopping it first if it runs). Fails if another process took the port meanwhile.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let binary = tool(REGISTRY_TOOL.0, REGISTRY_TOOL.1)?;
        self.launch(&binary)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_exit_status(), Ok(None)),
            None => false,
        }
    }

    /// Its PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(ChildGuard::pid)
    }

    /// The listening address (127.0.0.1:PORT).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry part of image references.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT/<repo>:<tag>`.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.addr)
    }

    /// The storage root directory (`storage.filesystem.rootdirectory`).
    pub fn storage_dir(&self) -> &Path {
        &self.storage
    }

    /// The generated configuration file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The registry's private temp directory (config, logs, default storage).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// The credentials this registry requires, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the access log (the registry's stdout) is appended to.
    pub fn access_log_path(&self) -> &Path {
        &self.access_log
    }

    /// The last lines of the registry's own log (stderr).
    pub fn stderr_tail(&self) -> String {
        file_tail(&self.stderr_log, TAIL_LINES)
    }

    /// Every request logged so far (across restarts), oldest first.
    ///
    /// The registry writes a line after it has answered, so a client can see its response a moment
    /// before the line appears: use [`Registry::wait_for_requests`] to assert on what must show up.
    pub fn requests(&self) -> Vec<AccessLogEntry> {
        std::fs::read(&self.access_log)
            .map(|bytes| {
                String::from_utf8_lossy(&bytes)
                    .lines()
                    .filter_map(AccessLogEntry::parse)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A marker for [`Registry::requests_since`]: the number of requests logged so far.
    pub fn request_mark(&self) -> usize {
        self.requests().len()
    }

    /// The requests logged after `mark` was taken.
    pub fn requests_since(&self, mark: usize) -> Vec<AccessLogEntry> {
        self.requests().into_iter().skip(mark).collect()
    }

    /// How many logged requests have this method and exact path.
    pub fn count_requests(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.is(method, path))
            .count()
    }

    /// Waits (bounded) until `done(all requests so far)` holds, returning them; a
    /// [`HarnessError::Timeout`] listing what was logged otherwise.
    pub fn wait_for_requests(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[AccessLogEntry]) -> bool,
    ) -> Result<Vec<AccessLogEntry>> {
        let found = poll_until(timeout, || {
            let reqs = self.requests();
            Ok(done(&reqs).then_some(reqs))
        })?;
        found.ok_or_else(|| HarnessError::Timeout {
            what: format!("the expected requests in the access log of {}", self.name),
            after: timeout,
            detail: format!(
                "logged:\n{}",
                self.requests()
                    .iter()
                    .map(|r| format!("{} {} {}", r.method, r.path, r.status))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        })
    }

    fn auth_headers(&self) -> Vec<(String, String)> {
        self.credentials
            .iter()
            .map(|c| ("Authorization".to_owned(), c.basic_auth_header()))
            .collect()
    }

    /// A request to `path` (e.g. `/v2/`) with this registry's credentials (if any) and extra headers.
    /// Any status is returned as is.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse> {
        let auth = self.auth_headers();
        let mut all: Vec<(&str, &str)> =
            auth.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        all.extend_from_slice(headers);
        http::request(
            method,
            &format!("{}{path}", self.url()),
            &all,
            http::DEFAULT_HTTP_TIMEOUT,
        )
    }

    /// `GET /v2/<repo>/manifests/<reference>` accepting every manifest kind; non-2xx is an error.
    pub fn get_manifest(&self, repo: &str, reference: &str) -> Result<HttpResponse> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.request("GET", &path, &[("Accept", MANIFEST_ACCEPT)])?
            .error_for_status("GET", &format!("{}{path}", self.url()))
    }

    /// `GET /v2/<repo>/blobs/<digest>`; non-2xx is an error.
    pub fn get_blob(&self, repo: &str, digest: &str) -> Result<HttpResponse> {
        let path = format!("/v2/{repo}/blobs/{digest}");
        self.request("GET", &path, &[])?
            .error_for_status("GET", &format!("{}{path}", self.url()))
    }

    /// Writes `image` as a temporary OCI layout and pushes it as `<repo>:<tag>` with skopeo, using this
    /// registry's credentials; checks the registry then serves the built digest.
    pub fn push_image(&self, image: &BuiltImage, repo: &str, tag: &str) -> Result<PushedImage> {
        let layout = tempfile::Builder::new()
            .prefix("larder-layout-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating an OCI layout temp dir", e))?;
        image.write_oci_layout(layout.path(), tag)?;
        skopeo::push(
            layout.path(),
            tag,
            &self.host_port(),
            repo,
            self.credentials.as_ref(),
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("larder-testkit: stopping {}: {e}", self.name);
        }
    }
}

fn is_port_race(e: &HarnessError) -> bool {
    match e {
        HarnessError::ProcessExited { stderr_tail, .. } => {
            stderr_tail.contains("address already in use")
        }
        _ => false,
    }
}

fn check_loopback_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| HarnessError::InvalidInput(format!("{url:?} is not an http(s) URL")))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => &authority[..i],
        _ => authority,
    };
    if is_loopback_host(host) {
        Ok(())
    } else {
        Err(HarnessError::InvalidInput(format!(
            "{url:?} is not a loopback URL: harness registries never reach outside this machine"
        )))
    }
}

fn write_htpasswd(dir: &Path, creds: &Credentials) -> Result<PathBuf> {
    let htpasswd = tool("htpasswd", "apt-get install apache2-utils")?;
    let mut cmd = Command::new(htpasswd);
    cmd.args(["-Bbn", &creds.username, &creds.password]);
    let output = run_checked(cmd, Duration::from_secs(30))?;
    let path = dir.join("htpasswd");
    std::fs::write(&path, &output.stdout)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}

fn merge_yaml(base: &mut serde_yaml::Value, extra: serde_yaml::Value) {
    match (base, extra) {
        (serde_yaml::Value::Mapping(base), serde_yaml::Value::Mapping(extra)) => {
            for (key, value) in extra {
                match base.get_mut(&key) {
                    Some(existing) => merge_yaml(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, extra) => *base = extra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_log_lines() {
        let line = r#"127.0.0.1 - - [22/Nov/2026:07:56:35 +0000] "GET /v2/x/manifests/y HTTP/1.1" 404 91 "" "curl/7.88.1""#;
        let e = AccessLogEntry::parse(line).expect("parses");
        assert_eq!(
            e,
            AccessLogEntry {
                method: "GET".into(),
                path: "/v2/x/manifests/y".into(),
                status: 404,
                bytes: Some(91),
                user_agent: "curl/7.88.1".into(),
            }
        );
        assert!(AccessLogEntry::parse("time=\"x\" level=info msg=hello").is_none());
    }

    #[test]
    fn merges_extra_yaml() {
        let mut base: serde_yaml::Value =
            serde_yaml::from_str("log: {level: info, formatter: text}\nhttp: {addr: a}")
                .expect("yaml");
        let extra = serde_yaml::from_str("log: {level: debug}\nvalidation: {disabled: true}")
            .expect("yaml");
        merge_yaml(&mut base, extra);
        assert_eq!(base["log"]["level"], serde_yaml::Value::from("debug"));
        assert_eq!(base["log"]["formatter"], serde_yaml::Value::from("text"));
        assert_eq!(
            base["validation"]["disabled"],
            serde_yaml::Value::from(true)
        );
    }

    #[test]
    fn proxy_remote_must_be_loopback() {
        assert!(check_loopback_url("http://127.0.0.1:5000").is_ok());
        assert!(check_loopback_url("http://[::1]:5000/").is_ok());
        assert!(check_loopback_url("https://registry-1.docker.io").is_err());
    }
}
