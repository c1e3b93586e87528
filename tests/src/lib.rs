//! larder-testkit: the harness larder's integration tests run on.
//!
//! - [`Registry`]: a real CNCF distribution registry (`docker-registry serve`) on a free loopback port, with
//!   its own storage, optional pull-through or basic-auth mode, and its parsed request log.
//! - [`ImageBuilder`] / [`IndexBuilder`]: synthetic OCI images (random, incompressible layers; seeded for
//!   sharing), in memory ([`BuiltImage`]) or as an OCI layout directory.
//! - [`push`] / [`Registry::push_image`] / [`pull_with_skopeo`]: skopeo, digests preserved and checked.
//! - [`Containerd`]: a private containerd (root only, otherwise skipped) and `ctr image pull`.
//! - [`http`]: a small blocking HTTP client that only talks to loopback.
//! - [`RangeOrigin`]: a programmable origin for ranged downloads (ignores ranges, breaks, stalls,
//!   lies or redirects on demand) that logs every `Range` it is asked.
//!
//! Every child process is killed by its PID when its guard is stopped or dropped; every wait is bounded.
//!
//! ```no_run
//! use larder_testkit::{ImageBuilder, Registry, RegistryOptions};
//! let origin = Registry::start(RegistryOptions::default())?;
//! let image = ImageBuilder::new().random_layer(1 << 20).build()?;
//! let pushed = origin.push_image(&image, "library/app", "v1")?;
//! assert_eq!(pushed.digest, image.digest());
//! # Ok::<(), larder_testkit::HarnessError>(())
//! ```

pub mod containerd;
pub mod credentials;
pub mod error;
pub mod fake_apiserver;
pub mod http;
pub mod image;
pub mod ports;
pub mod process;
pub mod range_origin;
pub mod registry;
pub mod skopeo;
pub mod token_server;

pub use containerd::{Containerd, CtrPullOptions, write_hosts_toml};
pub use credentials::Credentials;
pub use error::{HarnessError, Result};
pub use http::HttpResponse;
pub use image::{
    Blob, BuiltImage, ImageBuilder, ImageManifest, IndexBuilder, Layer, LayerSpec, Platform,
    sha256_digest,
};
pub use ports::{free_addr, free_port};
pub use process::{ChildGuard, find_tool, is_root, require_tool};
pub use range_origin::{RangeOrigin, Script as RangeScript};
pub use registry::{AccessLogEntry, Registry, RegistryOptions};
pub use skopeo::{
    PushedImage, SkopeoPullOptions, pull_with_skopeo, pull_with_skopeo_async,
    pull_with_skopeo_opts, push,
};

/// Unwraps a harness `Result` in a test: on [`HarnessError::Skipped`] prints `skipped: <why>` and returns
/// from the test; on any other error panics with it.
///
/// ```no_run
/// # fn t() {
/// let containerd = larder_testkit::skip_on_skipped!(larder_testkit::Containerd::start());
/// # }
/// ```
#[macro_export]
macro_rules! skip_on_skipped {
    ($result:expr) => {
        match $result {
            Ok(value) => value,
            Err($crate::HarnessError::Skipped(why)) => {
                eprintln!("skipped: {why}");
                return;
            }
            Err(other) => panic!("{other}"),
        }
    };
}
