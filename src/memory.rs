//! Gives the heap memory freed by finished exports back to the operating
//! system.
//!
//! An export allocates and frees many buffers: pages, member sets, request
//! bodies, snapshots. glibc keeps freed memory inside its heaps for reuse,
//! so after a burst of exports (the first start with a thousand syncs, say)
//! the process would stay tens of MiB larger than it needs to until the next
//! burst. Once no export has run for a short while, the process calls
//! glibc's `malloc_trim` to release the free pages. Other allocators and C libraries need nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long the process must stay without a running export before the
/// release, so that a burst releases once at its end, not after each export.
const QUIET: Duration = Duration::from_secs(2);

/// Counts running exports and releases memory when the last one ends.
#[derive(Default)]
pub struct ExportActivity {
    running: AtomicUsize,
    idle: Notify,
}

/// One running export, counted until dropped.
pub struct Active {
    activity: Arc<ExportActivity>,
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.activity.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.activity.idle.notify_one();
        }
    }
}

impl ExportActivity {
    /// Counts an export as running until the returned value is dropped.
    pub fn start(self: &Arc<Self>) -> Active {
        self.running.fetch_add(1, Ordering::AcqRel);
        Active {
            activity: Arc::clone(self),
        }
    }

    /// Exports running now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Releases free heap memory each time exports stop for [`QUIET`], until
    /// `shutdown` is cancelled.
    pub async fn release_when_idle(self: Arc<Self>, shutdown: CancellationToken) {
        self.on_idle(shutdown, release_free_memory).await;
    }

    async fn on_idle(&self, shutdown: CancellationToken, release: impl Fn()) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.idle.notified() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(QUIET) => {}
            }
            // An export that started during the pause notifies again when it
            // ends, and the release waits for that one.
            if self.running() == 0 {
                release();
            }
        }
    }
}

/// Returns the free pages of every glibc heap to the operating system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: malloc_trim takes no pointers and has no preconditions. It
    // walks glibc's own heaps under their locks, so any thread may call it
    // while others allocate.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_exports_are_counted_until_dropped() {
        let activity = Arc::new(ExportActivity::default());
        let first = activity.start();
        let second = activity.start();
        assert_eq!(activity.running(), 2);
        drop(first);
        assert_eq!(activity.running(), 1);
        drop(second);
        assert_eq!(activity.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_released_once_exports_stay_stopped() {
        let activity = Arc::new(ExportActivity::default());
        let shutdown = CancellationToken::new();
        let releases = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let activity = activity.clone();
            let shutdown = shutdown.clone();
            let releases = releases.clone();
            async move {
                activity
                    .on_idle(shutdown, || {
                        releases.fetch_add(1, Ordering::SeqCst);
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;

        // An export ends, and another starts before the quiet period is over.
        drop(activity.start());
        tokio::time::sleep(QUIET / 2).await;
        let again = activity.start();
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(releases.load(Ordering::SeqCst), 0);

        drop(again);
        tokio::time::sleep(QUIET / 2).await;
        assert_eq!(releases.load(Ordering::SeqCst), 0);
        tokio::time::sleep(QUIET).await;
        assert_eq!(releases.load(Ordering::SeqCst), 1);

        shutdown.cancel();
        task.await.unwrap();
    }
}
