//! Child processes: finding tools, running commands with a bound, and guards that kill by PID on drop.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// How long a one-shot command (skopeo, ctr, htpasswd) may run unless told otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// How long we wait for a killed process to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many lines of a process's output error messages carry.
pub(crate) const TAIL_LINES: usize = 25;

/// Finds `name` on `PATH` (or checks it directly when it contains a `/`).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Finds a tool CI always installs; its absence is an error ([`HarnessError::MissingTool`]), not a skip.
pub fn tool(name: &'static str, install_hint: &'static str) -> Result<PathBuf> {
    find_tool(name).ok_or(HarnessError::MissingTool(name, install_hint))
}

/// For tools CI may legitimately lack: true when `name` is installed, otherwise prints
/// `skipped: ...` on stderr and returns false, so a test can `if !require_tool("x") { return; }`.
///
/// Do not use it for `docker-registry` or `skopeo`: CI installs them and tests must fail without them.
pub fn require_tool(name: &str) -> bool {
    if find_tool(name).is_some() {
        true
    } else {
        eprintln!("skipped: `{name}` is not installed on this machine");
        false
    }
}

/// True when this process runs with effective uid 0 (read from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// The last lines of a file, or a note saying it could not be read.
pub fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), lines),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A readable command line for error messages.
pub fn command_line(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn status_text(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) => s.to_string(),
        None => "killed after timeout".to_owned(),
    }
}

/// Waits for `child` for at most `timeout`; `Ok(None)` when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Kills `child` by its PID (SIGKILL) unless it already exited, then reaps it with a bound.
fn kill_and_reap(name: &str, child: &mut Child) -> Result<Option<ExitStatus>> {
    if let Some(status) = child
        .try_wait()
        .map_err(|e| HarnessError::io(format!("checking {name}"), e))?
    {
        return Ok(Some(status));
    }
    if let Err(e) = child.kill() {
        // Already gone between try_wait and kill: fine.
        if e.kind() != std::io::ErrorKind::InvalidInput {
            return Err(HarnessError::io(
                format!("killing {name} (pid {})", child.id()),
                e,
            ));
        }
    }
    wait_timeout(child, REAP_TIMEOUT)
        .map_err(|e| HarnessError::io(format!("reaping {name} (pid {})", child.id()), e))
}

/// Runs `cmd` to completion with its output captured, killing it after `timeout`.
/// Returns the output whatever the exit status; see [`run_checked`].
pub fn run(cmd: Command, timeout: Duration) -> Result<Output> {
    let (output, _) = run_inner(cmd, timeout)?;
    Ok(output)
}

/// Like [`run`], but a non-zero exit status is a [`HarnessError::CommandFailed`].
pub fn run_checked(cmd: Command, timeout: Duration) -> Result<Output> {
    let (output, line) = run_inner(cmd, timeout)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(command_failed(&line, Some(output.status), &output))
    }
}

pub(crate) fn command_failed(
    line: &str,
    status: Option<ExitStatus>,
    output: &Output,
) -> HarnessError {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        stderr.into_owned()
    };
    HarnessError::CommandFailed {
        command: line.to_owned(),
        status: status_text(status),
        stderr_tail: tail(&text, TAIL_LINES),
    }
}

fn run_inner(mut cmd: Command, timeout: Duration) -> Result<(Output, String)> {
    let line = command_line(&cmd);
    // Output goes to anonymous temp files, not pipes: no reader threads, no pipe-full deadlock,
    // and nothing blocks if the command leaves a grandchild holding the descriptors.
    let out_file =
        tempfile::tempfile().map_err(|e| HarnessError::io("creating a temp file for stdout", e))?;
    let err_file =
        tempfile::tempfile().map_err(|e| HarnessError::io("creating a temp file for stderr", e))?;
    let clone = |f: &File| {
        f.try_clone()
            .map_err(|e| HarnessError::io("duplicating a temp file handle", e))
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(clone(&out_file)?))
        .stderr(Stdio::from(clone(&err_file)?));
    let mut child = cmd
        .spawn()
        .map_err(|e| HarnessError::io(format!("starting `{line}`"), e))?;
    // Drop our copies of the write ends held by `cmd`.
    drop(cmd);
    let status = wait_timeout(&mut child, timeout)
        .map_err(|e| HarnessError::io(format!("waiting for `{line}`"), e))?;
    let status = match status {
        Some(status) => status,
        None => {
            kill_and_reap(&line, &mut child)?;
            let output = Output {
                status: ExitStatus::default(),
                stdout: read_all(out_file)?,
                stderr: read_all(err_file)?,
            };
            return Err(HarnessError::Timeout {
                what: format!("`{line}`"),
                after: timeout,
                detail: format!(
                    "stderr tail:\n{}",
                    tail(&String::from_utf8_lossy(&output.stderr), TAIL_LINES)
                ),
            });
        }
    };
    let output = Output {
        status,
        stdout: read_all(out_file)?,
        stderr: read_all(err_file)?,
    };
    Ok((output, line))
}

fn read_all(mut file: File) -> Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut buf = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut buf))
        .map_err(|e| HarnessError::io("reading captured command output", e))?;
    Ok(buf)
}

/// A long-running child process that is killed by its PID (and reaped, with a bound) when stopped or dropped.
/// Its stdout and stderr are appended to files, which survive restarts.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with stdin closed and stdout/stderr appended to the given files.
    pub fn spawn(
        name: impl Into<String>,
        mut cmd: Command,
        stdout_path: &Path,
        stderr_path: &Path,
    ) -> Result<Self> {
        let name = name.into();
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| HarnessError::io(format!("opening log file {}", p.display()), e))
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(open(stdout_path)?))
            .stderr(Stdio::from(open(stderr_path)?));
        let child = cmd.spawn().map_err(|e| {
            HarnessError::io(format!("starting {name}: `{}`", command_line(&cmd)), e)
        })?;
        tracing::debug!(name, pid = child.id(), "started child process");
        Ok(ChildGuard {
            name,
            child: Some(child),
            stdout_path: stdout_path.to_owned(),
            stderr_path: stderr_path.to_owned(),
        })
    }

    /// The process's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its PID, while it has not been stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The file its stdout is appended to.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// The file its stderr is appended to.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The last lines of its stderr.
    pub fn stderr_tail(&self) -> String {
        file_tail(&self.stderr_path, TAIL_LINES)
    }

    /// `Some(status)` once the process has exited; `Ok(None)` while it runs. After [`ChildGuard::stop`]
    /// it reports `Some(ExitStatus::default())`.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => Ok(Some(ExitStatus::default())),
            Some(child) => child
                .try_wait()
                .map_err(|e| HarnessError::io(format!("checking {}", self.name), e)),
        }
    }

    /// An error describing the process's early exit, with its stderr tail.
    pub fn exited_error(&self, status: ExitStatus) -> HarnessError {
        HarnessError::ProcessExited {
            name: self.name.clone(),
            status: status.to_string(),
            stderr_tail: self.stderr_tail(),
        }
    }

    /// Kills the process by its PID and waits (bounded) until it is reaped. Idempotent.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = child.id();
        match kill_and_reap(&self.name, &mut child)? {
            Some(_) => {
                tracing::debug!(name = self.name, pid, "stopped child process");
                Ok(())
            }
            None => Err(HarnessError::Timeout {
                what: format!("{} (pid {pid}) to exit after SIGKILL", self.name),
                after: REAP_TIMEOUT,
                detail: String::new(),
            }),
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("larder-testkit: {e}");
        }
    }
}

/// Polls `ready` every few milliseconds until it returns `Some`, for at most `timeout`.
pub fn poll_until<T>(
    timeout: Duration,
    mut ready: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = ready()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Polls `check` every 200 ms until it returns `Some`; panics naming `what` after `timeout`.
/// For tests: prints how long the wait took (seen with `--nocapture`), which is where a slow
/// machine spends a test's time.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            eprintln!("{what}: after {:?}", start.elapsed());
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The `larder` binary of the calling test's target directory, built first (a no-op when
/// fresh) so a test never runs a stale one. Call it from an integration test of this crate.
pub fn larder_binary() -> Result<PathBuf> {
    let exe =
        std::env::current_exe().map_err(|e| HarnessError::io("finding the test executable", e))?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| {
            HarnessError::InvalidInput(format!("{} is not in target/<profile>/deps", exe.display()))
        })?
        .to_owned();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--quiet", "--package", "larder", "--bin", "larder"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    run_checked(cmd, Duration::from_secs(900))?;
    let bin = profile_dir.join("larder");
    if !bin.is_file() {
        return Err(HarnessError::InvalidInput(format!(
            "cargo built larder but {} is not there",
            bin.display()
        )));
    }
    Ok(bin)
}

/// [`run_checked`] on tokio's blocking pool, for async tests whose server runs on the same runtime.
pub async fn run_checked_async(cmd: Command, timeout: Duration) -> Result<Output> {
    tokio::task::spawn_blocking(move || run_checked(cmd, timeout))
        .await
        .map_err(|e| {
            HarnessError::io("joining a blocking command task", std::io::Error::other(e))
        })?
}
