//! Seeds and HTTP helpers shared by the stand-in tests.
#![allow(dead_code)]

use serde_json::{Value, json};
use standins::seed::{
    ClientSeed, CohortSeed, CustomDataSeed, KameleoonSeed, MemberSeed, MixpanelSeed, ProfileSeed,
    ProjectSeed, ServiceAccountSeed, SiteSeed,
};

pub const PROJECT: u64 = 1111;
pub const OTHER_PROJECT: u64 = 2222;
pub const FREE_PROJECT: u64 = 3333;
pub const USERNAME: &str = "growth-sync.mp-service-account";
pub const SECRET: &str = "mp-secret-1";

pub const SITE: &str = "abc123xyz0";
pub const SITE_ID: u64 = 31337;
pub const OTHER_SITE: &str = "zzz999yyy8";
pub const CLIENT_ID: &str = "growth-operator";
pub const CLIENT_SECRET: &str = "km-secret-1";
/// Index of the Boolean custom data seeded on `SITE`.
pub const COHORT_INDEX: u32 = 1;
/// Index of the mapping-identifier custom data seeded on `SITE`.
pub const MAPPING_INDEX: u32 = 0;
pub const USER_AGENT: &str = "kameleoon-cohort-operator-tests/1.0";

/// Returns a member with a profile (an `$email` property).
pub fn identified(id: &str) -> MemberSeed {
    MemberSeed::Profile(ProfileSeed::new(
        id,
        json!({"$email": format!("{id}@example.test")}),
    ))
}

/// Returns a member without a profile.
pub fn anonymous(id: &str) -> MemberSeed {
    MemberSeed::Id(id.into())
}

pub fn cohort(id: u64, name: &str, members: Vec<MemberSeed>) -> CohortSeed {
    CohortSeed {
        id,
        name: name.to_string(),
        description: String::new(),
        created: Some("2024-01-02 03:04:05".to_string()),
        is_visible: true,
        members,
        generate: None,
        availability: None,
    }
}

/// Members `u-0001`, `u-0002`, ... all identified.
pub fn numbered(count: usize) -> Vec<MemberSeed> {
    (1..=count)
        .map(|n| identified(&format!("u-{n:04}")))
        .collect()
}

/// Project 1111 with the given cohorts, project 2222 the account may not use,
/// and project 3333 on a plan without API access.
pub fn mixpanel_seed(cohorts: Vec<CohortSeed>) -> MixpanelSeed {
    MixpanelSeed {
        service_accounts: vec![ServiceAccountSeed {
            username: USERNAME.to_string(),
            secret: SECRET.to_string(),
            projects: vec![PROJECT, FREE_PROJECT],
        }],
        projects: vec![
            ProjectSeed {
                id: PROJECT,
                api_access: true,
                profiles: Vec::new(),
                cohorts,
            },
            ProjectSeed {
                id: OTHER_PROJECT,
                api_access: true,
                profiles: Vec::new(),
                cohorts: Vec::new(),
            },
            ProjectSeed {
                id: FREE_PROJECT,
                api_access: false,
                profiles: Vec::new(),
                cohorts: Vec::new(),
            },
        ],
    }
}

pub fn custom_data(name: &str, index: u32, format: &str, mapping: bool) -> CustomDataSeed {
    CustomDataSeed {
        id: None,
        index: Some(index),
        name: name.to_string(),
        format: format.to_string(),
        data_type: "UNIQUE".to_string(),
        method: "CLIENT".to_string(),
        scope: "VISITOR".to_string(),
        is_mapping_identifier: mapping,
    }
}

/// Returns site `SITE` with a mapping identifier (index 0) and a Boolean custom
/// data (index 1). Site `OTHER_SITE` has no custom data and is visible only to `other-client`.
pub fn kameleoon_seed() -> KameleoonSeed {
    KameleoonSeed {
        clients: vec![
            ClientSeed {
                client_id: CLIENT_ID.to_string(),
                client_secret: CLIENT_SECRET.to_string(),
                sites: vec![SITE.to_string()],
            },
            ClientSeed {
                client_id: "other-client".to_string(),
                client_secret: "other-secret".to_string(),
                sites: vec![OTHER_SITE.to_string()],
            },
        ],
        sites: vec![
            SiteSeed {
                id: SITE_ID,
                code: SITE.to_string(),
                name: Some("Shop".to_string()),
                url: None,
                custom_datas: vec![
                    custom_data("CRM user id", MAPPING_INDEX, "STRING", true),
                    custom_data("Song Sharers", COHORT_INDEX, "BOOLEAN", false),
                ],
            },
            SiteSeed {
                id: 4242,
                code: OTHER_SITE.to_string(),
                name: None,
                url: None,
                custom_datas: Vec::new(),
            },
        ],
    }
}

/// Installs ring as the TLS crypto provider. In the workspace, reqwest is
/// built without a default one (the operator chooses ring), and building a
/// client panics without it, even for plain HTTP.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .build()
        .expect("HTTP client builds")
}

/// Posts an Engage query for project 1111 with the service account.
pub async fn engage(
    client: &reqwest::Client,
    base: &str,
    form: &[(&str, String)],
) -> reqwest::Response {
    client
        .post(format!("{base}/api/query/engage?project_id={PROJECT}"))
        .basic_auth(USERNAME, Some(SECRET))
        .form(form)
        .send()
        .await
        .expect("engage request is answered")
}

pub fn cohort_filter(id: u64) -> (&'static str, String) {
    ("filter_by_cohort", format!("{{\"id\":{id}}}"))
}

pub async fn json_of(response: reqwest::Response) -> Value {
    response.json::<Value>().await.expect("body is JSON")
}

/// Reads every page of a cohort and returns the results and the number of requests.
pub async fn read_all_pages(
    client: &reqwest::Client,
    base: &str,
    cohort_id: u64,
    extra: &[(&str, String)],
) -> (Vec<Value>, usize) {
    let mut results = Vec::new();
    let mut session_id: Option<String> = None;
    let mut page = 0u64;
    loop {
        let mut form = vec![cohort_filter(cohort_id), ("page", page.to_string())];
        form.extend(extra.iter().cloned());
        if let Some(session) = &session_id {
            form.push(("session_id", session.clone()));
        }
        let response = engage(client, base, &form).await;
        assert_eq!(response.status(), 200, "page {page}");
        let body = json_of(response).await;
        let page_results = body["results"].as_array().expect("results array").clone();
        let page_size = body["page_size"].as_u64().expect("page_size") as usize;
        session_id = Some(body["session_id"].as_str().expect("session_id").to_string());
        let fewer = page_results.len() < page_size;
        results.extend(page_results);
        page += 1;
        if fewer {
            return (results, page as usize);
        }
    }
}

/// Gets a Kameleoon access token for the seeded client.
pub async fn token(client: &reqwest::Client, base: &str) -> String {
    let response = client
        .post(format!("{base}/oauth/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .expect("token request is answered");
    assert_eq!(response.status(), 200);
    json_of(response).await["access_token"]
        .as_str()
        .expect("access_token")
        .to_string()
}

/// Builds a customData event line in the form the Kameleoon SDKs send.
pub fn event_line(
    index: u32,
    value: &str,
    nonce: u64,
    identifier_key: &str,
    identifier: &str,
) -> String {
    let values = serde_json::to_string(&json!({value: 1})).expect("JSON");
    let encoded: String = form_encode(&[
        ("eventType", "customData"),
        ("index", &index.to_string()),
        ("valuesCountMap", &values),
        ("overwrite", "true"),
        ("nonce", &format!("{nonce:016X}")),
        (identifier_key, identifier),
    ]);
    encoded
}

pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{}={}", encode_component(key), encode_component(value)))
        .collect::<Vec<_>>()
        .join("&")
}

fn encode_component(text: &str) -> String {
    let mut encoded = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(byte as char)
            }
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

pub async fn post_events(
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    site: &str,
    body: String,
) -> reqwest::Response {
    let mut request = client
        .post(format!("{base}/visit/events?siteCode={site}"))
        .body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("events request is answered")
}
