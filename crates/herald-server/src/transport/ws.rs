//! The plain JSON WebSocket front door at `/ws`: one JSON object per frame, with a `type`.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{
    CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code,
};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use herald_core::{ConnId, Namespace, Payload, PresenceChange, RoomName, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::http::ApiError;
use crate::hub::{Conn, Outgoing, Queued, Sink};
use crate::limits::Refusal;
use crate::metrics as m;
use crate::protocol::{ClientError, ErrorCode, WsFrame};
use crate::session::Session;
use crate::{AppState, ConnectionGuard};

/// How long a closing connection's writer may take to flush and send its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Room for the frame's envelope (`type`, `room`, `id`) beyond the payload limit.
const FRAME_OVERHEAD: usize = 16 * 1024;

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
    namespace: Option<String>,
}

/// Admits the upgrade request and hands the socket over. Refusals are answered before the
/// upgrade, with a status and a JSON body naming the code: 401 without a valid token, 429
/// `rate_limited` or `too_many_connections`, 503 `server_full`.
pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(query): Query<WsQuery>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if state.draining.is_cancelled() {
        return ApiError::Draining.into_response();
    }
    let ip = state
        .limits
        .client_ip(peer.map(|Extension(ConnectInfo(addr))| addr), &headers);
    if let Err(refusal) = state.limits.check_ip(ip) {
        return refuse(&state, refusal, ip);
    }
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let identity = match state.verifier.verify(query.token.or(bearer).as_deref()) {
        Ok(identity) => identity,
        Err(e) => {
            metrics::counter!(m::AUTH_FAILURES, "transport" => "ws").increment(1);
            tracing::info!(error = %e, "websocket handshake refused");
            return ApiError::Unauthorized.into_response();
        }
    };
    let namespace = query
        .namespace
        .map_or_else(Namespace::root, |n| Namespace::new(&n));
    if !state.config.namespaces.contains(&namespace) {
        return ApiError::BadRequest(format!("unknown namespace {namespace}")).into_response();
    }
    let admission = match state.limits.admit(&identity.user) {
        Ok(admission) => admission,
        Err(refusal) => return refuse(&state, refusal, ip),
    };
    // A small read buffer: the default 128 KiB is allocated per connection, idle or not.
    ws.max_message_size(state.config.max_payload + FRAME_OVERHEAD)
        .read_buffer_size(1024)
        .on_upgrade(move |socket| async move {
            serve(state, socket, identity, namespace).await;
            drop(admission);
        })
}

fn refuse(state: &AppState, refusal: Refusal, ip: Option<IpAddr>) -> Response {
    refusal.count("ws");
    tracing::debug!(ip = %crate::limits::shown(ip), code = refusal.code(), "websocket connection refused");
    ApiError::Refused(refusal, refusal.message(&state.limits)).into_response()
}

/// Why the server closes a connection.
struct Closing(u16, &'static str);

async fn serve(state: Arc<AppState>, socket: WebSocket, identity: Identity, namespace: Namespace) {
    let _guard = ConnectionGuard::new(&state, "ws", &namespace);
    // Closed with `1001 going away` when the shutdown drain reaches this session.
    let drain_entry = state.drain.register(crate::drain::Kind::WsSession);
    let drain_turn = drain_entry.token().clone();
    let (tx, rx) = mpsc::channel(state.config.outbound_queue);
    let kick = CancellationToken::new();
    let conn = Arc::new(Conn {
        id: ConnId::new(format!("ws-{}", crate::random_id(16))),
        user: identity.user.clone(),
        sink: Sink::Queue {
            tx: tx.clone(),
            kick: kick.clone(),
        },
    });
    let (sink, mut stream) = socket.split();
    let stop = CancellationToken::new();
    let closing = Arc::new(OnceLock::new());
    let writer = tokio::spawn(write_frames(sink, rx, stop.clone(), closing.clone()));

    let opened = Session::open(
        state.hub.clone(),
        conn.clone(),
        namespace,
        identity,
        state.policy.clone(),
    )
    .await;
    let mut session = match opened {
        Ok(session) => session,
        Err(e) => {
            tracing::warn!(conn = %conn.id, error = %e, "session could not open");
            let _ = closing.set(Closing(close_code::AGAIN, "server unavailable"));
            stop.cancel();
            finish(writer).await;
            return;
        }
    };
    let hello =
        serde_json::json!({"type": "event", "event": "session", "data": session.describe()});
    let mut open = tx.send(Queued::Reply(hello)).await.is_ok();
    let mut control = session.take_control();
    while open {
        let frame = tokio::select! {
            frame = stream.next() => frame,
            Some(request) = control.recv() => {
                if session.apply(request).await {
                    continue;
                }
                let _ = closing.set(Closing(close_code::NORMAL, "disconnected by the server"));
                break;
            }
            () = kick.cancelled() => {
                metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS, "transport" => "ws").increment(1);
                let _ = closing.set(Closing(close_code::POLICY, "slow consumer: outbound queue full"));
                break;
            }
            () = drain_turn.cancelled() => {
                let _ = closing.set(Closing(close_code::AWAY, "server shutting down"));
                break;
            }
        };
        let reply = match frame {
            Some(Ok(WsMessage::Text(text))) => Some(handle_text(&mut session, text.as_str()).await),
            Some(Ok(WsMessage::Binary(_))) => Some(error_reply(
                Value::Null,
                &ClientError::new(
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text",
                ),
            )),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => None,
            Some(Ok(WsMessage::Close(_))) | None => break,
            Some(Err(e)) => {
                tracing::debug!(conn = %conn.id, error = %e, "websocket read failed");
                let reason = if e.to_string().contains("too long")
                    || e.to_string().contains("Space limit")
                {
                    Closing(close_code::SIZE, "frame too large")
                } else {
                    Closing(close_code::PROTOCOL, "unreadable frame")
                };
                let _ = closing.set(reason);
                break;
            }
        };
        if let Some(reply) = reply {
            open = tx.send(Queued::Reply(reply)).await.is_ok();
        }
    }
    session.close().await;
    stop.cancel();
    finish(writer).await;
}

/// Waits for the writer to send its close frame; a peer that does not read (a slow consumer)
/// would keep it waiting forever, so after `CLOSE_GRACE` the writer is dropped, and the TCP
/// connection with it.
async fn finish(mut writer: tokio::task::JoinHandle<()>) {
    if tokio::time::timeout(CLOSE_GRACE, &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

async fn handle_text(session: &mut Session, text: &str) -> Value {
    let WsFrame { id, kind, fields } = match WsFrame::parse(text) {
        Ok(frame) => frame,
        Err((id, error)) => return error_reply(id, &error),
    };
    let mut reply = session.handle(&kind, fields).await;
    if let Value::Object(fields) = &mut reply {
        // `id` is the request's; a published message's id moves to `message_id`.
        if let Some(message_id) = fields.remove("id") {
            fields.insert("message_id".into(), message_id);
        }
        fields.insert("type".into(), Value::from("ack"));
        fields.insert("id".into(), id);
    }
    reply
}

fn error_reply(id: Value, error: &ClientError) -> Value {
    metrics::counter!(m::EVENTS_REJECTED, "error" => error.code.as_str()).increment(1);
    let mut reply = error.to_ack();
    if let Value::Object(fields) = &mut reply {
        fields.insert("type".into(), Value::from("ack"));
        fields.insert("id".into(), id);
    }
    reply
}

async fn write_frames(
    mut sink: futures::stream::SplitSink<WebSocket, WsMessage>,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
    closing: Arc<OnceLock<Closing>>,
) {
    loop {
        let item = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            item = rx.recv() => item,
        };
        let text = match item {
            Some(Queued::Delivery(out)) => frame(&out),
            Some(Queued::Reply(reply)) => Utf8Bytes::from(reply.to_string()),
            None => break,
        };
        if sink.send(WsMessage::Text(text)).await.is_err() {
            return;
        }
    }
    if let Some(Closing(code, reason)) = closing.get() {
        let close = CloseFrame {
            code: *code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = sink.send(WsMessage::Close(Some(close))).await;
    }
    let _ = sink.close().await;
}

/// The frame for a delivery, encoded once and shared by every WebSocket member of the room.
fn frame(out: &Outgoing) -> Utf8Bytes {
    out.ws_frame.get_or_init(|| encode(&out.payload)).clone()
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Frame<'a> {
    Message {
        room: &'a RoomName,
        id: &'a str,
        offset: u64,
        from: &'a UserId,
        data: &'a RawValue,
        ts: i64,
    },
    Presence(&'a PresenceChange),
    Event {
        event: &'a str,
        data: &'a RawValue,
    },
}

fn encode(payload: &Payload) -> Utf8Bytes {
    let frame = match payload {
        Payload::Message(m) => Frame::Message {
            room: &m.room,
            id: &m.id,
            offset: m.offset,
            from: &m.from,
            data: &m.data,
            ts: m.ts,
        },
        Payload::Presence(change) => Frame::Presence(change),
        Payload::Event { name, data } => Frame::Event { event: name, data },
    };
    // Serializing plain fields and pre-validated raw JSON cannot fail.
    Utf8Bytes::from(serde_json::to_string(&frame).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Message, PresenceStatus};

    #[test]
    fn frames_carry_their_type_and_fields() {
        let room = RoomName::new("lobby").expect("room");
        let message = Message {
            namespace: Namespace::root(),
            room: room.clone(),
            id: "m1".into(),
            offset: 7,
            from: UserId::new("alice"),
            data: RawValue::from_string("{\"text\":\"hi\"}".into()).expect("json"),
            ts: 42,
            epoch: "e".into(),
            instance: None,
        };
        let text = encode(&Payload::Message(Arc::new(message)));
        let value: Value = serde_json::from_str(text.as_str()).expect("json frame");
        assert_eq!(
            value,
            serde_json::json!({"type":"message","room":"lobby","id":"m1","offset":7,"from":"alice","data":{"text":"hi"},"ts":42})
        );
        let change = PresenceChange {
            room,
            user: UserId::new("bob"),
            status: PresenceStatus::Leave,
        };
        let text = encode(&Payload::Presence(change));
        let value: Value = serde_json::from_str(text.as_str()).expect("json frame");
        assert_eq!(
            value,
            serde_json::json!({"type":"presence","room":"lobby","user":"bob","status":"leave"})
        );
    }
}
