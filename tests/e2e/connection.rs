use crate::support::*;

#[tokio::test]
async fn connection_becomes_connected() -> testkit::Result<()> {
    let mut env = Env::new("conn-ok").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    let connection = env
        .wait_connection("production", "Connected", "True", "Connected")
        .await?;
    let status = connection.status.unwrap();
    assert_eq!(status.site.as_ref().map(|s| s.id), Some(31337));
    condition_is(&status.conditions, "Ready", "True", "Connected").unwrap();
    assert!(status.conditions.iter().all(|c| c.type_ != "Stalled"));
    assert_eq!(status.observed_generation, connection.metadata.generation);
    Ok(())
}

#[tokio::test]
async fn wrong_kameleoon_secret_names_kameleoon() -> testkit::Result<()> {
    let mut env = Env::new("conn-km").await?;
    env.start_operator(&[]).await?;
    env.apply(&secrets_yaml("mp-secret-1", "wrong-km-secret"))
        .await?;
    env.apply(CONNECTION).await?;
    let connection = env
        .wait_connection(
            "production",
            "Connected",
            "False",
            "KameleoonCredentialsRejected",
        )
        .await?;
    let conditions = connection.status.unwrap().conditions;
    condition_is(
        &conditions,
        "Stalled",
        "True",
        "KameleoonCredentialsRejected",
    )
    .unwrap();
    let message = &conditions
        .iter()
        .find(|c| c.type_ == "Connected")
        .unwrap()
        .message;
    assert!(message.contains("Kameleoon"), "{message}");
    assert!(message.contains("kameleoon-api"), "{message}");
    assert!(
        !message.contains("wrong-km-secret"),
        "the secret leaked: {message}"
    );
    assert!(
        !env.logs().contains("wrong-km-secret"),
        "the secret leaked into the log"
    );
    Ok(())
}

#[tokio::test]
async fn wrong_mixpanel_secret_names_mixpanel() -> testkit::Result<()> {
    let mut env = Env::new("conn-mp").await?;
    env.start_operator(&[]).await?;
    env.apply(&secrets_yaml("wrong-mp-secret", "km-secret-1"))
        .await?;
    env.apply(CONNECTION).await?;
    let connection = env
        .wait_connection(
            "production",
            "Connected",
            "False",
            "MixpanelCredentialsRejected",
        )
        .await?;
    let conditions = connection.status.unwrap().conditions;
    let message = &conditions
        .iter()
        .find(|c| c.type_ == "Connected")
        .unwrap()
        .message;
    assert!(message.contains("Mixpanel"), "{message}");
    assert!(message.contains("mixpanel-service-account"), "{message}");
    assert!(
        !message.contains("wrong-mp-secret"),
        "the secret leaked: {message}"
    );
    assert!(
        !env.logs().contains("wrong-mp-secret"),
        "the secret leaked into the log"
    );
    Ok(())
}

#[tokio::test]
async fn missing_secret_recovers_once_created() -> testkit::Result<()> {
    let mut env = Env::new("conn-late-secret").await?;
    env.start_operator(&[]).await?;
    env.apply(CONNECTION).await?;
    let connection = env
        .wait_connection("production", "Connected", "False", "SecretNotFound")
        .await?;
    let message = connected_message(&connection);
    assert!(message.contains("mixpanel-service-account"), "{message}");
    // Creating the Secrets recovers without a restart; the revalidation
    // interval (30m) is far longer than the wait.
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    Ok(())
}

#[tokio::test]
async fn missing_secret_key_is_named() -> testkit::Result<()> {
    let mut env = Env::new("conn-key").await?;
    env.start_operator(&[]).await?;
    env.apply(
        r#"
apiVersion: v1
kind: Secret
metadata: {name: mixpanel-service-account}
stringData: {username: sa.growth}
---
apiVersion: v1
kind: Secret
metadata: {name: kameleoon-api}
stringData: {clientId: growth-operator, clientSecret: km-secret-1}
"#,
    )
    .await?;
    env.apply(CONNECTION).await?;
    let connection = env
        .wait_connection("production", "Connected", "False", "SecretKeyMissing")
        .await?;
    let message = connected_message(&connection);
    assert!(message.contains("\"secret\""), "{message}");
    Ok(())
}

#[tokio::test]
async fn unknown_site_code_is_reported() -> testkit::Result<()> {
    let mut env = Env::new("conn-site").await?;
    env.start_operator(&[]).await?;
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    env.apply(&CONNECTION.replace("abc123xyz0", "zzzzzzzzz9"))
        .await?;
    env.wait_connection("production", "Connected", "False", "KameleoonSiteNotFound")
        .await?;
    Ok(())
}

#[tokio::test]
async fn mapping_identifier_needs_one_on_site() -> testkit::Result<()> {
    let mut env = Env::new("conn-mapping").await?;
    // The same site, without a custom data marked as mapping identifier.
    let seed = standins::Seed::parse(&SEED.replace(
        "is_mapping_identifier: true",
        "is_mapping_identifier: false",
    ))?;
    env.kameleoon =
        standins::KameleoonStandin::start(seed.kameleoon, standins::KameleoonConfig::default())
            .await?;
    env.start_operator(&[]).await?;
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    let by_mapping = CONNECTION.replace(
        "siteCode: abc123xyz0",
        "siteCode: abc123xyz0\n    matchBy: MappingIdentifier",
    );
    env.apply(&by_mapping).await?;
    let connection = env
        .wait_connection(
            "production",
            "Connected",
            "False",
            "KameleoonMappingIdentifierMissing",
        )
        .await?;
    let message = connected_message(&connection);
    assert!(message.contains("abc123xyz0"), "{message}");
    assert!(message.contains("matchBy"), "{message}");

    // Matching by visitor code needs no mapping identifier.
    env.apply(CONNECTION).await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    Ok(())
}

/// Returns the connection of the seed with the given Mixpanel query limits.
fn connection_with_limits(per_hour: u32, concurrent: u32) -> String {
    CONNECTION.replace(
        "credentialsSecretRef: {name: mixpanel-service-account}",
        &format!(
            "credentialsSecretRef: {{name: mixpanel-service-account}}\n    \
             queriesPerHour: {per_hour}\n    maxConcurrentQueries: {concurrent}"
        ),
    )
}

#[tokio::test]
async fn raised_query_limit_unblocks_validation() -> testkit::Result<()> {
    let mut env = Env::new("conn-limits").await?;
    env.start_operator(&[]).await?;
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    env.apply(&connection_with_limits(1, 5)).await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;

    // The hour's only query is spent, so validating the next spec waits
    // for Mixpanel's budget after it has checked Kameleoon.
    let count = |requests: Vec<standins::record::RequestRecord>, path: &str| {
        requests.iter().filter(|r| r.path.ends_with(path)).count()
    };
    let sites_before = count(env.kameleoon.requests(), "/sites");
    let lists_before = count(env.mixpanel.requests(), "/cohorts/list");
    env.apply(&connection_with_limits(1, 4)).await?;
    testkit::wait_until(
        TIMEOUT,
        "the validation of generation 2 to check Kameleoon",
        async || {
            if count(env.kameleoon.requests(), "/sites") > sites_before {
                Ok(())
            } else {
                Err(testkit::anyhow::anyhow!("no site lookup yet"))
            }
        },
    )
    .await?;
    assert_eq!(
        count(env.mixpanel.requests(), "/cohorts/list"),
        lists_before
    );

    // Raising the limit releases the waiting validation and the next one.
    env.apply(&connection_with_limits(60, 4)).await?;
    testkit::wait_until(TIMEOUT, "generation 3 to be validated", async || {
        let connection = env.connections().get("production").await?;
        let status = connection.status.unwrap_or_default();
        let connected = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Connected" && c.status == "True");
        if status.observed_generation == Some(3) && connected {
            Ok(())
        } else {
            Err(testkit::anyhow::anyhow!(
                "observed generation {:?}, connected {connected}",
                status.observed_generation
            ))
        }
    })
    .await?;
    assert!(count(env.mixpanel.requests(), "/cohorts/list") > lists_before);
    Ok(())
}

#[tokio::test]
async fn rejected_export_revalidates_connection() -> testkit::Result<()> {
    let mut env = Env::new("conn-revalidate").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;

    // Kameleoon stops accepting the client secret that the Secret holds,
    // long before the connection's periodic validation (30 minutes).
    env.kameleoon
        .set_client_secret("growth-operator", "km-secret-elsewhere", true)?;
    env.apply(&sync_yaml(
        "after-rotation",
        "{id: 502}",
        "OneTime",
        "  customData: {name: mp_after_rotation}",
    ))
    .await?;
    let connection = env
        .wait_connection(
            "production",
            "Connected",
            "False",
            "KameleoonCredentialsRejected",
        )
        .await?;
    let message = connected_message(&connection);
    assert!(!message.contains("km-secret"), "{message}");
    env.wait_sync(
        "after-rotation",
        "the sync to point at the connection",
        |s| {
            condition_is(
                s.status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default(),
                "Ready",
                "False",
                "ConnectionNotReady",
            )
        },
    )
    .await?;
    Ok(())
}
