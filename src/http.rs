//! Helpers shared by the Mixpanel and Kameleoon clients.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// User-Agent sent to both services. Kameleoon's Data API rejects requests
/// whose User-Agent looks like a bot, so it names the product and version.
pub const USER_AGENT: &str = concat!("kameleoon-cohort-operator/", env!("CARGO_PKG_VERSION"));

/// Selects ring as the TLS crypto provider of the process, once. Both clients
/// call it before building a reqwest client; later calls do nothing.
pub fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // An error means another provider was installed first, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Longest service message kept in an error, in characters.
const MAX_MESSAGE_CHARS: usize = 300;

/// Reads a `Retry-After` header given in seconds. An HTTP date form is
/// ignored, so the caller falls back to its own backoff.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    value.parse::<u64>().ok().map(Duration::from_secs)
}

/// Extracts a service's error message from a response body: the named JSON
/// fields when the body is a JSON object, otherwise the text itself, cut to a
/// readable length.
pub fn error_message(body: &str, fields: &[&str]) -> String {
    let from_json = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|json| {
            let parts: Vec<&str> = fields
                .iter()
                .filter_map(|f| json.get(*f).and_then(|v| v.as_str()))
                .collect();
            (!parts.is_empty()).then(|| parts.join(": "))
        });
    let text = from_json.unwrap_or_else(|| body.trim().to_string());
    let text = if text.is_empty() {
        "(empty response body)".to_string()
    } else {
        text
    };
    truncate(&text, MAX_MESSAGE_CHARS)
}

/// Cuts text to a number of characters, marking the cut.
pub fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let kept: String = text.chars().take(max_chars).collect();
    format!("{kept}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_ignores_dates() {
        let mut headers = HeaderMap::new();
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn error_message_prefers_json_fields() {
        let body = r#"{"error": "invalid_client", "error_description": "bad secret"}"#;
        assert_eq!(
            error_message(body, &["error", "error_description"]),
            "invalid_client: bad secret"
        );
    }

    #[test]
    fn error_message_falls_back_to_text() {
        assert_eq!(
            error_message("  upstream down ", &["error"]),
            "upstream down"
        );
        assert_eq!(error_message("", &["error"]), "(empty response body)");
    }

    #[test]
    fn error_message_is_cut() {
        let long = "x".repeat(1000);
        assert_eq!(error_message(&long, &["error"]).chars().count(), 301);
    }
}
