//! Every error of an export or a connection check, mapped once to a
//! condition reason, a retry decision and an Event.

use crate::conditions::reasons;
use crate::{credentials, kameleoon, mixpanel, store};

/// Why an attempt failed, in the terms status and Events use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Condition and Event reason.
    pub reason: &'static str,
    /// What failed and what to do, one line, without credentials.
    pub message: String,
    /// Whether progress needs a change from a person (kstatus Stalled).
    /// Stalled attempts are still retried, at the longest backoff.
    pub stalled: bool,
}

impl Failure {
    /// Builds a failure that a retry may fix.
    pub fn transient(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            stalled: false,
        }
    }

    /// Builds a failure that needs a change from a person.
    pub fn stalled(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            stalled: true,
        }
    }

    /// Maps a Mixpanel error.
    pub fn mixpanel(error: &mixpanel::Error) -> Self {
        use mixpanel::Error as E;
        let message = crate::failure_chain(error);
        match error {
            E::Unauthorized { .. } => Self::stalled(
                reasons::MIXPANEL_CREDENTIALS_REJECTED,
                format!(
                    "{message}; check the service account username and secret in the Mixpanel Secret"
                ),
            ),
            E::Forbidden { .. } => Self::stalled(
                reasons::MIXPANEL_PROJECT_FORBIDDEN,
                format!(
                    "{message}; give the service account access to the project or fix spec.mixpanel.projectId"
                ),
            ),
            E::PaymentRequired { .. } => Self::stalled(reasons::MIXPANEL_PLAN_LACKS_API, message),
            E::RateLimited { .. } => Self::transient(reasons::MIXPANEL_RATE_LIMITED, message),
            E::Rejected { .. } => Self::stalled(reasons::MIXPANEL_REQUEST_REJECTED, message),
            E::SessionExpired { .. } | E::Server { .. } | E::Transport(_) | E::Decode(_) => {
                Self::transient(reasons::MIXPANEL_UNAVAILABLE, message)
            }
        }
    }

    /// Maps a Kameleoon error.
    pub fn kameleoon(error: &kameleoon::Error) -> Self {
        use kameleoon::Error as E;
        let message = crate::failure_chain(error);
        match error {
            E::InvalidClient { .. } | E::Unauthorized { .. } => Self::stalled(
                reasons::KAMELEOON_CREDENTIALS_REJECTED,
                format!(
                    "{message}; check the client id and secret (or API key) in the Kameleoon Secret"
                ),
            ),
            E::RateLimited { .. } => Self::transient(reasons::KAMELEOON_RATE_LIMITED, message),
            E::Forbidden { .. } | E::PayloadTooLarge { .. } | E::Rejected { .. } => {
                Self::stalled(reasons::KAMELEOON_REQUEST_REJECTED, message)
            }
            E::Server { .. } | E::Transport(_) | E::Decode(_) => {
                Self::transient(reasons::KAMELEOON_UNAVAILABLE, message)
            }
        }
    }

    /// Maps a failure to read credentials.
    pub fn credentials(error: &credentials::Error) -> Self {
        let message = crate::failure_chain(error);
        match error {
            credentials::Error::Kube { .. } => Self::transient(error.reason(), message),
            _ => Self::stalled(error.reason(), message),
        }
    }

    /// Maps a failure of the member store.
    pub fn store(error: &store::Error) -> Self {
        Self::transient(reasons::KUBERNETES_API_ERROR, crate::failure_chain(error))
    }

    /// Returns whether the reason is one that needs a person.
    pub fn is_stalling_reason(reason: &str) -> bool {
        !matches!(
            reason,
            reasons::MIXPANEL_RATE_LIMITED
                | reasons::MIXPANEL_UNAVAILABLE
                | reasons::KAMELEOON_RATE_LIMITED
                | reasons::KAMELEOON_UNAVAILABLE
                | reasons::KUBERNETES_API_ERROR
                | reasons::CONNECTION_NOT_READY
                | reasons::PROGRESSING
                | reasons::EXPORT_ABORTED
                | reasons::EXPORTING
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixpanel_errors_map_to_reasons() {
        let cases = [
            (
                mixpanel::Error::Unauthorized {
                    status: 401,
                    message: "bad".into(),
                },
                reasons::MIXPANEL_CREDENTIALS_REJECTED,
                true,
            ),
            (
                mixpanel::Error::Forbidden {
                    project_id: 1,
                    message: "no".into(),
                },
                reasons::MIXPANEL_PROJECT_FORBIDDEN,
                true,
            ),
            (
                mixpanel::Error::PaymentRequired {
                    project_id: 1,
                    message: "plan".into(),
                },
                reasons::MIXPANEL_PLAN_LACKS_API,
                true,
            ),
            (
                mixpanel::Error::RateLimited {
                    retry_after: None,
                    message: "slow".into(),
                },
                reasons::MIXPANEL_RATE_LIMITED,
                false,
            ),
            (
                mixpanel::Error::Server {
                    status: 500,
                    message: "oops".into(),
                },
                reasons::MIXPANEL_UNAVAILABLE,
                false,
            ),
            (
                mixpanel::Error::Rejected {
                    status: 400,
                    message: "bad cohort".into(),
                },
                reasons::MIXPANEL_REQUEST_REJECTED,
                true,
            ),
        ];
        for (error, reason, stalled) in cases {
            let failure = Failure::mixpanel(&error);
            assert_eq!(failure.reason, reason, "{error}");
            assert_eq!(failure.stalled, stalled, "{error}");
            assert_eq!(Failure::is_stalling_reason(reason), stalled, "{reason}");
        }
    }

    #[test]
    fn kameleoon_errors_map_to_reasons() {
        let cases = [
            (
                kameleoon::Error::InvalidClient {
                    status: 401,
                    message: "invalid_client".into(),
                },
                reasons::KAMELEOON_CREDENTIALS_REJECTED,
                true,
            ),
            (
                kameleoon::Error::RateLimited {
                    retry_after: None,
                    message: "".into(),
                },
                reasons::KAMELEOON_RATE_LIMITED,
                false,
            ),
            (
                kameleoon::Error::PayloadTooLarge { bytes: 5 },
                reasons::KAMELEOON_REQUEST_REJECTED,
                true,
            ),
            (
                kameleoon::Error::Server {
                    status: 503,
                    message: "".into(),
                },
                reasons::KAMELEOON_UNAVAILABLE,
                false,
            ),
        ];
        for (error, reason, stalled) in cases {
            let failure = Failure::kameleoon(&error);
            assert_eq!(failure.reason, reason, "{error}");
            assert_eq!(failure.stalled, stalled, "{error}");
        }
    }

    #[test]
    fn credential_messages_point_at_the_secret() {
        let failure = Failure::mixpanel(&mixpanel::Error::Unauthorized {
            status: 401,
            message: "x".into(),
        });
        assert!(failure.message.contains("Mixpanel Secret"));
    }
}
