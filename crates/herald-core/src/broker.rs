//! The broker: orders a room's messages, keeps their recent history, and fans them out to
//! every instance.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::BoxFuture;
use crate::message::{Delivery, Message, PresenceChange, Publication};
use crate::room::{ConnId, Namespace, RoomKey, RoomName, UserId};

/// A broker failure. The hub turns it into an `unavailable` error for the client; nothing is
/// acknowledged that the broker did not accept.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker is closed")]
    Closed,
}

/// Where a room stands: its latest offset and the epoch that offsets count within.
///
/// The epoch changes when a room's history is reset (for the memory broker, when the process
/// restarts), telling a client that offsets it remembers from before mean nothing now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The offset of the latest message, 0 when the room has none.
    pub offset: u64,
    pub epoch: Arc<str>,
}

/// A slice of a room's history. `since` and `before` are exclusive offset bounds.
///
/// With `since`, the page is the oldest `limit` messages after it (a client catching up).
/// Without it, the page is the newest `limit` messages before `before` (or the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryQuery {
    pub since: Option<u64>,
    pub before: Option<u64>,
    pub limit: usize,
}

/// Messages from history, ascending by offset.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub messages: Vec<Arc<Message>>,
    pub position: Position,
    /// With `since`: every message after `since` (up to `limit`) was still kept. False when
    /// the oldest of them has been trimmed, or when `since` is beyond the latest offset.
    pub complete: bool,
}

/// Receives what the broker delivers to this instance.
///
/// ## Ordering
/// The broker calls [`DeliverySink::deliver`] for one room in the order of its offsets, and
/// waits for each call before making the next, so a sink that queues in call order keeps it.
pub trait DeliverySink: Send + Sync + 'static {
    fn deliver(&self, delivery: Delivery) -> BoxFuture<'_, ()>;
}

/// A connection on this instance, as other servers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSocket {
    pub id: ConnId,
    pub user: UserId,
    pub rooms: Vec<RoomName>,
}

/// What another server asks this instance to do to some of its connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteAction {
    Join(Vec<RoomName>),
    Leave(Vec<RoomName>),
    Disconnect,
}

/// Which local connections a request is about: members of any of `rooms` (every connection
/// of the namespace when empty), minus members of any of `except`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub rooms: Vec<RoomName>,
    pub except: Vec<RoomName>,
}

/// This instance as the broker sees it: where deliveries go, and the answers to other
/// servers' requests (the adapter's `fetchSockets`, `socketsJoin`, `disconnectSockets`…).
pub trait LocalNode: DeliverySink {
    /// The local connections `selector` picks in `namespace`, with their rooms.
    fn sockets(
        &self,
        namespace: &Namespace,
        selector: &Selector,
    ) -> BoxFuture<'_, Vec<LocalSocket>>;

    /// Applies `action` to the local connections `selector` picks; returns how many.
    fn apply(
        &self,
        namespace: &Namespace,
        selector: &Selector,
        action: RemoteAction,
    ) -> BoxFuture<'_, usize>;
}

/// Moves a room's messages and events between instances.
///
/// ## Guarantees
/// - Offsets of a room start at 1 and increase by 1 per message, with no gaps, fleet-wide.
/// - Every instance subscribed to a room receives its deliveries in offset order.
/// - Delivery is at most once: an instance that lags or loses its connection misses live
///   deliveries, and its clients notice the gap in offsets and recover from [`Broker::history`].
/// - History keeps the most recent messages of each room, up to an engine-specific cap.
pub trait Broker: Send + Sync + 'static {
    /// Assigns the next offset, records the message in history and delivers it to every
    /// subscribed instance, as one step.
    fn publish(&self, publication: Publication)
    -> BoxFuture<'_, Result<Arc<Message>, BrokerError>>;

    /// Publishes several messages in order, each as [`Broker::publish`] would: offsets are
    /// assigned in the batch's order, and each message succeeds or fails alone (the answers
    /// come in the same order). A broker that can do it in one round trip overrides this.
    fn publish_batch(
        &self,
        publications: Vec<Publication>,
    ) -> BoxFuture<'_, Vec<Result<Arc<Message>, BrokerError>>> {
        Box::pin(async move {
            let mut answers = Vec::with_capacity(publications.len());
            for publication in publications {
                answers.push(self.publish(publication).await);
            }
            answers
        })
    }

    /// Delivers a presence change to every subscribed instance, without recording it.
    fn publish_presence(
        &self,
        key: RoomKey,
        change: PresenceChange,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Delivers an arbitrary event to every subscribed instance, without recording it.
    fn emit(
        &self,
        key: RoomKey,
        event: Arc<str>,
        data: Arc<RawValue>,
    ) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Reads the room's recent history.
    fn history(
        &self,
        key: &RoomKey,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<HistoryPage, BrokerError>>;

    /// Starts delivering the room to this instance (the room gained its first local member).
    /// Returns once deliveries published after it are sure to arrive.
    fn subscribe(&self, key: &RoomKey) -> BoxFuture<'_, Result<(), BrokerError>>;

    /// Stops delivering the room to this instance (its last local member left).
    fn unsubscribe(&self, key: &RoomKey) -> BoxFuture<'_, Result<(), BrokerError>>;
}
