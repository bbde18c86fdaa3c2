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
    Unavailable,
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
            ErrorCode::Unavailable => "unavailable",
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
    Join { room: RoomName, since: Option<u64> },
    Leave { room: RoomName },
    Message { room: RoomName, data: Box<RawValue> },
    Presence { room: RoomName },
    History { room: RoomName, query: HistoryQuery },
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
                Ok(Command::Join { room, since })
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
                Ok(Command::History { room, query })
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
    fn unknown_events_are_named() {
        let err = Command::parse("explode", json!({}), 10).expect_err("unknown");
        assert_eq!(err.code, ErrorCode::UnknownEvent);
        assert!(err.message.contains("explode"));
        assert_eq!(err.to_ack()["error"], "unknown_event");
    }
}
