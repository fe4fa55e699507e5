//! The seed file: accounts, projects, cohorts and profiles for the Mixpanel
//! stand-in; clients, sites and custom data for the Kameleoon stand-in.
//!
//! The file is YAML or JSON (JSON is read as YAML); the format is described
//! with an example in the crate README.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::StandinError;

/// Everything both stand-ins start with.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Seed {
    pub mixpanel: MixpanelSeed,
    pub kameleoon: KameleoonSeed,
}

impl Seed {
    /// Reads a seed from a YAML or JSON file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, StandinError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| StandinError::SeedRead {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            StandinError::InvalidSeed(message) => {
                StandinError::InvalidSeed(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses a seed from YAML or JSON text.
    pub fn parse(text: &str) -> Result<Self, StandinError> {
        serde_yaml::from_str(text).map_err(|error| StandinError::InvalidSeed(error.to_string()))
    }
}

/// A Mixpanel `$distinct_id`: usually a string, a JSON number when the seed
/// gives a number.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DistinctId {
    Number(i64),
    Text(String),
}

impl DistinctId {
    /// Returns the id as text (a number in decimal).
    pub fn to_text(&self) -> String {
        match self {
            DistinctId::Number(number) => number.to_string(),
            DistinctId::Text(text) => text.clone(),
        }
    }
}

impl From<&str> for DistinctId {
    fn from(text: &str) -> Self {
        DistinctId::Text(text.to_string())
    }
}

impl From<String> for DistinctId {
    fn from(text: String) -> Self {
        DistinctId::Text(text)
    }
}

impl From<i64> for DistinctId {
    fn from(number: i64) -> Self {
        DistinctId::Number(number)
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixpanelSeed {
    pub service_accounts: Vec<ServiceAccountSeed>,
    pub projects: Vec<ProjectSeed>,
}

/// A service account: HTTP Basic `username:secret`, allowed on `projects`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountSeed {
    pub username: String,
    pub secret: String,
    #[serde(default)]
    pub projects: Vec<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSeed {
    pub id: u64,
    /// False for a plan without Query API access (every query gets 402).
    #[serde(default = "default_true")]
    pub api_access: bool,
    /// Profiles of the project; a profile with no property does not exist.
    #[serde(default)]
    pub profiles: Vec<ProfileSeed>,
    #[serde(default)]
    pub cohorts: Vec<CohortSeed>,
}

/// A user profile: a distinct id and its properties.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileSeed {
    pub distinct_id: DistinctId,
    #[serde(default)]
    pub properties: Map<String, Value>,
}

impl ProfileSeed {
    pub fn new(distinct_id: impl Into<DistinctId>, properties: Value) -> Self {
        let properties = match properties {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        Self {
            distinct_id: distinct_id.into(),
            properties,
        }
    }
}

/// A cohort member: a bare distinct id (its profile, if any, comes from the
/// project's profiles), or a profile given in place.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MemberSeed {
    Id(DistinctId),
    Profile(ProfileSeed),
}

impl MemberSeed {
    pub fn distinct_id(&self) -> &DistinctId {
        match self {
            MemberSeed::Id(id) => id,
            MemberSeed::Profile(profile) => &profile.distinct_id,
        }
    }
}

impl From<&str> for MemberSeed {
    fn from(text: &str) -> Self {
        MemberSeed::Id(text.into())
    }
}

impl From<ProfileSeed> for MemberSeed {
    fn from(profile: ProfileSeed) -> Self {
        MemberSeed::Profile(profile)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortSeed {
    /// Cohort id; may be omitted where the control API takes it from the path.
    #[serde(default)]
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `YYYY-MM-DD HH:MM:SS`; defaults to the time the stand-in loaded the cohort.
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default = "default_true")]
    pub is_visible: bool,
    /// Explicit members; exclusive with `generate`.
    #[serde(default)]
    pub members: Vec<MemberSeed>,
    /// Generated members for large cohorts; exclusive with `members`.
    #[serde(default)]
    pub generate: Option<GeneratorSeed>,
    /// Starts the cohort deleted or unavailable.
    #[serde(default)]
    pub availability: Option<Availability>,
}

/// Whether queries on a cohort succeed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Availability {
    #[default]
    Available,
    /// Gone from `cohorts/list`, and Engage returns 400 `cohort N not found`.
    Deleted,
    /// Still listed, but Engage returns `status` with `{"error": error}`, as
    /// Mixpanel does for a cohort tied to a deleted data group (404 "Missing Datagroup").
    Unavailable {
        #[serde(default = "default_unavailable_status")]
        status: u16,
        #[serde(default = "default_unavailable_error")]
        error: String,
    },
}

fn default_unavailable_status() -> u16 {
    404
}

fn default_unavailable_error() -> String {
    "Missing Datagroup for the cohort".to_string()
}

/// Deterministic generator for large cohorts. Percentages are 0 to 100 and
/// are drawn independently per member from a hash of `seed` and the member's
/// position, so the same seed always yields the same members.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorSeed {
    pub count: u64,
    #[serde(default = "default_generator_seed")]
    pub seed: u64,
    /// Prefix of generated ids: `u-0000001`, `u-0000002`, ...
    #[serde(default = "default_id_prefix")]
    pub id_prefix: String,
    /// Members without a profile; their ids look like `$device:<16 hex>`.
    #[serde(default)]
    pub percent_anonymous: f64,
    /// Members whose profile carries `$kameleoon_mapping_id`.
    #[serde(default)]
    pub percent_mapping_id: f64,
    /// Members whose id is padded to `long_id_length` characters.
    #[serde(default)]
    pub percent_long_ids: f64,
    #[serde(default = "default_long_id_length")]
    pub long_id_length: usize,
    /// Members whose id contains non-ASCII characters.
    #[serde(default)]
    pub percent_non_ascii: f64,
    /// Members whose `$distinct_id` is a JSON number.
    #[serde(default)]
    pub percent_numeric_ids: f64,
}

impl GeneratorSeed {
    /// Creates a generator of `count` identified members with plain ids.
    pub fn new(count: u64) -> Self {
        Self {
            count,
            seed: default_generator_seed(),
            id_prefix: default_id_prefix(),
            percent_anonymous: 0.0,
            percent_mapping_id: 0.0,
            percent_long_ids: 0.0,
            long_id_length: default_long_id_length(),
            percent_non_ascii: 0.0,
            percent_numeric_ids: 0.0,
        }
    }
}

fn default_generator_seed() -> u64 {
    1
}

fn default_id_prefix() -> String {
    "u-".to_string()
}

fn default_long_id_length() -> usize {
    150
}

fn default_true() -> bool {
    true
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KameleoonSeed {
    pub clients: Vec<ClientSeed>,
    pub sites: Vec<SiteSeed>,
}

/// An OAuth client (Kameleoon API credentials) and the site codes it may see.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSeed {
    pub client_id: String,
    pub client_secret: String,
    #[serde(default)]
    pub sites: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSeed {
    pub id: u64,
    pub code: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub custom_datas: Vec<CustomDataSeed>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomDataSeed {
    /// Defaults to the next free id.
    #[serde(default)]
    pub id: Option<u64>,
    /// Defaults to the next free index on the site.
    #[serde(default)]
    pub index: Option<u32>,
    pub name: String,
    #[serde(default = "default_format")]
    pub format: String,
    #[serde(default = "default_type", rename = "type")]
    pub data_type: String,
    #[serde(default = "default_method")]
    pub method: String,
    #[serde(default = "default_scope")]
    pub scope: String,
    /// The project's cross-device mapping identifier (at most one per site).
    #[serde(default, alias = "isMappingIdentifier")]
    pub is_mapping_identifier: bool,
}

fn default_format() -> String {
    "STRING".to_string()
}

fn default_type() -> String {
    "UNIQUE".to_string()
}

fn default_method() -> String {
    "CLIENT".to_string()
}

fn default_scope() -> String {
    "VISITOR".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_members_of_every_form() {
        let seed = Seed::parse(
            r#"
mixpanel:
  projects:
    - id: 1
      cohorts:
        - id: 5
          name: five
          members:
            - u-1
            - 42
            - "43"
            - {distinct_id: u-2, properties: {$email: a@example.test}}
"#,
        )
        .expect("seed parses");
        let members = &seed.mixpanel.projects[0].cohorts[0].members;
        assert_eq!(members[0].distinct_id(), &DistinctId::Text("u-1".into()));
        assert_eq!(members[1].distinct_id(), &DistinctId::Number(42));
        assert_eq!(members[2].distinct_id(), &DistinctId::Text("43".into()));
        assert!(matches!(&members[3], MemberSeed::Profile(p) if p.properties.len() == 1));
    }

    #[test]
    fn rejects_unknown_fields() {
        let error = Seed::parse("mixpanel: {projectz: []}").expect_err("unknown field");
        assert!(error.to_string().contains("projectz"), "{error}");
    }

    #[test]
    fn parses_json_too() {
        let seed = Seed::parse(r#"{"kameleoon": {"sites": [{"id": 1, "code": "abc123xyz0"}]}}"#)
            .expect("json parses");
        assert_eq!(seed.kameleoon.sites[0].code, "abc123xyz0");
    }
}
