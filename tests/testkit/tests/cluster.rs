//! Checks that the test control plane behaves like a cluster in the ways the
//! operator's tests rely on, and that the helpers around it work.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use serde_json::json;
use testkit::{
    Cluster, Operator, Result, TempNamespace, client_from_kubeconfig, kstatus, repo_root,
    wait_condition, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(60);

fn config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn control_plane_runs_pinned_release() -> Result<()> {
    let cluster = Cluster::shared().await;
    let versions = std::fs::read_to_string(repo_root().join("hack/versions.env"))?;
    let pinned = versions
        .lines()
        .find_map(|line| line.strip_prefix("KUBERNETES_VERSION="))
        .expect("hack/versions.env sets KUBERNETES_VERSION");

    let version = cluster.client().apiserver_version().await?;
    assert_eq!(version.git_version, pinned);

    let output = cluster
        .kubectl(&["get", "namespace", "kube-system", "-o", "name"], None)
        .await?;
    assert!(output.success(), "kubectl failed: {}", output.stderr);
    assert_eq!(output.stdout.trim(), "namespace/kube-system");
    Ok(())
}

#[tokio::test]
async fn rbac_limits_service_account() -> Result<()> {
    let cluster = Cluster::shared().await;
    let namespace = TempNamespace::new(cluster, "testkit-rbac").await?;
    let ns = namespace.name();
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.client(), ns);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("reader".to_string()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    accounts.create(&PostParams::default(), &account).await?;

    let kubeconfig = cluster.service_account_kubeconfig(ns, "reader").await?;
    let reader = client_from_kubeconfig(&kubeconfig).await?;
    let secrets: Api<Secret> = Api::namespaced(reader.clone(), ns);
    // 403 rather than 401: the token authenticates, and RBAC denies.
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden before any role, got {other:?}"),
    }

    let rbac = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: secret-reader
rules:
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: secret-reader
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: secret-reader
subjects:
- kind: ServiceAccount
  name: reader
"#;
    cluster.apply(ns, rbac).await?;
    // The authorizer reads roles from an informer cache, so the grant takes
    // effect shortly after the apply returns.
    wait_until(TIMEOUT, "the service account to list secrets", async || {
        Ok(secrets.list(&ListParams::default()).await?)
    })
    .await?;

    let other_namespace: Api<Secret> = Api::namespaced(reader, "default");
    match other_namespace.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden outside the role's namespace, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn namespace_deletion_completes() -> Result<()> {
    let cluster = Cluster::shared().await;
    let client = cluster.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let name = {
        let namespace = TempNamespace::new(cluster, "testkit-delete").await?;
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace.name());
        config_maps
            .create(&PostParams::default(), &config_map("content"))
            .await?;
        namespace.name().to_string()
    };
    // Dropping the TempNamespace started the deletion; the namespace
    // controller removes the content and then the namespace itself.
    wait_until(
        TIMEOUT,
        "the namespace to be deleted",
        async || match namespaces.get_opt(&name).await? {
            None => Ok(()),
            Some(namespace) => {
                let phase = namespace.status.and_then(|status| status.phase);
                Err(testkit::anyhow::anyhow!(
                    "namespace {name} is still there, phase {phase:?}"
                ))
            }
        },
    )
    .await
}

#[tokio::test]
async fn owner_deletion_collects_dependent() -> Result<()> {
    let cluster = Cluster::shared().await;
    let namespace = TempNamespace::new(cluster, "testkit-gc").await?;
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client(), namespace.name());
    let owner = config_maps
        .create(&PostParams::default(), &config_map("owner"))
        .await?;
    let mut dependent = config_map("dependent");
    dependent.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".to_string(),
            kind: "ConfigMap".to_string(),
            name: "owner".to_string(),
            uid: owner
                .metadata
                .uid
                .clone()
                .expect("created object has a uid"),
            ..Default::default()
        },
    ]);
    config_maps
        .create(&PostParams::default(), &dependent)
        .await?;
    let bystander = config_maps
        .create(&PostParams::default(), &config_map("bystander"))
        .await?;

    config_maps
        .delete("owner", &DeleteParams::default())
        .await?;
    wait_until(
        TIMEOUT,
        "the garbage collector to delete the dependent",
        async || match config_maps.get_opt("dependent").await? {
            None => Ok(()),
            Some(_) => Err(testkit::anyhow::anyhow!("dependent still exists")),
        },
    )
    .await?;

    let remaining = config_maps.get("bystander").await?;
    assert_eq!(remaining.metadata.uid, bystander.metadata.uid);
    Ok(())
}

#[tokio::test]
async fn apply_expect_error_returns_rejection() -> Result<()> {
    let cluster = Cluster::shared().await;
    let namespace = TempNamespace::new(cluster, "testkit-reject").await?;
    let invalid = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Not_A_Valid_Name\n  namespace: {}\n",
        namespace.name()
    );
    let stderr = cluster.apply_expect_error(&invalid).await?;
    assert!(stderr.contains("Invalid value"), "{stderr}");

    let valid = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: valid\ndata:\n  key: value\n";
    let error = cluster.apply_expect_error(valid).await;
    assert!(error.is_err(), "a valid object was reported as rejected");
    Ok(())
}

#[tokio::test]
async fn wait_condition_reads_dynamic_object() -> Result<()> {
    let cluster = Cluster::shared().await;
    let namespace = TempNamespace::new(cluster, "testkit-conditions").await?;
    // A CustomResourceDefinition reports Established=True once it is served;
    // read through the dynamic API as tests do for the operator's own kinds.
    let crd = format!(
        r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.{group}
spec:
  group: {group}
  scope: Namespaced
  names: {{plural: widgets, singular: widget, kind: Widget}}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {{status: {{}}}}
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
"#,
        group = format!("{}.testkit.example", namespace.name())
    );
    cluster.apply("", &crd).await?;
    let crd_name = format!("widgets.{}.testkit.example", namespace.name());
    let crds = cluster.dynamic_api(
        None,
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "customresourcedefinitions",
    );
    let established = wait_condition(&crds, &crd_name, "Established", "True", TIMEOUT).await?;
    assert_eq!(
        established.metadata.name.as_deref(),
        Some(crd_name.as_str())
    );

    let error = wait_condition(
        &crds,
        &crd_name,
        "Established",
        "False",
        Duration::from_millis(500),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(error.contains("Established=True"), "{error}");

    cluster
        .kubectl(
            &[
                "delete",
                "customresourcedefinition",
                &crd_name,
                "--wait=false",
            ],
            None,
        )
        .await?
        .ensure_success()?;
    Ok(())
}

#[tokio::test]
async fn kstatus_matches_gitops_tools() -> Result<()> {
    let deployment = |ready: u32, conditions: serde_json::Value| {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "generation": 2},
            "spec": {"replicas": 2},
            "status": {
                "observedGeneration": 2,
                "replicas": 2,
                "updatedReplicas": 2,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "conditions": conditions,
            }
        })
    };
    let custom = |generation: i64, observed: i64, conditions: serde_json::Value| {
        json!({
            "apiVersion": "cohortsync.io/v1alpha1",
            "kind": "CohortSync",
            "metadata": {"name": "song-sharers", "namespace": "growth", "generation": generation},
            "status": {"observedGeneration": observed, "conditions": conditions}
        })
    };
    let available = json!([
        {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}
    ]);
    let cases = [
        (
            "ready deployment",
            deployment(2, available.clone()),
            "Current",
        ),
        (
            "deployment short of replicas",
            deployment(1, available),
            "InProgress",
        ),
        (
            "resource with Ready=True",
            custom(
                1,
                1,
                json!([{"type": "Ready", "status": "True", "reason": "Synced", "message": "done"}]),
            ),
            "Current",
        ),
        (
            "resource with Reconciling=True",
            custom(
                1,
                1,
                json!([{"type": "Reconciling", "status": "True", "reason": "Exporting", "message": "exporting"}]),
            ),
            "InProgress",
        ),
        (
            "resource with Stalled=True",
            custom(
                1,
                1,
                json!([{"type": "Stalled", "status": "True", "reason": "SecretNotFound", "message": "secret missing"}]),
            ),
            "Failed",
        ),
        (
            "resource with an unobserved generation",
            custom(
                3,
                2,
                json!([{"type": "Ready", "status": "True", "reason": "Synced", "message": "done"}]),
            ),
            "InProgress",
        ),
    ];
    for (case, object, expected) in cases {
        let (status, message) = kstatus(&object)?;
        assert_eq!(status, expected, "{case}: message {message:?}");
    }

    let (_, message) = kstatus(&custom(
        1,
        1,
        json!([{"type": "Stalled", "status": "True", "reason": "SecretNotFound", "message": "secret missing"}]),
    ))?;
    assert_eq!(message, "secret missing");

    let error = kstatus(&json!({"metadata": {"name": "no-kind"}}))
        .unwrap_err()
        .to_string();
    assert!(error.contains("Kind"), "{error}");
    Ok(())
}

#[tokio::test]
async fn operator_process_lifecycle() -> Result<()> {
    let script = "echo started; echo to-stderr >&2; echo \"kubeconfig=$KUBECONFIG\"; exec sleep 60";
    let mut process = Operator::spawn("/bin/sh", &["-c", script], &[])?;
    process.wait_for_log("to-stderr", TIMEOUT).await?;
    let logs = process.logs();
    assert!(logs.contains("started"), "{logs}");
    assert!(logs.contains("kubeconfig=/nonexistent/"), "{logs}");

    let usage = process.usage()?;
    assert!(usage.peak_rss_bytes > 0, "{usage:?}");

    let status = process.terminate().await?;
    assert!(
        !status.success(),
        "sleep ended by SIGTERM reported {status}"
    );
    assert!(process.last_usage().is_some());
    assert!(process.usage().is_err(), "usage of an exited process");
    Ok(())
}

#[tokio::test]
async fn operator_terminate_kills_on_timeout() -> Result<()> {
    // The shell ignores SIGTERM and so does the sleep it starts.
    let script = "trap '' TERM; echo ready; while true; do sleep 1; done";
    let mut process = Operator::spawn("/bin/sh", &["-c", script], &[("KUBECONFIG", "/dev/null")])?;
    process.wait_for_log("ready", TIMEOUT).await?;
    let error = process
        .terminate_within(Duration::from_millis(300))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("did not exit"), "{error}");
    assert!(
        process.try_wait()?.is_some(),
        "process still running after the kill"
    );
    Ok(())
}
