//! Control API of the Mixpanel stand-in, under `/_standin`.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::Shared;
use crate::control::{
    RequestsQuery, error_response, filter_records, merge_config, ok_response, parse_json,
};
use crate::faults::Fault;
use crate::seed::{Availability, CohortSeed, GeneratorSeed, MemberSeed, ProfileSeed};
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
            "/_standin/projects/{project}/cohorts/{cohort}",
            put(put_cohort),
        )
        .route(
            "/_standin/projects/{project}/cohorts/{cohort}/members",
            get(get_members).put(put_members),
        )
        .route(
            "/_standin/projects/{project}/cohorts/{cohort}/availability",
            put(put_availability),
        )
        .route("/_standin/projects/{project}/profiles", put(put_profiles))
        .route(
            "/_standin/projects/{project}/api-access",
            put(put_api_access),
        )
        .route(
            "/_standin/projects/{project}/sessions/expire",
            post(expire_sessions),
        )
        .route(
            "/_standin/accounts/{username}/secret",
            put(put_account_secret),
        )
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"ok": true, "service": "mixpanel"}))
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
    json_response(StatusCode::OK, &json!(shared.config()))
}

async fn patch_config(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch: Value = match parse_json(&body) {
        Ok(patch) => patch,
        Err(response) => return response,
    };
    let result = merge_config(&shared.config(), patch).and_then(|config| {
        shared.set_config(config.clone())?;
        Ok(config)
    });
    match result {
        Ok(config) => json_response(StatusCode::OK, &json!(config)),
        Err(error) => error_response(&error),
    }
}

async fn reset_limits(State(shared): State<Arc<Shared>>) -> Response {
    shared.reset_limits();
    ok_response()
}

async fn put_cohort(
    State(shared): State<Arc<Shared>>,
    Path((project, cohort)): Path<(u64, u64)>,
    body: Bytes,
) -> Response {
    let mut seed: CohortSeed = match parse_json(&body) {
        Ok(seed) => seed,
        Err(response) => return response,
    };
    seed.id = cohort;
    match shared.set_cohort(project, seed) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}

/// Body of `PUT .../members`: explicit members or a generator.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersBody {
    #[serde(default)]
    members: Vec<MemberSeed>,
    #[serde(default)]
    generate: Option<GeneratorSeed>,
}

async fn put_members(
    State(shared): State<Arc<Shared>>,
    Path((project, cohort)): Path<(u64, u64)>,
    body: Bytes,
) -> Response {
    let body: MembersBody = match parse_json(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    match shared.set_members(project, cohort, body.members, body.generate) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    #[serde(default)]
    offset: usize,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    1000
}

async fn get_members(
    State(shared): State<Arc<Shared>>,
    Path((project, cohort)): Path<(u64, u64)>,
    Query(page): Query<PageQuery>,
) -> Response {
    match shared.cohort_members(project, cohort) {
        Ok(members) => {
            let total = members.len();
            let slice: Vec<_> = members
                .into_iter()
                .skip(page.offset)
                .take(page.limit)
                .collect();
            json_response(StatusCode::OK, &json!({"total": total, "members": slice}))
        }
        Err(error) => error_response(&error),
    }
}

async fn put_availability(
    State(shared): State<Arc<Shared>>,
    Path((project, cohort)): Path<(u64, u64)>,
    body: Bytes,
) -> Response {
    let availability: Availability = match parse_json(&body) {
        Ok(availability) => availability,
        Err(response) => return response,
    };
    match shared.set_availability(project, cohort, availability) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}

async fn put_profiles(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<u64>,
    body: Bytes,
) -> Response {
    let profiles: Vec<ProfileSeed> = match parse_json(&body) {
        Ok(profiles) => profiles,
        Err(response) => return response,
    };
    match shared.upsert_profiles(project, profiles) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiAccessBody {
    api_access: bool,
}

async fn put_api_access(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<u64>,
    body: Bytes,
) -> Response {
    let body: ApiAccessBody = match parse_json(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    match shared.set_api_access(project, body.api_access) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpireBody {
    #[serde(default)]
    session_id: Option<String>,
}

async fn expire_sessions(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<u64>,
    body: Bytes,
) -> Response {
    let body: ExpireBody = if body.is_empty() {
        ExpireBody::default()
    } else {
        match parse_json(&body) {
            Ok(body) => body,
            Err(response) => return response,
        }
    };
    match shared.expire_sessions(project, body.session_id.as_deref()) {
        Ok(expired) => json_response(StatusCode::OK, &json!({"expired": expired})),
        Err(error) => error_response(&error),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    secret: String,
}

async fn put_account_secret(
    State(shared): State<Arc<Shared>>,
    Path(username): Path<String>,
    body: Bytes,
) -> Response {
    let body: SecretBody = match parse_json(&body) {
        Ok(body) => body,
        Err(response) => return response,
    };
    match shared.set_account_secret(&username, &body.secret) {
        Ok(()) => ok_response(),
        Err(error) => error_response(&error),
    }
}
