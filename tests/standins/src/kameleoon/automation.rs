//! Automation API handlers: sites and custom data.
//!
//! NOTE: the shapes of `GET /custom-datas` and `POST /custom-datas`, the error
//! bodies and the pagination headers are inferred from public client code,
//! not from a Kameleoon reference page.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Serialize;
use serde_json::{Value, json};

use super::oauth::{MISSING_TOKEN, TokenCheck, check_token, unauthorized};
use super::state::{CreateError, Shared};
use super::{FaultOutcome, apply_fault};
use crate::faults::{RequestFacts, Route};
use crate::limits::{
    AUTOMATION_BODY_LIMIT_BYTES, AUTOMATION_DEFAULT_PER_PAGE, AUTOMATION_MAX_PER_PAGE,
};
use crate::record::RecordSlot;
use crate::seed::CustomDataSeed;
use crate::util::{BodyRead, format_rfc3339, json_response, now_ms, read_body_limited};

/// Error body in the Spring Boot shape: `{timestamp, status, error, message, path}`.
pub(crate) fn api_error(status: StatusCode, message: &str, path: &str) -> Response {
    json_response(
        status,
        &json!({
            "timestamp": format_rfc3339(now_ms() / 1000),
            "status": status.as_u16(),
            "error": status.canonical_reason().unwrap_or(""),
            "message": message,
            "path": path,
        }),
    )
}

fn query_pairs(uri: &axum::http::Uri) -> HashMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

/// One clause of a `filter` parameter: `{"field": .., "operator": .., "parameters": [..]}`.
struct Clause {
    field: String,
    operator: String,
    parameters: Vec<String>,
}

fn parse_filter(text: Option<&String>, fields: &[&str]) -> Result<Vec<Clause>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let value: Value =
        serde_json::from_str(text).map_err(|error| format!("filter is not valid JSON: {error}"))?;
    let Value::Array(items) = value else {
        return Err("filter must be a JSON array of {field, operator, parameters} objects".into());
    };
    let mut clauses = Vec::with_capacity(items.len());
    for item in items {
        let field = item
            .get("field")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let operator = item
            .get("operator")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(Value::Array(parameters)) = item.get("parameters") else {
            return Err("each filter clause needs a parameters array".into());
        };
        if !fields.contains(&field) {
            return Err(format!(
                "filter field {field:?} is not supported; use one of {}",
                fields.join(", ")
            ));
        }
        if operator != "EQUAL" && operator != "IN" {
            return Err(format!(
                "filter operator {operator:?} is not supported; use EQUAL or IN"
            ));
        }
        let parameters = parameters
            .iter()
            .map(|parameter| match parameter {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            })
            .collect();
        clauses.push(Clause {
            field: field.to_string(),
            operator: operator.to_string(),
            parameters,
        });
    }
    Ok(clauses)
}

fn clause_matches(clause: &Clause, value: &str) -> bool {
    match clause.operator.as_str() {
        "EQUAL" => clause
            .parameters
            .first()
            .is_some_and(|parameter| parameter == value),
        _ => clause.parameters.iter().any(|parameter| parameter == value),
    }
}

/// Returns the value of `field` in an item, as a filter clause compares it.
fn filter_value(item: &Value, field: &str) -> String {
    match item.get(field) {
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

struct Pagination {
    page: usize,
    per_page: usize,
}

fn parse_pagination(query: &HashMap<String, String>) -> Result<Pagination, String> {
    let page = match query.get("page") {
        None => 1,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|&page| page >= 1)
            .ok_or_else(|| format!("page must be an integer of at least 1, got {text:?}"))?,
    };
    let per_page = match query.get("perPage") {
        None => AUTOMATION_DEFAULT_PER_PAGE,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|&size| (1..=AUTOMATION_MAX_PER_PAGE).contains(&size))
            .ok_or_else(|| {
                format!(
                    "perPage must be an integer from 1 to {AUTOMATION_MAX_PER_PAGE}, got {text:?}"
                )
            })?,
    };
    Ok(Pagination { page, per_page })
}

/// Builds a response with one page of `items` as a bare JSON array and `X-Pagination-*` headers.
fn paginated<T: Serialize>(items: Vec<T>, pagination: &Pagination) -> Response {
    let total = items.len();
    let page_count = total.div_ceil(pagination.per_page).max(1);
    let start = (pagination.page - 1)
        .saturating_mul(pagination.per_page)
        .min(total);
    let page: Vec<T> = items
        .into_iter()
        .skip(start)
        .take(pagination.per_page)
        .collect();
    let mut response = json_response(StatusCode::OK, &json!(page));
    let headers = response.headers_mut();
    headers.insert("x-pagination-total-count", HeaderValue::from(total));
    headers.insert("x-pagination-page-count", HeaderValue::from(page_count));
    headers.insert(
        "x-pagination-current-page",
        HeaderValue::from(pagination.page),
    );
    headers.insert(
        "x-pagination-per-page",
        HeaderValue::from(pagination.per_page),
    );
    response
}

/// Checks the bearer token and the client's rate limits; returns the client id.
fn authenticate(
    shared: &Shared,
    headers: &HeaderMap,
    slot: &RecordSlot,
    path: &str,
) -> Result<String, Response> {
    let mut state = shared.state.lock();
    let client_id = match check_token(&state, headers) {
        TokenCheck::Valid { client_id } => client_id,
        TokenCheck::Missing => {
            state.stats.unauthorized += 1;
            slot.update(|d| d.note = Some("missing bearer token".into()));
            return Err(unauthorized(MISSING_TOKEN));
        }
        TokenCheck::Rejected(reason) => {
            state.stats.unauthorized += 1;
            slot.update(|d| d.note = Some(reason.into()));
            return Err(unauthorized(reason));
        }
    };
    slot.update(|d| d.client_id = Some(client_id.clone()));
    if let Err(message) = state.count_automation_request(&client_id) {
        state.stats.automation_rate_limited += 1;
        slot.update(|d| d.note = Some(message.clone()));
        let mut response = api_error(StatusCode::TOO_MANY_REQUESTS, &message, path);
        if let Some(seconds) = state.config.retry_after_seconds {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        return Err(response);
    }
    state.stats.automation_requests += 1;
    Ok(client_id)
}

/// Runs the steps every Automation API request shares: fault, authentication,
/// rate limit, then the fault's delay.
async fn admit(
    shared: &Shared,
    facts: RequestFacts,
    headers: &HeaderMap,
    slot: &RecordSlot,
    path: &str,
) -> Result<String, Response> {
    slot.update(|d| d.site_code = facts.site_code.clone());
    let FaultOutcome { delay } = apply_fault(shared, &facts, slot)?;
    let client_id = authenticate(shared, headers, slot, path)?;
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    Ok(client_id)
}

/// `GET /sites?filter=[{"field":"code","operator":"EQUAL","parameters":["SC"]}]`:
/// the sites the client may see that match the filter.
pub(crate) async fn list_sites(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    slot.update(|d| d.route = Some(Route::Sites));
    let path = uri.path().to_string();
    let query = query_pairs(&uri);
    let filter = parse_filter(query.get("filter"), &["code", "id", "name", "url"]);
    let mut facts = RequestFacts::new(Route::Sites);
    if let Ok(clauses) = &filter {
        facts.site_code = clauses
            .iter()
            .find(|clause| clause.field == "code" && clause.operator == "EQUAL")
            .and_then(|clause| clause.parameters.first().cloned());
    }
    let client_id = match admit(&shared, facts, &headers, &slot, &path).await {
        Ok(client_id) => client_id,
        Err(response) => return response,
    };
    let clauses = match filter {
        Ok(clauses) => clauses,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message, &path),
    };
    let pagination = match parse_pagination(&query) {
        Ok(pagination) => pagination,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message, &path),
    };
    let sites: Vec<Value> = {
        let state = shared.state.lock();
        let Some(client) = state.clients.get(&client_id) else {
            return unauthorized("the client of the access token no longer exists");
        };
        state
            .sites
            .values()
            .filter(|site| client.sites.contains(&site.code))
            .map(|site| json!(site.view()))
            .filter(|site| {
                clauses
                    .iter()
                    .all(|clause| clause_matches(clause, &filter_value(site, &clause.field)))
            })
            .collect()
    };
    paginated(sites, &pagination)
}

/// `GET /sites/byCode/{code}`: 404 for an unknown code, 403 for a site the
/// client may not see.
pub(crate) async fn site_by_code(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    Path(code): Path<String>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    slot.update(|d| d.route = Some(Route::Sites));
    let path = uri.path().to_string();
    let mut facts = RequestFacts::new(Route::Sites);
    facts.site_code = Some(code.clone());
    let client_id = match admit(&shared, facts, &headers, &slot, &path).await {
        Ok(client_id) => client_id,
        Err(response) => return response,
    };
    let state = shared.state.lock();
    let Some(site) = state.sites.get(&code) else {
        return api_error(
            StatusCode::NOT_FOUND,
            &format!("site with code {code} not found"),
            &path,
        );
    };
    let visible = state
        .clients
        .get(&client_id)
        .is_some_and(|client| client.sites.contains(&code));
    if !visible {
        return api_error(
            StatusCode::FORBIDDEN,
            &format!("access to site {code} is denied for this client"),
            &path,
        );
    }
    json_response(StatusCode::OK, &json!(site.view()))
}

/// `GET /custom-datas?filter=[{"field":"siteId","operator":"EQUAL","parameters":[ID]}]&page&perPage`.
pub(crate) async fn list_custom_datas(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    slot.update(|d| d.route = Some(Route::CustomDatas));
    let path = uri.path().to_string();
    let query = query_pairs(&uri);
    let filter = parse_filter(
        query.get("filter"),
        &["siteId", "id", "index", "name", "format", "type", "scope"],
    );
    let mut facts = RequestFacts::new(Route::CustomDatas);
    if let Ok(clauses) = &filter {
        let site_id = clauses
            .iter()
            .find(|clause| clause.field == "siteId" && clause.operator == "EQUAL")
            .and_then(|clause| clause.parameters.first())
            .and_then(|text| text.parse::<u64>().ok());
        facts.site_code = site_id.and_then(|id| {
            shared
                .state
                .lock()
                .site_by_id(id)
                .map(|site| site.code.clone())
        });
    }
    let client_id = match admit(&shared, facts, &headers, &slot, &path).await {
        Ok(client_id) => client_id,
        Err(response) => return response,
    };
    let clauses = match filter {
        Ok(clauses) => clauses,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message, &path),
    };
    let pagination = match parse_pagination(&query) {
        Ok(pagination) => pagination,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message, &path),
    };
    let items: Vec<Value> = {
        let state = shared.state.lock();
        let Some(client) = state.clients.get(&client_id) else {
            return unauthorized("the client of the access token no longer exists");
        };
        state
            .sites
            .values()
            .filter(|site| client.sites.contains(&site.code))
            .flat_map(|site| site.custom_datas.iter())
            .map(|data| json!(data))
            .filter(|data| {
                clauses
                    .iter()
                    .all(|clause| clause_matches(clause, &filter_value(data, &clause.field)))
            })
            .collect()
    };
    paginated(items, &pagination)
}

/// `GET /custom-datas/{id}`.
pub(crate) async fn get_custom_data(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    Path(id): Path<u64>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    slot.update(|d| d.route = Some(Route::CustomDatas));
    let path = uri.path().to_string();
    let site_code = {
        let state = shared.state.lock();
        state
            .sites
            .values()
            .find(|site| site.custom_datas.iter().any(|data| data.id == id))
            .map(|site| site.code.clone())
    };
    let mut facts = RequestFacts::new(Route::CustomDatas);
    facts.site_code = site_code.clone();
    let client_id = match admit(&shared, facts, &headers, &slot, &path).await {
        Ok(client_id) => client_id,
        Err(response) => return response,
    };
    let state = shared.state.lock();
    let visible = site_code.as_ref().filter(|code| {
        state
            .clients
            .get(&client_id)
            .is_some_and(|client| client.sites.contains(*code))
    });
    let data = visible
        .and_then(|code| state.sites.get(code))
        .and_then(|site| site.custom_datas.iter().find(|data| data.id == id));
    match data {
        Some(data) => json_response(StatusCode::OK, &json!(data)),
        None => api_error(
            StatusCode::NOT_FOUND,
            &format!("custom data {id} not found"),
            &path,
        ),
    }
}

/// Reads a required string field of the create body.
fn required_text(body: &Value, field: &str) -> Result<String, String> {
    match body.get(field) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(format!("{field} must be a string")),
        None => Err(format!("{field} is required")),
    }
}

/// `POST /custom-datas` with `{name, siteId, format, type, method, scope}`:
/// 201 with the created custom data, including its `id` and `index`.
pub(crate) async fn create_custom_data(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    slot.update(|d| d.route = Some(Route::CustomDatas));
    let path = uri.path().to_string();
    let bytes = match read_body_limited(&headers, body, AUTOMATION_BODY_LIMIT_BYTES).await {
        BodyRead::Complete(bytes) => bytes,
        BodyRead::TooLarge { .. } => {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request body too large",
                &path,
            );
        }
        BodyRead::Failed(error) => return api_error(StatusCode::BAD_REQUEST, &error, &path),
    };
    slot.update(|d| d.body_bytes = bytes.len() as u64);

    let parsed: Result<Value, String> = serde_json::from_slice(&bytes)
        .map_err(|error| format!("request body is not valid JSON: {error}"));
    let site_id = parsed
        .as_ref()
        .ok()
        .and_then(|body| body.get("siteId"))
        .and_then(|value| {
            value
                .as_u64()
                .or_else(|| value.as_str().and_then(|text| text.parse().ok()))
        });
    let site_code = site_id.and_then(|id| {
        shared
            .state
            .lock()
            .site_by_id(id)
            .map(|site| site.code.clone())
    });
    let mut facts = RequestFacts::new(Route::CustomDatas);
    facts.site_code = site_code.clone();
    let client_id = match admit(&shared, facts, &headers, &slot, &path).await {
        Ok(client_id) => client_id,
        Err(response) => return response,
    };

    let request = match parsed.and_then(|body| parse_create_body(&body)) {
        Ok(request) => request,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message, &path),
    };

    let mut state = shared.state.lock();
    let visible = site_code.as_ref().filter(|code| {
        state
            .clients
            .get(&client_id)
            .is_some_and(|client| client.sites.contains(*code))
    });
    let Some(site_code) = visible.cloned() else {
        state.stats.forbidden += 1;
        return api_error(
            StatusCode::FORBIDDEN,
            &format!(
                "site {} does not exist or is not visible to this client",
                site_id.map(|id| id.to_string()).unwrap_or_default()
            ),
            &path,
        );
    };
    match state.create_custom_data(&site_code, request) {
        Ok(created) => {
            state.stats.custom_datas_created += 1;
            tracing::info!(site = %site_code, name = %created.name, index = created.index, "custom data created");
            let mut response = json_response(StatusCode::CREATED, &json!(created));
            if let Ok(location) = HeaderValue::from_str(&format!("/custom-datas/{}", created.id)) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Err(CreateError::Conflict(message)) => api_error(StatusCode::CONFLICT, &message, &path),
        Err(CreateError::Invalid(message)) => api_error(StatusCode::BAD_REQUEST, &message, &path),
    }
}

fn parse_create_body(body: &Value) -> Result<CustomDataSeed, String> {
    if !body.is_object() {
        return Err("request body must be a JSON object".into());
    }
    if body.get("siteId").and_then(Value::as_u64).is_none() {
        return Err("siteId is required and must be an integer".into());
    }
    let is_mapping_identifier = match body.get("isMappingIdentifier") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(flag)) => *flag,
        Some(_) => return Err("isMappingIdentifier must be a boolean".into()),
    };
    Ok(CustomDataSeed {
        id: None,
        index: None,
        name: required_text(body, "name")?,
        format: required_text(body, "format")?,
        data_type: required_text(body, "type")?,
        method: required_text(body, "method")?,
        scope: required_text(body, "scope")?,
        is_mapping_identifier,
    })
}
