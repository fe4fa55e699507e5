//! Shared set-up of the end-to-end tests.

use std::collections::BTreeMap;
use std::time::Duration;

use kameleoon_cohort_operator::crd::{CohortSync, KameleoonConnection};
use kube::api::Api;
use serde_json::{Value, json};
use standins::kameleoon::IdentifierKind;
use standins::seed::{MemberSeed, ProfileSeed};
use standins::{KameleoonConfig, KameleoonStandin, MixpanelConfig, MixpanelStandin, Seed};
use testkit::{Cluster, Operator, Result, TempNamespace, wait_until};
use tokio::sync::OnceCell;

/// Longest wait for the operator to reach a state.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Kameleoon site code of the seed.
pub const SITE: &str = "abc123xyz0";

/// Mixpanel project of the seed.
pub const PROJECT: u64 = 1111;

/// Seed shared by the tests: one Mixpanel project, one Kameleoon site.
pub const SEED: &str = r#"
mixpanel:
  service_accounts:
    - {username: sa.growth, secret: mp-secret-1, projects: [1111]}
  projects:
    - id: 1111
      api_access: true
      profiles:
        - {distinct_id: u-100, properties: {$email: ana@example.test}}
        - {distinct_id: u-200, properties: {$email: ben@example.test, $kameleoon_mapping_id: crm-200}}
        - {distinct_id: u-300, properties: {$email: cy@example.test}}
      cohorts:
        - id: 501
          name: Song Sharers
          members: [u-100, u-200, u-300, "$device:7f3a-11", 4242]
        - {id: 502, name: Churn Risk, members: [u-200, u-300]}
        - {id: 503, name: Twins, members: [u-100]}
        - {id: 504, name: Twins, members: [u-200]}
        - {id: 505, name: Empty, members: []}
kameleoon:
  clients:
    - {client_id: growth-operator, client_secret: km-secret-1, sites: [abc123xyz0]}
  sites:
    - id: 31337
      code: abc123xyz0
      name: Shop
      url: https://shop.example.test
      custom_datas:
        - {name: CRM user id, index: 0, format: STRING, is_mapping_identifier: true}
"#;

static CRDS: OnceCell<()> = OnceCell::const_new();

/// Installs the CRDs once per test process and waits until they serve.
async fn install_crds(cluster: &Cluster) -> Result<()> {
    CRDS.get_or_try_init(|| async {
        let yaml = kameleoon_cohort_operator::crd::definitions_yaml()?;
        cluster.apply_crds(&yaml).await
    })
    .await?;
    Ok(())
}

/// One test's namespace, stand-ins and operator.
pub struct Env {
    pub cluster: &'static Cluster,
    pub namespace: TempNamespace,
    pub mixpanel: MixpanelStandin,
    pub kameleoon: KameleoonStandin,
    pub operator: Option<Operator>,
    pub operator_args: Vec<String>,
}

impl Env {
    /// Starts the stand-ins from [`SEED`] and creates a namespace; the
    /// operator is started separately so tests can pick its flags.
    pub async fn new(prefix: &str) -> Result<Env> {
        Self::with(
            prefix,
            MixpanelConfig::default(),
            KameleoonConfig::default(),
        )
        .await
    }

    /// Like [`Env::new`], with stand-in settings.
    pub async fn with(
        prefix: &str,
        mixpanel: MixpanelConfig,
        kameleoon: KameleoonConfig,
    ) -> Result<Env> {
        let cluster = Cluster::shared().await;
        install_crds(cluster).await?;
        let seed = Seed::parse(SEED)?;
        let mixpanel = MixpanelStandin::start(seed.mixpanel, mixpanel).await?;
        let kameleoon = KameleoonStandin::start(seed.kameleoon, kameleoon).await?;
        let namespace = TempNamespace::new(cluster, prefix).await?;
        Ok(Env {
            cluster,
            namespace,
            mixpanel,
            kameleoon,
            operator: None,
            operator_args: Vec::new(),
        })
    }

    /// Namespace name.
    pub fn ns(&self) -> &str {
        self.namespace.name()
    }

    /// Command line of an operator for this test.
    pub fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "run",
            "--namespace",
            self.ns(),
            "--metrics-address",
            "127.0.0.1:0",
            "--health-address",
            "127.0.0.1:0",
            "--mixpanel-url",
            &self.mixpanel.url(),
            "--kameleoon-api-url",
            &self.kameleoon.url(),
            "--kameleoon-data-url",
            &self.kameleoon.url(),
            "--progress-interval",
            "500ms",
            "--failure-backoff-base",
            "2s",
            "--failure-backoff-max",
            "10s",
            "--request-retry-base",
            "200ms",
            "--log-level",
            "info,kameleoon_cohort_operator=debug",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts (or restarts) the operator with extra flags.
    pub async fn start_operator(&mut self, extra: &[&str]) -> Result<()> {
        self.stop_operator().await?;
        self.operator_args = self.args(extra);
        let args: Vec<&str> = self.operator_args.iter().map(String::as_str).collect();
        let kubeconfig = self.cluster.kubeconfig_path().to_string_lossy().to_string();
        let operator = Operator::spawn(
            env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
            &args,
            &[("KUBECONFIG", &kubeconfig)],
        )?;
        self.operator = Some(operator);
        Ok(())
    }

    /// Stops the operator with SIGTERM, if one runs.
    pub async fn stop_operator(&mut self) -> Result<()> {
        if let Some(mut operator) = self.operator.take() {
            operator.terminate().await?;
        }
        Ok(())
    }

    /// Logs of the running operator.
    pub fn logs(&self) -> String {
        self.operator
            .as_ref()
            .map(Operator::logs)
            .unwrap_or_default()
    }

    /// Applies manifests in the test namespace.
    pub async fn apply(&self, yaml: &str) -> Result<()> {
        self.cluster.apply(self.ns(), yaml).await?;
        Ok(())
    }

    /// Creates the two Secrets and the connection `production` of the seed.
    pub async fn connect(&self) -> Result<()> {
        self.apply(&secrets_yaml("mp-secret-1", "km-secret-1"))
            .await?;
        self.apply(CONNECTION).await
    }

    /// API of CohortSyncs in the test namespace.
    pub fn syncs(&self) -> Api<CohortSync> {
        Api::namespaced(self.cluster.client(), self.ns())
    }

    /// API of KameleoonConnections in the test namespace.
    pub fn connections(&self) -> Api<KameleoonConnection> {
        Api::namespaced(self.cluster.client(), self.ns())
    }

    /// Waits until a sync satisfies `check`, which returns why not otherwise.
    pub async fn wait_sync(
        &self,
        name: &str,
        description: &str,
        check: impl Fn(&CohortSync) -> std::result::Result<(), String>,
    ) -> Result<CohortSync> {
        let api = self.syncs();
        let result = wait_until(TIMEOUT, description, async || {
            let sync = api.get(name).await?;
            match check(&sync) {
                Ok(()) => Ok(sync),
                Err(why) => Err(testkit::anyhow::anyhow!(
                    "{why}; status: {}",
                    status_json(&sync)
                )),
            }
        })
        .await;
        if result.is_err() {
            eprintln!("operator log:\n{}", self.logs());
        }
        result
    }

    /// Waits until a sync has a condition with the given status and reason.
    pub async fn wait_condition(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Result<CohortSync> {
        self.wait_sync(
            name,
            &format!("{name} {type_}={status} ({reason})"),
            |sync| {
                condition_is(
                    sync.status
                        .as_ref()
                        .map(|s| s.conditions.as_slice())
                        .unwrap_or_default(),
                    type_,
                    status,
                    reason,
                )
            },
        )
        .await
    }

    /// Waits until a connection has a condition with the given status and reason.
    pub async fn wait_connection(
        &self,
        name: &str,
        type_: &str,
        status: &str,
        reason: &str,
    ) -> Result<KameleoonConnection> {
        let api = self.connections();
        let result = wait_until(
            TIMEOUT,
            &format!("connection {name} {type_}={status} ({reason})"),
            async || {
                let connection = api.get(name).await?;
                let conditions = connection
                    .status
                    .as_ref()
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default();
                condition_is(conditions, type_, status, reason).map_err(|why| {
                    testkit::anyhow::anyhow!(
                        "{why}: {}",
                        serde_json::to_string(&connection.status).unwrap()
                    )
                })?;
                Ok(connection)
            },
        )
        .await;
        if result.is_err() {
            eprintln!("operator log:\n{}", self.logs());
        }
        result
    }

    /// Identifiers whose value for a custom data is exactly `value`.
    pub fn carrying(&self, custom_data: &str, value: &str) -> BTreeMap<String, String> {
        let Some(data) = self.kameleoon.custom_data_named(SITE, custom_data).unwrap() else {
            return BTreeMap::new();
        };
        let values = self.kameleoon.state(SITE, data.index).unwrap();
        values
            .with_value(IdentifierKind::VisitorCode, value)
            .into_iter()
            .map(|id| (id, value.to_string()))
            .collect()
    }

    /// Visitor codes carrying `true` for a custom data.
    pub fn members_in_kameleoon(&self, custom_data: &str) -> Vec<String> {
        self.carrying(custom_data, "true").into_keys().collect()
    }

    /// Data API requests received so far.
    pub fn event_requests(&self) -> usize {
        self.kameleoon
            .requests()
            .iter()
            .filter(|r| r.path == "/visit/events")
            .count()
    }

    /// Engage requests received so far.
    pub fn engage_requests(&self) -> usize {
        self.mixpanel
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/engage"))
            .count()
    }

    /// Replaces a cohort's members with identified profiles of the given ids.
    pub fn set_members(&self, cohort: u64, ids: &[&str]) {
        let members = ids
            .iter()
            .map(|id| {
                MemberSeed::Profile(ProfileSeed::new(
                    *id,
                    json!({"$email": format!("{id}@example.test")}),
                ))
            })
            .collect();
        self.mixpanel
            .set_cohort_members(PROJECT, cohort, members)
            .unwrap();
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(operator) = self.operator.as_mut() {
            let _ = operator.kill();
        }
    }
}

/// The connection `production` of the seed.
pub const CONNECTION: &str = r#"
apiVersion: cohortsync.io/v1alpha1
kind: KameleoonConnection
metadata: {name: production}
spec:
  kameleoon:
    siteCode: abc123xyz0
    credentialsSecretRef: {name: kameleoon-api}
  mixpanel:
    projectId: 1111
    credentialsSecretRef: {name: mixpanel-service-account}
"#;

/// The two Secrets, with the given Mixpanel and Kameleoon secrets.
pub fn secrets_yaml(mixpanel_secret: &str, kameleoon_secret: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: mixpanel-service-account}}
stringData: {{username: sa.growth, secret: {mixpanel_secret}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: kameleoon-api}}
stringData: {{clientId: growth-operator, clientSecret: {kameleoon_secret}}}
"#
    )
}

/// A CohortSync manifest.
pub fn sync_yaml(name: &str, cohort: &str, sync_type: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: cohortsync.io/v1alpha1
kind: CohortSync
metadata: {{name: {name}}}
spec:
  connectionRef: {{name: production}}
  cohort: {cohort}
  syncType: {sync_type}
{extra}
"#
    )
}

/// Checks one condition.
pub fn condition_is(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
    status: &str,
    reason: &str,
) -> std::result::Result<(), String> {
    match conditions.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == status && (reason.is_empty() || c.reason == reason) => Ok(()),
        Some(c) => Err(format!(
            "{type_} is {} ({}: {})",
            c.status, c.reason, c.message
        )),
        None => Err(format!("no {type_} condition")),
    }
}

/// Message of a connection's Connected condition, empty without one.
pub fn connected_message(connection: &KameleoonConnection) -> String {
    connection
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Connected"))
        .map(|c| c.message.clone())
        .unwrap_or_default()
}

/// Status of a sync as JSON, for failure messages.
pub fn status_json(sync: &CohortSync) -> Value {
    serde_json::to_value(&sync.status).unwrap_or(Value::Null)
}

/// Succeeded once the sync's last attempt succeeded for its current generation.
pub fn exported(sync: &CohortSync) -> std::result::Result<(), String> {
    let status = sync.status.as_ref().ok_or("no status")?;
    if status.last_exported_generation != sync.metadata.generation {
        return Err("not exported for the current generation".into());
    }
    condition_is(&status.conditions, "Ready", "True", "Succeeded")
}
