//! A request off the request channel (`<key>-request#<nsp>#`) or a response channel: JSON, or
//! msgpack for broadcasts with acks. Beyond not panicking, checks that JSON input is read as
//! JSON exactly when it parses, and that a decoded request survives a trip through JSON text,
//! which is how herald's answers carry parts of it back.
#![no_main]

use herald_fuzz::codec;
use herald_fuzz::{JSON_MAX_DEPTH, depth, on_worker_stack, same_json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|bytes: &[u8]| on_worker_stack(|| check(bytes)));

fn check(bytes: &[u8]) {
    let decoded = codec::decode_request(bytes);
    if bytes.first() == Some(&b'{') {
        let json = serde_json::from_slice::<Value>(bytes);
        assert_eq!(decoded.is_ok(), json.is_ok(), "JSON read differently");
    }
    let Ok(request) = decoded else {
        return;
    };

    // The fields an answer reads.
    let _ = request.get("uid").and_then(Value::as_str);
    let _ = request.get("type").and_then(Value::as_u64);
    let _ = request.get("requestId");
    for key in ["rooms", "except"] {
        let _ = request.get("opts").and_then(|o| o.get(key));
    }

    let text = serde_json::to_string(&request).expect("a decoded request encodes as JSON");
    if depth(&request) <= JSON_MAX_DEPTH {
        let back: Value = serde_json::from_str(&text).expect("herald's JSON reads back");
        assert!(
            same_json(&back, &request),
            "JSON trip changed the request: {request:?} became {back:?}"
        );
    }
}
