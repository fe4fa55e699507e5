//! Small helpers shared by both stand-ins.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

/// Returns the current time in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Builds a response with a JSON body.
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// Builds a response for a fault body: a JSON string becomes a `text/plain` body,
/// any other JSON value is sent as JSON, and no value sends an empty body.
pub(crate) fn fault_response(
    status: u16,
    body: Option<&Value>,
    retry_after: Option<u64>,
) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match body {
        None | Some(Value::Null) => status.into_response(),
        Some(Value::String(text)) => (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            text.clone(),
        )
            .into_response(),
        Some(other) => json_response(status, other),
    };
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Outcome of reading a request body with a size limit.
pub(crate) enum BodyRead {
    Complete(Bytes),
    /// The body was larger than the limit; `declared` is the `Content-Length`, if any.
    TooLarge {
        declared: Option<u64>,
    },
    Failed(String),
}

/// Reads a request body of at most `limit` bytes.
///
/// A body whose `Content-Length` exceeds the limit is rejected without being
/// parsed. It is still read and discarded when it is at most
/// [`crate::limits::MAX_DRAINED_BODY_BYTES`], so an HTTP/1.1 client that is
/// still writing it reads the response instead of a reset connection.
pub(crate) async fn read_body_limited(headers: &HeaderMap, body: Body, limit: usize) -> BodyRead {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = declared
        && length > limit as u64
    {
        if length <= crate::limits::MAX_DRAINED_BODY_BYTES as u64 {
            let _ = axum::body::to_bytes(body, crate::limits::MAX_DRAINED_BODY_BYTES).await;
        }
        return BodyRead::TooLarge { declared };
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => BodyRead::Complete(bytes),
        Err(error) => {
            let is_length_error = std::error::Error::source(&error)
                .map(|source| source.to_string().contains("length limit"))
                .unwrap_or(false)
                || error.to_string().contains("length limit");
            if is_length_error {
                BodyRead::TooLarge { declared }
            } else {
                BodyRead::Failed(error.to_string())
            }
        }
    }
}

/// Credentials from an `Authorization: Basic` header.
pub(crate) struct BasicCredentials {
    pub username: String,
    pub password: String,
}

/// Parses `Authorization: Basic`: the standard base64 form, and also the plain
/// `username:secret` form that Mixpanel accepts for service accounts.
pub(crate) fn parse_basic(headers: &HeaderMap) -> Option<BasicCredentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let rest = rest.trim();
    let decoded = STANDARD
        .decode(rest)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|text| text.contains(':'))
        .unwrap_or_else(|| rest.to_string());
    let (username, password) = decoded.split_once(':')?;
    Some(BasicCredentials {
        username: username.to_string(),
        password: password.to_string(),
    })
}

/// Returns the token of an `Authorization: Bearer` header; `Some("")` when the
/// header uses another scheme or is malformed, `None` when it is absent.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?;
    let Ok(text) = value.to_str() else {
        return Some(String::new());
    };
    match text.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Some(token.trim().to_string())
        }
        _ => Some(String::new()),
    }
}

/// Rewrites an `Authorization` value for the request log: the scheme stays, a
/// Basic username stays, every secret becomes `<redacted>`.
pub(crate) fn redact_authorization(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once(' ') else {
        return "<redacted>".to_string();
    };
    if scheme.eq_ignore_ascii_case("basic") {
        let rest = rest.trim();
        let decoded = STANDARD
            .decode(rest)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .filter(|text| text.contains(':'))
            .unwrap_or_else(|| rest.to_string());
        if let Some((username, _)) = decoded.split_once(':') {
            return format!("{scheme} {username}:<redacted>");
        }
    }
    format!("{scheme} <redacted>")
}

/// Parses a boolean form or query value the way Python and Django style
/// backends do: `true`/`false`, `1`/`0`, case-insensitive.
pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// Formats a Unix time as `YYYY-MM-DD HH:MM:SS` (UTC), the form of Mixpanel's
/// cohort `created` field.
pub(crate) fn format_utc(unix_seconds: u64) -> String {
    let (year, month, day, hour, minute, second) = civil_from_unix(unix_seconds);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}")
}

/// Formats a Unix time as RFC 3339 with a `Z` suffix.
pub(crate) fn format_rfc3339(unix_seconds: u64) -> String {
    let (year, month, day, hour, minute, second) = civil_from_unix(unix_seconds);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// Converts Unix seconds to a UTC calendar date and time (proleptic Gregorian).
fn civil_from_unix(unix_seconds: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix_seconds / 86_400) as i64;
    let seconds_of_day = unix_seconds % 86_400;
    // Days-to-civil conversion on 400-year eras, with years starting in March.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (seconds_of_day / 3600) as u32,
        (seconds_of_day / 60 % 60) as u32,
        (seconds_of_day % 60) as u32,
    )
}

/// Returns `count` random upper-case hexadecimal digits.
pub(crate) fn random_hex(count: usize) -> String {
    let mut text = String::with_capacity(count);
    while text.len() < count {
        text.push_str(&format!("{:016X}", rand::random::<u64>()));
    }
    text.truncate(count);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_utc_known_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00");
        assert_eq!(format_utc(1_553_039_391), "2019-03-19 23:49:51");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn redaction_keeps_scheme_and_username() {
        let basic = format!("Basic {}", STANDARD.encode("sa-user:top-secret"));
        assert_eq!(redact_authorization(&basic), "Basic sa-user:<redacted>");
        assert_eq!(redact_authorization("Bearer abc.def"), "Bearer <redacted>");
        assert_eq!(redact_authorization("garbage"), "<redacted>");
    }

    #[test]
    fn basic_accepts_plain_text_form() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic user:pw"),
        );
        let credentials = parse_basic(&headers).expect("plain form parses");
        assert_eq!(credentials.username, "user");
        assert_eq!(credentials.password, "pw");
    }
}
