//! Wire formats: Engine.IO v4 / Socket.IO v5 text packets, and herald's `/ws` JSON frames.
//!
//! Socket.IO packets are `<engine type><socket type>[<ack id>]<json>`: `0{…}` open,
//! `2`/`3` ping/pong, `40{…}` connect, `44{…}` connect error, `42["event",data]` events and
//! `43<id>[reply]` acks. Only what the bench needs is parsed; deliveries are read without
//! building a JSON tree.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A frame the bench could not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("empty frame")]
    Empty,
    #[error("unknown packet type {0:?}")]
    UnknownType(char),
    #[error("bad ack id")]
    BadAckId,
    #[error("malformed JSON: {0}")]
    Json(String),
}

impl From<serde_json::Error> for ProtoError {
    fn from(e: serde_json::Error) -> Self {
        ProtoError::Json(e.to_string())
    }
}

/// What the bench embeds in each message's `data`: send time (µs), sender and sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Probe {
    pub t: u64,
    pub s: u64,
    pub n: u64,
}

/// One pushed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<'a> {
    pub room: Cow<'a, str>,
    pub offset: u64,
    /// The bench's probe, when `data` carries one.
    pub probe: Option<Probe>,
}

/// An ack's reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Reply {
    #[serde(default)]
    pub ok: bool,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
}

/// What a frame means to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Engine.IO open.
    Open,
    /// Engine.IO ping: answer with a pong.
    Ping,
    /// Socket.IO connected to the namespace.
    Connected,
    /// Socket.IO refused the connection, with the server's message.
    ConnectError(String),
    /// The server closed the session (Engine.IO close or Socket.IO disconnect).
    Closed,
    Delivery(Delivery<'a>),
    Ack {
        id: u64,
        reply: Reply,
    },
    /// Anything else: `session`, `presence`, pongs, noops.
    Other,
}

#[derive(Deserialize)]
struct WireMessage<'a> {
    #[serde(borrow)]
    room: Cow<'a, str>,
    offset: u64,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

impl<'a> WireMessage<'a> {
    fn into_delivery(self) -> Delivery<'a> {
        Delivery {
            room: self.room,
            offset: self.offset,
            probe: self
                .data
                .and_then(|d| serde_json::from_str::<Probe>(d.get()).ok()),
        }
    }
}

#[derive(Deserialize)]
struct ConnectErrorWire {
    #[serde(default)]
    message: Option<String>,
}

/// Reads one Socket.IO text frame.
pub fn parse_sio(text: &str) -> Result<Frame<'_>, ProtoError> {
    let mut chars = text.chars();
    let engine = chars.next().ok_or(ProtoError::Empty)?;
    match engine {
        '0' => return Ok(Frame::Open),
        '1' => return Ok(Frame::Closed),
        '2' => return Ok(Frame::Ping),
        '3' | '5' | '6' => return Ok(Frame::Other),
        '4' => {}
        other => return Err(ProtoError::UnknownType(other)),
    }
    let socket = chars.next().ok_or(ProtoError::Empty)?;
    let mut rest = &text[1 + socket.len_utf8()..];
    // A namespace other than "/" prefixes the payload with "/ns,".
    if rest.starts_with('/') {
        rest = rest.split_once(',').map_or("", |(_, r)| r);
    }
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let (id, body) = rest.split_at(digits);
    match socket {
        '0' => Ok(Frame::Connected),
        '1' => Ok(Frame::Closed),
        '4' => {
            let message = serde_json::from_str::<ConnectErrorWire>(body)
                .ok()
                .and_then(|e| e.message)
                .unwrap_or_else(|| body.to_owned());
            Ok(Frame::ConnectError(message))
        }
        '2' => {
            let Some(inner) = body
                .strip_prefix("[\"message\",")
                .and_then(|b| b.strip_suffix(']'))
            else {
                return Ok(Frame::Other);
            };
            let message: WireMessage<'_> = serde_json::from_str(inner)?;
            Ok(Frame::Delivery(message.into_delivery()))
        }
        '3' => {
            let id = id.parse::<u64>().map_err(|_| ProtoError::BadAckId)?;
            let mut replies: Vec<Reply> = serde_json::from_str(body)?;
            let reply = if replies.is_empty() {
                Reply {
                    ok: false,
                    offset: None,
                    error: Some("empty ack".into()),
                }
            } else {
                replies.swap_remove(0)
            };
            Ok(Frame::Ack { id, reply })
        }
        '5' | '6' => Ok(Frame::Other),
        other => Err(ProtoError::UnknownType(other)),
    }
}

#[derive(Deserialize)]
struct WsWire<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(borrow, default)]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Reads one `/ws` JSON frame.
pub fn parse_ws(text: &str) -> Result<Frame<'_>, ProtoError> {
    let wire: WsWire<'_> = serde_json::from_str(text)?;
    match &*wire.kind {
        "message" => {
            let room = wire
                .room
                .ok_or_else(|| ProtoError::Json("message without room".into()))?;
            let offset = wire
                .offset
                .ok_or_else(|| ProtoError::Json("message without offset".into()))?;
            Ok(Frame::Delivery(
                WireMessage {
                    room,
                    offset,
                    data: wire.data,
                }
                .into_delivery(),
            ))
        }
        "ack" => {
            let Some(id) = wire.id.and_then(|id| id.get().parse::<u64>().ok()) else {
                // An ack with id null answers a frame the server could not read.
                return Ok(Frame::Other);
            };
            Ok(Frame::Ack {
                id,
                reply: Reply {
                    ok: wire.ok,
                    offset: wire.offset,
                    error: wire.error,
                },
            })
        }
        _ => Ok(Frame::Other),
    }
}

/// The Socket.IO CONNECT packet, with the token as auth payload when given.
pub fn sio_connect(token: Option<&str>) -> String {
    match token {
        Some(token) => format!("40{}", serde_json::json!({ "token": token })),
        None => "40".to_owned(),
    }
}

/// `room_json` is the room name as a JSON string.
pub fn sio_join(ack: u64, room_json: &str) -> String {
    format!("42{ack}[\"join\",{room_json}]")
}

pub fn ws_join(ack: u64, room_json: &str) -> String {
    format!("{{\"type\":\"join\",\"room\":{room_json},\"id\":{ack}}}")
}

/// A message's `data`: the probe and `pad` (ASCII, needs no escaping).
pub fn probe_data(probe: Probe, pad: &str) -> String {
    format!(
        "{{\"t\":{},\"s\":{},\"n\":{},\"pad\":\"{pad}\"}}",
        probe.t, probe.s, probe.n
    )
}

pub fn sio_message(ack: u64, room_json: &str, data: &str) -> String {
    format!("42{ack}[\"message\",{{\"room\":{room_json},\"data\":{data}}}]")
}

pub fn ws_message(ack: u64, room_json: &str, data: &str) -> String {
    format!("{{\"type\":\"message\",\"room\":{room_json},\"data\":{data},\"id\":{ack}}}")
}

/// The pad that makes a message's `data` about `payload` bytes long.
pub fn pad_for(payload: usize) -> String {
    // `{"t":…,"s":…,"n":…,"pad":""}` takes about 50 bytes.
    "x".repeat(payload.saturating_sub(50))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_and_socket_packets() {
        assert_eq!(
            parse_sio(r#"0{"sid":"a","pingInterval":25000}"#),
            Ok(Frame::Open)
        );
        assert_eq!(parse_sio("2"), Ok(Frame::Ping));
        assert_eq!(parse_sio("3"), Ok(Frame::Other));
        assert_eq!(parse_sio(r#"40{"sid":"x"}"#), Ok(Frame::Connected));
        assert_eq!(
            parse_sio(r#"44{"message":"unauthorized"}"#),
            Ok(Frame::ConnectError("unauthorized".into()))
        );
        assert_eq!(parse_sio("41"), Ok(Frame::Closed));
        assert_eq!(parse_sio(r#"42["session",{"sid":"x"}]"#), Ok(Frame::Other));
        assert_eq!(parse_sio(""), Err(ProtoError::Empty));
        assert_eq!(parse_sio("9"), Err(ProtoError::UnknownType('9')));
    }

    #[test]
    fn sio_deliveries_carry_the_probe() {
        let frame = r#"42["message",{"room":"r1","id":"m","offset":12,"from":"u","data":{"t":1700000000000000,"s":3,"n":4,"pad":"xx"},"ts":1}]"#;
        assert_eq!(
            parse_sio(frame),
            Ok(Frame::Delivery(Delivery {
                room: "r1".into(),
                offset: 12,
                probe: Some(Probe {
                    t: 1_700_000_000_000_000,
                    s: 3,
                    n: 4
                }),
            }))
        );
        // Someone else's message: no probe, still a delivery.
        let other = r#"42["message",{"room":"r1","offset":13,"data":"hello"}]"#;
        assert!(matches!(
            parse_sio(other),
            Ok(Frame::Delivery(Delivery {
                probe: None,
                offset: 13,
                ..
            }))
        ));
        assert!(parse_sio(r#"42["message",{"room":"r1"}]"#).is_err());
    }

    #[test]
    fn sio_acks() {
        assert_eq!(
            parse_sio(r#"437[{"ok":true,"id":"m","offset":5}]"#),
            Ok(Frame::Ack {
                id: 7,
                reply: Reply {
                    ok: true,
                    offset: Some(5),
                    error: None
                }
            })
        );
        assert_eq!(
            parse_sio(r#"4312[{"ok":false,"error":"overloaded","message":"slow down"}]"#),
            Ok(Frame::Ack {
                id: 12,
                reply: Reply {
                    ok: false,
                    offset: None,
                    error: Some("overloaded".into())
                }
            })
        );
        assert_eq!(parse_sio("43[{}]"), Err(ProtoError::BadAckId));
    }

    #[test]
    fn ws_frames() {
        let message = r#"{"type":"message","room":"r","id":"m1","offset":3,"from":"u","data":{"t":5,"s":1,"n":2,"pad":""},"ts":9}"#;
        assert_eq!(
            parse_ws(message),
            Ok(Frame::Delivery(Delivery {
                room: "r".into(),
                offset: 3,
                probe: Some(Probe { t: 5, s: 1, n: 2 }),
            }))
        );
        let ack = r#"{"ok":true,"message_id":"m1","offset":3,"type":"ack","id":42}"#;
        assert_eq!(
            parse_ws(ack),
            Ok(Frame::Ack {
                id: 42,
                reply: Reply {
                    ok: true,
                    offset: Some(3),
                    error: None
                }
            })
        );
        assert_eq!(
            parse_ws(r#"{"type":"ack","id":null,"ok":false,"error":"bad_request"}"#),
            Ok(Frame::Other)
        );
        assert_eq!(
            parse_ws(r#"{"type":"event","event":"session","data":{}}"#),
            Ok(Frame::Other)
        );
        assert!(parse_ws("not json").is_err());
    }

    #[test]
    fn encoded_packets_read_back() {
        let data = probe_data(Probe { t: 1, s: 2, n: 3 }, &pad_for(60));
        assert_eq!(data.len(), r#"{"t":1,"s":2,"n":3,"pad":""}"#.len() + 10);
        assert_eq!(
            sio_message(9, "\"room\"", &data),
            format!(r#"429["message",{{"room":"room","data":{data}}}]"#)
        );
        let frame: serde_json::Value =
            serde_json::from_str(&ws_message(9, "\"room\"", &data)).expect("json");
        assert_eq!(frame["data"]["n"], 3);
        assert_eq!(frame["id"], 9);
        assert_eq!(sio_join(1, "\"a\""), r#"421["join","a"]"#);
        assert_eq!(sio_connect(None), "40");
        assert_eq!(sio_connect(Some("t.k")), r#"40{"token":"t.k"}"#);
        let join: serde_json::Value = serde_json::from_str(&ws_join(4, "\"a\"")).expect("json");
        assert_eq!(join["type"], "join");
    }
}
