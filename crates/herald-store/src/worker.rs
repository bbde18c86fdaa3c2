//! The batching worker: reads the persist queue in batches, writes them to the store, and
//! acknowledges only after commit, retrying a failing store with capped backoff.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_core::{Message, PersistQueue, Store};

/// Metric names of the durable path.
pub mod metric {
    pub const QUEUE_LENGTH: &str = "herald_persist_queue_length";
    /// Entries handed to a worker and not acknowledged yet (being written, or retried).
    pub const PENDING: &str = "herald_persist_pending";
    pub const LAG: &str = "herald_persist_lag_seconds";
    pub const BATCH_SIZE: &str = "herald_worker_batch_size";
    pub const BATCH_SECONDS: &str = "herald_worker_batch_seconds";
    pub const ROWS_WRITTEN: &str = "herald_rows_written_total";
    pub const RETRIES: &str = "herald_worker_retries_total";
}

/// How a worker batches.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Names the worker in logs and in a shared queue's consumer group (`WORKER_ID`).
    pub id: String,
    /// Most messages per batch (`BATCH_SIZE`).
    pub batch_size: usize,
    /// Longest wait to fill a batch (`BATCH_TIMEOUT`).
    pub batch_timeout: Duration,
    /// Longest pause between retries of a failing store.
    pub max_backoff: Duration,
}

/// How often the queue's length and pending count are read for the gauges.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

pub struct Worker {
    queue: Arc<dyn PersistQueue>,
    store: Arc<dyn Store>,
    settings: WorkerSettings,
}

impl Worker {
    pub fn new(
        queue: Arc<dyn PersistQueue>,
        store: Arc<dyn Store>,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            queue,
            store,
            settings,
        }
    }

    /// Runs until `shutdown` resolves, then stores what is still queued and returns.
    ///
    /// Reading goes on while batches are written: up to the store's
    /// [`Store::concurrent_writes`] batches are in flight, each acknowledged when its own
    /// write commits, so a store that takes batches in parallel is never left idle while
    /// the next batch is read. Each batch is written by a task of its own, so it goes on
    /// while this loop waits for anything else.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let this = Arc::new(self);
        let parallel = this.store.concurrent_writes().max(1);
        tracing::info!(worker = %this.settings.id, batch_size = this.settings.batch_size, parallel, "persist worker started");
        // A store that cannot take writes is known before the first message is acknowledged.
        this.check_store().await;
        let mut writing = tokio::task::JoinSet::new();
        let mut reported = Instant::now();
        'reading: loop {
            while writing.len() >= parallel {
                tokio::select! {
                    written = writing.join_next() => this.written(written),
                    () = &mut shutdown => break 'reading,
                }
            }
            let read = this
                .queue
                .read(this.settings.batch_size, this.settings.batch_timeout);
            tokio::pin!(read);
            // Batches finishing meanwhile free their slot; the read itself is never dropped
            // half done, except at shutdown (queues keep what a cancelled read took).
            let batch = loop {
                tokio::select! {
                    batch = &mut read => break batch,
                    written = writing.join_next(), if !writing.is_empty() => this.written(written),
                    () = &mut shutdown => break 'reading,
                }
            };
            match batch {
                Ok(entries) if entries.is_empty() => {
                    // Nothing to retry, so only a check tells when a failing store is back.
                    if this.queue.accepting().is_err() {
                        this.check_store().await;
                    }
                }
                Ok(entries) => {
                    let worker = this.clone();
                    writing.spawn(async move { worker.store_batch(entries).await });
                }
                Err(e) => {
                    tracing::warn!(worker = %this.settings.id, error = %e, "persist queue read failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            if reported.elapsed() >= REPORT_INTERVAL {
                this.report().await;
                reported = Instant::now();
            }
        }
        // Batches being written are finished (and acknowledged) before the rest is drained.
        while let Some(written) = writing.join_next().await {
            this.written(Some(written));
        }
        this.drain().await;
        tracing::info!(worker = %this.settings.id, "persist worker stopped");
    }

    /// Notes the end of a batch's task. A task that panicked acknowledged nothing: the Redis
    /// stream hands its entries out again after `claim_idle`.
    fn written(&self, ended: Option<Result<(), tokio::task::JoinError>>) {
        if let Some(Err(e)) = ended {
            tracing::error!(worker = %self.settings.id, error = %e, "a batch's write task failed before acknowledging it");
        }
    }

    /// Pings the store and tells the queue how it went.
    async fn check_store(&self) {
        match self.store.ping().await {
            Ok(()) => self.queue.store_status(None),
            Err(e) => {
                tracing::warn!(worker = %self.settings.id, error = %e, "store is not taking writes");
                self.queue.store_status(Some(&e));
            }
        }
    }

    async fn report(&self) {
        if let Ok(len) = self.queue.backlog().await {
            metrics::gauge!(metric::QUEUE_LENGTH).set(len as f64);
        }
        if let Ok(pending) = self.queue.pending().await {
            metrics::gauge!(metric::PENDING).set(pending as f64);
        }
    }

    /// Stores whatever is queued now, without waiting for more.
    pub async fn drain(&self) {
        while let Ok(entries) = self
            .queue
            .read(self.settings.batch_size, Duration::from_millis(10))
            .await
        {
            if entries.is_empty() {
                return;
            }
            self.store_batch(entries).await;
        }
    }

    /// Writes one batch, retrying until the store takes it, then acknowledges it.
    ///
    /// A read can hold more than `BATCH_SIZE` messages (a queue entry may carry several, and
    /// its messages are acknowledged together). Past twice the size it is written as equal
    /// parts of at most `BATCH_SIZE`, one after the other, so that no transaction grows
    /// beyond what the setting allows; the entries are acknowledged once every part is in.
    async fn store_batch(&self, entries: Vec<herald_core::Entry>) {
        let started = Instant::now();
        let messages: Vec<Arc<Message>> = entries.iter().map(|e| e.message.clone()).collect();
        let size = self.settings.batch_size.max(1);
        let parts = if messages.len() > 2 * size {
            messages.len().div_ceil(size)
        } else {
            1
        };
        let mut written = 0;
        for part in messages.chunks(messages.len().div_ceil(parts).max(1)) {
            written += self.write(part).await;
        }
        let ids: Vec<String> = entries.into_iter().map(|e| e.id).collect();
        if let Err(e) = self.queue.ack(&ids).await {
            // Unacknowledged entries come back, and the store skips what it already has.
            tracing::warn!(worker = %self.settings.id, error = %e, "persist ack failed; entries will be retried");
        }
        metrics::counter!(metric::ROWS_WRITTEN).increment(written);
        metrics::histogram!(metric::BATCH_SIZE).record(messages.len() as f64);
        metrics::histogram!(metric::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        if let Some(oldest) = messages.iter().map(|m| m.ts).min() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(oldest);
            metrics::histogram!(metric::LAG).record((now - oldest).max(0) as f64 / 1000.0);
        }
    }

    /// Writes messages in one store write, retrying with capped backoff until the store
    /// takes them; returns how many rows were new.
    async fn write(&self, messages: &[Arc<Message>]) -> u64 {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.store.write(messages).await {
                Ok(written) => {
                    self.queue.store_status(None);
                    return written;
                }
                Err(e) => {
                    self.queue.store_status(Some(&e));
                    if backoff == Duration::from_millis(100) {
                        // The first failure of a batch: the gauges show what is held.
                        self.report().await;
                    }
                    metrics::counter!(metric::RETRIES).increment(1);
                    tracing::warn!(worker = %self.settings.id, error = %e, ?backoff, batch = messages.len(), "store write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.settings.max_backoff);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use herald_core::{BoxFuture, Entry, HistoryQuery, RoomKey, StoreError};

    use super::*;

    /// A queue that hands out its entries in one read, as a stream entry of the batch
    /// script does with its messages, and records what is acknowledged.
    struct OneRead {
        entries: Mutex<Vec<Entry>>,
        acked: Mutex<Vec<String>>,
    }

    impl PersistQueue for OneRead {
        fn push(&self, _message: Arc<Message>) -> BoxFuture<'_, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }

        fn read(
            &self,
            _max: usize,
            _wait: Duration,
        ) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>> {
            let entries = std::mem::take(&mut *self.entries.lock().expect("entries"));
            Box::pin(async move { Ok(entries) })
        }

        fn ack(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>> {
            self.acked.lock().expect("acked").extend_from_slice(ids);
            Box::pin(async { Ok(()) })
        }

        fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
            Box::pin(async { Ok(0) })
        }

        fn pending(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
            Box::pin(async { Ok(0) })
        }
    }

    /// A store that records the size of every write.
    #[derive(Default)]
    struct Sizes(Mutex<Vec<usize>>);

    impl Store for Sizes {
        fn write(&self, batch: &[Arc<Message>]) -> BoxFuture<'_, Result<u64, StoreError>> {
            self.0.lock().expect("sizes").push(batch.len());
            let n = batch.len() as u64;
            Box::pin(async move { Ok(n) })
        }

        fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }

        fn history(
            &self,
            _key: &RoomKey,
            _epoch: &str,
            _query: HistoryQuery,
        ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>> {
            Box::pin(async { Ok(Vec::new()) })
        }
    }

    /// `messages` messages in queue entries of `per_entry` each.
    async fn drained(messages: u64, per_entry: u64) -> (Vec<usize>, Vec<String>) {
        let key = herald_core::testsuite::key("parts");
        let entries = (1..=messages)
            .map(|offset| Entry {
                id: format!("{}-0", (offset - 1) / per_entry),
                message: Arc::new(
                    herald_core::testsuite::publication(&key, &offset.to_string())
                        .at(offset, "e".into()),
                ),
            })
            .collect();
        let queue = Arc::new(OneRead {
            entries: Mutex::new(entries),
            acked: Mutex::default(),
        });
        let store = Arc::new(Sizes::default());
        let settings = WorkerSettings {
            id: "parts".into(),
            batch_size: 10,
            batch_timeout: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
        };
        Worker::new(queue.clone(), store.clone(), settings)
            .drain()
            .await;
        let sizes = store.0.lock().expect("sizes").clone();
        let acked = queue.acked.lock().expect("acked").clone();
        (sizes, acked)
    }

    #[tokio::test]
    async fn a_read_far_past_the_batch_size_is_written_in_parts_no_larger_than_it() {
        let (sizes, acked) = drained(45, 15).await;
        assert_eq!(sizes, vec![9, 9, 9, 9, 9]);
        let mut ids = acked.clone();
        ids.dedup();
        assert_eq!(ids, vec!["0-0", "1-0", "2-0"], "each entry acknowledged");
    }

    #[tokio::test]
    async fn a_read_up_to_twice_the_batch_size_is_one_write() {
        let (sizes, _) = drained(20, 20).await;
        assert_eq!(sizes, vec![20]);
    }
}
