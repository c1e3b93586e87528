//! Logging setup shared by every role: `tracing` events to stderr, plain for people, JSON for
//! clusters, with the level taken from the environment.
//!
//! Logs go to stderr so that commands which print a result on stdout (`larder crds`) can be
//! redirected to a file without log lines mixed in.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable read first for the log filter, so larder's level can be set
/// without changing that of other Rust programs in the same environment.
pub const LOG_ENV: &str = "LARDER_LOG";

/// The conventional filter variable, read when [`LOG_ENV`] is unset.
pub const RUST_LOG_ENV: &str = "RUST_LOG";

/// Dependencies that are chatty at `debug`, kept at `info` unless a filter from the
/// environment says otherwise. Only applied to the default, so an explicit `RUST_LOG=hyper=trace`
/// still works.
const QUIET_DEPENDENCIES: &[&str] = &[
    "hyper=info",
    "hyper_util=info",
    "h2=info",
    "rustls=info",
    "tower=info",
];

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured when stderr is a terminal.
    #[default]
    Plain,
    /// One JSON object per line, for log collectors in a cluster.
    Json,
}

/// Why logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A filter (from the environment or the default) does not parse.
    #[error("invalid log filter {filter:?} from {origin}")]
    Filter {
        /// The text that did not parse.
        filter: String,
        /// Where it came from: an environment variable or "the default level".
        origin: &'static str,
        /// What the parser said.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber (or `log` logger) was already installed, e.g. by an earlier call.
    #[error("logging is already initialised")]
    AlreadyInitialised(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// Installs the global subscriber: `format`, filtered by `LARDER_LOG`, else `RUST_LOG`, else
/// `default_level` (e.g. `info` or `larder=debug,info`).
///
/// Call once at start-up; a second call leaves the first subscriber in place and returns
/// [`TelemetryError::AlreadyInitialised`], so tests may call it freely.
pub fn init(format: LogFormat, default_level: &str) -> Result<(), TelemetryError> {
    let larder_log = std::env::var(LOG_ENV).ok();
    let rust_log = std::env::var(RUST_LOG_ENV).ok();
    let filter = filter(larder_log.as_deref(), rust_log.as_deref(), default_level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Plain => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    result.map_err(TelemetryError::AlreadyInitialised)
}

/// The filter from the first non-empty source: `larder_log`, `rust_log`, then `default_level`
/// with [`QUIET_DEPENDENCIES`]. Pure, so it can be tested without touching the environment.
fn filter(
    larder_log: Option<&str>,
    rust_log: Option<&str>,
    default_level: &str,
) -> Result<EnvFilter, TelemetryError> {
    let from_env = [(larder_log, LOG_ENV), (rust_log, RUST_LOG_ENV)]
        .into_iter()
        .find_map(|(value, origin)| {
            value
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| (v.to_owned(), origin))
        });
    let (text, origin) = match from_env {
        Some(found) => found,
        None => {
            let mut text = default_level.trim().to_owned();
            for directive in QUIET_DEPENDENCIES {
                text.push(',');
                text.push_str(directive);
            }
            (text, "the default level")
        }
    };
    EnvFilter::builder()
        .parse(&text)
        .map_err(|source| TelemetryError::Filter {
            filter: text,
            origin,
            source,
        })
}

#[cfg(test)]
// A failed expectation in a test is the test failing, with the message saying which.
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn larder_log_wins_over_rust_log() {
        let f = filter(Some("larder=trace"), Some("warn"), "info").expect("filter");
        assert_eq!(f.to_string(), "larder=trace");
    }

    #[test]
    fn rust_log_is_used_when_larder_log_is_unset_or_blank() {
        let f = filter(None, Some("debug"), "info").expect("filter");
        assert_eq!(f.to_string(), "debug");
        let f = filter(Some("  "), Some("debug"), "info").expect("filter");
        assert_eq!(f.to_string(), "debug");
    }

    #[test]
    fn default_quiets_chatty_dependencies() {
        let f = filter(None, None, "debug").expect("filter");
        let text = f.to_string();
        assert!(text.contains("hyper=info"), "{text}");
        assert!(text.contains("debug"), "{text}");
    }

    #[test]
    fn invalid_filters_say_where_they_came_from() {
        let err = filter(Some("larder=notalevel"), None, "info").expect_err("invalid");
        assert!(err.to_string().contains(LOG_ENV), "{err}");
        let err = filter(None, None, "=[").expect_err("invalid");
        assert!(err.to_string().contains("default"), "{err}");
    }

    #[test]
    fn log_format_parses_from_the_command_line() {
        assert_eq!(LogFormat::from_str("json", true), Ok(LogFormat::Json));
        assert_eq!(LogFormat::from_str("plain", true), Ok(LogFormat::Plain));
        assert_eq!(LogFormat::default(), LogFormat::Plain);
    }

    #[test]
    fn second_init_is_an_error_not_a_panic() {
        // The first call may already have happened in another test of this binary.
        let first = init(LogFormat::Json, "info");
        assert!(
            matches!(first, Ok(()) | Err(TelemetryError::AlreadyInitialised(_))),
            "{first:?}"
        );
        let second = init(LogFormat::Plain, "info");
        assert!(
            matches!(second, Err(TelemetryError::AlreadyInitialised(_))),
            "{second:?}"
        );
        tracing::info!("logging works after a refused second init");
    }
}
