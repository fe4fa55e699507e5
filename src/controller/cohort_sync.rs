//! CohortSync controller: decides when to export, runs the export, and keeps
//! status, Events and the finalizer in step with it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use super::export::{self, Job, Report};
use super::failure::Failure;
use super::progress::{self, Tracker};
use super::{Error, FIELD_MANAGER, Scope, lookup, project_key};
use crate::conditions::{self, Status, Summary, reasons, types};
use crate::crd::{
    AttemptResult, CohortSync, CohortSyncStatus, DeletionPolicy, ExportKind, ExportPlan,
    KameleoonConnection, SyncAttempt, SyncType,
};
use crate::metrics::{ControllerLabels, ErrorLabels, ExportLabels, SyncLabels};
use crate::schedule::{self, Decision};
use crate::store::MemberStore;

/// Finalizer that holds deletion until exported data is cleared
/// (`deletionPolicy: Clear`).
pub const FINALIZER: &str = "cohortsync.io/clear-exported-data";

/// Annotation that lets deletion finish without clearing Kameleoon, for an
/// admin whose connection is gone for good.
pub const SKIP_CLEANUP_ANNOTATION: &str = "cohortsync.io/skip-cleanup";

/// Maps a connection to the syncs of its namespace that use it.
pub fn using_connection(
    syncs: &Store<CohortSync>,
    connection: &KameleoonConnection,
) -> Vec<ObjectRef<CohortSync>> {
    let namespace = connection.namespace();
    let name = connection.name_any();
    syncs
        .state()
        .iter()
        .filter(|s| s.namespace() == namespace && s.spec.connection_ref.name == name)
        .map(|s| ObjectRef::from_obj(s.as_ref()))
        .collect()
}

/// One reconciliation of one sync.
struct Run<'a> {
    scope: &'a Scope,
    sync: &'a CohortSync,
    api: Api<CohortSync>,
    namespace: String,
    name: String,
    uid: String,
    generation: Option<i64>,
}

/// Reconciles one sync.
pub async fn reconcile(sync: Arc<CohortSync>, scope: Arc<Scope>) -> Result<Action, Error> {
    // Until the connection cache holds its first list, a missing connection
    // could be reported for one that exists.
    if scope
        .connections_ready
        .clone()
        .wait_for(|listed| *listed)
        .await
        .is_err()
    {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    scope
        .shared
        .metrics
        .reconciliations
        .get_or_create(&ControllerLabels {
            controller: "cohortsync",
        })
        .inc();
    let namespace = sync.namespace().unwrap_or_default();
    let run = Run {
        scope: &scope,
        sync: &sync,
        api: Api::namespaced(scope.shared.client.clone(), &namespace),
        name: sync.name_any(),
        uid: sync.uid().unwrap_or_default(),
        generation: sync.meta().generation,
        namespace,
    };
    if sync.meta().deletion_timestamp.is_some() {
        return run.cleanup().await;
    }
    run.ensure_finalizer().await?;
    run.apply().await
}

impl Run<'_> {
    /// The status to build on: the one this process last wrote, when the
    /// watch cache has not caught up with it yet.
    fn current_status(&self) -> CohortSyncStatus {
        let cached = self.sync.status.clone().unwrap_or_default();
        let intended = self
            .scope
            .shared
            .intended
            .lock()
            .expect("intended status lock");
        match intended.get(&self.uid) {
            Some(mine) if started(mine) >= started(&cached) => mine.clone(),
            _ => cached,
        }
    }

    async fn write_status(&self, status: &CohortSyncStatus) -> Result<(), Error> {
        // The cache already shows this status: nothing to write, and
        // nothing to remember in its place.
        if self.sync.status.as_ref() == Some(status) {
            self.scope
                .shared
                .intended
                .lock()
                .expect("intended status lock")
                .remove(&self.uid);
            return Ok(());
        }
        self.scope
            .shared
            .intended
            .lock()
            .expect("intended status lock")
            .insert(self.uid.clone(), status.clone());
        let patch = serde_json::json!({
            "apiVersion": "cohortsync.io/v1alpha1",
            "kind": "CohortSync",
            "status": status,
        });
        self.api
            .patch_status(
                &self.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await
            .map_err(|source| {
                tracing::error!(error = %source, "Failed to write CohortSync status");
                Error::Kube {
                    action: "writing CohortSync status",
                    source,
                }
            })?;
        Ok(())
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.scope
            .shared
            .event(self.sync, type_, reason, "Export", note)
            .await;
    }

    /// Replaces the finalizers. The `test` operation of the JSON patch fails
    /// the write when someone else changed the list since the object was
    /// read. A status or label change in between does not fail it, as a
    /// resourceVersion precondition would.
    async fn set_finalizers(&self, finalizers: Vec<String>) -> Result<(), Error> {
        let operations = match &self.sync.meta().finalizers {
            None => serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": finalizers},
            ]),
            Some(current) => serde_json::json!([
                {"op": "test", "path": "/metadata/finalizers", "value": current},
                {"op": "replace", "path": "/metadata/finalizers", "value": finalizers},
            ]),
        };
        let patch = Patch::<()>::Json(
            serde_json::from_value(operations).expect("a JSON patch built from literals parses"),
        );
        self.api
            .patch(&self.name, &PatchParams::default(), &patch)
            .await
            .map_err(|source| Error::Kube {
                action: "updating CohortSync finalizers",
                source,
            })?;
        Ok(())
    }

    /// Adds the finalizer for `deletionPolicy: Clear` and removes it for `Retain`.
    async fn ensure_finalizer(&self) -> Result<(), Error> {
        let has = self.sync.finalizers().iter().any(|f| f == FINALIZER);
        let wants = self.sync.spec.deletion_policy == DeletionPolicy::Clear;
        if has == wants {
            return Ok(());
        }
        let mut finalizers: Vec<String> = self
            .sync
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if wants {
            finalizers.push(FINALIZER.to_string());
        }
        self.set_finalizers(finalizers).await
    }

    async fn release(&self) -> Result<Action, Error> {
        let finalizers = self
            .sync
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        self.set_finalizers(finalizers).await?;
        self.scope
            .shared
            .intended
            .lock()
            .expect("intended status lock")
            .remove(&self.uid);
        Ok(Action::await_change())
    }

    async fn apply(&self) -> Result<Action, Error> {
        let shared = &self.scope.shared;
        let spec = &self.sync.spec;
        let now = Timestamp::now();
        let mut status = self.current_status();
        // A new spec gets an attempt of its own at once, not the backoff
        // that the failures of the previous spec built up.
        if status.observed_generation != self.generation {
            status.consecutive_failures = None;
        }

        let durations = spec
            .interval()
            .and_then(|i| spec.full_export_interval().map(|f| (i, f)));
        let (interval, full_interval) = match durations {
            Ok((interval, full)) => (shared.config.interval_override.unwrap_or(interval), full),
            Err(error) => {
                let failure = Failure::stalled(reasons::INVALID_SPEC, error.to_string());
                return self.settle_blocked(status, &failure, now).await;
            }
        };

        if spec.suspend {
            let ready = conditions::find(&status.conditions, types::READY)
                .map(|c| match c.status.as_str() {
                    "True" => Status::True,
                    "False" => Status::False,
                    _ => Status::Unknown,
                })
                .unwrap_or(Status::Unknown);
            let message = match &status.last_successful_sync_time {
                Some(t) => format!(
                    "Suspended: no exports are scheduled; last successful export at {}",
                    format_time(&t.0)
                ),
                None => "Suspended: no exports are scheduled".to_string(),
            };
            conditions::set(
                &mut status.conditions,
                types::READY,
                ready,
                reasons::SUSPENDED,
                message,
                self.generation,
                now,
            );
            conditions::remove(&mut status.conditions, types::RECONCILING);
            conditions::remove(&mut status.conditions, types::STALLED);
            status.next_sync_time = None;
            status.observed_generation = self.generation;
            self.write_status(&status).await?;
            tracing::debug!(
                next_export = "none",
                reason = reasons::SUSPENDED,
                "Sync reconciled"
            );
            return Ok(Action::await_change());
        }

        let connection_name = &spec.connection_ref.name;
        let Some(connection) = lookup(&self.scope.connections, &self.namespace, connection_name)
        else {
            let failure = Failure::stalled(
                reasons::CONNECTION_NOT_FOUND,
                format!(
                    "KameleoonConnection {}/{connection_name} does not exist: create it or fix spec.connectionRef.name",
                    self.namespace
                ),
            );
            return self.settle_blocked(status, &failure, now).await;
        };
        if let Some(failure) = connection_problem(&connection) {
            return self.settle_blocked(status, &failure, now).await;
        }

        let sync_request = self
            .sync
            .annotations()
            .get(schedule::SYNC_REQUEST_ANNOTATION)
            .cloned();
        let flux_request = self
            .sync
            .annotations()
            .get(schedule::FLUX_REQUEST_ANNOTATION)
            .cloned();
        let inputs = |status: &CohortSyncStatus, now: Timestamp| -> (Decision, bool) {
            let inputs = schedule::Inputs {
                now,
                sync_type: spec.sync_type,
                interval,
                full_export_interval: full_interval,
                dry_run: spec.dry_run,
                generation: self.generation.unwrap_or(0),
                status,
                sync_request: sync_request.as_deref(),
                flux_request: flux_request.as_deref(),
                target_changed: target_changed(self.sync, status),
                backoff_base: shared.config.failure_backoff_base,
                backoff_max: shared.config.failure_backoff_max,
                jitter_seed: seed(&self.uid),
            };
            (schedule::decide(&inputs), schedule::is_stale(&inputs))
        };

        let (decision, _) = inputs(&status, now);
        if let Decision::Export { kind, cause } = decision {
            status = self
                .export(
                    &connection,
                    status,
                    kind,
                    cause,
                    sync_request.as_deref(),
                    flux_request.as_deref(),
                )
                .await?;
        }
        let now = Timestamp::now();
        let (decision, stale) = inputs(&status, now);
        let (until, retrying) = match decision {
            // An aborted export starts again at once, on the next pass.
            Decision::Export { .. } => (Some(now), false),
            Decision::Wait { until, retrying } => (until, retrying),
        };
        status.next_sync_time = until.map(Time);
        status.observed_generation = self.generation;
        settled_summary(&status, spec.sync_type, stale, retrying, interval).apply(
            &mut status.conditions,
            self.generation,
            now,
        );
        self.write_status(&status).await?;

        // Look again when the next export is due, or when the last success
        // turns stale.
        let stale_at = status
            .last_successful_sync_time
            .as_ref()
            .filter(|_| spec.sync_type == SyncType::Dynamic && !stale)
            .map(|t| t.0 + interval.saturating_mul(2) + Duration::from_secs(1));
        let wake = [until, stale_at].into_iter().flatten().min();
        tracing::debug!(
            next_export = until
                .map(|t| format_time(&t))
                .unwrap_or_else(|| "none".into()),
            "Sync reconciled"
        );
        Ok(match wake {
            Some(at) => Action::requeue(until_from(now, at)),
            None => Action::await_change(),
        })
    }

    /// Writes the status of a sync that cannot export now for a reason
    /// outside the export itself (spec, connection).
    async fn settle_blocked(
        &self,
        mut status: CohortSyncStatus,
        failure: &Failure,
        now: Timestamp,
    ) -> Result<Action, Error> {
        let summary = if failure.stalled {
            Summary::Stalled {
                reason: failure.reason,
                message: failure.message.clone(),
            }
        } else {
            Summary::Reconciling {
                ready: Status::False,
                reason: failure.reason,
                message: failure.message.clone(),
            }
        };
        let before = conditions::find(&status.conditions, types::READY).map(|c| c.reason.clone());
        summary.apply(&mut status.conditions, self.generation, now);
        status.observed_generation = self.generation;
        self.write_status(&status).await?;
        // One Event when the sync becomes blocked for this reason, not one
        // per pass while it stays blocked.
        if before.as_deref() != Some(failure.reason) {
            self.event(EventType::Warning, failure.reason, failure.message.clone())
                .await;
        }
        tracing::debug!(
            next_export = "none",
            reason = failure.reason,
            "Sync reconciled"
        );
        // The connection watch and spec edits trigger the next
        // reconciliation; the delay is a safety net.
        Ok(Action::requeue(Duration::from_secs(300)))
    }

    async fn export(
        &self,
        connection: &KameleoonConnection,
        mut status: CohortSyncStatus,
        kind: ExportKind,
        cause: schedule::Cause,
        sync_request: Option<&str>,
        flux_request: Option<&str>,
    ) -> Result<CohortSyncStatus, Error> {
        let shared = &self.scope.shared;
        let key = project_key(connection);
        let slots = shared.export_slots(key);
        let _slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let mut waiting = status.clone();
                Summary::Reconciling {
                    ready: ready_status(&status),
                    reason: reasons::MIXPANEL_RATE_LIMITED,
                    message: format!(
                        "Waiting for an export slot: {} exports of Mixpanel project {} run at a time",
                        shared.config.exports_per_project, key.project_id
                    ),
                }
                .apply(&mut waiting.conditions, self.generation, Timestamp::now());
                self.write_status(&waiting).await?;
                slots
                    .acquire_owned()
                    .await
                    .expect("export slots are never closed")
            }
        };

        let started = Timestamp::now();
        let new_generation = status.observed_generation != self.generation;
        status.last_attempt = Some(SyncAttempt {
            start_time: Some(Time(started)),
            completion_time: None,
            result: AttemptResult::Running,
            kind: Some(kind),
            ..SyncAttempt::default()
        });
        status.progress = Some(Default::default());
        let ready = if new_generation || status.last_successful_sync_time.is_none() {
            Status::Unknown
        } else {
            ready_status(&status)
        };
        tracing::info!(cause = cause.describe(), kind = ?kind, "Export started");
        Summary::Reconciling {
            ready,
            reason: if new_generation {
                reasons::PROGRESSING
            } else {
                reasons::EXPORTING
            },
            message: format!("Export started: {}", cause.describe()),
        }
        .apply(&mut status.conditions, self.generation, started);
        self.write_status(&status).await?;

        let tracker = Tracker::default();
        tracker.start(started);
        let job = Job {
            scope: self.scope,
            sync: self.sync,
            connection,
            kind,
            tracker: &tracker,
            abortable: true,
        };
        let outcome = {
            let work = job.run();
            tokio::pin!(work);
            let mut written = 0;
            loop {
                tokio::select! {
                    outcome = &mut work => break outcome,
                    _ = tokio::time::sleep(shared.config.progress_interval) => {
                        let view = tracker.view();
                        if view.version != written {
                            written = view.version;
                            let mut running = status.clone();
                            running.progress = Some(view.progress.clone());
                            let (reason, ready) = match &view.waiting {
                                Some((reason, _)) => (*reason, ready),
                                None => (if new_generation { reasons::PROGRESSING } else { reasons::EXPORTING }, ready),
                            };
                            Summary::Reconciling { ready, reason, message: progress::describe(&view) }
                                .apply(&mut running.conditions, self.generation, Timestamp::now());
                            if let Err(error) = self.write_status(&running).await {
                                tracing::warn!(error = %crate::failure_chain(&error), "Failed to write export progress");
                            }
                        }
                    }
                }
            }
        };
        let finished = Timestamp::now();
        let seconds = finished.duration_since(started).as_secs_f64();
        status.progress = None;
        let attempt = status.last_attempt.as_mut().expect("set above");
        attempt.completion_time = Some(Time(finished));
        match outcome {
            Ok(report) => {
                // A request counts as handled once an export for it finished;
                // one cut short by a crash or shutdown runs again.
                if let Some(request) = sync_request {
                    status.last_handled_sync_request = Some(request.to_string());
                }
                if let Some(request) = flux_request {
                    status.last_handled_reconcile_at = Some(request.to_string());
                }
                self.record_success(&mut status, &report, finished, seconds)
                    .await;
            }
            Err(failure) => {
                let failure = failure.naming_secrets(connection);
                attempt.result = AttemptResult::Failed;
                attempt.reason = Some(failure.reason.to_string());
                attempt.message = Some(failure.message.clone());
                if failure.reason != reasons::EXPORT_ABORTED {
                    status.consecutive_failures =
                        Some(status.consecutive_failures.unwrap_or(0) + 1);
                }
                if matches!(
                    failure.reason,
                    reasons::KAMELEOON_CREDENTIALS_REJECTED
                        | reasons::MIXPANEL_CREDENTIALS_REJECTED
                ) {
                    self.scope.revalidate(connection);
                }
                shared
                    .metrics
                    .export_duration
                    .get_or_create(&ExportLabels {
                        result: "failed",
                        kind: kind_label(kind),
                    })
                    .observe(seconds);
                shared
                    .metrics
                    .reconcile_errors
                    .get_or_create(&ErrorLabels {
                        controller: "cohortsync",
                        reason: failure.reason,
                    })
                    .inc();
                tracing::warn!(reason = failure.reason, error = %failure.message, "Export failed");
                self.event(EventType::Warning, failure.reason, failure.message.clone())
                    .await;
            }
        }
        Ok(status)
    }

    async fn record_success(
        &self,
        status: &mut CohortSyncStatus,
        report: &Report,
        finished: Timestamp,
        seconds: f64,
    ) {
        let shared = &self.scope.shared;
        let attempt = status.last_attempt.as_mut().expect("an attempt is running");
        attempt.counts = report.counts.clone();
        attempt.kind = Some(report.kind);
        attempt.reason = None;
        attempt.message = None;
        status.cohort = Some(report.cohort.clone());
        status.consecutive_failures = None;
        let counts = &report.counts;
        if report.planned {
            attempt.result = AttemptResult::Planned;
            status.plan = Some(ExportPlan {
                computed_time: Some(Time(finished)),
                generation: self.generation,
                kind: Some(report.kind),
                counts: counts.clone(),
            });
            shared
                .metrics
                .export_duration
                .get_or_create(&ExportLabels {
                    result: "planned",
                    kind: kind_label(report.kind),
                })
                .observe(seconds);
            let note = format!(
                "Dry run: an export would send {} members to custom data {:?} (add {}, remove {}, clear {} \
                 of the previous cohort or custom data), skipping {} anonymous and {} invalid; nothing was sent",
                counts.exported,
                report.custom_data.name,
                counts.added,
                counts.removed,
                counts.cleared_previous,
                counts.skipped_anonymous,
                counts.skipped_invalid
            );
            tracing::info!(
                exported = counts.exported,
                added = counts.added,
                removed = counts.removed,
                "Dry run planned"
            );
            self.event(EventType::Normal, reasons::PLANNED, note).await;
            return;
        }
        attempt.result = AttemptResult::Succeeded;
        status.custom_data = Some(report.custom_data.clone());
        status.plan = None;
        status.members = Some(counts.exported);
        status.last_successful_sync_time = Some(Time(finished));
        status.last_exported_generation = self.generation;
        if report.kind == ExportKind::Full {
            status.last_full_export_time = Some(Time(finished));
        }
        shared
            .metrics
            .export_duration
            .get_or_create(&ExportLabels {
                result: "succeeded",
                kind: kind_label(report.kind),
            })
            .observe(seconds);
        shared
            .metrics
            .exported_members
            .get_or_create(&SyncLabels {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
            })
            .set(counts.exported);
        tracing::info!(
            exported = counts.exported, added = counts.added, removed = counts.removed,
            skipped_anonymous = counts.skipped_anonymous, skipped_invalid = counts.skipped_invalid,
            duplicates = counts.duplicates, kind = ?report.kind, seconds, "Export succeeded"
        );
        let mut note = format!(
            "Exported {} members of cohort {:?} to custom data {:?}: {} set to true, {} cleared; skipped {} anonymous, \
             {} invalid, {} duplicates",
            counts.exported,
            report.cohort.name,
            report.custom_data.name,
            counts.added,
            counts.removed,
            counts.skipped_anonymous,
            counts.skipped_invalid,
            counts.duplicates
        );
        if counts.cleared_previous > 0 {
            note.push_str(&format!(
                "; first cleared {} members exported under the previous cohort or custom data",
                counts.cleared_previous
            ));
        }
        self.event(EventType::Normal, reasons::SUCCEEDED, note)
            .await;
        let match_by = self.sync_connection_match_by().unwrap_or_default();
        for (kind, (count, example)) in &report.invalid {
            self.event(
                EventType::Warning,
                kind.reason(),
                format!(
                    "Skipped {count} members because {} (first: {example})",
                    kind.describe(match_by)
                ),
            )
            .await;
        }
    }

    fn sync_connection_match_by(&self) -> Option<crate::crd::MatchBy> {
        lookup(
            &self.scope.connections,
            &self.namespace,
            &self.sync.spec.connection_ref.name,
        )
        .map(|c| c.spec.kameleoon.match_by)
    }

    /// Handles a sync being deleted: clears Kameleoon for `Clear`, then lets go.
    async fn cleanup(&self) -> Result<Action, Error> {
        if !self.sync.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let shared = &self.scope.shared;
        if self
            .sync
            .annotations()
            .get(SKIP_CLEANUP_ANNOTATION)
            .map(String::as_str)
            == Some("true")
        {
            self.event(
                EventType::Warning,
                "CleanupSkipped",
                format!(
                    "Deleted without clearing Kameleoon because {SKIP_CLEANUP_ANNOTATION} is true"
                ),
            )
            .await;
            return self.release().await;
        }
        if self.sync.spec.deletion_policy != DeletionPolicy::Clear {
            return self.release().await;
        }
        let store = match MemberStore::new(shared.client.clone(), self.sync) {
            Ok(store) => store,
            Err(error) => return self.cleanup_pending(&Failure::store(&error), 0).await,
        };
        let snapshot = match store.load().await {
            Ok(snapshot) => snapshot,
            Err(error) => return self.cleanup_pending(&Failure::store(&error), 0).await,
        };
        let members = snapshot.as_ref().map_or(0, |s| s.members);
        if members > 0 {
            let snapshot = snapshot.expect("members come from a snapshot");
            let connection_name = &self.sync.spec.connection_ref.name;
            let Some(connection) =
                lookup(&self.scope.connections, &self.namespace, connection_name)
            else {
                let failure = Failure::stalled(
                    reasons::CONNECTION_NOT_FOUND,
                    format!(
                        "KameleoonConnection {}/{connection_name} does not exist",
                        self.namespace
                    ),
                );
                return self.cleanup_pending(&failure, members).await;
            };
            if let Some(failure) = connection_problem(&connection) {
                return self.cleanup_pending(&failure, members).await;
            }
            let tracker = Tracker::default();
            if let Err(failure) =
                export::clear_snapshot(self.scope, self.sync, &connection, &snapshot, &tracker)
                    .await
            {
                return self.cleanup_pending(&failure, members).await;
            }
            tracing::info!(members, "Cleared exported members before deletion");
            self.event(
                EventType::Normal,
                "Cleared",
                format!(
                    "Set the custom data to false for {members} exported members before deletion"
                ),
            )
            .await;
        }
        if let Err(error) = store.delete_all().await {
            return self.cleanup_pending(&Failure::store(&error), members).await;
        }
        self.release().await
    }

    async fn cleanup_pending(&self, failure: &Failure, members: u64) -> Result<Action, Error> {
        let message = format!(
            "Deletion waits to clear {members} exported members in Kameleoon: {}. Fix it, or set the annotation \
             {SKIP_CLEANUP_ANNOTATION}=true to delete without clearing",
            failure.message
        );
        tracing::warn!(reason = failure.reason, error = %message, "Cleanup pending");
        let mut status = self.current_status();
        let summary = if failure.stalled {
            Summary::Stalled {
                reason: reasons::CLEANUP_PENDING,
                message: message.clone(),
            }
        } else {
            Summary::Reconciling {
                ready: Status::False,
                reason: reasons::CLEANUP_PENDING,
                message: message.clone(),
            }
        };
        let now = Timestamp::now();
        let changed =
            conditions::find(&status.conditions, types::READY).is_none_or(|c| c.message != message);
        summary.apply(&mut status.conditions, self.generation, now);
        self.write_status(&status).await?;
        if changed {
            self.event(EventType::Warning, reasons::CLEANUP_PENDING, message)
                .await;
        }
        let failures = 1 + self
            .sync
            .status
            .as_ref()
            .and_then(|s| s.consecutive_failures)
            .unwrap_or(0);
        let delay = schedule::failure_backoff(
            failures,
            self.scope.shared.config.failure_backoff_base,
            self.scope
                .shared
                .config
                .failure_backoff_max
                .min(Duration::from_secs(300)),
            seed(&self.uid),
        );
        Ok(Action::requeue(delay))
    }
}

/// Why a connection cannot be used now, if it cannot.
fn connection_problem(connection: &KameleoonConnection) -> Option<Failure> {
    let status = connection.status.as_ref();
    let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let current = status.and_then(|s| s.observed_generation) == connection.meta().generation;
    if current && conditions::is_true(conditions, types::CONNECTED) {
        return None;
    }
    let name = format!(
        "{}/{}",
        connection.namespace().unwrap_or_default(),
        connection.name_any()
    );
    let connected = conditions::find(conditions, types::CONNECTED);
    let message = match connected {
        None => {
            format!("KameleoonConnection {name} is not Connected (it has not been checked yet)")
        }
        // The result describes an older spec of the connection.
        Some(_) if !current => format!(
            "KameleoonConnection {name} has not validated its current spec (generation {}) yet",
            connection.meta().generation.unwrap_or_default()
        ),
        Some(c) => format!(
            "KameleoonConnection {name} is not Connected ({}: {})",
            c.reason, c.message
        ),
    };
    if conditions::is_true(conditions, types::STALLED) {
        Some(Failure::stalled(reasons::CONNECTION_NOT_READY, message))
    } else {
        Some(Failure::transient(reasons::CONNECTION_NOT_READY, message))
    }
}

/// Whether the cohort or custom data of the spec differ from what the last
/// export used (when it used any).
fn target_changed(sync: &CohortSync, status: &CohortSyncStatus) -> bool {
    if status.last_successful_sync_time.is_none() {
        return false;
    }
    let spec = &sync.spec;
    let cohort_changed = status.cohort.as_ref().is_some_and(|resolved| {
        spec.cohort.id.is_some_and(|id| id != resolved.id)
            || spec
                .cohort
                .name
                .as_ref()
                .is_some_and(|name| *name != resolved.name)
    });
    let custom_data_changed = status.custom_data.as_ref().is_some_and(|resolved| {
        let wanted = spec
            .custom_data_name()
            .or(status.cohort.as_ref().map(|c| c.name.as_str()));
        wanted.is_some_and(|name| name != resolved.name)
    });
    cohort_changed || custom_data_changed
}

/// The conditions of a sync that is not exporting right now.
fn settled_summary(
    status: &CohortSyncStatus,
    sync_type: SyncType,
    stale: bool,
    retrying: bool,
    interval: Duration,
) -> Summary {
    let next = match (&status.next_sync_time, sync_type) {
        (Some(t), _) => format!("next export at {}", format_time(&t.0)),
        (None, SyncType::OneTime) => "OneTime sync: no further export".to_string(),
        (None, SyncType::Dynamic) => "no export scheduled".to_string(),
    };
    let Some(attempt) = &status.last_attempt else {
        return Summary::Reconciling {
            ready: Status::Unknown,
            reason: reasons::PROGRESSING,
            message: "Waiting for the first export".to_string(),
        };
    };
    let counts = &attempt.counts;
    match attempt.result {
        AttemptResult::Failed => {
            let reason = attempt
                .reason
                .as_deref()
                .map(static_reason)
                .unwrap_or(reasons::PROGRESSING);
            let message = format!(
                "{}; {}",
                attempt
                    .message
                    .as_deref()
                    .unwrap_or("the last export failed"),
                if retrying {
                    next.replace("next export", "next attempt")
                } else {
                    next
                }
            );
            if Failure::is_stalling_reason(reason) {
                Summary::Stalled { reason, message }
            } else {
                Summary::Reconciling {
                    ready: Status::False,
                    reason,
                    message,
                }
            }
        }
        AttemptResult::Running => Summary::Reconciling {
            ready: Status::Unknown,
            reason: reasons::PROGRESSING,
            message: "An export was interrupted; it runs again".to_string(),
        },
        AttemptResult::Planned => Summary::Ready {
            reason: reasons::PLANNED,
            message: format!(
                "Dry run: an export would send {} members (add {}, remove {}, clear {} previous, skip {} anonymous \
                 and {} invalid); nothing was sent; {next}",
                counts.exported,
                counts.added,
                counts.removed,
                counts.cleared_previous,
                counts.skipped_anonymous,
                counts.skipped_invalid
            ),
        },
        AttemptResult::Succeeded if stale => Summary::Reconciling {
            ready: Status::False,
            reason: reasons::STALE,
            message: format!(
                "The last successful export ({}) is older than twice the interval of {}; {next}",
                status
                    .last_successful_sync_time
                    .as_ref()
                    .map(|t| format_time(&t.0))
                    .unwrap_or_default(),
                humantime::format_duration(interval)
            ),
        },
        AttemptResult::Succeeded => Summary::Ready {
            reason: reasons::SUCCEEDED,
            message: format!(
                "Exported {} members at {}; {next}",
                status.members.unwrap_or(counts.exported),
                status
                    .last_successful_sync_time
                    .as_ref()
                    .map(|t| format_time(&t.0))
                    .unwrap_or_default()
            ),
        },
    }
}

/// Maps a stored reason back to its constant, so summaries keep `&'static str`.
fn static_reason(reason: &str) -> &'static str {
    const ALL: &[&str] = &[
        reasons::SECRET_NOT_FOUND,
        reasons::SECRET_KEY_MISSING,
        reasons::SECRET_INVALID,
        reasons::KAMELEOON_CREDENTIALS_REJECTED,
        reasons::KAMELEOON_SITE_NOT_FOUND,
        reasons::KAMELEOON_MAPPING_IDENTIFIER_MISSING,
        reasons::KAMELEOON_UNAVAILABLE,
        reasons::KAMELEOON_RATE_LIMITED,
        reasons::KAMELEOON_REQUEST_REJECTED,
        reasons::MIXPANEL_CREDENTIALS_REJECTED,
        reasons::MIXPANEL_PROJECT_FORBIDDEN,
        reasons::MIXPANEL_PLAN_LACKS_API,
        reasons::MIXPANEL_UNAVAILABLE,
        reasons::MIXPANEL_RATE_LIMITED,
        reasons::MIXPANEL_REQUEST_REJECTED,
        reasons::CONNECTION_NOT_FOUND,
        reasons::CONNECTION_NOT_READY,
        reasons::COHORT_NOT_FOUND,
        reasons::COHORT_AMBIGUOUS,
        reasons::COHORT_UNAVAILABLE,
        reasons::CUSTOM_DATA_INCOMPATIBLE,
        reasons::CUSTOM_DATA_CONFLICT,
        reasons::INVALID_SPEC,
        reasons::KUBERNETES_API_ERROR,
        reasons::EXPORT_ABORTED,
    ];
    ALL.iter()
        .find(|r| **r == reason)
        .copied()
        .unwrap_or(reasons::PROGRESSING)
}

fn ready_status(status: &CohortSyncStatus) -> Status {
    match conditions::find(&status.conditions, types::READY).map(|c| c.status.as_str()) {
        Some("True") => Status::True,
        Some("False") => Status::False,
        _ => Status::Unknown,
    }
}

fn started(status: &CohortSyncStatus) -> Option<Timestamp> {
    status
        .last_attempt
        .as_ref()
        .and_then(|a| a.start_time.as_ref())
        .map(|t| t.0)
}

fn kind_label(kind: ExportKind) -> &'static str {
    match kind {
        ExportKind::Full => "full",
        ExportKind::Differential => "differential",
    }
}

fn seed(uid: &str) -> u64 {
    uid.bytes().fold(0u64, |acc, b| {
        acc.wrapping_mul(31).wrapping_add(u64::from(b))
    })
}

fn format_time(time: &Timestamp) -> String {
    time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn until_from(now: Timestamp, at: Timestamp) -> Duration {
    let seconds = at.duration_since(now).as_secs_f64();
    Duration::from_secs_f64(seconds.max(1.0))
}
