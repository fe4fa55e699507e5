use super::*;

fn access(region: Region) -> ProjectAccess {
    ProjectAccess {
        project_id: 1111,
        region,
        credentials: Credentials {
            username: "sa.user".into(),
            secret: SecretString::new("s3cret"),
        },
    }
}

fn client(endpoints: Endpoints) -> MixpanelClient {
    MixpanelClient::new(endpoints, Duration::from_secs(5)).unwrap()
}

#[test]
fn url_uses_region_host_and_project() {
    let c = client(Endpoints::production());
    let url = c.url(&access(Region::EU), "/api/query/engage");
    assert_eq!(
        url.as_str(),
        "https://eu.mixpanel.com/api/query/engage?project_id=1111"
    );
    let url = c.url(&access(Region::US), "/api/query/cohorts/list");
    assert_eq!(
        url.as_str(),
        "https://mixpanel.com/api/query/cohorts/list?project_id=1111"
    );
    let url = c.url(&access(Region::IN), "/x");
    assert_eq!(url.host_str(), Some("in.mixpanel.com"));
}

#[test]
fn url_override_applies_to_every_region() {
    let c = client(Endpoints::with_override(
        Url::parse("http://127.0.0.1:9000").unwrap(),
    ));
    let url = c.url(&access(Region::EU), "/api/query/engage");
    assert_eq!(
        url.as_str(),
        "http://127.0.0.1:9000/api/query/engage?project_id=1111"
    );
}

fn classify(status: u16, body: &str, continuing: bool) -> Error {
    Error::from_response(
        StatusCode::from_u16(status).unwrap(),
        body,
        Some(Duration::from_secs(3)),
        1111,
        continuing,
    )
}

#[test]
fn errors_are_classified_by_status_and_text() {
    assert!(matches!(
        classify(401, r#"{"error":"bad"}"#, false),
        Error::Unauthorized { status: 401, .. }
    ));
    assert!(matches!(
        classify(400, r#"{"error":"Unable to authenticate request"}"#, true),
        Error::Unauthorized { status: 400, .. }
    ));
    assert!(matches!(
        classify(403, "{}", false),
        Error::Forbidden {
            project_id: 1111,
            ..
        }
    ));
    assert!(matches!(
        classify(402, r#"{"error":"upgrade"}"#, false),
        Error::PaymentRequired { .. }
    ));
    assert!(matches!(
        classify(400, r#"{"error":"expired"}"#, true),
        Error::SessionExpired { .. }
    ));
    assert!(
        !classify(400, r#"{"error":"expired"}"#, true).is_transient(),
        "the page of an expired session is not retried"
    );
    assert!(matches!(
        classify(400, r#"{"error":"no cohort"}"#, false),
        Error::Rejected { status: 400, .. }
    ));
    assert!(matches!(
        classify(404, r#"{"error":"Missing Datagroup"}"#, false),
        Error::Rejected { status: 404, .. }
    ));
    assert!(matches!(
        classify(502, "bad gateway", false),
        Error::Server { status: 502, .. }
    ));
}

#[test]
fn rate_limit_keeps_retry_after_and_message() {
    let body = r#"{"request": "/api/query/engage?project_id=1111", "error": "Query rate limit exceeded for project_id: 1111. 5/5 queries running concurrently"}"#;
    let error = classify(429, body, false);
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
    assert!(error.is_transient());
    assert!(error.to_string().contains("Query rate limit exceeded"));
    assert!(error.to_string().contains("HTTP 429"));
}

#[test]
fn engage_page_accepts_numeric_ids_and_missing_total() {
    let page: EngagePage = serde_json::from_str(
        r#"{"page": 1, "page_size": 1000, "session_id": "s-1", "status": "ok",
            "results": [{"$distinct_id": 42, "$properties": {}}, {"$distinct_id": "u-1"}]}"#,
    )
    .unwrap();
    assert_eq!(page.total, None);
    assert_eq!(page.results.len(), 2);
    assert_eq!(page.results[0].distinct_id, Scalar::Number("42".into()));
    assert!(page.results[1].properties.is_none());
}
