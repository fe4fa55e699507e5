//! Failures reported against other cohort syncs, Mixpanel and Kameleoon
//! clients and Kubernetes operators, replayed against this operator. Each
//! test checks the behaviour that the whole kind of fault calls for.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kameleoon_cohort_operator::crd::CohortSync;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use standins::faults::{Fault, Route};
use standins::kameleoon::IdentifierKind;
use standins::record::RequestRecord;
use standins::seed::{Availability, CohortSeed, GeneratorSeed, MemberSeed, ProfileSeed};
use standins::{KameleoonConfig, MixpanelConfig};
use testkit::{Operator, Result, anyhow, wait_until};

use crate::support::*;

/// Interval that replaces every Dynamic interval where a test needs exports
/// to repeat.
const SHORT_INTERVAL: &str = "3s";

/// Failure backoff base the tests run the operator with (see `Env::args`).
const BACKOFF_BASE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------
// Helpers

fn identified(id: &str) -> MemberSeed {
    MemberSeed::Profile(ProfileSeed::new(
        id,
        json!({"$email": format!("{id}@example.test")}),
    ))
}

fn profile(id: &str, properties: Value) -> MemberSeed {
    MemberSeed::Profile(ProfileSeed::new(id, properties))
}

fn cohort(id: u64, name: &str, members: Vec<MemberSeed>) -> CohortSeed {
    CohortSeed {
        id,
        name: name.to_string(),
        description: String::new(),
        created: None,
        is_visible: true,
        members,
        generate: None,
        availability: None,
    }
}

fn generated_cohort(id: u64, name: &str, count: u64) -> CohortSeed {
    CohortSeed {
        generate: Some(GeneratorSeed::new(count)),
        ..cohort(id, name, Vec::new())
    }
}

/// Engage requests the Mixpanel stand-in received for a cohort, in order.
fn engage_for(env: &Env, cohort_id: u64) -> Vec<RequestRecord> {
    env.mixpanel
        .requests()
        .into_iter()
        .filter(|r| r.route == Some(Route::Engage) && r.cohort_id == Some(cohort_id))
        .collect()
}

/// Engage requests for page 0, each the start of one read of the cohort.
fn reads_of(env: &Env, cohort_id: u64) -> usize {
    engage_for(env, cohort_id)
        .iter()
        .filter(|r| r.page == Some(0))
        .count()
}

/// Text that the operator's log lines carry for one CohortSync.
fn object_marker(env: &Env, name: &str) -> String {
    format!("cohortsync.io/{name}.{} ", env.ns())
}

/// Log lines about one CohortSync that contain `text`.
fn log_lines(env: &Env, name: &str, text: &str) -> Vec<String> {
    let marker = object_marker(env, name);
    env.logs()
        .lines()
        .filter(|line| line.contains(&marker) && line.contains(text))
        .map(str::to_string)
        .collect()
}

/// Reconciliations of one CohortSync that ran to the end.
fn reconciled(env: &Env, name: &str) -> usize {
    log_lines(env, name, "Sync reconciled").len()
}

/// Waits until the operator has logged `count` lines about a sync that contain `text`.
async fn wait_log_lines(env: &Env, name: &str, text: &str, count: usize) -> Result<Vec<String>> {
    let result = wait_until(
        TIMEOUT,
        &format!("{count} log lines about {name} with {text:?}"),
        async || {
            let lines = log_lines(env, name, text);
            if lines.len() >= count {
                Ok(lines)
            } else {
                Err(anyhow::anyhow!("{} so far", lines.len()))
            }
        },
    )
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", env.logs());
    }
    result
}

/// Waits until the operator log contains a line with every one of `parts`.
async fn wait_log_line(env: &Env, parts: &[&str]) -> Result<String> {
    let result = wait_until(TIMEOUT, &format!("a log line with {parts:?}"), async || {
        env.logs()
            .lines()
            .find(|line| parts.iter().all(|part| line.contains(part)))
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no such line yet"))
    })
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", env.logs());
    }
    result
}

/// Time at the start of a text log line.
fn line_time(line: &str) -> Timestamp {
    let stamp = line.split_whitespace().next().unwrap_or_default();
    stamp
        .parse()
        .unwrap_or_else(|e| panic!("log line without a timestamp ({e}): {line}"))
}

/// Events about one object of the test namespace.
async fn events_about(env: &Env, name: &str) -> Result<Vec<KubeEvent>> {
    let api: Api<KubeEvent> = Api::namespaced(env.cluster.client(), env.ns());
    let events = api.list(&Default::default()).await?.items;
    Ok(events
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect())
}

/// Waits for an Event about an object with the given type and reason.
async fn wait_event(env: &Env, name: &str, type_: &str, reason: &str) -> Result<KubeEvent> {
    wait_until(
        TIMEOUT,
        &format!("a {type_} Event {reason} about {name}"),
        async || {
            let events = events_about(env, name).await?;
            let seen: Vec<String> = events
                .iter()
                .map(|e| format!("{:?}/{:?}", e.type_, e.reason))
                .collect();
            events
                .into_iter()
                .find(|e| e.type_.as_deref() == Some(type_) && e.reason.as_deref() == Some(reason))
                .ok_or_else(|| anyhow::anyhow!("events so far: {seen:?}"))
        },
    )
    .await
}

fn conditions(sync: &CohortSync) -> &[Condition] {
    sync.status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default()
}

fn condition<'a>(sync: &'a CohortSync, type_: &str) -> Option<&'a Condition> {
    conditions(sync).iter().find(|c| c.type_ == type_)
}

fn counts(sync: &CohortSync) -> kameleoon_cohort_operator::crd::ExportCounts {
    sync.status
        .as_ref()
        .and_then(|s| s.last_attempt.as_ref())
        .map(|a| a.counts.clone())
        .unwrap_or_default()
}

/// Checks what the kstatus convention and GitOps tools need from every
/// condition: the generation it describes, a transition time, a CamelCase
/// reason and a message.
fn assert_conditions_complete(sync: &CohortSync) {
    let generation = sync.metadata.generation;
    for c in conditions(sync) {
        assert!(
            c.observed_generation.is_some(),
            "{} has no observedGeneration",
            c.type_
        );
        assert!(
            c.observed_generation <= generation,
            "{} describes a future generation",
            c.type_
        );
        assert!(
            c.last_transition_time.0 > Timestamp::UNIX_EPOCH,
            "{} has no lastTransitionTime",
            c.type_
        );
        let camel = c
            .reason
            .chars()
            .next()
            .is_some_and(|f| f.is_ascii_uppercase())
            && c.reason.chars().all(|ch| ch.is_ascii_alphanumeric());
        assert!(camel, "{} reason {:?} is not CamelCase", c.type_, c.reason);
        assert!(
            !c.message.trim().is_empty(),
            "{} has an empty message",
            c.type_
        );
    }
}

async fn kubectl(env: &Env, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", env.ns()];
    full.extend_from_slice(args);
    Ok(env
        .cluster
        .kubectl(&full, None)
        .await?
        .ensure_success()?
        .stdout)
}

async fn merge_patch_spec(env: &Env, name: &str, spec: Value) -> Result<()> {
    env.syncs()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": spec})),
        )
        .await?;
    Ok(())
}

async fn wait_deleted(env: &Env, name: &str) -> Result<()> {
    let api = env.syncs();
    let result = wait_until(
        TIMEOUT,
        &format!("{name} to be deleted"),
        async || match api.get_opt(name).await? {
            None => Ok(()),
            Some(sync) => Err(anyhow::anyhow!(
                "still there with finalizers {:?}; status {}",
                sync.metadata.finalizers,
                status_json(&sync)
            )),
        },
    )
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", env.logs());
    }
    result
}

/// Identifiers of one kind that carry any value for a custom data.
fn identifiers(env: &Env, custom_data: &str, kind: IdentifierKind) -> Vec<String> {
    let Some(data) = env.kameleoon.custom_data_named(SITE, custom_data).unwrap() else {
        return Vec::new();
    };
    let values = env.kameleoon.state(SITE, data.index).unwrap();
    let map = match kind {
        IdentifierKind::VisitorCode => values.visitor_codes,
        IdentifierKind::MappingValue => values.mapping_values,
    };
    map.into_keys().collect()
}

fn mapping_values_with(env: &Env, custom_data: &str, value: &str) -> Vec<String> {
    let Some(data) = env.kameleoon.custom_data_named(SITE, custom_data).unwrap() else {
        return Vec::new();
    };
    let values = env.kameleoon.state(SITE, data.index).unwrap();
    values
        .with_value(IdentifierKind::MappingValue, value)
        .into_iter()
        .collect()
}

/// A connection to the seed's project and site under another name.
fn connection_yaml(name: &str, match_by: &str) -> String {
    format!(
        r#"
apiVersion: cohortsync.io/v1alpha1
kind: KameleoonConnection
metadata: {{name: {name}}}
spec:
  kameleoon:
    siteCode: abc123xyz0
    credentialsSecretRef: {{name: kameleoon-api}}
    matchBy: {match_by}
  mixpanel:
    projectId: 1111
    credentialsSecretRef: {{name: mixpanel-service-account}}
"#
    )
}

fn sync_via(connection: &str, name: &str, cohort: &str, sync_type: &str, extra: &str) -> String {
    sync_yaml(name, cohort, sync_type, extra).replace(
        "connectionRef: {name: production}",
        &format!("connectionRef: {{name: {connection}}}"),
    )
}

fn rfc3339(time: &Timestamp) -> String {
    time.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

// ---------------------------------------------------------------------------
// Membership and identifiers

#[tokio::test]
async fn shared_member_is_exported_for_each_cohort() -> Result<()> {
    let mut env = Env::new("shared-member").await?;
    env.set_members(501, &["u-100", "u-200"]);
    env.set_members(502, &["u-200", "u-300"]);
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&format!(
        "{}---{}",
        sync_yaml(
            "vip",
            "{id: 501}",
            "OneTime",
            "  customData: {name: mp_vip}"
        ),
        sync_yaml(
            "churn-risk",
            "{id: 502}",
            "OneTime",
            "  customData: {name: mp_churn_risk}"
        )
    ))
    .await?;
    let vip = env.wait_sync("vip", "vip exported", exported).await?;
    let churn = env
        .wait_sync("churn-risk", "churn-risk exported", exported)
        .await?;

    // u-200 belongs to both cohorts: neither export may drop it.
    assert_eq!(counts(&vip).exported, 2);
    assert_eq!(counts(&churn).exported, 2);
    assert_eq!(counts(&vip).duplicates, 0);
    assert_eq!(counts(&churn).duplicates, 0);
    assert_eq!(env.members_in_kameleoon("mp_vip"), ["u-100", "u-200"]);
    assert_eq!(
        env.members_in_kameleoon("mp_churn_risk"),
        ["u-200", "u-300"]
    );
    assert!(env.kameleoon.rejected_lines().is_empty());
    Ok(())
}

#[tokio::test]
async fn overlong_identifiers_are_skipped_with_warning() -> Result<()> {
    let mut env = Env::new("long-ids").await?;
    let at_sdk_limit = "a".repeat(255);
    let over_sdk_limit = "b".repeat(256);
    env.mixpanel.set_cohort(
        PROJECT,
        cohort(
            601,
            "Long ids",
            vec![
                profile(&at_sdk_limit, json!({"$email": "x@ex.test"})),
                profile(&over_sdk_limit, json!({"$email": "y@ex.test"})),
                profile("u-ok", json!({"$name": "Ok"})),
                // An empty mapping id falls back to the distinct id instead of
                // sending an empty identifier.
                profile("u-map", json!({"$kameleoon_mapping_id": ""})),
            ],
        ),
    )?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&connection_yaml("by-mapping", "MappingIdentifier"))
        .await?;
    env.apply(&format!(
        "{}---{}",
        sync_yaml(
            "by-visitor-code",
            "{id: 601}",
            "OneTime",
            "  customData: {name: mp_long_vc}"
        ),
        sync_via(
            "by-mapping",
            "by-mapping-value",
            "{id: 601}",
            "OneTime",
            "  customData: {name: mp_long_map}"
        )
    ))
    .await?;

    // The Data API reference limits visitor codes to 100 characters, and the
    // product keeps that limit rather than the SDKs' 255. So both long ids
    // are skipped.
    let by_code = env
        .wait_sync("by-visitor-code", "visitor code export", exported)
        .await?;
    assert_eq!(counts(&by_code).exported, 2);
    assert_eq!(counts(&by_code).skipped_invalid, 2);
    assert_eq!(env.members_in_kameleoon("mp_long_vc"), ["u-map", "u-ok"]);

    // Mapping values follow the SDK limit of 255 characters.
    let by_mapping = env
        .wait_sync("by-mapping-value", "mapping value export", exported)
        .await?;
    assert_eq!(counts(&by_mapping).exported, 3);
    assert_eq!(counts(&by_mapping).skipped_invalid, 1);
    let mut expected = vec![
        at_sdk_limit.clone(),
        "u-map".to_string(),
        "u-ok".to_string(),
    ];
    expected.sort();
    assert_eq!(mapping_values_with(&env, "mp_long_map", "true"), expected);
    assert!(identifiers(&env, "mp_long_map", IdentifierKind::VisitorCode).is_empty());

    assert!(
        env.kameleoon.rejected_lines().is_empty(),
        "{:?}",
        env.kameleoon.rejected_lines()
    );
    for (name, skipped) in [("by-visitor-code", 2), ("by-mapping-value", 1)] {
        let event = wait_event(&env, name, "Warning", "IdentifierTooLong").await?;
        let note = event.note.unwrap_or_default();
        assert!(
            note.contains(&format!("Skipped {skipped} members")),
            "{note}"
        );
        assert!(
            !note.contains(&over_sdk_limit),
            "the note prints a whole id: {note}"
        );
        assert!(
            !note.contains(&at_sdk_limit),
            "the note prints a whole id: {note}"
        );
        assert!(
            !env.logs().contains(&over_sdk_limit),
            "the log prints a whole id"
        );
    }
    Ok(())
}

#[tokio::test]
async fn device_only_profiles_are_never_exported() -> Result<()> {
    let mut env = Env::new("device-ids").await?;
    env.mixpanel.set_cohort(
        PROJECT,
        cohort(
            1101,
            "Identified only",
            vec![
                // A device id with a profile: transferred by Mixpanel, but
                // Kameleoon cannot match it to a user.
                profile("$device:7f3a-11", json!({"$browser": "Chrome"})),
                // A device id without a profile: never transferred.
                MemberSeed::Id("$device:0d4e-55".into()),
                profile("user-42", json!({"$user_id": "user-42"})),
                profile(
                    "$device:9c2b-77",
                    json!({"$kameleoon_mapping_id": "crm-77"}),
                ),
            ],
        ),
    )?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "identified",
        "{id: 1101}",
        "OneTime",
        "  customData: {name: mp_identified}",
    ))
    .await?;
    let sync = env
        .wait_sync("identified", "identified export", exported)
        .await?;
    assert_eq!(counts(&sync).exported, 2);
    assert_eq!(counts(&sync).skipped_anonymous, 2);
    assert_eq!(counts(&sync).skipped_invalid, 0);
    assert_eq!(
        env.members_in_kameleoon("mp_identified"),
        ["crm-77", "user-42"]
    );
    for kind in [IdentifierKind::VisitorCode, IdentifierKind::MappingValue] {
        for id in identifiers(&env, "mp_identified", kind) {
            assert!(!id.starts_with("$device:"), "Kameleoon received {id}");
        }
    }
    assert!(env.kameleoon.rejected_lines().is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------
// Mixpanel reads

#[tokio::test]
async fn engage_paging_reads_every_page_and_stops() -> Result<()> {
    let mut env = Env::new("paging").await?;
    env.mixpanel
        .set_cohort(PROJECT, generated_cohort(1401, "Partial last page", 2500))?;
    env.mixpanel
        .set_cohort(PROJECT, generated_cohort(1402, "Full last page", 2000))?;
    env.mixpanel
        .set_cohort(PROJECT, cohort(1403, "No members", Vec::new()))?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&format!(
        "{}---{}---{}",
        sync_yaml(
            "partial",
            "{id: 1401}",
            "OneTime",
            "  customData: {name: mp_partial}"
        ),
        sync_yaml(
            "full",
            "{id: 1402}",
            "OneTime",
            "  customData: {name: mp_full}"
        ),
        sync_yaml(
            "empty",
            "{id: 1403}",
            "OneTime",
            "  customData: {name: mp_empty}"
        ),
    ))
    .await?;

    let partial = env.wait_sync("partial", "2,500 profiles", exported).await?;
    assert_eq!(counts(&partial).exported, 2500);
    let first_read = engage_for(&env, 1401);
    let pages: Vec<_> = first_read.iter().map(|r| r.page).collect();
    assert_eq!(pages, [Some(0), Some(1), Some(2)]);
    // The stand-in returns 400 to a follow-up page without the session of
    // page 0, so 200 on every page shows the session was passed on.
    assert!(first_read.iter().all(|r| r.status == 200), "{first_read:?}");
    let session = first_read[0]
        .session_id
        .clone()
        .expect("page 0 opens a session");
    assert!(
        first_read
            .iter()
            .all(|r| r.session_id.as_ref() == Some(&session))
    );

    // A multiple of the page size ends with an empty page, and no further.
    let full = env.wait_sync("full", "2,000 profiles", exported).await?;
    assert_eq!(counts(&full).exported, 2000);
    let pages: Vec<_> = engage_for(&env, 1402).iter().map(|r| r.page).collect();
    assert_eq!(pages, [Some(0), Some(1), Some(2)]);

    let empty = env.wait_sync("empty", "no profiles", exported).await?;
    assert_eq!(counts(&empty).exported, 0);
    assert_eq!(counts(&empty).removed, 0);
    assert_eq!(engage_for(&env, 1403).len(), 1);

    // A second read of the same cohort opens its own session.
    kubectl(
        &env,
        &[
            "annotate",
            "csync/partial",
            "cohortsync.io/sync-requested-at=again",
        ],
    )
    .await?;
    let again = env
        .wait_sync("partial", "the requested second export", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.last_handled_sync_request.as_deref() != Some("again") {
                return Err("request not handled".into());
            }
            exported(s)
        })
        .await?;
    assert_eq!(counts(&again).exported, 2500);
    let second_read: Vec<_> = engage_for(&env, 1401).into_iter().skip(3).collect();
    let pages: Vec<_> = second_read.iter().map(|r| r.page).collect();
    assert_eq!(pages, [Some(0), Some(1), Some(2)]);
    assert!(
        second_read.iter().all(|r| r.status == 200),
        "{second_read:?}"
    );
    let new_session = second_read[0]
        .session_id
        .clone()
        .expect("page 0 opens a session");
    assert_ne!(
        new_session, session,
        "the second read reused the old session"
    );
    assert!(
        second_read
            .iter()
            .all(|r| r.session_id.as_ref() == Some(&new_session))
    );
    Ok(())
}

#[tokio::test]
async fn parallel_syncs_stay_within_project_concurrency() -> Result<()> {
    let config = MixpanelConfig {
        page_size: 50,
        ..MixpanelConfig::default()
    };
    let mut env = Env::with("concurrency", config, KameleoonConfig::default()).await?;
    for id in 901..=908 {
        env.mixpanel
            .set_cohort(PROJECT, generated_cohort(id, &format!("Cohort {id}"), 75))?;
    }
    // Every query keeps a stand-in slot busy for a while, so that reads overlap.
    env.mixpanel
        .add_fault(Fault::delay(Route::Engage, 300).times(0));
    // Let every sync start its export at once: only the query budget of the
    // Mixpanel project can keep the reads within its limit.
    env.start_operator(&["--exports-per-project", "8"]).await?;
    env.connect().await?;
    // Two connections to the same project share its allowance.
    env.apply(&connection_yaml("production-b", "VisitorCode"))
        .await?;
    let manifests: Vec<String> = (901..=908)
        .map(|id| {
            let connection = if id % 2 == 0 {
                "production"
            } else {
                "production-b"
            };
            sync_via(
                connection,
                &format!("s{id}"),
                &format!("{{id: {id}}}"),
                "OneTime",
                &format!("  customData: {{name: mp_{id}}}"),
            )
        })
        .collect();
    env.apply(&manifests.join("---")).await?;
    for id in 901..=908 {
        let sync = env.wait_sync(&format!("s{id}"), "export", exported).await?;
        assert_eq!(counts(&sync).exported, 75, "s{id}");
        let pages: Vec<_> = engage_for(&env, id).iter().map(|r| r.page).collect();
        assert_eq!(
            pages,
            [Some(0), Some(1)],
            "cohort {id} is read in two pages"
        );
    }

    let stats = env.mixpanel.project_stats(PROJECT).expect("project stats");
    assert!(
        stats.max_in_flight <= 5,
        "{} queries ran at once",
        stats.max_in_flight
    );
    assert!(
        stats.max_in_flight >= 2,
        "reads never overlapped, so the limit was not exercised"
    );
    assert_eq!(stats.rejected_concurrent, 0);
    assert_eq!(env.mixpanel.stats().rate_limited, 0);
    Ok(())
}

#[tokio::test]
async fn deleted_cohort_keeps_exported_members() -> Result<()> {
    let mut env = Env::new("deleted-cohort").await?;
    env.mixpanel.set_cohort(
        PROJECT,
        cohort(
            1301,
            "Promo",
            vec![identified("u-1"), identified("u-2"), identified("u-3")],
        ),
    )?;
    env.start_operator(&["--test-interval-override", SHORT_INTERVAL])
        .await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "promo",
        "{id: 1301}",
        "Dynamic",
        "  customData: {name: mp_promo}",
    ))
    .await?;
    let first = env.wait_sync("promo", "first export", exported).await?;
    let first_success = first
        .status
        .as_ref()
        .unwrap()
        .last_successful_sync_time
        .clone();
    assert_eq!(env.members_in_kameleoon("mp_promo"), ["u-1", "u-2", "u-3"]);

    env.mixpanel
        .set_cohort_availability(PROJECT, 1301, Availability::Deleted)?;
    let stalled = env
        .wait_condition("promo", "Stalled", "True", "CohortNotFound")
        .await?;
    let ready = condition(&stalled, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "CohortNotFound");
    assert!(ready.message.contains("1301"), "{}", ready.message);
    assert!(condition(&stalled, "Reconciling").is_none());
    wait_event(&env, "promo", "Warning", "CohortNotFound").await?;

    // A deleted cohort is not an empty one: no member was cleared.
    assert_eq!(env.members_in_kameleoon("mp_promo"), ["u-1", "u-2", "u-3"]);
    assert!(env.carrying("mp_promo", "false").is_empty());

    // Failed attempts back off instead of retrying at once.
    let failures = wait_log_lines(&env, "promo", "Export failed", 2).await?;
    let gap = line_time(&failures[1]).duration_since(line_time(&failures[0]));
    assert!(
        gap >= SignedDuration::try_from(BACKOFF_BASE).unwrap(),
        "retried after {gap:?}"
    );
    assert_eq!(env.members_in_kameleoon("mp_promo"), ["u-1", "u-2", "u-3"]);
    // The very first failure already reports the deletion, although the
    // cohort list cached before the deletion still named the cohort.
    for line in &failures {
        assert!(line.contains(r#"reason="CohortNotFound""#), "{line}");
    }

    env.mixpanel
        .set_cohort_availability(PROJECT, 1301, Availability::Available)?;
    let restored = env
        .wait_sync("promo", "an export after the cohort came back", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.last_successful_sync_time == first_success {
                return Err("no new export yet".into());
            }
            condition_is(&status.conditions, "Ready", "True", "Succeeded")
        })
        .await?;
    assert!(condition(&restored, "Stalled").is_none());
    assert_eq!(env.members_in_kameleoon("mp_promo"), ["u-1", "u-2", "u-3"]);
    Ok(())
}

#[tokio::test]
async fn unavailable_cohort_stalls_only_its_sync() -> Result<()> {
    let mut env = Env::new("unavailable-cohort").await?;
    env.mixpanel.set_cohort(
        PROJECT,
        cohort(1501, "Fine", vec![identified("u-1"), identified("u-2")]),
    )?;
    env.mixpanel.set_cohort(
        PROJECT,
        CohortSeed {
            availability: Some(Availability::Unavailable {
                status: 404,
                error: "Missing Datagroup for cohort 1502".into(),
            }),
            ..cohort(
                1502,
                "Tied to a deleted data group",
                vec![identified("u-3")],
            )
        },
    )?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&format!(
        "{}---{}",
        sync_yaml("ok", "{id: 1501}", "OneTime", "  customData: {name: mp_ok}"),
        sync_yaml(
            "broken",
            "{id: 1502}",
            "OneTime",
            "  customData: {name: mp_broken}"
        )
    ))
    .await?;

    let ok = env.wait_sync("ok", "the good cohort", exported).await?;
    assert_eq!(counts(&ok).exported, 2);
    assert_eq!(env.members_in_kameleoon("mp_ok"), ["u-1", "u-2"]);

    let broken = env
        .wait_condition("broken", "Stalled", "True", "CohortUnavailable")
        .await?;
    let ready = condition(&broken, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "CohortUnavailable");
    assert!(
        ready.message.contains("Missing Datagroup for cohort 1502"),
        "the message should quote Mixpanel: {}",
        ready.message
    );
    let event = wait_event(&env, "broken", "Warning", "CohortUnavailable").await?;
    assert!(event.note.unwrap_or_default().contains("Missing Datagroup"));

    // One bad cohort is not a connection fault.
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;

    // Retries back off rather than loop.
    let failures = wait_log_lines(&env, "broken", "Export failed", 2).await?;
    let gap = line_time(&failures[1]).duration_since(line_time(&failures[0]));
    assert!(
        gap >= SignedDuration::try_from(BACKOFF_BASE).unwrap(),
        "retried after {gap:?}"
    );
    let ok = env.syncs().get("ok").await?;
    assert!(exported(&ok).is_ok(), "{}", status_json(&ok));
    Ok(())
}

// ---------------------------------------------------------------------------
// Watches, triggers and status

#[tokio::test]
async fn status_and_label_edits_do_not_export() -> Result<()> {
    let mut env = Env::new("own-writes").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "sched",
        "{id: 502}",
        "Dynamic",
        "  interval: 2h\n  customData: {name: mp_sched}",
    ))
    .await?;
    let first = env.wait_sync("sched", "first export", exported).await?;
    let last_success = first
        .status
        .as_ref()
        .unwrap()
        .last_successful_sync_time
        .clone()
        .unwrap();
    wait_log_lines(&env, "sched", "Sync reconciled", 1).await?;
    let reconciliations = reconciled(&env, "sched");
    assert_eq!(reads_of(&env, 502), 1);

    // A second writer adds a condition of its own through the status
    // subresource, and someone labels the object.
    let foreign = json!({
        "apiVersion": "cohortsync.io/v1alpha1",
        "kind": "CohortSync",
        "status": {"conditions": [{
            "type": "ExternalCheck",
            "status": "True",
            "reason": "Checked",
            "message": "checked by another controller",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]},
    });
    env.syncs()
        .patch_status(
            "sched",
            &PatchParams::apply("second-writer"),
            &Patch::Apply(foreign),
        )
        .await?;
    kubectl(&env, &["label", "csync/sched", "team=growth"]).await?;

    // The watch delivers events in order, so once a sync created after the
    // two edits has exported, the operator has seen both edits.
    env.apply(&sync_yaml(
        "canary",
        "{id: 503}",
        "OneTime",
        "  customData: {name: mp_canary}",
    ))
    .await?;
    env.wait_sync("canary", "the canary export", exported)
        .await?;
    wait_log_lines(&env, "canary", "Sync reconciled", 1).await?;
    assert_eq!(
        reconciled(&env, "sched"),
        reconciliations,
        "an own or foreign status edit reconciled the sync"
    );
    assert_eq!(reads_of(&env, 502), 1, "the sync exported again");
    let sched = env.syncs().get("sched").await?;
    assert!(condition(&sched, "ExternalCheck").is_some());

    // A new interval only reschedules.
    merge_patch_spec(&env, "sched", json!({"interval": "3h"})).await?;
    let rescheduled = env
        .wait_sync("sched", "the new interval", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.observed_generation != s.metadata.generation {
                return Err("generation not observed yet".into());
            }
            condition_is(&status.conditions, "Ready", "True", "Succeeded")
        })
        .await?;
    let status = rescheduled.status.unwrap();
    let next = status.next_sync_time.expect("next export scheduled").0;
    assert_eq!(
        next.duration_since(last_success.0),
        SignedDuration::from_hours(3)
    );
    assert_eq!(status.last_successful_sync_time, Some(last_success));
    assert_eq!(reads_of(&env, 502), 1, "a new interval exported");

    // A new cohort exports once.
    merge_patch_spec(&env, "sched", json!({"cohort": {"id": 501}})).await?;
    let moved = env
        .wait_sync("sched", "the export of the new cohort", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.cohort.as_ref().map(|c| c.id) != Some(501) {
                return Err("still the old cohort".into());
            }
            exported(s)
        })
        .await?;
    assert_eq!(
        moved.status.as_ref().unwrap().cohort.as_ref().unwrap().id,
        501
    );
    env.apply(&sync_yaml(
        "canary-2",
        "{id: 503}",
        "OneTime",
        "  customData: {name: mp_canary_2}",
    ))
    .await?;
    env.wait_sync("canary-2", "the second canary export", exported)
        .await?;
    assert_eq!(
        reads_of(&env, 501),
        1,
        "the new cohort was read more than once"
    );
    assert_eq!(reads_of(&env, 502), 1);
    assert_eq!(
        env.members_in_kameleoon("mp_sched"),
        ["crm-200", "u-100", "u-300"]
    );
    Ok(())
}

#[tokio::test]
async fn sync_waits_for_connection_created_later() -> Result<()> {
    let mut env = Env::new("late-connection").await?;
    env.start_operator(&[]).await?;
    env.apply(&format!(
        "{}---{}",
        sync_via(
            "conn-late",
            "early",
            "{id: 502}",
            "OneTime",
            "  customData: {name: mp_early}"
        ),
        sync_via(
            "never-created",
            "early-clear",
            "{id: 502}",
            "OneTime",
            "  deletionPolicy: Clear"
        ),
    ))
    .await?;

    // The operator watches connections, so a missing one needs a person (or
    // a GitOps tool) to create it and is reported as Stalled, not retried.
    let waiting = env
        .wait_condition("early", "Stalled", "True", "ConnectionNotFound")
        .await?;
    let ready = condition(&waiting, "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "ConnectionNotFound");
    assert!(ready.message.contains("conn-late"), "{}", ready.message);
    assert_conditions_complete(&waiting);
    let event = wait_event(&env, "early", "Warning", "ConnectionNotFound").await?;
    let note = event.note.unwrap_or_default();
    assert!(note.contains("conn-late"), "{note}");

    // Nothing was exported, so deletion has nothing to clean up.
    env.wait_condition("early-clear", "Stalled", "True", "ConnectionNotFound")
        .await?;
    env.syncs()
        .delete("early-clear", &DeleteParams::default())
        .await?;
    wait_deleted(&env, "early-clear").await?;

    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    env.apply(&connection_yaml("conn-late", "VisitorCode"))
        .await?;
    let connection = env
        .wait_connection("conn-late", "Connected", "True", "Connected")
        .await?;
    let connected_at = connection
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Connected"))
        .map(|c| c.last_transition_time.0)
        .unwrap();
    let sync = env.wait_sync("early", "the export", exported).await?;
    let exported_at = sync
        .status
        .as_ref()
        .unwrap()
        .last_successful_sync_time
        .clone()
        .unwrap()
        .0;
    // Well below the five minutes after which a blocked sync looks again.
    assert!(
        exported_at.duration_since(connected_at) < SignedDuration::from_secs(30),
        "exported {:?} after the connection was Connected",
        exported_at.duration_since(connected_at)
    );
    assert_eq!(env.members_in_kameleoon("mp_early"), ["crm-200", "u-300"]);
    assert!(log_lines(&env, "early", "Reconciliation failed").is_empty());
    Ok(())
}

#[tokio::test]
async fn status_reports_observed_generation_during_export() -> Result<()> {
    let mut env = Env::new("observed-generation").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "gitops",
        "{id: 502}",
        "OneTime",
        "  customData: {name: mp_gitops_1}",
    ))
    .await?;
    let done = env.wait_sync("gitops", "first export", exported).await?;
    assert_eq!(done.status.as_ref().unwrap().observed_generation, Some(1));
    assert_conditions_complete(&done);

    env.mixpanel.add_fault(Fault::delay(Route::Engage, 5000));
    merge_patch_spec(
        &env,
        "gitops",
        json!({"customData": {"name": "mp_gitops_2"}}),
    )
    .await?;
    let running = env
        .wait_sync("gitops", "the export of generation 2 in progress", |s| {
            if s.metadata.generation != Some(2) {
                return Err("generation 2 not created yet".into());
            }
            let status = s.status.as_ref().ok_or("no status")?;
            condition_is(&status.conditions, "Reconciling", "True", "")?;
            condition_is(&status.conditions, "Ready", "Unknown", "Progressing")
        })
        .await?;
    // Until the export ends, status reports that it describes generation 1.
    assert_eq!(
        running.status.as_ref().unwrap().observed_generation,
        Some(1)
    );
    assert!(condition(&running, "Stalled").is_none());
    assert_conditions_complete(&running);

    let done = env
        .wait_sync("gitops", "generation 2 exported", exported)
        .await?;
    let status = done.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, Some(2));
    assert!(condition(&done, "Reconciling").is_none());
    assert!(condition(&done, "Stalled").is_none());
    for c in conditions(&done) {
        assert_eq!(c.observed_generation, Some(2), "{}", c.type_);
    }
    assert_conditions_complete(&done);
    assert_eq!(
        env.members_in_kameleoon("mp_gitops_2"),
        ["crm-200", "u-300"]
    );
    Ok(())
}

#[tokio::test]
async fn restart_keeps_recorded_schedule() -> Result<()> {
    let mut env = Env::new("restart-schedule").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&format!(
        "{}---{}---{}",
        sync_yaml(
            "dyn",
            "{id: 502}",
            "Dynamic",
            "  interval: 2h\n  customData: {name: mp_dyn}"
        ),
        sync_yaml(
            "dyn2",
            "{id: 501}",
            "Dynamic",
            "  interval: 2h\n  customData: {name: mp_dyn2}"
        ),
        sync_yaml(
            "once",
            "{id: 503}",
            "OneTime",
            "  customData: {name: mp_once}"
        ),
    ))
    .await?;
    for name in ["dyn", "dyn2", "once"] {
        env.wait_sync(name, "first export", exported).await?;
    }
    let once_before = env.syncs().get("once").await?.status.unwrap();
    env.stop_operator().await?;

    // Pretend the last exports ran earlier: `dyn` half an hour ago and
    // `dyn2` three hours ago, past its interval of two hours.
    let now = Timestamp::now();
    let half_hour_ago = rfc3339(&(now - SignedDuration::from_mins(30)));
    let three_hours_ago = rfc3339(&(now - SignedDuration::from_hours(3)));
    for (name, time) in [("dyn", &half_hour_ago), ("dyn2", &three_hours_ago)] {
        env.syncs()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"lastSuccessfulSyncTime": time}})),
            )
            .await?;
    }
    let reads = (
        reads_of(&env, 502),
        reads_of(&env, 501),
        reads_of(&env, 503),
    );

    // The restarted operator runs in a time zone three and a half hours
    // behind UTC; status and messages must still be in UTC.
    env.operator_args = env.args(&[]);
    let args: Vec<&str> = env.operator_args.iter().map(String::as_str).collect();
    let kubeconfig = env.cluster.kubeconfig_path().to_string_lossy().to_string();
    env.operator = Some(Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[("KUBECONFIG", &kubeconfig), ("TZ", "America/St_Johns")],
    )?);

    let overdue = env
        .wait_sync("dyn2", "the overdue export", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            let last = status
                .last_successful_sync_time
                .as_ref()
                .ok_or("never exported")?;
            if rfc3339(&last.0) == three_hours_ago {
                return Err("not exported again yet".into());
            }
            condition_is(&status.conditions, "Ready", "True", "Succeeded")
        })
        .await?
        .status
        .unwrap();
    let last = overdue.last_successful_sync_time.unwrap().0;
    let next = overdue.next_sync_time.expect("next export of dyn2").0;
    assert_eq!(next.duration_since(last), SignedDuration::from_hours(2));

    wait_log_lines(&env, "dyn", "Sync reconciled", 1).await?;
    wait_log_lines(&env, "once", "Sync reconciled", 1).await?;
    wait_log_lines(&env, "dyn2", "Sync reconciled", 1).await?;
    assert_eq!(
        reads_of(&env, 502),
        reads.0,
        "dyn exported early after the restart"
    );
    assert_eq!(
        reads_of(&env, 501),
        reads.1 + 1,
        "dyn2 was not exported exactly once"
    );
    assert_eq!(
        reads_of(&env, 503),
        reads.2,
        "the OneTime sync exported again"
    );

    let dyn_status = env.syncs().get("dyn").await?.status.unwrap();
    let next = dyn_status.next_sync_time.expect("next export of dyn").0;
    assert_eq!(
        rfc3339(&next),
        rfc3339(&(half_hour_ago.parse::<Timestamp>().unwrap() + SignedDuration::from_hours(2)))
    );
    let ready = dyn_status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready
            .message
            .contains(&format!("next export at {}", rfc3339(&next))),
        "{}",
        ready.message
    );
    let once_after = env.syncs().get("once").await?.status.unwrap();
    assert_eq!(
        once_after.last_successful_sync_time,
        once_before.last_successful_sync_time
    );
    assert_eq!(
        once_after.last_exported_generation,
        once_before.last_exported_generation
    );
    assert!(once_after.next_sync_time.is_none());
    Ok(())
}

// ---------------------------------------------------------------------------
// Suspension

#[tokio::test]
async fn suspended_sync_is_frozen_but_deletable() -> Result<()> {
    let mut env = Env::new("suspend").await?;
    env.start_operator(&["--test-interval-override", SHORT_INTERVAL])
        .await?;
    env.connect().await?;
    env.apply(&format!(
        "{}---{}",
        sync_yaml(
            "paused",
            "{id: 502}",
            "Dynamic",
            "  customData: {name: mp_paused}\n  deletionPolicy: Clear"
        ),
        sync_yaml(
            "ticker",
            "{id: 503}",
            "Dynamic",
            "  customData: {name: mp_ticker}"
        ),
    ))
    .await?;
    env.wait_sync("paused", "first export", exported).await?;
    assert_eq!(env.members_in_kameleoon("mp_paused"), ["crm-200", "u-300"]);

    merge_patch_spec(&env, "paused", json!({"suspend": true})).await?;
    let suspended = env
        .wait_condition("paused", "Ready", "True", "Suspended")
        .await?;
    // Ready keeps its status, and nothing looks in progress or stuck.
    assert!(condition(&suspended, "Reconciling").is_none());
    assert!(condition(&suspended, "Stalled").is_none());
    assert!(suspended.status.as_ref().unwrap().next_sync_time.is_none());
    assert_conditions_complete(&suspended);
    let wide = kubectl(&env, &["get", "csync/paused", "-o", "wide"]).await?;
    assert!(
        wide.lines()
            .next()
            .unwrap_or_default()
            .contains("SUSPENDED"),
        "{wide}"
    );
    assert!(wide.contains("true"), "{wide}");
    let reads = reads_of(&env, 502);

    env.set_members(502, &["u-300", "u-400"]);
    // `ticker` exports every interval, so two more of its exports show that
    // more than an interval went by.
    let ticks = reads_of(&env, 503);
    wait_until(TIMEOUT, "two more ticker exports", async || {
        let now = reads_of(&env, 503);
        if now >= ticks + 2 {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "{} ticker exports since suspension",
                now - ticks
            ))
        }
    })
    .await?;
    assert_eq!(reads_of(&env, 502), reads, "a suspended sync read Mixpanel");
    assert_eq!(env.members_in_kameleoon("mp_paused"), ["crm-200", "u-300"]);
    let still = env.syncs().get("paused").await?;
    assert!(condition_is(conditions(&still), "Ready", "True", "Suspended").is_ok());

    // Resuming an overdue sync exports at once.
    merge_patch_spec(&env, "paused", json!({"suspend": false})).await?;
    env.wait_sync("paused", "the export after resuming", |s| {
        exported(s)?;
        let status = s.status.as_ref().ok_or("no status")?;
        if status.members != Some(2)
            || !env
                .members_in_kameleoon("mp_paused")
                .contains(&"u-400".to_string())
        {
            return Err("the new members are not exported yet".into());
        }
        Ok(())
    })
    .await?;
    assert_eq!(reads_of(&env, 502), reads + 1);
    assert_eq!(env.members_in_kameleoon("mp_paused"), ["u-300", "u-400"]);

    // Deleting a suspended sync still clears what it exported.
    merge_patch_spec(&env, "paused", json!({"suspend": true})).await?;
    env.wait_condition("paused", "Ready", "True", "Suspended")
        .await?;
    env.syncs()
        .delete("paused", &DeleteParams::default())
        .await?;
    wait_deleted(&env, "paused").await?;
    assert!(env.members_in_kameleoon("mp_paused").is_empty());
    let cleared: Vec<String> = env.carrying("mp_paused", "false").into_keys().collect();
    assert_eq!(cleared, ["crm-200", "u-300", "u-400"]);
    Ok(())
}

#[tokio::test]
async fn sync_suspended_from_start_deletes_at_once() -> Result<()> {
    let mut env = Env::new("suspend-new").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "dormant",
        "{id: 502}",
        "Dynamic",
        "  suspend: true\n  deletionPolicy: Clear\n  customData: {name: mp_dormant}",
    ))
    .await?;
    let sync = env
        .wait_condition("dormant", "Ready", "Unknown", "Suspended")
        .await?;
    assert!(condition(&sync, "Stalled").is_none());
    env.syncs()
        .delete("dormant", &DeleteParams::default())
        .await?;
    wait_deleted(&env, "dormant").await?;
    assert_eq!(engage_for(&env, 502).len(), 0);
    assert_eq!(env.event_requests(), 0);
    Ok(())
}

// ---------------------------------------------------------------------------
// Admission

#[tokio::test]
async fn spec_rules_apply_on_create_and_update() -> Result<()> {
    let env = Env::new("spec-rules").await?;
    let dry_run = |yaml: String| {
        let env = &env;
        async move {
            env.cluster
                .kubectl(
                    &["apply", "--dry-run=server", "-n", env.ns(), "-f", "-"],
                    Some(&yaml),
                )
                .await
        }
    };

    // Each rejection names the field it is about.
    let rejected = [
        (
            sync_yaml("a", "{id: 5, name: vip}", "OneTime", ""),
            "spec.cohort",
        ),
        (sync_yaml("b", "{}", "OneTime", ""), "spec.cohort"),
        (sync_yaml("c", "{id: 5}", "Daily", ""), "spec.syncType"),
        (
            sync_yaml("d", "{id: 5}", "Dynamic", "  interval: 30s"),
            "spec.interval",
        ),
        (
            sync_yaml("e", "{id: 5}", "Dynamic", "  interval: abc"),
            "spec.interval",
        ),
        (
            sync_yaml("f", "{id: 5}", "OneTime", "  customData: {name: \"\"}"),
            "spec.customData.name",
        ),
        // An interval on a OneTime sync is rejected rather than ignored.
        (
            sync_yaml("g", "{id: 5}", "OneTime", "  interval: 2h"),
            "spec.interval",
        ),
    ];
    for (yaml, field) in rejected {
        let output = dry_run(yaml.clone()).await?;
        assert!(!output.success(), "accepted: {yaml}");
        assert!(
            output.stderr.contains(&format!("{field}:")),
            "the error does not name {field}: {}",
            output.stderr
        );
    }
    let accepted = dry_run(sync_yaml("h", "{id: 5}", "Dynamic", "  interval: 2h")).await?;
    assert!(accepted.success(), "{}", accepted.stderr);

    // The immutability rule compares with the old object, so it never
    // blocks a create, whatever the connection is called.
    let other = sync_via("other", "i", "{id: 5}", "OneTime", "");
    let created = dry_run(other.clone()).await?;
    assert!(created.success(), "{}", created.stderr);
    env.apply(&other).await?;

    // An update that keeps the connection passes the rule; one that changes it does not.
    env.apply(&sync_via("other", "i", "{id: 6}", "OneTime", ""))
        .await?;
    let changed = dry_run(sync_via("production", "i", "{id: 6}", "OneTime", "")).await?;
    assert!(!changed.success(), "the connection was changed");
    assert!(
        changed.stderr.contains("spec.connectionRef"),
        "{}",
        changed.stderr
    );
    assert!(changed.stderr.contains("immutable"), "{}", changed.stderr);
    Ok(())
}

// ---------------------------------------------------------------------------
// Permissions

/// Rules that let the operator do its work in one namespace; each test
/// takes one permission away.
const FULL_RULES: &str = r#"
- apiGroups: [cohortsync.io]
  resources: [kameleoonconnections, cohortsyncs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [cohortsync.io]
  resources: [kameleoonconnections/status]
  verbs: [get, patch, update]
- apiGroups: [cohortsync.io]
  resources: [cohortsyncs/status]
  verbs: [get, patch, update]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
"#;

/// Starts the operator as a service account bound to a Role with `rules`.
async fn start_with_rules(env: &mut Env, rules: &str) -> Result<()> {
    let rbac = format!(
        r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: operator}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: operator}}
rules:
{rules}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: operator}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: operator}}
subjects:
- {{kind: ServiceAccount, name: operator, namespace: {namespace}}}
"#,
        namespace = env.ns()
    );
    env.apply(&rbac).await?;
    let kubeconfig = env
        .cluster
        .service_account_kubeconfig(env.ns(), "operator")
        .await?;
    env.operator_args = env.args(&[]);
    let args: Vec<&str> = env.operator_args.iter().map(String::as_str).collect();
    env.operator = Some(Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[("KUBECONFIG", &kubeconfig.to_string_lossy())],
    )?);
    Ok(())
}

/// Returns the status code and body of the operator's `/readyz`.
async fn readyz(env: &Env) -> Result<(u16, String)> {
    let line = wait_log_line(env, &["Serving metrics and health endpoints"]).await?;
    let address = line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("health="))
        .ok_or_else(|| anyhow::anyhow!("no health address in {line}"))?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    let response = client
        .get(format!("http://{address}/readyz"))
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

#[tokio::test]
async fn watch_forbidden_makes_operator_unready() -> Result<()> {
    let mut env = Env::new("rbac-watch").await?;
    let rules = FULL_RULES.replace(
        "verbs: [get, list, watch, create, update, patch, delete]",
        "verbs: [get, list, create, update, patch, delete]",
    );
    start_with_rules(&mut env, &rules).await?;
    env.connect().await?;

    // The API server's own words name the verb and the resource.
    wait_log_line(&env, &["ERROR", "cannot watch resource \"secrets\""]).await?;
    let (status, body) = wait_until(TIMEOUT, "/readyz to fail", async || {
        let (status, body) = readyz(&env).await?;
        if status == 503 {
            Ok((status, body))
        } else {
            Err(anyhow::anyhow!("/readyz answered {status}: {body}"))
        }
    })
    .await?;
    assert_eq!(status, 503);
    assert!(body.contains("secrets"), "{body}");
    Ok(())
}

#[tokio::test]
async fn status_write_forbidden_never_repeats_export() -> Result<()> {
    let mut env = Env::new("rbac-status").await?;
    let rules = FULL_RULES.replace(
        "  resources: [cohortsyncs/status]\n  verbs: [get, patch, update]",
        "  resources: [cohortsyncs/status]\n  verbs: [get, update]",
    );
    assert_ne!(rules, FULL_RULES);
    start_with_rules(&mut env, &rules).await?;
    env.connect().await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    env.apply(&sync_yaml(
        "r1",
        "{id: 502}",
        "Dynamic",
        "  customData: {name: mp_r1}",
    ))
    .await?;
    let forbidden = "cannot patch resource \"cohortsyncs/status\"";
    let errors = |env: &Env| {
        log_lines(env, "r1", "ERROR")
            .into_iter()
            .filter(|l| l.contains(forbidden))
            .count()
    };
    wait_until(TIMEOUT, "an error naming the status write", async || {
        (errors(&env) >= 1)
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!("no such error yet"))
    })
    .await
    .inspect_err(|_| eprintln!("operator log:\n{}", env.logs()))?;

    // Ask for another export; it must not run a second one either.
    kubectl(
        &env,
        &[
            "annotate",
            "csync/r1",
            "cohortsync.io/sync-requested-at=now",
        ],
    )
    .await?;
    wait_until(
        TIMEOUT,
        "a second error naming the status write",
        async || {
            (errors(&env) >= 2)
                .then_some(())
                .ok_or_else(|| anyhow::anyhow!("{} so far", errors(&env)))
        },
    )
    .await
    .inspect_err(|_| eprintln!("operator log:\n{}", env.logs()))?;
    assert!(
        reads_of(&env, 502) <= 1,
        "exported {} times",
        reads_of(&env, 502)
    );
    assert!(
        env.event_requests() <= 1,
        "{} Data API requests",
        env.event_requests()
    );
    Ok(())
}

#[tokio::test]
async fn event_create_forbidden_only_warns() -> Result<()> {
    let mut env = Env::new("rbac-events").await?;
    let rules = FULL_RULES.replace(
        "  resources: [events]\n  verbs: [create, patch]",
        "  resources: [events]\n  verbs: [patch]",
    );
    assert_ne!(rules, FULL_RULES);
    start_with_rules(&mut env, &rules).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "r1",
        "{id: 502}",
        "OneTime",
        "  customData: {name: mp_r1}",
    ))
    .await?;
    env.wait_sync("r1", "the export", exported).await?;
    assert_eq!(env.members_in_kameleoon("mp_r1"), ["crm-200", "u-300"]);
    let warning = wait_log_line(&env, &["WARN", "Failed to publish Event"]).await?;
    assert!(warning.contains("events"), "{warning}");
    let errors: Vec<String> = env
        .logs()
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .map(str::to_string)
        .collect();
    assert!(errors.is_empty(), "{errors:#?}");
    Ok(())
}

/// Milliseconds since the Unix epoch, the clock of the stand-ins' records.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn rotated_secret_takes_effect_without_restart() -> Result<()> {
    let mut env = Env::new("rotated-secret").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "before",
        "{id: 502}",
        "OneTime",
        "  customData: {name: mp_before}",
    ))
    .await?;
    env.wait_sync("before", "the first export", exported)
        .await?;
    let pid = env.operator.as_ref().unwrap().pid();

    // Kameleoon now accepts only the new client secret and has revoked the
    // tokens issued for the old one, which the operator still caches.
    env.kameleoon
        .set_client_secret("growth-operator", "km-secret-2", true)?;
    let rotated_at = now_ms();
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-2"))
        .await?;

    // The Secret change alone makes the connection validate again, long
    // before its periodic validation (30 minutes).
    wait_until(
        Duration::from_secs(30),
        "a token obtained with the rotated secret",
        async || {
            let fresh = env.kameleoon.requests().iter().any(|r| {
                r.path == "/oauth/token" && r.status == 200 && r.started_at_ms >= rotated_at
            });
            if fresh {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "no successful token request since the rotation"
                ))
            }
        },
    )
    .await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;

    // The next export uses the new credentials.
    env.apply(&sync_yaml(
        "after",
        "{id: 501}",
        "OneTime",
        "  customData: {name: mp_after}",
    ))
    .await?;
    env.wait_sync("after", "the export after the rotation", exported)
        .await?;
    assert_eq!(
        env.members_in_kameleoon("mp_after"),
        ["crm-200", "u-100", "u-300"]
    );
    assert_eq!(env.members_in_kameleoon("mp_before"), ["crm-200", "u-300"]);
    let rejected: Vec<_> = env
        .kameleoon
        .requests()
        .into_iter()
        .filter(|r| {
            r.path == "/visit/events"
                && r.started_at_ms >= rotated_at
                && !(200..300).contains(&r.status)
        })
        .collect();
    assert!(
        rejected.is_empty(),
        "Data API requests failed after the rotation: {rejected:?}"
    );

    // Same process throughout, and the new secret is nowhere in its log.
    assert_eq!(env.operator.as_ref().unwrap().pid(), pid);
    assert!(env.operator.as_mut().unwrap().try_wait()?.is_none());
    assert!(!env.logs().contains("km-secret-2"));
    Ok(())
}

#[tokio::test]
async fn deleted_secret_pauses_sync_until_recreated() -> Result<()> {
    let mut env = Env::new("deleted-secret").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "steady",
        "{id: 502}",
        "Dynamic",
        "  interval: 2h\n  customData: {name: mp_steady}",
    ))
    .await?;
    env.wait_sync("steady", "the first export", exported)
        .await?;
    let engage_before = env.engage_requests();
    let events_before = env.event_requests();

    env.cluster
        .kubectl(
            &[
                "delete",
                "secret",
                "mixpanel-service-account",
                "-n",
                env.ns(),
            ],
            None,
        )
        .await?
        .ensure_success()?;

    // The connection reports the missing Secret by name, and the sync
    // points at the connection.
    let connection = env
        .wait_connection("production", "Connected", "False", "SecretNotFound")
        .await?;
    let message = connected_message(&connection);
    assert!(message.contains("mixpanel-service-account"), "{message}");
    assert!(!message.contains("mp-secret-1"), "{message}");
    let waiting = env
        .wait_condition("steady", "Ready", "False", "ConnectionNotReady")
        .await?;
    let ready = condition(&waiting, "Ready").expect("Ready");
    assert!(ready.message.contains("production"), "{}", ready.message);
    assert_conditions_complete(&waiting);

    // Nothing was read or sent meanwhile, and Kameleoon kept its members.
    assert_eq!(env.engage_requests(), engage_before);
    assert_eq!(env.event_requests(), events_before);
    assert_eq!(env.members_in_kameleoon("mp_steady"), ["crm-200", "u-300"]);

    // Recreating the Secret recovers both without waiting for the interval,
    // and without an export that the schedule does not call for.
    env.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
        .await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    let recovered = env.wait_condition("steady", "Ready", "True", "").await?;
    assert_conditions_complete(&recovered);
    assert_eq!(env.event_requests(), events_before);
    assert_eq!(env.members_in_kameleoon("mp_steady"), ["crm-200", "u-300"]);
    Ok(())
}

#[tokio::test]
async fn large_cohort_streams_with_visible_progress() -> Result<()> {
    const PROFILES: u64 = 200_000;
    let mut env = Env::new("large-cohort").await?;
    env.mixpanel
        .set_cohort(PROJECT, generated_cohort(1901, "Large", PROFILES))?;
    // Every page waits a little, so that the read lasts long enough for
    // its progress to show in status.
    env.mixpanel.add_fault(Fault {
        times: 0,
        ..Fault::delay(Route::Engage, 25)
    });
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "large",
        "{id: 1901}",
        "OneTime",
        "  customData: {name: mp_large}",
    ))
    .await?;

    env.wait_sync("large", "progress through the pages", |s| {
        let reconciling = s
            .status
            .as_ref()
            .and_then(|status| status.conditions.iter().find(|c| c.type_ == "Reconciling"))
            .ok_or("not reconciling")?;
        if reconciling.message.contains("Reading Mixpanel: page ") {
            Ok(())
        } else {
            Err(reconciling.message.clone())
        }
    })
    .await?;
    let done = env.wait_sync("large", "the export", exported).await?;
    assert_eq!(counts(&done).exported, PROFILES as i64);
    assert_eq!(env.members_in_kameleoon("mp_large").len() as u64, PROFILES);

    // Pages follow one another without a pause of the operator's own.
    let pages = engage_for(&env, 1901);
    assert_eq!(pages.len() as u64, PROFILES / 1000 + 1);
    for pair in pages.windows(2) {
        let gap = pair[1].started_at_ms.saturating_sub(pair[0].finished_at_ms);
        assert!(
            gap < 2000,
            "{gap} ms between page {:?} and page {:?}",
            pair[0].page,
            pair[1].page
        );
    }

    // Each Data API request stays within the size limit and was accepted.
    let batches: Vec<_> = env
        .kameleoon
        .requests()
        .into_iter()
        .filter(|r| r.route == Some(Route::Events))
        .collect();
    assert!(batches.len() > 1, "{} Data API requests", batches.len());
    for batch in &batches {
        assert!(
            batch.body_bytes <= 1024 * 1024,
            "{} bytes",
            batch.body_bytes
        );
        assert!(
            (200..300).contains(&batch.status),
            "status {}",
            batch.status
        );
    }

    // Identifiers are kept compactly, not as decoded profiles.
    let usage = env.operator.as_ref().unwrap().usage()?;
    assert!(
        usage.peak_rss_bytes < 256 * 1024 * 1024,
        "peak resident memory {} MiB",
        usage.peak_rss_bytes / 1024 / 1024
    );
    Ok(())
}

#[tokio::test]
async fn spec_fix_skips_failure_backoff() -> Result<()> {
    let mut env = Env::new("skip-backoff").await?;
    // Backoff long enough that waiting for it would fail the test.
    let mut args = env.args(&[]);
    for (flag, value) in [
        ("--failure-backoff-base", "10m"),
        ("--failure-backoff-max", "30m"),
    ] {
        let at = args.iter().position(|a| a == flag).expect("flag set");
        args[at + 1] = value.to_string();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = env.cluster.kubeconfig_path().to_string_lossy().into_owned();
    env.operator = Some(Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[("KUBECONFIG", &kubeconfig)],
    )?);
    env.connect().await?;

    // A spec edit is tried at once.
    env.apply(&sync_yaml(
        "misnamed",
        "{name: No Such Cohort}",
        "OneTime",
        "  customData: {name: mp_misnamed}",
    ))
    .await?;
    env.wait_condition("misnamed", "Stalled", "True", "CohortNotFound")
        .await?;
    env.apply(&sync_yaml(
        "misnamed",
        "{id: 502}",
        "OneTime",
        "  customData: {name: mp_misnamed}",
    ))
    .await?;
    env.wait_sync("misnamed", "the export of the fixed spec", exported)
        .await?;
    assert_eq!(
        env.members_in_kameleoon("mp_misnamed"),
        ["crm-200", "u-300"]
    );
    Ok(())
}

#[tokio::test]
async fn second_sync_to_same_custom_data_is_rejected() -> Result<()> {
    let mut env = Env::new("custom-data-conflict").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "first",
        "{id: 502}",
        "Dynamic",
        "  customData: {name: mp_shared}",
    ))
    .await?;
    env.wait_sync("first", "the first export", exported).await?;

    // Another cohort into the same custom data would overwrite the first
    // sync's members, and clearing on deletion would erase them.
    env.apply(&sync_yaml(
        "second",
        "{id: 503}",
        "OneTime",
        "  customData: {name: mp_shared}\n  deletionPolicy: Clear",
    ))
    .await?;
    let refused = env
        .wait_condition("second", "Stalled", "True", "CustomDataConflict")
        .await?;
    let stalled = condition(&refused, "Stalled").expect("Stalled");
    assert!(stalled.message.contains("first"), "{}", stalled.message);
    assert!(
        stalled.message.contains("spec.customData.name"),
        "{}",
        stalled.message
    );
    assert_conditions_complete(&refused);
    assert_eq!(env.members_in_kameleoon("mp_shared"), ["crm-200", "u-300"]);

    env.syncs()
        .delete("second", &DeleteParams::default())
        .await?;
    wait_deleted(&env, "second").await?;
    assert_eq!(env.members_in_kameleoon("mp_shared"), ["crm-200", "u-300"]);
    assert!(env.carrying("mp_shared", "false").is_empty());
    let first = env.syncs().get("first").await?;
    condition_is(
        &first.status.unwrap_or_default().conditions,
        "Ready",
        "True",
        "",
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(())
}
