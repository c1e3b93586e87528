//! Waiting for a reflector store's first complete list, safely from several tasks.
//!
//! `Store::wait_until_ready` sits on a `futures` oneshot receiver that keeps only the waker of
//! the last task that polled it. When two tasks wait on clones of one store (the CachedImage
//! controller's runner and the precache loop both wait on the controller's store), the one
//! polled first is never woken: it hung the precache loop for good whenever the runner happened
//! to poll after it. Re-polling on a short interval sidesteps that: once any waiter has seen the
//! store ready, every later poll returns at once.

use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::WriterDropped;

/// How often a waiter re-polls; the cost of a lost wakeup, at most.
const REPOLL: Duration = Duration::from_millis(250);

/// Resolves once `store` has had its first complete list; an error if its writer went away
/// before that (the watch ended).
pub async fn ready<K>(store: &Store<K>) -> Result<(), WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(outcome) = tokio::time::timeout(REPOLL, store.wait_until_ready()).await {
            return outcome;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::store;
    use kube::runtime::watcher;

    use super::*;

    /// Two tasks wait on one store; the writer becomes ready after both have polled. With the
    /// bare `wait_until_ready` the first waiter is never woken (this test hangs on it); with
    /// [`ready`] both return.
    #[tokio::test]
    async fn every_waiter_sees_the_store_ready() {
        let (reader, mut writer) = store::<ConfigMap>();
        let first_done = Arc::new(AtomicBool::new(false));
        let first = {
            let (reader, done) = (reader.clone(), first_done.clone());
            tokio::spawn(async move {
                ready(&reader).await.unwrap();
                done.store(true, Ordering::Release);
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = {
            let reader = reader.clone();
            tokio::spawn(async move { ready(&reader).await.unwrap() })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        tokio::time::timeout(Duration::from_secs(5), async {
            second.await.unwrap();
            first.await.unwrap();
        })
        .await
        .expect("both waiters return");
        assert!(first_done.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_writer_gone_before_its_first_list_is_an_error() {
        let (reader, writer) = store::<ConfigMap>();
        drop(writer);
        assert!(ready(&reader).await.is_err());
    }
}
