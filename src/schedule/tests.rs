use super::*;
use crate::crd::{ExportPlan, SyncAttempt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

const HOUR: Duration = Duration::from_secs(3600);

fn t(hours: f64) -> Timestamp {
    Timestamp::from_second((hours * 3600.0) as i64 + 1_700_000_000).unwrap()
}

fn inputs(status: &CohortSyncStatus, sync_type: SyncType, now: f64) -> Inputs<'_> {
    Inputs {
        now: t(now),
        sync_type,
        interval: 2 * HOUR,
        full_export_interval: 24 * HOUR,
        dry_run: false,
        generation: 1,
        status,
        sync_request: None,
        flux_request: None,
        target_changed: false,
        backoff_base: Duration::from_secs(30),
        backoff_max: Duration::from_secs(1800),
        jitter_seed: 0,
    }
}

fn succeeded_at(hours: f64, generation: i64) -> CohortSyncStatus {
    CohortSyncStatus {
        last_successful_sync_time: Some(Time(t(hours))),
        last_full_export_time: Some(Time(t(hours))),
        last_exported_generation: Some(generation),
        last_attempt: Some(SyncAttempt {
            start_time: Some(Time(t(hours))),
            completion_time: Some(Time(t(hours))),
            result: AttemptResult::Succeeded,
            ..SyncAttempt::default()
        }),
        ..CohortSyncStatus::default()
    }
}

fn failed_at(mut status: CohortSyncStatus, hours: f64, failures: i32) -> CohortSyncStatus {
    status.last_attempt = Some(SyncAttempt {
        start_time: Some(Time(t(hours))),
        completion_time: Some(Time(t(hours))),
        result: AttemptResult::Failed,
        ..SyncAttempt::default()
    });
    status.consecutive_failures = Some(failures);
    status
}

#[test]
fn first_export_is_immediate_and_full() {
    let status = CohortSyncStatus::default();
    for sync_type in [SyncType::OneTime, SyncType::Dynamic] {
        assert_eq!(
            decide(&inputs(&status, sync_type, 0.0)),
            Decision::Export {
                kind: ExportKind::Full,
                cause: Cause::First
            }
        );
    }
}

#[test]
fn one_time_done_waits_forever() {
    let status = succeeded_at(0.0, 1);
    assert_eq!(
        decide(&inputs(&status, SyncType::OneTime, 100.0)),
        Decision::Wait {
            until: None,
            retrying: false
        }
    );
}

#[test]
fn one_time_exports_again_for_new_generation() {
    let status = succeeded_at(0.0, 1);
    let mut i = inputs(&status, SyncType::OneTime, 1.0);
    i.generation = 2;
    assert!(matches!(
        decide(&i),
        Decision::Export {
            cause: Cause::SpecChanged,
            ..
        }
    ));
}

#[test]
fn dynamic_waits_for_interval_from_last_success() {
    let status = succeeded_at(0.0, 1);
    // Restart half an hour later: the next export stays at 2h, not 2h30.
    assert_eq!(
        decide(&inputs(&status, SyncType::Dynamic, 0.5)),
        Decision::Wait {
            until: Some(t(2.0)),
            retrying: false
        }
    );
    assert_eq!(
        decide(&inputs(&status, SyncType::Dynamic, 2.0)),
        Decision::Export {
            kind: ExportKind::Differential,
            cause: Cause::Interval
        }
    );
}

#[test]
fn dynamic_overdue_exports_once_at_start() {
    let status = succeeded_at(-3.0, 1);
    assert!(matches!(
        decide(&inputs(&status, SyncType::Dynamic, 0.0)),
        Decision::Export {
            cause: Cause::Interval,
            ..
        }
    ));
}

#[test]
fn generation_change_without_target_change_only_reschedules() {
    let status = succeeded_at(0.0, 1);
    let mut i = inputs(&status, SyncType::Dynamic, 1.0);
    i.generation = 2;
    i.interval = 3 * HOUR;
    assert_eq!(
        decide(&i),
        Decision::Wait {
            until: Some(t(3.0)),
            retrying: false
        }
    );
}

#[test]
fn target_change_exports_now_and_full() {
    let status = succeeded_at(0.0, 1);
    let mut i = inputs(&status, SyncType::Dynamic, 1.0);
    i.target_changed = true;
    assert_eq!(
        decide(&i),
        Decision::Export {
            kind: ExportKind::Full,
            cause: Cause::SpecChanged
        }
    );
}

#[test]
fn full_export_once_per_full_interval() {
    let mut status = succeeded_at(0.0, 1);
    status.last_full_export_time = Some(Time(t(-23.0)));
    assert!(matches!(
        decide(&inputs(&status, SyncType::Dynamic, 2.0)),
        Decision::Export {
            kind: ExportKind::Full,
            ..
        }
    ));
}

#[test]
fn requests_export_once_per_new_value() {
    let mut status = succeeded_at(0.0, 1);
    let mut i = inputs(&status, SyncType::OneTime, 1.0);
    i.sync_request = Some("2026-12-04T10:00:00Z");
    assert!(matches!(
        decide(&i),
        Decision::Export {
            cause: Cause::Requested,
            ..
        }
    ));
    status.last_handled_sync_request = Some("2026-12-04T10:00:00Z".into());
    let mut i = inputs(&status, SyncType::OneTime, 1.0);
    i.sync_request = Some("2026-12-04T10:00:00Z");
    assert!(matches!(decide(&i), Decision::Wait { .. }));
    i.flux_request = Some("now");
    assert!(matches!(
        decide(&i),
        Decision::Export {
            cause: Cause::Requested,
            ..
        }
    ));
}

#[test]
fn failure_is_retried_with_backoff() {
    let status = failed_at(CohortSyncStatus::default(), 0.0, 1);
    let waiting = decide(&inputs(&status, SyncType::OneTime, 0.0));
    assert_eq!(
        waiting,
        Decision::Wait {
            until: Some(Timestamp::from_second(t(0.0).as_second() + 30).unwrap()),
            retrying: true
        }
    );
    assert!(matches!(
        decide(&inputs(&status, SyncType::OneTime, 0.01)),
        Decision::Export {
            cause: Cause::Retry,
            ..
        }
    ));
}

#[test]
fn dynamic_failure_retries_before_next_interval() {
    let status = failed_at(succeeded_at(-2.0, 1), 0.0, 3);
    let d = decide(&inputs(&status, SyncType::Dynamic, 0.0));
    // Third failure: 30 s doubled twice.
    assert_eq!(
        d,
        Decision::Wait {
            until: Some(Timestamp::from_second(t(0.0).as_second() + 120).unwrap()),
            retrying: true
        }
    );
}

#[test]
fn backoff_doubles_to_max_with_bounded_spread() {
    let base = Duration::from_secs(30);
    let max = Duration::from_secs(1800);
    assert_eq!(failure_backoff(1, base, max, 0), base);
    assert_eq!(failure_backoff(2, base, max, 0), 2 * base);
    assert_eq!(failure_backoff(50, base, max, 0), max);
    let spread = failure_backoff(1, base, max, 999);
    assert!(spread > base && spread <= base + base / 10);
}

#[test]
fn dry_run_toggle_recomputes() {
    let status = succeeded_at(0.0, 1);
    let mut i = inputs(&status, SyncType::Dynamic, 0.5);
    i.dry_run = true;
    assert!(matches!(
        decide(&i),
        Decision::Export {
            cause: Cause::SpecChanged,
            ..
        }
    ));

    let mut planned = succeeded_at(0.0, 1);
    planned.last_attempt.as_mut().unwrap().result = AttemptResult::Planned;
    planned.plan = Some(ExportPlan {
        computed_time: Some(Time(t(0.0))),
        generation: Some(1),
        ..ExportPlan::default()
    });
    let i = inputs(&planned, SyncType::Dynamic, 0.5);
    assert!(matches!(
        decide(&i),
        Decision::Export {
            cause: Cause::SpecChanged,
            ..
        }
    ));
}

#[test]
fn one_time_dry_run_plans_once_per_generation() {
    let planned = CohortSyncStatus {
        last_attempt: Some(SyncAttempt {
            result: AttemptResult::Planned,
            ..SyncAttempt::default()
        }),
        plan: Some(ExportPlan {
            computed_time: Some(Time(t(0.0))),
            generation: Some(1),
            ..ExportPlan::default()
        }),
        ..CohortSyncStatus::default()
    };
    let mut i = inputs(&planned, SyncType::OneTime, 5.0);
    i.dry_run = true;
    assert!(matches!(decide(&i), Decision::Wait { until: None, .. }));
    i.dry_run = false;
    assert!(matches!(decide(&i), Decision::Export { .. }));
}

#[test]
fn staleness_needs_twice_the_interval() {
    let status = succeeded_at(0.0, 1);
    assert!(!is_stale(&inputs(&status, SyncType::Dynamic, 3.9)));
    assert!(is_stale(&inputs(&status, SyncType::Dynamic, 4.1)));
    assert!(!is_stale(&inputs(&status, SyncType::OneTime, 100.0)));
}

#[test]
fn failed_request_waits_for_backoff() {
    let status = failed_at(succeeded_at(-1.0, 1), 0.0, 2);
    let mut i = inputs(&status, SyncType::OneTime, 0.0);
    i.sync_request = Some("again");
    assert!(matches!(decide(&i), Decision::Wait { retrying: true, .. }));
    let mut i = inputs(&status, SyncType::OneTime, 0.1);
    i.sync_request = Some("again");
    assert!(matches!(
        decide(&i),
        Decision::Export {
            cause: Cause::Requested,
            ..
        }
    ));
}
