//! Locations of the repository, its scratch directory and the built tools.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

/// Returns the repository root, two levels above this crate's manifest.
pub fn repo_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .ancestors()
            .nth(2)
            .expect("tests/testkit has two parent directories")
            .to_path_buf()
    })
}

/// Creates (if needed) and returns `<repo>/.tmp/<name>`, the git-ignored
/// scratch space for logs and generated files.
pub(crate) fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = repo_root().join(".tmp").join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Returns the directory with etcd, kube-apiserver, kube-controller-manager,
/// kubectl, helm and kstatus.
///
/// Uses `KCO_TOOLS_BIN` when set. Otherwise runs `hack/tools.sh` once per
/// process, which builds missing tools into a cache outside the repository
/// (many minutes on a new machine, a moment afterwards) and prints progress on
/// standard error.
pub fn tools_bin() -> Result<&'static Path> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let bin = BIN.get_or_init(|| find_tools_bin().map_err(|error| format!("{error:#}")));
    match bin {
        Ok(path) => Ok(path.as_path()),
        Err(message) => Err(anyhow!("{message}")),
    }
}

fn find_tools_bin() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KCO_TOOLS_BIN") {
        return absolute_from_env("KCO_TOOLS_BIN", dir.into());
    }
    let script = repo_root().join("hack/tools.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed with {}; its messages are above in the test output",
            script.display(),
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .ok_or_else(|| anyhow!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir))
}

/// Checks that a path taken from an environment variable is absolute, because
/// cargo runs each test binary in its package directory, not where the
/// variable was set.
pub(crate) fn absolute_from_env(variable: &str, path: PathBuf) -> Result<PathBuf> {
    if path.is_relative() {
        bail!(
            "{variable}={} is a relative path; set it to an absolute path, because tests run in their package directory",
            path.display()
        );
    }
    Ok(path)
}
