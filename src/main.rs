//! `larder`: one binary, one role per subcommand. This file only parses the command line; each
//! role lives in its library crate behind `Args` + `run(args)`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use larder_core::telemetry::{self, LogFormat};

/// larder keeps every container image a Kubernetes cluster uses inside the cluster.
///
/// A mutating webhook rewrites pod images to a proxy on localhost:7439 that runs on every node;
/// the proxy serves each pull from its local disk, the in-cluster cache registry, or the origin;
/// controllers record each image as a CachedImage and copy it into the cache registry.
///
/// Every flag can also be set with an environment variable: LARDER_<FLAG_NAME>, for example
/// LARDER_LOG_FORMAT=json or LARDER_DISK_CACHE=/var/lib/larder/cache.
#[derive(Debug, Parser)]
#[command(name = "larder", version, about, long_about, max_term_width = 100)]
struct Cli {
    /// Log line format: plain for people, json for log collectors. The level comes from
    /// LARDER_LOG or RUST_LOG (default: info).
    #[arg(long, env = "LARDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node-local image proxy (a DaemonSet on every node, host network).
    ///
    /// Serves the read side of the OCI distribution API on 127.0.0.1:7439 and [::1]:7439:
    /// `localhost:7439/<registry>/<repo>:<tag>` pulls `<registry>/<repo>:<tag>` through the
    /// disk tier, the cache registry (if given) and the origin.
    Proxy(larder_proxy::ProxyArgs),

    /// Run the mutating admission webhook that rewrites pod images to the node proxy.
    Webhook(larder_webhook::WebhookArgs),

    /// Run the controllers: CachedImage discovery, copy, refresh and retention.
    ///
    /// Watches pods labelled larder.dev/managed=true, keeps one CachedImage per original image,
    /// copies each verbatim into the cache registry, re-checks tags, and expires unused images.
    /// Uses the in-cluster configuration or KUBECONFIG; leader-elected on a Lease.
    Controller(larder_controllers::ControllerArgs),

    /// Print the CustomResourceDefinitions (YAML) generated from larder's Rust types.
    ///
    /// `larder crds | kubectl apply -f -` installs them; the Helm chart ships the same output.
    Crds,

    /// Manage Precaches: images cached ahead of need, in the cache registry and on chosen nodes.
    ///
    /// `add NAME IMAGE...` creates or updates one, `list` and `info NAME` show progress per image
    /// and per node, `delete NAME` releases its images. Uses KUBECONFIG or the in-cluster config.
    Precache(larder_controllers::precache::cli::PrecacheArgs),

    /// Give the proxy's disk directory on the node to the proxy's user (the chart's init container).
    ///
    /// Runs as root with only the CHOWN capability; changes only what is not already right, so it
    /// succeeds on every start on a node, not only the first.
    PrepareDisk(larder_proxy::disk_owner::PrepareDiskArgs),

    /// Undo what larder's roles did at run time, so `helm uninstall` leaves nothing stuck (the
    /// chart's pre-delete hook).
    ///
    /// Deletes the webhook configuration, stops the controller, releases the larder.dev/cleanup
    /// finalizer from every CachedImage (the objects and the CRDs stay), and deletes the named
    /// Secrets and Leases. Uses the in-cluster configuration or KUBECONFIG.
    Uninstall(larder_controllers::uninstall::UninstallArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("larder: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Crds = cli.command {
        print!(
            "{}",
            larder_core::crd::crds_yaml().context("generating CRDs")?
        );
        return Ok(());
    }
    if let Command::PrepareDisk(args) = &cli.command {
        let steps = larder_proxy::disk_owner::prepare(args).context("prepare-disk")?;
        let done: Vec<String> = steps.iter().map(ToString::to_string).collect();
        eprintln!(
            "larder: {} {}",
            args.path.display(),
            if done.is_empty() {
                "already prepared".to_owned()
            } else {
                done.join(", ")
            }
        );
        return Ok(());
    }
    // One TLS provider for every client and server in the process (kube, reqwest, rustls).
    // An error means one is installed already, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The CLI prints tables; only warnings belong beside them.
    let level = if matches!(cli.command, Command::Precache(_)) {
        "warn"
    } else {
        "info"
    };
    telemetry::init(cli.log_format, level).context("setting up logging")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Proxy(args) => larder_proxy::run(args).await.context("proxy"),
            Command::Webhook(args) => larder_webhook::run(args).await.context("webhook"),
            Command::Controller(args) => larder_controllers::run(args).await.context("controller"),
            Command::Precache(args) => larder_controllers::precache::cli::run(args)
                .await
                .context("precache"),
            Command::Uninstall(args) => {
                let report = larder_controllers::uninstall::run(args)
                    .await
                    .context("uninstall")?;
                tracing::info!(?report, "uninstall steps done");
                Ok(())
            }
            Command::Crds | Command::PrepareDisk(_) => Ok(()),
        }
    })
}
