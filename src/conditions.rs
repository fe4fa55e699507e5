//! Condition types, reasons and the kstatus rules that tie them together.
//!
//! Both kinds report `Ready`, `Reconciling` and `Stalled` as kstatus reads
//! them: `Ready` is always present, `Reconciling` only while work is in
//! flight, and `Stalled` only while progress needs a change from a person.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types.
pub mod types {
    /// The resource reached its desired state.
    pub const READY: &str = "Ready";
    /// The controller is working towards the desired state.
    pub const RECONCILING: &str = "Reconciling";
    /// The controller cannot make progress until something changes.
    pub const STALLED: &str = "Stalled";
    /// Both services accepted the connection's credentials.
    pub const CONNECTED: &str = "Connected";
}

/// Condition reasons, in CamelCase as Kubernetes conventions ask.
pub mod reasons {
    /// The credentials work and the site exists.
    pub const CONNECTED: &str = "Connected";
    /// The controller has not finished its first check.
    pub const PROGRESSING: &str = "Progressing";
    /// The last export succeeded and the next one is scheduled or not needed.
    pub const SUCCEEDED: &str = "Succeeded";
    /// An export is running.
    pub const EXPORTING: &str = "Exporting";
    /// An export stopped before it finished (shutdown, spec change,
    /// deletion); it runs again from the start.
    pub const EXPORT_ABORTED: &str = "ExportAborted";
    /// A dry run computed the export.
    pub const PLANNED: &str = "Planned";
    /// The resource is suspended.
    pub const SUSPENDED: &str = "Suspended";
    /// The last successful export of a Dynamic sync is older than twice its interval.
    pub const STALE: &str = "Stale";
    /// Deletion waits until the exported data is cleared.
    pub const CLEANUP_PENDING: &str = "CleanupPending";
    /// A referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// A referenced Secret lacks a key, or the key is empty.
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// A Secret value cannot be used (for example an API key that is not base64 JSON).
    pub const SECRET_INVALID: &str = "SecretInvalid";
    /// Kameleoon rejected the client id or secret.
    pub const KAMELEOON_CREDENTIALS_REJECTED: &str = "KameleoonCredentialsRejected";
    /// The credentials cannot see the site code.
    pub const KAMELEOON_SITE_NOT_FOUND: &str = "KameleoonSiteNotFound";
    /// `matchBy: MappingIdentifier`, but the site has no custom data marked
    /// as its cross-device mapping identifier.
    pub const KAMELEOON_MAPPING_IDENTIFIER_MISSING: &str = "KameleoonMappingIdentifierMissing";
    /// Kameleoon cannot be reached or answers with server errors.
    pub const KAMELEOON_UNAVAILABLE: &str = "KameleoonUnavailable";
    /// Kameleoon answered 429.
    pub const KAMELEOON_RATE_LIMITED: &str = "KameleoonRateLimited";
    /// Kameleoon refused a request for a reason a retry does not fix.
    pub const KAMELEOON_REQUEST_REJECTED: &str = "KameleoonRequestRejected";
    /// Mixpanel rejected the service account.
    pub const MIXPANEL_CREDENTIALS_REJECTED: &str = "MixpanelCredentialsRejected";
    /// The service account has no access to the project, or the project does not exist.
    pub const MIXPANEL_PROJECT_FORBIDDEN: &str = "MixpanelProjectForbidden";
    /// The Mixpanel plan does not include Query API access.
    pub const MIXPANEL_PLAN_LACKS_API: &str = "MixpanelPlanLacksApiAccess";
    /// Mixpanel cannot be reached or answers with server errors.
    pub const MIXPANEL_UNAVAILABLE: &str = "MixpanelUnavailable";
    /// Mixpanel answered 429, or the operator waits for the project's query budget.
    pub const MIXPANEL_RATE_LIMITED: &str = "MixpanelRateLimited";
    /// Mixpanel refused a request for a reason a retry does not fix.
    pub const MIXPANEL_REQUEST_REJECTED: &str = "MixpanelRequestRejected";
    /// The referenced KameleoonConnection does not exist.
    pub const CONNECTION_NOT_FOUND: &str = "ConnectionNotFound";
    /// The referenced KameleoonConnection is not Connected.
    pub const CONNECTION_NOT_READY: &str = "ConnectionNotReady";
    /// No cohort of the project has the id or name.
    pub const COHORT_NOT_FOUND: &str = "CohortNotFound";
    /// Several cohorts of the project have the name.
    pub const COHORT_AMBIGUOUS: &str = "CohortAmbiguous";
    /// Mixpanel lists the cohort but refuses to return its members.
    pub const COHORT_UNAVAILABLE: &str = "CohortUnavailable";
    /// An older CohortSync already exports to the same custom data.
    pub const CUSTOM_DATA_CONFLICT: &str = "CustomDataConflict";
    /// The custom data of that name exists with another format or scope.
    pub const CUSTOM_DATA_INCOMPATIBLE: &str = "CustomDataIncompatible";
    /// The spec holds a value the controller cannot use.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The Kubernetes API refused or failed a request.
    pub const KUBERNETES_API_ERROR: &str = "KubernetesApiError";
}

/// Status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller does not know yet.
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Sets a condition in a list, keeping `lastTransitionTime` unless the status
/// changes, as the Kubernetes API conventions ask.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let message = message.into();
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        if existing.status != status.as_str() {
            existing.last_transition_time = Time(now);
        }
        existing.status = status.as_str().to_string();
        existing.reason = reason.to_string();
        existing.message = message;
        existing.observed_generation = generation;
        return;
    }
    conditions.push(Condition {
        type_: type_.to_string(),
        status: status.as_str().to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    });
}

/// Removes a condition from a list.
pub fn remove(conditions: &mut Vec<Condition>, type_: &str) {
    conditions.retain(|c| c.type_ != type_);
}

/// Returns a condition of a list by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Returns whether a condition is present with status True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find(conditions, type_).is_some_and(|c| c.status == "True")
}

/// The kstatus summary of one reconciliation, applied to `Ready`,
/// `Reconciling` and `Stalled` at once so that they never contradict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Summary {
    /// Desired state reached.
    Ready {
        reason: &'static str,
        message: String,
    },
    /// Work in flight or a retry scheduled; `ready` keeps or sets `Ready`.
    Reconciling {
        ready: Status,
        reason: &'static str,
        message: String,
    },
    /// Progress needs a change from a person.
    Stalled {
        reason: &'static str,
        message: String,
    },
}

impl Summary {
    /// Writes the summary into a condition list.
    pub fn apply(&self, conditions: &mut Vec<Condition>, generation: Option<i64>, now: Timestamp) {
        match self {
            Summary::Ready { reason, message } => {
                set(
                    conditions,
                    types::READY,
                    Status::True,
                    reason,
                    message.clone(),
                    generation,
                    now,
                );
                remove(conditions, types::RECONCILING);
                remove(conditions, types::STALLED);
            }
            Summary::Reconciling {
                ready,
                reason,
                message,
            } => {
                set(
                    conditions,
                    types::READY,
                    *ready,
                    reason,
                    message.clone(),
                    generation,
                    now,
                );
                set(
                    conditions,
                    types::RECONCILING,
                    Status::True,
                    reason,
                    message.clone(),
                    generation,
                    now,
                );
                remove(conditions, types::STALLED);
            }
            Summary::Stalled { reason, message } => {
                set(
                    conditions,
                    types::READY,
                    Status::False,
                    reason,
                    message.clone(),
                    generation,
                    now,
                );
                set(
                    conditions,
                    types::STALLED,
                    Status::True,
                    reason,
                    message.clone(),
                    generation,
                    now,
                );
                remove(conditions, types::RECONCILING);
            }
        }
    }
}

/// Compares two condition lists, ignoring `lastTransitionTime`, to decide
/// whether a status write would change anything.
pub fn same_meaning(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().all(|x| {
            b.iter().any(|y| {
                x.type_ == y.type_
                    && x.status == y.status
                    && x.reason == y.reason
                    && x.message == y.message
                    && x.observed_generation == y.observed_generation
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    #[test]
    fn set_keeps_transition_time_when_status_unchanged() {
        let mut list = Vec::new();
        set(
            &mut list,
            "Ready",
            Status::True,
            "A",
            "first",
            Some(1),
            at(10),
        );
        set(
            &mut list,
            "Ready",
            Status::True,
            "B",
            "second",
            Some(2),
            at(20),
        );
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].last_transition_time, Time(at(10)));
        assert_eq!(list[0].reason, "B");
        assert_eq!(list[0].observed_generation, Some(2));
    }

    #[test]
    fn set_moves_transition_time_when_status_changes() {
        let mut list = Vec::new();
        set(&mut list, "Ready", Status::True, "A", "", Some(1), at(10));
        set(&mut list, "Ready", Status::False, "B", "", Some(1), at(20));
        assert_eq!(list[0].last_transition_time, Time(at(20)));
        assert_eq!(list[0].status, "False");
    }

    #[test]
    fn summary_ready_clears_reconciling_and_stalled() {
        let mut list = Vec::new();
        Summary::Stalled {
            reason: reasons::COHORT_NOT_FOUND,
            message: "no cohort 5".into(),
        }
        .apply(&mut list, Some(1), at(1));
        assert!(is_true(&list, types::STALLED));
        Summary::Ready {
            reason: reasons::SUCCEEDED,
            message: "done".into(),
        }
        .apply(&mut list, Some(1), at(2));
        assert!(is_true(&list, types::READY));
        assert!(find(&list, types::STALLED).is_none());
        assert!(find(&list, types::RECONCILING).is_none());
    }

    #[test]
    fn summary_reconciling_keeps_given_ready_status() {
        let mut list = Vec::new();
        Summary::Reconciling {
            ready: Status::Unknown,
            reason: reasons::PROGRESSING,
            message: "starting".into(),
        }
        .apply(&mut list, Some(3), at(1));
        assert_eq!(find(&list, types::READY).unwrap().status, "Unknown");
        assert!(is_true(&list, types::RECONCILING));
        assert!(find(&list, types::STALLED).is_none());
    }

    #[test]
    fn summary_stalled_sets_ready_false_and_drops_reconciling() {
        let mut list = Vec::new();
        Summary::Reconciling {
            ready: Status::Unknown,
            reason: reasons::EXPORTING,
            message: String::new(),
        }
        .apply(&mut list, Some(1), at(1));
        Summary::Stalled {
            reason: reasons::INVALID_SPEC,
            message: "bad".into(),
        }
        .apply(&mut list, Some(1), at(2));
        assert_eq!(find(&list, types::READY).unwrap().status, "False");
        assert!(find(&list, types::RECONCILING).is_none());
    }

    #[test]
    fn same_meaning_ignores_transition_time_only() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        set(&mut a, "Ready", Status::True, "A", "m", Some(1), at(1));
        set(&mut b, "Ready", Status::True, "A", "m", Some(1), at(5));
        assert!(same_meaning(&a, &b));
        set(&mut b, "Ready", Status::True, "A", "other", Some(1), at(5));
        assert!(!same_meaning(&a, &b));
    }
}
