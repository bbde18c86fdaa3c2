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

/// A `\uXXXX` escape in JSON text that PostgreSQL's `jsonb` refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEscape {
    /// `\u0000`: `jsonb` and `text` cannot hold the NUL character.
    Nul,
    /// A UTF-16 surrogate that is not half of a high-low pair: not a Unicode character at
    /// all, though serde_json's raw values let it through.
    LoneSurrogate,
}

/// The escapes in JSON text that PostgreSQL's `jsonb` refuses, each with the byte offset of
/// its backslash (each is six bytes long). A backslash can only stand inside a string in
/// JSON, so the text is scanned as a whole; text without one is answered at once.
pub fn json_bad_escapes(json: &str) -> Vec<(usize, BadEscape)> {
    let bytes = json.as_bytes();
    let mut found = Vec::new();
    let Some(mut at) = json.find('\\') else {
        return found;
    };
    let unit = |at: usize| -> Option<u16> {
        if bytes.get(at) != Some(&b'\\') || bytes.get(at + 1) != Some(&b'u') {
            return None;
        }
        let hex = json.get(at + 2..at + 6)?;
        u16::from_str_radix(hex, 16).ok()
    };
    while at < bytes.len() {
        if bytes[at] != b'\\' {
            at += 1;
            continue;
        }
        match unit(at) {
            Some(0) => {
                found.push((at, BadEscape::Nul));
                at += 6;
            }
            Some(0xD800..=0xDBFF) => {
                if matches!(unit(at + 6), Some(0xDC00..=0xDFFF)) {
                    at += 12;
                } else {
                    found.push((at, BadEscape::LoneSurrogate));
                    at += 6;
                }
            }
            Some(0xDC00..=0xDFFF) => {
                found.push((at, BadEscape::LoneSurrogate));
                at += 6;
            }
            Some(_) => at += 6,
            // Any other escape is two bytes: `\\`, `\"`, `\n`…
            None => at += 2,
        }
    }
    found
}

/// The first unpaired UTF-16 surrogate escape in JSON text, described for a refusal
/// ("an unpaired UTF-16 surrogate (\ud83d) at byte 9: not a Unicode character"). serde_json
/// words one as a broken hex escape; this names it as what it is.
pub fn unpaired_surrogate(json: &str) -> Option<String> {
    json_bad_escapes(json)
        .into_iter()
        .find(|(_, e)| *e == BadEscape::LoneSurrogate)
        .map(|(at, _)| {
            format!(
                "an unpaired UTF-16 surrogate ({}) at byte {at}: not a Unicode character",
                &json[at..at + 6]
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(json: &str) -> Vec<(usize, BadEscape)> {
        json_bad_escapes(json)
    }

    #[test]
    fn nul_escapes_are_found_and_escaped_backslashes_are_not_taken_for_them() {
        use BadEscape::Nul;
        assert_eq!(at(r#"{"a":"\u0000"}"#), vec![(6, Nul)]);
        assert_eq!(at(r#"{"a":"\\u0000"}"#), vec![]);
        assert_eq!(at(r#"{"a":"\\\u0000x\u0000"}"#), vec![(8, Nul), (15, Nul)]);
        assert_eq!(at(r#"{"u0000":1}"#), vec![]);
        assert_eq!(at(r#"["\u00001"]"#), vec![(2, Nul)]);
    }

    #[test]
    fn surrogates_are_bad_alone_and_fine_in_pairs() {
        use BadEscape::LoneSurrogate as Lone;
        assert_eq!(at(r#"["\ud83d\ude00"]"#), vec![], "a pair: 😀");
        assert_eq!(at(r#"["\uD83D\uDE00"]"#), vec![], "upper case hex");
        assert_eq!(at(r#"["\ud800"]"#), vec![(2, Lone)]);
        assert_eq!(at(r#"["\ud800x"]"#), vec![(2, Lone)]);
        assert_eq!(at(r#"["\ud800\u0041"]"#), vec![(2, Lone)]);
        assert_eq!(at(r#"["\udc00"]"#), vec![(2, Lone)]);
        assert_eq!(at(r#"["\ud800\ud800\udc00"]"#), vec![(2, Lone)]);
        assert_eq!(at(r#"["\u00e9\n\"\\"]"#), vec![]);
        assert_eq!(at(r#"["\ud800"#), vec![(2, Lone)], "cut short");
        assert_eq!(
            at(r#"["\u12"]"#),
            vec![],
            "not an escape PostgreSQL will see"
        );
    }
}
