//! Kameleoon stand-in state: OAuth clients and tokens, sites with their custom
//! data, the custom data values visitors carry, and event bookkeeping.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::KameleoonConfig;
use crate::StandinError;
use crate::faults::FaultSet;
use crate::limits::{REJECTED_LINE_TEXT_CHARS, REJECTED_LINES_CAPACITY};
use crate::record::Recorder;
use crate::seed::{CustomDataSeed, KameleoonSeed};
use crate::util::{format_rfc3339, now_ms};

/// Custom data formats the Automation API accepts.
pub const CUSTOM_DATA_FORMATS: &[&str] = &["BOOLEAN", "NUMBER", "STRING"];
/// Custom data types: single value, list, counted list.
///
/// NOTE: GUESS. Only `UNIQUE` is seen in public client code; the other names
/// follow Kameleoon's "single / list / counted list" wording.
pub const CUSTOM_DATA_TYPES: &[&str] = &["UNIQUE", "LIST", "COUNT_LIST"];
/// Custom data acquisition methods.
///
/// NOTE: GUESS. Only `CLIENT` is seen in public client code.
pub const CUSTOM_DATA_METHODS: &[&str] = &[
    "CLIENT",
    "SDK",
    "GTM",
    "TEALIUM",
    "COMMANDERS_ACT",
    "CUSTOM_CODE",
];
/// Custom data scopes.
pub const CUSTOM_DATA_SCOPES: &[&str] = &["PAGE", "VISIT", "VISITOR"];
/// Active custom data allowed per project.
pub const MAX_CUSTOM_DATAS_PER_SITE: usize = 255;

/// How a Data API event names its visitor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentifierKind {
    /// `visitorCode=...`
    VisitorCode,
    /// `mappingValue=...`: the cross-device mapping identifier.
    MappingValue,
}

impl IdentifierKind {
    pub fn parameter(self) -> &'static str {
        match self {
            IdentifierKind::VisitorCode => "visitorCode",
            IdentifierKind::MappingValue => "mappingValue",
        }
    }
}

/// A custom data definition as the Automation API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomData {
    pub id: u64,
    pub index: u32,
    pub name: String,
    pub description: String,
    pub format: String,
    #[serde(rename = "type")]
    pub data_type: String,
    pub method: String,
    pub scope: String,
    pub site_id: u64,
    pub is_mapping_identifier: bool,
    pub creation_date: String,
}

/// A site (Kameleoon project) as the Automation API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SiteView {
    pub id: u64,
    pub code: String,
    pub name: String,
    pub url: String,
    pub description: String,
    pub date_created: String,
}

/// An event line the stand-in did not apply, and why.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RejectedLine {
    /// Id of the request in the request log.
    pub request_id: u64,
    pub site_code: String,
    /// 1-based line number in the request body.
    pub line_number: usize,
    pub reason: String,
    /// The line, cut to a few hundred characters.
    pub line: String,
    pub at_ms: u64,
}

/// Current values of one custom data on one site.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CustomDataValues {
    /// Values per visitor code.
    pub visitor_codes: BTreeMap<String, Vec<String>>,
    /// Values per mapping value.
    pub mapping_values: BTreeMap<String, Vec<String>>,
}

impl CustomDataValues {
    /// Returns the identifiers of `kind` whose value set is exactly `[value]`.
    pub fn with_value(&self, kind: IdentifierKind, value: &str) -> BTreeSet<String> {
        let map = match kind {
            IdentifierKind::VisitorCode => &self.visitor_codes,
            IdentifierKind::MappingValue => &self.mapping_values,
        };
        map.iter()
            .filter(|(_, values)| values.len() == 1 && values[0] == value)
            .map(|(identifier, _)| identifier.clone())
            .collect()
    }
}

/// Counts of one identifier kind: how many identifiers, and how many per value set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    pub identifiers: u64,
    /// Value sets joined by `,` (for a Boolean custom data: `true` or `false`).
    pub by_value: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ValuesSummary {
    pub visitor_codes: KindSummary,
    pub mapping_values: KindSummary,
}

/// Counters of the Kameleoon stand-in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KameleoonStats {
    pub tokens_issued: u64,
    pub token_requests_rejected: u64,
    /// 401 responses because of a missing, invalid, expired or revoked token.
    pub unauthorized: u64,
    pub automation_requests: u64,
    pub automation_rate_limited: u64,
    pub custom_datas_created: u64,
    pub events_requests: u64,
    /// Events requests that got 204.
    pub events_accepted: u64,
    pub events_body_too_large: u64,
    /// Requests that got 403 for their User-Agent or site access.
    pub forbidden: u64,
    pub bytes_received: u64,
    pub max_body_bytes: u64,
    pub lines_received: u64,
    pub lines_applied: u64,
    pub lines_rejected: u64,
    pub lines_duplicate: u64,
    pub fault_responses: u64,
    pub requests_discarded: u64,
}

pub(crate) struct Shared {
    pub state: Mutex<KameleoonState>,
    pub recorder: Arc<Recorder>,
}

pub(crate) struct KameleoonState {
    pub config: KameleoonConfig,
    pub clients: HashMap<String, Client>,
    pub tokens: HashMap<String, Token>,
    pub sites: BTreeMap<String, Site>,
    pub next_custom_data_id: u64,
    pub faults: FaultSet,
    pub stats: KameleoonStats,
    pub rejected: VecDeque<RejectedLine>,
}

pub(crate) struct Client {
    pub secret: String,
    pub sites: BTreeSet<String>,
    /// Arrival times of Automation API requests, for the 10-second and hourly limits.
    pub recent_requests: VecDeque<Instant>,
}

pub(crate) struct Token {
    pub client_id: String,
    pub expires_at: Instant,
    pub revoked: bool,
}

pub(crate) struct Site {
    pub id: u64,
    pub code: String,
    pub name: String,
    pub url: String,
    pub created_ms: u64,
    pub custom_datas: Vec<CustomData>,
    pub values: HashMap<u32, IndexValues>,
    pub nonces: HashSet<u64>,
    /// Distinct value sets, shared by every identifier that carries them.
    value_sets: HashSet<Arc<[String]>>,
}

#[derive(Default)]
pub(crate) struct IndexValues {
    pub visitor_codes: HashMap<Box<str>, Arc<[String]>>,
    pub mapping_values: HashMap<Box<str>, Arc<[String]>>,
}

impl IndexValues {
    pub(crate) fn of_kind(&self, kind: IdentifierKind) -> &HashMap<Box<str>, Arc<[String]>> {
        match kind {
            IdentifierKind::VisitorCode => &self.visitor_codes,
            IdentifierKind::MappingValue => &self.mapping_values,
        }
    }

    fn of_kind_mut(&mut self, kind: IdentifierKind) -> &mut HashMap<Box<str>, Arc<[String]>> {
        match kind {
            IdentifierKind::VisitorCode => &mut self.visitor_codes,
            IdentifierKind::MappingValue => &mut self.mapping_values,
        }
    }
}

impl Site {
    pub(crate) fn view(&self) -> SiteView {
        SiteView {
            id: self.id,
            code: self.code.clone(),
            name: self.name.clone(),
            url: self.url.clone(),
            description: String::new(),
            date_created: format_rfc3339(self.created_ms / 1000),
        }
    }

    pub(crate) fn has_mapping_identifier(&self) -> bool {
        self.custom_datas
            .iter()
            .any(|data| data.is_mapping_identifier)
    }

    /// Sets or extends the values of `identifier` for the custom data `index`.
    /// With `overwrite` the value set is replaced; an empty replacement removes
    /// the identifier. Without it the values are added to the current ones.
    pub(crate) fn apply(
        &mut self,
        index: u32,
        kind: IdentifierKind,
        identifier: &str,
        values: Vec<String>,
        overwrite: bool,
    ) {
        let map = self.values.entry(index).or_default().of_kind_mut(kind);
        let mut merged: Vec<String> = if overwrite {
            values
        } else {
            let mut current: Vec<String> = map
                .get(identifier)
                .map(|set| set.to_vec())
                .unwrap_or_default();
            current.extend(values);
            current
        };
        merged.sort();
        merged.dedup();
        if merged.is_empty() {
            map.remove(identifier);
            return;
        }
        let set = match self.value_sets.get(merged.as_slice()) {
            Some(existing) => existing.clone(),
            None => {
                let created: Arc<[String]> = Arc::from(merged);
                self.value_sets.insert(created.clone());
                created
            }
        };
        let map = self.values.entry(index).or_default().of_kind_mut(kind);
        match map.get_mut(identifier) {
            Some(slot) => *slot = set,
            None => {
                map.insert(identifier.into(), set);
            }
        }
    }

    pub(crate) fn clear_values(&mut self) {
        self.values.clear();
        self.nonces.clear();
        self.value_sets.clear();
    }
}

impl Shared {
    pub(crate) fn new(
        seed: &KameleoonSeed,
        config: KameleoonConfig,
    ) -> Result<Arc<Self>, StandinError> {
        let mut sites = BTreeMap::new();
        let mut next_custom_data_id = 1000;
        let created_ms = now_ms();
        for site_seed in &seed.sites {
            if site_seed.code.is_empty() {
                return Err(StandinError::InvalidSeed(format!(
                    "site {} has an empty code",
                    site_seed.id
                )));
            }
            let site = Site {
                id: site_seed.id,
                code: site_seed.code.clone(),
                name: site_seed
                    .name
                    .clone()
                    .unwrap_or_else(|| site_seed.code.clone()),
                url: site_seed
                    .url
                    .clone()
                    .unwrap_or_else(|| format!("https://{}.example.test", site_seed.code)),
                created_ms,
                custom_datas: Vec::new(),
                values: HashMap::new(),
                nonces: HashSet::new(),
                value_sets: HashSet::new(),
            };
            if sites.values().any(|existing: &Site| existing.id == site.id)
                || sites.contains_key(&site.code)
            {
                return Err(StandinError::InvalidSeed(format!(
                    "site {} ({}) is listed twice",
                    site.id, site.code
                )));
            }
            sites.insert(site.code.clone(), site);
            next_custom_data_id = next_custom_data_id.max(
                site_seed
                    .custom_datas
                    .iter()
                    .filter_map(|data| data.id)
                    .max()
                    .unwrap_or(0)
                    + 1,
            );
        }
        let mut state = KameleoonState {
            config,
            clients: HashMap::new(),
            tokens: HashMap::new(),
            sites,
            next_custom_data_id,
            faults: FaultSet::default(),
            stats: KameleoonStats::default(),
            rejected: VecDeque::new(),
        };
        for site_seed in &seed.sites {
            for data in &site_seed.custom_datas {
                state
                    .create_custom_data(&site_seed.code, data.clone())
                    .map_err(|error| {
                        StandinError::InvalidSeed(format!("site {}: {error}", site_seed.code))
                    })?;
            }
        }
        for client in &seed.clients {
            for code in &client.sites {
                if !state.sites.contains_key(code) {
                    return Err(StandinError::InvalidSeed(format!(
                        "client {} lists unknown site code {code}",
                        client.client_id
                    )));
                }
            }
            let previous = state.clients.insert(
                client.client_id.clone(),
                Client {
                    secret: client.client_secret.clone(),
                    sites: client.sites.iter().cloned().collect(),
                    recent_requests: VecDeque::new(),
                },
            );
            if previous.is_some() {
                return Err(StandinError::InvalidSeed(format!(
                    "client {} is listed twice",
                    client.client_id
                )));
            }
        }
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            recorder: Recorder::new(),
        }))
    }
}

/// Why a custom data could not be created.
pub(crate) enum CreateError {
    Invalid(String),
    Conflict(String),
}

impl std::fmt::Display for CreateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CreateError::Invalid(message) | CreateError::Conflict(message) => f.write_str(message),
        }
    }
}

fn check_enum(field: &str, value: &str, allowed: &[&str]) -> Result<(), CreateError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(CreateError::Invalid(format!(
            "{field} must be one of {}, got {value:?}",
            allowed.join(", ")
        )))
    }
}

impl KameleoonState {
    /// Creates a custom data on the site with the next free id and index
    /// (unless the seed gives them).
    pub(crate) fn create_custom_data(
        &mut self,
        site_code: &str,
        seed: CustomDataSeed,
    ) -> Result<CustomData, CreateError> {
        let name = seed.name.trim();
        if name.is_empty() {
            return Err(CreateError::Invalid("name must not be empty".into()));
        }
        if name.chars().count() > 255 {
            return Err(CreateError::Invalid(
                "name must be at most 255 characters".into(),
            ));
        }
        check_enum("format", &seed.format, CUSTOM_DATA_FORMATS)?;
        check_enum("type", &seed.data_type, CUSTOM_DATA_TYPES)?;
        check_enum("method", &seed.method, CUSTOM_DATA_METHODS)?;
        check_enum("scope", &seed.scope, CUSTOM_DATA_SCOPES)?;

        let next_id = self.next_custom_data_id;
        let site = self
            .sites
            .get_mut(site_code)
            .ok_or_else(|| CreateError::Invalid(format!("site {site_code} not found")))?;
        if site.custom_datas.iter().any(|data| data.name == name) {
            return Err(CreateError::Conflict(format!(
                "a custom data named {name:?} already exists on site {}",
                site.id
            )));
        }
        if site.custom_datas.len() >= MAX_CUSTOM_DATAS_PER_SITE {
            return Err(CreateError::Invalid(format!(
                "site {} already has the maximum of {MAX_CUSTOM_DATAS_PER_SITE} custom data",
                site.id
            )));
        }
        if seed.is_mapping_identifier && site.has_mapping_identifier() {
            return Err(CreateError::Invalid(format!(
                "site {} already has a mapping identifier custom data; only one is allowed",
                site.id
            )));
        }
        let index = match seed.index {
            Some(index) => {
                if site.custom_datas.iter().any(|data| data.index == index) {
                    return Err(CreateError::Conflict(format!(
                        "index {index} is already used on site {}",
                        site.id
                    )));
                }
                index
            }
            None => site
                .custom_datas
                .iter()
                .map(|data| data.index + 1)
                .max()
                .unwrap_or(0),
        };

        let id = seed.id.unwrap_or(next_id);
        let created = CustomData {
            id,
            index,
            name: name.to_string(),
            description: String::new(),
            format: seed.format,
            data_type: seed.data_type,
            method: seed.method,
            scope: seed.scope,
            site_id: site.id,
            is_mapping_identifier: seed.is_mapping_identifier,
            creation_date: format_rfc3339(now_ms() / 1000),
        };
        site.custom_datas.push(created.clone());
        self.next_custom_data_id = self.next_custom_data_id.max(id + 1);
        Ok(created)
    }

    pub(crate) fn site_by_id(&self, site_id: u64) -> Option<&Site> {
        self.sites.values().find(|site| site.id == site_id)
    }

    pub(crate) fn record_rejected(&mut self, line: RejectedLine) {
        self.stats.lines_rejected += 1;
        if self.rejected.len() < REJECTED_LINES_CAPACITY {
            self.rejected.push_back(line);
        }
    }

    /// Counts an Automation API request for `client_id`; returns the limit it
    /// exceeds, if any. Rejected requests are not counted.
    pub(crate) fn count_automation_request(&mut self, client_id: &str) -> Result<(), String> {
        let per_10_seconds = self.config.automation_requests_per_10_seconds as usize;
        let per_hour = self.config.automation_requests_per_hour as usize;
        let limits_on = self.config.automation_rate_limits;
        let Some(client) = self.clients.get_mut(client_id) else {
            return Ok(());
        };
        let now = Instant::now();
        while let Some(&oldest) = client.recent_requests.front() {
            if now.duration_since(oldest) >= Duration::from_secs(3600) {
                client.recent_requests.pop_front();
            } else {
                break;
            }
        }
        if limits_on {
            let ten_seconds_ago = now.checked_sub(Duration::from_secs(10));
            let in_10_seconds = client
                .recent_requests
                .iter()
                .rev()
                .take_while(|&&at| ten_seconds_ago.is_none_or(|limit| at > limit))
                .count();
            if in_10_seconds >= per_10_seconds {
                return Err(format!(
                    "rate limit exceeded: {per_10_seconds} requests per 10 seconds for client {client_id}"
                ));
            }
            if client.recent_requests.len() >= per_hour {
                return Err(format!(
                    "rate limit exceeded: {per_hour} requests per hour for client {client_id}"
                ));
            }
        }
        client.recent_requests.push_back(now);
        Ok(())
    }
}

/// Cuts a line for the rejected-lines log.
pub(crate) fn shorten_line(line: &str) -> String {
    match line.char_indices().nth(REJECTED_LINE_TEXT_CHARS) {
        Some((byte, _)) => format!("{}...", &line[..byte]),
        None => line.to_string(),
    }
}

/// Summarises values of one identifier kind.
pub(crate) fn summarise(map: &HashMap<Box<str>, Arc<[String]>>) -> KindSummary {
    let mut by_set: HashMap<*const [String], (Arc<[String]>, u64)> = HashMap::new();
    for set in map.values() {
        by_set
            .entry(Arc::as_ptr(set))
            .or_insert_with(|| (set.clone(), 0))
            .1 += 1;
    }
    KindSummary {
        identifiers: map.len() as u64,
        by_value: by_set
            .into_values()
            .map(|(set, count)| (set.join(","), count))
            .fold(BTreeMap::new(), |mut totals, (key, count)| {
                *totals.entry(key).or_insert(0) += count;
                totals
            }),
    }
}
