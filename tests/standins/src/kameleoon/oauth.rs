//! OAuth 2.0 client-credentials tokens: `POST /oauth/token` and bearer checks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use super::apply_fault;
use super::state::{KameleoonState, Shared, Token};
use crate::faults::{RequestFacts, Route};
use crate::limits::AUTOMATION_BODY_LIMIT_BYTES;
use crate::record::RecordSlot;
use crate::util::{
    BodyRead, bearer_token, json_response, now_ms, parse_basic, random_hex, read_body_limited,
};

/// Result of checking an `Authorization: Bearer` header.
pub(crate) enum TokenCheck {
    Missing,
    Rejected(&'static str),
    Valid { client_id: String },
}

pub(crate) fn check_token(state: &KameleoonState, headers: &HeaderMap) -> TokenCheck {
    let Some(token) = bearer_token(headers) else {
        return TokenCheck::Missing;
    };
    if token.is_empty() {
        return TokenCheck::Rejected("the Authorization header is not a Bearer token");
    }
    let Some(info) = state.tokens.get(&token) else {
        return TokenCheck::Rejected("the access token is invalid");
    };
    if info.revoked {
        return TokenCheck::Rejected("the access token has been revoked");
    }
    if Instant::now() >= info.expires_at {
        return TokenCheck::Rejected("the access token has expired");
    }
    if !state.clients.contains_key(&info.client_id) {
        return TokenCheck::Rejected("the client of the access token no longer exists");
    }
    TokenCheck::Valid {
        client_id: info.client_id.clone(),
    }
}

/// Builds the 401 response for a missing or rejected token, in the OAuth 2.0 bearer style.
pub(crate) fn unauthorized(description: &str) -> Response {
    let error = if description.contains("Full authentication") {
        "unauthorized"
    } else {
        "invalid_token"
    };
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"error": error, "error_description": description}),
    );
    let challenge = format!("Bearer error=\"{error}\", error_description=\"{description}\"");
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// Description used when a request carries no token at all.
pub(crate) const MISSING_TOKEN: &str = "Full authentication is required to access this resource";

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

/// Builds an opaque token shaped like a JWT (header, claims, random signature).
fn new_access_token(client_id: &str, lifetime_seconds: u64) -> String {
    let issued = now_ms() / 1000;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = json!({
        "iss": "kameleoon-standin",
        "sub": client_id,
        "iat": issued,
        "exp": issued + lifetime_seconds,
        "jti": random_hex(16),
    });
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = URL_SAFE_NO_PAD.encode(random_hex(64));
    format!("{header}.{claims}.{signature}")
}

/// `POST /oauth/token` with `grant_type=client_credentials&client_id=..&client_secret=..`;
/// the client may also authenticate with HTTP Basic.
pub(crate) async fn token(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    headers: HeaderMap,
    body: Body,
) -> Response {
    slot.update(|d| d.route = Some(Route::Token));
    let bytes = match read_body_limited(&headers, body, AUTOMATION_BODY_LIMIT_BYTES).await {
        BodyRead::Complete(bytes) => bytes,
        BodyRead::TooLarge { .. } => {
            return oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "request body too large",
            );
        }
        BodyRead::Failed(error) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &error);
        }
    };
    slot.update(|d| d.body_bytes = bytes.len() as u64);
    let form: HashMap<String, String> = form_urlencoded::parse(&bytes)
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    let basic = parse_basic(&headers);
    let client_id = form.get("client_id").cloned().or_else(|| {
        basic
            .as_ref()
            .map(|credentials| credentials.username.clone())
    });
    slot.update(|d| d.client_id = client_id.clone());

    let outcome = match apply_fault(&shared, &RequestFacts::new(Route::Token), &slot) {
        Ok(outcome) => outcome,
        Err(response) => return response,
    };
    if let Some(delay) = outcome.delay {
        tokio::time::sleep(delay).await;
    }

    let mut state = shared.state.lock();
    let grant_type = form.get("grant_type").map(String::as_str);
    match grant_type {
        None => {
            state.stats.token_requests_rejected += 1;
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing grant type",
            );
        }
        Some("client_credentials") => {}
        Some(other) => {
            state.stats.token_requests_rejected += 1;
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                &format!("Unsupported grant type: {other}"),
            );
        }
    }
    let secret = form.get("client_secret").cloned().or_else(|| {
        basic
            .as_ref()
            .map(|credentials| credentials.password.clone())
    });
    let accepted = match (&client_id, &secret) {
        (Some(id), Some(secret)) => state
            .clients
            .get(id)
            .is_some_and(|client| &client.secret == secret),
        _ => false,
    };
    let Some(client_id) = client_id.filter(|_| accepted) else {
        state.stats.token_requests_rejected += 1;
        slot.update(|d| d.note = Some("invalid client credentials".into()));
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "Bad client credentials",
        );
    };
    let lifetime = state.config.token_lifetime_seconds;
    let access_token = new_access_token(&client_id, lifetime);
    // Forget tokens that expired over an hour ago; they would only be rejected.
    let now = Instant::now();
    state.tokens.retain(|_, token| {
        now.saturating_duration_since(token.expires_at) < Duration::from_secs(3600)
    });
    state.tokens.insert(
        access_token.clone(),
        Token {
            client_id,
            expires_at: Instant::now() + Duration::from_secs(lifetime),
            revoked: false,
        },
    );
    state.stats.tokens_issued += 1;
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": lifetime,
        }),
    )
}
