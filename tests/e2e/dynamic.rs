use crate::support::*;

/// Interval the operator uses for every Dynamic sync in these tests.
const INTERVAL: &str = "4s";

#[tokio::test]
async fn dynamic_sync_exports_again_after_interval() -> testkit::Result<()> {
    let mut env = Env::new("dynamic").await?;
    env.start_operator(&["--test-interval-override", INTERVAL])
        .await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "trial",
        "{id: 502}",
        "Dynamic",
        "  interval: 2h\n  customData: {name: mp_trial}",
    ))
    .await?;
    let first = env.wait_sync("trial", "first export", exported).await?;
    let first_time = first
        .status
        .as_ref()
        .unwrap()
        .last_successful_sync_time
        .clone()
        .unwrap();
    assert_eq!(env.members_in_kameleoon("mp_trial"), ["crm-200", "u-300"]);

    env.set_members(502, &["u-300", "u-400"]);
    let second = env
        .wait_sync("trial", "a second export", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.last_successful_sync_time.as_ref() == Some(&first_time) {
                return Err("still the first export".into());
            }
            exported(s)
        })
        .await?;
    let status = second.status.unwrap();
    let attempt = status.last_attempt.unwrap();
    assert_eq!(
        attempt.kind,
        Some(kameleoon_cohort_operator::crd::ExportKind::Differential)
    );
    assert_eq!(
        (
            attempt.counts.exported,
            attempt.counts.added,
            attempt.counts.removed
        ),
        (2, 1, 1)
    );
    assert_eq!(env.members_in_kameleoon("mp_trial"), ["u-300", "u-400"]);
    assert_eq!(
        env.carrying("mp_trial", "false")
            .into_keys()
            .collect::<Vec<_>>(),
        ["crm-200"]
    );
    let gap = status
        .last_successful_sync_time
        .unwrap()
        .0
        .duration_since(first_time.0);
    assert!(
        gap.as_secs_f64() >= 4.0,
        "exported again after {gap:?}, before the interval"
    );
    Ok(())
}

#[tokio::test]
async fn restart_does_not_export_early() -> testkit::Result<()> {
    let mut env = Env::new("restart").await?;
    env.start_operator(&["--test-interval-override", "40s"])
        .await?;
    env.connect().await?;
    env.apply(&sync_yaml("steady", "{id: 502}", "Dynamic", ""))
        .await?;
    let sync = env.wait_sync("steady", "first export", exported).await?;
    let status = sync.status.unwrap();
    let last = status.last_successful_sync_time.clone().unwrap();
    let next = status
        .next_sync_time
        .clone()
        .expect("next export scheduled");
    assert_eq!(next.0.duration_since(last.0).as_secs(), 40);

    let engage = env.engage_requests();
    let events = env.event_requests();
    env.start_operator(&["--test-interval-override", "40s"])
        .await?;
    // The restarted operator reconciles the sync at once and logs the
    // schedule it keeps; an early export would have happened before that.
    env.operator
        .as_mut()
        .unwrap()
        .wait_for_log("Sync reconciled", TIMEOUT)
        .await?;
    assert_eq!(
        env.engage_requests(),
        engage,
        "Mixpanel was read again after the restart"
    );
    assert_eq!(
        env.event_requests(),
        events,
        "Kameleoon was written again after the restart"
    );
    let after = env.syncs().get("steady").await?.status.unwrap();
    assert_eq!(after.next_sync_time, Some(next));
    assert_eq!(after.last_successful_sync_time, Some(last));
    Ok(())
}
