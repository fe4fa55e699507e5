use std::time::Duration;

/// A failed Mixpanel call. Messages carry the HTTP status and Mixpanel's own
/// error text, never a credential.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The service account was rejected (401, or 400 "Unable to authenticate request").
    #[error("Mixpanel rejected the service account (HTTP {status}): {message}")]
    Unauthorized {
        /// HTTP status.
        status: u16,
        /// Mixpanel's message.
        message: String,
    },
    /// The service account has no access to the project.
    #[error("Mixpanel refused access to project {project_id} (HTTP 403): {message}")]
    Forbidden {
        /// Project id.
        project_id: i64,
        /// Mixpanel's message.
        message: String,
    },
    /// The project's plan has no Query API access.
    #[error(
        "the Mixpanel plan of project {project_id} has no Query API access (HTTP 402): {message}"
    )]
    PaymentRequired {
        /// Project id.
        project_id: i64,
        /// Mixpanel's message.
        message: String,
    },
    /// Mixpanel's query limits were reached.
    #[error("Mixpanel query limit reached (HTTP 429): {message}")]
    RateLimited {
        /// Wait that Mixpanel asked for, if it sent one.
        retry_after: Option<Duration>,
        /// Mixpanel's message.
        message: String,
    },
    /// The paging session of a query expired between two pages.
    #[error("Mixpanel paging session expired: {message}")]
    SessionExpired {
        /// Mixpanel's message.
        message: String,
    },
    /// Mixpanel refused the request (400, 404 and other client errors).
    #[error("Mixpanel rejected the request (HTTP {status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Mixpanel's message.
        message: String,
    },
    /// Mixpanel failed (5xx).
    #[error("Mixpanel server error (HTTP {status}): {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// Mixpanel's message.
        message: String,
    },
    /// Mixpanel could not be reached, or the request timed out.
    #[error("cannot reach Mixpanel")]
    Transport(#[source] reqwest::Error),
    /// Mixpanel answered with a body the client cannot read.
    #[error("unexpected Mixpanel response: {0}")]
    Decode(String),
}

impl Error {
    /// Returns whether a later retry of the same call may succeed. A page of
    /// an expired session never does: the reader starts a new query instead.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. } | Error::Server { .. } | Error::Transport(_)
        )
    }

    /// The wait Mixpanel asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
