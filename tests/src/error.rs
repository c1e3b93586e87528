//! The one error type of the harness.

use std::time::Duration;

/// Everything the harness can fail at, saying what failed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A required external program is not installed: `(program, how to install it)`.
    #[error("required tool `{0}` is not installed (install it with: {1})")]
    MissingTool(&'static str, &'static str),

    /// The test cannot run on this machine (not root, optional tool missing, ...).
    /// Tests print the reason and return; see [`crate::skip_on_skipped!`].
    #[error("skipped: {0}")]
    Skipped(String),

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A command ran but exited unsuccessfully.
    #[error("command `{command}` failed ({status}); stderr tail:\n{stderr_tail}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status, as text.
        status: String,
        /// The last lines of its stderr (and stdout when stderr was empty).
        stderr_tail: String,
    },

    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}; {detail}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The bound.
        after: Duration,
        /// Extra information (e.g. a process's stderr tail).
        detail: String,
    },

    /// A long-running child process exited when it should have kept running.
    #[error("{name} exited early ({status}); stderr tail:\n{stderr_tail}")]
    ProcessExited {
        /// Which process.
        name: String,
        /// Its exit status, as text.
        status: String,
        /// The last lines of its stderr.
        stderr_tail: String,
    },

    /// An HTTP exchange failed at the transport or protocol level.
    #[error("HTTP {method} {url}: {reason}")]
    Http {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// What went wrong.
        reason: String,
    },

    /// An HTTP exchange completed with an unexpected status.
    #[error("HTTP {method} {url} answered {status}: {body_tail}")]
    HttpStatus {
        /// Request method.
        method: String,
        /// Request URL.
        url: String,
        /// The status received.
        status: u16,
        /// The beginning of the response body.
        body_tail: String,
    },

    /// Content did not have the digest it should have.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was checked.
        what: String,
        /// The digest we expected.
        expected: String,
        /// The digest found.
        actual: String,
    },

    /// JSON (de)serialisation failed.
    #[error("JSON {context}: {source}")]
    Json {
        /// What was being (de)serialised.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// YAML (de)serialisation failed.
    #[error("YAML {context}: {source}")]
    Yaml {
        /// What was being (de)serialised.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_yaml::Error,
    },

    /// The caller asked for something that cannot be done.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

impl HarnessError {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io {
            context: context.into(),
            source,
        }
    }

    /// True for [`HarnessError::Skipped`].
    pub fn is_skipped(&self) -> bool {
        matches!(self, HarnessError::Skipped(_))
    }
}

/// Result alias of the harness.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
