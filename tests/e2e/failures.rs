//! Replacement semantics and data safety under failures: every successful
//! export leaves exactly the cohort's members with `true` and everyone who
//! left with `false`, whatever crashed, failed or changed on the way.

use std::collections::BTreeSet;
use std::io;
use std::ops::RangeInclusive;

use k8s_openapi::api::coordination::v1::Lease;
use kameleoon_cohort_operator::crd::{AttemptResult, ExportKind, MatchBy};
use kameleoon_cohort_operator::members::MemberSet;
use kameleoon_cohort_operator::store::{CHUNK_BYTES, MemberStore, SnapshotKind, Target};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use standins::seed::{MemberSeed, ProfileSeed};
use standins::{Fault, KameleoonConfig, MixpanelConfig, Route};
use testkit::{Result, anyhow, wait_until};

use crate::failure_support::*;
use crate::support::*;

/// Identified members with the given distinct ids; `id=mapping` gives the
/// profile that mapping identifier.
fn profiles(ids: &[&str]) -> Vec<MemberSeed> {
    ids.iter()
        .map(|spec| {
            let (id, mapping) = match spec.split_once('=') {
                Some((id, mapping)) => (id, Some(mapping)),
                None => (*spec, None),
            };
            let mut properties = json!({"$email": format!("{id}@example.test")});
            if let Some(mapping) = mapping {
                properties["$kameleoon_mapping_id"] = json!(mapping);
            }
            MemberSeed::Profile(ProfileSeed::new(id, properties))
        })
        .collect()
}

fn counts_of(sync: &kameleoon_cohort_operator::crd::CohortSync) -> (i64, i64, i64) {
    let counts = &sync
        .status
        .as_ref()
        .unwrap()
        .last_attempt
        .as_ref()
        .unwrap()
        .counts;
    (counts.exported, counts.added, counts.removed)
}

#[tokio::test]
async fn dynamic_sync_follows_joins_and_leaves_exactly() -> Result<()> {
    let mut env = Env::new("fail-churn").await?;
    let rounds: [&[&str]; 4] = [
        &["a-1", "a-2=crm-a2", "a-3", "a-4", "a-5"],
        &["a-3", "a-4", "a-5", "a-6", "a-7", "a-8"],
        &["a-1", "a-8", "a-9"],
        &[],
    ];
    listed_cohort(&env, 610, "Churners", profiles(rounds[0]));
    start_operator_with(&mut env, &["--test-interval-override=3s"]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "churn",
        "{id: 610}",
        "Dynamic",
        "  customData: {name: churners}",
    ))
    .await?;

    let mut previous: BTreeSet<String> = BTreeSet::new();
    let mut former: BTreeSet<String> = BTreeSet::new();
    let mut last_success = None;
    for (round, ids) in rounds.iter().enumerate() {
        if round > 0 {
            // The next export starts an interval after the last success, so
            // the change lands between two exports.
            env.mixpanel
                .set_cohort_members(PROJECT, 610, profiles(ids))
                .unwrap();
        }
        let expected = expected_members(&env, 610);
        let seen = last_success.clone();
        let sync = wait_sync_for(
            &env,
            "churn",
            LONG_TIMEOUT,
            &format!("export of round {round}"),
            |s| {
                let status = s.status.as_ref().ok_or("no status")?;
                if status.last_successful_sync_time == seen {
                    return Err("no new export yet".into());
                }
                exported(s)
            },
        )
        .await?;
        let status = sync.status.clone().unwrap();
        last_success = status.last_successful_sync_time.clone();

        let joined = expected.difference(&previous).count() as i64;
        let left = previous.difference(&expected).count() as i64;
        let attempt = status.last_attempt.as_ref().unwrap();
        if round == 0 {
            assert_eq!(attempt.kind, Some(ExportKind::Full));
        } else {
            assert_eq!(
                attempt.kind,
                Some(ExportKind::Differential),
                "round {round}"
            );
        }
        assert_eq!(
            counts_of(&sync),
            (expected.len() as i64, joined, left),
            "round {round}: (exported, added, removed)"
        );
        assert_eq!(status.members, Some(expected.len() as i64), "round {round}");
        former.extend(previous.iter().cloned());
        assert_exact(&env, "churners", &expected, &former);
        previous = expected;
    }
    assert!(env.kameleoon.rejected_lines().is_empty());
    Ok(())
}

/// Where [`crash_and_recover`] kills the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KillPoint {
    /// While Engage pages are read.
    Paging,
    /// After some Data API requests and before the rest.
    Batches,
    /// After Kameleoon accepted every batch, before the new members are stored.
    FinalSnapshot,
}

/// Exports a cohort of 30,000 generated members, changes a fifth of them,
/// kills the operator with SIGKILL at `point` of the next export, restarts
/// it and checks that the export ends exact and Ready.
async fn crash_and_recover(prefix: &str, point: KillPoint) -> Result<()> {
    let mut env = Env::new(prefix).await?;
    generated_cohort(&env, 620, "Big", generator(30_000, 1, 30.0));
    let flags = ["--test-interval-override=1h", "--max-body-bytes=65536"];
    start_operator_with(&mut env, &flags).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "big",
        "{id: 620}",
        "Dynamic",
        "  customData: {name: big}",
    ))
    .await?;
    wait_sync_for(&env, "big", LONG_TIMEOUT, "the first export", exported).await?;
    let first = expected_members(&env, 620);
    assert_exact(&env, "big", &first, &BTreeSet::new());

    // Another seed makes other members anonymous: some leave, some join.
    env.mixpanel
        .set_cohort_generator(PROJECT, 620, generator(30_000, 2, 30.0))
        .unwrap();
    let second = expected_members(&env, 620);
    let joined = second.difference(&first).count();
    let left = first.difference(&second).count();
    assert!(joined > 1000, "{joined} joined");
    assert!(left > 1000, "{left} left");

    let mixpanel_mark = last_request_id(&env.mixpanel.requests());
    let kameleoon_mark = last_request_id(&env.kameleoon.requests());
    env.mixpanel
        .add_fault(Fault::delay(Route::Engage, 150).times(0));
    env.kameleoon
        .add_fault(Fault::delay(Route::Events, 150).times(0));
    let blocked = if point == KillPoint::FinalSnapshot {
        Some(BlockedSnapshot::install(&env, second.len()).await?)
    } else {
        None
    };
    request_export(&env, "big", "second").await?;

    match point {
        KillPoint::Paging => {
            wait_until(
                LONG_TIMEOUT,
                "Engage page 5 of the second export",
                async || {
                    let pages = engage_requests_since(&env, mixpanel_mark);
                    pages
                        .iter()
                        .find(|r| r.status == 200 && r.page.is_some_and(|p| p >= 5))
                        .map(|_| ())
                        .ok_or_else(|| anyhow::anyhow!("{} Engage requests", pages.len()))
                },
            )
            .await?;
        }
        KillPoint::Batches => {
            wait_until(LONG_TIMEOUT, "five Data API requests", async || {
                let sent = event_requests_since(&env, kameleoon_mark).len();
                if sent >= 5 {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("{sent} Data API requests"))
                }
            })
            .await?;
        }
        KillPoint::FinalSnapshot => {
            wait_sync_for(
                &env,
                "big",
                LONG_TIMEOUT,
                "the final snapshot write to fail",
                |s| {
                    let attempt = s.status.as_ref().and_then(|s| s.last_attempt.as_ref());
                    match attempt {
                        Some(a)
                            if a.result == AttemptResult::Failed
                                && a.reason.as_deref() == Some("KubernetesApiError") =>
                        {
                            Ok(())
                        }
                        _ => Err("no failed snapshot write yet".into()),
                    }
                },
            )
            .await?;
        }
    }
    kill_operator(&mut env)?;

    match point {
        KillPoint::Paging => {
            assert!(
                event_requests_since(&env, kameleoon_mark).is_empty(),
                "the export sent data before its read finished"
            );
            assert_exact(&env, "big", &first, &BTreeSet::new());
        }
        KillPoint::Batches => {
            assert!(
                check_exact(&env, "big", &second, &first).is_err(),
                "every batch went out before the kill"
            );
        }
        KillPoint::FinalSnapshot => {
            // Every batch was accepted, and no snapshot of the new members exists.
            assert_exact(&env, "big", &second, &first);
            let stored: Vec<String> = member_secrets(&env)
                .await?
                .iter()
                .filter_map(|s| {
                    s.metadata
                        .annotations
                        .as_ref()?
                        .get("cohortsync.io/members")
                        .cloned()
                })
                .collect();
            assert!(
                !stored.contains(&second.len().to_string()),
                "the final snapshot was written: {stored:?}"
            );
        }
    }

    env.mixpanel.clear_faults();
    env.kameleoon.clear_faults();
    if let Some(blocked) = blocked {
        blocked.remove(&env).await?;
    }
    start_operator_with(&mut env, &flags).await?;
    let sync = wait_sync_for(
        &env,
        "big",
        LONG_TIMEOUT,
        "the second export after the crash",
        |s| exported_for(s, "second"),
    )
    .await?;
    assert_exact(&env, "big", &second, &first);
    let status = sync.status.clone().unwrap();
    assert_eq!(status.members, Some(second.len() as i64));
    let (exported, _, removed) = counts_of(&sync);
    assert_eq!(exported, second.len() as i64);
    assert_eq!(removed, left as i64);
    assert!(env.kameleoon.rejected_lines().is_empty());
    Ok(())
}

#[tokio::test]
async fn crash_while_reading_mixpanel_recovers_exactly() -> Result<()> {
    crash_and_recover("fail-kill-read", KillPoint::Paging).await
}

#[tokio::test]
async fn crash_between_kameleoon_batches_recovers_exactly() -> Result<()> {
    crash_and_recover("fail-kill-send", KillPoint::Batches).await
}

#[tokio::test]
async fn crash_before_final_snapshot_recovers_exactly() -> Result<()> {
    crash_and_recover("fail-kill-store", KillPoint::FinalSnapshot).await
}

/// One injected failure and what it must lead to.
struct Case {
    name: &'static str,
    members: &'static [&'static str],
    faults: Vec<Fault>,
    /// Reconciling reason the status must show while the export waits.
    waiting_reason: Option<&'static str>,
    /// Number of requests the export makes on the faulty route.
    requests: RangeInclusive<usize>,
}

/// Runs each case as a requested export of the OneTime sync `retried` on
/// cohort 630, and checks the final state, the request count and the status.
async fn run_cases(env: &Env, route: Route, cases: Vec<Case>) -> Result<()> {
    let mut previous = expected_members(env, 630);
    let mut former = BTreeSet::new();
    for case in cases {
        env.mixpanel
            .set_cohort_members(PROJECT, 630, profiles(case.members))
            .unwrap();
        let expected = expected_members(env, 630);
        let mixpanel_mark = last_request_id(&env.mixpanel.requests());
        let kameleoon_mark = last_request_id(&env.kameleoon.requests());
        for fault in case.faults {
            match route {
                Route::Engage => env.mixpanel.add_fault(fault),
                _ => env.kameleoon.add_fault(fault),
            };
        }
        let recorder = ConditionRecorder::start(env, "retried").await?;
        request_export(env, "retried", case.name).await?;
        let sync = wait_sync_for(env, "retried", LONG_TIMEOUT, case.name, |s| {
            exported_for(s, case.name)
        })
        .await?;

        former.extend(previous.iter().cloned());
        if let Err(why) = check_exact(env, "retried", &expected, &former) {
            panic!("case {}: {why}", case.name);
        }
        let joined = expected.difference(&previous).count() as i64;
        let left = previous.difference(&expected).count() as i64;
        assert_eq!(
            counts_of(&sync),
            (expected.len() as i64, expected.len() as i64, left),
            "case {}: (exported, added, removed) of a full export with {joined} joined",
            case.name
        );
        let requests = match route {
            Route::Engage => engage_requests_since(env, mixpanel_mark).len(),
            _ => event_requests_since(env, kameleoon_mark).len(),
        };
        assert!(
            case.requests.contains(&requests),
            "case {}: {requests} requests, {:?} expected",
            case.name,
            case.requests
        );
        if let Some(reason) = case.waiting_reason {
            let message = recorder.assert_reconciling(reason);
            let explains_wait = message.contains("retry") || message.contains("waiting");
            assert!(explains_wait, "case {}: {message}", case.name);
        }
        previous = expected;
    }
    assert!(env.kameleoon.rejected_lines().is_empty());
    Ok(())
}

/// Starts the operator with retries slow enough for the status writer to
/// show each wait, and a OneTime sync `retried` on cohort 630.
async fn retried_sync(prefix: &str) -> Result<Env> {
    let mut env = Env::new(prefix).await?;
    listed_cohort(&env, 630, "Retried", profiles(&["r-1", "r-2", "r-3"]));
    start_operator_with(
        &mut env,
        &[
            "--request-retry-base=1s",
            "--progress-interval=200ms",
            "--request-timeout=2s",
        ],
    )
    .await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "retried",
        "{id: 630}",
        "OneTime",
        "  customData: {name: retried}",
    ))
    .await?;
    env.wait_sync("retried", "the first export", exported)
        .await?;
    Ok(env)
}

#[tokio::test]
async fn mixpanel_errors_are_retried_and_explained() -> Result<()> {
    let env = retried_sync("fail-mixpanel").await?;
    let limit_body = json!({
        "request": "/api/query/engage?project_id=1111",
        "error": "Query rate limit exceeded for project_id: 1111. 6/5 queries running concurrently and 7/60 queries running in the last hour."
    });
    let mark = last_request_id(&env.mixpanel.requests());
    run_cases(
        &env,
        Route::Engage,
        vec![
            Case {
                name: "rate-limited",
                members: &["r-2", "r-3", "r-4"],
                faults: vec![
                    Fault::respond(Route::Engage, 429, limit_body)
                        .retry_after(2)
                        .page(0),
                ],
                waiting_reason: Some("MixpanelRateLimited"),
                requests: 2..=2,
            },
            Case {
                name: "server-errors",
                members: &["r-3", "r-4", "r-5"],
                faults: vec![
                    Fault::respond(
                        Route::Engage,
                        500,
                        json!({"error": "Internal server error"}),
                    )
                    .times(2),
                ],
                waiting_reason: Some("MixpanelUnavailable"),
                requests: 3..=3,
            },
            Case {
                // Slower than --request-timeout: the first request times out.
                // The stand-in may log it only after the test counts.
                name: "slow",
                members: &["r-5", "r-6"],
                faults: vec![Fault::delay(Route::Engage, 5000)],
                waiting_reason: Some("MixpanelUnavailable"),
                requests: 1..=2,
            },
        ],
    )
    .await?;

    // The retry after the 429 honoured Retry-After: 2.
    let engage = engage_requests_since(&env, mark);
    let limited = engage
        .iter()
        .find(|r| r.status == 429)
        .expect("the 429 was served");
    let retry = engage
        .iter()
        .find(|r| r.id > limited.id)
        .expect("the 429 was retried");
    let gap = retry.started_at_ms - limited.finished_at_ms;
    assert!(gap >= 2000, "retried {gap} ms after the 429");
    let stats = env.mixpanel.project_stats(PROJECT).unwrap();
    assert_eq!(stats.rejected_concurrent + stats.rejected_hourly, 0);
    Ok(())
}

#[tokio::test]
async fn kameleoon_errors_are_retried_and_explained() -> Result<()> {
    let env = retried_sync("fail-kameleoon").await?;
    let token_mark = last_request_id(&env.kameleoon.requests());
    run_cases(
        &env,
        Route::Events,
        vec![Case {
            name: "token-refused",
            members: &["r-2", "r-3", "r-4"],
            faults: vec![Fault::respond(
                Route::Events,
                401,
                json!({"error": "invalid_token", "error_description": "The access token expired"}),
            )],
            waiting_reason: None,
            requests: 2..=2,
        }],
    )
    .await?;
    let tokens = env
        .kameleoon
        .requests_since(token_mark)
        .iter()
        .filter(|r| r.path == "/oauth/token")
        .count();
    assert_eq!(tokens, 1, "a 401 renews the token once");

    // A body above the service's limit is sent again in halves.
    let mut config = env.kameleoon.config();
    let limit = config.events_body_limit_bytes;
    config.events_body_limit_bytes = 300;
    env.kameleoon.set_config(config.clone());
    let mark = last_request_id(&env.kameleoon.requests());
    run_cases(
        &env,
        Route::Events,
        vec![Case {
            name: "too-large",
            members: &["r-4", "r-5"],
            faults: Vec::new(),
            waiting_reason: None,
            requests: 3..=3,
        }],
    )
    .await?;
    let too_large = event_requests_since(&env, mark)
        .iter()
        .filter(|r| r.status == 413)
        .count();
    assert_eq!(too_large, 1);
    config.events_body_limit_bytes = limit;
    env.kameleoon.set_config(config);

    let mark = last_request_id(&env.kameleoon.requests());
    run_cases(
        &env,
        Route::Events,
        vec![
            Case {
                name: "unavailable",
                members: &["r-5", "r-6", "r-7"],
                faults: vec![
                    Fault::respond(Route::Events, 503, json!({"error": "Service Unavailable"}))
                        .times(2),
                ],
                waiting_reason: Some("KameleoonUnavailable"),
                requests: 3..=3,
            },
            Case {
                name: "rate-limited",
                members: &["r-7", "r-8"],
                faults: vec![
                    Fault::respond(Route::Events, 429, json!({"error": "Too many requests"}))
                        .retry_after(2),
                ],
                waiting_reason: Some("KameleoonRateLimited"),
                requests: 2..=2,
            },
        ],
    )
    .await?;
    let events = event_requests_since(&env, mark);
    let limited = events
        .iter()
        .find(|r| r.status == 429)
        .expect("the 429 was served");
    let retry = events
        .iter()
        .find(|r| r.id > limited.id)
        .expect("the 429 was retried");
    let gap = retry.started_at_ms - limited.finished_at_ms;
    assert!(gap >= 2000, "retried {gap} ms after the 429");
    Ok(())
}

#[tokio::test]
async fn fifty_syncs_share_one_query_budget() -> Result<()> {
    // Each sync creates its own custom data; the Kameleoon Automation API
    // limit of 50 requests per 10 s is not what this test is about.
    let kameleoon = KameleoonConfig {
        automation_rate_limits: false,
        ..KameleoonConfig::default()
    };
    let mut env = Env::with("fail-fifty", MixpanelConfig::default(), kameleoon).await?;
    // Every export may run at once, so only the query budget keeps Mixpanel
    // within 5 concurrent queries.
    start_operator_with(
        &mut env,
        &["--exports-per-project=50", "--test-interval-override=1h"],
    )
    .await?;
    env.connect().await?;
    // A second connection to the same project shares its budget.
    env.apply(&CONNECTION.replace("name: production", "name: production-b"))
        .await?;
    env.mixpanel
        .add_fault(Fault::delay(Route::Engage, 300).times(0));

    let mut yaml = String::new();
    for i in 0..50 {
        let connection = if i % 2 == 0 {
            "production"
        } else {
            "production-b"
        };
        let sync_type = if i % 3 == 0 { "OneTime" } else { "Dynamic" };
        let cohort = 501 + i % 2;
        yaml.push_str(&format!(
            "---\napiVersion: cohortsync.io/v1alpha1\nkind: CohortSync\nmetadata: {{name: s-{i}}}\n\
             spec:\n  connectionRef: {{name: {connection}}}\n  cohort: {{id: {cohort}}}\n  \
             syncType: {sync_type}\n  customData: {{name: c-{i}}}\n"
        ));
    }
    env.apply(&yaml).await?;

    let api = env.syncs();
    wait_until(LONG_TIMEOUT, "all fifty syncs Ready", async || {
        let list = api.list(&Default::default()).await?;
        let pending: Vec<String> = list
            .items
            .iter()
            .filter(|s| exported(s).is_err())
            .map(|s| s.metadata.name.clone().unwrap_or_default())
            .collect();
        if list.items.len() == 50 && pending.is_empty() {
            Ok(())
        } else {
            Err(anyhow::anyhow!("not exported yet: {pending:?}"))
        }
    })
    .await?;

    let stats = env.mixpanel.project_stats(PROJECT).unwrap();
    assert_eq!(stats.rejected_concurrent, 0, "{stats:?}");
    assert_eq!(stats.rejected_hourly, 0, "{stats:?}");
    assert!(stats.max_in_flight <= 5, "{stats:?}");
    assert!(stats.queries_counted <= 60, "{stats:?}");
    let limited: Vec<_> = env
        .mixpanel
        .requests()
        .into_iter()
        .filter(|r| r.status == 429)
        .collect();
    assert!(limited.is_empty(), "Mixpanel answered 429: {limited:?}");
    for i in 0..50 {
        let members = expected_members(&env, 501 + i % 2);
        assert_exact(&env, &format!("c-{i}"), &members, &BTreeSet::new());
    }
    Ok(())
}

#[tokio::test]
async fn deletion_with_clear_sets_members_false() -> Result<()> {
    let mut env = Env::new("fail-delete-clear").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "leaving",
        "{id: 502}",
        "OneTime",
        "  customData: {name: leaving}\n  deletionPolicy: Clear",
    ))
    .await?;
    let sync = env.wait_sync("leaving", "the export", exported).await?;
    let finalizers = sync.metadata.finalizers.clone().unwrap_or_default();
    assert!(
        finalizers.contains(&"cohortsync.io/clear-exported-data".to_string()),
        "{finalizers:?}"
    );
    let members = expected_members(&env, 502);
    assert_exact(&env, "leaving", &members, &BTreeSet::new());
    assert!(!member_secrets(&env).await?.is_empty());

    let mark = last_request_id(&env.kameleoon.requests());
    env.syncs()
        .delete("leaving", &DeleteParams::default())
        .await?;
    let api = env.syncs();
    wait_until(TIMEOUT, "the sync to be deleted", async || {
        match api.get_opt("leaving").await? {
            None => Ok(()),
            Some(s) => Err(anyhow::anyhow!("still there: {}", status_json(&s))),
        }
    })
    .await?;

    assert!(carrying(&env, "leaving", "true").is_empty());
    assert_eq!(carrying(&env, "leaving", "false"), members);
    let sent = event_requests_since(&env, mark);
    assert_eq!(accepted_lines(&sent), members.len() as u64);
    assert!(member_secrets(&env).await?.is_empty());
    assert!(!events_about(&env, "leaving", "Cleared").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn deletion_with_retain_leaves_kameleoon_alone() -> Result<()> {
    let mut env = Env::new("fail-delete-retain").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "kept",
        "{id: 502}",
        "OneTime",
        "  customData: {name: kept}\n  deletionPolicy: Retain",
    ))
    .await?;
    let sync = env.wait_sync("kept", "the export", exported).await?;
    assert!(sync.metadata.finalizers.unwrap_or_default().is_empty());
    let members = expected_members(&env, 502);

    let mark = last_request_id(&env.kameleoon.requests());
    env.syncs().delete("kept", &DeleteParams::default()).await?;
    let api = env.syncs();
    wait_until(TIMEOUT, "the sync to be deleted", async || {
        match api.get_opt("kept").await? {
            None => Ok(()),
            Some(_) => Err(anyhow::anyhow!("still there")),
        }
    })
    .await?;
    // Once a sync created after the deletion is exported, the operator has
    // seen the deletion too: every line since then belongs to the new sync.
    env.apply(&sync_yaml(
        "sentinel",
        "{id: 501}",
        "OneTime",
        "  customData: {name: sentinel}",
    ))
    .await?;
    env.wait_sync("sentinel", "the export of a later sync", exported)
        .await?;
    let sentinel = expected_members(&env, 501);
    let lines = accepted_lines(&event_requests_since(&env, mark));
    assert_eq!(
        lines,
        sentinel.len() as u64,
        "lines were sent for the deleted sync"
    );
    assert_exact(&env, "kept", &members, &BTreeSet::new());
    assert!(!env.logs().contains("Cleared exported members"));
    Ok(())
}

#[tokio::test]
async fn deletion_waits_for_broken_connection_until_skipped() -> Result<()> {
    let mut env = Env::new("fail-delete-stuck").await?;
    env.start_operator(&[]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "stuck",
        "{id: 502}",
        "OneTime",
        "  customData: {name: stuck}\n  deletionPolicy: Clear",
    ))
    .await?;
    env.wait_sync("stuck", "the export", exported).await?;
    let members = expected_members(&env, 502);

    // Kameleoon no longer accepts the connection's client secret.
    env.kameleoon
        .set_client_secret("growth-operator", "rotated-elsewhere", true)
        .unwrap();
    env.syncs()
        .delete("stuck", &DeleteParams::default())
        .await?;
    let sync = env
        .wait_sync("stuck", "deletion to wait for its cleanup", |s| {
            if s.metadata.deletion_timestamp.is_none() {
                return Err("not being deleted".into());
            }
            let conditions = s
                .status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default();
            condition_is(conditions, "Ready", "False", "CleanupPending")
        })
        .await?;
    let ready = sync
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert!(
        ready.message.contains("cohortsync.io/skip-cleanup"),
        "{}",
        ready.message
    );
    wait_until(TIMEOUT, "a CleanupPending Event", async || {
        let events = events_about(&env, "stuck", "CleanupPending").await?;
        if events.is_empty() {
            Err(anyhow::anyhow!("no Event yet"))
        } else {
            Ok(())
        }
    })
    .await?;
    assert_exact(&env, "stuck", &members, &BTreeSet::new());

    env.cluster
        .kubectl(
            &[
                "annotate",
                "-n",
                env.ns(),
                "csync/stuck",
                "cohortsync.io/skip-cleanup=true",
            ],
            None,
        )
        .await?
        .ensure_success()?;
    let api = env.syncs();
    wait_until(TIMEOUT, "the sync to be deleted", async || {
        match api.get_opt("stuck").await? {
            None => Ok(()),
            Some(s) => Err(anyhow::anyhow!("still there: {}", status_json(&s))),
        }
    })
    .await?;
    assert!(
        !events_about(&env, "stuck", "CleanupSkipped")
            .await?
            .is_empty()
    );
    // The admin let go without clearing: Kameleoon keeps what it had.
    assert_exact(&env, "stuck", &members, &BTreeSet::new());
    Ok(())
}

#[tokio::test]
async fn changing_cohort_and_custom_data_clears_old_data() -> Result<()> {
    let mut env = Env::new("fail-retarget").await?;
    start_operator_with(&mut env, &["--test-interval-override=1h"]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "moving",
        "{id: 501}",
        "Dynamic",
        "  customData: {name: cd-a}",
    ))
    .await?;
    env.wait_sync("moving", "the first export", exported)
        .await?;
    let old = expected_members(&env, 501);
    let new = expected_members(&env, 502);
    assert_exact(&env, "cd-a", &old, &BTreeSet::new());

    // Another cohort into the same custom data: the old members are
    // cleared first, then the new ones exported.
    let mark = last_request_id(&env.kameleoon.requests());
    patch_spec(&env, "moving", json!({"cohort": {"id": 502}})).await?;
    let sync = env
        .wait_sync("moving", "the export of cohort 502", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.cohort.as_ref().map(|c| c.id) != Some(502) {
                return Err("cohort 502 not exported yet".into());
            }
            exported(s)
        })
        .await?;
    assert_exact(&env, "cd-a", &new, &old);
    let lines = accepted_lines(&event_requests_since(&env, mark));
    assert_eq!(lines, (old.len() + new.len()) as u64);
    assert_eq!(counts_of(&sync), (new.len() as i64, new.len() as i64, 0));

    // Another custom data: the old one is cleared for every member.
    let mark = last_request_id(&env.kameleoon.requests());
    patch_spec(&env, "moving", json!({"customData": {"name": "cd-b"}})).await?;
    let sync = env
        .wait_sync("moving", "the export to cd-b", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            if status.custom_data.as_ref().map(|c| c.name.as_str()) != Some("cd-b") {
                return Err("cd-b not exported yet".into());
            }
            exported(s)
        })
        .await?;
    let everyone: BTreeSet<String> = old.union(&new).cloned().collect();
    assert_exact(&env, "cd-a", &BTreeSet::new(), &everyone);
    assert_exact(&env, "cd-b", &new, &BTreeSet::new());
    let lines = accepted_lines(&event_requests_since(&env, mark));
    assert_eq!(lines, (2 * new.len()) as u64);
    assert_eq!(sync.status.unwrap().cohort.map(|c| c.id), Some(502));
    assert!(env.kameleoon.rejected_lines().is_empty());
    Ok(())
}

#[tokio::test]
async fn dry_run_plan_matches_next_export() -> Result<()> {
    let mut env = Env::new("fail-dry-run").await?;
    listed_cohort(
        &env,
        640,
        "Planned",
        profiles(&["d-1", "d-2", "d-3", "d-4", "d-5", "d-6=crm-d6"]),
    );
    start_operator_with(&mut env, &["--test-interval-override=1h"]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "planned",
        "{id: 640}",
        "Dynamic",
        "  customData: {name: planned}",
    ))
    .await?;
    env.wait_sync("planned", "the first export", exported)
        .await?;
    let before = expected_members(&env, 640);

    env.mixpanel
        .set_cohort_members(
            PROJECT,
            640,
            profiles(&["d-4", "d-5", "d-6=crm-d6", "d-7", "d-8", "d-9", "d-10"]),
        )
        .unwrap();
    let after = expected_members(&env, 640);
    let mark = last_request_id(&env.kameleoon.requests());
    patch_spec(&env, "planned", json!({"dryRun": true})).await?;
    let planned = env
        .wait_sync("planned", "the plan", |s| {
            let status = s.status.as_ref().ok_or("no status")?;
            let plan = status.plan.as_ref().ok_or("no plan")?;
            if plan.generation != s.metadata.generation {
                return Err("no plan for this generation".into());
            }
            condition_is(&status.conditions, "Ready", "True", "Planned")
        })
        .await?;
    let plan = planned.status.unwrap().plan.unwrap();
    assert!(
        event_requests_since(&env, mark).is_empty(),
        "the dry run sent data"
    );
    assert_exact(&env, "planned", &before, &BTreeSet::new());
    assert_eq!(plan.counts.exported, after.len() as i64);
    assert_eq!(plan.counts.added, after.difference(&before).count() as i64);
    assert_eq!(
        plan.counts.removed,
        before.difference(&after).count() as i64
    );

    patch_spec(&env, "planned", json!({"dryRun": false})).await?;
    let sync = env
        .wait_sync("planned", "the export after the plan", exported)
        .await?;
    let sent = event_requests_since(&env, mark);
    assert_eq!(
        accepted_lines(&sent),
        (plan.counts.added + plan.counts.removed) as u64,
        "lines sent differ from the plan"
    );
    let attempt = sync.status.unwrap().last_attempt.unwrap();
    assert_eq!(attempt.kind, plan.kind);
    assert_eq!(attempt.counts, plan.counts);
    assert_exact(&env, "planned", &after, &before);
    Ok(())
}

#[tokio::test]
async fn expired_paging_session_restarts_read_without_removals() -> Result<()> {
    let mut env = Env::new("fail-session").await?;
    generated_cohort(&env, 650, "Paged", generator(6_000, 1, 20.0));
    start_operator_with(&mut env, &["--test-interval-override=1h"]).await?;
    env.connect().await?;
    env.apply(&sync_yaml(
        "paged",
        "{id: 650}",
        "Dynamic",
        "  customData: {name: paged}",
    ))
    .await?;
    wait_sync_for(&env, "paged", LONG_TIMEOUT, "the first export", exported).await?;
    let first = expected_members(&env, 650);

    env.mixpanel
        .set_cohort_generator(PROJECT, 650, generator(6_000, 2, 20.0))
        .unwrap();
    let second = expected_members(&env, 650);
    let profiles = env
        .mixpanel
        .cohort_members(PROJECT, 650)
        .unwrap()
        .iter()
        .filter(|m| m.properties.is_some())
        .count();
    let pages = profiles / 1000 + 1;
    assert!(pages >= 4, "{profiles} profiles");

    // The session expires as page 2 is requested, so page 2 fails.
    let mixpanel_mark = last_request_id(&env.mixpanel.requests());
    let kameleoon_mark = last_request_id(&env.kameleoon.requests());
    env.mixpanel.add_fault(Fault::expire_session().page(2));
    request_export(&env, "paged", "after-expiry").await?;
    let sync = wait_sync_for(&env, "paged", LONG_TIMEOUT, "the export", |s| {
        exported_for(s, "after-expiry")
    })
    .await?;

    assert_exact(&env, "paged", &second, &first);
    let joined = second.difference(&first).count();
    let left = first.difference(&second).count();
    assert_eq!(
        counts_of(&sync),
        (second.len() as i64, joined as i64, left as i64)
    );
    // Only the changes went out: no member was cleared from a partial read.
    let lines = accepted_lines(&event_requests_since(&env, kameleoon_mark));
    assert_eq!(lines, (joined + left) as u64);
    let engage = engage_requests_since(&env, mixpanel_mark);
    let expired: Vec<_> = engage.iter().filter(|r| r.status == 400).collect();
    assert_eq!(expired.len(), 1, "an expired session is not retried");
    assert_eq!(expired[0].page, Some(2));
    let first_pages = engage.iter().filter(|r| r.page == Some(0)).count();
    assert_eq!(first_pages, 2, "the read restarts once from page 0");
    assert_eq!(
        engage.len(),
        2 + 1 + pages,
        "pages 0-1, failed page 2, full read"
    );
    Ok(())
}

#[tokio::test]
async fn only_leader_exports_and_successor_finishes() -> Result<()> {
    let env = Env::new("fail-leader").await?;
    generated_cohort(&env, 660, "Led", generator(20_000, 1, 20.0));
    let lease_flags = [
        "--leader-elect",
        "--leader-election-namespace",
        env.ns(),
        // Short enough for a quick takeover, long enough that a busy test
        // machine does not make the leader miss its renewals.
        "--lease-duration=8s",
        "--renew-deadline=6s",
        "--retry-period=1s",
        "--max-body-bytes=65536",
    ];
    let mut operators = [
        spawn_operator(&env, &lease_flags)?,
        spawn_operator(&env, &lease_flags)?,
    ];
    let leader = wait_until(TIMEOUT, "one leader", async || {
        let leading: Vec<usize> = (0..2)
            .filter(|i| operators[*i].logs().contains("Became leader"))
            .collect();
        match leading.as_slice() {
            [one] => Ok(*one),
            _ => Err(anyhow::anyhow!("leaders: {leading:?}")),
        }
    })
    .await?;
    let follower = 1 - leader;
    let print_logs = |operators: &[testkit::Operator; 2]| {
        for (i, operator) in operators.iter().enumerate() {
            eprintln!("operator {i} log:\n{}", operator.logs());
        }
    };

    env.connect().await?;
    env.mixpanel
        .add_fault(Fault::delay(Route::Engage, 100).times(0));
    env.kameleoon
        .add_fault(Fault::delay(Route::Events, 200).times(0));
    env.apply(&sync_yaml(
        "led",
        "{id: 660}",
        "OneTime",
        "  customData: {name: led}",
    ))
    .await?;
    let started = wait_until(LONG_TIMEOUT, "five Data API requests", async || {
        let sent = event_requests_since(&env, 0).len();
        if sent >= 5 {
            Ok(())
        } else {
            Err(anyhow::anyhow!("{sent} Data API requests"))
        }
    })
    .await;
    if started.is_err() {
        print_logs(&operators);
    }
    started?;

    let page_zero = |env: &Env| {
        engage_requests_since(env, 0)
            .into_iter()
            .filter(|r| r.page == Some(0) && r.cohort_id == Some(660))
            .collect::<Vec<_>>()
    };
    let running = operators[leader].try_wait()?.is_none();
    if !running {
        print_logs(&operators);
    }
    assert!(running, "the leader exited before the kill");
    let first_reads = page_zero(&env);
    if first_reads.len() != 1 {
        print_logs(&operators);
    }
    assert_eq!(
        first_reads.len(),
        1,
        "one process reads the cohort: {first_reads:#?}"
    );
    assert!(operators[leader].logs().contains("Export started"));
    assert!(!operators[follower].logs().contains("Export started"));
    assert!(!operators[follower].logs().contains("Became leader"));

    operators[leader].kill()?;
    env.mixpanel.clear_faults();
    env.kameleoon.clear_faults();
    let result = wait_sync_for(
        &env,
        "led",
        LONG_TIMEOUT,
        "the successor's export",
        exported,
    )
    .await;
    if result.is_err() {
        print_logs(&operators);
    }
    result?;
    assert!(operators[follower].logs().contains("Became leader"));
    assert!(operators[follower].logs().contains("Export started"));
    assert_eq!(
        page_zero(&env).len(),
        2,
        "the successor read the cohort once"
    );
    let members = expected_members(&env, 660);
    assert_exact(&env, "led", &members, &BTreeSet::new());

    let lease: Lease = Api::namespaced(env.cluster.client(), env.ns())
        .get("kameleoon-cohort-operator")
        .await?;
    let holder = lease
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(
        holder.ends_with(&format!("_{}", operators[follower].pid())),
        "lease held by {holder}"
    );
    Ok(())
}

#[tokio::test]
async fn two_million_member_snapshot_round_trips() -> Result<()> {
    let env = Env::new("fail-snapshot").await?;
    env.apply(&sync_yaml("huge", "{id: 501}", "OneTime", ""))
        .await?;
    let sync = env.syncs().get("huge").await?;
    let store = MemberStore::new(env.cluster.client(), &sync)?;
    let target = Target {
        site_code: SITE.to_string(),
        custom_data_index: 7,
        custom_data_name: "Huge".to_string(),
        match_by: MatchBy::VisitorCode,
        cohort_id: 501,
    };
    // Identifiers in common shapes: UUIDs, prefixed numbers and e-mails.
    let ids: Vec<String> = (0..2_000_000u64)
        .map(|i| {
            let hash = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i >> 7);
            match i % 3 {
                0 => format!(
                    "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
                    hash >> 32,
                    (hash >> 16) & 0xffff,
                    hash & 0xfff,
                    (hash >> 20) & 0xfff,
                    hash.rotate_left(17) & 0xffff_ffff_ffff
                ),
                1 => format!("user-{i:08}"),
                _ => format!("{:x}@example.test", hash & 0xff_ffff_ffff),
            }
        })
        .collect();
    let set = MemberSet::from_ids(ids.iter().map(String::as_str));
    assert_eq!(set.len(), 2_000_000);
    drop(ids);

    let written = store
        .save(
            &target,
            SnapshotKind::Exported,
            set.iter().map(Ok::<_, io::Error>),
        )
        .await?;
    assert_eq!(written.members, 2_000_000);
    let secrets = member_secrets(&env).await?;
    assert!(secrets.len() >= 2, "{} chunks", secrets.len());
    for secret in &secrets {
        let data = secret.data.as_ref().expect("chunk data");
        let bytes: usize = data.values().map(|v| v.0.len()).sum();
        assert!(bytes <= CHUNK_BYTES, "a chunk holds {bytes} bytes");
        // Secrets hold at most 1 MiB of data; etcd stores objects up to 1.5 MiB.
        assert!(bytes < 1024 * 1024);
        let object = serde_json::to_vec(secret)?.len();
        assert!(object < 1536 * 1024, "a chunk object has {object} bytes");
        assert_eq!(secret.immutable, Some(true));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(Some(&owner.uid), sync.metadata.uid.as_ref());
    }

    let loaded = store.load().await?.expect("the snapshot is complete");
    assert_eq!(loaded.members, 2_000_000);
    assert_eq!(loaded.target, target);
    let mut count = 0usize;
    for (stored, original) in loaded.ids().zip(set.iter()) {
        assert_eq!(stored?, original);
        count += 1;
    }
    assert_eq!(count, 2_000_000);

    // A smaller snapshot replaces it, and the old chunks go.
    let chunks = secrets.len();
    store
        .save(
            &target,
            SnapshotKind::Exported,
            set.iter().take(10).map(Ok::<_, io::Error>),
        )
        .await?;
    let secrets = member_secrets(&env).await?;
    assert_eq!(secrets.len(), 1, "{chunks} old chunks were left behind");
    let loaded = store.load().await?.expect("the new snapshot");
    assert_eq!(loaded.members, 10);
    Ok(())
}
