//! Specs the API server must refuse, with a message naming the field.

use crate::support::*;

async fn rejected(env: &Env, yaml: &str) -> String {
    let yaml = format!("{yaml}\n---\n").replace(
        "metadata: {name:",
        &format!("metadata: {{namespace: {}, name:", env.ns()),
    );
    env.cluster
        .apply_expect_error(&yaml)
        .await
        .expect("the API server should reject the object")
}

#[tokio::test]
async fn invalid_specs_are_rejected_at_admission() -> testkit::Result<()> {
    let env = Env::new("admission").await?;
    let cases = [
        (
            "both id and name",
            sync_yaml("a", "{id: 5, name: vip}", "OneTime", ""),
            "exactly one of id or name",
        ),
        (
            "neither id nor name",
            sync_yaml("b", "{}", "OneTime", ""),
            "exactly one of id or name",
        ),
        (
            "unknown sync type",
            sync_yaml("c", "{id: 5}", "Daily", ""),
            "syncType",
        ),
        (
            "interval below minimum",
            sync_yaml("d", "{id: 5}", "Dynamic", "  interval: 30s"),
            "spec.interval must be at least 15m, got 30s",
        ),
        (
            "interval not a duration",
            sync_yaml("e", "{id: 5}", "Dynamic", "  interval: abc"),
            "spec.interval",
        ),
        (
            "interval on OneTime",
            sync_yaml("f", "{id: 5}", "OneTime", "  interval: 2h"),
            "spec.interval applies to Dynamic syncs only",
        ),
        (
            "interval beyond the duration range",
            sync_yaml(
                "i1",
                "{id: 5}",
                "Dynamic",
                "  interval: 99999999999999999999h",
            ),
            "spec.interval",
        ),
        (
            "blank custom data name",
            sync_yaml("i2", "{id: 5}", "OneTime", "  customData: {name: \"  \"}"),
            "spec.customData.name",
        ),
        (
            "empty custom data name",
            sync_yaml("g", "{id: 5}", "OneTime", "  customData: {name: \"\"}"),
            "spec.customData.name",
        ),
        (
            "missing sync type",
            sync_yaml("h", "{id: 5}", "", "").replace("syncType: \n", ""),
            "syncType",
        ),
    ];
    for (case, yaml, expected) in cases {
        let stderr = rejected(&env, &yaml).await;
        assert!(
            stderr.contains(expected),
            "{case}: expected {expected:?} in: {stderr}"
        );
    }
    let stderr = rejected(&env, &CONNECTION.replace("abc123xyz0", "ABC")).await;
    assert!(
        stderr.contains("siteCode must be the 10 lower-case letters or digits"),
        "{stderr}"
    );
    assert!(stderr.contains("\"ABC\""), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn valid_specs_are_accepted() -> testkit::Result<()> {
    let env = Env::new("admission-ok").await?;
    env.apply(&sync_yaml(
        "ok-dynamic",
        "{id: 5}",
        "Dynamic",
        "  interval: 15m",
    ))
    .await?;
    env.apply(&sync_yaml(
        "ok-onetime",
        "{name: vip}",
        "OneTime",
        "  customData: {name: VIP}",
    ))
    .await?;
    env.apply(CONNECTION).await?;
    Ok(())
}

#[tokio::test]
async fn connection_ref_is_immutable() -> testkit::Result<()> {
    let env = Env::new("admission-immutable").await?;
    env.apply(&sync_yaml("s", "{id: 5}", "OneTime", "")).await?;
    let changed =
        sync_yaml("s", "{id: 5}", "OneTime", "").replace("{name: production}", "{name: other}");
    let stderr = rejected(&env, &changed).await;
    assert!(
        stderr.contains("spec.connectionRef is immutable"),
        "{stderr}"
    );
    Ok(())
}
