//! When a CohortSync exports next, computed from its spec and status alone,
//! so that an operator restart neither repeats nor skips an export.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{AttemptResult, CohortSyncStatus, ExportKind, SyncType};

/// Annotation a user sets to a new value to ask for an export now.
pub const SYNC_REQUEST_ANNOTATION: &str = "cohortsync.io/sync-requested-at";

/// Annotation Flux and other GitOps tools set to ask for a reconciliation now.
pub const FLUX_REQUEST_ANNOTATION: &str = "reconcile.fluxcd.io/requestedAt";

/// Everything the decision depends on.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    /// Current time.
    pub now: Timestamp,
    /// OneTime or Dynamic.
    pub sync_type: SyncType,
    /// Dynamic interval.
    pub interval: Duration,
    /// Time between complete exports.
    pub full_export_interval: Duration,
    /// Whether the spec asks for a dry run.
    pub dry_run: bool,
    /// `metadata.generation`.
    pub generation: i64,
    /// Current status.
    pub status: &'a CohortSyncStatus,
    /// Value of [`SYNC_REQUEST_ANNOTATION`].
    pub sync_request: Option<&'a str>,
    /// Value of [`FLUX_REQUEST_ANNOTATION`].
    pub flux_request: Option<&'a str>,
    /// Whether the cohort or the custom data differ from the last export.
    pub target_changed: bool,
    /// Delay before the first retry after a failed attempt.
    pub backoff_base: Duration,
    /// Longest delay between retries.
    pub backoff_max: Duration,
    /// Per-object number that spreads retries of many objects apart.
    pub jitter_seed: u64,
}

/// What to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Export now.
    Export {
        /// Full or differential.
        kind: ExportKind,
        /// Why now.
        cause: Cause,
    },
    /// Nothing to do until the given time, or until something changes.
    Wait {
        /// When to look again.
        until: Option<Timestamp>,
        /// Whether a failed attempt is waiting for its retry.
        retrying: bool,
    },
}

/// Why an export runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// Nothing was exported yet.
    First,
    /// The spec changed what is exported.
    SpecChanged,
    /// A user or a GitOps tool asked for it.
    Requested,
    /// The interval elapsed.
    Interval,
    /// A failed attempt is retried.
    Retry,
}

impl Cause {
    /// Describes the cause for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Cause::First => "first export",
            Cause::SpecChanged => "the spec changed",
            Cause::Requested => "an export was requested",
            Cause::Interval => "the interval elapsed",
            Cause::Retry => "retrying a failed attempt",
        }
    }
}

/// Returns whether an annotation asks for an export the status has not handled.
pub fn is_new_request(annotation: Option<&str>, handled: Option<&str>) -> bool {
    annotation.is_some_and(|value| Some(value) != handled)
}

/// Delay before retry after `failures` failed attempts in a row: doubling
/// from the base up to the maximum, spread by up to a tenth from the seed.
pub fn failure_backoff(failures: i32, base: Duration, max: Duration, seed: u64) -> Duration {
    let exponent = failures.saturating_sub(1).clamp(0, 20) as u32;
    let step = base.saturating_mul(2u32.saturating_pow(exponent)).min(max);
    let spread = (seed % 1000) as f64 / 10_000.0;
    step + step.mul_f64(spread)
}

fn add(time: Timestamp, duration: Duration) -> Timestamp {
    let signed = SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX);
    time.checked_add(signed).unwrap_or(Timestamp::MAX)
}

/// Decides whether to export now, and if not, when to look again.
pub fn decide(inputs: &Inputs<'_>) -> Decision {
    let status = inputs.status;
    let requested = is_new_request(
        inputs.sync_request,
        status.last_handled_sync_request.as_deref(),
    ) || is_new_request(
        inputs.flux_request,
        status.last_handled_reconcile_at.as_deref(),
    );
    let kind = export_kind(inputs);
    let last = status.last_attempt.as_ref();
    let failures = status.consecutive_failures.unwrap_or(0);
    let retry_at = last
        .filter(|a| a.result == AttemptResult::Failed && failures > 0)
        .and_then(|a| a.completion_time.as_ref())
        .map(|t| {
            add(
                t.0,
                failure_backoff(
                    failures,
                    inputs.backoff_base,
                    inputs.backoff_max,
                    inputs.jitter_seed,
                ),
            )
        });

    // A request exports now, unless a failed attempt waits for its retry.
    // The request stays pending until an export for it succeeds. Skipping
    // the backoff would therefore repeat a failing request on every pass.
    if requested {
        return match retry_at {
            Some(retry) if retry > inputs.now => Decision::Wait {
                until: Some(retry),
                retrying: true,
            },
            _ => Decision::Export {
                kind,
                cause: Cause::Requested,
            },
        };
    }

    let (due_at, cause) = match due(inputs) {
        Some(due) => due,
        None => {
            return Decision::Wait {
                until: None,
                retrying: false,
            };
        }
    };
    // A failed attempt is retried after its backoff, unless the regular
    // schedule comes later anyway.
    let (due_at, cause) = match (retry_at, due_at) {
        (Some(retry), Some(regular)) if regular >= retry => (regular, cause),
        (Some(retry), _) => (retry, Cause::Retry),
        (None, regular) => (regular.unwrap_or(inputs.now), cause),
    };
    if inputs.now >= due_at {
        Decision::Export { kind, cause }
    } else {
        Decision::Wait {
            until: Some(due_at),
            retrying: retry_at.is_some(),
        }
    }
}

/// When the next export is due without a request, and why: `None` when no
/// export is due at all (a OneTime sync that is done), a `None` time when it
/// is due at once.
fn due(inputs: &Inputs<'_>) -> Option<(Option<Timestamp>, Cause)> {
    let status = inputs.status;
    let last_planned = status
        .last_attempt
        .as_ref()
        .is_some_and(|a| a.result == AttemptResult::Planned);
    match inputs.sync_type {
        SyncType::OneTime => {
            let handled = if inputs.dry_run {
                status
                    .plan
                    .as_ref()
                    .and_then(|p| p.generation)
                    .is_some_and(|g| g == inputs.generation)
                    && last_planned
            } else {
                status.last_exported_generation == Some(inputs.generation)
            };
            if handled {
                None
            } else if status.last_exported_generation.is_none() && status.plan.is_none() {
                Some((None, Cause::First))
            } else {
                Some((None, Cause::SpecChanged))
            }
        }
        SyncType::Dynamic => {
            if inputs.target_changed
                || (inputs.dry_run != last_planned && status.last_attempt.is_some())
            {
                return Some((None, Cause::SpecChanged));
            }
            let previous = if inputs.dry_run {
                status.plan.as_ref().and_then(|p| p.computed_time.as_ref())
            } else {
                status.last_successful_sync_time.as_ref()
            };
            match previous {
                None => Some((None, Cause::First)),
                Some(time) => Some((Some(add(time.0, inputs.interval)), Cause::Interval)),
            }
        }
    }
}

fn export_kind(inputs: &Inputs<'_>) -> ExportKind {
    if inputs.sync_type == SyncType::OneTime || inputs.target_changed {
        return ExportKind::Full;
    }
    match &inputs.status.last_full_export_time {
        Some(time) if add(time.0, inputs.full_export_interval) > inputs.now => {
            ExportKind::Differential
        }
        _ => ExportKind::Full,
    }
}

/// Returns whether a Dynamic sync's last success is older than twice its interval.
pub fn is_stale(inputs: &Inputs<'_>) -> bool {
    if inputs.sync_type != SyncType::Dynamic || inputs.dry_run {
        return false;
    }
    inputs
        .status
        .last_successful_sync_time
        .as_ref()
        .is_some_and(|t| add(t.0, inputs.interval.saturating_mul(2)) < inputs.now)
}

#[cfg(test)]
mod tests;
