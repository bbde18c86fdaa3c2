//! A `/ws` text frame from a client, through the same two steps the transport takes: the
//! frame split (`WsFrame::parse`) and the command parse (`Command::parse`). Beyond not panicking,
//! checks that an accepted command holds what the client sent, within the limits.
#![no_main]

use herald_core::RoomName;
use herald_fuzz::protocol::{Command, ErrorCode, MAX_HISTORY_LIMIT, WsFrame};
use herald_fuzz::{on_worker_stack, same_json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// A small payload bound, so that the fuzzer reaches both sides of it.
const MAX_PAYLOAD: usize = 64;

fuzz_target!(|bytes: &[u8]| {
    // WebSocket text frames are UTF-8; the transport refuses anything else before parsing.
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    on_worker_stack(|| check(text));
});

fn check(text: &str) {
    let frame = match WsFrame::parse(text) {
        Ok(frame) => frame,
        Err((id, error)) => {
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert_eq!(error.to_ack()["ok"], false);
            // The id comes from the frame when it had one.
            if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(text) {
                assert!(same_json(&id, fields.get("id").unwrap_or(&Value::Null)));
            }
            return;
        }
    };
    let sent = frame.fields.clone();
    let room_sent = |command_room: &RoomName| {
        let name = match &sent {
            Value::String(name) => name.as_str(),
            other => other["room"].as_str().expect("the room came as a string"),
        };
        assert_eq!(command_room.as_str(), name);
        assert!(RoomName::new(name).is_ok());
    };
    // An epoch named by the client is the string it sent.
    let epoch_sent = |epoch: &Option<String>| {
        if let Some(epoch) = epoch {
            assert_eq!(sent["epoch"].as_str(), Some(epoch.as_str()));
        }
    };
    match Command::parse(&frame.kind, frame.fields, MAX_PAYLOAD) {
        Ok(Command::Join { room, since, epoch }) => {
            assert_eq!(frame.kind, "join");
            room_sent(&room);
            if let Some(since) = since {
                assert_eq!(sent["since"].as_u64(), Some(since));
            }
            epoch_sent(&epoch);
        }
        Ok(Command::Leave { room }) => {
            assert_eq!(frame.kind, "leave");
            room_sent(&room);
        }
        Ok(Command::Presence { room }) => {
            assert_eq!(frame.kind, "presence");
            room_sent(&room);
        }
        Ok(Command::Message { room, data }) => {
            assert_eq!(frame.kind, "message");
            room_sent(&room);
            assert!(data.get().len() <= MAX_PAYLOAD, "data over the bound");
            let relayed: Value = serde_json::from_str(data.get()).expect("data is JSON");
            let original = sent.get("data").unwrap_or(&Value::Null);
            assert!(same_json(&relayed, original), "data changed on the way");
        }
        Ok(Command::History { room, query, epoch }) => {
            assert_eq!(frame.kind, "history");
            room_sent(&room);
            assert!(query.limit <= MAX_HISTORY_LIMIT);
            epoch_sent(&epoch);
        }
        Err(error) => {
            let ack = error.to_ack();
            assert_eq!(ack["ok"], false);
            assert_eq!(ack["error"], error.code.as_str());
        }
    }
}
