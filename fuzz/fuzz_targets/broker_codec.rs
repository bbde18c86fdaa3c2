//! A broadcast off one of herald's Redis channels (`<key>#<nsp>#` and `<key>#<nsp>#<room>#`),
//! read as the broker reads it. Beyond not panicking, checks that herald reads back what it
//! writes: re-encoding a decoded broadcast is stable, and a herald message re-encoded the way
//! the publish script sends it decodes to the same message.
#![no_main]

use herald_core::Namespace;
use herald_fuzz::codec::{self, Broadcast};
use herald_fuzz::{on_worker_stack, same_json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|bytes: &[u8]| on_worker_stack(|| check(bytes)));

fn encode(b: &Broadcast) -> Vec<u8> {
    let rooms: Vec<&str> = b.rooms.iter().map(String::as_str).collect();
    codec::encode_broadcast(
        b.uid.as_deref().unwrap_or(""),
        &b.namespace,
        &b.event,
        &b.args,
        &rooms,
    )
}

fn check(bytes: &[u8]) {
    let Ok(broadcast) = codec::decode_broadcast(bytes) else {
        return;
    };

    // What reaches clients: every argument as JSON, when it has a JSON form.
    for arg in &broadcast.args {
        if let Ok(json) = codec::to_json(arg) {
            serde_json::from_str::<serde::de::IgnoredAny>(json.get()).expect("valid JSON");
        }
    }

    // A herald message survives herald's own encoding, offset spliced in.
    let namespace = Namespace::new(&broadcast.namespace);
    if let Some(message) = broadcast
        .args
        .first()
        .and_then(|arg| codec::message_from_arg(&namespace, arg))
    {
        let parts = codec::message_parts("fuzz", &message).expect("a read message re-encodes");
        let mut wire = parts.wire_head;
        wire.extend(codec::encode_offset(message.offset));
        wire.extend(parts.wire_tail);
        let again = codec::decode_broadcast(&wire).expect("herald reads its own message");
        let read = codec::message_from_arg(&namespace, &again.args[0]).expect("still a message");
        assert_eq!(
            (&read.room, &read.id, &read.from, read.offset, read.ts),
            (
                &message.room,
                &message.id,
                &message.from,
                message.offset,
                message.ts
            )
        );
        let (a, b): (Value, Value) = (
            serde_json::from_str(read.data.get()).expect("json"),
            serde_json::from_str(message.data.get()).expect("json"),
        );
        assert!(same_json(&a, &b), "message data changed: {a} != {b}");

        let history = format!("{}{}{}", parts.json_head, message.offset, parts.json_tail);
        let stored: codec::StoredMessage =
            serde_json::from_str(&history).expect("the history entry reads back");
        assert_eq!(stored.offset, message.offset);
    }

    // Re-encoding is stable: what herald would forward decodes to the same bytes again.
    let first = encode(&broadcast);
    let decoded = codec::decode_broadcast(&first).expect("herald reads its own broadcast");
    assert_eq!(decoded.event, broadcast.event);
    assert_eq!(decoded.namespace, broadcast.namespace);
    assert_eq!(decoded.rooms, broadcast.rooms);
    assert_eq!(encode(&decoded), first, "re-encoding is not stable");
}
