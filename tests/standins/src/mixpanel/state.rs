//! Mixpanel stand-in state: accounts, projects, cohorts, profiles, paging
//! sessions and query usage, behind one lock that is never held across an await.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::MixpanelConfig;
use super::members::{MemberList, MemberView, Properties, resolve_members};
use crate::StandinError;
use crate::faults::FaultSet;
use crate::limits::MAX_GENERATED_MEMBERS;
use crate::record::Recorder;
use crate::seed::{
    Availability, CohortSeed, DistinctId, GeneratorSeed, MemberSeed, MixpanelSeed, ProfileSeed,
};
use crate::util::{format_utc, now_ms};

pub(crate) struct Shared {
    pub state: Mutex<MixpanelState>,
    pub recorder: Arc<Recorder>,
}

pub(crate) struct MixpanelState {
    pub config: MixpanelConfig,
    pub accounts: HashMap<String, Account>,
    pub projects: BTreeMap<u64, Project>,
    pub faults: FaultSet,
    pub fault_responses: u64,
}

pub(crate) struct Account {
    pub secret: String,
    pub projects: HashSet<u64>,
}

pub(crate) struct Project {
    pub api_access: bool,
    pub profiles: HashMap<DistinctId, Properties>,
    pub cohorts: BTreeMap<u64, Cohort>,
    pub sessions: HashMap<String, Session>,
    pub usage: QueryUsage,
}

pub(crate) struct Cohort {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub created: String,
    pub is_visible: bool,
    pub availability: Availability,
    membership: Membership,
    pub members: Arc<MemberList>,
}

enum Membership {
    Explicit(Vec<DistinctId>),
    Generated(GeneratorSeed),
}

/// An Engage paging session: the query and the member list as they were at page 0.
pub(crate) struct Session {
    pub cohort_id: u64,
    pub members: Arc<MemberList>,
    pub include_all_users: bool,
    pub output_properties: Option<Arc<[String]>>,
    pub page_size: usize,
    pub last_used: Instant,
    pub expired: bool,
}

#[derive(Default)]
pub(crate) struct QueryUsage {
    pub in_flight: usize,
    pub max_in_flight: usize,
    /// Arrival times of the counted queries of the last hour.
    pub window: VecDeque<Instant>,
    pub counted: u64,
    pub requests_admitted: u64,
    pub rejected_concurrent: u64,
    pub rejected_hourly: u64,
}

/// Why a query was not admitted, with the numbers for the 429 message.
pub(crate) struct LimitExceeded {
    pub running: usize,
    pub in_last_hour: usize,
}

/// Query usage of one project.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectStats {
    pub project_id: u64,
    /// Queries running now.
    pub in_flight: usize,
    /// Most queries seen running at once.
    pub max_in_flight: usize,
    /// Queries counted toward the hourly limit since start (or the last reset).
    pub queries_counted: u64,
    /// Queries counted in the last hour.
    pub queries_in_last_hour: usize,
    /// Queries admitted, counted toward the hourly limit or not.
    pub requests_admitted: u64,
    /// 429 responses because too many queries were running.
    pub rejected_concurrent: u64,
    /// 429 responses because the hourly limit was used up.
    pub rejected_hourly: u64,
    pub open_sessions: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MixpanelStats {
    pub projects: Vec<ProjectStats>,
    /// All 429 responses the limits produced (faults not included).
    pub rate_limited: u64,
    /// Responses produced by faults.
    pub fault_responses: u64,
    /// Requests dropped from the log because it was full.
    pub requests_discarded: u64,
}

impl Shared {
    pub(crate) fn new(
        seed: &MixpanelSeed,
        config: MixpanelConfig,
    ) -> Result<Arc<Self>, StandinError> {
        config.validate()?;
        let mut accounts = HashMap::new();
        for account in &seed.service_accounts {
            let previous = accounts.insert(
                account.username.clone(),
                Account {
                    secret: account.secret.clone(),
                    projects: account.projects.iter().copied().collect(),
                },
            );
            if previous.is_some() {
                return Err(StandinError::InvalidSeed(format!(
                    "service account {} is listed twice",
                    account.username
                )));
            }
        }
        let mut projects = BTreeMap::new();
        for project_seed in &seed.projects {
            let mut project = Project {
                api_access: project_seed.api_access,
                profiles: HashMap::new(),
                cohorts: BTreeMap::new(),
                sessions: HashMap::new(),
                usage: QueryUsage::default(),
            };
            upsert_profiles(&mut project, project_seed.profiles.clone());
            for cohort in &project_seed.cohorts {
                if project.cohorts.contains_key(&cohort.id) {
                    return Err(StandinError::InvalidSeed(format!(
                        "cohort {} is listed twice in project {}",
                        cohort.id, project_seed.id
                    )));
                }
                insert_cohort(&mut project, cohort.clone()).map_err(|error| {
                    StandinError::InvalidSeed(format!("project {}: {error}", project_seed.id))
                })?;
            }
            if projects.insert(project_seed.id, project).is_some() {
                return Err(StandinError::InvalidSeed(format!(
                    "project {} is listed twice",
                    project_seed.id
                )));
            }
        }
        Ok(Arc::new(Self {
            state: Mutex::new(MixpanelState {
                config,
                accounts,
                projects,
                faults: FaultSet::default(),
                fault_responses: 0,
            }),
            recorder: Recorder::new(),
        }))
    }

    pub(crate) fn config(&self) -> MixpanelConfig {
        self.state.lock().config.clone()
    }

    pub(crate) fn set_config(&self, config: MixpanelConfig) -> Result<(), StandinError> {
        config.validate()?;
        self.state.lock().config = config;
        Ok(())
    }

    pub(crate) fn stats(&self) -> MixpanelStats {
        let mut state = self.state.lock();
        let now = Instant::now();
        let window = Duration::from_millis(state.config.query_window_ms);
        let mut rate_limited = 0;
        let projects = state
            .projects
            .iter_mut()
            .map(|(&project_id, project)| {
                prune_window(&mut project.usage.window, now, window);
                rate_limited += project.usage.rejected_concurrent + project.usage.rejected_hourly;
                ProjectStats {
                    project_id,
                    in_flight: project.usage.in_flight,
                    max_in_flight: project.usage.max_in_flight,
                    queries_counted: project.usage.counted,
                    queries_in_last_hour: project.usage.window.len(),
                    requests_admitted: project.usage.requests_admitted,
                    rejected_concurrent: project.usage.rejected_concurrent,
                    rejected_hourly: project.usage.rejected_hourly,
                    open_sessions: project.sessions.values().filter(|s| !s.expired).count(),
                }
            })
            .collect();
        MixpanelStats {
            projects,
            rate_limited,
            fault_responses: state.fault_responses,
            requests_discarded: self.recorder.discarded(),
        }
    }

    pub(crate) fn set_cohort(
        &self,
        project_id: u64,
        cohort: CohortSeed,
    ) -> Result<(), StandinError> {
        let mut state = self.state.lock();
        let project = project_mut(&mut state, project_id)?;
        insert_cohort(project, cohort)
    }

    pub(crate) fn set_members(
        &self,
        project_id: u64,
        cohort_id: u64,
        members: Vec<MemberSeed>,
        generator: Option<GeneratorSeed>,
    ) -> Result<(), StandinError> {
        let mut state = self.state.lock();
        let project = project_mut(&mut state, project_id)?;
        if !project.cohorts.contains_key(&cohort_id) {
            return Err(cohort_not_found(project_id, cohort_id));
        }
        let membership = build_membership(project, members, generator)?;
        let list = build_list(&membership, &project.profiles);
        rebuild_explicit_cohorts(project);
        let cohort = project
            .cohorts
            .get_mut(&cohort_id)
            .expect("cohort checked above");
        cohort.membership = membership;
        cohort.members = list;
        Ok(())
    }

    pub(crate) fn upsert_profiles(
        &self,
        project_id: u64,
        profiles: Vec<ProfileSeed>,
    ) -> Result<(), StandinError> {
        let mut state = self.state.lock();
        let project = project_mut(&mut state, project_id)?;
        upsert_profiles(project, profiles);
        rebuild_explicit_cohorts(project);
        Ok(())
    }

    pub(crate) fn set_availability(
        &self,
        project_id: u64,
        cohort_id: u64,
        availability: Availability,
    ) -> Result<(), StandinError> {
        let mut state = self.state.lock();
        let project = project_mut(&mut state, project_id)?;
        let cohort = project
            .cohorts
            .get_mut(&cohort_id)
            .ok_or_else(|| cohort_not_found(project_id, cohort_id))?;
        cohort.availability = availability;
        Ok(())
    }

    pub(crate) fn set_account_secret(
        &self,
        username: &str,
        secret: &str,
    ) -> Result<(), StandinError> {
        let mut state = self.state.lock();
        let account = state.accounts.get_mut(username).ok_or_else(|| {
            StandinError::NotFound(format!("service account {username} not found"))
        })?;
        account.secret = secret.to_string();
        Ok(())
    }

    pub(crate) fn set_api_access(
        &self,
        project_id: u64,
        api_access: bool,
    ) -> Result<(), StandinError> {
        let mut state = self.state.lock();
        project_mut(&mut state, project_id)?.api_access = api_access;
        Ok(())
    }

    pub(crate) fn expire_sessions(
        &self,
        project_id: u64,
        session_id: Option<&str>,
    ) -> Result<usize, StandinError> {
        let mut state = self.state.lock();
        let project = project_mut(&mut state, project_id)?;
        Ok(expire_sessions(project, session_id))
    }

    pub(crate) fn reset_limits(&self) {
        let mut state = self.state.lock();
        for project in state.projects.values_mut() {
            project.usage.window.clear();
        }
    }

    pub(crate) fn cohort_members(
        &self,
        project_id: u64,
        cohort_id: u64,
    ) -> Result<Vec<MemberView>, StandinError> {
        let list = {
            let mut state = self.state.lock();
            let project = project_mut(&mut state, project_id)?;
            project
                .cohorts
                .get(&cohort_id)
                .ok_or_else(|| cohort_not_found(project_id, cohort_id))?
                .members
                .clone()
        };
        Ok(list.all())
    }
}

impl MixpanelState {
    /// Admits a query for the project, or returns the numbers of the limit it
    /// exceeds. With `counted` the query counts toward the hourly limit.
    pub(crate) fn admit(&mut self, project_id: u64, counted: bool) -> Result<usize, LimitExceeded> {
        let max_concurrent = self.config.max_concurrent_queries;
        let hourly_limit = self.config.hourly_query_limit as usize;
        let window = Duration::from_millis(self.config.query_window_ms);
        let usage = &mut self
            .projects
            .get_mut(&project_id)
            .expect("admit is called for existing projects")
            .usage;
        let now = Instant::now();
        prune_window(&mut usage.window, now, window);
        let in_last_hour = usage.window.len() + usize::from(counted);

        if usage.in_flight >= max_concurrent {
            usage.rejected_concurrent += 1;
            return Err(LimitExceeded {
                running: usage.in_flight + 1,
                in_last_hour,
            });
        }
        if counted && hourly_limit > 0 && usage.window.len() >= hourly_limit {
            usage.rejected_hourly += 1;
            return Err(LimitExceeded {
                running: usage.in_flight + 1,
                in_last_hour,
            });
        }

        usage.in_flight += 1;
        usage.max_in_flight = usage.max_in_flight.max(usage.in_flight);
        usage.requests_admitted += 1;
        if counted {
            usage.window.push_back(now);
            usage.counted += 1;
        }
        Ok(usage.in_flight)
    }

    pub(crate) fn release(&mut self, project_id: u64) {
        if let Some(project) = self.projects.get_mut(&project_id) {
            project.usage.in_flight = project.usage.in_flight.saturating_sub(1);
        }
    }
}

fn prune_window(window: &mut VecDeque<Instant>, now: Instant, length: Duration) {
    while let Some(&oldest) = window.front() {
        if now.duration_since(oldest) >= length {
            window.pop_front();
        } else {
            break;
        }
    }
}

pub(crate) fn expire_sessions(project: &mut Project, session_id: Option<&str>) -> usize {
    let mut expired = 0;
    for (id, session) in project.sessions.iter_mut() {
        if session_id.is_none_or(|wanted| wanted == id) && !session.expired {
            session.expired = true;
            expired += 1;
        }
    }
    expired
}

/// Removes sessions idle for longer than `idle_timeout`.
pub(crate) fn purge_idle_sessions(project: &mut Project, idle_timeout: Duration, now: Instant) {
    project
        .sessions
        .retain(|_, session| now.duration_since(session.last_used) <= idle_timeout);
}

fn project_mut(state: &mut MixpanelState, project_id: u64) -> Result<&mut Project, StandinError> {
    state
        .projects
        .get_mut(&project_id)
        .ok_or_else(|| StandinError::NotFound(format!("project {project_id} not found")))
}

fn cohort_not_found(project_id: u64, cohort_id: u64) -> StandinError {
    StandinError::NotFound(format!(
        "cohort {cohort_id} not found in project {project_id}"
    ))
}

fn upsert_profiles(project: &mut Project, profiles: Vec<ProfileSeed>) {
    for profile in profiles {
        if profile.properties.is_empty() {
            project.profiles.remove(&profile.distinct_id);
        } else {
            project
                .profiles
                .insert(profile.distinct_id, Arc::new(profile.properties));
        }
    }
}

fn build_membership(
    project: &mut Project,
    members: Vec<MemberSeed>,
    generator: Option<GeneratorSeed>,
) -> Result<Membership, StandinError> {
    match generator {
        Some(generator) => {
            if !members.is_empty() {
                return Err(StandinError::Invalid(
                    "a cohort takes either members or generate, not both".into(),
                ));
            }
            if generator.count > MAX_GENERATED_MEMBERS {
                return Err(StandinError::Invalid(format!(
                    "generate.count {} is above the maximum of {MAX_GENERATED_MEMBERS}",
                    generator.count
                )));
            }
            for (name, percent) in [
                ("percent_anonymous", generator.percent_anonymous),
                ("percent_mapping_id", generator.percent_mapping_id),
                ("percent_long_ids", generator.percent_long_ids),
                ("percent_non_ascii", generator.percent_non_ascii),
                ("percent_numeric_ids", generator.percent_numeric_ids),
            ] {
                if !(0.0..=100.0).contains(&percent) {
                    return Err(StandinError::Invalid(format!(
                        "generate.{name} is {percent}; expected a value from 0 to 100"
                    )));
                }
            }
            Ok(Membership::Generated(generator))
        }
        None => {
            let mut ids = Vec::with_capacity(members.len());
            let mut inline_profiles = Vec::new();
            for member in members {
                match member {
                    MemberSeed::Id(id) => ids.push(id),
                    MemberSeed::Profile(profile) => {
                        ids.push(profile.distinct_id.clone());
                        inline_profiles.push(profile);
                    }
                }
            }
            upsert_profiles(project, inline_profiles);
            Ok(Membership::Explicit(ids))
        }
    }
}

fn build_list(
    membership: &Membership,
    profiles: &HashMap<DistinctId, Properties>,
) -> Arc<MemberList> {
    Arc::new(match membership {
        Membership::Explicit(ids) => MemberList::explicit(resolve_members(ids, profiles)),
        Membership::Generated(generator) => MemberList::generated(generator.clone()),
    })
}

/// Re-resolves explicit cohorts after a profile change. Generated cohorts do not
/// use project profiles. Open sessions keep the lists they started with.
fn rebuild_explicit_cohorts(project: &mut Project) {
    for cohort in project.cohorts.values_mut() {
        if let Membership::Explicit(ids) = &cohort.membership {
            cohort.members = Arc::new(MemberList::explicit(resolve_members(
                ids,
                &project.profiles,
            )));
        }
    }
}

fn insert_cohort(project: &mut Project, seed: CohortSeed) -> Result<(), StandinError> {
    let membership = build_membership(project, seed.members, seed.generate)?;
    rebuild_explicit_cohorts(project);
    let members = build_list(&membership, &project.profiles);
    let created = seed.created.unwrap_or_else(|| format_utc(now_ms() / 1000));
    project.cohorts.insert(
        seed.id,
        Cohort {
            id: seed.id,
            name: seed.name,
            description: seed.description,
            created,
            is_visible: seed.is_visible,
            availability: seed.availability.unwrap_or_default(),
            membership,
            members,
        },
    );
    Ok(())
}
