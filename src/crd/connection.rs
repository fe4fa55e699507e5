use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired link: the Kameleoon project, the Mixpanel project and the Secrets with
/// their credentials.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cohortsync.io",
    version = "v1alpha1",
    kind = "KameleoonConnection",
    namespaced,
    status = "KameleoonConnectionStatus",
    shortname = "kconn",
    category = "cohortsync",
    doc = "Links a Mixpanel project to a Kameleoon project. The operator validates both sets of \
           credentials and reports the Connected condition; CohortSyncs in the same namespace \
           export cohorts through it.",
    printcolumn(
        name = "Site",
        type_ = "string",
        json_path = ".spec.kameleoon.siteCode"
    ),
    printcolumn(
        name = "Project",
        type_ = "integer",
        json_path = ".spec.mixpanel.projectId"
    ),
    printcolumn(
        name = "Connected",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Connected\")].status"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        priority = 1,
        json_path = ".status.conditions[?(@.type==\"Ready\")].message"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KameleoonConnectionSpec {
    /// The Kameleoon project that receives the cohorts.
    pub kameleoon: KameleoonEndpoint,
    /// The Mixpanel project the cohorts are read from.
    pub mixpanel: MixpanelEndpoint,
}

const SITE_CODE_MESSAGE: &str = "'siteCode must be the 10 lower-case letters or digits of a Kameleoon \
     site code (Kameleoon > Projects), got \"' + self + '\"'";

/// Kameleoon side of a connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct KameleoonEndpoint {
    /// Site code of the Kameleoon project: ten lower-case letters or digits, as shown in
    /// Kameleoon under Projects (for example a1b2c3d4e5).
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z0-9]{10}$')").message(
        kube::core::Message::Expression(SITE_CODE_MESSAGE.into())
    ))]
    #[schemars(length(max = 64))]
    pub site_code: String,
    /// Secret in the same namespace holding the Kameleoon API credentials: either
    /// `clientId` and `clientSecret`, or a single `apiKey` (base64 of a JSON object with
    /// `id` and `secret`, the form Kameleoon gives to integration partners).
    pub credentials_secret_ref: KameleoonCredentialsRef,
    /// How Kameleoon identifies the exported users: `VisitorCode` (the visitor code the
    /// site sets, the default) or `MappingIdentifier` (the project's cross-device mapping
    /// identifier custom data).
    #[serde(default)]
    pub match_by: MatchBy,
}

/// Identifier kind that every line sent to Kameleoon carries.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum MatchBy {
    /// Users are matched on the Kameleoon visitor code.
    #[default]
    VisitorCode,
    /// Users are matched on the project's cross-device mapping identifier.
    MappingIdentifier,
}

/// Secret with Kameleoon credentials, and the key names inside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KameleoonCredentialsRef {
    /// Name of the Secret, in the namespace of the connection.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the OAuth client id. Default: clientId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id_key: Option<String>,
    /// Key holding the OAuth client secret. Default: clientSecret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_key: Option<String>,
    /// Key holding a Kameleoon API key, used when the client id key is absent.
    /// Default: apiKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_key: Option<String>,
}

/// Mixpanel side of a connection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MixpanelEndpoint {
    /// Numeric id of the Mixpanel project (Project Settings > Overview).
    #[schemars(range(min = 1))]
    pub project_id: i64,
    /// Data residency region of the project: US (default), EU or IN. It selects the
    /// Mixpanel host; hosts cannot be set from a resource.
    #[serde(default)]
    pub region: Region,
    /// Secret in the same namespace holding a Mixpanel service account.
    pub credentials_secret_ref: MixpanelCredentialsRef,
    /// Query API allowance of the project per hour. Every connection and sync that uses
    /// the project shares it, and the operator never sends more. Default: 60, Mixpanel's
    /// documented limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub queries_per_hour: Option<i32>,
    /// Queries the operator runs at the same time against the project. Default: 5,
    /// Mixpanel's documented limit of concurrent queries per project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub max_concurrent_queries: Option<i32>,
}

/// Mixpanel data residency region.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Region {
    /// United States: mixpanel.com.
    #[default]
    US,
    /// European Union: eu.mixpanel.com.
    EU,
    /// India: in.mixpanel.com.
    IN,
}

/// Secret with a Mixpanel service account, and the key names inside it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MixpanelCredentialsRef {
    /// Name of the Secret, in the namespace of the connection.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key holding the service account user name. Default: username.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_key: Option<String>,
    /// Key holding the service account secret. Default: secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
}

/// Observed state of a KameleoonConnection.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KameleoonConnectionStatus {
    /// Generation of the spec that the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Connected tells whether both services accepted the credentials; Ready, Reconciling
    /// and Stalled follow it in the kstatus convention.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Kameleoon site found for the site code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<SiteStatus>,
}

/// Kameleoon site a connection resolved.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// Numeric site id in Kameleoon.
    pub id: i64,
    /// Site name in Kameleoon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl KameleoonCredentialsRef {
    /// Key of the OAuth client id, with its default applied.
    pub fn client_id_key(&self) -> &str {
        self.client_id_key.as_deref().unwrap_or("clientId")
    }
    /// Key of the OAuth client secret, with its default applied.
    pub fn client_secret_key(&self) -> &str {
        self.client_secret_key.as_deref().unwrap_or("clientSecret")
    }
    /// Key of the API key, with its default applied.
    pub fn api_key_key(&self) -> &str {
        self.api_key_key.as_deref().unwrap_or("apiKey")
    }
}

impl MixpanelCredentialsRef {
    /// Key of the service account user name, with its default applied.
    pub fn username_key(&self) -> &str {
        self.username_key.as_deref().unwrap_or("username")
    }
    /// Key of the service account secret, with its default applied.
    pub fn secret_key(&self) -> &str {
        self.secret_key.as_deref().unwrap_or("secret")
    }
}

impl MixpanelEndpoint {
    /// Documented Mixpanel Query API allowance per project and hour.
    pub const DEFAULT_QUERIES_PER_HOUR: u32 = 60;
    /// Documented Mixpanel limit of concurrent queries per project.
    pub const DEFAULT_CONCURRENT_QUERIES: u32 = 5;

    /// Query allowance per hour, with its default applied.
    pub fn queries_per_hour(&self) -> u32 {
        self.queries_per_hour
            .and_then(|q| u32::try_from(q).ok())
            .unwrap_or(Self::DEFAULT_QUERIES_PER_HOUR)
    }
    /// Concurrent query limit, with its default applied.
    pub fn max_concurrent_queries(&self) -> u32 {
        self.max_concurrent_queries
            .and_then(|q| u32::try_from(q).ok())
            .unwrap_or(Self::DEFAULT_CONCURRENT_QUERIES)
    }
}
