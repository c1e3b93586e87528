//! Sharing one in-flight computation among every caller that asks for the same key. The work
//! runs in its own task, so a caller that goes away cancels nothing for the others.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use crate::error::{ProxyError, Upstream};

type SharedResult<V> = Shared<BoxFuture<'static, Result<V, ProxyError>>>;

/// In-flight work by key.
pub struct Coalescer<K, V: Clone> {
    inflight: Mutex<HashMap<K, SharedResult<V>>>,
}

impl<K, V: Clone> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, V: Clone> std::fmt::Debug for Coalescer<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer").finish_non_exhaustive()
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Runs `work` for `key`, or waits for the run already in flight. Returns the result and
    /// whether this call joined another's run.
    pub async fn run<F>(self: &Arc<Self>, key: K, work: F) -> (Result<V, ProxyError>, bool)
    where
        F: Future<Output = Result<V, ProxyError>> + Send + 'static,
    {
        let (shared, joined) = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(existing) = inflight.get(&key) {
                (existing.clone(), true)
            } else {
                let this = Arc::clone(self);
                let task_key = key.clone();
                let handle = tokio::spawn(async move {
                    let result = work.await;
                    // Removed by the task itself, so it happens even if every caller left.
                    this.inflight
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&task_key);
                    result
                });
                let shared = async move {
                    handle.await.unwrap_or_else(|e| {
                        Err(ProxyError::Unavailable {
                            upstream: Upstream::Origin,
                            detail: format!("upstream task ended abnormally: {e}"),
                        })
                    })
                }
                .boxed()
                .shared();
                inflight.insert(key, shared.clone());
                (shared, false)
            }
        };
        (shared.await, joined)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_callers_start_a_new_one() {
        let coalescer: Arc<Coalescer<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..16 {
            let c = Arc::clone(&coalescer);
            let runs = Arc::clone(&runs);
            handles.push(tokio::spawn(async move {
                c.run("k", async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(runs.fetch_add(1, Ordering::SeqCst))
                })
                .await
            }));
        }
        let mut joined = 0;
        for h in handles {
            let (result, j) = h.await.unwrap();
            assert_eq!(result.unwrap(), 0);
            joined += usize::from(j);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 15);
        let (again, j) = coalescer.run("k", async { Ok(7) }).await;
        assert_eq!((again.unwrap(), j), (7, false));
    }

    #[tokio::test]
    async fn a_caller_that_leaves_does_not_cancel_the_work() {
        let coalescer: Arc<Coalescer<u8, u8>> = Arc::default();
        let done = Arc::new(AtomicUsize::new(0));
        let d = Arc::clone(&done);
        let c = Arc::clone(&coalescer);
        let first = tokio::spawn(async move {
            c.run(1, async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                d.fetch_add(1, Ordering::SeqCst);
                Ok(1)
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        first.abort();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            done.load(Ordering::SeqCst),
            1,
            "the work finished although its caller left"
        );
        assert!(coalescer.inflight.lock().unwrap().is_empty());
    }
}
