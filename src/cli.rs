//! Command line of the operator binary.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use reqwest::Url;

use crate::controller::Config;
use crate::retry::RetryPolicy;
use crate::telemetry::LogFormat;

/// Kubernetes operator that exports Mixpanel cohorts to Kameleoon.
#[derive(Parser, Debug)]
#[command(name = "kameleoon-cohort-operator", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the controllers, with the kubeconfig or in-cluster config that
    /// kube-rs finds (KUBECONFIG, ~/.kube/config, service account).
    Run(Box<RunArgs>),
    /// Print the CustomResourceDefinitions as YAML.
    Crds {
        /// Write one file per CRD into this directory instead of printing them.
        #[arg(long)]
        output_dir: Option<std::path::PathBuf>,
    },
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (use a duration such as 30s, 5m or 2h)"))
}

/// Options of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Namespace to watch; repeat for several. Without it every namespace is
    /// watched, which needs cluster-wide permissions.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Address of the Prometheus metrics endpoint (/metrics).
    #[arg(long, env = "METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    pub metrics_address: SocketAddr,

    /// Address of the health endpoints (/healthz, /readyz).
    #[arg(long, env = "HEALTH_ADDRESS", default_value = "0.0.0.0:8081")]
    pub health_address: SocketAddr,

    /// Elect a leader through a Lease, so that only one replica exports.
    #[arg(long, env = "LEADER_ELECT")]
    pub leader_elect: bool,

    /// Namespace of the leader Lease. Default: POD_NAMESPACE, then the
    /// service account's namespace.
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_ID",
        default_value = "kameleoon-cohort-operator"
    )]
    pub leader_election_id: String,

    /// How long the leader Lease stays valid without renewal.
    #[arg(long, value_parser = duration, default_value = "15s")]
    pub lease_duration: Duration,

    /// How long the leader keeps trying to renew before it steps down.
    #[arg(long, value_parser = duration, default_value = "10s")]
    pub renew_deadline: Duration,

    /// Time between attempts to acquire or renew the Lease.
    #[arg(long, value_parser = duration, default_value = "2s")]
    pub retry_period: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, such as info or kameleoon_cohort_operator=debug. RUST_LOG
    /// overrides it.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Base URL used instead of Mixpanel's regional hosts, for tests and
    /// proxies; set by the cluster admin, never from a resource.
    #[arg(long, env = "MIXPANEL_URL")]
    pub mixpanel_url: Option<Url>,

    /// Base URL used instead of https://api.kameleoon.com.
    #[arg(long, env = "KAMELEOON_API_URL")]
    pub kameleoon_api_url: Option<Url>,

    /// Base URL used instead of https://data.kameleoon.io.
    #[arg(long, env = "KAMELEOON_DATA_URL")]
    pub kameleoon_data_url: Option<Url>,

    /// How often a Connected connection is validated again.
    #[arg(long, value_parser = duration, default_value = "30m")]
    pub revalidate_interval: Duration,

    /// Delay before the first retry of a failed export; it doubles with each failure.
    #[arg(long, value_parser = duration, default_value = "30s")]
    pub failure_backoff_base: Duration,

    /// Longest delay between retries of a failed export.
    #[arg(long, value_parser = duration, default_value = "30m")]
    pub failure_backoff_max: Duration,

    /// Attempts of one Mixpanel or Kameleoon request on 429, 5xx and network errors.
    #[arg(long, default_value_t = 6)]
    pub request_attempts: u32,

    /// First delay between attempts of one request; it doubles up to 60s.
    #[arg(long, value_parser = duration, default_value = "1s")]
    pub request_retry_base: Duration,

    /// Timeout of one request to Mixpanel or Kameleoon.
    #[arg(long, value_parser = duration, default_value = "60s")]
    pub request_timeout: Duration,

    /// Largest Kameleoon Data API request body, in bytes.
    #[arg(long, default_value_t = crate::kameleoon::events::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,

    /// Count every Engage page, not only the first of each query, toward the
    /// Mixpanel hourly query allowance.
    #[arg(long)]
    pub count_follow_up_pages: bool,

    /// Requests to the Kubernetes API server in flight at once, watches
    /// excepted once they stream. Each one may need its own connection, so
    /// this also bounds the connections a burst of reconciliations opens.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub kube_api_concurrency: u16,

    /// Exports that run at once per Mixpanel project.
    #[arg(long, default_value_t = 2)]
    pub exports_per_project: usize,

    /// How often a running export writes its progress to status.
    #[arg(long, value_parser = duration, default_value = "5s")]
    pub progress_interval: Duration,

    /// How long a Mixpanel cohort list is reused.
    #[arg(long, value_parser = duration, default_value = "5m")]
    pub cohort_cache_ttl: Duration,

    /// Test only: replaces the interval of every Dynamic sync, so tests need
    /// not wait 15 minutes. Never use it in production.
    #[arg(long, value_parser = duration, hide = true)]
    pub test_interval_override: Option<Duration>,

    /// Benchmark only: length of the window of `queriesPerHour` instead of
    /// an hour, so a run reaches the limit in minutes. Never use it in
    /// production.
    #[arg(long, value_parser = duration, hide = true, default_value = "1h")]
    pub test_query_window: Duration,
}

impl RunArgs {
    /// Controller settings from the options.
    pub fn config(&self) -> Config {
        Config {
            namespaces: self
                .namespaces
                .iter()
                .filter(|n| !n.is_empty())
                .cloned()
                .collect(),
            interval_override: self.test_interval_override,
            revalidate_interval: self.revalidate_interval,
            failure_backoff_base: self.failure_backoff_base,
            failure_backoff_max: self.failure_backoff_max,
            call_retry: RetryPolicy {
                base: self.request_retry_base,
                max: Duration::from_secs(60),
                attempts: self.request_attempts.max(1),
            },
            max_body_bytes: self.max_body_bytes.max(1024),
            count_follow_up_pages: self.count_follow_up_pages,
            exports_per_project: self.exports_per_project.max(1),
            progress_interval: self.progress_interval.max(Duration::from_millis(100)),
            cohort_cache_ttl: self.cohort_cache_ttl,
            query_window: self.test_query_window.max(Duration::from_secs(1)),
        }
    }
}
