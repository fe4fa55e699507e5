//! Kameleoon stand-in driven over HTTP on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use standins::kameleoon::IdentifierKind;
use standins::{Fault, KameleoonConfig, KameleoonStandin, Route};

async fn start(config: KameleoonConfig) -> KameleoonStandin {
    KameleoonStandin::start(kameleoon_seed(), config)
        .await
        .expect("stand-in starts")
}

fn sites_filter(code: &str) -> String {
    json!([{"field": "code", "operator": "EQUAL", "parameters": [code]}]).to_string()
}

#[tokio::test]
async fn token_endpoint_shapes() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let url = format!("{}/oauth/token", km.url());

    let ok = client
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(ok.status(), 200);
    let body = json_of(ok).await;
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 7200);
    let token = body["access_token"].as_str().expect("token");
    assert_eq!(token.split('.').count(), 3, "shaped like a JWT");

    let bad = client
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", "wrong"),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(bad.status(), 401);
    assert_eq!(json_of(bad).await["error"], "invalid_client");

    let unknown = client
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "nobody"),
            ("client_secret", "x"),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(unknown.status(), 401);

    let grant = client
        .post(&url)
        .form(&[
            ("grant_type", "password"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(grant.status(), 400);
    assert_eq!(json_of(grant).await["error"], "unsupported_grant_type");

    let no_grant = client
        .post(&url)
        .form(&[("client_id", CLIENT_ID), ("client_secret", CLIENT_SECRET)])
        .send()
        .await
        .expect("answer");
    assert_eq!(no_grant.status(), 400);

    let basic = client
        .post(&url)
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("answer");
    assert_eq!(basic.status(), 200, "client_secret_basic is accepted");

    let stats = km.stats();
    assert_eq!(stats.tokens_issued, 2);
    assert_eq!(stats.token_requests_rejected, 4);
}

#[tokio::test]
async fn token_lifetime_is_configurable() {
    let km = start(KameleoonConfig {
        token_lifetime_seconds: 1,
        ..KameleoonConfig::default()
    })
    .await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let sites = format!("{}/sites", km.url());
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth(&token)
            .send()
            .await
            .expect("answer")
            .status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = client
        .get(&sites)
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(expired.status(), 401);
    assert!(expired.headers().contains_key("www-authenticate"));
    assert_eq!(json_of(expired).await["error"], "invalid_token");
}

#[tokio::test]
async fn sites_visible_to_client_only() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let get_sites = |filter: String| {
        client
            .get(format!("{}/sites", km.url()))
            .query(&[("filter", filter)])
            .bearer_auth(&token)
            .send()
    };

    let found = get_sites(sites_filter(SITE)).await.expect("answer");
    assert_eq!(found.status(), 200);
    assert_eq!(found.headers()["x-pagination-total-count"], "1");
    let body = json_of(found).await;
    assert_eq!(body[0]["id"], SITE_ID);
    assert_eq!(body[0]["code"], SITE);
    assert_eq!(body[0]["name"], "Shop");
    assert!(body[0]["url"].is_string());

    assert_eq!(
        json_of(get_sites(sites_filter("unknown000")).await.expect("answer")).await,
        json!([])
    );
    assert_eq!(
        json_of(get_sites(sites_filter(OTHER_SITE)).await.expect("answer")).await,
        json!([]),
        "a site of another account is not visible"
    );
    let invalid = get_sites("not json".into()).await.expect("answer");
    assert_eq!(invalid.status(), 400);

    let by_code = |code: &str| {
        client
            .get(format!("{}/sites/byCode/{code}", km.url()))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(by_code(SITE).await.expect("answer").status(), 200);
    assert_eq!(by_code(OTHER_SITE).await.expect("answer").status(), 403);
    assert_eq!(by_code("unknown000").await.expect("answer").status(), 404);

    let anonymous = client
        .get(format!("{}/sites", km.url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), 401);
}

#[tokio::test]
async fn custom_datas_list_and_create() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let url = format!("{}/custom-datas", km.url());
    let filter =
        json!([{"field": "siteId", "operator": "EQUAL", "parameters": [SITE_ID]}]).to_string();

    let listed = client
        .get(&url)
        .query(&[("filter", filter.as_str())])
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(listed.status(), 200);
    let body = json_of(listed).await;
    let names: Vec<_> = body
        .as_array()
        .expect("array")
        .iter()
        .map(|d| d["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("CRM user id"), json!("Song Sharers")]);
    assert_eq!(body[1]["index"], COHORT_INDEX);
    assert_eq!(body[1]["format"], "BOOLEAN");
    assert_eq!(body[1]["siteId"], SITE_ID);
    assert_eq!(body[0]["isMappingIdentifier"], true);

    let create = |body: serde_json::Value| client.post(&url).bearer_auth(&token).json(&body).send();
    let created = create(json!({
        "name": "VIP", "siteId": SITE_ID, "format": "BOOLEAN", "type": "UNIQUE", "method": "CLIENT", "scope": "VISITOR"
    }))
    .await
    .expect("answer");
    assert_eq!(created.status(), 201);
    let created = json_of(created).await;
    assert_eq!(created["index"], 2, "next free index");
    assert!(created["id"].as_u64().is_some());
    assert_eq!(created["name"], "VIP");
    assert_eq!(created["scope"], "VISITOR");

    let duplicate = create(json!({
        "name": "VIP", "siteId": SITE_ID, "format": "BOOLEAN", "type": "UNIQUE", "method": "CLIENT", "scope": "VISITOR"
    }))
    .await
    .expect("answer");
    assert_eq!(duplicate.status(), 409);
    let error = json_of(duplicate).await;
    assert_eq!(error["status"], 409);
    assert!(error["message"].as_str().expect("message").contains("VIP"));

    let bad_enum = create(json!({
        "name": "X", "siteId": SITE_ID, "format": "BOOL", "type": "UNIQUE", "method": "CLIENT", "scope": "VISITOR"
    }))
    .await
    .expect("answer");
    assert_eq!(bad_enum.status(), 400);
    assert!(
        json_of(bad_enum).await["message"]
            .as_str()
            .expect("message")
            .contains("format")
    );

    let missing = create(json!({"name": "X", "siteId": SITE_ID}))
        .await
        .expect("answer");
    assert_eq!(missing.status(), 400);

    let other_site = create(json!({
        "name": "X", "siteId": 4242, "format": "BOOLEAN", "type": "UNIQUE", "method": "CLIENT", "scope": "VISITOR"
    }))
    .await
    .expect("answer");
    assert_eq!(other_site.status(), 403);

    let data = km
        .custom_data_named(SITE, "VIP")
        .expect("site")
        .expect("created");
    assert_eq!(data.index, 2);
    assert_eq!(km.custom_datas(SITE).expect("site").len(), 3);
    assert_eq!(km.stats().custom_datas_created, 1);

    let page = client
        .get(&url)
        .query(&[("filter", filter.as_str()), ("page", "2"), ("perPage", "2")])
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(page.headers()["x-pagination-page-count"], "2");
    let page = json_of(page).await;
    assert_eq!(page.as_array().expect("array").len(), 1);
    assert_eq!(page[0]["name"], "VIP");

    let by_id = client
        .get(format!("{url}/{}", data.id))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(json_of(by_id).await["index"], 2);
}

#[tokio::test]
async fn revoked_and_rotated_tokens() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let sites = format!("{}/sites", km.url());
    let first = token(&client, &km.url()).await;
    assert_eq!(km.revoke_tokens(None), 1);
    let revoked = client
        .get(&sites)
        .bearer_auth(&first)
        .send()
        .await
        .expect("answer");
    assert_eq!(revoked.status(), 401);
    assert!(
        json_of(revoked).await["error_description"]
            .as_str()
            .expect("text")
            .contains("revoked")
    );

    let second = token(&client, &km.url()).await;
    assert_eq!(km.expire_tokens(Some(CLIENT_ID)), 2);
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth(&second)
            .send()
            .await
            .expect("answer")
            .status(),
        401
    );

    let third = token(&client, &km.url()).await;
    km.set_client_secret(CLIENT_ID, "km-secret-2", true)
        .expect("client exists");
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth(&third)
            .send()
            .await
            .expect("answer")
            .status(),
        401
    );
    let old_secret = client
        .post(format!("{}/oauth/token", km.url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(old_secret.status(), 401);
    let new_secret = client
        .post(format!("{}/oauth/token", km.url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", "km-secret-2"),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(new_secret.status(), 200);
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth("garbage")
            .send()
            .await
            .expect("answer")
            .status(),
        401
    );
}

#[tokio::test]
async fn automation_rate_limits() {
    let km = start(KameleoonConfig {
        automation_requests_per_10_seconds: 3,
        retry_after_seconds: Some(10),
        ..KameleoonConfig::default()
    })
    .await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let sites = format!("{}/sites", km.url());
    for _ in 0..3 {
        assert_eq!(
            client
                .get(&sites)
                .bearer_auth(&token)
                .send()
                .await
                .expect("answer")
                .status(),
            200
        );
    }
    let limited = client
        .get(&sites)
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "10");
    assert_eq!(json_of(limited).await["status"], 429);
    assert_eq!(km.stats().automation_rate_limited, 1);

    km.set_config(KameleoonConfig {
        automation_rate_limits: false,
        ..km.config()
    });
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth(&token)
            .send()
            .await
            .expect("answer")
            .status(),
        200
    );

    km.set_config(KameleoonConfig {
        automation_rate_limits: true,
        automation_requests_per_10_seconds: 100,
        automation_requests_per_hour: 5,
        ..km.config()
    });
    // Four requests were admitted so far (the 429 is not counted): one more fits.
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth(&token)
            .send()
            .await
            .expect("answer")
            .status(),
        200
    );
    let hourly = client
        .get(&sites)
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(
        hourly.status(),
        429,
        "five requests were counted in the last hour"
    );
    km.reset_limits();
    assert_eq!(
        client
            .get(&sites)
            .bearer_auth(&token)
            .send()
            .await
            .expect("answer")
            .status(),
        200
    );
}

#[tokio::test]
async fn events_update_state() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let body = [
        event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-1"),
        event_line(COHORT_INDEX, "true", 2, "visitorCode", "u-2"),
        event_line(COHORT_INDEX, "true", 3, "mappingValue", "crm-3"),
    ]
    .join("\n");
    let response = post_events(&client, &km.url(), Some(&token), SITE, body).await;
    assert_eq!(response.status(), 204);
    let state = km.state(SITE, COHORT_INDEX).expect("site");
    assert_eq!(
        state.with_value(IdentifierKind::VisitorCode, "true").len(),
        2
    );
    assert_eq!(state.mapping_values["crm-3"], vec!["true".to_string()]);

    let update = [
        event_line(COHORT_INDEX, "false", 4, "visitorCode", "u-1"),
        String::new(),
    ]
    .join("\n");
    assert_eq!(
        post_events(&client, &km.url(), Some(&token), SITE, update)
            .await
            .status(),
        204
    );
    assert_eq!(
        km.value_of(SITE, COHORT_INDEX, IdentifierKind::VisitorCode, "u-1")
            .expect("site"),
        Some(vec!["false".to_string()]),
        "overwrite=true replaces the value"
    );

    let summary = km.state_summary(SITE, COHORT_INDEX).expect("site");
    assert_eq!(summary.visitor_codes.identifiers, 2);
    assert_eq!(summary.visitor_codes.by_value["true"], 1);
    assert_eq!(summary.visitor_codes.by_value["false"], 1);
    assert_eq!(summary.mapping_values.identifiers, 1);

    let records = km.requests();
    let first = records
        .iter()
        .find(|r| r.route == Some(Route::Events))
        .expect("recorded");
    assert_eq!(first.line_count, Some(3));
    assert_eq!(first.accepted_lines, Some(3));
    assert_eq!(first.rejected_lines, Some(0));
    assert_eq!(first.site_code.as_deref(), Some(SITE));
    assert_eq!(first.headers["authorization"], "Bearer <redacted>");
    assert!(km.rejected_lines().is_empty());
}

#[tokio::test]
async fn overwrite_false_adds_values() {
    let km = start(KameleoonConfig::default()).await;
    km.create_custom_data(
        SITE,
        standins::seed::CustomDataSeed {
            data_type: "LIST".into(),
            ..custom_data("Segments", 5, "STRING", false)
        },
    )
    .expect("created");
    let client = client();
    let token = token(&client, &km.url()).await;
    let add = |nonce: u64, value: &str| {
        event_line(5, value, nonce, "visitorCode", "u-1")
            .replace("overwrite=true", "overwrite=false")
    };
    let body = [add(10, "a"), add(11, "b")].join("\n");
    assert_eq!(
        post_events(&client, &km.url(), Some(&token), SITE, body)
            .await
            .status(),
        204
    );
    assert_eq!(
        km.value_of(SITE, 5, IdentifierKind::VisitorCode, "u-1")
            .expect("site"),
        Some(vec!["a".to_string(), "b".to_string()])
    );
}

#[tokio::test]
async fn bad_lines_are_rejected_with_reason() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let long_code = "x".repeat(101);
    let body = [
        event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-ok"),
        event_line(COHORT_INDEX, "true", 2, "visitorCode", &long_code),
        event_line(9, "true", 3, "visitorCode", "u-3"),
        event_line(COHORT_INDEX, "yes", 4, "visitorCode", "u-4"),
        event_line(COHORT_INDEX, "true", 5, "visitorCode", "u-5")
            .replace("nonce=0000000000000005", "nonce=5"),
        event_line(COHORT_INDEX, "true", 6, "visitorCode", ""),
        "eventType=customData&index=1".to_string(),
    ]
    .join("\n");
    let response = post_events(&client, &km.url(), Some(&token), SITE, body).await;
    assert_eq!(
        response.status(),
        204,
        "the Data API responds before it checks lines"
    );

    let rejected = km.rejected_lines();
    let reasons: Vec<(usize, &str)> = rejected
        .iter()
        .map(|r| (r.line_number, r.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 6, "{reasons:?}");
    assert!(reasons[0].1.contains("maximum is 100"), "{reasons:?}");
    assert!(reasons[1].1.contains("index 9"), "{reasons:?}");
    assert!(reasons[2].1.contains("not a valid BOOLEAN"), "{reasons:?}");
    assert!(reasons[3].1.contains("nonce"), "{reasons:?}");
    assert!(reasons[4].1.contains("visitorCode is empty"), "{reasons:?}");
    assert!(reasons[5].1.contains("missing"), "{reasons:?}");
    assert_eq!(rejected[0].line_number, 2);
    assert_eq!(km.stats().lines_rejected, 6);
    assert_eq!(km.stats().lines_applied, 1);
    let state = km.state(SITE, COHORT_INDEX).expect("site");
    assert_eq!(state.visitor_codes.len(), 1);
}

#[tokio::test]
async fn mapping_value_needs_mapping_identifier() {
    let mut seed = kameleoon_seed();
    seed.sites[0]
        .custom_datas
        .retain(|data| !data.is_mapping_identifier);
    let km = KameleoonStandin::start(seed, KameleoonConfig::default())
        .await
        .expect("starts");
    let client = client();
    let token = token(&client, &km.url()).await;
    let body = event_line(COHORT_INDEX, "true", 1, "mappingValue", "crm-1");
    assert_eq!(
        post_events(&client, &km.url(), Some(&token), SITE, body)
            .await
            .status(),
        204
    );
    let rejected = km.rejected_lines();
    assert_eq!(rejected.len(), 1);
    assert!(
        rejected[0].reason.contains("mapping identifier"),
        "{}",
        rejected[0].reason
    );
}

#[tokio::test]
async fn duplicate_nonces_are_ignored() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let body = event_line(COHORT_INDEX, "true", 77, "visitorCode", "u-1");
    assert_eq!(
        post_events(&client, &km.url(), Some(&token), SITE, body)
            .await
            .status(),
        204
    );
    let replay = [
        event_line(COHORT_INDEX, "false", 77, "visitorCode", "u-1"),
        event_line(COHORT_INDEX, "true", 78, "visitorCode", "u-2"),
    ]
    .join("\n");
    assert_eq!(
        post_events(&client, &km.url(), Some(&token), SITE, replay)
            .await
            .status(),
        204
    );
    assert_eq!(
        km.value_of(SITE, COHORT_INDEX, IdentifierKind::VisitorCode, "u-1")
            .expect("site"),
        Some(vec!["true".to_string()]),
        "the replayed line was ignored"
    );

    let stats = km.stats();
    assert_eq!(stats.lines_duplicate, 1);
    assert_eq!(stats.lines_applied, 2);
    let last = km.requests().into_iter().last().expect("record");
    assert_eq!(last.duplicate_lines, Some(1));
    assert!(
        km.rejected_lines().is_empty(),
        "duplicates are not rejected lines"
    );
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let km = start(KameleoonConfig {
        events_body_limit_bytes: 2048,
        ..KameleoonConfig::default()
    })
    .await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let line = event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-1");
    let lines: Vec<String> = (0..40u64)
        .map(|n| {
            event_line(
                COHORT_INDEX,
                "true",
                n + 1,
                "visitorCode",
                &format!("u-{n}"),
            )
        })
        .collect();
    let body = lines.join("\n");
    assert!(body.len() > 2048);
    let response = post_events(&client, &km.url(), Some(&token), SITE, body).await;
    assert_eq!(response.status(), 413);
    assert_eq!(km.stats().events_body_too_large, 1);
    assert_eq!(km.stats().lines_received, 0, "the body is not parsed");
    assert!(
        km.state(SITE, COHORT_INDEX)
            .expect("site")
            .visitor_codes
            .is_empty()
    );

    let record = km.requests().into_iter().last().expect("record");
    assert_eq!(record.status, 413);
    assert!(
        record.headers["content-length"]
            .parse::<usize>()
            .expect("length")
            > 2048
    );

    let fits = post_events(&client, &km.url(), Some(&token), SITE, line).await;
    assert_eq!(fits.status(), 204);
}

#[tokio::test]
async fn user_agent_and_auth_checks() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let url = format!("{}/visit/events?siteCode={SITE}", km.url());
    let line = event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-1");

    common::install_crypto_provider();
    let bare = reqwest::Client::new();
    let no_agent = bare
        .post(&url)
        .bearer_auth(&token)
        .body(line.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(
        no_agent.status(),
        403,
        "reqwest sends no User-Agent by default"
    );
    let robot = bare
        .post(&url)
        .bearer_auth(&token)
        .header("user-agent", "Mozilla/5.0 (compatible; Googlebot/2.1)")
        .body(line.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(robot.status(), 403);

    let no_token = post_events(&client, &km.url(), None, SITE, line.clone()).await;
    assert_eq!(no_token.status(), 401);
    let bad_token = post_events(&client, &km.url(), Some("nope"), SITE, line.clone()).await;
    assert_eq!(bad_token.status(), 401);

    let other_token = json_of(
        client
            .post(format!("{}/oauth/token", km.url()))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "other-client"),
                ("client_secret", "other-secret"),
            ])
            .send()
            .await
            .expect("answer"),
    )
    .await["access_token"]
        .as_str()
        .expect("token")
        .to_string();
    let denied = post_events(&client, &km.url(), Some(&other_token), SITE, line.clone()).await;
    assert_eq!(denied.status(), 403);

    let missing_site = client
        .post(format!("{}/visit/events", km.url()))
        .bearer_auth(&token)
        .body(line.clone())
        .send()
        .await
        .expect("answer");
    assert_eq!(missing_site.status(), 400);

    let unknown_site =
        post_events(&client, &km.url(), Some(&token), "unknown000", line.clone()).await;
    assert_eq!(unknown_site.status(), 204);
    assert!(km.rejected_lines()[0].reason.contains("unknown000"));

    km.set_config(KameleoonConfig {
        data_api_auth_required: false,
        ..km.config()
    });
    let optional = post_events(&client, &km.url(), None, SITE, line).await;
    assert_eq!(optional.status(), 204);
    assert_eq!(km.stats().forbidden, 3);
}

#[tokio::test]
async fn visitor_read_back() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let body = [
        event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-1"),
        event_line(MAPPING_INDEX, "crm-1", 2, "visitorCode", "u-1"),
    ]
    .join("\n");
    post_events(&client, &km.url(), Some(&token), SITE, body).await;
    let response = client
        .get(format!("{}/visit/visitor", km.url()))
        .query(&[
            ("siteCode", SITE),
            ("visitorCode", "u-1"),
            ("customData", "true"),
        ])
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let body = json_of(response).await;
    let events = body["currentVisit"]["customDataEvents"]
        .as_array()
        .expect("events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["data"]["index"], MAPPING_INDEX);
    assert_eq!(events[0]["data"]["valuesCountMap"], json!({"crm-1": 1}));
    assert_eq!(events[1]["data"]["valuesCountMap"], json!({"true": 1}));
}

#[tokio::test]
async fn faults_on_kameleoon_routes() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    km.add_fault(Fault::respond(
        Route::Token,
        503,
        json!({"error": "maintenance"}),
    ));
    let failed = client
        .post(format!("{}/oauth/token", km.url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .expect("answer");
    assert_eq!(failed.status(), 503);
    let token = token(&client, &km.url()).await;

    km.add_fault(Fault::respond(Route::Events, 401, json!({"error": "invalid_token"})).site(SITE));
    let line = event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-1");
    let first = post_events(&client, &km.url(), Some(&token), SITE, line.clone()).await;
    assert_eq!(first.status(), 401);
    assert!(
        km.state(SITE, COHORT_INDEX)
            .expect("site")
            .visitor_codes
            .is_empty()
    );
    let second = post_events(&client, &km.url(), Some(&token), SITE, line.clone()).await;
    assert_eq!(second.status(), 204);

    km.add_fault(Fault::drop_connection(Route::Events));
    let dropped = client
        .post(format!("{}/visit/events?siteCode={SITE}", km.url()))
        .bearer_auth(&token)
        .body(event_line(COHORT_INDEX, "true", 2, "visitorCode", "u-2"))
        .send()
        .await;
    assert!(dropped.is_err());
    assert!(
        km.value_of(SITE, COHORT_INDEX, IdentifierKind::VisitorCode, "u-2")
            .expect("site")
            .is_none()
    );

    km.add_fault(Fault::delay(Route::Sites, 250));
    let started = Instant::now();
    let sites = client
        .get(format!("{}/sites", km.url()))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(sites.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(250));

    km.add_fault(
        Fault::respond(Route::CustomDatas, 429, json!({"status": 429}))
            .retry_after(1)
            .site(SITE),
    );
    let filter =
        json!([{"field": "siteId", "operator": "EQUAL", "parameters": [SITE_ID]}]).to_string();
    let limited = client
        .get(format!("{}/custom-datas", km.url()))
        .query(&[("filter", filter)])
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(km.stats().fault_responses, 3);
    assert!(km.faults().is_empty());
}

#[tokio::test]
async fn control_api_over_http() {
    let km = start(KameleoonConfig::default()).await;
    let client = client();
    let base = km.url();
    let token = token(&client, &base).await;
    let body = [
        event_line(COHORT_INDEX, "true", 1, "visitorCode", "u-1"),
        event_line(COHORT_INDEX, "false", 2, "visitorCode", "u-2"),
        event_line(COHORT_INDEX, "nope", 3, "visitorCode", "u-3"),
    ]
    .join("\n");
    post_events(&client, &base, Some(&token), SITE, body).await;

    let values = json_of(
        client
            .get(format!(
                "{base}/_standin/sites/{SITE}/custom-datas/{COHORT_INDEX}/values?value=true"
            ))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(values, json!({"total": 1, "values": {"u-1": ["true"]}}));

    let summary = json_of(
        client
            .get(format!(
                "{base}/_standin/sites/{SITE}/custom-datas/{COHORT_INDEX}/summary"
            ))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(summary["visitor_codes"]["identifiers"], 2);

    let rejected = json_of(
        client
            .get(format!("{base}/_standin/rejected-lines"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(rejected["total"], 1);
    assert_eq!(rejected["lines"][0]["line_number"], 3);

    let datas = json_of(
        client
            .get(format!("{base}/_standin/sites/{SITE}/custom-datas"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(datas.as_array().expect("array").len(), 2);

    let fault = client
        .post(format!("{base}/_standin/faults"))
        .json(&json!({"route": "sites", "action": {"kind": "drop-connection"}}))
        .send()
        .await
        .expect("answer");
    assert_eq!(fault.status(), 201);
    let listed = json_of(
        client
            .get(format!("{base}/_standin/faults"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(listed[0]["fault"]["route"], "sites");
    let cleared = client
        .delete(format!("{base}/_standin/faults"))
        .send()
        .await
        .expect("answer");
    assert_eq!(cleared.status(), 200);
    assert!(km.faults().is_empty());

    let rotated = client
        .put(format!("{base}/_standin/clients/{CLIENT_ID}/secret"))
        .json(&json!({"secret": "km-secret-2"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(rotated.status(), 200);
    let sites = client
        .get(format!("{base}/sites"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answer");
    assert_eq!(sites.status(), 401, "rotation revokes tokens by default");

    let expired = json_of(
        client
            .post(format!("{base}/_standin/tokens/expire"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(expired["expired"], 1);

    let patched = client
        .patch(format!("{base}/_standin/config"))
        .json(&json!({"events_body_limit_bytes": 10, "automation_rate_limits": false}))
        .send()
        .await
        .expect("answer");
    assert_eq!(patched.status(), 200);
    assert_eq!(km.config().events_body_limit_bytes, 10);
    let bad_patch = client
        .patch(format!("{base}/_standin/config"))
        .json(&json!({"no_such_switch": true}))
        .send()
        .await
        .expect("answer");
    assert_eq!(bad_patch.status(), 400);

    let cleared = client
        .delete(format!("{base}/_standin/sites/{SITE}/values"))
        .send()
        .await
        .expect("answer");
    assert_eq!(cleared.status(), 200);
    assert!(
        km.state(SITE, COHORT_INDEX)
            .expect("site")
            .visitor_codes
            .is_empty()
    );

    let records = json_of(
        client
            .get(format!("{base}/_standin/requests?route=events"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(records.as_array().expect("array").len(), 1);
    assert_eq!(records[0]["line_count"], 3);
}

#[tokio::test]
async fn large_state_stays_compact() {
    let km = start(KameleoonConfig {
        events_body_limit_bytes: 8 * 1024 * 1024,
        ..KameleoonConfig::default()
    })
    .await;
    let client = client();
    let token = token(&client, &km.url()).await;
    let started = Instant::now();
    let mut nonce = 0u64;
    for batch in 0..10 {
        let lines: Vec<String> = (0..10_000)
            .map(|n| {
                nonce += 1;
                event_line(
                    COHORT_INDEX,
                    "true",
                    nonce,
                    "visitorCode",
                    &format!("u-{batch}-{n}"),
                )
            })
            .collect();
        let response = post_events(&client, &km.url(), Some(&token), SITE, lines.join("\n")).await;
        assert_eq!(response.status(), 204);
    }
    let summary = km.state_summary(SITE, COHORT_INDEX).expect("site");
    assert_eq!(summary.visitor_codes.identifiers, 100_000);
    assert_eq!(summary.visitor_codes.by_value["true"], 100_000);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "100,000 lines took {:?}",
        started.elapsed()
    );
}
