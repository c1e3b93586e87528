//! Pushing OCI layouts to registries and pulling images with skopeo.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::credentials::Credentials;
use crate::error::{HarnessError, Result};
use crate::http;
use crate::image::{MANIFEST_ACCEPT, REF_NAME_ANNOTATION};
use crate::ports::is_loopback_host;
use crate::process::{DEFAULT_COMMAND_TIMEOUT, run_checked, tool};

/// skopeo and how to get it.
pub const SKOPEO_TOOL: (&str, &str) = ("skopeo", "apt-get install skopeo");

/// An image that is now in a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `HOST:PORT` of the registry.
    pub registry: String,
    /// Repository path, e.g. `library/app`.
    pub repo: String,
    /// The tag pushed.
    pub tag: String,
    /// The digest the registry serves for the tag (equal to the layout's).
    pub digest: String,
}

impl PushedImage {
    /// `HOST:PORT/REPO:TAG`.
    pub fn reference(&self) -> String {
        format!("{}/{}:{}", self.registry, self.repo, self.tag)
    }

    /// `HOST:PORT/REPO@DIGEST`.
    pub fn digest_reference(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repo, self.digest)
    }
}

fn skopeo() -> Result<Command> {
    let mut cmd = Command::new(tool(SKOPEO_TOOL.0, SKOPEO_TOOL.1)?);
    // No signature policy from the machine's /etc/containers: the harness only copies its own images.
    cmd.arg("--insecure-policy");
    Ok(cmd)
}

/// The descriptor digest tagged `tag` in the OCI layout at `layout`.
pub fn layout_digest(layout: &Path, tag: &str) -> Result<String> {
    let path = layout.join("index.json");
    let bytes = std::fs::read(&path)
        .map_err(|e| HarnessError::io(format!("reading {}", path.display()), e))?;
    let index: Value = serde_json::from_slice(&bytes).map_err(|source| HarnessError::Json {
        context: format!("parsing {}", path.display()),
        source,
    })?;
    index["manifests"]
        .as_array()
        .and_then(|entries| {
            entries
                .iter()
                .find(|e| e["annotations"][REF_NAME_ANNOTATION] == tag)
        })
        .and_then(|e| e["digest"].as_str())
        .map(str::to_owned)
        .ok_or_else(|| HarnessError::InvalidInput(format!("no tag {tag:?} in {}", path.display())))
}

fn check_loopback_reference(reference: &str) -> Result<()> {
    let host = reference.split('/').next().unwrap_or_default();
    let host = match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    };
    if is_loopback_host(host) {
        Ok(())
    } else {
        Err(HarnessError::InvalidInput(format!(
            "{reference:?} is not on a loopback registry: the harness never reaches outside this machine"
        )))
    }
}

/// Pushes `<layout>:<tag>` (an OCI image layout) to `docker://<registry_host_port>/<repo>:<tag>` with
/// `skopeo copy --all --preserve-digests`, then checks with an HTTP GET that the registry serves the
/// layout's digest for the tag (`Docker-Content-Digest` and the body's own digest).
pub fn push(
    layout: &Path,
    tag: &str,
    registry_host_port: &str,
    repo: &str,
    creds: Option<&Credentials>,
) -> Result<PushedImage> {
    check_loopback_reference(registry_host_port)?;
    let expected = layout_digest(layout, tag)?;
    let mut cmd = skopeo()?;
    cmd.args([
        "copy",
        "--all",
        "--preserve-digests",
        "--quiet",
        "--dest-tls-verify=false",
    ]);
    match creds {
        Some(c) => cmd.arg("--dest-creds").arg(c.user_colon_pass()),
        None => cmd.arg("--dest-no-creds"),
    };
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{registry_host_port}/{repo}:{tag}"));
    run_checked(cmd, DEFAULT_COMMAND_TIMEOUT)?;

    let url = format!("http://{registry_host_port}/v2/{repo}/manifests/{tag}");
    let auth = creds.map(Credentials::basic_auth_header);
    let mut headers = vec![("Accept", MANIFEST_ACCEPT)];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    let response = http::get(&url, &headers)?.error_for_status("GET", &url)?;
    let served = response
        .docker_content_digest()
        .unwrap_or_default()
        .to_owned();
    if served != expected {
        return Err(HarnessError::DigestMismatch {
            what: format!("Docker-Content-Digest of {url} after push"),
            expected,
            actual: served,
        });
    }
    let body = response.body_digest();
    if body != expected {
        return Err(HarnessError::DigestMismatch {
            what: format!("body of {url} after push"),
            expected,
            actual: body,
        });
    }
    Ok(PushedImage {
        registry: registry_host_port.to_owned(),
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        digest: expected,
    })
}

/// Options of [`pull_with_skopeo_opts`].
#[derive(Debug, Clone, Default)]
pub struct SkopeoPullOptions {
    /// `--src-creds user:pass` (otherwise `--src-no-creds`).
    pub creds: Option<Credentials>,
    /// `--all`: every platform of an index (otherwise the one matching `override_arch` or this machine).
    pub all: bool,
    /// `--override-arch` (e.g. `arm64`) to choose a platform of an index.
    pub override_arch: Option<String>,
    /// Bound on the whole copy; [`DEFAULT_COMMAND_TIMEOUT`] when `None`.
    pub timeout: Option<Duration>,
}

/// `skopeo copy --src-tls-verify=false docker://<reference> dir:<dest_dir>`; `reference` is
/// `HOST:PORT/REPO:TAG` or `HOST:PORT/REPO@DIGEST` (a leading `docker://` is accepted) on a loopback host.
/// A non-zero exit is a [`HarnessError::CommandFailed`] carrying skopeo's stderr tail.
pub fn pull_with_skopeo(
    reference: &str,
    dest_dir: &Path,
    creds: Option<&Credentials>,
) -> Result<Output> {
    pull_with_skopeo_opts(
        reference,
        dest_dir,
        &SkopeoPullOptions {
            creds: creds.cloned(),
            ..SkopeoPullOptions::default()
        },
    )
}

/// [`pull_with_skopeo`] with all options.
pub fn pull_with_skopeo_opts(
    reference: &str,
    dest_dir: &Path,
    options: &SkopeoPullOptions,
) -> Result<Output> {
    let (cmd, timeout) = pull_command(reference, dest_dir, options)?;
    run_checked(cmd, timeout)
}

/// [`pull_with_skopeo_opts`] for async tests: runs on tokio's blocking pool, so an in-process server on
/// the same (even current-thread) runtime keeps serving while skopeo pulls from it.
pub async fn pull_with_skopeo_async(
    reference: String,
    dest_dir: PathBuf,
    options: SkopeoPullOptions,
) -> Result<Output> {
    let (cmd, timeout) = pull_command(&reference, &dest_dir, &options)?;
    crate::process::run_checked_async(cmd, timeout).await
}

fn pull_command(
    reference: &str,
    dest_dir: &Path,
    options: &SkopeoPullOptions,
) -> Result<(Command, Duration)> {
    let reference = reference.strip_prefix("docker://").unwrap_or(reference);
    check_loopback_reference(reference)?;
    let mut cmd = skopeo()?;
    if let Some(arch) = &options.override_arch {
        cmd.arg("--override-arch").arg(arch);
    }
    cmd.args(["copy", "--quiet", "--src-tls-verify=false"]);
    if options.all {
        cmd.arg("--all");
    }
    match &options.creds {
        Some(c) => cmd.arg("--src-creds").arg(c.user_colon_pass()),
        None => cmd.arg("--src-no-creds"),
    };
    cmd.arg(format!("docker://{reference}"))
        .arg(format!("dir:{}", dest_dir.display()));
    Ok((cmd, options.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT)))
}
