//! Command line (and `LARDER_<FLAG>` environment) of `larder webhook`, and its validation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use larder_certs::{Identity, SelfManagedConfig};
use larder_core::reference::Reference;

use crate::Error;
use crate::exclude::Exclusions;
use crate::mutate::MutationConfig;
use crate::pull_secrets::PullSecretsMode;

/// `larder webhook`: the mutating admission webhook that points pod images at the node proxy.
#[derive(clap::Args, Debug, Clone)]
pub struct WebhookArgs {
    /// Address to serve the admission webhook on (HTTPS, `POST /mutate-pods`).
    #[arg(
        long,
        env = "LARDER_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8443"
    )]
    pub listen: SocketAddr,

    /// PEM certificate chain to serve. Re-read whenever the file changes (cert-manager
    /// renewals and Secret updates need no restart). Not used with --self-managed-certs.
    #[arg(
        long,
        env = "LARDER_TLS_CERT",
        value_name = "FILE",
        required_unless_present = "self_managed_certs",
        conflicts_with = "self_managed_certs",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert, re-read with it.
    #[arg(
        long,
        env = "LARDER_TLS_KEY",
        value_name = "FILE",
        conflicts_with = "self_managed_certs",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// The node proxy's address: images are rewritten to `<proxy-address>/<host>[_<port>]/<path>`.
    #[arg(
        long,
        env = "LARDER_PROXY_ADDRESS",
        value_name = "HOST:PORT",
        default_value = larder_core::DEFAULT_PROXY_ADDRESS
    )]
    pub proxy_address: String,

    /// Regular expression of images to leave alone (repeatable). Unanchored; matched against the
    /// image as written and in canonical form (`docker.io/library/nginx:1.27`). In the
    /// environment, separate patterns with newlines.
    #[arg(
        long = "exclude-image",
        env = "LARDER_EXCLUDE_IMAGE",
        value_name = "REGEX",
        value_delimiter = '\n'
    )]
    pub exclude_images: Vec<String>,

    /// Pods with `imagePullSecrets`: `skip` leaves them unrewritten (their images may be private,
    /// and kubelet would find no credentials for the proxy address); `derive` reads the Secrets
    /// each pod names, creates a derived `kubernetes.io/dockerconfigjson` Secret keyed
    /// `<proxy-address>/<host>[_<port>]/` in the pod's namespace and adds it to the pod.
    /// `derive` needs RBAC `get` and `create` on `secrets` (in every namespace pods are
    /// rewritten in), and the MutatingWebhookConfiguration must say `sideEffects: NoneOnDryRun`
    /// (dry-run requests create nothing).
    #[arg(
        long,
        env = "LARDER_PULL_SECRETS",
        value_name = "MODE",
        value_enum,
        default_value_t = PullSecretsMode::Skip
    )]
    pub pull_secrets: PullSecretsMode,

    /// Address of the plain-HTTP admin server: `/metrics`, `/healthz`, `/readyz`.
    #[arg(
        long,
        env = "LARDER_METRICS_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:9102"
    )]
    pub metrics_listen: SocketAddr,

    /// Create and renew the serving certificate without cert-manager: a CA and a certificate for
    /// the Service's DNS names, kept in a Secret, with the CA published in the webhook
    /// configuration's caBundle. Needs --webhook-configuration, --service and --namespace.
    #[arg(long, env = "LARDER_SELF_MANAGED_CERTS")]
    pub self_managed_certs: bool,

    /// MutatingWebhookConfiguration whose entries get the CA bundle (self-managed mode).
    #[arg(
        long,
        env = "LARDER_WEBHOOK_CONFIGURATION",
        value_name = "NAME",
        required_if_eq("self_managed_certs", "true")
    )]
    pub webhook_configuration: Option<String>,

    /// Service in front of the webhook; the certificate covers its DNS names (self-managed mode).
    #[arg(
        long,
        env = "LARDER_SERVICE",
        value_name = "NAME",
        required_if_eq("self_managed_certs", "true")
    )]
    pub service: Option<String>,

    /// Namespace of the Service and of the certificate Secret (self-managed mode).
    #[arg(
        long,
        env = "LARDER_NAMESPACE",
        value_name = "NS",
        required_if_eq("self_managed_certs", "true")
    )]
    pub namespace: Option<String>,

    /// Secret holding the self-managed CA and certificate [default: <service>-certs].
    #[arg(long, env = "LARDER_CERT_SECRET", value_name = "NAME")]
    pub cert_secret: Option<String>,

    /// How long in-flight reviews may take to finish after SIGTERM.
    #[arg(
        long,
        env = "LARDER_SHUTDOWN_GRACE",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = humantime::parse_duration
    )]
    pub shutdown_grace: Duration,
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum TlsSource {
    /// PEM files, re-read when they change.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// The self-managed CA.
    SelfManaged(SelfManagedConfig),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Webhook (HTTPS) address.
    pub listen: SocketAddr,
    /// Admin (HTTP) address.
    pub metrics_listen: SocketAddr,
    /// Certificate source.
    pub tls: TlsSource,
    /// What the mutation needs.
    pub mutation: MutationConfig,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
}

impl TryFrom<WebhookArgs> for Config {
    type Error = Error;

    fn try_from(args: WebhookArgs) -> Result<Self, Error> {
        let proxy_address = validate_proxy_address(&args.proxy_address)?;
        let exclude = Exclusions::new(&args.exclude_images)?;
        let tls = if args.self_managed_certs {
            let need = |v: Option<String>, flag: &str| {
                v.filter(|s| !s.is_empty())
                    .ok_or_else(|| Error::Config(format!("--self-managed-certs needs {flag}")))
            };
            let identity = Identity {
                service: need(args.service, "--service")?,
                namespace: need(args.namespace, "--namespace")?,
            };
            let mut managed = SelfManagedConfig::new(
                identity,
                need(args.webhook_configuration, "--webhook-configuration")?,
            );
            if let Some(secret) = args.cert_secret.filter(|s| !s.is_empty()) {
                managed.secret_name = secret;
            }
            TlsSource::SelfManaged(managed)
        } else {
            match (args.tls_cert, args.tls_key) {
                (Some(cert), Some(key)) => TlsSource::Files { cert, key },
                _ => {
                    return Err(Error::Config(
                        "give --tls-cert and --tls-key, or --self-managed-certs".into(),
                    ));
                }
            }
        };
        Ok(Config {
            listen: args.listen,
            metrics_listen: args.metrics_listen,
            tls,
            mutation: MutationConfig {
                proxy_address,
                exclude,
                pull_secrets: args.pull_secrets,
            },
            shutdown_grace: args.shutdown_grace,
        })
    }
}

/// The proxy address must be a registry host (`host[:port]`, as containerd reads the first
/// path component), or rewritten images would point at Docker Hub. Returned lowercase.
fn validate_proxy_address(address: &str) -> Result<String, Error> {
    let lower = address.to_ascii_lowercase();
    let probe = format!("{lower}/probe");
    match Reference::parse(&probe) {
        Ok(r) if r.registry() == lower => Ok(lower),
        Ok(_) => Err(Error::Config(format!(
            "--proxy-address `{address}` is not a registry host: it needs a `.` or a `:port`, or to be `localhost`"
        ))),
        Err(e) => Err(Error::Config(format!("--proxy-address `{address}`: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: WebhookArgs,
    }

    fn parse(argv: &[&str]) -> Result<WebhookArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("webhook").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        for flag in [
            "--listen",
            "--tls-cert",
            "--exclude-image",
            "LARDER_TLS_CERT",
            "--pull-secrets",
            "LARDER_PULL_SECRETS",
        ] {
            assert!(help.contains(flag), "{flag} missing from help:\n{help}");
        }
    }

    #[test]
    fn files_mode_with_defaults() {
        let args = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"]).unwrap();
        let cfg = Config::try_from(args).unwrap();
        assert_eq!(cfg.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(cfg.metrics_listen, "0.0.0.0:9102".parse().unwrap());
        assert_eq!(cfg.mutation.proxy_address, "localhost:7439");
        assert!(cfg.mutation.exclude.is_empty());
        assert_eq!(cfg.mutation.pull_secrets, PullSecretsMode::Skip);
        assert!(matches!(cfg.tls, TlsSource::Files { .. }));
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(10));
    }

    #[test]
    fn pull_secrets_mode() {
        let args = parse(&["--tls-cert=c", "--tls-key=k", "--pull-secrets=derive"]).unwrap();
        assert_eq!(
            Config::try_from(args).unwrap().mutation.pull_secrets,
            PullSecretsMode::Derive
        );
        assert!(parse(&["--tls-cert=c", "--tls-key=k", "--pull-secrets=all"]).is_err());
    }

    #[test]
    fn repeatable_excludes() {
        let args = parse(&[
            "--tls-cert=c",
            "--tls-key=k",
            "--exclude-image",
            "^quay\\.io/",
            "--exclude-image=pause",
        ])
        .unwrap();
        assert_eq!(args.exclude_images, ["^quay\\.io/", "pause"]);
        assert_eq!(Config::try_from(args).unwrap().mutation.exclude.len(), 2);
    }

    #[test]
    fn self_managed_mode() {
        let args = parse(&[
            "--self-managed-certs",
            "--webhook-configuration=larder",
            "--service=larder-webhook",
            "--namespace=larder",
        ])
        .unwrap();
        let TlsSource::SelfManaged(m) = Config::try_from(args).unwrap().tls else {
            panic!("expected self-managed");
        };
        assert_eq!(m.secret_name, "larder-webhook-certs");
        assert_eq!(m.webhook_configuration, "larder");
        assert_eq!(m.identity.namespace, "larder");
    }

    #[test]
    fn flag_combinations_are_checked() {
        assert!(parse(&[]).is_err(), "no certificate source");
        assert!(parse(&["--tls-cert=c"]).is_err(), "cert without key");
        assert!(parse(&["--self-managed-certs", "--service=s", "--namespace=n"]).is_err());
        assert!(
            parse(&[
                "--self-managed-certs",
                "--webhook-configuration=w",
                "--service=s",
                "--namespace=n",
                "--tls-cert=c",
                "--tls-key=k"
            ])
            .is_err(),
            "both sources"
        );
    }

    #[test]
    fn proxy_address_must_be_a_registry_host() {
        assert_eq!(
            validate_proxy_address("LOCALHOST:7439").unwrap(),
            "localhost:7439"
        );
        assert_eq!(
            validate_proxy_address("127.0.0.1:7439").unwrap(),
            "127.0.0.1:7439"
        );
        assert_eq!(
            validate_proxy_address("proxy.local").unwrap(),
            "proxy.local"
        );
        assert!(validate_proxy_address("proxy").is_err());
        assert!(validate_proxy_address("localhost:7439/sub").is_err());
        assert!(validate_proxy_address("").is_err());
    }

    #[test]
    fn bad_exclude_pattern_fails_startup() {
        let args = parse(&["--tls-cert=c", "--tls-key=k", "--exclude-image=("]).unwrap();
        assert!(matches!(
            Config::try_from(args),
            Err(Error::ExcludePattern { .. })
        ));
    }
}
