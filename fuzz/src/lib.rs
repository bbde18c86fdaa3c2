//! herald's parsers of untrusted input, built for fuzzing, and the checks the fuzz targets
//! share.
//!
//! The parser modules are compiled from the very source files herald builds them from
//! (`#[path]`), so the targets exercise herald's code without instrumenting the whole server
//! and its dependencies. Those files depend only on herald-core, serde, serde_json, rmp and
//! rmpv; a change that gives them another dependency must add it here too.

#[path = "../../crates/herald-redis/src/codec.rs"]
#[allow(dead_code)]
pub mod codec;
#[path = "../../crates/herald-server/src/protocol.rs"]
#[allow(dead_code)]
pub mod protocol;

use serde_json::Value;

/// The stack the checks run on: an eighth of a tokio worker's 2 MiB, where herald runs these
/// parsers. They must leave most of it to the rest of the call chain, and to a debug build's
/// larger frames.
const PARSER_STACK: usize = 256 * 1024;

/// Runs `check` on a thread with [`PARSER_STACK`], so that input nested deeply enough to
/// threaten herald's stack overflows here, and re-raises its panic.
pub fn on_worker_stack<F: FnOnce() + Send>(check: F) {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .stack_size(PARSER_STACK)
            .spawn_scoped(scope, check)
            .expect("spawn a checking thread");
        if let Err(panic) = handle.join() {
            std::panic::resume_unwind(panic);
        }
    });
}

/// Whether two JSON values are the same, allowing floats the last-digit error serde_json's
/// default (fast) float parsing may make, which is larger among subnormal numbers.
pub fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() || y.is_f64() {
                match (x.as_f64(), y.as_f64()) {
                    (Some(x), Some(y)) => {
                        let diff = (x - y).abs();
                        x == y
                            || diff <= f64::EPSILON * 4.0 * x.abs().max(y.abs())
                            || diff < f64::MIN_POSITIVE
                    }
                    _ => false,
                }
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// How deeply a JSON value nests (a scalar is 1).
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(fields) => 1 + fields.values().map(depth).max().unwrap_or(0),
        _ => 1,
    }
}

/// serde_json refuses input nested deeper than this.
pub const JSON_MAX_DEPTH: usize = 127;
