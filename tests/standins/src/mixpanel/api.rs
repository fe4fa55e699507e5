//! Handlers for the Mixpanel Query API paths.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::state::{LimitExceeded, Session, Shared, expire_sessions, purge_idle_sessions};
use crate::faults::{FaultAction, RequestFacts, Route};
use crate::limits::MIXPANEL_FORM_BODY_LIMIT_BYTES;
use crate::record::RecordSlot;
use crate::seed::Availability;
use crate::util::{
    BodyRead, fault_response, json_response, parse_basic, parse_bool, random_hex, read_body_limited,
};

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/query/engage", post(engage))
        .route("/api/2.0/engage", post(engage))
        .route(
            "/api/query/cohorts/list",
            get(cohorts_list).post(cohorts_list),
        )
        .route(
            "/api/2.0/cohorts/list",
            get(cohorts_list).post(cohorts_list),
        )
}

pub(super) async fn not_found(OriginalUri(uri): OriginalUri) -> Response {
    error_with_status(
        StatusCode::NOT_FOUND,
        &format!("no such endpoint: {}", uri.path()),
    )
}

/// Error in the Mixpanel API shape `{"error": ..., "status": "error"}`.
fn error_with_status(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({"error": message, "status": "error"}))
}

/// Error in the shape `{"error": ...}` used for 402 and cohort errors.
fn bare_error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({"error": message}))
}

fn query_pairs(query: Option<&str>) -> HashMap<String, String> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

fn parse_project_id(query: &HashMap<String, String>) -> Result<u64, String> {
    match query.get("project_id") {
        None => Err(
            "project_id is required when authenticating with a service account; add project_id=<id> to the query string"
                .to_string(),
        ),
        Some(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("project_id must be an integer, got {text:?}")),
    }
}

/// Checks the service account and the project's plan.
fn authorize(
    shared: &Shared,
    headers: &HeaderMap,
    project_id: u64,
    slot: &RecordSlot,
) -> Result<(), Response> {
    let Some(credentials) = parse_basic(headers) else {
        slot.update(|d| d.note = Some("missing Basic credentials".into()));
        return Err(error_with_status(
            StatusCode::UNAUTHORIZED,
            "Unable to authenticate request: send HTTP Basic credentials of a service account (username:secret)",
        ));
    };
    let state = shared.state.lock();
    let account = state
        .accounts
        .get(&credentials.username)
        .filter(|account| account.secret == credentials.password);
    let Some(account) = account else {
        slot.update(|d| d.note = Some("invalid service account credentials".into()));
        return Err(error_with_status(
            StatusCode::UNAUTHORIZED,
            "Unable to authenticate request: invalid service account username or secret",
        ));
    };
    let project = state.projects.get(&project_id);
    let Some(project) = project.filter(|_| account.projects.contains(&project_id)) else {
        slot.update(|d| d.note = Some("service account has no access to the project".into()));
        return Err(error_with_status(
            StatusCode::FORBIDDEN,
            &format!(
                "service account {} does not have access to project {project_id}",
                credentials.username
            ),
        ));
    };
    if !project.api_access {
        slot.update(|d| d.note = Some("plan without Query API access".into()));
        return Err(bare_error(
            StatusCode::PAYMENT_REQUIRED,
            &format!(
                "Query API access is not included in the plan of project {project_id}; upgrade to a Growth or Enterprise plan"
            ),
        ));
    }
    Ok(())
}

/// A concurrency slot of a project, released when dropped (also when the client
/// goes away mid-request).
struct QuerySlot {
    shared: Arc<Shared>,
    project_id: u64,
}

impl Drop for QuerySlot {
    fn drop(&mut self) {
        self.shared.state.lock().release(self.project_id);
    }
}

fn admit(
    shared: &Arc<Shared>,
    project_id: u64,
    counted: bool,
    request: &str,
    slot: &RecordSlot,
) -> Result<QuerySlot, Response> {
    let mut state = shared.state.lock();
    match state.admit(project_id, counted) {
        Ok(in_flight) => {
            slot.update(|d| d.project_in_flight = Some(in_flight as u64));
            Ok(QuerySlot {
                shared: shared.clone(),
                project_id,
            })
        }
        Err(exceeded) => {
            let response = rate_limited_response(
                project_id,
                request,
                &exceeded,
                state.config.max_concurrent_queries,
                state.config.hourly_query_limit,
                state.config.retry_after_seconds,
            );
            slot.update(|d| d.note = Some("query rate limit exceeded".into()));
            Err(response)
        }
    }
}

/// Builds the 429 response in the shape Mixpanel uses:
/// `{"request": "<path?query>", "error": "Query rate limit exceeded for project_id: N. ..."}`.
fn rate_limited_response(
    project_id: u64,
    request: &str,
    exceeded: &LimitExceeded,
    max_concurrent: usize,
    hourly_limit: u32,
    retry_after: Option<u64>,
) -> Response {
    let hourly = if hourly_limit == 0 {
        "unlimited".to_string()
    } else {
        hourly_limit.to_string()
    };
    let message = format!(
        "Query rate limit exceeded for project_id: {project_id}. {}/{max_concurrent} queries running concurrently and {}/{hourly} queries running in the last hour. Retry later; the Query API allows {max_concurrent} concurrent queries and {hourly} queries per hour per project.",
        exceeded.running, exceeded.in_last_hour
    );
    let mut response = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({"request": request, "error": message}),
    );
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn request_text(uri: &axum::http::Uri) -> String {
    uri.path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| uri.path().to_string())
}

async fn read_form(
    headers: &HeaderMap,
    body: Body,
    slot: &RecordSlot,
) -> Result<HashMap<String, String>, Response> {
    match read_body_limited(headers, body, MIXPANEL_FORM_BODY_LIMIT_BYTES).await {
        BodyRead::Complete(bytes) => {
            slot.update(|d| d.body_bytes = bytes.len() as u64);
            Ok(form_urlencoded::parse(&bytes)
                .map(|(key, value)| (key.into_owned(), value.into_owned()))
                .collect())
        }
        BodyRead::TooLarge { .. } => Err(error_with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body is larger than {MIXPANEL_FORM_BODY_LIMIT_BYTES} bytes"),
        )),
        BodyRead::Failed(error) => Err(error_with_status(
            StatusCode::BAD_REQUEST,
            &format!("failed to read the request body: {error}"),
        )),
    }
}

/// Effect of a fault on a request that the fault does not respond to itself.
#[derive(Default)]
struct FaultOutcome {
    delay: Option<Duration>,
}

/// Applies the fault due for `facts`; returns the response when the fault replaces it.
fn apply_fault(
    shared: &Shared,
    facts: &RequestFacts,
    session_id: Option<&str>,
    slot: &RecordSlot,
) -> Result<FaultOutcome, Response> {
    let mut state = shared.state.lock();
    let Some((fault_id, action)) = state.faults.take(facts) else {
        return Ok(FaultOutcome::default());
    };
    slot.update(|d| d.fault_id = Some(fault_id));
    tracing::info!(
        fault_id,
        route = facts.route.as_str(),
        ?action,
        "mixpanel fault fired"
    );
    match action {
        FaultAction::Respond {
            status,
            body,
            retry_after,
        } => {
            state.fault_responses += 1;
            Err(fault_response(status, body.as_ref(), retry_after))
        }
        FaultAction::DropConnection => {
            slot.update(|d| d.close_connection = true);
            Err(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        FaultAction::Delay { ms } => Ok(FaultOutcome {
            delay: Some(Duration::from_millis(ms)),
        }),
        FaultAction::ExpireSession => {
            if let Some(project) = facts.project_id.and_then(|id| state.projects.get_mut(&id)) {
                expire_sessions(project, session_id);
            }
            Ok(FaultOutcome::default())
        }
    }
}

/// Form parameters of an Engage query.
struct EngageParams {
    cohort_id: Option<u64>,
    include_all_users: bool,
    output_properties: Option<Vec<String>>,
    session_id: Option<String>,
    page: u64,
}

const UNSUPPORTED_ENGAGE_PARAMETERS: &[&str] = &[
    "distinct_id",
    "distinct_ids",
    "where",
    "behaviors",
    "data_group_id",
];

fn parse_engage_params(form: &HashMap<String, String>) -> Result<EngageParams, String> {
    for name in UNSUPPORTED_ENGAGE_PARAMETERS {
        if form.contains_key(*name) {
            return Err(format!(
                "parameter {name} is not supported by the stand-in, which serves only filter_by_cohort queries"
            ));
        }
    }
    let cohort_id = match form.get("filter_by_cohort") {
        None => None,
        Some(text) => Some(parse_cohort_filter(text)?),
    };
    let include_all_users = match form.get("include_all_users") {
        None => true,
        Some(text) => parse_bool(text)
            .ok_or_else(|| format!("include_all_users must be true or false, got {text:?}"))?,
    };
    let output_properties = match form.get("output_properties") {
        None => None,
        Some(text) => Some(serde_json::from_str::<Vec<String>>(text).map_err(|_| {
            format!("output_properties must be a JSON array of property names, got {text:?}")
        })?),
    };
    let page = match form.get("page") {
        None => 0,
        Some(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|_| format!("page must be a non-negative integer, got {text:?}"))?,
    };
    let session_id = form.get("session_id").filter(|s| !s.is_empty()).cloned();
    Ok(EngageParams {
        cohort_id,
        include_all_users,
        output_properties,
        session_id,
        page,
    })
}

/// Parses `filter_by_cohort`, a JSON object such as `{"id": 123}`.
fn parse_cohort_filter(text: &str) -> Result<u64, String> {
    let invalid =
        || format!("filter_by_cohort must be a JSON object such as {{\"id\": 123}}, got {text:?}");
    let value: Value = serde_json::from_str(text).map_err(|_| invalid())?;
    match value.get("id") {
        Some(Value::Number(number)) => number.as_u64().ok_or_else(invalid),
        Some(Value::String(digits)) => digits.parse::<u64>().map_err(|_| invalid()),
        _ => Err(invalid()),
    }
}

fn expired_session_error(session_id: &str) -> Response {
    error_with_status(
        StatusCode::BAD_REQUEST,
        &format!(
            "request for page in uncached query for params: session_id {session_id} is unknown or has expired; start again from page 0 without session_id"
        ),
    )
}

/// What page 0 or a follow-up page reads from.
struct PageSource {
    session_id: String,
    session: SessionView,
}

struct SessionView {
    members: Arc<super::members::MemberList>,
    include_all_users: bool,
    output_properties: Option<Arc<[String]>>,
    page_size: usize,
}

async fn engage(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    slot.update(|d| d.route = Some(Route::Engage));
    let query = query_pairs(uri.query());
    let project_id = parse_project_id(&query);
    slot.update(|d| d.project_id = project_id.as_ref().ok().copied());
    let form = match read_form(&headers, body, &slot).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    let params = parse_engage_params(&form);

    let mut facts = RequestFacts::new(Route::Engage);
    facts.project_id = project_id.as_ref().ok().copied();
    if let Ok(params) = &params {
        facts.page = Some(params.page);
        facts.cohort_id = params
            .cohort_id
            .or_else(|| session_cohort(&shared, facts.project_id, params.session_id.as_deref()));
        slot.update(|d| {
            d.page = Some(params.page);
            d.cohort_id = facts.cohort_id;
            d.session_id = params.session_id.clone();
        });
    }
    let session_for_fault = params.as_ref().ok().and_then(|p| p.session_id.clone());
    let outcome = match apply_fault(&shared, &facts, session_for_fault.as_deref(), &slot) {
        Ok(outcome) => outcome,
        Err(response) => return response,
    };

    let project_id = match project_id {
        Ok(id) => id,
        Err(message) => return error_with_status(StatusCode::BAD_REQUEST, &message),
    };
    if let Err(response) = authorize(&shared, &headers, project_id, &slot) {
        return response;
    }
    let params = match params {
        Ok(params) => params,
        Err(message) => return error_with_status(StatusCode::BAD_REQUEST, &message),
    };
    if params.page > 0 && params.session_id.is_none() {
        return error_with_status(
            StatusCode::BAD_REQUEST,
            &format!(
                "session_id is required for page {}: pass the session_id returned with page 0",
                params.page
            ),
        );
    }
    if params.page == 0 && params.cohort_id.is_none() {
        return error_with_status(
            StatusCode::BAD_REQUEST,
            "filter_by_cohort is required: the stand-in serves only cohort member queries",
        );
    }

    let counted = params.page == 0 || shared.config().count_follow_up_pages;
    let _query_slot = match admit(&shared, project_id, counted, &request_text(&uri), &slot) {
        Ok(query_slot) => query_slot,
        Err(response) => return response,
    };
    if let Some(delay) = outcome.delay {
        tokio::time::sleep(delay).await;
    }

    let source = match open_page_source(&shared, project_id, &params) {
        Ok(source) => source,
        Err(response) => {
            return response;
        }
    };
    slot.update(|d| d.session_id = Some(source.session_id.clone()));
    engage_page(&params, source)
}

/// Returns the cohort a paging session reads, for matching faults.
fn session_cohort(
    shared: &Shared,
    project_id: Option<u64>,
    session_id: Option<&str>,
) -> Option<u64> {
    let state = shared.state.lock();
    let project = state.projects.get(&project_id?)?;
    project
        .sessions
        .get(session_id?)
        .map(|session| session.cohort_id)
}

/// Starts a paging session at page 0, or finds the session of a follow-up page.
fn open_page_source(
    shared: &Shared,
    project_id: u64,
    params: &EngageParams,
) -> Result<PageSource, Response> {
    let mut state = shared.state.lock();
    let idle_timeout = Duration::from_millis(state.config.session_idle_timeout_ms);
    let page_size = state.config.page_size;
    let now = Instant::now();
    let project = state
        .projects
        .get_mut(&project_id)
        .expect("authorize checked the project");

    if params.page == 0 {
        let cohort_id = params.cohort_id.expect("page 0 has a cohort filter");
        purge_idle_sessions(project, idle_timeout, now);
        let members = match project.cohorts.get(&cohort_id) {
            None => {
                return Err(bare_error(
                    StatusCode::BAD_REQUEST,
                    &format!("cohort {cohort_id} not found"),
                ));
            }
            Some(cohort) => match &cohort.availability {
                Availability::Available => cohort.members.clone(),
                Availability::Deleted => {
                    return Err(bare_error(
                        StatusCode::BAD_REQUEST,
                        &format!("cohort {cohort_id} not found"),
                    ));
                }
                Availability::Unavailable { status, error } => {
                    let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::NOT_FOUND);
                    return Err(bare_error(status, error));
                }
            },
        };
        let session_id = format!("{}-{}", crate::util::now_ms() / 1000, random_hex(8));
        let output_properties: Option<Arc<[String]>> =
            params.output_properties.clone().map(Arc::from);
        let session = Session {
            cohort_id,
            members: members.clone(),
            include_all_users: params.include_all_users,
            output_properties: output_properties.clone(),
            page_size,
            last_used: now,
            expired: false,
        };
        project.sessions.insert(session_id.clone(), session);
        return Ok(PageSource {
            session_id,
            session: SessionView {
                members,
                include_all_users: params.include_all_users,
                output_properties,
                page_size,
            },
        });
    }

    let session_id = params.session_id.clone().expect("checked before admission");
    let Some(session) = project.sessions.get_mut(&session_id) else {
        return Err(expired_session_error(&session_id));
    };
    if session.expired || now.duration_since(session.last_used) > idle_timeout {
        session.expired = true;
        return Err(expired_session_error(&session_id));
    }
    if let Some(cohort_id) = params.cohort_id
        && cohort_id != session.cohort_id
    {
        return Err(error_with_status(
            StatusCode::BAD_REQUEST,
            &format!(
                "session_id {session_id} belongs to a query on cohort {}, not cohort {cohort_id}",
                session.cohort_id
            ),
        ));
    }
    session.last_used = now;
    Ok(PageSource {
        session_id,
        session: SessionView {
            members: session.members.clone(),
            include_all_users: session.include_all_users,
            output_properties: session.output_properties.clone(),
            page_size: session.page_size,
        },
    })
}

/// Renders one Engage page; `total` is only on page 0, as Mixpanel sends it.
fn engage_page(params: &EngageParams, source: PageSource) -> Response {
    let session = &source.session;
    let matching = session.members.matching(session.include_all_users);
    let start = usize::try_from(params.page)
        .ok()
        .and_then(|page| page.checked_mul(session.page_size))
        .unwrap_or(usize::MAX)
        .min(matching);
    let end = start.saturating_add(session.page_size).min(matching);
    let results: Vec<Value> = (start..end)
        .filter_map(|index| {
            session.members.engage_result(
                session.include_all_users,
                index,
                session.output_properties.as_deref(),
            )
        })
        .collect();
    let mut body = json!({
        "page": params.page,
        "page_size": session.page_size,
        "session_id": source.session_id,
        "status": "ok",
        "results": results,
    });
    if params.page == 0 {
        body["total"] = json!(matching);
    }
    json_response(StatusCode::OK, &body)
}

async fn cohorts_list(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    slot.update(|d| d.route = Some(Route::CohortsList));
    let query = query_pairs(uri.query());
    let project_id = parse_project_id(&query);
    slot.update(|d| d.project_id = project_id.as_ref().ok().copied());
    if let Err(response) = read_form(&headers, body, &slot).await {
        return response;
    }

    let mut facts = RequestFacts::new(Route::CohortsList);
    facts.project_id = project_id.as_ref().ok().copied();
    let outcome = match apply_fault(&shared, &facts, None, &slot) {
        Ok(outcome) => outcome,
        Err(response) => return response,
    };
    let project_id = match project_id {
        Ok(id) => id,
        Err(message) => return error_with_status(StatusCode::BAD_REQUEST, &message),
    };
    if let Err(response) = authorize(&shared, &headers, project_id, &slot) {
        return response;
    }

    let _query_slot = match admit(&shared, project_id, true, &request_text(&uri), &slot) {
        Ok(query_slot) => query_slot,
        Err(response) => return response,
    };
    if let Some(delay) = outcome.delay {
        tokio::time::sleep(delay).await;
    }
    let cohorts: Vec<Value> = {
        let state = shared.state.lock();
        let Some(project) = state.projects.get(&project_id) else {
            return error_with_status(
                StatusCode::FORBIDDEN,
                &format!("project {project_id} not found"),
            );
        };
        project
            .cohorts
            .values()
            .filter(|cohort| cohort.availability != Availability::Deleted)
            .map(|cohort| {
                json!({
                    "id": cohort.id,
                    "name": cohort.name,
                    "count": cohort.members.len(),
                    "description": cohort.description,
                    "created": cohort.created,
                    "is_visible": u8::from(cohort.is_visible),
                    "project_id": project_id,
                })
            })
            .collect()
    };
    json_response(StatusCode::OK, &Value::Array(cohorts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cohort_filter_forms() {
        assert_eq!(parse_cohort_filter(r#"{"id":12}"#), Ok(12));
        assert_eq!(parse_cohort_filter(r#"{"id":"12"}"#), Ok(12));
        assert!(parse_cohort_filter("12").is_err());
        assert!(parse_cohort_filter(r#"{"name":"x"}"#).is_err());
    }

    #[test]
    fn engage_params_defaults() {
        let form = HashMap::from([("filter_by_cohort".to_string(), r#"{"id":3}"#.to_string())]);
        let params = parse_engage_params(&form).expect("valid");
        assert!(
            params.include_all_users,
            "include_all_users defaults to true"
        );
        assert_eq!(params.page, 0);
        assert_eq!(params.cohort_id, Some(3));
        assert!(params.output_properties.is_none());
    }
}
