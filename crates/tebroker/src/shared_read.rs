//! Reads the HTTP readers share for a moment. Every open dashboard asks for the same views
//! every few seconds: from the store (every TE's failure rate over a week; the leases and waits
//! of the last hours: scans) and from the broker core (TEs, leases, queue: each a turn of the
//! core's lock, contended by every connection under load). Read at most once per `fresh_for`
//! and handed to everybody who asks meanwhile, their cost stays the same however many people
//! look.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One read, kept for `fresh_for` under its key (e.g. a query's parameters).
pub struct SharedRead<K, V> {
    fresh_for: Duration,
    slot: tokio::sync::Mutex<Option<Kept<K, V>>>,
}

struct Kept<K, V> {
    key: K,
    at: Instant,
    value: Arc<V>,
}

impl<K: PartialEq, V> SharedRead<K, V> {
    pub fn new(fresh_for: Duration) -> SharedRead<K, V> {
        SharedRead {
            fresh_for,
            slot: tokio::sync::Mutex::new(None),
        }
    }

    /// Drops the kept value: the next caller reads (after a change made through this surface,
    /// which its caller expects to see at once).
    pub async fn forget(&self) {
        *self.slot.lock().await = None;
    }

    /// The value kept for `key` if it is fresh, else what `read` returns (kept when it
    /// succeeds). Callers that come while a read runs wait for it rather than start their
    /// own; a failed read is not kept, so the next caller tries again.
    pub async fn get<E, F, Fut>(&self, key: K, read: F) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(kept) = slot.as_ref() {
            if kept.key == key && kept.at.elapsed() < self.fresh_for {
                return Ok(kept.value.clone());
            }
        }
        let value = Arc::new(read().await?);
        *slot = Some(Kept {
            key,
            at: Instant::now(),
            value: value.clone(),
        });
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_fresh_value_is_shared_a_stale_one_or_another_key_read_again() {
        let reads = AtomicU32::new(0);
        let read = || async { Ok::<_, ()>(reads.fetch_add(1, Ordering::SeqCst)) };
        let shared = SharedRead::new(Duration::from_millis(200));
        assert_eq!(*shared.get(1, read).await.unwrap(), 0);
        assert_eq!(*shared.get(1, read).await.unwrap(), 0);
        assert_eq!(*shared.get(2, read).await.unwrap(), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(*shared.get(2, read).await.unwrap(), 2);
        assert_eq!(reads.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_failed_read_is_not_kept() {
        let shared: SharedRead<(), u32> = SharedRead::new(Duration::from_secs(60));
        assert_eq!(shared.get((), || async { Err("down") }).await, Err("down"));
        assert_eq!(
            *shared.get((), || async { Ok::<_, &str>(7) }).await.unwrap(),
            7
        );
        assert_eq!(
            *shared
                .get((), || async { Err::<u32, _>("not asked") })
                .await
                .unwrap(),
            7
        );
    }

    #[tokio::test]
    async fn callers_during_a_read_wait_for_it_instead_of_reading_too() {
        let reads = Arc::new(AtomicU32::new(0));
        let shared = Arc::new(SharedRead::new(Duration::from_secs(60)));
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let (shared, reads) = (shared.clone(), reads.clone());
                tokio::spawn(async move {
                    shared
                        .get((), || async {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, ()>(reads.fetch_add(1, Ordering::SeqCst))
                        })
                        .await
                })
            })
            .collect();
        for c in callers {
            assert_eq!(
                *tokio::time::timeout(Duration::from_secs(10), c)
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap(),
                0
            );
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
    }
}
