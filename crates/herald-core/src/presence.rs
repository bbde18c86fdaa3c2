//! Presence: which users are in which rooms, counted per connection so that a user with
//! several tabs arrives once and leaves once.

use crate::BoxFuture;
use crate::room::{ConnId, RoomKey, UserId};

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("presence unavailable: {0}")]
    Unavailable(String),
}

/// Tracks room membership per user and connection.
///
/// ## Guarantees
/// - A user is present in a room while at least one of their connections, on any instance,
///   is in it.
/// - [`Presence::add`] returns true only for the connection that makes the user present, and
///   [`Presence::remove`] true only for the one whose removal makes the user absent, so each
///   transition is reported once.
/// - Engines shared between instances expire entries that are not refreshed, so the users of a
///   crashed instance disappear on their own.
pub trait Presence: Send + Sync + 'static {
    /// Records that `conn` of `user` is in the room; true if the user was not present before.
    fn add(
        &self,
        key: &RoomKey,
        user: &UserId,
        conn: &ConnId,
    ) -> BoxFuture<'_, Result<bool, PresenceError>>;

    /// Records that `conn` left the room; true if the user is no longer present.
    fn remove(
        &self,
        key: &RoomKey,
        user: &UserId,
        conn: &ConnId,
    ) -> BoxFuture<'_, Result<bool, PresenceError>>;

    /// The users present in the room, sorted.
    fn users(&self, key: &RoomKey) -> BoxFuture<'_, Result<Vec<UserId>, PresenceError>>;
}
