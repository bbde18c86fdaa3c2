//! Answers to other servers' requests on the adapter's request channel, so that Node servers
//! and emitters get what they ask for from herald instances, without waiting out a timeout.

use std::collections::HashMap;
use std::sync::Arc;

use herald_core::{
    Delivery, LocalNode, Namespace, Payload, RemoteAction, RoomKey, RoomName, Selector,
};
use redis::aio::ConnectionManager;
use serde_json::{Value, json};

use crate::codec::{self, Channels, request as kind};
use crate::metric;

/// What answering a request needs.
pub struct Context {
    pub uid: String,
    pub conn: Option<ConnectionManager>,
    pub channels: HashMap<Namespace, Channels>,
    pub local: Arc<dyn LocalNode>,
}

/// Reads a request (JSON, or msgpack for broadcasts with acks) and answers it.
pub async fn handle(ctx: &Context, namespace: &Namespace, bytes: &[u8]) {
    let request = match codec::decode_request(bytes) {
        Ok(request) => request,
        Err(e) => {
            metrics::counter!(metric::BROKER_DECODE_ERRORS, "kind" => "request").increment(1);
            tracing::debug!(%namespace, error = %e, "ignoring an unreadable request");
            return;
        }
    };
    if request.get("uid").and_then(Value::as_str) == Some(ctx.uid.as_str()) {
        return;
    }
    let Some(kind) = request.get("type").and_then(Value::as_u64) else {
        return;
    };
    let request_id = request.get("requestId").cloned().filter(|v| !v.is_null());
    let response = match kind {
        kind::SOCKETS => {
            let sockets = ctx
                .local
                .sockets(
                    namespace,
                    &selector(request.get("opts").unwrap_or(&request)),
                )
                .await;
            let ids: Vec<&str> = sockets.iter().map(|s| s.id.as_str()).collect();
            request_id.map(|id| json!({ "requestId": id, "sockets": ids }))
        }
        kind::ALL_ROOMS => {
            let sockets = ctx.local.sockets(namespace, &Selector::default()).await;
            let mut rooms: Vec<&str> = sockets
                .iter()
                .flat_map(|s| s.rooms.iter().map(RoomName::as_str))
                .collect();
            rooms.sort_unstable();
            rooms.dedup();
            request_id.map(|id| json!({ "requestId": id, "rooms": rooms }))
        }
        kind::REMOTE_JOIN | kind::REMOTE_LEAVE => {
            let rooms = room_list(request.get("rooms"));
            let action = if kind == kind::REMOTE_JOIN {
                RemoteAction::Join(rooms)
            } else {
                RemoteAction::Leave(rooms)
            };
            ctx.local
                .apply(
                    namespace,
                    &selector(request.get("opts").unwrap_or(&Value::Null)),
                    action,
                )
                .await;
            request_id.map(|id| json!({ "requestId": id }))
        }
        kind::REMOTE_DISCONNECT => {
            let opts = selector(request.get("opts").unwrap_or(&Value::Null));
            ctx.local
                .apply(namespace, &opts, RemoteAction::Disconnect)
                .await;
            request_id.map(|id| json!({ "requestId": id }))
        }
        kind::REMOTE_FETCH => {
            let sockets = ctx
                .local
                .sockets(
                    namespace,
                    &selector(request.get("opts").unwrap_or(&Value::Null)),
                )
                .await;
            let sockets: Vec<Value> = sockets
                .iter()
                .map(|s| {
                    let mut rooms: Vec<&str> = vec![s.id.as_str()];
                    rooms.extend(s.rooms.iter().map(RoomName::as_str));
                    json!({
                        "id": s.id.as_str(),
                        "handshake": { "auth": {}, "query": {}, "headers": {}, "address": "", "xdomain": false, "secure": false, "issued": 0, "url": "", "time": "" },
                        "rooms": rooms,
                        "data": { "user": s.user.as_str() },
                    })
                })
                .collect();
            request_id.map(|id| json!({ "requestId": id, "sockets": sockets }))
        }
        // herald has no server-side listeners; a request that wants an ack gets an empty one.
        kind::SERVER_SIDE_EMIT => request_id
            .map(|id| json!({ "type": kind::SERVER_SIDE_EMIT, "requestId": id, "data": null })),
        kind::BROADCAST => {
            broadcast(ctx, namespace, &request).await;
            // Client acks are not collected: herald reports no clients waiting for one.
            request_id.map(|id| json!({ "type": kind::BROADCAST_CLIENT_COUNT, "requestId": id, "clientCount": 0 }))
        }
        _ => None,
    };
    if let (Some(response), Some(channels), Some(mut conn)) =
        (response, ctx.channels.get(namespace), ctx.conn.clone())
    {
        // Requesters listen on the shared response channel and match their request ids.
        let channel = channels.response.clone();
        let sent = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(response.to_string())
            .exec_async(&mut conn)
            .await;
        if let Err(e) = sent {
            tracing::debug!(error = %e, "could not answer a request");
        }
    }
}

fn room_list(value: Option<&Value>) -> Vec<RoomName> {
    match value {
        Some(Value::Array(rooms)) => rooms
            .iter()
            .filter_map(Value::as_str)
            .filter_map(|r| RoomName::new(r).ok())
            .collect(),
        Some(Value::String(room)) => RoomName::new(room).ok().into_iter().collect(),
        _ => Vec::new(),
    }
}

fn selector(opts: &Value) -> Selector {
    Selector {
        rooms: room_list(opts.get("rooms")),
        except: room_list(opts.get("except")),
    }
}

/// Delivers the packet of a broadcast-with-ack request to the local members it targets.
async fn broadcast(ctx: &Context, namespace: &Namespace, request: &Value) {
    let packet = request.get("packet").and_then(|p| p.get("data"));
    let Some(Value::Array(data)) = packet else {
        return;
    };
    let Some(event) = data.first().and_then(Value::as_str) else {
        return;
    };
    let arg = data.get(1).unwrap_or(&Value::Null);
    let Ok(data) = serde_json::value::to_raw_value(arg) else {
        return;
    };
    let data: Arc<serde_json::value::RawValue> = data.into();
    let opts = selector(request.get("opts").unwrap_or(&Value::Null));
    let rooms = if opts.rooms.is_empty() {
        vec![RoomName::everyone()]
    } else {
        opts.rooms
    };
    for room in rooms {
        let payload = Payload::Event {
            name: event.into(),
            data: data.clone(),
        };
        let delivery = Delivery {
            key: RoomKey::new(namespace.clone(), room),
            payload,
            except: opts.except.clone(),
        };
        ctx.local.deliver(delivery).await;
    }
}
