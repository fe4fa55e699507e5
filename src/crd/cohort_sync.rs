use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::LocalObjectReference;

/// Desired export: which cohort, through which connection, how often.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cohortsync.io",
    version = "v1alpha1",
    kind = "CohortSync",
    namespaced,
    status = "CohortSyncStatus",
    shortname = "csync",
    category = "cohortsync",
    doc = "Exports one Mixpanel cohort to Kameleoon through a KameleoonConnection, once \
           (OneTime) or every interval (Dynamic). Each export replaces the previous one: \
           afterwards exactly the cohort's identified members carry the cohort's custom data.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.syncType"),
    printcolumn(name = "Cohort", type_ = "string", json_path = ".status.cohort.name"),
    printcolumn(
        name = "Last Sync",
        type_ = "date",
        json_path = ".status.lastSuccessfulSyncTime"
    ),
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.members"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].message"
    ),
    printcolumn(
        name = "Suspended",
        type_ = "boolean",
        priority = 1,
        json_path = ".spec.suspend"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.syncType == 'Dynamic' || !has(self.interval)")
        .message("spec.interval applies to Dynamic syncs only: remove it or set syncType: Dynamic")
        .field_path(".interval"),
    validation = Rule::new("self.syncType == 'Dynamic' || !has(self.fullExportInterval)")
        .message("spec.fullExportInterval applies to Dynamic syncs only: remove it or set syncType: Dynamic")
        .field_path(".fullExportInterval")
)]
#[serde(rename_all = "camelCase")]
pub struct CohortSyncSpec {
    /// KameleoonConnection in the same namespace to export through. It cannot change
    /// after creation, because the exported data lives in that connection's Kameleoon
    /// project: create a new CohortSync to export through another connection.
    #[x_kube(validation = Rule::new("self == oldSelf")
        .message("spec.connectionRef is immutable: create a new CohortSync to use another connection"))]
    pub connection_ref: LocalObjectReference,
    /// The Mixpanel cohort to export, by id or by name (exactly one of them).
    pub cohort: CohortSelector,
    /// OneTime exports once per spec change or sync request; Dynamic exports again every
    /// interval.
    pub sync_type: SyncType,
    /// Time between the end of one successful Dynamic export and the next, as a Go
    /// duration (for example 2h or 90m). Dynamic only. Default: 2h. Minimum: 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(format!("!self.matches('{DURATION_PATTERN}') || duration(self) >= duration('15m')"))
        .message(Message::Expression("'spec.interval must be at least 15m, got ' + self".into())))]
    #[schemars(
        regex(pattern = r"^([0-9]{1,5}(\.[0-9]+)?(ms|s|m|h)){1,4}$"),
        length(max = 32)
    )]
    pub interval: Option<String>,
    /// Time between two complete exports of a Dynamic sync, as a Go duration. Between
    /// complete exports only the members who joined or left are sent. Dynamic only.
    /// Default: 24h. Minimum: 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(format!("!self.matches('{DURATION_PATTERN}') || duration(self) >= duration('1h')"))
        .message(Message::Expression("'spec.fullExportInterval must be at least 1h, got ' + self".into())))]
    #[schemars(
        regex(pattern = r"^([0-9]{1,5}(\.[0-9]+)?(ms|s|m|h)){1,4}$"),
        length(max = 32)
    )]
    pub full_export_interval: Option<String>,
    /// Stops scheduling exports while true; status is kept and Ready says Suspended.
    /// Deletion still runs its cleanup.
    #[serde(default)]
    pub suspend: bool,
    /// The Kameleoon custom data that carries the cohort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_data: Option<CustomDataSpec>,
    /// What happens in Kameleoon when this resource is deleted: Retain (default) leaves
    /// the exported data as it is; Clear sets the custom data to false for every member
    /// this resource exported before the resource goes away.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Computes the export and records in status what it would add, remove and skip,
    /// without writing anything to Kameleoon.
    #[serde(default)]
    pub dry_run: bool,
}

/// Go duration syntax accepted for intervals, in the form the CEL rules repeat.
const DURATION_PATTERN: &str = r"^([0-9]{1,5}(\\.[0-9]+)?(ms|s|m|h)){1,4}$";

/// Identifies a Mixpanel cohort.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.id) != has(self.name)")
    .message("spec.cohort must set exactly one of id or name"))]
#[serde(rename_all = "camelCase")]
pub struct CohortSelector {
    /// Numeric cohort id, as shown in Mixpanel's cohort list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub id: Option<i64>,
    /// Exact cohort name. The name must match one cohort of the project: a missing or
    /// ambiguous name stalls the sync until it is fixed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub name: Option<String>,
}

/// Kind of schedule of a CohortSync.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SyncType {
    /// Export once per spec generation or sync request, then never update the export.
    OneTime,
    /// Export every interval, sending who joined and who left since the last export.
    Dynamic,
}

/// Kameleoon custom data settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomDataSpec {
    /// Name of the Boolean, visitor-scoped custom data that carries the cohort. It is
    /// created when the project has none of that name. Default: the cohort's name in
    /// Mixpanel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255), regex(pattern = r"\S"))]
    pub name: Option<String>,
}

/// What deleting a CohortSync does to the data already in Kameleoon.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Leave the exported data in Kameleoon.
    #[default]
    Retain,
    /// Set the custom data to false for every exported member before deletion completes.
    Clear,
}

/// Observed state of a CohortSync.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CohortSyncStatus {
    /// Generation of the spec that the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Reconciling and Stalled in the kstatus convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The cohort the spec resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort: Option<ResolvedCohort>,
    /// The Kameleoon custom data the members carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_data: Option<ResolvedCustomData>,
    /// Members that carry the custom data in Kameleoon after the last successful export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<i64>,
    /// The last export attempt, finished or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt: Option<SyncAttempt>,
    /// Completion time of the last successful export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_sync_time: Option<Time>,
    /// Completion time of the last successful complete (not differential) export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_full_export_time: Option<Time>,
    /// When the next export is scheduled; absent when none is (OneTime done, suspended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sync_time: Option<Time>,
    /// Generation of the spec the last successful export ran for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exported_generation: Option<i64>,
    /// Value of the cohortsync.io/sync-requested-at annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_sync_request: Option<String>,
    /// Value of the reconcile.fluxcd.io/requestedAt annotation last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// Failed attempts since the last success; they set the retry backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<i32>,
    /// Progress of the export that is running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<SyncProgress>,
    /// What the last dry run would send (dryRun: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<ExportPlan>,
}

/// A cohort as Mixpanel names it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ResolvedCohort {
    /// Cohort id.
    pub id: i64,
    /// Cohort name.
    pub name: String,
}

/// A Kameleoon custom data.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ResolvedCustomData {
    /// Custom data name.
    pub name: String,
    /// Index that Data API events address the custom data by.
    pub index: i64,
    /// Custom data id in the Automation API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
}

/// One export attempt.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncAttempt {
    /// When the attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the attempt ended; absent while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Outcome: Running, Succeeded, Failed or Planned (a dry run).
    pub result: AttemptResult,
    /// Complete export of every member, or Differential (joined and left only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ExportKind>,
    /// Member counts of the attempt.
    #[serde(default)]
    pub counts: ExportCounts,
    /// Condition reason of the failure, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why the attempt failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Outcome of an export attempt.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AttemptResult {
    /// The attempt is in progress.
    #[default]
    Running,
    /// Kameleoon accepted every batch and the exported members were recorded.
    Succeeded,
    /// The attempt stopped on an error; nothing already exported was forgotten.
    Failed,
    /// A dry run computed the export without sending it.
    Planned,
}

/// Kind of export.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ExportKind {
    /// Every member is sent, and every member who left.
    Full,
    /// Only members who joined or left since the last export are sent.
    Differential,
}

/// Counts of one export.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportCounts {
    /// Identified members of the cohort, after de-duplication: those who carry the custom
    /// data once the export succeeds.
    pub exported: i64,
    /// Members set to true because they joined since the last export (every member on a
    /// Full export).
    pub added: i64,
    /// Former members set to false because they left the cohort.
    pub removed: i64,
    /// Cohort members without a Mixpanel user profile, which Kameleoon cannot match.
    pub skipped_anonymous: i64,
    /// Members whose identifier Kameleoon would reject (empty, too long, control
    /// characters).
    pub skipped_invalid: i64,
    /// Profiles that resolved to an identifier another profile already had.
    pub duplicates: i64,
    /// Members exported under the previous cohort or custom data, set to false first
    /// because spec.cohort or spec.customData.name changed.
    #[serde(default)]
    pub cleared_previous: i64,
}

/// Progress of a running export.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncProgress {
    /// Phase: ReadingMixpanel, ClearingPrevious or WritingKameleoon.
    pub phase: ExportPhase,
    /// Mixpanel pages read so far.
    pub pages_read: i64,
    /// Pages the cohort needs, from the count Mixpanel reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_pages: Option<i64>,
    /// Profiles read so far.
    pub members_read: i64,
    /// Profiles the cohort holds, as Mixpanel reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_members: Option<i64>,
    /// Kameleoon requests accepted so far in this phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches_sent: Option<i64>,
    /// Kameleoon requests the phase needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches_total: Option<i64>,
    /// Estimate of when the export completes, given the query budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_completion_time: Option<Time>,
}

/// Phase of a running export.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ExportPhase {
    /// Paging through the cohort's profiles in Mixpanel.
    #[default]
    ReadingMixpanel,
    /// Setting false for members exported under a previous cohort or custom data.
    ClearingPrevious,
    /// Sending members to Kameleoon.
    WritingKameleoon,
}

/// Result of a dry run.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportPlan {
    /// When the plan was computed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computed_time: Option<Time>,
    /// Generation of the spec the plan was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Whether a real export would be Full or Differential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ExportKind>,
    /// What the export would send.
    pub counts: ExportCounts,
}

impl CohortSyncSpec {
    /// Interval of a Dynamic sync when the spec sets none.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2 * 3600);
    /// Time between complete exports when the spec sets none.
    pub const DEFAULT_FULL_EXPORT_INTERVAL: Duration = Duration::from_secs(24 * 3600);

    /// Parsed interval, with its default applied.
    pub fn interval(&self) -> Result<Duration, InvalidDuration> {
        parse_optional(&self.interval, "spec.interval", Self::DEFAULT_INTERVAL)
    }

    /// Parsed complete-export interval, with its default applied.
    pub fn full_export_interval(&self) -> Result<Duration, InvalidDuration> {
        parse_optional(
            &self.full_export_interval,
            "spec.fullExportInterval",
            Self::DEFAULT_FULL_EXPORT_INTERVAL,
        )
    }

    /// Custom data name the spec asks for, if any.
    pub fn custom_data_name(&self) -> Option<&str> {
        self.custom_data.as_ref().and_then(|c| c.name.as_deref())
    }
}

/// A duration field that is not a valid Go duration.
#[derive(Debug, thiserror::Error)]
#[error("{field} is not a valid duration: {value:?} (use Go syntax such as 90m or 2h)")]
pub struct InvalidDuration {
    /// Path of the field.
    pub field: &'static str,
    /// Value found.
    pub value: String,
}

fn parse_optional(
    value: &Option<String>,
    field: &'static str,
    default: Duration,
) -> Result<Duration, InvalidDuration> {
    let Some(text) = value else {
        return Ok(default);
    };
    let invalid = || InvalidDuration {
        field,
        value: text.clone(),
    };
    let parsed: kube::core::Duration = text.parse().map_err(|_| invalid())?;
    if parsed.is_negative() {
        return Err(invalid());
    }
    Ok(parsed.into())
}
