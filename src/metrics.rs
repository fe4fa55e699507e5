//! Prometheus metrics of the operator.
//!
//! Names follow Prometheus conventions (`_total` counters, base units) under
//! the `cohortsync_` prefix. Labels hold bounded values only: controller,
//! service, operation, status code class, reason; the per-sync gauge is keyed
//! by namespace and name, one series per CohortSync.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
        }
    }
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
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
}
