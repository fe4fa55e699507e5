//! One export of a CohortSync: resolve the cohort and the custom data, read
//! the members from Mixpanel, compare them with the last export, and send
//! the differences to Kameleoon without ever forgetting who carries the data.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};

use super::failure::Failure;
use super::progress::Tracker;
use super::reader::ProjectReader;
use super::{Scope, lookup};
use crate::conditions::reasons;
use crate::crd::{
    CohortSync, ExportCounts, ExportKind, ExportPhase, KameleoonConnection, MatchBy,
    ResolvedCohort, ResolvedCustomData,
};
use crate::credentials::{self, ConnectionCredentials};
use crate::identity::{self, Identity, InvalidIdentifier};
use crate::kameleoon::events::{self, Batch, BatchWriter};
use crate::kameleoon::{self, NewCustomData};
use crate::members::{self, Change, MemberSet, MemberSetBuilder};
use crate::mixpanel::paging::Paging;
use crate::mixpanel::{self, Cohort, ProjectAccess};
use crate::retry::retry;
use crate::store::{MemberStore, Snapshot, SnapshotKind, Target};

/// Times an expired paging session restarts the read before the attempt fails.
const MAX_READ_RESTARTS: u32 = 3;

/// An export to run.
pub struct Job<'a> {
    /// The scope the sync lives in.
    pub scope: &'a Scope,
    /// The sync, as the reconciliation read it.
    pub sync: &'a CohortSync,
    /// Its connection.
    pub connection: &'a KameleoonConnection,
    /// Full or differential.
    pub kind: ExportKind,
    /// Where progress goes.
    pub tracker: &'a Tracker,
    /// Whether the export stops when the sync changes or is deleted; a
    /// cleanup on deletion is not abortable.
    pub abortable: bool,
}

/// What an export did, or would do (dry run).
#[derive(Debug)]
pub struct Report {
    /// The cohort exported.
    pub cohort: ResolvedCohort,
    /// The custom data its members carry.
    pub custom_data: ResolvedCustomData,
    /// Full or differential.
    pub kind: ExportKind,
    /// Counts.
    pub counts: ExportCounts,
    /// Skipped identifiers per rule, with the first one abbreviated.
    pub invalid: BTreeMap<InvalidIdentifier, (u64, String)>,
    /// Whether this was a dry run that sent nothing.
    pub planned: bool,
}

/// Members read from Mixpanel.
struct Read {
    members: MemberSet,
    duplicates: u64,
    anonymous: u64,
    invalid: BTreeMap<InvalidIdentifier, (u64, String)>,
}

impl Job<'_> {
    /// Runs the export.
    pub async fn run(&self) -> Result<Report, Failure> {
        let shared = &self.scope.shared;
        let _active = shared.exports.start();
        let namespace = self.sync.namespace().unwrap_or_default();
        let credentials = credentials::read(&shared.client, &namespace, &self.connection.spec)
            .await
            .map_err(|e| Failure::credentials(&e))?;
        let (key, budget) = self.scope.budget(self.connection);
        let access = ProjectAccess {
            project_id: self.connection.spec.mixpanel.project_id,
            region: self.connection.spec.mixpanel.region,
            credentials: credentials.mixpanel.clone(),
        };
        let reader = ProjectReader::new(shared, access, key, budget, Some(self.tracker));

        let cohort = self.resolve_cohort(&reader).await?;
        let custom_data_name = self
            .sync
            .spec
            .custom_data_name()
            .unwrap_or(&cohort.name)
            .to_string();
        if let Some(owner) = self.custom_data_owner(&custom_data_name) {
            return Err(Failure::stalled(
                reasons::CUSTOM_DATA_CONFLICT,
                format!(
                    "CohortSync {owner} already exports to custom data \"{custom_data_name}\" of \
                     Kameleoon site {}, and two syncs would overwrite each other's members: set \
                     spec.customData.name to another name",
                    self.connection.spec.kameleoon.site_code
                ),
            ));
        }
        let custom_data = self
            .resolve_custom_data(&credentials, &custom_data_name)
            .await?;
        let match_by = self.connection.spec.kameleoon.match_by;
        let target = Target {
            site_code: self.connection.spec.kameleoon.site_code.clone(),
            custom_data_index: custom_data.index,
            custom_data_name: custom_data.name.clone(),
            match_by,
            cohort_id: cohort.id,
        };
        let store =
            MemberStore::new(shared.client.clone(), self.sync).map_err(|e| Failure::store(&e))?;
        let mut previous = store.load().await.map_err(|e| Failure::store(&e))?;
        let dry_run = self.sync.spec.dry_run;

        // Members exported under another cohort, custom data or identifier
        // kind are cleared first, so the old data set does not linger.
        let mut cleared_previous = 0;
        if let Some(old) = previous
            .as_ref()
            .filter(|p| p.target != target && p.members > 0)
        {
            cleared_previous = old.members;
            if !dry_run {
                self.clear(&credentials, old).await?;
                store
                    .save(
                        &target,
                        SnapshotKind::Exported,
                        std::iter::empty::<io::Result<&str>>(),
                    )
                    .await
                    .map_err(|e| Failure::store(&e))?;
            }
            previous = None;
        }
        let previous = previous.filter(|p| p.target == target);

        self.tracker.phase(ExportPhase::ReadingMixpanel);
        let read = self.read_members(&reader, &cohort, match_by).await?;
        let (joined, stayed, left) = count_changes(&read.members, previous.as_ref())?;
        let steps = Steps::new(self.kind, previous.as_ref().map(|p| p.kind), joined, left);
        let kind = steps.kind;
        let counts = ExportCounts {
            exported: read.members.len() as i64,
            added: match kind {
                ExportKind::Full => (joined + stayed) as i64,
                ExportKind::Differential => joined as i64,
            },
            removed: left as i64,
            skipped_anonymous: read.anonymous as i64,
            skipped_invalid: read.invalid.values().map(|(n, _)| *n as i64).sum(),
            duplicates: read.duplicates as i64,
            cleared_previous: cleared_previous as i64,
        };
        let report = |planned| Report {
            cohort: ResolvedCohort {
                id: cohort.id,
                name: cohort.name.clone(),
            },
            custom_data: custom_data.clone(),
            kind,
            counts: counts.clone(),
            invalid: read.invalid.clone(),
            planned,
        };
        if dry_run {
            return Ok(report(true));
        }

        if steps.interrupted {
            tracing::info!("The previous export did not finish; sending every member again");
        }
        // Record everyone who may carry the data once the batches below go
        // out, before any of them does.
        let mut union = None;
        if steps.union_before {
            let ids = diff(&read.members, previous.as_ref()).map(|change| {
                change.map(|change| match change {
                    Change::Joined(id) | Change::Stayed(id) => Cow::Borrowed(id),
                    Change::Left(id) => Cow::Owned(id),
                })
            });
            union = Some(
                store
                    .save(&target, SnapshotKind::Union, ids)
                    .await
                    .map_err(|e| Failure::store(&e))?,
            );
        }

        self.tracker.phase(ExportPhase::WritingKameleoon);
        let changes = diff(&read.members, previous.as_ref());
        let lines = match kind {
            ExportKind::Full => counts.exported,
            ExportKind::Differential => counts.added,
        } + counts.removed;
        self.send(&credentials, &target, kind, lines.max(0) as u64, changes)
            .await?;

        if steps.exported_after {
            let saved = match union.filter(|_| left == 0) {
                // Without leavers the union holds exactly the members.
                Some(encoded) => {
                    store
                        .save_encoded(&target, SnapshotKind::Exported, &encoded)
                        .await
                }
                None => store
                    .save(&target, SnapshotKind::Exported, read.members.iter().map(Ok))
                    .await
                    .map(|_| ()),
            };
            saved.map_err(|e| Failure::store(&e))?;
        }
        Ok(report(false))
    }

    /// Stops the export when the process shuts down or the sync changed.
    fn check_abort(&self) -> Result<(), Failure> {
        if !self.abortable {
            return Ok(());
        }
        let shared = &self.scope.shared;
        if shared.shutdown.is_cancelled() {
            return Err(Failure::transient(
                reasons::EXPORT_ABORTED,
                "the operator is shutting down; the export starts again when it runs again",
            ));
        }
        let namespace = self.sync.namespace().unwrap_or_default();
        let current = lookup(&self.scope.syncs, &namespace, &self.sync.name_any());
        match current {
            Some(current) if current.meta().deletion_timestamp.is_some() => {
                Err(Failure::transient(
                    reasons::EXPORT_ABORTED,
                    "the CohortSync is being deleted; the export stopped",
                ))
            }
            Some(current) if current.meta().generation != self.sync.meta().generation => {
                Err(Failure::transient(
                    reasons::EXPORT_ABORTED,
                    "the spec changed during the export; it starts again for the new spec",
                ))
            }
            None => Err(Failure::transient(
                reasons::EXPORT_ABORTED,
                "the CohortSync no longer exists; the export stopped",
            )),
            Some(_) => Ok(()),
        }
    }

    async fn resolve_cohort(&self, reader: &ProjectReader<'_>) -> Result<Cohort, Failure> {
        let selector = &self.sync.spec.cohort;
        let find = |list: &[Cohort]| -> Result<Option<Cohort>, Failure> {
            if let Some(id) = selector.id {
                return Ok(list.iter().find(|c| c.id == id).cloned());
            }
            let name = selector.name.as_deref().unwrap_or_default();
            let matches: Vec<&Cohort> = list.iter().filter(|c| c.name == name).collect();
            match matches.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some((*one).clone())),
                many => Err(Failure::stalled(
                    reasons::COHORT_AMBIGUOUS,
                    format!(
                        "{} cohorts of Mixpanel project {} are named {name:?} (ids {}): set spec.cohort.id instead",
                        many.len(),
                        self.connection.spec.mixpanel.project_id,
                        many.iter()
                            .map(|c| c.id.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
            }
        };
        let list = reader
            .cohorts(false)
            .await
            .map_err(|e| Failure::mixpanel(&e))?;
        if let Some(cohort) = find(&list)? {
            return Ok(cohort);
        }
        // A cohort created since the list was cached: read the list again,
        // unless it was read a moment ago.
        let list = if reader
            .cohorts_age()
            .is_some_and(|age| age > Duration::from_secs(10))
        {
            reader
                .cohorts(true)
                .await
                .map_err(|e| Failure::mixpanel(&e))?
        } else {
            list
        };
        find(&list)?.ok_or_else(|| {
            let wanted = match (selector.id, &selector.name) {
                (Some(id), _) => format!("id {id}"),
                (None, Some(name)) => format!("name {name:?}"),
                (None, None) => "no id or name".to_string(),
            };
            Failure::stalled(
                reasons::COHORT_NOT_FOUND,
                format!(
                    "Mixpanel project {} has no cohort with {wanted}: fix spec.cohort or restore the cohort in Mixpanel",
                    self.connection.spec.mixpanel.project_id
                ),
            )
        })
    }

    async fn resolve_custom_data(
        &self,
        credentials: &ConnectionCredentials,
        name: &str,
    ) -> Result<ResolvedCustomData, Failure> {
        let shared = &self.scope.shared;
        let site_id = match self
            .connection
            .status
            .as_ref()
            .and_then(|s| s.site.as_ref())
        {
            Some(site) => site.id,
            None => {
                return Err(Failure::transient(
                    reasons::CONNECTION_NOT_READY,
                    "the connection has not resolved its Kameleoon site yet",
                ));
            }
        };
        let creds = &credentials.kameleoon;
        let mut found = self.cached_custom_data(site_id, name);
        if found.is_none() {
            // Not cached, or created since the list was read: list again.
            let list = self
                .kameleoon_call("custom_datas_list", || {
                    shared.kameleoon.list_custom_data(creds, site_id)
                })
                .await?;
            found = list.iter().find(|c| c.name == name).cloned();
            self.cache_custom_data(site_id, list);
        }
        if let Some(existing) = found {
            let boolean = existing
                .format
                .as_deref()
                .is_none_or(|f| f.eq_ignore_ascii_case("BOOLEAN"));
            let visitor = existing
                .scope
                .as_deref()
                .is_none_or(|s| s.eq_ignore_ascii_case("VISITOR"));
            if !boolean || !visitor {
                return Err(Failure::stalled(
                    reasons::CUSTOM_DATA_INCOMPATIBLE,
                    format!(
                        "Kameleoon custom data {name:?} exists with format {} and scope {}, but cohorts need \
                         a Boolean custom data of scope Visitor: set another spec.customData.name or change \
                         it in Kameleoon",
                        existing.format.as_deref().unwrap_or("unknown"),
                        existing.scope.as_deref().unwrap_or("unknown")
                    ),
                ));
            }
            return Ok(ResolvedCustomData {
                name: existing.name,
                index: existing.index,
                id: Some(existing.id),
            });
        }
        if self.sync.spec.dry_run {
            // A dry run creates nothing; the index is unknown until the real export.
            return Ok(ResolvedCustomData {
                name: name.to_string(),
                index: -1,
                id: None,
            });
        }
        let definition = NewCustomData {
            name,
            site_id,
            format: "BOOLEAN",
            kind: "UNIQUE",
            method: "CLIENT",
            scope: "VISITOR",
        };
        let created = self
            .kameleoon_call("custom_datas_create", || {
                shared.kameleoon.create_custom_data(creds, &definition)
            })
            .await?;
        tracing::info!(
            custom_data = name,
            index = created.index,
            "Created Kameleoon custom data"
        );
        let mut list = self
            .scope
            .shared
            .custom_data
            .lock()
            .expect("custom data cache lock")
            .get(&site_id)
            .map(|cached| cached.list.as_ref().clone())
            .unwrap_or_default();
        list.push(created.clone());
        self.cache_custom_data(site_id, list);
        Ok(ResolvedCustomData {
            name: created.name,
            index: created.index,
            id: Some(created.id),
        })
    }

    /// A custom data of the site by name, from a list younger than the
    /// cache lifetime.
    fn cached_custom_data(&self, site_id: i64, name: &str) -> Option<kameleoon::CustomData> {
        let shared = &self.scope.shared;
        let cache = shared.custom_data.lock().expect("custom data cache lock");
        let cached = cache.get(&site_id)?;
        if cached.read_at.elapsed() >= shared.config.cohort_cache_ttl {
            return None;
        }
        cached.list.iter().find(|c| c.name == name).cloned()
    }

    fn cache_custom_data(&self, site_id: i64, list: Vec<kameleoon::CustomData>) {
        self.scope
            .shared
            .custom_data
            .lock()
            .expect("custom data cache lock")
            .insert(
                site_id,
                super::CachedCustomData {
                    read_at: tokio::time::Instant::now(),
                    list: std::sync::Arc::new(list),
                },
            );
    }

    async fn read_members(
        &self,
        reader: &ProjectReader<'_>,
        cohort: &Cohort,
        match_by: MatchBy,
    ) -> Result<Read, Failure> {
        let mut restarts = 0;
        loop {
            match self.read_once(reader, cohort, match_by).await {
                Err(ReadError::SessionExpired(error)) if restarts < MAX_READ_RESTARTS => {
                    restarts += 1;
                    tracing::warn!(%error, restarts, "Mixpanel paging session expired; reading the cohort again from page 0");
                    self.tracker.restart_read();
                }
                Err(ReadError::SessionExpired(error)) => return Err(Failure::mixpanel(&error)),
                Err(ReadError::Failed(failure)) => return Err(failure),
                Ok(read) => return Ok(read),
            }
        }
    }

    async fn read_once(
        &self,
        reader: &ProjectReader<'_>,
        cohort: &Cohort,
        match_by: MatchBy,
    ) -> Result<Read, ReadError> {
        let mut builder = MemberSetBuilder::default();
        let mut anonymous = 0u64;
        let mut invalid: BTreeMap<InvalidIdentifier, (u64, String)> = BTreeMap::new();
        let mut paging = Paging::new();
        while let Some(request) = paging.next_request() {
            self.check_abort()?;
            let page = request.page;
            let result = reader.page(cohort.id, page, request.session_id).await;
            let body = match result {
                Ok(body) => body,
                Err(error @ mixpanel::Error::SessionExpired { .. }) => {
                    return Err(ReadError::SessionExpired(error));
                }
                Err(error @ mixpanel::Error::Rejected { .. }) if page == 0 => {
                    let listed = self.still_listed(reader, cohort).await;
                    return Err(ReadError::Failed(Failure::cohort_members(
                        &error, cohort, listed,
                    )));
                }
                Err(error) => return Err(ReadError::Failed(Failure::mixpanel(&error))),
            };
            let data = body
                .parse()
                .map_err(|e| ReadError::Failed(Failure::mixpanel(&e)))?;
            paging
                .record(&data)
                .map_err(|e| ReadError::Failed(Failure::mixpanel(&e)))?;

            for profile in &data.results {
                let mapping_id = profile
                    .properties
                    .as_ref()
                    .and_then(|p| p.mapping_id.as_ref())
                    .and_then(|m| m.string());
                match identity::resolve_text(profile.distinct_id.text(), mapping_id, match_by) {
                    Identity::Member(id) => builder.push(&id),
                    Identity::Anonymous => anonymous += 1,
                    Identity::Invalid(kind) => {
                        let entry = invalid.entry(kind).or_insert_with(|| {
                            let text = profile
                                .distinct_id
                                .text()
                                .unwrap_or(Cow::Borrowed("(none)"));
                            (0, identity::abbreviate(&text))
                        });
                        entry.0 += 1;
                    }
                }
            }

            self.tracker.page_read(
                paging.pages_read() as i64,
                paging.profiles() as i64,
                paging.total().map(|t| t as i64),
                data.page_size.max(1) as i64,
            );
            let wait = if self.scope.shared.config.count_follow_up_pages {
                reader.budget_wait(paging.remaining_pages())
            } else {
                Duration::ZERO
            };
            self.tracker
                .estimate(self.tracker.estimate_read(Timestamp::now(), wait));
        }
        let (members, duplicates) = builder.finish();
        // Members without a profile are not returned at all; the cohort's
        // count tells how many there are. The count comes from the cohort
        // list, which may be a few minutes old.
        let returned = paging.profiles();
        let profiles = paging.total().unwrap_or(returned).max(returned);
        let without_profile = cohort
            .count
            .map_or(0, |c| (c.max(0) as u64).saturating_sub(profiles));
        Ok(Read {
            members,
            duplicates,
            anonymous: anonymous + without_profile,
            invalid,
        })
    }

    /// Returns whether a fresh cohort list still contains the cohort, which
    /// distinguishes a rejected member query from a deleted cohort. When the
    /// list cannot be read, the cohort counts as listed.
    async fn still_listed(&self, reader: &ProjectReader<'_>, cohort: &Cohort) -> bool {
        match reader.cohorts(true).await {
            Ok(list) => list.iter().any(|c| c.id == cohort.id),
            Err(error) => {
                tracing::warn!(%error, cohort = cohort.id, "Cannot read the cohort list to check whether the cohort still exists");
                true
            }
        }
    }

    async fn clear(
        &self,
        credentials: &ConnectionCredentials,
        old: &Snapshot,
    ) -> Result<(), Failure> {
        self.tracker.phase(ExportPhase::ClearingPrevious);
        tracing::info!(
            members = old.members,
            custom_data = %old.target.custom_data_name,
            "Clearing members exported under the previous cohort or custom data"
        );
        let changes = old.ids().map(|id| id.map(|id| (Cow::Owned(id), false)));
        send_lines(self, credentials, &old.target, old.members, changes).await
    }

    async fn send<'m>(
        &self,
        credentials: &ConnectionCredentials,
        target: &Target,
        kind: ExportKind,
        expected_lines: u64,
        changes: impl Iterator<Item = io::Result<Change<'m>>>,
    ) -> Result<(), Failure> {
        let lines = changes.filter_map(move |change| match change {
            Err(e) => Some(Err(e)),
            Ok(Change::Joined(id)) => Some(Ok((Cow::Borrowed(id), true))),
            Ok(Change::Stayed(id)) if kind == ExportKind::Full => {
                Some(Ok((Cow::Borrowed(id), true)))
            }
            Ok(Change::Stayed(_)) => None,
            Ok(Change::Left(id)) => Some(Ok((Cow::Owned(id), false))),
        });
        send_lines(self, credentials, target, expected_lines, lines).await
    }

    async fn kameleoon_call<T, F, Fut>(
        &self,
        operation: &'static str,
        request: F,
    ) -> Result<T, Failure>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, kameleoon::Error>>,
    {
        let shared = &self.scope.shared;
        retry(
            &shared.config.call_retry,
            || async {
                let result = request().await;
                shared.metrics.api_call("kameleoon", operation, kameleoon_status(&result));
                result
            },
            |error, delay, attempt| {
                if error.retry_after().is_some() {
                    shared.metrics.rate_limit_wait("kameleoon", "retry_after", delay.as_secs_f64());
                }
                tracing::info!(%error, operation, attempt, delay_ms = delay.as_millis() as u64, "Kameleoon request failed; retrying");
                self.tracker.waiting(
                    Failure::kameleoon(error).reason,
                    format!(
                        "{}; retry {attempt} in {}",
                        crate::failure_chain(error),
                        humantime::format_duration(super::reader::round(delay))
                    ),
                );
            },
        )
        .await
        .map_err(|e| Failure::kameleoon(&e))
    }
}

/// The kind of an export and the snapshots it writes around its batches.
#[derive(Debug, PartialEq, Eq)]
struct Steps {
    /// Full or differential.
    kind: ExportKind,
    /// Whether the snapshot in force is a union left by an export that did
    /// not finish.
    interrupted: bool,
    /// Whether the union of the previous and the new members, marked as a
    /// union, is stored before the first batch.
    union_before: bool,
    /// Whether the new members, marked as exported, are stored after
    /// Kameleoon accepted every batch.
    exported_after: bool,
}

impl Steps {
    /// Decides from the scheduled kind, the kind of the snapshot in force (if
    /// any for this target) and the numbers of joined and left members.
    fn new(scheduled: ExportKind, previous: Option<SnapshotKind>, joined: u64, left: u64) -> Self {
        // A union names members who may never have received their value,
        // and leavers who may have received false and joined again since:
        // only a full export repairs both.
        let interrupted = previous == Some(SnapshotKind::Union);
        let changed = joined > 0 || left > 0 || previous.is_none();
        Steps {
            kind: if previous.is_none() || interrupted {
                ExportKind::Full
            } else {
                scheduled
            },
            interrupted,
            // Any batch that changes a value may be cut short, so the record
            // is marked first. A union already in force covers every change
            // but a join.
            union_before: joined > 0 || (changed && !interrupted),
            // Only a finished export lets the next one send differences alone.
            exported_after: changed || interrupted,
        }
    }
}

enum ReadError {
    SessionExpired(mixpanel::Error),
    Failed(Failure),
}

impl From<Failure> for ReadError {
    fn from(failure: Failure) -> Self {
        ReadError::Failed(failure)
    }
}

/// Sends `(identifier, member)` lines in as few Data API requests as the
/// size limit allows. `expected` sizes the progress total when known.
async fn send_lines(
    job: &Job<'_>,
    credentials: &ConnectionCredentials,
    target: &Target,
    expected: u64,
    lines: impl Iterator<Item = io::Result<(Cow<'_, str>, bool)>>,
) -> Result<(), Failure> {
    let max_bytes = job.scope.shared.config.max_body_bytes;
    let mut writer = BatchWriter::new(target.custom_data_index, target.match_by, max_bytes);
    let mut sent = 0i64;
    let estimate = |sent: i64| -> i64 {
        // About 130 bytes per line for a short identifier.
        sent.max(((expected as usize * 130).div_ceil(max_bytes)) as i64)
    };
    job.tracker.batches(0, estimate(0));
    for line in lines {
        let (id, member) = line.map_err(store_damaged)?;
        if let Some(batch) = writer.push(&id, member) {
            job.check_abort()?;
            send_batch(job, credentials, target, batch).await?;
            sent += 1;
            job.tracker.batches(sent, estimate(sent + 1));
        }
    }
    if let Some(batch) = writer.finish() {
        job.check_abort()?;
        send_batch(job, credentials, target, batch).await?;
        sent += 1;
        job.tracker.batches(sent, sent);
    }
    Ok(())
}

/// Sends one body; a 413 below the operator's own limit splits it in halves.
async fn send_batch(
    job: &Job<'_>,
    credentials: &ConnectionCredentials,
    target: &Target,
    batch: Batch,
) -> Result<(), Failure> {
    let shared = &job.scope.shared;
    let mut pending = vec![batch];
    while let Some(batch) = pending.pop() {
        let result = job
            .kameleoon_call("events", || {
                shared
                    .kameleoon
                    .send_events(&credentials.kameleoon, &target.site_code, &batch.body)
            })
            .await;
        match result {
            Ok(()) => {}
            Err(failure)
                if failure.reason == reasons::KAMELEOON_REQUEST_REJECTED && batch.lines > 1 =>
            {
                let Some((first, second)) = events::split(&batch) else {
                    return Err(failure);
                };
                if !failure.message.contains("HTTP 413") {
                    return Err(failure);
                }
                tracing::warn!(
                    bytes = batch.body.len(),
                    "Kameleoon refused a body as too large; sending it in two halves"
                );
                pending.push(second);
                pending.push(first);
            }
            Err(failure) => return Err(failure),
        }
    }
    Ok(())
}

fn store_damaged(error: io::Error) -> Failure {
    Failure::stalled(
        reasons::KUBERNETES_API_ERROR,
        format!(
            "the Secrets recording the exported members are damaged ({error}); delete them to export \
             the cohort in full, or set deletionPolicy and recreate the CohortSync"
        ),
    )
}

fn diff<'a>(
    members: &'a MemberSet,
    previous: Option<&'a Snapshot>,
) -> members::Diff<'a, Box<dyn Iterator<Item = io::Result<String>> + Send + 'a>> {
    let previous: Box<dyn Iterator<Item = io::Result<String>> + Send + 'a> = match previous {
        Some(snapshot) => Box::new(snapshot.ids()),
        None => Box::new(std::iter::empty()),
    };
    members::diff(members, previous)
}

/// Counts joined, stayed and left identifiers.
fn count_changes(
    members: &MemberSet,
    previous: Option<&Snapshot>,
) -> Result<(u64, u64, u64), Failure> {
    let mut counts = (0, 0, 0);
    for change in diff(members, previous) {
        match change.map_err(store_damaged)? {
            Change::Joined(_) => counts.0 += 1,
            Change::Stayed(_) => counts.1 += 1,
            Change::Left(_) => counts.2 += 1,
        }
    }
    Ok(counts)
}

fn kameleoon_status<T>(result: &Result<T, kameleoon::Error>) -> Option<u16> {
    use kameleoon::Error as E;
    match result {
        Ok(_) => Some(200),
        Err(
            E::InvalidClient { status, .. } | E::Rejected { status, .. } | E::Server { status, .. },
        ) => Some(*status),
        Err(E::Unauthorized { .. }) => Some(401),
        Err(E::Forbidden { .. }) => Some(403),
        Err(E::PayloadTooLarge { .. }) => Some(413),
        Err(E::RateLimited { .. }) => Some(429),
        Err(E::Transport(_) | E::Decode(_)) => None,
    }
}

impl Job<'_> {
    /// Returns `namespace/name` of an older CohortSync that already exports
    /// to the custom data `name` of this sync's Kameleoon site. The oldest
    /// sync keeps the custom data, so exactly one of two rivals exports. Dry
    /// runs and syncs being deleted claim nothing.
    fn custom_data_owner(&self, name: &str) -> Option<String> {
        let site = &self.connection.spec.kameleoon.site_code;
        let age = |sync: &CohortSync| {
            (
                sync.metadata.creation_timestamp.clone(),
                sync.namespace().unwrap_or_default(),
                sync.name_any(),
            )
        };
        let mine = age(self.sync);
        let owner = self.scope.syncs.state().into_iter().find(|other| {
            if other.metadata.uid == self.sync.metadata.uid
                || other.metadata.deletion_timestamp.is_some()
                || other.spec.dry_run
                || age(other) >= mine
            {
                return false;
            }
            let target = other
                .status
                .as_ref()
                .and_then(|s| s.custom_data.as_ref())
                .map(|c| c.name.as_str())
                .or(other.spec.custom_data_name());
            let namespace = other.namespace().unwrap_or_default();
            let other_site = super::lookup(
                &self.scope.connections,
                &namespace,
                &other.spec.connection_ref.name,
            )
            .map(|c| c.spec.kameleoon.site_code.clone());
            target == Some(name) && other_site.as_ref() == Some(site)
        })?;
        Some(format!(
            "{}/{}",
            owner.namespace().unwrap_or_default(),
            owner.name_any()
        ))
    }
}

/// Sets the custom data to false for every identifier of a snapshot; the
/// caller deletes the stored members afterwards.
pub async fn clear_snapshot(
    scope: &Scope,
    sync: &CohortSync,
    connection: &KameleoonConnection,
    snapshot: &Snapshot,
    tracker: &Tracker,
) -> Result<(), Failure> {
    let _active = scope.shared.exports.start();
    let namespace = sync.namespace().unwrap_or_default();
    let credentials = credentials::read(&scope.shared.client, &namespace, &connection.spec)
        .await
        .map_err(|e| Failure::credentials(&e))?;
    let job = Job {
        scope,
        sync,
        connection,
        kind: ExportKind::Full,
        tracker,
        abortable: false,
    };
    job.clear(&credentials, snapshot).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFFERENTIAL: ExportKind = ExportKind::Differential;

    #[test]
    fn first_export_is_full_and_recorded_twice() {
        let steps = Steps::new(DIFFERENTIAL, None, 3, 0);
        assert_eq!(steps.kind, ExportKind::Full);
        assert!(steps.union_before);
        assert!(steps.exported_after);
        // An empty cohort is recorded too, as an empty snapshot.
        let empty = Steps::new(DIFFERENTIAL, None, 0, 0);
        assert!(empty.union_before);
        assert!(empty.exported_after);
    }

    #[test]
    fn exported_snapshot_allows_differences() {
        let steps = Steps::new(DIFFERENTIAL, Some(SnapshotKind::Exported), 2, 1);
        assert_eq!(steps.kind, DIFFERENTIAL);
        assert!(!steps.interrupted);
        assert!(steps.union_before);
        assert!(steps.exported_after);
    }

    #[test]
    fn leavers_alone_still_mark_the_record() {
        // A crash after some false lines must not let a leaver who joins
        // again count as stayed.
        let steps = Steps::new(DIFFERENTIAL, Some(SnapshotKind::Exported), 0, 4);
        assert!(steps.union_before);
        assert!(steps.exported_after);
    }

    #[test]
    fn unchanged_cohort_writes_nothing() {
        let steps = Steps::new(ExportKind::Full, Some(SnapshotKind::Exported), 0, 0);
        assert!(!steps.union_before);
        assert!(!steps.exported_after);
    }

    #[test]
    fn union_in_force_forces_full_export() {
        let steps = Steps::new(DIFFERENTIAL, Some(SnapshotKind::Union), 0, 0);
        assert_eq!(steps.kind, ExportKind::Full);
        assert!(steps.interrupted);
        // The union already covers everyone; only the finished export is stored.
        assert!(!steps.union_before);
        assert!(steps.exported_after);
        // New members widen the union before any batch goes out.
        let joined = Steps::new(DIFFERENTIAL, Some(SnapshotKind::Union), 5, 0);
        assert!(joined.union_before);
        assert!(joined.exported_after);
    }
}
