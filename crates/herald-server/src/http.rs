//! The HTTP side: health, readiness, metrics, the publish and room APIs, and the page at `/`.
//! Errors map to status codes in one place, [`ApiError`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use herald_core::{HistoryQuery, Namespace, RoomKey, RoomName, UserId};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::AppState;
use crate::config::AuthMode;
use crate::limits::Refusal;
use crate::protocol::{ClientError, DEFAULT_HISTORY_LIMIT, ErrorCode, MAX_HISTORY_LIMIT};

/// Event names Socket.IO reserves, which the API refuses to emit.
const RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "newListener",
    "removeListener",
];

/// Builds the HTTP app (without the Socket.IO layer, which `run` adds).
pub fn app(state: Arc<AppState>) -> Router {
    // The API reads whole bodies up to the payload limit plus room for the envelope; beyond
    // that it stops reading and answers 413 `payload_too_large`.
    let body_limit = DefaultBodyLimit::max(api_body_limit(&state).max(MAX_BATCH_BODY));
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/stats.json", get(stats_json))
        .route("/dev/token", post(dev_token))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/ws", get(crate::transport::ws::upgrade))
        .route("/api/publish", post(publish).layer(body_limit))
        .route("/api/rooms/{room}/presence", get(room_presence))
        .route("/api/rooms/{room}/history", get(room_history))
        .route("/api/stats", get(stats))
        .with_state(state)
}

/// The CORS policy for `origins` (`*` for any). Requests carry tokens, not cookies, so
/// credentials are never allowed.
pub fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(Any)
        .allow_headers(Any)
}

/// Every error the HTTP side returns, as `{ok:false, error, message}` with its status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("a valid bearer token is required")]
    Unauthorized,
    #[error("the API is disabled: set HERALD_API_KEY")]
    Disabled,
    #[error("{0}")]
    BadRequest(String),
    #[error("body is {0} bytes; the limit is {1}")]
    TooLarge(usize, usize),
    #[error("body is larger than the limit of {0} bytes")]
    BodyTooLarge(usize),
    #[error("the server is shutting down")]
    Draining,
    /// A connection refused at the door; the message says which limit.
    #[error("{1}")]
    Refused(Refusal, String),
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Disabled => (StatusCode::FORBIDDEN, "disabled"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::TooLarge(..) | ApiError::BodyTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ApiError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Refused(refusal, _) => (refusal.status(), refusal.code()),
            ApiError::Client(e) => {
                let status = match e.code {
                    ErrorCode::BadRequest | ErrorCode::InvalidRoom | ErrorCode::UnknownEvent => {
                        StatusCode::BAD_REQUEST
                    }
                    ErrorCode::Forbidden | ErrorCode::NotMember | ErrorCode::TooManyRooms => {
                        StatusCode::FORBIDDEN
                    }
                    ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::Overloaded | ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::Unavailable | ErrorCode::StoreUnavailable => {
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                };
                (status, e.code.as_str())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = json!({ "ok": false, "error": code, "message": self.to_string() });
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// Proof that a request may use the API: the `HERALD_API_KEY` bearer token or, in dev mode
/// without a key, a loopback peer.
pub struct ApiAccess;

impl FromRequestParts<Arc<AppState>> for ApiAccess {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match &state.config.api_key {
            Some(key)
                if bearer
                    .is_some_and(|b| constant_time_eq(b.as_bytes(), key.expose().as_bytes())) =>
            {
                Ok(ApiAccess)
            }
            Some(_) => Err(ApiError::Unauthorized),
            None => {
                // Behind a trusted proxy on loopback, the client is the forwarded address.
                let peer = parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0);
                let peer = state.limits.client_ip(peer, &parts.headers);
                if state.config.auth == AuthMode::Off && peer.is_some_and(|ip| ip.is_loopback()) {
                    Ok(ApiAccess)
                } else {
                    Err(ApiError::Disabled)
                }
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The test page at `/`: connect clients, join rooms, send events and watch them arrive.
async fn index() -> Response {
    let headers = [(header::CACHE_CONTROL, "no-cache")];
    (headers, Html(include_str!("../../../web/index.html"))).into_response()
}

/// The page's files, embedded so that the binary serves the page offline:
/// (name under `/assets/`, content type, cache policy, contents).
const ASSETS: &[(&str, &str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        "no-cache",
        include_bytes!("../../../web/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        "no-cache",
        include_bytes!("../../../web/app.css"),
    ),
    // socket.io-client's browser build, vendored by web/vendor/update.sh.
    (
        "socket.io.min.js",
        "text/javascript; charset=utf-8",
        "public, max-age=86400",
        include_bytes!("../../../web/vendor/socket.io.min.js"),
    ),
];

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, ..)| *name == file) {
        Some((_, content_type, cache, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, *cache),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// What a standalone `herald worker` serves: `/health`, `/ready` (the store answers) and
/// `/metrics` (queue length, pending, lag, batch size and latency, rows written, retries).
pub fn worker_app(metrics: PrometheusHandle, store: Arc<dyn herald_core::Store>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/ready",
            get(async move || {
                match tokio::time::timeout(std::time::Duration::from_secs(2), store.ping()).await {
                    Ok(Ok(())) => Json(json!({ "ready": true, "role": "worker" })).into_response(),
                    Ok(Err(e)) => not_ready(format!("store unavailable: {e}")),
                    Err(_) => not_ready("store unavailable: no answer within 2s".to_owned()),
                }
            }),
        )
        .route("/metrics", get(async move || prometheus_text(&metrics)))
}

fn not_ready(reason: String) -> Response {
    let body = json!({ "ready": false, "reason": reason });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

fn prometheus_text(metrics: &PrometheusHandle) -> Response {
    let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (content_type, metrics.render()).into_response()
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.is_cancelled() {
        return not_ready("draining".to_owned());
    }
    let broker = match &state.broker_connected {
        None => "memory",
        Some(connected) if *connected.borrow() => "redis",
        Some(_) => return not_ready("redis unavailable: serving this instance alone".to_owned()),
    };
    if let Err(e) = state.hub.store_ready().await {
        return not_ready(format!("store unavailable: {e}"));
    }
    Json(json!({ "ready": true, "broker": broker, "instance": state.hub.instance() }))
        .into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    prometheus_text(&state.metrics)
}

async fn stats(_: ApiAccess, State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "instance": state.hub.instance(),
        "connections": state.connections(),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "draining": state.draining.is_cancelled(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    room: Option<String>,
    user: Option<String>,
    event: Option<String>,
    data: Option<Box<RawValue>>,
    from: Option<String>,
    namespace: Option<String>,
    /// A batch: `[{room, data, from?}, …]`, published in order.
    messages: Option<Vec<BatchItem>>,
}

/// One message of a batch publish.
#[derive(Deserialize)]
struct BatchItem {
    room: String,
    data: Option<Box<RawValue>>,
    from: Option<String>,
}

/// The most messages one `POST /api/publish` batch may carry.
pub const MAX_BATCH_MESSAGES: usize = 1000;

/// The largest body of a batch publish (each message's data stays within
/// `HERALD_MAX_PAYLOAD`).
pub const MAX_BATCH_BODY: usize = 4 * 1024 * 1024;

fn api_body_limit(state: &AppState) -> usize {
    state.config.max_payload + 16 * 1024
}

/// `POST /api/publish`: `{room, data}` publishes a message; `{room|user, event, data}` emits an
/// event that is not recorded; `{messages: [{room, data, from?}, …]}` publishes a batch.
async fn publish(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::BodyTooLarge(api_body_limit(&state).max(MAX_BATCH_BODY))
        }
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let request: PublishRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("malformed JSON: {e}")))?;
    let namespace = namespace(&state, request.namespace.as_deref())?;
    if let Some(messages) = request.messages {
        if request.room.is_some() || request.user.is_some() || request.event.is_some() {
            return Err(ApiError::BadRequest(
                "a batch carries room, data and from in each of its messages".into(),
            ));
        }
        return publish_batch(&state, namespace, messages).await;
    }
    let limit = api_body_limit(&state);
    if body.len() > limit {
        return Err(ApiError::TooLarge(body.len(), limit));
    }
    let data = payload(&state, request.data)?;
    let Some(event) = request.event else {
        let room = request
            .room
            .ok_or_else(|| ApiError::BadRequest("room is required".into()))?;
        let key = RoomKey::new(namespace, room_name(&room)?);
        let from = sender(request.from)?;
        let message = state.hub.publish(key, from, data).await?;
        return Ok(Json(published_json(&message)));
    };
    if event.is_empty() || event.len() > 64 || RESERVED_EVENTS.contains(&event.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "event {event:?} is empty, too long or reserved"
        )));
    }
    let room = match (request.room, request.user) {
        (Some(room), None) => room_name(&room)?,
        (None, Some(user)) => RoomName::new(&format!("user:{user}"))
            .map_err(|e| ApiError::BadRequest(format!("invalid user: {e}")))?,
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of room or user".into(),
            ));
        }
    };
    state
        .hub
        .emit(RoomKey::new(namespace, room), &event, data.into())
        .await?;
    Ok(Json(json!({ "ok": true })))
}

/// `Query`, with a malformed query string (`since=abc`) answered like every other API error:
/// `400 {ok: false, error: "bad_request", message}` rather than axum's plain text.
struct ApiQuery<T>(T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(query)| Self(query))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

#[derive(Deserialize)]
struct RoomQuery {
    namespace: Option<String>,
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
    /// History of an earlier epoch than the room's, from the store.
    epoch: Option<String>,
}

async fn room_presence(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    ApiQuery(query): ApiQuery<RoomQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = RoomKey::new(
        namespace(&state, query.namespace.as_deref())?,
        room_name(&room)?,
    );
    let users = state.hub.presence(&key).await?;
    Ok(Json(
        json!({ "ok": true, "room": key.room, "users": users }),
    ))
}

async fn room_history(
    _: ApiAccess,
    State(state): State<Arc<AppState>>,
    Path(room): Path<String>,
    ApiQuery(query): ApiQuery<RoomQuery>,
) -> Result<Json<Value>, ApiError> {
    let key = RoomKey::new(
        namespace(&state, query.namespace.as_deref())?,
        room_name(&room)?,
    );
    let limit = query
        .limit
        .unwrap_or(DEFAULT_HISTORY_LIMIT)
        .min(MAX_HISTORY_LIMIT);
    let page = state
        .hub
        .history_in(
            &key,
            query.epoch.as_deref(),
            HistoryQuery {
                since: query.since,
                before: query.before,
                limit,
            },
        )
        .await?;
    Ok(Json(json!({
        "ok": true,
        "room": key.room,
        "messages": page.messages,
        "offset": page.position.offset,
        "epoch": &*page.position.epoch,
    })))
}

/// A message's data (`null` when absent), within `HERALD_MAX_PAYLOAD`, and holding only what
/// a JSON value can (see [`Storable`]).
fn payload(state: &AppState, data: Option<Box<RawValue>>) -> Result<Box<RawValue>, ApiError> {
    let data = match data {
        Some(data) => data,
        None => {
            RawValue::from_string("null".into()).map_err(|e| ApiError::BadRequest(e.to_string()))?
        }
    };
    if data.get().len() > state.config.max_payload {
        return Err(ApiError::TooLarge(
            data.get().len(),
            state.config.max_payload,
        ));
    }
    if let Some(why) = herald_core::unpaired_surrogate(data.get()) {
        return Err(ApiError::BadRequest(format!("data holds {why}")));
    }
    serde_json::from_str::<Storable>(data.get())
        .map_err(|e| ApiError::BadRequest(format!("data cannot be kept: {e}")))?;
    Ok(data)
}

/// Reads JSON the way a JSON value would, keeping nothing. A raw value is only checked for
/// syntax, so it lets through what the socket transports (which parse data into values) and
/// PostgreSQL's `jsonb` refuse: an unpaired UTF-16 surrogate escape (`"\ud800"`, no Unicode
/// character) and a number beyond a double's range (`1e999`, which would fail its store
/// batch on every retry).
struct Storable;

impl<'de> serde::Deserialize<'de> for Storable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StorableVisitor)
    }
}

struct StorableVisitor;

impl<'de> serde::de::Visitor<'de> for StorableVisitor {
    type Value = Storable;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Storable, E> {
        Ok(Storable)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Storable, E> {
        Ok(Storable)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Storable, E> {
        Ok(Storable)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Storable, E> {
        Ok(Storable)
    }

    fn visit_str<E>(self, _: &str) -> Result<Storable, E> {
        Ok(Storable)
    }

    fn visit_unit<E>(self) -> Result<Storable, E> {
        Ok(Storable)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Storable, A::Error> {
        while seq.next_element::<Storable>()?.is_some() {}
        Ok(Storable)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Storable, A::Error> {
        while map.next_entry::<Storable, Storable>()?.is_some() {}
        Ok(Storable)
    }
}

/// The sender a published message names: `from`, or `api`.
fn sender(from: Option<String>) -> Result<UserId, ApiError> {
    let from = from.unwrap_or_else(|| "api".into());
    if from.is_empty() || from.len() > 128 {
        return Err(ApiError::BadRequest("from must be 1 to 128 bytes".into()));
    }
    Ok(UserId::new(from))
}

/// Publishes a batch in order. Each message is answered alone, in the batch's order: a
/// message that is invalid or refused does not hold back the others.
async fn publish_batch(
    state: &AppState,
    namespace: Namespace,
    messages: Vec<BatchItem>,
) -> Result<Json<Value>, ApiError> {
    if messages.is_empty() || messages.len() > MAX_BATCH_MESSAGES {
        return Err(ApiError::BadRequest(format!(
            "a batch holds 1 to {MAX_BATCH_MESSAGES} messages, not {}",
            messages.len()
        )));
    }
    // Refusals in place, `None` where the hub answers.
    let mut checked = Vec::with_capacity(messages.len());
    let mut items = Vec::with_capacity(messages.len());
    for item in messages {
        let valid = room_name(&item.room).and_then(|room| {
            Ok((
                RoomKey::new(namespace.clone(), room),
                sender(item.from)?,
                payload(state, item.data)?,
            ))
        });
        match valid {
            Ok(item) => {
                items.push(item);
                checked.push(None);
            }
            Err(e) => checked.push(Some(refusal(&e))),
        }
    }
    let mut answers = state.hub.publish_batch(items).await.into_iter();
    let results: Vec<Value> = checked
        .into_iter()
        .map(|refused| {
            refused.unwrap_or_else(|| match answers.next() {
                Some(Ok(message)) => published_json(&message),
                Some(Err(e)) => refusal(&ApiError::Client(e)),
                None => refusal(&ApiError::Client(ClientError::new(
                    ErrorCode::Unavailable,
                    "the hub gave no answer",
                ))),
            })
        })
        .collect();
    let published = results.iter().filter(|r| r["ok"] == true).count();
    Ok(Json(
        json!({ "ok": true, "published": published, "results": results }),
    ))
}

/// A published message's answer: `{ok, id, offset, epoch}`.
fn published_json(message: &herald_core::Message) -> Value {
    json!({ "ok": true, "id": message.id, "offset": message.offset, "epoch": &*message.epoch })
}

/// One batch message's refusal, in the API's error shape.
fn refusal(e: &ApiError) -> Value {
    json!({ "ok": false, "error": e.status_and_code().1, "message": e.to_string() })
}

fn room_name(room: &str) -> Result<RoomName, ApiError> {
    RoomName::new(room).map_err(|e| ClientError::new(ErrorCode::InvalidRoom, e.to_string()).into())
}

fn namespace(state: &AppState, given: Option<&str>) -> Result<Namespace, ApiError> {
    let namespace = given.map_or_else(Namespace::root, Namespace::new);
    if state.config.namespaces.contains(&namespace) {
        Ok(namespace)
    } else {
        Err(ApiError::BadRequest(format!(
            "unknown namespace {namespace}"
        )))
    }
}

/// `GET /stats.json`: this instance's counters for the page's live chart. Public, so it holds
/// counters only, never room or user names. `published` and `delivered` count since the
/// process started.
async fn stats_json(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render();
    let body = json!({
        "instance": state.hub.instance(),
        "connections": state.connections(),
        "published": counter_total(&text, crate::metrics::MESSAGES_PUBLISHED),
        "delivered": counter_total(&text, crate::metrics::MESSAGES_DELIVERED),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "dev_mode": state.dev_mode(),
    });
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// The sum of every series of the counter `name` in Prometheus text: `name 3` and
/// `name{label="v"} 4` lines (label values may hold spaces, braces and escaped quotes).
fn counter_total(text: &str, name: &str) -> u64 {
    /// What follows the closing brace of a label set that `labels` starts inside.
    fn after_labels(labels: &str) -> Option<&str> {
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in labels.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => return Some(&labels[i + 1..]),
                _ => {}
            }
        }
        None
    }
    let total: f64 = text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => after_labels(labels)?,
                None => rest,
            };
            if !rest.starts_with([' ', '\t']) {
                return None; // another metric whose name starts with `name`
            }
            let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
            (value.is_finite() && value >= 0.0).then_some(value)
        })
        .sum();
    total.round() as u64
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenRequest {
    sub: String,
    rooms: Option<Vec<String>>,
}

/// How long a token from `POST /dev/token` is valid.
const DEV_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// `POST /dev/token` `{sub, rooms?}` → `{ok, token, sub, expires_in}`: a short-lived token for
/// the page's "mint dev token" button. It exists only in dev mode ([`AppState::dev_mode`]); in
/// production it is a 404 like any unknown path. Browsers may call it from this server's own
/// page only, so that another site open in the developer's browser cannot mint tokens.
///
/// With auth on and no `JWT_SECRET` (a plain start, which listens on every address), tokens
/// are minted only for clients on this machine: otherwise anyone who can reach the port could
/// mint a token for any user. `HERALD_AUTH=off` admits everyone anyway, and keeps the page
/// usable from other machines.
async fn dev_token(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let not_found = || Ok(StatusCode::NOT_FOUND.into_response());
    if !state.dev_mode() {
        return not_found();
    }
    if !same_origin(&headers) {
        return Err(ClientError::new(
            ErrorCode::Forbidden,
            "dev tokens are minted for this server's own page only",
        )
        .into());
    }
    let local = state
        .limits
        .client_ip(Some(peer), &headers)
        .is_some_and(|ip| ip.is_loopback());
    if state.config.auth != AuthMode::Off && !local {
        return Err(ClientError::new(
            ErrorCode::Forbidden,
            "dev tokens are minted only for clients on this machine while auth is on; \
             mint one with `herald token --sub <user>` on the server, set JWT_SECRET, \
             or run with HERALD_AUTH=off for development",
        )
        .into());
    }
    let secret = match (&state.config.jwt_secret, &state.config.jwt_public_key) {
        (Some(secret), _) => secret.clone(),
        (None, None) => crate::auth::dev_secret(&state.config.data_dir)
            .map_err(|e| ClientError::new(ErrorCode::Unavailable, e.to_string()))?,
        // HERALD_AUTH=off with only a public key: herald holds no key to sign with.
        (None, Some(_)) => return not_found(),
    };
    let request: DevTokenRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("expected {{sub, rooms?}}: {e}")))?;
    if let Err(e) = crate::auth::check_subject(&request.sub) {
        return Err(ApiError::BadRequest(e.to_string()));
    }
    if let Some(rooms) = &request.rooms
        && (rooms.len() > 64 || rooms.iter().any(|r| r.is_empty() || r.len() > 128))
    {
        return Err(ApiError::BadRequest(
            "rooms takes at most 64 patterns of 1 to 128 bytes".into(),
        ));
    }
    let token = crate::auth::mint(&secret, &request.sub, request.rooms, DEV_TOKEN_TTL)
        .map_err(|e| ClientError::new(ErrorCode::Unavailable, e.to_string()))?;
    tracing::info!(sub = %request.sub, "minted a development token for the page");
    let body = json!({
        "ok": true,
        "token": token,
        "sub": request.sub,
        "expires_in": DEV_TOKEN_TTL.as_secs(),
    });
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response())
}

/// Whether a request comes from a page of this server: no `Origin` (not a browser, or a
/// same-origin GET), or an `Origin` naming the `Host` the request was sent to.
fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| {
        o.strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))
    });
    matches!((origin_host, host), (Some(a), Some(b)) if a.eq_ignore_ascii_case(b))
}

#[cfg(test)]
mod tests {
    use super::{counter_total, same_origin};
    use axum::http::{HeaderMap, HeaderValue, header};

    #[test]
    fn same_origin_compares_the_origin_with_the_host() {
        let headers = |origin: Option<&'static str>| {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:3000"));
            if let Some(o) = origin {
                h.insert(header::ORIGIN, HeaderValue::from_static(o));
            }
            h
        };
        assert!(same_origin(&headers(None)));
        assert!(same_origin(&headers(Some("http://127.0.0.1:3000"))));
        assert!(same_origin(&headers(Some("https://127.0.0.1:3000"))));
        assert!(!same_origin(&headers(Some("http://evil.example"))));
        assert!(!same_origin(&headers(Some("http://127.0.0.1:3001"))));
        assert!(!same_origin(&headers(Some("null"))));
    }

    #[test]
    fn counter_total_sums_every_series_of_exactly_that_counter() {
        let text = r#"# HELP herald_messages_published_total Messages published
# TYPE herald_messages_published_total counter
herald_messages_published_total 3
herald_messages_published_total{namespace="/"} 4
herald_messages_published_total{reason="a } b \" c",x="y"} 5
herald_messages_published_total_extra 100
herald_messages_published_totally{a="b"} 100
herald_messages_delivered_total{transport="socketio"} 1.5e1
herald_messages_delivered_total{transport="ws"} 2
"#;
        assert_eq!(counter_total(text, "herald_messages_published_total"), 12);
        assert_eq!(counter_total(text, "herald_messages_delivered_total"), 17);
        assert_eq!(counter_total(text, "herald_missing_total"), 0);
    }

    #[test]
    fn counter_total_skips_unreadable_lines() {
        let text = "c 2\nc{broken=\"x\" 9\nc NaN\nc -1\nc +Inf\nc\nc{} 1\n";
        assert_eq!(counter_total(text, "c"), 3);
    }
}
