//! The operator binary as a child process of a test.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::paths::scratch_dir;
use crate::wait::wait_until;

/// Grace period of [`Operator::terminate`].
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running program (normally the operator binary) whose standard output and
/// error go to a log file under `<repo>/.tmp/operator-logs`. The process is
/// killed when the value is dropped.
pub struct Operator {
    child: Child,
    log_path: PathBuf,
    last_usage: Option<ResourceUsage>,
}

/// Resource use of a process, read from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResourceUsage {
    /// Peak resident set size (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// User plus system CPU time.
    pub cpu_time: Duration,
}

impl Operator {
    /// Starts `binary` with `args` and the environment of the test process
    /// plus `env`.
    ///
    /// `KUBECONFIG` must come from `env` (for example
    /// [`crate::Cluster::kubeconfig_path`] or a service account kubeconfig):
    /// the inherited `KUBECONFIG` and in-cluster variables are removed, and
    /// without one in `env` the program gets a path that does not exist, so
    /// it can never reach a cluster other than the test's.
    pub fn spawn(
        binary: impl AsRef<Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Operator> {
        let binary = binary.as_ref();
        let log_path = new_log_path(binary)?;
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_for_stderr = log.try_clone().context("duplicating the log file handle")?;
        let child = Command::new(binary)
            .args(args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env(
                "KUBECONFIG",
                "/nonexistent/testkit-operator-needs-kubeconfig-in-env",
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_for_stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Operator {
            child,
            log_path,
            last_usage: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Returns everything the process has written to standard output and
    /// standard error so far.
    pub fn logs(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_else(|error| {
                format!("<reading {} failed: {error}>", self.log_path.display())
            })
    }

    /// Waits until the log contains `text`, for example the operator's
    /// start-up message. Fails early when the process exits.
    pub async fn wait_for_log(&mut self, text: &str, timeout: Duration) -> Result<()> {
        let description = format!("{} to contain {text:?}", self.log_path.display());
        wait_until(timeout, &description, async || {
            let logs = self.logs();
            if logs.contains(text) {
                return Ok(Ok(()));
            }
            if let Some(status) = self.child.try_wait()? {
                return Ok(Err(anyhow!(
                    "the process exited with {status}; log:\n{logs}"
                )));
            }
            let last_line = logs.lines().last().unwrap_or("<empty log>").to_string();
            Err(anyhow!("last log line: {last_line}"))
        })
        .await?
    }

    /// Returns the exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Reads the peak memory and CPU time of the running process.
    ///
    /// Fails once the process has exited, because Linux drops these figures
    /// from `/proc` at exit. [`Operator::terminate`] keeps the last reading
    /// taken before its SIGTERM in [`Operator::last_usage`].
    pub fn usage(&self) -> Result<ResourceUsage> {
        read_usage(self.pid())
    }

    /// Returns the reading that [`Operator::terminate`] took just before it
    /// sent SIGTERM.
    pub fn last_usage(&self) -> Option<ResourceUsage> {
        self.last_usage
    }

    /// Sends SIGTERM and waits up to 30 seconds for the process to exit.
    /// See [`Operator::terminate_within`].
    pub async fn terminate(&mut self) -> Result<ExitStatus> {
        self.terminate_within(TERMINATE_TIMEOUT).await
    }

    /// Sends SIGTERM (with the `kill` command) and waits up to `timeout` for
    /// the process to exit. On timeout the process is killed with SIGKILL and
    /// an error is returned, since a graceful shutdown was expected.
    pub async fn terminate_within(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.last_usage = self.usage().ok();
        let pid = self.pid().to_string();
        let kill = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .context("running kill -TERM")?;
        if !kill.success() {
            // The process may have exited between the check and the signal.
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            bail!("kill -TERM {pid} failed with {kill}");
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let killed = self.kill()?;
        Err(anyhow!(
            "process {pid} did not exit within {timeout:?} after SIGTERM and was killed ({killed}); log: {}",
            self.log_path.display()
        ))
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.child.kill().context("sending SIGKILL")?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Err(error) = self.kill() {
            eprintln!("testkit: killing process {} failed: {error:#}", self.pid());
        }
    }
}

fn new_log_path(binary: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = binary
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "process".to_string());
    let number = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(scratch_dir("operator-logs")?.join(format!("{name}-{}-{number}.log", std::process::id())))
}

fn read_usage(pid: u32) -> Result<ResourceUsage> {
    let status_path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&status_path).with_context(|| format!("reading {status_path}"))?;
    let peak_kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("{status_path} has no VmHWM line (the process has exited)"))?;

    let stat_path = format!("/proc/{pid}/stat");
    let stat =
        std::fs::read_to_string(&stat_path).with_context(|| format!("reading {stat_path}"))?;
    // Fields after the command name, which is in parentheses and may contain
    // spaces: state is field 3, utime field 14 and stime field 15.
    let after_command = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected format of {stat_path}"))?;
    let fields: Vec<&str> = after_command.split_whitespace().collect();
    let ticks = |index: usize| -> Result<u64> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| anyhow!("unexpected format of {stat_path}"))
    };
    let cpu_ticks = ticks(11)? + ticks(12)?;
    Ok(ResourceUsage {
        peak_rss_bytes: peak_kib * 1024,
        cpu_time: Duration::from_secs_f64(cpu_ticks as f64 / clock_ticks_per_second() as f64),
    })
}

/// Returns the unit of the CPU times in `/proc` (`getconf CLK_TCK`, which is
/// 100 on common Linux builds and the fallback when getconf fails).
fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|output| String::from_utf8(output.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks| *ticks > 0)
            .unwrap_or(100)
    })
}
