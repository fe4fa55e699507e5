//! Pieces shared by the control APIs (`/_standin/...`) of both stand-ins.

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::StandinError;
use crate::faults::Route;
use crate::record::RequestRecord;
use crate::util::json_response;

/// Query of `GET /_standin/requests`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RequestsQuery {
    /// Only records with an id greater than this.
    #[serde(default)]
    pub since: u64,
    /// Only records of this route.
    #[serde(default)]
    pub route: Option<Route>,
}

pub(crate) fn filter_records(
    records: Vec<RequestRecord>,
    query: &RequestsQuery,
) -> Vec<RequestRecord> {
    match query.route {
        None => records,
        Some(route) => records
            .into_iter()
            .filter(|record| record.route == Some(route))
            .collect(),
    }
}

/// Maps a control-operation error to a JSON response.
pub(crate) fn error_response(error: &StandinError) -> Response {
    let status = match error {
        StandinError::NotFound(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    json_response(status, &json!({"error": error.to_string()}))
}

pub(crate) fn ok_response() -> Response {
    json_response(StatusCode::OK, &json!({"ok": true}))
}

/// Parses a JSON request body into `T`, or returns a 400 response with the reason.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|error| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": format!("invalid JSON body: {error}")}),
        )
    })
}

/// Applies a partial JSON object to a configuration: fields present in `patch`
/// replace the current values, other fields stay.
pub(crate) fn merge_config<T>(current: &T, patch: Value) -> Result<T, StandinError>
where
    T: serde::Serialize + DeserializeOwned,
{
    let Value::Object(patch) = patch else {
        return Err(StandinError::Invalid(
            "the configuration patch must be a JSON object".into(),
        ));
    };
    let mut merged =
        serde_json::to_value(current).map_err(|error| StandinError::Invalid(error.to_string()))?;
    let Value::Object(fields) = &mut merged else {
        return Err(StandinError::Invalid(
            "the configuration is not a JSON object".into(),
        ));
    };
    for (name, value) in patch {
        fields.insert(name, value);
    }
    serde_json::from_value(merged)
        .map_err(|error| StandinError::Invalid(format!("invalid configuration: {error}")))
}
