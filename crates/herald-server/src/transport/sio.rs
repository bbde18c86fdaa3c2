//! The Socket.IO front door (socketioxide): handshake auth, the per-socket event queue, and
//! Socket.IO framing of hub deliveries.
//!
//! socketioxide sends CONNECT before an async connect handler runs, and spawns a task per
//! incoming event, so two events sent back to back could be handled out of order, or lost
//! before the handlers exist. herald registers its one event handler in the auth middleware,
//! which runs before CONNECT, and that handler's extractor queues each event synchronously,
//! in arrival order, for the socket's session task.
//!
//! A socket whose outbound buffer (`HERALD_OUTBOUND_QUEUE` packets) stays full is a slow
//! consumer: it leaves its rooms, then sees an `error` event `{code: "slow_consumer",
//! message}` followed by a namespace DISCONNECT. socket.io-client reports that as
//! `io server disconnect` and deliberately does not reconnect by itself: a client that cannot
//! keep up would otherwise fall behind again at once, and load the fleet with replays. The
//! application decides when to call `socket.connect()` and rejoin with `since`, which
//! recovers what it missed by offset.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, OriginalUri};
use herald_core::{ConnId, Namespace, Payload, RoomKey, RoomName};
use serde::Deserialize;
use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};
use socketioxide::handler::{FromMessage, FromMessageParts, Value as SioValue};
use socketioxide::socket::{DisconnectReason, Socket};
use socketioxide::{SendError, SocketError, SocketIo};
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::hub::{Conn, Sink};
use crate::limits::{Admission, Refusal, shown};
use crate::mailbox;
use crate::metrics as m;
use crate::protocol::{ClientError, ErrorCode};
use crate::session::Session;
use crate::{AppState, ConnectionGuard};

/// Events queued per socket before new ones are refused with `overloaded`.
const INBOX_SIZE: usize = 256;
/// How long a slow consumer's buffer may take to make room for its `error` notice and its
/// DISCONNECT. The TCP connection of a socket that never reads is aborted by the kernel
/// (`HERALD_SEND_TIMEOUT`).
const SLOW_NOTICE_WAIT: Duration = Duration::from_secs(5);

struct Inbound {
    event: String,
    payload: Result<Value, String>,
    ack: AckSender,
}

/// What the auth middleware leaves on the socket for its handlers, behind an `Arc`:
/// socketioxide's extensions hand out clones, and every incoming event reads it.
struct Inbox {
    tx: mailbox::Sender<Inbound>,
    rx: Mutex<Option<mailbox::Receiver<Inbound>>>,
    identity: Identity,
    /// The socket's place under the connection caps, held by its session task.
    admission: Mutex<Option<Admission>>,
    closed: CancellationToken,
    /// Cancelled by the hub when the socket's outbound buffer stays full.
    slow: CancellationToken,
}

#[derive(Deserialize, Default)]
struct AuthPayload {
    token: Option<String>,
}

/// Registers every configured namespace on `io`.
pub fn attach(io: &SocketIo, state: &Arc<AppState>) {
    for namespace in &state.config.namespaces {
        let (auth_state, connect_state) = (state.clone(), state.clone());
        let ns = namespace.clone();
        let middleware = move |socket: SocketRef, TryData(auth): TryData<AuthPayload>| {
            let state = auth_state.clone();
            async move { authenticate(&state, socket, auth.ok()) }
        };
        let handler = move |socket: SocketRef| {
            let (state, namespace) = (connect_state.clone(), ns.clone());
            async move { connected(state, socket, namespace).await }
        };
        let path = namespace.as_str().to_owned();
        io.ns(
            path,
            socketioxide::handler::ConnectHandler::with(handler, middleware),
        );
    }
}

/// The handshake error a refused client sees as `connect_error`: its message is the code,
/// `unauthorized` for a bad, missing or expired token, or the limit's code
/// (`rate_limited`, `too_many_connections`, `server_full`).
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("unauthorized")]
    Unauthorized,
    #[error(transparent)]
    Limit(#[from] Refusal),
}

fn authenticate(
    state: &AppState,
    socket: SocketRef,
    auth: Option<AuthPayload>,
) -> Result<(), Refused> {
    let parts = socket.req_parts();
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let ip = state.limits.client_ip(peer, &parts.headers);
    let refused = |refusal: Refusal| {
        refusal.count("socketio");
        tracing::debug!(sid = %socket.id, ip = %shown(ip), code = refusal.code(), "socket.io connection refused");
        Refused::Limit(refusal)
    };
    state.limits.check_ip(ip).map_err(refused)?;
    let token = auth.and_then(|a| a.token).or_else(|| query_token(&socket));
    let identity = state.verifier.verify(token.as_deref()).map_err(|e| {
        metrics::counter!(m::AUTH_FAILURES, "transport" => "socketio").increment(1);
        tracing::info!(sid = %socket.id, error = %e, "socket.io handshake refused");
        Refused::Unauthorized
    })?;
    let admission = state.limits.admit(&identity.user).map_err(refused)?;
    let (tx, rx) = mailbox::bounded(INBOX_SIZE);
    socket.extensions.insert(Arc::new(Inbox {
        tx,
        rx: Mutex::new(Some(rx)),
        identity,
        admission: Mutex::new(Some(admission)),
        closed: CancellationToken::new(),
        slow: CancellationToken::new(),
    }));
    socket.on_fallback(async |_: Queued| {});
    Ok(())
}

fn query_token(socket: &SocketRef) -> Option<String> {
    let query = socket.req_parts().uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}

/// Queues an incoming event for the socket's session task. It is an extractor because
/// extractors run synchronously as each packet is read, so the queue keeps arrival order.
struct Queued;

impl FromMessage<socketioxide::adapter::LocalAdapter> for Queued {
    type Error = Infallible;

    fn from_message(
        s: Arc<Socket>,
        mut v: SioValue,
        ack_id: Option<i64>,
    ) -> Result<Self, Infallible> {
        let ack = match AckSender::from_message_parts(&s, &mut v, &ack_id) {
            Ok(ack) => ack,
            Err(never) => match never {},
        };
        let event = match Event::from_message_parts(&s, &mut v, &ack_id) {
            Ok(Event(event)) => event,
            Err(e) => {
                reject(
                    ack,
                    ErrorCode::BadRequest,
                    &format!("unreadable event: {e}"),
                );
                return Ok(Queued);
            }
        };
        let payload = match TryData::<Value>::from_message_parts(&s, &mut v, &ack_id) {
            Ok(TryData(data)) => data.map_err(|e| e.to_string()),
            Err(never) => match never {},
        };
        let Some(inbox) = s.extensions.get::<Arc<Inbox>>() else {
            reject(ack, ErrorCode::Unavailable, "session is not ready");
            return Ok(Queued);
        };
        if let Err(e) = inbox.tx.try_send(Inbound {
            event,
            payload,
            ack,
        }) {
            reject(
                e.into_inner().ack,
                ErrorCode::Overloaded,
                "too many events in flight; slow down",
            );
        }
        Ok(Queued)
    }
}

/// The headers a Socket.IO request still needs past this point: an upgrade's websocket key
/// (engineioxide answers with it), a polling POST's content type (engineioxide reads the
/// payload by it) and the forwarding headers that [`crate::limits::Limits::client_ip`] reads
/// at the handshake limit and in the auth middleware. CORS has read the rest already: its
/// layer is outside this one.
const KEPT_HEADERS: [&str; 4] = [
    "sec-websocket-key",
    "content-type",
    "x-forwarded-for",
    "x-real-ip",
];

/// Whether engineioxide serves `path`: `/socket.io` itself or anything under it (a client
/// may be told not to add the trailing slash).
fn is_socket_io(path: &str) -> bool {
    path.strip_prefix("/socket.io")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Trims a Socket.IO request to what engineioxide and herald read, in owned copies.
///
/// engineioxide keeps the handshake request's parts in its socket for the socket's whole life.
/// hyper parses a request without copying: the URI and every header value are slices of the
/// connection's read buffer (8 KiB or more), so keeping them kept that buffer, most of what
/// an idle websocket connection held (`benches/bar5-idle-memory.sh`). The URI and the headers
/// herald still needs ([`KEPT_HEADERS`]) are copied, so the buffer goes as soon as the
/// connection upgrades; the other headers (a browser sends a dozen: user agent, cookies,
/// languages…) and the router's copies of the path (`OriginalUri`, `MatchedPath`) are
/// dropped rather than kept for the connection's life.
pub async fn detach_from_read_buffer(mut req: axum::extract::Request) -> axum::extract::Request {
    if !is_socket_io(req.uri().path()) {
        return req;
    }
    if let Ok(uri) = axum::http::Uri::try_from(req.uri().to_string()) {
        *req.uri_mut() = uri;
    }
    // The peer address and hyper's upgrade handle stay.
    req.extensions_mut().remove::<OriginalUri>();
    req.extensions_mut().remove::<axum::extract::MatchedPath>();
    let headers = std::mem::take(req.headers_mut());
    let fresh = req.headers_mut();
    for name in KEPT_HEADERS {
        for value in headers.get_all(name) {
            let copy = axum::http::HeaderValue::from_bytes(value.as_bytes()).map(|mut v| {
                v.set_sensitive(value.is_sensitive());
                v
            });
            fresh.append(name, copy.unwrap_or_else(|_| value.clone()));
        }
    }
    req
}

/// Refuses a new Engine.IO session from an address over [`crate::limits::Limits::check_handshake`],
/// with 429 and the refusal's JSON, before engineioxide opens it. A new session is a request
/// on the Socket.IO path without a `sid`: a polling handshake, or a websocket opened directly.
pub async fn limit_handshakes(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let opens_session = is_socket_io(req.uri().path())
        && !req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("sid=")));
    if opens_session {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        let ip = state.limits.client_ip(peer, req.headers());
        if let Err(refusal) = state.limits.check_handshake(ip) {
            refusal.count("engineio");
            tracing::debug!(ip = %shown(ip), code = refusal.code(), "engine.io handshake refused");
            return crate::http::ApiError::Refused(refusal, refusal.message(&state.limits))
                .into_response();
        }
    }
    next.run(req).await
}

fn reject(ack: AckSender, code: ErrorCode, message: &str) {
    metrics::counter!(m::EVENTS_REJECTED, "error" => code.as_str()).increment(1);
    // The client may not have asked for an ack, or may be gone.
    let _ = ack.send(&ClientError::new(code, message).to_ack());
}

async fn connected(state: Arc<AppState>, socket: SocketRef, namespace: Namespace) {
    let Some(inbox) = socket.extensions.get::<Arc<Inbox>>() else {
        return;
    };
    let Some(mut rx) = inbox.rx.lock().ok().and_then(|mut rx| rx.take()) else {
        return;
    };
    let _admission = inbox.admission.lock().ok().and_then(|mut a| a.take());
    let (closed, slow) = (inbox.closed.clone(), inbox.slow.clone());
    socket.on_disconnect(async |socket: SocketRef, reason: DisconnectReason| {
        tracing::debug!(sid = %socket.id, %reason, "socket.io disconnected");
        if let Some(inbox) = socket.extensions.get::<Arc<Inbox>>() {
            inbox.closed.cancel();
        }
    });
    if !socket.connected() {
        return;
    }
    let _guard = ConnectionGuard::new(&state, "socketio", &namespace);
    let conn = Arc::new(Conn {
        id: ConnId::new(socket.id.to_string()),
        user: inbox.identity.user.clone(),
        sink: Sink::Sio(socket.clone()),
    });
    // This task lives as long as the socket, and its future is as large as the largest
    // future it awaits inline: the session's steps are boxed, so an idle socket holds only
    // the loop's own state.
    let opened = Box::pin(Session::open(
        state.hub.clone(),
        conn,
        namespace,
        inbox.identity.clone(),
        state.policy.clone(),
    ))
    .await;
    match opened {
        Ok(mut session) => {
            let _ = socket.emit("session", &session.describe());
            let mut control = session.take_control();
            loop {
                let inbound = tokio::select! {
                    inbound = rx.recv() => inbound,
                    Some(request) = control.recv() => {
                        if Box::pin(session.apply(request)).await {
                            continue;
                        }
                        let _ = socket.clone().disconnect();
                        None
                    }
                    () = closed.cancelled() => None,
                    () = slow.cancelled() => None,
                };
                let Some(inbound) = inbound else {
                    break;
                };
                let Inbound {
                    event,
                    payload,
                    ack,
                } = inbound;
                let reply = match payload {
                    Ok(payload) => Box::pin(session.handle(&event, payload)).await,
                    Err(e) => {
                        ClientError::new(ErrorCode::BadRequest, format!("unreadable payload: {e}"))
                            .to_ack()
                    }
                };
                let _ = ack.send(&reply);
            }
            // A slow consumer leaves its rooms first, so that nothing more queues up for it.
            Box::pin(session.close()).await;
            if slow.is_cancelled() && !closed.is_cancelled() {
                metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS, "transport" => "socketio")
                    .increment(1);
                tracing::info!(sid = %socket.id, "slow consumer disconnected");
                Box::pin(disconnect_slow(&socket, &closed)).await;
            }
        }
        Err(e) => {
            tracing::warn!(sid = %socket.id, error = %e, "session could not open");
            let _ = socket.clone().disconnect();
        }
    }
}

/// Tells a slow consumer why it goes (an `error` event with code `slow_consumer`), then
/// disconnects it from the namespace, as soon as its buffer has room for each packet.
async fn disconnect_slow(socket: &SocketRef, closed: &CancellationToken) {
    let notice = json!({
        "code": "slow_consumer",
        "message": "disconnected: the outbound queue stayed full; reconnect and rejoin with since to recover",
    });
    let deadline = Instant::now() + SLOW_NOTICE_WAIT;
    let mut told = false;
    loop {
        if !told {
            match socket.emit("error", &notice) {
                Ok(()) => told = true,
                Err(SendError::Socket(SocketError::InternalChannelFull)) => {}
                Err(_) => return,
            }
        }
        if told {
            match socket.clone().disconnect() {
                Err(SocketError::InternalChannelFull) => {}
                Ok(()) | Err(_) => return,
            }
        }
        if Instant::now() >= deadline {
            tracing::debug!(sid = %socket.id, "slow consumer never drained; its connection is left to the send timeout");
            return;
        }
        tokio::select! {
            () = closed.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Marks a socket whose buffer stayed full as a slow consumer; its session task ends it.
pub(crate) fn kick_slow(socket: &SocketRef) {
    if let Some(inbox) = socket.extensions.get::<Arc<Inbox>>() {
        inbox.slow.cancel();
    }
}

/// Emits one delivery to one socket, without waiting.
pub(crate) fn emit_to(socket: &SocketRef, payload: &Payload) -> Result<(), SendError> {
    match payload {
        Payload::Message(message) => socket.emit("message", &**message),
        Payload::Presence(change) => socket.emit("presence", change),
        Payload::Event { name, data } => socket.emit(&**name, &**data),
    }
}

/// Whether a send failed because the socket's buffer is full (rather than closed).
pub(crate) fn is_full(error: &SendError) -> bool {
    matches!(error, SendError::Socket(SocketError::InternalChannelFull))
}

/// Broadcasts one delivery to the room's live Socket.IO members on this instance, encoded
/// once. Returns how many members it could not reach.
pub(crate) async fn emit_room(
    io: &SocketIo,
    key: &RoomKey,
    except: &[RoomName],
    payload: &Payload,
) -> usize {
    let Some(ns) = io.of(key.namespace.as_str()) else {
        return 0;
    };
    let except: Vec<String> = except.iter().map(|r| r.as_str().to_owned()).collect();
    let to = ns.to(key.room.as_str().to_owned()).except(except);
    let result = match payload {
        Payload::Message(message) => to.emit("message", &**message).await,
        Payload::Presence(change) => to.emit("presence", change).await,
        Payload::Event { name, data } => to.emit(&**name, &**data).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::debug!(room = %key, error = %e, "socket.io broadcast incomplete");
            match e {
                socketioxide::BroadcastError::Socket(errors) => errors.len(),
                _ => 1,
            }
        }
    }
}

/// Emits one delivery to one socket, waiting (up to `deadline`) while its buffer is full.
pub(crate) async fn emit_one(
    socket: &SocketRef,
    payload: &Payload,
    deadline: Instant,
) -> Result<(), ()> {
    loop {
        match emit_to(socket, payload) {
            Ok(()) => return Ok(()),
            Err(SendError::Socket(SocketError::InternalChannelFull))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err(_) => return Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::body::{Body, Bytes};
    use axum::extract::{ConnectInfo, OriginalUri, Request};
    use axum::http::{HeaderValue, Uri};

    use super::detach_from_read_buffer;

    const PEER: &str = "10.1.2.3:4567";

    /// A request whose URI and header values are slices of one buffer, as hyper parses them,
    /// with the extensions axum's router and `serve` add.
    fn parsed(path: &str) -> (Bytes, Request) {
        let buffer = Bytes::from(format!(
            "{path}|dGhlIHNhbXBsZSBub25jZQ==|1.1.1.1|2.2.2.2|Bearer secret"
        ));
        let slice = |from: usize, len: usize| buffer.slice(from..from + len);
        let uri = Uri::from_maybe_shared(slice(0, path.len())).expect("uri");
        let mut req = Request::builder()
            .uri(uri.clone())
            .body(Body::empty())
            .expect("request");
        req.extensions_mut().insert(OriginalUri(uri));
        let peer: SocketAddr = PEER.parse().expect("address");
        req.extensions_mut().insert(ConnectInfo(peer));
        let at = path.len() + 1;
        let value = |from, len| HeaderValue::from_maybe_shared(slice(from, len)).expect("value");
        let mut key = value(at, 24);
        key.set_sensitive(true);
        let headers = req.headers_mut();
        headers.insert("sec-websocket-key", key);
        headers.append("x-forwarded-for", value(at + 25, 7));
        headers.append("x-forwarded-for", value(at + 33, 7));
        headers.insert("authorization", value(at + 41, 13));
        headers.insert("user-agent", HeaderValue::from_static("Mozilla/5.0"));
        (buffer, req)
    }

    fn inside(buffer: &Bytes, bytes: &[u8]) -> bool {
        let range = buffer.as_ptr_range();
        range.contains(&bytes.as_ptr())
    }

    #[tokio::test]
    async fn a_socket_io_request_keeps_what_is_read_and_nothing_of_the_read_buffer() {
        let (buffer, req) = parsed("/socket.io/?EIO=4&transport=websocket");
        let req = detach_from_read_buffer(req).await;
        assert_eq!(req.uri(), "/socket.io/?EIO=4&transport=websocket");
        let key = &req.headers()["sec-websocket-key"];
        assert_eq!(key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(key.is_sensitive(), "sensitivity is kept");
        let hops: Vec<_> = req.headers().get_all("x-forwarded-for").iter().collect();
        assert_eq!(
            hops,
            ["1.1.1.1", "2.2.2.2"],
            "repeated headers keep their order"
        );
        assert_eq!(
            req.headers().len(),
            3,
            "only what is read: {:?}",
            req.headers()
        );
        assert_eq!(
            req.extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string()),
            Some(PEER.to_owned()),
            "the peer address is kept"
        );
        assert!(req.extensions().get::<OriginalUri>().is_none());
        for value in req.headers().values() {
            assert!(
                !inside(&buffer, value.as_bytes()),
                "{value:?} still points into the buffer"
            );
        }
        let path = req.uri().path_and_query().expect("path").as_str();
        assert!(
            !inside(&buffer, path.as_bytes()),
            "the URI still points into the buffer"
        );
    }

    #[tokio::test]
    async fn the_socket_io_path_without_its_trailing_slash_is_trimmed_too() {
        let (buffer, req) = parsed("/socket.io?EIO=4&transport=websocket");
        let req = detach_from_read_buffer(req).await;
        assert_eq!(
            req.headers().len(),
            3,
            "only what is read: {:?}",
            req.headers()
        );
        let path = req.uri().path_and_query().expect("path").as_str();
        assert!(!inside(&buffer, path.as_bytes()));
    }

    #[tokio::test]
    async fn other_requests_are_left_as_they_are() {
        for path in ["/api/stats", "/socket.iox/stats"] {
            let (buffer, req) = parsed(path);
            let req = detach_from_read_buffer(req).await;
            let auth = &req.headers()["authorization"];
            assert!(
                inside(&buffer, auth.as_bytes()),
                "{path}: not copied, as nothing keeps it"
            );
            assert_eq!(req.headers().len(), 5, "{path}");
            assert!(req.extensions().get::<OriginalUri>().is_some(), "{path}");
        }
    }
}
