//! Progress of a running export, updated by the export as it goes and
//! written to status at a steady pace by a separate task.

use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::crd::{ExportPhase, SyncProgress};

/// Progress shared between an export and its status writer.
#[derive(Default)]
pub struct Tracker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    progress: SyncProgress,
    waiting: Option<(&'static str, String)>,
    started: Option<Timestamp>,
    version: u64,
}

/// What the status writer shows.
#[derive(Clone, Debug, PartialEq)]
pub struct View {
    /// Progress fields.
    pub progress: SyncProgress,
    /// Reason and message of a wait, when the export is waiting.
    pub waiting: Option<(&'static str, String)>,
    /// Changes so far; a writer skips a view it already wrote.
    pub version: u64,
}

impl Tracker {
    fn update(&self, change: impl FnOnce(&mut State)) {
        let mut state = self.state.lock().expect("progress lock");
        change(&mut state);
        state.version += 1;
    }

    /// Marks the start of the export.
    pub fn start(&self, now: Timestamp) {
        self.update(|s| s.started = Some(now));
    }

    /// Enters a phase, resetting the batch counts.
    pub fn phase(&self, phase: ExportPhase) {
        self.update(|s| {
            s.progress.phase = phase;
            s.progress.batches_sent = None;
            s.progress.batches_total = None;
        });
    }

    /// Records a page read from Mixpanel.
    pub fn page_read(
        &self,
        pages: i64,
        members: i64,
        expected_members: Option<i64>,
        page_size: i64,
    ) {
        self.update(|s| {
            s.progress.pages_read = pages;
            s.progress.members_read = members;
            if let Some(expected) = expected_members {
                s.progress.expected_members = Some(expected);
                s.progress.expected_pages = Some(expected / page_size.max(1) + 1);
            }
            s.waiting = None;
        });
    }

    /// Restarts the read after an expired paging session.
    pub fn restart_read(&self) {
        self.update(|s| {
            s.progress.pages_read = 0;
            s.progress.members_read = 0;
        });
    }

    /// Records Data API batches.
    pub fn batches(&self, sent: i64, total: i64) {
        self.update(|s| {
            s.progress.batches_sent = Some(sent);
            s.progress.batches_total = Some(total.max(sent));
            s.waiting = None;
        });
    }

    /// Sets the estimated completion time.
    pub fn estimate(&self, at: Option<Timestamp>) {
        self.update(|s| s.progress.estimated_completion_time = at.map(Time));
    }

    /// Reports a wait (rate limit, retry), shown until the next progress.
    pub fn waiting(&self, reason: &'static str, message: String) {
        self.update(|s| s.waiting = Some((reason, message)));
    }

    /// Returns the current view.
    pub fn view(&self) -> View {
        let state = self.state.lock().expect("progress lock");
        View {
            progress: state.progress.clone(),
            waiting: state.waiting.clone(),
            version: state.version,
        }
    }

    /// Estimates the completion of the read from the pace so far.
    pub fn estimate_read(&self, now: Timestamp, extra_wait: Duration) -> Option<Timestamp> {
        let state = self.state.lock().expect("progress lock");
        let started = state.started?;
        let expected = state.progress.expected_pages?;
        let read = state.progress.pages_read;
        if read == 0 {
            return None;
        }
        let elapsed = now.duration_since(started);
        let per_page = elapsed.checked_div(read as i32)?;
        let remaining = per_page.checked_mul((expected - read).max(0) as i32)?;
        let extra = SignedDuration::try_from(extra_wait).ok()?;
        now.checked_add(remaining.checked_add(extra)?).ok()
    }
}

/// One-line summary of a view for the Reconciling condition.
pub fn describe(view: &View) -> String {
    let p = &view.progress;
    let mut text = match p.phase {
        ExportPhase::ReadingMixpanel => {
            let pages = match p.expected_pages {
                Some(total) => format!("page {} of {total}", p.pages_read),
                None => format!("page {}", p.pages_read),
            };
            let members = match p.expected_members {
                Some(total) => format!("{} of {total} profiles", p.members_read),
                None => format!("{} profiles", p.members_read),
            };
            format!("Reading Mixpanel: {pages}, {members}")
        }
        ExportPhase::ClearingPrevious => format!(
            "Clearing the previous custom data in Kameleoon: request {} of {}",
            p.batches_sent.unwrap_or(0),
            p.batches_total.unwrap_or(0)
        ),
        ExportPhase::WritingKameleoon => format!(
            "Writing to Kameleoon: request {} of {}",
            p.batches_sent.unwrap_or(0),
            p.batches_total.unwrap_or(0)
        ),
    };
    if let Some(at) = &p.estimated_completion_time {
        text.push_str(&format!(
            "; estimated completion {}",
            at.0.strftime("%Y-%m-%dT%H:%M:%SZ")
        ));
    }
    if let Some((_, wait)) = &view.waiting {
        text.push_str("; ");
        text.push_str(wait);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_reading_with_totals() {
        let tracker = Tracker::default();
        tracker.page_read(3, 2500, Some(10_000), 1000);
        assert_eq!(
            describe(&tracker.view()),
            "Reading Mixpanel: page 3 of 11, 2500 of 10000 profiles"
        );
    }

    #[test]
    fn describe_adds_wait_until_next_progress() {
        let tracker = Tracker::default();
        tracker.phase(ExportPhase::WritingKameleoon);
        tracker.batches(1, 4);
        tracker.waiting(
            "KameleoonRateLimited",
            "Kameleoon answered 429, retrying in 2s".into(),
        );
        assert!(describe(&tracker.view()).ends_with("retrying in 2s"));
        tracker.batches(2, 4);
        assert_eq!(
            describe(&tracker.view()),
            "Writing to Kameleoon: request 2 of 4"
        );
    }

    #[test]
    fn estimate_follows_pace() {
        let tracker = Tracker::default();
        let start = Timestamp::from_second(1_000_000).unwrap();
        tracker.start(start);
        tracker.page_read(2, 2000, Some(9_999), 1000);
        let now = Timestamp::from_second(1_000_020).unwrap();
        // 10 s per page, 8 pages to go.
        let at = tracker.estimate_read(now, Duration::ZERO).unwrap();
        assert_eq!(at, Timestamp::from_second(1_000_100).unwrap());
    }

    #[test]
    fn version_moves_on_every_change() {
        let tracker = Tracker::default();
        let before = tracker.view().version;
        tracker.batches(1, 1);
        assert!(tracker.view().version > before);
    }
}
