//! larder's image as `scripts/image.sh` assembles it offline: the OCI config the chart relies
//! on (user 65532, entrypoint, labels) and a root filesystem in which the binary really runs
//! (every shared library present), checked by running it under `chroot`.

// A failed expectation in a test is the test failing, with the message saying which.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use larder_testkit::process;
use serde_json::Value;

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
}

#[test]
fn the_offline_image_runs_larder_as_65532_with_everything_it_needs() {
    let larder = process::larder_binary().expect("the larder binary");
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/image.sh"))
        .arg(format!("oci:{}:larder", layout.display()))
        .args(["--binary", larder.to_str().unwrap(), "--version", "9.9.9"]);
    let out = process::run(cmd, Duration::from_secs(300)).unwrap();
    assert!(out.status.success(), "image.sh failed: {out:?}");
    let printed = String::from_utf8(out.stdout).unwrap();
    let digest = printed.trim().lines().last().unwrap().to_owned();
    assert!(
        digest.starts_with("sha256:"),
        "prints the digest: {printed}"
    );

    // The manifest named by the printed digest, its config and its one layer.
    let manifest: Value = serde_json::from_slice(&blob(&layout, &digest)).unwrap();
    let config: Value = serde_json::from_slice(&blob(
        &layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/larder"])
    );
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], "9.9.9");
    assert_eq!(labels["org.opencontainers.image.licenses"], "Apache-2.0");
    assert!(
        labels["org.opencontainers.image.source"]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );

    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let path = layout.join("blobs/sha256").join(
            layer["digest"]
                .as_str()
                .unwrap()
                .strip_prefix("sha256:")
                .unwrap(),
        );
        let status = Command::new("tar")
            .args([
                "-xzf",
                path.to_str().unwrap(),
                "-C",
                rootfs.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
    for file in [
        "usr/local/bin/larder",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/passwd",
        "etc/group",
    ] {
        assert!(rootfs.join(file).is_file(), "{file} missing from the image");
    }
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    use std::os::unix::fs::PermissionsExt;
    let tmp_mode = std::fs::metadata(rootfs.join("tmp"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(tmp_mode & 0o7777, 0o1777);

    // The binary runs inside the image's files alone, as the user the image names.
    if !process::is_root() {
        eprintln!("SKIP: running the image's binary under chroot needs root");
        return;
    }
    let out = Command::new("chroot")
        .args([
            "--userspec=65532:65532",
            rootfs.to_str().unwrap(),
            "/usr/local/bin/larder",
            "--version",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "larder does not run in its image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("larder "));

    // The same inputs give the same image (deterministic layer and config).
    let again = tmp.path().join("again");
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("scripts/image.sh"))
        .arg(format!("oci:{}:larder", again.display()))
        .args(["--binary", larder.to_str().unwrap(), "--version", "9.9.9"]);
    let out = process::run(cmd, Duration::from_secs(300)).unwrap();
    let second = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        second.trim().lines().last().unwrap(),
        digest,
        "not reproducible"
    );
}
