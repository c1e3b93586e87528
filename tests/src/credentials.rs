//! Username/password pairs for registries.

use base64::Engine as _;

/// A username and password (HTTP basic auth, htpasswd, `skopeo --*-creds`, `ctr --user`).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

impl Credentials {
    /// A user and their password.
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            password: password.into(),
        }
    }

    /// `user:pass`, the form skopeo and ctr take.
    pub fn user_colon_pass(&self) -> String {
        format!("{}:{}", self.username, self.password)
    }

    /// The value of an `Authorization` header: `Basic base64(user:pass)`.
    pub fn basic_auth_header(&self) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(self.user_colon_pass())
        )
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}
