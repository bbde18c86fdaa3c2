//! The wire format of Node's `@socket.io/redis-adapter` v8 (classic mode): channel names, the
//! msgpack broadcast `[uid, packet, opts]`, and the JSON requests and responses.

use herald_core::{Message, Namespace, RoomName};
use rmpv::Value;
use serde::{Deserialize, Serialize};

/// Socket.IO packet type of an event.
pub const EVENT: u64 = 2;

/// The uid `@socket.io/redis-emitter` puts in its broadcasts.
pub const EMITTER_UID: &str = "emitter";

/// How deeply msgpack off the wire may nest, in rmpv's units (two per array or map level):
/// about 127 levels, as deep as serde_json reads JSON and far beyond any real packet. rmpv's
/// own limit lets garbage nest deeply enough to overflow a tokio worker's stack in a debug
/// build.
pub const MAX_DEPTH: usize = 256;

/// Reads one msgpack value, no deeper than [`MAX_DEPTH`].
fn read_msgpack(mut bytes: &[u8]) -> Result<Value, CodecError> {
    Ok(rmpv::decode::read_value_with_max_depth(
        &mut bytes, MAX_DEPTH,
    )?)
}

/// Why bytes off the wire could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("not msgpack: {0}")]
    Msgpack(#[from] rmpv::decode::Error),
    #[error("unexpected shape: {0}")]
    Shape(&'static str),
    #[error("not json: {0}")]
    Json(#[from] serde_json::Error),
}

/// The channel names of one namespace under one key prefix.
#[derive(Debug, Clone)]
pub struct Channels {
    /// `<key>#<nsp>#`: broadcasts to several rooms, or the whole namespace.
    pub broadcast: String,
    /// `<key>-request#<nsp>#`: requests between servers.
    pub request: String,
    /// `<key>-response#<nsp>#`: responses to requests.
    pub response: String,
}

impl Channels {
    pub fn new(key: &str, namespace: &Namespace) -> Self {
        Self {
            broadcast: format!("{key}#{namespace}#"),
            request: format!("{key}-request#{namespace}#"),
            response: format!("{key}-response#{namespace}#"),
        }
    }

    /// `<key>#<nsp>#<room>#`: broadcasts to exactly this room.
    pub fn room(&self, room: &RoomName) -> String {
        format!("{}{room}#", self.broadcast)
    }

    /// `<key>-response#<nsp>#<uid>#`: responses meant for one server.
    pub fn response_for(&self, uid: &str) -> String {
        format!("{}{uid}#", self.response)
    }

    /// The room a broadcast channel names: `Some(None)` for the namespace channel,
    /// `Some(Some(room))` for a room channel, `None` for another namespace's channel.
    pub fn room_of<'a>(&self, channel: &'a str) -> Option<Option<&'a str>> {
        let rest = channel.strip_prefix(self.broadcast.as_str())?;
        if rest.is_empty() {
            return Some(None);
        }
        rest.strip_suffix('#').map(Some)
    }
}

/// A broadcast read off a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Broadcast {
    /// The sending server, `emitter` for the emitter; absent on some emitter messages.
    pub uid: Option<String>,
    pub namespace: String,
    pub event: String,
    pub args: Vec<Value>,
    pub rooms: Vec<String>,
    pub except: Vec<String>,
}

/// Writes msgpack into a buffer; writing to a `Vec` cannot fail, so errors are impossible.
struct Mp(Vec<u8>);

impl Mp {
    fn str(&mut self, s: &str) -> &mut Self {
        let _ = rmp::encode::write_str(&mut self.0, s);
        self
    }
    fn array(&mut self, len: u32) -> &mut Self {
        let _ = rmp::encode::write_array_len(&mut self.0, len);
        self
    }
    fn map(&mut self, len: u32) -> &mut Self {
        let _ = rmp::encode::write_map_len(&mut self.0, len);
        self
    }
    fn uint(&mut self, n: u64) -> &mut Self {
        let _ = rmp::encode::write_uint(&mut self.0, n);
        self
    }
    fn sint(&mut self, n: i64) -> &mut Self {
        let _ = rmp::encode::write_sint(&mut self.0, n);
        self
    }
    fn value(&mut self, v: &Value) -> &mut Self {
        let _ = rmpv::encode::write_value(&mut self.0, v);
        self
    }
    fn strs(&mut self, items: &[&str]) -> &mut Self {
        self.array(items.len() as u32);
        for item in items {
            self.str(item);
        }
        self
    }
}

/// Encodes `[uid, {type:2, data:[event, ...args], nsp}, {rooms, except:[], flags:{}}]`.
pub fn encode_broadcast(
    uid: &str,
    namespace: &str,
    event: &str,
    args: &[Value],
    rooms: &[&str],
) -> Vec<u8> {
    let mut mp = Mp(Vec::with_capacity(128));
    mp.array(3).str(uid);
    mp.map(3)
        .str("type")
        .uint(EVENT)
        .str("data")
        .array(1 + args.len() as u32)
        .str(event);
    for arg in args {
        mp.value(arg);
    }
    mp.str("nsp").str(namespace);
    write_opts(&mut mp, rooms);
    mp.0
}

fn write_opts(mp: &mut Mp, rooms: &[&str]) {
    mp.map(3)
        .str("rooms")
        .strs(rooms)
        .str("except")
        .array(0)
        .str("flags")
        .map(0);
}

/// A message broadcast cut around its offset, which the publish script fills in: the
/// msgpack of `[uid, {type, data:["message", {room, id, from, data, ts, offset: …}], nsp}, opts]`
/// and the JSON of the message kept in history, each as the bytes before and after the offset.
pub struct MessageParts {
    pub wire_head: Vec<u8>,
    pub wire_tail: Vec<u8>,
    pub json_head: String,
    pub json_tail: String,
}

#[derive(Serialize)]
struct MessageFields<'a> {
    room: &'a RoomName,
    id: &'a str,
    from: &'a str,
    data: &'a serde_json::value::RawValue,
    ts: i64,
}

/// Prepares a message for the publish script. The message's own offset is ignored.
pub fn message_parts(uid: &str, message: &Message) -> Result<MessageParts, CodecError> {
    let data: Value = serde_json::from_str(message.data.get())?;
    let mut wire = Mp(Vec::with_capacity(192 + message.data.get().len()));
    wire.array(3).str(uid);
    wire.map(3)
        .str("type")
        .uint(EVENT)
        .str("data")
        .array(2)
        .str("message");
    wire.map(6)
        .str("room")
        .str(message.room.as_str())
        .str("id")
        .str(&message.id)
        .str("from")
        .str(message.from.as_str())
        .str("data")
        .value(&data)
        .str("ts")
        .sint(message.ts)
        .str("offset");
    let wire_head = std::mem::take(&mut wire.0);
    wire.str("nsp").str(message.namespace.as_str());
    write_opts(&mut wire, &[message.room.as_str()]);
    let fields = MessageFields {
        room: &message.room,
        id: &message.id,
        from: message.from.as_str(),
        data: &message.data,
        ts: message.ts,
    };
    let mut json = serde_json::to_string(&fields)?;
    json.pop(); // the closing brace: `,"offset":N}` follows
    json.push_str(",\"offset\":");
    Ok(MessageParts {
        wire_head,
        wire_tail: wire.0,
        json_head: json,
        json_tail: "}".into(),
    })
}

/// The msgpack encoding of `offset`, as the publish script's `cmsgpack.pack` writes it.
pub fn encode_offset(offset: u64) -> Vec<u8> {
    let mut mp = Mp(Vec::new());
    mp.uint(offset);
    mp.0
}

fn get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        // An empty JS object encodes as a map; a Set may arrive as one too.
        _ => Vec::new(),
    }
}

/// Decodes a broadcast, reading the packet and options as maps whatever their key order.
pub fn decode_broadcast(bytes: &[u8]) -> Result<Broadcast, CodecError> {
    let value = read_msgpack(bytes)?;
    let Value::Array(parts) = value else {
        return Err(CodecError::Shape("broadcast is not an array"));
    };
    let mut parts = parts.into_iter();
    let uid = parts.next().and_then(|v| v.as_str().map(str::to_owned));
    let Some(Value::Map(mut packet)) = parts.next() else {
        return Err(CodecError::Shape("packet is not a map"));
    };
    let opts = match parts.next() {
        Some(Value::Map(opts)) => opts,
        _ => Vec::new(),
    };
    let namespace = get(&packet, "nsp")
        .and_then(Value::as_str)
        .unwrap_or("/")
        .to_owned();
    // Taken out of the packet rather than cloned: it holds the whole message.
    let data = packet
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some("data"))
        .map(|(_, v)| std::mem::replace(v, Value::Nil));
    let Some(Value::Array(data)) = data else {
        return Err(CodecError::Shape("packet data is not an array"));
    };
    let mut data = data.into_iter();
    let event = match data.next() {
        Some(Value::String(s)) => s
            .into_str()
            .ok_or(CodecError::Shape("event name is not utf-8"))?,
        _ => return Err(CodecError::Shape("packet has no event name")),
    };
    Ok(Broadcast {
        uid,
        namespace,
        event,
        args: data.collect(),
        rooms: strings(get(&opts, "rooms")),
        except: strings(get(&opts, "except")),
    })
}

/// Decodes a request off the request channel: JSON, or msgpack for broadcasts with acks
/// (read as JSON values, so that both encodings are answered by the same code).
pub fn decode_request(bytes: &[u8]) -> Result<serde_json::Value, CodecError> {
    if bytes.first() == Some(&b'{') {
        return Ok(serde_json::from_slice(bytes)?);
    }
    Ok(serde_json::to_value(read_msgpack(bytes)?)?)
}

/// A message as kept in a room's history stream.
#[derive(Deserialize)]
pub struct StoredMessage {
    pub room: RoomName,
    pub id: String,
    pub offset: u64,
    pub from: String,
    pub data: Box<serde_json::value::RawValue>,
    pub ts: i64,
}

impl StoredMessage {
    pub fn into_message(self, namespace: &Namespace) -> Message {
        Message {
            namespace: namespace.clone(),
            room: self.room,
            id: self.id,
            offset: self.offset,
            from: herald_core::UserId::new(self.from),
            data: self.data,
            ts: self.ts,
            epoch: "".into(),
            instance: None,
        }
    }
}

/// Reads a broadcast's first argument as a herald message, if it is one.
pub fn message_from_arg(namespace: &Namespace, arg: &Value) -> Option<Message> {
    let Value::Map(fields) = arg else {
        return None;
    };
    let text = |key| get(fields, key).and_then(Value::as_str);
    let stored = StoredMessage {
        room: RoomName::new(text("room")?).ok()?,
        id: text("id")?.to_owned(),
        offset: get(fields, "offset")?.as_u64()?,
        from: text("from")?.to_owned(),
        // Only the payload goes through JSON text; the other fields are read as they are.
        data: to_json(get(fields, "data")?).ok()?,
        ts: get(fields, "ts")?.as_i64()?,
    };
    Some(stored.into_message(namespace))
}

/// A msgpack value as JSON text (binary becomes an array of numbers).
pub fn to_json(value: &Value) -> Result<Box<serde_json::value::RawValue>, CodecError> {
    let mut text = Vec::new();
    serde_json::to_writer(&mut text, value)?;
    let text = String::from_utf8(text).map_err(|_| CodecError::Shape("json is not utf-8"))?;
    Ok(serde_json::value::RawValue::from_string(text)?)
}

/// JSON text as a msgpack value.
pub fn from_json(raw: &serde_json::value::RawValue) -> Result<Value, CodecError> {
    Ok(serde_json::from_str(raw.get())?)
}

/// Request types on the request channel.
pub mod request {
    pub const SOCKETS: u64 = 0;
    pub const ALL_ROOMS: u64 = 1;
    pub const REMOTE_JOIN: u64 = 2;
    pub const REMOTE_LEAVE: u64 = 3;
    pub const REMOTE_DISCONNECT: u64 = 4;
    pub const REMOTE_FETCH: u64 = 5;
    pub const SERVER_SIDE_EMIT: u64 = 6;
    pub const BROADCAST: u64 = 7;
    pub const BROADCAST_CLIENT_COUNT: u64 = 8;
    pub const BROADCAST_ACK: u64 = 9;
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::UserId;

    fn message() -> Message {
        Message {
            namespace: Namespace::root(),
            room: RoomName::new("lobby").expect("room"),
            id: "m1".into(),
            offset: 0,
            from: UserId::new("alice"),
            data: serde_json::value::RawValue::from_string("{\"text\":\"hi\",\"n\":[1,2]}".into())
                .expect("json"),
            ts: 1_700_000_000_123,
            epoch: "e".into(),
            instance: None,
        }
    }

    #[test]
    fn channels_follow_the_adapter_naming() {
        let ch = Channels::new("socket.io", &Namespace::root());
        assert_eq!(ch.broadcast, "socket.io#/#");
        assert_eq!(
            ch.room(&RoomName::new("r1").expect("room")),
            "socket.io#/#r1#"
        );
        assert_eq!(ch.request, "socket.io-request#/#");
        assert_eq!(ch.response, "socket.io-response#/#");
        assert_eq!(ch.response_for("abc"), "socket.io-response#/#abc#");
        assert_eq!(ch.room_of("socket.io#/#r1#"), Some(Some("r1")));
        assert_eq!(ch.room_of("socket.io#/#"), Some(None));
        assert_eq!(ch.room_of("socket.io#/events#r1#"), None);
    }

    #[test]
    fn a_message_spliced_with_its_offset_decodes_like_any_broadcast() {
        let parts = message_parts("node-1", &message()).expect("parts");
        let mut wire = parts.wire_head.clone();
        wire.extend(encode_offset(300));
        wire.extend(&parts.wire_tail);
        let b = decode_broadcast(&wire).expect("decodes");
        assert_eq!(b.uid.as_deref(), Some("node-1"));
        assert_eq!(b.namespace, "/");
        assert_eq!(b.event, "message");
        assert_eq!(b.rooms, vec!["lobby".to_owned()]);
        let m = message_from_arg(&Namespace::root(), &b.args[0]).expect("a herald message");
        assert_eq!(
            (m.offset, m.id.as_str(), m.from.as_str(), m.ts),
            (300, "m1", "alice", 1_700_000_000_123)
        );
        assert_eq!(m.data.get(), "{\"text\":\"hi\",\"n\":[1,2]}");

        let json = format!("{}{}{}", parts.json_head, 300, parts.json_tail);
        let stored: StoredMessage = serde_json::from_str(&json).expect("json history entry");
        assert_eq!(stored.offset, 300);
    }

    #[test]
    fn broadcasts_decode_as_maps_whatever_the_key_order() {
        // The emitter writes opts before packet keys in its own order, and nsp first.
        let mut mp = Mp(Vec::new());
        mp.array(3).str(EMITTER_UID);
        mp.map(3)
            .str("nsp")
            .str("/")
            .str("data")
            .array(2)
            .str("alert")
            .str("x")
            .str("type")
            .uint(EVENT);
        mp.map(2).str("flags").map(0).str("rooms").strs(&["a", "b"]);
        let b = decode_broadcast(&mp.0).expect("decodes");
        assert_eq!(b.uid.as_deref(), Some("emitter"));
        assert_eq!(b.event, "alert");
        assert_eq!(b.args, vec![Value::from("x")]);
        assert_eq!(b.rooms, vec!["a".to_owned(), "b".to_owned()]);
        assert!(b.except.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_broadcast(b"").is_err());
        assert!(decode_broadcast(&[0x93, 0xc0, 0x01, 0x02]).is_err());
        assert!(decode_broadcast(b"{\"json\":true}").is_err());
    }

    #[test]
    fn requests_decode_from_json_and_msgpack_and_garbage_is_an_error() {
        let json = decode_request(br#"{"type":0,"requestId":"r1"}"#).expect("json");
        assert_eq!(json["requestId"], "r1");
        let mut mp = Mp(Vec::new());
        mp.map(2).str("type").uint(7).str("uid").str("n1");
        let msgpack = decode_request(&mp.0).expect("msgpack");
        assert_eq!(
            (msgpack["type"].as_u64(), msgpack["uid"].as_str()),
            (Some(7), Some("n1"))
        );
        for garbage in [
            &b""[..],
            b"{\"type\":",
            b"{}}",
            b"\xdd\xff\xff\xff\xff",
            b"\x93\x01",
        ] {
            assert!(decode_request(garbage).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        // Regression: 100,000 nested arrays published on a broadcast channel overflowed the
        // stack of a debug build's tokio worker (2 MiB), and the instance aborted. Reading
        // them alone needed more than 1 MiB of a debug build's stack.
        let deep = [vec![0x91; 100_000], vec![0xc0]].concat();
        // A broadcast whose argument nests 100 levels still reads.
        let mut nested = Mp(Vec::new());
        nested
            .array(3)
            .str("u")
            .map(2)
            .str("data")
            .array(2)
            .str("e");
        nested.0.extend([0x91; 100]);
        nested.0.push(0xc0);
        nested.str("nsp").str("/").map(0);
        let read = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(move || {
                assert!(decode_broadcast(&deep).is_err());
                assert!(decode_request(&deep).is_err());
                let b = decode_broadcast(&nested.0).expect("100 levels read");
                assert!(to_json(&b.args[0]).is_ok());
                b.event
            })
            .expect("spawn")
            .join()
            .expect("no overflow");
        assert_eq!(read, "e");
    }

    #[test]
    fn encode_broadcast_round_trips() {
        let bytes = encode_broadcast("u1", "/events", "presence", &[Value::from("p")], &["room"]);
        let b = decode_broadcast(&bytes).expect("decodes");
        assert_eq!(
            (b.namespace.as_str(), b.event.as_str()),
            ("/events", "presence")
        );
        assert_eq!(b.rooms, vec!["room".to_owned()]);
    }
}
