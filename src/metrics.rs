//! Prometheus metrics of the operator.
//!
//! Names follow Prometheus conventions (`_total` counters, base units) under
//! the `cohortsync_` prefix. Labels hold bounded values only: controller,
//! service, operation, status code class, reason; the per-sync gauges are
//! keyed by namespace and name, one series per CohortSync.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use kube::ResourceExt;
use kube::runtime::reflector::Store;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::budget::ProjectKey;
use crate::conditions::{self, reasons, types};
use crate::crd::{AttemptResult, CohortSync};

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    /// `kameleoonconnection` or `cohortsync`.
    pub controller: &'static str,
}

/// Labels of a failed reconciliation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// `kameleoonconnection` or `cohortsync`.
    pub controller: &'static str,
    /// Condition reason of the failure.
    pub reason: &'static str,
}

/// Labels of a call to Mixpanel or Kameleoon.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// `mixpanel` or `kameleoon`.
    pub service: &'static str,
    /// The call, such as `engage` or `events`.
    pub operation: &'static str,
    /// HTTP status code, or `error` when no response arrived.
    pub code: String,
}

/// Labels of a wait for a rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WaitLabels {
    /// `mixpanel` or `kameleoon`.
    pub service: &'static str,
    /// `budget` (the operator's own query budget) or `retry_after` (a 429).
    pub cause: &'static str,
}

/// Labels of an export outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExportLabels {
    /// `succeeded`, `failed` or `planned`.
    pub result: &'static str,
    /// `full` or `differential`.
    pub kind: &'static str,
}

/// Labels naming one CohortSync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Labels of the state of one CohortSync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncStateLabels {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// One of the values [`sync_state`] returns.
    pub state: &'static str,
}

/// Labels naming one Mixpanel project.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectLabels {
    /// `US`, `EU` or `IN`.
    pub region: String,
    /// Mixpanel project id.
    pub project_id: String,
}

/// Every metric of the operator, and the registry that exposes them.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations started.
    pub reconciliations: Family<ControllerLabels, Counter>,
    /// Reconciliations that ended in an error.
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    /// Export durations.
    pub export_duration: Family<ExportLabels, Histogram>,
    /// Members carrying the custom data after each sync's last export.
    pub exported_members: Family<SyncLabels, Gauge>,
    /// Calls to Mixpanel and Kameleoon.
    pub api_requests: Family<ApiLabels, Counter>,
    /// Waits for rate limits.
    pub rate_limit_waits: Family<WaitLabels, Counter>,
    /// Seconds spent waiting for rate limits.
    pub rate_limit_wait_seconds: Family<WaitLabels, Counter<f64, AtomicU64>>,
    /// 1 while this process holds the leader Lease (or runs without leader election).
    pub leader: Gauge,
    /// Requests counted against a Mixpanel project's hourly query allowance.
    pub mixpanel_queries: Family<ProjectLabels, Counter>,
    /// Hourly query allowance of each Mixpanel project; 0 means no limit.
    pub mixpanel_query_allowance: Family<ProjectLabels, Gauge>,
    /// 1 for the state each watched CohortSync is in, refreshed from the
    /// watch caches at every scrape.
    sync_states: Family<SyncStateLabels, Gauge>,
    /// Watch caches of the CohortSyncs, one per watched scope, and the syncs
    /// seen at the previous scrape.
    syncs: Mutex<TrackedSyncs>,
}

#[derive(Default)]
struct TrackedSyncs {
    stores: Vec<Store<CohortSync>>,
    previous: HashSet<SyncLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cohortsync");
        let reconciliations = Family::<ControllerLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations started",
            reconciliations.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Reconciliations that ended in an error, by condition reason",
            reconcile_errors.clone(),
        );
        let export_duration = Family::<ExportLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 16))
        });
        registry.register_with_unit(
            "export_duration",
            "Duration of export attempts",
            prometheus_client::registry::Unit::Seconds,
            export_duration.clone(),
        );
        let exported_members = Family::<SyncLabels, Gauge>::default();
        registry.register(
            "exported_members",
            "Members carrying the custom data after the sync's last successful export",
            exported_members.clone(),
        );
        let api_requests = Family::<ApiLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests to Mixpanel and Kameleoon by operation and HTTP status",
            api_requests.clone(),
        );
        let rate_limit_waits = Family::<WaitLabels, Counter>::default();
        registry.register(
            "rate_limit_waits",
            "Times a request waited for a rate limit",
            rate_limit_waits.clone(),
        );
        let rate_limit_wait_seconds = Family::<WaitLabels, Counter<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "rate_limit_wait",
            "Time spent waiting for rate limits",
            prometheus_client::registry::Unit::Seconds,
            rate_limit_wait_seconds.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process is the elected leader",
            leader.clone(),
        );
        let mixpanel_queries = Family::<ProjectLabels, Counter>::default();
        registry.register(
            "mixpanel_queries",
            "Mixpanel requests counted against the project's hourly query allowance",
            mixpanel_queries.clone(),
        );
        let mixpanel_query_allowance = Family::<ProjectLabels, Gauge>::default();
        registry.register(
            "mixpanel_query_allowance",
            "Hourly query allowance of the Mixpanel project (queriesPerHour); 0 means no limit",
            mixpanel_query_allowance.clone(),
        );
        let sync_states = Family::<SyncStateLabels, Gauge>::default();
        registry.register(
            "sync_state",
            "1 for the state of each CohortSync: ready, exporting, failing, stalled, stale, suspended or pending",
            sync_states.clone(),
        );
        Self {
            registry,
            reconciliations,
            reconcile_errors,
            export_duration,
            exported_members,
            api_requests,
            rate_limit_waits,
            rate_limit_wait_seconds,
            leader,
            mixpanel_queries,
            mixpanel_query_allowance,
            sync_states,
            syncs: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        // The lock also keeps two scrapes from interleaving the refresh of
        // the per-sync series with the encoding.
        let mut syncs = self.syncs.lock().expect("metrics sync lock");
        self.refresh_syncs(&mut syncs);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Adds a watch cache of CohortSyncs whose states `sync_state` reports.
    pub fn track_syncs(&self, store: Store<CohortSync>) {
        self.syncs
            .lock()
            .expect("metrics sync lock")
            .stores
            .push(store);
    }

    /// Rebuilds `sync_state` from the watch caches, and drops the
    /// `exported_members` series of syncs that no longer exist.
    fn refresh_syncs(&self, tracked: &mut TrackedSyncs) {
        let mut current = HashSet::new();
        self.sync_states.clear();
        for store in &tracked.stores {
            for sync in store.state() {
                let labels = SyncLabels {
                    namespace: sync.namespace().unwrap_or_default(),
                    name: sync.name_any(),
                };
                self.sync_states
                    .get_or_create(&SyncStateLabels {
                        namespace: labels.namespace.clone(),
                        name: labels.name.clone(),
                        state: sync_state(&sync),
                    })
                    .set(1);
                current.insert(labels);
            }
        }
        for gone in tracked.previous.difference(&current) {
            self.exported_members.remove(gone);
        }
        tracked.previous = current;
    }

    /// Counts one Mixpanel request that spends the project's hourly query
    /// allowance, and records that allowance.
    pub fn mixpanel_query(&self, project: ProjectKey, per_hour: u32) {
        let labels = ProjectLabels {
            region: format!("{:?}", project.region),
            project_id: project.project_id.to_string(),
        };
        self.mixpanel_queries.get_or_create(&labels).inc();
        self.mixpanel_query_allowance
            .get_or_create(&labels)
            .set(i64::from(per_hour));
    }

    /// Counts one call to a service.
    pub fn api_call(&self, service: &'static str, operation: &'static str, code: Option<u16>) {
        let code = code.map_or_else(|| "error".to_string(), |c| c.to_string());
        self.api_requests
            .get_or_create(&ApiLabels {
                service,
                operation,
                code,
            })
            .inc();
    }

    /// Counts one wait for a rate limit and its length.
    pub fn rate_limit_wait(&self, service: &'static str, cause: &'static str, seconds: f64) {
        let labels = WaitLabels { service, cause };
        self.rate_limit_waits.get_or_create(&labels).inc();
        self.rate_limit_wait_seconds
            .get_or_create(&labels)
            .inc_by(seconds);
    }
}

/// Sums up a CohortSync's status in one word for dashboards and alerts.
/// The words are `suspended`, `stalled` (a person must act), `stale` (the
/// last success of a Dynamic sync is older than twice its interval),
/// `exporting`, `ready`, `failing` (not ready and retrying) and `pending`
/// (no verdict yet).
pub fn sync_state(sync: &CohortSync) -> &'static str {
    if sync.spec.suspend {
        return "suspended";
    }
    let Some(status) = &sync.status else {
        return "pending";
    };
    if conditions::is_true(&status.conditions, types::STALLED) {
        return "stalled";
    }
    let ready = conditions::find(&status.conditions, types::READY);
    if ready.is_some_and(|c| c.reason == reasons::STALE) {
        return "stale";
    }
    if status
        .last_attempt
        .as_ref()
        .is_some_and(|attempt| attempt.result == AttemptResult::Running)
    {
        return "exporting";
    }
    match ready.map(|c| c.status.as_str()) {
        Some("True") => "ready",
        Some("False") => "failing",
        _ => "pending",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_lists_families_with_prefix() {
        let metrics = Metrics::default();
        metrics.api_call("mixpanel", "engage", Some(200));
        metrics.rate_limit_wait("mixpanel", "budget", 1.5);
        metrics
            .export_duration
            .get_or_create(&ExportLabels {
                result: "succeeded",
                kind: "full",
            })
            .observe(2.0);
        let text = metrics.render();
        assert!(text.contains("cohortsync_api_requests_total{service=\"mixpanel\",operation=\"engage\",code=\"200\"} 1"));
        assert!(text.contains("cohortsync_rate_limit_wait_seconds_total"));
        assert!(text.contains("# TYPE cohortsync_export_duration_seconds histogram"));
    }

    fn condition(type_: &str, status: &str, reason: &str) -> serde_json::Value {
        serde_json::json!({
            "type": type_,
            "status": status,
            "reason": reason,
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z"
        })
    }

    fn sync(name: &str, suspend: bool, status: serde_json::Value) -> CohortSync {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cohortsync.io/v1alpha1",
            "kind": "CohortSync",
            "metadata": {"name": name, "namespace": "growth"},
            "spec": {
                "connectionRef": {"name": "production"},
                "cohort": {"id": 5},
                "syncType": "OneTime",
                "suspend": suspend
            },
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn sync_state_sums_up_status() {
        let ready = serde_json::json!({"conditions": [condition("Ready", "True", "Succeeded")]});
        let cases = [
            (sync("a", true, ready.clone()), "suspended"),
            (sync("b", false, serde_json::Value::Null), "pending"),
            (sync("c", false, ready), "ready"),
            (
                sync(
                    "d",
                    false,
                    serde_json::json!({"conditions": [
                        condition("Ready", "False", "CohortNotFound"),
                        condition("Stalled", "True", "CohortNotFound")
                    ]}),
                ),
                "stalled",
            ),
            (
                sync(
                    "e",
                    false,
                    serde_json::json!({"conditions": [
                    condition("Ready", "False", "Stale"),
                    condition("Reconciling", "True", "Stale")
                ], "lastAttempt": {"result": "Running"}}),
                ),
                "stale",
            ),
            (
                sync(
                    "f",
                    false,
                    serde_json::json!({"conditions": [
                    condition("Ready", "Unknown", "Exporting"),
                    condition("Reconciling", "True", "Exporting")
                ], "lastAttempt": {"result": "Running"}}),
                ),
                "exporting",
            ),
            (
                sync(
                    "g",
                    false,
                    serde_json::json!({"conditions": [
                    condition("Ready", "False", "MixpanelUnavailable"),
                    condition("Reconciling", "True", "MixpanelUnavailable")
                ], "lastAttempt": {"result": "Failed"}}),
                ),
                "failing",
            ),
        ];
        for (sync, expected) in cases {
            assert_eq!(sync_state(&sync), expected, "{}", sync.name_any());
        }
    }

    #[test]
    fn deleted_syncs_leave_no_series() {
        use kube::runtime::{reflector, watcher};

        let metrics = Metrics::default();
        let (store, mut writer) = reflector::store();
        metrics.track_syncs(store);
        let vip = sync(
            "vip",
            false,
            serde_json::json!({"conditions": [condition("Ready", "True", "Succeeded")]}),
        );
        writer.apply_watcher_event(&watcher::Event::Apply(vip.clone()));
        metrics
            .exported_members
            .get_or_create(&SyncLabels {
                namespace: "growth".into(),
                name: "vip".into(),
            })
            .set(3);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"cohortsync_sync_state{namespace="growth",name="vip",state="ready"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"cohortsync_exported_members{namespace="growth",name="vip"} 3"#),
            "{text}"
        );

        writer.apply_watcher_event(&watcher::Event::Delete(vip));
        let text = metrics.render();
        assert!(!text.contains(r#"name="vip""#), "{text}");
    }
}
