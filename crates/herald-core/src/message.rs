//! Messages with their per-room offsets, and the deliveries a broker hands to an instance.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::room::{Namespace, RoomKey, RoomName, UserId};

/// A message about to be published: everything but its offset, which the broker assigns.
#[derive(Debug, Clone)]
pub struct Publication {
    pub key: RoomKey,
    /// Unique message id, assigned by the publishing instance.
    pub id: String,
    pub from: UserId,
    /// The client's payload, kept as the JSON text it arrived in.
    pub data: Box<RawValue>,
    /// Publish time, unix milliseconds.
    pub ts: i64,
    /// The message goes to the durable queue too. A broker with a shared queue (Redis)
    /// appends it in the publish step itself; otherwise the publisher queues it.
    pub persist: bool,
    /// The publishing instance, recorded with the stored row.
    pub instance: Option<Arc<str>>,
}

impl Publication {
    /// Gives the publication its place in the room: `offset` counted within `epoch`.
    pub fn at(self, offset: u64, epoch: Arc<str>) -> Message {
        Message {
            namespace: self.key.namespace,
            room: self.key.room,
            id: self.id,
            offset,
            from: self.from,
            data: self.data,
            ts: self.ts,
            epoch,
            instance: self.instance,
        }
    }
}

/// A published message. Serializes as the client sees it: `{room, id, offset, from, data, ts}`.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    #[serde(skip)]
    pub namespace: Namespace,
    pub room: RoomName,
    pub id: String,
    /// Position in the room: 1 for the first message, +1 for each one after, without gaps.
    pub offset: u64,
    pub from: UserId,
    pub data: Box<RawValue>,
    /// Publish time, unix milliseconds.
    pub ts: i64,
    /// The epoch `offset` counts within (see [`crate::Position`]). A store keys rows by
    /// (namespace, room, epoch, offset), so a room whose offsets start over (a new process in
    /// embedded mode, Redis history expiring, an instance serving alone while Redis is away)
    /// never collides with rows stored before. Empty where unknown: live deliveries from
    /// other instances do not carry it on the wire.
    #[serde(skip)]
    pub epoch: Arc<str>,
    /// The instance that published the message, where known.
    #[serde(skip)]
    pub instance: Option<Arc<str>>,
}

impl Message {
    pub fn key(&self) -> RoomKey {
        RoomKey::new(self.namespace.clone(), self.room.clone())
    }
}

/// Whether a user arrived in a room or left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    Join,
    Leave,
}

/// A user's presence transition in a room: `{room, user, status}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceChange {
    pub room: RoomName,
    pub user: UserId,
    pub status: PresenceStatus,
}

/// What a room receives.
#[derive(Debug, Clone)]
pub enum Payload {
    /// A published message with its offset; recorded in history.
    Message(Arc<Message>),
    /// A user joined or left the room.
    Presence(PresenceChange),
    /// An arbitrary event from a backend (the HTTP API or an emitter); not recorded.
    Event { name: Arc<str>, data: Arc<RawValue> },
}

impl Payload {
    /// The event name a Socket.IO client receives this payload under.
    pub fn event_name(&self) -> &str {
        match self {
            Payload::Message(_) => "message",
            Payload::Presence(_) => "presence",
            Payload::Event { name, .. } => name,
        }
    }
}

/// One payload for the local members of one room, handed over by the broker in room order.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub key: RoomKey,
    pub payload: Payload,
    /// Members of any of these rooms (or connections with these ids) are skipped, as with
    /// Socket.IO's `except`.
    pub except: Vec<RoomName>,
}

impl Delivery {
    pub fn new(key: RoomKey, payload: Payload) -> Self {
        Self {
            key,
            payload,
            except: Vec::new(),
        }
    }
}

/// Where JSON text holds the escape `\u0000` (the NUL character), as byte offsets of its
/// backslash. `\\u0000` (a backslash, then the text `u0000`) is not one.
pub fn json_nul_escapes(json: &str) -> Vec<usize> {
    let bytes = json.as_bytes();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = json[from..].find("u0000").map(|i| from + i) {
        let backslashes = bytes[..at]
            .iter()
            .rev()
            .take_while(|b| **b == b'\\')
            .count();
        if backslashes % 2 == 1 {
            found.push(at - 1);
        }
        from = at + 5;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not_taken_for_them() {
        assert_eq!(json_nul_escapes(r#"{"a":"\u0000"}"#), vec![6]);
        assert_eq!(json_nul_escapes(r#"{"a":"\\u0000"}"#), Vec::<usize>::new());
        assert_eq!(json_nul_escapes(r#"{"a":"\\\u0000x\u0000"}"#), vec![8, 15]);
        assert_eq!(json_nul_escapes(r#"{"u0000":1}"#), Vec::<usize>::new());
        assert_eq!(json_nul_escapes(r#"["\u00001"]"#), vec![2]);
    }
}
