//! The in-process persist queues: the bounded queue of single-instance mode, and the fleet's
//! queue that adds it beside the shared Redis stream for what an instance accepts alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::{BoxFuture, Entry, Message, PersistQueue, StoreError};
use tokio::sync::{mpsc, watch};

/// A bounded queue inside the process. The worker owns what it reads until the store has it
/// (it retries the same batch), so acknowledging only updates the count of pending entries.
/// Messages still queued when the process is killed are lost; a fleet on Redis keeps them in
/// the persist stream instead.
///
/// ## Store failure
/// Because the queue is not durable, it refuses new messages ([`PersistQueue::accepting`])
/// while the worker's latest store write failed: a publisher gets an error instead of an ack
/// for a message that may never be stored. What was queued before is retried until the store
/// takes it.
pub struct MemoryQueue {
    tx: mpsc::Sender<Arc<Message>>,
    /// The receiver, and the batch a read has taken so far: a read that is cancelled (the
    /// worker stopping while it waits for a batch to fill) leaves its entries here for the
    /// next read, rather than dropping them.
    rx: tokio::sync::Mutex<(mpsc::Receiver<Arc<Message>>, Vec<Entry>)>,
    capacity: usize,
    next: AtomicU64,
    pending: AtomicU64,
    failing: Mutex<Option<String>>,
}

impl MemoryQueue {
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            tx,
            rx: tokio::sync::Mutex::new((rx, Vec::new())),
            capacity: capacity.max(1),
            next: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            failing: Mutex::new(None),
        }
    }

    fn queued(&self) -> u64 {
        self.capacity.saturating_sub(self.tx.capacity()) as u64
    }
}

impl PersistQueue for MemoryQueue {
    fn push(&self, message: Arc<Message>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.tx.send(message).await.map_err(|_| StoreError::Closed) })
    }

    fn read(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            let mut guard = self.rx.lock().await;
            let (rx, taken) = &mut *guard;
            while taken.len() < max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(message)) => {
                        let id = self.next.fetch_add(1, Ordering::Relaxed).to_string();
                        taken.push(Entry { id, message });
                    }
                    Ok(None) if taken.is_empty() => return Err(StoreError::Closed),
                    Ok(None) | Err(_) => break,
                }
            }
            let entries = std::mem::take(taken);
            self.pending
                .fetch_add(entries.len() as u64, Ordering::Relaxed);
            Ok(entries)
        })
    }

    fn ack(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        let acked = ids.len() as u64;
        let _ = self
            .pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                Some(p.saturating_sub(acked))
            });
        Box::pin(std::future::ready(Ok(())))
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(std::future::ready(Ok(self.queued())))
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(std::future::ready(Ok(self.pending.load(Ordering::Relaxed))))
    }

    fn accepting(&self) -> Result<(), StoreError> {
        match &*self.failing.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(reason) => Err(StoreError::Unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    fn store_status(&self, error: Option<&StoreError>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) = error.map(ToString::to_string);
    }
}

/// Ids of entries from the local queue carry this prefix, so acknowledgements find their way.
const LOCAL: &str = "local:";

/// A fleet instance's persist queue: the shared queue (the Redis stream, which the broker's
/// publish step appends to), plus a local [`MemoryQueue`] for the messages this instance
/// accepted alone while Redis was away.
///
/// Those messages count their offsets in the broker's fallback epoch (`local_epoch`), so
/// they are told apart by it, and the store keeps them beside the fleet's rows of the same
/// room without colliding. The worker reads the local queue first, and falls back to it while
/// the shared one is unreachable, so they land in the store as soon as the store answers,
/// whether Redis is back or not.
pub struct FleetQueue {
    shared: Arc<dyn PersistQueue>,
    local: Arc<MemoryQueue>,
    local_epoch: Arc<str>,
    connected: watch::Receiver<bool>,
}

impl FleetQueue {
    /// `connected` says whether the broker publishes through Redis (and so appends to the
    /// shared queue) right now.
    pub fn new(
        shared: Arc<dyn PersistQueue>,
        local: Arc<MemoryQueue>,
        local_epoch: Arc<str>,
        connected: watch::Receiver<bool>,
    ) -> Self {
        Self {
            shared,
            local,
            local_epoch,
            connected,
        }
    }

    /// The local queue alone, for an instance that runs no worker on the shared queue.
    pub fn local(&self) -> Arc<MemoryQueue> {
        self.local.clone()
    }

    fn local_entries(entries: Vec<Entry>) -> Vec<Entry> {
        entries
            .into_iter()
            .map(|e| Entry {
                id: format!("{LOCAL}{}", e.id),
                message: e.message,
            })
            .collect()
    }
}

impl PersistQueue for FleetQueue {
    fn push(&self, message: Arc<Message>) -> BoxFuture<'_, Result<(), StoreError>> {
        if message.epoch == self.local_epoch {
            self.local.push(message)
        } else {
            self.shared.push(message)
        }
    }

    fn read(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>> {
        Box::pin(async move {
            let local = self.local.read(max, Duration::ZERO).await?;
            if !local.is_empty() {
                return Ok(Self::local_entries(local));
            }
            match self.shared.read(max, wait).await {
                Ok(entries) => Ok(entries),
                Err(e) => {
                    tracing::debug!(error = %e, "shared persist queue unreachable: reading the local one");
                    let local = self.local.read(max, wait).await?;
                    Ok(Self::local_entries(local))
                }
            }
        })
    }

    fn ack(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        let (local, shared): (Vec<String>, Vec<String>) =
            ids.iter().cloned().partition(|id| id.starts_with(LOCAL));
        Box::pin(async move {
            self.local.ack(&local).await?;
            self.shared.ack(&shared).await
        })
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let local = self.local.queued();
            Ok(local + self.shared.backlog().await.unwrap_or(0))
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let local = self.local.pending().await?;
            Ok(local + self.shared.pending().await.unwrap_or(0))
        })
    }

    fn accepting(&self) -> Result<(), StoreError> {
        // Through Redis, the persist stream holds messages while the store is away.
        if *self.connected.borrow() {
            return Ok(());
        }
        self.local.accepting()
    }

    fn store_status(&self, error: Option<&StoreError>) {
        self.local.store_status(error);
    }
}

#[cfg(test)]
mod tests {
    use herald_core::testsuite;

    use super::*;

    fn message(epoch: &str, offset: u64) -> Arc<Message> {
        let key = testsuite::key("queue");
        Arc::new(testsuite::publication(&key, "1").at(offset, epoch.into()))
    }

    #[tokio::test]
    async fn a_memory_queue_counts_pending_and_refuses_while_the_store_fails() {
        let queue = MemoryQueue::new(8);
        queue.push(message("e", 1)).await.expect("push");
        queue.push(message("e", 2)).await.expect("push");
        assert_eq!(queue.backlog().await.expect("backlog"), 2);
        let read = queue.read(10, Duration::ZERO).await.expect("read");
        assert_eq!(read.len(), 2);
        assert_eq!(queue.pending().await.expect("pending"), 2);
        assert!(queue.accepting().is_ok());
        queue.store_status(Some(&StoreError::Unavailable("read-only".into())));
        let refused = queue
            .accepting()
            .expect_err("refuses while the store fails");
        assert!(refused.to_string().contains("read-only"), "{refused}");
        queue.store_status(None);
        assert!(
            queue.accepting().is_ok(),
            "accepts again once a write succeeds"
        );
        let ids: Vec<String> = read.into_iter().map(|e| e.id).collect();
        queue.ack(&ids).await.expect("ack");
        assert_eq!(queue.pending().await.expect("pending"), 0);
    }

    #[tokio::test]
    async fn a_read_cancelled_while_its_batch_fills_loses_nothing() {
        let queue = MemoryQueue::new(8);
        queue.push(message("e", 1)).await.expect("push");
        queue.push(message("e", 2)).await.expect("push");
        // The read takes both, then waits for more until it is dropped, as a stopping
        // worker drops it.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(50),
            queue.read(10, Duration::from_secs(5)),
        )
        .await;
        assert!(cancelled.is_err(), "the read was still filling its batch");
        queue.push(message("e", 3)).await.expect("push");
        let read = queue.read(10, Duration::ZERO).await.expect("read");
        let offsets: Vec<u64> = read.iter().map(|e| e.message.offset).collect();
        assert_eq!(
            offsets,
            [1, 2, 3],
            "the next read has what the cancelled one took"
        );
    }

    #[tokio::test]
    async fn a_fleet_queue_keeps_fallback_messages_locally_and_reads_them_without_redis() {
        // A shared queue that is unreachable, as the Redis stream is while Redis is away.
        let shared = Arc::new(MemoryQueue::new(8));
        let (connected_tx, connected) = watch::channel(false);
        let local = Arc::new(MemoryQueue::new(8));
        let queue = FleetQueue::new(shared.clone(), local.clone(), "fallback".into(), connected);
        queue.push(message("fallback", 1)).await.expect("push");
        queue.push(message("fleet", 7)).await.expect("push");
        assert_eq!(local.queued(), 1, "the fallback message is kept locally");
        assert_eq!(shared.queued(), 1, "the fleet's goes to the shared queue");
        let read = queue.read(10, Duration::ZERO).await.expect("read");
        assert_eq!(read.len(), 1);
        assert!(read[0].id.starts_with(LOCAL));
        assert_eq!(&*read[0].message.epoch, "fallback");
        let ids: Vec<String> = read.into_iter().map(|e| e.id).collect();
        queue.ack(&ids).await.expect("ack");
        assert_eq!(queue.pending().await.expect("pending"), 0);

        queue.store_status(Some(&StoreError::Unavailable("down".into())));
        assert!(queue.accepting().is_err(), "alone, with the store down");
        connected_tx.send_replace(true);
        assert!(
            queue.accepting().is_ok(),
            "the Redis stream holds meanwhile"
        );
    }
}
