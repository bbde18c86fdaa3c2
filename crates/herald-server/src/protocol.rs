//! The client protocol shared by both transports: commands a client sends, the errors it can
//! get back, and the shape of every ack.

use herald_core::{HistoryQuery, RoomName};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// The most messages one `history` call (or one recovery) returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// `history`'s page size when the client gives no limit.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;

/// The error codes a client can receive, as `{ok:false, error:"<code>", message}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    InvalidRoom,
    Forbidden,
    NotMember,
    PayloadTooLarge,
    UnknownEvent,
    Overloaded,
    RateLimited,
    TooManyRooms,
    Unavailable,
    /// A message to a persisted room was refused because the store keeps failing and the
    /// persist queue is only in memory: acknowledging it would promise what may not happen.
    StoreUnavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotMember => "not_member",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnknownEvent => "unknown_event",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::StoreUnavailable => "store_unavailable",
        }
    }
}

/// A refused command: its code and a human-readable reason.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ClientError {
    pub code: ErrorCode,
    pub message: String,
}

impl ClientError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The ack a client receives for this error.
    pub fn to_ack(&self) -> Value {
        json!({ "ok": false, "error": self.code.as_str(), "message": self.message })
    }
}

/// What a client asks for.
#[derive(Debug)]
pub enum Command {
    /// With `since`, the messages after it are re-sent first; `epoch` names the epoch `since`
    /// counts in, and when the room is in another one now, nothing is re-sent
    /// (`recovered: false`).
    Join {
        room: RoomName,
        since: Option<u64>,
        epoch: Option<String>,
    },
    Leave {
        room: RoomName,
    },
    Message {
        room: RoomName,
        data: Box<RawValue>,
    },
    Presence {
        room: RoomName,
    },
    /// `epoch`, when it names an earlier epoch than the room's, reads that epoch's stored rows.
    History {
        room: RoomName,
        query: HistoryQuery,
        epoch: Option<String>,
    },
}

impl Command {
    /// Reads the command for `event` from its payload: a room name alone, or an object.
    /// `max_payload` bounds a message's `data`, in JSON bytes.
    pub fn parse(event: &str, payload: Value, max_payload: usize) -> Result<Self, ClientError> {
        match event {
            "join" => {
                let mut fields = room_or_object(payload)?;
                let room = room_field(&mut fields)?;
                let since = offset_field(&fields, "since")?;
                let epoch = epoch_field(&fields)?;
                Ok(Command::Join { room, since, epoch })
            }
            "leave" => Ok(Command::Leave {
                room: room_field(&mut room_or_object(payload)?)?,
            }),
            "presence" => Ok(Command::Presence {
                room: room_field(&mut room_or_object(payload)?)?,
            }),
            "message" => {
                let Value::Object(mut fields) = payload else {
                    return Err(bad_request("message takes an object {room, data}"));
                };
                let room = room_field(&mut fields)?;
                let data = fields.remove("data").unwrap_or(Value::Null);
                let data = serde_json::value::to_raw_value(&data)
                    .map_err(|e| bad_request(format!("data cannot be encoded: {e}")))?;
                if data.get().len() > max_payload {
                    return Err(ClientError::new(
                        ErrorCode::PayloadTooLarge,
                        format!(
                            "data is {} bytes; the limit is {max_payload}",
                            data.get().len()
                        ),
                    ));
                }
                Ok(Command::Message { room, data })
            }
            "history" => {
                let mut fields = room_or_object(payload)?;
                let room = room_field(&mut fields)?;
                let limit = offset_field(&fields, "limit")?.map_or(DEFAULT_HISTORY_LIMIT, |l| {
                    (l as usize).min(MAX_HISTORY_LIMIT)
                });
                let query = HistoryQuery {
                    since: offset_field(&fields, "since")?,
                    before: offset_field(&fields, "before")?,
                    limit,
                };
                let epoch = epoch_field(&fields)?;
                Ok(Command::History { room, query, epoch })
            }
            other => Err(ClientError::new(
                ErrorCode::UnknownEvent,
                format!(
                    "unknown event {other:?}; expected join, leave, message, presence or history"
                ),
            )),
        }
    }
}

/// One `/ws` text frame from a client: a JSON object with a string `type`, an optional `id`
/// the ack echoes, and the command's fields.
#[derive(Debug)]
pub struct WsFrame {
    pub id: Value,
    pub kind: String,
    /// The frame without `type` and `id`: the payload [`Command::parse`] reads.
    pub fields: Value,
}

impl WsFrame {
    /// Splits a frame; a refused one comes back with the id it carried (null when none could
    /// be read).
    pub fn parse(text: &str) -> Result<Self, (Value, ClientError)> {
        let mut frame = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(frame)) => frame,
            Ok(_) => return Err((Value::Null, bad_request("a frame must be a JSON object"))),
            Err(e) => return Err((readable_id(text), bad_request(unreadable(text, &e)))),
        };
        let id = frame.remove("id").unwrap_or(Value::Null);
        let Some(Value::String(kind)) = frame.remove("type") else {
            return Err((id, bad_request("a frame needs a string type")));
        };
        Ok(WsFrame {
            id,
            kind,
            fields: Value::Object(frame),
        })
    }
}

/// The `id` of a frame that is well-formed JSON but holds what no JSON value can (an unpaired
/// UTF-16 surrogate escape, a number beyond a double), so that the client can match the
/// refusal to its request; null when the frame is not even that.
fn readable_id(text: &str) -> Value {
    serde_json::from_str::<std::collections::HashMap<String, Box<RawValue>>>(text)
        .ok()
        .and_then(|fields| {
            fields
                .get("id")
                .and_then(|id| serde_json::from_str(id.get()).ok())
        })
        .unwrap_or(Value::Null)
}

/// Why a frame could not be read, naming an unpaired surrogate as what it is.
fn unreadable(text: &str, error: &serde_json::Error) -> String {
    match herald_core::unpaired_surrogate(text) {
        Some(why) => format!("the frame holds {why}"),
        None => format!("malformed JSON: {error}"),
    }
}

fn bad_request(message: impl Into<String>) -> ClientError {
    ClientError::new(ErrorCode::BadRequest, message)
}

fn room_or_object(payload: Value) -> Result<Map<String, Value>, ClientError> {
    match payload {
        Value::String(room) => Ok(Map::from_iter([("room".to_owned(), Value::String(room))])),
        Value::Object(fields) => Ok(fields),
        _ => Err(bad_request("expected a room name or an object with a room")),
    }
}

fn room_field(fields: &mut Map<String, Value>) -> Result<RoomName, ClientError> {
    match fields.remove("room") {
        Some(Value::String(name)) => RoomName::new(&name)
            .map_err(|e| ClientError::new(ErrorCode::InvalidRoom, e.to_string())),
        Some(_) => Err(bad_request("room must be a string")),
        None => Err(bad_request("room is required")),
    }
}

fn offset_field(fields: &Map<String, Value>, name: &str) -> Result<Option<u64>, ClientError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad_request(format!("{name} must be a non-negative integer"))),
    }
}

/// The optional `epoch` field: the text a `join` or `history` ack gave.
fn epoch_field(fields: &Map<String, Value>) -> Result<Option<String>, ClientError> {
    match fields.get("epoch") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(epoch)) if epoch.len() <= 64 => Ok(Some(epoch.clone())),
        Some(_) => Err(bad_request("epoch must be a string of at most 64 bytes")),
    }
}

/// Builds an ok ack: `{ok:true, …fields}`.
pub fn ok_ack(fields: Value) -> Value {
    let mut ack = Map::from_iter([("ok".to_owned(), Value::Bool(true))]);
    if let Value::Object(fields) = fields {
        ack.extend(fields);
    }
    Value::Object(ack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(result: Result<Command, ClientError>) -> &'static str {
        result.expect_err("refused").code.as_str()
    }

    #[test]
    fn join_and_history_may_name_an_epoch() {
        let parsed = Command::parse("join", json!({"room": "r", "since": 3, "epoch": "e1"}), 10);
        assert!(
            matches!(parsed, Ok(Command::Join { since: Some(3), epoch: Some(ref e), .. }) if e == "e1")
        );
        let parsed = Command::parse("history", json!({"room": "r", "epoch": "e1"}), 10);
        assert!(matches!(parsed, Ok(Command::History { epoch: Some(ref e), .. }) if e == "e1"));
        let parsed = Command::parse("join", json!({"room": "r", "epoch": 7}), 10);
        assert_eq!(code(parsed), "bad_request");
        let long = "e".repeat(65);
        let parsed = Command::parse("history", json!({"room": "r", "epoch": long}), 10);
        assert_eq!(code(parsed), "bad_request");
    }

    #[test]
    fn join_takes_a_room_or_an_object_with_since() {
        assert!(matches!(
            Command::parse("join", json!("lobby"), 10),
            Ok(Command::Join { since: None, .. })
        ));
        assert!(matches!(
            Command::parse("join", json!({"room": "lobby", "since": 4}), 10),
            Ok(Command::Join { since: Some(4), .. })
        ));
        assert_eq!(code(Command::parse("join", json!({}), 10)), "bad_request");
        assert_eq!(code(Command::parse("join", json!(42), 10)), "bad_request");
        assert_eq!(
            code(Command::parse("join", json!("a#b"), 10)),
            "invalid_room"
        );
        assert_eq!(
            code(Command::parse(
                "join",
                json!({"room": "a", "since": -1}),
                10
            )),
            "bad_request"
        );
    }

    #[test]
    fn message_data_is_bounded() {
        let ok = Command::parse("message", json!({"room": "r", "data": "12345678"}), 10);
        assert!(
            matches!(ok, Ok(Command::Message { ref data, .. }) if data.get() == "\"12345678\"")
        );
        let big = Command::parse("message", json!({"room": "r", "data": "123456789"}), 10);
        assert_eq!(code(big), "payload_too_large");
        assert_eq!(code(Command::parse("message", json!(3), 10)), "bad_request");
    }

    #[test]
    fn history_limits_are_capped() {
        let parsed = Command::parse("history", json!({"room": "r", "limit": 1_000_000}), 10);
        assert!(
            matches!(parsed, Ok(Command::History { query, .. }) if query.limit == MAX_HISTORY_LIMIT)
        );
        let parsed = Command::parse("history", json!("r"), 10);
        assert!(
            matches!(parsed, Ok(Command::History { query, .. }) if query.limit == DEFAULT_HISTORY_LIMIT)
        );
    }

    #[test]
    fn ws_frames_split_into_id_type_and_fields() {
        let frame = WsFrame::parse(r#"{"type":"join","room":"lobby","id":7}"#).expect("frame");
        assert_eq!((frame.id, frame.kind.as_str()), (json!(7), "join"));
        assert_eq!(frame.fields, json!({"room": "lobby"}));
        let refused = |text: &str| WsFrame::parse(text).expect_err("refused");
        let (id, e) = refused(r#"{"type":5,"id":"x"}"#);
        assert_eq!((id, e.code), (json!("x"), ErrorCode::BadRequest));
        for text in ["", "[1]", "\"join\"", "{\"type\":", "{\"id\":1}"] {
            assert_eq!(refused(text).1.code, ErrorCode::BadRequest, "{text:?}");
        }
    }

    #[test]
    fn a_frame_holding_what_no_json_value_can_is_refused_with_its_id() {
        let refused = |text: &str| WsFrame::parse(text).expect_err("refused");
        let (id, e) = refused(r#"{"type":"message","room":"r","data":"a\ud83d","id":"req-2"}"#);
        assert_eq!((id, e.code), (json!("req-2"), ErrorCode::BadRequest));
        assert!(
            e.message.contains(r"unpaired UTF-16 surrogate (\ud83d)"),
            "{}",
            e.message
        );
        let (id, e) = refused(r#"{"id":3,"type":"message","room":"r","data":[1e999]}"#);
        assert_eq!((id, e.code), (json!(3), ErrorCode::BadRequest));
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        // Not even JSON: no id to give back.
        assert_eq!(refused(r#"{"id":4,"type":"#).0, Value::Null);
    }

    #[test]
    fn unknown_events_are_named() {
        let err = Command::parse("explode", json!({}), 10).expect_err("unknown");
        assert_eq!(err.code, ErrorCode::UnknownEvent);
        assert!(err.message.contains("explode"));
        assert_eq!(err.to_ack()["error"], "unknown_event");
    }
}
