//! Namespaces that live as long as one test.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::{ObjectMeta, PostParams};

use crate::Cluster;

/// Label on every namespace that [`TempNamespace`] creates, to find leftovers.
pub const TEMPORARY_LABEL: &str = "testkit.cohortsync.io/temporary";

/// A namespace with a unique name, created by [`TempNamespace::new`] and
/// deleted when the value is dropped.
///
/// The deletion runs `kubectl delete namespace --wait=false` in the
/// background, so the drop returns at once and the namespace controller
/// removes the contents afterwards.
pub struct TempNamespace {
    name: String,
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl TempNamespace {
    /// Creates a namespace named `<prefix>-<random suffix>`. The prefix must
    /// be a valid DNS label start (lowercase letters, digits and `-`); it is
    /// shortened so the name fits the 63-character limit.
    pub async fn new(cluster: &Cluster, prefix: &str) -> Result<TempNamespace> {
        let name = unique_name(prefix);
        ensure_dns_label(&name).with_context(|| format!("invalid namespace prefix {prefix:?}"))?;
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEMPORARY_LABEL.to_string(), "true".to_string())].into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let api: Api<Namespace> = Api::all(cluster.client());
        api.create(&PostParams::default(), &namespace)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TempNamespace {
            name,
            kubectl: cluster.tools_bin().join("kubectl"),
            kubeconfig: cluster.kubeconfig_path().to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TempNamespace {
    fn drop(&mut self) {
        let child = Command::new(&self.kubectl)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            // A thread reaps kubectl so it does not stay a zombie; if the test
            // process exits first, kubectl still runs to completion.
            Ok(mut child) => {
                std::thread::spawn(move || child.wait());
            }
            Err(error) => eprintln!("testkit: deleting namespace {} failed: {error}", self.name),
        }
    }
}

fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; hashing a counter through
    // it gives distinct suffixes within a process and across processes.
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let suffix = format!("{:08x}", hasher.finish() as u32);
    let prefix: String = prefix
        .trim_end_matches('-')
        .chars()
        .take(63 - 1 - suffix.len())
        .collect();
    format!("{prefix}-{suffix}")
}

/// Checks that a name is a valid DNS label, the rule for namespace names.
fn ensure_dns_label(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-'),
        "{name:?} is not a valid DNS label (lowercase letters, digits and '-', at most 63 characters)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{ensure_dns_label, unique_name};

    #[test]
    fn unique_names_differ() {
        let first = unique_name("demo");
        let second = unique_name("demo");
        assert_ne!(first, second);
        assert!(first.starts_with("demo-"), "{first}");
    }

    #[test]
    fn long_prefix_is_shortened() {
        let name = unique_name(&"a".repeat(100));
        assert_eq!(name.len(), 63);
        ensure_dns_label(&name).unwrap();
    }
}
