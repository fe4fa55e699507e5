use crate::support::*;

#[tokio::test]
async fn one_time_sync_exports_identified_members_once() -> testkit::Result<()> {
    let mut env = Env::new("onetime").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "song-sharers",
        "{name: Song Sharers}",
        "OneTime",
        "",
    ))
    .await?;
    let sync = env
        .wait_sync("song-sharers", "first export", exported)
        .await?;
    let status = sync.status.unwrap();

    // u-200 carries a mapping id; the device id and the numeric id have no profile.
    assert_eq!(
        env.members_in_kameleoon("Song Sharers"),
        ["crm-200", "u-100", "u-300"]
    );
    let counts = status.last_attempt.as_ref().unwrap().counts.clone();
    assert_eq!(counts.exported, 3);
    assert_eq!(counts.added, 3);
    assert_eq!(counts.removed, 0);
    assert_eq!(counts.skipped_anonymous, 2);
    assert_eq!(counts.skipped_invalid, 0);
    assert_eq!(status.members, Some(3));
    assert_eq!(status.cohort.as_ref().map(|c| c.id), Some(501));
    let custom_data = env
        .kameleoon
        .custom_data_named(SITE, "Song Sharers")
        .unwrap()
        .expect("custom data created");
    assert_eq!(custom_data.format.to_string().to_uppercase(), "BOOLEAN");
    assert_eq!(
        status.custom_data.as_ref().map(|c| c.index),
        Some(i64::from(custom_data.index))
    );
    assert!(
        env.kameleoon.rejected_lines().is_empty(),
        "{:?}",
        env.kameleoon.rejected_lines()
    );
    assert!(status.next_sync_time.is_none());

    // No second export: the state stays, and so does the request count,
    // even across an operator restart.
    let requests = env.event_requests();
    env.set_members(501, &["u-900"]);
    env.start_operator(&[]).await?;
    env.operator
        .as_mut()
        .unwrap()
        .wait_for_log("Sync reconciled", TIMEOUT)
        .await?;
    assert_eq!(env.event_requests(), requests);
    assert_eq!(
        env.members_in_kameleoon("Song Sharers"),
        ["crm-200", "u-100", "u-300"]
    );
    Ok(())
}

#[tokio::test]
async fn sync_request_annotation_exports_again() -> testkit::Result<()> {
    let mut env = Env::new("onetime-request").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml("churn", "{id: 502}", "OneTime", ""))
        .await?;
    env.wait_sync("churn", "first export", exported).await?;
    assert_eq!(env.members_in_kameleoon("Churn Risk"), ["crm-200", "u-300"]);

    env.set_members(502, &["u-300", "u-400"]);
    env.cluster
        .kubectl(
            &[
                "annotate",
                "-n",
                env.ns(),
                "csync/churn",
                "cohortsync.io/sync-requested-at=2026-12-04T10:00:00Z",
            ],
            None,
        )
        .await?
        .ensure_success()?;
    let sync = env
        .wait_sync("churn", "the requested export", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.last_handled_sync_request.as_deref() != Some("2026-12-04T10:00:00Z") {
                return Err("request not handled".into());
            }
            exported(s)
        })
        .await?;
    // The second export replaced the first: u-200 (crm-200) left.
    assert_eq!(env.members_in_kameleoon("Churn Risk"), ["u-300", "u-400"]);
    assert_eq!(
        env.carrying("Churn Risk", "false")
            .into_keys()
            .collect::<Vec<_>>(),
        ["crm-200"]
    );
    let counts = sync.status.unwrap().last_attempt.unwrap().counts;
    assert_eq!((counts.exported, counts.removed), (2, 1));
    Ok(())
}

#[tokio::test]
async fn missing_cohort_name_stalls() -> testkit::Result<()> {
    let mut env = Env::new("no-cohort").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml("ghost", "{name: Nobody Here}", "OneTime", ""))
        .await?;
    let sync = env
        .wait_condition("ghost", "Stalled", "True", "CohortNotFound")
        .await?;
    let ready = sync
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.status, "False");
    assert!(
        ready.message.contains("\"Nobody Here\""),
        "{}",
        ready.message
    );
    assert_eq!(env.event_requests(), 0);
    Ok(())
}

#[tokio::test]
async fn ambiguous_cohort_name_stalls() -> testkit::Result<()> {
    let mut env = Env::new("twins").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml("twins", "{name: Twins}", "OneTime", ""))
        .await?;
    let sync = env
        .wait_condition("twins", "Stalled", "True", "CohortAmbiguous")
        .await?;
    let ready = sync
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("503") && ready.message.contains("504"),
        "{}",
        ready.message
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_wait_for_ready_works() -> testkit::Result<()> {
    let mut env = Env::new("kubectl-wait").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml("song", "{id: 501}", "OneTime", ""))
        .await?;
    env.cluster
        .kubectl(
            &[
                "wait",
                "-n",
                env.ns(),
                "--for=condition=Ready",
                "--timeout=60s",
                "csync/song",
            ],
            None,
        )
        .await?
        .ensure_success()?;
    let table = env
        .cluster
        .kubectl(&["get", "-n", env.ns(), "csync"], None)
        .await?
        .ensure_success()?;
    let header = table.stdout.lines().next().unwrap_or_default().to_string();
    for column in ["TYPE", "COHORT", "LAST SYNC", "MEMBERS", "READY", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {header}");
    }
    Ok(())
}
