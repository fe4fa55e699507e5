//! Stand-in for the Mixpanel Query API: `cohorts/list` and `engage` under both
//! `/api/query` and `/api/2.0`, with service-account authentication, paging
//! sessions and the per-project query limits.

mod api;
mod control;
mod members;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use serde::{Deserialize, Serialize};

pub use members::{MAPPING_ID_PROPERTY, MemberView};
pub use state::{MixpanelStats, ProjectStats};

use crate::StandinError;
use crate::faults::{ActiveFault, Fault};
use crate::limits;
use crate::record::{RequestRecord, record_requests};
use crate::seed::{Availability, CohortSeed, GeneratorSeed, MemberSeed, MixpanelSeed, ProfileSeed};
use crate::server::{RunningServer, serve};
use state::Shared;

/// Behaviour switches of the Mixpanel stand-in; the defaults are the real
/// service's documented values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixpanelConfig {
    /// Results per Engage page.
    pub page_size: usize,
    /// Queries per project in any sliding hour; 0 is unlimited.
    pub hourly_query_limit: u32,
    /// Queries running at once per project; one more gets 429.
    pub max_concurrent_queries: usize,
    /// Whether Engage pages after the first (with a `session_id`) count toward
    /// the hourly limit. They always count toward the concurrency limit.
    pub count_follow_up_pages: bool,
    /// `Retry-After` value, in seconds, sent with the stand-in's own 429 responses.
    pub retry_after_seconds: Option<u64>,
    /// Idle time after which a paging session expires, in milliseconds.
    pub session_idle_timeout_ms: u64,
    /// Length of the sliding window of `hourly_query_limit`, in milliseconds:
    /// an hour, shortened only so benchmarks can reach the limit in minutes.
    pub query_window_ms: u64,
}

impl Default for MixpanelConfig {
    fn default() -> Self {
        Self {
            page_size: limits::MIXPANEL_PAGE_SIZE,
            hourly_query_limit: limits::MIXPANEL_QUERIES_PER_HOUR,
            max_concurrent_queries: limits::MIXPANEL_MAX_CONCURRENT_QUERIES,
            count_follow_up_pages: false,
            retry_after_seconds: None,
            session_idle_timeout_ms: limits::MIXPANEL_SESSION_IDLE_SECONDS * 1000,
            query_window_ms: 3_600_000,
        }
    }
}

impl MixpanelConfig {
    pub(crate) fn validate(&self) -> Result<(), StandinError> {
        if self.page_size == 0 {
            return Err(StandinError::Invalid("page_size must be at least 1".into()));
        }
        if self.query_window_ms == 0 {
            return Err(StandinError::Invalid(
                "query_window_ms must be at least 1".into(),
            ));
        }
        if self.max_concurrent_queries == 0 {
            return Err(StandinError::Invalid(
                "max_concurrent_queries must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// A running Mixpanel stand-in; dropping it stops the server.
pub struct MixpanelStandin {
    shared: Arc<Shared>,
    server: RunningServer,
}

impl MixpanelStandin {
    /// Starts the stand-in on an ephemeral port of 127.0.0.1.
    pub async fn start(seed: MixpanelSeed, config: MixpanelConfig) -> Result<Self, StandinError> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), seed, config).await
    }

    /// Starts the stand-in on `addr`, which must be a loopback address.
    pub async fn start_on(
        addr: SocketAddr,
        seed: MixpanelSeed,
        config: MixpanelConfig,
    ) -> Result<Self, StandinError> {
        let shared = Shared::new(&seed, config)?;
        let server = serve(addr, router(shared.clone()), "mixpanel").await?;
        Ok(Self { shared, server })
    }

    /// Returns the base URL, such as `http://127.0.0.1:40123`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn config(&self) -> MixpanelConfig {
        self.shared.config()
    }

    /// Replaces the configuration; paging sessions already open keep their page size.
    pub fn set_config(&self, config: MixpanelConfig) -> Result<(), StandinError> {
        self.shared.set_config(config)
    }

    /// Returns every recorded request, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.recorder.since(0)
    }

    /// Returns the recorded requests with an id greater than `id`.
    pub fn requests_since(&self, id: u64) -> Vec<RequestRecord> {
        self.shared.recorder.since(id)
    }

    pub fn clear_requests(&self) {
        self.shared.recorder.clear();
    }

    /// Installs a fault and returns its id.
    pub fn add_fault(&self, fault: Fault) -> u64 {
        self.shared.state.lock().faults.add(fault)
    }

    pub fn remove_fault(&self, id: u64) -> bool {
        self.shared.state.lock().faults.remove(id)
    }

    pub fn clear_faults(&self) {
        self.shared.state.lock().faults.clear();
    }

    pub fn faults(&self) -> Vec<ActiveFault> {
        self.shared.state.lock().faults.list()
    }

    pub fn stats(&self) -> MixpanelStats {
        self.shared.stats()
    }

    pub fn project_stats(&self, project_id: u64) -> Option<ProjectStats> {
        self.shared
            .stats()
            .projects
            .into_iter()
            .find(|project| project.project_id == project_id)
    }

    /// Creates or replaces a cohort; inline member profiles update the project's profiles.
    pub fn set_cohort(&self, project_id: u64, cohort: CohortSeed) -> Result<(), StandinError> {
        self.shared.set_cohort(project_id, cohort)
    }

    /// Replaces a cohort's members (and the profiles given in place) while running.
    pub fn set_cohort_members(
        &self,
        project_id: u64,
        cohort_id: u64,
        members: Vec<MemberSeed>,
    ) -> Result<(), StandinError> {
        self.shared
            .set_members(project_id, cohort_id, members, None)
    }

    /// Replaces a cohort's members with generated ones.
    pub fn set_cohort_generator(
        &self,
        project_id: u64,
        cohort_id: u64,
        generator: GeneratorSeed,
    ) -> Result<(), StandinError> {
        self.shared
            .set_members(project_id, cohort_id, Vec::new(), Some(generator))
    }

    /// Creates or replaces profiles; a profile with no property is removed.
    pub fn upsert_profiles(
        &self,
        project_id: u64,
        profiles: Vec<ProfileSeed>,
    ) -> Result<(), StandinError> {
        self.shared.upsert_profiles(project_id, profiles)
    }

    /// Marks a cohort available, deleted or unavailable.
    pub fn set_cohort_availability(
        &self,
        project_id: u64,
        cohort_id: u64,
        availability: Availability,
    ) -> Result<(), StandinError> {
        self.shared
            .set_availability(project_id, cohort_id, availability)
    }

    /// Changes a service account's secret; the old secret is rejected from now on.
    pub fn set_account_secret(&self, username: &str, secret: &str) -> Result<(), StandinError> {
        self.shared.set_account_secret(username, secret)
    }

    /// Gives or takes away a project's Query API access (402 without it).
    pub fn set_api_access(&self, project_id: u64, api_access: bool) -> Result<(), StandinError> {
        self.shared.set_api_access(project_id, api_access)
    }

    /// Expires one paging session, or all of the project's when `session_id` is
    /// `None`; returns how many were expired.
    pub fn expire_sessions(
        &self,
        project_id: u64,
        session_id: Option<&str>,
    ) -> Result<usize, StandinError> {
        self.shared.expire_sessions(project_id, session_id)
    }

    /// Forgets the queries counted in the last hour, for every project.
    pub fn reset_limits(&self) {
        self.shared.reset_limits();
    }

    /// Returns a cohort's current members in the order Engage serves them.
    pub fn cohort_members(
        &self,
        project_id: u64,
        cohort_id: u64,
    ) -> Result<Vec<MemberView>, StandinError> {
        self.shared.cohort_members(project_id, cohort_id)
    }
}

fn router(shared: Arc<Shared>) -> Router {
    let recorder = shared.recorder.clone();
    api::routes()
        .merge(control::routes())
        .fallback(api::not_found)
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(
            recorder,
            record_requests,
        ))
}
