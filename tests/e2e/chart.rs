//! The Helm chart: lint, rendering with default and unusual values, the
//! values schema, a real install and upgrade, and the operator running with
//! exactly the RBAC the chart grants.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::anyhow::{Context, anyhow, bail, ensure};
use testkit::{Cluster, Operator, Result, TempNamespace, repo_root, tools_bin, wait_until};

use crate::operations::json_log_lines;
use crate::support::*;

/// Chart directory, relative to the repository root.
pub const CHART: &str = "charts/kameleoon-cohort-operator";

/// Upper bound of one helm run.
const HELM_TIMEOUT: Duration = Duration::from_secs(180);

pub fn chart_dir() -> PathBuf {
    repo_root().join(CHART)
}

/// Output of one helm run.
pub struct HelmOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl HelmOutput {
    pub fn ensure_success(self, what: &str) -> Result<HelmOutput> {
        ensure!(self.success, "helm {what} failed: {}", self.stderr.trim());
        Ok(self)
    }
}

/// Runs helm with its configuration, cache and data under `.tmp/helm-home`,
/// so a test never reads or writes the user's helm setup. Without a
/// kubeconfig, helm gets a path that does not exist and can reach no cluster.
pub async fn helm(kubeconfig: Option<&Path>, args: &[&str]) -> Result<HelmOutput> {
    let home = repo_root().join(".tmp/helm-home");
    let kubeconfig = kubeconfig
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/nonexistent/helm-needs-no-cluster"));
    let child = tokio::process::Command::new(tools_bin()?.join("helm"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting helm")?;
    let output = tokio::time::timeout(HELM_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("helm {} timed out after {HELM_TIMEOUT:?}", args.join(" ")))??;
    Ok(HelmOutput {
        success: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Writes a values file under `.tmp/chart-tests` and returns its path.
pub fn values_file(yaml: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = repo_root().join(".tmp/chart-tests");
    std::fs::create_dir_all(&dir)?;
    let number = COUNTER.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("values-{}-{number}.yaml", std::process::id()));
    std::fs::write(&path, yaml)?;
    Ok(path)
}

/// Runs `helm template` with a values file and returns its raw output.
pub async fn template_output(release: &str, namespace: &str, values: &str) -> Result<HelmOutput> {
    let file = values_file(values)?;
    let chart = chart_dir();
    helm(
        None,
        &[
            "template",
            release,
            &chart.to_string_lossy(),
            "--namespace",
            namespace,
            "--values",
            &file.to_string_lossy(),
        ],
    )
    .await
}

/// Renders the chart and returns its objects.
pub async fn render(release: &str, namespace: &str, values: &str) -> Result<Vec<Value>> {
    let output = template_output(release, namespace, values)
        .await?
        .ensure_success("template")?;
    parse_documents(&output.stdout)
}

/// Parses a YAML stream into its non-empty documents.
pub fn parse_documents(yaml: &str) -> Result<Vec<Value>> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(document)?;
        if !value.is_null() {
            documents.push(value);
        }
    }
    Ok(documents)
}

/// The object of a kind and name among rendered documents.
pub fn find<'a>(documents: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    documents
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn objects_of<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

/// `kind/name` of every object, with `namespace/` in front when it has one.
fn inventory(documents: &[Value]) -> BTreeSet<String> {
    documents
        .iter()
        .map(|d| {
            let kind = d["kind"].as_str().unwrap_or("?");
            let name = d["metadata"]["name"].as_str().unwrap_or("?");
            match d["metadata"]["namespace"].as_str() {
                Some(ns) => format!("{ns}/{kind}/{name}"),
                None => format!("{kind}/{name}"),
            }
        })
        .collect()
}

/// Flattens RBAC rules into `group resource verb` strings, with the resource
/// names after a `#` when a rule lists any.
fn rule_set(role: &Value) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    for rule in role["rules"].as_array().cloned().unwrap_or_default() {
        let names = strings(&rule["resourceNames"]).join(",");
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    let entry = format!("{group} {resource} {verb}");
                    set.insert(if names.is_empty() {
                        entry
                    } else {
                        format!("{entry} #{names}")
                    });
                }
            }
        }
    }
    set
}

/// Exactly the requests the operator makes in a watched namespace.
fn expected_operator_rules() -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for verb in ["get", "list", "watch"] {
        set.insert(format!("cohortsync.io cohortsyncs {verb}"));
        set.insert(format!("cohortsync.io kameleoonconnections {verb}"));
    }
    set.insert("cohortsync.io cohortsyncs patch".into());
    set.insert("cohortsync.io cohortsyncs/status patch".into());
    set.insert("cohortsync.io kameleoonconnections/status patch".into());
    for verb in ["get", "list", "watch", "create", "delete"] {
        set.insert(format!(" secrets {verb}"));
    }
    set.insert("events.k8s.io events create".into());
    set.insert("events.k8s.io events patch".into());
    set
}

fn container(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]["containers"][0]
}

/// The container arguments of a Deployment.
pub fn container_args(deployment: &Value) -> Vec<String> {
    container(deployment)["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .filter_map(|a| a.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn app_version() -> Result<String> {
    let chart: Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml"))?)?;
    chart["appVersion"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("Chart.yaml has no appVersion"))
}

fn chart_values() -> Result<Value> {
    Ok(serde_yaml::from_str(&std::fs::read_to_string(
        chart_dir().join("values.yaml"),
    )?)?)
}

#[tokio::test]
async fn chart_lint_passes() -> Result<()> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let output = helm(None, &["lint", "--strict", &chart]).await?;
    assert!(
        output.success,
        "helm lint failed:\n{}{}",
        output.stdout, output.stderr
    );
    assert!(
        output.stdout.contains("0 chart(s) failed"),
        "{}",
        output.stdout
    );

    let unusual = values_file(UNUSUAL_VALUES)?;
    let output = helm(
        None,
        &[
            "lint",
            "--strict",
            &chart,
            "--values",
            &unusual.to_string_lossy(),
        ],
    )
    .await?;
    assert!(
        output.success,
        "helm lint with unusual values failed:\n{}{}",
        output.stdout, output.stderr
    );
    Ok(())
}

#[tokio::test]
async fn chart_default_render() -> Result<()> {
    let docs = render("demo", "cohort-system", "{}").await?;
    let name = "demo-kameleoon-cohort-operator";
    let expected: BTreeSet<String> = [
        format!("cohort-system/ServiceAccount/{name}"),
        format!("ClusterRole/{name}"),
        format!("ClusterRoleBinding/{name}"),
        format!("ClusterRole/{name}-edit"),
        format!("ClusterRole/{name}-view"),
        format!("cohort-system/Service/{name}-metrics"),
        format!("cohort-system/Deployment/{name}"),
    ]
    .into();
    assert_eq!(inventory(&docs), expected);

    let role = find(&docs, "ClusterRole", name).unwrap();
    assert_eq!(rule_set(role), expected_operator_rules());
    let binding = find(&docs, "ClusterRoleBinding", name).unwrap();
    assert_eq!(binding["roleRef"]["name"], name);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": name, "namespace": "cohort-system"}])
    );

    let deployment = find(&docs, "Deployment", name).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "Recreate",
        "without leader election, two Pods must not overlap during a rollout"
    );
    assert_eq!(
        container_args(deployment),
        [
            "run",
            "--metrics-address=0.0.0.0:8080",
            "--health-address=0.0.0.0:8081",
            "--log-format=json",
            "--log-level=info"
        ]
    );
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], name);
    let container = container(deployment);
    assert_eq!(
        container["image"],
        format!("kameleoon-cohort-operator:{}", app_version()?)
    );
    assert_eq!(
        container["ports"],
        json!([
            {"name": "metrics", "containerPort": 8080, "protocol": "TCP"},
            {"name": "health", "containerPort": 8081, "protocol": "TCP"}
        ])
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "health"})
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "health"})
    );
    assert_eq!(
        container["env"],
        json!([
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
        ])
    );
    assert_eq!(
        container["securityContext"],
        json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        })
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );

    let service = find(&docs, "Service", &format!("{name}-metrics")).unwrap();
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    let edit = find(&docs, "ClusterRole", &format!("{name}-edit")).unwrap();
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"],
        "true"
    );
    assert!(rule_set(edit).contains("cohortsync.io cohortsyncs create"));
    assert!(
        !rule_set(edit).iter().any(|rule| rule.contains("/status")),
        "editors must not write status"
    );
    let view = find(&docs, "ClusterRole", &format!("{name}-view")).unwrap();
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    assert!(
        rule_set(view).iter().all(|rule| rule.ends_with(" get")
            || rule.ends_with(" list")
            || rule.ends_with(" watch")),
        "the view role must only read: {:?}",
        rule_set(view)
    );
    Ok(())
}

/// Values a cautious platform team might set all at once.
const UNUSUAL_VALUES: &str = r#"
replicaCount: 3
watchNamespaces: [growth, marketing]
image:
  repository: registry.example.com/platform/kameleoon-cohort-operator
  tag: "1.2.3"
metrics:
  serviceMonitor:
    enabled: true
    labels: {release: prometheus}
podDisruptionBudget:
  enabled: true
  minAvailable: 1
grafanaDashboard:
  enabled: true
  namespace: monitoring
prometheusRule:
  enabled: true
  alertLabels: {severity: critical, team: growth}
operator:
  maxBodyBytes: 1048576
  requestTimeout: 90s
  exportsPerProject: 3
  countFollowUpPages: true
extraArgs: ["--cohort-cache-ttl=10m"]
extraEnv:
  - {name: RUST_BACKTRACE, value: "1"}
securityContext:
  runAsUser: 1000
  runAsGroup: 1000
podSecurityContext:
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
podLabels: {team: growth}
podAnnotations: {example.com/owner: growth}
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: dedicated, operator: Equal, value: operators, effect: NoSchedule}]
logFormat: text
logLevel: info,kameleoon_cohort_operator=debug
"#;

#[tokio::test]
async fn chart_unusual_values_render() -> Result<()> {
    let docs = render("ops", "cohort-system", UNUSUAL_VALUES).await?;
    let name = "ops-kameleoon-cohort-operator";

    // A Role per watched namespace instead of cluster-wide rights.
    assert!(
        find(&docs, "ClusterRole", name).is_none(),
        "{:?}",
        inventory(&docs)
    );
    assert!(find(&docs, "ClusterRoleBinding", name).is_none());
    for namespace in ["growth", "marketing"] {
        let role = objects_of(&docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] == namespace)
            .unwrap_or_else(|| panic!("no Role in {namespace}"));
        assert_eq!(rule_set(role), expected_operator_rules());
        let binding = objects_of(&docs, "RoleBinding")
            .into_iter()
            .find(|b| b["metadata"]["namespace"] == namespace)
            .unwrap_or_else(|| panic!("no RoleBinding in {namespace}"));
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["namespace"], "cohort-system");
    }

    // More than one replica turns leader election on, with a Lease Role in
    // the release namespace that names this release's Lease.
    let lease_role = find(&docs, "Role", &format!("{name}-leader-election")).unwrap();
    assert_eq!(lease_role["metadata"]["namespace"], "cohort-system");
    let expected_lease_rules: BTreeSet<String> = [
        "coordination.k8s.io leases create".to_string(),
        format!("coordination.k8s.io leases get #{name}"),
        format!("coordination.k8s.io leases update #{name}"),
    ]
    .into();
    assert_eq!(rule_set(lease_role), expected_lease_rules);

    let deployment = find(&docs, "Deployment", name).unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert!(
        deployment["spec"]["strategy"].is_null(),
        "leader election allows rolling updates"
    );
    let args = container_args(deployment);
    for expected in [
        "--namespace=growth",
        "--namespace=marketing",
        "--leader-elect",
        &format!("--leader-election-id={name}"),
        "--log-format=text",
        "--log-level=info,kameleoon_cohort_operator=debug",
        "--max-body-bytes=1048576",
        "--request-timeout=90s",
        "--exports-per-project=3",
        "--count-follow-up-pages",
    ] {
        assert!(
            args.iter().any(|a| a == expected),
            "{expected} missing from {args:?}"
        );
    }
    assert_eq!(
        args.last().map(String::as_str),
        Some("--cohort-cache-ttl=10m")
    );
    let container = container(deployment);
    assert_eq!(
        container["image"],
        "registry.example.com/platform/kameleoon-cohort-operator:1.2.3"
    );
    assert_eq!(
        container["env"][2],
        json!({"name": "RUST_BACKTRACE", "value": "1"})
    );
    // Values merge into the defaults: the hardening the user did not touch stays.
    let security = &container["securityContext"];
    assert_eq!(security["runAsUser"], 1000);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    let pod = &deployment["spec"]["template"];
    assert_eq!(pod["spec"]["securityContext"]["fsGroup"], 1000);
    assert_eq!(pod["metadata"]["labels"]["team"], "growth");
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner"],
        "growth"
    );
    assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "dedicated");

    let monitor = find(&docs, "ServiceMonitor", name).unwrap();
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    let budget = find(&docs, "PodDisruptionBudget", name).unwrap();
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert!(budget["spec"]["maxUnavailable"].is_null());

    let dashboard = find(&docs, "ConfigMap", &format!("{name}-dashboard")).unwrap();
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_text = dashboard["data"]["kameleoon-cohort-operator.json"]
        .as_str()
        .unwrap();
    let grafana: Value =
        serde_json::from_str(json_text).context("the dashboard is not valid JSON")?;
    let titles: Vec<&str> = grafana["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for title in [
        "Syncs by state",
        "Members per sync",
        "Export duration",
        "API calls by service",
        "API errors by service",
        "Mixpanel query budget used",
    ] {
        assert!(
            titles.contains(&title),
            "panel {title} missing from {titles:?}"
        );
    }

    let rule = find(&docs, "PrometheusRule", name).unwrap();
    let alerts: Vec<&Value> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    let alert_names: Vec<&str> = alerts.iter().filter_map(|a| a["alert"].as_str()).collect();
    assert_eq!(
        alert_names,
        ["CohortSyncFailing", "CohortSyncStalled", "CohortSyncStale"]
    );
    for alert in alerts {
        assert_eq!(alert["labels"]["severity"], "critical");
        assert_eq!(alert["labels"]["team"], "growth");
        let summary = alert["annotations"]["summary"].as_str().unwrap();
        assert!(
            summary.contains("{{ $labels.namespace }}/{{ $labels.name }}"),
            "{summary}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn chart_leader_election_follows_replicas() -> Result<()> {
    let name = "le-kameleoon-cohort-operator";
    let forced = render("le", "ops", "leaderElection: {enabled: true}").await?;
    let args = container_args(find(&forced, "Deployment", name).unwrap());
    assert!(args.contains(&"--leader-elect".to_string()), "{args:?}");
    assert!(find(&forced, "Role", &format!("{name}-leader-election")).is_some());

    let output = template_output(
        "le",
        "ops",
        "replicaCount: 2\nleaderElection: {enabled: false}",
    )
    .await?;
    assert!(
        !output.success,
        "two replicas without leader election were accepted"
    );
    assert!(
        output.stderr.contains("leaderElection.enabled"),
        "{}",
        output.stderr
    );

    let without_rbac = render(
        "le",
        "ops",
        "rbac: {create: false}\nserviceAccount: {create: false, name: existing}",
    )
    .await?;
    let kinds: BTreeSet<&str> = without_rbac
        .iter()
        .filter_map(|d| d["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["Deployment", "Service"].into());
    let deployment = find(&without_rbac, "Deployment", name).unwrap();
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        "existing"
    );
    Ok(())
}

#[tokio::test]
async fn chart_schema_rejects_bad_values() -> Result<()> {
    let cases = [
        ("replicaCount: -1", "/replicaCount", "minimum"),
        ("logFormat: yaml", "/logFormat", "'text', 'json'"),
        (
            "replicas: 2",
            "additional properties 'replicas'",
            "not allowed",
        ),
        (
            "watchNamespaces: [Growth]",
            "/watchNamespaces/0",
            "does not match pattern",
        ),
        ("watchNamespaces: growth", "/watchNamespaces", "want array"),
        (
            "leaderElection: {leaseDuration: 15 seconds}",
            "/leaderElection/leaseDuration",
            "does not match pattern",
        ),
        (
            "image: {pullPolicy: Sometimes}",
            "/image/pullPolicy",
            "value must be one of",
        ),
        (
            "operator: {requestAttempts: 0}",
            "/operator/requestAttempts",
            "minimum",
        ),
        (
            "operator: {mixpanelUrl: mixpanel.internal}",
            "/operator/mixpanelUrl",
            "does not match pattern",
        ),
        ("metrics: {port: 70000}", "/metrics/port", "maximum"),
        ("extraArgs: [run]", "/extraArgs/0", "does not match pattern"),
    ];
    for (values, path, reason) in cases {
        let output = template_output("bad", "ops", values).await?;
        assert!(!output.success, "{values:?} was accepted");
        assert!(
            output
                .stderr
                .contains("values don't meet the specifications of the schema"),
            "{values:?}: {}",
            output.stderr
        );
        assert!(
            output.stderr.contains(path),
            "{values:?}: the message does not name {path}: {}",
            output.stderr
        );
        assert!(
            output.stderr.contains(reason),
            "{values:?}: the message does not say {reason}: {}",
            output.stderr
        );
    }
    Ok(())
}

/// Every value of values.yaml has a row in the chart README's table.
#[test]
fn chart_readme_documents_every_value() {
    fn leaves(prefix: &str, value: &Value, out: &mut Vec<String>) {
        match value.as_object() {
            // Pass-through Kubernetes objects and label maps are documented as a whole.
            Some(map) if !map.is_empty() && !PASS_THROUGH.contains(&prefix) => {
                for (key, item) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    leaves(&path, item, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }
    const PASS_THROUGH: &[&str] = &[
        "resources",
        "podSecurityContext",
        "securityContext",
        "livenessProbe",
        "readinessProbe",
        "grafanaDashboard.labels",
        "prometheusRule.alertLabels",
    ];
    let values = chart_values().unwrap();
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let mut paths = Vec::new();
    leaves("", &values, &mut paths);
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !readme.contains(&format!("| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "values without a row in the chart README: {missing:?}"
    );
}

/// The image the Dockerfile builds matches the chart's ports and user.
#[test]
fn dockerfile_matches_chart() {
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let values = chart_values().unwrap();
    let instructions: Vec<(&str, &str)> = dockerfile
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once(' '))
        .collect();
    let last_from = instructions
        .iter()
        .rev()
        .find(|(i, _)| *i == "FROM")
        .unwrap()
        .1;
    assert!(
        last_from.contains("distroless") && last_from.ends_with(":nonroot"),
        "runtime image: {last_from}"
    );

    let user = instructions
        .iter()
        .rev()
        .find(|(i, _)| *i == "USER")
        .unwrap()
        .1
        .trim();
    let uid = values["securityContext"]["runAsUser"].as_i64().unwrap();
    assert_eq!(
        user,
        format!("{uid}:{}", values["securityContext"]["runAsGroup"])
    );
    assert_eq!(
        values["podSecurityContext"]["runAsUser"].as_i64(),
        Some(uid)
    );
    assert_eq!(uid, 65532);

    let exposed: BTreeSet<i64> = instructions
        .iter()
        .filter(|(i, _)| *i == "EXPOSE")
        .flat_map(|(_, ports)| ports.split_whitespace().map(|p| p.parse::<i64>().unwrap()))
        .collect();
    let metrics = values["metrics"]["port"].as_i64().unwrap();
    let health = values["health"]["port"].as_i64().unwrap();
    assert_eq!(exposed, [metrics, health].into());
    let cmd = instructions.iter().find(|(i, _)| *i == "CMD").unwrap().1;
    assert!(cmd.contains(&format!("0.0.0.0:{metrics}")), "{cmd}");
    assert!(cmd.contains(&format!("0.0.0.0:{health}")), "{cmd}");
    assert!(dockerfile.contains("--bin kameleoon-cohort-operator"));
}

/// A Helm release that is uninstalled when the test ends, also on failure,
/// so no cluster-scoped object outlives the test.
struct Release {
    name: String,
    namespace: String,
    kubeconfig: PathBuf,
    installed: bool,
}

impl Release {
    fn new(cluster: &Cluster, namespace: &str) -> Release {
        // The namespace suffix is random, so parallel tests get distinct
        // release names and distinct cluster-scoped objects.
        let suffix = namespace.rsplit('-').next().unwrap_or(namespace);
        Release {
            name: format!("kco-{suffix}"),
            namespace: namespace.to_string(),
            kubeconfig: cluster.kubeconfig_path().to_path_buf(),
            installed: false,
        }
    }

    fn fullname(&self) -> String {
        format!("{}-kameleoon-cohort-operator", self.name)
    }

    /// Runs `helm install` (or `upgrade`) with a values file, without
    /// waiting for the Pods, which never run on this control plane.
    async fn deploy(&mut self, command: &str, values: &str, extra: &[&str]) -> Result<HelmOutput> {
        let file = values_file(values)?;
        let chart = chart_dir();
        let mut args = vec![
            command,
            &self.name,
            chart.to_str().unwrap(),
            "--namespace",
            &self.namespace,
            "--values",
            file.to_str().unwrap(),
        ];
        args.extend(extra);
        let dry_run = extra.iter().any(|a| a.starts_with("--dry-run"));
        let output = helm(Some(&self.kubeconfig), &args).await?;
        if output.success && !dry_run {
            self.installed = true;
        }
        Ok(output)
    }

    async fn uninstall(&mut self) -> Result<()> {
        helm(
            Some(&self.kubeconfig),
            &[
                "uninstall",
                &self.name,
                "--namespace",
                &self.namespace,
                "--wait",
            ],
        )
        .await?
        .ensure_success("uninstall")?;
        self.installed = false;
        Ok(())
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        if !self.installed {
            return;
        }
        let Ok(bin) = tools_bin() else { return };
        let home = repo_root().join(".tmp/helm-home");
        let status = std::process::Command::new(bin.join("helm"))
            .args([
                "uninstall",
                &self.name,
                "--namespace",
                &self.namespace,
                "--ignore-not-found",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("uninstalling helm release {} failed: {status:?}", self.name);
        }
    }
}

async fn exists(cluster: &Cluster, args: &[&str]) -> Result<bool> {
    let mut full = vec!["get"];
    full.extend(args);
    full.extend(["--ignore-not-found", "-o", "name"]);
    let output = cluster.kubectl(&full, None).await?.ensure_success()?;
    Ok(!output.stdout.trim().is_empty())
}

async fn get_json(cluster: &Cluster, args: &[&str]) -> Result<Value> {
    let mut full = vec!["get"];
    full.extend(args);
    full.extend(["-o", "json"]);
    let output = cluster.kubectl(&full, None).await?.ensure_success()?;
    Ok(serde_json::from_str(&output.stdout)?)
}

/// Returns whether `user` may do `verb` on `resource` in `namespace`; a resource
/// written as `plural.group:subresource` names a subresource.
async fn can_i(
    cluster: &Cluster,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
) -> Result<bool> {
    let (resource, subresource) = resource.split_once(':').unwrap_or((resource, ""));
    let mut args = vec![
        "auth",
        "can-i",
        verb,
        resource,
        "--namespace",
        namespace,
        "--as",
        user,
    ];
    if !subresource.is_empty() {
        args.extend(["--subresource", subresource]);
    }
    let output = cluster.kubectl(&args, None).await?;
    Ok(output.stdout.trim() == "yes")
}

#[tokio::test]
async fn chart_installs_and_upgrades() -> Result<()> {
    let env = Env::new("chart-install").await?;
    let cluster = env.cluster;
    let ns = env.ns().to_string();
    let other = TempNamespace::new(cluster, "chart-install-other").await?;
    let mut release = Release::new(cluster, &ns);
    let name = release.fullname();

    // The server validates every object first.
    let values = "grafanaDashboard: {enabled: true}\npodDisruptionBudget: {enabled: true}\n";
    let dry = release
        .deploy("install", values, &["--dry-run=server"])
        .await?
        .ensure_success("install --dry-run=server")?;
    assert!(
        dry.stdout.contains(&format!("name: {name}")),
        "{}",
        dry.stdout
    );
    assert!(
        !exists(cluster, &["deployment", &name, "-n", &ns]).await?,
        "a dry run created objects"
    );

    // Install with cluster-wide rights.
    release
        .deploy("install", values, &[])
        .await?
        .ensure_success("install")?;
    for object in [
        vec!["deployment", name.as_str(), "-n", &ns],
        vec!["serviceaccount", &name, "-n", &ns],
        vec!["service", &format!("{name}-metrics"), "-n", &ns],
        vec!["configmap", &format!("{name}-dashboard"), "-n", &ns],
        vec!["poddisruptionbudget", &name, "-n", &ns],
        vec!["clusterrole", &name],
        vec!["clusterrolebinding", &name],
        vec!["clusterrole", &format!("{name}-edit")],
        vec!["clusterrole", &format!("{name}-view")],
    ] {
        assert!(
            exists(cluster, &object).await?,
            "{object:?} was not created"
        );
    }

    // Namespace editors and viewers get the kinds through aggregation.
    cluster
        .kubectl(
            &[
                "create",
                "rolebinding",
                "alice-edit",
                "--clusterrole=edit",
                "--user=alice",
                "-n",
                &ns,
            ],
            None,
        )
        .await?
        .ensure_success()?;
    cluster
        .kubectl(
            &[
                "create",
                "rolebinding",
                "bob-view",
                "--clusterrole=view",
                "--user=bob",
                "-n",
                &ns,
            ],
            None,
        )
        .await?
        .ensure_success()?;
    wait_until(
        TIMEOUT,
        "the edit and view roles to aggregate the chart's rules",
        async || {
            ensure!(
                can_i(cluster, "alice", "create", "cohortsyncs.cohortsync.io", &ns).await?,
                "alice cannot create cohortsyncs"
            );
            ensure!(
                can_i(
                    cluster,
                    "alice",
                    "delete",
                    "kameleoonconnections.cohortsync.io",
                    &ns
                )
                .await?,
                "alice cannot delete kameleoonconnections"
            );
            ensure!(
                can_i(cluster, "bob", "list", "cohortsyncs.cohortsync.io", &ns).await?,
                "bob cannot list cohortsyncs"
            );
            Ok(())
        },
    )
    .await?;
    assert!(
        !can_i(cluster, "bob", "create", "cohortsyncs.cohortsync.io", &ns).await?,
        "a viewer may create syncs"
    );
    assert!(
        !can_i(
            cluster,
            "alice",
            "patch",
            "cohortsyncs.cohortsync.io:status",
            &ns
        )
        .await?,
        "an editor may write status"
    );
    assert!(
        !can_i(
            cluster,
            "alice",
            "create",
            "cohortsyncs.cohortsync.io",
            other.name()
        )
        .await?,
        "the edit binding leaked to another namespace"
    );

    // The operator's own account has its rules everywhere, and nothing more.
    let operator = format!("system:serviceaccount:{ns}:{name}");
    assert!(
        can_i(
            cluster,
            &operator,
            "patch",
            "cohortsyncs.cohortsync.io:status",
            other.name()
        )
        .await?
    );
    assert!(can_i(cluster, &operator, "create", "secrets", other.name()).await?);
    assert!(
        !can_i(cluster, &operator, "update", "secrets", &ns).await?,
        "the operator may update Secrets"
    );
    assert!(
        !can_i(
            cluster,
            &operator,
            "delete",
            "cohortsyncs.cohortsync.io",
            &ns
        )
        .await?,
        "the operator may delete syncs"
    );
    assert!(
        !can_i(cluster, &operator, "get", "configmaps", &ns).await?,
        "the operator may read ConfigMaps"
    );

    // Upgrade: two namespaces instead of the cluster, and two replicas.
    let upgraded = format!(
        "replicaCount: 2\nwatchNamespaces: [{ns}, {}]\ngrafanaDashboard: {{enabled: true}}\n",
        other.name()
    );
    release
        .deploy("upgrade", &upgraded, &["--dry-run=server"])
        .await?
        .ensure_success("upgrade --dry-run=server")?;
    release
        .deploy("upgrade", &upgraded, &[])
        .await?
        .ensure_success("upgrade")?;
    let deployment = get_json(cluster, &["deployment", &name, "-n", &ns]).await?;
    assert_eq!(deployment["spec"]["replicas"], 2);
    let args = container_args(&deployment);
    assert!(args.contains(&format!("--namespace={ns}")), "{args:?}");
    assert!(
        args.contains(&format!("--namespace={}", other.name())),
        "{args:?}"
    );
    assert!(args.contains(&"--leader-elect".to_string()), "{args:?}");
    for namespace in [ns.as_str(), other.name()] {
        assert!(
            exists(cluster, &["role", &name, "-n", namespace]).await?,
            "no Role in {namespace}"
        );
        assert!(
            exists(cluster, &["rolebinding", &name, "-n", namespace]).await?,
            "no RoleBinding in {namespace}"
        );
    }
    assert!(
        exists(
            cluster,
            &["role", &format!("{name}-leader-election"), "-n", &ns]
        )
        .await?
    );
    assert!(
        !exists(cluster, &["clusterrole", &name]).await?,
        "the upgrade kept the cluster-wide role"
    );
    assert!(!exists(cluster, &["clusterrolebinding", &name]).await?);
    assert!(
        !exists(cluster, &["poddisruptionbudget", &name, "-n", &ns]).await?,
        "the upgrade kept the PDB"
    );
    assert!(can_i(cluster, &operator, "create", "secrets", other.name()).await?);
    assert!(
        !can_i(cluster, &operator, "list", "secrets", "default").await?,
        "the operator reads Secrets outside the watched namespaces"
    );
    assert!(
        can_i(
            cluster,
            &operator,
            "update",
            &format!("leases.coordination.k8s.io/{name}"),
            &ns
        )
        .await?
    );
    assert!(
        !can_i(
            cluster,
            &operator,
            "update",
            "leases.coordination.k8s.io/another-lease",
            &ns
        )
        .await?,
        "the operator may take other Leases"
    );
    let history = helm(
        Some(cluster.kubeconfig_path()),
        &["history", &release.name, "-n", &ns, "-o", "json"],
    )
    .await?
    .ensure_success("history")?;
    let history: Value = serde_json::from_str(&history.stdout)?;
    assert_eq!(history.as_array().map(Vec::len), Some(2), "{history}");

    // Uninstall removes every cluster-scoped object; the CRDs stay, as Helm
    // never deletes them.
    release.uninstall().await?;
    for object in [format!("{name}-edit"), format!("{name}-view")] {
        assert!(
            !exists(cluster, &["clusterrole", &object]).await?,
            "{object} outlived the release"
        );
    }
    assert!(!exists(cluster, &["role", &name, "-n", other.name()]).await?);
    assert!(exists(cluster, &["crd", "cohortsyncs.cohortsync.io"]).await?);
    Ok(())
}

/// Starts the operator binary as the chart would, with the chart's
/// arguments (addresses on 127.0.0.1:0, the stand-ins' URLs and short test
/// delays added) and the token of the chart's ServiceAccount.
async fn start_as_chart(env: &mut Env, deployment: &Value, service_account: &str) -> Result<()> {
    let mut args: Vec<String> = container_args(deployment)
        .into_iter()
        .map(|arg| {
            if arg.starts_with("--metrics-address=") {
                "--metrics-address=127.0.0.1:0".to_string()
            } else if arg.starts_with("--health-address=") {
                "--health-address=127.0.0.1:0".to_string()
            } else {
                arg
            }
        })
        .collect();
    args.extend([
        format!("--mixpanel-url={}", env.mixpanel.url()),
        format!("--kameleoon-api-url={}", env.kameleoon.url()),
        format!("--kameleoon-data-url={}", env.kameleoon.url()),
        "--progress-interval=500ms".into(),
        "--failure-backoff-base=2s".into(),
        "--failure-backoff-max=10s".into(),
        "--request-retry-base=200ms".into(),
    ]);
    let kubeconfig = env
        .cluster
        .service_account_kubeconfig(env.ns(), service_account)
        .await?;
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let operator = Operator::spawn(
        env!("CARGO_BIN_EXE_kameleoon-cohort-operator"),
        &args,
        &[
            ("KUBECONFIG", &kubeconfig),
            ("POD_NAMESPACE", env.ns()),
            ("POD_NAME", "chart-test-pod"),
        ],
    )?;
    env.operator_args = args.iter().map(|s| s.to_string()).collect();
    env.operator = Some(operator);
    Ok(())
}

#[tokio::test]
async fn chart_rbac_runs_an_export() -> Result<()> {
    let mut env = Env::new("chart-rbac").await?;
    let ns = env.ns().to_string();
    let mut release = Release::new(env.cluster, &ns);
    let name = release.fullname();
    // Least privilege: Roles in the one watched namespace, and two replicas
    // so that the Lease Role is exercised too.
    let values = format!(
        "replicaCount: 2\nwatchNamespaces: [{ns}]\nrbac: {{aggregateToDefaultRoles: false}}\n"
    );
    release
        .deploy("install", &values, &[])
        .await?
        .ensure_success("install")?;
    let deployment = get_json(env.cluster, &["deployment", &name, "-n", &ns]).await?;
    start_as_chart(&mut env, &deployment, &name).await?;

    env.connect().await?;
    env.apply(&sync_yaml("song-sharers", "{id: 501}", "OneTime", ""))
        .await?;
    env.wait_sync("song-sharers", "an export with the chart's RBAC", exported)
        .await?;
    assert_eq!(
        env.members_in_kameleoon("Song Sharers"),
        ["crm-200", "u-100", "u-300"]
    );

    // The replica holds the release's Lease.
    let lease = get_json(env.cluster, &["lease", &name, "-n", &ns]).await?;
    let holder = lease["spec"]["holderIdentity"].as_str().unwrap_or_default();
    assert!(
        holder.starts_with("chart-test-pod_"),
        "lease holder: {holder}"
    );

    let status = env.operator.as_mut().unwrap().terminate().await?;
    let logs = env.logs();
    assert!(status.success(), "exit status {status}; log:\n{logs}");
    let lines = json_log_lines(&logs)?;
    let problems: Vec<&Value> = lines
        .iter()
        .filter(|l| l["level"] == "ERROR" || l.to_string().contains("forbidden"))
        .collect();
    assert!(
        problems.is_empty(),
        "errors with the chart's RBAC: {problems:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "Released the leader Lease"),
        "the Lease was not released at shutdown; log:\n{logs}"
    );
    release.uninstall().await?;
    Ok(())
}

#[tokio::test]
async fn chart_rbac_missing_verb_fails_loudly() -> Result<()> {
    let mut env = Env::new("chart-rbac-gap").await?;
    let ns = env.ns().to_string();
    let release = Release::new(env.cluster, &ns);
    let name = release.fullname();
    let values = format!("watchNamespaces: [{ns}]\nrbac: {{aggregateToDefaultRoles: false}}\n");
    let docs = render(&release.name, &ns, &values).await?;

    // The chart's Role without `patch` on cohortsyncs/status.
    let mut role = find(&docs, "Role", &name)
        .cloned()
        .ok_or_else(|| anyhow!("no Role rendered"))?;
    let mut removed = false;
    for rule in role["rules"].as_array_mut().unwrap() {
        let resources = rule["resources"].as_array_mut().unwrap();
        if resources.iter().any(|r| r == "cohortsyncs/status") {
            resources.retain(|r| r != "cohortsyncs/status");
            removed = true;
        }
    }
    ensure!(
        removed,
        "the rendered Role has no rule for cohortsyncs/status"
    );
    let mut manifests = String::new();
    for object in [
        find(&docs, "ServiceAccount", &name).unwrap(),
        &role,
        find(&docs, "RoleBinding", &name).unwrap(),
    ] {
        manifests.push_str("---\n");
        manifests.push_str(&serde_yaml::to_string(object)?);
    }
    env.cluster.apply("", &manifests).await?;
    start_as_chart(&mut env, find(&docs, "Deployment", &name).unwrap(), &name).await?;

    env.connect().await?;
    env.wait_connection("production", "Connected", "True", "Connected")
        .await?;
    env.apply(&sync_yaml("song-sharers", "{id: 501}", "OneTime", ""))
        .await?;

    let started = Instant::now();
    let line = wait_until(
        TIMEOUT,
        "an ERROR log line naming the forbidden request",
        async || {
            let lines = json_log_lines(&env.logs())?;
            lines
                .into_iter()
                .find(|l| {
                    let text = l.to_string();
                    l["level"] == "ERROR"
                        && text.contains("forbidden")
                        && text.contains("cohortsyncs/status")
                })
                .ok_or_else(|| anyhow!("not logged yet"))
        },
    )
    .await;
    let line = match line {
        Ok(line) => line,
        Err(error) => bail!("{error:#}; log:\n{}", env.logs()),
    };
    assert_eq!(line["namespace"], ns.as_str(), "{line}");
    assert_eq!(line["name"], "song-sharers", "{line}");
    assert!(line.to_string().contains("patch"), "{line}");
    assert!(started.elapsed() < TIMEOUT);

    let sync = env.syncs().get("song-sharers").await?;
    let ready = sync
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone());
    assert_ne!(
        ready.as_deref(),
        Some("True"),
        "the sync is Ready without the right to write its status"
    );
    Ok(())
}
