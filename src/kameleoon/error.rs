use std::time::Duration;

/// A failed Kameleoon call. Messages carry the HTTP status and Kameleoon's
/// own error text, never a credential or a token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OAuth endpoint rejected the client id or secret.
    #[error("Kameleoon rejected the client credentials (HTTP {status}): {message}")]
    InvalidClient {
        /// HTTP status.
        status: u16,
        /// Kameleoon's message.
        message: String,
    },
    /// A call was refused with 401 even with a freshly issued token.
    #[error("Kameleoon refused the access token (HTTP 401): {message}")]
    Unauthorized {
        /// Kameleoon's message.
        message: String,
    },
    /// Kameleoon refused access (403): a User-Agent it treats as a bot, or a
    /// resource the account may not use.
    #[error("Kameleoon refused access (HTTP 403): {message}")]
    Forbidden {
        /// Kameleoon's message.
        message: String,
    },
    /// The request body exceeded Kameleoon's size limit.
    #[error("Kameleoon rejected a request body of {bytes} bytes as too large (HTTP 413)")]
    PayloadTooLarge {
        /// Size of the refused body.
        bytes: usize,
    },
    /// Kameleoon's rate limit was reached.
    #[error("Kameleoon rate limit reached (HTTP 429): {message}")]
    RateLimited {
        /// Wait that Kameleoon asked for, if it sent one.
        retry_after: Option<Duration>,
        /// Kameleoon's message.
        message: String,
    },
    /// Kameleoon refused the request (400, 404, 409 and other client errors).
    #[error("Kameleoon rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Kameleoon's message.
        message: String,
    },
    /// Kameleoon failed (5xx).
    #[error("Kameleoon server error (HTTP {status}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Kameleoon's message.
        message: String,
    },
    /// Kameleoon could not be reached, or the request timed out.
    #[error("cannot reach Kameleoon")]
    Transport(#[source] reqwest::Error),
    /// Kameleoon answered with a body the client cannot read.
    #[error("unexpected Kameleoon response: {0}")]
    Decode(String),
}

impl Error {
    /// Returns whether a later retry of the same call may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. } | Error::Server { .. } | Error::Transport(_)
        )
    }

    /// The wait Kameleoon asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
