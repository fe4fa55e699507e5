//! Data API handlers: `POST /visit/events` and `GET /visit/visitor`.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{OriginalUri, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::oauth::{MISSING_TOKEN, TokenCheck, check_token, unauthorized};
use super::state::{IdentifierKind, KameleoonState, RejectedLine, Shared, shorten_line};
use super::{FaultOutcome, apply_fault};
use crate::faults::{RequestFacts, Route};
use crate::limits::{MAPPING_VALUE_MAX_CHARS, NONCE_HEX_DIGITS, VISITOR_CODE_MAX_CHARS};
use crate::record::RecordSlot;
use crate::util::{BodyRead, json_response, now_ms, read_body_limited};

/// Substrings (lower case) that mark a User-Agent as a robot. Kameleoon rejects
/// tracking from robots on the IAB/ABC list; this is a short stand-in for it.
const BOT_USER_AGENT_MARKERS: &[&str] = &[
    "bot",
    "crawl",
    "spider",
    "slurp",
    "headless",
    "phantomjs",
    "facebookexternalhit",
];

fn data_error(status: StatusCode, message: &str) -> Response {
    json_response(status, &json!({"error": message}))
}

fn query_pairs(uri: &axum::http::Uri) -> HashMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect()
}

/// Returns why a User-Agent is refused, or `None` when it is accepted.
fn refused_user_agent(headers: &HeaderMap) -> Option<String> {
    let Some(value) = headers.get(header::USER_AGENT) else {
        return Some("a User-Agent header is required".into());
    };
    let text = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
    if text.trim().is_empty() {
        return Some("the User-Agent header is empty".into());
    }
    BOT_USER_AGENT_MARKERS
        .iter()
        .find(|marker| text.contains(*marker))
        .map(|marker| format!("the User-Agent looks like a robot (contains {marker:?})"))
}

/// Checks the optional or required bearer token and the site access; returns
/// the client id when a token was sent.
fn authorize(
    state: &mut KameleoonState,
    headers: &HeaderMap,
    site_code: Option<&str>,
    slot: &RecordSlot,
) -> Result<Option<String>, Response> {
    let client_id = match check_token(state, headers) {
        TokenCheck::Valid { client_id } => Some(client_id),
        TokenCheck::Missing if !state.config.data_api_auth_required => None,
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
    slot.update(|d| d.client_id = client_id.clone());
    if let Some(reason) = refused_user_agent(headers) {
        state.stats.forbidden += 1;
        slot.update(|d| d.note = Some(reason.clone()));
        return Err(data_error(StatusCode::FORBIDDEN, &reason));
    }
    if let (Some(client_id), Some(site_code)) = (&client_id, site_code)
        && state.sites.contains_key(site_code)
        && !state
            .clients
            .get(client_id)
            .is_some_and(|client| client.sites.contains(site_code))
    {
        state.stats.forbidden += 1;
        let reason = format!("access to site {site_code} is denied for client {client_id}");
        slot.update(|d| d.note = Some(reason.clone()));
        return Err(data_error(StatusCode::FORBIDDEN, &reason));
    }
    Ok(client_id)
}

/// A valid `customData` event line.
#[derive(Debug, PartialEq)]
pub(crate) struct ParsedLine {
    pub index: u32,
    pub values: Vec<String>,
    pub overwrite: bool,
    pub nonce: u64,
    pub kind: IdentifierKind,
    pub identifier: String,
}

/// Parses one query-encoded event line. `url_identifier` is the visitor named
/// in the request URL, used by lines that name none.
pub(crate) fn parse_line(
    line: &str,
    url_identifier: Option<(IdentifierKind, &str)>,
) -> Result<ParsedLine, String> {
    let mut fields: HashMap<String, String> = HashMap::new();
    for (key, value) in form_urlencoded::parse(line.as_bytes()) {
        if fields.contains_key(key.as_ref()) {
            return Err(format!("parameter {key} appears more than once"));
        }
        fields.insert(key.into_owned(), value.into_owned());
    }
    let event_type = fields.get("eventType").ok_or("eventType is missing")?;
    if !event_type.eq_ignore_ascii_case("customData") {
        return Err(format!(
            "eventType {event_type:?} is not supported by the stand-in, which models only customData"
        ));
    }
    let nonce_text = fields.get("nonce").ok_or("nonce is missing")?;
    if nonce_text.len() != NONCE_HEX_DIGITS || !nonce_text.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "nonce must be {NONCE_HEX_DIGITS} hexadecimal digits, got {nonce_text:?}"
        ));
    }
    let nonce =
        u64::from_str_radix(nonce_text, 16).map_err(|error| format!("invalid nonce: {error}"))?;

    let index_text = fields.get("index").ok_or("index is missing")?;
    let index = index_text
        .parse::<u32>()
        .map_err(|_| format!("index must be a non-negative integer, got {index_text:?}"))?;
    let values_text = fields
        .get("valuesCountMap")
        .ok_or("valuesCountMap is missing")?;
    let values = parse_values_count_map(values_text)?;

    let overwrite = match fields
        .get("overwrite")
        .map(|text| text.to_ascii_lowercase())
    {
        None => true,
        Some(text) if text == "true" => true,
        Some(text) if text == "false" => false,
        Some(text) => return Err(format!("overwrite must be true or false, got {text:?}")),
    };
    let (kind, identifier) = match (fields.get("visitorCode"), fields.get("mappingValue")) {
        (Some(_), Some(_)) => {
            return Err("a line must carry either visitorCode or mappingValue, not both".into());
        }
        (Some(code), None) => (IdentifierKind::VisitorCode, code.clone()),
        (None, Some(value)) => (IdentifierKind::MappingValue, value.clone()),
        (None, None) => match url_identifier {
            Some((kind, identifier)) => (kind, identifier.to_string()),
            None => return Err("visitorCode or mappingValue is missing".into()),
        },
    };

    let max_chars = match kind {
        IdentifierKind::VisitorCode => VISITOR_CODE_MAX_CHARS,
        IdentifierKind::MappingValue => MAPPING_VALUE_MAX_CHARS,
    };
    if identifier.is_empty() {
        return Err(format!("{} is empty", kind.parameter()));
    }
    let length = identifier.chars().count();
    if length > max_chars {
        return Err(format!(
            "{} is {length} characters long; the maximum is {max_chars}",
            kind.parameter()
        ));
    }
    Ok(ParsedLine {
        index,
        values,
        overwrite,
        nonce,
        kind,
        identifier,
    })
}

/// Parses `valuesCountMap`, a JSON object of value to positive count; returns the values.
fn parse_values_count_map(text: &str) -> Result<Vec<String>, String> {
    let map: Map<String, Value> = serde_json::from_str(text).map_err(|_| {
        format!("valuesCountMap must be a JSON object of value to count, got {text:?}")
    })?;
    let mut values = Vec::with_capacity(map.len());
    for (value, count) in map {
        if count.as_u64().is_none_or(|count| count == 0) {
            return Err(format!(
                "valuesCountMap count for {value:?} must be a positive integer, got {count}"
            ));
        }
        values.push(value);
    }
    Ok(values)
}

/// Checks the values of a line against the custom data's format and type.
fn check_values(format: &str, data_type: &str, values: &[String]) -> Result<(), String> {
    if data_type == "UNIQUE" && values.len() > 1 {
        return Err(format!(
            "the custom data holds a single value (type UNIQUE) but the line sets {}",
            values.len()
        ));
    }
    for value in values {
        let valid = match format {
            "BOOLEAN" => value == "true" || value == "false",
            "NUMBER" => value.parse::<f64>().is_ok(),
            _ => true,
        };
        if !valid {
            return Err(format!("value {value:?} is not a valid {format}"));
        }
    }
    Ok(())
}

/// Per-request counts of applied, rejected and duplicate lines.
#[derive(Default)]
struct LineCounts {
    lines: u64,
    applied: u64,
    rejected: u64,
    duplicate: u64,
}

fn apply_lines(
    state: &mut KameleoonState,
    site_code: &str,
    request_id: u64,
    lines: Vec<(usize, &str, Result<ParsedLine, String>)>,
) -> LineCounts {
    let mut counts = LineCounts {
        lines: lines.len() as u64,
        ..LineCounts::default()
    };
    let require_mapping = state.config.require_mapping_identifier;
    let at_ms = now_ms();
    let mut rejected = Vec::new();
    match state.sites.get_mut(site_code) {
        None => {
            for (line_number, text, _) in &lines {
                rejected.push(RejectedLine {
                    request_id,
                    site_code: site_code.to_string(),
                    line_number: *line_number,
                    reason: format!("siteCode {site_code} is not a known site"),
                    line: shorten_line(text),
                    at_ms,
                });
            }
        }
        Some(site) => {
            let definitions: HashMap<u32, (String, String)> = site
                .custom_datas
                .iter()
                .map(|data| (data.index, (data.format.clone(), data.data_type.clone())))
                .collect();
            let has_mapping_identifier = site.has_mapping_identifier();
            for (line_number, text, parsed) in lines {
                let outcome = parsed.and_then(|line| {
                    let (format, data_type) = definitions
                        .get(&line.index)
                        .ok_or_else(|| format!("index {} is not a custom data of site {site_code}", line.index))?;
                    check_values(format, data_type, &line.values)?;
                    if line.kind == IdentifierKind::MappingValue && require_mapping && !has_mapping_identifier {
                        return Err(format!(
                            "site {site_code} has no mapping identifier custom data, so mappingValue cannot be matched"
                        ));
                    }
                    Ok(line)
                });
                match outcome {
                    Err(reason) => rejected.push(RejectedLine {
                        request_id,
                        site_code: site_code.to_string(),
                        line_number,
                        reason,
                        line: shorten_line(text),
                        at_ms,
                    }),
                    Ok(line) => {
                        if !site.nonces.insert(line.nonce) {
                            counts.duplicate += 1;
                            continue;
                        }
                        site.apply(
                            line.index,
                            line.kind,
                            &line.identifier,
                            line.values,
                            line.overwrite,
                        );
                        counts.applied += 1;
                    }
                }
            }
        }
    }
    counts.rejected = rejected.len() as u64;
    for line in rejected {
        state.record_rejected(line);
    }
    state.stats.lines_received += counts.lines;
    state.stats.lines_applied += counts.applied;
    state.stats.lines_duplicate += counts.duplicate;
    counts
}

/// Returns the visitor named in the URL, when exactly one of `visitorCode` and
/// `mappingValue` is given there.
fn url_identifier(query: &HashMap<String, String>) -> Option<(IdentifierKind, &str)> {
    match (query.get("visitorCode"), query.get("mappingValue")) {
        (Some(code), None) => Some((IdentifierKind::VisitorCode, code.as_str())),
        (None, Some(value)) => Some((IdentifierKind::MappingValue, value.as_str())),
        _ => None,
    }
}

/// `POST /visit/events?siteCode=SC`: newline-separated, query-encoded events.
///
/// The real service responds 204 before it reads the body. The stand-in applies
/// the valid lines before it responds, so state is visible as soon as the 204
/// arrives, and records the invalid ones as rejected lines.
pub(crate) async fn events(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    slot.update(|d| d.route = Some(Route::Events));
    let query = query_pairs(&uri);
    let site_code = query
        .get("siteCode")
        .cloned()
        .filter(|code| !code.is_empty());
    slot.update(|d| d.site_code = site_code.clone());
    let limit = shared.state.lock().config.events_body_limit_bytes;
    let read = read_body_limited(&headers, body, limit).await;

    let mut facts = RequestFacts::new(Route::Events);
    facts.site_code = site_code.clone();
    let FaultOutcome { delay } = match apply_fault(&shared, &facts, &slot) {
        Ok(outcome) => outcome,
        Err(response) => return response,
    };

    let bytes = match read {
        BodyRead::Complete(bytes) => bytes,
        BodyRead::TooLarge { declared } => {
            shared.state.lock().stats.events_body_too_large += 1;
            slot.update(|d| {
                d.note = Some(format!(
                    "body above {limit} bytes (Content-Length {declared:?})"
                ))
            });
            return data_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body is larger than the limit of {limit} bytes"),
            );
        }
        BodyRead::Failed(error) => {
            return data_error(
                StatusCode::BAD_REQUEST,
                &format!("failed to read body: {error}"),
            );
        }
    };
    slot.update(|d| d.body_bytes = bytes.len() as u64);

    {
        let mut state = shared.state.lock();
        state.stats.events_requests += 1;
        state.stats.bytes_received += bytes.len() as u64;
        state.stats.max_body_bytes = state.stats.max_body_bytes.max(bytes.len() as u64);
        if let Err(response) = authorize(&mut state, &headers, site_code.as_deref(), &slot) {
            return response;
        }
    }
    let Some(site_code) = site_code else {
        return data_error(StatusCode::BAD_REQUEST, "siteCode is required");
    };
    if query.get("json").is_some_and(|flag| flag == "true") {
        return data_error(
            StatusCode::BAD_REQUEST,
            "json=true bodies are not supported by the stand-in; send newline-separated query strings",
        );
    }
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }

    let text = String::from_utf8_lossy(&bytes);
    let identifier = url_identifier(&query);
    let lines: Vec<(usize, &str, Result<ParsedLine, String>)> = text
        .split('\n')
        .enumerate()
        .map(|(number, line)| (number + 1, line.strip_suffix('\r').unwrap_or(line)))
        .filter(|(_, line)| !line.is_empty())
        .map(|(number, line)| (number, line, parse_line(line, identifier)))
        .collect();
    let counts = {
        let mut state = shared.state.lock();
        let counts = apply_lines(&mut state, &site_code, slot.id, lines);
        state.stats.events_accepted += 1;
        counts
    };
    slot.update(|d| {
        d.line_count = Some(counts.lines);
        d.accepted_lines = Some(counts.applied);
        d.rejected_lines = Some(counts.rejected);
        d.duplicate_lines = Some(counts.duplicate);
    });
    if counts.rejected > 0 {
        tracing::warn!(site = %site_code, rejected = counts.rejected, request_id = slot.id, "event lines rejected");
    }
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /visit/visitor?siteCode=SC&visitorCode=V|mappingValue=M&customData=true`:
/// the custom data a visitor currently carries, as one event per custom data
/// in `currentVisit.customDataEvents`.
///
/// NOTE: the real response also contains past visits and other event kinds,
/// but the stand-in returns only what it stores.
pub(crate) async fn visitor(
    State(shared): State<Arc<Shared>>,
    slot: RecordSlot,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
) -> Response {
    slot.update(|d| d.route = Some(Route::Visitor));
    let query = query_pairs(&uri);
    let site_code = query
        .get("siteCode")
        .cloned()
        .filter(|code| !code.is_empty());
    slot.update(|d| d.site_code = site_code.clone());
    let mut facts = RequestFacts::new(Route::Visitor);
    facts.site_code = site_code.clone();
    let FaultOutcome { delay } = match apply_fault(&shared, &facts, &slot) {
        Ok(outcome) => outcome,
        Err(response) => return response,
    };
    {
        let mut state = shared.state.lock();
        if let Err(response) = authorize(&mut state, &headers, site_code.as_deref(), &slot) {
            return response;
        }
    }
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    let Some(site_code) = site_code else {
        return data_error(StatusCode::BAD_REQUEST, "siteCode is required");
    };
    let Some((kind, identifier)) = url_identifier(&query) else {
        return data_error(
            StatusCode::BAD_REQUEST,
            "exactly one of visitorCode and mappingValue is required",
        );
    };

    let with_custom_data = query
        .get("customData")
        .is_some_and(|flag| flag.eq_ignore_ascii_case("true"));
    let state = shared.state.lock();
    let Some(site) = state.sites.get(&site_code) else {
        return data_error(
            StatusCode::NOT_FOUND,
            &format!("siteCode {site_code} is not a known site"),
        );
    };

    let mut custom_data_events = Vec::new();
    if with_custom_data {
        let mut indexes: Vec<&u32> = site.values.keys().collect();
        indexes.sort();
        for index in indexes {
            let Some(values) = site.values[index].of_kind(kind).get(identifier) else {
                continue;
            };
            let counts: Map<String, Value> = values
                .iter()
                .map(|value| (value.clone(), json!(1)))
                .collect();
            custom_data_events.push(json!({
                "time": now_ms(),
                "data": {
                    "index": index,
                    "valuesCountMap": counts,
                    "overwrite": true,
                    "mappingIdentifier": false,
                },
            }));
        }
    }
    json_response(
        StatusCode::OK,
        &json!({
            "currentVisit": {
                kind.parameter(): identifier,
                "customDataEvents": custom_data_events,
            },
            "previousVisits": [],
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "eventType=customData&index=3&valuesCountMap=%7B%22true%22%3A1%7D&overwrite=true&nonce=0123456789ABCDEF&visitorCode=u-1";

    #[test]
    fn parses_sdk_line() {
        let line = parse_line(GOOD, None).expect("valid line");
        assert_eq!(line.index, 3);
        assert_eq!(line.values, vec!["true".to_string()]);
        assert!(line.overwrite);
        assert_eq!(line.nonce, 0x0123_4567_89AB_CDEF);
        assert_eq!(line.kind, IdentifierKind::VisitorCode);
        assert_eq!(line.identifier, "u-1");
    }

    #[test]
    fn event_type_is_case_insensitive() {
        let line = GOOD.replace("customData", "CUSTOMDATA");
        assert!(parse_line(&line, None).is_ok());
    }

    #[test]
    fn rejects_bad_lines() {
        let cases = [
            (
                GOOD.replace("nonce=0123456789ABCDEF", "nonce=0123"),
                "nonce",
            ),
            (
                GOOD.replace("&visitorCode=u-1", ""),
                "visitorCode or mappingValue is missing",
            ),
            (format!("{GOOD}&mappingValue=m"), "not both"),
            (GOOD.replace("u-1", &"x".repeat(101)), "maximum is 100"),
            (GOOD.replace("u-1", ""), "visitorCode is empty"),
            (
                GOOD.replace("%7B%22true%22%3A1%7D", "true"),
                "valuesCountMap",
            ),
            (
                GOOD.replace("%7B%22true%22%3A1%7D", "%7B%22true%22%3A0%7D"),
                "positive",
            ),
            (GOOD.replace("overwrite=true", "overwrite=yes"), "overwrite"),
            (GOOD.replace("index=3", "index=-1"), "index"),
            (GOOD.replace("customData", "activity"), "not supported"),
            (format!("{GOOD}&index=4"), "more than once"),
        ];
        for (line, expected) in cases {
            let error = parse_line(&line, None).expect_err(&line);
            assert!(error.contains(expected), "{line}: {error}");
        }
    }

    #[test]
    fn mapping_value_limit_is_separate() {
        let line = GOOD.replace(
            "visitorCode=u-1",
            &format!("mappingValue={}", "m".repeat(200)),
        );
        let parsed = parse_line(&line, None).expect("200 characters fit a mapping value");
        assert_eq!(parsed.kind, IdentifierKind::MappingValue);
        let line = GOOD.replace(
            "visitorCode=u-1",
            &format!("mappingValue={}", "m".repeat(256)),
        );
        assert!(parse_line(&line, None).is_err());
    }

    #[test]
    fn url_identifier_fills_missing_one() {
        let line = GOOD.replace("&visitorCode=u-1", "");
        let parsed = parse_line(&line, Some((IdentifierKind::MappingValue, "m-9"))).expect("valid");
        assert_eq!(parsed.kind, IdentifierKind::MappingValue);
        assert_eq!(parsed.identifier, "m-9");
    }

    #[test]
    fn values_follow_format() {
        assert!(check_values("BOOLEAN", "UNIQUE", &["true".into()]).is_ok());
        assert!(check_values("BOOLEAN", "UNIQUE", &["yes".into()]).is_err());
        assert!(check_values("BOOLEAN", "UNIQUE", &["true".into(), "false".into()]).is_err());
        assert!(check_values("NUMBER", "LIST", &["1.5".into(), "2".into()]).is_ok());
    }

    #[test]
    fn robots_are_refused() {
        let mut headers = HeaderMap::new();
        assert!(refused_user_agent(&headers).is_some());
        headers.insert(header::USER_AGENT, "Googlebot/2.1".parse().expect("header"));
        assert!(refused_user_agent(&headers).is_some());
        headers.insert(
            header::USER_AGENT,
            "cohort-operator/0.1".parse().expect("header"),
        );
        assert!(refused_user_agent(&headers).is_none());
    }
}
