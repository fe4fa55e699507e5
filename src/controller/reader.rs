//! Mixpanel calls as the controllers make them: through the project's query
//! budget, with retries, metrics and progress reports.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use super::progress::Tracker;
use crate::budget::{ProjectBudget, ProjectKey, Wait};
use crate::conditions::reasons;
use crate::mixpanel::{self, Cohort, PageBody, ProjectAccess};
use crate::retry::retry;

/// Pause applied to a project after a 429 that names no `Retry-After`.
const DEFAULT_RATE_LIMIT_PAUSE: Duration = Duration::from_secs(30);

/// Reads one Mixpanel project for one caller.
pub struct ProjectReader<'a> {
    shared: &'a Shared,
    access: ProjectAccess,
    key: ProjectKey,
    budget: Arc<ProjectBudget>,
    tracker: Option<&'a Tracker>,
}

impl<'a> ProjectReader<'a> {
    /// Builds a reader; progress and waits go to the tracker when one is given.
    pub fn new(
        shared: &'a Shared,
        access: ProjectAccess,
        key: ProjectKey,
        budget: Arc<ProjectBudget>,
        tracker: Option<&'a Tracker>,
    ) -> Self {
        Self {
            shared,
            access,
            key,
            budget,
            tracker,
        }
    }

    /// The project's cohorts, from the cache when it is younger than its TTL
    /// and `fresh` is false.
    pub async fn cohorts(&self, fresh: bool) -> Result<Arc<Vec<Cohort>>, mixpanel::Error> {
        if !fresh {
            let cache = self.shared.cohorts.lock().expect("cohort cache lock");
            if let Some(cached) = cache.get(&self.key)
                && cached.read_at.elapsed() < self.shared.config.cohort_cache_ttl
            {
                return Ok(cached.list.clone());
            }
        }
        let list = Arc::new(
            self.call("cohorts_list", true, || {
                self.shared.mixpanel.list_cohorts(&self.access)
            })
            .await?,
        );
        self.shared
            .cohorts
            .lock()
            .expect("cohort cache lock")
            .insert(
                self.key,
                super::CachedCohorts {
                    read_at: Instant::now(),
                    list: list.clone(),
                },
            );
        Ok(list)
    }

    /// Age of the cached cohort list, if there is one.
    pub fn cohorts_age(&self) -> Option<Duration> {
        let cache = self.shared.cohorts.lock().expect("cohort cache lock");
        cache.get(&self.key).map(|cached| cached.read_at.elapsed())
    }

    /// Reads one page of a cohort's profiles.
    pub async fn page(
        &self,
        cohort_id: i64,
        page: u64,
        session_id: Option<&str>,
    ) -> Result<PageBody, mixpanel::Error> {
        // NOTE: whether Mixpanel counts follow-up pages of one query toward
        // the hourly allowance is not documented; by default only the first
        // page spends the budget, and --count-follow-up-pages changes that.
        let new_query = page == 0 || self.shared.config.count_follow_up_pages;
        self.call("engage", new_query, || {
            self.shared
                .mixpanel
                .engage_page(&self.access, cohort_id, page, session_id)
        })
        .await
    }

    /// Estimated wait for `queries` more new queries.
    pub fn budget_wait(&self, queries: u64) -> Duration {
        self.budget.estimate(queries)
    }

    async fn call<T, F, Fut>(
        &self,
        operation: &'static str,
        new_query: bool,
        request: F,
    ) -> Result<T, mixpanel::Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, mixpanel::Error>>,
    {
        let metrics = &self.shared.metrics;
        let project = self.access.project_id;
        retry(
            &self.shared.config.call_retry,
            || async {
                let waited = Instant::now();
                let permit = self
                    .budget
                    .acquire(new_query, |wait| self.report_wait(project, wait))
                    .await;
                let seconds = waited.elapsed().as_secs_f64();
                if seconds > 0.001 {
                    metrics.rate_limit_wait("mixpanel", "budget", seconds);
                }
                if new_query {
                    metrics.mixpanel_query(self.key, self.budget.limits().per_hour);
                }
                let result = request().await;
                drop(permit);
                metrics.api_call("mixpanel", operation, status_of(&result));
                if let Err(mixpanel::Error::RateLimited { retry_after, .. }) = &result {
                    self.budget
                        .pause(retry_after.unwrap_or(DEFAULT_RATE_LIMIT_PAUSE));
                }
                result
            },
            |error, delay, attempt| {
                if error.retry_after().is_some() {
                    metrics.rate_limit_wait("mixpanel", "retry_after", delay.as_secs_f64());
                }
                let reason = super::failure::Failure::mixpanel(error).reason;
                tracing::info!(
                    %error, operation, attempt, delay_ms = delay.as_millis() as u64,
                    "Mixpanel request failed; retrying"
                );
                if let Some(tracker) = self.tracker {
                    tracker.waiting(
                        reason,
                        format!(
                            "{}; retry {attempt} in {}",
                            crate::failure_chain(error),
                            humantime::format_duration(round(delay))
                        ),
                    );
                }
            },
        )
        .await
    }

    fn report_wait(&self, project: i64, wait: Wait) {
        let Some(tracker) = self.tracker else { return };
        let message = match wait {
            Wait::Concurrency => {
                format!(
                    "waiting for one of the concurrent query slots of Mixpanel project {project}"
                )
            }
            Wait::Hourly(delay) => format!(
                "waiting {} for Mixpanel project {project}'s hourly query allowance ({} of {} used)",
                humantime::format_duration(round(delay)),
                self.budget.used_last_hour(),
                self.budget.limits().per_hour
            ),
            Wait::Paused(delay) => format!(
                "Mixpanel project {project} answered 429; waiting {}",
                humantime::format_duration(round(delay))
            ),
        };
        tracker.waiting(reasons::MIXPANEL_RATE_LIMITED, message);
    }
}

/// Rounds a delay to whole seconds for messages.
pub fn round(delay: Duration) -> Duration {
    Duration::from_secs(delay.as_secs_f64().round() as u64)
}

fn status_of<T>(result: &Result<T, mixpanel::Error>) -> Option<u16> {
    use mixpanel::Error as E;
    match result {
        Ok(_) => Some(200),
        Err(
            E::Unauthorized { status, .. } | E::Rejected { status, .. } | E::Server { status, .. },
        ) => Some(*status),
        Err(E::Forbidden { .. }) => Some(403),
        Err(E::PaymentRequired { .. }) => Some(402),
        Err(E::RateLimited { .. }) => Some(429),
        Err(E::SessionExpired { .. }) => Some(400),
        Err(E::Transport(_) | E::Decode(_)) => None,
    }
}
