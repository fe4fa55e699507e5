//! The control plane that tests run against, and kubectl on it.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio::sync::OnceCell;

use crate::paths::{absolute_from_env, repo_root, scratch_dir, tools_bin};

/// Marker file that `hack/control-plane.sh` writes into its directory.
const CONTROL_PLANE_MARKER: &str = ".kco-control-plane";

/// Upper bound for one kubectl run, so a hung request fails the test instead
/// of stalling it.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a new CustomResourceDefinition may take to be established.
const CRD_TIMEOUT: Duration = Duration::from_secs(60);

/// A running control plane and the admin credentials for it.
pub struct Cluster {
    kubeconfig: PathBuf,
    config: Config,
    tools_bin: PathBuf,
    /// Directory for files that belong to this control plane, such as service
    /// account kubeconfigs. It is removed together with the control plane when
    /// `hack/control-plane.sh` manages it.
    scratch: PathBuf,
}

/// Result of a kubectl run.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Returns the output unchanged when kubectl succeeded, and an error with
    /// its standard error otherwise.
    pub fn ensure_success(self) -> Result<Output> {
        if self.success() {
            Ok(self)
        } else {
            bail!(
                "kubectl failed with {}: {}",
                self.status,
                self.stderr.trim()
            )
        }
    }
}

impl Cluster {
    /// Returns the process-wide control plane, starting it on first use.
    ///
    /// With `KCO_TEST_KUBECONFIG` set, the cluster of that kubeconfig is used
    /// as it is. Otherwise this builds the tools (`hack/tools.sh`) and runs
    /// `hack/control-plane.sh up <repo>/.tmp/cluster-<pid> --watch-pid <pid>`,
    /// whose watchdog stops the control plane once this process exits.
    ///
    /// # Panics
    ///
    /// Panics with the reason when the control plane cannot be started. The
    /// failure is remembered, so later tests of the process fail at once.
    pub async fn shared() -> &'static Cluster {
        static SHARED: OnceCell<Result<Cluster, String>> = OnceCell::const_new();
        let cluster = SHARED
            .get_or_init(|| async {
                Cluster::connect()
                    .await
                    .map_err(|error| format!("{error:#}"))
            })
            .await;
        match cluster {
            Ok(cluster) => cluster,
            Err(message) => panic!("the test control plane is not available: {message}"),
        }
    }

    async fn connect() -> Result<Cluster> {
        // The workspace builds rustls with the ring provider only. Installing it
        // explicitly keeps that choice if another provider is ever compiled
        // in. An error means that a provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();

        let tools_bin = tools_bin()?.to_path_buf();
        let kubeconfig = match std::env::var_os("KCO_TEST_KUBECONFIG") {
            Some(path) => absolute_from_env("KCO_TEST_KUBECONFIG", path.into())?,
            None => start_control_plane(&tools_bin).await?,
        };
        let config = config_from_kubeconfig(&kubeconfig).await?;
        let control_plane_dir = kubeconfig
            .parent()
            .filter(|dir| dir.join(CONTROL_PLANE_MARKER).exists());
        let scratch = match control_plane_dir {
            Some(dir) => dir.join("testkit"),
            None => scratch_dir("testkit")?,
        };
        std::fs::create_dir_all(&scratch)
            .with_context(|| format!("creating {}", scratch.display()))?;
        Ok(Cluster {
            kubeconfig,
            config,
            tools_bin,
            scratch,
        })
    }

    /// Returns a new client with admin rights.
    ///
    /// Each call builds a client, because a client serves requests through a
    /// task on the Tokio runtime that created it, and every `#[tokio::test]`
    /// has its own runtime.
    ///
    /// # Panics
    ///
    /// Panics outside a Tokio runtime.
    pub fn client(&self) -> Client {
        Client::try_from(self.config.clone())
            .expect("building a client from a valid admin kubeconfig")
    }

    /// Path of the admin kubeconfig.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Directory with kubectl, helm, kstatus and the control plane binaries.
    pub fn tools_bin(&self) -> &Path {
        &self.tools_bin
    }

    /// Returns an [`Api`] for objects of a kind that has no Rust type in this
    /// crate, such as the operator's custom resources. Pass `None` as the
    /// namespace for cluster-scoped kinds or to list across all namespaces.
    pub fn dynamic_api(
        &self,
        namespace: Option<&str>,
        api_version: &str,
        kind: &str,
        plural: &str,
    ) -> Api<DynamicObject> {
        let (group, version) = match api_version.split_once('/') {
            Some((group, version)) => (group, version),
            None => ("", api_version),
        };
        let resource =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        match namespace {
            Some(namespace) => Api::namespaced_with(self.client(), namespace, &resource),
            None => Api::all_with(self.client(), &resource),
        }
    }

    /// Runs kubectl with the admin kubeconfig, feeding `stdin` when given.
    ///
    /// Returns an error only when kubectl could not run or timed out after two
    /// minutes; check [`Output::success`] or call [`Output::ensure_success`].
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        run_kubectl(
            &self.tools_bin.join("kubectl"),
            &self.kubeconfig,
            args,
            stdin,
        )
        .await
    }

    /// Applies YAML manifests (several documents are fine) with server-side
    /// apply and returns kubectl's output. An empty `namespace` leaves each
    /// object in the namespace its manifest names, or `default`.
    ///
    /// Objects of a custom kind can only be applied once its
    /// CustomResourceDefinition is established; wait for that with
    /// [`crate::wait_condition`] on condition `Established` in between.
    pub async fn apply(&self, namespace: &str, yaml: &str) -> Result<String> {
        let mut args = vec![
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=testkit",
            "-f",
            "-",
        ];
        if !namespace.is_empty() {
            args.extend(["--namespace", namespace]);
        }
        let output = self.kubectl(&args, Some(yaml)).await?.ensure_success()?;
        Ok(output.stdout)
    }

    /// Applies CustomResourceDefinitions and waits until each one is
    /// established. It polls the objects rather than run `kubectl wait`,
    /// which fails instead of waiting when a definition is so new that it has
    /// no conditions yet.
    pub async fn apply_crds(&self, yaml: &str) -> Result<()> {
        self.apply("", yaml).await?;
        let crds: Api<CustomResourceDefinition> = Api::all(self.client());
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let crd = CustomResourceDefinition::deserialize(document)
                .context("parsing a CustomResourceDefinition")?;
            let name = crd.metadata.name.unwrap_or_default();
            crate::wait_condition(&crds, &name, "Established", "True", CRD_TIMEOUT).await?;
        }
        Ok(())
    }

    /// Applies manifests that the API server is expected to reject, such as an
    /// object that fails schema or CEL validation, and returns kubectl's
    /// standard error. Fails when the manifests are accepted.
    pub async fn apply_expect_error(&self, yaml: &str) -> Result<String> {
        let args = [
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=testkit",
            "-f",
            "-",
        ];
        let output = self.kubectl(&args, Some(yaml)).await?;
        if output.success() {
            bail!(
                "expected the API server to reject the manifests, but kubectl applied them: {}",
                output.stdout.trim()
            );
        }
        Ok(output.stderr)
    }

    /// Writes a kubeconfig that authenticates as service account `name` in
    /// `namespace` with a token from `kubectl create token` (valid for 24
    /// hours) and returns its path. The service account must exist.
    ///
    /// Tests run the operator with it so that it has exactly the permissions
    /// of the RBAC objects the test applied, as in a real installation.
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> Result<PathBuf> {
        let output = self
            .kubectl(
                &[
                    "create",
                    "token",
                    name,
                    "--namespace",
                    namespace,
                    "--duration=24h",
                ],
                None,
            )
            .await?
            .ensure_success()
            .with_context(|| format!("creating a token for service account {namespace}/{name}"))?;
        let token = output.stdout.trim();

        let admin = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let cluster = admin
            .clusters
            .first()
            .and_then(|named| named.cluster.as_ref())
            .ok_or_else(|| anyhow!("{} names no cluster", self.kubeconfig.display()))?;
        let server = cluster
            .server
            .as_deref()
            .ok_or_else(|| anyhow!("{} names no server", self.kubeconfig.display()))?;
        let mut cluster_entry = serde_json::json!({"server": server});
        match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => cluster_entry["certificate-authority-data"] = data.as_str().into(),
            (None, Some(file)) => cluster_entry["certificate-authority"] = file.as_str().into(),
            (None, None) => bail!("{} has no certificate authority", self.kubeconfig.display()),
        }

        let user = format!("system:serviceaccount:{namespace}:{name}");
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kco-test", "cluster": cluster_entry}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "kco-test", "context": {"cluster": "kco-test", "user": user, "namespace": namespace}}],
            "current-context": "kco-test",
        });
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let number = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.scratch.join(format!(
            "serviceaccount-{}-{number}-{namespace}-{name}.kubeconfig",
            std::process::id()
        ));
        std::fs::write(&path, serde_yaml::to_string(&kubeconfig)?)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

/// Builds a client from a kubeconfig file, for example one written by
/// [`Cluster::service_account_kubeconfig`].
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let config = config_from_kubeconfig(path).await?;
    Ok(Client::try_from(config)?)
}

async fn config_from_kubeconfig(path: &Path) -> Result<Config> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))
}

/// Runs `hack/control-plane.sh up` for this process and returns the admin
/// kubeconfig path.
async fn start_control_plane(tools_bin: &Path) -> Result<PathBuf> {
    let dir = repo_root()
        .join(".tmp")
        .join(format!("cluster-{}", std::process::id()));
    let script = repo_root().join("hack/control-plane.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg("up")
        .arg(&dir)
        .arg("--watch-pid")
        .arg(std::process::id().to_string())
        .env("KCO_TOOLS_BIN", tools_bin)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .await
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} up {} failed with {status}; its messages are above in the test output",
            script.display(),
            dir.display()
        );
    }
    Ok(dir.join("kubeconfig"))
}

pub(crate) async fn run_kubectl(
    kubectl: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output> {
    let mut child = Command::new(kubectl)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", kubectl.display()))?;
    let input = child.stdin.take();
    let feed = async move {
        if let (Some(mut pipe), Some(text)) = (input, stdin) {
            pipe.write_all(text.as_bytes()).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let run = async {
        let (fed, output) = tokio::join!(feed, child.wait_with_output());
        fed.context("writing kubectl's standard input")?;
        output.context("waiting for kubectl")
    };
    let output = tokio::time::timeout(KUBECTL_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow!(
                "kubectl {} timed out after {KUBECTL_TIMEOUT:?}",
                args.join(" ")
            )
        })??;
    Ok(Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
