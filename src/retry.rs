//! Exponential backoff with jitter, honouring a service's `Retry-After`.

use std::future::Future;
use std::time::Duration;

use rand::RngExt as _;

/// How a call is retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Delay before the first retry.
    pub base: Duration,
    /// Longest delay between two attempts.
    pub max: Duration,
    /// Attempts in all, the first one included.
    pub attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempts: 6,
        }
    }
}

impl RetryPolicy {
    /// Delay before retry number `retry` (0 for the first retry): the
    /// exponential step with "equal jitter" (half fixed, half random), or the
    /// service's `Retry-After` plus up to a tenth more when it asked for longer.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let step = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(20)))
            .min(self.max);
        let jittered = step / 2 + step.mul_f64(rand::rng().random::<f64>() / 2.0);
        match retry_after {
            Some(asked) if asked >= jittered => {
                asked + asked.mul_f64(rand::rng().random::<f64>() / 10.0)
            }
            _ => jittered,
        }
    }
}

/// Error properties the retry loop needs.
pub trait Retryable {
    /// Returns whether a retry may succeed.
    fn is_transient(&self) -> bool;
    /// The wait the service asked for.
    fn retry_after(&self) -> Option<Duration>;
}

impl Retryable for crate::mixpanel::Error {
    fn is_transient(&self) -> bool {
        crate::mixpanel::Error::is_transient(self)
    }
    fn retry_after(&self) -> Option<Duration> {
        crate::mixpanel::Error::retry_after(self)
    }
}

impl Retryable for crate::kameleoon::Error {
    fn is_transient(&self) -> bool {
        crate::kameleoon::Error::is_transient(self)
    }
    fn retry_after(&self) -> Option<Duration> {
        crate::kameleoon::Error::retry_after(self)
    }
}

/// Runs a call until it succeeds, fails with a permanent error, or runs out
/// of attempts. `on_retry` sees each transient error and the delay chosen
/// before the loop sleeps, so callers can report the wait.
pub async fn retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    mut call: F,
    mut on_retry: impl FnMut(&E, Duration, u32),
) -> Result<T, E>
where
    E: Retryable,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retry = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && retry + 1 < policy.attempts => {
                let delay = policy.delay(retry, error.retry_after());
                on_retry(&error, delay, retry + 1);
                tokio::time::sleep(delay).await;
                retry += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug)]
    struct TestError {
        transient: bool,
        after: Option<Duration>,
    }

    impl Retryable for TestError {
        fn is_transient(&self) -> bool {
            self.transient
        }
        fn retry_after(&self) -> Option<Duration> {
            self.after
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_millis(800),
            attempts: 4,
        }
    }

    #[test]
    fn delay_grows_and_stays_within_bounds() {
        let p = policy();
        for retry in 0..10 {
            let step = (100u64 << retry.min(3)).min(800);
            let d = p.delay(retry, None);
            assert!(d >= Duration::from_millis(step / 2), "retry {retry}: {d:?}");
            assert!(d <= Duration::from_millis(step), "retry {retry}: {d:?}");
        }
    }

    #[test]
    fn delay_honours_longer_retry_after() {
        let p = policy();
        let d = p.delay(0, Some(Duration::from_secs(2)));
        assert!(d >= Duration::from_secs(2));
        assert!(d <= Duration::from_millis(2200));
    }

    #[test]
    fn delay_keeps_backoff_when_retry_after_is_shorter() {
        let p = policy();
        let d = p.delay(3, Some(Duration::from_millis(1)));
        assert!(d >= Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_after_success() {
        let calls = AtomicU32::new(0);
        let mut seen = Vec::new();
        let result = retry(
            &policy(),
            || async {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                if n < 2 {
                    Err(TestError {
                        transient: true,
                        after: None,
                    })
                } else {
                    Ok(n)
                }
            },
            |_, _, attempt| seen.push(attempt),
        )
        .await;
        assert_eq!(result.unwrap(), 2);
        assert_eq!(seen, [1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_gives_up_on_permanent_error() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &policy(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError {
                    transient: false,
                    after: None,
                })
            },
            |_, _, _| {},
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_bounds_attempts() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = retry(
            &policy(),
            || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(TestError {
                    transient: true,
                    after: None,
                })
            },
            |_, _, _| {},
        )
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
