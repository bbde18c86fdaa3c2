//! The durable path's engines: the store messages end up in, and the queue that carries them
//! there.

use std::sync::Arc;
use std::time::Duration;

use crate::BoxFuture;
use crate::broker::HistoryQuery;
use crate::message::Message;
use crate::room::RoomKey;

/// A store or queue failure. The worker retries it with backoff; nothing is acknowledged
/// until it succeeds.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("persist queue closed")]
    Closed,
}

/// Where messages are kept for good.
///
/// ## Guarantees
/// - Writes are idempotent: a message already stored (same id, or same namespace, room,
///   epoch and offset) is skipped, so a batch written twice (a worker retrying, or two
///   workers racing) yields one row per message.
/// - Offsets are unique within an epoch, not across them: a room whose offsets start over
///   under a new epoch keeps every row of the old one.
/// - A batch is written in one transaction: all of it or none.
pub trait Store: Send + Sync + 'static {
    /// Writes a batch; returns how many rows were new.
    fn write(&self, batch: &[Arc<Message>]) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// How many batches it takes at once; the worker writes no more in parallel. Batches
    /// are disjoint, so their order does not matter. One for an engine with a single writer.
    fn concurrent_writes(&self) -> usize {
        1
    }

    /// Checks that the store answers, and where the engine can tell cheaply, that it takes
    /// writes (for readiness, and for the worker to notice a store that came back).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// A room's messages of one epoch by offset, with the same bounds as
    /// [`crate::Broker::history`]: the oldest `limit` after `since`, or the newest `limit`
    /// before `before`; ascending.
    fn history(
        &self,
        key: &RoomKey,
        epoch: &str,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Vec<Arc<Message>>, StoreError>>;
}

/// One message taken from the persist queue, with the id that acknowledges it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub message: Arc<Message>,
}

/// The durable queue between publishing and the store.
///
/// ## Guarantees
/// - An entry read but not acknowledged is read again (by this worker after a retry, or by
///   another after the claim timeout for shared queues), so a message is never lost between
///   the queue and the store.
/// - Bounded: a queue that fills up makes publishers wait; it never grows without bound.
pub trait PersistQueue: Send + Sync + 'static {
    /// Appends a message. Queues that are appended to by the broker's publish step (Redis)
    /// do nothing here.
    fn push(&self, message: Arc<Message>) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Up to `max` entries, waiting at most `wait` for the first.
    fn read(&self, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<Entry>, StoreError>>;

    /// Acknowledges entries that are safely in the store.
    fn ack(&self, ids: &[String]) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Entries waiting to be stored, for metrics.
    fn backlog(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Entries handed to a worker and not acknowledged yet, for metrics.
    fn pending(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Whether a message pushed now would be kept until the store has it. A queue that lives
    /// only in this process refuses while the store keeps failing: the publisher is told,
    /// rather than acknowledged for a message that may never be stored.
    fn accepting(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Told by the worker after each store write: `None` when it succeeded, the error
    /// otherwise.
    fn store_status(&self, _error: Option<&StoreError>) {}
}
