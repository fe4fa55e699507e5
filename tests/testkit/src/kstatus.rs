//! The status that GitOps tools compute for an object.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::paths::tools_bin;

#[derive(Deserialize)]
struct KstatusResult {
    status: String,
    message: String,
}

/// Computes the kstatus of one Kubernetes object with
/// `sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute`, the library that Flux,
/// Argo CD and kpt use, and returns `(status, message)`.
///
/// The status is one of `InProgress`, `Failed`, `Current`, `Terminating` or
/// `Unknown`. The object must carry `apiVersion` and `kind` (for example a
/// `DynamicObject` fetched from the API server, or a `serde_json::Value`).
/// Runs the `kstatus` program that `hack/tools.sh` builds from `hack/kstatus`.
pub fn kstatus(object: &impl Serialize) -> Result<(String, String)> {
    let input = serde_json::to_vec(object).context("serializing the object for kstatus")?;
    let program = tools_bin()?.join("kstatus");
    let mut child = Command::new(&program)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;

    // The program reads all of its input before it writes anything, so
    // writing first cannot block on a full output pipe.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(&input)
        .context("writing the object to kstatus")?;
    drop(stdin);

    let output = child.wait_with_output().context("waiting for kstatus")?;
    if !output.status.success() {
        bail!(
            "kstatus failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let result: KstatusResult = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "kstatus printed unexpected output: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })?;
    Ok((result.status, result.message))
}
