//! herald: a real-time messaging server with Socket.IO and plain WebSocket front doors.
//!
//! # Layout
//!
//! ```text
//! socket.io-client ─┐
//! plain WebSocket ──┼─► transport ─► session ─► hub ─► broker   (herald_core::Broker)
//! HTTP publish API ─┘   (sio, ws)                 └──► presence (herald_core::Presence)
//! ```
//!
//! - [`config`]: settings from the environment, a TOML file and flags.
//! - [`auth`]: JWT verification at the handshake, and development tokens.
//! - [`transport`]: the Socket.IO and `/ws` front doors.
//! - [`session`]: one client's commands, whatever its transport.
//! - [`protocol`]: the commands, error codes and ack shapes clients see.
//! - [`hub`]: the local room index and ordered fan-out.
//! - [`http`]: health, readiness, metrics and the HTTP API.
//! - [`metrics`] and [`telemetry`]: what herald reports about itself.
//!
//! [`run`] serves on a bound listener until a shutdown future resolves; `main` and the tests
//! both use it.

pub mod auth;
pub mod config;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod telemetry;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::Context;
use herald_core::memory::{MemoryBroker, MemoryPresence};
use herald_core::{Broker, Namespace, Presence};
use herald_redis::{RedisBroker, RedisPresence, RedisSettings};
use metrics_exporter_prometheus::PrometheusHandle;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::config::{AuthMode, Config};
use crate::hub::Hub;

/// Everything the transports and HTTP handlers share.
pub struct AppState {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub verifier: Verifier,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins: `/ready` fails and connections close.
    pub draining: CancellationToken,
    pub started: Instant,
    connections: AtomicI64,
    /// Whether Redis is connected, when a fleet is configured.
    pub broker_connected: Option<watch::Receiver<bool>>,
    /// Open connections, awaited (up to the timeout) at shutdown.
    sessions: TaskTracker,
}

impl AppState {
    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Whether herald runs in development mode: `HERALD_AUTH=off`, or no `JWT_SECRET` and no
    /// public key, so that tokens are signed with the generated development secret. The page
    /// at `/` offers `POST /dev/token` only then.
    pub fn dev_mode(&self) -> bool {
        self.config.auth == AuthMode::Off
            || (self.config.jwt_secret.is_none() && self.config.jwt_public_key.is_none())
    }
}

/// Counts one open connection, in `/api/stats` and the `herald_connections` gauge, for as
/// long as it lives.
pub struct ConnectionGuard {
    state: Arc<AppState>,
    labels: [(&'static str, String); 2],
    _session: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl ConnectionGuard {
    pub fn new(state: &Arc<AppState>, transport: &'static str, namespace: &Namespace) -> Self {
        let labels = [
            ("transport", transport.to_owned()),
            ("namespace", namespace.to_string()),
        ];
        ::metrics::gauge!(metrics::CONNECTIONS, &labels).increment(1);
        state.connections.fetch_add(1, Ordering::Relaxed);
        Self {
            state: state.clone(),
            labels,
            _session: state.sessions.token(),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::CONNECTIONS, &self.labels).decrement(1);
        self.state.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The broker and presence engines the configuration picks.
struct Engines {
    broker: Arc<dyn Broker>,
    presence: Arc<dyn Presence>,
    connected: Option<watch::Receiver<bool>>,
    redis_presence: Option<Arc<RedisPresence>>,
}

impl Engines {
    /// Redis when `redis_url` is set (serving alone until it is reachable), memory otherwise.
    fn start(config: &Config, router: &hub::Router) -> anyhow::Result<Self> {
        let Some(url) = &config.redis_url else {
            return Ok(Self {
                broker: Arc::new(MemoryBroker::new(
                    config.history_size,
                    Arc::new(router.clone()),
                )),
                presence: Arc::new(MemoryPresence::new()),
                connected: None,
                redis_presence: None,
            });
        };
        let settings = RedisSettings {
            url: url.clone(),
            password: config
                .redis_password
                .as_ref()
                .map(|p| p.expose().to_owned()),
            key: config.redis_key.clone(),
            namespaces: config.namespaces.clone(),
            history_size: config.history_size,
            history_ttl: config.history_ttl,
            presence_ttl: config.presence_ttl,
            uid: random_id(16),
        };
        let broker = Arc::new(
            RedisBroker::start(settings.clone(), Arc::new(router.clone()))
                .context("configuring redis")?,
        );
        let presence = Arc::new(RedisPresence::start(settings, broker.clone()));
        Ok(Self {
            connected: Some(broker.connected()),
            broker,
            presence: presence.clone(),
            redis_presence: Some(presence),
        })
    }
}

/// A random alphanumeric string of `len` characters.
pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = vec![0u8; len];
    if getrandom::fill(&mut bytes).is_err() {
        // No OS randomness: fall back to the clock and a counter, unique but guessable.
        static COUNTER: AtomicI64 = AtomicI64::new(0);
        let seed = hub::now_ms() ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(32);
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (seed.rotate_left(i as u32 * 7) & 0xff) as u8;
        }
    }
    bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// Serves herald on `listener` until `shutdown` resolves, then drains: reports not-ready,
/// closes every client transport so that clients reconnect elsewhere, and waits for sessions
/// to end, up to the configured timeout.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let verifier = Verifier::from_config(&config).context("loading JWT keys")?;
    if config.auth == AuthMode::Off {
        tracing::warn!(
            "HERALD_AUTH=off: anyone can connect without a token; never run this in production"
        );
    } else if config.jwt_secret.is_none() && config.jwt_public_key.is_none() {
        tracing::warn!(
            path = %config.data_dir.join("jwt-secret").display(),
            "JWT_SECRET is not set: using the generated development secret; `herald token` mints tokens for it"
        );
    }
    let metrics = metrics::install();
    let stop_engines = CancellationToken::new();
    let sio_cell = Arc::new(OnceLock::new());
    let (router, shards) = hub::router(std::thread::available_parallelism().map_or(2, |n| n.get()));
    let engines = Engines::start(&config, &router)?;
    let hub = Hub::start(
        &config.instance_id,
        engines.broker.clone(),
        engines.presence.clone(),
        router,
        shards,
        sio_cell.clone(),
        stop_engines.clone(),
    );

    let state = Arc::new(AppState {
        config,
        hub,
        verifier,
        metrics,
        draining: CancellationToken::new(),
        started: Instant::now(),
        connections: AtomicI64::new(0),
        sessions: TaskTracker::new(),
        broker_connected: engines.connected.clone(),
    });
    let (sio_layer, io) = SocketIo::builder()
        .max_payload((state.config.max_payload + 16 * 1024) as u64)
        .max_buffer_size(state.config.outbound_queue)
        .build_layer();
    transport::sio::attach(&io, &state);
    let _ = sio_cell.set(io.clone());

    let app = http::app(state.clone())
        .layer(sio_layer)
        .layer(http::cors(&state.config.cors_origins));
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    tracing::info!(%addr, "herald listening");
    let draining = state.draining.clone();
    let server = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { draining.cancelled().await });
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    let timeout = state.config.shutdown_timeout;
    tracing::info!(
        ?timeout,
        connections = state.connections(),
        "shutting down: draining connections"
    );
    state.draining.cancel();
    io.close().await;
    state.sessions.close();
    if tokio::time::timeout(timeout, state.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = state.connections(),
            "shutdown timeout reached with connections still open"
        );
    }
    if let Some(presence) = &engines.redis_presence {
        presence.clear().await;
    }
    stop_engines.cancel();
    match tokio::time::timeout(timeout, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e).context("http server failed"),
        Ok(Err(e)) => return Err(e).context("http server task failed"),
        Err(_) => tracing::warn!("http server did not stop within the shutdown timeout"),
    }
    tracing::info!("herald stopped");
    Ok(())
}
