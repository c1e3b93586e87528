//! A private containerd (root only) with its own root, state and socket, and `ctr image pull`.
//!
//! containerd needs root; CI may run unprivileged or without the package. [`Containerd::start`] then
//! returns [`HarnessError::Skipped`] and the test prints that it skips (see [`crate::skip_on_skipped!`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::credentials::Credentials;
use crate::error::{HarnessError, Result};
use crate::process::{
    ChildGuard, DEFAULT_COMMAND_TIMEOUT, find_tool, is_root, poll_until, run, run_checked,
    run_checked_async,
};

/// How long [`Containerd::start`] waits for the daemon to answer.
pub const CONTAINERD_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running private containerd, killed by PID on [`Containerd::stop`] and on drop.
#[derive(Debug)]
pub struct Containerd {
    // Declared first: killed before its directories are removed.
    child: Option<ChildGuard>,
    ctr: PathBuf,
    socket: PathBuf,
    dir: tempfile::TempDir,
}

/// Options of [`Containerd::pull`].
#[derive(Debug, Clone)]
pub struct CtrPullOptions {
    /// `--plain-http` (default true: harness registries speak plain HTTP).
    pub plain_http: bool,
    /// `--hosts-dir DIR`: containerd `hosts.toml` files (mirrors), see [`write_hosts_toml`].
    pub hosts_dir: Option<PathBuf>,
    /// `--user user:pass`.
    pub creds: Option<Credentials>,
    /// `--platform os/arch`.
    pub platform: Option<String>,
    /// `--all-platforms`.
    pub all_platforms: bool,
    /// Bound on the pull; [`DEFAULT_COMMAND_TIMEOUT`] when `None`.
    pub timeout: Option<Duration>,
}

impl Default for CtrPullOptions {
    fn default() -> Self {
        CtrPullOptions {
            plain_http: true,
            hosts_dir: None,
            creds: None,
            platform: None,
            all_platforms: false,
            timeout: None,
        }
    }
}

impl Containerd {
    /// Starts containerd with private `root`, `state` and socket in a temp dir and waits until `ctr version`
    /// answers. [`HarnessError::Skipped`] when not root or containerd/ctr is not installed.
    pub fn start() -> Result<Containerd> {
        if !is_root() {
            return Err(HarnessError::Skipped(
                "containerd needs root and this test does not run as root".to_owned(),
            ));
        }
        let (Some(containerd), Some(ctr)) = (find_tool("containerd"), find_tool("ctr")) else {
            return Err(HarnessError::Skipped(
                "containerd/ctr are not installed (apt-get install containerd)".to_owned(),
            ));
        };
        // Short path: the socket path must stay under the 108-byte unix socket limit.
        let dir = tempfile::Builder::new()
            .prefix("ctrd-")
            .tempdir_in("/tmp")
            .map_err(|e| HarnessError::io("creating a containerd temp dir", e))?;
        let socket = dir.path().join("c.sock");
        let config = dir.path().join("config.toml");
        let d = dir.path().display();
        let text = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/c.sock"

[ttrpc]
  address = "{d}/c.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
        );
        std::fs::write(&config, text)
            .map_err(|e| HarnessError::io(format!("writing {}", config.display()), e))?;
        let mut cmd = Command::new(containerd);
        cmd.arg("--config").arg(&config);
        let child = ChildGuard::spawn(
            "containerd",
            cmd,
            &dir.path().join("stdout.log"),
            &dir.path().join("stderr.log"),
        )?;
        let mut this = Containerd {
            child: Some(child),
            ctr,
            socket,
            dir,
        };
        let ready = poll_until(CONTAINERD_START_TIMEOUT, || {
            if let Some(child) = this.child.as_mut()
                && let Some(status) = child.try_exit_status()?
            {
                return Err(child.exited_error(status));
            }
            if !this.socket.exists() {
                return Ok(None);
            }
            let out = run(this.ctr_command(&["version"]), Duration::from_secs(5))?;
            Ok(out.status.success().then_some(()))
        })?;
        if ready.is_none() {
            let detail = this
                .child
                .as_ref()
                .map(ChildGuard::stderr_tail)
                .unwrap_or_default();
            return Err(HarnessError::Timeout {
                what: "containerd to answer `ctr version`".to_owned(),
                after: CONTAINERD_START_TIMEOUT,
                detail: format!("stderr tail:\n{detail}"),
            });
        }
        Ok(this)
    }

    /// The gRPC socket (`ctr --address`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temp directory holding root, state, config and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last lines of containerd's stderr.
    pub fn stderr_tail(&self) -> String {
        self.child
            .as_ref()
            .map(ChildGuard::stderr_tail)
            .unwrap_or_default()
    }

    /// A `ctr --address SOCKET <args>` command.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ctr);
        cmd.arg("--address").arg(&self.socket).args(args);
        cmd
    }

    fn pull_command(&self, reference: &str, options: &CtrPullOptions) -> (Command, Duration) {
        let mut cmd = self.ctr_command(&["image", "pull"]);
        if options.plain_http {
            cmd.arg("--plain-http");
        }
        if let Some(dir) = &options.hosts_dir {
            cmd.arg("--hosts-dir").arg(dir);
        }
        if let Some(c) = &options.creds {
            cmd.arg("--user").arg(c.user_colon_pass());
        }
        if let Some(p) = &options.platform {
            cmd.arg("--platform").arg(p);
        }
        if options.all_platforms {
            cmd.arg("--all-platforms");
        }
        cmd.arg(reference);
        (cmd, options.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT))
    }

    /// `ctr image pull [--plain-http] ... REFERENCE` (pulls and unpacks). A failed pull is a
    /// [`HarnessError::CommandFailed`] with ctr's output tail.
    pub fn pull(&self, reference: &str, options: &CtrPullOptions) -> Result<Output> {
        let (cmd, timeout) = self.pull_command(reference, options);
        run_checked(cmd, timeout)
    }

    /// [`Containerd::pull`] on tokio's blocking pool, for async tests serving on the same runtime.
    pub async fn pull_async(&self, reference: &str, options: &CtrPullOptions) -> Result<Output> {
        let (cmd, timeout) = self.pull_command(reference, options);
        run_checked_async(cmd, timeout).await
    }

    /// The image names containerd holds (`ctr image ls -q`).
    pub fn images(&self) -> Result<Vec<String>> {
        let out = run_checked(
            self.ctr_command(&["image", "ls", "-q"]),
            Duration::from_secs(30),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Kills containerd by PID and waits until it is gone. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        match self.child.take() {
            Some(mut child) => child.stop(),
            None => Ok(()),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("larder-testkit: stopping containerd: {e}");
        }
    }
}

/// Writes `<hosts_dir>/<registry_host>/hosts.toml` making containerd (with `ctr --hosts-dir hosts_dir`)
/// try each mirror URL (e.g. `http://127.0.0.1:7439`) for pull and resolve before `server`
/// (e.g. `http://127.0.0.1:5000`, the origin). `registry_host` is `host[:port]` as in image references.
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry_host: &str,
    server: &str,
    mirrors: &[&str],
) -> Result<PathBuf> {
    let dir = hosts_dir.join(registry_host);
    std::fs::create_dir_all(&dir)
        .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
    let mut text = format!("server = \"{server}\"\n");
    for mirror in mirrors {
        text.push_str(&format!(
            "\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    let path = dir.join("hosts.toml");
    std::fs::write(&path, text)
        .map_err(|e| HarnessError::io(format!("writing {}", path.display()), e))?;
    Ok(path)
}
