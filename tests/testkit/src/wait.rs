//! Polling with a deadline, in place of fixed sleeps.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Time between two checks of [`wait_until`].
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Runs `check` every 100 ms until it returns `Ok`, and returns that value.
///
/// An `Err` from `check` means "not yet": its message is the last observed
/// state. After `timeout` the wait fails with `description` and that message,
/// for example `timed out after 30s waiting for the namespace to be deleted;
/// last observed: namespace is Terminating`. A check that is still running at
/// the deadline is cancelled.
pub async fn wait_until<T>(
    timeout: Duration,
    description: &str,
    mut check: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_observed = String::from("nothing (the check never completed)");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => last_observed = format!("{error:#}"),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {description}; last observed: {last_observed}"
            );
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())))
            .await;
    }
}

/// Waits until object `name` has a condition of `condition_type` in
/// `status.conditions` whose status is `status` (`"True"`, `"False"` or
/// `"Unknown"`), and returns the object.
///
/// Works for any kind, including `DynamicObject` for custom resources whose
/// Rust types live elsewhere. The timeout message shows the conditions seen
/// last, with their reasons and messages.
pub async fn wait_condition<K>(
    api: &Api<K>,
    name: &str,
    condition_type: &str,
    status: &str,
    timeout: Duration,
) -> Result<K>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let description = format!("{name} to have condition {condition_type}={status}");
    wait_until(timeout, &description, async || {
        let object = api
            .get_opt(name)
            .await?
            .ok_or_else(|| anyhow!("{name} not found"))?;
        let value = serde_json::to_value(&object)?;
        let conditions = value
            .pointer("/status/conditions")
            .and_then(|conditions| conditions.as_array())
            .cloned()
            .unwrap_or_default();
        let matching = conditions.iter().find(|condition| {
            condition.get("type").and_then(|t| t.as_str()) == Some(condition_type)
        });
        match matching {
            Some(condition) if condition.get("status").and_then(|s| s.as_str()) == Some(status) => {
                Ok(object)
            }
            _ => Err(anyhow!("conditions {}", describe_conditions(&conditions))),
        }
    })
    .await
}

/// Formats conditions as `[Ready=False (Reason: message), ...]`.
fn describe_conditions(conditions: &[serde_json::Value]) -> String {
    let field = |condition: &serde_json::Value, key: &str| {
        condition
            .get(key)
            .and_then(|value| value.as_str())
            .unwrap_or("")
            .to_string()
    };
    let described: Vec<String> = conditions
        .iter()
        .map(|condition| {
            format!(
                "{}={} ({}: {})",
                field(condition, "type"),
                field(condition, "status"),
                field(condition, "reason"),
                field(condition, "message")
            )
        })
        .collect();
    format!("[{}]", described.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_until_returns_first_success() {
        let mut attempts = 0;
        let value = wait_until(Duration::from_secs(5), "three attempts", async || {
            attempts += 1;
            if attempts < 3 {
                bail!("attempt {attempts}");
            }
            Ok(attempts)
        })
        .await
        .unwrap();
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn wait_until_timeout_names_last_observation() {
        let mut attempts = 0;
        let error = wait_until(
            Duration::from_millis(350),
            "the impossible",
            async || -> Result<()> {
                attempts += 1;
                bail!("attempt {attempts}")
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(error.contains("waiting for the impossible"), "{error}");
        assert!(
            error.contains(&format!("last observed: attempt {attempts}")),
            "{error}"
        );
        assert!(attempts >= 3, "polled only {attempts} times in 350 ms");
    }

    #[tokio::test]
    async fn wait_until_cancels_hanging_check() {
        let started = Instant::now();
        let result = wait_until(
            Duration::from_millis(200),
            "a check that hangs",
            async || -> Result<()> {
                std::future::pending::<()>().await;
                Ok(())
            },
        )
        .await;
        assert!(result.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn conditions_are_described() {
        let conditions = vec![serde_json::json!({
            "type": "Ready", "status": "False", "reason": "SecretNotFound", "message": "secret x not found"
        })];
        assert_eq!(
            describe_conditions(&conditions),
            "[Ready=False (SecretNotFound: secret x not found)]"
        );
    }
}
