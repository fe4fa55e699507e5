//! Helpers of the failure tests: operators with chosen flags, the members a
//! cohort should have in Kameleoon, exact-state checks, a record of every
//! condition a sync showed, and an admission policy that blocks chosen
//! Secret writes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kameleoon_cohort_operator::crd::CohortSync;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::Value;
use standins::RequestRecord;
use standins::kameleoon::IdentifierKind;
use standins::seed::{CohortSeed, GeneratorSeed, MemberSeed};
use testkit::{Operator, Result, anyhow, wait_until};

use crate::support::*;

/// Maximum wait for an export of tens of thousands of members, with the
/// stand-ins slowed down on purpose.
pub const LONG_TIMEOUT: Duration = Duration::from_secs(240);

/// Profile property that overrides the identifier sent to Kameleoon.
const MAPPING_PROPERTY: &str = "$kameleoon_mapping_id";

/// Builds the command line of an operator of `env` with extra flags. A flag written as
/// `--name=value` replaces the value [`Env::args`] gives `--name`; other
/// flags are appended.
pub fn operator_args(env: &Env, extra: &[&str]) -> Vec<String> {
    let mut args = env.args(&[]);
    for flag in extra {
        let replaced = flag.split_once('=').is_some_and(|(name, value)| {
            match args.iter().position(|a| a == name) {
                Some(at) if at + 1 < args.len() => {
                    args[at + 1] = value.to_string();
                    true
                }
                _ => false,
            }
        });
        if !replaced {
            args.push(flag.to_string());
        }
    }
    args
}

/// Starts an operator process of `env` that the caller owns.
pub fn spawn_operator(env: &Env, extra: &[&str]) -> Result<Operator> {
    let args = operator_args(env, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let kubeconfig = env.cluster.kubeconfig_path().to_string_lossy().to_string();
    Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[("KUBECONFIG", &kubeconfig)],
    )
}

/// Starts (or restarts) the operator of `env` with [`operator_args`].
pub async fn start_operator_with(env: &mut Env, extra: &[&str]) -> Result<()> {
    env.stop_operator().await?;
    env.operator_args = operator_args(env, extra);
    env.operator = Some(spawn_operator(env, extra)?);
    Ok(())
}

/// Kills the operator of `env` with SIGKILL, as a node failure would.
pub fn kill_operator(env: &mut Env) -> Result<()> {
    let mut operator = env
        .operator
        .take()
        .ok_or_else(|| anyhow::anyhow!("no operator runs"))?;
    operator.kill()?;
    eprintln!(
        "killed the operator; its log is {}",
        operator.log_path().display()
    );
    Ok(())
}

/// Creates a cohort of generated members in project [`PROJECT`].
pub fn generated_cohort(env: &Env, id: u64, name: &str, generator: GeneratorSeed) {
    let cohort = CohortSeed {
        id,
        name: name.to_string(),
        description: String::new(),
        created: None,
        is_visible: true,
        members: Vec::new(),
        generate: Some(generator),
        availability: None,
    };
    env.mixpanel.set_cohort(PROJECT, cohort).unwrap();
}

/// Creates a cohort of the given members in project [`PROJECT`].
pub fn listed_cohort(env: &Env, id: u64, name: &str, members: Vec<MemberSeed>) {
    let cohort = CohortSeed {
        id,
        name: name.to_string(),
        description: String::new(),
        created: None,
        is_visible: true,
        members,
        generate: None,
        availability: None,
    };
    env.mixpanel.set_cohort(PROJECT, cohort).unwrap();
}

/// Returns a generator of `count` members, `percent_anonymous` of them without a
/// profile and 30 % matched by a mapping identifier.
pub fn generator(count: u64, seed: u64, percent_anonymous: f64) -> GeneratorSeed {
    GeneratorSeed {
        seed,
        percent_anonymous,
        percent_mapping_id: 30.0,
        ..GeneratorSeed::new(count)
    }
}

/// Returns the identifiers a cohort's members should carry in Kameleoon: the mapping
/// identifier when the profile has a non-empty one, the distinct id
/// otherwise, and nothing for members without a profile.
pub fn expected_members(env: &Env, cohort: u64) -> BTreeSet<String> {
    env.mixpanel
        .cohort_members(PROJECT, cohort)
        .unwrap()
        .into_iter()
        .filter_map(|member| {
            let properties = member.properties?;
            if let Some(Value::String(mapping)) = properties.get(MAPPING_PROPERTY)
                && !mapping.trim().is_empty()
            {
                return Some(mapping.clone());
            }
            let id = member.distinct_id.to_text();
            (!id.starts_with("$device:")).then_some(id)
        })
        .collect()
}

/// Returns the values per visitor code of a custom data, none when it does
/// not exist.
pub fn kameleoon_values(env: &Env, custom_data: &str) -> BTreeMap<String, Vec<String>> {
    let Some(data) = env.kameleoon.custom_data_named(SITE, custom_data).unwrap() else {
        return BTreeMap::new();
    };
    env.kameleoon.state(SITE, data.index).unwrap().visitor_codes
}

/// Checks that exactly `members` carry `true` for a custom data, that
/// everyone in `former` who is not a member carries `false`, and that no
/// identifier carries anything else.
pub fn check_exact(
    env: &Env,
    custom_data: &str,
    members: &BTreeSet<String>,
    former: &BTreeSet<String>,
) -> std::result::Result<(), String> {
    let values = kameleoon_values(env, custom_data);
    let mut carrying_true = BTreeSet::new();
    let mut carrying_false = BTreeSet::new();
    for (id, set) in &values {
        match set.as_slice() {
            [value] if value == "true" => carrying_true.insert(id.clone()),
            [value] if value == "false" => carrying_false.insert(id.clone()),
            other => return Err(format!("{id} carries {other:?} for {custom_data:?}")),
        };
    }
    let missing: Vec<&String> = members.difference(&carrying_true).take(5).collect();
    let extra: Vec<&String> = carrying_true.difference(members).take(5).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(format!(
            "{custom_data:?}: {} carry true, {} expected; members without true (first 5): {missing:?}; \
             non-members with true (first 5): {extra:?}",
            carrying_true.len(),
            members.len()
        ));
    }
    let not_cleared: Vec<&String> = former
        .difference(members)
        .filter(|id| !carrying_false.contains(*id))
        .take(5)
        .collect();
    if !not_cleared.is_empty() {
        return Err(format!(
            "{custom_data:?}: former members without false (first 5): {not_cleared:?}"
        ));
    }
    Ok(())
}

/// Asserts [`check_exact`].
pub fn assert_exact(
    env: &Env,
    custom_data: &str,
    members: &BTreeSet<String>,
    former: &BTreeSet<String>,
) {
    if let Err(why) = check_exact(env, custom_data, members, former) {
        panic!("Kameleoon state is not exact: {why}");
    }
}

/// Returns the visitor codes that carry `value` for a custom data.
pub fn carrying(env: &Env, custom_data: &str, value: &str) -> BTreeSet<String> {
    let Some(data) = env.kameleoon.custom_data_named(SITE, custom_data).unwrap() else {
        return BTreeSet::new();
    };
    env.kameleoon
        .state(SITE, data.index)
        .unwrap()
        .with_value(IdentifierKind::VisitorCode, value)
}

/// Returns the id of the newest request in `records`, to count the
/// requests that follow.
pub fn last_request_id(records: &[RequestRecord]) -> u64 {
    records.iter().map(|r| r.id).max().unwrap_or(0)
}

/// Returns the Data API requests of the Kameleoon stand-in after a request id.
pub fn event_requests_since(env: &Env, since: u64) -> Vec<RequestRecord> {
    env.kameleoon
        .requests_since(since)
        .into_iter()
        .filter(|r| r.path == "/visit/events")
        .collect()
}

/// Returns the Engage requests of the Mixpanel stand-in after a request id.
pub fn engage_requests_since(env: &Env, since: u64) -> Vec<RequestRecord> {
    env.mixpanel
        .requests_since(since)
        .into_iter()
        .filter(|r| r.path.ends_with("/engage"))
        .collect()
}

/// Counts the event lines Kameleoon accepted in the given requests.
pub fn accepted_lines(requests: &[RequestRecord]) -> u64 {
    requests.iter().filter_map(|r| r.accepted_lines).sum()
}

/// Asks for an export now through the sync request annotation.
pub async fn request_export(env: &Env, sync: &str, value: &str) -> Result<()> {
    env.cluster
        .kubectl(
            &[
                "annotate",
                "--overwrite",
                "-n",
                env.ns(),
                &format!("csync/{sync}"),
                &format!("cohortsync.io/sync-requested-at={value}"),
            ],
            None,
        )
        .await?
        .ensure_success()?;
    Ok(())
}

/// Merge-patches a sync's spec.
pub async fn patch_spec(env: &Env, sync: &str, spec: Value) -> Result<()> {
    let patch = serde_json::json!({ "spec": spec });
    env.syncs()
        .patch(
            sync,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// Checks that the export asked for with `request` finished and the sync is Ready.
pub fn exported_for(sync: &CohortSync, request: &str) -> std::result::Result<(), String> {
    let status = sync.status.as_ref().ok_or("no status")?;
    if status.last_handled_sync_request.as_deref() != Some(request) {
        return Err(format!("request {request:?} not handled yet"));
    }
    exported(sync)
}

/// Waits like [`Env::wait_sync`], with a chosen timeout.
pub async fn wait_sync_for(
    env: &Env,
    name: &str,
    timeout: Duration,
    description: &str,
    check: impl Fn(&CohortSync) -> std::result::Result<(), String>,
) -> Result<CohortSync> {
    let api = env.syncs();
    let result = wait_until(timeout, description, async || {
        let sync = api.get(name).await?;
        match check(&sync) {
            Ok(()) => Ok(sync),
            Err(why) => Err(anyhow::anyhow!("{why}; status: {}", status_json(&sync))),
        }
    })
    .await;
    if result.is_err() {
        eprintln!("operator log:\n{}", env.logs());
    }
    result
}

/// One condition as a sync showed it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeenCondition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// Every condition a sync shows while the recorder lives, from a watch, so
/// that a state held for less than a polling interval is not missed.
pub struct ConditionRecorder {
    seen: Arc<Mutex<Vec<SeenCondition>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ConditionRecorder {
    /// Starts watching the sync `name` of `env`.
    pub async fn start(env: &Env, name: &str) -> Result<ConditionRecorder> {
        let api = env.syncs();
        let seen: Arc<Mutex<Vec<SeenCondition>>> = Arc::default();
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let sink = seen.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
            while let Some(event) = stream.next().await {
                let objects: Vec<CohortSync> = match event {
                    Ok(watcher::Event::Apply(sync) | watcher::Event::InitApply(sync)) => {
                        vec![sync]
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                let mut seen = sink.lock().unwrap();
                for sync in objects {
                    for c in sync.status.iter().flat_map(|s| s.conditions.iter()) {
                        let entry = SeenCondition {
                            type_: c.type_.clone(),
                            status: c.status.clone(),
                            reason: c.reason.clone(),
                            message: c.message.clone(),
                        };
                        if !seen.contains(&entry) {
                            seen.push(entry);
                        }
                    }
                }
            }
        });
        tokio::time::timeout(TIMEOUT, ready_rx)
            .await
            .map_err(|_| anyhow::anyhow!("the watch of {name} did not start"))??;
        Ok(ConditionRecorder { seen, task })
    }

    /// Returns the conditions seen so far, in the order they first appeared.
    pub fn seen(&self) -> Vec<SeenCondition> {
        self.seen.lock().unwrap().clone()
    }

    /// Returns the first condition seen with this type, status and reason.
    pub fn find(&self, type_: &str, status: &str, reason: &str) -> Option<SeenCondition> {
        self.seen()
            .into_iter()
            .find(|c| c.type_ == type_ && c.status == status && c.reason == reason)
    }

    /// Asserts that the sync showed `Reconciling=True` with `reason`, and
    /// returns its message.
    pub fn assert_reconciling(&self, reason: &str) -> String {
        match self.find("Reconciling", "True", reason) {
            Some(condition) => condition.message,
            None => panic!(
                "Reconciling=True with reason {reason} was never shown; seen: {:#?}",
                self.seen()
            ),
        }
    }
}

impl Drop for ConditionRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lists the Events of the test namespace about one object with one reason.
pub async fn events_about(env: &Env, object: &str, reason: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(env.cluster.client(), env.ns());
    let events = api.list(&ListParams::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .collect())
}

/// Lists the member-store Secrets of the test namespace.
pub async fn member_secrets(env: &Env) -> Result<Vec<Secret>> {
    let api: Api<Secret> = Api::namespaced(env.cluster.client(), env.ns());
    let list = api
        .list(&ListParams::default().labels("cohortsync.io/sync-uid"))
        .await?;
    Ok(list.items)
}

/// A ValidatingAdmissionPolicy that denies creating member-store Secrets of
/// the test namespace that record exactly `members` identifiers: the write
/// of an export's final snapshot, when the union written before it has
/// more identifiers. Removed by [`BlockedSnapshot::remove`] or on drop.
pub struct BlockedSnapshot {
    name: String,
    kubectl: std::path::PathBuf,
    kubeconfig: std::path::PathBuf,
    namespace: String,
    members: usize,
}

impl BlockedSnapshot {
    /// Installs the policy and waits until the API server enforces it.
    pub async fn install(env: &Env, members: usize) -> Result<BlockedSnapshot> {
        let name = format!("block-snapshot-{}", env.ns());
        let namespace = env.ns().to_string();
        let yaml = format!(
            r#"
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [""]
        apiVersions: [v1]
        operations: [CREATE]
        resources: [secrets]
  validations:
    - expression: >-
        object.type != 'cohortsync.io/members' ||
        !has(object.metadata.annotations) ||
        !('cohortsync.io/members' in object.metadata.annotations) ||
        object.metadata.annotations['cohortsync.io/members'] != '{members}'
      message: the test blocks the snapshot of {members} members
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {namespace}}}
"#
        );
        env.cluster.apply("", &yaml).await?;
        let blocked = BlockedSnapshot {
            name,
            kubectl: env.cluster.tools_bin().join("kubectl"),
            kubeconfig: env.cluster.kubeconfig_path().to_path_buf(),
            namespace,
            members,
        };
        blocked.wait_enforced(env, true).await?;
        Ok(blocked)
    }

    /// Removes the policy and waits until the API server lets the write through.
    pub async fn remove(self, env: &Env) -> Result<()> {
        env.cluster
            .kubectl(
                &[
                    "delete",
                    "validatingadmissionpolicybinding,validatingadmissionpolicy",
                    &self.name,
                    "--ignore-not-found",
                ],
                None,
            )
            .await?
            .ensure_success()?;
        self.wait_enforced(env, false).await
    }

    /// Waits until a server-side dry run of a matching Secret is denied
    /// (`denied`) or admitted.
    async fn wait_enforced(&self, env: &Env, denied: bool) -> Result<()> {
        let api: Api<Secret> = Api::namespaced(env.cluster.client(), &self.namespace);
        let probe = Secret {
            metadata: ObjectMeta {
                name: Some("admission-probe".into()),
                annotations: Some(BTreeMap::from([(
                    "cohortsync.io/members".to_string(),
                    self.members.to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("cohortsync.io/members".into()),
            ..Secret::default()
        };
        let params = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        let state = if denied { "denied" } else { "admitted" };
        wait_until(
            TIMEOUT,
            &format!("the snapshot probe to be {state}"),
            async || match api.create(&params, &probe).await {
                Ok(_) if !denied => Ok(()),
                Err(kube::Error::Api(e)) if denied && e.message.contains("blocks the snapshot") => {
                    Ok(())
                }
                Ok(_) => Err(anyhow::anyhow!("the probe was admitted")),
                Err(e) => Err(anyhow::anyhow!("the probe failed: {e}")),
            },
        )
        .await
    }
}

impl Drop for BlockedSnapshot {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.kubectl)
            .args([
                "delete",
                "validatingadmissionpolicybinding,validatingadmissionpolicy",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
