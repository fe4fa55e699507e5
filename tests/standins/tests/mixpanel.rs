//! Mixpanel stand-in driven over HTTP on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use standins::seed::{Availability, GeneratorSeed, ProfileSeed};
use standins::{Fault, FaultAction, MixpanelConfig, MixpanelStandin, Route};

async fn start(
    cohorts: Vec<standins::seed::CohortSeed>,
    config: MixpanelConfig,
) -> MixpanelStandin {
    MixpanelStandin::start(mixpanel_seed(cohorts), config)
        .await
        .expect("stand-in starts")
}

fn small_pages() -> MixpanelConfig {
    MixpanelConfig {
        page_size: 1000,
        ..MixpanelConfig::default()
    }
}

#[tokio::test]
async fn auth_failures_have_mixpanel_shapes() {
    let mp = start(vec![cohort(1, "c", numbered(1))], MixpanelConfig::default()).await;
    let client = client();
    let url = |project: u64| format!("{}/api/query/engage?project_id={project}", mp.url());
    let form = [cohort_filter(1)];

    let missing = client
        .post(url(PROJECT))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 401);
    let body = json_of(missing).await;
    assert_eq!(body["status"], "error");
    assert!(
        body["error"]
            .as_str()
            .expect("error text")
            .contains("Unable to authenticate")
    );

    let wrong = client
        .post(url(PROJECT))
        .basic_auth(USERNAME, Some("not-the-secret"))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(wrong.status(), 401);
    assert_eq!(json_of(wrong).await["status"], "error");

    let no_access = client
        .post(url(OTHER_PROJECT))
        .basic_auth(USERNAME, Some(SECRET))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(no_access.status(), 403);
    let body = json_of(no_access).await;
    assert_eq!(body["status"], "error");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains(&OTHER_PROJECT.to_string())
    );

    let no_plan = client
        .post(url(FREE_PROJECT))
        .basic_auth(USERNAME, Some(SECRET))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(no_plan.status(), 402);
    let body = json_of(no_plan).await;
    assert!(body["error"].is_string());
    assert!(
        body.get("status").is_none(),
        "402 body has only error: {body}"
    );

    let no_project = client
        .post(format!("{}/api/query/engage", mp.url()))
        .basic_auth(USERNAME, Some(SECRET))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(no_project.status(), 400);
    assert!(
        json_of(no_project).await["error"]
            .as_str()
            .expect("error")
            .contains("project_id")
    );

    let plain_text_basic = client
        .post(url(PROJECT))
        .header("authorization", format!("Basic {USERNAME}:{SECRET}"))
        .form(&form)
        .send()
        .await
        .expect("answer");
    assert_eq!(
        plain_text_basic.status(),
        200,
        "Mixpanel also accepts plain-text Basic"
    );
}

#[tokio::test]
async fn pages_until_short_page() {
    let mp = start(vec![cohort(1401, "big", numbered(2500))], small_pages()).await;
    let client = client();
    let (results, requests) = read_all_pages(&client, &mp.url(), 1401, &[]).await;
    assert_eq!(results.len(), 2500);
    assert_eq!(requests, 3);
    let records = mp.requests();
    let engage: Vec<_> = records
        .iter()
        .filter(|r| r.route == Some(Route::Engage))
        .collect();
    assert_eq!(engage.len(), 3);
    assert_eq!(engage[0].page, Some(0));
    assert_eq!(engage[2].page, Some(2));
    let session = engage[0]
        .session_id
        .clone()
        .expect("page 0 opens a session");
    assert_eq!(engage[1].session_id.as_deref(), Some(session.as_str()));
    assert_eq!(engage[2].session_id.as_deref(), Some(session.as_str()));
    let first = &results[0];
    assert_eq!(first["$distinct_id"], "u-0001");
}

#[tokio::test]
async fn total_only_on_first_page() {
    let mp = start(vec![cohort(1401, "big", numbered(1500))], small_pages()).await;
    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(1401)]).await).await;
    assert_eq!(page0["total"], 1500);
    assert_eq!(page0["page"], 0);
    assert_eq!(page0["page_size"], 1000);
    assert_eq!(page0["status"], "ok");
    let session = page0["session_id"].as_str().expect("session").to_string();
    let page1 = json_of(
        engage(
            &client,
            &mp.url(),
            &[
                cohort_filter(1401),
                ("page", "1".into()),
                ("session_id", session.clone()),
            ],
        )
        .await,
    )
    .await;
    assert!(
        page1.get("total").is_none(),
        "total only on page 0: {page1}"
    );
    assert_eq!(page1["results"].as_array().expect("results").len(), 500);
    assert_eq!(page1["session_id"], session.as_str());
}

#[tokio::test]
async fn full_last_page_then_empty_page() {
    let mp = start(vec![cohort(1402, "exact", numbered(2000))], small_pages()).await;
    let (results, requests) = read_all_pages(&client(), &mp.url(), 1402, &[]).await;
    assert_eq!(results.len(), 2000);
    assert_eq!(requests, 3, "pages 0 and 1 are full, page 2 is empty");
}

#[tokio::test]
async fn empty_cohort_is_one_request() {
    let mp = start(vec![cohort(1403, "empty", Vec::new())], small_pages()).await;
    let client = client();
    let body = json_of(engage(&client, &mp.url(), &[cohort_filter(1403)]).await).await;
    assert_eq!(body["total"], 0);
    assert_eq!(body["results"], json!([]));
    assert!(body["session_id"].is_string());
    let (_, requests) = read_all_pages(&client, &mp.url(), 1403, &[]).await;
    assert_eq!(requests, 1);
}

#[tokio::test]
async fn later_page_requires_session() {
    let mp = start(vec![cohort(1, "c", numbered(1200))], small_pages()).await;
    let client = client();
    let without = engage(
        &client,
        &mp.url(),
        &[cohort_filter(1), ("page", "1".into())],
    )
    .await;
    assert_eq!(without.status(), 400);
    assert!(
        json_of(without).await["error"]
            .as_str()
            .expect("error")
            .contains("session_id")
    );

    let unknown = engage(
        &client,
        &mp.url(),
        &[
            cohort_filter(1),
            ("page", "1".into()),
            ("session_id", "123-NOPE".into()),
        ],
    )
    .await;
    assert_eq!(unknown.status(), 400);
    assert!(
        json_of(unknown).await["error"]
            .as_str()
            .expect("error")
            .contains("123-NOPE")
    );
}

#[tokio::test]
async fn profiles_and_anonymous_members() {
    let members = vec![
        identified("u-1"),
        anonymous("$device:7f3a-11"),
        standins::seed::MemberSeed::Id(standins::seed::DistinctId::Number(4242)),
        standins::seed::MemberSeed::Profile(ProfileSeed::new(
            "u-2",
            json!({"$email": "b@example.test", "$kameleoon_mapping_id": "crm-2", "plan": "pro"}),
        )),
    ];
    let mp = start(vec![cohort(1101, "mixed", members)], small_pages()).await;
    let client = client();

    let all = json_of(engage(&client, &mp.url(), &[cohort_filter(1101)]).await).await;
    assert_eq!(all["total"], 4, "include_all_users defaults to true");
    let results = all["results"].as_array().expect("results");
    assert_eq!(results[1]["$distinct_id"], "$device:7f3a-11");
    assert_eq!(results[1]["$properties"], json!({}));
    assert_eq!(
        results[2]["$distinct_id"],
        json!(4242),
        "numeric ids stay numbers"
    );

    let profiles_only = json_of(
        engage(
            &client,
            &mp.url(),
            &[
                cohort_filter(1101),
                ("include_all_users", "false".into()),
                ("output_properties", r#"["$kameleoon_mapping_id"]"#.into()),
            ],
        )
        .await,
    )
    .await;
    assert_eq!(profiles_only["total"], 2);
    let results = profiles_only["results"].as_array().expect("results");
    assert_eq!(results[0]["$distinct_id"], "u-1");
    assert_eq!(results[0]["$properties"], json!({}));
    assert_eq!(
        results[1]["$properties"],
        json!({"$kameleoon_mapping_id": "crm-2"})
    );
}

#[tokio::test]
async fn cohorts_list_on_all_paths() {
    let mut members = numbered(3);
    members.push(anonymous("anon-1"));
    let mp = start(
        vec![cohort(501, "Song Sharers", members)],
        MixpanelConfig::default(),
    )
    .await;
    let client = client();
    for (method, path) in [
        ("POST", "/api/query/cohorts/list"),
        ("GET", "/api/query/cohorts/list"),
        ("POST", "/api/2.0/cohorts/list"),
        ("GET", "/api/2.0/cohorts/list"),
    ] {
        let request = match method {
            "POST" => client.post(format!("{}{path}?project_id={PROJECT}", mp.url())),
            _ => client.get(format!("{}{path}?project_id={PROJECT}", mp.url())),
        };
        let response = request
            .basic_auth(USERNAME, Some(SECRET))
            .send()
            .await
            .expect("answer");
        assert_eq!(response.status(), 200, "{method} {path}");
        let body = json_of(response).await;
        assert_eq!(
            body,
            json!([{
                "id": 501,
                "name": "Song Sharers",
                "count": 4,
                "description": "",
                "created": "2024-01-02 03:04:05",
                "is_visible": 1,
                "project_id": PROJECT,
            }]),
            "{method} {path}"
        );
    }
    let legacy = client
        .post(format!("{}/api/2.0/engage?project_id={PROJECT}", mp.url()))
        .basic_auth(USERNAME, Some(SECRET))
        .form(&[cohort_filter(501)])
        .send()
        .await
        .expect("answer");
    assert_eq!(legacy.status(), 200, "/api/2.0/engage is served too");
}

#[tokio::test]
async fn unknown_deleted_and_unavailable_cohorts() {
    let mp = start(
        vec![cohort(1301, "promo", numbered(3))],
        MixpanelConfig::default(),
    )
    .await;
    let client = client();
    let unknown = engage(&client, &mp.url(), &[cohort_filter(999)]).await;
    assert_eq!(unknown.status(), 400);
    assert_eq!(
        json_of(unknown).await,
        json!({"error": "cohort 999 not found"})
    );

    mp.set_cohort_availability(PROJECT, 1301, Availability::Deleted)
        .expect("cohort exists");
    let deleted = engage(&client, &mp.url(), &[cohort_filter(1301)]).await;
    assert_eq!(deleted.status(), 400);
    assert_eq!(
        json_of(deleted).await,
        json!({"error": "cohort 1301 not found"})
    );
    let list = client
        .post(format!(
            "{}/api/query/cohorts/list?project_id={PROJECT}",
            mp.url()
        ))
        .basic_auth(USERNAME, Some(SECRET))
        .send()
        .await
        .expect("answer");
    assert_eq!(json_of(list).await, json!([]));

    mp.set_cohort_availability(
        PROJECT,
        1301,
        Availability::Unavailable {
            status: 404,
            error: "Missing Datagroup for cohort 1301".into(),
        },
    )
    .expect("cohort exists");
    let unavailable = engage(&client, &mp.url(), &[cohort_filter(1301)]).await;
    assert_eq!(unavailable.status(), 404);
    assert_eq!(
        json_of(unavailable).await,
        json!({"error": "Missing Datagroup for cohort 1301"})
    );

    mp.set_cohort_availability(PROJECT, 1301, Availability::Available)
        .expect("cohort exists");
    let restored = json_of(engage(&client, &mp.url(), &[cohort_filter(1301)]).await).await;
    assert_eq!(restored["total"], 3);
}

#[tokio::test]
async fn session_keeps_snapshot_of_members() {
    let mp = start(vec![cohort(1201, "trial", numbered(1500))], small_pages()).await;
    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(1201)]).await).await;
    let session = page0["session_id"].as_str().expect("session").to_string();

    mp.set_cohort_members(PROJECT, 1201, vec![identified("u-new")])
        .expect("cohort exists");
    let page1 = json_of(
        engage(
            &client,
            &mp.url(),
            &[
                cohort_filter(1201),
                ("page", "1".into()),
                ("session_id", session),
            ],
        )
        .await,
    )
    .await;
    assert_eq!(page1["results"].as_array().expect("results").len(), 500);
    assert_eq!(page1["results"][0]["$distinct_id"], "u-1001");

    let fresh = json_of(engage(&client, &mp.url(), &[cohort_filter(1201)]).await).await;
    assert_eq!(fresh["total"], 1);
    assert_eq!(fresh["results"][0]["$distinct_id"], "u-new");
}

#[tokio::test]
async fn profile_changes_apply_to_next_query() {
    let mp = start(vec![cohort(7, "c", vec![anonymous("u-1")])], small_pages()).await;
    let client = client();
    let form = [cohort_filter(7), ("include_all_users", "false".to_string())];
    assert_eq!(
        json_of(engage(&client, &mp.url(), &form).await).await["total"],
        0
    );
    mp.upsert_profiles(
        PROJECT,
        vec![ProfileSeed::new("u-1", json!({"$email": "x@example.test"}))],
    )
    .expect("project exists");
    assert_eq!(
        json_of(engage(&client, &mp.url(), &form).await).await["total"],
        1
    );
    mp.upsert_profiles(PROJECT, vec![ProfileSeed::new("u-1", json!({}))])
        .expect("project exists");
    assert_eq!(
        json_of(engage(&client, &mp.url(), &form).await).await["total"],
        0,
        "a profile without properties does not exist"
    );
}

#[tokio::test]
async fn hourly_limit_answers_429() {
    let config = MixpanelConfig {
        hourly_query_limit: 3,
        page_size: 10,
        retry_after_seconds: Some(30),
        ..MixpanelConfig::default()
    };
    let mp = start(vec![cohort(801, "rl", numbered(25))], config).await;
    let client = client();

    // Page 0 counts; follow-up pages do not by default.
    let (results, _) = read_all_pages(&client, &mp.url(), 801, &[]).await;
    assert_eq!(results.len(), 25);
    for _ in 0..2 {
        assert_eq!(
            engage(&client, &mp.url(), &[cohort_filter(801)])
                .await
                .status(),
            200
        );
    }
    let limited = engage(&client, &mp.url(), &[cohort_filter(801)]).await;
    assert_eq!(limited.status(), 429);
    assert_eq!(
        limited
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("30")
    );
    let body = json_of(limited).await;
    assert_eq!(
        body["request"],
        format!("/api/query/engage?project_id={PROJECT}")
    );
    let error = body["error"].as_str().expect("error");
    assert!(
        error.starts_with(&format!("Query rate limit exceeded for project_id: {PROJECT}. 1/5 queries running concurrently and 4/3 queries running in the last hour.")),
        "{error}"
    );
    assert!(body.get("status").is_none());

    let list = client
        .post(format!(
            "{}/api/query/cohorts/list?project_id={PROJECT}",
            mp.url()
        ))
        .basic_auth(USERNAME, Some(SECRET))
        .send()
        .await
        .expect("answer");
    assert_eq!(list.status(), 429, "cohorts/list shares the hourly budget");

    let stats = mp.project_stats(PROJECT).expect("project stats");
    assert_eq!(stats.queries_counted, 3);
    assert_eq!(stats.queries_in_last_hour, 3);
    assert_eq!(stats.rejected_hourly, 2);
    assert_eq!(mp.stats().rate_limited, 2);

    mp.reset_limits();
    assert_eq!(
        engage(&client, &mp.url(), &[cohort_filter(801)])
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn follow_up_pages_can_count() {
    let config = MixpanelConfig {
        hourly_query_limit: 2,
        page_size: 10,
        count_follow_up_pages: true,
        ..MixpanelConfig::default()
    };
    let mp = start(vec![cohort(802, "c", numbered(25))], config).await;
    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(802)]).await).await;
    let session = page0["session_id"].as_str().expect("session").to_string();
    let form = |page: u64| {
        vec![
            cohort_filter(802),
            ("page", page.to_string()),
            ("session_id", session.clone()),
        ]
    };
    assert_eq!(engage(&client, &mp.url(), &form(1)).await.status(), 200);
    assert_eq!(engage(&client, &mp.url(), &form(2)).await.status(), 429);
}

#[tokio::test]
async fn sixth_concurrent_query_gets_429() {
    let mp = start(
        vec![cohort(901, "c", numbered(3))],
        MixpanelConfig::default(),
    )
    .await;
    mp.add_fault(Fault::delay(Route::Engage, 600).times(0));
    let client = client();
    let base = mp.url();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let client = client.clone();
        let base = base.clone();
        tasks.push(tokio::spawn(async move {
            let response = engage(&client, &base, &[cohort_filter(901)]).await;
            let status = response.status().as_u16();
            (status, json_of(response).await)
        }));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }

    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    let ok = answers.iter().filter(|(status, _)| *status == 200).count();
    let limited: Vec<_> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .collect();
    assert_eq!(ok, 5);
    assert_eq!(limited.len(), 1);
    let error = limited[0].1["error"].as_str().expect("error");
    assert!(
        error.contains("6/5 queries running concurrently"),
        "{error}"
    );

    let stats = mp.project_stats(PROJECT).expect("stats");
    assert_eq!(stats.max_in_flight, 5);
    assert_eq!(stats.rejected_concurrent, 1);
    assert_eq!(stats.in_flight, 0, "slots are released after the answers");
    let max_recorded = mp
        .requests()
        .iter()
        .filter_map(|record| record.project_in_flight)
        .max();
    assert_eq!(max_recorded, Some(5));
}

#[tokio::test]
async fn fault_429_then_success() {
    let mp = start(
        vec![cohort(801, "rl", numbered(3))],
        MixpanelConfig::default(),
    )
    .await;
    mp.add_fault(
        Fault::respond(
            Route::Engage,
            429,
            json!({"error": "Query rate limit exceeded for project 1111"}),
        )
        .times(2)
        .retry_after(2)
        .project(PROJECT),
    );
    let client = client();
    for _ in 0..2 {
        let response = engage(&client, &mp.url(), &[cohort_filter(801)]).await;
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "2");
    }
    let response = engage(&client, &mp.url(), &[cohort_filter(801)]).await;
    assert_eq!(response.status(), 200);
    assert!(
        mp.faults().is_empty(),
        "a fault is removed once it fired its times"
    );
    let faulted = mp
        .requests()
        .iter()
        .filter(|r| r.fault_id.is_some())
        .count();
    assert_eq!(faulted, 2);
    assert_eq!(mp.stats().fault_responses, 2);
}

#[tokio::test]
async fn fault_drops_connection() {
    let mp = start(vec![cohort(1, "c", numbered(3))], MixpanelConfig::default()).await;
    mp.add_fault(Fault::drop_connection(Route::CohortsList));
    let client = client();
    let result = client
        .post(format!(
            "{}/api/query/cohorts/list?project_id={PROJECT}",
            mp.url()
        ))
        .basic_auth(USERNAME, Some(SECRET))
        .send()
        .await;
    assert!(result.is_err(), "the connection closes without an answer");
    let record = mp
        .requests()
        .into_iter()
        .find(|r| r.route == Some(Route::CohortsList))
        .expect("recorded");
    assert!(record.dropped);
    assert_eq!(record.status, 0);
    let again = client
        .post(format!(
            "{}/api/query/cohorts/list?project_id={PROJECT}",
            mp.url()
        ))
        .basic_auth(USERNAME, Some(SECRET))
        .send()
        .await
        .expect("answered after the fault");
    assert_eq!(again.status(), 200);
}

#[tokio::test]
async fn fault_expires_paging_session() {
    let mp = start(vec![cohort(1, "c", numbered(1500))], small_pages()).await;
    mp.add_fault(Fault::expire_session().page(1));
    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(1)]).await).await;
    let session = page0["session_id"].as_str().expect("session").to_string();
    let page1 = engage(
        &client,
        &mp.url(),
        &[
            cohort_filter(1),
            ("page", "1".into()),
            ("session_id", session.clone()),
        ],
    )
    .await;
    assert_eq!(page1.status(), 400);
    let error = json_of(page1).await["error"]
        .as_str()
        .expect("error")
        .to_string();
    assert!(error.contains(&session), "{error}");
    let (results, _) = read_all_pages(&client, &mp.url(), 1, &[]).await;
    assert_eq!(results.len(), 1500, "a restart from page 0 works");
}

#[tokio::test]
async fn idle_session_expires() {
    let config = MixpanelConfig {
        session_idle_timeout_ms: 200,
        ..small_pages()
    };
    let mp = start(vec![cohort(1, "c", numbered(1500))], config).await;
    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(1)]).await).await;
    let session = page0["session_id"].as_str().expect("session").to_string();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let page1 = engage(
        &client,
        &mp.url(),
        &[
            cohort_filter(1),
            ("page", "1".into()),
            ("session_id", session),
        ],
    )
    .await;
    assert_eq!(page1.status(), 400);
}

#[tokio::test]
async fn expire_sessions_on_demand() {
    let mp = start(vec![cohort(1, "c", numbered(1500))], small_pages()).await;
    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(1)]).await).await;
    let session = page0["session_id"].as_str().expect("session").to_string();
    assert_eq!(
        mp.expire_sessions(PROJECT, Some(&session))
            .expect("project"),
        1
    );
    let page1 = engage(
        &client,
        &mp.url(),
        &[
            cohort_filter(1),
            ("page", "1".into()),
            ("session_id", session),
        ],
    )
    .await;
    assert_eq!(page1.status(), 400);
}

#[tokio::test]
async fn delay_fault_slows_answer() {
    let mp = start(vec![cohort(1, "c", numbered(1))], MixpanelConfig::default()).await;
    mp.add_fault(Fault::delay(Route::Engage, 300).cohort(1));
    let client = client();
    let started = Instant::now();
    assert_eq!(
        engage(&client, &mp.url(), &[cohort_filter(1)])
            .await
            .status(),
        200
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(
        engage(&client, &mp.url(), &[cohort_filter(1)])
            .await
            .status(),
        200
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "the delay fired once"
    );
}

#[tokio::test]
async fn secret_rotation_rejects_old_secret() {
    let mp = start(vec![cohort(1, "c", numbered(1))], MixpanelConfig::default()).await;
    let client = client();
    mp.set_account_secret(USERNAME, "mp-secret-2")
        .expect("account exists");
    assert_eq!(
        engage(&client, &mp.url(), &[cohort_filter(1)])
            .await
            .status(),
        401
    );
    let response = client
        .post(format!(
            "{}/api/query/engage?project_id={PROJECT}",
            mp.url()
        ))
        .basic_auth(USERNAME, Some("mp-secret-2"))
        .form(&[cohort_filter(1)])
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn records_redact_secrets() {
    let mp = start(vec![cohort(1, "c", numbered(1))], MixpanelConfig::default()).await;
    let client = client();
    engage(&client, &mp.url(), &[cohort_filter(1)]).await;
    let records = mp.requests();
    assert_eq!(records.len(), 1);
    let record = &records[0];
    assert_eq!(record.method, "POST");
    assert_eq!(record.path, "/api/query/engage");
    assert_eq!(record.query.as_deref(), Some("project_id=1111"));
    assert_eq!(record.status, 200);
    assert_eq!(record.project_id, Some(PROJECT));
    assert_eq!(record.cohort_id, Some(1));
    assert_eq!(record.page, Some(0));
    assert_eq!(record.project_in_flight, Some(1));
    assert!(record.body_bytes > 0);
    assert_eq!(
        record.headers["authorization"],
        format!("Basic {USERNAME}:<redacted>")
    );
    assert_eq!(record.headers["user-agent"], USER_AGENT);
    let serialized = serde_json::to_string(&records).expect("records serialize");
    assert!(!serialized.contains(SECRET), "no secret in the log");
}

#[tokio::test]
async fn generated_cohort_reads_lazily() {
    let generator = GeneratorSeed {
        percent_anonymous: 10.0,
        percent_mapping_id: 30.0,
        percent_long_ids: 1.0,
        percent_non_ascii: 1.0,
        percent_numeric_ids: 1.0,
        ..GeneratorSeed::new(12_345)
    };
    let mut big = cohort(1901, "generated", Vec::new());
    big.generate = Some(generator);
    let mp = start(vec![big], small_pages()).await;
    let client = client();
    let expected = mp.cohort_members(PROJECT, 1901).expect("cohort");
    assert_eq!(expected.len(), 12_345);
    let identified: Vec<_> = expected.iter().filter(|m| m.properties.is_some()).collect();

    let (results, requests) = read_all_pages(
        &client,
        &mp.url(),
        1901,
        &[("include_all_users", "false".into())],
    )
    .await;
    assert_eq!(results.len(), identified.len());
    assert_eq!(requests, identified.len() / 1000 + 1);
    for (result, member) in results.iter().zip(identified.iter()) {
        assert_eq!(result["$distinct_id"], json!(member.distinct_id));
    }
    let numeric = results
        .iter()
        .filter(|r| r["$distinct_id"].is_number())
        .count();
    let non_ascii = results
        .iter()
        .filter(|r| r["$distinct_id"].as_str().is_some_and(|id| !id.is_ascii()))
        .count();
    let mapped = results
        .iter()
        .filter(|r| r["$properties"].get("$kameleoon_mapping_id").is_some())
        .count();
    assert!(numeric > 0);
    assert!(non_ascii > 0);
    assert!(mapped > 3000, "about 30% carry a mapping id, got {mapped}");

    let list = client
        .post(format!(
            "{}/api/query/cohorts/list?project_id={PROJECT}",
            mp.url()
        ))
        .basic_auth(USERNAME, Some(SECRET))
        .send()
        .await
        .expect("answer");
    assert_eq!(json_of(list).await[0]["count"], 12_345);
}

#[tokio::test]
async fn million_profile_cohort_stays_fast() {
    let mut big = cohort(2001, "million", Vec::new());
    big.generate = Some(GeneratorSeed {
        percent_anonymous: 5.0,
        ..GeneratorSeed::new(1_000_000)
    });
    let started = Instant::now();
    let mp = start(vec![big], small_pages()).await;

    let client = client();
    let page0 = json_of(engage(&client, &mp.url(), &[cohort_filter(2001)]).await).await;
    let session = page0["session_id"].as_str().expect("session").to_string();
    let last_page = page0["total"].as_u64().expect("total") / 1000;
    let last = json_of(
        engage(
            &client,
            &mp.url(),
            &[
                cohort_filter(2001),
                ("page", last_page.to_string()),
                ("session_id", session),
            ],
        )
        .await,
    )
    .await;
    assert!(last["results"].as_array().expect("results").len() < 1000);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "start and two pages took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn control_api_over_http() {
    let mp = start(vec![cohort(1, "c", numbered(2))], MixpanelConfig::default()).await;
    let client = client();
    let base = mp.url();

    let fault = client
        .post(format!("{base}/_standin/faults"))
        .json(&json!({"route": "engage", "times": 1, "action": {"kind": "respond", "status": 503, "body": "busy"}}))
        .send()
        .await
        .expect("answer");
    assert_eq!(fault.status(), 201);
    let response = engage(&client, &base, &[cohort_filter(1)]).await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.text().await.expect("text"), "busy");

    let patched = client
        .patch(format!("{base}/_standin/config"))
        .json(&json!({"page_size": 1, "hourly_query_limit": 0}))
        .send()
        .await
        .expect("answer");
    assert_eq!(patched.status(), 200);
    assert_eq!(mp.config().page_size, 1);
    assert_eq!(mp.config().hourly_query_limit, 0);

    let members = client
        .put(format!("{base}/_standin/projects/{PROJECT}/cohorts/1/members"))
        .json(&json!({"members": ["a", {"distinct_id": "b", "properties": {"$email": "b@example.test"}}]}))
        .send()
        .await
        .expect("answer");
    assert_eq!(members.status(), 200);
    let listed = json_of(
        client
            .get(format!(
                "{base}/_standin/projects/{PROJECT}/cohorts/1/members"
            ))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(listed["total"], 2);
    assert_eq!(
        listed["members"][1]["properties"]["$email"],
        "b@example.test"
    );

    let availability = client
        .put(format!(
            "{base}/_standin/projects/{PROJECT}/cohorts/1/availability"
        ))
        .json(&json!({"state": "unavailable", "status": 404, "error": "Missing Datagroup"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(availability.status(), 200);
    assert_eq!(
        engage(&client, &base, &[cohort_filter(1)]).await.status(),
        404
    );

    let created = client
        .put(format!("{base}/_standin/projects/{PROJECT}/cohorts/77"))
        .json(&json!({"name": "new", "generate": {"count": 5}}))
        .send()
        .await
        .expect("answer");
    assert_eq!(created.status(), 200);
    let page = json_of(engage(&client, &base, &[cohort_filter(77)]).await).await;
    assert_eq!(page["total"], 5);
    assert_eq!(
        page["results"].as_array().expect("results").len(),
        1,
        "page size 1 from the patch"
    );

    let secret = client
        .put(format!("{base}/_standin/accounts/{USERNAME}/secret"))
        .json(&json!({"secret": "rotated"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(secret.status(), 200);
    assert_eq!(
        engage(&client, &base, &[cohort_filter(77)]).await.status(),
        401
    );

    let missing = client
        .put(format!("{base}/_standin/projects/9/cohorts/1/availability"))
        .json(&json!({"state": "deleted"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(missing.status(), 404);

    let stats = json_of(
        client
            .get(format!("{base}/_standin/stats"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(stats["fault_responses"], 1);
    let records = json_of(
        client
            .get(format!("{base}/_standin/requests?route=engage"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    let records = records.as_array().expect("array");
    assert_eq!(records.len(), 4, "control calls are not recorded");
    let last_id = records.last().expect("record")["id"].as_u64().expect("id");
    let since = json_of(
        client
            .get(format!("{base}/_standin/requests?since={last_id}"))
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(since, json!([]));
}

#[tokio::test]
async fn serves_http2_prior_knowledge() {
    let mp = start(vec![cohort(1, "c", numbered(1))], MixpanelConfig::default()).await;
    common::install_crypto_provider();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .user_agent(USER_AGENT)
        .build()
        .expect("client");
    let response = engage(&client, &mp.url(), &[cohort_filter(1)]).await;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn refuses_non_loopback_address() {
    let addr = "0.0.0.0:0".parse().expect("address");
    let result =
        MixpanelStandin::start_on(addr, mixpanel_seed(Vec::new()), MixpanelConfig::default()).await;
    assert!(matches!(
        result,
        Err(standins::StandinError::NotLoopback(_))
    ));
}

#[tokio::test]
async fn fault_json_matches_page() {
    let mp = start(vec![cohort(1, "c", numbered(1500))], small_pages()).await;
    let fault: Fault = serde_json::from_value(json!({
        "route": "engage", "page": 1, "action": {"kind": "respond", "status": 500}
    }))
    .expect("fault parses");
    assert_eq!(
        fault.action,
        FaultAction::Respond {
            status: 500,
            body: None,
            retry_after: None
        }
    );
    mp.add_fault(fault);

    let client = client();
    let page0 = engage(&client, &mp.url(), &[cohort_filter(1)]).await;
    assert_eq!(page0.status(), 200);
    let session = json_of(page0).await["session_id"]
        .as_str()
        .expect("session")
        .to_string();
    let page1 = engage(
        &client,
        &mp.url(),
        &[
            cohort_filter(1),
            ("page", "1".into()),
            ("session_id", session),
        ],
    )
    .await;
    assert_eq!(page1.status(), 500);
}
