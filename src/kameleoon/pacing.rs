//! Pacing of Automation API requests, per OAuth client, below Kameleoon's
//! documented limits: 50 requests per 10 seconds and 1,000 per hour.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A limit: at most `requests` in any sliding `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Requests allowed in the window.
    pub requests: usize,
    /// Window length.
    pub window: Duration,
}

/// Limits of the Kameleoon Automation API per client, as its documents give
/// them. The OAuth token endpoint is counted too, because no separate limit
/// is documented for it.
pub const AUTOMATION_LIMITS: [Window; 2] = [
    Window {
        requests: 50,
        window: Duration::from_secs(10),
    },
    Window {
        requests: 1000,
        window: Duration::from_secs(3600),
    },
];

/// Start times of recent requests per client.
pub struct Pacer {
    limits: Vec<Window>,
    starts: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Pacer {
    /// A pacer that keeps every client within all `limits`.
    pub fn new(limits: &[Window]) -> Self {
        Self {
            limits: limits.to_vec(),
            starts: Mutex::default(),
        }
    }

    /// Waits until a request of `client` fits every window, and records it.
    /// Returns how long it waited.
    pub async fn acquire(&self, client: &str) -> Duration {
        let began = Instant::now();
        loop {
            let wait = {
                let mut starts = self.starts.lock().expect("pacer lock");
                let history = starts.entry(client.to_string()).or_default();
                let now = Instant::now();
                let longest = self
                    .limits
                    .iter()
                    .map(|l| l.window)
                    .max()
                    .unwrap_or_default();
                while history
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= longest)
                {
                    history.pop_front();
                }
                match self.wait_for(history, now) {
                    None => {
                        history.push_back(now);
                        return began.elapsed();
                    }
                    Some(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// How long until one more request fits every window; `None` when it fits now.
    fn wait_for(&self, history: &VecDeque<Instant>, now: Instant) -> Option<Duration> {
        self.limits
            .iter()
            .filter_map(|limit| {
                let in_window: Vec<&Instant> = history
                    .iter()
                    .filter(|t| now.duration_since(**t) < limit.window)
                    .collect();
                if in_window.len() < limit.requests {
                    return None;
                }
                // The request that leaves the window first makes room.
                let frees = in_window[in_window.len() - limit.requests];
                Some(
                    (*frees + limit.window)
                        .saturating_duration_since(now)
                        .max(Duration::from_millis(1)),
                )
            })
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_stay_within_every_window() {
        let pacer = Pacer::new(&[
            Window {
                requests: 3,
                window: Duration::from_secs(10),
            },
            Window {
                requests: 5,
                window: Duration::from_secs(100),
            },
        ]);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..7 {
            pacer.acquire("client").await;
            times.push(start.elapsed().as_secs());
        }
        // Three at once, two more after 10 s, then the hourly-style window.
        assert_eq!(times, [0, 0, 0, 10, 10, 100, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn clients_are_paced_apart() {
        let pacer = Pacer::new(&[Window {
            requests: 1,
            window: Duration::from_secs(10),
        }]);
        pacer.acquire("a").await;
        assert_eq!(pacer.acquire("b").await, Duration::ZERO);
        assert_eq!(pacer.acquire("a").await, Duration::from_secs(10));
    }
}
