//! Client for the Kameleoon APIs the operator uses: OAuth client credentials,
//! the Automation API (sites and custom data) and the Data API (events).
//!
//! Access tokens are cached per client id and renewed a minute before they
//! expire; a 401 from any call drops the token, fetches a new one and retries
//! that call once.

mod error;
pub mod events;
pub mod pacing;

pub use error::Error;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use reqwest::{Client, RequestBuilder, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::http::USER_AGENT;
use crate::secret::SecretString;

/// How long before its expiry a cached token is replaced.
const TOKEN_RENEWAL_MARGIN: Duration = Duration::from_secs(60);

/// Kameleoon OAuth client credentials.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret.
    pub client_secret: SecretString,
}

impl Credentials {
    /// Decodes an API key in the form Kameleoon gives integration partners:
    /// base64 of a JSON object with `id` and `secret`.
    pub fn from_api_key(api_key: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct ApiKey {
            id: String,
            secret: String,
        }
        let compact: String = api_key.chars().filter(|c| !c.is_whitespace()).collect();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&compact)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&compact))
            .map_err(|_| "the API key is not base64".to_string())?;
        let key: ApiKey = serde_json::from_slice(&raw).map_err(|_| {
            "the API key does not decode to a JSON object with id and secret".to_string()
        })?;
        if key.id.is_empty() || key.secret.is_empty() {
            return Err("the API key has an empty id or secret".to_string());
        }
        Ok(Self {
            client_id: key.id,
            client_secret: SecretString::new(key.secret),
        })
    }
}

/// A Kameleoon site (project).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Site {
    /// Site id.
    pub id: i64,
    /// Site code.
    pub code: String,
    /// Site name.
    #[serde(default)]
    pub name: Option<String>,
}

/// A custom data definition of a site.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CustomData {
    /// Custom data id.
    pub id: i64,
    /// Index that Data API events name.
    pub index: i64,
    /// Name.
    pub name: String,
    /// Value format: BOOLEAN, STRING or NUMBER.
    #[serde(default)]
    pub format: Option<String>,
    /// Scope: PAGE, VISIT or VISITOR.
    #[serde(default)]
    pub scope: Option<String>,
    /// Whether this is the site's cross-device mapping identifier, the
    /// custom data whose values the Data API matches `mappingValue` against.
    #[serde(default)]
    pub is_mapping_identifier: bool,
}

/// Body of a custom data creation.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewCustomData<'a> {
    /// Name.
    pub name: &'a str,
    /// Site id.
    pub site_id: i64,
    /// Value format.
    pub format: &'static str,
    /// Single value or list.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Acquisition method.
    pub method: &'static str,
    /// Scope.
    pub scope: &'static str,
}

/// Base URLs of the two Kameleoon hosts.
#[derive(Clone, Debug)]
pub struct Endpoints {
    /// OAuth and Automation API.
    pub api: Url,
    /// Data API.
    pub data: Url,
}

impl Endpoints {
    /// Kameleoon's production hosts.
    pub fn production() -> Self {
        Self {
            api: Url::parse("https://api.kameleoon.com").expect("static URL parses"),
            data: Url::parse("https://data.kameleoon.io").expect("static URL parses"),
        }
    }
}

#[derive(Clone)]
struct CachedToken {
    value: SecretString,
    renew_at: Instant,
}

/// Kameleoon client shared by every connection; tokens are cached per
/// credentials.
#[derive(Clone)]
pub struct KameleoonClient {
    http: Client,
    endpoints: Endpoints,
    tokens: Arc<Mutex<HashMap<Credentials, CachedToken>>>,
    automation: Arc<pacing::Pacer>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl KameleoonClient {
    /// Builds a client with request timeouts.
    pub fn new(endpoints: Endpoints, request_timeout: Duration) -> reqwest::Result<Self> {
        crate::http::install_crypto_provider();
        let http = Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .timeout(request_timeout)
            .build()?;
        Ok(Self {
            http,
            endpoints,
            tokens: Arc::default(),
            automation: Arc::new(pacing::Pacer::new(&pacing::AUTOMATION_LIMITS)),
        })
    }

    fn api_url(&self, path: &str) -> Url {
        let mut url = self.endpoints.api.clone();
        url.set_path(path);
        url
    }

    /// Returns a valid access token, fetching one when none is cached or the
    /// cached one is about to expire.
    pub async fn token(&self, credentials: &Credentials) -> Result<SecretString, Error> {
        let mut tokens = self.tokens.lock().await;
        if let Some(cached) = tokens.get(credentials)
            && Instant::now() < cached.renew_at
        {
            return Ok(cached.value.clone());
        }
        self.pace(&credentials.client_id).await;
        let response = self
            .http
            .post(self.api_url("/oauth/token"))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", credentials.client_id.as_str()),
                ("client_secret", credentials.client_secret.expose()),
            ])
            .send()
            .await
            .map_err(Error::Transport)?;
        let status = response.status();
        let retry_after = crate::http::retry_after(response.headers());
        let body = response.text().await.map_err(Error::Transport)?;
        if status == StatusCode::UNAUTHORIZED
            || (status == StatusCode::BAD_REQUEST && body.contains("invalid_client"))
        {
            return Err(Error::InvalidClient {
                status: status.as_u16(),
                message: crate::http::error_message(&body, &["error", "error_description"]),
            });
        }
        if !status.is_success() {
            return Err(classify(status, &body, retry_after, 0));
        }
        let token: TokenResponse = serde_json::from_str(&body)
            .map_err(|e| Error::Decode(format!("token response: {e}")))?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600));
        let cached = CachedToken {
            value: SecretString::new(token.access_token),
            renew_at: Instant::now() + lifetime.saturating_sub(TOKEN_RENEWAL_MARGIN),
        };
        tokens.insert(credentials.clone(), cached.clone());
        Ok(cached.value)
    }

    async fn pace(&self, client_id: &str) {
        let waited = self.automation.acquire(client_id).await;
        if waited > Duration::from_millis(1) {
            tracing::debug!(
                waited_ms = waited.as_millis() as u64,
                "Waited for the Kameleoon Automation API rate limit"
            );
        }
    }

    /// Drops the cached token of the credentials.
    pub async fn forget_token(&self, credentials: &Credentials) {
        self.tokens.lock().await.remove(credentials);
    }

    /// Sends an authenticated request; on 401 renews the token and sends it
    /// once more. Automation API requests are paced below its limits first.
    /// Returns the body of a successful answer.
    async fn send(
        &self,
        credentials: &Credentials,
        build: impl Fn() -> RequestBuilder,
        body_len: usize,
        automation: bool,
    ) -> Result<String, Error> {
        for attempt in 0..2 {
            let token = self.token(credentials).await?;
            if automation {
                self.pace(&credentials.client_id).await;
            }
            let response = build()
                .bearer_auth(token.expose())
                .send()
                .await
                .map_err(Error::Transport)?;
            let status = response.status();
            let retry_after = crate::http::retry_after(response.headers());
            let body = response.text().await.map_err(Error::Transport)?;
            if status.is_success() {
                return Ok(body);
            }
            if status == StatusCode::UNAUTHORIZED {
                self.forget_token(credentials).await;
                if attempt == 0 {
                    continue;
                }
                return Err(Error::Unauthorized {
                    message: crate::http::error_message(
                        &body,
                        &["error", "error_description", "message"],
                    ),
                });
            }
            return Err(classify(status, &body, retry_after, body_len));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Finds the site with a code among the sites the credentials may see.
    pub async fn find_site(
        &self,
        credentials: &Credentials,
        code: &str,
    ) -> Result<Option<Site>, Error> {
        let filter =
            serde_json::json!([{"field": "code", "operator": "EQUAL", "parameters": [code]}]);
        let url = self.api_url("/sites");
        let filter = filter.to_string();
        let body = self
            .send(
                credentials,
                || self.http.get(url.clone()).query(&[("filter", &filter)]),
                0,
                true,
            )
            .await?;
        let sites: Vec<Site> =
            serde_json::from_str(&body).map_err(|e| Error::Decode(format!("site list: {e}")))?;
        Ok(sites.into_iter().find(|s| s.code == code))
    }

    /// Lists the custom data of a site.
    pub async fn list_custom_data(
        &self,
        credentials: &Credentials,
        site_id: i64,
    ) -> Result<Vec<CustomData>, Error> {
        let filter =
            serde_json::json!([{"field": "siteId", "operator": "EQUAL", "parameters": [site_id]}])
                .to_string();
        let url = self.api_url("/custom-datas");
        let mut all = Vec::new();
        // The list is paged; a page shorter than the page size is the last.
        const PER_PAGE: usize = 100;
        for page in 1.. {
            let page_text = page.to_string();
            let per_page = PER_PAGE.to_string();
            let body = self
                .send(
                    credentials,
                    || {
                        self.http.get(url.clone()).query(&[
                            ("filter", filter.as_str()),
                            ("page", page_text.as_str()),
                            ("perPage", per_page.as_str()),
                        ])
                    },
                    0,
                    true,
                )
                .await?;
            let items: Vec<CustomData> = serde_json::from_str(&body)
                .map_err(|e| Error::Decode(format!("custom data list: {e}")))?;
            let done = items.len() < PER_PAGE;
            all.extend(items);
            if done {
                break;
            }
        }
        Ok(all)
    }

    /// Creates a custom data.
    pub async fn create_custom_data(
        &self,
        credentials: &Credentials,
        definition: &NewCustomData<'_>,
    ) -> Result<CustomData, Error> {
        let url = self.api_url("/custom-datas");
        let body = self
            .send(
                credentials,
                || self.http.post(url.clone()).json(definition),
                0,
                true,
            )
            .await?;
        serde_json::from_str(&body).map_err(|e| Error::Decode(format!("created custom data: {e}")))
    }

    /// Sends one Data API body of events for a site.
    pub async fn send_events(
        &self,
        credentials: &Credentials,
        site_code: &str,
        body: &bytes::Bytes,
    ) -> Result<(), Error> {
        let mut url = self.endpoints.data.clone();
        url.set_path("/visit/events");
        url.query_pairs_mut().append_pair("siteCode", site_code);
        self.send(
            credentials,
            || {
                self.http
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "text/plain")
                    .body(body.clone())
            },
            body.len(),
            false,
        )
        .await
        .map(|_| ())
    }
}

fn classify(
    status: StatusCode,
    body: &str,
    retry_after: Option<Duration>,
    body_len: usize,
) -> Error {
    let message = crate::http::error_message(body, &["error", "error_description", "message"]);
    match status {
        StatusCode::FORBIDDEN => Error::Forbidden { message },
        StatusCode::PAYLOAD_TOO_LARGE => Error::PayloadTooLarge { bytes: body_len },
        StatusCode::TOO_MANY_REQUESTS => Error::RateLimited {
            retry_after,
            message,
        },
        s if s.is_server_error() => Error::Server {
            status: s.as_u16(),
            message,
        },
        s => Error::Rejected {
            status: s.as_u16(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_decodes_id_and_secret() {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(r#"{"id":"client-1","secret":"s1"}"#);
        let credentials = Credentials::from_api_key(&encoded).unwrap();
        assert_eq!(credentials.client_id, "client-1");
        assert_eq!(credentials.client_secret.expose(), "s1");
    }

    #[test]
    fn api_key_errors_never_echo_the_key() {
        for bad in ["not base64 !!", "e30=", "eyJpZCI6IiIsInNlY3JldCI6IiJ9"] {
            let error = Credentials::from_api_key(bad).unwrap_err();
            assert!(!error.contains(bad), "{error}");
        }
    }

    #[test]
    fn statuses_map_to_errors() {
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "", None, 0),
            Error::Forbidden { .. }
        ));
        assert!(matches!(
            classify(StatusCode::PAYLOAD_TOO_LARGE, "", None, 10),
            Error::PayloadTooLarge { bytes: 10 }
        ));
        let limited = classify(
            StatusCode::TOO_MANY_REQUESTS,
            "slow down",
            Some(Duration::from_secs(2)),
            0,
        );
        assert_eq!(limited.retry_after(), Some(Duration::from_secs(2)));
        assert!(classify(StatusCode::SERVICE_UNAVAILABLE, "", None, 0).is_transient());
        assert!(!classify(StatusCode::BAD_REQUEST, "", None, 0).is_transient());
    }
}
