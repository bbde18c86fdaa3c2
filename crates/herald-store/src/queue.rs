//! The in-process persist queue of single-instance mode: bounded, so a publisher waits when
//! the store falls behind instead of memory growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use herald_core::{BoxFuture, Entry, Message, PersistQueue, StoreError};
use tokio::sync::{Mutex, mpsc};

/// A bounded queue inside the process. The worker owns what it reads until the store has it
/// (it retries the same batch), so acknowledging is a no-op. Messages still queued when the
/// process is killed are lost; a fleet on Redis keeps them in the persist stream instead.
pub struct MemoryQueue {
    tx: mpsc::Sender<Arc<Message>>,
    rx: Mutex<mpsc::Receiver<Arc<Message>>>,
    capacity: usize,
    next: AtomicU64,
}

impl MemoryQueue {
    pub fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        Self {
            tx,
            rx: Mutex::new(rx),
            capacity: capacity.max(1),
            next: AtomicU64::new(0),
        }
    }
}

impl PersistQueue for MemoryQueue {
    fn push(&self, message: Arc<Message>) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move { self.tx.send(message).await.map_err(|_| StoreError::Closed) })
    }

    fn read(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            let mut rx = self.rx.lock().await;
            let mut entries = Vec::with_capacity(max.min(1024));
            while entries.len() < max {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(message)) => {
                        let id = self.next.fetch_add(1, Ordering::Relaxed).to_string();
                        entries.push(Entry { id, message });
                    }
                    Ok(None) if entries.is_empty() => return Err(StoreError::Closed),
                    Ok(None) | Err(_) => break,
                }
            }
            Ok(entries)
        })
    }

    fn ack(&self, _ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let queued = self.capacity.saturating_sub(self.tx.capacity());
        Box::pin(std::future::ready(Ok(queued as u64)))
    }
}
