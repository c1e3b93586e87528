//! Watch streams whose backoff grows while the API keeps failing.
//!
//! kube's `default_backoff` starts again from its shortest delay after every `Ok` item, and a
//! watcher emits `Event::Init` before each LIST, the ones that fail again too. So a missing
//! CRD or a forbidden LIST was retried every 0.8-1.6 s for ever, by every node's proxy at once
//! (and a public report says the same of kube's watcher). [`backoff_until_data`] drops `Init`
//! after the reflector, which needs it, and before the backoff: the delay doubles on each
//! failure (0.8 s up to 30 s, with jitter) and starts over only once data arrives.

use futures::{Stream, StreamExt as _};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt as _, utils::StreamBackoff, watcher::DefaultBackoff};

/// `stream` (a watcher, usually behind a reflector) with kube's default backoff, reset only by
/// data: `Event::Init` items are dropped (see the module docs).
pub fn backoff_until_data<K, S>(
    stream: S,
) -> StreamBackoff<impl Stream<Item = watcher::Result<Event<K>>>, DefaultBackoff>
where
    S: Stream<Item = watcher::Result<Event<K>>>,
{
    stream
        .filter(|event| std::future::ready(!matches!(event, Ok(Event::Init))))
        .default_backoff()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A watcher that keeps failing: `Init`, then the failed LIST's error, over and over.
    fn failing_watcher() -> impl Stream<Item = watcher::Result<Event<()>>> {
        futures::stream::iter(0..4).flat_map(|_| {
            futures::stream::iter([Ok(Event::Init), Err(watcher::Error::NoResourceVersion)])
        })
    }

    /// The times (from the start) at which the errors came out of `stream`.
    async fn error_times(stream: impl Stream<Item = watcher::Result<Event<()>>>) -> Vec<Duration> {
        let start = tokio::time::Instant::now();
        let mut stream = std::pin::pin!(stream);
        let mut times = Vec::new();
        while let Some(item) = stream.next().await {
            if item.is_err() {
                times.push(start.elapsed());
            }
        }
        times
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_failures_wait_longer_and_longer() {
        let times = error_times(backoff_until_data(failing_watcher())).await;
        assert_eq!(times.len(), 4);
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        // 0.8-1.6 s, then 1.6-3.2 s, then 3.2-6.4 s (jitter).
        for (gap, shortest) in gaps.iter().zip([800u64, 1600, 3200]) {
            let shortest = Duration::from_millis(shortest);
            assert!(
                (shortest..=shortest * 2).contains(gap),
                "{gaps:?}: each wait doubles"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn kubes_default_backoff_alone_never_grows_there() {
        // What this module works around: Init resets the backoff before every failure.
        let times = error_times(failing_watcher().default_backoff()).await;
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.len(), 3);
        assert!(
            gaps.iter().all(|g| *g <= Duration::from_millis(1600)),
            "{gaps:?}"
        );
    }
}
