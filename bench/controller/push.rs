//! Pushing many small images fast: plain HTTP/1.1 to a loopback distribution registry,
//! monolithic blob uploads, cross-repository mounts for the shared layer, and a manifest PUT
//! per tag (skopeo per image would take minutes for a thousand).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use larder_testkit::BuiltImage;

const TIMEOUT: Duration = Duration::from_secs(30);

/// A response: status and headers (bodies are not needed here).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response, String> {
    let fail = |e: std::io::Error| format!("{method} {path}: {e}");
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(fail)?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(fail)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(fail)?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(fail)?;
    stream.write_all(body).map_err(fail)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(fail)?;
    let text = String::from_utf8_lossy(&raw);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Response { status, headers })
}

/// A `Location` header as a path (distribution sends absolute URLs).
fn location_path(location: &str) -> String {
    match location.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/".into(), |i| rest[i..].to_owned()),
        None => location.to_owned(),
    }
}

fn expect(r: &Response, want: u16, what: &str) -> Result<(), String> {
    if r.status == want {
        Ok(())
    } else {
        Err(format!("{what}: HTTP {} (wanted {want})", r.status))
    }
}

/// One repository's pushes; `mount_from` names a repository that already holds shared blobs.
pub struct Pusher {
    pub addr: SocketAddr,
    pub mount_from: Option<String>,
    pub shared: BTreeSet<String>,
}

impl Pusher {
    /// Pushes `image` as `repo:tag`; blobs already in `repo` (`present`) are skipped, shared
    /// ones mounted.
    pub fn push(
        &self,
        image: &BuiltImage,
        repo: &str,
        tag: &str,
        present: &mut BTreeSet<String>,
    ) -> Result<(), String> {
        for blob in image.blobs() {
            if present.contains(&blob.digest) {
                continue;
            }
            let mut upload = None;
            if let Some(from) = self
                .mount_from
                .as_deref()
                .filter(|_| self.shared.contains(&blob.digest))
            {
                let r = request(
                    self.addr,
                    "POST",
                    &format!(
                        "/v2/{repo}/blobs/uploads/?mount={}&from={from}",
                        blob.digest
                    ),
                    None,
                    &[],
                )?;
                if r.status != 201 {
                    upload = r.header("Location").map(location_path);
                }
            } else {
                let r = request(
                    self.addr,
                    "POST",
                    &format!("/v2/{repo}/blobs/uploads/"),
                    None,
                    &[],
                )?;
                expect(&r, 202, "starting an upload")?;
                upload = r.header("Location").map(location_path);
                if upload.is_none() {
                    return Err("an upload without a Location".into());
                }
            }
            if let Some(location) = upload {
                let sep = if location.contains('?') { '&' } else { '?' };
                let r = request(
                    self.addr,
                    "PUT",
                    &format!("{location}{sep}digest={}", blob.digest),
                    Some("application/octet-stream"),
                    &blob.bytes,
                )?;
                expect(&r, 201, "finishing an upload")?;
            }
            present.insert(blob.digest.clone());
        }
        let top = image.top();
        let r = request(
            self.addr,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            Some(&top.media_type),
            &top.bytes,
        )?;
        expect(&r, 201, "putting a manifest")
    }
}
