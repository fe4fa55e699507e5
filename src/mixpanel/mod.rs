//! Client for the parts of Mixpanel's Query API the operator uses: the cohort
//! list and the Engage (profiles) query filtered by cohort.
//!
//! Every call is HTTPS with HTTP Basic authentication of a service account
//! and `project_id` in the query string. The client knows nothing of query
//! budgets or retries: callers wrap it with [`crate::budget`] and
//! [`crate::retry`].

mod error;
mod page;
pub mod paging;

pub use error::Error;
pub use page::{EngagePage, PageBody, Profile, Properties, Scalar};

use std::time::Duration;

use reqwest::{Client, StatusCode, Url};
use serde::Deserialize;

use crate::crd::Region;
use crate::http::USER_AGENT;
use crate::identity::MAPPING_PROPERTY;
use crate::secret::SecretString;

/// Profiles per Engage page. Mixpanel answers pages of this size; a shorter
/// page is the last one.
pub const PAGE_SIZE: u64 = 1000;

/// Mixpanel service account credentials.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// Service account user name.
    pub username: String,
    /// Service account secret.
    pub secret: SecretString,
}

/// Where and as whom to query one project.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProjectAccess {
    /// Project id.
    pub project_id: i64,
    /// Data residency region, which selects the host.
    pub region: Region,
    /// Service account.
    pub credentials: Credentials,
}

/// A cohort in the project's cohort list.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Cohort {
    /// Cohort id.
    pub id: i64,
    /// Cohort name.
    pub name: String,
    /// Members, with or without a profile.
    #[serde(default)]
    pub count: Option<i64>,
}

/// Base URLs of the Query API per region, or one override for all of them.
#[derive(Clone, Debug)]
pub struct Endpoints {
    override_url: Option<Url>,
}

impl Endpoints {
    /// Mixpanel's hosts, chosen by region.
    pub fn production() -> Self {
        Self { override_url: None }
    }

    /// One base URL for every region, set by the cluster admin for tests.
    pub fn with_override(url: Url) -> Self {
        Self {
            override_url: Some(url),
        }
    }

    fn base(&self, region: Region) -> Url {
        if let Some(url) = &self.override_url {
            return url.clone();
        }
        let host = match region {
            Region::US => "https://mixpanel.com",
            Region::EU => "https://eu.mixpanel.com",
            Region::IN => "https://in.mixpanel.com",
        };
        Url::parse(host).expect("static Mixpanel host parses")
    }
}

/// Mixpanel Query API client.
#[derive(Clone, Debug)]
pub struct MixpanelClient {
    http: Client,
    endpoints: Endpoints,
}

impl MixpanelClient {
    /// Builds a client with request timeouts.
    pub fn new(endpoints: Endpoints, request_timeout: Duration) -> reqwest::Result<Self> {
        crate::http::install_crypto_provider();
        let http = Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(Duration::from_secs(10))
            .timeout(request_timeout)
            .build()?;
        Ok(Self { http, endpoints })
    }

    fn url(&self, access: &ProjectAccess, path: &str) -> Url {
        let mut url = self.endpoints.base(access.region);
        url.set_path(path);
        url.query_pairs_mut()
            .append_pair("project_id", &access.project_id.to_string());
        url
    }

    /// Lists the project's cohorts. Costs one query of the project's budget.
    pub async fn list_cohorts(&self, access: &ProjectAccess) -> Result<Vec<Cohort>, Error> {
        let url = self.url(access, "/api/query/cohorts/list");
        let response = self
            .http
            .post(url)
            .basic_auth(
                &access.credentials.username,
                Some(access.credentials.secret.expose()),
            )
            .send()
            .await
            .map_err(Error::Transport)?;
        let body = read_success(response, access, false).await?;
        serde_json::from_slice(&body).map_err(|e| Error::Decode(format!("cohort list: {e}")))
    }

    /// Reads one page of a cohort's profiles. Page 0 starts a query (and costs
    /// one query of the budget); later pages continue it through the session.
    pub async fn engage_page(
        &self,
        access: &ProjectAccess,
        cohort_id: i64,
        page: u64,
        session_id: Option<&str>,
    ) -> Result<PageBody, Error> {
        let url = self.url(access, "/api/query/engage");
        let filter = serde_json::json!({ "id": cohort_id }).to_string();
        let output = serde_json::json!([MAPPING_PROPERTY]).to_string();
        let page_text = page.to_string();
        let mut form: Vec<(&str, &str)> = vec![
            ("filter_by_cohort", &filter),
            ("include_all_users", "false"),
            ("output_properties", &output),
        ];
        if page > 0 {
            form.push(("page", &page_text));
            if let Some(session) = session_id {
                form.push(("session_id", session));
            }
        }
        let response = self
            .http
            .post(url)
            .basic_auth(
                &access.credentials.username,
                Some(access.credentials.secret.expose()),
            )
            .form(&form)
            .send()
            .await
            .map_err(Error::Transport)?;
        let body = read_success(response, access, page > 0).await?;
        Ok(PageBody::new(body, page))
    }
}

/// Returns the body of a successful response, or the typed error.
async fn read_success(
    response: reqwest::Response,
    access: &ProjectAccess,
    continuing_session: bool,
) -> Result<bytes::Bytes, Error> {
    let status = response.status();
    let retry_after = crate::http::retry_after(response.headers());
    // Successful bodies go to the JSON parser as bytes, without a text copy.
    let body = response.bytes().await.map_err(Error::Transport)?;
    if status.is_success() {
        return Ok(body);
    }
    Err(Error::from_response(
        status,
        &String::from_utf8_lossy(&body),
        retry_after,
        access.project_id,
        continuing_session,
    ))
}

impl Error {
    fn from_response(
        status: StatusCode,
        body: &str,
        retry_after: Option<Duration>,
        project_id: i64,
        continuing_session: bool,
    ) -> Self {
        let message = crate::http::error_message(body, &["error"]);
        let code = status.as_u16();
        match status {
            StatusCode::UNAUTHORIZED => Error::Unauthorized {
                status: code,
                message,
            },
            StatusCode::BAD_REQUEST if message.contains("Unable to authenticate request") => {
                Error::Unauthorized {
                    status: code,
                    message,
                }
            }
            StatusCode::FORBIDDEN => Error::Forbidden {
                project_id,
                message,
            },
            StatusCode::PAYMENT_REQUIRED => Error::PaymentRequired {
                project_id,
                message,
            },
            StatusCode::TOO_MANY_REQUESTS => Error::RateLimited {
                retry_after,
                message,
            },
            // A follow-up page fails with 400 when its session expired; the
            // reader then starts the query again from page 0.
            StatusCode::BAD_REQUEST if continuing_session => Error::SessionExpired { message },
            s if s.is_server_error() => Error::Server {
                status: code,
                message,
            },
            _ => Error::Rejected {
                status: code,
                message,
            },
        }
    }
}

#[cfg(test)]
mod tests;
