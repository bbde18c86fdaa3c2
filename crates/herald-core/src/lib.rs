//! herald's core: the vocabulary every other crate speaks, and the engine traits.
//!
//! # Layout
//!
//! - [`room`]: namespaces, room names and their validation, and the room access patterns
//!   carried in tokens.
//! - [`message`]: messages with their per-room offsets, and what the broker delivers.
//! - [`broker`]: the [`Broker`] trait, which orders, records and fans out a room's messages
//!   across instances.
//! - [`presence`]: the [`Presence`] trait, which tracks which users are in which rooms.
//! - [`store`]: the [`Store`] and [`PersistQueue`] traits of the durable path.
//! - [`memory`]: the single-instance engines, used when no Redis is configured.
//! - [`redact`]: connection URLs with their secrets hidden, for logs and `check-config`.
//!
//! The traits are object safe (their methods return [`BoxFuture`]) so that the server picks an
//! engine from its configuration at start and holds it as `Arc<dyn Broker>`. Boxing costs one
//! allocation per call, which is noise next to the network round trip a real engine makes.
//!
//! With the `testsuite` feature, [`testsuite`] holds the one test suite per trait that every
//! implementation must pass.

pub mod broker;
pub mod memory;
pub mod message;
pub mod presence;
pub mod redact;
pub mod room;
pub mod store;
#[cfg(any(test, feature = "testsuite"))]
pub mod testsuite;

pub use broker::{
    Broker, BrokerError, DeliverySink, HistoryPage, HistoryQuery, LocalNode, LocalSocket, Position,
    RemoteAction, Selector,
};
pub use message::{
    BadEscape, Delivery, Message, Payload, PresenceChange, PresenceStatus, Publication,
    json_bad_escapes, unpaired_surrogate,
};
pub use presence::{Presence, PresenceError};
pub use room::{ConnId, Namespace, RoomError, RoomKey, RoomName, RoomPatterns, UserId};
pub use store::{Entry, PersistQueue, Store, StoreError};

/// A boxed, sendable future: the return type of the engine traits' async methods.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
