//! Control API of the Kameleoon stand-in, under `/_standin`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::TokenChange;
use super::state::{IdentifierKind, Shared};
use crate::StandinError;
use crate::control::{
    RequestsQuery, error_response, filter_records, merge_config, ok_response, parse_json,
};
use crate::faults::Fault;
use crate::seed::CustomDataSeed;
use crate::util::json_response;

pub(super) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/_standin/health", get(health))
        .route(
            "/_standin/requests",
            get(list_requests).delete(clear_requests),
        )
        .route(
            "/_standin/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_standin/faults/{id}", delete(remove_fault))
        .route("/_standin/stats", get(stats))
        .route("/_standin/config", get(get_config).patch(patch_config))
        .route("/_standin/limits/reset", post(reset_limits))
        .route(
            "/_standin/rejected-lines",
            get(rejected_lines).delete(clear_rejected_lines),
        )
        .route(
            "/_standin/sites/{code}/custom-datas",
            get(list_custom_datas).post(create_custom_data),
        )
        .route(
            "/_standin/sites/{code}/custom-datas/{index}/summary",
            get(summary),
        )
        .route(
            "/_standin/sites/{code}/custom-datas/{index}/values",
            get(values),
        )
        .route("/_standin/sites/{code}/values", delete(clear_values))
        .route(
            "/_standin/clients/{client_id}/secret",
            put(put_client_secret),
        )
        .route("/_standin/tokens/revoke", post(revoke_tokens))
        .route("/_standin/tokens/expire", post(expire_tokens))
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"ok": true, "service": "kameleoon"}))
}

async fn list_requests(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<RequestsQuery>,
) -> Response {
    let records = filter_records(shared.recorder.since(query.since), &query);
    json_response(StatusCode::OK, &json!(records))
}

async fn clear_requests(State(shared): State<Arc<Shared>>) -> Response {
    shared.recorder.clear();
    ok_response()
}

async fn list_faults(State(shared): State<Arc<Shared>>) -> Response {
    let faults = shared.state.lock().faults.list();
    json_response(StatusCode::OK, &json!(faults))
}

async fn add_fault(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let fault: Fault = match parse_json(&body) {
        Ok(fault) => fault,
        Err(response) => return response,
    };
    let id = shared.state.lock().faults.add(fault);
    json_response(StatusCode::CREATED, &json!({"id": id}))
}

async fn clear_faults(State(shared): State<Arc<Shared>>) -> Response {
    shared.state.lock().faults.clear();
    ok_response()
}

async fn remove_fault(State(shared): State<Arc<Shared>>, Path(id): Path<u64>) -> Response {
    if shared.state.lock().faults.remove(id) {
        ok_response()
    } else {
        json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("fault {id} not found")}),
        )
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &json!(shared.stats()))
}

async fn get_config(State(shared): State<Arc<Shared>>) -> Response {
    let config = shared.state.lock().config.clone();
    json_response(StatusCode::OK, &json!(config))
}

async fn patch_config(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: Value = match parse_json(&body) {
        Ok(patch) => patch,
        Err(response) => return response,
    };
    let current = shared.state.lock().config.clone();
    match merge_config(&current, patch) {
        Ok(config) => {
            shared.state.lock().config = config.clone();
            json_response(StatusCode::OK, &json!(config))
        }
        Err(error) => error_response(&error),
    }
}

async fn reset_limits(State(shared): State<Arc<Shared>>) -> Response {
    for client in shared.state.lock().clients.values_mut() {
        client.recent_requests.clear();
    }
    ok_response()
}

async fn rejected_lines(State(shared): State<Arc<Shared>>) -> Response {
    let state = shared.state.lock();
    json_response(
        StatusCode::OK,
        &json!({"total": state.stats.lines_rejected, "lines": state.rejected}),
    )
}

async fn clear_rejected_lines(State(shared): State<Arc<Shared>>) -> Response {
    shared.state.lock().rejected.clear();
    ok_response()
}

async fn list_custom_datas(
    State(shared): State<Arc<Shared>>,
    Path(code): Path<String>,
) -> Response {
    match shared.custom_datas(&code) {
        Ok(datas) => json_response(StatusCode::OK, &json!(datas)),
        Err(error) => error_response(&error),
    }
}

async fn create_custom_data(
    State(shared): State<Arc<Shared>>,
    Path(code): Path<String>,
    body: Bytes,
) -> Response {
    let seed: CustomDataSeed = match parse_json(&body) {
        Ok(seed) => seed,
        Err(response) => return response,
    };
    let created = shared.state.lock().create_custom_data(&code, seed);
    match created {
        Ok(data) => json_response(StatusCode::CREATED, &json!(data)),
        Err(error) => error_response(&StandinError::Invalid(error.to_string())),
    }
}

async fn summary(
    State(shared): State<Arc<Shared>>,
    Path((code, index)): Path<(String, u32)>,
) -> Response {
    match shared.summary(&code, index) {
        Ok(summary) => json_response(StatusCode::OK, &json!(summary)),
        Err(error) => error_response(&error),
    }
}

#[derive(Deserialize)]
struct ValuesQuery {
    #[serde(default = "default_kind")]
    kind: IdentifierKind,
    /// Only identifiers whose value set is exactly this one value.
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_kind() -> IdentifierKind {
    IdentifierKind::VisitorCode
}

fn default_limit() -> usize {
    1000
}

async fn values(
    State(shared): State<Arc<Shared>>,
    Path((code, index)): Path<(String, u32)>,
    Query(query): Query<ValuesQuery>,
) -> Response {
    let mut entries: Vec<(String, Vec<String>)> = {
        let state = shared.state.lock();
        let Some(site) = state.sites.get(&code) else {
            return error_response(&StandinError::NotFound(format!("site {code} not found")));
        };
        match site.values.get(&index) {
            None => Vec::new(),
            Some(values) => values
                .of_kind(query.kind)
                .iter()
                .filter(|(_, set)| {
                    query
                        .value
                        .as_ref()
                        .is_none_or(|wanted| set.len() == 1 && &set[0] == wanted)
                })
                .map(|(identifier, set)| (identifier.to_string(), set.to_vec()))
                .collect(),
        }
    };
    entries.sort();
    let total = entries.len();
    let page: serde_json::Map<String, Value> = entries
        .into_iter()
        .skip(query.offset)
        .take(query.limit)
        .map(|(identifier, set)| (identifier, json!(set)))
        .collect();
    json_response(StatusCode::OK, &json!({"total": total, "values": page}))
}

async fn clear_values(State(shared): State<Arc<Shared>>, Path(code): Path<String>) -> Response {
    let mut state = shared.state.lock();
    match state.sites.get_mut(&code) {
        Some(site) => {
            site.clear_values();
            ok_response()
        }
        None => error_response(&StandinError::NotFound(format!("site {code} not found"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientSecretBody {
    secret: String,
    #[serde(default = "default_true")]
    revoke_tokens: bool,
}

fn default_true() -> bool {
    true
}

async fn put_client_secret(
    State(shared): State<Arc<Shared>>,
    Path(client_id): Path<String>,
    body: Bytes,
) -> Response {
    let body: ClientSecretBody = match parse_json(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    match shared.set_client_secret(&client_id, &body.secret, body.revoke_tokens) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensBody {
    #[serde(default)]
    client_id: Option<String>,
}

fn parse_tokens_body(body: &Bytes) -> Result<TokensBody, Response> {
    if body.is_empty() {
        Ok(TokensBody::default())
    } else {
        parse_json(body)
    }
}

async fn revoke_tokens(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_tokens_body(&body) {
        Ok(body) => {
            let changed = shared.change_tokens(body.client_id.as_deref(), TokenChange::Revoke);
            json_response(StatusCode::OK, &json!({"revoked": changed}))
        }
        Err(response) => response,
    }
}

async fn expire_tokens(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_tokens_body(&body) {
        Ok(body) => {
            let changed = shared.change_tokens(body.client_id.as_deref(), TokenChange::Expire);
            json_response(StatusCode::OK, &json!({"expired": changed}))
        }
        Err(response) => response,
    }
}
