//! Stand-in for Kameleoon: the OAuth token endpoint and the Automation API
//! (sites, custom data), and the Data API (`/visit/events`, `/visit/visitor`),
//! all on one server. The real services live on two hosts; a client configured
//! with separate base URLs can point both at this server.

mod automation;
mod control;
mod data;
mod oauth;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

pub use state::{
    CUSTOM_DATA_FORMATS, CUSTOM_DATA_METHODS, CUSTOM_DATA_SCOPES, CUSTOM_DATA_TYPES, CustomData,
    CustomDataValues, IdentifierKind, KameleoonStats, KindSummary, RejectedLine, SiteView,
    ValuesSummary,
};

use crate::StandinError;
use crate::faults::{ActiveFault, Fault, FaultAction, RequestFacts};
use crate::limits;
use crate::record::{RecordSlot, RequestRecord, record_requests};
use crate::seed::{CustomDataSeed, KameleoonSeed};
use crate::server::{RunningServer, serve};
use crate::util::fault_response;
use state::{Shared, summarise};

/// Behaviour switches of the Kameleoon stand-in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KameleoonConfig {
    /// `expires_in` of issued access tokens, in seconds.
    pub token_lifetime_seconds: u64,
    /// Largest `POST /visit/events` body accepted; larger ones get 413.
    pub events_body_limit_bytes: usize,
    /// Enforce the Automation API limits per client.
    pub automation_rate_limits: bool,
    pub automation_requests_per_10_seconds: u32,
    pub automation_requests_per_hour: u32,
    /// `Retry-After` value, in seconds, on Automation API 429 responses.
    pub retry_after_seconds: Option<u64>,
    /// Whether the Data API requires a bearer token. A token that is sent is
    /// always checked.
    pub data_api_auth_required: bool,
    /// Reject `mappingValue` lines for sites without a mapping-identifier custom data.
    pub require_mapping_identifier: bool,
}

impl Default for KameleoonConfig {
    fn default() -> Self {
        Self {
            token_lifetime_seconds: limits::TOKEN_LIFETIME_SECONDS,
            events_body_limit_bytes: limits::DEFAULT_EVENTS_BODY_LIMIT_BYTES,
            automation_rate_limits: true,
            automation_requests_per_10_seconds: limits::AUTOMATION_REQUESTS_PER_10_SECONDS,
            automation_requests_per_hour: limits::AUTOMATION_REQUESTS_PER_HOUR,
            retry_after_seconds: None,
            data_api_auth_required: true,
            require_mapping_identifier: true,
        }
    }
}

/// A running Kameleoon stand-in; dropping it stops the server.
pub struct KameleoonStandin {
    shared: Arc<Shared>,
    server: RunningServer,
}

impl KameleoonStandin {
    /// Starts the stand-in on an ephemeral port of 127.0.0.1.
    pub async fn start(seed: KameleoonSeed, config: KameleoonConfig) -> Result<Self, StandinError> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), seed, config).await
    }

    /// Starts the stand-in on `addr`, which must be a loopback address.
    pub async fn start_on(
        addr: SocketAddr,
        seed: KameleoonSeed,
        config: KameleoonConfig,
    ) -> Result<Self, StandinError> {
        let shared = Shared::new(&seed, config)?;
        let server = serve(addr, router(shared.clone()), "kameleoon").await?;
        Ok(Self { shared, server })
    }

    /// Returns the base URL of both the Automation API and the Data API.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn config(&self) -> KameleoonConfig {
        self.shared.state.lock().config.clone()
    }

    pub fn set_config(&self, config: KameleoonConfig) {
        self.shared.state.lock().config = config;
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.recorder.since(0)
    }

    pub fn requests_since(&self, id: u64) -> Vec<RequestRecord> {
        self.shared.recorder.since(id)
    }

    pub fn clear_requests(&self) {
        self.shared.recorder.clear();
    }

    pub fn add_fault(&self, fault: Fault) -> u64 {
        self.shared.state.lock().faults.add(fault)
    }

    pub fn remove_fault(&self, id: u64) -> bool {
        self.shared.state.lock().faults.remove(id)
    }

    pub fn clear_faults(&self) {
        self.shared.state.lock().faults.clear();
    }

    pub fn faults(&self) -> Vec<ActiveFault> {
        self.shared.state.lock().faults.list()
    }

    pub fn stats(&self) -> KameleoonStats {
        self.shared.stats()
    }

    /// Returns the rejected event lines kept (the first
    /// [`limits::REJECTED_LINES_CAPACITY`]; `stats().lines_rejected` counts all).
    pub fn rejected_lines(&self) -> Vec<RejectedLine> {
        self.shared.state.lock().rejected.iter().cloned().collect()
    }

    pub fn clear_rejected_lines(&self) {
        self.shared.state.lock().rejected.clear();
    }

    /// Returns the custom data defined on a site, in creation order.
    pub fn custom_datas(&self, site_code: &str) -> Result<Vec<CustomData>, StandinError> {
        self.shared.custom_datas(site_code)
    }

    /// Returns the custom data of a site with the given name.
    pub fn custom_data_named(
        &self,
        site_code: &str,
        name: &str,
    ) -> Result<Option<CustomData>, StandinError> {
        Ok(self
            .shared
            .custom_datas(site_code)?
            .into_iter()
            .find(|data| data.name == name))
    }

    /// Defines a custom data on a site without going through the Automation API.
    pub fn create_custom_data(
        &self,
        site_code: &str,
        seed: CustomDataSeed,
    ) -> Result<CustomData, StandinError> {
        self.shared
            .state
            .lock()
            .create_custom_data(site_code, seed)
            .map_err(|error| StandinError::Invalid(error.to_string()))
    }

    /// Returns the current values of the custom data `index` on a site.
    pub fn state(&self, site_code: &str, index: u32) -> Result<CustomDataValues, StandinError> {
        self.shared.values(site_code, index)
    }

    /// Returns identifier and value-set counts of the custom data `index`,
    /// cheap enough for a million visitors.
    pub fn state_summary(
        &self,
        site_code: &str,
        index: u32,
    ) -> Result<ValuesSummary, StandinError> {
        self.shared.summary(site_code, index)
    }

    /// Returns the values one visitor carries for the custom data `index`.
    pub fn value_of(
        &self,
        site_code: &str,
        index: u32,
        kind: IdentifierKind,
        identifier: &str,
    ) -> Result<Option<Vec<String>>, StandinError> {
        let state = self.shared.state.lock();
        let site = state
            .sites
            .get(site_code)
            .ok_or_else(|| StandinError::NotFound(format!("site {site_code} not found")))?;
        Ok(site
            .values
            .get(&index)
            .and_then(|values| values.of_kind(kind).get(identifier))
            .map(|set| set.to_vec()))
    }

    /// Forgets all custom data values and nonces of a site.
    pub fn clear_values(&self, site_code: &str) -> Result<(), StandinError> {
        let mut state = self.shared.state.lock();
        let site = state
            .sites
            .get_mut(site_code)
            .ok_or_else(|| StandinError::NotFound(format!("site {site_code} not found")))?;
        site.clear_values();
        Ok(())
    }

    /// Changes a client's secret, as after a rotation in Kameleoon. With
    /// `revoke_tokens`, tokens issued with the old secret stop working.
    pub fn set_client_secret(
        &self,
        client_id: &str,
        secret: &str,
        revoke_tokens: bool,
    ) -> Result<(), StandinError> {
        self.shared
            .set_client_secret(client_id, secret, revoke_tokens)
    }

    /// Revokes every token, or those of one client; returns how many.
    pub fn revoke_tokens(&self, client_id: Option<&str>) -> usize {
        self.shared.change_tokens(client_id, TokenChange::Revoke)
    }

    /// Makes every token, or those of one client, expire now; returns how many.
    pub fn expire_tokens(&self, client_id: Option<&str>) -> usize {
        self.shared.change_tokens(client_id, TokenChange::Expire)
    }

    /// Forgets the Automation API requests counted for the rate limits.
    pub fn reset_limits(&self) {
        for client in self.shared.state.lock().clients.values_mut() {
            client.recent_requests.clear();
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum TokenChange {
    Revoke,
    Expire,
}

impl Shared {
    pub(crate) fn stats(&self) -> KameleoonStats {
        let mut stats = self.state.lock().stats.clone();
        stats.requests_discarded = self.recorder.discarded();
        stats
    }

    pub(crate) fn custom_datas(&self, site_code: &str) -> Result<Vec<CustomData>, StandinError> {
        let state = self.state.lock();
        state
            .sites
            .get(site_code)
            .map(|site| site.custom_datas.clone())
            .ok_or_else(|| StandinError::NotFound(format!("site {site_code} not found")))
    }

    pub(crate) fn values(
        &self,
        site_code: &str,
        index: u32,
    ) -> Result<CustomDataValues, StandinError> {
        let state = self.state.lock();
        let site = state
            .sites
            .get(site_code)
            .ok_or_else(|| StandinError::NotFound(format!("site {site_code} not found")))?;
        let mut result = CustomDataValues::default();
        if let Some(values) = site.values.get(&index) {
            for (target, source) in [
                (&mut result.visitor_codes, &values.visitor_codes),
                (&mut result.mapping_values, &values.mapping_values),
            ] {
                target.extend(
                    source
                        .iter()
                        .map(|(identifier, set)| (identifier.to_string(), set.to_vec())),
                );
            }
        }
        Ok(result)
    }

    pub(crate) fn summary(
        &self,
        site_code: &str,
        index: u32,
    ) -> Result<ValuesSummary, StandinError> {
        let state = self.state.lock();
        let site = state
            .sites
            .get(site_code)
            .ok_or_else(|| StandinError::NotFound(format!("site {site_code} not found")))?;
        Ok(match site.values.get(&index) {
            None => ValuesSummary::default(),
            Some(values) => ValuesSummary {
                visitor_codes: summarise(&values.visitor_codes),
                mapping_values: summarise(&values.mapping_values),
            },
        })
    }

    pub(crate) fn set_client_secret(
        &self,
        client_id: &str,
        secret: &str,
        revoke_tokens: bool,
    ) -> Result<(), StandinError> {
        {
            let mut state = self.state.lock();
            let client = state
                .clients
                .get_mut(client_id)
                .ok_or_else(|| StandinError::NotFound(format!("client {client_id} not found")))?;
            client.secret = secret.to_string();
        }
        if revoke_tokens {
            self.change_tokens(Some(client_id), TokenChange::Revoke);
        }
        Ok(())
    }

    pub(crate) fn change_tokens(&self, client_id: Option<&str>, change: TokenChange) -> usize {
        let mut state = self.state.lock();
        let now = Instant::now();
        let mut changed = 0;
        for token in state.tokens.values_mut() {
            if client_id.is_some_and(|wanted| wanted != token.client_id) {
                continue;
            }
            match change {
                TokenChange::Revoke => token.revoked = true,
                TokenChange::Expire => token.expires_at = now,
            }
            changed += 1;
        }
        changed
    }
}

/// Effect of a fault on a request that the fault does not respond to itself.
pub(crate) struct FaultOutcome {
    pub delay: Option<Duration>,
}

/// Applies the fault due for `facts`; returns the response when the fault replaces it.
pub(crate) fn apply_fault(
    shared: &Shared,
    facts: &RequestFacts,
    slot: &RecordSlot,
) -> Result<FaultOutcome, Response> {
    let mut state = shared.state.lock();
    let Some((fault_id, action)) = state.faults.take(facts) else {
        return Ok(FaultOutcome { delay: None });
    };
    slot.update(|d| d.fault_id = Some(fault_id));
    tracing::info!(
        fault_id,
        route = facts.route.as_str(),
        ?action,
        "kameleoon fault fired"
    );
    match action {
        FaultAction::Respond {
            status,
            body,
            retry_after,
        } => {
            state.stats.fault_responses += 1;
            Err(fault_response(status, body.as_ref(), retry_after))
        }
        FaultAction::DropConnection => {
            slot.update(|d| d.close_connection = true);
            Err(StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        FaultAction::Delay { ms } => Ok(FaultOutcome {
            delay: Some(Duration::from_millis(ms)),
        }),
        // Paging sessions exist only on Mixpanel.
        FaultAction::ExpireSession => Ok(FaultOutcome { delay: None }),
    }
}

async fn not_found(axum::extract::OriginalUri(uri): axum::extract::OriginalUri) -> Response {
    automation::api_error(StatusCode::NOT_FOUND, "no such endpoint", uri.path())
}

fn router(shared: Arc<Shared>) -> Router {
    let recorder = shared.recorder.clone();
    Router::new()
        .route("/oauth/token", post(oauth::token))
        .route("/sites", get(automation::list_sites))
        .route("/sites/byCode/{code}", get(automation::site_by_code))
        .route(
            "/custom-datas",
            get(automation::list_custom_datas).post(automation::create_custom_data),
        )
        .route("/custom-datas/{id}", get(automation::get_custom_data))
        .route("/visit/events", post(data::events))
        .route("/visit/visitor", get(data::visitor))
        .merge(control::routes())
        .fallback(not_found)
        .with_state(shared)
        .layer(axum::middleware::from_fn_with_state(
            recorder,
            record_requests,
        ))
}
