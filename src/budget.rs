//! Query budgets per Mixpanel project, shared by every connection and sync
//! that reads the project.
//!
//! Mixpanel limits each project to a number of queries per hour and a number
//! of concurrent queries, whoever sends them. The operator spends the
//! allowance through one [`ProjectBudget`] per project so that it never causes
//! a 429 itself: a caller waits for a concurrency slot and, for requests that
//! start a query, for room in the sliding hour. A query occupies the hour
//! from the moment its response arrives, not from when it was sent. Mixpanel
//! counts it from some instant in between, so counting from the end keeps a
//! slow request from overlapping the next window. A 429 that arrives anyway
//! (another client of the same project) pauses the whole project for the
//! wait Mixpanel asked for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::crd::Region;

/// Length of the window of the hourly allowance.
pub const HOUR: Duration = Duration::from_secs(3600);

/// Identifies a Mixpanel project across connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProjectKey {
    /// Data residency region.
    pub region: Region,
    /// Project id.
    pub project_id: i64,
}

/// Limits of one project.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Queries per sliding hour; 0 means no hourly limit.
    pub per_hour: u32,
    /// Requests in flight at once.
    pub concurrent: u32,
}

/// Budgets of every project the operator reads.
pub struct Budgets {
    projects: Mutex<HashMap<ProjectKey, Arc<ProjectBudget>>>,
    window: Duration,
}

impl Default for Budgets {
    fn default() -> Self {
        Self::with_window(HOUR)
    }
}

impl Budgets {
    /// Budgets whose allowance window is `window` instead of an hour; only
    /// benchmarks shorten it, to reach the limit in minutes.
    pub fn with_window(window: Duration) -> Self {
        Self {
            projects: Mutex::default(),
            window,
        }
    }

    /// Returns the budget of a project, creating it with the given limits, or
    /// updating the limits of an existing one.
    pub fn project(&self, key: ProjectKey, limits: Limits) -> Arc<ProjectBudget> {
        let mut projects = self.projects.lock().expect("budget map lock");
        let budget = projects
            .entry(key)
            .or_insert_with(|| Arc::new(ProjectBudget::new(limits, self.window)))
            .clone();
        budget.set_limits(limits);
        budget
    }
}

/// The allowance of one project.
pub struct ProjectBudget {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    limits: Limits,
    window: Duration,
    in_flight: u32,
    /// Queries in the sliding window, oldest first, by id and by the instant
    /// they count from (their admission until they finish).
    started: VecDeque<(u64, Instant)>,
    next_query: u64,
    paused_until: Option<Instant>,
}

/// A slot of the project's concurrency, released on drop.
pub struct Permit {
    budget: Arc<ProjectBudget>,
    query: Option<u64>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().expect("budget lock");
        state.in_flight -= 1;
        if let Some(query) = self.query {
            let now = Instant::now();
            if let Some(entry) = state.started.iter_mut().rev().find(|(id, _)| *id == query) {
                entry.1 = entry.1.max(now);
            }
        }
        drop(state);
        self.budget.changed.notify_waiters();
    }
}

/// Why a caller waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// All concurrent slots are taken.
    Concurrency,
    /// The hourly allowance is spent; room frees up after the delay.
    Hourly(Duration),
    /// Mixpanel asked to wait after a 429.
    Paused(Duration),
}

impl ProjectBudget {
    fn new(limits: Limits, window: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                limits,
                window,
                in_flight: 0,
                started: VecDeque::new(),
                next_query: 0,
                paused_until: None,
            }),
            changed: Notify::new(),
        }
    }

    fn set_limits(&self, limits: Limits) {
        let mut state = self.state.lock().expect("budget lock");
        if state.limits != limits {
            state.limits = limits;
            drop(state);
            self.changed.notify_waiters();
        }
    }

    /// Waits for a slot. A request that starts a query (`new_query`) also
    /// needs room in the hourly allowance and spends it. `on_wait` is told
    /// each time the caller has to wait, and why.
    pub async fn acquire(
        self: &Arc<Self>,
        new_query: bool,
        mut on_wait: impl FnMut(Wait),
    ) -> Permit {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let wait = {
                let mut state = self.state.lock().expect("budget lock");
                let now = Instant::now();
                match state.admit(now, new_query) {
                    None => {
                        state.in_flight += 1;
                        let query = (new_query && state.limits.per_hour > 0).then(|| {
                            let id = state.next_query;
                            state.next_query += 1;
                            state.started.push_back((id, now));
                            id
                        });
                        return Permit {
                            budget: Arc::clone(self),
                            query,
                        };
                    }
                    Some(wait) => wait,
                }
            };
            on_wait(wait);
            match wait {
                Wait::Concurrency => notified.await,
                Wait::Hourly(delay) | Wait::Paused(delay) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Stops every caller of the project for a while, after Mixpanel answered 429.
    pub fn pause(&self, delay: Duration) {
        let mut state = self.state.lock().expect("budget lock");
        let until = Instant::now() + delay;
        if state.paused_until.is_none_or(|current| current < until) {
            state.paused_until = Some(until);
        }
    }

    /// Estimates how long `queries` more new queries take to be admitted,
    /// given what the sliding hour already holds.
    pub fn estimate(&self, queries: u64) -> Duration {
        let mut state = self.state.lock().expect("budget lock");
        let now = Instant::now();
        state.expire(now);
        let per_hour = u64::from(state.limits.per_hour);
        if per_hour == 0 {
            return Duration::ZERO;
        }
        let room = per_hour.saturating_sub(state.started.len() as u64);
        if queries <= room {
            return Duration::ZERO;
        }
        let beyond = queries - room;
        // Each full hour admits `per_hour` more; the first frees up as the
        // oldest entries of the window expire.
        let first_free = state
            .started
            .front()
            .map(|(_, t)| (*t + state.window).saturating_duration_since(now))
            .unwrap_or_default();
        first_free
            + state
                .window
                .mul_f64((beyond.saturating_sub(1) / per_hour) as f64)
    }

    /// Queries started in the last hour.
    pub fn used_last_hour(&self) -> u64 {
        let mut state = self.state.lock().expect("budget lock");
        state.expire(Instant::now());
        state.started.len() as u64
    }

    /// Current limits.
    pub fn limits(&self) -> Limits {
        self.state.lock().expect("budget lock").limits
    }
}

impl State {
    fn expire(&mut self, now: Instant) {
        // Entries finish out of order, so one that finished late can keep an
        // older one ahead of it. That only overcounts, never undercounts.
        while self
            .started
            .front()
            .is_some_and(|(_, t)| now.duration_since(*t) >= self.window)
        {
            self.started.pop_front();
        }
    }

    fn admit(&mut self, now: Instant, new_query: bool) -> Option<Wait> {
        if let Some(until) = self.paused_until {
            if now < until {
                return Some(Wait::Paused(until - now));
            }
            self.paused_until = None;
        }
        if self.in_flight >= self.limits.concurrent.max(1) {
            return Some(Wait::Concurrency);
        }
        self.expire(now);
        let per_hour = self.limits.per_hour as usize;
        if new_query && per_hour > 0 && self.started.len() >= per_hour {
            let (_, oldest) = *self.started.front().expect("a full window has entries");
            return Some(Wait::Hourly(
                (oldest + self.window).saturating_duration_since(now),
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(per_hour: u32, concurrent: u32) -> Arc<ProjectBudget> {
        Budgets::default().project(
            ProjectKey {
                region: Region::US,
                project_id: 1,
            },
            Limits {
                per_hour,
                concurrent,
            },
        )
    }

    #[tokio::test(start_paused = true)]
    async fn hourly_allowance_is_never_exceeded() {
        let b = budget(3, 5);
        let start = Instant::now();
        let mut admitted = Vec::new();
        for _ in 0..7 {
            drop(b.acquire(true, |_| {}).await);
            admitted.push(start.elapsed());
        }
        // Three at once, three an hour later, one two hours later.
        assert_eq!(admitted[2], Duration::ZERO);
        assert!(admitted[3] >= HOUR && admitted[5] < HOUR + Duration::from_secs(1));
        assert!(admitted[6] >= 2 * HOUR);
        // No sliding hour ever held more than three starts.
        for (i, t) in admitted.iter().enumerate() {
            let in_window = admitted[..i].iter().filter(|s| *t - **s < HOUR).count();
            assert!(
                in_window < 3,
                "start {i} had {in_window} others in its hour"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn query_counts_from_when_its_answer_arrived() {
        let b = budget(1, 5);
        let start = Instant::now();
        let slow = b.acquire(true, |_| {}).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(slow);
        drop(b.acquire(true, |_| {}).await);
        assert_eq!(start.elapsed(), HOUR + Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn follow_up_requests_skip_hourly_allowance() {
        let b = budget(1, 5);
        drop(b.acquire(true, |_| {}).await);
        let start = Instant::now();
        for _ in 0..10 {
            drop(b.acquire(false, |_| {}).await);
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(b.used_last_hour(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_limited() {
        let b = budget(0, 2);
        let first = b.acquire(false, |_| {}).await;
        let _second = b.acquire(false, |_| {}).await;
        let waits = Arc::new(Mutex::new(Vec::new()));
        let waiter = {
            let b = b.clone();
            let waits = waits.clone();
            tokio::spawn(async move {
                let _third = b.acquire(false, |w| waits.lock().unwrap().push(w)).await;
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        assert_eq!(waits.lock().unwrap().as_slice(), [Wait::Concurrency]);
        drop(first);
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn pause_holds_every_caller() {
        let b = budget(0, 5);
        b.pause(Duration::from_secs(30));
        let start = Instant::now();
        drop(b.acquire(false, |_| {}).await);
        assert!(start.elapsed() >= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn estimate_counts_full_hours() {
        let b = budget(2, 5);
        assert_eq!(b.estimate(2), Duration::ZERO);
        drop(b.acquire(true, |_| {}).await);
        drop(b.acquire(true, |_| {}).await);
        assert_eq!(b.estimate(1), HOUR);
        assert_eq!(b.estimate(3), 2 * HOUR);
    }

    #[tokio::test(start_paused = true)]
    async fn shorter_window_admits_sooner() {
        let budgets = Budgets::with_window(Duration::from_secs(10));
        let key = ProjectKey {
            region: Region::US,
            project_id: 3,
        };
        let b = budgets.project(
            key,
            Limits {
                per_hour: 2,
                concurrent: 5,
            },
        );
        let start = Instant::now();
        for _ in 0..5 {
            drop(b.acquire(true, |_| {}).await);
        }
        assert_eq!(start.elapsed(), Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn limits_follow_latest_configuration() {
        let budgets = Budgets::default();
        let key = ProjectKey {
            region: Region::EU,
            project_id: 9,
        };
        budgets.project(
            key,
            Limits {
                per_hour: 60,
                concurrent: 5,
            },
        );
        let b = budgets.project(
            key,
            Limits {
                per_hour: 10,
                concurrent: 2,
            },
        );
        assert_eq!(
            b.limits(),
            Limits {
                per_hour: 10,
                concurrent: 2
            }
        );
    }
}
