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
    /// Stalled attempts are still retried with the usual exponential
    /// backoff, because the fix may happen outside the cluster.
    pub stalled: bool,
}

/// Placeholders in credential messages, replaced by the Secret's name.
const MIXPANEL_SECRET: &str = "the Mixpanel Secret";
const KAMELEOON_SECRET: &str = "the Kameleoon Secret";

impl Failure {
    /// Names the connection's Secrets in place of "the Mixpanel Secret" and
    /// "the Kameleoon Secret", which the error mappings write without
    /// knowing the connection.
    pub fn naming_secrets(mut self, connection: &crate::crd::KameleoonConnection) -> Self {
        use kube::ResourceExt;
        let namespace = connection.namespace().unwrap_or_default();
        let spec = &connection.spec;
        self.message = self
            .message
            .replace(
                MIXPANEL_SECRET,
                &format!(
                    "Mixpanel Secret {namespace}/{}",
                    spec.mixpanel.credentials_secret_ref.name
                ),
            )
            .replace(
                KAMELEOON_SECRET,
                &format!(
                    "Kameleoon Secret {namespace}/{}",
                    spec.kameleoon.credentials_secret_ref.name
                ),
            );
        self
    }

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
                    "{message}; check the service account username and secret in {MIXPANEL_SECRET}"
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

    /// Maps a failure to read a cohort's members. Mixpanel returns a client
    /// error both for a deleted cohort (400 "cohort N not found") and for a
    /// cohort it cannot query (404 "Missing Datagroup" for a cohort tied to a
    /// deleted data group). A fresh cohort list tells them apart: `listed`
    /// says whether the cohort is still in it.
    pub fn cohort_members(
        error: &mixpanel::Error,
        cohort: &mixpanel::Cohort,
        listed: bool,
    ) -> Self {
        let mixpanel::Error::Rejected { status, message } = error else {
            return Self::mixpanel(error);
        };
        if listed {
            Self::stalled(
                reasons::COHORT_UNAVAILABLE,
                format!(
                    "Mixpanel lists cohort {} ({:?}) but refused to return its members (HTTP {status}): {message}; \
                     fix the cohort in Mixpanel or choose another one in spec.cohort",
                    cohort.id, cohort.name
                ),
            )
        } else {
            Self::stalled(
                reasons::COHORT_NOT_FOUND,
                format!(
                    "Mixpanel cohort {} ({:?}) no longer exists (HTTP {status}: {message}); the members exported \
                     before keep their value in Kameleoon: restore the cohort or change spec.cohort",
                    cohort.id, cohort.name
                ),
            )
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
                    "{message}; check the client id and secret (or API key) in {KAMELEOON_SECRET}"
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
    fn cohort_read_errors_tell_deleted_from_unavailable() {
        let cohort = mixpanel::Cohort {
            id: 1301,
            name: "Promo".into(),
            count: Some(3),
        };
        let deleted = mixpanel::Error::Rejected {
            status: 400,
            message: "cohort 1301 not found".into(),
        };
        let not_found = Failure::cohort_members(&deleted, &cohort, false);
        assert_eq!(not_found.reason, reasons::COHORT_NOT_FOUND);
        assert!(not_found.stalled);
        assert!(not_found.message.contains("1301"), "{}", not_found.message);

        let missing_group = mixpanel::Error::Rejected {
            status: 404,
            message: "Missing Datagroup for cohort 1301".into(),
        };
        let unavailable = Failure::cohort_members(&missing_group, &cohort, true);
        assert_eq!(unavailable.reason, reasons::COHORT_UNAVAILABLE);
        assert!(unavailable.stalled);
        assert!(
            unavailable
                .message
                .contains("Missing Datagroup for cohort 1301"),
            "{}",
            unavailable.message
        );
    }

    #[test]
    fn cohort_read_keeps_mapping_of_other_errors() {
        let cohort = mixpanel::Cohort {
            id: 7,
            name: "Any".into(),
            count: None,
        };
        let cases = [
            mixpanel::Error::RateLimited {
                retry_after: None,
                message: "slow".into(),
            },
            mixpanel::Error::Server {
                status: 502,
                message: "bad gateway".into(),
            },
            mixpanel::Error::Unauthorized {
                status: 401,
                message: "bad".into(),
            },
        ];
        for error in cases {
            for listed in [true, false] {
                assert_eq!(
                    Failure::cohort_members(&error, &cohort, listed),
                    Failure::mixpanel(&error),
                    "{error}"
                );
            }
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
