//! Faults injected on demand: each one matches requests by route and optional
//! project, cohort, site and page, fires a limited number of times, and then
//! disappears.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A real-service route a fault can match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    /// Mixpanel `POST /api/query/engage` and `/api/2.0/engage`.
    Engage,
    /// Mixpanel `/api/query/cohorts/list` and `/api/2.0/cohorts/list`.
    CohortsList,
    /// Kameleoon `POST /oauth/token`.
    Token,
    /// Kameleoon `GET /sites` and `GET /sites/byCode/{code}`.
    Sites,
    /// Kameleoon `GET` and `POST /custom-datas`.
    CustomDatas,
    /// Kameleoon Data API `POST /visit/events`.
    Events,
    /// Kameleoon Data API `GET /visit/visitor`.
    Visitor,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Engage => "engage",
            Route::CohortsList => "cohorts-list",
            Route::Token => "token",
            Route::Sites => "sites",
            Route::CustomDatas => "custom-datas",
            Route::Events => "events",
            Route::Visitor => "visitor",
        }
    }
}

/// What a fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FaultAction {
    /// Respond with `status` and `body` (a JSON string is sent as plain text, any
    /// other value as JSON, none as an empty body), plus `Retry-After` when set.
    Respond {
        status: u16,
        #[serde(default)]
        body: Option<Value>,
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Delay the request by `ms` milliseconds, then handle it normally. On
    /// Mixpanel the request keeps its concurrency slot during the delay.
    Delay { ms: u64 },
    /// Close the TCP connection without a response.
    DropConnection,
    /// Expire the Engage paging session named by the request (every session of
    /// the project when the request names none), then handle the request
    /// normally, so that a follow-up page gets the expired-session error.
    ExpireSession,
}

/// A fault with its match and how often it fires.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Route to match; absent matches every route of the server.
    #[serde(default)]
    pub route: Option<Route>,
    /// Mixpanel project to match.
    #[serde(default)]
    pub project_id: Option<u64>,
    /// Mixpanel cohort to match (from `filter_by_cohort`, or the paging session).
    #[serde(default)]
    pub cohort_id: Option<u64>,
    /// Kameleoon site code to match.
    #[serde(default)]
    pub site_code: Option<String>,
    /// Engage page number to match.
    #[serde(default)]
    pub page: Option<u64>,
    /// Number of times the fault fires before it is removed; 0 fires until cleared.
    #[serde(default = "default_times")]
    pub times: u32,
    /// Number of matching requests let through before the fault starts firing.
    #[serde(default)]
    pub after: u32,
    pub action: FaultAction,
}

fn default_times() -> u32 {
    1
}

impl Fault {
    /// Creates a fault that responds with `status` and `body` once on `route`.
    pub fn respond(route: Route, status: u16, body: Value) -> Self {
        Self::new(
            route,
            FaultAction::Respond {
                status,
                body: Some(body),
                retry_after: None,
            },
        )
    }

    /// Creates a fault that delays `route` once by `ms` milliseconds.
    pub fn delay(route: Route, ms: u64) -> Self {
        Self::new(route, FaultAction::Delay { ms })
    }

    /// Creates a fault that closes the connection of one `route` request.
    pub fn drop_connection(route: Route) -> Self {
        Self::new(route, FaultAction::DropConnection)
    }

    /// Creates a fault that expires the paging session of one Engage request.
    pub fn expire_session() -> Self {
        Self::new(Route::Engage, FaultAction::ExpireSession)
    }

    /// Creates a fault with the given action that fires once on `route`.
    pub fn new(route: Route, action: FaultAction) -> Self {
        Self {
            route: Some(route),
            project_id: None,
            cohort_id: None,
            site_code: None,
            page: None,
            times: 1,
            after: 0,
            action,
        }
    }

    /// Sets how many times the fault fires; 0 fires until cleared.
    pub fn times(mut self, times: u32) -> Self {
        self.times = times;
        self
    }

    /// Lets `count` matching requests through before the fault fires.
    pub fn after(mut self, count: u32) -> Self {
        self.after = count;
        self
    }

    pub fn project(mut self, project_id: u64) -> Self {
        self.project_id = Some(project_id);
        self
    }

    pub fn cohort(mut self, cohort_id: u64) -> Self {
        self.cohort_id = Some(cohort_id);
        self
    }

    pub fn site(mut self, site_code: impl Into<String>) -> Self {
        self.site_code = Some(site_code.into());
        self
    }

    pub fn page(mut self, page: u64) -> Self {
        self.page = Some(page);
        self
    }

    /// Adds `Retry-After: seconds` to a `Respond` fault; other actions are unchanged.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        if let FaultAction::Respond { retry_after, .. } = &mut self.action {
            *retry_after = Some(seconds);
        }
        self
    }

    fn matches(&self, facts: &RequestFacts) -> bool {
        fn field_matches<T: PartialEq>(wanted: &Option<T>, actual: &Option<T>) -> bool {
            match wanted {
                None => true,
                Some(value) => actual.as_ref() == Some(value),
            }
        }
        field_matches(&self.route, &Some(facts.route))
            && field_matches(&self.project_id, &facts.project_id)
            && field_matches(&self.cohort_id, &facts.cohort_id)
            && field_matches(&self.site_code, &facts.site_code)
            && field_matches(&self.page, &facts.page)
    }
}

/// Request details a handler has when it looks for a fault.
#[derive(Clone, Debug)]
pub(crate) struct RequestFacts {
    pub route: Route,
    pub project_id: Option<u64>,
    pub cohort_id: Option<u64>,
    pub site_code: Option<String>,
    pub page: Option<u64>,
}

impl RequestFacts {
    pub(crate) fn new(route: Route) -> Self {
        Self {
            route,
            project_id: None,
            cohort_id: None,
            site_code: None,
            page: None,
        }
    }
}

/// An installed fault with its counters, as listed by the control API.
#[derive(Clone, Debug, Serialize)]
pub struct ActiveFault {
    pub id: u64,
    pub fault: Fault,
    /// Matching requests seen so far.
    pub matched: u32,
    /// Times the fault has fired.
    pub fired: u32,
}

/// The faults installed on one server, in the order they were added.
#[derive(Default)]
pub(crate) struct FaultSet {
    next_id: u64,
    active: Vec<ActiveFault>,
}

impl FaultSet {
    pub(crate) fn add(&mut self, fault: Fault) -> u64 {
        self.next_id += 1;
        self.active.push(ActiveFault {
            id: self.next_id,
            fault,
            matched: 0,
            fired: 0,
        });
        self.next_id
    }

    pub(crate) fn remove(&mut self, id: u64) -> bool {
        let before = self.active.len();
        self.active.retain(|entry| entry.id != id);
        self.active.len() != before
    }

    pub(crate) fn clear(&mut self) {
        self.active.clear();
    }

    pub(crate) fn list(&self) -> Vec<ActiveFault> {
        self.active.clone()
    }

    /// Counts the request against every matching fault and returns the action
    /// of the first one due to fire, with its id.
    pub(crate) fn take(&mut self, facts: &RequestFacts) -> Option<(u64, FaultAction)> {
        let mut chosen = None;
        for entry in self.active.iter_mut() {
            if !entry.fault.matches(facts) {
                continue;
            }
            entry.matched += 1;
            if chosen.is_some() || entry.matched <= entry.fault.after {
                continue;
            }
            entry.fired += 1;
            chosen = Some((entry.id, entry.fault.action.clone()));
        }
        self.active
            .retain(|entry| entry.fault.times == 0 || entry.fired < entry.fault.times);
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(route: Route, page: Option<u64>) -> RequestFacts {
        RequestFacts {
            page,
            project_id: Some(7),
            ..RequestFacts::new(route)
        }
    }

    #[test]
    fn fires_times_then_disappears() {
        let mut set = FaultSet::default();
        set.add(Fault::respond(Route::Engage, 500, Value::Null).times(2));
        assert!(set.take(&facts(Route::Engage, Some(0))).is_some());
        assert!(set.take(&facts(Route::Engage, Some(1))).is_some());
        assert!(set.take(&facts(Route::Engage, Some(2))).is_none());
        assert!(set.list().is_empty());
    }

    #[test]
    fn matches_page_and_route_only() {
        let mut set = FaultSet::default();
        set.add(Fault::drop_connection(Route::Engage).page(1).project(7));
        assert!(set.take(&facts(Route::CohortsList, None)).is_none());
        assert!(set.take(&facts(Route::Engage, Some(0))).is_none());
        let (_, action) = set
            .take(&facts(Route::Engage, Some(1)))
            .expect("page 1 matches");
        assert_eq!(action, FaultAction::DropConnection);
    }

    #[test]
    fn after_lets_requests_through_first() {
        let mut set = FaultSet::default();
        set.add(Fault::delay(Route::Events, 10).after(2).times(0));
        assert!(set.take(&facts(Route::Events, None)).is_none());
        assert!(set.take(&facts(Route::Events, None)).is_none());
        assert!(set.take(&facts(Route::Events, None)).is_some());
        assert!(set.take(&facts(Route::Events, None)).is_some());
        assert_eq!(set.list().len(), 1);
    }

    #[test]
    fn parses_json_form() {
        let fault: Fault = serde_json::from_str(
            r#"{"route":"engage","project_id":1111,"times":2,
                "action":{"kind":"respond","status":429,"body":{"error":"x"},"retry_after":2}}"#,
        )
        .expect("fault parses");
        assert_eq!(fault.times, 2);
        assert_eq!(
            fault.action,
            FaultAction::Respond {
                status: 429,
                body: Some(serde_json::json!({"error": "x"})),
                retry_after: Some(2)
            }
        );
    }
}
